"""Checkpoints you can trust: exact round trips, digests that catch damage, and files that cannot
run code when read (training state and --init-from warm starts alike). CPU only, no Ray."""

from __future__ import annotations

import json
import math
import os
import random
import shlex
import uuid
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch

from vits_ray import checkpoint as ckpt
from vits_ray.checkpoint import (DIGEST_FILE, STATE_FILE, CorruptCheckpointError, Progress, UnsafeCheckpointError,
                                 complete_folders, is_complete, read, verify, write)
from vits_ray.config import StabilityConfig, load_config
from vits_ray.stability import StabilityGuard

CPU = torch.device("cpu")
CONFIG_TOML = 'name = "checkpoint-test"\n'
VOCAB = {"characters": "অআ", "format_version": 1}


class RunsCode:
    """Unpickling this runs a shell command: what a hostile checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def marker_path(tmp_path: Path) -> Path:
    return tmp_path / f"pwned-{uuid.uuid4().hex}"


def test_the_hostile_payload_really_runs_code_when_loaded_unsafely(tmp_path):
    # Guards the refusal tests below against a payload that would have done nothing anyway.
    marker = marker_path(tmp_path)
    torch.save({"x": RunsCode(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


# --- a small state: fast tests of the folder format ---------------------------------------

def small_state() -> dict:
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return ckpt.capture(model, [optimizer], None, Progress(step=7), [ckpt.rng_state(CPU)])


@pytest.fixture
def written(tmp_path) -> Path:
    directory = tmp_path / "checkpoint_00000007"
    write(directory, small_state(), CONFIG_TOML, VOCAB)
    return directory


def test_digest_is_written_and_covers_every_other_file(written):
    digest = json.loads((written / DIGEST_FILE).read_text())
    assert digest["format"] == 1
    assert set(digest["files"]) == {p.name for p in written.iterdir()} - {DIGEST_FILE}
    assert digest["files"][STATE_FILE]["bytes"] == (written / STATE_FILE).stat().st_size
    verify(written)
    assert read(written)["progress"]["step"] == 7


def test_digest_of_state_pt_hashed_while_writing_matches_the_file(written):
    # The digest is computed from the bytes torch.save streamed, never from a second read.
    digest = json.loads((written / DIGEST_FILE).read_text())
    assert digest["files"][STATE_FILE] == ckpt._file_entry(written / STATE_FILE)


def test_truncated_state_is_corrupt_and_says_so(written):
    data = (written / STATE_FILE).read_bytes()
    (written / STATE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError,
                       match=rf"{STATE_FILE}: {len(data) // 2} bytes, expected {len(data)} \(truncated\)"):
        read(written)


def test_flipped_byte_is_a_sha256_mismatch(written):
    data = bytearray((written / STATE_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (written / STATE_FILE).write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=f"{STATE_FILE}: sha256 mismatch"):
        read(written)


def test_missing_digest_is_an_interrupted_upload(written):
    (written / DIGEST_FILE).unlink()
    with pytest.raises(CorruptCheckpointError, match=r"no digest\.json \(an interrupted upload\?") as err:
        read(written)
    assert str(written) in str(err.value)


def test_missing_file_is_named(written):
    (written / "vocab.json").unlink()
    with pytest.raises(CorruptCheckpointError, match="missing file vocab.json"):
        verify(written)


def test_a_digest_cannot_point_outside_its_folder(written):
    digest = json.loads((written / DIGEST_FILE).read_text())
    digest["files"]["../elsewhere"] = {"sha256": "0" * 64, "bytes": 1}
    (written / DIGEST_FILE).write_text(json.dumps(digest))
    with pytest.raises(CorruptCheckpointError, match="not a file name in this folder"):
        verify(written)


def test_completeness_from_a_listing():
    assert is_complete(["config.toml", STATE_FILE, "vocab.json", DIGEST_FILE])
    assert not is_complete(["config.toml", STATE_FILE, "vocab.json"])
    keys = ["checkpoint_00000002/state.pt", "checkpoint_00000002/digest.json", "checkpoint_00000004/state.pt",
            "metrics.jsonl", "export/model.pth"]
    assert complete_folders(keys) == ["checkpoint_00000002"]


def test_a_checkpoint_from_before_digests_is_refused_with_a_way_forward(tmp_path):
    # What write() used to produce: numpy's RNG state as an ndarray, no digest.json.
    directory = tmp_path / "old"
    directory.mkdir()
    state = small_state()
    state["rng"] = [{"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}]
    torch.save(state, directory / STATE_FILE)
    with pytest.raises(CorruptCheckpointError, match="before vits-ray wrote digests.*--init-from"):
        read(directory)
    # and it would indeed need numpy's unpickling, which weights_only refuses
    with pytest.raises(UnsafeCheckpointError, match="numpy"):
        ckpt.safe_load(directory / STATE_FILE)


def test_writing_refuses_state_that_would_not_load_back(tmp_path):
    state = small_state()
    state["progress"]["guard"] = {"detectors": {"loss_1": {"history": [1.0, np.float64(2.0)]}}}
    with pytest.raises(TypeError, match=r"state\.progress\.guard\.detectors\.loss_1\.history\[1\].*numpy"):
        write(tmp_path / "a", state, CONFIG_TOML, VOCAB)
    state["progress"]["guard"] = {"window": deque([1.0])}
    with pytest.raises(TypeError, match=r"state\.progress\.guard\.window.*deque"):
        write(tmp_path / "b", state, CONFIG_TOML, VOCAB)


# --- hostile files --------------------------------------------------------------------------

def test_state_that_would_run_code_is_refused_even_with_a_valid_digest(written, tmp_path):
    # Whoever can write the storage prefix can also write a matching digest: the digest is about
    # damage, weights_only is what stops code.
    marker = marker_path(tmp_path)
    state = read(written)
    state["progress"]["guard"] = {"payload": RunsCode(marker)}
    torch.save(state, written / STATE_FILE)
    digest = json.loads((written / DIGEST_FILE).read_text())
    digest["files"][STATE_FILE] = ckpt._file_entry(written / STATE_FILE)
    (written / DIGEST_FILE).write_text(json.dumps(digest))
    verify(written)
    with pytest.raises(UnsafeCheckpointError, match=rf"{STATE_FILE}: .*would need arbitrary code.*system"):
        read(written)
    assert not marker.exists()


# --- the real model: exact resume, Coqui checkpoints, exports --------------------------------

@pytest.fixture(scope="module")
def tiny():
    from vits_ray.model import build_model, build_optimizers
    from vits_ray.text import Vocabulary

    cfg = load_config("tiny")
    vocab = Vocabulary.build(["আমি গান গাই।"])
    model = build_model(cfg, vocab)
    optimizers = build_optimizers(model, cfg)
    for optimizer in optimizers:  # one step each, so the Adam moments exist and are not zero
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.randn_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return cfg, vocab, model, optimizers


def busy_guard() -> StabilityGuard:
    """A guard that has seen normal values, a NaN step and a float that is not finite."""
    guard = StabilityGuard(StabilityConfig(), save_step=10)
    for step in range(1, 31):
        guard.observe(step, {"loss_1": 27.0 + (step % 5) * 0.1, "loss_mel": 20.0, "loss_kl": 2.0,
                             "amp_scale": 65536.0})
    guard.observe(31, {"loss_1": float("nan"), "loss_mel": 20.0, "loss_kl": 2.0, "grad_norm_0": float("inf")})
    guard.after_rollback(31, 20)
    return guard


def draws() -> tuple:
    return (torch.rand(5).tolist(), torch.randn(3).tolist(), np.random.rand(5).tolist(), np.random.randn(3).tolist(),
            [random.random() for _ in range(5)], random.gauss(0, 1), np.random.randint(0, 2**31, 4).tolist())


def test_round_trip_restores_weights_optimizers_progress_and_random_streams(tiny, tmp_path):
    from vits_ray.model import build_model, build_optimizers

    cfg, vocab, model, optimizers = tiny
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    guard = busy_guard()
    progress = Progress(step=31, epoch=2, batch_in_epoch=5, best_val_loss_mel=float("inf"), guard=guard.state_dict())
    # Mid-stream generators, with a cached Gaussian in numpy and in Python.
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn(1), random.gauss(0, 1)
    state = ckpt.capture(model, optimizers, scaler, progress, [ckpt.rng_state(CPU)])
    expected = draws()

    write(tmp_path / "c", state, cfg.to_toml(), vocab.to_dict())
    loaded = read(tmp_path / "c")

    other = build_model(load_config("tiny", ["train.seed=99"]), vocab)
    other_optimizers = build_optimizers(other, cfg)
    other_scaler = torch.amp.GradScaler("cpu")
    torch.manual_seed(7), np.random.seed(7), random.seed(7)  # generators elsewhere
    restored = ckpt.restore(loaded, other, other_optimizers, other_scaler, rank=0, world_size=1, device=CPU)

    assert draws() == expected
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, other.state_dict()[name]), name
    for mine, theirs in zip(optimizers, other_optimizers):
        a, b = mine.state_dict(), theirs.state_dict()
        assert a["param_groups"] == b["param_groups"]
        for index, slots in a["state"].items():
            for slot, value in slots.items():
                assert torch.equal(value, b["state"][index][slot]), (index, slot)
    assert other_scaler.state_dict() == scaler.state_dict()
    assert restored.step == 31 and restored.batch_in_epoch == 5 and math.isinf(restored.best_val_loss_mel)
    again = StabilityGuard(StabilityConfig(), save_step=10)
    again.load_state_dict(restored.guard)
    assert again.state_dict() == guard.state_dict()
    follow = {"loss_1": 50.0, "loss_mel": 20.0, "loss_kl": 2.0, "amp_scale": 1.0}
    assert again.observe(32, follow) == guard.observe(32, follow)


def coqui_trainer_checkpoint(tiny, folder: Path) -> Path:
    """A checkpoint written by Coqui's own trainer package, the way its Trainer saves one."""
    from trainer.io import save_checkpoint

    from vits_ray.model import coqui_config

    cfg, vocab, model, optimizers = tiny
    config = coqui_config(cfg, vocab)  # a Coqpit: save_model turns it into a dict
    folder.mkdir()
    save_checkpoint(config, model, folder, current_step=1234, epoch=5, optimizer=optimizers,
                    scheduler=model.get_scheduler(optimizers), scaler=torch.amp.GradScaler("cpu"),
                    model_loss={"train_loss": 27.5, "eval_loss": None})
    config.save_json(str(folder / "config.json"))
    return folder / "checkpoint_1234.pth"


def test_a_coqui_trainer_checkpoint_warm_starts_with_weights_only(tiny, tmp_path):
    from vits_ray.model import build_model, warm_start

    cfg, vocab, model, _ = tiny
    path = coqui_trainer_checkpoint(tiny, tmp_path / "coqui")
    fresh = build_model(load_config("tiny", ["train.seed=99"]), vocab)
    report = warm_start(fresh, path, tmp_path / "coqui" / "config.json")
    assert (report.global_step, report.epoch) == (1234, 5)
    assert not report.skipped and len(report.loaded) == len(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, fresh.state_dict()[name]), name


def test_our_export_warm_starts_with_weights_only(tiny, tmp_path):
    from vits_ray.model import build_model, export_coqui, warm_start

    cfg, vocab, model, _ = tiny
    out = export_coqui(model, cfg, vocab, tmp_path / "export", step=77)
    fresh = build_model(load_config("tiny", ["train.seed=99"]), vocab)
    report = warm_start(fresh, out / "model.pth", out / "config.json")
    assert report.global_step == 77 and not report.skipped
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, fresh.state_dict()[name]), name


def test_a_warm_start_file_that_would_run_code_is_refused(tiny, tmp_path):
    from vits_ray.model import warm_start

    _, _, model, _ = tiny
    marker = marker_path(tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "model.pth"
    torch.save({"model": dict(before), "config": {}, "step": 1, "hook": RunsCode(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"model\.pth: .*would need arbitrary code"):
        warm_start(model, path, None)
    assert not marker.exists()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_warm_start_file_that_is_not_a_checkpoint_is_refused(tiny, tmp_path):
    from vits_ray.model import warm_start

    _, _, model, _ = tiny
    path = tmp_path / "model.pth"
    torch.save({"model": {"weight": torch.zeros(1)}}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptCheckpointError, match="not a readable torch checkpoint"):
        warm_start(model, path, None)


def test_a_state_held_in_memory_survives_being_restored_and_trained_on(tiny):
    """What a rollback to the last trusted state, or the margin probe, relies on: restoring a state
    twice gives the same optimizer moments both times (load_state_dict would otherwise adopt the
    state's own tensors and the next steps would update them in place)."""
    cfg, vocab, model, optimizers = tiny
    progress = Progress(step=3, health={"spikes": 1}, val_history=[5.0])
    state = ckpt.capture(model, optimizers, None, progress, [ckpt.rng_state(CPU)])
    digest = ckpt.training_state_digest(state)
    for _ in range(2):
        restored = ckpt.restore(state, model, optimizers, None, rank=0, world_size=1, device=CPU)
        restored.health["spikes"] += 1
        restored.val_history.append(6.0)
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = torch.randn_like(p)
            optimizer.step()
    assert ckpt.training_state_digest(state) == digest
    assert state["progress"]["health"] == {"spikes": 1} and state["progress"]["val_history"] == [5.0]
