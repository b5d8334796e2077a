"""Tests of the action plugins (phi4, wilson) and of flowplug.theory's field spaces.

Deterministic checks: analytic forces against autograd and finite differences, known
values, gauge invariance, group utilities. Seeds are fixed; no statistics here.
"""

from __future__ import annotations

import math

import pytest
import torch

from flowplug import groups
from flowplug.errors import ConfigError, ShapeError
from flowplug.manager import new_plugin_manager
from flowplug.plugins.theories import Phi4Action, WilsonGaugeAction
from flowplug.theory import Action, action_from_config, field_space


def gen(seed=1234):
    return torch.Generator().manual_seed(seed)


CASES = [
    ("phi4", dict(m2=-4.0, lam=8.0), (4, 3)),
    ("phi4", dict(m2=0.5, lam=1.3), (3, 2, 4)),
    ("wilson", dict(beta=2.3, group="u1"), (4, 3)),
    ("wilson", dict(beta=1.1, group="u1"), (2, 3, 2, 3)),
    ("wilson", dict(beta=2.0, group="su2"), (3, 4)),
    ("wilson", dict(beta=5.5, group="su3"), (2, 3, 2, 2)),
    ("wilson", dict(beta=3.0, group="su3"), (3, 2)),
]


@pytest.fixture(scope="module")
def actions():
    return new_plugin_manager(autoload=False).registry("action")


def make(actions, name, params):
    return actions.get(name).factory(**params)


@pytest.mark.parametrize("name,params,lattice", CASES)
def test_force_matches_autograd(actions, name, params, lattice):
    act = make(actions, name, params)
    x = act.hot_start(lattice, 3, generator=gen())
    if act.field == "scalar":
        x = 0.7 * x
    f = act.force(x)
    f_auto = Action.force(act, x)
    assert f.shape == x.shape and f.dtype == x.dtype
    torch.testing.assert_close(f, f_auto, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name,params,lattice", CASES)
def test_force_is_directional_derivative(actions, name, params, lattice):
    """Central finite difference of S along a random direction against -<direction, F>."""
    act = make(actions, name, params)
    g = gen(7)
    x = act.hot_start(lattice, 2, generator=g)
    space = act.space
    p = space.momenta(x, g)
    h = 1e-5
    num = (act.action(space.update(x, p, h)) - act.action(space.update(x, p, -h))) / (2 * h)
    f = act.force(x)
    if x.is_complex():
        ana = 2.0 * torch.einsum("b...ij,b...ji->b", p, f).real
    else:
        ana = -(p * f).flatten(1).sum(1)
    torch.testing.assert_close(num, ana, rtol=1e-6, atol=1e-6)


def test_phi4_known_values():
    act = Phi4Action(m2=-4.0, lam=8.0)
    phi = torch.full((1, 8, 8), 0.5, dtype=torch.float64)
    # per site: -2*2*0.25 + 0*0.25 + 8*0.0625 = -1 + 0.5
    assert act.action(phi).item() == pytest.approx(64 * (-0.5), abs=1e-12)
    act = Phi4Action(m2=1.0, lam=0.0)
    phi = torch.zeros(2, 4, 4, 4, dtype=torch.float64)
    phi[0, 1, 2, 3] = 1.0
    # single site: (2d + m2) phi^2 = 7
    assert act.action(phi).tolist() == pytest.approx([7.0, 0.0])


def test_phi4_free_field_is_laplacian():
    """With lam = 0 the action is phi (-Laplacian + m2) phi."""
    g = gen(3)
    phi = torch.randn(2, 5, 4, dtype=torch.float64, generator=g)
    lap = sum(torch.roll(phi, 1, d) + torch.roll(phi, -1, d) - 2 * phi for d in (1, 2))
    expect = (phi * (-lap + 0.3 * phi)).flatten(1).sum(1)
    torch.testing.assert_close(Phi4Action(m2=0.3, lam=0.0).action(phi), expect)


@pytest.mark.parametrize("group,n", [("u1", 1), ("su2", 2), ("su3", 3)])
def test_wilson_cold_start_and_plaquette_relation(group, n):
    from flowplug.gauge import plaquette

    act = WilsonGaugeAction(beta=1.7, group=group)
    lattice = (3, 4, 2)
    cold = act.cold_start(lattice, 2)
    nplaq = 3 * 24
    assert act.action(cold).tolist() == pytest.approx([-1.7 * nplaq] * 2)
    hot = act.hot_start(lattice, 2, generator=gen(5))
    torch.testing.assert_close(act.action(hot), -1.7 * nplaq * plaquette(hot))


@pytest.mark.parametrize("group", ["u1", "su2", "su3"])
def test_wilson_gauge_invariance(group):
    act = WilsonGaugeAction(beta=2.0, group=group)
    lattice = (4, 3, 2)
    g = gen(11)
    x = act.hot_start(lattice, 2, generator=g)
    d = len(lattice)
    if group == "u1":
        alpha = 2 * math.pi * torch.rand(2, *lattice, dtype=torch.float64, generator=g)
        y = torch.stack([alpha + x[:, mu] - torch.roll(alpha, -1, 1 + mu) for mu in range(d)], 1)
        y = groups.wrap_angle(y)
    else:
        omega = groups.haar_random((2, *lattice), act.n, generator=g)
        y = torch.stack([omega @ x[:, mu] @ torch.roll(omega, -1, 1 + mu).mH for mu in range(d)], 1)
    torch.testing.assert_close(act.action(y), act.action(x), rtol=1e-12, atol=1e-10)


def test_wrong_layout_raises():
    with pytest.raises(ShapeError, match="SU3 links"):
        WilsonGaugeAction(1.0, "su3").action(torch.zeros(1, 2, 4, 4, dtype=torch.float64))
    with pytest.raises(ShapeError, match="SU2 links"):
        WilsonGaugeAction(1.0, "su2").action(torch.eye(3, dtype=torch.complex128).expand(1, 2, 4, 4, 3, 3))
    with pytest.raises(ShapeError, match="U\\(1\\) links"):
        WilsonGaugeAction(1.0, "u1").action(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ShapeError):
        Phi4Action().action(torch.zeros(4, dtype=torch.complex128))
    with pytest.raises(ConfigError, match="unknown group"):
        WilsonGaugeAction(1.0, "so3")
    with pytest.raises(ConfigError, match="lam"):
        Phi4Action(lam=-1.0)


def test_action_from_config():
    a = action_from_config({"action": {"name": "wilson", "group": "su2", "beta": 2.5, "m2": -4.0, "lam": 8.0}})
    assert isinstance(a, WilsonGaugeAction) and a.beta == 2.5 and a.field == "su2"
    b = action_from_config({"name": "phi4", "group": "su3", "beta": 1.0, "m2": -3.0, "lam": 5.0})
    assert isinstance(b, Phi4Action) and (b.m2, b.lam) == (-3.0, 5.0)
    with pytest.raises(ConfigError, match="action.name"):
        action_from_config({"lattice": [4]})
    from flowplug.errors import UnknownComponentError

    with pytest.raises(UnknownComponentError, match="wilson"):
        action_from_config({"action": {"name": "wilsn"}})
    # a key that the selected action ignores is refused, unless the command's defaults list it
    from flowplug.theory import check_action_keys

    defaults = ("name", "group", "beta", "m2", "lam")
    check_action_keys({"action": {"name": "wilson", "group": "su3", "beta": 6.0, "m2": -4.0}}, defaults)
    with pytest.raises(ConfigError, match="action 'iwasaki' does not take 'c1'; it takes: beta, group"):
        check_action_keys({"action": {"name": "iwasaki", "group": "su3", "c1": -0.2}}, defaults)
    with pytest.raises(ConfigError, match="action 'wilson' does not take 'kappa'"):
        check_action_keys({"name": "wilson", "kappa": 0.2}, defaults)
    check_action_keys({"action": {"name": "schwinger", "kappa": 0.2, "beta": 2.0}}, defaults)
    # the [action] table is open for plugins' couplings, but a key no action takes is a typo
    with pytest.raises(ConfigError, match=r"'bta' \(did you mean 'beta'\?\) taken by no registered action"):
        action_from_config({"action": {"name": "wilson", "group": "su3", "bta": 6.0}})


def test_field_space_lookup():
    assert field_space("SU3").n == 3
    assert field_space("u1").kind == "u1"
    with pytest.raises(ConfigError, match="unknown field kind"):
        field_space("so3")


# ------------------------------------------------------------------------ groups


@pytest.mark.parametrize("n", [2, 3, 4])
def test_generators_orthonormal(n):
    t = groups.su_generators(n)
    assert t.shape == (n * n - 1, n, n)
    gram = torch.einsum("aij,bji->ab", t, t)
    torch.testing.assert_close(gram, -0.5 * torch.eye(n * n - 1, dtype=t.dtype))
    torch.testing.assert_close(t + t.mH, torch.zeros_like(t))


@pytest.mark.parametrize("n", [2, 3])
def test_random_algebra_and_expmap(n):
    g = gen(2)
    p = groups.random_algebra((4000,), n, generator=g)
    torch.testing.assert_close(groups.project_algebra(p), p)
    comps = groups.algebra_components(p)
    # components are standard normal: mean 0, variance 1 (4000*(N^2-1) samples, 5 sigma)
    m = comps.numel()
    assert abs(comps.mean().item()) < 5 / math.sqrt(m)
    assert abs(comps.var().item() - 1.0) < 5 * math.sqrt(2.0 / m)
    # kinetic energy convention: -tr P^2 = (1/2) sum p_a^2
    torch.testing.assert_close(field_space(f"su{n}").kinetic(p[None]), 0.5 * (comps**2).sum()[None])
    u = groups.expmap(p)
    eye = torch.eye(n, dtype=u.dtype)
    assert (u @ u.mH - eye).abs().max() < 1e-13
    assert (torch.linalg.det(u) - 1).abs().max() < 1e-13


def test_haar_and_reunitarize():
    g = gen(9)
    u = groups.haar_random((20000,), 2, generator=g)
    # Haar on SU(2): E[tr U] = 0, E[|tr U|^2] = 1
    tr = torch.diagonal(u, dim1=-2, dim2=-1).sum(-1)
    assert abs(tr.mean()) < 5 / math.sqrt(20000)
    assert abs((tr.abs() ** 2).mean() - 1) < 5 * math.sqrt(1 / 20000)
    noisy = u[:10] + 1e-6 * torch.randn(10, 2, 2, dtype=torch.complex128, generator=g)
    r = groups.reunitarize(noisy)
    assert (r @ r.mH - torch.eye(2, dtype=r.dtype)).abs().max() < 1e-14
    assert (r - u[:10]).abs().max() < 1e-5


def test_wrap_angle():
    x = torch.tensor([math.pi, -math.pi, 3 * math.pi, 0.5, -7.0], dtype=torch.float64)
    w = groups.wrap_angle(x)
    assert (w > -math.pi).all() and (w <= math.pi).all()
    torch.testing.assert_close(torch.cos(w), torch.cos(x))


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("scale", [0.0, 1e-9, 1e-3, 0.3, 1.0, 4.0, 20.0])
def test_expmap_matches_matrix_exp(n, scale):
    p = scale * groups.random_algebra((500,), n, generator=gen(n))
    u = groups.expmap(p)
    ref = torch.linalg.matrix_exp(p)
    assert (u - ref).abs().max() < 1e-14 * max(1.0, scale)
    assert (u @ u.mH - torch.eye(n, dtype=u.dtype)).abs().max() < 1e-13 * max(1.0, scale)


@pytest.mark.parametrize("n", [2, 3])
def test_expmap_differentiable(n):
    p = (0.5 * groups.random_algebra((3,), n, generator=gen(1))).requires_grad_(True)
    w = torch.randn(3, n, n, dtype=torch.complex128, generator=gen(2))
    (g,) = torch.autograd.grad((groups.expmap(p) * w).real.sum(), p)
    p2 = p.detach().requires_grad_(True)
    (g2,) = torch.autograd.grad((torch.linalg.matrix_exp(p2) * w).real.sum(), p2)
    # equal derivatives along su(N) (the closed forms assume X in su(N))
    torch.testing.assert_close(groups.project_algebra(g), groups.project_algebra(g2), rtol=1e-10, atol=1e-12)
