"""Training on CPU with the tiny recipe, the demo corpus and a real local Ray cluster."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from vits_ray.config import load_config
from vits_ray.train import Drill, TrainJob, TrainSetupError, run_training

pytestmark = pytest.mark.slow

STEP_KEYS = {"step", "epoch", "loss_0", "loss_1", "loss_disc", "loss_gen", "loss_kl", "loss_feat", "loss_mel",
             "loss_duration", "grad_norm_0", "grad_norm_1", "lr_0", "lr_1", "amp_scale", "step_time",
             "loader_time"}


def job(shards, storage, name, *, overrides=(), **kwargs) -> TrainJob:
    cfg = load_config("tiny", ["train.batch_size=2", *overrides])
    return TrainJob(config=cfg.to_dict(), data_uri=str(shards), storage_uri=str(storage), name=name, **kwargs)


def records(run_dir: Path | str, kind: str) -> list[dict]:
    """The run's metrics records of one kind (`run_dir`: a folder or an s3:// URI)."""
    from vits_ray.runlog import read_records
    from vits_ray.storage import open_store

    return [r for r in read_records(open_store(str(run_dir)))[0] if r["kind"] == kind]


def run_events(run_dir: Path) -> list[dict]:
    from vits_ray.runlog import read_records
    from vits_ray.storage import open_store

    return read_records(open_store(str(run_dir)))[1]


def final_state(run_dir: Path) -> dict:
    latest = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())[-1]
    from vits_ray.checkpoint import read as read_checkpoint

    return read_checkpoint(latest)  # verifies the digest of every checkpoint the tests write


def test_one_worker_trains_logs_checkpoints_and_exports(prepared_demo, ray_local, tmp_path):
    outcome = run_training(job(prepared_demo, tmp_path, "one", max_steps=6,
                               overrides=["train.save_step=3", "train.val_step=3"]))
    run = tmp_path / "one"
    assert outcome.step == 6
    steps = records(run, "step")
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for r in steps:
        assert STEP_KEYS <= set(r), STEP_KEYS - set(r)
        assert all(math.isfinite(r[k]) for k in ("loss_0", "loss_1", "loss_mel", "grad_norm_1"))
    assert records(run, "val"), "validation records missing"
    checkpoints = records(run, "checkpoint")
    assert [c["step"] for c in checkpoints] == [3, 6]
    assert all(len(c["param_checksums"]) == 1 for c in checkpoints)
    assert (run / "checkpoint_00000006" / "state.pt").exists()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "export" / "model.pth").exists() and (run / "export" / "config.json").exists()

    # the report of this real run: plots exist, the table matches the metrics
    from vits_ray.report import write_report

    report_md = write_report(str(run), tmp_path / "report")
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    summary = report["summary"]["avg_loss_1"]  # no full epoch yet: taken from the step records
    assert summary["first"]["value"] == steps[0]["loss_1"] and summary["last"]["value"] == steps[-1]["loss_1"]
    assert summary["min"]["value"] == min(r["loss_1"] for r in steps)
    files = [f["file"] for f in report["figures"]]
    assert "generator_loss.png" in files and "grad_norms.png" in files and "timing.png" in files, files
    for png in files:
        assert (tmp_path / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert "No quality" in report_md.read_text() or "no quality" in report_md.read_text()


def test_export_loads_in_coquis_synthesizer(prepared_demo, ray_local, tmp_path):
    from TTS.utils.synthesizer import Synthesizer

    run_training(job(prepared_demo, tmp_path, "export", max_steps=2))
    export = tmp_path / "export" / "export"
    synthesizer = Synthesizer(tts_checkpoint=export / "model.pth", tts_config_path=export / "config.json")
    wav = synthesizer.tts("আমার সোনার বাংলা")
    assert len(wav) > 1000 and np.all(np.isfinite(wav))


def test_two_workers_resume_exactly_on_every_rank(prepared_demo, ray_local, tmp_path):
    overrides = ["train.save_step=2", "train.log_step=2"]
    run_training(job(prepared_demo, tmp_path, "two", workers=2, max_steps=4, overrides=overrides))
    # The split run also measures quality on both ranks (eval mode, synthesis, a collective): it
    # must leave training bit-identical to the run that does not.
    quality = [*overrides, "eval.every_steps=2", "eval.utterances=3"]
    run_training(job(prepared_demo, tmp_path, "two-split", workers=2, max_steps=2, overrides=quality))
    run_training(job(prepared_demo, tmp_path, "two-split", workers=2, max_steps=4, overrides=quality))
    straight, split = final_state(tmp_path / "two"), final_state(tmp_path / "two-split")
    assert straight["world_size"] == split["world_size"] == 2
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, split["model"][name]), name
    # each rank kept its own generators, and they match between the two timelines
    assert not torch.equal(straight["rng"][0]["torch"], straight["rng"][1]["torch"])
    for rank in (0, 1):
        assert torch.equal(straight["rng"][rank]["torch"], split["rng"][rank]["torch"]), rank
    # every rank holds the same parameters (the checksums are taken on each rank)
    for run in ("two", "two-split"):
        for c in records(tmp_path / run, "checkpoint"):
            assert len(c["param_checksums"]) == 2 and c["param_checksums"][0] == c["param_checksums"][1]
    steps = records(tmp_path / "two-split", "step")
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["loss_1"] for r in steps] == [r["loss_1"] for r in records(tmp_path / "two", "step")]
    # throughput counts both ranks' batches
    assert all(r["batch_size"] > 2 for r in steps), [r["batch_size"] for r in steps]
    # quality: the three utterances shared out over the two ranks and summed back, once per measurement
    measured = records(tmp_path / "two-split", "quality")
    assert [q["step"] for q in measured] == [2, 4]
    assert all(q["utterances"] + q["failed"] == 3 and q["mcd_dtw_db"] > 0 for q in measured), measured


def test_resume_with_other_workers_or_settings_is_refused(prepared_demo, ray_local, tmp_path):
    run_training(job(prepared_demo, tmp_path, "fixed", max_steps=2))
    with pytest.raises(Exception, match=r"written by 1 worker\(s\) and this run has 2"):
        run_training(job(prepared_demo, tmp_path, "fixed", workers=2, max_steps=3))
    with pytest.raises(Exception, match=r"optim.lr_gen: 0.0002 -> 0.0001"):
        run_training(job(prepared_demo, tmp_path, "fixed", max_steps=3, overrides=["optim.lr_gen=1e-4"]))
    # what a relaunch may change, it may change
    run_training(job(prepared_demo, tmp_path, "fixed", max_steps=3, overrides=["train.save_step=7"]))
    assert [r["step"] for r in records(tmp_path / "fixed", "step")] == [1, 2, 3]


def test_a_bad_batch_on_one_rank_is_skipped_by_both(prepared_demo, ray_local, tmp_path):
    # The nan drill poisons rank 0's batch only: rank 1's local loss stays finite.
    run_training(job(prepared_demo, tmp_path, "nan2", workers=2, max_steps=3, drills=(Drill("nan", 2),),
                     overrides=["train.log_step=3"]))
    steps = records(tmp_path / "nan2", "step")
    drilled = next(r for r in steps if r["step"] == 2)
    assert drilled["skipped_0"] == 1 and drilled["skipped_1"] == 1  # a disagreement would have raised
    assert all(r["skipped_0"] == 0 and r["skipped_1"] == 0 for r in steps if r["step"] != 2)
    checksums = records(tmp_path / "nan2", "checkpoint")[-1]["param_checksums"]
    assert checksums[0] == checksums[1]
    state = final_state(tmp_path / "nan2")
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_resume_is_exact(prepared_demo, ray_local, tmp_path):
    run_training(job(prepared_demo, tmp_path, "straight", max_steps=4))
    run_training(job(prepared_demo, tmp_path, "split", max_steps=2))
    run_training(job(prepared_demo, tmp_path, "split", max_steps=4))
    straight, split = final_state(tmp_path / "straight"), final_state(tmp_path / "split")
    assert straight["progress"]["step"] == split["progress"]["step"] == 4
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, split["model"][name]), name
    # the resumed run's metrics hold one history: steps 1..4 once each
    assert [r["step"] for r in records(tmp_path / "split", "step")] == [1, 2, 3, 4]


def test_checkpoints_on_s3_and_resume_from_there(prepared_demo, ray_local, s3_uri):
    from vits_ray.storage import open_store

    run_training(job(prepared_demo, s3_uri, "s3run", max_steps=2))
    run_training(job(prepared_demo, s3_uri, "s3run", max_steps=3))
    run = open_store(s3_uri).child("s3run")
    keys = run.list()
    assert any(k.startswith("checkpoint_00000002/") for k in keys)
    assert any(k.startswith("checkpoint_00000003/") for k in keys)
    steps = [r["step"] for r in records(run.uri, "step")]
    assert steps == [1, 2, 3]
    assert run.exists("export/model.pth")


def test_bad_inputs_fail_before_workers_start(prepared_demo, s3_server, tmp_path):
    with pytest.raises(TrainSetupError, match="storage s3://no-such-bucket/runs is not usable"):
        run_training(job(prepared_demo, "s3://no-such-bucket/runs", "x"))
    with pytest.raises(TrainSetupError, match="cannot read the data"):
        run_training(job(tmp_path / "nowhere", tmp_path, "x"))
    with pytest.raises(TrainSetupError, match="fewer than the 64 workers"):
        run_training(job(prepared_demo, tmp_path, "x", workers=64))
    with pytest.raises(TrainSetupError, match="model.pth not found"):
        run_training(job(prepared_demo, tmp_path, "x", init_from=str(tmp_path / "no-checkpoint")))
    with pytest.raises(TrainSetupError, match="bad configuration"):
        run_training(TrainJob(config={"optim": {"lr_gen": 5.0}}, data_uri=str(prepared_demo),
                              storage_uri=str(tmp_path), name="x"))
    with pytest.raises(TrainSetupError, match="expected nan@STEP"):
        Drill.parse("boom@3")


def test_nan_drill_is_skipped_and_weights_stay_finite(prepared_demo, ray_local, tmp_path):
    run_training(job(prepared_demo, tmp_path, "nan", max_steps=5, drills=(Drill("nan", 3),)))
    steps = records(tmp_path / "nan", "step")
    drilled = next(r for r in steps if r["step"] == 3)
    assert drilled["skipped_0"] == 1 and drilled["skipped_1"] == 1
    assert all(r["skipped_1"] == 0 for r in steps if r["step"] != 3)
    state = final_state(tmp_path / "nan")
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    events = run_events(tmp_path / "nan")
    assert any(e["kind"] == "nonfinite" and e["step"] == 3 for e in events)


def _coqui_checkpoint_with_other_vocab(prepared_demo, folder: Path):
    """A checkpoint saved by Coqui's own code for a vocabulary that differs from the corpus's."""
    from trainer.io import save_checkpoint

    from vits_ray.data.shards import read_manifest
    from vits_ray.model import build_model, coqui_config
    from vits_ray.storage import open_store
    from vits_ray.text import Vocabulary

    cfg = load_config("tiny")
    vocab = Vocabulary.from_dict(read_manifest(open_store(str(prepared_demo)))["vocab"])
    # Drop three of the corpus's letters and add one it does not use.
    old_vocab = Vocabulary(characters="".join(sorted(set(vocab.characters[3:]) | {"ঋ"})),
                           punctuations=vocab.punctuations)
    old_model = build_model(cfg, old_vocab)
    with torch.no_grad():  # recognisable rows: row i holds the value i
        emb = old_model.text_encoder.emb.weight
        emb.copy_(torch.arange(emb.shape[0], dtype=emb.dtype)[:, None].expand_as(emb))
    folder.mkdir(parents=True, exist_ok=True)
    coqui_cfg = coqui_config(cfg, old_vocab)
    save_checkpoint(coqui_cfg, old_model, str(folder), current_step=845500, epoch=1342,
                    optimizer=old_model.get_optimizer())
    coqui_cfg.save_json(str(folder / "config.json"))
    return cfg, vocab, old_vocab, old_model, folder / "checkpoint_845500.pth"


def test_warm_start_copies_shared_characters_and_reports_the_rest(prepared_demo, tmp_path):
    from vits_ray.model import build_model, warm_start

    cfg, vocab, old_vocab, old_model, path = _coqui_checkpoint_with_other_vocab(prepared_demo, tmp_path / "coqui")
    model = build_model(cfg, vocab)
    fresh = model.text_encoder.emb.weight.detach().clone()
    report = warm_start(model, path, path.parent / "config.json")
    assert report.global_step == 845500 and report.epoch == 1342
    assert "text_encoder.emb.weight" in report.partially_loaded
    new_ids = {s: i for i, s in enumerate(model.tokenizer.characters.vocab)}
    old_ids = {s: i for i, s in enumerate(old_model.tokenizer.characters.vocab)}
    emb = model.text_encoder.emb.weight.detach()
    for symbol, i in new_ids.items():
        if symbol in old_ids:
            assert torch.all(emb[i] == old_ids[symbol]), symbol
        else:  # a character the checkpoint never saw keeps its initialisation
            assert torch.equal(emb[i], fresh[i]), symbol
    assert set(vocab.characters[:3]) - set(old_vocab.characters), "test needs characters the checkpoint lacks"
    # every other tensor came over unchanged
    old_state = old_model.state_dict()
    for name, tensor in model.state_dict().items():
        if name != "text_encoder.emb.weight":
            assert torch.equal(tensor, old_state[name]), name


def test_continuation_from_coqui_checkpoint_keeps_step_and_schedule(prepared_demo, ray_local, tmp_path):
    cfg, *_, path = _coqui_checkpoint_with_other_vocab(prepared_demo, tmp_path / "coqui")
    run_training(job(prepared_demo, tmp_path, "cont", max_steps=845502, init_from=str(path),
                     overrides=["train.keep_step=true"]))
    steps = records(tmp_path / "cont", "step")
    assert [r["step"] for r in steps] == [845501, 845502]
    assert math.isclose(steps[0]["lr_1"], 2e-4 * 0.999875 ** 1342, rel_tol=1e-9)
    events = run_events(tmp_path / "cont")
    warm = next(e for e in events if e["kind"] == "warm_start")
    assert "text_encoder.emb.weight" in warm["detail"]["partially_loaded"]


def test_spike_drill_rolls_back_and_backs_off(prepared_demo, ray_local, tmp_path):
    run_training(job(prepared_demo, tmp_path, "spike", max_steps=24, drills=(Drill("spike", 11),),
                     overrides=["train.save_step=10", "train.val_step=1000"]))
    run = tmp_path / "spike"
    events = run_events(run)
    kinds = [e["kind"] for e in events]
    assert "spike" in kinds and "rollback" in kinds and "lr_backoff" in kinds, kinds
    backoff = next(e for e in events if e["kind"] == "lr_backoff")
    assert backoff["detail"]["restored_step"] == 10  # the checkpoint before the drill
    steps = records(run, "step")
    before = [r["loss_1"] for r in steps if r["step"] <= 10]
    abandoned = [r for r in steps if r.get("rolled_back")]
    assert abandoned and min(r["step"] for r in abandoned) == 11  # the drilled timeline, kept and tagged
    after = [r for r in steps if r["step"] > 10 and not r.get("rolled_back")]
    # the run goes on past the rollback with a lower learning rate ...
    assert after and all(r["lr_1"] < 2e-4 for r in after)
    # ... and the loss returns to its level before the drill
    assert np.median([r["loss_1"] for r in after[-4:]]) < 1.3 * np.median(before)
    assert (run / "export" / "model.pth").exists()

    # the report shows the rollback and leaves the abandoned timeline out of its tables
    from vits_ray.report import write_report

    text = write_report(str(run), tmp_path / "report").read_text()
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert "rollback" in text
    kept = [r for r in records(run, "epoch") if not r.get("rolled_back")]
    assert report["summary"]["avg_loss_1"]["first"]["value"] == kept[0]["avg_loss_1"]
    assert any("abandoned by rollbacks" in w for w in report["warnings"])


def test_too_many_rollbacks_stop_the_run(prepared_demo, ray_local, tmp_path):
    with pytest.raises(Exception, match="rollbacks within"):
        run_training(job(prepared_demo, tmp_path, "loop", max_steps=30,
                         drills=(Drill("spike", 11), Drill("spike", 15)),
                         overrides=["train.save_step=10", "train.val_step=1000", "stability.max_rollbacks=1"]))


def test_local_mode_trains_the_same_weights_as_ray_and_resumes(prepared_demo, ray_local, tmp_path):
    overrides = ["train.save_step=2", "train.keep_last=1"]
    run_training(job(prepared_demo, tmp_path, "on-ray", max_steps=4, overrides=overrides))
    run_training(job(prepared_demo, tmp_path, "local", max_steps=2, overrides=overrides), local=True)
    # an interrupted checkpoint upload (no digest.json yet) is not taken for a checkpoint, and is removed
    (tmp_path / "local" / "checkpoint_00000003").mkdir()
    (tmp_path / "local" / "checkpoint_00000003" / "config.toml").write_text("torn")
    outcome = run_training(job(prepared_demo, tmp_path, "local", max_steps=4, overrides=overrides), local=True)
    assert outcome.step == 4
    on_ray, local = final_state(tmp_path / "on-ray"), final_state(tmp_path / "local")
    for name, tensor in on_ray["model"].items():
        assert torch.equal(tensor, local["model"][name]), name
    assert [r["step"] for r in records(tmp_path / "local", "step")] == [1, 2, 3, 4]
    kept = sorted(p.name for p in (tmp_path / "local").glob("checkpoint_*"))
    # keep_last=1 keeps the newest; the one resumed from stays until a newer one is known clean (a
    # rollback may have to go back past the newest); the torn folder is gone
    assert kept == ["checkpoint_00000002", "checkpoint_00000004"]
    assert (tmp_path / "local" / "export" / "model.pth").exists()
    with pytest.raises(TrainSetupError, match="--local runs one worker"):
        run_training(job(prepared_demo, tmp_path, "local2", workers=2), local=True)
