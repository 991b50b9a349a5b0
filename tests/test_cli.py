"""The autoquant CLI: a real run, report-only, and every bad input (one line, exit 2, nothing written)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from auto_quantize_model.cli import main

REPO = Path(__file__).resolve().parent.parent


def _run_args(model_dir, out, *extra):
    return ["run", "--scheme-name", "fp8_autoquant_top50", "--model-dir", str(model_dir), "--output-dir", str(out),
            "--captions-path", "demo", "--max-calib-samples", "8", "--batch-size", "4", "--calib-seq-len", "32",
            "--device", "cpu", *extra]


@pytest.mark.slow
def test_run_then_report_only(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_run_args(tiny_model_dir, out, "--num-score-steps", "2", "--num-calib-steps", "2")) == 0
    manifest = out / "fp8_autoquant_top50_quant_manifest.json"
    report = out / "layer-sensitivity-report.md"
    m = json.loads(manifest.read_text())
    assert m["scheme"]["num_score_steps"] == 2 and m["calibration"]["num_samples"] == 8
    assert "manifest:" in capsys.readouterr().out
    report.unlink()
    assert main(["run", "--scheme-name", "fp8_autoquant_top50", "--output-dir", str(out), "--report-only"]) == 0
    assert "## Groups by sensitivity" in report.read_text()
    assert main(["report", str(out), "--output", str(tmp_path / "r.md")]) == 0
    assert (tmp_path / "r.md").read_text() == report.read_text()


def _bad(tmp_path, tiny_model_dir, case):
    """Arguments for one bad-input case."""
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    afile = tmp_path / "afile"
    afile.write_text("x")
    notckpt = tmp_path / "notckpt"
    notckpt.mkdir()
    badcfg = tmp_path / "badcfg"
    badcfg.mkdir()
    (badcfg / "config.json").write_text("{not json")
    out = tmp_path / "out"
    base = _run_args(tiny_model_dir, out)
    cases = {
        "missing model dir": _run_args(tmp_path / "nope", out),
        "model dir is a file": _run_args(afile, out),
        "not a checkpoint": _run_args(notckpt, out),
        "unreadable config": _run_args(badcfg, out),
        "missing captions": [*base, "--captions-path", str(tmp_path / "nope.txt")],
        "captions is a directory": [*base, "--captions-path", str(tmp_path)],
        "empty captions": [*base, "--captions-path", str(empty)],
        "unknown scheme": [a if a != "fp8_autoquant_top50" else "fp8_nope" for a in base],
        "unknown quant config": [*base, "--quant-config", "FP9_CFG"],
        "bits too low": [*base, "--effective-bits", "7"],
        "bits too high": [*base, "--effective-bits", "17"],
        "zero batch size": [*base, "--batch-size", "0"],
        "zero samples": [*base, "--max-calib-samples", "0"],
        "negative seq len": [*base, "--calib-seq-len", "-4"],
        "zero score steps": [*base, "--num-score-steps", "0"],
        "output dir is a file": _run_args(tiny_model_dir, afile),
        "report-only missing manifest": ["run", "--scheme-name", "fp8_autoquant_top50", "--output-dir", str(out),
                                         "--report-only"],
        "missing schemes file": [*base, "--schemes-file", str(tmp_path / "none.toml")],
    }
    return cases[case], out


BAD_CASES = [
    "missing model dir", "model dir is a file", "not a checkpoint", "unreadable config", "missing captions",
    "captions is a directory", "empty captions", "unknown scheme", "unknown quant config", "bits too low",
    "bits too high", "zero batch size", "zero samples", "negative seq len", "zero score steps",
    "output dir is a file", "report-only missing manifest", "missing schemes file",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_exit_2_nothing_written(tiny_model_dir, tmp_path, capsys, case):
    args, out = _bad(tmp_path, tiny_model_dir, case)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("autoquant: error: "), err
    assert "Traceback" not in err[0]
    assert not (out.exists() and any(out.glob("*_quant_manifest.json")))
    assert not (out.exists() and any(out.glob("*.md")))


def test_report_only_on_corrupt_manifest(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "fp8_autoquant_top50_quant_manifest.json").write_text('{"schema_version": 1, "layers": {}}')
    assert main(["run", "--scheme-name", "fp8_autoquant_top50", "--output-dir", str(out), "--report-only"]) == 2
    assert "corrupt" in capsys.readouterr().err
    (out / "fp8_autoquant_top50_quant_manifest.json").write_text("{truncated")
    assert main(["report", str(out / "fp8_autoquant_top50_quant_manifest.json")]) == 2
    assert not (out / "layer-sensitivity-report.md").exists()


@pytest.mark.slow
def test_console_script_and_seed_script_fail_cleanly(tmp_path):
    """The real entry points: no traceback, exit 2, one line."""
    for cmd in (
        [sys.executable, "-m", "auto_quantize_model.cli", "run", "--scheme-name", "x", "--model-dir", str(tmp_path / "m"),
         "--output-dir", str(tmp_path / "o")],
        [sys.executable, str(REPO / "scripts/qwen/qwen2_5_vl_3b_autoquant_fp8_schemes.py"), "--scheme-name",
         "fp8_autoquant_top25", "--model-dir", str(tmp_path / "m"), "--output-dir", str(tmp_path / "o")],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().count("\n") == 0 and "error:" in proc.stderr


@pytest.mark.slow
def test_seed_script_runs_a_scheme(tiny_model_dir, tmp_path):
    out = tmp_path / "seed"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts/qwen/qwen2_5_vl_3b_autoquant_fp8_schemes.py"), "--scheme-name",
         "fp8_autoquant_top25", "--model-dir", str(tiny_model_dir), "--output-dir", str(out), "--captions-path", "demo",
         "--max-calib-samples", "8", "--device", "cpu", "--seed", "1", "--num-score-steps", "2", "--num-calib-steps", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((out / "fp8_autoquant_top25_quant_manifest.json").read_text())
    assert m["calibration"]["seed"] == 1 and m["scheme"]["name"] == "fp8_autoquant_top25"


@pytest.mark.slow
def test_schemes_and_make_tiny_model(tmp_path, capsys):
    assert main(["schemes"]) == 0
    listing = capsys.readouterr().out
    for name in ("fp8_autoquant_top25", "fp8_autoquant_top50", "fp8_autoquant_full", "fp8_autoquant_all_layers_fp8"):
        assert name in listing
    assert main(["schemes", "--quant-configs"]) == 0
    listing = capsys.readouterr().out
    assert "FP8_ALL_LAYERS_CFG  (custom)" in listing and "NVFP4_DEFAULT_CFG" in listing
    assert main(["make-tiny-model", "--output-dir", str(tmp_path / "t")]) == 0
    assert (tmp_path / "t" / "config.json").is_file()
