"""The embedded demo caption set: procedurally generated scene descriptions (not COCO).

Deterministic for a given seed, so the shipped file ``data/demo_captions.txt`` can be regenerated and
checked byte for byte (a test does).
"""

from __future__ import annotations

import random
from pathlib import Path

DEMO_CAPTIONS_PATH = Path(__file__).parent / "data" / "demo_captions.txt"

_COLORS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple", "brown", "gray"]
_SUBJECTS = [
    "dog", "cat", "bicycle", "bus", "kite", "boat", "horse", "child", "woman", "man",
    "train", "umbrella", "bird", "truck", "skateboard", "surfer", "giraffe", "teddy bear",
]
_ACTIONS = [
    "standing next to", "parked near", "running across", "sitting on", "flying over",
    "leaning against", "waiting beside", "moving along", "resting under", "jumping over",
]
_PLACES = [
    "a wooden bench", "a busy street", "a sandy beach", "a grassy field", "a brick wall",
    "a snowy hill", "a kitchen table", "a city park", "a quiet river", "a train platform",
]
_EXTRAS = [
    "", " on a sunny day", " at dusk", " in the rain", " with trees in the background",
    " while people watch", " under a cloudy sky", " near a small fence",
]
_SHAPES = ["circle", "square", "triangle", "star", "diamond"]


def demo_captions(n: int = 480, seed: int = 1234) -> list[str]:
    """Return ``n`` distinct procedurally generated captions."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        if rng.random() < 0.2:
            caption = (
                f"A {rng.choice(_COLORS)} {rng.choice(_SHAPES)} drawn above a "
                f"{rng.choice(_COLORS)} {rng.choice(_SHAPES)} on a plain background."
            )
        else:
            caption = (
                f"A {rng.choice(_COLORS)} {rng.choice(_SUBJECTS)} {rng.choice(_ACTIONS)} "
                f"{rng.choice(_PLACES)}{rng.choice(_EXTRAS)}."
            )
        if caption not in seen:
            seen.add(caption)
            out.append(caption)
    return out


def write_demo_captions(path: str | Path = DEMO_CAPTIONS_PATH) -> Path:
    """Regenerate the shipped demo caption file."""
    from auto_quantize_model.io_utils import atomic_write_text

    return atomic_write_text(path, "\n".join(demo_captions()) + "\n")
