"""The SU(N) spectral map and ``sun-spectral`` layers at degenerate spectra (issue 11, item 2).

Unit links, centre elements e^{2 pi i k/N} 1, loops with two equal eigenphases
(diag(-1, -1, 1) and others in SU(3)), the tmLQCD unity file of ../shared/ensembles and
random links, in SU(2) and SU(3):

(a) the log-det is continuous wherever the density of the map is: at most two
    eigenvalues coincide (every degenerate SU(2) point, SU(3) points other than the
    centre), so 1e-8 perturbations change it by < 1e-5 nats; its value there is the
    exact limit (pinned analytically for SU(2));
(a') at an SU(3) centre element (three equal eigenvalues) the density has no limit for
    generic splines, since it depends on the direction of approach; the value returned is
    the limit along equal vanishing gaps, and with splines isotropic at that point
    (the condition of :mod:`flowplug.plugins.flow_sun`) it is continuous and equals the
    analytic value 8 log a;
(b) forward then inverse returns the input to 1e-10 and the log-dets cancel to 1e-10;
(c) gradients with respect to the input (autograd, as flow-HMC uses them) are finite;
    near the degenerate points the autograd Jacobian still gives the log-det and the
    force agrees with central differences;
(d) flow-HMC (:class:`flowplug.plugins.kernels.FlowHMC`) with ``sun-spectral`` layers
    steps from the unit gauge, a centre-twisted gauge and the tmLQCD unity file, with
    finite energy differences and log q.

All random numbers come from fixed seeds; there is no statistical test.
"""

from __future__ import annotations

import math

import pytest
import torch
from _sun_helpers import centre, centre_twisted, conj, eigdiag, gen, perturb, randomize, tmlqcd_unity, unit_gauge

from flowplug import groups
from flowplug.flow import build_flow, make_layer
from flowplug.manager import new_plugin_manager, set_plugin_manager
from flowplug.plugins.flow_sun import spectral_map
from flowplug.plugins.flow_transforms import rq_spline_params
from flowplug.plugins.kernels import FlowHMC
from flowplug.plugins.theories import WilsonGaugeAction
from flowplug.theory import field_space

K = 8  # spline bins
PER = 3 * K + 1  # raw parameters per eigenvalue coordinate
EPS = 1e-8  # size of the perturbations of the continuity tests
TWO_PI = 2 * math.pi


@pytest.fixture(autouse=True, scope="module")
def fresh_manager():
    old = set_plugin_manager(new_plugin_manager(autoload=False))
    yield
    set_plugin_manager(old)


def raw_params(n, seed=3, scale=0.7):
    """Random spline parameters for one SU(n) matrix, shape (1, (n-1) PER), float64."""
    return scale * torch.randn(1, (n - 1) * PER, generator=gen(seed), dtype=torch.float64)


def knot_derivative(raw, k, end):
    """f_k'(0) (end=0) or f_k'(1) (end=-1) of the spline of eigenvalue coordinate k."""
    _, _, d = rq_spline_params(raw[..., k * PER : (k + 1) * PER], K)
    return float(d[0, end])


# degenerate points where the density is continuous (no three equal eigenvalues)
PAIR_POINTS = {
    "su2-identity": torch.eye(2, dtype=torch.complex128),
    "su2-minus-one": centre(2, 1),
    "su2-minus-one-conj": conj(centre(2, 1)),
    "su3-diag(-1,-1,1)": eigdiag(math.pi, math.pi, 0.0),
    "su3-diag(-1,-1,1)-conj": conj(eigdiag(math.pi, math.pi, 0.0)),
    "su3-diag(i,i,-1)": eigdiag(math.pi / 2, math.pi / 2, math.pi),
    "su3-diag(a,a,-2a)": eigdiag(0.7, 0.7, -1.4),
    "su3-diag(a,a,-2a)-conj": conj(eigdiag(0.7, 0.7, -1.4), seed=6),
    "su3-diag(b,b,-2b)": eigdiag(2.5, 2.5, -5.0),
}
CENTRES = {f"su3-centre{k}": centre(3, k) for k in range(3)}
RANDOM = {f"su{n}-random": groups.haar_random((), n, generator=gen(8 + n)) for n in (2, 3)}
ALL_POINTS = {**PAIR_POINTS, **CENTRES, "su2-centre1": centre(2, 1), **RANDOM}


def n_of(w):
    return w.shape[-1]


# ---------------------------------------------------------------------- (a) continuity


def points(group, *sets):
    """Names of the test points of ``group`` (su2, su3) in the given dictionaries."""
    return [name for s in sets for name in sorted(s) if name.startswith(group + "-")]


@pytest.mark.parametrize("group", ["su2", "su3"])
def test_logdet_and_output_continuous_where_at_most_two_eigenvalues_coincide(group):
    for name in points(group, PAIR_POINTS, RANDOM):
        w = ALL_POINTS[name][None]
        raw = raw_params(n_of(w))
        w1, ld = spectral_map(w, raw, K)
        assert torch.isfinite(ld).all(), name
        for seed in range(6):
            wp = perturb(w, EPS, seed)
            w1p, ldp = spectral_map(wp, raw, K)
            assert abs(float(ldp - ld)) < 1e-5, (name, seed, float(ld), float(ldp))
            assert (w1p - w1).abs().max() < 1e-6, name


@pytest.mark.parametrize("k,end", [(0, 0), (1, -1)])
def test_su2_limits_are_exact(k, end):
    """SU(2), u = a/pi for eigenphases +-a: the density ratio tends to f'(0)^3 at the identity
    and f'(1)^3 at -1 (spline derivative times the Weyl factor ratio (sin a'/sin a)^2)."""
    raw = raw_params(2, seed=4)
    _, ld = spectral_map(centre(2, k)[None], raw, K)
    assert abs(float(ld) - 3 * math.log(knot_derivative(raw, 0, end))) < 1e-12


def _dir(z, eps, gaps):
    """z exp(i diag(phases)) with the two eigenvalue differences given as multiples of eps."""
    a, b = gaps
    ph = torch.tensor([a + b, b, 0.0], dtype=torch.float64) * eps
    ph = ph - ph.mean()
    return conj(z @ torch.diag(torch.exp(1j * ph)), seed=9)[None]


@pytest.mark.parametrize("k", [0, 1, 2])
def test_su3_centre_continuous_for_every_spline(k):
    """Three equal eigenvalues: the SU(3) map ties f_2'(0) = f_2'(1) = f_1'(0) and lets f_2
    tend to the identity as u_1 -> 1, so it scales the vanishing gaps equally at every centre
    element and the density has a limit, a^8 (a = f_1'(0) at the identity and
    e^{2 pi i/3}, f_1'(1) at e^{-2 pi i/3}), reached from every direction: generic random
    directions and the anisotropic one of gap ratio 1:4 (a jump of > 1e-2 nats before)."""
    z = centre(3, k)
    raw = raw_params(3, seed=12)
    _, ld = spectral_map(z[None], raw, K)
    a = knot_derivative(raw, 0, 0 if k < 2 else -1)
    assert abs(float(ld) - 8 * math.log(a)) < 1e-12

    def moves(eps):
        ws = [_dir(z, eps, (1.0, 1.0)), _dir(z, eps, (1.0, 4.0)), _dir(z, eps, (4.0, 1.0))]
        ws += [perturb(z[None], eps, seed) for seed in range(6)]
        return torch.tensor(
            [float(spectral_map(w, raw, K, inverse=inv)[1] - (-ld if inv else ld)) for w in ws for inv in (0, 1)]
        ).abs()

    # a finite slope: 1e-8 moves log q by < 1e-4 nats, 1e-10 by a hundred times less
    far, near = moves(EPS), moves(1e-2 * EPS)
    assert far.max() < 1e-4 and (near < 0.02 * far + 1e-10).all(), (k, far, near)


def isotropic_raw(k, seed=13):
    """Spline parameters with which the map is locally a scaling at the centre element k."""
    raw = raw_params(3, seed=seed)
    d0, dk = 2 * K, 3 * K  # positions of the raw knot derivatives f'(0), f'(1)
    if k == 0:  # identity: alcove vertex u = (0, 0); f_1'(0) = f_2'(0)
        raw[0, PER + d0] = raw[0, d0]
        a = knot_derivative(raw, 0, 0)
    elif k == 1:  # e^{2 pi i/3}: vertex u = (0, 1); f_1'(0) = f_2'(1)
        raw[0, PER + dk] = raw[0, d0]
        a = knot_derivative(raw, 0, 0)
    else:  # e^{-2 pi i/3}: u_1 = 1, where stick-breaking is singular; f_2 = id
        raw[0, PER:] = 0.0
        a = knot_derivative(raw, 0, -1)
    return raw, a


@pytest.mark.parametrize("k", [0, 1, 2])
def test_su3_centre_continuous_for_isotropic_splines(k):
    """With splines that scale the small gaps equally, the density near the centre element is
    a^8 (the map is X -> a X on su(3) to first order) and the log-det is continuous."""
    raw, a = isotropic_raw(k)
    z = centre(3, k)[None]
    w1, ld = spectral_map(z, raw, K)
    assert abs(float(ld) - 8 * math.log(a)) < 1e-12
    for seed in range(6):
        w1p, ldp = spectral_map(perturb(z, EPS, seed), raw, K)
        assert abs(float(ldp - ld)) < 1e-5, (seed, float(ld), float(ldp))
        assert (w1p - w1).abs().max() < 1e-6


# ---------------------------------------------------------------------- (b) round trip


@pytest.mark.parametrize("group", ["su2", "su3"])
def test_round_trip_exact_at_degenerate_points(group):
    for name in points(group, ALL_POINTS):
        w = ALL_POINTS[name][None]
        n = n_of(w)
        for seed in (3, 21):
            raw = raw_params(n, seed=seed)
            w1, ld = spectral_map(w, raw, K)
            assert torch.isfinite(ld).all() and torch.isfinite(w1).all(), name
            eye = torch.eye(n, dtype=torch.complex128)
            assert (w1 @ w1.mH - eye).abs().max() < 1e-12, name
            assert (torch.linalg.det(w1) - 1).abs().max() < 1e-12, name
            w0, ldi = spectral_map(w1, raw, K, inverse=True)
            assert (w0 - w).abs().max() < 1e-10, name
            assert abs(float(ld + ldi)) < 1e-10, (name, float(ld), float(ldi))
            if "centre" in name or "identity" in name:
                # a centre element is a fixed point of every spectral map, exactly
                assert torch.equal(w1, w), name


# ---------------------------------------------------------------------- (c) gradients


def _jacobian_logdet(fn, w):
    """log|det| of fn at one SU(N) matrix w (shape (1, N, N)) in the coordinates exp(omega) w."""
    n = w.shape[-1]
    basis = torch.stack([t * math.sqrt(2.0) for t in groups.su_generators(n)])  # orthonormal
    y0 = fn(w).detach()

    def coords(omega):
        y = fn(torch.linalg.matrix_exp(torch.einsum("a,aij->ij", omega.to(torch.complex128), basis)) @ w)
        return torch.einsum("aij,...ij->...a", basis.conj(), y @ y0.mH).real.reshape(-1)

    jac = torch.autograd.functional.jacobian(coords, torch.zeros(n * n - 1, dtype=torch.float64))
    return torch.linalg.slogdet(jac)[1]


@pytest.mark.parametrize("group", ["su2", "su3"])
def test_input_gradients_finite_and_jacobian_exact_nearby(group):
    for name in points(group, ALL_POINTS):
        _check_gradients(name)


def _check_gradients(name):
    w = ALL_POINTS[name][None]
    n = n_of(w)
    raw = raw_params(n)
    m = torch.randn(1, n, n, generator=gen(2), dtype=torch.complex128)
    for inverse in (False, True):
        wg = w.clone().requires_grad_(True)
        w1, ld = spectral_map(wg, raw, K, inverse=inverse)
        (g,) = torch.autograd.grad(ld.sum() + (w1 * m).real.sum(), wg)
        assert torch.isfinite(g).all(), (name, inverse)
    # the flow-HMC force of a one-link "action" -log|det| + Re tr(m U')
    force = field_space(f"su{n}").autograd_force(
        lambda u: -spectral_map(u, raw, K)[1] + (spectral_map(u, raw, K)[0] * m).real.sum((-1, -2)), w
    )
    assert torch.isfinite(force).all()
    # 1e-4 away from the degenerate point, autograd's Jacobian still gives the log-det
    wp = perturb(w, 1e-4, 1)
    _, ld = spectral_map(wp, raw, K)
    auto = _jacobian_logdet(lambda v: spectral_map(v, raw, K)[0], wp)
    assert abs(float(auto - ld[0])) < 1e-7, (name, float(auto), float(ld[0]))
    # 1e-2 away, the force agrees with central differences along a direction X in su(N)
    wp = perturb(w, 1e-2, 1)
    x = groups.random_algebra((1,), n, generator=gen(3))
    for inverse in (False, True):

        def fn(u, inverse=inverse):
            w1, ld = spectral_map(u, raw, K, inverse=inverse)
            return ld + (w1 * m).real.sum((-1, -2))

        h = 1e-6
        fd = (fn(groups.expmap(h * x) @ wp) - fn(groups.expmap(-h * x) @ wp)) / (2 * h)
        f = field_space(f"su{n}").autograd_force(fn, wp)  # F = -sum_a (dS/ds_a) t_a
        minus_ds = 2 * (f.conj() * x).real.sum((-1, -2))  # 2 Re tr(F^+ X) = -dS along X
        assert abs(float(fd + minus_ds)) < 1e-6 * max(1.0, abs(float(fd))), (name, inverse, float(fd))


# ---------------------------------------------------------------------- lattices


def sun_layer(n, lattice, index=0, seed=3, hidden=(4,)):
    m = make_layer("sun-spectral", lattice=lattice, field=f"su{n}", index=index, dtype="float64", hidden=list(hidden))
    randomize(m, seed=seed)
    return m


def check_layer(m, x, n):
    """(b) and (c) for a layer at configuration x."""
    y, ld = m(x)
    assert torch.isfinite(ld).all() and torch.isfinite(y).all()
    x0, ldi = m.inverse(y)
    assert (x0 - x).abs().max() < 1e-10
    assert (ld + ldi).abs().max() < 1e-10, (ld, ldi)
    act = WilsonGaugeAction(2.0, f"su{n}")
    space = field_space(f"su{n}")
    for fn in (lambda u: act.action(m(u)[0]) - m(u)[1], lambda u: m.inverse(u)[1]):
        assert torch.isfinite(space.autograd_force(fn, x)).all()
    return ld


def assert_continuous(m, x, seeds=(0, 1, 2)):
    """Every link perturbed by 1e-8 (1e-10): the log-det moves by < 1e-5 nats per updated link
    (< 1e-5 nats in all): continuous, with a finite slope (each active loop moves by ~4 eps)."""
    _, ld = m(x)
    n_sites = int(m.sites.sum())
    for seed in seeds:
        for eps, tol in ((EPS, 1e-5 * n_sites), (1e-2 * EPS, 1e-5)):
            _, ldp = m(perturb(x, eps, seed))
            assert (ldp - ld).abs().max() < tol, (seed, eps, ld, ldp)
    return ld


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("config", ["unit", "centre-twisted"])
def test_layer_round_trip_and_force_at_degenerate_gauges(n, config):
    lattice = (4, 4)
    x = (unit_gauge if config == "unit" else centre_twisted)(n, lattice)
    for index in (0, 1):
        check_layer(sun_layer(n, lattice, index), x, n)


@pytest.mark.parametrize("n", [2, 3])
def test_layer_logdet_continuous_at_unit_and_twisted_gauges(n):
    """Random layers (SU(3) included: every plaquette there is a centre element)."""
    m = sun_layer(n, (4, 4))
    for x in (unit_gauge(n, (4, 4)), centre_twisted(n, (4, 4))):
        assert_continuous(m, x)


def constant_isotropic_layer(lattice, seed=3):
    """An SU(3) layer whose conditioner outputs the identity-isotropic raw parameters everywhere."""
    m = sun_layer(3, lattice, seed=seed)
    raw, a = isotropic_raw(0)
    last = m.net.layers[-1].conv
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(raw[0])
    return m, a


def test_su3_layer_at_unit_gauge_continuous_for_isotropic_splines():
    m, a = constant_isotropic_layer((4, 4))
    x = unit_gauge(3, (4, 4))
    ld = assert_continuous(m, x).detach()
    n_sites = int(m.sites.sum())
    torch.testing.assert_close(ld, torch.full_like(ld, 8 * n_sites * math.log(a)), rtol=0, atol=1e-10)


def test_tmlqcd_unity_file():
    x = tmlqcd_unity()
    assert (x - torch.eye(3, dtype=x.dtype)).abs().max() == 0
    check_layer(sun_layer(3, (4, 4, 4, 4), index=0), x, 3)
    m, a = constant_isotropic_layer((4, 4, 4, 4))
    ld = assert_continuous(m, x, seeds=(0,)).detach()
    n_sites = int(m.sites.sum())
    assert abs(float(ld[0]) - 8 * n_sites * math.log(a)) < 1e-9


# ---------------------------------------------------------------------- (d) flow-HMC


def flow_hmc_steps(n, lattice, x, n_layers=2, n_steps=2):
    torch.manual_seed(7)
    flow = build_flow(f"su{n}", lattice, "sun-spectral", n_layers=n_layers, options={"hidden": [2], "dtype": "float64"})
    randomize(flow, seed=4, scale=0.5)
    act = WilsonGaugeAction(2.0 if n == 2 else 4.0, f"su{n}")
    kernel = FlowHMC(flow.eval(), act, steps=2, trajectory_length=0.2)
    g = gen(11)
    state = kernel.init(x)
    log_q, z = state.extras["log_q"], state.extras["latent"]
    assert torch.isfinite(log_q).all()
    assert (z - x).abs().max() < 1e-12  # centre-valued loops are fixed points
    with torch.no_grad():
        # log q through the inverse (the kernel's) equals log r(z) - log|det| forward at z = f^{-1}(x)
        x2, ld = flow(z)
        assert (x2 - x).abs().max() < 1e-10
        assert (flow.prior.log_prob(z) - ld - log_q).abs().max() < 1e-10
        if n == 2:  # and is continuous (SU(2): every degenerate point)
            lqp = flow.log_prob(perturb(x, EPS, 0))
            assert (lqp - log_q).abs().max() < 1e-5 * n_layers * math.prod(lattice)  # per layer and site
    for _ in range(n_steps):
        state, info = kernel.step(state, g)
        assert torch.isfinite(info["delta_h"]).all()
        assert torch.isfinite(state.x).all() and torch.isfinite(state.extras["log_q"]).all()
    return state, info


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("config", ["unit", "centre-twisted"])
def test_flow_hmc_steps_from_degenerate_gauges(n, config):
    lattice = (4, 4)
    x = (unit_gauge if config == "unit" else centre_twisted)(n, lattice)
    flow_hmc_steps(n, lattice, x)


def test_flow_hmc_steps_from_tmlqcd_unity_file():
    x = tmlqcd_unity()
    flow_hmc_steps(3, (4, 4, 4, 4), x, n_layers=1, n_steps=1)
