"""Speaking with a trained model: `vits-ray synth` and `vits-ray export --onnx`, on a real tiny model
trained here, through PyTorch and ONNX Runtime, from local folders and from a real S3 server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from vits_ray.cli import main
from vits_ray.text import normalize_text

pytestmark = pytest.mark.slow


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def onnx_file(trained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "voice.onnx"
    result = invoke("export", str(trained_run), "--onnx", str(out))
    assert result.exit_code == 0, result.output
    assert "ONNX parity (passed)" in result.output
    return out


def test_synth_speaks_numerals_through_the_training_front_end(trained_run, tmp_path):
    from vits_ray.voice import load_voice

    result = invoke("synth", str(trained_run), "--text", "আমার ১২৩ টাকা", "--text", "কেমন আছেন?",
                    "--out", str(tmp_path / "wavs"))
    assert result.exit_code == 0, result.output
    assert "real-time factor" in result.output
    summary = json.loads((tmp_path / "wavs" / "synth.json").read_text())
    assert [line["file"] for line in summary["lines"]] == ["0001.wav", "0002.wav"]
    assert "একশো তেইশ" in summary["lines"][0]["normalized"]
    info = sf.info(str(tmp_path / "wavs" / "0001.wav"))
    assert info.samplerate == 22050 and info.subtype == "PCM_16" and info.frames > 1000
    # the token ids carry the spelled-out number, as the training text would
    voice = load_voice(str(trained_run))
    ids = voice.prepare("আমার ১২৩ টাকা").token_ids
    number = voice.vocab.encode("একশো তেইশ")[1:-1]  # without the blanks at either end
    assert any(ids[i:i + len(number)] == number for i in range(len(ids))), "numerals were not spelled out"
    assert voice.prepare("আমার ১২৩ টাকা").normalized == normalize_text("আমার ১২৩ টাকা")


def test_unsupported_characters_are_refused_or_listed(trained_run, tmp_path):
    refused = CliRunner().invoke(main, ["synth", str(trained_run), "--text", "hello আমার", "--out", str(tmp_path / "a")])
    assert refused.exit_code == 1
    assert "--text line 1" in refused.output and "LATIN SMALL LETTER H" in refused.output
    assert not (tmp_path / "a" / "0001.wav").exists()  # nothing spoken before every line was checked
    dropped = invoke("synth", str(trained_run), "--text", "hello আমার", "--out", str(tmp_path / "b"),
                     "--drop-unsupported")
    assert dropped.exit_code == 0, dropped.output
    line = json.loads((tmp_path / "b" / "synth.json").read_text())["lines"][0]
    assert line["normalized"] == "আমার" and len(line["dropped"]) == 5 and "LATIN SMALL LETTER O" in line["dropped"][-1]


def test_synth_from_a_text_file_names_the_bad_line(trained_run, tmp_path):
    text = tmp_path / "lines.txt"
    text.write_text("শুভ সকাল!\n\nকেমন আছেন?\nসকাল ৯টা 😀\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["synth", str(trained_run), "--file", str(text), "--out", str(tmp_path / "w")])
    assert result.exit_code == 1 and f"{text} line 4" in result.output and "GRINNING FACE" in result.output


def test_onnx_export_carries_what_a_consumer_needs_and_matches_torch(trained_run, onnx_file):
    import onnxruntime as ort

    from vits_ray.voice import DETERMINISTIC, load_voice

    sidecar = json.loads(Path(str(onnx_file) + ".json").read_text())
    assert sidecar["parity"]["passed"] and len(sidecar["parity"]["cases"]) >= 3
    assert all(c["samples_torch"] == c["samples_onnx"] for c in sidecar["parity"]["cases"])
    meta = ort.InferenceSession(str(onnx_file)).get_modelmeta().custom_metadata_map
    assert meta["vits_ray.sample_rate"] == "22050" and meta["vits_ray.normalizer_version"] == "1"
    vocab = json.loads(meta["vits_ray.vocabulary"])
    assert vocab == json.loads((trained_run / "export" / "vocab.json").read_text())
    # a lone .onnx file speaks, and agrees with PyTorch with the noise off
    torch_voice, onnx_voice = load_voice(str(trained_run)), load_voice(str(onnx_file))
    ids = torch_voice.prepare("আমি ভালো আছি").token_ids
    a, b = torch_voice.synthesize(ids, DETERMINISTIC), onnx_voice.synthesize(ids, DETERMINISTIC)
    assert a.shape == b.shape and np.abs(a - b).max() < 1e-3


def test_synth_with_onnx_runtime(trained_run, onnx_file, tmp_path):
    for model, extra in ((str(onnx_file), []), (str(trained_run), ["--onnx"])):  # a file; a run exported on the fly
        out = tmp_path / Path(model).name
        result = invoke("synth", model, "--text", "শুভ সকাল!", "--out", str(out), *extra)
        assert result.exit_code == 0, result.output
        assert json.loads((out / "synth.json").read_text())["voice"]["backend"] == "onnx"
        assert sf.info(str(out / "0001.wav")).frames > 1000


def test_failed_parity_writes_nothing_and_keeps_the_old_file(trained_run, onnx_file, tmp_path):
    """A model left in training mode (dropout on) cannot match its eval-mode export: parity catches it."""
    from vits_ray.onnx_export import ParityError, export_onnx
    from vits_ray.voice import load_voice

    target = tmp_path / "model.onnx"
    target.write_bytes(onnx_file.read_bytes())
    before = target.read_bytes()
    voice = load_voice(str(trained_run))
    voice.model.train()
    with pytest.raises(ParityError, match="does not match PyTorch; nothing was written") as err:
        export_onnx(voice, str(target))
    assert "FAIL" in str(err.value)
    assert target.read_bytes() == before and not Path(str(target) + ".json").exists()


def test_synth_and_export_from_s3(trained_run, s3_uri, tmp_path):
    from vits_ray.storage import open_store

    open_store(s3_uri).upload_dir(trained_run / "export", "run/export")
    result = invoke("synth", f"{s3_uri}/run", "--text", "শুভ সকাল!", "--out", str(tmp_path / "s3wav"))
    assert result.exit_code == 0, result.output
    exported = invoke("export", f"{s3_uri}/run/export", "--onnx", f"{s3_uri}/voices/v1.onnx")
    assert exported.exit_code == 0, exported.output
    assert open_store(s3_uri).exists("voices/v1.onnx") and open_store(s3_uri).exists("voices/v1.onnx.json")
    spoken = invoke("synth", f"{s3_uri}/voices/v1.onnx", "--text", "শুভ সকাল!", "--out", str(tmp_path / "s3onnx"))
    assert spoken.exit_code == 0, spoken.output


def test_bad_model_paths_fail_clearly(tmp_path):
    missing = CliRunner().invoke(main, ["synth", str(tmp_path), "--text", "শুভ", "--out", str(tmp_path / "o")])
    assert missing.exit_code == 1 and "neither model.pth nor export/model.pth" in missing.output
    (tmp_path / "x.onnx").write_bytes(b"not onnx")
    bad = CliRunner().invoke(main, ["synth", str(tmp_path / "x.onnx"), "--text", "শুভ", "--out", str(tmp_path / "o")])
    assert bad.exit_code == 1 and "not a loadable ONNX model" in bad.output
    both = CliRunner().invoke(main, ["synth", str(tmp_path), "--out", str(tmp_path / "o")])
    assert both.exit_code == 2 and "either --text" in both.output


def test_export_config_states_how_text_is_prepared(trained_run):
    config = json.loads((trained_run / "export" / "config.json").read_text(encoding="utf-8"))
    assert "vits-ray synth" in config["vits_ray"]["text_preparation"]
    assert config["vits_ray"]["normalizer_version"] == 1 and config["text_cleaner"] is None


def test_job_entrypoints_speak_export_and_evaluate(trained_run, prepared_demo, tmp_path):
    """`ray job submit -- python jobs/{synth,export,evaluate}.py ...`, run as a job's driver runs them."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent

    def job(script: str, *args: str) -> None:
        done = subprocess.run([sys.executable, str(root / "jobs" / script), *args], cwd=root, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]

    job("synth.py", str(trained_run), "--text", "শুভ সকাল!", "--out", str(tmp_path / "speech"))
    job("export.py", str(trained_run), "--onnx", str(tmp_path / "v.onnx"))
    job("evaluate.py", str(tmp_path / "v.onnx"), "--data", str(prepared_demo), "--max-utterances", "1",
        "--out", str(tmp_path / "eval"))
    assert (tmp_path / "speech" / "0001.wav").exists() and (tmp_path / "v.onnx.json").exists()
    summary = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert summary["backend"] == "onnx" and summary["rtf_onnx"]["n"] == 1 and "rtf_torch" not in summary
