"""Evaluate runs against the unquantized reference on held-out captions; write comparison.json and .md.

The reference is the checkpoint in the dtype it was loaded in (BF16 on GPU, float32 on CPU; the
tables say which). Beside it, every comparison carries the uniform FP8 PTQ control (controls.py).

``evaluate_run`` (inference/evaluate.py) is what a sweep worker calls with a model already in memory; ``compare_runs`` is the
``autoquant compare`` job: one reference, many runs, one table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from auto_quantize_model.autoquant.rebuild import RunArtifacts, build_quantized_model
from auto_quantize_model.datasets.calibration import CalibrationSet, build_calibration_set, caption_hash
from auto_quantize_model.datasets.captions import CaptionSource
from auto_quantize_model.errors import UserError
from auto_quantize_model.inference.evaluate import evaluate_run
from auto_quantize_model.inference.generate import encode_prompts, first_divergence, greedy_generate
from auto_quantize_model.inference.metrics import evaluate_against_reference
from auto_quantize_model.io_utils import atomic_write_json, atomic_write_text
from auto_quantize_model.models.loading import LoadedModel
from auto_quantize_model.provenance import git_revision, versions

log = logging.getLogger(__name__)

COMPARISON_SCHEMA_VERSION = 1
DEFAULT_PROMPTS = (
    "Describe a photo of a dog running across a sandy beach.",
    "What colors would you expect in a picture of a city park at dusk?",
    "Write one caption for an image of a red bus parked near a brick wall.",
    "List three objects that could appear on a kitchen table.",
)


@dataclass
class EvalSettings:
    """How much held-out data and generation a comparison uses."""

    max_samples: int = 64
    batch_size: int = 4
    seq_len: int = 256
    seed: int = 0
    max_new_tokens: int = 24
    chat_template: bool = True
    control: bool = True  # evaluate the uniform FP8 PTQ control beside the runs


def held_out_source(source: CaptionSource, manifests: list[dict[str, Any]]) -> tuple[CaptionSource, dict[str, int]]:
    """Drop every caption any run calibrated on; report how many each run shared with the eval set."""
    per_run, used = {}, set()
    eval_hashes = {caption_hash(c) for c in source.captions}
    for m in manifests:
        hashes = set(m["calibration"].get("caption_hashes", []))
        per_run[m.get("run_id") or m["scheme"]["name"]] = len(hashes & eval_hashes)
        used |= hashes
    kept = [c for c in source.captions if caption_hash(c) not in used]
    if not kept:
        raise UserError(f"every caption in {source.path} was used for calibration; pass held-out --eval-captions")
    if len(kept) < len(source.captions):
        log.warning("dropped %d eval captions that were calibration samples", len(source.captions) - len(kept))
    held = CaptionSource(source.path, source.format, source.content_hash, kept, dict(source.dropped))
    return held, per_run


def _generations(model: nn.Module, tokenizer: Any, prompt_ids: list[list[int]], settings: EvalSettings) -> list[list[int]]:
    return greedy_generate(model, prompt_ids, max_new_tokens=settings.max_new_tokens,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)


def compare_runs(
    loaded: LoadedModel,
    runs: list[RunArtifacts],
    eval_source: CaptionSource,
    settings: EvalSettings,
    prompts: tuple[str, ...] | list[str] = DEFAULT_PROMPTS,
) -> dict[str, Any]:
    """Evaluate the unquantized reference, the uniform FP8 control and every run on the same held-out
    data and prompts."""
    source, overlap = held_out_source(eval_source, [r.manifest for r in runs])
    data = build_calibration_set(loaded.tokenizer, source, max_samples=settings.max_samples,
                                 batch_size=settings.batch_size, seq_len=settings.seq_len, seed=settings.seed,
                                 device=loaded.device)
    tok = loaded.tokenizer
    prompt_ids = encode_prompts(tok, list(prompts), settings.chat_template)
    ref_gen = _generations(loaded.model, tok, prompt_ids, settings)
    reference = evaluate_against_reference(loaded.model, loaded.model, data.batches, forward=loaded.forward_step)
    control = (_control_row(loaded, runs[0].manifest, data, tok, prompt_ids, ref_gen, settings)
               if settings.control else None)
    rows = []
    for run in runs:
        model = build_quantized_model(loaded, run)
        result = evaluate_run(model, loaded.model, data, run.manifest, forward=loaded.forward_step)
        gens = _generations(model, tok, prompt_ids, settings)
        m = run.manifest
        rows.append({
            "name": run.name,
            "run_dir": str(run.run_dir),
            "scheme": m["scheme"]["name"],
            "effective_bits_target": m["effective_bits"]["target"],
            "effective_bits_achieved": m["effective_bits"]["achieved"],
            "effective_bits_all_layers": m["effective_bits"].get("measured_all_layers", m["effective_bits"]["measured"]),
            "num_quantized_layers": m["num_quantized_layers"],
            "num_layers": m.get("num_layers", len(m["layers"])),
            **result,
            "generations": [
                {"token_ids": g, "text": tok.decode(g, skip_special_tokens=True),
                 "first_divergence": first_divergence(r, g)}
                for r, g in zip(ref_gen, gens)
            ],
        })
        log.info("compared %s: ppl %.4g, KL mean %.3g, top-1 %.3f", run.name, result["metrics"]["perplexity"],
                 result["metrics"]["kl_mean"], result["metrics"]["top1_agreement"])
        del model
    return {
        "schema_version": COMPARISON_SCHEMA_VERSION,
        "model": loaded.describe(),
        "evaluation": {**data.describe(), "calibration_overlap_per_run": overlap,
                       "dropped_calibration_captions": len(eval_source.captions) - len(source.captions)},
        "prompts": list(prompts),
        "reference": {"metrics": {"perplexity": reference["reference_perplexity"], "num_tokens": reference["num_tokens"]},
                      "generations": [{"token_ids": g, "text": tok.decode(g, skip_special_tokens=True)} for g in ref_gen]},
        "control": control,
        "runs": rows,
        "versions": versions(),
        "git_revision": git_revision(),
    }


def _control_row(loaded: LoadedModel, manifest: dict[str, Any], data: CalibrationSet, tok: Any,
                 prompt_ids: list[list[int]], ref_gen: list[list[int]], settings: EvalSettings) -> dict[str, Any]:
    """Uniform FP8 PTQ calibrated on the first run's calibration data and steps, evaluated like a run."""
    from auto_quantize_model.inference.controls import build_uniform_ptq, calibration_from_manifest

    calib = calibration_from_manifest(loaded, manifest)
    control = build_uniform_ptq(loaded, calib, manifest["scheme"].get("num_calib_steps"))
    result = evaluate_run(control.model, loaded.model, data, forward=loaded.forward_step)
    gens = _generations(control.model, tok, prompt_ids, settings)
    log.info("compared control %s: ppl %.4g, KL mean %.3g", control.name, result["metrics"]["perplexity"],
             result["metrics"]["kl_mean"])
    return {**control.describe(), **result,
            "generations": [{"token_ids": g, "text": tok.decode(g, skip_special_tokens=True),
                             "first_divergence": first_divergence(r, g)} for r, g in zip(ref_gen, gens)]}


def _marked(tokenizer: Any, ids: list[int], at: int | None) -> str:
    """Decoded text with the first divergent token wrapped in ⟦ ⟧."""
    text = lambda xs: tokenizer.decode(xs, skip_special_tokens=True).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    if at is None or at >= len(ids):
        return text(ids)
    return f"{text(ids[:at])}⟦{text(ids[at:at + 1])}⟧{text(ids[at + 1:])}"


def render_comparison(comp: dict[str, Any], tokenizer: Any) -> str:
    """comparison.md: metrics table, generations side by side, error against sensitivity."""
    ev = comp["evaluation"]
    ref = comp["model"].get("reference_label", "BF16")
    ctl = comp.get("control")
    lines = [
        "# Cross-scheme comparison",
        "",
        f"Held-out captions: {ev['num_samples']} from `{ev['source_path']}` ({ev['num_tokens']} tokens, "
        f"seed {ev['seed']}); {ev['dropped_calibration_captions']} captions were dropped because a run "
        f"calibrated on them. KL is KL({ref} || run) of next-token distributions, per token. The reference is the "
        f"unquantized checkpoint as loaded ({ref}).",
        "",
        "| run | scheme | bits (target/achieved) | bits, all LM Linears | quantized layers | perplexity | KL mean | KL max | top-1 agree | error~score Spearman |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {ref} reference | - | 16 | 16 | 0 | {comp['reference']['metrics']['perplexity']:.4f} | 0 | 0 | 1.000 | - |",
    ]
    if ctl:
        mt = ctl["metrics"]
        lines.append(
            f"| uniform FP8 PTQ (control) | {ctl['quant_format']} | - | {ctl['effective_bits']:.3f} | "
            f"{ctl['num_quantized_layers']}/{ctl['num_layers']} | {mt['perplexity']:.4f} | {mt['kl_mean']:.4g} | "
            f"{mt['kl_max']:.4g} | {mt['top1_agreement']:.3f} | - |")
    for r in comp["runs"]:
        mt, ev_s = r["metrics"], r.get("error_vs_sensitivity", {})
        rho = ev_s.get("spearman")
        lines.append(
            f"| {r['name']} | {r['scheme']} | {r['effective_bits_target']:g}/{r['effective_bits_achieved']:.3f} | "
            f"{r.get('effective_bits_all_layers') or r['effective_bits_achieved']:.3f} | "
            f"{r['num_quantized_layers']}/{r['num_layers']} | {mt['perplexity']:.4f} | {mt['kl_mean']:.4g} | "
            f"{mt['kl_max']:.4g} | {mt['top1_agreement']:.3f} | {'n/a' if rho is None else f'{rho:.3f}'} |"
        )
    if ctl:
        lines += ["", "Compare runs with the control on `bits, all LM Linears` (every LM Linear counted, layers a "
                  "scheme keeps out of its search or budget at their real width): `achieved` is over the layers the "
                  "scheme's budget covers, so a default FP8 scheme at 8 bits and the control can be the same model "
                  "with different `achieved` figures."]
        lines += ["", f"The control is `mtq.quantize` with ModelOpt's `{ctl['quant_format']}` as shipped (its own "
                  f"name-pattern exclusions keep {', '.join(f'`{n}`' for n in ctl['unquantized_layers']) or 'nothing'} "
                  f"unquantized), max-calibrated on the first run's {ctl['num_calib_steps']} calibration batches: "
                  "a run that beats it at fewer effective bits gains over plain FP8."]
    gen_rows = [("uniform FP8 PTQ", ctl)] if ctl else []
    lines += ["", "## Greedy generations", "", f"⟦ ⟧ marks the first token that differs from {ref}.", ""]
    for i, prompt in enumerate(comp["prompts"]):
        lines += [f"**Prompt {i + 1}:** {prompt}", "", "| model | generation |", "|---|---|",
                  f"| {ref} | {_marked(tokenizer, comp['reference']['generations'][i]['token_ids'], None)} |"]
        for name, c in gen_rows:
            g = c["generations"][i]
            lines.append(f"| {name} | {_marked(tokenizer, g['token_ids'], g['first_divergence'])} |")
        for r in comp["runs"]:
            g = r["generations"][i]
            lines.append(f"| {r['name']} | {_marked(tokenizer, g['token_ids'], g['first_divergence'])} |")
        lines.append("")
    if "measurement" in comp:  # compare --measure (GPU)
        ms = comp["measurement"]
        st = ms["settings"]
        lines += [f"## Measured cost on {ms['device']}", "",
                  f"Prefill: {st['batch_size']} x {st['seq_len']} tokens, compiled={st['compile']}; decode: batch "
                  f"{st['decode_batch_size']}, {st['decode_tokens']} tokens; runs executed from their FP8 export.", "",
                  "| model | prefill tok/s | decode tok/s | weight GB |", "|---|---|---|---|"]
        for name, m in ms.items():
            if isinstance(m, dict) and "weight_bytes" in m:
                lines.append(f"| {name} | {m['prefill_tokens_per_s']:,.0f} | {m['decode_tokens_per_s']:,.1f} | "
                             f"{m['weight_bytes'] / 1e9:.3f} |")
        lines.append("")
    lines += ["## Measured layer error against AutoQuant sensitivity", "",
              "Relative L2 error of each quantized layer's output against the same layer without quantizers, "
              "on the same inputs; Spearman correlation, over the quantized groups, with the score of the format "
              "each group got. It shows whether AutoQuant's scores order the measured harm among the groups it "
              "quantized; it cannot show whether the groups it left unquantized were the right ones (they have "
              "no measured error), and layer error is not the end-to-end loss the scores estimate.", ""]
    for r in comp["runs"]:
        top = sorted(r["layer_errors"].items(), key=lambda kv: kv[1], reverse=True)[:5]
        ev_s = r.get("error_vs_sensitivity", {})
        lines.append(f"- **{r['name']}**: {ev_s.get('num_groups', 0)} quantized groups, Spearman "
                     f"{ev_s.get('spearman') if ev_s.get('spearman') is None else round(ev_s['spearman'], 3)}; "
                     "largest errors: " + (", ".join(f"`{n}` {e:.3g}" for n, e in top) or "none"))
    return "\n".join(lines) + "\n"


def write_comparison(comp: dict[str, Any], tokenizer: Any, output_dir: str | Path) -> tuple[Path, Path]:
    """Write comparison.json and comparison.md atomically."""
    out = Path(output_dir)
    md = render_comparison(comp, tokenizer)
    return atomic_write_json(out / "comparison.json", comp), atomic_write_text(out / "comparison.md", md)
