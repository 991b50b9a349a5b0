"""``TrialOutcome``: one row of the trials table, built once from a manifest (plus metrics) or a control record.

One name per fact: the field names are the trials table's columns (docs/tables.md), in its order;
tests/test_records.py checks them against ``records.tables.TRIALS_SCHEMA``. Whoever reports a trial (the worker's
result, Tune's metrics, the sweep summary, ``compare``) can read the same fields instead of re-shaping the
manifest under other names.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from auto_quantize_model.io_utils import sha256_json

# Evaluation metrics (inference/metrics.py); prefill_tokens_per_s is measured on a GPU from the run's FP8 export.
METRICS = ("perplexity", "reference_perplexity", "kl_mean", "kl_max", "top1_agreement", "prefill_tokens_per_s")
# Manifest timings copied as time_<name>.
TIMINGS = ("load", "calibrate", "score", "solve", "total")


def all_layer_bits(manifest: dict[str, Any]) -> float:
    """Effective bits over every LM Linear of a manifest (layers outside the search or budget at their ``bits``,
    16): the manifest's ``measured_all_layers``, recomputed from its layers for manifests written before it."""
    bits = manifest["effective_bits"]
    if bits.get("measured_all_layers") is not None:
        return float(bits["measured_all_layers"])
    layers = list(manifest["layers"].values())
    total = sum(lay["num_params"] for lay in layers)
    return sum(lay["num_params"] * lay["bits"] for lay in layers) / total if total else 16.0


def trial_id_for(manifest: dict[str, Any]) -> str:
    """The sweep's run id, else a content id: the same search result aggregated twice is one trial."""
    if manifest.get("run_id"):
        return str(manifest["run_id"])
    return sha256_json({
        "scheme": manifest["scheme"],
        "bits": manifest["effective_bits"]["target"],
        "calibration": manifest["calibration"].get("token_hash"),
        "model": manifest["model"]["config_hash"],
        "weights": manifest["model"].get("weights_fingerprint"),
        "recipe": manifest["autoquant_state"]["best"]["recipe"],
    })[:16]


@dataclass(frozen=True, kw_only=True)
class TrialOutcome:
    """One trial's result as the trials table stores it (None: not known for this trial, e.g. a failed one)."""

    sweep_id: str | None = None
    trial_id: str
    effective_bits_target: float | None = None  # the budget asked for
    # Two bases, one per column: the budget's (the layers the budget counts; null for the control, which has no
    # budget) and every LM Linear's (excluded layers at 16): the one trials of any scheme and the control share.
    effective_bits_achieved: float | None = None  # the exact selection's, over the layers the budget counts
    effective_bits_all_layers: float | None = None  # over every LM Linear, excluded layers at their real width
    method: str | None = None
    calibration_hash: str | None = None  # the calibration's token_hash
    model_id: str | None = None  # the checkpoint's config_hash
    weights_fingerprint: str | None = None
    quantization_formats: str | None = None  # comma-joined candidate formats
    num_score_steps: int | None = None
    num_calib_steps: int | None = None
    calib_num_samples: int | None = None
    model_path: str | None = None
    budget_met: bool | None = None
    total_score: float | None = None
    num_quantized_layers: int | None = None  # Linears with an enabled weight quantizer, any format
    num_layers: int | None = None
    score_cache_key: str | None = None
    scored: bool | None = None  # this trial ran calibration and scoring (false: reused a pass)
    score_pass_key: str | None = None  # the shared scoring pass its checkpoint was derived from (score_cache)
    perplexity: float | None = None
    reference_perplexity: float | None = None
    kl_mean: float | None = None
    kl_max: float | None = None
    top1_agreement: float | None = None
    prefill_tokens_per_s: float | None = None
    time_load: float | None = None
    time_calibrate: float | None = None
    time_score: float | None = None
    time_solve: float | None = None
    time_total: float | None = None
    status: str = "ok"  # ok or error
    error: str | None = None
    manifest_path: str | None = None
    exportable: bool | None = None  # `autoquant export` takes its formats (export.hf.check_exportable); null: unknown
    equivalent_schemes: str | None = None  # comma-joined scheme names run as this trial
    written_at: float = dataclasses.field(default_factory=time.time)
    is_control: bool = False
    reference_dtype: str | None = None
    calib_seed: int | None = None
    calib_chat_template: bool | None = None
    # Measured real-FP8 cost (sweep ``measure``, records/cost.py: TrialCost.columns()).
    decode_tokens_per_s: float | None = None
    lm_weight_bytes: int | None = None
    prefill_vs_bf16: float | None = None
    decode_vs_bf16: float | None = None
    lm_weight_vs_bf16: float | None = None
    prefill_vs_uniform_fp8: float | None = None
    measure_batch_size: int | None = None
    measure_seq_len: int | None = None
    measure_device: str | None = None
    # ModelOpt's own solve of the same scores and budget (manifest ``selection.modelopt``).
    modelopt_choice_differs: bool | None = None  # it would choose other layers than the exact selection
    modelopt_relative_score_gap: float | None = None  # its objective value's excess over the exact one, relative

    @classmethod
    def from_run(cls, manifest: dict[str, Any], *, sweep_id: str | None = None, trial_id: str | None = None,
                 metrics: dict[str, Any] | None = None, status: str = "ok", error: str | None = None,
                 manifest_path: str | None = None, equivalent_schemes: str | None = None,
                 measurement: Any = None, exportable: bool | None = None) -> TrialOutcome:
        """From a run's manifest, its evaluation metrics (``evaluation.json``'s ``metrics``), its measured cost
        (a ``records.cost.TrialCost``, when measured) and whether export takes it (the caller asks export)."""
        m, metrics = manifest, metrics or {}
        bits, timings, cache = m["effective_bits"], m.get("timings", {}), m.get("score_cache")
        theirs = (m.get("selection") or {}).get("modelopt") or {}
        measured: dict[str, Any] = {**{k: metrics.get(k) for k in METRICS},
                                    **{f"time_{k}": timings.get(k) for k in TIMINGS},
                                    **(measurement.columns() if measurement is not None else {})}
        return cls(
            sweep_id=sweep_id,
            trial_id=trial_id or trial_id_for(m),
            effective_bits_target=bits["target"],
            effective_bits_achieved=bits["achieved"],
            effective_bits_all_layers=all_layer_bits(m),
            method=m["scheme"]["method"],
            calibration_hash=m["calibration"].get("token_hash"),
            model_id=m["model"]["config_hash"],
            weights_fingerprint=m["model"].get("weights_fingerprint"),
            quantization_formats=",".join(m["scheme"]["quantization_formats"]),
            num_score_steps=m["scheme"]["num_score_steps"],
            num_calib_steps=m["scheme"]["num_calib_steps"],
            calib_num_samples=m["calibration"]["num_samples"],
            model_path=m["model"]["path"],
            budget_met=m["budget_met"],
            total_score=m["autoquant_state"]["best"]["score"],
            num_quantized_layers=m["num_quantized_layers"],
            num_layers=m.get("num_layers", len(m["layers"])),
            score_cache_key=cache.get("key") if cache else None,
            scored=None if cache is None else not cache["reused"],
            score_pass_key=cache.get("derived_from") if cache else None,
            **measured,
            status=status,
            error=error,
            manifest_path=manifest_path,
            exportable=exportable,
            equivalent_schemes=equivalent_schemes or None,
            reference_dtype=m["model"].get("dtype"),
            calib_seed=m["calibration"].get("seed"),
            calib_chat_template=bool(m["calibration"].get("chat_template")),
            modelopt_choice_differs=theirs.get("differs"),
            modelopt_relative_score_gap=theirs.get("relative_score_gap"),
        )

    @classmethod
    def failed(cls, *, trial_id: str, sweep_id: str | None = None, status: str = "error", error: str | None = None,
               method: str | None = None, effective_bits_target: float | None = None,
               equivalent_schemes: str | None = None) -> TrialOutcome:
        """A trial without a manifest: the settings its sweep trial names, and its error."""
        return cls(sweep_id=sweep_id, trial_id=trial_id, status=status, error=error, method=method,
                   effective_bits_target=None if effective_bits_target is None else float(effective_bits_target),
                   equivalent_schemes=equivalent_schemes or None)

    @classmethod
    def from_control(cls, record: dict[str, Any], manifest_path: str | None = None) -> TrialOutcome:
        """The uniform-PTQ control (``*_control.json``): no target, no scores, no budget (``effective_bits_achieved``
        null); its measured bits count every LM Linear (excluded ones at 16), the all-layer basis."""
        c, metrics = record["control"], record.get("metrics") or {}
        measured: dict[str, Any] = {k: metrics.get(k) for k in METRICS}
        return cls(
            sweep_id=record.get("sweep_id"), trial_id=record["trial_id"],
            effective_bits_all_layers=c["effective_bits"],
            calibration_hash=c["calibration_hash"], model_id=record["model"]["config_hash"],
            quantization_formats=c["quant_format"], num_calib_steps=c["num_calib_steps"],
            model_path=record["model"]["path"], num_quantized_layers=c["num_quantized_layers"],
            num_layers=c["num_layers"], **measured, manifest_path=manifest_path,
            is_control=True, reference_dtype=record["model"].get("dtype"),
        )

    def to_row(self) -> dict[str, Any]:
        """Column -> value, in the trials table's order."""
        return dataclasses.asdict(self)
