"""A checkpoint's weights fingerprint: what tells a base model from its fine-tune when config.json cannot.

The fingerprint is the SHA-256 over the sorted ``(file name, SHA-256 of the file's bytes)`` pairs of every
weight file in the checkpoint folder (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``). Why whole-file
content hashes rather than a sample of each tensor: a sample misses an edit to a few rows (a LoRA merged into
one projection, a patched embedding row), and a result keyed by weights must never be reused across them.
The cost is one read of the weights (about 4-8 s for the 3B's 7.5 GB on one core; shards are hashed in
parallel). To pay it once per checkpoint, each file's hash is remembered in a small cache keyed by the file's
real path, size, modification time and inode (``$XDG_CACHE_HOME/auto_quantize_model/file-hashes.json``, or
``AUTOQUANT_FINGERPRINT_CACHE``); a file rewritten in place gets a new mtime and is hashed again.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from auto_quantize_model.io_utils import atomic_write_json, sha256_file, sha256_json, user_cache_file

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weight_files(model_dir: str | Path) -> list[Path]:
    """The checkpoint's weight files, sorted by name (index JSON files are not weights)."""
    return sorted(p for p in Path(model_dir).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def _cache_path() -> Path:
    return user_cache_file("AUTOQUANT_FINGERPRINT_CACHE", "file-hashes.json")


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def _read_cache(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def weights_fingerprint(model_dir: str | Path) -> str:
    """SHA-256 identity of the checkpoint's weight bytes (see the module docstring)."""
    files = weight_files(model_dir)
    if not files:
        return sha256_json({"weights": "none"})
    t = time.perf_counter()
    cache_file = _cache_path()
    cache = _read_cache(cache_file)
    keys = {f: _stat_key(f) for f in files}
    todo = [f for f in files if keys[f] not in cache]
    if todo:
        with ThreadPoolExecutor(max_workers=min(4, len(todo))) as pool:  # hashlib releases the GIL
            for f, digest in zip(todo, pool.map(sha256_file, todo)):
                cache[keys[f]] = digest
        try:
            atomic_write_json(cache_file, cache)
        except OSError as exc:  # a read-only home only costs the re-hash next time
            log.debug("could not write the fingerprint cache %s: %s", cache_file, exc)
    fingerprint = sha256_json([[f.name, cache[keys[f]]] for f in files])
    log.info("weights fingerprint %s of %d file(s) in %.2fs (%d hashed now)", fingerprint[:12], len(files),
             time.perf_counter() - t, len(todo))
    return fingerprint
