r"""Stout-smearing flows on SU(N): W' = exp(i X(W)) W with X the gradient of a learned class function.

The map of a single SU(N) matrix
    A class function F(W) = sum_j phi(theta_j) of the eigenphases theta_j of W, with the
    trigonometric polynomial phi(theta) = sum_{k=1}^K a_k cos(k theta) + b_k sin(k theta),
    is F(W) = sum_k a_k Re tr W^k + b_k Im tr W^k. Its gradient on the group is the
    Hermitian traceless matrix

        X(W) = sum_k k [ -a_k (W^k - W^-k) / (2i) + b_k (W^k + W^-k) / 2 ] - (tr / N) 1,

    which commutes with W and has the eigenvalues phi'(theta_j) - mean_l phi'(theta_l).
    One *step* is W -> W' = exp(i X(W)) W: a stout-smearing step (Morningstar & Peardon,
    hep-lat/0311018, eq. 3) whose "staple" is the gradient of a learned potential of W
    itself, as in the gauge-covariant networks of Nagai & Tomiya (arXiv:2103.11965) and
    the gradient-flow maps of Luscher (arXiv:0907.5491) and Bacchio et al.
    (arXiv:2212.08469). The eigenvectors of W are kept and every eigenphase moves to
    theta'_j = theta_j + phi'(theta_j) - mean phi', so the map commutes with conjugation
    W -> Omega W Omega^+ (gauge equivariance of the coupling layer). It needs only matrix
    powers and the closed-form exponential of :func:`flowplug.groups.expmap`: no
    eigendecomposition enters the output.

Invertibility
    The step is the gradient map of psi(theta) = |theta|^2 / 2 + F(theta) on the plane
    sum theta = 0. The coefficients are scaled so that sum_k k^2 sqrt(a_k^2 + b_k^2) <=
    gamma < 1 (``max_curvature``), hence |phi''| <= gamma, psi is strictly convex and its
    gradient a bijection of the plane commuting with the periodicity lattice and the Weyl
    group: a diffeomorphism of the maximal torus and of SU(N) (Brenier's theorem in its
    simplest form). A layer applies ``n_steps`` such steps with their own coefficients.

Density
    Relative to Haar measure (Weyl integration formula, Boyda et al. arXiv:2008.05456,
    eq. 16), the log-Jacobian of a step is

        log det(1 + P D) + sum_{i<j} log( sin^2((theta'_i - theta'_j)/2) / sin^2((theta_i - theta_j)/2) ),

    D = diag phi''(theta_j), P the projector onto sum theta = 0. The first term is
    sum_j log(1 + phi''_j) + log mean_j 1/(1 + phi''_j) (matrix determinant lemma). In the
    second, theta'_i - theta'_j = 2h (1 + Delta_ij), with h = half the shorter-arc
    difference and the divided difference
    Delta_ij = sum_k k^2 (-a_k cos(k m) - b_k sin(k m)) sinc(k h), m the midpoint of
    the arc (product formulas, no cancellation), so each pair contributes
    2 log[(1 + Delta) sinc(h (1 + Delta)) / sinc(h)]: a smooth, symmetric function of
    the eigenphases. The density is therefore continuous everywhere, including the
    centre elements (where it equals (1 + phi'')^(N^2 - 1) whatever the direction of
    approach) and every other degenerate spectrum; centre elements are fixed points.
    The eigenvectors and eigenphases come, without gradient, from the closed-form SU(2)/SU(3)
    eigensystem of :func:`flowplug.groups.su_eigensystem` (Cayley transform as a polynomial
    in W, trigonometric root of the most isolated eigenvalue, cross products and a 2 x 2
    problem for the eigenvectors: no LAPACK call; other N: ``torch.linalg.eigh`` of the
    Cayley transform, :func:`flowplug.plugins.flow_sun.eigen_phases`); derivatives enter
    through first-order perturbation theory, exact for symmetric functions also at
    degenerate spectra.

Inverse
    Per step, Newton's method on the strictly monotone map theta -> theta' (closed-form
    Jacobian by Sherman-Morrison), without gradient; the backward pass differentiates the
    solution by the implicit-function theorem (:func:`_implicit_backward`), so gradients with
    respect to parameters and input are those of the exact inverse.

Output
    Both directions return W' = G W with G = V diag(e^{i delta}) V^+ built from the
    eigenvectors V of the input and the shifts delta of its eigenphases (as
    :func:`flowplug.plugins.flow_sun.spectral_left_factor`): equal to exp(i X) of the
    forward map to rounding (tested against the matrix form), unitary whatever the
    rounding of W. The coupling layer applies G to the link, U' = G U (= P' P^+ U, since G
    commutes with P), so no loss of unitarity is amplified through the staple in deep flows.

Speed
    The map runs on matrices stored matrix-axes-first, (N, N, batch), and eigenphases
    batch-last, so that every operation is elementwise over contiguous rows (for 3 x 3
    matrices several times cheaper on a CPU than batched LAPACK calls or batched matrix
    products), and it has a hand-written first-order backward (:class:`_StoutSpectral`: the
    vector-Jacobian products of the eigenphase steps, the implicit-function gradient of the
    inverse's Newton solve, and the perturbation theory of G), instead of an autograd graph
    of some hundred small operations; a double backward (``create_graph=True``) raises.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Sequence

import torch

from flowplug import gauge, groups
from flowplug.errors import ConfigError
from flowplug.plugins.flow_gauge import _SUNCoupling
from flowplug.plugins.flow_sun import eigen_phases, pair_indices

#: Newton iterations of the inverse before giving up (convergence is quadratic).
NEWTON_ITERATIONS = 60


def n_stout_params(n_modes: int, n_steps: int) -> int:
    """Conditioner outputs per matrix: 2 coefficients (a_k, b_k) per mode and step.

    Arguments:
        n_modes: Fourier modes K; n_steps: steps M.

    Returns:
        2 K M.
    """
    return 2 * int(n_modes) * int(n_steps)


def stout_coefficients(
    raw: torch.Tensor, n_modes: int, n_steps: int, max_curvature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Potential coefficients (a, b) from unconstrained parameters.

    Per step, with r = sum_k k^2 sqrt(a_k^2 + b_k^2 + 1e-24) of the raw values, the raw
    coefficients are multiplied by gamma tanh(r) / r, so that the scaled curvature bound
    is gamma tanh(r) < gamma (module docstring); small raw values pass through times gamma.

    Arguments:
        raw: Shape (..., 2 K M), any real dtype.
        n_modes: K; n_steps: M.
        max_curvature: gamma in (0, 1).

    Returns:
        ``(a, b)``, each (..., M, K) float64.
    """
    k = torch.arange(1, n_modes + 1, dtype=torch.float64, device=raw.device)
    c = raw.to(torch.float64).reshape(*raw.shape[:-1], n_steps, n_modes, 2)
    r = (k * k * torch.sqrt(c[..., 0] ** 2 + c[..., 1] ** 2 + 1e-24)).sum(-1, keepdim=True)
    scale = max_curvature * torch.tanh(r) / r
    return c[..., 0] * scale, c[..., 1] * scale


def potential_gradient(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""X(W) of the module docstring: Hermitian traceless, commuting with W.

    Arguments:
        w: SU(N) matrices (..., N, N), complex128.
        a, b: Coefficients (..., K), float64.

    Returns:
        Shape (..., N, N), complex128, eigenvalues phi'(theta_j) - mean.
    """
    n = w.shape[-1]
    x = torch.zeros_like(w)
    wk = w
    for k in range(1, a.shape[-1] + 1):
        if k > 1:
            wk = wk @ w
        ak = a[..., k - 1, None, None].to(w.dtype)
        bk = b[..., k - 1, None, None].to(w.dtype)
        # -a_k (W^k - W^-k)/(2i) + b_k (W^k + W^-k)/2, with W^-k = (W^k)^+
        x = x + k * ((0.5j * ak + 0.5 * bk) * wk + (-0.5j * ak + 0.5 * bk) * wk.mH)
    tr = torch.diagonal(x, dim1=-2, dim2=-1).sum(-1) / n
    return x - tr[..., None, None] * torch.eye(n, dtype=w.dtype, device=w.device)


def _sinc(x: torch.Tensor) -> torch.Tensor:
    """sin(x)/x (1 at 0)."""
    return torch.sinc(x / math.pi)


# The eigenphase arithmetic below keeps the eigenvalue, pair and mode axes *first* and the
# batch axes last ("batch-last"): every reduction over those short axes is then a sum of
# contiguous slabs, and broadcasting a coefficient over the eigenvalues reduces over a
# middle axis with contiguous inner data in the backward pass (several times faster on a
# CPU than reducing over a trailing axis of length 2 or 3).


def _derivatives(theta: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """phi'(theta_j) and phi''(theta_j), each (N, ...), for eigenphases (N, ...) and
    coefficients (K, ...) (batch-last)."""
    shape = (-1,) + (1,) * theta.dim()
    k = torch.arange(1, a.shape[0] + 1, dtype=theta.dtype, device=theta.device).view(shape)
    kt = k * theta
    c, s = torch.cos(kt), torch.sin(kt)
    a, b = a[:, None], b[:, None]
    return (k * (b * c - a * s)).sum(0), -(k * k * (a * c + b * s)).sum(0)


def _step_density(
    theta: torch.Tensor, a: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`step_density` batch-last: theta (N, ...), a and b (K, ...); returns
    theta' (N, ...), the log-Jacobian (...) and the log chord ratios (P, ...)."""
    n = theta.shape[0]
    d1, d2 = _derivatives(theta, a, b)
    one_d2 = 1.0 + d2
    single = torch.log(one_d2).sum(0) + torch.log((1.0 / one_d2).mean(0))
    i, j = pair_indices(n, theta.device)
    t_i = theta.index_select(0, i)
    diff = t_i - theta.index_select(0, j)
    h = 0.5 * (torch.remainder(diff + math.pi, 2 * math.pi) - math.pi)  # in [-pi/2, pi/2)
    mid = t_i - h
    shape = (-1,) + (1,) * theta.dim()
    k = torch.arange(1, a.shape[0] + 1, dtype=theta.dtype, device=theta.device).view(shape)
    km, kh = k * mid, k * h
    delta = (k * k * (-a[:, None] * torch.cos(km) - b[:, None] * torch.sin(km)) * _sinc(kh)).sum(0)
    r = 1.0 + delta
    log_chord = torch.log(r) + torch.log(_sinc(h * r)) - torch.log(_sinc(h))
    theta_new = theta + d1 - d1.mean(0, keepdim=True)
    return theta_new, single + 2.0 * log_chord.sum(0), log_chord


def step_density(
    theta: torch.Tensor, a: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""One step on eigenphases: ``(theta', log-Jacobian, log chord ratios)``.

    Arguments:
        theta: Eigenphases (..., N), float64 (any order, any branch; sum 0 mod 2 pi).
        a, b: Coefficients (..., K), float64, with sum_k k^2 |(a_k, b_k)| < 1.

    Returns:
        theta' (..., N) (same branch as theta, unwrapped); the log-Jacobian relative to
        Haar (...), float64; log |sin((theta'_i - theta'_j)/2) / sin((theta_i - theta_j)/2)|
        for the pairs i < j of :func:`flowplug.plugins.flow_sun.pair_indices`, (..., P).
    """
    out, ld, lc = _step_density(theta.movedim(-1, 0), a.movedim(-1, 0), b.movedim(-1, 0))
    return out.movedim(0, -1), ld, lc.movedim(0, -1)


def _newton_update(theta: torch.Tensor, target: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """-(1 + P D)^{-1} (theta + P phi'(theta) - target) (Sherman-Morrison), batch-last:
    theta and target (N, ...), a and b (K, ...)."""
    d1, d2 = _derivatives(theta, a, b)
    g = theta + d1 - d1.mean(0, keepdim=True) - target
    # J = A + u d^T with A = 1 + D, u = -1/N, d = phi''
    inv_a = 1.0 / (1.0 + d2)
    ag = inv_a * g
    n = theta.shape[0]
    corr = (d2 * ag).sum(0, keepdim=True) / (n - (d2 * inv_a).sum(0, keepdim=True))
    return -(ag + inv_a * corr)


def _dsinc(x: torch.Tensor) -> torch.Tensor:
    """d/dx (sin x / x) = (cos x - sin x / x) / x, by its Taylor series where |x| < 0.2."""
    small = x.abs() < 0.2
    xs = torch.where(small, torch.ones_like(x), x)
    x2 = x * x
    series = -x * (1 / 3 - x2 * (1 / 30 - x2 * (1 / 840 - x2 * (1 / 45360 - x2 * (1 / 3991680)))))
    return torch.where(small, series, (torch.cos(xs) - torch.sin(xs) / xs) / xs)


class _StepRecord:
    """What the backward pass of one step needs: its trigonometric tables and intermediate
    values (batch-last, as in :func:`_step_density`)."""

    __slots__ = ("a", "b", "c", "cm", "d2", "e", "h", "r", "s", "sh", "shr", "sk", "sm", "tk")
    a: torch.Tensor  # coefficients (K, 1, M)
    b: torch.Tensor
    c: torch.Tensor  # cos(k theta), sin(k theta): (K, N, M)
    s: torch.Tensor
    d2: torch.Tensor  # phi''(theta) (N, M) and e = 1 / (1 + phi'')
    e: torch.Tensor
    h: torch.Tensor  # half differences of the pairs (P, M), r = 1 + Delta, sinc(h), sinc(h r)
    r: torch.Tensor
    sh: torch.Tensor
    shr: torch.Tensor
    cm: torch.Tensor  # cos(k mid), sin(k mid), sinc(k h), k^2 (-a cos(k mid) - b sin(k mid)): (K, P, M)
    sm: torch.Tensor
    sk: torch.Tensor
    tk: torch.Tensor


def _step_forward(
    theta: torch.Tensor, a: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, _StepRecord]:
    """:func:`_step_density` without autograd, keeping the tables for :func:`_step_backward`:
    theta (N, M), a and b (K, M) -> theta' (N, M), log-Jacobian (M,), log chord ratios (P, M)."""
    n, kk = theta.shape[0], a.shape[0]
    k = torch.arange(1, kk + 1, dtype=theta.dtype, device=theta.device).view(-1, 1, 1)
    rec = _StepRecord()
    kt = k * theta
    c, s = torch.cos(kt), torch.sin(kt)
    a3, b3 = a[:, None], b[:, None]
    d1 = (k * (b3 * c - a3 * s)).sum(0)
    d2 = -(k * k * (a3 * c + b3 * s)).sum(0)
    e = 1.0 / (1.0 + d2)
    single = -torch.log(e).sum(0) + torch.log(e.mean(0))
    i, j = pair_indices(n, theta.device)
    t_i = theta.index_select(0, i)
    h = 0.5 * (torch.remainder(t_i - theta.index_select(0, j) + math.pi, 2 * math.pi) - math.pi)
    mid = t_i - h
    km, kh = k * mid, k * h
    cm, sm, sk = torch.cos(km), torch.sin(km), _sinc(kh)
    tk = k * k * (-a3 * cm - b3 * sm)
    r = 1.0 + (tk * sk).sum(0)
    shr, sh = _sinc(h * r), _sinc(h)
    log_chord = torch.log(r) + torch.log(shr) - torch.log(sh)
    theta_new = theta + d1 - d1.mean(0, keepdim=True)
    rec.c, rec.s, rec.d2, rec.e, rec.h, rec.r, rec.sh, rec.shr = c, s, d2, e, h, r, sh, shr
    rec.cm, rec.sm, rec.sk, rec.tk, rec.a, rec.b = cm, sm, sk, tk, a3, b3
    return theta_new, single + 2.0 * log_chord.sum(0), log_chord, rec


def _step_backward(
    rec: _StepRecord, g_new: torch.Tensor | None, g_ld: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vector-Jacobian product of one step (:func:`_step_forward`): gradients g_new (N, M) of
    theta' (or None) and g_ld (M,) of the log-Jacobian -> gradients of theta (N, M), a and b (K, M).

    theta' = theta + P phi'(theta), so d theta'/d theta = 1 + P diag(phi''); the log-Jacobian is
    sum_j log(1 + phi''_j) + log mean_j 1/(1 + phi''_j) + 2 sum_pairs [log r + log sinc(h r)
    - log sinc(h)] with r = 1 + Delta(mid, h), h and mid the half difference and midpoint of a
    pair (d h = (d theta_i - d theta_j)/2, d mid = (d theta_i + d theta_j)/2)."""
    c, s, a3, b3 = rec.c, rec.s, rec.a, rec.b
    n, kk = c.shape[1], c.shape[0]
    k = torch.arange(1, kk + 1, dtype=c.dtype, device=c.device).view(-1, 1, 1)
    # single-eigenvalue terms, through phi''
    e = rec.e
    g_d2 = g_ld * (e - e * e / e.sum(0, keepdim=True))
    w2 = (k * k) * g_d2
    ga = -(w2 * c).sum(1)
    gb = -(w2 * s).sum(1)
    g_theta = g_d2 * (k * k * k * (a3 * s - b3 * c)).sum(0)  # d phi''/d theta = phi'''
    if g_new is not None:
        u = g_new - g_new.mean(0, keepdim=True)  # gradient of phi'(theta), through P
        g_theta = g_theta + g_new + u * rec.d2
        ku = k * u
        ga = ga - (ku * s).sum(1)
        gb = gb + (ku * c).sum(1)
    # pair terms
    h, r = rec.h, rec.r
    g_lc = 2.0 * g_ld
    # sinc' at h r, h and k h in one evaluation; (log sinc)' = sinc' / sinc (sinc > 0 for |x| < pi)
    ds = _dsinc(torch.cat([(h * r)[None], h[None], k * h]))
    dls, dls_h, dsk = ds[0] / rec.shr, ds[1] / rec.sh, ds[2:]
    g_r = g_lc * (1.0 / r + h * dls)
    g_h = g_lc * (r * dls - dls_h) + g_r * (rec.tk * k * dsk).sum(0)
    cm, sm, sk = rec.cm, rec.sm, rec.sk
    g_mid = g_r * (k * k * k * (a3 * sm - b3 * cm) * sk).sum(0)
    w3 = (k * k) * sk * g_r
    ga = ga - (w3 * cm).sum(1)
    gb = gb - (w3 * sm).sum(1)
    i, j = pair_indices(n, c.device)
    g_theta = g_theta.index_add(0, i, 0.5 * (g_mid + g_h)).index_add(0, j, 0.5 * (g_mid - g_h))
    return g_theta, ga, gb


def _implicit_backward(rec: _StepRecord, g_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients through theta = step^{-1}(target; a, b) (implicit function theorem): g_prev
    (N, M) of theta -> gradients of target (N, M), a and b (K, M). With J = 1 + P D
    (D = diag phi''), y = J^{-T} g_prev solves y_j (1 + phi''_j) = g_j + phi''_j mean(y),
    mean(y) = sum(g e) / sum(e) with e = 1/(1 + phi''); the parameters get -y^T d step/d(a, b)."""
    e, d2, c, s = rec.e, rec.d2, rec.c, rec.s
    ybar = (g_prev * e).sum(0, keepdim=True) / e.sum(0, keepdim=True)
    y = (g_prev + d2 * ybar) * e
    k = torch.arange(1, c.shape[0] + 1, dtype=c.dtype, device=c.device).view(-1, 1, 1)
    ku = k * (y - y.mean(0, keepdim=True))
    return y, (ku * s).sum(1), -(ku * c).sum(1)


def _eigensystem_axes_first(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal eigenvectors (N, N, M) and eigenphases (N, M) of SU(N) matrices (N, N, M):
    closed form for N = 2, 3 (:func:`flowplug.groups.su_eigensystem`), the Cayley transform and
    ``torch.linalg.eigh`` otherwise (:func:`flowplug.plugins.flow_sun.eigen_phases`)."""
    n = w.shape[0]
    if n in (2, 3):
        return groups._su_eigensystem_axes_first(w)
    vec, _, _ = eigen_phases(w.permute(2, 0, 1))
    vec = vec.permute(1, 2, 0)
    theta = torch.angle((vec.conj() * groups.matmul_axes_first(w, vec)).sum(0))
    return vec, theta


class _StoutSpectral(torch.autograd.Function):
    """The left factor G = V diag(e^{i s}) V^+ and the log-det of :func:`stout_map`, on matrices
    stored matrix-axes-first, with a hand-written first-order backward.

    forward(w (N, N, M) complex128, a, b (steps, K, M) float64, inverse) -> (G (N, N, M), logdet (M,)).

    Backward, with B = V^+ (dL/dG) V (torch's convention for complex gradients): the shifts s get
    Re(conj(B_jj) i e^{i s_j}); the phases theta get the vector-Jacobian products of the steps
    (:func:`_step_backward`, :func:`_implicit_backward`); and
    dL/dW = V [offdiag(conj(Gamma) o B) + diag(i lambda_j dL/dtheta_j)] V^+ with
    Gamma_jk = (C_jk - e^{i s_j}) conj(lambda_k), the first-order perturbation theory of G of
    :func:`flowplug.plugins.flow_sun.spectral_left_factor` (C_jk the chord ratio times
    e^{i (s_j + s_k)/2}, continuous at coincident eigenvalues)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, inverse: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        vec, theta = _eigensystem_axes_first(w)
        n_steps, n = a.shape[0], w.shape[0]
        logdet = torch.zeros(theta.shape[1:], dtype=theta.dtype, device=theta.device)
        log_chord = torch.zeros((n * (n - 1) // 2, *theta.shape[1:]), dtype=theta.dtype, device=theta.device)
        records = []
        out = theta
        if not inverse:
            for m in range(n_steps):
                out, ld, lc, rec = _step_forward(out, a[m], b[m])
                logdet, log_chord = logdet + ld, log_chord + lc
                records.append(rec)
        else:
            for m in reversed(range(n_steps)):
                prev = out
                for it in range(NEWTON_ITERATIONS):
                    upd = _newton_update(prev, out, a[m], b[m])
                    prev = prev + upd
                    if it % 4 == 3 and (not upd.numel() or float(upd.abs().amax()) < 1e-14):
                        break
                converged = _newton_update(prev, out, a[m], b[m]).abs().amax(0) < 1e-10
                _, ld, lc, rec = _step_forward(prev, a[m], b[m])
                # an unsolved step gets a NaN log-det: every Metropolis test rejects it
                ld = torch.where(converged, ld, torch.full_like(ld, math.nan))
                logdet, log_chord, out = logdet - ld, log_chord - lc, prev
                records.append(rec)
        shift = out - theta
        e = torch.complex(-2 * torch.sin(0.5 * shift) ** 2, torch.sin(shift))  # e^{i s} - 1, no cancellation
        g = groups.matmul_axes_first(vec * e[None], vec.conj().transpose(0, 1))
        g = g + torch.eye(n, dtype=g.dtype, device=g.device).view(n, n, *([1] * (g.dim() - 2)))
        ctx.records, ctx.inverse = records, inverse  # type: ignore[attr-defined]
        ctx.save_for_backward(vec, theta, shift, log_chord)
        return g, logdet

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, g_g: torch.Tensor | None, g_ld: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        if torch.is_grad_enabled():
            # create_graph = True: the saved tables carry no graph, so a derivative of this
            # backward would silently miss terms; refuse instead
            raise RuntimeError(
                "stout_map (the sun-stout layer) has a first-order hand-written backward: double backward "
                "(create_graph=True, Hessians) is not supported"
            )
        vec, theta, shift, log_chord = ctx.saved_tensors  # type: ignore[attr-defined]
        records, inverse = ctx.records, ctx.inverse  # type: ignore[attr-defined]
        n = vec.shape[0]
        vh = vec.conj().transpose(0, 1)
        # (the gradient arrives in the caller's layout: contiguous rows make every product below fast)
        g_g = torch.zeros_like(vec) if g_g is None else g_g.contiguous()
        if g_ld is None:
            g_ld = torch.zeros_like(theta[0])
        bmat = groups.matmul_axes_first(groups.matmul_axes_first(vh, g_g), vec)
        bd = torch.diagonal(bmat, 0, 0, 1).movedim(-1, 0)  # (N, M)
        g_shift = bd.imag * torch.cos(shift) - bd.real * torch.sin(shift)
        g_out = g_shift
        ga, gb = [], []
        for rec in reversed(records):
            if not inverse:
                g_out, ga_m, gb_m = _step_backward(rec, g_out, g_ld)
            else:
                # theta_prev = step^{-1}(target): its log-Jacobian enters with a minus sign
                g_prev_ld, ga_ld, gb_ld = _step_backward(rec, None, -g_ld)
                g_out, ga_im, gb_im = _implicit_backward(rec, g_out + g_prev_ld)
                ga_m, gb_m = ga_ld + ga_im, gb_ld + gb_im
            ga.append(ga_m)
            gb.append(gb_m)
        if not inverse:  # gradients in step order
            ga.reverse()
            gb.reverse()
        g_theta = g_out - g_shift
        # Daleckii-Krein coefficients off the diagonal, the phase gradients on it
        i, j = pair_indices(n, vec.device)
        half = 0.5 * (shift.index_select(0, i) + shift.index_select(0, j))
        cij = torch.polar(torch.exp(log_chord), half)  # (P, M)
        lam = torch.polar(torch.ones_like(theta), theta)  # (N, M)
        cmat = torch.zeros_like(bmat)
        cmat[i, j] = cij
        cmat[j, i] = cij
        gamma = (cmat - torch.polar(torch.ones_like(shift), shift)[:, None]) * lam.conj()[None]
        amat = gamma.conj() * bmat
        eye = torch.eye(n, dtype=torch.bool, device=vec.device).view(n, n, *([1] * (amat.dim() - 2)))
        diag = torch.diag_embed((1j * lam * g_theta).movedim(0, -1), 0, 0, 1)
        amat = torch.where(eye, diag, amat)
        g_w = groups.matmul_axes_first(groups.matmul_axes_first(vec, amat), vh)
        return g_w, torch.stack(ga), torch.stack(gb), None


def stout_map(
    w: torch.Tensor,
    raw: torch.Tensor,
    n_modes: int,
    n_steps: int,
    *,
    max_curvature: float = 0.9,
    inverse: bool = False,
    left: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Conjugation-equivariant stout-smearing flow on SU(N) matrices (module docstring).

    Arguments:
        w: SU(N) matrices, shape (..., N, N), complex128.
        raw: Unconstrained parameters (..., 2 K M) (:func:`stout_coefficients`); zeros give
            the identity.
        n_modes: K, Fourier modes of the potential.
        n_steps: M, steps per application.
        max_curvature: gamma in (0, 1): bound on |phi''| (invertibility margin).
        inverse: Apply the inverse map.
        left: Return the left factor G = w' w^+ instead of w' (the coupling layer applies it
            to the link, U' = G U, which keeps unitarity to rounding through any depth).

    Returns:
        ``(w', logdet)``: w' (..., N, N) complex128 in SU(N) (up to rounding); logdet (...)
        float64, log of the Jacobian of the applied map relative to Haar measure (for the
        inverse, minus the forward log-det at the returned point). Finite, with finite
        gradients, at every input, degenerate spectra and centre elements included.

    Raises:
        ValueError: on a wrong number of parameters or ``max_curvature`` outside (0, 1).

    An inverse whose Newton iteration does not converge (not expected: each step is the
    gradient of a strictly convex function) returns a NaN log-det for that matrix, which
    every Metropolis test of :mod:`flowplug.metropolis` rejects.

    References:
        Morningstar & Peardon, hep-lat/0311018 (stout step); Boyda et al.,
        arXiv:2008.05456, eq. 16 (Weyl density); Nagai & Tomiya, arXiv:2103.11965.
    """
    if raw.shape[-1] != n_stout_params(n_modes, n_steps):
        raise ValueError(
            f"stout_map with {n_modes} modes and {n_steps} steps needs {n_stout_params(n_modes, n_steps)} "
            f"parameters per matrix; found {raw.shape[-1]}"
        )
    if not 0.0 < max_curvature < 1.0:
        raise ValueError(f"stout_map: max_curvature must be in (0, 1); found {max_curvature}")
    n = w.shape[-1]
    batch = w.shape[:-2]
    wf = w.reshape(-1, n, n).permute(1, 2, 0).contiguous()
    g, logdet = _stout_left_axes_first(
        wf, raw.reshape(-1, raw.shape[-1]), n_modes, n_steps, max_curvature=max_curvature, inverse=inverse
    )
    g = g.permute(2, 0, 1).contiguous().view(*batch, n, n)
    return (g if left else g @ w), logdet.reshape(batch)


def _stout_left_axes_first(
    w: torch.Tensor, raw: torch.Tensor, n_modes: int, n_steps: int, *, max_curvature: float, inverse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The left factor and log-det of :func:`stout_map` for matrices stored matrix-axes-first:
    w (N, N, M) complex128, raw (M, 2 K steps) -> G (N, N, M), logdet (M,) float64."""
    # coefficients (steps, K, M), batch last
    a, b = _Coefficients.apply(raw, n_modes, n_steps, max_curvature)
    out: tuple[torch.Tensor, torch.Tensor] = _StoutSpectral.apply(w, a, b, inverse)
    return out


class _Coefficients(torch.autograd.Function):
    """:func:`stout_coefficients` batch-last, with a hand-written backward:
    raw (M, 2 K steps) -> a, b (steps, K, M) float64.

    a = c_0 s(r), b = c_1 s(r) with s = gamma tanh(r) / r and r = sum_k k^2 rho_k,
    rho_k = sqrt(c_0k^2 + c_1k^2 + 1e-24); the backward uses ds/dr = gamma ((1 - tanh^2 r) r -
    tanh r) / r^2, by its Taylor series gamma (-2 r / 3 + 8 r^3 / 15) below r = 1e-3."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, raw: torch.Tensor, n_modes: int, n_steps: int, gamma: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        c = raw.to(torch.float64).t().reshape(n_steps, n_modes, 2, -1)
        c0, c1 = c[:, :, 0], c[:, :, 1]
        k2 = torch.arange(1, n_modes + 1, dtype=torch.float64, device=raw.device).square().view(-1, 1)
        rho = torch.sqrt(c0 * c0 + c1 * c1 + 1e-24)
        r = (k2 * rho).sum(1, keepdim=True)
        t = torch.tanh(r)
        scale = gamma * t / r
        ctx.save_for_backward(c0, c1, rho, r, t, scale, k2)
        ctx.gamma, ctx.raw_dtype = gamma, raw.dtype  # type: ignore[attr-defined]
        return c0 * scale, c1 * scale

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, g_a: torch.Tensor | None, g_b: torch.Tensor | None
    ) -> tuple[torch.Tensor, None, None, None]:
        if torch.is_grad_enabled():
            raise RuntimeError(
                "stout_map has a first-order hand-written backward: double backward (create_graph=True, "
                "Hessians) is not supported"
            )
        c0, c1, rho, r, t, scale, k2 = ctx.saved_tensors  # type: ignore[attr-defined]
        gamma = ctx.gamma  # type: ignore[attr-defined]
        g_a = torch.zeros_like(c0) if g_a is None else g_a
        g_b = torch.zeros_like(c1) if g_b is None else g_b
        small = r < 1e-3
        rs = torch.where(small, torch.ones_like(r), r)
        ds = torch.where(small, r * (-2.0 / 3.0 + r * r * (8.0 / 15.0)), ((1 - t * t) * rs - t) / (rs * rs)) * gamma
        g_r = (g_a * c0 + g_b * c1).sum(1, keepdim=True) * ds * k2 / rho
        g_c = torch.stack([g_a * scale + g_r * c0, g_b * scale + g_r * c1], 2)
        return g_c.reshape(-1, g_c.shape[-1]).t().to(ctx.raw_dtype), None, None, None  # type: ignore[attr-defined]


#: tr P / N of every plaquette (:func:`flowplug.gauge.plaquette_traces`, where the machinery of the
#: features lives: the Wilson action uses it too)
plaquette_traces = gauge.plaquette_traces


class _TracesAndRows(torch.autograd.Function):
    """:class:`flowplug.gauge.PlaquetteTraces` and a gather of link rows in one node: the features and the
    active loops' links of a :class:`SUNStoutCoupling`, whose gradients go into one tensor.

    forward(links (B, d V, N, N), index (4, P), dtype, rows (R,) long) -> (traces (B, P) in
    ``dtype``, ``links.index_select(1, rows)`` (B, R, N, N)). The backward adds the rows'
    gradient into the traces' gradient of the links in place: one full-size gradient per layer
    instead of two and their sum (each a fresh allocation of the size of the gauge field)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        links: torch.Tensor,
        index: torch.Tensor,
        dtype: torch.dtype,
        rows: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tr = gauge.PlaquetteTraces.forward(ctx, links, index, dtype, False)  # no double backward here
        ctx.rows = rows  # type: ignore[attr-defined]
        return tr, links.index_select(1, rows)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor | None, g_rows: torch.Tensor | None
    ) -> tuple[torch.Tensor, None, None, None]:
        if torch.is_grad_enabled():
            # create_graph = True: the gathered rows carry no graph (and the stout map refuses too)
            raise RuntimeError(
                "the sun-stout features have a first-order hand-written backward: double backward "
                "(create_graph=True, Hessians) is not supported; use the sun-spectral layer"
            )
        rows = ctx.rows  # type: ignore[attr-defined]
        if grad is None:  # traces unused: the rows' gradient alone (out of place, vmappable)
            b, n_links, n, _ = ctx.in_shape  # type: ignore[attr-defined]
            ref = ctx.saved_tensors[-1]  # type: ignore[attr-defined]
            out = torch.zeros((b, n_links, n, n), dtype=ctx.in_dtype, device=ref.device)  # type: ignore[attr-defined]
            return (out if g_rows is None else out.index_add(1, rows, g_rows)), None, None, None
        # a fresh tensor derived from the gradient: in place is safe, also when vmapped
        out = gauge.PlaquetteTraces.backward(ctx, grad)[0]
        if g_rows is not None:
            out.index_add_(1, rows, g_rows)
        return out, None, None, None


class _SharedTraces:
    """What a :class:`SUNStoutCoupling` leaves for its output, for the next layer: the traces of its
    frozen plaquettes (the output's links there are bitwise its input's), and what identifies the
    output they belong to (its autograd state and version counter at the time)."""

    __slots__ = ("frozen_at", "grad_fn", "key", "lattice", "ref", "requires_grad", "traces", "version")
    traces: torch.Tensor  # (B, planes V): tr P / N at the positions frozen_at, zero elsewhere
    frozen_at: torch.Tensor  # flat (plane, site) positions where ``traces`` holds values
    key: tuple[int, ...]  # the same positions, hashable
    lattice: tuple[int, ...]
    grad_fn: object
    requires_grad: bool
    version: int
    ref: weakref.ref[torch.Tensor]  # the output the traces belong to


#: the traces that sun-stout layers left for the next layer, by ``id`` of their output tensor: a
#: registry, not an attribute of the tensor (which ``torch.save`` would pickle, and
#: ``torch.load(weights_only=True)`` refuse); an entry goes when its tensor does
_SHARED: dict[int, _SharedTraces] = {}


def _forget(key: int, _: object) -> None:
    """Weak-reference callback: drop the registry entry of a tensor that is going."""
    _SHARED.pop(key, None)


def _shared_traces(x: torch.Tensor) -> _SharedTraces | None:
    """The traces that a :class:`SUNStoutCoupling` left for the tensor ``x`` it returned, or None.

    Arguments:
        x: Any tensor.

    Returns:
        The record (:class:`_SharedTraces`) while ``x`` is alive, whatever has happened to it
        since (the layers check its version counter and autograd state before use); None for
        a tensor no layer returned.
    """
    rec = _SHARED.get(id(x))
    return rec if rec is not None and rec.ref() is x else None


class SUNStoutCoupling(_SUNCoupling):
    r"""Gauge-equivariant coupling for SU(N) links by stout steps of the active loops.

    Masks and conditioner as :class:`flowplug.plugins.flow_gauge.SUNSpectralCoupling`
    (Re tr P / N and Im tr P / N of the frozen plaquettes, optionally of the frozen 1x2
    loops); the active loop P(x) of every updated link goes through :func:`stout_map`,
    P' = exp(i X) P, and U_mu'(x) = P' P^+ U_mu(x) = exp(i X) U_mu(x): a stout-smearing
    step of the link with a learned, site-dependent potential. Log-determinants are
    relative to product Haar measure. For speed, the features are the traces of the frozen
    plaquettes only (bitwise those of :func:`plaquette_traces` there; the conditioner masks
    the others to zero), the conditioner's last convolution runs on the updated sites
    only (strided along nu), and the four links of the active loops are gathered once; the
    weights and their names are those of the plain computation, so checkpoints written
    before load and define the same flow (to float rounding of the network).

    Shared traces: a layer leaves the traces of its frozen plaquettes for the tensor it returns
    (those links are its input's, bit for bit; kept in a registry beside the tensor, not on it,
    :func:`_shared_traces`), and the next ``sun-stout`` layer, forward or inverse, computes only
    the frozen plaquettes of its own that the previous one did not have (384 of 1280 in 4D) and
    takes the others: the same numbers as recomputing them (the traces are elementwise in the
    plaquettes), so the same maps and log-dets. Their gradients flow back through the layer
    that computed them, to links that no layer in between changed: derivatives with respect to
    the parameters and the flow's input are exact (to the summation order of float rounding).
    A derivative with respect to an intermediate tensor *between* two such layers
    (``autograd.grad`` with that non-leaf tensor as input) would miss those terms: pass
    ``x.clone()`` to the next layer for that, or set ``share_traces = False`` on the layer.
    The traces are taken only while the tensor's version counter and autograd state are those
    it had when the layer returned it (an in-place change or ``requires_grad_()`` stops it).

    Arguments:
        lattice: (L_0, ..., L_{d-1}), d = 2..4, even extents.
        field: ``"su2"``, ``"su3"`` (any ``"su<N>"``).
        index: Position in the flow (masking schedule).
        hidden: Hidden channels of the conditioner, default ``(8, 8)``.
        kernel_size: Odd kernel extent, default 3.
        n_modes: Fourier modes K of each step's potential, default 2.
        n_steps: Stout steps M per layer, default 2.
        max_curvature: Invertibility margin gamma in (0, 1), default 0.9.
        dtype: Conditioner dtype (``"float32"`` or ``"float64"``).
        mu, nu, offset, period: Override the masking schedule.
        init_scale: Scale of the network's initial output layer; 0 (default) starts as
            the identity.
        rectangles: Also condition on the frozen 1x2 loops (see ``SUNSpectralCoupling``).

    ``forward(U) -> (U', logdet)``, ``inverse(U') -> (U, logdet_inv)``: links of shape
    (B, d, L_0, ..., L_{d-1}, N, N) complex128, logdet shape (B,) float64.

    Raises:
        ConfigError: on a bad field kind, lattice or option.
        ShapeError: on an input of the wrong shape.
    """

    site_index: torch.Tensor  # buffers: flat indices of updated sites and their neighbours
    site_plus_mu: torch.Tensor
    site_plus_nu: torch.Tensor
    loop_links: torch.Tensor  # non-persistent: flat link indices of the active loops' four links
    frozen_at: torch.Tensor  # non-persistent: flat (plane, site) positions of the frozen plaquettes
    frozen_plaquettes: torch.Tensor  # non-persistent: their four links (4, n_frozen)
    #: take the frozen plaquettes' traces that the previous sun-stout layer computed (class docstring)
    share_traces: bool = True

    def __init__(
        self,
        *,
        lattice: Sequence[int],
        field: str = "su3",
        index: int = 0,
        hidden: Sequence[int] = (8, 8),
        kernel_size: int = 3,
        n_modes: int = 2,
        n_steps: int = 2,
        max_curvature: float = 0.9,
        dtype: str = "float32",
        mu: int | None = None,
        nu: int | None = None,
        offset: int | None = None,
        init_scale: float = 0.0,
        rectangles: bool = False,
        period: int | None = None,
    ) -> None:
        self.n = self._group(field, "SU(N) stout coupling")
        self.n_modes, self.n_steps = int(n_modes), int(n_steps)
        if self.n_modes < 1 or self.n_steps < 1:
            raise ConfigError(f"sun-stout needs n_modes >= 1 and n_steps >= 1; found {n_modes}, {n_steps}")
        if not 0.0 < float(max_curvature) < 1.0:
            raise ConfigError(f"sun-stout: max_curvature must be in (0, 1); found {max_curvature}")
        self.max_curvature = float(max_curvature)
        super().__init__(
            lattice,
            index,
            n_stout_params(self.n_modes, self.n_steps),
            hidden,
            kernel_size,
            dtype,
            mu,
            nu,
            offset,
            init_scale,
            rectangles,
            period,
        )
        flat = torch.arange(math.prod(self.lattice)).reshape(self.lattice)
        sites = self.sites.flatten().nonzero().flatten()
        self.register_buffer("site_index", sites)
        self.register_buffer("site_plus_mu", torch.roll(flat, -1, dims=self.mu).flatten()[sites])
        self.register_buffer("site_plus_nu", torch.roll(flat, -1, dims=self.nu).flatten()[sites])
        # flat link indices (direction a, site y) -> a V + y of U_mu(x), U_nu(x+mu), U_mu(x+nu),
        # U_nu(x) for the updated sites x (not stored with the weights)
        vol = math.prod(self.lattice)
        quad = [self.mu * vol + sites, self.nu * vol + self.site_plus_mu]
        quad += [self.mu * vol + self.site_plus_nu, self.nu * vol + sites]
        self.register_buffer("loop_links", torch.cat(quad), persistent=False)
        # the frozen plaquettes (the only features the conditioner reads): flat positions
        # (plane, site) and the four links of each (:func:`flowplug.gauge.plaquette_index`)
        frozen_at = self.frozen.flatten().nonzero().flatten()
        self.register_buffer("frozen_at", frozen_at, persistent=False)
        self.register_buffer(
            "frozen_plaquettes", gauge.plaquette_index(self.lattice, frozen_at.device)[:, frozen_at], persistent=False
        )
        self._frozen_key = tuple(frozen_at.tolist())
        # per (previous layer's frozen positions, device): which traces to take and which to compute
        self._share_plans: dict[tuple[object, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _share_plan(self, shared: _SharedTraces) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Positions of this layer's frozen plaquettes that ``shared`` holds (taken), those it does
        not (computed) and the four links of the latter (4, n) (:func:`flowplug.gauge.plaquette_index`)."""
        prev_frozen_at = shared.frozen_at
        key = (shared.key, self.frozen_at.device)
        plan = self._share_plans.get(key)
        if plan is None:
            mine = self.frozen_at
            held = torch.isin(mine, prev_frozen_at.to(mine.device))
            new_at = mine[~held]
            plan = (mine[held], new_at, gauge.plaquette_index(self.lattice, mine.device)[:, new_at])
            self._share_plans[key] = plan
        return plan

    def _frozen_traces(self, u: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """tr P / N of the frozen plaquettes at their flat (plane, site) positions, zero elsewhere,
        (B, planes V) in ``dtype``: bitwise those of :func:`plaquette_traces` there, computed here or
        taken from the previous layer's output (:class:`_SharedTraces`); and the four links of the
        active loops, ``u.flatten(1, d).index_select(1, loop_links)``, gathered in the same node
        (:class:`_TracesAndRows`)."""
        flat = u.flatten(1, 1 + self.d)
        size = self.d * (self.d - 1) // 2 * math.prod(self.lattice)
        shared = _shared_traces(u) if self.share_traces else None
        if (
            shared is not None
            and shared.version == u._version
            and shared.grad_fn is u.grad_fn
            and shared.requires_grad == u.requires_grad
            and shared.lattice == self.lattice
            and shared.traces.dtype == dtype
            and shared.traces.device == u.device
            and tuple(shared.traces.shape) == (u.shape[0], size)
        ):
            taken_at, new_at, new_plaquettes = self._share_plan(shared)
            taken = shared.traces.index_select(1, taken_at)
            tr = taken.new_zeros(u.shape[0], size).index_copy(1, taken_at, taken)
            if not new_at.numel():
                return tr, flat.index_select(1, self.loop_links)
            new, rows = _TracesAndRows.apply(flat, new_plaquettes, dtype, self.loop_links)
            return tr.index_copy(1, new_at, new), rows
        tr_frozen, rows = _TracesAndRows.apply(flat, self.frozen_plaquettes, dtype, self.loop_links)
        return tr_frozen.new_zeros(u.shape[0], size).index_copy(1, self.frozen_at, tr_frozen), rows

    def _share(self, out: torch.Tensor, traces: torch.Tensor) -> None:
        """Leave the traces of the frozen plaquettes for the next layer (:func:`_shared_traces`)."""
        if not self.share_traces:
            return
        key = id(out)
        rec = _SharedTraces()
        rec.traces, rec.frozen_at, rec.key, rec.lattice = traces, self.frozen_at, self._frozen_key, self.lattice
        rec.grad_fn, rec.requires_grad, rec.version = out.grad_fn, out.requires_grad, out._version
        # the entry goes when the tensor does (before its id can be reused)
        rec.ref = weakref.ref(out, functools.partial(_forget, key))
        _SHARED[key] = rec

    def _map(self, u: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(u)
        u = u.to(torch.complex128)
        d = self.d
        # conditioner features in the network's precision (complex64 for a float32 network):
        # the frozen links are bitwise the same in the forward and inverse maps, so the
        # parameters are too, and the map stays exactly invertible
        feat_dtype = torch.complex128 if self.net.dtype == torch.float64 else torch.complex64
        # traces of the frozen plaquettes only (the others are masked out), bitwise those of
        # :func:`plaquette_traces` there, zero elsewhere
        n_planes = d * (d - 1) // 2
        traces, rows = self._frozen_traces(u, feat_dtype)
        tr = traces.view(u.shape[0], n_planes, *self.lattice)
        flat = u.flatten(1, 1 + d)  # (B, d V, N, N): link of direction a at site y is a V + y
        # active loops on the updated sites only, U_mu(x) U_nu(x+mu) U_mu(x+nu)^+ U_nu(x)^+,
        # from one gather of their four links
        link, u_nu_xmu, u_mu_xnu, u_nu_x = rows.unflatten(1, (4, -1)).unbind(1)
        staple = u_nu_xmu @ (u_nu_x @ u_mu_xnu).mH  # one conjugate transpose instead of two
        rect = None
        if self.rectangles:
            # 1x2 loop based at x - nu, tr(U_mu(x-nu) U_nu(x-nu+mu) U_nu(x+mu) (U_nu(x-nu) U_nu(x)
            # U_mu(x+nu))^+) / N, formed without its middle link U_mu(x): on S the layer updates
            # it, and P(x - nu) P(x) cancels it only to rounding (in complex64 the features, so
            # the parameters, of the forward and inverse maps would differ at 1e-7)
            links = u.unbind(1)
            f_mu, f_nu = links[self.mu].to(feat_dtype), links[self.nu].to(feat_dtype)
            ax_mu, ax_nu = 1 + self.mu, 1 + self.nu
            nu_below = torch.roll(f_nu, 1, dims=ax_nu)  # U_nu(x - nu)
            top = torch.roll(f_mu, 1, dims=ax_nu) @ torch.roll(nu_below, -1, dims=ax_mu)
            top = top @ torch.roll(f_nu, -1, dims=ax_mu)
            back = nu_below @ f_nu @ torch.roll(f_mu, -1, dims=ax_nu)
            # tr(top back^+) as a product per matrix (a 1 x N^2 by N^2 x 1 product: torch's small
            # batched products loop over the matrices alike in any batch; an elementwise product and
            # sum over the whole tensor rounds its last entries, which depend on the batch size, in
            # a scalar tail), and the 1/N in real arithmetic (complex division by a scalar rounds
            # differently there too)
            rows = back.conj().flatten(-2).unsqueeze(-2)  # (..., 1, N^2)
            r = (rows @ top.flatten(-2).unsqueeze(-1))[..., 0, 0]
            rect = (r.real / self.n, r.imag / self.n)
        # the network's last convolution runs on the updated sites only
        if d <= 3:
            # the gathered network at the updated sites (ConvNet.forward_at): a configuration gets
            # bitwise the same parameters in any batch (torch's 2D/3D convolutions round by the
            # batch size, so an inverse of one configuration of a batch missed it by 1e-7)
            params = self._condition(tr.real, tr.imag, rect, sites=self.site_index).flatten(0, 1)
        else:
            params = self._condition(tr.real, tr.imag, rect, stripe=True).flatten(0, d)  # (B sites, n_params)
        # the map on the loops stored matrix-axes-first, (N, N, B sites), in the order of the parameters
        n, batch = self.n, u.shape[0]
        loop = (link @ staple).permute(2, 3, 0, 1).reshape(n, n, -1).contiguous()
        g, ld = _stout_left_axes_first(
            loop, params, self.n_modes, self.n_steps, max_curvature=self.max_curvature, inverse=inverse
        )
        updated = g.view(n, n, batch, -1).permute(2, 3, 0, 1) @ link  # = P' P^+ U_mu(x): G commutes with P
        out = flat.index_copy(1, self.loop_links[: updated.shape[1]], updated).view_as(u)
        self._share(out, traces)
        return out, ld.view(batch, -1).sum(1)
