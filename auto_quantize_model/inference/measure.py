"""Measured cost of a language model on a GPU: prefill and decode tokens/s and weight memory.

Timings mean something only on a CUDA GPU: each figure is taken after warm-up (which also triggers
``torch.compile``), with ``torch.cuda.synchronize`` before the clock starts and before it stops, and
is the median of several repeats. On a CPU :func:`check_measurable` refuses (exit 2): CPU FP8 runs
the dequantize fallback, so its speed says nothing about FP8 serving. ``MeasureSettings.allow_cpu``
lifts the refusal for tests only (the code paths and columns are exercised, the numbers mean nothing).
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from auto_quantize_model.errors import UserError, check_positive

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MeasureSettings:
    """Shapes and repeats of a measurement. Inputs are seeded random token ids (speed does not depend on them)."""

    batch_size: int = 4
    seq_len: int = 512
    decode_batch_size: int = 4
    decode_prompt_len: int = 128
    decode_tokens: int = 64
    repeats: int = 10
    warmup: int = 3
    compile: bool = True
    seed: int = 0
    allow_cpu: bool = False  # tests only: time on CPU too (meaningless numbers, real code paths)

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "decode_batch_size", "decode_prompt_len", "decode_tokens", "repeats",
                     "warmup"):
            check_positive(name.replace("_", "-"), getattr(self, name))

    def describe(self) -> dict[str, Any]:
        """JSON-ready form for result files."""
        return asdict(self)


def check_measurable(device: torch.device, allow_cpu: bool = False) -> None:
    """Refuse to time anything off a CUDA GPU (unless ``allow_cpu``, for tests)."""
    if device.type != "cuda" and not allow_cpu:
        raise UserError("--measure times FP8 kernels and needs a CUDA GPU (compute capability >= 8.9 for FP8); "
                        "on CPU the numbers would mean nothing: run it on a GPU or drop --measure")


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so the clock covers the kernels, not their launch (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, repeats: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def prefill_tokens_per_second(model: nn.Module, vocab_size: int, batch: int, seq_len: int, settings: MeasureSettings,
                              forward=None) -> float:
    """Tokens/s of one full forward (all positions' logits, as evaluation runs it) at ``batch`` x ``seq_len``."""
    device = next(model.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(settings.seed)
    ids = torch.randint(0, vocab_size, (batch, seq_len), generator=g).to(device)
    fwd = model if forward is None else forward
    seconds = _median_seconds(lambda: fwd(ids), settings.repeats, settings.warmup, device)
    return batch * seq_len / seconds


@torch.no_grad()
def decode_tokens_per_second(model: nn.Module, vocab_size: int, settings: MeasureSettings) -> float:
    """Tokens/s of greedy decoding with a KV cache (eager), prompt prefill excluded from the time."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(settings.seed)
    b, n = settings.decode_batch_size, settings.decode_tokens
    prompt = torch.randint(0, vocab_size, (b, settings.decode_prompt_len), generator=g).to(device)

    def run() -> None:
        cache = DynamicCache()
        hidden = model.model(input_ids=prompt, past_key_values=cache, use_cache=True).last_hidden_state
        nxt = model.lm_head(hidden[:, -1]).argmax(-1, keepdim=True)
        _sync(device)
        t = time.perf_counter()
        for _ in range(n):
            hidden = model.model(input_ids=nxt, past_key_values=cache, use_cache=True).last_hidden_state
            nxt = model.lm_head(hidden[:, -1]).argmax(-1, keepdim=True)
        _sync(device)
        run.seconds.append(time.perf_counter() - t)

    run.seconds = []
    for _ in range(settings.warmup):
        run()
    run.seconds = []
    for _ in range(max(1, settings.repeats // 3)):
        run()
    return b * n / statistics.median(run.seconds)


def measure_model(model: nn.Module, vocab_size: int, settings: MeasureSettings,
                  shapes: tuple[tuple[int, int], ...] | None = None) -> dict[str, Any]:
    """Prefill tokens/s at each (batch, length), decode tokens/s and weight bytes of one LM on its GPU."""
    from auto_quantize_model.inference.fp8_linear import weight_bytes

    device = next(model.parameters()).device
    check_measurable(device, settings.allow_cpu)
    shapes = shapes or ((settings.batch_size, settings.seq_len),)
    forward = torch.compile(model) if settings.compile else model
    out: dict[str, Any] = {"weight_bytes": weight_bytes(model), "compiled_prefill": settings.compile}
    for b, s in shapes:
        out[f"prefill_tokens_per_s_{b}x{s}"] = prefill_tokens_per_second(model, vocab_size, b, s, settings, forward)
    out["prefill_tokens_per_s"] = out[f"prefill_tokens_per_s_{shapes[0][0]}x{shapes[0][1]}"]
    out["decode_tokens_per_s"] = decode_tokens_per_second(model, vocab_size, settings)
    out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    log.info("measured: %s", {k: round(v, 1) if isinstance(v, float) else v for k, v in out.items()})
    return out


def measure_runs(loaded: Any, runs: list[Any], settings: MeasureSettings, work_dir: str | Path) -> dict[str, Any]:
    """``compare --measure``: BF16 and each run's export (written under ``work_dir``, removed after) measured alike."""
    import shutil
    import tempfile

    from auto_quantize_model.export.hf import export_run
    from auto_quantize_model.inference.fp8_linear import load_exported_lm

    check_measurable(loaded.device)
    vocab = loaded.model.lm_head.out_features
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(loaded.device), "settings": settings.describe(),
                           "bf16": measure_model(loaded.model, vocab, settings)}
    torch._dynamo.reset()
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    for run in runs:
        tmp = Path(tempfile.mkdtemp(prefix=".measure-", dir=work_dir))
        try:
            export_run(run.run_dir, loaded.model_dir, tmp / "export", device=str(loaded.device))
            ex = load_exported_lm(tmp / "export", device=str(loaded.device))
            out[run.name] = {"fp8_layers": len(ex.fp8_layers), **measure_model(ex.model, vocab, settings)}
            del ex
            torch._dynamo.reset()
            torch.cuda.empty_cache()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
