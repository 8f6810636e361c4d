"""One GAN step of Coqui's VITS: discriminator, then generator, on the same batch. No I/O.

Coqui's `Vits.train_step(batch, criterion, 0)` runs the generator forward pass and the
discriminator loss, caching the generator outputs on the model; `train_step(..., 1)` reuses that
cache for the generator losses. We call them in that order, each under autocast, and own what
Coqui's trainer would do around them: zeroing, (scaled) backward with the gradient all-reduce
overlapped, unscaling, clipping, the finite check and the optimizer step. The step's numbers stay
on the device: the loop reads them in batches, so a step costs no host sync of its own.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch

from vits_ray.config import ConfigError
from vits_ray.distributed import GradientSync

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
            return Precision(device_type, torch.bfloat16, False)  # fp32's range: nothing to scale
        if mode == "fp16":
            return Precision(device_type, torch.float16, True)
        raise ConfigError(f"train.mixed_precision: unknown mode {mode!r}; expected auto, fp16, bf16 or no")

    def grad_scaler(self, init_scale: float) -> torch.amp.GradScaler | None:
        """A fresh GradScaler for this device type (fp16), or None."""
        return torch.amp.GradScaler(self.device_type, init_scale=init_scale) if self.use_scaler else None

    def autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


# The values one step leaves on the device, packed in this order (`StepResult.values`).
# `failed` is 1 on a rank whose forward or backward raised (see `gan_step`).
STEP_VALUE_KEYS = ("loss_0", "loss_1", "loss_disc") + GEN_LOSS_KEYS + (
    "grad_norm_0", "grad_norm_1", "skipped_0", "skipped_1", "amp_scale", "failed")


@dataclass
class StepResult:
    """One step's numbers as a single device tensor (STEP_VALUE_KEYS): reading it is a host sync,
    so the loop collects many and reads them together. `error`: what the forward or backward
    raised on this rank (the step was then skipped on every rank), for the loop to judge."""

    values: torch.Tensor
    error: Exception | None = None

    def as_dict(self) -> dict[str, float]:
        return dict(zip(STEP_VALUE_KEYS, self.values.tolist()))


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _fill_missing_grads(params: Sequence[torch.nn.Parameter], value: float = 0.0) -> None:
    for p in params:
        if p.grad is None:
            p.grad = torch.full_like(p, value)


def _skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `step()` honours a `found_inf` tensor (the fused Adam/AdamW kernels do)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


class _Failures:
    """The first exception of a step's forward and backward passes. Once one raised, the rest of
    the step's computation is skipped, but not its collectives: the other ranks are waiting in them."""

    def __init__(self) -> None:
        self.error: Exception | None = None

    def run(self, compute):
        if self.error is not None:
            return None
        try:
            return compute()
        except Exception as err:  # judged by the loop: a blow-up is instability, anything else a bug
            self.error = err
            return None


def _optimize(loss: torch.Tensor | None, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              scaler: torch.amp.GradScaler | None, grad_clip: float,
              grad_sync: GradientSync | None, failures: _Failures) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward (overlapped with the gradient all-reduce), unscale, clip and step one optimizer.

    Returns (grad norm, skipped) as device tensors. The skip decision comes from the norm of the
    averaged gradients, which is identical on every rank, so every rank skips or steps together.
    A rank whose forward or backward failed contributes NaN gradients: every rank's averaged norm
    is then NaN, every rank skips this update (and its GradScaler backs off alike), and the
    collectives stay in step.
    """
    # Zero the whole model, not only this optimizer's parameters: the generator's backward also
    # fills the discriminator's gradients (feature matching), and those must not leak into the
    # next discriminator step.
    model.zero_grad(set_to_none=True)
    params = _optimizer_params(optimizer)
    # Entered even without a loss: it resets the sync for this step, whose collectives still run.
    with grad_sync.overlapping() if grad_sync is not None else nullcontext():
        if loss is not None:
            failures.run(lambda: (scaler.scale(loss) if scaler is not None else loss).backward())
    failed = failures.error is not None
    if grad_sync is not None:
        grad_sync.finish(missing=float("nan") if failed else 0.0)
    elif failed:
        for p in params:
            p.grad = torch.full_like(p, float("nan"))
    _fill_missing_grads(params)  # one worker, as many: a missing gradient is zero (after a sync, none is)
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    skipped = ~torch.isfinite(grad_norm)
    if scaler is not None:
        scaler.step(optimizer)  # skips by itself on inf/nan (on the device for fused optimizers)
    elif _skips_on_device(optimizer):
        optimizer.found_inf = skipped.float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not bool(skipped):  # a host sync, only for optimizers without a fused kernel
        optimizer.step()
    return grad_norm, skipped


def gan_step(model, criteria: Sequence[torch.nn.Module], optimizers: Sequence[torch.optim.Optimizer],
             scaler: torch.amp.GradScaler | None, batch: dict, precision: Precision,
             grad_clip: tuple[float, float],
             grad_syncs: tuple[GradientSync | None, GradientSync | None] = (None, None)) -> StepResult:
    """Discriminator then generator on one batch (already on the device and formatted).

    `model` is the bare Coqui `Vits` (not a DDP wrapper: gradients are averaged by `grad_syncs`,
    one per optimizer). Nothing here waits for the device, except GradScaler's own inf check for
    optimizers without a fused kernel. An exception from a forward or backward pass does not
    escape: the step is skipped on every rank and the exception comes back in the result.
    """
    model.train()
    failures = _Failures()

    def losses(index: int) -> dict | None:
        with precision.autocast():
            return failures.run(lambda: model.train_step(batch, criteria[index], index)[1])

    disc_losses = losses(0)
    grad_norm_0, skipped_0 = _optimize(disc_losses["loss"] if disc_losses else None, model, optimizers[0],
                                       scaler, grad_clip[0], grad_syncs[0], failures)
    gen_losses = losses(1)
    grad_norm_1, skipped_1 = _optimize(gen_losses["loss"] if gen_losses else None, model, optimizers[1],
                                       scaler, grad_clip[1], grad_syncs[1], failures)
    if scaler is not None:
        scale = scaler._get_scale_async().detach().clone()  # the scale this step used; get_scale() syncs
        scaler.update()
    else:
        scale = torch.ones((), device=grad_norm_0.device)
    model.model_outputs_cache = None  # free the generator activations before the next batch

    nan = torch.full((), float("nan"), device=grad_norm_0.device)
    if failures.error is not None:
        disc_losses = gen_losses = None
    disc = disc_losses or {}
    gen = gen_losses or {}
    parts = [disc.get("loss", nan), gen.get("loss", nan), disc.get("loss_disc", nan)]
    parts += [gen.get(k, nan) for k in GEN_LOSS_KEYS]
    parts += [grad_norm_0, grad_norm_1, skipped_0, skipped_1, scale,
              torch.full((), float(failures.error is not None), device=grad_norm_0.device)]
    values = torch.stack([p.detach().float().reshape(()) for p in parts])
    return StepResult(values, failures.error)


VAL_KEYS = ("val_loss_1",) + tuple(f"val_{key}" for key in GEN_LOSS_KEYS)


@torch.no_grad()
def eval_step(model, criteria: Sequence[torch.nn.Module], batch: dict, precision: Precision) -> torch.Tensor:
    """Generator losses on a batch without updating anything (validation), as one device tensor
    in VAL_KEYS order."""
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
    parts = [gen_losses["loss"]] + [gen_losses[key] for key in GEN_LOSS_KEYS]
    return torch.stack([p.detach().float().reshape(()) for p in parts])
