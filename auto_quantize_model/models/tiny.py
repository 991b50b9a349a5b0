"""Build a small random Qwen2.5-VL checkpoint from the real 3B config, shrunk.

The checkpoint is written with ``save_pretrained`` together with a tokenizer, a chat template and an
image-processor config, so it loads through exactly the same ``from_pretrained`` path as a real
Qwen2.5-VL-3B-Instruct download. Nothing is downloaded: the tokenizer is a byte-level BPE trained on
the embedded demo captions.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch

from auto_quantize_model.io_utils import atomic_directory

log = logging.getLogger(__name__)

# The public config.json of Qwen/Qwen2.5-VL-3B-Instruct (flat hub layout), kept verbatim in the fields
# that shape the network. Used by `make-tiny-model` (shrunk) and by GPU benchmarks (full size).
QWEN2_5_VL_3B_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 128000,
    "max_window_layers": 70,
    "num_attention_heads": 16,
    "num_hidden_layers": 36,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "use_cache": True,
    "use_sliding_window": False,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 2048,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
}

# What the tiny model changes. head_dim = 64 / 4 = 16, so mrope sections must sum to 8.
_TINY_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "max_window_layers": 4,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
}
_TINY_VISION = {
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "out_hidden_size": 64,
    "fullatt_block_indexes": [1],
}

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2.5-VL's own chat template, reduced to what calibration and generation use (text and images).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def shrunk_config_dict(vocab_size: int, special_ids: dict[str, int]) -> dict[str, Any]:
    """The real 3B config with the tiny sizes and this tokenizer's vocabulary and special ids."""
    cfg = copy.deepcopy(QWEN2_5_VL_3B_CONFIG)
    cfg.update(copy.deepcopy(_TINY_TEXT))
    cfg["vision_config"].update(_TINY_VISION)
    cfg["vocab_size"] = vocab_size
    return with_special_token_ids(cfg, special_ids)


def with_special_token_ids(cfg: dict[str, Any], special_ids: dict[str, int]) -> dict[str, Any]:
    """Point a flat Qwen2.5-VL config's token-id fields at this tokenizer's special tokens (in place)."""
    cfg.update(
        bos_token_id=special_ids["<|endoftext|>"], eos_token_id=special_ids["<|im_end|>"],
        pad_token_id=special_ids["<|endoftext|>"], vision_start_token_id=special_ids["<|vision_start|>"],
        vision_end_token_id=special_ids["<|vision_end|>"], vision_token_id=special_ids["<|vision_pad|>"],
        image_token_id=special_ids["<|image_pad|>"], video_token_id=special_ids["<|video_pad|>"],
    )
    return cfg


def _train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE like Qwen's, trained on ``texts`` (deterministic for a fixed input)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


_INSTRUCTIONS = [
    "Describe the image.",
    "Write a caption for this photo.",
    "What is in the picture?",
    "Describe a photo of a dog running across a sandy beach.",
    "Write one caption for an image of a red bus parked near a brick wall.",
]


def _train_language_model(model, tokenizer, texts: list[str], steps: int, seed: int) -> float:
    """A short next-token training run on ``texts`` so the tiny model writes caption-like text.

    A random model's outputs are near-uniform, which makes perplexity, KL and generations meaningless
    in the demo; a few hundred steps give it real structure for quantization to disturb. Returns the
    final training loss.
    """
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    # Half the examples are chat turns (an instruction, the caption as the answer), so prompts sent
    # through the chat template get captions back, as they would from an instruct model.
    chats = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": _INSTRUCTIONS[i % len(_INSTRUCTIONS)]}, {"role": "assistant", "content": t}],
            tokenize=False,
        )
        for i, t in enumerate(texts)
    ]
    texts = [t + tokenizer.eos_token for t in texts] + chats
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    # One thread: a multi-threaded CPU reduction sums in an order that depends on the thread count, and 200 steps
    # turn that rounding into other weights, so the demo's numbers (README excerpts) would depend on the machine's
    # core count. Single-threaded, the same seed gives the same checkpoint on any core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            idx = torch.randint(len(texts), (16,), generator=g).tolist()
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True)
            labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
            logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return float(loss.detach())


def make_tiny_checkpoint(output_dir: str | Path, seed: int = 0, vocab_size: int = 640, train_steps: int = 200) -> Path:
    """Write a tiny Qwen2.5-VL checkpoint (weights, tokenizer, processor) to ``output_dir``.

    Weights are random, then trained for ``train_steps`` on the demo captions (0 keeps them random).
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from auto_quantize_model.datasets.demo import demo_captions

    output_dir = Path(output_dir)
    tokenizer = _train_tokenizer(demo_captions(), vocab_size)
    special_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(**shrunk_config_dict(len(tokenizer), special_ids))

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    loss = _train_language_model(model, tokenizer, demo_captions(), train_steps, seed) if train_steps else None
    # Small images keep tests fast; min/max pixels are the processor's own knobs. The PIL backend is
    # used because the full Qwen2_5_VLProcessor also wants a video processor, which needs torchvision.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
    with atomic_directory(output_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("wrote tiny Qwen2.5-VL checkpoint (%d params, vocab %d, %d training steps, loss %s) to %s",
             n_params, len(tokenizer), train_steps, loss, output_dir)
    return output_dir
