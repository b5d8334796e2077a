"""The demo's report: its freezing verdict and comparison text, and its figure.

flowplug.jobs.demo.topology_freezing on synthetic Q histories (constant Q, rare changes,
a well-mixing chain, a biased one); compare_samplers / comparison_lines with a frozen HMC
history: "FROZEN", lower bounds (">=") for its tau_int(Q), its cost and the HMC/flow
ratio, never a finite measured win. The comparison figure
(flowplug.jobs.report.comparison_figure), checked on the matplotlib objects with made-up
estimates: physics names on the axes (<Q^2>, not "q2"), 1-sigma error bars said so,
tau_int on a linear axis from zero with each sampler's step unit, separate Q-history
panels for HMC trajectories and flow proposals, the cost per independent sample of Q,
and a frozen sampler's bars hatched and marked ">=".
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from flowplug.jobs.demo import (
    MIN_TOPOLOGY_CHANGES,
    compare_samplers,
    comparison_lines,
    ratio_bound,
    topology_freezing,
)
from flowplug.jobs.report import COMPARISON_CAPTION, comparison_figure, comparison_report

ROWS = [
    {
        "label": "HMC",
        "step": "trajectory",
        "plaquette": {"mean": 0.698, "error": 0.001},
        "q2": {"mean": 1.21, "error": 0.05},
        "q": {"mean": 0.01, "error": 0.05, "tau_int": 12.0, "tau_int_error": 2.0},
        "seconds_per_independent_q": 0.02,
    },
    {
        "label": "flow Metropolis",
        "step": "proposal",
        "plaquette": {"mean": 0.697, "error": 0.001},
        "q2": {"mean": 1.25, "error": 0.04},
        "q": {"mean": -0.02, "error": 0.04, "tau_int": 2.5, "tau_int_error": 0.3},
        "seconds_per_independent_q": 0.005,
    },
]
EXACT = {"plaquette": 0.697775, "q2": 1.239299}
HISTORIES = {
    "HMC": np.round(np.random.default_rng(1).normal(0, 1, 50)),
    "flow Metropolis": np.round(np.random.default_rng(2).normal(0, 1, 50)),
}


@pytest.fixture
def fig():
    import matplotlib.pyplot as plt

    f = comparison_figure(ROWS, EXACT, HISTORIES, title="test")
    yield f
    plt.close(f)


def _texts(fig):
    out = [t.get_text() for t in fig.texts]
    for ax in fig.axes:
        out += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        out += [t.get_text() for t in ax.get_xticklabels()]
        legend = ax.get_legend()
        if legend is not None:
            out += [t.get_text() for t in legend.get_texts()]
    return out


def test_axes_carry_physics_names_and_units(fig):
    ylabels = [ax.get_ylabel() for ax in fig.axes]
    assert any(r"\langle Q^2\rangle" in y for y in ylabels)
    assert any(r"\langle P\rangle" in y and "dimensionless" in y for y in ylabels)
    assert not any(t.strip() in ("q2", "plaquette", "q") for t in _texts(fig))


def test_error_bars_are_said_to_be_one_sigma(fig):
    legends = [t for ax in fig.axes if ax.get_legend() for t in (x.get_text() for x in ax.get_legend().get_texts())]
    assert sum(r"\pm 1\sigma" in t for t in legends) >= 4  # both samplers in both estimate panels
    assert any(r"1$\sigma$" in t and "Gamma method" in t for t in (x.get_text() for x in fig.texts))
    assert COMPARISON_CAPTION in [t.get_text() for t in fig.texts]


def test_tau_int_is_linear_from_zero_in_each_samplers_steps(fig):
    (ax,) = [a for a in fig.axes if "tau_" in a.get_ylabel()]
    assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0
    assert ax.get_ylim()[1] >= 14  # the HMC bar and its error fit
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert any("per trajectory" in t for t in ticks) and any("per proposal" in t for t in ticks)


def test_q_histories_in_separate_panels_with_their_units(fig):
    xlabels = [ax.get_xlabel() for ax in fig.axes]
    assert any(x.startswith("HMC trajectory") for x in xlabels)
    assert any(x.startswith("flow Metropolis proposal") for x in xlabels)
    assert "step" not in xlabels


def test_cost_per_independent_sample_is_shown(fig):
    (ax,) = [a for a in fig.axes if a.get_ylabel() == "seconds per independent sample of Q"]
    heights = sorted(p.get_height() for p in ax.patches)
    assert heights == pytest.approx([0.005, 0.02]) and ax.get_ylim()[0] == 0


def test_report_writes_a_png(tmp_path):
    path = comparison_report(tmp_path / "r.png", ROWS, EXACT, HISTORIES, title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_frozen_row_is_drawn_as_a_lower_bound():
    import matplotlib.pyplot as plt

    rows = [dict(ROWS[0], lower_bound=True), ROWS[1]]
    f = comparison_figure(rows, EXACT, HISTORIES, title="test")
    try:
        (tau_ax,) = [a for a in f.axes if "tau_" in a.get_ylabel()]
        (cost_ax,) = [a for a in f.axes if a.get_ylabel() == "seconds per independent sample of Q"]
        for ax in (tau_ax, cost_ax):
            assert [bool(p.get_hatch()) for p in ax.patches] == [True, False]
            assert any(t.get_text().startswith(">=") for t in ax.texts)
        assert any("(frozen)" in a.get_title() for a in f.axes)
    finally:
        plt.close(f)


# ------------------------------------------------------------------ freezing verdict

EXACT_B6 = {"plaquette": 0.912454914876674, "q2": 0.27920084532802264}  # flowplug.exact.u1_2d(8, 6.0)


def _iid_charge(steps, chains, seed=0):
    """Independent draws of Q with P(0) = 0.76, P(+-1) = 0.12: <Q^2> = 0.24."""
    rng = np.random.default_rng(seed)
    return rng.choice([-1.0, 0.0, 1.0], p=[0.12, 0.76, 0.12], size=(steps, chains))


def _sticky_charge(steps, chains, rate, seed=0):
    """Q redrawn (as in _iid_charge) with probability ``rate`` per step, else kept: tau_int ~ 1/rate."""
    rng = np.random.default_rng(seed)
    draws = _iid_charge(steps, chains, seed + 1)
    q = np.empty((steps, chains))
    q[0] = 0.0
    for t in range(1, steps):
        q[t] = np.where(rng.random(chains) < rate, draws[t], q[t - 1])
    return q


def test_constant_charge_is_frozen_with_tau_at_least_the_chain_length():
    v = topology_freezing(np.zeros((300, 8)) + 1e-16, exact_q2=EXACT_B6["q2"])
    assert v["frozen"] and v["tau_int_lower_bound"]
    assert v["topology_changes"] == 0 and v["topology_changes_per_chain"] == [0] * 8
    assert v["tau_int"] == 300  # the Gamma method has nothing to sum: the chain length
    assert any("never changed" in r for r in v["reasons"])
    assert v["q2_sigma_from_exact"] == float("inf")


def test_rarely_changing_charge_is_frozen():
    q = _sticky_charge(400, 16, rate=2e-3)
    v = topology_freezing(q)
    assert 0 < v["topology_changes"] / 16 < MIN_TOPOLOGY_CHANGES
    assert v["frozen"] and v["tau_int_lower_bound"]
    assert any(r.startswith("Q changed only") for r in v["reasons"])


def test_well_mixing_charge_is_not_frozen():
    q = _iid_charge(400, 16)
    v = topology_freezing(q, exact_q2=0.24)
    assert not v["frozen"] and not v["tau_int_lower_bound"] and v["reasons"] == []
    assert v["topology_changes"] / 16 > 100
    assert v["tau_int"] == pytest.approx(0.5, abs=0.15)
    assert v["q2_sigma_from_exact"] < 3


def test_charge_that_misses_the_exact_value_is_frozen():
    """Mixes by every other measure, but its <Q^2> is far from exact: not trusted."""
    v = topology_freezing(_iid_charge(400, 16), exact_q2=0.6)
    assert v["frozen"] and v["q2_sigma_from_exact"] > 3
    assert any("sigma from the exact" in r for r in v["reasons"])


def test_window_at_half_the_chain_is_frozen():
    """Many changes per chain, yet tau_int(Q) ~ the chain length: the window criterion."""
    v = topology_freezing(_sticky_charge(200, 64, rate=0.08, seed=3), min_changes=0)
    assert v["window"] is not None
    frozen_by_window = any("window" in r for r in v["reasons"])
    assert frozen_by_window == (v["window"] >= 100)
    v = topology_freezing(_sticky_charge(100, 4, rate=0.02, seed=4), min_changes=0)
    assert v["window"] == 50 and v["frozen"]


@pytest.mark.parametrize("bad", [np.zeros((0, 3)), np.zeros((2, 2, 2)), np.array([[0.0, np.nan]])])
def test_freezing_refuses_bad_histories(bad):
    with pytest.raises(ValueError):
        topology_freezing(bad)


def test_ratio_bound():
    assert ratio_bound(False, False) == "="
    assert ratio_bound(True, False) == ">="
    assert ratio_bound(False, True) == "<="
    assert ratio_bound(True, True) is None


def _histories(q, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "plaquette": EXACT_B6["plaquette"] + 0.01 * rng.standard_normal(q.shape),
        "topological_charge": q,
        "accepted": np.ones(q.shape),
    }


#: Exact values for the synthetic charge of _iid_charge.
EXACT_IID = {"plaquette": EXACT_B6["plaquette"], "q2": 0.24}


def _compare(hmc_q, flow_q):
    return compare_samplers(
        _histories(hmc_q, 1),
        _histories(flow_q, 2),
        exact=EXACT_IID,
        hmc_seconds=10.0,
        hmc_trajectories=hmc_q.size,
        hmc_acceptance=0.99,
        flow_seconds=5.0,
        flow_proposals=flow_q.size,
        flow_acceptance=0.86,
    )


def test_frozen_hmc_is_reported_with_lower_bounds_never_as_a_measured_win():
    hmc_q = np.zeros((1000, 8))
    hmc_q[600:, 3] = 1.0  # one tunnelling in eight chains
    cmp = _compare(hmc_q, _iid_charge(200, 16))
    h, fl = cmp.figures["hmc"], cmp.figures["flow"]
    assert h["frozen"] and h["tau_int_q_lower_bound"] and h["seconds_per_independent_q_lower_bound"]
    assert h["topology_changes"] == 1 and h["topology_changes_per_chain"] == 1 / 8
    assert not fl["frozen"] and not fl["tau_int_q_lower_bound"]
    assert cmp.figures["ratio_bound"] == ">="
    assert h["seconds_per_independent_q"] == pytest.approx(10.0 / 8000 * 2 * h["tau_int_q"])
    assert cmp.rows[0]["lower_bound"] and not cmp.rows[1]["lower_bound"]
    assert set(cmp.figures["sigma_from_exact"]) == {"HMC", "flow Metropolis"}
    text = "\n".join(comparison_lines(cmp, EXACT_IID, train_seconds=60.0))
    assert "HMC is FROZEN (topological freezing)" in text
    assert "Its <Q^2> is off because it is frozen" in text
    assert "lower bounds (>=)" in text
    assert f"tau_int(Q): HMC >= {h['tau_int_q']:.3g} per trajectory" in text
    assert f"seconds per independent Q: HMC >= {h['seconds_per_independent_q']:.2e}" in text
    assert "ratio HMC/flow >= " in text and "a lower bound: HMC is frozen" in text
    assert "flow Metropolis: Q changed" in text and "topology sampled" in text


def test_mixing_samplers_get_a_measured_ratio():
    cmp = _compare(_iid_charge(1000, 8, seed=5), _iid_charge(200, 16, seed=6))
    assert not cmp.figures["hmc"]["frozen"] and cmp.figures["ratio_bound"] == "="
    text = "\n".join(comparison_lines(cmp, EXACT_IID))
    assert "FROZEN" not in text and ">=" not in text
    ratio = cmp.figures["seconds_per_independent_q_ratio_hmc_over_flow"]
    assert f"(ratio HMC/flow {ratio:.3g})" in text


def test_both_frozen_leaves_the_ratio_undetermined():
    cmp = _compare(np.zeros((50, 4)), np.zeros((10, 8)))
    assert cmp.figures["ratio_bound"] is None
    text = "\n".join(comparison_lines(cmp, EXACT_IID))
    assert "the flow chains are FROZEN" in text and "not determined: both samplers frozen" in text


def test_chain_report_step_axes_count_the_runs_steps(tmp_path, monkeypatch):
    """After thermalisation the history starts at step thermalize + 1: the report's step axes say so."""
    import torch

    from flowplug.jobs import report

    figures = []
    monkeypatch.setattr(report, "_finish", lambda fig, path, title: figures.append(fig) or path)
    history = {"plaquette": torch.rand(30, 4, dtype=torch.float64), "accepted": torch.ones(30, 4, dtype=torch.float64)}
    report.chain_report(tmp_path / "r.png", history, ["plaquette"], first_step=21)
    (fig,) = figures
    history_ax, acceptance_ax = fig.axes[0], fig.axes[2]
    for ax in (history_ax, acceptance_ax):
        for line in ax.get_lines():
            x = line.get_xdata()
            if len(x) == 30:
                assert x[0] == 21 and x[-1] == 50
    for ax in (history_ax, acceptance_ax):
        assert any(len(line.get_xdata()) == 30 for line in ax.get_lines())
