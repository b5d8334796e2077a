"""Contract tests of every registered flow layer and prior, and of the elementwise transforms.

Every registered layer, for every field kind it declares, on tiny lattices (2x2 and
2x2x2x2): exact inverse, log-determinant equal to autograd's Jacobian determinant,
(B,) float64 log-determinants. A new layer plugin is tested by registering it.
Gauge layers: equivariance under random gauge transformations; the spectral map:
conjugation equivariance. Seeds are fixed; the only statistical test (Haar moments)
states its sample size and tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch
from _sun_helpers import randomize

from flowplug import groups
from flowplug.errors import ConfigError, ShapeError, UnknownComponentError
from flowplug.flow import Flow, build_flow, default_prior, make_layer, make_prior
from flowplug.manager import new_plugin_manager, set_plugin_manager
from flowplug.plugins.flow_sun import alcove_phases, spectral_map, weyl_log_density
from flowplug.plugins.flow_transforms import circular_rq_spline, ncp_mixture, rq_spline, rq_spline_params
from flowplug.plugins.priors import HaarPrior, NormalPrior, UniformU1Prior

TWO_PI = 2 * math.pi


@pytest.fixture(autouse=True, scope="module")
def fresh_manager():
    old = set_plugin_manager(new_plugin_manager(autoload=False))
    yield
    set_plugin_manager(old)


def _layer_cases():
    pm = new_plugin_manager(autoload=False)
    cases = []
    for rec in pm.registry("flow_layer"):
        for field in rec.fields:
            for lattice in ((2, 2), (2, 2, 2, 2)):
                if rec.dims and len(lattice) not in rec.dims:
                    continue
                for index in (0, 1):
                    cases.append(
                        pytest.param(
                            rec.name,
                            field,
                            lattice,
                            index,
                            id=f"{rec.name}-{field}-{'x'.join(map(str, lattice))}-{index}",
                        )
                    )
    return cases


LAYER_CASES = _layer_cases()


def gen(seed=7):
    return torch.Generator().manual_seed(seed)


def layer(name, field, lattice, index):
    m = make_layer(name, lattice=lattice, field=field, index=index, dtype="float64")
    randomize(m)
    return m


def prior_sample(field, lattice, n, seed=11):
    return make_prior(None, lattice=lattice, field=field).sample(n, generator=gen(seed))


# ----------------------------------------------------------------------- local coordinates


def su_basis(n):
    """Orthonormal basis of su(n) under <A, B> = Re tr(A^+ B)."""
    basis = []
    for i in range(n):
        for j in range(i + 1, n):
            a = torch.zeros(n, n, dtype=torch.complex128)
            a[i, j], a[j, i] = 1, -1
            basis.append(a / math.sqrt(2))
            s = torch.zeros(n, n, dtype=torch.complex128)
            s[i, j], s[j, i] = 1j, 1j
            basis.append(s / math.sqrt(2))
    for k in range(1, n):
        h = torch.zeros(n, dtype=torch.complex128)
        h[:k] = 1
        h[k] = -k
        basis.append(torch.diag(1j * h / math.sqrt(k * (k + 1))))
    return torch.stack(basis)


def jacobian_logdet(fn, x, field):
    """log|det| of fn at x (one configuration, batch axis 1) in flat local coordinates."""
    if field in ("scalar", "u1"):

        def flat(v):
            return fn(v.reshape(x.shape)).reshape(-1)

        jac = torch.autograd.functional.jacobian(flat, x.reshape(-1))
        return torch.linalg.slogdet(jac)[1]
    n = x.shape[-1]
    basis = su_basis(n)
    y0 = fn(x).detach()
    links = x.shape[:-2]

    def coords(omega):
        alg = torch.einsum("...a,aij->...ij", omega.reshape(*links, -1).to(torch.complex128), basis)
        y = fn(torch.linalg.matrix_exp(alg) @ x)
        rel = y @ y0.mH
        return torch.einsum("aij,...ij->...a", basis.conj(), rel).real.reshape(-1)

    omega = torch.zeros(math.prod(links) * basis.shape[0], dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(coords, omega, vectorize=True)
    return torch.linalg.slogdet(jac)[1]


# ------------------------------------------------------------------------------ contracts


@pytest.mark.parametrize("name,field,lattice,index", LAYER_CASES)
def test_layer_inverse_and_logdet_shapes(name, field, lattice, index):
    m = layer(name, field, lattice, index)
    x = prior_sample(field, lattice, 4)
    y, ld = m(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert ld.shape == (4,) and ld.dtype == torch.float64
    assert torch.isfinite(ld).all()
    x2, ldi = m.inverse(y)
    if field == "u1":
        assert groups.wrap_angle(x2 - x).abs().max() < 1e-9
    else:
        torch.testing.assert_close(x2, x, rtol=0, atol=1e-9)
    torch.testing.assert_close(ldi, -ld, rtol=0, atol=1e-8)
    assert not torch.equal(y, x), "randomised layer should not be the identity"


@pytest.mark.parametrize("name,field,lattice,index", LAYER_CASES)
def test_layer_logdet_matches_autograd(name, field, lattice, index):
    if field.startswith("su") and len(lattice) == 4 and index == 1:
        pytest.skip("one 4D SU(N) mask (index 0) keeps the Jacobian test short")
    m = layer(name, field, lattice, index)
    x = prior_sample(field, lattice, 1, seed=5)
    _, ld = m(x)
    auto = jacobian_logdet(lambda v: m(v)[0], x, field)
    torch.testing.assert_close(auto, ld[0], rtol=0, atol=1e-7)


DIAG_CASES = [
    c
    for c in LAYER_CASES
    if callable(getattr(make_layer(c.values[0], lattice=c.values[2], field=c.values[1]), "forward_diag", None))
]


def test_fast_path_gradient_layers_are_listed():
    assert {c.values[0] for c in DIAG_CASES} >= {"affine", "spline", "u1-ncp", "u1-spline"}


@pytest.mark.parametrize("name,field,lattice,index", DIAG_CASES)
def test_forward_diag_contract(name, field, lattice, index):
    """forward_diag agrees with forward, and its Jacobian has the structure the fast path
    gradient relies on: diagonal exp(log_diag), no dependence of an updated coordinate on
    another updated one, identity rows for the coordinates that are not updated."""
    _check_forward_diag(layer(name, field, lattice, index), field, lattice)


@pytest.mark.parametrize(
    "name,field,lattice,index,opts",
    [
        ("affine", "scalar", (4, 4), 1, {}),
        ("spline", "scalar", (4, 4), 0, {"bound": 1.0}),
        ("u1-ncp", "u1", (4, 4), 1, {}),
        ("u1-ncp", "u1", (4, 4), 2, {"rectangles": True}),
        ("u1-ncp", "u1", (4, 4), 3, {"rectangles": True, "period": 2}),
        ("u1-spline", "u1", (4, 4, 2), 5, {}),
        ("u1-ncp", "u1", (4, 4, 2), 4, {"rectangles": True}),
    ],
)
def test_forward_diag_contract_larger_lattices(name, field, lattice, index, opts):
    """As above where stripes have period 4, x + nu != x - nu, with rectangles, and spline tails."""
    m = make_layer(name, lattice=lattice, field=field, index=index, dtype="float64", **opts)
    randomize(m)
    _check_forward_diag(m, field, lattice)


def _check_forward_diag(m, field, lattice):
    x = prior_sample(field, lattice, 1, seed=5)
    y, ld, log_diag, updated = m.forward_diag(x)
    y2, ld2 = m(x)
    assert torch.equal(y, y2) and torch.equal(ld, ld2)
    assert log_diag.shape == x.shape and log_diag.dtype == torch.float64
    assert updated.shape == x.shape[1:] and updated.dtype == torch.bool and updated.any()
    torch.testing.assert_close(log_diag.flatten(1).sum(1), ld, rtol=0, atol=1e-12)
    jac = torch.autograd.functional.jacobian(lambda v: m(v)[0], x).reshape(x.numel(), x.numel())
    upd = updated.flatten()
    torch.testing.assert_close(torch.diagonal(jac)[upd], log_diag.flatten()[upd].exp(), rtol=1e-9, atol=1e-12)
    assert (log_diag.flatten()[~upd] == 0).all()
    off = jac[upd][:, upd] - torch.diag(torch.diagonal(jac)[upd])
    assert off.abs().max() < 1e-12
    torch.testing.assert_close(jac[~upd], torch.eye(x.numel(), dtype=jac.dtype)[~upd], rtol=0, atol=0)
    if getattr(m, "logdet_from_frozen", False):  # the one-product fast path relies on it
        grad_ld = torch.autograd.functional.jacobian(lambda v: m(v)[1], x).reshape(-1)
        assert grad_ld[upd].abs().max() == 0 and grad_ld[~upd].abs().max() > 0


@pytest.mark.parametrize("name,field,lattice,index", [c for c in LAYER_CASES if c.values[1] != "scalar"])
def test_gauge_layer_equivariance(name, field, lattice, index):
    """Gauge-transform the input: the output transforms the same way, the log-det is unchanged."""
    m = layer(name, field, lattice, index)
    x = prior_sample(field, lattice, 3)
    d = len(lattice)
    if field == "u1":
        alpha = TWO_PI * torch.rand((3, *lattice), generator=gen(2), dtype=torch.float64)

        def transform(t):
            return groups.wrap_angle(
                torch.stack([t[:, mu] + alpha - torch.roll(alpha, -1, dims=1 + mu) for mu in range(d)], 1)
            )

        close = lambda a, b: groups.wrap_angle(a - b).abs().max() < 1e-9  # noqa: E731
    else:
        omega = groups.haar_random((3, *lattice), int(field[2:]), generator=gen(2))

        def transform(u):
            return torch.stack([omega @ u[:, mu] @ torch.roll(omega, -1, dims=1 + mu).mH for mu in range(d)], 1)

        close = lambda a, b: (a - b).abs().max() < 1e-9  # noqa: E731
    y, ld = m(x)
    yg, ldg = m(transform(x))
    assert close(yg, transform(y))
    torch.testing.assert_close(ldg, ld, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "name,field,lattice,period",
    [
        ("u1-ncp", "u1", (4, 4), None),
        ("u1-ncp", "u1", (4, 4), 2),
        ("u1-spline", "u1", (2, 2, 2), None),
        ("u1-ncp", "u1", (2, 2, 2, 2), None),
        ("sun-spectral", "su3", (4, 2), None),
        ("sun-spectral", "su3", (4, 4), 2),
        ("sun-spectral", "su2", (2, 2, 2, 2), None),
    ],
)
def test_rectangle_conditioning(name, field, lattice, period):
    """With ``rectangles = true`` the conditioner also sees the 1x2 loops around the updated
    links: they are unchanged by the layer (the updated link is interior), and the layer
    keeps its exact inverse, its log-det (against autograd) and gauge equivariance."""
    m = make_layer(name, lattice=lattice, field=field, index=1, dtype="float64", rectangles=True, period=period)
    randomize(m)
    plain = make_layer(name, lattice=lattice, field=field, index=1, dtype="float64", period=period)
    if period is not None:
        assert m.sites.float().mean() == 1 / period and m.frozen[0].sum() == 0
    factor = m.net.layers[0].kernel_size if len(lattice) == 4 else 1
    assert m.net.layers[0].conv.in_channels == plain.net.layers[0].conv.in_channels + 2 * factor
    x = prior_sample(field, lattice, 2)
    seen = []
    original = m._condition
    m._condition = lambda re, im, rect=None, **kw: (seen.append(rect), original(re, im, rect, **kw))[1]
    y, ld = m(x)
    m(y)
    mask = m.rect_frozen > 0
    assert mask.any()
    for a, b in zip(*seen, strict=True):
        assert (a - b)[:, mask].abs().max() < 1e-12
    m._condition = original
    x2, ldi = m.inverse(y)
    dist = groups.wrap_angle(x2 - x) if field == "u1" else x2 - x
    assert dist.abs().max() < 1e-9
    torch.testing.assert_close(ldi, -ld, rtol=0, atol=1e-8)
    auto = jacobian_logdet(lambda v: m(v)[0], x[:1], field)
    torch.testing.assert_close(auto, ld[0], rtol=0, atol=1e-7)
    d = len(lattice)
    if field == "u1":
        alpha = TWO_PI * torch.rand((2, *lattice), generator=gen(2), dtype=torch.float64)

        def transform(t):
            return groups.wrap_angle(
                torch.stack([t[:, mu] + alpha - torch.roll(alpha, -1, dims=1 + mu) for mu in range(d)], 1)
            )
    else:
        omega = groups.haar_random((2, *lattice), int(field[2:]), generator=gen(2))

        def transform(u):
            return torch.stack([omega @ u[:, mu] @ torch.roll(omega, -1, dims=1 + mu).mH for mu in range(d)], 1)

    yg, ldg = m(transform(x))
    diff = yg - transform(y)
    assert (groups.wrap_angle(diff) if field == "u1" else diff).abs().max() < 1e-9
    torch.testing.assert_close(ldg, ld, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "name,field", [("affine", "scalar"), ("spline", "scalar"), ("u1-ncp", "u1"), ("sun-spectral", "su2")]
)
def test_translation_equivariance(name, field):
    """Shifts that preserve the mask (2 sites for checkerboards, any shift across stripes) commute."""
    lattice = (4, 4)
    m = layer(name, field, lattice, 0)
    x = prior_sample(field, lattice, 2)
    if field == "scalar":
        axis, shift = 1, 2
    else:
        assert m.nu == 1
        axis, shift = 2, 1  # along direction 0: the stripes x_1 = const are unchanged
    y, ld = m(x)
    ys, lds = m(torch.roll(x, shift, dims=axis))
    torch.testing.assert_close(ys, torch.roll(y, shift, dims=axis), rtol=0, atol=1e-10)
    torch.testing.assert_close(lds, ld, rtol=0, atol=1e-10)


def test_mask_period_option():
    from flowplug.plugins.flow_gauge import GaugeMasks

    assert GaugeMasks((8, 8), 0).period == 4 and GaugeMasks((8, 8), 0, period=2).period == 2
    assert GaugeMasks((6, 6), 0).period == 2
    with pytest.raises(ConfigError, match="period must be 2 or 4 and divide the extent 6"):
        GaugeMasks((6, 6), 0, period=4)
    with pytest.raises(ConfigError, match="period must be 2 or 4"):
        GaugeMasks((8, 8), 0, period=3)


def test_fresh_layers_are_identity():
    for name, field in [
        ("affine", "scalar"),
        ("spline", "scalar"),
        ("u1-ncp", "u1"),
        ("u1-spline", "u1"),
        ("sun-spectral", "su3"),
    ]:
        m = make_layer(name, lattice=(4, 4), field=field, index=0, init_scale=0.0)
        x = prior_sample(field, (4, 4), 2)
        y, ld = m(x)
        assert (y - x).abs().max() < 1e-9, name
        assert ld.abs().max() < 1e-9, name


# --------------------------------------------------------------------------- spectral map


@pytest.mark.parametrize("n", [2, 3])
def test_spectral_map_conjugation_equivariance_and_group(n):
    g = gen(4)
    w = groups.haar_random((64,), n, generator=g)
    raw = 0.5 * torch.randn(64, (n - 1) * 25, generator=g, dtype=torch.float64)
    omega = groups.haar_random((64,), n, generator=g)
    w1, ld1 = spectral_map(w, raw, 8)
    w2, ld2 = spectral_map(omega @ w @ omega.mH, raw, 8)
    torch.testing.assert_close(w2, omega @ w1 @ omega.mH, rtol=0, atol=1e-10)
    torch.testing.assert_close(ld2, ld1, rtol=0, atol=1e-10)
    eye = torch.eye(n, dtype=torch.complex128)
    assert (w1 @ w1.mH - eye).abs().max() < 1e-10
    assert (torch.linalg.det(w1) - 1).abs().max() < 1e-10
    w0, ld0 = spectral_map(w1, raw, 8, inverse=True)
    torch.testing.assert_close(w0, w, rtol=0, atol=1e-9)
    torch.testing.assert_close(ld0, -ld1, rtol=0, atol=1e-8)


@pytest.mark.parametrize("n", [2, 3])
def test_spectral_map_logdet_matches_autograd(n):
    g = gen(9)
    for _ in range(3):
        w = groups.haar_random((1,), n, generator=g)
        raw = 0.5 * torch.randn(1, (n - 1) * 25, generator=g, dtype=torch.float64)
        _, ld = spectral_map(w, raw, 8)
        auto = jacobian_logdet(lambda v, raw=raw: spectral_map(v, raw, 8)[0], w, f"su{n}")
        torch.testing.assert_close(auto, ld[0], rtol=0, atol=1e-8)


def test_alcove_representative():
    g = gen(5)
    w = groups.haar_random((500,), 3, generator=g)
    phi = torch.angle(torch.linalg.eigvals(w))
    theta, perm = alcove_phases(phi)
    assert theta.sum(-1).abs().max() < 1e-10
    assert (theta[:, :-1] >= theta[:, 1:]).all()
    assert (theta[:, -1] >= theta[:, 0] - TWO_PI).all()
    back = torch.gather(phi, -1, perm)
    assert groups.wrap_angle(back - theta).abs().max() < 1e-12
    # invariant under permutations of the eigenvalues
    theta2, _ = alcove_phases(phi.flip(-1))
    torch.testing.assert_close(theta2, theta)


# ---------------------------------------------------------------------------------- priors


def test_haar_prior_density_and_moments():
    """Haar: log-density 0; E tr U = 0, E |tr U|^2 = 1; SU(2) eigenphase a has density (2/pi) sin^2 a.

    20000 SU(2) and SU(3) matrices, seed 21; tolerance 5 sigma of each mean.
    """
    n_samp = 20000
    for n in (2, 3):
        p = HaarPrior((2, 2), n=n)
        z = p.sample(n_samp // 8, generator=gen(21))
        assert z.shape == (n_samp // 8, 2, 2, 2, n, n) and z.dtype == torch.complex128
        assert p.log_prob(z).abs().max() == 0
        tr = torch.diagonal(z, dim1=-2, dim2=-1).sum(-1).flatten()
        assert tr.real.mean().abs() < 5 * tr.real.std() / math.sqrt(tr.numel())
        mod2 = tr.abs() ** 2
        assert (mod2.mean() - 1).abs() < 5 * mod2.std() / math.sqrt(mod2.numel())
        # the Weyl factor integrates the class function |tr U|^2 to the same value
    z = HaarPrior((2, 2), n=2).sample(n_samp // 8, generator=gen(22))
    a = torch.angle(torch.linalg.eigvals(z)).abs()[..., 0].flatten()
    c2 = torch.cos(a) ** 2  # exact mean under (2/pi) sin^2 a on [0, pi]: 1/4
    assert (c2.mean() - 0.25).abs() < 5 * c2.std() / math.sqrt(c2.numel())


def test_weyl_factor_normalisation_su2():
    """(1/2pi) int_0^{2pi} J((a, -a)) da / 2 = 1 for SU(2) (Weyl integration formula)."""
    a = torch.linspace(0, TWO_PI, 20001, dtype=torch.float64)[:-1]
    j = torch.exp(weyl_log_density(torch.stack([a, -a], -1)))
    assert abs(j.mean().item() / 2 - 1) < 1e-9


def test_normal_and_uniform_priors():
    p = NormalPrior((4, 2))
    z = p.sample(5, generator=gen())
    ref = torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(p.log_prob(z), ref)
    u = UniformU1Prior((4, 2))
    t = u.sample(5, generator=gen())
    assert t.shape == (5, 2, 4, 2) and (t > -math.pi).all() and (t <= math.pi).all()
    torch.testing.assert_close(u.log_prob(t), torch.full((5,), -16 * math.log(TWO_PI), dtype=torch.float64))
    with pytest.raises(ShapeError):
        u.log_prob(t[:, 0])


# ------------------------------------------------------------------------------ transforms


def test_transforms_invert_and_stay_finite_at_edges():
    g = gen(6)
    edges = torch.tensor([0.0, 1e-300, math.pi, -math.pi, TWO_PI, TWO_PI - 1e-16, 7.0, -1e9, 1e9], dtype=torch.float64)
    for scale in (0.5, 1e3):
        raw = scale * torch.randn(edges.numel(), 24, generator=g, dtype=torch.float64)
        for inverse in (False, True):
            y, ld = circular_rq_spline(edges, raw, 8, rotation=edges, inverse=inverse)
            assert torch.isfinite(y).all() and torch.isfinite(ld).all()
            y, ld = ncp_mixture(edges, raw[:, :2], raw[:, 2:4], edges, inverse=inverse)
            assert torch.isfinite(y).all() and torch.isfinite(ld).all()
            w, h, d = rq_spline_params(raw[:, :25] if raw.shape[1] >= 25 else torch.cat([raw, raw[:, :1]], 1), 8)
            y, ld = rq_spline(edges, w, h, d, inverse=inverse)
            assert torch.isfinite(y).all() and torch.isfinite(ld).all()
    x = TWO_PI * torch.rand(1000, generator=g, dtype=torch.float64)
    raw = torch.randn(1000, 24, generator=g, dtype=torch.float64)
    rot = torch.randn(1000, generator=g, dtype=torch.float64)
    for fn in (
        lambda v, inv: circular_rq_spline(v, raw, 8, rotation=rot, inverse=inv),
        lambda v, inv: ncp_mixture(v, raw[:, :3], raw[:, 3:6], rot, inverse=inv),
    ):
        y, ld = fn(x, False)
        x2, ldi = fn(y, True)
        assert groups.wrap_angle(x2 - x).abs().max() < 1e-10
        torch.testing.assert_close(ldi, -ld, rtol=0, atol=1e-9)


def test_ncp_inverse_has_implicit_gradient():
    x = torch.tensor([0.3, 2.0, 5.5], dtype=torch.float64, requires_grad=True)
    s = torch.tensor([[0.4, -0.7]] * 3, dtype=torch.float64)
    m = torch.tensor([[0.2, 0.1]] * 3, dtype=torch.float64)
    y, ld = ncp_mixture(x, s, m)
    (gx,) = torch.autograd.grad(y.sum(), x)
    yd = y.detach().requires_grad_(True)
    xi, _ = ncp_mixture(yd, s, m, inverse=True)
    (gy,) = torch.autograd.grad(xi.sum(), yd)
    torch.testing.assert_close(gy, 1 / gx)


def test_ncp_mixture_first_layout_broadcasts_and_sums_in_order():
    """ncp_mixture computes mixture-first (flow_transforms._mixture_first, mixture_sum): parameters
    (n, M) that broadcast against x (B, n) give the values and gradients of the same parameters
    expanded to (B, n, M), forward, inverse and through the fused node (_NCPForward); with M = 3
    the map stays an increasing bijection that the inverse undoes; a rotation with more axes
    than x (x (n,), parameters (n, M), rotation (B, n)) gives the batch of maps x's values
    broadcast would give."""
    g = torch.Generator().manual_seed(11)
    x1 = 2 * math.pi * torch.rand(6, generator=g, dtype=torch.float64)
    p1 = torch.randn(6, 3, generator=g, dtype=torch.float64)
    q1 = torch.randn(6, 3, generator=g, dtype=torch.float64)
    r1 = torch.randn(3, 6, generator=g, dtype=torch.float64)  # B = M: a wrong broadcast would not raise
    y1, ld1 = ncp_mixture(x1, p1, q1, r1)
    y2, ld2 = ncp_mixture(x1.expand(3, 6), p1.expand(3, 6, 3), q1.expand(3, 6, 3), r1)
    assert y1.shape == ld1.shape == (3, 6) and torch.equal(y1, y2) and torch.equal(ld1, ld2)
    xb, ldb = ncp_mixture(y1, p1, q1, r1, inverse=True)
    assert float(groups.wrap_angle(xb - x1).abs().max()) < 1e-10 and ldb.shape == (3, 6)
    assert torch.autograd.gradcheck(lambda p: ncp_mixture(x1, p, q1, r1), (p1.clone().requires_grad_(),))
    x = 2 * math.pi * torch.rand(4, 6, generator=g, dtype=torch.float64)
    ls = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    lg = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    rot = torch.randn(4, 6, generator=g, dtype=torch.float64)
    grads, values = [], []
    for full in (False, True):
        a, b = (ls.expand(4, 6, 3), lg.expand(4, 6, 3)) if full else (ls, lg)
        y, ld = ncp_mixture(x, a, b, rot)  # grad enabled: the fused node
        grads.append(torch.autograd.grad((y * 1.3 + ld).sum(), [ls, lg]))
        with torch.no_grad():
            y0, ld0 = ncp_mixture(x, a, b, rot)  # the generic path: the same values
            assert torch.equal(y, y0) and torch.equal(ld, ld0)
            x2, ldi = ncp_mixture(y0, a, b, rot, inverse=True)
        assert float(groups.wrap_angle(x2 - x).abs().max()) < 1e-10
        torch.testing.assert_close(ldi, -ld0, rtol=0, atol=1e-9)
        values.append((y.detach(), ld.detach()))
    assert all(torch.equal(a, b) for a, b in zip(*values, strict=True))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------ flow


def test_flow_density_convention():
    """log q from sample() equals log_prob() through the inverse; log q = log r(z) - logdet."""
    flow = build_flow("u1", (4, 4), ["u1-ncp", "u1-spline"], n_layers=4, options={"dtype": "float64"})
    randomize(flow)
    x, log_q = flow.sample(5, generator=gen(1))
    torch.testing.assert_close(flow.log_prob(x), log_q, rtol=0, atol=1e-8)
    z, log_r = flow.sample_latent(5, generator=gen(1))
    _, logdet = flow(z)
    torch.testing.assert_close(log_r - logdet, log_q)
    rebuilt = Flow.from_spec(flow.spec)
    rebuilt.load_state_dict(flow.state_dict())
    torch.testing.assert_close(rebuilt.log_prob(x), log_q, rtol=0, atol=1e-8)


def test_build_flow_options_and_errors():
    flow = build_flow(
        "scalar", (4, 4), ["affine", "spline"], n_layers=3, options={"hidden": [4], "spline": {"n_bins": 5}}
    )
    assert [e["name"] for e in flow.spec["layers"]] == ["affine", "spline", "affine"]
    assert flow.spec["layers"][1]["options"] == {"hidden": [4], "n_bins": 5}
    assert flow.layers[1].n_bins == 5
    with pytest.raises(UnknownComponentError, match="Available: .*affine"):
        build_flow("scalar", (4, 4), ["afine"])
    with pytest.raises(ConfigError, match="acts on"):
        build_flow("u1", (4, 4), ["affine"])
    with pytest.raises(ConfigError, match="accepted by none"):
        build_flow("scalar", (4, 4), ["affine"], options={"n_mixx": 3})
    with pytest.raises(ConfigError, match=r"'hiden': did you mean 'hidden'\?.*they accept: .*hidden"):
        build_flow("scalar", (4, 4), ["affine"], options={"hiden": [4]})
    with pytest.raises(ConfigError, match="no option"):
        build_flow("scalar", (4, 4), ["affine"], options={"affine": {"n_bins": 3}})
    with pytest.raises(ConfigError, match="not used"):
        build_flow("scalar", (4, 4), ["affine"], options={"spline": {"n_bins": 3}})
    with pytest.raises(ConfigError, match="even"):
        build_flow("scalar", (5, 4), ["affine"])
    assert default_prior("su3") == "haar" and default_prior("u1") == "uniform"


@pytest.mark.parametrize("n,beta,exact", [(2, 2.0, 0.433127426722312), (3, 4.0, 0.279619149409304)])
def test_spectral_density_reweights_to_exact_one_link_value(n, beta, exact):
    """Importance sampling with the spectral map's log q reproduces <Re tr U / N> exactly.

    Target exp((beta/N) Re tr U) on one SU(N) matrix; its mean Re tr U / N equals the 2D
    infinite-volume plaquette (../shared/reference/sun_2d_exact.txt). 50000 Haar samples
    pushed through a fixed random spectral map (seed 3); tolerance 5 delta-method sigma.
    """
    g = gen(3)
    z = groups.haar_random((50000,), n, generator=g)
    raw = (0.3 * torch.randn(1, (n - 1) * 25, generator=g, dtype=torch.float64)).expand(50000, -1)
    u, ld = spectral_map(z, raw, 8)
    p = torch.diagonal(u, dim1=-2, dim2=-1).sum(-1).real / n
    lw = beta * p + ld  # log p - log q with log q = 0 - logdet relative to Haar
    w = torch.exp(lw - lw.max())
    mean = (w * p).sum() / w.sum()
    err = torch.sqrt((w * w * (p - mean) ** 2).sum()) / w.sum()
    assert abs(float(mean) - exact) < 5 * float(err)
    assert float(err) < 0.01


def test_ncp_density_reweights_to_exact_one_plaquette_value():
    """Same for U(1): exp(beta cos x) with beta = 2 has <cos x> = I1(2)/I0(2) = 0.697774657964.

    50000 uniform angles through a fixed NCP mixture (seed 4); tolerance 5 sigma.
    """
    g = gen(4)
    x = TWO_PI * torch.rand(50000, generator=g, dtype=torch.float64)
    s = torch.tensor([[0.8, -0.5]], dtype=torch.float64).expand(50000, -1)
    m = torch.tensor([[0.3, -0.2]], dtype=torch.float64).expand(50000, -1)
    y, ld = ncp_mixture(x, s, m, torch.full((50000,), 0.4, dtype=torch.float64))
    c = torch.cos(y)
    lw = 2.0 * c + ld
    w = torch.exp(lw - lw.max())
    mean = (w * c).sum() / w.sum()
    err = torch.sqrt((w * w * (c - mean) ** 2).sum()) / w.sum()
    assert abs(float(mean) - 0.697774657964) < 5 * float(err)


def _explicit_periodic_conv(conv, x):
    """sum_t W_t x(x + t - h) + b with every tap t of the kernel, by rolling the input."""
    import itertools

    k, d = conv.kernel_size, conv.ndim
    w = conv.conv.weight
    if d == 4:  # (O, k C, k, k, k): offsets along axis 0 outermost in the channel axis
        w = w.view(w.shape[0], k, -1, k, k, k).transpose(1, 2)
    y = torch.zeros(x.shape[0], w.shape[0], *x.shape[2:], dtype=torch.float64)
    for t in itertools.product(range(k), repeat=d):
        shifted = torch.roll(x, shifts=[k // 2 - ti for ti in t], dims=list(range(2, 2 + d)))
        y += torch.einsum("bc...,oc->bo...", shifted, w[(slice(None), slice(None), *t)])
    return y + conv.conv.bias.view(1, -1, *[1] * d)


@pytest.mark.parametrize(
    "lattice", [(6,), (4, 2), (2, 4, 6), (4, 2, 4, 2), (2, 4, 2, 4)], ids=lambda v: "x".join(map(str, v))
)
def test_periodic_conv_equals_explicit_sum_full_and_strided(lattice):
    """Every path of PeriodicConv (gather padding and torch convolution, the 4D Fourier path,
    strided output on a stripe of sites) equals the explicit sum over kernel taps, also when
    the kernel is wider than the lattice (extent 2, kernel 5: taps wrap more than once)."""
    from flowplug.plugins.flow_nets import PeriodicConv

    d = len(lattice)
    torch.manual_seed(0)
    x = torch.randn(2, 3, *lattice, dtype=torch.float64)
    for k in (1, 3, 5):
        conv = PeriodicConv(3, 2, k, d, torch.float64)
        with torch.no_grad():
            conv.conv.bias.normal_()
        full = conv(x)
        torch.testing.assert_close(full, _explicit_periodic_conv(conv, x), rtol=0, atol=1e-12)
        for axis in range(d):
            for step in (2, 4):
                if lattice[axis] % step:
                    continue
                for offset in range(step):
                    sl = [slice(None)] * (d + 2)
                    sl[2 + axis] = slice(offset, None, step)
                    y = conv(x, (axis, offset, step))
                    torch.testing.assert_close(y, full[tuple(sl)], rtol=0, atol=1e-12)
    with pytest.raises(ShapeError, match="out_sites"):
        conv(x, (0, 0, 4 if lattice[0] % 4 else 8))


@pytest.mark.parametrize("lattice", [(6,), (4, 2), (8, 6), (2, 4, 6)], ids=lambda v: "x".join(map(str, v)))
def test_convnet_forward_at_equals_explicit_sum_and_its_gradients(lattice):
    """ConvNet.forward_at (gather + matrix product per convolution, site-major) gives the
    explicit sum over kernel taps of every convolution, at every site and at a subset of sites,
    with the gradients of ConvNet.forward (input, weights, biases), also for kernels wider than
    the lattice; a 4D input is refused with a ShapeError."""
    from flowplug.plugins.flow_nets import ConvNet

    d = len(lattice)
    n_sites = math.prod(lattice)
    torch.manual_seed(0)
    for k in (1, 3, 5):
        net = ConvNet(3, 2, [4, 5], k, d, torch.float64, final_scale=1.0)
        x = torch.randn(3, 3, *lattice, dtype=torch.float64, requires_grad=True)
        h = x
        for layer in net.layers:  # the explicit sum, layer by layer
            h = _explicit_periodic_conv(layer, h) if hasattr(layer, "conv") else layer(h)
        explicit = h.flatten(2).transpose(1, 2)  # (B, S, C_out)
        for sites in (None, torch.tensor([n_sites - 1, 0, n_sites // 2])):
            out = net.forward_at(x, sites)
            want = explicit if sites is None else explicit[:, sites]
            torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
            g = torch.randn_like(out)
            full = net(x).flatten(2).transpose(1, 2)
            ref = full if sites is None else full[:, sites]
            params = [x, *net.parameters()]
            for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g), strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    with pytest.raises(ShapeError, match="forward_at"):
        ConvNet(1, 2, [4], 3, 4, torch.float64).forward_at(torch.zeros(1, 1, 2, 2, 2, 2, dtype=torch.float64))


@pytest.mark.parametrize("name", ["affine", "spline", "u1-ncp", "u1-spline"])
@pytest.mark.parametrize("lattice", [(4, 4), (4, 2, 4)], ids=lambda v: "x".join(map(str, v)))
def test_gathered_conditioner_layers_invert_and_match_autograd_logdet(name, lattice):
    """The layers whose conditioner runs through ConvNet.forward_at (d <= 3) on lattices larger
    than the kernel, in 2D and 3D (the contract cases are 2x2 and 2x2x2x2 only): the inverse
    undoes the forward map and the log-det equals log|det| of the autograd Jacobian, float64."""
    field = "scalar" if name in ("affine", "spline") else "u1"
    for index in (0, 1):
        m = layer(name, field, lattice, index)
        x = prior_sample(field, lattice, 2, seed=13)
        y, ld = m(x)
        x2, ldi = m.inverse(y)
        diff = groups.wrap_angle(x2 - x) if field == "u1" else x2 - x
        assert float(diff.detach().abs().max()) < 1e-10
        torch.testing.assert_close(ldi, -ld, rtol=0, atol=1e-10)
        assert not torch.equal(y, x)
        auto = jacobian_logdet(lambda v, m=m: m(v)[0], x[:1], field)
        torch.testing.assert_close(auto, ld[0], rtol=0, atol=1e-8)


def _batch_cases():
    pm = new_plugin_manager(autoload=False)
    cases = []
    for rec in pm.registry("flow_layer"):
        for field in rec.fields:
            for lattice in ((4, 4), (4, 2, 6), (2, 4, 2, 6)):
                if rec.dims and len(lattice) not in rec.dims:
                    continue
                tag = f"{rec.name}-{field}-{'x'.join(map(str, lattice))}"
                cases.append(pytest.param(rec.name, field, lattice, id=tag))
    return cases


@pytest.mark.parametrize("threads,batch", [(1, 16), (2, 16), (4, 64), (16, 64)])
@pytest.mark.parametrize("name,field,lattice", _batch_cases())
def test_layer_inverts_each_configuration_of_a_batch_alone(name, field, lattice, threads, batch):
    """With its default (float32) conditioner, a layer's inverse of one configuration of a
    batch gives back that configuration to float64 rounding: the conditioner's output for a
    configuration must not depend on its batch (DESIGN section 4). Small lattices put few sites
    in each product, where BLAS and the elementwise kernels round by position; three threads
    and a batch of 64 make torch split elementwise kernels between threads at positions that
    depend on the batch size: there every configuration's forward map alone must equal its
    row of the batch's to float64 rounding (the one straddling two threads' shares differed)."""
    m = make_layer(name, lattice=lattice, field=field, index=1)
    randomize(m)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            x = prior_sample(field, lattice, batch, seed=5)
            y, ld = m(x)
            if threads > 2:
                for i in range(batch):
                    y_i, ld_i = m(x[i : i + 1])
                    dy = groups.wrap_angle(y_i - y[i : i + 1]) if field == "u1" else y_i - y[i : i + 1]
                    assert float(dy.abs().max()) < 1e-12 and abs(float(ld_i[0] - ld[i])) < 1e-10, (i, dy.abs().max())
            for i in (0, 7, batch - 1):
                x_i, ld_i = m.inverse(y[i : i + 1])
                dx = groups.wrap_angle(x_i - x[i : i + 1]) if field == "u1" else x_i - x[i : i + 1]
                assert float(dx.abs().max()) < 1e-12, (i, float(dx.abs().max()))
                assert abs(float(ld[i] + ld_i[0])) < 1e-10, (i, float(ld[i] + ld_i[0]))
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize(
    "name,field,lattice",
    [
        ("affine", "scalar", (4, 4)),
        ("u1-ncp", "u1", (4, 4)),
        ("u1-multiscale", "u1", (4, 4)),
        ("sun-stout", "su3", (2, 4, 2, 6)),
    ],
)
def test_widened_layer_keeps_its_map_and_inverts_each_configuration(name, field, lattice):
    """flowplug.flow.widen_float32 (what place_flow does on CUDA): the float32 networks become
    float64 with the same weights, so the map moves by float32 rounding only, and each
    configuration of a batch still inverts alone to float64 rounding."""
    import copy

    from flowplug.flow import widen_float32

    m = make_layer(name, lattice=lattice, field=field, index=1)
    randomize(m)
    assert any(p.dtype == torch.float32 for p in m.parameters())
    wide = widen_float32(copy.deepcopy(m))
    assert all(p.dtype == torch.float64 for p in wide.parameters())
    with torch.no_grad():
        x = prior_sample(field, lattice, 8, seed=6)
        (y32, ld32), (y64, ld64) = m(x), wide(x)
        assert 0 < float((y64 - y32).abs().max()) < 1e-4 and float((ld64 - ld32).abs().max()) < 1e-3
        for i in (0, 7):
            x_i, ld_i = wide.inverse(y64[i : i + 1])
            dx = groups.wrap_angle(x_i - x[i : i + 1]) if field == "u1" else x_i - x[i : i + 1]
            assert float(dx.abs().max()) < 1e-12 and abs(float(ld64[i] + ld_i[0])) < 1e-10
