"""Inside the scaled-out loop: two real processes in a real gloo group running the real Trainer.

These tests reach into the loop (break its gradient sync, record what every collective receives),
which a Ray worker would not let them do; `tests/ranks.py` runs the same Trainer without Ray.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ranks import DirectorySession, run_ranks

pytestmark = pytest.mark.slow

COLLECTIVES = ("all_reduce", "all_gather_object", "broadcast", "all_gather", "all_gather_into_tensor",
               "reduce_scatter_tensor", "broadcast_object_list")


def _trainer(rank: int, world: int, shards: str, root: Path, steps: int, overrides=()):
    from vits_ray.config import load_config
    from vits_ray.train import TrainJob
    from vits_ray.trainer import Trainer

    cfg = load_config("tiny", ["train.batch_size=2", *overrides])
    job = TrainJob(config=cfg.to_dict(), data_uri=shards, storage_uri=str(root), name="run", workers=world,
                   max_steps=steps)
    return Trainer(job, rank, world, torch.device("cpu"), DirectorySession(root / "checkpoints", rank))


def _unsynchronised(rank: int, world: int, shards: str, root: Path) -> None:
    trainer = _trainer(rank, world, shards, root, steps=2)
    trainer.grad_syncs = (None, None)  # every rank keeps its own gradients
    trainer.run()


def test_broken_gradient_sync_is_caught_by_checksums(prepared_demo, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    failures = run_ranks(2, _unsynchronised, str(prepared_demo), tmp_path)
    assert failures and all("parameters differ across ranks at step 2" in tb for _, tb in failures), failures
    # the divergence was recorded, and never saved as a checkpoint
    from vits_ray.runlog import read_records
    from vits_ray.storage import open_store

    record = [r for r in read_records(open_store(str(tmp_path / "run")))[0] if r["kind"] == "checkpoint"][-1]
    assert record["param_checksums"][0] != record["param_checksums"][1]
    assert not list((tmp_path / "checkpoints").glob("checkpoint_*"))


def _recording_collectives(rank: int, world: int, shards: str, root: Path) -> None:
    import torch.distributed as dist

    seen: list[tuple[str, str]] = []

    def recorder(name, original):
        def call(*args, **kwargs):
            tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
            seen.extend((name, str(t.device)) for t in tensors)
            if not tensors:
                seen.append((name, "object"))
            return original(*args, **kwargs)
        return call

    for name in COLLECTIVES:
        setattr(dist, name, recorder(name, getattr(dist, name)))
    trainer = _trainer(rank, world, shards, root, steps=3,
                       overrides=["train.log_step=3", "train.val_step=3", "train.save_step=3"])
    trainer.run()
    (root / f"collectives-{rank}.json").write_text(json.dumps({"device": str(trainer.device), "seen": seen}))


def test_every_collective_gets_a_tensor_on_the_training_device(prepared_demo, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    assert run_ranks(2, _recording_collectives, str(prepared_demo), tmp_path) == []
    for rank in (0, 1):
        found = json.loads((tmp_path / f"collectives-{rank}.json").read_text())
        tensor_calls = [(name, device) for name, device in found["seen"] if device != "object"]
        # gradient buckets (2 optimizers x 3 steps), one packed metrics reduction, one validation
        assert len([n for n, _ in tensor_calls if n == "all_reduce"]) >= 2 * 3 + 2, tensor_calls
        assert {device for _, device in tensor_calls} == {found["device"]}, tensor_calls
        # pickled objects only at checkpoints (RNG states, checksums), never per step
        objects = [name for name, device in found["seen"] if device == "object"]
        assert len(objects) <= 4, objects


def _per_rank_seeds(rank: int, world: int, shards: str, root: Path) -> None:
    trainer = _trainer(rank, world, shards, root, steps=1)
    (root / f"draw-{rank}.json").write_text(json.dumps(torch.rand(4).tolist()))
    params = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
    (root / f"params-{rank}.json").write_text(json.dumps(params[:64].tolist()))


def test_ranks_start_from_identical_weights_with_their_own_randomness(prepared_demo, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    assert run_ranks(2, _per_rank_seeds, str(prepared_demo), tmp_path) == []
    read = lambda name: json.loads((tmp_path / name).read_text())  # noqa: E731
    assert read("params-0.json") == read("params-1.json")
    assert read("draw-0.json") != read("draw-1.json")


# --- GradientSync on its own: small modules, two real gloo ranks ------------------------------

def _sync_grads(rank: int, world: int, root: Path, compress: bool, precision: str = "fp32") -> None:
    from contextlib import nullcontext

    from vits_ray.distributed import Collectives, GradientSync

    def autocast():  # bf16 autocast: the gradients reach the sync from bf16 arithmetic
        return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    torch.manual_seed(0)
    layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(4))  # same weights on both ranks
    # Buckets of ~one layer; rank 1 never uses layer 2, so it has no gradient there.
    sync = GradientSync(list(layers.parameters()), Collectives(torch.device("cpu")), bucket_bytes=16 * 16 * 4,
                        compress_bf16=compress)
    torch.manual_seed(100 + rank)  # different data per rank
    x = torch.randn(8, 16)
    used = [0, 1, 2, 3] if rank == 0 else [3, 1, 0]  # another order, one layer missing
    with sync.overlapping():
        with autocast():
            loss = sum(layers[i](x).float().pow(2).sum() for i in used)
        loss.backward()
    sync.finish()
    local = {}
    torch.manual_seed(100 + rank)
    x = torch.randn(8, 16)
    for i in used:  # this rank's own gradients, recomputed without any sync
        layer = torch.nn.Linear(16, 16)
        layer.load_state_dict(layers[i].state_dict())
        with autocast():
            own = layer(x).float().pow(2).sum()
        own.backward()
        local[i] = layer.weight.grad.tolist()
    out = {"synced": {i: layers[i].weight.grad.tolist() for i in range(4)}, "local": local}
    (root / f"grads-{rank}.json").write_text(json.dumps(out))


@pytest.mark.parametrize("compress,precision", [(False, "fp32"), (True, "fp32"), (True, "bf16")])
def test_gradient_sync_averages_every_parameter_in_any_hook_order(tmp_path, compress, precision):
    assert run_ranks(2, _sync_grads, tmp_path, compress, precision) == []
    ranks = [json.loads((tmp_path / f"grads-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["synced"] == ranks[1]["synced"]  # identical on both ranks, bit for bit
    tolerance = 2e-2 if compress else 1e-6
    for i in ("0", "1", "2", "3"):
        # the average of both ranks' own gradients; a rank without one contributes zeros
        own = [torch.tensor(r["local"][i]) if i in r["local"] else torch.zeros(16, 16) for r in ranks]
        expected = (own[0] + own[1]) / 2
        synced = torch.tensor(ranks[0]["synced"][i])
        assert torch.allclose(synced, expected, rtol=tolerance, atol=tolerance * expected.abs().max()), i
