"""What a record is when it carries no `kind`: tables exported from elsewhere (one JSON object per
epoch or per step) name their fields like our records but leave out the tag.

The fields decide:
- quality: `mcd_dtw_db`;
- validation: a `val_loss_*` field;
- epoch: `epoch` with an `avg_loss_*` field, or `epoch` with `loss_*` fields and no `step` (a table
  of per-epoch losses); such `loss_*` fields are the epoch's averages and are read as `avg_loss_*`;
- step: `step` with `loss_*` fields.

Our own records each match exactly one shape. A record matching none, or more than one, is not
guessed at: the loader leaves it out and names it (file and line) in the report's warnings.
"""

from __future__ import annotations

from typing import Any

# Fields a per-step record names plainly and an epoch record names with `avg_` (KEY_METRICS' pairs).
_AVERAGED_PREFIXES = ("loss_", "grad_norm_")
_AVERAGED_NAMES = ("step_time", "loader_time")


def _is_loss(key: str) -> bool:
    return key.startswith("loss_")


def shapes_of(record: dict[str, Any]) -> list[str]:
    """Every record kind whose shape `record` has (see the module docstring), in a fixed order."""
    keys = record.keys()
    has_losses = any(_is_loss(k) for k in keys)
    shapes = []
    if "mcd_dtw_db" in record:
        shapes.append("quality")
    if any(k.startswith("val_loss_") for k in keys):
        shapes.append("val")
    if "epoch" in record and (any(k.startswith("avg_loss_") for k in keys) or (has_losses and "step" not in record)):
        shapes.append("epoch")
    if "step" in record and has_losses:
        shapes.append("step")
    return shapes


def as_epoch_record(record: dict[str, Any]) -> dict[str, Any]:
    """An epoch row's plainly named averages (`loss_1`) under our epoch names (`avg_loss_1`), so the
    analysis reads them like our own epoch records; a field already present under `avg_` wins."""
    out = dict(record)
    for key, value in record.items():
        averaged = key.startswith(_AVERAGED_PREFIXES) or key in _AVERAGED_NAMES
        if averaged and "avg_" + key not in record:
            out["avg_" + key] = out.pop(key)
    return {**out, "kind": "epoch"}


def describe_keys(record: dict[str, Any], limit: int = 6) -> str:
    """The record's field names, for a warning that must let the reader find the line."""
    keys = sorted(record)
    if not keys:
        return "no fields"
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} fields)" if len(keys) > limit else "")
