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
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from auto_quantize_model.io_utils import set_default_mode, sha256_json

TABLES_SCHEMA_VERSION = 1
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

# prefill_tokens_per_s: measured on a GPU from the run's FP8 export (inference/measure.py), when present.
METRICS = ("perplexity", "reference_perplexity", "kl_mean", "kl_max", "top1_agreement", "prefill_tokens_per_s")
TIMINGS = ("load", "calibrate", "score", "solve", "total")

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
        pa.field("num_fp8_layers", pa.int32()),
        pa.field("num_layers", pa.int32()),
        pa.field("score_cache_key", pa.string()),
        pa.field("scored", pa.bool_()),
        *[pa.field(m, pa.float64()) for m in METRICS],
        *[pa.field(f"time_{t}", pa.float64()) for t in TIMINGS],
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
        pa.field("manifest_path", pa.string()),
        pa.field("equivalent_schemes", pa.string()),
        pa.field("written_at", pa.float64()),
        # Added for the uniform-FP8 control, honest reference labels and seed-variance checks.
        pa.field("is_control", pa.bool_()),
        pa.field("reference_dtype", pa.string()),
        pa.field("calib_seed", pa.int64()),
        pa.field("calib_chat_template", pa.bool_()),
    ],
    metadata={"auto_quantize_model.table": "trials", "schema_version": str(TABLES_SCHEMA_VERSION)},
)


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


def _key_values(m: dict[str, Any], sweep_id: str | None, trial_id: str) -> dict[str, Any]:
    return {
        "sweep_id": sweep_id,
        "trial_id": trial_id,
        "effective_bits_target": m["effective_bits"]["target"],
        "effective_bits_achieved": m["effective_bits"]["achieved"],
        "effective_bits_all_layers": m["effective_bits"].get("measured_all_layers", m["effective_bits"].get("measured")),
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
    settings: dict[str, Any] | None = None,
    equivalent_schemes: str | None = None,
) -> pa.Table:
    """One row for a trial; ``m`` is None for a failed trial (then ``settings`` fills what is known)."""
    metrics = metrics or {}
    if m is None:
        s = settings or {}
        row: dict[str, Any] = {f.name: None for f in TRIALS_SCHEMA}
        row.update({"sweep_id": sweep_id, "trial_id": trial_id, "effective_bits_target": s.get("effective_bits"),
                    "method": s.get("method"), "status": status, "error": error, "written_at": time.time(),
                    "equivalent_schemes": ",".join(s.get("equivalent_schemes") or []) or None})
        return pa.Table.from_pylist([row], schema=TRIALS_SCHEMA)
    trial_id = trial_id or trial_id_for(m)
    t = m.get("timings", {})
    row = {
        **_key_values(m, sweep_id, trial_id),
        "quantization_formats": ",".join(m["scheme"]["quantization_formats"]),
        "num_score_steps": m["scheme"]["num_score_steps"],
        "num_calib_steps": m["scheme"]["num_calib_steps"],
        "calib_num_samples": m["calibration"]["num_samples"],
        "model_path": m["model"]["path"],
        "budget_met": m["budget_met"],
        "total_score": m["autoquant_state"]["best"]["score"],
        "num_fp8_layers": m["num_quantized_layers"],
        "num_layers": m.get("num_layers", len(m["layers"])),
        "score_cache_key": m.get("score_cache", {}).get("key"),
        "scored": None if "score_cache" not in m else not m["score_cache"]["reused"],
        **{k: metrics.get(k) for k in METRICS},
        **{f"time_{k}": t.get(k) for k in TIMINGS},
        "status": status,
        "error": error,
        "manifest_path": manifest_path,
        # Other scheme names whose resolved search and budget are this trial's (run once, see sweep/spec.py).
        "equivalent_schemes": equivalent_schemes or None,
        "written_at": time.time(),
        "is_control": False,
        "reference_dtype": m["model"].get("dtype"),
        "calib_seed": m["calibration"].get("seed"),
        "calib_chat_template": bool(m["calibration"].get("chat_template")),
    }
    return pa.Table.from_pylist([row], schema=TRIALS_SCHEMA)


def control_trials_table(record: dict[str, Any], manifest_path: str | None = None) -> pa.Table:
    """The trials row of a uniform-PTQ control record (``*_control.json``, see inference/controls.py):
    ``is_control`` true, no target bits, no scores; achieved bits are the control's measured bits."""
    c, metrics = record["control"], record.get("metrics") or {}
    row: dict[str, Any] = {f.name: None for f in TRIALS_SCHEMA}
    row.update({
        "sweep_id": record.get("sweep_id"), "trial_id": record["trial_id"],
        "effective_bits_achieved": c["effective_bits"], "effective_bits_all_layers": c["effective_bits"],
        "calibration_hash": c["calibration_hash"],
        "model_id": record["model"]["config_hash"], "quantization_formats": c["quant_format"],
        "num_calib_steps": c["num_calib_steps"], "model_path": record["model"]["path"],
        "num_fp8_layers": c["num_quantized_layers"], "num_layers": c["num_layers"],
        **{k: metrics.get(k) for k in METRICS}, "status": "ok", "manifest_path": manifest_path,
        "written_at": time.time(), "is_control": True, "reference_dtype": record["model"].get("dtype"),
    })
    return pa.Table.from_pylist([row], schema=TRIALS_SCHEMA)


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
