"""Save and apply the restore artifact: ModelOpt state plus quantizer scales, no weights.

Rebuilding a quantized model = load the original checkpoint (LM only), then apply this file. It is a
few hundred KB for the 3B model instead of a second 6 GB copy of the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from auto_quantize_model.errors import UserError
from auto_quantize_model.io_utils import atomic_write_bytes

RESTORE_FORMAT = "auto_quantize_model.restore/v1"
RESTORE_SUFFIX = "_modelopt_state.pth"


def restore_path(output_dir: str | Path, scheme_name: str) -> Path:
    """``<output-dir>/<scheme>_modelopt_state.pth``."""
    return Path(output_dir) / f"{scheme_name}{RESTORE_SUFFIX}"


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def save_restore_artifact(model: nn.Module, path: str | Path, config_hash: str, scheme_name: str) -> Path:
    """Write the ModelOpt state and quantizer state dict of a quantized model."""
    import io

    import modelopt.torch.opt as mto
    from modelopt.torch.quantization.utils import get_quantizer_state_dict

    payload = {
        "format": RESTORE_FORMAT,
        "config_hash": config_hash,
        "scheme": scheme_name,
        "modelopt_state": _to_cpu(mto.modelopt_state(model)),
        "quantizer_state_dict": _to_cpu(get_quantizer_state_dict(model)),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return atomic_write_bytes(path, buf.getvalue())


def apply_restore_artifact(model: nn.Module, path: str | Path, config_hash: str | None = None) -> nn.Module:
    """Turn a freshly loaded LM into the quantized model the artifact describes (in place)."""
    import modelopt.torch.opt as mto
    from modelopt.torch.quantization.utils import set_quantizer_state_dict

    p = Path(path)
    if not p.is_file():
        raise UserError(f"restore artifact {p} does not exist; re-run the scheme to write it")
    try:
        # The ModelOpt state holds plain Python config objects, so full unpickling is required;
        # only load artifacts you wrote yourself.
        payload = torch.load(p, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise UserError(f"restore artifact {p} is corrupt ({exc.__class__.__name__}); re-run the scheme") from exc
    if not isinstance(payload, dict) or payload.get("format") != RESTORE_FORMAT:
        raise UserError(f"{p} is not an autoquant restore artifact ({RESTORE_FORMAT})")
    if config_hash is not None and payload["config_hash"] != config_hash:
        raise UserError(f"{p} was made for another checkpoint (config hash differs); pass the matching --model-dir")
    device = next(model.parameters()).device
    model = mto.restore_from_modelopt_state(model, payload["modelopt_state"])
    set_quantizer_state_dict(model, payload["quantizer_state_dict"])
    model.to(device)
    return model
