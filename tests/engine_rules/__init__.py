"""Faithful checks of serving engines' checkpoint-loading rules, run on an export's config and tensor headers.

One module per engine and format, each naming the engine version and the source files it follows:
``vllm_modelopt`` (vLLM 0.34.0), ``sglang_modelopt`` (SGLang 0.5.23), ``vllm_compressed_tensors`` (vLLM 0.34.0's
compressed-tensors config, for the second export format). Each has ``check(view) -> LoadPlan``.
"""

from . import sglang_modelopt, vllm_compressed_tensors, vllm_modelopt
from .view import IGNORED, REFUSED, SILENT, ExportView, Finding, LoadPlan, ModulePlan, TensorMeta

__all__ = ["IGNORED", "REFUSED", "SILENT", "ExportView", "Finding", "LoadPlan", "ModulePlan", "TensorMeta",
           "check_all", "sglang_modelopt", "vllm_compressed_tensors", "vllm_modelopt"]


def check_all(view: ExportView) -> list[LoadPlan]:
    """Every rule set that applies to the export's format (by its ``quant_method``)."""
    qc = view.config.get("quantization_config") or view.text_config.get("quantization_config") or {}
    method = str(qc.get("quant_method", "")).lower().replace("_", "-")
    if method == "compressed-tensors":
        return [vllm_compressed_tensors.check(view)]
    return [vllm_modelopt.check(view), sglang_modelopt.check(view)]
