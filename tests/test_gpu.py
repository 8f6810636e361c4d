"""The GPU paths: fp16 with the GradScaler, bf16, NCCL collectives, the reference 83M model.

Marked `gpu`: skipped on machines without CUDA (CI here has none); run them where a GPU is lent:
`pytest -m gpu tests/test_gpu.py`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

from ranks import DirectorySession

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def _run(prepared_demo, root: Path, precision: str, steps: int = 6, overrides=()):
    from vits_ray.config import load_config
    from vits_ray.train import TrainJob
    from vits_ray.trainer import Trainer

    cfg = load_config("tiny", ["train.batch_size=2", f"train.mixed_precision={precision}", "train.log_step=3",
                               *overrides])
    job = TrainJob(config=cfg.to_dict(), data_uri=str(prepared_demo), storage_uri=str(root), name="gpu",
                   max_steps=steps, use_gpu=True)
    (root / "checkpoints").mkdir(parents=True, exist_ok=True)
    trainer = Trainer(job, 0, 1, torch.device("cuda", 0), DirectorySession(root / "checkpoints", 0))
    trainer.run()
    trainer.close()
    from vits_ray.runlog import read_records
    from vits_ray.storage import open_store

    return trainer, read_records(open_store(str(root / "gpu")))[0]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_tiny_run_on_one_gpu(prepared_demo, tmp_path, precision):
    trainer, records = _run(prepared_demo, tmp_path, precision)
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert all(math.isfinite(r["loss_1"]) for r in steps if not r["skipped_1"])
    if precision == "fp16":
        # A fresh GradScaler (scale 65536) overflows until it has halved enough: each skipped step
        # halves the scale the next step uses, and a step that was not skipped leaves it be.
        assert trainer.scaler is not None
        for this, following in zip(steps, steps[1:]):
            skipped = this["skipped_0"] or this["skipped_1"]
            assert following["amp_scale"] == (this["amp_scale"] / 2 if skipped else this["amp_scale"]), steps
    else:
        assert trainer.scaler is None and all(r["amp_scale"] == 1.0 for r in steps)
        assert not any(r["skipped_0"] or r["skipped_1"] for r in steps)  # bf16 has fp32's range
    assert all(p.device.type == "cuda" for p in trainer.model.parameters())
    from vits_ray.checkpoint import read as read_checkpoint

    state = read_checkpoint(sorted((tmp_path / "checkpoints").glob("checkpoint_*"))[-1])
    assert "cuda" in state["rng"][0]  # only the training GPU's generator is saved


def test_nccl_collectives_on_one_gpu(tmp_path):
    """A one-rank NCCL group: the packed reduction and a gradient bucket run on the GPU."""
    import os

    import torch.distributed as dist

    from vits_ray.distributed import Collectives, GradientSync

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    dist.init_process_group("cpu:gloo,cuda:nccl", rank=0, world_size=1)
    try:
        device = torch.device("cuda", 0)
        comm = Collectives(device)
        comm.world_size = 2  # exercise the collectives although the group has one rank
        packed = comm.all_reduce_sum(torch.ones(3, device=device))
        assert packed.tolist() == [1.0, 1.0, 1.0]
        layer = torch.nn.Linear(8, 8).to(device)
        sync = GradientSync(list(layer.parameters()), comm, bucket_bytes=64)
        with sync.overlapping():
            layer(torch.ones(2, 8, device=device)).sum().backward()
        sync.finish()
        assert all(p.grad is not None for p in layer.parameters())
    finally:
        dist.destroy_process_group()


def _two_ranks_one_gpu(rank: int, world: int) -> None:
    from vits_ray.distributed import Collectives, GradientSync

    device = torch.device("cuda", 0)
    comm = Collectives(device)
    total = comm.all_reduce_sum(torch.full((3,), float(rank + 1), device=device))
    assert total.tolist() == [3.0, 3.0, 3.0], total
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 8).to(device)
    sync = GradientSync(list(layer.parameters()), comm, bucket_bytes=64)
    with sync.overlapping():
        (layer(torch.ones(2, 8, device=device)) * (rank + 1)).sum().backward()
    sync.finish()
    expected = torch.nn.Linear(8, 8).to(device)
    expected.load_state_dict(layer.state_dict())
    (expected(torch.ones(2, 8, device=device)) * 1.5).sum().backward()  # the mean of x1 and x2
    assert torch.allclose(layer.weight.grad, expected.weight.grad), rank


def test_nccl_group_of_two_processes_on_one_gpu():
    """Two ranks of a cpu:gloo,cuda:nccl group sharing one GPU, as the loop runs them. NCCL may
    refuse two ranks on one device ("Duplicate GPU detected"): then the one-rank test above is what
    this machine can check."""
    from ranks import run_ranks

    failures = run_ranks(2, _two_ranks_one_gpu, backend="cpu:gloo,cuda:nccl")
    if failures and any("Duplicate GPU" in trace for _, trace in failures):
        pytest.skip("NCCL refuses two ranks on one GPU here: " + failures[0][1].strip().splitlines()[-1])
    assert failures == []


def test_reference_model_step_on_one_gpu(prepared_demo):
    """The 83M reference recipe: one fp16 step fits and runs; prints s/step against a bare loop."""
    from vits_ray.config import load_config
    from vits_ray.data.reader import ShardReader
    from vits_ray.data.shards import read_manifest
    from vits_ray.model import build_model, build_optimizers, count_parameters
    from vits_ray.step import Precision, gan_step
    from vits_ray.storage import open_store
    from vits_ray.text import Vocabulary

    cfg = load_config("bn_bd_vits", ["train.batch_size=8"])
    store = open_store(str(prepared_demo))
    manifest = read_manifest(store)
    vocab = Vocabulary.from_dict(manifest["vocab"])
    model = build_model(cfg, vocab).cuda()
    assert count_parameters(model) > 60_000_000
    optimizers = build_optimizers(model, cfg)
    criteria = model.get_criterion()
    scaler = torch.amp.GradScaler("cuda")
    reader = ShardReader(store, manifest, "train", 0, 1, seed=0, batch_size=8, max_batch_seconds=120,
                         pad_id=vocab.pad_id)
    batch = next(iter(reader.iter_epoch(0)))
    formatted = model.format_batch_on_device(model.format_batch(batch.to_coqui("cuda")))
    precision = Precision.resolve("fp16", "cuda")
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        started = time.perf_counter()
        gan_step(model, criteria, optimizers, scaler, formatted, precision, (1000.0, 1000.0))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    print(f"reference recipe, fp16, batch {len(batch)}: {min(times[1:]):.3f} s/step (min of 4 after warm-up)")
    assert torch.isfinite(torch.cat([p.detach().reshape(-1) for p in model.parameters()])).all()
