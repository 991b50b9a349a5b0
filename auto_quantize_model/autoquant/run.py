"""Run one AutoQuant scheme on an already-loaded language model.

``run_scheme`` is the pure function the CLI and the sweep both call: no argument parsing, no model
loading. It keeps ModelOpt's search checkpoint in a score cache keyed by everything that changes
calibration or scores (formats, method, steps, disabled layers, calibration tokens, model config), so
a run that differs only in effective bits re-solves in about a second instead of re-scoring.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from auto_quantize_model.autoquant.cache import CacheEntry, SearchCache
from auto_quantize_model.autoquant.identity import DataIdentity, effective_steps, scoring_key
from auto_quantize_model.autoquant.layers import check_formats_labelled
from auto_quantize_model.autoquant.manifest import build_manifest, manifest_path, write_manifest
from auto_quantize_model.autoquant.passes import ScoringPass, derive_state, raw_scores
from auto_quantize_model.autoquant.report import render_report, report_path
from auto_quantize_model.autoquant.restore import restore_path, save_restore_artifact
from auto_quantize_model.configs.schemes import Scheme
from auto_quantize_model.datasets.calibration import IGNORE_INDEX, usage
from auto_quantize_model.datasets.protocol import CalibrationData
from auto_quantize_model.errors import UserError, check_output_dir
from auto_quantize_model.io_utils import atomic_write_text
from auto_quantize_model.modelopt_configs import (
    format_effective_bits,
    format_folds_weights,
    format_signature,
    resolve_quant_config,
)
from auto_quantize_model.models.loading import LoadedModel

log = logging.getLogger(__name__)


def forward_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits for a calibration batch (what ``auto_quantize`` calls for calibration and scoring).

    Text batches go through the LM-only module; image-caption batches through the whole VLM.
    """
    if "pixel_values" in batch:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"], use_cache=False).logits
    return model(batch["input_ids"], batch["attention_mask"])


def next_token_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over non-pad positions."""
    shift_logits = logits[:, :-1].float()
    shift_labels = batch["labels"][:, 1:]
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX)


@dataclass
class RunResult:
    """What a finished run hands back to its caller."""

    model: nn.Module
    search_state: dict[str, Any]
    manifest: dict[str, Any]
    manifest_path: Path | None
    report_path: Path | None
    restore_path: Path | None
    scored: bool


def score_cache_key(loaded: LoadedModel, calib: CalibrationData, scheme: Scheme) -> str:
    """The scoring identity of ``scheme`` on this model and data (:func:`identity.scoring_key`)."""
    return scoring_key(DataIdentity.of(loaded, calib), scheme)


def folds_weights(scheme: Scheme) -> bool:
    """Whether a format of ``scheme`` folds scales into the weights (SmoothQuant, AWQ): then the searched
    model's weights are no longer the checkpoint's, and only a search from pristine weights is correct."""
    return any(format_folds_weights(f) for f in scheme.quantization_formats)


def unreachable_budget(scheme: Scheme, lowest: float) -> UserError:
    """The one refusal for a budget below what the searchable layers can reach, on every path."""
    return UserError(f"scheme {scheme.name}: effective bits {scheme.effective_bits:g} is infeasible: the lowest "
                     f"achievable with these formats and disabled layers is {lowest:.4g}; choose a higher "
                     "--effective-bits or disable fewer layers")


class _PhaseClock:
    """Splits one ``auto_quantize`` call into calibrate / score / solve by watching its callbacks.

    Calibration only calls ``forward_step``; gradient scoring is the first call of the loss; the solve
    is what remains after the last callback. For ``kl_div`` (no loss) calibrate and score are merged.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first_loss: float | None = None
        self.last_call: float | None = None

    def wrap_forward(self, fn):
        def inner(model, batch):
            out = fn(model, batch)
            self.last_call = time.perf_counter()
            return out

        return inner

    def wrap_loss(self, fn):
        def inner(out, batch):
            if self.first_loss is None:
                self.first_loss = time.perf_counter()
            loss = fn(out, batch)
            self.last_call = time.perf_counter()
            return loss

        return inner

    def split(self, end: float, method: str) -> dict[str, float | None]:
        if self.last_call is None:  # everything came from the cache
            return {"calibrate": 0.0, "score": 0.0, "solve": end - self.start}
        if method == "gradient" and self.first_loss is not None:
            return {"calibrate": self.first_loss - self.start, "score": self.last_call - self.first_loss,
                    "solve": end - self.last_call}
        return {"calibrate": None, "score": None, "calibrate_and_score": self.last_call - self.start,
                "solve": end - self.last_call}


def run_scheme(
    loaded: LoadedModel,
    calib: CalibrationData,
    scheme: Scheme,
    output_dir: str | Path,
    *,
    cache_dir: str | Path | None = None,
    inplace: bool = False,
    write: bool = True,
    run_id: str | None = None,
    sweep_id: str | None = None,
) -> RunResult:
    """Search FP8/BF16 per layer group for ``scheme`` and write manifest, report and restore artifact.

    ``scheme`` must already be resolved (:func:`resolve_scheme`). Unless ``inplace``, the search runs
    on a deep copy, so ``loaded.model`` stays pristine for the next scheme.
    """
    output_dir = Path(output_dir)
    check_output_dir(output_dir)
    check_formats_labelled(scheme.quantization_formats)  # fail in the first second, not after the search
    cache_dir = Path(cache_dir) if cache_dir else output_dir / "autoquant_cache"
    identity = DataIdentity.of(loaded, calib)
    key = scoring_key(identity, scheme)
    steps = effective_steps(scheme, identity.num_batches, identity.batch_size)
    t_start = time.perf_counter()
    model = loaded.model if inplace else copy.deepcopy(loaded.model)
    copy_seconds = time.perf_counter() - t_start

    with SearchCache(cache_dir).entry(key, identity.to_dict()) as entry:
        log.info("scheme %s: target %.3g bits, formats %s, method %s, %s, cache %s (%s)", scheme.name,
                 scheme.effective_bits, list(scheme.quantization_formats), scheme.method, steps, key,
                 "reuse" + (f" of shared pass {entry.marker['derived_from']}" if entry.marker.get("derived_from")
                            else "") if entry.reusable else "new")
        clock = _PhaseClock()
        model, search_state = _auto_quantize(model, calib, scheme, entry, clock, steps, cache_dir)
    t_search_end = time.perf_counter()
    phases = clock.split(t_search_end, scheme.method)
    log.info("phase autoquant (%s): %.2fs %s", "re-solve from cache" if entry.reusable else "calibrate+score+solve",
             t_search_end - clock.start, {k: round(v, 3) for k, v in phases.items() if v is not None})
    return _finish(loaded, calib, scheme, output_dir, model, search_state,
                   {"load": loaded.load_seconds, "copy_model": copy_seconds, **phases},
                   {"key": key, "path": str(entry.final.resolve()), "reused": entry.reusable,
                    "derived_from": entry.marker.get("derived_from")},
                   t_start, write=write, run_id=run_id, sweep_id=sweep_id)


def _auto_quantize(model: nn.Module, calib: CalibrationData, scheme: Scheme, entry: CacheEntry,
                   clock: _PhaseClock, steps: dict[str, int], cache_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    """``mtq.auto_quantize`` for ``scheme`` with ``entry``'s checkpoint; one refusal per failure kind."""
    import modelopt.torch.quantization as mtq

    try:
        with warnings.catch_warnings():
            # ModelOpt warns whenever the checkpoint is new; the caller's log line already says so.
            warnings.filterwarnings("ignore", message=".*[Cc]heckpoint.*(does not exist|not found).*")
            model, search_state = mtq.auto_quantize(
                model,
                constraints=scheme.search_constraints(),
                quantization_formats=[resolve_quant_config(f) for f in scheme.quantization_formats],
                data_loader=calib.batches,
                forward_step=clock.wrap_forward(forward_step),
                # kl_div scores from logits alone; ModelOpt warns if handed a loss it will ignore.
                loss_func=clock.wrap_loss(next_token_loss) if scheme.method == "gradient" else None,
                disabled_layers=list(scheme.search_setup().disabled_layers) or None,
                method=scheme.method,
                checkpoint=str(entry.checkpoint),
                verbose=False,
                **steps,
            )
    except ValueError as exc:
        if "infeasible" in str(exc):
            raise unreachable_budget(scheme, _lowest_from_message(str(exc))) from exc
        raise
    except OSError as exc:
        raise UserError(f"could not write the search cache in {cache_dir} ({exc.strerror or exc}); free space "
                        "or pass another --cache-dir") from exc
    # ModelOpt turns on gradient checkpointing for Hugging Face models it scores; inference wants it off.
    if getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    return model, search_state


@dataclass(frozen=True)
class PassOutcome:
    """What :func:`run_scoring_pass` did."""

    key: str  # the pass's own scoring key
    ran: bool  # calibrated and scored now (False: its checkpoint was in the cache, or nothing was missing)
    derived: tuple[str, ...]  # member scoring keys whose checkpoints were written now
    seconds: float


def run_scoring_pass(loaded: LoadedModel, calib: CalibrationData, scoring_pass: ScoringPass,
                     cache_dir: str | Path, fresh_model: Callable[[], nn.Module]) -> PassOutcome:
    """Make sure every member of ``scoring_pass`` has a verified checkpoint in ``cache_dir``.

    Searches the union of formats once (on ``fresh_model()``, discarded after) unless the pass's own checkpoint is
    cached, then derives each missing member's checkpoint from it (:func:`passes.derive_state`). A member whose
    checkpoint cannot be derived (a pass checkpoint without raw scores) is left to search on its own.
    """
    from modelopt.torch.utils.serialization import safe_load

    from auto_quantize_model.modelopt_configs import format_signature

    t0 = time.perf_counter()
    identity = DataIdentity.of(loaded, calib)
    ident = identity.to_dict()
    cache = SearchCache(cache_dir)
    key = scoring_pass.key(identity)
    members = {scoring_key(identity, m): m for m in scoring_pass.members}
    todo = {k: m for k, m in members.items() if k != key and not cache.ready(k, ident)}
    if not todo and (key not in members or cache.ready(key, ident)):
        return PassOutcome(key, False, (), time.perf_counter() - t0)
    ran = False
    with cache.entry(key, ident) as entry:
        if entry.reusable:
            raw = entry.marker.get("raw_scores")
        else:
            scheme = scoring_pass.scheme
            steps = effective_steps(scheme, identity.num_batches, identity.batch_size)
            log.info("shared scoring pass %s: formats %s for %d schemes, %s", key, list(scheme.quantization_formats),
                     len(members), steps)
            model, _ = _auto_quantize(fresh_model(), calib, scheme, entry, _PhaseClock(), steps, Path(cache_dir))
            raw = raw_scores(model)
            entry.extra["raw_scores"] = raw
            del model
            ran = True
    derived = []
    if raw is None:
        log.warning("shared scoring pass %s: its cached checkpoint has no raw scores (a plain search wrote it); "
                    "%d member(s) search on their own", key, len(todo))
    elif todo:
        state = safe_load(str(cache.paths(key)[0]))
        for k, m in todo.items():
            sigs = {format_signature(f) for f in m.quantization_formats}
            if cache.store(k, ident, derive_state(state, raw, sigs), derived_from=key):
                derived.append(k)
    seconds = time.perf_counter() - t0
    log.info("phase scoring pass %s: %s, derived %d member checkpoint(s) in %.2fs", key,
             "calibrated and scored" if ran else "from the cache", len(derived), seconds)
    return PassOutcome(key, ran, tuple(derived), seconds)


def _lowest_from_message(text: str) -> float:
    """ModelOpt's infeasibility message names the minimum achievable bits; NaN if its wording changes."""
    import re

    m = re.search(r"minimum achievable[^0-9]*([0-9]+(?:\.[0-9]+)?)", text)
    return float(m.group(1)) if m else float("nan")


def _finish(
    loaded: LoadedModel,
    calib: CalibrationData,
    scheme: Scheme,
    output_dir: Path,
    model: nn.Module,
    search_state: dict[str, Any],
    timings: dict[str, float | None],
    score_cache: dict[str, Any],
    t_start: float,
    *,
    write: bool,
    run_id: str | None,
    sweep_id: str | None,
) -> RunResult:
    """Manifest from the live model, then restore artifact, report and manifest on disk."""
    format_names = {format_signature(f): f for f in scheme.quantization_formats}
    format_bits = {f: format_effective_bits(f) for f in scheme.quantization_formats}
    steps = effective_steps(scheme, len(calib.batches), calib.batch_size)
    reused = score_cache["reused"]
    best = search_state["best"]
    if not best["is_satisfied"]:
        log.warning("scheme %s: ModelOpt's LP ended without an optimal status at %.4g effective bits (achieved %.4g)",
                    scheme.name, scheme.effective_bits, best["constraints"].get("effective_bits", float("nan")))

    mpath, rpath, apath = manifest_path(output_dir, scheme.name), report_path(output_dir), restore_path(output_dir, scheme.name)
    manifest = build_manifest(
        scheme=scheme.to_dict() | steps,
        model_info=loaded.describe(),
        calibration={**calib.describe(), "usage": usage(calib, steps["num_calib_steps"], steps["num_score_steps"])},
        model=model,
        search_state=search_state,
        format_names=format_names,
        format_bits=format_bits,
        search_setup=scheme.search_setup(),
        score_cache=score_cache,
        timings=timings,
        artifacts={"manifest": mpath.name, "report": rpath.name, "restore": apath.name},
        run_id=run_id,
        sweep_id=sweep_id,
    )
    if not write:
        return RunResult(model, search_state, manifest, None, None, None, scored=not reused)

    t = time.perf_counter()
    manifest["artifacts"]["restore_sha256"] = save_restore_artifact(model, apath, loaded.describe(), manifest)
    timings["write_restore"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start + loaded.load_seconds
    # Report first, manifest last: the manifest marks a complete run, so a failure (a full disk) while writing
    # either never leaves a manifest without its report.
    atomic_write_text(rpath, render_report(manifest))
    write_manifest(manifest, mpath)
    log.info("phase write: manifest %s, report %s, restore %s; %d/%d layers quantized, %.3f bits (target %.3g)",
             mpath, rpath, apath, manifest["num_quantized_layers"], manifest["num_layers"],
             manifest["effective_bits"]["measured"], scheme.effective_bits)
    return RunResult(model, search_state, manifest, mpath, rpath, apath, scored=not reused)


class ResolveInMemoryRefused(ValueError):
    """The in-memory re-solve cannot give the searched model's result; run a search from the cache instead."""


def lowest_effective_bits(state: dict[str, Any]) -> float:
    """The lowest budget the search state can reach: every searched group at its cheapest candidate, every
    other module counted in the denominator at full cost (as ModelOpt's own feasibility check does)."""
    stats = state["candidate_stats"].values()
    denom = state.get("cost_denominator") or sum(s.get("uncompressed_cost", max(s["costs"])) for s in stats)
    saved = sum(s.get("uncompressed_cost", max(s["costs"])) - min(s["costs"]) for s in stats)
    return 16.0 * (denom - saved) / denom


def resolve_budget(
    previous: RunResult,
    loaded: LoadedModel,
    calib: CalibrationData,
    scheme: Scheme,
    output_dir: str | Path,
    *,
    run_id: str | None = None,
    sweep_id: str | None = None,
) -> RunResult:
    """Re-solve ``previous``'s search for ``scheme.effective_bits`` on the same searched model, in place.

    The searched model keeps one calibrated quantizer set per candidate format for every group;
    ModelOpt's ``QuantRecipeHparam.active`` swaps them. Setting every group's choice from the new
    solution leaves nothing of the previous budget behind, and skips the model copy, the checkpoint
    load and the quantizer re-insertion that a fresh ``auto_quantize(checkpoint=...)`` pays. Only for
    the same scoring key, and never for formats that fold scales into the weights (the searched weights
    hold the previous choice's fold): :class:`ResolveInMemoryRefused` then. A budget below the lowest
    reachable one is the same ``UserError`` a fresh search gives.
    """
    from modelopt.torch.opt.utils import get_hparam
    from modelopt.torch.quantization.algorithms import _resolve_best_recipe

    output_dir = Path(output_dir)
    check_output_dir(output_dir)
    key = score_cache_key(loaded, calib, scheme)
    if key != previous.manifest["score_cache"]["key"]:
        raise ResolveInMemoryRefused("resolve_budget needs the scoring key of the previous search")
    if folds_weights(scheme):
        raise ResolveInMemoryRefused(f"{', '.join(scheme.quantization_formats)} fold scales into the weights")
    t_start = time.perf_counter()
    state = previous.search_state
    stats = state["candidate_stats"]
    lowest = lowest_effective_bits(state)
    if scheme.effective_bits < lowest - 1e-9:
        raise unreachable_budget(scheme, lowest)
    # ModelOpt's own LP solve on the stored scores and costs (the one get_auto_quantize_config uses).
    recipe = _resolve_best_recipe(state, {"effective_bits": scheme.effective_bits})
    model = previous.model
    for name, choice in recipe.items():
        get_hparam(model, name).active = choice
    denom = state.get("cost_denominator") or sum(s.get("uncompressed_cost", max(s["costs"])) for s in stats.values())
    idx = {name: stats[name]["formats"].index(choice) for name, choice in recipe.items()}
    cost = sum(stats[n]["costs"][i] for n, i in idx.items())
    achieved = 16.0 * cost / denom
    new_state = {**state, "best": {
        "recipe": recipe, "constraints": {"effective_bits": achieved},
        "score": sum(stats[n]["scores"][i] for n, i in idx.items()),
        "is_satisfied": achieved <= scheme.effective_bits + 1e-9,
    }}
    solve = time.perf_counter() - t_start
    log.info("phase autoquant (re-solve in memory): %.2fs, %.3f bits", solve, achieved)
    return _finish(loaded, calib, scheme, output_dir, model, new_state,
                   {"load": loaded.load_seconds, "copy_model": 0.0, "calibrate": 0.0, "score": 0.0, "solve": solve},
                   {**previous.manifest["score_cache"], "reused": True, "in_memory": True},
                   t_start, write=True, run_id=run_id, sweep_id=sweep_id)
