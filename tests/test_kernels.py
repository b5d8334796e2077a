"""Exactness and bookkeeping of the flow kernels (independence Metropolis, mixtures,
compositions, flow-transformed HMC) on 2D U(1) and SU(2) against exact torus values.

Statistical tests state their seed, their statistics and the sigma they allow: every
estimate must agree with the exact value within 3 sigma (Gamma-method errors over many
independent chains, flowplug.stats). The flows are deliberately poor (a bare prior, or a
flow with random weights, or one trained for a few dozen steps): the samplers must be
exact whatever the flow, only their acceptance depends on it.
"""

from __future__ import annotations

import math

import pytest
import torch

from flowplug.chain import Chain, ChainState
from flowplug.exact import su2_2d, u1_2d
from flowplug.flow import Flow, build_flow, make_prior
from flowplug.metropolis import independence_log_accept
from flowplug.plugins.hmc import HMC
from flowplug.plugins.kernels import Composition, FlowHMC, IndependenceMetropolis, Mixture
from flowplug.plugins.observables import plaquette, topological_charge
from flowplug.plugins.theories import WilsonGaugeAction
from flowplug.stats import gamma_method
from flowplug.train import Trainer

SIGMA = 3.0


pytestmark = pytest.mark.usefixtures("one_thread")


def _u1_measure(x):
    return {"plaquette": plaquette(x), "q2": topological_charge(x) ** 2}


def _check(chain, exact, burn, names):
    h = chain.history_tensors()
    out = {}
    for name in names:
        r = gamma_method(h[name][burn:], step_axis=0)
        dev = (r.mean - exact[name]) / r.error
        out[name] = (r.mean, r.error, dev)
        assert abs(dev) < SIGMA, f"{name}: {r.mean:.5f} +- {r.error:.5f} vs exact {exact[name]:.6f} ({dev:+.1f} sigma)"
        assert r.error < 0.08 * max(abs(exact[name]), 0.1), f"{name}: error {r.error} too large to test anything"
    return out


def _thermalized(act, lattice, batch, g, n=30):
    """Equilibrium start configurations from HMC (exact; not from any flow)."""
    hmc = HMC(act, integrator="omelyan", steps=4)
    st = hmc.init(act.cold_start(lattice, batch))
    for _ in range(n):
        st, _ = hmc.step(st, g)
    return st.x


def _bare_prior_flow(field, lattice):
    """The crudest possible proposal: the prior itself (uniform angles / Haar links)."""
    return Flow(make_prior(None, lattice=lattice, field=field), [], field=field, lattice=lattice)


def _random_flow(field, lattice, layer, n_layers, seed, noise=0.3):
    """A flow with random (untrained, non-identity) weights: invertible but poor."""
    torch.manual_seed(seed)
    flow = build_flow(field, lattice, layer, n_layers=n_layers, options={"hidden": [4], "dtype": "float64"})
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(noise * torch.randn_like(p))
    return flow.eval()


@pytest.fixture(scope="module")
def u1_l4_flow():
    """2D U(1), L = 4, beta = 1.5: a u1-spline flow trained for only 60 steps (barely trained)."""
    torch.set_num_threads(1)
    act = WilsonGaugeAction(1.5, "u1")
    torch.manual_seed(11)
    flow = build_flow("u1", (4, 4), "u1-spline", n_layers=4, options={"hidden": [8], "dtype": "float64"})
    Trainer(flow, act, {"steps": 60, "batch_size": 64, "lr": 0.01, "progress": False}, seed=12).run()
    return flow.eval(), act


# ---------------------------------------------------------------- bookkeeping


def test_im_bookkeeping_on_rejection_and_inverse_log_q():
    """Rejected chains keep x, log p and log q; log q of foreign states from the inverse flow."""
    act = WilsonGaugeAction(2.0, "u1")
    flow = _random_flow("u1", (4, 4), "u1-ncp", 2, seed=3)
    k = IndependenceMetropolis(flow, act)
    g = torch.Generator().manual_seed(5)
    x0 = act.hot_start((4, 4), 64, generator=g)  # not from the flow
    st = ChainState(x0, -act.action(x0))  # no log q: the kernel must compute it
    seen_reject = seen_accept = False
    for _ in range(20):
        old = st
        st, info = k.step(st, g)
        acc = info["accepted"]
        # the current log q used by the test is the inverse-flow density of the old state
        torch.testing.assert_close(info["log_q_current"], flow.log_prob(old.x).detach(), rtol=0, atol=1e-9)
        rej = ~acc
        if rej.any():
            seen_reject = True
            torch.testing.assert_close(st.x[rej], old.x[rej], rtol=0, atol=0)
            torch.testing.assert_close(st.log_p[rej], old.log_p[rej], rtol=0, atol=0)
            if "log_q" in old.extras:
                torch.testing.assert_close(st.extras["log_q"][rej], old.extras["log_q"][rej], rtol=0, atol=0)
        if acc.any():
            seen_accept = True
            torch.testing.assert_close(st.log_p[acc], info["log_p_proposal"][acc], rtol=0, atol=0)
            torch.testing.assert_close(st.extras["log_q"][acc], info["log_q_proposal"][acc], rtol=0, atol=0)
        # the cached values are those of the current x, for every chain
        torch.testing.assert_close(st.log_p, -act.action(st.x), rtol=0, atol=1e-10)
        torch.testing.assert_close(st.extras["log_q"], flow.log_prob(st.x).detach(), rtol=0, atol=1e-8)
        # the acceptance decision is the float64 Metropolis rule
        la = independence_log_accept(
            info["log_p_proposal"], info["log_q_proposal"], info["log_p_current"], info["log_q_current"]
        )
        torch.testing.assert_close(la, info["log_accept"], rtol=0, atol=0)
    assert seen_reject and seen_accept


def test_stale_log_q_is_recomputed_after_hmc_moves():
    act = WilsonGaugeAction(1.0, "u1")
    flow = _random_flow("u1", (4, 4), "u1-ncp", 2, seed=4)
    im, hmc = IndependenceMetropolis(flow, act), HMC(act, steps=4)
    g = torch.Generator().manual_seed(2)
    st = im.init(act.hot_start((4, 4), 16, generator=g))
    st, _ = hmc.step(st, g)
    assert "log_q" not in st.extras or torch.allclose(st.extras["log_q"], flow.log_prob(st.x))
    _, info = im.step(st, g)
    torch.testing.assert_close(info["log_q_current"], flow.log_prob(st.x).detach(), rtol=0, atol=1e-9)


def test_field_mismatch_is_an_error():
    from flowplug.errors import ConfigError

    with pytest.raises(ConfigError, match="su2"):
        IndependenceMetropolis(_bare_prior_flow("su2", (4, 4)), WilsonGaugeAction(1.0, "u1"))


def test_mixture_and_composition_validate_and_report():
    from flowplug.errors import ConfigError

    act = WilsonGaugeAction(1.0, "u1")
    im = IndependenceMetropolis(_bare_prior_flow("u1", (4, 4)), act)
    with pytest.raises(ConfigError):
        Mixture([im], [0.5, 0.5])
    with pytest.raises(ConfigError):
        Mixture([im, im], [-1, 2])
    with pytest.raises(ConfigError):
        Composition([im], [0])
    g = torch.Generator().manual_seed(0)
    mix = Mixture([HMC(act, steps=3), im], [0.5, 0.5], labels=["hmc", "flow"])
    st = mix.init(act.hot_start((4, 4), 32, generator=g))
    st2, info = mix.step(st, g)
    ch = info["choice"]
    assert set(ch.tolist()) == {0, 1}
    assert torch.isnan(info["accepted.hmc"][ch == 1]).all() and torch.isnan(info["accepted.flow"][ch == 0]).all()
    torch.testing.assert_close(st2.log_p, -act.action(st2.x), rtol=0, atol=1e-10)
    comp = Composition([HMC(act, steps=3), im], [2, 1])
    st3, info = comp.step(st2, g)
    assert set(info) >= {"accepted", "accepted.hmc", "accepted.independence-metropolis", "delta_h"}
    torch.testing.assert_close(st3.log_p, -act.action(st3.x), rtol=0, atol=1e-10)


# ---------------------------------------------------------------- exactness, U(1)


@pytest.mark.slow
def test_im_bare_prior_u1_l4_exact():
    """Deliberately poor flow (uniform angles, acceptance ~6%) on L=4, beta=1.0.

    1024 chains started from HMC configurations (log q from the inverse flow), 400 steps,
    seed 1. (From uniform starts the chains need far longer to forget the start: heavy
    importance weights are the price of a poor flow, not a bias of the stationary law.)
    """
    L, beta = 4, 1.0
    act = WilsonGaugeAction(beta, "u1")
    k = IndependenceMetropolis(_bare_prior_flow("u1", (L, L)), act)
    g = torch.Generator().manual_seed(1)
    ch = Chain(k, k.init(_thermalized(act, (L, L), 1024, g)), g, measure=_u1_measure)
    ch.run(400)
    acc = float(ch.history_tensors()["accepted"].mean())
    assert 0.02 < acc < 0.2
    _check(ch, u1_2d(L, beta), 0, ("plaquette", "q2"))


@pytest.mark.slow
def test_im_random_flow_u1_l4_exact():
    """Random-weight u1-ncp flow (invertible, poor) at L=4, beta=1.0; HMC start configurations."""
    L, beta = 4, 1.0
    act = WilsonGaugeAction(beta, "u1")
    flow = _random_flow("u1", (L, L), "u1-ncp", 2, seed=7)
    k = IndependenceMetropolis(flow, act)
    g = torch.Generator().manual_seed(2)
    ch = Chain(k, k.init(_thermalized(act, (L, L), 512, g)), g, measure=_u1_measure)
    ch.run(300)
    _check(ch, u1_2d(L, beta), 0, ("plaquette", "q2"))


@pytest.mark.slow
def test_im_barely_trained_flow_u1_exact(u1_l4_flow):
    """Barely trained flow, L=4, beta=1.5: 256 chains x 200 steps, seed 3."""
    flow, act = u1_l4_flow
    k = IndependenceMetropolis(flow, act)
    g = torch.Generator().manual_seed(3)
    ch = Chain(k, k.init(_thermalized(act, (4, 4), 256, g)), g, measure=_u1_measure)
    ch.run(200)
    assert float(ch.history_tensors()["accepted"].mean()) > 0.05
    _check(ch, u1_2d(4, 1.5), 0, ("plaquette", "q2"))


@pytest.mark.slow
def test_composition_hmc_then_flow_u1_exact(u1_l4_flow):
    """Two HMC trajectories then one flow proposal, from cold starts: 256 chains x 120 cycles, seed 4."""
    flow, act = u1_l4_flow
    k = Composition(
        [HMC(act, integrator="omelyan", steps=4, trajectory_length=1.0), IndependenceMetropolis(flow, act)], [2, 1]
    )
    g = torch.Generator().manual_seed(4)
    ch = Chain(k, k.init(act.cold_start((4, 4), 256)), g, measure=_u1_measure)
    ch.run(120)
    assert float(ch.history_tensors()["accepted"].mean()) > 0.05  # the flow step does move chains
    _check(ch, u1_2d(4, 1.5), 20, ("plaquette", "q2"))


@pytest.mark.slow
def test_mixture_hmc_flow_u1_exact(u1_l4_flow):
    """Random choice HMC 0.4 / flow 0.6 per chain and step: 256 chains x 150 steps, seed 5."""
    flow, act = u1_l4_flow
    k = Mixture([HMC(act, integrator="omelyan", steps=4), IndependenceMetropolis(flow, act)], [0.4, 0.6])
    g = torch.Generator().manual_seed(5)
    ch = Chain(k, k.init(act.cold_start((4, 4), 256)), g, measure=_u1_measure)
    ch.run(150)
    _check(ch, u1_2d(4, 1.5), 30, ("plaquette", "q2"))


@pytest.mark.slow
def test_flow_hmc_u1_l6_exact():
    """Flow-transformed HMC with a random-weight flow, L=6, beta=2.0: 128 chains x 100, seed 6."""
    L, beta = 6, 2.0
    act = WilsonGaugeAction(beta, "u1")
    flow = _random_flow("u1", (L, L), "u1-ncp", 2, seed=8)
    k = FlowHMC(flow, act, integrator="leapfrog", steps=4, trajectory_length=1.0)
    g = torch.Generator().manual_seed(6)
    ch = Chain(k, k.init(act.cold_start((L, L), 128)), g, measure=_u1_measure)
    ch.run(100)
    h = ch.history_tensors()
    assert float(h["accepted"].mean()) > 0.5
    r = gamma_method(torch.exp(-h["delta_h"][20:]), step_axis=0)  # <exp(-dH)> = 1
    assert abs(r.mean - 1) < SIGMA * r.error + 1e-3
    _check(ch, u1_2d(L, beta), 20, ("plaquette",))


def test_flow_hmc_reversible_latent_dynamics():
    """The latent integrator is reversible: (z, p) -> (z', p') -> (z', -p') returns to (z, -p)."""
    act = WilsonGaugeAction(2.0, "u1")
    flow = _random_flow("u1", (4, 4), "u1-ncp", 2, seed=9)
    k = FlowHMC(flow, act, steps=6, trajectory_length=0.5)
    g = torch.Generator().manual_seed(0)
    z = act.hot_start((4, 4), 4, generator=g)
    p = torch.randn(z.shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        z1, p1 = k.hmc.integrate(z, p)
        z2, p2 = k.hmc.integrate(z1, -p1)
    assert float((z2 - z).abs().max()) < 1e-9 and float((p2 + p).abs().max()) < 1e-9


# ---------------------------------------------------------------- exactness, SU(2)


@pytest.mark.slow
def test_im_and_composition_su2_exact():
    """SU(2), L=4, beta=1.0: Haar proposals alone (512 x 200) and HMC+flow cycles (64 x 80)."""
    L, beta = 4, 1.0
    act = WilsonGaugeAction(beta, "su2")
    exact = su2_2d(L, beta)
    flow = _bare_prior_flow("su2", (L, L))
    measure = lambda x: {"plaquette": plaquette(x)}  # noqa: E731
    k = IndependenceMetropolis(flow, act)
    g = torch.Generator().manual_seed(7)
    ch = Chain(k, k.init(_thermalized(act, (L, L), 512, g)), g, measure=measure)
    ch.run(200)
    _check(ch, exact, 0, ("plaquette",))
    flow2 = _random_flow("su2", (L, L), "sun-spectral", 2, seed=10, noise=0.1)
    k2 = Composition(
        [HMC(act, integrator="omelyan", steps=4), IndependenceMetropolis(flow2, act)], [1, 1], labels=["hmc", "flow"]
    )
    ch2 = Chain(k2, k2.init(act.cold_start((L, L), 64)), g, measure=measure)
    acc = []
    ch2.run(80, on_step=lambda c, info: acc.append(float(info["accepted.flow"].mean())))
    assert sum(acc) / len(acc) > 0.05  # the flow step does move chains
    _check(ch2, exact, 10, ("plaquette",))


def test_kernels_are_registered(fresh_pm):
    from flowplug import get_component

    for name, cls in (
        ("independence-metropolis", IndependenceMetropolis),
        ("flow", IndependenceMetropolis),
        ("mixture", Mixture),
        ("composition", Composition),
        ("flow-hmc", FlowHMC),
    ):
        assert get_component("kernel", name).factory is cls
    assert get_component("kernel", "flow").provider == "flowplug"


def test_frozen_chains_report_unmeasurable_tau():
    from flowplug.jobs.summary import observable_summary

    h = {"plaquette": torch.full((20, 3), 0.5, dtype=torch.float64)}
    s = observable_summary(h, ["plaquette"])["plaquette"]
    assert s["tau_int"] == math.inf and math.isnan(s["error"]) and "no chain" in s["note"]


def test_exact_values_match_the_shared_reference(shared_dir):
    """flowplug.exact against ../shared/reference (U(1) L = 8, 16; SU(2) L = 8, 16)."""
    rows = [
        ln.split()
        for ln in (shared_dir / "reference" / "u1_2d_exact.txt").read_text().splitlines()
        if ln.strip() and not ln.lstrip().startswith("#") and ln.split()[0].isdigit()
    ]
    assert len(rows) >= 10
    for r in rows:
        L, beta, p, q2 = int(r[0]), float(r[1]), float(r[2]), float(r[4])
        ex = u1_2d(L, beta)
        assert ex["plaquette"] == pytest.approx(p, abs=2e-11) and ex["q2"] == pytest.approx(q2, rel=1e-9)
    text = (shared_dir / "reference" / "sun_2d_exact.txt").read_text()
    su2 = text.split("## SU2")[1].split("##")[0]
    n = 0
    for ln in su2.splitlines():
        parts = ln.split()
        if parts and parts[0][0].isdigit():
            beta = float(parts[0])
            assert su2_2d(8, beta)["plaquette"] == pytest.approx(float(parts[2]), abs=1e-11)
            assert su2_2d(16, beta)["plaquette"] == pytest.approx(float(parts[3]), abs=1e-11)
            n += 1
    assert n >= 10
    assert u1_2d(4, 0.0)["q2"] == pytest.approx(16 / 12, abs=1e-12)  # beta = 0: V/12 exactly


@pytest.mark.slow
def test_flow_hmc_and_mixture_su2_exact():
    """SU(2), L=4, beta=1.0: flow HMC (random spectral flow) mixed 50/50 with flow proposals.

    48 chains x 60 steps from HMC starts, seed 8; leapfrog, 4 steps of 0.15. (Not from cold
    starts: degenerate eigenvalues of unit links make the spectral layer's autograd force
    undefined.)
    """
    L, beta = 4, 1.0
    act = WilsonGaugeAction(beta, "su2")
    flow = _random_flow("su2", (L, L), "sun-spectral", 2, seed=12, noise=0.1)
    k = Mixture(
        [FlowHMC(flow, act, integrator="leapfrog", steps=4, trajectory_length=0.6), IndependenceMetropolis(flow, act)],
        [0.5, 0.5],
        labels=["flow-hmc", "flow"],
    )
    g = torch.Generator().manual_seed(8)
    ch = Chain(k, k.init(_thermalized(act, (L, L), 48, g, n=10)), g, measure=lambda x: {"plaquette": plaquette(x)})
    acc = []
    ch.run(60, on_step=lambda c, info: acc.append(float(torch.nanmean(info["accepted.flow-hmc"]))))
    assert sum(acc) / len(acc) > 0.3
    _check(ch, su2_2d(L, beta), 10, ("plaquette",))
