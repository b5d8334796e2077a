"""The staggered Dirac operators (flowplug.plugins.staggered): ``staggered`` and ``staggered-yukawa``.

Independent checks: the free log det and condensate against momentum space (antiperiodic
time, d = 1, 2, 4, U(1) and SU(N)); the anti-Hermitian hopping (D^+ = 2m - D), the real
determinant (epsilon-hermiticity), gauge covariance; the two dense constructions; the
conjugate gradient's residual; the derivatives (links and scalar) against finite differences
and autograd; the explicit choice of background and the errors.
"""

from __future__ import annotations

import math

import pytest
import torch

from flowplug import groups
from flowplug.errors import ConfigError, ShapeError
from flowplug.plugins.staggered import (
    StaggeredDiracOperator,
    free_staggered_condensate,
    free_staggered_logdet,
    staggered_phases,
)
from flowplug.theory import AngleSpace, SUNSpace

pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _background(kind: str, lattice, batch: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    if kind == "scalar":
        return torch.randn((batch, *lattice), generator=g, dtype=torch.float64)
    space = AngleSpace("u1") if kind == "u1" else SUNSpace(int(kind[2:]))
    return space.hot(lattice, batch, generator=g)


def _op(kind: str, mass: float = 0.3, g: float = 0.7, **kw) -> StaggeredDiracOperator:
    return StaggeredDiracOperator(mass, g=g, background="scalar" if kind == "scalar" else "links", **kw)


def _spinor(op, x, seed: int, extra=()):
    shape = op.spinor_shape(x)
    return torch.randn((shape[0], *extra, *shape[1:]), generator=_gen(seed), dtype=torch.complex128)


def _inner(a, b):
    return (a.conj() * b).flatten(1).sum(1)


CASES = [("u1", (4, 6)), ("su2", (4, 4)), ("su3", (2, 4)), ("scalar", (4, 6)), ("u1", (2, 2, 2, 4)), ("scalar", (8,))]


def test_phases_follow_the_convention():
    eta = staggered_phases((2, 2, 2))
    assert torch.all(eta[0] == 1)
    # eta_1(x) = (-1)^x0, eta_2(x) = (-1)^(x0 + x1)
    assert eta[1, 1, 0, 0] == -1 and eta[1, 0, 1, 1] == 1
    assert eta[2, 1, 1, 0] == 1 and eta[2, 1, 0, 1] == -1 and eta[2, 0, 1, 0] == -1


# ---------------------------------------------------------------- free field, momentum space


@pytest.mark.parametrize(
    "kind, lattice, mass, antiperiodic",
    [
        ("u1", (4, 4), 0.0, True),
        ("u1", (4, 6), 0.2, True),
        ("u1", (8, 8), 0.05, True),
        ("u1", (6, 4), 0.3, False),
        ("u1", (2, 4, 2, 4), 0.1, True),
        ("su2", (4, 6), 0.0, True),
        ("su3", (2, 2, 2, 4), 0.15, True),
        ("scalar", (6, 4), 0.0, True),
        ("scalar", (10,), 0.4, True),
    ],
)
def test_free_logdet_and_condensate_equal_momentum_space(kind, lattice, mass, antiperiodic):
    op = _op(kind, mass, antiperiodic=antiperiodic)
    x = (
        torch.zeros(2, *lattice, dtype=torch.float64)
        if kind == "scalar"
        else (AngleSpace("u1") if kind == "u1" else SUNSpace(int(kind[2:]))).cold(lattice, 2)
    )
    ncol = int(kind[2:]) if kind.startswith("su") else 1
    expected = free_staggered_logdet(lattice, mass, ncolor=ncol, antiperiodic=antiperiodic)
    got = op.logdet(x)
    assert torch.all((got.real - expected).abs() <= 1e-10 * max(1.0, abs(expected)))
    assert torch.all(got.imag.abs() <= 1e-10)  # det D > 0 for a uniform mass
    assert op.free_logdet(x) == pytest.approx(expected, abs=1e-12)
    inv = torch.linalg.inv(op.dense(x))
    cond = inv.diagonal(dim1=-2, dim2=-1).sum(-1).real / (math.prod(lattice) * ncol)
    ref = free_staggered_condensate(lattice, mass, antiperiodic=antiperiodic)
    assert torch.all((cond - ref).abs() <= 1e-12)


def test_free_logdet_depends_on_the_time_boundary_and_the_phases():
    unit = AngleSpace("u1").cold((4, 4), 1)
    ap = float(StaggeredDiracOperator(0.2).logdet(unit).real)
    per = float(StaggeredDiracOperator(0.2, antiperiodic=False).logdet(unit).real)
    assert abs(ap - per) > 1e-3
    assert free_staggered_logdet((4, 4), 0.0, antiperiodic=False) == -math.inf  # the p = 0 zero mode
    # without the phases (naive hopping, eta = 1) the determinant differs: the formula sees them
    op = StaggeredDiracOperator(0.2)
    op._phases[((4, 4), "cpu")] = 0.5 * torch.ones(2, 4, 4, dtype=torch.float64)
    op._phases[((4, 4), "cpu")][1, :, 3] = -0.5
    assert abs(float(op.logdet(unit).real) - ap) > 1e-3


# ------------------------------------------------------------- structure of the operator


@pytest.mark.parametrize("kind, lattice", CASES)
def test_apply_equals_dense_and_both_constructions_agree(kind, lattice):
    op = _op(kind)
    x = _background(kind, lattice, 2, seed=1)
    psi = _spinor(op, x, seed=2)
    dense = op.dense(x)
    torch.testing.assert_close(op.dense(x, by="blocks"), dense, atol=1e-14, rtol=0)
    flat = psi.reshape(2, -1)
    torch.testing.assert_close(op.apply(x, psi).reshape(2, -1), (dense @ flat[..., None])[..., 0], atol=1e-13, rtol=0)
    torch.testing.assert_close(
        op.apply_dagger(x, psi).reshape(2, -1), (dense.mH @ flat[..., None])[..., 0], atol=1e-13, rtol=0
    )
    torch.testing.assert_close(
        op.apply_normal(x, psi).reshape(2, -1), (dense.mH @ dense @ flat[..., None])[..., 0], atol=1e-12, rtol=0
    )
    # extra axes (K vectors per configuration) act vector by vector
    many = _spinor(op, x, seed=3, extra=(3,))
    torch.testing.assert_close(op.apply(x, many)[:, 1], op.apply(x, many[:, 1]), atol=0, rtol=0)


@pytest.mark.parametrize("kind, lattice", CASES)
def test_hopping_is_anti_hermitian_and_det_is_real(kind, lattice):
    op = _op(kind)
    x = _background(kind, lattice, 2, seed=4)
    dense = op.dense(x)
    site_mass = op.diagonal(x).reshape(2, -1)
    ncol = dense.shape[-1] // site_mass.shape[-1]
    m = torch.diag_embed(site_mass.repeat_interleave(ncol, dim=1).to(torch.complex128))
    # D^+ = 2M - D (links: M = mass, so D^+ = 2 mass - D)
    torch.testing.assert_close(dense.mH, 2 * m - dense, atol=1e-14, rtol=0)
    if kind != "scalar":
        assert torch.all(op.diagonal(x) == 0.3)
    # epsilon D epsilon = D^+, so det D is real (0 or pi in the phase)
    phase = op.logdet(x).imag.abs()
    assert torch.all((phase < 1e-10) | ((phase - math.pi).abs() < 1e-10))


def test_adjoint_identity():
    op = _op("su2")
    x = _background("su2", (4, 4), 2, seed=5)
    a, b = _spinor(op, x, 6), _spinor(op, x, 7)
    torch.testing.assert_close(_inner(a, op.apply(x, b)), _inner(op.apply_dagger(x, a), b), atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind, lattice", [("u1", (4, 6)), ("su3", (4, 4)), ("su2", (2, 2, 2, 4))])
def test_gauge_covariance(kind, lattice):
    """D[U^G] = G D[U] G^+ for U_mu(x) -> G(x) U_mu(x) G(x+mu)^+; det D is gauge invariant."""
    op = _op(kind)
    u = _background(kind, lattice, 2, seed=8)
    d = len(lattice)
    if kind == "u1":
        alpha = torch.rand((2, *lattice), generator=_gen(9), dtype=torch.float64) * 6.0
        ut = torch.stack([u[:, mu] + alpha - torch.roll(alpha, -1, 1 + mu) for mu in range(d)], 1)
        gmat = torch.polar(torch.ones_like(alpha), alpha)
    else:
        gmat = SUNSpace(int(kind[2:])).hot(lattice, 2, generator=_gen(9))[:, 0]
        ut = torch.stack([gmat @ u[:, mu] @ torch.roll(gmat, -1, 1 + mu).mH for mu in range(d)], 1)
    psi = _spinor(op, u, seed=10)
    if kind == "u1":
        rot = gmat * psi
        expected = gmat * op.apply(u, psi)
    else:
        rot = (gmat @ psi[..., None])[..., 0]
        expected = (gmat @ op.apply(u, psi)[..., None])[..., 0]
    torch.testing.assert_close(op.apply(ut, rot), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(op.logdet(ut).real, op.logdet(u).real, atol=1e-10, rtol=0)


# --------------------------------------------------------------------------- solvers


@pytest.mark.parametrize("kind, lattice", [("u1", (8, 8)), ("scalar", (8, 8)), ("su3", (4, 4))])
def test_conjugate_gradient_solves_the_normal_equations(kind, lattice):
    op = _op(kind, mass=0.1, g=0.5)
    x = _background(kind, lattice, 3, seed=11)
    b = _spinor(op, x, seed=12, extra=(2,))
    sol, report = op.solve_normal(x, b, tol=1e-11)
    res = (op.apply_normal(x, sol) - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)
    assert torch.all(res < 1e-10) and torch.all(report.converged)
    torch.testing.assert_close(report.residual, res, atol=1e-12, rtol=0)
    y, _ = op.solve(x, b[:, 0], tol=1e-12)
    torch.testing.assert_close(op.apply(x, y), b[:, 0], atol=1e-9, rtol=0)


# --------------------------------------------------------------------------- derivatives


def _re_bilinear(op, x, left, right):
    return _inner(left, op.apply(x, right)).real


def test_u1_derivative_equals_finite_differences():
    op = _op("u1")
    x = _background("u1", (4, 4), 2, seed=13)
    left, right = _spinor(op, x, 14, extra=(2,)), _spinor(op, x, 15, extra=(2,))
    g = op.derivative(x, left, right).real
    eps = 1e-6
    for idx in [(0, 0, 1, 2), (1, 1, 3, 3), (0, 1, 2, 0)]:  # idx (batch, mu, x0, x1); one at the time boundary
        xp, xm = x.clone(), x.clone()
        xp[idx] += eps
        xm[idx] -= eps
        fd = (_re_bilinear(op, xp, left, right) - _re_bilinear(op, xm, left, right)) / (2 * eps)
        assert abs(float(fd[idx[0]]) - float(g[idx])) < 1e-7


@pytest.mark.parametrize("kind", ["su2", "su3"])
def test_sun_derivative_equals_the_directional_derivative(kind):
    op = _op(kind)
    x = _background(kind, (4, 4), 2, seed=16)
    left, right = _spinor(op, x, 17), _spinor(op, x, 18)
    m = op.derivative(x, left, right)
    n = int(kind[2:])
    a = torch.randn(x.shape, generator=_gen(19), dtype=torch.complex128)
    xdir = groups.project_algebra(a)  # X in su(N) on every link
    eps = 1e-6

    def f(s):
        return _re_bilinear(op, torch.linalg.matrix_exp(s * xdir) @ x, left, right)

    fd = (f(eps) - f(-eps)) / (2 * eps)
    pred = torch.einsum("b...ij,b...ji->b", xdir, m).real
    assert n in (2, 3)
    torch.testing.assert_close(fd, pred, atol=1e-6, rtol=0)


def test_scalar_derivative_equals_autograd():
    op = _op("scalar", g=0.8)
    x = _background("scalar", (4, 6), 2, seed=20)
    left, right = _spinor(op, x, 21, extra=(3,)), _spinor(op, x, 22, extra=(3,))
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_re_bilinear(op, xg, left, right).sum(), xg)
    torch.testing.assert_close(op.derivative(x, left, right).real, grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind, lattice", [("u1", (4, 4)), ("su2", (2, 4)), ("scalar", (4, 4))])
def test_trace_derivative_equals_summed_derivative_and_logdet_gradient(kind, lattice):
    op = _op(kind)
    x = _background(kind, lattice, 2, seed=23)
    inv = torch.linalg.inv(op.dense(x))
    shape = op.spinor_shape(x)
    n = inv.shape[-1]
    left = inv.conj().reshape(2, n, *shape[1:])
    right = torch.eye(n, dtype=inv.dtype).reshape(n, *shape[1:]).expand(2, n, *shape[1:])
    fast = op.trace_derivative(x, inv)
    torch.testing.assert_close(fast, op.derivative(x, left, right), atol=1e-12, rtol=0)
    if kind != "su2":  # Re tr(D^-1 dD) = d log|det D|: autograd through slogdet
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(torch.linalg.slogdet(op.dense(xg, by="blocks"))[1].sum(), xg)
        torch.testing.assert_close(fast.real, grad, atol=1e-10, rtol=0)


# --------------------------------------------------------------------------- registry, errors


def test_registered_operators_and_explicit_background(fresh_pm):
    reg = fresh_pm.registry("dirac_operator")
    links = reg.get("staggered").factory(mass=0.1)
    yuk = reg.get("staggered-yukawa").factory(mass=0.1, g=0.5)
    assert links.background == "links" and yuk.background == "scalar" and yuk.g == 0.5
    assert reg.get("staggered").provider == "flowplug"
    # the same real (B, 2, 4, 4) tensor: U(1) angles for one, a 3D scalar field for the other
    t = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    assert links.spinor_shape(t) == (1, 4, 4) and yuk.spinor_shape(t) == (1, 2, 4, 4)


def test_bad_input_is_refused_with_clear_errors():
    with pytest.raises(ConfigError, match="background must be 'links' or 'scalar'; found 'gauge'"):
        StaggeredDiracOperator(0.1, background="gauge")
    with pytest.raises(ConfigError, match="finite"):
        StaggeredDiracOperator(float("nan"))
    op = StaggeredDiracOperator(0.1)
    with pytest.raises(ShapeError, match="even extents"):
        op.geometry(torch.zeros(1, 2, 3, 4, dtype=torch.float64))
    with pytest.raises(ShapeError, match="U\\(1\\) links must be real angles"):
        op.geometry(torch.zeros(1, 4, 4, dtype=torch.float64))
    with pytest.raises(ShapeError, match="phi must be a real tensor"):
        StaggeredDiracOperator(0.1, background="scalar").geometry(torch.zeros(1, 4, 4, dtype=torch.complex128))
    x = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    with pytest.raises(ShapeError, match="does not fit the background"):
        op.apply(x, torch.zeros(1, 4, 6, dtype=torch.complex128))
    with pytest.raises(ShapeError, match="expected a matrix of shape"):
        op.trace_derivative(x, torch.zeros(1, 3, 3, dtype=torch.complex128))
    with pytest.raises(ConfigError, match="by must be"):
        op.dense(x, by="rows")
