r"""Staggered Dirac operators (hook ``flowplug_dirac_operators``): ``staggered`` and ``staggered-yukawa``.

Conventions (docs/fermions.md, "Staggered fermions and the Yukawa model"):

* **Operator.** One fermion component per site (times N colours),

      D(x, y) = M_x delta_{x,y} + (1/2) sum_mu eta_mu(x) [ U_mu(x) delta_{x+mu, y}
                                                         - U_mu(x-mu)^+ delta_{x-mu, y} ],

  with the staggered phases eta_mu(x) = (-1)^(x_0 + ... + x_{mu-1}) (eta_0 = 1; direction mu
  is array axis mu, coordinates counted from 0). The hopping part K (the sum) is
  anti-Hermitian for any links, since eta_mu(x + mu) = eta_mu(x).
* **Backgrounds.** Chosen by the constructor option ``background`` (never guessed from the
  shape: a scalar field and U(1) angles can have the same shape):

  - ``"links"`` (registered as ``staggered``): gauge links exactly like the Wilson operator's,
    U(1) angles (B, d, L_0, ..., L_{d-1}) float64 (U = exp(i theta)) or SU(N) matrices
    (B, d, L..., N, N) complex128; uniform mass M_x = ``mass``; then D^+ = 2 mass - D.
  - ``"scalar"`` (registered as ``staggered-yukawa``): a real scalar field phi
    (B, L_0, ..., L_{d-1}) float64 entering the site-dependent mass M_x = mass + g phi_x
    (the Yukawa coupling g), free hopping (U = 1); D^+ = 2 M - D.

* **Boundary conditions.** The hops that cross the time boundary (direction d - 1, from
  x_{d-1} = L_{d-1} - 1 to 0) carry a factor -1 (antiperiodic in time, periodic in space);
  ``antiperiodic=False`` makes every direction periodic.
* **Even extents.** Every L_mu must be even: then epsilon(x) = (-1)^(x_0 + ... + x_{d-1})
  anticommutes with K (epsilon K epsilon = -K), so D^+ = epsilon D epsilon and det D is real,
  and the operator is the spin-diagonalised naive operator (the momentum-space formula of
  :func:`free_staggered_logdet` holds).
* **Fermion fields** chi: (B, L_0, ..., L_{d-1}) complex128 for U(1) links and the scalar
  background, (B, L..., N) for SU(N); extra axes after the batch axis ((B, K..., L...[, N]):
  K vectors per configuration) are allowed everywhere. Dense matrices index the flattened
  (L...[, N]) axes in row-major order.

Two degenerate flavours weigh det(D^+ D) = det(D)^2 (det D real).

Everything is pure torch (batched, on the background's device, complex128).

References:
    J. B. Kogut & L. Susskind, Phys. Rev. D 11 (1975) 395; L. Susskind, Phys. Rev. D 16 (1977)
    3031 (staggered fermions);
    C. Gattringer & C. B. Lang, "Quantum Chromodynamics on the Lattice" (Springer 2010),
    section 5.2.3 (staggered phases, spin diagonalisation of naive fermions);
    M. S. Albergo et al., arXiv:2106.05934, section IV (staggered fermions with a Yukawa
    coupling to a real scalar field).
"""

from __future__ import annotations

import functools
import math

import torch

from flowplug.errors import ConfigError, ShapeError
from flowplug.hookspecs import hookimpl
from flowplug.plugins.dirac import (
    NormalEquationsCG,
    complex_logdet,
    dense_from_columns,
    field_extra_axes,
    forward_neighbours,
    link_layout,
)
from flowplug.records import DiracOperatorSpec

__all__ = [
    "BoundStaggered",
    "StaggeredDiracOperator",
    "free_staggered_condensate",
    "free_staggered_logdet",
    "staggered_phases",
]

#: The two backgrounds the operator knows.
BACKGROUNDS = ("links", "scalar")


def staggered_phases(
    lattice: tuple[int, ...], *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    r"""The staggered phases eta_mu(x) = (-1)^(x_0 + ... + x_{mu-1}).

    Arguments:
        lattice: Extents (L_0, ..., L_{d-1}), d >= 1.
        device, dtype: Of the result.

    Returns:
        (d, L_0, ..., L_{d-1}) with entries +-1; eta_0 = 1 everywhere.

    References:
        Kogut & Susskind, Phys. Rev. D 11 (1975) 395; Gattringer & Lang (2010), section 5.2.3.
    """
    d = len(lattice)
    coords = torch.meshgrid(*[torch.arange(n, device=device) for n in lattice], indexing="ij")
    out = torch.ones((d, *lattice), dtype=dtype, device=device)
    partial = torch.zeros(tuple(lattice), dtype=torch.int64, device=device)
    for mu in range(d):
        out[mu] = 1 - 2 * (partial % 2).to(dtype)
        partial = partial + coords[mu]
    return out


class StaggeredDiracOperator(NormalEquationsCG):
    r"""Staggered Dirac operator on gauge links or on a real scalar field (module docstring).

    D = M + K, M_x = ``mass`` (links) or ``mass`` + g phi_x (scalar), K the anti-Hermitian
    hopping term with the staggered phases. The operator holds no background: every method
    takes it, so one operator serves every configuration and batch.

    Arguments:
        mass: Bare staggered mass m (lattice units, finite float; 0 = massless).
        g: Yukawa coupling (finite float; used with ``background="scalar"`` only).
        background: ``"links"`` (U(1) angles or SU(N) links) or ``"scalar"`` (phi).
        antiperiodic: Antiperiodic boundary conditions in the last (time) direction
            (default); False gives periodic ones in every direction.

    Raises:
        ConfigError: for a non-finite mass or g, or another background.

    References:
        Kogut & Susskind, Phys. Rev. D 11 (1975) 395; Gattringer & Lang (2010), section 5.2.3;
        arXiv:2106.05934, section IV (Yukawa background).
    """

    name = "staggered"
    parameters = ("mass", "g", "background", "antiperiodic")

    def __init__(
        self, mass: float = 0.0, *, g: float = 1.0, background: str = "links", antiperiodic: bool = True
    ) -> None:
        mass, g = float(mass), float(g)
        if not (math.isfinite(mass) and math.isfinite(g)):
            raise ConfigError(f"staggered Dirac operator: mass and g must be finite; found mass={mass}, g={g}")
        bg = str(background).strip().lower()
        if bg not in BACKGROUNDS:
            raise ConfigError(f"staggered Dirac operator: background must be 'links' or 'scalar'; found {background!r}")
        self.mass = mass
        self.g = g
        self.background = bg
        self.antiperiodic = bool(antiperiodic)
        self._phases: dict[tuple[tuple[int, ...], str], torch.Tensor] = {}

    def __repr__(self) -> str:
        extra = f", g={self.g!r}" if self.background == "scalar" else ""
        return (
            f"StaggeredDiracOperator(mass={self.mass!r}{extra}, background={self.background!r}, "
            f"antiperiodic={self.antiperiodic!r})"
        )

    # ----------------------------------------------------------------- layouts

    def geometry(self, x: torch.Tensor) -> tuple[tuple[int, ...], int]:
        """``(lattice, N)`` of a background: N = 1 for U(1) angles and the scalar field, N for SU(N).

        Arguments:
            x: ``links``: U(1) angles (B, d, L...) float64 or SU(N) links (B, d, L..., N, N)
                complex128; ``scalar``: phi (B, L...) float64.

        Raises:
            ShapeError: on any other layout, or an odd extent.
        """
        if self.background == "scalar":
            if x.is_complex() or x.dim() < 2:
                raise ShapeError(
                    "staggered fermions (scalar background): phi must be a real tensor of shape "
                    f"(B, L_0, ..., L_(d-1)); found {x.dtype} {tuple(x.shape)}"
                )
            lattice, n = tuple(int(v) for v in x.shape[1:]), 1
        else:
            hint = " (a scalar field needs background='scalar', operator 'staggered-yukawa')"
            lattice, n = link_layout(x, "staggered fermions", hint=hint)
        if any(v % 2 for v in lattice):
            raise ShapeError(f"staggered fermions need even extents in every direction; found lattice {lattice}")
        return lattice, n

    def spinor_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        """Shape of a fermion field on ``x``: (B, L...) (U(1), scalar) or (B, L..., N) (SU(N)).

        Raises:
            ShapeError: as :meth:`geometry`.
        """
        lattice, _ = self.geometry(x)
        colour = (int(x.shape[-1]),) if (self.background == "links" and x.is_complex()) else ()
        return (int(x.shape[0]), *lattice, *colour)

    def size(self, x: torch.Tensor) -> int:
        """Dimension n = V N of D per configuration (V = number of sites)."""
        return math.prod(self.spinor_shape(x)[1:])

    def _colour(self, x: torch.Tensor) -> bool:
        return self.background == "links" and x.is_complex()

    def _extra(self, x: torch.Tensor, psi: torch.Tensor) -> int:
        """Number of extra axes of psi between its batch axis and the lattice; ShapeError if it does not fit."""
        return field_extra_axes(self.spinor_shape(x), psi, "staggered fermions", "background")

    def phases(self, lattice: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """(1/2) eta_mu(x) times the time-boundary sign, (d, L...) float64 (cached).

        Entry [mu, x] is the factor of the forward hop x -> x + mu; with ``antiperiodic`` the
        hops with mu = d - 1 from x_{d-1} = L_{d-1} - 1 carry -1.
        """
        key = (tuple(lattice), str(device))
        hit = self._phases.get(key)
        if hit is None:
            ph = 0.5 * staggered_phases(lattice, device=device)
            if self.antiperiodic:
                ph[len(lattice) - 1, ..., lattice[-1] - 1] *= -1
            hit = self._phases[key] = ph
        return hit

    def hopping_links(self, x: torch.Tensor) -> torch.Tensor:
        """The forward hopping factors H_mu(x) = (1/2) eta_mu(x) s_mu(x) U_mu(x), s the boundary sign.

        Arguments:
            x: The background (:meth:`geometry`).

        Returns:
            U(1) links: (B, d, L...) complex128; SU(N): (B, d, L..., N, N) complex128;
            scalar background (U = 1): (1, d, L...) complex128 (the same for every configuration).
        """
        lattice, _ = self.geometry(x)
        ph = self.phases(lattice, x.device)
        if self.background == "scalar":
            return ph.to(torch.complex128).unsqueeze(0)
        if x.is_complex():
            return x.to(torch.complex128) * ph[(None, ..., None, None)]
        return ph.to(torch.complex128).unsqueeze(0) * torch.polar(
            torch.ones_like(x, dtype=torch.float64), x.to(torch.float64)
        )

    def diagonal(self, x: torch.Tensor) -> torch.Tensor:
        """The site masses M_x: (B, L...) float64 (``mass`` + g phi, or ``mass`` everywhere).

        Raises:
            ShapeError: as :meth:`geometry`.
        """
        lattice, _ = self.geometry(x)
        if self.background == "scalar":
            return self.mass + self.g * x.to(torch.float64)
        return torch.full((x.shape[0], *lattice), self.mass, dtype=torch.float64, device=x.device)

    def free_background(self, x: torch.Tensor) -> torch.Tensor:
        """The free background of x's layout: phi = 0 (scalar), zero angles or unit matrices (links)."""
        self.geometry(x)
        if self._colour(x):
            eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
            return eye.expand_as(x).clone()
        return torch.zeros_like(x)

    def free_logdet(self, x: torch.Tensor) -> float:
        """log det D on the free background of x's lattice (:func:`free_staggered_logdet`)."""
        lattice, n = self.geometry(x)
        return free_staggered_logdet(lattice, self.mass, ncolor=n, antiperiodic=self.antiperiodic)

    # ------------------------------------------------------------ application

    def bind(self, x: torch.Tensor) -> BoundStaggered:
        """The operator at a fixed background, for repeated application (solvers).

        Raises:
            ShapeError: as :meth:`geometry`.
        """
        return BoundStaggered(self, x)

    def apply(self, x: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        r"""D psi.

        Arguments:
            x: The background (:meth:`geometry`).
            psi: Fermion field (B, [K...,] L...[, N]) complex128.

        Returns:
            Same shape and dtype as ``psi``.

        Raises:
            ShapeError: if the background or psi have the wrong layout or do not fit each other.
        """
        return self.bind(x).apply(psi)

    def apply_dagger(self, x: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        """D^+ psi = (M - K) psi (K anti-Hermitian); arguments and returns as :meth:`apply`."""
        return self.bind(x).apply_dagger(psi)

    def apply_normal(self, x: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        """D^+ D psi (Hermitian, positive definite for a non-singular D); as :meth:`apply`."""
        return self.bind(x).apply_normal(psi)

    # ------------------------------------------------------------- dense, exact

    def dense(self, x: torch.Tensor, *, by: str = "columns") -> torch.Tensor:
        r"""The matrix of D (small lattices).

        Arguments:
            x: The background (:meth:`geometry`).
            by: ``"columns"``: D applied to every unit vector (the definition); ``"blocks"``:
                assembled from the hopping factors (the same matrix, faster; tests compare them).

        Returns:
            (B, n, n) complex128, n = V N, rows and columns ordered as the flattened (L...[, N]) axes.

        Raises:
            ShapeError: as :meth:`geometry`; ConfigError for another ``by``.
        """
        shape = self.spinor_shape(x)
        bsz, n = shape[0], math.prod(shape[1:])
        if by == "columns":
            return dense_from_columns(functools.partial(self.apply, x), shape, x.device)
        if by != "blocks":
            raise ConfigError(f"dense: by must be 'columns' or 'blocks'; found {by!r}")
        lattice, ncol = self.geometry(x)
        d, volume = len(lattice), math.prod(lattice)
        hop = self.hopping_links(x).expand(bsz, *self.hopping_links(x).shape[1:])
        hop = hop.reshape(bsz, d, volume, ncol, ncol)
        blocks = torch.zeros(volume, volume, bsz, ncol, ncol, dtype=torch.complex128, device=x.device)
        here, neighbours = forward_neighbours(lattice, x.device)
        for mu, there in enumerate(neighbours):
            h = hop[:, mu].transpose(0, 1)  # (V, B, N, N)
            blocks.index_put_((here, there), h, accumulate=True)  # (x, x + mu): + H
            blocks.index_put_((there, here), -h.mH, accumulate=True)  # (x + mu, x): - H^+
        mat = blocks.permute(2, 0, 3, 1, 4).reshape(bsz, n, n)
        diag = self.diagonal(x).reshape(bsz, volume, 1).expand(bsz, volume, ncol).reshape(bsz, n)
        return mat + torch.diag_embed(diag.to(torch.complex128))

    def logdet(self, x: torch.Tensor) -> torch.Tensor:
        r"""log det D, exactly, from the dense matrix (``torch.linalg.slogdet``).

        Arguments:
            x: The background (:meth:`geometry`).

        Returns:
            (B,) complex128: log|det D| + i arg det D. det D is real (even extents), so the
            imaginary part is 0 or pi up to rounding; log det(D^+ D) = 2 Re logdet.

        Raises:
            ShapeError: as :meth:`geometry`.
        """
        return complex_logdet(self.dense(x, by="blocks"))

    # ------------------------------------------------------------------ solvers
    # solve_normal and solve: :class:`flowplug.plugins.dirac.NormalEquationsCG`.

    # ----------------------------------------------------------------- forces

    def derivative(self, x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        r"""Derivative of the bilinear form left^+ D right with respect to the background.

        With H = H_mu(x) (:meth:`hopping_links`), the terms of D holding U_mu(x) give
        left(x)^+ H right(x+mu) - left(x+mu)^+ H^+ right(x). So:

        * U(1): G_mu(x) = d/d theta_mu(x) [left^+ D right]
          = i [ H conj(left(x)) right(x+mu) + conj(H) conj(left(x+mu)) right(x) ];
        * SU(N): the N x N matrix M_mu(x) = H right(x+mu) left(x)^+ + right(x) left(x+mu)^+ H^+,
          with d/ds [left^+ D[exp(s X) U] right] at s = 0 equal to tr(X M) for every X in su(N);
        * scalar: G(x) = d/d phi_x [left^+ D right] = g sum_colour conj(left(x)) right(x).

        Extra axes of ``left``/``right`` are summed over. d Re(left^+ D right) = Re G.

        Arguments:
            x: The background (:meth:`geometry`).
            left, right: Fermion fields of one shape (B, [K...,] L...[, N]), complex128.

        Returns:
            U(1): (B, d, L...) complex128; SU(N): (B, d, L..., N, N) complex128;
            scalar: (B, L...) complex128.

        Raises:
            ShapeError: on a layout mismatch.

        References:
            Gattringer & Lang (2010), section 8.2 (fermion forces); docs/fermions.md.
        """
        lattice, _ = self.geometry(x)
        extra = self._extra(x, left)
        if left.shape != right.shape:
            raise ShapeError(f"derivative: left {tuple(left.shape)} and right {tuple(right.shape)} differ")
        sum_axes = tuple(range(1, 1 + extra))
        if self.background == "scalar":
            g = self.g * (left.conj() * right)
            return g.sum(dim=sum_axes) if extra else g
        d = len(lattice)
        colour = self._colour(x)
        inner = 1 if colour else 0
        axes = [left.dim() - inner - d + mu for mu in range(d)]
        hop = self.hopping_links(x)
        bshape = (int(x.shape[0]),) + (1,) * extra
        out = []
        for mu in range(d):
            r_f = torch.roll(right, -1, axes[mu])
            l_f = torch.roll(left, -1, axes[mu])
            h = hop[:, mu].reshape(*bshape, *hop.shape[2:])
            if colour:
                a = h @ torch.einsum("...j,...i->...ji", r_f, left.conj())
                b = torch.einsum("...j,...i->...ji", right, l_f.conj()) @ h.mH
                m = a + b
            else:
                m = 1j * (h * left.conj() * r_f + h.conj() * l_f.conj() * right)
            out.append(m.sum(dim=sum_axes) if extra else m)
        return torch.stack(out, dim=1)

    def trace_derivative(self, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
        r"""Derivative of tr(M D) with respect to the background, for a dense M (the exact force).

        With M = D^{-1} this is d log det D = tr(D^{-1} dD). Equal to :meth:`derivative`
        summed over left = M^+ e_k, right = e_k, but reads only the blocks D couples:
        U(1): G_mu(x) = i [ H M(x+mu, x) + conj(H) M(x, x+mu) ];
        SU(N): M_mu(x) = H A + B H^+, A_{ji} = M(x+mu, j; x, i), B_{ji} = M(x, j; x+mu, i);
        scalar: G(x) = g sum_colour M(x, x).

        Arguments:
            x: The background (:meth:`geometry`).
            matrix: M, (B, n, n) complex128, indexed as :meth:`dense`.

        Returns:
            As :meth:`derivative`.

        Raises:
            ShapeError: if M is not (B, n, n).
        """
        lattice, ncol = self.geometry(x)
        bsz, volume = int(x.shape[0]), math.prod(lattice)
        n = volume * ncol
        if tuple(matrix.shape) != (bsz, n, n):
            raise ShapeError(f"trace_derivative: expected a matrix of shape {(bsz, n, n)}; found {tuple(matrix.shape)}")
        if self.background == "scalar":
            return (self.g * matrix.diagonal(dim1=-2, dim2=-1)).reshape(bsz, *lattice)
        d = len(lattice)
        blocks = matrix.reshape(bsz, volume, ncol, volume, ncol).permute(0, 1, 3, 2, 4)  # (B, V, V, N, N)
        hop = self.hopping_links(x).reshape(bsz, d, volume, ncol, ncol)
        here, neighbours = forward_neighbours(lattice, matrix.device)
        out = []
        for mu, there in enumerate(neighbours):
            a = blocks[:, there, here]  # M(x + mu, x)
            b = blocks[:, here, there]  # M(x, x + mu)
            h = hop[:, mu]
            if self._colour(x):
                out.append((h @ a + b @ h.mH).reshape(bsz, *lattice, ncol, ncol))
            else:
                g = 1j * (h[..., 0, 0] * a[..., 0, 0] + h[..., 0, 0].conj() * b[..., 0, 0])
                out.append(g.reshape(bsz, *lattice))
        return torch.stack(out, dim=1)


class BoundStaggered:
    r"""A :class:`StaggeredDiracOperator` at a fixed background: D psi, D^+ psi, D^+ D psi.

    The hopping factors and site masses are prepared once; K psi = sum_mu [H_mu(x) psi(x+mu) -
    H_mu(x-mu)^+ psi(x-mu)], D psi = M psi + K psi and D^+ psi = M psi - K psi.

    Arguments:
        operator: The operator.
        x: The background (:meth:`StaggeredDiracOperator.geometry`).

    Raises:
        ShapeError: as :meth:`StaggeredDiracOperator.geometry`.
    """

    def __init__(self, operator: StaggeredDiracOperator, x: torch.Tensor) -> None:
        lattice, _ = operator.geometry(x)
        self.operator = operator
        self.x = x
        self.d = len(lattice)
        self.colour = operator._colour(x)
        hop = operator.hopping_links(x)
        if self.colour:
            self.fwd = [hop[:, mu].contiguous() for mu in range(self.d)]  # H
            self.bwd = [hop[:, mu].mH.contiguous() for mu in range(self.d)]  # H^+
        else:
            self.fwd = [hop[:, mu].contiguous() for mu in range(self.d)]
            self.bwd = [hop[:, mu].conj().contiguous() for mu in range(self.d)]
        self.mass = operator.diagonal(x)  # (B, L...)

    def _expand(self, t: torch.Tensor, extra: int) -> torch.Tensor:
        return t.reshape(t.shape[0], *([1] * extra), *t.shape[1:]) if extra else t

    def _parts(self, psi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        extra = self.operator._extra(self.x, psi)
        inner = 1 if self.colour else 0
        axes = [psi.dim() - inner - self.d + mu for mu in range(self.d)]
        hop = torch.zeros_like(psi)
        for mu in range(self.d):
            hf, hb = self._expand(self.fwd[mu], extra), self._expand(self.bwd[mu], extra)
            if self.colour:
                fwd = (hf @ torch.roll(psi, -1, axes[mu]).unsqueeze(-1)).squeeze(-1)
                hop = hop + fwd - torch.roll((hb @ psi.unsqueeze(-1)).squeeze(-1), 1, axes[mu])
            else:
                hop = hop + hf * torch.roll(psi, -1, axes[mu]) - torch.roll(hb * psi, 1, axes[mu])
        m = self._expand(self.mass, extra)
        if self.colour:
            m = m.unsqueeze(-1)
        return m * psi, hop

    def apply(self, psi: torch.Tensor) -> torch.Tensor:
        """D psi, psi of shape (B, [K...,] L...[, N]) complex128; ShapeError if it does not fit."""
        diag, hop = self._parts(psi)
        return diag + hop

    def apply_dagger(self, psi: torch.Tensor) -> torch.Tensor:
        """D^+ psi = M psi - K psi, as :meth:`apply`."""
        diag, hop = self._parts(psi)
        return diag - hop

    def apply_normal(self, psi: torch.Tensor) -> torch.Tensor:
        """D^+ D psi, as :meth:`apply`."""
        return self.apply_dagger(self.apply(psi))


def _momenta(lattice: tuple[int, ...], antiperiodic: bool) -> list[torch.Tensor]:
    d = len(lattice)
    grids = []
    for mu, n in enumerate(lattice):
        k = torch.arange(n, dtype=torch.float64)
        shift = 0.5 if (antiperiodic and mu == d - 1) else 0.0
        grids.append(2 * math.pi * (k + shift) / n)
    return list(torch.meshgrid(*grids, indexing="ij"))


def free_staggered_logdet(
    lattice: tuple[int, ...], mass: float, *, ncolor: int = 1, antiperiodic: bool = True
) -> float:
    r"""log det D of the free staggered operator (unit links / phi = 0) from momentum space.

    The staggered operator is the spin-diagonalised naive operator, whose momentum-space
    form m + i sum_mu gamma_mu sin p_mu has det (m^2 + sum_mu sin^2 p_mu)^{s/2} per momentum
    for s spin components; the naive determinant is the s-th power of the staggered one, so

        log det D = (N / 2) sum_p log(m^2 + sum_mu sin^2 p_mu),

    over the L_0 ... L_{d-1} momenta p_mu = 2 pi n_mu / L_mu, with p_{d-1} = (2 n + 1) pi / L_{d-1}
    for antiperiodic time.

    Arguments:
        lattice: Extents (L_0, ..., L_{d-1}), all even.
        mass: Bare mass m (uniform).
        ncolor: N (1 for U(1) or the scalar background).
        antiperiodic: As for :class:`StaggeredDiracOperator`.

    Returns:
        log det D (float; -inf where a zero mode is hit, m = 0 with periodic time).

    Raises:
        ShapeError: for an odd extent.

    References:
        Gattringer & Lang (2010), section 5.2.3 (staggered fermions from naive fermions).
    """
    if any(int(v) % 2 for v in lattice):
        raise ShapeError(f"staggered fermions need even extents in every direction; found lattice {tuple(lattice)}")
    ps = _momenta(tuple(lattice), antiperiodic)
    s2 = torch.stack([torch.sin(p) ** 2 for p in ps]).sum(0)
    return float(ncolor * 0.5 * torch.log(mass * mass + s2).sum())


def free_staggered_condensate(lattice: tuple[int, ...], mass: float, *, antiperiodic: bool = True) -> float:
    r"""(1/V) Re tr D^{-1} of the free staggered operator per colour, from momentum space.

    tr D^{-1} = sum_p m / (m^2 + sum_mu sin^2 p_mu) (the naive trace divided by s), so the
    free condensate is (1/V) sum_p m / (m^2 + sum sin^2 p) (0 at m = 0 with antiperiodic time).

    Arguments:
        lattice, mass, antiperiodic: As for :func:`free_staggered_logdet`.

    Returns:
        float.

    Raises:
        ShapeError: for an odd extent.

    References:
        Gattringer & Lang (2010), section 5.2.3 and chapter 7 (chiral condensate).
    """
    if any(int(v) % 2 for v in lattice):
        raise ShapeError(f"staggered fermions need even extents in every direction; found lattice {tuple(lattice)}")
    ps = _momenta(tuple(lattice), antiperiodic)
    s2 = torch.stack([torch.sin(p) ** 2 for p in ps]).sum(0)
    return float((mass / (mass * mass + s2)).mean())


def _staggered_links(mass: float = 0.0, *, antiperiodic: bool = True) -> StaggeredDiracOperator:
    """Factory of ``staggered``: the operator on gauge links."""
    return StaggeredDiracOperator(mass, background="links", antiperiodic=antiperiodic)


def _staggered_yukawa(mass: float = 0.0, g: float = 1.0, *, antiperiodic: bool = True) -> StaggeredDiracOperator:
    """Factory of ``staggered-yukawa``: the operator on a real scalar field, site mass mass + g phi."""
    return StaggeredDiracOperator(mass, g=g, background="scalar", antiperiodic=antiperiodic)


@hookimpl
def flowplug_dirac_operators() -> list[DiracOperatorSpec]:
    """The staggered operators: ``staggered`` (gauge links) and ``staggered-yukawa`` (scalar field)."""
    return [
        DiracOperatorSpec(
            name="staggered",
            description="staggered fermions D = m + (1/2) sum eta [U - U^+], U(1)/SU(N) links, antiperiodic in time",
            factory=_staggered_links,
            fields=("u1", "su2", "su3"),
            parameters=("mass", "antiperiodic"),
        ),
        DiracOperatorSpec(
            name="staggered-yukawa",
            description="staggered fermions with the site mass m + g phi of a real scalar (free hopping)",
            factory=_staggered_yukawa,
            fields=("scalar",),
            parameters=("mass", "g", "antiperiodic"),
        ),
    ]
