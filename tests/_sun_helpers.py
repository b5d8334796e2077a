"""SU(N) test points and gauges shared by the tests of the SU(N) flow layers
(``test_sun_degenerate.py``, ``test_flow_stout.py``); every random number from a fixed seed."""

from __future__ import annotations

import math

import pytest
import torch

from flowplug import groups, io

from _io_helpers import ensembles_dir

TWO_PI = 2 * math.pi


def gen(seed):
    return torch.Generator().manual_seed(seed)


def eigdiag(*phases):
    """diag(e^{i phase_j}), complex128."""
    return torch.diag(torch.exp(1j * torch.tensor(phases, dtype=torch.float64)))


def centre(n, k):
    """The centre element e^{2 pi i k/N} 1 of SU(N), complex128."""
    z = torch.polar(torch.tensor(1.0, dtype=torch.float64), torch.tensor(TWO_PI * k / n, dtype=torch.float64))
    return z * torch.eye(n, dtype=torch.complex128)


def conj(w, seed=5):
    """w conjugated by a Haar-random element (seed)."""
    om = groups.haar_random((), w.shape[-1], generator=gen(seed))
    return om @ w @ om.mH


def perturb(w, eps, seed):
    """exp(eps X) w with X a Gaussian su(N) element (a generic direction)."""
    x = groups.random_algebra(w.shape[:-2], w.shape[-1], generator=gen(seed))
    return groups.expmap(eps * x) @ w


def randomize(module, seed=3, scale=1.0):
    """Add Gaussian noise of ``scale`` / sqrt(fan-in) to every parameter (seed)."""
    g = gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            std = scale / math.sqrt(math.prod(p.shape[1:])) if p.dim() > 1 else 0.1 * scale
            p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))


def unit_gauge(n, lattice, batch=2):
    """Unit links, (batch, d, L..., N, N) complex128."""
    d = len(lattice)
    return torch.eye(n, dtype=torch.complex128).expand(batch, d, *lattice, n, n).clone()


def centre_twisted(n, lattice, batch=2):
    """U_0(x) = z^{x_1} 1 with z = e^{2 pi i/N}, other links 1: plaquettes at centre elements."""
    u = unit_gauge(n, lattice, batch)
    z = centre(n, 1)
    for x1 in range(lattice[1]):
        u[:, 0, :, x1] = torch.linalg.matrix_power(z, x1)
    return u


def tmlqcd_unity():
    """The tmLQCD unity file of ../shared/ensembles (skips the test when it is absent)."""
    path = ensembles_dir() / "tmlqcd.unity.l4444.lime"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    ens = io.read(path)
    assert ens.group == "su3" and tuple(ens.lattice) == (4, 4, 4, 4)
    return ens.links
