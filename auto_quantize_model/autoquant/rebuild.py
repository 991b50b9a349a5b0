"""Rebuild a run's quantized language model from the original checkpoint plus its restore artifact."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from auto_quantize_model.autoquant.manifest import MANIFEST_SUFFIX, load_manifest
from auto_quantize_model.autoquant.restore import apply_restore_artifact
from auto_quantize_model.errors import UserError
from auto_quantize_model.models.loading import LoadedModel
from auto_quantize_model.models.scope import Scope


@dataclass
class RunArtifacts:
    """A finished run on disk: its manifest and where its restore artifact lives."""

    run_dir: Path
    manifest: dict[str, Any]
    restore_path: Path

    @property
    def name(self) -> str:
        """Label for tables: the run id if the sweep set one, else the scheme name."""
        return self.manifest.get("run_id") or self.manifest["scheme"]["name"]


def find_run(run_dir: str | Path) -> RunArtifacts:
    """Locate the single manifest in ``run_dir`` (or take a manifest file) and its restore artifact."""
    p = Path(run_dir)
    if p.is_file() and p.name.endswith(MANIFEST_SUFFIX):
        manifest_file = p
    elif p.is_dir():
        found = sorted(p.glob(f"*{MANIFEST_SUFFIX}"))
        if len(found) != 1:
            raise UserError(f"run dir {p} holds {len(found)} manifests; pass a directory of one run or its manifest file")
        manifest_file = found[0]
    else:
        raise UserError(f"run dir {p} does not exist; pass the --output-dir of an `autoquant run`")
    manifest = load_manifest(manifest_file)
    artifacts = manifest.get("artifacts")
    name = artifacts.get("restore") if isinstance(artifacts, dict) else None
    if not isinstance(name, str) or not name or Path(name).name != name:
        raise UserError(f"manifest {manifest_file} names no restore artifact in this directory; it is damaged: "
                        "re-run the scheme")
    restore = manifest_file.parent / name
    if not restore.is_file():
        raise UserError(f"run {manifest_file.parent} has no restore artifact ({restore.name}); re-run the scheme")
    return RunArtifacts(manifest_file.parent, manifest, restore)


def _check(run: RunArtifacts, architecture: str, config_hash: str, fingerprint: str) -> None:
    m = run.manifest["model"]
    if Scope.of(m) is not Scope.LANGUAGE_MODEL:
        raise UserError(f"run {run.run_dir} searched the whole VLM ({m.get('scope')}); infer and compare rebuild the "
                        "language model only: evaluate a language-model run (text captions) instead")
    check_same_checkpoint(run, architecture, config_hash, fingerprint)


def check_same_checkpoint(run: RunArtifacts, architecture: str, config_hash: str, fingerprint: str) -> None:
    """Refuse a run made on another architecture, config hash or weights fingerprint (one line naming both)."""
    m = run.manifest["model"]
    if m["architecture"] != architecture or m["config_hash"] != config_hash:
        raise UserError(
            f"run {run.run_dir} was made on {m['architecture']} (config {m['config_hash'][:12]}) but --model-dir "
            f"is {architecture} (config {config_hash[:12]}); pass the checkpoint the run used"
        )
    if m.get("weights_fingerprint") != fingerprint:
        raise UserError(
            f"run {run.run_dir} was made on weights {str(m.get('weights_fingerprint'))[:12]} but --model-dir has "
            f"weights {fingerprint[:12]} (same config, other weights); pass the checkpoint the run used"
        )


def check_matches_checkpoint(run: RunArtifacts, loaded: LoadedModel) -> None:
    """Refuse a run made on another architecture, config or weights than the loaded checkpoint, and whole-VLM
    runs (their artifact describes the whole VLM; infer and compare rebuild the language model only)."""
    _check(run, loaded.architecture, loaded.config_hash, loaded.weights_fingerprint)


def check_matches_model_dir(run: RunArtifacts, model_dir: str | Path) -> None:
    """The same checks as :func:`check_matches_checkpoint`, from the checkpoint folder, before loading it."""
    from auto_quantize_model.models.fingerprint import weights_fingerprint
    from auto_quantize_model.models.loading import config_hash, read_checkpoint_config

    config = read_checkpoint_config(model_dir)
    archs = config.get("architectures") or [run.manifest["model"]["architecture"]]
    arch = run.manifest["model"]["architecture"] if run.manifest["model"]["architecture"] in archs else archs[0]
    _check(run, arch, config_hash(config), weights_fingerprint(model_dir))


def build_quantized_model(loaded: LoadedModel, run: RunArtifacts) -> nn.Module:
    """A fake-quantized copy of ``loaded.model`` as the run left it (loaded.model stays untouched)."""
    check_matches_checkpoint(run, loaded)
    model = apply_restore_artifact(copy.deepcopy(loaded.model), run.restore_path, loaded.describe(), run.manifest)
    return model.eval()
