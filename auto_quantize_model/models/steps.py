"""How a loaded model runs on a batch of its own calibration data: one forward step and one loss step per scope.

ModelOpt's ``auto_quantize`` takes ``forward_step(model, batch)`` and ``loss_func(output, batch)`` and passes the
module it is searching (a copy of the loaded one), so a step takes the module as an argument instead of closing
over one. :meth:`LoadedModel.forward_step <auto_quantize_model.models.loading.LoadedModel.forward_step>` picks
the step of the model's scope; nothing looks inside a batch to decide what kind of model it is for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from auto_quantize_model.datasets.calibration import IGNORE_INDEX
from auto_quantize_model.models.scope import Scope

Batch = dict[str, torch.Tensor]
ForwardStep = Callable[[nn.Module, Batch], torch.Tensor]  # (model, batch) -> logits
LossStep = Callable[[torch.Tensor, Batch], torch.Tensor]  # (logits, batch) -> scalar loss


def language_model_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Logits of the LM-only module (``LanguageModelWithHead``) for a text batch."""
    return model(batch["input_ids"], batch["attention_mask"])


def whole_vlm_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Logits of the whole VLM for an image-caption batch (tokens with the images' pixels and patch grid)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"], use_cache=False).logits


def next_token_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions with a label (caption tokens; never padding)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = batch["labels"][:, 1:]
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)


@dataclass(frozen=True)
class Steps:
    """The forward and loss step of one scope."""

    forward: ForwardStep
    loss: LossStep


STEPS: dict[Scope, Steps] = {
    Scope.LANGUAGE_MODEL: Steps(language_model_logits, next_token_loss),
    Scope.WHOLE_VLM: Steps(whole_vlm_logits, next_token_loss),
}
