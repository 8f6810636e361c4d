"""A sweep's cost: per-trial overhead, and the compute ASHA saved.

    .venv/bin/python bench/bench_tune.py [--trials 8] [--concurrent 1] [--max-steps 12] [--grace 3]
                                         [--n 24] [--set KEY=VALUE ...] [--markdown]

Writes an `--n`-utterance demo corpus, prepares it with the tiny recipe (8 rows per shard) and runs
`run_sweep` on it (local storage in a temp folder, a local Ray cluster, one CPU worker per trial)
over `optim.lr_gen` log-uniform in [1e-4, 0.9]: 1e-4..1e-3 trains the tiny model cleanly, 0.5 and
up blows it up within a few steps, so ASHA has trials to stop. Optuna is seeded by the recipe's
seed, so the same arguments sample the same learning rates.

Times (all wall clock, `time.time()` of this machine, so the driver's and the workers' stamps
compare):
- Ray start: `ensure_ray`, called here before `run_sweep` (which then finds the cluster up), so
  that the once-per-driver cluster start is kept out of the sweep's figures.
- Sweep wall: the `run_sweep` call (preflight, Tune's set-up, the trials, trials.csv/best.toml).
- Trial wall: from Tune's `on_trial_start` (the trial's actor is up) to its `on_trial_complete` or
  `on_trial_error` (Tune has the trial's last result, or ASHA has decided to stop it), as seen by a
  callback in the driver (a Tune callback passed to `run_sweep`). It covers the Ray Train run
  the trial builds: its controller and worker start, the model build, the steps, checkpoints, the
  final export and the run winding down; for a stopped trial, up to the report that stopped it.
- Step time: the sum of the `step_time` of the trial's step records (`read_records`: rolled-back
  steps included, as they ran; steps a restart recomputes counted once). A step's time is its
  loader wait plus `train_step`.
- Overhead = trial wall - step time, split by the step records' `time` stamps (stamped at the end
  of each step): *start* (trial start to the first step's start, `time - step_time`), *in loop*
  (between the first step's start and the last step's end, less the step times: syncs, records,
  reports to Tune, checkpoints, validation) and *end* (the last step's end to the trial's end).
- Outside trials: sweep wall minus the time at least one trial was running, split into before the
  first trial, between trials and after the last.

ASHA's saving: steps run / (trials x max_steps), a trial's steps run being the highest step its
records or its last report to Tune reached; compute saved is the complement. In time, the steps it
cut are priced at each trial's mean step time, against the sweep's wall (a stopped trial also
skips its final checkpoint and export, not counted). ASHA hears from a trial only when it reports:
at its checkpoints (in the tiny recipe every 10 steps, every 4 after a stability event, none while
the guard is wary, and the last step) and at epoch ends (about every 6 steps on 24 utterances), so
it judges a trial at the highest rung its report has reached, skipping rungs it passed unheard. Tune's own `time_total_s` (the trainable's clock up to its last report, in the trial folder's
result.json) is printed next to the trial wall as a cross-check.

It prints figures and asserts nothing; times on a shared 2-core machine are noisy. The temp
folder is kept (its path is printed), with the raw figures in timings.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LR_KEY = "optim.lr_gen"
SPACE_TOML = f"""
# 1e-4..1e-3 trains the tiny model cleanly; 0.5 and up blows it up within a few steps.
[parameters."{LR_KEY}"]
distribution = "log_uniform_values"
min = 1e-4
max = 0.9
"""
SWEEP_NAME = "bench"


@dataclass
class TrialTimes:
    trial_id: str
    lr: float
    status: str
    max_steps: int
    steps_run: int  # the highest step reached, by the records or by the last report to Tune
    records_end: int  # the highest step in the records (behind steps_run: records not all written)
    step_records: int  # rolled-back steps included
    wall: float | None  # Tune's trial start to its end
    tune_total: float | None  # Tune's time_total_s at the trial's last report
    step_time: float | None = None
    start: float | None = None  # Tune's trial start to the first step's start
    in_loop: float | None = None  # first step's start to last step's end, less the step times
    end: float | None = None  # last step's end to Tune's trial end

    @property
    def unrun_step_seconds(self) -> float:
        """What the steps ASHA cut would have cost at this trial's mean step time."""
        if not self.step_time or not self.step_records:
            return 0.0
        return max(0, self.max_steps - self.steps_run) * self.step_time / self.step_records

    @property
    def overhead(self) -> float | None:
        return None if self.wall is None or self.step_time is None else self.wall - self.step_time


class TrialClock:
    """Driver-side times of each trial's start and end, as Tune's callbacks see them."""

    def __init__(self):
        self.started: dict[str, float] = {}
        self.ended: dict[str, float] = {}


def trial_clock_callback(clock: TrialClock):
    """A Tune callback that stamps each trial's start and end in the driver: what Tune calls a trial."""
    import ray.tune

    class ClockTrials(ray.tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            clock.started.setdefault(trial.trial_id, time.time())  # a restarted trial keeps its first start

        def on_trial_complete(self, iteration, trials, trial, **info):
            clock.ended[trial.trial_id] = time.time()

        on_trial_error = on_trial_complete

    return ClockTrials()


def prepare_demo(root: Path, n: int) -> Path:
    from vits_ray.config import load_config
    from vits_ray.data.ingest import prepare_corpus
    from vits_ray.demo.corpus import write_demo_corpus

    corpus = write_demo_corpus(root / "corpus", n=n, seed=0)
    shards = root / "shards"
    prepare_corpus(corpus, "ljspeech", str(shards), load_config("tiny", ["data.rows_per_shard=8"]), progress=False)
    return shards


def step_records(run_store) -> list[dict]:
    from vits_ray.runlog import read_records

    metrics, _ = read_records(run_store)
    return [r for r in metrics if r.get("kind") == "step"]


def tune_total_seconds(sweep_dir: Path, trial_id: str) -> float | None:
    """Tune's `time_total_s` at the trial's last report, from its trial folder's result.json."""
    for result_file in sweep_dir.glob(f"*{trial_id}*/result.json"):
        lines = [line for line in result_file.read_text().splitlines() if line.strip()]
        if lines:
            return float(json.loads(lines[-1])["time_total_s"])
    return None


def reported_step(row: dict) -> int:
    """The step of the trial's last report to Tune (NaN for a trial that never reported)."""
    try:
        return int(row.get("steps"))
    except (TypeError, ValueError):
        return 0


def trial_times(row: dict, records: list[dict], clock: TrialClock, tune_total: float | None,
                max_steps: int) -> TrialTimes:
    trial_id = row["trial_id"]
    began, ended = clock.started.get(trial_id), clock.ended.get(trial_id)
    wall = ended - began if began is not None and ended is not None else None
    records_end = max((int(r["step"]) for r in records), default=0)
    times = TrialTimes(trial_id, float(row.get(LR_KEY) or "nan"), row["status"], max_steps,
                       steps_run=max(reported_step(row), records_end), records_end=records_end,
                       step_records=len(records), wall=wall, tune_total=tune_total)
    if not records:
        return times
    times.step_time = sum(r["step_time"] for r in records)
    first_start = records[0]["time"] - records[0]["step_time"]
    last_end = max(r["time"] for r in records)
    times.in_loop = last_end - first_start - times.step_time
    if wall is not None:
        times.start, times.end = first_start - began, ended - last_end
    return times


def outside_trials(clock: TrialClock, sweep_began: float, sweep_ended: float) -> dict[str, float]:
    """Sweep time with no trial running: before the first, between trials, after the last."""
    spans = sorted((clock.started[t], clock.ended[t]) for t in clock.started if t in clock.ended)
    if not spans:
        return {"before": sweep_ended - sweep_began, "between": 0.0, "after": 0.0}
    merged = [list(spans[0])]
    for began, ended in spans[1:]:
        if began <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], ended)
        else:
            merged.append([began, ended])
    between = sum(later[0] - earlier[1] for earlier, later in zip(merged, merged[1:]))
    return {"before": merged[0][0] - sweep_began, "between": between, "after": sweep_ended - merged[-1][1]}


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def print_table(trials: list[TrialTimes], markdown: bool) -> None:
    header = ["trial", "lr_gen", "status", "steps run", "wall (s)", "steps (s)", "overhead (s)", "start",
              "in loop", "end", "overhead share", "Tune's time_total_s"]
    rows = []
    for t in trials:
        share = f"{100 * t.overhead / t.wall:.0f}%" if t.overhead is not None and t.wall else "-"
        steps = f"{t.steps_run}" + ("" if t.records_end >= t.steps_run else f" (records: {t.records_end})")
        rows.append([t.trial_id, f"{t.lr:.3g}", t.status, steps, fmt(t.wall), fmt(t.step_time),
                     fmt(t.overhead), fmt(t.start), fmt(t.in_loop), fmt(t.end), share, fmt(t.tune_total)])
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|---|---:|---|" + "---:|" * (len(header) - 3))
        for row in rows:
            print("| " + " | ".join(str(c) for c in row) + " |")
        return
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    for row in [header, *rows]:
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths)))


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarize(trials: list[TrialTimes], args, ray_start: float, sweep_wall: float,
              outside: dict[str, float]) -> dict[str, Any]:
    timed = [t for t in trials if t.overhead is not None and t.wall]  # an unstarted trial has no wall
    wall_sum = sum(t.wall for t in timed)
    steps_run = sum(t.steps_run for t in trials)
    full = args.trials * args.max_steps
    return {
        "ray_start_s": ray_start, "sweep_wall_s": sweep_wall,
        "trial_wall_sum_s": wall_sum, "step_time_sum_s": sum(t.step_time for t in timed),
        # the mean weighs trials alike; pooled weighs them by wall (long trials count more)
        "mean_overhead_share": mean([t.overhead / t.wall for t in timed]),
        "pooled_overhead_share": sum(t.overhead for t in timed) / wall_sum if wall_sum else float("nan"),
        "mean_start_s": mean([t.start for t in timed]), "mean_end_s": mean([t.end for t in timed]),
        "outside_trials_s": sum(outside.values()), **{f"outside_{k}_s": v for k, v in outside.items()},
        "steps_run": steps_run, "steps_if_all_ran": full, "steps_share": steps_run / full,
        "compute_saved": 1 - steps_run / full, "trials_timed": len(timed),
        "unrun_step_s": sum(t.unrun_step_seconds for t in trials),
        "records_short": [t.trial_id for t in trials if t.records_end < t.steps_run],
    }


def print_summary(s: dict[str, Any], args, markdown: bool) -> None:
    print(f"\nRay start (ensure_ray, once per driver): {s['ray_start_s']:.1f} s")
    print(f"sweep wall (run_sweep): {s['sweep_wall_s']:.1f} s; trial walls add up to {s['trial_wall_sum_s']:.1f} s, "
          f"steps to {s['step_time_sum_s']:.1f} s")
    print(f"per-trial overhead (wall - step time) / wall: mean {100 * s['mean_overhead_share']:.0f}% over "
          f"{s['trials_timed']} trials, pooled {100 * s['pooled_overhead_share']:.0f}%; mean start "
          f"{s['mean_start_s']:.1f} s, mean end {s['mean_end_s']:.1f} s")
    print(f"sweep time with no trial running: {s['outside_trials_s']:.1f} s ({s['outside_before_s']:.1f} before "
          f"the first, {s['outside_between_s']:.1f} between trials, {s['outside_after_s']:.1f} after the last), "
          f"{100 * s['outside_trials_s'] / s['sweep_wall_s']:.0f}% of the sweep")
    print(f"ASHA: {s['steps_run']} steps run of {s['steps_if_all_ran']} had every trial run to the end "
          f"({100 * s['steps_share']:.0f}%): compute saved {100 * s['compute_saved']:.0f}%; the steps it cut, at "
          f"each trial's mean step time, would have added {s['unrun_step_s']:.1f} s to the sweep's "
          f"{s['sweep_wall_s']:.1f} s ({100 * s['unrun_step_s'] / (s['sweep_wall_s'] + s['unrun_step_s']):.0f}% "
          f"of its wall saved)")
    if s["records_short"]:
        print(f"records end before the step reached (not all written when the trial was stopped; their step "
              f"time and so their overhead are off by the missing steps): {', '.join(s['records_short'])}")
    if markdown:
        print("\n| date | trials (concurrent) | max steps / grace | sweep wall | overhead share, mean (pooled) "
              "| mean start / end | outside trials | steps run / all | compute saved |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|")
        print(f"| {time.strftime('%Y-%m-%d')} | {args.trials} ({args.concurrent}) | {args.max_steps} / {args.grace} "
              f"| {s['sweep_wall_s']:.0f} s | {100 * s['mean_overhead_share']:.0f}% "
              f"({100 * s['pooled_overhead_share']:.0f}%) | {s['mean_start_s']:.1f} / {s['mean_end_s']:.1f} s "
              f"| {s['outside_trials_s']:.0f} s | {s['steps_run']} / {s['steps_if_all_ran']} "
              f"| **{100 * s['compute_saved']:.0f}%** |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--concurrent", type=int, default=1, help="trials at a time (one CPU worker each)")
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--grace", type=int, default=3, help="ASHA's first rung (steps)")
    parser.add_argument("--n", type=int, default=24, help="demo corpus size (utterances)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every trial (repeatable)")
    parser.add_argument("--markdown", action="store_true", help="also print the rows for bench/README.md")
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_enable_metrics_collection", "0")
    import ray

    from vits_ray.config import load_config
    from vits_ray.storage import open_store
    from vits_ray.train import ensure_ray
    from vits_ray.tune.sweep import SweepJob, run_sweep

    root = Path(tempfile.mkdtemp(prefix="vits-ray-bench-tune-"))
    print(f"bench_tune: {len(os.sched_getaffinity(0))} CPU core(s), load average {os.getloadavg()[0]:.2f} at "
          f"start; {args.trials} trials, {args.concurrent} at a time, {args.max_steps} steps, grace {args.grace}; "
          f"folder {root}")
    shards = prepare_demo(root, args.n)
    space = root / "space.toml"
    space.write_text(SPACE_TOML)
    storage = root / "sweeps"
    # A blown-up trial fails the same way after a restart; retries would only add to its overhead.
    job = SweepJob(recipe="tiny", overrides=("train.max_failures=0", *args.set), space_path=str(space), data_uri=str(shards),
                   storage_uri=str(storage), name=SWEEP_NAME, trials=args.trials, concurrent=args.concurrent,
                   max_steps=args.max_steps, grace_steps=args.grace)

    began = time.time()
    ensure_ray()
    ray_start = time.time() - began
    clock = TrialClock()
    try:
        sweep_began = time.time()
        outcome = run_sweep(job, callbacks=(trial_clock_callback(clock),))
        sweep_ended = time.time()
    finally:
        ray.shutdown()  # the figures below read storage only

    store = open_store(str(storage), load_config("tiny", list(args.set)).storage).child(SWEEP_NAME)
    trials = [trial_times(row, step_records(store.child(f"trial_{row['trial_id']}")), clock,
                          tune_total_seconds(storage / SWEEP_NAME, row["trial_id"]), args.max_steps)
              for row in sorted(outcome.rows, key=lambda r: clock.started.get(r["trial_id"], float("inf")))]
    outside = outside_trials(clock, sweep_began, sweep_ended)
    summary = summarize(trials, args, ray_start, sweep_ended - sweep_began, outside)
    (root / "timings.json").write_text(json.dumps(
        {"args": vars(args), "summary": summary, "trials": [asdict(t) for t in trials],
         "clock": {"started": clock.started, "ended": clock.ended, "sweep": [sweep_began, sweep_ended]}}, indent=1))

    print()
    print_table(trials, markdown=False)
    print_summary(summary, args, args.markdown)
    if args.markdown:
        print()
        print_table(trials, markdown=True)
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
