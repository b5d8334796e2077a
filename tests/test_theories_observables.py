"""Tests of the built-in observables (deterministic: constructed fields with known values)."""

from __future__ import annotations

import math

import pytest
import torch

from flowplug import groups
from flowplug.errors import ConfigError, ShapeError
from flowplug.manager import new_plugin_manager
from flowplug.measure import default_observables, measurement
from flowplug.plugins import observables as obs


def flux_angles(lattice, mu, nu, n):
    """U(1) angles (1, d, L...) with n units of constant flux through the (mu, nu) planes.

    theta_nu(x) = 2 pi n x_mu / (L_mu L_nu); theta_mu = -2 pi n x_nu / L_nu on the slice
    x_mu = L_mu - 1 (closing the torus); every (mu, nu) plaquette angle is 2 pi n / (L_mu L_nu).
    """
    d = len(lattice)
    theta = torch.zeros(1, d, *lattice, dtype=torch.float64)
    coords = torch.meshgrid(*[torch.arange(L, dtype=torch.float64) for L in lattice], indexing="ij")
    lm, ln = lattice[mu], lattice[nu]
    theta[0, nu] += 2 * math.pi * n * coords[mu] / (lm * ln)
    edge = (coords[mu] == lm - 1).to(torch.float64)
    theta[0, mu] -= edge * 2 * math.pi * n * coords[nu] / ln
    return theta


def test_u1_flux_plaquettes_constant():
    from flowplug.gauge import u1_plaquettes

    th = flux_angles((4, 6), 0, 1, 2)
    p = groups.wrap_angle(u1_plaquettes(th))
    torch.testing.assert_close(p, torch.full_like(p, 2 * math.pi * 2 / 24))


@pytest.mark.parametrize("n", [-2, -1, 0, 1, 3])
def test_u1_2d_charge_is_the_flux(n):
    th = groups.wrap_angle(flux_angles((6, 5), 0, 1, n))
    assert obs.topological_charge(th).item() == pytest.approx(n, abs=1e-12)


def test_u1_2d_charge_integer_on_random_fields():
    th = groups.wrap_angle(
        6 * torch.randn(50, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    )
    q = obs.topological_charge(th)
    torch.testing.assert_close(q, q.round(), rtol=0, atol=1e-12)
    assert q.abs().max() >= 1


def embed_su3(theta):
    """U(1) angles -> SU(3) links diag(e^{i theta}, e^{-i theta}, 1)."""
    e = torch.exp(1j * theta)
    z = torch.zeros(*theta.shape, 3, 3, dtype=torch.complex128)
    z[..., 0, 0], z[..., 1, 1], z[..., 2, 2] = e, e.conj(), 1.0
    return z


@pytest.mark.parametrize("n1,n2", [(1, 1), (1, -2), (0, 1)])
def test_su3_clover_charge_of_abelian_flux(n1, n2):
    """Constant abelian fluxes f01 = 2 pi n1/(L0 L1), f23 = 2 pi n2/(L2 L3), embedded as
    diag(e^{if}, e^{-if}, 1): clover F_01 = sin f01 diag(1, -1, 0), so
    Q = V 2 sin f01 sin f23 / (4 pi^2) = 2 n1 n2 (sin f / f factors)."""
    lattice = (4, 5, 4, 6)
    th = flux_angles(lattice, 0, 1, n1) + flux_angles(lattice, 2, 3, n2)
    u = embed_su3(th)
    f01 = 2 * math.pi * n1 / 20
    f23 = 2 * math.pi * n2 / 24
    expect = 480 * 2 * math.sin(f01) * math.sin(f23) / (4 * math.pi**2)
    q = obs.topological_charge(u)
    assert q.item() == pytest.approx(expect, abs=1e-10)
    if n1 and n2:
        assert q.item() == pytest.approx(2 * n1 * n2, rel=0.1)  # lattice artefact sin(f)/f


def test_su3_clover_charge_gauge_invariant_and_parity_odd():
    g = torch.Generator().manual_seed(4)
    lattice = (3, 3, 3, 3)
    th = flux_angles(lattice, 0, 1, 1) + flux_angles(lattice, 2, 3, 1)
    u = embed_su3(th) @ groups.expmap(0.3 * groups.random_algebra((1, 4, *lattice), 3, generator=g))
    q = obs.topological_charge(u)
    omega = groups.haar_random((1, *lattice), 3, generator=g)
    v = torch.stack([omega @ u[:, m] @ torch.roll(omega, -1, 1 + m).mH for m in range(4)], 1)
    torch.testing.assert_close(obs.topological_charge(v), q, rtol=1e-10, atol=1e-10)
    # swapping two axes (an improper rotation) flips the sign of Q
    w = u.transpose(2, 3)[:, [1, 0, 2, 3]]
    torch.testing.assert_close(obs.topological_charge(w), -q, rtol=1e-10, atol=1e-10)


def test_clover_of_unit_links_vanishes():
    u = torch.eye(3, dtype=torch.complex128).expand(2, 4, 2, 2, 2, 2, 3, 3)
    assert obs.topological_charge(u).abs().max() == 0
    assert obs.plaquette(u).tolist() == [1.0, 1.0]
    assert obs.link_trace(u).tolist() == [1.0, 1.0]


def test_charge_rejects_other_dimensions():
    with pytest.raises(ShapeError, match="2D"):
        obs.topological_charge(torch.zeros(1, 3, 2, 2, 2, dtype=torch.float64))
    with pytest.raises(ShapeError, match="4D"):
        obs.topological_charge(torch.eye(2, dtype=torch.complex128).expand(1, 2, 3, 3, 2, 2))


def test_scalar_observables():
    g = torch.Generator().manual_seed(5)
    phi = torch.randn(3, 4, 6, dtype=torch.float64, generator=g)
    v = 24
    m = phi.sum((1, 2))
    torch.testing.assert_close(obs.magnetization(phi), m / v)
    torch.testing.assert_close(obs.abs_magnetization(phi), (m / v).abs())
    torch.testing.assert_close(obs.chi_2(phi), m**2 / v)
    # chi_2 equals the sum over separations of the two-point function
    total = sum(obs.two_point(phi, (a, b)) for a in range(4) for b in range(6))
    torch.testing.assert_close(total, obs.chi_2(phi))
    e = 0.5 * ((phi * phi.roll(-1, 1)).mean((1, 2)) + (phi * phi.roll(-1, 2)).mean((1, 2)))
    torch.testing.assert_close(obs.ising_energy(phi), e)
    torch.testing.assert_close(obs.two_point(phi, (0, 0)), (phi**2).mean((1, 2)))
    with pytest.raises(ShapeError, match="shift"):
        obs.two_point(phi, (1,))


def test_registry_and_measurement():
    pm = new_plugin_manager(autoload=False)
    reg = pm.registry("observable")
    for name in [
        "plaquette",
        "topological_charge",
        "link_trace",
        "magnetization",
        "two_point",
        "chi_2",
        "ising_energy",
    ]:
        assert name in reg
    meas = measurement("scalar", ["chi_2", "two_point"], registry=reg, options={"two_point": {"shift": (0, 2)}})
    phi = torch.randn(2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = meas(phi)
    torch.testing.assert_close(out["two_point"], obs.two_point(phi, (0, 2)))
    with pytest.raises(ConfigError, match="not for field kind"):
        measurement("u1", ["chi_2"], registry=reg)
    assert default_observables("u1", 2) == ("plaquette", "topological_charge")
    assert default_observables("u1", 3) == ("plaquette",)
    assert default_observables("su3", 4) == ("plaquette", "topological_charge")
    assert default_observables("su2", 2) == ("plaquette",)
