"""Test helpers: numeric closeness with per-dtype tolerances (float32 is exact-ish, bf16 is not); the sweep spec
the CLI builds; a CLI refusal in one line."""

from __future__ import annotations

from typing import Any

import torch

TOLERANCES = {
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """torch.testing.assert_close with the tolerance of ``dtype`` (default: the tensors' dtype)."""
    rtol, atol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def sweep_spec_from_cli(argv: list[str], monkeypatch: Any) -> Any:
    """The SweepSpec ``autoquant sweep`` builds from ``argv`` (the sweep itself is not run)."""
    import auto_quantize_model.sweep.driver as driver
    from auto_quantize_model.cli import main

    seen = {}

    def fake_run_sweep(spec, resume=False):
        seen["spec"] = spec
        return {"summary": "", "sweep_dir": "", "tables": "", "rows": []}

    monkeypatch.setattr(driver, "run_sweep", fake_run_sweep)
    assert main(["sweep", *argv]) == 0
    return seen["spec"]


def refused_one_line(capsys: Any, argv: list[str], match: str) -> str:
    """Run the CLI; it must exit 2 with one stderr line (no traceback) containing ``match``."""
    from auto_quantize_model.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err
    return err


def kill_first_busy_worker(sweep_name: str, timeout: float = 240.0) -> tuple[Any, list[tuple[str, Any]]]:
    """Start a thread that kills (Ray restarts it) the first worker the sweep's lease pool reports busy, mid-trial.

    Returns the started thread and the list it appends ``(worker name, its trial)`` to once it has killed one."""
    import threading
    import time

    import ray
    from ray.util import list_named_actors

    killed: list[tuple[str, Any]] = []

    def killer() -> None:
        deadline = time.time() + timeout
        while time.time() < deadline and not killed:
            pools = [a for a in list_named_actors(all_namespaces=True)
                     if a["name"].startswith(f"autoquant-pool-{sweep_name}")]
            if pools:
                try:
                    pool = ray.get_actor(pools[0]["name"], namespace=pools[0]["namespace"])
                    busy = ray.get(pool.stats.remote())["busy"]
                except (ValueError, ray.exceptions.RayActorError):
                    busy = {}
                if busy:
                    name = next(iter(busy))
                    ray.kill(ray.get_actor(name, namespace="autoquant"), no_restart=False)
                    killed.append((name, busy[name]))
                    return
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    return thread, killed
