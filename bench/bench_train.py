"""Training loop on the CPU: overhead, host syncs, gradient sync, throughput and fixed cost.

    .venv/bin/python bench/bench_train.py [--quick] [--n 60] [--only 1,2,3,4]

Writes an `--n`-utterance demo corpus, prepares it with the tiny recipe (8 rows per shard) and
measures, all fp32 on the CPU with one torch thread per process (Ray workers with
`cpus_per_worker=1` use one too), batch size 4 unless said otherwise:

1. Loop overhead. `gan_step` against a bare hand-written D-then-G loop over Coqui's `train_step`
   (zero, `train_step(batch, crit[0], 0)`, backward, step, then the generator), and the bare loop
   plus gradient clipping (Coqui's Trainer clips too). `gan_step` runs twice: with the fused AdamW
   that `vits_ray.model.build_optimizers` builds (the default), and with `optim.fused=false`, which
   keeps Coqui's own AdamW (the bare loops' optimizer). Fresh models built with the same seed, one
   fixed batch (the fullest of epoch 0), warm-up, then repetitions interleaved in rotating order.
   Median and min step times.
2. Host syncs per step, counted. `torch.Tensor.item`, `__float__`, `__int__`, `__bool__`, `tolist`,
   `cpu`, `numpy` and `__index__` are patched with counters keyed by the calling module, during the
   real `Trainer.run()` in this process (one rank, `DirectorySession`, log_step 10). Each call is
   charged to the step whose `train_step` last started, and steps are split into plain steps
   (no sync point), sync steps (a log step or epoch end: `Trainer.sync` ran) and save steps (the
   final checkpoint). On the CPU none of these wait for anything; on a GPU each one would be a
   host sync, except `cpu()`/`numpy()` of tensors already on the host. Not caught: syncs inside
   C++ (e.g. Coqui slicing a tensor by a 0-d tensor, `x[:, :n]`) and in `torch.distributed`.
3. Gradient communication backward did not hide, two CPU workers. The real `Trainer` in two
   processes joined by gloo (`tests/ranks.py`, no Ray), batch 2, one thread each. After warm-up,
   blocks of steps alternate between the overlapped `GradientSync` and, as the baseline, the
   previous approach written out here (`FlatAllReduce`): after backward, cat all gradients, one
   all-reduce, copy back. Per step and rank: the time `finish()` waited for communication
   (`GradientSync.wait_seconds`, both optimizers; for the baseline the whole flat all-reduce), the
   whole of `finish()`, and the step time (fetching the batch and `train_step`). The wait is given
   as the mean of the two ranks, and as the min: a rank that reaches the all-reduce first also
   waits for the other's backward (skew); the one that arrives last waits for communication alone.
4. Throughput against Coqui's own `Trainer`, like for like. `run_training` with one Ray worker
   for N steps, and Coqui's `Trainer.fit()` in this process (before and after ours) fed the same
   batches in the same order: the first N batches of our reader's plan for epoch 0 (world 1), as
   `VitsBatch.to_coqui("cpu")` dicts, through a `Vits` subclass whose `get_data_loader` returns
   them (`coqui_baseline.run_coqui_on_batches`). Both log every 10 steps. Steady state is steps
   3..N-1, wall clock from one step to the next: ours from the `time` of consecutive step
   records (stamped at the end of each step), Coqui's from its `on_train_step_start`
   callback. Audio seconds per second of that wall, ours / the mean of Coqui's two runs. Ours
   reads shards (its loader wait is in its figure); Coqui's batches are already in memory.
5. Fixed cost of a run outside its steps, from the same runs: `ensure_ray` (timed around the
   call), then `run_training` cut at timestamps available from outside: the start of the Ray
   Train worker process (from Ray's session logs), the mtime of config.toml (rank 0 writes it
   once the model and optimizers are built), the first step's start (its record's `time` minus
   `step_time`), the last step's end, the newest file in the checkpoint folder, in export/ and
   records/ (the last segment, written by `close()`), and the return of `run_training`. A fresh
   interpreter's imports and first model build, and a warm build, are timed apart for
   comparison. Coqui: model and Trainer construction, and `fit()` outside its steps; one
   `save_checkpoint()` after fit is timed for comparison (Coqui's run here saves nothing).

It prints figures and asserts nothing about time: on a shared machine they are noisy, so compare
ratios taken in the same run rather than absolute times across runs.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # ranks.py: the Trainer in N processes without Ray

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from vits_ray.config import Config, load_config  # noqa: E402
from vits_ray.runlog import RECORDS_DIR, read_records  # noqa: E402
from vits_ray.storage import open_store  # noqa: E402

LOG_STEP = 10
# Validation and periodic checkpoints off, the stability guard's save cadence too: a run is steps,
# a sync every LOG_STEP steps, one final checkpoint and the export.
RUN_OVERRIDES = ["data.rows_per_shard=8", "train.batch_size=4", f"train.log_step={LOG_STEP}",
                 "train.save_step=1000000", "train.val_step=1000000", "stability.unstable_save_step=1000000"]
WARMUP_STEPS = 2  # steps left out of steady-state figures (first shard reads, allocator warm-up)


def load(*extra: str) -> Config:
    return load_config("tiny", RUN_OVERRIDES + list(extra))


def median(values) -> float:
    return statistics.median(values)


@contextlib.contextmanager
def output_to(path: Path):
    """Send this process's stdout and stderr (file descriptors 1 and 2) to `path` for a while.

    Coqui's trainer and Ray's workers print through handlers bound to the console, which
    `contextlib.redirect_stdout` does not reach.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as sink:
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


def open_data(data_uri: str):
    from vits_ray.data.shards import read_manifest
    from vits_ray.storage import open_store

    store = open_store(data_uri)
    return store, read_manifest(store)


def epoch_batches(cfg: Config, data_uri: str, pad_id: int, epoch: int = 0) -> list:
    """Our reader's batches of `epoch` for rank 0 of 1, in plan order (what one worker trains on)."""
    from vits_ray.data.reader import ShardReader

    store, manifest = open_data(data_uri)
    reader = ShardReader(store, manifest, "train", 0, 1, seed=cfg.train.seed, batch_size=cfg.train.batch_size,
                         max_batch_seconds=cfg.train.max_batch_seconds, pad_id=pad_id, prefetch=0)
    return list(reader.iter_epoch(epoch))


# --- 1. loop overhead ----------------------------------------------------------------------

def bare_step(model, criteria, optimizers, batch, clip: tuple[float, float] | None) -> None:
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


def model_build(data_uri: str) -> dict:
    """Build the tiny model and its optimizers: the time a second build takes, the pad id, the sizes."""
    from vits_ray.model import build_model, build_optimizers
    from vits_ray.text import Vocabulary

    cfg = load()
    vocab = Vocabulary.from_dict(open_data(data_uri)[1]["vocab"])
    build_optimizers(build_model(cfg, vocab), cfg)  # the first build imports librosa, scipy, torch._dynamo
    started = time.perf_counter()
    model = build_model(cfg, vocab)
    build_optimizers(model, cfg)
    return {"seconds": time.perf_counter() - started, "pad_id": int(model.tokenizer.characters.pad_id),
            "vocab": vocab, "params": sum(p.numel() for p in model.parameters()),
            "disc_params": sum(p.numel() for p in model.disc.parameters())}


def loop_overhead(data_uri: str, built: dict, warmup: int, reps: int) -> dict:
    """Figure 1: step times of the bare loops and `gan_step` on one batch, interleaved."""
    from vits_ray.model import build_model, build_optimizers
    from vits_ray.step import Precision, gan_step

    cfg = load()
    unfused = load("optim.fused=false")
    vocab = built["vocab"]
    full = [b for b in epoch_batches(cfg, data_uri, built["pad_id"]) if len(b) == cfg.train.batch_size]
    vits_batch = max(full, key=lambda b: b.num_samples)  # the fullest batch: a typical working size

    optimizer_of = {"bare": lambda m: m.get_optimizer(), "bare+clip": lambda m: m.get_optimizer(),
                    "gan_step fused": lambda m: build_optimizers(m, cfg),
                    "gan_step unfused": lambda m: build_optimizers(m, unfused)}
    names = tuple(optimizer_of)
    state = {}
    for name in names:
        model = build_model(cfg, vocab)  # same seed: identical weights
        model.train()
        batch = model.format_batch_on_device(model.format_batch(vits_batch.to_coqui("cpu")))
        state[name] = (model, model.get_criterion(), optimizer_of[name](model), batch)
    assert type(state["gan_step fused"][2][0]).__name__ == "AdamW" and state["gan_step fused"][2][0].defaults["fused"]
    assert not state["gan_step unfused"][2][0].defaults.get("fused")
    precision = Precision.resolve("no", "cpu")
    clip = (cfg.optim.grad_clip_disc, cfg.optim.grad_clip_gen)

    def run(name: str) -> float:
        model, criteria, optimizers, batch = state[name]
        start = time.perf_counter()
        if name.startswith("gan_step"):
            gan_step(model, criteria, optimizers, None, batch, precision, clip)
        else:
            bare_step(model, criteria, optimizers, batch, clip if name == "bare+clip" else None)
        return time.perf_counter() - start

    torch.manual_seed(0)
    for _ in range(warmup):
        for name in names:
            run(name)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]  # no variant always runs first
        for name in order:
            times[name].append(run(name))
    return {"times": times, "batch_audio": vits_batch.num_samples / cfg.audio.sample_rate,
            "batch_len": len(vits_batch), "params": built["params"], "disc_params": built["disc_params"]}


def print_overhead(r: dict) -> None:
    times = r["times"]
    med = {n: median(t) for n, t in times.items()}
    low = {n: min(t) for n, t in times.items()}  # the least disturbed by other load on the machine
    print(f"\n1. Loop overhead: one batch ({r['batch_len']} utterances, {r['batch_audio']:.2f} s of audio), "
          f"{len(times['bare'])} interleaved repetitions; model {r['params'] / 1e6:.1f}M parameters "
          f"({r['disc_params'] / 1e6:.1f}M discriminator)")
    print(f"   {'loop':<17} {'median s':>9} {'min s':>7} {'max s':>7} {'median/bare':>11} {'min/bare':>8} "
          f"{'median/bare+clip':>16}")
    for name, values in times.items():
        print(f"   {name:<17} {med[name]:9.3f} {low[name]:7.3f} {max(values):7.3f} {med[name] / med['bare']:11.3f} "
              f"{low[name] / low['bare']:8.3f} {med[name] / med['bare+clip']:16.3f}")
    for name, base in (("gan_step unfused", "bare+clip"), ("gan_step unfused", "bare"), ("gan_step fused", "bare")):
        print(f"   {name} vs {base}: {100 * (med[name] / med[base] - 1):+.1f}% (median), "
              f"{100 * (low[name] / low[base] - 1):+.1f}% (min)")
    print("   (target < 5%; 'unfused vs bare+clip' is the loop alone: same optimizer, both clip)")


# --- 2. host syncs -------------------------------------------------------------------------

SYNC_METHODS = ("item", "__float__", "__int__", "__bool__", "tolist", "cpu", "numpy", "__index__")


class SyncCounter:
    """Counts calls of tensor-to-host methods by (step, calling module, method)."""

    def __init__(self) -> None:
        self.step = 0
        self.calls: collections.Counter = collections.Counter()

    @contextlib.contextmanager
    def patched(self):
        own = {name: torch.Tensor.__dict__[name] for name in SYNC_METHODS if name in torch.Tensor.__dict__}
        for name in SYNC_METHODS:
            setattr(torch.Tensor, name, self._counting(name, getattr(torch.Tensor, name)))
        try:
            yield self
        finally:
            for name in SYNC_METHODS:
                if name in own:
                    setattr(torch.Tensor, name, own[name])
                else:
                    delattr(torch.Tensor, name)

    def _counting(self, name: str, original):
        counter = self

        def counted(tensor, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "?")
            counter.calls[(counter.step, caller, name)] += 1
            return original(tensor, *args, **kwargs)

        return counted


# Who made the call. The reader's batch (vits_ray.data) is built on the host and only then copied
# to the device, so its int()s read host memory: never a sync. Coqui's model code includes its
# monotonic alignment search, a package of its own.
CALLER_GROUPS = (("vits_ray.data", "vits_ray.data*"), ("vits_ray", "vits_ray"), ("TTS", "Coqui model"),
                 ("monotonic_alignment_search", "Coqui model"), ("torch", "torch"))
GROUPS = ("vits_ray", "vits_ray.data*", "Coqui model", "torch", "other")


def caller_group(module: str) -> str:
    for prefix, group in CALLER_GROUPS:
        if module == prefix or module.startswith(prefix + "."):
            return group
    return "other"


def host_syncs(data_uri: str, root: Path, steps: int) -> dict:
    """Figure 2: `Trainer.run()` for `steps` steps with the tensor-to-host methods counted."""
    from ranks import DirectorySession

    from vits_ray.train import TrainJob
    from vits_ray.trainer import Trainer

    cfg = load()
    job = TrainJob(config=cfg.to_dict(), data_uri=data_uri, storage_uri=str(root), name="syncs", workers=1,
                   max_steps=steps)
    (root / "checkpoints").mkdir(parents=True, exist_ok=True)
    with output_to(root / "console.txt"):
        trainer = Trainer(job, 0, 1, torch.device("cpu"), DirectorySession(root / "checkpoints", 0))
    counter = SyncCounter()
    synced, saved = set(), set()

    def wrap(method, on_call):
        def wrapped(*args, **kwargs):
            on_call()
            return method(*args, **kwargs)
        return wrapped

    def start_step() -> None:
        counter.step = trainer.progress.step + 1

    trainer.train_step = wrap(trainer.train_step, start_step)
    trainer.sync = wrap(trainer.sync, lambda: synced.add(counter.step))
    trainer.save = wrap(trainer.save, lambda: saved.add(counter.step))
    with output_to(root / "console.txt"), counter.patched():
        trainer.run()
    trainer.close()
    kinds = {s: "save" if s in saved else "sync" if s in synced else "plain" for s in range(1, steps + 1)}
    return {"calls": counter.calls, "kinds": kinds, "steps": steps}


def print_host_syncs(r: dict) -> None:
    calls, kinds = r["calls"], r["kinds"]
    print(f"\n2. Host syncs per step: the real Trainer.run(), one rank in this process, {r['steps']} steps, "
          f"log_step {LOG_STEP}, fp32 CPU (no GradScaler)")
    print(f"   calls per step of {', '.join(SYNC_METHODS)}, by calling module (mean, max in brackets)")
    print(f"   {'steps':<34} {'n':>3} " + " ".join(f"{g:>14}" for g in GROUPS))
    labels = {"plain": "plain (not a sync point)", "sync": "sync points (log step, epoch end)",
              "save": "final step (sync + checkpoint)"}
    for kind, label in labels.items():
        steps = [s for s, k in kinds.items() if k == kind]
        if not steps:
            continue
        per_step = {g: [sum(n for (s, m, _), n in calls.items() if s == step and caller_group(m) == g)
                        for step in steps] for g in GROUPS}
        cells = " ".join(f"{statistics.mean(v):7.1f} ({max(v):>4})" for v in per_step.values())
        print(f"   {labels[kind]:<34} {len(steps):>3} {cells}")
    print("   which calls (per step, mean over the steps of that kind):")
    for kind in labels:
        steps = [s for s, k in kinds.items() if k == kind]
        if not steps:
            continue
        by_site = collections.Counter()
        for (s, module, method), n in calls.items():
            if s in steps:
                by_site[(module, method)] += n
        listing = ", ".join(f"{m}.{meth} {n / len(steps):g}" for (m, meth), n in sorted(by_site.items()))
        print(f"     {kind}: {listing or 'none'}")
    print("   * vits_ray.data: int() of the reader's batch lengths, host tensors before the copy to the device "
          "(on a GPU these read host memory; not a sync).")
    print("   Not counted: implicit syncs in C++ (e.g. Coqui slicing by a 0-d tensor, x[:, :n], or a "
          "tensor used as a size), and torch.distributed's own.")


# --- 3. two workers: exposed gradient communication ----------------------------------------

class FlatAllReduce:
    """The previous gradient sync, as a baseline: after backward, one flat all-reduce, exposed.

    The same interface as `GradientSync` (`overlapping()`, `finish()`, `wait_seconds`), so the
    Trainer's `gan_step` runs it unchanged. `wait_seconds` is the whole of `finish()`: nothing of
    it overlaps with backward.
    """

    def __init__(self, params):
        self.params = [p for p in params if p.requires_grad]
        self.wait_seconds = 0.0

    def overlapping(self):
        return contextlib.nullcontext()

    def finish(self) -> None:
        started = time.perf_counter()
        grads = []
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            n = g.numel()
            g.copy_(flat[offset: offset + n].view_as(g))
            offset += n
        self.wait_seconds = time.perf_counter() - started


def timed_finish(sync) -> list[float]:
    """Wrap `sync.finish` on the instance; returns the list each call's wall time is appended to."""
    times: list[float] = []
    original = sync.finish

    def finish() -> None:
        started = time.perf_counter()
        original()
        times.append(time.perf_counter() - started)

    sync.finish = finish
    return times


def two_worker_rank(rank: int, world: int, data_uri: str, root: str, schedule: str, bucket_mb: float) -> None:
    """One rank of figure 3 (run by `tests/ranks.run_ranks` in its own process): `schedule` is a
    string of 'O' (overlapped GradientSync) and 'F' (FlatAllReduce), one letter per step."""
    from ranks import DirectorySession

    from vits_ray.train import TrainJob
    from vits_ray.trainer import Trainer

    cfg = load("train.batch_size=2", f"train.grad_bucket_mb={bucket_mb}")
    job = TrainJob(config=cfg.to_dict(), data_uri=data_uri, storage_uri=root, name="two", workers=world)
    trainer = Trainer(job, rank, world, torch.device("cpu"), DirectorySession(Path(root) / "checkpoints", rank))
    modes = {"O": trainer.grad_syncs, "F": tuple(FlatAllReduce(p for g in o.param_groups for p in g["params"])
                                                  for o in trainer.optimizers)}
    finish_times = {mode: [timed_finish(s) for s in syncs] for mode, syncs in modes.items()}
    batches = itertools.chain.from_iterable(trainer.reader.iter_epoch(e) for e in itertools.count())
    records = []
    for index, mode in enumerate(schedule, start=1):
        trainer.grad_syncs = modes[mode]
        started = time.perf_counter()
        batch = next(batches)
        trainer.train_step(batch, trainer.reader.loader_time)
        step_time = time.perf_counter() - started
        records.append({"mode": mode, "step_time": step_time, "wait": sum(s.wait_seconds for s in modes[mode]),
                        "finish": sum(t[-1] for t in finish_times[mode])})
        if index % LOG_STEP == 0:
            trainer.sync()  # as the loop does at a log step (not in the step time)
    trainer.sync()
    Path(root, f"rank{rank}.json").write_text(json.dumps(records))


def two_workers(data_uri: str, root: Path, warmup: int, blocks: int, block: int, bucket_mb: float) -> dict:
    """Figure 3: two ranks, `warmup` steps of each sync, then `blocks` x (`block` overlapped, `block` flat)."""
    from ranks import run_ranks

    schedule = "O" * warmup + "F" * warmup + ("O" * block + "F" * block) * blocks
    (root / "checkpoints").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with output_to(root / "console.txt"):
        failures = run_ranks(2, two_worker_rank, data_uri, str(root), schedule, bucket_mb)
    if failures:
        raise RuntimeError(f"two-worker run failed: {failures}")
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]
    # A rank that reaches a collective first also waits for the other's backward to end (skew); the
    # rank that arrives last waits for the communication alone: the min over ranks.
    steps = [{"mode": a["mode"], **{k: (a[k] + b[k]) / 2 for k in ("step_time", "wait", "finish")},
              "wait_min": min(a["wait"], b["wait"])} for a, b in zip(*ranks)][2 * warmup:]
    return {"steps": steps, "ranks": ranks, "wall": time.perf_counter() - started, "warmup": warmup,
            "bucket_mb": bucket_mb}


def print_two_workers(r: dict) -> None:
    print(f"\n3. Two CPU workers (Trainer in 2 processes, gloo, 1 torch thread each, batch 2 per rank; "
          f"{r['warmup']} warm-up steps per variant, then blocks of each in turn; buckets of {r['bucket_mb']:g} MB; "
          f"{r['wall']:.0f} s in all)")
    print("   wait: time finish() waited for the all-reduce (and copied the averages back), per step, D + G;")
    print("   mean of the ranks, and min of the ranks (the rank that reached the all-reduce last: communication "
          "without skew)")
    print(f"   {'gradient sync':<32} {'steps':>5} {'median step s':>13} {'wait s':>7} {'share':>6} "
          f"{'wait min s':>10} {'share':>6} {'finish() s':>10}")
    rows = {}
    for mode, label in (("O", "overlapped (GradientSync)"), ("F", "flat all-reduce after backward")):
        steps = [s for s in r["steps"] if s["mode"] == mode]
        total = sum(s["step_time"] for s in steps)
        rows[mode] = row = {"n": len(steps), "median": median(s["step_time"] for s in steps),
                            "wait": statistics.mean(s["wait"] for s in steps),
                            "wait_share": sum(s["wait"] for s in steps) / total,
                            "wait_min": statistics.mean(s["wait_min"] for s in steps),
                            "min_share": sum(s["wait_min"] for s in steps) / total,
                            "finish": statistics.mean(s["finish"] for s in steps)}
        print(f"   {label:<32} {row['n']:>5} {row['median']:13.3f} {row['wait']:7.3f} {100 * row['wait_share']:5.1f}% "
              f"{row['wait_min']:10.3f} {100 * row['min_share']:5.1f}% {row['finish']:10.3f}")
    print(f"   step time overlapped / flat (median): {rows['O']['median'] / rows['F']['median']:.3f}; "
          f"target: wait under 5% of the step")


# --- 6. what length bucketing is worth on its own ---------------------------------------------

def random_regroup(batches: list, pad_id: int, seed: int = 0) -> list:
    """The same utterances in batches of the same sizes, drawn at random (no length bucketing)."""
    import numpy as np

    from vits_ray.data.batch import collate

    rows = [(b.ids[i], b.speakers[i], b.texts[i], b.tokens[i, : int(b.token_lens[i])].numpy(),
             (b.waveform[i, 0, : int(b.waveform_lens[i])].numpy() * 32768.0).round().astype(np.int16))
            for b in batches for i in range(len(b))]
    order = np.random.default_rng(seed).permutation(len(rows))
    out, start = [], 0
    for b in batches:
        group = [rows[j] for j in order[start: start + len(b)]]
        start += len(b)
        out.append(collate(*map(list, zip(*group)), pad_id))
    return out


def bucketing_gain(data_uri: str, built: dict, n_batches: int, reps: int, recipe: str = "tiny") -> dict:
    """Figure 6: our step on the reader's length-bucketed batches against random batches of the
    same utterances and sizes: audio seconds per second, and the padded share of each."""
    from vits_ray.model import build_model, build_optimizers
    from vits_ray.step import Precision, gan_step

    cfg = load_config(recipe, RUN_OVERRIDES + ["train.max_batch_seconds=30"])
    bucketed = epoch_batches(cfg, data_uri, built["pad_id"])[:n_batches]
    variants = {"bucketed (our reader)": bucketed, "random, same utterances": random_regroup(bucketed, built["pad_id"])}
    precision = Precision.resolve("no", "cpu")
    clip = (cfg.optim.grad_clip_disc, cfg.optim.grad_clip_gen)
    seconds = {name: 0.0 for name in variants}
    for rep in range(reps):
        for name in (list(variants) if rep % 2 == 0 else list(variants)[::-1]):
            model = build_model(cfg, built["vocab"])
            optimizers, criteria = build_optimizers(model, cfg), model.get_criterion()
            formatted = [model.format_batch_on_device(model.format_batch(b.to_coqui("cpu"))) for b in variants[name]]
            gan_step(model, criteria, optimizers, None, formatted[0], precision, clip)  # warm-up
            started = time.perf_counter()
            for batch in formatted:
                gan_step(model, criteria, optimizers, None, batch, precision, clip)
            seconds[name] += time.perf_counter() - started
    audio = sum(b.num_samples for b in bucketed) / cfg.audio.sample_rate * reps
    return {"n": n_batches, "reps": reps, "audio": audio / reps, "recipe": recipe,
            "rows": {name: {"rate": audio / seconds[name],
                            "padded": sum(b.padded_samples for b in bs) / sum(b.waveform.numel() for b in bs)}
                     for name, bs in variants.items()}}


def print_bucketing(r: dict) -> None:
    rows = r["rows"]
    print(f"\n6. Length bucketing on its own ({r['recipe']} recipe): our gan_step on the reader's first {r['n']} batches of epoch 0 "
          f"({r['audio']:.1f} s of audio) and on random batches of the same utterances and sizes, "
          f"{r['reps']} alternating passes")
    for name, row in rows.items():
        print(f"   {name:<28} audio s/s {row['rate']:6.2f}   padded {100 * row['padded']:5.1f}%")
    names = list(rows)
    print(f"   bucketed / random: {rows[names[0]]['rate'] / rows[names[1]]['rate']:.2f}x")


# --- 4. and 5. our run_training against Coqui's Trainer on the same batches ----------------

def cold_imports(data_uri: str) -> dict[str, float]:
    """Seconds a fresh interpreter spends importing and building the model, cumulative.

    The first model build imports librosa and scipy.signal (Coqui's mel filters) and the first
    optimizer torch._dynamo: one-off import costs that every new process pays, ours and Coqui's.
    """
    code = f"""
import json, sys, time
t = time.perf_counter(); out = {{}}
import torch; out["torch"] = time.perf_counter() - t
import TTS.tts.models.vits; out["+ TTS Vits"] = time.perf_counter() - t
import trainer; out["+ Coqui trainer"] = time.perf_counter() - t
import ray.train.torch; out["+ ray.train.torch"] = time.perf_counter() - t
import vits_ray.train, vits_ray.trainer, vits_ray.data.reader; out["+ vits_ray"] = time.perf_counter() - t
sys.path.insert(0, {str(Path(__file__).parent)!r})
from bench_train import load, open_data
from vits_ray.model import build_model, build_optimizers
from vits_ray.text import Vocabulary
model = build_model(load(), Vocabulary.from_dict(open_data({data_uri!r})[1]["vocab"]))
out["+ first model build"] = time.perf_counter() - t
build_optimizers(model, load()); out["+ first optimizers"] = time.perf_counter() - t
print(json.dumps(out))
"""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    out["interpreter total"] = time.perf_counter() - started
    return out


def newest_mtime(folder: Path) -> float:
    return max(p.stat().st_mtime for p in folder.rglob("*") if p.is_file())


def ray_actor_starts(since: float) -> dict[str, list[float]]:
    """When each Ray actor process started (time.time()), from this Ray session's log files, for the
    actors started after `since`. Best effort: Ray's log layout is not an API; {} if it changes.

    A worker's `worker-*-PID.out` names its actor on its second line; `python-core-worker-*_PID.log`
    starts with a timestamped line written as the process comes up.
    """
    import datetime

    import ray

    try:
        logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    except AttributeError:
        logs = Path("/tmp/ray/session_latest/logs")
    starts: dict[str, list[float]] = collections.defaultdict(list)
    for out in logs.glob("worker-*.out"):
        lines = out.read_text(errors="replace").splitlines()[:2]
        pid = out.stem.rsplit("-", 1)[-1]
        core = list(logs.glob(f"python-core-worker-*_{pid}.log"))
        if len(lines) < 2 or not lines[1].startswith(":actor_name:") or not core:
            continue
        stamp = core[0].read_text(errors="replace")[1:24]  # [2026-11-25 13:50:51,557 ...
        try:
            started = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:
            continue
        if started >= since:
            starts[lines[1].removeprefix(":actor_name:")].append(started)
    return dict(starts)


def ours(data_uri: str, storage: Path, steps: int) -> dict:
    """`run_training` with one Ray worker, timed from outside (see the module docstring, 5)."""
    from vits_ray.train import TrainJob, ensure_ray, preflight, run_training

    cfg = load()
    job = TrainJob(config=cfg.to_dict(), data_uri=data_uri, storage_uri=str(storage), name="ours", workers=1,
                   max_steps=steps, cpus_per_worker=1)
    # As `make bench` and the tests run it: Ray's metrics thread has crashed a TrainController here.
    os.environ.setdefault("RAY_enable_metrics_collection", "0")
    with output_to(storage / "console.txt"):
        started = time.perf_counter()
        ensure_ray()
        ray_start = time.perf_counter() - started
        started = time.perf_counter()
        preflight(job)  # run_training does it again; timed apart here
        preflight_seconds = time.perf_counter() - started
        begin = time.time()
        run_training(job)
        end = time.time()
    actors = ray_actor_starts(begin)
    run = storage / "ours"
    records = [r for r in read_records(open_store(str(run)))[0] if r["kind"] == "step"]
    checkpoints = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())  # not Ray's checkpoint_manager files
    marks = {"begin": begin, "worker": min(actors.get("RayTrainWorker", [float("nan")])),
             "built": (run / "config.toml").stat().st_mtime,
             "first step": records[0]["time"] - records[0]["step_time"], "last step": records[-1]["time"],
             "checkpoint": newest_mtime(checkpoints[-1]), "export": newest_mtime(run / "export"),
             "closed": newest_mtime(run / RECORDS_DIR), "end": end}
    return {"records": records, "marks": marks, "ray_start": ray_start, "preflight": preflight_seconds,
            "actors": actors}


def ours_local(data_uri: str, storage: Path, steps: int) -> dict:
    """`run_training(local=True)`: the same Trainer in this process, without Ray (figures 4 and 5)."""
    from vits_ray.train import TrainJob, run_training

    job = TrainJob(config=load().to_dict(), data_uri=data_uri, storage_uri=str(storage), name="local", workers=1,
                   max_steps=steps, cpus_per_worker=1)
    with output_to(storage / "console-local.txt"):
        begin = time.time()
        run_training(job, local=True)
        end = time.time()
    torch.set_num_threads(1)
    run = storage / "local"
    records = [r for r in read_records(open_store(str(run)))[0] if r["kind"] == "step"]
    checkpoints = sorted(p for p in run.glob("checkpoint_*") if p.is_dir())
    marks = {"begin": begin, "built": (run / "config.toml").stat().st_mtime,
             "first step": records[0]["time"] - records[0]["step_time"], "last step": records[-1]["time"],
             "checkpoint": newest_mtime(checkpoints[-1]), "export": newest_mtime(run / "export"),
             "closed": newest_mtime(run / RECORDS_DIR), "end": end}
    return {"records": records, "marks": marks}


def print_local(local: dict, t: dict, batches: list, sample_rate: int) -> None:
    """Figures 4 and 5 for the local mode, against the same Coqui runs."""
    records, (first, last) = local["records"], t["window"]
    ends = [r["time"] for r in records]
    steps = [b - a for a, b in zip(ends[first - 2: last - 1], ends[first - 1: last])]
    rate = t["audio"] / sum(steps)
    m = local["marks"]
    outside = (m["end"] - m["begin"]) - (m["last step"] - m["first step"])
    print("\n4b/5b. Local mode (run_training(local=True): the Trainer in this process, no Ray)")
    print(f"   audio s/s {rate:.2f}, ours-local / Coqui's {rate / t['coqui_rate']:.2f}x; median step "
          f"{median(steps):.3f} s")
    print(f"   outside the steps: {outside:.1f} s (Coqui in this process: see 5)")
    for label, a, b in (("set-up until config.toml (manifest, model, optimizers)", "begin", "built"),
                        ("rest of set-up until step 1", "built", "first step"),
                        ("final sync + checkpoint", "last step", "checkpoint"),
                        ("export", "checkpoint", "export"), ("close", "export", "closed"),
                        ("return", "closed", "end")):
        print(f"     {label:<88} {m[b] - m[a]:6.2f} s")


def coqui_run(batches: list, vocab, out: Path) -> dict:
    """Coqui's Trainer on `batches` (our VitsBatches, in order), in this process."""
    from coqui_baseline import run_coqui_on_batches

    with output_to(out / "console.txt"):
        return run_coqui_on_batches([b.to_coqui("cpu") for b in batches], out, load(), vocab, print_step=LOG_STEP)


def throughput(run: dict, coquis: list[dict], batches: list, sample_rate: int) -> dict:
    """Steady-state audio seconds per wall second, steps 3..N-1, for both loops (figure 4)."""
    records, n = run["records"], len(batches)
    audio = [b.num_samples / sample_rate for b in batches]
    # The same utterances in the same batches: check what our run logged against Coqui's batches.
    for record, batch, seconds in zip(records, batches, audio):
        if record["batch_size"] != len(batch) or abs(record["audio_seconds"] - seconds) > 1e-6:
            raise RuntimeError(f"step {record['step']}: our run trained on another batch than Coqui's")
    if len(records) != n or any(len(c["step_starts"]) != n for c in coquis):
        raise RuntimeError(f"steps: ours {len(records)}, Coqui's {[len(c['step_starts']) for c in coquis]}, "
                           f"batches {n}")
    first, last = WARMUP_STEPS + 1, n - 1  # 1-based steps of the window
    window_audio = sum(audio[first - 1: last])
    ends = [r["time"] for r in records]  # end of each of our steps
    our_steps = [b - a for a, b in zip(ends[first - 2: last - 1], ends[first - 1: last])]
    steady = records[first - 1: last]
    out = {"steps": n, "window": (first, last), "audio": window_audio, "audio_per_step": window_audio / len(steady),
           "ours": {"wall": sum(our_steps), "median_step": median(our_steps),
                    "loop_step_time": statistics.mean(r["step_time"] for r in steady),
                    "loader": statistics.mean(r["loader_time"] for r in steady)},
           "coqui": []}
    for c in coquis:
        starts = c["step_starts"]
        steps = [b - a for a, b in zip(starts[first - 1: last], starts[first: last + 1])]
        out["coqui"].append({"wall": sum(steps), "median_step": median(steps)})
    for row in [out["ours"]] + out["coqui"]:
        row["rate"] = window_audio / row["wall"]
    out["coqui_rate"] = window_audio / statistics.mean(c["wall"] for c in out["coqui"])
    return out


def print_throughput(t: dict) -> None:
    first, last = t["window"]
    o = t["ours"]
    print(f"\n4. Throughput against Coqui's Trainer, like for like: the first {t['steps']} batches of our reader's "
          f"epoch-0 plan in both; steady state steps {first}..{last} ({t['audio']:.1f} s of audio, "
          f"{t['audio_per_step']:.2f} s per step)")
    print(f"   {'loop':<48} {'wall s':>7} {'median step s':>13} {'audio s/s':>9}")
    rows = [("ours: run_training, 1 Ray worker", o)]
    rows += [(f"Coqui: Trainer.fit() in this process, {when}", c)
             for when, c in zip(("before ours", "after ours"), t["coqui"])]
    for label, row in rows:
        print(f"   {label:<48} {row['wall']:7.2f} {row['median_step']:13.3f} {row['rate']:9.2f}")
    print(f"   ours / Coqui's audio per second: {o['rate'] / t['coqui_rate']:.2f}x against the mean of Coqui's runs "
          f"(goal >= 1.2x); median step time ours / Coqui's: "
          f"{o['median_step'] / statistics.mean(c['median_step'] for c in t['coqui']):.2f}")
    print(f"   ours: mean step_time {o['loop_step_time']:.3f} s, of which waiting for the batch {o['loader']:.3f} s "
          f"(shards read from disk; Coqui's batches were in memory)")


def fixed_cost(run: dict, theirs: dict, imports: dict, build_seconds: float) -> None:
    """Figure 5: the run outside its steps, by phase, ours and Coqui's."""
    m = run["marks"]
    others = sorted(name for name in run["actors"] if name != "RayTrainWorker")
    phases = [("Ray start (ensure_ray, once per driver)", run["ray_start"]),
              ("run_training until the worker process starts: preflight, Ray Train controller, actors",
               m["worker"] - m["begin"]),
              ("  of which preflight (timed apart)", run["preflight"]),
              ("worker start until config.toml: imports, process group, model build", m["built"] - m["worker"]),
              ("  for comparison: a fresh interpreter's imports, first model + optimizers build",
               imports["+ first optimizers"]),
              ("  for comparison: model + optimizers build, warm (second build in this process)", build_seconds),
              ("rest of Trainer set-up (readers, capture of the start state) until step 1", m["first step"] - m["built"]),
              ("steps (first start to last end)", m["last step"] - m["first step"]),
              ("final sync + checkpoint (checksums, capture, write, Ray persists it)", m["checkpoint"] - m["last step"]),
              ("export (model.pth + config.json)", m["export"] - m["checkpoint"]),
              ("close (TensorBoard, records)", m["closed"] - m["export"]),
              ("Ray Train wind-down until run_training returns", m["end"] - m["closed"])]
    wall = m["end"] - m["begin"]
    outside = wall - (m["last step"] - m["first step"])
    print("\n5. Fixed cost of a run outside its steps (the runs of 4; Coqui's first run)")
    print(f"   ours, run_training with 1 worker: {wall:.1f} s wall, {outside:.1f} s outside the steps "
          f"(+ {run['ray_start']:.1f} s Ray start)")
    for label, seconds in phases:
        print(f"     {label:<88} {seconds:6.2f} s")
    print(f"   Ray Train started {len(others)} actor processes besides the worker: {', '.join(others) or 'none found'}")
    starts, ends = theirs["step_starts"], theirs["step_ends"]
    coqui_steps = ends[-1] - starts[0]
    coqui_wall = theirs["build"] + theirs["fit"]
    print(f"   Coqui, Trainer in this process: {coqui_wall:.1f} s wall, {coqui_wall - coqui_steps:.1f} s outside "
          f"the steps")
    for label, seconds in (("model + Trainer construction", theirs["build"]),
                           ("fit() until step 1", starts[0] - theirs["fit_start"]),
                           ("steps (first start to last end)", coqui_steps),
                           ("fit() after the last step", theirs["fit_end"] - ends[-1]),
                           ("(one save_checkpoint() after fit, not in its run)", theirs["save_checkpoint"])):
        print(f"     {label:<88} {seconds:6.2f} s")
    print(f"   cold imports in a fresh interpreter (cumulative): "
          + ", ".join(f"{k} {v:.1f} s" for k, v in imports.items())
          + ". Both loops' processes pay the first build's lazy imports; Coqui's Trainer ran in this "
          "process, where they were done already")


# --- main ---------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and steps")
    parser.add_argument("--n", type=int, default=60, help="demo corpus size (utterances)")
    parser.add_argument("--only", default="1,2,3,4,6", help="figures to run: 1, 2, 3, 4 (4 gives 5 too), 6")
    parser.add_argument("--bucket-recipe", default="tiny",
                        help="recipe for figure 6 (bn_bd_vits: the 83M reference model, slow on a CPU)")
    parser.add_argument("--bucket-batches", type=int, default=0, help="batches for figure 6 (0: 10, 6 with --quick)")
    parser.add_argument("--bucket-mb", type=float, default=load().train.grad_bucket_mb,
                        help="gradient bucket size for figure 3 (train.grad_bucket_mb)")
    args = parser.parse_args()
    figures = {int(f) for f in args.only.split(",")}
    warmup, reps = (1, 4) if args.quick else (2, 8)
    sync_steps = 12 if args.quick else 22
    blocks, block = (2, 2) if args.quick else (4, 2)
    run_steps = 8 if args.quick else 14
    torch.set_num_threads(1)
    logging.getLogger("TTS").setLevel(logging.ERROR)  # "Could not identify language" once per model
    cfg = load()
    load_avg = os.getloadavg()
    print(f"bench_train: {len(os.sched_getaffinity(0))} CPU core(s), torch {torch.__version__}, 1 torch thread "
          f"per process, tiny recipe, batch {cfg.train.batch_size}, fp32{', --quick' if args.quick else ''}; "
          f"load average {load_avg[0]:.2f} at start")

    from vits_ray.data.ingest import prepare_corpus
    from vits_ray.demo.corpus import write_demo_corpus

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        corpus = write_demo_corpus(tmp / "demo", n=args.n, seed=0)
        data_uri = str(tmp / "shards")
        summary = prepare_corpus(corpus, "ljspeech", data_uri, cfg, progress=False)
        print(f"demo corpus: {summary.accepted} utterances, {summary.accepted_seconds:.1f} s of audio")

        built = model_build(data_uri)
        if 1 in figures:
            print_overhead(loop_overhead(data_uri, built, warmup, reps))
        if 2 in figures:
            print_host_syncs(host_syncs(data_uri, tmp / "syncs", sync_steps))
        if 3 in figures:
            print_two_workers(two_workers(data_uri, tmp / "two", warmup, blocks, block, args.bucket_mb))
        if 4 in figures:
            batches = epoch_batches(cfg, data_uri, built["pad_id"])
            if len(batches) < run_steps:
                raise SystemExit(f"epoch 0 has {len(batches)} batches, fewer than {run_steps} steps: raise --n")
            batches = batches[:run_steps]
            imports = cold_imports(data_uri)
            import ray

            theirs = coqui_run(batches, built["vocab"], tmp / "coqui-before")
            try:
                run = ours(data_uri, tmp / "runs", run_steps)
            finally:
                ray.shutdown()
            local = ours_local(data_uri, tmp / "runs", run_steps)
            theirs_after = coqui_run(batches, built["vocab"], tmp / "coqui-after")
            t = throughput(run, [theirs, theirs_after], batches, cfg.audio.sample_rate)
            print_throughput(t)
            fixed_cost(run, theirs, imports, built["seconds"])
            print_local(local, t, batches, cfg.audio.sample_rate)
        if 6 in figures:
            n_batches = args.bucket_batches or (6 if args.quick else 10)
            print_bucketing(bucketing_gain(data_uri, built, n_batches, 2 if args.quick else 3, args.bucket_recipe))
        print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
