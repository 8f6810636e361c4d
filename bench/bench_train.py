"""Training speed on the CPU: our GAN step and Ray Train loop against Coqui's own, on the demo corpus.

    .venv/bin/python bench/bench_train.py [--quick] [--threads 1]

Three measurements, all with the tiny recipe, fp32, batch size 4, `--threads` torch threads per
process (1 by default, as a Ray worker with `cpus_per_worker=1` uses):

1. Loop overhead: `gan_step` against a bare hand-written D-then-G loop over Coqui's `train_step`
   (and the bare loop plus gradient clipping, which Coqui's Trainer also does), on one batch and
   fresh identical models, interleaved in rotating order after warm-up. Median step times.
2. Throughput against Coqui's `Trainer`: seconds of audio trained per second, from per-step times
   (steady state) and end to end (wall), for `run_training` with one worker and `run_coqui_trainer`.
3. Two Ray Train workers against one (gloo, one thread each), from the per-step metrics.

It prints figures and asserts nothing: on a shared machine they are noisy, so compare ratios
taken in the same run rather than absolute times across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from vits_ray.config import Config, load_config  # noqa: E402
from vits_ray.data.ingest import prepare_corpus  # noqa: E402
from vits_ray.demo.corpus import write_demo_corpus  # noqa: E402

# Validation and periodic checkpoints off: both loops then do training steps, one final
# checkpoint and export (ours) or one small evaluation per epoch (Coqui's), nothing else.
OVERRIDES = ["train.batch_size=4", "data.rows_per_shard=8", "train.val_step=1000000", "train.save_step=1000000"]
WARMUP_STEPS = 2  # steps left out of the steady-state figures (first shard read, allocator warm-up)


# --- 1. loop overhead ----------------------------------------------------------------------

def _bare_step(model, criteria, optimizers, batch, clip: tuple[float, float] | None) -> None:
    """The least a correct VITS GAN loop does: zero, forward, backward, step; D then G."""
    for index in (0, 1):
        optimizers[index].zero_grad(set_to_none=True)
        _, losses = model.train_step(batch, criteria[index], index)
        losses["loss"].backward()
        if clip is not None:
            params = [p for group in optimizers[index].param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, clip[index])
        optimizers[index].step()
    model.model_outputs_cache = None


def loop_overhead(cfg: Config, data_uri: str, warmup: int, reps: int) -> dict:
    from vits_ray.data.reader import ShardReader
    from vits_ray.data.shards import read_manifest
    from vits_ray.model import build_model
    from vits_ray.step import Precision, gan_step
    from vits_ray.storage import open_store
    from vits_ray.text import Vocabulary

    store = open_store(data_uri)
    manifest = read_manifest(store)
    vocab = Vocabulary.from_dict(manifest["vocab"])
    names = ("bare", "bare+clip", "gan_step")
    models = {name: build_model(cfg, vocab) for name in names}  # same seed: identical weights
    reference = models["bare"].state_dict()
    assert all(torch.equal(t, models[n].state_dict()[k]) for n in names for k, t in reference.items())
    pad_id = int(models["bare"].tokenizer.characters.pad_id)
    reader = ShardReader(store, manifest, "train", 0, 1, seed=cfg.train.seed, batch_size=cfg.train.batch_size,
                         max_batch_seconds=cfg.train.max_batch_seconds, pad_id=pad_id, prefetch=0)
    # The batch of epoch 0 holding the most audio among full batches: a typical working size.
    full = [b for b in reader.iter_epoch(0) if len(b) == cfg.train.batch_size]
    vits_batch = max(full, key=lambda b: b.num_samples)

    def formatted(model):
        return model.format_batch_on_device(model.format_batch(vits_batch.to_coqui("cpu")))

    state = {n: (m, m.get_criterion(), m.get_optimizer(), formatted(m)) for n, m in models.items()}
    precision = Precision.resolve("no", "cpu")
    clip = (cfg.optim.grad_clip_disc, cfg.optim.grad_clip_gen)
    for m in models.values():
        m.train()

    def run(name: str) -> float:
        model, criteria, optimizers, batch = state[name]
        start = time.perf_counter()
        if name == "gan_step":
            gan_step(model, criteria, optimizers, None, batch, precision, clip)
        else:
            _bare_step(model, criteria, optimizers, batch, clip if name == "bare+clip" else None)
        return time.perf_counter() - start

    torch.manual_seed(0)
    for _ in range(warmup):
        for name in names:
            run(name)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        order = names[rep % 3:] + names[:rep % 3]  # rotate so no variant always runs first
        for name in order:
            times[name].append(run(name))
    # What our loop also does per step and the bare loop gets for free here: turn the typed batch
    # into Coqui's dict (to_coqui, format_batch, format_batch_on_device computes the spectrograms).
    format_times = []
    for _ in range(reps):
        start = time.perf_counter()
        formatted(models["gan_step"])
        format_times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in models["bare"].parameters())
    disc = sum(p.numel() for p in models["bare"].disc.parameters())
    return {"times": times, "format": format_times, "batch_audio": vits_batch.num_samples / cfg.audio.sample_rate,
            "batch_len": len(vits_batch), "params": params, "disc_params": disc}


# --- 2. and 3. Ray Train runs and Coqui's Trainer ------------------------------------------

@contextlib.contextmanager
def output_to(path: Path):
    """Send this process's stdout and stderr (file descriptors 1 and 2) to `path` for a while.

    Coqui's trainer prints every step through a logging handler bound to the console at import
    time, which `contextlib.redirect_stdout` does not reach.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "wb") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def read_steps(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "step"]


def global_audio_per_step(cfg: Config, data_uri: str, steps: list[dict], world: int) -> list[float]:
    """Seconds of audio each step trained on summed over all ranks, from the readers' own plans.

    metrics.jsonl holds rank 0's batch only; every rank's plan is computable from the manifest.
    """
    from vits_ray.data.reader import ShardReader
    from vits_ray.data.shards import read_manifest
    from vits_ray.storage import open_store

    store = open_store(data_uri)
    manifest = read_manifest(store)
    readers = [ShardReader(store, manifest, "train", r, world, seed=cfg.train.seed, batch_size=cfg.train.batch_size,
                           max_batch_seconds=cfg.train.max_batch_seconds, pad_id=0, prefetch=0)
               for r in range(world)]
    out, index, epoch = [], 0, None
    for record in steps:
        if record["epoch"] != epoch:
            epoch, index = record["epoch"], 0
        samples = [int(rd.shard_lengths[b.shard][list(b.rows)].sum())
                   for rd in readers for b in [rd.plan(epoch)[index]]]
        if abs(samples[0] / cfg.audio.sample_rate - record["audio_seconds"]) > 1e-6:
            raise RuntimeError(f"step {record['step']}: planned rank-0 audio does not match the metrics")
        out.append(sum(samples) / cfg.audio.sample_rate)
        index += 1
    return out


def ours(cfg: Config, data_uri: str, storage: Path, name: str, workers: int, steps: int) -> dict:
    from vits_ray.train import TrainJob, run_training

    job = TrainJob(config=cfg.to_dict(), data_uri=data_uri, storage_uri=str(storage), name=name,
                   workers=workers, max_steps=steps, cpus_per_worker=1)
    start = time.perf_counter()
    run_training(job)
    wall = time.perf_counter() - start
    records = read_steps(storage / name)
    audio = global_audio_per_step(cfg, data_uri, records, workers)
    steady = records[WARMUP_STEPS:]
    steady_audio = audio[WARMUP_STEPS:]
    step_time = sum(r["step_time"] for r in steady)
    return {"wall": wall, "steps": len(records), "audio_total": sum(audio),
            "audio_per_step": sum(steady_audio) / len(steady_audio),
            "steady_rate": sum(steady_audio) / step_time, "outside": wall - sum(r["step_time"] for r in records),
            "median_step": statistics.median(r["step_time"] for r in steady),
            "median_loader": statistics.median(r["loader_time"] for r in steady),
            "e2e_rate": sum(audio) / wall}


def coqui(cfg: Config, corpus: Path, data_uri: str, out: Path, steps: int, epochs: int) -> dict:
    from coqui_baseline import run_coqui_trainer
    from vits_ray.data.shards import read_manifest
    from vits_ray.report import load_run
    from vits_ray.storage import open_store
    from vits_ray.text import Vocabulary

    vocab = Vocabulary.from_dict(read_manifest(open_store(data_uri))["vocab"])  # the same model as ours
    start = time.perf_counter()
    with output_to(out / "console.txt"):
        run_dir = run_coqui_trainer(corpus, out, cfg, vocab=vocab, max_steps=steps, epochs=epochs, eval_samples=2)
    call_wall = time.perf_counter() - start
    stats = json.loads((run_dir / "coqui_baseline.json").read_text())
    records = load_run(str(run_dir)).steps
    # Coqui's step_time excludes the wait for the batch; ours includes it, so add loader_time back.
    per_step = [r["step_time"] + r.get("loader_time", 0.0) for r in records]
    steady = per_step[WARMUP_STEPS:]
    # Coqui does not log a step's audio: steady state assumes the mean audio per step.
    mean_audio = stats["audio_seconds_trained"] / max(stats["steps"], 1)
    return {"audio_per_step": mean_audio, "wall": call_wall, "fit_wall": stats["wall_seconds"],
            "outside": call_wall - sum(per_step),
            "steps": stats["steps"], "logged_steps": len(records),
            "audio_total": stats["audio_seconds_trained"], "steady_rate": mean_audio * len(steady) / sum(steady),
            "median_step": statistics.median(steady),
            "median_loader": statistics.median(r.get("loader_time", 0.0) for r in records[WARMUP_STEPS:]),
            "e2e_rate": stats["audio_seconds_trained"] / call_wall,
            "fit_rate": stats["audio_seconds_trained"] / stats["wall_seconds"]}


# --- printing -----------------------------------------------------------------------------

def print_overhead(result: dict, threads: int) -> None:
    times = result["times"]
    med = {n: statistics.median(t) for n, t in times.items()}
    print(f"\n1. Loop overhead: one batch ({result['batch_len']} utterances, {result['batch_audio']:.2f} s of audio), "
          f"{len(times['bare'])} interleaved repetitions, torch threads {threads}; "
          f"model {result['params'] / 1e6:.1f}M parameters ({result['disc_params'] / 1e6:.1f}M discriminator)")
    low = {n: min(t) for n, t in times.items()}  # the least disturbed by other load on the machine
    print(f"   {'loop':<12} {'median s':>9} {'min s':>7} {'max s':>7} {'median/bare':>11} {'min/bare':>8}")
    for name, values in times.items():
        print(f"   {name:<12} {med[name]:9.3f} {low[name]:7.3f} {max(values):7.3f} "
              f"{med[name] / med['bare']:11.3f} {low[name] / low['bare']:8.3f}")
    print(f"   overhead of gan_step (median; min): {100 * (med['gan_step'] / med['bare'] - 1):+.1f}%; "
          f"{100 * (low['gan_step'] / low['bare'] - 1):+.1f}% vs bare, "
          f"{100 * (med['gan_step'] / med['bare+clip'] - 1):+.1f}%; "
          f"{100 * (low['gan_step'] / low['bare+clip'] - 1):+.1f}% vs bare+clip (target < 5%)")
    print(f"   batch formatting per step (to_coqui + format_batch + spectrograms, in both real loops): "
          f"median {statistics.median(result['format']):.3f} s")


def print_runs(rows: list[tuple[str, dict]]) -> None:
    print(f"\n   {'run':<28} {'steps':>5} {'audio s/step':>12} {'median step s':>13} {'loader s':>8} "
          f"{'steady audio s/s':>16} {'wall s':>7} {'outside steps s':>15} {'e2e audio s/s':>13}")
    for name, r in rows:
        print(f"   {name:<28} {r['steps']:>5} {r['audio_per_step']:12.2f} {r['median_step']:13.3f} "
              f"{r['median_loader']:8.3f} {r['steady_rate']:16.2f} {r['wall']:7.1f} {r['outside']:15.1f} "
              f"{r['e2e_rate']:13.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and steps (about 2 minutes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this process (Ray workers use 1)")
    parser.add_argument("--n", type=int, default=40, help="demo corpus size (utterances)")
    args = parser.parse_args()
    warmup, reps = (1, 3) if args.quick else (2, 8)
    steps = 6 if args.quick else 12
    torch.set_num_threads(args.threads)
    logging.getLogger("TTS").setLevel(logging.WARNING)
    cfg = load_config("tiny", OVERRIDES)
    print(f"bench_train: {len(os.sched_getaffinity(0))} CPU core(s), torch {torch.__version__}, "
          f"torch threads {args.threads}, tiny recipe, batch {cfg.train.batch_size}, fp32"
          f"{', --quick' if args.quick else ''}")

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        corpus = write_demo_corpus(tmp / "demo", n=args.n, seed=0)
        data_uri = str(tmp / "shards")
        summary = prepare_corpus(corpus, "ljspeech", data_uri, cfg, progress=False)
        print(f"demo corpus: {summary.accepted} utterances, {summary.accepted_seconds:.1f} s of audio")

        overhead = loop_overhead(cfg, data_uri, warmup, reps)
        print_overhead(overhead, args.threads)

        import ray

        start = time.perf_counter()
        ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False,
                 log_to_driver=False)
        ray_start = time.perf_counter() - start
        try:
            one = ours(cfg, data_uri, tmp / "runs", "one_worker", 1, steps)
            theirs = coqui(cfg, corpus, data_uri, tmp / "coqui", steps, epochs=2)
            two = ours(cfg, data_uri, tmp / "runs", "two_workers", 2, steps)
        finally:
            ray.shutdown()

        print(f"\n2. Throughput against Coqui's Trainer (steady state: steps after the first {WARMUP_STEPS}; "
              f"Ray cluster start {ray_start:.1f} s, not in any wall figure)")
        print_runs([("ours, run_training, 1 worker", one), ("Coqui Trainer (call)", theirs)])
        print(f"   Coqui fit() alone: {theirs['fit_wall']:.1f} s, {theirs['fit_rate']:.2f} audio s/s; "
              f"{theirs['steps']} steps ({theirs['logged_steps']} in its log)")
        print(f"   ours / Coqui: median step time {one['median_step'] / theirs['median_step']:.2f}x; audio per second "
              f"steady {one['steady_rate'] / theirs['steady_rate']:.2f}x, "
              f"end to end {one['e2e_rate'] / theirs['e2e_rate']:.2f}x "
              f"(vs fit() alone {one['e2e_rate'] / theirs['fit_rate']:.2f}x)")

        print("\n3. Two Ray Train workers against one (gloo, 1 thread each; audio summed over ranks)")
        print_runs([("1 worker", one), ("2 workers", two)])
        print(f"   2 workers / 1: audio per second {two['steady_rate'] / one['steady_rate']:.2f}x steady, "
              f"{two['e2e_rate'] / one['e2e_rate']:.2f}x end to end; median step time "
              f"{two['median_step'] / one['median_step']:.2f}x")


if __name__ == "__main__":
    main()
