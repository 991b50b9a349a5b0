"""A safetensors file's header, parsed and checked without torch: the preflight (driver, CLI) and the loader share it.

The format (https://huggingface.co/docs/safetensors, "Format"): an 8-byte little-endian header length ``N``, ``N``
bytes of JSON mapping each tensor name to ``{dtype, shape, data_offsets: [begin, end]}`` (offsets relative to the
first byte after the header; ``__metadata__`` holds strings), then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from auto_quantize_model.errors import UserError

# Bytes per element of each safetensors dtype name (safetensors/src/tensor.rs ``Dtype``) this project reads.
ITEM_BYTES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U16": 2, "U32": 4,
    "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
MAX_HEADER = 100 << 20  # the safetensors library's own limit on the JSON header


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor of a safetensors file: its dtype name, shape and absolute byte range ``[start, end)``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class CheckedHeader:
    """A header whose every entry is well formed, inside the file and overlapping no other."""

    path: Path
    size: int
    entries: dict[str, HeaderEntry]


def checkpoint_files(model_dir: str | Path) -> list[Path] | None:
    """The files ``from_pretrained`` reads: ``model.safetensors``, else those ``model.safetensors.index.json`` names;
    None when the directory has neither (not a safetensors checkpoint)."""
    model_dir = Path(model_dir)
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    index = model_dir / "model.safetensors.index.json"
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{index} is unreadable ({exc.__class__.__name__}); re-download or re-save the "
                        "checkpoint") from exc
    files = [model_dir / str(n) for n in names]
    for f in files:
        if Path(f.name) != Path(str(f.relative_to(model_dir))) or not f.is_file():
            raise UserError(f"{index} names {f.name}, which is not a file of {model_dir}; re-download the checkpoint")
    return files


def corrupt(path: Path, reason: str) -> UserError:
    """The one-line refusal of a corrupt checkpoint file."""
    return UserError(f"checkpoint file {path} is corrupt: {reason}; re-download or re-save the checkpoint")


def check_header(path: str | Path) -> CheckedHeader:
    """Parse and check ``path``'s header: JSON object, known dtypes, byte counts that match the shapes, no overlaps,
    and every tensor's data inside the file (a truncated file is refused here, before any weight is read)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise corrupt(path, "shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, MAX_HEADER):
                raise corrupt(path, "header length beyond the end of the file")
            header = json.loads(fh.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise corrupt(path, f"unreadable header ({exc.__class__.__name__})") from exc
    except OSError as exc:
        raise UserError(f"cannot read checkpoint file {path} ({exc.strerror or exc.__class__.__name__})") from exc
    if not isinstance(header, dict):
        raise corrupt(path, "header is not a JSON object")
    base = 8 + n
    entries: dict[str, HeaderEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entry = _entry(path, name, info, base)
        if entry.end > size:
            raise corrupt(path, f"truncated (tensor {name} ends at byte {entry.end:,}, the file has {size:,})")
        entries[name] = entry
    spans = sorted((e.start, e.end, e.name) for e in entries.values() if e.end > e.start)
    for (_, end_a, a), (start_b, _, b) in itertools.pairwise(spans):
        if start_b < end_a:
            raise corrupt(path, f"tensors {a} and {b} overlap")
    return CheckedHeader(path, size, entries)


def _entry(path: Path, name: str, info: object, base: int) -> HeaderEntry:
    if not isinstance(info, dict):
        raise corrupt(path, f"entry {name!r} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEM_BYTES:
        raise UserError(f"checkpoint file {path}: tensor {name} has dtype {dtype!r}, which this loader does not read; "
                        f"save the checkpoint in one of {', '.join(ITEM_BYTES)}")
    if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
            or not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
        raise corrupt(path, f"entry {name!r} has a malformed shape or data_offsets")
    nbytes = math.prod(shape) * ITEM_BYTES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise corrupt(path, f"tensor {name} holds {offsets[1] - offsets[0]:,} bytes; its shape {shape} needs "
                            f"{nbytes:,}")
    return HeaderEntry(name, dtype, tuple(shape), base + offsets[0], base + offsets[1])
