"""FP8 KV-cache scales for an export (``--kv-cache fp8``), calibrated on the run's own calibration batches.

What an engine stores in an FP8 KV cache is ``fp8(k / k_scale)`` of every key after the rotary embedding and every
value, per decoder layer, and it reads them back times the scale. The scales here follow ModelOpt's HF export:
``k_scale = amax / 448`` in float32, amax the largest ``|k|`` its calibration saw (``modelopt/torch/export/
quant_utils.py`` ``_postprocess_single_tensor``, 0.47.0: ``value.float() / kv_cache_max_bound``, max bound 448).
The amax comes from the run's own calibration batches (rebuilt from the manifest's ``calibration`` section and
refused unless they tokenize to the recorded hash), pushed through the evaluated fake-quant model, read where the
cache receives them (a ``DynamicCache`` whose ``update`` records ``max |k|`` and ``max |v|`` per layer: the keys
after RoPE, as vLLM and compressed-tensors' ``QuantizedKVCache`` quantize them).

A run calibrated on image-caption pairs cannot be replayed through the language model alone; its export gets
scale 1.0 for every layer, what vLLM and SGLang use when a checkpoint has none, and says so.

The search never scored KV-cache quantization: the run's KL and perplexity do not include it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from auto_quantize_model.errors import UserError

log = logging.getLogger(__name__)

KV_MAX_BOUND = 448.0  # FP8 E4M3's largest finite value, ModelOpt's kv_cache_max_bound
TEXT_SOURCES = ("text", "jsonl", "coco_json")
SCALE_RULE = ("k_scale = amax / 448 and v_scale likewise, float32, per decoder layer; amax = max |key after RoPE| "
              "(|value|) over the run's calibration batches through the evaluated fake-quant model (ModelOpt's HF "
              "export rule, quant_utils.py _postprocess_single_tensor)")
NOT_SCORED = ("outside what the search scored: the run's KL and perplexity were measured with a BF16 KV cache")


@dataclass(frozen=True)
class KvCacheScales:
    """Per decoder layer: the K and V amax seen and the scale written (float32)."""

    k_amax: tuple[float | None, ...]  # None: not calibrated
    v_amax: tuple[float | None, ...]
    k_scale: tuple[float, ...]
    v_scale: tuple[float, ...]
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.k_scale)

    def tensor(self, kind: str, layer: int, shape: tuple[int, ...] = ()) -> torch.Tensor:
        """The ``kind`` ("k" or "v") scale of ``layer`` as a float32 tensor of ``shape``."""
        values = self.k_scale if kind == "k" else self.v_scale
        return torch.tensor(values[layer], dtype=torch.float32).reshape(shape)

    def describe(self) -> dict[str, Any]:
        """The export record's ``kv_cache`` section."""
        return {"dtype": "fp8_e4m3", "scale_rule": SCALE_RULE, **self.source, "scored": False, "note": NOT_SCORED,
                "k_amax": list(self.k_amax), "v_amax": list(self.v_amax),
                "k_scale": list(self.k_scale), "v_scale": list(self.v_scale)}


def _scale(amax: float) -> float:
    """amax / 448 in float32 (ModelOpt's rule); an all-zero layer gets 1.0 (a zero scale is no scale)."""
    if amax <= 0:
        return 1.0
    return float(torch.tensor(amax, dtype=torch.float32) / KV_MAX_BOUND)


def uncalibrated(num_layers: int, reason: str) -> KvCacheScales:
    """Scale 1.0 everywhere: what vLLM and SGLang use for an FP8 KV cache without scales."""
    ones = (1.0,) * num_layers
    none: tuple[float | None, ...] = (None,) * num_layers
    return KvCacheScales(none, none, ones, ones, {"calibrated": False, "reason": reason})


def _amax_cache(num_layers: int, k_amax: list[float], v_amax: list[float]) -> Any:
    """A ``DynamicCache`` that records max |k| and max |v| per layer as the attention layers hand them over."""
    from transformers import DynamicCache

    class AmaxCache(DynamicCache):
        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
                   **kwargs: Any) -> Any:
            k_amax[layer_idx] = max(k_amax[layer_idx], float(key_states.detach().abs().amax().float()))
            v_amax[layer_idx] = max(v_amax[layer_idx], float(value_states.detach().abs().amax().float()))
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    return AmaxCache()


def _rebuild_batches(manifest: dict[str, Any], tokenizer: Any, device: torch.device) -> tuple[list, dict[str, Any]]:
    """The run's calibration batches, rebuilt from its manifest and refused unless their token hash is the run's."""
    from auto_quantize_model.datasets.calibration import build_calibration_set
    from auto_quantize_model.datasets.captions import read_captions

    cal = manifest["calibration"]
    path = cal.get("source_path")
    if not path or not Path(path).is_file():
        raise UserError(f"--kv-cache fp8 calibrates on the run's captions, but {path} is not a file here; restore it "
                        "(or export without --kv-cache)")
    missing = [k for k in ("num_samples", "batch_size", "seq_len", "seed") if not isinstance(cal.get(k), int)]
    if missing:
        raise UserError(f"the run's manifest does not record its calibration's {', '.join(missing)}; --kv-cache fp8 "
                        "rebuilds the run's batches from them: re-run the scheme, or export without --kv-cache")
    calib = build_calibration_set(tokenizer, read_captions(path), max_samples=cal["num_samples"],
                                  batch_size=cal["batch_size"], seq_len=cal["seq_len"], seed=cal["seed"],
                                  device=device, chat_template=bool(cal.get("chat_template")))
    if calib.token_hash != cal.get("token_hash"):
        raise UserError(f"calibration file {path} no longer tokenizes to the run's data (token hash differs from the "
                        "manifest's); --kv-cache fp8 calibrates on the run's own batches: restore the file, or export "
                        "without --kv-cache")
    steps = (cal.get("usage") or {}).get("calibrate", {}).get("steps") or len(calib.batches)
    batches = calib.batches[: int(steps)]
    return batches, {"calibrated": True, "source_path": path, "token_hash": calib.token_hash,
                     "batches": len(batches), "tokens": int(sum(int(b["attention_mask"].sum()) for b in batches))}


def calibrate_kv_cache(decoder: nn.Module, manifest: dict[str, Any], tokenizer: Any,
                       device: torch.device) -> KvCacheScales:
    """K/V scales of every decoder layer from the run's calibration batches through ``decoder`` (the evaluated
    fake-quant language model), or 1.0 everywhere for a run whose calibration was image-caption pairs."""
    num_layers = int(decoder.config.num_hidden_layers)
    cal = manifest.get("calibration") or {}
    if cal.get("kind") == "image_caption" or cal.get("source_format") not in TEXT_SOURCES:
        reason = (f"the run calibrated on {cal.get('kind') or cal.get('source_format')!r} data, which the language "
                  "model alone cannot replay; scale 1.0 is what vLLM and SGLang use without scales")
        log.warning("--kv-cache fp8: KV scales not calibrated (%s)", reason)
        return uncalibrated(num_layers, reason)
    batches, source = _rebuild_batches(manifest, tokenizer, device)
    k_amax, v_amax = [0.0] * num_layers, [0.0] * num_layers
    with torch.no_grad():
        for batch in batches:
            decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    past_key_values=_amax_cache(num_layers, k_amax, v_amax), use_cache=True)
    log.info("KV cache calibrated on %d batches: max k_scale %.3g, max v_scale %.3g", len(batches),
             max(k_amax) / KV_MAX_BOUND, max(v_amax) / KV_MAX_BOUND)
    return KvCacheScales(tuple(k_amax), tuple(v_amax), tuple(_scale(a) for a in k_amax),
                         tuple(_scale(a) for a in v_amax), source)
