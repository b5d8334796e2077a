"""The Metropolis test of every kernel: the non-finite rule and deterministic replays.

Every kernel decides through :func:`flowplug.metropolis.metropolis_test`; these tests fix
its uniforms u (patching ``flowplug.metropolis._uniform``), recompute log A from
log p and log q evaluated independently of the kernel, and check the decision of every
chain and the state each chain stores afterwards. A flipped sign, a wrong comparison,
an accepted NaN or a kernel that returns its input unchanged fails here, without
statistics. The second half patches flows (and an action) to return NaN / +inf / -inf
log-dets for some chains and checks that those proposals are rejected by every kernel,
with u so small that any finite log A would be accepted.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowplug import metropolis
from flowplug.chain import ChainState
from flowplug.flow import build_flow
from flowplug.metropolis import guarded_log_accept, hmc_log_accept, independence_log_accept, metropolis_test
from flowplug.plugins.hmc import HMC
from flowplug.plugins.kernels import Composition, FlowHMC, IndependenceMetropolis, Mixture
from flowplug.plugins.theories import WilsonGaugeAction
from flowplug.proposal import FlowProposal

pytestmark = pytest.mark.usefixtures("one_thread")

INF, NAN = float("inf"), float("nan")
LATTICE = (4, 4)
#: log A values between the chains' ``accept`` and ``reject`` uniforms.
DELTA = 0.25


def _t(*v):
    return torch.tensor(v, dtype=torch.float64)


@pytest.fixture
def fixed_u(monkeypatch):
    """``set(u)`` makes the next Metropolis tests use the uniforms u (a (B,) tensor)."""
    box: dict[str, torch.Tensor] = {}

    def _uniform(shape, generator, device):
        u = box["u"]
        assert tuple(u.shape) == tuple(shape), (u.shape, shape)
        return u.to(device)

    monkeypatch.setattr(metropolis, "_uniform", _uniform)
    return lambda u: box.__setitem__("u", torch.as_tensor(u, dtype=torch.float64))


def _flow(seed=3):
    torch.manual_seed(seed)
    flow = build_flow("u1", LATTICE, "u1-ncp", n_layers=2, options={"hidden": [4], "dtype": "float64"})
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return flow.eval()


def _uniforms_for(log_a: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """u with log u = log A - DELTA where ``want`` (accept), log A + DELTA elsewhere (reject)."""
    return torch.exp(torch.where(want, log_a - DELTA, log_a + DELTA)).clamp(max=1.0)


# ------------------------------------------------------------------ the rule itself


def test_rule_on_a_table_of_densities():
    lp1 = _t(1.0, NAN, INF, -INF, 1.0, 1.0, 1.0, 1.0)
    lq1 = _t(0.5, 0.0, 0.0, 0.0, NAN, INF, -INF, 0.5)
    lp0 = _t(0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, -INF)
    lq0 = _t(0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1)
    la = independence_log_accept(lp1, lq1, lp0, lq0)
    assert la.dtype == torch.float64
    assert la[0].item() == pytest.approx((1.0 - 0.5) - (0.2 - 0.1), abs=1e-15)
    assert torch.equal(la[1:7], torch.full((6,), -INF, dtype=torch.float64))  # non-finite proposals
    assert la[7].item() == INF  # a finite proposal from a zero-density state is accepted
    assert independence_log_accept(lp1.float(), lq1.float(), lp0, lq0).dtype == torch.float64


def test_hmc_rule_and_nan_guard():
    h0 = _t(1.0, 1.0, 1.0, 1.0, INF)
    h1 = _t(0.5, NAN, -INF, INF, 2.0)
    la = hmc_log_accept(h0, h1)
    assert la[0].item() == 0.5
    assert torch.equal(la[1:4], torch.full((3,), -INF, dtype=torch.float64))
    assert la[4].item() == INF
    assert torch.equal(guarded_log_accept(_t(NAN, 1.0), _t(0.0, NAN)), _t(-INF, -INF))


def test_metropolis_test_decision_replay(fixed_u):
    """Accept iff log u < log A (strictly); NaN rejects, +inf accepts."""
    la = _t(0.0, -1.0, -1.0, math.log(0.5), NAN, INF, -INF, 3.0)
    u = _t(0.99, math.exp(-1.0 - 1e-9), math.exp(-1.0 + 1e-9), 0.5, 1e-300, 0.999, 1e-300, 0.999)
    fixed_u(u)
    got = metropolis_test(la).tolist()
    assert got == [True, True, False, False, False, True, False, True]


def test_metropolis_test_draws_its_uniforms_from_the_generator():
    la = torch.linspace(-3, 1, 64, dtype=torch.float64)
    acc = metropolis_test(la, torch.Generator().manual_seed(7))
    u = torch.rand(64, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert torch.equal(acc, torch.log(u) < la)
    assert 0 < int(acc.sum()) < 64


# ---------------------------------------------------------------- kernel replays


def test_independence_metropolis_replay(fixed_u):
    """Decisions and stored states of IndependenceMetropolis against an independent replay."""
    act = WilsonGaugeAction(2.0, "u1")
    flow = _flow()
    b = 8
    x0 = act.hot_start(LATTICE, b, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lp0, lq0 = -act.action(x0), flow.log_prob(x0)
        z, log_r = flow.sample_latent(b, torch.Generator().manual_seed(2))
        x1, ld = flow(z)
        lq1 = log_r - ld
        lp1 = -act.action(x1)
    log_a = (lp1 - lq1) - (lp0 - lq0)
    want = torch.tensor([True, False] * (b // 2))
    fixed_u(_uniforms_for(log_a, want))
    new, info = IndependenceMetropolis(flow, act).step(ChainState(x0, lp0), torch.Generator().manual_seed(2))
    want = want | (log_a > 0)  # log A > 0 accepts whatever u
    assert torch.equal(info["accepted"], want) and 0 < int(want.sum()) < b
    torch.testing.assert_close(info["log_accept"], log_a, rtol=0, atol=1e-10)
    a, r = want, ~want
    torch.testing.assert_close(new.x[a], x1[a], rtol=0, atol=0)
    torch.testing.assert_close(new.x[r], x0[r], rtol=0, atol=0)
    torch.testing.assert_close(new.log_p, torch.where(want, lp1, lp0), rtol=0, atol=1e-12)
    torch.testing.assert_close(new.extras["log_q"], torch.where(want, lq1, lq0), rtol=0, atol=1e-10)
    torch.testing.assert_close(new.extras["latent"][a], z[a], rtol=0, atol=0)


def test_hmc_replay(fixed_u):
    """Decisions and stored states of HMC from the trajectory replayed with the same momenta."""
    act = WilsonGaugeAction(1.0, "u1")
    hmc = HMC(act, integrator="leapfrog", steps=3, trajectory_length=1.2)
    b = 8
    x0 = act.hot_start(LATTICE, b, generator=torch.Generator().manual_seed(1))
    space = hmc.space
    with torch.no_grad():
        p0 = space.momenta(x0, torch.Generator().manual_seed(4))
        h0 = space.kinetic(p0) + act.action(x0)
        x1, p1 = hmc.integrate(x0, p0)
        x1 = space.finalize(x1)
        h1 = space.kinetic(p1) + act.action(x1)
    log_a = -(h1 - h0)
    want = torch.tensor([True, False] * (b // 2))
    fixed_u(_uniforms_for(log_a, want))
    new, info = hmc.step(hmc.init(x0), torch.Generator().manual_seed(4))
    want = want | (log_a > 0)
    assert torch.equal(info["accepted"], want) and 0 < int(want.sum()) < b
    torch.testing.assert_close(info["delta_h"], h1 - h0, rtol=0, atol=1e-10)
    torch.testing.assert_close(new.x[want], x1[want], rtol=0, atol=1e-12)
    torch.testing.assert_close(new.x[~want], x0[~want], rtol=0, atol=0)
    torch.testing.assert_close(new.log_p, torch.where(want, -act.action(x1), -act.action(x0)), rtol=0, atol=1e-10)


def test_flow_hmc_replay(fixed_u):
    """FlowHMC: the decision follows its dH; rejected chains keep x, log p, log q and z;
    accepted chains hold a new x with log p = -S(x) and log q = the inverse-flow density."""
    act = WilsonGaugeAction(1.0, "u1")
    flow = _flow(5)
    k = FlowHMC(flow, act, steps=3, trajectory_length=0.8)
    b = 8
    st = k.init(act.hot_start(LATTICE, b, generator=torch.Generator().manual_seed(1)))
    # first pass: the kernel's dH for these momenta (u = 1 rejects all but dH < 0)
    fixed_u(torch.ones(b, dtype=torch.float64))
    _, info0 = k.step(st, torch.Generator().manual_seed(6))
    log_a = -info0["delta_h"]
    want = torch.tensor([True, False] * (b // 2))
    fixed_u(_uniforms_for(log_a, want))
    new, info = k.step(st, torch.Generator().manual_seed(6))
    want = want | (log_a > 0)
    assert torch.equal(info["accepted"], want) and 0 < int(want.sum()) < b
    r = ~want
    for key in ("log_q", "latent"):
        torch.testing.assert_close(new.extras[key][r], st.extras[key][r], rtol=0, atol=0)
    torch.testing.assert_close(new.x[r], st.x[r], rtol=0, atol=0)
    torch.testing.assert_close(new.log_p[r], st.log_p[r], rtol=0, atol=0)
    assert not torch.allclose(new.x[want], st.x[want])
    with torch.no_grad():
        torch.testing.assert_close(new.log_p[want], -act.action(new.x[want]), rtol=0, atol=1e-10)
        torch.testing.assert_close(new.extras["log_q"][want], flow.log_prob(new.x[want]), rtol=0, atol=1e-8)


@pytest.mark.parametrize("as_numpy", [False, True])
def test_flow_proposal_step_with_mixed_decisions(fixed_u, as_numpy):
    """FlowProposal.step on a batch: accepted entries are the flow proposals, rejected ones the input."""
    act = WilsonGaugeAction(2.0, "u1")
    flow = _flow(7)
    b = 6
    x0 = act.hot_start(LATTICE, b, generator=torch.Generator().manual_seed(1))
    ref = FlowProposal(flow, None, layout="canonical", seed=11)
    x1, lq0, lq1 = ref.propose(x0)
    with torch.no_grad():
        log_a = (-act.action(x1) - torch.as_tensor(lq1)) - (-act.action(x0) - torch.as_tensor(lq0))
    want = torch.tensor([True, False, True, False, False, True])
    fixed_u(_uniforms_for(log_a, want))
    want = want | (log_a > 0)
    assert 0 < int(want.sum()) < b
    step = FlowProposal(flow, act, layout="canonical", seed=11)
    u_in = x0.numpy().copy() if as_numpy else x0.clone()
    out, res = step.step(u_in)
    assert type(out) is type(u_in)
    out = torch.as_tensor(out)
    assert res.accepted.tolist() == want.tolist()
    np.testing.assert_allclose(res.log_accept, log_a.numpy(), rtol=0, atol=1e-10)
    torch.testing.assert_close(out[want], x1[want], rtol=0, atol=0)
    torch.testing.assert_close(out[~want], x0[~want], rtol=0, atol=0)


def test_flow_proposal_decide_replay(fixed_u):
    step = FlowProposal(_flow(), None, layout="canonical", seed=1)
    fixed_u(_t(0.5, 0.5, 0.5, 1e-300, 1e-300))
    acc, la = step.decide(
        _t(0.0, 0.0, 0.0, 0.0, 0.0),
        _t(0.0, 0.0, 0.0, 0.0, 0.0),
        _t(0.0, -1.0, 0.0, 0.0, NAN),
        _t(-1.0, 0.0, INF, -INF, 0.0),
    )
    assert acc.tolist() == [True, False, False, False, False]
    assert la.tolist() == [1.0, -1.0, -INF, -INF, -INF]


# ------------------------------------------------------- non-finite densities

BAD = _t(0.0, NAN, INF, -INF, 0.0, INF)  # offsets added to the flow's log-det, per chain
GOOD = torch.isfinite(BAD)


def _broken_forward(flow):
    """Make ``flow(z)`` return log-dets shifted by BAD (NaN / +inf / -inf for some chains)."""
    forward = flow.forward

    def bad_forward(z):
        x, ld = forward(z)
        return x, ld + BAD.to(ld.dtype)

    flow.forward = bad_forward
    return flow


def _check_rejected(new, info, old):
    acc = info["accepted"]
    assert not bool(acc[~GOOD].any()), acc
    assert bool(acc[GOOD].all()), "finite proposals with u = 1e-300 must be accepted"
    if "log_q" in new.extras:
        assert bool(torch.isfinite(new.extras["log_q"]).all())
    assert bool(torch.isfinite(new.log_p).all())
    torch.testing.assert_close(new.x[~GOOD], old.x[~GOOD], rtol=0, atol=0)


def _start(act, flow, kernel):
    x0 = act.hot_start(LATTICE, len(BAD), generator=torch.Generator().manual_seed(1))
    return kernel.init(x0)


@pytest.mark.parametrize("kind", ["independence-metropolis", "composition", "mixture"])
def test_flow_kernels_reject_non_finite_log_q(fixed_u, kind):
    act = WilsonGaugeAction(2.0, "u1")
    flow = _flow()
    im = IndependenceMetropolis(flow, act)
    kernel = {"independence-metropolis": im, "composition": Composition([im]), "mixture": Mixture([im], [1.0])}[kind]
    st = _start(act, flow, kernel)
    _broken_forward(flow)
    fixed_u(torch.full((len(BAD),), 1e-300, dtype=torch.float64))
    new, info = kernel.step(st, torch.Generator().manual_seed(3))
    _check_rejected(new, info, st)


def test_flow_hmc_rejects_non_finite_log_det(fixed_u):
    act = WilsonGaugeAction(1.0, "u1")
    flow = _flow()
    k = FlowHMC(flow, act, steps=2, trajectory_length=0.5)
    st = _start(act, flow, k)
    _broken_forward(flow)
    fixed_u(torch.full((len(BAD),), 1e-300, dtype=torch.float64))
    new, info = k.step(st, torch.Generator().manual_seed(3))
    _check_rejected(new, info, st)


def test_flow_hmc_rejects_a_non_finite_latent_density(fixed_u):
    """S~ = S - log det can be finite while log q = log r(z') - log det is not (a prior
    density of -inf/NaN at z'): such a proposal is rejected, its log q never stored."""
    act = WilsonGaugeAction(1.0, "u1")
    flow = _flow()
    k = FlowHMC(flow, act, steps=2, trajectory_length=0.5)
    st = _start(act, flow, k)
    log_prob = flow.prior.log_prob
    flow.prior.log_prob = lambda z: log_prob(z) + BAD.to(torch.float64)
    fixed_u(torch.full((len(BAD),), 1e-300, dtype=torch.float64))
    new, info = k.step(st, torch.Generator().manual_seed(3))
    _check_rejected(new, info, st)


class _ArmedAction(WilsonGaugeAction):
    """Wilson action plus per-chain offsets (NaN / +-inf), once ``armed``."""

    armed = False

    def action(self, x):
        s = super().action(x)
        return s + BAD.to(s.dtype) if self.armed else s


def test_hmc_rejects_non_finite_action(fixed_u):
    act = _ArmedAction(1.0, "u1")
    hmc = HMC(act, integrator="leapfrog", steps=2, trajectory_length=0.5)
    st = hmc.init(act.hot_start(LATTICE, len(BAD), generator=torch.Generator().manual_seed(1)))
    act.armed = True
    fixed_u(torch.full((len(BAD),), 1e-300, dtype=torch.float64))
    new, info = hmc.step(st, torch.Generator().manual_seed(3))
    acc = info["accepted"]
    assert not bool(acc[~GOOD].any()) and bool(acc[GOOD].all())
    torch.testing.assert_close(new.log_p[~GOOD], st.log_p[~GOOD], rtol=0, atol=0)


def test_flow_proposal_step_rejects_non_finite_log_q(fixed_u):
    act = WilsonGaugeAction(2.0, "u1")
    flow = _flow()
    x0 = act.hot_start(LATTICE, len(BAD), generator=torch.Generator().manual_seed(1))
    step = FlowProposal(_broken_forward(flow), act, layout="canonical", seed=2)
    fixed_u(torch.full((len(BAD),), 1e-300, dtype=torch.float64))
    out, res = step.step(x0)
    assert res.accepted.tolist() == GOOD.tolist()
    torch.testing.assert_close(out[~GOOD], x0[~GOOD], rtol=0, atol=0)
    assert np.all(res.log_accept[~GOOD.numpy()] == -np.inf)
