"""What an engine's loader sees of an export (config files and safetensors headers) and what it concludes.

The rule sets (``vllm_modelopt``, ``sglang_modelopt``, ``vllm_compressed_tensors``) read an :class:`ExportView`
and return a :class:`LoadPlan`: for every Linear the engine builds, whether it builds it FP8 and which
checkpoint modules feed it, plus :class:`Finding` s for everything the engine would refuse, load wrongly
without a word, or never read. Only headers and scalar tensors are read, so a check costs milliseconds.
"""

from __future__ import annotations

import copy
import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Effects of a finding. Every one fails conformance: the served model would not be the exported one.
REFUSED = "refused"  # the engine raises while loading
SILENT = "silent"  # the engine loads, but serves something other than what the export holds
IGNORED = "ignored"  # a stored tensor the engine never reads

FP8 = "F8_E4M3"
FLOATS = frozenset({"F32", "BF16", "F16"})  # what a float32 scale parameter accepts through copy_
_SCALAR_FORMATS = {"F32": "<f", "F16": "<e"}


@dataclass(frozen=True)
class TensorMeta:
    """A stored tensor as its safetensors header describes it; ``value`` for one-element tensors."""

    dtype: str
    shape: tuple[int, ...]
    value: float | None = None


@dataclass
class ExportView:
    """config.json, hf_quant_config.json (if any) and every tensor header of an export directory."""

    config: dict[str, Any]
    hf_quant_config: dict[str, Any] | None
    tensors: dict[str, TensorMeta]
    source: str = "<in memory>"

    @classmethod
    def read(cls, export_dir: str | Path) -> ExportView:
        d = Path(export_dir)
        hf = d / "hf_quant_config.json"
        tensors: dict[str, TensorMeta] = {}
        for f in sorted(d.glob("*.safetensors")):
            tensors.update(read_safetensors_header(f))
        return cls(json.loads((d / "config.json").read_text(encoding="utf-8")),
                   json.loads(hf.read_text(encoding="utf-8")) if hf.is_file() else None, tensors, str(d))

    def copy(self) -> ExportView:
        """A deep copy to tamper with in tests."""
        return copy.deepcopy(self)

    @property
    def text_config(self) -> dict[str, Any]:
        """Text-model settings: ``text_config`` (transformers >= 4.52 layout) or the flat top level."""
        return self.config.get("text_config") or self.config

    def quant_config(self, plan: LoadPlan) -> tuple[dict[str, Any], str] | None:
        """(the quantization config both ModelOpt loaders read, where it came from): config.json's
        ``quantization_config`` (top level or ``text_config``), else ``hf_quant_config.json``; None with a finding."""
        qc = self.config.get("quantization_config") or self.text_config.get("quantization_config")
        if qc is not None:
            return qc, "config.json quantization_config"
        if self.hf_quant_config is not None:
            return self.hf_quant_config, "hf_quant_config.json"
        plan.add("no-quant-config", "config.json", REFUSED, "no quantization_config nor hf_quant_config.json")
        return None


def read_safetensors_header(path: Path) -> dict[str, TensorMeta]:
    """Parse a safetensors file's JSON header (8-byte little-endian length, then JSON); read scalars' values."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            shape = tuple(info["shape"])
            value = None
            numel = 1
            for s in shape:
                numel *= s
            if numel == 1 and info["dtype"] in (*_SCALAR_FORMATS, "BF16"):
                start, end = info["data_offsets"]
                fh.seek(8 + n + start)
                raw = fh.read(end - start)
                if info["dtype"] == "BF16":  # the high half of a float32
                    value = struct.unpack("<f", b"\x00\x00" + raw)[0]
                else:
                    value = struct.unpack(_SCALAR_FORMATS[info["dtype"]], raw)[0]
            out[name] = TensorMeta(info["dtype"], shape, value)
    return out


@dataclass(frozen=True)
class Finding:
    """One way the engine would not serve the export as stored."""

    engine: str
    rule: str  # short id, stable for tests (e.g. "missing-scale", "fused-shard-mismatch")
    subject: str  # the tensor, module or config key concerned
    effect: str  # REFUSED, SILENT or IGNORED
    message: str

    def __str__(self) -> str:
        return f"[{self.engine}] {self.rule} ({self.effect}) {self.subject}: {self.message}"


@dataclass
class ModulePlan:
    """One Linear the engine builds: its name there, the checkpoint modules loaded into it, its precision."""

    name: str
    sources: tuple[str, ...]  # checkpoint module names (one per shard), in the export's naming
    quantized: bool  # the engine builds it with an FP8 method (weight + weight_scale + input_scale per shard)
    requantized: bool = False  # shard scales differ: the engine requantizes the weights to the largest


@dataclass
class LoadPlan:
    """What one engine's loader makes of an export."""

    engine: str
    modules: dict[str, ModulePlan] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    exclusions: list[str] = field(default_factory=list)  # as the engine holds them after its own renaming
    kv_cache_fp8: bool = False
    lm_head_tied: bool = False

    @property
    def ok(self) -> bool:
        return not self.findings

    def served_fp8(self) -> set[str]:
        """Checkpoint module names the engine runs in FP8."""
        return {s for m in self.modules.values() if m.quantized for s in m.sources}

    def rules(self) -> set[str]:
        return {f.rule for f in self.findings}

    def add(self, rule: str, subject: str, effect: str, message: str) -> None:
        self.findings.append(Finding(self.engine, rule, subject, effect, message))

    def summary(self) -> str:
        lines = [f"{self.engine}: {len(self.modules)} Linears, {sum(m.quantized for m in self.modules.values())} FP8, "
                 f"{len(self.findings)} findings"]
        return "\n".join(lines + [f"  {f}" for f in self.findings])


@dataclass(frozen=True)
class Linear:
    """A Linear of Qwen2.5-VL as the engines fuse it, described in the checkpoint's (legacy) names.

    ``parent`` + ``fused`` is where the engine puts it; ``shards`` are the checkpoint modules loaded into it,
    with the shard id the engine's loader passes and each shard's output rows.
    """

    parent: str  # e.g. "model.layers.0.self_attn", "visual.blocks.1.attn", "" for lm_head
    fused: str  # e.g. "qkv_proj", "o_proj", "qkv", "lm_head"
    shards: tuple[tuple[str, str | int | None, int], ...]  # (checkpoint leaf, shard id, output rows)
    in_features: int
    bias: bool
    tower: str  # "language", "vision" or "head"

    def path(self, leaf: str) -> str:
        return f"{self.parent}.{leaf}" if self.parent else leaf

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(self.path(leaf) for leaf, _, _ in self.shards)


def scale_shape_ok(meta: TensorMeta) -> bool:
    """Per-tensor scale shapes both engines load: a scalar or one element (vLLM parameter.py
    ``_assert_and_load``/``_load_into_shard_id``; SGLang ``needs_scalar_to_array``)."""
    return meta.shape in ((), (1,))


def unique(values: Iterable[float | None]) -> int:
    return len({v for v in values if v is not None})
