"""Layer exclusions: which layers a scheme keeps out of the search and which leave the bits budget.

``mtq.auto_quantize`` ignores the name-pattern disables inside a format config (``*lm_head*`` in
``FP8_DEFAULT_CFG``): only its ``disabled_layers`` keep a layer out of the search. This module reads
those disables from the *installed* ModelOpt's format configs (so the list cannot drift from the
library), turns them into module-name patterns for ``disabled_layers``, and records which pattern
excluded each layer so manifests and reports can say why a layer stayed BF16.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

from auto_quantize_model.format_facts import format_disable_patterns  # noqa: F401 - part of this module's vocabulary

# Where a pattern came from when it is not a format config: the scheme (or recipe) itself.
SCHEME_SOURCE = "scheme"
# Layers no scheme searches because the FP8 export cannot write them: ModelOpt's exporter writes the vision
# patch embedding (a Conv3d in Qwen2.5-VL, a convolution in every ``patch_embed*`` of the VLMs we load) in BF16,
# and serving engines have no FP8 convolution. A whole-VLM search that picked FP8 for it could not be exported.
EXPORT_SOURCE = "export"
EXPORT_PATTERNS = ("*patch_embed*",)
EXPORT_REASON = "not a Linear: the FP8 export writes it BF16 (ModelOpt's exporter), so it is never offered"
# The quantizers whose names a format config's name patterns are written against.
_QUANTIZER_ATTRS = ("weight_quantizer", "input_quantizer")


@dataclass(frozen=True)
class ExclusionPattern:
    """One module-name glob and where it came from (a format config name, or ``scheme``)."""

    pattern: str
    source: str
    reason: str = ""  # why, when the source alone does not say (export exclusions)

    def to_dict(self) -> dict[str, str]:
        """JSON-ready form for manifests."""
        out = {"pattern": self.pattern, "source": self.source}
        if self.reason:
            out["reason"] = self.reason
        return out


def export_exclusions() -> list[ExclusionPattern]:
    """The layers every search leaves out because the export cannot write them in FP8."""
    return [ExclusionPattern(p, EXPORT_SOURCE, EXPORT_REASON) for p in EXPORT_PATTERNS]


def module_patterns(quantizer_pattern: str) -> list[str]:
    """Module-name globs that select exactly the layers whose quantizers ``quantizer_pattern`` selects.

    A quantizer is named ``<module>.<attr>_quantizer``. A glob ending in ``*`` matches the module name
    itself as well; one ending in ``.*`` (``*mlp.gate.*``, ``output.*``) addresses the module's
    children, so the module itself needs the glob without that tail.
    """
    if quantizer_pattern.endswith(".*"):
        return [quantizer_pattern, quantizer_pattern[:-2]]
    return [quantizer_pattern]


def format_exclusions(format_names: Iterable[str]) -> list[ExclusionPattern]:
    """Union of the named formats' layer disables as module-name patterns, first source wins.

    A layer that any candidate format excludes stays out of the search (BF16): ModelOpt's grouped
    search cannot offer a layer only some of the formats, so the conservative union is used.
    """
    from auto_quantize_model.format_facts import format_facts

    out: dict[str, ExclusionPattern] = {}
    for name in format_names:
        for qpat in format_facts(name).disable_patterns:
            for mpat in module_patterns(qpat):
                out.setdefault(mpat, ExclusionPattern(mpat, name))
    return list(out.values())


def matching_pattern(module_name: str, patterns: Iterable[ExclusionPattern]) -> ExclusionPattern | None:
    """The first pattern that matches ``module_name`` the way ``mtq.auto_quantize`` matches (fnmatch)."""
    for p in patterns:
        if fnmatch.fnmatch(module_name, p.pattern):
            return p
    return None
