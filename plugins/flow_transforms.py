r"""Elementwise monotone transforms used by the coupling layers.

* :func:`rq_spline` -- monotone rational-quadratic spline on an interval (Durkan et al.,
  arXiv:1906.04032, section 3.1 and appendix A), with an exact closed-form inverse;
* :func:`rq_spline_params` -- turns unconstrained network outputs into bin widths,
  heights and knot derivatives;
* :func:`circular_rq_spline` -- the circular variant on [0, 2 pi) with equal end
  derivatives and a rotation (Rezende et al., arXiv:2002.02428, section 3);
* :func:`truncated_logistic_icdf` / :func:`logistic_concentration` -- a concentrating
  map of the circle: the inverse
  distribution function of a logistic distribution of scale s truncated to (-pi, pi],
  followed by a rotation (for sharp unimodal angles; closed-form inverse);
* :func:`ncp_mixture` -- convex mixtures of non-compact projections (NCP),
  x -> 2 atan(a tan(x/2)), followed by a rotation (Kanwar et al., arXiv:2003.06413,
  section IV; Rezende et al., arXiv:2002.02428, section 2.1); the inverse is found by
  bisection and polished by one differentiable Newton step.

Every function returns ``(y, log_abs_dydx)`` elementwise, in float64. Inputs are
clipped into the domain before any arithmetic, and every formula is written so that
no division by zero, ``tan(pi/2)`` or ``sqrt`` of a negative number can occur: the
outputs are finite for all finite inputs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

TWO_PI = 2.0 * math.pi


def rq_spline_params(
    raw: torch.Tensor,
    n_bins: int,
    *,
    width: float = 1.0,
    height: float = 1.0,
    min_bin: float = 1e-3,
    min_derivative: float = 1e-3,
    boundary: str = "free",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Bin widths, heights and knot derivatives from unconstrained parameters.

    Zero raw parameters give equal bins and unit derivatives, i.e. the identity map.

    Arguments:
        raw: Shape (..., P), any real dtype; P = 3K+1 for ``boundary="free"``
            (K widths, K heights, K+1 derivatives), 3K for ``"periodic"`` (the derivative
            at both ends is shared), 3K-1 for ``"linear"`` (end derivatives fixed to 1, as
            needed for identity tails).
        n_bins: K.
        width: Total width of the domain (sum of the widths).
        height: Total height of the range (sum of the heights).
        min_bin: Minimal bin width/height as a fraction of the total.
        min_derivative: Lower bound of the knot derivatives.
        boundary: ``"free"``, ``"periodic"`` or ``"linear"``.

    Returns:
        ``(widths, heights, derivatives)`` of shapes (..., K), (..., K), (..., K+1), float64.

    Raises:
        ValueError: if the last axis of ``raw`` has the wrong length.
    """
    k = int(n_bins)
    n_d = {"free": k + 1, "periodic": k, "linear": k - 1}[boundary]
    if raw.shape[-1] != 2 * k + n_d:
        raise ValueError(
            f"rq_spline_params: expected {2 * k + n_d} parameters for {k} bins ({boundary} ends); found {raw.shape[-1]}"
        )
    raw = raw.to(torch.float64)
    rw, rh, rd = raw[..., :k], raw[..., k : 2 * k], raw[..., 2 * k :]
    scale = 1.0 - k * min_bin
    w = width * (min_bin + scale * torch.softmax(rw, dim=-1))
    h = height * (min_bin + scale * torch.softmax(rh, dim=-1))
    shift = math.log(math.expm1(1.0 - min_derivative))
    d = min_derivative + F.softplus(rd + shift)
    if boundary == "periodic":
        d = torch.cat([d, d[..., :1]], dim=-1)
    elif boundary == "linear":
        one = torch.ones_like(d[..., :1])
        d = torch.cat([one, d, one], dim=-1)
    return w, h, d


def rq_spline(
    x: torch.Tensor,
    widths: torch.Tensor,
    heights: torch.Tensor,
    derivatives: torch.Tensor,
    *,
    left: float = 0.0,
    bottom: float = 0.0,
    inverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Monotone rational-quadratic spline on [left, left + sum(widths)] (Durkan et al. 1906.04032).

    Within bin k, with xi = (x - x_k)/w_k in [0, 1] and s_k = h_k/w_k,

        y = y_k + h_k [s_k xi^2 + d_k xi (1 - xi)] / [s_k + (d_{k+1} + d_k - 2 s_k) xi (1 - xi)],

    (their eq. 4); the inverse solves the quadratic of their appendix A in the
    cancellation-free form xi = 2c / (-b - sqrt(b^2 - 4ac)).

    Arguments:
        x: Points, shape (...), float64. Clipped into the domain (range when ``inverse``).
        widths: Bin widths w_k > 0, shape (..., K).
        heights: Bin heights h_k > 0, shape (..., K).
        derivatives: Knot derivatives d_0..d_K > 0, shape (..., K+1).
        left: Left end of the domain.
        bottom: Lower end of the range.
        inverse: Evaluate the inverse map.

    Returns:
        ``(y, log|dy/dx|)``, both of shape (...), float64. For the inverse, the second
        entry is log|dx/dy| = -log|dy/dx| at the returned point.
    """
    x = x.to(torch.float64)
    xk = left + torch.cat([torch.zeros_like(widths[..., :1]), torch.cumsum(widths, -1)], -1)
    yk = bottom + torch.cat([torch.zeros_like(heights[..., :1]), torch.cumsum(heights, -1)], -1)
    k = widths.shape[-1]
    knots_in = yk if inverse else xk
    x = torch.minimum(torch.maximum(x, knots_in[..., 0]), knots_in[..., -1])
    idx = (x[..., None] >= knots_in[..., 1:k]).sum(-1, keepdim=True)

    def at(t: torch.Tensor) -> torch.Tensor:
        return torch.gather(t, -1, idx)[..., 0]

    x0, y0, w, h = at(xk), at(yk), at(widths), at(heights)
    d0 = at(derivatives)
    d1 = torch.gather(derivatives, -1, idx + 1)[..., 0]
    s = h / w
    if not inverse:
        xi = ((x - x0) / w).clamp(0.0, 1.0)
        t = xi * (1 - xi)
        den = s + (d1 + d0 - 2 * s) * t
        y = y0 + h * (s * xi * xi + d0 * t) / den
        num = s * s * (d1 * xi * xi + 2 * s * t + d0 * (1 - xi) ** 2)
        return y, torch.log(num) - 2 * torch.log(den)
    dy = x - y0
    a = h * (s - d0) + dy * (d1 + d0 - 2 * s)
    b = h * d0 - dy * (d1 + d0 - 2 * s)
    c = -s * dy
    disc = (b * b - 4 * a * c).clamp_min(0.0)
    xi = (2 * c / (-b - torch.sqrt(disc))).clamp(0.0, 1.0)
    xi = torch.nan_to_num(xi, nan=0.0)  # only if the denominator is exactly 0, i.e. c = 0
    t = xi * (1 - xi)
    den = s + (d1 + d0 - 2 * s) * t
    num = s * s * (d1 * xi * xi + 2 * s * t + d0 * (1 - xi) ** 2)
    return x0 + xi * w, 2 * torch.log(den) - torch.log(num)


def circular_rq_spline(
    x: torch.Tensor, raw: torch.Tensor, n_bins: int, *, rotation: torch.Tensor | None = None, inverse: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Circular rational-quadratic spline on [0, 2 pi) (Rezende et al. 2002.02428, section 3).

    A monotone spline f with f(0) = 0, f(2 pi) = 2 pi and f'(0) = f'(2 pi), so that it is
    a smooth diffeomorphism of the circle, followed by a rotation:
    y = (f(x) + rotation) mod 2 pi.

    Arguments:
        x: Angles, shape (...), float64; reduced mod 2 pi into [0, 2 pi) first.
        raw: Unconstrained spline parameters, shape (..., 3K) (see :func:`rq_spline_params`
            with ``boundary="periodic"``).
        n_bins: K.
        rotation: Angle added after the spline, shape (...); default none.
        inverse: Evaluate the inverse map.

    Returns:
        ``(y, log|dy/dx|)`` with y in [0, 2 pi), shape (...), float64 (for the inverse the
        log-derivative of the inverse map).
    """
    w, h, d = rq_spline_params(raw, n_bins, width=TWO_PI, height=TWO_PI, boundary="periodic")
    x = torch.remainder(x.to(torch.float64), TWO_PI)
    if inverse:
        if rotation is not None:
            x = torch.remainder(x - rotation.to(torch.float64), TWO_PI)
        y, ld = rq_spline(x, w, h, d, inverse=True)
        return torch.remainder(y, TWO_PI), ld
    y, ld = rq_spline(x, w, h, d)
    if rotation is not None:
        y = y + rotation.to(torch.float64)
    return torch.remainder(y, TWO_PI), ld


#: Default range of the concentration maps' log scale (s from 0.01 to 100): F(-pi/s) of the
#: logistic stays a normal float64 (e^{-314}) at the narrow end; at the wide end the logistic
#: map's density varies by 2.5e-4 over [-pi, pi].
MIN_LOG_SCALE, MAX_LOG_SCALE = math.log(0.01), math.log(100.0)


def _soft_log_scale(log_scale: torch.Tensor, min_log_scale: float, max_log_scale: float) -> torch.Tensor:
    mid = 0.5 * (min_log_scale + max_log_scale)
    half = 0.5 * (max_log_scale - min_log_scale)
    return mid + half * torch.tanh((log_scale.to(torch.float64) - mid) / half)


def truncated_logistic_icdf(
    u: torch.Tensor,
    log_scale: torch.Tensor,
    *,
    inverse: bool = False,
    min_log_scale: float = MIN_LOG_SCALE,
    max_log_scale: float = MAX_LOG_SCALE,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Inverse distribution function of a logistic distribution truncated to [-pi, pi].

    With F(z) = 1 / (1 + e^{-z}), scale s and G_s(c) = [F(c/s) - F(-pi/s)] / tanh(pi / 2s)
    (the distribution function of the logistic of scale s centred at 0, truncated to
    [-pi, pi]), this is c = G_s^{-1}(u): a monotone bijection of [0, 1] onto [-pi, pi] with
    u = 0, 1/2, 1 going to -pi, 0, pi, and

        dc/du = s tanh(pi / 2s) / (p (1 - p)),   p = F(-pi/s) + u tanh(pi / 2s),

    evaluated in logs; the upper half u > 1/2 uses the mirror formula in 1 - u, so neither
    p nor 1 - p loses precision in the tails. The inverse is closed-form. It pushes the
    uniform distribution on [0, 1] to the truncated logistic (density ratio cosh^2(pi / 2s)
    between the mode and the ends, exponential tails); for large s it tends to
    c = 2 pi u - pi.

    Arguments:
        u: Points of [0, 1] (c in [-pi, pi] for ``inverse``), shape (...), float64; clipped.
        log_scale: log s, shape (...); soft-clamped into [min_log_scale, max_log_scale] by a
            tanh around their midpoint (the identity near it).
        inverse: Evaluate the inverse map.
        min_log_scale: Lower end of log s (default log 0.01: F(-pi/s) = e^{-314} stays a
            normal float64).
        max_log_scale: Upper end of log s (default log 100).

    Returns:
        ``(c, log|dc/du|)`` (for the inverse ``(u, log|du/dc|)``), shape (...), float64.
    """
    log_s = _soft_log_scale(log_scale, min_log_scale, max_log_scale)
    s = torch.exp(log_s)
    a = math.pi / s
    f_lo = torch.sigmoid(-a)  # F(-pi/s), >= e^{-314}
    delta = torch.tanh(0.5 * a)  # F(pi/s) - F(-pi/s)
    log_const = log_s + torch.log(delta)
    if not inverse:
        u = u.to(torch.float64)
        low = u <= 0.5
        v = torch.where(low, u, 1.0 - u).clamp(0.0, 0.5)
        p = f_lo + v * delta  # in (0, 1/2]
        log_p, log_1mp = torch.log(p), torch.log1p(-p)
        c = (s * (log_p - log_1mp)).clamp(-math.pi, 0.0)
        return torch.where(low, c, -c), log_const - log_p - log_1mp
    c = u.to(torch.float64).clamp(-math.pi, math.pi)
    low = c <= 0
    z = -c.abs() / s  # <= 0
    log_p, log_1mp = F.logsigmoid(z), F.logsigmoid(-z)
    v = ((torch.sigmoid(z) - f_lo) / delta).clamp(0.0, 0.5)
    return torch.where(low, v, 1.0 - v), -(log_const - log_p - log_1mp)


def truncated_cauchy_icdf(
    u: torch.Tensor,
    log_scale: torch.Tensor,
    *,
    inverse: bool = False,
    min_log_scale: float = MIN_LOG_SCALE,
    max_log_scale: float = MAX_LOG_SCALE,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Inverse distribution function of a Cauchy distribution truncated to [-pi, pi].

    With A = atan(pi / s) and scale s, the truncated Cauchy has the distribution function
    G_s(c) = 1/2 + atan(c / s) / (2 A), so c = G_s^{-1}(u) = s tan((2u - 1) A), a monotone
    bijection of [0, 1] onto [-pi, pi] with u = 0, 1/2, 1 going to -pi, 0, pi, and

        dc/du = 2 A s / cos^2((2u - 1) A) = 2 A s (1 + (c / s)^2).

    The density it pushes the uniform distribution to, 1 / (2 A s (1 + (c/s)^2)), has a mode
    to ends ratio 1 + (pi / s)^2, polynomial where the truncated logistic's cosh^2(pi / 2s) is
    exponential: a peak of width s keeps e.g. 1 % of its height half a turn away (s = 0.3)
    instead of e^{-10}. Used where the target's conditional is sharp for most parents but
    flat or bimodal for rare ones (2D U(1) at large beta, parent loops near pi: docs/flows.md).
    For large s it tends to c = 2 pi u - pi.

    Arguments:
        u: Points of [0, 1] (c in [-pi, pi] for ``inverse``), shape (...), float64; clipped.
        log_scale: log s, shape (...); soft-clamped into [min_log_scale, max_log_scale] as in
            :func:`truncated_logistic_icdf`.
        inverse: Evaluate the inverse map.
        min_log_scale, max_log_scale: Range of log s (default log 0.01 to log 100).

    Returns:
        ``(c, log|dc/du|)`` (for the inverse ``(u, log|du/dc|)``), shape (...), float64.
    """
    log_s = _soft_log_scale(log_scale, min_log_scale, max_log_scale)
    s = torch.exp(log_s)
    big_a = torch.atan(math.pi / s)
    log_const = math.log(2.0) + torch.log(big_a) + log_s
    if not inverse:
        t = (2.0 * u.to(torch.float64).clamp(0.0, 1.0) - 1.0) * big_a
        c = (s * torch.tan(t)).clamp(-math.pi, math.pi)
        r = c / s  # log(dc/du) from c, as the inverse computes it: the two cancel to rounding
        return c, log_const + torch.log1p(r * r)
    c = u.to(torch.float64).clamp(-math.pi, math.pi)
    r = c / s
    v = (0.5 + torch.atan(r) / (2.0 * big_a)).clamp(0.0, 1.0)
    return v, -(log_const + torch.log1p(r * r))


def two_branch_icdf(
    u: torch.Tensor,
    log_scale: torch.Tensor,
    log_scale_far: torch.Tensor,
    logit_far: torch.Tensor,
    *,
    inverse: bool = False,
    iterations: int = 48,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Inverse distribution function of a two-branch density on the circle [-pi, pi].

    The density is the mixture

        q(c) = (1 - rho) g_s(c) + rho g_t(wrap(c - pi)),   rho = sigmoid(logit_far),

    of a truncated logistic g_s centred at 0 (:func:`truncated_logistic_icdf`, scale s) and
    one of scale t centred at the antipode pi (split over both ends of [-pi, pi]). Its
    distribution function is closed-form, F(c) = (1 - rho) G_s(c) + rho H(c) with
    H(c) = G_t(c + pi) - 1/2 for c < 0 and 1/2 + G_t(c - pi) for c >= 0, so the inverse map
    (c -> u, and log q) is exact and cheap; the forward map c = F^{-1}(u) is found by
    bisection (``iterations`` halvings of [-pi, pi]) followed by one Newton step whose
    correction carries the gradients (dc/dtheta = -(dF/dtheta) / q, dc/du = 1 / q: the
    implicit-function theorem), so reverse-KL and path gradients flow through it.
    The bracketing uses the distribution function without logarithms; a Newton step with the
    accurate one follows, so u -> c -> u is exact to rounding. Where the density is below
    ~1e-16 (between two sharp branches) the forward map is determined only to what F resolves
    there: c -> u -> c can land away from c, in a region of negligible probability; log q is
    always that of the c returned.

    Used for the conditionals of 2D U(1) block loops at large beta, whose second winding
    branch sits half a turn from the first when the parent loop is near pi (docs/flows.md).

    Arguments:
        u: Points of [0, 1] (c in [-pi, pi] for ``inverse``), shape (...), float64.
        log_scale: log s of the central branch, shape (...) (soft-clamped as in
            :func:`truncated_logistic_icdf`).
        log_scale_far: log t of the antipodal branch, shape (...).
        logit_far: logit of its weight rho, shape (...).
        inverse: Evaluate the inverse map.
        iterations: Bisection steps of the forward map (48: 2 pi / 2^48 = 2e-14 before the
            two Newton steps).

    Returns:
        ``(c, log|dc/du|)`` (for the inverse ``(u, log|du/dc|)``), shape (...), float64.
    """
    rho_log = F.logsigmoid(logit_far.to(torch.float64))
    one_m_log = F.logsigmoid(-logit_far.to(torch.float64))

    def cdf(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g0, lg0 = truncated_logistic_icdf(c, log_scale, inverse=True)
        low = c < 0
        shifted = torch.where(low, c + math.pi, c - math.pi)
        g1, lg1 = truncated_logistic_icdf(shifted, log_scale_far, inverse=True)
        h = torch.where(low, g1 - 0.5, 0.5 + g1)
        f = torch.exp(one_m_log) * g0 + torch.exp(rho_log) * h
        log_q = torch.logaddexp(one_m_log + lg0, rho_log + lg1)
        return f, log_q

    if inverse:
        c = u.to(torch.float64).clamp(-math.pi, math.pi)
        return cdf(c)
    target = u.to(torch.float64).clamp(0.0, 1.0)
    with torch.no_grad():
        # the distribution function without logs, for the bracketing (cheap, accurate enough)
        consts = []
        for ls in (log_scale, log_scale_far):
            sc = torch.exp(_soft_log_scale(ls, MIN_LOG_SCALE, MAX_LOG_SCALE))
            consts.append((sc, torch.sigmoid(-math.pi / sc), torch.tanh(0.5 * math.pi / sc)))
        (s0, f0, d0), (s1, f1, d1) = consts
        rho = torch.exp(rho_log)

        def fast_cdf(c: torch.Tensor) -> torch.Tensor:
            g0 = (torch.sigmoid(c / s0) - f0) / d0
            low = c < 0
            g1 = (torch.sigmoid(torch.where(low, c + math.pi, c - math.pi) / s1) - f1) / d1
            return (1 - rho) * g0 + rho * torch.where(low, g1 - 0.5, g1 + 0.5)

        lo = torch.full_like(target, -math.pi)
        hi = torch.full_like(target, math.pi)
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            below = fast_cdf(mid) < target
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        c0 = 0.5 * (lo + hi)
        f, log_q = cdf(c0)  # one Newton step with the accurate function, kept inside the bracket
        c0 = (c0 - (f - target) / torch.exp(log_q)).clamp(lo, hi)
    f, log_q = cdf(c0)
    c = (c0 - (f - target) / torch.exp(log_q).detach()).clamp(-math.pi, math.pi)
    _, log_q = cdf(c)
    return c, -log_q


def logistic_concentration(
    x: torch.Tensor,
    log_scale: torch.Tensor,
    rotation: torch.Tensor | None = None,
    *,
    inverse: bool = False,
    min_log_scale: float = MIN_LOG_SCALE,
    max_log_scale: float = MAX_LOG_SCALE,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Concentrating map of the circle: truncated-logistic inverse distribution function, then a rotation.

    y = (G_s^{-1}(x / 2 pi) + rotation) mod 2 pi with G_s^{-1} of
    :func:`truncated_logistic_icdf`. It pushes the uniform distribution of x to the
    logistic of scale s truncated to (-pi, pi] and centred at ``rotation``: exponential
    tails (a Moebius map or a non-compact projection pushes it to a wrapped Cauchy, whose
    algebraic tails put far more mass where a sharp target has none; Rezende et al.
    2002.02428, section 2.1). For large s it tends to a rotation by ``rotation - pi``. It
    is a circle homeomorphism, smooth except at x = 0, where its density is continuous.

    Arguments:
        x: Angles, shape (...), float64; reduced mod 2 pi into [0, 2 pi) first.
        log_scale: log s, shape (...) (soft-clamped as in :func:`truncated_logistic_icdf`).
        rotation: Angle of the mode, shape (...); default 0.
        inverse: Evaluate the inverse map.
        min_log_scale: Lower end of log s.
        max_log_scale: Upper end of log s.

    Returns:
        ``(y, log|dy/dx|)`` with y in [0, 2 pi), shape (...), float64 (for the inverse, x
        and the log-derivative of the inverse map).
    """
    x = torch.remainder(x.to(torch.float64), TWO_PI)
    if not inverse:
        c, ld = truncated_logistic_icdf(x / TWO_PI, log_scale, min_log_scale=min_log_scale, max_log_scale=max_log_scale)
        if rotation is not None:
            c = c + rotation.to(torch.float64)
        return torch.remainder(c, TWO_PI), ld - math.log(TWO_PI)
    c = x
    if rotation is not None:
        c = c - rotation.to(torch.float64)
    c = torch.remainder(c + math.pi, TWO_PI) - math.pi  # (-pi, pi]
    u, ld = truncated_logistic_icdf(
        c, log_scale, inverse=True, min_log_scale=min_log_scale, max_log_scale=max_log_scale
    )
    return torch.remainder(TWO_PI * u, TWO_PI), ld + math.log(TWO_PI)


def mixture_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the first axis (the components of a mixture, mixture-first layout) as elementwise
    additions in order, component 0 first: ``t[0] + t[1] + ...``.

    The mixtures of :func:`ncp_mixture` reduce over two to a few components at every site, in
    each layer's forward and backward pass; with the components as the slow axis each term is
    one contiguous block, and the additions cost a fraction of torch's reduction along a short
    last axis (about 5 us against 32 us for 64 x 16 x 2 float64 on one thread, measured with
    torch 2.13 on AVX2). Each entry is summed in the same order wherever it sits in the tensor,
    so the result does not depend on the batch (DESIGN section 4). Differentiable.

    Arguments:
        t: Shape (M, ...), M >= 1, any real dtype.

    Returns:
        Shape (...), the dtype of ``t``.
    """
    out = t[0]
    for k in range(1, t.shape[0]):
        out = out + t[k]
    return out


def _mixture_first(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-component parameters (..., M) of any real dtype -> (M, ...) float64, contiguous, the
    leading axes broadcast with x's: the layout in which :func:`ncp_mixture` and
    :func:`ncp_mixture_saved` compute (each component one contiguous block)."""
    lead = torch.broadcast_shapes(t.shape[:-1], x.shape)
    if t.shape[:-1] != lead:
        t = t.expand(*lead, t.shape[-1])
    return t.to(torch.float64).movedim(-1, 0).contiguous()


def _ncp_parts(
    x: torch.Tensor, a: torch.Tensor, weights: torch.Tensor, derivative: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mixture f(x) and, with ``derivative``, f'(x) for x in [0, 2 pi]; ``a`` = exp(log a_k) and
    ``weights``, (M, ...), mixture-first."""
    half = 0.5 * x
    sn, cs = torch.sin(half), torch.cos(half)
    a_sn = a * sn
    # 2 atan(a tan(x/2)) written with atan2: finite at x = pi; sin(x/2) >= 0 on [0, 2 pi], so
    # atan2 lies in [0, pi] and f in [0, 2 pi] without any wrapping
    f = mixture_sum(weights * (2 * torch.atan2(a_sn, cs)))
    if not derivative:
        return f, None
    return f, mixture_sum(weights * (a / (cs * cs + a_sn * a_sn)))


def ncp_mixture_saved(
    max_log_scale: float,
    x: torch.Tensor,
    log_scales: torch.Tensor,
    mix_logits: torch.Tensor,
    rotation: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """The forward map of :func:`ncp_mixture` (the same operations on the same layout, the same
    values bit for bit) and what :func:`ncp_mixture_backward` needs; no autograd.

    Arguments:
        max_log_scale: Soft clamp of log a_k.
        x, rotation: As for :func:`ncp_mixture`.
        log_scales, mix_logits: log a_k and the mixture logits mixture-first, (M, ...) float64,
            contiguous (what :func:`ncp_mixture` computes with: :func:`_mixture_first`).

    Returns:
        ``(y, log f'(x), saved)``; y and log f' of shape (...), float64.
    """
    m = max_log_scale
    th = torch.tanh(log_scales.to(torch.float64) / m)
    a = torch.exp(m * th)
    w = torch.softmax(mix_logits.to(torch.float64), dim=0)
    xr = torch.remainder(x.to(torch.float64), TWO_PI)
    half = 0.5 * xr
    sn, cs = torch.sin(half), torch.cos(half)
    a_sn = a * sn
    phi = 2 * torch.atan2(a_sn, cs)
    w_phi = w * phi
    f = mixture_sum(w_phi)
    den = cs * cs + a_sn * a_sn
    psi = a / den
    w_psi = w * psi
    df = mixture_sum(w_psi)
    if rotation is not None:
        f = f + rotation.to(torch.float64)
    return torch.remainder(f, TWO_PI), torch.log(df), (th, a, w, sn, cs, den, w_phi, w_psi, df)


def ncp_mixture_backward(
    saved: tuple[torch.Tensor, ...], gy: torch.Tensor | None, gl: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Gradients of :func:`ncp_mixture_saved`'s outputs pulled back to its inputs.

    With s = sin(x/2), c = cos(x/2), D_k = c^2 + a_k^2 s^2, phi_k = 2 atan2(a_k s, c) and
    psi_k = a_k / D_k: df/dx = f' = sum_k w_k psi_k, d psi_k/dx = -a_k (a_k^2 - 1) s c / D_k^2,
    d phi_k/da_k = 2 s c / D_k, d psi_k/da_k = (c^2 - a_k^2 s^2) / D_k^2; then through
    a_k = exp(m tanh(log a_k / m)) and w = softmax(mix_logits). The rotation and both
    reductions mod 2 pi have derivative 1.

    Arguments:
        saved: The third output of :func:`ncp_mixture_saved`.
        gy: Gradient of y, shape (...), float64 (``None``: zero).
        gl: Gradient of log f', shape (...), float64 (``None``: zero).

    Returns:
        ``(g_x, g_log_scales, g_mix_logits, g_rotation)``, float64: g_x and g_rotation of shape
        (...), the other two mixture-first, (M, ...), as :func:`ncp_mixture_saved` takes them.
    """
    th, a, w, sn, cs, den, w_phi, w_psi, df = saved
    gy = torch.zeros_like(df) if gy is None else gy
    g_df = torch.zeros_like(df) if gl is None else gl / df  # through log f'
    sc = sn * cs  # (...), as sn and cs
    w_q = w_psi / den  # w_k a_k / D_k^2
    aa = a * a
    # df/dx = sum_k w_k d psi_k/dx = s c sum_k w_k a_k (1 - a_k^2) / D_k^2
    grad_x = gy * df + g_df * (sc * mixture_sum(w_q * (1 - aa)))
    # a_k times the gradient of a_k: w_k a_k (gy d phi_k/da_k + g_df d psi_k/da_k)
    ga_a = (2 * sc * gy) * w_psi + (g_df * w_q) * (cs * cs - aa * (sn * sn))
    g_log_scales = ga_a * (1 - th * th)  # d a / d log a = a (1 - th^2) through the soft clamp
    wg = gy * w_phi + g_df * w_psi  # w_k times the gradient of w_k
    g_logits = wg - w * mixture_sum(wg)  # through the softmax
    return grad_x, g_log_scales, g_logits, gy


class _NCPForward(torch.autograd.Function):
    """The forward map of :func:`ncp_mixture` as one autograd node (training steps):
    :func:`ncp_mixture_saved` with :func:`ncp_mixture_backward` as its backward. A training
    step records one node for the mixture instead of some twenty-five. First order only.

    ``apply(max_log_scale, x, log_scales, mix_logits[, rotation]) -> (y, log f'(x))``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        max_log_scale: float,
        x: torch.Tensor,
        log_scales: torch.Tensor,
        mix_logits: torch.Tensor,
        rotation: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ls, lg = _mixture_first(log_scales, x), _mixture_first(mix_logits, x)
        y, ld, saved = ncp_mixture_saved(max_log_scale, x, ls, lg, rotation)
        ctx.save_for_backward(*saved)
        ctx.dtypes = (x.dtype, log_scales.dtype, mix_logits.dtype, None if rotation is None else rotation.dtype)
        return y, ld

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gy: torch.Tensor | None, gl: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        g_x, g_ls, g_lg, g_rot = ncp_mixture_backward(ctx.saved_tensors, gy, gl)
        dt = ctx.dtypes
        out = [
            g_x.to(dt[0]) if ctx.needs_input_grad[1] else None,
            # back to (..., M), the inputs' layout (autograd sums over axes that were broadcast)
            g_ls.movedim(0, -1).to(dt[1]) if ctx.needs_input_grad[2] else None,
            g_lg.movedim(0, -1).to(dt[2]) if ctx.needs_input_grad[3] else None,
        ]
        if dt[3] is not None:
            out.append(g_rot.to(dt[3]) if ctx.needs_input_grad[4] else None)
        return (None, *out)


def ncp_mixture(
    x: torch.Tensor,
    log_scales: torch.Tensor,
    mix_logits: torch.Tensor,
    rotation: torch.Tensor | None = None,
    *,
    inverse: bool = False,
    max_log_scale: float = 5.0,
    bisection_steps: int = 60,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Mixture of non-compact projections on the circle, then a rotation.

    f(x) = sum_k w_k 2 atan(a_k tan(x/2)) on [0, 2 pi), with a_k = exp(log_scales_k)
    (soft-clamped to |log a| <= ``max_log_scale``) and w = softmax(mix_logits); each
    component is an increasing bijection of [0, 2 pi] with f(0) = 0, so the convex mixture
    is one too, with f'(x) = sum_k w_k a_k / (cos^2(x/2) + a_k^2 sin^2(x/2)) > 0
    (Kanwar et al. 2003.06413, section IV.B; Rezende et al. 2002.02428, eq. 6).
    y = (f(x) + rotation) mod 2 pi.

    The inverse has no closed form: it is bracketed by ``bisection_steps`` bisection
    steps (error 2 pi / 2^steps) and finished by one Newton step written so that autograd
    sees the implicit derivative dx/dy = 1/f'(x) (needed by path gradients).

    Arguments:
        x: Angles, shape (...), float64; reduced mod 2 pi first.
        log_scales: log a_k, shape (..., M).
        mix_logits: Mixture logits, shape (..., M).
        rotation: Shape (...) or ``None``.
        inverse: Evaluate the inverse map.
        max_log_scale: Soft clamp of log a_k.
        bisection_steps: Bisection iterations of the inverse.

    Returns:
        ``(y, log|dy/dx|)`` in [0, 2 pi), shape (...), float64 (for the inverse the
        log-derivative of the inverse map).
    """
    if rotation is not None:  # the layout below follows x's shape: broadcast it with the rotation's first
        shape = torch.broadcast_shapes(x.shape, rotation.shape, log_scales.shape[:-1], mix_logits.shape[:-1])
        if x.shape != shape:
            x = x.expand(shape)
    if not inverse and torch.is_grad_enabled():
        args = (x, log_scales, mix_logits) + (() if rotation is None else (rotation,))
        if any(t.requires_grad for t in args):
            y, ld = _NCPForward.apply(max_log_scale, *args)
            return y, ld
    # mixture-first (M, ...), as ncp_mixture_saved: softmax and sums over a leading axis (torch's
    # CPU kernels are several times slower along a short last axis), each component contiguous
    a = torch.exp(max_log_scale * torch.tanh(_mixture_first(log_scales, x) / max_log_scale))
    w = torch.softmax(_mixture_first(mix_logits, x), dim=0)
    x = torch.remainder(x.to(torch.float64), TWO_PI)
    if not inverse:
        f, df = _ncp_parts(x, a, w)
        assert df is not None
        if rotation is not None:
            f = f + rotation.to(torch.float64)
        return torch.remainder(f, TWO_PI), torch.log(df)
    target = x
    if rotation is not None:
        target = torch.remainder(target - rotation.to(torch.float64), TWO_PI)
    with torch.no_grad():
        lo = torch.zeros_like(target)
        hi = torch.full_like(target, TWO_PI)
        tgt, aa, ww = target.detach(), a.detach(), w.detach()
        for _ in range(bisection_steps):
            mid = 0.5 * (lo + hi)
            below = _ncp_parts(mid, aa, ww, derivative=False)[0] < tgt
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        x0 = 0.5 * (lo + hi)
    f0, df0 = _ncp_parts(x0, a, w)
    assert df0 is not None
    xs = (x0 - (f0 - target) / df0).clamp(0.0, TWO_PI)
    _, df = _ncp_parts(xs, a, w)
    assert df is not None
    return torch.remainder(xs, TWO_PI), -torch.log(df)
