"""Per-step numbers held on the device until the loop needs them, then read in one go.

Reading a CUDA tensor on the host waits for all queued work, so a loop that logs every scalar
of every step pays ~15 syncs a step. Instead each step leaves one small tensor here; at a sync
point (a log step, a save, a validation, the end of an epoch) the pending steps are stacked with
the host-side counts, summed over ranks in one all-reduce, and copied to the host once.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from vits_ray.distributed import Collectives
from vits_ray.errors import NonRetryable
from vits_ray.step import STEP_VALUE_KEYS

# Host-side per-rank counts that are summed (not averaged) over ranks.
SUMMED_KEYS = ("batch_size", "audio_seconds", "utterances", "wrapped_utterances")
SKIP_KEYS = ("skipped_0", "skipped_1")


class SkipDisagreementError(NonRetryable, RuntimeError):
    """Ranks took different skip decisions at a step: their parameters are about to differ."""


class PendingSteps:
    def __init__(self) -> None:
        self._values: list[torch.Tensor] = []
        self._counts: list[list[float]] = []
        self._host: list[dict[str, Any]] = []

    def add(self, values: torch.Tensor, counts: dict[str, float], host: dict[str, Any]) -> None:
        """`values`: the step's device tensor (STEP_VALUE_KEYS); `counts`: SUMMED_KEYS of this
        rank; `host`: rank 0's view of the rest (step, epoch, learning rates, timings)."""
        self._values.append(values)
        self._counts.append([float(counts[k]) for k in SUMMED_KEYS])
        self._host.append({**host, "time": time.time()})

    def reduce(self, comm: Collectives) -> list[dict[str, Any]]:
        """The pending steps as records averaged over ranks (counts summed); clears the list."""
        if not self._values:
            return []
        counts = torch.tensor(self._counts, dtype=torch.float64).to(comm.device, non_blocking=True)
        packed = torch.cat([torch.stack(self._values).double(), counts], dim=1)
        totals = comm.all_reduce_sum(packed).cpu().tolist()
        world = comm.world_size
        records = []
        for host, row in zip(self._host, totals):
            values = dict(zip(STEP_VALUE_KEYS, row[: len(STEP_VALUE_KEYS)]))
            summed = dict(zip(SUMMED_KEYS, row[len(STEP_VALUE_KEYS):]))
            record = {"kind": "step", **host}
            for key, total in values.items():
                if key in SKIP_KEYS:
                    # Each rank contributes 0 or 1; anything but none or all means they disagreed.
                    if total not in (0.0, float(world)):
                        raise SkipDisagreementError(
                            f"step {host['step']}: {int(total)} of {world} ranks skipped the "
                            f"{'discriminator' if key == 'skipped_0' else 'generator'} update")
                    record[key] = int(total > 0)
                elif key == "failed":
                    record[key] = int(round(total))  # ranks whose forward or backward raised
                else:
                    record[key] = total / world
            record.update({k: (int(v) if k != "audio_seconds" else v) for k, v in summed.items()})
            records.append(record)
        self._values, self._counts, self._host = [], [], []
        return records
