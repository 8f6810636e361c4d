"""Telling a numerical blow-up from a bug when Coqui's forward or backward raises.

A model whose weights or activations went non-finite does not always return a NaN loss: Coqui's
stochastic duration predictor, for one, calls `torch.min` on an empty selection once its spline
inputs are non-finite, and raises. Such an error is instability (roll back, back off), not a bug.
The evidence is looked for only after an exception, so it costs nothing on the steps that work:
non-finite parameters, or a module whose output is non-finite when the failing forward is run
again under hooks. An error without that evidence is a bug and must still fail loudly.
"""

from __future__ import annotations

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


def diagnose_blowup(model: torch.nn.Module, forward: Callable[[], object]) -> str | None:
    """Why a failure counts as a numerical blow-up ("non-finite parameters ...", "non-finite
    output of <module>"), or None when nothing non-finite is to be found (a bug, not instability)."""
    params = nonfinite_parameters(model)
    if params:
        return f"non-finite parameters ({', '.join(params)})"
    module = first_nonfinite_activation(model, forward)
    if module is not None:
        return f"non-finite output of {module}"
    return None
