"""Find a run's eval.json (written by `vits-ray evaluate`), read it, and copy its sample WAVs
into the report's folder, so the report can link them.

Where eval.json is looked for (local paths and s3:// URIs alike, through `vits_ray.storage`):
- the source is a run folder RUN: `RUN/eval/eval.json`;
- the source is a file (a metrics .jsonl, a Coqui trainer log): `eval.json`, then `eval/eval.json`,
  in that file's folder. When both exist the first is used and the report says so.

Sample paths in eval.json are relative to its own folder. A sample that is missing or cannot be
read is reported as such beside the others; it never stops the report. An eval.json that is not
a JSON object is reported in the Quality section instead of being used. A storage outage that
outlasts the store's retries is a `ReportError`, as it is for the run's records.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from vits_ray.evaluate import EVAL_JSON, RUN_EVAL_DIR
from vits_ray.report.load import ReportError
from vits_ray.report.quality import Evaluation, Sample, SampleFile

EVAL_FILE = EVAL_JSON
RUN_EVAL = f"{RUN_EVAL_DIR}/{EVAL_JSON}"
SAMPLES_DIR = "samples"  # under the report's folder


def eval_json_places(source: str) -> tuple[str, list[str]]:
    """(folder, the paths under it where eval.json may be, in order) for a report source."""
    if source.startswith("s3://"):
        uri = source.rstrip("/")
        # The only files load_run reads from S3 are .jsonl; anything else there is a run folder.
        if uri.endswith(".jsonl"):
            return uri.rsplit("/", 1)[0], [EVAL_FILE, RUN_EVAL]
        return uri, [RUN_EVAL]
    path = Path(source[len("file://"):] if source.startswith("file://") else source).expanduser()
    if path.is_file():
        return str(path.parent), [EVAL_FILE, RUN_EVAL]
    return str(path), [RUN_EVAL]


def load_evaluation(source: str, out_dir: Path) -> Optional[Evaluation]:
    """The eval.json beside `source`, its samples copied under `out_dir/samples/`; None when there is none."""
    from vits_ray.storage import StorageError, open_store

    folder, places = eval_json_places(source)
    try:
        store = open_store(folder)
        found = [rel for rel in places if store.exists(rel)]
        if not found:
            return None
        rel = found[0]
        evaluation = Evaluation(url=store.url(rel))
        evaluation.notes += [f"{store.url(other)} also exists and was not used" for other in found[1:]]
        raw = store.read_bytes(rel)
        home = store.child(rel.rpartition("/")[0]) if "/" in rel else store
    except StorageError as err:
        raise ReportError(f"{folder}: cannot read eval.json: {err}") from err
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        evaluation.error = f"not valid JSON ({err})"
        return evaluation
    if not isinstance(data, dict):
        evaluation.error = f"expected a JSON object, got {type(data).__name__}"
        return evaluation
    evaluation.data = data
    evaluation.samples = copy_samples(data.get("samples"), home, Path(out_dir), evaluation.notes)
    return evaluation


def copy_samples(entries: Any, home, out_dir: Path, notes: list[str]) -> list[Sample]:
    """Copy each sample's reference and synthesised WAV from `home` (eval.json's folder) to
    `out_dir/samples/`; a file that cannot be copied keeps its reason instead."""
    if entries is None:
        return []
    if not isinstance(entries, list):
        notes.append(f"`samples` is a {type(entries).__name__}, not a list; no samples shown")
        return []
    used: set[str] = set()
    samples = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            notes.append(f"samples[{i}] is not an object; skipped")
            continue
        samples.append(Sample(id=str(entry.get("id", f"sample {i + 1}")), text=str(entry.get("text", "")),
                              reference=_copy_one(entry.get("reference"), home, out_dir, used),
                              synthesized=_copy_one(entry.get("synthesized"), home, out_dir, used)))
    return samples


def _copy_one(rel: Any, home, out_dir: Path, used: set[str]) -> Optional[SampleFile]:
    from vits_ray.storage import StorageError

    if rel is None or rel == "":
        return None
    sample = SampleFile(source=str(rel))
    if not isinstance(rel, str):
        sample.problem = "not a path"
        return sample
    try:
        if not home.exists(rel):
            sample.problem = f"missing: {home.url(rel)} not found"
            return sample
        name = _unique_name(Path(rel).name, used)
        home.download_file(rel, out_dir / SAMPLES_DIR / name)
    except ValueError as err:  # a path with `..`: outside eval.json's folder, which the store refuses
        sample.problem = f"cannot be read: {err}"
        return sample
    except StorageError as err:
        sample.problem = f"cannot be read: {err}"
        return sample
    sample.copied = f"{SAMPLES_DIR}/{name}"
    return sample


def _unique_name(name: str, used: set[str]) -> str:
    # Two samples may share a file name in different folders; the copies share one folder.
    stem, dot, suffix = name.partition(".")
    candidate, n = name, 1
    while candidate in used:
        n += 1
        candidate = f"{stem}-{n}{dot}{suffix}"
    used.add(candidate)
    return candidate
