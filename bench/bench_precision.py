"""Mixed precision on the CPU: what fp16 costs there, and where the VITS step overflows in fp16.

    .venv/bin/python bench/bench_precision.py [--steps 200] [--speed-steps 3] [--skip-speed]

Writes a 40-utterance demo corpus and prepares it with the tiny recipe (8 rows per shard), then,
all in this process with one torch thread, through `vits_ray.step.gan_step` (the loop's own step):

1. Speed. The tiny recipe as it is (batch 4, two period discriminators) and the reduced one the
   fp16 tests use (batch 1, one period discriminator, `spec_segment_size` 4): fp32, bf16 and fp16
   (GradScaler at 2**16), the same fixed batch, one warm-up step, then the median of
   `--speed-steps` steps. Ratios against fp32 of the same recipe, measured in the same run.
2. A long fp16 run (`--steps`, default 200) on the reduced recipe, from a fresh GradScaler at
   2**16, over the reader's epochs, with fp32 on the same batches and seeds beside it. Per step:
   the scale it used, which optimizer skipped, the losses (and whether any was non-finite), and
   on a generator overflow where its backward first overflowed (`OverflowTracer`). The dtype of every
   loss `train_step` returns under autocast is recorded (Coqui computes its losses in fp32).
   Printed: the scale over time, the skips per window of steps, where the overflows were, and
   the mel loss of fp16 against fp32.

It asserts nothing; figures from a shared machine are noisy: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import collections
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tune import prepare_demo  # noqa: E402

REDUCED = ["train.batch_size=1", "model.periods_multi_period_discriminator=[2]", "model.spec_segment_size=4"]


class Setup:
    """A fresh tiny model (seed 0), its optimizers, criteria and a reader for one recipe."""

    def __init__(self, data: str, overrides: list[str]):
        from vits_ray.config import load_config
        from vits_ray.data.reader import ShardReader
        from vits_ray.data.shards import read_manifest
        from vits_ray.model import build_model, build_optimizers
        from vits_ray.storage import open_store
        from vits_ray.text import Vocabulary

        self.cfg = load_config("tiny", overrides)
        store = open_store(data)
        manifest = read_manifest(store)
        vocab = Vocabulary.from_dict(manifest["vocab"])
        torch.manual_seed(0)
        self.model = build_model(self.cfg, vocab)
        self.optimizers = build_optimizers(self.model, self.cfg)
        self.criteria = self.model.get_criterion()
        self.reader = ShardReader(store, manifest, "train", 0, 1, seed=0, batch_size=self.cfg.train.batch_size,
                                  max_batch_seconds=self.cfg.train.max_batch_seconds, pad_id=vocab.pad_id)

    def inputs(self, batch) -> dict:
        return self.model.format_batch_on_device(self.model.format_batch(batch.to_coqui("cpu")))

    def batches(self, count: int):
        epoch = 0
        while True:
            for batch in self.reader.iter_epoch(epoch):
                yield batch
                count -= 1
                if count == 0:
                    return
            epoch += 1


def step_once(setup: Setup, inputs: dict, mode: str, scaler, seed: int) -> dict:
    from vits_ray.step import Precision, gan_step

    precision = Precision.resolve(mode, "cpu")
    torch.manual_seed(seed)
    cfg = setup.cfg.optim
    return gan_step(setup.model, setup.criteria, setup.optimizers, scaler, inputs, precision,
                    (cfg.grad_clip_disc, cfg.grad_clip_gen)).as_dict()


def speed(data: str, overrides: list[str], steps: int) -> dict[str, float]:
    """Median s/step per precision on one fixed batch."""
    from vits_ray.step import Precision

    out = {}
    for mode in ("no", "bf16", "fp16"):
        setup = Setup(data, overrides)
        inputs = setup.inputs(next(setup.batches(1)))
        scaler = Precision.resolve(mode, "cpu").grad_scaler(65536.0)
        times = []
        for i in range(steps + 1):
            started = time.perf_counter()
            step_once(setup, inputs, mode, scaler, seed=i)
            times.append(time.perf_counter() - started)
        out[mode] = statistics.median(times[1:])
        print(f"[bench] {' '.join(overrides) or 'tiny'}: {mode} {out[mode]:.2f} s/step", file=sys.stderr, flush=True)
    return out


class OverflowTracer:
    """Where a backward pass first overflows: every leaf module's output gets a gradient hook that
    notes, in the order backward reaches them, whether the gradient arriving there is finite.
    Once one overflow happened, inf/NaN flows on into every module upstream, so only the first
    non-finite arrival says where: the gradient with respect to that module's output overflowed,
    summed from what consumed it. Hooks check every gradient: slow, bench only."""

    def __init__(self, model):
        self.phase = 0  # which train_step call (0: D, 1: G) produced the tensors hooked now
        self.arrivals: list[tuple[int, str, bool]] = []
        leaves = [(name, m) for name, m in model.named_modules() if name and not list(m.children())]
        for name, module in leaves:
            module.register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def forward(_module, _inputs, output):
            phase = self.phase
            for tensor in output if isinstance(output, (tuple, list)) else (output,):
                if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                    tensor.register_hook(lambda grad: self.arrivals.append(
                        (phase, name, bool(torch.isfinite(grad).all()))))
        return forward

    def reset(self) -> None:
        self.arrivals.clear()

    def generator_origin(self) -> str:
        """The module whose output received the generator backward's first non-finite gradient."""
        # The discriminator's own step backpropagates only what its phase-0 forward made of them.
        generator_backward = [(p, n, ok) for p, n, ok in self.arrivals if not (p == 0 and n.startswith("disc"))]
        first = next((n for p, n, ok in generator_backward if not ok), None)
        return f"gradient at the output of {first}" if first else ""


def long_run(data: str, steps: int) -> dict:
    from vits_ray.step import Precision

    fp16, fp32 = Setup(data, REDUCED), Setup(data, REDUCED)
    scaler = Precision.resolve("fp16", "cpu").grad_scaler(65536.0)
    loss_dtypes: set[str] = set()
    train_step = fp16.model.train_step

    def recording(*args, **kwargs):
        out = train_step(*args, **kwargs)
        loss_dtypes.update(f"{k}:{v.dtype}" for k, v in out[1].items() if isinstance(v, torch.Tensor))
        return out

    tracer = OverflowTracer(fp16.model)

    def traced(batch, criterion, index):
        tracer.phase = index
        return recording(batch, criterion, index)

    fp16.model.train_step = traced
    rows = []
    for i, batch in enumerate(fp16.batches(steps), start=1):
        inputs = fp16.inputs(batch)
        tracer.reset()
        half = step_once(fp16, inputs, "fp16", scaler, seed=i)
        where = [tracer.generator_origin()] if half["skipped_1"] else []
        full = step_once(fp32, fp32.inputs(batch), "no", None, seed=i)
        nonfinite_losses = [k for k in ("loss_0", "loss_1", "loss_mel", "loss_kl", "loss_duration", "loss_feat",
                                        "loss_gen") if not math.isfinite(half[k])]
        rows.append({"step": i, "scale": half["amp_scale"], "skipped_0": int(half["skipped_0"]),
                     "skipped_1": int(half["skipped_1"]), "where": where, "nonfinite_losses": nonfinite_losses,
                     "loss_mel": half["loss_mel"], "loss_mel_fp32": full["loss_mel"], "loss_kl": half["loss_kl"],
                     "loss_duration": half["loss_duration"]})
        if i % 25 == 0:
            print(f"[bench] fp16 step {i}: scale {half['amp_scale']:g}", file=sys.stderr, flush=True)
    return {"rows": rows, "loss_dtypes": sorted(loss_dtypes)}


def report(speeds: dict[str, dict[str, float]], run: dict, steps: int) -> None:
    if speeds:
        print("\n## Speed: s/step on the CPU, one thread (median; ratio to fp32 of the same recipe)\n")
        print("| recipe | fp32 | bf16 | fp16 |")
        print("|---|---:|---:|---:|")
    for recipe, s in speeds.items():
        print(f"| {recipe} | {s['no']:.2f} | {s['bf16']:.2f} ({s['bf16'] / s['no']:.1f}x) | "
              f"{s['fp16']:.2f} ({s['fp16'] / s['no']:.1f}x) |")

    rows = run["rows"]
    print(f"\n## fp16 over {steps} steps (reduced tiny recipe, fresh GradScaler at 65536)\n")
    print(f"Loss dtypes under fp16 autocast: {', '.join(run['loss_dtypes'])}\n")
    print("| steps | scale (first -> last) | D skipped | G skipped | non-finite losses | G overflow first in | "
          "mel fp16 | mel fp32 |")
    print("|---|---|---:|---:|---|---|---:|---:|")
    window = 25
    for start in range(0, len(rows), window):
        part = rows[start:start + window]
        where = collections.Counter(m for r in part for m in r["where"])
        losses = collections.Counter(k for r in part for k in r["nonfinite_losses"])
        mel = [r["loss_mel"] for r in part if math.isfinite(r["loss_mel"])]
        print(f"| {part[0]['step']}-{part[-1]['step']} | {part[0]['scale']:g} -> {part[-1]['scale']:g} | "
              f"{sum(r['skipped_0'] for r in part)} | {sum(r['skipped_1'] for r in part)} | "
              f"{', '.join(f'{k} {n}' for k, n in losses.items()) or '-'} | "
              f"{', '.join(f'{k} {n}' for k, n in where.most_common()) or '-'} | "
              f"{statistics.mean(mel) if mel else math.nan:.1f} | "
              f"{statistics.mean(r['loss_mel_fp32'] for r in part):.1f} |")
    leading = next((i for i, r in enumerate(rows) if not (r["skipped_0"] or r["skipped_1"])), len(rows))
    after = rows[leading:]
    if not after:
        print(f"\nCalibration: not over after {len(rows)} steps (scale {rows[-1]['scale']:g}).")
    else:
        print(f"\nCalibration: {leading} skipped steps, 65536 -> {after[0]['scale']:g}. After it: "
              f"{sum(r['skipped_0'] or r['skipped_1'] for r in after)} skipped of {len(after)} steps "
              f"(D {sum(r['skipped_0'] for r in after)}, G {sum(r['skipped_1'] for r in after)}); "
              f"scale min {min(r['scale'] for r in after):g}, max {max(r['scale'] for r in after):g}, "
              f"last {rows[-1]['scale']:g}.")
    where = collections.Counter(m for r in rows for m in r["where"])
    print(f"Where the generator's backward first overflowed (steps): {dict(where.most_common()) or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--speed-steps", type=int, default=3)
    parser.add_argument("--skip-speed", action="store_true", help="only the long fp16 run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        data = str(prepare_demo(Path(tmp), n=40))
        speeds = {} if args.skip_speed else {
            "tiny (batch 4, periods 2 and 3)": speed(data, [], args.speed_steps),
            "reduced (batch 1, period 2, segment 4)": speed(data, REDUCED, args.speed_steps)}
        run = long_run(data, args.steps)
        report(speeds, run, args.steps)


if __name__ == "__main__":
    main()
