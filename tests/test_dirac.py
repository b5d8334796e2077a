"""The Dirac-operator hook and the built-in Wilson operator (flowplug.plugins.dirac).

Independent checks: the unit-gauge log det against the momentum-space product of the free
operator's eigenvalues (antiperiodic in time), gamma_5-hermiticity, the adjoint, gauge
covariance, the two ways of building the dense matrix, the conjugate gradient's residual
and report, and the link derivative used by the forces against finite differences.
"""

from __future__ import annotations

import math

import pytest
import torch

import flowplug
from flowplug import groups
from flowplug.errors import ConfigError, ConvergenceError, DuplicateComponentError, ShapeError
from flowplug.plugins.dirac import (
    WilsonDiracOperator,
    conjugate_gradient,
    free_wilson_logdet,
    gamma_matrices,
)
from flowplug.records import DiracOperatorSpec
from flowplug.theory import AngleSpace, SUNSpace

pytestmark = pytest.mark.usefixtures("one_thread")


def _links(kind: str, lattice, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    space = AngleSpace("u1") if kind == "u1" else SUNSpace(int(kind[2:]))
    return space.hot(lattice, batch, generator=g)


def _spinor(op, links, seed: int, extra=()):
    g = torch.Generator().manual_seed(seed)
    shape = op.spinor_shape(links)
    return torch.randn((shape[0], *extra, *shape[1:]), generator=g, dtype=torch.complex128)


def _inner(a, b):
    return (a.conj() * b).flatten(1).sum(1)


# ------------------------------------------------------------------------ gamma matrices


@pytest.mark.parametrize("d", [2, 4])
def test_gamma_matrices_are_a_euclidean_clifford_algebra(d):
    g, g5 = gamma_matrices(d)
    s = g.shape[-1]
    one = torch.eye(s, dtype=g.dtype)
    for mu in range(d):
        assert torch.equal(g[mu], g[mu].mH)  # Hermitian
        assert torch.allclose(g5 @ g[mu] + g[mu] @ g5, torch.zeros_like(one))
        for nu in range(d):
            assert torch.allclose(g[mu] @ g[nu] + g[nu] @ g[mu], 2 * (mu == nu) * one)
    assert torch.allclose(g5 @ g5, one)
    if d == 2:  # DESIGN.md: gamma_0, gamma_1 = sigma_1, sigma_2; gamma_5 = -i gamma_0 gamma_1 = sigma_3
        assert torch.allclose(g5, -1j * g[0] @ g[1])
        assert torch.allclose(g5, torch.tensor([[1, 0], [0, -1]], dtype=g.dtype))
    else:  # Gattringer & Lang chiral basis: gamma_5 = gamma_1 gamma_2 gamma_3 gamma_4 = diag(1, 1, -1, -1)
        assert torch.allclose(g5, g[0] @ g[1] @ g[2] @ g[3])
        assert torch.allclose(g5, torch.diag(torch.tensor([1, 1, -1, -1], dtype=g.dtype)))


def test_gamma_matrices_refuse_other_dimensions():
    with pytest.raises(ShapeError, match="d = 2 and 4; found d = 3"):
        gamma_matrices(3)


# ---------------------------------------------------------------- free field, momentum space


@pytest.mark.parametrize(
    "kind, lattice, kappa, antiperiodic",
    [
        ("u1", (4, 4), 0.2, True),
        ("u1", (3, 6), 0.24, True),
        ("u1", (8, 8), 0.249, True),  # near the free critical value 1/4
        ("u1", (5, 4), 0.3, False),  # beyond it (det may be small but not zero), periodic
        ("u1", (2, 4, 2, 4), 0.12, True),
        ("su2", (4, 6), 0.2, True),
        ("su3", (2, 2, 2, 4), 0.125, True),
    ],
)
def test_unit_gauge_logdet_equals_momentum_space_product(kind, lattice, kappa, antiperiodic):
    op = WilsonDiracOperator(kappa, antiperiodic=antiperiodic)
    space = AngleSpace("u1") if kind == "u1" else SUNSpace(int(kind[2:]))
    unit = space.cold(lattice, 2)
    ncol = 1 if kind == "u1" else int(kind[2:])
    expected = free_wilson_logdet(lattice, kappa, ncolor=ncol, antiperiodic=antiperiodic)
    got = op.logdet(unit)
    assert torch.all((got.real - expected).abs() <= 1e-10 * max(1.0, abs(expected)))
    assert torch.all(got.imag.abs() <= 1e-10)  # det D real and positive for the free operator


def test_free_logdet_depends_on_the_time_boundary_condition():
    # the check above would pass for a wrong boundary only if both agreed: they must not
    unit = AngleSpace("u1").cold((4, 4), 1)
    ap = float(WilsonDiracOperator(0.2).logdet(unit).real)
    per = float(WilsonDiracOperator(0.2, antiperiodic=False).logdet(unit).real)
    assert abs(ap - per) > 1e-3
    assert abs(ap - free_wilson_logdet((4, 4), 0.2)) < 1e-12
    assert abs(per - free_wilson_logdet((4, 4), 0.2, antiperiodic=False)) < 1e-12


# ------------------------------------------------------------- structure of the operator


@pytest.mark.parametrize("kind, lattice", [("u1", (4, 6)), ("su2", (4, 4)), ("su3", (3, 4)), ("su2", (2, 2, 2, 4))])
def test_gamma5_hermiticity(kind, lattice):
    op = WilsonDiracOperator(0.23)
    u = _links(kind, lattice, 2, seed=1)
    psi = _spinor(op, u, seed=2)
    lhs = op.apply_dagger(u, psi)
    rhs = op.gamma5(u, op.apply(u, op.gamma5(u, psi)))
    assert (lhs - rhs).abs().max() < 1e-13
    dense = op.dense(u)
    n = dense.shape[-1]
    g5 = op.gamma5(u, torch.eye(n, dtype=dense.dtype).reshape(n, *psi.shape[1:]).expand(2, n, *psi.shape[1:]))
    g5 = g5.reshape(2, n, n).transpose(1, 2)  # the matrix of gamma_5
    assert (dense.mH - g5 @ dense @ g5).abs().max() < 1e-13
    logdet = op.logdet(u)
    assert torch.all(torch.minimum(logdet.imag.abs(), (logdet.imag.abs() - math.pi).abs()) < 1e-9)  # det D real


@pytest.mark.parametrize("kind, lattice", [("u1", (4, 6)), ("su3", (4, 2))])
def test_dagger_is_the_adjoint_and_dense_builds_agree(kind, lattice):
    op = WilsonDiracOperator(0.21)
    u = _links(kind, lattice, 3, seed=3)
    a, b = _spinor(op, u, 4), _spinor(op, u, 5)
    torch.testing.assert_close(_inner(a, op.apply(u, b)), _inner(op.apply_dagger(u, a), b), rtol=1e-13, atol=1e-13)
    cols, blocks = op.dense(u), op.dense(u, by="blocks")
    assert (cols - blocks).abs().max() < 1e-15
    torch.testing.assert_close((cols @ b.reshape(3, -1, 1)).reshape(b.shape), op.apply(u, b), rtol=0, atol=1e-14)
    torch.testing.assert_close(op.apply_normal(u, b), op.apply_dagger(u, op.apply(u, b)), rtol=0, atol=1e-14)
    with pytest.raises(ConfigError, match="'columns' or 'blocks'"):
        op.dense(u, by="rows")


def test_dense_blocks_accumulate_on_extent_two():
    # with L_mu = 2 the hops to x + mu and x - mu land in one block: they must add up
    op = WilsonDiracOperator(0.2)
    u = _links("su2", (2, 2, 2, 2), 2, seed=6)
    assert (op.dense(u) - op.dense(u, by="blocks")).abs().max() < 1e-15


@pytest.mark.parametrize("kind", ["u1", "su2"])
def test_gauge_covariance(kind):
    op = WilsonDiracOperator(0.22)
    lattice = (4, 4)
    u = _links(kind, lattice, 2, seed=7)
    psi = _spinor(op, u, 8)
    g = torch.Generator().manual_seed(9)
    if kind == "u1":
        alpha = 2 * math.pi * torch.rand(2, *lattice, generator=g, dtype=torch.float64)
        ut = torch.stack([u[:, mu] + alpha - torch.roll(alpha, -1, 1 + mu) for mu in range(2)], 1)
        omega = torch.polar(torch.ones_like(alpha), alpha)[..., None]
        rot = omega * psi
    else:
        om = groups.haar_random((2, *lattice), 2, generator=g)
        ut = torch.stack([om @ u[:, mu] @ torch.roll(om, -1, 1 + mu).mH for mu in range(2)], 1)
        rot = psi @ om.transpose(-1, -2)  # Omega(x) acting on colour
    lhs = op.apply(ut, rot)
    rhs = op.apply(u, psi)
    rhs = (omega * rhs) if kind == "u1" else rhs @ om.transpose(-1, -2)
    assert (lhs - rhs).abs().max() < 1e-13
    torch.testing.assert_close(op.logdet(ut), op.logdet(u), rtol=1e-12, atol=1e-12)


def test_extra_axes_apply_per_vector():
    op = WilsonDiracOperator(0.2)
    u = _links("su2", (4, 2), 2, seed=10)
    psi = _spinor(op, u, 11, extra=(3,))
    out = op.apply(u, psi)
    for k in range(3):
        torch.testing.assert_close(out[:, k], op.apply(u, psi[:, k]), rtol=0, atol=1e-15)


def test_layout_errors_name_expected_and_found():
    op = WilsonDiracOperator(0.2)
    with pytest.raises(ShapeError, match=r"U\(1\) links must be real angles of shape"):
        op.apply(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, 2, dtype=torch.complex128))
    with pytest.raises(ShapeError, match="implemented for d = 2 and 4; the links have d = 3"):
        op.spinor_shape(torch.zeros(1, 3, 2, 2, 2, dtype=torch.float64))
    u = _links("u1", (4, 4), 2, seed=0)
    with pytest.raises(ShapeError, match=r"expected a complex fermion field of shape \(2, 4, 4, 2\)"):
        op.apply(u, torch.zeros(2, 4, 4, 2))
    with pytest.raises(ShapeError, match="does not fit the links"):
        op.apply(u, torch.zeros(2, 4, 4, 3, dtype=torch.complex128))
    with pytest.raises(ConfigError, match="kappa must be a finite number >= 0; found -0.1"):
        WilsonDiracOperator(-0.1)


# --------------------------------------------------------------------------- solvers


@pytest.mark.parametrize("kind, lattice", [("u1", (6, 6)), ("su3", (4, 4))])
def test_cg_solves_the_normal_equations_and_reports(kind, lattice):
    op = WilsonDiracOperator(0.24)
    u = _links(kind, lattice, 3, seed=12)
    b = _spinor(op, u, 13)
    b[1] = 0  # a zero right-hand side converges at once, to zero
    x, report = op.solve_normal(u, b, tol=1e-11)
    res = (op.apply_normal(u, x) - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1).clamp_min(1e-300)
    assert torch.all(res <= 1e-11)
    torch.testing.assert_close(report.residual, torch.where(b.flatten(1).norm(dim=1) > 0, res, 0.0), rtol=1e-6, atol=0)
    assert report.converged.all() and report.iterations[1] == 0 and torch.all(report.iterations[[0, 2]] > 5)
    assert torch.all(x[1] == 0)
    assert "iterations" in report.describe()
    y, _ = op.solve(u, b, tol=1e-12)  # D y = b
    assert (op.apply(u, y) - b).abs().max() < 1e-9


def test_cg_raises_when_not_converged_and_checks_its_settings():
    op = WilsonDiracOperator(0.24)
    u = _links("u1", (6, 6), 2, seed=14)
    b = _spinor(op, u, 15)
    with pytest.raises(
        ConvergenceError, match=r"tolerance 1e-12 not reached in 3 iterations for batch elements \[0, 1\]"
    ):
        op.solve_normal(u, b, maxiter=3)
    x, report = op.solve_normal(u, b, maxiter=3, check=False)
    assert not report.converged.any() and torch.all(report.iterations == 3) and torch.all(report.residual > 1e-12)
    with pytest.raises(ConfigError, match="tol must be > 0"):
        conjugate_gradient(lambda v: v, b, tol=0)
    with pytest.raises(ConfigError, match="maxiter must be >= 1"):
        conjugate_gradient(lambda v: v, b, maxiter=0)


# --------------------------------------------------------------------- link derivatives


def test_u1_derivative_matches_finite_differences():
    op = WilsonDiracOperator(0.23)
    u = _links("u1", (4, 6), 2, seed=16)
    left, right = _spinor(op, u, 17), _spinor(op, u, 18)
    grad = op.derivative(u, left, right)
    eps = 1e-6
    for idx in [(0, 0, 1, 2), (1, 1, 3, 5), (0, 1, 0, 0), (1, 1, 2, 5)]:  # incl. links across the time boundary
        up, dn = u.clone(), u.clone()
        up[idx] += eps
        dn[idx] -= eps
        fd = (_inner(left, op.apply(up, right)) - _inner(left, op.apply(dn, right)))[idx[0]] / (2 * eps)
        assert abs(complex(fd) - complex(grad[idx])) < 1e-7


@pytest.mark.parametrize("n, lattice", [(2, (4, 4)), (3, (2, 2, 2, 2))])
def test_sun_derivative_matches_finite_differences(n, lattice):
    op = WilsonDiracOperator(0.15)
    u = _links(f"su{n}", lattice, 2, seed=19)
    left, right = _spinor(op, u, 20), _spinor(op, u, 21)
    m = op.derivative(u, left, right)
    x = SUNSpace(n).momenta(u, torch.Generator().manual_seed(22))
    eps = 1e-6
    fd = (
        _inner(left, op.apply(groups.expmap(eps * x) @ u, right))
        - _inner(left, op.apply(groups.expmap(-eps * x) @ u, right))
    ) / (2 * eps)
    analytic = torch.einsum("...ij,...ji->...", x, m).flatten(1).sum(1)
    torch.testing.assert_close(analytic, fd, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("kind, lattice", [("u1", (4, 4)), ("su2", (4, 2)), ("su3", (2, 2, 2, 2))])
def test_trace_derivative_equals_derivative_over_unit_vectors(kind, lattice):
    op = WilsonDiracOperator(0.2)
    u = _links(kind, lattice, 2, seed=23)
    inv = torch.linalg.inv(op.dense(u))
    shape = op.spinor_shape(u)
    n = inv.shape[-1]
    left = inv.conj().reshape(2, n, *shape[1:])
    right = torch.eye(n, dtype=inv.dtype).reshape(n, *shape[1:]).expand(2, n, *shape[1:])
    assert (op.trace_derivative(u, inv) - op.derivative(u, left, right)).abs().max() < 1e-14
    with pytest.raises(ShapeError, match="expected a matrix of shape"):
        op.trace_derivative(u, inv[:, :-1])


# ----------------------------------------------------------------------- the hook


class _Staggered:
    """A third-party-style Dirac operator (only its registration matters here)."""

    def __init__(self, mass: float = 0.1) -> None:
        self.mass = mass


class DiracPlugin:
    @flowplug.hookimpl
    def flowplug_dirac_operators(self):
        return [
            DiracOperatorSpec(
                name="toy-staggered",
                description="toy staggered operator",
                factory=_Staggered,
                fields=("u1",),
                parameters=("mass",),
                dims=(2,),
            )
        ]


class ClashingPlugin:
    @flowplug.hookimpl
    def flowplug_dirac_operators(self):
        return [DiracOperatorSpec(name="wilson", description="another wilson", factory=_Staggered)]


def test_builtin_wilson_is_registered(fresh_pm):
    spec = fresh_pm.registry("dirac_operator").get("Wilson")
    assert isinstance(spec, DiracOperatorSpec) and spec.provider == "flowplug"
    assert spec.dims == (2, 4) and "kappa" in spec.parameters and "u1" in spec.fields
    op = spec.factory(kappa=0.2)
    assert isinstance(op, WilsonDiracOperator) and op.kappa == 0.2
    assert spec.summary()["kind"] == "dirac_operator"


def test_third_party_dirac_operator_registers_and_clashes_are_named(fresh_pm):
    fresh_pm.register(DiracPlugin(), name="toy", provider=("toy-fermions", "0.3"))
    spec = fresh_pm.registry("dirac_operator").get("toy-staggered")
    assert spec.provided_by == "toy-fermions 0.3" and spec.factory(mass=0.5).mass == 0.5
    assert fresh_pm.registry("dirac_operator").names() == ["staggered", "staggered-yukawa", "toy-staggered", "wilson"]
    with pytest.raises(flowplug.UnknownComponentError, match="Unknown Dirac operator 'wilsn'.*Did you mean 'wilson'"):
        fresh_pm.registry("dirac_operator").get("wilsn")
    fresh_pm.register(ClashingPlugin(), name="clash", provider=("clash-pkg", "1.0"))
    fresh_pm.strict = True
    with pytest.raises(DuplicateComponentError, match="Dirac operator 'wilson' is provided twice.*clash-pkg 1.0"):
        fresh_pm.registry("dirac_operator")


def test_plugins_command_lists_dirac_operators(fresh_pm, capsys):
    from flowplug.cli import main

    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("Dirac operator") and " wilson " in line for line in out.splitlines())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_operator_runs_on_the_links_device():
    op = WilsonDiracOperator(0.2)
    u = _links("su3", (4, 4), 2, seed=24).cuda()
    b = _spinor(op, u.cpu(), 25).cuda()
    x, report = op.solve(u, b)
    assert x.device == u.device and report.converged.all()
    cpu, _ = op.solve(u.cpu(), b.cpu())
    torch.testing.assert_close(x.cpu(), cpu, rtol=1e-9, atol=1e-9)
    unit = SUNSpace(3).cold((4, 4), 1).cuda()
    assert abs(float(op.logdet(unit).real.cpu()) - free_wilson_logdet((4, 4), 0.2, ncolor=3)) < 1e-10
