"""Tokenized, padded, deterministic calibration batches for AutoQuant.

Each batch is a dict of ``input_ids``, ``attention_mask`` and ``labels`` (pad positions are -100, so
they never enter the loss). Batches are padded to the longest caption in the batch, capped at
``seq_len``, and live on the model's device so ``auto_quantize`` can iterate them twice (calibration,
then scoring) without host-to-device copies.

With ``chat_template`` each caption becomes the assistant's answer to a short user request, rendered
by the checkpoint's own chat template: the text distribution the LM sees when it captions in use
(system prompt, role markers), rather than bare caption text.

Defaults (``settings.CalibrationSettings``) follow ModelOpt's ``hf_ptq`` example (1024 samples x 512 tokens;
scoring on 128 samples) as far as the data allows; the demo and the tests pass small explicit values.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import torch

from auto_quantize_model.datasets.captions import CaptionSource
from auto_quantize_model.errors import UserError, check_positive
from auto_quantize_model.io_utils import sha256_bytes

IGNORE_INDEX = -100
CHAT_USER_PROMPT = "Describe this image in one sentence."
log = logging.getLogger(__name__)


@dataclass
class CalibrationSet:
    """Batches plus the facts a manifest records to make a run reproducible."""

    batches: list[dict[str, torch.Tensor]]
    source: CaptionSource
    num_samples: int
    batch_size: int
    seq_len: int
    seed: int
    token_hash: str
    num_tokens: int
    sample_indices: list[int]
    chat_template: dict[str, Any] | None = None  # None: raw captions

    @property
    def captions(self) -> list[str]:
        """The captions that made it into the batches, in batch order."""
        return [self.source.captions[i] for i in self.sample_indices]

    def describe(self) -> dict[str, Any]:
        """The manifest's ``calibration`` section (records/manifest.py: CaptionCalibrationRecord)."""
        return {
            "source_path": self.source.path,
            "source_format": self.source.format,
            "content_hash": self.source.content_hash,
            "token_hash": self.token_hash,
            "num_samples": self.num_samples,
            "num_batches": len(self.batches),
            "num_tokens": self.num_tokens,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "chat_template": self.chat_template,
            "dropped": dict(self.source.dropped),
            # Short hashes of the captions used, so evaluation can refuse to score on calibration data.
            "caption_hashes": [caption_hash(c) for c in self.captions],
        }


def wrap_in_chat_template(tokenizer: Any, caption: str, user_prompt: str = CHAT_USER_PROMPT) -> str:
    """The caption as the assistant's reply to ``user_prompt``, in the checkpoint's chat template."""
    messages = [{"role": "user", "content": user_prompt}, {"role": "assistant", "content": caption}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _chat_template_info(tokenizer: Any, user_prompt: str) -> dict[str, Any]:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise UserError("the checkpoint's tokenizer has no chat template; drop --chat-template (or chat_template "
                        "in the sweep config) to calibrate on raw captions")
    return {"user_prompt": user_prompt, "role": "assistant",
            "template_hash": sha256_bytes(str(template).encode("utf-8"))[:16]}


def caption_hash(text: str) -> str:
    """16-hex-digit hash of a whitespace-normalised caption."""
    return sha256_bytes(" ".join(text.split()).encode("utf-8"))[:16]


def build_calibration_set(
    tokenizer: Any,
    source: CaptionSource,
    *,
    max_samples: int = 64,
    batch_size: int = 4,
    seq_len: int = 256,
    seed: int = 0,
    device: torch.device | str = "cpu",
    chat_template: bool = False,
) -> CalibrationSet:
    """Shuffle with ``seed``, keep ``max_samples`` captions, optionally wrap each in the chat template,
    tokenize and batch them."""
    check_positive("max-calib-samples", max_samples)
    chat = _chat_template_info(tokenizer, CHAT_USER_PROMPT) if chat_template else None
    check_positive("batch-size", batch_size)
    check_positive("calib-seq-len", seq_len)
    order = list(range(len(source.captions)))
    random.Random(seed).shuffle(order)
    chosen = order[:max_samples]
    if len(chosen) < max_samples:
        # Fewer captions than asked: scores rest on less data than the settings suggest.
        log.warning("calibration set has %d samples, fewer than the %d asked (%s holds only %d usable captions)",
                    len(chosen), max_samples, source.path, len(source.captions))
    batches: list[dict[str, torch.Tensor]] = []
    digest_parts: list[bytes] = []
    num_tokens = 0
    for start in range(0, len(chosen), batch_size):
        texts = [source.captions[i] for i in chosen[start : start + batch_size]]
        if chat:
            texts = [wrap_in_chat_template(tokenizer, t) for t in texts]
        enc = tokenizer(
            texts, return_tensors="pt", padding="longest", truncation=True, max_length=seq_len,
            padding_side="right",
        )
        ids, mask = enc["input_ids"], enc["attention_mask"]
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        num_tokens += int(mask.sum())
        digest_parts.append(ids.numpy().tobytes() + mask.numpy().tobytes())
        batches.append({"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)})
    return CalibrationSet(
        batches=batches,
        source=source,
        num_samples=len(chosen),
        batch_size=batch_size,
        seq_len=seq_len,
        seed=seed,
        token_hash=sha256_bytes(b"".join(digest_parts)),
        num_tokens=num_tokens,
        sample_indices=chosen,
        chat_template=chat,
    )
