"""The calibration data settings a run and a sweep share: one declaration, one set of flags and checks.

``autoquant run`` takes them as flags (``add_arguments(parser, CalibrationSettings, defaults=True)``); the
sweep declares the same fields again with ``same_as`` so its TOML keys, flags, help and ranges are these.
Defaults follow ModelOpt's ``hf_ptq`` example (see ``calibration.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from auto_quantize_model.settings import setting, validate_settings

# ModelOpt hf_ptq's calibration: --calib_size 1024 for auto_quantize runs, max length 512 (captions are far
# shorter: a cap, not padding); 8 per batch makes a scheme's 16 scoring steps read hf_ptq's 128 samples.
DEFAULT_CALIB_SAMPLES = 1024
DEFAULT_SEQ_LEN = 512
DEFAULT_BATCH_SIZE = 8


@dataclass(frozen=True)
class CalibrationSettings:
    """Which captions calibrate and score a search, and how they are sampled, batched and rendered."""

    captions_path: str | None = setting(
        None, kind="str?", flag="--captions-path",
        help="captions: .txt (one per line), COCO captions JSON, or JSONL; 'demo' = embedded demo set "
             "(default: datasets/vlm-quantize-calib/coco2017_captions.txt)")
    max_calib_samples: int = setting(
        DEFAULT_CALIB_SAMPLES, kind="int", positive=True, flag="--max-calib-samples",
        help=f"captions drawn (default {DEFAULT_CALIB_SAMPLES}, ModelOpt hf_ptq's calibration size; fewer if the "
             "file holds fewer); the scheme's steps decide how many batches are read")
    batch_size: int = setting(
        DEFAULT_BATCH_SIZE, kind="int", positive=True, flag="--batch-size",
        help=f"captions per batch (default {DEFAULT_BATCH_SIZE}: 16 scoring steps read 128 samples)")
    calib_seq_len: int = setting(DEFAULT_SEQ_LEN, kind="int", positive=True, flag="--calib-seq-len",
                                 help=f"max tokens per caption (default {DEFAULT_SEQ_LEN})")
    chat_template: bool = setting(
        False, kind="bool", flag="--chat-template",
        help="wrap each caption in the checkpoint's chat template as the assistant's reply (recorded in the manifest)")
    seed: int = setting(0, kind="int", flag="--seed", help="calibration sampling seed (default 0)")

    def __post_init__(self) -> None:
        validate_settings(self, "calibration setting")
