"""Load a checkpoint for a search: :func:`load_model` with a :class:`Scope`, the one loader.

``Scope.LANGUAGE_MODEL`` (the default) keeps the language model of a vision-language checkpoint (or a plain causal
LM), vision tower left out: ``auto_quantize`` counts every quantizable Linear of the module it is given in the
effective-bits denominator, disabled or not, so the search must run on a module holding only the decoder and its
``lm_head``. :class:`LanguageModelWithHead` is that module; its Linear names (``model.layers.N...``, ``lm_head``)
are what manifests, reports and tables call layers. ``Scope.WHOLE_VLM`` keeps the whole VLM (vision blocks,
merger, language model) and its image processor, for image-caption calibration.

The result, :class:`LoadedModel`, carries its own forward and loss step (``models/steps.py``), so the search,
the evaluation and the sweep worker run any loaded model on its own batches the same way.
"""

from __future__ import annotations

import gc
import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from auto_quantize_model.errors import UserError
from auto_quantize_model.io_utils import sha256_json
from auto_quantize_model.models.fingerprint import weights_fingerprint
from auto_quantize_model.models.scope import Scope
from auto_quantize_model.models.steps import STEPS, Batch
from auto_quantize_model.preflight import read_checkpoint_config  # noqa: F401 - here since before it moved
from auto_quantize_model.timing import StepTimes

log = logging.getLogger(__name__)

# Keys that change with the library that saved the config, not with the network it describes.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache"}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LanguageModelWithHead(nn.Module):
    """Decoder stack plus ``lm_head``: input ids in, next-token logits out."""

    def __init__(self, decoder: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.model = decoder
        self.lm_head = lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return self.lm_head(hidden.last_hidden_state)


@dataclass
class LoadedModel:
    """A model ready for AutoQuant (the LM only, or the whole VLM), with its steps and what manifests record."""

    model: nn.Module  # LanguageModelWithHead for Scope.LANGUAGE_MODEL; the Hugging Face VLM for Scope.WHOLE_VLM
    tokenizer: Any
    model_dir: str
    architecture: str
    model_type: str
    config_hash: str
    device: torch.device
    dtype: torch.dtype
    param_counts: dict[str, int] = field(default_factory=dict)
    load_seconds: float = 0.0
    scope: Scope = Scope.LANGUAGE_MODEL
    image_processor: Any = None  # Scope.WHOLE_VLM: the checkpoint's image processor
    weights_fingerprint: str = ""  # models/fingerprint.py: the weight files' content hash
    load_bytes: int = 0  # the scope's tensor bytes the load read (or mapped, on the host), not the whole checkpoint's
    loader: str = ""  # "safetensors" (models/weights.py) or "from_pretrained"
    load_steps: dict[str, float] = field(default_factory=dict)  # seconds per step of the load (log, benchmarks)

    @property
    def load_gb_per_s(self) -> float:
        """The load phase's speed: tensor bytes read per second of ``load_seconds`` (decimal GB/s)."""
        return self.load_bytes / 1e9 / self.load_seconds if self.load_seconds > 0 else 0.0

    def forward_step(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Logits of ``model`` (this model, or a searched or quantized copy of it) for a batch of its calibration
        data; the ``forward_step`` ModelOpt's search calls."""
        return STEPS[self.scope].forward(model, batch)

    def loss_step(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The loss gradient scoring backpropagates (next-token cross-entropy on the labelled positions)."""
        return STEPS[self.scope].loss(logits, batch)

    def describe(self) -> dict[str, Any]:
        """The manifest's ``model`` section."""
        return {
            "path": self.model_dir,
            "architecture": self.architecture,
            "model_type": self.model_type,
            "config_hash": self.config_hash,
            "weights_fingerprint": self.weights_fingerprint,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "scope": self.scope.value,
            "parameter_counts": dict(self.param_counts),
            # What the unquantized reference really runs in (float32 on CPU, not BF16).
            "reference_label": reference_label(self.dtype),
        }


def reference_label(dtype: torch.dtype | str) -> str:
    """Display name of the unquantized reference's dtype: ``BF16``, ``float32`` or ``FP16``."""
    name = str(dtype).removeprefix("torch.")
    return {"bfloat16": "BF16", "float16": "FP16"}.get(name, name)


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without CUDA is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise UserError(f"--device {device!r} is not a torch device; use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for CUDA but none is available; use --device cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on GPU and float32 on CPU (CPU bf16 matmuls are slow on most hosts)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is unknown; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def config_hash(config: dict[str, Any]) -> str:
    """Hash of the architecture-defining part of a config.json."""
    return sha256_json({k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS})


def model_class(config: dict[str, Any]) -> tuple[str, Any]:
    """(architecture, transformers class) of a checkpoint's config.json. The first call in a process imports
    transformers and the model's modeling code (seconds: 6.3 s in a fresh sweep worker on the H100 machine)."""
    import transformers

    archs = config.get("architectures") or []
    for arch in archs:
        cls = getattr(transformers, arch, None)
        if cls is not None and (arch.endswith("ForConditionalGeneration") or arch.endswith("ForCausalLM")):
            return arch, cls
    raise UserError(
        f"unsupported checkpoint architecture {archs or config.get('model_type')!r}; "
        "supported: *ForConditionalGeneration vision-language models and *ForCausalLM language models"
    )


def split_language_model(full: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Return (decoder, lm_head) of a VLM or causal LM, following ModelOpt's VLM lineage.

    The rule of ``modelopt/torch/export/model_utils.py:get_language_model_from_vl`` (0.47.0): ``model.model
    .language_model``, else ``model.language_model``; a causal LM's decoder is ``model.model``. Applied here rather than
    imported: importing ModelOpt takes seconds that the load would pay before reading a byte, and its other pattern
    (encoder-decoder VLMs) is not a model this loader supports. tests/test_loading.py checks both agree.
    """
    inner = getattr(full, "model", None)
    if inner is not None and hasattr(inner, "language_model"):
        decoder = inner.language_model
    else:
        decoder = getattr(full, "language_model", inner)
    # Some VLMs nest a whole causal LM (LLaVA's language_model has its own .model and .lm_head).
    if decoder is not None and hasattr(decoder, "lm_head") and hasattr(decoder, "model"):
        return decoder.model, decoder.lm_head
    lm_head = full.get_output_embeddings() if hasattr(full, "get_output_embeddings") else None
    if decoder is None or lm_head is None:
        raise UserError(f"cannot find the language model and lm_head in {type(full).__name__}; not supported")
    return decoder, lm_head


def count_parameters(module: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def linear_weight_count(module: nn.Module) -> int:
    """Weights of every Linear (what AutoQuant's effective-bits budget is measured over)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def load_tokenizer(model_dir: str | Path):
    """The checkpoint's own tokenizer, with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise UserError(f"{model_dir} has no usable tokenizer ({exc.__class__.__name__}); it needs tokenizer files") from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model_dir: str | Path, scope: Scope = Scope.LANGUAGE_MODEL, device: str = "auto",
               dtype: str = "auto", *, via_from_pretrained: bool = False) -> LoadedModel:
    """Load ``model_dir`` for a search over ``scope`` on ``device``: the language model and lm_head only, or the
    whole VLM with its image processor (a checkpoint without a vision tower is refused for the latter).

    Safetensors checkpoints are read by ``models/weights.py``: only the scope's tensors, straight to the device
    (memory-mapped on the host, as ``from_pretrained`` does there), the fingerprint hashed alongside; the result is
    bit-identical to ``from_pretrained`` (tests/test_fast_load.py).
    Other checkpoints, and ``via_from_pretrained`` (the benchmarks' baseline), go through ``from_pretrained`` on the
    host and then move. Both refuse weights that do not match config.json (missing, unexpected, mis-shaped).
    """
    t0 = time.perf_counter()
    steps = StepTimes(digits=2)
    scope = Scope(scope)  # also takes the manifest string
    config = read_checkpoint_config(model_dir)
    arch, cls = model_class(config)
    if scope is Scope.WHOLE_VLM and "vision_config" not in config:
        raise UserError(f"{model_dir} ({arch}) has no vision tower; image-caption calibration needs a VLM checkpoint")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    steps.done("config")
    tokenizer = load_tokenizer(model_dir)
    image_processor = load_image_processor(model_dir) if scope is Scope.WHOLE_VLM else None
    steps.done("tokenizer")
    fast = None
    if not via_from_pretrained:
        fast = _read_fast(cls, Path(model_dir), scope, torch_dtype, dev)
    if fast is not None:
        full, read, fingerprint = fast.full, fast.stats, fast.fingerprint
        parts = fast.scope_modules
        steps.seconds.update(fast.steps)
        steps.mark()
    else:
        full = _from_pretrained(cls, Path(model_dir), torch_dtype)
        steps.done("from_pretrained")
        fingerprint = weights_fingerprint(model_dir)
        steps.done("fingerprint")
        parts = [full] if scope is Scope.WHOLE_VLM else list(split_language_model(full))
    total = count_parameters(full)
    if scope is Scope.LANGUAGE_MODEL:
        model: nn.Module = LanguageModelWithHead(*parts)
        # Dropping the full model frees the vision tower (on the host, or never materialised) before any upload.
        del full, parts
        gc.collect()
    else:
        model = full
    model.eval().requires_grad_(False).to(dev)
    steps.done("to_device")
    searched = count_parameters(model)
    counts = {"checkpoint_total": total, "language_model": searched, "left_out": total - searched,
              "searchable_linear_weights": linear_weight_count(model)}
    seconds = time.perf_counter() - t0
    if fast is None:
        nbytes, how = tensor_bytes(model), "from_pretrained"
    else:
        nbytes = fast.tensor_bytes
        how = (f"{nbytes / 1e9:.2f} GB of tensors mapped, read on first use" if fast.mapped else
               f"read {nbytes / 1e9:.2f} GB of tensors to {dev} in {read.seconds:.2f}s ({read.gb_per_s:.2f} GB/s)")
        how += f", {read.bytes_hashed / 1e9:.2f} GB hashed alongside"
    log.info("phase load: %s (%s) %s on %s/%s in %.2fs (%.2f GB/s; %s; %s), %s", model_dir, arch,
             "LM-only" if scope is Scope.LANGUAGE_MODEL else "whole VLM", dev, torch_dtype, seconds,
             nbytes / 1e9 / seconds, how, steps, counts)
    return LoadedModel(model=model, tokenizer=tokenizer, model_dir=str(Path(model_dir).resolve()), architecture=arch,
                       model_type=str(config.get("model_type")), config_hash=config_hash(config), device=dev,
                       dtype=torch_dtype, param_counts=counts, load_seconds=seconds, scope=scope,
                       image_processor=image_processor, weights_fingerprint=fingerprint, load_bytes=nbytes,
                       loader="from_pretrained" if fast is None else "safetensors", load_steps=steps.seconds)


def load_whole_model(model_dir: str | Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The checkpoint's whole Hugging Face model on ``device`` in ``dtype`` (what export rebuilds the run on): the
    safetensors path where it applies, else ``from_pretrained``; weights that do not match config.json refused."""
    _, cls = model_class(read_checkpoint_config(model_dir))
    fast = _read_fast(cls, Path(model_dir), Scope.WHOLE_VLM, dtype, device)
    full = fast.full if fast is not None else _from_pretrained(cls, Path(model_dir), dtype)
    return full.eval().requires_grad_(False).to(device)


def _read_fast(cls, model_dir: Path, scope: Scope, dtype: torch.dtype, device: torch.device):
    """``weights.read_model`` for ``scope``, or None where the checkpoint needs ``from_pretrained``."""
    from auto_quantize_model.models.fingerprint import plan_fingerprint
    from auto_quantize_model.models.weights import NotFastLoadable, read_model

    def scope_of(full: nn.Module) -> list[nn.Module]:
        return [full] if scope is Scope.WHOLE_VLM else list(split_language_model(full))

    t = time.perf_counter()
    plan = plan_fingerprint(model_dir)  # stats and samples the files; hashes come from the cache where it can
    planned = round(time.perf_counter() - t, 3)
    try:
        fast = read_model(cls, model_dir, scope_of, dtype, device, plan)
        fast.steps = {"fingerprint_plan": planned, **fast.steps}
        return fast
    except NotFastLoadable as why:
        log.info("%s: loading through from_pretrained (%s)", model_dir, why)
        return None


def _from_pretrained(cls, model_dir: Path, dtype: torch.dtype) -> nn.Module:
    """The whole model through ``from_pretrained`` on the host, refused if its weights do not match config.json."""
    from transformers.utils import logging as hf_logging

    from auto_quantize_model.models.weights import SHOWN

    # Its progress bar and multi-line load report would surround the one-line refusal below on stderr.
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        # Mis-shaped tensors reported rather than raised: refused below with the others, in one line.
        full, info = cls.from_pretrained(str(model_dir), dtype=dtype, output_loading_info=True,
                                         ignore_mismatched_sizes=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"could not load weights from {model_dir}: {str(exc).splitlines()[0]}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    bad = {k: sorted(map(str, info.get(k) or ())) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(bad.values()):
        shown = "; ".join(f"{len(v)} {k.replace('_', ' ')} ({', '.join(v[:SHOWN])})" for k, v in bad.items() if v)
        raise UserError(f"the weights of {model_dir} do not match its config.json: {shown}; re-save the checkpoint "
                        "with the config it was trained with (save_pretrained) or fix config.json")
    return full


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the distinct parameters and buffers of ``model`` (a tied weight counted once)."""
    seen = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return sum(t.numel() * t.element_size() for t in seen.values())


def load_language_model(model_dir: str | Path, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """``load_model(model_dir, Scope.LANGUAGE_MODEL, device, dtype)``: the Python API's and the sweep worker's
    name for the usual case."""
    return load_model(model_dir, Scope.LANGUAGE_MODEL, device, dtype)


def load_image_processor(model_dir: str | Path):
    """The checkpoint's image processor (PIL backend for Qwen2-VL/2.5-VL: no torchvision needed)."""
    from transformers import Qwen2VLImageProcessorPil

    try:
        return Qwen2VLImageProcessorPil.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise UserError(f"{model_dir} has no usable preprocessor_config.json ({exc.__class__.__name__})") from exc
