"""Shared fixtures: one tiny Qwen2.5-VL checkpoint per test session, loaded once."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny checkpoint (seed 0, 200 training steps). ``AUTOQUANT_TEST_MODEL_DIR`` names one built before
    with ``autoquant make-tiny-model`` to skip the build when iterating; CI always builds it."""
    from pathlib import Path

    from auto_quantize_model.models.tiny import make_tiny_checkpoint

    prebuilt = os.environ.get("AUTOQUANT_TEST_MODEL_DIR")
    if prebuilt:
        return Path(prebuilt)
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-qwen2_5_vl")


@pytest.fixture(scope="session")
def loaded(tiny_model_dir):
    from auto_quantize_model.models.loading import load_language_model

    return load_language_model(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def calib(loaded):
    from auto_quantize_model.datasets.calibration import build_calibration_set
    from auto_quantize_model.datasets.captions import read_captions

    return build_calibration_set(loaded.tokenizer, read_captions("demo"), max_samples=24, batch_size=4, seq_len=48, seed=0)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole test session: 2 CPUs, 2 fake GPUs (workers then run on CPU)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback-only test cluster
    import ray

    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, namespace="autoquant", log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the model is loaded (a refusal must come first)."""
    import auto_quantize_model.models.loading as loading

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(loading, "load_model", boom)


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if Ray starts (a refusal must come first)."""
    import ray

    def boom(*a, **k):
        raise AssertionError("Ray was started before the input was checked")

    monkeypatch.setattr(ray, "init", boom)


# Fixtures that make a test ``slow``: the shared local Ray (Ray start plus a sweep is tens of seconds) and the
# module fixtures that run several searches or exports. Other slow tests carry ``@pytest.mark.slow``.
SLOW_FIXTURES = {"ray_cluster", "runs_root", "catalog_runs", "pair_runs", "exports", "run12", "comparison",
                 "other", "other_calib", "vlm", "conformance_exports", "served_runs", "exported", "formats"}


def pytest_collection_modifyitems(config, items):
    """Marks every test that uses a fixture in ``SLOW_FIXTURES`` as ``slow`` (fast tier: ``-m "not slow"``)."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
