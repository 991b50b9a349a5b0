"""Sweep settings (one frozen dataclass, from TOML and/or flags) and the trial grid they expand to.

The grid is schemes x effective-bits targets x any extra scheme settings (method, score steps). Each
trial gets a deterministic id from its settings, so a resumed sweep, a retried trial and the tables
all agree on which trial is which.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from auto_quantize_model.actors.settings import WorkerSettings
from auto_quantize_model.actors.trial import Trial
from auto_quantize_model.config_types import check_table
from auto_quantize_model.configs.schemes import Scheme, get_scheme, resolve_scheme
from auto_quantize_model.errors import UserError
from auto_quantize_model.io_utils import read_toml, sha256_json

log = logging.getLogger(__name__)
SWEEP_SPEC_VERSION = 1
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class SweepSpec:
    """Everything a sweep needs; ``to_dict`` is recorded beside the results."""

    name: str
    model_dir: str
    storage_path: str = "runs/sweeps"
    captions_path: str | None = None
    schemes: tuple[str, ...] = ("fp8_autoquant_top25", "fp8_autoquant_top50", "fp8_autoquant_full",
                                "fp8_autoquant_all_layers_fp8")
    effective_bits: tuple[float, ...] = ()  # empty: each scheme's own default
    methods: tuple[str, ...] = ()  # empty: each scheme's own method
    num_score_steps: tuple[int, ...] = ()  # empty: each scheme's own
    num_calib_steps: int | None = None
    schemes_file: str | None = None
    max_calib_samples: int = 1024  # ModelOpt hf_ptq's defaults (see datasets/calibration.py)
    batch_size: int = 8
    calib_seq_len: int = 512
    chat_template: bool = False  # wrap captions in the checkpoint's chat template
    seed: int = 0
    dtype: str = "auto"
    num_workers: int = 0  # 0: one per GPU in the cluster (or 1 without GPUs)
    max_failures: int = 2  # retries of a trial whose worker died
    evaluate: bool = False
    eval_captions: str | None = None
    max_eval_samples: int = 32
    # Opt-in: each trial's real FP8 prefill/decode tokens/s and weight memory vs BF16 and uniform FP8, on the
    # worker's GPU (inference/measure_run.py); prefill at measure_batch_size x measure_seq_len tokens.
    measure: bool = False
    measure_batch_size: int = 4
    measure_seq_len: int = 512
    address: str | None = None
    # ModelOpt search checkpoints (one per scoring key). Default: <sweep>/autoquant/cache. Sweeps that point at
    # one cache reuse each other's calibration and scores (keyed by weights, data and formats, so never wrongly).
    cache_dir: str | None = None
    worker: WorkerSettings = field(default_factory=WorkerSettings)

    def __post_init__(self) -> None:
        for key in ("schemes", "effective_bits", "methods", "num_score_steps"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
        # One type for the budget from TOML or flags to the summary: a float (TOML [14, 12] are integers).
        object.__setattr__(self, "effective_bits", tuple(float(b) for b in self.effective_bits))
        if isinstance(self.worker, dict):
            object.__setattr__(self, "worker", WorkerSettings(**self.worker))

    @property
    def sweep_dir(self) -> Path:
        """Tune's experiment directory; our trials, tables and score cache live under it too."""
        return Path(self.storage_path).resolve() / self.name

    def measure_settings(self) -> Any:
        """The :class:`MeasureSettings` of ``measure`` (decode shape, repeats and warm-up at their defaults)."""
        from auto_quantize_model.inference.measure import MeasureSettings

        return MeasureSettings(batch_size=self.measure_batch_size, seq_len=self.measure_seq_len)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, versioned."""
        return {"schema_version": SWEEP_SPEC_VERSION, **dataclasses.asdict(self)}


_FIELDS = {f.name for f in dataclasses.fields(SweepSpec)}
# What each setting must be in TOML or flags (config_types kinds); checked before any dataclass is built.
SPEC_KINDS = {
    "name": "str", "model_dir": "str", "storage_path": "str", "captions_path": "str?", "schemes": "list[str]",
    "effective_bits": "list[number]", "methods": "list[str]", "num_score_steps": "list[int]",
    "num_calib_steps": "int?", "schemes_file": "str?", "max_calib_samples": "int", "batch_size": "int",
    "calib_seq_len": "int", "seed": "int", "dtype": "str", "num_workers": "int", "max_failures": "int",
    "evaluate": "bool", "eval_captions": "str?", "max_eval_samples": "int", "address": "str?",
    "measure": "bool", "measure_batch_size": "int", "measure_seq_len": "int", "cache_dir": "str?",
}
WORKER_KINDS = {"num_gpus": "number", "num_cpus": "number", "pristine": "str", "num_threads": "int", "keep": "bool"}


def load_sweep_spec(path: str | Path | None, overrides: dict[str, Any]) -> SweepSpec:
    """TOML file (optional) then explicit overrides (None = not given); validates the result."""
    data: dict[str, Any] = {}
    if path:
        data = read_toml(path, "sweep config", "pass a TOML file (see examples/ or the README)")
        data.pop("schema_version", None)
    data.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise UserError(f"unknown sweep settings {unknown}; allowed: {sorted(_FIELDS)}")
    for required in ("name", "model_dir"):
        if not data.get(required):
            raise UserError(f"sweep setting {required!r} is missing; give --{required.replace('_', '-')} or set it in the TOML")
    check_table("sweep setting", data, SPEC_KINDS)
    if "worker" in data and not isinstance(data["worker"], dict | WorkerSettings):
        raise UserError(f"sweep setting worker must be a [worker] table, got {data['worker']!r}")
    if isinstance(data.get("worker"), dict):
        check_table("sweep setting worker", data["worker"], WORKER_KINDS)
        try:
            data["worker"] = WorkerSettings(**data["worker"])
        except TypeError as exc:
            raise UserError(f"bad [worker] table: {exc}") from exc
    spec = SweepSpec(**data)
    _validate(spec)
    return spec


def _validate(spec: SweepSpec) -> None:
    check_sweep_name(spec.name)
    for key in ("max_calib_samples", "batch_size", "calib_seq_len", "max_eval_samples", "measure_batch_size",
                "measure_seq_len"):
        if getattr(spec, key) <= 0:
            raise UserError(f"sweep setting {key} must be positive, got {getattr(spec, key)}")
    if spec.num_workers < 0 or spec.max_failures < 0:
        raise UserError("num_workers and max_failures must be >= 0")
    if not spec.schemes:
        raise UserError("the sweep has no schemes; list at least one")
    if spec.worker.pristine not in ("gpu", "cpu", "auto"):
        raise UserError(f"worker.pristine must be gpu, cpu or auto, got {spec.worker.pristine!r}")
    if spec.worker.num_threads < 0:
        raise UserError("worker.num_threads must be >= 0 (0: the cluster's CPUs shared out among the workers)")
    if spec.worker.num_cpus <= 0:
        raise UserError("worker.num_cpus must be > 0 (a 0-CPU actor cannot run the model's host code)")
    if any(s <= 0 for s in spec.num_score_steps):
        raise UserError("num_score_steps entries must be positive")
    if spec.measure and spec.worker.num_gpus <= 0:
        raise UserError("measure times FP8 kernels on the workers' GPUs, but worker.num_gpus is 0 (CPU workers): "
                        "give workers a GPU or drop measure")


def check_sweep_name(name: str) -> None:
    """A sweep name is one directory name: Tune and our outputs must both land under the storage path."""
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise UserError(f"sweep name {name!r} must be one directory name (letters, digits, '.', '_', '-'; no '/' "
                        "or '..'); put the parent directories in --storage-path instead")


def trial_id(*, scheme: str, effective_bits_target: float, method: str, num_score_steps: int | None,
             num_calib_steps: int, scheme_ref: str | None = None) -> str:
    """Readable and deterministic: ``<scheme>-b<bits>-<method>-s<steps>-<hash>``."""
    # The hash keeps the key names ids were first made with ("effective_bits"): resume finds trials by id.
    settings: dict[str, Any] = {"scheme": scheme, "effective_bits": float(effective_bits_target), "method": method,
                                "num_score_steps": num_score_steps, "num_calib_steps": num_calib_steps}
    if scheme_ref is not None:
        settings["scheme_ref"] = scheme_ref
    h = sha256_json(settings)[:8]
    steps = num_score_steps if num_score_steps else "auto"
    return f"{scheme}-b{effective_bits_target:g}-{method}-s{steps}-{h}"


def experiment_key(scheme: Scheme) -> str:
    """What makes two trials one experiment: the resolved search and budget, not the scheme's name.

    Formats by ModelOpt's signature (order-free: ModelOpt sorts them), method, scoring and calibration
    steps as asked, the resolved search and budget exclusions, and the effective-bits target.
    """
    from auto_quantize_model.modelopt_configs import format_signature

    setup = scheme.search_setup()
    return sha256_json({
        "formats": sorted(format_signature(f) for f in scheme.quantization_formats), "method": scheme.method,
        "num_score_steps": scheme.num_score_steps if scheme.score_size is None else None,
        "score_size": scheme.score_size, "num_calib_steps": scheme.num_calib_steps,
        "disabled": sorted(setup.disabled_layers), "cost_excluded": sorted(setup.cost_excluded_layers),
        "effective_bits": float(scheme.effective_bits),
    })[:16]


def _lookup(name: str, schemes_file: str | None) -> tuple[Scheme | None, str | None]:
    """A scheme (catalog, schemes file or ModelOpt recipe) or the one-line reason it is none."""
    try:
        return get_scheme(name, schemes_file), None
    except UserError as exc:
        return None, str(exc)


def _resolve(base: Scheme, **overrides: Any) -> tuple[Scheme | None, str | None]:
    """``base`` with a grid point's settings applied, or the one-line reason it cannot be (e.g. the budget)."""
    try:
        return resolve_scheme(base, **overrides), None
    except UserError as exc:
        return None, str(exc)


def expand_grid(spec: SweepSpec) -> list[Trial]:
    """One trial per experiment, each resolved here, once, with the schemes file (the workers run it as is).

    A scheme that is unknown or a budget it cannot reach still becomes a trial, carrying its error: it fails
    alone, recorded. Two grid points whose resolved search and budget are identical (``experiment_key``; e.g.
    top25 and top50 once a sweep overrides the budget) are one trial, run once, listing the other names in
    ``equivalent_schemes``.
    """
    points: list[tuple[dict[str, Any], list[str]]] = []  # a trial's fields, its equivalent names (still growing)
    seen: set[str] = set()
    by_experiment: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for ref in spec.schemes:
        base, lookup_error = _lookup(ref, spec.schemes_file)  # once per entry: every point resolves from it
        bits_axis = spec.effective_bits or ((base.effective_bits,) if base else (16.0,))
        method_axis = spec.methods or ((base.method,) if base else ("gradient",))
        # A recipe's score_size stays in charge unless the sweep sets steps (None = the scheme's own).
        steps_axis = spec.num_score_steps or ((None if base.score_size else base.num_score_steps,) if base else (16,))
        name = base.name if base else ref
        for bits, method, steps in itertools.product(bits_axis, method_axis, steps_axis):
            settings: dict[str, Any] = {
                "scheme": name, "scheme_ref": ref if name != ref else None, "effective_bits_target": float(bits),
                "method": method, "num_score_steps": None if steps is None else int(steps),
                "num_calib_steps": spec.num_calib_steps or (base.num_calib_steps if base else 16)}
            tid = trial_id(**settings)
            if tid in seen:
                continue
            seen.add(tid)
            resolved, error = (None, lookup_error) if base is None else _resolve(
                base, effective_bits=bits, method=method, num_score_steps=steps,
                num_calib_steps=settings["num_calib_steps"])
            ekey = experiment_key(resolved) if resolved is not None else None
            if ekey is not None and ekey in by_experiment:
                first, names = by_experiment[ekey]
                if name != first["scheme"] and name not in names:
                    names.append(name)
                log.warning("%s at %g bits is the same experiment as %s (same formats, exclusions, method, steps "
                            "and budget): run once, reported under both names", name, bits, first["trial_id"])
                continue
            point: tuple[dict[str, Any], list[str]] = (
                {**settings, "trial_id": tid, "resolved": resolved, "error": error, "experiment_key": ekey}, [])
            if ekey is not None:
                by_experiment[ekey] = point
            points.append(point)
    return [Trial(**fields, equivalent_schemes=tuple(names)) for fields, names in points]


def assign_scoring_keys(trials: list[Trial], identity: dict[str, Any]) -> list[Trial]:
    """The trials with ``scoring_key``, ``lease_key`` and ``scoring_pass`` set by the run's own identity function;
    a trial that did not resolve comes back as it was (no key: it fails alone).

    Trials whose searches differ only in their candidate formats share one scoring pass (``autoquant/passes.py``):
    they carry the pass (union scheme and members) and lease under the pass's key, so the pool lets one worker
    run it while the others wait, then serves them all from the cache.
    """
    from auto_quantize_model.autoquant.identity import DataIdentity, scoring_key
    from auto_quantize_model.autoquant.passes import plan_passes

    base = DataIdentity(**identity)
    keys = {t.trial_id: scoring_key(base, t.resolved) for t in trials if t.resolved is not None}
    plan = plan_passes(base, [t.resolved for t in trials if t.resolved is not None])
    out = []
    for t in trials:
        key = keys.get(t.trial_id)
        sp = plan.get(key) if key else None
        out.append(dataclasses.replace(t, scoring_key=key, scoring_pass=sp, lease_key=sp.key(base) if sp else key))
    return out


def group_units(trials: list[Trial], num_workers: int) -> list[dict[str, Any]]:
    """Tune trials ("units", JSON-ready for Tune's param_space): the sweep's trials grouped by lease key, each group
    run on one leased worker.

    Trials of one lease key share a scoring pass, so they run one after another anyway (the first scores, the
    rest re-solve, in memory where the scoring key repeats); one Tune trial per group pays Tune's per-trial
    start, report and bookkeeping once per group instead of once per budget. Where there are fewer groups than
    workers, the largest groups are split so every worker gets work (a split part waits for the pass, then
    re-solves from the cache). Trials without a lease key are units of their own.
    """
    groups: dict[str, list[Trial]] = {}
    for t in trials:
        groups.setdefault(t.lease_key or f"trial:{t.trial_id}", []).append(t)
    # Same scoring key back to back: every trial after the first of a key re-solves in memory.
    units = [sorted(g, key=lambda t: str(t.scoring_key)) for g in groups.values()]
    while len(units) < num_workers:
        big = max(range(len(units)), key=lambda i: len(units[i]))
        if len(units[big]) < 2:
            break
        u = units.pop(big)
        half = (len(u) + 1) // 2
        units[big:big] = [u[:half], u[half:]]
    return [{"unit_id": f"u{i:03d}-{u[0].trial_id}", "lease_key": u[0].lease_key, "trials": [t.to_dict() for t in u]}
            for i, u in enumerate(units)]
