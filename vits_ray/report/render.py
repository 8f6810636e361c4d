"""The training report: its sections as blocks (see `document`), written as report.md,
report.html (PNGs inlined as base64) and report.json (raw numbers).

Every number comes from `Analysis`; sentences describe, they never grade (no "healthy", no
"production-ready"): losses and objective distances are stated as measured, not turned into a
judgement of the voice. The Quality section is `quality_section`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from vits_ray.report.analysis import Analysis, Point
from vits_ray.report.document import Block, Bullets, Heading, Image, Para, Table, fmt, json_safe, to_html, to_markdown
from vits_ray.report.plots import Figure
from vits_ray.report.quality_section import quality_section


def _at(p: Optional[Point], per: str) -> str:
    if p is None:
        return "–"
    if per == "epoch":
        return f"epoch {p.epoch}"
    return f"step {p.step}"


def _pct(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:+.2f}%"


# --- sections ----------------------------------------------------------------------------

def _overview(a: Analysis) -> list[Block]:
    r = a.run
    steps = [s["step"] for s in r.steps]
    lines = [f"Source: `{r.source}` ({'Coqui trainer log' if r.origin == 'coqui' else 'vits-ray metrics'}).",
             f"Records: {len(r.steps)} step, {len(r.epochs)} epoch, {len(r.vals)} validation, "
             f"{len(r.checkpoints)} checkpoint, {len(r.quality)} quality."]
    if steps:
        lines.append(f"Steps {min(steps)} to {max(steps)}" + (f", epochs {r.epochs[0]['epoch']} to {r.epochs[-1]['epoch']}"
                                                              if r.epochs else "") + ".")
    elif r.epochs:
        lines.append(f"Epochs {r.epochs[0]['epoch']} to {r.epochs[-1]['epoch']}; there are no step records, so "
                     "every curve is per epoch.")
    if not r.epochs:
        lines.append("This run has no epoch records yet, so the per-epoch metrics below (avg_loss_1, avg_loss_0 "
                     "and the rest) are computed from the step records (loss_1, loss_0, ...), per step.")
    if r.origin == "coqui":
        lines.append("Steps are Coqui's GLOBAL_STEP as printed (counted from 0). Epoch averages are Coqui's own "
                     "running averages as printed in the log; with an evaluation they come from the epoch's last "
                     "step block, and the EVAL PERFORMANCE averages are the validation records.")
        from vits_ray.report.analysis import coqui_epoch_averages

        checks = coqui_epoch_averages(r)
        if checks:
            epoch, printed, mean_all, mean_rest = checks[0]
            lines.append(f"Coqui's running averages leave out the first step of each epoch (its KeepAverage starts "
                         f"counting at 0): epoch {epoch} prints avg_loss_1 {fmt(printed, 4)}; the mean of all its "
                         f"steps is {fmt(mean_all, 4)}, without the first {fmt(mean_rest, 4)}."
                         if abs(printed - mean_rest) < abs(printed - mean_all) else
                         f"Epoch {epoch} prints avg_loss_1 {fmt(printed, 4)}; the mean of all its steps is "
                         f"{fmt(mean_all, 4)}.")
    blocks: list[Block] = [Heading("Overview"), Bullets(lines)]
    if r.warnings:
        blocks += [Heading("Warnings about the input", 3), Bullets(list(r.warnings))]
    return blocks


def _summary(a: Analysis) -> list[Block]:
    rows = []
    for s in a.summaries:
        src = f"{s.key} per {s.per}"
        rows.append([s.name, src, fmt(s.first.value if s.first else None), fmt(s.last.value if s.last else None),
                     fmt(s.min.value if s.min else None), _at(s.min, s.per),
                     fmt(s.max.value if s.max else None), _at(s.max, s.per), _pct(s.change_pct),
                     str(s.nonfinite)])
    return [Heading("Summary of key metrics"),
            Para("First, last, minimum and maximum of the finite values (where each minimum and maximum first "
                 "occurs), and the change from first to last in percent of the first. Raw numbers are in "
                 "report.json."),
            Table(["metric", "from", "first", "last", "min", "min at", "max", "max at", "change", "non-finite"], rows)]


def _phases(a: Analysis, figures: dict[str, Figure]) -> list[Block]:
    blocks: list[Block] = [Heading("Phases of training"), Para(
        "Computed from the curve, not asserted. Plateau level: median of the second half of the series; band: "
        "the larger of 3 × 1.4826 × its MAD and 5% of the level. Descent: from the start until the centred "
        "5-point rolling median first lies within the band. Spikes: vits_ray.stability.find_spikes, the "
        "training guard's robust detector (per-epoch settings for per-epoch series); a spike has recovered when "
        "the curve is back under the detector's pre-spike threshold, and has settled when the rolling median is "
        "back within the plateau band.")]
    for p in a.phases:
        unit = p.per
        blocks.append(Heading(f"{p.name} (per {unit})", 3))
        items = []
        if p.plateau_level is not None:
            items.append(f"Plateau level {fmt(p.plateau_level)}, band ± {fmt(p.band)}.")
        if p.descent_end_x is not None:
            items.append(f"Descent from the start to {unit} {p.descent_end_x}, where the rolling median first lies "
                         f"within the band.")
        elif p.plateau_level is not None:
            items.append("No descent phase: the curve does not start above the band.")
        if p.note:
            items.append(p.note[0].upper() + p.note[1:] + ".")
        items.append(f"{len(p.spikes)} spike(s) found." if p.spikes or not p.note else "")
        blocks.append(Bullets([i for i in items if i]))
        if p.phases:
            blocks.append(Table(["phase", f"from {unit}", f"to {unit}", "first", "last", "median", "min", "max"],
                                [[ph.kind, str(ph.start_x), str(ph.end_x), fmt(ph.first), fmt(ph.last),
                                  fmt(ph.median), fmt(ph.min), fmt(ph.max)] for ph in p.phases]))
        if p.spikes:
            blocks.append(Table(
                ["starts", "peak at", "peak", "baseline", "size", "size %", "recovered at", "recovery length",
                 "settled at"],
                [[f"{unit} {s.start_x}", f"{unit} {s.peak_x}", fmt(s.peak_value), fmt(s.baseline), fmt(s.size),
                  fmt(s.size_pct), "not recovered" if s.recovery_x is None else f"{unit} {s.recovery_x}",
                  "–" if s.recovery_length is None else f"{s.recovery_length} {unit}s",
                  "not settled" if s.settle_x is None else f"{unit} {s.settle_x}"] for s in p.spikes]))
        fig = figures.get("generator_loss.png" if p.name == "avg_loss_1" else "discriminator_loss.png")
        if fig:
            blocks.append(Image(fig.path, fig.title))
    return blocks


# The guard's word on each checkpoint: shown with the checkpoints, not among the stability events.
CHECKPOINT_EVENTS = ("checkpoint_verdict", "checkpoint_postponed")


def _events(a: Analysis) -> list[Block]:
    r = a.run
    blocks: list[Block] = [Heading("Stability events")]
    if r.origin == "coqui":
        return blocks + [Para("Coqui's trainer has no stability guard; this run has no events file.")]
    if r.events is None:
        return blocks + [Para("This run has no events file (events.jsonl), and metrics.jsonl holds no event "
                              "records.")]
    events = [e for e in r.events if e.get("kind") not in CHECKPOINT_EVENTS]
    if not events:
        return blocks + [Para(f"No stability events recorded (none in {r.events_origin}).")]
    counts: dict[str, int] = {}
    for e in events:
        counts[e.get("kind", "?")] = counts.get(e.get("kind", "?"), 0) + 1
    rows = []
    for e in events:
        detail = e.get("detail") or {}
        rows.append([str(e.get("step")), str(e.get("kind")), str(e.get("series") or "–"),
                     fmt(e.get("value")) if isinstance(e.get("value"), (int, float)) else "–",
                     fmt(e.get("median")) if isinstance(e.get("median"), (int, float)) else "–",
                     fmt(e.get("threshold")) if isinstance(e.get("threshold"), (int, float)) else "–",
                     ", ".join(f"{k}={v}" for k, v in detail.items()) or "–"])
    return blocks + [Para(f"{len(events)} event(s) from {r.events_origin}: "
                          + ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) + "."),
                     Table(["step", "kind", "series", "value", "median", "threshold", "detail"], rows)]


def _balance(a: Analysis, figures: dict[str, Figure]) -> list[Block]:
    b = a.balance
    blocks: list[Block] = [Heading("Generator / discriminator balance")]
    if b is None or b.ratio is None:
        return blocks + [Para("Not available: the run lacks matching generator and discriminator losses.")]
    items = [f"Ratio of generator to discriminator total loss (per {b.per}): first {fmt(b.ratio_first)}, last "
             f"{fmt(b.ratio_last)}, median {fmt(b.ratio.median)}, range {fmt(b.ratio.min)} to {fmt(b.ratio.max)}."]
    if b.discriminator is not None:
        d = b.discriminator
        items.append(f"Discriminator loss range {fmt(d.min)} to {fmt(d.max)} (10th to 90th percentile "
                     f"{fmt(d.p10)} to {fmt(d.p90)}), mean {fmt(d.mean)}, standard deviation {fmt(d.std)}.")
    o = b.discriminator_oscillation
    if o is not None:
        items.append(f"Discriminator oscillation: {o.turning_points} turning points in {b.discriminator.count} "
                     f"points, mean absolute change {fmt(o.mean_abs_change)} per {b.per}"
                     + (f", local maxima on average {fmt(o.mean_peak_distance, 1)} {b.per}s apart."
                        if o.mean_peak_distance is not None else "."))
    items.append("These numbers describe the curves; no criterion for a good balance is applied.")
    blocks.append(Bullets(items))
    if "balance.png" in figures:
        blocks.append(Image(figures["balance.png"].path, figures["balance.png"].title))
    return blocks


def _timing(a: Analysis, figures: dict[str, Figure]) -> list[Block]:
    t = a.timing
    blocks: list[Block] = [Heading("Time per step and data loading")]
    if t is None:
        return blocks + [Para("No step_time / loader_time in the records.")]
    items = []
    if t.step_time:
        s = t.step_time
        items.append(f"step_time per {t.per}: median {fmt(s.median, 3)} s, mean {fmt(s.mean, 3)} s, 10th to 90th "
                     f"percentile {fmt(s.p10, 3)} to {fmt(s.p90, 3)} s, range {fmt(s.min, 3)} to {fmt(s.max, 3)} s.")
    if t.loader_time:
        s = t.loader_time
        items.append(f"loader_time per {t.per}: median {fmt(s.median, 4)} s, range {fmt(s.min, 4)} to "
                     f"{fmt(s.max, 4)} s.")
    if t.loader_share_pct is not None:
        how = ("step_time spans the whole iteration, data wait included" if t.step_time_includes_loader
               else "Coqui's step_time excludes the data wait, so the share is loader / (step + loader)")
        items.append(f"Share of the time spent waiting for data: {fmt(t.loader_share_pct)}% ({how}).")
    if t.audio_seconds is not None and t.total_wall_seconds:
        items.append(f"Audio trained on: {fmt(t.audio_seconds, 1)} s in {fmt(t.total_wall_seconds, 1)} s of step "
                     f"time, {fmt(t.audio_seconds_per_second)} audio seconds per second.")
    blocks.append(Bullets(items))
    amp = a.amp
    blocks.append(Heading("AMP loss scale", 3))
    if amp is None:
        blocks.append(Para("No amp_scale in the records."))
    else:
        blocks.append(Para(
            f"amp_scale is the GradScaler's loss scale (the factor the loss is multiplied by before backward so "
            f"fp16 gradients do not underflow); it says nothing about memory use. First {fmt(amp.first)}, last "
            f"{fmt(amp.last)}, range {fmt(amp.min)} to {fmt(amp.max)}; it decreased {amp.decreases} time(s) "
            f"(each after a step with non-finite gradients) and increased {amp.increases} time(s). Skipped optimizer "
            f"steps: discriminator {amp.skipped_0}, generator {amp.skipped_1}."
            + (" A constant scale of 1.00 means no GradScaler was in use (fp32 or bf16)." if amp.min == amp.max == 1.0
               else "")
            + "".join(f" Calibration of a fresh GradScaler: {c.get('skipped_steps')} skipped step(s), scale "
                      f"{float(c.get('initial_scale', 'nan')):g} -> {float(c.get('scale', 'nan')):g} "
                      f"by step {c.get('step')}." for c in amp.calibrations)))
    for name in ("timing.png", "amp_scale.png"):
        if name in figures:
            blocks.append(Image(figures[name].path, figures[name].title))
    return blocks


def _where(record: dict[str, Any]) -> str:
    # Exported tables may carry an epoch and no step.
    for key in ("step", "epoch"):
        if isinstance(record.get(key), (int, float)):
            return f"{key} {record[key]}"
    return "–"


def _validation(a: Analysis) -> list[Block]:
    r = a.run
    blocks: list[Block] = [Heading("Validation")]
    if not r.vals:
        return blocks + [Para("No validation records.")]
    keys = sorted({k for v in r.vals for k in v if k.startswith("val_") and isinstance(v[k], (int, float))})
    rows = []
    for key in keys:
        pts = [(v, v[key]) for v in r.vals if isinstance(v.get(key), (int, float)) and math.isfinite(v[key])]
        if not pts:
            continue
        lo = min(pts, key=lambda p: p[1])
        rows.append([key, fmt(pts[0][1]), fmt(pts[-1][1]), fmt(lo[1]), _where(lo[0]), str(len(pts))])
    return blocks + [Para(f"{len(r.vals)} validation record(s) (losses on held-out utterances)."),
                     Table(["metric", "first", "last", "min", "min at", "records"], rows)]


def _checkpoints(a: Analysis) -> list[Block]:
    from vits_ray.report.analysis import checkpoints_agree

    r = a.run
    if not r.checkpoints:
        return []
    agree, total = checkpoints_agree(r)
    best = [c["step"] for c in r.checkpoints if c.get("best")]
    items = [f"{len(r.checkpoints)} checkpoint(s), steps {r.checkpoints[0]['step']} to {r.checkpoints[-1]['step']}."]
    if total:
        items.append(f"Per-rank parameter checksums identical at {agree} of {total} checkpoint(s).")
    if best:
        items.append(f"Marked best (lowest validation mel loss so far) at step(s) {', '.join(map(str, best))}.")
    return [Heading("Checkpoints"), Bullets(items)] + _checkpoint_verdicts(r.events or [])


def _checkpoint_verdicts(events: list[dict]) -> list[Block]:
    """The stability guard's word on each checkpoint: when written (clean, unjudged, suspect), a
    save postponed while it judged, and the checkpoints a rollback found poisoned or passed over.
    Every verdict is counted; the table lists all but the plain clean ones (hundreds in a long run)."""
    rows, counts = [], {}
    for e in events:
        if e.get("kind") not in CHECKPOINT_EVENTS:
            continue
        d = e.get("detail") or {}
        verdict = "postponed" if e["kind"] == "checkpoint_postponed" else str(d.get("verdict"))
        counts[verdict] = counts.get(verdict, 0) + 1
        if verdict == "clean" and not d.get("postponed_from"):
            continue
        when = (f"written at step {e.get('step')}" if "generation" in d
                else f"save due at step {e.get('step')}" if verdict == "postponed"
                else f"rollback at step {e.get('step')}")
        where = d.get("checkpoint") or "–"
        reason = d.get("reason") or "–"
        if d.get("postponed_from"):
            reason = f"postponed from step {d['postponed_from']}" + ("" if reason == "–" else f"; {reason}")
        rows.append([when, where, verdict, reason])
    if not counts:
        return []
    blocks: list[Block] = [
        Heading("Checkpoint verdicts", 3),
        Para("The stability guard's word on each checkpoint: clean (judged within every band), unjudged (before "
             "the detectors had a baseline), suspect (a save that could not wait, e.g. a run's last), postponed "
             "(a save that waited for the guard), poisoned (at or after the step where trouble began: never "
             "rolled back to) and passed over (rolled back to too often). Counts: "
             + ", ".join(f"{k} {n}" for k, n in sorted(counts.items())) + ".")]
    if rows:
        blocks.append(Table(["when", "checkpoint", "verdict", "reason"], rows))
    return blocks


def _more_plots(figures: dict[str, Figure]) -> list[Block]:
    names = ("generator_loss_steps.png", "loss_components.png", "grad_norms.png", "learning_rates.png")
    shown = [figures[n] for n in names if n in figures]
    if not shown:
        return []
    return [Heading("More curves")] + [Image(f.path, f.title) for f in shown]


def build_blocks(a: Analysis, figures: Sequence[Figure]) -> list[Block]:
    by_name = {f.path.name: f for f in figures}
    return ([Heading("Training report", 1)] + _overview(a) + _summary(a) + _phases(a, by_name) + _events(a)
            + _balance(a, by_name) + _timing(a, by_name) + _validation(a) + quality_section(a, by_name)
            + _checkpoints(a) + _more_plots(by_name))


def write_documents(a: Analysis, figures: Sequence[Figure], out_dir: Path) -> Path:
    blocks = build_blocks(a, figures)
    md_path = out_dir / "report.md"
    md_path.write_text(to_markdown(blocks), encoding="utf-8")
    (out_dir / "report.html").write_text(to_html(blocks, f"Training report: {a.run.source}"), encoding="utf-8")
    data = a.to_json()
    data["figures"] = [{"file": f.path.name, "title": f.title,
                        "marks": [{"kind": m.kind, "x": m.x, "y": m.y, "label": m.label} for m in f.marks]}
                       for f in figures]
    (out_dir / "report.json").write_text(json.dumps(json_safe(data), indent=1, ensure_ascii=False), encoding="utf-8")
    return md_path
