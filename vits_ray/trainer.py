"""The training loop of one worker, as a small object: state plus `train_step`, `validate`, `save`,
`restore` and `rollback`.

It composes pieces that know nothing of each other: the Coqui model (`model`), the GAN step
(`step`), the shard reader (`data.reader`), gradient sync and collectives (`distributed`), the
stability guard (`stability`), the run's records (`runlog`) and checkpoints (`checkpoint`). What
persists checkpoints and hands the latest one back is a `Session` (Ray Train's, in `train.py`), so
the loop itself knows nothing of Ray.

Every rank runs the same guard on the same all-reduced numbers, so every rank reaches the same
decision (continue, roll back, save) without a broadcast; the guard's state is compared across
ranks at each checkpoint along with the parameter checksums.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import sys
import tempfile
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch

from vits_ray import checkpoint as ckpt_io
from vits_ray.blowup import judge_blowup, module_norms
from vits_ray.config import Config, ConfigError, load_config, resume_conflicts
from vits_ray.distributed import Collectives, GradientSync, check_checksums, state_checksum
from vits_ray.errors import NonRetryable
from vits_ray.rollbacks import START, CheckpointInfo, merge_health
from vits_ray.run_checkpoints import checkpoint_name
from vits_ray.schedule import learning_rates
from vits_ray.step import VAL_KEYS, Precision, eval_step, gan_step
from vits_ray.step_log import PendingSteps

LOSS_KEYS = ("loss_0", "loss_1", "loss_disc", "loss_gen", "loss_kl", "loss_feat", "loss_mel", "loss_duration")
EPOCH_KEYS = LOSS_KEYS + ("grad_norm_0", "grad_norm_1", "step_time", "loader_time")
EPOCH_SUMS = ("utterances", "wrapped_utterances", "audio_seconds")

# A spike drill multiplies both learning rates by this for SPIKE_DRILL_STEPS steps.
SPIKE_DRILL_FACTOR = 300.0
SPIKE_DRILL_STEPS = 3
# `loss_mel_recent` in reports: the median of this many last finite steps.
RECENT_STEPS = 20
# The overflow drill multiplies the gradient flowing back from the decoder's waveform by this on
# rank 0: far past fp16's range (65504) at any loss scale, as a real overflow, and only there.
OVERFLOW_DRILL_GAIN = 2.0 ** 40
# The blow-up drill multiplies a duration predictor weight by this: finite, but its activations
# overflow and Coqui's spline raises instead of returning a loss.
BLOWUP_DRILL_FACTOR = 1e30
# Validation draws its segments and noise from a fixed seed (train.seed + this + rank, another
# VALIDATION_VARIANT_STRIDE per noise-measuring repeat): every validation of every trial sees the
# same utterances, segments and noise, so two validations differ only by the weights.
VALIDATION_SEED_OFFSET = 1_000_003
VALIDATION_VARIANT_STRIDE = 7919
# A sweep trial stops at the first of these (scored as diverged); a spike alone is a penalty.
DIVERGING_EVENTS = ("rollback", "blowup", "amp_collapse", "nonfinite")
# The run's rollbacks (rollbacks.RollbackLedger), beside its checkpoints and never inside one.
LEDGER_FILE = "rollbacks.json"


class ResumeConfigError(NonRetryable, ValueError):
    """A relaunch changed settings that a resumed run may not change."""


class Session(Protocol):
    """Where checkpoints go and come back from (Ray Train in production)."""

    def latest_checkpoint(self, why_unusable) -> AbstractContextManager[Path | None]: ...

    # After `latest_checkpoint`: newer folders passed over (incomplete, corrupt, refused), "name: why".
    skipped: list[str]

    def list_checkpoints(self) -> list[CheckpointInfo]: ...

    def checkpoint(self, name: str) -> AbstractContextManager[Path]: ...

    def supersede(self, names) -> None: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None = None, name: str | None = None,
               keep: tuple[str, ...] = ()) -> None: ...


class EpochMeans:
    """The epoch record: means of the finite steps, and counts summed over ranks."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.totals = dict.fromkeys(EPOCH_SUMS, 0.0)
        self.count = 0

    def add(self, record: dict[str, Any]) -> None:
        for key in EPOCH_SUMS:
            self.totals[key] += record[key]
        if any(not math.isfinite(record[k]) for k in LOSS_KEYS):
            return  # skipped steps do not move the epoch means
        self.count += 1
        for key in EPOCH_KEYS:
            self.sums[key] = self.sums.get(key, 0.0) + float(record[key])

    @property
    def empty(self) -> bool:
        """No step (finite or not) of this epoch has been seen."""
        return self.count == 0 and not any(self.totals.values())

    def record(self, epoch: int, step: int) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": "epoch", "epoch": epoch, "step": step, "steps": self.count,
                               "utterances": int(self.totals["utterances"]),
                               "wrapped_utterances": int(self.totals["wrapped_utterances"]),
                               "audio_seconds": self.totals["audio_seconds"]}
        for key, total in self.sums.items():
            out[f"avg_{key}"] = total / max(self.count, 1)
        return out


def say(message: str) -> None:
    """One console line from a worker. Not `print`: Ray Train patches it to log each line twice."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def progress_line(r: dict[str, Any]) -> str:
    share = 100 * r["loader_time"] / r["step_time"] if r["step_time"] > 0 else 0.0
    skipped = " SKIPPED" if r["skipped_0"] or r["skipped_1"] else ""
    return (f"step {r['step']:>6} epoch {r['epoch']:>3} | D {r['loss_0']:.3f} G {r['loss_1']:.3f} "
            f"(mel {r['loss_mel']:.2f} kl {r['loss_kl']:.2f}) | grad {r['grad_norm_0']:.1f}/{r['grad_norm_1']:.1f} "
            f"| lr {r['lr_1']:.2e} | {r['step_time']:.2f} s/step, loading {share:.1f}%{skipped}")


def _loss_rise(reference: list[float], probed: list[float]) -> float:
    """How much higher the probed losses are than the reference ones, relatively (0.0: no steps)."""
    if not reference:
        return 0.0
    base, value = sum(reference), sum(probed)
    if not (math.isfinite(base) and math.isfinite(value)) or base <= 0:
        return float("nan")
    return value / base - 1.0


class Trainer:
    """One rank's training state and loop. Build it, `run()` it, `close()` it."""

    def __init__(self, job, rank: int, world_size: int, device: torch.device, session: Session):
        from vits_ray.data.shards import read_manifest, sample_rate_mismatch
        from vits_ray.model import build_model, build_optimizers
        from vits_ray.runlog import NullLogger, RunLogger
        from vits_ray.stability import StabilityGuard
        from vits_ray.storage import open_store
        from vits_ray.text import Vocabulary

        self.job, self.rank, self.world_size, self.device, self.session = job, rank, world_size, device, session
        self.cfg: Config = job.resolved_config()
        cfg = self.cfg
        self.precision = Precision.resolve(cfg.train.mixed_precision, device.type)
        self.data_store = open_store(job.data_uri, cfg.storage)
        self.manifest = read_manifest(self.data_store)
        # preflight checks the run's recipe; a sweep trial's own settings are checked only here
        mismatch = sample_rate_mismatch(self.manifest, cfg.audio.sample_rate, job.data_uri)
        if mismatch:
            raise ConfigError(mismatch)
        self.vocab = Vocabulary.from_dict(self.manifest["vocab"])
        # Coqui prints its audio settings at every build: twenty lines per trial of a sweep.
        with contextlib.redirect_stdout(io.StringIO()) if job.quiet else contextlib.nullcontext():
            self.model = build_model(cfg, self.vocab).to(device)  # same seed on every rank: same weights
        self.optimizers = build_optimizers(self.model, cfg)
        self.criteria = self.model.get_criterion()
        self.scaler = self.precision.grad_scaler(cfg.train.amp_init_scale)
        self.comm = Collectives(device)
        self.grad_syncs = tuple(
            GradientSync([p for g in opt.param_groups for p in g["params"]], self.comm,
                         bucket_bytes=int(cfg.train.grad_bucket_mb * 2**20),
                         compress_bf16=cfg.train.grad_compression == "bf16") if world_size > 1 else None
            for opt in self.optimizers)
        self.run_store = open_store(job.storage_uri, cfg.storage).child(job.name)
        self.guard = StabilityGuard(cfg.stability, cfg.train.save_step)
        self._load_ledger()
        self.progress = ckpt_io.Progress()
        self.warm_report = None
        self.last_record: dict[str, Any] = {}
        self.resumed_from: CheckpointInfo | None = None
        self.continued_from = None  # (ContinuationPoint) a new run started from another run's state

        resumed = self._restore_latest()
        if not resumed:
            self._start_fresh()
        self.logger = RunLogger(self.run_store, self.progress.step if resumed else None) if rank == 0 else NullLogger()
        if rank == 0:
            self._announce(resumed)
            self._report_skipped_checkpoints()
        self.reader, self.val_reader = self._build_readers()
        self.quality_probe = self._build_quality_probe()
        self.max_steps = job.max_steps or cfg.train.max_steps
        self.drills = {d.step: d.kind for d in job.drills if d.kind != "diverge"}
        self.diverge_from = min((d.step for d in job.drills if d.kind == "diverge"), default=None)
        self.spike_drill_until = -1
        self.lr_scale = 1.0  # the margin probe's multiplier while it runs
        self.pending = PendingSteps()
        self.means = EpochMeans()
        self.recent_mel: collections.deque[float] = collections.deque(maxlen=RECENT_STEPS)
        self.last_val_loss_mel = float("nan")
        self.last_validated_step = -1
        self.last_saved_step = self.progress.step if resumed else -1
        # What a rollback may go back to without a download: the newest trusted checkpoint, and
        # (until a checkpoint is known clean) the run's start, which no folder holds.
        self.last_good = self.capture()
        self.last_good_info = self.resumed_from or CheckpointInfo(START, self.progress.step,
                                                                  self.guard.ledger.generation, "start")
        self.start_state = None if resumed else self.last_good
        # The newest checkpoint that no trouble found later can reach back past: pruning keeps it.
        self.settled = self.resumed_from.name if self.resumed_from else None
        # Each module's parameter norm at the last trusted checkpoint: a blow-up is judged by size too.
        self.reference_norms = module_norms(self.model)
        self.save_pending = False  # a scheduled save waiting for the guard's verdict
        self.postponed_from: int | None = None
        self.diverged = ""  # a sweep trial ended by instability: the cause
        self.val_noise = float("nan")
        self.margin_probes = set(job.margin_probes)
        if self.continued_from is not None and rank == 0:
            self._announce_continuation()

    # --- set-up -------------------------------------------------------------------------------

    def _announce(self, resumed: bool) -> None:
        """Rank 0: the run's own config and vocabulary (a fresh run only), warm start, a first line."""
        if not resumed:
            self.run_store.write_bytes("config.toml", self.cfg.to_toml().encode("utf-8"))
            self.run_store.write_bytes("vocab.json", json.dumps(self.manifest["vocab"], ensure_ascii=False,
                                                                sort_keys=True).encode())
        if self.warm_report is not None:
            say(self.warm_report.format_text())
            self.logger.event({"step": self.progress.step, "kind": "warm_start", "detail": {
                "loaded": len(self.warm_report.loaded), "partially_loaded": self.warm_report.partially_loaded,
                "skipped": [f"{n}: {why}" for n, why in self.warm_report.skipped]}})
        say(f"[vits-ray] {self.job.name}: {'resuming at step ' + str(self.progress.step) if resumed else 'starting'}"
            f" on {self.world_size} worker(s), {self.device.type}, precision {self.precision.dtype or 'fp32'}")

    def _report_skipped_checkpoints(self) -> None:
        """Newer checkpoints that did not verify were passed over (removed at the next save): say
        which, and why."""
        skipped = self.session.skipped
        if not skipped:
            return
        say(f"[vits-ray] skipped {len(skipped)} checkpoint folder(s) that did not verify; resuming from "
            f"{'step ' + str(self.progress.step) if self.progress.step else 'the start'}: " + "; ".join(skipped))
        self.logger.event({"step": self.progress.step, "kind": "checkpoint_skipped",
                           "detail": {"skipped": skipped, "resumed_step": self.progress.step}})

    def _build_readers(self):
        """This rank's train reader, and its share of the val split (None without one)."""
        from vits_ray.data.reader import ShardReader

        cfg = self.cfg
        common = dict(seed=cfg.train.seed, batch_size=cfg.train.batch_size,
                      max_batch_seconds=cfg.train.max_batch_seconds,
                      pad_id=int(self.model.tokenizer.characters.pad_id), cache_dir=cfg.data.cache_dir,
                      cache_max_bytes=cfg.data.cache_max_bytes, pin_memory=self.device.type == "cuda")
        train = ShardReader(self.data_store, self.manifest, "train", self.rank, self.world_size,
                            prefetch=cfg.data.prefetch_shards, **common)
        val = None
        if any(s["split"] == "val" for s in self.manifest["shards"]):
            # Validation has no per-batch collective, so a rank may have fewer (or no) val batches.
            val = ShardReader(self.data_store, self.manifest, "val", self.rank, self.world_size, prefetch=0,
                              allow_fewer_batches_than_ranks=True, **common)
        return train, val

    def _build_quality_probe(self):
        """Training-time quality (eval.every_steps), when on and there is a val split."""
        from vits_ray.evaluate.probe import QualityProbe

        cfg = self.cfg
        if not cfg.eval.every_steps or self.val_reader is None:
            return None
        return QualityProbe(self.data_store, self.manifest, self.vocab, cfg.eval.utterances, self.rank,
                            self.world_size, cfg.train.seed)

    def _restore_latest(self) -> bool:
        """Resume from the newest checkpoint that verifies and that the rollback ledger allows
        (not abandoned by a rollback, not written while training was unstable)."""
        with self.session.latest_checkpoint(self.guard.ledger.why_unusable) as directory:
            if directory is None:
                return False
            saved = load_config(directory / "config.toml")
            conflicts = resume_conflicts(saved, self.cfg)
            if conflicts:
                raise ResumeConfigError(
                    f"run {self.job.name} is resumed with settings that differ from its checkpoint's: "
                    + "; ".join(conflicts) + ". Relaunch with the saved settings, or start a new run "
                    "(another --name) with --init-from")
            self.restore(ckpt_io.read(directory))
            meta_path = directory / ckpt_io.META_FILE
            meta = ckpt_io.parse_meta(meta_path.read_bytes() if meta_path.exists() else None, str(directory))
            self.resumed_from = (CheckpointInfo.from_meta(directory.name, meta) if meta
                                 else CheckpointInfo(directory.name, self.progress.step))
        # The counts describe the whole run: what happened after this checkpoint stays counted.
        self.progress.health = merge_health(self.progress.health, self.guard.ledger.health)
        return True

    def _load_ledger(self) -> None:
        """The run's rollbacks so far (every rank reads it; only a rollback writes it)."""
        if self.run_store.exists(LEDGER_FILE):
            self.guard.ledger.load_state_dict(json.loads(self.run_store.read_bytes(LEDGER_FILE)))

    def _persist_ledger(self) -> None:
        self.guard.ledger.health = dict(self.progress.health)
        if self.rank == 0:  # the same ledger on every rank
            state = self.guard.ledger.state_dict()
            self.run_store.write_bytes(LEDGER_FILE, (json.dumps(state, indent=1, allow_nan=False) + "\n").encode())

    def _start_fresh(self) -> None:
        from vits_ray.model import warm_start

        if self.job.from_run:
            self._continue_from_run()
            return  # the run's own random state goes on: no reseeding
        if self.job.init_from:
            from vits_ray.init_checkpoint import fetch_init_checkpoint

            with fetch_init_checkpoint(self.job.init_from, self.cfg.storage) as (model_path, config_path):
                self.warm_report = warm_start(self.model, model_path, config_path)
            if self.cfg.train.keep_step:  # continue the global step and the per-epoch decay
                self.progress.step, self.progress.epoch = self.warm_report.global_step, self.warm_report.epoch
                self.progress.first_epoch = self.progress.epoch
        if self.scaler is not None:
            self.guard.amp.start_calibration()
        # The weights are identical on every rank; from here on each rank draws its own dropout
        # masks and training segments.
        ckpt_io.seed_everything(self.cfg.train.seed + self.rank)

    def _continue_from_run(self) -> None:
        """Start from another run's checkpoint state (`continuation`): everything training
        continues from, as a relaunch of that run would resume it. This run's own records begin
        here: no health counts, validations or best model carried over; the guard's history is."""
        from vits_ray.continuation import ContinuationPoint, downloaded

        point = ContinuationPoint(**self.job.from_run)
        with downloaded(point, self.cfg.storage) as directory:
            state = ckpt_io.read(directory)
        self.restore(state)
        if self.scaler is not None and not state.get("scaler"):
            self.guard.amp.start_calibration()  # fp16 continuing a run without a GradScaler
        fresh = ckpt_io.Progress()
        self.progress = dataclasses.replace(
            self.progress, first_epoch=self.progress.epoch, best_val_loss_mel=fresh.best_val_loss_mel,
            best_mcd_dtw_db=fresh.best_mcd_dtw_db, best_step=fresh.best_step, health={}, val_history=[], margin={})
        self.continued_from = point

    def _announce_continuation(self) -> None:
        """The state this run starts from, as a digest: every trial of a continuation sweep logs the same."""
        digest = ckpt_io.training_state_digest(self.last_good)
        point = self.continued_from
        self.logger.event({"step": self.progress.step, "kind": "continued", "detail": {
            "from": point.label, "checkpoint": point.checkpoint, "state_digest": digest}})
        say(f"[vits-ray] {self.job.name}: continuing {point.label} (state {digest}) with this run's settings")

    # --- state --------------------------------------------------------------------------------

    def capture(self) -> dict[str, Any]:
        """The whole training state (every rank's RNG included), on the CPU."""
        self.progress.guard = self.guard.state_dict()
        rngs = self.comm.all_gather_objects(ckpt_io.rng_state(self.device))
        return ckpt_io.capture(self.model, self.optimizers, self.scaler, self.progress, rngs)

    def restore(self, state: dict[str, Any]) -> None:
        self.progress = ckpt_io.restore(state, self.model, self.optimizers, self.scaler, self.rank,
                                        self.world_size, self.device)
        self.guard.load_state_dict(self.progress.guard)

    def save(self, metrics: dict[str, Any], verdict) -> None:
        """Check that all ranks agree, then persist the state through the session (rank 0 writes),
        marked with the guard's verdict (`stability.CheckpointVerdict`)."""
        state = self.capture()
        ledger = self.guard.ledger
        guard_digest = hashlib.sha256(json.dumps([self.guard.state_dict(), [e.to_dict() for e in ledger.entries]],
                                                 sort_keys=True).encode()).hexdigest()[:16]
        agreed = self.comm.all_gather_objects((state_checksum(state["model"]), guard_digest))
        checksums = [c for c, _ in agreed]
        name = checkpoint_name(self.progress.step)
        record = {"kind": "checkpoint", "step": self.progress.step, "epoch": self.progress.epoch,
                  "path": name, "param_checksums": checksums,
                  "best": self.progress.best_step == self.progress.step, "verdict": verdict.kind}
        self.logger.log(record)
        try:
            check_checksums(checksums, self.progress.step)
        except RuntimeError:
            self.logger.flush()  # the evidence (each rank's checksum) outlives the run
            raise
        if len({g for _, g in agreed}) > 1:
            raise RuntimeError(f"step {self.progress.step}: the stability guard's state differs across ranks "
                               f"({[g for _, g in agreed]}); their decisions can no longer be trusted to agree")
        info = CheckpointInfo(name, self.progress.step, ledger.generation, verdict.kind, verdict.reason)
        meta = {"step": info.step, "epoch": self.progress.epoch, "generation": info.generation,
                "verdict": info.verdict, "reason": info.reason, "postponed_from": self.postponed_from}
        self.logger.event({"step": info.step, "kind": "checkpoint_verdict", "detail": {
            "checkpoint": name, "verdict": info.verdict, "reason": info.reason, "generation": info.generation,
            "postponed_from": self.postponed_from}})
        with tempfile.TemporaryDirectory(prefix="vits-ray-ckpt-") as tmp:
            directory = None
            if self.rank == 0:
                directory = Path(tmp)
                ckpt_io.write(directory, state, self.cfg.to_toml(), self.manifest["vocab"], meta)
                self.logger.flush()
            self.session.report({**metrics, **self.health_metrics()}, directory, name,
                                keep=(self.settled,) if self.settled else ())
        self.last_saved_step = self.progress.step
        self.save_pending, self.postponed_from = False, None
        if info.trusted:  # a suspect save (the last of a run) is never a rollback target
            self.last_good, self.last_good_info = state, info
            self.reference_norms = module_norms(self.model)

    def _save_when_trusted(self, step: int) -> None:
        """A scheduled save, now if the guard trusts the weights, else at the first sync point
        where it does (or rolls back instead). The run's last save cannot wait: it is marked."""
        verdict = self.guard.checkpoint_verdict()
        if verdict.trusted or self.finished():
            self.save({k: self.last_record[k] for k in ("loss_0", "loss_1")}, verdict)
            return
        self.save_pending = True
        if self.postponed_from is None:
            self.postponed_from = step
            self.logger.event({"step": step, "kind": "checkpoint_postponed", "detail": {"reason": verdict.reason}})
            if self.rank == 0:
                say(f"[vits-ray] step {step}: checkpoint postponed until the stability guard decides ({verdict.reason})")

    def _note_settled(self) -> None:
        """Once a later step is judged within every band, the last checkpoint is out of reach of
        any trouble found from now on: pruning keeps it, and the start state is no longer needed."""
        info = self.last_good_info
        if info.name not in (START, self.settled) and self.guard.settled(info.step):
            self.settled = info.name
            self.start_state = None

    def rollback(self, step: int, decision) -> None:
        """Back to the newest trusted checkpoint from before the trouble began, with backed-off
        learning rates; the run's rollback ledger grows (and ends the run past its budget)."""
        health = dict(self.progress.health)  # what happened stays counted
        first = step if decision.first_anomalous is None else decision.first_anomalous
        reasons = next((e.detail.get("reasons", []) for e in decision.events if e.kind == "rollback"), [])
        lrs = (self.last_record.get("lr_0", math.nan), self.last_record.get("lr_1", math.nan))
        plan, state = self._rollback_target(step, first)
        self.restore(state)
        self.progress.health = health
        self.spike_drill_until = -1  # the drill was part of the abandoned timeline
        self.save_pending, self.postponed_from = False, None
        multiplier = self.guard.after_rollback(step, plan.target.step, first_anomalous=first, reasons=reasons, lrs=lrs)
        self._persist_ledger()
        abandoned = plan.poisoned + plan.passed_over
        for info, verdict, why in ([(c, "poisoned", f"at or after step {first}, where the trouble began")
                                    for c in plan.poisoned]
                                   + [(c, "passed_over", f"already rolled back to {self.guard.ledger.escalate_after} "
                                                         "times") for c in plan.passed_over]):
            self.logger.event({"step": step, "kind": "checkpoint_verdict", "detail": {
                "checkpoint": info.name, "checkpoint_step": info.step, "verdict": verdict, "reason": why}})
        self.session.supersede(c.name for c in abandoned if c.name != START)
        self.last_good, self.last_good_info = state, plan.target
        self.settled = None if plan.target.name == START else plan.target.name
        self.reference_norms = module_norms(self.model)
        self.logger.mark_rolled_back(self.progress.step)
        if self.rank == 0:
            passed = f", passing over {', '.join(c.label() for c in plan.passed_over)}" if plan.passed_over else ""
            say(f"[vits-ray] step {step}: instability ({', '.join(e.kind for e in decision.events)}) since step "
                f"{first}; rolled back to {plan.target.label()}{passed}, learning rates x{multiplier:g} "
                f"(rollback {self.guard.ledger.total} of at most {self.guard.ledger.max_rollbacks} per "
                f"{self.guard.ledger.window_steps} steps)")
        self.means = EpochMeans()

    def _rollback_target(self, step: int, first_anomalous: int):
        """The plan (`RollbackLedger.plan`) and the state it goes back to. Every rank plans from
        rank 0's listing of the run's checkpoints, so every rank goes to the same one."""
        listed = self.session.list_checkpoints() if self.rank == 0 else None
        candidates = {c.name: c for c in self.comm.all_gather_objects(listed)[0]}
        if self.start_state is not None:
            candidates[START] = CheckpointInfo(START, self.start_state["progress"]["step"], 0, "start")
        while True:
            plan = self.guard.ledger.plan(first_anomalous, candidates.values())
            self.guard.ledger.check_budget(step, plan)  # before anything changes
            try:
                return plan, self._load_state(plan.target)
            except ckpt_io.CorruptCheckpointError as err:
                say(f"[vits-ray] rank {self.rank}: {plan.target.label()} does not verify ({err}); trying an older one")
                del candidates[plan.target.name]

    def _load_state(self, info: CheckpointInfo) -> dict[str, Any]:
        if info.name == START:
            return self.start_state
        if (info.name, info.generation) == (self.last_good_info.name, self.last_good_info.generation):
            return self.last_good
        with self.session.checkpoint(info.name) as directory:
            return ckpt_io.read(directory)

    # --- one step -----------------------------------------------------------------------------

    def _on_device(self, batch) -> dict:
        # On CUDA the reader pins its batches, so this copy overlaps with queued work.
        return self.model.format_batch_on_device(
            self.model.format_batch(batch.to_coqui(self.device, non_blocking=self.device.type == "cuda")))

    def _set_learning_rates(self, step: int) -> tuple[float, float]:
        diverging = self.diverge_from is not None and step >= self.diverge_from
        # The diverge drill ignores the backoff: every timeline from its step on must diverge.
        multiplier = (1.0 if diverging else self.guard.lr_multiplier(step)) * self.lr_scale
        lr_0, lr_1 = learning_rates(self.cfg.optim, step - 1, self.progress.epoch, multiplier)
        if step < self.spike_drill_until or diverging:
            lr_0, lr_1 = lr_0 * SPIKE_DRILL_FACTOR, lr_1 * SPIKE_DRILL_FACTOR
        for optimizer, lr in zip(self.optimizers, (lr_0, lr_1)):
            for group in optimizer.param_groups:
                group["lr"] = lr
        return lr_0, lr_1

    def train_step(self, batch, loader_time: float) -> int:
        """One D-then-G step on this rank's batch; its numbers join the pending steps."""
        started = time.perf_counter()
        step = self.progress.step + 1
        drill = self.drills.pop(step, None)  # a drill fires once, not again after a rollback
        if drill == "nan" and self.rank == 0:  # one bad utterance on one rank, as in real data
            batch.waveform[0].fill_(float("nan"))
        if drill == "spike":
            self.spike_drill_until = step + SPIKE_DRILL_STEPS
        lr_0, lr_1 = self._set_learning_rates(step)
        inputs = self._on_device(batch)
        overflow = self._overflow_gradients() if drill == "overflow" and self.rank == 0 else None
        try:
            result = gan_step(self.model, self.criteria, self.optimizers, self.scaler, inputs,
                              self.precision, (self.cfg.optim.grad_clip_disc, self.cfg.optim.grad_clip_gen),
                              self.grad_syncs)
        finally:
            if overflow is not None:
                overflow.remove()
        if result.error is not None:  # skipped on every rank; a bug raises here, a blow-up goes on
            self._judge_failure(result.error, step, "training step", lambda: self._generator_forward(inputs))
        if drill == "blowup":
            self._blow_up_parameters()
        self.progress.step = step
        self.progress.batch_in_epoch += 1
        counts = {"batch_size": len(batch), "audio_seconds": batch.audio_seconds(self.cfg.audio.sample_rate),
                  "utterances": 0 if batch.wrapped else len(batch),
                  "wrapped_utterances": len(batch) if batch.wrapped else 0}
        # Data wait plus the host's time on the step (on a GPU, the time to queue it: the device
        # catches up at the next sync, and steady-state step times converge to the real ones).
        step_time = loader_time + time.perf_counter() - started
        self.pending.add(result.values, counts, {
            "step": step, "epoch": self.progress.epoch, "lr_0": lr_0, "lr_1": lr_1,
            "step_time": step_time, "loader_time": loader_time})
        return step

    def _judge_failure(self, error: Exception, step: int, where: str, forward) -> None:
        """Raise `error` unless a blow-up stands behind it (`blowup.judge_blowup`; then the guard
        rolls back)."""
        stability = self.cfg.stability
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            why = judge_blowup(self.model, forward, reference_norms=self.reference_norms,
                               norm_factor=stability.blowup_norm_factor,
                               recent_outliers=self.guard.recent_outliers(stability.blowup_lookback_steps),
                               ) if stability.enabled else None
        self.model.model_outputs_cache = None
        if why is None:
            raise error
        say(f"[vits-ray] rank {self.rank} step {step}: {where} raised {type(error).__name__} ({error}); "
            f"found {why}: handled as instability")

    def _generator_forward(self, inputs: dict) -> None:
        with self.precision.autocast():  # the same arithmetic as the step that raised
            self.model.train_step(inputs, self.criteria[0], 0)

    def _overflow_gradients(self):
        """The overflow drill: this step's generator gradients overflow fp16 on this rank (the
        losses stay finite), as gradients beyond the loss scale's headroom do. The handle removes it."""
        def amplify(_module, _inputs, waveform):
            if waveform.requires_grad:
                waveform.register_hook(lambda grad: grad * OVERFLOW_DRILL_GAIN)

        return self.model.waveform_decoder.register_forward_hook(amplify)

    def _blow_up_parameters(self) -> None:
        """The blow-up drill: the update just taken exploded (as an LR spike's can), so that
        Coqui's own forward raises on the next pass. Same weights on every rank, as a real one."""
        with torch.no_grad():
            next(self.model.duration_predictor.parameters()).mul_(BLOWUP_DRILL_FACTOR)

    # --- sync points --------------------------------------------------------------------------

    def _is_sync_point(self, step: int) -> bool:
        cfg = self.cfg
        # Every step that could be a save step under either cadence: a checkpoint is only written
        # after the guard has seen every step before it.
        return (step % cfg.train.log_step == 0 or step % cfg.train.save_step == 0
                or step % cfg.stability.unstable_save_step == 0 or step % cfg.train.val_step == 0
                or (bool(cfg.eval.every_steps) and step % cfg.eval.every_steps == 0)
                or (bool(self.max_steps) and step >= self.max_steps) or self.save_pending)

    def sync(self) -> bool:
        """Read the pending steps, record them, let the guard judge them. False after a rollback."""
        records = self.pending.reduce(self.comm)
        for record in records:
            self.logger.log(record)
        if records:
            self.last_record = records[-1]
            if self.rank == 0 and not self.job.quiet:
                say(progress_line(records[-1]))
        for record in records:
            self.means.add(record)
            if math.isfinite(record["loss_mel"]):
                self.recent_mel.append(record["loss_mel"])
            decision = self.guard.observe(record["step"], record)
            if self._instability(decision, records[-1]["step"]):
                return False
        self._note_settled()
        return True

    def _instability(self, decision, step: int) -> bool:
        """Record the guard's events; roll back if it says so. True after a rollback."""
        kinds = [event.kind for event in decision.events]
        health = self.progress.health
        for kind, count in (("spikes", int("spike" in kinds)), ("rollbacks", int(decision.rollback)),
                            ("nonfinite_steps", kinds.count("nonfinite")), ("blowups", kinds.count("blowup"))):
            health[kind] = health.get(kind, 0) + count
        for event in decision.events:
            self.logger.event(event.to_dict())
        if self.job.stop_on_instability and self._diverging(decision):
            self._stop_diverged(step, decision)
            return True
        if decision.rollback:
            self.rollback(step, decision)
        return decision.rollback

    @staticmethod
    def _diverging(decision) -> bool:
        """What a sweep trial stops at: a confirmed spike (the guard would roll back), a blow-up,
        collapsing AMP, or a non-finite step (seen at lr 0.9 on the tiny model: a loss of 1e32 and
        an infinite gradient, one step before everything is NaN). A normal run skips such a step;
        a trial that needed it skipped has found the edge."""
        return decision.rollback or any(e.kind in DIVERGING_EVENTS for e in decision.events)

    def _stop_diverged(self, step: int, decision) -> None:
        """A sweep trial ends here: instability is its result (scored), not something to rescue."""
        kinds = [e.kind for e in decision.events if e.kind not in ("cadence_unstable", "cadence_calm")]
        reasons = next((e.detail.get("reasons", []) for e in decision.events if e.kind == "rollback"), [])
        where = next((e.detail.get("where") for e in decision.events if e.kind == "blowup"), None)
        self.diverged = (f"{', '.join(dict.fromkeys(kinds))} at step {step}"
                         + (f" ({', '.join(reasons)})" if reasons else "") + (f" in {where}" if where else ""))
        self.logger.event({"step": step, "kind": "trial_diverged", "detail": {"cause": self.diverged}})
        if self.rank == 0:
            say(f"[vits-ray] {self.job.name}: diverged ({self.diverged}); the trial ends here, scored as diverged")

    def validate(self, variant: int = 0) -> dict[str, Any] | None:
        """Validation mel loss and friends over the val split, shared across ranks. Every
        validation sees the same batches, segments and noise (a fixed seed per rank and `variant`,
        forked: training's random streams are untouched), so two differ only by the weights."""
        if self.val_reader is None:
            return None
        # VAL_KEYS sums, then batches, then ranks whose validation blew up.
        sums = torch.zeros(len(VAL_KEYS) + 2, dtype=torch.float64, device=self.device)
        per_rank = max(1, math.ceil(self.cfg.train.val_batches / self.world_size))
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # validation must not shift training's randomness
            torch.manual_seed(self.cfg.train.seed + VALIDATION_SEED_OFFSET + VALIDATION_VARIANT_STRIDE * variant
                              + self.rank)
            for count, batch in enumerate(self.val_reader.iter_epoch(0)):
                if count >= per_rank:
                    break
                inputs = self._on_device(batch)
                try:
                    losses = eval_step(self.model, self.criteria, inputs, self.precision)
                except Exception as err:  # no collective inside: one rank may fail alone
                    self._judge_failure(err, self.progress.step, "validation",
                                        lambda: eval_step(self.model, self.criteria, inputs, self.precision))
                    sums[-1] = 1
                    break
                sums[:len(VAL_KEYS)] += losses.double()
                sums[-2] += 1
        totals = self.comm.all_reduce_sum(sums).cpu().tolist()
        count = max(totals[-2], 1.0)
        return {"kind": "val", "step": self.progress.step, "epoch": self.progress.epoch, "batches": int(totals[-2]),
                "failed": int(totals[-1]), **{k: v / count for k, v in zip(VAL_KEYS, totals[:len(VAL_KEYS)])}}

    # --- the stability margin (a sweep trial's probe) -----------------------------------------

    def probe_margin(self) -> None:
        """Would this schedule hold with a little less room? From the current state, take the next
        `tune.margin_steps` steps twice, on the batches and random draws the trial itself would
        use next: at 1x (the trial's own next steps) and at `tune.margin_multiplier` x both
        learning rates. Then the captured state goes back exactly (weights, moments, scaler,
        progress, guard, every random generator): the trial goes on bit-identical to one without
        the probe. The probe fails on a spike, blow-up or non-finite step at the higher rate, or a
        mel loss more than `tune.margin_max_loss_rise` above the 1x pass's on the same batches."""
        tune = self.cfg.tune
        state = self.capture()
        step = self.progress.step
        try:
            reference = self._probe_pass(1.0)
            self.restore(state)
            probed = self._probe_pass(tune.margin_multiplier)
            kinds = []
            for record in probed:
                kinds += [e.kind for e in self.guard.observe(record["step"], record).events]
        finally:
            self.restore(state)  # also the guard, which just judged the probe's steps
            self.model.model_outputs_cache = None
        failing = [k for k in dict.fromkeys(kinds) if k in ("spike", "rollback", "blowup", "nonfinite", "amp_collapse")]
        # Step i's loss is computed before its update: from the second step on they tell apart.
        rise = _loss_rise([r["loss_mel"] for r in reference[1:]], [r["loss_mel"] for r in probed[1:]])
        cause = ""
        if failing:
            cause = f"{', '.join(failing)} at x{tune.margin_multiplier:g}"
        elif not math.isfinite(rise):
            cause = f"non-finite loss at x{tune.margin_multiplier:g}"
        elif rise > tune.margin_max_loss_rise:
            cause = f"mel loss +{rise:.0%} at x{tune.margin_multiplier:g} (limit +{tune.margin_max_loss_rise:.0%})"
        margin = self.progress.margin
        margin["probes"] = margin.get("probes", 0) + 1
        margin["failures"] = margin.get("failures", 0) + bool(cause)
        margin["last_rise"] = rise
        if math.isfinite(rise):
            margin["worst_rise"] = max(margin.get("worst_rise", rise), rise)
        if cause and not margin.get("cause"):
            margin["cause"] = f"step {step}: {cause}"
        self.logger.event({"step": step, "kind": "margin_probe", "detail": {
            "ok": not cause, "cause": cause, "loss_rise": rise, "multiplier": tune.margin_multiplier,
            "steps": tune.margin_steps, "events": failing}})
        if self.rank == 0 and not self.job.quiet:
            say(f"[vits-ray] step {step}: margin probe x{tune.margin_multiplier:g} for {tune.margin_steps} steps: "
                + (f"failed ({cause})" if cause else f"held (mel loss {rise:+.1%})"))

    def _probe_pass(self, lr_scale: float) -> list[dict[str, Any]]:
        """`tune.margin_steps` training steps at `lr_scale` x the learning rates, their records
        reduced over ranks; nothing else of the loop's bookkeeping moves (drills stay armed)."""
        saved = (self.pending, dict(self.drills), self.spike_drill_until)
        self.pending, self.lr_scale = PendingSteps(), lr_scale
        try:
            for batch in self._upcoming_batches(self.cfg.tune.margin_steps):
                self.train_step(batch, 0.0)
            return self.pending.reduce(self.comm)
        finally:
            self.lr_scale = 1.0
            self.pending, self.drills, self.spike_drill_until = saved

    def _upcoming_batches(self, count: int) -> list:
        """The next `count` batches the trial will train on, read without moving its own reader."""
        epoch, start, batches = self.progress.epoch, self.progress.batch_in_epoch, []
        while len(batches) < count:
            upcoming = self.reader.iter_epoch(epoch, start)
            try:
                for batch in upcoming:
                    batches.append(batch)
                    if len(batches) == count:
                        break
            finally:
                upcoming.close()
            epoch, start = epoch + 1, 0
        return batches

    def measure_score_noise(self) -> None:
        """The score's own noise: the last validation (taken now if the last step had none)
        repeated under `tune.noise_seeds` other seeds, same weights; `val_noise` is the standard
        deviation of them all. A difference between two trials' scores smaller than a couple of
        these says nothing about their schedules."""
        if self.val_reader is None or not self.cfg.tune.noise_seeds:
            return
        val = self.validate()
        if val["failed"]:
            self._instability(self.guard.blowup(self.progress.step, "validation", val["failed"]), self.progress.step)
            return
        if self.last_validated_step != self.progress.step:
            self._after_validation(val)
        values = [val["val_loss_mel"]]
        for variant in range(1, self.cfg.tune.noise_seeds + 1):
            repeat = self.validate(variant)
            if not repeat["failed"]:
                values.append(repeat["val_loss_mel"])
        mean = sum(values) / len(values)
        self.val_noise = math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))
        self.logger.event({"step": self.progress.step, "kind": "score_noise", "detail": {
            "val_loss_mel": values, "std": self.val_noise, "seeds": len(values)}})

    def health_metrics(self) -> dict[str, Any]:
        """What every report to Ray carries: where the run is, its recent mel loss (the median of
        the last finite steps, robust to one noisy batch), its last validation mel loss, and how
        unstable it has been. A sweep scores trials from these."""
        recent = sorted(self.recent_mel)
        history = self.progress.val_history
        margin = self.progress.margin
        return {"step": self.progress.step, "loss_mel_recent": recent[len(recent) // 2] if recent else float("nan"),
                "val_loss_mel": self.last_val_loss_mel,
                "val_loss_mel_mean": sum(history) / len(history) if history else float("nan"),
                "validations": len(history), "val_noise": self.val_noise,
                "diverged": int(bool(self.diverged)), "cause": self.diverged,
                "margin_probes": margin.get("probes", 0), "margin_failures": margin.get("failures", 0),
                "margin_loss_rise": margin.get("last_rise", float("nan")),
                "margin_cause": margin.get("cause", ""),
                **{k: self.progress.health.get(k, 0) for k in ckpt_io.HEALTH_COUNTS}}

    def _after_validation(self, val: dict[str, Any]) -> None:
        self.logger.log(val)
        self.last_val_loss_mel = val["val_loss_mel"]
        self.last_validated_step = val["step"]
        history = self.progress.val_history
        history.append(float(val["val_loss_mel"]))
        del history[:-self.cfg.tune.score_validations]
        if self.quality_probe is None:  # else the best model is chosen by measured quality
            self._consider_best("best_val_loss_mel", val["val_loss_mel"])

    def measure_quality(self) -> None:
        """The `quality` record: every rank speaks its share of the fixed utterances; one all-reduce."""
        from vits_ray.evaluate.probe import quality_record

        totals = self.comm.all_reduce_sum(self.quality_probe.measure(self.model, self.device)).cpu().tolist()
        record = quality_record(totals, self.progress.step, self.progress.epoch)
        self.logger.log(record)
        if self.rank == 0 and not self.job.quiet:
            say(f"[vits-ray] step {record['step']} quality on {record['utterances']} val utterance(s): "
                f"MCD {record['mcd_dtw_db']:.2f} dB, F0 RMSE {record['f0_rmse_cents']:.0f} cents, "
                f"voicing error {record['vuv_error']:.2f}, duration ratio {record['duration_ratio']:.2f}"
                + (f", {record['failed']} failed" if record["failed"] else ""))
        if self.quality_probe.last_error:
            say(f"[vits-ray] rank {self.rank} step {record['step']}: quality synthesis failed: "
                f"{self.quality_probe.last_error}")
            self.quality_probe.last_error = ""
        if math.isfinite(record["mcd_dtw_db"]):
            self._consider_best("best_mcd_dtw_db", record["mcd_dtw_db"])

    def _consider_best(self, field: str, value: float) -> None:
        """A new best (the same numbers on every rank) replaces `best/` (rank 0 writes it)."""
        if not value < getattr(self.progress, field):
            return
        setattr(self.progress, field, value)
        self.progress.best_step = self.progress.step
        if self.rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                self.export(Path(tmp))
                self.run_store.upload_dir(tmp, "best")

    def export(self, directory: Path) -> None:
        """The current weights in Coqui's format, marked with the normaliser their data was prepared by."""
        from vits_ray.model import export_coqui

        export_coqui(self.model, self.cfg, self.vocab, directory, self.progress.step,
                     self.manifest.get("normalizer_version"))

    # --- the loop -----------------------------------------------------------------------------

    def finished(self) -> bool:
        return bool(self.diverged) or (bool(self.max_steps) and self.progress.step >= self.max_steps)

    def run(self) -> None:
        first, epochs = self.progress.first_epoch, self.cfg.train.epochs
        while not self.finished() and self.progress.epoch < first + epochs:
            if self.train_epoch():
                self.end_epoch()
        if self.diverged:  # nothing worth saving: the trial's result is its diverged report
            self.logger.flush()
            self.session.report(self.health_metrics())
            return
        if self.last_saved_step != self.progress.step:
            self.sync()
            if not self.diverged and self.job.measure_score_noise:
                self.measure_score_noise()
            if self.diverged:
                self.logger.flush()
                self.session.report(self.health_metrics())
                return
            self.save({}, self.guard.checkpoint_verdict())

    def train_epoch(self) -> bool:
        """The rest of the current epoch. False when it ended early (max_steps or a rollback)."""
        for batch in self.reader.iter_epoch(self.progress.epoch, self.progress.batch_in_epoch):
            step = self.train_step(batch, self.reader.loader_time)
            if not self._is_sync_point(step):
                continue
            if not self.sync():
                return False  # rolled back: the epoch starts again from the restored position
            if step % self.cfg.train.val_step == 0:
                val = self.validate()
                if val is not None and val["failed"]:
                    self._instability(self.guard.blowup(step, "validation", val["failed"]), step)
                    return False
                if val is not None:
                    self._after_validation(val)
            if self.quality_probe is not None and step % self.cfg.eval.every_steps == 0:
                self.measure_quality()
            if step in self.margin_probes and self.cfg.tune.margin_steps:
                self.probe_margin()
                if not self.finished():  # at the last step, the last save's report carries it
                    self.session.report(self.health_metrics())  # the scheduler hears the margin at this rung
            if self.finished() and self.job.measure_score_noise:
                self.measure_score_noise()  # before the last save, whose report carries it
                if self.diverged:
                    return False
            if self.guard.save_due(step) or self.save_pending or self.finished():
                self._save_when_trusted(step)
            if self.finished():
                return False
        return self.sync()

    def end_epoch(self) -> None:
        # A checkpoint taken on an epoch's last step is restored (relaunch, rollback) before that
        # epoch's end: its record was written in the first pass, and this pass saw no step of it.
        if not self.means.empty:
            record = self.means.record(self.progress.epoch, self.progress.step)
            self.logger.log(record)
            # Ray gets the epoch means (a report is a barrier on all ranks; `empty` is the same on
            # every rank, as the records are reduced over ranks). Records first into storage: a
            # sweep's scheduler may end the trial at this report, killing the workers mid-epoch.
            self.logger.flush()
            self.session.report({**{k: v for k, v in record.items() if k != "kind"}, **self.health_metrics()})
        self.means = EpochMeans()
        self.progress.epoch += 1
        self.progress.batch_in_epoch = 0

    def close(self) -> None:
        """Records written out, shard caches removed (a SIGKILLed worker leaves its temporary cache:
        set data.cache_dir to a per-node folder to have relaunches reuse it)."""
        try:
            self.logger.close()
        finally:
            for reader in (self.reader, self.val_reader):
                if reader is not None:
                    reader.close()
