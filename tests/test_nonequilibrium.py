"""Non-equilibrium (Jarzynski) proposals: flowplug.plugins.nonequilibrium.

* Jarzynski's equality <exp(-W)> = Z / Z_0 against exact partition functions of 2D
  lattice gauge theories on the 4 x 4 torus (character expansion: U(1) with uniform
  prior over Lebesgue angle measure, SU(2) and SU(3) with the Haar prior; checked against
  ../shared/reference when present), with heatbath and HMC updates, flow layers in the
  protocol and a flow as the start distribution.
* Exactness of the Markov chain: <P> against the exact torus values (SU(2), SU(3) with
  the heatbath; SU(2) and U(1) with HMC updates, whose endpoints are visibly out of
  equilibrium, so that a wrong acceptance shows), and in a cycle with HMC, which forces a
  reverse path (the work of a configuration the kernel did not propose) every step.
* Acceptance rising with n_step; deterministic replay of the decision and the stored
  state; non-finite works rejected; bookkeeping, resume, registry, sample / resample /
  propose.

Statistical tests state their seed and statistics; estimates agree within 3 sigma
(Gamma-method errors, flowplug.stats; independent chains as replicas).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from flowplug import io, metropolis
from flowplug.chain import Chain, ChainState
from flowplug.errors import ConfigError, UnknownComponentError
from flowplug.exact import bessel_i, su2_2d, u1_2d
from flowplug.flow import build_flow
from flowplug.gauge import plaquette
from flowplug.groups import haar_random
from flowplug.measure import measurement
from flowplug.plugins.heatbath import Checkerboard, heatbath_sweep
from flowplug.plugins.hmc import HMC
from flowplug.plugins.kernels import Composition, IndependenceMetropolis
from flowplug.plugins.nonequilibrium import (
    NonEquilibrium,
    jarzynski,
    linear_schedule,
    piecewise_linear_schedule,
    reversed_heatbath_sweep,
    thermodynamic_knots,
    with_coupling,
)
from flowplug.plugins.theories import Phi4Action, WilsonGaugeAction
from flowplug.stats import gamma_method

SIGMA = 3.0
L4 = (4, 4)

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ exact log Z


def u1_log_z(L: int, beta: float) -> float:
    """log Z of 2D U(1) on the L x L torus over Lebesgue angle measure:
    2V log(2 pi) + V log I_0 + log sum_n (I_n / I_0)^V (../shared/reference/README.md)."""
    v = L * L
    n = np.arange(-int(30 + 4 * beta), int(30 + 4 * beta) + 1)
    i_n = bessel_i(n, beta)
    i0 = i_n[n == 0][0]
    return 2 * v * math.log(2 * math.pi) + v * math.log(i0) + math.log(np.sum((i_n / i0) ** v))


def su2_log_z(L: int, beta: float) -> float:
    """log Z of 2D SU(2) on the L x L torus over normalised Haar measure: log sum_n (2 I_n / beta)^V."""
    v = L * L
    a = 2 * bessel_i(np.arange(1, int(40 + 4 * beta)), beta) / beta
    return v * math.log(a[0]) + math.log(np.sum((a / a[0]) ** v))


def su3_c(lam: tuple[int, int, int], beta: float, k_max: int = 40) -> float:
    """c_lambda(beta) = sum_k det_ij I_{lambda_j + k - j + i}(beta/3) (reference/README.md)."""
    return float(
        sum(
            np.linalg.det(np.array([[bessel_i(lam[j] + k - j + i, beta / 3) for j in range(3)] for i in range(3)]))
            for k in range(-k_max, k_max + 1)
        )
    )


def su3_log_z(L: int, beta: float) -> float:
    """log Z of 2D SU(3) on the L x L torus (Haar): log sum_lambda (c_lambda / d_lambda)^V over the
    irreps (p + q, q, 0) with p + q <= 4 (the rest are below 1e-30 relative at beta <= 4, V = 16)."""
    v = L * L
    c0 = su3_c((0, 0, 0), beta)
    total = 0.0
    for p in range(5):
        for q in range(5 - p):
            d = (p + 1) * (q + 1) * (p + q + 2) / 2
            total += (su3_c((p + q, q, 0), beta) / (d * c0)) ** v
    return v * math.log(c0) + math.log(total)


def test_exact_log_z_matches_the_shared_tables(shared_dir):
    """The helpers reproduce u1_2d_logz.txt (L = 8) and the SU(3) c_(0,0) of sun_2d_exact.txt."""
    rows = [
        line.split()
        for line in (shared_dir / "reference" / "u1_2d_logz.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#") and line.split()[0] == "8"
    ]
    assert len(rows) >= 4
    for _, beta, logz in rows:
        assert u1_log_z(8, float(beta)) == pytest.approx(float(logz), abs=2e-6)
    text = (shared_dir / "reference" / "sun_2d_exact.txt").read_text()
    for beta in (1.0, 4.0):
        tag = f"SU3 c_(0,0)(beta={beta}): Bessel-det "
        value = float(text.split(tag)[1].split()[0])
        assert su3_c((0, 0, 0), beta) == pytest.approx(value, rel=1e-11)


# ------------------------------------------------------------------ Jarzynski


def _check_jarzynski(kernel, n, seed, exact, lattice=L4):
    x, w, lp = kernel.sample(n, torch.Generator().manual_seed(seed), lattice=lattice)
    assert w.dtype == torch.float64 and w.shape == (n,) and bool(torch.isfinite(w).all())
    torch.testing.assert_close(lp, -kernel.action.action(x), rtol=0, atol=1e-10)
    j = jarzynski(w)
    assert j["mean_work"] >= -exact - 3 * float(w.std()) / math.sqrt(n)  # E[W] >= -log Z (Jensen)
    assert abs(j["log_ratio"] - exact) < SIGMA * j["error"], (j, exact)
    return j


@pytest.mark.parametrize(
    "group,beta,n_step,n",
    [("su2", 2.0, 8, 1024), ("su3", 4.0, 16, 768)],
)
def test_jarzynski_with_the_heatbath_gives_log_z(group, beta, n_step, n):
    """2D SU(N), L = 4, Haar start (beta_start = 0), linear protocol of heatbath sweeps, n
    independent evolutions (seed 1): log <exp(-W)> = log Z (exact torus value) within 3 sigma."""
    act = WilsonGaugeAction(beta, group)
    exact = su2_log_z(4, beta) if group == "su2" else su3_log_z(4, beta)
    j = _check_jarzynski(NonEquilibrium(act, n_step=n_step), n, 1, exact)
    assert j["error"] < 0.1 and j["ess"] > 0.05


#: A protocol that spends half its stages on the last quarter of the coupling range.
KNOTS_LATE = [[0.0, 0.0], [0.5, 2.25], [1.0, 3.0]]


def test_schedule_knots_protocol_gives_log_z_and_an_exact_chain():
    """2D SU(3), L = 4, beta = 3, heatbath stages on the non-uniform protocol KNOTS_LATE
    (schedule_knots): 512 evolutions (seed 1) give log <exp(-W)> = the exact torus log Z
    within 3 sigma, and 64 chains x 20 steps from the kernel's evolutions (seed 13), 4
    dropped, the exact plaquette (character expansion) within 3 sigma."""
    act = WilsonGaugeAction(3.0, "su3")
    kernel = NonEquilibrium(act, n_step=8, schedule_knots=KNOTS_LATE)
    assert kernel.schedule[3] == 2.25 and kernel.schedule[-1] == 3.0 and kernel.schedule[0] == 0.5625
    _check_jarzynski(kernel, 512, 1, su3_log_z(4, 3.0))
    _, r, acc = _from_evolutions(kernel, act, 64, 20, 4, seed=13)
    exact = 0.203075050030219  # L = 4 torus = infinite volume to 1e-10
    assert 0.1 < acc < 1.0 and r.error < 0.01
    assert abs(r.mean - exact) < SIGMA * r.error, (r, exact, acc)


def test_piecewise_and_thermodynamic_schedules():
    """Two knots are the linear protocol; knots interpolate linearly; equal thermodynamic length
    per stage: a constant metric gives the linear protocol, a metric 4 times larger on the upper
    half of the range (sqrt 2 times the length per unit coupling) puts 2/3 of the stages there."""
    assert piecewise_linear_schedule([[0, 0.0], [1, 2.0]], 4) == pytest.approx(linear_schedule(0.0, 2.0, 4))
    assert piecewise_linear_schedule(KNOTS_LATE, 4) == [1.125, 2.25, 2.625, 3.0]
    assert piecewise_linear_schedule(KNOTS_LATE, 0) == []
    knots = thermodynamic_knots([1.0, 2.0, 3.0], [5.0, 5.0, 5.0])
    assert np.allclose(knots, [[0.0, 1.0], [0.5, 2.0], [1.0, 3.0]], rtol=0, atol=1e-12)
    c = [0.0, 1.0, 1.0 + 1e-9, 2.0]
    knots = thermodynamic_knots(c, [1.0, 1.0, 4.0, 4.0])
    assert knots[1][0] == pytest.approx(1 / 3, abs=1e-8) and knots[-1] == [1.0, 2.0]
    assert sum(b > 1.0 for b in piecewise_linear_schedule(knots, 30)) == 20
    for bad, match in (
        ([[0, 0.0]], ">= 2 pairs"),
        ([[0, 0.0], [0.5, 1.0], [0.5, 2.0], [1, 3.0]], "rise strictly"),
        ([[0.1, 0.0], [1, 3.0]], "rise strictly"),
        ([[0, 0.0], [1, float("nan")]], "finite"),
        ([1.0, 2.0], "pairs"),
    ):
        with pytest.raises(ConfigError, match=match):
            piecewise_linear_schedule(bad, 4)
    with pytest.raises(ConfigError, match="monotone"):
        thermodynamic_knots([0.0, 2.0, 1.0], [1.0, 1.0, 1.0])
    with pytest.raises(ConfigError, match="> 0"):
        thermodynamic_knots([0.0, 1.0], [1.0, 0.0])
    with pytest.raises(ConfigError, match="one metric value each"):
        thermodynamic_knots([0.0, 1.0], [1.0])


def test_jarzynski_with_hmc_on_u1_gives_log_z():
    """2D U(1), L = 4, beta = 1, uniform prior (log q_0 = -2V log 2 pi), 8 stages of one HMC
    trajectory each, 2048 evolutions (seed 2): log <exp(-W)> = log Z over Lebesgue measure."""
    act = WilsonGaugeAction(1.0, "u1")
    kernel = NonEquilibrium(act, n_step=8, inner="hmc", steps=2, trajectory_length=0.5)
    assert kernel.inner == "hmc"
    _check_jarzynski(kernel, 2048, 2, u1_log_z(4, 1.0))


def _random_u1_flow(n_layers, seed, scale=0.3):
    torch.manual_seed(seed)
    flow = build_flow("u1", L4, "u1-ncp", n_layers=n_layers, options={"hidden": [4], "dtype": "float64"})
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn_like(p))
    return flow.eval()


def test_jarzynski_with_flow_layers_and_a_flow_start():
    """Flow layers in the protocol subtract their log-dets from W, and a flow as the start
    distribution adds its log q: with random (untrained) u1-ncp layers at stages 1 and 3 of a
    4-stage protocol, and with a random 2-layer flow as q_0 (beta_start = 0.5), 2048
    evolutions each (seeds 3, 4), log <exp(-W)> = log Z of 2D U(1), L = 4, beta = 1."""
    act = WilsonGaugeAction(1.0, "u1")
    layers = _random_u1_flow(2, 5).layers
    kernel = NonEquilibrium(
        act, n_step=4, inner="hmc", steps=2, trajectory_length=0.5, layers=[layers[0], None, layers[1], None]
    )
    _check_jarzynski(kernel, 2048, 3, u1_log_z(4, 1.0))
    flow = _random_u1_flow(2, 6)
    kernel = NonEquilibrium(act, n_step=4, beta_start=0.5, inner="hmc", steps=2, trajectory_length=0.5, flow=flow)
    assert kernel.schedule == [0.625, 0.75, 0.875, 1.0]
    _check_jarzynski(kernel, 2048, 4, u1_log_z(4, 1.0))


def test_zero_stages_is_independence_metropolis_with_q0():
    """n_step = 0: W = S(x_0) + log q_0(x_0), and the reverse work of x is S(x) + log q_0(x):
    the weights and the test of flow independence Metropolis."""
    act = WilsonGaugeAction(1.0, "u1")
    flow = _random_u1_flow(2, 7)
    kernel = NonEquilibrium(act, n_step=0, flow=flow)
    x, w, lp = kernel.sample(6, torch.Generator().manual_seed(1))
    with torch.no_grad():
        lq = flow.log_prob(x)
    torch.testing.assert_close(w, lq - lp, rtol=0, atol=1e-9)
    torch.testing.assert_close(kernel.reverse_work(x), lq - lp, rtol=0, atol=1e-9)
    x0 = act.hot_start(L4, 6, generator=torch.Generator().manual_seed(2))
    new, info = kernel.step(kernel.init(x0), torch.Generator().manual_seed(3))
    im = IndependenceMetropolis(flow, act).init(x0)
    torch.testing.assert_close(info["log_q_current"], im.extras["log_q"], rtol=0, atol=1e-9)
    torch.testing.assert_close(
        info["log_accept"],
        (info["log_p_proposal"] - info["log_q_proposal"]) - (im.log_p - im.extras["log_q"]),
        rtol=0,
        atol=1e-9,
    )


# ------------------------------------------------------------------ exactness of the chain


def _from_evolutions(kernel, act, batch, steps, burn, seed, measure=None, sampler=None):
    """``batch`` chains started from evolutions of ``sampler`` (default ``kernel``; seed),
    ``steps`` steps of ``kernel``, ``burn`` dropped."""
    g = torch.Generator().manual_seed(seed)
    x0, _, _ = (sampler or kernel).sample(batch, g, lattice=L4)
    measure = measure or (lambda x: {"plaquette": plaquette(x)})
    chain = Chain(kernel, kernel.init(x0), g, measure=measure)
    chain.run(steps)
    h = chain.history_tensors()
    return chain, gamma_method(h["plaquette"][burn:], step_axis=0), float(h["accepted"][burn:].mean())


@pytest.mark.parametrize(
    "group,beta,options,exact",
    [
        ("su2", 2.0, {"n_step": 4}, su2_2d(4, 2.0)["plaquette"]),
        ("su3", 3.0, {"n_step": 4}, 0.203075050030219),  # L = 4 torus = infinite volume to 1e-10
        ("su2", 2.0, {"n_step": 16, "inner": "hmc", "steps": 3}, su2_2d(4, 2.0)["plaquette"]),
    ],
)
def test_chain_plaquette_is_exact_su_n(group, beta, options, exact):
    """2D SU(N), L = 4: 64 chains (seed 11) x 40 steps, 5 dropped: <P> within 3 Gamma-method sigma
    of the exact value; the stored log p and work are those of the current configurations."""
    act = WilsonGaugeAction(beta, group)
    kernel = NonEquilibrium(act, **options)
    chain, r, acc = _from_evolutions(kernel, act, 64, 40, 5, seed=11)
    assert 0.1 < acc < 1.0 and r.error < 0.01
    assert abs(r.mean - exact) < SIGMA * r.error, (r, exact, acc)
    st = chain.state
    torch.testing.assert_close(st.log_p, -act.action(st.x), rtol=0, atol=1e-10)
    assert st.extras[kernel.work_key].shape == (64,)


def test_chain_plaquette_is_exact_u1_and_endpoints_are_not():
    """2D U(1), L = 4, beta = 1, 8 stages of short HMC trajectories: the evolutions' endpoints
    are out of equilibrium (their mean plaquette misses the exact one by > 5 sigma), while the
    chain (64 chains, seed 12, 60 steps, 5 dropped) is exact within 3 sigma."""
    act = WilsonGaugeAction(1.0, "u1")
    exact = u1_2d(4, 1.0)["plaquette"]
    kernel = NonEquilibrium(act, n_step=8, inner="hmc", steps=2, trajectory_length=0.5)
    meas = measurement("u1", ["plaquette"])
    x, _, _ = kernel.sample(1024, torch.Generator().manual_seed(5), lattice=L4)
    p = meas(x)["plaquette"]
    assert exact - float(p.mean()) > 5 * float(p.std()) / 32
    _, r, acc = _from_evolutions(kernel, act, 64, 60, 5, seed=12, measure=meas)
    assert 0.1 < acc < 0.9
    assert abs(r.mean - exact) < SIGMA * r.error, (r, exact)


def test_cycle_with_hmc_refreshes_the_work_and_stays_exact():
    """Composition (one HMC trajectory, one NE step) on 2D U(1), L = 4, beta = 1: HMC moves x,
    so each NE step draws the current work from a reverse path (``refreshed``); 64 chains
    (seed 13) x 60 cycles, 5 dropped: exact <P> within 3 sigma. Taking W = +inf instead
    (accept every proposal) would give the endpoints' plaquette, > 5 sigma low (previous test)."""
    act = WilsonGaugeAction(1.0, "u1")
    ne = NonEquilibrium(act, n_step=8, inner="hmc", steps=2, trajectory_length=0.5)
    cycle = Composition([HMC(act, steps=4, trajectory_length=0.5), ne], labels=["hmc", "ne"])
    meas = measurement("u1", ["plaquette"])
    _, r, _ = _from_evolutions(cycle, act, 64, 60, 5, seed=13, measure=meas, sampler=ne)
    exact = u1_2d(4, 1.0)["plaquette"]
    assert abs(r.mean - exact) < SIGMA * r.error, (r, exact)
    # after an HMC step that moved a chain, the work is gone and the next NE step refreshes it
    g = torch.Generator().manual_seed(3)
    x0, w0, _ = ne.sample(4, g, lattice=L4)
    st = ChainState(x0, -act.action(x0), {ne.work_key: w0})
    st, _ = ne.step(st, g)
    _, info = ne.step(st, g)
    assert not bool(info["refreshed"].any())
    moved, hinfo = HMC(act, steps=4, trajectory_length=0.5).step(st, g)
    assert bool(hinfo["accepted"].any()) and ne.work_key not in moved.extras
    _, info = ne.step(moved, g)
    assert bool(info["refreshed"].all()) and bool(torch.isfinite(info["work_current"]).all())


def test_cycle_with_overrelaxation_uses_reversed_heatbath_paths_and_stays_exact():
    """Composition (one overrelaxation sweep, one NE step with heatbath stages) on 2D SU(3),
    L = 4, beta = 3: the sweep moves every link but keeps the action, so it cannot correct the
    plaquette; every NE step draws the current work from a reversed heatbath path. 64 chains
    (seed 17) x 40 cycles, 5 dropped: <P> within 3 Gamma-method sigma of the exact 0.203075.
    (Known gap: at this size a reversed path run in forward subgroup order is not detected,
    and no test checks the order of the reversal directly.)"""
    from flowplug.plugins.heatbath import Overrelaxation

    act = WilsonGaugeAction(3.0, "su3")
    ne = NonEquilibrium(act, n_step=4)
    cycle = Composition([Overrelaxation(act), ne], labels=["or", "ne"])
    meas = measurement("su3", ["plaquette"])
    _, r, _ = _from_evolutions(cycle, act, 64, 40, 5, seed=17, measure=meas, sampler=ne)
    assert abs(r.mean - 0.203075050030219) < SIGMA * r.error and r.error < 0.01, r


def test_acceptance_rises_with_n_step():
    """2D SU(2), L = 4, beta = 2, heatbath stages; 64 chains x 20 steps from the kernel's own
    evolutions (seed 21, the same for every n_step): acceptance 1 stage < 4 < 16 stages, each
    by more than 0.1 (measured: 0.002, 0.193, 0.528)."""
    act = WilsonGaugeAction(2.0, "su2")
    acc = []
    for n_step in (1, 4, 16):
        _, _, a = _from_evolutions(NonEquilibrium(act, n_step=n_step), act, 64, 20, 0, seed=21)
        acc.append(a)
    assert acc[0] + 0.1 < acc[1] and acc[1] + 0.1 < acc[2], acc


# ------------------------------------------------------------------ replay and non-finite works


@pytest.fixture
def fixed_u(monkeypatch):
    """``set(u)`` makes the next Metropolis tests use the uniforms u (a (B,) tensor)."""
    box: dict[str, torch.Tensor] = {}

    def _uniform(shape, generator, device):
        assert tuple(box["u"].shape) == tuple(shape)
        return box["u"].to(device)

    monkeypatch.setattr(metropolis, "_uniform", _uniform)
    return lambda u: box.__setitem__("u", torch.as_tensor(u, dtype=torch.float64))


def test_decision_replay(fixed_u):
    """Given u and the two works, the decision is log u < W - W' (float64) and each chain stores
    the proposal with its log p and work where accepted, its old x, log p and work elsewhere;
    a current work of +inf accepts any finite proposal, a NaN one rejects."""
    act = WilsonGaugeAction(2.0, "su2")
    kernel = NonEquilibrium(act, n_step=2)
    b = 8
    x0, w0, lp0 = kernel.sample(b, torch.Generator().manual_seed(1), lattice=L4)
    w0 = w0.clone()
    w0[6], w0[7] = math.inf, math.nan
    # the proposals the step will draw: the same generator stream, uniforms patched out
    x1, w1, lp1 = kernel.sample(b, torch.Generator().manual_seed(2), lattice=L4)
    log_a = w0 - w1
    want = torch.tensor([True, False, True, False, True, False, True, False])
    u = torch.exp(torch.where(want, log_a - 0.25, log_a + 0.25)).clamp(max=1.0)
    u[6], u[7] = 0.999, 1e-300
    fixed_u(u)
    state = ChainState(x0, lp0, {kernel.work_key: w0})
    new, info = kernel.step(state, torch.Generator().manual_seed(2))
    want = (want | (log_a > 0)) & ~torch.isnan(log_a)
    assert torch.equal(info["accepted"], want) and 0 < int(want.sum()) < b
    assert bool(info["accepted"][6]) and not bool(info["accepted"][7])
    torch.testing.assert_close(info["work_proposal"], w1, rtol=0, atol=0)
    torch.testing.assert_close(info["log_accept"][:6], log_a[:6], rtol=0, atol=0)
    assert info["log_accept"].dtype == torch.float64 and math.isinf(float(info["log_accept"][6]))
    a, r = want, ~want
    assert torch.equal(new.x[a], x1[a]) and torch.equal(new.x[r], x0[r])
    torch.testing.assert_close(new.log_p, torch.where(want, lp1, lp0), rtol=0, atol=0)
    torch.testing.assert_close(new.extras[kernel.work_key], torch.where(want, w1, w0), rtol=0, atol=0, equal_nan=True)
    assert float(info["log_accept"][7]) == -math.inf  # NaN rejects
    # log q_eff = W - S: the flow rule gives the same log A
    torch.testing.assert_close(
        ((info["log_p_proposal"] - info["log_q_proposal"]) - (info["log_p_current"] - info["log_q_current"]))[:7],
        info["log_accept"][:7],
        rtol=0,
        atol=1e-9,
    )


class _BrokenLayer(torch.nn.Module):
    """The identity with a given log-det per chain (NaN, +-inf for some)."""

    def __init__(self, logdet):
        super().__init__()
        self.ld = logdet

    def forward(self, x):
        return x, self.ld.to(x.device)

    def inverse(self, y):
        return y, -self.ld.to(y.device)


def test_non_finite_works_are_rejected(fixed_u):
    """A proposal whose work is NaN, +inf or -inf (a layer's log-det broke down) is rejected
    whatever u and the current work; the finite ones are accepted with u -> 0."""
    act = WilsonGaugeAction(1.0, "u1")
    ld = torch.tensor([math.nan, math.inf, -math.inf, 0.0], dtype=torch.float64)
    kernel = NonEquilibrium(act, n_step=2, inner="hmc", steps=2, layers=[_BrokenLayer(ld), None])
    x0 = act.hot_start(L4, 4, generator=torch.Generator().manual_seed(1))
    state = ChainState(x0, -act.action(x0), {kernel.work_key: torch.full((4,), 50.0, dtype=torch.float64)})
    fixed_u(torch.full((4,), 1e-300, dtype=torch.float64))
    new, info = kernel.step(state, torch.Generator().manual_seed(2))
    assert info["accepted"].tolist() == [False, False, False, True]
    assert bool(torch.isinf(info["log_accept"][:3]).all()) and float(info["log_accept"][0]) < 0
    assert torch.equal(new.x[:3], x0[:3]) and torch.equal(
        new.extras[kernel.work_key][:3], state.extras[kernel.work_key][:3]
    )


# ------------------------------------------------------------------ pieces and bookkeeping


def test_schedule_coupling_and_reversed_sweep():
    assert linear_schedule(0.0, 2.0, 4) == [0.5, 1.0, 1.5, 2.0] and linear_schedule(1.0, 3.0, 0) == []
    assert linear_schedule(0.1, 0.7, 3)[-1] == 0.7
    act = WilsonGaugeAction(2.0, "su3")
    a1 = with_coupling(act, "beta", 0.5)
    assert type(a1) is WilsonGaugeAction and a1.beta == 0.5 and a1.group == "su3" and act.beta == 2.0
    phi = with_coupling(Phi4Action(-4.0, 8.0), "lam", 2.0)
    assert phi.lam == 2.0 and phi.m2 == -4.0
    u = haar_random((3, 2, 4, 4), 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(act.action(u.flip((-2, -1))), act.action(u), rtol=0, atol=1e-10)  # J U J
    board = Checkerboard(L4)
    fwd, t1 = heatbath_sweep(u, 2.0, board, torch.Generator().manual_seed(2))
    rev, t2 = reversed_heatbath_sweep(u, 2.0, board, torch.Generator().manual_seed(2))
    assert not torch.allclose(fwd, rev) and bool((t2 >= 1).all())
    eye = torch.eye(3, dtype=torch.complex128)
    assert float((rev @ rev.mH - eye).abs().max()) < 1e-12
    assert torch.equal(board.classes[0][1], Checkerboard(L4).classes[0][1])  # the board is not modified


def test_resumed_chain_is_the_uninterrupted_one(tmp_path):
    """The work travels in the checkpoint: 3 + 3 steps from a checkpoint equal 6 steps, bit for bit."""
    act = WilsonGaugeAction(2.0, "su2")
    x0 = act.hot_start(L4, 3, generator=torch.Generator().manual_seed(0))

    def chain(seed):
        kernel = NonEquilibrium(act, n_step=2)
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
    assert torch.equal(whole.history_tensors()["accepted"], rest.history_tensors()["accepted"])
    key = NonEquilibrium(act, n_step=2).work_key
    assert key.startswith("work.") and key in whole.state.extras
    assert NonEquilibrium(act, n_step=3).work_key != key


def test_bad_options_are_refused():
    from flowplug.plugins.fermion_actions import PseudofermionAction

    su2, u1 = WilsonGaugeAction(2.0, "su2"), WilsonGaugeAction(1.0, "u1")
    flow = _random_u1_flow(1, 0)
    for action, options, match in (
        (su2, {"n_step": -1}, "n_step"),
        (su2, {"n_step": 2.5}, "n_step"),
        (su2, {"start": "haar"}, "start must be"),
        (su2, {"start": "flow"}, "needs a flow"),
        (su2, {"flow": flow}, "flow samples 'u1'"),
        (u1, {"inner": "heatbath"}, "Wilson action on SU"),
        (su2, {"beta_start": -1.0}, "beta >= 0"),
        (su2, {"coupling": "kappa"}, "no coupling 'kappa'"),
        (su2, {"coupling": "group"}, "must be a finite number"),
        (Phi4Action(-4.0, 8.0), {"coupling": "lam", "inner": "heatbath"}, "heatbath drives beta"),
        (su2, {"n_step": 2, "layers": [None]}, "one entry"),
        (su2, {"schedule": [0.5, 1.0]}, "must end at the target"),
        (su2, {"schedule": [1.0, 2.0], "n_step": 3}, "n_step = 3"),
        (su2, {"schedule_knots": [[0, 0.0], [1, 1.5]]}, r"must be \[1, 2.0\]"),
        (su2, {"schedule_knots": [[0, 0.0], [1, 2.0]], "beta_start": 0.5}, "alone"),
        (su2, {"schedule_knots": [[0, 0.0], [1, 2.0]], "schedule": [2.0]}, "alone"),
        (su2, {"schedule_knots": [[0, 0.0], [0.7, 2.0]]}, "rise strictly"),
        (su2, {"inner": "overrelaxation"}, "time reversal"),
        (su2, {"inner": "nonequilibrium"}, "itself"),
        (su2, {"overrelax": -1}, "overrelax"),
        (su2, {"sweeps": 2}, "rejects the options"),
        (u1, {"inner": "hmc", "integrator": "euler"}, "integrator"),
        (PseudofermionAction(2.0, 0.2, "u1"), {}, "auxiliary fields"),
    ):
        with pytest.raises(ConfigError, match=match):
            NonEquilibrium(action, **options)
    with pytest.raises(UnknownComponentError):
        NonEquilibrium(su2, inner="nosuchkernel")
    with pytest.raises(ConfigError, match="give the lattice"):
        NonEquilibrium(su2, n_step=1).sample(2)


# ------------------------------------------------------------------ registry and commands


def test_registered_and_built_from_a_kernel_table(fresh_pm):
    from flowplug import get_component
    from flowplug.jobs.chains import build_kernel

    for name in ("nonequilibrium", "snf", "jarzynski"):
        assert get_component("kernel", name).factory is NonEquilibrium
    su2 = WilsonGaugeAction(2.0, "su2")
    k = build_kernel(None, su2, {"type": "snf", "options": {"n_step": 3, "overrelax": 1, "inner": "heatbath-or"}})
    assert isinstance(k, NonEquilibrium) and k.flow is None and k.n_step == 3 and k.inner == "heatbath-or"
    u1 = WilsonGaugeAction(1.0, "u1")
    flow = _random_u1_flow(1, 0)
    k = build_kernel(flow, u1, {"type": "nonequilibrium", "options": {"n_step": 2, "beta_start": 0.5}})
    assert k.flow is flow and k.inner == "hmc" and k.schedule == [0.75, 1.0]
    k = build_kernel(flow, u1, {"type": "nonequilibrium", "options": {"start": "prior"}})
    assert k.flow is None and k.schedule[0] == 0.1 and k.n_step == 10
    with pytest.raises(ConfigError, match="independence-metropolis"):  # still refused for kernels that need one
        build_kernel(None, u1, {"type": "independence-metropolis"})


def test_flowplug_sample_runs_the_nonequilibrium_kernel(tmp_path, fresh_pm, capsys):
    """`flowplug sample` without a flow, kernel.type = nonequilibrium (8 heatbath stages) on 2D
    SU(2), L = 4, beta = 2, 16 hot chains x 40 steps, 10 dropped (seed 1): the exact plaquette
    within 3 sigma."""
    from flowplug.cli import main

    out = tmp_path / "ne"
    args = ["sample", "--out", str(out), "--no-progress"]
    for kv in (
        "action.name=wilson",
        "action.group=su2",
        "action.beta=2.0",
        "lattice=[4,4]",
        "kernel.type=nonequilibrium",
        "kernel.options.n_step=8",
        "chains=16",
        "steps=40",
        "thermalize=10",
    ):
        args += ["--set", kv]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kernel"] == "nonequilibrium" and 0.2 < summary["acceptance"] < 1.0
    r = summary["observables"]["plaquette"]
    exact = su2_2d(4, 2.0)["plaquette"]
    assert abs(r["mean"] - exact) < SIGMA * r["error"], (r, exact)
    # every proposal's work (16 x 40) gives the Jarzynski estimate of log Z (Haar: log Z_0 = 0)
    j = summary["jarzynski"]
    assert j["n"] == 16 * 40 and 0 < j["ess"] <= 1 and j["mean_work"] >= -j["log_ratio"]
    assert abs(j["log_ratio"] - su2_log_z(4, 2.0)) < SIGMA * j["error"], j
    assert "(Jarzynski, 640 works)" in capsys.readouterr().out
    assert summary["kernel_config"]["options"] == {"n_step": 8} and summary["kernel_config"]["files"] == {}


def test_start_states_are_forward_evolutions_with_their_works():
    """start_states(n) is n forward evolutions (the same draws as sample() from the same
    generator) with the works stored, so the first step draws no reverse path; a hot start's
    first step does."""
    act = WilsonGaugeAction(2.0, "su2")
    k = NonEquilibrium(act, n_step=3)
    st = k.start_states(4, L4, torch.Generator().manual_seed(5))
    x, w, lp = k.sample(4, torch.Generator().manual_seed(5), lattice=L4)
    assert st.x.dtype == torch.complex128 and torch.equal(st.x, x)
    assert torch.equal(st.extras[k.work_key], w) and torch.equal(st.log_p, lp)
    torch.testing.assert_close(st.log_p, -act.action(st.x).to(torch.float64), rtol=0, atol=1e-12)
    _, info = k.step(st, torch.Generator().manual_seed(6))
    assert not bool(info["refreshed"].any()) and torch.equal(info["work_current"], w)
    hot = k.init(act.hot_start(L4, 4, generator=torch.Generator().manual_seed(5)))
    _, info = k.step(hot, torch.Generator().manual_seed(6))
    assert bool(info["refreshed"].all())
    with pytest.raises(ConfigError, match="n >= 1"):
        k.start_states(0, L4)


def _ne_sample(out, *extra, resume=False):
    from flowplug.config import build_config
    from flowplug.jobs.sample import DEFAULT_CONFIG, OPEN_TABLES, run_sample

    sets = [
        "action.name=wilson",
        "action.group=su2",
        "action.beta=2.0",
        "lattice=[4,4]",
        "kernel.type=nonequilibrium",
        "kernel.options.n_step=3",
        "chains=4",
        "thermalize=0",
        "progress=false",
        *extra,
    ]
    return run_sample(build_config(DEFAULT_CONFIG, overrides=sets, open_tables=OPEN_TABLES), None, out, resume=resume)


def _count_start_draws(monkeypatch):
    """Record the n of every NonEquilibrium.start_states call (the calls still draw)."""
    calls = []
    real = NonEquilibrium.start_states

    def counted(self, n, *args, **kwargs):
        calls.append(n)
        return real(self, n, *args, **kwargs)

    monkeypatch.setattr(NonEquilibrium, "start_states", counted)
    return calls


@pytest.mark.filterwarnings("ignore::flowplug.jobs.summary.ShortChainWarning")
def test_sample_starts_nonequilibrium_chains_from_forward_evolutions(tmp_path, fresh_pm, monkeypatch):
    """`sample` with start = "auto" starts from the kernel's start_states: no chain refreshes its
    work at step 1 and the first proposals are judged against forward works, unlike start =
    "hot"; a resumed run draws no start (the checkpoint has the states) and equals the
    uninterrupted one bit for bit; an unknown start is refused before anything is written."""
    from flowplug.jobs.output import read_measurements

    calls = _count_start_draws(monkeypatch)
    whole = _ne_sample(tmp_path / "whole", "steps=4")
    assert calls == [4] and whole["start"] == "kernel proposal draws (start_states)"
    m = read_measurements(tmp_path / "whole" / "measurements.csv")
    assert _ne_sample(tmp_path / "hot", "steps=4", 'start="hot"')["start"] == "hot"
    assert calls == [4]  # a hot start draws nothing
    hot = read_measurements(tmp_path / "hot" / "measurements.csv")
    assert not np.array_equal(m["plaquette"][0], hot["plaquette"][0])

    _ne_sample(tmp_path / "part", "steps=2", "checkpoint_every=1")
    assert calls == [4, 4]
    _ne_sample(tmp_path / "part", "steps=4", "checkpoint_every=1", resume=True)
    assert calls == [4, 4]  # the resume drew no start
    part = read_measurements(tmp_path / "part" / "measurements.csv")
    assert set(part) == set(m) and all(np.array_equal(part[k], m[k]) for k in m)
    assert whole["acceptance"] == json.loads((tmp_path / "part" / "summary.json").read_text())["acceptance"]
    with pytest.raises(ConfigError, match="start must be"):
        _ne_sample(tmp_path / "bad", "steps=2", 'start="cold"')
    assert not (tmp_path / "bad" / "summary.json").exists()
    with pytest.raises(ConfigError, match='kernel.options.start = "prior"'):
        _ne_sample(tmp_path / "bad2", "steps=2", 'start="prior"')


@pytest.mark.filterwarnings("ignore::flowplug.jobs.summary.ShortChainWarning")
def test_sample_with_hmc_every_starts_from_the_kernel_s_draws(tmp_path, fresh_pm, monkeypatch):
    """kernel.hmc_every wraps the kernel in a composition (HMC, then nonequilibrium): start =
    "auto" still draws the start from the nonequilibrium part (one call per stream, n chains
    each), where the composition alone would give a hot start; start = "hot" draws nothing."""
    from flowplug.jobs.output import read_measurements

    calls = _count_start_draws(monkeypatch)
    _ne_sample(tmp_path / "auto", "steps=2", "kernel.hmc_every=1", "kernel.hmc.steps=2", "streams=2")
    assert calls == [2, 2]
    _ne_sample(tmp_path / "hot", "steps=2", "kernel.hmc_every=1", "kernel.hmc.steps=2", "streams=2", 'start="hot"')
    assert calls == [2, 2]
    auto = read_measurements(tmp_path / "auto" / "measurements.csv")
    hot = read_measurements(tmp_path / "hot" / "measurements.csv")
    assert not np.array_equal(auto["plaquette"][0], hot["plaquette"][0])


@pytest.mark.filterwarnings("ignore::flowplug.jobs.summary.ShortChainWarning")
def test_sample_hot_start_with_a_flow_is_drawn_before_the_ess_samples(tmp_path, fresh_pm):
    """With --flow and start = "hot" the hot start comes from the seeded generator before rank 0
    alone draws the ESS samples from it: the chains do not depend on ess_samples (under
    torchrun the other ranks draw no ESS samples, and must start their chains the same)."""
    from flowplug.config import build_config
    from flowplug.jobs.output import read_measurements
    from flowplug.jobs.sample import DEFAULT_CONFIG, OPEN_TABLES, run_sample

    ckpt = _u1_flow_checkpoint(tmp_path)
    runs = {}
    for n in (16, 32):
        sets = ['kernel.type="flow-hmc"', 'start="hot"', f"ess_samples={n}", "chains=2", "steps=2"]
        sets += ["thermalize=0", "progress=false", "kernel.hmc.steps=2"]
        cfg = build_config(DEFAULT_CONFIG, overrides=sets, open_tables=OPEN_TABLES)
        run_sample(cfg, ckpt, tmp_path / f"ess{n}")
        runs[n] = read_measurements(tmp_path / f"ess{n}" / "measurements.csv")
    assert set(runs[16]) == set(runs[32])
    for k in runs[16]:  # flow-hmc moves locally: the first steps remember the start
        np.testing.assert_array_equal(runs[16][k], runs[32][k], err_msg=k)


def test_kernel_record_names_the_files_of_a_kernel_s_options(tmp_path):
    """A run's summary records the kernel table and the SHA-256 of every file an option names."""
    import hashlib

    from flowplug.jobs.provenance import kernel_record

    ck = tmp_path / "kernel.pt"
    ck.write_bytes(b"weights")
    rec = kernel_record({"type": "l2hmc", "options": {"checkpoint": str(ck), "steps": 4, "note": "not-a-file"}})
    assert rec["type"] == "l2hmc" and rec["options"]["steps"] == 4
    assert rec["files"] == {"checkpoint": {"path": str(ck), "sha256": hashlib.sha256(b"weights").hexdigest()}}
    nested = kernel_record({"type": "pseudo-marginal", "options": {"pseudofermion_options": {"checkpoint": str(ck)}}})
    assert nested["files"] == {
        "pseudofermion_options.checkpoint": {"path": str(ck), "sha256": hashlib.sha256(b"weights").hexdigest()}
    }


def _u1_flow_checkpoint(d):
    from flowplug.train import build_trainer

    cfg = {
        "lattice": list(L4),
        "seed": 0,
        "device": "cpu",
        "action": {"name": "wilson", "group": "u1", "beta": 1.0},
        "flow": {"layers": ["u1-ncp"], "n_layers": 2, "options": {"hidden": [4]}},
        "train": {"steps": 3, "batch_size": 16, "lr": 3e-3, "progress": False, "checkpoint_every": 0},
    }
    trainer = build_trainer(cfg, out=d / "run")
    trainer.run()
    return trainer.save_checkpoint(d / "u1.pt")


def test_flowplug_resample_and_propose_with_nonequilibrium_proposals(tmp_path, fresh_pm, capsys):
    """resample with kernel.type = nonequilibrium (prior start, HMC stages) writes one output per
    input; propose --kernel nonequilibrium reports log q = W - S with the flow rule's log A, and
    --no-decide gives the proposal with both values."""
    from flowplug.cli import main

    ckpt = _u1_flow_checkpoint(tmp_path)
    act = WilsonGaugeAction(1.0, "u1")
    x, _, _ = NonEquilibrium(act, n_step=4).sample(3, torch.Generator().manual_seed(1), lattice=L4)
    io.write(tmp_path / "u1.h5", io.Ensemble(x))
    io.write(tmp_path / "one.h5", io.Ensemble(x[:1]))
    out = tmp_path / "r"
    sets = ["steps=3", "kernel.type=nonequilibrium", "kernel.options.n_step=4", 'kernel.options.start="prior"']
    args = ["resample", str(tmp_path / "u1.h5"), "--flow", str(ckpt), "--out", str(out), "--no-progress"]
    for kv in sets:
        args += ["--set", kv]
    assert main(args) == 0, capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())
    assert s["chains"] == 3 and 0.0 <= s["acceptance"] <= 1.0 and len(io.read(out / "ensemble.h5")) == 3
    capsys.readouterr()
    base = ["propose", "--flow", str(ckpt), "--current", str(tmp_path / "one.h5"), "--seed", "5"]
    opts = ["--kernel", "nonequilibrium", "--kernel-option", "n_step=4", "--kernel-option", "start=prior"]
    assert main([*base, "--out", str(tmp_path / "next.h5"), *opts]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["kernel"] == "nonequilibrium" and isinstance(line["accepted"], bool)
    la = (line["log_p_proposal"] - line["log_q_proposal"]) - (line["log_p_current"] - line["log_q_current"])
    assert line["log_accept"] == pytest.approx(la, abs=1e-8)
    assert main([*base, "--out", str(tmp_path / "p.h5"), "--no-decide", *opts]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["accepted"] is None and math.isfinite(line["log_q_current"]) and math.isfinite(line["log_q_proposal"])
    assert main([*base, "--out", str(tmp_path / "q.h5"), "--kernel", "nonequilibrium", "--kernel-option", "bad"]) == 1
    assert "KEY=VALUE" in capsys.readouterr().err


def test_shipped_4d_config_runs(tmp_path, fresh_pm):
    """examples/sample_su3_4d_ne.toml is a valid `flowplug sample` config whose kernel is the
    knotted nonequilibrium protocol; shrunk (2^4, 6 stages, 2 chains x 2 steps) it runs and
    writes a summary with an acceptance."""
    from pathlib import Path

    import tomllib

    from flowplug.cli import main

    path = Path(__file__).resolve().parents[1] / "examples" / "sample_su3_4d_ne.toml"
    cfg = tomllib.loads(path.read_text())
    opts = cfg["kernel"]["options"]
    kernel = NonEquilibrium(WilsonGaugeAction(6.0, "su3"), **opts)
    assert cfg["kernel"]["type"] == "nonequilibrium" and kernel.n_step == opts["n_step"]
    assert kernel.schedule[-1] == 6.0 and sum(b > 5.0 for b in kernel.schedule) > 0.3 * kernel.n_step
    out = tmp_path / "ne4"
    args = ["sample", "--config", str(path), "--out", str(out), "--no-progress"]
    for kv in ("lattice=[2,2,2,2]", "kernel.options.n_step=6", "chains=2", "steps=2", "thermalize=1"):
        args += ["--set", kv]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kernel"] == "nonequilibrium" and 0.0 <= summary["acceptance"] <= 1.0
