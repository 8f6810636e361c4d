"""Does the search pick a schedule that holds for the whole run? The old rule against the new one.

    .venv/bin/python bench/bench_search.py [--n 40] [--base-steps 40] [--trials 6] [--max-steps 12]
                                           [--horizon-factor 10] [--markdown]

One continuation sweep (the tiny recipe, the demo corpus, `--n` utterances, local Ray, one CPU
worker per trial) continues the same `--base-steps`-step base run with the demo's space
(jobs/configs/tune_demo.toml: lr_gen log-uniform in [1e-4, 0.2]; the recipe's 2e-4 is tried first).
Its trials serve both rules:

- old rule: the lowest short-horizon score (the loss with the guard's penalties, no margin term)
  among trials that did not error or diverge, as the sweep chose before scored instability,
  margin probes and confirmation;
- new rule: the sweep's own choice (diverged trials scored, margin probes, the best two
  confirmed over `--horizon-factor` x the trial horizon, best = the best confirmed score among
  those that stayed clean).

Each rule's pick is then trained for `--horizon-factor` x `--max-steps` steps from the same start
(`train --from-run BASE`, the guard as a real run has it), and the bench prints spikes, rollbacks,
blow-ups and the final validation mel loss (mean of the last three) of each, the margin each pick
was measured to have, the score's noise, and the extra steps the new rule cost (margin probes and
confirmations) against the steps the search ran.

Prints figures, asserts nothing. The temp folder is kept (its path is printed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_tune import prepare_demo  # noqa: E402

OVERRIDES = ("train.max_failures=0",)
LR_KEY = "optim.lr_gen"


def old_rule_pick(rows: list[dict]) -> dict | None:
    from vits_ray.tune.score import PENALTIES

    usable = [r for r in rows if r["status"] not in ("errored", "diverged") and math.isfinite(r["loss"])]
    if not usable:
        return None
    return min(usable, key=lambda r: r["loss"] * (1 + sum(PENALTIES[k] * r[k] for k in PENALTIES)))


def records(run: Path) -> list[dict]:
    return [json.loads(line) for path in sorted((run / "records").glob("*.jsonl")) for line in path.open()]


def long_run(label: str, lr: float, storage: Path, data: Path, base_uri: str, steps: int) -> dict:
    """Train `lr` from the base run's checkpoint for `steps` steps; what happened."""
    from vits_ray.config import load_config, replace
    from vits_ray.continuation import resolve
    from vits_ray.recovery import RunAbortedError
    from vits_ray.train import TrainJob, run_local

    cfg = load_config("tiny", list(OVERRIDES) + [f"{LR_KEY}={lr!r}"])
    point = resolve(base_uri, cfg.storage)
    cfg = replace(cfg, **point.schedule_overrides())
    name = f"long_{label}"
    began = time.time()
    error = ""
    try:
        run_local(TrainJob(config=cfg.to_dict(), data_uri=str(data), storage_uri=str(storage), name=name,
                           max_steps=point.step + steps, from_run=point.as_dict(), quiet=True))
    except (RunAbortedError, Exception) as err:  # noqa: BLE001 - a run that fails is a result here
        error = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    lines = records(storage / name)
    events = [r.get("event") for r in lines if r.get("kind") == "event"]
    vals = [r["val_loss_mel"] for r in lines if r.get("kind") == "val" and not r.get("rolled_back")]
    steps_done = max((r["step"] for r in lines if r.get("kind") == "step"), default=point.step) - point.step
    return {"lr": lr, "spikes": events.count("spike"), "rollbacks": events.count("rollback"),
            "blowups": events.count("blowup"), "nonfinite": events.count("nonfinite"), "steps": steps_done,
            "final_val_mel": sum(vals[-3:]) / len(vals[-3:]) if vals else math.nan, "error": error,
            "seconds": time.time() - began}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--base-steps", type=int, default=40)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--horizon-factor", type=int, default=10)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "token")

    from vits_ray.config import RECIPE_DIR, load_config
    from vits_ray.train import TrainJob, ensure_ray, run_local
    from vits_ray.tune.sweep import SweepJob, run_sweep

    root = Path(tempfile.mkdtemp(prefix="bench-search-"))
    print(f"[bench] folder: {root}", flush=True)
    data = prepare_demo(root, args.n)
    base_cfg = load_config("tiny", list(OVERRIDES))
    began = time.time()
    run_local(TrainJob(config=base_cfg.to_dict(), data_uri=str(data), storage_uri=str(root / "runs"), name="base",
                       max_steps=args.base_steps, quiet=True))
    base_uri = str(root / "runs" / "base")
    print(f"[bench] base run: {args.base_steps} steps in {time.time() - began:.0f} s", flush=True)

    ensure_ray()
    horizon = args.horizon_factor * args.max_steps
    began = time.time()
    outcome = run_sweep(SweepJob(recipe="tiny", overrides=OVERRIDES, space_path=str(RECIPE_DIR / "tune_demo.toml"),
                                 data_uri=str(data), storage_uri=str(root / "sweeps"), name="search",
                                 trials=args.trials, max_steps=args.max_steps, grace_steps=max(1, args.max_steps // 2),
                                 from_run=base_uri, confirm_top=2, confirm_steps=horizon,
                                 first_points=({LR_KEY: base_cfg.optim.lr_gen},)))
    sweep_seconds = time.time() - began
    rows = outcome.rows
    old, new = old_rule_pick(rows), outcome.best
    sweep_dir = root / "sweeps" / "search"
    margin_steps = load_config("tiny", list(OVERRIDES)).tune.margin_steps
    probes = sum(sum(1 for r in records(sweep_dir / f"trial_{row['trial_id']}")
                     if r.get("kind") == "event" and r.get("event") == "margin_probe") for row in rows)
    search_steps = sum(int(r["steps"]) if math.isfinite(r["steps"]) else 0 for r in rows)
    confirm_steps = sum(max(0, int(c["steps"] or 0) - args.max_steps) for c in outcome.confirmations)
    probe_steps = probes * 2 * margin_steps

    results = {}
    for label, pick in (("old", old), ("new", new)):
        if pick is None:
            continue
        if label == "new" and old is not None and pick["trial_id"] == old["trial_id"]:
            results["new"] = results["old"]
            continue
        results[label] = long_run(label, float(pick[LR_KEY]), root / "runs", data, base_uri, horizon)
        print(f"[bench] {label} rule's pick trained {horizon} steps: {results[label]}", flush=True)

    noise = sorted(r["val_noise"] for r in rows if math.isfinite(r.get("val_noise", math.nan)))
    summary = {
        "trials": [{k: r[k] for k in ("trial_id", "status", "score", "loss", "margin_ok", "margin_loss_rise",
                                      "val_noise", "cause", LR_KEY, "steps")} for r in rows],
        "old_pick": old and old["trial_id"], "new_pick": new and new["trial_id"], "why": outcome.why,
        "confirmations": outcome.confirmations, "long": results, "sweep_seconds": sweep_seconds,
        "search_steps": search_steps, "probe_steps": probe_steps, "confirm_steps": confirm_steps,
        "score_noise": noise[len(noise) // 2] if noise else math.nan}
    (root / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    report(summary, args, old, new, markdown=args.markdown)


def report(s: dict, args, old: dict | None, new: dict | None, markdown: bool) -> None:
    def f(x, d=4):
        return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{d}g}"

    print(f"\nTrials ({args.trials}, {args.max_steps} steps each, from a {args.base_steps}-step base run):")
    print("| trial | lr_gen | status | score | loss | margin | rise | noise | cause |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t in s["trials"]:
        print(f"| {t['trial_id']} | {f(float(t[LR_KEY]), 3)} | {t['status']} | {f(t['score'])} | {f(t['loss'])} | "
              f"{'held' if t['margin_ok'] else 'failed'} | {f(t['margin_loss_rise'], 2)} | {f(t['val_noise'], 3)} | "
              f"{t['cause'] or '–'} |")
    print(f"\nScore noise (median std of the final validation over seeds): {f(s['score_noise'], 3)}")
    print(f"Old rule picks {s['old_pick']} (lr_gen {f(float(old[LR_KEY]), 3) if old else '–'}); new rule picks "
          f"{s['new_pick']} (lr_gen {f(float(new[LR_KEY]), 3) if new else '–'}): {s['why']}")
    print(f"\nEach pick trained {args.horizon_factor * args.max_steps} steps from the same start:")
    print("| rule | lr_gen | steps | spikes | rollbacks | blow-ups | non-finite | final val mel (mean of last 3) | error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label in ("old", "new"):
        r = s["long"].get(label)
        if r:
            print(f"| {label} | {f(r['lr'], 3)} | {r['steps']} | {r['spikes']} | {r['rollbacks']} | {r['blowups']} | "
                  f"{r['nonfinite']} | {f(r['final_val_mel'])} | {r['error'] or '–'} |")
    extra = s["probe_steps"] + s["confirm_steps"]
    print(f"\nExtra steps of the new rule: {s['probe_steps']} margin-probe steps + {s['confirm_steps']} confirmation "
          f"steps = {extra}, against {s['search_steps']} search steps ({extra / max(1, s['search_steps']):.1f}x); "
          f"sweep wall {s['sweep_seconds']:.0f} s.")


if __name__ == "__main__":
    main()
