r"""Built-in lattice actions (hook ``flowplug_actions``): ``phi4`` and ``wilson``.

Both work in any dimension d, on batches (batch axis first), in float64/complex128 on
whatever device the input is on, and have analytic forces in the conventions of
:mod:`flowplug.theory` (tests compare them with automatic differentiation).
"""

from __future__ import annotations

import math
from typing import cast

import torch

from flowplug import gauge, groups
from flowplug.errors import ConfigError, ShapeError, UnknownComponentError
from flowplug.hookspecs import hookimpl
from flowplug.records import ActionSpec
from flowplug.theory import Action, AngleSpace, SUNSpace, field_space


class Phi4Action(Action):
    r"""Real scalar phi^4 theory in any dimension, tutorial convention.

    S[phi] = sum_x [ -2 sum_mu phi_x phi_{x+mu} + (2d + m2) phi_x^2 + lam phi_x^4 ],
    periodic boundaries, lattice units. The kinetic term equals sum_x phi_x (-Laplacian
    phi)_x, so m2 is the bare mass squared; m2 = -4, lam = 8 on 8x8 is the tutorial point.

    Arguments:
        m2: Bare mass squared (float).
        lam: Quartic coupling (float, >= 0 for a bounded action).

    Field: ``scalar``, shape (B, L_0, ..., L_{d-1}), float64.

    Raises:
        ConfigError: if ``lam`` < 0.

    References:
        Albergo, Kanwar, Shanahan, arXiv:1904.12072, eq. (6);
        Albergo et al., arXiv:2101.08176, section III (same convention).
    """

    field = "scalar"
    parameters = ("m2", "lam")

    def __init__(self, m2: float = -4.0, lam: float = 8.0) -> None:
        self.m2 = float(m2)
        self.lam = float(lam)
        if self.lam < 0:
            raise ConfigError(f"phi4: lam must be >= 0 for a bounded action; found {self.lam}")

    #: Width of the Gaussian "hot" start: wide enough to be disordered, narrow enough that
    #: the first trajectories at the usual step sizes do not blow up through the phi^4 force.
    hot_width = 0.2

    def hot_start(self, lattice, batch=1, *, generator=None, device=None) -> torch.Tensor:
        """``batch`` fields with independent N(0, hot_width^2) entries, shape (batch, L...)."""
        return self.hot_width * super().hot_start(lattice, batch, generator=generator, device=device)

    def action(self, phi: torch.Tensor) -> torch.Tensor:
        """S[phi], shape (B,), float64.

        Raises:
            ShapeError: if ``phi`` is not a real (B, L...) tensor.
        """
        self.check(phi)
        d = phi.dim() - 1
        hop = sum(phi * torch.roll(phi, -1, dims=1 + mu) for mu in range(d))
        phi2 = phi * phi
        dens = -2.0 * hop + (2 * d + self.m2) * phi2 + self.lam * phi2 * phi2
        return dens.flatten(1).sum(1).to(torch.float64)

    def force(self, phi: torch.Tensor) -> torch.Tensor:
        """F_x = -dS/dphi_x = 2 sum_mu (phi_{x+mu} + phi_{x-mu}) - 2(2d + m2) phi_x - 4 lam phi_x^3.

        Returns:
            Same shape and dtype as ``phi``.
        """
        self.check(phi)
        d = phi.dim() - 1
        nb = sum(torch.roll(phi, -1, dims=1 + mu) + torch.roll(phi, 1, dims=1 + mu) for mu in range(d))
        return 2.0 * nb - 2.0 * (2 * d + self.m2) * phi - 4.0 * self.lam * phi**3


class WilsonGaugeAction(Action):
    r"""Wilson plaquette gauge action for U(1) or SU(N) in any dimension d >= 2.

    U(1):  S = -beta sum_x sum_{mu<nu} cos theta_{mu nu}(x);
    SU(N): S = -(beta/N) sum_x sum_{mu<nu} Re tr U_{mu nu}(x),
    with U_{mu nu}(x) = U_mu(x) U_nu(x+mu) U_mu(x+nu)^+ U_nu(x)^+ (periodic boundaries).
    The constant that makes S = 0 for the unit gauge is not included.

    Arguments:
        beta: Inverse coupling (float).
        group: ``"u1"``, ``"su2"``, ``"su3"`` (or ``"su<N>"``).

    Fields: ``u1`` angles (B, d, L...), float64; ``su<N>`` links (B, d, L..., N, N),
    complex128.

    Raises:
        ConfigError: for an unknown group.

    References:
        Wilson, Phys. Rev. D 10 (1974) 2445; normalisation of DESIGN.md section 3.
    """

    parameters = ("beta", "group")

    def __init__(self, beta: float = 1.0, group: str = "su3") -> None:
        self.beta = float(beta)
        g = str(group).strip().lower()
        unknown = ConfigError(f"wilson: unknown group {group!r}; expected u1, su2, su3 (or su<N>)")
        try:
            space = field_space(g)  # also validates N >= 2
        except UnknownComponentError:
            raise unknown from None
        if isinstance(space, SUNSpace):
            self.n = space.n
        elif isinstance(space, AngleSpace) and space.gauge:
            self.n = 1  # U(1) link angles
        else:
            raise unknown
        self.group = g
        self.field = g

    # ---------------------------------------------------------------- U(1)

    def _u1_plaquette_angles(self, theta: torch.Tensor) -> list[tuple[int, int, torch.Tensor]]:
        d = theta.shape[1]
        out = []
        for mu in range(d):
            for nu in range(mu + 1, d):
                t_mu, t_nu = theta[:, mu], theta[:, nu]
                out.append(
                    (mu, nu, t_mu + torch.roll(t_nu, -1, dims=1 + mu) - torch.roll(t_mu, -1, dims=1 + nu) - t_nu)
                )
        return out

    # ---------------------------------------------------------------- SU(N)

    def staples(self, u: torch.Tensor) -> torch.Tensor:
        r"""Sum of staples V_mu(x), so that the action is -(beta/N) Re tr(U_mu(x) V_mu(x)) / 2 summed.

        V_mu(x) = sum_{nu != mu} [ U_nu(x+mu) U_mu(x+nu)^+ U_nu(x)^+
                                   + U_nu(x+mu-nu)^+ U_mu(x-nu)^+ U_nu(x-nu) ];
        Re tr(U_mu(x) V_mu(x)) is the sum of the 2(d-1) plaquettes containing U_mu(x).

        Arguments:
            u: SU(N) links (B, d, L..., N, N), complex.

        Returns:
            Same shape as ``u``.
        """
        if u.device.type == "cuda" and GATHERED_STAPLES:
            return _gathered_staples(u)
        d = u.shape[1]
        mm = groups.small_matmul  # a @ b on the CPU
        us = [u[:, m].contiguous() for m in range(d)]
        uds = [m.mH.resolve_conj().contiguous() for m in us]  # conj-transposed copies: fast products
        out = []
        for mu in range(d):
            v = None
            for nu in range(d):
                if nu == mu:
                    continue
                u_nu_xmu = torch.roll(us[nu], -1, dims=1 + mu)
                ud_nu_xmu = torch.roll(uds[nu], -1, dims=1 + mu)
                upper = mm(mm(u_nu_xmu, torch.roll(uds[mu], -1, dims=1 + nu)), uds[nu])
                lower = mm(mm(ud_nu_xmu, uds[mu]), us[nu])
                term = upper + torch.roll(lower, 1, dims=1 + nu)
                v = term if v is None else v + term
            assert v is not None  # d >= 2: at least one nu != mu
            out.append(v)
        return torch.stack(out, dim=1)

    # ---------------------------------------------------------------- interface

    def action(self, x: torch.Tensor) -> torch.Tensor:
        """S[U], shape (B,), float64. SU(N) links on a CPU go through
        :func:`flowplug.gauge.plaquette_traces` (reverse-mode derivatives of any order; no
        forward-mode AD or ``torch.func`` transforms there).

        Raises:
            ShapeError: if the links do not have the layout of :attr:`group` or d < 2.
        """
        self.check(x)
        d = x.shape[1]
        if d < 2:
            raise ShapeError(f"wilson: plaquettes need d >= 2 directions; found d = {d}")
        if self.n == 1:
            # d >= 2: at least one plane, so the sum is a tensor (never sum()'s start 0)
            total_u1 = cast(
                torch.Tensor, sum(torch.cos(p).flatten(1).sum(1) for _, _, p in self._u1_plaquette_angles(x))
            )
            return (-self.beta * total_u1).to(torch.float64)
        if x.device.type == "cpu":
            # the traces of all plaquettes at once, matrix-axes-first with a hand-written backward
            # (:func:`flowplug.gauge.plaquette_traces`): on a CPU some 40 % less time for the action
            # and its gradient than the loop below (on CUDA the loop's multiply-adds, measured there)
            traces = gauge.plaquette_traces(x).real.flatten(1).sum(1)
            return (-self.beta * traces).to(torch.float64)
        total: torch.Tensor | float = 0.0
        for mu in range(d):
            for nu in range(mu + 1, d):
                u_mu, u_nu = x[:, mu], x[:, nu]
                left = groups.small_matmul(u_mu, torch.roll(u_nu, -1, dims=1 + mu))
                right = groups.small_matmul(u_nu, torch.roll(u_mu, -1, dims=1 + nu))
                # Re tr(A B^+) = sum_ij Re(A_ij conj(B_ij))
                total = total + (left * right.conj()).real.flatten(1).sum(1)
        return (-(self.beta / self.n) * cast(torch.Tensor, total)).to(torch.float64)  # d >= 2: a tensor

    def force(self, x: torch.Tensor) -> torch.Tensor:
        """Analytic force (conventions of :mod:`flowplug.theory`).

        U(1): F_mu(x) = -dS/dtheta_mu(x)
              = -beta sum_{nu != mu} [sin theta_{mu nu}(x) - sin theta_{mu nu}(x - nu)]
        (with theta_{nu mu} = -theta_{mu nu}).
        SU(N): F_mu(x) = -(beta / 2N) Pi(U_mu(x) V_mu(x)), Pi the traceless anti-Hermitian part,
        V the staple sum (:meth:`staples`).

        Returns:
            Same shape and dtype as ``x``.
        """
        self.check(x)
        if self.n == 1:
            f = torch.zeros_like(x)
            for mu, nu, p in self._u1_plaquette_angles(x):
                s = -self.beta * torch.sin(p)
                f[:, mu] += s - torch.roll(s, 1, dims=1 + nu)
                f[:, nu] += torch.roll(s, 1, dims=1 + mu) - s
            return f
        return (-self.beta / (2 * self.n)) * groups.project_algebra(groups.small_matmul(x, self.staples(x)))


#: :meth:`WilsonGaugeAction.staples` on CUDA through :func:`_gathered_staples` (``False``: the
#: loop over planes there too; for side-by-side timings, ``benchmarks/gpu_parts.py``).
GATHERED_STAPLES = True


def _plane_indices(lattice: tuple[int, ...], device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Index tensors of :func:`_gathered_staples` for ``lattice`` on ``device``, made once (no
    host-to-device copy per force): per direction mu, for its d - 1 planes (mu, nu), nu != mu,
    with V sites in row-major order: ``nu`` (d - 1, 1) the directions nu; ``x_mu`` (d - 1, V)
    the site x + mu; ``x_nu`` and ``x_minus_nu`` (d - 1, V) the sites x + nu and x - nu;
    ``rows`` (d - 1, 1) 0..d-2."""
    key = (lattice, str(device))
    cached = _PLANE_INDICES.get(key)
    if cached is None:
        d = len(lattice)
        sites = torch.arange(math.prod(lattice)).view(lattice)
        fwd = torch.stack([torch.roll(sites, -1, dims=m).flatten() for m in range(d)])
        bwd = torch.stack([torch.roll(sites, 1, dims=m).flatten() for m in range(d)])
        cached = []
        for mu in range(d):
            nus = torch.tensor([nu for nu in range(d) if nu != mu])
            host = {
                "nu": nus[:, None],
                "x_mu": fwd[mu].expand(d - 1, -1),
                "x_nu": fwd[nus],
                "x_minus_nu": bwd[nus],
                "rows": torch.arange(d - 1)[:, None],
            }
            cached.append({k: v.to(device) for k, v in host.items()})
        _PLANE_INDICES[key] = cached
    return cached


_PLANE_INDICES: dict[tuple[tuple[int, ...], str], list[dict[str, torch.Tensor]]] = {}


def _gathered_staples(u: torch.Tensor) -> torch.Tensor:
    """:meth:`WilsonGaugeAction.staples` with the d - 1 planes of each direction at once: the
    shifted links of those planes are gathered in one indexing each and the products run on
    the stacks, about a hundred kernel launches in 4D instead of about three hundred (on a GPU
    the loop over planes is bound by launches). Memory: the stacks of one direction at a
    time, each (B, d - 1, V, N, N), three quarters of the gauge field in 4D. The same products
    in the same order per plane; the sum over nu may round differently. Arguments and result
    as :meth:`~WilsonGaugeAction.staples`.
    """
    b, d = u.shape[0], u.shape[1]
    lattice = tuple(u.shape[2:-2])
    n = u.shape[-1]
    v = u.reshape(b, d, -1, n, n)
    mm = groups.small_matmul
    out = []
    for mu, ix in enumerate(_plane_indices(lattice, u.device)):
        u_mu = v[:, mu]
        a = v[:, ix["nu"], ix["x_mu"]]  # U_nu(x + mu), (B, d - 1, V, N, N)
        c = v[:, ix["nu"][:, 0]]  # U_nu(x)
        upper = mm(mm(a, v[:, mu, ix["x_nu"]].mH), c.mH)  # U_nu(x+mu) U_mu(x+nu)^+ U_nu(x)^+
        lower = mm(mm(a.mH, u_mu[:, None].mH), c)  # U_nu(x+mu)^+ U_mu(x)^+ U_nu(x), at x - nu below
        out.append((upper + lower[:, ix["rows"], ix["x_minus_nu"]]).sum(1))
    return torch.stack(out, dim=1).view(u.shape)


@hookimpl
def flowplug_actions() -> list[ActionSpec]:
    """The built-in actions ``phi4`` and ``wilson``."""
    return [
        ActionSpec(
            name="phi4",
            description="real scalar phi^4, any dimension (Albergo et al. convention)",
            factory=Phi4Action,
            fields=("scalar",),
            parameters=("m2", "lam"),
            symmetries=("z2",),  # S[-phi] = S[phi]
        ),
        ActionSpec(
            name="wilson",
            description="Wilson plaquette gauge action, U(1)/SU(N), any dimension",
            factory=WilsonGaugeAction,
            fields=("u1", "su2", "su3"),
            parameters=("beta", "group"),
        ),
    ]
