"""What a model worker needs of a sweep's settings, declared below the sweep package.

The driver sends ``SweepSpec.to_dict()``; the worker keeps only the fields below (``WorkerSpec.from_sweep_dict``),
so ``actors/`` never imports ``sweep/`` (which imports the workers). tests/test_import_graph.py checks that every
``self.spec.<name>`` the actors read is declared here and that each field matches ``SweepSpec``'s declaration.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class WorkerSettings:
    """Resources and memory policy of each model worker actor (the sweep's ``[worker]`` table)."""

    num_gpus: float = 1.0  # 0 runs workers on CPU (tests, CPU-only clusters)
    num_cpus: float = 1.0  # explicit: a GPU actor otherwise holds 1 CPU and trials can starve
    pristine: str = "auto"  # where the unquantized copy lives: gpu, cpu (pinned), auto
    # Host threads of each worker (torch intra-op, OpenMP). 0: the cluster's CPUs shared out among the workers.
    # Ray would otherwise set OMP_NUM_THREADS = num_cpus (1), and the worker's host-side work runs single-threaded.
    num_threads: int = 0
    # Keep the workers alive on a running cluster (--address) after the sweep: the next sweep with the same model,
    # data and worker settings finds them loaded and skips the load (``autoquant release-workers`` frees them).
    keep: bool = False


@dataclass(frozen=True)
class WorkerSpec:
    """The sweep settings a worker reads: model, calibration and evaluation data, cost measurement, resources and
    memory policy (no schemes file: each trial carries its scheme, resolved on the driver).
    Field names, types and defaults are those of ``sweep.spec.SweepSpec`` (checked by a test)."""

    name: str
    model_dir: str
    captions_path: str | None = None
    max_calib_samples: int = 1024
    batch_size: int = 8
    calib_seq_len: int = 512
    chat_template: bool = False
    seed: int = 0
    dtype: str = "auto"
    evaluate: bool = False
    eval_captions: str | None = None
    max_eval_samples: int = 32
    measure: bool = False
    measure_batch_size: int = 4
    measure_seq_len: int = 512
    worker: WorkerSettings = field(default_factory=WorkerSettings)

    def measure_settings(self) -> Any:
        """The :class:`MeasureSettings` of ``measure`` (as ``SweepSpec.measure_settings``)."""
        from auto_quantize_model.inference.measure import MeasureSettings

        return MeasureSettings(batch_size=self.measure_batch_size, seq_len=self.measure_seq_len)

    @classmethod
    def from_sweep_dict(cls, spec_dict: dict[str, Any]) -> WorkerSpec:
        """From ``SweepSpec.to_dict()``: keeps the fields declared here (the rest concern the driver)."""
        names = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in spec_dict.items() if k in names}
        if isinstance(data.get("worker"), dict):
            data["worker"] = WorkerSettings(**data["worker"])
        return cls(**data)
