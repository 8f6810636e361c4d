"""One GAN step of Coqui's VITS: discriminator, then generator, on the same batch. No I/O.

Coqui's `Vits.train_step(batch, criterion, 0)` runs the generator forward pass and the
discriminator loss, caching the generator outputs on the model; `train_step(..., 1)` reuses that
cache for the generator losses. We call them in that order, each under autocast, and own what
Coqui's trainer would do around them: zeroing, (scaled) backward, gradient sync across ranks,
unscaling, clipping, the finite check and the optimizer step.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

# Averages the gradients of these parameters across ranks, in place. None on a single worker.
GradSync = Callable[[Sequence[torch.nn.Parameter]], None]

GEN_LOSS_KEYS = ("loss_gen", "loss_kl", "loss_feat", "loss_mel", "loss_duration")


@dataclass(frozen=True)
class Precision:
    """How the step computes: autocast dtype (None: fp32) on a device type, and whether to scale."""

    device_type: str
    dtype: torch.dtype | None
    use_scaler: bool

    @staticmethod
    def resolve(mode: str, device_type: str) -> "Precision":
        if mode == "auto":
            mode = "fp16" if device_type == "cuda" else "no"
        if mode == "no":
            return Precision(device_type, None, False)
        if mode == "bf16":
            return Precision(device_type, torch.bfloat16, False)
        if device_type != "cuda":
            raise ValueError("train.mixed_precision: fp16 needs a GPU; use 'bf16' or 'no' on CPU")
        return Precision(device_type, torch.float16, True)

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


@dataclass
class StepResult:
    losses: dict[str, float]
    grad_norm_0: float
    grad_norm_1: float
    skipped_0: bool
    skipped_1: bool
    amp_scale: float


def _grads(params: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [p for p in params if p.grad is not None]


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _optimize(loss: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              scaler: torch.amp.GradScaler | None, grad_clip: float, grad_sync: GradSync | None) -> tuple[float, bool]:
    """Backward, sync, unscale, clip and step one optimizer. Returns (grad norm, skipped)."""
    # Zero the whole model, not only this optimizer's parameters: the generator's backward also
    # fills the discriminator's gradients (feature matching), and those must not leak into the
    # next discriminator step.
    model.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    params = _optimizer_params(optimizer)
    if grad_sync is not None:
        grad_sync(params)
    if scaler is not None:
        scaler.unscale_(optimizer)
    # Identical on every rank after the sync, so every rank takes the same skip decision.
    grad_norm = float(torch.nn.utils.clip_grad_norm_(_grads(params), grad_clip))
    finite = math.isfinite(grad_norm) and math.isfinite(float(loss.detach()))
    if scaler is not None:
        scaler.step(optimizer)  # skips by itself when it found inf/nan
    elif finite:
        optimizer.step()
    return grad_norm, not finite


def gan_step(model, criteria: Sequence[torch.nn.Module], optimizers: Sequence[torch.optim.Optimizer],
             scaler: torch.amp.GradScaler | None, batch: dict, precision: Precision,
             grad_clip: tuple[float, float], grad_sync: GradSync | None = None) -> StepResult:
    """Discriminator then generator on one batch (already on the device and formatted).

    `model` is the bare Coqui `Vits` (not a DDP wrapper: gradients are averaged by `grad_sync`).
    """
    model.train()
    with precision.autocast():
        _, disc_losses = model.train_step(batch, criteria[0], 0)
    grad_norm_0, skipped_0 = _optimize(disc_losses["loss"], model, optimizers[0], scaler, grad_clip[0], grad_sync)

    with precision.autocast():
        _, gen_losses = model.train_step(batch, criteria[1], 1)
    gen_loss = gen_losses["loss"]
    grad_norm_1, skipped_1 = _optimize(gen_loss, model, optimizers[1], scaler, grad_clip[1], grad_sync)
    if scaler is not None:
        skipped_0 = skipped_0 or not math.isfinite(grad_norm_0)
        skipped_1 = skipped_1 or not math.isfinite(grad_norm_1)
        scaler.update()
    model.model_outputs_cache = None  # free the generator activations before the next batch

    losses = {"loss_0": float(disc_losses["loss"].detach()), "loss_1": float(gen_loss.detach()),
              "loss_disc": float(disc_losses["loss_disc"].detach())}
    losses.update({key: float(gen_losses[key].detach()) for key in GEN_LOSS_KEYS})
    return StepResult(losses=losses, grad_norm_0=grad_norm_0, grad_norm_1=grad_norm_1,
                      skipped_0=skipped_0, skipped_1=skipped_1,
                      amp_scale=float(scaler.get_scale()) if scaler is not None else 1.0)


@torch.no_grad()
def eval_step(model, criteria: Sequence[torch.nn.Module], batch: dict, precision: Precision) -> dict[str, float]:
    """Generator losses on a batch without updating anything (validation)."""
    was_training = model.training
    # Coqui's train_step is the only path that computes the losses; eval mode turns off dropout.
    model.eval()
    try:
        with precision.autocast():
            model.train_step(batch, criteria[0], 0)
            _, gen_losses = model.train_step(batch, criteria[1], 1)
    finally:
        model.model_outputs_cache = None
        model.train(was_training)
    out = {"val_loss_1": float(gen_losses["loss"])}
    out.update({f"val_{key}": float(gen_losses[key]) for key in GEN_LOSS_KEYS})
    return out
