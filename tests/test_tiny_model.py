"""The tiny checkpoint is the same on any core count, so the demo's numbers (README excerpts) are too."""

from __future__ import annotations

import hashlib

import pytest
import torch

from auto_quantize_model.models.tiny import make_tiny_checkpoint


@pytest.mark.slow
def test_tiny_checkpoint_does_not_depend_on_the_thread_count(tmp_path):
    """Old code trained with every host thread: 5 steps on 1 and on 2 threads gave other weights."""
    before = torch.get_num_threads()
    digests = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            d = make_tiny_checkpoint(tmp_path / f"t{n}", train_steps=5)
            digests[n] = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
            assert torch.get_num_threads() == n  # the build gives the caller's thread count back
    finally:
        torch.set_num_threads(before)
    assert digests[1] == digests[2]
