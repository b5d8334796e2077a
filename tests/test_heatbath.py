"""Heatbath and overrelaxation kernels (flowplug.plugins.heatbath) for the SU(N) Wilson action.

Exactness against the exact 2D SU(2)/SU(3) plaquette on the 8 x 8 torus (character
expansion: flowplug.exact.su2_2d, and c_F / (3 c_0) for SU(3), equal to the torus value
of ../shared/reference/sun_2d_exact.txt to 1e-15 there; the table is compared when
present), the Kennedy-Pendleton / Creutz SU(2) sampler against the moments of its
density, overrelaxation's conservation of S and reversibility, the colouring, and
the 4D SU(3) plaquette against HMC.

Statistical tests state their seed and statistics; estimates must agree within 3 sigma
(Gamma-method errors over independent chains as replicas, flowplug.stats; i.i.d.
standard errors for the sampler's independent draws).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from flowplug.chain import Chain, ChainState
from flowplug.errors import ConfigError
from flowplug.exact import bessel_i, su2_2d
from flowplug.gauge import plaquette, unitarity_deviation
from flowplug.groups import haar_random
from flowplug.plugins.heatbath import (
    Checkerboard,
    Heatbath,
    HeatbathOR,
    Overrelaxation,
    heatbath_links,
    overrelax_links,
    overrelaxation_sweep,
    sample_a0,
    su2_block,
    su2_matrix,
    subgroups,
)
from flowplug.plugins.hmc import HMC
from flowplug.plugins.theories import Phi4Action, WilsonGaugeAction
from flowplug.stats import gamma_method

SIGMA = 3.0

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------- exact values


def _su3_2d_infinite(beta: float, k_max: int = 40) -> float:
    """<(1/3) Re tr P> of 2D SU(3) in infinite volume: c_F / (3 c_0),
    c_lambda = sum_k det_ij I_{lambda_j + k - j + i}(beta/3) (reference/README.md)."""

    def c(lam: tuple[int, int, int]) -> float:
        return float(
            sum(
                np.linalg.det(np.array([[bessel_i(lam[j] + k - j + i, beta / 3) for j in range(3)] for i in range(3)]))
                for k in range(-k_max, k_max + 1)
            )
        )

    return c((1, 0, 0)) / (3 * c((0, 0, 0)))


def _exact_2d(n: int, beta: float) -> float:
    """Exact <P> of 2D SU(N) Wilson on the 8 x 8 torus (SU(3): infinite volume, equal to 1e-15 here)."""
    return su2_2d(8, beta)["plaquette"] if n == 2 else _su3_2d_infinite(beta)


def _table(shared_dir, group: str) -> dict[float, float]:
    """beta -> <P>_L8 of sun_2d_exact.txt's section ``## SU2`` / ``## SU3``."""
    out: dict[float, float] = {}
    section = None
    for line in (shared_dir / "reference" / "sun_2d_exact.txt").read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].split()[0]
            continue
        parts = line.split()
        if section == group and parts and parts[0][0].isdigit():
            out[float(parts[0])] = float(parts[2])
    return out


def test_exact_values_match_the_shared_table(shared_dir):
    """The exact values these tests use equal the reference table's L = 8 column."""
    for n, group in ((2, "SU2"), (3, "SU3")):
        table = _table(shared_dir, group)
        assert len(table) >= 8
        for beta, p in table.items():
            assert _exact_2d(n, beta) == pytest.approx(p, abs=1e-9), (group, beta)


# ------------------------------------------------------------------- SU(2) pieces


def test_su2_block_carries_the_subgroup_part_of_re_tr():
    """Re tr(R W) = Re tr(r w~) + sum_{l != i,j} Re W_ll and det w~ = k^2 for random W and r."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 3, 3, 2, generator=g, dtype=torch.float64)
    w = torch.complex(w[..., 0], w[..., 1])
    r = haar_random((50,), 2, generator=g)
    for i, j in subgroups(3):
        a, b = su2_block(w, i, j)
        wt = su2_matrix(a, b)
        big = torch.eye(3, dtype=w.dtype).repeat(50, 1, 1)
        big[:, [i, i, j, j], [i, j, i, j]] = r.reshape(50, 4)
        rest = sum(w[:, m, m].real for m in range(3) if m not in (i, j))
        lhs = torch.diagonal(big @ w, dim1=-2, dim2=-1).sum(-1).real
        rhs = torch.diagonal(r @ wt, dim1=-2, dim2=-1).sum(-1).real + rest
        torch.testing.assert_close(lhs, rhs, rtol=0, atol=1e-12)
        torch.testing.assert_close(torch.linalg.det(wt).real, a.abs() ** 2 + b.abs() ** 2, rtol=0, atol=1e-12)


def _moments(alpha: float) -> tuple[float, float]:
    """<a0> = I_2/I_1 and <a0^2> = (I_3 + I_2/alpha)/I_1 of sqrt(1 - a0^2) exp(alpha a0)."""
    i1, i2, i3 = (float(bessel_i(n, alpha)) for n in (1, 2, 3))
    return i2 / i1, (i3 + i2 / alpha) / i1


@pytest.mark.parametrize(
    "alpha,method",
    [
        (0.3, "auto"),
        (0.3, "creutz"),
        (0.6, "kp"),
        (1.7, "auto"),
        (5.0, "kp"),
        (5.0, "auto"),
        (5.0, "creutz"),
        (30.0, "auto"),
    ],
)
def test_su2_sampler_matches_the_moments_of_its_density(alpha, method):
    """100 000 draws (seed 1): <a0> = I_2(alpha)/I_1(alpha) and <a0^2> within 3 standard errors,
    for small and large alpha, Kennedy-Pendleton alone, Creutz alone and the automatic mix."""
    g = torch.Generator().manual_seed(1)
    m = 100_000
    a0, tries = sample_a0(torch.full((m,), alpha, dtype=torch.float64), g, method=method)
    assert a0.shape == (m,) and a0.dtype == torch.float64
    assert bool((a0.abs() <= 1).all()) and bool((tries >= 1).all())
    mean, second = _moments(alpha)
    for values, exact in ((a0, mean), (a0**2, second)):
        err = float(values.std()) / math.sqrt(m)
        assert abs(float(values.mean()) - exact) < SIGMA * err, (alpha, method, float(values.mean()), exact, err)
    if method == "creutz":  # tries = 1 / acceptance, acceptance pi I_1 / (2 sinh alpha)
        acc = math.pi * float(bessel_i(1, alpha)) / (2 * math.sinh(alpha))
        assert float(tries.double().mean()) == pytest.approx(1 / acc, rel=0.02)


def test_su2_sampler_edge_cases():
    g = torch.Generator().manual_seed(2)
    a0, tries = sample_a0(torch.zeros(20_000, dtype=torch.float64), g)  # Haar: <a0> = 0, <a0^2> = 1/4
    assert abs(float(a0.mean())) < 3 * 0.5 / math.sqrt(20_000)
    assert abs(float((a0**2).mean()) - 0.25) < 0.01
    a0, tries = sample_a0(torch.zeros(0, dtype=torch.float64), g)
    assert a0.shape == (0,) and tries.shape == (0,)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite and >= 0"):
            sample_a0(torch.tensor([1.0, bad], dtype=torch.float64), g)
    with pytest.raises(ValueError, match="method"):
        sample_a0(torch.ones(3, dtype=torch.float64), g, method="metropolis")


def test_su2_heatbath_of_one_link_draws_its_conditional_distribution():
    """N = 2, one fixed staple A (seed 5, 100 000 copies): <Re tr(U A)> / (2k) = I_2(beta k) / I_1(beta k)."""
    g = torch.Generator().manual_seed(5)
    m, beta = 100_000, 1.3
    staple = (haar_random((1,), 2, generator=g) + 0.7 * haar_random((1,), 2, generator=g)).expand(m, 2, 2)
    link = haar_random((m,), 2, generator=g)
    new, tries = heatbath_links(link, staple, beta, g)
    assert new.shape == (m, 2, 2) and tries.shape == (m,) and bool((tries >= 1).all())
    assert float((new @ new.mH - torch.eye(2, dtype=new.dtype)).abs().max()) < 1e-13
    a, b = su2_block(staple[:1], 0, 1)
    k = float(torch.sqrt(a.abs() ** 2 + b.abs() ** 2))
    x = torch.diagonal(new @ staple, dim1=-2, dim2=-1).sum(-1).real / (2 * k)
    exact, _ = _moments(beta * k)
    err = float(x.std()) / math.sqrt(m)
    assert abs(float(x.mean()) - exact) < SIGMA * err, (float(x.mean()), exact, err)


# ------------------------------------------------------------------- colouring


@pytest.mark.parametrize("lattice", [(4, 4), (2, 4, 2), (2, 2, 2, 4)])
def test_checkerboard_staples_are_the_actions(lattice):
    g = torch.Generator().manual_seed(4)
    act = WilsonGaugeAction(2.0, "su3")
    x = act.hot_start(lattice, 2, generator=g)
    board = Checkerboard(lattice)
    v, d = board.volume, len(lattice)
    flat = x.reshape(2, d, v, 3, 3)
    ref = act.staples(x).reshape(2, d, v, 3, 3)
    seen = torch.zeros(d, v, dtype=torch.int64)
    for k, (mu, sites) in enumerate(board.classes):
        torch.testing.assert_close(board.staples(flat, k), ref[:, mu][:, sites], rtol=0, atol=1e-12)
        seen[mu, sites] += 1
    assert bool((seen == 1).all())  # every link in exactly one class
    assert len(board.classes) == 2 * d


@pytest.mark.parametrize("lattice", [(4, 4), (2, 4, 2)])
def test_no_link_of_a_class_is_in_the_staple_of_another(lattice):
    """Brute force: changing any one link of a class leaves the staples of the others unchanged."""
    g = torch.Generator().manual_seed(5)
    act = WilsonGaugeAction(2.0, "su2")
    x = act.hot_start(lattice, 1, generator=g)
    board = Checkerboard(lattice)
    v, d = board.volume, len(lattice)
    ref = act.staples(x).reshape(d, v, 2, 2)
    for mu, sites in board.classes:
        for s in sites.tolist():
            y = x.reshape(d, v, 2, 2).clone()
            y[mu, s] = haar_random((), 2, generator=g)
            new = act.staples(y.reshape(x.shape)).reshape(d, v, 2, 2)
            others = sites[sites != s]
            torch.testing.assert_close(new[mu, others], ref[mu, others], rtol=0, atol=1e-13)


@pytest.mark.parametrize("lattice", [(5, 4), (4, 3, 4), (4, 4, 4, 1)])
def test_odd_extents_are_refused_naming_expected_and_found(lattice):
    act = WilsonGaugeAction(2.0, "su2")
    x = act.cold_start(lattice, 2)
    odd = next(f"L_{a} = {n}" for a, n in enumerate(lattice) if n % 2)
    for kernel in (Heatbath(act), HeatbathOR(act), Overrelaxation(act)):
        with pytest.raises(ConfigError, match=f"odd extents: expected every extent even.*found {odd}"):
            kernel.init(x)
        with pytest.raises(ConfigError, match=f"{kernel.name}: the lattice"):  # a state from another init
            kernel.step(ChainState(x, -act.action(x)), torch.Generator().manual_seed(0))


# ------------------------------------------------------------------- overrelaxation


@pytest.mark.parametrize("n,lattice", [(2, (4, 4)), (3, (4, 4)), (3, (2, 4, 2, 2)), (4, (4, 2))])
def test_overrelaxation_conserves_the_action_and_reverses(n, lattice):
    """S unchanged to 1e-12 relative (a sweep moves links by O(1)); the reverse sweep undoes
    the sweep (only if the links of a class do not see each other); reflections are involutions."""
    g = torch.Generator().manual_seed(6)
    act = WilsonGaugeAction(3.0, f"su{n}")
    hb = Heatbath(act)
    state = hb.init(act.hot_start(lattice, 4, generator=g))
    for _ in range(3):
        state, _ = hb.step(state, g)
    x = state.x
    kernel = Overrelaxation(act, sweeps=2)
    new, info = kernel.step(state, g)
    assert not bool((new.x - x).abs().amax() < 0.1)  # the links do move
    s0, s1 = act.action(x), act.action(new.x)
    assert float(((s1 - s0) / s0).abs().max()) < 1e-12
    torch.testing.assert_close(new.log_p, -s1, rtol=0, atol=0)
    assert info["accepted"].dtype == torch.float64 and bool((info["accepted"] == 1).all())
    board = Checkerboard(lattice)
    back = overrelaxation_sweep(overrelaxation_sweep(x, board), board, reverse=True)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-10)
    # one link, one staple: reflecting twice (subgroups reversed for N > 2) is the identity
    link = haar_random((100,), n, generator=g)
    staple = haar_random((100,), n, generator=g) + haar_random((100,), n, generator=g)
    once = overrelax_links(link, staple)
    tr = lambda u: torch.diagonal(u @ staple, dim1=-2, dim2=-1).sum(-1).real  # noqa: E731
    torch.testing.assert_close(tr(once), tr(link), rtol=0, atol=1e-12)
    torch.testing.assert_close(overrelax_links(once, staple, reverse=True), link, rtol=0, atol=1e-10)
    if n == 2:
        torch.testing.assert_close(overrelax_links(once, staple), link, rtol=0, atol=1e-10)


# ------------------------------------------------------------------- exactness


def _run(kernel, act, lattice, batch, steps, burn, seed):
    g = torch.Generator().manual_seed(seed)
    state = kernel.init(act.hot_start(lattice, batch, generator=g))
    chain = Chain(kernel, state, g, measure=lambda x: {"plaquette": plaquette(x)})
    chain.run(steps)
    h = chain.history_tensors()
    return chain, gamma_method(h["plaquette"][burn:], step_axis=0)


@pytest.mark.parametrize(
    "n,beta,overrelax,steps",
    [(2, 1.0, 0, 100), (2, 4.0, 0, 100), (2, 4.0, 2, 50), (3, 6.0, 0, 100), (3, 6.0, 2, 50), (3, 2.0, 0, 100)],
)
def test_2d_plaquette_is_exact(n, beta, overrelax, steps):
    """2D SU(N) on 8 x 8, 16 hot chains (seed 7), 10 steps dropped: <P> within 3 Gamma-method
    sigma of the exact torus value, for the heatbath alone and with overrelaxation; the small
    betas (1 for SU(2), 2 for SU(3)) exercise Creutz's sampler (small alpha), the others K-P's."""
    act = WilsonGaugeAction(beta, f"su{n}")
    kernel = HeatbathOR(act, overrelax=overrelax) if overrelax else Heatbath(act)
    chain, r = _run(kernel, act, (8, 8), 16, steps + 10, 10, seed=7)
    exact = _exact_2d(n, beta)
    assert r.error < 0.003
    assert abs(r.mean - exact) < SIGMA * r.error, (r.mean, r.error, exact)
    state = chain.state
    torch.testing.assert_close(state.log_p, -act.action(state.x), rtol=0, atol=0)
    assert float(unitarity_deviation(state.x).max()) < 1e-13
    h = chain.history_tensors()
    assert bool((h["accepted"] == 1).all())


@pytest.mark.slow
def test_4d_su3_plaquette_agrees_with_hmc():
    """SU(3), 4^4, beta = 6, 8 chains (seed 8): 15 heatbath-or sweeps (overrelax = 2) from a cold
    start (the plaquette settles within ~8), then 50 heatbath sweeps measured; HMC (Omelyan,
    5 steps, tau = 1) from the same thermalised configurations, 30 trajectories of which the
    first 5 are dropped. The plaquettes agree within 3 combined Gamma-method sigma (~1e-3)."""
    act = WilsonGaugeAction(6.0, "su3")
    g = torch.Generator().manual_seed(8)
    hbor = HeatbathOR(act, overrelax=2)
    state = hbor.init(act.cold_start((4, 4, 4, 4), 8))
    for _ in range(15):
        state, _ = hbor.step(state, g)
    x_therm = state.x
    chain = Chain(Heatbath(act), state, g, measure=lambda x: {"plaquette": plaquette(x)})
    chain.run(50)
    r_hb = gamma_method(chain.history_tensors()["plaquette"], step_axis=0)
    hmc = HMC(act, integrator="omelyan", steps=5)
    ch2 = Chain(hmc, hmc.init(x_therm), g, measure=lambda x: {"plaquette": plaquette(x)})
    ch2.run(30)
    h2 = ch2.history_tensors()
    r_hmc = gamma_method(h2["plaquette"][5:], step_axis=0)
    assert float(h2["accepted"].mean()) > 0.5
    sigma = math.hypot(r_hb.error, r_hmc.error)
    assert 0.58 < r_hb.mean < 0.62 and sigma < 0.002
    assert abs(r_hb.mean - r_hmc.mean) < SIGMA * sigma, (r_hb, r_hmc)


# ------------------------------------------------------------------- composition, bookkeeping


def test_heatbath_composes_with_flow_proposals_and_hmc():
    """2D SU(2), L = 4, beta = 2, 32 hot chains (seed 9): a cycle of 2 heatbath sweeps and one
    proposal of a bare Haar 'flow', and a mixture of heatbath, overrelaxation and HMC, both
    give the exact plaquette within 3 sigma; log q is never stale."""
    from flowplug.flow import Flow, make_prior
    from flowplug.plugins.kernels import Composition, IndependenceMetropolis, Mixture

    act = WilsonGaugeAction(2.0, "su2")
    exact = su2_2d(4, 2.0)["plaquette"]
    flow = Flow(make_prior(None, lattice=(4, 4), field="su2"), [], field="su2", lattice=(4, 4))
    hb = Heatbath(act)
    comp = Composition([hb, IndependenceMetropolis(flow, act)], [2, 1], labels=["heatbath", "flow"])
    mix = Mixture([hb, Overrelaxation(act), HMC(act, integrator="omelyan", steps=4)], [0.4, 0.3, 0.3])
    for kernel in (comp, mix):
        chain, r = _run(kernel, act, (4, 4), 32, 90, 10, seed=9)
        assert abs(r.mean - exact) < SIGMA * r.error, (kernel, r.mean, r.error, exact)
        st = chain.state
        torch.testing.assert_close(st.log_p, -act.action(st.x), rtol=0, atol=1e-10)
        if "log_q" in st.extras:
            torch.testing.assert_close(st.extras["log_q"], flow.log_prob(st.x).detach(), rtol=0, atol=1e-8)
    # the heatbath drops cached quantities of the old x
    x0 = act.hot_start((4, 4), 3, generator=torch.Generator().manual_seed(1))
    state = ChainState(x0, -act.action(x0), {"log_q": torch.zeros(3, dtype=torch.float64)})
    new, info = hb.step(state, torch.Generator().manual_seed(2))
    assert "log_q" not in new.extras and info["heatbath_proposals"].shape == (3,)
    assert bool((info["heatbath_proposals"] >= 1).all())


def test_steps_are_reproducible_from_the_generator():
    act = WilsonGaugeAction(5.0, "su3")
    x0 = act.hot_start((4, 4), 2, generator=torch.Generator().manual_seed(1))
    outs = []
    for seed in (10, 10, 11):
        kernel = HeatbathOR(act, overrelax=1)
        g = torch.Generator().manual_seed(seed)
        state = kernel.init(x0)
        for _ in range(3):
            state, _ = kernel.step(state, g)
        outs.append(state.x)
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_a_resumed_chain_is_the_uninterrupted_one(tmp_path):
    act = WilsonGaugeAction(5.0, "su3")
    x0 = act.hot_start((4, 4), 3, generator=torch.Generator().manual_seed(0))

    def chain(seed):
        kernel = HeatbathOR(act, overrelax=1)
        return Chain(
            kernel, kernel.init(x0), torch.Generator().manual_seed(seed), measure=lambda x: {"p": plaquette(x)}
        )

    whole = chain(1).run(6)
    first = chain(1).run(3)
    first.save(tmp_path / "c.pt")
    rest = chain(99)
    rest.load(tmp_path / "c.pt")
    rest.run(3)
    assert torch.equal(whole.state.x, rest.state.x)
    assert torch.equal(whole.history_tensors()["p"], rest.history_tensors()["p"])


def test_bad_actions_and_options_are_refused():
    for action, match in (
        (WilsonGaugeAction(2.0, "u1"), "Wilson action on SU\\(N\\) links"),
        (Phi4Action(-4.0, 8.0), "Wilson action on SU\\(N\\) links"),
        (WilsonGaugeAction(-1.0, "su2"), "beta >= 0"),
    ):
        with pytest.raises(ConfigError, match=match):
            Heatbath(action)
    act = WilsonGaugeAction(2.0, "su3")
    for options in ({"overrelax": -1}, {"overrelax": 1.5}, {"creutz_below": -1.0}, {"candidates": 0}):
        with pytest.raises(ConfigError, match="heatbath"):
            Heatbath(act, **options)
    with pytest.raises(ConfigError, match="sweeps"):
        Overrelaxation(act, sweeps=0)

    class Modified(WilsonGaugeAction):
        def action(self, x):
            return 2 * super().action(x)

    with pytest.raises(ConfigError, match="changes the Wilson action"):
        Heatbath(Modified(2.0, "su2"))


# ------------------------------------------------------------------- registry and CLI


def test_kernels_are_registered_and_listed(fresh_pm, capsys):
    from flowplug import get_component
    from flowplug.cli import main
    from flowplug.jobs.chains import build_kernel

    for name, cls in (
        ("heatbath", Heatbath),
        ("heatbath-or", HeatbathOR),
        ("overrelaxation", Overrelaxation),
        ("hb", Heatbath),
    ):
        assert get_component("kernel", name).factory is cls
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for name in ("heatbath", "heatbath-or", "overrelaxation"):
        assert any(line.startswith("kernel") and f" {name} " in line for line in out.splitlines()), name
    act = WilsonGaugeAction(2.0, "su3")
    kernel = build_kernel(None, act, {"type": "heatbath-or", "options": {"overrelax": 3}})
    assert isinstance(kernel, HeatbathOR) and kernel.overrelax == 3
    kernel = build_kernel(None, act, {"type": "heatbath", "hmc_every": 2})  # two HMC trajectories, then a sweep
    assert [type(k) for k in kernel.kernels] == [HMC, Heatbath]
    with pytest.raises(ConfigError, match="updates su2, su3 fields"):
        build_kernel(None, WilsonGaugeAction(2.0, "u1"), {"type": "heatbath"})
    with pytest.raises(ConfigError, match="rejects the options"):
        build_kernel(None, act, {"type": "heatbath", "options": {"sweeps": 2}})


def test_flowplug_sample_runs_the_heatbath(tmp_path, fresh_pm, capsys):
    """`flowplug sample` with kernel.type = heatbath (and overrelax = 1) on 2D SU(2), L = 8,
    beta = 2, 8 hot chains x 80 steps, 5 dropped (seed 1): the exact plaquette within 3 sigma."""
    from flowplug.cli import main

    out = tmp_path / "hb"
    args = ["sample", "--out", str(out), "--no-progress"]
    for kv in (
        "action.name=wilson",
        "action.group=su2",
        "action.beta=2.0",
        "lattice=[8,8]",
        "kernel.type=heatbath",
        "kernel.options.overrelax=1",
        "chains=8",
        "steps=80",
        "thermalize=5",
    ):
        args += ["--set", kv]
    assert main(args) == 0
    assert "steps of heatbath" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kernel"] == "heatbath" and "flow" not in summary  # no flow: no flow entries
    r = summary["observables"]["plaquette"]
    exact = su2_2d(8, 2.0)["plaquette"]
    assert 0 < r["error"] < 0.005
    assert abs(r["mean"] - exact) < SIGMA * r["error"], (r, exact)


def test_flowplug_sample_refuses_odd_extents(tmp_path, fresh_pm, capsys):
    from flowplug.cli import main

    args = ["sample", "--out", str(tmp_path / "odd"), "--no-progress"]
    for kv in ("action.name=wilson", "action.group=su3", "action.beta=5.0", "lattice=[6,5]", "kernel.type=heatbath"):
        args += ["--set", kv]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "odd extents" in err and "expected every extent even" in err and "L_1 = 5" in err
