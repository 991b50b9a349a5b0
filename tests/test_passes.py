"""Shared scoring passes (issue 11): one calibrate + score over the union of formats serves every subset, exactly.

On the old code none of this exists (``autoquant/passes.py``, ``SearchSession.prepare``): each scheme with its own
format set paid its own scoring pass.
"""

from __future__ import annotations

import math

import pytest
import torch

from auto_quantize_model.autoquant.identity import DataIdentity, scoring_key
from auto_quantize_model.autoquant.passes import derive_state, pass_group, plan_passes
from auto_quantize_model.autoquant.session import SearchSession
from auto_quantize_model.configs import get_scheme, resolve_scheme


def _scheme(name, **kw):
    return resolve_scheme(get_scheme(name), **{"num_score_steps": 2, "num_calib_steps": 2, **kw})


def _stats_by_signature(state):
    return {name: ([r.checkpoint_signature for r in st["formats"]], st["scores"], st["costs"])
            for name, st in state["candidate_stats"].items()}


def test_reclamp_comes_from_raw_scores_not_the_clamped_ones():
    """ModelOpt clamps scores to be non-increasing along the candidates; a subset must be re-clamped from the raw
    scores. Filtering the pass's clamped list would give FP8 the NVFP4 score here."""
    from modelopt.torch.quantization.algorithms import QuantRecipe

    nvfp4, fp8, none = QuantRecipe("NVFP4_DEFAULT_CFG"), QuantRecipe("FP8_DEFAULT_CFG"), QuantRecipe(None)
    assert nvfp4 < fp8 < none  # ModelOpt's candidate order: most compressed first
    sig = [r.checkpoint_signature for r in (nvfp4, fp8, none)]
    setup = (("g.quant_recipe", ("g",), (), ("g",), tuple(sorted(sig)), True, False, 1.0),)
    state = {"candidate_stats": {"g.quant_recipe": {"formats": [nvfp4, fp8, none], "scores": [1.0, 1.0, 0.0],
                                                    "costs": [0.25, 0.5, 1.0]}},
             "quantizer_states": {nvfp4: {}, fp8: {}}, "resolved_search_setup_signature": setup,
             "quantization_formats_signature": tuple(sorted(sig[:2]))}
    raw = {"formats": sig, "scores": {"g.quant_recipe": {"0": 1.0, "1": 2.0, "2": 0.0}}}
    member = derive_state(state, raw, {sig[1]})
    st = member["candidate_stats"]["g.quant_recipe"]
    assert [r.checkpoint_signature for r in st["formats"]] == [sig[1], sig[2]]
    assert st["scores"] == [2.0, 0.0] and st["costs"] == [0.5, 1.0]
    assert list(member["quantizer_states"]) == [fp8]
    assert member["quantization_formats_signature"] == (sig[1],)
    assert member["resolved_search_setup_signature"][0][4] == tuple(sorted([sig[1], sig[2]]))
    assert math.isinf(member["best"]["score"])


def test_only_format_differences_share_a_pass(loaded, calib):
    ident = DataIdentity.of(loaded, calib)
    fp8, mix = _scheme("fp8_autoquant_full"), _scheme("int4w_fp8_autoquant_mix")
    assert pass_group(ident, fp8) == pass_group(ident, mix)
    plan = plan_passes(ident, [fp8, mix, _scheme("fp8_autoquant_top50")])  # top50: same key as full
    assert len({id(p) for p in plan.values()}) == 1 and len(plan) == 2
    union = next(iter(plan.values())).scheme
    assert set(union.quantization_formats) == {"FP8_DEFAULT_CFG", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"}
    # Other steps, other disabled layers, another method: never one pass.
    assert pass_group(ident, _scheme("fp8_autoquant_full", num_score_steps=3)) != pass_group(ident, mix)
    assert pass_group(ident, _scheme("fp8_autoquant_all_layers_fp8")) != pass_group(ident, fp8)
    assert pass_group(ident, _scheme("fp8_autoquant_full", method="kl_div")) is None
    assert plan_passes(ident, [fp8, _scheme("fp8_autoquant_all_layers_fp8")]) == {}


def test_member_of_a_shared_pass_equals_its_standalone_search(loaded, calib, tmp_path):
    """Layer choices, scores, costs and logits of each member re-solved from the shared pass equal a standalone
    search of that member with its own cache, bit for bit on CPU."""
    members = [_scheme("fp8_autoquant_full", effective_bits=12.0),
               _scheme("int4w_fp8_autoquant_mix", effective_bits=9.0)]
    shared = SearchSession(loaded, calib, tmp_path / "shared-cache")
    (outcome,) = shared.prepare(members)
    assert outcome.ran
    keys = {shared.key(m) for m in members}
    assert set(outcome.derived) == keys - {outcome.key}
    assert shared.prepare(members)[0].ran is False  # a second prepare finds everything cached
    alone = SearchSession(loaded, calib, tmp_path / "own-cache")
    batch = calib.batches[0]
    for i, scheme in enumerate(members):
        a = shared.run(scheme, tmp_path / f"shared-{i}")
        b = alone.run(scheme, tmp_path / f"alone-{i}")
        assert a.manifest["score_cache"]["reused"] and not b.manifest["score_cache"]["reused"]
        assert a.manifest["score_cache"]["key"] == b.manifest["score_cache"]["key"] == scoring_key(shared.identity,
                                                                                                   scheme)
        if a.manifest["score_cache"]["key"] != outcome.key:
            assert a.manifest["score_cache"]["derived_from"] == outcome.key
        assert _stats_by_signature(a.search_state) == _stats_by_signature(b.search_state)
        assert {n: r.checkpoint_signature for n, r in a.search_state["best"]["recipe"].items()} == \
            {n: r.checkpoint_signature for n, r in b.search_state["best"]["recipe"].items()}
        assert {n: la["format"] for n, la in a.manifest["layers"].items()} == \
            {n: lb["format"] for n, lb in b.manifest["layers"].items()}
        with torch.no_grad():
            assert torch.equal(loaded.forward_step(a.model, batch), loaded.forward_step(b.model, batch))


def test_unshareable_members_are_left_alone(loaded, calib, tmp_path):
    session = SearchSession(loaded, calib, tmp_path / "cache")
    assert session.prepare([_scheme("fp8_autoquant_full"), _scheme("fp8_autoquant_all_layers_fp8")]) == []


@pytest.mark.parametrize("bad", ["no-raw"])
def test_pass_checkpoint_without_raw_scores_leaves_members_to_search(loaded, calib, tmp_path, bad, caplog):
    """A union-format checkpoint written by a plain search has no raw scores: members are not derived from it."""
    fp8, mix = _scheme("fp8_autoquant_full"), _scheme("int4w_fp8_autoquant_mix")
    session = SearchSession(loaded, calib, tmp_path / "cache")
    session.run(mix, tmp_path / "plain")  # a plain search of the union's formats, same key as the pass
    (outcome,) = session.prepare([fp8, mix])
    assert not outcome.ran and outcome.derived == ()
    assert "no raw scores" in caplog.text
    assert not session.run(fp8, tmp_path / "fp8").manifest["score_cache"]["reused"]


def test_grid_trials_of_one_pass_lease_under_its_key(tiny_model_dir, tmp_path):
    from auto_quantize_model.sweep.spec import assign_scoring_keys, expand_grid, load_sweep_spec

    spec = load_sweep_spec(None, {"name": "p", "model_dir": str(tiny_model_dir), "storage_path": str(tmp_path),
                                  "schemes": ("fp8_autoquant_full", "int4w_fp8_autoquant_mix",
                                              "fp8_autoquant_all_layers_fp8"), "effective_bits": (12.0, 9.0)})
    trials = expand_grid(spec)
    identity = {"weights_fingerprint": "w", "config_hash": "c", "dtype": "float32", "scope": "language_model",
                "calibration_hash": "t", "num_batches": 16, "batch_size": 4}
    assert all(t.error is None for t in trials)
    trials = assign_scoring_keys(trials, identity)
    shared = [t for t in trials if t.scheme != "fp8_autoquant_all_layers_fp8"]
    alone = [t for t in trials if t.scheme == "fp8_autoquant_all_layers_fp8"]
    assert len({t.lease_key for t in shared}) == 1 and len({t.scoring_key for t in shared}) == 2
    assert all(t.scoring_pass is not None for t in shared)
    assert all(t.scoring_pass is None and t.lease_key == t.scoring_key for t in alone)


@pytest.mark.timeout(420)
def test_sweep_runs_one_scoring_pass_for_two_format_sets(ray_cluster, tiny_model_dir, tmp_path):
    """Two format sets x two budgets on two workers: one scoring pass; every trial's manifest says where its
    scores came from."""
    import json

    from auto_quantize_model.sweep.driver import run_sweep
    from auto_quantize_model.sweep.spec import load_sweep_spec

    spec = load_sweep_spec(None, {
        "name": "p", "model_dir": str(tiny_model_dir), "storage_path": str(tmp_path / "sweeps"),
        "captions_path": "demo", "max_calib_samples": 16, "batch_size": 4, "calib_seq_len": 32,
        "schemes": ("fp8_autoquant_full", "int4w_fp8_autoquant_mix"), "effective_bits": (12.0, 9.0),
        "num_score_steps": (2,), "num_calib_steps": 2})
    res = run_sweep(spec)
    rows = res["rows"]
    assert [r["status"] for r in rows] == ["ok"] * 4
    (pass_key,) = {r["lease_key"] for r in rows}
    assert res["stats"]["passes"] == {pass_key: 1}
    assert sum(r["scored"] for r in rows) == 1 and res["stats"]["reuses"] == 3
    # One lease key on two workers: two Tune trials (the unit split so both workers get work), not four.
    spec_json = json.loads((tmp_path / "sweeps" / "p" / "sweep_spec.json").read_text())
    assert spec_json["num_trials"] == 4 and spec_json["num_tune_trials"] == 2
    for r in rows:
        m = json.loads(next((tmp_path / "sweeps" / "p" / "autoquant" / "trials" / r["trial_id"])
                            .glob("*_quant_manifest.json")).read_text())
        assert m["score_cache"]["reused"] is True
        assert m["score_cache"]["derived_from"] == (None if r["scoring_key"] == pass_key else pass_key)
