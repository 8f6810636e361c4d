"""The sweep report, on a sweep folder built from the real pieces (RunLogger records, trials_csv rows
from trial_row) without Ray."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from vits_ray.cli import main
from vits_ray.config import load_config
from vits_ray.report import ReportError, write_sweep_report
from vits_ray.report.sweep import is_sweep
from vits_ray.runlog import RunLogger
from vits_ray.stability import Event
from vits_ray.storage import open_store
from vits_ray.tune.space import load_space
from vits_ray.tune.sweep import SweepJob, trial_row, trials_csv

MAX_STEPS = 8
SPACE = """
[parameters."optim.lr_gen"]
distribution = "log_uniform_values"
min = 1e-5
max = 1e-2
[parameters."optim.lr_schedule"]
values = ["exponential", "warmup_exponential"]
[parameters."optim.warmup_steps"]
distribution = "int_uniform"
min = 0
max = 500
when = { "optim.lr_schedule" = "warmup_exponential" }
"""
# trial id -> (settings, steps run, loss_mel per step, spike step or None, error)
TRIALS = {
    "aaaa1111": ({"optim.lr_gen": 2e-4, "optim.lr_schedule": "exponential"}, 8, 100.0, None, None),
    "bbbb2222": ({"optim.lr_gen": 5e-3, "optim.lr_schedule": "warmup_exponential", "optim.warmup_steps": 120},
                 8, 110.0, 5, None),
    "cccc3333": ({"optim.lr_gen": 1e-5, "optim.lr_schedule": "exponential"}, 4, 130.0, None, None),
    "dddd4444": ({"optim.lr_gen": 3e-5, "optim.lr_schedule": "warmup_exponential", "optim.warmup_steps": 400},
                 0, 0.0, None, "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB " + "x" * 200),
}


def mel_at(start: float, step: int, spike_step) -> float:
    return start - 2.0 * step + (60.0 if step == spike_step else 0.0)


def write_trial_records(sweep_store, trial_id: str, steps: int, start: float, spike_step) -> None:
    logger = RunLogger(sweep_store.child(f"trial_{trial_id}"), None, flush_seconds=3600)
    for step in range(1, steps + 1):
        mel = mel_at(start, step, spike_step)
        logger.log({"kind": "step", "step": step, "epoch": 0, "loss_0": 2.0, "loss_1": mel + 25.0, "loss_mel": mel,
                    "loss_kl": 12.0, "lr_0": 2e-4, "lr_1": 2e-4, "step_time": 0.8, "loader_time": 0.01})
        if step == spike_step:
            logger.event(Event(step, "spike", series="loss_1", value=mel + 25.0, median=mel - 35.0,
                               threshold=mel - 10.0).to_dict())
    logger.close()


def result_of(trial_id: str, settings, steps: int, start: float, spike_step, error):
    """What Ray Tune hands `trial_row`: the trial's last report (scored metrics) and config."""
    metrics = {"trial_id": trial_id}
    if error is None:
        metrics.update(step=steps, loss_mel_recent=mel_at(start, steps, spike_step), val_loss_mel=math.nan,
                       spikes=int(spike_step is not None), rollbacks=0, nonfinite_steps=0, blowups=0)
    return SimpleNamespace(metrics=metrics, config=settings, error=RuntimeError(error) if error else None,
                           path=f"/sweeps/s/_run_trial_{trial_id}")


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweeps")
    (root / "space.toml").write_text(SPACE)
    space = load_space(root / "space.toml", load_config("tiny"))
    store = open_store(str(root / "s1"))
    sweep = SweepJob(recipe="tiny", overrides=(), space_path=str(root / "space.toml"), data_uri="", storage_uri="",
                     name="s1", max_steps=MAX_STEPS, confirm_top=0)
    rows = []
    for trial_id, (settings, steps, start, spike_step, error) in TRIALS.items():
        if error is None:  # the errored trial never wrote a record
            write_trial_records(store, trial_id, steps, start, spike_step)
        rows.append(trial_row(result_of(trial_id, settings, steps, start, spike_step, error), space, sweep))
    store.write_bytes("trials.csv", trials_csv(rows, space).encode("utf-8"))
    store.write_bytes("best.toml", b'extends = "tiny.toml"\n')
    return root / "s1"


@pytest.fixture(scope="module")
def report(sweep_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    md = write_sweep_report(str(sweep_dir), out)
    return out, md.read_text(), json.loads((out / "sweep.json").read_text())


def section(md: str, heading: str) -> str:
    return md.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_header_names_the_best_trial_and_best_toml(report, sweep_dir):
    _, md, data = report
    header = md.split("## Trials", 1)[0]
    assert "4 trial(s): 2 completed, 1 errored, 1 stopped early." in header
    assert "Best trial" in header and "aaaa1111" in header and "optim.lr_gen = 0.0002" in header
    assert str(sweep_dir / "best.toml") in header
    assert data["best"] == "aaaa1111"


def test_trials_table_lists_every_trial_by_score_errored_last(report):
    _, md, _ = report
    rows = [line for line in section(md, "Trials").splitlines() if line.startswith("| ") and "trial" not in line[:8]]
    assert [r.split(" | ")[0][2:] for r in rows] == ["aaaa1111", "bbbb2222", "cccc3333", "dddd4444"]
    spiking = rows[1].split(" | ")
    assert spiking[4] == "1"  # spikes column
    assert "CUDA out of memory" in rows[3] and "x" * 100 not in rows[3] and "…" in rows[3]
    assert "| – |" in rows[0]  # warmup_steps was not searched for an exponential schedule


def test_early_stopping_table_and_compute_saved(report):
    _, md, data = report
    early = section(md, "Early stopping")
    assert "| cccc3333 | 4 |" in early
    # 8 + 8 + 4 steps run (the errored trial none) of 4 trials x 8 steps
    assert data["early_stopping"]["compute_saved"] == pytest.approx(1 - 20 / 32)
    assert "Compute saved overall: 37.5%" in early
    assert [s["trial_id"] for s in data["early_stopping"]["stopped"]] == ["cccc3333"]


def test_importances_name_every_parameter_conditional_ones_noted(report):
    _, md, data = report
    text = section(md, "Parameter importances")
    assert set(data["importances"]) == {"optim.lr_gen", "optim.lr_schedule", "optim.warmup_steps"}
    assert sum(data["importances"].values()) == pytest.approx(1.0)
    assert all(f"| {key} |" in text for key in data["importances"])
    assert "Conditional keys, each weighed over the trials that have it: optim.warmup_steps." in text


def test_importances_fall_back_to_the_common_keys_when_optuna_refuses(sweep_dir, tmp_path, monkeypatch):
    import optuna

    real = optuna.importance.get_param_importances

    def refusing_dynamic_spaces(study, **kwargs):
        if len({frozenset(t.params) for t in study.trials}) > 1:
            raise ValueError("dynamic search space")
        return real(study, **kwargs)

    monkeypatch.setattr(optuna.importance, "get_param_importances", refusing_dynamic_spaces)
    write_sweep_report(str(sweep_dir), tmp_path)
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert set(data["importances"]) == {"optim.lr_gen", "optim.lr_schedule"}
    assert any("dynamic search space" in n and "Left out: optim.warmup_steps." in n for n in data["importance_notes"])


def test_spiking_trial_is_marked_in_the_plots(report):
    out, _, data = report
    figures = {f["file"]: f for f in data["figures"]}
    scatter = figures["score_vs_optim.lr_gen.png"]["marks"]
    assert {m["label"]: m["kind"] for m in scatter} == {"aaaa1111": "clean", "bbbb2222": "unstable",
                                                         "cccc3333": "clean"}
    assert "1 errored left out" in figures["score_vs_optim.lr_gen.png"]["title"]
    curve_marks = figures["mel_loss_curves.png"]["marks"]
    assert [(m["kind"], m["x"]) for m in curve_marks if m["kind"] == "spike"] == [("spike", 5.0)]
    assert [(m["kind"], m["x"]) for m in curve_marks if m["kind"] == "stopped"] == [("stopped", 4.0)]
    for name in (*figures, "sweep.html"):
        assert (out / name).stat().st_size > 1000


def test_categorical_parameter_plot_and_missing_records_warning(report):
    _, md, data = report
    categorical = next(f for f in data["figures"] if f["file"] == "score_vs_optim.lr_schedule.png")
    assert sorted(m["x"] for m in categorical["marks"]) == [0.0, 0.0, 1.0]  # exponential x2, warmup_exponential
    assert "trial dddd4444: no records" in section(md, "Warnings about the input")


def test_missing_trials_csv_or_columns_is_a_report_error(tmp_path):
    assert not is_sweep(str(tmp_path))
    with pytest.raises(ReportError, match="trials.csv not found"):
        write_sweep_report(str(tmp_path), tmp_path / "out")
    (tmp_path / "trials.csv").write_text("trial_id,status,score\nx,completed,1.0\n")
    with pytest.raises(ReportError) as err:
        write_sweep_report(str(tmp_path), tmp_path / "out")
    assert str(tmp_path / "trials.csv") in str(err.value) and "loss" in str(err.value)


def test_single_parameter_sweep_says_why_there_are_no_importances(tmp_path):
    (tmp_path / "trials.csv").write_text(
        "trial_id,status,score,loss,spikes,rollbacks,nonfinite_steps,blowups,penalty,steps,error,optim.lr_gen\n"
        "a,completed,10,10,0,0,0,0,0,8,,0.001\nb,completed,1e+06,nan,0,0,3,0,nan,8,,0.9\n")
    md = write_sweep_report(str(tmp_path), tmp_path / "out").read_text()
    assert "No importances: the trials searched 1 parameter(s) (optim.lr_gen)" in md
    assert "| b | completed | diverged |" in md
    marks = json.loads((tmp_path / "out" / "sweep.json").read_text())["figures"][0]["marks"]
    assert {m["label"]: m["kind"] for m in marks} == {"a": "clean", "b": "diverged"}


def test_cli_report_on_a_sweep_folder(sweep_dir, tmp_path):
    result = CliRunner().invoke(main, ["report", str(sweep_dir), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert f"report: {tmp_path / 'r' / 'sweep.md'}" in result.output
    assert (tmp_path / "r" / "mel_loss_curves.png").exists()
