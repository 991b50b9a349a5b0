"""Arrow tables built from manifests: ``layers`` (trial x LM Linear) and ``trials`` (one row per trial).

Layout under a tables root (see docs/tables.md)::

    <root>/layers/scheme=<scheme>/<trial_id>.parquet
    <root>/trials/scheme=<scheme>/<trial_id>.parquet

One file per trial, named by the trial id and written through a dot-prefixed temporary name, so a
trial that is retried or re-aggregated replaces its own file and never duplicates rows. The
``scheme`` column lives in the directory name (Hive partitioning), not in the files.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from auto_quantize_model.io_utils import naming_target, set_default_mode
from auto_quantize_model.records.outcome import METRICS, TIMINGS, TrialOutcome, all_layer_bits, trial_id_for

if TYPE_CHECKING:
    from auto_quantize_model.records.cost import TrialCost

# 2: trials column num_fp8_layers renamed num_quantized_layers (it counts every quantized format).
# 3: one bits basis per column (the control's effective_bits_achieved is null: it has no budget), layers' dtype of an
#    unquantized layer is the run's dtype (manifest schema 2), trials column exportable.
TABLES_SCHEMA_VERSION = 3
PARTITION = "scheme"

_KEY = [
    pa.field("sweep_id", pa.string()),
    pa.field("trial_id", pa.string(), nullable=False),
    pa.field("effective_bits_target", pa.float64()),
    pa.field("effective_bits_achieved", pa.float64()),
    # Bits over every LM Linear, excluded layers at their real width: one basis for trials and the control.
    pa.field("effective_bits_all_layers", pa.float64()),
    pa.field("method", pa.string()),
    pa.field("calibration_hash", pa.string()),
    pa.field("model_id", pa.string()),
    pa.field("weights_fingerprint", pa.string()),
]

LAYERS_SCHEMA = pa.schema(
    _KEY
    + [
        pa.field("layer", pa.string(), nullable=False),
        pa.field("search_group", pa.string()),
        pa.field("block_index", pa.int32()),
        pa.field("kind", pa.string()),
        pa.field("num_params", pa.int64()),
        pa.field("dtype", pa.string()),
        pa.field("chosen_format", pa.string()),
        pa.field("sensitivity", pa.float64()),
        pa.field("candidate_formats", pa.list_(pa.string())),
        pa.field("candidate_scores", pa.list_(pa.float64())),
        pa.field("candidate_costs", pa.list_(pa.float64())),
        pa.field("cost", pa.float64()),
        pa.field("excluded_by", pa.string()),
    ],
    metadata={"auto_quantize_model.table": "layers", "schema_version": str(TABLES_SCHEMA_VERSION)},
)

# Measured real-FP8 cost (sweep ``measure``, records/cost.py); prefill_tokens_per_s is in METRICS.
MEASURED = [
    pa.field("decode_tokens_per_s", pa.float64()),
    pa.field("lm_weight_bytes", pa.int64()),
    pa.field("prefill_vs_bf16", pa.float64()),
    pa.field("decode_vs_bf16", pa.float64()),
    pa.field("lm_weight_vs_bf16", pa.float64()),
    pa.field("prefill_vs_uniform_fp8", pa.float64()),
    pa.field("measure_batch_size", pa.int32()),
    pa.field("measure_seq_len", pa.int32()),
    pa.field("measure_device", pa.string()),
]

TRIALS_SCHEMA = pa.schema(
    _KEY
    + [
        pa.field("quantization_formats", pa.string()),
        pa.field("num_score_steps", pa.int32()),
        pa.field("num_calib_steps", pa.int32()),
        pa.field("calib_num_samples", pa.int32()),
        pa.field("model_path", pa.string()),
        pa.field("budget_met", pa.bool_()),
        pa.field("total_score", pa.float64()),
        pa.field("num_quantized_layers", pa.int32()),
        pa.field("num_layers", pa.int32()),
        pa.field("score_cache_key", pa.string()),
        pa.field("scored", pa.bool_()),
        pa.field("score_pass_key", pa.string()),
        *[pa.field(m, pa.float64()) for m in METRICS],
        *[pa.field(f"time_{t}", pa.float64()) for t in TIMINGS],
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
        pa.field("manifest_path", pa.string()),
        pa.field("exportable", pa.bool_()),
        pa.field("equivalent_schemes", pa.string()),
        pa.field("written_at", pa.float64()),
        # Added for the uniform-FP8 control, honest reference labels and seed-variance checks.
        pa.field("is_control", pa.bool_()),
        pa.field("reference_dtype", pa.string()),
        pa.field("calib_seed", pa.int64()),
        pa.field("calib_chat_template", pa.bool_()),
        *MEASURED,
        # ModelOpt's own solve beside the exact selection (manifest selection.modelopt).
        pa.field("modelopt_choice_differs", pa.bool_()),
        pa.field("modelopt_relative_score_gap", pa.float64()),
    ],
    metadata={"auto_quantize_model.table": "trials", "schema_version": str(TABLES_SCHEMA_VERSION)},
)


def _key_values(m: dict[str, Any], sweep_id: str | None, trial_id: str) -> dict[str, Any]:
    return {
        "sweep_id": sweep_id,
        "trial_id": trial_id,
        "effective_bits_target": m["effective_bits"]["target"],
        "effective_bits_achieved": m["effective_bits"]["achieved"],
        "effective_bits_all_layers": all_layer_bits(m),
        "method": m["scheme"]["method"],
        "calibration_hash": m["calibration"].get("token_hash"),
        "model_id": m["model"]["config_hash"],
        "weights_fingerprint": m["model"].get("weights_fingerprint"),
    }


def layers_table(m: dict[str, Any], sweep_id: str | None = None, trial_id: str | None = None) -> pa.Table:
    """One row per LM Linear of a manifest."""
    trial_id = trial_id or trial_id_for(m)
    key = _key_values(m, sweep_id, trial_id)
    groups = m["layer_sensitivity"]
    rows = []
    for name, lay in m["layers"].items():
        g = groups.get(lay["search_group"] or "", {})
        fmts, scores, costs = g.get("candidate_formats", []), g.get("scores", []), g.get("costs", [])
        chosen = g.get("chosen_format")
        share = lay["num_params"] / g["uncompressed_cost"] if g.get("uncompressed_cost") else 1.0
        rows.append({
            **key,
            "layer": name,
            "search_group": lay["search_group"],
            "block_index": lay["block_index"],
            "kind": lay["kind"],
            "num_params": lay["num_params"],
            "dtype": lay["dtype"],
            "chosen_format": chosen,
            # Layers kept out of the search offer NONE alone: no score, rather than a misleading 0.
            "sensitivity": max((s for s in scores if s is not None), default=None) if len(fmts) > 1 else None,
            "candidate_formats": fmts,
            "candidate_scores": scores,
            "candidate_costs": costs,
            # The layer's own share of its group's cost under the chosen format.
            "cost": costs[fmts.index(chosen)] * share if chosen in fmts else None,
            "excluded_by": lay.get("excluded_by"),
        })
    return pa.Table.from_pylist(rows, schema=LAYERS_SCHEMA)


def trials_table(
    m: dict[str, Any] | None,
    *,
    sweep_id: str | None = None,
    trial_id: str | None = None,
    metrics: dict[str, float] | None = None,
    status: str = "ok",
    error: str | None = None,
    manifest_path: str | None = None,
    method: str | None = None,
    effective_bits_target: float | None = None,
    equivalent_schemes: str | None = None,
    measurement: TrialCost | None = None,
    exportable: bool | None = None,
) -> pa.Table:
    """One row for a trial; ``m`` is None for a failed trial (then ``method`` and ``effective_bits_target`` say
    what its settings asked for); ``measurement`` fills the measured-cost columns; ``exportable`` is export's
    verdict on its formats (``export.hf.export_blocker``)."""
    if m is None:
        if trial_id is None:
            raise ValueError("a failed trial needs an explicit trial_id")
        outcome = TrialOutcome.failed(trial_id=trial_id, sweep_id=sweep_id, status=status, error=error,
                                      method=method, effective_bits_target=effective_bits_target,
                                      equivalent_schemes=equivalent_schemes)
    else:
        outcome = TrialOutcome.from_run(m, sweep_id=sweep_id, trial_id=trial_id, metrics=metrics, status=status,
                                        error=error, manifest_path=manifest_path,
                                        equivalent_schemes=equivalent_schemes, measurement=measurement,
                                        exportable=exportable)
    return pa.Table.from_pylist([outcome.to_row()], schema=TRIALS_SCHEMA)


def control_trials_table(record: dict[str, Any], manifest_path: str | None = None) -> pa.Table:
    """The trials row of a uniform-PTQ control record (``*_control.json``, see inference/controls.py):
    ``is_control`` true, no target bits, no scores; achieved bits are the control's measured bits."""
    return pa.Table.from_pylist([TrialOutcome.from_control(record, manifest_path).to_row()], schema=TRIALS_SCHEMA)


def _safe_part(value: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in value) or "_"


def write_table_file(root: str | Path, table_name: str, scheme: str, trial_id: str, table: pa.Table) -> Path:
    """Write ``<root>/<table>/scheme=<scheme>/<trial_id>.parquet`` atomically (replaces a previous write)."""
    part = Path(root) / table_name / f"{PARTITION}={_safe_part(scheme)}"
    part.mkdir(parents=True, exist_ok=True)
    final = part / f"{_safe_part(trial_id)}.parquet"
    fd, tmp = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=".tmp", dir=part)
    set_default_mode(fd)  # pyarrow rewrites the file in place, keeping this mode
    os.close(fd)
    try:
        with naming_target(final):
            pq.write_table(table, tmp)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return final


def write_trial(
    root: str | Path,
    manifest: dict[str, Any] | None,
    *,
    scheme: str | None = None,
    sweep_id: str | None = None,
    trial_id: str | None = None,
    **trial_kwargs: Any,
) -> str:
    """Write both tables' files for one trial (layers only when there is a manifest). Returns its id."""
    scheme = scheme or (manifest["scheme"]["name"] if manifest else "unknown")
    trial_id = trial_id or (trial_id_for(manifest) if manifest else None)
    if trial_id is None:
        raise ValueError("a failed trial needs an explicit trial_id")
    if manifest is not None:
        write_table_file(root, "layers", scheme, trial_id, layers_table(manifest, sweep_id, trial_id))
    write_table_file(root, "trials", scheme, trial_id,
                     trials_table(manifest, sweep_id=sweep_id, trial_id=trial_id, **trial_kwargs))
    return trial_id
