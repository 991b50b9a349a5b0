"""Where a model worker puts things: its compute device and its pristine copy of the weights. Plain rules, no Ray,
no torch; the worker (``actors/worker.py``) applies them."""

from __future__ import annotations

# A worker's GPU memory at its peak, measured on an H100 for the 3B (6.2 GiB of weights) at 4 x 256 tokens per batch:
# 16.6 GiB, i.e. the weights plus about 1.7 times the weights per 1,024 tokens of a batch (activations, logits and
# the backward pass of a scoring pass grow with the tokens).
_PEAK_PER_1024_TOKENS = 1.7  # times the weights
_PRISTINE_MARGIN = 1.1


def pristine_fits_on_device(weight_bytes: int, gpu_share_bytes: float, tokens_per_batch: int) -> bool:
    """``pristine = "auto"``: keep the pristine copy on the GPU when this worker's share of its memory (``num_gpus``,
    at most 1, times the GPU's total memory) holds the working copy, the pristine copy and a scoring pass's
    activations for batches of ``tokens_per_batch`` tokens, with 10 % to spare. For the 3B on an 80 GB GPU: at
    4 x 256 tokens up to three workers per GPU, at the default 8 x 512 one."""
    need = weight_bytes * (2 + _PEAK_PER_1024_TOKENS * tokens_per_batch / 1024) * _PRISTINE_MARGIN
    return weight_bytes > 0 and gpu_share_bytes >= need


def worker_device(num_gpus: float, cuda_available: bool) -> str:
    """The worker's compute device: a GPU only when Ray gave it one. Ray 2.60 no longer hides the GPUs from an actor
    with ``num_gpus = 0`` (``CUDA_VISIBLE_DEVICES`` is left as it was: ray/_private/accelerators/accelerator.py), so
    such a "CPU worker" on a GPU host would otherwise run on GPU 0, beside whatever Ray placed there."""
    return "cuda" if num_gpus > 0 and cuda_available else "cpu"
