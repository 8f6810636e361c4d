"""A sweep: Ray Tune with Optuna proposing configs and ASHA stopping poor trials early, each trial
one of our Ray Train runs, the whole of it under STORAGE/SWEEP/; then a long-horizon confirmation
of the best (`confirm`).

The Train V2 pattern (see DESIGN.md): a function trainable per trial builds our `TorchTrainer`
(`train.build_trainer`) with a report callback that forwards rank 0's reports to Tune, scored
(`score.score_metrics`). The Train run is named after the trial id, so a restarted trial resumes
its own checkpoints. ASHA's time attribute is the trial's own step count (`trial_step`: the global
step less where the sweep started), which keeps growing across a trial's restarts.

Where trials start (sweep.json records it, so a relaunch starts the rest from the same place):
from scratch, from a Coqui model's weights (`init_from`), or from a run's checkpoint state
(`from_run`, a continuation: `vits_ray.continuation`), every trial from the same bytes.

Inside a trial the first instability the guard confirms ends it as diverged, scored (a value Optuna
learns from, not a failure); the stability margin is probed at each ASHA rung and at the end; the
final validation is repeated under other seeds to measure the score's noise.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from vits_ray.checkpoint import HEALTH_COUNTS
from vits_ray.config import RECIPE_DIR, Config, load_config, replace, resolve_recipe_path
from vits_ray.tune.score import DIVERGED_SCORE, score_metrics
from vits_ray.tune.space import SearchSpace, as_overrides, load_space

TRIALS_FILE = "trials.csv"
BEST_FILE = "best.toml"
STATE_SYNC_SECONDS = 10
CREDENTIAL_ENV_VARS = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN",
                                 "AWS_SESSION_TOKEN"})
# trials.csv: these columns, then one per searched key. SCORED_COLUMNS are TrialScore's numbers.
SCORED_COLUMNS = ("score", "loss", *HEALTH_COUNTS, "penalty", "steps", "margin_ok", "margin_loss_rise", "val_noise")
SCORE_COLUMNS = ("trial_id", "status", *SCORED_COLUMNS, "cause", "start", "error")
SWEEP_FILE = "sweep.json"  # where the trials start, resolved once
CONFIRM_FACTOR = 10  # --confirm-steps defaults to this many times --max-steps


class SweepFailedError(RuntimeError):
    """No trial of the sweep ran to a result; trials.csv has each one's error."""


@dataclass(frozen=True)
class SweepJob:
    """A sweep, as plain data (it is shipped to every trial)."""

    recipe: str
    overrides: tuple[str, ...]
    space_path: str
    data_uri: str
    storage_uri: str
    name: str
    trials: int = 8
    concurrent: int = 1
    max_steps: int = 200
    grace_steps: int = 0  # ASHA's first rung; 0: a quarter of max_steps
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    init_from: str = ""  # a Coqui checkpoint folder or export: every trial warm-starts from it
    from_run: str = ""  # STORAGE/RUN[@STEP]: every trial continues that checkpoint's state
    start: dict[str, Any] | None = None  # from_run, resolved (`continuation.ContinuationPoint`)
    confirm_top: int = 2  # the best clean trials with their margin, continued to confirm_steps
    confirm_steps: int = 0  # a confirmed trial's own steps in all (0: CONFIRM_FACTOR x max_steps)
    confirm_drill: str = ""  # KIND@N: a drill N steps into the search-best trial's confirmation
    # Settings tried first, before Optuna proposes ({"optim.lr_gen": 2e-4}: the recipe's own), each
    # a full set of the searched keys.
    first_points: tuple[dict[str, Any], ...] = ()

    def base_config(self) -> Config:
        return load_config(self.recipe, list(self.overrides))

    @property
    def start_step(self) -> int:
        return int(self.start["step"]) if self.start else 0

    @property
    def start_label(self) -> str:
        if self.start:
            return f"{self.start['run_uri']}@{self.start['step']}"
        return f"init-from {self.init_from}" if self.init_from else "scratch"

    @property
    def horizon_steps(self) -> int:
        return self.confirm_steps or CONFIRM_FACTOR * self.max_steps

    def rungs(self) -> list[int]:
        """ASHA's rungs (trial steps); the margin is probed at each and at the end."""
        grace = self.grace_steps or max(1, self.max_steps // 4)
        rungs, rung = [], grace
        while rung < self.max_steps:
            rungs.append(rung)
            rung *= 2
        return rungs + [self.max_steps]


@dataclass
class SweepOutcome:
    sweep_uri: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    why: str = ""  # why the best won, or why there is none
    confirmations: list[dict[str, Any]] = field(default_factory=list)
    study: Any = None  # Optuna's study, when this launch created the searcher (not on a restore)


def trial_config(sweep: SweepJob, settings: dict[str, Any]) -> Config:
    """The base config with the trial's settings; in a continuation the schedule starts where it
    does; validation often enough that the score averages `tune.score_validations` of them."""
    cfg = replace(sweep.base_config(), **as_overrides(settings))
    if sweep.start:
        cfg = replace(cfg, optim={"schedule_start_step": sweep.start_step,
                                  "schedule_start_epoch": int(sweep.start["epoch"])})
    every = max(1, sweep.max_steps // cfg.tune.score_validations)
    if cfg.train.val_step > every:
        cfg = replace(cfg, train={"val_step": every})
    return cfg


def trial_job(sweep: SweepJob, settings: dict[str, Any], trial_id: str):
    """The Train job of one trial: the base config with the trial's settings, run under the sweep."""
    from vits_ray.storage import open_store
    from vits_ray.train import TrainJob

    cfg = trial_config(sweep, settings)
    sweep_store = open_store(sweep.storage_uri, cfg.storage).child(sweep.name)
    return TrainJob(config=cfg.to_dict(), data_uri=sweep.data_uri, storage_uri=sweep_store.uri,
                    name=f"trial_{trial_id}", workers=sweep.workers, use_gpu=sweep.use_gpu,
                    max_steps=sweep.start_step + sweep.max_steps, cpus_per_worker=sweep.cpus_per_worker, quiet=True,
                    init_from=sweep.init_from, from_run=sweep.start, stop_on_instability=True,
                    margin_probes=tuple(sweep.start_step + r for r in sweep.rungs()), measure_score_noise=True)


def _run_trial(settings: dict[str, Any], sweep: dict[str, Any]) -> None:
    """Tune's function trainable: one Train run, its reports forwarded to Tune with their score."""
    import ray.tune

    from vits_ray.recovery import fit
    from vits_ray.train import build_trainer

    sweep = SweepJob(**sweep)
    job = trial_job(sweep, dict(settings), ray.tune.get_context().get_trial_id())
    penalty = sweep.base_config().tune.margin_penalty
    fit(build_trainer(job, callbacks=(_scored_reports_class()(sweep.start_step, sweep.max_steps, penalty),)))


def score_of(sweep: SweepJob, metrics: dict[str, Any]):
    return score_metrics(metrics, sweep.max_steps, sweep.base_config().tune.margin_penalty)


def _scored_reports_class():
    from ray.tune.integration.ray_train import TuneReportCallback

    class ScoredReports(TuneReportCallback):
        """Forward rank 0's report to Tune with the trial's own step count and its score added."""

        def __init__(self, start_step: int, horizon: int, margin_penalty: float):
            super().__init__()
            self.start_step, self.horizon, self.margin_penalty = start_step, horizon, margin_penalty

        def after_report(self, run_context, metrics, checkpoint):
            report = {**metrics[0], "trial_step": int(metrics[0].get("step", 0)) - self.start_step}
            scored = score_metrics(report, self.horizon, self.margin_penalty).as_dict()
            super().after_report(run_context, [{**report, **scored}], checkpoint)

    return ScoredReports


def _progress_class():
    import ray.tune

    class SweepProgress(ray.tune.Callback):
        """One console line per trial that starts or ends, with the sweep's tally and best score,
        instead of Tune's tables (trials keep their per-step lines out of the console: quiet)."""

        def __init__(self, max_steps: int, keys: list[str], margin_penalty: float):
            self.max_steps, self.keys, self.margin_penalty = max_steps, keys, margin_penalty
            self.ended: dict[str, str] = {}
            self.best: tuple[float, str] | None = None

        def _settings(self, trial) -> str:
            return ", ".join(f"{k}={trial.config[k]:.4g}" if isinstance(trial.config.get(k), float)
                             else f"{k}={trial.config[k]}" for k in self.keys if k in trial.config)

        def _say(self, trial, what: str) -> None:
            tally = collections.Counter(self.ended.values())
            done = ", ".join(f"{n} {status}" for status, n in sorted(tally.items())) or "none ended"
            best = f"; best {self.best[0]:.4g} ({self.best[1]})" if self.best else ""
            print(f"[sweep] trial {trial.trial_id} {what} | {done}{best}", flush=True)

        def on_trial_start(self, iteration, trials, trial, **info):
            self._say(trial, f"started: {self._settings(trial)}")

        def _ended(self, trial, error: bool) -> None:
            result = trial.last_result or {}
            scored = score_metrics(result, self.max_steps, self.margin_penalty)
            status = trial_status(error, scored.steps, self.max_steps, scored.diverged)
            self.ended[trial.trial_id] = status
            if error:
                self._say(trial, "errored (its message is in trials.csv)")
                return
            if not scored.diverged and (self.best is None or scored.score < self.best[0]):
                self.best = (scored.score, trial.trial_id)
            unstable = ", ".join(f"{getattr(scored, k)} {k}" for k in HEALTH_COUNTS if getattr(scored, k))
            margin = "" if scored.margin_ok else f"; margin failed: {scored.margin_cause}"
            self._say(trial, f"{status} at step {scored.steps}: score {scored.score:.4g}"
                             + (f" ({scored.cause})" if scored.diverged else f" ({unstable})" if unstable else "")
                             + margin)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._ended(trial, error=False)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._ended(trial, error=True)

    return SweepProgress


def _keep_credentials_out_of_trials() -> None:
    """Ray Tune copies the driver's AWS_* credentials into every trial actor's runtime_env, which
    Ray writes in plain text to runtime_env_agent.log and keeps in the GCS (seen: the secrets test
    found them there after a sweep). A trial's workers get credentials from their node, as every
    Ray Train worker does (see `storage.arrow_filesystem`), so take them off Tune's list."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = class_cache.ENV_VARS_TO_PROPAGATE - CREDENTIAL_ENV_VARS


# What a trial's own driver (the Tune function that starts its Ray Train run) holds beside the
# run's workers: Tune cannot schedule a trial on no resources at all.
TRIAL_DRIVER_CPUS = 0.01


def _check_a_trial_fits(sweep: SweepJob) -> None:
    """Refuse, on a local cluster, a sweep none of whose trials can start. Ray Train would wait for
    the workers' CPUs and time out again and again: e.g. a continuation of a 2-worker run on a
    2-CPU machine, where the trial's driver already holds 0.01 of the 2 CPUs. A cluster in
    RAY_ADDRESS may grow (autoscaling), so it is not judged by what it has now."""
    import os

    import ray

    if os.environ.get("RAY_ADDRESS"):
        return
    from vits_ray.train import TrainSetupError

    have = ray.cluster_resources()
    cpus = sweep.workers * sweep.cpus_per_worker + TRIAL_DRIVER_CPUS
    if have.get("CPU", 0.0) < cpus:
        raise TrainSetupError(
            f"a trial needs {cpus:g} CPUs ({sweep.workers} worker(s) x {sweep.cpus_per_worker} and "
            f"{TRIAL_DRIVER_CPUS} for its driver) and this local Ray cluster has {have.get('CPU', 0.0):g}: "
            f"use fewer --workers, or start Ray with more CPUs (`ray start --head --num-cpus N`, then RAY_ADDRESS)")
    if sweep.use_gpu and have.get("GPU", 0.0) < sweep.workers:
        raise TrainSetupError(f"a trial needs {sweep.workers} GPU(s) and this local Ray cluster has "
                              f"{have.get('GPU', 0.0):g}")


def run_sweep(sweep: SweepJob, callbacks: tuple = ()) -> SweepOutcome:
    """Run (or resume) the sweep, then confirm its best trials over the long horizon; write
    trials.csv, confirmations.json and best.toml under STORAGE/SWEEP/.

    `callbacks`: more `ray.tune.Callback`s for a new sweep (a restored one keeps its saved ones).
    """
    import ray.tune
    from ray.tune.search.optuna import OptunaSearch

    from vits_ray.storage import open_store
    from vits_ray.train import ensure_ray, preflight
    from vits_ray.tune.confirm import confirm_best

    base = sweep.base_config()
    space = load_space(sweep.space_path, base)
    store = open_store(sweep.storage_uri, base.storage)
    sweep_store = store.child(sweep.name)
    sweep = _with_start(sweep, sweep_store)
    preflight(trial_job(sweep, {}, "preflight"))  # data, storage and config, before any trial
    ensure_ray()
    _check_a_trial_fits(sweep)
    _keep_credentials_out_of_trials()
    filesystem, root = store.ray_filesystem()
    trainable = ray.tune.with_resources(ray.tune.with_parameters(_run_trial, sweep=asdict(sweep)),
                                        {"CPU": TRIAL_DRIVER_CPUS})
    experiment = f"{root.rstrip('/')}/{sweep.name}" if root else sweep.name
    searcher = None
    if ray.tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
        tuner = ray.tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=False,
                                       storage_filesystem=filesystem)
    else:
        searcher = OptunaSearch(space=space.suggest, metric="score", mode="min", seed=base.train.seed,
                                points_to_evaluate=[dict(p) for p in sweep.first_points] or None)
        tuner = ray.tune.Tuner(
            trainable,
            tune_config=ray.tune.TuneConfig(
                metric="score", mode="min", num_samples=sweep.trials, max_concurrent_trials=sweep.concurrent,
                search_alg=searcher, scheduler=early_stopping(sweep)),
            run_config=ray.tune.RunConfig(name=sweep.name, storage_path=root, storage_filesystem=filesystem,
                                          verbose=0,
                                          callbacks=[_progress_class()(sweep.max_steps, space.keys,
                                                                       base.tune.margin_penalty), *callbacks],
                                          # Tune uploads the sweep's state (what restore reads) every
                                          # 300 s by default: a sweep killed before that re-runs trials.
                                          sync_config=ray.tune.SyncConfig(sync_period=STATE_SYNC_SECONDS)))
    results = tuner.fit()
    rows = [trial_row(result, space, sweep) for result in results]
    outcome = SweepOutcome(sweep_store.uri, rows, study=getattr(searcher, "_ot_study", None))
    sweep_store.write_bytes(TRIALS_FILE, trials_csv(rows, space).encode("utf-8"))
    if not [r for r in rows if r["status"] != "errored"]:
        raise SweepFailedError(f"sweep {sweep.name}: every trial failed (see {outcome.sweep_uri}/{TRIALS_FILE}); "
                               f"first error: {rows[0]['error'] if rows else '-'}")
    if sweep.confirm_top:
        outcome.confirmations = confirm_best(sweep, rows, space, sweep_store)
        clean = [c for c in outcome.confirmations if c["clean"]]
        if clean:
            winner = min(clean, key=lambda c: c["confirmed_score"])
            outcome.best = next(r for r in rows if r["trial_id"] == winner["trial_id"])
            outcome.why = why_it_won(winner, outcome.confirmations)
        else:
            outcome.why = ("no trial was confirmed: " + ("none of the confirmed trials stayed clean over "
                           f"{sweep.horizon_steps} steps" if outcome.confirmations
                           else "no trial completed clean with its stability margin"))
    else:
        finished = [r for r in rows if r["status"] not in ("errored", "diverged") and r["score"] < DIVERGED_SCORE]
        if finished:
            outcome.best = min(finished, key=lambda r: r["score"])
            outcome.why = "lowest search score (no confirmation: --confirm-top 0)"
    if outcome.best is not None:
        sweep_store.write_bytes(BEST_FILE, best_recipe(sweep, outcome.best, space, outcome.why).encode("utf-8"))
    elif sweep_store.exists(BEST_FILE):
        sweep_store.delete(BEST_FILE)  # from an earlier launch that judged differently
    return outcome


def early_stopping(sweep: SweepJob):
    """ASHA with its rungs at the sweep's rungs before the last step, or none (FIFO) when there are
    none. Never a rung at, nor a stop on reaching, max_steps: a trial stopped at its last report
    loses what follows it (the closing export), and one stopped at a report the margin probe makes
    before the last save loses its last checkpoint and score noise too, so a confirmation would
    start it over."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    early = sweep.rungs()[:-1]
    if not early:
        return FIFOScheduler()
    # ASHA's rungs are grace * 2**k up to max_t (computed with logarithms): a max_t halfway to the
    # next doubling gives exactly these, whatever the rounding.
    return ASHAScheduler(time_attr="trial_step", grace_period=early[0], max_t=early[-1] * 1.5,
                         reduction_factor=2, stop_last_trials=False)


def _with_start(sweep: SweepJob, sweep_store) -> SweepJob:
    """The sweep with its start resolved: from sweep.json when a launch already resolved it (the
    run may have saved newer checkpoints since), else from --from-run now, recorded for relaunches."""
    from vits_ray.continuation import resolve

    recorded = json.loads(sweep_store.read_bytes(SWEEP_FILE)) if sweep_store.exists(SWEEP_FILE) else None
    if recorded is not None and recorded.get("from_run") == sweep.from_run and recorded.get("init_from") == sweep.init_from:
        start = recorded.get("start")
    elif sweep.from_run:
        if sweep.init_from:
            from vits_ray.train import TrainSetupError

            raise TrainSetupError("--from-run and --init-from: give one (a run's whole state, or weights only)")
        start = resolve(sweep.from_run, sweep.base_config().storage).as_dict()
    else:
        start = None
    sweep = dataclasses.replace(sweep, start=start)
    description = {"from_run": sweep.from_run, "init_from": sweep.init_from, "start": start,
                   "start_label": sweep.start_label, "max_steps": sweep.max_steps, "rungs": sweep.rungs(),
                   "confirm_top": sweep.confirm_top, "confirm_steps": sweep.horizon_steps,
                   "tune": dataclasses.asdict(sweep.base_config().tune)}
    sweep_store.write_bytes(SWEEP_FILE, (json.dumps(description, indent=1) + "\n").encode("utf-8"))
    return sweep


def why_it_won(winner: dict[str, Any], confirmations: list[dict[str, Any]]) -> str:
    """One sentence: the winner's confirmed score, and what became of the others."""
    others = []
    for c in confirmations:
        if c["trial_id"] == winner["trial_id"]:
            continue
        if not c["clean"]:
            others.append(f"{c['trial_id']} did not stay clean ({c['verdict']})")
        else:
            others.append(f"{c['trial_id']} stayed clean with a confirmed score of {c['confirmed_score']:.4g}")
    return (f"trial {winner['trial_id']} stayed clean over its {winner['steps']}-step confirmation with the best "
            f"confirmed score, {winner['confirmed_score']:.4g} (search score {winner['search_score']:.4g})"
            + (f"; {'; '.join(others)}" if others else ""))


def trial_row(result, space: SearchSpace, sweep: SweepJob) -> dict[str, Any]:
    metrics = result.metrics or {}
    config = result.config or {}
    # Tune's folder name: _run_trial_<id>_<n>_<settings>_<date>_<time>; an errored trial may have no metrics.
    named = re.search(r"_run_trial_([0-9a-f]+)_", result.path or "")
    trial_id = metrics.get("trial_id") or (named.group(1) if named else "")
    scored = score_of(sweep, metrics) if metrics else None
    errored = result.error is not None
    status = trial_status(errored, scored.steps if scored else 0, sweep.max_steps, bool(scored and scored.diverged))
    row: dict[str, Any] = {"trial_id": trial_id, "status": status, "error": error_summary(result.error),
                           "cause": scored.cause if scored else "", "start": sweep.start_label}
    for column in SCORED_COLUMNS:
        row[column] = getattr(scored, column, float("nan")) if scored else float("nan")
    if scored is None:
        row["score"] = 2 * DIVERGED_SCORE
    row["margin_ok"] = int(scored.margin_ok) if scored else 0
    row["margin_cause"] = scored.margin_cause if scored else ""
    row["clean"] = bool(scored and scored.clean and not errored)
    if errored:  # what it reported before failing says nothing of instability or margin
        row.update(cause="", margin_ok=float("nan"), margin_cause="")
    for key in space.keys:
        row[key] = config.get(key, "")
    return row


def trial_status(errored: bool, steps: int, max_steps: int, diverged: bool = False) -> str:
    """How a trial ended: errored, diverged (instability ended it), stopped early (by ASHA, before
    max_steps) or completed."""
    if errored:
        return "errored"
    if diverged:
        return "diverged"
    return "stopped early" if steps < max_steps else "completed"


def error_summary(error: BaseException | None) -> str:
    """The line of a trial's error that says what went wrong. Tune's text of it starts with the
    trial actor's traceback; the last `SomethingError: message` line is the innermost cause."""
    if error is None:
        return ""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", line)]
    return (named[-1] if named else lines[-1] if lines else type(error).__name__)[:300]


def trials_csv(rows: list[dict[str, Any]], space: SearchSpace) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[*SCORE_COLUMNS, *space.keys], extrasaction="ignore")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: r["score"]):
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()})
    return out.getvalue()


def best_recipe(sweep: SweepJob, best: dict[str, Any], space: SearchSpace, why: str = "") -> str:
    """A recipe that extends the sweep's base recipe and sets the sweep's overrides and the best
    trial's settings: `vits-ray train --config best.toml` trains it; in a continuation sweep,
    `--from-run` the same checkpoint continues that run with it."""
    from vits_ray.config import dump_toml, parse_override

    recipe = resolve_recipe_path(sweep.recipe).resolve()
    bundled = recipe.parent == RECIPE_DIR
    sections: dict[str, dict[str, Any]] = {}
    for text in sweep.overrides:
        section, key, value = parse_override(text)
        sections.setdefault(section, {})[key] = value
    for key in space.keys:
        if best.get(key, "") != "":
            section, name = key.split(".", 1)
            sections.setdefault(section, {})[name] = best[key]
    header = (f"# The best trial of sweep {sweep.name}: {best['trial_id']}, search score {best['score']:.4g} "
              f"(loss {best['loss']:.4g}, {best['spikes']} spikes, {best['rollbacks']} rollbacks)\n")
    if why:
        header += f"# Why: {why}\n"
    header += f"# Trials started from: {sweep.start_label}\n"
    if sweep.start:
        header += (f"# Continue that run with it: vits-ray train --config best.toml --from-run {sweep.start_label} "
                   f"--name NEW_RUN --data ... --storage ...\n")
    elif sweep.init_from:
        header += f"# Train it as the trials did: vits-ray train --config best.toml --init-from {sweep.init_from} ...\n"
    header += f"extends = \"{recipe.name if bundled else recipe}\"\n\n"
    return header + dump_toml(sections)
