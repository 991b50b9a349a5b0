"""The scaling path (issue 23) on a local multi-node Ray with fake GPUs: one kept worker per GPU on different nodes,
distinct-key equal-cost trials spread over them, then the repeat sweep on all GPUs attaching every kept worker.

The two-node test in test_reliability.py runs one CPU worker (it is about losing a node); this one is the shape
bench_scaling.py measures on real GPUs: workers placed by `num_gpus`, one per GPU, a lease per scoring key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_SCRIPT = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster
from auto_quantize_model.sweep.driver import run_sweep
from auto_quantize_model.sweep.spec import load_sweep_spec
from auto_quantize_model.sweep.workers import release_kept_workers

model_dir, storage, schemes_file = sys.argv[1:4]
# Head: the driver and the pool only (0 CPUs, no GPU); two nodes with one (fake) GPU and 2 CPUs each.
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
nodes = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
cluster.wait_for_nodes()
ray.init(address=cluster.address, namespace="autoquant", log_to_driver=False)
names = [f"fp8_skip{i}" for i in range(4)]  # 2 distinct-key trials per GPU, as bench_scaling.py writes them
base = {"model_dir": model_dir, "storage_path": storage, "captions_path": "demo", "schemes": names,
        "schemes_file": schemes_file, "effective_bits": [12.0], "max_calib_samples": 8, "calib_seq_len": 32,
        "num_workers": 0, "cache_dir": storage + "/cache", "worker": {"num_gpus": 1, "num_cpus": 1, "keep": True}}
out = {}
try:
    for name in ("first", "repeat"):
        res = run_sweep(load_sweep_spec(None, {**base, "name": name}))
        placed = {a["Name"]: a["Address"]["NodeID"] for a in ray._private.state.actors().values()
                  if a["State"] == "ALIVE" and a.get("Name", "").startswith("autoquant-keep-")}
        keys = ("trial_id", "status", "error", "worker", "scored", "manifest_path")
        out[name] = {"scheduler": res["scheduler"], "num_workers": res["num_workers"], "passes": res["stats"]["passes"],
                     "placed": placed, "rows": [{k: r.get(k) for k in keys} for r in res["rows"]]}
finally:
    out["released"] = release_kept_workers(None, force=True)[0]
print("RESULT " + json.dumps(out), flush=True)
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kept_workers_on_every_gpu_of_two_nodes_first_and_repeat(tiny_model_dir, tmp_path):
    sys.path.insert(0, str(REPO / "scripts" / "bench"))
    from bench_scaling import write_schemes

    schemes = tmp_path / "scaling_schemes.toml"
    write_schemes(schemes, 4)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    storage = tmp_path / "shared"
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(tiny_model_dir), str(storage), str(schemes)], env=env,
                          capture_output=True, text=True, timeout=840)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT "):])
    first, repeat = res["first"], res["repeat"]
    # One worker per GPU, each on its own node; every trial ok, one scoring pass per distinct key.
    assert first["num_workers"] == 2 and len(set(first["placed"].values())) == 2, first["placed"]
    assert all(r["status"] == "ok" for r in first["rows"]) and len(first["rows"]) == 4, first["rows"]
    assert len(first["passes"]) == 4 and len({r["worker"] for r in first["rows"]}) == 2
    # The repeat: both kept workers attached (same processes, same nodes), the direct scheduler, no scoring, the same
    # choices, trials on both workers (each key goes to the worker that holds its search).
    assert repeat["placed"] == first["placed"] and repeat["scheduler"] == "direct" and repeat["num_workers"] == 2
    assert repeat["passes"] == {} and all(r["status"] == "ok" and not r["scored"] for r in repeat["rows"])
    assert len({r["worker"] for r in repeat["rows"]}) == 2
    layers = {r["trial_id"]: json.loads(Path(r["manifest_path"]).read_text())["layers"] for r in first["rows"]}
    for r in repeat["rows"]:
        assert json.loads(Path(r["manifest_path"]).read_text())["layers"] == layers[r["trial_id"]]
    assert len(res["released"]) == 2
