"""The demo's comparison figure (flowplug.jobs.report.comparison_figure): what it says.

Checked on the matplotlib objects, with made-up estimates: physics names on the axes
(<Q^2>, not "q2"), 1-sigma error bars said so, tau_int on a linear axis from zero with
each sampler's step unit, separate Q-history panels for HMC trajectories and flow
proposals, and the cost per independent sample of Q.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib")

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
