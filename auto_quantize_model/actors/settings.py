"""What a model worker needs of a sweep's settings, declared below the sweep package.

The driver sends ``SweepSpec.to_dict()``; the worker keeps only the fields below (``WorkerSpec.from_sweep_dict``),
so ``actors/`` never imports ``sweep/`` (which imports the workers). tests/test_import_graph.py checks that every
``self.spec.<name>`` the actors read is declared here and that each field matches ``SweepSpec``'s declaration.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from auto_quantize_model.settings import setting, validate_settings

_RESOURCE = "a resource of each worker actor: the cluster's TOML [worker] table says what its workers get"


@dataclass(frozen=True)
class WorkerSettings:
    """Resources and memory policy of each model worker actor (the sweep's ``[worker]`` table)."""

    num_gpus: float = setting(1.0, kind="number", minimum=0, toml_only=_RESOURCE,
                              help="GPUs per worker; 0 runs workers on CPU (tests, CPU-only clusters)")
    num_cpus: float = setting(1.0, kind="number", positive=True, toml_only=_RESOURCE,
                              note="a 0-CPU actor cannot run the model's host code",
                              help="CPUs per worker; explicit, since a GPU actor otherwise holds 1 CPU and trials "
                                   "can starve")
    pristine: str = setting("auto", kind="str", choices=("gpu", "cpu", "auto"), toml_only=_RESOURCE,
                            help="where the unquantized copy lives: gpu, cpu (pinned) or auto (gpu when the "
                                 "worker's share of GPU memory holds both copies and a scoring pass at its batch "
                                 "size, else cpu)")
    # Ray would otherwise set OMP_NUM_THREADS = num_cpus (1), and the worker's host-side work runs single-threaded.
    num_threads: int = setting(0, kind="int", minimum=0, toml_only=_RESOURCE,
                               note="0: the cluster's CPUs shared out among the workers",
                               help="host threads of each worker (torch intra-op, OpenMP); 0: the cluster's CPUs "
                                    "shared out among the workers")
    # The next sweep with the same model, data and worker settings finds them loaded and skips the load.
    keep: bool = setting(False, kind="bool", flag="--keep-workers",
                         help="leave the loaded model workers on the running cluster (--address) for the next sweep")

    def __post_init__(self) -> None:
        validate_settings(self, "sweep setting", prefix="worker.")


# Settings a kept worker takes from each sweep it serves (the sweep's name); everything else in WorkerSpec was used
# to load it.
PER_SWEEP = ("name",)


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

    def load_signature(self) -> str:
        """Hash of every setting that shapes what a worker loads and holds (model, data, evaluation and measuring
        sets, resources, threads), of the package's code and of the libraries' versions: a kept worker serves a
        later sweep only if that sweep's driver computes the signature the worker computed when it loaded."""
        from auto_quantize_model.io_utils import sha256_json
        from auto_quantize_model.provenance import code_fingerprint, versions

        data: dict[str, Any] = dataclasses.asdict(self)
        data["code"] = code_fingerprint()
        data["versions"] = versions()  # torch, transformers, ModelOpt, ... as installed
        for per_sweep in PER_SWEEP:
            data.pop(per_sweep)
        data["worker"].pop("keep")
        return sha256_json(data)[:12]

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
