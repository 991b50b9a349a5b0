"""The search cache: ModelOpt's search checkpoints, one per scoring key, safe to share and to interrupt.

ModelOpt writes its checkpoint in place and twice (after calibration, again after scoring), so a search that
is interrupted, runs out of disk, or races another process leaves a torn or half-finished file that every later
run would load. Here:

- one exclusive lock per key (``fcntl.flock`` on ``.search_<key>.lock``; released by the kernel when the
  holder dies) serialises searches of the same key across processes, and across nodes where the shared file
  system supports POSIX locks (NFSv4, Lustre with ``flock``);
- a new search writes to ``.search_<key>.partial.pth`` and the file is renamed to ``search_<key>.pth`` only
  when the search finished; a marker ``search_<key>.json`` (identity and SHA-256 of the file) is written last;
- a checkpoint is reused only if its marker exists, names the same key and identity, and its bytes match the
  marker's hash. Anything else (no marker, torn file, another identity) is moved aside as
  ``search_<key>.pth.bad-<time>`` with a warning and recomputed.

``reused`` in a manifest means exactly that: calibration and scores were read from a checkpoint that passed
these checks.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from auto_quantize_model.errors import UserError
from auto_quantize_model.io_utils import atomic_write_json, sha256_file

log = logging.getLogger(__name__)

CACHE_FORMAT = "auto_quantize_model.search-cache/v1"
_MARKER_CHECKS = frozenset({"format", "key", "identity", "sha256"})


@dataclass
class CacheEntry:
    """Where ModelOpt should read/write, and whether it holds finished, verified scores."""

    key: str
    final: Path
    checkpoint: Path  # the path handed to ModelOpt: ``final`` when reusable, else the partial file
    reusable: bool
    # Marker fields of a reusable entry beyond the checks (``derived_from``: the shared scoring pass it came from).
    marker: dict[str, Any] = field(default_factory=dict)
    # What the block adds to the marker it commits (a scoring pass's ``raw_scores``).
    extra: dict[str, Any] = field(default_factory=dict)
    # Set by a block that fails after ModelOpt saved finished scores (a budget the exact solve refuses): the scores
    # are committed all the same, so the next budget re-solves instead of scoring again.
    scores_complete: bool = False


def _torch_write_failed(exc: RuntimeError) -> bool:
    """Whether ``torch.save`` (ModelOpt saves search checkpoints with it) failed writing its file: torch reports a
    failed or short write (ENOSPC, EIO) as a RuntimeError of its zip writer, without the OS error number."""
    msg = str(exc)
    return ("PytorchStreamWriter" in msg or ("inline_container.cc" in msg and "unexpected pos" in msg)
            or "basic_ios::clear" in msg)  # the end-of-file write of torch's zip writer


class SearchCache:
    """One cache directory; :meth:`entry` is the only way to a checkpoint."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def paths(self, key: str) -> tuple[Path, Path, Path, Path]:
        """(checkpoint, marker, partial, lock) for ``key``."""
        d = self.directory
        return d / f"search_{key}.pth", d / f"search_{key}.json", d / f".search_{key}.partial.pth", d / f".search_{key}.lock"

    def ready(self, key: str, identity: dict[str, Any]) -> bool:
        """Whether ``key`` holds a verified checkpoint now (no lock: a hint; :meth:`entry` decides)."""
        return self._verified(key, identity) is None

    def marker(self, key: str) -> dict[str, Any]:
        """The marker of ``key`` (empty if absent or unreadable); read after :meth:`ready` or inside an entry."""
        try:
            meta = json.loads(self.paths(key)[1].read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return meta if isinstance(meta, dict) else {}

    def store(self, key: str, identity: dict[str, Any], state: dict[str, Any], **extra: Any) -> bool:
        """Commit a search checkpoint computed elsewhere (a derived one) under ``key``; False if one is there."""
        from modelopt.torch.utils.serialization import safe_save

        with self.entry(key, identity) as e:
            if e.reusable:
                return False
            safe_save(state, str(e.checkpoint))
            e.extra.update(extra)
        return True

    def _verified(self, key: str, identity: dict[str, Any]) -> str | None:
        """None if the checkpoint can be reused, else why not."""
        final, marker, _, _ = self.paths(key)
        if not final.exists():
            return "absent"
        try:
            meta = json.loads(marker.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return "no completion marker (an interrupted search, or written by an older version)"
        except (OSError, ValueError) as exc:
            return f"unreadable marker ({exc.__class__.__name__})"
        if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
            return "marker of another format or key"
        if meta.get("identity") != identity:
            return "marker records another identity"
        try:
            digest = sha256_file(final)
        except OSError as exc:
            return f"unreadable checkpoint ({exc.__class__.__name__})"
        if digest != meta.get("sha256"):
            return "checkpoint bytes differ from the marker's hash (torn or modified)"
        return None

    def _move_aside(self, key: str, reason: str) -> None:
        final, marker, _, _ = self.paths(key)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for p in (final, marker):
            if p.exists():
                aside = p.with_name(f"{p.name}.bad-{stamp}-{os.getpid()}")
                os.replace(p, aside)
                log.warning("search cache %s: %s; moved to %s and recomputing", p.name, reason, aside.name)

    @contextlib.contextmanager
    def entry(self, key: str, identity: dict[str, Any]) -> Iterator[CacheEntry]:
        """Hold the key's lock for one search; commit the checkpoint if the block finishes without error."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            final, marker, partial, lock_path = self.paths(key)
            lock = open(lock_path, "a+b")  # noqa: SIM115 - held for the whole block
        except OSError as exc:
            raise UserError(f"cache dir {self.directory} is not writable ({exc.strerror}); pass a writable --cache-dir") from exc
        try:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("search cache %s: another process is searching this key; waiting for it", key)
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            # We hold the lock: a partial file here belongs to a search that died.
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
            why = self._verified(key, identity)
            if why is not None and why != "absent":
                self._move_aside(key, why)
            reusable = why is None
            meta = self.marker(key) if reusable else {}
            entry = CacheEntry(key, final, final if reusable else partial, reusable,
                               {k: v for k, v in meta.items() if k not in _MARKER_CHECKS})
            try:
                yield entry
            except BaseException as exc:
                if entry.scores_complete and not reusable and isinstance(exc, Exception):
                    self._commit(key, identity, partial, entry.extra)
                with contextlib.suppress(FileNotFoundError):
                    partial.unlink()
                if isinstance(exc, RuntimeError) and _torch_write_failed(exc):
                    raise UserError(f"could not write the search checkpoint in {self.directory} (a full disk or an "
                                    "I/O error); free space or pass another --cache-dir (the next run recomputes)") from exc
                raise
            if not reusable:
                self._commit(key, identity, partial, entry.extra)
        finally:
            lock.close()  # closing releases the flock

    def _commit(self, key: str, identity: dict[str, Any], partial: Path, extra: dict[str, Any]) -> None:
        final, marker, _, _ = self.paths(key)
        if not partial.exists():  # ModelOpt saves only when it computed something; nothing to commit
            return
        try:
            digest = sha256_file(partial)
            os.replace(partial, final)
            atomic_write_json(marker, {"format": CACHE_FORMAT, "key": key, "identity": identity, "sha256": digest,
                                       "written_at": time.time(), **extra})
        except OSError as exc:
            for p in (partial, marker):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            raise UserError(f"could not write the search cache in {self.directory} ({exc.strerror}); free space "
                            "or pass another --cache-dir (the next run recomputes)") from exc
