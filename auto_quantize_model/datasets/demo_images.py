"""A procedurally generated image-caption set: coloured shapes with captions that describe them.

Not COCO. Deterministic for a seed; written as PNG files plus a JSONL of {"image", "caption"}.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

from auto_quantize_model.io_utils import atomic_write_bytes, atomic_write_text

COLORS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220), "yellow": (235, 210, 40),
          "purple": (140, 60, 170), "orange": (240, 140, 30), "black": (20, 20, 20), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"gray": (128, 128, 128), "light blue": (170, 200, 235), "beige": (225, 210, 180)}


def _draw(draw, shape: str, box: tuple[int, int, int, int], color: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)


def make_demo_image_captions(output_dir: str | Path, n: int = 48, size: int = 112, seed: int = 0) -> Path:
    """Write ``n`` PNGs and ``pairs.jsonl``; returns the JSONL path."""
    from PIL import Image, ImageDraw

    out = Path(output_dir)
    path = out / "pairs.jsonl"
    # pairs.jsonl marks a complete set: an old one goes first, the new one is written last, atomically, so a failure
    # half-way (a full disk) never leaves a pairs file naming images that are missing or from another run.
    path.unlink(missing_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for i in range(n):
        bg_name = rng.choice(list(BACKGROUNDS))
        img = Image.new("RGB", (size, size), BACKGROUNDS[bg_name])
        draw = ImageDraw.Draw(img)
        count = rng.choice((1, 2))
        parts = []
        for k in range(count):
            color = rng.choice([c for c in COLORS if c != bg_name])
            shape = rng.choice(SHAPES)
            half = size // 2
            x0 = rng.randint(4, half - 30) + (half if k == 1 else 0)
            y0 = rng.randint(4, size - 40)
            s = rng.randint(22, 34)
            _draw(draw, shape, (x0, y0, x0 + s, y0 + s), COLORS[color])
            parts.append(f"a {color} {shape}")
        side = " on the left and ".join(parts) + (" on the right" if count == 2 else "")
        caption = f"{side[0].upper()}{side[1:]} on a {bg_name} background."
        name = f"images/shape_{i:04d}.png"
        png = io.BytesIO()
        img.save(png, format="PNG")
        atomic_write_bytes(out / name, png.getvalue())
        records.append({"image": name, "caption": caption})
    return atomic_write_text(path, "\n".join(json.dumps(r) for r in records) + "\n")
