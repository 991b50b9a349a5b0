"""Format facts from a file keyed by the installed ModelOpt and our deriving code (issue 11: the sweep driver's
time before it reaches Ray was mostly ModelOpt's import). On the old code ``format_facts`` does not exist and the
driver's preflight imports ModelOpt."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from auto_quantize_model import format_facts as ff

CATALOG_FORMATS = ("FP8_DEFAULT_CFG", "FP8_ALL_LAYERS_CFG", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "INT8_DEFAULT_CFG",
                   "NVFP4_DEFAULT_CFG", "INT8_SMOOTHQUANT_CFG")


@pytest.fixture
def cache_file(tmp_path, monkeypatch):
    path = tmp_path / "facts.json"
    monkeypatch.setenv("AUTOQUANT_FORMAT_CACHE", str(path))
    ff._MEMO.clear()
    yield path
    ff._MEMO.clear()


def test_facts_read_back_from_the_file_equal_freshly_computed_ones(cache_file):
    first = {name: ff.format_facts(name) for name in CATALOG_FORMATS}
    assert first["FP8_DEFAULT_CFG"].effective_bits == 8.0 and "*lm_head*" in first["FP8_DEFAULT_CFG"].disable_patterns
    assert first["FP8_ALL_LAYERS_CFG"].disable_patterns == ()
    assert ff.format_folds_weights("INT8_SMOOTHQUANT_CFG") and not ff.format_folds_weights("FP8_DEFAULT_CFG")
    ff._MEMO.clear()
    for name in CATALOG_FORMATS:
        assert ff.format_facts(name) == first[name] == ff._compute(name)
    assert set(json.loads(cache_file.read_text())["formats"]) == set(CATALOG_FORMATS)


def test_a_file_from_other_modelopt_or_code_is_not_trusted(cache_file):
    real = ff.format_facts("FP8_DEFAULT_CFG")
    data = json.loads(cache_file.read_text())
    data["formats"]["FP8_DEFAULT_CFG"]["signature"] = "forged"
    cache_file.write_text(json.dumps(data))
    ff._MEMO.clear()
    assert ff.format_facts("FP8_DEFAULT_CFG").signature == "forged"  # same stamp: the file is what it says
    data["stamp"] = "another-modelopt"
    cache_file.write_text(json.dumps(data))
    ff._MEMO.clear()
    assert ff.format_facts("FP8_DEFAULT_CFG") == real  # other stamp: recomputed, and the file rewritten
    assert json.loads(cache_file.read_text())["stamp"] == ff.stamp()


def test_a_format_registered_at_run_time_never_comes_from_the_file(cache_file):
    from auto_quantize_model.modelopt_configs import CUSTOM_QUANT_CONFIGS, FP8_ALL_LAYERS_CFG, register_quant_config

    name = "TEST_RUNTIME_FP8_CFG"
    data = {"stamp": ff.stamp(), "formats": {name: {"effective_bits": 4.0, "signature": "forged", "algorithm": None,
                                                     "disable_patterns": []}}}
    cache_file.write_text(json.dumps(data))
    register_quant_config(name, FP8_ALL_LAYERS_CFG)
    try:
        assert ff.format_facts(name) == ff._compute(name) and ff.format_facts(name).signature != "forged"
    finally:
        CUSTOM_QUANT_CONFIGS.pop(name)


@pytest.mark.timeout(300)
def test_driver_preflight_with_known_formats_imports_no_modelopt(tiny_model_dir, cache_file):
    code = f"""
import sys
from auto_quantize_model.sweep.driver import _preflight
from auto_quantize_model.sweep.spec import load_sweep_spec
spec = load_sweep_spec(None, {{"name": "x", "model_dir": {str(tiny_model_dir)!r}, "captions_path": "demo",
    "storage_path": {str(cache_file.parent / "sweeps")!r}, "effective_bits": [12.0, 10.0],
    "schemes": ["fp8_autoquant_full", "int4w_fp8_autoquant_mix", "fp8_autoquant_all_layers_fp8"],
    "worker": {{"num_gpus": 0}}}})
trials, _ = _preflight(spec, False)
print(len(trials), "modelopt" in sys.modules)
"""
    env = {**os.environ, "AUTOQUANT_FORMAT_CACHE": str(cache_file)}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240)
            for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[-1].stderr[-2000:]
    assert runs[0].stdout.split()[-2:] == ["6", "True"]  # first time: facts computed with ModelOpt
    assert runs[1].stdout.split()[-2:] == ["6", "False"]  # then read from the file: no ModelOpt import
