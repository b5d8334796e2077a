r"""Built-in observables (hook ``flowplug_observables``).

Each observable maps a batch of configurations in canonical layout (DESIGN.md section 2)
to one float64 number per configuration, shape (B,). Ensemble averages and errors are
taken afterwards (:mod:`flowplug.stats`).

Gauge fields: ``plaquette``, ``link_trace``, ``topological_charge`` (2D U(1) geometric;
4D SU(N) clover). Scalar fields: ``magnetization``, ``abs_magnetization``, ``two_point``,
``chi_2``, ``ising_energy``.

Scalar-field observables are per-configuration estimators without subtraction of
<phi>: on a finite periodic lattice the phi^4 action is Z2 symmetric, so <phi> = 0 and
the connected and full two-point functions coincide in expectation (the convention of
arXiv:2101.08176's tutorial: chi_2 = sum_x G_c(x) = <M^2>/V, E_Ising = (1/d) sum_mu G_c(mu)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch

from flowplug import gauge, groups
from flowplug.errors import ShapeError
from flowplug.hookspecs import hookimpl
from flowplug.records import ObservableSpec

#: Field kinds of the gauge observables: ``u1`` and the ``su`` family (named by its members
#: su2, su3, so that a check ``field in spec.fields`` keeps working; :func:`measurement`
#: accepts every su<N>).
GAUGE_FIELDS = ("u1", "su2", "su3")


def _scalar(phi: torch.Tensor) -> int:
    if phi.dim() < 2 or phi.is_complex():
        raise ShapeError(
            f"scalar observables need a real field of shape (B, L_0, ..., L_(d-1)); "
            f"found {phi.dtype} {tuple(phi.shape)}"
        )
    return phi.dim() - 1


def plaquette(links: torch.Tensor) -> torch.Tensor:
    """Mean plaquette, mean of Re tr U_P / N over sites and planes (1.0 for unit links).

    Arguments:
        links: U(1) angles (B, d, L...) float64 or SU(N) links (B, d, L..., N, N) complex128.

    Returns:
        (B,) float64.

    Raises:
        ShapeError: on a malformed tensor.

    References:
        Wilson, Phys. Rev. D 10 (1974) 2445.
    """
    return gauge.plaquette(links)


def link_trace(links: torch.Tensor) -> torch.Tensor:
    """Mean Re tr U / N over all links (cos theta for U(1)); gauge variant, a file check value.

    Arguments:
        links: As for :func:`plaquette`.

    Returns:
        (B,) float64.
    """
    return gauge.link_trace(links)


def _shift(u: torch.Tensor, mu: int, k: int) -> torch.Tensor:
    """u(x + k mu) for a field (B, L..., [N, N]) whose lattice axes start at 1."""
    return torch.roll(u, -k, dims=1 + mu)


def clover_field_strength(links: torch.Tensor, mu: int, nu: int) -> torch.Tensor:
    r"""Clover field strength F_{mu nu}(x) (Hermitian, traceless) of SU(N) links.

    F = (1 / 8i) [(C - C^+) - tr(C - C^+) / N], C the sum of the four plaquette leaves
    in the (mu, nu) plane based at x (counter-clockwise).

    Arguments:
        links: (B, d, L..., N, N) complex.
        mu, nu: Directions, mu != nu.

    Returns:
        (B, L..., N, N) complex.

    References:
        Sheikholeslami & Wohlert, Nucl. Phys. B 259 (1985) 572 (clover leaves);
        Di Vecchia et al., Nucl. Phys. B 192 (1981) 392 (field-theoretic charge).
    """
    um, un = links[:, mu], links[:, nu]
    s = _shift
    leaf1 = um @ s(un, mu, 1) @ s(um, nu, 1).mH @ un.mH
    leaf2 = un @ s(s(um, mu, -1), nu, 1).mH @ s(un, mu, -1).mH @ s(um, mu, -1)
    leaf3 = s(um, mu, -1).mH @ s(s(un, mu, -1), nu, -1).mH @ s(s(um, mu, -1), nu, -1) @ s(un, nu, -1)
    leaf4 = s(un, nu, -1).mH @ s(um, nu, -1) @ s(s(un, mu, 1), nu, -1) @ um.mH
    c = leaf1 + leaf2 + leaf3 + leaf4
    a = c - c.mH
    n = links.shape[-1]
    tr = torch.diagonal(a, dim1=-2, dim2=-1).sum(-1) / n
    a = a - tr[..., None, None] * torch.eye(n, dtype=a.dtype, device=a.device)
    return a / 8j


def topological_charge(links: torch.Tensor) -> torch.Tensor:
    r"""Topological charge Q per configuration.

    * 2D U(1) (angles (B, 2, L0, L1)): geometric definition Q = (1/2pi) sum_x arg U_P(x),
      arg in (-pi, pi]; an integer on the torus.
    * 4D SU(N) (links (B, 4, L..., N, N)): clover definition
      Q = sum_x (1/32pi^2) eps_{mu nu rho sigma} tr F_{mu nu} F_{rho sigma}
        = (1/4pi^2) sum_x [tr F01 F23 - tr F02 F13 + tr F03 F12]
      with F the clover field strength (:func:`clover_field_strength`); not an integer
      on rough configurations (no smoothing is applied).

    Returns:
        (B,) float64.

    Raises:
        ShapeError: for other groups or dimensions.

    References:
        2D: Bonati & Rossi, PRD 99 (2019) 054503; 4D: Di Vecchia, Fabricius, Rossi,
        Veneziano, Nucl. Phys. B 192 (1981) 392.
    """
    if not links.is_complex():
        if links.dim() != 4 or links.shape[1] != 2:
            raise ShapeError(
                f"topological_charge of U(1) links is defined in 2D, shape (B, 2, L0, L1); found {tuple(links.shape)}"
            )
        p = gauge.u1_plaquettes(links)
        return (groups.wrap_angle(p).flatten(1).sum(1) / (2 * math.pi)).to(torch.float64)
    if links.dim() != 8 or links.shape[1] != 4:
        raise ShapeError(
            f"topological_charge of SU(N) links is defined in 4D, shape (B, 4, L0..L3, N, N); "
            f"found {tuple(links.shape)}"
        )
    f = {(m, n): clover_field_strength(links, m, n) for m, n in ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))}

    def trprod(a, b):
        return torch.einsum("b...ij,b...ji->b", f[a], f[b]).real

    q = trprod((0, 1), (2, 3)) - trprod((0, 2), (1, 3)) + trprod((0, 3), (1, 2))
    return (q / (4 * math.pi**2)).to(torch.float64)


def magnetization(phi: torch.Tensor) -> torch.Tensor:
    """M / V = (1/V) sum_x phi_x per configuration, (B,) float64.

    Raises:
        ShapeError: if phi is not a real (B, L...) tensor.
    """
    _scalar(phi)
    return phi.flatten(1).mean(1).to(torch.float64)


def abs_magnetization(phi: torch.Tensor) -> torch.Tensor:
    """|M| / V per configuration, (B,) float64."""
    return magnetization(phi).abs()


def two_point(phi: torch.Tensor, shift: Sequence[int] | None = None) -> torch.Tensor:
    r"""(1/V) sum_x phi_x phi_{x+shift}, the two-point function at separation ``shift``.

    Arguments:
        phi: (B, L_0, ..., L_{d-1}) float64.
        shift: Separation, one integer per direction (x first); default (1, 0, ..., 0).

    Returns:
        (B,) float64.

    Raises:
        ShapeError: if phi is not real or shift has the wrong length.
    """
    d = _scalar(phi)
    if shift is None:
        shift = (1,) + (0,) * (d - 1)
    shift = tuple(int(s) for s in shift)
    if len(shift) != d:
        raise ShapeError(f"two_point: shift {shift} has {len(shift)} components; the lattice has d = {d}")
    moved = torch.roll(phi, [-s for s in shift], dims=list(range(1, d + 1)))
    return (phi * moved).flatten(1).mean(1).to(torch.float64)


def chi_2(phi: torch.Tensor) -> torch.Tensor:
    r"""Two-point susceptibility estimator M^2 / V = sum_x (1/V) sum_y phi_y phi_{y+x}, (B,) float64.

    References:
        Albergo et al., arXiv:2101.08176, section III.E (chi_2 = sum_x G_c(x)).
    """
    _scalar(phi)
    v = math.prod(phi.shape[1:])
    return (phi.flatten(1).sum(1) ** 2 / v).to(torch.float64)


def ising_energy(phi: torch.Tensor) -> torch.Tensor:
    r"""Ising-like energy estimator (1/d) sum_mu (1/V) sum_x phi_x phi_{x+mu}, (B,) float64.

    References:
        Albergo et al., arXiv:2101.08176, section III.E (E = (1/d) sum_mu G_c(mu)).
    """
    d = _scalar(phi)
    total = sum(two_point(phi, tuple(int(m == mu) for m in range(d))) for mu in range(d))
    return cast(torch.Tensor, total) / d  # d >= 1 terms: a tensor, never sum()'s start 0


@hookimpl
def flowplug_observables() -> list[ObservableSpec]:
    """The built-in observables."""
    return [
        ObservableSpec(
            name="plaquette",
            description="mean Re tr U_P / N (1 for unit links)",
            factory=plaquette,
            fields=GAUGE_FIELDS,
        ),
        ObservableSpec(
            name="link_trace", description="mean Re tr U / N (gauge variant)", factory=link_trace, fields=GAUGE_FIELDS
        ),
        ObservableSpec(
            name="topological_charge",
            description="Q: 2D U(1) geometric, 4D SU(N) clover",
            factory=topological_charge,
            fields=GAUGE_FIELDS,
        ),
        ObservableSpec(name="magnetization", description="sum_x phi_x / V", factory=magnetization, fields=("scalar",)),
        ObservableSpec(
            name="abs_magnetization", description="|sum_x phi_x| / V", factory=abs_magnetization, fields=("scalar",)
        ),
        ObservableSpec(
            name="two_point", description="(1/V) sum_x phi_x phi_(x+shift)", factory=two_point, fields=("scalar",)
        ),
        ObservableSpec(name="chi_2", description="two-point susceptibility M^2 / V", factory=chi_2, fields=("scalar",)),
        ObservableSpec(
            name="ising_energy",
            description="(1/d) sum_mu (1/V) sum_x phi_x phi_(x+mu)",
            factory=ising_energy,
            fields=("scalar",),
        ),
    ]
