"""Group utilities for U(1) and SU(N) lattice gauge fields.

Conventions: SU(N) elements are complex128 N x N matrices in the last two axes; the
Lie algebra su(N) is represented by traceless anti-Hermitian matrices X, with group
elements exp(X). U(1) elements are angles theta in (-pi, pi], the link being exp(i theta).
"""

from __future__ import annotations

import math

import torch

from flowplug.errors import ShapeError


def _check_square(m: torch.Tensor, what: str) -> int:
    if m.dim() < 2 or m.shape[-1] != m.shape[-2]:
        raise ShapeError(f"{what}: expected (..., N, N) matrices, found shape {tuple(m.shape)}")
    return m.shape[-1]


def wrap_angle(theta: torch.Tensor) -> torch.Tensor:
    r"""Wrap U(1) angles into (-pi, pi].

    Arguments:
        theta: Any shape, real.

    Returns:
        Same shape and dtype, values in (-pi, pi].
    """
    out = torch.remainder(theta + math.pi, 2 * math.pi) - math.pi
    return torch.where(out <= -math.pi, out + 2 * math.pi, out)


def project_algebra(m: torch.Tensor) -> torch.Tensor:
    r"""Traceless anti-Hermitian part of a matrix: (M - M^+)/2 - tr(M - M^+)/(2N) 1.

    Arguments:
        m: Shape (..., N, N), complex.

    Returns:
        Shape (..., N, N), an element of su(N).

    Raises:
        ShapeError: if the last two axes are not square.
    """
    n = _check_square(m, "project_algebra")
    a = 0.5 * (m - m.mH)
    tr = torch.diagonal(a, dim1=-2, dim2=-1).sum(-1) / n
    eye = torch.eye(n, dtype=m.dtype, device=m.device)
    return a - tr[..., None, None] * eye


def expmap(x: torch.Tensor) -> torch.Tensor:
    r"""Exponential map su(N) -> SU(N), exp(X) by ``torch.linalg.matrix_exp``.

    Arguments:
        x: Traceless anti-Hermitian matrices, shape (..., N, N), complex128.

    Returns:
        SU(N) matrices of the same shape (differentiable).

    Raises:
        ShapeError: if the last two axes are not square.
    """
    _check_square(x, "expmap")
    return torch.linalg.matrix_exp(x)


def haar_random(shape: tuple[int, ...], n: int, *, generator: torch.Generator | None = None,
                dtype: torch.dtype = torch.complex128, device: torch.device | str | None = None) -> torch.Tensor:
    r"""Haar-distributed SU(N) matrices.

    A complex Gaussian matrix is QR-decomposed, the phases of R's diagonal are moved
    into Q (Haar on U(N), Mezzadri, math-ph/0609050, section 5), and Q is divided by
    an N-th root of its determinant, which maps Haar on U(N) to Haar on SU(N).

    Arguments:
        shape: Batch shape; the result has shape ``shape + (n, n)``.
        n: N >= 1.
        generator: Random number generator (for reproducibility).
        dtype: complex64 or complex128.
        device: Target device.

    Returns:
        Tensor of shape ``shape + (n, n)``.
    """
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    g = torch.randn(*shape, n, n, 2, generator=generator, dtype=real, device=device)
    z = torch.complex(g[..., 0], g[..., 1]) / math.sqrt(2.0)
    q, r = torch.linalg.qr(z)
    d = torch.diagonal(r, dim1=-2, dim2=-1)
    q = q * (d / d.abs())[..., None, :]
    phase = torch.angle(torch.linalg.det(q))
    return (q * torch.exp(-1j * phase / n)[..., None, None]).to(dtype)


def reunitarize(u: torch.Tensor) -> torch.Tensor:
    r"""Closest SU(N) matrix (polar decomposition by SVD, then the determinant phase removed).

    Arguments:
        u: Shape (..., N, N), complex; nearly unitary matrices (after rounding).

    Returns:
        SU(N) matrices of the same shape.

    Raises:
        ShapeError: if the last two axes are not square.
    """
    n = _check_square(u, "reunitarize")
    w, _, vh = torch.linalg.svd(u)
    v = w @ vh
    phase = torch.angle(torch.linalg.det(v))
    return v * torch.exp(-1j * phase / n)[..., None, None]


def su_generators(n: int, *, dtype: torch.dtype = torch.complex128,
                  device: torch.device | str | None = None) -> torch.Tensor:
    r"""Anti-Hermitian basis t_a = i lambda_a / 2 of su(N), with tr(t_a t_b) = -delta_ab / 2.

    lambda_a are the generalised Gell-Mann matrices (Pauli matrices for N = 2, Gell-Mann
    matrices for N = 3, up to ordering): N(N-1)/2 symmetric, N(N-1)/2 antisymmetric and
    N-1 diagonal ones, normalised to tr(lambda_a lambda_b) = 2 delta_ab.

    With P = sum_a p_a t_a the kinetic energy (1/2) sum_a p_a^2 equals -tr(P^2) =
    sum_ij |P_ij|^2 (the HMC convention of :mod:`flowplug.theory`).

    Arguments:
        n: N >= 2.
        dtype: complex dtype of the result.
        device: Target device.

    Returns:
        Tensor of shape (N^2 - 1, N, N).

    Raises:
        ShapeError: if n < 2.
    """
    if n < 2:
        raise ShapeError(f"su(N) generators need N >= 2; found N = {n}")
    mats = []
    for j in range(n):
        for k in range(j + 1, n):
            s = torch.zeros(n, n, dtype=torch.complex128)
            s[j, k] = s[k, j] = 1.0
            a = torch.zeros(n, n, dtype=torch.complex128)
            a[j, k], a[k, j] = -1j, 1j
            mats += [s, a]
    for m in range(1, n):
        diag = torch.zeros(n, dtype=torch.complex128)
        diag[:m] = 1.0
        diag[m] = -m
        mats.append(torch.diag(diag) * math.sqrt(2.0 / (m * (m + 1))))
    lam = torch.stack(mats)
    return (0.5j * lam).to(dtype=dtype, device=device)


def random_algebra(shape: tuple[int, ...], n: int, *, generator: torch.Generator | None = None,
                   dtype: torch.dtype = torch.complex128,
                   device: torch.device | str | None = None) -> torch.Tensor:
    r"""Gaussian su(N) elements P = sum_a p_a t_a with p_a ~ N(0, 1) independent.

    The density is proportional to exp(tr P^2) = exp(-(1/2) sum_a p_a^2): the HMC
    momentum distribution for the kinetic energy -tr(P^2) (see :func:`su_generators`).

    Arguments:
        shape: Batch shape; the result has shape ``shape + (n, n)``.
        n: N >= 2.
        generator: Random number generator.
        dtype: complex dtype of the result.
        device: Target device.

    Returns:
        Traceless anti-Hermitian matrices, shape ``shape + (n, n)``.
    """
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    t = su_generators(n, dtype=dtype, device=device)
    p = torch.randn(*shape, n * n - 1, generator=generator, dtype=real, device=device)
    return torch.einsum("...a,aij->...ij", p.to(dtype), t)


def algebra_components(x: torch.Tensor) -> torch.Tensor:
    r"""Real coordinates p_a of X = sum_a p_a t_a in the basis of :func:`su_generators`.

    p_a = -2 Re tr(t_a X); the inverse of :func:`random_algebra`'s construction.

    Arguments:
        x: su(N) elements, shape (..., N, N), complex.

    Returns:
        Shape (..., N^2 - 1), real.

    Raises:
        ShapeError: if the last two axes are not square.
    """
    n = _check_square(x, "algebra_components")
    t = su_generators(n, dtype=x.dtype, device=x.device)
    return -2.0 * torch.einsum("aij,...ji->...a", t, x).real
