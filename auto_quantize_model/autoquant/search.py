"""One ``mtq.auto_quantize`` call: the loaded model's own steps, a search-cache checkpoint, phase timings, and one
refusal per failure kind. ``run.py`` (one scheme's search) and ``passes.py`` (a shared scoring pass) both call
:func:`auto_quantize`."""

from __future__ import annotations

import math
import re
import time
import warnings
from typing import Any

from torch import nn

from auto_quantize_model.autoquant.attention_quantizers import as_in_a_fresh_process
from auto_quantize_model.autoquant.cache import CacheEntry
from auto_quantize_model.autoquant.selection import InfeasibleBudget
from auto_quantize_model.autoquant.serving import serving_calibration
from auto_quantize_model.autoquant.solve import exact_selection
from auto_quantize_model.configs.schemes import Scheme
from auto_quantize_model.datasets.protocol import CalibrationData
from auto_quantize_model.errors import UserError
from auto_quantize_model.modelopt_configs import resolve_quant_config
from auto_quantize_model.models.loading import LoadedModel
from auto_quantize_model.models.steps import Batch, ForwardStep, LossStep


class PhaseClock:
    """Splits one ``auto_quantize`` call into calibrate / score / solve by watching its callbacks.

    Calibration only calls the forward step; gradient scoring is the first call of the loss; the solve
    is what remains after the last callback. For ``kl_div`` (no loss) calibrate and score are merged.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first_loss: float | None = None
        self.last_call: float | None = None

    def wrap_forward(self, fn: ForwardStep) -> ForwardStep:
        def inner(model: nn.Module, batch: Batch) -> Any:
            out = fn(model, batch)
            self.last_call = time.perf_counter()
            return out

        return inner

    def wrap_loss(self, fn: LossStep) -> LossStep:
        def inner(out: Any, batch: Batch) -> Any:
            if self.first_loss is None:
                self.first_loss = time.perf_counter()
            loss = fn(out, batch)
            self.last_call = time.perf_counter()
            return loss

        return inner

    def split(self, end: float, method: str) -> dict[str, float | None]:
        """Seconds per phase, ending at ``end``."""
        if self.last_call is None:  # everything came from the cache
            return {"calibrate": 0.0, "score": 0.0, "solve": end - self.start}
        if method == "gradient" and self.first_loss is not None:
            return {"calibrate": self.first_loss - self.start, "score": self.last_call - self.first_loss,
                    "solve": end - self.last_call}
        return {"calibrate": None, "score": None, "calibrate_and_score": self.last_call - self.start,
                "solve": end - self.last_call}


def unreachable_budget(scheme: Scheme, lowest: float) -> UserError:
    """The one refusal for a budget below what the searchable layers can reach, on every path. The lowest reachable
    bits are printed rounded up (4 decimals): the exact solve has no tolerance, so the printed value is feasible."""
    shown = f"{math.ceil(lowest * 1e4) / 1e4:g}" if math.isfinite(lowest) else "unknown"
    return UserError(f"scheme {scheme.name}: effective bits {scheme.effective_bits:g} is infeasible: the lowest "
                     f"achievable with these formats and disabled layers is {shown}; choose a higher "
                     "--effective-bits or disable fewer layers")


def auto_quantize(loaded: LoadedModel, model: nn.Module, calib: CalibrationData, scheme: Scheme, entry: CacheEntry,
                  steps: dict[str, int], clock: PhaseClock) -> tuple[nn.Module, dict[str, Any]]:
    """``mtq.auto_quantize`` of ``model`` (``loaded.model`` or a copy of it) for ``scheme``, with ``loaded``'s
    forward and loss step and ``entry``'s checkpoint; returns the searched model and ModelOpt's search state.

    The solve inside is the exact selection (``solve.exact_selection``); its record is ``search_state["best"]
    ["selection"]``."""
    import modelopt.torch.quantization as mtq

    try:
        # serving_calibration: each format's calibration ends with the scales engines serve (autoquant/serving.py);
        # exact_selection: every solve of this call is exact (autoquant/solve.py); as_in_a_fresh_process: the
        # modules ModelOpt wraps depend on the model, not on earlier conversions (autoquant/attention_quantizers.py).
        with (exact_selection(), warnings.catch_warnings(), serving_calibration(scheme.fused_scales),
              as_in_a_fresh_process(model)):
            # ModelOpt warns whenever the checkpoint is new; the caller's log line already says so.
            warnings.filterwarnings("ignore", message=".*[Cc]heckpoint.*(does not exist|not found).*")
            model, search_state = mtq.auto_quantize(
                model,
                constraints=scheme.search_constraints(),
                quantization_formats=[resolve_quant_config(f) for f in scheme.quantization_formats],
                data_loader=calib.batches,
                forward_step=clock.wrap_forward(loaded.forward_step),
                # kl_div scores from logits alone; ModelOpt warns if handed a loss it will ignore.
                loss_func=clock.wrap_loss(loaded.loss_step) if scheme.method == "gradient" else None,
                disabled_layers=list(scheme.search_setup().disabled_layers) or None,
                method=scheme.method,
                checkpoint=str(entry.checkpoint),
                verbose=False,
                **steps,
            )
    except InfeasibleBudget as exc:  # the exact solve's check (no tolerance), after ModelOpt saved its scores
        entry.scores_complete = True
        raise unreachable_budget(scheme, exc.lowest_bits) from exc
    except ValueError as exc:
        if "infeasible" in str(exc):  # ModelOpt's own check before calibration
            raise unreachable_budget(scheme, _lowest_from_message(str(exc))) from exc
        raise
    except OSError as exc:
        raise UserError(f"could not write the search cache in {entry.final.parent} ({exc.strerror or exc}); free "
                        "space or pass another --cache-dir") from exc
    # ModelOpt turns on gradient checkpointing for Hugging Face models it scores; inference wants it off.
    if getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    return model, search_state


def _lowest_from_message(text: str) -> float:
    """ModelOpt's infeasibility message names the minimum achievable bits; NaN if its wording changes."""
    m = re.search(r"minimum achievable[^0-9]*([0-9]+(?:\.[0-9]+)?)", text)
    return float(m.group(1)) if m else float("nan")
