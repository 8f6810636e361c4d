"""A training checkpoint as a directory: everything needed to continue exactly, and nothing that
runs code when it is read.

`state.pt` holds both models (Coqui keeps generator and discriminator in one module), both
optimizers, the AMP scaler, counters, the data position, every rank's RNG states, the stability
guard and the best validation score; `config.toml` and `vocab.json` sit beside it for humans and
tools; `meta.json` says what the checkpoint is to the rollback rules (its step, its generation
and the stability guard's verdict: see `rollbacks`), small enough to read before choosing which
checkpoint to download; `digest.json`, written last, gives every other file's size and SHA-256.

Two different guarantees, two different mechanisms:
- Integrity (a truncated upload, a flipped bit): `verify` checks the digest before anything is read.
- Safety (whoever can write the storage prefix, or hands us an --init-from file, must not be able to
  run code on the workers): everything is read with `torch.load(weights_only=True)`, which
  only rebuilds tensors and plain data. A digest proves nothing about who wrote a file, so a
  checkpoint that verifies is still loaded this way. The state therefore holds only tensors, dicts,
  lists, tuples, str, int, float, bool and None: `check_plain` enforces it when writing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
import random
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterable

import numpy as np
import torch

from vits_ray.errors import NonRetryable

STATE_FILE = "state.pt"
DIGEST_FILE = "digest.json"
# What the rollback rules need without reading the state: step, generation, the guard's verdict.
META_FILE = "meta.json"
DIGEST_FORMAT = 1


# All three come back unchanged on a relaunch from the same checkpoint: not worth a retry.

class CorruptCheckpointError(NonRetryable, ValueError):
    """A checkpoint whose files are missing, truncated or altered since they were written."""


class UnsafeCheckpointError(NonRetryable, ValueError):
    """A file that only loads by unpickling arbitrary objects, i.e. by running code we did not write."""


class WorldSizeMismatchError(NonRetryable, ValueError):
    """A checkpoint written by N workers is resumed by M != N workers."""


# What `Progress.health` counts; every report to Ray carries them, a sweep's score penalises them.
HEALTH_COUNTS = ("spikes", "rollbacks", "nonfinite_steps", "blowups")


@dataclass
class Progress:
    """Counters that say where a run is. `batch_in_epoch` is the next batch to read."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    first_epoch: int = 0  # where this run began (a continued Coqui run starts at its epoch)
    best_val_loss_mel: float = float("inf")
    # With eval.every_steps, the best model is the one with the lowest training-time MCD.
    best_mcd_dtw_db: float = float("inf")
    best_step: int = -1
    guard: dict[str, Any] = field(default_factory=dict)
    # How unstable the run has been, a count per HEALTH_COUNTS key (kept through rollbacks: they
    # describe the whole run, e.g. for a sweep's instability-aware score).
    health: dict[str, int] = field(default_factory=dict)
    # The latest validations' mel losses (a sweep's score is their mean: `tune.score_validations`).
    val_history: list[float] = field(default_factory=list)
    # A sweep trial's stability margin probes so far (`Trainer.probe_margin`): probes, failures,
    # the latest loss rise, the worst one and the first failure's cause.
    margin: dict[str, Any] = field(default_factory=dict)


# --- random generators --------------------------------------------------------------------

def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random generators: CPU, numpy, Python and the training GPU's (only that one,
    so the state restores on a node with fewer visible GPUs).

    numpy's and Python's states become tensors and plain numbers: `torch.load(weights_only=True)`
    refuses numpy arrays, and allowlisting numpy's array reconstruction would reopen the door
    weights_only closes.
    """
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        # MT19937's 624 uint32 keys; int64 holds every uint32 exactly
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": int(version), "internal": [int(x) for x in internal],
                   "gauss_next": None if gauss_next is None else float(gauss_next)},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # also seeds every CUDA device
    np.random.seed(seed % 2**32)
    random.seed(seed)


# --- the state ----------------------------------------------------------------------------

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
    model.load_state_dict(state["model"])  # copies into the parameters
    for optimizer, saved in zip(optimizers, state["optimizers"]):
        # A copy: on the same device, load_state_dict keeps the given tensors as the optimizer's own
        # moments, and the next steps would update `state` in place. A state held in memory (the
        # last trusted one a rollback returns to, the margin probe's) must survive being restored.
        optimizer.load_state_dict(copy.deepcopy(saved))
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][rank], device)
    return Progress(**copy.deepcopy(state["progress"]))


def training_state_digest(state: dict[str, Any]) -> str:
    """A digest of what training continues from: weights, optimizer moments, GradScaler, every
    rank's random generators and the data position. Equal digests: the same next step."""
    digest = hashlib.sha256()

    def walk(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            digest.update(str(obj.dtype).encode() + str(tuple(obj.shape)).encode())
            digest.update(obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            for key in sorted(obj, key=str):
                digest.update(str(key).encode())
                walk(obj[key])
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                walk(item)
        else:
            digest.update(repr(obj).encode())

    progress = state["progress"]
    walk([state["model"], state["optimizers"], state.get("scaler"), state["rng"],
          [progress["step"], progress["epoch"], progress["batch_in_epoch"]]])
    return digest.hexdigest()[:16]


# Exactly these types (not subclasses: numpy.float64 is a float, and pickles as a numpy scalar).
_PLAIN_TYPES = (str, int, float, bool, type(None))


def check_plain(obj: Any, where: str = "state") -> None:
    """Raise TypeError, naming the first offending entry, unless `obj` loads with weights_only=True.

    Checked at write time: a checkpoint that cannot be read back is found at the first save, not
    at the resume that needed it. About a thousand entries at the reference scale: microseconds.
    """
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN_TYPES:
        return
    if type(obj) in (dict, OrderedDict):
        for key, value in obj.items():
            if type(key) not in _PLAIN_TYPES:
                raise TypeError(f"{where}: key {key!r} of type {type(key).__name__} would not load with "
                                "torch.load(weights_only=True)")
            check_plain(value, f"{where}.{key}")
        return
    if type(obj) in (list, tuple):
        for i, value in enumerate(obj):
            check_plain(value, f"{where}[{i}]")
        return
    raise TypeError(f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} would not load with "
                    "torch.load(weights_only=True); store it as tensors or plain Python data")


# --- safe loading -------------------------------------------------------------------------

def _refusal_reason(message: str) -> str:
    """The specific part of torch's long 'Weights only load failed' message."""
    found = re.search(r"GLOBAL (\S+)", message)
    if found:
        return f"it references {found.group(1)}"
    found = re.search(r"Unsupported operand \d+", message)
    if found:
        return f"{found.group(0).lower()} (a pickle beyond tensors and plain data, or not a torch file)"
    return message.strip().splitlines()[-1] if message.strip() else "unknown reason"


def safe_load(path: Path) -> Any:
    """`torch.load` of tensors and plain data only, onto the CPU.

    UnsafeCheckpointError when the file would need arbitrary objects (code) to load;
    CorruptCheckpointError when it is not a readable torch file at all.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise CorruptCheckpointError(f"{path}: not a readable torch checkpoint ({err})") from err
        raise UnsafeCheckpointError(
            f"{path}: refusing to load it: it would need arbitrary code to load ({_refusal_reason(str(err))}). "
            "vits-ray reads checkpoints with torch.load(weights_only=True), which rebuilds only tensors and "
            "plain data; a file that needs more was not written by this vits-ray or by Coqui's trainer, or was altered"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise CorruptCheckpointError(f"{path}: not a readable torch checkpoint ({err})") from err


# --- digests ------------------------------------------------------------------------------

class _HashingWriter:
    """A write-only file that hashes what goes through it, so `state.pt` is never read back to be
    digested. torch.save writes its zip archive strictly in order, so the bytes hashed are the
    bytes on disk. SHA-256 costs about 0.5 s of rank 0's CPU per GB (~1 GB at the reference scale
    with Adam moments), on top of torch.save itself; hashing on the way out saves re-reading the file."""

    def __init__(self, file: BinaryIO):
        self.file, self.sha256, self.bytes = file, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    def entry(self) -> dict[str, Any]:
        return {"sha256": self.sha256.hexdigest(), "bytes": self.bytes}


def _write_hashed(path: Path, write) -> dict[str, Any]:
    with open(path, "wb") as file:
        writer = _HashingWriter(file)
        write(writer)
    return writer.entry()


def _file_entry(path: Path) -> dict[str, Any]:
    sha256 = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            sha256.update(block)
    return {"sha256": sha256.hexdigest(), "bytes": path.stat().st_size}


def is_complete(names: Iterable[str]) -> bool:
    """Whether a listing of a checkpoint folder (names relative to it) shows a finished checkpoint:
    the digest is written (and uploaded) last, so without it the rest may be partial."""
    return DIGEST_FILE in set(names)


def complete_folders(keys: Iterable[str]) -> list[str]:
    """The folders, sorted, of a store listing (`folder/file` keys) that hold a finished checkpoint."""
    return sorted({key.split("/")[0] for key in keys if key.count("/") == 1 and key.endswith("/" + DIGEST_FILE)})


def verify(directory: Path) -> None:
    """CorruptCheckpointError unless every file named in `digest.json` has its size and SHA-256.

    Files the digest does not name are ignored (a session may add its own); nothing is read from them.
    """
    digest_path = directory / DIGEST_FILE
    if not digest_path.exists():
        legacy = (" or a checkpoint written before vits-ray wrote digests: those hold numpy random states "
                  "that only load by running arbitrary code, so they cannot be resumed; start a new run with "
                  "--init-from the run's best/ or export/ model" if (directory / STATE_FILE).exists() else "")
        raise CorruptCheckpointError(f"{directory}: no {DIGEST_FILE} (an interrupted upload?{legacy})")
    try:
        digest = json.loads(digest_path.read_text(encoding="utf-8"))
        files = digest["files"]
        fmt = digest["format"]
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptCheckpointError(f"{directory}: {DIGEST_FILE} is unreadable ({err!r})") from None
    if fmt != DIGEST_FORMAT:
        raise CorruptCheckpointError(f"{directory}: {DIGEST_FILE} has format {fmt!r}, this version reads "
                                     f"{DIGEST_FORMAT}")
    problems = [] if STATE_FILE in files else [f"{DIGEST_FILE} does not list {STATE_FILE}"]
    for name, expected in sorted(files.items()):
        # Only plain names in this folder: a digest must not make us read elsewhere.
        if Path(name).name != name or name in ("", ".", ".."):
            problems.append(f"{name!r} is not a file name in this folder")
            continue
        path = directory / name
        if not path.is_file():
            problems.append(f"missing file {name}")
            continue
        size = path.stat().st_size
        if size != expected["bytes"]:
            how = "truncated" if size < expected["bytes"] else "longer than written"
            problems.append(f"{name}: {size} bytes, expected {expected['bytes']} ({how})")
        elif _file_entry(path)["sha256"] != expected["sha256"]:
            problems.append(f"{name}: sha256 mismatch (altered or corrupted since it was written)")
    if problems:
        raise CorruptCheckpointError(f"{directory}: " + "; ".join(problems))


# --- the folder ---------------------------------------------------------------------------

def write(directory: Path, state: dict[str, Any], config_toml: str, vocab: dict,
          meta: dict[str, Any] | None = None) -> None:
    """Write the checkpoint's files, then `digest.json` covering every other file in `directory`."""
    check_plain(state)
    directory.mkdir(parents=True, exist_ok=True)
    entries = {STATE_FILE: _write_hashed(directory / STATE_FILE, lambda f: torch.save(state, f))}
    texts = {"config.toml": config_toml, "vocab.json": json.dumps(vocab, ensure_ascii=False, sort_keys=True)}
    if meta is not None:
        texts[META_FILE] = json.dumps(meta, sort_keys=True, allow_nan=False)
    for name, text in texts.items():
        data = text.encode("utf-8")
        entries[name] = _write_hashed(directory / name, lambda f: f.write(data))
    for path in sorted(directory.iterdir()):  # anything a caller put there before
        if path.is_file() and path.name not in entries and path.name != DIGEST_FILE:
            entries[path.name] = _file_entry(path)
    digest = {"format": DIGEST_FORMAT, "files": entries}
    (directory / DIGEST_FILE).write_text(json.dumps(digest, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def parse_meta(data: bytes | None, where: str) -> dict[str, Any]:
    """A checkpoint's `meta.json` (None: a checkpoint written before there was one)."""
    if data is None:
        return {}
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise CorruptCheckpointError(f"{where}: {META_FILE} is unreadable ({err})") from None
    if not isinstance(meta, dict):
        raise CorruptCheckpointError(f"{where}: {META_FILE} is not a JSON object")
    return meta


def read(directory: Path) -> dict[str, Any]:
    """The state of a verified checkpoint folder, loaded as tensors and plain data only."""
    path = directory / STATE_FILE
    if not path.exists() and not (directory / DIGEST_FILE).exists():
        raise FileNotFoundError(f"{path}: not a vits-ray checkpoint (no {STATE_FILE})")
    verify(directory)
    state = safe_load(path)  # verified, yet still weights_only: a digest says nothing of who wrote it
    if not isinstance(state, dict) or not {"model", "optimizers", "progress", "rng"} <= set(state):
        raise CorruptCheckpointError(f"{path}: not a vits-ray training state")
    return state
