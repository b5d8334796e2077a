r"""Built-in Dirac operators (hook ``flowplug_dirac_operators``): Wilson fermions, ``wilson``.

Conventions (DESIGN.md section 3; docs/fermions.md):

* **Operator.** Hopping-parameter normalisation, Wilson parameter r = 1,

      D(x, y) = delta_{x,y} - kappa sum_mu [ (1 - gamma_mu) U_mu(x) delta_{x+mu, y}
                                           + (1 + gamma_mu) U_mu(x-mu)^+ delta_{x-mu, y} ],

  kappa = 1 / (2 (m + d)) with m the bare mass in lattice units; D = 2 kappa D_m with
  D_m = m + d - (1/2) sum_mu [...] the mass-normalised operator.
  The links crossing the time boundary (direction d-1, from x_{d-1} = L_{d-1} - 1 to 0)
  carry a factor -1: antiperiodic fermions in time, periodic in space.
* **Gamma matrices** (Euclidean, Hermitian, {gamma_mu, gamma_nu} = 2 delta_{mu nu}):
  d = 2: gamma_0 = sigma_1, gamma_1 = sigma_2, gamma_5 = -i gamma_0 gamma_1 = sigma_3;
  d = 4: the chiral basis of Gattringer & Lang, appendix A.2, with our directions
  mu = 0, 1, 2, 3 = x, y, z, t being their gamma_1, gamma_2, gamma_3, gamma_4:
  gamma_k = [[0, -i sigma_k], [i sigma_k, 0]] (k = 1, 2, 3), gamma_4 = [[0, 1], [1, 0]],
  gamma_5 = gamma_1 gamma_2 gamma_3 gamma_4 = diag(1, 1, -1, -1).
  Then D^+ = gamma_5 D gamma_5 (gamma_5-hermiticity) and det D is real.
* **Links.** U(1): angles theta, shape (B, d, L_0, ..., L_{d-1}), float64 (field kind
  ``u1``), U = exp(i theta). SU(N): complex matrices (B, d, L_0, ..., L_{d-1}, N, N),
  complex128 (``su<N>``).
* **Fermion fields** psi: U(1) shape (B, L_0, ..., L_{d-1}, s), SU(N) shape
  (B, L_0, ..., L_{d-1}, s, N), complex128, s = 2 (d = 2) or 4 (d = 4) spin components.
  Methods also accept extra axes between the batch axis and the lattice
  ((B, K, L..., s[, N]): K vectors per configuration). Dense matrices index the flattened
  (L_0, ..., L_{d-1}, s[, N]) axes in row-major order.

* **Even-odd preconditioning.** On a lattice with even extents H connects only sites of
  opposite parity (even: sum_mu x_mu even), so with the even sites first
  D = [[1, -kappa H_eo], [-kappa H_oe, 1]] and det D = det D_hat, D_hat = 1 - kappa^2 H_eo H_oe
  on the even sites (:meth:`WilsonDiracOperator.apply_even_odd` and the methods after it,
  :class:`BoundEvenOdd`). Even-site fields have shape (B, [K...,] V/2, s[, N]), the sites in
  row-major order (:meth:`WilsonDiracOperator.parity_sites`).

Everything is pure torch (batched, on the links' device, complex128).

References:
    K. G. Wilson, in "New Phenomena in Subnuclear Physics" (1977) (Wilson fermions);
    C. Gattringer & C. B. Lang, "Quantum Chromodynamics on the Lattice" (Springer 2010),
    chapter 5 (Wilson Dirac operator, hopping parameter, gamma_5-hermiticity) and
    appendix A.2 (chiral gamma matrices);
    M. R. Hestenes & E. Stiefel, J. Res. Nat. Bur. Stand. 49 (1952) 409 (conjugate gradient);
    M. S. Albergo et al., arXiv:2106.05934, section II (fermionic determinants in flow sampling);
    T. DeGrand & P. Rossi, Comput. Phys. Commun. 60 (1990) 211 (even-odd preconditioning);
    R. Abbott et al., arXiv:2207.08945, section 2 (even-odd and Hasenbusch preconditioning with flows).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import torch

from flowplug.errors import ConfigError, ConvergenceError, ShapeError
from flowplug.hookspecs import hookimpl
from flowplug.records import DiracOperatorSpec

__all__ = [
    "BoundEvenOdd",
    "BoundWilson",
    "CGReport",
    "NormalEquationsCG",
    "WilsonDiracOperator",
    "complex_logdet",
    "conjugate_gradient",
    "dense_from_columns",
    "field_extra_axes",
    "forward_neighbours",
    "gamma_matrices",
    "free_wilson_logdet",
    "link_layout",
]

#: Lattice dimensions with gamma matrices (and a gamma_5) implemented.
DIMS = (2, 4)


def gamma_matrices(d: int, *, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Euclidean gamma matrices and gamma_5 in d = 2 or 4 dimensions (module docstring).

    Arguments:
        d: Lattice dimension, 2 or 4.
        device: Device of the tensors.

    Returns:
        ``(gammas, gamma5)``: gammas (d, s, s) with gammas[mu] = gamma_mu, and gamma5 (s, s),
        complex128, s = 2 (d = 2) or 4 (d = 4); Hermitian, {gamma_mu, gamma_nu} =
        2 delta_{mu nu}, gamma_5 anticommutes with every gamma_mu.

    Raises:
        ShapeError: for d other than 2 or 4.

    References:
        Gattringer & Lang (2010), appendix A.2 (chiral representation, d = 4).
    """
    c = torch.complex128
    s1 = torch.tensor([[0, 1], [1, 0]], dtype=c, device=device)
    s2 = torch.tensor([[0, -1j], [1j, 0]], dtype=c, device=device)
    s3 = torch.tensor([[1, 0], [0, -1]], dtype=c, device=device)
    if d == 2:
        return torch.stack([s1, s2]), s3
    if d == 4:
        z = torch.zeros(2, 2, dtype=c, device=device)
        one = torch.eye(2, dtype=c, device=device)

        def block(a, b, cc, dd):
            return torch.cat([torch.cat([a, b], 1), torch.cat([cc, dd], 1)], 0)

        gs = [block(z, -1j * s, 1j * s, z) for s in (s1, s2, s3)] + [block(z, one, one, z)]
        g5 = block(one, z, z, -one)
        return torch.stack(gs), g5
    raise ShapeError(f"Wilson fermions: gamma matrices are implemented for d = 2 and 4; found d = {d}")


@dataclasses.dataclass(frozen=True)
class CGReport:
    """What :func:`conjugate_gradient` did, per batch element.

    Attributes:
        iterations: Iterations until the recursive residual met the tolerance, (B,) int64.
        residual: Final true relative residual |b - A x| / |b| (0 where b = 0), (B,) float64.
        converged: Whether the tolerance was met within ``maxiter``, (B,) bool.
        tol: The relative tolerance asked for.
        maxiter: The iteration limit.
    """

    iterations: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor
    tol: float
    maxiter: int

    def describe(self) -> str:
        """One line: iterations and residuals (max over the batch)."""
        return (
            f"CG: {int(self.iterations.max())} iterations (max over {self.iterations.numel()} batch elements), "
            f"relative residual <= {float(self.residual.max()):.3g} (tol {self.tol:g})"
        )


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum conj(a) b over every axis but the first, shape (B,)."""
    return torch.linalg.vecdot(a.flatten(1), b.flatten(1))


def _norm2(a: torch.Tensor) -> torch.Tensor:
    """sum |a|^2 over every axis but the first, shape (B,), real."""
    return torch.linalg.vecdot(a.flatten(1), a.flatten(1)).real


def conjugate_gradient(
    apply: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    *,
    tol: float = 1e-12,
    maxiter: int = 2000,
    x0: torch.Tensor | None = None,
    check: bool = True,
) -> tuple[torch.Tensor, CGReport]:
    r"""Batched conjugate gradient for A x = b, A Hermitian positive definite.

    Each batch element stops (its iterate is frozen) once its recursive residual satisfies
    |r| <= tol |b|; the loop ends when all have, or after ``maxiter`` iterations.

    Arguments:
        apply: x -> A x for tensors shaped like ``b`` (batch first), acting on each batch
            element separately.
        b: Right-hand sides (B, ...), complex128 (or float64).
        tol: Relative tolerance on the residual (> 0).
        maxiter: Iteration limit (>= 1).
        x0: Start vector (default zero).
        check: Raise if some batch element did not converge.

    Returns:
        ``(x, report)``: the solution, shaped like ``b``, and a :class:`CGReport` (iterations
        and final true relative residual per batch element).

    Raises:
        ConfigError: for tol <= 0 or maxiter < 1.
        ConvergenceError: if ``check`` and some batch element did not reach ``tol`` within
            ``maxiter`` iterations (message: tolerance, limit, residuals reached).

    References:
        Hestenes & Stiefel, J. Res. Nat. Bur. Stand. 49 (1952) 409, algorithm (3:1);
        Gattringer & Lang (2010), section 6.2 (Krylov solvers for lattice Dirac operators).
    """
    if not tol > 0:
        raise ConfigError(f"conjugate gradient: tol must be > 0; found {tol}")
    if int(maxiter) < 1:
        raise ConfigError(f"conjugate gradient: maxiter must be >= 1; found {maxiter}")
    bsz = b.shape[0]
    view = (bsz,) + (1,) * (b.dim() - 1)
    tiny = torch.finfo(torch.float64).tiny
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - apply(x) if x0 is not None else b.clone()
    p = r.clone()
    rr = _norm2(r)
    bnorm = _norm2(b).sqrt()
    target = (tol * bnorm) ** 2
    active = rr > target
    iterations = torch.zeros(bsz, dtype=torch.int64, device=b.device)
    # A converged element is frozen by alpha = beta = 0 (x and r stay, p = r is never used).
    for _ in range(int(maxiter)):
        if not bool(active.any()):
            break
        ap = apply(p)
        alpha = (rr / _dot(p, ap).real.clamp_min(tiny)) * active
        x = x + alpha.view(view) * p
        r = r - alpha.view(view) * ap
        rr_new = _norm2(r)
        beta = (rr_new / rr.clamp_min(tiny)) * active
        p = r + beta.view(view) * p
        rr = rr_new
        iterations += active
        active = active & (rr > target)
    res = b - apply(x)
    true_r = _norm2(res).sqrt()
    residual = torch.where(bnorm > 0, true_r / bnorm.clamp_min(tiny), 0.0)
    report = CGReport(iterations, residual.to(torch.float64), ~active, float(tol), int(maxiter))
    if check and bool(active.any()):
        bad = torch.nonzero(active).flatten().tolist()
        raise ConvergenceError(
            f"conjugate gradient did not converge: tolerance {tol:g} not reached in {maxiter} iterations "
            f"for batch elements {bad[:10]}{'...' if len(bad) > 10 else ''} (relative residuals reached: "
            f"{[round(float(v), 12) for v in residual[active][:10]]}); raise maxiter, loosen tol, or "
            "check the operator (kappa beyond the critical value makes D^+ D near-singular)"
        )
    return x, report


# ------------------------------------------------------------------ helpers shared by the operators


def link_layout(links: torch.Tensor, who: str, *, hint: str = "") -> tuple[tuple[int, ...], int]:
    """``(lattice, N)`` of gauge links: U(1) angles (N = 1) or SU(N) matrices (N).

    Arguments:
        links: U(1) angles (B, d, L_0, ..., L_{d-1}) float64 or SU(N) links
            (B, d, L_0, ..., L_{d-1}, N, N) complex128 (DESIGN.md section 2).
        who: The operator, first words of the error messages (``"Wilson fermions"``).
        hint: Text added to the U(1) message before ``; found`` (e.g. a pointer to another
            background).

    Returns:
        The extents (L_0, ..., L_{d-1}) and N.

    Raises:
        ShapeError: on any other layout, naming the expected and the found one.
    """
    if links.is_complex():
        if links.dim() < 5 or links.shape[-1] != links.shape[-2] or links.dim() != links.shape[1] + 4:
            raise ShapeError(
                f"{who}: SU(N) links must have shape (B, d, L_0, ..., L_(d-1), N, N); "
                f"found {links.dtype} {tuple(links.shape)}"
            )
        return tuple(int(v) for v in links.shape[2:-2]), int(links.shape[-1])
    if links.dim() < 3 or links.dim() != links.shape[1] + 2:
        raise ShapeError(
            f"{who}: U(1) links must be real angles of shape (B, d, L_0, ..., L_(d-1)){hint}; "
            f"found {links.dtype} {tuple(links.shape)}"
        )
    return tuple(int(v) for v in links.shape[2:]), 1


def field_extra_axes(shape: tuple[int, ...], psi: torch.Tensor, who: str, background: str) -> int:
    """Number of extra axes of a fermion field between its batch axis and the lattice.

    Arguments:
        shape: The field's shape without extra axes, (B, L...[, internal axes]).
        psi: The field, (B, [K...,] L...[, internal axes]) complex.
        who: The operator, first words of the error messages (``"Wilson fermions"``).
        background: What the field lives on, for the messages (``"links"``, ``"background"``).

    Returns:
        The number of axes K... (0 for a plain field).

    Raises:
        ShapeError: if psi is not complex, has another batch size or does not end in shape[1:].
    """
    if not psi.is_complex() or psi.dim() < len(shape) or psi.shape[0] != shape[0]:
        raise ShapeError(
            f"{who}: expected a complex fermion field of shape {shape} (or with extra axes "
            f"after the batch axis); found {psi.dtype} {tuple(psi.shape)}"
        )
    extra = psi.dim() - len(shape)
    if tuple(psi.shape[1 + extra :]) != shape[1:]:
        raise ShapeError(
            f"{who}: fermion field shape {tuple(psi.shape)} does not fit the {background}: "
            f"expected (B, [K...,] {', '.join(map(str, shape[1:]))}) with B = {shape[0]}"
        )
    return extra


def dense_from_columns(
    apply: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """The matrix of a linear operator, by applying it to every unit vector (small lattices).

    Arguments:
        apply: v -> A v on fields (B, K, *shape[1:]) (K vectors per batch element).
        shape: Shape (B, ...) of one field; n = prod(shape[1:]).
        device: Device of the unit vectors.

    Returns:
        (B, n, n) complex128, column k = A e_k, rows and columns ordered as the flattened
        shape[1:] axes.
    """
    n = math.prod(shape[1:])
    basis = torch.eye(n, dtype=torch.complex128, device=device).reshape(n, *shape[1:])
    cols = apply(basis.expand(shape[0], *basis.shape))  # (B, n, ...): column k = A e_k
    return cols.reshape(shape[0], n, n).transpose(1, 2)


def complex_logdet(matrix: torch.Tensor) -> torch.Tensor:
    """log det of dense matrices as a complex number, log|det| + i arg det (``torch.linalg.slogdet``).

    Arguments:
        matrix: (B, n, n) complex128.

    Returns:
        (B,) complex128.
    """
    sign, logabs = torch.linalg.slogdet(matrix)
    return torch.complex(logabs.to(torch.float64), torch.angle(sign).to(torch.float64))


def forward_neighbours(lattice: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Flat site indices x and, for every direction mu, those of x + mu (periodic wrap).

    Arguments:
        lattice: Extents (L_0, ..., L_{d-1}); sites numbered in row-major order.
        device: Device of the result.

    Returns:
        ``(here, there)``: here (V,) int64 = 0..V-1, there a list of d (V,) int64 tensors.
    """
    sites = torch.arange(math.prod(lattice), device=device).reshape(lattice)
    return sites.flatten(), [torch.roll(sites, -1, mu).flatten() for mu in range(len(lattice))]


class NormalEquationsCG:
    """Solvers of a Dirac operator through the normal equations D^+ D x = b (conjugate gradient).

    A base class of the built-in operators (:class:`WilsonDiracOperator`,
    :class:`flowplug.plugins.staggered.StaggeredDiracOperator`); it needs the operator's
    ``bind(background)`` (an object with ``apply_normal``), ``apply_dagger(background, psi)``
    and the layout check ``_extra(background, psi)``.

    References:
        Hestenes & Stiefel, J. Res. Nat. Bur. Stand. 49 (1952) 409; Gattringer & Lang (2010),
        section 6.2 (CG on the normal equations).
    """

    _extra: Callable[[torch.Tensor, torch.Tensor], int]
    bind: Callable[[torch.Tensor], Any]
    apply_dagger: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def solve_normal(
        self,
        x: torch.Tensor,
        b: torch.Tensor,
        *,
        tol: float = 1e-12,
        maxiter: int = 2000,
        x0: torch.Tensor | None = None,
        check: bool = True,
    ) -> tuple[torch.Tensor, CGReport]:
        r"""(D^+ D)^{-1} b by the batched conjugate gradient (:func:`conjugate_gradient`).

        Arguments:
            x: The background: links (Wilson, staggered) or the scalar field (staggered-yukawa),
                as the operator's ``geometry`` takes it.
            b: Right-hand side, a fermion field of the operator's ``spinor_shape``, optionally
                with extra axes after the batch axis ((B, [K...,] L...[, internal])), complex128.
            tol, maxiter, x0, check: As for :func:`conjugate_gradient` (tol relative to |b|).

        Returns:
            ``(solution, report)``, the solution shaped like ``b``.

        Raises:
            ShapeError: on a layout mismatch.
            ConvergenceError: if ``check`` and some batch element did not converge.
        """
        self._extra(x, b)
        bound = self.bind(x)
        return conjugate_gradient(bound.apply_normal, b, tol=tol, maxiter=maxiter, x0=x0, check=check)

    def solve(
        self, x: torch.Tensor, b: torch.Tensor, *, tol: float = 1e-12, maxiter: int = 2000, check: bool = True
    ) -> tuple[torch.Tensor, CGReport]:
        r"""D^{-1} b, as (D^+ D)^{-1} D^+ b (CG on the normal equations).

        The tolerance applies to the normal equations: |D^+ (b - D x)| <= tol |D^+ b|.

        Arguments and raises as :meth:`solve_normal`.

        Returns:
            ``(solution, report)``.
        """
        return self.solve_normal(x, self.apply_dagger(x, b), tol=tol, maxiter=maxiter, check=check)


class WilsonDiracOperator(NormalEquationsCG):
    r"""Wilson Dirac operator D = 1 - kappa H (r = 1) on U(1) or SU(N) links, d = 2 or 4.

    See the module docstring for the formula, the boundary conditions, the gamma matrices
    and the tensor layouts. The operator holds no links: every method takes them, so one
    operator serves every configuration and batch.

    Arguments:
        kappa: Hopping parameter (float, >= 0); kappa = 1 / (2 (m + d)), critical value
            1/(2d) for free fermions.
        antiperiodic: Antiperiodic boundary conditions in the last (time) direction
            (default); False gives periodic ones in every direction.

    Raises:
        ConfigError: for a negative or non-finite kappa.

    References:
        Gattringer & Lang (2010), chapter 5 (Wilson fermions, hopping parameter form,
        gamma_5-hermiticity); DESIGN.md section 3.
    """

    name = "wilson"
    parameters = ("kappa", "antiperiodic")

    def __init__(self, kappa: float, *, antiperiodic: bool = True) -> None:
        kappa = float(kappa)
        if not (math.isfinite(kappa) and kappa >= 0):
            raise ConfigError(f"wilson Dirac operator: kappa must be a finite number >= 0; found {kappa}")
        self.kappa = kappa
        self.antiperiodic = bool(antiperiodic)
        self._gammas: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._parity: dict[tuple[tuple[int, ...], str], tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return f"WilsonDiracOperator(kappa={self.kappa!r}, antiperiodic={self.antiperiodic!r})"

    # ----------------------------------------------------------------- layouts

    @staticmethod
    def geometry(links: torch.Tensor) -> tuple[tuple[int, ...], int]:
        """``(lattice, N)`` of a link tensor: N = 1 for U(1) angles, N for SU(N) matrices.

        Arguments:
            links: U(1) angles (B, d, L...) float64 or SU(N) links (B, d, L..., N, N) complex128.

        Raises:
            ShapeError: on any other layout, or a dimension without gamma matrices (d not 2 or 4).
        """
        lattice, n = link_layout(links, "Wilson fermions")
        if len(lattice) not in DIMS:
            raise ShapeError(f"Wilson fermions are implemented for d = 2 and 4; the links have d = {len(lattice)}")
        return lattice, n

    @staticmethod
    def spins(d: int) -> int:
        """Number of spin components s = 2^(d/2): 2 in d = 2, 4 in d = 4."""
        return 2 ** (d // 2)

    def spinor_shape(self, links: torch.Tensor) -> tuple[int, ...]:
        """Shape of a fermion field on ``links``: (B, L..., s) for U(1), (B, L..., s, N) for SU(N).

        Raises:
            ShapeError: as :meth:`geometry`.
        """
        lattice, n = self.geometry(links)
        s = self.spins(len(lattice))
        return (links.shape[0], *lattice, s) + ((n,) if links.is_complex() else ())

    def size(self, links: torch.Tensor) -> int:
        """Dimension of D per configuration: V s N (V = number of sites)."""
        return math.prod(self.spinor_shape(links)[1:])

    def _extra(self, links: torch.Tensor, psi: torch.Tensor) -> int:
        """Number of extra axes of psi between its batch axis and the lattice; ShapeError if psi does not fit."""
        return field_extra_axes(self.spinor_shape(links), psi, "Wilson fermions", "links")

    def _gamma(self, d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gammas, gamma5, 1 - gamma_mu, 1 + gamma_mu) on ``device``, cached."""
        key = (d, str(device))
        hit = self._gammas.get(key)
        if hit is None:
            g, g5 = gamma_matrices(d, device=device)
            one = torch.eye(g.shape[-1], dtype=g.dtype, device=device)
            hit = self._gammas[key] = (g, g5, one - g, one + g)
        return hit

    def hopping_links(self, links: torch.Tensor) -> torch.Tensor:
        """The links as they enter the hopping term, boundary signs included.

        Arguments:
            links: As in :meth:`geometry`.

        Returns:
            U(1): exp(i theta), (B, d, L...) complex128; SU(N): the matrices, (B, d, L..., N, N);
            with the links U_{d-1}(x) at x_{d-1} = L_{d-1} - 1 multiplied by -1 when
            ``antiperiodic``.
        """
        lattice, _ = self.geometry(links)
        d = len(lattice)
        h = torch.polar(torch.ones_like(links), links) if not links.is_complex() else links.to(torch.complex128)
        if self.antiperiodic:
            sign = torch.ones(lattice[-1], dtype=h.dtype, device=h.device)
            sign[-1] = -1
            shape = [1] * (h.dim() - 1)
            shape[d] = lattice[-1]  # the time axis of h[:, d - 1] (batch axis first)
            h = torch.cat([h[:, : d - 1], (h[:, d - 1] * sign.view(shape)).unsqueeze(1)], dim=1)
        return h

    # ------------------------------------------------------------ application

    def bind(self, links: torch.Tensor) -> BoundWilson:
        """The operator at fixed links, for repeated application (solvers): the hopping links
        are prepared once. See :class:`BoundWilson`.

        Raises:
            ShapeError: as :meth:`geometry`.
        """
        return BoundWilson(self, links)

    def apply(self, links: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        r"""D psi (module docstring).

        Arguments:
            links: U(1) angles (B, d, L...) float64 or SU(N) links (B, d, L..., N, N) complex128.
            psi: Fermion field (B, [K...,] L..., s[, N]) complex128.

        Returns:
            D psi, same shape and dtype as ``psi``.

        Raises:
            ShapeError: if the links or psi have the wrong layout or do not fit each other.
        """
        return self.bind(links).apply(psi)

    def apply_dagger(self, links: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        r"""D^+ psi: D with gamma_mu -> -gamma_mu, which equals gamma_5 D gamma_5.

        Arguments and returns as :meth:`apply`.
        """
        return self.bind(links).apply_dagger(psi)

    def apply_normal(self, links: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        """D^+ D psi (Hermitian, positive definite for a non-singular D); arguments as :meth:`apply`."""
        return self.bind(links).apply_normal(psi)

    def gamma5(self, links: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        """gamma_5 psi (module docstring: gamma_5 = sigma_3 in d = 2, diag(1, 1, -1, -1) in d = 4).

        Arguments:
            links: The links psi lives on (they fix the layout), as in :meth:`apply`.
            psi: Fermion field (B, [K...,] L..., s[, N]) complex128.

        Returns:
            Same shape and dtype.

        Raises:
            ShapeError: on a layout mismatch.
        """
        lattice, _ = self.geometry(links)
        self._extra(links, psi)
        _, g5, _, _ = self._gamma(len(lattice), psi.device)
        return g5 @ psi if links.is_complex() else psi @ g5.T

    # ------------------------------------------------------------- dense, exact

    def dense(self, links: torch.Tensor, *, by: str = "columns") -> torch.Tensor:
        r"""The matrix of D (small lattices).

        Arguments:
            links: As in :meth:`apply`.
            by: ``"columns"``: apply D to every unit vector (the definition; any operator
                built from :meth:`apply` agrees with it); ``"blocks"``: assemble the matrix
                from the hopping links, block by block (the same matrix, several times faster;
                tests compare the two).

        Returns:
            (B, n, n) complex128, n = V s N, rows and columns ordered as the flattened
            (L..., s[, N]) axes; memory B n^2 x 16 bytes (n = 128 on 8x8 U(1): 256 KiB a
            configuration; n = 3072 on 4^4 SU(3): 150 MiB).

        Raises:
            ShapeError: as :meth:`geometry`; ConfigError for another ``by``.
        """
        shape = self.spinor_shape(links)
        n = math.prod(shape[1:])
        if by == "columns":
            return dense_from_columns(functools.partial(self.apply, links), shape, links.device)
        if by != "blocks":
            raise ConfigError(f"dense: by must be 'columns' or 'blocks'; found {by!r}")
        lattice, ncol = self.geometry(links)
        d, s, volume, bsz = len(lattice), self.spins(len(lattice)), math.prod(lattice), shape[0]
        _, _, minus, plus = self._gamma(d, links.device)
        hop = self.hopping_links(links).reshape(bsz, d, volume, ncol, ncol)
        # blocks[z, x, y, a, b, i, j] = D(x a i; y b j) - delta_xy delta_ab delta_ij
        blocks = torch.zeros(volume, volume, bsz, s, s, ncol, ncol, dtype=torch.complex128, device=links.device)
        here, neighbours = forward_neighbours(lattice, links.device)
        for mu, there in enumerate(neighbours):
            v = hop[:, mu].transpose(0, 1)  # (V, B, N, N)
            fwd = -self.kappa * minus[mu][None, None, :, :, None, None] * v[:, :, None, None]
            bwd = -self.kappa * plus[mu][None, None, :, :, None, None] * v.mH[:, :, None, None]
            blocks.index_put_((here, there), fwd, accumulate=True)  # (x, x + mu)
            blocks.index_put_((there, here), bwd, accumulate=True)  # (x + mu, x)
        mat = blocks.permute(2, 0, 3, 5, 1, 4, 6).reshape(bsz, n, n)
        return mat + torch.eye(n, dtype=mat.dtype, device=mat.device)

    def logdet(self, links: torch.Tensor) -> torch.Tensor:
        r"""log det D, exactly, from the dense matrix (:meth:`dense`, ``torch.linalg.slogdet``).

        Arguments:
            links: As in :meth:`apply`.

        Returns:
            (B,) complex128: log|det D| + i arg det D. With gamma_5-hermiticity det D is real,
            so the imaginary part is 0 or pi (up to rounding); log det(D^+ D) = 2 Re logdet.

        Raises:
            ShapeError: as :meth:`geometry`.
        """
        return complex_logdet(self.dense(links))

    # ------------------------------------------------------------------ solvers
    # solve_normal and solve: :class:`NormalEquationsCG`.

    # ----------------------------------------------------------------- forces

    def derivative(self, links: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        r"""Derivative of the bilinear form left^+ D right with respect to every link.

        U(1): returns G_mu(x) = d/d theta_mu(x) [left^+ D right], complex;
        SU(N): returns M_mu(x), an N x N matrix with d/ds [left^+ D[exp(s X) U] right] at s = 0
        equal to tr(X_mu(x) M_mu(x)), for any X (summed over links).

        With V = U_mu(x) (boundary sign included) the terms of D holding it give
            -kappa [ left(x)^+ (1 - gamma_mu) V right(x+mu) + left(x+mu)^+ (1 + gamma_mu) V^+ right(x) ],
        so for U(1) G = -i kappa [ V left(x)^+ (1 - gamma_mu) right(x+mu)
                                   - V^* left(x+mu)^+ (1 + gamma_mu) right(x) ].
        Extra axes of ``left``/``right`` (K vectors per configuration) are summed over:
        tr(D^{-1} dD) is the sum over K = n unit vectors e_k of (D^{-+} e_k)^+ dD e_k.

        Arguments:
            links: As in :meth:`apply`.
            left, right: Fermion fields of one shape (B, [K...,] L..., s[, N]), complex128.

        Returns:
            U(1): (B, d, L...) complex128; SU(N): (B, d, L..., N, N) complex128.

        Raises:
            ShapeError: on a layout mismatch.

        References:
            Gattringer & Lang (2010), section 8.2 (fermion force of HMC);
            docs/fermions.md (derivation).
        """
        lattice, _ = self.geometry(links)
        extra = self._extra(links, left)
        if left.shape != right.shape:
            raise ShapeError(f"derivative: left {tuple(left.shape)} and right {tuple(right.shape)} differ")
        d = len(lattice)
        _, _, minus, plus = self._gamma(d, left.device)
        hop = self.hopping_links(links)
        inner = 2 if links.is_complex() else 1
        axes = [left.dim() - inner - d + mu for mu in range(d)]
        sum_axes = tuple(range(1, 1 + extra))
        bshape = (links.shape[0],) + (1,) * extra
        out = []
        for mu in range(d):
            r_f = torch.roll(right, -1, axes[mu])
            l_f = torch.roll(left, -1, axes[mu])
            h = hop[:, mu]
            if links.is_complex():
                hb = h.reshape(*bshape, *h.shape[1:])
                w = minus[mu] @ (r_f @ hb.transpose(-1, -2))  # (1 - gamma) V right(x+mu)
                a = torch.einsum("...aj,...ai->...ji", w, left.conj())
                v = plus[mu] @ l_f  # (1 + gamma) left(x+mu)
                bm = torch.einsum("...bl,...bk->...lk", right, (v @ hb.transpose(-1, -2)).conj())
                m = -self.kappa * a + self.kappa * bm
                out.append(m.sum(dim=sum_axes) if extra else m)
            else:
                t1 = (left.conj() * (r_f @ minus[mu].T)).sum(-1)
                t2 = (l_f.conj() * (right @ plus[mu].T)).sum(-1)
                hb = h.reshape(*bshape, *h.shape[1:])
                g = -1j * self.kappa * (hb * t1 - hb.conj() * t2)
                out.append(g.sum(dim=sum_axes) if extra else g)
        return torch.stack(out, dim=1)

    def trace_derivative(self, links: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        r"""Derivative of tr(M D) with respect to every link, for a dense M (the exact force).

        With M = D^{-1} this gives d log det D = tr(D^{-1} dD). Equal to :meth:`derivative`
        summed over left = M^+ e_k, right = e_k (k = 1..n), but reads only the blocks
        M(x+mu, x) and M(x, x+mu) that the hopping term couples:
        U(1): G_mu(x) = -i kappa [ V tr(M(x+mu, x) (1 - gamma_mu)) - V^* tr(M(x, x+mu) (1 + gamma_mu)) ];
        SU(N): M_mu(x) = -kappa V Q_- + kappa Q_+ V^+, with (Q_-)_{ji} = sum_ab M(x+mu,b,j; x,a,i) (1 - gamma_mu)_{ab}
        and (Q_+)_{ji} = sum_ab M(x,b,j; x+mu,a,i) (1 + gamma_mu)_{ab}; V = U_mu(x) with its boundary sign.

        Arguments:
            links: As in :meth:`apply`.
            matrix: M, (B, n, n) complex128, indexed as :meth:`dense`.

        Returns:
            As :meth:`derivative`: U(1) (B, d, L...) complex128; SU(N) (B, d, L..., N, N).

        Raises:
            ShapeError: if M is not (B, n, n).
        """
        lattice, ncol = self.geometry(links)
        shape = self.spinor_shape(links)
        bsz, n, volume = shape[0], math.prod(shape[1:]), math.prod(lattice)
        if tuple(matrix.shape) != (bsz, n, n):
            raise ShapeError(f"trace_derivative: expected a matrix of shape {(bsz, n, n)}; found {tuple(matrix.shape)}")
        d = len(lattice)
        s = self.spins(d)
        _, _, minus, plus = self._gamma(d, matrix.device)
        hop = self.hopping_links(links).reshape(bsz, d, volume, *((ncol, ncol) if links.is_complex() else ()))
        blocks = matrix.reshape(bsz, volume, s, ncol, volume, s, ncol).permute(0, 1, 4, 2, 3, 5, 6)
        here, neighbours = forward_neighbours(lattice, matrix.device)
        out = []
        for mu, there in enumerate(neighbours):  # there: index of x + mu
            a = blocks[:, there, here]  # M(x+mu, x): (B, V, s_b, N_j, s_a, N_i)
            b = blocks[:, here, there]  # M(x, x+mu)
            q_minus = torch.einsum("zxbjai,ab->zxji", a, minus[mu])
            q_plus = torch.einsum("zxbjai,ab->zxji", b, plus[mu])
            v = hop[:, mu]
            if links.is_complex():
                m = -self.kappa * (v @ q_minus) + self.kappa * (q_plus @ v.mH)
                out.append(m.reshape(bsz, *lattice, ncol, ncol))
            else:
                g = -1j * self.kappa * (v * q_minus[..., 0, 0] - v.conj() * q_plus[..., 0, 0])
                out.append(g.reshape(bsz, *lattice))
        return torch.stack(out, dim=1)

    # ------------------------------------------------------- even-odd preconditioning

    def parity_sites(self, links: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Flat indices of the even and the odd sites (even: sum_mu x_mu even).

        Sites are numbered in the row-major order of (L_0, ..., L_{d-1}); each list keeps
        that order. An even-site field (:meth:`even_shape`) stores the even sites in this order.

        Arguments:
            links: As in :meth:`apply` (they fix the lattice).

        Returns:
            ``(even, odd)``, int64 tensors of V/2 flat site indices each, on the links' device.

        Raises:
            ShapeError: as :meth:`geometry`, or if some extent is odd (then the hopping term
                does not connect only sites of opposite parity across the periodic boundary).
        """
        lattice, _ = self.geometry(links)
        odd_extents = [mu for mu, n in enumerate(lattice) if n % 2]
        if odd_extents:
            raise ShapeError(
                f"even-odd preconditioning needs even extents in every direction; the lattice "
                f"{tuple(lattice)} has odd extents in directions {odd_extents} "
                "(use an even lattice or even_odd = false)"
            )
        key = (tuple(lattice), str(links.device))
        hit = self._parity.get(key)
        if hit is None:
            grids = torch.meshgrid(*[torch.arange(n, device=links.device) for n in lattice], indexing="ij")
            parity = torch.stack(grids).sum(0).flatten() % 2
            hit = self._parity[key] = (torch.nonzero(parity == 0).flatten(), torch.nonzero(parity == 1).flatten())
        return hit

    def even_shape(self, links: torch.Tensor) -> tuple[int, ...]:
        """Shape of an even-site field on ``links``: (B, V/2, s) for U(1), (B, V/2, s, N) for SU(N).

        Raises:
            ShapeError: as :meth:`parity_sites`.
        """
        lattice, _ = self.geometry(links)
        self.parity_sites(links)
        full = self.spinor_shape(links)
        return (full[0], math.prod(lattice) // 2, *full[1 + len(lattice) :])

    def _extra_even(self, links: torch.Tensor, psi: torch.Tensor) -> int:
        """Number of extra axes of an even-site field; ShapeError if it does not fit."""
        shape = self.even_shape(links)
        extra = psi.dim() - len(shape)
        if not psi.is_complex() or extra < 0 or psi.shape[0] != shape[0] or tuple(psi.shape[1 + extra :]) != shape[1:]:
            raise ShapeError(
                f"even-odd Wilson operator: expected a complex even-site field of shape {shape} (or with extra "
                f"axes after the batch axis); found {psi.dtype} {tuple(psi.shape)}"
            )
        return extra

    def to_even(self, links: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        """The even-site part of a fermion field.

        Arguments:
            links: As in :meth:`apply`.
            psi: Fermion field (B, [K...,] L..., s[, N]) complex128.

        Returns:
            (B, [K...,] V/2, s[, N]), the even sites in the order of :meth:`parity_sites`.

        Raises:
            ShapeError: on a layout mismatch or odd extents.
        """
        lattice, _ = self.geometry(links)
        extra = self._extra(links, psi)
        even, _ = self.parity_sites(links)
        flat = psi.reshape(*psi.shape[: 1 + extra], math.prod(lattice), *psi.shape[1 + extra + len(lattice) :])
        return flat.index_select(1 + extra, even)

    def embed_even_odd(self, links: torch.Tensor, even: torch.Tensor, odd: torch.Tensor | None = None) -> torch.Tensor:
        """The full-lattice field with ``even`` on the even sites and ``odd`` (default 0) on the odd ones.

        Arguments:
            links: As in :meth:`apply`.
            even, odd: Even- and odd-site fields (B, [K...,] V/2, s[, N]) complex128, one shape.

        Returns:
            (B, [K...,] L..., s[, N]) complex128.

        Raises:
            ShapeError: on a layout mismatch or odd extents.
        """
        lattice, _ = self.geometry(links)
        extra = self._extra_even(links, even)
        if odd is not None and odd.shape != even.shape:
            raise ShapeError(f"embed_even_odd: even {tuple(even.shape)} and odd {tuple(odd.shape)} fields differ")
        ev, od = self.parity_sites(links)
        axis = 1 + extra
        shape = list(even.shape)
        shape[axis] = math.prod(lattice)
        full = torch.zeros(shape, dtype=even.dtype, device=even.device)
        full.index_copy_(axis, ev, even)
        if odd is not None:
            full.index_copy_(axis, od, odd)
        return full.reshape(*shape[:axis], *lattice, *shape[axis + 1 :])

    def bind_even_odd(self, links: torch.Tensor) -> BoundEvenOdd:
        """The even-odd preconditioned operator at fixed links (:class:`BoundEvenOdd`).

        Raises:
            ShapeError: as :meth:`parity_sites`.
        """
        return BoundEvenOdd(self, links)

    def apply_even_odd(self, links: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        r"""D_hat psi = psi - kappa^2 H_eo H_oe psi on the even sites.

        With the sites ordered even first, D = [[1, -kappa H_eo], [-kappa H_oe, 1]] (H connects
        sites of opposite parity only), and det D = det D_hat (Schur complement of the odd block,
        whose determinant is 1).

        Arguments:
            links: As in :meth:`apply` (every extent even).
            psi: Even-site field (B, [K...,] V/2, s[, N]) complex128 (:meth:`even_shape`).

        Returns:
            D_hat psi, same shape and dtype.

        Raises:
            ShapeError: on a layout mismatch or odd extents.

        References:
            T. DeGrand and P. Rossi, Comput. Phys. Commun. 60 (1990) 211 (even-odd
            preconditioning); Gattringer & Lang (2010), section 6.2.3; Abbott et al.,
            arXiv:2207.08945, section 2.
        """
        return self.bind_even_odd(links).apply(psi)

    def apply_even_odd_dagger(self, links: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        r"""D_hat^+ psi = psi - kappa^2 (H^+)_eo (H^+)_oe psi (H^+ = H with gamma_mu -> -gamma_mu).

        Arguments, returns and raises as :meth:`apply_even_odd`.
        """
        return self.bind_even_odd(links).apply_dagger(psi)

    def apply_even_odd_normal(self, links: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        """D_hat^+ D_hat psi; as :meth:`apply_even_odd`."""
        return self.bind_even_odd(links).apply_normal(psi)

    def solve_even_odd_normal(
        self,
        links: torch.Tensor,
        b: torch.Tensor,
        *,
        tol: float = 1e-12,
        maxiter: int = 2000,
        x0: torch.Tensor | None = None,
        check: bool = True,
    ) -> tuple[torch.Tensor, CGReport]:
        r"""X = (D_hat^+ D_hat)^{-1} b by the batched conjugate gradient (:func:`conjugate_gradient`).

        Since (D^{-1})_ee = D_hat^{-1}, X = [D^{-1} [D^{-+} b]_e]_e (the tests compare it with
        the unpreconditioned solve). Each iteration applies the hopping term four times to
        half-lattice fields: the work of one application of D^+ D, and near the critical kappa
        about half the iterations (D_hat^+ D_hat is better conditioned).

        Arguments:
            links: As in :meth:`apply` (every extent even).
            b: Right-hand side, even-site field (B, [K...,] V/2, s[, N]) complex128.
            tol, maxiter, x0, check: As for :func:`conjugate_gradient` (tol relative to |b|).

        Returns:
            ``(X, report)``, X shaped like ``b``.

        Raises:
            ShapeError: on a layout mismatch or odd extents.
            ConvergenceError: if ``check`` and some batch element did not converge.
        """
        self._extra_even(links, b)
        bound = self.bind_even_odd(links)
        return conjugate_gradient(bound.apply_normal, b, tol=tol, maxiter=maxiter, x0=x0, check=check)

    def derivative_even_odd(self, links: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        r"""Derivative of left_e^+ D_hat right_e with respect to every link (as :meth:`derivative`).

        With r_o = H_oe right_e and l_o = (H_eo)^+ left_e = (H^+)_oe left_e,
            d(left_e^+ D_hat right_e) = -kappa^2 [left_e^+ dH_eo r_o + l_o^+ dH_oe right_e]
                                      = kappa d(L^+ D R),   L = (left_e, l_o), R = (right_e, r_o),
        because dH has only the even-odd and odd-even blocks: so this is kappa times
        :meth:`derivative` of the full-lattice fields L and R. The force of a term
        -2 Re(left_e^+ D_hat right_e) takes the real part (U(1)) or the traceless anti-Hermitian
        projection (SU(N)) of the result, as for :meth:`derivative`.

        Arguments:
            links: As in :meth:`apply` (every extent even).
            left, right: Even-site fields of one shape (B, [K...,] V/2, s[, N]), complex128;
                extra axes are summed over.

        Returns:
            U(1): (B, d, L...) complex128; SU(N): (B, d, L..., N, N) complex128.

        Raises:
            ShapeError: on a layout mismatch or odd extents.

        References:
            Abbott et al., arXiv:2207.08945, section 2; docs/fermions.md ("Even-odd and
            Hasenbusch preconditioning").
        """
        if left.shape != right.shape:
            raise ShapeError(f"derivative_even_odd: left {tuple(left.shape)} and right {tuple(right.shape)} differ")
        bound = self.bind_even_odd(links)
        r_odd = bound.hop(right, to_odd=True, dagger=False)
        l_odd = bound.hop(left, to_odd=True, dagger=True)
        full_left = self.embed_even_odd(links, left, l_odd)
        full_right = self.embed_even_odd(links, right, r_odd)
        return self.kappa * self.derivative(links, full_left, full_right)

    def dense_even_odd(self, links: torch.Tensor) -> torch.Tensor:
        r"""The matrix of D_hat (small lattices), by applying it to every even-site unit vector.

        Arguments:
            links: As in :meth:`apply` (every extent even).

        Returns:
            (B, n/2, n/2) complex128, rows and columns ordered as the flattened (V/2, s[, N])
            axes of an even-site field; det of it equals det D (:meth:`dense`).

        Raises:
            ShapeError: as :meth:`parity_sites`.
        """
        return dense_from_columns(functools.partial(self.apply_even_odd, links), self.even_shape(links), links.device)


class BoundWilson:
    r"""A :class:`WilsonDiracOperator` at fixed links: D psi, D^+ psi and D^+ D psi.

    The hopping links (with boundary signs) and gamma matrices are prepared once; each
    application is one fused pass over the directions,
    D psi = psi - kappa sum_mu [(f_mu + b_mu) - gamma_mu (f_mu - b_mu)] with
    f_mu = U_mu(x) psi(x+mu) and b_mu = U_mu(x-mu)^+ psi(x-mu) (gamma_mu -> -gamma_mu for D^+).

    Arguments:
        operator: The operator.
        links: U(1) angles (B, d, L...) float64 or SU(N) links (B, d, L..., N, N) complex128.

    Raises:
        ShapeError: as :meth:`WilsonDiracOperator.geometry`.
    """

    def __init__(self, operator: WilsonDiracOperator, links: torch.Tensor) -> None:
        lattice, _ = operator.geometry(links)
        self.operator = operator
        self.links = links
        self.d = len(lattice)
        self.color = links.is_complex()
        self.inner = 2 if self.color else 1
        gammas, _, _, _ = operator._gamma(self.d, links.device)
        # gamma_mu acting on the spin axis: psi @ gamma^T (U(1), spin last), gamma @ psi (SU(N))
        self.gammas = [gammas[mu] if self.color else gammas[mu].T.contiguous() for mu in range(self.d)]
        hop = operator.hopping_links(links)
        if self.color:
            self.fwd = [hop[:, mu].transpose(-1, -2).contiguous() for mu in range(self.d)]  # psi @ U^T = U psi
            self.bwd = [hop[:, mu].conj().contiguous() for mu in range(self.d)]  # psi @ conj(U) = U^+ psi
        else:
            self.fwd = [hop[:, mu].unsqueeze(-1).contiguous() for mu in range(self.d)]
            self.bwd = [hop[:, mu].conj().unsqueeze(-1).contiguous() for mu in range(self.d)]

    def _links(self, h: torch.Tensor, extra: int) -> torch.Tensor:
        return h.reshape(h.shape[0], *([1] * extra), *h.shape[1:]) if extra else h

    def _hop(self, psi: torch.Tensor, dagger: bool) -> torch.Tensor:
        extra = self.operator._extra(self.links, psi)
        axes = [psi.dim() - self.inner - self.d + mu for mu in range(self.d)]
        total = None
        spin = None
        for mu in range(self.d):
            hf, hb = self._links(self.fwd[mu], extra), self._links(self.bwd[mu], extra)
            if self.color:
                f = torch.roll(psi, -1, axes[mu]) @ hf
                b = torch.roll(psi @ hb, 1, axes[mu])
            else:
                f = hf * torch.roll(psi, -1, axes[mu])
                b = torch.roll(hb * psi, 1, axes[mu])
            diff = f - b
            g = self.gammas[mu] @ diff if self.color else diff @ self.gammas[mu]
            total = f + b if total is None else total + f + b
            spin = g if spin is None else spin + g
        assert total is not None and spin is not None  # d >= 2
        return total + spin if dagger else total - spin

    def apply(self, psi: torch.Tensor) -> torch.Tensor:
        """D psi, psi of shape (B, [K...,] L..., s[, N]) complex128; ShapeError if it does not fit."""
        return psi - self.operator.kappa * self._hop(psi, dagger=False)

    def apply_dagger(self, psi: torch.Tensor) -> torch.Tensor:
        """D^+ psi, as :meth:`apply`."""
        return psi - self.operator.kappa * self._hop(psi, dagger=True)

    def apply_normal(self, psi: torch.Tensor) -> torch.Tensor:
        """D^+ D psi, as :meth:`apply`."""
        return self.apply_dagger(self.apply(psi))


class BoundEvenOdd:
    r"""The even-odd preconditioned Wilson operator D_hat = 1 - kappa^2 H_eo H_oe at fixed links.

    Even-site fields have shape (B, [K...,] V/2, s[, N]) (complex128), the sites in the order
    of :meth:`WilsonDiracOperator.parity_sites`; odd-site fields the same. The hopping term
    between parities acts on half-lattice fields only: for every target site the positions
    of its 2d neighbours in the other parity's list are found once here, and the 2d hopping
    matrices (1 -+ gamma_mu) x U_mu(x) and (1 +- gamma_mu) x U_mu(x - mu)^+ (spin x colour,
    boundary signs included) are stacked into one (s N) x (2 d s N) matrix per site, so that
    one application of H_eo or H_oe is one gather and one batched matrix-vector product
    (memory B (V/2) 2d (s N)^2 x 16 bytes per table; one table per target parity and for
    H^+, built when first used).

    Arguments:
        operator: The :class:`WilsonDiracOperator` (its kappa and boundary conditions).
        links: U(1) angles (B, d, L...) float64 or SU(N) links (B, d, L..., N, N) complex128,
            every extent even.

    Raises:
        ShapeError: as :meth:`WilsonDiracOperator.parity_sites`.

    References:
        DeGrand & Rossi, Comput. Phys. Commun. 60 (1990) 211; Gattringer & Lang (2010),
        section 6.2.3 (even-odd preconditioning).
    """

    def __init__(self, operator: WilsonDiracOperator, links: torch.Tensor) -> None:
        lattice, ncol = operator.geometry(links)
        even, odd = operator.parity_sites(links)
        self.operator = operator
        self.links = links
        self.d = len(lattice)
        self.color = links.is_complex()
        self.inner = 2 if self.color else 1
        self.ncol = ncol
        self.spin = operator.spins(self.d)
        volume = math.prod(lattice)
        position = torch.empty(volume, dtype=torch.int64, device=links.device)
        position[even] = torch.arange(even.numel(), device=links.device)
        position[odd] = torch.arange(odd.numel(), device=links.device)
        sites = torch.arange(volume, device=links.device).reshape(lattice)
        hop = operator.hopping_links(links)
        self._hop_links = hop.reshape(hop.shape[0], self.d, volume, *hop.shape[2 + self.d :])
        self._targets = (even, odd)
        # per target parity: the neighbours' positions, (V/2, 2d) -> flat, ordered x+0, x-0, x+1, x-1, ...
        self._sources = []
        self._behind = []  # flat site index of x - mu, (2d... only the backward ones), per parity: (d, V/2)
        for targets in (even, odd):
            fwd = [torch.roll(sites, -1, mu).flatten()[targets] for mu in range(self.d)]
            bwd = [torch.roll(sites, 1, mu).flatten()[targets] for mu in range(self.d)]
            nb = torch.stack([t for pair in zip(fwd, bwd, strict=True) for t in pair], dim=1)  # (V/2, 2d)
            self._sources.append(position[nb].flatten())
            self._behind.append(torch.stack(bwd))
        self._tables: dict[tuple[int, bool], torch.Tensor] = {}

    def _table(self, parity: int, dagger: bool) -> torch.Tensor:
        """(B, V/2, sN, 2d sN): the hopping matrices into the sites of ``parity`` (0 even, 1 odd)."""
        key = (parity, dagger)
        hit = self._tables.get(key)
        if hit is not None:
            return hit
        _, _, minus, plus = self.operator._gamma(self.d, self.links.device)
        if dagger:
            minus, plus = plus, minus
        targets = self._targets[parity]
        blocks = []
        for mu in range(self.d):
            u_f = self._hop_links[:, mu].index_select(1, targets)  # U_mu(x)
            u_b = self._hop_links[:, mu].index_select(1, self._behind[parity][mu])  # U_mu(x - mu)
            for proj, u in ((minus[mu], u_f), (plus[mu], u_b.mH if self.color else u_b.conj())):
                if self.color:  # (spin a, colour c; spin b, colour e) = P[a, b] U[c, e]
                    blk = torch.einsum("ab,...ce->...acbe", proj, u)
                    blk = blk.reshape(*u.shape[:2], self.spin * self.ncol, self.spin * self.ncol)
                else:
                    blk = proj * u[..., None, None]
                blocks.append(blk)
        table = torch.cat(blocks, dim=-1).contiguous()  # (B, V/2, sN, 2d sN), neighbours ordered as _sources
        self._tables[key] = table
        return table

    def hop(self, psi: torch.Tensor, *, to_odd: bool, dagger: bool) -> torch.Tensor:
        r"""H_oe psi (``to_odd``, psi on the even sites) or H_eo psi (psi on the odd sites);
        with ``dagger`` the same blocks of H^+ (gamma_mu -> -gamma_mu).

        Arguments:
            psi: Field on the source parity (B, [K...,] V/2, s[, N]) complex128.
            to_odd: Target parity odd (True) or even (False).
            dagger: Use H^+ instead of H.

        Returns:
            The field on the target parity, same shape.

        Raises:
            ShapeError: if psi does not fit the links.
        """
        extra = self.operator._extra_even(self.links, psi)
        parity = 1 if to_odd else 0
        table = self._table(parity, dagger)
        if extra:
            table = table.reshape(table.shape[0], *([1] * extra), *table.shape[1:])
        axis = 1 + extra
        half = psi.shape[axis]
        flat = psi.reshape(*psi.shape[:axis], half, -1)  # (B, [K...,] V/2, sN)
        gathered = flat.index_select(axis, self._sources[parity]).reshape(*psi.shape[:axis], half, -1)
        return (table @ gathered.unsqueeze(-1)).squeeze(-1).reshape(psi.shape)

    def apply(self, psi: torch.Tensor) -> torch.Tensor:
        """D_hat psi = psi - kappa^2 H_eo H_oe psi, psi (B, [K...,] V/2, s[, N]) complex128."""
        k2 = self.operator.kappa**2
        return psi - k2 * self.hop(self.hop(psi, to_odd=True, dagger=False), to_odd=False, dagger=False)

    def apply_dagger(self, psi: torch.Tensor) -> torch.Tensor:
        """D_hat^+ psi = psi - kappa^2 (H^+)_eo (H^+)_oe psi, as :meth:`apply`."""
        k2 = self.operator.kappa**2
        return psi - k2 * self.hop(self.hop(psi, to_odd=True, dagger=True), to_odd=False, dagger=True)

    def apply_normal(self, psi: torch.Tensor) -> torch.Tensor:
        """D_hat^+ D_hat psi, as :meth:`apply`."""
        return self.apply_dagger(self.apply(psi))


def free_wilson_logdet(lattice: tuple[int, ...], kappa: float, *, ncolor: int = 1, antiperiodic: bool = True) -> float:
    r"""log det D of the free Wilson operator (unit links) from its momentum-space eigenvalues.

    In momentum space D(p) = 1 - 2 kappa sum_mu cos p_mu + 2 i kappa sum_mu gamma_mu sin p_mu,
    whose s eigenvalues come in pairs a(p) +- i b(p), a = 1 - 2 kappa sum cos p_mu,
    b = 2 kappa sqrt(sum sin^2 p_mu); so det D = prod_p (a^2 + b^2)^{s/2}, and with N colours
    its N-th power. Momenta p_mu = 2 pi n / L_mu, and p_{d-1} = (2 n + 1) pi / L_{d-1} with
    antiperiodic time.

    Arguments:
        lattice: Extents (L_0, ..., L_{d-1}), d = 2 or 4.
        kappa: Hopping parameter.
        ncolor: N (1 for U(1)).
        antiperiodic: As for :class:`WilsonDiracOperator`.

    Returns:
        log det D (float; det D > 0 for the free operator unless a zero mode is hit).

    References:
        Gattringer & Lang (2010), chapter 5 (Wilson operator in momentum space, doublers).
    """
    d = len(lattice)
    s = WilsonDiracOperator.spins(d)
    grids = []
    for mu, n in enumerate(lattice):
        k = torch.arange(n, dtype=torch.float64)
        shift = 0.5 if (antiperiodic and mu == d - 1) else 0.0
        grids.append(2 * math.pi * (k + shift) / n)
    ps = torch.meshgrid(*grids, indexing="ij")
    a = 1 - 2 * kappa * torch.stack([torch.cos(p) for p in ps]).sum(0)
    b2 = 4 * kappa**2 * torch.stack([torch.sin(p) ** 2 for p in ps]).sum(0)
    return float(ncolor * (s / 2) * torch.log(a * a + b2).sum())


@hookimpl
def flowplug_dirac_operators() -> list[DiracOperatorSpec]:
    """The built-in Dirac operator ``wilson``."""
    return [
        DiracOperatorSpec(
            name="wilson",
            description="Wilson fermions D = 1 - kappa H (r = 1), U(1)/SU(N), d = 2, 4, antiperiodic in time",
            factory=WilsonDiracOperator,
            fields=("u1", "su2", "su3"),
            parameters=("kappa", "antiperiodic"),
            dims=DIMS,
        )
    ]
