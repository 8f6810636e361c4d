"""Speaking speed and what quality measurement costs: PyTorch against ONNX Runtime, tiny and reference.

    .venv/bin/python bench/bench_inference.py [--models tiny,reference] [--threads 1,2] [--repeats 3]

For each recipe (tiny; the 83M reference bn_bd_vits, randomly initialised: nothing is downloaded)
the model goes through the real path: exported in Coqui's format, loaded back as a `TorchVoice`
(generator only, weight norm folded), exported to ONNX with the parity check. Then:

- **RTF**: seconds of synthesis per second of audio over six Bangla sentences (2 to 30 words),
  noise scales at 0 so both runtimes make the same audio, after one untimed warm-up; the median
  of `--repeats` passes, per thread count. *ONNX / torch* is the ratio of the two in this run.
- **First call**: the warm-up itself (allocations, ORT's graph optimisation).
- **Export**: seconds to export and check parity; file sizes.
- **Metric cost**: `analyse` seconds per second of audio (WORLD Harvest + CheapTrick), and one
  training-time quality measurement (4 utterances: synthesis + analysis; references cached as the
  probe caches them) as a share of the interval between measurements at the reference cadence,
  taking the reference run's own step time (0.7 s/step on its GPU, from its logs) and
  eval.every_steps = 500. That share is an estimate from two measured times and one quoted one.

An untrained model's durations are not a trained one's: RTF is per second of audio made, which
is what a user pays, but the audio lengths differ from a trained voice's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vits_ray.config import load_config  # noqa: E402
from vits_ray.evaluate.metrics import analyse  # noqa: E402
from vits_ray.model import build_model, export_coqui  # noqa: E402
from vits_ray.onnx_export import export_onnx  # noqa: E402
from vits_ray.text import Vocabulary  # noqa: E402
from vits_ray.voice import DETERMINISTIC, OnnxVoice, Scales, load_export  # noqa: E402

SENTENCES = (
    "শুভ সকাল!",
    "আমি ভালো আছি, ধন্যবাদ।",
    "আমার ১২৩ টাকা লাগবে, কাল সকাল ১০টায় দেখা হবে।",
    "বাংলাদেশের মানুষ নদীর দেশে বাস করে, আর বর্ষাকালে এখানকার গ্রামগুলো সবুজে ভরে ওঠে।",
    "ঢাকা থেকে চট্টগ্রাম যেতে ট্রেনে প্রায় ছয় ঘণ্টা লাগে, তবে বাসে গেলে যানজটের কারণে আরও বেশি সময় লাগতে পারে।",
    "শিক্ষার্থীরা সকালে বিদ্যালয়ে যায়, দুপুরে বাড়ি ফিরে খাওয়া দাওয়া করে, বিকেলে মাঠে খেলে আর সন্ধ্যায় পড়তে বসে; "
    "এভাবেই তাদের দিন কাটে।",
)
RECIPES = {"tiny": "tiny", "reference": "bn_bd_vits"}
REFERENCE_STEP_SECONDS = 0.7  # the reference run's median step time on its GPU (reference-run-analysis.md)
REFERENCE_EVAL_EVERY = 500


def rtf(voice, token_lists, repeats: int, scales: Scales = DETERMINISTIC) -> tuple[float, float]:
    """(first-call seconds, median RTF over `repeats` passes of all sentences)."""
    started = time.perf_counter()
    voice.synthesize(token_lists[0], scales)
    first = time.perf_counter() - started
    passes = []
    for _ in range(repeats):
        synth, audio = 0.0, 0.0
        for tokens in token_lists:
            started = time.perf_counter()
            out = voice.synthesize(tokens, scales)
            synth += time.perf_counter() - started
            audio += len(out) / voice.sample_rate
        passes.append(synth / audio)
    return first, statistics.median(passes)


def bench_model(name: str, threads: list[int], repeats: int) -> None:
    cfg = load_config(RECIPES[name])
    vocab = Vocabulary.full_bangla()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(cfg, vocab)
        export_coqui(model, cfg, vocab, Path(tmp) / "export", step=0)
        del model
        pth_mb = (Path(tmp) / "export" / "model.pth").stat().st_size / 1e6
        voice = load_export(Path(tmp) / "export", f"{name} (random init)", threads=max(threads))
        params = sum(p.numel() for p in voice.model.parameters())
        started = time.perf_counter()
        result = export_onnx(voice, str(Path(tmp) / "model.onnx"))
        export_s = time.perf_counter() - started
        worst = max(c.max_abs for c in result.parity.cases)
        print(f"\n## {name}: generator {params / 1e6:.1f}M parameters; model.pth (with discriminator) {pth_mb:.0f} MB, "
              f"model.onnx {result.size_bytes / 1e6:.0f} MB")
        print(f"export + parity: {export_s:.1f} s; parity {'passed' if result.parity.passed else 'FAILED'}, "
              f"worst max-abs {worst:.1e}")
        tokens = [voice.prepare(s).token_ids for s in SENTENCES]
        print("| threads | torch RTF | ONNX RTF | ONNX / torch | torch first call s | ONNX first call s |")
        print("|---|---|---|---|---|---|")
        for n in threads:
            torch.set_num_threads(n)
            onnx_voice = OnnxVoice.from_file(Path(tmp) / "model.onnx", threads=n)
            t_first, t_rtf = rtf(voice, tokens, repeats)
            o_first, o_rtf = rtf(onnx_voice, tokens, repeats)
            print(f"| {n} | {t_rtf:.4f} | {o_rtf:.4f} | {o_rtf / t_rtf:.2f} | {t_first:.2f} | {o_first:.2f} |")
        bench_quality_cost(voice, tokens[:4])


def bench_quality_cost(voice, tokens: list[list[int]]) -> None:
    """One training-time measurement: speak 4 utterances, analyse each (references cached)."""
    audio = [voice.synthesize(t, Scales()) for t in tokens]
    seconds = sum(len(a) for a in audio) / voice.sample_rate
    started = time.perf_counter()
    for a in audio:
        analyse(a, voice.sample_rate)
    analyse_s = time.perf_counter() - started
    started = time.perf_counter()
    for t in tokens:
        a = voice.synthesize(t, Scales())
        analyse(a, voice.sample_rate)
    measure_s = time.perf_counter() - started
    interval = REFERENCE_EVAL_EVERY * REFERENCE_STEP_SECONDS
    print(f"analyse: {analyse_s / seconds:.3f} s per s of audio; one quality measurement (4 utterances, "
          f"{seconds:.1f} s of audio): {measure_s:.1f} s on this CPU = {100 * measure_s / interval:.2f}% of "
          f"{REFERENCE_EVAL_EVERY} reference steps at {REFERENCE_STEP_SECONDS} s/step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,reference")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    print(f"# bench_inference: {len(SENTENCES)} sentences, noise scales 0, median of {args.repeats} passes; "
          f"torch {torch.__version__}, numpy {np.__version__}")
    for name in args.models.split(","):
        bench_model(name, threads, args.repeats)


if __name__ == "__main__":
    main()
