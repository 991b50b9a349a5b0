"""The compressed-tensors export format, the FP8 KV-cache option, and what plain ``transformers`` makes of each format
(tiny random-weight model, CPU)."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from auto_quantize_model.autoquant.rebuild import build_quantized_model, find_run
from auto_quantize_model.autoquant.run import run_scheme
from auto_quantize_model.cli import main
from auto_quantize_model.configs import get_scheme, resolve_scheme
from auto_quantize_model.errors import UserError
from auto_quantize_model.export.hf import export_run
from auto_quantize_model.inference.fp8_linear import load_exported_lm
from auto_quantize_model.io_utils import current_umask
from auto_quantize_model.models.loading import load_language_model

CT = "compressed-tensors"
VARIANTS = {  # name: (format, kv_cache)
    "modelopt": ("modelopt", "none"),
    "ct": (CT, "none"),
    "modelopt_kv": ("modelopt", "fp8"),
    "ct_kv": (CT, "fp8"),
}


@pytest.fixture(scope="module")
def bf16_loaded(tiny_model_dir):
    return load_language_model(tiny_model_dir, device="cpu", dtype="bfloat16")


@pytest.fixture(scope="module")
def formats(bf16_loaded, calib, tiny_model_dir, tmp_path_factory):
    """Runs at 12 bits (lm_head BF16, tied) and 8 bits (every layer FP8, lm_head too) made in bf16 on CPU, each
    exported in every variant: label -> (run, {variant: export dir})."""
    root = tmp_path_factory.mktemp("formats")
    out = {}
    for label, bits, base in (("some", 12.0, "fp8_autoquant_top50"), ("all", 8.0, "fp8_autoquant_all_layers_fp8")):
        scheme = dataclasses.replace(resolve_scheme(get_scheme(base)), name=f"fmt_{label}", effective_bits=bits)
        run_scheme(bf16_loaded, calib, scheme, root / label, cache_dir=root / "cache")
        dirs = {}
        for variant, (fmt, kv) in VARIANTS.items():
            dirs[variant] = root / f"{label}_{variant}"
            export_run(root / label, tiny_model_dir, dirs[variant], format=fmt, kv_cache=kv)
        out[label] = (find_run(root / label), dirs)
    return out


def _tensors(d):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _qc(d):
    return json.loads((d / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("label", ["some", "all"])
def test_compressed_tensors_export_holds_the_modelopt_exports_tensors(formats, label):
    """Both formats store the same evaluated codes and scales (bit for bit) and the same BF16 tensors; only the
    scale shapes ((1,) against ()) and the configs differ."""
    run, dirs = formats[label]
    mo, ct = _tensors(dirs["modelopt"]), _tensors(dirs["ct"])
    assert set(mo) == set(ct)
    for k, t in mo.items():
        assert ct[k].dtype == t.dtype, k
        assert torch.equal(ct[k].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), k
    fp8 = {k.removesuffix(".weight") for k, t in ct.items() if t.dtype == torch.float8_e4m3fn}
    assert fp8 == {n for n, lay in run.manifest["layers"].items() if lay["dtype"] == "fp8"}
    assert all(ct[f"{p}.{s}"].shape == (1,) and ct[f"{p}.{s}"].dtype == torch.float32
               for p in fp8 for s in ("weight_scale", "input_scale"))
    assert not (dirs["ct"] / "hf_quant_config.json").exists()
    info = json.loads((dirs["ct"] / "autoquant_export.json").read_text())
    assert info["format"] == CT and info["kv_cache"]["dtype"].startswith("bf16")
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~current_umask() for p in dirs["ct"].iterdir())
    assert not [p for p in dirs["ct"].parent.iterdir() if p.name.startswith(".")]  # no temp dir left


@pytest.mark.parametrize("label", ["some", "all"])
def test_compressed_tensors_config_spells_what_vllm_and_transformers_match(formats, label):
    """float-quantized, one static per-tensor FP8 W8A8 group; every ignore entry an exact runtime Linear name or a
    ``re:`` regex (vLLM 0.34.0 matches no globs); lm_head a regex target exactly when it is FP8, and untied."""
    from transformers import AutoConfig

    from auto_quantize_model.export.checks import config_model

    run, dirs = formats[label]
    qc = _qc(dirs["ct"])
    assert qc["quant_method"] == CT and qc["format"] == "float-quantized" and qc["kv_cache_scheme"] is None
    (group,) = qc["config_groups"].values()
    for args in (group["weights"], group["input_activations"]):
        assert {k: args[k] for k in ("num_bits", "type", "strategy", "symmetric", "dynamic")} == {
            "num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False}
    linears = {n for n, m in config_model(dirs["ct"]).named_modules() if isinstance(m, torch.nn.Linear)}
    assert all(e.startswith("re:") or e in linears for e in qc["ignore"]), qc["ignore"]
    assert not any("*" in e and not e.startswith("re:") for e in qc["ignore"])
    assert r"re:(model\.)?visual\." in qc["ignore"]
    head_fp8 = run.manifest["layers"]["lm_head"]["dtype"] == "fp8"
    assert ("re:.*lm_head$" in group["targets"]) is head_fp8 and ("lm_head" in qc["ignore"]) is not head_fp8
    assert AutoConfig.from_pretrained(str(dirs["ct"])).tie_word_embeddings is not head_fp8


@pytest.mark.parametrize("label", ["some", "all"])
def test_compressed_tensors_export_is_the_evaluated_model(formats, bf16_loaded, label):
    """``infer --exported`` on the compressed-tensors export computes the fake-quant model bit for bit (bf16, CPU);
    and compressed-tensors' own arithmetic -- the steps transformers' ``CompressedTensorsHfQuantizer`` runs
    (``apply_quantization_config``, ``compress_model``, the stored tensors, ``decompress_model``), activations by
    ``x / input_scale``, weights ``code * weight_scale`` -- gives the fake-quant model's logits bit for bit in float32
    (float32 because the scales are float32: compressed-tensors' activation fake quant returns the scale's dtype)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from transformers import AutoConfig, AutoModelForImageTextToText

    from auto_quantize_model.export.checks import checkpoint_names

    run, dirs = formats[label]
    d = dirs["ct"]
    fq = build_quantized_model(bf16_loaded, run)
    ids = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    ex = load_exported_lm(d, device="cpu")
    with torch.no_grad():
        assert torch.equal(ex.model(ids), fq(ids))
        evaluated32 = fq.float()(ids)
    config = AutoConfig.from_pretrained(str(d))
    qc = QuantizationConfig.model_validate({k: v for k, v in _qc(d).items() if k in QuantizationConfig.model_fields})
    del config.quantization_config
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()
    apply_quantization_config(model, qc, show_progress=False)
    compressor = ModelCompressor(quantization_config=qc)
    compressor.compress_model(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    runtime = {v: k for k, v in checkpoint_names(model, sorted({n.rsplit(".", 1)[0] for n in params})).items()}
    stored = _tensors(d)
    for key, t in stored.items():
        module, leaf = key.rsplit(".", 1)
        p = params[f"{runtime[module]}.{leaf}"]
        p.data = t if t.dtype == torch.float8_e4m3fn else t.to(torch.float32)
    compressor.decompress_model(model)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.equal(logits, evaluated32)


@pytest.mark.parametrize("label", ["some", "all"])
def test_newer_transformers_from_pretrained_loads_the_compressed_tensors_export_as_evaluated(
        formats, bf16_loaded, label, tmp_path):
    """Plain ``from_pretrained`` in transformers 5.23.0 (the deployment side's, .venv/consumer; ModelOpt 0.47 caps the
    project's own at <5.15) with compressed-tensors 0.20.1: loaded in float32, the export's logits equal the evaluated
    (fake-quant) model's bit for bit, every scale loaded. In bf16 everything loads too, but compressed-tensors
    casts the float32 scales to bf16 and divides activations in bf16, so some activation codes move one FP8 step:
    close to the evaluated model, not equal (README "Export" gives the figures)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    consumer = Path(__file__).resolve().parents[1] / ".venv" / "consumer"
    assert (consumer / "transformers").is_dir(), "run scripts/bootstrap.sh: it installs .venv/consumer"
    run, dirs = formats[label]
    # The evaluated model, its bf16 weights computed in float32 (copies: .float() would change the shared fixture's
    # float32 rotary buffers on the way back to bf16).
    fq = copy.deepcopy(build_quantized_model(bf16_loaded, run)).float()
    ids = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        evaluated = fq(input_ids=ids)
        reference = copy.deepcopy(bf16_loaded.model).float()(input_ids=ids)
    torch.save({"ids": ids, "float32": evaluated.float()}, tmp_path / "expected.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(consumer), os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("consumer_load.py")), str(dirs["ct"]),
                           str(tmp_path / "expected.pt")], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["transformers"] == "5.23.0"
    f32, b16 = got["float32"], got["bfloat16"]
    assert f32["missing"] == [] and f32["unexpected"] == [] and f32["equal"], f32
    assert b16["missing"] == [] and b16["unexpected"] == [], b16
    quantization = F.kl_div(F.log_softmax(evaluated.float(), -1), F.log_softmax(reference.float(), -1),
                            log_target=True, reduction="none").sum(-1).mean().item()
    assert 0 < b16["kl_evaluated_vs_loaded"] < quantization, (b16, quantization)


def test_transformers_5_14_leaves_compressed_tensors_weight_scales_uninitialised(formats, tiny_model_dir, tmp_path):
    """What README "Export" and README_LOADING.md say: transformers 5.14.1's compressed-tensors loader leaves the
    ``weight_scale`` of every FP8 Linear of the decoder layers uninitialised (its MoE decompression converter claims
    those ``*.weight_scale`` keys; lm_head's loads), on this export and on a checkpoint written by llm-compressor's
    own save path (compressed-tensors' ``compress_model``,
    ``save_pretrained``, ``update_config``). If this fails, transformers changed: re-check those texts."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from transformers import AutoModelForImageTextToText

    _, dirs = formats["all"]
    fp8_args = {"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False}
    reference = AutoModelForImageTextToText.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16)
    qc = QuantizationConfig(config_groups={"g": QuantizationScheme(
        targets=["Linear"], weights=QuantizationArgs(**fp8_args), input_activations=QuantizationArgs(**fp8_args))},
        ignore=["lm_head", r"re:(model\.)?visual\."])
    apply_quantization_config(reference, qc, show_progress=False)
    for m in reference.modules():
        if hasattr(m, "weight_scale"):
            m.weight_scale.data.fill_(float(m.weight.abs().max()) / 448)
            m.input_scale.data.fill_(0.01)
    compressor = ModelCompressor.from_pretrained_model(reference)
    compressor.compress_model(reference)
    reference.save_pretrained(str(tmp_path / "llmc"))
    compressor.update_config(str(tmp_path / "llmc"))
    for d in (dirs["ct"], tmp_path / "llmc"):
        model, loading = AutoModelForImageTextToText.from_pretrained(str(d), dtype=torch.bfloat16,
                                                                     output_loading_info=True)
        fp8 = [n for n, m in model.named_modules() if getattr(m, "weight", None) is not None
               and m.weight.dtype == torch.float8_e4m3fn]
        assert fp8 and all(f"{n}.weight" not in loading["missing_keys"] for n in fp8)
        decoder = [n for n in fp8 if ".layers." in n]
        missing = sorted(k for k in loading["missing_keys"] if k.endswith(".weight_scale") and ".layers." in k)
        assert decoder and missing == sorted(f"{n}.weight_scale" for n in decoder), d


@pytest.mark.parametrize("label", ["some", "all"])
def test_modelopt_export_through_plain_from_pretrained_is_wrong_and_the_export_says_so(formats, bf16_loaded, label):
    """``from_pretrained`` on the ModelOpt-format export loads the FP8 codes without their scales: its logits are
    nowhere near the evaluated model's (KL over 100 times quantization's own). The file beside the weights and
    README "Export" warn."""
    from pathlib import Path

    from transformers import AutoModelForImageTextToText

    run, dirs = formats[label]
    fq = build_quantized_model(bf16_loaded, run)
    plain = AutoModelForImageTextToText.from_pretrained(str(dirs["modelopt"]), dtype=torch.bfloat16)
    ids = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        evaluated, wrong, bf16 = fq(ids).float(), plain(input_ids=ids).logits.float(), bf16_loaded.model(ids).float()

    def kl(p, q):  # per-token KL(p || q), the README's figures
        return F.kl_div(F.log_softmax(q, -1), F.log_softmax(p, -1), log_target=True, reduction="none").sum(-1).mean()

    assert kl(evaluated, wrong) > 100 * kl(bf16, evaluated) > 0, (kl(evaluated, wrong), kl(bf16, evaluated))
    note = (dirs["modelopt"] / "README_LOADING.md").read_text()
    assert "WARNING" in note and "does NOT apply this checkpoint's FP8 scales" in note
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "`from_pretrained` alone does not apply ModelOpt's FP8 scales" in readme
    assert "transformers 5.14.1" in (dirs["ct"] / "README_LOADING.md").read_text()


def _cache_amax(decoder, batches):
    """Per layer max |k| and |v| of what a plain DynamicCache holds after each batch."""
    from transformers import DynamicCache

    k_amax = v_amax = None
    for batch in batches:
        cache = DynamicCache()
        decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], past_key_values=cache,
                use_cache=True)
        k = [float(layer.keys.abs().amax().float()) for layer in cache.layers]
        v = [float(layer.values.abs().amax().float()) for layer in cache.layers]
        k_amax = k if k_amax is None else [max(a, b) for a, b in zip(k_amax, k)]
        v_amax = v if v_amax is None else [max(a, b) for a, b in zip(v_amax, v)]
    return k_amax, v_amax


def test_kv_cache_scales_are_calibrated_on_the_runs_data(formats, bf16_loaded, calib):
    """``--kv-cache fp8``: per layer amax / 448 of the cached keys (after RoPE) and values of the evaluated model on
    the run's own calibration batches, stored under each format's names, declared in each format's config; the
    search never scored it, and the record says so. ``infer --exported`` keeps the KV cache BF16."""
    run, dirs = formats["all"]
    fq = build_quantized_model(bf16_loaded, run)
    with torch.no_grad():
        k_amax, v_amax = _cache_amax(fq.model, calib.batches)
    layers = len(k_amax)
    names = {"modelopt_kv": ("model.layers.{}.self_attn.k_proj.k_scale", "model.layers.{}.self_attn.v_proj.v_scale"),
             "ct_kv": ("model.layers.{}.self_attn.k_scale", "model.layers.{}.self_attn.v_scale")}
    for variant, (k_name, v_name) in names.items():
        d = dirs[variant]
        info = json.loads((d / "autoquant_export.json").read_text())["kv_cache"]
        assert info["calibrated"] and info["token_hash"] == run.manifest["calibration"]["token_hash"]
        assert info["batches"] == len(calib.batches) and info["scored"] is False
        assert info["k_amax"] == k_amax and info["v_amax"] == v_amax
        t = _tensors(d)
        for i in range(layers):
            for name, amax in ((k_name, k_amax), (v_name, v_amax)):
                want = torch.tensor(amax[i], dtype=torch.float32) / 448
                assert torch.equal(t[name.format(i)].float().reshape(()), want), (variant, i)
        assert len([k for k in t if k.endswith(("k_scale", "v_scale"))]) == 2 * layers
        ids = torch.randint(0, 500, (1, 24), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert torch.equal(load_exported_lm(d, device="cpu").model(ids), fq(ids))
    hf = json.loads((dirs["modelopt_kv"] / "hf_quant_config.json").read_text())
    assert hf["quantization"]["kv_cache_quant_algo"] == "FP8"
    assert _qc(dirs["modelopt_kv"])["kv_cache_scheme"] == {"dynamic": False, "num_bits": 8, "type": "float"}
    assert _qc(dirs["ct_kv"])["kv_cache_scheme"]["type"] == "float"
    assert json.loads((dirs["modelopt"] / "hf_quant_config.json").read_text())["quantization"][
        "kv_cache_quant_algo"] is None
    assert "SGLang 0.5.23 cannot load" in (dirs["modelopt_kv"] / "README_LOADING.md").read_text()
    note = " ".join((dirs["ct_kv"] / "README_LOADING.md").read_text().split())
    assert "calibrated on the run's own calibration data" in note and "do not include KV-cache quantization" in note


def _copy_run(run, tmp_path, edit):
    dst = tmp_path / "run"
    shutil.copytree(run.run_dir, dst)
    manifest = next(dst.glob("*_quant_manifest.json"))
    m = json.loads(manifest.read_text())
    edit(m["calibration"])
    manifest.write_text(json.dumps(m))
    return dst


def test_kv_cache_refusals_and_fallback(formats, tiny_model_dir, tmp_path, capsys):
    """Calibration data that no longer tokenizes to the run's hash, or is gone, is refused in one line with
    nothing written; a run calibrated on image-caption pairs gets scale 1.0 (engines' default), said so."""
    run, _ = formats["some"]

    def other_hash(cal):
        cal["token_hash"] = "0" * 64

    def gone(cal):
        cal["source_path"] = str(tmp_path / "gone.txt")

    for edit, message in ((other_hash, "token hash differs"), (gone, "is not a file here")):
        src = _copy_run(run, tmp_path / edit.__name__, edit)
        out = tmp_path / f"out_{edit.__name__}"
        assert main(["export", str(src), "--model-dir", str(tiny_model_dir), "--output-dir", str(out),
                     "--kv-cache", "fp8", "--format", CT]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(".out")]

    def image(cal):
        cal["kind"] = "image_caption"

    src = _copy_run(run, tmp_path / "image", image)
    info = export_run(src, tiny_model_dir, tmp_path / "out_image", kv_cache="fp8", format=CT).info["kv_cache"]
    assert info["calibrated"] is False and "image_caption" in info["reason"]
    assert set(info["k_scale"]) == {1.0} and set(info["v_scale"]) == {1.0}
    assert "of 1.0 (not calibrated" in (tmp_path / "out_image" / "README_LOADING.md").read_text()


def test_export_cli_format_and_kv_flags(formats, tiny_model_dir, tmp_path, capsys):
    run, _ = formats["some"]
    out = tmp_path / "cli"
    assert main(["export", str(run.run_dir), "--model-dir", str(tiny_model_dir), "--output-dir", str(out),
                 "--format", CT]) == 0
    text = capsys.readouterr().out
    assert "compressed-tensors format" in text and "BF16 KV cache" in text and "README_LOADING.md" in text
    for flag, value in (("--format", "gguf"), ("--kv-cache", "int8")):
        with pytest.raises(SystemExit) as exc:  # argparse's one-line choice error
            main(["export", str(run.run_dir), "--model-dir", str(tiny_model_dir), "--output-dir",
                  str(tmp_path / "bad"), flag, value])
        assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(UserError, match="export setting format must be one of"):
        export_run(run.run_dir, tiny_model_dir, tmp_path / "bad", format="gguf")
    assert not (tmp_path / "bad").exists()
