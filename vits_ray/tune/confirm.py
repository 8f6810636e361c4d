"""The long-horizon confirmation of a sweep's best trials.

Short trials reward the edge of stability: on a short horizon a higher learning rate lowers the loss
faster, and nothing in a trial's score says whether it would have held for ten times as long. So
after the search the best `confirm_top` trials that completed clean and kept their stability margin
are continued from their own checkpoints (their Train runs, trial_<id>/, relaunched with a longer
`max_steps`) to `horizon_steps` of their own steps, under the stability guard as a real run has it
(spikes roll back, blow-ups are caught, the budget ends a run that keeps diverging). The winner is
the confirmed trial with the best confirmed score among those that stayed clean over the whole
confirmation; if none did, there is no winner.

Each finished confirmation is recorded in confirmations.json at once: a relaunched sweep skips it,
and an unfinished one resumes from its run's newest checkpoint.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from vits_ray.checkpoint import HEALTH_COUNTS
from vits_ray.tune.score import score_metrics
from vits_ray.tune.space import SearchSpace

CONFIRMATIONS_FILE = "confirmations.json"


def load_confirmations(sweep_store) -> dict[str, dict[str, Any]]:
    if not sweep_store.exists(CONFIRMATIONS_FILE):
        return {}
    return {c["trial_id"]: c for c in json.loads(sweep_store.read_bytes(CONFIRMATIONS_FILE))}


def _save(sweep_store, done: dict[str, dict[str, Any]]) -> None:
    def plain(value: Any) -> Any:  # JSON has no NaN: a number not measured is null
        return None if isinstance(value, float) and not math.isfinite(value) else value

    entries = [{k: plain(v) for k, v in entry.items()} for entry in done.values()]
    sweep_store.write_bytes(CONFIRMATIONS_FILE, (json.dumps(entries, indent=1) + "\n").encode("utf-8"))


def candidates(rows: list[dict[str, Any]], top: int) -> list[dict[str, Any]]:
    """The best `top` trials by search score that completed clean with their margin."""
    eligible = [r for r in rows if r["status"] == "completed" and r["clean"] and int(r["margin_ok"])]
    return sorted(eligible, key=lambda r: r["score"])[:top]


def worker_error_line(error: Exception) -> str:
    """The line that says what a failed run raised: Ray wraps a worker's traceback in its own
    message, whose last `SomethingError: ...` line is the worker's exception."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b.*:", line)]
    return (raised[-1] if raised else lines[0] if lines else type(error).__name__)[:300]


def confirm_best(sweep, rows: list[dict[str, Any]], space: SearchSpace, sweep_store) -> list[dict[str, Any]]:
    """Confirm the candidates (skipping those already confirmed); their records, search-best first."""
    done = load_confirmations(sweep_store)
    chosen = candidates(rows, sweep.confirm_top)
    for rank, row in enumerate(chosen):
        if row["trial_id"] in done:
            print(f"[sweep] confirmation of trial {row['trial_id']}: already done", flush=True)
            continue
        done[row["trial_id"]] = confirm_trial(sweep, row, space, drill=sweep.confirm_drill if rank == 0 else "")
        _save(sweep_store, done)
    return [done[r["trial_id"]] for r in chosen]


def confirm_trial(sweep, row: dict[str, Any], space: SearchSpace, drill: str = "") -> dict[str, Any]:
    """Continue one trial's Train run to the confirmation horizon; what happened on the way."""
    import dataclasses

    from vits_ray.recovery import RunAbortedError, fit
    from vits_ray.train import Drill, build_trainer
    from vits_ray.tune.sweep import trial_job

    settings = {k: row[k] for k in space.keys if row.get(k, "") != ""}
    job = trial_job(sweep, settings, row["trial_id"])
    searched_to = job.max_steps  # the trial's last step
    drills = ()
    if drill:
        parsed = Drill.parse(drill)
        drills = (Drill(parsed.kind, searched_to + parsed.step),)
    job = dataclasses.replace(job, max_steps=sweep.start_step + sweep.horizon_steps, stop_on_instability=False,
                              margin_probes=(), drills=drills)
    print(f"[sweep] confirming trial {row['trial_id']}: its steps {sweep.max_steps} -> {sweep.horizon_steps}"
          + (f", drill {drill} (global step {drills[0].step})" if drills else ""), flush=True)
    error, metrics = "", {}
    try:
        result = fit(build_trainer(job))
        metrics = dict(result.metrics or {})
    except RunAbortedError as err:
        error = str(err).splitlines()[0][:300]
    except Exception as err:  # noqa: BLE001 - the run raised on the way (e.g. a blow-up the guard could
        # not tell from a bug): this trial is not confirmed; the other candidates still are
        error = worker_error_line(err)
    penalty = sweep.base_config().tune.margin_penalty
    entry: dict[str, Any] = {"trial_id": row["trial_id"], "search_score": row["score"], "search_loss": row["loss"],
                             "margin_ok": int(row["margin_ok"]), "margin_loss_rise": row["margin_loss_rise"],
                             "drill": drill, "error": error}
    if metrics:
        scored = score_metrics({**metrics, "trial_step": int(metrics.get("step", 0)) - sweep.start_step},
                               sweep.horizon_steps, penalty)
        during = {k: int(metrics.get(k, 0) or 0) - int(row.get(k, 0) or 0) for k in HEALTH_COUNTS}
        entry.update(confirmed_score=scored.score, confirmed_loss=scored.loss, steps=scored.steps,
                     val_noise=scored.val_noise, **during)
    else:
        entry.update(confirmed_score=math.nan, confirmed_loss=math.nan, steps=0, val_noise=math.nan,
                     **dict.fromkeys(HEALTH_COUNTS, 0))
    flagged = [f"{entry[k]} {k}" for k in HEALTH_COUNTS if entry[k]]
    reached = entry["steps"] >= sweep.horizon_steps
    entry["clean"] = not error and not flagged and reached and math.isfinite(entry["confirmed_score"])
    entry["verdict"] = ("clean" if entry["clean"] else f"failed: {error}" if error
                        else ", ".join(flagged) if flagged else f"stopped at its step {entry['steps']}")
    print(f"[sweep] trial {row['trial_id']} confirmed: {entry['verdict']}, score "
          f"{entry['confirmed_score']:.4g} (search {row['score']:.4g})", flush=True)
    return entry
