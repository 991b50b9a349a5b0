"""Whole-VLM AutoQuant with image-caption calibration on the tiny Qwen2.5-VL."""

from __future__ import annotations

import json

import pytest
import torch

from auto_quantize_model.autoquant.run import run_scheme
from auto_quantize_model.cli import main
from auto_quantize_model.configs import get_scheme, resolve_scheme
from auto_quantize_model.datasets.demo_images import make_demo_image_captions
from auto_quantize_model.datasets.image_captions import IGNORE_INDEX, build_image_calibration_set, read_image_captions
from auto_quantize_model.errors import UserError


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_demo_image_captions(tmp_path_factory.mktemp("images"), n=12)


@pytest.fixture(scope="module")
def vlm(tiny_model_dir):
    from auto_quantize_model.models.loading import load_model
    from auto_quantize_model.models.scope import Scope

    return load_model(tiny_model_dir, Scope.WHOLE_VLM, device="cpu")


def _calib(vlm, source, **kw):
    return build_image_calibration_set(vlm.tokenizer, vlm.image_processor, source,
                                       image_token_id=vlm.model.config.image_token_id, **kw)


def test_demo_pairs_and_batches(pairs, vlm):
    lines = [json.loads(x) for x in pairs.read_text().splitlines()]
    assert len(lines) == 12 and all((pairs.parent / r["image"]).is_file() for r in lines)
    assert all("background" in r["caption"] for r in lines)
    cal = _calib(vlm, read_image_captions(str(pairs)), max_samples=8, batch_size=4, seq_len=256)
    b = cal.batches[0]
    image_id = vlm.model.config.image_token_id
    n_img = int((b["input_ids"] == image_id).sum())
    assert n_img == int(b["image_grid_thw"].prod(-1).sum()) // 4  # merged patches per image
    assert b["pixel_values"].shape[0] == int(b["image_grid_thw"].prod(-1).sum())
    # Loss only on caption tokens: never on image, prompt or padding positions.
    assert (b["labels"][b["input_ids"] == image_id] == IGNORE_INDEX).all()
    assert (b["labels"][b["attention_mask"] == 0] == IGNORE_INDEX).all()
    caption_ids = b["labels"][0][b["labels"][0] != IGNORE_INDEX].tolist()
    assert vlm.tokenizer.decode(caption_ids, skip_special_tokens=True).endswith("background.")
    assert cal.describe()["kind"] == "image_caption" and cal.describe()["num_image_tokens"] > 0
    from auto_quantize_model.datasets.protocol import CalibrationData

    assert isinstance(cal, CalibrationData)  # the search, identity and cache take it like a text set


def test_each_loaded_model_runs_its_own_steps_on_its_own_batch(pairs, vlm, loaded, calib):
    # Old code: one forward_step for every model that looked for pixel_values in the batch to decide what it ran.
    from auto_quantize_model.models.scope import Scope

    assert (vlm.scope, loaded.scope) == (Scope.WHOLE_VLM, Scope.LANGUAGE_MODEL)
    assert vlm.image_processor is not None and loaded.image_processor is None
    assert vlm.param_counts["left_out"] == 0 < loaded.param_counts["left_out"]
    image_batch = _calib(vlm, read_image_captions(str(pairs)), max_samples=2, batch_size=2, seq_len=256).batches[0]
    text_batch = calib.batches[0]
    with torch.no_grad():
        image_logits = vlm.forward_step(vlm.model, image_batch)
        text_logits = loaded.forward_step(loaded.model, text_batch)
        # The whole VLM's step sees the images: other pixels, other logits.
        blank = {**image_batch, "pixel_values": torch.zeros_like(image_batch["pixel_values"])}
        assert not torch.allclose(vlm.forward_step(vlm.model, blank), image_logits)
        # The LM's step is the LM-only module on ids and mask.
        assert torch.equal(text_logits, loaded.model(text_batch["input_ids"], text_batch["attention_mask"]))
    vocab = vlm.model.config.get_text_config().vocab_size
    assert image_logits.shape == (*image_batch["input_ids"].shape, vocab)
    assert text_logits.shape == (*text_batch["input_ids"].shape, vocab)
    for model, logits, batch in ((vlm, image_logits, image_batch), (loaded, text_logits, text_batch)):
        loss = model.loss_step(logits, batch)
        assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0


def test_whole_vlm_search_scores_both_towers(pairs, vlm, tmp_path):
    cal = _calib(vlm, read_image_captions(str(pairs)), max_samples=8, batch_size=4, seq_len=256)
    scheme = resolve_scheme(get_scheme("fp8_autoquant_all_layers_fp8"), effective_bits=12.0)
    m = run_scheme(vlm, cal, scheme, tmp_path / "vlm").manifest
    towers = {info["tower"] for info in m["layer_sensitivity"].values()}
    assert towers == {"vision", "merger", "language"}
    for group, info in m["layer_sensitivity"].items():
        if "patch_embed" in group:  # never offered: the export writes it BF16 (configs/exclusions.py)
            assert info["candidate_formats"] == ["NONE"]
            continue
        assert info["scores"][0] > 0, f"{group} ({info['tower']}) has no sensitivity score"
    assert m["model"]["scope"] == "vision_language_model"
    # The calibration section says what an image-caption set is, and nothing of a caption-text set's.
    from auto_quantize_model.records.manifest import manifest_problems

    assert manifest_problems(m) == []
    assert m["calibration"]["kind"] == "image_caption" and m["calibration"]["image_size"] is None
    assert "dropped" not in m["calibration"] and "chat_template" not in m["calibration"]
    assert "vision blocks, merger, language model" in m["effective_bits"]["counted_over"]
    assert set(m["towers"]) == {"vision", "merger", "language"}
    assert sum(t["layers"] for t in m["towers"].values()) == m["num_layers"]
    assert m["layers"]["model.visual.blocks.1.attn.qkv"]["block_index"] == 1
    assert m["layers"]["model.visual.merger.mlp.0"]["tower"] == "merger"
    assert m["budget_met"] and m["effective_bits"]["measured"] <= 12.0 + 1e-6
    assert "## Per tower" in (tmp_path / "vlm" / "layer-sensitivity-report.md").read_text()


@pytest.mark.slow
def test_text_only_schemes_unchanged(loaded, calib, tmp_path):
    m = run_scheme(loaded, calib, resolve_scheme(get_scheme("fp8_autoquant_all_layers_fp8")), tmp_path / "t").manifest
    assert m["model"]["scope"] == "language_model" and set(m["towers"]) == {"language"}
    assert m["num_layers"] == 29 and not any("visual" in n for n in m["layers"])


def test_missing_or_unreadable_image_is_skipped(pairs, vlm, tmp_path):
    lines = pairs.read_text().splitlines()
    (tmp_path / "broken.png").write_bytes(b"not a png")
    extra = [json.dumps({"image": str(tmp_path / "gone.png"), "caption": "A lost image."}),
             json.dumps({"image": str(tmp_path / "broken.png"), "caption": "A broken image."})]
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(extra + [json.dumps({**json.loads(x), "image": str(pairs.parent / json.loads(x)["image"])})
                                    for x in lines[:3]]) + "\n")
    src = read_image_captions(str(f))
    cal = _calib(vlm, src, max_samples=10, batch_size=2, seq_len=256)
    assert cal.num_samples == 3
    skipped = {s for s, _ in src.skipped}
    assert skipped == {str(tmp_path / "gone.png"), str(tmp_path / "broken.png")}
    assert len(cal.describe()["skipped"]) == 2


def test_no_usable_pairs_is_a_clear_error(vlm, tmp_path, tiny_model_dir, capsys):
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"image": "missing.png", "caption": "Nothing here."}) + "\n")
    with pytest.raises(UserError, match="no usable image-caption pairs"):
        _calib(vlm, read_image_captions(str(f)), max_samples=4)
    out = tmp_path / "out"
    args = ["run", "--scheme-name", "fp8_autoquant_all_layers_fp8", "--model-dir", str(tiny_model_dir),
            "--output-dir", str(out), "--device", "cpu"]
    assert main([*args, "--image-captions-path", str(f)]) == 2
    err = capsys.readouterr().err
    errors = [x for x in err.splitlines() if x.startswith("autoquant: error:")]
    # One error line (the skipped images are logged as warnings before it), no traceback.
    assert len(errors) == 1 and "no usable image-caption pairs" in errors[0] and "Traceback" not in err
    assert not list(out.glob("*_quant_manifest.json")) if out.exists() else True
    assert main([*args, "--coco-annotations", str(tmp_path / "none.json"), "--coco-root", str(tmp_path)]) == 2
    assert "--coco-annotations FILE --coco-root DIR" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_image_caption_run(pairs, tiny_model_dir, tmp_path):
    out = tmp_path / "cli"
    assert main(["run", "--scheme-name", "fp8_autoquant_all_layers_fp8", "--model-dir", str(tiny_model_dir),
                 "--output-dir", str(out), "--image-captions-path", str(pairs), "--max-calib-samples", "4",
                 "--batch-size", "2", "--device", "cpu", "--effective-bits", "10"]) == 0
    m = json.loads((out / "fp8_autoquant_all_layers_fp8_quant_manifest.json").read_text())
    assert m["calibration"]["kind"] == "image_caption" and m["calibration"]["num_samples"] == 4


@pytest.mark.slow
def test_whole_vlm_run_exports(pairs, tiny_model_dir, tmp_path, capsys):
    """A whole-VLM run is never offered the patch embedding (a Conv3d the FP8 export writes in BF16), so it exports
    and passes the export's own check; a run that quantized it anyway (made before) is refused in one line."""
    from safetensors.torch import load_file

    out = tmp_path / "vlm"
    assert main(["run", "--scheme-name", "fp8_autoquant_all_layers_fp8", "--model-dir", str(tiny_model_dir),
                 "--output-dir", str(out), "--image-captions-path", str(pairs), "--max-calib-samples", "4",
                 "--batch-size", "2", "--device", "cpu", "--effective-bits", "8"]) == 0
    mf = out / "fp8_autoquant_all_layers_fp8_quant_manifest.json"
    m = json.loads(mf.read_text())
    patch = m["exclusions"]["layers"]["model.visual.patch_embed.proj"]["search"]
    assert patch["source"] == "export" and "not a Linear" in patch["reason"]
    assert m["layers"]["model.visual.patch_embed.proj"]["dtype"] == "fp32"  # unquantized, in the CPU run's dtype
    assert any(lay["dtype"] == "fp8" and lay["tower"] == "vision" for lay in m["layers"].values())
    assert main(["export", str(out), "--model-dir", str(tiny_model_dir), "--output-dir", str(tmp_path / "exp")]) == 0
    t = load_file(str(tmp_path / "exp" / "model.safetensors"))
    assert t["visual.patch_embed.proj.weight"].dtype == torch.bfloat16
    assert t["visual.blocks.0.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert torch.equal(t["visual.blocks.0.mlp.up_proj.weight_scale"], t["visual.blocks.0.mlp.gate_proj.weight_scale"])
    # The compressed-tensors format holds the same tensors, vision FP8 layers included (vLLM's rules load them);
    # an FP8 KV cache cannot be calibrated on image-caption pairs through the language model: scale 1.0, said so.
    from engine_rules import ExportView, check_all

    assert main(["export", str(out), "--model-dir", str(tiny_model_dir), "--output-dir", str(tmp_path / "ct"),
                 "--format", "compressed-tensors", "--kv-cache", "fp8"]) == 0
    ct = load_file(str(tmp_path / "ct" / "model.safetensors"))
    assert all(torch.equal(ct[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)) for k, v in t.items())
    kv = json.loads((tmp_path / "ct" / "autoquant_export.json").read_text())["kv_cache"]
    assert kv["calibrated"] is False and "image_caption" in kv["reason"] and set(kv["k_scale"]) == {1.0}
    (plan,) = check_all(ExportView.read(tmp_path / "ct"))
    assert plan.ok and plan.kv_cache_fp8, plan.summary()
    assert len(plan.served_fp8()) == sum(lay["dtype"] == "fp8" for lay in m["layers"].values())
    assert any(n.startswith("visual.") for n in plan.served_fp8())
    capsys.readouterr()
    m["layers"]["model.visual.patch_embed.proj"].update(dtype="fp8", format="FP8_ALL_LAYERS_CFG")
    mf.write_text(json.dumps(m))
    assert main(["export", str(out), "--model-dir", str(tiny_model_dir), "--output-dir", str(tmp_path / "e2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a convolution the FP8 export writes in BF16" in err[0]
    assert not (tmp_path / "e2").exists()
