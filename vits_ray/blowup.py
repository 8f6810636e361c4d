"""Telling a numerical blow-up from a bug when Coqui's forward or backward raises.

A model whose weights blew up does not always return a NaN loss: Coqui's stochastic duration
predictor, for one, calls `torch.min` on an empty selection once its spline inputs are huge or
non-finite, and raises. Such an error is instability (roll back, back off), not a bug. Huge but
finite weights raise it too, so finiteness alone is not the test: `judge_blowup` weighs the size
of the weights and the losses of the last steps as well. The evidence is looked for only after an
exception, so it costs nothing on the steps that work. An error without evidence is a bug and
must still fail loudly.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def nonfinite_parameters(model: torch.nn.Module, limit: int = 3) -> list[str]:
    """Names of (up to `limit`) parameters holding NaN or inf."""
    found = []
    for name, param in model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            found.append(name)
            if len(found) >= limit:
                break
    return found


def first_nonfinite_activation(model: torch.nn.Module, forward: Callable[[], object]) -> str | None:
    """Run `forward` again (no gradients) with a hook on every module; the first module, in
    execution order, whose output holds NaN or inf. The forward may raise again: the hooks have
    seen what came before the failure."""
    names = {module: name for name, module in model.named_modules()}
    found: list[str] = []

    def check(module, _inputs, output) -> None:
        if found:
            return
        tensors = output if isinstance(output, (tuple, list)) else (output,)
        for tensor in tensors:
            if (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
                    and not bool(torch.isfinite(tensor).all())):
                found.append(names.get(module, type(module).__name__) or "model")
                return

    handles = [module.register_forward_hook(check) for module in names]
    try:
        with torch.no_grad():
            forward()
    except Exception:  # the failure being diagnosed; what the hooks saw before it is the answer
        pass
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def module_norms(model: torch.nn.Module) -> dict[str, float]:
    """The L2 norm of each top-level module's parameters (Coqui's Vits: text encoder, posterior
    encoder, flow, duration predictor, decoder, discriminator). Per module, because a blow-up
    starts in one of them and the discriminator holds half of the weights; not per tensor,
    because a bias that starts at zero has no size to jump from. One host sync."""
    names, norms = [], []
    for name, module in model.named_children():
        params = [p.detach() for p in module.parameters()]
        if params:
            names.append(name)
            norms.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(params)).float()))
    if not norms:
        return {}
    return dict(zip(names, torch.stack(norms).cpu().tolist()))


def largest_norm_jump(now: dict[str, float], reference: dict[str, float]) -> tuple[str, float] | None:
    """(module, now / reference) for the module whose norm grew the most; None without a common one."""
    ratios = [(name, now[name] / reference[name]) for name in now
              if name in reference and reference[name] > 0]
    return max(ratios, key=lambda r: r[1] if math.isfinite(r[1]) else math.inf) if ratios else None


def judge_blowup(model: torch.nn.Module, forward: Callable[[], object], *, reference_norms: dict[str, float],
                 norm_factor: float, recent_outliers: list[str]) -> str | None:
    """Why an exception from Coqui's forward counts as a numerical blow-up, or None (a bug).

    Instability, in the order checked (cheapest first), when any of these holds:
    - a parameter is non-finite;
    - a module's parameter norm is more than `norm_factor` times its norm at the last clean
      checkpoint (`reference_norms`, from `module_norms`): the weights blew up while staying finite;
    - the losses of the last few observed steps were outliers (`recent_outliers`, from the
      stability guard): the exception is the end of a spike the detector was still confirming;
    - a module's output is non-finite when `forward` (the pass that raised) is run again under hooks.
    Anything else, such as a batch of the wrong shape, is a bug and the caller re-raises it.
    """
    params = nonfinite_parameters(model)
    if params:
        return f"non-finite parameters ({', '.join(params)})"
    jump = largest_norm_jump(module_norms(model), reference_norms)
    if jump is not None and not jump[1] <= norm_factor:
        return (f"the parameter norm of {jump[0]} is {jump[1]:.3g}x its norm at the last clean checkpoint "
                f"(more than stability.blowup_norm_factor = {norm_factor:g})")
    if recent_outliers:
        return "outlier losses just before it (" + "; ".join(recent_outliers) + ")"
    module = first_nonfinite_activation(model, forward)
    if module is not None:
        return f"non-finite output of {module}"
    return None
