"""The Yukawa model of arXiv:2106.05934, section IV (flowplug.plugins.yukawa).

Checks: the analytic forces (exact determinant against autograd, pseudofermions against finite
differences); the pseudofermion heat bath (pf^+ (D^+ D)^-1 pf = eta^+ eta, covariance D^+ D);
reversibility of HMC trajectories; pseudofermion HMC against exact-determinant HMC on 4x4
(Gamma method, fixed seeds, 4 sigma) for <phi^2>, <|M|> and the condensate, at a point where
the fermions move <|M|> far outside those errors; g = 0 gives phi^4 plus the constant
-log det(D_0^+ D_0) of the free operator (momentum space); the condensate's exact and
stochastic estimates and the free value; ``flowplug hmc`` runs both actions.

Statistical point (4x4): m2 = -4, lam = 8, g = 1, mass = 0.1 (the bare mass breaks phi -> -phi,
so the condensate is not zero by symmetry); pure phi^4 there has <|M|> about 0.17, the Yukawa
model about 0.35.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from _hmc_helpers import assert_reversible

from flowplug.chain import Chain
from flowplug.errors import ConfigError, ShapeError
from flowplug.measure import measurement
from flowplug.plugins.hmc import HMC
from flowplug.plugins.staggered import free_staggered_condensate, free_staggered_logdet
from flowplug.plugins.yukawa import YukawaExactAction, YukawaPseudofermionAction, staggered_condensate
from flowplug.stats import gamma_method
from flowplug.theory import action_from_config

pytestmark = pytest.mark.usefixtures("one_thread")

POINT = {"m2": -4.0, "lam": 8.0, "g": 1.0, "mass": 0.1}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _phi(lattice, batch, seed, width=0.8):
    return width * torch.randn((batch, *lattice), generator=_gen(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------- forces


def test_exact_force_equals_autograd():
    act = YukawaExactAction(**POINT)
    x = _phi((4, 6), 3, seed=1)
    torch.testing.assert_close(act.force(x), act.space.autograd_force(act.action, x), atol=1e-11, rtol=0)


def test_pseudofermion_force_equals_finite_differences():
    act = YukawaPseudofermionAction(**POINT)
    x = _phi((4, 4), 2, seed=2)
    act.refresh(x, _gen(3))
    f = act.force(x)
    eps = 1e-5
    for idx in [(0, 0, 0), (1, 2, 3), (0, 3, 1)]:
        xp, xm = x.clone(), x.clone()
        xp[idx] += eps
        xm[idx] -= eps
        fd = -(act.action(xp) - act.action(xm)) / (2 * eps)
        assert abs(float(fd[idx[0]]) - float(f[idx])) < 1e-6 * max(1.0, abs(float(f[idx])))


# ---------------------------------------------------------------------------- heat bath


def test_pseudofermion_heat_bath():
    """pf = D^+ eta: the action at the drawn pf equals eta^+ eta exactly (also through the solver),
    and the empirical covariance of pf is D^+ D (5 sigma per entry, 20 000 draws)."""
    act = YukawaPseudofermionAction(**POINT)
    x = _phi((2, 4), 1, seed=4)
    act.refresh(x, _gen(5))
    fresh = act.fermion_action(x)  # eta^+ eta, no solve
    solved = act.fermion_action(x.clone())  # a different tensor: CG solve
    torch.testing.assert_close(fresh, solved, atol=1e-9, rtol=0)
    xs = x.expand(20000, 2, 4).clone()
    act.refresh(xs, _gen(6))
    pf = act.pf.reshape(20000, -1)
    cov = torch.einsum("ki,kj->ij", pf, pf.conj()) / pf.shape[0]
    d = act.operator.dense(x)[0]
    m = d.mH @ d
    diag = m.diagonal().real
    err = torch.sqrt(diag[:, None] * diag[None, :] / pf.shape[0])
    assert torch.all((cov - m).abs() < 5 * err)


def test_pseudofermion_action_needs_a_refresh_and_matching_shapes():
    act = YukawaPseudofermionAction(**POINT)
    x = _phi((4, 4), 2, seed=7)
    with pytest.raises(ConfigError, match="no pseudofermion field drawn yet"):
        act.action(x)
    act.refresh(x, _gen(8))
    with pytest.raises(ShapeError, match="needs a pseudofermion field of shape"):
        act.action(_phi((4, 4), 3, seed=9))
    with pytest.raises(ShapeError, match="even extents"):
        act.refresh(_phi((4, 5), 1, seed=9), _gen(1))


# ---------------------------------------------------------------------------- HMC


@pytest.mark.parametrize("cls", [YukawaExactAction, YukawaPseudofermionAction])
def test_hmc_trajectories_are_reversible(cls):
    act = cls(**POINT)
    kernel = HMC(act, integrator="omelyan", steps=6, trajectory_length=1.0)
    x0 = _phi((4, 4), 3, seed=10, width=0.3)
    if hasattr(act, "refresh"):
        act.refresh(x0, _gen(11))
    p0 = kernel.space.momenta(x0, _gen(12))
    assert_reversible(kernel, x0, p0)


def _hmc(action, chains, steps, seed, burn=20):
    g = _gen(seed)
    kernel = HMC(action, integrator="omelyan", steps=6, trajectory_length=1.0)
    names = ["two_point", "abs_magnetization", "staggered_condensate"]
    # two_point at shift 0 is <phi^2>
    meas = measurement("scalar", names, couplings=action.couplings(), options={"two_point": {"shift": [0, 0]}})
    chain = Chain(kernel, kernel.init(action.hot_start((4, 4), chains, generator=g)), g, measure=meas)
    chain.run(steps)
    hist = chain.history_tensors()
    return {k: gamma_method(hist[k][burn:], step_axis=0) for k in names}


def test_pseudofermion_hmc_agrees_with_exact_determinant_hmc():
    """4x4, 48 chains x 60 trajectories (40 measured) each, seeds 31/32; 4 sigma."""
    exact = _hmc(YukawaExactAction(**POINT), 48, 60, seed=31)
    pseudo = _hmc(YukawaPseudofermionAction(**POINT), 48, 60, seed=32)
    for k in exact:
        a, b = exact[k], pseudo[k]
        sigma = math.hypot(a.error, b.error)
        assert abs(a.mean - b.mean) < 4 * sigma, (
            f"{k}: exact {a.mean:.4f}({a.error:.4f}) pf {b.mean:.4f}({b.error:.4f})"
        )
    # the fermions matter here: pure phi^4 at the same m2, lam has a far smaller <|M|>
    pure = action_from_config({"action": {"name": "phi4", "m2": POINT["m2"], "lam": POINT["lam"]}})
    g = _gen(33)
    kernel = HMC(pure, integrator="omelyan", steps=6)
    chain = Chain(
        kernel,
        kernel.init(pure.hot_start((4, 4), 48, generator=g)),
        g,
        measure=measurement("scalar", ["abs_magnetization"]),
    )
    chain.run(60)
    ref = gamma_method(chain.history_tensors()["abs_magnetization"][20:], step_axis=0)
    e = exact["abs_magnetization"]
    assert e.mean - ref.mean > 8 * math.hypot(e.error, ref.error)


# ---------------------------------------------------------------------------- exact values


def test_exact_action_at_g0_is_phi4_plus_the_free_determinant():
    mass = 0.3
    act = YukawaExactAction(m2=-3.0, lam=5.0, g=0.0, mass=mass)
    phi4 = action_from_config({"action": {"name": "phi4", "m2": -3.0, "lam": 5.0}})
    x = _phi((4, 6), 3, seed=13)
    const = -2.0 * free_staggered_logdet((4, 6), mass)
    torch.testing.assert_close(act.action(x), phi4.action(x) + const, atol=1e-10, rtol=0)
    torch.testing.assert_close(act.force(x), phi4.force(x), atol=1e-12, rtol=0)


def test_condensate_exact_stochastic_and_free():
    x = _phi((4, 4), 2, seed=14)
    exact = staggered_condensate(x, g=0.7, mass=0.1, method="exact")
    stoch = staggered_condensate(x, g=0.7, mass=0.1, method="stochastic", noise=400, seed=3)
    # real Z2 noise eta: Re(eta^T A eta) = Re tr A + sum_{i<j} eta_i eta_j Re(A_ij + A_ji), of
    # variance sum_{i<j} Re(A_ij + A_ji)^2 per noise vector (A = D^-1); mean of 400, over V = 16
    op = YukawaExactAction(g=0.7, mass=0.1).operator
    inv = torch.linalg.inv(op.dense(x))
    sym = (inv + inv.transpose(1, 2)).real
    var = (torch.triu(sym, diagonal=1) ** 2).sum((1, 2))
    error = torch.sqrt(var / 400) / 16
    assert torch.all((exact - stoch).abs() < 4 * error)
    zero = torch.zeros(1, 4, 6, dtype=torch.float64)
    free = staggered_condensate(zero, g=0.7, mass=0.25)
    assert float(free) == pytest.approx(free_staggered_condensate((4, 6), 0.25), abs=1e-12)
    with pytest.raises(ConfigError, match="needs the Yukawa coupling g"):
        staggered_condensate(x, background="scalar")
    with pytest.raises(ConfigError, match="method must be"):
        staggered_condensate(x, g=0.7, method="dense")


def test_exact_counterpart_and_attributes():
    pf = YukawaPseudofermionAction(**POINT)
    ex = pf.exact_counterpart()
    assert isinstance(ex, YukawaExactAction) and ex.couplings() == pf.couplings()
    assert pf.field == "scalar" and pf.bosonic.field == "scalar" and pf.operator.background == "scalar"
    assert "staggered_condensate" in pf.observables
    with pytest.raises(ConfigError, match="lam must be >= 0"):
        YukawaExactAction(lam=-1.0)
    with pytest.raises(ShapeError, match="MAX_DENSE"):
        YukawaExactAction().action(torch.zeros(1, 66, 66, dtype=torch.float64))


# ---------------------------------------------------------------------------- command line


@pytest.mark.parametrize("name", ["yukawa", "yukawa-exact"])
def test_flowplug_hmc_runs_the_yukawa_actions(tmp_path, fresh_pm, name):
    from flowplug.cli import main

    out = tmp_path / name
    args = ["hmc", "--set", f"out={out}", "--set", f"action.name={name}", "--set", "action.g=0.5"]
    for kv in ("lattice=[4,4]", "chains=2", "hmc.trajectories=6", "hmc.thermalization=2", "progress=false"):
        args += ["--set", kv]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["action"]["name"] == name and summary["action"]["g"] == 0.5
    obs = summary["observables"]
    assert {"magnetization", "abs_magnetization", "chi_2", "staggered_condensate"} <= set(obs)
    assert math.isfinite(obs["staggered_condensate"]["mean"])
