"""Statistical validation of HMC against exact results (DESIGN.md section 4).

Every comparison uses fixed seeds, many chains in one batch, Gamma-method errors
(flowplug.stats.gamma_method, chains as replicas) and a 3 sigma tolerance, with
sigma^2 = (Monte Carlo error)^2 + (reference error)^2. Statistics are stated per case.

Exact values: ../shared/reference/u1_2d_exact.txt (2D U(1), L = 8),
sun_2d_exact.txt (2D SU(N)) and phi4_2d_hmc_reference.txt (phi^4 tutorial point).
For SU(2)/SU(3) the test runs on a 4x4 torus and computes the exact torus plaquette
from the character expansion of reference/README.md (Z = sum_r (c_r/d_r)^V,
<P> = (1/V) d ln Z / d beta); the same code reproduces the file's L = 8 column.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from flowplug.chain import Chain
from flowplug.measure import measurement
from flowplug.plugins.hmc import HMC
from flowplug.plugins.theories import Phi4Action, WilsonGaugeAction
from flowplug.stats import gamma_method

REF = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
SIGMAS = 3.0


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small tensors run on one thread


def ref_file(name: str) -> str:
    path = REF / name
    if not path.exists():
        pytest.skip(f"reference file {path} is not present")
    return path.read_text()


def run(action, lattice, batch, n_therm, n_meas, names, *, integrator="omelyan", steps=4, tau=1.0, seed=1):
    """Hot start, n_therm trajectories discarded, n_meas measured; (T, B) histories."""
    k = HMC(action, integrator=integrator, steps=steps, trajectory_length=tau)
    g = torch.Generator().manual_seed(seed)
    chain = Chain(k, k.init(action.hot_start(lattice, batch, generator=g)), g, measure=measurement(action.field, names))
    chain.run(n_therm)
    chain.history.clear()
    chain.run(n_meas)
    return {k: v.numpy() for k, v in chain.history_tensors().items()}


def check(name, series, exact, ref_error=0.0):
    """Gamma-method mean of a (T, B) series against ``exact`` within 3 sigma."""
    g = gamma_method(series, step_axis=0)
    sigma = math.hypot(g.error, ref_error)
    pull = (g.mean - exact) / sigma
    print(f"{name}: {g.mean:.6f} +- {g.error:.6f} (tau_int {g.tau_int:.2f}) exact {exact:.6f}: {pull:+.2f} sigma")
    assert abs(pull) < SIGMAS, f"{name}: {g.mean} +- {g.error} vs {exact} ({pull:+.2f} sigma)"
    return g


def check_exp_dh(h):
    """<exp(-dH)> = 1 (Creutz's identity), within 3 sigma."""
    return check("<exp(-dH)>", np.exp(-h["delta_h"]), 1.0)


# ------------------------------------------------------------------------ 2D U(1)


def u1_exact(L: int, beta: float) -> tuple[float, float]:
    for line in ref_file("u1_2d_exact.txt").splitlines():
        f = line.split()
        if len(f) >= 5 and f[0] == str(L) and float(f[1]) == beta:
            return float(f[2]), float(f[4])
    raise AssertionError(f"no L={L} beta={beta} row in u1_2d_exact.txt")


@pytest.mark.slow
@pytest.mark.parametrize(
    "beta,n_therm,n_meas,steps,tau",
    [
        (2.0, 100, 400, 4, 1.0),  # 256 chains x 400 measured trajectories
        (4.0, 200, 600, 6, 1.5),  # longer trajectories against the slow topological modes
    ],
)
def test_u1_2d_plaquette_and_q2(beta, n_therm, n_meas, steps, tau):
    plaq, q2 = u1_exact(8, beta)
    h = run(
        WilsonGaugeAction(beta, "u1"),
        (8, 8),
        256,
        n_therm,
        n_meas,
        ["plaquette", "topological_charge"],
        steps=steps,
        tau=tau,
        seed=int(10 * beta),
    )
    q = h["topological_charge"]
    assert np.allclose(q, np.round(q), atol=1e-9)
    check(f"U(1) beta={beta} <P>", h["plaquette"], plaq)
    check(f"U(1) beta={beta} <Q^2>", q**2, q2)
    check(f"U(1) beta={beta} <Q>", q, 0.0)
    check_exp_dh(h)


# ----------------------------------------------------------------------- 2D SU(N)


@functools.cache
def sun_log_z(n: int, beta: float, volume: int) -> float:
    """ln Z of 2D SU(N) Wilson theory on a torus of V plaquettes (character expansion)."""
    from scipy.special import iv

    if n == 2:
        # c_r/d_r = 2 I_r(beta)/beta, r = 1, 2, ...
        r = np.arange(1, 40)
        terms = volume * np.log(2 * iv(r, beta) / beta)
    else:
        # lambda = (p+q, q, 0), c = sum_k det[I_{lambda_j + k - j + i}(beta/3)], d = dim
        ks = np.arange(-20, 21)
        i, j = np.meshgrid(np.arange(3), np.arange(3), indexing="ij")
        terms = []
        for p in range(0, 16):
            for q in range(0, 16):
                lam = np.array([p + q, q, 0])
                idx = lam[j][None] + ks[:, None, None] - j + i
                c = np.linalg.det(iv(idx, beta / 3)).sum()
                d = (p + 1) * (q + 1) * (p + q + 2) / 2
                if c > 0:
                    terms.append(volume * math.log(c / d))
        terms = np.array(terms)
    top = terms.max()
    return float(top + math.log(np.exp(terms - top).sum()))


def sun_plaquette(n: int, beta: float, L: int) -> float:
    """Exact torus <P> = (1/V) d ln Z / d beta (central difference, h = 1e-4: error ~1e-9)."""
    v, h = L * L, 1e-4
    return (sun_log_z(n, beta + h, v) - sun_log_z(n, beta - h, v)) / (2 * h) / v


def sun_file_value(n: int, beta: float) -> float:
    text = ref_file("sun_2d_exact.txt")
    section = text.split(f"## SU{n}")[1].split("##")[0]
    for line in section.splitlines():
        f = line.split()
        if f and re.match(r"^[\d.]+$", f[0]) and float(f[0]) == beta:
            return float(f[2])  # <P>_L8
    raise AssertionError(f"no SU{n} beta={beta} row")


@pytest.mark.parametrize("n", [2, 3])
def test_character_expansion_reproduces_reference(n):
    for beta in (2.0, 4.0):
        assert sun_plaquette(n, beta, 8) == pytest.approx(sun_file_value(n, beta), abs=1e-8)


@pytest.mark.slow
@pytest.mark.parametrize("n,beta", [(2, 2.0), (2, 4.0), (3, 2.0), (3, 4.0)])
def test_sun_2d_plaquette(n, beta):
    """64 chains x 100 measured trajectories on 4x4 (20 thermalisation), Omelyan 3 steps."""
    exact = sun_plaquette(n, beta, 4)
    h = run(WilsonGaugeAction(beta, f"su{n}"), (4, 4), 64, 20, 100, ["plaquette"], steps=3, seed=100 * n + int(beta))
    check(f"SU({n}) beta={beta} <P>", h["plaquette"], exact)
    check_exp_dh(h)


# ------------------------------------------------------------------------- phi^4


def phi4_reference(point: str) -> dict[str, tuple[float, float]]:
    text = ref_file("phi4_2d_hmc_reference.txt")
    block = text.split(point)[1].split("\n\n")[0].split("acc=")[1]
    out = {}
    for name in ("chi_2", "E_Ising"):
        m = re.search(rf"{name} = ([\d.]+) \+- ([\d.]+)", block)
        out[name] = (float(m.group(1)), float(m.group(2)))
    return out


@pytest.mark.slow
def test_phi4_tutorial_point():
    """L = 8, m2 = -4, lam = 8: 256 chains x 400 trajectories (100 thermalisation),
    leapfrog 10 steps, tau = 1 (the reference run's integrator)."""
    ref = phi4_reference("tutorial_L8_m2-4_lam8")
    h = run(
        Phi4Action(-4.0, 8.0), (8, 8), 256, 100, 400, ["chi_2", "ising_energy"], integrator="leapfrog", steps=10, seed=5
    )
    check("phi4 chi_2", h["chi_2"], *ref["chi_2"])
    check("phi4 E_Ising", h["ising_energy"], *ref["E_Ising"])
    check_exp_dh(h)


@pytest.mark.slow
def test_exp_minus_dh_with_coarse_steps():
    """<exp(-dH)> = 1 where it is a sharp test: acceptance ~ 0.6, <dH> ~ 0.5 (2D U(1),
    beta = 4, L = 8, tau = 1.5 in 4 Omelyan steps; 256 chains x 200 trajectories)."""
    h = run(WilsonGaugeAction(4.0, "u1"), (8, 8), 256, 50, 200, ["plaquette"], steps=4, tau=1.5, seed=9)
    assert 0.3 < h["accepted"].mean() < 0.8
    assert h["delta_h"].mean() > 0.2
    check_exp_dh(h)


# ----------------------------------------------------- a third-party action (XY)


@pytest.mark.slow
def test_hmc_cli_on_plugin_action_xy_chain(tmp_path, fresh_pm):
    """The example plugin's XY action (field kind o2, its own force) through ``flowplug hmc``:
    1D periodic chain, V = 16, beta = 1; exact <cos> = sum_n I_n^(V-1) I_n' / sum_n I_n^V.
    128 chains x 300 trajectories (50 thermalisation), Omelyan 4 steps."""
    pytest.importorskip("flowplug_xy", reason="examples/flowplug-xy is not installed")
    from scipy.special import iv

    from flowplug import config as _config
    from flowplug.jobs.hmc import DEFAULT_CONFIG, run_hmc

    fresh_pm.load_entrypoints()
    beta, v = 1.0, 16
    n = np.arange(-30, 31)
    exact = float((iv(n, beta) ** (v - 1) * 0.5 * (iv(n - 1, beta) + iv(n + 1, beta))).sum() / (iv(n, beta) ** v).sum())
    cfg = _config.build_config(
        DEFAULT_CONFIG,
        overrides=[
            f"out={tmp_path}",
            "progress=false",
            "action.name=xy",
            f"action.beta={beta}",
            f"lattice=[{v}]",
            "chains=128",
            "hmc.trajectories=350",
            "hmc.thermalization=50",
            "hmc.steps=4",
            "observables=['xy_bond_energy']",
            "format=none",
        ],
    )
    summary = run_hmc(cfg)
    e = summary["observables"]["xy_bond_energy"]
    pull = (e["mean"] - exact) / e["error"]
    print(f"XY V=16 beta=1 <cos>: {e['mean']:.5f} +- {e['error']:.5f}, exact {exact:.5f}: {pull:+.2f} sigma")
    assert abs(pull) < SIGMAS
    assert summary["acceptance"] > 0.9
    assert abs(summary["exp_minus_delta_h"]["mean"] - 1) < SIGMAS * summary["exp_minus_delta_h"]["error"]
