r"""Gauge-equivariant coupling layers for U(1) and SU(N) link fields, in any dimension d >= 2.

Masking pattern (layer ``index``)
    Links U_mu(x) in direction mu = index mod d are updated on the sites of a stripe
    S = {x : x_nu = offset (mod p)} with nu != mu, p = 4 (or 2 when L_nu is not a
    multiple of 4). Each updated link is the first factor of its *active loop*
    P(x) = U_mu(x) U_nu(x+mu) U_mu(x+nu)^+ U_nu(x)^+, whose other three links are not
    updated (x + nu is never in S). Plaquettes (of every plane) that contain no
    updated link are *frozen*; gauge-invariant features of them (cos/sin of the angle,
    or Re/Im tr P / N) are the input of a periodic convolutional conditioner. The
    remaining plaquettes that contain an updated link are *passive*: they change, but
    nothing is conditioned on them. Optionally (``rectangles``) the conditioner also
    sees the 1x2 loops P(x) P(x - nu) of the (mu, nu) plane wherever neither of their
    long-side links U_mu(x -/+ nu) is updated; on S such a loop encloses the updated
    link, so it is frozen although both of its plaquettes change.

Update
    P(x) -> P'(x) = h(P(x) | frozen features) with h conjugation-equivariant (a circular
    map of the plaquette angle for U(1); the spectral map of :mod:`flowplug.plugins.flow_sun`
    for SU(N)), and U_mu'(x) = P'(x) P(x)^+ U_mu(x) (for U(1): theta' = theta + P' - P).
    Since U_mu(x) -> P(x) is a right multiplication by links that do not change, its
    Jacobian is one, and log|det| is the sum of log-Jacobians of h over the active loops.
    Under a gauge transformation Omega, P(x) -> Omega(x) P(x) Omega(x)^+ and the frozen
    features are invariant, so U' transforms as U does: the layer is gauge equivariant.

The schedule mu = index mod d, offset = (index div d) mod p, nu = mu + 1 + ((index div 4d)
mod (d-1)) (mod d) reproduces the 2D pattern of Kanwar et al. (updates alternate
directions; the stripe moves by one site every d layers).

References:
    Kanwar et al., arXiv:2003.06413, sections III-IV (U(1), masks, NCP mixtures);
    Boyda et al., arXiv:2008.05456, section IV (SU(N)); Albergo et al.,
    arXiv:2101.08176, section IV (tutorial conventions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from flowplug import gauge, groups
from flowplug.errors import CheckpointError, ConfigError, ShapeError
from flowplug.plugins.flow_nets import (
    ConvNet,
    gathered_input,
    net_dtype,
    run_stack,
    stack_backward,
    stack_forward,
    will_compute,
)
from flowplug.plugins.flow_sun import SPECTRAL_MAP_VERSION, n_spectral_params, spectral_map
from flowplug.plugins.flow_transforms import (
    circular_rq_spline,
    ncp_mixture,
    ncp_mixture_backward,
    ncp_mixture_saved,
)
from flowplug.theory import su_n

TWO_PI = 2.0 * math.pi


class GaugeMasks:
    """Masks of one gauge coupling layer (module docstring).

    Arguments:
        lattice: (L_0, ..., L_{d-1}), d >= 2.
        index: Layer index (sets mu, nu, offset unless given).
        mu, nu, offset: Explicit choices overriding the schedule.
        period: Stripe period p, 2 or 4 (default 4 when it divides L_nu, else 2). With
            p = 2 no plaquette of the (mu, nu) plane is frozen; use it with
            ``rectangles``.

    Attributes:
        mu, nu, offset, period: The pattern.
        sites: Bool (L...), True on the stripe S of updated links U_mu(x).
        frozen: Bool (d(d-1)/2, L...), True for plaquettes with no updated link, planes
            ordered as :func:`flowplug.gauge.u1_plaquettes`.

    Raises:
        ConfigError: for d < 2, a stripe pattern that would update two links of one
            active loop (odd L_nu), or a period other than 2 or 4 or not dividing L_nu.
    """

    def __init__(
        self,
        lattice: Sequence[int],
        index: int = 0,
        *,
        mu: int | None = None,
        nu: int | None = None,
        offset: int | None = None,
        period: int | None = None,
    ) -> None:
        lat = tuple(int(v) for v in lattice)
        d = len(lat)
        if d < 2:
            raise ConfigError(f"gauge coupling layers need d >= 2; found lattice {list(lattice)}")
        self.mu = int(index % d if mu is None else mu) % d
        if nu is None:
            nu = (self.mu + 1 + (index // (4 * d)) % (d - 1)) % d
        self.nu = int(nu) % d
        if self.nu == self.mu:
            raise ConfigError(f"gauge masks need nu != mu; found mu = nu = {self.mu}")
        ln = lat[self.nu]
        if ln % 2:
            raise ConfigError(f"gauge masks need an even extent along direction {self.nu}; found lattice {list(lat)}")
        if period is None:
            self.period = 4 if ln % 4 == 0 else 2
        elif isinstance(period, int) and not isinstance(period, bool) and period in (2, 4) and ln % period == 0:
            self.period = period
        else:
            raise ConfigError(
                f"gauge mask period must be 2 or 4 and divide the extent {ln} along direction {self.nu}; found {period}"
            )
        self.offset = int((index // d) if offset is None else offset) % self.period
        coords = torch.meshgrid(*[torch.arange(n) for n in lat], indexing="ij")
        self.sites = (coords[self.nu] % self.period) == self.offset
        links = torch.zeros((d, *lat), dtype=torch.bool)
        links[self.mu] = self.sites
        frozen = []
        for a in range(d):
            for b in range(a + 1, d):
                touched = links[a] | torch.roll(links[b], -1, dims=a) | torch.roll(links[a], -1, dims=b) | links[b]
                frozen.append(~touched)
        self.frozen = torch.stack(frozen)
        self.lattice = lat


def _u1_loop(theta: torch.Tensor, mu: int, nu: int) -> torch.Tensor:
    """Angle of U_mu(x) U_nu(x+mu) U_mu(x+nu)^+ U_nu(x)^+, shape (B, L...), unwrapped."""
    t_mu, t_nu = theta[:, mu], theta[:, nu]
    return t_mu + torch.roll(t_nu, -1, dims=1 + mu) - torch.roll(t_mu, -1, dims=1 + nu) - t_nu


def _plane_index(d: int, mu: int, nu: int) -> int:
    """Position of the plane (mu, nu), mu < nu, in the ordering of :func:`flowplug.gauge.u1_plaquettes`."""
    return sum(d - 1 - a for a in range(mu)) + (nu - mu - 1)


def _sun_loop(links: torch.Tensor, mu: int, nu: int) -> torch.Tensor:
    """U_mu(x) U_nu(x+mu) U_mu(x+nu)^+ U_nu(x)^+, shape (B, L..., N, N)."""
    u_mu, u_nu = links[:, mu], links[:, nu]
    return u_mu @ torch.roll(u_nu, -1, dims=1 + mu) @ torch.roll(u_mu, -1, dims=1 + nu).mH @ u_nu.mH


class _GaugeCoupling(nn.Module):
    """Masks, conditioner network and shape checks shared by the gauge couplings."""

    # buffers (registered in __init__; declared for the type checker)
    sites: torch.Tensor
    frozen: torch.Tensor
    rect_frozen: torch.Tensor  # with rectangles only

    def __init__(
        self,
        lattice: Sequence[int],
        index: int,
        n_params: int,
        hidden: Sequence[int],
        kernel_size: int,
        dtype: str,
        mu: int | None,
        nu: int | None,
        offset: int | None,
        init_scale: float = 0.0,
        rectangles: bool = False,
        period: int | None = None,
    ) -> None:
        super().__init__()
        masks = GaugeMasks(lattice, index, mu=mu, nu=nu, offset=offset, period=period)
        self.rectangles = bool(rectangles)
        self.lattice = masks.lattice
        self.d = len(self.lattice)
        if self.d > 4:
            raise ConfigError(f"gauge coupling layers support d = 2..4; found lattice {list(lattice)}")
        self.mu, self.nu, self.offset, self.period = masks.mu, masks.nu, masks.offset, masks.period
        self.register_buffer("sites", masks.sites)
        self.register_buffer("frozen", masks.frozen.to(torch.float64))
        # 1x2 loops R(x) = P(x) P(x - nu) in the (mu, nu) plane: frozen when neither
        # U_mu(x - nu) nor U_mu(x + nu) is updated (U_mu(x) is interior and cancels)
        if self.rectangles:
            ax = self.nu
            rect = ~torch.roll(masks.sites, 1, dims=ax) & ~torch.roll(masks.sites, -1, dims=ax)
            self.register_buffer("rect_frozen", rect.to(torch.float64))
        n_planes = self.d * (self.d - 1) // 2
        self.n_params = n_params
        n_in = 2 * n_planes + (2 if self.rectangles else 0)
        self.net = ConvNet(n_in, n_params, hidden, kernel_size, self.d, net_dtype(dtype), final_scale=init_scale)

    def _condition(
        self,
        re: torch.Tensor,
        im: torch.Tensor,
        rect: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        stripe: bool = False,
        sites: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Network output (B, L..., n_params), float64, from per-plane features (B, np, L...)
        and, with ``rectangles``, the (re, im) features (B, L...) of the 1x2 loops. With
        ``stripe`` the last convolution runs on the updated sites only (coordinate ``offset``
        modulo ``period`` along ``nu``): the output is (B, L..., n_params) with L_nu / period
        entries along nu, its sites flattened in the order of ``sites.nonzero()``. With
        ``sites`` (flat row-major site indices, long, shape (n,); d <= 3) the output is
        (B, n, n_params), the network's output at those sites only
        (:meth:`~flowplug.plugins.flow_nets.ConvNet.forward_at`, same values up to float
        rounding)."""
        frozen = self.frozen.to(re.dtype)  # masks of 0 and 1: exact in any precision
        parts = [re * frozen, im * frozen]
        if self.rectangles:
            assert rect is not None
            parts += [(rect[0] * self.rect_frozen).unsqueeze(1), (rect[1] * self.rect_frozen).unsqueeze(1)]
        feats = torch.cat(parts, dim=1)
        if sites is not None:
            return self.net.forward_at(feats, sites).to(torch.float64)
        out_sites = (self.nu, self.offset, self.period) if stripe else None
        return torch.movedim(self.net(feats, out_sites).to(torch.float64), 1, -1)


class _U1NCPMap(torch.autograd.Function):
    """The forward map of :class:`U1Coupling` with NCP mixtures (d <= 3, no rectangles) as one
    autograd node (training steps).

    ``apply(theta, spec, *params) -> (theta', log h'(x), log-det)``: theta (B, d, L...) float64; spec
    ``(mu, nu, plane, idx, links, loop_terms, fsites, fmask, plan, slope, dtype, n_mix)`` (the
    layer's pattern: ``plane`` the index of the active loop among the plaquettes or ``None`` when
    mu > nu, the updated sites and links as flat indices, for mu > nu the four links of the
    active loop at each updated site (:meth:`U1Coupling._loop_terms`, else ``None``: the loop is
    evaluated there only, by the sum of :func:`_u1_loop`), the sites of frozen plaquettes and
    the frozen mask there from :meth:`U1Coupling._frozen_inputs`, the network's
    :meth:`~flowplug.plugins.flow_nets.ConvNet.gathered_stack` with those sites as its
    ``inputs``, and its dtype, M); params the network's weights and biases. Returns theta' like
    theta, the log-derivative of the mixture on the updated sites, (B, n) float64, and its sum
    over them, (B,) (``.sum(1)``, returned by the node so that a training step records no
    summation node after it). The
    forward pass evaluates exactly the operations of the generic path of :meth:`U1Coupling._map`
    (the same numbers, bit for bit; the network reads the frozen plaquettes only,
    :func:`_u1_frozen_features`); the backward pass is written out: the link update, the mixture
    (:func:`~flowplug.plugins.flow_transforms.ncp_mixture_backward`), the network
    (:func:`~flowplug.plugins.flow_nets.stack_backward`), the cos/sin features of the frozen
    plaquettes and the plaquettes themselves (the adjoint of theta -> P: for the plane (a, b),
    g_a += g_P - g_P(x - b), g_b += g_P(x - a) - g_P). First order only.
    """

    @staticmethod
    def forward(
        ctx: Any, theta: torch.Tensor, spec: Any, *params: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, nu, plane, idx, links, loop_terms, fsites, fmask, plan, slope, dtype, n_mix = spec
        plaq = gauge.u1_plaquettes(theta)
        flat = theta.flatten(1)
        if plane is not None:  # the active loop is a plaquette: its updated link is read apart
            loop = plaq[:, plane].flatten(1).index_select(1, idx)
            link = flat.index_select(1, links)
        else:  # mu > nu: the loop's four links at the updated sites only, the first the updated link
            terms = flat.index_select(1, loop_terms).view(theta.shape[0], 4, -1)
            link = terms[:, 0]
            loop = link + terms[:, 1] - terms[:, 2] - terms[:, 3]  # _u1_loop's sum, term for term
        cp, sp, h = _u1_frozen_features(plaq, fsites, fmask, dtype)  # as U1Coupling._network_at
        out, saved = stack_forward(h, plan, slope, params)  # (n_params, n, B)
        # (n_params, B, n): the mixture-first layout of ncp_mixture_saved, each parameter contiguous
        p = _dense(out.transpose(1, 2), torch.float64)
        x = torch.remainder(loop, TWO_PI)
        # 5.0: the max_log_scale that the generic path's ncp_mixture call takes by default
        y, ld, mix = ncp_mixture_saved(5.0, x, p[:n_mix], p[n_mix : 2 * n_mix], p[-1])
        new = groups.wrap_angle(link + (y - x))
        ctx.save_for_backward(cp, sp, *saved, *mix, *params)
        ctx.spec, ctx.n_saved, ctx.n_mix_saved, ctx.shape = spec, len(saved), len(mix), theta.shape
        return flat.index_copy(1, links, new).view_as(theta), ld, ld.sum(1)

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, g_out: torch.Tensor | None, g_ld: torch.Tensor | None, g_sum: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        mu, nu, plane, idx, links, _, fsites, fmask, plan, slope, dtype, n_mix = ctx.spec
        cp, sp, *rest = ctx.saved_tensors  # (B, planes, m): on the sites of fsites
        saved = rest[: ctx.n_saved]
        mix = tuple(rest[ctx.n_saved : ctx.n_saved + ctx.n_mix_saved])
        params = rest[ctx.n_saved + ctx.n_mix_saved :]
        shape = ctx.shape
        b = shape[0]
        g_flat = g_out.reshape(b, -1) if g_out is not None else cp.new_zeros(b, math.prod(shape[1:]))
        g_new = g_flat.index_select(1, links)  # new = wrap(theta_links + y - x): derivative 1 in each
        if g_sum is not None:  # the log-det is the sum of log h' over the updated sites
            g_ld = g_sum.unsqueeze(1) if g_ld is None else g_ld + g_sum.unsqueeze(1)
        g_x, g_ls, g_lg, g_rot = ncp_mixture_backward(mix, g_new, g_ld)
        g_x = g_x - g_new
        g_p = torch.cat([g_ls, g_lg, g_rot.unsqueeze(0)])  # (n_params, B, n)
        flags = will_compute(ctx, [0, *range(2, 2 + len(params))])
        # (n_params, n, B); stack_backward makes it contiguous where the dtype already was (a
        # batched gradient, vmapped, cannot be copied into a fresh plain tensor)
        g_p = g_p.transpose(1, 2).to(dtype, memory_format=torch.contiguous_format)
        g_h, grads = stack_backward(g_p, plan, slope, params, saved, flags[1:], flags[0])
        g_theta = None
        if flags[0]:
            n_planes = cp.shape[1]
            g_dirs = list(g_flat.view(shape).unbind(1))  # per direction, (B, L...)
            assert g_h is not None
            # (B, 2 planes, m): the features' gradient on the sites of fsites (the only input rows)
            g_feats = g_h.permute(2, 0, 1).to(torch.float64, memory_format=torch.contiguous_format)
            g_pf = cp * g_feats[:, n_planes:] - sp * g_feats[:, :n_planes]
            if fmask is not None:
                g_pf = fmask * g_pf
            g_plaq = cp.new_zeros(b, n_planes, math.prod(shape[2:])).index_copy(2, fsites, g_pf)
            d = shape[1]
            # the active loop's gradient joins that of its plane's plaquette: with mu > nu the loop is
            # the plaquette of the plane (nu, mu) traversed backwards, and _u1_loop_adjoint of g for
            # (mu, nu) adds, term for term, what that of -g for (nu, mu) adds
            k_loop = plane if plane is not None else _plane_index(d, nu, mu)
            g_loop = g_x if plane is not None else -g_x
            k = 0
            for a in range(d):
                for c in range(a + 1, d):
                    g_p_ac = g_plaq[:, k]
                    if k == k_loop:
                        g_p_ac = g_p_ac.index_add(1, idx, g_loop)
                    _u1_loop_adjoint(g_dirs, g_p_ac.view(b, *shape[2:]), a, c)
                    k += 1
            g_theta = torch.stack(g_dirs, dim=1)
        return (g_theta, None, *grads)


def _dense(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous copy of ``t`` in ``dtype`` (one pass; ``Tensor.to(dtype, memory_format=
    torch.contiguous_format)`` returns a non-contiguous ``t`` itself when ``dtype`` is its own)."""
    return torch.empty(t.shape, dtype=dtype, device=t.device).copy_(t)


def _u1_frozen_features(
    plaq: torch.Tensor, fsites: torch.Tensor, fmask: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The conditioner input of a U(1) coupling on the sites of frozen plaquettes.

    Arguments:
        plaq: Plaquette angles (B, planes, L...) float64.
        fsites, fmask: From :meth:`U1Coupling._frozen_inputs`: m flat site indices and the
            frozen mask there, (planes, m) float64, or ``None`` where it is one everywhere.
        dtype: The network dtype.

    Returns:
        ``(cp, sp, h)``: cos and sin of the plaquettes at those sites, (B, planes, m) float64,
        and the network input (2 planes, m + 1, B) in ``dtype``: the features of
        :meth:`_GaugeCoupling._condition` (cos, then sin, of each plane times its mask) at the m
        sites, then the zero row (:func:`~flowplug.plugins.flow_nets.gathered_input`).
        Differentiable.
    """
    pf = plaq.flatten(2).index_select(2, fsites)
    cp, sp = torch.cos(pf), torch.sin(pf)
    if fmask is None:  # every plaquette at those sites frozen (one plane): no mask to apply
        return cp, sp, gathered_input(torch.cat([cp, sp], 1), dtype)
    return cp, sp, gathered_input(torch.cat([cp * fmask, sp * fmask], 1), dtype)


def _u1_loop_adjoint(g_dirs: list[torch.Tensor], g_loop: torch.Tensor, mu: int, nu: int) -> None:
    """Add to the per-direction gradients g_dirs[a] (B, L...) the gradient of sum(g_loop * loop)
    with loop = :func:`_u1_loop`: g_mu += g - g(x - nu), g_nu += g(x - mu) - g. The list's
    entries are replaced (out of place), so that a batched g_loop (a vmapped backward pass:
    ``is_grads_batched``, Jacobians with ``vectorize=True``) can be added to plain entries."""
    g_dirs[mu] = g_dirs[mu] + (g_loop - torch.roll(g_loop, 1, dims=1 + nu))
    g_dirs[nu] = g_dirs[nu] + (torch.roll(g_loop, 1, dims=1 + mu) - g_loop)


class U1Coupling(_GaugeCoupling):
    r"""Gauge-equivariant coupling for U(1) link angles (Kanwar et al. 2003.06413).

    The active plaquette angle, taken in [0, 2 pi), goes through a circular transform
    conditioned on cos and sin of the frozen plaquettes: a mixture of ``n_mix``
    non-compact projections (``transform="ncp"``) or a circular rational-quadratic
    spline with ``n_bins`` bins (``transform="spline"``), each followed by a learned
    rotation; the link angle is shifted by the change of the plaquette angle.

    Arguments:
        lattice: (L_0, ..., L_{d-1}), d = 2..4, even extents.
        field: Must be ``"u1"``.
        index: Position in the flow (masking schedule, see the module docstring).
        transform: ``"ncp"`` or ``"spline"``.
        hidden: Hidden channels of the conditioner, default ``(8, 8)``.
        kernel_size: Odd kernel extent, default 3.
        n_mix: NCP mixture components, default 2.
        n_bins: Spline bins, default 8.
        dtype: Conditioner dtype (``"float32"`` or ``"float64"``).
        mu, nu, offset, period: Override the masking schedule (:class:`GaugeMasks`).
        init_scale: Scale of the network's initial output layer; 0 starts the layer as
            the identity. Default 1 for ``ncp`` (identical zero-initialised mixture
            components would receive identical gradients for ever), 0 for ``spline``.
        rectangles: Also feed cos and sin of the 1x2 loops R(x) = P(x) P(x - nu) of
            the (mu, nu) plane to the conditioner, where they are frozen (on the
            updated sites the updated link is interior to R, so R is unchanged by the
            layer). The active and passive plaquettes of an updated link share R, so the
            layer can transform the active plaquette conditionally on their product.
            (Frozen loops larger than plaquettes as conditioner inputs: Abbott et al.,
            arXiv:2305.02402.) Default ``False``.

    ``forward(theta) -> (theta', logdet)``, ``inverse(theta') -> (theta, logdet_inv)``:
    angles of shape (B, d, L_0, ..., L_{d-1}) float64 (outputs wrapped into (-pi, pi] on
    the updated links), logdet shape (B,) float64.

    Raises:
        ConfigError: on a bad field kind, transform or lattice.
        ShapeError: on an input of the wrong shape.
    """

    def __init__(
        self,
        *,
        lattice: Sequence[int],
        field: str = "u1",
        index: int = 0,
        transform: str = "ncp",
        hidden: Sequence[int] = (8, 8),
        kernel_size: int = 3,
        n_mix: int = 2,
        n_bins: int = 8,
        dtype: str = "float32",
        mu: int | None = None,
        nu: int | None = None,
        offset: int | None = None,
        init_scale: float | None = None,
        rectangles: bool = False,
        period: int | None = None,
    ) -> None:
        if field != "u1":
            raise ConfigError(f"U(1) coupling acts on u1 links; found field kind '{field}'")
        if transform not in ("ncp", "spline"):
            raise ConfigError(f"U(1) coupling: transform must be 'ncp' or 'spline'; found {transform!r}")
        self.transform = transform
        self.n_mix, self.n_bins = int(n_mix), int(n_bins)
        if self.n_mix < 1 or self.n_bins < 1:
            raise ConfigError(
                f"U(1) coupling needs n_mix >= 1 and n_bins >= 1; found n_mix = {n_mix}, n_bins = {n_bins}"
            )
        n_params = (2 * self.n_mix if transform == "ncp" else 3 * self.n_bins) + 1
        if init_scale is None:
            init_scale = 1.0 if transform == "ncp" else 0.0
        super().__init__(
            lattice, index, n_params, hidden, kernel_size, dtype, mu, nu, offset, init_scale, rectangles, period
        )

    def _check(self, theta: torch.Tensor) -> None:
        if tuple(theta.shape[1:]) != (self.d, *self.lattice) or theta.is_complex():
            raise ShapeError(
                f"U1Coupling: expected real angles of shape (B, {self.d}, "
                f"{', '.join(map(str, self.lattice))}); found {theta.dtype} {tuple(theta.shape)}"
            )

    def _links_index(self) -> torch.Tensor:
        """Flat indices (long) of the updated links U_mu(x) in the flattened (d, L...) field."""
        idx = self._site_index()
        links = self.__dict__.get("_links_flat")
        if links is None or links.device != idx.device:
            links = idx + self.mu * math.prod(self.lattice)
            self.__dict__["_links_flat"] = links
        return links

    def _fused(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(theta', log h', log-det)`` of the forward map through :class:`_U1NCPMap` when a
        gradient will be taken (NCP mixtures, d <= 3, no rectangles, the gathered network); else
        ``None``."""
        if not torch.is_grad_enabled() or self.transform != "ncp" or self.rectangles or self.d > 3:
            return None
        idx = self._site_index()
        fsites, fmask = self._frozen_inputs()
        stack = self.net.gathered_stack(self.lattice, theta.device, idx, grad_of=theta, inputs=fsites)
        if stack is None:
            return None
        plan, slope, params = stack
        plane = _plane_index(self.d, self.mu, self.nu) if self.mu < self.nu else None
        links = self._links_index()
        terms = None if plane is not None else self._loop_terms()
        dtype = params[0].dtype  # the network's dtype (its first weight's), without the property's module walk
        spec = (self.mu, self.nu, plane, idx, links, terms, fsites, fmask, plan, slope, dtype, self.n_mix)
        out, ld, logdet = _U1NCPMap.apply(theta, spec, *params)
        return out, ld, logdet

    def _frozen_inputs(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(fsites, fmask)``: flat indices (long, shape (m,)) of the sites where the plaquette of
        some plane is frozen, the only sites where the conditioner's input can be non-zero, and
        the frozen mask there, (planes, m) float64, or ``None`` when it is one everywhere (in 2D,
        one plane: multiplying by it would change nothing) (cached per device)."""
        cached = self.__dict__.get("_frozen_in")
        if cached is None or cached[0].device != self.frozen.device:
            mask = self.frozen.flatten(1)
            fsites = (mask > 0).any(0).nonzero().flatten()
            fmask = mask.index_select(1, fsites)
            cached = (fsites, None if bool((fmask == 1).all()) else fmask)
            self.__dict__["_frozen_in"] = cached
        return cached

    def _loop_terms(self) -> torch.Tensor:
        """Flat indices (long, shape (4 n,)) into the flattened (d, L...) field of the four links of
        the active loop :func:`_u1_loop` at each updated site (in the order of
        :meth:`_site_index`), term by term: U_mu(x), U_nu(x + mu), U_mu(x + nu), U_nu(x); the
        first block are the updated links themselves (cached per device)."""
        cached = self.__dict__.get("_loop_terms_flat")
        idx = self._site_index()
        if cached is None or cached.device != idx.device:
            vol = math.prod(self.lattice)
            sites = torch.arange(vol).view(self.lattice)

            def at(direction: int, shift: int) -> torch.Tensor:  # flat index of U_direction(x + e_shift)
                moved = sites if shift < 0 else torch.roll(sites, -1, dims=shift)
                return direction * vol + moved.flatten().index_select(0, idx.cpu())

            mu, nu = self.mu, self.nu
            cached = torch.cat([at(mu, -1), at(nu, mu), at(mu, nu), at(nu, -1)]).to(idx.device)
            self.__dict__["_loop_terms_flat"] = cached
        return cached

    def _network_at(self, plaq: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Conditioner output (B, n, n_params) float64 at the updated sites ``idx`` from the
        plaquettes (B, planes, L...) (d <= 3, no rectangles): the network of
        :meth:`_GaugeCoupling._condition` on the cos/sin features of the frozen plaquettes, read
        on the sites of frozen plaquettes only (``gathered_stack`` with ``inputs``, the features
        being zero elsewhere), as the fused node :class:`_U1NCPMap` does, so that both evaluate
        the same products, forward and backward; without the gathered form of the network,
        :meth:`_GaugeCoupling._condition` itself. Same values, for finite angles, as the
        features times the mask over all sites (the network never sees a non-frozen plaquette,
        so a non-finite angle there does not reach it)."""
        fsites, fmask = self._frozen_inputs()
        stack = self.net.gathered_stack(self.lattice, plaq.device, idx, inputs=fsites)
        if stack is None:
            return self._condition(torch.cos(plaq), torch.sin(plaq), sites=idx)
        plan, slope, params = stack
        h = _u1_frozen_features(plaq, fsites, fmask, self.net.dtype)[2]
        return run_stack(h, plan, slope, params).permute(2, 1, 0).to(torch.float64)

    def _map(self, theta: torch.Tensor, inverse: bool, diag: bool = False):
        self._check(theta)
        theta = theta.to(torch.float64)
        fused = None if inverse else self._fused(theta)
        if fused is not None:
            out, ld, logdet = fused
            if not diag:
                return out, logdet
            log_diag = out.new_zeros(out.shape[0], out[0].numel()).index_copy(1, self._links_index(), ld)
            updated = torch.zeros(out.shape[1:], dtype=torch.bool, device=out.device)
            updated[self.mu] = self.sites
            return out, logdet, log_diag.view_as(out), updated
        plaq = gauge.u1_plaquettes(theta)
        if self.mu < self.nu:  # the (mu, nu) plane of plaq is the active loop, term for term
            loop = plaq[:, _plane_index(self.d, self.mu, self.nu)]
        else:
            loop = _u1_loop(theta, self.mu, self.nu)
        rect = None
        if self.rectangles:
            r = loop + torch.roll(loop, 1, dims=1 + self.nu)
            rect = (torch.cos(r), torch.sin(r))
        # the circular transform runs on the updated sites only (a quarter or half of them)
        idx = self._site_index()
        if self.d <= 3 and rect is None:  # (B, n, n_params), the network's inputs on the frozen plaquettes
            p = self._network_at(plaq, idx)
        elif self.d <= 3:  # (B, n, n_params), the network's last convolution on the updated sites only
            p = self._condition(torch.cos(plaq), torch.sin(plaq), rect, sites=idx)
        else:  # (B, n, n_params), parameters as the slow axis in memory (fast reductions over a mixture)
            p = self._condition(torch.cos(plaq), torch.sin(plaq), rect)
            p = p.movedim(-1, 1).flatten(2).index_select(2, idx).transpose(1, 2)
        x = torch.remainder(loop.flatten(1).index_select(1, idx), TWO_PI)  # (B, n)
        rot = p[..., -1]
        if self.transform == "ncp":
            m = self.n_mix
            y, ld = ncp_mixture(x, p[..., :m], p[..., m : 2 * m], rot, inverse=inverse)
        else:
            y, ld = circular_rq_spline(x, p[..., :-1], self.n_bins, rotation=rot, inverse=inverse)
        # the updated links U_mu(x), x in the stripe, as flat indices of the (d, L...) field: one
        # index_copy into the whole field (no per-direction copies and stacking)
        links = self._links_index()
        flat = theta.flatten(1)
        new = groups.wrap_angle(flat.index_select(1, links) + (y - x))
        out = flat.index_copy(1, links, new).view_as(theta)
        logdet = ld.sum(1)
        if not diag:
            return out, logdet
        log_diag = torch.zeros_like(flat).index_copy(1, links, ld).view_as(theta)
        updated = torch.zeros(out.shape[1:], dtype=torch.bool, device=out.device)
        updated[self.mu] = self.sites
        return out, logdet, log_diag, updated

    def _site_index(self) -> torch.Tensor:
        """Flat indices (long, on the layer's device) of the sites whose link U_mu is updated."""
        idx = getattr(self, "_sites_flat", None)
        if idx is None or idx.device != self.sites.device:
            idx = self.sites.flatten().nonzero().flatten()
            self._sites_flat = idx
        return idx

    def forward(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map theta -> theta'; returns ``(theta', log|det dtheta'/dtheta|)``."""
        return self._map(theta, inverse=False)

    def forward_diag(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(theta', logdet, log_diag, updated)`` for fast path gradients.

        theta' (B, d, L...) and logdet (B,) float64 as :meth:`forward`; log_diag (like
        theta, float64) is log dtheta'_i/dtheta_i = log h'(P) on the updated links, 0
        elsewhere; updated (bool, shape (d, L...)) marks those links. An updated link
        depends on theta only through itself and links that are not updated (its active
        loop's other links, the frozen plaquettes and, with ``rectangles``, the frozen
        1x2 loops) (:func:`flowplug.flow.path_gradient_loss`, arXiv:2403.15881).

        Raises:
            ShapeError: on an input of the wrong shape.
        """
        return self._map(theta, inverse=False, diag=True)

    def inverse(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map theta' -> theta; returns ``(theta, log|det dtheta/dtheta'|)``."""
        return self._map(theta, inverse=True)


class _SUNCoupling(_GaugeCoupling):
    """What the SU(N) couplings share: the group from the field kind, the input check, and
    ``forward``/``inverse`` through the subclass's ``_map(u, inverse)``."""

    n: int

    @staticmethod
    def _group(field: str, what: str) -> int:
        """N of an ``su<N>`` field kind; ConfigError naming the layer ``what`` otherwise."""
        n = su_n(field)
        if n is None:
            raise ConfigError(f"{what} acts on su<N> links; found field kind '{field}'")
        return n

    def _map(self, u: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _check(self, u: torch.Tensor) -> None:
        if tuple(u.shape[1:]) != (self.d, *self.lattice, self.n, self.n) or not u.is_complex():
            raise ShapeError(
                f"{type(self).__name__}: expected complex links of shape (B, {self.d}, "
                f"{', '.join(map(str, self.lattice))}, {self.n}, {self.n}); "
                f"found {u.dtype} {tuple(u.shape)}"
            )

    def forward(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map U -> U'; returns ``(U', log|det dU'/dU|)`` relative to Haar measure."""
        return self._map(u, inverse=False)

    def inverse(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map U' -> U; returns ``(U, log|det dU/dU'|)`` relative to Haar measure."""
        return self._map(u, inverse=True)


class SUNSpectralCoupling(_SUNCoupling):
    r"""Gauge-equivariant coupling for SU(N) links through the spectrum of the active loops.

    The active loops go through the conjugation-equivariant spectral spline map of
    :func:`flowplug.plugins.flow_sun.spectral_map`, conditioned on Re tr P / N and
    Im tr P / N of the frozen plaquettes; U_mu'(x) = P'(x) P(x)^+ U_mu(x). The
    log-determinant is relative to the product Haar measure (Boyda et al.
    2008.05456, section IV).

    Arguments:
        lattice: (L_0, ..., L_{d-1}), d = 2..4, even extents.
        field: ``"su2"``, ``"su3"`` (any ``"su<N>"``).
        index: Position in the flow (masking schedule).
        hidden: Hidden channels of the conditioner, default ``(8, 8)``.
        kernel_size: Odd kernel extent, default 3.
        n_bins: Spline bins per eigenphase coordinate, default 8.
        dtype: Conditioner dtype (``"float32"`` or ``"float64"``).
        mu, nu, offset, period: Override the masking schedule (:class:`GaugeMasks`).
        init_scale: Scale of the network's initial output layer; 0 (default) starts the
            layer as the identity.
        rectangles: Also feed Re and Im tr R / N of the frozen 1x2 loops
            R(x) = P(x - nu) U_nu(x - nu) P(x) U_nu(x - nu)^+ (see :class:`U1Coupling`).
            Default ``False``.

    ``forward(U) -> (U', logdet)``, ``inverse(U') -> (U, logdet_inv)``: links of shape
    (B, d, L_0, ..., L_{d-1}, N, N) complex128, logdet shape (B,) float64.

    Raises:
        ConfigError: on a bad field kind or lattice.
        ShapeError: on an input of the wrong shape.
    """

    site_index: torch.Tensor  # buffer: flat indices of the updated sites

    def __init__(
        self,
        *,
        lattice: Sequence[int],
        field: str = "su3",
        index: int = 0,
        hidden: Sequence[int] = (8, 8),
        kernel_size: int = 3,
        n_bins: int = 8,
        dtype: str = "float32",
        mu: int | None = None,
        nu: int | None = None,
        offset: int | None = None,
        init_scale: float = 0.0,
        rectangles: bool = False,
        period: int | None = None,
    ) -> None:
        self.n = self._group(field, "SU(N) spectral coupling")
        self.n_bins = int(n_bins)
        super().__init__(
            lattice,
            index,
            n_spectral_params(self.n, self.n_bins),
            hidden,
            kernel_size,
            dtype,
            mu,
            nu,
            offset,
            init_scale,
            rectangles,
            period,
        )
        self.register_buffer("site_index", self.sites.flatten().nonzero().flatten())
        # which spectral map the weights belong to (checked when a state_dict is loaded)
        self.register_buffer("map_version", torch.tensor(SPECTRAL_MAP_VERSION, dtype=torch.int64))

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Refuse SU(3) weights of the spectral map before the centre-continuity fix.

        Checkpoints written before ``map_version`` existed hold SU(2) weights of the same map
        (accepted) or SU(3) weights of a map whose second spline is not tied to the first
        (refused: the same weights define another density).

        Raises:
            CheckpointError: for SU(3) weights without ``map_version`` or of another version.
        """
        key = prefix + "map_version"
        found = state_dict.get(key)
        if found is None and self.n != 3:
            state_dict[key] = torch.tensor(SPECTRAL_MAP_VERSION, dtype=torch.int64)
        elif found is None or int(found) != SPECTRAL_MAP_VERSION:
            raise CheckpointError(
                f"sun-spectral layer '{prefix.rstrip('.')}': the weights belong to SU(3) spectral map "
                f"version {'1 (unversioned)' if found is None else int(found)}, this flowplug has "
                f"version {SPECTRAL_MAP_VERSION} (the second eigenphase spline tied to the first, "
                "continuous at the centre elements); the same weights define another density: "
                "retrain the flow"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _map(self, u: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(u)
        u = u.to(torch.complex128)
        plaq = gauge.sun_plaquettes(u)
        tr = torch.diagonal(plaq, dim1=-2, dim2=-1).sum(-1) / self.n
        full_loop = _sun_loop(u, self.mu, self.nu)
        rect = None
        if self.rectangles:
            # 1x2 loop based at x - nu: P(x - nu) times P(x) transported by U_nu(x - nu);
            # U_mu(x) cancels between them
            below = torch.roll(full_loop, 1, dims=1 + self.nu)
            u_nu = torch.roll(u[:, self.nu], 1, dims=1 + self.nu)
            r = torch.diagonal(below @ u_nu @ full_loop @ u_nu.mH, dim1=-2, dim2=-1).sum(-1) / self.n
            rect = (r.real, r.imag)
        d = self.d
        idx = self.site_index
        loop = full_loop.flatten(1, d)[:, idx]
        if d <= 3:  # the gathered network at those sites: the same parameters in any batch (sun-stout)
            params = self._condition(tr.real, tr.imag, rect, sites=idx)
        else:
            params = self._condition(tr.real, tr.imag, rect).flatten(1, d)[:, idx]
        g, ld = spectral_map(loop, params, self.n_bins, inverse=inverse, left=True)
        u_mu = u[:, self.mu].flatten(1, d)
        updated = g @ u_mu[:, idx]  # = P' P^+ U_mu(x), unitary to rounding at any depth
        new_mu = u_mu.index_copy(1, idx, updated).reshape(u[:, self.mu].shape)
        out = torch.stack([new_mu if a == self.mu else u[:, a] for a in range(d)], dim=1)
        return out, ld.sum(1)
