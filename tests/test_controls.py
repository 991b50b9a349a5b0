"""Issue 10 part B: uniform-FP8 control, honest reference labels, chosen-format scores, chat-template
calibration, calibration usage in the manifest, and the seed-variance check in `analyze`."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from auto_quantize_model.analysis import load_layers, load_trials
from auto_quantize_model.analysis.report import analyze
from auto_quantize_model.analysis.summaries import seed_variance
from auto_quantize_model.autoquant.rebuild import build_quantized_model, find_run
from auto_quantize_model.autoquant.report import render_report
from auto_quantize_model.autoquant.run import run_scheme, score_cache_key
from auto_quantize_model.configs import get_scheme, resolve_scheme
from auto_quantize_model.datasets.calibration import build_calibration_set
from auto_quantize_model.datasets.captions import read_captions
from auto_quantize_model.inference.compare import EvalSettings, compare_runs, render_comparison
from auto_quantize_model.inference.metrics import error_vs_sensitivity, layer_output_errors


@pytest.fixture(scope="module")
def run12(loaded, calib, tmp_path_factory):
    """One FP8 AutoQuant run at 12 effective bits on the tiny random-weight model."""
    root = tmp_path_factory.mktemp("controls")
    scheme = dataclasses.replace(resolve_scheme(get_scheme("fp8_autoquant_top50"), effective_bits=12.0), name="fp8_12")
    run_scheme(loaded, calib, scheme, root / "r12", cache_dir=root / "cache")
    return find_run(root / "r12")


@pytest.fixture(scope="module")
def comparison(loaded, run12):
    return compare_runs(loaded, [run12], read_captions("demo"),
                        EvalSettings(max_samples=16, batch_size=8, seq_len=48, max_new_tokens=4))


def test_compare_has_uniform_fp8_control_with_lm_head_unquantized(comparison, loaded, run12):
    ctl = comparison["control"]
    assert ctl["quant_format"] == "FP8_DEFAULT_CFG"
    # FP8_DEFAULT_CFG's own *lm_head* exclusion keeps lm_head out; every decoder Linear is FP8.
    assert ctl["unquantized_layers"] == ["lm_head"]
    assert ctl["num_quantized_layers"] == ctl["num_layers"] - 1 == 28
    assert "lm_head" not in ctl["layer_errors"] and len(ctl["layer_errors"]) == 28
    assert 8.0 < ctl["effective_bits"] < 16.0
    assert ctl["metrics"]["kl_mean"] > 0 and ctl["metrics"]["top1_agreement"] <= 1.0
    # Calibrated on the run's own calibration batches (same token hash, the scheme's step count).
    assert ctl["calibration_hash"] == run12.manifest["calibration"]["token_hash"]
    assert ctl["num_calib_steps"] == run12.manifest["scheme"]["num_calib_steps"]
    md = render_comparison(comparison, loaded.tokenizer)
    assert "| uniform FP8 PTQ (control) | FP8_DEFAULT_CFG |" in md
    assert "| uniform FP8 PTQ |" in md  # its generations sit beside the runs'


def test_float32_reference_is_labelled_float32_on_cpu(comparison, loaded, run12):
    assert loaded.dtype.is_floating_point and str(loaded.dtype) == "torch.float32"
    assert run12.manifest["model"]["reference_label"] == "float32"
    md = render_comparison(comparison, loaded.tokenizer)
    assert "| float32 reference |" in md and "BF16" not in md
    report = render_report(run12.manifest)
    assert "unquantized (float32)" in report and "or BF16" not in report


def test_error_vs_sensitivity_pairs_each_group_with_its_chosen_format_score(loaded, run12, calib):
    """With two quantized candidates, the paired score is the chosen one's, not the larger one's."""
    model = build_quantized_model(loaded, run12)
    errors = layer_output_errors(model, calib.batches[:2], forward=loaded.forward_step)
    m = copy.deepcopy(run12.manifest)
    fp8_scores = {}
    for group, info in m["layer_sensitivity"].items():
        # A more aggressive (hypothetical) candidate first, scored higher, as ModelOpt orders them.
        fp8 = info["scores"][0]
        info["candidate_formats"] = ["MORE_AGGRESSIVE", *info["candidate_formats"]]
        info["scores"] = [10.0 * fp8 + 1.0, *info["scores"]]
        info["costs"] = [info["costs"][0] / 2, *info["costs"]]
        fp8_scores[group] = fp8
    res = error_vs_sensitivity(m, errors)
    assert res["num_groups"] == sum(1 for i in m["layer_sensitivity"].values() if i["chosen_format"] == "FP8_DEFAULT_CFG")
    assert res["num_groups"] >= 3
    for row in res["groups"]:
        assert row["chosen_format"] == "FP8_DEFAULT_CFG"
        assert row["score"] == fp8_scores[row["group"]]


@pytest.mark.slow
def test_chat_template_changes_tokens_and_is_recorded(loaded, calib, tmp_path):
    source = read_captions("demo")
    raw = build_calibration_set(loaded.tokenizer, source, max_samples=24, batch_size=4, seq_len=48, seed=0)
    chat = build_calibration_set(loaded.tokenizer, source, max_samples=24, batch_size=4, seq_len=96, seed=0,
                                 chat_template=True)
    assert raw.token_hash == calib.token_hash and raw.describe()["chat_template"] is None
    assert chat.token_hash != raw.token_hash and chat.num_tokens > raw.num_tokens
    info = chat.describe()["chat_template"]
    assert info["role"] == "assistant" and info["user_prompt"] and len(info["template_hash"]) == 16
    scheme = resolve_scheme(get_scheme("fp8_autoquant_top50"), effective_bits=12.0, num_calib_steps=2,
                            num_score_steps=3)
    assert score_cache_key(loaded, chat, scheme) != score_cache_key(loaded, raw, scheme)
    res = run_scheme(loaded, chat, scheme, tmp_path / "chat", write=False)
    cal = res.manifest["calibration"]
    assert cal["chat_template"] == info
    # Samples, tokens and steps ModelOpt really read: the first 2 batches to calibrate, 3 to score.
    first = lambda n: sum(int(b["attention_mask"].sum()) for b in chat.batches[:n])  # noqa: E731
    assert cal["usage"] == {"calibrate": {"steps": 2, "samples": 8, "tokens": first(2)},
                            "score": {"steps": 3, "samples": 12, "tokens": first(3)}}
    report = render_report(res.manifest)
    assert "chat template" in report and "scored on 12 samples" in report


@pytest.mark.slow
def test_seed_variance_table_when_seeds_repeat(loaded, tmp_path):
    source = read_captions("demo")
    scheme = resolve_scheme(get_scheme("fp8_autoquant_top50"), effective_bits=12.0, num_calib_steps=2,
                            num_score_steps=2)
    for seed in (0, 1):
        data = build_calibration_set(loaded.tokenizer, source, max_samples=8, batch_size=4, seq_len=32, seed=seed)
        run_scheme(loaded, data, scheme, tmp_path / f"seed{seed}", cache_dir=tmp_path / "cache")
    ana = analyze([str(tmp_path / "seed0"), str(tmp_path / "seed1")], tmp_path / "ana")
    table = seed_variance(load_layers(tmp_path / "ana" / "tables"), load_trials(tmp_path / "ana" / "tables"))
    assert len(table) == 1
    row = table.iloc[0]
    assert {row["seed_a"], row["seed_b"]} == {0, 1} and row["groups"] == 16  # lm_head is out of the search
    assert -1.0 <= row["spearman"] <= 1.0 and 0.0 <= row["top_k_overlap"] <= 1.0 and row["median_cv"] > 0
    text = ana["report"].read_text()
    assert "## Seed variance of sensitivity rankings" in text and "| setting | seed_a | seed_b |" in text
    # One seed only: the section says so instead of a table.
    one = analyze([str(tmp_path / "seed0")], tmp_path / "one")
    assert "No setting was scored with more than one calibration seed" in one["report"].read_text()


def test_calibration_defaults_follow_hf_ptq_and_sweep_takes_chat_template():
    from auto_quantize_model.cli import build_parser
    from auto_quantize_model.sweep.spec import load_sweep_spec

    spec = load_sweep_spec(None, {"name": "s", "model_dir": "m", "chat_template": True})
    assert (spec.max_calib_samples, spec.batch_size, spec.calib_seq_len) == (1024, 8, 512)
    assert spec.chat_template is True and spec.to_dict()["chat_template"] is True
    args = build_parser().parse_args(["run", "--scheme-name", "x", "--output-dir", "o", "--chat-template"])
    assert (args.max_calib_samples, args.batch_size, args.calib_seq_len, args.chat_template) == (1024, 8, 512, True)


def test_control_id_names_the_weights_and_the_served_scales(calib):
    """A resumed sweep reuses a control record only under the same id: other weights, or a control calibrated before
    fused scales were shared (schema 1), must not match (old code: the id hashed format, data and steps only)."""
    from auto_quantize_model.inference.controls import CONTROL_SCHEMA_VERSION, control_id

    assert control_id(calib, 4, "weights-a") != control_id(calib, 4, "weights-b")
    assert control_id(calib, 4, "weights-a") == control_id(calib, 4, "weights-a")
    assert CONTROL_SCHEMA_VERSION >= 2
