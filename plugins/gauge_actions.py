r"""Improved gauge actions (hook ``flowplug_actions``): the actions production codes run.

Registered names (``flowplug plugins`` lists them):

``plaquette-rectangle``
    plaquette + 2x1 rectangle with a free rectangle coefficient ``c1`` (c0 = 1 - 8 c1);
``symanzik`` (aliases ``luscher-weisz``, ``tlsym``)
    tree-level Symanzik / Luscher-Weisz, c1 = -1/12;
``iwasaki``
    Iwasaki's renormalisation-group action, c1 = -0.331;
``dbw2``
    DBW2 (doubly blocked Wilson, two steps), c1 = -1.4088;
``milc-symanzik``
    MILC's tadpole-improved one-loop Symanzik action "Symanzik 1x1 + 1x2 + 1x1x1 action"
    (plaquette, rectangle and the 1x1x1 parallelogram), parameters ``beta`` (MILC's
    ``beta11``), ``u0``, and the variants MILC ships (``tree``, ``1loop``, ``asqtad`` and
    ``hisq`` quark-loop corrections with ``nf``).

All of them work for U(1) angles and SU(N) links (any N the ``wilson`` action takes) in
any dimension d >= 2, on batches (batch axis first), float64 / complex128, with analytic
forces in the convention of :mod:`flowplug.theory` (tests compare them with autograd).

Normalisation
-------------
With Re tr L / N read as cos(theta_L) for U(1) (N = 1, theta_L the loop's angle),

    S = beta * sum_x [ c0 sum_{P at x} (1 - Re tr P / N) + c1 sum_{R at x} (1 - Re tr R / N)
                       + c2 sum_{C at x} (1 - Re tr C / N) ] - beta V (c0 n_P + c1 n_R + c2 n_C),

that is S = -(beta / N) sum [c0 Re tr P + c1 Re tr R + c2 Re tr C]: the field-independent
constant (which makes S = 0 for the unit gauge) is dropped exactly as in the ``wilson``
action, so with c1 = c2 = 0 and c0 = 1 these actions *are* ``wilson`` (same S, same force).
Each loop is counted once per geometric loop (orientation and starting point do not
count twice); per site x there are

* n_P = d(d-1)/2 plaquettes P = U_mu(x) U_nu(x+mu) U_mu(x+nu)^+ U_nu(x)^+, mu < nu;
* n_R = d(d-1) rectangles R = U_mu(x) U_mu(x+mu) U_nu(x+2mu) U_mu(x+mu+nu)^+ U_mu(x+nu)^+
  U_nu(x)^+, one for each ordered pair mu != nu (long side along mu): both orientations
  of the 1x2 rectangle in every plane (12 per site in 4D);
* n_C = 4 C(d,3) parallelograms ("1x1x1", MILC's loop XUP YUP ZUP XDOWN YDOWN ZDOWN and
  its rotations and reflections): for mu < nu < rho and s, t = +-1 the path
  +mu, s nu, t rho, -mu, -s nu, -t rho (16 per site in 4D, none for d < 3).

For the plaquette + rectangle family c0 = 1 - 8 c1: the a^2 expansion of every plane's
loops then starts with the continuum F^2 with unit weight (c0 + 8 c1 = 1, in any d), so
beta = 2N / g_0^2 as for Wilson.

References:
    Luscher and Weisz, Commun. Math. Phys. 97 (1985) 59 (tree-level c1 = -1/12; erratum
    98 (1985) 433); Weisz, Nucl. Phys. B 212 (1983) 1;
    Iwasaki, preprint UTHEP-118 (1983), arXiv:1111.7054 (c1 = -0.331);
    Takaishi, Phys. Rev. D 54 (1996) 1050; QCD-TARO, de Forcrand et al.,
    hep-lat/9911033 (DBW2, c1 = -1.4088);
    MILC code, milc-qcd/milc_qcd ``generic/imp_actions/symanzik_1loop_action.h`` (loop
    coefficients), ``generic/gauge_stuff.c`` (loop table, action = (beta/3) sum
    coeff (3 - Re tr L)); Alford, Dimm, Lepage, Hockney, Mackenzie, hep-lat/9507010 and
    Lepage, hep-lat/9607076 (the one-loop tadpole-improved coefficients);
    Hao, von Hippel, Horgan, Mason, Trottier, arXiv:0705.4660 (quark-loop corrections).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch

from flowplug import groups
from flowplug.errors import ConfigError, ShapeError, UnknownComponentError
from flowplug.hookspecs import hookimpl
from flowplug.records import ActionSpec
from flowplug.theory import Action, AngleSpace, SUNSpace, field_space

#: A closed lattice path: steps (direction mu, +1 or -1) from the base site x.
Path = tuple[tuple[int, int], ...]

#: Rectangle coefficients c1 of the named plaquette + rectangle actions (c0 = 1 - 8 c1).
C1_SYMANZIK = -1.0 / 12.0
C1_IWASAKI = -0.331
C1_DBW2 = -1.4088

#: MILC's loop coefficients per variant (the numbers of MILC's generic/imp_actions/*.h):
#: c_rect = -(1 - (rect_log - rect_log_nf nf) ln u0) / (20 u0^2),
#: c_pg = (pg_log - pg_log_nf nf) ln u0 / u0^2 (:func:`milc_coefficients`).
MILC_VARIANTS: dict[str, dict[str, float]] = {
    # "Symanzik 1x1 + 1x2 action" (symanzik_tree_action.h): tadpole-improved tree level
    "tree": {"rect_log": 0.0, "rect_log_nf": 0.0, "pg_log": 0.0, "pg_log_nf": 0.0},
    # "Symanzik 1x1 + 1x2 + 1x1x1 action" (symanzik_1loop_action.h): quenched one loop
    "1loop": {"rect_log": 0.6264, "rect_log_nf": 0.0, "pg_log": 0.04335, "pg_log_nf": 0.0},
    # "... action with quark loops" (symanzik_1loop_nf_action.h): asqtad sea quarks
    "asqtad": {"rect_log": 0.6264, "rect_log_nf": 0.4742, "pg_log": 0.0433, "pg_log_nf": 0.012},
    # "... action with HISQ quark loops" (symanzik_1loop_hisq_action.h)
    "hisq": {"rect_log": 0.6264, "rect_log_nf": 1.1746, "pg_log": 0.0433, "pg_log_nf": 0.0156},
}


# ---------------------------------------------------------------------------- loops


def plaquette_paths(d: int) -> list[Path]:
    """The d(d-1)/2 plaquettes at a site: +mu, +nu, -mu, -nu for mu < nu.

    Arguments:
        d: Lattice dimension.

    Returns:
        List of paths, each a tuple of steps (direction, +1 or -1) from the base site.
    """
    return [((mu, 1), (nu, 1), (mu, -1), (nu, -1)) for mu in range(d) for nu in range(mu + 1, d)]


def rectangle_paths(d: int) -> list[Path]:
    """The d(d-1) 2x1 rectangles at a site: +mu, +mu, +nu, -mu, -mu, -nu for every mu != nu.

    Both 1x2 rectangles of every plane (long side along mu, then along nu), each geometric
    rectangle once when summed over sites (12 per site in 4D).

    Arguments:
        d: Lattice dimension.

    Returns:
        List of paths, each a tuple of steps (direction, +1 or -1) from the base site.
    """
    return [((mu, 1), (mu, 1), (nu, 1), (mu, -1), (mu, -1), (nu, -1)) for mu in range(d) for nu in range(d) if nu != mu]


def parallelogram_paths(d: int) -> list[Path]:
    """The 4 C(d,3) 1x1x1 parallelograms at a site: +mu, s nu, t rho, -mu, -s nu, -t rho.

    mu < nu < rho, s, t = +-1: each of the four skew hexagons of the unit cube (one per body
    diagonal) once, so every geometric loop of this shape is counted exactly once when
    summed over sites (MILC's ``make_loop_table`` counts the same 16 per site in 4D).

    Arguments:
        d: Lattice dimension (no parallelograms for d < 3: an empty list).

    Returns:
        List of paths, each a tuple of steps (direction, +1 or -1) from the base site.
    """
    out: list[Path] = []
    for mu, nu, rho in itertools.combinations(range(d), 3):
        for s, t in itertools.product((1, -1), repeat=2):
            out.append(((mu, 1), (nu, s), (rho, t), (mu, -1), (nu, -s), (rho, -t)))
    return out


#: Loop kinds and the function giving their paths at a site in d dimensions.
LOOPS: dict[str, Callable[[int], list[Path]]] = {
    "plaquette": plaquette_paths,
    "rectangle": rectangle_paths,
    "parallelogram": parallelogram_paths,
}


def loop_paths(kind: str, d: int) -> list[Path]:
    """The paths of one loop kind at a site (module docstring: each geometric loop once).

    Arguments:
        kind: ``"plaquette"``, ``"rectangle"`` or ``"parallelogram"``.
        d: Lattice dimension.

    Returns:
        List of paths, each a tuple of steps (direction, +1 or -1) from the base site.

    Raises:
        ConfigError: for an unknown kind.
    """
    if kind not in LOOPS:
        raise ConfigError(f"unknown loop kind {kind!r}; expected one of {', '.join(LOOPS)}")
    return LOOPS[kind](d)


def _walk(path: Path, lattice: Sequence[int]) -> list[tuple[int, int, tuple[int, ...]]]:
    """(mu, sign, site of the link relative to the base site, reduced mod L) per step."""
    pos = [0] * len(lattice)
    out = []
    for mu, sign in path:
        if sign > 0:
            out.append((mu, 1, tuple(p % n for p, n in zip(pos, lattice, strict=True))))
            pos[mu] += 1
        else:
            pos[mu] -= 1
            out.append((mu, -1, tuple(p % n for p, n in zip(pos, lattice, strict=True))))
    if any(p % n for p, n in zip(pos, lattice, strict=True)):
        raise ValueError(f"path {path} is not closed")  # a programming error, not user input
    return out


def _roll(t: torch.Tensor, shift: Sequence[int], first_axis: int) -> torch.Tensor:
    """t rolled by ``shift`` on the lattice axes starting at ``first_axis`` (no copy for 0)."""
    pairs = [(s, first_axis + a) for a, s in enumerate(shift) if s]
    if not pairs:
        return t
    return torch.roll(t, shifts=tuple(s for s, _ in pairs), dims=tuple(a for _, a in pairs))


class _Links:
    """U_mu(x + offset) (or its conjugate transpose) for all x, built once per call."""

    def __init__(self, u: torch.Tensor) -> None:
        d = u.shape[1]
        self.u = [u[:, m].contiguous() for m in range(d)]
        self.ud = [m.mH.resolve_conj().contiguous() for m in self.u]
        self.cache: dict[tuple[int, tuple[int, ...], bool], torch.Tensor] = {}

    def get(self, mu: int, site: tuple[int, ...], dagger: bool) -> torch.Tensor:
        key = (mu, site, dagger)
        t = self.cache.get(key)
        if t is None:
            base = self.ud[mu] if dagger else self.u[mu]
            t = self.cache[key] = _roll(base, [-s for s in site], 1)
        return t


def _re_tr_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over sites of Re tr(A B), shape (B,), without forming A B."""
    return (a * b.transpose(-1, -2)).real.flatten(1).sum(1)


def _sun_loops(
    u: torch.Tensor, terms: Sequence[tuple[float, list[Path]]], *, staples: bool
) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """sum_terms c sum_{x, loops} Re tr L, shape (B,), and (if asked) the weighted staple sums.

    The staple V_mu(x) is such that Re tr(U_mu(x) V_mu(x)) = sum over the loops containing
    U_mu(x), weighted by their coefficients, of Re tr L. For the loop L = W_1 ... W_n at base
    site x with W_k = U_mu(y) the rest R_k = W_{k+1} ... W_n W_1 ... W_{k-1} contributes R_k to
    V_mu(y); with W_k = U_mu(y)^+ it contributes R_k^+ (Re tr(U^+ R) = Re tr(U R^+)). The rests
    come from prefix and suffix products: 3n - 6 products per loop.
    """
    batch, d = u.shape[0], u.shape[1]
    lattice = tuple(u.shape[2:-2])
    links = _Links(u)
    total = torch.zeros(batch, dtype=torch.float64, device=u.device)
    mm = groups.small_matmul  # a @ b on the CPU
    v: list[torch.Tensor] | None = [torch.zeros_like(links.u[m]) for m in range(d)] if staples else None
    for coef, paths in terms:
        if coef == 0.0:
            continue
        for path in paths:
            steps = _walk(path, lattice)
            w = [links.get(mu, site, sign < 0) for mu, sign, site in steps]
            n = len(w)
            if v is None:
                half = n // 2
                left, right = w[0], w[half]
                for k in range(1, half):
                    left = mm(left, w[k])
                for k in range(half + 1, n):
                    right = mm(right, w[k])
                total = total + coef * _re_tr_product(left, right)
                continue
            prefix = [w[0]]
            for k in range(1, n - 1):
                prefix.append(mm(prefix[-1], w[k]))
            suffix = {n - 1: w[n - 1]}  # suffix[k] = w[k] ... w[n-1]
            for k in range(n - 2, 0, -1):
                suffix[k] = mm(w[k], suffix[k + 1])
            total = total + coef * _re_tr_product(prefix[n - 2], w[n - 1])
            for k, (mu, sign, site) in enumerate(steps):
                if k == 0:
                    rest = suffix[1]
                elif k == n - 1:
                    rest = prefix[n - 2]
                else:
                    rest = mm(suffix[k + 1], prefix[k - 1])
                if sign < 0:
                    rest = rest.mH
                v[mu] = v[mu] + coef * _roll(rest, site, 1)
    return total, v


def _u1_loops(
    theta: torch.Tensor, terms: Sequence[tuple[float, list[Path]]], *, force_scale: float | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sum_terms c sum_{x, loops} cos(theta_L), shape (B,), and (if ``force_scale`` is given)
    the force -dS/dtheta of S = -force_scale * that sum."""
    batch, d = theta.shape[0], theta.shape[1]
    lattice = tuple(theta.shape[2:])
    comps = [theta[:, m] for m in range(d)]
    cache: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}

    def angle(mu: int, site: tuple[int, ...]) -> torch.Tensor:
        t = cache.get((mu, site))
        if t is None:
            t = cache[mu, site] = _roll(comps[mu], [-s for s in site], 1)
        return t

    total = torch.zeros(batch, dtype=torch.float64, device=theta.device)
    force = torch.zeros_like(theta) if force_scale is not None else None
    for coef, paths in terms:
        if coef == 0.0:
            continue
        for path in paths:
            steps = _walk(path, lattice)
            phi = sum((sign * angle(mu, site) for mu, sign, site in steps), torch.zeros_like(comps[0]))
            total = total + coef * torch.cos(phi).flatten(1).sum(1)
            if force is not None:
                assert force_scale is not None
                s = (-force_scale * coef) * torch.sin(phi)  # -dS/dphi, S = -scale c cos(phi)
                for mu, sign, site in steps:
                    force[:, mu] += _roll(sign * s, site, 1)
    return total, force


# ---------------------------------------------------------------------------- actions


def _finite(value: Any, name: str, who: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{who}: {name} must be a number; found {value!r}") from None
    if not math.isfinite(out):
        raise ConfigError(f"{who}: {name} must be finite; found {value!r}")
    return out


def _group(group: Any, who: str) -> tuple[str, int]:
    """(normalised group name, N) for ``u1`` (N = 1) or ``su<N>``; ConfigError otherwise."""
    g = str(group).strip().lower()
    unknown = ConfigError(f"{who}: unknown group {group!r}; expected u1, su2, su3 (or su<N>)")
    try:
        space = field_space(g)
    except UnknownComponentError:
        raise unknown from None
    if isinstance(space, SUNSpace):
        return g, space.n
    if isinstance(space, AngleSpace) and space.gauge:
        return g, 1
    raise unknown


class LoopGaugeAction(Action):
    r"""A gauge action that is a weighted sum of Wilson loops (module docstring).

    S = -(beta / N) sum_kinds c_kind sum_x sum_{loops of the kind at x} Re tr L (U(1):
    Re tr L / N = cos theta_L); subclasses give the coefficients with :meth:`coefficients`.

    Arguments:
        beta: Inverse coupling (finite float).
        group: ``"u1"``, ``"su2"``, ``"su3"`` (or ``"su<N>"``).

    Fields: ``u1`` angles (B, d, L...), float64; ``su<N>`` links (B, d, L..., N, N), complex128.

    Raises:
        ConfigError: for an unknown group or a non-finite beta.
    """

    #: Registry name, for messages.
    name: ClassVar[str] = "loop-action"
    parameters: tuple[str, ...] = ("beta", "group")

    def __init__(self, beta: float = 1.0, group: str = "su3") -> None:
        self.beta = _finite(beta, "beta", self.name)
        self.group, self.n = _group(group, self.name)
        self.field = self.group

    def coefficients(self) -> dict[str, float]:
        """Loop kind (``plaquette``, ``rectangle``, ``parallelogram``) -> coefficient
        (dimensionless; subclasses implement it)."""
        raise NotImplementedError

    def _terms(self, d: int) -> list[tuple[float, list[Path]]]:
        return [(c, loop_paths(kind, d)) for kind, c in self.coefficients().items() if c != 0.0]

    def _lattice_dim(self, x: torch.Tensor) -> int:
        lattice = self.check(x)
        d = len(lattice)
        if d < 2:
            raise ShapeError(f"{self.name}: plaquettes need d >= 2 directions; found d = {d}")
        return d

    def loop_means(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Mean of Re tr L / N over the loops of every kind of :meth:`coefficients` (1 for the
        unit gauge; for ``plaquette`` the plaquette of DESIGN.md).

        Arguments:
            x: Links in the layout of :attr:`field`.

        Returns:
            ``{kind: (B,) float64}``; a kind with no loops in this dimension (``parallelogram``
            for d = 2) is left out.

        Raises:
            ShapeError: if the links do not have the layout of :attr:`group` or d < 2.
        """
        d = self._lattice_dim(x)
        volume = math.prod(x.shape[2 : 2 + d])
        out = {}
        for kind in self.coefficients():
            paths = loop_paths(kind, d)
            if not paths:
                continue
            if self.n == 1:
                total, _ = _u1_loops(x, [(1.0, paths)], force_scale=None)
            else:
                total, _ = _sun_loops(x, [(1.0, paths)], staples=False)
                total = total / self.n
            out[kind] = (total / (volume * len(paths))).to(torch.float64)
        return out

    def action(self, x: torch.Tensor) -> torch.Tensor:
        """S[U] (module docstring normalisation), shape (B,), float64.

        Raises:
            ShapeError: if the links do not have the layout of :attr:`group` or d < 2.
        """
        d = self._lattice_dim(x)
        terms = self._terms(d)
        if self.n == 1:
            total, _ = _u1_loops(x, terms, force_scale=None)
            return (-self.beta * total).to(torch.float64)
        total, _ = _sun_loops(x, terms, staples=False)
        return (-(self.beta / self.n) * total).to(torch.float64)

    def staples(self, u: torch.Tensor) -> torch.Tensor:
        r"""Weighted staple sum V_mu(x) of SU(N) links.

        sum_x sum_mu Re tr(U_mu(x) V_mu(x)) counts every loop once per link it contains, with
        its coefficient; the action is S = -(beta/N) sum_kinds c sum Re tr L and the force
        F_mu(x) = -(beta / 2N) Pi(U_mu(x) V_mu(x)). With only the plaquette (c0 = 1) V is the
        Wilson staple sum of :meth:`flowplug.plugins.theories.WilsonGaugeAction.staples`.

        Arguments:
            u: SU(N) links (B, d, L..., N, N), complex128.

        Returns:
            Same shape and dtype as ``u``.

        Raises:
            ShapeError: for U(1) angles, or links that do not have the layout of :attr:`group`.
        """
        if self.n == 1:
            raise ShapeError(f"{self.name}: staples are defined for SU(N) links, not U(1) angles")
        d = self._lattice_dim(u)
        _, v = _sun_loops(u, self._terms(d), staples=True)
        assert v is not None
        return torch.stack(v, dim=1)

    def force(self, x: torch.Tensor) -> torch.Tensor:
        """Analytic force (conventions of :mod:`flowplug.theory`).

        U(1): F_mu(x) = -dS/dtheta_mu(x) = -beta sum_kinds c sum_{loops L containing the link}
        s_L sin theta_L, s_L = +1 (-1) where L runs along (against) the link.
        SU(N): F_mu(x) = -(beta / 2N) Pi(U_mu(x) V_mu(x)), Pi the traceless anti-Hermitian part
        and V the weighted staple sum (:meth:`staples`).

        Returns:
            Same shape and dtype as ``x``.

        Raises:
            ShapeError: if the links do not have the layout of :attr:`group` or d < 2.
        """
        d = self._lattice_dim(x)
        terms = self._terms(d)
        if self.n == 1:
            _, f = _u1_loops(x, terms, force_scale=self.beta)
            assert f is not None
            return f
        _, v = _sun_loops(x, terms, staples=True)
        assert v is not None
        return (-self.beta / (2 * self.n)) * groups.project_algebra(groups.small_matmul(x, torch.stack(v, dim=1)))


class PlaquetteRectangleAction(LoopGaugeAction):
    r"""Plaquette + rectangle gauge action with rectangle coefficient c1 and c0 = 1 - 8 c1.

    S = beta sum_x [c0 sum_P (1 - Re tr P / N) + c1 sum_R (1 - Re tr R / N)] up to the
    constant (module docstring), i.e. S = -(beta/N) [c0 sum_P Re tr P + c1 sum_R Re tr R];
    c1 = 0 is the ``wilson`` action. Named cases: c1 = -1/12 tree-level Symanzik
    (``symanzik``), -0.331 Iwasaki (``iwasaki``), -1.4088 DBW2 (``dbw2``).

    Arguments:
        beta: Inverse coupling (finite float), beta = 2N / g_0^2 at tree level.
        c1: Rectangle coefficient (finite float).
        group: ``"u1"``, ``"su2"``, ``"su3"`` (or ``"su<N>"``).

    Fields: ``u1`` angles (B, d, L...), float64; ``su<N>`` links (B, d, L..., N, N), complex128.

    Raises:
        ConfigError: for an unknown group or non-finite beta or c1.

    References:
        Luscher and Weisz, Commun. Math. Phys. 97 (1985) 59; Iwasaki, UTHEP-118 (1983),
        arXiv:1111.7054; QCD-TARO, hep-lat/9911033 (module docstring).
    """

    name: ClassVar[str] = "plaquette-rectangle"
    parameters: tuple[str, ...] = ("beta", "c1", "group")

    def __init__(self, beta: float = 1.0, c1: float = C1_SYMANZIK, group: str = "su3") -> None:
        super().__init__(beta, group)
        self.c1 = _finite(c1, "c1", self.name)
        self.c0 = 1.0 - 8.0 * self.c1

    def coefficients(self) -> dict[str, float]:
        """``{"plaquette": c0, "rectangle": c1}``."""
        return {"plaquette": self.c0, "rectangle": self.c1}


class SymanzikGaugeAction(PlaquetteRectangleAction):
    """Tree-level Symanzik (Luscher-Weisz) action: :class:`PlaquetteRectangleAction` with
    c1 = -1/12, c0 = 5/3 (Luscher and Weisz, Commun. Math. Phys. 97 (1985) 59).

    Arguments:
        beta: Inverse coupling (finite float).
        group: ``"u1"``, ``"su2"``, ``"su3"`` (or ``"su<N>"``).

    Raises:
        ConfigError: for an unknown group or a non-finite beta.
    """

    name: ClassVar[str] = "symanzik"
    parameters = ("beta", "group")
    C1: ClassVar[float] = C1_SYMANZIK

    def __init__(self, beta: float = 1.0, group: str = "su3") -> None:
        super().__init__(beta, self.C1, group)


class IwasakiGaugeAction(SymanzikGaugeAction):
    """Iwasaki action: c1 = -0.331, c0 = 3.648 (Iwasaki, UTHEP-118 (1983), arXiv:1111.7054).

    Arguments:
        beta: Inverse coupling (finite float).
        group: ``"u1"``, ``"su2"``, ``"su3"`` (or ``"su<N>"``).

    Raises:
        ConfigError: for an unknown group or a non-finite beta.
    """

    name: ClassVar[str] = "iwasaki"
    C1: ClassVar[float] = C1_IWASAKI


class DBW2GaugeAction(SymanzikGaugeAction):
    """DBW2 action: c1 = -1.4088, c0 = 12.2704 (Takaishi, Phys. Rev. D 54 (1996) 1050;
    QCD-TARO, de Forcrand et al., hep-lat/9911033).

    Arguments:
        beta: Inverse coupling (finite float).
        group: ``"u1"``, ``"su2"``, ``"su3"`` (or ``"su<N>"``).

    Raises:
        ConfigError: for an unknown group or a non-finite beta.
    """

    name: ClassVar[str] = "dbw2"
    C1: ClassVar[float] = C1_DBW2


def milc_coefficients(u0: float, variant: str = "1loop", nf: float = 0.0) -> dict[str, float]:
    r"""Loop coefficients of MILC's Symanzik gauge actions relative to the plaquette's 1.

    c_rect = -1/(20 u0^2) * (1 - (a - a_nf nf) ln u0),  c_pg = (b - b_nf nf) ln(u0) / u0^2,
    with (a, a_nf, b, b_nf) = (0, 0, 0, 0) ``tree`` ("Symanzik 1x1 + 1x2 action"),
    (0.6264, 0, 0.04335, 0) ``1loop`` ("Symanzik 1x1 + 1x2 + 1x1x1 action"),
    (0.6264, 0.4742, 0.0433, 0.012) ``asqtad`` ("... with quark loops"),
    (0.6264, 1.1746, 0.0433, 0.0156) ``hisq`` ("... with HISQ quark loops").
    In terms of alpha_s = -4 ln(u0) / 3.06839 the ``1loop`` values are
    c_rect = -(1 + 0.4805 alpha_s) / (20 u0^2) and c_pg = -0.03325 alpha_s / u0^2
    (0.4805 * 4 / 3.06839 = 0.62638, 0.03325 * 4 / 3.06839 = 0.043345: the same to the
    digits MILC codes).

    Arguments:
        u0: Tadpole factor (mean link), 0 < u0 <= 1.
        variant: ``tree``, ``1loop``, ``asqtad`` or ``hisq``.
        nf: Number of dynamical flavours in the sea (MILC's ``total_dyn_flavors``); must be
            0 for ``tree`` and ``1loop``.

    Returns:
        ``{"plaquette": 1.0, "rectangle": c_rect, "parallelogram": c_pg}``.

    Raises:
        ConfigError: for u0 outside (0, 1], an unknown variant, or nf < 0 (or nf != 0 for a
            variant without quark loops).

    References:
        milc-qcd/milc_qcd, generic/imp_actions/symanzik_tree_action.h,
        symanzik_1loop_action.h, symanzik_1loop_nf_action.h, symanzik_1loop_hisq_action.h;
        Alford et al., hep-lat/9507010; Hao et al., arXiv:0705.4660.
    """
    who = "milc-symanzik"
    u0 = _finite(u0, "u0", who)
    if not 0.0 < u0 <= 1.0:
        raise ConfigError(f"{who}: u0 (the mean link, tadpole factor) must be in (0, 1]; found {u0}")
    v = str(variant).strip().lower()
    if v not in MILC_VARIANTS:
        raise ConfigError(f"{who}: unknown variant {variant!r}; expected one of {', '.join(MILC_VARIANTS)}")
    nf = _finite(nf, "nf", who)
    if nf < 0:
        raise ConfigError(f"{who}: nf (dynamical flavours) must be >= 0; found {nf}")
    k = MILC_VARIANTS[v]
    if nf != 0 and k["rect_log_nf"] == 0.0:
        raise ConfigError(
            f"{who}: variant {v!r} has no quark-loop correction, so nf must be 0; found nf = {nf} "
            "(variant 'asqtad' or 'hisq' takes nf)"
        )
    log_u0 = math.log(u0)
    rect = -1.0 / (20.0 * u0 * u0) * (1.0 - (k["rect_log"] - k["rect_log_nf"] * nf) * log_u0)
    pg = (k["pg_log"] - k["pg_log_nf"] * nf) * log_u0 / (u0 * u0)
    return {"plaquette": 1.0, "rectangle": rect, "parallelogram": pg}


class MILCSymanzikAction(LoopGaugeAction):
    r"""MILC's tadpole-improved Symanzik gauge action, "Symanzik 1x1 + 1x2 + 1x1x1 action".

    S = beta sum_x [sum_P (1 - Re tr P / N) + c_rect sum_R (1 - Re tr R / N)
                    + c_pg sum_C (1 - Re tr C / N)] up to the constant (module docstring),
    with beta = MILC's ``beta11`` (the plaquette's coupling; MILC's code computes
    (beta/3) sum coeff (3 - Re tr L), the same thing) and c_rect, c_pg of
    :func:`milc_coefficients`. At u0 = 1 it is the tree-level Symanzik action with
    beta_symanzik = 3 beta / 5 (c0 = 1/(1 + 8 c_rect) = 5/3): MILC's beta11 = 10 / g_0^2.

    Only the gauge action: a MILC ensemble generated with dynamical quarks (the sample
    file's "quark.flavors1 = 4, quark.flavors2 = 4") has the quark determinant in its
    weight too, which this action does not include. The coefficients are MILC's SU(3)
    one-loop values; the action itself works for any group and d >= 2 (no parallelograms
    for d = 2).

    Arguments:
        beta: MILC's beta11 (finite float).
        u0: Tadpole factor, 0 < u0 <= 1 (MILC's ``gauge.tadpole.u0``).
        nf: Dynamical flavours for the ``asqtad``/``hisq`` variants (MILC's total_dyn_flavors).
        variant: ``"1loop"`` (default: MILC's symanzik_1loop_action.h, no quark loops),
            ``"tree"``, ``"asqtad"`` or ``"hisq"`` (:func:`milc_coefficients`).
        group: ``"su3"`` (default), ``"su2"``, ``"su<N>"`` or ``"u1"``.

    Fields: ``su<N>`` links (B, d, L..., N, N), complex128; ``u1`` angles (B, d, L...), float64.

    Raises:
        ConfigError: for bad u0, nf, variant, group or a non-finite beta.

    References:
        milc-qcd/milc_qcd generic/imp_actions/symanzik_1loop_action.h and generic/gauge_stuff.c;
        Alford, Dimm, Lepage, Hockney, Mackenzie, hep-lat/9507010; Luscher and Weisz,
        Commun. Math. Phys. 97 (1985) 59.
    """

    name: ClassVar[str] = "milc-symanzik"
    parameters = ("beta", "u0", "nf", "variant", "group")

    def __init__(
        self, beta: float = 1.0, u0: float = 1.0, nf: float = 0, variant: str = "1loop", group: str = "su3"
    ) -> None:
        super().__init__(beta, group)
        self.variant = str(variant).strip().lower()
        self._coefficients = milc_coefficients(u0, self.variant, nf)
        self.u0 = float(u0)
        self.nf = float(nf)

    def coefficients(self) -> dict[str, float]:
        """``{"plaquette": 1, "rectangle": c_rect, "parallelogram": c_pg}`` (:func:`milc_coefficients`)."""
        return dict(self._coefficients)


#: Registry name -> (class, description, aliases).
ACTIONS: Mapping[str, tuple[type[LoopGaugeAction], str, tuple[str, ...]]] = {
    "plaquette-rectangle": (
        PlaquetteRectangleAction,
        "plaquette + 2x1 rectangle, c0 = 1 - 8 c1 (parameter c1), U(1)/SU(N), any dimension",
        ("plaq-rect",),
    ),
    "symanzik": (
        SymanzikGaugeAction,
        "tree-level Symanzik (Luscher-Weisz) gauge action, c1 = -1/12",
        ("luscher-weisz", "tlsym"),
    ),
    "iwasaki": (IwasakiGaugeAction, "Iwasaki gauge action, c1 = -0.331", ()),
    "dbw2": (DBW2GaugeAction, "DBW2 gauge action, c1 = -1.4088", ()),
    "milc-symanzik": (
        MILCSymanzikAction,
        "MILC 'Symanzik 1x1 + 1x2 + 1x1x1' tadpole-improved gauge action (beta11, u0)",
        (),
    ),
}


@hookimpl
def flowplug_actions() -> list[ActionSpec]:
    """The improved gauge actions of this module (module docstring)."""
    return [
        ActionSpec(
            name=name,
            description=description,
            factory=cls,
            fields=("u1", "su2", "su3"),
            parameters=cls.parameters,
            aliases=aliases,
        )
        for name, (cls, description, aliases) in ACTIONS.items()
    ]
