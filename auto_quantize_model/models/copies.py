"""Working copies of a model on the compute device, made straight from the pristine tensors.

``copy.deepcopy(model).to("cuda")`` first duplicates every tensor in host memory (pageable, so the pinned pristine
copy buys nothing) and only then uploads it. Handing ``deepcopy`` a memo that already maps each parameter and
buffer to its device copy skips the host duplicate: the upload reads the pinned pages directly (DMA), and the
module tree is copied around those tensors. Shared tensors (a tied ``lm_head``) stay shared: the memo is keyed by
tensor identity.
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
