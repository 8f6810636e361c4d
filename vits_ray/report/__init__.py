"""Results report of a training run: tables, computed phases, plots, as report.md / .html / .json.

    write_report("runs/NAME", Path("out"))            # a run folder (or s3://bucket/prefix/NAME), with eval/eval.json
    write_report("runs/NAME/metrics.jsonl", out)      # a bare metrics file
    write_report("coqui_run/trainer_0_log.txt", out)  # a Coqui trainer log, or its run folder
    write_sweep_report("sweeps/SWEEP", out)           # a Ray Tune sweep (the folder with trials.csv)

Pieces: `load` (records in; `kinds` sorts records that carry no `kind`), `evaluation` (a run's
eval.json in, its sample WAVs copied out), `analysis` and `quality` (pure numbers), `plots` (PNGs),
`render` (documents); `sweep` (the report of a Ray Tune sweep, drawn and rendered with the same helpers).
"""

from __future__ import annotations

from pathlib import Path

from vits_ray.report.load import ReportError, RunData, load_run

__all__ = ["ReportError", "RunData", "load_run", "write_report", "write_sweep_report"]


def write_report(source: str, out_dir: Path) -> Path:
    """Analyse the run at `source` into `out_dir` (report.md, report.html, report.json, PNGs).

    Returns the path of report.md. Raises `ReportError` for input that cannot be analysed.
    """
    from vits_ray.report.analysis import analyse
    from vits_ray.report.evaluation import load_evaluation
    from vits_ray.report.plots import make_plots
    from vits_ray.report.render import write_documents

    run = load_run(str(source))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # eval.json's sample WAVs are copied into out_dir/samples/ as it is read: the report links them.
    analysis = analyse(run, evaluation=load_evaluation(str(source), out_dir))
    figures = make_plots(analysis, out_dir)
    return write_documents(analysis, figures, out_dir)


def write_sweep_report(source: str, out_dir: Path) -> Path:
    """Analyse the sweep at `source` into `out_dir` (sweep.md, sweep.html, sweep.json, PNGs).

    Returns the path of sweep.md. Raises `ReportError` when trials.csv is missing or incomplete.
    """
    from vits_ray.report.sweep import write_sweep_report as write

    return write(source, out_dir)
