"""datasets/protocol.py: one CalibrationData interface for text and image-caption calibration sets.

mypy checks both classes against the protocol statically (protocol.py); this checks the live text set."""

from __future__ import annotations

import dataclasses

from auto_quantize_model.datasets.protocol import CalibrationData


def test_text_calibration_set_is_calibration_data(calib):
    assert isinstance(calib, CalibrationData)
    assert calib.describe()["token_hash"] == calib.token_hash


def test_an_object_without_the_batches_is_not():
    @dataclasses.dataclass
    class NoBatches:
        token_hash: str = "x"

        def describe(self):
            return {}

    assert not isinstance(NoBatches(), CalibrationData)
