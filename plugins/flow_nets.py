"""Convolutional conditioner networks on periodic lattices, shared by the coupling layers.

A coupling layer feeds the frozen part of a field (or gauge-invariant features of the
frozen loops) through a small convolutional network with periodic boundary conditions
and reads transformation parameters off its output, one set per lattice site. The
networks are translation equivariant, so a coupling layer is translation equivariant up
to its mask (Albergo et al., arXiv:1904.12072, section III; Kanwar et al.,
arXiv:2003.06413, section III).

Networks may run in float32 for speed: their outputs are cast to float64 before any
transformation of the field, so log-densities and the inverse stay float64-exact.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from flowplug.errors import ConfigError, ShapeError

_DTYPES = {"float32": torch.float32, "float64": torch.float64}

#: Largest lattice (sites) whose Fourier-space convolutions use dense DFT matrices
#: (:func:`_dft_matrices`, O(V^2) memory and arithmetic) instead of torch.fft.
_DENSE_DFT_SITES = 512


@functools.cache
def _dft_matrices(
    lattice: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The d-dimensional real DFT of ``torch.fft.rfftn`` and its inverse ``irfftn`` as real matrices.

    Arguments:
        lattice: (L_0, ..., L_{d-1}), V sites, F = V / L_{d-1} (L_{d-1} // 2 + 1) momenta.
        device, dtype: Of the returned matrices (a real dtype); built in float64.

    Returns:
        ``(fwd, inv)``: fwd (V, 2F) with x_flat @ fwd = view_as_real(rfftn(x)) flattened
        (real and imaginary parts interleaved); inv (2F, V) with view_as_real(y_hat) flattened
        @ inv = irfftn(y_hat, s=lattice) flattened. Both maps are real-linear, so these are
        exact representations of torch's transforms (up to rounding), derivatives included.
    """
    vol = math.prod(lattice)
    dims = tuple(range(1, 1 + len(lattice)))
    eye = torch.eye(vol, dtype=torch.float64)
    fwd = torch.view_as_real(torch.fft.rfftn(eye.view(vol, *lattice), dim=dims).reshape(vol, -1)).reshape(vol, -1)
    n_half = fwd.shape[1]
    half_shape = (*lattice[:-1], lattice[-1] // 2 + 1)
    basis = torch.view_as_complex(torch.eye(n_half, dtype=torch.float64).view(n_half, -1, 2).contiguous())
    inv = torch.fft.irfftn(basis.view(n_half, *half_shape), s=lattice, dim=dims).reshape(n_half, vol)
    return fwd.to(device=device, dtype=dtype), inv.to(device=device, dtype=dtype)


def net_dtype(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype of a network from its configuration name.

    Arguments:
        name: ``"float32"``, ``"float64"`` or a torch dtype.

    Raises:
        ConfigError: for any other name.
    """
    if isinstance(name, torch.dtype):
        if name in _DTYPES.values():
            return name
        raise ConfigError(f"network dtype must be float32 or float64; found {name}")
    try:
        return _DTYPES[str(name).lower()]
    except KeyError:
        raise ConfigError(f"network dtype must be 'float32' or 'float64'; found {name!r}") from None


class PeriodicConv(nn.Module):
    """Convolution over a d-dimensional periodic lattice, d = 1, 2, 3 or 4.

    For d <= 3 this is ``torch.nn.Conv{d}d`` with circular padding, the padding done as one
    gather of the padded lattice's sites (bitwise the same input as torch's circular padding,
    at a fraction of its cost on small lattices, where padding rivals the convolution). Torch has no 4D
    convolution, so for d = 4 the input is stacked with its ``kernel_size`` shifts along
    lattice axis 0 and a 3D convolution is applied per slice of axis 0; this is a full 4D
    convolution with a ``kernel_size**4`` kernel. Where the whole output is wanted in 4D, the
    same periodic convolution is evaluated as a product in Fourier space (convolution
    theorem: rfftn of the input and of the kernel wrapped onto the lattice, a sum over input
    channels per momentum, irfftn): with 81 taps on a small lattice this takes a fraction of
    the direct convolution's arithmetic, and it equals it up to float rounding (the
    parameters are the same ``conv.weight`` and ``conv.bias``, so trained weights load
    either way). On lattices of at most ``_DENSE_DFT_SITES`` sites the transforms are
    products with dense DFT matrices (:func:`_dft_matrices`), cheaper there than torch.fft.
    The choice depends on the lattice only, never on the batch size, and the products run
    per configuration (``torch.bmm``), so that a configuration's float32 conditioner output
    is the same in a training batch and alone (the inverse of a flow layer must see exactly
    the forward map's parameters).

    Arguments:
        in_channels: Input channels C_in.
        out_channels: Output channels C_out.
        kernel_size: Odd kernel extent (same along every axis).
        ndim: Lattice dimension d.
        dtype: Parameter dtype.

    Shapes:
        input (B, C_in, L_0, ..., L_{d-1}) -> output (B, C_out, L_0, ..., L_{d-1}).

    Raises:
        ConfigError: for an even ``kernel_size`` or d outside 1..4.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, ndim: int, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1 or kernel_size < 1:
            raise ConfigError(f"kernel_size must be odd and positive; found {kernel_size}")
        if ndim not in (1, 2, 3, 4):
            raise ConfigError(f"periodic convolutions support 1 to 4 lattice dimensions; found {ndim}")
        self.ndim = ndim
        self.kernel_size = kernel_size
        pad = kernel_size // 2
        self._pad_index: dict[
            tuple[tuple[int, ...], torch.device, tuple[int, int, int] | None], tuple[torch.Tensor, tuple[int, ...]]
        ] = {}
        self._kernel_index: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}
        self.conv: nn.Conv1d | nn.Conv2d | nn.Conv3d
        if ndim == 4:
            self.conv = nn.Conv3d(
                in_channels * kernel_size, out_channels, kernel_size, padding=pad, padding_mode="circular", dtype=dtype
            )
        else:
            cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[ndim - 1]
            self.conv = cls(in_channels, out_channels, kernel_size, padding=pad, padding_mode="circular", dtype=dtype)

    def forward(self, x: torch.Tensor, out_sites: tuple[int, int, int] | None = None) -> torch.Tensor:
        """Apply the convolution; see the class docstring for shapes.

        Arguments:
            x: Input (B, C_in, L_0, ..., L_{d-1}).
            out_sites: ``(axis, offset, step)``: compute the output only on the sites whose
                coordinate along lattice ``axis`` is ``offset`` modulo ``step`` (a strided
                convolution along that axis; ``step`` must divide L_axis). The output then
                has L_axis / step entries along that axis, the same values as the full
                output at those sites (up to float rounding).

        Raises:
            ShapeError: on an input of the wrong rank, or ``out_sites`` that does not fit it.
        """
        if x.dim() != self.ndim + 2:
            raise ShapeError(
                f"PeriodicConv({self.ndim}D) expects (B, C, L_0, ..., L_{self.ndim - 1}); found shape {tuple(x.shape)}"
            )
        k, half = self.kernel_size, self.kernel_size // 2
        lat = tuple(x.shape[2:])
        axis, offset, step = -1, 0, 1
        if out_sites is not None:
            axis, offset, step = (int(v) for v in out_sites)
            if not 0 <= axis < self.ndim or step < 1 or lat[axis] % step:
                raise ShapeError(
                    f"PeriodicConv: out_sites (axis, offset, step) = {tuple(out_sites)} must name a lattice axis "
                    f"0..{self.ndim - 1} and a step that divides its extent; found lattice {list(lat)}"
                )
        if self.ndim < 4 and not half and out_sites is None:
            return self.conv(x)
        if self.ndim == 4 and out_sites is None:
            return self._fourier(x)
        # pad every axis circularly at once: one gather of the padded lattice's sites (along
        # ``axis`` only the rows that the strided output reads)
        key = (lat, x.device, None if out_sites is None else (axis, offset % step, step))
        rows = self._padded_sites(key)
        x = x.flatten(2).index_select(2, rows[0])
        x = x.view(*x.shape[:2], *rows[1])
        strides = [1] * self.ndim
        if out_sites is not None:
            strides[axis] = step
        if self.ndim < 4:
            conv = (F.conv1d, F.conv2d, F.conv3d)[self.ndim - 1]
            return conv(x, self.conv.weight, self.conv.bias, stride=tuple(strides))
        # take the k windows along axis 0 as channels (offset-major, the order of the
        # weights) and convolve the other three axes
        b, c = x.shape[0], x.shape[1]
        win = x.unfold(2, k, strides[0])  # (B, C, L_0 / s, L_1 + 2h', L_2 + 2h', L_3 + 2h', k)
        l0 = win.shape[2]
        y = win.permute(0, 2, 6, 1, 3, 4, 5).reshape(b * l0, k * c, *win.shape[3:6])
        y = F.conv3d(y, self.conv.weight, self.conv.bias, stride=tuple(strides[1:]))
        return y.reshape(b, l0, -1, *y.shape[2:]).transpose(1, 2)

    def _fourier(self, x: torch.Tensor) -> torch.Tensor:
        """The full periodic convolution through the convolution theorem (class docstring).

        y(x) = b + sum_t W_t x(x + t - h) = b + (K * x)(x) with the kernel K placed at
        (h - t) mod L: its Fourier transform multiplies that of the input, momentum by momentum.
        """
        lat = tuple(x.shape[2:])
        d, k = self.ndim, self.kernel_size
        w = self.conv.weight
        n_out = w.shape[0]
        if d == 4:  # (O, k C, k, k, k), offsets along axis 0 outermost in the channel axis
            w = w.view(n_out, k, -1, k, k, k).transpose(1, 2)
        n_in = w.shape[1]
        key = (lat, x.device)
        taps = self._kernel_index.get(key)
        if taps is None:
            taps = torch.zeros((), dtype=torch.long)
            for n in lat:  # row-major flat index of the wrapped position h - t of each tap t
                taps = taps.unsqueeze(-1) * n + (k // 2 - torch.arange(k)) % n
            taps = taps.flatten().to(x.device)
            self._kernel_index[key] = taps
        vol, b = math.prod(lat), x.shape[0]
        dims = tuple(range(2, 2 + d))
        half_shape = (*lat[:-1], lat[-1] // 2 + 1)
        dense = vol <= _DENSE_DFT_SITES
        if dense:
            # the real DFTs as matrix products (:func:`_dft_matrices`): on a small lattice a
            # fraction of the cost of torch.fft's transforms of many tiny arrays; the kernel's
            # transform is the sum of its taps' rows of the DFT matrix
            fwd, inv = _dft_matrices(lat, x.device, x.dtype)
            k_hat = torch.view_as_complex(
                (w.reshape(n_out * n_in, -1) @ fwd.index_select(0, taps)).view(n_out, n_in, -1, 2)
            )  # (O, C, F)
            # one product per configuration (bmm), so that the float32 rounding of a
            # configuration's transform does not depend on the batch size (BLAS rounds a product by its shape)
            x_hat = torch.view_as_complex(
                torch.bmm(x.reshape(b, n_in, vol), fwd.expand(b, -1, -1)).view(b, n_in, -1, 2)
            )
        else:
            kernel = w.new_zeros(n_out, n_in, vol).index_add(2, taps, w.reshape(n_out, n_in, -1))
            k_hat = torch.fft.rfftn(kernel.view(n_out, n_in, *lat), dim=dims).flatten(2)  # (O, C, F)
            x_hat = torch.fft.rfftn(x, dim=dims).flatten(2)  # (B, C, F)
        y_hat = x_hat[:, 0, None] * k_hat[None, :, 0]
        for c in range(1, n_in):
            y_hat = y_hat + x_hat[:, c, None] * k_hat[None, :, c]
        if dense:
            y = torch.bmm(torch.view_as_real(y_hat).reshape(b, n_out, -1), inv.expand(b, -1, -1)).view(b, n_out, *lat)
        else:
            y = torch.fft.irfftn(y_hat.view(b, n_out, *half_shape), s=lat, dim=dims)
        bias = self.conv.bias
        return y if bias is None else y + bias.view(1, -1, *([1] * d))

    def _padded_sites(
        self, key: tuple[tuple[int, ...], torch.device, tuple[int, int, int] | None]
    ) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Flat site index of every site of the circularly padded lattice and the padded shape
        (cached per lattice, device and ``out_sites``); along a strided axis only the rows from
        offset - h to the last output's offset + h."""
        hit = self._pad_index.get(key)
        if hit is None:
            lattice, device, out_sites = key
            half = self.kernel_size // 2
            idx = torch.zeros((), dtype=torch.long)
            shape = []
            for a, n in enumerate(lattice):  # row-major flat index of the wrapped coordinates
                coords = torch.arange(-half, n + half)
                if out_sites is not None and a == out_sites[0]:
                    _, offset, step = out_sites
                    coords = torch.arange(offset - half, offset + n - step + half + 1)
                idx = idx.unsqueeze(-1) * n + coords % n
                shape.append(len(coords))
            hit = (idx.flatten().to(device), tuple(shape))
            self._pad_index[key] = hit
        return hit


class ConvNet(nn.Module):
    """Stack of periodic convolutions with LeakyReLU activations between them.

    The last convolution's initial weights are scaled by ``final_scale``: 0 makes every
    coupling layer start as the identity map (the untrained flow equals its prior), 1 is
    torch's default initialisation. Components whose parameters enter symmetrically
    (mixtures) need a non-zero scale, or their gradients stay identical for ever.

    Arguments:
        in_channels: Input channels.
        out_channels: Output channels.
        hidden: Channels of the hidden layers, e.g. ``(8, 8)``.
        kernel_size: Odd kernel extent.
        ndim: Lattice dimension d (1 to 4).
        dtype: Parameter dtype (float32 or float64).
        final_scale: Factor on the default initialisation of the output convolution.

    Shapes:
        input (B, in_channels, L...) in ``dtype``; output (B, out_channels, L...) in ``dtype``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden: Sequence[int],
        kernel_size: int,
        ndim: int,
        dtype: torch.dtype = torch.float32,
        final_scale: float = 0.0,
    ) -> None:
        super().__init__()
        sizes = [int(in_channels), *map(int, hidden), int(out_channels)]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(PeriodicConv(a, b, kernel_size, ndim, dtype))
            if i < len(sizes) - 2:
                layers.append(nn.LeakyReLU())
        self.layers = nn.Sequential(*layers)
        self.dtype = dtype
        with torch.no_grad():  # the last convolution's weight and bias
            for p in layers[-1].parameters():
                p.mul_(float(final_scale))

    def forward(self, x: torch.Tensor, out_sites: tuple[int, int, int] | None = None) -> torch.Tensor:
        """Apply the network; the input is cast to the network dtype first.

        ``out_sites = (axis, offset, step)`` computes the last convolution only on the sites
        whose coordinate along lattice ``axis`` is ``offset`` modulo ``step``
        (:meth:`PeriodicConv.forward`): the output has L_axis / step entries along that axis.
        A coupling layer that reads its parameters on a stripe of sites needs no more.
        """
        x = x.to(self.dtype)
        if out_sites is None:
            return self.layers(x)
        *body, last = self.layers
        for layer in body:
            x = layer(x)
        return last(x, out_sites)

    def forward_at(self, x: torch.Tensor, sites: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the network as a gather and a matrix product per convolution; output at ``sites``.

        The same function (same ``conv.weight`` and ``conv.bias``) as :meth:`forward`, equal
        up to float rounding, evaluated in a site-major layout (channels, sites, batch): a
        periodic convolution with a k^d kernel is then one ``index_select`` of whole rows of
        the batch (the k^d neighbours of every output site, :func:`periodic_taps`) and one
        matrix product (C_out, C_in k^d) x (C_in k^d, sites * B). On small lattices with few
        channels this is several times faster on a CPU, forward and backward, than a
        convolution routine, whose cost there is dominated by its fixed overhead and the
        circular padding. The last convolution is evaluated only at ``sites``, the sites
        whose parameters a coupling layer reads (half of them for a checkerboard, a quarter
        for a U(1) stripe of period 4), and every earlier one only on the sites that the next
        one reads (:meth:`_plan`), which saves the rest of their arithmetic.

        Arguments:
            x: Input (B, C_in, L_0, ..., L_{d-1}), d = 1, 2 or 3; cast to the network dtype.
            sites: Flat row-major indices (long, shape (n,)) of the output sites; ``None``:
                every site in row-major order.

        Returns:
            (B, n, C_out) in the network dtype: the output of :meth:`forward` at ``sites``,
            channels last.

        Raises:
            ShapeError: for d = 4 (use :meth:`forward`) or an input of the wrong rank.
        """
        lattice = tuple(int(n) for n in x.shape[2:])
        convs = [m for m in self.layers if isinstance(m, PeriodicConv)]
        if not 1 <= len(lattice) <= 3 or convs[0].ndim != len(lattice):
            raise ShapeError(
                f"ConvNet.forward_at takes (B, C, L_0, ..., L_{{d-1}}) with d = {convs[0].ndim} <= 3; "
                f"found shape {tuple(x.shape)}"
            )
        b = x.shape[0]
        plan = iter(self._plan(lattice, convs[0].kernel_size, len(convs), x.device, sites))
        h = x.to(self.dtype).flatten(2).permute(1, 2, 0)  # (C, S, B)
        for layer in self.layers:
            if not isinstance(layer, PeriodicConv):
                h = layer(h)
                continue
            idx, n_out = next(plan)
            w, bias = layer.conv.weight, layer.conv.bias
            cols = h.index_select(1, idx).view(-1, n_out * b)  # (C k^d, n * B), tap-minor rows
            w2 = w.view(w.shape[0], -1)
            y = w2 @ cols if bias is None else torch.addmm(bias.unsqueeze(1), w2, cols)
            h = y.view(w.shape[0], n_out, b)
        return h.permute(2, 1, 0)

    def _plan(
        self, lattice: tuple[int, ...], kernel_size: int, n_conv: int, device: torch.device, sites: torch.Tensor | None
    ) -> list[tuple[torch.Tensor, int]]:
        """Per convolution of :meth:`forward_at`: the gather index into the rows of its input and
        its number of output sites (cached per lattice, device and ``sites``).

        Each convolution is evaluated only where a later one reads it: the last at ``sites``,
        every earlier one on the sites within reach of the kernel of the next (for a
        checkerboard with a 3^d kernel every site; for a U(1) stripe of period 4, 3 of 4 rows).
        """
        cache: dict[Any, list[tuple[torch.Tensor, int]]] = self.__dict__.setdefault("_plan_cache", {})
        key = (lattice, device, None if sites is None else tuple(sites.tolist()))
        plan = cache.get(key)
        if plan is None:
            taps = periodic_taps(lattice, kernel_size)
            n_sites = taps.shape[1]
            need = torch.arange(n_sites) if sites is None else sites.cpu().long()
            outs = []
            for _ in range(n_conv):  # last convolution first: where each one is read
                outs.append(need)
                need = torch.unique(taps[:, need])
            outs.reverse()
            plan = []
            for j, out in enumerate(outs):
                idx = taps[:, out]  # (k^d, n): sites of the lattice
                if j > 0:  # rows of the previous convolution's output
                    pos = torch.full((n_sites,), -1, dtype=torch.long)
                    pos[outs[j - 1]] = torch.arange(len(outs[j - 1]))
                    idx = pos[idx]
                plan.append((idx.flatten().to(device), len(out)))
            cache[key] = plan
        return plan


def periodic_taps(lattice: Sequence[int], kernel_size: int) -> torch.Tensor:
    """Flat index of every kernel tap's input site, per output site, on a periodic lattice.

    Entry [t, s] is the row-major flat index of the site x_s + (t_0 - h, ..., t_{d-1} - h)
    (mod L), h = kernel_size // 2, where t is the row-major flat index of the tap in the
    kernel (the order of ``Conv{d}d.weight``'s kernel axes): row t of a (C, S, B) input
    gathered with row t of this table, times ``weight[:, :, t]``, is that tap's term of the
    periodic cross-correlation that ``torch.nn.Conv{d}d`` with circular padding computes.

    Arguments:
        lattice: (L_0, ..., L_{d-1}).
        kernel_size: Odd kernel extent k.

    Returns:
        Shape (k^d, prod(L)), long.

    Raises:
        ConfigError: for an even or non-positive ``kernel_size``.
    """
    k = int(kernel_size)
    if k % 2 != 1 or k < 1:
        raise ConfigError(f"kernel_size must be odd and positive; found {kernel_size}")
    half = k // 2
    lat = [int(n) for n in lattice]
    grids = torch.meshgrid(*[torch.arange(n) for n in lat], indexing="ij")
    rows = []
    for offset in itertools.product(range(-half, half + 1), repeat=len(lat)):
        idx = torch.zeros(lat, dtype=torch.long)
        for g, n, o in zip(grids, lat, offset, strict=True):
            idx = idx * n + (g + o) % n
        rows.append(idx.flatten())
    return torch.stack(rows)


class MLP(nn.Module):
    """Fully connected network with SiLU activations, acting on the last axis.

    Used where a coupling's conditioner reads a few gauge-invariant numbers per block
    rather than a field on the lattice (:mod:`flowplug.plugins.flow_multiscale`). The last
    layer's initial weights are scaled by ``final_scale`` as in :class:`ConvNet`.

    Arguments:
        in_features: Inputs per item.
        out_features: Outputs per item.
        hidden: Widths of the hidden layers, e.g. ``(32, 32)``.
        dtype: Parameter dtype (float32 or float64).
        final_scale: Factor on the default initialisation of the output layer (0: the
            network starts at exactly zero output).

    Shapes:
        input (..., in_features), cast to ``dtype``; output (..., out_features) in ``dtype``.

    Raises:
        ConfigError: for a non-positive width.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int],
        dtype: torch.dtype = torch.float32,
        final_scale: float = 0.0,
    ) -> None:
        super().__init__()
        sizes = [int(in_features), *map(int, hidden), int(out_features)]
        if min(sizes) < 1:
            raise ConfigError(f"network widths must be >= 1; found {sizes}")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(a, b, dtype=dtype))
            if i < len(sizes) - 2:
                layers.append(nn.SiLU())
        self.layers = nn.Sequential(*layers)
        self.dtype = dtype
        with torch.no_grad():  # the last linear layer's weight and bias
            for p in layers[-1].parameters():
                p.mul_(float(final_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the network; the input is cast to the network dtype first."""
        return self.layers(x.to(self.dtype))
