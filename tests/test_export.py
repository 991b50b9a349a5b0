"""Export to a ModelOpt HF FP8 checkpoint and real-FP8 execution of it (CPU: dequantize fallback)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from auto_quantize_model.autoquant.rebuild import build_quantized_model, find_run
from auto_quantize_model.autoquant.run import run_scheme
from auto_quantize_model.cli import main
from auto_quantize_model.configs import get_scheme, resolve_scheme
from auto_quantize_model.errors import UserError
from auto_quantize_model.inference.fp8_linear import Fp8Linear, load_exported_lm
from auto_quantize_model.inference.measure import MeasureSettings, measure_model
from auto_quantize_model.io_utils import current_umask
from auto_quantize_model.models.loading import load_language_model


@pytest.fixture(scope="module")
def exports(bf16_loaded, calib, tiny_model_dir, tmp_path_factory):
    """Runs at 12 bits (lm_head BF16, tied) and 8 bits (every layer FP8, lm_head too), each exported. The runs are
    made in bf16 on CPU, the export's dtype, so the evaluated model and the export compare bit for bit."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    # The default FP8 schemes keep lm_head out of the search; the all-layers scheme makes it FP8 too.
    for label, bits, base_name in (("some", 12.0, "fp8_autoquant_top50"), ("all", 8.0, "fp8_autoquant_all_layers_fp8")):
        scheme = dataclasses.replace(resolve_scheme(get_scheme(base_name)), name=f"fp8_{label}", effective_bits=bits)
        run_scheme(bf16_loaded, calib, scheme, root / label, cache_dir=root / "cache")
        assert main(["export", str(root / label), "--model-dir", str(tiny_model_dir), "--output-dir",
                     str(root / f"export_{label}")]) == 0
        out[label] = (find_run(root / label), root / f"export_{label}")
    return out


@pytest.fixture(scope="module")
def bf16_loaded(tiny_model_dir):
    return load_language_model(tiny_model_dir, device="cpu", dtype="bfloat16")


def _tensors(export_dir):
    from safetensors.torch import load_file

    return load_file(str(export_dir / "model.safetensors"))


@pytest.mark.parametrize("label", ["some", "all"])
def test_export_layer_dtypes_match_manifest(exports, label):
    run, d = exports[label]
    t = _tensors(d)
    for name, layer in run.manifest["layers"].items():
        key = f"{name}.weight"
        if name == "lm_head" and layer["dtype"] != "fp8":
            assert key not in t  # tied: stored once, as the embedding
            continue
        assert (t[key].dtype == torch.float8_e4m3fn) == (layer["dtype"] == "fp8"), name
        assert (f"{name}.input_scale" in t) == (layer["dtype"] == "fp8"), name
    vision = [k for k in t if k.startswith("visual.")]
    assert vision and all(t[k].dtype == torch.bfloat16 for k in vision)
    hf = json.loads((d / "hf_quant_config.json").read_text())["quantization"]
    assert hf["quant_algo"] == "FP8" and "visual*" in hf["exclude_modules"]
    cfg = json.loads((d / "config.json").read_text())
    assert "visual*" in cfg["quantization_config"]["ignore"]
    # An FP8 lm_head cannot share the BF16 embedding: untied in config; a BF16 one stays tied.
    assert cfg["tie_word_embeddings"] is (run.manifest["layers"]["lm_head"]["dtype"] != "fp8")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
              "autoquant_export.json"):
        assert (d / f).is_file(), f
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~current_umask() for p in d.iterdir())  # as every result
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".export_")]  # no temp dir left


def test_exported_checkpoint_loads_in_transformers(exports):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(exports["some"][1]))
    assert cfg.quantization_config["quant_method"] == "modelopt"


def test_fp8_linear_matches_modelopt_fake_quant_bit_exactly(exports, bf16_loaded):
    """Given the same FP8 weight, the CPU path computes exactly ModelOpt's fake-quant linear."""
    run, d = exports["all"]
    fq = build_quantized_model(bf16_loaded, run)
    t = _tensors(d)
    name = "model.layers.0.mlp.gate_proj"
    q = fq.get_submodule(name)
    layer = Fp8Linear(t[f"{name}.weight"], t[f"{name}.weight_scale"], t[f"{name}.input_scale"], None, torch.bfloat16)
    x = torch.randn(3, 7, q.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    w = (t[f"{name}.weight"].float() * t[f"{name}.weight_scale"]).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(q.input_quantizer(x), w))


@pytest.mark.parametrize("label", ["some", "all"])
def test_exported_fp8_tensors_are_the_fake_quant_ones(exports, bf16_loaded, label):
    """For every FP8 layer: the exported weight times its weight_scale, cast to bf16, is the fake-quant weight of
    the run bit for bit, and 1 / input_scale (what engines quantize activations with) is fake quant's activation
    scale 448 / amax exactly (exact-reciprocal scales, autoquant/serving.py)."""
    run, d = exports[label]
    fq = build_quantized_model(bf16_loaded, run)
    t = _tensors(d)
    fp8 = [n for n, lay in run.manifest["layers"].items() if lay["dtype"] == "fp8"]
    assert fp8
    with torch.no_grad():
        for name in fp8:
            q = fq.get_submodule(name)
            dequant = (t[f"{name}.weight"].float() * t[f"{name}.weight_scale"]).to(torch.bfloat16)
            assert torch.equal(dequant, q.weight_quantizer(q.weight)), name
            assert torch.equal(1 / t[f"{name}.input_scale"], 448.0 / q.input_quantizer.amax.float()), name


@pytest.mark.parametrize("label", ["some", "all"])
def test_exported_logits_equal_the_fake_quant_model(exports, bf16_loaded, calib, label):
    """``infer --exported``'s model (dequantize path on CPU) computes the run's fake-quant model bit for bit, on
    random ids and on padded caption batches."""
    run, d = exports[label]
    ex = load_exported_lm(d, device="cpu")
    assert len(ex.fp8_layers) == run.manifest["num_quantized_layers"]
    assert all(isinstance(ex.model.get_submodule(n), Fp8Linear) for n in ex.fp8_layers)
    fq = build_quantized_model(bf16_loaded, run)
    ids = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ex.model(ids), fq(ids))
        for batch in calib.batches[:2]:
            assert torch.equal(bf16_loaded.forward_step(ex.model, batch), bf16_loaded.forward_step(fq, batch))
        assert not torch.equal(fq(ids), bf16_loaded.model(ids))  # and the quantization is not a no-op


def test_fp8_weights_stay_fp8_and_memory_shrinks(exports, bf16_loaded):
    from auto_quantize_model.inference.fp8_linear import weight_bytes

    ex = load_exported_lm(exports["all"][1], device="cpu")
    assert ex.model.get_submodule("model.layers.0.mlp.up_proj").weight.dtype == torch.float8_e4m3fn
    assert weight_bytes(ex.model) < 0.75 * weight_bytes(bf16_loaded.model)


def test_cli_infer_exported(exports, capsys):
    assert main(["infer", "--exported", str(exports["some"][1]), "--prompt", "Describe the image.",
                 "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert "[exported:fp8_some] Describe the image." in capsys.readouterr().out


def test_measure_refuses_cpu(bf16_loaded):
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        measure_model(bf16_loaded.model, 640, MeasureSettings())


def test_export_bad_input(exports, tiny_model_dir, tmp_path, capsys):
    run, d = exports["some"]
    manifest_file = next(run.run_dir.glob("*_quant_manifest.json"))
    bad_run = tmp_path / "int8run"
    bad_run.mkdir()
    m = json.loads(manifest_file.read_text())
    next(iter(m["layers"].values()))["format"] = "INT8_SMOOTHQUANT_CFG"
    (bad_run / manifest_file.name).write_text(json.dumps(m))
    (bad_run / m["artifacts"]["restore"]).write_bytes((run.run_dir / m["artifacts"]["restore"]).read_bytes())
    cases = [
        (["export", "/nonexistent/run", "--model-dir", str(tiny_model_dir), "--output-dir", str(tmp_path / "o1")], "does not exist"),
        (["export", str(run.run_dir), "--model-dir", str(tiny_model_dir), "--output-dir", str(d)], "not empty"),
        (["export", str(bad_run), "--model-dir", str(tiny_model_dir), "--output-dir", str(tmp_path / "o2")], "INT8_SMOOTHQUANT_CFG"),
        (["infer", "--exported", str(tiny_model_dir), "--prompt", "x", "--device", "cpu"], "not an FP8 export"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_compare_measure_refused_on_cpu(exports, tiny_model_dir, tmp_path, capsys):
    run, _ = exports["some"]
    assert main(["compare", str(run.run_dir), "--model-dir", str(tiny_model_dir), "--eval-captions", "demo",
                 "--measure", "--device", "cpu", "--output-dir", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA GPU" in err[0]
    assert not (tmp_path / "cmp" / "comparison.json").exists()


def test_pareto_throughput_plot_only_with_measured_column(tmp_path):
    import pandas as pd

    from auto_quantize_model.analysis.plots import plot_pareto_throughput

    trials = pd.DataFrame({"scheme": ["a", "a", "b"], "kl_mean": [0.01, 0.002, 0.005]})
    assert plot_pareto_throughput(trials, tmp_path) is None
    trials["prefill_tokens_per_s"] = [1.3e5, 0.9e5, 1.1e5]
    assert plot_pareto_throughput(trials, tmp_path).is_file()
