"""Tests of the improved gauge actions (flowplug.plugins.gauge_actions).

Deterministic: analytic forces against autograd and finite differences (U(1), SU(2),
SU(3); d = 2, 3, 4; non-cubic lattices), reduction to ``wilson`` at c1 = 0, gauge
invariance, the loop sums against an independent brute-force enumeration of MILC's loop
table, MILC's coefficients, bad input, HMC reversibility and dH ~ eps^2.

Statistical (fixed seeds, chains as replicas, Gamma-method errors, 3 sigma):
HMC against exact 2D U(1) values on a 3 x 2 torus (plaquette-angle integral), and HMC
against an independent single-link Metropolis sampler that only evaluates the action.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from flowplug import config as _config
from flowplug import groups
from flowplug.chain import Chain
from flowplug.errors import ConfigError, ShapeError
from flowplug.manager import new_plugin_manager
from flowplug.plugins.gauge_actions import (
    C1_DBW2,
    C1_IWASAKI,
    C1_SYMANZIK,
    DBW2GaugeAction,
    IwasakiGaugeAction,
    MILCSymanzikAction,
    PlaquetteRectangleAction,
    SymanzikGaugeAction,
    loop_paths,
    milc_coefficients,
)
from flowplug.plugins.hmc import HMC
from flowplug.plugins.theories import WilsonGaugeAction
from flowplug.stats import gamma_method
from flowplug.theory import Action, action_from_config

SIGMA = 3.0


def gen(seed=1234):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def actions():
    return new_plugin_manager(autoload=False).registry("action")


CASES = [
    ("plaquette-rectangle", dict(beta=2.3, c1=-0.2, group="u1"), (4, 3)),
    ("plaquette-rectangle", dict(beta=1.1, c1=0.15, group="su2"), (3, 4, 2)),
    ("symanzik", dict(beta=4.0, group="su3"), (3, 4)),
    ("iwasaki", dict(beta=2.5, group="su3"), (2, 3, 2, 3)),
    ("dbw2", dict(beta=0.9, group="su2"), (4, 3)),
    ("dbw2", dict(beta=0.7, group="u1"), (3, 2, 4)),
    ("milc-symanzik", dict(beta=7.0, u0=0.8441, group="su3"), (2, 3, 2, 3)),
    ("milc-symanzik", dict(beta=5.0, u0=0.86, nf=3, variant="asqtad", group="su2"), (3, 2, 4)),
    ("milc-symanzik", dict(beta=3.0, u0=0.9, group="u1"), (3, 3, 2)),
    ("milc-symanzik", dict(beta=6.0, u0=0.87, nf=4, variant="hisq", group="su3"), (3, 4)),
]


def make(actions, name, params):
    return actions.get(name).factory(**params)


# ---------------------------------------------------------------- records, coefficients


def test_registered_names_parameters_and_aliases(actions):
    expect = {
        "plaquette-rectangle": ("beta", "c1", "group"),
        "symanzik": ("beta", "group"),
        "iwasaki": ("beta", "group"),
        "dbw2": ("beta", "group"),
        "milc-symanzik": ("beta", "u0", "nf", "variant", "group"),
    }
    for name, params in expect.items():
        spec = actions.get(name)
        assert spec.parameters == params and spec.provider == "flowplug"
    assert actions.get("luscher-weisz") is actions.get("symanzik") is actions.get("tlsym")
    act = action_from_config({"name": "plaquette-rectangle", "beta": 2.0, "c1": -0.1, "group": "su2", "m2": 1.0})
    assert isinstance(act, PlaquetteRectangleAction) and act.couplings() == {"beta": 2.0, "c1": -0.1, "group": "su2"}


def test_named_coefficients_satisfy_c0_plus_8_c1_is_1():
    for cls, c1, c0 in [
        (SymanzikGaugeAction, C1_SYMANZIK, 5.0 / 3.0),
        (IwasakiGaugeAction, C1_IWASAKI, 3.648),
        (DBW2GaugeAction, C1_DBW2, 12.2704),
    ]:
        coef = cls(2.0, "su3").coefficients()
        assert coef["rectangle"] == c1
        assert coef["plaquette"] == pytest.approx(c0, abs=1e-12)
        assert coef["plaquette"] + 8 * coef["rectangle"] == pytest.approx(1.0, abs=1e-12)
    assert (C1_SYMANZIK, C1_IWASAKI, C1_DBW2) == (-1 / 12, -0.331, -1.4088)


def test_milc_coefficients_are_milcs_and_the_alpha_s_form():
    """MILC's symanzik_1loop_action.h numbers, which equal the alpha_s form
    c_rect = -(1 + 0.4805 alpha_s)/(20 u0^2), c_pg = -0.03325 alpha_s / u0^2,
    alpha_s = -4 ln(u0)/3.06839, to the digits MILC codes (relative 1e-4)."""
    u0 = 0.8441
    c = milc_coefficients(u0)
    alpha = -4.0 * math.log(u0) / 3.06839
    assert c["plaquette"] == 1.0
    assert c["rectangle"] == pytest.approx(-(1 + 0.4805 * alpha) / (20 * u0**2), rel=1e-4)
    assert c["parallelogram"] == pytest.approx(-0.03325 * alpha / u0**2, rel=2e-4)
    assert c["rectangle"] == pytest.approx(-0.0776251, abs=1e-7)
    assert c["parallelogram"] == pytest.approx(-0.0103117, abs=1e-7)
    assert milc_coefficients(u0, "tree") == {"plaquette": 1.0, "rectangle": -1 / (20 * u0**2), "parallelogram": 0.0}
    hisq = milc_coefficients(u0, "hisq", nf=4)
    assert hisq["rectangle"] == pytest.approx(-(1 - (0.6264 - 1.1746 * 4) * math.log(u0)) / (20 * u0**2))
    assert hisq["parallelogram"] == pytest.approx((0.0433 - 0.0156 * 4) * math.log(u0) / u0**2)


def test_milc_at_u0_1_is_tree_level_symanzik_at_three_fifths_beta():
    """u0 = 1: alpha_s = 0, no parallelograms, c_rect = -1/20, so beta11 [P - R/20] is
    (3 beta11 / 5) [5/3 P - 1/12 R]: MILC's beta11 = 10/g^2 against beta = 6/g^2."""
    milc = MILCSymanzikAction(beta=7.0, u0=1.0, group="su3")
    sym = SymanzikGaugeAction(beta=0.6 * 7.0, group="su3")
    x = milc.hot_start((2, 3, 2, 2), 2, generator=gen(3))
    torch.testing.assert_close(milc.action(x), sym.action(x), rtol=1e-13, atol=1e-10)
    torch.testing.assert_close(milc.force(x), sym.force(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(u0=0.0), "u0"),
        (dict(u0=1.2), "u0"),
        (dict(u0=float("nan")), "u0"),
        (dict(u0=0.9, variant="two-loop"), "variant"),
        (dict(u0=0.9, nf=2), "nf must be 0"),
        (dict(u0=0.9, variant="hisq", nf=-1), "nf"),
        (dict(beta=float("inf")), "beta"),
        (dict(group="sp4"), "group"),
    ],
)
def test_milc_bad_parameters_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MILCSymanzikAction(**kwargs)


def test_bad_input_errors():
    with pytest.raises(ConfigError, match="c1 must be finite"):
        PlaquetteRectangleAction(1.0, float("nan"))
    with pytest.raises(ConfigError, match="unknown group"):
        IwasakiGaugeAction(1.0, "so3")
    with pytest.raises(ConfigError, match="beta must be a number"):
        DBW2GaugeAction("high", "su3")
    with pytest.raises(ShapeError, match="SU3 links"):
        IwasakiGaugeAction(1.0, "su3").action(torch.zeros(1, 2, 4, 4, dtype=torch.float64))
    with pytest.raises(ShapeError, match="d >= 2"):
        SymanzikGaugeAction(1.0, "u1").action(torch.zeros(1, 1, 4, dtype=torch.float64))
    with pytest.raises(ShapeError, match="not U\\(1\\)"):
        SymanzikGaugeAction(1.0, "u1").staples(torch.zeros(1, 2, 4, 4, dtype=torch.float64))
    with pytest.raises(ConfigError, match="unknown loop kind"):
        loop_paths("hexagon", 4)


def test_heatbath_refuses_improved_actions():
    from flowplug.plugins.heatbath import Heatbath

    with pytest.raises(ConfigError, match="Wilson"):
        Heatbath(IwasakiGaugeAction(2.5, "su3"))


# ---------------------------------------------------------------- forces, invariance


@pytest.mark.parametrize("name,params,lattice", CASES)
def test_force_matches_autograd(actions, name, params, lattice):
    act = make(actions, name, params)
    x = act.hot_start(lattice, 3, generator=gen())
    f = act.force(x)
    f_auto = Action.force(act, x)
    assert f.shape == x.shape and f.dtype == x.dtype
    torch.testing.assert_close(f, f_auto, rtol=1e-10, atol=1e-10)
    assert act.action(x).shape == (3,) and act.action(x).dtype == torch.float64


@pytest.mark.parametrize("name,params,lattice", CASES)
def test_force_is_directional_derivative(actions, name, params, lattice):
    """Central finite difference of S along a random direction against +-<direction, F>."""
    act = make(actions, name, params)
    g = gen(7)
    x = act.hot_start(lattice, 2, generator=g)
    space = act.space
    p = space.momenta(x, g)
    h = 1e-5
    num = (act.action(space.update(x, p, h)) - act.action(space.update(x, p, -h))) / (2 * h)
    f = act.force(x)
    if x.is_complex():
        ana = 2.0 * torch.einsum("b...ij,b...ji->b", p, f).real
    else:
        ana = -(p * f).flatten(1).sum(1)
    torch.testing.assert_close(num, ana, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("group", ["u1", "su2", "su3"])
@pytest.mark.parametrize("lattice", [(4, 3), (3, 2, 4)])
def test_c1_zero_is_wilson(group, lattice):
    pr = PlaquetteRectangleAction(1.7, 0.0, group)
    w = WilsonGaugeAction(1.7, group)
    x = pr.hot_start(lattice, 2, generator=gen(2))
    torch.testing.assert_close(pr.action(x), w.action(x), rtol=1e-13, atol=1e-11)
    torch.testing.assert_close(pr.force(x), w.force(x), rtol=1e-12, atol=1e-12)
    if group != "u1":
        torch.testing.assert_close(pr.staples(x), w.staples(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,params,lattice", [c for c in CASES if len(c[2]) >= 3] + [CASES[0], CASES[2]])
def test_gauge_invariance(actions, name, params, lattice):
    act = make(actions, name, params)
    g = gen(11)
    x = act.hot_start(lattice, 2, generator=g)
    d = len(lattice)
    if act.n == 1:
        alpha = 2 * math.pi * torch.rand(2, *lattice, dtype=torch.float64, generator=g)
        y = torch.stack([alpha + x[:, mu] - torch.roll(alpha, -1, 1 + mu) for mu in range(d)], 1)
        y = groups.wrap_angle(y)
    else:
        omega = groups.haar_random((2, *lattice), act.n, generator=g)
        y = torch.stack([omega @ x[:, mu] @ torch.roll(omega, -1, 1 + mu).mH for mu in range(d)], 1)
    torch.testing.assert_close(act.action(y), act.action(x), rtol=1e-12, atol=1e-9)
    assert not torch.allclose(y, x)


# ---------------------------------------------------------------- loops against MILC's table

BASE_LOOPS = {  # MILC's loop_ind (generic/imp_actions/symanzik_1loop_action.h), (axis, sign)
    "plaquette": ((0, 1), (1, 1), (0, -1), (1, -1)),
    "rectangle": ((0, 1), (0, 1), (1, 1), (0, -1), (0, -1), (1, -1)),
    "parallelogram": ((0, 1), (1, 1), (2, 1), (0, -1), (1, -1), (2, -1)),
}


def _milc_loop_table(base, d):
    """MILC's make_loop_table: every permutation and reflection of the axes applied to the
    base loop, kept once up to cyclic shift and reversal of the path (char_num)."""
    if max(a for a, _ in base) >= d:
        return []
    table, seen = [], set()
    for perm in itertools.permutations(range(d)):
        for refl in itertools.product((1, -1), repeat=d):
            path = tuple((perm[a], s * refl[a]) for a, s in base)
            back = tuple((a, -s) for a, s in reversed(path))
            key = min(p[i:] + p[:i] for p in (path, back) for i in range(len(p)))
            if key not in seen:
                seen.add(key)
                table.append(path)
    return table


def _brute_force_sum(u, path):
    """sum_x Re tr of the path product at every base site x, by explicit site arithmetic."""
    u = u.numpy()
    lattice = u.shape[2:-2]
    total = np.zeros(u.shape[0])
    for x in itertools.product(*map(range, lattice)):
        pos = list(x)
        m = np.broadcast_to(np.eye(u.shape[-1]), (u.shape[0], u.shape[-1], u.shape[-1]))
        for a, s in path:
            if s > 0:
                link = u[(slice(None), a, *pos)]
                pos[a] = (pos[a] + 1) % lattice[a]
            else:
                pos[a] = (pos[a] - 1) % lattice[a]
                link = u[(slice(None), a, *pos)].conj().swapaxes(-1, -2)
            m = m @ link
        assert tuple(pos) == x
        total += np.trace(m, axis1=-2, axis2=-1).real
    return total


@pytest.mark.parametrize("lattice", [(3, 2, 2), (2, 3, 2, 2)])
def test_loop_sums_match_milcs_loop_table(lattice):
    """The engine's loops (each geometric loop once) against a brute-force sum over MILC's
    loop table: the same count per site (4D: 6, 12, 16) and the same sum of Re tr."""
    d = len(lattice)
    counts = {kind: len(_milc_loop_table(base, d)) for kind, base in BASE_LOOPS.items()}
    assert counts == {kind: len(loop_paths(kind, d)) for kind in BASE_LOOPS}
    assert counts == ({"plaquette": 6, "rectangle": 12, "parallelogram": 16} if d == 4 else counts)
    assert counts == {"plaquette": d * (d - 1) // 2, "rectangle": d * (d - 1), "parallelogram": 4 * math.comb(d, 3)}
    act = MILCSymanzikAction(1.0, u0=0.9, group="su2")
    x = act.hot_start(lattice, 2, generator=gen(21))
    means = act.loop_means(x)
    volume = math.prod(lattice)
    for kind, base in BASE_LOOPS.items():
        brute = sum(_brute_force_sum(x, p) for p in _milc_loop_table(base, d))
        got = means[kind].numpy() * counts[kind] * volume * 2  # mean of Re tr / N, N = 2
        np.testing.assert_allclose(got, brute, rtol=1e-12, atol=1e-10)
    c = act.coefficients()
    expect = -(1.0 / 2) * sum(
        c[kind] * sum(_brute_force_sum(x, p) for p in _milc_loop_table(base, d)) for kind, base in BASE_LOOPS.items()
    )
    np.testing.assert_allclose(act.action(x).numpy(), expect, rtol=1e-12)


def test_cold_start_and_plaquette_normalisation():
    """Unit gauge: every loop mean is 1, S = -beta V (c0 n_P + c1 n_R + c2 n_C), and the
    plaquette mean is flowplug.gauge.plaquette."""
    from flowplug.gauge import plaquette

    act = MILCSymanzikAction(7.0, u0=0.8441)
    lattice = (2, 3, 2, 2)
    cold = act.cold_start(lattice, 2)
    c = act.coefficients()
    v = math.prod(lattice)
    expect = -7.0 * v * (6 * c["plaquette"] + 12 * c["rectangle"] + 16 * c["parallelogram"])
    assert act.action(cold).tolist() == pytest.approx([expect] * 2, rel=1e-14)
    assert all(m.tolist() == pytest.approx([1.0, 1.0]) for m in act.loop_means(cold).values())
    hot = act.hot_start(lattice, 2, generator=gen(5))
    torch.testing.assert_close(act.loop_means(hot)["plaquette"], plaquette(hot))
    u1 = DBW2GaugeAction(1.0, "u1")
    theta = u1.hot_start((4, 3), 2, generator=gen(6))
    torch.testing.assert_close(u1.loop_means(theta)["plaquette"], plaquette(theta))
    assert set(u1.loop_means(theta)) == {"plaquette", "rectangle"}


def test_u1_is_the_abelian_part_of_su2():
    """U(1) angles theta embedded as diag(e^{i theta}, e^{-i theta}) in SU(2): Re tr L / 2 =
    cos theta_L, so the U(1) and SU(2) code paths give the same action."""
    for act_u1, act_su2 in [
        (DBW2GaugeAction(0.8, "u1"), DBW2GaugeAction(0.8, "su2")),
        (MILCSymanzikAction(2.0, u0=0.85, group="u1"), MILCSymanzikAction(2.0, u0=0.85, group="su2")),
    ]:
        theta = act_u1.hot_start((3, 2, 4), 2, generator=gen(9))
        z = torch.exp(1j * theta)
        u = torch.diag_embed(torch.stack([z, z.conj()], dim=-1))
        torch.testing.assert_close(act_su2.action(u), act_u1.action(theta), rtol=1e-12, atol=1e-10)


# ---------------------------------------------------------------- HMC


HMC_CASES = [
    pytest.param(DBW2GaugeAction(0.3, "u1"), (6, 5), id="dbw2-u1-2d"),
    pytest.param(IwasakiGaugeAction(1.5, "su2"), (4, 3), id="iwasaki-su2-2d"),
    pytest.param(MILCSymanzikAction(7.0, u0=0.8441), (3, 2, 2, 2), id="milc-su3-4d"),
    pytest.param(MILCSymanzikAction(1.5, u0=0.8, group="u1"), (3, 3, 2), id="milc-u1-3d"),
]


@pytest.mark.parametrize("act,lattice", HMC_CASES)
def test_hmc_reversibility_and_dh_scaling(act, lattice):
    """Forward, momentum flip, forward: back to the start to 1e-10; rms dH drops ~4x when the
    step halves (leapfrog, O(eps^2))."""
    x = act.hot_start(lattice, 4, generator=gen(1))
    k = HMC(act, integrator="omelyan", steps=6)
    p = k.space.momenta(x, gen(2))
    x1, p1 = k.integrate(x, p)
    assert k.space.distance(x1, x).max() > 1e-2
    x2, p2 = k.integrate(x1, -p1)
    assert k.space.distance(x2, x).max() < 1e-10 and (p2 + p).abs().max() < 1e-10
    rms = {}
    for n in (12, 24):
        k = HMC(act, integrator="leapfrog", steps=n, trajectory_length=0.5)
        p = k.space.momenta(x, gen(4))
        x1, p1 = k.integrate(x, p)
        rms[n] = (k.hamiltonian(x1, p1) - k.hamiltonian(x, p)).pow(2).mean().sqrt().item()
    assert 3.6 < rms[12] / rms[24] < 4.4, rms


def _exact_u1_torus(beta, c0, c1, lattice=(3, 2), k=16):
    """<Re tr P / N>, <Re tr R / N> of the 2D U(1) plaquette + rectangle action on an
    L0 x L1 torus, from the plaquette angles phi_x: uniform (Haar) on the torus
    {sum_x phi_x = 0 mod 2 pi} (the holonomies do not enter), a rectangle's angle the sum
    of its two plaquettes' (abelian). Trapezoid rule with k points per angle (periodic,
    analytic integrand: converged to 1e-12 at k = 16 for these couplings)."""
    l0, l1 = lattice
    n = l0 * l1
    grid = 2 * np.pi * np.arange(k) / k
    mesh = np.meshgrid(*([grid] * (n - 2)), indexing="ij", sparse=True)
    shape = (k,) * (n - 2)
    z = sum_p = sum_r = 0.0
    for first in grid:
        phis = [np.full((1,) * (n - 2), first), *mesh]
        phis.append(-sum(phis))

        def phi(x0, x1, phis=phis):
            return phis[(x0 % l0) + l0 * (x1 % l1)]

        plaq = sum(np.cos(p) for p in phis)
        rect = sum(
            np.cos(phi(a, b) + phi(a + 1, b)) + np.cos(phi(a, b) + phi(a, b + 1)) for a in range(l0) for b in range(l1)
        )
        w = np.broadcast_to(np.exp(beta * (c0 * plaq + c1 * rect)), shape)
        z += w.sum()
        sum_p += (w * plaq).sum()
        sum_r += (w * rect).sum()
    return sum_p / z / n, sum_r / z / (2 * n)


@pytest.mark.parametrize(
    "act",
    [
        pytest.param(PlaquetteRectangleAction(0.8, -0.25, "u1"), id="c1=-0.25"),
        pytest.param(DBW2GaugeAction(0.15, "u1"), id="dbw2"),
    ],
)
def test_hmc_matches_exact_2d_u1(act, one_thread):
    """2D U(1) on 3 x 2, 512 hot chains (seed 5), Omelyan 6 steps, tau = 1: 150 trajectories,
    the first 20 dropped; <P> and <R> within 3 Gamma-method sigma (~0.002) of the exact
    torus values, acceptance > 0.9 and <exp(-dH)> = 1 within 3 sigma."""
    c = act.coefficients()
    exact = dict(
        zip(("plaquette", "rectangle"), _exact_u1_torus(act.beta, c["plaquette"], c["rectangle"]), strict=True)
    )
    g = gen(5)
    k = HMC(act, integrator="omelyan", steps=6, trajectory_length=1.0)
    chain = Chain(k, k.init(act.hot_start((3, 2), 512, generator=g)), g, measure=act.loop_means)
    chain.run(150)
    h = chain.history_tensors()
    assert float(h["accepted"].float().mean()) > 0.9
    for key, value in exact.items():
        r = gamma_method(h[key][20:], step_axis=0)
        assert r.error < 0.004
        assert abs(r.mean - value) < SIGMA * r.error, (key, r.mean, r.error, value)
    w = gamma_method(torch.exp(-h["delta_h"][20:]), step_axis=0)
    assert abs(w.mean - 1.0) < SIGMA * w.error


def _metropolis(act, lattice, batch, sweeps, eps, g):
    """Single-link Metropolis that only evaluates act.action (independent of the force):
    U(1) theta <- theta + eps u, u uniform in (-1, 1); SU(N) U <- exp(eps X) U, X Gaussian in
    su(N) (both symmetric proposals). Returns the loop means after every sweep."""
    x = act.hot_start(lattice, batch, generator=g)
    s = act.action(x)
    links = [(mu, *site) for mu in range(len(lattice)) for site in itertools.product(*map(range, lattice))]
    history, accepted = [], 0
    for _ in range(sweeps):
        for link in links:
            index = (slice(None), *link)
            new = x.clone()
            if act.n == 1:
                new[index] = groups.wrap_angle(x[index] + eps * (2 * torch.rand(batch, generator=g) - 1))
            else:
                step = groups.random_algebra((batch,), act.n, generator=g)
                new[index] = groups.expmap(eps * step) @ x[index]
            s_new = act.action(new)
            ok = torch.log(torch.rand(batch, dtype=torch.float64, generator=g)) < s - s_new
            x = torch.where(ok.view(batch, *([1] * (x.dim() - 1))), new, x)
            s = torch.where(ok, s_new, s)
            accepted += int(ok.sum())
        history.append(act.loop_means(x))
    assert 0.3 < accepted / (sweeps * len(links) * batch) < 0.9
    return {key: torch.stack([m[key] for m in history]) for key in history[0]}


@pytest.mark.slow
@pytest.mark.parametrize(
    "act,lattice,eps",
    [
        pytest.param(IwasakiGaugeAction(1.0, "su2"), (4, 3), 0.8, id="iwasaki-su2-2d"),
        pytest.param(MILCSymanzikAction(1.2, u0=0.8, group="u1"), (3, 2, 2), 1.2, id="milc-u1-3d"),
    ],
)
def test_hmc_agrees_with_metropolis(act, lattice, eps, one_thread):
    """256 chains each (seed 3): single-link Metropolis (60 sweeps, first 20 dropped) and HMC
    (Omelyan 4 steps, 70 trajectories, first 15 dropped) from hot starts; every loop mean
    (plaquette, rectangle, and the parallelogram in 3D) agrees within 3 combined Gamma-method
    sigma (~0.005)."""
    g = gen(3)
    metro = _metropolis(act, lattice, 256, 60, eps, g)
    k = HMC(act, integrator="omelyan", steps=4, trajectory_length=1.0)
    chain = Chain(k, k.init(act.hot_start(lattice, 256, generator=g)), g, measure=act.loop_means)
    chain.run(70)
    h = chain.history_tensors()
    assert float(h["accepted"].float().mean()) > 0.8
    assert set(metro) == set(act.loop_means(act.cold_start(lattice))) and len(metro) == (2 if len(lattice) == 2 else 3)
    for key in metro:
        rm = gamma_method(metro[key][20:], step_axis=0)
        rh = gamma_method(h[key][15:], step_axis=0)
        sigma = math.hypot(rm.error, rh.error)
        assert sigma < 0.008
        assert abs(rm.mean - rh.mean) < SIGMA * sigma, (key, rm, rh)


# ---------------------------------------------------------------- the hmc job


def _hmc_cfg(tmp_path, *overrides):
    from flowplug.jobs import hmc as hmc_job

    base = [
        f"out={tmp_path / 'run'}",
        "progress=false",
        "chains=2",
        "hmc.trajectories=4",
        "hmc.thermalization=1",
        "hmc.steps=4",
        "save_every=4",
        "format='none'",
    ]
    return _config.build_config(
        hmc_job.DEFAULT_CONFIG, overrides=base + list(overrides), open_tables=getattr(hmc_job, "OPEN_TABLES", ())
    )


@pytest.mark.filterwarnings("ignore::flowplug.jobs.summary.ShortChainWarning")
def test_hmc_job_runs_an_improved_action(tmp_path, fresh_pm):
    from flowplug.jobs.hmc import run_hmc

    s = run_hmc(_hmc_cfg(tmp_path, "action.name='iwasaki'", "action.group='su2'", "action.beta=1.5", "lattice=[4,3]"))
    assert s["action"] == {"name": "iwasaki", "beta": 1.5, "group": "su2"}
    assert s["acceptance"] > 0.5 and 0.0 < s["observables"]["plaquette"]["mean"] < 1.0


@pytest.mark.filterwarnings("ignore::flowplug.jobs.summary.ShortChainWarning")
def test_hmc_job_runs_milcs_action_from_the_milc_file(tmp_path, fresh_pm, shared_dir):
    """`flowplug hmc` with the action the MILC sample file states (its [action] table,
    read from its metadata), started from the file itself."""
    from flowplug import io
    from flowplug.jobs.hmc import run_hmc

    path = shared_dir / "ensembles" / "milc.lat.sample.l4444.ildg"
    table = io.read(path).meta[0].header["action"]
    sets = [f"action.{k}={v!r}" if isinstance(v, str) else f"action.{k}={v}" for k, v in table.items()]
    s = run_hmc(_hmc_cfg(tmp_path, *sets, f"start='{path}'", "chains=1", "hmc.trajectories=3", "hmc.steps=10"))
    assert s["action"] == {
        "name": "milc-symanzik",
        "beta": 7.0,
        "u0": 0.8441,
        "nf": 0.0,
        "variant": "1loop",
        "group": "su3",
    }
    assert s["acceptance"] > 0.3 and 0.5 < s["observables"]["plaquette"]["mean"] < 0.7
