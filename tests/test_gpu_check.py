"""`bench/gpu_check.sh` dry-runs on the CPU: the one-shot GPU check cannot rot while no GPU is lent."""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_check_prints_its_table_on_the_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    done = subprocess.run([str(ROOT / "bench" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "gpu_check.md").read_text()
    assert table == done.stdout  # what it printed is what it brings back
    rows = {cells[2]: cells for cells in (line.split("|") for line in table.splitlines())
            if len(cells) > 3 and cells[1].strip() == "cpu"}
    assert set(rows) == {" fp16 ", " bf16 "}, table
    for cells in rows.values():
        ours, bare, ratio = (float(cells[i]) for i in (3, 4, 5))
        assert ours > 0 and bare > 0 and math.isclose(ratio, ours / bare, rel_tol=0.02)
        assert cells[9].strip() == "n/a"  # no peak to divide by on a CPU
    # fp16 really ran with a GradScaler: the fresh scale (65536) overflowed; bf16 never skips
    assert int(rows[" fp16 "][6]) >= 1 and int(rows[" bf16 "][6]) == 0
    assert "TFLOP per step" in table and "(RSS)" in table
