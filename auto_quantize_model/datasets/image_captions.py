"""Image-caption pairs for whole-VLM calibration: COCO (annotations + images folder) or JSONL.

Each pair becomes one chat turn in the checkpoint's own format: the user sends the image and an
instruction, the assistant answers with the caption. The image goes through the checkpoint's image
processor (``pixel_values``, ``image_grid_thw``), the ``<|image_pad|>`` placeholder is expanded to the
number of merged patches, and only caption tokens (plus the closing ``<|im_end|>``) carry a loss.
A pair whose image is missing or unreadable is reported by name and skipped.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from auto_quantize_model.datasets.calibration import IGNORE_INDEX, caption_hash
from auto_quantize_model.datasets.captions import visible
from auto_quantize_model.errors import UserError, check_positive
from auto_quantize_model.io_utils import sha256_bytes

log = logging.getLogger(__name__)
INSTRUCTION = "Describe the image."


@dataclass
class ImageCaptionSource:
    """Pairs in file order, where they came from, and what was skipped."""

    path: str
    format: str
    content_hash: str
    pairs: list[tuple[Path, str]]
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _from_jsonl(path: Path) -> list[tuple[Path, str]]:
    pairs = []
    # utf-8-sig: a leading BOM is an encoding mark, not part of the first record
    for i, line in enumerate(path.read_text(encoding="utf-8-sig", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            image, caption = rec["image"], rec.get("caption", rec.get("text"))
        except (json.JSONDecodeError, KeyError, TypeError):
            log.warning("%s:%d is not an {image, caption} record; skipped", path, i)
            continue
        if isinstance(image, str) and isinstance(caption, str) and visible(caption) and "\x00" not in caption:
            img = Path(image)
            pairs.append((img if img.is_absolute() else path.parent / img, caption.strip()))
    return pairs


def _from_coco(annotations: Path, root: Path) -> list[tuple[Path, str]]:
    try:
        data = json.loads(annotations.read_text(encoding="utf-8-sig"))
        files = {im["id"]: im["file_name"] for im in data["images"]}
        anns = data["annotations"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{annotations} is not a COCO captions file with images and annotations ({exc.__class__.__name__})") from exc
    return [(root / files[a["image_id"]], a["caption"].strip()) for a in anns
            if a.get("image_id") in files and isinstance(a.get("caption"), str) and visible(a["caption"])
            and "\x00" not in a["caption"]]


def read_image_captions(jsonl: str | None = None, coco_annotations: str | None = None,
                        coco_root: str | None = None) -> ImageCaptionSource:
    """Pairs from a JSONL file, or from COCO annotations plus an images folder."""
    if jsonl:
        p = Path(jsonl)
        if not p.is_file():
            raise UserError(f"image-caption file {p} does not exist; pass a JSONL of {{\"image\": path, \"caption\": text}}")
        pairs, fmt, raw = _from_jsonl(p), "jsonl", p.read_bytes()
    elif coco_annotations and coco_root:
        a, r = Path(coco_annotations), Path(coco_root)
        if not a.is_file() or not r.is_dir():
            raise UserError(f"COCO annotations {a} or images folder {r} does not exist; pass --coco-annotations FILE --coco-root DIR")
        pairs, fmt, raw, p = _from_coco(a, r), "coco", a.read_bytes(), a
    else:
        raise UserError("image-caption calibration needs --image-captions-path, or --coco-annotations with --coco-root")
    return ImageCaptionSource(str(p.resolve()), fmt, sha256_bytes(raw), pairs)


def pair_hash(image: Path, caption: str) -> str:
    """16-hex-digit hash of an image's bytes and its whitespace-normalised caption."""
    return sha256_bytes(image.read_bytes() + b"\0" + " ".join(caption.split()).encode("utf-8"))[:16]


def _load_image(path: Path, size: int | None):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        return None, f"{exc.__class__.__name__}: {exc}"
    if size:
        im = im.resize((size, size))
    return im, None


@dataclass
class ImageCalibrationSet:
    """Batches for the whole VLM, with what a manifest records about them."""

    batches: list[dict[str, torch.Tensor]]
    source: ImageCaptionSource
    num_samples: int
    batch_size: int
    seq_len: int
    seed: int
    image_size: int | None
    token_hash: str
    num_tokens: int
    num_image_tokens: int
    pair_hashes: list[str] = field(default_factory=list)
    caption_hashes: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        """The manifest's ``calibration`` section (records/manifest.py: ImageCaptionCalibrationRecord): what an
        image-caption set is, and nothing of a caption-text set's (no ``dropped``, no ``chat_template``)."""
        return {
            "kind": "image_caption", "source_path": self.source.path, "source_format": self.source.format,
            "content_hash": self.source.content_hash, "token_hash": self.token_hash, "num_samples": self.num_samples,
            "num_batches": len(self.batches), "num_tokens": self.num_tokens, "num_image_tokens": self.num_image_tokens,
            "batch_size": self.batch_size, "seq_len": self.seq_len, "seed": self.seed, "image_size": self.image_size,
            "skipped": [{"item": s, "reason": r} for s, r in self.source.skipped],
            # Hashes of what calibration used, so evaluation can hold them out: the captions alone, and each
            # pair (image bytes + caption).
            "caption_hashes": list(self.caption_hashes), "pair_hashes": list(self.pair_hashes),
        }


def _encode_pair(tokenizer: Any, image_processor: Any, image, caption: str, image_token_id: int) -> dict[str, Any]:
    proc = image_processor(images=[image], return_tensors="pt")
    grid = proc["image_grid_thw"][0]
    merge = getattr(image_processor, "merge_size", 2)
    n_img = int(grid.prod()) // (merge * merge)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": INSTRUCTION}]}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    expanded: list[int] = []
    for t in prompt_ids:
        expanded.extend([image_token_id] * n_img if t == image_token_id else [t])
    answer = tokenizer(caption + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return {"ids": expanded + answer, "n_prompt": len(expanded), "pixel_values": proc["pixel_values"],
            "grid": proc["image_grid_thw"], "n_img": n_img}


def build_image_calibration_set(
    tokenizer: Any, image_processor: Any, source: ImageCaptionSource, *, image_token_id: int, max_samples: int = 64,
    batch_size: int = 4, seq_len: int = 512, seed: int = 0, image_size: int | None = None,
    device: torch.device | str = "cpu",
) -> ImageCalibrationSet:
    """Shuffle with ``seed``, keep up to ``max_samples`` usable pairs, process and batch them."""
    for name, v in (("max-calib-samples", max_samples), ("batch-size", batch_size), ("calib-seq-len", seq_len)):
        check_positive(name, v)
    order = list(range(len(source.pairs)))
    random.Random(seed).shuffle(order)
    encoded: list[Any] = []
    for i in order:
        if len(encoded) >= max_samples:
            break
        path, caption = source.pairs[i]
        image, err = _load_image(path, image_size)
        if image is None:
            source.skipped.append((str(path), err or "unreadable"))
            log.warning("skipped %s: %s", path, err)
            continue
        enc = _encode_pair(tokenizer, image_processor, image, caption, image_token_id)
        if enc["n_prompt"] >= seq_len:
            source.skipped.append((str(path), f"{enc['n_prompt']} prompt tokens exceed --calib-seq-len {seq_len}"))
            continue
        enc["pair_hash"] = pair_hash(path, caption)
        enc["caption_hash"] = caption_hash(caption)
        encoded.append(enc)
    if not encoded:
        reasons = "; ".join(f"{s} ({r})" for s, r in source.skipped[:3]) or "the source lists no pairs"
        raise UserError(f"no usable image-caption pairs in {source.path}: {reasons}")
    batches, digest, tokens, img_tokens = [], [], 0, 0
    pad = tokenizer.pad_token_id
    for start in range(0, len(encoded), batch_size):
        group = encoded[start:start + batch_size]
        width = min(seq_len, max(len(e["ids"]) for e in group))
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        mask = torch.zeros_like(ids)
        for r, e in enumerate(group):
            row = e["ids"][:width]
            ids[r, :len(row)] = torch.tensor(row)
            mask[r, :len(row)] = 1
            labels[r, e["n_prompt"]:len(row)] = ids[r, e["n_prompt"]:len(row)]  # caption tokens only
            img_tokens += e["n_img"]
        tokens += int(mask.sum())
        pixels = torch.cat([e["pixel_values"] for e in group])
        grid = torch.cat([e["grid"] for e in group])
        # The data identity covers what the model sees: tokens, mask, and the pixels with their grid (so new or
        # fixed images under the same captions, or another --image-size, never reuse old scores or scales).
        digest.append(ids.numpy().tobytes() + mask.numpy().tobytes() + labels.numpy().tobytes()
                      + pixels.float().contiguous().numpy().tobytes() + grid.numpy().tobytes())
        batches.append({
            "input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device),
            "pixel_values": pixels.to(device),
            "image_grid_thw": grid.to(device),
        })
    return ImageCalibrationSet(batches, source, len(encoded), batch_size, seq_len, seed, image_size,
                               sha256_bytes(b"".join(digest)), tokens, img_tokens,
                               pair_hashes=[e["pair_hash"] for e in encoded],
                               caption_hashes=[e["caption_hash"] for e in encoded])
