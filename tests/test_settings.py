"""Settings declared once (``auto_quantize_model.settings``): flags, TOML checks and validation come from the
dataclass fields of ``SweepSpec``, ``WorkerSettings`` and ``CalibrationSettings``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from helpers import sweep_spec_from_cli

from auto_quantize_model.actors.settings import WorkerSettings
from auto_quantize_model.cli import main
from auto_quantize_model.datasets.settings import CalibrationSettings
from auto_quantize_model.errors import UserError
from auto_quantize_model.settings import setting, settings_of
from auto_quantize_model.sweep.spec import SweepSpec, load_sweep_spec

# A value for every sweep setting, none of them its default, all valid together.
EVERY = {
    "name": "every", "storage_path": "/tmp/every-sweeps", "captions_path": "demo",
    "schemes": ["fp8_autoquant_top50", "fp8_autoquant_full"], "effective_bits": [14.0, 12.5], "methods": ["kl_div"],
    "num_score_steps": [4, 8], "num_calib_steps": 3, "schemes_file": "extra.toml", "max_calib_samples": 64,
    "batch_size": 4, "calib_seq_len": 32, "chat_template": True, "seed": 7, "dtype": "float32", "num_workers": 2,
    "max_failures": 1, "evaluate": True, "eval_captions": "held_out.txt", "max_eval_samples": 16, "measure": True,
    "measure_batch_size": 2, "measure_seq_len": 64, "address": "127.0.0.1:6379", "scheduler": "direct",
    "cache_dir": "/tmp/every-cache",
    "worker": {"num_gpus": 0.5, "num_cpus": 2.0, "pristine": "cpu", "num_threads": 3, "keep": True},
}


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    out = []
    for f, s in settings_of(cls):
        if s.table is not None:
            out += _leaves(s.table, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, f, s))
    return out


def _toml(data: dict[str, Any]) -> str:
    """A TOML document of flat settings and one level of tables (JSON's strings, numbers and lists are TOML's)."""
    def value(v: Any) -> str:
        return ("true" if v else "false") if isinstance(v, bool) else json.dumps(v)

    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for name, tbl in ((k, v) for k, v in data.items() if isinstance(v, dict)):
        lines += [f"[{name}]", *(f"{k} = {value(v)}" for k, v in tbl.items())]
    return "\n".join(lines) + "\n"


def test_every_setting_has_help_and_one_flag_or_a_reason(capsys):
    leaves = _leaves(SweepSpec) + _leaves(CalibrationSettings)
    for name, _, s in leaves:
        assert s.help.strip(), f"{name} has no help text"
        assert (s.flag is None) != (s.toml_only is None), f"{name}: a flag or a reason to be TOML-only, not both"
    flags = [s.flag for _, _, s in _leaves(SweepSpec) if s.flag]
    assert len(flags) == len(set(flags)), "two settings share a flag"
    # TOML-only today: the worker actors' resources (a cluster's TOML says what its workers get).
    assert [n for n, _, s in _leaves(SweepSpec) if s.flag is None] == [
        "worker.num_gpus", "worker.num_cpus", "worker.pristine", "worker.num_threads"]
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    text = capsys.readouterr().out
    assert all(f in text for f in flags) and "--keep-workers" in flags and "--config" in text
    assert "TOML only: [worker] num_gpus, num_cpus, pristine, num_threads" in " ".join(text.split())
    for name, _, s in _leaves(SweepSpec):
        if s.flag and "." not in name:
            assert s.flag == "--" + name.replace("_", "-"), f"{name}: TOML key and flag name differ"


def test_a_setting_declares_a_flag_or_says_why_not():
    with pytest.raises(ValueError, match="flag or says why"):
        setting(1, kind="int", help="x")
    with pytest.raises(ValueError, match="flag or says why"):
        setting(1, kind="int", help="x", flag="--x", toml_only="because")


def test_toml_and_the_equivalent_flags_give_equal_specs(tmp_path, tiny_model_dir, monkeypatch):
    every = {**EVERY, "model_dir": str(tiny_model_dir)}
    defaults = SweepSpec(name="d", model_dir="m")
    for name, _, _ in _leaves(SweepSpec):
        table, _, key = name.rpartition(".")
        given = every[table][key] if table else every[key]
        default = getattr(getattr(defaults, table), key) if table else getattr(defaults, key)
        given = tuple(given) if isinstance(given, list) else given
        assert given != default, f"EVERY must change {name} from its default"
    (tmp_path / "all.toml").write_text(_toml(every))
    from_toml = load_sweep_spec(tmp_path / "all.toml", {})
    # The same settings as flags, and a TOML holding only what has no flag.
    argv, toml_only = [], {}
    for name, _, s in _leaves(SweepSpec):
        table, _, key = name.rpartition(".")
        value = every[table][key] if table else every[key]
        if s.flag is None:
            toml_only.setdefault(table, {})[key] = value
        elif isinstance(value, bool):
            argv.append(s.flag)
        else:
            argv += [s.flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    (tmp_path / "rest.toml").write_text(_toml(toml_only))
    from_flags = sweep_spec_from_cli(["--config", str(tmp_path / "rest.toml"), *argv], monkeypatch)
    assert from_flags == from_toml
    assert from_toml.worker == WorkerSettings(**EVERY["worker"]) and from_toml.effective_bits == (14.0, 12.5)


def test_a_flag_updates_the_toml_table_it_belongs_to(tmp_path, tiny_model_dir, monkeypatch):
    (tmp_path / "s.toml").write_text(f'name = "k"\nmodel_dir = "{tiny_model_dir}"\n[worker]\npristine = "cpu"\n')
    spec = sweep_spec_from_cli(["--config", str(tmp_path / "s.toml"), "--keep-workers", "--batch-size", "2"],
                               monkeypatch)
    assert (spec.worker.keep, spec.worker.pristine, spec.batch_size) == (True, "cpu", 2)
    plain = sweep_spec_from_cli(["--config", str(tmp_path / "s.toml")], monkeypatch)
    assert (plain.worker.keep, plain.worker.pristine, plain.batch_size) == (False, "cpu", 8)


@pytest.mark.parametrize("line, match", [
    ("num_workers = 1.5", "num_workers must be an integer"),
    ('dtype = 16', "dtype must be a string"),
    ('num_score_steps = [2, "4"]', "num_score_steps must be a list of integers"),
    ("[worker]\nnum_threads = 2.0", "worker.num_threads must be an integer"),
    ("[worker]\nkeep = 1", "worker.keep must be true or false"),
    ("[worker]\nbogus = 1", r"unknown sweep settings in \[worker\] \['bogus'\]; allowed: \['keep', 'num_cpus'"),
    ("bogus = 1", r"unknown sweep settings \['bogus'\]; allowed: \['address', 'batch_size'"),
    ("max_eval_samples = 0", "max_eval_samples must be positive, got 0"),
    ("[worker]\nnum_gpus = -1", "worker.num_gpus must be >= 0, got -1"),
])
def test_wrong_toml_is_one_user_error_line(tmp_path, tiny_model_dir, capsys, line, match):
    import re

    (tmp_path / "s.toml").write_text(f'name = "t"\nmodel_dir = "{tiny_model_dir}"\n{line}\n')
    assert main(["sweep", "--config", str(tmp_path / "s.toml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(match, err[0]), err


@pytest.mark.parametrize("build, match", [
    (lambda: SweepSpec(name="p", model_dir="m", batch_size="4"), "batch_size must be an integer"),
    (lambda: SweepSpec(name="p", model_dir="m", schemes="a,b"), "schemes must be a list of strings"),
    (lambda: SweepSpec(name="p", model_dir="m", schemes=[]), "schemes must be a non-empty list"),
    (lambda: SweepSpec(name="p", model_dir="m", num_score_steps=(4, 0)), "num_score_steps must be a list of positive"),
    (lambda: SweepSpec(name="p", model_dir="m", num_workers=-1), "num_workers must be >= 0"),
    (lambda: SweepSpec(name="../p", model_dir="m"), "one directory name"),
    (lambda: SweepSpec(name="p", model_dir="m", worker={"pristine": "disk"}), "pristine must be one of gpu, cpu, auto"),
    (lambda: SweepSpec(name="p", model_dir="m", worker="cpu"), r"must be a \[worker\] table"),
    (lambda: WorkerSettings(num_threads=-1), "num_threads must be >= 0, got -1 \\(0: the cluster's CPUs"),
    (lambda: WorkerSettings(num_cpus=0), "num_cpus must be positive"),
    (lambda: WorkerSettings(num_gpus="1"), "num_gpus must be a number"),
    (lambda: CalibrationSettings(calib_seq_len=0), "calib_seq_len must be positive"),
    (lambda: dataclasses.replace(SweepSpec(name="p", model_dir="m"), measure_seq_len=-5), "must be positive"),
])
def test_bad_values_from_python_are_one_user_error_line(build, match):
    with pytest.raises(UserError, match=match) as info:
        build()
    assert "\n" not in str(info.value)


def test_round_trip_and_normal_forms(tmp_path, tiny_model_dir):
    (tmp_path / "all.toml").write_text(_toml({**EVERY, "model_dir": str(tiny_model_dir)}))
    spec = load_sweep_spec(tmp_path / "all.toml", {})
    data = {k: v for k, v in json.loads(json.dumps(spec.to_dict())).items() if k != "schema_version"}
    assert SweepSpec(**data) == spec
    # From Python as from TOML: lists become tuples, budgets and worker resources floats.
    py = SweepSpec(name="p", model_dir="m", effective_bits=[14, 12], worker={"num_gpus": 1, "num_cpus": 2})
    assert py.effective_bits == (14.0, 12.0) and all(type(b) is float for b in py.effective_bits)
    assert type(py.worker.num_cpus) is float and py.worker == WorkerSettings(num_cpus=2.0)


def test_flag_lists_parse_as_before(tmp_path, tiny_model_dir, monkeypatch, capsys):
    base = ["--name", "l", "--model-dir", str(tiny_model_dir), "--storage-path", str(tmp_path)]
    spec = sweep_spec_from_cli([*base, "--schemes", " fp8_autoquant_top25, fp8_autoquant_full,", "--effective-bits",
                           "14,12", "--num-score-steps", "4, 8"], monkeypatch)
    assert spec.schemes == ("fp8_autoquant_top25", "fp8_autoquant_full") and spec.num_score_steps == (4, 8)
    assert spec.effective_bits == (14.0, 12.0)
    for flag, text, match in (("--num-score-steps", "2.5", "--num-score-steps: expected comma-separated whole "
                               "numbers, got '2.5'"), ("--effective-bits", "14,x", "comma-separated numbers")):
        assert main(["sweep", *base, flag, text]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err


def test_run_and_sweep_share_the_calibration_settings(tmp_path, capsys):
    sweep = {f.name: f for f in dataclasses.fields(SweepSpec)}
    for f in dataclasses.fields(CalibrationSettings):
        assert (sweep[f.name].default, sweep[f.name].metadata) == (f.default, f.metadata), f.name
    from auto_quantize_model.cli import build_parser

    args = build_parser().parse_args(["run", "--scheme-name", "x", "--output-dir", "o"])
    assert {f.name: getattr(args, f.name) for f in dataclasses.fields(CalibrationSettings)} == \
        dataclasses.asdict(CalibrationSettings())
    assert main(["run", "--scheme-name", "fp8_autoquant_top25", "--model-dir", str(tmp_path / "none"),
                 "--output-dir", str(tmp_path / "o"), "--max-calib-samples", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max_calib_samples must be positive, got 0" in err[0], err
    assert not Path(tmp_path / "o").exists()
