"""Throughput of `prepare`: seconds of audio per second of wall time, on the demo corpus.

    .venv/bin/python bench/bench_prepare.py [--n 40] [--repeats 3] [--copies 1]

`--copies K` repeats the corpus K times under new ids (hard links, no new audio) to measure a
corpus large enough for the process pool (prepare uses one above ~8 MB of input audio).

Targets: a local folder, and a moto S3 server on 127.0.0.1 (real boto3). The first run of each
target includes the process pool's start-up; the best of `--repeats` runs is reported too.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from vits_ray.config import Config  # noqa: E402
from vits_ray.data.ingest import prepare_corpus  # noqa: E402
from local_s3 import start_moto  # noqa: E402
from vits_ray.demo.corpus import write_demo_corpus  # noqa: E402


def replicate(corpus: Path, copies: int, out: Path) -> Path:
    (out / "wavs").mkdir(parents=True)
    lines = []
    for line in (corpus / "metadata.csv").read_text(encoding="utf-8").splitlines():
        uid, rest = line.split("|", 1)
        for k in range(copies):
            os.link(corpus / "wavs" / f"{uid}.wav", out / "wavs" / f"{uid}_c{k}.wav")
            lines.append(f"{uid}_c{k}|{rest}")
    (out / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def measure(corpus: Path, uri: str, config: Config, repeats: int) -> list[tuple[float, float]]:
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        summary = prepare_corpus(corpus, "ljspeech", uri, config, progress=False)
        runs.append((summary.accepted_seconds, time.perf_counter() - start))
    if summary.rejected:
        print(f"  note: {summary.rejected} utterance(s) rejected: {summary.rejected_by_reason}")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40, help="demo corpus size (utterances)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--copies", type=int, default=1, help="repeat the corpus this many times")
    args = parser.parse_args()
    config = Config()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "demo"
        write_demo_corpus(corpus, n=args.n, seed=0)
        if args.copies > 1:
            corpus = replicate(corpus, args.copies, Path(tmp) / "replicated")
        start_moto()
        print(f"prepare on the demo corpus (n={args.n} x {args.copies}), {len(os.sched_getaffinity(0))} CPU core(s)")
        for name, uri in (("local folder", str(Path(tmp) / "out")), ("moto S3 on 127.0.0.1", "s3://bench/demo")):
            runs = measure(corpus, uri, config, args.repeats)
            audio = runs[0][0]
            walls = [wall for _, wall in runs]
            print(f"  {name:<22} {audio:7.1f} s of audio; first run {walls[0]:.2f} s "
                  f"({audio / walls[0]:.1f} s/s), best {min(walls):.2f} s ({audio / min(walls):.1f} s/s)")


if __name__ == "__main__":
    main()
