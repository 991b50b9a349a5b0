"""Export and ``infer --exported`` under bad input: tampered exports, damaged manifests, unwritable or special output
directories, a full disk, a strict umask. Each expected failure is one line and exit status 2, and nothing
complete-looking is left behind."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from auto_quantize_model.autoquant.run import run_scheme
from auto_quantize_model.cli import main
from auto_quantize_model.configs import get_scheme, resolve_scheme


@pytest.fixture(scope="module")
def exported(loaded, calib, tiny_model_dir, tmp_path_factory):
    """One run (about half the layers FP8) and its export."""
    root = tmp_path_factory.mktemp("robust")
    scheme = dataclasses.replace(resolve_scheme(get_scheme("fp8_autoquant_top50")), name="top50")
    run_scheme(loaded, calib, scheme, root / "run", cache_dir=root / "cache")
    assert main(["export", str(root / "run"), "--model-dir", str(tiny_model_dir), "--output-dir",
                 str(root / "export")]) == 0
    return root / "run", root / "export"


def _one_line(capsys, needle: str) -> None:
    """Exactly one error line (transformers' loading progress bar may precede it on stderr), no traceback."""
    text = capsys.readouterr().err
    err = [line for line in text.splitlines() if line.startswith("autoquant:")]
    assert len(err) == 1 and needle in err[0] and "Traceback" not in text, text[-2000:]


def _edit_tensors(d: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    f = d / "model.safetensors"
    t = load_file(str(f))
    edit(t)
    save_file(t, str(f), metadata={"format": "pt"})


def _first_fp8(t: dict[str, torch.Tensor]) -> str:
    return next(k.removesuffix(".weight") for k, v in t.items()
                if k.endswith(".weight") and v.dtype == torch.float8_e4m3fn)


def _nan_scale(t):
    t[f"{_first_fp8(t)}.weight_scale"] = torch.tensor(float("nan"))


def _zero_input_scale(t):
    t[f"{_first_fp8(t)}.input_scale"] = torch.tensor(0.0)


def _missing_input_scale(t):
    del t[f"{_first_fp8(t)}.input_scale"]


def _bf16_scale(t):
    p = _first_fp8(t)
    t[f"{p}.weight_scale"] = t[f"{p}.weight_scale"].to(torch.bfloat16)


def _extra_tensor(t):
    t["model.layers.0.mlp.backdoor.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)


def _missing_weight(t):
    del t["model.norm.weight"]


def _fp8_wrong_shape(t):
    p = _first_fp8(t)
    t[f"{p}.weight"] = t[f"{p}.weight"].t().contiguous()


def _truncate(d: Path) -> None:
    f = d / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)


TAMPERED = {
    "nan_weight_scale": (_nan_scale, "not a finite positive scale"),
    "zero_input_scale": (_zero_input_scale, "not a finite positive scale"),
    "missing_input_scale": (_missing_input_scale, "has no input_scale"),
    "bf16_scale": (_bf16_scale, "not one float32 per-tensor scale"),
    "extra_tensor": (_extra_tensor, "tensors its config does not name"),
    "missing_weight": (_missing_weight, "tensors its config names"),
    "fp8_wrong_shape": (_fp8_wrong_shape, "has shape"),
    "truncated": (None, "not a readable safetensors file"),
    "bad_hf_quant_config": (None, "is damaged"),
    "bad_config": (None, "unreadable"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_infer_exported_refuses_a_tampered_export(exported, tmp_path, capsys, case):
    edit, needle = TAMPERED[case]
    d = tmp_path / "export"
    shutil.copytree(exported[1], d)
    if edit is not None:
        _edit_tensors(d, edit)
    elif case == "truncated":
        _truncate(d)
    elif case == "bad_hf_quant_config":
        (d / "hf_quant_config.json").write_text("{ not json")
    else:
        (d / "config.json").write_text("{ not json")
    assert main(["infer", "--exported", str(d), "--prompt", "x", "--max-new-tokens", "2", "--device", "cpu"]) == 2
    _one_line(capsys, needle)


def _resave_artifact(run_dir: Path, edit) -> None:
    """Change the run's restore artifact and record its new hash in the manifest (a consistent but bad run)."""
    from modelopt.torch.utils.serialization import safe_save

    from auto_quantize_model.io_utils import sha256_bytes

    mf = next(run_dir.glob("*_quant_manifest.json"))
    m = json.loads(mf.read_text())
    art = run_dir / m["artifacts"]["restore"]
    payload = torch.load(art, map_location="cpu", weights_only=True)
    edit(payload)
    buf = io.BytesIO()
    safe_save(payload, buf)
    art.write_bytes(buf.getvalue())
    m["artifacts"]["restore_sha256"] = sha256_bytes(buf.getvalue())
    mf.write_text(json.dumps(m))


def test_export_final_check_refuses_a_non_finite_scale(exported, tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(exported[0], run)
    m = json.loads(next(run.glob("*_quant_manifest.json")).read_text())
    fp8 = next(n for n, lay in m["layers"].items() if lay["dtype"] == "fp8")

    def nan_amax(payload):
        key = next(k for k in payload["quantizer_state_dict"] if k.endswith(f"{fp8}.input_quantizer"))
        payload["quantizer_state_dict"][key]["_amax"] = torch.tensor(float("nan"))

    _resave_artifact(run, nan_amax)
    out = tmp_path / "out"
    assert main(["export", str(run), "--model-dir", str(tiny_model_dir), "--output-dir", str(out)]) == 2
    _one_line(capsys, "not a finite positive scale")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_export_final_check_refuses_tensors_the_config_does_not_name(exported, tiny_model_dir, tmp_path, capsys,
                                                                      monkeypatch):
    import modelopt.torch.export as mte

    original = mte.export_hf_checkpoint

    def with_extra(model, **kwargs):
        original(model, **kwargs)
        _edit_tensors(Path(kwargs["export_dir"]), _extra_tensor)

    monkeypatch.setattr(mte, "export_hf_checkpoint", with_extra)
    out = tmp_path / "out"
    assert main(["export", str(exported[0]), "--model-dir", str(tiny_model_dir), "--output-dir", str(out)]) == 2
    _one_line(capsys, "tensors its config does not name")
    assert not out.exists()


def _damaged_manifest(run: Path, case: str) -> None:
    mf = next(run.glob("*_quant_manifest.json"))
    m = json.loads(mf.read_text())
    if case == "no_architecture":
        del m["model"]["architecture"]
    elif case == "unknown_scope":
        m["model"]["scope"] = "teapot"
    elif case == "artifacts_list":
        m["artifacts"] = ["x"]
    elif case == "unknown_layer":
        lay = next(v for v in m["layers"].values() if v["dtype"] == "fp8")
        m["layers"]["model.layers.99.mlp.up_proj"] = lay
    elif case == "layer_not_a_table":
        m["layers"][next(iter(m["layers"]))] = "fp8"
    mf.write_text(json.dumps(m))


@pytest.mark.parametrize("case,needle", [
    ("no_architecture", "damaged"), ("unknown_scope", "unknown scope"), ("artifacts_list", "no restore artifact"),
    ("unknown_layer", "does not have"), ("layer_not_a_table", "layer"),
])
def test_export_refuses_a_damaged_manifest_in_one_line(exported, tiny_model_dir, tmp_path, capsys, case, needle):
    run = tmp_path / "run"
    shutil.copytree(exported[0], run)
    _damaged_manifest(run, case)
    out = tmp_path / "out"
    assert main(["export", str(run), "--model-dir", str(tiny_model_dir), "--output-dir", str(out)]) == 2
    _one_line(capsys, needle)
    assert not out.exists()


def test_export_to_special_or_linked_dirs_is_one_line(exported, tiny_model_dir, tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for out, needle in (("/proc/autoquant-export-test", "cannot write the export"),
                        (str(tmp_path / "link"), "symbolic link"), (str(tmp_path / "dangling"), "symbolic link")):
        assert main(["export", str(exported[0]), "--model-dir", str(tiny_model_dir), "--output-dir", out]) == 2
        _one_line(capsys, needle)
    assert not any(real.iterdir()) and not (tmp_path / "nowhere").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "link", "real"]  # no temporary left behind


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_export_into_a_read_only_dir_is_one_line(exported, tiny_model_dir, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["export", str(exported[0]), "--model-dir", str(tiny_model_dir), "--output-dir",
                     str(ro / "out")]) == 2
        _one_line(capsys, "cannot write the export")
        assert not any(ro.iterdir())
    finally:
        ro.chmod(0o755)


def test_export_on_a_full_disk_is_one_line_and_leaves_nothing(exported, tiny_model_dir, tmp_path):
    """A write that fails with the weights half written (here a file-size limit, as a full disk fails a write):
    one line, exit 2, no export and no temporary directory."""
    out = tmp_path / "out"
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))\n"
            "from auto_quantize_model.cli import main\n"
            f"sys.exit(main(['export', {str(exported[0])!r}, '--model-dir', {str(tiny_model_dir)!r}, "
            f"'--output-dir', {str(out)!r}]))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=os.environ)
    assert p.returncode == 2, p.stderr[-2000:]
    err = [line for line in p.stderr.strip().splitlines() if line.startswith("autoquant: error")]
    assert len(err) == 1 and "could not write the export" in err[0] and "Traceback" not in p.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_export_follows_the_umask(exported, tiny_model_dir, tmp_path):
    old = os.umask(0o077)
    try:
        assert main(["export", str(exported[0]), "--model-dir", str(tiny_model_dir), "--output-dir",
                     str(tmp_path / "out")]) == 0
    finally:
        os.umask(old)
    d = tmp_path / "out"
    assert d.stat().st_mode & 0o777 == 0o700
    assert {p.stat().st_mode & 0o777 for p in d.iterdir()} == {0o600}


def test_a_run_made_before_served_semantics_still_exports(exported, tiny_model_dir, tmp_path, caplog):
    """A manifest without a serving section (older runs calibrated separate scales): exported as evaluated, with a
    warning that fusing engines requantize, and the export record says so."""
    run = tmp_path / "run"
    shutil.copytree(exported[0], run)
    mf = next(run.glob("*_quant_manifest.json"))
    m = json.loads(mf.read_text())
    del m["serving"]
    mf.write_text(json.dumps(m))
    assert main(["export", str(run), "--model-dir", str(tiny_model_dir), "--output-dir", str(tmp_path / "out")]) == 0
    info = json.loads((tmp_path / "out" / "autoquant_export.json").read_text())
    assert info["serving"] == {**info["serving"], "fused_scales": "separate", "recorded_in_manifest": False}
    assert "predates the manifest's serving section" in caplog.text


def test_a_modelopt_export_needs_no_compressed_tensors_installed(exported, tiny_model_dir, tmp_path, monkeypatch):
    """The ModelOpt format never touches compressed-tensors; its export record says the library's version, or null
    where it is not installed (old code: PackageNotFoundError, a traceback, on the H100 image, which lacks it)."""
    import importlib.metadata

    real = importlib.metadata.version

    def version(dist: str) -> str:
        if dist == "compressed-tensors":
            raise importlib.metadata.PackageNotFoundError(dist)
        return real(dist)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert main(["export", str(exported[0]), "--model-dir", str(tiny_model_dir), "--output-dir",
                 str(tmp_path / "out")]) == 0
    info = json.loads((tmp_path / "out" / "autoquant_export.json").read_text())
    assert info["versions"]["compressed-tensors"] is None
