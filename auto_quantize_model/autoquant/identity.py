"""The scoring identity: the one function that says whether two searches may share calibration and scores.

Everything that changes calibration statistics, sensitivity scores or the content of ModelOpt's search
checkpoint is in it: the weights (content fingerprint, not only config.json), compute dtype, the searched
module (LM only or the whole VLM), the calibration data (tokens, masks, labels and, for image captions, the
pixels), and every scheme setting except those that only change the solve (the effective-bits target) or
nothing at all (the name, the description). New scheme settings are part of the identity unless listed in
``SOLVE_ONLY``, so a setting added later can never make two different searches share a cache file.

The run's cache file name, the sweep's lease pool and the tables' ``score_cache_key`` column all use
:func:`scoring_key`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from auto_quantize_model.configs.schemes import Scheme
from auto_quantize_model.io_utils import sha256_json

if TYPE_CHECKING:  # annotations only: this module stays free of torch (the sweep driver imports it)
    from auto_quantize_model.datasets.protocol import CalibrationData
    from auto_quantize_model.models.loading import LoadedModel

# Scheme fields that never change calibration, scores or the search checkpoint (``recipe`` is provenance: the
# recipe's settings are the scheme's other fields).
SOLVE_ONLY = frozenset({"name", "effective_bits", "description", "schema_version", "recipe"})
# How FP8 amaxes are fixed at calibration (autoquant/serving.py ``exact_reciprocal_amax``): 1, exact engine
# reciprocal of the CPU path's scale; 2, also the same scale on ModelOpt's GPU path. Scores and checkpoints
# depend on it.
FP8_SCALE_RULE = 2
KEY_LENGTH = 20


@dataclass(frozen=True)
class DataIdentity:
    """What a loaded model plus a calibration set contribute to every scoring key."""

    weights_fingerprint: str
    config_hash: str
    dtype: str
    scope: str
    calibration_hash: str
    num_batches: int
    batch_size: int

    @classmethod
    def of(cls, loaded: LoadedModel, calib: CalibrationData) -> DataIdentity:
        """From a loaded model and its calibration data (text or image-caption)."""
        return cls(weights_fingerprint=loaded.weights_fingerprint, config_hash=loaded.config_hash,
                   dtype=str(loaded.dtype).removeprefix("torch."), scope=loaded.scope.value,
                   calibration_hash=calib.token_hash, num_batches=len(calib.batches), batch_size=calib.batch_size)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (recorded in cache markers and manifests)."""
        return asdict(self)


def effective_steps(scheme: Scheme, num_batches: int, batch_size: int) -> dict[str, int]:
    """ModelOpt stops at the end of the data, so more steps than batches means all batches; no calibration steps
    (the default) means every loaded batch (a recipe's ``score_size`` is samples: steps = ceil(score_size / batch
    size)). The identity hashes these numbers, so "all batches" and the same count given explicitly share a cache."""
    return {"num_calib_steps": scheme.calib_steps(num_batches),
            "num_score_steps": min(scheme.score_steps(batch_size), num_batches)}


def scoring_fields(identity: DataIdentity, scheme: Scheme) -> dict[str, Any]:
    """The hashed fields, readable (kept beside the cache file so a key can be explained)."""
    from auto_quantize_model.format_facts import format_signature

    fields = {k: v for k, v in scheme.to_dict().items() if k not in SOLVE_ONLY}
    # Formats by ModelOpt's canonical signature: two names for one config are one search; order is irrelevant.
    fields["quantization_formats"] = sorted(format_signature(f) for f in scheme.quantization_formats)
    # Exclusions as resolved (explicit patterns plus the formats' own): both change the checkpoint's groups and
    # cost denominator. Steps as actually run replace the asked-for steps and score_size.
    setup = scheme.search_setup()
    fields["disabled_layers"] = sorted(setup.disabled_layers)
    fields["cost_excluded_layers"] = sorted(setup.cost_excluded_layers)
    for asked in ("score_size", "format_exclusions", "cost_exclude_disabled"):
        fields.pop(asked, None)
    fields.update(effective_steps(scheme, identity.num_batches, identity.batch_size))
    fields["fp8_scale_rule"] = FP8_SCALE_RULE
    return {"data": identity.to_dict(), "search": fields}


def scoring_key(identity: DataIdentity, scheme: Scheme) -> str:
    """The scoring identity as a short hex key (file names, lease pool, tables)."""
    return sha256_json(scoring_fields(identity, scheme))[:KEY_LENGTH]
