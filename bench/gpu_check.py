"""The precision table of `bench/gpu_check.sh`: our step against a bare Coqui loop, fp16 and bf16.

    .venv/bin/python bench/gpu_check.py [--steps 5] [--batch N]

On CUDA: the 83M reference recipe (`bn_bd_vits`) at batch 32. Without CUDA, the same code on the
tiny recipe reduced as the fp16 tests reduce it (batch 1, one period discriminator, segment 4),
so that the script is exercised in CI and cannot rot; the table then says "cpu".

For each of fp16 (GradScaler) and bf16, one fixed batch of the demo corpus (written and
prepared here, no download), fresh models built with the same seed:
- ours: `vits_ray.step.gan_step` (autocast, scaled backward, unscale, clip, finite check, step);
- bare: Coqui's `train_step` the least way a correct mixed-precision loop calls it (zero,
  autocast forward, scaled backward, unscale, clip, step, D then G, one scaler update);
after one warm-up step, the median of `--steps` steps, the device synchronised around each.
Peak memory is the device's peak allocation over our steps (CUDA) or the process's peak RSS (CPU).
FLOPs per step are counted once with `torch.utils.flop_counter.FlopCounterMode` on an fp32 step;
the model FLOP utilisation divides them by our step time and the device's dense fp16/bf16 peak
(a table of known cards; "n/a" for others and for CPUs).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# Dense fp16/bf16 tensor-core peaks, TFLOP/s (vendor datasheets, no sparsity).
PEAK_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 SXM": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0,
               "H200": 989.4, "A100": 312.0, "L4": 121.0, "A10G": 125.0}
REDUCED_CPU = ["model.periods_multi_period_discriminator=[2]", "model.spec_segment_size=4"]


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare(root: Path, recipe: str, n: int) -> str:
    from vits_ray.config import load_config
    from vits_ray.data.ingest import prepare_corpus
    from vits_ray.demo.corpus import write_demo_corpus

    corpus = write_demo_corpus(root / "corpus", n=n, seed=0)
    prepare_corpus(corpus, "ljspeech", str(root / "shards"), load_config(recipe, ["data.rows_per_shard=64"]),
                   progress=False)
    return str(root / "shards")


class Bench:
    def __init__(self, data: str, recipe: str, overrides: list[str], batch_size: int, device: torch.device):
        from vits_ray.config import load_config
        from vits_ray.data.reader import ShardReader
        from vits_ray.data.shards import read_manifest
        from vits_ray.storage import open_store
        from vits_ray.text import Vocabulary

        self.cfg = load_config(recipe, [f"train.batch_size={batch_size}", *overrides])
        self.device = device
        store = open_store(data)
        manifest = read_manifest(store)
        self.vocab = Vocabulary.from_dict(manifest["vocab"])
        reader = ShardReader(store, manifest, "train", 0, 1, seed=0, batch_size=batch_size, max_batch_seconds=1e6,
                             pad_id=self.vocab.pad_id)
        self.batch = max(reader.iter_epoch(0), key=len)

    def fresh(self):
        from vits_ray.model import build_model, build_optimizers

        torch.manual_seed(0)
        model = build_model(self.cfg, self.vocab).to(self.device)
        inputs = model.format_batch_on_device(model.format_batch(self.batch.to_coqui(self.device)))
        return model, build_optimizers(model, self.cfg), model.get_criterion(), inputs

    def clips(self) -> tuple[float, float]:
        return self.cfg.optim.grad_clip_disc, self.cfg.optim.grad_clip_gen


def bare_step(model, criteria, optimizers, inputs, precision, scaler, clips) -> None:
    """The least a correct mixed-precision VITS loop does around Coqui's train_step."""
    for index in (0, 1):
        optimizers[index].zero_grad(set_to_none=True)
        with precision.autocast():
            _, losses = model.train_step(inputs, criteria[index], index)
        (scaler.scale(losses["loss"]) if scaler is not None else losses["loss"]).backward()
        if scaler is not None:
            scaler.unscale_(optimizers[index])
        params = [p for group in optimizers[index].param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, clips[index])
        if scaler is not None:
            scaler.step(optimizers[index])
        else:
            optimizers[index].step()
    if scaler is not None:
        scaler.update()
    model.model_outputs_cache = None


def timed(bench: Bench, mode: str, steps: int, ours: bool) -> dict[str, float]:
    from vits_ray.step import Precision, gan_step

    precision = Precision.resolve(mode, bench.device.type)
    model, optimizers, criteria, inputs = bench.fresh()
    scaler = precision.grad_scaler(65536.0)
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(bench.device)
    times, skipped = [], 0
    for i in range(steps + 1):
        sync(bench.device)
        started = time.perf_counter()
        if ours:
            result = gan_step(model, criteria, optimizers, scaler, inputs, precision, bench.clips())
            values = result.as_dict()  # one host sync, after the step's work was queued
            skipped += int(values["skipped_0"] or values["skipped_1"]) if i else 0
        else:
            bare_step(model, criteria, optimizers, inputs, precision, scaler, bench.clips())
        sync(bench.device)
        times.append(time.perf_counter() - started)
    peak = (torch.cuda.max_memory_allocated(bench.device) if bench.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"seconds": statistics.median(times[1:]), "peak_bytes": peak, "skipped": skipped}


def flops_per_step(bench: Bench) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from vits_ray.step import Precision, gan_step

    model, optimizers, criteria, inputs = bench.fresh()
    counter = FlopCounterMode(display=False)
    with counter:
        gan_step(model, criteria, optimizers, None, inputs, Precision.resolve("no", bench.device.type), bench.clips())
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=0, help="measured steps per row (default: 5 on CUDA, 1 on CPU)")
    parser.add_argument("--batch", type=int, default=0, help="batch size (default: 32 on CUDA, 1 on CPU)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    recipe, overrides = ("bn_bd_vits", []) if cuda else ("tiny", REDUCED_CPU)
    batch = args.batch or (32 if cuda else 1)
    steps = args.steps or (5 if cuda else 1)
    if not cuda:
        torch.set_num_threads(1)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"[gpu_check] {name}: {recipe} recipe, batch {batch}, {steps} measured step(s) per row", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        data = prepare(Path(tmp), recipe, n=max(40, batch + 16))
        bench = Bench(data, recipe, overrides, batch, device)
        flops = flops_per_step(bench)
        peak = device_peak_tflops(device)
        rows = []
        for mode in ("fp16", "bf16"):
            ours, bare = timed(bench, mode, steps, ours=True), timed(bench, mode, steps, ours=False)
            achieved = flops / ours["seconds"] / 1e12
            rows.append((mode, ours, bare, achieved))
            print(f"[gpu_check] {mode}: ours {ours['seconds']:.3f} s/step, bare {bare['seconds']:.3f}", file=sys.stderr)

    print(f"\n### gpu_check: {name} ({device.type}), torch {torch.__version__}, {time.strftime('%Y-%m-%d')}\n")
    print(f"{recipe} recipe{' (reduced: ' + ', '.join(overrides) + ')' if overrides else ''}, "
          f"batch {len(bench.batch)} ({bench.batch.audio_seconds(bench.cfg.audio.sample_rate):.1f} s of audio), "
          f"{flops / 1e12:.3f} TFLOP per step (fp32 count), median of {steps} step(s) after one warm-up.\n")
    print("| device | precision | ours s/step | bare Coqui s/step | ours / bare | skipped steps (ours) | "
          "peak memory | TFLOP/s | MFU |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode, ours, bare, achieved in rows:
        memory = f"{ours['peak_bytes'] / 2**30:.2f} GiB" + ("" if cuda else " (RSS)")
        mfu = f"{achieved / peak:.1%}" if peak else "n/a"
        print(f"| {device.type} | {mode} | {ours['seconds']:.3f} | {bare['seconds']:.3f} | "
              f"{ours['seconds'] / bare['seconds']:.2f} | {ours['skipped']} | {memory} | {achieved:.3g} | {mfu} |")


if __name__ == "__main__":
    main()
