"""`make demo`: the whole pipeline on the embedded demo corpus, all local.

demo corpus (espeak-ng Bangla) -> `prepare` into shards -> train the tiny model on local Ray
(two data-parallel workers, measuring its quality on a few val utterances as it goes) -> speak
(`synth`: Bangla WAVs, numerals included) and an ONNX export that passed its parity check ->
`evaluate` on the val split -> report (with its quality section) -> a small learning-rate sweep
(Ray Tune + Optuna + ASHA) continuing the demo run's last checkpoint, with a trial scored as
diverged, stability margin probes and a long-horizon confirmation of the best two, and its report.
Everything lands under one folder so a user can look at each stage's output.
Training includes a blow-up drill (the weights explode five eighths of the way in and Coqui's
forward raises): the run rolls back to its last checkpoint and goes on, and the report shows it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from vits_ray.config import Config, replace

# What the demo model says at the end: sentences of the demo corpus, and one with numerals (spoken
# as words by the front-end). Letters the 40-utterance corpus never used are dropped, and listed.
DEMO_SENTENCES = ("শুভ সকাল!", "আমি ভালো আছি, ধন্যবাদ।", "আমার ১২৩ টাকা লাগবে।")
# The sweep tries the top of its space (jobs/configs/tune_demo.toml) first: the tiny model blows up
# there, so the demo shows a trial scored as diverged. Its confirmation runs 4x the trial horizon
# (the default is 10x) to keep the demo short.
DEMO_EDGE_LR = 0.2
DEMO_CONFIRM_FACTOR = 4


def run_demo(out_dir: Path, config: Config, n: int = 40, max_steps: int = 40, workers: int = 2,
             sweep_trials: int = 4, sweep_steps: int = 12, recipe: str = "tiny", overrides: tuple[str, ...] = ()) -> None:
    """`config` is `recipe` with `overrides`; the sweep's trials rebuild it from those two."""
    from vits_ray.data.ingest import prepare_corpus
    from vits_ray.demo.corpus import write_demo_corpus
    from vits_ray.config import RECIPE_DIR
    from vits_ray.report import write_report, write_sweep_report
    from vits_ray.evaluate import RUN_EVAL_DIR
    from vits_ray.evaluate.pipeline import evaluate_model
    from vits_ray.onnx_export import export_onnx
    from vits_ray.synth import format_summary, speak_lines
    from vits_ray.train import Drill, TrainJob, ensure_ray, run_training
    from vits_ray.tune.sweep import TRIAL_DRIVER_CPUS, SweepJob, run_sweep
    from vits_ray.voice import load_voice

    # One logical CPU more than the cores: the sweep's trials continue the 2-worker run on 2
    # workers, and each trial's driver holds TRIAL_DRIVER_CPUS beside them (logical CPUs only
    # schedule; the cores are shared as ever).
    ensure_ray(num_cpus=max(os.cpu_count() or 1, workers) + math.ceil(TRIAL_DRIVER_CPUS))
    out_dir = out_dir.resolve()
    corpus = out_dir / "corpus"
    shards = out_dir / "shards"
    runs = out_dir / "runs"

    print(f"[demo] 1/7 demo corpus: {n} Bangla utterances -> {corpus}", flush=True)
    write_demo_corpus(corpus, n=n, seed=0)

    print(f"[demo] 2/7 prepare: validated Parquet shards -> {shards}", flush=True)
    summary = prepare_corpus(corpus, "ljspeech", str(shards), config, progress=False)
    print(summary.format_text(), flush=True)

    drills = (Drill("blowup", max_steps * 5 // 8),) if max_steps >= 8 else ()
    quality_every = max(1, max_steps // 4)
    print(f"[demo] 3/7 train: tiny VITS on local Ray, CPU, {workers} data-parallel workers, {max_steps} steps"
          f"{f', a blow-up drill at step {drills[0].step}' if drills else ''}, quality measured every "
          f"{quality_every} steps -> {runs}/demo", flush=True)
    measured = replace(config, eval={"every_steps": quality_every, "utterances": 4})
    job = TrainJob(config=measured.to_dict(), data_uri=str(shards), storage_uri=str(runs), name="demo",
                   max_steps=max_steps, workers=workers, drills=drills)
    outcome = run_training(job)

    speech, onnx_path = out_dir / "speech", f"{outcome.export_uri}/model.onnx"
    print(f"[demo] 4/7 speak: synth -> {speech}; ONNX export with its parity check -> {onnx_path}", flush=True)
    voice = load_voice(outcome.run_uri)
    print(format_summary(speak_lines(voice, list(enumerate(DEMO_SENTENCES, start=1)), speech,
                                     drop_unsupported=True)), flush=True)
    exported = export_onnx(voice, onnx_path)
    print(exported.parity.format_text(), flush=True)

    evaluation_uri = f"{outcome.run_uri}/{RUN_EVAL_DIR}"
    print(f"[demo] 5/7 evaluate: the model against the val split's recordings -> {evaluation_uri}", flush=True)
    evaluation = evaluate_model(outcome.run_uri, str(shards), evaluation_uri, max_utterances=8)
    print(evaluation.format_text(), flush=True)

    report_dir = out_dir / "report"
    print(f"[demo] 6/7 report -> {report_dir}", flush=True)
    report_path = write_report(outcome.run_uri, report_dir)

    sweeps = out_dir / "sweeps"
    confirm_steps = DEMO_CONFIRM_FACTOR * sweep_steps
    print(f"[demo] 7/7 sweep: {sweep_trials} trials of the generator learning rate continuing {outcome.run_uri} "
          f"at its last checkpoint, {sweep_steps} steps each (the recipe's {config.optim.lr_gen:g} and the space's "
          f"top, {DEMO_EDGE_LR:g}, first), margin probes at each rung, then the best two confirmed over "
          f"{confirm_steps} steps -> {sweeps}/lr", flush=True)
    # A trial whose model blew up fails the same way after a restart: no retries in the demo. Two
    # probe steps (the default is 3) keep the demo short.
    sweep = run_sweep(SweepJob(recipe=recipe, overrides=(*overrides, "train.max_failures=0", "tune.margin_steps=2"),
                               space_path=str(RECIPE_DIR / "tune_demo.toml"), data_uri=str(shards),
                               storage_uri=str(sweeps), name="lr", trials=sweep_trials, max_steps=sweep_steps,
                               grace_steps=max(1, sweep_steps // 2), workers=workers, from_run=outcome.run_uri,
                               confirm_top=2, confirm_steps=confirm_steps,
                               first_points=({"optim.lr_gen": config.optim.lr_gen}, {"optim.lr_gen": DEMO_EDGE_LR})))
    print(f"[demo] sweep: {sweep.why}", flush=True)
    sweep_report = write_sweep_report(sweep.sweep_uri, out_dir / "sweep-report")
    print(f"[demo] done.\n  shards:  {shards}\n  run:     {outcome.run_uri}\n  export:  {outcome.export_uri}"
          f"\n  speech:  {speech}\n  onnx:    {exported.uri}\n  eval:    {evaluation_uri}/eval.json"
          f"\n  report:  {report_path}\n  sweep:   {sweep.sweep_uri} (best recipe: best.toml)"
          f"\n  sweep report: {sweep_report}", flush=True)
