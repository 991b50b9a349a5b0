"""The sweep's opt-in measured cost: the ``measure`` setting, the per-run meter (CPU timing allowed for
tests: the numbers mean nothing, the code paths and columns are real), the trials table and the plot."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from auto_quantize_model.autoquant.run import run_scheme
from auto_quantize_model.cli import main
from auto_quantize_model.configs import get_scheme, resolve_scheme
from auto_quantize_model.errors import UserError
from auto_quantize_model.inference.fp8_linear import Fp8Linear, weight_bytes
from auto_quantize_model.inference.measure import MeasureSettings
from auto_quantize_model.inference.measure_run import CostMeter, fp8_layer_names, to_fp8_model
from auto_quantize_model.records.cost import MEASUREMENT_FILE, ModelCost, TrialCost, read_measurement
from auto_quantize_model.sweep.spec import SweepSpec, load_sweep_spec

# Small shapes, one repeat, eager: CPU timing only exercises the path.
CPU_SETTINGS = MeasureSettings(batch_size=2, seq_len=24, decode_batch_size=2, decode_prompt_len=8, decode_tokens=3,
                               repeats=1, warmup=1, compile=False, allow_cpu=True)
RUNS = (("some", 12.0, "fp8_autoquant_top50"), ("all", 8.0, "fp8_autoquant_all_layers_fp8"))


def test_measure_setting_round_trips_through_toml_and_dict(tiny_model_dir, tmp_path):
    f = tmp_path / "sweep.toml"
    f.write_text(f'name = "m"\nmodel_dir = "{tiny_model_dir}"\nmeasure = true\nmeasure_batch_size = 2\n'
                 'measure_seq_len = 64\n')
    spec = load_sweep_spec(f, {})
    assert (spec.measure, spec.measure_batch_size, spec.measure_seq_len) == (True, 2, 64)
    assert SweepSpec(**{k: v for k, v in spec.to_dict().items() if k != "schema_version"}) == spec
    s = spec.measure_settings()
    assert (s.batch_size, s.seq_len, s.allow_cpu) == (2, 64, False)
    off = load_sweep_spec(None, {"name": "m", "model_dir": str(tiny_model_dir)})
    assert off.measure is False  # opt-in
    for bad, msg in (({"measure": "yes"}, "measure"), ({"measure_seq_len": 0}, "measure_seq_len must be positive")):
        with pytest.raises(UserError, match=msg):
            load_sweep_spec(f, bad)


def test_measure_cli_flags_reach_the_spec(tiny_model_dir, tmp_path, monkeypatch):
    from auto_quantize_model.sweep import driver

    seen = []

    def fake_run_sweep(spec, resume=False):
        seen.append(spec)
        raise UserError("stop here")

    monkeypatch.setattr(driver, "run_sweep", fake_run_sweep)
    assert main(["sweep", "--name", "m", "--model-dir", str(tiny_model_dir), "--storage-path", str(tmp_path),
                 "--measure", "--measure-batch-size", "3", "--measure-seq-len", "128"]) == 2
    assert (seen[0].measure, seen[0].measure_batch_size, seen[0].measure_seq_len) == (True, 3, 128)


def test_measure_refused_with_cpu_workers_in_one_line(tiny_model_dir, tmp_path, capsys):
    f = tmp_path / "sweep.toml"
    f.write_text("[worker]\nnum_gpus = 0\n")
    storage = tmp_path / "sweeps"
    assert main(["sweep", "--config", str(f), "--name", "m", "--model-dir", str(tiny_model_dir), "--storage-path",
                 str(storage), "--measure"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "measure" in err[0] and "num_gpus is 0" in err[0], err
    assert not storage.exists()


def test_meter_refuses_cpu_and_non_fp8_runs(loaded, calib):
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        CostMeter(loaded, calib, MeasureSettings())
    manifest = {"layers": {"a": {"dtype": "fp8"}, "b": {"dtype": "nvfp4"}, "c": {"dtype": "bf16"}}}
    with pytest.raises(UserError, match="nvfp4"):
        fp8_layer_names(manifest)


@pytest.fixture(scope="module")
def measured(loaded, calib, tmp_path_factory):
    """Two searched runs (lm_head BF16 and tied; every layer FP8), each evaluated and measured on CPU by one
    meter, as a sweep worker does after evaluation."""
    from auto_quantize_model.inference.evaluate import evaluate_run, write_evaluation

    root = tmp_path_factory.mktemp("measured")
    meter = CostMeter(loaded, calib, CPU_SETTINGS)
    probe = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = loaded.model(probe)
    out = {}
    for label, bits, base in RUNS:
        scheme = dataclasses.replace(resolve_scheme(get_scheme(base)), name=f"fp8_{label}", effective_bits=bits)
        res = run_scheme(loaded, calib, scheme, root / "runs" / label, cache_dir=root / "cache")
        write_evaluation(res.manifest_path.parent,
                         evaluate_run(res.model, loaded.model, calib, res.manifest, forward=loaded.forward_step))
        with torch.no_grad():
            searched_before = res.model(probe)
        cost = meter.measure(loaded.model, res.model, res.manifest, res.manifest_path.parent)
        with torch.no_grad():
            assert torch.equal(res.model(probe), searched_before)  # the searched model is left as it was
        out[label] = (res, cost)
    with torch.no_grad():
        assert torch.equal(loaded.model(probe), before)  # and so is the BF16 model the copies shared tensors with
    assert not any(isinstance(m, Fp8Linear) for m in loaded.model.modules())
    return root, meter, out


def test_meter_fills_every_figure(measured):
    out = measured[2]
    costs = [cost for _, cost in out.values()]
    # Baselines are measured once per meter (worker) and shared by every run.
    assert all(c.bf16 is costs[0].bf16 and c.uniform_fp8 is costs[0].uniform_fp8 for c in costs)
    assert costs[0].bf16.num_fp8_layers == 0
    num_linears = len(out["all"][0].manifest["layers"])
    assert costs[0].uniform_fp8.num_fp8_layers == num_linears - 1  # every decoder Linear, lm_head BF16
    for res, cost in out.values():
        assert cost.run.num_fp8_layers == res.manifest["num_quantized_layers"] > 0
        for m in (cost.run, cost.bf16, cost.uniform_fp8):
            assert isinstance(m.prefill_tokens_per_s, float) and m.prefill_tokens_per_s > 0
            assert isinstance(m.decode_tokens_per_s, float) and m.decode_tokens_per_s > 0
            assert isinstance(m.lm_weight_bytes, int)
        assert cost.run.lm_weight_bytes < cost.bf16.lm_weight_bytes
        assert (cost.device, cost.batch_size, cost.seq_len, cost.settings["allow_cpu"]) == ("cpu", 2, 24, True)
        assert read_measurement(res.manifest_path.parent) == cost  # measurement.json round-trips
    # An FP8 lm_head is stored beside the embedding: the all-FP8 run holds fewer bytes than the partial one.
    assert out["all"][1].run.lm_weight_bytes < out["some"][1].run.lm_weight_bytes


@pytest.mark.parametrize("label", [r[0] for r in RUNS])
def test_in_memory_fp8_copy_has_the_exports_layers_and_bytes(measured, tiny_model_dir, tmp_path, label):
    """What is timed is what ``autoquant export`` writes: the same FP8 layers, the same codes and scales (one
    function computes both, export/fp8_codes.py), the same weight bytes; and it computes the run's fake-quant
    model bit for bit (CPU, bf16), as the export does."""
    from auto_quantize_model.autoquant.rebuild import build_quantized_model, find_run
    from auto_quantize_model.export.hf import export_run
    from auto_quantize_model.inference.fp8_linear import load_exported_lm
    from auto_quantize_model.models.loading import load_language_model

    res, _ = measured[2][label]
    export_run(res.manifest_path.parent, tiny_model_dir, tmp_path / "export")
    ex = load_exported_lm(tmp_path / "export", device="cpu")
    bf16 = load_language_model(tiny_model_dir, device="cpu", dtype="bfloat16")
    fake_quant = build_quantized_model(bf16, find_run(res.manifest_path.parent))
    copy = to_fp8_model(bf16.model, fake_quant, fp8_layer_names(res.manifest))
    ours = sorted(n for n, m in copy.named_modules() if isinstance(m, Fp8Linear))
    assert ours == ex.fp8_layers
    assert all(copy.get_submodule(n).weight.dtype == torch.float8_e4m3fn for n in ours)
    assert weight_bytes(copy) == weight_bytes(ex.model)
    for n in ours:
        a, b = copy.get_submodule(n), ex.model.get_submodule(n)
        assert torch.equal(a.weight.view(torch.uint8), b.weight.view(torch.uint8)), n
        assert torch.equal(a.weight_scale, b.weight_scale) and torch.equal(a.input_scale, b.input_scale), n
    ids = torch.randint(0, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(copy(ids), fake_quant(ids))
        assert torch.equal(ex.model(ids), fake_quant(ids))


def test_trials_table_columns_and_throughput_plot(measured, tmp_path):
    """analyze reads measurement.json beside each manifest: the columns are filled and the KL vs
    measured-prefill Pareto plot is drawn."""
    from auto_quantize_model.analysis.readers import load_trials
    from auto_quantize_model.analysis.report import analyze

    root, _, out = measured
    res = analyze([str(root / "runs")], tmp_path / "an")
    assert any(str(p).endswith("pareto_throughput.png") for p in res["plots"])
    assert (tmp_path / "an" / "pareto_throughput.png").is_file()
    assert "### Measured cost (real FP8 layers)" in (tmp_path / "an" / "analysis.md").read_text()
    trials = load_trials(tmp_path / "an" / "tables").set_index("scheme")
    for label, (_, cost) in out.items():
        row = trials.loc[f"fp8_{label}"]
        assert row["prefill_tokens_per_s"] == cost.run.prefill_tokens_per_s
        assert row["decode_tokens_per_s"] == cost.run.decode_tokens_per_s
        assert row["lm_weight_bytes"] == cost.run.lm_weight_bytes
        assert row["prefill_vs_bf16"] == pytest.approx(cost.run.prefill_tokens_per_s / cost.bf16.prefill_tokens_per_s)
        assert row["lm_weight_vs_bf16"] < 1 and row["decode_vs_bf16"] > 0 and row["prefill_vs_uniform_fp8"] > 0
        assert (row["measure_batch_size"], row["measure_seq_len"], row["measure_device"]) == (2, 24, "cpu")
        assert row["kl_mean"] > 0


def test_unreadable_measurement_is_ignored(tmp_path):
    (tmp_path / MEASUREMENT_FILE).write_text('{"run": {}}')
    assert read_measurement(tmp_path) is None
    assert read_measurement(tmp_path / "none") is None
    c = ModelCost(1.0, 2.0, 3, 0)
    cost = TrialCost(c, c, c, "cpu", 1, 2, False, {})
    assert TrialCost.from_dict(cost.to_dict()) == cost


def test_sweep_measure_refused_when_workers_have_no_cuda(ray_cluster, tiny_model_dir, tmp_path, capsys):
    """The test cluster's fake GPUs give workers no CUDA device: each worker refuses at start, before any trial,
    and the sweep exits 2 with one line (needs the ModelWorker snippet that builds its CostMeter)."""
    storage = tmp_path / "sweeps"
    assert main(["sweep", "--name", "m", "--model-dir", str(tiny_model_dir), "--storage-path", str(storage),
                 "--captions-path", "demo", "--max-calib-samples", "16", "--batch-size", "4", "--calib-seq-len", "32",
                 "--schemes", "fp8_autoquant_top25", "--effective-bits", "12", "--num-workers", "1", "--measure"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA GPU" in err[0] and "drop --measure" in err[0], err
    assert not list(storage.glob("m/autoquant/trials/*/*_quant_manifest.json"))
