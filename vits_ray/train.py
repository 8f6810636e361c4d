"""Training: the Ray Train worker loop and the driver that builds the `TorchTrainer`.

The worker composes the pieces that know nothing of each other: the Coqui model (`model`), the
GAN step (`step`), the shard reader (`data.reader`), the stability guard (`stability`), the run's
records (`runlog`) and checkpoints (`checkpoint`). Ray Train starts the workers, sets up the
process group, persists checkpoints under STORAGE/NAME and hands the latest one back on relaunch.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vits_ray.config import Config, config_from_dict

LOSS_KEYS = ("loss_0", "loss_1", "loss_disc", "loss_gen", "loss_kl", "loss_feat", "loss_mel", "loss_duration")
EPOCH_KEYS = LOSS_KEYS + ("grad_norm_0", "grad_norm_1", "step_time", "loader_time")


class TrainSetupError(ValueError):
    """Something is wrong before any worker starts: config, data, storage or warm-start input."""


@dataclass(frozen=True)
class Drill:
    """An operator's rehearsal of the stability guard: `nan@STEP` or `spike@STEP`."""

    kind: str
    step: int

    @staticmethod
    def parse(text: str) -> "Drill":
        kind, _, at = text.partition("@")
        if kind not in ("nan", "spike") or not at.isdigit() or int(at) < 1:
            raise TrainSetupError(f"--drill {text!r}: expected nan@STEP or spike@STEP with STEP >= 1")
        return Drill(kind, int(at))


# A spike drill multiplies both learning rates by this for SPIKE_DRILL_STEPS steps.
SPIKE_DRILL_FACTOR = 300.0
SPIKE_DRILL_STEPS = 3


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs, as plain data (it crosses process boundaries)."""

    config: dict[str, Any]
    data_uri: str
    storage_uri: str
    name: str
    workers: int = 1
    use_gpu: bool = False
    max_steps: int = 0
    init_from: str = ""
    drills: tuple[Drill, ...] = ()
    cpus_per_worker: int = 1
    fail_on_divergence_test: bool = field(default=False, repr=False)

    def resolved_config(self) -> Config:
        return config_from_dict(self.config)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["drills"] = [asdict(d) for d in self.drills]
        return out

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "TrainJob":
        data = dict(data)
        data["drills"] = tuple(Drill(**d) for d in data.get("drills", ()))
        return TrainJob(**data)


# --- the worker ---------------------------------------------------------------------------

def _init_checkpoint_location(uri: str, storage_cfg):
    """(store of the folder, checkpoint file name) for a Coqui checkpoint folder or .pth file."""
    from vits_ray.storage import open_store

    if uri.endswith(".pth"):
        folder, name = uri.rsplit("/", 1) if "/" in uri else (".", uri)
    else:
        folder, name = uri, "model.pth"
    return open_store(folder, storage_cfg), name


def _fetch_init_checkpoint(uri: str, storage_cfg) -> tuple[Path, Path | None]:
    """A local copy of a Coqui checkpoint (model.pth, or the named .pth) and its config.json."""
    store, name = _init_checkpoint_location(uri, storage_cfg)
    local = Path(tempfile.mkdtemp(prefix="vits-ray-init-"))
    store.download_file(name, local / "model.pth")
    config_path = None
    if store.exists("config.json"):
        store.download_file("config.json", local / "config.json")
        config_path = local / "config.json"
    return local / "model.pth", config_path


class _EpochMeans:
    def __init__(self):
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, record: dict[str, Any]) -> None:
        if any(not math.isfinite(record[k]) for k in LOSS_KEYS):
            return  # skipped steps do not move the epoch means
        self.count += 1
        for key in EPOCH_KEYS:
            self.sums[key] = self.sums.get(key, 0.0) + float(record[key])

    def record(self, epoch: int, step: int) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": "epoch", "epoch": epoch, "step": step, "steps": self.count}
        for key, total in self.sums.items():
            out[f"avg_{key}"] = total / max(self.count, 1)
        return out


def train_worker(job_dict: dict[str, Any]) -> None:
    """Ray Train's per-worker function."""
    import numpy as np
    import ray.train
    import ray.train.torch
    import torch

    from vits_ray import checkpoint as ckpt_io
    from vits_ray import distributed as dist_utils
    from vits_ray.data.reader import ShardReader
    from vits_ray.data.shards import read_manifest
    from vits_ray.model import build_model, export_coqui, warm_start
    from vits_ray.runlog import NullLogger, RunLogger
    from vits_ray.schedule import learning_rates
    from vits_ray.stability import StabilityGuard
    from vits_ray.step import Precision, eval_step, gan_step
    from vits_ray.storage import open_store
    from vits_ray.text import Vocabulary

    job = TrainJob.from_dict(job_dict)
    cfg = job.resolved_config()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if job.use_gpu else torch.device("cpu")
    if not job.use_gpu:
        torch.set_num_threads(max(1, job.cpus_per_worker))
    precision = Precision.resolve(cfg.train.mixed_precision, device.type)

    data_store = open_store(job.data_uri, cfg.storage)
    manifest = read_manifest(data_store)
    vocab = Vocabulary.from_dict(manifest["vocab"])
    model = build_model(cfg, vocab).to(device)
    optimizers = model.get_optimizer()
    criteria = model.get_criterion()
    scaler = torch.amp.GradScaler("cuda") if precision.use_scaler else None
    run_store = open_store(job.storage_uri, cfg.storage).child(job.name)

    progress = ckpt_io.Progress()
    resumed = ray.train.get_checkpoint()
    warm_report = None
    if resumed is not None:
        with resumed.as_directory() as directory:
            progress = ckpt_io.restore(ckpt_io.read(Path(directory)), model, optimizers, scaler)
    else:
        if job.init_from:
            model_path, config_path = _fetch_init_checkpoint(job.init_from, cfg.storage)
            warm_report = warm_start(model, model_path, config_path)
            if cfg.train.keep_step:  # continue the global step and the per-epoch decay
                progress.step, progress.epoch = warm_report.global_step, warm_report.epoch
                progress.first_epoch = progress.epoch
        # Same seed on every rank: identical initial weights without a broadcast; the data differs.
        torch.manual_seed(cfg.train.seed)
        np.random.seed(cfg.train.seed % 2**32)

    guard = StabilityGuard(cfg.stability, cfg.train.save_step)
    if progress.guard:
        guard.load_state_dict(progress.guard)
    logger = RunLogger(run_store, progress.step if resumed is not None else None) if rank == 0 else NullLogger()
    if rank == 0:
        run_store.write_bytes("config.toml", cfg.to_toml().encode("utf-8"))
        run_store.write_bytes("vocab.json", json.dumps(manifest["vocab"], ensure_ascii=False, sort_keys=True).encode())
        if warm_report is not None:
            _say(warm_report.format_text())
            logger.event({"step": progress.step, "kind": "warm_start", "detail": {
                "loaded": len(warm_report.loaded), "partially_loaded": warm_report.partially_loaded,
                "skipped": [f"{n}: {why}" for n, why in warm_report.skipped]}})
        _say(f"[vits-ray] {job.name}: {'resuming at step ' + str(progress.step) if resumed else 'starting'}"
              f" on {world} worker(s), {device.type}, precision {precision.dtype or 'fp32'}")

    pad_id = int(model.tokenizer.characters.pad_id)
    reader = ShardReader(data_store, manifest, "train", rank, world, seed=cfg.train.seed,
                         batch_size=cfg.train.batch_size, max_batch_seconds=cfg.train.max_batch_seconds,
                         pad_id=pad_id, cache_dir=cfg.data.cache_dir, prefetch=cfg.data.prefetch_shards)
    has_val = any(s["split"] == "val" for s in manifest["shards"])
    val_reader = None
    if rank == 0 and has_val:
        val_reader = ShardReader(data_store, manifest, "val", 0, 1, seed=cfg.train.seed,
                                 batch_size=cfg.train.batch_size, max_batch_seconds=cfg.train.max_batch_seconds,
                                 pad_id=pad_id, cache_dir=cfg.data.cache_dir, prefetch=0)
    grad_sync = dist_utils.average_gradients if dist_utils.is_distributed() and not job.fail_on_divergence_test else None
    max_steps = job.max_steps or cfg.train.max_steps
    drills = {d.step: d.kind for d in job.drills}
    spike_drill_until = -1

    def to_device(batch):
        return model.format_batch_on_device(model.format_batch(batch.to_coqui(device)))

    def save_checkpoint(metrics: dict[str, Any]) -> dict[str, Any]:
        """Persist the state through Ray Train (all ranks call; rank 0 uploads); returns the state."""
        checksums = dist_utils.gather(dist_utils.parameter_checksum(model))
        progress.guard = guard.state_dict()
        state = ckpt_io.capture(model, optimizers, scaler, progress)
        record = {"kind": "checkpoint", "step": progress.step, "epoch": progress.epoch,
                  "path": f"checkpoint_{progress.step:08d}", "param_checksums": checksums,
                  "best": progress.best_step == progress.step}
        logger.log(record)
        dist_utils.check_checksums(checksums, progress.step)
        with tempfile.TemporaryDirectory(prefix="vits-ray-ckpt-") as tmp:
            checkpoint = None
            if rank == 0:
                ckpt_io.write(Path(tmp), state, cfg.to_toml(), manifest["vocab"])
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
                logger.flush()
            ray.train.report({**metrics, "step": progress.step}, checkpoint=checkpoint,
                             checkpoint_dir_name=record["path"])
        return state

    def validate() -> dict[str, Any] | None:
        if val_reader is None:
            return None
        sums: dict[str, float] = {}
        count = 0
        with torch.random.fork_rng(devices=[]):  # validation must not shift training's randomness
            for batch in val_reader.iter_epoch(0):
                for key, value in eval_step(model, criteria, to_device(batch), precision).items():
                    sums[key] = sums.get(key, 0.0) + value
                count += 1
                if count >= cfg.train.val_batches:
                    break
        return {"kind": "val", "step": progress.step, "epoch": progress.epoch,
                **{k: v / count for k, v in sums.items()}}

    last_good = ckpt_io.capture(model, optimizers, scaler, progress)
    last_saved_step = progress.step if resumed is not None else -1
    means = _EpochMeans()
    finished = max_steps and progress.step >= max_steps
    while not finished and progress.epoch < progress.first_epoch + cfg.train.epochs:
        restart_epoch = False
        for batch in reader.iter_epoch(progress.epoch, progress.batch_in_epoch):
            compute_started = time.perf_counter()
            loader_time = reader.loader_time
            step = progress.step + 1
            drill = drills.pop(step, None)  # a drill fires once, not again after a rollback
            if drill == "nan":
                batch.waveform[0].fill_(float("nan"))
            if drill == "spike":
                spike_drill_until = step + SPIKE_DRILL_STEPS
            lr_0, lr_1 = learning_rates(cfg.optim, step - 1, progress.epoch, guard.lr_multiplier(step))
            if step < spike_drill_until:
                lr_0, lr_1 = lr_0 * SPIKE_DRILL_FACTOR, lr_1 * SPIKE_DRILL_FACTOR
            for optimizer, lr in zip(optimizers, (lr_0, lr_1)):
                for group in optimizer.param_groups:
                    group["lr"] = lr
            result = gan_step(model, criteria, optimizers, scaler, to_device(batch), precision,
                              (cfg.optim.grad_clip_disc, cfg.optim.grad_clip_gen), grad_sync)
            # Data wait plus compute; checkpoint and validation time is not a step's cost.
            step_time = loader_time + time.perf_counter() - compute_started
            progress.step = step
            progress.batch_in_epoch += 1
            losses = result.losses
            if dist_utils.is_distributed():  # log the mean over ranks, as one gradient was
                values = torch.tensor([losses[k] for k in LOSS_KEYS], dtype=torch.float64)
                torch.distributed.all_reduce(values)
                losses = dict(zip(LOSS_KEYS, (values / world).tolist()))
            record = {"kind": "step", "step": step, "epoch": progress.epoch, "time": time.time(), **losses,
                      "grad_norm_0": result.grad_norm_0, "grad_norm_1": result.grad_norm_1,
                      "lr_0": lr_0, "lr_1": lr_1, "amp_scale": result.amp_scale,
                      "step_time": step_time, "loader_time": loader_time,
                      "skipped_0": int(result.skipped_0), "skipped_1": int(result.skipped_1),
                      "batch_size": len(batch), "audio_seconds": batch.num_samples / cfg.audio.sample_rate}
            means.add(record)

            decision = guard.observe(step, record) if rank == 0 else None
            action = dist_utils.broadcast(
                (decision.action, [e.to_dict() for e in decision.events], guard.should_save(step)) if rank == 0 else None)
            rollback, events, save_now = action[0] == "rollback", action[1], action[2]
            for event in events:
                logger.event(event)
            if step % cfg.train.log_step == 0:
                logger.log(record)
                if rank == 0:
                    _say(_progress_line(record))
            if rollback:
                progress = ckpt_io.restore(last_good, model, optimizers, scaler)
                spike_drill_until = -1  # the drill was part of the abandoned timeline
                multiplier = guard.after_rollback(step, progress.step)  # raises past the budget
                logger.mark_rolled_back(progress.step)
                if rank == 0:
                    _say(f"[vits-ray] step {step}: instability ({', '.join(e['kind'] for e in events)}); "
                          f"rolled back to step {progress.step}, learning rates x{multiplier:g}")
                means = _EpochMeans()
                restart_epoch = True
                break

            if step % cfg.train.val_step == 0:
                val = validate() if rank == 0 else None
                if val is not None:
                    logger.log(val)
                    if val["val_loss_mel"] < progress.best_val_loss_mel:
                        progress.best_val_loss_mel, progress.best_step = val["val_loss_mel"], step
                        with tempfile.TemporaryDirectory() as tmp:
                            export_coqui(model, cfg, vocab, Path(tmp), step)
                            run_store.upload_dir(tmp, "best")
                progress.best_step, progress.best_val_loss_mel = dist_utils.broadcast(
                    (progress.best_step, progress.best_val_loss_mel))

            finished = bool(max_steps) and step >= max_steps
            if save_now or finished:
                last_good = save_checkpoint({"loss_1": losses["loss_1"], "loss_0": losses["loss_0"]})
                last_saved_step = step
            if finished:
                break
        if restart_epoch:
            continue
        if not finished:
            epoch_record = means.record(progress.epoch, progress.step)
            logger.log(epoch_record)
            # Ray gets the epoch means (a report is a barrier on all ranks: once an epoch, not a step).
            ray.train.report({k: v for k, v in epoch_record.items() if k != "kind"})
            means = _EpochMeans()
            progress.epoch += 1
            progress.batch_in_epoch = 0
    if last_saved_step != progress.step:
        save_checkpoint({})
    if rank == 0:
        _export_final(run_store, model, cfg, vocab, progress)
    logger.close()


def _export_final(run_store, model, cfg, vocab, progress) -> None:
    """STORAGE/NAME/export/: the best model by validation mel loss, else the final weights."""
    from vits_ray.model import export_coqui

    with tempfile.TemporaryDirectory() as tmp:
        if run_store.exists("best/model.pth"):
            run_store.download_dir("best", tmp)
            source = f"best model (step {progress.best_step}, val mel loss {progress.best_val_loss_mel:.3f})"
        else:
            export_coqui(model, cfg, vocab, Path(tmp), progress.step)
            source = f"final weights (step {progress.step}; no validation has run)"
        run_store.upload_dir(tmp, "export")
    _say(f"[vits-ray] exported {source} to {run_store.url('export')}")


def _say(message: str) -> None:
    """One console line from a worker. Not `print`: Ray Train patches it to log each line twice."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def _progress_line(r: dict[str, Any]) -> str:
    share = 100 * r["loader_time"] / r["step_time"] if r["step_time"] > 0 else 0.0
    skipped = " SKIPPED" if r["skipped_0"] or r["skipped_1"] else ""
    return (f"step {r['step']:>6} epoch {r['epoch']:>3} | D {r['loss_0']:.3f} G {r['loss_1']:.3f} "
            f"(mel {r['loss_mel']:.2f} kl {r['loss_kl']:.2f}) | grad {r['grad_norm_0']:.1f}/{r['grad_norm_1']:.1f} "
            f"| lr {r['lr_1']:.2e} | {r['step_time']:.2f} s/step, loading {share:.1f}%{skipped}")


# --- the driver ---------------------------------------------------------------------------

def preflight(job: TrainJob) -> dict[str, Any]:
    """Fail before any worker starts: config, data and storage are checked here."""
    from vits_ray.data.shards import read_manifest
    from vits_ray.storage import StorageError, open_store

    try:
        cfg = job.resolved_config()
    except ValueError as err:
        raise TrainSetupError(f"bad configuration: {err}") from err
    if job.workers < 1:
        raise TrainSetupError(f"--workers must be >= 1, got {job.workers}")
    if not job.name or "/" in job.name:
        raise TrainSetupError(f"--name {job.name!r}: must be a non-empty name without '/'")
    try:
        manifest = read_manifest(open_store(job.data_uri, cfg.storage))
    except (StorageError, ValueError, OSError) as err:
        raise TrainSetupError(f"cannot read the data at {job.data_uri}: {err}") from err
    if manifest.get("sample_rate") != cfg.audio.sample_rate:
        raise TrainSetupError(f"{job.data_uri}: prepared at {manifest.get('sample_rate')} Hz but "
                              f"audio.sample_rate is {cfg.audio.sample_rate}")
    train_shards = [s for s in manifest["shards"] if s["split"] == "train"]
    if len(train_shards) < job.workers:
        raise TrainSetupError(f"{job.data_uri} has {len(train_shards)} train shard(s) for {job.workers} workers: "
                              "run `vits-ray prepare` with a smaller data.rows_per_shard")
    try:
        open_store(job.storage_uri, cfg.storage).check()
    except StorageError as err:
        raise TrainSetupError(f"storage {job.storage_uri} is not usable: {err}") from err
    if job.init_from:
        try:  # existence only: the driver need not download a large checkpoint
            store, name = _init_checkpoint_location(job.init_from, cfg.storage)
            found = store.exists(name)
        except (StorageError, OSError, ValueError) as err:
            raise TrainSetupError(f"--init-from {job.init_from}: {err}") from err
        if not found:
            raise TrainSetupError(f"--init-from {job.init_from}: {store.url(name)} not found "
                                  "(give a Coqui checkpoint folder with model.pth + config.json, or a .pth file)")
    return manifest


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS, or start a local one bound to loopback."""
    import ray

    if ray.is_initialized():
        return
    # A new local cluster gets token authentication from Ray 2.60 itself (it writes the token);
    # joining a cluster needs RAY_AUTH_TOKEN or the token file of that cluster.
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=True, configure_logging=False)


@dataclass(frozen=True)
class TrainOutcome:
    run_uri: str
    step: int
    export_uri: str


def run_training(job: TrainJob) -> TrainOutcome:
    """Check everything, then train on Ray; returns where the run and its export live."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from vits_ray.storage import open_store

    preflight(job)
    cfg = job.resolved_config()
    ensure_ray()
    storage = open_store(job.storage_uri, cfg.storage)
    filesystem, base = storage.arrow_filesystem()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=job.to_dict(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.workers, use_gpu=job.use_gpu,
            resources_per_worker=None if job.use_gpu else {"CPU": job.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=job.name, storage_path=base, storage_filesystem=filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_last),
            failure_config=ray.train.FailureConfig(max_failures=0),
            # Our own progress line says what matters each step; Ray's per-report INFO lines drown it.
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
    )
    result = trainer.fit()
    step = int((result.metrics or {}).get("step", 0))
    run = storage.child(job.name)
    return TrainOutcome(run_uri=run.uri, step=step, export_uri=run.url("export"))
