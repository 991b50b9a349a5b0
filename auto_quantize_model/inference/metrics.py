"""Output-level and layer-level error of a quantized LM against its BF16 reference.

Output level, over non-pad next-token positions of held-out captions: perplexity, KL(BF16 || quantized)
of the next-token distributions (mean and max), and top-1 agreement. Layer level: for each quantized
Linear, the relative L2 error ||Q(x) - W x|| / ||W x|| of its output against the same Linear without
quantizers, on the same input x (the activations the quantized model really produces).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from auto_quantize_model.autoquant.layers import UNQUANTIZED, linear_layers, quantizer_label
from auto_quantize_model.models.steps import ForwardStep


def _positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mask of predicted positions: the next token is real (not padding)."""
    return batch["labels"][:, 1:] != -100


@torch.no_grad()
def _logprobs(forward: ForwardStep, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = forward(model, batch)[:, :-1].float()
    return F.log_softmax(logits, dim=-1)


@torch.no_grad()
def evaluate_against_reference(
    model: nn.Module, reference: nn.Module, batches: list[dict[str, torch.Tensor]], *, forward: ForwardStep
) -> dict[str, float]:
    """Perplexity of both models, KL(ref || model) mean/max per token, top-1 agreement; ``forward`` is the loaded
    model's step (``LoadedModel.forward_step``) that both models run."""
    nll_q = nll_r = kl_sum = 0.0
    kl_max = 0.0
    agree = count = 0
    for batch in batches:
        keep = _positions(batch)
        target = batch["labels"][:, 1:][keep]
        lp_r = _logprobs(forward, reference, batch)[keep]
        lp_q = _logprobs(forward, model, batch)[keep]
        nll_r -= lp_r.gather(-1, target[:, None]).sum().item()
        nll_q -= lp_q.gather(-1, target[:, None]).sum().item()
        kl = (lp_r.exp() * (lp_r - lp_q)).sum(-1).clamp(min=0)
        kl_sum += kl.sum().item()
        kl_max = max(kl_max, kl.max().item()) if kl.numel() else kl_max
        agree += (lp_r.argmax(-1) == lp_q.argmax(-1)).sum().item()
        count += int(keep.sum())
    if count == 0:
        raise ValueError("no evaluation tokens: every caption was empty after tokenization")
    return {
        "perplexity": math.exp(nll_q / count),
        "reference_perplexity": math.exp(nll_r / count),
        "kl_mean": kl_sum / count,
        "kl_max": kl_max,
        "top1_agreement": agree / count,
        "num_tokens": count,
    }


@contextlib.contextmanager
def _layer_error_hooks(model: nn.Module, sums: dict[str, list[float]]) -> Iterator[None]:
    def hook(name):
        def fn(module, inputs, output):
            x = inputs[0]
            ref = F.linear(x, module.weight, module.bias).float()
            err = (output.float() - ref).pow(2).sum().item()
            sums[name][0] += err
            sums[name][1] += ref.pow(2).sum().item()
        return fn

    handles = []
    for name, mod in linear_layers(model).items():
        quantized = any(quantizer_label(getattr(mod, q, None)) != UNQUANTIZED for q in ("weight_quantizer", "input_quantizer"))
        if quantized:
            sums[name] = [0.0, 0.0]
            handles.append(mod.register_forward_hook(hook(name)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def layer_output_errors(model: nn.Module, batches: list[dict[str, torch.Tensor]], *,
                        forward: ForwardStep) -> dict[str, float]:
    """Relative L2 output error of every quantized Linear, accumulated over ``batches`` run by ``forward``."""
    sums: dict[str, list[float]] = {}
    with _layer_error_hooks(model, sums):
        for batch in batches:
            forward(model, batch)
    return {name: math.sqrt(e / r) if r > 0 else 0.0 for name, (e, r) in sums.items()}


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman rank correlation (Pearson on average ranks); None when a side is constant."""
    import pandas as pd

    rho = pd.Series(a, dtype="float64").rank().corr(pd.Series(b, dtype="float64").rank())
    return None if math.isnan(rho) else float(rho)


def error_vs_sensitivity(manifest: dict[str, Any], errors: dict[str, float]) -> dict[str, Any]:
    """Per search group: measured error (weight-averaged over its layers) against its AutoQuant score.

    The score paired with a group is the one of the format the group actually got (its
    ``chosen_format``), not its largest candidate score: with several candidate formats the largest
    belongs to the most aggressive one, which the measured model may not run. Returns the rows and the
    Spearman rank correlation over groups that were quantized (a group that stayed unquantized has no
    measured error). Over quantized groups only, so the figure says whether the score orders the
    harm among what was quantized; it cannot show whether the groups left unquantized were the right ones.
    """
    rows = []
    for group, info in manifest["layer_sensitivity"].items():
        members = [m for m in info["module_names"] if m in errors]
        if not members:
            continue
        sizes = [manifest["layers"][m]["num_params"] for m in members]
        err = sum(errors[m] * s for m, s in zip(members, sizes)) / sum(sizes)
        chosen = info.get("chosen_format")
        if chosen in info["candidate_formats"]:
            score = info["scores"][info["candidate_formats"].index(chosen)]
        else:
            score = None
        if score is None:
            continue
        rows.append({"group": group, "chosen_format": chosen, "relative_error": err, "score": score})
    rho = spearman([r["relative_error"] for r in rows], [r["score"] for r in rows]) if len(rows) >= 3 else None
    return {"groups": rows, "spearman": rho, "num_groups": len(rows)}
