"""The results report: exact tables, computed phases, Coqui logs, bad input, plots, no verdicts."""

from __future__ import annotations

import importlib.util
import json
import random
import re
import statistics
import sys
from pathlib import Path

import pytest

from vits_ray.report import ReportError, load_run, write_report
from vits_ray.report.analysis import Series, analyse_phases
from vits_ray.report.plots import plot_curve

DATA = Path(__file__).parent / "data"
COQUI_LOG = DATA / "coqui_trainer_0_log.txt"
_spec = importlib.util.spec_from_file_location("reference_curve", DATA / "reference_curve.py")
curves = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(curves)

STEPS_PER_EPOCH = 4
SPIKE_STEP = 85 * STEPS_PER_EPOCH + 2
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
VERDICTS = re.compile(r"production[- ]ready|healthy|optimal|excellent|high[- ]quality|state[- ]of[- ]the[- ]art|"
                      r"no signs of (instability|overfitting)|robust training", re.IGNORECASE)


def reference_curves() -> tuple[list[float], list[float]]:
    """The reference run's per-epoch figures, exactly: generator 68.87 -> 27.73 (min 25.24 at epoch 60,
    spike to 42 at epoch 85); discriminator 1.98 -> 2.65 (max 4.45 at epoch 3, min 1.38 at epoch 87)."""
    gen = curves.generator_per_epoch()
    gen[-1] = 27.73
    disc = curves.discriminator_per_epoch()
    disc[3], disc[87] = 4.45, 1.38
    return gen, disc


def reference_records(quality: list[dict] = ()) -> list[dict]:
    gen, disc = reference_curves()
    rng = random.Random(0)
    lines = []
    step = 0
    for epoch in range(curves.EPOCHS):
        for _ in range(STEPS_PER_EPOCH):
            step += 1
            lines.append({"kind": "step", "step": step, "epoch": epoch, "time": 1.7e9 + step,
                          "loss_0": disc[epoch] + rng.uniform(-0.1, 0.1), "loss_1": gen[epoch] + rng.uniform(-0.5, 0.5),
                          "loss_disc": disc[epoch], "loss_gen": 2.0, "loss_kl": 1.6, "loss_feat": 6.5,
                          "loss_mel": 16.0 - epoch / 140, "loss_duration": 1.5, "grad_norm_0": 20.0 + epoch % 7,
                          "grad_norm_1": 200.0 + epoch % 11, "lr_0": 2e-4 * 0.999875 ** epoch,
                          "lr_1": 2e-4 * 0.999875 ** epoch, "amp_scale": 128.0 if step % 50 == 0 else 256.0,
                          "step_time": 0.6 + 0.1 * (step % 5), "loader_time": 0.01, "skipped_0": 0,
                          "skipped_1": int(step % 50 == 0)})
        lines.append({"kind": "epoch", "epoch": epoch, "step": step, "steps": STEPS_PER_EPOCH,
                      "avg_loss_1": gen[epoch], "avg_loss_0": disc[epoch], "avg_loss_mel": 16.0, "avg_loss_kl": 1.6,
                      "avg_loss_feat": 6.5, "avg_loss_duration": 1.5, "avg_loss_gen": 2.0, "avg_loss_disc": disc[epoch],
                      "avg_grad_norm_0": 20.0, "avg_grad_norm_1": 200.0, "avg_step_time": 0.8,
                      "avg_loader_time": 0.01})
        if epoch % 10 == 9:
            lines.append({"kind": "val", "step": step, "epoch": epoch, "val_loss_1": gen[epoch] + 1,
                          "val_loss_mel": 17.0, "val_loss_kl": 1.7, "val_loss_feat": 6.0, "val_loss_duration": 1.4,
                          "val_loss_gen": 2.1})
            lines.append({"kind": "checkpoint", "step": step, "epoch": epoch, "path": f"checkpoint_{step:08d}",
                          "param_checksums": [1.5, 1.5], "best": epoch == 69})
    return lines + list(quality)


def write_reference_run(run_dir: Path, events: list[dict] | None = None, quality: list[dict] = ()) -> Path:
    """The reference run as runs before segments stored it: metrics.jsonl (and events.jsonl)."""
    lines = reference_records(quality)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if events is not None:
        (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return run_dir


def log_reference_run(store, events: list[dict] = ()) -> None:
    """The reference run as the RunLogger stores it: segments (one per checkpoint), events in the stream."""
    from vits_ray.runlog import RunLogger

    logger = RunLogger(store, None, flush_seconds=3600)
    for record in reference_records():
        logger.log(record)
        for event in events:
            if record["kind"] == "step" and event["step"] == record["step"]:
                logger.event(event)
        if record["kind"] == "checkpoint":
            logger.flush()
    logger.close()


GUARD_EVENTS = [
    {"step": SPIKE_STEP, "kind": "spike", "series": "loss_1", "value": 42.0, "median": 27.2, "threshold": 34.0,
     "detail": {"run": 3}},
    {"step": SPIKE_STEP, "kind": "rollback", "series": None, "value": None, "median": None, "threshold": None,
     "detail": {"restored_step": SPIKE_STEP - 6}},
    {"step": SPIKE_STEP, "kind": "lr_backoff", "series": None, "value": None, "median": None, "threshold": None,
     "detail": {"lr_0": 1e-4, "lr_1": 1e-4, "multiplier": 0.5}},
    {"step": 500, "kind": "nonfinite", "series": "loss_1", "value": "nan", "median": None, "threshold": None,
     "detail": {}},
]


@pytest.fixture(scope="module")
def reference_report(tmp_path_factory) -> tuple[Path, dict, str]:
    run = write_reference_run(tmp_path_factory.mktemp("runs") / "ref", GUARD_EVENTS)
    out = tmp_path_factory.mktemp("report")
    md = write_report(str(run), out)
    return out, json.loads((out / "report.json").read_text()), md.read_text()


# --- the reference run's figures -----------------------------------------------------------

def test_reference_table_has_the_exact_figures(reference_report):
    _, data, md = reference_report
    gen, disc = data["summary"]["avg_loss_1"], data["summary"]["avg_loss_0"]
    assert (gen["per"], gen["first"]["value"], gen["last"]["value"]) == ("epoch", 68.87, 27.73)
    assert (gen["min"]["value"], gen["min"]["epoch"], gen["max"]["value"], gen["max"]["epoch"]) == (25.24, 60, 68.87, 0)
    assert gen["change_pct"] == pytest.approx((27.73 - 68.87) / 68.87 * 100, abs=1e-12)
    assert round(gen["change_pct"], 1) == -59.7
    assert (disc["first"]["value"], disc["last"]["value"]) == (1.98, 2.65)
    assert (disc["min"]["value"], disc["min"]["epoch"], disc["max"]["value"], disc["max"]["epoch"]) == (1.38, 87, 4.45, 3)
    row = next(line for line in md.splitlines() if line.startswith("| avg_loss_1 "))
    assert [c.strip() for c in row.strip("|").split("|")][2:9] == [
        "68.87", "27.73", "25.24", "epoch 60", "68.87", "epoch 0", "-59.74%"]
    row = next(line for line in md.splitlines() if line.startswith("| avg_loss_0 "))
    assert [c.strip() for c in row.strip("|").split("|")][2:9] == [
        "1.98", "2.65", "1.38", "epoch 87", "4.45", "epoch 3", "+33.84%"]


def test_step_metrics_use_epoch_averages_when_present(reference_report):
    _, data, _ = reference_report
    assert data["summary"]["loss_mel"]["key"] == "avg_loss_mel"
    assert data["summary"]["step_time"]["per"] == "epoch"


def test_phases_find_the_descent_and_the_spike_near_epoch_85(reference_report):
    _, data, md = reference_report
    gen = data["phases"]["avg_loss_1"]
    kinds = [p["kind"] for p in gen["phases"]]
    assert kinds[0] == "descent" and gen["phases"][0]["start_x"] == 0
    assert 5 <= gen["descent_end_x"] <= 25
    assert kinds == ["descent", "plateau", "spike", "plateau"]
    (spike,) = gen["spikes"]
    assert spike["peak_x"] == 85 and spike["peak_value"] == 42.0
    assert spike["recovery_x"] is not None and spike["recovery_x"] > 85
    assert spike["size"] == pytest.approx(42.0 - spike["baseline"])
    # The discriminator oscillates: no descent, no spike.
    disc = data["phases"]["avg_loss_0"]
    assert disc["descent_end_x"] is None and disc["spikes"] == []
    assert "| epoch 85 | epoch 85 | 42.00 |" in md


def test_phase_analysis_on_a_flat_curve_finds_nothing():
    values = [5.0 + 0.01 * (i % 3) for i in range(60)]
    p = analyse_phases(Series("x", "x", "epoch", list(range(60)), values, list(range(60)), list(range(60))))
    assert p.descent_end_x is None and p.spikes == [] and [ph.kind for ph in p.phases] == ["plateau"]


def test_events_table_balance_timing_and_amp(reference_report):
    _, data, md = reference_report
    assert "4 event(s) from" in md and "restored_step=" + str(SPIKE_STEP - 6) in md
    bal = data["balance"]
    assert bal["ratio_first"] == pytest.approx(68.87 / 1.98)
    assert bal["ratio_last"] == pytest.approx(27.73 / 2.65)
    assert (bal["discriminator"]["min"], bal["discriminator"]["max"]) == (1.38, 4.45)
    t = data["timing"]
    steps = [0.6 + 0.1 * (s % 5) for s in range(1, 140 * STEPS_PER_EPOCH + 1)]
    assert t["per"] == "step" and t["step_time"]["median"] == pytest.approx(statistics.median(steps))
    assert t["loader_share_pct"] == pytest.approx(100 * 0.01 * len(steps) / sum(steps))
    amp = data["amp_scale"]
    assert (amp["min"], amp["max"], amp["skipped_1"]) == (128.0, 256.0, 140 * STEPS_PER_EPOCH // 50)
    assert "GradScaler's loss scale" in md and "says nothing about memory" in md
    assert "Per-rank parameter checksums identical at 14 of 14" in md


def test_no_quality_statement_and_no_verdicts(reference_report):
    out, _, md = reference_report
    assert "No quality metric (listening test or objective measure) was recorded" in md
    assert "makes no claim about voice quality" in md
    html_text = (out / "report.html").read_text()
    for text in (md, html_text):
        assert not VERDICTS.search(text), VERDICTS.search(text)


def test_quality_records_are_reported_when_present(tmp_path):
    run = write_reference_run(tmp_path / "run", None, [{"kind": "quality", "step": 560, "epoch": 139,
                                                         "utmos": 3.21, "cer": 0.12}])
    md = write_report(str(run), tmp_path / "out").read_text()
    assert "No quality metric" not in md
    # A metric without a known unit, and no MCD to pick a best evaluation by.
    assert "| utmos | – | 3.21 | 3.21 | – | 1 |" in md


def test_events_file_absent_versus_empty(tmp_path):
    run = write_reference_run(tmp_path / "a", None)
    md = write_report(str(run), tmp_path / "out_a").read_text()
    assert "This run has no events file (events.jsonl), and metrics.jsonl holds no event records." in md
    run = write_reference_run(tmp_path / "b", [])
    md = write_report(str(run), tmp_path / "out_b").read_text()
    assert "No stability events recorded" in md and "has no events file" not in md


def test_event_copies_in_metrics_are_used_without_an_events_file(tmp_path):
    # RunLogger.event also appends each event to metrics.jsonl (with the event's kind).
    run = write_reference_run(tmp_path / "run", None)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({**GUARD_EVENTS[1]}) + "\n")
    data = load_run(str(run))
    assert [e["kind"] for e in data.events] == ["rollback"] and "metrics.jsonl" in data.events_origin


def test_run_on_s3_is_read_through_the_store(s3_uri, tmp_path):
    from vits_ray.storage import open_store

    local = write_reference_run(tmp_path / "run", GUARD_EVENTS[:2])
    store = open_store(s3_uri)
    for name in ("metrics.jsonl", "events.jsonl"):
        store.write_bytes(name, (local / name).read_bytes())
    md = write_report(s3_uri, tmp_path / "out").read_text()
    assert f"{s3_uri}/metrics.jsonl" in md and "2 event(s) from" in md
    assert "| avg_loss_1 | avg_loss_1 per epoch | 68.87 | 27.73 |" in md
    with pytest.raises(ReportError, match="not found"):
        write_report(s3_uri + "-missing", tmp_path / "out2")


# --- runs stored as segments ----------------------------------------------------------------

def _comparable(report: dict) -> str:
    # Where the records came from differs; everything computed from them must not. (JSON text:
    # the events hold NaN, which never equals itself.)
    return json.dumps({k: v for k, v in report.items() if k not in ("source", "events_origin")}, sort_keys=True)


def test_segments_give_the_same_report_as_metrics_jsonl(reference_report, tmp_path):
    from vits_ray.storage import open_store

    log_reference_run(open_store(str(tmp_path / "run")), GUARD_EVENTS)
    md = write_report(str(tmp_path / "run"), tmp_path / "out").read_text()
    segments = json.loads((tmp_path / "out" / "report.json").read_text())
    _, legacy, _ = reference_report
    assert _comparable(segments) == _comparable(legacy)
    assert segments["records"]["events"] == 4  # the stream's event records, not counted twice
    assert f"4 event(s) from {tmp_path / 'run' / 'records'}" in md


def test_relaunched_and_rolled_back_run_reads_as_one_timeline(tmp_path):
    from vits_ray.runlog import RunLogger
    from vits_ray.storage import open_store

    store = open_store(str(tmp_path / "run"))

    def step(n: int) -> dict:
        return {"kind": "step", "step": n, "epoch": 0, "loss_0": 2.0, "loss_1": 40.0 - n, "step_time": 1.0,
                "loader_time": 0.1}

    first = RunLogger(store, None, flush_seconds=3600)
    for n in range(1, 5):
        first.log(step(n))
    first.flush()  # the checkpoint at 4
    for n in range(5, 8):
        first.log(step(n))
    first.close()  # killed after its records reached storage
    second = RunLogger(store, 4, flush_seconds=3600)
    for n in range(5, 7):
        second.log(step(n))
    second.event({"step": 6, "kind": "rollback", "detail": {"restored_step": 4}})
    second.mark_rolled_back(4)
    for n in range(5, 9):
        second.log(step(n))
    second.close()
    run = load_run(str(tmp_path / "run"))
    assert [r["step"] for r in run.steps] == list(range(1, 9))
    assert [e["kind"] for e in run.events] == ["rollback"]
    assert any("2 records from timelines abandoned by rollbacks" in w for w in run.warnings)


def test_segments_on_s3_are_read_through_the_store(s3_uri, tmp_path):
    from vits_ray.storage import open_store

    log_reference_run(open_store(s3_uri), GUARD_EVENTS[:2])
    md = write_report(s3_uri, tmp_path / "out").read_text()
    assert f"Source: `{s3_uri}/records`" in md and f"2 event(s) from {s3_uri}/records" in md
    assert "| avg_loss_1 | avg_loss_1 per epoch | 68.87 | 27.73 |" in md


def test_damaged_segment_is_a_clear_error_naming_segment_and_line(tmp_path):
    from vits_ray.runlog import segment_names
    from vits_ray.storage import open_store

    store = open_store(str(tmp_path / "run"))
    log_reference_run(store)
    name = segment_names(store)[2]
    lines = store.read_bytes(name).decode().splitlines()
    lines[4] = lines[4][:25]
    store.write_bytes(name, ("\n".join(lines) + "\n").encode())
    with pytest.raises(ReportError, match=re.escape(store.url(name)) + " line 5: not valid JSON"):
        write_report(str(tmp_path / "run"), tmp_path / "out")


# --- plots ----------------------------------------------------------------------------------

def test_plots_are_pngs_with_spikes_and_rollbacks_marked(reference_report):
    out, data, md = reference_report
    names = {f["file"] for f in data["figures"]}
    assert {"generator_loss.png", "discriminator_loss.png", "loss_components.png", "grad_norms.png",
            "learning_rates.png", "amp_scale.png", "timing.png", "generator_loss_steps.png"} <= names
    for name in names:
        blob = (out / name).read_bytes()
        assert blob.startswith(PNG_SIGNATURE) and len(blob) > 1000, name
        assert f"]({name})" in md or name == "balance.png"
    html_text = (out / "report.html").read_text()
    assert html_text.count('src="data:image/png;base64,') == len(names)
    marks = {f["file"]: f["marks"] for f in data["figures"]}
    gen_marks = {(m["kind"], m["x"]) for m in marks["generator_loss.png"]}
    assert ("spike", 85.0) in gen_marks  # computed from the curve
    assert ("rollback", 85.0) in gen_marks  # the guard's event, mapped to its epoch
    step_marks = {(m["kind"], m["x"]) for m in marks["generator_loss_steps.png"]}
    assert {("spike", SPIKE_STEP), ("rollback", SPIKE_STEP), ("nonfinite", 500.0)} <= step_marks
    assert ("rollback", SPIKE_STEP) in {(m["kind"], m["x"]) for m in marks["learning_rates.png"]}


def test_plot_curve_returns_what_it_marked(tmp_path):
    gen, _ = reference_curves()
    series = Series("avg_loss_1", "avg_loss_1", "epoch", list(range(len(gen))), gen, [], [])
    fig = plot_curve(series, tmp_path / "g.png", "g", "loss", analyse_phases(series))
    assert [(m.kind, m.x, m.y) for m in fig.marks] == [("spike", 85.0, 42.0)]
    assert (tmp_path / "g.png").read_bytes()[:8] == PNG_SIGNATURE


# --- short runs, bad input ------------------------------------------------------------------

def test_short_run_without_epoch_records_falls_back_to_steps(tmp_path):
    lines = [{"kind": "step", "step": s, "epoch": 0, "loss_0": 2.0, "loss_1": 50.0 - s, "loss_mel": 20.0,
              "loss_kl": 2.0, "loss_feat": 1.0, "loss_duration": 1.0, "grad_norm_0": 5.0, "grad_norm_1": 50.0,
              "lr_0": 2e-4, "lr_1": 2e-4, "amp_scale": 1.0, "step_time": 1.0, "loader_time": 0.1,
              "skipped_0": 0, "skipped_1": 0, "audio_seconds": 8.0} for s in range(1, 4)]
    lines[1]["loss_1"] = float("nan")
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "out"
    md = write_report(str(path), out).read_text()
    data = json.loads((out / "report.json").read_text())
    gen = data["summary"]["avg_loss_1"]
    assert (gen["per"], gen["key"], gen["first"]["value"], gen["last"]["value"], gen["nonfinite"]) == (
        "step", "loss_1", 49.0, 47.0, 1)
    assert "no epoch records yet" in md and "too few to separate phases" in md
    assert "24.0 s in 3.0 s of step time, 8.00 audio seconds per second" in md
    assert "no GradScaler was in use" in md
    for f in data["figures"]:
        assert (out / f["file"]).read_bytes().startswith(PNG_SIGNATURE)


def test_empty_metrics_file_is_a_clear_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n")
    with pytest.raises(ReportError, match=re.escape(str(path)) + " is empty"):
        write_report(str(tmp_path), tmp_path / "out")


def test_metrics_without_step_or_epoch_records_is_a_clear_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"kind": "checkpoint", "step": 1}) + "\n")
    with pytest.raises(ReportError, match=re.escape(str(path)) + " has no step or epoch records"):
        write_report(str(path), tmp_path / "out")


def test_truncated_only_line_is_a_clear_error_naming_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "step", "step": 1, "loss_1": 4')
    with pytest.raises(ReportError, match=re.escape(str(path)) + " line 1: not valid JSON"):
        write_report(str(path), tmp_path / "out")


def test_damaged_middle_line_is_a_clear_error_naming_file_and_line(tmp_path):
    run = write_reference_run(tmp_path / "run", None)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[9] = lines[9][:25]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ReportError, match=re.escape(str(run / "metrics.jsonl")) + " line 10: not valid JSON"):
        write_report(str(run), tmp_path / "out")


def test_torn_last_line_is_skipped_with_a_warning_in_the_report(tmp_path):
    run = write_reference_run(tmp_path / "run", None)
    text = (run / "metrics.jsonl").read_text()
    n = text.count("\n")
    (run / "metrics.jsonl").write_text(text + '{"kind": "step", "step": 561, "loss_1": 2')
    md = write_report(str(run), tmp_path / "out").read_text()
    assert f"line {n + 1} is cut off mid-record" in md and f"The {n} lines before it parse." in md
    assert "| avg_loss_1 | avg_loss_1 per epoch | 68.87 | 27.73 |" in md


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(ReportError, match="neither records/ segments, metrics.jsonl nor a Coqui"):
        write_report(str(tmp_path), tmp_path / "out")


# --- Coqui trainer logs ---------------------------------------------------------------------

def _log_blocks(text: str) -> list[dict[str, float]]:
    """The step blocks of a Coqui log, read independently of the parser (current values only)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    blocks = []
    for chunk in re.split(r"--> TIME: ", text)[1:]:
        values = {}
        for line in chunk.split("> EVALUATION")[0].splitlines()[1:]:
            m = re.match(r"\s*\| > (\w+): (?:tensor\()?([-\d.e+]+)", line)
            if m:
                values[m.group(1)] = float(m.group(2))
        blocks.append(values)
    return blocks


def _eval_performance(text: str) -> list[dict[str, float]]:
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    out = []
    for chunk in text.split("--> EVAL PERFORMANCE")[1:]:
        out.append({m.group(1): float(m.group(2))
                    for m in re.finditer(r"\| > (avg_\w+): ([-\d.e+]+)", chunk.split("> EPOCH")[0])})
    return out


def check_coqui_report(log: Path, out: Path) -> None:
    text = log.read_text()
    run = load_run(str(log))
    blocks = _log_blocks(text)
    assert run.origin == "coqui" and len(run.steps) == len(blocks) > 0
    for record, block in zip(run.steps, blocks):
        for key in ("loss_0", "loss_1", "loss_mel", "loss_kl", "grad_norm_0", "grad_norm_1", "step_time",
                    "loader_time"):
            assert record[key] == block[key], key
        assert record["lr_0"] == block["current_lr_0"]
    evals = _eval_performance(text)
    assert len(run.vals) == len(evals) == len(run.epochs) > 0
    assert [v["val_loss_1"] for v in run.vals] == [e["avg_loss_1"] for e in evals]
    md = write_report(str(log.parent), out).read_text()
    data = json.loads((out / "report.json").read_text())
    gen, disc = data["summary"]["avg_loss_1"], data["summary"]["avg_loss_0"]
    assert gen["per"] == "epoch" and disc["per"] == "epoch"
    assert gen["first"]["value"] == run.epochs[0]["avg_loss_1"]
    assert gen["last"]["value"] == run.epochs[-1]["avg_loss_1"]
    assert disc["first"]["value"] == run.epochs[0]["avg_loss_0"]
    # The epoch average is the running average printed in the epoch's last step block.
    last_of_epoch0 = max(i for i, r in enumerate(run.steps) if r["epoch"] == 0)
    raw = re.sub(r"\x1b\[[0-9;]*m", "", text).split("--> TIME: ")[last_of_epoch0 + 1]
    printed = float(re.search(r"\| > loss_1: \S+\s+\(([-\d.e+]+)\)", raw).group(1))
    assert gen["first"]["value"] == printed
    assert f"| avg_loss_1 | avg_loss_1 per epoch | {gen['first']['value']:.2f} | {gen['last']['value']:.2f} |" in md
    assert "Coqui's trainer has no stability guard" in md and "No quality metric" in md
    assert "Coqui's step_time excludes the data wait" in md
    assert (out / "generator_loss.png").read_bytes().startswith(PNG_SIGNATURE)


def test_recorded_coqui_log_is_parsed_into_the_same_report(tmp_path):
    log = tmp_path / "coqui_run" / "trainer_0_log.txt"
    log.parent.mkdir()
    log.write_text(COQUI_LOG.read_text())
    check_coqui_report(log, tmp_path / "out")
    # Coqui's KeepAverage leaves the epoch's first step out of the printed average (coqui-tts-trainer 0.4.0).
    run = load_run(str(log))
    epoch0 = [r["loss_1"] for r in run.steps if r["epoch"] == 0]
    assert run.epochs[0]["avg_loss_1"] == pytest.approx(statistics.fmean(epoch0[1:]), rel=1e-12)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "leave out the first step of each epoch" in md and f"{statistics.fmean(epoch0):.4f}" in md


def test_coqui_log_without_step_blocks_is_a_clear_error(tmp_path):
    log = tmp_path / "trainer_0_log.txt"
    log.write_text(" > Training Environment:\n | > Backend: Torch\n")
    with pytest.raises(ReportError, match=re.escape(str(log)) + ": no Coqui training step blocks"):
        load_run(str(log))


@pytest.mark.slow
def test_coqui_trainer_log_regenerated_and_parsed(demo_corpus_dir, tmp_path):
    from vits_ray.config import load_config

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))  # a benchmark's baseline
    from coqui_baseline import BASELINE_FILE, run_coqui_trainer

    run_dir = run_coqui_trainer(demo_corpus_dir, tmp_path / "coqui", load_config("tiny"), max_steps=6, epochs=2)
    log = run_dir / "trainer_0_log.txt"
    assert log.exists()
    stats = json.loads((run_dir / BASELINE_FILE).read_text())
    assert stats["steps"] == 6 and stats["audio_seconds_trained"] > 0 and stats["wall_seconds"] > 0
    check_coqui_report(log, tmp_path / "out")
    assert len(load_run(str(log)).steps) == 6
