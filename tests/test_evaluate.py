"""`vits-ray evaluate` and training-time quality, on a real tiny model trained here and the demo
corpus's held-out split (real shards, real WAVs, real ONNX Runtime)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import librosa
import pytest
import soundfile as sf
from click.testing import CliRunner

from vits_ray.cli import main

pytestmark = pytest.mark.slow

STAT_KEYS = {"mean", "median", "ci95", "n"}


def invoke(*args: str, ok: bool = True):
    result = CliRunner().invoke(main, list(args))
    if ok:
        assert result.exit_code == 0, result.output
    return result


def test_evaluate_a_model_on_the_val_split(trained_run, prepared_demo, tmp_path):
    out = tmp_path / "eval"
    result = invoke("evaluate", str(trained_run), "--data", str(prepared_demo), "--max-utterances", "2",
                    "--out", str(out), "--samples", "1")
    assert "mcd_dtw_db" in result.output and "thread(s)" in result.output
    summary = json.loads((out / "eval.json").read_text())
    for key in ("mcd_dtw_db", "f0_rmse_cents", "vuv_error", "duration_ratio", "rtf_torch", "rtf_onnx"):
        assert STAT_KEYS <= set(summary[key]), key
    assert summary["utterances"] + summary["failed"] == 2 and summary["utterances"] >= 1
    for key in ("mcd_dtw_db", "vuv_error", "duration_ratio", "rtf_torch", "rtf_onnx"):
        assert math.isfinite(summary[key]["mean"]) and summary[key]["mean"] > 0, key
    assert summary["split"] == "val" and summary["model_step"] == 4 and summary["rtf_threads"] >= 1
    assert summary["method"]["cepstrum_order"] == 24 and "c0" in summary["method"]["mcd"]
    rows = list(csv.DictReader((out / "eval.csv").open(encoding="utf-8")))
    assert len(rows) == 2 and all(r["text"] for r in rows)
    # the first two val utterances by id: the same subset for every model and every evaluation
    from vits_ray.data.shards import read_manifest
    from vits_ray.evaluate.heldout import read_held_out
    from vits_ray.storage import open_store

    store = open_store(str(prepared_demo))
    assert [r["id"] for r in rows] == [u.id for u in read_held_out(store, read_manifest(store), "val", 2)]
    (sample,) = summary["samples"]
    for key in ("reference", "synthesized"):
        assert sf.info(str(out / sample[key])).samplerate == 22050


def test_evaluate_without_onnx_and_onto_s3(trained_run, prepared_demo, s3_uri):
    from vits_ray.storage import open_store

    invoke("evaluate", str(trained_run), "--data", str(prepared_demo), "--max-utterances", "1", "--no-onnx",
           "--out", f"{s3_uri}/eval")
    summary = json.loads(open_store(s3_uri).read_bytes("eval/eval.json"))
    assert "rtf_onnx" not in summary and summary["rtf_torch"]["n"] == 1
    assert open_store(s3_uri).exists("eval/eval.csv")


def test_two_folders_of_wavs(demo_corpus_dir, tmp_path):
    reference, candidate = tmp_path / "ref", tmp_path / "syn"
    reference.mkdir(), candidate.mkdir()
    wavs = sorted((demo_corpus_dir / "wavs").glob("*.wav"))[:3]
    for path in wavs:
        audio, rate = sf.read(str(path), dtype="float32")
        sf.write(reference / path.name, audio, rate)
    # the first two as a slower, resampled rendering; the third has no partner; one extra file
    for path in wavs[:2]:
        audio, rate = sf.read(str(path), dtype="float32")
        slower = librosa.effects.time_stretch(audio, rate=0.9)
        sf.write(candidate / path.name, librosa.resample(slower, orig_sr=rate, target_sr=16000), 16000)
    sf.write(candidate / "extra.wav", audio, rate)
    invoke("evaluate", "--reference", str(reference), "--synthesized", str(candidate), "--out", str(tmp_path / "out"))
    summary = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert summary["utterances"] == 2 and summary["failed"] == 0
    assert summary["unmatched_reference"] == [wavs[2].name] and summary["unmatched_synthesized"] == ["extra.wav"]
    assert 1.05 < summary["duration_ratio"]["mean"] < 1.18  # 1 / 0.9, after resampling back to the reference rate
    assert summary["mcd_dtw_db"]["mean"] < 4.0  # the same speech: small after DTW
    assert "rtf_torch" not in summary


def test_evaluate_usage_errors(trained_run, prepared_demo, tmp_path):
    assert "give MODEL and --data" in invoke("evaluate", str(trained_run), "--out", str(tmp_path), ok=False).output
    mixed = invoke("evaluate", str(trained_run), "--reference", str(tmp_path), "--synthesized", str(tmp_path),
                   "--out", str(tmp_path), ok=False)
    assert mixed.exit_code == 2 and "not both" in mixed.output
    no_split = invoke("evaluate", str(trained_run), "--data", str(prepared_demo), "--split", "test", "--out",
                      str(tmp_path / "o"), ok=False)
    assert no_split.exit_code == 1 and "no 'test' split" in no_split.output
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = invoke("evaluate", "--reference", str(empty), "--synthesized", str(empty), "--out", str(tmp_path / "o"),
                     ok=False)
    assert nothing.exit_code == 1 and "no WAV file name is in both" in nothing.output


def test_training_measures_quality_and_keeps_the_best_by_mcd(trained_run):
    from vits_ray.runlog import read_records
    from vits_ray.storage import open_store

    records, _ = read_records(open_store(str(trained_run)))
    quality = [r for r in records if r["kind"] == "quality"]
    assert [q["step"] for q in quality] == [2, 4]
    for q in quality:
        assert q["utterances"] + q["failed"] == 2 and math.isfinite(q["mcd_dtw_db"]) and q["mcd_dtw_db"] > 0
    best = min(quality, key=lambda q: q["mcd_dtw_db"])
    exported = json.loads((trained_run / "export" / "config.json").read_text())
    assert exported["vits_ray"]["step"] == best["step"]  # best/ (and so export/) chosen by MCD, not val loss


def test_quality_setting_needs_a_val_split(demo_corpus_dir, tmp_path):
    from vits_ray.config import load_config
    from vits_ray.data.ingest import prepare_corpus
    from vits_ray.train import TrainJob, TrainSetupError, run_training

    cfg = load_config("tiny", ["data.val_fraction=0", "eval.every_steps=2"])
    prepare_corpus(demo_corpus_dir, "ljspeech", str(tmp_path / "shards"), cfg, progress=False)
    with pytest.raises(TrainSetupError, match="no val split for eval.every_steps"):
        run_training(TrainJob(config=cfg.to_dict(), data_uri=str(tmp_path / "shards"), storage_uri=str(tmp_path),
                              name="q", max_steps=2), local=True)


def test_the_report_shows_the_runs_quality(trained_run, prepared_demo, tmp_path):
    """Training-time quality records and an evaluation beside the run both reach the report."""
    import shutil

    from vits_ray.report import write_report

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    invoke("evaluate", str(run), "--data", str(prepared_demo), "--max-utterances", "1", "--no-onnx",
           "--out", str(run / "eval"))
    md = write_report(str(run), tmp_path / "report").read_text()
    assert "No quality metric" not in md
    assert "MCD" in md and "samples/" in md
    html = (tmp_path / "report" / "report.html").read_text()
    assert "<audio" in html
    assert list((tmp_path / "report" / "samples").glob("*.wav"))
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["quality"]
