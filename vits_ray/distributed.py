"""Collectives the loop needs: gradient averaging overlapped with backward, packed reductions,
object gathers for checkpoints, and parameter checksums. No-ops on a single worker.

Coqui calls `train_step` on the bare module, which bypasses DistributedDataParallel's gradient
hooks. `GradientSync` does DDP's job for one optimizer instead: a hook on every parameter copies
its gradient into a bucket as soon as backward has accumulated it, and a full bucket is all-reduced
asynchronously while backward goes on. Parameter checksums compared across ranks at every
checkpoint prove that it works.

NCCL has no CPU backend: every tensor handed to a collective here must live on the training
device, and `Collectives` asserts it. Object collectives (pickles) run on the process group's CPU
side (`cpu:gloo,cuda:nccl` on GPUs) and only at checkpoints.
"""

from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

from vits_ray.errors import NonRetryable


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class Collectives:
    """The loop's collectives, bound to its training device; each is a no-op on one worker."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.world_size = dist.get_world_size() if is_distributed() else 1

    def _check_device(self, tensor: torch.Tensor) -> None:
        # The bug this catches: a tensor built without `device=` is on the CPU, which NCCL rejects.
        assert tensor.device.type == self.device.type and (
            self.device.index is None or tensor.device.index == self.device.index), (
            f"collective on a {tensor.device} tensor; the training device is {self.device}")

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns the tensor."""
        self._check_device(tensor)
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_objects(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank (pickled: checkpoint time only)."""
        if self.world_size == 1:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out


class GradientSync:
    """Averages one optimizer's gradients across ranks, overlapped with backward.

    Buckets hold parameters in reverse registration order (roughly the order backward produces
    their gradients) and are launched strictly in index order, so every rank issues the same
    collectives in the same order even when hooks fire in different orders. A parameter that got
    no gradient on a rank contributes zeros; after `finish()` every parameter has a gradient, the
    average over ranks, so all ranks step the same parameters.
    Gradients live in the bucket buffers (views), so the averages need no copy back.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], collectives: Collectives, *,
                 bucket_bytes: int = 25 * 2**20, compress_bf16: bool = False):
        self.params = [p for p in params if p.requires_grad]
        self.comm = collectives
        self.compress_bf16 = compress_bf16
        self.buckets = self._make_buckets(bucket_bytes)
        self._armed = False
        self._ready = [0] * len(self.buckets)
        self._filled: list[set[int]] = [set() for _ in self.buckets]
        self._next_launch = 0
        self._work: list[tuple[int, Any, torch.Tensor]] = []
        self.wait_seconds = 0.0  # time `finish()` waited for communication backward did not hide
        if self.comm.world_size > 1:
            for p in self.params:
                p.register_post_accumulate_grad_hook(self._on_grad)

    def _make_buckets(self, bucket_bytes: int) -> list[dict]:
        buckets, current, size = [], [], 0
        for p in reversed(self.params):
            self.comm._check_device(p)
            current.append(p)
            size += p.numel() * p.element_size()
            if size >= bucket_bytes:
                buckets.append(current)
                current, size = [], 0
        if current:
            buckets.append(current)
        self._where: dict[int, tuple[int, int, int]] = {}  # id(param) -> (bucket, index, offset)
        out = []
        for b, members in enumerate(buckets):
            offset = 0
            for i, p in enumerate(members):
                self._where[id(p)] = (b, i, offset)
                offset += p.numel()
            dtype = members[0].dtype
            assert all(p.dtype == dtype for p in members), "one gradient dtype per bucket"
            buffer = (torch.empty(offset, dtype=dtype, device=self.comm.device)
                      if self.comm.world_size > 1 else None)
            out.append({"params": members, "buffer": buffer})
        return out

    @contextmanager
    def overlapping(self) -> Iterator[None]:
        """Run this optimizer's backward inside: buckets are all-reduced as they fill."""
        self._armed = self.comm.world_size > 1
        self._ready = [0] * len(self.buckets)
        self._filled = [set() for _ in self.buckets]
        self._next_launch = 0
        self._work = []
        try:
            yield
        finally:
            self._armed = False

    def _on_grad(self, param: torch.Tensor) -> None:
        if not self._armed:  # e.g. the generator's backward also reaches the discriminator
            return
        b, i, offset = self._where[id(param)]
        view = self.buckets[b]["buffer"][offset: offset + param.numel()].view_as(param)
        # Divide on the way in (the all-reduce then sums averages) and let the gradient live in the
        # bucket from now on, as DDP's gradient_as_bucket_view does: no copy back after the wait.
        torch.div(param.grad, self.comm.world_size, out=view)
        param.grad = view
        self._filled[b].add(i)
        self._ready[b] += 1
        self._launch_ready()

    def _launch_ready(self) -> None:
        while (self._next_launch < len(self.buckets)
               and self._ready[self._next_launch] == len(self.buckets[self._next_launch]["params"])):
            self._launch(self._next_launch)

    def _launch(self, b: int) -> None:
        buffer = self.buckets[b]["buffer"]
        wire = buffer.to(torch.bfloat16) if self.compress_bf16 else buffer
        self.comm._check_device(wire)
        self._work.append((b, dist.all_reduce(wire, op=dist.ReduceOp.SUM, async_op=True), wire))
        self._next_launch += 1

    def finish(self, missing: float = 0.0) -> None:
        """After backward: launch what is left and wait. Every parameter's gradient is then the
        average over ranks, held in its bucket. A gradient this rank did not produce counts as
        `missing`: zero for a parameter the loss did not reach, NaN after a failed backward (so
        that every rank's average is NaN and every rank skips the update)."""
        if self.comm.world_size == 1:
            return  # nothing to average; the step fills missing gradients itself
        for b in range(self._next_launch, len(self.buckets)):
            bucket = self.buckets[b]
            for i, p in enumerate(bucket["params"]):
                if i not in self._filled[b]:  # no gradient on this rank
                    _, _, offset = self._where[id(p)]
                    view = bucket["buffer"][offset: offset + p.numel()].view_as(p)
                    view.fill_(missing)
                    p.grad = view
            self._launch(b)
        started = time.perf_counter()
        for b, work, wire in self._work:
            work.wait()
            if wire is not self.buckets[b]["buffer"]:  # compressed on the wire
                self.buckets[b]["buffer"].copy_(wire)
        self.wait_seconds = time.perf_counter() - started
        self._work = []


def state_checksum(model_state: dict[str, torch.Tensor]) -> str:
    """A digest of every tensor's bytes: equal on two ranks only if the weights are identical.

    Takes the CPU copy a checkpoint captures anyway, so hashing costs no extra device transfers.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model_state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())  # already on the CPU
    return digest.hexdigest()[:16]


class ParametersDivergedError(NonRetryable, RuntimeError):
    pass


def check_checksums(checksums: list[str], step: int) -> None:
    if len(set(checksums)) > 1:
        listing = ", ".join(f"rank {r}: {c}" for r, c in enumerate(checksums))
        raise ParametersDivergedError(
            f"parameters differ across ranks at step {step} ({listing}): gradients are not being "
            "synchronised; stopping before the divergence is saved")
