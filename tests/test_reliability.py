"""Reliability cases of issue 14, grouped by its numbered kinds (1 and the restore half of 2 are tested elsewhere).

Refusals are checked through the CLI (exit status 2, one line, no traceback) and, where it matters, before
the expensive part: the model loader and ``ray.init`` are replaced by functions that fail the test.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import refused_one_line

from auto_quantize_model.cli import main
from auto_quantize_model.errors import UserError

REPO = Path(__file__).resolve().parents[1]
UNWRITABLE = "/proc/autoquant-no-such-dir"  # even root cannot create directories in procfs






def _sweep_argv(tiny_model_dir, tmp_path, *extra: str, name: str = "s") -> list[str]:
    return ["sweep", "--name", name, "--model-dir", str(tiny_model_dir), "--storage-path", str(tmp_path / "sweeps"),
            "--captions-path", "demo", "--schemes", "fp8_autoquant_top25", "--effective-bits", "12",
            "--max-calib-samples", "8", "--calib-seq-len", "32", *extra]


def _run_argv(tiny_model_dir, out, *extra: str) -> list[str]:
    return ["run", "--scheme-name", "fp8_autoquant_top25", "--model-dir", str(tiny_model_dir), "--output-dir",
            str(out), "--captions-path", "demo", "--max-calib-samples", "8", "--calib-seq-len", "32", *extra]


# -- 3. bad inputs get one line and exit 2, before the expensive part ---------------------------------------


def test_unwritable_output_and_cache_dirs_refused_before_load(tiny_model_dir, tmp_path, capsys, no_load):
    refused_one_line(capsys, _run_argv(tiny_model_dir, UNWRITABLE), "is not writable")
    refused_one_line(capsys, _run_argv(tiny_model_dir, tmp_path / "out", "--cache-dir", UNWRITABLE), "cache dir")
    (tmp_path / "afile").write_text("x")
    refused_one_line(capsys, _run_argv(tiny_model_dir, tmp_path / "afile" / "out"), "not writable")
    refused_one_line(capsys, ["analyze", str(tmp_path), "--output-dir", UNWRITABLE], "not writable")


def test_storage_path_that_is_a_file_or_unwritable_refused_before_ray(tiny_model_dir, tmp_path, capsys, no_ray):
    f = tmp_path / "storage"
    f.write_text("not a directory")
    argv = _sweep_argv(tiny_model_dir, tmp_path)
    argv[argv.index("--storage-path") + 1] = str(f)
    refused_one_line(capsys, argv, "is a file")
    argv[argv.index("--storage-path") + 1] = UNWRITABLE
    refused_one_line(capsys, argv, "not writable")


def _copy_checkpoint(src, dst) -> Path:
    shutil.copytree(src, dst)
    return Path(dst)


def test_corrupt_safetensors_and_missing_tokenizer_refused_before_load(tiny_model_dir, tmp_path, capsys,
                                                                       no_load, no_ray):
    bad = _copy_checkpoint(tiny_model_dir, tmp_path / "truncated")
    weights = next(bad.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    refused_one_line(capsys, _run_argv(bad, tmp_path / "o1"), "is corrupt")
    refused_one_line(capsys, _sweep_argv(bad, tmp_path), "is corrupt")
    garbage = _copy_checkpoint(tiny_model_dir, tmp_path / "garbage")
    next(garbage.glob("*.safetensors")).write_bytes(b"\xff" * 64)
    refused_one_line(capsys, _run_argv(garbage, tmp_path / "o2"), "is corrupt")
    notok = _copy_checkpoint(tiny_model_dir, tmp_path / "notok")
    for f in notok.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            f.unlink()
    refused_one_line(capsys, _run_argv(notok, tmp_path / "o3"), "no tokenizer files")
    refused_one_line(capsys, _sweep_argv(notok, tmp_path), "no tokenizer files")


@pytest.mark.parametrize("line, match", [
    ('batch_size = "4"', "batch_size must be an integer"),
    ("max_calib_samples = 8.5", "max_calib_samples must be an integer"),
    ('effective_bits = ["12"]', "effective_bits must be a list of numbers"),
    ("evaluate = 1", "evaluate must be true or false"),
    ('worker = "cpu"', "must be a [worker] table"),
    ('[worker]\nnum_cpus = "2"', "num_cpus must be a number"),
    ('seed = "0"', "seed must be an integer"),
])
def test_wrongly_typed_sweep_toml_values_refused(tiny_model_dir, tmp_path, capsys, no_ray, line, match):
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(f'name = "t"\nmodel_dir = "{tiny_model_dir}"\ncaptions_path = "demo"\n{line}\n')
    refused_one_line(capsys, ["sweep", "--config", str(cfg)], match)


@pytest.mark.parametrize("body, match", [
    ('quantization_formats = "FP8_DEFAULT_CFG"\neffective_bits = 12', "quantization_formats must be a list"),
    ('quantization_formats = ["FP8_DEFAULT_CFG"]\neffective_bits = "12"', "effective_bits must be a number"),
    ('quantization_formats = ["FP8_DEFAULT_CFG"]\neffective_bits = 12\nnum_score_steps = 2.5',
     "num_score_steps must be an integer"),
    ('quantization_formats = ["FP8_DEFAULT_CFG"]\neffective_bits = 12\ndisabled_layers = "lm_head"',
     "disabled_layers must be a list"),
])
def test_wrongly_typed_schemes_file_values_refused(tmp_path, capsys, body, match):
    f = tmp_path / "schemes.toml"
    f.write_text(f"[schemes.mine]\n{body}\n")
    refused_one_line(capsys, ["schemes", "--schemes-file", str(f)], match)


@pytest.fixture(scope="module")
def one_manifest(loaded, calib, tmp_path_factory) -> Path:
    from auto_quantize_model.autoquant.run import run_scheme
    from auto_quantize_model.configs import get_scheme, resolve_scheme

    out = tmp_path_factory.mktemp("one_run")
    scheme = resolve_scheme(get_scheme("fp8_autoquant_top25"), num_score_steps=2, num_calib_steps=2)
    return run_scheme(loaded, calib, scheme, out, cache_dir=out / "cache").manifest_path


def _malformed_copies(manifest: Path, root: Path) -> list[Path]:
    good = json.loads(manifest.read_text())
    variants = {
        "layer_not_object": lambda m: m["layers"].update({next(iter(m["layers"])): 5}),
        "bits_not_number": lambda m: m["effective_bits"].update({"target": "twelve", "achieved": []}),
        "group_scores_not_list": lambda m: [g.update({"scores": 3, "candidate_formats": 7})
                                            for g in m["layer_sensitivity"].values()],
        "no_best": lambda m: m["autoquant_state"].pop("best"),
    }
    out = []
    for name, spoil in variants.items():
        m = json.loads(json.dumps(good))
        spoil(m)
        d = root / name
        d.mkdir(parents=True)
        path = d / manifest.name
        path.write_text(json.dumps(m))
        out.append(path)
    return out


def test_analyze_skips_each_malformed_manifest_by_name(one_manifest, tmp_path, capsys):
    bad = _malformed_copies(one_manifest, tmp_path / "bad")
    assert main(["analyze", str(one_manifest), *map(str, bad), "--output-dir", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    for b in bad:
        assert f"skipped {b}" in err, err
    assert "Traceback" not in err


def test_report_only_on_malformed_manifest_is_one_line(one_manifest, tmp_path, capsys):
    for path in _malformed_copies(one_manifest, tmp_path / "bad")[:3]:  # the report needs no "best"
        refused_one_line(capsys, ["run", "--scheme-name", "fp8_autoquant_top25", "--output-dir", str(path.parent),
                          "--report-only"], "manifest")


# -- 4. sweep input gaps -------------------------------------------------------------------------------------


def test_string_where_list_belongs_is_refused_not_split(tiny_model_dir, tmp_path, capsys, no_ray):
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(f'name = "t"\nmodel_dir = "{tiny_model_dir}"\nschemes = "fp8_autoquant_top25"\n')
    refused_one_line(capsys, ["sweep", "--config", str(cfg)], "schemes must be a list of strings")
    cfg.write_text(f'name = "t"\nmodel_dir = "{tiny_model_dir}"\nmethods = "gradient"\n')
    refused_one_line(capsys, ["sweep", "--config", str(cfg)], "methods must be a list of strings")


def test_grid_with_no_runnable_trial_refused_before_ray(tiny_model_dir, tmp_path, capsys, no_ray, no_load):
    refused_one_line(capsys, _sweep_argv(tiny_model_dir, tmp_path, "--schemes", "nope,also_nope"), "none of the 2 trials")
    refused_one_line(capsys, _sweep_argv(tiny_model_dir, tmp_path, "--effective-bits", "7,4"), "between 8 and 16")
    refused_one_line(capsys, _sweep_argv(tiny_model_dir, tmp_path, "--methods", "bogus"), "method 'bogus' is unknown")
    assert not (tmp_path / "sweeps" / "s" / "autoquant").exists()


def test_non_integer_step_counts_refused_not_truncated(tiny_model_dir, tmp_path, capsys, no_ray):
    refused_one_line(capsys, _sweep_argv(tiny_model_dir, tmp_path, "--num-score-steps", "2.5"), "whole numbers")
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(f'name = "t"\nmodel_dir = "{tiny_model_dir}"\nnum_score_steps = [2.5, 4]\n')
    refused_one_line(capsys, ["sweep", "--config", str(cfg)], "num_score_steps must be a list of integers")
    cfg.write_text(f'name = "t"\nmodel_dir = "{tiny_model_dir}"\nnum_calib_steps = 3.7\n')
    refused_one_line(capsys, ["sweep", "--config", str(cfg)], "num_calib_steps must be an integer")


@pytest.mark.parametrize("name", ["../escape", "a/b", "/abs", "..", ".", "x\\y", ""])
def test_sweep_name_with_path_components_refused(tiny_model_dir, tmp_path, capsys, no_ray, name):
    argv = _sweep_argv(tiny_model_dir, tmp_path, name=name)
    refused_one_line(capsys, argv, "sweep name" if name else "'name' is missing")
    assert not (tmp_path / "escape").exists()


_HOLD_LOCK = """
import sys, time
from auto_quantize_model.sweep.lock import sweep_lock
with sweep_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_second_live_sweep_of_same_name_refused_and_dead_holder_does_not_block(tiny_model_dir, tmp_path, capsys,
                                                                                 monkeypatch):
    from auto_quantize_model.sweep.lock import sweep_lock

    sweep_dir = tmp_path / "sweeps" / "s"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(sweep_dir)], env=env, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        import ray

        monkeypatch.setattr(ray, "init", lambda *a, **k: (_ for _ in ()).throw(AssertionError("Ray started")))
        err = refused_one_line(capsys, _sweep_argv(tiny_model_dir, tmp_path), "already running")
        assert f"pid {holder.pid}" in err
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, as when a driver's machine dies
        holder.wait(30)
    with sweep_lock(sweep_dir):  # the dead holder's lock is gone with its process
        pass


# -- 5. interrupts, resume without unpickling, every failure a row -------------------------------------------


class _Poison:
    """Unpickling this writes a marker file: proof that someone unpickled the storage path's tuner.pkl."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "unpickled"))


@pytest.mark.timeout(900)
def test_sigint_marks_interrupted_then_resume_trusts_only_json(ray_cluster, tiny_model_dir, tmp_path):
    from auto_quantize_model.analysis import load_trials
    from auto_quantize_model.autoquant.manifest import manifest_path
    from auto_quantize_model.sweep.driver import run_sweep
    from auto_quantize_model.sweep.spec import expand_grid, load_sweep_spec

    storage = tmp_path / "sweeps"
    argv = ["sweep", "--name", "intr", "--model-dir", str(tiny_model_dir), "--storage-path", str(storage),
            "--captions-path", "demo", "--schemes", "fp8_autoquant_top25,fp8_autoquant_all_layers_fp8",
            "--effective-bits", "15,13,11", "--max-calib-samples", "8", "--calib-seq-len", "32",
            "--address", ray_cluster]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "auto_quantize_model.cli", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    sweep_dir = storage / "intr"
    trials_dir = sweep_dir / "autoquant" / "trials"
    deadline = time.time() + 400
    while time.time() < deadline and not list(trials_dir.glob("*/result.json")) and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal goes to the whole foreground group
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err[-4000:]
    summary = (sweep_dir / "summary.md").read_text()
    assert "Interrupted by SIGINT" in summary and "| interrupted |" in summary and "ERROR" not in summary
    assert "autoquant sweep --name intr" in err and "--resume" in err and "Tuner.restore" not in err
    done = {p.parent.name for p in trials_dir.glob("*/result.json")}
    assert 1 <= len(done) < 6

    spec = load_sweep_spec(None, {"name": "intr", "model_dir": str(tiny_model_dir), "storage_path": str(storage),
                                  "captions_path": "demo", "schemes": ("fp8_autoquant_top25", "fp8_autoquant_all_layers_fp8"),
                                  "effective_bits": (15.0, 13.0, 11.0), "max_calib_samples": 8,
                                  "calib_seq_len": 32})
    # A crafted Tune state in the storage path must not run: --resume trusts only our JSON markers.
    marker = tmp_path / "pwned"
    for pkl in [sweep_dir / "tuner.pkl", *sweep_dir.glob("**/*.pkl")]:
        pkl.write_bytes(pickle.dumps(_Poison(str(marker))))
    # One unfinished trial cannot write its manifest (a directory in the way): an OSError, not a UserError.
    broken = next(t for t in expand_grid(spec) if t.trial_id not in done)
    blocker = manifest_path(trials_dir / broken.trial_id, broken.scheme)
    (blocker / "x").mkdir(parents=True, exist_ok=True)
    res = run_sweep(spec, resume=True)
    assert not marker.exists(), "resume unpickled a file from the storage path"
    assert res["interrupted"] is None
    rows = {r["trial_id"]: r for r in res["rows"]}
    assert len(rows) == 6
    assert rows[broken.trial_id]["status"] == "error" and "Error" in rows[broken.trial_id]["error"]
    assert all(r["status"] == "ok" for tid, r in rows.items() if tid != broken.trial_id)
    assert all(rows[tid].get("from_previous_run") for tid in done)
    trials = load_trials(res["tables"])
    assert len(trials) == 6 and trials["trial_id"].is_unique
    failed = trials[trials["status"] == "error"]
    assert list(failed["trial_id"]) == [broken.trial_id] and failed["error"].iloc[0]


# -- 6. caption files ----------------------------------------------------------------------------------------


def test_txt_caption_starting_with_bracket_is_text(tmp_path):
    from auto_quantize_model.datasets.captions import read_captions

    f = tmp_path / "caps.txt"
    f.write_text("[draft] a cat on a mat\n{sic} two dogs\na bird\n", encoding="utf-8")
    src = read_captions(str(f))
    assert src.format == "text" and src.captions[:2] == ["[draft] a cat on a mat", "{sic} two dogs"]
    j = tmp_path / "caps.jsonl"
    j.write_text('{"caption": "one"}\n', encoding="utf-8")  # one record: still JSONL by its suffix
    assert read_captions(str(j)).captions == ["one"]


@pytest.mark.parametrize("kind", ["utf16", "utf16be", "binary", "latin1_mostly"])
def test_undecodable_caption_files_refused(tmp_path, kind):
    from auto_quantize_model.datasets.captions import read_captions

    text = "a cat on a mat\ntwo dogs play\na red bus\n"
    data = {"utf16": text.encode("utf-16"), "utf16be": text.encode("utf-16-be"),
            "binary": bytes(range(256)) * 8, "latin1_mostly": "caf\xe9 one\nna\xefve two\nbon\n".encode("latin-1")
            .replace(b"bon", b"b\xf6n")}[kind]
    f = tmp_path / "caps.txt"
    f.write_bytes(data)
    with pytest.raises(UserError, match="not UTF-8 text"):
        read_captions(str(f))


def test_warning_when_calibration_set_smaller_than_asked(loaded, tmp_path, caplog):
    from auto_quantize_model.datasets.calibration import build_calibration_set
    from auto_quantize_model.datasets.captions import read_captions

    f = tmp_path / "few.txt"
    f.write_text("a cat\na dog\na bird\n", encoding="utf-8")
    with caplog.at_level("WARNING", logger="auto_quantize_model.datasets.calibration"):
        calib = build_calibration_set(loaded.tokenizer, read_captions(str(f)), max_samples=64, batch_size=2, seq_len=16)
    assert calib.num_samples == 3
    assert any("fewer than the 64 asked" in r.getMessage() for r in caplog.records)


# -- 7. cluster use and file permissions ---------------------------------------------------------------------


def test_relative_paths_refused_under_ray_job_submit(tiny_model_dir, tmp_path, capsys, monkeypatch, no_ray):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray's job supervisor sets for the driver
    monkeypatch.chdir(tmp_path)
    argv = _sweep_argv(tiny_model_dir, tmp_path)
    argv[argv.index("--storage-path") + 1] = "runs/sweeps"
    refused_one_line(capsys, argv, "storage_path 'runs/sweeps' is relative")
    rel = os.path.relpath(tiny_model_dir, tmp_path)
    argv = _sweep_argv(rel, tmp_path)
    refused_one_line(capsys, argv, "model_dir")


def test_job_example_config_has_absolute_paths_and_loads(monkeypatch):
    from auto_quantize_model.preflight import check_job_paths
    from auto_quantize_model.sweep.spec import load_sweep_spec

    spec = load_sweep_spec(REPO / "examples" / "sweep_tiny_job.toml", {})
    assert Path(spec.storage_path).is_absolute() and Path(spec.model_dir).is_absolute()
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    check_job_paths(storage_path=spec.storage_path, model_dir=spec.model_dir)


def test_result_files_get_the_process_umask_not_0600(tmp_path):
    import pyarrow as pa

    from auto_quantize_model.io_utils import atomic_directory, atomic_write_json
    from auto_quantize_model.records.tables import write_table_file

    old = os.umask(0o022)
    try:
        f = atomic_write_json(tmp_path / "a.json", {"x": 1})
        t = write_table_file(tmp_path / "tables", "trials", "s", "t1", pa.table({"a": [1]}))
        with atomic_directory(tmp_path / "d") as d:
            (d / "f").write_text("x")
        os.umask(0o027)
        g = atomic_write_json(tmp_path / "b.json", {"x": 1})
    finally:
        os.umask(old)
    assert (f.stat().st_mode & 0o777) == 0o644
    assert (t.stat().st_mode & 0o777) == 0o644
    assert ((tmp_path / "d").stat().st_mode & 0o777) == 0o755
    assert (g.stat().st_mode & 0o777) == 0o640


_MULTINODE = r"""
import json, sys, threading, time
import ray
from ray.cluster_utils import Cluster
from auto_quantize_model.sweep.driver import run_sweep
from auto_quantize_model.sweep.spec import load_sweep_spec

model_dir, storage = sys.argv[1], sys.argv[2]
# Head: the driver and the pool only (0 CPUs); two 2-CPU nodes for the model worker and the trials.
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
cluster.wait_for_nodes()
ray.init(address=cluster.address, namespace="autoquant", log_to_driver=False)
spec = load_sweep_spec(None, {"name": "multi", "model_dir": model_dir, "storage_path": storage,
                              "captions_path": "demo", "schemes": ["fp8_autoquant_top25", "fp8_autoquant_all_layers_fp8"],
                              "effective_bits": [14.0, 12.0, 10.0], "max_calib_samples": 8, "calib_seq_len": 32,
                              "num_workers": 1, "max_failures": 3, "worker": {"num_gpus": 0, "num_cpus": 1}})
removed = []

def remover():
    deadline = time.time() + 400
    while time.time() < deadline and not removed:
        pools = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("autoquant-pool-multi")]
        if pools:
            try:
                busy = ray.get(ray.get_actor(pools[0]["name"], namespace="autoquant").stats.remote())["busy"]
            except (ValueError, ray.exceptions.RayActorError):
                busy = {}
            if busy:
                name = next(iter(busy))
                info = [a for a in ray._private.state.actors().values() if a.get("Name") == name and a["State"] == "ALIVE"]
                node = next((n for n in nodes if info and n.node_id == info[0]["Address"]["NodeID"]), None)
                if node is not None:
                    cluster.remove_node(node, allow_graceful=False)
                    removed.append(node.node_id)
                    return
        time.sleep(0.05)

t = threading.Thread(target=remover, daemon=True)
t.start()
res = run_sweep(spec)
t.join(5)
print("RESULT " + json.dumps({"removed": removed, "rows": [{k: r.get(k) for k in ("trial_id", "status", "error",
      "from_previous_run")} for r in res["rows"]], "tables": res["tables"], "sweep_dir": res["sweep_dir"]}), flush=True)
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.timeout(900)
@pytest.mark.slow
def test_two_node_cluster_survives_losing_the_worker_node(tiny_model_dir, tmp_path):
    """A 3-node local Ray (head + 2 nodes); the node holding the model worker is removed mid-trial."""
    from auto_quantize_model.analysis import load_layers, load_trials

    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    storage = tmp_path / "shared"
    proc = subprocess.run([sys.executable, "-c", _MULTINODE, str(tiny_model_dir), str(storage)], env=env,
                          capture_output=True, text=True, timeout=840)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT "):])
    assert res["removed"], "the test never caught a busy worker"
    rows = res["rows"]
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows), rows
    assert res["sweep_dir"] == str((storage / "multi").resolve())
    # Exactly once: one result.json per trial and one table row per trial, all on the shared storage path.
    assert len(list((storage / "multi" / "autoquant" / "trials").glob("*/result.json"))) == 6
    trials = load_trials(res["tables"])
    assert len(trials) == 6 and trials["trial_id"].is_unique and (trials["status"] == "ok").all()
    assert len(load_layers(res["tables"])) == 6 * 29
