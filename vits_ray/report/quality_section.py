"""The Quality section of the training report: what eval.json and the run's quality records
measured, in tables and words, the samples to listen to, and the trend over training.

It states what was measured and how (units, method, failures); it never grades the voice: these
are distances to reference recordings, and no listening test is part of the report.
"""

from __future__ import annotations

import json
import math
from typing import Any

from vits_ray.report.analysis import Analysis
from vits_ray.report.document import Block, Bullets, Heading, Image, Para, SampleTable, Table, fmt
from vits_ray.report.plots import QUALITY_PLOT, Figure
from vits_ray.report.quality import (MCD_CAVEAT, METRICS, UNITS, Evaluation, QualityTrend, Sample, c0_handling,
                                     evaluation_metrics, other_fields)


NO_QUALITY = ("No quality metric (listening test or objective measure) was recorded for this run, so this report "
              "makes no claim about voice quality. Training and validation losses alone do not show how the "
              "synthesized speech sounds.")


def quality_section(a: Analysis, figures: dict[str, Figure]) -> list[Block]:
    blocks: list[Block] = [Heading("Quality")]
    if a.quality is None and a.evaluation is None:
        return blocks + [Para(NO_QUALITY)]
    blocks.append(Para("Objective measures only: distances between synthesised speech and recordings of the same "
                       "text, stated as measured. No listening test is part of this report, and these distances do "
                       "not by themselves say how the voice sounds to a listener."))
    if a.evaluation is not None:
        blocks += _evaluation(a.evaluation)
    if a.quality is not None:
        blocks += _quality_trend(a.quality, a.run.quality, figures)
    return blocks


def _value(key: str, x: Any) -> str:
    """A measured value: counts as integers, fractions and ratios with three decimals."""
    if isinstance(x, bool) or x is None:
        return "–"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return fmt(x, 3 if UNITS.get(key) in ("fraction", "ratio", "× real time") else 2)
    return str(x)


def _evaluation(ev: Evaluation) -> list[Block]:
    blocks: list[Block] = [Heading("Evaluation set (eval.json)", 3)]
    if ev.error:
        return blocks + [Para(f"Found `{ev.url}` but cannot use it: {ev.error}.")]
    d = ev.data
    metrics = evaluation_metrics(d)
    rows = [[m.key, m.unit or "–", _value(m.key, m.mean), _value(m.key, m.median),
             "–" if m.ci95 is None else f"{_value(m.key, m.ci95[0])} to {_value(m.key, m.ci95[1])}",
             "–" if m.n is None else str(m.n)] for m in metrics]
    meanings = [f"{key}: {meaning}." for key, _, _, meaning in METRICS if any(m.key == key for m in metrics)]
    if d.get("rtf_threads") is not None and any(m.key.startswith("rtf_") for m in metrics):
        meanings.append(f"RTF measured with {d['rtf_threads']} CPU thread(s).")
    meanings.append("95% CI: the interval eval.json gives for the mean over the n utterances.")
    blocks += [Bullets(_what_was_evaluated(ev)), Table(["metric", "unit", "mean", "median", "95% CI", "n"], rows),
               Bullets(meanings)]
    errors = [e for e in d.get("errors") or [] if isinstance(e, dict)]
    if errors:
        shown = [f"{e.get('id', '?')}: {e.get('error', '')}" for e in errors[:ERRORS_SHOWN]]
        more = [f"and {len(errors) - ERRORS_SHOWN} more (all in eval.json)"] if len(errors) > ERRORS_SHOWN else []
        blocks += [Para(f"{len(errors)} utterance(s) failed:"), Bullets(shown + more)]
    blocks += _method(d.get("method"))
    blocks += _samples(ev.samples)
    if ev.notes:
        blocks.append(Bullets(list(ev.notes)))
    return blocks


ERRORS_SHOWN = 10  # failed utterances listed one by one; eval.json has them all


def _what_was_evaluated(ev: Evaluation) -> list[str]:
    d = ev.data
    items = [f"Read from `{ev.url}`."]
    if d.get("model") is not None:
        items.append(f"Synthesised by `{d['model']}`" + (f" at training step {d['model_step']}"
                                                         if d.get("model_step") is not None else "") + ".")
    if d.get("data") is not None or d.get("split") is not None:
        items.append(f"Texts and reference recordings: `{d.get('data', '–')}`, split `{d.get('split', '–')}`.")
    if d.get("synthesized") is not None or d.get("reference") is not None:
        # Two folders of WAVs compared file by file.
        items.append(f"WAVs in `{d.get('synthesized', '–')}` compared with the WAVs of the same name in "
                     f"`{d.get('reference', '–')}`.")
    for key, side in (("unmatched_reference", "reference"), ("unmatched_synthesized", "synthesised")):
        names = d.get(key)
        if isinstance(names, list) and names:
            items.append(f"{len(names)} {side} file(s) without a partner, not scored: "
                         + ", ".join(map(str, names[:5])) + (", ..." if len(names) > 5 else "") + ".")
    if d.get("utterances") is not None:
        items.append(f"{d['utterances']} utterance(s) scored, {d.get('failed', '–')} failed (synthesis or analysis "
                     "failed); n below is how many utterances each metric could be scored on.")
    others = other_fields(d)
    if others:
        items.append("Also recorded: " + ", ".join(f"{k} = {json.dumps(v, ensure_ascii=False)}"
                                                   for k, v in others.items()) + ".")
    return items


def _method(method: Any) -> list[Block]:
    blocks: list[Block] = [Heading("How it was measured", 3)]
    if not isinstance(method, dict):
        return blocks + [Para("eval.json does not describe its method. " + MCD_CAVEAT)]
    shown = ("frame_period_ms", "cepstrum_order")
    items = [f"Frame period: {method.get('frame_period_ms', 'not stated')} ms; cepstrum order: "
             f"{method.get('cepstrum_order', 'not stated')}; c0 (energy term) in the MCD: {c0_handling(method)}.",
             MCD_CAVEAT]
    # As code: the formulas' * and _ would otherwise turn into emphasis in a markdown viewer.
    items += [f"{key}: `{text.replace('`', '')}`" for key, text in method.items() if isinstance(text, str)]
    settings = [f"{key} = {value}" for key, value in method.items() if not isinstance(value, str) and key not in shown]
    if settings:
        items.append("Other settings: " + ", ".join(settings) + ".")
    return blocks + [Bullets(items)]


def _samples(samples: list[Sample]) -> list[Block]:
    blocks: list[Block] = [Heading("Samples", 3)]
    if not samples:
        return blocks + [Para("eval.json lists no samples.")]
    problems = [f"{s.id}: {which} `{f.source}`: {f.problem}" for s in samples
                for which, f in (("reference", s.reference), ("synthesised", s.synthesized)) if f and f.problem]
    blocks += [Para(f"{len(samples)} sample(s): the reference recording and the synthesised rendering of the same "
                    "text, copied into samples/ beside this report."), SampleTable(samples)]
    if problems:
        blocks += [Para(f"{len(problems)} sample file(s) could not be copied:"), Bullets(problems)]
    return blocks


def _quality_trend(trend: QualityTrend, records: list[dict[str, Any]], figures: dict[str, Figure]) -> list[Block]:
    context = [k for k in ("step", "epoch", "utterances", "failed") if any(k in r for r in records)]
    best = trend.best

    def row(key: str, counted: bool) -> list[str]:
        unit = UNITS.get(key, "–") if counted else ""
        cells = [_value(key, r.get(key)) if r is not None else "–" for r in (trend.first, trend.last, best)]
        scored = sum(isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) for r in records)
        return [key, unit, *cells, str(scored) if counted else ""]

    span = (f", {trend.x_key}s {trend.xs[0]:g} to {trend.xs[-1]:g}" if trend.x_key != "evaluation" else "")
    blocks: list[Block] = [
        Heading("During training (quality records)", 3),
        Para(f"{trend.count} quality record(s){span}. Each holds the means over the utterances it names "
             "(`utterances`; `failed` counts those whose synthesis or analysis failed). Best: the record with the "
             "lowest MCD; its other values come from that same evaluation. The last column counts the records "
             "with a finite value."),
        Table(["", "unit", "first", "last", "best (lowest MCD)", "records"],
              [row(k, False) for k in context] + [row(k, True) for k in trend.metrics]),
    ]
    if QUALITY_PLOT in figures:
        blocks.append(Image(figures[QUALITY_PLOT].path, figures[QUALITY_PLOT].title))
    return blocks
