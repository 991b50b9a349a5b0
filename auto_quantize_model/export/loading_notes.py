"""Which loader reads which export format: the ``README_LOADING.md`` written beside the weights and the export
record's ``loaders`` section (README "Export" says the same).

Facts behind them (tests/test_export_formats.py and tests/test_engine_conformance.py check the ones marked so):
- ``transformers.from_pretrained`` has no ModelOpt loader: on a ModelOpt FP8 export it loads the FP8 codes without
  their scales and returns a wrong model without an error (tested: KL against the fake-quant model far above
  quantization's own).
- transformers 5.14.1 with compressed-tensors 0.20.1 loads a compressed-tensors FP8 checkpoint but leaves the
  ``weight_scale`` of every FP8 Linear in the decoder layers uninitialised: the MoE decompression converter it always
  adds (``quantizers/quantizer_compressed_tensors.py`` ``get_weight_conversions``, sources ``.weight_packed$``,
  ``.weight_scale$``, ``.weight_shape$``) claims those keys and returns nothing for a dense Linear; its load report
  lists them MISSING (tested, also on a checkpoint llm-compressor's own save path writes).
- transformers 5.23.0 (installed apart, ``.venv/consumer``) with compressed-tensors 0.20.1 loads it completely: in
  float32 the logits equal the evaluated model's bit for bit (tested on CPU exports of the tiny model); in bf16
  compressed-tensors rounds the scales to bf16 and divides activations in bf16, so a few % of activation codes move
  one FP8 step (tested).
- vLLM 0.34.0 loads both formats (``--quantization modelopt``; compressed-tensors from config.json), FP8 KV cache
  included (tests/engine_rules). SGLang 0.5.23 loads the ModelOpt format, but not ModelOpt's KV-cache scale names
  for Qwen2.5-VL. TensorRT-LLM loads the ModelOpt format (BF16 lm_head only).
"""

from __future__ import annotations

from typing import Any

from auto_quantize_model.export.settings import COMPRESSED_TENSORS

LOADING_FILE = "README_LOADING.md"

_MODELOPT = """# Loading this checkpoint: ModelOpt FP8 format

**WARNING: `transformers` `from_pretrained` alone does NOT apply this checkpoint's FP8 scales.** transformers has
no loader for ModelOpt's format: it reads the FP8 weight codes without their `weight_scale` and `input_scale` and
returns a wrong model without an error. Do not evaluate or fine-tune this directory through `from_pretrained`.

Loaders that apply the scales (by their loading rules, re-implemented from vLLM 0.34.0's and SGLang 0.5.23's sources
in auto_quantize_model's tests, they hold the evaluated model; no engine was run there; see README "Export"):
- vLLM (>= 0.23.0 for an FP8 lm_head): `vllm serve {d} --quantization modelopt`
- SGLang (>= 0.5.15 for an FP8 lm_head):
  `python -m sglang.launch_server --model-path {d} --quantization modelopt`{sglang}
- TensorRT-LLM (lm_head must be BF16): `trtllm-serve {d}`
- auto_quantize_model: `autoquant infer --exported {d}` (or `load_exported_lm`): real FP8 matmuls on
  GPUs with FP8 tensor cores, the exact fake-quant arithmetic on CPU

The other format, `--format compressed-tensors`, is the one transformers' compressed-tensors integration reads; its
README_LOADING.md says which transformers loads it (5.23.0: yes; 5.14.1: no).
{kv}"""

_CT = """# Loading this checkpoint: compressed-tensors format (float-quantized: static per-tensor FP8 W8A8)

Written with the `compressed-tensors` library as llm-compressor writes it; scales are float32 (the evaluated ones).

- vLLM (0.34.0 checked): `vllm serve {d}` (quant_method `compressed-tensors` is read from config.json)
- auto_quantize_model: `autoquant infer --exported {d}` (or `load_exported_lm`), the exact fake-quant arithmetic
- transformers + compressed-tensors: **transformers 5.23.0** (compressed-tensors 0.20.1 checked):
  `AutoModelForImageTextToText.from_pretrained("{d}", dtype=torch.float32)` gives the evaluated model's logits
  bit for bit (tested on CPU exports of the tiny model; for GPU exports see the project README, "Export").
  In bf16 it loads too, but compressed-tensors rounds the scales to bf16 and divides activations in bf16: close to
  the evaluated model, not equal; evaluate in float32.
  **transformers 5.14.1 does not load it correctly**: it leaves the `weight_scale` of every FP8 Linear of the
  decoder layers uninitialised (its MoE decompression converter claims those keys; its load report lists them
  MISSING), for llm-compressor's own checkpoints as for this one.
{kv}"""

_KV = """
FP8 KV cache: declared, with per-layer K/V scales {how}
(`autoquant_export.json` `kv_cache`). The search scored the model with a BF16 KV cache: its KL and perplexity do
not include KV-cache quantization.{extra}
"""
_CALIBRATED = "calibrated on the run's own calibration data"
_UNCALIBRATED = "of 1.0 (not calibrated: the run's calibration data cannot be replayed; engines' default)"


def loaders(export_format: str, kv_cache: bool) -> dict[str, str]:
    """Loader -> what it does with this export (the export record's ``loaders`` section)."""
    if export_format == COMPRESSED_TENSORS:
        return {"vllm": "loads it (compressed-tensors from config.json; rules of 0.34.0 checked)",
                "autoquant infer --exported": "loads it: the evaluated model",
                "transformers": "5.23.0 loads it: the evaluated model in float32 (bf16: scales rounded, close); "
                                "5.14.1 leaves the decoder layers' weight_scale uninitialised (README_LOADING.md)",
                "sglang": "not checked", "tensorrt-llm": "not checked"}
    return {"vllm": "loads it (--quantization modelopt)",
            "sglang": ("refuses ModelOpt's KV-cache scale names for Qwen2.5-VL (0.5.23)" if kv_cache else
                       "loads it (--quantization modelopt)"),
            "tensorrt-llm": "loads it (BF16 lm_head only)",
            "autoquant infer --exported": "loads it: the evaluated model",
            "transformers": "WRONG: from_pretrained drops the FP8 scales without an error"}


def loading_note(export_format: str, kv_cache: bool, export_dir: str = "DIR", kv_calibrated: bool = True) -> str:
    """The ``README_LOADING.md`` text for an export of ``export_format``."""
    how = _CALIBRATED if kv_calibrated else _UNCALIBRATED
    if export_format == COMPRESSED_TENSORS:
        kv = _KV.format(how=how, extra="") if kv_cache else ""
        return _CT.format(d=export_dir, kv=kv)
    sglang = ("\n  -- not for this export: SGLang 0.5.23 refuses ModelOpt's KV-cache scale names for Qwen2.5-VL"
              if kv_cache else "")
    kv = _KV.format(how=how, extra=" SGLang 0.5.23 cannot load these scales; vLLM does.") if kv_cache else ""
    return _MODELOPT.format(d=export_dir, sglang=sglang, kv=kv)


def describe(export_format: str, kv_cache: bool) -> dict[str, Any]:
    """The export record's ``loaders`` section plus where the note is."""
    return {"file": LOADING_FILE, **loaders(export_format, kv_cache)}
