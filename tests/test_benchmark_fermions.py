"""benchmarks/fermions.py: plumbing, record layout and the lower-bound rules (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_fermions", REPO / "benchmarks" / "fermions.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_frozen_charge_gives_a_lower_bound(bench):
    q = torch.tensor([0.0, 1.0, -1.0]).expand(50, 3).clone()
    s = bench.observable_stats(q, charge=True)
    assert s["tau_int_lower_bound"] and s["tau_int"] == 50 and s["sector_changes_per_chain"] == 0
    assert s["error"] is None


def test_independent_samples_are_not_flagged(bench):
    g = torch.Generator().manual_seed(0)
    s = bench.observable_stats(torch.randn(400, 4, generator=g))
    assert not s["tau_int_lower_bound"] and 0.3 < s["tau_int"] < 0.8


def test_quick_run_prints_every_sampler_and_the_ratios(bench, capsys):
    argv = ["--quick", "--json"]
    a = bench.parse(argv)
    assert a.lattice == 4 and a.steps == 12
    a.chains, a.steps, a.segments, a.thermalize, a.train_steps, a.hmc_steps = 2, 4, 2, 2, 2, 2
    records = bench.run(a)
    assert [r.get("sampler") for r in records[:-1]] == list(bench.SAMPLERS)
    for r in records[:-1]:
        assert r["seconds_per_step"] > 0 and 0 <= r["acceptance"] <= 1
        for key in ("q2", "condensate"):
            assert r[key]["seconds_per_independent"] > 0 and isinstance(r[key]["tau_int_lower_bound"], bool)
    summary = records[-1]["summary"]
    assert summary["train_seconds"] > 0
    for name in bench.SAMPLERS[1:]:
        assert summary[f"ratio_bound_q2.{name}"] in ("=", ">=", "<=", "?")
    json.dumps(records)  # JSON lines


def test_quick_yukawa_run_prints_every_sampler_and_the_ratios(bench):
    a = bench.parse(["--model", "yukawa", "--quick", "--json", "--symmetrize"])
    assert a.model == "yukawa" and a.pf_model == "free" and a.lattice == 4 and a.symmetrize
    a.chains, a.steps, a.segments, a.thermalize, a.train_steps, a.hmc_steps = 2, 4, 2, 2, 2, 2
    records = bench.run(a)
    assert [r.get("sampler") for r in records[:-1]] == list(bench.SAMPLERS)
    for r in records[:-1]:
        assert r["model"] == "yukawa" and r["g"] == a.g and r["pseudofermion"] == "free" and r["symmetrize"]
        assert r["seconds_per_step"] > 0 and 0 <= r["acceptance"] <= 1
        for key in ("abs_magnetization", "condensate"):
            assert r[key]["seconds_per_independent"] > 0 and isinstance(r[key]["tau_int_lower_bound"], bool)
        assert "q2" not in r
    summary = records[-1]["summary"]
    for name in bench.SAMPLERS[1:]:
        assert summary[f"ratio_bound_abs_magnetization.{name}"] in ("=", ">=", "<=", "?")
    json.dumps(records)
