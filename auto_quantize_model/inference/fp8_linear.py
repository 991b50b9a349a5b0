"""Real FP8 execution of an exported checkpoint in plain PyTorch.

:class:`Fp8Linear` keeps the exported weight as ``float8_e4m3fn`` with its per-tensor ``weight_scale`` and static
``input_scale`` (the dequantization multipliers fake quantization used: ``export/fp8_codes.py``). It quantizes
activations as vLLM and SGLang do, multiplying by the reciprocal of ``input_scale`` in float32 (vLLM's
``scaled_fp8_quant_kernel`` in ``csrc/quantization/fp8/common.cu`` computes ``1.0f / scale`` and multiplies; its
``QuantFP8.forward_native`` uses ``scale.reciprocal()``); searches store exact-reciprocal scales
(``autoquant/serving.py``), so that reciprocal is the multiplier fake quantization used. On a GPU with FP8 tensor cores (compute capability >= 8.9: Ada, Hopper,
Blackwell) it runs ``torch._scaled_mm``; elsewhere (CPU) it dequantizes both operands and runs an ordinary matmul
in the activation dtype, which is exactly what ModelOpt's fake quantization computes, so CI can test it.

Activation quantization is a few elementwise ops (multiply, clamp, cast). In eager mode they are separate
kernels that eat the FP8 GEMM's gain; under ``torch.compile`` they fuse into one kernel in front of the GEMM,
which is where the prefill speed-up comes from (docs/benchmarks.md).

Equality with the run's fake-quant model: the export stores the evaluated codes and scales, so on CPU in bf16
(the dequantize path) the exported model's logits equal the fake-quant model's bit for bit
(tests/test_export.py). On a GPU only ``_scaled_mm``'s accumulation order differs (docs/benchmarks.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from auto_quantize_model.autoquant.serving import FP8_DTYPE, FP8_MAX
from auto_quantize_model.errors import UserError

log = logging.getLogger(__name__)

# torch._scaled_mm wants the token dimension of the FP8 activation padded to a multiple of 16.
_MM_ALIGN = 16


def scaled_mm_supported(device: torch.device) -> bool:
    """True on CUDA devices with FP8 tensor cores (compute capability 8.9 or newer)."""
    return device.type == "cuda" and hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Linear(nn.Module):
    """A Linear whose weight is FP8 E4M3 with a per-tensor scale and whose input is quantized statically."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor,
                 bias: torch.Tensor | None, compute_dtype: torch.dtype):
        super().__init__()
        if weight.dtype != FP8_DTYPE:
            raise ValueError(f"Fp8Linear needs a float8_e4m3fn weight, got {weight.dtype}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale.float().reshape(()))
        self.register_buffer("input_scale", input_scale.float().reshape(()))
        # What serving engines quantize activations with: fl32(1 / input_scale) (see the module docstring).
        self.register_buffer("input_scale_inv", 1 / self.input_scale, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.to(compute_dtype))
        self.compute_dtype = compute_dtype
        self.use_scaled_mm = scaled_mm_supported(weight.device)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, scaled_mm={self.use_scaled_mm}"

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() * self.input_scale_inv).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.use_scaled_mm:
            rows = x2.shape[0]
            pad = (-rows) % _MM_ALIGN
            if pad:
                x2 = F.pad(x2, (0, 0, 0, pad))
            y = torch._scaled_mm(self._quantize_input(x2), self.weight.t(), scale_a=self.input_scale,
                                 scale_b=self.weight_scale, bias=self.bias, out_dtype=x.dtype)
            return y[:rows].reshape(*shape[:-1], self.out_features)
        # Dequantize-then-matmul: the fake-quant computation (values rounded through FP8, math in x.dtype).
        xq = (self._quantize_input(x2).float() * self.input_scale).to(x.dtype)
        w = (self.weight.float() * self.weight_scale).to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(xq, w, b).reshape(*shape[:-1], self.out_features)


@dataclass
class ExportedModel:
    """An exported checkpoint's language model with FP8 layers as :class:`Fp8Linear`."""

    model: nn.Module
    tokenizer: Any
    export_dir: Path
    device: torch.device
    fp8_layers: list[str]
    info: dict

    @property
    def name(self) -> str:
        """The run the export came from (falls back to the directory name)."""
        return self.info.get("run", {}).get("name") or self.export_dir.name


def _load_tensors(export_dir: Path, device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(export_dir.glob("*.safetensors")):
        try:
            out.update(load_file(str(f), device=str(device)))
        except (SafetensorError, OSError) as exc:
            raise UserError(f"{f} could not be read ({exc.__class__.__name__}); the export is damaged: re-export it") \
                from exc
    return out


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer (tied tensors once), excluding rotary tables."""
    seen: dict[int, int] = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is None or "rotary" in name or "inv_freq" in name:
            continue
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def load_exported_lm(export_dir: str | Path, device: str = "auto") -> ExportedModel:
    """Load the language model and lm_head of an ``autoquant export`` checkpoint, ModelOpt or compressed-tensors
    format (vision tower left out; a declared FP8 KV cache is not emulated: the KV cache stays BF16).

    Layers stored as FP8 become :class:`Fp8Linear`; BF16 layers stay ``nn.Linear`` in bfloat16.
    """
    from transformers import AutoConfig

    from auto_quantize_model.export.checks import (
        check_export_tensors,
        config_model,
        read_json,
        read_tensor_meta,
        runtime_names,
        stored_kv_scales,
    )
    from auto_quantize_model.models.loading import (
        LanguageModelWithHead,
        load_tokenizer,
        model_class,
        read_checkpoint_config,
        resolve_device,
        split_language_model,
    )

    d = Path(export_dir)
    if not (d / "config.json").is_file():
        raise UserError(f"export dir {d} has no config.json; pass the --output-dir of an `autoquant export`")
    cfg = read_checkpoint_config(d)
    method = (cfg.get("quantization_config") or {}).get("quant_method")
    compressed = method == "compressed-tensors"
    if not compressed and (method is None or not (d / "hf_quant_config.json").is_file()):
        raise UserError(f"{d} is not an FP8 export (no quantization_config/hf_quant_config.json); "
                        "create one with `autoquant export`, or pass a plain checkpoint as --model-dir")
    if not compressed:
        quant = read_json(d / "hf_quant_config.json", "quantization config").get("quantization")
        algo = quant.get("quant_algo") if isinstance(quant, dict) else None
        if algo != "FP8":
            raise UserError(f"{d} is quantized as {algo}; only per-tensor FP8 exports run here")
    info_file = d / "autoquant_export.json"
    info = read_json(info_file, "export record") if info_file.is_file() else {}
    # Every check on the files and an empty (meta) model first: a damaged export is refused before any weight loads.
    meta = read_tensor_meta(d)
    empty = config_model(d)
    stored_fp8 = check_export_tensors(d, meta, empty)
    if compressed:  # the config must select exactly the FP8 Linears stored (compressed-tensors' own matcher)
        from auto_quantize_model.export.compressed_tensors import check_config

        check_config(d, empty, set(runtime_names(empty, stored_fp8)), bool(stored_kv_scales(meta)))
    kv_scales = set(stored_kv_scales(meta))
    if kv_scales:
        log.info("%s declares an FP8 KV cache; this loader keeps the KV cache in BF16, as the search scored it", d)
    _, cls = model_class(cfg)
    dev = resolve_device(device)
    config = AutoConfig.from_pretrained(str(d))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # built as a plain BF16 model, then FP8 layers are swapped in
    with torch.device(dev):
        full = cls._from_config(config, dtype=torch.bfloat16)
    decoder, lm_head = split_language_model(full)
    lm = LanguageModelWithHead(decoder, lm_head).eval().requires_grad_(False)
    del full
    own = set(lm.state_dict())
    tensors = {k: v for k, v in _load_tensors(d, dev).items()
               if k not in kv_scales and (k in own or k.rsplit(".", 1)[0] + ".weight" in own)}
    fp8 = sorted(k.removesuffix(".weight") for k, v in tensors.items() if k.endswith(".weight") and v.dtype == FP8_DTYPE)
    for name in fp8:
        old = lm.get_submodule(name)
        if not isinstance(old, nn.Linear):
            raise UserError(f"{d}: FP8 tensor {name}.weight is not a Linear layer; the export is not supported")
        if tensors[f"{name}.weight"].shape != old.weight.shape:
            raise UserError(f"{d}: {name}.weight has shape {tuple(tensors[f'{name}.weight'].shape)}, its config "
                            f"{tuple(old.weight.shape)}; the export is damaged: re-export")
        bias = tensors.pop(f"{name}.bias", None)
        lm.set_submodule(name, Fp8Linear(tensors.pop(f"{name}.weight"), tensors.pop(f"{name}.weight_scale"),
                                         tensors.pop(f"{name}.input_scale"), bias, torch.bfloat16))
    try:
        missing, unexpected = lm.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise UserError(f"{d} does not match its config ({' '.join(str(exc).split())[:200]}); re-export") from exc
    fp8_keys = {f"{n}.{s}" for n in fp8 for s in ("weight", "weight_scale", "input_scale", "bias")}
    missing = [k for k in missing if k not in fp8_keys and not (k == "lm_head.weight" and lm.lm_head.weight is
                                                                  lm.model.get_input_embeddings().weight)]
    if missing or unexpected:
        raise UserError(f"{d} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}; re-export")
    log.info("loaded export %s: %d FP8 layers on %s (scaled_mm: %s)", d, len(fp8), dev, scaled_mm_supported(dev))
    return ExportedModel(lm, load_tokenizer(d), d, dev, fp8, info)
