"""A training checkpoint as a directory: everything needed to continue exactly.

`state.pt` holds both models (Coqui keeps generator and discriminator in one module), both
optimizers, the AMP scaler, counters, the data position, every rank's RNG states, the stability
guard and the best validation score; `config.toml` and `vocab.json` sit beside it for humans and tools.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "state.pt"


@dataclass
class Progress:
    """Counters that say where a run is. `batch_in_epoch` is the next batch to read."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    first_epoch: int = 0  # where this run began (a continued Coqui run starts at its epoch)
    best_val_loss_mel: float = float("inf")
    best_step: int = -1
    guard: dict[str, Any] = field(default_factory=dict)


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random generators: CPU, numpy, Python and the training GPU's (only that one,
    so the state restores on a node with fewer visible GPUs)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # also seeds every CUDA device
    np.random.seed(seed % 2**32)
    random.seed(seed)


class WorldSizeMismatchError(ValueError):
    """A checkpoint written by N workers is resumed by M != N workers."""


def capture(model, optimizers, scaler, progress: Progress, rng_states: list[dict[str, Any]]) -> dict[str, Any]:
    """The full training state, copied to CPU (safe to keep in memory while training goes on).

    `rng_states` holds every rank's generators in rank order (each rank restores its own).
    """
    def cpu(obj):
        if isinstance(obj, torch.Tensor):
            return obj.detach().cpu().clone()
        if isinstance(obj, dict):
            return {k: cpu(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [cpu(v) for v in obj]
        return obj

    return {
        "model": cpu(model.state_dict()),
        "optimizers": [cpu(o.state_dict()) for o in optimizers],
        "scaler": scaler.state_dict() if scaler is not None else None,
        "progress": asdict(progress),
        "rng": rng_states,
        "world_size": len(rng_states),
    }


def restore(state: dict[str, Any], model, optimizers, scaler, rank: int, world_size: int,
            device: torch.device) -> Progress:
    saved_world = int(state.get("world_size", 1))
    if saved_world != world_size:
        raise WorldSizeMismatchError(
            f"the checkpoint at step {state['progress']['step']} was written by {saved_world} worker(s) and this "
            f"run has {world_size}: each worker's data position and random state belong to its rank, so resume "
            f"with --workers {saved_world} (or start a new run with --init-from the export)")
    model.load_state_dict(state["model"])
    for optimizer, saved in zip(optimizers, state["optimizers"]):
        optimizer.load_state_dict(saved)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][rank], device)
    return Progress(**state["progress"])


def write(directory: Path, state: dict[str, Any], config_toml: str, vocab: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / STATE_FILE)
    (directory / "config.toml").write_text(config_toml, encoding="utf-8")
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, sort_keys=True), encoding="utf-8")


def read(directory: Path) -> dict[str, Any]:
    path = directory / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a vits-ray checkpoint (no {STATE_FILE})")
    return torch.load(path, map_location="cpu", weights_only=False)
