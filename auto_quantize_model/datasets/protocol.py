"""``CalibrationData``: what a search needs of its calibration batches, whatever made them.

Text captions (``datasets/calibration.py:CalibrationSet``) and image-caption pairs
(``datasets/image_captions.py:ImageCalibrationSet``) both provide it, so the search, the scoring identity and the
cache take ``CalibrationData`` instead of a union of the two classes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class CalibrationData(Protocol):
    """Batches the model's forward step takes, and how to record and identify them."""

    batches: list[dict[str, torch.Tensor]]  # model inputs with labels; ModelOpt reads the first N
    num_samples: int  # sequences in all batches
    batch_size: int  # sequences per batch
    seq_len: int  # tokens per sequence (maximum)
    seed: int  # sampling seed
    token_hash: str  # SHA-256 of the batches as the model sees them (part of the scoring identity)
    num_tokens: int  # non-pad tokens of all batches

    def describe(self) -> dict[str, Any]:
        """The manifest's ``calibration`` section (records/manifest.py: CalibrationRecord)."""
        ...


if TYPE_CHECKING:  # mypy checks that both calibration sets provide the protocol (no runtime import)
    from auto_quantize_model.datasets.calibration import CalibrationSet
    from auto_quantize_model.datasets.image_captions import ImageCalibrationSet

    def _both_conform(text: CalibrationSet, image: ImageCalibrationSet) -> tuple[CalibrationData, CalibrationData]:
        return text, image
