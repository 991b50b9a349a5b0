"""Faithful checks of serving engines' checkpoint-loading rules, run on an export's config and tensor headers.

One module per engine and format, each naming the engine version and the source files it follows:
``vllm_modelopt`` (vLLM 0.34.0), ``sglang_modelopt`` (SGLang 0.5.23), ``vllm_compressed_tensors`` (vLLM 0.34.0's
compressed-tensors config, for the second export format). Each has ``check(view) -> LoadPlan``.
"""

from .view import IGNORED, REFUSED, SILENT, ExportView, Finding, LoadPlan, ModulePlan, TensorMeta

__all__ = ["IGNORED", "REFUSED", "SILENT", "ExportView", "Finding", "LoadPlan", "ModulePlan", "TensorMeta"]
