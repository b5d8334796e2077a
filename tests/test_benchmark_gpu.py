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


def _gpu_py(*args: str) -> subprocess.CompletedProcess:
    """benchmarks/gpu.py with ``args`` in a subprocess (one thread, no plugin autoload)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD": "1"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_gpu_benchmark_reports_a_failing_item_and_measures_the_rest():
    """An item that raises gives a row with ``error``; the others are still measured; exit status 1.
    Provoked with a device torch cannot use on this machine (cuda where there is none)."""
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("provokes failures with a CUDA device that is absent")
    args = ["--quick", "--budget", "0.05", "--items", "hmc_su3_4d,ildg_read"]
    r = _gpu_py("--device", "cuda", *args)
    assert r.returncode == 1 and "failed: hmc_su3_4d, ildg_read" in r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["item"] for row in rows] == ["hmc_su3_4d", "ildg_read"]
    assert all(row["error"] and "value" not in row for row in rows)
    ok = _gpu_py("--device", "cpu", *args)
    assert ok.returncode == 0 and [json.loads(x)["item"] for x in ok.stdout.splitlines()] == ["hmc_su3_4d", "ildg_read"]


def test_gpu_benchmark_refuses_an_unknown_item_name():
    """A typo in --items must not cost a GPU call that measures nothing."""
    r = _gpu_py("--device", "cpu", "--quick", "--items", "hmc_su3")
    assert r.returncode == 2 and "unknown hmc_su3" in r.stderr and not r.stdout
