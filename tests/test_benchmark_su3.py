"""benchmarks/su3.py: plumbing, the lower-bound and ratio rules, the stout smearing (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

#: Keys every measured sampler's JSON line has (issue 14, item 5).
KEYS = (
    "sampler lattice beta seconds_per_step acceptance plaquette plaquette_err tau_int_plaquette tau_int_Q "
    "cost_per_independent_plaquette_s cost_per_independent_Q_s tau_int_plaquette_bound tau_int_Q_bound "
    "cost_per_independent_plaquette_bound cost_per_independent_Q_bound ratio_plaquette_vs_heatbath_or "
    "ratio_plaquette_bound ratio_Q_vs_heatbath_or ratio_Q_bound thermalisation_s burn_s Q_definition Q2"
).split()


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_su3", REPO / "benchmarks" / "su3.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass looks its module up while the module runs
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(spec.name, None)
        raise
    yield mod
    sys.modules.pop(spec.name, None)


def test_a_value_that_never_changes_is_a_lower_bound_of_the_chain_length(bench):
    """A flow chain that never accepts: tau_int = T, flagged, error not measurable."""
    v = torch.tensor([0.58, 0.59, 0.6]).expand(50, 3).clone()
    s = bench.autocorrelation(v)
    assert s["tau_int"] == 50 and s["bound"] and s["changes_per_chain"] == 0
    assert math.isnan(s["error"]) and "never changed" in s["reasons"][0]


def test_rare_changes_are_a_lower_bound(bench):
    """Values that change at a few steps per chain (a flow chain that rarely accepts) are flagged."""
    v = torch.zeros(200, 4)
    v[100:, 0] = 0.01
    v[150:, 1] = -0.02
    s = bench.autocorrelation(v)
    assert s["bound"] and s["changes_per_chain"] == 0.5


def test_independent_values_are_measured(bench):
    """Independent samples (seed 0, 4 x 2000): tau_int near 1/2, not flagged."""
    v = 0.6 + 0.01 * torch.randn(2000, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = bench.autocorrelation(v)
    assert not s["bound"] and abs(s["tau_int"] - 0.5) < 0.1 and s["error"] > 0


def test_integer_charges_use_the_sector_rules(bench):
    """With ``integer`` (a smoothed Q) rounding noise is not a change: a constant sector is frozen
    although the raw values change at every step."""
    q = 1e-6 * torch.randn(300, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    frozen = bench.autocorrelation(q, integer=True)
    assert frozen["bound"] and frozen["changes_per_chain"] == 0
    assert not bench.autocorrelation(q)["bound"]  # as a continuous value it decorrelates
    gen = torch.Generator().manual_seed(2)
    q = torch.randint(-1, 2, (2000, 4), generator=gen).double()
    moving = bench.autocorrelation(q, integer=True)
    assert not moving["bound"] and abs(moving["tau_int"] - 0.5) < 0.1


def test_ratios_to_heatbath_or_respect_bounds(bench):
    """Ratio = cost / heatbath-or's; '>=' when only the sampler's cost is a bound, '<=' when only
    the baseline's, undetermined (NaN, None) when both."""

    def row(name, cost, bound):
        return {
            "sampler": name,
            "cost_per_independent_plaquette_s": cost,
            "cost_per_independent_plaquette_bound": bound,
            "cost_per_independent_Q_s": cost,
            "cost_per_independent_Q_bound": False,
        }

    rows = [row("heatbath-or", 2.0, False), row("hmc", 6.0, False), row("independence-metropolis", 8.0, True)]
    bench.add_ratios(rows)
    assert rows[0]["ratio_plaquette_vs_heatbath_or"] == 1 and rows[0]["ratio_plaquette_bound"] == "="
    assert rows[1]["ratio_plaquette_vs_heatbath_or"] == 3 and rows[1]["ratio_plaquette_bound"] == "="
    assert rows[2]["ratio_plaquette_vs_heatbath_or"] == 4 and rows[2]["ratio_plaquette_bound"] == ">="
    assert rows[2]["ratio_Q_bound"] == "="
    rows = [row("heatbath-or", 2.0, True), row("hmc", 6.0, False), row("flow-hmc", 6.0, True)]
    bench.add_ratios(rows)
    assert rows[1]["ratio_plaquette_bound"] == "<=" and rows[1]["ratio_plaquette_vs_heatbath_or"] == 3
    assert rows[2]["ratio_plaquette_bound"] is None and math.isnan(rows[2]["ratio_plaquette_vs_heatbath_or"])
    rows = [row("hmc", 6.0, False)]  # no baseline in the run
    bench.add_ratios(rows)
    assert rows[0]["ratio_Q_bound"] is None and bench.finite_or_null(rows[0])["ratio_Q_vs_heatbath_or"] is None


def test_stout_smearing_stays_on_the_group_and_smooths(bench):
    """Stout steps keep SU(3) links unitary with det 1, leave the unit gauge alone, raise the
    plaquette of a rough configuration, and commute with a gauge transformation."""
    from flowplug.groups import haar_random
    from flowplug.plugins.observables import plaquette
    from flowplug.plugins.theories import WilsonGaugeAction

    act = WilsonGaugeAction(6.0, "su3")
    gen = torch.Generator().manual_seed(3)
    u = act.hot_start((2, 2, 2, 2), 2, generator=gen)
    s = bench.stout_smear(u, act, 0.1, 3)
    eye = torch.eye(3, dtype=u.dtype)
    assert torch.allclose(s @ s.mH, eye.expand_as(s), atol=1e-12)
    assert torch.allclose(torch.linalg.det(s), torch.ones(s.shape[:-2], dtype=u.dtype), atol=1e-12)
    assert bool((plaquette(s) > plaquette(u) + 0.05).all())
    one = act.cold_start((2, 2, 2, 2), 1)
    assert torch.allclose(bench.stout_smear(one, act, 0.1, 2), one)
    g = haar_random((2, 2, 2, 2, 2), 3, generator=gen)  # (B, L..., 3, 3)
    gauged = torch.stack([g @ u[:, mu] @ torch.roll(g, -1, dims=1 + mu).mH for mu in range(4)], dim=1)
    smeared = torch.stack([g @ s[:, mu] @ torch.roll(g, -1, dims=1 + mu).mH for mu in range(4)], dim=1)
    assert torch.allclose(bench.stout_smear(gauged, act, 0.1, 3), smeared, atol=1e-11)


def test_nonequilibrium_is_skipped_with_a_note_when_not_registered(bench, monkeypatch, capsys, one_thread):
    """A kernel registry without ``nonequilibrium`` (the plugin absent): a printed note and a
    ``skipped`` line; the other samplers run (in-process, heatbath-or on 2^4 only)."""
    import flowplug.manager as manager
    from flowplug.errors import UnknownComponentError

    real = manager.registry

    class WithoutNE:
        def __init__(self, reg):
            self.reg = reg

        def get(self, name):
            if str(name).strip().lower() in ("nonequilibrium", "snf", "jarzynski"):
                raise UnknownComponentError("Unknown kernel 'nonequilibrium'")
            return self.reg.get(name)

        def __getattr__(self, item):
            return getattr(self.reg, item)

        def __iter__(self):
            return iter(self.reg)

    monkeypatch.setattr(manager, "registry", lambda kind: WithoutNE(real(kind)) if kind == "kernel" else real(kind))
    rc = bench.main(["--quick", "--lattice", "2,2,2,2", "--samplers", "heatbath-or,nonequilibrium"])
    out = capsys.readouterr()
    assert rc == 0
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert [r["sampler"] for r in rows] == ["heatbath-or", "nonequilibrium"]
    assert "not registered" in rows[1]["skipped"] and set(rows[1]) == {"sampler", "skipped"}
    assert "skipping nonequilibrium" in out.err
    assert rows[0]["ratio_plaquette_vs_heatbath_or"] in (1.0, None)


def _positive(v):
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


@pytest.mark.slow
def test_quick_run_prints_a_json_line_per_sampler(tmp_path):
    """``benchmarks/su3.py --quick`` end to end on 2^4 with a 2-layer flow trained 1 step: one JSON
    line per sampler with the issue's keys; times, tau_int and costs finite and positive; the
    plaquette error measured wherever the chain moved (the untrained flow samplers may never accept)."""
    env = {"FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD": "1", "PATH": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "su3.py"), "--quick", "--lattice", "2,2,2,2"]
    r = subprocess.run([*cmd, "--runs", str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    names = [row["sampler"] for row in rows]
    assert names == ["heatbath-or", "hmc", "independence-metropolis", "nonequilibrium", "flow-hmc"]
    assert "P vs HB-OR" in r.stderr  # the readable table with the ratios
    for row in rows:
        assert "skipped" not in row, row  # every sampler is built in, nonequilibrium included
        assert set(KEYS) <= set(row), set(KEYS) - set(row)
        assert row["lattice"] == [2, 2, 2, 2] and row["beta"] == 6.0
        for k in ("seconds_per_step", "tau_int_plaquette", "tau_int_Q", "cost_per_independent_plaquette_s"):
            assert _positive(row[k]), (row["sampler"], k, row[k])
        assert _positive(row["cost_per_independent_Q_s"]) and row["thermalisation_s"] > 0
        assert 0 < row["plaquette"] <= 1 and 0 <= row["acceptance"] <= 1
        assert row["plaquette_err"] is None or _positive(row["plaquette_err"])
        if row["acceptance"] > 0.3:
            assert _positive(row["plaquette_err"])
        for obs in ("plaquette", "Q"):
            assert row[f"ratio_{obs}_bound"] in ("=", ">=", "<=", None)
            assert (row[f"ratio_{obs}_vs_heatbath_or"] is None) == (row[f"ratio_{obs}_bound"] is None)
        assert isinstance(row["tau_int_Q_bound"], bool) and isinstance(row["cost_per_independent_Q_bound"], bool)
    by = {row["sampler"]: row for row in rows}
    assert by["heatbath-or"]["acceptance"] == 1.0 and by["heatbath-or"]["overrelax_per_heatbath"] == 4
    assert by["hmc"]["kernel_table"]["hmc"]["integrator"] == "omelyan" and by["hmc"]["tuning_s"] > 0
    for name in ("independence-metropolis", "flow-hmc"):
        assert _positive(by[name]["training_job_s"]) and by[name]["train_steps"] == 1
    ne = by["nonequilibrium"]
    assert ne["protocol_updates_per_proposal"] == 2 and _positive(ne["protocol_s_per_proposal"])


def test_ne_protocol_quick_run_and_acceptance_from_works(one_thread):
    """benchmarks/ne_protocol.py: the quick run prints one JSON line per protocol with the work
    figures and the partial-work profile; the acceptance from works is the P_R-weighted mean of
    min(1, exp(W_i - W_j)) over j != i (hand-computed for three works)."""
    spec = importlib.util.spec_from_file_location("bench_ne", REPO / "benchmarks" / "ne_protocol.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    w = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    p = torch.softmax(-w, 0)
    a = [(math.exp(-1) + math.exp(-3)) / 2, (1 + math.exp(-2)) / 2, 1.0]
    assert mod.acceptance_from_works(w) == pytest.approx(float(sum(p[i] * a[i] for i in range(3))), rel=1e-12)
    # pairs: reverse works (-1, 0) against forward works (0, 2): mean of min(1, exp(W_R - W_F))
    acc, err = mod.acceptance_from_pairs(torch.tensor([-1.0, 0.0]), torch.tensor([0.0, 2.0]))
    per = [(math.exp(-1) + math.exp(-3)) / 2, (1 + math.exp(-2)) / 2]
    assert acc == pytest.approx(sum(per) / 2, rel=1e-12)
    assert err == pytest.approx(abs(per[0] - per[1]) / math.sqrt(2) / math.sqrt(2), rel=1e-12)
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "ne_protocol.py"), "--quick", "--profile", "--reverse", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr
    lines = [json.loads(t) for t in out.stdout.splitlines() if t.startswith("{")]
    assert [d["n_step"] for d in lines] == [4, 8]
    for d in lines:
        assert math.isfinite(d["work_mean"]) and d["work_std"] >= 0 and 0 <= d["acceptance_from_works"] <= 1
        assert len(d["work_var_profile"]) >= 4 and d["work_var_profile"][-1][0] == 6.0
        assert 0 <= d["acceptance_pairs"] <= 1 and math.isfinite(d["work_reverse_mean"])
