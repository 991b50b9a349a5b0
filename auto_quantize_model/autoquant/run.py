"""Run one AutoQuant scheme on an already-loaded model (the language model, or the whole VLM).

``run_scheme`` is the pure function the CLI and the sweep both call: no argument parsing, no model
loading. It searches (``search.py``: one ``mtq.auto_quantize`` call), then writes manifest, report and
restore artifact; ``resolve_budget`` re-solves a finished search for another budget in memory. It keeps ModelOpt's search checkpoint in a score cache keyed by everything that changes
calibration or scores (formats, method, steps, disabled layers, calibration tokens, model config), so
a run that differs only in effective bits re-solves in about a second instead of re-scoring.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from auto_quantize_model.autoquant.cache import SearchCache
from auto_quantize_model.autoquant.identity import DataIdentity, effective_steps, scoring_key
from auto_quantize_model.autoquant.layers import check_formats_labelled
from auto_quantize_model.autoquant.manifest import build_manifest, manifest_path, write_manifest
from auto_quantize_model.autoquant.report import render_report, report_path
from auto_quantize_model.autoquant.restore import restore_path, save_restore_artifact
from auto_quantize_model.autoquant.search import PhaseClock, auto_quantize, unreachable_budget
from auto_quantize_model.autoquant.selection import InfeasibleBudget
from auto_quantize_model.autoquant.serving import serving_summary
from auto_quantize_model.autoquant.solve import solve_state
from auto_quantize_model.configs.schemes import Scheme
from auto_quantize_model.datasets.protocol import CalibrationData, usage
from auto_quantize_model.errors import check_output_dir
from auto_quantize_model.format_facts import format_effective_bits, format_folds_weights, format_signature
from auto_quantize_model.io_utils import atomic_write_text
from auto_quantize_model.models.loading import LoadedModel

log = logging.getLogger(__name__)


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
        clock = PhaseClock()
        model, search_state = auto_quantize(loaded, model, calib, scheme, entry, steps, clock)
    t_search_end = time.perf_counter()
    phases = clock.split(t_search_end, scheme.method)
    log.info("phase autoquant (%s): %.2fs %s", "re-solve from cache" if entry.reusable else "calibrate+score+solve",
             t_search_end - clock.start, {k: round(v, 3) for k, v in phases.items() if v is not None})
    return _finish(loaded, calib, scheme, output_dir, model, search_state,
                   {"load": loaded.load_seconds, "load_gb_per_s": round(loaded.load_gb_per_s, 3),
                    "copy_model": copy_seconds, **phases},
                   {"key": key, "path": str(entry.final.resolve()), "reused": entry.reusable,
                    "derived_from": entry.marker.get("derived_from")},
                   t_start, write=write, run_id=run_id, sweep_id=sweep_id)


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
    record = best.get("selection")
    if record is not None and record.modelopt is not None and record.modelopt.differs:
        log.info("scheme %s: ModelOpt's own solve (%s) would choose differently in %d group(s), objective %+.3g "
                 "(%s)", scheme.name, record.modelopt.status, len(record.modelopt.differing_groups),
                 record.modelopt.score_gap or 0.0, "within budget" if record.modelopt.within_budget else "over budget")

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
        serving=serving_summary(model, scheme.fused_scales),
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

    output_dir = Path(output_dir)
    check_output_dir(output_dir)
    key = score_cache_key(loaded, calib, scheme)
    if key != previous.manifest["score_cache"]["key"]:
        raise ResolveInMemoryRefused("resolve_budget needs the scoring key of the previous search")
    if folds_weights(scheme):
        raise ResolveInMemoryRefused(f"{', '.join(scheme.quantization_formats)} fold scales into the weights")
    t_start = time.perf_counter()
    state = previous.search_state
    try:  # the exact selection on the stored scores and costs (ModelOpt's own solve beside it)
        best = solve_state(state, scheme.effective_bits)
    except InfeasibleBudget as exc:
        raise unreachable_budget(scheme, exc.lowest_bits) from exc
    model = previous.model
    for name, choice in best["recipe"].items():
        get_hparam(model, name).active = choice
    new_state = {**state, "best": best}
    solve = time.perf_counter() - t_start
    log.info("phase autoquant (re-solve in memory): %.3fs, %.3f bits", solve, best["constraints"]["effective_bits"])
    return _finish(loaded, calib, scheme, output_dir, model, new_state,
                   {"load": loaded.load_seconds, "load_gb_per_s": round(loaded.load_gb_per_s, 3), "copy_model": 0.0,
                    "calibrate": 0.0, "score": 0.0, "solve": solve},
                   {**previous.manifest["score_cache"], "reused": True, "in_memory": True},
                   t_start, write=True, run_id=run_id, sweep_id=sweep_id)
