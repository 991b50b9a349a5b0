"""records/: the manifest's TypedDicts against docs/manifest.md and real manifests of the tiny model."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, get_args, get_origin, is_typeddict

import pytest
from helpers import sweep_spec_from_cli

from auto_quantize_model.records.manifest import Manifest, declared_keys, manifest_problems

DOCS = Path(__file__).resolve().parent.parent / "docs" / "manifest.md"


def _doc_rows() -> dict[str, str]:
    """docs/manifest.md's field table: field -> the rest of its row."""
    rows = {}
    for line in DOCS.read_text().split("\n## ", 1)[0].splitlines():
        m = re.match(r"\| `([a-z_]+)` \|(.*)\|\s*$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def _typeddicts_in(tp: Any) -> list[type]:
    """TypedDicts reachable from ``tp`` through unions, lists and dict values."""
    if is_typeddict(tp):
        return [tp]
    return [td for arg in get_args(tp) for td in _typeddicts_in(arg)] if get_origin(tp) else []


def _nested_keys(tp: Any) -> set[str]:
    keys: set[str] = set()
    for td in _typeddicts_in(tp):
        for k, sub in declared_keys(td).items():
            keys |= {k} | _nested_keys(sub)
    return keys


def test_docs_field_list_is_the_typeddict():
    rows = _doc_rows()
    assert list(rows) == list(declared_keys(Manifest))  # same fields, same order
    # A key counts as documented when it is a word inside a code span of its field's row (`name`,
    # `{pattern, source}`, `kind: "image_caption"`).
    words = {field: set(re.findall(r"[A-Za-z_][\w-]*", " ".join(re.findall(r"`([^`]+)`", row))))
             for field, row in rows.items()}
    undocumented = {field: sorted(_nested_keys(tp) - words[field]) for field, tp in declared_keys(Manifest).items()}
    assert {f: ks for f, ks in undocumented.items() if ks} == {}


def test_checker_names_missing_undeclared_and_mistyped_keys():
    problems = manifest_problems({"schema_version": 3, "run_id": None, "extra": 1})
    assert "manifest.extra: not declared in records.manifest.Manifest" in problems
    assert "manifest.scheme: missing" in problems
    assert any(p.startswith("manifest.schema_version: 3 is not one of") for p in problems)


@pytest.fixture(scope="module")
def runs(loaded, calib, tmp_path_factory):
    """A fresh gradient search, its in-memory re-solve, and a fresh kl_div search (calibrate_and_score)."""
    from auto_quantize_model.autoquant.session import SearchSession
    from auto_quantize_model.configs import get_scheme, resolve_scheme

    root = tmp_path_factory.mktemp("records")
    session = SearchSession(loaded, calib, root / "cache")
    scheme = resolve_scheme(get_scheme("fp8_autoquant_top50"), num_score_steps=2, num_calib_steps=2)
    fresh = session.run(scheme, root / "fresh", run_id="t1", sweep_id="s")
    resolved = session.run(dataclasses.replace(scheme, effective_bits=10.0), root / "resolved")
    kl = session.run(dataclasses.replace(scheme, method="kl_div"), root / "kl")
    return {"fresh": fresh, "resolved": resolved, "kl": kl}


def test_real_manifests_match_the_typeddicts(runs):
    assert runs["resolved"].manifest["score_cache"].get("in_memory") is True
    assert "calibrate_and_score" in runs["kl"].manifest["timings"]
    for name, result in runs.items():
        assert manifest_problems(result.manifest) == [], name


def test_trial_outcome_is_the_trials_table_row(runs):
    import pyarrow as pa

    from auto_quantize_model.records.outcome import TrialOutcome
    from auto_quantize_model.records.tables import TRIALS_SCHEMA

    assert [f.name for f in dataclasses.fields(TrialOutcome)] == TRIALS_SCHEMA.names  # one name per column
    m = runs["fresh"].manifest
    out = TrialOutcome.from_run(m, sweep_id="s", metrics={"kl_mean": 0.5})
    assert out.trial_id == "t1" and out.num_quantized_layers == m["num_quantized_layers"] > 0
    assert out.time_calibrate == m["timings"]["calibrate"] and out.scored is True and out.kl_mean == 0.5
    assert isinstance(out.effective_bits_target, float) and out.effective_bits_target == m["scheme"]["effective_bits"]
    reused = TrialOutcome.from_run(runs["resolved"].manifest)
    assert reused.scored is False and reused.effective_bits_target == 10.0
    assert pa.Table.from_pylist([out.to_row()], schema=TRIALS_SCHEMA).to_pylist() == [out.to_row()]
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.status = "error"  # type: ignore[misc]
    failed = TrialOutcome.failed(trial_id="t2", effective_bits_target=12, method="gradient", error="x")
    assert (failed.status, failed.effective_bits_target, failed.num_quantized_layers) == ("error", 12.0, None)
    assert isinstance(failed.effective_bits_target, float)


def test_all_layer_bits_stay_on_their_basis_for_manifests_without_the_field(runs):
    """A manifest written before ``measured_all_layers`` existed gets it recomputed from its layers (old code fell
    back to the budget-basis ``measured``, mixing two bases in one column)."""
    from auto_quantize_model.records.outcome import TrialOutcome

    m = runs["fresh"].manifest
    every, budget = m["effective_bits"]["measured_all_layers"], m["effective_bits"]["measured"]
    assert every != pytest.approx(budget)  # lm_head is outside fp8_autoquant_top50's budget
    old = {**m, "effective_bits": {k: v for k, v in m["effective_bits"].items() if k != "measured_all_layers"}}
    assert TrialOutcome.from_run(old).effective_bits_all_layers == pytest.approx(every)


def test_effective_bits_is_one_float_from_the_cli_to_the_trials_row(monkeypatch, tiny_model_dir, tmp_path, runs):
    from auto_quantize_model.configs import load_schemes_file
    from auto_quantize_model.records.outcome import TrialOutcome
    from auto_quantize_model.sweep.spec import expand_grid

    spec = sweep_spec_from_cli(["--name", "bits", "--model-dir", str(tiny_model_dir), "--schemes",
                                 "fp8_autoquant_top25", "--effective-bits", "14,12", "--storage-path",
                                 str(tmp_path)], monkeypatch)
    assert spec.effective_bits == (14.0, 12.0) and all(type(b) is float for b in spec.effective_bits)
    for trial in expand_grid(spec):
        assert type(trial.effective_bits_target) is float
        assert trial.resolved is not None and type(trial.resolved.effective_bits) is float
    # Old code: a schemes file's `effective_bits = 14` stayed an int into the manifest's scheme section.
    (tmp_path / "s.toml").write_text('[schemes.mine]\ncandidate_formats = ["FP8_DEFAULT_CFG"]\neffective_bits = 14\n')
    assert type(load_schemes_file(tmp_path / "s.toml")["mine"].effective_bits) is float
    m = runs["fresh"].manifest
    assert type(m["scheme"]["effective_bits"]) is float and type(m["effective_bits"]["target"]) is float
    assert type(TrialOutcome.from_run(m).effective_bits_target) is float


def test_sweep_toml_effective_bits_are_floats(monkeypatch, tiny_model_dir, tmp_path):
    (tmp_path / "sweep.toml").write_text(f'name = "bits"\nmodel_dir = "{tiny_model_dir}"\n'
                                         'effective_bits = [14, 12]\nschemes = ["fp8_autoquant_top25"]\n')
    spec = sweep_spec_from_cli(["--config", str(tmp_path / "sweep.toml"), "--storage-path", str(tmp_path)],
                                monkeypatch)
    assert all(type(b) is float for b in spec.effective_bits)
