"""The `vits-ray` command line: parse arguments, call the library, print the result.

Heavy imports (torch, ray, Coqui) happen inside each command so `--help` stays fast.
"""

from __future__ import annotations

import collections
from pathlib import Path

import click

from vits_ray.config import ConfigError, load_config

CONFIG_HELP = "Recipe TOML file, or the name of a bundled recipe (bn_bd_vits, tiny)."
SET_HELP = "Override one key, e.g. --set optim.lr_gen=1e-4 (repeatable)."


def config_options(default: str | None = "bn_bd_vits"):
    def decorate(fn):
        fn = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help=SET_HELP)(fn)
        fn = click.option("--config", "config_path", default=default, show_default=True, help=CONFIG_HELP)(fn)
        return fn
    return decorate


def load_or_exit(config_path, overrides):
    try:
        return load_config(config_path, overrides)
    except ConfigError as err:
        raise click.UsageError(f"bad configuration: {err}") from err


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vits-ray")
def main() -> None:
    """Fine-tune Coqui TTS's VITS on Bangladeshi Bangla speech with Ray Train, Ray Tune and S3."""


# --- config -------------------------------------------------------------------------------

@main.group()
def config() -> None:
    """Inspect configurations."""


@config.command("show")
@config_options()
def config_show(config_path, overrides) -> None:
    """Print the resolved configuration as TOML."""
    click.echo(load_or_exit(config_path, overrides).to_toml())


# --- text and demo corpus -----------------------------------------------------------------

@main.command()
@click.argument("text")
@click.option("--vocab", "vocab_path", type=click.Path(exists=True, dir_okay=False),
              help="vocab.json saved with a corpus or a run; default: the full Bangla character set.")
def text(text, vocab_path) -> None:
    """Print the normalised form of TEXT and its token ids."""
    from vits_ray.text import UnsupportedCharactersError, Vocabulary, normalize_text

    normalized = normalize_text(text)
    vocab = Vocabulary.load(vocab_path) if vocab_path else Vocabulary.full_bangla()
    click.echo(f"normalized: {normalized}")
    try:
        click.echo(f"token_ids: {vocab.encode(normalized)}")
    except UnsupportedCharactersError as err:
        raise click.ClickException(str(err)) from err


@main.command("demo-corpus")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--n", "count", default=40, show_default=True, help="Number of utterances.")
@click.option("--seed", default=0, show_default=True, help="Chooses and orders the sentences.")
def demo_corpus(out_dir, count, seed) -> None:
    """Write a small Bangla speech corpus (LJSpeech layout) synthesised with espeak-ng."""
    from vits_ray.demo.corpus import write_demo_corpus

    path = write_demo_corpus(Path(out_dir), n=count, seed=seed)
    click.echo(f"wrote {count} utterances to {path}")


# --- data -------------------------------------------------------------------------------

@main.command()
@click.option("--input", "input_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Corpus folder.")
@click.option("--format", "fmt", required=True, type=click.Choice(["ljspeech", "slr37"]), help="Corpus layout.")
@click.option("--output", "output_uri", required=True, help="Local folder or s3://bucket/prefix.")
@config_options()
@click.option("--quiet", is_flag=True, help="No progress bar.")
def prepare(input_dir, fmt, output_uri, config_path, overrides, quiet) -> None:
    """Validate and normalise a corpus into Parquet shards and a manifest."""
    from vits_ray.data.ingest import prepare_corpus

    cfg = load_or_exit(config_path, overrides)
    summary = prepare_corpus(Path(input_dir), fmt, output_uri, cfg, progress=not quiet)
    click.echo(summary.format_text())
    if summary.accepted == 0:
        raise click.ClickException("no utterance was accepted; nothing to train on")


# --- training -----------------------------------------------------------------------------

def build_job(config_path, overrides, data, storage, name, workers, gpu, max_steps, init_from, drills,
              cpus_per_worker=1, from_run=None):
    from vits_ray.config import replace
    from vits_ray.continuation import ContinuationError, resolve
    from vits_ray.train import Drill, TrainJob, TrainSetupError

    cfg = load_or_exit(config_path, overrides)
    try:
        parsed = tuple(Drill.parse(d) for d in drills)
    except TrainSetupError as err:
        raise click.UsageError(str(err)) from err
    point = None
    if from_run:
        if init_from:
            raise click.UsageError("--from-run and --init-from: give one (a run's whole state, or weights only)")
        try:
            point = resolve(from_run, cfg.storage)
        except ContinuationError as err:
            raise click.ClickException(str(err)) from err
        cfg = replace(cfg, **point.schedule_overrides())
    return TrainJob(config=cfg.to_dict(), data_uri=data, storage_uri=storage, name=name, workers=workers,
                    use_gpu=gpu, max_steps=max_steps, init_from=init_from or "", drills=parsed,
                    cpus_per_worker=cpus_per_worker, from_run=point.as_dict() if point else None)


@main.command()
@config_options()
@click.option("--data", required=True, help="A `prepare` output: local folder or s3:// URI.")
@click.option("--storage", required=True, help="Where runs live: local folder or s3://bucket/prefix.")
@click.option("--name", required=True, help="Run name; launching again with the same name resumes.")
@click.option("--workers", default=1, show_default=True, help="Ray Train workers (one per GPU).")
@click.option("--gpu/--cpu", default=False, show_default=True, help="Train on GPUs or CPUs.")
@click.option("--max-steps", default=0, show_default=True, help="Stop at this global step (0: train.epochs).")
@click.option("--init-from", default=None, help="Coqui checkpoint folder (model.pth + config.json) to warm start from.")
@click.option("--from-run", default=None, metavar="STORAGE/RUN[@STEP]",
              help="Start from another run's checkpoint (its newest, or the one at STEP): weights, optimizer "
                   "moments, step, data position and guard history, with this run's settings; the schedule "
                   "starts there (e.g. a sweep's best.toml).")
@click.option("--drill", "drills", multiple=True,
              metavar="nan@STEP|spike@STEP|blowup@STEP|diverge@STEP|overflow@STEP",
              help="Rehearse the stability guard: poison a batch, spike the learning rate, blow up "
                   "the weights so that the next forward pass raises, keep the learning rate far "
                   "too high from STEP on (the rollback budget ends the run), or (fp16) make rank 0's "
                   "gradients overflow at STEP (repeat it to collapse the GradScaler's scale).")
@click.option("--cpus-per-worker", default=1, show_default=True, help="CPU cores (and torch threads) per worker.")
@click.option("--local", is_flag=True,
              help="One worker in this process, without Ray (a laptop or one GPU; starts ~10 s sooner).")
def train(config_path, overrides, data, storage, name, workers, gpu, max_steps, init_from, from_run, drills,
          cpus_per_worker, local) -> None:
    """Train Coqui's VITS with Ray Train (or in this process with --local); resume if the run exists."""
    from vits_ray.recovery import RunAbortedError
    from vits_ray.train import TrainSetupError, run_training

    job = build_job(config_path, overrides, data, storage, name, workers, gpu, max_steps, init_from, drills,
                    cpus_per_worker, from_run)
    try:
        outcome = run_training(job, local=local)
    except (TrainSetupError, RunAbortedError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"run: {outcome.run_uri} (step {outcome.step})\nexport: {outcome.export_uri}")


# --- tune ---------------------------------------------------------------------------------

@main.command()
@config_options()
@click.option("--data", required=True, help="A `prepare` output: local folder or s3:// URI.")
@click.option("--storage", required=True, help="Where sweeps live: local folder or s3://bucket/prefix.")
@click.option("--name", required=True, help="Sweep name; launching again with the same name resumes it.")
@click.option("--space", "space_path", default=None,
              help="Search space TOML (default: the bundled jobs/configs/tune_lr.toml).")
@click.option("--trials", default=8, show_default=True, help="Trials Optuna proposes.")
@click.option("--concurrent", default=1, show_default=True, help="Trials at once (what the cluster holds).")
@click.option("--max-steps", default=200, show_default=True, help="Steps of a trial that ASHA does not stop.")
@click.option("--workers", default=1, show_default=True, help="Ray Train workers per trial.")
@click.option("--gpu/--cpu", default=False, show_default=True, help="Train on GPUs or CPUs.")
@click.option("--cpus-per-worker", default=1, show_default=True, help="CPU cores (and torch threads) per trial worker.")
@click.option("--from-run", default=None, metavar="STORAGE/RUN[@STEP]",
              help="Continuation sweep: every trial starts from this run's checkpoint (its newest, or the one at "
                   "STEP) - weights, optimizer moments, step, data position, guard history - and applies its "
                   "schedule from there. --max-steps and --confirm-steps count the trial's own steps.")
@click.option("--init-from", default=None, help="Every trial warm-starts from this Coqui checkpoint folder or export.")
@click.option("--confirm-top", default=2, show_default=True,
              help="The best clean trials with their stability margin continued to --confirm-steps (0: no "
                   "confirmation; best.toml is then the lowest search score).")
@click.option("--confirm-steps", default=0, show_default=True,
              help="A confirmed trial's own steps in all (0: 10 x --max-steps).")
@click.option("--confirm-drill", default="", metavar="KIND@N",
              help="Rehearsal: a drill (spike, nan, blowup, diverge) N steps into the search-best trial's confirmation.")
def tune(config_path, overrides, data, storage, name, space_path, trials, concurrent, max_steps, workers, gpu,
         cpus_per_worker, from_run, init_from, confirm_top, confirm_steps, confirm_drill) -> None:
    """Search learning-rate schedules with Ray Tune + Optuna, scored for stability as well as loss, then
    confirm the best over a longer horizon. Fine-tuning? Give --from-run (or --init-from): a schedule tuned
    from random weights says little about continuing a converged model."""
    from vits_ray.config import RECIPE_DIR
    from vits_ray.recovery import RunAbortedError
    from vits_ray.train import TrainSetupError
    from vits_ray.continuation import ContinuationError
    from vits_ray.train import Drill
    from vits_ray.tune.space import SpaceError
    from vits_ray.tune.sweep import BEST_FILE, TRIALS_FILE, SweepFailedError, SweepJob, run_sweep

    load_or_exit(config_path, overrides)
    if confirm_drill:
        try:
            Drill.parse(confirm_drill)
        except TrainSetupError as err:
            raise click.UsageError(f"--confirm-drill: {err}") from err
    if not (from_run or init_from):
        click.echo("note: trials start from random weights; to tune a fine-tune, give --from-run STORAGE/RUN "
                   "(or --init-from MODEL)", err=True)
    sweep = SweepJob(recipe=config_path, overrides=tuple(overrides), space_path=space_path or str(RECIPE_DIR / "tune_lr.toml"),
                     data_uri=data, storage_uri=storage, name=name, trials=trials, concurrent=concurrent,
                     max_steps=max_steps, workers=workers, use_gpu=gpu, cpus_per_worker=cpus_per_worker,
                     from_run=from_run or "", init_from=init_from or "", confirm_top=confirm_top,
                     confirm_steps=confirm_steps, confirm_drill=confirm_drill)
    try:
        outcome = run_sweep(sweep)
    except (SpaceError, TrainSetupError, RunAbortedError, SweepFailedError, ContinuationError) as err:
        raise click.ClickException(str(err)) from err
    done = collections.Counter(r["status"] for r in outcome.rows)
    click.echo(f"sweep: {outcome.sweep_uri} ({', '.join(f'{n} {s}' for s, n in sorted(done.items()))})")
    click.echo(f"trials: {outcome.sweep_uri}/{TRIALS_FILE}")
    if outcome.best is not None:
        click.echo(f"best: trial {outcome.best['trial_id']}, search score {outcome.best['score']:.4g} -> "
                   f"{outcome.sweep_uri}/{BEST_FILE}")
    if outcome.why:
        click.echo(f"why: {outcome.why}" if outcome.best is not None else f"no best.toml: {outcome.why}")


# --- report -------------------------------------------------------------------------------

@main.command()
@click.argument("run")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Report folder.")
def report(run, out_dir) -> None:
    """Analyse a run (STORAGE/NAME, a metrics.jsonl or a Coqui trainer log) into report.md/html and plots,
    or a sweep (STORAGE/SWEEP, the folder holding trials.csv) into sweep.md/html and plots."""
    from vits_ray.report import ReportError, write_report, write_sweep_report
    from vits_ray.report.sweep import is_sweep

    try:
        path = (write_sweep_report if is_sweep(run) else write_report)(run, Path(out_dir))
    except ReportError as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"report: {path}")


# --- speaking and exporting ---------------------------------------------------------------

@main.command()
@click.argument("model")
@click.option("--text", "texts", multiple=True, help="A sentence to speak (repeatable).")
@click.option("--file", "text_file", type=click.Path(exists=True, dir_okay=False), help="UTF-8 text, a sentence per line.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for the WAVs.")
@click.option("--speed", default=1.0, show_default=True, help="Speaking rate (> 1 faster).")
@click.option("--noise-scale", default=0.667, show_default=True, help="Latent noise (0: deterministic).")
@click.option("--noise-scale-dp", default=1.0, show_default=True, help="Duration predictor noise (0: deterministic).")
@click.option("--onnx", is_flag=True, help="Run the model with ONNX Runtime (an export folder is exported on the fly).")
@click.option("--drop-unsupported", is_flag=True,
              help="Leave out characters the model has no token for (listed), instead of failing.")
@click.option("--threads", default=0, help="CPU threads (0: torch's default).")
@click.option("--seed", default=0, show_default=True, help="Seeds the noise (PyTorch only).")
def synth(model, texts, text_file, out_dir, speed, noise_scale, noise_scale_dp, onnx, drop_unsupported, threads,
          seed) -> None:
    """Speak Bangla text with a trained model: 16-bit WAVs at its rate, and the real-time factor.

    Text goes through the same normalisation and vocabulary as training, so numerals are spoken.
    """
    from vits_ray.synth import format_summary, read_text_file, speak_lines
    from vits_ray.voice import Scales, VoiceError, load_voice

    if bool(texts) == bool(text_file):
        raise click.UsageError("give either --text (repeatable) or --file")
    try:
        lines = read_text_file(Path(text_file)) if text_file else list(enumerate(texts, start=1))
        scales = Scales.for_speed(speed, noise_scale, noise_scale_dp)
        voice = load_voice(model, onnx=onnx, threads=threads or None)
        for warning in voice.warnings:
            click.echo(f"warning: {warning}", err=True)
        summary = speak_lines(voice, lines, Path(out_dir), scales, drop_unsupported, seed,
                              origin=text_file or "--text")
    except VoiceError as err:
        raise click.ClickException(str(err)) from err
    click.echo(format_summary(summary))


@main.command("export")
@click.argument("model")
@click.option("--onnx", "onnx_out", required=True, help="Output .onnx file (local or s3://); a .onnx.json sidecar goes beside it.")
def export_cmd(model, onnx_out) -> None:
    """Export a trained model's generator to ONNX, checked against PyTorch before it is written."""
    from vits_ray.onnx_export import ParityError, export_onnx
    from vits_ray.voice import TorchVoice, VoiceError, load_voice

    try:
        voice = load_voice(model)
        if not isinstance(voice, TorchVoice):
            raise VoiceError(f"{model} is already an ONNX file; export from a run or an export folder")
        result = export_onnx(voice, onnx_out)
    except (VoiceError, ParityError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(result.parity.format_text())
    click.echo(f"onnx: {result.uri} ({result.size_bytes / 1e6:.1f} MB, exported in {result.export_seconds:.1f} s)\n"
               f"sidecar: {result.sidecar_uri}")


@main.command()
@click.argument("model", required=False)
@click.option("--data", default=None, help="A `prepare` output whose held-out split is spoken and compared.")
@click.option("--split", default="val", show_default=True, help="Which split of --data.")
@click.option("--max-utterances", default=50, show_default=True, help="The first N of the split, by id (0: all).")
@click.option("--reference", "reference_dir", type=click.Path(exists=True, file_okay=False),
              help="Instead of MODEL: a folder of reference WAVs ...")
@click.option("--synthesized", "synthesized_dir", type=click.Path(exists=True, file_okay=False),
              help="... and a folder of WAVs to score against them, matched by file name.")
@click.option("--out", "out_dir", required=True, help="Output folder (local or s3://): eval.csv, eval.json, samples/.")
@click.option("--onnx/--no-onnx", default=True, show_default=True,
              help="Also time ONNX Runtime on a parity-checked export of MODEL.")
@click.option("--threads", default=0, help="CPU threads for synthesis (0: torch's default).")
@click.option("--samples", default=3, show_default=True, help="Synthesised/reference WAV pairs kept in samples/.")
def evaluate(model, data, split, max_utterances, reference_dir, synthesized_dir, out_dir, onnx, threads, samples) -> None:
    """Objective quality: MCD-DTW, log-F0 RMSE, voicing error, duration ratio and real-time factor.

    Either MODEL --data SHARDS (the model speaks each held-out utterance's text, compared with its
    recording) or --reference DIR --synthesized DIR (any system's WAVs against recordings).
    """
    from vits_ray.evaluate.pipeline import EvaluationError, evaluate_folders, evaluate_model
    from vits_ray.onnx_export import ParityError
    from vits_ray.voice import VoiceError

    folders = bool(reference_dir or synthesized_dir)
    if folders and (model or data):
        raise click.UsageError("give MODEL --data, or --reference and --synthesized, not both")
    if folders and not (reference_dir and synthesized_dir):
        raise click.UsageError("--reference and --synthesized go together")
    if not folders and not (model and data):
        raise click.UsageError("give MODEL and --data SHARDS (or --reference DIR --synthesized DIR)")
    try:
        if folders:
            evaluation = evaluate_folders(Path(reference_dir), Path(synthesized_dir), out_dir, samples)
        else:
            evaluation = evaluate_model(model, data, out_dir, split, max_utterances, onnx, threads, samples,
                                        progress=click.echo)
    except (EvaluationError, VoiceError, ParityError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(evaluation.format_text())
    click.echo(f"eval: {out_dir.rstrip('/')}/eval.json")


# --- the demo -----------------------------------------------------------------------------

@main.command()
@click.option("--out", "out_dir", default="demo-run", show_default=True, type=click.Path(file_okay=False))
@click.option("--config", "config_path", default="tiny", show_default=True, help=CONFIG_HELP)
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help=SET_HELP)
@click.option("--n", "count", default=40, show_default=True, help="Demo corpus size.")
@click.option("--max-steps", default=40, show_default=True, help="Training steps.")
@click.option("--workers", default=2, show_default=True, help="Data-parallel training workers (CPU).")
@click.option("--sweep-trials", default=4, show_default=True, help="Trials of the closing learning-rate sweep.")
@click.option("--sweep-steps", default=12, show_default=True, help="Steps of a sweep trial that ASHA does not stop.")
def demo(out_dir, config_path, overrides, count, max_steps, workers, sweep_trials, sweep_steps) -> None:
    """The whole pipeline on the embedded demo corpus: corpus -> shards -> training -> report -> sweep."""
    from vits_ray.demo.pipeline import run_demo

    run_demo(Path(out_dir), load_or_exit(config_path, overrides), n=count, max_steps=max_steps, workers=workers,
             sweep_trials=sweep_trials, sweep_steps=sweep_steps, recipe=config_path, overrides=tuple(overrides))
