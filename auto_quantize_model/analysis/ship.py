"""``autoquant ship``: from a sweep's answer to a served checkpoint in one command.

Reads the trials of a sweep directory (or run directories, manifest files, globs) as the trials table's rows, picks
one by a rule (analysis/pick.py), exports it with ``export.hf.export_run`` and says how to serve it. The sweep knows
its checkpoint (each manifest records ``model.path``); ``--model-dir`` overrides it and the export's own check still
refuses other weights.
"""

from __future__ import annotations

import json
import logging
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from auto_quantize_model.analysis.aggregate import trial_rows
from auto_quantize_model.analysis.pick import Pick, ShipRule, pick
from auto_quantize_model.errors import UserError
from auto_quantize_model.export.settings import ExportOptions

log = logging.getLogger(__name__)

# The engines' own flags for a ModelOpt-format checkpoint (README, "Export"); a checkpoint whose quant_method an
# engine detects from config.json (compressed-tensors) needs none.
ENGINE_FLAG = {"modelopt": "--quantization modelopt"}
# Engines whose load of a format this project checks (tests/engine_rules): SGLang's only for ModelOpt's format, and
# not with ModelOpt's FP8 KV-cache scale names (SGLang 0.5.23 refuses them for Qwen2.5-VL).
CHECKED_ENGINES = {"modelopt": ("vLLM", "SGLang"), "compressed-tensors": ("vLLM",)}


@dataclass
class Shipped:
    """What ``ship`` did: the pick, and (unless a dry run) where the export went and how to serve it."""

    pick: Pick
    output_dir: Path | None = None
    export_info: dict[str, Any] = field(default_factory=dict)
    serve: list[tuple[str, str]] = field(default_factory=list)  # (engine, command line)


def load_candidates(sources: list[str]) -> pd.DataFrame:
    """The trials under ``sources`` as trials-table rows (read from their manifests, nothing written)."""
    rows, skipped = trial_rows(sources)
    for src, reason in skipped:
        log.warning("skipped %s: %s", src, reason)
    if not rows:
        raise UserError(f"no valid manifest under {', '.join(sources)}; pass a sweep directory (its autoquant/trials "
                        "hold the manifests) or run directories")
    return pd.DataFrame(rows)


def serve_commands(export_dir: str | Path, quant_method: str | None = "modelopt", kv_cache: bool = False) -> \
        list[tuple[str, str]]:
    """(engine, command line) for the engines whose load of this export is checked (README's serving lines; not
    run here)."""
    d = shlex.quote(str(export_dir))
    flag = ENGINE_FLAG.get(quant_method or "", "")
    tail = f" {flag}" if flag else ""
    lines = {"vLLM": f"vllm serve {d}{tail}", "SGLang": f"python -m sglang.launch_server --model-path {d}{tail}"}
    engines = CHECKED_ENGINES.get(quant_method or "", ("vLLM", "SGLang"))
    return [(e, lines[e]) for e in engines if not (kv_cache and e == "SGLang")]


def ship_command(sources: list[str], rule: ShipRule, output_dir: str | Path) -> str:
    """The ``autoquant ship`` command line that ships ``rule``'s winner to ``output_dir``."""
    return shlex.join(["autoquant", "ship", *sources, *rule.flags(), "--output-dir", str(output_dir)])


def _quant_method(export_dir: Path) -> str | None:
    """The export's ``quantization_config.quant_method`` (what an engine reads to choose its loader)."""
    try:
        cfg = json.loads((export_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return (cfg.get("quantization_config") or {}).get("quant_method")


def _model_dir(row: pd.Series, override: str | Path | None) -> Path:
    """``--model-dir`` if given, else the checkpoint the trial's manifest records."""
    if override is not None:
        return Path(override)
    from auto_quantize_model.autoquant.manifest import load_manifest

    recorded = load_manifest(row["manifest_path"])["model"].get("path")
    if not isinstance(recorded, str) or not recorded:
        raise UserError(f"trial {row['trial_id']}'s manifest records no checkpoint path; pass --model-dir")
    path = Path(recorded)
    if not (path / "config.json").is_file():
        raise UserError(f"trial {row['trial_id']} was made on {path}, which is not a checkpoint here; pass "
                        "--model-dir with that checkpoint (its weights are checked against the run's)")
    return path


def _export(run: str, model_dir: Path, out: Path, device: str, options: ExportOptions) -> dict[str, Any]:
    from auto_quantize_model.export.hf import export_run

    return dict(export_run(run, model_dir, out, device=device, format=options.format,
                           kv_cache=options.kv_cache).info)


def ship(sources: list[str], rule: ShipRule, output_dir: str | Path | None, *, model_dir: str | Path | None = None,
         device: str = "cpu", export_format: str = "modelopt", kv_cache: str = "none",
         dry_run: bool = False) -> Shipped:
    """Pick ``rule``'s trial among ``sources`` and export it to ``output_dir`` in ``export_format`` (nothing is
    written on a dry run or a refusal)."""
    options = ExportOptions(format=export_format, kv_cache=kv_cache)
    out = Path(output_dir) if output_dir is not None else None
    if out is None and not dry_run:
        raise UserError("--output-dir is required (a new directory for the export), unless --dry-run")
    if out is not None and not dry_run:
        # Export's own check, before picking: a refusal leaves nothing behind and a pick is never half-shipped.
        from auto_quantize_model.export.files import check_output_dir

        check_output_dir(out)
    chosen = pick(load_candidates(sources), rule)
    if dry_run or out is None:
        return Shipped(chosen)
    row = chosen.winner
    ckpt = _model_dir(row, model_dir)
    info = _export(str(row["manifest_path"]), ckpt, out, device, options)
    return Shipped(chosen, out, info, serve_commands(out, _quant_method(out), options.kv_cache == "fp8"))
