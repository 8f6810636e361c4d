"""`prepare`: validate and normalise a corpus, then write Parquet shards and a manifest.

Checks, in order; an utterance gets the reason of the first one it fails (nothing is dropped
silently, every rejection lands in the manifest with a human-readable detail):

    malformed_line          the transcript line cannot be parsed (reader)
    duplicate_id            an id seen on an earlier line (the first one wins)
    missing_audio           no audio file for the id
    empty_text              nothing left after normalisation
    unsupported_characters  a character outside Vocabulary.full_bangla(text.allowed_extra_chars)
    undecodable_audio       soundfile cannot decode the file
    too_short / too_long    duration after trimming silence outside [min_seconds, max_seconds]
    clipped                 more than max_clipped_fraction of samples at |x| >= clip_threshold

Split rule: an utterance is in `val` when the first 8 bytes of sha256(id), read as a big-endian
integer, fall below val_fraction * 2**64, so the split of an id never depends on the rest of the
corpus. When val_fraction > 0 and at least 2 utterances are accepted, the split is then nudged
so that neither side is empty: the id with the smallest hash moves to val, or the one with the
largest moves to train.

Overwrite order (an output is usable exactly when manifest.json exists and is valid):
  1. all audio is processed first, so a failing run leaves an earlier output untouched;
  2. the old manifest.json is deleted (the output is now visibly unfinished);
  3. shards and vocab.json are written (overwriting same-named old ones);
  4. manifest.json is written;
  5. files under shards/ that the new manifest does not list are deleted.
At no moment does a manifest point at a missing or different shard.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

from vits_ray.config import Config
from vits_ray.data import shards
from vits_ray.data.audio import AudioLimits, AudioProblem, CleanAudio, clean_audio
from vits_ray.data.formats import RawRecord, Rejection, read_corpus
from vits_ray.storage import Store, open_store

SPLITS = ("train", "val")
# Below this much input audio (file bytes) a process pool costs more than it saves.
POOL_MIN_BYTES = 8 << 20


@dataclass
class PrepareSummary:
    output_uri: str
    accepted: int
    rejected: int
    accepted_seconds: float
    rejected_by_reason: dict[str, int]
    splits: dict[str, int]
    num_shards: int
    num_speakers: int
    wall_seconds: float = field(default=0.0, compare=False)

    @property
    def hours(self) -> float:
        return self.accepted_seconds / 3600.0

    def format_text(self) -> str:
        lines = [
            f"prepared {self.output_uri}",
            f"  accepted  {self.accepted} utterances, {self.hours:.3f} h of audio "
            f"({self.accepted_seconds:.1f} s), {self.num_speakers} speaker(s)",
            "  splits    " + ", ".join(f"{name} {count}" for name, count in self.splits.items()),
            f"  shards    {self.num_shards}",
            f"  rejected  {self.rejected}",
        ]
        for reason, count in sorted(self.rejected_by_reason.items()):
            lines.append(f"    {reason:<24} {count}")
        if self.rejected:
            lines.append("  (every rejection, with its detail, is listed in manifest.json)")
        if self.wall_seconds > 0:
            rate = self.accepted_seconds / self.wall_seconds
            lines.append(f"  took      {self.wall_seconds:.1f} s ({rate:.1f} s of audio per second)")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Accepted:
    id: str
    speaker: str
    text: str
    normalized_text: str
    num_samples: int
    clipped_fraction: float
    offset: int  # byte offset of its PCM in the spool file


def val_score(utterance_id: str) -> int:
    return int.from_bytes(hashlib.sha256(utterance_id.encode("utf-8")).digest()[:8], "big")


def assign_splits(ids: Iterable[str], val_fraction: float) -> dict[str, str]:
    """id -> "train" | "val" by the rule in this module's docstring."""
    ids = sorted(ids)
    threshold = val_fraction * 2.0 ** 64
    split = {i: "val" if val_score(i) < threshold else "train" for i in ids}
    if val_fraction > 0 and len(ids) >= 2:
        by_score = sorted(ids, key=lambda i: (val_score(i), i))
        if "val" not in split.values():
            split[by_score[0]] = "val"
        elif "train" not in split.values():
            split[by_score[-1]] = "train"
    return split


def _limits(config: Config) -> AudioLimits:
    d = config.data
    return AudioLimits(config.audio.sample_rate, d.min_seconds, d.max_seconds, d.trim_top_db,
                       d.clip_threshold, d.max_clipped_fraction)


def _describe_chars(unsupported: list[tuple[int, str, str]], limit: int = 10) -> str:
    parts = [f"U+{ord(ch):04X} {name} at {pos}" for pos, ch, name in unsupported[:limit]]
    more = f" (and {len(unsupported) - limit} more)" if len(unsupported) > limit else ""
    return ", ".join(parts) + more


@dataclass(frozen=True)
class _Checks:
    limits: AudioLimits
    allowed_extra_chars: str
    add_blank: bool


@functools.lru_cache(maxsize=4)
def _allowed(extra: str, add_blank: bool):
    from vits_ray.text import Vocabulary

    return Vocabulary.full_bangla(extra, add_blank=add_blank)


def _check_one(args: tuple[RawRecord, _Checks]) -> tuple[str, CleanAudio] | Rejection:
    """Text then audio checks for one record; runs in a worker process for large corpora."""
    from vits_ray.text import normalize_text

    rec, checks = args
    if not rec.audio_path.is_file():
        return Rejection(rec.id, "missing_audio", f"{rec.audio_path.parent.name}/{rec.audio_path.name} not found",
                         rec.line)
    normalized = normalize_text(rec.text)
    if not normalized.strip():
        return Rejection(rec.id, "empty_text", f"transcript {rec.text!r} is empty after normalisation", rec.line)
    bad = _allowed(checks.allowed_extra_chars, checks.add_blank).unsupported(normalized)
    if bad:
        return Rejection(rec.id, "unsupported_characters", _describe_chars(bad), rec.line)
    audio = clean_audio(rec.audio_path, checks.limits)
    if isinstance(audio, AudioProblem):
        return Rejection(rec.id, audio.reason, audio.detail, rec.line)
    return normalized, audio


@contextlib.contextmanager
def _mapper(records: list[RawRecord]) -> Iterator[Callable]:
    """A `map` for _check_one: a process pool over all cores for large inputs, else the builtin.

    Normalising and decoding run at ~1,000 s of audio per second per core, so a pool only pays
    for itself beyond a few minutes of audio. The pool forks when this process runs no other
    thread (cheap), else it uses a fork server (safe with threads, ~0.5 s slower to start).
    """
    workers = min(len(os.sched_getaffinity(0)), 8)
    total_bytes = sum(r.audio_path.stat().st_size for r in records if r.audio_path.is_file())
    if workers < 2 or total_bytes < POOL_MIN_BYTES:
        yield map
        return
    import multiprocessing
    import threading

    if threading.active_count() == 1:
        ctx = multiprocessing.get_context("fork")
    else:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["vits_ray.data.audio", "vits_ray.text"])
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        yield functools.partial(pool.map, chunksize=4)


def _unique(records: Iterable[RawRecord | Rejection]) -> tuple[list[RawRecord], list[Rejection]]:
    """Parse errors and duplicate ids; the first line with an id wins."""
    unique: list[RawRecord] = []
    rejections: list[Rejection] = []
    first_line: dict[str, int] = {}
    for item in records:
        if isinstance(item, Rejection):
            rejections.append(item)
        elif item.id in first_line:
            rejections.append(Rejection(item.id, "duplicate_id",
                                        f"line {item.line} repeats the id of line {first_line[item.id]}", item.line))
        else:
            first_line[item.id] = item.line
            unique.append(item)
    return unique, rejections


def _check_all(records: list[RawRecord], checks: _Checks, spool: IO[bytes],
               progress: bool) -> tuple[list[_Accepted], list[Rejection]]:
    """Check every record (in order, on all cores); accepted audio is appended to `spool`."""
    from tqdm import tqdm

    accepted: list[_Accepted] = []
    rejected: list[Rejection] = []
    with _mapper(records) as mapper:
        # The pool starts (forks) here, before tqdm's monitor thread exists.
        results = mapper(_check_one, [(rec, checks) for rec in records])
        bar = tqdm(total=len(records), desc="prepare", unit="utt", file=sys.stderr, disable=not progress,
                   dynamic_ncols=True)
        with bar:
            for rec, result in zip(records, results):
                bar.update(1)
                if isinstance(result, Rejection):
                    rejected.append(result)
                    continue
                normalized, audio = result
                offset = spool.tell()
                spool.write(audio.pcm16)
                accepted.append(_Accepted(rec.id, rec.speaker, rec.text, normalized, audio.num_samples,
                                          audio.clipped_fraction, offset))
    return accepted, rejected


def _write_output(store: Store, accepted: list[_Accepted], split_of: dict[str, str], vocab, spool: IO[bytes],
                  config: Config, manifest_base: dict[str, Any]) -> dict[str, Any]:
    """Steps 2-5 of the overwrite order in the module docstring; returns the manifest."""
    store.delete(shards.MANIFEST)
    entries = []
    split_stats: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        utts = sorted((u for u in accepted if split_of[u.id] == split), key=lambda u: u.id)
        samples = sum(u.num_samples for u in utts)
        split_stats[split] = {"utterances": len(utts), "seconds": round(samples / config.audio.sample_rate, 3)}
        per = config.data.rows_per_shard
        for index, start in enumerate(range(0, len(utts), per)):
            chunk = utts[start:start + per]
            audio = []
            for u in chunk:
                spool.seek(u.offset)
                audio.append(spool.read(2 * u.num_samples))
            rows = {
                "id": [u.id for u in chunk],
                "speaker": [u.speaker for u in chunk],
                "text": [u.text for u in chunk],
                "normalized_text": [u.normalized_text for u in chunk],
                "token_ids": [vocab.encode(u.normalized_text) for u in chunk],
                "num_samples": [u.num_samples for u in chunk],
                "audio_pcm16": audio,
                "clipped_fraction": [u.clipped_fraction for u in chunk],
            }
            entries.append(shards.write_shard(store, split, index, rows))
    manifest = {**manifest_base, "splits": split_stats, "shards": entries}
    store.write_bytes(shards.VOCAB, vocab.to_json().encode("utf-8"))
    store.write_bytes(shards.MANIFEST, shards.manifest_bytes(manifest))
    keep = {e["path"] for e in entries}
    for stale in store.list(shards.SHARD_DIR):
        if stale not in keep:
            store.delete(stale)
    return manifest


def prepare_corpus(input_dir: Path, fmt: str, output_uri: str, config: Config,
                   progress: bool = True) -> PrepareSummary:
    """Validate `input_dir` (a corpus in format `fmt`) and write shards + manifest to `output_uri`."""
    from vits_ray.text import NORMALIZER_VERSION, Vocabulary

    started = time.perf_counter()
    input_dir = Path(input_dir)
    store = open_store(output_uri, config.storage)
    store.check()
    allowed = _allowed(config.text.allowed_extra_chars, config.text.add_blank)

    records, early = _unique(read_corpus(input_dir, fmt))
    checks = _Checks(_limits(config), config.text.allowed_extra_chars, config.text.add_blank)
    with tempfile.TemporaryFile(prefix="vits-ray-prepare-") as spool:
        accepted, late = _check_all(records, checks, spool, progress)
        # Reported in transcript order; sorted() is stable, so one line's rejections keep their order.
        rejections = sorted(early + late, key=lambda r: r.line)
        by_reason = dict(sorted(Counter(r.reason for r in rejections).items()))
        if not accepted:
            sample = "; ".join(f"{r.id}: {r.reason} ({r.detail})" for r in rejections[:5])
            raise ValueError(f"{input_dir}: no utterance passed validation ({len(rejections)} rejected: "
                             f"{by_reason}); first rejections: {sample}")

        accepted.sort(key=lambda u: u.id)
        vocab = Vocabulary.build([u.normalized_text for u in accepted], allowed=allowed,
                                 add_blank=config.text.add_blank)
        split_of = assign_splits([u.id for u in accepted], config.data.val_fraction)
        total_samples = sum(u.num_samples for u in accepted)
        manifest_base = {
            "format_version": shards.FORMAT_VERSION,
            "sample_rate": config.audio.sample_rate,
            "vocab": vocab.to_dict(),
            "normalizer_version": NORMALIZER_VERSION,
            "speakers": sorted({u.speaker for u in accepted}),
            "num_utterances": len(accepted),
            "num_rejected": len(rejections),
            "rejected": [r.to_dict() for r in rejections],
            "rejected_by_reason": by_reason,
            "total_seconds": round(total_samples / config.audio.sample_rate, 3),
            "split_rule": "val iff int(sha256(id)[:8], big-endian) < val_fraction * 2**64; "
                          "neither split left empty when val_fraction > 0 and >= 2 utterances",
            "source": {"format": fmt, "input_dir": input_dir.resolve().name},
            "audio": dataclasses.asdict(config.audio),
            "data": dataclasses.asdict(config.data),
            "text": dataclasses.asdict(config.text),
        }
        manifest = _write_output(store, accepted, split_of, vocab, spool, config, manifest_base)

    return PrepareSummary(
        output_uri=store.uri,
        accepted=len(accepted),
        rejected=len(rejections),
        accepted_seconds=manifest["total_seconds"],
        rejected_by_reason=by_reason,
        splits={s: manifest["splits"][s]["utterances"] for s in SPLITS},
        num_shards=len(manifest["shards"]),
        num_speakers=len(manifest["speakers"]),
        wall_seconds=time.perf_counter() - started,
    )

