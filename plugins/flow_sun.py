r"""Conjugation-equivariant flows on single SU(N) matrices through their eigenvalues.

A map W -> W' = V diag(e^{i theta'}) V^{-1}, where W = V diag(e^{i theta}) V^{-1} and
theta' depends on the spectrum only, commutes with conjugation: (X W X^+)' = X W' X^+
(Boyda et al., arXiv:2008.05456, section III). It is well defined (independent of
the order and phases of the eigenvectors) when theta -> theta' is equivariant under
permutations of the eigenvalues and keeps det W' = 1.

Construction used here
    The spectrum of W in SU(N) has exactly one representative in the *canonical cell*
    (Weyl alcove) A = {theta_1 >= ... >= theta_N >= theta_1 - 2 pi, sum theta = 0}
    (:func:`alcove_phases`). A is an (N-1)-simplex; the gaps
    g_i = theta_i - theta_{i+1} (i < N), g_N = theta_N - theta_1 + 2 pi are its
    barycentric coordinates times 2 pi, and stick-breaking u_k = t_k / (1 - t_1 - ... - t_{k-1})
    (t = g / 2 pi) maps it onto the cube [0, 1]^{N-1}. Each u_k goes through a monotone
    rational-quadratic spline of [0, 1] onto itself (parameters from the conditioner);
    mapping back gives theta' in A. Because the map sends A onto A and is applied to the
    sorted spectrum, it is permutation equivariant by construction, and sum theta' = 0.
    For SU(2), A = {(a, -a): a in [0, pi]} and u = a / pi.

Density
    Haar measure in spectral coordinates is dmu = c J(theta) d^{N-1}theta dV with the
    Weyl factor J(theta) = prod_{i<j} |e^{i theta_i} - e^{i theta_j}|^2 (Weyl integration
    formula; Boyda et al. eq. 16), so the log-determinant of W -> W' relative to Haar is
    log|d theta'/d theta| + log J(theta') - log J(theta), where the first term collects
    the spline derivatives and the stick-breaking Jacobians (the linear maps between
    theta, g and t cancel).

Evaluation without dividing by eigenvalue differences
    Nothing is computed as a difference of logarithms of vanishing quantities. With the
    secants sigma_l = f(u)/u and sigma_r = (1 - f(u))/(1 - u) of each spline (closed
    forms in the end bins, limits f'(0) and f'(1)), every gap changes by a finite factor,
    t'_k = rho_k t_k with rho_k = sigma_l,k prod_{m<k} sigma_r,m (rho_N = prod_m sigma_r,m),
    and so does every chord: |e^{i theta_i} - e^{i theta_j}| = 2 sin(pi a_ij), where a_ij is
    the sum of the gaps on the shorter arc between i and j, and
    sin(pi a') / sin(pi a) = (sum rho_k t_k / sum t_k) sinc(a') / sinc(a). The Weyl ratio
    is the product of the squares of these factors. Stick-breaking keeps the pair
    (u, 1 - u), each from sums of gaps, so neither loses precision near a face of A and
    the ends 0 and 1 are mapped exactly.
    The eigenvectors are those of the Hermitian Cayley transform i (1 - cW)(1 + cW)^{-1}
    (|c| = 1 chosen among N + 1 candidates so that 1 + cW is well conditioned), found by
    ``torch.linalg.eigh``: an orthonormal basis also when eigenvalues coincide. The output
    is W' = W + W V diag(e^{i(theta' - theta)} - 1) V^+, which is W itself, bit for bit,
    where theta' = theta (centre elements are fixed points of every such map). The
    eigendecomposition carries no gradient: derivatives enter through first-order
    perturbation theory, V^+ dW V (eigenphases: its diagonal; eigenvectors: the
    off-diagonal part times D_ij = (lambda'_i - lambda'_j)/(lambda_i - lambda_j)
    = e^{i(delta_i + delta_j)/2} sin(pi a'_ij)/sin(pi a_ij), the same finite chord ratio),
    so gradients are finite everywhere and exact wherever the eigenvalues are distinct.

Degenerate spectra
    Where at most two eigenvalues coincide (every degenerate point of SU(2); in SU(3)
    every point but the centre) the density is continuous and the value returned is its
    limit. Where three coincide (in SU(3): the centre elements e^{2 pi i k/3} 1, the
    vertices of A) a generic pair of splines has no limit: near the identity, with
    a = f_1'(0) and b = f_2'(0), the density depends on the ratio of the two small gaps,
    and at the vertex where stick-breaking is singular (u_1 = 1, the centre
    e^{-2 pi i/3}) also on the direction-dependent u_2. The SU(3) map therefore makes the
    splines isotropic at every vertex: the raw end derivatives f_2'(0) and f_2'(1) are tied
    to f_1'(0), and the second spline's raw parameters are multiplied by 1 - u_1 (zero
    parameters are the identity), so that f_2 tends to the identity as u_1 -> 1 (the
    triangular structure keeps the Jacobian f_1'(u_1) f_2'(u_2; u_1); the inverse inverts
    f_1 first). To first order the map is then X -> a X on su(3) at each centre element,
    with density a^8 from every direction (a = f_1'(0) at 1 and e^{2 pi i/3}, f_1'(1) at
    e^{-2 pi i/3}); the value returned is that limit, the same in the forward and the
    inverse map. (Checkpoints of SU(3) ``sun-spectral`` flows trained before this
    constraint describe a different map: retrain them; :data:`SPECTRAL_MAP_VERSION` is stored
    with the weights and such checkpoints are refused when loaded.)
"""

from __future__ import annotations

import functools
import math

import torch

from flowplug.plugins.flow_transforms import rq_spline_params

TWO_PI = 2.0 * math.pi
_TINY = 1e-300

#: Version of the SU(N) spectral map: 2 since the SU(3) second spline is tied to the first
#: (continuous at the centre elements). ``sun-spectral`` layers store it with their weights.
SPECTRAL_MAP_VERSION = 2


def alcove_phases(phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The canonical-cell representative of SU(N) eigenphases.

    Arguments:
        phi: Eigenphases in (-pi, pi] of SU(N) matrices, shape (..., N), float64, in any
            order; their sum must be a multiple of 2 pi (det = 1).

    Returns:
        ``(theta, perm)``: theta of shape (..., N) with theta_1 >= ... >= theta_N >=
        theta_1 - 2 pi and sum 0 (up to rounding), theta_j = phi[perm_j] mod 2 pi;
        perm of shape (..., N), int64.
    """
    n = phi.shape[-1]
    phis, order = torch.sort(phi, dim=-1, descending=True)
    m = torch.round(phis.sum(-1) / TWO_PI).to(torch.int64)
    k = torch.arange(n, device=phi.device) + m[..., None]
    idx = torch.remainder(k, n)
    wraps = torch.div(k, n, rounding_mode="floor")
    theta = torch.gather(phis, -1, idx) - TWO_PI * wraps.to(phi.dtype)
    return theta, torch.gather(order, -1, idx)


def weyl_log_density(theta: torch.Tensor) -> torch.Tensor:
    r"""log J(theta) = sum_{i<j} log |e^{i theta_i} - e^{i theta_j}|^2 = sum_{i<j} 2 log|2 sin((theta_i - theta_j)/2)|.

    Arguments:
        theta: Eigenphases, shape (..., N), float64.

    Returns:
        Shape (...), float64; degenerate eigenvalues give a large negative finite value
        (the sine is floored at 1e-300 instead of giving -inf).
    """
    n = theta.shape[-1]
    i, j = torch.triu_indices(n, n, 1, device=theta.device)
    diff = theta[..., i] - theta[..., j]
    return (2 * torch.log((2 * torch.sin(0.5 * diff)).abs().clamp_min(_TINY))).sum(-1)


def n_spectral_params(n: int, n_bins: int) -> int:
    """Conditioner outputs per matrix for SU(n) with ``n_bins`` spline bins: (n-1)(3K+1)."""
    return (n - 1) * (3 * n_bins + 1)


def _knots(raw: torch.Tensor, n: int, n_bins: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Knots of the N-1 splines from (..., (N-1)(3K+1)) raw parameters: x_k, y_k of shape
    (..., N-1, K+1) with ends exactly 0 and 1, derivatives d_k of shape (..., N-1, K+1)."""
    w, h, d = rq_spline_params(raw.reshape(*raw.shape[:-1], n - 1, 3 * n_bins + 1), n_bins, boundary="free")

    def knots(v: torch.Tensor) -> torch.Tensor:
        c = torch.cumsum(v, -1)
        return torch.cat([torch.zeros_like(v[..., :1]), c[..., :-1], torch.ones_like(v[..., :1])], -1)

    return knots(w), knots(h), d


def _unit(phase: torch.Tensor) -> torch.Tensor:
    """e^{i phase} (complex128 for float64 phases)."""
    return torch.complex(torch.cos(phase), torch.sin(phase))


def _at(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(t, -1, idx)[..., 0]


def _spline_forward(u: torch.Tensor, c: torch.Tensor, xk: torch.Tensor, yk: torch.Tensor, d: torch.Tensor):
    """Splines f of [0, 1] onto itself (Durkan et al. 1906.04032, eq. 4) at u, given u and c = 1 - u.

    Returns ``(u', c', log f'(u), log sigma_l, log sigma_r)``, shapes like u, with
    u' = f(u), c' = 1 - f(u), sigma_l = f(u)/u and sigma_r = (1 - f(u))/(1 - u). In the
    first and last bin the secants are the closed forms
    (y - y_k)/(x - x_k) = s (s xi + d_k (1 - xi)) / den and
    (y_{k+1} - y)/(x_{k+1} - x) = s (s (1 - xi) + d_{k+1} xi) / den, so they tend to
    f'(0) and f'(1) without cancellation. In the last bin (the upper half of a single
    bin) 1 - f(u) is c sigma_r and f(u) its complement, elsewhere f(u) comes first: both
    are accurate, and f(0) = 0, f(1) = 1 exactly.
    """
    k = d.shape[-1] - 1
    idx = (u[..., None] >= xk[..., 1:k]).sum(-1, keepdim=True)
    x0, x1, y0, y1 = _at(xk, idx), _at(xk, idx + 1), _at(yk, idx), _at(yk, idx + 1)
    d0, d1 = _at(d, idx), _at(d, idx + 1)
    w = x1 - x0
    s = (y1 - y0) / w
    xi = ((u - x0) / w).clamp(0.0, 1.0)
    t = xi * (1 - xi)
    den = s + (d1 + d0 - 2 * s) * t
    log_df = torch.log(s * s * (d1 * xi * xi + 2 * s * t + d0 * (1 - xi) ** 2)) - 2 * torch.log(den)
    y = y0 + (y1 - y0) * (s * xi * xi + d0 * t) / den
    lo = s * (s * xi + d0 * (1 - xi)) / den
    hi = s * (s * (1 - xi) + d1 * xi) / den
    first, last = idx[..., 0] == 0, idx[..., 0] == k - 1
    one = torch.ones_like(u)
    sig_l = torch.where(first, lo, y / torch.where(first, one, u))  # u >= x_1 > 0 outside bin 0
    sig_r = torch.where(last, hi, (1 - y) / torch.where(last, one, c))  # c >= 1 - x_{K-1} > 0
    top = _top(first, last, u)
    c_top = c * sig_r
    return torch.where(top, 1 - c_top, y), torch.where(top, c_top, 1 - y), log_df, torch.log(sig_l), torch.log(sig_r)


def _top(first: torch.Tensor, last: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Where a spline value is formed from 1 - u rather than u: the last bin (the upper half
    of it when there is a single bin)."""
    return last & (~first | (u > 0.5))


def _spline_inverse(
    v: torch.Tensor, cv: torch.Tensor, xk: torch.Tensor, yk: torch.Tensor, d: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, 1 - u) with f(u) = v, given v and cv = 1 - v, for the splines of
    :func:`_spline_forward` (Durkan et al. appendix A, in the cancellation-free form
    xi = 2c / (-b - sqrt(b^2 - 4ac))); 1 - u is cv / sigma_r in the last bin."""
    u = _spline_root(v, xk, yk, d)
    k = d.shape[-1] - 1
    idx = (u[..., None] >= xk[..., 1:k]).sum(-1, keepdim=True)
    top = _top(idx[..., 0] == 0, idx[..., 0] == k - 1, u)
    c_top = cv * torch.exp(-_spline_forward(u, 1 - u, xk, yk, d)[4])
    return torch.where(top, 1 - c_top, u), torch.where(top, c_top, 1 - u)


def _spline_root(v: torch.Tensor, xk: torch.Tensor, yk: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    k = d.shape[-1] - 1
    idx = (v[..., None] >= yk[..., 1:k]).sum(-1, keepdim=True)
    x0, x1, y0, y1 = _at(xk, idx), _at(xk, idx + 1), _at(yk, idx), _at(yk, idx + 1)
    d0, d1 = _at(d, idx), _at(d, idx + 1)
    w, h = x1 - x0, y1 - y0
    s = h / w
    dy = v - y0
    a = h * (s - d0) + dy * (d1 + d0 - 2 * s)
    b = h * d0 - dy * (d1 + d0 - 2 * s)
    c = -s * dy
    disc = (b * b - 4 * a * c).clamp_min(0.0)
    xi = (2 * c / (-b - torch.sqrt(disc))).clamp(0.0, 1.0)
    # two Newton steps on the forward formula polish the root from ~1e-11 to rounding (the
    # steps are differentiable; at the root their derivative is the implicit one)
    for _ in range(2):
        t = xi * (1 - xi)
        den = s + (d1 + d0 - 2 * s) * t
        y = y0 + h * (s * xi * xi + d0 * t) / den
        slope = w * s * s * (d1 * xi * xi + 2 * s * t + d0 * (1 - xi) ** 2) / (den * den)
        xi = (xi + (v - y) / slope).clamp(0.0, 1.0)
    return x0 + xi * w


def _centre_isotropic(raw: torch.Tensor, n: int, n_bins: int, c1: torch.Tensor) -> torch.Tensor:
    """SU(3): the spline parameters that make the map isotropic at the three centre elements
    (module docstring, "Degenerate spectra"): the raw end derivatives f_2'(0) and f_2'(1)
    are tied to f_1'(0), and the second spline's raw parameters are scaled by
    c_1 = 1 - u_1, so that f_2 tends to the identity as u_1 -> 1. Other N: ``raw`` unchanged.

    Arguments:
        raw: (..., (N-1)(3K+1)); c1: (...), the first input coordinate's 1 - u_1.
    """
    if n != 3:
        return raw
    per = 3 * n_bins + 1
    raw = raw.to(torch.float64)  # c1 must scale the same bits in the forward and inverse map
    first, second = raw[..., :per], raw[..., per:]
    d0 = first[..., 2 * n_bins : 2 * n_bins + 1]
    second = torch.cat([second[..., : 2 * n_bins], d0, second[..., 2 * n_bins + 1 : 3 * n_bins], d0], -1)
    return torch.cat([first, second * c1[..., None].to(torch.float64)], -1)


def _stick(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaps t (..., N) -> stick-breaking (u, c = 1 - u), each (..., N-1), from sums of gaps.

    Also returns the mask of coordinates whose remaining stick r_k = t_k + ... + t_N is
    empty (u_k, k = 1..N-1, is then undefined and set to 1/(N-k+1), its value when the
    vanishing gaps are equal) and the total r_1 (...).
    """
    n = t.shape[-1]
    r = torch.flip(torch.cumsum(torch.flip(t, [-1]), -1), [-1])
    rk = r[..., :-1]
    empty = rk <= 0
    safe = torch.where(empty, torch.ones_like(rk), rk)
    equal = 1.0 / torch.arange(n, 1, -1, dtype=t.dtype, device=t.device)
    u = torch.where(empty, equal, t[..., :-1] / safe)
    c = torch.where(empty, 1.0 - equal, r[..., 1:] / safe)
    return u, c, empty, r[..., 0]


def _unstick(u: torch.Tensor, c: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Stick-breaking (u, c) (..., N-1) and the total (...) -> gaps (..., N)."""
    r = total
    gaps = []
    for k in range(u.shape[-1]):
        gaps.append(u[..., k] * r)
        r = r * c[..., k]
    gaps.append(r)
    return torch.stack(gaps, -1)


@functools.cache
def _pairs(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices i < j of the N(N-1)/2 eigenvalue pairs and the (2, P, N) float64 masks of the
    gaps on the two arcs between them: i..j-1, and the others."""
    i, j = torch.triu_indices(n, n, 1, device=device)
    g = torch.arange(n, device=device)
    arc = ((g >= i[:, None]) & (g < j[:, None])).to(torch.float64)
    return i, j, torch.stack([arc, 1.0 - arc])


def _log_density(
    t: torch.Tensor, log_df: torch.Tensor, log_sl: torch.Tensor, log_sr: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """log|det| of the forward map at alcove gaps t (..., N), and log sin(pi a'_ij)/sin(pi a_ij)
    for every pair (..., P) (module docstring); both finite for every t."""
    n = t.shape[-1]
    log_r = torch.cat([torch.zeros_like(log_sr[..., :1]), torch.cumsum(log_sr, -1)], -1)  # log r'_k/r_k
    log_rho = torch.cat([log_sl + log_r[..., :-1], log_r[..., -1:]], -1)  # log t'_k/t_k
    ld = log_df.sum(-1) + log_r[..., 1:-1].sum(-1)
    rho = torch.exp(log_rho)
    _, _, arcs = _pairs(n, t.device)
    a = torch.einsum("...n,spn->...sp", t, arcs)  # (..., 2, P): sums of gaps on both arcs
    a_new = torch.einsum("...n,spn->...sp", rho * t, arcs)
    mean_rho = torch.einsum("...n,spn->...sp", rho, arcs) / arcs.sum(-1)
    first = (a[..., 0, :] <= a[..., 1, :]).detach()  # take the shorter arc (<= 1/2)
    s_in = torch.where(first, a[..., 0, :], a[..., 1, :])
    s_out = torch.where(first, a_new[..., 0, :], a_new[..., 1, :])
    c_out = torch.where(first, a_new[..., 1, :], a_new[..., 0, :])
    m_rho = torch.where(first, mean_rho[..., 0, :], mean_rho[..., 1, :])
    pos = s_in > 0
    # an arc of vanishing gaps: the limit along equal gaps (one gap: its exact rho)
    ratio = torch.where(pos, s_out / torch.where(pos, s_in, torch.ones_like(s_in)), m_rho)
    near = s_out <= c_out
    quarter, half = torch.full_like(s_out, 0.25), torch.full_like(s_out, 0.5)
    sinc_out = torch.where(
        near,
        torch.sinc(torch.where(near, s_out, quarter)),
        torch.sin(math.pi * torch.where(near, quarter, c_out)) / (math.pi * torch.where(near, half, s_out)),
    )
    log_s = torch.log(ratio) + torch.log(sinc_out) - torch.log(torch.sinc(s_in))
    return ld + 2 * log_s.sum(-1), log_s


def _phase_shift(t_from: torch.Tensor, t_to: torch.Tensor) -> torch.Tensor:
    """theta(t_to) - theta(t_from) for alcove phases with gaps t (..., N) and sum 0."""
    delta = t_to - t_from
    cum = torch.cat([torch.zeros_like(delta[..., :1]), torch.cumsum(delta[..., :-1], -1)], -1)
    return TWO_PI * (cum.mean(-1, keepdim=True) - cum)


def _eigen(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Orthonormal eigenvectors of SU(N) matrices in alcove order (..., N, N), the alcove gaps
    t = g / 2 pi (..., N) and alcove phases (..., N); no gradients. Equal eigenvalues of an
    exactly diagonal input give exactly equal phases and zero gaps."""
    n = w.shape[-1]
    eye = torch.eye(n, dtype=w.dtype, device=w.device)
    k = torch.arange(n + 1, dtype=torch.float64, device=w.device)
    rot = _unit(TWO_PI / (n + 1) * k)
    # |det(1 + cW)| = prod |1 + c lambda|: the best of N + 1 equally spaced c keeps every
    # c lambda away from -1 (by more than about 2^{1-N} (2 sin(pi / (2N + 2)))^N)
    if n <= 3:
        # det(1 + cW) = sum_k c^k e_k(lambda), e_k from the power sums tr W^k (Newton)
        p1 = torch.diagonal(w, dim1=-2, dim2=-1).sum(-1)
        p2 = (w * w.mT).sum((-1, -2))
        e = [torch.ones_like(p1), p1, 0.5 * (p1 * p1 - p2)]
        if n == 3:
            p3 = ((w @ w) * w.mT).sum((-1, -2))
            e.append((p1**3 - 3 * p1 * p2 + 2 * p3) / 6)
        powers = rot.to(w.dtype)[:, None] ** k.to(w.dtype)  # (N + 1 candidates, N + 1 powers)
        dets = torch.stack(e, -1) @ powers.mT
    else:
        dets = torch.linalg.det(eye + rot.to(w.dtype)[:, None, None] * w[..., None, :, :])
    phase = (TWO_PI / (n + 1)) * dets.abs().argmax(-1).to(torch.float64)
    cw = _unit(phase).to(w.dtype)[..., None, None] * w
    h = 1j * torch.linalg.solve(eye + cw, eye - cw)  # eigenvalues tan((theta + phase)/2)
    mu, v = torch.linalg.eigh(0.5 * (h + h.mH))
    alpha = 2 * torch.atan(mu.flip(-1))  # theta + phase, descending, in (-pi, pi)
    v = v.flip(-1)
    gaps = torch.cat([alpha[..., :-1] - alpha[..., 1:], alpha[..., -1:] - alpha[..., :1] + TWO_PI], -1)
    theta = alpha - phase[..., None]
    m = torch.round(theta.sum(-1) / TWO_PI).to(torch.int64)
    shift = torch.arange(n, device=w.device) + m[..., None]
    idx = torch.remainder(shift, n)
    wraps = torch.div(shift, n, rounding_mode="floor")
    theta = torch.gather(theta, -1, idx) - TWO_PI * wraps.to(theta.dtype)
    v = torch.gather(v, -1, idx[..., None, :].expand(v.shape))
    return v, torch.gather(gaps, -1, idx) / TWO_PI, theta


def spectral_map(
    w: torch.Tensor, raw: torch.Tensor, n_bins: int, *, inverse: bool = False, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Conjugation-equivariant spline flow on SU(N) matrices (module docstring).

    Finite, with finite gradients, for every input including degenerate spectra (unit
    and centre elements, loops with equal eigenphases); see the module docstring for the
    value at points with three or more equal eigenvalues.

    Arguments:
        w: SU(N) matrices, shape (..., N, N), complex128.
        raw: Unconstrained spline parameters, shape (..., (N-1)(3K+1)), any real dtype
            (zeros give the identity map).
        n_bins: K.
        inverse: Apply the inverse map (same parameters).
        left: Return the left factor G = w' w^+ (:func:`spectral_left_factor`) instead of w'.

    Returns:
        ``(w', logdet)``: w' of shape (..., N, N) complex128 in SU(N) (up to rounding);
        logdet of shape (...), float64: log of the Jacobian determinant of the map
        relative to Haar measure (for the inverse: of the inverse map, exactly the
        negative of the forward log-det at the returned point).

    Raises:
        ValueError: if ``raw`` has the wrong number of parameters.

    References:
        Boyda et al., arXiv:2008.05456, sections III.A-C; Durkan et al., arXiv:1906.04032.
    """
    n = w.shape[-1]
    per = 3 * n_bins + 1
    if raw.shape[-1] != (n - 1) * per:
        raise ValueError(
            f"spectral_map for SU({n}) with {n_bins} bins needs {(n - 1) * per} "
            f"parameters per matrix; found {raw.shape[-1]}"
        )
    track = w.requires_grad and torch.is_grad_enabled()
    with torch.no_grad():
        vec, t, theta = _eigen(w.detach())
    a = vec.mH @ w @ vec  # diagonal up to rounding; carries the derivatives when tracked
    with torch.no_grad():
        # Rayleigh-quotient phases (accurate to rounding of W, not of the Cayley transform);
        # gaps that are exactly 0 (equal eigenvalues of an exactly structured input) stay 0
        corr = torch.angle(torch.diagonal(a, dim1=-2, dim2=-1) * _unit(-theta))
        theta = theta + corr
        t = torch.where(t == 0, t, (t + (corr - torch.roll(corr, -1, -1)) / TWO_PI).clamp_min(0.0))
    if track:
        # first-order perturbation theory: d theta_j = Im((V^+ dW V)_jj / lambda_j); value 0
        z = torch.diagonal(a, dim1=-2, dim2=-1) * _unit(-theta)
        dphi = torch.angle(z)
        dphi = dphi - dphi.detach()
        t = t + (dphi - torch.roll(dphi, -1, -1)) / TWO_PI
    u, c, empty, total = _stick(t)
    if not inverse:
        xk, yk, d = _knots(_centre_isotropic(raw, n, n_bins, c[..., 0]), n, n_bins)
        u_new, c_new, log_df, log_sl, log_sr = _spline_forward(u, c, xk, yk, d)
        t_in, t_out = t, _unstick(u_new, c_new, total)
    else:
        # (u, c) are the output coordinates of the forward map; find its input coordinates.
        # For SU(3) the second spline depends on the first input coordinate: invert the
        # first spline (which does not), then both with the second spline's parameters
        if n == 3:
            xk, yk, d = _knots(_centre_isotropic(raw, n, n_bins, torch.ones_like(c[..., 0])), n, n_bins)
            u1, c1 = _spline_inverse(u, c, xk, yk, d)
            c1 = torch.where(empty[..., 0], c[..., 0], c1[..., 0])
        else:
            c1 = c[..., 0]
        xk, yk, d = _knots(_centre_isotropic(raw, n, n_bins, c1), n, n_bins)
        u_in, c_in = _spline_inverse(u, c, xk, yk, d)
        u_in, c_in = torch.where(empty, u, u_in), torch.where(empty, c, c_in)
        _, _, log_df, log_sl, log_sr = _spline_forward(u_in, c_in, xk, yk, d)
        t_in, t_out = _unstick(u_in, c_in, total), t
    logdet, log_s = _log_density(t_in, log_df, log_sl, log_sr)
    shift = _phase_shift(t_in, t_out)
    if inverse:
        logdet, log_s, shift = -logdet, -log_s, -shift
    g = spectral_left_factor(w, vec, theta, shift, log_s, a=a if track else None)
    return (g if left else g @ w), logdet


def spectral_left_factor(
    w: torch.Tensor,
    vec: torch.Tensor,
    theta: torch.Tensor,
    shift: torch.Tensor,
    log_chord: torch.Tensor,
    *,
    a: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""G = W' W^+ = V diag(e^{i s}) V^+ of a spectral map W -> W', with its derivative.

    The value is I + V diag(e^{i s} - 1) V^+ (exactly I where s = 0): unitary to rounding
    whatever the rounding of W, so applying it as U' = G U to a link never amplifies a loss
    of unitarity. When ``w`` is tracked, the derivative is first-order perturbation theory
    (Daleckii-Krein): with A = V^+ dW V, V^+ dG V has diagonal i g_j ds_j (through ``shift``)
    and off-diagonal (C_jk - g_j) A_jk conj(lambda_k), where g = e^{i s},
    C_jk = (lambda'_j - lambda'_k)/(lambda_j - lambda_k) = e^{i(s_j + s_k)/2} x chord ratio,
    continuous at coincident eigenvalues.

    Arguments:
        w: SU(N) matrices (..., N, N), complex128 (tracked or not).
        vec: Orthonormal eigenvectors of w (..., N, N) (no gradient).
        theta: Eigenphases of w in the order of ``vec`` (..., N), float64 (value only is used).
        shift: theta' - theta (..., N), float64, carrying the derivatives of the eigenphases.
        log_chord: log |sin((theta'_j - theta'_k)/2) / sin((theta_j - theta_k)/2)| for the
            pairs of :func:`pair_indices` (..., P), float64.
        a: V^+ w V if already formed (tracked), else it is formed here when needed.

    Returns:
        G (..., N, N), complex128.
    """
    n = w.shape[-1]
    e = torch.complex(-2 * torch.sin(0.5 * shift) ** 2, torch.sin(shift))  # e^{i s} - 1, no cancellation
    eye = torch.eye(n, dtype=w.dtype, device=w.device)
    g = eye + (vec * e[..., None, :]) @ vec.mH
    if w.requires_grad and torch.is_grad_enabled():
        if a is None:
            a = vec.mH @ w @ vec
        with torch.no_grad():
            i, j, _ = _pairs(n, w.device)
            s = shift.detach()
            cij = torch.polar(torch.exp(log_chord.detach()), 0.5 * (s[..., i] + s[..., j]))
            cmat = torch.zeros_like(a)
            cmat[..., i, j] = cij
            cmat[..., j, i] = cij
            cmat = cmat - (1 + e.detach())[..., :, None]
            cmat = cmat - torch.diag_embed(torch.diagonal(cmat, dim1=-2, dim2=-1))
            cmat = cmat * _unit(-theta.detach())[..., None, :]
        g = g + vec @ (cmat * (a - a.detach())) @ vec.mH
    return g


def eigen_phases(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Eigenvectors, alcove gaps and eigenphases of SU(N) matrices, without gradients.

    The eigenvectors are those of the Hermitian Cayley transform i (1 - cW)(1 + cW)^{-1}
    (``torch.linalg.eigh``, |c| = 1 chosen so that 1 + cW is well conditioned): an
    orthonormal basis also at degenerate spectra.

    Arguments:
        w: SU(N) matrices (..., N, N), complex128.

    Returns:
        ``(V, t, theta)``: V (..., N, N) complex128, columns the eigenvectors in alcove
        order; t (..., N) float64, the alcove gaps / 2 pi; theta (..., N) float64, the
        alcove eigenphases (:func:`alcove_phases`).
    """
    with torch.no_grad():
        return _eigen(w.detach())


def pair_indices(n: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (i, j), i < j, of the N(N-1)/2 eigenvalue pairs, int64 tensors of shape (P,)."""
    i, j, _ = _pairs(n, torch.device(device))
    return i, j
