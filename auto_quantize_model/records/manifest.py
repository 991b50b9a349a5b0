"""The run manifest (``<scheme>_quant_manifest.json``, schema version 2) as types: one comment per key.

``autoquant/manifest.py:build_manifest`` writes it and ``load_manifest`` reads it; docs/manifest.md explains each
field at length. tests/test_records.py checks that docs/manifest.md's field list and a real manifest of the tiny
model carry exactly these keys, so this module, the writer and the docs cannot drift apart. ``NotRequired`` marks
keys that only some runs write (whole-VLM, image captions, in-memory re-solves) or that older manifests
lack.

No ``from __future__ import annotations`` here: TypedDict reads ``NotRequired`` from evaluated annotations.
"""

from typing import Any, Literal, NotRequired, TypedDict, get_type_hints, is_typeddict

from auto_quantize_model.records.typed_json import check_typed

# --- scheme -----------------------------------------------------------------------------------------------------


class SchemeRecord(TypedDict):
    """The resolved scheme: catalog/TOML defaults plus overrides (``Scheme.to_dict``)."""

    schema_version: int  # the scheme's own schema version
    name: str  # catalog, TOML or recipe-file name
    quantization_formats: list[str]  # candidate formats, ModelOpt config names
    effective_bits: float  # the target budget
    method: str  # AutoQuantize scoring method: gradient or kl_div
    num_score_steps: int  # scoring batches
    num_calib_steps: int  # calibration batches actually run (default: every loaded batch)
    disabled_layers: list[str]  # explicit search-exclusion globs (resolved list: Manifest.exclusions)
    description: str  # one line for reports
    format_exclusions: NotRequired[bool]  # the formats' own name-pattern disables were added to the search's
    cost_excluded_layers: NotRequired[list[str]]  # explicit budget-exclusion globs
    cost_exclude_disabled: NotRequired[bool]  # layers out of the search also left the budget
    score_size: NotRequired[int | None]  # a recipe's scoring sample count (num_score_steps then derived)
    recipe: NotRequired[str | None]  # the ModelOpt AutoQuantize recipe path or name, else null
    fused_scales: NotRequired[str]  # shared (q/k/v, gate/up share scales, as engines serve them) or separate


# --- model ------------------------------------------------------------------------------------------------------


class ParameterCounts(TypedDict):
    """Parameter counts of the loaded checkpoint."""

    checkpoint_total: int  # every parameter of the checkpoint
    language_model: int  # everything searched (the LM; the whole VLM for scope vision_language_model)
    left_out: int  # not searched (the vision tower for LM-only runs)
    searchable_linear_weights: int  # weights of the Linears the search may quantize


class ModelRecord(TypedDict):
    """The checkpoint and how it was loaded (``LoadedModel.describe``)."""

    path: str  # checkpoint directory
    architecture: str  # e.g. Qwen2_5_VLForConditionalGeneration
    model_type: str  # config.json model_type
    config_hash: str  # SHA-256 of config.json without library-version keys
    weights_fingerprint: str  # SHA-256 over the sorted (file name, SHA-256 of the bytes) of every weight file
    dtype: str  # what the unquantized model and the reference run in
    reference_label: str  # display name of that dtype: BF16, float32, FP16
    device: str  # torch device of the run
    scope: Literal["language_model", "vision_language_model"]  # LM only, or the whole VLM (models/scope.py: Scope)
    parameter_counts: ParameterCounts  # see ParameterCounts


# --- calibration ------------------------------------------------------------------------------------------------


class ChatTemplate(TypedDict):
    """How captions were wrapped in the checkpoint's chat template."""

    user_prompt: str  # the user turn each caption answers
    role: str  # the caption's role: assistant
    template_hash: str  # hash of the chat template used


class StepUsage(TypedDict):
    """What ModelOpt read in one phase: the first ``steps`` batches."""

    steps: int  # batches read
    samples: int  # sequences in those batches
    tokens: int  # non-pad tokens in those batches


class CalibrationUsage(TypedDict):
    """Batches, samples and tokens each phase really read."""

    calibrate: StepUsage  # calibration (amax statistics)
    score: StepUsage  # sensitivity scoring


class SkippedItem(TypedDict):
    """An image-caption pair left out."""

    item: str  # the image (or record) left out
    reason: str  # why: missing or unreadable


class CalibrationCommon(TypedDict):
    """What every calibration section records, whatever the data (plus ``usage``, added by the run)."""

    source_path: str  # caption file (image captions: the JSONL or COCO annotations file)
    source_format: str  # text, coco_json, jsonl (image captions: coco, jsonl)
    content_hash: str  # SHA-256 of the file bytes
    token_hash: str  # SHA-256 of the batches as the model sees them
    num_samples: int  # sequences used
    num_batches: int  # batches built
    num_tokens: int  # non-pad tokens of all batches
    batch_size: int  # sequences per batch
    seq_len: int  # tokens per sequence (maximum)
    seed: int  # sampling seed
    caption_hashes: list[str]  # 16-hex hashes of the captions used (evaluation holds them out)
    usage: NotRequired[CalibrationUsage]  # what calibration and scoring read


class CaptionCalibrationRecord(CalibrationCommon):
    """Caption text for the language model (``CalibrationSet.describe`` plus ``usage``)."""

    dropped: dict[str, int]  # captions dropped by reason: blank, duplicate, bad_utf8, no_caption_field, zero_width, nul
    chat_template: NotRequired[ChatTemplate | None]  # null: raw captions


class ImageCaptionCalibrationRecord(CalibrationCommon):
    """Image-caption pairs for the whole VLM (``ImageCalibrationSet.describe`` plus ``usage``)."""

    kind: Literal["image_caption"]  # tells this record from a caption-text one
    num_image_tokens: int  # image tokens of all batches
    image_size: int | None  # resized image side in pixels; null: the image processor's own resizing
    skipped: list[SkippedItem]  # pairs left out, with the reason
    pair_hashes: list[str]  # 16-hex hashes of image bytes + caption per pair used
    dropped: NotRequired[dict[str, int]]  # older manifests only: an empty caption-text field, no longer written


# The calibration section: caption text, or image-caption pairs (``kind`` says which).
CalibrationRecord = CaptionCalibrationRecord | ImageCaptionCalibrationRecord


# --- result -----------------------------------------------------------------------------------------------------


class EffectiveBits(TypedDict):
    """The budget and what the search reached."""

    target: float  # the scheme's effective_bits
    achieved: float | None  # the exact selection's (16 * summed cost / cost denominator)
    measured: float  # recomputed from the live quantizers over the layers the budget counts
    measured_all_layers: NotRequired[float]  # the same over every searched Linear
    counted_over: str  # which modules the budget covers


class ExclusionPattern(TypedDict):
    """One resolved exclusion glob and where it came from."""

    pattern: str  # module-name glob
    source: str  # a format config name (e.g. FP8_DEFAULT_CFG), scheme, or export (what the export cannot write)
    reason: NotRequired[str]  # why, where the source does not say it (export exclusions)


class LayerExclusion(TypedDict):
    """Why one layer is out of the search and/or the budget."""

    search: ExclusionPattern | None  # the glob that kept it out of the search, else null
    budget: ExclusionPattern | None  # the glob that kept it out of the budget, else null
    in_budget: bool  # counted in the effective bits
    note: NotRequired[str]  # "scored, never quantized ..." for a searched layer outside the budget


class Exclusions(TypedDict):
    """The resolved exclusion globs passed to mtq.auto_quantize and the layers they matched."""

    disabled_layers: list[ExclusionPattern]  # out of the search
    cost_excluded_layers: list[ExclusionPattern]  # out of the budget
    layers: dict[str, LayerExclusion]  # every matched layer, by module name


class FusedGroup(TypedDict):
    """One group of Linears engines run as one GEMM (q/k/v, gate/up), and whether its live scales are one."""

    modules: list[str]  # module names
    shared: dict[str, bool]  # weight / input: one amax across the group (per-tensor quantizers only)


class Serving(TypedDict):
    """The served semantics of the run's scales (autoquant/serving.py)."""

    fused_scales: str  # shared or separate
    rule: str  # what engines do with fused groups
    exact_reciprocal_fp8_scales: bool  # FP8 amaxes nudged so that 1 / (1 / S) == S in float32
    fp8_scale_rule: NotRequired[int]  # 2: S also equal on ModelOpt's CPU and GPU paths (absent: 1, CPU only)
    fused_groups: list[FusedGroup]


class Tower(TypedDict):
    """Per tower (language; vision, merger for whole-VLM runs)."""

    layers: int  # Linears
    quantized_layers: int  # Linears with an enabled weight quantizer
    params: int  # weights of those Linears
    quantized_params: int  # weights quantized
    groups: int  # search groups
    summed_score: float  # sum of each group's highest score


class LayerRecord(TypedDict):
    """One searched Linear, by module name."""

    dtype: str  # weight format from the live quantizers: fp8, nvfp4, int8, ...; unquantized: the run's bf16/fp16/fp32
    input_dtype: str  # activation quantizer's format (not quantized: the run's dtype, as for dtype)
    format: str  # chosen format name, NONE when unquantized
    search_group: str | None  # its search group (layer_sensitivity key)
    block_index: int | None  # decoder/vision block, null for lm_head
    kind: str  # q, k, v, o, gate, up, down, lm_head; vision: qkv, proj, patch_embed, merger_0, merger_2
    tower: str  # language, vision, merger
    num_params: int  # weight elements
    bits: float  # bits per weight as the budget counts them
    in_budget: NotRequired[bool]  # false: cost weight 0, outside the budget
    excluded_by: NotRequired[str | None]  # the glob that kept it out of the search, else null


class GroupRecord(TypedDict):
    """One search group (q/k/v share one, gate/up share one)."""

    candidate_formats: list[str]  # most aggressive first, NONE last
    scores: list[float]  # same order; higher = more sensitive; clamped non-increasing
    costs: list[float]  # weight cost per candidate, in 16-bit-equivalent elements
    uncompressed_cost: float  # cost of NONE
    chosen_format: str | None  # the solver's choice
    cost_weight: NotRequired[float]  # ModelOpt's: 0 = outside the budget
    module_names: list[str]  # member Linears
    block_index: int | None  # block of the members, null for lm_head
    kinds: list[str]  # member kinds
    tower: str  # language, vision, merger


class BestRecipe(TypedDict):
    """ModelOpt's ``search_state['best']``."""

    recipe: dict[str, str]  # chosen format per group
    constraints: dict[str, float]  # achieved constraint values (effective_bits)
    score: float  # summed score of the choice
    is_satisfied: bool  # true: the solve returned a choice within the budget (ModelOpt's own status: selection)


class AutoquantState(TypedDict):
    """Summary of ModelOpt's search_state (the full state is in the score cache)."""

    keys: list[str]  # every key of search_state
    method: str | None  # scoring method
    cost_model: str | None  # weight
    cost_denominator: float  # uncompressed cost the budget divides by
    disabled_layers: list[str] | None  # globs ModelOpt kept out
    num_groups: int  # search groups
    best: BestRecipe  # the chosen solution


class ModelOptSelection(TypedDict):
    """ModelOpt's own solve of the same scores, costs and cap, computed its way, for comparison."""

    solver: str  # "PuLP/CBC (LPS)" (gradient) or "threshold bisection" (kl_div)
    status: str  # CBC's status ("Optimal", ...), "satisfied"/"not satisfied" (kl_div), or "error"
    seconds: float  # its solve time
    score: float | None  # summed score of its choice
    effective_bits: float | None  # bits of its choice
    within_budget: bool | None  # its choice's exact summed cost <= the cap
    objective_value: float | None  # its value of the objective (min-sum: summed score; minimax: largest score)
    differs: bool | None  # its choice differs from the exact one in some group (null: it gave none)
    differing_groups: list[str]  # those groups
    score_gap: float | None  # its objective value minus the exact one
    relative_score_gap: float | None  # score_gap / the exact objective value (null when that is 0)
    error: str | None  # why it gave no choice


class SelectionRecord(TypedDict):
    """How the layer choice was solved (autoquant/selection.py), and ModelOpt's own choice beside it."""

    solver: str  # auto_quantize_model.selection
    version: str  # the solver's version
    objective: Literal["min-sum", "minimax"]  # gradient: min-sum; kl_div: minimax
    objective_text: str  # the objective in words
    tie_rule: str  # how exact ties are broken
    optimal: bool  # proven optimal (false only when a pathological input stopped the proof)
    gap: float  # certified absolute gap to the optimum, score units (0 when proven)
    relative_gap: float  # gap / objective value
    score: float  # summed score of the choice
    cost: float  # summed cost of the choice
    cap: float  # the budget in cost units (ModelOpt's max_weight_size)
    effective_bits: float  # 16 * cost / cost denominator
    nodes: int  # states the exact program generated
    seconds: float  # the exact solve's time
    modelopt: ModelOptSelection | None  # null when the comparison was not run


class ScoreCache(TypedDict):
    """Where the calibration statistics and scores came from."""

    key: str  # the scoring identity (autoquant/identity.py)
    path: str  # ModelOpt's search checkpoint
    reused: bool  # true: statistics and scores read from the cache, only the solve ran
    in_memory: NotRequired[bool]  # re-solved on the previous search's model in memory (sweeps, SearchSession)
    derived_from: NotRequired[str | None]  # the shared scoring pass whose checkpoint this key's was derived from


class Timings(TypedDict):
    """Seconds per phase (null: the phase did not run separately)."""

    load: float  # loading the checkpoint
    load_gb_per_s: NotRequired[float]  # the load's speed: the scope's tensor bytes read per second of `load`
    copy_model: float  # fresh copy of the pristine model
    calibrate: float | None  # calibration
    score: float | None  # scoring
    calibrate_and_score: NotRequired[float | None]  # kl_div with fresh scores: both phases in one figure
    solve: float  # the budget's solve (a cache re-solve: everything ModelOpt does after loading its checkpoint)
    write_restore: NotRequired[float]  # writing the restore artifact
    total: NotRequired[float]  # the whole run including load


class Artifacts(TypedDict):
    """File names beside the manifest."""

    manifest: str  # this file
    report: str  # layer-sensitivity-report.md
    restore: str  # <scheme>_modelopt_state.pth
    restore_sha256: NotRequired[str]  # SHA-256 of the restore artifact


Versions = TypedDict(
    "Versions",
    {
        "torch": str,  # torch version
        "transformers": str,  # transformers version
        "nvidia-modelopt": str,  # ModelOpt version
        "auto-quantize-model": str,  # this package's version
        "pulp": str,  # the LP solver's version
        "python": str,  # interpreter version
    },
)


class Manifest(TypedDict):
    """``<scheme>_quant_manifest.json``, schema version 2 (docs/manifest.md)."""

    schema_version: Literal[2]  # bumped on any incompatible change (version 1 is read, upgraded in memory)
    run_id: str | None  # sweep trial id; null for single runs
    sweep_id: str | None  # sweep name; null for single runs
    scheme: SchemeRecord  # the resolved scheme
    model: ModelRecord  # the checkpoint
    calibration: CalibrationRecord  # the calibration data: caption text or image-caption pairs
    effective_bits: EffectiveBits  # budget target and result
    budget_met: bool  # achieved <= target (+1e-6)
    num_quantized_layers: int  # searched Linears whose weight quantizer is enabled (any format)
    num_layers: int  # searched Linears
    exclusions: NotRequired[Exclusions]  # resolved exclusion globs and the layers they matched
    serving: NotRequired[Serving | None]  # served semantics of the scales; absent in runs made before it
    towers: NotRequired[dict[str, Tower]]  # per tower: language; vision, merger for whole-VLM runs
    layers: dict[str, LayerRecord]  # one entry per searched Linear, by module name
    layer_sensitivity: dict[str, GroupRecord]  # one entry per search group
    autoquant_state: AutoquantState  # summary of ModelOpt's search_state
    selection: NotRequired[SelectionRecord | None]  # how the choice was solved; null: a state solved elsewhere
    score_cache: ScoreCache  # the scoring identity and whether scores were reused
    timings: Timings  # seconds per phase
    artifacts: Artifacts  # file names beside the manifest
    versions: Versions  # library versions
    git_revision: str | None  # commit of this package (-dirty if the tree had changes)


def manifest_problems(data: Any, record: type = Manifest) -> list[str]:
    """Every way ``data`` differs from ``record`` (default: the whole manifest): missing required keys,
    undeclared keys, values of the wrong JSON type. Empty when it matches."""
    problems: list[str] = []
    check_typed(data, record, "manifest", problems)
    return problems


def declared_keys(record: type) -> dict[str, Any]:
    """Key -> type of a TypedDict (``NotRequired`` unwrapped)."""
    return get_type_hints(record)


__all__ = [name for name, obj in list(globals().items()) if is_typeddict(obj)] + [
    "CalibrationRecord", "declared_keys", "manifest_problems"]
