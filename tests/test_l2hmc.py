"""Tests of the L2HMC kernel (flowplug.plugins.l2hmc) on 2D U(1).

Deterministic: zero networks give leapfrog HMC; reversibility (L_{-1} inverts L_{+1}) to
1e-10; the accumulated log-Jacobian equals log|det| of autograd's Jacobian; checkpoint
round trip; refusal of non-U(1) fields. Statistical: a kernel with random (non-zero)
networks reproduces the exact plaquette and <Q^2> of 2D U(1) on a 4 x 4 torus
(flowplug.exact.u1_2d), and <exp(-dH + log J)> = 1, within 4 sigma (Gamma method, chains as
replicas, fixed seeds; statistics stated in the test).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowplug.chain import Chain
from flowplug.errors import CheckpointError, ConfigError
from flowplug.exact import u1_2d
from flowplug.groups import wrap_angle
from flowplug.jobs.chains import build_kernel
from flowplug.measure import measurement
from flowplug.plugins.hmc import HMC
from flowplug.plugins.l2hmc import L2HMC, circle_scale, load_l2hmc, save_l2hmc, sin_charge, train_l2hmc
from flowplug.plugins.theories import WilsonGaugeAction
from flowplug.stats import gamma_method

SIGMAS = 4.0


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small tensors run on one thread


def randomize(kernel: L2HMC, scale: float, seed: int) -> L2HMC:
    """Add Gaussian noise of size ``scale`` to every network parameter (non-zero outputs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in kernel.network.named_parameters():
            if name != "log_eps":
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return kernel


def links(lattice, batch, seed, beta=2.0):
    act = WilsonGaugeAction(beta, "u1")
    return act, act.hot_start(lattice, batch, generator=torch.Generator().manual_seed(seed))


def test_circle_scale_is_a_circle_diffeomorphism():
    """g(.; a) is periodic, inverted by g(.; -a), and its log-derivative matches autograd."""
    g = torch.Generator().manual_seed(0)
    th = (torch.rand(200, generator=g, dtype=torch.float64) * 2 - 1) * math.pi
    a = torch.randn(200, generator=g, dtype=torch.float64)
    y, ld = circle_scale(th, a)
    back, ld_back = circle_scale(y, -a)
    assert wrap_angle(back - th).abs().max() < 1e-12
    assert (ld + ld_back).abs().max() < 1e-12
    y2, _ = circle_scale(th + 2 * math.pi, a)
    assert wrap_angle(y2 - y).abs().max() < 1e-12
    thg = th.clone().requires_grad_(True)
    (d,) = torch.autograd.grad(circle_scale(thg, a)[0].sum(), thg)
    assert torch.allclose(d.log(), ld, atol=1e-12)


def test_zero_networks_are_leapfrog_hmc():
    """Freshly built networks output zero: L_{+1} is flowplug's leapfrog, L_{-1} leapfrog from -v."""
    act, x = links((6, 6), 4, 1)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    k = L2HMC(act, steps=5, trajectory_length=1.2)
    h = HMC(act, integrator="leapfrog", steps=5, trajectory_length=1.2)
    x1, v1, lj = k.forward_map(x, v)
    xh, vh = h.integrate(x, v)
    assert wrap_angle(xh - x).abs().max() > 0.1  # it moved
    assert wrap_angle(x1 - xh).abs().max() < 1e-12
    assert (v1 - vh).abs().max() < 1e-12
    assert lj.abs().max() < 1e-12
    x2, v2, _ = k.inverse_map(x, v)
    xh2, vh2 = h.integrate(x, -v)
    assert wrap_angle(x2 - xh2).abs().max() < 1e-12
    assert (v2 + vh2).abs().max() < 1e-12
    # the same energy change as HMC's trajectory
    dh = h.hamiltonian(wrap_angle(x1), v1) - h.hamiltonian(x, v)
    dh_h = h.hamiltonian(xh, vh) - h.hamiltonian(x, v)
    assert (dh - dh_h).abs().max() < 1e-10


@pytest.mark.parametrize("lattice", [(4, 4), (6, 4)])
def test_reversibility(lattice):
    """L_{-1}(L_{+1}(x, v)) = (x, v) to 1e-10, log-Jacobians opposite, with non-zero networks."""
    act, x = links(lattice, 4, 3)
    k = randomize(L2HMC(act, steps=4, trajectory_length=1.0), 0.2, 4)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        x1, v1, lj = k.forward_map(x, v)
        x2, v2, lj2 = k.inverse_map(x1, v1)
        # the involution with the direction flipped: integrate(x', v', d = -1)
        x3, v3, lj3 = k.integrate(x1, v1, -torch.ones(4, dtype=torch.float64))
    assert wrap_angle(x1 - x).abs().max() > 0.5 and lj.abs().min() > 1e-3  # moved, with volume change
    assert wrap_angle(x2 - x).abs().max() < 1e-10
    assert (v2 - v).abs().max() < 1e-10
    assert (lj + lj2).abs().max() < 1e-10
    assert wrap_angle(x3 - x).abs().max() < 1e-10 and (lj3 + lj).abs().max() < 1e-10
    # mixed directions in one batch equal the separate maps
    d = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    with torch.no_grad():
        xm, vm, ljm = k.integrate(x, v, d)
        xb, vb, ljb = k.inverse_map(x, v)
    fwd = d > 0
    assert torch.equal(xm[fwd], x1[fwd]) and torch.equal(xm[~fwd], xb[~fwd])
    assert torch.equal(ljm[fwd], lj[fwd]) and torch.equal(ljm[~fwd], ljb[~fwd])


@pytest.mark.parametrize("inverse", [False, True])
def test_log_jacobian_matches_autograd(inverse):
    """The accumulated log-Jacobian equals log|det| of the full (x, v) Jacobian (4 x 4, 64 variables)."""
    act, x = links((4, 4), 1, 6)
    k = randomize(L2HMC(act, steps=2, trajectory_length=0.8), 0.3, 7)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    fn = k.inverse_map if inverse else k.forward_map
    n = x.numel()

    def flat(z):
        a, b, _ = fn(z[:n].view(x.shape), z[n:].view(v.shape))
        return torch.cat([a.flatten(), b.flatten()])

    jac = torch.autograd.functional.jacobian(flat, torch.cat([x.flatten(), v.flatten()]))
    sign, logabs = torch.linalg.slogdet(jac)
    with torch.no_grad():
        lj = fn(x, v)[2]
    assert abs(float(lj)) > 1e-2  # a real volume change is being checked
    assert abs(float(logabs) - float(lj)) < 1e-9
    assert float(sign) == 1.0


def test_metropolis_test_includes_the_log_jacobian():
    """log A of a proposal = -(H' - H) + log J, with H' and H recomputed independently."""
    act, x = links((4, 4), 6, 21)
    k = randomize(L2HMC(act, steps=2, trajectory_length=1.0), 0.1, 22)
    with torch.no_grad():
        p = k.propose(x, -act.action(x), torch.Generator().manual_seed(23))
        x1, v1, lj = k.integrate(x, p["v0"], p["direction"])
    assert set(p["direction"].tolist()) == {-1.0, 1.0}
    assert torch.equal(x1, p["x"]) and torch.equal(lj, p["log_jacobian"])
    h0 = act.action(x) + 0.5 * p["v0"].pow(2).flatten(1).sum(1)
    h1 = act.action(x1) + 0.5 * v1.pow(2).flatten(1).sum(1)
    assert lj.abs().min() > 1e-3
    assert torch.allclose(p["log_accept"], -(h1 - h0) + lj, rtol=0, atol=1e-10)
    assert p["log_accept"].dtype == torch.float64


def test_exact_plaquette_and_q2():
    """Random non-zero networks, 4 x 4, beta = 2: <P>, <Q^2>, <exp(-dH + log J)> within 4 sigma.

    Statistics: 48 chains, 40 thermalisation steps, 160 measured steps (seed 11).
    """
    L, beta = 4, 2.0
    act = WilsonGaugeAction(beta, "u1")
    k = randomize(L2HMC(act, steps=3, trajectory_length=1.0), 0.04, 12)
    g = torch.Generator().manual_seed(11)
    chain = Chain(
        k,
        k.init(act.hot_start((L, L), 48, generator=g)),
        g,
        measure=measurement("u1", ["plaquette", "topological_charge"]),
    )
    chain.run(40)
    chain.history.clear()
    log_j: list[torch.Tensor] = []
    chain.run(160, on_step=lambda _c, info: log_j.append(info["log_jacobian"]))
    h = {name: t.numpy() for name, t in chain.history_tensors().items()}
    exact = u1_2d(L, beta)
    q = h["topological_charge"]
    assert np.allclose(q, np.round(q), atol=1e-9)
    lj = torch.stack(log_j).numpy()  # (T, B), as the histories
    assert np.abs(lj).mean() > 0.1  # the Jacobian term is really exercised
    acc = h["accepted"].mean()
    assert 0.2 < acc < 0.999
    for name, series, target in [
        ("plaquette", h["plaquette"], exact["plaquette"]),
        ("Q^2", q**2, exact["q2"]),
        ("exp(-dH + log J)", np.exp(-h["delta_h"] + lj), 1.0),
    ]:
        r = gamma_method(series, step_axis=0)
        pull = (r.mean - target) / r.error
        print(f"{name}: {r.mean:.5f} +- {r.error:.5f} (tau_int {r.tau_int:.2f}) exact {target:.5f}: {pull:+.2f} sigma")
        assert abs(pull) < SIGMAS, (name, r.mean, r.error, target)


def test_training_step_and_checkpoint_round_trip(tmp_path):
    """A few training iterations change the networks; save/load reproduces the map exactly;
    the registry builds the kernel from ``checkpoint``; contradicting options are refused."""
    act, x = links((4, 4), 8, 13)
    k = L2HMC(act, steps=2, trajectory_length=0.6, hidden=4)
    before = [p.detach().clone() for p in k.network.parameters()]
    x_out, hist = train_l2hmc(k, x, iterations=3, learning_rate=1e-2, generator=torch.Generator().manual_seed(14))
    assert len(hist) == 3 and all(math.isfinite(r["loss"]) for r in hist)
    assert x_out.shape == x.shape
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, k.network.parameters(), strict=True))
    path = save_l2hmc(k, tmp_path / "l2hmc.pt", {"beta": 2.0})
    k2 = load_l2hmc(act, path)
    assert k2.checkpoint_metadata == {"beta": 2.0}
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    with torch.no_grad():
        a, b = k.forward_map(x, v), k2.forward_map(x, v)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    # through the registry, as `flowplug sample` builds it (kernel.hmc options passed too)
    table = {"type": "l2hmc", "hmc": {"steps": 2, "trajectory_length": 0.6}, "options": {"checkpoint": str(path)}}
    k3 = build_kernel(None, act, table)
    assert isinstance(k3, L2HMC) and torch.equal(k3.step_sizes, k.step_sizes)
    with pytest.raises(ConfigError, match="steps = 10 given, 2 in the checkpoint"):
        build_kernel(None, act, {**table, "hmc": {"steps": 10}})


def test_bad_checkpoints_are_refused(tmp_path):
    act = WilsonGaugeAction(2.0, "u1")
    with pytest.raises(CheckpointError, match="no such"):
        L2HMC(act, checkpoint=tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save({"format": "something-else"}, other)
    with pytest.raises(CheckpointError, match="expected format"):
        L2HMC(act, checkpoint=other)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "flowplug-l2hmc", "obj": math.inf.__class__}, pickled)  # a class: needs unpickling
    with pytest.raises(CheckpointError, match="cannot be read"):
        L2HMC(act, checkpoint=pickled)


def test_non_u1_fields_are_refused():
    with pytest.raises(ConfigError, match="l2hmc: supports U\\(1\\)"):
        L2HMC(WilsonGaugeAction(2.0, "su2"))
    with pytest.raises(ConfigError, match="updates u1 fields"):
        build_kernel(None, WilsonGaugeAction(2.0, "su2"), {"type": "l2hmc"})
    act = WilsonGaugeAction(1.0, "u1")
    k = L2HMC(act, steps=1)
    with pytest.raises(ConfigError, match="shape \\(B, 2, L0, L1\\)"):
        k.init(act.hot_start((4, 4, 4), 2))


def test_sin_charge_tends_to_geometric_charge():
    """On a smooth field of charge 1, Q_sin is close to 1 (and exactly odd under theta -> -theta)."""
    from flowplug.plugins.observables import topological_charge

    L = 16
    # constant field strength 2 pi / V in the plaquettes: links of a unit-charge configuration
    t = torch.zeros(1, 2, L, L, dtype=torch.float64)
    f = 2 * math.pi / L**2
    idx = torch.arange(L, dtype=torch.float64)
    t[0, 1] = f * idx.view(-1, 1)  # theta_1(x) = f x0
    t[0, 0, L - 1, :] = -f * L * idx  # twist closing the torus
    t = wrap_angle(t)
    assert float(topological_charge(t)) == pytest.approx(1.0, abs=1e-9)
    assert float(sin_charge(t)) == pytest.approx(1.0, abs=1e-3)
    assert float(sin_charge(-t)) == pytest.approx(-float(sin_charge(t)), abs=1e-14)
