"""Group utilities for U(1) and SU(N) lattice gauge fields.

Conventions: SU(N) elements are complex128 N x N matrices in the last two axes; the
Lie algebra su(N) is represented by traceless anti-Hermitian matrices X, with group
elements exp(X). U(1) elements are angles theta in (-pi, pi], the link being exp(i theta).
"""

from __future__ import annotations

import functools
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
    diag = torch.diagonal(a, dim1=-2, dim2=-1)
    return a - torch.diag_embed(tr[..., None].expand_as(diag))


def expmap(x: torch.Tensor) -> torch.Tensor:
    r"""Exponential map su(N) -> SU(N), exp(X) for traceless anti-Hermitian X.

    N = 2: closed form exp(X) = cos(theta) 1 + (sin(theta)/theta) X, theta^2 = det X.
    N = 3: Cayley-Hamilton, exp(X) = f0 1 + f1 X + f2 X^2 with X^3 = s1 X + s0 1
    (s1 = tr(X^2)/2, s0 = det X = tr(X^3)/3), the f_j summed from the exponential series
    through that recursion (to rounding; scaling and squaring for large |X|).
    Other N: ``torch.linalg.matrix_exp``. All branches are differentiable and agree with
    ``matrix_exp`` to ~1e-15 (``tests/test_theories.py``), several times faster for N = 2, 3.

    Arguments:
        x: Traceless anti-Hermitian matrices, shape (..., N, N), complex128 (the result
            for other matrices is undefined for N = 2, 3).

    Returns:
        SU(N) matrices of the same shape.

    Raises:
        ShapeError: if the last two axes are not square.

    References:
        Cayley-Hamilton exponential for SU(3): Morningstar & Peardon, hep-lat/0311018,
        section III (here with the series summed directly instead of the closed form).
    """
    n = _check_square(x, "expmap")
    if n == 2:
        # X^2 = -det(X) 1 for traceless 2x2; det X = theta^2 >= 0 for X in su(2)
        det = (x[..., 0, 0] * x[..., 1, 1] - x[..., 0, 1] * x[..., 1, 0]).real
        theta = torch.sqrt(torch.clamp(det, min=0.0))
        c = torch.cos(theta).to(x.dtype)[..., None, None]
        sinc = torch.sinc(theta / math.pi).to(x.dtype)[..., None, None]
        eye = torch.eye(2, dtype=x.dtype, device=x.device)
        return c * eye + sinc * x
    if n == 3:
        return _expmap_su3(x)
    return torch.linalg.matrix_exp(x)


#: :func:`small_matmul` on CUDA as broadcast multiply-adds (``False``: ``a @ b`` there too; for
#: side-by-side timings, ``benchmarks/gpu_parts.py``).
SMALL_MATMUL_ELEMENTWISE = True


def small_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""``a @ b`` for stacks of small N x N matrices (links, staples), on any device.

    On CUDA for N <= 4 the product is N broadcast multiply-adds,
    out = sum_j a[..., :, j, None] * b[..., None, j, :]: a batched GEMM of millions of 3 x 3
    matrices is launched there with most of each thread block idle, many times slower than the
    few elementwise passes over the links that the sum costs. Elsewhere (CPU, N > 4) it is
    ``a @ b``, bit for bit.

    Arguments:
        a, b: Shapes (..., N, N) with broadcastable leading axes, complex or real, on one device.

    Returns:
        (..., N, N), the matrix product (to rounding: the sum's order differs from a GEMM's on CUDA).
    """
    if a.device.type != "cuda" or a.shape[-1] > 4 or not SMALL_MATMUL_ELEMENTWISE:
        return a @ b
    return _matmul_elementwise(a, b)


def _matmul_elementwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_j a[..., :, j, None] * b[..., None, j, :]: the CUDA branch of :func:`small_matmul` (any device)."""
    out = a[..., :, 0:1] * b[..., 0:1, :]
    for j in range(1, a.shape[-1]):
        out = out + a[..., :, j : j + 1] * b[..., j : j + 1, :]
    return out


def _cayley_series(s0: torch.Tensor, s1: torch.Tensor, terms: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(f0, f1, f2) with exp(X) = f0 1 + f1 X + f2 X^2 from the exponential series through
    X^3 = s1 X + s0 1, summed to ``terms`` terms (:func:`expmap`): (a, b, c) <- (c s0, a + c s1, b)
    from (1, 0, 0), each term added with weight 1/k!. In-place multiply-adds (on a GPU, which is
    bound by kernel launches here, half the launches of out-of-place sums; on the CPU bit for bit
    the same values)."""
    a = torch.ones_like(s1)
    b = torch.zeros_like(s1)
    c = torch.zeros_like(s1)
    f0, f1, f2 = a.clone(), b.clone(), c.clone()
    fact = 1.0
    for k in range(1, terms + 1):
        a, b, c = c * s0, torch.addcmul(a, c, s1), b
        fact /= k
        f0.add_(a, alpha=fact)
        f1.add_(b, alpha=fact)
        f2.add_(c, alpha=fact)
    return f0, f1, f2


def _expmap_su3(x: torch.Tensor) -> torch.Tensor:
    # Frobenius norm bounds the eigenvalues; scale the batch so that it is <= 1
    x2 = small_matmul(x, x)
    s1 = 0.5 * torch.diagonal(x2, dim1=-2, dim2=-1).sum(-1)
    r = math.sqrt(max(0.0, float((-2.0 * s1.real).detach().amax()))) if x.numel() else 0.0
    squarings = math.ceil(math.log2(r)) if r > 1.0 else 0
    if squarings:
        x = x / (2**squarings)
        x2 = x2 / (4**squarings)
        s1 = s1 / (4**squarings)
        r = r / (2**squarings)
    s0 = (x2 * x.transpose(-1, -2)).sum((-1, -2)) / 3.0  # tr(X^3)/3 = det X (traceless)
    # series terms are bounded by r^k / k!; stop when that is below 1e-17
    terms, bound = 0, 1.0
    while bound > 1e-17 and terms < 40:
        terms += 1
        bound *= r / terms
    f0, f1, f2 = _cayley_series(s0, s1, terms)
    eye = torch.eye(3, dtype=x.dtype, device=x.device)
    u = f0[..., None, None] * eye + f1[..., None, None] * x + f2[..., None, None] * x2
    for _ in range(squarings):
        u = small_matmul(u, u)
    return u


def haar_random(
    shape: tuple[int, ...],
    n: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.complex128,
    device: torch.device | str | None = None,
) -> torch.Tensor:
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


def haar_random_su3(
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.complex128,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    r"""Haar-distributed SU(3) matrices from two Gaussian rows and a cross product (no QR).

    Two independent standard complex Gaussian vectors v_1, v_2 in C^3 are orthonormalised
    (Gram-Schmidt: r_1 = v_1 / |v_1|, r_2 = w / |w| with w = v_2 - <r_1, v_2> r_1) and the
    third row is r_3 = conj(r_1 x r_2), the unique completion of (r_1, r_2) to a matrix of
    SU(3). Exactly Haar: the law of (v_1 V, v_2 V) equals that of (v_1, v_2) for every
    unitary V, Gram-Schmidt commutes with V, and the rows of M V, for V in SU(3), are
    r_1 V, r_2 V and conj(r_1 V x r_2 V) = r_3 V; so the law of M is invariant under
    M -> M V and is Haar measure on SU(3) (the density relative to Haar is exactly 1, as
    for :func:`haar_random`, whose samples for the same generator differ). Several times
    cheaper than a batched QR of 3 x 3 matrices.

    Arguments:
        shape: Batch shape; the result has shape ``shape + (3, 3)``.
        generator: Random number generator (for reproducibility).
        dtype: complex64 or complex128.
        device: Target device.

    Returns:
        Tensor of shape ``shape + (3, 3)`` in ``dtype``.

    Raises:
        ShapeError: (a ValueError) for a dtype that is not complex64 or complex128.

    References:
        Mezzadri, math-ph/0609050 (Haar measure from Gaussian matrices).
    """
    if dtype not in (torch.complex64, torch.complex128):
        raise ShapeError(f"haar_random_su3: dtype must be complex64 or complex128; found {dtype}")
    g = torch.randn(*shape, 2, 3, 2, generator=generator, dtype=torch.float64, device=device)
    v1, v2 = torch.view_as_complex(g).unbind(-2)  # (..., 3) each
    # norms from the real and imaginary parts (torch's complex vector norm is far slower)
    r1 = v1 * torch.rsqrt(g[..., 0, :, :].square().sum((-1, -2)))[..., None]
    w = v2 - (r1.conj() * v2).sum(-1, keepdim=True) * r1
    r2 = w * torch.rsqrt(torch.view_as_real(w).square().sum((-1, -2)))[..., None]
    a0, a1, a2 = r1.unbind(-1)
    b0, b1, b2 = r2.unbind(-1)
    r3 = torch.stack([a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0], -1).conj()
    return torch.stack([r1, r2, r3], -2).to(dtype)


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


def su_generators(
    n: int, *, dtype: torch.dtype = torch.complex128, device: torch.device | str | None = None
) -> torch.Tensor:
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
            a[j, k], a[k, j] = -1j, 1j  # type: ignore[assignment]  # torch's stubs omit complex in __setitem__
            mats += [s, a]
    for m in range(1, n):
        diag = torch.zeros(n, dtype=torch.complex128)
        diag[:m] = 1.0
        diag[m] = -m
        mats.append(torch.diag(diag) * math.sqrt(2.0 / (m * (m + 1))))
    lam = torch.stack(mats)
    return (0.5j * lam).to(dtype=dtype, device=device)


def random_algebra(
    shape: tuple[int, ...],
    n: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.complex128,
    device: torch.device | str | None = None,
) -> torch.Tensor:
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


# --------------------------------------------------------------------------- closed-form spectra
# The routines below work on matrices stored matrix-axes-first, (N, N, M) with the batch M last:
# every step is then an elementwise operation on contiguous length-M rows, which for N = 2, 3 is
# several times cheaper on a CPU than the batched LAPACK routines (their cost per 3 x 3 matrix is
# dominated by call overhead).


def matmul_axes_first(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""Matrix product of N x N matrices stored matrix-axes-first, (N, N, ...) @ (N, N, ...).

    Arguments:
        a, b: Shapes (N, N, ...) with broadcastable trailing (batch) axes, any dtype.

    Returns:
        (N, N, ...): out[i, k] = sum_j a[i, j] b[j, k], elementwise over the trailing axes.
    """
    out = a[:, 0, None] * b[None, 0]
    for k in range(1, a.shape[1]):
        out.addcmul_(a[:, k, None], b[None, k])
    return out


@functools.cache
def _cyclic(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tensors (1, 2, 0) and (2, 0, 1): the cyclic shifts of three components."""
    return torch.tensor([1, 2, 0], device=device), torch.tensor([2, 0, 1], device=device)


def _cross(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bilinear cross product of complex 3-vectors stored component-first, (3, ...) x (3, ...):
    sum_k x_k (x cross y)_k = sum_k y_k (x cross y)_k = 0 (no complex conjugation)."""
    i1, i2 = _cyclic(x.device)
    return x.index_select(0, i1) * y.index_select(0, i2) - x.index_select(0, i2) * y.index_select(0, i1)


def _hermitian2_vectors(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal eigenvectors (u, u_perp), each (2, ...), of the traceless Hermitian 2 x 2
    matrices [[x, y], [conj(y), -x]] (x real, y complex), u for the eigenvalue +r, r = |(x, y)|.

    u is (x + r, conj y) or (y, r - x), whichever is longer (no cancellation), divided by its
    norm sqrt(2 r (r + |x|)); u = (1, 0) where r = 0 (a multiple of the identity: every basis
    is an eigenbasis). The angle error is rounding / r, as for any backward-stable solver."""
    r = torch.sqrt(x * x + (y * y.conj()).real)
    pos = x >= 0
    u0 = torch.where(pos, (x + r).to(y.dtype), y)
    u1 = torch.where(pos, y.conj(), (r - x).to(y.dtype))
    nrm2 = 2 * r * (r + x.abs())
    zero = nrm2 <= 0
    inv = torch.rsqrt(torch.where(zero, torch.ones_like(nrm2), nrm2)).to(y.dtype)
    u0 = torch.where(zero, torch.ones_like(u0), u0 * inv)
    u1 = torch.where(zero, torch.zeros_like(u1), u1 * inv)
    u = torch.stack([u0, u1])
    return u, torch.stack([-u1.conj(), u0.conj()])


def _hermitian3_vectors(h: torch.Tensor) -> torch.Tensor:
    """Orthonormal eigenvectors (3, 3, ...) (columns) of Hermitian 3 x 3 matrices (3, 3, ...).

    The traceless part, normalised to unit Frobenius norm, has eigenvalues
    y_k = sqrt(2/3) cos(psi + 2 pi k / 3) with cos(3 psi) = 3 sqrt(6) det (psi in [0, pi/3],
    the trigonometric solution of the depressed cubic). The most isolated one, y_0 for
    psi <= pi/6 and y_1 otherwise, is at least 1/sqrt(2) from the others and insensitive to
    the rounding of the acos argument; its eigenvector is the longest cross product of two
    rows of (H - y 1) (their squared lengths add up to at least 1/4). The other two come from
    the 2 x 2 matrix that H induces on the orthogonal complement
    (:func:`_hermitian2_vectors`), which needs no eigenvalue: accurate also when they
    (nearly) coincide. A multiple of the identity gets the standard basis."""
    dt = h.dtype
    ones = [1] * (h.dim() - 2)
    eye = torch.eye(3, dtype=dt, device=h.device).view(3, 3, *ones)
    mean = (h[0, 0] + h[1, 1] + h[2, 2]) / 3
    h0 = h - eye * mean
    nrm2 = (h0 * h0.conj()).real.sum((0, 1))
    # a multiple of the identity (h0 = 0) goes through as the zero matrix: psi = pi/6, y = 1/sqrt(2),
    # and every step below returns the standard basis
    hn = h0 * torch.rsqrt(nrm2.clamp_min(1e-300)).to(dt)
    det = (hn[0] * _cross(hn[1], hn[2])).sum(0).real
    psi = torch.acos((3.0 * math.sqrt(6.0) * det).clamp(-1.0, 1.0)) * (1.0 / 3.0)
    y = math.sqrt(2.0 / 3.0) * torch.cos(torch.where(psi <= math.pi / 6, psi, psi + 2 * math.pi / 3))
    rows = hn - eye * y.to(dt)
    # the cross products of the row pairs (1, 2), (2, 0), (0, 1) at once: (3 candidates, 3, ...)
    i1, i2 = _cyclic(h.device)
    cand = _cross(rows.index_select(0, i1).transpose(0, 1), rows.index_select(0, i2).transpose(0, 1)).transpose(0, 1)
    len2 = (cand * cand.conj()).real.sum(1)  # (3 candidates, ...)
    top, best = len2.max(0, keepdim=True)
    v = torch.gather(cand, 0, best.unsqueeze(1).expand(1, *cand.shape[1:]))[0] * torch.rsqrt(top[0]).to(dt)
    # complement: Gram-Schmidt of the unit vector along the smallest component of v, then the
    # conjugated cross product (orthonormal to both)
    vabs2 = (v * v.conj()).real
    low, m = vabs2.min(0, keepdim=True)
    onehot = (torch.arange(3, device=h.device).view(3, *ones) == m).to(dt)
    vm = torch.gather(v, 0, m)[0]
    e1 = (onehot - vm.conj() * v) * torch.rsqrt(1.0 - low[0]).to(dt)
    e2 = _cross(v, e1).conj()
    he2 = (hn * e2[None]).sum(1)
    b11 = (e1.conj() * (hn * e1[None]).sum(1)).sum(0).real
    b22 = (e2.conj() * he2).sum(0).real
    b12 = (e1.conj() * he2).sum(0)
    u, up = _hermitian2_vectors(0.5 * (b11 - b22), b12)
    return torch.stack([v, u[0] * e1 + u[1] * e2, up[0] * e1 + up[1] * e2], 1)


def _su_eigensystem_axes_first(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`su_eigensystem` on matrices stored matrix-axes-first: w (N, N, M) -> V (N, N, M)
    (columns), theta (N, M)."""
    n = w.shape[0]
    if n == 2:
        # the Hermitian K = (W - W^+)/(2i) has eigenvalues sin(theta) and -sin(theta), equal only
        # at W = +-1: its eigenvectors are those of W
        k = (w - w.conj().transpose(0, 1)) * (-0.5j)
        u, up = _hermitian2_vectors(0.5 * (k[0, 0] - k[1, 1]).real, k[0, 1])
        vec = torch.stack([u, up], 1)
    else:
        # Hermitian Cayley transform H = i (1 - U)(1 + U)^-1 of U = c W, c in {1, i, -1, -i} the
        # one with the largest |det(1 + c W)| (exact: multiplication by c only swaps and negates);
        # by Cayley-Hamilton (1 - U) adj(1 + U) = 2 U^2 - 2 (1 + e1) U + (1 + e1 + e2 - e3) 1
        # with e1 = c tr W, e2 = c^2 conj(tr W), e3 = c^3 (det W = 1, W unitary), and
        # det(1 + U) = 1 + e1 + e2 + e3; the positive factor |det(1 + U)|^2 is dropped
        t = w[0, 0] + w[1, 1] + w[2, 2]
        cs = torch.tensor([1.0, 1j, -1.0, -1j], dtype=w.dtype, device=w.device).view(4, *([1] * t.dim()))
        e1, e2, e3 = cs * t, cs * cs * t.conj(), cs * cs * cs
        dets = 1 + e1 + e2 + e3
        best = (dets * dets.conj()).real.max(0, keepdim=True)[1]
        pick = lambda x: torch.gather(x.expand(dets.shape), 0, best)[0]  # noqa: E731
        c, e1, e2, e3, det = pick(cs), pick(e1), pick(e2), pick(e3), pick(dets)
        u = c * w
        eye = torch.eye(3, dtype=w.dtype, device=w.device).view(3, 3, *([1] * t.dim()))
        poly = 2 * matmul_axes_first(u, u) - 2 * (1 + e1) * u + (1 + e1 + e2 - e3) * eye
        vec = _hermitian3_vectors(1j * det.conj() * poly)
    wv = matmul_axes_first(w, vec)
    theta = torch.angle((vec.conj() * wv).sum(0))
    return vec, theta


def su_eigensystem(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Orthonormal eigenvectors and eigenphases of SU(2) or SU(3) matrices in closed form.

    No LAPACK call: SU(2) through the Hermitian (W - W^+)/(2i); SU(3) through its Hermitian
    Cayley transform i (1 - cW)(1 + cW)^{-1} (|c| = 1 chosen among 1, i, -1, -i so that
    1 + cW is well conditioned), written as a quadratic polynomial in cW by Cayley-Hamilton,
    and a closed-form Hermitian 3 x 3 eigensolver (trigonometric root of the depressed cubic
    for the most isolated eigenvalue, cross products for its eigenvector, a 2 x 2 problem on
    the complement for the other two; :func:`_hermitian3_vectors`). The eigenvectors are
    orthonormal to rounding at every input, degenerate spectra and centre elements included
    (where every basis of a degenerate eigenspace is an eigenbasis, some basis is returned);
    their error, like that of any backward-stable solver, is rounding / (eigenvalue gap).
    The eigenphases are the Rayleigh quotients arg (V^+ W V)_jj.

    Arguments:
        w: SU(N) matrices, N = 2 or 3, shape (..., N, N), complex128 (or complex64).

    Returns:
        ``(V, theta)``: V (..., N, N), columns the eigenvectors, dtype of w; theta (..., N) in
        (-pi, pi], the eigenphase of each column, real dtype of w (no particular order; sum 0
        modulo 2 pi). No gradient is propagated (first-order perturbation theory gives the
        derivatives where they are needed, e.g. :mod:`flowplug.plugins.flow_stout`).

    Raises:
        ShapeError: for matrices that are not 2 x 2 or 3 x 3, or a real dtype.

    References:
        Smith, Commun. ACM 4 (1961) 168 (trigonometric eigenvalues of symmetric 3 x 3
        matrices); Kopp, arXiv:physics/0610206 (cross-product eigenvectors of Hermitian 3 x 3
        matrices); Morningstar & Peardon, hep-lat/0311018, section III (Cayley-Hamilton for SU(3)).
    """
    n = _check_square(w, "su_eigensystem")
    if n not in (2, 3) or not w.is_complex():
        raise ShapeError(
            f"su_eigensystem: expected complex SU(2) or SU(3) matrices (..., N, N) with N = 2 or 3; "
            f"found {w.dtype} {tuple(w.shape)}"
        )
    with torch.no_grad():
        batch = w.shape[:-2]
        wf = w.detach().reshape(-1, n, n).permute(1, 2, 0)
        vec, theta = _su_eigensystem_axes_first(wf)
        return vec.permute(2, 0, 1).reshape(*batch, n, n), theta.t().reshape(*batch, n)
