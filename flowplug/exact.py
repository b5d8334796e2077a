r"""Exact expectation values of 2D lattice gauge theories on a periodic L x L torus.

Used by the exactness tests and by ``flowplug demo`` to compare Markov-chain estimates
with the truth. Only numpy is needed: the modified Bessel functions and the angular
integrals are periodic integrals over (-pi, pi], which the trapezoidal rule on an
equispaced grid computes to machine precision (exponential convergence for smooth
periodic integrands; Trefethen & Weideman, SIAM Review 56 (2014) 385); the non-periodic
integrands of <Q^2> use Gauss-Legendre quadrature.

Formulas (see ``reference/README.md`` of the shared validation data):

U(1), S = -beta sum_x cos theta_P(x), V = L^2 plaquettes,
    Z = sum_n I_n^V,  <P> = sum_n I_n^{V-1} I_n' / Z,  I_n' = (I_{n-1} + I_{n+1})/2,
    <Q^2> = sum_n [V I_n^{V-1} g_n - V (V-1) I_n^{V-2} h_n^2] / Z,
    g_n = (1/2pi) int (phi/2pi)^2 cos(n phi) e^{beta cos phi},
    h_n = (1/2pi) int (phi/2pi) sin(n phi) e^{beta cos phi}.
SU(2), S = -(beta/2) sum_x Re tr U_P: character expansion with c_n/d_n = 2 I_n(beta)/beta
    (n = 2j + 1 = 1, 2, ...), Z = sum_n (c_n/d_n)^V, <P> = (1/V) d ln Z / d beta.

References:
    Bonati & Rossi, Phys. Rev. D 99 (2019) 054503 (2D U(1) on the torus);
    Drouffe & Zuber, Phys. Rep. 102 (1983) 1 (character expansion).
"""

from __future__ import annotations

import functools
import math

import numpy as np

_GRID = 1024


def _grid() -> np.ndarray:
    return -math.pi + 2 * math.pi * (np.arange(_GRID) + 0.5) / _GRID


def _periodic_mean(values: np.ndarray) -> np.ndarray:
    """(1/2pi) int_{-pi}^{pi} f(phi) dphi for samples on :func:`_grid` (last axis)."""
    return values.mean(axis=-1)


def bessel_i(n: np.ndarray | int, beta: float) -> np.ndarray:
    """Modified Bessel functions I_n(beta) = (1/2pi) int e^{beta cos phi} cos(n phi) dphi.

    Arguments:
        n: Integer order(s), any shape.
        beta: Argument (float, |beta| up to ~50).

    Returns:
        float64 array of the shape of ``n``.
    """
    phi = _grid()
    n = np.asarray(n, dtype=np.float64)
    return _periodic_mean(np.exp(beta * np.cos(phi)) * np.cos(n[..., None] * phi))


@functools.cache
def _gauss_legendre(n: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of n-point Gauss-Legendre quadrature on [-pi, pi] for the mean (1/2pi) int."""
    t, w = np.polynomial.legendre.leggauss(n)
    return math.pi * t, w / 2.0


def _orders(beta: float) -> np.ndarray:
    return np.arange(-int(30 + 4 * beta), int(30 + 4 * beta) + 1)


def u1_2d(L: int, beta: float) -> dict[str, float]:
    """Exact <P> and <Q^2> of 2D U(1) Wilson gauge theory on an L x L torus.

    Arguments:
        L: Linear size (V = L^2 plaquettes), >= 1.
        beta: Coupling, >= 0.

    Returns:
        ``{"plaquette": <P>, "q2": <Q^2>}`` (P = mean cos theta_P, Q geometric charge).

    Raises:
        ValueError: for L < 1 or beta < 0.
    """
    if int(L) < 1 or beta < 0:
        raise ValueError(f"u1_2d needs L >= 1 and beta >= 0; found L={L}, beta={beta}")
    V = int(L) ** 2
    n = _orders(beta)
    i_n = bessel_i(n, beta)
    i_dn = 0.5 * (bessel_i(n - 1, beta) + bessel_i(n + 1, beta))
    # g_n, h_n: integrands smooth on [-pi, pi] but not periodic -> Gauss-Legendre
    phi, wt = _gauss_legendre()
    w = wt * np.exp(beta * np.cos(phi))
    g = np.sum((phi / (2 * math.pi)) ** 2 * np.cos(n[:, None] * phi) * w, axis=-1)
    h = np.sum((phi / (2 * math.pi)) * np.sin(n[:, None] * phi) * w, axis=-1)
    # scale by I_0^V to avoid overflow: ratios r_n = I_n / I_0
    i0 = i_n[n == 0][0]
    r = i_n / i0
    z = np.sum(r**V)
    p = np.sum(r ** (V - 1) * i_dn / i0) / z
    q2 = np.sum(V * r ** (V - 1) * g / i0 - V * (V - 1) * r ** (V - 2) * (h / i0) ** 2) / z
    return {"plaquette": float(p), "q2": float(q2)}


def su2_2d(L: int, beta: float) -> dict[str, float]:
    """Exact <P> = <(1/2) Re tr U_P> of 2D SU(2) Wilson gauge theory on an L x L torus.

    Arguments:
        L: Linear size (V = L^2 plaquettes), >= 1.
        beta: Coupling, > 0.

    Returns:
        ``{"plaquette": <P>}``.

    Raises:
        ValueError: for L < 1 or beta <= 0.
    """
    if int(L) < 1 or not beta > 0:
        raise ValueError(f"su2_2d needs L >= 1 and beta > 0; found L={L}, beta={beta}")
    V = int(L) ** 2
    n = np.arange(1, int(40 + 4 * beta))
    i_n = bessel_i(n, beta)
    di_n = 0.5 * (bessel_i(n - 1, beta) + bessel_i(n + 1, beta))
    a = 2 * i_n / beta  # c_n / d_n
    da = 2 * di_n / beta - 2 * i_n / beta**2
    r = a / a[0]
    z = np.sum(r**V)
    dlnz = np.sum(V * r ** (V - 1) * da / a[0]) / z
    return {"plaquette": float(dlnz / V)}
