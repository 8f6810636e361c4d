"""Coqui's own `Trainer` with the model our config describes, on the CPU, fp32.

Two entry points:

- `run_coqui_trainer`: Coqui's Trainer on an LJSpeech-layout corpus with Coqui's own data loader.
  The report's test parses the log it writes (trainer_0_log.txt); the run folder also gets
  `coqui_baseline.json` (wall time of `fit()`, steps, seconds of audio trained on).
- `run_coqui_on_batches`: Coqui's Trainer fed batches we made (e.g. our reader's plan, as
  `VitsBatch.to_coqui("cpu")` dicts), one epoch, in the given order. The benchmark uses it to
  compare our loop with Coqui's like for like: the same utterances in the same batches. The model
  subclass records the start of every step (Coqui's `on_train_step_start` callback), so the
  benchmark gets wall time per step including everything Coqui's loop does around a step.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from vits_ray.config import Config

if TYPE_CHECKING:
    from TTS.tts.configs.vits_config import VitsConfig

    from vits_ray.text import Vocabulary

BASELINE_FILE = "coqui_baseline.json"


def _corpus_vocab(ljspeech_dir: Path, config: Config) -> "Vocabulary":
    from vits_ray.text import Vocabulary

    texts = []
    for line in (ljspeech_dir / "metadata.csv").read_text(encoding="utf-8").splitlines():
        cols = line.split("|")
        if len(cols) >= 3:
            texts.append(cols[2].strip())
    return Vocabulary.build(texts, add_blank=config.text.add_blank)


def _wav_seconds(path: str) -> float:
    import soundfile

    info = soundfile.info(path)
    return info.frames / info.samplerate


def _load_audio_soundfile(file_path: str):
    """Coqui's `vits.load_audio` contract ([1, T] float32 in [-1, 1], sample rate), via soundfile.

    Coqui reads wavs with `torchaudio.load`, which in torchaudio 2.9+ goes through torchcodec and
    needs FFmpeg's shared libraries; soundfile reads PCM wavs to the same samples without them.
    """
    import soundfile
    import torch

    data, sr = soundfile.read(file_path, dtype="float32", always_2d=True)
    return torch.from_numpy(data.T.copy()), sr


def _trainer_config(config: Config, vocab: "Vocabulary", out_dir: Path, epochs: int, print_step: int) -> "VitsConfig":
    """Coqui's config for our model, trimmed to training: no test synthesis, no periodic saves."""
    from vits_ray.model import coqui_config

    vits_config = coqui_config(config, vocab)
    vits_config.output_path = str(out_dir)
    vits_config.run_name = "coqui_baseline"
    vits_config.batch_size = config.train.batch_size
    vits_config.epochs = epochs
    vits_config.num_loader_workers = 0
    vits_config.num_eval_loader_workers = 0
    vits_config.mixed_precision = False
    vits_config.test_delay_epochs = 10**6  # no test-sentence synthesis
    vits_config.print_step = print_step
    vits_config.print_eval = False
    vits_config.plot_step = 10**6
    vits_config.save_step = 10**6
    vits_config.save_checkpoints = False
    vits_config.save_best_after = 10**9
    vits_config.seed = config.train.seed
    return vits_config


def _fit(trainer, out_dir: Path) -> float:
    """`trainer.fit()`; returns its wall time. Leaves Coqui's logger as it found it."""
    started = time.perf_counter()
    try:
        trainer.fit()
    finally:
        # Coqui adds a file handler per Trainer to its module logger; later runs must not write here.
        trainer_logger = logging.getLogger("trainer")
        for handler in list(trainer_logger.handlers):
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).is_relative_to(out_dir.resolve()):
                handler.close()
                trainer_logger.removeHandler(handler)
    return time.perf_counter() - started


def run_coqui_trainer(ljspeech_dir: Path, out_dir: Path, config: Config, vocab: Optional["Vocabulary"] = None,
                      max_steps: int = 8, epochs: int = 2, eval_samples: int = 2) -> Path:
    """Train Coqui's `Vits` with Coqui's `Trainer` for `epochs` epochs; returns the run folder.

    Coqui's trainer has no step limit, so `max_steps` is met by training on the first
    ceil(max_steps / epochs) * batch_size utterances each epoch (the rest, after `eval_samples`
    held out for evaluation, is not used). `vocab` defaults to the characters of the corpus.
    """
    import torch
    from trainer import Trainer, TrainerArgs
    from TTS.tts.configs.shared_configs import BaseDatasetConfig
    from TTS.tts.datasets import load_tts_samples
    from TTS.tts.models.vits import Vits

    ljspeech_dir, out_dir = Path(ljspeech_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = vocab if vocab is not None else _corpus_vocab(ljspeech_dir, config)
    batch_size = config.train.batch_size
    vits_config = _trainer_config(config, vocab, out_dir, epochs, print_step=1)
    vits_config.datasets = [BaseDatasetConfig(formatter="ljspeech", path=str(ljspeech_dir),
                                              meta_file_train="metadata.csv")]
    vits_config.eval_batch_size = max(1, min(batch_size, eval_samples))
    vits_config.run_eval = eval_samples > 0
    vits_config.min_audio_len = 1
    vits_config.max_audio_len = 10**9
    vits_config.min_text_len = 1
    vits_config.max_text_len = 10**6

    samples, _ = load_tts_samples(vits_config, eval_split=False)
    samples = sorted(samples, key=lambda s: s["audio_file"])
    eval_items, train_items = samples[:eval_samples], samples[eval_samples:]
    per_epoch = math.ceil(max_steps / epochs) * batch_size
    train_items = train_items[:per_epoch]
    if not train_items:
        raise ValueError(f"{ljspeech_dir}: not enough utterances ({len(samples)}) for {eval_samples} eval samples "
                         "and a training batch")

    import TTS.tts.models.vits as coqui_vits

    coqui_vits.load_audio = _load_audio_soundfile
    torch.manual_seed(config.train.seed)
    model = Vits(vits_config)
    trainer = Trainer(TrainerArgs(), vits_config, str(out_dir), model=model, train_samples=train_items,
                      eval_samples=eval_items or None)
    wall = _fit(trainer, out_dir)
    run_dir = Path(trainer.output_path)
    audio = sum(_wav_seconds(s["audio_file"]) for s in train_items)
    stats = {"wall_seconds": wall, "epochs": epochs, "train_utterances": len(train_items),
             "eval_utterances": len(eval_items), "batch_size": batch_size,
             "steps": trainer.total_steps_done, "audio_seconds_per_epoch": audio,
             "audio_seconds_trained": audio * epochs,
             "audio_seconds_per_wall_second": audio * epochs / wall if wall > 0 else None,
             "note": "wall_seconds covers fit(): training, evaluation and logging, after model construction"}
    (run_dir / BASELINE_FILE).write_text(json.dumps(stats, indent=1), encoding="utf-8")
    return run_dir


def _vits_on_batches():
    """Coqui's `Vits`, fed a fixed list of batch dicts and timing each step's start."""
    from TTS.tts.models.vits import Vits

    class VitsOnBatches(Vits):
        def __init__(self, config, batches: list[dict]):
            super().__init__(config)
            self.fixed_batches = batches
            self.step_starts: list[float] = []
            self.step_ends: list[float] = []

        def get_data_loader(self, config, *, is_eval=False, samples=None, verbose=True):
            if is_eval:
                raise RuntimeError("run_coqui_on_batches runs no evaluation")
            return list(self.fixed_batches)  # Coqui's train_epoch takes len() and iterates once

        def on_train_step_start(self, trainer) -> None:
            self.step_starts.append(time.perf_counter())

        def on_train_step_end(self, trainer) -> None:
            self.step_ends.append(time.perf_counter())

    return VitsOnBatches


def run_coqui_on_batches(batches: list[dict], out_dir: Path, config: Config, vocab: "Vocabulary",
                         print_step: int = 10) -> dict[str, Any]:
    """Coqui's `Trainer.fit()` for one epoch over `batches` (Coqui batch dicts, in this order).

    No evaluation, test synthesis or checkpoints: training steps and Coqui's per-step logging only
    (every `print_step` steps). Returns wall times: `build` (model and Trainer construction), `fit`,
    `step_starts` and `step_ends` (perf_counter when Coqui's `on_train_step_start` and
    `on_train_step_end` callbacks run, before formatting the batch and after logging the step),
    `fit_start`, `fit_end`, and `save_checkpoint` (one
    `Trainer.save_checkpoint()` after fit, timed apart: not part of the run, for comparison with
    our final checkpoint).
    """
    import torch
    from trainer import Trainer, TrainerArgs

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vits_config = _trainer_config(config, vocab, out_dir, epochs=1, print_step=print_step)
    vits_config.run_eval = False
    started = time.perf_counter()
    torch.manual_seed(config.train.seed)
    model = _vits_on_batches()(vits_config, batches)
    trainer = Trainer(TrainerArgs(), vits_config, str(out_dir), model=model)
    build = time.perf_counter() - started
    fit_start = time.perf_counter()
    fit = _fit(trainer, out_dir)
    fit_end = time.perf_counter()
    if trainer.total_steps_done != len(batches):
        raise RuntimeError(f"Coqui's Trainer ran {trainer.total_steps_done} steps over {len(batches)} batches")
    started = time.perf_counter()
    trainer.save_checkpoint()
    save = time.perf_counter() - started
    return {"build": build, "fit": fit, "step_starts": list(model.step_starts), "step_ends": list(model.step_ends),
            "fit_start": fit_start, "fit_end": fit_end,
            "save_checkpoint": save, "run_dir": trainer.output_path}
