"""Served semantics: shared fused scales and exact-reciprocal FP8 scales, and the KL a run reports equals the KL of
its export as vLLM, SGLang and TensorRT-LLM load it (tests/engine_load.py emulates their load rules)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from engine_load import ENGINES, requantized_codes_changed, served_model

from auto_quantize_model.autoquant.serving import (
    exact_reciprocal_amax,
    fp8_scale_pair,
    fused_groups,
    serving_calibration,
)
from auto_quantize_model.configs import get_scheme, resolve_scheme
from auto_quantize_model.errors import UserError


def test_exact_reciprocal_amax_makes_the_engines_reciprocal_the_fake_quant_scale():
    amax = torch.rand(2000, generator=torch.Generator().manual_seed(0)) * 20 + 1e-3
    scale, inv = fp8_scale_pair(amax)
    assert (1 / inv != scale).float().mean() > 0.05  # as calibrated, an engine's 1/input_scale is often not S
    for a in amax[:300]:
        b = exact_reciprocal_amax(a)
        s, i = fp8_scale_pair(b)
        assert torch.equal(1 / i, s) and b >= a.float() and (b - a.float()) / a < 1e-5
    assert torch.equal(exact_reciprocal_amax(torch.tensor(0.0)), torch.tensor(0.0))  # ModelOpt's zero-amax rule kept


def test_exact_reciprocal_amax_gives_the_cpu_and_gpu_paths_one_scale():
    """ModelOpt's CPU path computes S as ``448.0 / amax`` in Python, which torch runs as ``amax.reciprocal() * 448``;
    its CUDA extension divides (ATen's ``448.f / amax``). The two differ by an ulp for about a quarter of float32
    amaxes, so a GPU search evaluated another S than the one the export wrote (found on an H100: 15 layers of 253
    off by up to 2e-5). Rule 1 checked the CPU path only: these amaxes passed it unchanged."""
    amax = torch.rand(4000, generator=torch.Generator().manual_seed(1)) * 20 + 1e-3
    cpu = 448.0 / amax
    gpu = torch.full_like(amax, 448.0) / amax
    differ = amax[(cpu != gpu) & (1 / (1 / cpu) == cpu)]  # rule 1 was satisfied, the paths still disagree
    assert len(differ) > 100
    for a in differ[:200]:
        b = exact_reciprocal_amax(a)
        assert b > a and (b - a) / a < 1e-5
        assert torch.equal(torch.tensor(448.0) / b, 448.0 / b)  # the GPU path's S equals the CPU path's
        s, i = fp8_scale_pair(b)
        assert torch.equal(1 / i, s)


def test_fused_groups_lm_and_vision(tiny_model_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    full = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_model_dir))
    groups = fused_groups(full)
    leaves = sorted({tuple(n.rsplit(".", 1)[1] for n in g) for g in groups})
    assert leaves == [("gate_proj", "up_proj"), ("q_proj", "k_proj", "v_proj")]
    n_lm, n_vis = full.config.text_config.num_hidden_layers, full.config.vision_config.depth
    assert sum("visual" in g[0] for g in groups) == n_vis  # vision MLP gate/up (engines fuse it: gate_up_proj)
    assert len(groups) == 2 * n_lm + n_vis


def test_serving_calibration_restores_modelopt_on_error():
    from modelopt.torch.quantization import model_quant

    original = model_quant.calibrate
    with pytest.raises(RuntimeError, match="boom"), serving_calibration("shared"):
        assert model_quant.calibrate is not original
        raise RuntimeError("boom")
    assert model_quant.calibrate is original


def test_fused_scales_is_a_checked_scheme_setting_and_part_of_the_identity(loaded, calib, tmp_path, capsys):
    from auto_quantize_model.autoquant.identity import DataIdentity, scoring_key
    from auto_quantize_model.cli import main

    base = resolve_scheme(get_scheme("fp8_autoquant_top50"))
    assert base.fused_scales == "shared"
    ident = DataIdentity.of(loaded, calib)
    assert scoring_key(ident, base) != scoring_key(ident, dataclasses.replace(base, fused_scales="separate"))
    with pytest.raises(UserError, match="fused_scales 'both' is unknown"):
        dataclasses.replace(base, fused_scales="both")
    f = tmp_path / "s.toml"
    f.write_text('[schemes.x]\ncandidate_formats = ["FP8_DEFAULT_CFG"]\neffective_bits = 12.0\n'
                 'fused_scales = "fused"\n')
    assert main(["schemes", "--schemes-file", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fused_scales 'fused' is unknown" in err[0]


def test_default_calibration_uses_every_loaded_batch(loaded, calib):
    from auto_quantize_model.autoquant.identity import DataIdentity, effective_steps, scoring_key

    s = resolve_scheme(get_scheme("fp8_autoquant_top50"))
    n = len(calib.batches)
    assert s.num_calib_steps is None and effective_steps(s, n, calib.batch_size)["num_calib_steps"] == n
    assert effective_steps(resolve_scheme(s, num_calib_steps=2), n, calib.batch_size)["num_calib_steps"] == 2
    ident = DataIdentity.of(loaded, calib)  # "all batches" and the same count given explicitly are one search
    assert scoring_key(ident, s) == scoring_key(ident, resolve_scheme(s, num_calib_steps=n))


@pytest.fixture(scope="module")
def served_runs(tiny_model_dir, calib, tmp_path_factory):
    """All-layers FP8 at 8 bits (every q/k/v and gate/up group FP8), shared and separate fused scales, run in bf16
    on CPU (the export's dtype) and exported; the reference and held-out captions beside them."""
    from auto_quantize_model.autoquant.rebuild import build_quantized_model, find_run
    from auto_quantize_model.autoquant.run import run_scheme
    from auto_quantize_model.cli import main
    from auto_quantize_model.datasets.calibration import build_calibration_set
    from auto_quantize_model.datasets.captions import read_captions
    from auto_quantize_model.models.loading import load_language_model

    bf16 = load_language_model(tiny_model_dir, device="cpu", dtype="bfloat16")
    root = tmp_path_factory.mktemp("served")
    out = {}
    for mode in ("shared", "separate"):
        scheme = dataclasses.replace(resolve_scheme(get_scheme("fp8_autoquant_all_layers_fp8")), name=f"all_{mode}",
                                     effective_bits=8.0, fused_scales=mode)
        run_scheme(bf16, calib, scheme, root / mode, cache_dir=root / "cache")
        assert main(["export", str(root / mode), "--model-dir", str(tiny_model_dir), "--output-dir",
                     str(root / f"export_{mode}")]) == 0
        run = find_run(root / mode)
        out[mode] = (run, build_quantized_model(bf16, run), root / f"export_{mode}")
    held_out = build_calibration_set(bf16.tokenizer, read_captions("demo"), max_samples=16, batch_size=4, seq_len=48,
                                     seed=7)
    return bf16, held_out, out


def _kl(model, loaded, data):
    from auto_quantize_model.inference.metrics import evaluate_against_reference

    return evaluate_against_reference(model, loaded.model, data.batches, forward=loaded.forward_step)["kl_mean"]


@pytest.mark.parametrize("engine", ENGINES)
def test_reported_kl_is_the_served_kl_with_shared_scales(served_runs, engine):
    """With shared fused scales an engine serves the evaluated model: vLLM keeps the exported codes (equal shard
    scales: no requantization), SGLang's and TensorRT-LLM's always-on requantization gives every code back, and
    1/input_scale is the fake-quant activation scale, so the KL is equal exactly (not to rounding)."""
    loaded, data, runs = served_runs
    run, fake_quant, export_dir = runs["shared"]
    assert run.manifest["serving"]["fused_scales"] == "shared"
    assert all(g["shared"] == {"weight": True, "input": True} for g in run.manifest["serving"]["fused_groups"])
    assert requantized_codes_changed(export_dir, engine) == 0
    served = served_model(export_dir, engine)
    reported = _kl(fake_quant, loaded, data)
    assert reported > 0
    if engine == "trtllm":  # activations by division (x / I): equal unless a value sits on an FP8 rounding tie
        assert _kl(served, loaded, data) == pytest.approx(reported, rel=1e-3)
    else:
        assert _kl(served, loaded, data) == reported


@pytest.mark.parametrize("engine", ENGINES)
def test_separate_scales_are_not_what_engines_serve(served_runs, engine):
    """With separate scales every engine requantizes q/k/v and gate/up to the group's max scale and quantizes their
    input with the max input scale: the served model is not the evaluated one (why ``shared`` is the default)."""
    loaded, data, runs = served_runs
    _, fake_quant, export_dir = runs["separate"]
    assert requantized_codes_changed(export_dir, engine) > 0
    assert _kl(served_model(export_dir, engine), loaded, data) != _kl(fake_quant, loaded, data)


def test_uniform_control_is_calibrated_as_served(loaded, calib):
    """The uniform FP8 PTQ control (mtq.quantize) gets the same served semantics as every search."""
    from auto_quantize_model.inference.controls import build_uniform_ptq

    model = build_uniform_ptq(loaded, calib, 2).model
    for group in fused_groups(model):
        for attr in ("weight_quantizer", "input_quantizer"):
            amaxes = {float(getattr(model.get_submodule(n), attr).amax) for n in group}
            assert len(amaxes) == 1, (group, attr)
    q = model.get_submodule("model.layers.0.mlp.down_proj").input_quantizer
    scale, inv = fp8_scale_pair(q.amax)
    assert q.amax.dtype == torch.float32 and torch.equal(1 / inv, scale)
