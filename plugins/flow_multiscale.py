r"""Multiscale gauge-equivariant coupling for 2D U(1) link fields (layer ``u1-multiscale``).

In two dimensions the plaquette angles of a U(1) gauge field are the only
gauge-invariant local variables, and under a Wilson-type action (a sum of class
functions of single plaquettes) they are independent up to one global constraint on a
periodic lattice: their sum is 2 pi Q. A flow that transforms plaquettes one stripe at
a time (``u1-ncp``, arXiv:2003.06413) has to undo the change it makes to each passive
plaquette in later layers; this layer instead fixes the Wilson loops of a hierarchy of
blocks from the largest to the smallest (the multiscale idea of Abbott et al.,
arXiv:2404.10819, on the block structure of the 2D theory).

Block hierarchy
    The whole lattice is the level-0 block. A block with more than one plaquette is
    split into two children along its longer direction (direction 0 on a tie), the
    lower child taking floor(n/2) rows; children are the blocks of the next level, so
    an L_0 x L_1 lattice has about log2(L_0 L_1) levels (6 for 8 x 8). The loop angle
    of a block is the sum of the plaquette angles it contains (the Wilson loop around
    it; for a block that wraps around the lattice, the product of the loops on its
    two boundaries).

Update (layer ``index`` acts on level ``n_levels - levels + (index mod levels)``)
    Each split block W = T + O (children T and O) has one *designated link* on the
    boundary between its children: U_1(c, y_0) for a split along direction 0 at x_0 = c
    (T is the lower child), U_0(x_0, c) for a split along direction 1 at x_1 = c (T is
    the upper child), with y_0 / x_0 the first coordinate of the block. Shifting that
    link angle by delta adds delta to the loop of T, subtracts it from the loop of O and
    leaves every other loop of this level and of all coarser levels unchanged. The layer
    maps the loop angle of T through a circular rational-quadratic spline followed by a
    rotation (arXiv:2002.02428), T' = h(T | W), whose parameters a small network reads off
    cos(m W), sin(m W) (m = 1..n_modes) and the two children's areas, and shifts the
    designated link by T' - T. The rotation is atan2(s, 1 + c) of two network outputs: the
    mode of f_T(T) f_O(W - T) (below) is at arg(k_T + k_O e^{iW}), linear in (cos W, sin W)
    in this form, while a rotation read off directly would have to jump at W = pi.
    Links are shifted by gauge-invariant amounts, so the layer is gauge equivariant;
    log|det| is the sum of log h'(T) over the split blocks.

Why it is expressive enough
    Under the uniform prior, given the loops of all blocks of levels < k, the plaquettes
    are uniform on the set with those block sums, so T is uniform given W; a layer that
    moves T leaves the plaquettes uniform given the new sums. Applied from the coarsest
    level to the finest, ideal splines h (the inverse conditional distribution function
    of T given W) therefore give the exact distribution of the 2D Wilson theory on a
    periodic lattice, topological sectors included: its plaquettes are independent
    given the block sums, and p(T | W) is proportional to f_T(T) f_O(W - T) with f_a the
    distribution of the loop of a block of a plaquettes (a convolution of
    single-plaquette densities). Training only has to learn one circular map per level
    as a function of one angle.

    Further passes (layers beyond ``levels``) start from this nearly exact distribution;
    their coarse shifts move plaquettes that the finer levels had already set, and their
    finer layers set them again. With splines learned from a finite budget, passes help:
    on 8 x 8 at beta = 2 the ESS after 1000 steps of batch 64 rose from 0.42-0.58 (one
    pass, six seeds) to 0.56-0.68 (two passes, six seeds) and 0.60-0.74 (three, four seeds).

Large beta (options ``concentrate``, ``init_beta``, ``centre``, ``shift``)
    At beta = 6 the conditionals are sharp (the finest one is a von Mises density of
    concentration 2 beta |cos(W/2)|), and with the defaults the middle levels fail to train:
    a coarse level's output moves the finer levels' inputs, and the finer maps amplify its
    parameter changes into heavy-tailed gradients. The options (measurements and ablations in
    docs/flows.md, "u1-multiscale at large beta"):

    - ``centre = true`` transforms the offset of T from its proportional share
      c(W) = (a_T / a_W) wrap(W) of the parent loop (the mode of f_T(T) f_O(W - T) for
      |W| < pi), T' = c(W) + r(W) + G(wrap(T - c(W))), with G a monotone map of [-pi, pi]
      fixing the ends and r(W) = atan2(s, 1 + c) the learned residual rotation. c jumps at
      W = pi, where the two branches of the conditional weigh the same; forward and inverse
      read the same W up to rounding, so the jump is exact as a map.
    - ``shift = "spread"`` changes every plaquette of T by delta / a_T and every plaquette
      of O by -delta / a_O (link shifts inside the block, :func:`_spread_patterns`) instead
      of shifting one link, so finer blocks move rigidly with a coarser change. The Jacobian
      is the identity plus one rank-one term per block (delta depends on the links only
      through T and W; the pattern moves T by 1 and W by 0 per unit delta), so log|det| is
      still the sum of log G'(T). The layer then has no ``forward_diag``: path gradients go
      through the exact inverse.
    - ``concentrate = true`` composes the spline with a truncated-logistic concentration map
      (:func:`flowplug.plugins.flow_transforms.truncated_logistic_icdf`, log scale a further
      network output): G = C_s o S.
    - ``init_beta`` starts each level's scale s at a Gaussian estimate of the width of T given
      W = 0 at that coupling (mean cos exp(-v a_T a_O / (2 a_W)), v = -2 log(I_1/I_0) per
      plaquette).
    - ``saddle_width = true`` multiplies s by cos(W / a_W)^(-1/2): at the saddle point of
      f_T(T) f_O(W - T) (every plaquette of a child at the same angle) the variance of T
      given W is a_T a_O / (beta a_W cos(W / a_W)), which for a 1 x 2 block is the exact
      1/kappa of its von Mises conditional, flat at W = pi. Reverse-KL training rarely sees
      parents near pi, so a learned width there stayed too narrow and such configurations
      carried importance weights up to e^15 (docs/flows.md).

    :func:`transfer_multiscale` (``train.init_from``) initialises larger lattices.

Limits
    Two dimensions only (in d > 2 the Bianchi identity couples the plaquettes of a
    cube). For actions with terms beyond single plaquettes (rectangles, a theta term
    written through a non-local charge) the conditioner's inputs are not sufficient and
    the flow is an approximation, still exact as a proposal.

References:
    Kanwar et al., arXiv:2003.06413 (gauge-equivariant couplings, U(1) in 2D);
    Abbott et al., arXiv:2404.10819 (multiscale flows for gauge theories);
    Rezende et al., arXiv:2002.02428 (circular splines);
    Gross and Witten / Wadia (exact 2D U(N) lattice gauge theory: independent plaquettes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from flowplug import gauge, groups
from flowplug.errors import ConfigError, ShapeError
from flowplug.plugins.flow_nets import MLP, net_dtype
from flowplug.plugins.flow_transforms import (
    MAX_LOG_SCALE,
    MIN_LOG_SCALE,
    circular_rq_spline,
    rq_spline,
    rq_spline_params,
    truncated_cauchy_icdf,
    truncated_logistic_icdf,
    two_branch_icdf,
)

TWO_PI = 2.0 * math.pi


def block_hierarchy(lattice: Sequence[int]) -> list[list[tuple[tuple[int, int, int, int], int]]]:
    """Split blocks of the multiscale hierarchy, level by level (module docstring).

    Arguments:
        lattice: (L_0, L_1), both >= 2.

    Returns:
        One list per level of ``((x0, n0, x1, n1), s)``: the block [x0, x0 + n0) x
        [x1, x1 + n1) (coordinates periodic) and the direction s in which it is split.
        Blocks of one plaquette are not split and do not appear.

    Raises:
        ConfigError: unless the lattice is 2D with extents >= 2.
    """
    lat = tuple(int(v) for v in lattice)
    if len(lat) != 2 or min(lat) < 2:
        raise ConfigError(
            f"u1-multiscale needs a 2D lattice with extents >= 2 (its plaquettes are "
            f"independent only in 2D); found lattice {list(lattice)}"
        )
    levels = []
    blocks = [(0, lat[0], 0, lat[1])]
    while blocks:
        level, children = [], []
        for x0, n0, x1, n1 in blocks:
            if n0 * n1 == 1:
                continue
            s = 0 if n0 >= n1 else 1
            level.append(((x0, n0, x1, n1), s))
            if s == 0:
                h = n0 // 2
                children += [(x0, h, x1, n1), (x0 + h, n0 - h, x1, n1)]
            else:
                h = n1 // 2
                children += [(x0, n0, x1, h), (x0, n0, x1 + h, n1 - h)]
        if level:
            levels.append(level)
        blocks = children
    return levels


def _spread_patterns(
    blocks: Sequence[tuple[tuple[int, int, int, int], int]], lattice: tuple[int, int]
) -> tuple[list[int], list[int], list[float]]:
    """Link shifts per unit delta that add delta / a_T to every plaquette of T and -delta / a_O to
    every plaquette of O, using only links inside the block (both of their plaquettes in it).

    In block coordinates (a, b), a in [0, n0), b in [0, n1), with plaquette increments c(a, b)
    summing to 0: U_0(a, b), b >= 1, is shifted by psi(a, b) = sum_{b' >= b} c(a, b') (it moves
    increment from plaquette (a, b - 1) to (a, b)), and U_1(a, 0), a >= 1, by
    phi(a) = sum_{a' < a} R(a'), R(a) = sum_b c(a, b) (it moves increment from (a, 0) to (a - 1, 0)).
    Returns flat link indices into (2, L_0, L_1), block indices and coefficients."""
    l0, l1 = lattice
    vol = l0 * l1
    links, blks, coefs = [], [], []
    for j, ((x0, n0, x1, n1), s) in enumerate(blocks):
        h = (n0 if s == 0 else n1) // 2
        a_t = h * n1 if s == 0 else (n1 - h) * n0
        a_o = n0 * n1 - a_t
        c = [[0.0] * n1 for _ in range(n0)]
        for a in range(n0):
            for b in range(n1):
                lo = (a if s == 0 else b) < h
                in_t = lo if s == 0 else not lo
                c[a][b] = 1.0 / a_t if in_t else -1.0 / a_o
        rows = [sum(c[a]) for a in range(n0)]
        for a in range(n0):
            tail = 0.0
            for b in range(n1 - 1, 0, -1):
                tail += c[a][b]
                if abs(tail) > 1e-14:
                    links.append(0 * vol + ((x0 + a) % l0) * l1 + (x1 + b) % l1)
                    blks.append(j)
                    coefs.append(tail)
        phi = 0.0
        for a in range(1, n0):
            phi += rows[a - 1]
            if abs(phi) > 1e-14:
                links.append(1 * vol + ((x0 + a) % l0) * l1 + x1 % l1)
                blks.append(j)
                coefs.append(phi)
    return links, blks, coefs


#: Concentration maps of the ``concentrate`` option: name -> inverse distribution function.
CONCENTRATIONS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "logistic": truncated_logistic_icdf,
    "cauchy": truncated_cauchy_icdf,
}


def _concentration(value: bool | str) -> str:
    """The ``concentrate`` option as a name of :data:`CONCENTRATIONS`, or "" for none."""
    if value is True:
        return "logistic"
    if value is False or value is None or str(value).lower() in ("", "none", "false"):
        return ""
    name = str(value).lower()
    if name not in CONCENTRATIONS:
        raise ConfigError(
            f"u1-multiscale: concentrate must be true, false or one of {', '.join(CONCENTRATIONS)}; found {value!r}"
        )
    return name


def _init_log_scale(beta: float, a_t: float, a_o: float, kind: str = "logistic") -> float:
    """log s of the truncated concentration map ``kind`` whose mean cos is exp(-v a_T a_O / (2 a_W)),
    the mean cos of a Gaussian estimate of T given W = 0, with v = -2 log(I_1(beta) / I_0(beta))
    the circular variance of one plaquette angle under exp(beta cos theta)."""
    icdf = CONCENTRATIONS[kind or "logistic"]
    b = torch.tensor(max(float(beta), 1e-6), dtype=torch.float64)
    v = -2.0 * torch.log(torch.special.i1e(b) / torch.special.i0e(b)).item()
    target = math.exp(-0.5 * v * a_t * a_o / (a_t + a_o))
    u = (torch.arange(4096, dtype=torch.float64) + 0.5) / 4096
    lo, hi = MIN_LOG_SCALE, MAX_LOG_SCALE
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        c, _ = icdf(u, torch.full_like(u, mid))
        if torch.cos(c).mean().item() > target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


class U1MultiscaleCoupling(nn.Module):
    r"""Multiscale gauge-equivariant coupling for 2D U(1) (module docstring).

    Layer ``index`` acts on level ``n_levels - levels + (index mod levels)`` of
    :func:`block_hierarchy`, so a flow of ``levels`` of these layers visits the ``levels``
    finest levels once each, coarsest first in the sampling direction (all levels by
    default: 6 on 8 x 8, 8 on 16 x 16); further layers start another pass. Coarser levels
    are left to the prior: the loop of
    a block of a plaquettes has Fourier coefficients (I_n(beta)/I_0(beta))^a, so for large
    blocks the exact conditional is uniform to that accuracy (at beta = 2, 3e-3 for 16
    plaquettes), and learning it from a batch adds only noise.

    Arguments:
        lattice: (L_0, L_1), extents >= 2.
        field: Must be ``"u1"``.
        index: Position in the flow.
        hidden: Hidden widths of the conditioner (a perceptron shared by all blocks of
            the level), default ``(32, 32)``.
        n_bins: Spline bins, default 8.
        dtype: Conditioner dtype (``"float32"`` or ``"float64"``).
        init_scale: Scale of the conditioner's initial output layer; 0 (default) starts
            the layer as the identity (with ``concentrate``: as the concentration map at the
            initial scale, centred at the share of W with ``centre``).
        levels: Number of finest levels the flow transforms (default: all).
        n_modes: Fourier modes of W fed to the conditioner, default 4.
        concentrate: Follow the spline by a concentration map whose log scale is a further
            network output: ``true`` or ``"logistic"`` (truncated logistic, exponential tails),
            ``"cauchy"`` (truncated Cauchy, polynomial tails), false (default; module docstring).
        init_log_scale: Initial log scale of the concentration map (default log 4, nearly
            uniform, or the ``init_beta`` estimate).
        init_beta: Coupling for the initial scale estimate (default none).
        branches: 2 adds the second winding branch of the parent loop, half a turn from
            the first, to the concentration map (:func:`flowplug.plugins.flow_transforms.two_branch_icdf`),
            with the saddle-point weight exp(beta a_W (cos(W_far / a_W) - cos(W / a_W))) times a
            learned factor, W_far = W - 2 pi sign(W) (default 1; needs ``concentrate = true``,
            ``centre = true`` and ``init_beta``, which is then part of the map, not only of
            its initialisation). Half a turn is exact for children of equal areas (every
            split of a lattice of even extents); otherwise the spline corrects the position.
        saddle_width: Multiply the concentration map's scale by cos(W / a_W)^(-1/2), the
            W-dependence of the width of T given W at the saddle point (all plaquettes of a
            child equal): the exact 1/sqrt(kappa) of a 1 x 2 block, flat at W = pi (default
            false; needs ``concentrate``).
        centre: Transform T relative to its share (a_T / a_W) wrap(W) of the parent loop
            (default false).
        shift: ``"link"`` (default: one designated link per block) or ``"spread"`` (every
            plaquette of a child moves by the same amount; no ``forward_diag``).

    With the defaults the layer is the one of earlier versions (same parameters, same map).

    ``forward(theta) -> (theta', logdet)``, ``inverse(theta') -> (theta, logdet_inv)``:
    link angles of shape (B, 2, L_0, L_1) float64 (the designated links wrapped into
    (-pi, pi]), logdet shape (B,) float64.

    Raises:
        ConfigError: for another field kind, a lattice that is not 2D or has an extent
            below 2, n_bins < 1, n_modes < 1, levels outside 1..n_levels, or another shift.
        ShapeError: on an input of the wrong shape.
    """

    # buffers (registered in __init__; declared for the type checker)
    t_of: torch.Tensor
    o_of: torch.Tensor
    link: torch.Tensor
    areas: torch.Tensor
    modes: torch.Tensor
    spread_link: torch.Tensor
    spread_blk: torch.Tensor
    spread_coef: torch.Tensor

    def __init__(
        self,
        *,
        lattice: Sequence[int],
        field: str = "u1",
        index: int = 0,
        hidden: Sequence[int] = (32, 32),
        n_bins: int = 8,
        dtype: str = "float32",
        init_scale: float = 0.0,
        levels: int | None = None,
        n_modes: int = 4,
        concentrate: bool | str = False,
        init_log_scale: float | None = None,
        init_beta: float | None = None,
        saddle_width: bool = False,
        branches: int = 1,
        centre: bool = False,
        shift: str = "link",
    ) -> None:
        super().__init__()
        if field != "u1":
            raise ConfigError(f"u1-multiscale acts on u1 links; found field kind '{field}'")
        self.n_bins = int(n_bins)
        if self.n_bins < 1:
            raise ConfigError(f"u1-multiscale needs n_bins >= 1; found {n_bins}")
        if isinstance(n_modes, bool) or not isinstance(n_modes, int) or n_modes < 1:
            raise ConfigError(f"u1-multiscale needs an integer n_modes >= 1; found {n_modes!r}")
        hierarchy = block_hierarchy(lattice)
        self.lattice = (int(lattice[0]), int(lattice[1]))
        self.n_levels = len(hierarchy)
        n_used = self.n_levels if levels is None else levels
        if isinstance(n_used, bool) or not isinstance(n_used, int) or not 1 <= n_used <= self.n_levels:
            raise ConfigError(
                f"u1-multiscale: levels must be an integer in 1..{self.n_levels} for lattice "
                f"{list(lattice)}; found {levels!r}"
            )
        self.level = self.n_levels - n_used + int(index) % n_used
        blocks = hierarchy[self.level]
        l0, l1 = self.lattice
        vol = l0 * l1
        n = len(blocks)
        t_of = torch.full((vol,), n, dtype=torch.long)  # plaquette -> block whose T child holds it
        o_of = torch.full((vol,), n, dtype=torch.long)
        link = torch.empty(n, dtype=torch.long)  # flat index into (2, L0, L1)
        areas = torch.empty(n, 2, dtype=torch.float64)
        for j, ((x0, n0, x1, n1), s) in enumerate(blocks):
            h = (n0 if s == 0 else n1) // 2
            for a in range(n0):
                for b in range(n1):
                    lo = (a if s == 0 else b) < h
                    # T is the lower child for a split along 0, the upper one along 1
                    in_t = lo if s == 0 else not lo
                    site = ((x0 + a) % l0) * l1 + (x1 + b) % l1
                    (t_of if in_t else o_of)[site] = j
            if s == 0:
                c = (x0 + h) % l0
                link[j] = 1 * vol + c * l1 + x1 % l1
                a_t = h * n1
            else:
                c = (x1 + h) % l1
                link[j] = 0 * vol + (x0 % l0) * l1 + c
                a_t = (n1 - h) * n0
            areas[j, 0], areas[j, 1] = a_t / vol, (n0 * n1 - a_t) / vol
        self.n_blocks = n
        self.centre = bool(centre)
        self.shift = str(shift).lower()
        if self.shift not in ("link", "spread"):
            raise ConfigError(f"u1-multiscale: shift must be 'link' or 'spread'; found {shift!r}")
        s_link, s_blk, s_coef = _spread_patterns(blocks, self.lattice) if self.shift == "spread" else ([], [], [])
        self.register_buffer("spread_link", torch.tensor(s_link, dtype=torch.long), persistent=False)
        self.register_buffer("spread_blk", torch.tensor(s_blk, dtype=torch.long), persistent=False)
        self.register_buffer("spread_coef", torch.tensor(s_coef, dtype=torch.float64), persistent=False)
        self.register_buffer("t_of", t_of)
        self.register_buffer("o_of", o_of)
        self.register_buffer("link", link)
        self.register_buffer("areas", areas)
        self.register_buffer("modes", torch.arange(1, n_modes + 1, dtype=torch.float64), persistent=False)
        self.concentrate = _concentration(concentrate)  # "" (none), "logistic" or "cauchy"
        if init_log_scale is None:
            init_log_scale = (
                math.log(4.0)
                if init_beta is None
                else _init_log_scale(
                    float(init_beta), float(areas[0, 0] * vol), float(areas[0, 1] * vol), self.concentrate
                )
            )
        self.init_log_scale = float(init_log_scale)
        self.saddle_width = bool(saddle_width)
        if self.saddle_width and not self.concentrate:
            raise ConfigError("u1-multiscale: saddle_width scales the concentration map; it needs concentrate")
        self.volume = vol
        self.branches = int(branches)
        if self.branches not in (1, 2):
            raise ConfigError(f"u1-multiscale: branches must be 1 or 2; found {branches!r}")
        if self.branches == 2 and (self.concentrate != "logistic" or init_beta is None or not centre):
            raise ConfigError(
                "u1-multiscale: branches = 2 needs concentrate = true (logistic), centre = true (the second "
                "branch sits half a turn from the share of W) and init_beta (the coupling of the branch "
                "weights' saddle-point estimate)"
            )
        self.branch_beta = float(init_beta) if init_beta is not None else 0.0
        n_out = 3 * self.n_bins + 2 + (1 if self.concentrate else 0) + (1 if self.branches == 2 else 0)
        self.net = MLP(2 * n_modes + 2, n_out, hidden, net_dtype(dtype), final_scale=init_scale)

    def _check(self, theta: torch.Tensor) -> None:
        if theta.ndim != 4 or tuple(theta.shape[1:]) != (2, *self.lattice) or theta.is_complex():
            raise ShapeError(
                f"U1MultiscaleCoupling: expected real angles of shape (B, 2, {self.lattice[0]}, "
                f"{self.lattice[1]}); found {theta.dtype} {tuple(theta.shape)}"
            )

    def _loops(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loop angles (unwrapped) of the T children and of the parents, each (B, n_blocks)."""
        plaq = gauge.u1_plaquettes(theta).flatten(1)
        b = plaq.shape[0]
        zero = plaq.new_zeros(b, self.n_blocks + 1)
        t = zero.index_add(1, self.t_of, plaq)[:, :-1]
        o = zero.index_add(1, self.o_of, plaq)[:, :-1]
        return t, t + o

    def _params(self, w: torch.Tensor, areas: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if areas is None:
            areas = self.areas
        mw = w[..., None] * self.modes
        feats = torch.cat([torch.cos(mw), torch.sin(mw), areas.to(w.dtype).expand(*w.shape, 2)], dim=-1)
        return self.net(feats).to(torch.float64), areas

    def _centre(self, w: torch.Tensor, areas: torch.Tensor) -> torch.Tensor:
        """Proportional share of the parent loop, (a_T / a_W) wrap(W), wrap(W) in (-pi, pi]."""
        ww = torch.remainder(w + math.pi, TWO_PI) - math.pi
        frac = areas[..., 0] / (areas[..., 0] + areas[..., 1])
        return frac * ww

    def _delta(
        self, x: torch.Tensor, w: torch.Tensor, areas: torch.Tensor | None = None, inverse: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Shift delta of the child loop (T' = T + delta) and log|dT'/dT| (forward) or the
        shift and log|dT/dT'| from T' (inverse). x, w: (..., n) float64."""
        p, areas = self._params(w, areas)
        rot = torch.atan2(p[..., -1], 1.0 + p[..., -2])
        raw = p[..., : 3 * self.n_bins]
        if not (self.centre or self.concentrate or self.shift == "spread"):
            x = torch.remainder(x, TWO_PI)
            y, ld = circular_rq_spline(x, raw, self.n_bins, rotation=rot, inverse=inverse)
            return (y - x if not inverse else x - y), ld
        cw = self._centre(w, areas) if self.centre else torch.zeros_like(w)
        wd, hd, dd = rq_spline_params(raw, self.n_bins, width=TWO_PI, height=TWO_PI, boundary="periodic")
        base = p[..., 3 * self.n_bins] + self.init_log_scale
        log_s = base
        a_w = (areas[..., 0] + areas[..., 1]) * self.volume
        ww = torch.remainder(w + math.pi, TWO_PI) - math.pi
        if self.saddle_width:
            # saddle point of exp(beta a_T cos(T/a_T) + beta a_O cos((W-T)/a_O)): the width of T given W
            # grows as cos(W/a_W)^(-1/2), the exact 1/sqrt(kappa) of a 1x2 block (flat at W = pi)
            log_s = base - 0.5 * torch.log(torch.cos(ww / a_w).clamp_min(1e-12))
        concentration = CONCENTRATIONS[self.concentrate] if self.concentrate else None
        if self.branches == 2:
            # the other winding of the parent, W - 2 pi sign(W): its branch sits half a turn away,
            # with the saddle-point weight exp(beta a_W cos(W_far / a_W)) against exp(beta a_W cos(W / a_W))
            w_far = ww - TWO_PI * torch.where(ww >= 0, 1.0, -1.0)
            log_t = base
            if self.saddle_width:
                log_t = base - 0.5 * torch.log(torch.cos(w_far / a_w).clamp_min(1e-12))
            logit = p[..., 3 * self.n_bins + 1] + self.branch_beta * a_w * (
                torch.cos(w_far / a_w) - torch.cos(ww / a_w)
            )

            def concentration(c: torch.Tensor, ls: torch.Tensor, inverse: bool = False) -> Any:
                return two_branch_icdf(c, ls, log_t, logit, inverse=inverse)

        if not inverse:
            xr = torch.remainder(x - cw + math.pi, TWO_PI) - math.pi  # (-pi, pi]
            v, ld1 = rq_spline(xr + math.pi, wd, hd, dd)  # [0, 2 pi], fixes the ends
            if concentration is not None:
                g, ld2 = concentration(v / TWO_PI, log_s)
                ld1 = ld1 + ld2 - math.log(TWO_PI)
            else:
                g = v - math.pi
            return rot + g - xr, ld1
        g = torch.remainder(x - cw - rot + math.pi, TWO_PI) - math.pi  # G(x_rel), (-pi, pi]
        if concentration is not None:
            u, ld2 = concentration(g, log_s, inverse=True)
            v = TWO_PI * u
            ld2 = ld2 + math.log(TWO_PI)
        else:
            v, ld2 = g + math.pi, torch.zeros_like(g)
        xr, ld1 = rq_spline(v, wd, hd, dd, inverse=True)
        xr = xr - math.pi
        return rot + g - xr, ld1 + ld2

    def conditional(
        self, x: torch.Tensor, w: torch.Tensor, areas: torch.Tensor | None = None, inverse: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The circular map of the child loop T given the parent loop W, T' = h(T | W).

        Arguments:
            x: Child loop angles T (T' for ``inverse``), shape (..., n), float64, any real
                values (reduced mod 2 pi).
            w: Parent loop angles W, broadcastable to ``x``.
            areas: Children's areas as fractions of the lattice, shape (..., n, 2)
                broadcastable to ``x`` (default: this level's blocks, (n_blocks, 2)).
            inverse: Evaluate h^{-1}.

        Returns:
            ``(y, log|dy/dx|)`` with y in [0, 2 pi), shape of ``x``, float64.
        """
        x, w = torch.broadcast_tensors(x.to(torch.float64), w.to(torch.float64))
        d, ld = self._delta(x, w, areas, inverse=inverse)
        return torch.remainder(x - d if inverse else x + d, TWO_PI), ld

    def _map(self, theta: torch.Tensor, inverse: bool, diag: bool = False) -> Any:
        self._check(theta)
        theta = theta.to(torch.float64)
        t, w = self._loops(theta)
        d, ld = self._delta(t, w, inverse=inverse)
        if inverse:
            d = -d
        flat = theta.flatten(1)
        if self.shift == "spread":
            moved = flat.index_add(1, self.spread_link, d[:, self.spread_blk] * self.spread_coef)
            out = flat.index_copy(1, self.spread_link, groups.wrap_angle(moved[:, self.spread_link])).view_as(theta)
        else:
            new = groups.wrap_angle(flat[:, self.link] + d)
            out = flat.index_copy(1, self.link, new).view_as(theta)
        logdet = ld.sum(1)
        if not diag:
            return out, logdet
        log_diag = flat.new_zeros(flat.shape).index_copy(1, self.link, ld).view_as(theta)
        updated = torch.zeros(flat.shape[1], dtype=torch.bool, device=flat.device)
        updated[self.link] = True
        return out, logdet, log_diag, updated.view(theta.shape[1:])

    def forward(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map theta -> theta'; returns ``(theta', log|det dtheta'/dtheta|)``."""
        return self._map(theta, inverse=False)

    @property
    def forward_diag(self) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None:
        """``forward_diag(theta) -> (theta', logdet, log_diag, updated)`` for fast path gradients,
        or ``None`` with ``shift = "spread"`` (the links of a block move together; path
        gradients then go through the inverse, :func:`flowplug.flow.has_forward_diag`).

        theta' (B, 2, L_0, L_1) and logdet (B,) float64 as :meth:`forward`; log_diag (like
        theta, float64) is log h'(T) on the designated links, 0 elsewhere; updated (bool,
        shape (2, L_0, L_1)) marks those links. A designated link depends on theta only
        through itself and links that are not designated at this level (the boundaries of
        its block's children) (:func:`flowplug.flow.path_gradient_loss`, arXiv:2403.15881).
        Raises ShapeError on an input of the wrong shape.
        """
        return self._forward_diag if self.shift == "link" else None

    def _forward_diag(self, theta: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._map(theta, inverse=False, diag=True)

    def inverse(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map theta' -> theta; returns ``(theta, log|det dtheta/dtheta'|)``."""
        return self._map(theta, inverse=True)


def _level_signature(layer: U1MultiscaleCoupling) -> tuple[int, int, int] | None:
    """(a_T, a_O, split direction) of the layer's blocks in plaquettes, or None if they differ."""
    vol = layer.lattice[0] * layer.lattice[1]
    a = torch.round(layer.areas * vol).to(torch.long)
    if not bool((a == a[0]).all()):
        return None
    hierarchy = block_hierarchy(layer.lattice)
    dirs = {s for _, s in hierarchy[layer.level]}
    if len(dirs) != 1:
        return None
    return int(a[0, 0]), int(a[0, 1]), dirs.pop()


def transfer_multiscale(src: Any, dst: Any) -> list[tuple[int, int]]:
    r"""Initialise the ``u1-multiscale`` layers of ``dst`` from a trained flow on another lattice.

    The exact conditional of a child loop T given its parent W depends only on the areas
    a_T, a_O (and the coupling), not on the lattice, and each level's conditioner is shared
    by all blocks of the level: a level of ``dst`` whose blocks have the same areas and split
    direction as a level of ``src`` takes that level's network (the k-th pass of a level
    from the k-th pass of the matching level). The conditioner also reads the areas as
    fractions of the lattice; the difference is folded into the first layer's bias, so the
    copied level computes the same map T' = h(T | W) as the source (tested). The fold also
    absorbs a different ``init_beta``. Levels without a match (coarser blocks than ``src``
    has, or blocks of mixed areas) keep their initialisation. The source's whole-lattice
    level saw only W = 0 (the product of all plaquettes is 1 on the torus), so the level it
    initialises has to learn the other W (at beta = 6 that conditional is nearly uniform).

    Arguments:
        src: A :class:`~flowplug.flow.Flow`, or a run directory / checkpoint file
            (read with :func:`flowplug.checkpoints.load_flow`).
        dst: The flow to initialise (its ``u1-multiscale`` layers must have the same
            ``hidden``, ``n_bins``, ``n_modes`` and options as the source's).

    Returns:
        ``(dst_layer_index, src_layer_index)`` of every copied layer.

    Raises:
        ConfigError: if the architectures of matched levels differ.
    """
    if not hasattr(src, "layers"):
        from flowplug.checkpoints import load_flow

        src = load_flow(src).flow
    src_by_sig: dict[tuple[int, int, int], list[int]] = {}
    for i, layer in enumerate(src.layers):
        if isinstance(layer, U1MultiscaleCoupling):
            sig = _level_signature(layer)
            if sig is not None:
                src_by_sig.setdefault(sig, []).append(i)
    seen: dict[tuple[int, int, int], int] = {}
    copied = []
    for j, layer in enumerate(dst.layers):
        if not isinstance(layer, U1MultiscaleCoupling):
            continue
        sig = _level_signature(layer)
        if sig is None or sig not in src_by_sig:
            continue
        k = seen.get(sig, 0)
        seen[sig] = k + 1
        cands = src_by_sig[sig]
        if k >= len(cands):
            continue
        s_layer = src.layers[cands[k]]
        if (
            s_layer.n_bins,
            s_layer.concentrate,
            s_layer.saddle_width,
            s_layer.branches,
            s_layer.branch_beta if s_layer.branches == 2 else None,
            s_layer.centre,
            s_layer.shift,
            len(s_layer.modes),
        ) != (
            layer.n_bins,
            layer.concentrate,
            layer.saddle_width,
            layer.branches,
            layer.branch_beta if layer.branches == 2 else None,
            layer.centre,
            layer.shift,
            len(layer.modes),
        ):
            raise ConfigError(
                f"transfer_multiscale: level {layer.level} of the target and level {s_layer.level} of "
                "the source differ in n_bins, n_modes, concentrate, saddle_width, branches (and their init_beta), "
                "centre or shift"
            )
        state = {k2: v.clone() for k2, v in s_layer.net.state_dict().items()}
        try:
            layer.net.load_state_dict(state)
        except RuntimeError as exc:
            raise ConfigError(
                f"transfer_multiscale: conditioner of level {layer.level} does not match the "
                f"source's ({exc}); use the same hidden widths"
            ) from None
        first, last = layer.net.layers[0], layer.net.layers[-1]
        assert isinstance(first, nn.Linear) and isinstance(last, nn.Linear)
        with torch.no_grad():
            d_area = (s_layer.areas[0] - layer.areas[0]).to(first.weight.dtype)
            first.bias.add_(first.weight[:, -2:] @ d_area)
            if layer.concentrate:
                last.bias[3 * layer.n_bins] += s_layer.init_log_scale - layer.init_log_scale
        copied.append((j, cands[k]))
    return copied
