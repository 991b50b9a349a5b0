"""Pure-PyTorch inference on rebuilt quantized models and the cross-scheme comparison."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from auto_quantize_model.autoquant.rebuild import build_quantized_model, find_run
from auto_quantize_model.autoquant.run import run_scheme
from auto_quantize_model.cli import main
from auto_quantize_model.configs import get_scheme, resolve_scheme
from auto_quantize_model.datasets.captions import read_captions
from auto_quantize_model.errors import UserError
from auto_quantize_model.inference.compare import EvalSettings, compare_runs, held_out_source
from auto_quantize_model.inference.generate import encode_prompts, first_divergence, greedy_generate


@pytest.fixture(scope="module")
def runs(loaded, calib, tmp_path_factory):
    """Runs at 16 bits (no FP8 layer), 12 bits (some) and 8 bits (all), sharing one score pass."""
    root = tmp_path_factory.mktemp("inference")
    base = resolve_scheme(get_scheme("fp8_autoquant_top50"))
    out = {}
    for label, bits in (("none", 16.0), ("some", 12.0), ("all", 8.0)):
        scheme = dataclasses.replace(base, name=f"fp8_{label}", effective_bits=bits)
        run_scheme(loaded, calib, scheme, root / label, cache_dir=root / "cache")
        out[label] = find_run(root / label)
    return out


def test_zero_fp8_run_reproduces_bf16_logits_exactly(runs, loaded, calib):
    assert runs["none"].manifest["num_quantized_layers"] == 0
    model = build_quantized_model(loaded, runs["none"])
    with torch.no_grad():
        for batch in calib.batches[:2]:
            assert torch.equal(loaded.forward_step(model, batch), loaded.forward_step(loaded.model, batch))


@pytest.mark.slow
def test_more_fp8_layers_more_kl(runs, loaded):
    source = read_captions("demo")
    comp = compare_runs(loaded, [runs["none"], runs["some"], runs["all"]], source,
                        EvalSettings(max_samples=32, batch_size=8, seq_len=48, max_new_tokens=6))
    by = {r["name"]: r for r in comp["runs"]}
    none, some, all_ = (by[f"fp8_{k}"]["metrics"] for k in ("none", "some", "all"))
    assert none["kl_mean"] == 0.0 and none["top1_agreement"] == 1.0
    assert none["perplexity"] == pytest.approx(comp["reference"]["metrics"]["perplexity"])
    assert 0 < some["kl_mean"] < all_["kl_mean"]
    assert all_["kl_max"] >= all_["kl_mean"]
    # Per-layer error exists exactly for the FP8 layers, and is a small positive relative error.
    fp8_layers = {n for n, lay in runs["all"].manifest["layers"].items() if lay["dtype"] == "fp8"}
    errs = by["fp8_all"]["layer_errors"]
    assert set(errs) == fp8_layers and all(0 < e < 0.5 for e in errs.values())
    assert by["fp8_none"]["layer_errors"] == {}
    rho = by["fp8_all"]["error_vs_sensitivity"]["spearman"]
    assert rho is None or -1.0 <= rho <= 1.0
    # At 8 bits the default FP8 scheme quantizes every searched layer, as the uniform FP8 control does: on the
    # common basis (every LM Linear counted) both have the same bits, though the run's budget-basis figure says 8.
    ctl = comp["control"]
    assert by["fp8_all"]["num_quantized_layers"] == ctl["num_quantized_layers"]
    assert by["fp8_all"]["metrics"]["kl_mean"] == pytest.approx(ctl["metrics"]["kl_mean"], rel=0.05)
    assert by["fp8_all"]["effective_bits_all_layers"] == pytest.approx(ctl["effective_bits"])
    assert by["fp8_all"]["effective_bits_achieved"] == pytest.approx(8.0) and 8.0 < ctl["effective_bits"]
    assert by["fp8_all"]["error_vs_sensitivity"]["num_groups"] == 16  # lm_head stays BF16 (FP8_DEFAULT_CFG excludes it)
    # Evaluation never scores on calibration captions.
    cal = set(runs["all"].manifest["calibration"]["caption_hashes"])
    assert comp["evaluation"]["dropped_calibration_captions"] == len(cal)
    assert len(comp["runs"][0]["generations"]) == len(comp["prompts"])


def test_eval_set_entirely_calibration_is_refused(runs, tmp_path):
    from auto_quantize_model.datasets.calibration import caption_hash
    from auto_quantize_model.datasets.captions import CaptionSource

    man = runs["some"].manifest
    cal = read_captions("demo")
    hashes = set(man["calibration"]["caption_hashes"])
    chosen = [c for c in cal.captions if caption_hash(c) in hashes]
    src = CaptionSource("x", "text", "h", chosen)
    with pytest.raises(UserError, match="calibration"):
        held_out_source(src, [man])


@pytest.mark.slow
def test_generation_is_deterministic_and_batch_independent(runs, loaded):
    model = build_quantized_model(loaded, runs["all"])
    tok = loaded.tokenizer
    prompts = encode_prompts(tok, ["Describe the image.", "Write a caption for this photo of a big red bus."])
    kw = {"max_new_tokens": 10, "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    a = greedy_generate(model, prompts, **kw)
    b = greedy_generate(model, prompts, **kw)
    assert a == b and all(len(x) > 0 for x in a)
    # Left padding must not change a row's output.
    assert greedy_generate(model, prompts[:1], **kw) == a[:1]
    assert greedy_generate(model, prompts[1:], **kw) == a[1:]
    # The cached decode equals a full recompute of the argmax chain.
    ids = torch.tensor([prompts[0]])
    for tok_id in a[0][:4]:
        with torch.no_grad():
            nxt = model(ids, torch.ones_like(ids))[0, -1].argmax().item()
        assert nxt == tok_id
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2


def test_mismatched_checkpoint_refused(runs, tmp_path, tiny_model_dir):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from auto_quantize_model.models.loading import load_language_model, load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    other = load_language_model(tmp_path / "other", device="cpu")
    with pytest.raises(UserError, match="pass the checkpoint the run used"):
        build_quantized_model(other, runs["some"])


@pytest.mark.slow
def test_cli_infer_and_compare(runs, tiny_model_dir, tmp_path, capsys):
    run_dir = str(runs["some"].run_dir)
    args = ["--model-dir", str(tiny_model_dir), "--prompt", "Describe the image.", "--max-new-tokens", "5",
            "--device", "cpu"]
    assert main(["infer", "--run-dir", run_dir, *args]) == 0
    q = capsys.readouterr().out
    assert main(["infer", "--bf16", *args]) == 0
    assert "[bf16] Describe the image." in capsys.readouterr().out and "[fp8_some]" in q
    out = tmp_path / "cmp"
    assert main(["compare", run_dir, str(runs["all"].run_dir), "--model-dir", str(tiny_model_dir), "--eval-captions",
                 "demo", "--output-dir", str(out), "--max-eval-samples", "16", "--seq-len", "32",
                 "--max-new-tokens", "4", "--device", "cpu"]) == 0
    comp = json.loads((out / "comparison.json").read_text())
    assert [r["name"] for r in comp["runs"]] == ["fp8_some", "fp8_all"]
    md = (out / "comparison.md").read_text()
    # On CPU the reference is float32 and says so; the uniform FP8 control sits beside it.
    assert "| float32 reference |" in md and "## Greedy generations" in md and "Spearman" in md
    assert "| uniform FP8 PTQ (control) |" in md and comp["control"]["unquantized_layers"] == ["lm_head"]


@pytest.mark.parametrize("argv", [
    ["infer", "--run-dir", "/nonexistent/run", "--model-dir", "MODEL", "--prompt", "x"],
    ["infer", "--bf16", "--model-dir", "/nonexistent/model", "--prompt", "x"],
    ["infer", "--bf16", "--model-dir", "MODEL"],
    ["compare", "/nonexistent/run", "--model-dir", "MODEL", "--eval-captions", "demo"],
    ["compare", "RUN", "--model-dir", "MODEL", "--eval-captions", "/nonexistent/caps.txt"],
])
def test_inference_bad_paths(argv, runs, tiny_model_dir, tmp_path, capsys):
    argv = [str(tiny_model_dir) if a == "MODEL" else str(runs["some"].run_dir) if a == "RUN" else a for a in argv]
    if argv[0] == "compare":
        argv += ["--output-dir", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("autoquant: error: ")
    assert not (tmp_path / "o" / "comparison.json").exists()
