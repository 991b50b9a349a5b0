"""Sweep settings (one frozen dataclass, from TOML and/or flags, declared once) and the trial grid they expand to.

The grid is schemes x effective-bits targets x any extra scheme settings (method, score steps). Each
trial gets a deterministic id from its settings, so a resumed sweep, a retried trial and the tables
all agree on which trial is which.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from auto_quantize_model.actors.settings import WorkerSettings
from auto_quantize_model.actors.trial import Trial
from auto_quantize_model.configs.schemes import Scheme, get_scheme, load_schemes_file, resolve_scheme
from auto_quantize_model.datasets.settings import CalibrationSettings
from auto_quantize_model.errors import UserError
from auto_quantize_model.io_utils import read_toml, sha256_json
from auto_quantize_model.path_names import check_path_name, is_path_name
from auto_quantize_model.settings import check_keys, required_settings, same_as, setting, table, validate_settings

log = logging.getLogger(__name__)
SWEEP_SPEC_VERSION = 1


def _data(name: str) -> Any:
    return same_as(CalibrationSettings, name)  # the run's calibration setting: same flag, default, help, range


@dataclass(frozen=True)
class SweepSpec:
    """Everything a sweep needs; ``to_dict`` is recorded beside the results.

    Each field declares its TOML key (its name), flag, help and range once (``settings.setting``); the
    ``autoquant sweep`` flags, the TOML checks and the checks run on construction are generated from them.
    """

    name: str = setting(kind="str", flag="--name", help="sweep name (directory under --storage-path)")
    model_dir: str = setting(kind="str", flag="--model-dir", help="local Hugging Face checkpoint")
    storage_path: str = setting("runs/sweeps", kind="str", flag="--storage-path",
                                help="results root; shared storage on multi-node clusters")
    captions_path: str | None = _data("captions_path")
    schemes: tuple[str, ...] = setting(("fp8_autoquant_top25", "fp8_autoquant_top50", "fp8_autoquant_full",
                                        "fp8_autoquant_all_layers_fp8"), kind="list[str]", flag="--schemes",
                                       nonempty=True, note="list at least one scheme",
                                       help="comma-separated scheme names")
    effective_bits: tuple[float, ...] = setting((), kind="list[number]", flag="--effective-bits",
                                                help="comma-separated targets, e.g. 14,12,10,8")  # (): each scheme's own
    methods: tuple[str, ...] = setting((), kind="list[str]", flag="--methods",
                                       help="comma-separated: gradient,kl_div")  # (): each scheme's own method
    num_score_steps: tuple[int, ...] = setting((), kind="list[int]", flag="--num-score-steps", positive=True,
                                               help="comma-separated scoring step counts")  # (): each scheme's own
    num_calib_steps: int | None = setting(None, kind="int?", flag="--num-calib-steps",
                                          help="calibration batches of every trial (default: each scheme's own; all loaded batches)")
    schemes_file: str | None = setting(None, kind="str?", flag="--schemes-file",
                                       help="TOML file with extra [schemes.NAME] tables")
    max_calib_samples: int = _data("max_calib_samples")
    batch_size: int = _data("batch_size")
    calib_seq_len: int = _data("calib_seq_len")
    chat_template: bool = _data("chat_template")
    seed: int = _data("seed")
    dtype: str = setting("auto", kind="str", flag="--dtype",
                         help="auto (bf16 on GPU, float32 on CPU), bfloat16, float32, float16")
    num_workers: int = setting(0, kind="int", flag="--num-workers", minimum=0,
                               help="model workers (default: one per GPU)")  # 0: one per GPU (or 1 without GPUs)
    max_failures: int = setting(2, kind="int", flag="--max-failures", minimum=0,
                                help="retries of a trial whose worker died (default 2)")
    evaluate: bool = setting(False, kind="bool", flag="--evaluate",
                             help="perplexity/KL vs the unquantized model for every trial, and the uniform FP8 control")
    eval_captions: str | None = setting(None, kind="str?", flag="--eval-captions",
                                        help="held-out captions for --evaluate (default: the calibration source)")
    max_eval_samples: int = setting(32, kind="int", flag="--max-eval-samples", positive=True,
                                    help="held-out captions drawn for --evaluate (default 32)")
    # Opt-in: each trial's real FP8 prefill/decode tokens/s and weight memory vs BF16 and uniform FP8, on the
    # worker's GPU (inference/measure_run.py); prefill at measure_batch_size x measure_seq_len tokens.
    measure: bool = setting(False, kind="bool", flag="--measure",
                            help="GPU only: each trial's real FP8 prefill/decode tokens/s and LM weight memory vs BF16 "
                                 "and uniform FP8 (measurement.json, trials table)")
    measure_batch_size: int = setting(4, kind="int", flag="--measure-batch-size", positive=True,
                                      help="prefill batch for --measure (default 4)")
    measure_seq_len: int = setting(512, kind="int", flag="--measure-seq-len", positive=True,
                                   help="prefill tokens per sequence for --measure (default 512)")
    address: str | None = setting(None, kind="str?", flag="--address",
                                  help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    # Tune starts while workers load; once every worker is loaded and attached (a repeat sweep on kept workers) its
    # start is the longest wait before the first trial, and the driver's own threads schedule instead.
    scheduler: str = setting("auto", kind="str", flag="--scheduler", choices=("auto", "tune", "direct"),
                             help="who runs the trials on the workers: tune, direct (the driver's threads) or auto "
                                  "(direct when every worker is a kept one, already loaded; default)")
    # ModelOpt search checkpoints (one per scoring key). Default: <sweep>/autoquant/cache. Sweeps that point at
    # one cache reuse each other's calibration and scores (keyed by weights, data and formats, so never wrongly).
    cache_dir: str | None = setting(None, kind="str?", flag="--cache-dir",
                                    help="search checkpoints shared across sweeps (default: <sweep>/autoquant/cache)")
    # table() is a dataclasses.field with default_factory=WorkerSettings: no instance shared between specs.
    worker: WorkerSettings = table(WorkerSettings, help="resources and memory policy of each model worker")  # noqa: RUF009

    def __post_init__(self) -> None:
        # Types and ranges of every field, whether it came from TOML, flags or Python; lists become tuples and
        # the budgets floats (TOML's [14, 12] are integers), so one type reaches the summary.
        validate_settings(self, "sweep setting")
        check_sweep_name(self.name)
        if self.measure and self.worker.num_gpus <= 0:
            raise UserError("measure times FP8 kernels on the workers' GPUs, but worker.num_gpus is 0 (CPU workers): "
                            "give workers a GPU or drop measure")

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


def load_sweep_spec(path: str | Path | None, overrides: dict[str, Any]) -> SweepSpec:
    """TOML file (optional) then explicit overrides (None = not given; a ``worker`` dict updates the TOML's
    ``[worker]`` table); the spec checks itself when built."""
    data: dict[str, Any] = {}
    if path:
        data = read_toml(path, "sweep config", "pass a TOML file (see examples/ or the README)")
        data.pop("schema_version", None)
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    check_keys("sweep setting", data, SweepSpec)
    for required, s in required_settings(SweepSpec):
        if not data.get(required):
            raise UserError(f"sweep setting {required!r} is missing; give {s.flag} or set it in the TOML")
    return SweepSpec(**data)


def check_sweep_name(name: str) -> None:
    """A sweep name is one directory name: Tune and our outputs must both land under the storage path."""
    check_path_name(name, "sweep name", "put the parent directories in --storage-path instead")


def trial_id(*, scheme: str, effective_bits_target: float, method: str, num_score_steps: int | None,
             num_calib_steps: int | None, scheme_ref: str | None = None) -> str:
    """Readable and deterministic: ``<scheme>-b<bits>-<method>-s<steps>-<hash>``."""
    # The hash keeps the key names ids were first made with ("effective_bits"): resume finds trials by id.
    settings: dict[str, Any] = {"scheme": scheme, "effective_bits": float(effective_bits_target), "method": method,
                                "num_score_steps": num_score_steps, "num_calib_steps": num_calib_steps}
    if scheme_ref is not None:
        settings["scheme_ref"] = scheme_ref
    h = sha256_json(settings)[:8]
    steps = num_score_steps if num_score_steps else "auto"
    # Trial ids name Tune's trial directories and our trial folders and table files.
    return check_path_name(f"{scheme}-b{effective_bits_target:g}-{method}-s{steps}-{h}", "trial id",
                           "use a shorter scheme name")


def experiment_key(scheme: Scheme) -> str:
    """What makes two trials one experiment: the resolved search and budget, not the scheme's name.

    Formats by ModelOpt's signature (order-free: ModelOpt sorts them), method, scoring and calibration
    steps as asked, the resolved search and budget exclusions, and the effective-bits target.
    """
    from auto_quantize_model.format_facts import format_signature

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
    if spec.schemes_file:
        load_schemes_file(spec.schemes_file)  # a bad file (a scheme name that is no file name...) is one line
    for ref in spec.schemes:
        base, lookup_error = _lookup(ref, spec.schemes_file)  # once per entry: every point resolves from it
        if base is None and lookup_error is not None and not is_path_name(ref):
            # Its trial id would be a path (Tune's trial directory, our trial folder): refuse the sweep instead.
            raise UserError(lookup_error)
        bits_axis = spec.effective_bits or ((base.effective_bits,) if base else (16.0,))
        method_axis = spec.methods or ((base.method,) if base else ("gradient",))
        # A recipe's score_size stays in charge unless the sweep sets steps (None = the scheme's own).
        steps_axis = spec.num_score_steps or ((None if base.score_size else base.num_score_steps,) if base else (16,))
        name = base.name if base else ref
        for bits, method, steps in itertools.product(bits_axis, method_axis, steps_axis):
            settings: dict[str, Any] = {
                "scheme": name, "scheme_ref": ref if name != ref else None, "effective_bits_target": float(bits),
                "method": method, "num_score_steps": None if steps is None else int(steps),
                "num_calib_steps": spec.num_calib_steps or (base.num_calib_steps if base else None)}
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


def provisional_identity(spec: SweepSpec, num_captions: int) -> dict[str, Any]:
    """A stand-in for the workers' model and data identity, from the settings and the caption count alone, so that
    Tune can start while the workers load. Grouping trials by keys computed from it only shapes the Tune trials: the
    keys the trials run, cache and lease under come from the real identity (:func:`keyed_units`). Its batch count is
    the calibration set's (``max_calib_samples`` captions at most, in batches of ``batch_size``), because steps past
    the end of the data make searches equal."""
    from auto_quantize_model.autoquant.identity import DataIdentity

    samples = min(spec.max_calib_samples, num_captions)
    return DataIdentity(weights_fingerprint="pending", config_hash="pending", dtype=spec.dtype, scope="pending",
                        calibration_hash="pending", num_batches=-(-samples // spec.batch_size),
                        batch_size=spec.batch_size).to_dict()


def keyed_units(units: list[dict[str, Any]], keyed: list[Trial]) -> dict[str, list[dict[str, Any]]]:
    """Each unit's trials with their real scoring keys (``assign_scoring_keys`` on the workers' identity), ordered
    by lease key, then scoring key: one lease per lease key, and the same scoring key back to back."""
    by_id = {t.trial_id: t for t in keyed}
    out = {}
    for u in units:
        trials = sorted((by_id[t["trial_id"]] for t in u["trials"]),
                        key=lambda t: (str(t.lease_key), str(t.scoring_key)))
        out[u["unit_id"]] = [t.to_dict() for t in trials]
    return out
