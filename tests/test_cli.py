"""The `vits-ray` command line: subcommands exist, have help, and call the library."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from vits_ray.cli import main

SUBCOMMANDS = ("config", "text", "demo-corpus", "prepare", "train", "tune", "report", "demo")


def test_help_lists_every_subcommand_and_each_has_help():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in SUBCOMMANDS:
        assert name in result.output
        sub = CliRunner().invoke(main, [name, "--help"])
        assert sub.exit_code == 0 and "Usage:" in sub.output, name


def test_text_prints_normalised_text_and_ids():
    result = CliRunner().invoke(main, ["text", "আমার ১২৩ টাকা"])
    assert result.exit_code == 0, result.output
    assert "একশো তেইশ" in result.output and "token_ids: [" in result.output


def test_text_reports_an_unknown_character():
    result = CliRunner().invoke(main, ["text", "আমার x"])
    assert result.exit_code != 0 and "LATIN SMALL LETTER X" in result.output


def test_prepare_from_the_command_line(demo_corpus_dir, tmp_path):
    out = tmp_path / "shards"
    result = CliRunner().invoke(main, ["prepare", "--input", str(demo_corpus_dir), "--format", "ljspeech",
                                       "--output", str(out), "--config", "tiny", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "accepted" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_utterances"] == 24


def test_train_rejects_a_bad_drill_before_anything_runs(tmp_path):
    result = CliRunner().invoke(main, ["train", "--data", str(tmp_path), "--storage", str(tmp_path),
                                       "--name", "x", "--drill", "boom@1"])
    assert result.exit_code != 0 and "nan@STEP" in result.output


def _job(script: str, *args: str) -> subprocess.CompletedProcess:
    """A `ray job submit` entrypoint, run as the job's driver runs it: `python jobs/<stage>.py ...`."""
    root = Path(__file__).resolve().parent.parent
    return subprocess.run([sys.executable, str(root / "jobs" / script), *args], cwd=root, capture_output=True,
                          text=True, timeout=300)


def test_job_entrypoints_run_the_stages_as_the_cli_does(demo_corpus_dir, tmp_path):
    done = _job("prepare.py", "--input", str(demo_corpus_dir), "--format", "ljspeech",
                "--output", str(tmp_path / "shards"), "--config", "tiny", "--quiet")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "shards" / "manifest.json").exists()
    log = Path(__file__).resolve().parent / "data" / "coqui_trainer_0_log.txt"
    done = _job("report.py", str(log), "--out", str(tmp_path / "report"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "report" / "report.md").exists()


@pytest.mark.parametrize("script,args", [("prepare.py", ["--input", "nowhere", "--format", "ljspeech",
                                                         "--output", "x"]),
                                         ("train.py", ["--data", "x", "--storage", "y"]),
                                         ("tune.py", ["--data", "x", "--storage", "y"]),
                                         ("evaluate.py", ["--out", "x"]),
                                         ("synth.py", ["somewhere", "--out", "x"]),
                                         ("export.py", ["somewhere"])])
def test_job_entrypoints_fail_with_the_clis_message(script, args):
    from click.testing import CliRunner

    done = _job(script, *args)
    cli = CliRunner().invoke(main, [script.removesuffix(".py"), *args])
    assert done.returncode == cli.exit_code == 2
    message = cli.output.strip().splitlines()[-1]  # click names the bad option the same way
    assert message and message in done.stderr, (message, done.stderr)
