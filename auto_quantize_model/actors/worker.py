"""The model worker: one actor per GPU that loads the LM and its data once and runs trials on it.

A trial with a new scoring key starts from a fresh copy of the pristine model (on the GPU beside the working copy
where the worker's share of GPU memory has room for it, else in pinned CPU memory, uploaded straight from the pinned
pages: :func:`pristine_fits_on_device`), checked before use: no quantizer modules, and logits on a probe batch
bit-identical to those at load time.
A trial with the same scoring key as the worker's last search re-solves on that searched model
(``resolve_budget``): every group's quantizer choice is set from the new solution, which a test shows equals a
fresh search from the checkpoint bit for bit.

Kept workers (``[worker] keep`` on a running cluster) outlive their sweep as detached actors; the next sweep with
the same model, data and worker settings attaches them to its pool (:meth:`ModelWorker.attach`) instead of
loading again.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path
from typing import Any

import ray

from auto_quantize_model.actors.placement import pristine_fits_on_device, worker_device
from auto_quantize_model.actors.trial import Trial, write_trial_error
from auto_quantize_model.timing import StepTimes

log = logging.getLogger(__name__)


THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_DYNAMIC", "MKL_DYNAMIC")  # reported by info()


class StaleWorkerError(RuntimeError):
    """A kept worker asked to serve a sweep whose load settings or code differ from its own."""


class WorkerBusyError(RuntimeError):
    """A kept worker asked to serve a sweep while another sweep still runs on it."""


class PristineModelError(RuntimeError):
    """The fresh copy of the model differs from the loaded one: refuse to run a trial on it."""


# ``attach``, ``busy`` and ``info`` answer while a trial runs (their own thread): a second sweep must learn at once
# that a kept worker is taken, not queue behind a scoring pass.
@ray.remote(max_restarts=-1, max_task_retries=0, concurrency_groups={"control": 1})
class ModelWorker:
    """Holds ``LoadedModel`` + calibration (+ evaluation) data; runs one trial per call."""

    def __init__(self, spec_dict: dict[str, Any], name: str, pool_name: str, namespace: str) -> None:
        t = time.perf_counter()
        phases = StepTimes()  # imports, load, data, probe, pristine copy, input stamp
        import torch

        from auto_quantize_model.actors.settings import WorkerSpec
        from auto_quantize_model.datasets.calibration import build_calibration_set
        from auto_quantize_model.datasets.captions import read_captions
        from auto_quantize_model.logs import setup_logging
        from auto_quantize_model.models.loading import load_language_model, model_class, read_checkpoint_config

        setup_logging(False)
        self.spec = WorkerSpec.from_sweep_dict(spec_dict)
        if self.spec.worker.num_threads:  # the driver also set OMP_NUM_THREADS for this process
            torch.set_num_threads(self.spec.worker.num_threads)
        self.name = name
        self.pool = self._find_pool(pool_name, namespace)
        self.pool_name: str | None = pool_name if self.pool is not None else None
        self.sweeps_served = 1
        # transformers and the model's class are imports too: the load phase is the weights' load alone.
        model_class(read_checkpoint_config(self.spec.model_dir))
        phases.done("imports")
        device = worker_device(self.spec.worker.num_gpus, torch.cuda.is_available())
        self.loaded = load_language_model(self.spec.model_dir, device=device, dtype=self.spec.dtype)
        phases.done("load")
        self.calib = build_calibration_set(
            self.loaded.tokenizer, read_captions(self.spec.captions_path), max_samples=self.spec.max_calib_samples,
            batch_size=self.spec.batch_size, seq_len=self.spec.calib_seq_len, seed=self.spec.seed,
            device=self.loaded.device, chat_template=self.spec.chat_template,
        )
        self.eval_data = self._eval_data() if self.spec.evaluate else None
        phases.done("data")
        self.meter = None  # opt-in measured cost; refuses a worker without an FP8-capable GPU, before any trial
        if self.spec.measure:
            from auto_quantize_model.inference.measure_run import CostMeter

            self.meter = CostMeter(self.loaded, self.calib, self.spec.measure_settings())
        # Keeps the last search: a trial with the same scoring key re-solves on that searched model in memory
        # instead of copying the pristine model and reloading scores (created with the first trial's cache dir).
        self.session = None
        self._leases: dict[int, list] = {}  # lease number -> [any trial ok, any trial scored, trials reusing scores]
        # The probe comes from the model as loaded, before it may move to the host: every fresh copy is checked
        # against it, so an error in making copies cannot hide behind a probe taken from a copy.
        self.probe = self._logits(self.loaded.model)
        phases.done("probe")
        self.pristine_on = self._place_pristine()
        phases.done("pristine")
        # What a kept worker holds, fixed now: the code it imported and the inputs it read (see attach).
        self.signature = self.spec.load_signature()
        self.inputs = self._inputs_stamp()
        phases.done("stamp")
        self.load_seconds = time.perf_counter() - t
        self.load_phases = phases.seconds
        self._init_metrics()
        log.info("worker %s ready on %s in %.2fs (%s; load read %.2f GB at %.2f GB/s; pristine copy on %s, "
                 "%d host threads)", name, device, self.load_seconds, phases, self.loaded.load_bytes / 1e9,
                 self.loaded.load_gb_per_s, self.pristine_on, torch.get_num_threads())

    # -- setup -------------------------------------------------------------------------------------

    def _eval_data(self):
        from auto_quantize_model.datasets.calibration import build_calibration_set
        from auto_quantize_model.datasets.captions import read_captions
        from auto_quantize_model.inference.compare import held_out_source

        fake_manifest = {"scheme": {"name": "calib"}, "calibration": self.calib.describe()}
        source, _ = held_out_source(read_captions(self.spec.eval_captions or self.spec.captions_path), [fake_manifest])
        return build_calibration_set(self.loaded.tokenizer, source, max_samples=self.spec.max_eval_samples,
                                     batch_size=self.spec.batch_size, seq_len=self.spec.calib_seq_len,
                                     seed=self.spec.seed + 1, device=self.loaded.device)

    def _find_pool(self, pool_name: str, namespace: str):
        """The sweep's lease pool; None when it is gone (a kept worker restarted after its sweep ended)."""
        try:
            return ray.get_actor(pool_name, namespace=namespace)
        except ValueError:
            if not self.spec.worker.keep:
                raise
            log.warning("worker %s: pool %s is gone; waiting for the next sweep to attach", self.name, pool_name)
            return None

    def _place_pristine(self) -> str:
        """Where the pristine copy lives: ``device`` (beside the working copy) or ``host`` (pinned CPU).

        ``auto`` keeps it on the GPU when this worker's share of the GPU's memory holds it with room to spare
        (:func:`pristine_fits_on_device`): a second copy there costs nothing at start, while moving it to pinned
        host memory took 2.7 s of the 3B worker's start on an H100 (mostly allocating the pinned block).
        Otherwise ``host``: one copy of the weights on the GPU, and a new search's working copy is uploaded straight
        from the pinned pages (``models/copies.py``).
        """
        want = self.spec.worker.pristine
        if self.loaded.device.type != "cuda":
            return "device"  # a CPU worker: the working copy is on the host anyway
        import torch

        from auto_quantize_model.models.loading import tensor_bytes

        share = torch.cuda.get_device_properties(self.loaded.device).total_memory * min(self.spec.worker.num_gpus, 1)
        if want == "cpu" or (want == "auto" and not pristine_fits_on_device(
                tensor_bytes(self.loaded.model), share, self.spec.batch_size * self.spec.calib_seq_len)):
            from auto_quantize_model.models.copies import move_to_pinned_host

            move_to_pinned_host(self.loaded.model)
            return "host"
        return "device"

    def _init_metrics(self) -> None:
        from ray.util.metrics import Counter, Gauge

        tags = {"worker": self.name}
        self.m_trials = Counter("autoquant_trials_done", "Trials finished by this worker", tag_keys=("worker", "status"))
        self.m_passes = Counter("autoquant_scoring_passes", "AutoQuant scoring passes run", tag_keys=("worker",))
        self.m_reuses = Counter("autoquant_score_reuses", "Trials that re-solved from cached scores", tag_keys=("worker",))
        self.m_gpu = Gauge("autoquant_gpu_memory_bytes", "Peak GPU memory of the last trial", tag_keys=("worker",))
        self.m_gpu.set(0, tags)

    # -- per trial ---------------------------------------------------------------------------------

    def _fresh_model(self):
        """A working copy of the pristine model on the compute device."""
        from auto_quantize_model.models.copies import copy_to_device

        if self.pristine_on == "device":
            return copy.deepcopy(self.loaded.model)
        return copy_to_device(self.loaded.model, self.loaded.device)

    def _checked_fresh_model(self):
        """A fresh working copy, refused unless it is bit-identical to the model as loaded."""
        work = self._fresh_model()
        self._check_pristine(work)
        return work

    def identity(self) -> dict[str, Any]:
        """This worker's model and data identity (the driver computes every trial's scoring key from it)."""
        from auto_quantize_model.autoquant.identity import DataIdentity

        return DataIdentity.of(self.loaded, self.calib).to_dict()

    def _logits(self, model):
        import torch

        with torch.no_grad():
            return self.loaded.forward_step(model, self.calib.batches[0]).detach().cpu()

    def _check_pristine(self, model) -> None:
        import torch
        from modelopt.torch.quantization.nn import TensorQuantizer

        if any(isinstance(m, TensorQuantizer) for m in model.modules()):
            raise PristineModelError(f"worker {self.name}: quantizers leaked into the pristine model")
        if not torch.equal(self._logits(model), self.probe):
            raise PristineModelError(f"worker {self.name}: fresh model outputs differ from the loaded model")

    def probe_matches(self) -> bool:
        """For tests: a fresh copy now gives bit-identical logits to the freshly loaded model."""
        try:
            self._check_pristine(self._fresh_model())
        except PristineModelError:
            return False
        return True

    def run_trial(self, trial: Trial, lease: dict[str, Any], out: dict[str, str],
                  release: bool = True) -> dict[str, Any]:
        """Run one trial end to end. With ``release`` (the last trial of its lease) the lease goes back to the pool
        afterwards, even on failure, saying whether any trial under it succeeded and whether any scored."""
        ok, scored = False, False
        if out.get("pool") and self.pool_name != out["pool"]:
            # A kept worker that Ray restarted mid-sweep came back with its first sweep's pool: follow the trial's.
            self.pool, self.pool_name = ray.get_actor(out["pool"], namespace=out["namespace"]), out["pool"]
        try:
            result = self._run(trial, out)
            ok = result["status"] == "ok"
            scored = bool(result.get("scored"))
            return result
        finally:
            held = self._leases.setdefault(lease["lease"], [False, False, 0])
            held[0] |= ok
            held[1] |= scored
            held[2] += ok and not scored
            if release:
                any_ok, any_scored, reused = self._leases.pop(lease["lease"])
                self.pool.release.remote(lease, any_ok, any_scored, reused)

    def _run(self, trial: Trial, out: dict[str, str]) -> dict[str, Any]:
        import torch

        from auto_quantize_model.autoquant.session import SearchSession
        from auto_quantize_model.errors import UserError, describe_io_failure
        from auto_quantize_model.inference.controls import evaluate_control
        from auto_quantize_model.inference.evaluate import evaluate_run, write_evaluation
        from auto_quantize_model.records.outcome import TrialOutcome
        from auto_quantize_model.records.tables import write_trial

        t0 = time.perf_counter()
        tid = trial.trial_id
        trial_dir = Path(out["trials"]) / tid
        sweep_id = out.get("sweep", self.spec.name)  # the context's (a restarted kept worker holds an old spec)
        common = {"scheme": trial.scheme, "sweep_id": sweep_id, "trial_id": tid}
        try:
            if trial.resolved is None:  # the driver keeps these back; should one come, it fails with its own error
                raise UserError(str(trial.error))
            scheme = trial.resolved  # resolved once on the driver: no catalog or schemes file read here
            if self.loaded.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            if self.session is None or self.session.cache_dir != Path(out["cache"]):
                # A kept worker serving a sweep with another cache starts a new session (its manifests must name
                # that cache); sweeps sharing a --cache-dir keep the last search and re-solve in memory.
                self.session = SearchSession(self.loaded, self.calib, out["cache"], fresh_model=self._checked_fresh_model)
            if trial.scoring_key not in (None, self.session.key(scheme)):
                raise RuntimeError(f"scoring key mismatch for {tid}: the driver and the worker see other data or weights")
            pass_ran, pass_s = False, 0.0
            if trial.scoring_pass and not self.session.can_resolve_in_memory(scheme):
                # One shared scoring pass serves every trial whose search differs only in its formats.
                outcome = self.session.run_pass(trial.scoring_pass)
                pass_ran, pass_s = outcome.ran, outcome.seconds
            result = self.session.run(scheme, trial_dir, run_id=tid, sweep_id=sweep_id)
            restore_s = self.session.last_copy_seconds
        except Exception as exc:  # noqa: BLE001 - any failure of this trial is recorded as its row, not lost
            io_failure = None if isinstance(exc, UserError) else describe_io_failure(exc)  # a full disk...
            error = str(exc) if isinstance(exc, UserError) else f"{exc.__class__.__name__}: {io_failure or exc}"
            if not isinstance(exc, UserError) and io_failure is None:
                log.exception("trial %s failed", tid)
            write_trial_error(out["tables"], sweep_id, trial, error)
            self.m_trials.inc(1, {"worker": self.name, "status": "error"})
            return {"status": "error", "error": error[:300], "trial": tid, "worker": self.name}
        metrics: dict[str, Any] = {}
        eval_s = 0.0
        # The unquantized model on the GPU, for evaluation and measurement alike: one upload per trial at most.
        reference = None
        if self.eval_data is not None or self.meter is not None:
            reference = self.loaded.model if self.pristine_on == "device" else self._fresh_model()
        if self.eval_data is not None:
            t = time.perf_counter()
            ev = evaluate_run(result.model, reference, self.eval_data, result.manifest, forward=self.loaded.forward_step)
            write_evaluation(trial_dir, ev)
            metrics = ev["metrics"]
            # The uniform FP8 PTQ control, once per calibration-step count (a record on disk is reused).
            evaluate_control(self.loaded, self.calib, self.eval_data, reference, trial.num_calib_steps,
                             out["trials"], out["tables"], sweep_id)
            eval_s = time.perf_counter() - t
        cost = None
        if self.meter is not None:  # real-FP8 prefill/decode tokens/s and weight bytes; writes measurement.json
            cost = self.meter.measure(reference, result.model, result.manifest, trial_dir)
        del reference
        m = result.manifest
        exportable = _exportable(result)
        # One row, built once: the trials table, Tune's report and the summary read the same fields.
        outcome = TrialOutcome.from_run(m, sweep_id=sweep_id, trial_id=tid, metrics=metrics,
                                        manifest_path=str(result.manifest_path), measurement=cost,
                                        equivalent_schemes=",".join(trial.equivalent_schemes), exportable=exportable)
        write_trial(out["tables"], m, metrics=metrics, manifest_path=str(result.manifest_path), measurement=cost,
                    equivalent_schemes=",".join(trial.equivalent_schemes), exportable=exportable, **common)
        peak = torch.cuda.max_memory_allocated() if self.loaded.device.type == "cuda" else 0
        tags = {"worker": self.name}
        scored = result.scored or pass_ran
        (self.m_passes if scored else self.m_reuses).inc(1, tags)
        self.m_trials.inc(1, {"worker": self.name, "status": "ok"})
        self.m_gpu.set(peak, tags)
        row = outcome.to_row()
        row.pop("trial_id")  # Tune overwrites a reported trial_id with its own; ours travels as "trial"
        row.pop("equivalent_schemes")  # the grid's trial holds it as a list (the table's comma-joined form is above)
        return {
            **row, "trial": tid, "worker": self.name, "scheme": trial.scheme,
            # This trial paid a scoring pass: its own search's, or the shared pass it ran for its lease key.
            "scored": scored, "time_scoring_pass": pass_s, "trial_dir": str(trial_dir), "gpu_peak_bytes": peak,
            "time_restore": restore_s, "time_write": m["timings"].get("write_restore", 0.0),
            "time_evaluate": eval_s, "time_trial": time.perf_counter() - t0, "worker_load_seconds": self.load_seconds,
            "worker_load_phases": self.load_phases, "worker_load_steps": self.loaded.load_steps,
        }

    def _inputs_stamp(self) -> list[str | None]:
        """Content of what this worker read: the weights' fingerprint (cached by file stat) and the caption files'
        hashes. Settings hold only paths; a file replaced in place must not be served from memory."""
        import hashlib

        from auto_quantize_model.models.fingerprint import weights_fingerprint

        def file_hash(path: str | None) -> str | None:
            if not path or not Path(path).is_file():
                return path  # built-in sources ("demo") and absent files: their name is their identity
            return hashlib.sha256(Path(path).read_bytes()).hexdigest()

        return [weights_fingerprint(self.spec.model_dir), file_hash(self.spec.captions_path),
                file_hash(self.spec.eval_captions)]

    @ray.method(concurrency_group="control")
    def attach(self, spec_dict: dict[str, Any], pool_name: str, namespace: str, signature: str) -> dict[str, Any]:
        """Serve another sweep (a kept worker): its settings and pool; the model and data stay loaded.

        Refused with ``StaleWorkerError`` unless ``signature`` (the driver's :meth:`WorkerSpec.load_signature` of
        the new sweep) equals the one this worker computed when it loaded (same settings, same code and library
        versions) and the weights and caption files still have the content it read; with ``WorkerBusyError`` while
        another sweep runs on it.
        """
        from auto_quantize_model.actors.settings import WorkerSpec

        if self.pool_name not in (None, pool_name) and self._pool_alive(namespace):
            # Every sweep stops its pool when it ends, so a live pool means a sweep still running on this worker.
            raise WorkerBusyError(f"worker {self.name} is serving a running sweep (pool {self.pool_name})")
        new = WorkerSpec.from_sweep_dict(spec_dict)
        if signature != self.signature or new.load_signature() != signature:
            raise StaleWorkerError(f"worker {self.name} was loaded with other settings or code")
        if self._inputs_stamp() != self.inputs:
            raise StaleWorkerError(f"worker {self.name}: the weights or captions changed on disk since it loaded")
        self.spec = new
        self.pool, self.pool_name = ray.get_actor(pool_name, namespace=namespace), pool_name
        self._leases.clear()
        self.sweeps_served += 1
        return self.info()

    @ray.method(concurrency_group="control")
    def detach(self) -> None:
        """The sweep this worker served has ended (its driver says so before stopping the pool)."""
        self.pool, self.pool_name = None, None

    @ray.method(concurrency_group="control")
    def busy(self, namespace: str) -> bool:
        """Whether a sweep is running on this worker (attached to a pool that is alive)."""
        return self.pool_name is not None and self._pool_alive(namespace)

    def _pool_alive(self, namespace: str) -> bool:
        try:
            ray.get_actor(self.pool_name, namespace=namespace)
        except ValueError:
            return False
        return True

    @ray.method(concurrency_group="control")
    def info(self) -> dict[str, Any]:
        """Where this worker runs (for the summary), and what it holds from earlier sweeps."""
        import torch

        return {"name": self.name, "device": str(self.loaded.device), "pid": os.getpid(),
                "num_threads": torch.get_num_threads(), "sweeps_served": self.sweeps_served,
                # Scoring keys whose searched model it keeps (the last and the parked ones): the pool prefers it for
                # trials of those keys.
                "warm_keys": self.session.warm_keys() if self.session is not None else [],
                "pristine_on": self.pristine_on, "load_seconds": self.load_seconds, "load_phases": self.load_phases,
                "load_steps": self.loaded.load_steps,
                "load_bytes": self.loaded.load_bytes, "load_gb_per_s": self.loaded.load_gb_per_s,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "thread_env": {k: os.environ.get(k) for k in THREAD_ENV}}


def _exportable(result: Any) -> bool:
    """Whether `autoquant export` takes the run's formats (export's own check; the trials table's ``exportable``)."""
    from auto_quantize_model.export.hf import export_blocker

    return export_blocker(result.manifest, Path(result.manifest_path).parent) is None
