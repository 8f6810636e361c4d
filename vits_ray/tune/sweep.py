"""A sweep: Ray Tune with Optuna proposing configs and ASHA stopping poor trials early, each trial
one of our Ray Train runs, the whole of it under STORAGE/SWEEP/.

The Train V2 pattern (see DESIGN.md): a function trainable per trial builds our `TorchTrainer`
(`train.build_trainer`) with a report callback that forwards rank 0's reports to Tune, scored
(`score.score_metrics`). The Train run is named after the trial id, so a restarted trial resumes
its own checkpoints. ASHA's time attribute is the global step, which keeps growing across a
trial's restarts (Tune's own iteration count starts again).
"""

from __future__ import annotations

import collections
import csv
import io
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
SCORED_COLUMNS = ("score", "loss", *HEALTH_COUNTS, "penalty", "steps")
SCORE_COLUMNS = ("trial_id", "status", *SCORED_COLUMNS, "error")


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

    def base_config(self) -> Config:
        return load_config(self.recipe, list(self.overrides))


@dataclass
class SweepOutcome:
    sweep_uri: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None


def trial_job(sweep: SweepJob, settings: dict[str, Any], trial_id: str):
    """The Train job of one trial: the base config with the trial's settings, run under the sweep."""
    from vits_ray.storage import open_store
    from vits_ray.train import TrainJob

    cfg = replace(sweep.base_config(), **as_overrides(settings))
    sweep_store = open_store(sweep.storage_uri, cfg.storage).child(sweep.name)
    return TrainJob(config=cfg.to_dict(), data_uri=sweep.data_uri, storage_uri=sweep_store.uri,
                    name=f"trial_{trial_id}", workers=sweep.workers, use_gpu=sweep.use_gpu,
                    max_steps=sweep.max_steps, cpus_per_worker=sweep.cpus_per_worker, quiet=True)


def _run_trial(settings: dict[str, Any], sweep: dict[str, Any]) -> None:
    """Tune's function trainable: one Train run, its reports forwarded to Tune with their score."""
    import ray.tune

    from vits_ray.recovery import fit
    from vits_ray.train import build_trainer

    job = trial_job(SweepJob(**sweep), dict(settings), ray.tune.get_context().get_trial_id())
    fit(build_trainer(job, callbacks=(_scored_reports_class()(),)))


def _scored_reports_class():
    from ray.tune.integration.ray_train import TuneReportCallback

    class ScoredReports(TuneReportCallback):
        """Forward rank 0's report to Tune with the trial's instability-aware score added."""

        def after_report(self, run_context, metrics, checkpoint):
            scored = {**metrics[0], **score_metrics(metrics[0]).as_dict()}
            super().after_report(run_context, [scored], checkpoint)

    return ScoredReports


def _progress_class():
    import ray.tune

    class SweepProgress(ray.tune.Callback):
        """One console line per trial that starts or ends, with the sweep's tally and best score,
        instead of Tune's tables (trials keep their per-step lines out of the console: quiet)."""

        def __init__(self, max_steps: int, keys: list[str]):
            self.max_steps, self.keys = max_steps, keys
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
            step = int(result.get("step", 0) or 0)
            status = trial_status(error, step, self.max_steps)
            self.ended[trial.trial_id] = status
            if error:
                self._say(trial, "errored (its message is in trials.csv)")
                return
            scored = score_metrics(result)
            if not scored.diverged and (self.best is None or scored.score < self.best[0]):
                self.best = (scored.score, trial.trial_id)
            unstable = ", ".join(f"{getattr(scored, k)} {k}" for k in HEALTH_COUNTS if getattr(scored, k))
            self._say(trial, f"{status} at step {step}: score {scored.score:.4g}"
                             + (f" ({unstable})" if unstable else ""))

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


def run_sweep(sweep: SweepJob, callbacks: tuple = ()) -> SweepOutcome:
    """Run (or resume) the sweep; write trials.csv and best.toml under STORAGE/SWEEP/.

    `callbacks`: more `ray.tune.Callback`s for a new sweep (a restored one keeps its saved ones).
    """
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from vits_ray.storage import open_store
    from vits_ray.train import ensure_ray, preflight

    base = sweep.base_config()
    space = load_space(sweep.space_path, base)
    preflight(trial_job(sweep, {}, "preflight"))  # data, storage and config, before any trial
    ensure_ray()
    _keep_credentials_out_of_trials()
    store = open_store(sweep.storage_uri, base.storage)
    filesystem, root = store.ray_filesystem()
    trainable = ray.tune.with_resources(ray.tune.with_parameters(_run_trial, sweep=asdict(sweep)), {"CPU": 0.01})
    experiment = f"{root.rstrip('/')}/{sweep.name}" if root else sweep.name
    if ray.tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
        tuner = ray.tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=False,
                                       storage_filesystem=filesystem)
    else:
        grace = sweep.grace_steps or max(1, sweep.max_steps // 4)
        tuner = ray.tune.Tuner(
            trainable,
            tune_config=ray.tune.TuneConfig(
                metric="score", mode="min", num_samples=sweep.trials, max_concurrent_trials=sweep.concurrent,
                search_alg=OptunaSearch(space=space.suggest, metric="score", mode="min",
                                        seed=base.train.seed),
                # max_t one past the last step: ASHA stops any trial that reaches max_t, and a
                # trial stopped at its last report would lose its closing export.
                scheduler=ASHAScheduler(time_attr="step", max_t=sweep.max_steps + 1, grace_period=grace,
                                        reduction_factor=2)),
            run_config=ray.tune.RunConfig(name=sweep.name, storage_path=root, storage_filesystem=filesystem,
                                          verbose=0,
                                          callbacks=[_progress_class()(sweep.max_steps, space.keys), *callbacks],
                                          # Tune uploads the sweep's state (what restore reads) every
                                          # 300 s by default: a sweep killed before that re-runs trials.
                                          sync_config=ray.tune.SyncConfig(sync_period=STATE_SYNC_SECONDS)))
    results = tuner.fit()
    rows = [trial_row(result, space, sweep.max_steps) for result in results]
    sweep_store = store.child(sweep.name)
    outcome = SweepOutcome(sweep_store.uri, rows)
    sweep_store.write_bytes(TRIALS_FILE, trials_csv(rows, space).encode("utf-8"))
    finished = [r for r in rows if r["status"] != "errored" and r["score"] < DIVERGED_SCORE]
    if not [r for r in rows if r["status"] != "errored"]:
        raise SweepFailedError(f"sweep {sweep.name}: every trial failed (see {outcome.sweep_uri}/{TRIALS_FILE}); "
                               f"first error: {rows[0]['error'] if rows else '-'}")
    if finished:
        outcome.best = min(finished, key=lambda r: r["score"])
        sweep_store.write_bytes(BEST_FILE, best_recipe(sweep, outcome.best, space).encode("utf-8"))
    return outcome


def trial_row(result, space: SearchSpace, max_steps: int) -> dict[str, Any]:
    metrics = result.metrics or {}
    config = result.config or {}
    # Tune's folder name: _run_trial_<id>_<n>_<settings>_<date>_<time>; an errored trial may have no metrics.
    named = re.search(r"_run_trial_([0-9a-f]+)_", result.path or "")
    trial_id = metrics.get("trial_id") or (named.group(1) if named else "")
    status = trial_status(result.error is not None, int(metrics.get("step", 0) or 0), max_steps)
    row: dict[str, Any] = {"trial_id": trial_id, "status": status, "error": error_summary(result.error)}
    scored = score_metrics(metrics) if metrics else None
    for column in SCORED_COLUMNS:
        row[column] = getattr(scored, column, float("nan")) if scored else float("nan")
    if scored is None:
        row["score"] = DIVERGED_SCORE
    for key in space.keys:
        row[key] = config.get(key, "")
    return row


def trial_status(errored: bool, step: int, max_steps: int) -> str:
    """How a trial ended: errored, stopped early (by ASHA, before max_steps) or completed."""
    return "errored" if errored else "stopped early" if step < max_steps else "completed"


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


def best_recipe(sweep: SweepJob, best: dict[str, Any], space: SearchSpace) -> str:
    """A recipe that extends the sweep's base recipe and sets the sweep's overrides and the best
    trial's settings: `vits-ray train --config best.toml` trains it."""
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
    header = (f"# The best trial of sweep {sweep.name}: {best['trial_id']}, score {best['score']:.4g} "
              f"(loss {best['loss']:.4g}, {best['spikes']} spikes, {best['rollbacks']} rollbacks)\n"
              f"extends = \"{recipe.name if bundled else recipe}\"\n\n")
    return header + dump_toml(sections)

