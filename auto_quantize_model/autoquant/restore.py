"""Save and apply the restore artifact: ModelOpt state, quantizer scales, and only the weights a format changed.

Rebuilding a quantized model = load the original checkpoint (LM only), check it is the one the run searched,
then apply this file. Formats that fold a ``pre_quant_scale`` into the weights (SmoothQuant, AWQ) change
``linear.weight`` of every layer that took them, so the artifact carries those layers' weights; all other
weights come from the checkpoint. For FP8-only runs it is a few hundred KB for the 3B model instead of a
second 6 GB copy.

The file is written with ModelOpt's ``safe_save`` (known types sanitised) and read with
``torch.load(weights_only=True)``: loading an artifact runs no code from it. Before use it is checked against
its manifest (scheme, run id, chosen recipe, file hash recorded in the manifest) and against the loaded
checkpoint (config hash and weights fingerprint).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from auto_quantize_model.errors import UserError
from auto_quantize_model.io_utils import atomic_write_bytes, sha256_bytes
from auto_quantize_model.path_names import check_path_name, path_inside

RESTORE_FORMAT = "auto_quantize_model.restore/v2"
RESTORE_SUFFIX = "_modelopt_state.pth"


def restore_path(output_dir: str | Path, scheme_name: str) -> Path:
    """``<output-dir>/<scheme>_modelopt_state.pth`` (the name checked, the path kept inside ``output_dir``)."""
    check_path_name(scheme_name, "scheme name", "rename the scheme")
    return path_inside(output_dir, Path(output_dir) / f"{scheme_name}{RESTORE_SUFFIX}", "restore artifact")


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def folded_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights of the layers whose active quantizers carry a ``pre_quant_scale`` (folded into the weight)."""
    out = {}
    for name, mod in model.named_modules():
        iq = getattr(mod, "input_quantizer", None)
        if isinstance(getattr(mod, "weight", None), torch.Tensor) and getattr(iq, "pre_quant_scale", None) is not None:
            out[f"{name}.weight"] = mod.weight.detach().cpu().clone()
    return out


def _identity(model_info: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    """What the artifact must agree with: its manifest and the checkpoint."""
    return {
        "scheme": manifest["scheme"]["name"],
        "run_id": manifest.get("run_id"),
        "recipe": manifest["autoquant_state"]["best"]["recipe"],
        "config_hash": model_info["config_hash"],
        "weights_fingerprint": model_info.get("weights_fingerprint"),
        "scope": model_info.get("scope"),
    }


def save_restore_artifact(model: nn.Module, path: str | Path, model_info: dict[str, Any],
                          manifest: dict[str, Any]) -> str:
    """Write the artifact for ``model`` (described by ``manifest``); returns the file's SHA-256."""
    import modelopt.torch.opt as mto
    from modelopt.torch.quantization.utils import get_quantizer_state_dict
    from modelopt.torch.utils.serialization import safe_save

    payload = {
        "format": RESTORE_FORMAT,
        "identity": _identity(model_info, manifest),
        "modelopt_state": _to_cpu(mto.modelopt_state(model)),
        "quantizer_state_dict": _to_cpu(get_quantizer_state_dict(model)),
        "weights": folded_weights(model),
    }
    buf = io.BytesIO()
    safe_save(payload, buf)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def read_restore_artifact(path: str | Path, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load an artifact without running code from it, and check it belongs to ``manifest``."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"restore artifact {p} does not exist; re-run the scheme to write it")
    data = p.read_bytes()
    if manifest is not None:
        want = manifest.get("artifacts", {}).get("restore_sha256")
        if want and sha256_bytes(data) != want:
            raise UserError(f"restore artifact {p} is not the one its manifest recorded (SHA-256 differs); it was "
                            "replaced or copied from another run; re-run the scheme")
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(f"restore artifact {p} holds objects a safe load refuses (an older v1 artifact, or not "
                        "ours); re-run the scheme to write a new one") from exc
    except (OSError, RuntimeError, EOFError) as exc:
        raise UserError(f"restore artifact {p} is corrupt ({exc.__class__.__name__}); re-run the scheme") from exc
    if not isinstance(payload, dict) or payload.get("format") != RESTORE_FORMAT:
        raise UserError(f"{p} is not an autoquant restore artifact ({RESTORE_FORMAT}); re-run the scheme")
    if manifest is not None:
        ident = payload["identity"]
        expected = {"scheme": manifest["scheme"]["name"], "run_id": manifest.get("run_id"),
                    "recipe": manifest["autoquant_state"]["best"]["recipe"]}
        for key, value in expected.items():
            if ident.get(key) != value:
                raise UserError(f"restore artifact {p} belongs to another run ({key} differs from its manifest); "
                                "re-run the scheme")
    return payload


def check_artifact_matches(payload: dict[str, Any], path: str | Path, model_info: dict[str, Any]) -> None:
    """Refuse an artifact made on other weights or another config than the loaded checkpoint."""
    ident = payload["identity"]
    if ident.get("weights_fingerprint") != model_info.get("weights_fingerprint"):
        raise UserError(f"{path} was made on weights {str(ident.get('weights_fingerprint'))[:12]} but --model-dir "
                        f"has weights {str(model_info.get('weights_fingerprint'))[:12]}; pass the checkpoint the run used")
    if ident.get("config_hash") != model_info.get("config_hash"):
        raise UserError(f"{path} was made for another checkpoint (config hash differs); pass the matching --model-dir")


def apply_restore_artifact(model: nn.Module, path: str | Path, model_info: dict[str, Any],
                           manifest: dict[str, Any] | None = None) -> nn.Module:
    """Turn a freshly loaded LM (described by ``model_info``, ``LoadedModel.describe()``) into the quantized
    model the artifact describes, in place."""
    import modelopt.torch.opt as mto
    from modelopt.torch.quantization.utils import set_quantizer_state_dict

    payload = read_restore_artifact(path, manifest)
    check_artifact_matches(payload, path, model_info)
    from auto_quantize_model.autoquant.attention_quantizers import for_quantizer_keys

    device = next(model.parameters()).device
    # Attention quantized exactly where the artifact says, whatever this process converted before.
    with for_quantizer_keys(model, payload["quantizer_state_dict"]):
        model = mto.restore_from_modelopt_state(model, payload["modelopt_state"])
    set_quantizer_state_dict(model, payload["quantizer_state_dict"])
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, weight in payload["weights"].items():  # layers whose format folded a scale into the weight
            params[name].copy_(weight)
    model.to(device)
    return model
