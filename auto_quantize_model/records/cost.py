"""The measured cost of one searched run (``measurement.json`` beside its manifest) and its table columns.

A sweep with ``measure = true`` times each trial's scheme as real FP8 layers on its worker's GPU
(inference/measure_run.py) next to two baselines measured once per worker, the same way on the same
device: the BF16 language model and uniform FP8 (every decoder Linear FP8, lm_head BF16, as the
uniform FP8 PTQ control runs it). "BF16" is the unquantized model in the worker's dtype (bfloat16 on GPU;
the trials table's ``reference_dtype``). Ratios are run / baseline, so > 1 means faster (or, for weight
memory, larger). This module imports no torch: ``analyze`` reads the record while rebuilding tables.

Weight memory (``lm_weight_bytes``) counts every distinct tensor of the language model and lm_head
once (rotary tables left out): a BF16 lm_head tied to the embedding counts once; an FP8 lm_head is
its own FP8 tensor beside the BF16 embedding, as in the export.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from auto_quantize_model.io_utils import atomic_write_json

log = logging.getLogger(__name__)

MEASUREMENT_FILE = "measurement.json"
MEASUREMENT_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ModelCost:
    """One model's measured figures."""

    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    lm_weight_bytes: int
    num_fp8_layers: int


@dataclass(frozen=True)
class TrialCost:
    """A run's cost beside its worker's BF16 and uniform-FP8 baselines, with the shapes and device used."""

    run: ModelCost
    bf16: ModelCost
    uniform_fp8: ModelCost
    device: str
    batch_size: int  # prefill batch
    seq_len: int  # prefill tokens per sequence
    compiled: bool  # prefill under torch.compile (decode is eager)
    settings: dict[str, Any]  # MeasureSettings.describe(): decode shape, repeats, warm-up, allow_cpu

    def ratio(self, field: str, baseline: str = "bf16") -> float | None:
        """``run.field / baseline.field`` (None if the baseline is 0)."""
        base = getattr(getattr(self, baseline), field)
        return getattr(self.run, field) / base if base else None

    def columns(self) -> dict[str, Any]:
        """The trials-table columns (docs/tables.md)."""
        return {
            "prefill_tokens_per_s": self.run.prefill_tokens_per_s,
            "decode_tokens_per_s": self.run.decode_tokens_per_s,
            "lm_weight_bytes": self.run.lm_weight_bytes,
            "prefill_vs_bf16": self.ratio("prefill_tokens_per_s"),
            "decode_vs_bf16": self.ratio("decode_tokens_per_s"),
            "lm_weight_vs_bf16": self.ratio("lm_weight_bytes"),
            "prefill_vs_uniform_fp8": self.ratio("prefill_tokens_per_s", "uniform_fp8"),
            "measure_batch_size": self.batch_size,
            "measure_seq_len": self.seq_len,
            "measure_device": self.device,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, versioned (the ``measurement.json`` record)."""
        return {"schema_version": MEASUREMENT_SCHEMA_VERSION, "kind": "measurement", **asdict(self),
                "ratios_vs_bf16": {k: v for k, v in self.columns().items() if k.endswith("_vs_bf16")}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialCost:
        """Inverse of :meth:`to_dict` (KeyError/TypeError on a malformed record)."""
        fields = ("device", "batch_size", "seq_len", "compiled", "settings")
        return cls(run=ModelCost(**data["run"]), bf16=ModelCost(**data["bf16"]),
                   uniform_fp8=ModelCost(**data["uniform_fp8"]), **{k: data[k] for k in fields})


def write_measurement(run_dir: str | Path, cost: TrialCost) -> Path:
    """Attach ``cost`` to its run: ``measurement.json`` beside the manifest, written atomically."""
    return atomic_write_json(Path(run_dir) / MEASUREMENT_FILE, cost.to_dict())


def read_measurement(run_dir: str | Path) -> TrialCost | None:
    """The run's measured cost, or None when it has none (an unreadable record is logged and ignored)."""
    path = Path(run_dir) / MEASUREMENT_FILE
    if not path.is_file():
        return None
    try:
        return TrialCost.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable %s (%s)", path, exc.__class__.__name__)
        return None
