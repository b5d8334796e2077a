r"""Coupling layers for real scalar fields: affine (real NVP) and rational-quadratic spline.

Both layers split the lattice with a checkerboard mask: the sites of one parity are
*frozen* (passed through unchanged and fed to a convolutional network), the sites of
the other parity are *active* (transformed elementwise with parameters read off the
network output at the same site). The parity alternates with the layer index, so two
consecutive layers update every site once. The network is a periodic convolution, so
the layer commutes with lattice translations by an even number of sites (a translation
preserving the mask).

References:
    Albergo, Kanwar, Shanahan, arXiv:1904.12072, section III (affine couplings with
    checkerboard masks for phi^4); Dinh, Sohl-Dickstein, Bengio, arXiv:1605.08803
    (real NVP); Durkan et al., arXiv:1906.04032 (rational-quadratic spline couplings);
    Albergo et al., arXiv:2101.08176, section III (tutorial conventions).

Huge conditioning values
    The network sees the frozen sites clipped to [-COND_LIMIT, COND_LIMIT], and its
    outputs are clipped to [-PARAM_LIMIT, PARAM_LIMIT] (NaN, which only a network with
    non-finite weights gives, becomes 0). A frozen site of 1e39 (beyond float32, the
    default network dtype) or 1e300 therefore leaves the layer finite and invertible:
    forward and inverse read the same frozen sites, hence the same parameters. Neither
    limit is reached by fields a flow meets in practice (|phi| of order 1-10, raw
    parameters of order 1); at raw parameters of +-PARAM_LIMIT the spline still
    round-trips to about 1e-8.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from flowplug.errors import ConfigError, ShapeError
from flowplug.plugins.flow_nets import (
    ConvNet,
    gathered_input,
    net_dtype,
    run_stack,
    stack_backward,
    stack_forward,
    will_compute,
)
from flowplug.plugins.flow_transforms import rq_spline, rq_spline_params

#: Frozen-site values are clipped to +-COND_LIMIT before the conditioner network.
COND_LIMIT = 1e6
#: Raw network outputs (transformation parameters) are clipped to +-PARAM_LIMIT.
PARAM_LIMIT = 100.0


def checkerboard(lattice: Sequence[int], parity: int) -> torch.Tensor:
    """Checkerboard mask: 1.0 where (sum_mu x_mu + parity) is even, else 0.0.

    Arguments:
        lattice: (L_0, ..., L_{d-1}).
        parity: 0 or 1.

    Returns:
        Shape (L_0, ..., L_{d-1}), float64.
    """
    grids = torch.meshgrid(*[torch.arange(n) for n in lattice], indexing="ij")
    total = cast(torch.Tensor, sum(grids)) + int(parity)  # d >= 1 grids: a tensor, never sum()'s start 0
    return ((total % 2) == 0).to(torch.float64)


class _ScalarCoupling(nn.Module):
    """Shared parts of the scalar coupling layers: mask, network, shape check."""

    fields = ("scalar",)
    active: torch.Tensor  # buffer: the checkerboard of updated sites, float64
    updated: torch.Tensor  # non-persistent buffer: the same mask as bool

    def __init__(
        self,
        lattice: Sequence[int],
        index: int,
        n_params: int,
        hidden: Sequence[int],
        kernel_size: int,
        dtype: str,
        parity: int | None,
        init_scale: float = 0.0,
    ) -> None:
        super().__init__()
        self.lattice = tuple(int(v) for v in lattice)
        if not 1 <= len(self.lattice) <= 4:
            raise ConfigError(f"scalar coupling layers support 1 to 4 dimensions; found lattice {list(lattice)}")
        if any(n % 2 for n in self.lattice):
            raise ConfigError(f"checkerboard masks need even extents; found lattice {list(lattice)}")
        self.parity = int(index % 2 if parity is None else parity)
        self.register_buffer("active", checkerboard(self.lattice, self.parity))
        self.register_buffer("updated", self.active > 0, persistent=False)
        self.n_params = n_params
        self.net = ConvNet(
            1, n_params, hidden, kernel_size, len(self.lattice), net_dtype(dtype), final_scale=init_scale
        )

    def _check(self, x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) != self.lattice or x.is_complex():
            raise ShapeError(
                f"{type(self).__name__}: expected a real field of shape (B, "
                f"{', '.join(map(str, self.lattice))}); found {x.dtype} {tuple(x.shape)}"
            )

    def _params(self, x: torch.Tensor) -> torch.Tensor:
        """Network output (B, L..., n_params) in float64 from the frozen sites of x, on the
        active sites; 0 on the frozen ones, which no transformation reads (d <= 3; for d = 4
        the network's full output).

        Frozen values are clipped to +-:data:`COND_LIMIT`, outputs to +-:data:`PARAM_LIMIT`
        with NaN -> 0 (module docstring), so the parameters are finite for any input.
        """
        if len(self.lattice) == 4:  # no gather form of the 4D convolution: the full output
            out = torch.movedim(self.net(self._frozen(x)), 1, -1)
            return torch.nan_to_num(out, nan=0.0).clamp(-PARAM_LIMIT, PARAM_LIMIT).to(torch.float64)
        idx = self._active_sites()
        act = self._active_params(x)
        out = act.new_zeros(x.shape[0], math.prod(self.lattice), self.n_params).index_copy(1, idx, act)
        return out.view(*x.shape, self.n_params)

    def _frozen(self, x: torch.Tensor) -> torch.Tensor:
        """The network input (B, 1, L...): x on the frozen sites, clipped to +-COND_LIMIT, 0 elsewhere."""
        return torch.where(self.updated, 0.0, x).clamp(-COND_LIMIT, COND_LIMIT).unsqueeze(1)

    def _active_params(self, x: torch.Tensor) -> torch.Tensor:
        """Network output (B, n_active, n_params) in float64 on the active sites (in the order
        of :meth:`_active_sites`), clipped as :meth:`_params`; the network's last convolution
        runs on those sites only (:meth:`~flowplug.plugins.flow_nets.ConvNet.forward_at`)."""
        if len(self.lattice) == 4:
            frozen = self._frozen(x)
            out = torch.movedim(self.net(frozen), 1, -1).flatten(1, -2).index_select(1, self._active_sites())
        else:
            out = self._network_at_active(x)
        # NaN -> 0 and the clip are exact in the network dtype (+-PARAM_LIMIT is representable)
        return torch.nan_to_num(out, nan=0.0).clamp(-PARAM_LIMIT, PARAM_LIMIT).to(torch.float64)

    def _network_at_active(self, x: torch.Tensor) -> torch.Tensor:
        """The network output (B, n_active, n_params), network dtype, at the active sites for the
        input :meth:`_frozen` (d <= 3): the values of
        :meth:`~flowplug.plugins.flow_nets.ConvNet.forward_at`, bit for bit. When the network has
        the gathered form it reads the frozen sites only (``gathered_stack`` with ``inputs``: the
        input is zero on the active sites), as the fused node :class:`_AffineMap` does, so that
        both evaluate the same products, forward and backward."""
        idx = self._active_sites()
        stack = self.net.gathered_stack(self.lattice, x.device, idx, inputs=self._frozen_sites())
        if stack is None:
            return self.net.forward_at(self._frozen(x), idx)
        plan, slope, params = stack
        xf = x.flatten(1).index_select(1, self._frozen_sites()).clamp(-COND_LIMIT, COND_LIMIT)
        h = gathered_input(xf.unsqueeze(1), self.net.dtype)
        return run_stack(h, plan, slope, params).permute(2, 1, 0)

    def _active_sites(self) -> torch.Tensor:
        """Flat row-major indices (long, on the layer's device) of the active sites."""
        idx = self.__dict__.get("_active_flat")
        if idx is None or idx.device != self.updated.device:
            idx = self.updated.flatten().nonzero().flatten()
            self.__dict__["_active_flat"] = idx
        return idx

    def _frozen_sites(self) -> torch.Tensor:
        """Flat row-major indices (long, on the layer's device) of the frozen sites."""
        idx = self.__dict__.get("_frozen_flat")
        if idx is None or idx.device != self.updated.device:
            idx = (~self.updated).flatten().nonzero().flatten()
            self.__dict__["_frozen_flat"] = idx
        return idx


class _AffineMap(torch.autograd.Function):
    """The affine coupling of :class:`AffineCoupling` (d <= 3) as one autograd node.

    ``apply(x, spec, inverse, *params) -> (y, s, s_sum)``: x (B, L...) float64; spec =
    ``(idx, fidx, plan, slope, scale_clamp, dtype)`` (active and frozen sites as flat indices,
    the network's :meth:`~flowplug.plugins.flow_nets.ConvNet.gathered_stack` with the frozen
    sites as its ``inputs``, and its dtype); params the network's weights and biases. y
    (B, L...) float64 is the map (or its inverse), s (B, n_active) float64 the soft-clamped
    log-scale on the active sites and s_sum (B,) its sum over them, ``s.sum(1)`` (the log-det of
    the layer, returned by the node so that a training step records no summation node after it).
    The forward pass evaluates exactly the operations of the
    generic path (frozen sites clipped, the network at the active sites, NaN -> 0 and the clip
    of its output, float64 from there on), with the same values bit for bit; the network reads
    the frozen sites only (its input is zero elsewhere), so its first convolution's backward
    products cover half the sites. The backward pass is written out (chain rule through the
    map, the clips and :func:`~flowplug.plugins.flow_nets.stack_backward`), so a training step
    records one node per layer instead of some thirty, and a gradient with respect to the
    field only skips the weights; the clips' masks are built only when a clip was met. First
    order only.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, spec: Any, inverse: bool, *params: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx, fidx, plan, slope, c, dtype = spec
        b = x.shape[0]
        flat = x.reshape(b, -1)
        xf = flat.index_select(1, fidx)  # (B, m): the frozen sites
        frozen = xf.clamp(-COND_LIMIT, COND_LIMIT)
        # no frozen site clipped (or NaN): the backward pass needs no mask of the clip (the usual case);
        # the check reads the values back, so on other devices (no synchronisation there) the mask is kept
        on_cpu = x.device.type == "cpu"
        cond_clipped = not (on_cpu and torch.equal(frozen, xf))
        out, saved = stack_forward(gathered_input(frozen.unsqueeze(1), dtype), plan, slope, params)  # (2, n, B)
        # NaN -> 0 and the clip are exact in the network dtype (+-PARAM_LIMIT is representable)
        raw = torch.nan_to_num(out, nan=0.0).clamp_(-PARAM_LIMIT, PARAM_LIMIT)
        out_clipped = not (on_cpu and torch.equal(raw, out))  # NaN != NaN: a NaN output counts as clipped
        p = raw.to(torch.float64)
        th = torch.tanh(p[0] / c)
        s = (c * th).t()  # (B, n)
        t = p[1].t()
        xa = flat.index_select(1, idx)
        if inverse:
            e = torch.exp(-s)
            ya = (xa - t) * e
            xe = ya  # what the backward pass reads: y_a for the inverse
        else:
            e = torch.exp(s)
            xe = xa * e  # x_a e^s, for the backward pass
            ya = xe + t
        y = flat.index_copy(1, idx, ya)
        ctx.save_for_backward(xf if cond_clipped else None, out if out_clipped else None, th, e, xe, *saved, *params)
        ctx.spec, ctx.inverse, ctx.n_saved, ctx.x_shape = spec, inverse, len(saved), x.shape
        return y.view_as(x), s, s.sum(1)

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, gy: torch.Tensor | None, gs: torch.Tensor | None, g_sum: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        idx, fidx, plan, slope, c, dtype = ctx.spec
        xf, out, th, e, xe, *rest = ctx.saved_tensors  # xf, out: None when nothing was clipped
        saved, params = rest[: ctx.n_saved], rest[ctx.n_saved :]
        b = e.shape[0]
        shape = ctx.x_shape
        gyf = e.new_zeros(b, math.prod(shape[1:])) if gy is None else gy.reshape(b, -1)
        gya = gyf.index_select(1, idx)
        gxa = gya * e
        if ctx.inverse:  # x_a = (y_a - t) e^{-s}; xe holds y_a
            ds = -(gya * xe)
            dt = -gxa
        else:  # y_a = x_a e^s + t; xe holds x_a e^s
            ds = gya * xe
            dt = gya
        if gs is not None:
            ds = ds + gs
        if g_sum is not None:  # s_sum = sum of s over the active sites
            ds = ds + g_sum.unsqueeze(1)
        dp = torch.stack([ds.t() * (1 - th * th), dt.t()]).to(saved[0].dtype)  # (2, n, B): s = c tanh(p / c)
        if out is not None:  # through the clip (inclusive) and NaN -> 0: zero where the output was clipped
            dp = torch.where(out.abs() <= PARAM_LIMIT, dp, 0.0)
        flags = will_compute(ctx, [0, *range(3, 3 + len(params))])
        need_x = flags[0]
        g_h, grads = stack_backward(dp, plan, slope, params, saved, flags[1:], need_x)
        gx = None
        if need_x:
            gx = gyf.index_copy(1, idx, gxa)
            if g_h is not None:  # (1, m, B): through the frozen sites, their clip (inclusive) and the cast
                g_f = g_h[0].t().to(torch.float64)
                if xf is not None:
                    g_f = torch.where(xf.abs() <= COND_LIMIT, g_f, 0.0)
                gx = gx.index_add(1, fidx, g_f)
            gx = gx.reshape(shape)
        return (gx, None, None, *grads)


class AffineCoupling(_ScalarCoupling):
    r"""Real-NVP affine coupling on a checkerboard: y = x exp(s) + t on the active sites.

    (s, t) are read off a periodic convolutional network applied to the frozen sites;
    the scale is soft-clamped, s = c tanh(s_raw / c), so exp(s) stays in [e^-c, e^c].
    log|det dy/dx| = sum over active sites of s (Albergo et al. 1904.12072, eq. 11-12).

    Arguments:
        lattice: (L_0, ..., L_{d-1}), even extents, d = 1..4.
        field: Must be ``"scalar"``.
        index: Position of the layer in the flow; sets the mask parity (index % 2).
        hidden: Hidden channels of the network, default ``(8, 8)``.
        kernel_size: Odd kernel extent, default 3.
        scale_clamp: c of the soft clamp, default 3.0.
        dtype: Network dtype, ``"float32"`` (default) or ``"float64"``; the map itself
            and its log-determinant are always evaluated in float64.
        parity: Override the mask parity (0 or 1).
        init_scale: Scale of the network's initial output layer; 0 (default) starts the
            layer as the identity map.

    ``forward(x) -> (y, logdet)`` and ``inverse(y) -> (x, -logdet)``, x and y of shape
    (B, L_0, ..., L_{d-1}) float64, logdet shape (B,) float64.

    Raises:
        ConfigError: on odd extents, d > 4 or a wrong field kind.
        ShapeError: on an input of the wrong shape.
    """

    #: log|det J| = sum of s over the active sites, a function of the frozen sites only
    #: (:func:`flowplug.flow.path_gradient_loss` then needs one vector-Jacobian product)
    logdet_from_frozen = True

    def __init__(
        self,
        *,
        lattice: Sequence[int],
        field: str = "scalar",
        index: int = 0,
        hidden: Sequence[int] = (8, 8),
        kernel_size: int = 3,
        scale_clamp: float = 3.0,
        dtype: str = "float32",
        parity: int | None = None,
        init_scale: float = 0.0,
    ) -> None:
        if field != "scalar":
            raise ConfigError(f"affine coupling acts on scalar fields; found field kind '{field}'")
        super().__init__(lattice, index, 2, hidden, kernel_size, dtype, parity, init_scale)
        self.scale_clamp = float(scale_clamp)

    def _st(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, t) on the active sites, each (B, n_active) float64."""
        p = self._active_params(x)
        c = self.scale_clamp
        return c * torch.tanh(p[..., 0] / c), p[..., 1]

    def _fused(self, x: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(y, s, s.sum(1))`` through :class:`_AffineMap` when a gradient will be taken and the
        network has the gathered form (d <= 3); ``None`` otherwise (the generic path)."""
        if not torch.is_grad_enabled() or len(self.lattice) == 4:
            return None
        idx = self._active_sites()
        fidx = self._frozen_sites()
        stack = self.net.gathered_stack(self.lattice, x.device, idx, grad_of=x, inputs=fidx)
        if stack is None:
            return None
        plan, slope, params = stack
        spec = (idx, fidx, plan, slope, self.scale_clamp, params[0].dtype)  # the network's dtype (its first weight's)
        y, s, s_sum = _AffineMap.apply(x.to(torch.float64), spec, inverse, *params)
        return y, s, s_sum

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map x -> y; returns ``(y, log|det dy/dx|)``."""
        self._check(x)
        fused = self._fused(x, inverse=False)
        if fused is not None:
            return fused[0], fused[2]
        idx = self._active_sites()
        s, t = self._st(x)
        flat = x.flatten(1)
        y = flat.index_copy(1, idx, flat.index_select(1, idx) * torch.exp(s) + t)
        return y.view_as(x), s.sum(1)

    def forward_diag(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(y, logdet, log_diag, updated)`` for fast path gradients.

        y (B, L...) and logdet (B,) float64 as :meth:`forward`; log_diag (like x,
        float64) is log dy_i/dx_i = s_i (0 on frozen sites); updated (bool, shape (L...))
        marks the active sites. y on an active site depends on x only through x_i and
        the frozen sites (:func:`flowplug.flow.path_gradient_loss`, arXiv:2403.15881).

        Raises:
            ShapeError: on an input of the wrong shape.
        """
        self._check(x)
        idx = self._active_sites()
        fused = self._fused(x, inverse=False)
        if fused is not None:
            y, s, logdet = fused
        else:
            s, t = self._st(x)
            flat = x.flatten(1)
            y = flat.index_copy(1, idx, flat.index_select(1, idx) * torch.exp(s) + t).view_as(x)
            logdet = s.sum(1)
        log_diag = x.new_zeros(x.shape[0], math.prod(self.lattice), dtype=torch.float64).index_copy(1, idx, s)
        return y, logdet, log_diag.view_as(x), self.updated

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map y -> x; returns ``(x, log|det dx/dy|)``."""
        self._check(y)
        fused = self._fused(y, inverse=True)
        if fused is not None:
            return fused[0], -fused[2]
        idx = self._active_sites()
        s, t = self._st(y)
        flat = y.flatten(1)
        x = flat.index_copy(1, idx, (flat.index_select(1, idx) - t) * torch.exp(-s))
        return x.view_as(y), -s.sum(1)


class SplineCoupling(_ScalarCoupling):
    r"""Rational-quadratic spline coupling on a checkerboard, identity tails.

    On the active sites each value in [-bound, bound] goes through a monotone
    rational-quadratic spline with ``n_bins`` bins whose widths, heights and interior
    knot derivatives come from the network (end derivatives 1); outside the interval the
    map is the identity (Durkan et al. 1906.04032, section 3.1, "linear tails").

    Arguments:
        lattice: (L_0, ..., L_{d-1}), even extents, d = 1..4.
        field: Must be ``"scalar"``.
        index: Position in the flow; sets the mask parity.
        hidden: Hidden channels, default ``(8, 8)``.
        kernel_size: Odd kernel extent, default 3.
        n_bins: Number of spline bins K, default 8.
        bound: Half-width B of the spline interval, default 4.0.
        dtype: Network dtype (``"float32"`` or ``"float64"``).
        parity: Override the mask parity.
        init_scale: Scale of the network's initial output layer; 0 (default) starts the
            layer as the identity map.

    Shapes as for :class:`AffineCoupling`.

    Raises:
        ConfigError: on odd extents, d > 4 or a wrong field kind.
        ShapeError: on an input of the wrong shape.
    """

    def __init__(
        self,
        *,
        lattice: Sequence[int],
        field: str = "scalar",
        index: int = 0,
        hidden: Sequence[int] = (8, 8),
        kernel_size: int = 3,
        n_bins: int = 8,
        bound: float = 4.0,
        dtype: str = "float32",
        parity: int | None = None,
        init_scale: float = 0.0,
    ) -> None:
        if field != "scalar":
            raise ConfigError(f"spline coupling acts on scalar fields; found field kind '{field}'")
        self.n_bins = int(n_bins)
        super().__init__(lattice, index, 3 * self.n_bins - 1, hidden, kernel_size, dtype, parity, init_scale)
        self.bound = float(bound)

    def _transform(self, x: torch.Tensor, cond: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        p = self._params(cond)
        b = self.bound
        w, h, d = rq_spline_params(p, self.n_bins, width=2 * b, height=2 * b, boundary="linear")
        y, ld = rq_spline(x, w, h, d, left=-b, bottom=-b, inverse=inverse)
        inside = (x > -b) & (x < b) & self.updated
        y = torch.where(inside, y, x)
        ld = torch.where(inside, ld, torch.zeros_like(ld))
        return y, ld

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map x -> y; returns ``(y, log|det dy/dx|)``."""
        y, logdet, _, _ = self.forward_diag(x)
        return y, logdet

    def forward_diag(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(y, logdet, log_diag, updated)`` for fast path gradients.

        y (B, L...) and logdet (B,) float64 as :meth:`forward`; log_diag (like x,
        float64) is log dy_i/dx_i on the active sites (0 elsewhere and on the identity
        tails); updated (bool, shape (L...)) marks the active sites
        (:func:`flowplug.flow.path_gradient_loss`, arXiv:2403.15881).

        Raises:
            ShapeError: on an input of the wrong shape.
        """
        self._check(x)
        y, ld = self._transform(x, x, inverse=False)
        return y, ld.flatten(1).sum(1), ld, self.updated

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map y -> x; returns ``(x, log|det dx/dy|)``."""
        self._check(y)
        x, ld = self._transform(y, y, inverse=True)
        return x, ld.flatten(1).sum(1)
