"""Collect manifests from directories, files and globs, and turn them into table files.

A corrupt or foreign JSON file among the sources is reported by name and skipped; only a source list
with nothing valid in it is an error.
"""

from __future__ import annotations

import glob
import json
import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from auto_quantize_model.autoquant.manifest import EVALUATION_FILE, MANIFEST_SUFFIX, validate_manifest
from auto_quantize_model.errors import UserError
from auto_quantize_model.records.cost import read_measurement
from auto_quantize_model.records.tables import write_trial

log = logging.getLogger(__name__)


@dataclass
class Collected:
    """Manifest files found, and sources that were skipped with the reason."""

    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def find_manifest_files(sources: list[str]) -> Collected:
    """Directories are searched recursively for ``*_quant_manifest.json``; files and globs are taken as given."""
    out = Collected()
    seen: set[Path] = set()
    for src in sources:
        p = Path(src)
        if p.is_dir():
            found = sorted(p.rglob(f"*{MANIFEST_SUFFIX}"))
        elif p.is_file():
            found = [p]
        elif any(ch in src for ch in "*?["):
            found = sorted(Path(x) for x in glob.glob(src, recursive=True) if Path(x).is_file())
        else:
            out.skipped.append((src, "does not exist"))
            continue
        if not found:
            out.skipped.append((src, "no manifests found"))
        for f in found:
            if f.resolve() not in seen:
                seen.add(f.resolve())
                out.files.append(f)
    return out


def read_one(path: Path) -> tuple[str, dict[str, Any] | None, dict[str, Any] | None, str | None]:
    """(path, manifest, metrics, error) for one file; never raises for bad content."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        manifest = validate_manifest(data, str(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return str(path), None, None, f"unreadable or not JSON ({exc.__class__.__name__})"
    except UserError as exc:
        return str(path), None, None, str(exc)
    metrics = None
    ev = path.parent / EVALUATION_FILE
    if ev.is_file():
        try:
            metrics = json.loads(ev.read_text(encoding="utf-8")).get("metrics")
        except (OSError, json.JSONDecodeError):
            log.warning("ignoring unreadable %s", ev)
    return str(path), manifest, metrics, None


def is_exportable(manifest: dict[str, Any], manifest_path: str | Path) -> bool:
    """True when `autoquant export` takes the run's formats (the trials table's ``exportable``)."""
    from auto_quantize_model.export.hf import export_blocker

    return export_blocker(manifest, Path(manifest_path).parent) is None


# What a manifest that passes the shape check but holds wrong types raises while becoming rows.
MALFORMED = (KeyError, TypeError, ValueError, AttributeError, IndexError, pa.ArrowException)


def _convert(path: Path, tables_root: str) -> tuple[str, str | None, str | None]:
    """Read one manifest and write its table files (a worker-process task); a bad file is skipped, by name."""
    try:
        src, manifest, metrics, error = read_one(path)
        if manifest is None:
            return src, None, error
        trial_id = write_trial(tables_root, manifest, sweep_id=manifest.get("sweep_id"), metrics=metrics,
                               manifest_path=src, measurement=read_measurement(path.parent),
                               exportable=is_exportable(manifest, src))
    except MALFORMED as exc:
        return str(path), None, f"malformed manifest ({exc.__class__.__name__}: {str(exc)[:120]})"
    return src, trial_id, None


def _controls(sources: list[str], tables_root: str) -> dict[str, str]:
    """Control records (``*_control.json``, the sweep's uniform-PTQ control) under source directories:
    each becomes a trials row with ``is_control`` true."""
    from auto_quantize_model.inference.controls import CONTROL_NAME, CONTROL_SUFFIX
    from auto_quantize_model.records.tables import control_trials_table, write_table_file

    out: dict[str, str] = {}
    for src in sources:
        if not Path(src).is_dir():
            continue
        for f in sorted(Path(src).rglob(f"*{CONTROL_SUFFIX}")):
            try:
                record = json.loads(f.read_text(encoding="utf-8"))
                table = control_trials_table(record, str(f))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
                log.warning("ignoring unreadable control record %s (%s)", f, exc.__class__.__name__)
                continue
            write_table_file(tables_root, "trials", CONTROL_NAME, record["trial_id"], table)
            out[str(f)] = record["trial_id"]
    return out


def trial_rows(sources: list[str]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Trials-table rows (plus ``scheme``) of every valid manifest under ``sources``, read in memory (no table is
    written), and the sources skipped with the reason. One row per trial id: the first found."""
    from auto_quantize_model.records.outcome import TrialOutcome

    found = find_manifest_files(sources)
    rows: dict[str, dict[str, Any]] = {}
    skipped = list(found.skipped)
    for path in found.files:
        try:
            src, manifest, metrics, error = read_one(path)
            if manifest is None:
                skipped.append((src, error or "invalid"))
                continue
            row = TrialOutcome.from_run(manifest, sweep_id=manifest.get("sweep_id"), metrics=metrics,
                                        manifest_path=src, measurement=read_measurement(path.parent),
                                        exportable=is_exportable(manifest, src)).to_row()
        except MALFORMED as exc:
            skipped.append((str(path), f"malformed manifest ({exc.__class__.__name__})"))
            continue
        rows.setdefault(row["trial_id"], {**row, "scheme": manifest["scheme"]["name"]})
    return list(rows.values()), skipped


def aggregate(sources: list[str], tables_root: str | Path, workers: int = 1) -> dict[str, Any]:
    """Build or refresh the tables from manifests. Returns counts, trial ids and skipped sources."""
    found = find_manifest_files(sources)
    skipped = list(found.skipped)
    trial_ids: dict[str, str] = {}
    root = str(tables_root)
    if workers > 1 and len(found.files) > 50:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_convert, found.files, [root] * len(found.files), chunksize=32))
    else:
        results = [_convert(f, root) for f in found.files]
    for src, trial_id, error in results:
        if trial_id is None:
            skipped.append((src, error or "invalid"))
        else:
            trial_ids[src] = trial_id
    for src, trial_id in _controls(sources, root).items():
        trial_ids[src] = trial_id
    for src, reason in skipped:
        log.warning("skipped %s: %s", src, reason)
    if not trial_ids:
        raise UserError(f"no valid manifest among {len(sources)} source(s): " +
                        "; ".join(f"{s} ({r})" for s, r in skipped[:3]))
    return {"num_manifests": len(trial_ids), "num_trials": len(set(trial_ids.values())),
            "trial_ids": trial_ids, "skipped": skipped}
