"""Read tensors straight from ``*.safetensors`` files into tensors already placed on their device.

``safetensors_header.check_header`` checks a file before anything is read from it (a truncated or corrupt file is
one ``UserError``; an entry's dtype is the file's name for it, looked up in :data:`DTYPES` here). On the host,
:func:`map_tensors` maps the chosen tensors (no read, no copy). For a GPU, :func:`read_into` copies the bytes of the
chosen tensors into destination tensors: each file range is read with ``preadv`` into a small staging buffer (pinned
when the destination is a GPU, so the upload is a DMA that overlaps the next read), and scattered into the
destinations' bytes; a destination of another dtype gets the bytes in a scratch tensor of the file's dtype on its
device and is cast there (what ``tensor.to(dtype)`` does). Ranges run in parallel threads (``preadv``, ``hashlib``
and the copies release the GIL). A file whose SHA-256 is wanted is hashed whole in a thread of its own while the
tensors load: the two readers share the page cache, so the weights fingerprint costs no second read from disk and,
hashing being the slower of the two, hides the load behind it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from auto_quantize_model.errors import UserError
from auto_quantize_model.safetensors_header import CheckedHeader, HeaderEntry

# safetensors dtype names (safetensors/src/tensor.rs ``Dtype``) -> torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
CHUNK = 16 << 20  # staging buffer size: big enough for full-speed reads and uploads, small enough to pin cheaply
HASH_CHUNK = 1 << 20  # hashed while still in the CPU cache: 1 MiB reads hash about twice as fast as 16 MiB ones
PIECE = 256 << 20  # ranges not hashed are split into pieces of about this size (at tensor boundaries) for threads


def map_tensors(header: CheckedHeader, entries: list[HeaderEntry]) -> dict[str, torch.Tensor]:
    """CPU tensors backed by a private (copy-on-write) memory map of the file, as safetensors and ``from_pretrained``
    give on the host: nothing is read until a page is touched, and the pages are the page cache's (processes loading
    one checkpoint on one host share them). Only ``entries`` get tensors."""
    with open(header.path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)  # the tensors hold the map; the file may close
    out = {}
    for e in entries:
        numel = math.prod(e.shape)
        flat = (torch.frombuffer(mm, dtype=DTYPES[e.dtype], count=numel, offset=e.start) if numel
                else torch.empty(0, dtype=DTYPES[e.dtype]))
        out[e.name] = flat.view(e.shape)
    return out


Destination = tuple[HeaderEntry, torch.Tensor]


@dataclass
class _Unit:
    """One byte range of one file holding the destinations' tensors, read in order by one thread."""

    path: Path
    start: int
    end: int
    dests: list[Destination]


@dataclass
class ReadStats:
    """What :func:`read_into` did: tensor bytes loaded, file bytes hashed, seconds, and the files' SHA-256."""

    bytes_loaded: int = 0
    bytes_hashed: int = 0
    seconds: float = 0.0
    digests: dict[Path, str] = field(default_factory=dict)

    @property
    def gb_per_s(self) -> float:
        """Tensor bytes loaded per second (decimal GB)."""
        return self.bytes_loaded / 1e9 / self.seconds if self.seconds > 0 else 0.0


def _units(path: Path, dests: list[Destination]) -> list[_Unit]:
    """Group a file's destinations into ranges: back-to-back tensors share a range, up to about ``PIECE``. A tensor
    not wanted (the vision tower's, for the language model) is never read: it ends the range before it."""
    units: list[_Unit] = []
    for entry, dest in sorted(dests, key=lambda d: d[0].start):
        last = units[-1] if units else None
        if last is not None and entry.start == last.end and last.end - last.start < PIECE:
            last.end = max(last.end, entry.end)
            last.dests.append((entry, dest))
        else:
            units.append(_Unit(path, entry.start, entry.end, [(entry, dest)]))
    return units


class _Staging:
    """A thread's two staging buffers; for a GPU, pinned, each guarded by an event so a refill waits for its upload."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.bufs = [torch.empty(CHUNK, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(2)]
        self.events: list[Any] = [None, None]
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.turn = 0

    def next(self) -> tuple[torch.Tensor, int]:
        i = self.turn
        self.turn ^= 1
        if self.events[i] is not None:
            self.events[i].synchronize()
        return self.bufs[i], i

    def uploaded(self, i: int) -> None:
        if self.stream is not None:
            event = torch.cuda.Event()
            event.record(self.stream)
            self.events[i] = event


def _pread_exactly(fd: int, mem: memoryview, offset: int, path: Path) -> None:
    got = 0
    while got < len(mem):
        r = os.preadv(fd, [mem[got:]], offset + got)
        if r == 0:
            raise UserError(f"checkpoint file {path} is corrupt: it ends at byte {offset + got:,}, inside its tensor "
                            "data (truncated, or replaced during the load); re-download or re-save the checkpoint")
        got += r


def _read_unit(unit: _Unit, staging: _Staging) -> int:
    """Stream ``unit``'s range through the staging buffers into its destinations; returns the tensor bytes copied."""
    fd = os.open(unit.path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, unit.start, unit.end - unit.start, os.POSIX_FADV_SEQUENTIAL)
        scratch: dict[str, torch.Tensor] = {}
        pos = unit.start
        while pos < unit.end:
            buf, i = staging.next()
            view = buf[:min(CHUNK, unit.end - pos)]
            _pread_exactly(fd, memoryview(view.numpy()), pos, unit.path)
            _scatter(view, pos, unit.dests, scratch)
            staging.uploaded(i)
            pos += view.numel()
        return sum(e.end - e.start for e, _ in unit.dests)
    finally:
        os.close(fd)


def _scatter(view: torch.Tensor, pos: int, dests: list[Destination], scratch: dict[str, torch.Tensor]) -> None:
    """Copy the part of ``view`` (the file's bytes from offset ``pos``) that each destination overlaps into it."""
    end = pos + view.numel()
    for entry, dest in dests:
        a, b = max(pos, entry.start), min(end, entry.end)
        if a >= b:
            continue
        if dest.dtype == DTYPES[entry.dtype]:
            target = dest.view(-1).view(torch.uint8)
        else:  # the file's bytes go to a scratch tensor on the device, cast into place once complete
            if entry.name not in scratch:
                scratch[entry.name] = torch.empty(entry.end - entry.start, dtype=torch.uint8, device=dest.device)
            target = scratch[entry.name]
        target[a - entry.start:b - entry.start].copy_(view[a - pos:b - pos], non_blocking=True)
        if b == entry.end and entry.name in scratch:
            dest.copy_(scratch.pop(entry.name).view(DTYPES[entry.dtype]).view(entry.shape))


def _hash_file(path: Path) -> tuple[str, int]:
    """SHA-256 of a whole file, streamed (``hashlib`` releases the GIL on large updates)."""
    h = hashlib.sha256()
    buf = bytearray(HASH_CHUNK)
    mem = memoryview(buf)
    n = 0
    with open(path, "rb", buffering=0) as fh:
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while r := fh.readinto(mem):
            h.update(mem[:r])
            n += r
    return h.hexdigest(), n


def _run_threads(targets: list[Callable[[], None]], errors: list[BaseException]) -> None:
    def guarded(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised by the caller, in its own thread
                errors.append(exc)
        return run

    threads = [threading.Thread(target=guarded(fn), name=f"checkpoint-read-{i}", daemon=True)
               for i, fn in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def read_into(files: list[tuple[Path, list[Destination]]], device: torch.device, hash_paths: list[Path],
              threads: int | None = None) -> ReadStats:
    """Fill every destination tensor (on ``device``, contiguous, the entry's shape) from its file, and hash the
    files in ``hash_paths`` whole, in threads of their own, while the tensors load (from the page cache the loads
    warm, or warm for them: the disk is read about once)."""
    t0 = time.perf_counter()
    units = [u for path, dests in files for u in _units(path, dests)]
    units.sort(key=lambda u: u.end - u.start, reverse=True)  # longest first: the threads finish together
    todo: queue.SimpleQueue[_Unit] = queue.SimpleQueue()
    for u in units:
        todo.put(u)
    loaded: list[int] = []
    hashed: dict[Path, tuple[str, int]] = {}
    errors: list[BaseException] = []

    def load() -> None:
        staging = _Staging(device)
        on_gpu = contextlib.ExitStack()
        if staging.stream is not None:  # the current device and stream are per thread: name both
            on_gpu.enter_context(torch.cuda.device(device))
            on_gpu.enter_context(torch.cuda.stream(staging.stream))
        with on_gpu:
            try:
                while not errors:
                    try:
                        unit = todo.get_nowait()
                    except queue.Empty:
                        break
                    loaded.append(_read_unit(unit, staging))
            finally:
                if staging.stream is not None:
                    staging.stream.synchronize()

    def hasher(path: Path) -> Callable[[], None]:
        def run() -> None:
            hashed[path] = _hash_file(path)
        return run

    n_load = max(0, min(threads or min(8, os.cpu_count() or 1), len(units)))
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the destinations' memory may have been freed by work still queued
    _run_threads([hasher(p) for p in hash_paths] + [load] * n_load, errors)
    if device.type == "cuda" and hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()  # give the staging buffers' pinned pages back to the system
    if errors:
        exc = errors[0]
        if isinstance(exc, OSError):
            raise UserError(f"cannot read the checkpoint ({exc.strerror or exc}); check its files and the "
                            "disk") from exc
        raise exc
    return ReadStats(bytes_loaded=sum(loaded), bytes_hashed=sum(n for _, n in hashed.values()),
                     seconds=time.perf_counter() - t0, digests={p: d for p, (d, _) in hashed.items()})
