"""The shard reader: loader wait per batch against a training step, padding, and the epoch plan at scale.

    .venv/bin/python bench/bench_reader.py [--n 80] [--rows-per-shard 32] [--steps 3] [--plans-only]

Everything runs on this machine: the demo corpus (espeak-ng) is prepared with the tiny recipe into
a moto S3 server on 127.0.0.1 (real boto3 and pyarrow), and read back from there.

1. Step: `gan_step` of the tiny model on the reader's first batches (one warm-up step, then
   `--steps` timed ones), fp32 on CPU.
2. Loader: `ShardReader.loader_time` for every batch of epochs 0 (fresh cache, so shards come from
   S3) and 1 (the local cache), as in training. Between batches the script sleeps in place of the
   step, for at most `--pause` seconds (shorter than a real step, so the prefetcher has less time
   to hide the I/O than in training: the figure errs high). The first batch of epoch 0 waits for
   the first shard with nothing to overlap; it is reported apart, the rest is steady state.
   A back-to-back pass (no pause, fresh cache) gives the worst case.
3. Padding: padded / total samples in the padded waveform tensors, over `--epochs` epochs of the
   reader's plans, against random batches of the same rows with the same batch size.
4. Plans at scale (plans only, no shards are written or read): a simulated reference-sized
   manifest (79 train shards of 256 rows, lengths 1-15 s at 22050 Hz, batch 32, max_batch_seconds
   300) planned for 8, 16, 32 and 48 workers. Per world size: utterances per epoch, utterances
   the plan drops (the ids no rank's own batches cover; must be 0), the same for the previous
   plan (whole shards dealt round-robin, every rank cut to the shortest; reimplemented here as
   `old_plan_dropped`), wrapped fill-in batches, and shard reads per rank (what `iter_epoch`
   fetches, fill-ins included; and the shards of the rank's own batches alone) against the ideal
   79 / world, and the padded fraction against the old per-shard bucketing. `--plans-only` prints
   just this.

Prints figures; asserts nothing about timing.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from vits_ray.config import load_config  # noqa: E402
from vits_ray.data.ingest import prepare_corpus  # noqa: E402
from vits_ray.data.reader import (BUCKET_SECONDS, ShardReader, pack_batches, plan_global_epoch,  # noqa: E402
                                  rank_share, shard_reads)
from vits_ray.data.shards import read_manifest  # noqa: E402
from local_s3 import start_moto  # noqa: E402
from vits_ray.demo.corpus import write_demo_corpus  # noqa: E402
from vits_ray.storage import open_store  # noqa: E402
from vits_ray.text import Vocabulary  # noqa: E402


def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95))


def padded_fraction(batches: list[list[int]]) -> float:
    """`batches` holds the lengths (samples) of each batch's rows."""
    total = sum(len(b) * max(b) for b in batches)
    return (total - sum(sum(b) for b in batches)) / total


def time_steps(cfg, vocab, batches) -> list[float]:
    import torch

    from vits_ray.model import build_model
    from vits_ray.step import Precision, gan_step

    torch.manual_seed(0)
    model = build_model(cfg, vocab)
    criteria, optimizers = model.get_criterion(), model.get_optimizer()
    precision = Precision.resolve("no", "cpu")
    times = []
    for batch in batches:
        started = time.perf_counter()
        formatted = model.format_batch_on_device(model.format_batch(batch.to_coqui("cpu")))
        gan_step(model, criteria, optimizers, None, formatted, precision, (1000.0, 1000.0))
        times.append(time.perf_counter() - started)
    return times[1:]  # the first step pays one-off set-up costs


def read_epochs(make_reader, epochs: list[int], pause: float) -> list[tuple[int, int, float]]:
    """(epoch, batch index, loader_time) for each batch, sleeping `pause` s where a step would run."""
    reader = make_reader()
    out = []
    for epoch in epochs:
        for index, _ in enumerate(reader.iter_epoch(epoch)):
            out.append((epoch, index, reader.loader_time))
            time.sleep(pause)
    return out


REFERENCE_SHARDS, REFERENCE_ROWS, REFERENCE_RATE = 79, 256, 22050
REFERENCE_BATCH, REFERENCE_MAX_BATCH_SECONDS = 32, 300.0


def simulated_lengths(seed: int = 0) -> list[np.ndarray]:
    """Per-shard utterance lengths (samples) of a reference-sized corpus: log-normal around 6 s, 1-15 s."""
    rng = np.random.default_rng(seed)
    seconds = np.clip(rng.lognormal(np.log(6.0), 0.5, (REFERENCE_SHARDS, REFERENCE_ROWS)), 1.0, 15.0)
    return [np.round(row * REFERENCE_RATE).astype(np.int64) for row in seconds]


def old_plan_dropped(lengths: list[np.ndarray], world: int, seed: int, epoch: int, batch_size: int,
                     max_batch_samples: int, bucket_samples: int) -> int:
    """Utterances the previous plan left out: whole shards round-robin, every rank cut to the shortest."""
    shard_order = np.random.default_rng([seed, epoch]).permutation(len(lengths))
    per_rank = []
    for rank in range(world):
        batches = []
        for shard in shard_order[rank::world]:
            rng = np.random.default_rng([seed, epoch, int(shard)])
            batches += pack_batches(lengths[shard], rng, batch_size, max_batch_samples, bucket_samples)
        per_rank.append(batches)
    count = min(len(batches) for batches in per_rank)
    kept = sum(len(rows) for batches in per_rank for rows in batches[:count])
    return sum(len(shard) for shard in lengths) - kept


def plan_figures(worlds: list[int], epochs: int, seed: int = 0) -> list[dict]:
    """The plan-level figures of section 4, one dict per world size (means over `epochs` epochs)."""
    lengths = simulated_lengths()
    max_batch_samples = int(REFERENCE_MAX_BATCH_SECONDS * REFERENCE_RATE)
    bucket_samples = int(BUCKET_SECONDS * REFERENCE_RATE)
    all_rows = {(s, r) for s, shard in enumerate(lengths) for r in range(len(shard))}
    globals_ = [plan_global_epoch(lengths, seed, epoch, REFERENCE_BATCH, max_batch_samples, bucket_samples)
                for epoch in range(epochs)]
    figures = []
    for world in worlds:
        dropped, old_dropped, wrapped, batches, reads, own_shards = [], [], [], [], [], []
        for epoch, global_plan in enumerate(globals_):
            plans = [rank_share(global_plan, rank, world) for rank in range(world)]
            covered = {row for plan in plans for batch in plan if not batch.wrapped for row in batch.rows}
            dropped.append(len(all_rows - covered))
            old_dropped.append(old_plan_dropped(lengths, world, seed, epoch, REFERENCE_BATCH, max_batch_samples,
                                                bucket_samples))
            wrapped.append(sum(batch.wrapped for plan in plans for batch in plan))
            batches.append(len(plans[0]))
            reads.append([len(shard_reads(plan)) for plan in plans])
            own_shards += [len({s for batch in plan if not batch.wrapped for s in batch.shards}) for plan in plans]
        figures.append({
            "world": world, "utterances": len(all_rows), "batches_per_rank": statistics.mean(batches),
            "dropped": max(dropped), "old_dropped": statistics.mean(old_dropped),
            "wrapped": statistics.mean(wrapped),
            "reads_mean": statistics.mean(r for epoch in reads for r in epoch),
            "reads_max": max(r for epoch in reads for r in epoch),
            "own_shards_mean": statistics.mean(own_shards),
        })
    new_batches = [[int(lengths[s][r]) for s, r in batch.rows] for plan in globals_ for batch in plan]
    old_batches = []
    for epoch in range(epochs):
        for shard in range(len(lengths)):
            rng = np.random.default_rng([seed, epoch, shard])
            old_batches += [[int(lengths[shard][r]) for r in rows] for rows in
                            pack_batches(lengths[shard], rng, REFERENCE_BATCH, max_batch_samples, bucket_samples)]
    figures.append({"padded": padded_fraction(new_batches), "old_padded": padded_fraction(old_batches),
                    "global_batches": statistics.mean(len(g) for g in globals_)})
    return figures


def print_plan_figures(epochs: int) -> None:
    *rows, overall = plan_figures([8, 16, 32, 48], epochs)
    print(f"plans at scale: {REFERENCE_SHARDS} shards x {REFERENCE_ROWS} rows, batch {REFERENCE_BATCH}, "
          f"max_batch_seconds {REFERENCE_MAX_BATCH_SECONDS:.0f}, shuffle_shards 4, means over {epochs} epochs "
          f"(dropped: max), {overall['global_batches']:.1f} batches per epoch")
    header = (f"{'workers':>7} {'utts/epoch':>10} {'batches/rank':>12} {'dropped':>7} {'old plan dropped':>18} "
              f"{'wrapped':>7} {'shard reads/rank mean':>21} {'max':>4} {'own batches only':>16} {'ideal':>6}")
    print(header)
    for f in rows:
        old = f"{f['old_dropped']:.0f} ({100 * f['old_dropped'] / f['utterances']:.1f}%)"
        print(f"{f['world']:>7} {f['utterances']:>10} {f['batches_per_rank']:>12.1f} {f['dropped']:>7} {old:>18} "
              f"{f['wrapped']:>7.1f} {f['reads_mean']:>21.2f} {f['reads_max']:>4} {f['own_shards_mean']:>16.2f} "
              f"{REFERENCE_SHARDS / f['world']:>6.2f}")
    print(f"padded fraction: {100 * overall['padded']:.1f}% (windows of 4 shards pooled; the old per-shard "
          f"bucketing: {100 * overall['old_padded']:.1f}%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=80, help="demo corpus size (at most 88)")
    parser.add_argument("--rows-per-shard", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed gan_step calls (after one warm-up)")
    parser.add_argument("--pause", type=float, default=0.5, help="longest sleep standing in for a step (s)")
    parser.add_argument("--epochs", type=int, default=20, help="epochs of plans for the padding figures")
    parser.add_argument("--plan-epochs", type=int, default=3, help="epochs of plans for the plans-at-scale table")
    parser.add_argument("--plans-only", action="store_true", help="print only the plans-at-scale table")
    args = parser.parse_args()
    if args.plans_only:
        print_plan_figures(args.plan_epochs)
        return

    start_moto()
    cfg = load_config("tiny", [f"data.rows_per_shard={args.rows_per_shard}"])
    work = Path(tempfile.mkdtemp(prefix="bench-reader-"))
    corpus = write_demo_corpus(work / "corpus", n=args.n, seed=0)
    uri = "s3://bench/data"
    summary = prepare_corpus(corpus, "ljspeech", uri, cfg, progress=False)
    store = open_store(uri)
    manifest = read_manifest(store)
    vocab = Vocabulary.from_dict(manifest["vocab"])
    sr = int(manifest["sample_rate"])
    caches = iter(range(1000))

    def make_reader() -> ShardReader:  # a fresh cache each time: epoch 0 downloads from S3
        return ShardReader(store, manifest, "train", 0, 1, seed=cfg.train.seed, batch_size=cfg.train.batch_size,
                           max_batch_seconds=cfg.train.max_batch_seconds, pad_id=vocab.pad_id,
                           cache_dir=str(work / f"cache{next(caches)}"), prefetch=cfg.data.prefetch_shards)

    reader = make_reader()
    train_shards = len(reader.source.entries)
    print(f"corpus: {summary.splits.get('train', 0)} train utterances ({summary.accepted_seconds:.0f} s of audio), "
          f"{train_shards} train shards of <= {args.rows_per_shard} rows on moto S3; batch_size "
          f"{cfg.train.batch_size}, max_batch_seconds {cfg.train.max_batch_seconds}, "
          f"{reader.batches_per_epoch(0)} batches/epoch, prefetch {cfg.data.prefetch_shards}")

    # 1. training step on the batches the reader serves first
    first = []
    for batch in reader.iter_epoch(0):
        first.append(batch)
        if len(first) == args.steps + 1:
            break
    steps = time_steps(cfg, vocab, first)
    step_mean = statistics.mean(steps)

    # 2. loader wait, with a pause standing in for the step, then back to back
    pause = min(step_mean, args.pause)
    paced = read_epochs(make_reader, [0, 1], pause)
    cold = paced[0][2]
    steady = [t for (e, i, t) in paced if (e, i) != (0, 0)]
    from_s3 = [t for (e, i, t) in paced if e == 0 and i > 0]
    cached = [t for (e, i, t) in paced if e == 1]
    burst = [t for (e, i, t) in read_epochs(make_reader, [0], 0.0)[1:]]

    # 3. padding: the reader's plans against random batches of the same rows
    lengths = reader.shard_lengths
    bucketed, shuffled = [], []
    for epoch in range(args.epochs):
        plan = reader.plan(epoch)
        bucketed += [[int(lengths[s][r]) for s, r in b.rows] for b in plan]
        rows = np.array([int(lengths[s][r]) for b in plan for s, r in b.rows])
        np.random.default_rng([7, epoch]).shuffle(rows)
        shuffled += [rows[i: i + cfg.train.batch_size].tolist() for i in range(0, len(rows), cfg.train.batch_size)]
    served = [list(map(int, b.waveform_lens)) for b in reader.iter_epoch(0)]
    assert served == bucketed[: len(served)], "plan and served batches disagree"  # not a timing assertion

    ms = 1000.0
    print()
    print(f"{'figure':<52} {'value':>12} {'of a step':>10}")
    print(f"{'tiny gan_step, fp32 CPU, mean of ' + str(len(steps)):<52} {step_mean * ms:>9.0f} ms")
    print(f"{'  (each step)':<52} {' '.join(f'{t * ms:.0f}' for t in steps):>12}")
    rows = [
        ("loader, first batch of the run (cold, from S3)", cold),
        (f"loader, steady state, mean ({len(steady)} batches)", statistics.mean(steady)),
        ("loader, steady state, p95", p95(steady)),
        ("  epoch 0 (shards from S3), mean", statistics.mean(from_s3)),
        ("  epoch 1 (local cache), mean", statistics.mean(cached)),
        ("loader, back to back (no overlap), mean", statistics.mean(burst)),
        ("loader, back to back (no overlap), p95", p95(burst)),
    ]
    for label, value in rows:
        print(f"{label:<52} {value * ms:>9.2f} ms {100 * value / step_mean:>9.3f}%")
    print(f"{'padded fraction, bucketed (this reader)':<52} {100 * padded_fraction(bucketed):>11.1f}%")
    print(f"{'padded fraction, random batches, same rows and size':<52} {100 * padded_fraction(shuffled):>11.1f}%")
    print(f"\n(paced run: {pause:.2f} s sleep between batches; padding over {args.epochs} epochs, "
          f"{len(bucketed)} batches; sample rate {sr} Hz)")
    print()
    print_plan_figures(args.plan_epochs)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
