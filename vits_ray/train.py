"""Training on Ray: the job description, the per-worker function and the driver.

The loop itself is `trainer.Trainer`; here it meets Ray Train, which starts the workers, sets up
the process group, persists checkpoints under STORAGE/NAME and hands the latest one back on
relaunch (`RaySession`).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from vits_ray.checkpoint import STATE_FILE
from vits_ray.config import Config, config_from_dict
from vits_ray.init_checkpoint import init_checkpoint_location
from vits_ray.trainer import say


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

class RaySession:
    """Ray Train persists checkpoints under STORAGE/NAME and hands the latest back on relaunch."""

    @contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield Path(directory)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, name: str | None = None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


class LocalSession:
    """Checkpoints for a run without Ray: the same `checkpoint_XXXXXXXX/` folders under STORAGE/NAME,
    the last `keep_last` kept. A local run resumes from the newest folder that has its state file,
    whichever mode wrote it."""

    def __init__(self, run_store, keep_last: int):
        self.run_store, self.keep_last = run_store, keep_last

    def _checkpoints(self) -> list[str]:
        # state.pt is uploaded last, so a folder without it is an interrupted upload, not a checkpoint.
        return sorted({key.split("/")[0] for key in self.run_store.list()
                       if key.startswith("checkpoint_") and key.endswith("/" + STATE_FILE)})

    @contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        found = self._checkpoints()
        if not found:
            yield None
            return
        with tempfile.TemporaryDirectory(prefix="vits-ray-resume-") as tmp:
            self.run_store.download_dir(found[-1], tmp)
            yield Path(tmp)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, name: str | None = None) -> None:
        if checkpoint_dir is None:
            return
        files = sorted(p.name for p in checkpoint_dir.iterdir() if p.name != STATE_FILE) + [STATE_FILE]
        for file in files:
            self.run_store.upload_file(checkpoint_dir / file, f"{name}/{file}")
        for old in self._checkpoints()[: -self.keep_last]:
            self.run_store.delete_prefix(old)


def run_local(job: TrainJob) -> TrainOutcome:
    """One worker in this process, no Ray: what a laptop or a single GPU needs, without Ray Train's
    start-up (about 10 s of controller and actors before the first step)."""
    import torch

    from vits_ray.storage import open_store
    from vits_ray.trainer import Trainer

    if job.workers != 1:
        raise TrainSetupError(f"--local runs one worker in this process; got --workers {job.workers}")
    cfg = job.resolved_config()
    device = torch.device("cuda", 0) if job.use_gpu else torch.device("cpu")
    if job.use_gpu and not torch.cuda.is_available():
        raise TrainSetupError("--gpu: no CUDA device is visible to this process")
    if not job.use_gpu:  # as a Ray worker would: the same threads give the same arithmetic
        torch.set_num_threads(max(1, job.cpus_per_worker))
    run_store = open_store(job.storage_uri, cfg.storage).child(job.name)
    trainer = Trainer(job, 0, 1, device, LocalSession(run_store, cfg.train.keep_last))
    try:
        trainer.run()
        _export_final(trainer)
    finally:
        trainer.close()
    return TrainOutcome(run_uri=run_store.uri, step=trainer.progress.step, export_uri=run_store.url("export"))


def train_worker(job_dict: dict[str, Any]) -> None:
    """Ray Train's per-worker function: build, run, close."""
    import ray.train
    import ray.train.torch
    import torch

    from vits_ray.trainer import Trainer

    job = TrainJob.from_dict(job_dict)
    context = ray.train.get_context()
    device = ray.train.torch.get_device() if job.use_gpu else torch.device("cpu")
    if not job.use_gpu:
        torch.set_num_threads(max(1, job.cpus_per_worker))
    trainer = Trainer(job, context.get_world_rank(), context.get_world_size(), device, RaySession())
    try:
        trainer.run()
        if trainer.rank == 0:
            _export_final(trainer)
    finally:
        trainer.close()  # a failed run still leaves its records (what led up to the failure)


def _export_final(trainer) -> None:
    """STORAGE/NAME/export/: the best model by validation mel loss, else the final weights."""
    from vits_ray.model import export_coqui

    run_store, progress = trainer.run_store, trainer.progress
    with tempfile.TemporaryDirectory() as tmp:
        if run_store.exists("best/model.pth"):
            run_store.download_dir("best", tmp)
            source = f"best model (step {progress.best_step}, val mel loss {progress.best_val_loss_mel:.3f})"
        else:
            export_coqui(trainer.model, trainer.cfg, trainer.vocab, Path(tmp), progress.step)
            source = f"final weights (step {progress.step}; no validation has run)"
        run_store.upload_dir(tmp, "export")
    say(f"[vits-ray] exported {source} to {run_store.url('export')}")


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
    _check_batches_per_epoch(job, cfg, manifest)
    try:
        open_store(job.storage_uri, cfg.storage).check()
    except StorageError as err:
        raise TrainSetupError(f"storage {job.storage_uri} is not usable: {err}") from err
    if job.init_from:
        try:  # existence only: the driver need not download a large checkpoint
            store, name = init_checkpoint_location(job.init_from, cfg.storage)
            found = store.exists(name)
        except (StorageError, OSError, ValueError) as err:
            raise TrainSetupError(f"--init-from {job.init_from}: {err}") from err
        if not found:
            raise TrainSetupError(f"--init-from {job.init_from}: {store.url(name)} not found "
                                  "(give a Coqui checkpoint folder with model.pth + config.json, or a .pth file)")
    return manifest


def _check_batches_per_epoch(job: TrainJob, cfg: Config, manifest: dict[str, Any]) -> None:
    """Every worker needs at least one batch of its own per epoch (a cheap column read)."""
    from vits_ray.data.reader import ShardReader
    from vits_ray.storage import open_store

    try:
        reader = ShardReader(open_store(job.data_uri, cfg.storage), manifest, "train", 0, job.workers,
                             seed=cfg.train.seed, batch_size=cfg.train.batch_size,
                             max_batch_seconds=cfg.train.max_batch_seconds, pad_id=0)
        reader.batches_per_epoch(0)
    except ValueError as err:
        raise TrainSetupError(f"{job.data_uri}: {err}") from err


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


def run_training(job: TrainJob, local: bool = False) -> TrainOutcome:
    """Check everything, then train (on Ray, or in this process with `local`); returns where the
    run and its export live."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from vits_ray.storage import open_store

    preflight(job)
    if local:
        return run_local(job)
    cfg = job.resolved_config()
    ensure_ray()
    storage = open_store(job.storage_uri, cfg.storage)
    filesystem, base = storage.arrow_filesystem()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=job.to_dict(),
        # NCCL for the tensors on the GPUs, gloo beside it for the pickled objects of checkpoints.
        torch_config=TorchConfig(backend="cpu:gloo,cuda:nccl" if job.use_gpu else "gloo"),
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
