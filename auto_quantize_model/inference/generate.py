"""Greedy generation in plain PyTorch with a KV cache, for BF16 and fake-quantized models alike."""

from __future__ import annotations

from typing import Any

import torch

from auto_quantize_model.models.loading import LanguageModelWithHead


def encode_prompts(tokenizer: Any, prompts: list[str], chat_template: bool = True) -> list[list[int]]:
    """Token ids per prompt; through the checkpoint's chat template when it has one and it is asked for."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        return [
            list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=True, return_dict=True)["input_ids"])
            for p in prompts
        ]
    return [tokenizer(p)["input_ids"] for p in prompts]


@torch.no_grad()
def greedy_generate(
    model: LanguageModelWithHead,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_id: int | None,
) -> list[list[int]]:
    """New tokens per prompt (argmax each step, stop at EOS). Prompts are left-padded into one batch.

    Positions are counted from each row's first real token, so a padded row generates exactly what it
    would alone.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    out: list[list[int]] = [[] for _ in prompt_ids]
    done = torch.zeros(len(prompt_ids), dtype=torch.bool, device=device)
    step_ids, step_pos = ids, positions
    for _ in range(max_new_tokens):
        hidden = model.model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                             past_key_values=cache, use_cache=True).last_hidden_state
        nxt = model.lm_head(hidden[:, -1]).argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
        for i, tok in enumerate(nxt.tolist()):
            if not done[i]:
                out[i].append(tok)
        if eos_token_id is not None:
            done |= nxt == eos_token_id
        if bool(done.all()):
            break
        step_ids = nxt[:, None]
        step_pos = step_pos[:, -1:] + 1
        # Finished rows keep generating padding that nobody reads; their mask stays 1 for simplicity.
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return out


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token, or None if one is a prefix of the other and lengths match."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
