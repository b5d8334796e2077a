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
"""

from __future__ import annotations

import math

import torch

from flowplug.plugins.flow_transforms import rq_spline, rq_spline_params

TWO_PI = 2.0 * math.pi
_TINY = 1e-300


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


def _to_cube(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Alcove phases (..., N) -> stick-breaking coordinates u (..., N-1) and sum_k log r_k."""
    n = theta.shape[-1]
    gaps = torch.cat([theta[..., :-1] - theta[..., 1:], (theta[..., -1:] - theta[..., :1] + TWO_PI)], -1)
    t = (gaps / TWO_PI).clamp(0.0, 1.0)
    us, log_r = [], torch.zeros_like(theta[..., 0])
    r = torch.ones_like(theta[..., 0])
    for k in range(n - 1):
        if k > 0:
            log_r = log_r + torch.log(r.clamp_min(_TINY))
        u = (t[..., k] / r.clamp_min(_TINY)).clamp(0.0, 1.0)
        us.append(u)
        r = r * (1.0 - u)
    return torch.stack(us, -1), log_r


def _from_cube(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stick-breaking coordinates u (..., N-1) -> alcove phases (..., N) and sum_k log r_k."""
    n = u.shape[-1] + 1
    r = torch.ones_like(u[..., 0])
    log_r = torch.zeros_like(r)
    ts = []
    for k in range(n - 1):
        if k > 0:
            log_r = log_r + torch.log(r.clamp_min(_TINY))
        ts.append(u[..., k] * r)
        r = r * (1.0 - u[..., k])
    ts.append(r)
    gaps = TWO_PI * torch.stack(ts, -1)
    cum = torch.cat([torch.zeros_like(gaps[..., :1]), torch.cumsum(gaps[..., :-1], -1)], -1)  # sum_{i<j} g_i
    theta0 = cum.sum(-1, keepdim=True) / n
    return theta0 - cum, log_r


def n_spectral_params(n: int, n_bins: int) -> int:
    """Conditioner outputs per matrix for SU(n) with ``n_bins`` spline bins: (n-1)(3K+1)."""
    return (n - 1) * (3 * n_bins + 1)


def spectral_map(w: torch.Tensor, raw: torch.Tensor, n_bins: int, *,
                 inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Conjugation-equivariant spline flow on SU(N) matrices (module docstring).

    Arguments:
        w: SU(N) matrices, shape (..., N, N), complex128.
        raw: Unconstrained spline parameters, shape (..., (N-1)(3K+1)), any real dtype
            (zeros give the identity map).
        n_bins: K.
        inverse: Apply the inverse map (same parameters).

    Returns:
        ``(w', logdet)``: w' of shape (..., N, N) complex128 in SU(N) (up to rounding);
        logdet of shape (...), float64: log of the Jacobian determinant of the map
        relative to Haar measure (for the inverse: of the inverse map).

    Raises:
        ValueError: if ``raw`` has the wrong number of parameters.

    References:
        Boyda et al., arXiv:2008.05456, sections III.A-C; Durkan et al., arXiv:1906.04032.
    """
    n = w.shape[-1]
    per = 3 * n_bins + 1
    if raw.shape[-1] != (n - 1) * per:
        raise ValueError(f"spectral_map for SU({n}) with {n_bins} bins needs {(n - 1) * per} "
                         f"parameters per matrix; found {raw.shape[-1]}")
    lam, vec = torch.linalg.eig(w)
    theta, perm = alcove_phases(torch.angle(lam))
    u, log_r = _to_cube(theta)
    new_u, log_du = [], torch.zeros_like(log_r)
    for k in range(n - 1):
        wk, hk, dk = rq_spline_params(raw[..., k * per:(k + 1) * per], n_bins, boundary="free")
        uk, ldk = rq_spline(u[..., k], wk, hk, dk, inverse=inverse)
        new_u.append(uk)
        log_du = log_du + ldk
    theta_new, log_r_new = _from_cube(torch.stack(new_u, -1))
    logdet = log_du + log_r_new - log_r + weyl_log_density(theta_new) - weyl_log_density(theta)
    phases = torch.zeros_like(theta_new).scatter(-1, perm, theta_new)
    eig_new = torch.polar(torch.ones_like(phases), phases)
    w_new = (vec * eig_new[..., None, :]) @ torch.linalg.inv(vec)
    return w_new, logdet
