"""Working copies of a model on the compute device, made straight from the pristine tensors.

``copy.deepcopy(model).to("cuda")`` first duplicates every tensor in host memory (pageable, so the pinned pristine
copy buys nothing) and only then uploads it. Handing ``deepcopy`` a memo that already maps each parameter and
buffer to its device copy skips the host duplicate: the upload reads the pinned pages directly (DMA), and the
module tree is copied around those tensors. Shared tensors (a tied ``lm_head``) stay shared: the memo is keyed by
tensor identity.

The pristine copy gets to pinned memory the same way in reverse (:func:`move_to_pinned_host`): one pinned block per
dtype, filled by DMA from the GPU. ``model.to("cpu")`` followed by ``pin_memory()`` per tensor copies everything twice
(device to pageable host memory, then into pinned memory). PyTorch's pinned allocator rounds every block up to a power
of two either way (7.0 GiB of bf16 weights take an 8 GiB block).
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn


def copy_to_device(model: nn.Module, device: torch.device | str) -> nn.Module:
    """A deep copy of ``model`` with every parameter and buffer on ``device`` (same dtypes, values bit-identical)."""
    device = torch.device(device)
    memo: dict[int, object] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        if id(tensor) in memo:
            continue
        data = torch.empty_like(tensor, device=device)
        data.copy_(tensor.detach(), non_blocking=True)
        if isinstance(tensor, nn.Parameter):
            memo[id(tensor)] = nn.Parameter(data, requires_grad=tensor.requires_grad)
        else:
            memo[id(tensor)] = data
    work = copy.deepcopy(model, memo)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # non_blocking copies from pinned memory: finish before anyone reads them
    return work


ALIGN = 64  # elements: every tensor in a pinned block starts on a multiple of 64 elements (64 bytes or more)


def move_to_pinned_host(model: nn.Module) -> int:
    """Move every parameter and buffer of ``model`` (on a GPU) into pinned host memory, in place: Parameter objects
    are kept (``.data`` swapped), so tied weights stay tied. Returns the pinned bytes."""
    tensors: dict[int, torch.Tensor] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        tensors.setdefault(id(tensor), tensor)
    sizes: dict[torch.dtype, int] = {}
    for t in tensors.values():
        sizes[t.dtype] = sizes.get(t.dtype, 0) + -(-t.numel() // ALIGN) * ALIGN
    blocks = {dtype: torch.empty(n, dtype=dtype, pin_memory=True) for dtype, n in sizes.items()}
    offsets = dict.fromkeys(sizes, 0)
    host: dict[int, torch.Tensor] = {}
    for key, t in tensors.items():
        start = offsets[t.dtype]
        view = blocks[t.dtype][start:start + t.numel()].view(t.shape)
        view.copy_(t.detach(), non_blocking=True)
        host[key] = view
        offsets[t.dtype] = start + -(-t.numel() // ALIGN) * ALIGN
    torch.cuda.synchronize()  # the device-to-host copies must land before the GPU tensors are freed or read
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                p.data = host[id(p)]
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = host[id(b)]
        for name, value in list(vars(module).items()):  # plain attributes naming a buffer (rotary embeddings)
            if isinstance(value, torch.Tensor) and id(value) in host:
                setattr(module, name, host[id(value)])
    return sum(b.numel() * b.element_size() for b in blocks.values())
