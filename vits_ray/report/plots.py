"""PNG figures of a run (matplotlib, Agg backend: no display needed).

Every plot function returns a `Figure` with the marks it drew (spikes, rollbacks, ...), so tests
can check what was marked without reading pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vits_ray.report.analysis import Analysis, PhaseAnalysis, Series, epoch_of_step, metric_series, step_series  # noqa: E402
from vits_ray.report.load import RunData, finite  # noqa: E402
from vits_ray.report.quality import LABELS, UNITS, QualityTrend, metric_values  # noqa: E402

QUALITY_PLOT = "quality.png"
STEP_EVENT_MARKS = {"spike": ("v", "tab:red"), "nonfinite": ("x", "black"), "amp_collapse": ("s", "tab:purple"),
                    "rollback": ("o", "tab:orange"), "lr_backoff": ("^", "tab:green"),
                    "blowup": ("*", "tab:brown")}


@dataclass(frozen=True)
class Mark:
    kind: str  # "spike", "rollback", "nonfinite", ...
    x: float
    y: float
    label: str


@dataclass
class Figure:
    path: Path
    title: str
    marks: list[Mark] = field(default_factory=list)


def _broken(xs: Sequence[float], ys: Sequence[float]) -> tuple[list[float], list[float]]:
    """Insert a gap wherever x goes back (a rollback replays steps) so lines never loop back."""
    out_x, out_y = [], []
    for i, (x, y) in enumerate(zip(xs, ys)):
        if i and x < xs[i - 1]:
            out_x.append(math.nan)
            out_y.append(math.nan)
        out_x.append(x)
        out_y.append(y)
    return out_x, out_y


def _value_at(series: Optional[Series], x: float) -> Optional[float]:
    if series is None:
        return None
    best = None
    for sx, v in zip(series.xs, series.values):
        if sx <= x and math.isfinite(v):
            best = v
    return best if best is not None else next((v for v in series.values if math.isfinite(v)), None)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def _event_marks(run: RunData, series: Series, kinds: Sequence[str]) -> list[Mark]:
    """Stability events placed on `series` (per step, or mapped to their epoch)."""
    marks = []
    for e in run.events or []:
        if e.get("kind") not in kinds:
            continue
        step = int(e["step"])
        x = step if series.per == "step" else epoch_of_step(run, step)
        if x is None:
            continue
        y = e.get("value") if series.per == "step" and series.key == e.get("series") and finite(e.get("value")) else None
        y = y if y is not None else _value_at(series, x)
        if y is None:
            continue
        detail = e.get("detail") or {}
        label = f"{e['kind']} @ step {step}"
        if e["kind"] == "rollback" and "restored_step" in detail:
            label += f" -> {detail['restored_step']}"
        marks.append(Mark(kind=e["kind"], x=float(x), y=float(y), label=label))
    return marks


def plot_curve(series: Series, path: Path, title: str, ylabel: str, phases: Optional[PhaseAnalysis] = None,
               event_marks: Sequence[Mark] = ()) -> Figure:
    """One loss curve with its computed phases: spikes (red triangles), descent end, plateau band."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    xs, ys = _broken(series.xs, series.values)
    ax.plot(xs, ys, lw=1.2, color="tab:blue", label=series.key)
    marks: list[Mark] = []
    if phases is not None:
        if phases.plateau_level is not None and phases.band is not None:
            ax.axhspan(phases.plateau_level - phases.band, phases.plateau_level + phases.band, color="tab:green",
                       alpha=0.12, label=f"plateau band {phases.plateau_level:.2f} ± {phases.band:.2f}")
        if phases.descent_end_x is not None:
            ax.axvline(phases.descent_end_x, color="tab:green", ls="--", lw=1,
                       label=f"descent ends ({series.per} {phases.descent_end_x})")
        for s in phases.spikes:
            marks.append(Mark("spike", float(s.peak_x), s.peak_value,
                              f"spike {series.per} {s.peak_x}: {s.peak_value:.2f} (+{s.size:.2f})"))
            if s.recovery_x is not None:
                ax.axvspan(s.start_x, s.recovery_x, color="tab:red", alpha=0.08)
    marks += list(event_marks)
    stacked: dict[float, int] = {}  # labels of marks at the same x go one above the other
    for m in marks:
        marker, color = STEP_EVENT_MARKS.get(m.kind, ("D", "gray"))
        ax.plot([m.x], [m.y], marker=marker, color=color, ms=9, ls="none")
        level = stacked.get(m.x, 0)
        stacked[m.x] = level + 1
        ax.annotate(m.label, (m.x, m.y), textcoords="offset points", xytext=(6, 6 + 11 * level), fontsize=8,
                    color=color)
    ax.set_xlabel(series.per)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    _save(fig, path)
    return Figure(path=path, title=title, marks=marks)


def plot_panels(panels: Sequence[tuple[str, Series]], path: Path, title: str, logy: Sequence[bool] = (),
                event_marks: Optional[dict[str, list[Mark]]] = None) -> Figure:
    """Several series, one small panel each (shared x kind)."""
    n = len(panels)
    cols = 2 if n > 1 else 1
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(10, 3 * rows), squeeze=False)
    marks: list[Mark] = []
    for i, (label, series) in enumerate(panels):
        ax = axes[i // cols][i % cols]
        xs, ys = _broken(series.xs, series.values)
        ax.plot(xs, ys, lw=0.9)
        for m in (event_marks or {}).get(label, []):
            marker, color = STEP_EVENT_MARKS.get(m.kind, ("D", "gray"))
            ax.plot([m.x], [m.y], marker=marker, color=color, ms=7, ls="none")
            marks.append(m)
        if i < len(logy) and logy[i] and all(v > 0 for v in series.values if math.isfinite(v)):
            ax.set_yscale("log", base=2 if "amp" in label else 10)
        ax.set_title(f"{label} (per {series.per})", fontsize=9)
        ax.set_xlabel(series.per, fontsize=8)
        ax.grid(alpha=0.3)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle(title)
    _save(fig, path)
    return Figure(path=path, title=title, marks=marks)


def plot_quality(trend: QualityTrend, records: Sequence[dict], path: Path) -> Figure:
    """Each measured quality metric over training, one panel each, points joined (evaluations are
    sparse, and a single one must still show); the lowest MCD is marked, and so is each evaluation
    that scored nothing (a dotted line: a gap alone would hide that it happened)."""
    n = len(trend.metrics)
    cols = 2 if n > 1 else 1
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(10, 3 * rows), squeeze=False)
    marks: list[Mark] = []
    for i, key in enumerate(trend.metrics):
        ax = axes[i // cols][i % cols]
        values = metric_values(list(records), key)
        ax.plot(trend.xs, values, marker="o", ms=4, lw=1.0)
        unscored = [x for x, v in zip(trend.xs, values) if not math.isfinite(v)]
        for j, x in enumerate(unscored):
            ax.axvline(x, color="gray", ls=":", lw=1, label="not scored" if j == 0 else None)
        if unscored:
            ax.legend(fontsize=7, loc="upper right")
        if key == "mcd_dtw_db":
            marks += [Mark("unscored", x, math.nan, f"no MCD at {trend.x_key} {x:g}") for x in unscored]
            if trend.best_index is not None:
                x, y = trend.xs[trend.best_index], float(records[trend.best_index][key])
                ax.plot([x], [y], marker="*", color="tab:green", ms=12, ls="none")
                ax.annotate(f"lowest {y:.2f}", (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8,
                            color="tab:green")
                marks.append(Mark("best", x, y, f"lowest MCD {y:.2f} dB at {trend.x_key} {x:g}"))
        unit = UNITS.get(key)
        ax.set_title(f"{LABELS.get(key, key)}" + (f" ({unit})" if unit else ""), fontsize=9)
        ax.set_xlabel(trend.x_key, fontsize=8)
        ax.grid(alpha=0.3)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    title = f"Objective quality during training ({trend.count} evaluation(s))"
    fig.suptitle(title)
    _save(fig, path)
    return Figure(path=path, title=title, marks=marks)


def make_plots(analysis: Analysis, out_dir: Path) -> list[Figure]:
    run = analysis.run
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: list[Figure] = []
    phases = {p.name: p for p in analysis.phases}
    marked = ("spike", "rollback", "nonfinite", "amp_collapse", "blowup")

    for name, fname, title in (("avg_loss_1", "generator_loss.png", "Generator loss (avg_loss_1)"),
                               ("avg_loss_0", "discriminator_loss.png", "Discriminator loss (avg_loss_0)")):
        series = metric_series(run, name)
        if series is not None:
            title = f"{title} per {series.per}"
            figures.append(plot_curve(series, out_dir / fname, title, name, phases.get(name),
                                      _event_marks(run, series, marked)))

    gen_steps = step_series(run, "loss_1")
    if gen_steps is not None and run.epochs:
        # The per-step generator loss: where the guard's events (which are per step) sit exactly.
        figures.append(plot_curve(gen_steps, out_dir / "generator_loss_steps.png", "Generator loss (loss_1) per step",
                                  "loss_1", None, _event_marks(run, gen_steps, marked)))

    def panels(keys: Sequence[str]) -> list[tuple[str, Series]]:
        out = []
        for key in keys:
            series = step_series(run, key) or metric_series(run, key)
            if series is not None:
                out.append((key, series))
        return out

    specs = [
        ("loss_components.png", "Loss components", ("loss_mel", "loss_kl", "loss_feat", "loss_duration", "loss_gen",
                                                    "loss_disc"), False),
        ("grad_norms.png", "Gradient norms (0: discriminator, 1: generator)", ("grad_norm_0", "grad_norm_1"), True),
        ("learning_rates.png", "Learning rates (0: discriminator, 1: generator)", ("lr_0", "lr_1"), True),
        ("amp_scale.png", "GradScaler loss scale (AMP; not memory)", ("amp_scale",), True),
        ("timing.png", "Time per step and data loading time (s)", ("step_time", "loader_time"), False),
    ]
    for fname, title, keys, logy in specs:
        chosen = panels(keys)
        if not chosen:
            continue
        marks = {label: _event_marks(run, series, ("rollback", "lr_backoff") if "lr" in fname else marked)
                 for label, series in chosen}
        figures.append(plot_panels(chosen, out_dir / fname, title, [logy] * len(chosen), marks))

    if analysis.balance is not None and analysis.balance.ratio_values:
        b = analysis.balance
        ratio = Series("ratio", "avg_loss_1/avg_loss_0", b.per, b.ratio_xs, b.ratio_values, [], [])
        figures.append(plot_panels([("generator / discriminator loss", ratio)], out_dir / "balance.png",
                                   "Generator / discriminator loss ratio"))
    if analysis.quality is not None and analysis.quality.metrics:
        figures.append(plot_quality(analysis.quality, run.quality, out_dir / QUALITY_PLOT))
    return figures
