"""Sweep overhead (issue 11): Tune trials per lease key, worker host threads. On the old code ``group_units``
does not exist (one Tune trial per grid point) and a worker ran with Ray's OMP_NUM_THREADS = num_cpus (1)."""

from __future__ import annotations

import dataclasses

import pytest

from auto_quantize_model.sweep.spec import group_units, load_sweep_spec


def _t(tid, lease, key=None):
    from auto_quantize_model.actors.trial import Trial
    from auto_quantize_model.configs.schemes import get_scheme

    scheme = get_scheme("fp8_autoquant_top50")
    return Trial(trial_id=tid, scheme=scheme.name, effective_bits_target=scheme.effective_bits, method=scheme.method,
                 num_score_steps=scheme.num_score_steps, num_calib_steps=scheme.num_calib_steps, resolved=scheme,
                 lease_key=lease, scoring_key=key or lease)


def test_units_group_by_lease_key_and_split_to_feed_every_worker():
    trials = [_t("a8", "A"), _t("b8", "B"), _t("a12", "A"), _t("bad", None), _t("b12", "B"), _t("a14", "A")]
    units = group_units(trials, 1)
    assert [[t["trial_id"] for t in u["trials"]] for u in units] == [["a8", "a12", "a14"], ["b8", "b12"], ["bad"]]
    assert [u["lease_key"] for u in units] == ["A", "B", None]
    assert len({u["unit_id"] for u in units}) == 3
    # Four workers: the largest unit is split (its second half waits for the pass, then re-solves from the cache).
    four = group_units(trials, 4)
    assert sorted(len(u["trials"]) for u in four) == [1, 1, 2, 2]
    assert sum(len(u["trials"]) for u in four) == len(trials)
    # Within a unit, trials of one scoring key run back to back (in-memory re-solves).
    mixed = group_units([_t("x1", "P", "k1"), _t("y1", "P", "k2"), _t("x2", "P", "k1")], 1)
    assert [t["scoring_key"] for t in mixed[0]["trials"]] == ["k1", "k1", "k2"]


@pytest.mark.timeout(300)
def test_worker_gets_the_clusters_cpus_as_host_threads(ray_cluster, tiny_model_dir, tmp_path):
    """One worker on the 2-CPU test cluster runs torch with 2 threads (Ray alone would give it 1)."""
    import ray

    from auto_quantize_model.sweep.workers import fit_to_cluster, start_workers

    spec = load_sweep_spec(None, {"name": "t", "model_dir": str(tiny_model_dir), "storage_path": str(tmp_path),
                                  "captions_path": "demo", "max_calib_samples": 8, "batch_size": 4,
                                  "calib_seq_len": 16, "num_workers": 1, "worker": {"num_gpus": 0}})
    fitted, n = fit_to_cluster(spec)
    assert n == 1 and fitted.worker.num_threads == 2
    pool, workers, _, _ = start_workers(fitted, n)
    try:
        info = ray.get(workers[0].info.remote())
        assert info["num_threads"] == 2
        # Fixed OpenMP/MKL teams: a dynamic team on a busy host changed CPU logits between the load-time probe and a
        # fresh copy, and the pristine check refused every trial (seen when Tune started beside a loading worker).
        assert info["thread_env"] == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "OMP_DYNAMIC": "FALSE",
                                      "MKL_DYNAMIC": "FALSE"}
    finally:
        for w in workers:
            ray.kill(w)
        ray.kill(pool)
    explicit, _ = fit_to_cluster(dataclasses.replace(spec, worker=dataclasses.replace(spec.worker, num_threads=1)))
    assert explicit.worker.num_threads == 1
