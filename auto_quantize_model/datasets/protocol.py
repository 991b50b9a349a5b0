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
        """The manifest's ``calibration`` section (records/manifest.py: CalibrationRecord), without ``usage``."""
        ...


def usage(calib: CalibrationData, num_calib_steps: int, num_score_steps: int) -> dict[str, Any]:
    """Samples and non-pad tokens ModelOpt really reads: it calibrates on the first ``num_calib_steps``
    batches and scores on the first ``num_score_steps`` (``zip(range(n), data_loader)``)."""

    def take(n: int) -> dict[str, int]:
        batches = calib.batches[:n]
        return {"steps": len(batches), "samples": sum(int(b["input_ids"].shape[0]) for b in batches),
                "tokens": sum(int(b["attention_mask"].sum()) for b in batches)}

    return {"calibrate": take(num_calib_steps), "score": take(num_score_steps)}


if TYPE_CHECKING:  # mypy checks that both calibration sets provide the protocol (no runtime import)
    from auto_quantize_model.datasets.calibration import CalibrationSet
    from auto_quantize_model.datasets.image_captions import ImageCalibrationSet

    def _both_conform(text: CalibrationSet, image: ImageCalibrationSet) -> tuple[CalibrationData, CalibrationData]:
        return text, image
