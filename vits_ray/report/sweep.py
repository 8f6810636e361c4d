"""Report of a Ray Tune sweep (STORAGE/SWEEP/): its trials, the score against each searched
parameter, every trial's mel loss curve, what ASHA's early stopping saved and Optuna's parameter
importances, as sweep.md, sweep.html, sweep.json and PNGs.

It reads what `vits_ray.tune.sweep.run_sweep` writes (trials.csv, best.toml) and each trial's
Train run folder trial_<id>/ (like any run, `load.load_segments_run`); Ray Tune's own files are
not read. Diverged trials (score DIVERGED_SCORE) are drawn in a band at the top of the score plots
rather than at 1e6, which would squash every other trial onto one line.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from vits_ray.checkpoint import HEALTH_COUNTS
from vits_ray.report.analysis import step_series
from vits_ray.report.load import ReportError, RunData, load_segments_run
from vits_ray.report.plots import Figure, Mark, STEP_EVENT_MARKS, _broken, _save, _value_at
from vits_ray.report.document import Block, Bullets, Heading, Image, Para, Table, fmt, json_safe, to_html, to_markdown
from vits_ray.storage import StorageError, open_store
from vits_ray.tune.score import DIVERGED_SCORE
from vits_ray.tune.confirm import CONFIRMATIONS_FILE
from vits_ray.tune.sweep import BEST_FILE, SCORE_COLUMNS, SCORED_COLUMNS, SWEEP_FILE, TRIALS_FILE

import matplotlib.pyplot as plt  # noqa: E402  (after plots, which selects the Agg backend)

LOG_SPAN = 20  # a positive parameter spanning more than this factor gets a log axis (and log distribution)
CURVE_EVENTS = ("spike", "rollback", "nonfinite", "blowup")
LEGEND_MAX = 12  # trials named in a legend or next to their points; more would hide the plot
ERROR_CHARS = 80
# What a trials.csv must have (the columns written since the first sweeps); later ones are optional.
REQUIRED_COLUMNS = ("trial_id", "status", "score", "loss", *HEALTH_COUNTS, "penalty", "steps", "error")
NOISE_FACTOR = 2  # a score difference beyond this many noise standard deviations is called real
POINT_STYLE = {"clean": ("o", "tab:blue", "clean"),
               "unstable": ("v", "tab:red", "spikes, rollbacks, non-finite steps or blow-ups"),
               "diverged": ("^", "black", "diverged (no finite loss), in the gray band at the top")}


@dataclass
class Trial:
    id: str
    status: str  # "completed", "stopped early", "errored"
    numbers: dict[str, float]  # score, loss, spikes, ..., steps (NaN where trials.csv has none)
    params: dict[str, str]  # the keys searched for this trial, as trials.csv writes them
    error: str
    cause: str = ""  # why it diverged
    run: Optional[RunData] = None
    score: float = field(init=False)
    errored: bool = field(init=False)
    diverged: bool = field(init=False)
    kind: str = field(init=False)  # "clean", "unstable" or "diverged": how its points are drawn
    steps: int = field(init=False)

    def __post_init__(self) -> None:
        self.score = self.numbers["score"]
        self.errored = self.status == "errored"
        self.diverged = not self.errored and (self.status == "diverged" or self.score >= DIVERGED_SCORE)
        unstable = any(self.numbers[k] > 0 for k in HEALTH_COUNTS)  # NaN counts: not unstable
        self.kind = "diverged" if self.diverged else "unstable" if unstable else "clean"
        self.steps = int(self.numbers["steps"]) if math.isfinite(self.numbers["steps"]) else 0


@dataclass
class Sweep:
    name: str
    source: str
    keys: list[str]  # the searched config keys, in trials.csv's column order
    trials: list[Trial]  # by score, errored last
    best_toml: Optional[str]  # its URI, when the sweep wrote one
    warnings: list[str]
    description: dict[str, Any] = field(default_factory=dict)  # sweep.json: where the trials started, ...
    confirmations: list[dict[str, Any]] = field(default_factory=list)  # confirmations.json
    why: str = ""  # best.toml's "Why:" line

    @property
    def best(self) -> Optional[Trial]:
        if self.description.get("confirm_top"):  # a confirmed sweep's best is the clean confirmed one
            if self.best_id is None:
                return None
            return next((t for t in self.trials if t.id == self.best_id), None)
        return next((t for t in self.trials if not t.errored and not t.diverged), None)

    @property
    def best_id(self) -> Optional[str]:
        clean = [c for c in self.confirmations if c.get("clean")]
        if clean:
            return min(clean, key=lambda c: c["confirmed_score"])["trial_id"]
        return None

    @property
    def noise(self) -> float:
        """The score's noise: the median over trials of their final validation's spread over seeds."""
        values = sorted(t.numbers.get("val_noise", math.nan) for t in self.trials)
        values = [v for v in values if math.isfinite(v)]
        return values[len(values) // 2] if values else math.nan


@dataclass(frozen=True)
class Scale:
    kind: str  # "int", "float" or "categorical"
    log: bool
    choices: tuple = ()  # the categorical values, in axis order


# --- reading ---------------------------------------------------------------------------------

def is_sweep(source: str) -> bool:
    try:
        return open_store(source).exists(TRIALS_FILE)
    except (ValueError, RuntimeError):  # not a store URI, or storage unreachable: not a sweep we can read
        return False


def _number(text: str, where: str, column: str) -> float:
    try:
        return float(text) if text.strip() else math.nan
    except ValueError:
        raise ReportError(f"{where}: {column} {text!r} is not a number") from None


def read_trials(store) -> tuple[list[str], list[Trial]]:
    name = store.url(TRIALS_FILE)
    if not store.exists(TRIALS_FILE):
        raise ReportError(f"{name} not found: not a sweep folder (run_sweep writes it when the sweep ends)")
    reader = csv.DictReader(io.StringIO(store.read_bytes(TRIALS_FILE).decode("utf-8")))
    columns = reader.fieldnames or []
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ReportError(f"{name}: missing column(s) {', '.join(missing)}")
    keys = [c for c in columns if c not in SCORE_COLUMNS]
    trials = []
    for lineno, row in enumerate(reader, 2):
        where = f"{name} line {lineno}"
        numbers = {c: _number(row.get(c) or "", where, c) for c in SCORED_COLUMNS}
        trials.append(Trial(row["trial_id"], row["status"], numbers, {k: row[k] for k in keys if row.get(k)},
                            row["error"] or "", row.get("cause") or ""))
    trials.sort(key=lambda t: (t.errored, t.score if math.isfinite(t.score) else math.inf))
    return keys, trials


def _trial_run(store, trial: Trial, problems: list[str]) -> Optional[RunData]:
    from vits_ray.runlog import segment_names

    folder = store.child(f"trial_{trial.id}")
    try:
        if not segment_names(folder):
            problems.append(f"trial {trial.id}: no records under {folder.url('records')} (no curve for it)")
            return None
        run = load_segments_run(folder)
    except (ReportError, StorageError) as err:
        problems.append(f"trial {trial.id}: records not readable (no curve for it): {err}")
        return None
    problems.extend(f"trial {trial.id}: {w}" for w in run.warnings)
    return run


def load_sweep(source: str) -> Sweep:
    store = open_store(source)
    keys, trials = read_trials(store)
    problems: list[str] = []
    for trial in trials:
        trial.run = _trial_run(store, trial, problems)
    best_toml = store.url(BEST_FILE) if store.exists(BEST_FILE) else None
    why = ""
    if best_toml:
        why = next((line[len("# Why: "):] for line in store.read_bytes(BEST_FILE).decode("utf-8").splitlines()
                    if line.startswith("# Why: ")), "")
    description = json.loads(store.read_bytes(SWEEP_FILE)) if store.exists(SWEEP_FILE) else {}
    confirmations = json.loads(store.read_bytes(CONFIRMATIONS_FILE)) if store.exists(CONFIRMATIONS_FILE) else []
    return Sweep(store.uri.rstrip("/").rsplit("/", 1)[-1], store.uri, keys, trials, best_toml, problems,
                 description, confirmations, why)


# --- numbers ---------------------------------------------------------------------------------

def scale_of(texts: list[str]) -> Scale:
    """Int, float or categorical from the values trials.csv holds; log when positive and wide."""
    for kind, parse in (("int", int), ("float", float)):
        try:
            values = [parse(t) for t in texts]
        except ValueError:
            continue
        return Scale(kind, bool(values) and min(values) > 0 and max(values) > LOG_SPAN * min(values))
    return Scale("categorical", False, tuple(sorted(set(texts))))


def value_of(text: str, scale: Scale) -> Any:
    return {"int": int, "float": float}.get(scale.kind, str)(text)


def scales(sweep: Sweep) -> dict[str, Scale]:
    return {k: scale_of([t.params[k] for t in sweep.trials if not t.errored and k in t.params]) for k in sweep.keys}


def early_stopping(sweep: Sweep) -> dict[str, Any]:
    completed = [t.steps for t in sweep.trials if t.status == "completed"]
    max_steps = max(completed or [t.steps for t in sweep.trials] or [0])
    run = sum(t.steps for t in sweep.trials)
    saved = 1 - run / (len(sweep.trials) * max_steps) if max_steps else None
    stopped = [{"trial_id": t.id, "step": t.steps, "score": t.score}
               for t in sweep.trials if t.status == "stopped early"]
    return {"stopped": stopped, "trials": len(sweep.trials), "max_steps": max_steps, "steps_run": run,
            "compute_saved": saved}


def _study(trials: list[Trial], keys: list[str], by_key: dict[str, Scale]):
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    def distribution(key: str):
        scale = by_key[key]
        if scale.kind == "categorical":
            return CategoricalDistribution(scale.choices)
        values = [value_of(t.params[key], scale) for t in trials if key in t.params]
        kind = IntDistribution if scale.kind == "int" else FloatDistribution
        return kind(min(values), max(values), log=scale.log)

    distributions = {k: distribution(k) for k in keys}
    study = optuna.create_study(direction="minimize")
    for t in trials:
        present = [k for k in keys if k in t.params]
        study.add_trial(optuna.trial.create_trial(
            params={k: value_of(t.params[k], by_key[k]) for k in present},
            distributions={k: distributions[k] for k in present}, value=t.score))
    return study


def importances(sweep: Sweep, by_key: dict[str, Scale]) -> tuple[dict[str, float], list[str]]:
    """Optuna's importances over the trials that did not error, and notes on what they leave out."""
    import optuna

    usable = [t for t in sweep.trials if not t.errored]
    searched = [k for k in sweep.keys if any(k in t.params for t in usable)]
    if len(searched) < 2:
        return {}, [f"No importances: the trials searched {len(searched)} parameter(s) "
                    f"({', '.join(searched) or 'none'}); there is nothing to compare."]
    if len(usable) < 2:
        return {}, [f"No importances: {len(usable)} trial(s) finished without an error; at least 2 are needed."]
    common = [k for k in searched if all(k in t.params for t in usable)]
    conditional = [k for k in searched if k not in common]
    notes = []
    if conditional:
        notes.append(f"Conditional keys, each weighed over the trials that have it: {', '.join(conditional)}.")
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created" lines in a report
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                found = optuna.importance.get_param_importances(_study(usable, searched, by_key))
            except (ValueError, RuntimeError) as err:
                if len(common) < 2:
                    return {}, [f"No importances: Optuna refused the conditional keys ({err}), and fewer than 2 "
                                f"keys were searched in every trial."]
                found = optuna.importance.get_param_importances(_study(usable, common, by_key))
                notes = [f"Optuna refused the conditional keys ({err}); these importances are over the keys every "
                         f"trial has. Left out: {', '.join(conditional)}."]
    finally:
        optuna.logging.set_verbosity(verbosity)
    notes += [f"Optuna: {m}" for m in dict.fromkeys(str(w.message) for w in caught)]
    return dict(sorted(found.items(), key=lambda kv: -kv[1])), notes


# --- plots -----------------------------------------------------------------------------------

def plot_score_against(sweep: Sweep, key: str, scale: Scale, out_dir: Path) -> Figure:
    shown = [t for t in sweep.trials if not t.errored and key in t.params]
    finite = [t.score for t in shown if not t.diverged] or [1.0]
    low, high = min(finite), max(finite)
    pad = 0.08 * (high - low) or 0.08 * abs(high) or 1.0
    top = high + 2 * pad  # where diverged trials sit: above every finite score

    def x_of(t: Trial) -> float:
        text = t.params[key]
        return float(scale.choices.index(text) if scale.kind == "categorical" else value_of(text, scale))

    fig, ax = plt.subplots(figsize=(7, 4.2))
    marks = []
    for t in shown:
        marker, color, _ = POINT_STYLE[t.kind]
        x, y = x_of(t), top if t.diverged else t.score
        ax.scatter([x], [y], marker=marker, s=60, edgecolors=color,
                   facecolors="none" if t.status == "stopped early" else color)
        if len(shown) <= LEGEND_MAX:
            ax.annotate(t.id, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        marks.append(Mark(t.kind, x, y, t.id))
    for kind in dict.fromkeys(m.kind for m in marks):
        marker, color, label = POINT_STYLE[kind]
        ax.scatter([], [], marker=marker, color=color, label=label)
    if any(t.status == "stopped early" for t in shown):
        ax.scatter([], [], marker="o", edgecolors="gray", facecolors="none", label="hollow: stopped early by ASHA")
    if scale.kind == "categorical":
        ax.set_xticks(range(len(scale.choices)), scale.choices)
        ax.set_xlim(-0.5, len(scale.choices) - 0.5)
    elif scale.log:
        ax.set_xscale("log")
    if any(t.diverged for t in shown):  # a band, so the top edge is not read as a score
        ax.axhspan(high + pad, top + pad, color="0.9", zorder=0)
    ax.margins(x=0.1)  # room for the trial ids beside the outermost points
    ax.set_ylim(low - pad, top + pad)
    ax.set_xlabel(key)
    ax.set_ylabel("score (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    errored = sum(t.errored for t in sweep.trials)
    absent = sum(not t.errored and key not in t.params for t in sweep.trials)
    title = (f"Score against {key}: {len(shown)} trial(s); {errored} errored left out"
             + (f", {absent} without this key (conditional)" if absent else ""))
    ax.set_title(title, fontsize=9)
    path = out_dir / ("score_vs_" + re.sub(r"[^\w.-]", "_", key) + ".png")
    _save(fig, path)
    return Figure(path, title, marks)


def _curve_marks(trial: Trial, series) -> list[Mark]:
    """The trial's spikes, rollbacks, ... placed on its mel curve (one per kind and step)."""
    seen = {(e["kind"], int(e["step"])) for e in trial.run.events or [] if e.get("kind") in CURVE_EVENTS}
    marks = []
    for kind, step in sorted(seen, key=lambda ks: ks[1]):
        y = _value_at(series, step)
        if y is not None:
            marks.append(Mark(kind, float(step), y, f"trial {trial.id}: {kind} @ step {step}"))
    return marks


def plot_mel_curves(sweep: Sweep, out_dir: Path) -> Optional[Figure]:
    curves = [(t, step_series(t.run, "loss_mel")) for t in sweep.trials if t.run is not None]
    curves = [(t, s) for t, s in curves if s is not None]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(10, 5.5))
    marks = []
    for i, (trial, series) in enumerate(curves):  # in score order: the legend lists the best first
        line, = ax.plot(*_broken(series.xs, series.values), lw=1.1, label=trial.id if i < LEGEND_MAX else None)
        for m in _curve_marks(trial, series):
            marker, color = STEP_EVENT_MARKS[m.kind]
            ax.plot([m.x], [m.y], marker=marker, color=color, ms=8, ls="none")
            marks.append(m)
        last = _value_at(series, series.xs[-1])
        if trial.status == "stopped early" and last is not None:
            ax.plot([series.xs[-1]], [last], marker="x", color=line.get_color(), ms=11, mew=2.5, ls="none")
            marks.append(Mark("stopped", float(series.xs[-1]), last, f"trial {trial.id} stopped by ASHA"))
    if len(curves) > LEGEND_MAX:
        ax.plot([], [], ls="none", label=f"... and {len(curves) - LEGEND_MAX} more")
    for kind in dict.fromkeys(m.kind for m in marks):
        marker, color = STEP_EVENT_MARKS.get(kind, ("x", "gray"))
        ax.plot([], [], marker=marker, color=color, ls="none",
                label="stopped early by ASHA" if kind == "stopped" else kind)
    values = [v for _, s in curves for v in s.values if math.isfinite(v)]
    if values and min(values) > 0 and max(values) > LOG_SPAN * min(values):
        ax.set_yscale("log")
    title = f"Mel loss (loss_mel) per global step, {len(curves)} trial(s), legend in score order"
    ax.set(xlabel="global step", ylabel="loss_mel", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right", ncol=2 if len(curves) > 6 else 1)
    path = out_dir / "mel_loss_curves.png"
    _save(fig, path)
    return Figure(path, title, marks)


# --- documents -------------------------------------------------------------------------------

def _number_text(x: float, count: bool = False) -> str:
    if not math.isfinite(x):
        return "–"
    return str(int(x)) if count else fmt(x, 4)


def _score_text(t: Trial) -> str:
    return "–" if t.errored else "diverged" if t.diverged else fmt(t.score, 4)


def _short(error: str) -> str:
    line = error.strip().splitlines()[0] if error.strip() else ""
    return line if len(line) <= ERROR_CHARS else line[:ERROR_CHARS - 1] + "…"


def _header(sweep: Sweep) -> list[Block]:
    by_status = ", ".join(f"{n} {s}" for s, n in sorted(Counter(t.status for t in sweep.trials).items()))
    diverged = sum(t.diverged for t in sweep.trials)
    items = [f"Source: `{sweep.source}`.",
             f"{len(sweep.trials)} trial(s)" + (f": {by_status}" if by_status else "")
             + (f"; {diverged} of them diverged" if diverged else "") + "."]
    if sweep.description:
        items.append(f"Every trial started from: `{sweep.description.get('start_label', 'scratch')}`"
                     + (" (a continuation: that checkpoint's weights, optimizer moments, step, data position "
                        "and guard history)." if sweep.description.get("start") else "."))
    best = sweep.best
    if best is None:
        items.append("No best trial: " + (sweep.why or "no confirmed trial stayed clean" if sweep.confirmations
                                          else "every trial errored or diverged") + ".")
    else:
        settings = ", ".join(f"{k} = {v}" for k, v in best.params.items()) or "none"
        chosen = ("the confirmed trial with the best confirmed score among those that stayed clean"
                  if sweep.confirmations else "lowest score among trials that neither errored nor diverged")
        items.append(f"Best trial ({chosen}): {best.id}, search score {fmt(best.score, 4)} (loss "
                     f"{_number_text(best.numbers['loss'])}, {best.status} at step {best.steps}); settings: "
                     f"{settings}.")
        if sweep.why:
            items.append(f"Why it won: {sweep.why}.")
    if sweep.best_toml:
        items.append(f"The best trial as a recipe: `{sweep.best_toml}`.")
    return [Heading(f"Sweep report: {sweep.name}", 1), Bullets(items)]


def _trials_table(sweep: Sweep) -> list[Block]:
    def margin(t: Trial) -> str:
        ok = t.numbers.get("margin_ok", math.nan)
        if not math.isfinite(ok):
            return "–"
        rise = t.numbers.get("margin_loss_rise", math.nan)
        return ("held" if ok else "failed") + (f" ({rise:+.1%})" if math.isfinite(rise) else "")

    rows = [[t.id, t.status, _score_text(t), _number_text(t.numbers["loss"]),
             *(_number_text(t.numbers[k], count=True) for k in (*HEALTH_COUNTS, "steps")), margin(t),
             _number_text(t.numbers.get("val_noise", math.nan)),
             *(t.params.get(k, "–") for k in sweep.keys), _short(t.error or t.cause)] for t in sweep.trials]
    return [Heading("Trials"),
            Para("By score (lower is better: the mean mel loss of the trial's last validations, inflated by a penalty "
                 "per spike, rollback, non-finite step and blow-up, and for a failed stability margin probe); a trial "
                 "that diverged (its first confirmed instability ended it) scores above every other, errored trials "
                 "last. Margin: the probe at the higher learning rate held or failed, with its mel loss rise against "
                 "the same steps at 1x. Noise: the final validation's standard deviation over seeds. – in a parameter "
                 "column: not searched for that trial."),
            Table(["trial", "status", "score", "loss", "spikes", "rollbacks", "non-finite", "blow-ups", "steps",
                   "margin", "noise", *sweep.keys, "cause / error"], rows)]


def _noise(sweep: Sweep) -> list[Block]:
    """Which score differences exceed the score's own noise."""
    noise = sweep.noise
    blocks: list[Block] = [Heading("Score noise")]
    if not math.isfinite(noise):
        return blocks + [Para("Not measured (no trial repeated its final validation under other seeds).")]
    ranked = [t for t in sweep.trials if not t.errored and not t.diverged]
    items = [f"The score's noise: {fmt(noise, 3)} (median over trials of the final validation's standard deviation "
             f"over seeds; the same weights, only the validation's segments and noise changed). A difference under "
             f"{NOISE_FACTOR} x that, {fmt(NOISE_FACTOR * noise, 3)}, says nothing about the schedules."]
    if len(ranked) >= 2:
        top = ranked[0]
        for t in ranked[1:]:
            gap = t.score - top.score
            items.append(f"{t.id} vs {top.id}: {fmt(gap, 3)} worse, "
                         + ("beyond the noise." if gap > NOISE_FACTOR * noise else "within the noise."))
    return blocks + [Bullets(items)]


def _confirmation(sweep: Sweep) -> list[Block]:
    blocks: list[Block] = [Heading("Long-horizon confirmation")]
    if not sweep.confirmations:
        return blocks + [Para(sweep.why or "No confirmation ran (none asked for, or no trial completed clean "
                                           "with its stability margin).")]
    horizon = sweep.description.get("confirm_steps", "?")
    rows = []
    for c in sweep.confirmations:
        def number(key: str, count: bool = False) -> str:
            value = c.get(key)
            return _number_text(float(value) if value is not None else math.nan, count)

        rise = c.get("margin_loss_rise")
        rows.append([c["trial_id"], number("search_score"), number("confirmed_score"),
                     *(number(k, count=True) for k in ("spikes", "rollbacks", "blowups", "nonfinite_steps")),
                     number("steps", count=True),
                     ("held" if c.get("margin_ok") else "failed") + (f" ({rise:+.1%})" if rise is not None else ""),
                     c.get("drill") or "–", c.get("verdict", "")])
    blocks += [Para(f"The best trials that completed clean with their stability margin, continued from their own "
                    f"checkpoints to {horizon} of their own steps under the stability guard as a real run has it. "
                    f"Counts are what happened during the confirmation."),
               Table(["trial", "search score", "confirmed score", "spikes", "rollbacks", "blow-ups", "non-finite",
                      "steps", "margin", "drill", "verdict"], rows)]
    if sweep.why:
        blocks.append(Para(("Winner: " if sweep.best_id else "No winner: ") + sweep.why + "."))
    return blocks


def _early_stopping(stopping: dict[str, Any]) -> list[Block]:
    blocks: list[Block] = [Heading("Early stopping")]
    if stopping["stopped"]:
        blocks.append(Table(["trial", "stopped at step", "score there"],
                            [[s["trial_id"], str(s["step"]), fmt(s["score"], 4) if s["score"] < DIVERGED_SCORE
                              else "diverged"] for s in stopping["stopped"]]))
    else:
        blocks.append(Para("ASHA stopped no trial."))
    if stopping["compute_saved"] is not None:
        blocks.append(Para(f"Compute saved overall: {stopping['compute_saved']:.1%} (1 − {stopping['steps_run']} "
                           f"steps run / ({stopping['trials']} trials × {stopping['max_steps']} steps); global "
                           f"steps, so steps replayed after a rollback are not counted)."))
    return blocks


def _importances(found: dict[str, float], notes: list[str]) -> list[Block]:
    blocks: list[Block] = [Heading("Parameter importances")]
    if found:
        blocks += [Para("Optuna's default importance evaluator, offline, over the trials that did not error (score as "
                        "the objective; importances sum to 1). With few trials they are rough."),
                   Table(["parameter", "importance"], [[k, fmt(v, 3)] for k, v in found.items()])]
    return blocks + ([Bullets(notes)] if notes else [])


def write_sweep_report(source: str, out_dir: Path) -> Path:
    """Analyse the sweep at `source` into `out_dir`; returns the path of sweep.md.

    Raises `ReportError` when trials.csv is missing or lacks a required column.
    """
    sweep = load_sweep(str(source))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_key = scales(sweep)
    scatters = [plot_score_against(sweep, k, by_key[k], out_dir) for k in sweep.keys]
    curves = plot_mel_curves(sweep, out_dir)
    stopping = early_stopping(sweep)
    found, notes = importances(sweep, by_key)
    blocks = _header(sweep) + _trials_table(sweep) + _noise(sweep) + _confirmation(sweep)
    blocks += [Heading("Score against each searched parameter")]
    blocks += [Image(f.path, f.title) for f in scatters] or [Para("No searched parameters in trials.csv.")]
    blocks += [Heading("Mel loss of every trial")]
    blocks += [Image(curves.path, curves.title)] if curves else [Para("No trial has readable step records.")]
    blocks += _early_stopping(stopping) + _importances(found, notes)
    if sweep.warnings:
        blocks += [Heading("Warnings about the input"), Bullets(sweep.warnings)]
    md_path = out_dir / "sweep.md"
    md_path.write_text(to_markdown(blocks), encoding="utf-8")
    (out_dir / "sweep.html").write_text(to_html(blocks, f"Sweep report: {sweep.name}"), encoding="utf-8")
    figures = scatters + ([curves] if curves else [])
    data = {"sweep": sweep.name, "source": sweep.source, "keys": sweep.keys, "best_toml": sweep.best_toml,
            "best": sweep.best.id if sweep.best else None, "why": sweep.why, "start": sweep.description.get("start_label"),
            "noise": sweep.noise, "confirmations": sweep.confirmations,
            "trials": [{"trial_id": t.id, "status": t.status, **t.numbers, "params": t.params, "error": t.error,
                        "cause": t.cause, "diverged": t.diverged} for t in sweep.trials],
            "early_stopping": stopping, "importances": found, "importance_notes": notes, "warnings": sweep.warnings,
            "figures": [{"file": f.path.name, "title": f.title, "marks": [vars(m) for m in f.marks]} for f in figures]}
    (out_dir / "sweep.json").write_text(json.dumps(json_safe(data), indent=1, ensure_ascii=False), encoding="utf-8")
    return md_path
