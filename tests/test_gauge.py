"""Plaquette and link trace: normalisation, gauge invariance, U(1)/SU(N) consistency."""

from __future__ import annotations

import math

import pytest
import torch

from flowplug import gauge
from flowplug.errors import ShapeError
from flowplug.groups import haar_random, wrap_angle

LATTICE = (2, 3, 4, 5)  # non-cubic: a swapped axis changes the result


def _gauge_transform_sun(links, omega):
    """U_mu(x) -> Omega(x) U_mu(x) Omega(x+mu)^+ ."""
    d = links.shape[1]
    out = []
    for mu in range(d):
        out.append(omega @ links[:, mu] @ torch.roll(omega, -1, dims=1 + mu).mH)
    return torch.stack(out, 1)


def test_unit_gauge_gives_one():
    unit = torch.eye(3, dtype=torch.complex128).expand(2, 4, *LATTICE, 3, 3)
    assert gauge.plaquette(unit).tolist() == [1.0, 1.0]
    assert gauge.link_trace(unit).tolist() == [1.0, 1.0]
    assert gauge.unitarity_deviation(unit).tolist() == [0.0, 0.0]
    assert gauge.determinant_deviation(unit).tolist() == [0.0, 0.0]
    assert gauge.plaquette(torch.zeros(1, 2, 3, 5, dtype=torch.float64)).tolist() == [1.0]


@pytest.mark.parametrize("n", [2, 3])
def test_plaquette_is_gauge_invariant(n):
    g = torch.Generator().manual_seed(n)
    links = haar_random((2, 4, *LATTICE), n, generator=g)
    omega = haar_random((2, *LATTICE), n, generator=g)
    before = gauge.plaquette(links)
    after = gauge.plaquette(_gauge_transform_sun(links, omega))
    assert torch.allclose(before, after, atol=1e-13)
    assert not torch.allclose(gauge.link_trace(links), gauge.link_trace(_gauge_transform_sun(links, omega)))


def test_u1_angles_agree_with_1x1_complex_links():
    g = torch.Generator().manual_seed(7)
    theta = wrap_angle(2 * math.pi * torch.rand(3, 4, *LATTICE, generator=g, dtype=torch.float64))
    as_matrices = torch.exp(1j * theta)[..., None, None]
    assert torch.allclose(gauge.plaquette(theta), gauge.plaquette(as_matrices), atol=1e-13)
    assert torch.allclose(gauge.link_trace(theta), gauge.link_trace(as_matrices), atol=1e-13)
    alpha = 2 * math.pi * torch.rand(3, *LATTICE, generator=g, dtype=torch.float64)
    transformed = torch.stack([theta[:, mu] + alpha - torch.roll(alpha, -1, dims=1 + mu) for mu in range(4)], 1)
    assert torch.allclose(gauge.plaquette(theta), gauge.plaquette(transformed), atol=1e-12)


def test_plaquette_orientation_on_a_single_plane():
    """One link U_0(x=0) = exp(i a) in 2D enters exactly two plaquettes: P_01(0) and P_01(0 - e_1)."""
    theta = torch.zeros(1, 2, 3, 4, dtype=torch.float64)
    theta[0, 0, 0, 0] = 0.3
    planes = gauge.u1_plaquettes(theta)[0, 0]
    assert planes[0, 0] == pytest.approx(0.3) and planes[0, -1] == pytest.approx(-0.3)
    assert int((planes != 0).sum()) == 2


def test_shape_errors():
    with pytest.raises(ShapeError, match="SU\\(N\\) links must be complex"):
        gauge.unitarity_deviation(torch.zeros(1, 2, 3, 3))
    with pytest.raises(ShapeError, match="2 directions need 2 lattice axes"):
        gauge.plaquette(torch.zeros(1, 2, 4, 4, 4, 3, 3, dtype=torch.complex128))
    with pytest.raises(ShapeError, match="d >= 2"):
        gauge.plaquette(torch.zeros(1, 1, 4, dtype=torch.float64))
