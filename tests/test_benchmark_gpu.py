"""benchmarks/gpu.py --device cpu --quick: every item measured, one JSON line each (no timing asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_runs_on_cpu_quick():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD": "1"}
    r = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--device", "cpu", "--quick", "--budget", "0.05"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["item"] for row in rows] == [
        "train_u1_multiscale",
        "train_su3_4d",
        "hmc_su3_4d",
        "flow_samples_u1",
        "ildg_read",
    ]
    for row in rows:
        assert row["device"] == "cpu" and row["value"] > 0 and row["ratio_device_over_cpu"] == 1.0
        assert row["unit"] in ("steps/s", "trajectories/s", "samples/s", "GB/s")
