r"""Heatbath and overrelaxation kernels for the SU(N) Wilson action (hook ``flowplug_kernels``).

The local updates pure-gauge production codes run, as exact kernels of
:mod:`flowplug.chain` (``init``, ``step``; B independent chains at once, vectorised over
chains and sites, randomness from the ``torch.Generator`` passed to ``step``):

``heatbath`` (:class:`Heatbath`)
    one ``step`` = one sweep over every link; each link is replaced, one SU(2) subgroup
    after another, by a draw from its exact conditional distribution (Cabibbo-Marinari
    with Kennedy-Pendleton's SU(2) heatbath; option ``overrelax = n`` adds n
    overrelaxation sweeps after the heatbath sweep).
``overrelaxation`` (:class:`Overrelaxation`)
    one ``step`` = ``sweeps`` microcanonical sweeps: each SU(2) subgroup element is
    reflected through its staple direction, which leaves the action unchanged. Not
    ergodic on its own (it never changes S); combine it with ``heatbath``.
``heatbath-or`` (:class:`HeatbathOR`)
    the production mix: one heatbath sweep followed by ``overrelax`` (default 4)
    overrelaxation sweeps.

Conventions
-----------
Links U_mu(x): (B, d, L_0, ..., L_{d-1}, N, N) complex128, the canonical layout of
:mod:`flowplug.theory`. The action is :class:`flowplug.plugins.theories.WilsonGaugeAction`,
S = -(beta/N) sum_P Re tr U_P, so the conditional density of one link given all others
is proportional to exp((beta/N) Re tr(U_mu(x) A_mu(x))) with respect to Haar measure,
A_mu(x) the staple sum of :meth:`WilsonGaugeAction.staples` (the 2(d-1) staples
U_nu(x+mu) U_mu(x+nu)^+ U_nu(x)^+ and U_nu(x+mu-nu)^+ U_mu(x-nu)^+ U_nu(x-nu)).

SU(2) subgroups (Cabibbo-Marinari)
    For each pair (i, j), i < j, in the order (0,1), (0,2), ..., (N-2,N-1) (one pair
    for SU(2), three for SU(3)), the link is multiplied from the left by R, an SU(2)
    matrix r embedded in rows and columns i, j. With W = U A, Re tr(R W) = Re tr(r w) +
    const, where w is the (i,j) block of W; only the quaternion part of w contributes:
    w~ = a_0 1 + i a.sigma, a_0 = Re(w_ii + w_jj)/2, a_1 = Im(w_ij + w_ji)/2,
    a_2 = Re(w_ij - w_ji)/2, a_3 = Im(w_ii - w_jj)/2 (computed as the complex pair
    a_0 + i a_3, a_2 + i a_1 by :func:`su2_block`), written w~ = k v with
    k = |a| = sqrt(det w~) >= 0 and v in SU(2). By the invariance of Haar measure, X = r v
    has density proportional to exp((beta/N) k Re tr X) = exp(alpha X_0) with
    **alpha = 2 beta k / N**; the heatbath draws X and sets r = X v^+.
SU(2) heatbath (:func:`sample_a0`)
    X = X_0 + i X.sigma with X_0 drawn from P(X_0) ~ sqrt(1 - X_0^2) exp(alpha X_0) on
    [-1, 1] and X uniform on the sphere of radius sqrt(1 - X_0^2). Kennedy-Pendleton
    (for alpha >= ``creutz_below``, default 1.7): lambda^2 = -(ln r_1 + cos^2(2 pi r_2) ln r_3) / (2 alpha)
    (a Gamma(3/2) variable over 2 alpha), accepted if r_4^2 <= 1 - lambda^2, X_0 = 1 - 2 lambda^2;
    its acceptance rises from 0.52 at alpha = 1 to 0.96 at alpha = 10 but falls like
    alpha^{3/2} for small alpha, where Creutz's method is used instead: X_0 from the density
    exp(alpha X_0) on [-1, 1] by inversion, accepted with probability sqrt(1 - X_0^2)
    (acceptance pi I_1(alpha) / (2 sinh alpha): 0.79 at alpha -> 0, 0.69 at alpha = 2).
    The two acceptance curves cross at alpha ~ 1.7. Both are exact samplers of the same
    density, and the choice depends on alpha only, which is fixed on the set of links the
    SU(2) update moves between (for SU(2): the neighbours alone; for N > 2 also the link's
    other rows, unchanged by the subgroup update), so the mixture is exact for every alpha;
    K-P alone (``creutz_below = 0``) also works for all
    alpha, only slower at small alpha. The rejection loop is vectorised: every round
    draws ``candidates`` proposals for each entry still pending and keeps the first
    accepted one (the sequential algorithm's outcome), repeating only for entries
    with none accepted.
Overrelaxation
    r = (v^+)^2 maps w~ = k v to k v^+: Re tr(r w~) = Re tr(v^+) k = Re tr(w~), so S is
    unchanged; applied again (its staple block is now k v^+) it gives r' = v^2, undoing the
    first (an involution). On the link, U -> (v^+)^2 U; writing the links of the subgroup's
    coset as U = R U_0 (block k_0 v_0 at R = 1, so v = r v_0), the map is
    r -> B r^+ B with B = v_0^+ fixed (for SU(2): U -> B U^+ B, B = A^+ / k), a
    composition of Haar-preserving maps, so the reflection is a measure-preserving
    involution that conserves S and leaves exp(-S) invariant (Adler; Brown and Woch).
    Degenerate staples (k = 0, measure zero) leave the link as it is.

Colouring
    Links are updated in 2d colour classes (mu, parity of sum_a x_a), one class at a time,
    mu = 0..d-1 and parity even then odd within each mu. The staple of U_mu(x) holds
    links U_nu(y) with nu != mu, and U_mu(x +- nu), whose parity is opposite on a periodic
    lattice with even extents; so no plaquette contains two links of one class, the links
    of a class are independent given the rest, and updating them all at once is an exact
    Gibbs step. An odd extent breaks this (x and x + nu can share a parity across the
    boundary) and is refused (:class:`flowplug.errors.ConfigError`). Extents must be >= 2.

Rounding
    Every update multiplies a link by an SU(2) matrix that is unitary to rounding, so
    unitarity drifts only like a random walk of 1e-16 steps; with ``reunitarize=True``
    (default) the links are projected back onto SU(N) after every kernel step anyway
    (Gram-Schmidt of the rows for N = 2, 3, costing under a tenth of a sweep;
    :func:`flowplug.groups.reunitarize` for N > 3). log p = -S(x) is recomputed in
    float64 for the new x after every step.

References:
    Creutz, Phys. Rev. D 21 (1980) 2308 (SU(2) heatbath);
    Cabibbo and Marinari, Phys. Lett. B 119 (1982) 387 (SU(2) subgroups of SU(N));
    Kennedy and Pendleton, Phys. Lett. B 156 (1985) 393 (SU(2) heatbath at large beta);
    Adler, Phys. Rev. D 23 (1981) 2901; Brown and Woch, Phys. Rev. Lett. 58 (1987) 2394
    (overrelaxation);
    Gattringer and Lang, Quantum Chromodynamics on the Lattice (Springer 2010),
    sections 4.3-4.4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from flowplug.chain import ChainState, Kernel
from flowplug.errors import ConfigError
from flowplug.hookspecs import hookimpl
from flowplug.records import KernelSpec

__all__ = [
    "CREUTZ_BELOW",
    "Checkerboard",
    "Heatbath",
    "HeatbathOR",
    "Overrelaxation",
    "heatbath_links",
    "heatbath_sweep",
    "overrelax_links",
    "overrelaxation_sweep",
    "project_sun",
    "sample_a0",
    "sample_su2",
    "su2_block",
    "su2_matrix",
    "subgroups",
]

#: alpha below which Creutz's sampler replaces Kennedy-Pendleton's (their acceptances cross here).
CREUTZ_BELOW = 1.7

_TINY = 1e-200


# --------------------------------------------------------------------------- SU(2) pieces


def su2_block(w: torch.Tensor, i: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The SU(2) part of the (i, j) block of N x N matrices W, as a pair (a, b).

    Every 2 x 2 complex block w splits into w~ + rest, where
    w~ = [[a, b], [-b*, a*]] with a = (w_ii + w_jj^*)/2, b = (w_ij - w_ji^*)/2 is a real
    multiple of an SU(2) matrix, w~ = k v with k = sqrt(|a|^2 + |b|^2) = sqrt(det w~) and
    v in SU(2), and the rest does not contribute to Re tr(r w) for any r in SU(2):
    Re tr(R W) = Re tr(r w~) + sum_{l != i, j} Re W_ll for R the SU(2) matrix r embedded in
    rows and columns i, j.

    Arguments:
        w: Shape (..., N, N), complex.
        i: First row/column of the subgroup.
        j: Second row/column (i < j).

    Returns:
        ``(a, b)``, each of shape (...), complex.
    """
    a = 0.5 * (w[..., i, i] + w[..., j, j].conj())
    b = 0.5 * (w[..., i, j] - w[..., j, i].conj())
    return a, b


def subgroups(n: int) -> list[tuple[int, int]]:
    """The Cabibbo-Marinari SU(2) subgroups of SU(N): pairs (i, j), i < j, in update order.

    ``subgroups(2) == [(0, 1)]``; ``subgroups(3) == [(0, 1), (0, 2), (1, 2)]``: N(N-1)/2 pairs.
    """
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def su2_matrix(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The matrices [[p, q], [-q*, p*]] (..., 2, 2) of complex pairs p, q (...); SU(2) if |p|^2 + |q|^2 = 1.

    In quaternion components X = X_0 1 + i X.sigma: p = X_0 + i X_3, q = X_2 + i X_1.
    """
    return torch.stack([p, q, -q.conj(), p.conj()], dim=-1).view(*p.shape, 2, 2)


def _left_multiply(m: torch.Tensor, p: torch.Tensor, q: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """R M for R = [[p, q], [-q*, p*]] (complex pairs p, q of shape (...)) embedded in rows/columns i, j
    of M (..., N, N); a new tensor: row i -> p M_i + q M_j, row j -> -q* M_i + p* M_j."""
    p, q = p.unsqueeze(-1), q.unsqueeze(-1)
    mi, mj = m[..., i, :], m[..., j, :]
    out = m.clone()
    out[..., i, :] = p * mi + q * mj
    out[..., j, :] = p.conj() * mj - q.conj() * mi
    return out


def _unit_block(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k, a/k, b/k) of a block's SU(2) part; the unit matrix (1, 0) where k underflows (degenerate staple)."""
    k = torch.sqrt(a.real**2 + a.imag**2 + b.real**2 + b.imag**2)
    ok = k > _TINY
    ks = torch.where(ok, k, torch.ones_like(k))
    return k, torch.where(ok, a / ks, torch.ones_like(a)), torch.where(ok, b / ks, torch.zeros_like(b))


def _creutz(alpha: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw of the density ~ exp(alpha a) on [-1, 1]; g uniform in (0, 1]."""
    al = alpha.clamp(min=_TINY)
    return (1.0 + torch.log1p(g * torch.expm1(-2.0 * al)) / al).clamp(-1.0, 1.0)


def sample_a0(
    alpha: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    method: str = "auto",
    creutz_below: float = CREUTZ_BELOW,
    candidates: int = 4,
    max_rounds: int = 10_000,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Draw a_0 in [-1, 1] from P(a_0) ~ sqrt(1 - a_0^2) exp(alpha a_0), one per entry of alpha.

    The SU(2) heatbath's one non-trivial variable (module docstring): Kennedy-Pendleton's
    algorithm for alpha >= ``creutz_below``, Creutz's below. <a_0> = I_2(alpha) / I_1(alpha).

    Arguments:
        alpha: Shape (M,), float64, >= 0 and finite (alpha = 2 beta k / N).
        generator: Random generator on the device of ``alpha``.
        method: ``"auto"`` (K-P above ``creutz_below``, Creutz below), ``"kp"`` (K-P for all;
            slow for alpha << 1) or ``"creutz"`` (Creutz for all; slow for alpha >> 1).
        creutz_below: The switch point of ``"auto"``.
        candidates: Proposals drawn per pending entry and round (>= 1); the first accepted
            one is kept, so the result is the sequential algorithm's.
        max_rounds: Safety bound on the rounds of the rejection loop.

    Returns:
        ``(a0, tries)``: a0 (M,) float64 in [-1, 1]; tries (M,) int64, the number of
        proposals the sequential algorithm made for each entry (>= 1).

    Raises:
        ValueError: for a negative or non-finite alpha, or an unknown method.
        RuntimeError: if entries are still pending after ``max_rounds`` rounds (never
            happens for valid input: with ``"auto"`` an entry stays pending after a round
            with probability below 0.32^candidates; K-P alone never accepts at alpha = 0).

    References:
        Kennedy and Pendleton, Phys. Lett. B 156 (1985) 393; Creutz, Phys. Rev. D 21 (1980) 2308.
    """
    if method not in ("auto", "kp", "creutz"):
        raise ValueError(f"sample_a0: method must be 'auto', 'kp' or 'creutz'; found {method!r}")
    alpha = alpha.to(torch.float64)
    if alpha.numel() and not bool(((alpha >= 0) & (alpha < math.inf)).all()):
        raise ValueError("sample_a0: alpha must be finite and >= 0 (non-finite links or staples?)")
    m = alpha.numel()
    c = max(int(candidates), 1)
    device = alpha.device
    al_all = alpha.clamp(min=_TINY)
    if method == "auto":
        creutz_all = alpha < float(creutz_below)
    else:
        creutz_all = torch.full((m,), method == "creutz", dtype=torch.bool, device=device)
    a0 = torch.empty(m, dtype=torch.float64, device=device)
    tries = torch.zeros(m, dtype=torch.int64, device=device)
    pending: torch.Tensor | None = None  # None: every entry (the first round needs no indexing)
    for _ in range(int(max_rounds)):
        al = al_all if pending is None else al_all[pending]
        uc = creutz_all if pending is None else creutz_all[pending]
        al, uc = al[:, None], uc[:, None]
        u0, u1, u2, u3 = torch.rand(al.shape[0], c, 4, generator=generator, dtype=torch.float64, device=device).unbind(
            -1
        )
        # Kennedy-Pendleton: 2 alpha lambda^2 ~ Gamma(3/2) (an exponential plus half a chi^2_1),
        # accepted with probability sqrt(1 - lambda^2); r_1 = 1 - u0 and r_3 = 1 - u2 in (0, 1]
        lam2 = (torch.log1p(-u0) + torch.cos(2 * math.pi * u1) ** 2 * torch.log1p(-u2)) / (-2.0 * al)
        # Creutz: exp(alpha a) on [-1, 1] by inversion (1 - u0 in (0, 1]), accepted with
        # probability sqrt(1 - a^2)
        cr = 1.0 + torch.log1p((1.0 - u0) * torch.expm1(-2.0 * al)) / al
        cand = torch.where(uc, cr, 1.0 - 2.0 * lam2).clamp(-1.0, 1.0)
        ok = u3 * u3 <= torch.where(uc, 1.0 - cr * cr, 1.0 - lam2)
        hit = ok.any(1)
        first = torch.argmax(ok.to(torch.int8), dim=1)
        value = cand.gather(1, first[:, None]).squeeze(1)
        n_tries = torch.where(hit, first + 1, c)
        if pending is None:
            if bool(hit.all()):
                return value, n_tries
            a0.copy_(value)
            tries.copy_(n_tries)
            pending = hit.logical_not().nonzero().flatten()
            continue
        a0[pending[hit]] = value[hit]
        tries[pending] += n_tries
        pending = pending[~hit]
        if pending.numel() == 0:
            return a0, tries
    raise RuntimeError(f"sample_a0: entries still pending after {max_rounds} rounds")


def sample_su2(
    alpha: torch.Tensor, generator: torch.Generator | None = None, **options: Any
) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    r"""SU(2) elements X with density ~ exp(alpha X_0) = exp((alpha/2) Re tr X) over Haar measure.

    X_0 from :func:`sample_a0`; (X_1, X_2, X_3) uniform on the sphere of radius
    sqrt(1 - X_0^2) (a normalised Gaussian 3-vector).

    Arguments:
        alpha: Shape (M,), float64, >= 0.
        generator: Random generator on the device of ``alpha``.
        **options: Passed to :func:`sample_a0` (``method``, ``creutz_below``, ...).

    Returns:
        ``((p, q), tries)``: X = [[p, q], [-q*, p*]] (:func:`su2_matrix`) with p, q (M,)
        complex128, p = X_0 + i X_3; tries (M,) int64 as in :func:`sample_a0`.

    Raises:
        ValueError: as :func:`sample_a0`.
    """
    a0, tries = sample_a0(alpha, generator, **options)
    n = torch.randn(alpha.numel(), 3, generator=generator, dtype=torch.float64, device=alpha.device)
    norm = torch.sqrt((n * n).sum(-1)).clamp(min=_TINY)
    n = n * (torch.sqrt((1.0 - a0 * a0).clamp(min=0.0)) / norm)[:, None]
    return (torch.complex(a0, n[:, 2]), torch.complex(n[:, 1], n[:, 0])), tries


# --------------------------------------------------------------------------- lattice pieces


class Checkerboard:
    r"""Colour classes (mu, parity) of the links of a periodic lattice and their staple neighbours.

    Sites are numbered row-major over (L_0, ..., L_{d-1}) (the order of
    ``x.reshape(B, d, V, N, N)``). The 2d classes, in update order, are the links
    U_mu(x) of one direction mu and one parity p of sum_a x_a: :attr:`classes` holds
    (mu, sites) with the V/2 site numbers, :attr:`neighbours` the links their staples
    read. No plaquette holds two links of one class (module docstring), so a class is
    updated at once.

    Arguments:
        lattice: Extents (L_0, ..., L_{d-1}), d >= 2, all even.
        device: Device of the index tensors.
        who: Name used in error messages (the kernel's).

    Raises:
        ConfigError: for d < 2, or an odd extent (the message names the lattice, the
            expected even extents and the odd ones found): on a periodic lattice with an
            odd extent, x and x + nu have the same parity across the boundary.
    """

    def __init__(
        self, lattice: Sequence[int], device: torch.device | str | None = None, *, who: str = "heatbath"
    ) -> None:
        lattice = tuple(int(n) for n in lattice)
        d = len(lattice)
        if d < 2:
            raise ConfigError(f"{who}: plaquettes need d >= 2 directions; found the lattice {list(lattice)}")
        odd = [f"L_{a} = {n}" for a, n in enumerate(lattice) if n % 2 or n < 2]
        if odd:
            raise ConfigError(
                f"{who}: the lattice {list(lattice)} has odd extents: expected every extent even (the "
                f"checkerboard update of links by direction and parity needs it on a periodic lattice), "
                f"found {', '.join(odd)}"
            )
        self.lattice = lattice
        self.volume = math.prod(lattice)
        strides = [math.prod(lattice[a + 1 :]) for a in range(d)]
        grids = torch.meshgrid(*[torch.arange(n, device=device) for n in lattice], indexing="ij")
        coords = torch.stack([g.reshape(-1) for g in grids], dim=-1)  # (V, d)
        stride_t = torch.tensor(strides, device=device)

        def shifted(a: int, s: int) -> torch.Tensor:
            c = coords.clone()
            c[:, a] = (c[:, a] + s) % lattice[a]
            return (c * stride_t).sum(-1)  # integer matmul is not implemented on CUDA

        fwd = [shifted(a, 1) for a in range(d)]
        bwd = [shifted(a, -1) for a in range(d)]
        parity = coords.sum(-1) % 2
        v = self.volume
        #: (mu, sites) of the colour classes in update order: links U_mu(x), x in ``sites`` (V/2,).
        self.classes: list[tuple[int, torch.Tensor]] = []
        #: Per class, the links its staples need, as indices into the (d V) links
        #: (direction * V + site), shape (6, d - 1, V/2): U_nu(x+mu), U_mu(x+nu), U_nu(x),
        #: U_nu(x+mu-nu), U_mu(x-nu), U_nu(x-nu) for each nu != mu.
        self.neighbours: list[torch.Tensor] = []
        for mu in range(d):
            for p in (0, 1):
                sites = (parity == p).nonzero().flatten()
                rows = []
                for nu in range(d):
                    if nu == mu:
                        continue
                    xmu, xnu, xmnu = fwd[mu][sites], fwd[nu][sites], bwd[nu][sites]
                    rows.append(
                        torch.stack(
                            [
                                nu * v + xmu,
                                mu * v + xnu,
                                nu * v + sites,
                                nu * v + bwd[nu][xmu],
                                mu * v + xmnu,
                                nu * v + xmnu,
                            ]
                        )
                    )
                self.classes.append((mu, sites))
                self.neighbours.append(torch.stack(rows, dim=1))

    @staticmethod
    def of(x: torch.Tensor, *, who: str = "heatbath") -> Checkerboard:
        """The checkerboard of links x, (B, d, L..., N, N), on the device of x.

        Raises:
            ConfigError: as the constructor.
        """
        return Checkerboard(tuple(x.shape[2:-2]), device=x.device, who=who)

    def staples(self, u: torch.Tensor, k: int) -> torch.Tensor:
        r"""Staple sums A_mu(x) of the sites of colour class ``k``.

        A_mu(x) = sum_{nu != mu} [U_nu(x+mu) U_mu(x+nu)^+ U_nu(x)^+ + U_nu(x+mu-nu)^+ U_mu(x-nu)^+ U_nu(x-nu)]
        (:meth:`flowplug.plugins.theories.WilsonGaugeAction.staples`).

        Arguments:
            u: Links flattened to (B, d, V, N, N), complex.
            k: Index into :attr:`classes`.

        Returns:
            Shape (B, V/2, N, N), complex.
        """
        b, d, v, n = u.shape[0], u.shape[1], u.shape[2], u.shape[-1]
        idx = self.neighbours[k]
        g = u.reshape(b, d * v, n, n).index_select(1, idx.reshape(-1)).view(b, *idx.shape, n, n)
        # the same products, associated as torch's batched matmul runs them fastest
        upper = g[:, 0] @ (g[:, 2] @ g[:, 1]).mH
        lower = (g[:, 4] @ g[:, 3]).mH @ g[:, 5]
        return (upper + lower).sum(1)


# --------------------------------------------------------------------------- sweeps


def project_sun(u: torch.Tensor) -> torch.Tensor:
    r"""Project nearly-SU(N) matrices back onto SU(N) (after rounding drift).

    N = 2: the first row (a, b) normalised, the second set to (-b*, a*); N = 3: Gram-Schmidt
    of the first two rows, the third their conjugated cross product (det = 1 to rounding);
    N > 3: :func:`flowplug.groups.reunitarize` (polar decomposition by SVD). For matrices
    already in SU(N) to rounding the change is at the rounding level.

    Arguments:
        u: Shape (..., N, N), complex.

    Returns:
        SU(N) matrices of the same shape and dtype.
    """
    n = u.shape[-1]
    if n == 2:
        row = _normalise(u[..., 0, :])
        return su2_matrix(row[..., 0], row[..., 1])
    if n == 3:
        r0 = _normalise(u[..., 0, :])
        r1 = u[..., 1, :]
        r1 = _normalise(r1 - (r0.conj() * r1).sum(-1, keepdim=True) * r0)
        r2 = torch.linalg.cross(r0, r1, dim=-1).conj()
        return torch.stack([r0, r1, r2], dim=-2)
    from flowplug.groups import reunitarize

    return reunitarize(u)


def _normalise(v: torch.Tensor) -> torch.Tensor:
    """Complex vectors (..., N) divided by their norms."""
    return v / torch.sqrt((v.real**2 + v.imag**2).sum(-1, keepdim=True))


def _flat(u: torch.Tensor, board: Checkerboard) -> torch.Tensor:
    """A private copy of links (B, d, L..., N, N) as (B, d, V, N, N)."""
    b, d, n = u.shape[0], u.shape[1], u.shape[-1]
    return u.reshape(b, d, board.volume, n, n).clone()


def heatbath_links(
    link: torch.Tensor,
    staple: torch.Tensor,
    beta: float,
    generator: torch.Generator | None = None,
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Cabibbo-Marinari heatbath of links given their staple sums (module docstring).

    For each SU(2) subgroup (i, j) of :func:`subgroups`, in order, the link is replaced
    by R U with R = r embedded in rows/columns i, j and r drawn from
    exp((beta/N) Re tr(R U A)) dr (Haar): r = X v^+, X from :func:`sample_su2` with
    alpha = 2 beta k / N, k v the SU(2) part of the (i, j) block of U A. For N = 2 this is
    an exact draw from exp((beta/2) Re tr(U A)); for N > 2 one Cabibbo-Marinari step that
    leaves exp((beta/N) Re tr(U A)) dU invariant. The links must be independent given
    their staples (one colour class: :class:`Checkerboard`).

    Arguments:
        link: SU(N) matrices (..., N, N), complex128.
        staple: Their staple sums A (..., N, N), complex128.
        beta: Wilson coupling (>= 0) of S = -(beta/N) sum_P Re tr U_P.
        generator: Random generator on the device of ``link``.
        **options: Passed to :func:`sample_a0` (``creutz_below``, ``candidates``, ``method``).

    Returns:
        ``(new_link, tries)``: new links (..., N, N); tries (...) int64, SU(2) proposals
        made for each link, summed over its subgroups (>= N(N-1)/2).

    Raises:
        ValueError: if a staple or link is not finite.
    """
    n = link.shape[-1]
    pairs = subgroups(n)
    coef = 2.0 * float(beta) / n
    shape = link.shape[:-2]
    w = link @ staple
    tries = torch.zeros(shape, dtype=torch.int64, device=link.device)
    for p, (i, j) in enumerate(pairs):
        k, va, vb = _unit_block(*su2_block(w, i, j))
        (xp, xq), t = sample_su2((coef * k).reshape(-1), generator, **options)
        xp, xq = xp.view(shape), xq.view(shape)
        # r = X v^+ with v = [[va, vb], [-vb*, va*]]
        rp, rq = xp * va.conj() + xq * vb.conj(), xq * va - xp * vb
        link = _left_multiply(link, rp, rq, i, j)
        if p + 1 < len(pairs):
            w = _left_multiply(w, rp, rq, i, j)
        tries += t.view(shape)
    return link, tries


def overrelax_links(link: torch.Tensor, staple: torch.Tensor, *, reverse: bool = False) -> torch.Tensor:
    r"""Overrelaxation of links given their staple sums: every SU(2) subgroup reflected (module docstring).

    For each subgroup (i, j), with k v the SU(2) part of the (i, j) block of U A,
    U -> R U, R = (v^+)^2 embedded in rows/columns i, j. Re tr(U A) is unchanged to
    rounding; each reflection is an involution, so
    ``overrelax_links(overrelax_links(u, a), a, reverse=True)`` returns u (for N = 2,
    applying it twice does). Degenerate blocks (k = 0) are left alone.

    Arguments:
        link: SU(N) matrices (..., N, N), complex.
        staple: Their staple sums A (..., N, N), complex.
        reverse: Visit the subgroups in the reverse order (the inverse map).

    Returns:
        New links (..., N, N).
    """
    pairs = subgroups(link.shape[-1])
    if reverse:
        pairs = pairs[::-1]
    w = link @ staple
    for p, (i, j) in enumerate(pairs):
        _, va, vb = _unit_block(*su2_block(w, i, j))
        # r = (v^+)^2 = [[va*^2 - |vb|^2, -2 Re(va) vb], [2 Re(va) vb*, va^2 - |vb|^2]]
        rp, rq = va.conj() ** 2 - (vb.real**2 + vb.imag**2), -2.0 * va.real * vb
        link = _left_multiply(link, rp, rq, i, j)
        if p + 1 < len(pairs):
            w = _left_multiply(w, rp, rq, i, j)
    return link


def heatbath_sweep(
    u: torch.Tensor,
    beta: float,
    board: Checkerboard,
    generator: torch.Generator | None = None,
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One Cabibbo-Marinari heatbath sweep over every link (module docstring).

    The colour classes in the order of ``board.classes``, each by :func:`heatbath_links`.

    Arguments:
        u: SU(N) links (B, d, L..., N, N), complex128 (not modified).
        beta: Wilson coupling (>= 0) of S = -(beta/N) sum_P Re tr U_P.
        board: :class:`Checkerboard` of the lattice.
        generator: Random generator on the device of ``u``.
        **options: Passed to :func:`sample_a0` (``creutz_below``, ``candidates``, ``method``).

    Returns:
        ``(u_new, tries)``: the new links (same shape); tries (B,) float64, the mean number
        of SU(2) heatbath proposals per subgroup update in each chain (>= 1).

    Raises:
        ValueError: if staples are not finite (links with NaN or Inf).
    """
    shape = u.shape
    uf = _flat(u, board)
    tries = torch.zeros(shape[0], dtype=torch.float64, device=u.device)
    for k, (mu, sites) in enumerate(board.classes):
        link, t = heatbath_links(uf[:, mu, sites], board.staples(uf, k), beta, generator, **options)
        uf[:, mu, sites] = link
        tries += t.sum(1).to(torch.float64)
    return uf.reshape(shape), tries / (board.volume * shape[1] * len(subgroups(shape[-1])))


def overrelaxation_sweep(u: torch.Tensor, board: Checkerboard, *, reverse: bool = False) -> torch.Tensor:
    r"""One microcanonical overrelaxation sweep over every link (module docstring).

    The colour classes in the order of ``board.classes``, each by :func:`overrelax_links`:
    S is unchanged to rounding. Deterministic: no random numbers.

    Arguments:
        u: SU(N) links (B, d, L..., N, N), complex (not modified).
        board: :class:`Checkerboard` of the lattice.
        reverse: Visit the colour classes and the subgroups in the reverse order. Each
            reflection is an involution and the links of a class do not see each other,
            so ``overrelaxation_sweep(overrelaxation_sweep(u, b), b, reverse=True)``
            returns u to rounding (a test of the colouring).

    Returns:
        The new links, same shape and dtype.
    """
    shape = u.shape
    uf = _flat(u, board)
    classes = list(enumerate(board.classes))
    for k, (mu, sites) in classes[::-1] if reverse else classes:
        uf[:, mu, sites] = overrelax_links(uf[:, mu, sites], board.staples(uf, k), reverse=reverse)
    return uf.reshape(shape)


# --------------------------------------------------------------------------- kernels


def _check_action(action: Any, who: str) -> tuple[float, int]:
    from flowplug.plugins.theories import WilsonGaugeAction

    if not isinstance(action, WilsonGaugeAction) or getattr(action, "n", 1) < 2:
        field = getattr(action, "field", None)
        raise ConfigError(
            f"{who}: needs the Wilson action on SU(N) links (action 'wilson' with group su2, su3, ...); "
            f"found {type(action).__name__} on {field!r} fields"
        )
    if type(action).action is not WilsonGaugeAction.action:
        raise ConfigError(
            f"{who}: {type(action).__name__} changes the Wilson action; the heatbath samples exactly "
            "S = -(beta/N) sum_P Re tr U_P and cannot be used for it"
        )
    if not (math.isfinite(action.beta) and action.beta >= 0):
        raise ConfigError(f"{who}: needs a finite beta >= 0; found beta = {action.beta}")
    return float(action.beta), int(action.n)


class _LocalGaugeKernel(Kernel):
    """Shared parts of the local SU(N) Wilson kernels: action check, colouring, projection, log p."""

    def __init__(self, action: Any, *, reunitarize: bool = True) -> None:
        self.beta, self.n = _check_action(action, self.name)
        self.action = action
        self.reunitarize = bool(reunitarize)
        self._boards: dict[tuple[tuple[int, ...], str], Checkerboard] = {}

    def board(self, x: torch.Tensor) -> Checkerboard:
        """The :class:`Checkerboard` of links x (cached per lattice and device).

        Raises:
            ConfigError: for an odd extent (the message names the lattice and the extents).
        """
        key = (tuple(int(n) for n in x.shape[2:-2]), str(x.device))
        if key not in self._boards:
            self._boards[key] = Checkerboard(key[0], device=x.device, who=self.name)
        return self._boards[key]

    def init(self, x: torch.Tensor) -> ChainState:
        """State of SU(N) links x, (B, d, L..., N, N) (complex128; complex64 is promoted); log p = -S(x), (B,) float64.

        Raises:
            ShapeError: if x does not have the action's layout.
            ConfigError: for an odd lattice extent.
        """
        x = x.detach().to(torch.complex128)
        self.action.check(x)
        self.board(x)
        return ChainState(x, -self.action.action(x).to(torch.float64))

    def _finish(self, state: ChainState, u: torch.Tensor, info: dict[str, Any]) -> tuple[ChainState, dict[str, Any]]:
        if self.reunitarize:
            u = project_sun(u)
        log_p = -self.action.action(u).to(torch.float64)
        moved = torch.ones(state.batch, dtype=torch.bool, device=state.log_p.device)
        info["accepted"] = torch.ones(state.batch, dtype=torch.float64, device=state.log_p.device)
        return state.moved(moved, u, log_p), info

    def _prepare(self, state: ChainState) -> tuple[torch.Tensor, Checkerboard]:
        x = state.x.to(torch.complex128)
        self.action.check(x)
        return x, self.board(x)


class Heatbath(_LocalGaugeKernel):
    r"""Cabibbo-Marinari / Kennedy-Pendleton heatbath for the SU(N) Wilson action (module docstring).

    One ``step`` = one heatbath sweep over every link of every chain, then ``overrelax``
    overrelaxation sweeps. Every link is drawn from its exact conditional distribution,
    so nothing is rejected: ``info["accepted"]`` is (B,) float64 ones.

    Arguments:
        action: A :class:`flowplug.plugins.theories.WilsonGaugeAction` with group su<N>
            (N >= 2; SU(2) and SU(3) are the tested cases) and beta >= 0.
        overrelax: Overrelaxation sweeps after each heatbath sweep (>= 0).
        reunitarize: Project the links onto SU(N) after every step (:func:`project_sun`).
        creutz_below: alpha = 2 beta k / N below which Creutz's SU(2) sampler replaces
            Kennedy-Pendleton's (>= 0; 0 = K-P always).
        candidates: Proposals per pending link and round of the vectorised rejection
            loop (>= 1; changes the random stream, not the distribution).

    Raises:
        ConfigError: for another action, a U(1) or negative-beta action, bad options;
            from ``init``/``step``, for a lattice with an odd extent.

    ``step`` returns ``info`` with ``accepted`` (B,) float64 (all 1.0) and
    ``heatbath_proposals`` (B,) float64, the mean number of SU(2) proposals per subgroup
    update (1 / the rejection loop's acceptance; close to 1 at large beta).

    References:
        Creutz, Phys. Rev. D 21 (1980) 2308; Cabibbo and Marinari, Phys. Lett. B 119
        (1982) 387; Kennedy and Pendleton, Phys. Lett. B 156 (1985) 393; Brown and Woch,
        Phys. Rev. Lett. 58 (1987) 2394.
    """

    name = "heatbath"

    def __init__(
        self,
        action: Any,
        *,
        overrelax: int = 0,
        reunitarize: bool = True,
        creutz_below: float = CREUTZ_BELOW,
        candidates: int = 4,
    ) -> None:
        if isinstance(overrelax, bool) or int(overrelax) < 0 or int(overrelax) != overrelax:
            raise ConfigError(f"{self.name}: overrelax must be an integer >= 0; found {overrelax!r}")
        if not float(creutz_below) >= 0:
            raise ConfigError(f"{self.name}: creutz_below must be >= 0; found {creutz_below!r}")
        if int(candidates) < 1:
            raise ConfigError(f"{self.name}: candidates must be >= 1; found {candidates!r}")
        super().__init__(action, reunitarize=reunitarize)
        self.overrelax = int(overrelax)
        self.creutz_below = float(creutz_below)
        self.candidates = int(candidates)

    def step(self, state: ChainState, generator: torch.Generator | None = None) -> tuple[ChainState, dict[str, Any]]:
        """One heatbath sweep (and ``overrelax`` overrelaxation sweeps) for every chain.

        Returns:
            (new state, info): info ``accepted`` (B,) float64 ones, ``heatbath_proposals`` (B,) float64.

        Raises:
            ConfigError: for an odd lattice extent.
            ShapeError: if the links do not fit the action.
        """
        x, board = self._prepare(state)
        with torch.no_grad():
            u, tries = heatbath_sweep(
                x, self.beta, board, generator, creutz_below=self.creutz_below, candidates=self.candidates
            )
            for _ in range(self.overrelax):
                u = overrelaxation_sweep(u, board)
            return self._finish(state, u, {"heatbath_proposals": tries})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(beta={self.beta}, N={self.n}, overrelax={self.overrelax})"


class HeatbathOR(Heatbath):
    r"""The production mix: one heatbath sweep, then ``overrelax`` (default 4) overrelaxation sweeps.

    :class:`Heatbath` with another default; registered as ``heatbath-or``. Arguments,
    errors and ``info`` as :class:`Heatbath`.

    References:
        Brown and Woch, Phys. Rev. Lett. 58 (1987) 2394 (heatbath plus overrelaxation).
    """

    name = "heatbath-or"

    def __init__(
        self,
        action: Any,
        *,
        overrelax: int = 4,
        reunitarize: bool = True,
        creutz_below: float = CREUTZ_BELOW,
        candidates: int = 4,
    ) -> None:
        super().__init__(
            action, overrelax=overrelax, reunitarize=reunitarize, creutz_below=creutz_below, candidates=candidates
        )


class Overrelaxation(_LocalGaugeKernel):
    r"""Microcanonical overrelaxation sweeps for the SU(N) Wilson action (module docstring).

    Each link's SU(2) subgroup blocks are reflected through the staple direction: S is
    unchanged (to rounding), the map is a measure-preserving involution, so exp(-S) is
    left invariant. **Not ergodic** alone (S never changes): compose it with ``heatbath``
    (or use ``heatbath-or``). Deterministic: ``step`` draws no random numbers.

    Arguments:
        action: A :class:`flowplug.plugins.theories.WilsonGaugeAction` with group su<N>.
        sweeps: Overrelaxation sweeps per ``step`` (>= 1).
        reunitarize: Project the links onto SU(N) after every step (:func:`project_sun`).

    Raises:
        ConfigError: for another action, bad options; from ``init``/``step``, for a lattice
            with an odd extent.

    ``step`` returns ``info`` with ``accepted`` (B,) float64 ones.

    References:
        Adler, Phys. Rev. D 23 (1981) 2901; Brown and Woch, Phys. Rev. Lett. 58 (1987) 2394.
    """

    name = "overrelaxation"

    def __init__(self, action: Any, *, sweeps: int = 1, reunitarize: bool = True) -> None:
        if isinstance(sweeps, bool) or int(sweeps) < 1 or int(sweeps) != sweeps:
            raise ConfigError(f"{self.name}: sweeps must be an integer >= 1; found {sweeps!r}")
        super().__init__(action, reunitarize=reunitarize)
        self.sweeps = int(sweeps)

    def step(self, state: ChainState, generator: torch.Generator | None = None) -> tuple[ChainState, dict[str, Any]]:
        """``sweeps`` overrelaxation sweeps for every chain (``generator`` is not used).

        Returns:
            (new state, info): info ``accepted`` (B,) float64 ones.

        Raises:
            ConfigError: for an odd lattice extent.
            ShapeError: if the links do not fit the action.
        """
        x, board = self._prepare(state)
        with torch.no_grad():
            u = x
            for _ in range(self.sweeps):
                u = overrelaxation_sweep(u, board)
            return self._finish(state, u, {})

    def __repr__(self) -> str:
        return f"Overrelaxation(beta={self.beta}, N={self.n}, sweeps={self.sweeps})"


@hookimpl
def flowplug_kernels() -> list[KernelSpec]:
    """The heatbath, overrelaxation and heatbath-plus-overrelaxation kernels (SU(N) Wilson)."""
    fields = ("su2", "su3")
    return [
        KernelSpec(
            name="heatbath",
            description="Cabibbo-Marinari / Kennedy-Pendleton heatbath sweeps, SU(N) Wilson action",
            factory=Heatbath,
            fields=fields,
            aliases=("cabibbo-marinari", "hb"),
        ),
        KernelSpec(
            name="overrelaxation",
            description="microcanonical overrelaxation sweeps, SU(N) Wilson (not ergodic alone)",
            factory=Overrelaxation,
            fields=fields,
            aliases=("overrelax",),
        ),
        KernelSpec(
            name="heatbath-or",
            description="one heatbath sweep + overrelax (default 4) overrelaxation sweeps, SU(N) Wilson",
            factory=HeatbathOR,
            fields=fields,
            aliases=("hb-or",),
        ),
    ]
