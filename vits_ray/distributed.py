"""Collectives the loop needs, as no-ops on a single worker.

Coqui calls `train_step` on the bare module, which bypasses DistributedDataParallel's gradient
hooks; we average gradients explicitly after each backward instead, and prove it with parameter
checksums compared across ranks at every checkpoint.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """All-reduce the gradients of `params` (those that have one) and divide by the world size."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    # One flat buffer: one collective per optimizer step instead of one per tensor.
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset: offset + n].view_as(g))
        offset += n


def parameter_checksum(model: torch.nn.Module) -> str:
    """A digest of every parameter's bytes: equal on two ranks only if the weights are identical."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def gather(value: Any) -> list[Any]:
    if not is_distributed():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def broadcast(value: Any, src: int = 0) -> Any:
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class ParametersDivergedError(RuntimeError):
    pass


def check_checksums(checksums: list[str], step: int) -> None:
    if len(set(checksums)) > 1:
        listing = ", ".join(f"rank {r}: {c}" for r, c in enumerate(checksums))
        raise ParametersDivergedError(
            f"parameters differ across ranks at step {step} ({listing}): gradients are not being "
            "synchronised; stopping before the divergence is saved")
