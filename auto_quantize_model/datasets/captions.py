"""Read calibration captions from a text file, a COCO captions JSON or a JSONL file.

Blank lines, duplicates, lines that are not valid UTF-8, lines holding NUL bytes and lines of zero-width or
control characters only are dropped and counted; the counts go to the log and to the manifest, so a researcher
can see what the calibration set really held. A leading UTF-8 BOM is no text; a file that is mostly
undecodable or NUL-bearing (UTF-16, binary) is refused.
"""

from __future__ import annotations

import json
import logging
import unicodedata
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


_UTF8_BOM = b"\xef\xbb\xbf"
# Characters that draw nothing but are no Unicode whitespace (str.split keeps them): besides the format (Cf:
# U+200B..U+200F, U+2060..U+2064, U+FEFF, U+00AD, bidi controls...) and control (Cc) categories, these fillers.
_INVISIBLE = frozenset("\u034f\u115f\u1160\u17b4\u17b5\u2800\u3164\uffa0")


def visible(text: str) -> bool:
    """Whether ``text`` holds a character that is drawn (not only spaces, zero-width or control characters)."""
    return any(c != " " and c not in _INVISIBLE and unicodedata.category(c) not in ("Cf", "Cc") for c in text)


@dataclass
class _Lines:
    """A text file's lines decoded one by one (a newline byte never lies inside a UTF-8 character, so splitting
    the bytes first cannot cut a character), with the lines dropped as undecodable or holding NUL bytes."""

    texts: list[str]
    bad_utf8: int
    nul: int

    @classmethod
    def of(cls, raw: bytes, path: Path) -> _Lines:
        texts, bad, nul = [], 0, 0
        for line in raw.splitlines():
            if b"\x00" in line:
                nul += 1
                continue
            try:
                texts.append(line.decode("utf-8"))
            except UnicodeDecodeError:
                bad += 1
        nonblank = sum(1 for t in texts if t.strip()) + bad + nul
        if nonblank and (bad + nul) * 2 > nonblank:
            raise UserError(f"captions file {path} is not UTF-8 text ({bad} of {nonblank} lines undecodable, {nul} "
                            "holding NUL bytes: UTF-16 or binary content?); save it as UTF-8, one caption per line")
        return cls(texts, bad, nul)


def _from_jsonl(lines: _Lines, path: Path) -> tuple[list[str], int]:
    out, no_field = [], 0
    for i, line in enumerate(lines.texts, 1):
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
    return out, no_field


def _from_coco(raw: bytes, path: Path) -> list[str]:
    try:
        data = json.loads(raw.decode("utf-8"))  # the whole file at once: no boundary inside a character
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (byte {exc.start} does not decode); save it as UTF-8") from exc
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); expected COCO "
                        "captions_*.json") from exc
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
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError(f"captions file {p} is not UTF-8 text (UTF-16 or UTF-32); save it as UTF-8, one caption per "
                        "line")
    body = raw.removeprefix(_UTF8_BOM)  # a BOM is an encoding mark, not text of the first caption
    fmt = _detect_format(body, p)
    dropped = {"blank": 0, "duplicate": 0, "bad_utf8": 0, "no_caption_field": 0, "zero_width": 0, "nul": 0}
    if fmt == "coco_json":
        texts = _from_coco(body, p)
    else:
        lines = _Lines.of(body, p)
        dropped["bad_utf8"], dropped["nul"] = lines.bad_utf8, lines.nul
        if fmt == "text":
            texts = lines.texts
        else:
            texts, dropped["no_caption_field"] = _from_jsonl(lines, p)
    seen: set[str] = set()
    captions = []
    for t in texts:
        t = " ".join(t.split())
        if not t:
            dropped["blank"] += 1
        elif "\x00" in t:  # a JSON escape (\u0000): the same garbage as a NUL byte in a text line
            dropped["nul"] += 1
        elif not visible(t):
            dropped["zero_width"] += 1
        elif t in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(t)
            captions.append(t)
    if dropped["nul"]:
        log.warning("captions file %s: dropped %d caption(s) holding NUL bytes (binary data in the file?)", p,
                    dropped["nul"])
    if not captions:
        raise UserError(f"captions file {p} holds no usable captions; give it one caption per line")
    log.info("read %d captions from %s (%s); dropped %s", len(captions), p, fmt, dropped)
    return CaptionSource(str(p.resolve()), fmt, sha256_bytes(raw), captions, dropped)
