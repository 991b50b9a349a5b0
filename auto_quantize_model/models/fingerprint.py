"""A checkpoint's weights fingerprint: what tells a base model from its fine-tune when config.json cannot.

The fingerprint is the SHA-256 over the sorted ``(file name, SHA-256 of the file's bytes)`` pairs of every
weight file in the checkpoint folder (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``). Why whole-file
content hashes rather than a sample of each tensor: a sample misses an edit to a few rows (a LoRA merged into
one projection, a patched embedding row), and a result keyed by weights must never be reused across them.
The cost is one read of the weights (about 4-8 s for the 3B's 7.5 GB on one core); the loader hashes a file in a
thread of its own while it loads the tensors (``models/safetensors_read.py``), so no second read is paid.

Each file's hash is remembered in a small cache (``$XDG_CACHE_HOME/auto_quantize_model/file-hashes.json``, or
``AUTOQUANT_FINGERPRINT_CACHE``; one entry per file, at most ``MAX_ENTRIES``), used only while the file's real
path, size, modification time, status-change time (ctime), inode and device are the same **and** a content sample
(head, tail and 16 fixed-offset blocks, hashed) still matches. An edit in place changes the ctime even when the
mtime is put back (``os.utime`` itself sets the ctime, and nothing can set it back); the sample catches edits on
file systems whose times cannot be trusted. Writes are atomic (temporary file, rename) and serialised between
processes by an ``flock`` on a lock file beside the cache, each writer merging into what is there.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from auto_quantize_model.io_utils import atomic_write_json, sha256_file, sha256_json, user_cache_file

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
CACHE_VERSION = 2
MAX_ENTRIES = 256  # files remembered; the oldest hashed are dropped first
SAMPLE_EDGE = 64 << 10  # bytes of head and of tail in the content sample
SAMPLE_BLOCKS, SAMPLE_BLOCK = 16, 4 << 10  # fixed-offset blocks in between


def weight_files(model_dir: str | Path) -> list[Path]:
    """The checkpoint's weight files, sorted by name (index JSON files are not weights)."""
    return sorted(p for p in Path(model_dir).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def _cache_path() -> Path:
    return user_cache_file("AUTOQUANT_FINGERPRINT_CACHE", "file-hashes.json")


def content_sample(path: Path, size: int) -> str:
    """SHA-256 of the file's size, first and last ``SAMPLE_EDGE`` bytes and ``SAMPLE_BLOCKS`` blocks at fixed
    fractions of its length: a few hundred KB read, whatever the file's size."""
    h = hashlib.sha256(str(size).encode())
    offsets = [0, *(size * i // (SAMPLE_BLOCKS + 1) for i in range(1, SAMPLE_BLOCKS + 1)), max(0, size - SAMPLE_EDGE)]
    lengths = [SAMPLE_EDGE, *([SAMPLE_BLOCK] * SAMPLE_BLOCKS), SAMPLE_EDGE]
    with open(path, "rb", buffering=0) as fh:
        for off, n in zip(offsets, lengths):
            h.update(os.pread(fh.fileno(), n, off))
    return h.hexdigest()


@dataclass(frozen=True)
class FileStamp:
    """What must be unchanged for a cached hash of a file to be used."""

    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    dev: int
    sample: str

    @classmethod
    def of(cls, path: Path) -> FileStamp:
        """Stat ``path`` and sample its content."""
        st = path.stat()
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev, content_sample(path, st.st_size))


def _read_cache(path: Path) -> dict[str, dict[str, Any]]:
    """The cache's entries by real path; a missing, unreadable or old-format cache is empty (it only costs hashes)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("files"), dict):
        return {}
    return {k: v for k, v in data["files"].items() if isinstance(v, dict) and isinstance(v.get("sha256"), str)}


def _cached_digest(entry: dict[str, Any] | None, stamp: FileStamp) -> str | None:
    if entry is None or any(entry.get(k) != v for k, v in asdict(stamp).items()):
        return None
    return str(entry["sha256"])


@contextlib.contextmanager
def _locked(cache_file: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<cache>.lock`` (serialises the read-merge-write of concurrent processes)."""
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{cache_file}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _store(new: dict[Path, tuple[FileStamp, str]]) -> None:
    """Merge ``new`` (real path -> stamp, digest) into the cache file under the lock; keep the newest entries."""
    cache_file = _cache_path()
    try:
        with _locked(cache_file):
            entries = _read_cache(cache_file)
            now = time.time()
            for path, (stamp, digest) in new.items():
                entries[str(path)] = {**asdict(stamp), "sha256": digest, "hashed_at": now}
            keep = sorted(entries.items(), key=lambda kv: float(kv[1].get("hashed_at", 0)), reverse=True)[:MAX_ENTRIES]
            atomic_write_json(cache_file, {"version": CACHE_VERSION, "files": dict(keep)})
    except OSError as exc:  # a read-only home only costs the re-hash next time
        log.debug("could not write the fingerprint cache %s: %s", cache_file, exc)


@dataclass
class FingerprintPlan:
    """A checkpoint's weight files, the hashes the cache still vouches for, and the files left to hash.

    The loader hashes :attr:`todo` while it reads the tensors and hands the digests to :meth:`finish`.
    """

    files: list[Path]
    stamps: dict[Path, FileStamp]
    known: dict[Path, str] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    @property
    def todo(self) -> list[Path]:
        """Files whose hash must be computed."""
        return [f for f in self.files if f not in self.known]

    def finish(self, digests: dict[Path, str]) -> str:
        """The fingerprint, from the known hashes and ``digests`` (every file of :attr:`todo`); remembers the new
        ones unless the file changed while it was hashed."""
        missing = [f for f in self.todo if f not in digests]
        if missing:
            raise ValueError(f"no hash for {missing[0]}")
        fresh = {}
        for f in self.todo:
            try:
                st = f.stat()
            except OSError:
                continue
            s = self.stamps[f]
            if (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) == (s.size, s.mtime_ns, s.ctime_ns, s.ino):
                fresh[f.resolve()] = (s, digests[f])
        if fresh:
            _store(fresh)
        every = {**self.known, **digests}
        fingerprint = sha256_json([[f.name, every[f]] for f in self.files])
        log.info("weights fingerprint %s of %d file(s) in %.2fs (%d hashed now)", fingerprint[:12], len(self.files),
                 time.perf_counter() - self.started, len(self.todo))
        return fingerprint


def plan_fingerprint(model_dir: str | Path) -> FingerprintPlan:
    """Stat and sample every weight file of ``model_dir`` and look its hash up in the cache (keyed by the file's
    real path: a Hugging Face cache's symlinked snapshot shares its blobs' entries)."""
    files = weight_files(model_dir)
    stamps = {f: FileStamp.of(f) for f in files}
    entries = _read_cache(_cache_path())
    known = {f: d for f in files if (d := _cached_digest(entries.get(str(f.resolve())), stamps[f])) is not None}
    return FingerprintPlan(files, stamps, known)


def hash_files(paths: list[Path]) -> dict[Path, str]:
    """SHA-256 of each file, up to 4 in parallel (``hashlib`` releases the GIL)."""
    if not paths:
        return {}
    with ThreadPoolExecutor(max_workers=min(4, len(paths))) as pool:
        return dict(zip(paths, pool.map(sha256_file, paths)))


def weights_fingerprint(model_dir: str | Path) -> str:
    """SHA-256 identity of the checkpoint's weight bytes (see the module docstring)."""
    plan = plan_fingerprint(model_dir)
    if not plan.files:
        return sha256_json({"weights": "none"})
    return plan.finish(hash_files(plan.todo))
