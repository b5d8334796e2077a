"""Tests of flowplug.stats: Gamma method (Wolff hep-lat/0306017) and ESS.

References: pyerrors 2.17 values computed once on the seeded AR(1) series below
(numpy PCG64, seed 12345; pyerrors in a separate environment, ``Obs(...).gamma_method()``
with default S = 2), exact AR(1) autocorrelation times and the figures of
``reference/estimators_check.txt``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from flowplug.stats import ess, exp_mean, gamma_method, tau_int

REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference" / "estimators_check.txt"


def ar1(a: float, n: int, seed: int, r: int = 1) -> np.ndarray:
    """r stationary AR(1) chains x_i = a x_{i-1} + e_i, e ~ N(0,1), shape (r, n)."""
    rng = np.random.default_rng(seed)
    out = np.empty((r, n))
    for k in range(r):
        e = rng.standard_normal(n)
        x = np.empty(n)
        x[0] = e[0] / math.sqrt(1 - a * a)
        for i in range(1, n):
            x[i] = a * x[i - 1] + e[i]
        out[k] = x
    return out


# (a, n, replicas) -> pyerrors 2.17: mean, error, tau_int, dtau_int, window, error of error
PYERRORS = {
    (0.0, 20000, 1): (
        0.00836069231395428,
        0.007182476410911784,
        0.5148196685448188,
        0.012575822020751654,
        3,
        9.501523190430174e-05,
    ),
    (0.5, 20000, 1): (
        0.0166419121728492,
        0.01442011247708131,
        1.54066632917447,
        0.08414361245311947,
        16,
        0.00041418619747359133,
    ),
    (0.9, 20000, 1): (
        0.08032691949510623,
        0.07971044272330188,
        11.69705781513092,
        1.501067331092904,
        95,
        0.0055081011785293454,
    ),
    (0.98, 50000, 1): (
        0.18437217512350856,
        0.23818285096033912,
        54.572087808416626,
        8.959072946310402,
        401,
        0.02134362893341966,
    ),
    (0.7, 2000, 8): (
        0.02357340990531952,
        0.026820309578516697,
        2.906292221388388,
        0.2317098976175415,
        28,
        0.0011319473449489883,
    ),
}


@pytest.mark.parametrize("key", list(PYERRORS))
def test_gamma_method_agrees_with_pyerrors(key):
    a, n, r = key
    data = ar1(a, n, 12345, r)
    g = gamma_method(data if r > 1 else data[0], step_axis=1 if r > 1 else None, center="replica")
    mean, err, tau, dtau, w, dd = PYERRORS[key]
    assert g.window == w
    for mine, theirs in [
        (g.mean, mean),
        (g.error, err),
        (g.tau_int, tau),
        (g.tau_int_error, dtau),
        (g.error_of_error, dd),
    ]:
        assert mine == pytest.approx(theirs, rel=1e-10)


def test_global_centering_keeps_chain_mean_spread():
    """Many short chains: the default (global mean) error is at least the per-replica one."""
    data = ar1(0.7, 2000, 12345, 8)
    assert gamma_method(data, step_axis=1).error >= gamma_method(data, step_axis=1, center="replica").error
    # one chain: both centrings are the same
    assert gamma_method(data[0]).error == gamma_method(data[0], center="replica").error


def _reference_lines():
    if not REFERENCE.exists():
        pytest.skip(f"reference file {REFERENCE} not present")
    rows = []
    for line in REFERENCE.read_text().splitlines():
        m = re.match(r"a=\s*([\d.]+)\s+exact tau_int=\s*([\d.]+)\s+uwerr=\s*([\d.]+)\+-([\d.]+)", line)
        if m:
            rows.append(tuple(float(v) for v in m.groups()))
    assert len(rows) == 4
    return rows


def test_tau_int_matches_exact_ar1():
    """Exact tau_int = (1+a)/(2(1-a)) within 3 sigma on N = 2e5 (the reference file's N);
    for correlated series (a > 0) our error of tau_int agrees with the reference
    estimator's within 35% (for white noise it hinges on the window, 1 to 3)."""
    from scipy.signal import lfilter

    for a, exact, _, ref_dtau in _reference_lines():
        rng = np.random.default_rng(2024)
        e = rng.standard_normal(200_000)
        x = lfilter([1.0], [1.0, -a], e)[1000:] if a else e[1000:]
        # discard 1000 steps of the start-up transient (exactly stationary start not needed)
        g = gamma_method(x)
        assert abs(g.tau_int - exact) < 3 * g.tau_int_error, (a, g)
        if a > 0:
            assert g.tau_int_error == pytest.approx(ref_dtau, rel=0.35), (a, g)
        # error of the mean: sigma^2 = 1/(1-a^2), error^2 = 2 tau sigma^2 / N
        expect = math.sqrt(2 * exact / (1 - a * a) / x.size)
        assert g.error == pytest.approx(expect, rel=3 * g.tau_int_error / g.tau_int + 0.01)


def test_gamma_method_inputs():
    g = gamma_method(torch.ones(100, dtype=torch.float64))
    assert g.error == 0 and g.tau_int == 0.5 and g.mean == 1
    assert tau_int(np.random.default_rng(0).standard_normal(5000)) == pytest.approx(0.5, abs=0.05)
    one = gamma_method(np.array([[1.0], [2.0], [4.0]]), step_axis=1)  # three chains of one measurement
    assert one.mean == pytest.approx(7 / 3) and one.error == pytest.approx(np.std([1, 2, 4], ddof=1) / 3**0.5)
    with pytest.raises(ValueError, match="NaN"):
        gamma_method([1.0, float("nan")])
    with pytest.raises(ValueError, match="shape"):
        gamma_method(np.zeros((2, 2, 2)), step_axis=1)
    with pytest.raises(ValueError, match="center"):
        gamma_method([1.0, 2.0], center="middle")


def test_against_pyerrors_directly():
    pe = pytest.importorskip("pyerrors")
    data = ar1(0.8, 3000, 7, 3)
    o = pe.Obs(list(data), [f"e|r{k}" for k in range(3)])
    o.gamma_method()
    g = gamma_method(data, step_axis=1, center="replica")
    assert g.error == pytest.approx(o.dvalue, rel=1e-10)


@pytest.mark.parametrize("s,exact", [(1.0, 1.0), (1.5, 0.8315), (2.0, 0.6614)])
def test_ess_gaussian_proposal(s, exact):
    """ESS/N of q = N(0, s^2) for p = N(0, 1): exact sqrt(2 s^2 - 1) / s^2 (estimators_check.txt).

    N = 4e5 samples; the estimator's standard deviation is below 0.002 here, tolerance 0.006.
    """
    assert math.sqrt(2 * s * s - 1) / (s * s) == pytest.approx(exact, abs=1e-4)
    g = torch.Generator().manual_seed(3)
    x = s * torch.randn(400_000, generator=g, dtype=torch.float64)
    logw = -0.5 * x**2 + 0.5 * (x / s) ** 2 + math.log(s)
    assert ess(logw).item() == pytest.approx(exact, abs=0.006)


# ------------------------------------------------ layout of chain histories (issue 11, item 5)


def test_step_axis_required_for_two_dimensional_data():
    """A history as stored, (steps, chains) = (4000, 6) AR(1) with a = 0.8 (exact tau_int
    4.5, seed 31): ``step_axis=0`` on it equals ``step_axis=1`` on its transpose and finds
    the exact tau_int within 3 sigma; without ``step_axis`` 2-D data are refused (read
    as (chains, steps), this history gives error 0.011 and tau_int 0.50 instead of 0.032
    and 4.4, silently)."""
    a = 0.8
    stored = ar1(a, 4000, 31, 6).T  # (steps, chains), as Chain.history_tensors() and measurements.h5
    g0 = gamma_method(stored, step_axis=0)
    g1 = gamma_method(stored.T, step_axis=1)
    assert g0.as_dict() == g1.as_dict() and np.array_equal(g0.rho, g1.rho)
    assert g0.n == stored.size
    exact = (1 + a) / (2 * (1 - a))
    assert abs(g0.tau_int - exact) < 3 * g0.tau_int_error, g0
    # torch tensors and negative axes say the same
    assert gamma_method(torch.as_tensor(stored), step_axis=-2).as_dict() == g0.as_dict()
    assert gamma_method(stored.T, step_axis=-1).as_dict() == g0.as_dict()
    # reading the stored layout as (chains, steps) is the silent mistake the keyword prevents
    wrong = gamma_method(stored, step_axis=1)
    assert wrong.tau_int < 0.25 * g0.tau_int
    for f in (gamma_method, tau_int):
        for data in (stored, stored.T, torch.as_tensor(stored)):
            with pytest.raises(ValueError, match=r"step_axis=0.*\(steps, chains\).*step_axis=1.*\(chains, steps\)"):
                f(data)
    with pytest.raises(ValueError, match="measurements.h5"):
        gamma_method(stored)
    with pytest.raises(ValueError, match="step_axis"):
        exp_mean(-np.abs(stored))
    assert tau_int(stored, step_axis=0) == g0.tau_int
    e0 = exp_mean(-np.abs(stored), step_axis=0)
    assert e0.as_dict() == gamma_method(np.exp(-np.abs(stored)).T, step_axis=1).as_dict()
    # one chain needs no keyword; a step_axis that names no axis is refused
    assert gamma_method(stored[:, 0]).as_dict() == gamma_method(stored[:, 0], step_axis=0).as_dict()
    for bad in (2, -3, 0.0, "steps", True):
        with pytest.raises(ValueError, match="step_axis"):
            gamma_method(stored, step_axis=bad)
    with pytest.raises(ValueError, match="step_axis"):
        gamma_method(stored[:, 0], step_axis=1)


# ------------------------------------------------ default centring pinned (issue 11, item 7)


def _uwerr_by_hand(a: np.ndarray, s_tau: float = 2.0) -> tuple[float, float, float, int]:
    """Wolff's Gamma method (hep-lat/0306017) written out with plain loops, global mean.

    ``a``: (R, N_r), replicas as rows. Gamma(t) = sum_r sum_i (a_ri - abar)(a_r,i+t - abar)
    / (N - R t); W the first W >= 1 with exp(-W/tau) - tau/sqrt(W N) < 0,
    tau = S_tau / ln((2 tau_int(W) + 1)/(2 tau_int(W) - 1)) (W_max = N_r // 2 otherwise);
    error from UWerr's bias-corrected C_F = (Gamma(0) + 2 sum_{t<=W} Gamma(t)) (1 + (2W+1)/N);
    tau_int with the correction (1 + (2W+1)/N)/(1 + 1/N) (eq. (49) as pyerrors applies it).
    Returns (mean, error, tau_int, window).
    """
    r, n_r = a.shape
    n = r * n_r
    abar = sum(float(v) for v in a.ravel()) / n
    w_max = n_r // 2
    gamma = []
    for t in range(w_max + 1):
        s = 0.0
        for k in range(r):
            for i in range(n_r - t):
                s += (a[k, i] - abar) * (a[k, i + t] - abar)
        gamma.append(s / (n - r * t))
    window, tau_w = w_max, None
    for w in range(1, w_max + 1):
        tau_w = 0.5 + sum(gamma[1 : w + 1]) / gamma[0]
        if tau_w <= 0.5:
            window = w
            break
        tau = s_tau / math.log((2 * tau_w + 1) / (2 * tau_w - 1))
        if math.exp(-w / tau) - tau / math.sqrt(w * n) < 0:
            window = w
            break
    tau_w = 0.5 + sum(gamma[1 : window + 1]) / gamma[0]
    c_f = (gamma[0] + 2 * sum(gamma[1 : window + 1])) * (1 + (2 * window + 1) / n)
    return abar, math.sqrt(c_f / n), tau_w * (1 + (2 * window + 1) / n) / (1 + 1 / n), window


def _offset_chains() -> np.ndarray:
    """Fixed data: 5 AR(1) chains (a = 0.6, seed 4242) of 300 steps, (chains, steps), with
    chain means shifted by different amounts so that the centring matters."""
    return ar1(0.6, 300, 4242, 5) + np.array([0.0, 0.4, -0.3, 0.7, -0.5])[:, None]


# gamma_method(_offset_chains(), step_axis=1) with the global-mean default, pinned once
# (and equal to _uwerr_by_hand); center="replica" gives a clearly smaller error.
PINNED_GLOBAL = {"mean": 0.11132471154439806, "error": 0.09717693038075792, "tau_int": 4.573168651242369, "window": 28}


def test_default_centering_is_global_and_pinned():
    data = _offset_chains()
    mean, error, tau, window = _uwerr_by_hand(data)
    g = gamma_method(data, step_axis=1)  # the default centring
    assert g.window == window
    assert g.mean == pytest.approx(mean, rel=1e-12)
    assert g.error == pytest.approx(error, rel=1e-10)
    assert g.tau_int == pytest.approx(tau, rel=1e-10)
    assert (g.mean, g.error, g.tau_int, g.window) == pytest.approx(
        (PINNED_GLOBAL["mean"], PINNED_GLOBAL["error"], PINNED_GLOBAL["tau_int"], PINNED_GLOBAL["window"]), rel=1e-10
    )
    assert g.as_dict() == gamma_method(data, step_axis=1, center="global").as_dict()
    rep = gamma_method(data, step_axis=1, center="replica")
    assert rep.error < 0.8 * g.error
    assert rep.error != pytest.approx(g.error, rel=0.05)
    import inspect

    assert inspect.signature(gamma_method).parameters["center"].default == "global"
