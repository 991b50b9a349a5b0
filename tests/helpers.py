"""One numeric-closeness helper with per-dtype tolerances (float32 is exact-ish, bf16 is not)."""

from __future__ import annotations

import torch

TOLERANCES = {
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """torch.testing.assert_close with the tolerance of ``dtype`` (default: the tensors' dtype)."""
    rtol, atol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
