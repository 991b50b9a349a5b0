"""What a search covers: the language model only, or the whole vision-language model.

The values are the ``model.scope`` strings manifests have always written; the scoring identity
(``autoquant/identity.py``) hashes them, so they must never change (``tests/test_loading.py`` pins them).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any


class Scope(StrEnum):
    """The module a search runs on (a ``str``: it compares equal to, and serialises as, its value)."""

    LANGUAGE_MODEL = "language_model"  # decoder + lm_head, the vision tower left out (text captions)
    WHOLE_VLM = "vision_language_model"  # vision blocks, merger and language model (image-caption pairs)

    @classmethod
    def of(cls, model_record: Mapping[str, Any]) -> Scope:
        """The scope a manifest's ``model`` section records (language model when it predates the field)."""
        return cls(model_record.get("scope", cls.LANGUAGE_MODEL))
