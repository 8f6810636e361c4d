"""The report on input it used to refuse (records without `kind`) and its Quality section (quality
records written during training, an eval.json from `vits-ray evaluate` with its samples)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile

from test_report import PNG_SIGNATURE, VERDICTS, reference_curves, write_reference_run
from vits_ray.report import ReportError, load_run, write_report

NO_QUALITY = "No quality metric (listening test or objective measure) was recorded"


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def md_row(md: str, first_cell: str) -> list[str]:
    line = next(line for line in md.splitlines() if line.startswith(f"| {first_cell} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def no_verdicts(out: Path) -> None:
    for name in ("report.md", "report.html"):
        text = (out / name).read_text()
        assert not VERDICTS.search(text), (name, VERDICTS.search(text))


# --- records without `kind` -------------------------------------------------------------------

@pytest.mark.parametrize("names", [("avg_loss_0", "avg_loss_1"), ("loss_0", "loss_1")],
                         ids=["avg_fields", "plain_loss_fields"])
def test_kindless_epoch_table_is_analysed_like_the_reference_run(tmp_path, names):
    # An exported table of per-epoch averages: no kind and no step, only the epoch index.
    gen, disc = reference_curves()
    disc_key, gen_key = names
    path = write_jsonl(tmp_path / "epochs.jsonl",
                       [{"epoch": e, disc_key: disc[e], gen_key: gen[e]} for e in range(len(gen))])
    out = tmp_path / "out"
    md = write_report(str(path), out).read_text()
    data = json.loads((out / "report.json").read_text())
    assert data["records"]["epoch"] == 140 and data["records"]["step"] == 0
    g = data["summary"]["avg_loss_1"]
    assert (g["per"], g["key"], g["first"]["value"], g["last"]["value"]) == ("epoch", "avg_loss_1", 68.87, 27.73)
    assert (g["min"]["value"], g["min"]["epoch"], g["min"]["step"]) == (25.24, 60, None)
    assert md_row(md, "avg_loss_1")[2:9] == ["68.87", "27.73", "25.24", "epoch 60", "68.87", "epoch 0", "-59.74%"]
    assert md_row(md, "avg_loss_0")[2:9] == ["1.98", "2.65", "1.38", "epoch 87", "4.45", "epoch 3", "+33.84%"]
    (spike,) = data["phases"]["avg_loss_1"]["spikes"]
    assert spike["peak_x"] == 85
    assert "140 record(s) carry no `kind`; read by their fields as epoch (140)" in md
    renamed = "140 epoch row(s) name their averages plainly (loss_1, ...), read as avg_loss_1, ..."
    assert (renamed in md) == (gen_key == "loss_1")
    assert "Epochs 0 to 139; there are no step records" in md
    assert "No step_time / loader_time in the records." in md and NO_QUALITY in md
    assert data["balance"]["ratio_first"] == pytest.approx(68.87 / 1.98)
    for f in data["figures"]:
        assert (out / f["file"]).read_bytes().startswith(PNG_SIGNATURE)
    assert {"generator_loss.png", "discriminator_loss.png", "balance.png"} <= {f["file"] for f in data["figures"]}
    assert (out / "report.html").read_text().count("data:image/png;base64,") == len(data["figures"])
    no_verdicts(out)


def test_kindless_step_file_is_analysed_per_step(tmp_path):
    path = write_jsonl(tmp_path / "steps.jsonl",
                       [{"step": s, "loss_0": 2.0 + 0.01 * s, "loss_1": 60.0 - s} for s in range(1, 41)])
    out = tmp_path / "out"
    md = write_report(str(path), out).read_text()
    data = json.loads((out / "report.json").read_text())
    g = data["summary"]["avg_loss_1"]
    assert (g["per"], g["key"], g["first"]["value"], g["last"]["value"]) == ("step", "loss_1", 59.0, 20.0)
    assert g["first"]["epoch"] is None  # the file has no epochs: nothing is made up
    assert "40 record(s) carry no `kind`; read by their fields as step (40)" in md
    assert "no epoch records yet" in md and "Steps 1 to 40." in md
    assert md_row(md, "avg_loss_1")[1:4] == ["loss_1 per step", "59.00", "20.00"]
    assert (out / "generator_loss.png").read_bytes().startswith(PNG_SIGNATURE)
    assert (out / "report.html").exists()


def test_kindless_validation_and_quality_rows_without_step(tmp_path):
    records = [{"epoch": e, "avg_loss_0": 2.0, "avg_loss_1": 30.0 - 0.1 * e} for e in range(12)]
    records += [{"epoch": 5, "val_loss_1": 31.0}, {"epoch": 11, "val_loss_1": 30.5},
                {"epoch": 11, "mcd_dtw_db": 10.5, "f0_rmse_cents": 250.0}]
    out = tmp_path / "out"
    md = write_report(str(write_jsonl(tmp_path / "m.jsonl", records)), out).read_text()
    assert md_row(md, "val_loss_1") == ["val_loss_1", "31.00", "30.50", "30.50", "epoch 11", "2"]
    assert "read by their fields as epoch (12), quality (1), val (2)" in md
    # The quality trend is drawn over epochs when its records carry no step.
    assert "1 quality record(s), epochs 11 to 11." in md and md_row(md, "mcd_dtw_db")[2:5] == ["10.50"] * 3
    assert (out / "quality.png").read_bytes().startswith(PNG_SIGNATURE)


def test_unknown_and_ambiguous_records_are_named_with_file_and_line(tmp_path):
    records = [{"epoch": e, "avg_loss_0": 2.0, "avg_loss_1": 30.0 - e} for e in range(3)]
    records.insert(1, {"foo": 1, "bar": 2})
    records.insert(3, {"epoch": 1, "step": 8, "loss_1": 3.0, "avg_loss_1": 4.0})
    path = write_jsonl(tmp_path / "m.jsonl", records)
    run = load_run(str(path))
    assert [e["epoch"] for e in run.epochs] == [0, 1, 2]
    (warning,) = [w for w in run.warnings if "left out" in w]
    assert warning.startswith(f"{path}: 2 record(s) without `kind` left out")
    assert "line 2 (bar, foo)" in warning
    assert "line 4 has the fields of epoch and step records (avg_loss_1, epoch, loss_1, step); add a `kind`" in warning
    md = write_report(str(path), tmp_path / "out").read_text()
    assert "line 2 (bar, foo)" in md.split("### Warnings about the input")[1]


def test_a_file_of_unrecognised_records_is_a_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"name": "a", "value": 1}] * 3)
    expected = re.escape(f"{path} has no step or epoch records") + ".*line 1 \\(name, value\\)"
    with pytest.raises(ReportError, match=expected):
        load_run(str(path))


def test_records_with_a_kind_are_not_reinterpreted(tmp_path):
    # A tagged record is read by its tag, whatever its fields look like.
    records = [{"kind": "step", "step": s, "epoch": 0, "loss_1": 5.0, "avg_loss_1": 1.0, "mcd_dtw_db": 3.0}
               for s in range(1, 4)]
    run = load_run(str(write_jsonl(tmp_path / "m.jsonl", records)))
    assert len(run.steps) == 3 and not run.epochs and not run.quality and not run.warnings


# --- quality records -------------------------------------------------------------------------

QUALITY = [
    {"kind": "quality", "step": 140, "epoch": 34, "utterances": 4, "failed": 0, "mcd_dtw_db": 11.2,
     "f0_rmse_cents": 310.5, "vuv_error": 0.21, "duration_ratio": 1.08},
    {"kind": "quality", "step": 280, "epoch": 69, "utterances": 4, "failed": 1, "mcd_dtw_db": 9.1,
     "f0_rmse_cents": 280.25, "vuv_error": 0.18, "duration_ratio": 1.031},
    {"kind": "quality", "step": 420, "epoch": 104, "utterances": 4, "failed": 4, "mcd_dtw_db": float("nan"),
     "f0_rmse_cents": float("nan"), "vuv_error": float("nan"), "duration_ratio": float("nan")},
    {"kind": "quality", "step": 560, "epoch": 139, "utterances": 4, "failed": 0, "mcd_dtw_db": 9.8,
     "f0_rmse_cents": 295.0, "vuv_error": 0.19, "duration_ratio": 0.97},
]


def test_quality_records_give_a_table_and_a_trend_plot(tmp_path):
    run = write_reference_run(tmp_path / "run", None, QUALITY)
    out = tmp_path / "out"
    md = write_report(str(run), out).read_text()
    assert NO_QUALITY not in md
    section = md.split("## Quality")[1]
    assert "4 quality record(s), steps 140 to 560." in section
    first, best, last = QUALITY[0], QUALITY[1], QUALITY[3]  # best: the lowest MCD
    assert md_row(section, "step") == ["step", "", "140", "560", "280", ""]
    assert md_row(section, "failed") == ["failed", "", "0", "0", "1", ""]
    assert md_row(section, "mcd_dtw_db") == ["mcd_dtw_db", "dB", "11.20", "9.80", "9.10", "3"]
    assert md_row(section, "f0_rmse_cents") == ["f0_rmse_cents", "cents", "310.50", "295.00", "280.25", "3"]
    assert md_row(section, "vuv_error") == ["vuv_error", "fraction", "0.210", "0.190", "0.180", "3"]
    assert md_row(section, "duration_ratio") == ["duration_ratio", "ratio", "1.080", "0.970", "1.031", "3"]
    assert "](quality.png)" in section and "No listening test is part of this report" in section

    data = json.loads((out / "report.json").read_text())
    quality = data["quality"]
    assert [r["step"] for r in quality["records"]] == [140, 280, 420, 560]
    assert (quality["trend"]["first"]["mcd_dtw_db"], quality["trend"]["last"]["mcd_dtw_db"],
            quality["trend"]["best"]["mcd_dtw_db"]) == (first["mcd_dtw_db"], last["mcd_dtw_db"], best["mcd_dtw_db"])
    assert quality["evaluation"] is None
    fig = next(f for f in data["figures"] if f["file"] == "quality.png")
    assert [(m["kind"], m["x"]) for m in fig["marks"]] == [("unscored", 420.0), ("best", 280.0)]
    assert fig["marks"][1]["y"] == 9.1
    blob = (out / "quality.png").read_bytes()
    assert blob.startswith(PNG_SIGNATURE) and len(blob) > 1000
    no_verdicts(out)


def test_quality_records_from_segments(tmp_path):
    # As the trainer writes them: through the RunLogger, into records/ segments.
    from test_report import reference_records
    from vits_ray.runlog import RunLogger
    from vits_ray.storage import open_store

    logger = RunLogger(open_store(str(tmp_path / "run")), None, flush_seconds=3600)
    for record in reference_records(QUALITY[:2]):
        logger.log(record)
    logger.close()
    md = write_report(str(tmp_path / "run"), tmp_path / "out").read_text()
    assert md_row(md, "mcd_dtw_db") == ["mcd_dtw_db", "dB", "11.20", "9.10", "9.10", "2"]


# --- eval.json -------------------------------------------------------------------------------

def write_wav(path: Path, seconds: float = 0.1, hz: float = 220.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(16000 * seconds)) / 16000
    soundfile.write(str(path), (0.2 * np.sin(2 * math.pi * hz * t)).astype(np.float32), 16000)


def stat(mean, median, lo, hi, n) -> dict:
    return {"mean": mean, "median": median, "ci95": [lo, hi], "n": n}


def eval_json(**changes) -> dict:
    """An eval.json shaped like `vits-ray evaluate`'s (vits_ray.evaluate.pipeline) for a model; `utterances`
    counts the scored ones."""
    from vits_ray.evaluate.metrics import MetricSettings

    data = {"model": "runs/demo/export", "model_step": 560, "backend": "torch", "data": "shards/", "split": "val",
            "seed": 0, "rtf_threads": 1, "method": MetricSettings().describe(), "utterances": 2, "failed": 1,
            "mcd_dtw_db": stat(12.1, 11.8, 10.2, 14.0, 2), "f0_rmse_cents": stat(301.5, 300.0, 250.0, 353.0, 2),
            "vuv_error": stat(0.2, 0.19, 0.1, 0.3, 2), "duration_ratio": stat(1.05, 1.04, 0.9, 1.2, 2),
            "rtf_torch": {"mean": 0.42, "median": 0.4, "ci95": None, "n": 1},
            "units": {"mcd_dtw_db": "dB", "f0_rmse_cents": "cents", "vuv_error": "fraction of frames",
                      "duration_ratio": "synthesised / reference", "rtf_torch": "s per s of audio"},
            "errors": [{"id": "bn_0009", "error": "bn_0009 synthesized: silent after trimming at 40 dB"}],
            "samples": [
                {"id": "bn_0001", "text": "আমার সোনার বাংলা", "synthesized": "samples/bn_0001.syn.wav",
                 "reference": "samples/bn_0001.ref.wav"},
                {"id": "bn_0002", "text": "আমি তোমায় ভালোবাসি", "synthesized": "samples/bn_0002.syn.wav",
                 "reference": "samples/bn_0002.ref.wav"},
                {"id": "bn_0003", "text": "চিরদিন", "synthesized": "samples/bn_0003.syn.wav",
                 "reference": "samples/bn_0003.ref.wav"},
            ]}
    data.update(changes)
    return data


def write_eval(folder: Path, data: dict, missing: tuple[str, ...] = ("samples/bn_0003.syn.wav",)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "eval.json").write_text(json.dumps(data, ensure_ascii=False))
    for sample in data["samples"]:
        for rel in (sample["reference"], sample["synthesized"]):
            if rel not in missing:
                write_wav(folder / rel)


def small_run(folder: Path) -> Path:
    records = [{"kind": "step", "step": s, "epoch": 0, "loss_0": 2.0, "loss_1": 40.0 - s} for s in range(1, 13)]
    write_jsonl(folder / "metrics.jsonl", records)
    return folder


def test_eval_json_in_the_run_folder_gives_metrics_method_and_samples(tmp_path):
    run = small_run(tmp_path / "run")
    write_eval(run / "eval", eval_json())
    out = tmp_path / "out"
    md = write_report(str(run), out).read_text()
    section = md.split("## Quality")[1]
    assert NO_QUALITY not in md
    assert f"Read from `{run / 'eval' / 'eval.json'}`." in section
    assert "Synthesised by `runs/demo/export` at training step 560." in section
    assert "Texts and reference recordings: `shards/`, split `val`." in section
    assert "2 utterance(s) scored, 1 failed" in section
    assert "- bn_0009: bn_0009 synthesized: silent after trimming at 40 dB" in section
    assert 'Also recorded: backend = "torch", seed = 0.' in section
    assert md_row(section, "mcd_dtw_db") == ["mcd_dtw_db", "dB", "12.10", "11.80", "10.20 to 14.00", "2"]
    assert md_row(section, "f0_rmse_cents") == ["f0_rmse_cents", "cents", "301.50", "300.00", "250.00 to 353.00", "2"]
    assert md_row(section, "vuv_error") == ["vuv_error", "fraction of frames", "0.200", "0.190", "0.100 to 0.300", "2"]
    assert md_row(section, "rtf_torch") == ["rtf_torch", "s per s of audio", "0.420", "0.400", "–", "1"]
    assert "| rtf_onnx |" not in section  # not measured: not shown
    assert "RTF measured with 1 CPU thread(s)." in section
    assert "Frame period: 5.0 ms; cepstrum order: 24; c0 (energy term) in the MCD: excluded" in section
    assert "Published MCD figures differ in cepstrum order, in whether c0" in section
    assert "- mcd: `MCD-DTW in dB, Kubichek's convention" in section
    assert "Other settings: num_mel_bands = 40, f0_floor_hz = 60.0" in section

    # Samples: copied beside the report and linked; the missing one is said to be missing.
    for name in ("bn_0001.ref.wav", "bn_0001.syn.wav", "bn_0002.ref.wav", "bn_0002.syn.wav", "bn_0003.ref.wav"):
        assert (out / "samples" / name).read_bytes() == (run / "eval" / "samples" / name).read_bytes()
    assert not (out / "samples" / "bn_0003.syn.wav").exists()
    assert md_row(section, "bn_0001") == ["bn_0001", "আমার সোনার বাংলা", "[bn_0001.ref.wav](samples/bn_0001.ref.wav)",
                                          "[bn_0001.syn.wav](samples/bn_0001.syn.wav)"]
    missing = f"missing: {run / 'eval' / 'samples' / 'bn_0003.syn.wav'} not found"
    assert md_row(section, "bn_0003")[3] == missing
    assert f"- bn_0003: synthesised `samples/bn_0003.syn.wav`: {missing}" in section

    html_text = (out / "report.html").read_text()
    assert html_text.count("<audio controls") == 5
    assert '<audio controls preload="none" src="samples/bn_0002.syn.wav">' in html_text
    assert "চিরদিন" in html_text and "not found" in html_text

    data = json.loads((out / "report.json").read_text())
    ev = data["quality"]["evaluation"]
    assert ev["model_step"] == 560 and ev["metrics"]["mcd_dtw_db"]["mean"] == 12.1 and ev["backend"] == "torch"
    assert ev["errors"] == eval_json()["errors"] and ev["method"]["cepstrum_order"] == 24
    assert ev["metrics"]["mcd_dtw_db"]["ci95"] == [10.2, 14.0] and ev["metrics"]["mcd_dtw_db"]["unit"] == "dB"
    assert [s["synthesized"]["copied"] for s in ev["samples"]] == [
        "samples/bn_0001.syn.wav", "samples/bn_0002.syn.wav", None]
    assert data["quality"]["records"] == [] and data["quality"]["trend"] is None
    no_verdicts(out)


def test_eval_json_beside_a_metrics_file_from_two_wav_folders(tmp_path):
    # `vits-ray evaluate` comparing two folders of WAVs: no model, step, data, split, RTF or units.
    folder = tmp_path / "export"
    path = write_jsonl(folder / "table.jsonl", [{"step": s, "loss_0": 2.0, "loss_1": 40.0 - s} for s in range(1, 13)])
    data = eval_json(reference="wavs/ref", synthesized="wavs/synth", failed=0, utterances=2, errors=[],
                     unmatched_reference=["bn_0100.wav"], unmatched_synthesized=[],
                     samples=eval_json()["samples"][:2])
    for key in ("model", "model_step", "backend", "data", "split", "rtf_torch", "rtf_threads", "units"):
        del data[key]
    data["duration_ratio"] = {"mean": None, "median": None, "ci95": None, "n": 0}
    write_eval(folder, data, missing=())
    write_eval(folder / "eval", eval_json(), missing=())
    out = tmp_path / "out"
    md = write_report(str(path), out).read_text()
    assert f"Read from `{folder / 'eval.json'}`." in md
    assert f"{folder / 'eval' / 'eval.json'} also exists and was not used" in md
    assert "WAVs in `wavs/synth` compared with the WAVs of the same name in `wavs/ref`." in md
    assert "1 reference file(s) without a partner, not scored: bn_0100.wav." in md
    assert "Synthesised by" not in md and "Texts and reference recordings" not in md
    assert md_row(md, "duration_ratio") == ["duration_ratio", "ratio", "–", "–", "–", "0"]
    assert md_row(md, "vuv_error")[1] == "fraction"  # no units in eval.json: the report's own
    assert "| rtf_torch |" not in md and "RTF measured" not in md
    assert sorted(p.name for p in (out / "samples").iterdir()) == [
        "bn_0001.ref.wav", "bn_0001.syn.wav", "bn_0002.ref.wav", "bn_0002.syn.wav"]


def test_eval_folder_written_by_vits_ray_evaluate_is_reported(tmp_path):
    # The real producer's files (eval.csv, samples/, eval.json), written where the report looks.
    from vits_ray.evaluate.metrics import MetricSettings
    from vits_ray.evaluate.pipeline import EvalRow, Evaluation, write_evaluation

    run = small_run(tmp_path / "run")
    rows = [EvalRow(id="bn_0001", text="আমার সোনার বাংলা", mcd_dtw_db=10.0, f0_rmse_cents=200.0, vuv_error=0.1,
                    duration_ratio=1.0, rtf_torch=0.3),
            EvalRow(id="bn_0002", text="চিরদিন", mcd_dtw_db=12.0, f0_rmse_cents=300.0, vuv_error=0.2,
                    duration_ratio=1.1, rtf_torch=0.5),
            EvalRow(id="bn_0003", error="bn_0003 synthesized: silent after trimming at 40 dB")]
    about = {"model": str(run / "export"), "model_step": 12, "backend": "torch", "data": "shards/", "split": "val",
             "rtf_threads": 1, "method": MetricSettings().describe()}
    t = np.arange(1600) / 16000
    wave = (0.2 * np.sin(2 * math.pi * 220 * t)).astype(np.float32)
    write_evaluation(Evaluation(rows, about), str(run / "eval"), {"bn_0001": (wave, wave, 16000)})
    out = tmp_path / "out"
    md = write_report(str(run), out).read_text()
    assert md_row(md, "mcd_dtw_db")[:4] == ["mcd_dtw_db", "dB", "11.00", "11.00"]
    assert md_row(md, "mcd_dtw_db")[5] == "2" and md_row(md, "rtf_torch")[2] == "0.400"
    assert "2 utterance(s) scored, 1 failed" in md and "- bn_0003: bn_0003 synthesized: silent" in md
    assert "c0 (energy term) in the MCD: excluded" in md
    assert (out / "samples" / "bn_0001.syn.wav").exists() and (out / "samples" / "bn_0001.ref.wav").exists()
    assert (out / "report.html").read_text().count("<audio controls") == 2
    no_verdicts(out)


def test_damaged_eval_json_is_reported_not_used(tmp_path):
    run = small_run(tmp_path / "run")
    (run / "eval").mkdir()
    (run / "eval" / "eval.json").write_text('{"model": "x", "mcd_dtw_db": {"mean": 1')
    md = write_report(str(run), tmp_path / "out").read_text()
    assert f"Found `{run / 'eval' / 'eval.json'}` but cannot use it: not valid JSON" in md
    assert NO_QUALITY not in md


def test_run_with_neither_still_says_there_is_no_quality_measurement(tmp_path):
    run = small_run(tmp_path / "run")
    write_eval(tmp_path / "elsewhere", eval_json())  # not beside the run: not this run's
    (run / "eval").mkdir()  # an empty eval folder is no evaluation either
    out = tmp_path / "out"
    md = write_report(str(run), out).read_text()
    assert NO_QUALITY in md and "makes no claim about voice quality" in md
    assert not (out / "samples").exists()
    assert json.loads((out / "report.json").read_text())["quality"] == {"records": [], "trend": None,
                                                                       "evaluation": None}


def test_eval_json_on_s3_is_found_and_its_samples_copied(s3_uri, tmp_path):
    from vits_ray.storage import open_store

    local = small_run(tmp_path / "run")
    write_eval(local / "eval", eval_json())
    open_store(s3_uri).upload_dir(local, "")
    out = tmp_path / "out"
    md = write_report(s3_uri, out).read_text()
    assert f"Read from `{s3_uri}/eval/eval.json`." in md
    assert md_row(md, "mcd_dtw_db") == ["mcd_dtw_db", "dB", "12.10", "11.80", "10.20 to 14.00", "2"]
    assert (out / "samples" / "bn_0002.syn.wav").read_bytes() == (
        local / "eval" / "samples" / "bn_0002.syn.wav").read_bytes()
    assert f"missing: {s3_uri}/eval/samples/bn_0003.syn.wav not found" in md
    assert (out / "report.html").read_text().count("<audio controls") == 5
