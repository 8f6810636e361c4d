"""Training on Ray: the job description, the per-worker function and the driver.

The loop itself is `trainer.Trainer`; here it meets Ray Train, which starts the workers, sets up
the process group, persists checkpoints under STORAGE/NAME and hands the latest one back on
relaunch (`RaySession`).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from vits_ray.config import Config, config_from_dict
from vits_ray.errors import NonRetryable
from vits_ray.init_checkpoint import init_checkpoint_location
from vits_ray.run_checkpoints import RunCheckpoints
from vits_ray.trainer import say


class TrainSetupError(NonRetryable, ValueError):
    """Something is wrong before any worker starts: config, data, storage or warm-start input."""


DRILL_KINDS = ("nan", "spike", "blowup", "diverge", "overflow")
PREFLIGHT_RETRY_SECONDS = 10.0


@dataclass(frozen=True)
class Drill:
    """An operator's rehearsal of the stability guard: a NaN batch (`nan@STEP`), a learning-rate
    spike (`spike@STEP`), weights blown up by step STEP's update so that the next forward pass
    (validation, or the next step) raises (`blowup@STEP`), or a learning rate that stays far too
    high from STEP on, backoff or not (`diverge@STEP`: every timeline diverges, the budget must
    end the run), or, in fp16, gradients that overflow on rank 0 at step STEP (`overflow@STEP`: the
    GradScaler's job; give several to drive a scale collapse)."""

    kind: str
    step: int

    @staticmethod
    def parse(text: str) -> "Drill":
        kind, _, at = text.partition("@")
        if kind not in DRILL_KINDS or not at.isdigit() or int(at) < 1:
            raise TrainSetupError(f"--drill {text!r}: expected nan@STEP, spike@STEP, blowup@STEP, diverge@STEP "
                                  "or overflow@STEP with STEP >= 1")
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
    quiet: bool = False  # no per-step console lines (a sweep's trials); records are written as ever
    # Start from another run's checkpoint state (`continuation.ContinuationPoint.as_dict()`).
    from_run: dict[str, Any] | None = None
    # A sweep trial: the first instability the guard confirms ends the run as diverged (scored, not
    # rescued); the stability margin is probed at these global steps; at the end the last
    # validation is repeated under other seeds to measure the score's own noise.
    stop_on_instability: bool = False
    margin_probes: tuple[int, ...] = ()
    measure_score_noise: bool = False

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
        data["margin_probes"] = tuple(data.get("margin_probes", ()))
        return TrainJob(**data)


# --- the worker ---------------------------------------------------------------------------

class _StorageSession:
    """Checkpoints under STORAGE/NAME through `RunCheckpoints`: resume from the newest that verifies
    and that the rollback rules allow (`skipped` then says what was passed over), hand a rollback
    the run's checkpoints, keep the last `keep_last` and any the loop asks to keep."""

    def __init__(self, run_store, keep_last: int):
        self.checkpoints = RunCheckpoints(run_store, keep_last)
        self.skipped: list[str] = []

    @contextmanager
    def latest_checkpoint(self, why_unusable=lambda info: None) -> Iterator[Path | None]:
        with self.checkpoints.newest_valid(why_unusable) as found:
            self.skipped = found.skipped
            yield found.directory

    def list_checkpoints(self):
        return self.checkpoints.infos()

    def checkpoint(self, name: str):
        return self.checkpoints.verified(name)

    def supersede(self, names) -> None:
        self.checkpoints.supersede(names)


class RaySession(_StorageSession):
    """Ray Train registers each checkpoint (a report is a barrier on all ranks); the upload itself
    goes through our store, whose retries ride out a storage outage (Ray's own upload has none)."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, name: str | None = None,
               keep: tuple[str, ...] = ()) -> None:
        import ray.train

        if checkpoint_dir is None:
            ray.train.report(metrics)
            return
        # Only rank 0 hands a checkpoint over (Trainer.save), so only rank 0 uploads and prunes.
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint_dir)),
                         checkpoint_dir_name=name, checkpoint_upload_fn=self._upload)
        self.checkpoints.prune(keep)

    def _upload(self, checkpoint, name: str):
        import ray.train

        self.checkpoints.upload(Path(checkpoint.path), name)
        # Ray Train's own filesystem and path, so that it sees the checkpoint as one of the run's.
        storage = ray.train.get_context().get_storage()
        return ray.train.Checkpoint(path=f"{storage.experiment_fs_path}/{name}", filesystem=storage.storage_filesystem)


class LocalSession(_StorageSession):
    """A run without Ray: the same `checkpoint_XXXXXXXX/` folders, so either mode resumes the other's."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, name: str | None = None,
               keep: tuple[str, ...] = ()) -> None:
        if checkpoint_dir is None:
            return
        self.checkpoints.upload(checkpoint_dir, name)
        self.checkpoints.prune(keep)


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
    with closing_after(trainer):
        trainer.run()
        if not trainer.diverged:
            _export_final(trainer)
    return TrainOutcome(run_uri=run_store.uri, step=trainer.progress.step, export_uri=run_store.url("export"))


def train_worker(job_dict: dict[str, Any]) -> None:
    """Ray Train's per-worker function: build, run, close."""
    import ray.train
    import ray.train.torch
    import torch

    from vits_ray.storage import open_store
    from vits_ray.trainer import Trainer

    job = TrainJob.from_dict(job_dict)
    context = ray.train.get_context()
    device = ray.train.torch.get_device() if job.use_gpu else torch.device("cpu")
    if not job.use_gpu:
        torch.set_num_threads(max(1, job.cpus_per_worker))
    cfg = job.resolved_config()
    run_store = open_store(job.storage_uri, cfg.storage).child(job.name)
    trainer = Trainer(job, context.get_world_rank(), context.get_world_size(), device,
                      RaySession(run_store, cfg.train.keep_last))
    with closing_after(trainer):
        trainer.run()
        if trainer.rank == 0 and not trainer.diverged:
            _export_final(trainer)


@contextmanager
def closing_after(trainer) -> Iterator[None]:
    """Close the trainer however the run ends: a failed run still leaves its records (what led up
    to the failure). If closing fails too, the run's own error is the one raised."""
    try:
        yield
    except BaseException:
        try:
            trainer.close()
        except Exception as err:  # e.g. records that cannot be written during the outage that failed the run
            say(f"[vits-ray] closing after the failure also failed: {type(err).__name__}: {err}")
        raise
    trainer.close()


def _export_final(trainer) -> None:
    """STORAGE/NAME/export/: the best model by validation mel loss, else the final weights."""
    run_store, progress = trainer.run_store, trainer.progress
    with tempfile.TemporaryDirectory() as tmp:
        if run_store.exists("best/model.pth"):
            run_store.download_dir("best", tmp)
            chosen_by = (f"MCD {progress.best_mcd_dtw_db:.2f} dB" if trainer.quality_probe is not None
                         else f"val mel loss {progress.best_val_loss_mel:.3f}")
            source = f"best model (step {progress.best_step}, {chosen_by})"
        else:
            trainer.export(Path(tmp))
            source = f"final weights (step {progress.step}; no validation has run)"
        run_store.upload_dir(tmp, "export")
    say(f"[vits-ray] exported {source} to {run_store.url('export')}")


# --- the driver ---------------------------------------------------------------------------

def _uses_grad_scaler(cfg: Config, use_gpu: bool) -> bool:
    from vits_ray.step import Precision

    return Precision.resolve(cfg.train.mixed_precision, "cuda" if use_gpu else "cpu").use_scaler


def preflight(job: TrainJob) -> dict[str, Any]:
    """Fail before any worker starts: config, data and storage are checked here."""
    from vits_ray.data.shards import read_manifest, sample_rate_mismatch
    from vits_ray.storage import StorageError, open_store

    try:
        cfg = job.resolved_config()
    except ValueError as err:
        raise TrainSetupError(f"bad configuration: {err}") from err
    if job.workers < 1:
        raise TrainSetupError(f"--workers must be >= 1, got {job.workers}")
    overflows = [d for d in job.drills if d.kind == "overflow"]
    if overflows and not _uses_grad_scaler(cfg, job.use_gpu):
        raise TrainSetupError(f"--drill overflow@{overflows[0].step} rehearses the fp16 GradScaler: set "
                              f"train.mixed_precision=fp16 (it is {cfg.train.mixed_precision!r})")
    if not job.name or "/" in job.name:
        raise TrainSetupError(f"--name {job.name!r}: must be a non-empty name without '/'")
    # A job submitted against a dead endpoint should say so in seconds, not after the training
    # loop's retry window (minutes: right for a run in progress, not for a typo at submission).
    quick = dataclasses.replace(cfg.storage, retry_seconds=min(cfg.storage.retry_seconds, PREFLIGHT_RETRY_SECONDS))
    try:
        manifest = read_manifest(open_store(job.data_uri, quick))
    except (StorageError, ValueError, OSError) as err:
        raise TrainSetupError(f"cannot read the data at {job.data_uri}: {err}") from err
    if cfg.eval.every_steps and not any(s["split"] == "val" for s in manifest["shards"]):
        raise TrainSetupError(f"{job.data_uri} has no val split for eval.every_steps to measure quality on; "
                              "prepare it with data.val_fraction > 0, or set eval.every_steps=0")
    mismatch = sample_rate_mismatch(manifest, cfg.audio.sample_rate, job.data_uri)
    if mismatch:
        raise TrainSetupError(mismatch)
    _check_batches_per_epoch(job, cfg, manifest, quick)
    try:
        open_store(job.storage_uri, quick).check()
    except StorageError as err:
        raise TrainSetupError(f"storage {job.storage_uri} is not usable: {err}") from err
    if job.init_from:
        try:  # existence only: the driver need not download a large checkpoint
            store, name = init_checkpoint_location(job.init_from, quick)
            found = store.exists(name)
        except (StorageError, OSError, ValueError) as err:
            raise TrainSetupError(f"--init-from {job.init_from}: {err}") from err
        if not found:
            raise TrainSetupError(f"--init-from {job.init_from}: {store.url(name)} not found "
                                  "(give a Coqui checkpoint folder with model.pth + config.json, or a .pth file)")
    return manifest


def _check_batches_per_epoch(job: TrainJob, cfg: Config, manifest: dict[str, Any], quick) -> None:
    """Every worker needs at least one batch of its own per epoch (a cheap column read)."""
    from vits_ray.data.reader import ShardReader
    from vits_ray.storage import open_store

    reader = ShardReader(open_store(job.data_uri, quick), manifest, "train", 0, job.workers,
                         seed=cfg.train.seed, batch_size=cfg.train.batch_size,
                         max_batch_seconds=cfg.train.max_batch_seconds, pad_id=0)
    try:
        reader.batches_per_epoch(0)
    except ValueError as err:
        raise TrainSetupError(f"{job.data_uri}: {err}") from err
    finally:
        reader.close()


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS, or start a local one bound to loopback.

    The local one has its dashboard (on 127.0.0.1): Ray's State API lives there, and without it
    Ray Train's PlacementGroupCleaner cannot see that a controller died, so a placement group of
    a trial that Tune stopped early is never removed and its CPUs stay reserved for good.
    """
    import ray

    if ray.is_initialized():
        return
    # A new local cluster gets token authentication from Ray 2.60 itself (it writes the token);
    # joining a cluster needs RAY_AUTH_TOKEN or the token file of that cluster.
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1", log_to_driver=True, configure_logging=False)


@dataclass(frozen=True)
class TrainOutcome:
    run_uri: str
    step: int
    export_uri: str


def build_trainer(job: TrainJob, callbacks: tuple = ()):
    """Ray Train's TorchTrainer for `job` (what Ray pickles and ships to its controller and workers:
    no credentials in it, the S3 filesystem resolves them on each node)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from vits_ray.recovery import StopOnNonRetryable, failure_config
    from vits_ray.storage import open_store

    cfg = job.resolved_config()
    filesystem, base = open_store(job.storage_uri, cfg.storage).ray_filesystem()
    return TorchTrainer(
        train_worker,
        train_loop_config=job.to_dict(),
        # NCCL for the tensors on the GPUs, gloo beside it for the pickled objects of checkpoints.
        torch_config=TorchConfig(backend="cpu:gloo,cuda:nccl" if job.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.workers, use_gpu=job.use_gpu,
            resources_per_worker=None if job.use_gpu else {"CPU": job.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=job.name, storage_path=base, storage_filesystem=filesystem,
            # The sessions prune (only verified checkpoints count towards train.keep_last).
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
            failure_config=failure_config(cfg.train.max_failures),
            callbacks=[StopOnNonRetryable(), *callbacks],
            # Our own progress line says what matters each step; Ray's per-report INFO lines drown it.
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
    )


def run_training(job: TrainJob, local: bool = False) -> TrainOutcome:
    """Check everything, then train (on Ray, or in this process with `local`); returns where the
    run and its export live. A worker error restarts the workers from the latest checkpoint up to
    `train.max_failures` times; one a restart cannot fix ends the run with `RunAbortedError`."""
    from vits_ray.recovery import fit
    from vits_ray.storage import open_store

    preflight(job)
    if local:
        return run_local(job)
    ensure_ray()
    result = fit(build_trainer(job))
    step = int((result.metrics or {}).get("step", 0))
    run = open_store(job.storage_uri, job.resolved_config().storage).child(job.name)
    return TrainOutcome(run_uri=run.uri, step=step, export_uri=run.url("export"))
