"""What an export writes: its format and whether the KV cache is FP8. Declared once for ``autoquant export`` and
``autoquant ship`` (``add_arguments(parser, ExportOptions, defaults=True)``)."""

from __future__ import annotations

from dataclasses import dataclass

from auto_quantize_model.settings import setting, validate_settings

MODELOPT = "modelopt"
COMPRESSED_TENSORS = "compressed-tensors"
FORMATS = (MODELOPT, COMPRESSED_TENSORS)
KV_CACHE_CHOICES = ("none", "fp8")


@dataclass(frozen=True)
class ExportOptions:
    """The checkpoint format and the KV-cache precision an export declares."""

    format: str = setting(
        MODELOPT, kind="str", flag="--format", choices=FORMATS,
        help="checkpoint format: modelopt (default; vLLM, SGLang, TensorRT-LLM with their ModelOpt loaders) or "
             "compressed-tensors (llm-compressor's format; vLLM detects it from config.json; see README 'Export')")
    kv_cache: str = setting(
        "none", kind="str", flag="--kv-cache", choices=KV_CACHE_CHOICES,
        help="fp8: declare an FP8 KV cache with per-layer K/V scales calibrated on the run's own calibration data "
             "(default none: engines keep the KV cache in BF16). Outside what the search scored")

    def __post_init__(self) -> None:
        validate_settings(self, "export setting")
