"""Kept workers and a shared cache (issue 11): a second sweep on a running cluster finds the model loaded and the
scores cached. On the old code ``[worker] keep``, ``cache_dir``, ``attach`` and ``release_kept_workers`` do not
exist, every sweep loads its workers again and scores in its own cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from auto_quantize_model.actors.settings import WorkerSpec
from auto_quantize_model.errors import UserError
from auto_quantize_model.models.copies import copy_to_device
from auto_quantize_model.sweep.spec import load_sweep_spec


def _spec(tiny_model_dir, tmp_path, **kw):
    base = {"name": "k1", "model_dir": str(tiny_model_dir), "storage_path": str(tmp_path / "sweeps"),
            "captions_path": "demo", "max_calib_samples": 16, "batch_size": 4, "calib_seq_len": 32,
            "schemes": ("fp8_autoquant_full", "int4w_fp8_autoquant_mix"), "effective_bits": (12.0, 10.0),
            "num_workers": 1, "cache_dir": str(tmp_path / "shared-cache"),
            "worker": {"num_gpus": 0, "keep": True}}
    return load_sweep_spec(None, {**base, **kw})


def _layers(row):
    return json.loads(open(row["manifest_path"]).read())["layers"]


@pytest.mark.timeout(600)
def test_second_sweep_attaches_kept_workers_and_reuses_cached_scores(ray_cluster, tiny_model_dir, tmp_path):
    import ray

    from auto_quantize_model.sweep.driver import run_sweep
    from auto_quantize_model.sweep.workers import KEEP_PREFIX, release_kept_workers

    try:
        first = run_sweep(_spec(tiny_model_dir, tmp_path))
        assert all(r["status"] == "ok" for r in first["rows"]), [(r["status"], r.get("error")) for r in first["rows"]]
        assert sum(r["scored"] for r in first["rows"]) >= 1
        kept = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(KEEP_PREFIX)]
        assert len(kept) == 1  # the worker outlived its sweep
        pid = ray.get(ray.get_actor(kept[0], namespace="autoquant").info.remote())["pid"]

        second = run_sweep(_spec(tiny_model_dir, tmp_path, name="k2"))
        # Every worker attached loaded: the driver's own threads schedule (no Tune start before the first trial).
        assert (first["scheduler"], second["scheduler"]) == ("tune", "direct")
        assert second["phases"]["first_result"] < first["phases"]["first_unit_request"]
        info = ray.get(ray.get_actor(kept[0], namespace="autoquant").info.remote())
        assert info["pid"] == pid and info["sweeps_served"] == 2  # attached, not loaded again
        rows = {r["trial_id"]: r for r in second["rows"]}
        assert all(r["status"] == "ok" and not r["scored"] for r in rows.values())  # every score from the cache
        assert second["stats"]["passes"] == {}
        for r in first["rows"]:  # same layer choices as the sweep that computed the scores
            assert _layers(rows[r["trial_id"]]) == _layers(r)
        assert all(r["sweep_id"] == "k2" for r in second["rows"])
    finally:
        released, busy = release_kept_workers(None)
    assert not busy
    assert released and not [a for a in ray.util.list_named_actors(all_namespaces=True)
                             if a["name"].startswith(KEEP_PREFIX)]


def test_keeping_workers_needs_a_running_cluster(tiny_model_dir, tmp_path, monkeypatch):
    import ray

    from auto_quantize_model.sweep.driver import run_sweep

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(UserError, match="running Ray cluster"):
        run_sweep(_spec(tiny_model_dir, tmp_path))
    assert not (tmp_path / "sweeps").exists()  # refused before anything was written


def test_load_signature_ignores_only_per_sweep_settings(tiny_model_dir, tmp_path):
    base = WorkerSpec.from_sweep_dict(_spec(tiny_model_dir, tmp_path).to_dict())
    other_sweep = _spec(tiny_model_dir, tmp_path, name="other", schemes=("fp8_autoquant_top25",),
                        worker={"num_gpus": 0, "keep": False})
    assert WorkerSpec.from_sweep_dict(other_sweep.to_dict()).load_signature() == base.load_signature()
    for changed in ({"batch_size": 2}, {"calib_seq_len": 16}, {"seed": 1}, {"evaluate": True},
                    {"worker": {"num_gpus": 0, "keep": True, "pristine": "cpu"}}):
        spec = _spec(tiny_model_dir, tmp_path, **changed)
        assert WorkerSpec.from_sweep_dict(spec.to_dict()).load_signature() != base.load_signature(), changed


def test_copy_to_device_is_a_deep_bit_identical_copy_that_keeps_ties(loaded):
    model = loaded.model
    work = copy_to_device(model, "cpu")
    src = dict(model.named_parameters(remove_duplicate=False))
    for name, p in work.named_parameters(remove_duplicate=False):
        assert torch.equal(p, src[name]) and p.data_ptr() != src[name].data_ptr()
        assert p.requires_grad == src[name].requires_grad
    tied = isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.model.embed_tokens.weight
    assert (work.lm_head.weight is work.model.embed_tokens.weight) == tied
    for (name, b), (_, b0) in zip(work.named_buffers(), model.named_buffers(), strict=True):
        assert torch.equal(b, b0) and b.data_ptr() != b0.data_ptr(), name


def test_copy_to_device_keeps_a_tied_weight_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(5, 4)
            self.head = nn.Linear(4, 5, bias=False)
            self.head.weight = self.embed.weight
            self.register_buffer("scale", torch.ones(4), persistent=False)
            self.alias = self.scale  # a plain attribute naming a buffer (as transformers' rotary embedding does)

    src = Tied()
    work = copy_to_device(src, "cpu")
    assert work.head.weight is work.embed.weight and work.alias is work.scale
    assert work.embed.weight.data_ptr() != src.embed.weight.data_ptr()
    assert len(list(work.parameters())) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host memory needs CUDA (run on the GPU machine)")
def test_move_to_pinned_host_keeps_values_ties_and_aliases():
    """The pristine copy moved into pinned blocks: same values, Parameter objects kept (ties stay tied), buffer
    aliases follow, every tensor pinned; a working copy made from it is bit-identical."""
    from auto_quantize_model.models.copies import move_to_pinned_host

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(7, 6)
            self.mid = nn.Linear(6, 6).to(torch.bfloat16)
            self.head = nn.Linear(6, 7, bias=False)
            self.head.weight = self.embed.weight
            self.register_buffer("scale", torch.arange(6.0), persistent=False)

    model = Tied().cuda()
    model.alias = model.scale  # a plain attribute naming a buffer, as transformers' rotary embedding holds one
    before = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    params = {name: p for name, p in model.named_parameters(remove_duplicate=False)}
    pinned = move_to_pinned_host(model)
    assert pinned > 0
    for name, p in model.named_parameters(remove_duplicate=False):
        assert p is params[name] and p.device.type == "cpu" and p.is_pinned()
    assert model.head.weight is model.embed.weight and model.alias is model.scale and model.scale.is_pinned()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    work = copy_to_device(model, "cuda")
    for k, v in work.state_dict().items():
        assert v.is_cuda and torch.equal(v.cpu(), before[k]), k


@pytest.mark.timeout(600)
def test_kept_workers_of_other_settings_or_code_are_never_reused(ray_cluster, tiny_model_dir, tmp_path):
    """A kept worker holding both (fake) GPUs: a sweep with other settings is refused in one line instead of
    waiting forever for a GPU, and a worker asked to serve another signature (other code) refuses."""
    import ray

    from auto_quantize_model.sweep.driver import run_sweep
    from auto_quantize_model.sweep.workers import KEEP_PREFIX, fit_to_cluster, release_kept_workers

    gpus = {"num_gpus": 2, "num_cpus": 0.5, "keep": True}
    try:
        run_sweep(_spec(tiny_model_dir, tmp_path, name="g1", schemes=("fp8_autoquant_full",),
                        effective_bits=(12.0,), worker=gpus))
        (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["name"].startswith(KEEP_PREFIX)]
        with pytest.raises(UserError, match="hold the cluster's GPUs"):
            run_sweep(_spec(tiny_model_dir, tmp_path, name="g2", batch_size=2, schemes=("fp8_autoquant_full",),
                            effective_bits=(12.0,), worker={**gpus, "num_gpus": 1}))
        # The refused sweep left no pool behind (the first sweep's pool went when it finished).
        pools = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("autoquant-pool-")]
        assert not pools
        worker = ray.get_actor(name, namespace="autoquant")
        spec, _ = fit_to_cluster(_spec(tiny_model_dir, tmp_path, name="g3", worker=gpus))  # as the driver sends it
        with pytest.raises(ray.exceptions.RayTaskError, match="StaleWorkerError"):
            ray.get(worker.attach.remote(spec.to_dict(), "no-pool", "autoquant", "another-code-or-settings"))
        # While a sweep runs on it (its pool is alive), a second sweep cannot take it over.
        from auto_quantize_model.actors.pool import WorkerPool

        signature = WorkerSpec.from_sweep_dict(spec.to_dict()).load_signature()
        busy = WorkerPool.options(name="autoquant-pool-busy", namespace="autoquant").remote()
        ray.get(worker.attach.remote(spec.to_dict(), "autoquant-pool-busy", "autoquant", signature))
        other = WorkerPool.options(name="autoquant-pool-other", namespace="autoquant").remote()
        with pytest.raises(ray.exceptions.RayTaskError, match="WorkerBusyError"):
            ray.get(worker.attach.remote(spec.to_dict(), "autoquant-pool-other", "autoquant", signature))
        assert ray.get(worker.busy.remote("autoquant"))
        # release-workers leaves a worker that a sweep is using, unless forced.
        assert release_kept_workers(None) == ([], [name])
        ray.get(worker.detach.remote())  # that sweep ended
        assert ray.get(worker.attach.remote(spec.to_dict(), "autoquant-pool-other", "autoquant", signature))
        for pool in (busy, other):
            ray.kill(pool)
    finally:
        release_kept_workers(None, force=True)


@pytest.mark.timeout(600)
def test_a_kept_worker_whose_caption_file_changed_is_replaced(ray_cluster, tiny_model_dir, tmp_path):
    """Settings hold paths: a captions file rewritten in place after the first sweep must not be served from the
    calibration set the kept worker built from its old content."""
    import ray

    from auto_quantize_model.datasets.demo import DEMO_CAPTIONS_PATH
    from auto_quantize_model.sweep.driver import run_sweep
    from auto_quantize_model.sweep.workers import KEEP_PREFIX, release_kept_workers

    captions = tmp_path / "captions.txt"
    lines = Path(DEMO_CAPTIONS_PATH).read_text().splitlines()
    captions.write_text("\n".join(lines[:40]) + "\n")
    kw = {"captions_path": str(captions), "schemes": ("fp8_autoquant_full",), "effective_bits": (12.0,)}
    try:
        run_sweep(_spec(tiny_model_dir, tmp_path, name="c1", **kw))
        (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["name"].startswith(KEEP_PREFIX)]
        pid = ray.get(ray.get_actor(name, namespace="autoquant").info.remote())["pid"]
        captions.write_text("\n".join(lines[40:80]) + "\n")  # same path, other captions
        second = run_sweep(_spec(tiny_model_dir, tmp_path, name="c2", **kw))
        info = ray.get(ray.get_actor(name, namespace="autoquant").info.remote())
        assert info["pid"] != pid and info["sweeps_served"] == 1  # a new worker loaded the new captions
        assert all(r.get("scored") for r in second["rows"]), second["rows"]  # new data, new scoring key: nothing reused
    finally:
        release_kept_workers(None, force=True)


def test_room_check_waits_for_what_a_killed_worker_is_releasing(tiny_model_dir, tmp_path, monkeypatch):
    """Ray shows a killed actor's GPUs as free a little later: the check waits for them instead of refusing."""
    import ray

    from auto_quantize_model.sweep import workers

    spec = _spec(tiny_model_dir, tmp_path, worker={"num_gpus": 1, "num_cpus": 0.5, "keep": True})
    answers = iter([{"GPU": 0.0, "CPU": 2.0}, {"GPU": 0.0, "CPU": 2.0}, {"GPU": 1.0, "CPU": 2.0}])
    monkeypatch.setattr(ray, "available_resources", lambda: next(answers))
    workers._check_room(spec, 1, 1, ["autoquant-keep-other-0"])  # the third answer has the GPU: no refusal
    monkeypatch.setattr(ray, "available_resources", lambda: {"GPU": 0.0, "CPU": 2.0})
    monkeypatch.setattr(workers, "ROOM_WAIT_S", 0.0)
    with pytest.raises(UserError, match="hold the cluster's GPUs"):
        workers._check_room(spec, 1, 1, ["autoquant-keep-other-0"])


def test_pristine_auto_keeps_the_copy_on_the_gpu_only_when_the_worker_share_has_room():
    """``pristine = "auto"``: a second copy of the 3B's 6.2 GiB beside the working one where the worker's share of the
    GPU holds both and a scoring pass's activations for its batch (the pinned move took 2.7 s of an H100 worker's
    start). At 4 x 256 tokens (the benchmark grid, 22.5 GiB peak with both copies on an H100) up to three workers of
    an 80 GB GPU; at the default 8 x 512 tokens one; a 24 GB GPU never. The old rule put it on the host on every
    GPU."""
    from auto_quantize_model.actors.placement import pristine_fits_on_device

    gib, weights, gpu = 2**30, int(6.2 * 2**30), 79.6 * 2**30  # an H100 80GB's total memory
    bench, default = 4 * 256, 8 * 512
    assert [pristine_fits_on_device(weights, gpu / n, bench) for n in (1, 2, 3, 4)] == [True, True, True, False]
    assert [pristine_fits_on_device(weights, gpu / n, default) for n in (1, 2)] == [True, False]
    assert not pristine_fits_on_device(weights, 24 * gib, bench)
    assert not pristine_fits_on_device(0, gpu, bench)


def test_a_worker_without_a_gpu_share_runs_on_the_cpu_even_where_cuda_is_visible():
    """Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for a ``num_gpus = 0`` actor: the old worker took ``cuda`` whenever
    torch saw a GPU, so CPU workers on a GPU host all ran on GPU 0 without Ray knowing."""
    from auto_quantize_model.actors.placement import worker_device

    assert worker_device(0, cuda_available=True) == "cpu"
    assert worker_device(0.5, cuda_available=True) == "cuda"
    assert worker_device(1, cuda_available=False) == "cpu"
