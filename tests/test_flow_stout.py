"""The stout-step SU(N) map and the ``sun-stout`` layer (issue 14 item 1, issue 11 item 2).

Checks, each independent of the code under test where possible:
(a) the output equals the eigendecomposition-free matrix form exp(i X(W)) W of the
    module docstring (matrix powers and :func:`flowplug.groups.expmap`);
(b) forward then inverse returns the input to 1e-12 and the log-dets cancel, at random
    and degenerate points (unit, centre elements, two equal eigenphases);
(c) the log-det equals autograd's Jacobian determinant in exponential coordinates;
(d) the log-det is continuous at every degenerate point, the SU(3) centre elements
    included, under 1e-8 perturbations in random directions, and at a centre element
    equals the analytic (N^2 - 1) sum_m log(1 + phi_m''(theta_0));
(e) gradients are finite everywhere and agree with central differences;
(f) the density is normalised and reweights one matrix to the exact 2D plaquette;
(g) ``sun-stout`` layers: round trip and forces at the unit gauge, the centre-twisted
    gauge and the tmLQCD unity file; log q continuous there; flow-HMC steps from them.
All random numbers come from fixed seeds; statistical tests state sizes and tolerances.
"""

from __future__ import annotations

import math

import pytest
import torch
from _sun_helpers import centre, centre_twisted, conj, eigdiag, gen, perturb, randomize, tmlqcd_unity, unit_gauge

from flowplug import gauge, groups
from flowplug.errors import ConfigError, ShapeError
from flowplug.flow import build_flow, make_layer
from flowplug.manager import new_plugin_manager, set_plugin_manager
from flowplug.plugins.flow_stout import (
    n_stout_params,
    plaquette_traces,
    potential_gradient,
    stout_coefficients,
    stout_map,
)
from flowplug.plugins.kernels import FlowHMC
from flowplug.plugins.theories import WilsonGaugeAction
from flowplug.theory import field_space

K, M = 2, 2  # modes, steps
TWO_PI = 2 * math.pi


@pytest.fixture(autouse=True, scope="module")
def fresh_manager():
    old = set_plugin_manager(new_plugin_manager(autoload=False))
    yield
    set_plugin_manager(old)


def raw_params(batch=1, seed=3, scale=1.0, modes=K, steps=M):
    return scale * torch.randn(batch, n_stout_params(modes, steps), generator=gen(seed), dtype=torch.float64)


POINTS = {
    "su2-identity": torch.eye(2, dtype=torch.complex128),
    "su2-minus-one": centre(2, 1),
    "su2-random": groups.haar_random((), 2, generator=gen(10)),
    "su3-centre0": centre(3, 0),
    "su3-centre1": centre(3, 1),
    "su3-centre2": conj(centre(3, 2)),
    "su3-diag(-1,-1,1)": conj(eigdiag(math.pi, math.pi, 0.0)),
    "su3-diag(a,a,-2a)": eigdiag(0.7, 0.7, -1.4),
    "su3-diag(b,b,-2b)": conj(eigdiag(2.5, 2.5, -5.0), seed=6),
    "su3-random": groups.haar_random((), 3, generator=gen(11)),
}


def n_of(w):
    return w.shape[-1]


# ------------------------------------------------------------------ (a) matrix form


@pytest.mark.parametrize("n", [2, 3])
def test_output_equals_eigendecomposition_free_matrix_form(n):
    w = groups.haar_random((64,), n, generator=gen(1))
    raw = raw_params(64, seed=2, scale=2.0)
    a, b = stout_coefficients(raw, K, M, 0.9)
    ref = w
    for m in range(M):
        ref = groups.expmap(1j * potential_gradient(ref, a[:, m], b[:, m])) @ ref
    out, _ = stout_map(w, raw, K, M)
    assert (out - ref).abs().max() < 1e-13
    # X(W) is Hermitian, traceless and commutes with W
    x = potential_gradient(w, a[:, 0], b[:, 0])
    assert (x - x.mH).abs().max() < 1e-14
    assert torch.diagonal(x, dim1=-2, dim2=-1).sum(-1).abs().max() < 1e-14
    assert (x @ w - w @ x).abs().max() < 1e-14


def test_curvature_bound_and_identity_at_zero():
    raw = raw_params(256, seed=4, scale=50.0, modes=3, steps=2)
    a, b = stout_coefficients(raw, 3, 2, 0.9)
    k = torch.arange(1, 4, dtype=torch.float64)
    bound = (k * k * torch.sqrt(a * a + b * b)).sum(-1)
    assert bound.max() <= 0.9 * (1 + 1e-12) and bound.max() > 0.89  # saturates at gamma
    w = groups.haar_random((4,), 3, generator=gen(1))
    out, ld = stout_map(w, torch.zeros(4, n_stout_params(K, M), dtype=torch.float64), K, M)
    assert torch.equal(out, w) and torch.equal(ld, torch.zeros_like(ld))


def test_bad_arguments():
    w = groups.haar_random((2,), 3, generator=gen(1))
    with pytest.raises(ValueError, match="needs 8 parameters per matrix; found 7"):
        stout_map(w, torch.zeros(2, 7, dtype=torch.float64), K, M)
    with pytest.raises(ValueError, match=r"max_curvature must be in \(0, 1\)"):
        stout_map(w, torch.zeros(2, 8, dtype=torch.float64), K, M, max_curvature=1.0)
    with pytest.raises(ConfigError, match="max_curvature"):
        make_layer("sun-stout", lattice=(4, 4), field="su3", max_curvature=1.5)
    with pytest.raises(ConfigError, match="n_modes >= 1"):
        make_layer("sun-stout", lattice=(4, 4), field="su3", n_modes=0)
    with pytest.raises(ConfigError, match="acts on su2, su3 fields"):
        make_layer("sun-stout", lattice=(4, 4), field="u1")


# ------------------------------------------------------------------ (b) round trip


@pytest.mark.parametrize("name", sorted(POINTS))
def test_round_trip_and_group(name):
    w = POINTS[name][None]
    n = n_of(w)
    eye = torch.eye(n, dtype=torch.complex128)
    for seed, scale in ((3, 1.0), (21, 30.0)):  # the second near the curvature bound
        raw = raw_params(seed=seed, scale=scale)
        w1, ld = stout_map(w, raw, K, M)
        assert torch.isfinite(ld).all()
        assert (w1 @ w1.mH - eye).abs().max() < 1e-13
        assert (torch.linalg.det(w1) - 1).abs().max() < 1e-13
        w0, ldi = stout_map(w1, raw, K, M, inverse=True)
        assert (w0 - w).abs().max() < 1e-12, name
        assert abs(float(ld + ldi)) < 1e-11, (name, float(ld), float(ldi))
        if "centre" in name or "identity" in name or "minus-one" in name:
            assert (w1 - w).abs().max() < 1e-15  # centre elements are fixed points


def test_round_trip_batch_and_conjugation_equivariance():
    w = groups.haar_random((500,), 3, generator=gen(4))
    raw = raw_params(500, seed=5, scale=3.0)
    w1, ld = stout_map(w, raw, K, M)
    w0, ldi = stout_map(w1, raw, K, M, inverse=True)
    assert (w0 - w).abs().max() < 1e-12
    assert (ld + ldi).abs().max() < 1e-11
    om = groups.haar_random((500,), 3, generator=gen(6))
    w2, ld2 = stout_map(om @ w @ om.mH, raw, K, M)
    assert (w2 - om @ w1 @ om.mH).abs().max() < 1e-12
    assert (ld2 - ld).abs().max() < 1e-12


# ------------------------------------------------------------------ (c) log-det


def jacobian_logdet(fn, w):
    """log|det| of fn at one SU(N) matrix w (1, N, N) in the coordinates exp(omega) w."""
    n = w.shape[-1]
    basis = torch.stack([t * math.sqrt(2.0) for t in groups.su_generators(n)])  # orthonormal
    y0 = fn(w).detach()

    def coords(omega):
        y = fn(torch.linalg.matrix_exp(torch.einsum("a,aij->ij", omega.to(torch.complex128), basis)) @ w)
        return torch.einsum("aij,...ij->...a", basis.conj(), y @ y0.mH).real.reshape(-1)

    jac = torch.autograd.functional.jacobian(coords, torch.zeros(n * n - 1, dtype=torch.float64))
    return torch.linalg.slogdet(jac)[1]


@pytest.mark.parametrize("name", sorted(POINTS))
def test_logdet_matches_autograd_jacobian(name):
    w = perturb(POINTS[name][None], 1e-3, 1)  # near (not at) the degenerate points
    raw = raw_params(seed=7, scale=2.0)
    for inverse in (False, True):
        _, ld = stout_map(w, raw, K, M, inverse=inverse)
        auto = jacobian_logdet(lambda v, inv=inverse: stout_map(v, raw, K, M, inverse=inv)[0], w)
        assert abs(float(auto - ld[0])) < 1e-8, (name, inverse, float(auto), float(ld[0]))


# ------------------------------------------------------------------ (d) continuity


@pytest.mark.parametrize("name", sorted(POINTS))
def test_logdet_continuous_at_degenerate_points(name):
    """1e-8 perturbations in 6 random directions move log q by < 1e-6 nats (a finite slope),
    centre elements of SU(3) included: the density of this map family has a limit there."""
    w = POINTS[name][None]
    raw = raw_params(seed=8, scale=2.0)
    for inverse in (False, True):
        _, ld = stout_map(w, raw, K, M, inverse=inverse)
        for seed in range(6):
            _, ldp = stout_map(perturb(w, 1e-8, seed), raw, K, M, inverse=inverse)
            assert abs(float(ldp - ld)) < 1e-6, (name, inverse, seed, float(ld), float(ldp))


@pytest.mark.parametrize("n,k", [(2, 0), (2, 1), (3, 0), (3, 1), (3, 2)])
def test_logdet_at_centre_is_analytic(n, k):
    """At z 1 every eigenphase is theta_0 = 2 pi k / N and stays there; each step contributes
    (N^2 - 1) log(1 + phi''(theta_0)), phi'' = -sum_j j^2 (a_j cos j theta_0 + b_j sin j theta_0)."""
    raw = raw_params(seed=9, scale=2.0)
    a, b = stout_coefficients(raw, K, M, 0.9)
    theta0 = TWO_PI * k / n
    j = torch.arange(1, K + 1, dtype=torch.float64)
    phi2 = -(j * j * (a * torch.cos(j * theta0) + b * torch.sin(j * theta0))).sum(-1)  # (1, M)
    expected = (n * n - 1) * torch.log1p(phi2).sum(-1)
    _, ld = stout_map(centre(n, k)[None], raw, K, M)
    assert abs(float(ld - expected)) < 1e-12


# ------------------------------------------------------------------ (e) gradients


@pytest.mark.parametrize("name", sorted(POINTS))
def test_gradients_finite_and_equal_to_central_differences(name):
    w = POINTS[name][None]
    n = n_of(w)
    raw = raw_params(seed=3, scale=2.0)
    m = torch.randn(1, n, n, generator=gen(2), dtype=torch.complex128)
    for inverse in (False, True):
        wg, rg = w.clone().requires_grad_(True), raw.clone().requires_grad_(True)
        w1, ld = stout_map(wg, rg, K, M, inverse=inverse)
        gw, gr = torch.autograd.grad(ld.sum() + (w1 * m).real.sum(), (wg, rg))
        assert torch.isfinite(gw).all() and torch.isfinite(gr).all(), (name, inverse)
    # 1e-2 away: input and parameter gradients agree with central differences
    wp = perturb(w, 1e-2, 1)
    x = groups.random_algebra((1,), n, generator=gen(3))
    dr = torch.randn(raw.shape, generator=gen(4), dtype=torch.float64)
    h = 1e-6
    for inverse in (False, True):

        def fn(u, r=raw, inv=inverse):
            w1, ld = stout_map(u, r, K, M, inverse=inv)
            return ld + (w1 * m).real.sum((-1, -2))

        fd = (fn(groups.expmap(h * x) @ wp) - fn(groups.expmap(-h * x) @ wp)) / (2 * h)
        f = field_space(f"su{n}").autograd_force(fn, wp)  # F = -sum_a (dS/ds_a) t_a
        minus_ds = 2 * (f.conj() * x).real.sum((-1, -2))
        assert abs(float(fd + minus_ds)) < 1e-6 * max(1.0, abs(float(fd))), (name, inverse, float(fd))
        rg = raw.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(wp, rg).sum(), rg)
        fd_r = (fn(wp, raw + h * dr) - fn(wp, raw - h * dr)) / (2 * h)
        assert abs(float(fd_r - (g * dr).sum())) < 1e-6 * max(1.0, abs(float(fd_r))), (name, inverse)


# ------------------------------------------------------------------ (f) normalisation


def test_density_normalised():
    """E_{W ~ Haar}[q(W)] = 1 for q(W) = exp(logdet of the inverse at W): 40000 samples,
    5 standard errors."""
    w = groups.haar_random((40000,), 3, generator=gen(12))
    raw = raw_params(seed=13, scale=1.5).expand(40000, -1)
    _, ldi = stout_map(w, raw, K, M, inverse=True)
    q = torch.exp(ldi)
    err = float(q.std() / math.sqrt(len(q)))
    assert abs(float(q.mean()) - 1.0) < 5 * err and err < 0.02


@pytest.mark.parametrize("n,beta,exact", [(2, 2.0, 0.433127426722312), (3, 4.0, 0.279619149409304)])
def test_density_reweights_to_exact_one_link_value(n, beta, exact):
    """Importance sampling of exp((beta/N) Re tr U) with the map's log q gives the exact
    2D infinite-volume plaquette (../shared/reference/sun_2d_exact.txt); 50000 samples,
    tolerance 5 delta-method sigma."""
    z = groups.haar_random((50000,), n, generator=gen(3))
    raw = raw_params(seed=14, scale=1.0).expand(50000, -1)
    u, ld = stout_map(z, raw, K, M)
    p = torch.diagonal(u, dim1=-2, dim2=-1).sum(-1).real / n
    lw = beta * p + ld
    w = torch.exp(lw - lw.max())
    mean = (w * p).sum() / w.sum()
    err = torch.sqrt((w * w * (p - mean) ** 2).sum()) / w.sum()
    assert abs(float(mean) - exact) < 5 * float(err)
    assert float(err) < 0.01


# ------------------------------------------------------------------ (g) layers


def stout_layer(n, lattice, index=0, seed=3):
    m = make_layer("sun-stout", lattice=lattice, field=f"su{n}", index=index, dtype="float64", hidden=[4])
    randomize(m, seed=seed)
    return m


def check_layer(m, x, n):
    y, ld = m(x)
    assert torch.isfinite(ld).all() and torch.isfinite(y).all()
    x0, ldi = m.inverse(y)
    assert (x0 - x).abs().max() < 1e-12
    assert (ld + ldi).abs().max() < 1e-11
    space = field_space(f"su{n}")
    act = WilsonGaugeAction(2.0, f"su{n}")
    for fn in (lambda u: act.action(m(u)[0]) - m(u)[1], lambda u: m.inverse(u)[1]):
        assert torch.isfinite(space.autograd_force(fn, x)).all()
    # log q continuous: every link perturbed by 1e-8
    for seed in (0, 1):
        _, ldp = m(perturb(x, 1e-8, seed))
        assert (ldp - ld).abs().max() < 1e-6 * int(m.sites.sum())


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("config", ["unit", "centre-twisted"])
def test_layer_at_degenerate_gauges(n, config):
    lattice = (4, 4)
    x = (unit_gauge if config == "unit" else centre_twisted)(n, lattice)
    for index in (0, 1):
        check_layer(stout_layer(n, lattice, index), x, n)


def test_layer_and_flow_hmc_at_tmlqcd_unity_file():
    x = tmlqcd_unity()
    check_layer(stout_layer(3, (4, 4, 4, 4)), x, 3)
    flow_hmc_steps(3, (4, 4, 4, 4), x, n_layers=1, n_steps=1)


def flow_hmc_steps(n, lattice, x, n_layers=2, n_steps=2):
    torch.manual_seed(7)
    flow = build_flow(f"su{n}", lattice, "sun-stout", n_layers=n_layers, options={"hidden": [2], "dtype": "float64"})
    randomize(flow, seed=4, scale=0.5)
    act = WilsonGaugeAction(2.0 if n == 2 else 4.0, f"su{n}")
    kernel = FlowHMC(flow.eval(), act, steps=2, trajectory_length=0.2)
    state = kernel.init(x)
    log_q, z = state.extras["log_q"], state.extras["latent"]
    assert torch.isfinite(log_q).all()
    assert (z - x).abs().max() < 1e-12  # centre-valued loops are fixed points
    with torch.no_grad():
        x2, ld = flow(z)
        assert (x2 - x).abs().max() < 1e-12
        assert (flow.prior.log_prob(z) - ld - log_q).abs().max() < 1e-10
        lqp = flow.log_prob(perturb(x, 1e-8, 0))
        assert (lqp - log_q).abs().max() < 1e-6 * n_layers * math.prod(lattice)
    g = gen(11)
    for _ in range(n_steps):
        state, info = kernel.step(state, g)
        assert torch.isfinite(info["delta_h"]).all()
        assert torch.isfinite(state.x).all() and torch.isfinite(state.extras["log_q"]).all()


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("config", ["unit", "centre-twisted"])
def test_flow_hmc_steps_from_degenerate_gauges(n, config):
    lattice = (4, 4)
    flow_hmc_steps(n, lattice, (unit_gauge if config == "unit" else centre_twisted)(n, lattice))


@pytest.mark.parametrize("name", ["sun-stout", "sun-spectral"])
def test_deep_flow_keeps_links_unitary_and_invertible(name):
    """40 random SU(3) layers: each applies its update as U' = G U with G unitary, so the
    links stay unitary to rounding and the inverse undoes the forward map. (Forming
    P' P^+ U instead amplified the rounding of the staple several-fold per layer: after 32
    trained layers the links were 1e-9 off SU(3) and the inverse diverged.)"""
    lattice = (4, 4)
    flow = build_flow("su3", lattice, name, n_layers=40, options={"hidden": [2], "dtype": "float64"})
    randomize(flow, seed=5, scale=1.0)
    with torch.no_grad():
        z = flow.prior.sample(2, generator=gen(3))
        x, ld = flow(z)
        eye = torch.eye(3, dtype=torch.complex128)
        assert (x @ x.mH - eye).abs().max() < 1e-13
        z0, ldi = flow.inverse(x)
        # measured <= 3e-11: a stout step with 1 + phi'' >= 0.1 may amplify rounding tenfold
        assert (z0 - z).abs().max() < 1e-10
        assert (ld + ldi).abs().max() < 1e-9


# ------------------------------------------------------------- speed paths of the layer


@pytest.mark.parametrize("lattice", [(4, 2), (2, 4, 2), (2, 2, 4, 2)])
@pytest.mark.parametrize("n", [2, 3])
def test_plaquette_traces_equal_traced_plaquettes_with_gradients(lattice, n):
    """The matrix-axes-first features with their hand-written backward equal Re/Im tr P / N of
    :func:`flowplug.gauge.sun_plaquettes` and autograd's gradient through it (non-cubic
    lattices, so that a swapped axis shows), in complex128 and complex64."""
    d = len(lattice)
    u = groups.haar_random((2, d, *lattice), n, generator=gen(5)).requires_grad_(True)
    ref = torch.diagonal(gauge.sun_plaquettes(u), dim1=-2, dim2=-1).sum(-1) / n
    w = torch.randn(ref.shape, generator=gen(6), dtype=torch.complex128)
    (g_ref,) = torch.autograd.grad((ref * w).real.sum(), u)
    for dtype, tol in ((torch.complex128, 1e-13), (torch.complex64, 1e-5)):
        tr = plaquette_traces(u, dtype)
        assert tr.dtype == dtype and tr.shape == ref.shape
        assert (tr - ref).abs().max() < tol
        (g,) = torch.autograd.grad((tr * w.to(dtype)).real.sum(), u)
        assert g.dtype == torch.complex128
        assert (g - g_ref).abs().max() < tol * 10
    assert (plaquette_traces(u.unbind(1)) - ref).abs().max() < 1e-13  # list of link fields
    with pytest.raises(ShapeError, match="plaquette_traces"):
        plaquette_traces(u.detach()[..., :1])


@pytest.mark.parametrize("lattice", [(4, 4), (2, 4, 4), (4, 4, 2, 4)])
def test_stripe_conditioner_equals_full_output_on_updated_sites(lattice):
    """The conditioner's last convolution on the updated sites only (strided along nu) gives
    the full network output at ``site_index``; the layer's weights keep their names, so
    checkpoints written before load unchanged."""
    d = len(lattice)
    u = groups.haar_random((2, d, *lattice), 3, generator=gen(8))
    for index in range(0, 4 * d, 3):
        for dtype, tol in (("float64", 1e-12), ("float32", 1e-5)):
            m = make_layer("sun-stout", lattice=lattice, field="su3", index=index, dtype=dtype)
            randomize(m, seed=index)
            tr = plaquette_traces(u, torch.complex128 if dtype == "float64" else torch.complex64)
            with torch.no_grad():
                full = m._condition(tr.real, tr.imag).flatten(1, d)[:, m.site_index]
                stripe = m._condition(tr.real, tr.imag, stripe=True).flatten(1, d)
            assert stripe.shape == full.shape
            assert (stripe - full).abs().max() < tol * (1 + full.abs().max())
    keys = set(m.state_dict())
    assert "loop_links" not in keys and {"site_index", "site_plus_mu", "site_plus_nu"} <= keys
    m.load_state_dict(m.state_dict())


@pytest.mark.parametrize(
    "n,lattice,index,rectangles",
    [(3, (4, 4, 4, 4), 5, False), (3, (4, 4, 4, 4), 5, True), (2, (4, 2), 0, True), (2, (4, 2), 1, True)],
    ids=["su3-4^4", "su3-4^4-rect", "su2-4x2-nu1-rect", "su2-4x2-nu0-rect"],
)
def test_float32_layer_is_an_exact_bijection(n, lattice, index, rectangles):
    """With the default float32 conditioner (complex64 features, the Fourier and strided
    convolutions) the parameters of the forward and inverse maps are bitwise the same, so the
    round trip holds to float64 rounding, also with ``rectangles`` (whose 1x2 loops enclose the
    updated link: they must not be formed through it) and on a 2D lattice with an extent 2
    (x + nu = x - nu); the layer is gauge equivariant to float32 rounding of the parameters."""
    d = len(lattice)
    m = make_layer("sun-stout", lattice=lattice, field=f"su{n}", index=index, rectangles=rectangles, hidden=[4])
    assert m.net.dtype == torch.float32
    randomize(m, seed=index)
    x = groups.haar_random((2, d, *lattice), n, generator=gen(9))
    seen = []
    original = m._condition
    m._condition = lambda re, im, rect=None, **kw: (seen.append((re, im, rect)), original(re, im, rect, **kw))[1]
    y, ld = m(x)
    x0, ldi = m.inverse(y)
    m._condition = original
    fwd, inv = seen
    assert torch.equal(fwd[0] * m.frozen.float(), inv[0] * m.frozen.float())
    if rectangles:
        keep = m.rect_frozen > 0
        assert keep.any() and torch.equal(fwd[2][0][:, keep], inv[2][0][:, keep])
        assert torch.equal(fwd[2][1][:, keep], inv[2][1][:, keep])
    assert (y - x).abs().max() > 1e-3, "randomised layer should not be the identity"
    assert (x0 - x).abs().max() < 1e-12
    assert (ld + ldi).abs().max() < 1e-11
    omega = groups.haar_random((2, *lattice), n, generator=gen(10))

    def transform(u):
        return torch.stack([omega @ u[:, mu] @ torch.roll(omega, -1, dims=1 + mu).mH for mu in range(d)], 1)

    yg, ldg = m(transform(x))
    assert (yg - transform(y)).abs().max() < 1e-4
    assert (ldg - ld).abs().max() < 1e-4


def test_plaquette_traces_double_backward_equals_autograd():
    """create_graph=True goes through differentiable operations: the gradient and its own
    derivative (a Hessian-vector product) equal autograd's through the traced plaquettes of
    flowplug.gauge.sun_plaquettes, and the first-order gradient is the hand-written one."""
    u0 = groups.haar_random((2, 2, 2, 4), 3, generator=gen(5))
    v = torch.randn(u0.shape, dtype=torch.complex128, generator=gen(6))
    w = torch.randn(2, 1, 2, 4, dtype=torch.float64, generator=gen(7))

    def hvp(traces):
        u = u0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad((traces(u).real * w).sum(), u, create_graph=True)
        (h,) = torch.autograd.grad((g * v.conj()).real.sum(), u)
        return g.detach(), h

    def reference(u):
        return torch.diagonal(gauge.sun_plaquettes(u), dim1=-2, dim2=-1).sum(-1) / 3

    g, h = hvp(plaquette_traces)
    g_ref, h_ref = hvp(reference)
    assert (g - g_ref).abs().max() < 1e-13 and (h - h_ref).abs().max() < 1e-12
    assert h.abs().max() > 1e-2  # a second derivative that is there
    u = u0.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad((plaquette_traces(u).real * w).sum(), u)  # first order: the hand-written one
    assert (g1 - g_ref).abs().max() < 1e-13
