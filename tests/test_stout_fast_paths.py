"""The eig-free speed paths of the ``sun-stout`` layer (issue 14 item 1).

Checks, each against an independent computation:
(a) the closed-form SU(2)/SU(3) eigensystem (:func:`flowplug.groups.su_eigensystem`):
    orthonormal eigenvectors and W V = V diag(e^{i theta}) to rounding, eigenvalues equal to
    LAPACK's (``torch.linalg.eigvals``), at Haar-random points, the centre elements, exactly and
    nearly degenerate spectra (double and triple eigenvalues, splits down to 1e-12), and
    conjugates of all of these; clear errors for other N and real input;
(b) the derivative of sinc (Taylor series below |x| = 0.2, closed form above) against 50-digit
    mpmath values on both sides of the branch point and down to 1e-300;
(c) the hand-written backward of the stout map against central differences of its own
    forward map, for the input matrix (along su(N) directions) and the parameters, forward
    and inverse, at random and near-degenerate points;
(d) the two-stage 4D DFT against torch.fft on a non-cubic lattice, and strided 4D outputs from
    it against the direct strided convolution;
(e) the layer's frozen-plaquette features: bitwise the traces of :func:`plaquette_traces` on
    the frozen plaquettes.
Every random number comes from a fixed seed.
"""

from __future__ import annotations

import math

import pytest
import torch
from _sun_helpers import centre, conj, eigdiag, gen, perturb

from flowplug import gauge, groups
from flowplug.errors import ShapeError
from flowplug.flow import make_layer
from flowplug.manager import new_plugin_manager, set_plugin_manager
from flowplug.plugins.flow_nets import _dft_factors
from flowplug.plugins.flow_stout import _dsinc, n_stout_params, plaquette_traces, stout_map


@pytest.fixture(autouse=True, scope="module")
def fresh_manager():
    old = set_plugin_manager(new_plugin_manager(autoload=False))
    yield
    set_plugin_manager(old)


def _points(n: int) -> dict[str, torch.Tensor]:
    """Test points (batch, N, N): random, centre elements, (near-)degenerate spectra, conjugated."""
    pts = {"haar": groups.haar_random((2000,), n, generator=gen(1))}
    for k in range(n):
        z = centre(n, k)[None]
        pts[f"centre{k}"] = z
        for eps in (1e-4, 1e-8, 1e-12):
            pts[f"centre{k}+{eps:g}"] = perturb(conj(z, seed=3 + k).expand(20, n, n), eps, 4)
    if n == 3:
        spectra = {
            "double": (0.7, 0.7, -1.4),
            "double-pi": (math.pi, math.pi, 0.0),
            "split-1e-9": (1.0, 1.0 + 1e-9, -2.0 - 1e-9),
            "split-1e-6": (2.0, 2.0 - 1e-6, -4.0 + 1e-6),
            "pair-pm": (0.3, -0.3, 0.0),
        }
    else:
        spectra = {"pm-pi/2": (0.5 * math.pi, -0.5 * math.pi), "near-1": (1e-9, -1e-9)}
    for name, ph in spectra.items():
        pts[f"{name}-diag"] = eigdiag(*ph)[None]
        pts[f"{name}-conj"] = conj(eigdiag(*ph), seed=6)[None]
    return pts


# ------------------------------------------------------------------ (a) eigensystem


@pytest.mark.parametrize("n", [2, 3])
def test_su_eigensystem_is_orthonormal_and_exact_everywhere(n):
    for name, w in _points(n).items():
        v, theta = groups.su_eigensystem(w)
        assert v.shape == w.shape and theta.shape == w.shape[:-1] and theta.dtype == torch.float64
        eye = torch.eye(n, dtype=w.dtype)
        assert (v.mH @ v - eye).abs().max() < 3e-15 * n, name
        lam = torch.polar(torch.ones_like(theta), theta)
        assert (w @ v - v * lam[..., None, :]).abs().max() < 5e-15 * n, name
        # the eigenvalues are LAPACK's (each computed one near one of them, and the same
        # multiset: equal sums of first and second powers)
        ref = torch.linalg.eigvals(w)
        assert (lam[..., :, None] - ref[..., None, :]).abs().amin(-1).max() < 1e-7, name
        assert (lam.sum(-1) - ref.sum(-1)).abs().max() < 1e-13, name
        assert ((lam * lam).sum(-1) - (ref * ref).sum(-1)).abs().max() < 1e-13, name


def test_su_eigensystem_exact_on_diagonal_and_centre_inputs():
    """Exactly structured inputs come out exactly: the standard basis for a diagonal matrix
    (up to order and phases), the exact phases for centre elements."""
    for k in range(3):
        v, theta = groups.su_eigensystem(centre(3, k)[None])
        assert ((v.abs() > 0).sum(-2) == 1).all()  # each column a standard basis vector (times a phase)
        expected = math.remainder(2 * math.pi * k / 3, 2 * math.pi)
        assert (theta - expected).abs().max() < 1e-15
    v, theta = groups.su_eigensystem(eigdiag(0.7, 0.7, -1.4)[None])
    assert ((v.abs() > 0).sum(-2) == 1).all()
    assert sorted(round(float(t), 15) for t in theta[0]) == sorted(round(t, 15) for t in (0.7, 0.7, -1.4))


def test_su_eigensystem_refuses_other_groups():
    with pytest.raises(ShapeError, match="su_eigensystem.*N = 2 or 3"):
        groups.su_eigensystem(torch.eye(4, dtype=torch.complex128))
    with pytest.raises(ShapeError, match="su_eigensystem"):
        groups.su_eigensystem(torch.eye(3, dtype=torch.float64))
    with pytest.raises(ShapeError, match="su_eigensystem"):
        groups.su_eigensystem(torch.zeros(3, 2, dtype=torch.complex128))


def test_matmul_axes_first_is_a_matrix_product():
    a = torch.randn(7, 3, 3, generator=gen(2), dtype=torch.complex128)
    b = torch.randn(7, 3, 3, generator=gen(3), dtype=torch.complex128)
    out = groups.matmul_axes_first(a.permute(1, 2, 0), b.permute(1, 2, 0)).permute(2, 0, 1)
    assert (out - a @ b).abs().max() < 1e-14


# ------------------------------------------------------------------ (b) series branches


def test_sinc_derivative_matches_high_precision_values_on_both_branches():
    """d sinc / dx (Taylor series below |x| = 0.2, the closed form above) against 50-digit mpmath
    values of the closed form, on both sides of the branch point and down to 1e-300 (where the
    float64 closed form cancels)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    xs = [1e-300, 1e-9, 1e-4, 0.05, 0.1, 0.199, 0.2, 0.201, 0.3, 0.7, 1.5, 2.5, 3.0, 4.5]
    xs = xs + [-v for v in xs]
    got = _dsinc(torch.tensor(xs, dtype=torch.float64))
    for v, g in zip(xs, got.tolist(), strict=True):
        x = mpmath.mpf(v)
        exact = float((mpmath.cos(x) - mpmath.sin(x) / x) / x)
        assert abs(g - exact) <= 1e-14 * abs(exact) + 1e-300, (v, g, exact)
    assert float(_dsinc(torch.zeros(1, dtype=torch.float64))) == 0.0


# ------------------------------------------------------------------ (c) hand-written backward


@pytest.mark.parametrize(
    "n,where",
    [(n, w) for n in (2, 3) for w in ("random", "near-centre", "near-double")] + [(4, "random")],
)
def test_stout_backward_equals_central_differences(n, where):
    """Directional derivatives of sum_b [c_b logdet_b + Re tr(M_b G_b)] along random su(N)
    directions of every input matrix and random parameter directions, from the hand-written
    backward, equal central differences (h = 1e-6, tolerance 1e-6 relative); SU(4) goes through
    the eigh-based eigensystem, SU(2)/SU(3) through the closed form."""
    batch = 6
    if where == "random":
        w = groups.haar_random((batch,), n, generator=gen(10))
    elif where == "near-centre":
        w = perturb(centre(n, 1).expand(batch, n, n), 1e-3, 11)
    else:
        ph = (0.7, 0.7, -1.4) if n == 3 else (1e-3, -1e-3)
        w = perturb(conj(eigdiag(*ph)).expand(batch, n, n), 1e-3, 12)
    raw = 1.5 * torch.randn(batch, n_stout_params(2, 2), generator=gen(13), dtype=torch.float64)
    coef = torch.linspace(0.5, 1.5, batch, dtype=torch.float64)
    m = torch.randn(batch, n, n, generator=gen(14), dtype=torch.complex128)
    x = groups.random_algebra((batch,), n, generator=gen(15))
    dr = torch.randn(raw.shape, generator=gen(16), dtype=torch.float64)
    h = 1e-6
    for inverse in (False, True):

        def f(u, r, inv=inverse):
            g, ld = stout_map(u, r, 2, 2, inverse=inv, left=True)
            return (coef * ld).sum() + (g * m).real.sum()

        wg, rg = w.clone().requires_grad_(True), raw.clone().requires_grad_(True)
        gw, gr = torch.autograd.grad(f(wg, rg), (wg, rg))
        assert torch.isfinite(gw).all() and torch.isfinite(gr).all()
        with torch.no_grad():  # the inverse of the map undoes it
            w1, ld1 = stout_map(w, raw, 2, 2, inverse=inverse)
            w0, ld0 = stout_map(w1, raw, 2, 2, inverse=not inverse)
        assert (w0 - w).abs().max() < 1e-12 and (ld0 + ld1).abs().max() < 1e-10
        # along W -> exp(h X) W: d/dh = sum Re(conj(gw) X W)
        with torch.no_grad():
            fd_w = (f(groups.expmap(h * x) @ w, raw) - f(groups.expmap(-h * x) @ w, raw)) / (2 * h)
            fd_r = (f(w, raw + h * dr) - f(w, raw - h * dr)) / (2 * h)
        an_w = (gw.conj() * (x @ w)).real.sum()
        an_r = (gr * dr).sum()
        assert abs(float(fd_w - an_w)) < 1e-6 * max(1.0, abs(float(fd_w))), (where, inverse, float(fd_w), float(an_w))
        assert abs(float(fd_r - an_r)) < 1e-6 * max(1.0, abs(float(fd_r))), (where, inverse, float(fd_r), float(an_r))


def test_stout_backward_refuses_double_backward():
    w = groups.haar_random((2,), 3, generator=gen(20)).requires_grad_(True)
    raw = torch.randn(2, n_stout_params(2, 2), generator=gen(21), dtype=torch.float64)
    _, ld = stout_map(w, raw, 2, 2)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(ld.sum(), w, create_graph=True)


# ------------------------------------------------------------------ (d) two-stage DFT


def test_two_stage_dft_is_rfftn_and_irfftn():
    lattice = (2, 4, 6, 4)  # non-cubic: a swapped axis would show
    fwd_b, fwd_a, inv_a, inv_b = _dft_factors(lattice, torch.device("cpu"), torch.float64)
    x = torch.randn(3, *lattice, generator=gen(30), dtype=torch.float64)
    sa, sb, fb = 8, 24, fwd_b.shape[1] // 2
    assert fwd_a.dtype == inv_a.dtype == torch.complex128 and fwd_a.shape == inv_a.shape == (sa, sa)
    z = torch.view_as_complex((x.reshape(3, sa, sb) @ fwd_b).view(3, sa, fb, 2))
    z = fwd_a @ z
    ref = torch.fft.rfftn(x, dim=(1, 2, 3, 4)).reshape(3, sa, fb)
    assert (z - ref).abs().max() < 1e-12
    y = torch.randn(3, sa, fb, generator=gen(31), dtype=torch.complex128)
    yr = torch.view_as_real(inv_a @ y).reshape(3, sa, 2 * fb)
    ref_inv = torch.fft.irfftn(y.view(3, 2, 4, 6, 3), s=lattice, dim=(1, 2, 3, 4)).reshape(3, sa, sb)
    assert ((yr @ inv_b) - ref_inv).abs().max() < 1e-12
    with pytest.raises(ShapeError, match="4D lattice"):
        _dft_factors((4, 4), torch.device("cpu"), torch.float64)


# ------------------------------------------------------------------ (e) layer features


@pytest.mark.parametrize("lattice,index", [((4, 4, 4, 4), 5), ((4, 2, 4, 2), 2), ((4, 4), 1)])
def test_layer_features_are_the_frozen_plaquette_traces(lattice, index):
    """The layer forms only the frozen plaquettes' traces: bitwise those of plaquette_traces
    there (so the conditioner sees exactly the same input), and the layer is unchanged."""
    d = len(lattice)
    m = make_layer("sun-stout", lattice=lattice, field="su3", index=index)
    u = groups.haar_random((2, d, *lattice), 3, generator=gen(40))
    full = plaquette_traces(u, torch.complex64).flatten(1)
    part = gauge.PlaquetteTraces.apply(u.flatten(1, 1 + d), m.frozen_plaquettes, torch.complex64)
    assert torch.equal(part, full[:, m.frozen_at])
    assert torch.equal(m.frozen.flatten().nonzero().flatten(), m.frozen_at)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_strided_4d_convolution_paths_agree(dtype, tol, monkeypatch):
    """A strided 4D output from the dense Fourier path (small lattices) equals that of the direct
    strided convolution (the path of larger lattices), values and gradients."""
    from flowplug.plugins import flow_nets

    conv = flow_nets.PeriodicConv(5, 3, 3, 4, dtype)
    x = torch.randn(2, 5, 4, 2, 4, 6, generator=gen(60), dtype=dtype)
    results = []
    for sites in (flow_nets._DENSE_DFT_SITES, 0):
        monkeypatch.setattr(flow_nets, "_DENSE_DFT_SITES", sites)
        xg = x.clone().requires_grad_(True)
        y = conv(xg, (2, 1, 4))
        w = torch.linspace(-1.0, 1.0, y.numel(), dtype=dtype).view(y.shape)
        results.append((y.detach(), *torch.autograd.grad((y * w).sum(), (xg, conv.conv.weight))))
    assert results[0][0].shape == (2, 3, 4, 2, 1, 6)
    for a, b in zip(*results, strict=True):
        assert (a - b).abs().max() < tol * (1 + b.abs().max())


@pytest.mark.parametrize("scale", [0.0, 1e-7, 1e-3, 0.3, 3.0])
def test_coefficient_backward_equals_autograd_of_stout_coefficients(scale):
    """The batch-last coefficients with their hand-written backward equal stout_coefficients and
    autograd's gradient through it, also for tiny parameters (the Taylor branch of d s/d r)."""
    from flowplug.plugins.flow_stout import _Coefficients, stout_coefficients

    raw = scale * torch.randn(7, n_stout_params(3, 2), generator=gen(70), dtype=torch.float64)
    wa = torch.randn(2, 3, 7, generator=gen(71), dtype=torch.float64)
    wb = torch.randn(2, 3, 7, generator=gen(72), dtype=torch.float64)
    r1 = raw.clone().requires_grad_(True)
    a, b = _Coefficients.apply(r1, 3, 2, 0.9)
    (g1,) = torch.autograd.grad((a * wa).sum() + (b * wb).sum(), r1)
    r2 = raw.clone().requires_grad_(True)
    a_ref, b_ref = stout_coefficients(r2, 3, 2, 0.9)  # (7, steps, K)
    a_ref, b_ref = a_ref.permute(1, 2, 0), b_ref.permute(1, 2, 0)
    (g2,) = torch.autograd.grad((a_ref * wa).sum() + (b_ref * wb).sum(), r2)
    assert (a - a_ref).abs().max() <= 1e-15 * (1 + a_ref.abs().max())
    assert (b - b_ref).abs().max() <= 1e-15 * (1 + b_ref.abs().max())
    assert (g1 - g2).abs().max() <= 1e-12 * (1 + g2.abs().max())


@pytest.mark.parametrize("lattice,index", [((4, 4, 4, 4), 5), ((4, 2, 4, 2), 3), ((4, 4), 1)])
def test_layer_equals_the_plain_computation_from_all_plaquettes(lattice, index):
    """The layer (frozen-plaquette features, matrix-axes-first map) equals the plain computation:
    features from every plaquette (:func:`plaquette_traces`, masked by the conditioner), the
    conditioner's strided output, and :func:`stout_map` on the active loops; output and log-det,
    forward and inverse, with a randomised float64 network."""
    from _sun_helpers import randomize

    d = len(lattice)
    m = make_layer("sun-stout", lattice=lattice, field="su3", index=index, dtype="float64", init_scale=1.0)
    randomize(m, seed=41)
    u = groups.haar_random((2, d, *lattice), 3, generator=gen(42))
    for inverse in (False, True):
        with torch.no_grad():
            out, ld = m.inverse(u) if inverse else m(u)
            tr = plaquette_traces(u)
            params = m._condition(tr.real, tr.imag, None, stripe=True).flatten(1, d)
            flat = u.flatten(1, 1 + d)
            link, a, b, c = flat.index_select(1, m.loop_links).unflatten(1, (4, -1)).unbind(1)
            loop = link @ a @ b.mH @ c.mH
            kw = {"max_curvature": m.max_curvature, "inverse": inverse, "left": True}
            g, ld_ref = stout_map(loop, params, m.n_modes, m.n_steps, **kw)
            ref = flat.index_copy(1, m.loop_links[: link.shape[1]], g @ link).view_as(u)
        assert (out - ref).abs().max() < 1e-13, inverse
        assert (ld - ld_ref.sum(1)).abs().max() < 1e-12, inverse


@pytest.mark.parametrize("out_sites", [(0, 0, 4), (3, 1, 2)])
def test_strided_4d_direct_convolution_is_batch_independent(out_sites):
    """Above ``_DENSE_DFT_SITES`` a strided 4D output comes from the direct convolution; in
    float32 it gives a configuration bitwise the same output in a batch as alone (one 3D
    convolution per configuration: torch's CPU convolution rounds by its batch size, 1.9e-7 on
    this lattice with a batch of 7)."""
    from flowplug.plugins import flow_nets

    lattice = (4, 4, 4, 10)  # 640 sites: the direct strided path
    assert 640 > flow_nets._DENSE_DFT_SITES
    torch.manual_seed(61)
    conv = flow_nets.PeriodicConv(4, 36, 3, 4, torch.float32)
    x = torch.randn(7, 4, *lattice, generator=gen(62))
    with torch.no_grad():
        batch = conv(x, out_sites)
        alone = torch.cat([conv(x[i : i + 1], out_sites) for i in range(x.shape[0])])
    assert torch.equal(batch, alone), float((batch - alone).abs().max())
