"""benchmarks/chains.py: plumbing and the lower-bound rules (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_chains", REPO / "benchmarks" / "chains.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def history(q: torch.Tensor) -> dict[str, torch.Tensor]:
    """(steps, chains) histories with the given charge, a noisy plaquette, all accepted."""
    gen = torch.Generator().manual_seed(0)
    return {"q": q, "plaquette": 0.9 + 0.01 * torch.randn(q.shape, generator=gen), "accepted": torch.ones(q.shape)}


def test_frozen_chains_give_a_lower_bound(bench):
    """No chain ever changes Q (a frozen HMC): tau_int is the chain length, flagged as a lower
    bound, and the error of <Q^2> is not measurable."""
    q = torch.tensor([0.0, 1.0, -1.0, 0.0]).expand(400, 4).clone()
    s = bench.stats(history(q))
    assert s["tau_int_q"] == 400 and s["tau_int_q_lower_bound"]
    assert s["q_sector_changes_per_chain"] == 0 and math.isnan(s["q2"]["error"])


def test_rare_changes_give_a_lower_bound_and_rounding_is_not_a_change(bench):
    """Chains that change sector once (window reaching half the chain) are a lower bound;
    rounding noise of the geometric charge does not count as a change."""
    q = torch.zeros(400, 4)
    q[200:, 0] = 1.0
    q[300:, 2] = -1.0
    q += 1e-9 * torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    s = bench.stats(history(q))
    assert s["tau_int_q_lower_bound"] and s["tau_int_q"] > 20
    assert s["q_sector_changes_per_chain"] == 0.5


def test_independent_charges_are_measured(bench):
    """Independent samples: tau_int near 1/2, not flagged."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randint(-2, 3, (2000, 4), generator=gen).double()
    s = bench.stats(history(q))
    assert not s["tau_int_q_lower_bound"] and abs(s["tau_int_q"] - 0.5) < 0.1


def test_sigma_from_exact(bench):
    st = {"plaquette": {"mean": 0.9, "error": 0.01}, "q2": {"mean": 0.3, "error": math.nan}}
    d = bench.sigma(st, {"plaquette": 0.92, "q2": 0.28})
    assert d["plaquette"] == pytest.approx(2.0) and d["q2"] == math.inf


@pytest.mark.slow
def test_benchmark_script_runs_in_miniature(tmp_path):
    """benchmarks/chains.py --json end to end on 4 x 4 (the keys of the issue's table), and
    again reusing the trained flow with --flow."""
    common = [
        sys.executable,
        str(REPO / "benchmarks" / "chains.py"),
        "--lattice",
        "4",
        "--betas",
        "2",
        "--chains",
        "4",
        "--thermalize",
        "3",
        "--tune-trajectories",
        "3",
        "--hmc-trajectories",
        "20",
        "--flow-steps",
        "20",
        "--flow-burn",
        "2",
        "--json",
    ]
    env = {"FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD": "1", "PATH": "", "OMP_NUM_THREADS": "1"}
    train = ["--train-set", "train.steps=3", "--train-set", "eval.samples=64", "--train-set", "flow.n_layers=2"]
    r = subprocess.run([*common, *train, "--runs", str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.strip().splitlines()[-1])
    keys = (
        "L beta hmc_seconds_per_independent_q flow_seconds_per_independent_q train_seconds ratio "
        "break_even_samples hmc_tau_int_q flow_tau_int_q hmc_tau_int_q_lower_bound flow_tau_int_q_lower_bound"
    )
    assert set(keys.split()) <= set(row)
    assert row["L"] == 4 and row["beta"] == 2.0 and row["hmc"]["acceptance"] >= 0.9
    for sampler in ("hmc", "flow"):
        assert set(row[sampler]["sigma_from_exact"]) == {"plaquette", "q2"}
    assert row["hmc"]["plaquette"]["error"] > 0  # a flow trained 3 steps may never accept: null
    run = tmp_path / "L4_beta2"
    r = subprocess.run([*common, "--flow", str(run)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    again = json.loads(r.stdout.strip().splitlines()[-1])
    assert again["flow"]["flow"] == str(run) and again["train_seconds"] == pytest.approx(row["train_seconds"])
