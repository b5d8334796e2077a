"""benchmarks/scaling.py end to end in its --quick setting (plumbing only; no timing is asserted)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "scaling.py"
ENV = {"FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD": "1", "PATH": "", "OMP_NUM_THREADS": "1"}


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, env=ENV)


@pytest.mark.slow
def test_scaling_benchmark_quick(tmp_path):
    out = tmp_path / "study"
    r = _run("--quick", "--out", str(out))
    assert r.returncode == 0, r.stderr
    with open(out / "scaling.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        header = reader.fieldnames
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import scaling
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert tuple(header) == scaling.COLUMNS
    # phi4 at L = 4, 6; u1 from scratch at L = 4, 8 and with transfer at L = 8 (from L = 4)
    assert [(row["series"], int(row["L"])) for row in rows] == [
        ("phi4", 4),
        ("phi4", 6),
        ("u1-scratch", 4),
        ("u1-scratch", 8),
        ("u1-transfer", 8),
    ]
    transfer = rows[-1]
    assert transfer["init_from_L"] == "4" and float(transfer["source_train_s"]) > 0
    for row in rows:
        assert 0 < float(row["ess"]) <= 1 and 0 <= float(row["acceptance"]) <= 1
        assert float(row["samples_per_s"]) > 0 and float(row["cost_indep_s_tau"]) > 0
        t = float(row["time_to_target_s"])  # nan when the target was not reached
        assert math.isnan(t) or 0 < t <= float(row["train_time_s"])
        assert (Path(row["run_dir"]) / "checkpoint.pt").exists()
    png = (out / "scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    fits = json.loads((out / "scaling_fits.json").read_text())
    assert set(fits) == {"phi4", "u1-scratch", "u1-transfer"}
    assert r.stdout.count(" L=") >= 5 and "power-law fits" in r.stdout
    # an OUT that holds a study is refused (never overwritten) without --force
    again = _run("--quick", "--out", str(out))
    assert again.returncode == 2 and "--force" in again.stderr
