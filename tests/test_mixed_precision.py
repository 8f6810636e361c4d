"""fp16 with a GradScaler and bf16, run for real on the CPU: the real Trainer, Coqui model and gloo.

What decides whether a long fp16 run survives is tested here without a GPU: a fresh scaler's
calibration, an overflow on one rank skipped by every rank, a collapsing scale rolled back to the
checkpointed one, exact resume with the scaler's state, and clipping of unscaled gradients. Every
test asserts the autocast dtype seen inside the model's forward, so fp16 silently run as fp32
fails them, and that the scale moves.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from drills import same_weights
from ranks import DirectorySession, run_ranks

pytestmark = pytest.mark.slow

# On the CPU an fp16 convolution's weight gradient is ~50x slower than in fp32 (PyTorch has no fast
# kernel for it, see bench/README.md), and Coqui's discriminator is made of 1024-channel ones: one
# utterance per batch, one period discriminator and a short segment keep a step to a few seconds.
FP16_CPU = ("train.batch_size=1", "model.periods_multi_period_discriminator=[2]", "model.spec_segment_size=4",
            "train.mixed_precision=fp16", "train.log_step=1", "train.val_step=1000")


def _job(shards: str, root: Path, world: int, steps: int, overrides=(), drills=()):
    from vits_ray.config import load_config
    from vits_ray.train import Drill, TrainJob

    cfg = load_config("tiny", [*FP16_CPU, *overrides])
    return TrainJob(config=cfg.to_dict(), data_uri=shards, storage_uri=str(root), name="run", workers=world,
                    max_steps=steps, drills=tuple(Drill.parse(d) for d in drills))


def _train_recording(rank: int, world: int, shards: str, root: Path, steps: int, overrides, drills) -> None:
    """Train, recording on this rank the dtype the decoder's first convolution computed in and the
    GradScaler's scale after every step; written to root/seen-RANK.json (appended across runs)."""
    from vits_ray.trainer import Trainer

    trainer = Trainer(_job(shards, root, world, steps, overrides, drills), rank, world, torch.device("cpu"),
                      DirectorySession(root / "checkpoints", rank))
    path = root / f"seen-{rank}.json"
    seen = json.loads(path.read_text()) if path.exists() else {"dtypes": [], "scales": []}
    trainer.model.waveform_decoder.conv_pre.register_forward_hook(
        lambda _m, _i, out: seen["dtypes"].append(str(out.dtype)))
    train_step = trainer.train_step

    def recording(batch, loader_time):
        step = train_step(batch, loader_time)
        seen["scales"].append([step, trainer.scaler.get_scale() if trainer.scaler is not None else 1.0])
        return step

    trainer.train_step = recording
    trainer.run()
    trainer.close()
    path.write_text(json.dumps(seen))


def _train(world: int, shards, root: Path, steps: int, overrides=(), drills=()) -> None:
    (root / "checkpoints").mkdir(parents=True, exist_ok=True)
    assert run_ranks(world, _train_recording, str(shards), root, steps, tuple(overrides), tuple(drills)) == []


def _records(root: Path) -> tuple[list[dict], list[dict]]:
    from vits_ray.runlog import read_records
    from vits_ray.storage import open_store

    metrics, events = read_records(open_store(str(root / "run")))
    return [r for r in metrics if r["kind"] == "step"], events


def _seen(root: Path, rank: int) -> dict:
    return json.loads((root / f"seen-{rank}.json").read_text())


def _final_state(root: Path) -> dict:
    from vits_ray.checkpoint import read as read_checkpoint

    return read_checkpoint(sorted((root / "checkpoints").glob("checkpoint_*"))[-1])


def _assert_scale_follows_the_skips(steps: list[dict]) -> None:
    """The GradScaler's rule, as recorded: an overflowing step halves the next step's scale and a
    clean one keeps it (growth comes only after 2000 clean steps)."""
    for this, following in zip(steps, steps[1:]):
        skipped = this["skipped_0"] or this["skipped_1"]
        assert following["amp_scale"] == (this["amp_scale"] / 2 if skipped else this["amp_scale"]), (this, following)


def _assert_same_training_state(a: dict, b: dict) -> None:
    assert same_weights(a["model"], b["model"]) == []
    assert a["scaler"] == b["scaler"]
    moments_a, moments_b = _tensors(a["optimizers"]), _tensors(b["optimizers"])
    assert len(moments_a) == len(moments_b) and all(torch.equal(x, y) for x, y in zip(moments_a, moments_b))
    for rank, rng in enumerate(a["rng"]):
        assert torch.equal(rng["torch"], b["rng"][rank]["torch"]), rank


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for key in sorted(tree, key=str) for t in _tensors(tree[key])]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in _tensors(item)]
    return []


# --- two ranks: calibration, an overflow on one rank, exact resume -----------------------------

def test_two_ranks_calibrate_skip_an_overflow_together_and_resume_exactly(prepared_demo, tmp_path):
    """A fresh scaler at 256 overflows until it halves to a level the gradients fit; rank 0's
    gradients then overflow at step 5 (the drill) and both ranks skip it and halve together. The
    same run stopped after step 3 and relaunched ends bit for bit where the straight run does."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    settings = dict(overrides=("train.amp_init_scale=256", "train.save_step=3"), drills=("overflow@5",))
    _train(2, prepared_demo, straight, 6, **settings)
    _train(2, prepared_demo, split, 3, **settings)
    _train(2, prepared_demo, split, 6, **settings)

    steps, events = _records(straight)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for rank in (0, 1):
        seen = _seen(straight, rank)
        assert set(seen["dtypes"]) == {"torch.float16"}  # autocast really computed in fp16
        # the scale after each step, the same on both ranks: every skip decision was common
        assert seen["scales"] == _seen(straight, 0)["scales"]
    _assert_scale_follows_the_skips(steps)
    assert all(math.isfinite(r["loss_1"]) and math.isfinite(r["loss_0"]) for r in steps)

    # calibration: the leading overflows, counted in one event, and no trouble reported for them
    leading = next(i for i, r in enumerate(steps) if not (r["skipped_0"] or r["skipped_1"]))
    assert leading >= 1 and steps[0]["amp_scale"] == 256.0
    calibrated = [e for e in events if e["kind"] == "amp_calibrated"]
    assert len(calibrated) == 1, events
    assert calibrated[0]["step"] == leading + 1 and calibrated[0]["detail"]["skipped_steps"] == leading
    assert calibrated[0]["detail"]["initial_scale"] == 256.0
    assert calibrated[0]["value"] == 256.0 / 2 ** leading
    nonfinite = [e for e in events if e["kind"] == "nonfinite"]
    assert all(e["step"] > leading for e in nonfinite), nonfinite
    assert not [e for e in events if e["kind"] in ("rollback", "amp_collapse")], events

    # the drill: rank 0's generator gradients overflowed; both ranks skipped and halved
    drilled = steps[4]
    assert drilled["skipped_1"] == 1 and math.isfinite(drilled["loss_1"])
    assert steps[5]["amp_scale"] == drilled["amp_scale"] / 2
    assert 5 in [e["step"] for e in nonfinite]
    assert next(e for e in nonfinite if e["step"] == 5)["detail"]["losses_finite"] is True

    final = _final_state(straight)
    assert final["progress"]["step"] == 6 and final["scaler"]["scale"] == steps[5]["amp_scale"] / (
        2 if steps[5]["skipped_0"] or steps[5]["skipped_1"] else 1)
    _assert_same_training_state(final, _final_state(split))
    split_steps, _ = _records(split)
    assert [r["loss_1"] for r in split_steps] == [r["loss_1"] for r in steps]
    assert [r["amp_scale"] for r in split_steps] == [r["amp_scale"] for r in steps]


def test_one_rank_resumes_exactly_in_the_middle_of_calibration(prepared_demo, tmp_path):
    """Stopped after step 1 while the fresh scaler is still calibrating: the relaunch restores the
    scale and the calibration under way, and ends where the straight run does, bit for bit."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    settings = dict(overrides=("train.amp_init_scale=256", "train.save_step=1"))
    _train(1, prepared_demo, straight, 4, **settings)
    _train(1, prepared_demo, split, 1, **settings)
    _train(1, prepared_demo, split, 4, **settings)
    steps, events = _records(straight)
    assert steps[0]["skipped_1"] == 1, steps[0]  # 256 overflows the tiny generator's gradients
    split_steps, split_events = _records(split)
    assert [r["loss_1"] for r in split_steps] == [r["loss_1"] for r in steps]
    assert [r["amp_scale"] for r in split_steps] == [r["amp_scale"] for r in steps]
    _assert_same_training_state(_final_state(straight), _final_state(split))
    calibrations = [[e["step"], e["detail"]] for e in events if e["kind"] == "amp_calibrated"]
    assert calibrations and calibrations == [[e["step"], e["detail"]] for e in split_events
                                             if e["kind"] == "amp_calibrated"]
    assert set(_seen(split, 0)["dtypes"]) == {"torch.float16"}

    from vits_ray.report import write_report

    report = write_report(str(split / "run"), tmp_path / "report").read_text()
    (step, detail), = calibrations
    assert (f"Calibration of a fresh GradScaler: {detail['skipped_steps']} skipped step(s), scale 256 -> "
            f"{detail['scale']:g} by step {step}.") in report, report


# --- a collapsing scale ---------------------------------------------------------------------

def test_a_collapsing_scale_is_rolled_back_to_the_checkpointed_scale(prepared_demo, tmp_path):
    """Rank 0's gradients overflow at steps 3, 4 and 5: the scale halves step after step, the
    AmpScaleMonitor calls it a collapse, the guard rolls back to checkpoint 2, and the scale there
    is the checkpointed one. The drills fire once: the replayed steps train."""
    root = tmp_path / "collapse"
    _train(1, prepared_demo, root, 5,
           overrides=("train.amp_init_scale=16", "train.save_step=2", "stability.amp_max_halvings=2"),
           drills=("overflow@3", "overflow@4", "overflow@5"))
    steps, events = _records(root)
    collapse = [e for e in events if e["kind"] == "amp_collapse"]
    assert len(collapse) == 1 and collapse[0]["detail"]["reason"] == "repeated_halving", events
    rollback = next(e for e in events if e["kind"] == "rollback")
    assert "amp_collapse" in rollback["detail"]["reasons"]
    from vits_ray.checkpoint import read as read_checkpoint

    checkpointed = read_checkpoint(root / "checkpoints" / "checkpoint_00000002")["scaler"]["scale"]
    abandoned = [r for r in steps if r["step"] >= 3][:3]  # the records keep both timelines, in order
    assert all(r["skipped_1"] for r in abandoned) and [r["amp_scale"] for r in abandoned] == [
        checkpointed, checkpointed / 2, checkpointed / 4]
    steps = list({r["step"]: r for r in steps}.values())  # the timeline that stands: the replay
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert steps[2]["amp_scale"] == checkpointed  # restored, not the collapsed scale
    scales = _seen(root, 0)["scales"]
    lowest = min(scale for _, scale in scales)
    assert lowest <= checkpointed / 4  # it did collapse before the rollback
    assert scales[-1][1] >= checkpointed / 2  # and training went on from the checkpointed scale
    assert not all(r["skipped_1"] for r in steps[2:]), steps  # the drills did not fire again
    assert set(_seen(root, 0)["dtypes"]) == {"torch.float16"}


# --- clipping sees unscaled gradients -----------------------------------------------------------

def test_grad_norms_in_fp16_match_fp32_on_the_first_step(prepared_demo):
    """Clipping and the recorded norms see the unscaled gradients: a scale of 8 left in would show
    as norms 8x the fp32 ones."""
    from vits_ray.config import load_config
    from vits_ray.data.reader import ShardReader
    from vits_ray.data.shards import read_manifest
    from vits_ray.model import build_model, build_optimizers
    from vits_ray.step import Precision, gan_step
    from vits_ray.storage import open_store
    from vits_ray.text import Vocabulary

    cfg = load_config("tiny", list(FP16_CPU))
    store = open_store(str(prepared_demo))
    manifest = read_manifest(store)
    vocab = Vocabulary.from_dict(manifest["vocab"])
    reader = ShardReader(store, manifest, "train", 0, 1, seed=0, batch_size=1, max_batch_seconds=60,
                         pad_id=vocab.pad_id)
    batch = next(iter(reader.iter_epoch(0)))
    norms = {}
    for mode in ("no", "fp16"):
        torch.manual_seed(0)
        model = build_model(cfg, vocab)
        precision = Precision.resolve(mode, "cpu")
        inputs = model.format_batch_on_device(model.format_batch(batch.to_coqui("cpu")))
        torch.manual_seed(1)  # the same segment and noise in both
        result = gan_step(model, model.get_criterion(), build_optimizers(model, cfg),
                          precision.grad_scaler(8.0), inputs, precision, (1000.0, 1000.0)).as_dict()
        norms[mode] = result
    assert norms["fp16"]["amp_scale"] == 8.0 and not norms["fp16"]["skipped_1"]
    for key in ("grad_norm_0", "grad_norm_1"):
        assert norms["fp16"][key] == pytest.approx(norms["no"][key], rel=0.05), (key, norms)
    assert norms["fp16"]["loss_1"] != norms["no"]["loss_1"]  # not the same arithmetic


# --- bf16 -------------------------------------------------------------------------------------

def test_bf16_ranks_stay_identical_with_compressed_gradients(prepared_demo, tmp_path):
    _train(2, prepared_demo, tmp_path, 3,
           overrides=("train.mixed_precision=bf16", "train.grad_compression=bf16", "train.save_step=3"))
    steps, events = _records(tmp_path)
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["amp_scale"] == 1.0 and not r["skipped_0"] and not r["skipped_1"] for r in steps)
    assert not [e for e in events if e["kind"] == "amp_calibrated"]  # no GradScaler in bf16
    for rank in (0, 1):
        assert set(_seen(tmp_path, rank)["dtypes"]) == {"torch.bfloat16"}
    from vits_ray.runlog import read_records
    from vits_ray.storage import open_store

    checkpoint = [r for r in read_records(open_store(str(tmp_path / "run")))[0] if r["kind"] == "checkpoint"][-1]
    assert len(checkpoint["param_checksums"]) == 2 and checkpoint["param_checksums"][0] == checkpoint["param_checksums"][1]
