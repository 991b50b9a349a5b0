"""Read calibration captions from a text file, a COCO captions JSON or a JSONL file.

Blank lines, duplicates and lines that are not valid UTF-8 are dropped and counted; the counts go to
the log and to the manifest, so a researcher can see what the calibration set really held.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from auto_quantize_model.datasets.demo import DEMO_CAPTIONS_PATH
from auto_quantize_model.errors import UserError
from auto_quantize_model.io_utils import sha256_bytes

log = logging.getLogger(__name__)

# The seed project's default location for real COCO captions (one per line).
DEFAULT_CAPTIONS_PATH = "datasets/vlm-quantize-calib/coco2017_captions.txt"
DEMO = "demo"


@dataclass
class CaptionSource:
    """Captions in file order, with where they came from and what was dropped."""

    path: str
    format: str
    content_hash: str
    captions: list[str]
    dropped: dict[str, int] = field(default_factory=dict)

    def describe(self) -> dict:
        """The manifest's view of the source."""
        return {"path": self.path, "format": self.format, "content_hash": self.content_hash,
                "num_captions": len(self.captions), "dropped": dict(self.dropped)}


def resolve_captions_path(path: str | None) -> Path:
    """``demo`` (or nothing, when the seed default is absent) means the embedded demo set."""
    if path == DEMO:
        return DEMO_CAPTIONS_PATH
    p = Path(path or DEFAULT_CAPTIONS_PATH)
    if not p.exists():
        hint = (
            "convert COCO annotations with scripts/data/coco_captions_to_txt.py, "
            "or pass --captions-path demo for the embedded demo captions"
        )
        raise UserError(f"captions file {p} does not exist; {hint}")
    if not p.is_file():
        raise UserError(f"captions path {p} is not a file; pass a .txt, COCO .json or .jsonl file")
    return p


TEXT_SUFFIXES = (".txt", ".text", ".csv", ".tsv", ".md")


def _detect_format(raw: bytes, path: Path) -> str:
    """The suffix decides (.jsonl, .json, .txt...); only an unknown suffix falls back to the content."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "jsonl"
    if suffix == ".json":
        return "coco_json"
    if suffix in TEXT_SUFFIXES:
        return "text"
    head = raw.lstrip()[:1]
    if head == b"{" and b"\n{" in raw.strip():
        return "jsonl"
    if head in (b"{", b"["):
        return "coco_json"
    return "text"


def _check_decodable(raw: bytes, path: Path) -> None:
    """Refuse UTF-16/32 and binary files: read as UTF-8 lines they calibrate on garbage."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in raw[:1 << 16]:
        raise UserError(f"captions file {path} is not UTF-8 text (UTF-16 or binary content); save it as UTF-8, "
                        "one caption per line")
    lines = raw[:1 << 20].splitlines()
    bad = 0
    for line in lines:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            bad += 1
    if lines and bad * 2 > len(lines):
        raise UserError(f"captions file {path} is not UTF-8 text ({bad} of {len(lines)} lines undecodable); "
                        "save it as UTF-8, one caption per line")


def _from_lines(raw: bytes) -> tuple[list[str], int]:
    out, bad = [], 0
    for line in raw.splitlines():
        try:
            out.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            bad += 1
    return out, bad


def _from_jsonl(raw: bytes, path: Path) -> tuple[list[str], int, int]:
    lines, bad = _from_lines(raw)
    out, no_field = [], 0
    for i, line in enumerate(lines, 1):
        if not line.strip():
            out.append("")
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            no_field += 1
            log.debug("%s:%d is not JSON", path, i)
            continue
        text = rec.get("caption", rec.get("text")) if isinstance(rec, dict) else None
        if isinstance(text, str):
            out.append(text)
        else:
            no_field += 1
    return out, bad, no_field


def _from_coco(raw: bytes, path: Path) -> list[str]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc.__class__.__name__}); expected COCO captions_*.json") from exc
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise UserError(f"{path} has no 'annotations' list; expected the COCO captions_*.json format")
    return [a["caption"] for a in data["annotations"] if isinstance(a, dict) and isinstance(a.get("caption"), str)]


def read_captions(path: str | None) -> CaptionSource:
    """Read, clean and de-duplicate captions (first occurrence kept, order preserved)."""
    p = resolve_captions_path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise UserError(f"captions file {p} is unreadable ({exc.strerror}); check its permissions") from exc
    _check_decodable(raw, p)
    fmt = _detect_format(raw, p)
    dropped = {"blank": 0, "duplicate": 0, "bad_utf8": 0, "no_caption_field": 0}
    if fmt == "text":
        texts, dropped["bad_utf8"] = _from_lines(raw)
    elif fmt == "jsonl":
        texts, dropped["bad_utf8"], dropped["no_caption_field"] = _from_jsonl(raw, p)
    else:
        texts = _from_coco(raw, p)
    seen: set[str] = set()
    captions = []
    for t in texts:
        t = " ".join(t.split())
        if not t:
            dropped["blank"] += 1
        elif t in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(t)
            captions.append(t)
    if not captions:
        raise UserError(f"captions file {p} holds no usable captions; give it one caption per line")
    log.info("read %d captions from %s (%s); dropped %s", len(captions), p, fmt, dropped)
    return CaptionSource(str(p.resolve()), fmt, sha256_bytes(raw), captions, dropped)
