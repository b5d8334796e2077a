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
import threading
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from flowplug import compiled
from flowplug.errors import ConfigError, ShapeError
from flowplug.threads import one_thread

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


@functools.cache
def _dft_factors(
    lattice: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 4D real DFT of :func:`_dft_matrices` in two stages, over the last two axes and then over the first two.

    rfftn over (L_0, L_1, L_2, L_3) is rfft2 over (L_2, L_3) followed by the complex fft2 over
    (L_0, L_1), and irfftn the inverse steps in the opposite order, so the two dense maps factor
    into products with S_a x S_a and S_b x 2 F_b matrices (S_a = L_0 L_1, S_b = L_2 L_3,
    F_b = L_2 (L_3 // 2 + 1)) instead of V x 2F ones: a fraction of the arithmetic. The
    complex stage multiplies from the left, so both stages read and write the layout
    (..., S_a, F_b) of ``rfftn``'s output without a transposition.

    Arguments:
        lattice: (L_0, L_1, L_2, L_3).
        device, dtype: Of the returned matrices (a real dtype; the complex ones in the matching
            complex dtype); built in float64.

    Returns:
        ``(fwd_b, fwd_a, inv_a, inv_b)``: fwd_b (S_b, 2 F_b), the rfft2 over the last two axes
        (x_b @ fwd_b = view_as_real(rfft2(x_b)) flattened); fwd_a and inv_a (S_a, S_a) complex,
        the fft2 and ifft2 over the first two axes (fwd_a @ z_a = fft2(z_a) flattened, z_a the
        (S_a,) vector of one momentum of the last two axes); inv_b (2 F_b, S_b), the irfft2 over
        the last two axes (view_as_real(y_b) flattened @ inv_b = irfft2(y_b, s=(L_2, L_3))).

    Raises:
        ShapeError: for a lattice that is not 4-dimensional.
    """
    if len(lattice) != 4:
        raise ShapeError(f"_dft_factors: expected a 4D lattice; found {list(lattice)}")
    sa = lattice[0] * lattice[1]
    fwd_b, inv_b = _dft_matrices(tuple(lattice[2:]), torch.device("cpu"), torch.float64)
    eye = torch.eye(sa, dtype=torch.complex128).view(sa, lattice[0], lattice[1])
    # m[a, k] = F[k, a] of the transform of the a-th basis vector
    fwd_a = torch.fft.fftn(eye, dim=(1, 2)).reshape(sa, sa).t()
    inv_a = torch.fft.ifftn(eye, dim=(1, 2)).reshape(sa, sa).t()
    cdtype = dtype.to_complex()
    real = tuple(m.to(device=device, dtype=dtype).contiguous() for m in (fwd_b, inv_b))
    cplx = tuple(m.to(device=device, dtype=cdtype).contiguous() for m in (fwd_a, inv_a))
    return real[0], cplx[0], cplx[1], real[1]


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


def _batch_padded(transform: Any, x: torch.Tensor, multiple: int = 16) -> torch.Tensor:
    """``transform(x)`` of a batch (B, ...) computed on B padded with zero entries to a multiple of
    ``multiple`` (the padding's results are dropped): torch.fft's CPU transforms process several
    arrays at once with vector instructions and the rest one by one, which rounds differently, so
    without the padding an entry's transform could depend on the batch it is in (measured on
    the CPU; the padding is kept on other devices, whose FFT libraries were not checked)."""
    b = x.shape[0]
    pad = -b % multiple
    if not pad:
        return transform(x)
    return transform(torch.cat([x, x.new_zeros(pad, *x.shape[1:])]))[:b]


class _ChannelSum(torch.autograd.Function):
    """y[b, o, f] = sum_c x[b, c, f] k[o, c, f], the channel sum of a convolution in Fourier space,
    with a hand-written backward.

    ``apply(x (B, C, F), k (O, C, F)) -> (B, O, F)``, complex. The forward pass adds the channels
    in order, elementwise (each configuration's output independent of the batch it is in, bit
    for bit, as :class:`PeriodicConv` needs); the backward pass forms each gradient as one
    broadcast product and one sum, g conj(k) summed over o and g conj(x) summed over b (torch's
    convention for complex gradients), instead of autograd's two products, two sums and their
    bookkeeping per channel. The backward is built from differentiable operations on the
    saved inputs, so a double backward works.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        # the channels as views from one unbind each; the same products and sums in the same
        # order as a loop over selected channels
        xs, ks = x.unsqueeze(2).unbind(1), k.unsqueeze(0).unbind(2)
        # a complex64 product rounds a thread's tail differently (threads.one_thread)
        with one_thread(x.dtype == torch.complex64):
            y = xs[0] * ks[0]
            for c in range(1, len(xs)):
                y = y + xs[c] * ks[c]
        ctx.save_for_backward(x, k)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, k = ctx.saved_tensors
        g = grad.unsqueeze(2)  # (B, O, 1, F)
        gx = (g * k.conj().unsqueeze(0)).sum(1) if ctx.needs_input_grad[0] else None
        gk = (g * x.conj().unsqueeze(1)).sum(0) if ctx.needs_input_grad[1] else None
        return gx, gk


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
    products with dense DFT matrices (:func:`_dft_matrices`, applied in two stages,
    :func:`_dft_factors`), cheaper there than torch.fft; there a strided 4D output (``out_sites``)
    is also taken from the full Fourier-space convolution (its strided rows).
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
        if self.ndim == 4 and math.prod(lat) <= _DENSE_DFT_SITES:
            # on a small lattice the full convolution through the two-stage dense DFT and a
            # selection of the strided rows costs less than the strided direct convolution (the
            # inverse transform at the strided sites only would be cheaper still, but its small
            # products round by the batch size with more than one thread)
            strided = torch.arange(offset % step, lat[axis], step, device=x.device)
            return self._fourier(x).index_select(2 + axis, strided)
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
        # one 3D convolution per configuration (a batch of l0 slices, fixed by the lattice): the
        # float32 rounding of torch's CPU convolution depends on its batch size (e.g. 1.9e-7 on
        # 4x4x4x10, stride 4 along axis 0), and a layer's inverse on one configuration must see
        # exactly the parameters of its forward map on a batch
        stride3 = tuple(strides[1:])
        y = torch.cat([F.conv3d(yc, self.conv.weight, self.conv.bias, stride=stride3) for yc in y.split(l0)])
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
            fwd, _ = _dft_matrices(lat, x.device, x.dtype)
            k_hat = torch.view_as_complex(
                (w.reshape(n_out * n_in, -1) @ fwd.index_select(0, taps)).view(n_out, n_in, -1, 2)
            )  # (O, C, F)
            # one product per configuration (bmm), so that the float32 rounding of a
            # configuration's transform does not depend on the batch size (BLAS rounds a product by its shape)
            # the data's transforms in two stages (:func:`_dft_factors`): rfft2 over the last two
            # axes, then the complex fft2 over the first two from the left, one product per
            # configuration and channel (no transposition between the stages)
            fwd_b, fwd_a, inv_a, inv_b = _dft_factors(lat, x.device, x.dtype)
            sa, sb, fb = lat[0] * lat[1], lat[2] * lat[3], fwd_b.shape[1] // 2
            z = torch.bmm(x.reshape(b, n_in * sa, sb), fwd_b.expand(b, -1, -1)).view(b * n_in, sa, fb, 2)
            x_hat = torch.bmm(fwd_a.expand(b * n_in, -1, -1), torch.view_as_complex(z)).view(b, n_in, sa * fb)
        else:
            kernel = w.new_zeros(n_out, n_in, vol).index_add(2, taps, w.reshape(n_out, n_in, -1))
            k_hat = torch.fft.rfftn(kernel.view(n_out, n_in, *lat), dim=dims).flatten(2)  # (O, C, F)
            x_hat = _batch_padded(lambda t: torch.fft.rfftn(t, dim=dims), x).flatten(2)  # (B, C, F)
        y_hat = _ChannelSum.apply(x_hat, k_hat)  # (B, O, F)
        if dense:
            yc = torch.bmm(inv_a.expand(b * n_out, -1, -1), y_hat.view(b * n_out, sa, fb))
            yr = torch.view_as_real(yc).view(b, n_out * sa, 2 * fb)
            y = torch.bmm(yr, inv_b.expand(b, -1, -1)).view(b, n_out, *lat)
        else:
            y = _batch_padded(lambda t: torch.fft.irfftn(t, s=lat, dim=dims), y_hat.view(b, n_out, *half_shape))
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
        with torch.no_grad():  # the last convolution's weight and bias
            for p in layers[-1].parameters():
                p.mul_(float(final_scale))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights, in which the network computes (float64 once
        :func:`flowplug.flow.place_flow` put the flow on a CUDA device)."""
        first = cast(PeriodicConv, self.layers[0])
        return first.conv.weight.dtype

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
        steps = self._plan(lattice, convs[0].kernel_size, len(convs), x.device, sites)
        h = x.to(self.dtype).flatten(2).permute(1, 2, 0)  # (C, S, B)
        slope, params = self._stack_params()
        if slope is not None:  # the same gathers and products, with a hand-written backward
            return run_stack(h, steps, slope, params).permute(2, 1, 0)
        plan = iter(steps)
        for layer in self.layers:
            if not isinstance(layer, PeriodicConv):
                h = layer(h)
                continue
            idx, n_out = next(plan)[:2]
            w, bias = layer.conv.weight, layer.conv.bias
            cols = h.index_select(1, idx).view(-1, n_out * b)  # (C k^d, n * B), tap-minor rows
            w2 = w.view(w.shape[0], -1)
            h = weight_product(w2, cols, bias).view(w.shape[0], n_out, b)
        return h.permute(2, 1, 0)

    def gathered_stack(
        self,
        lattice: Sequence[int],
        device: torch.device,
        sites: torch.Tensor | None,
        grad_of: torch.Tensor | None = None,
        inputs: torch.Tensor | None = None,
    ) -> tuple[list[PlanStep], float, list[torch.Tensor]] | None:
        """What :func:`stack_forward` and :func:`stack_backward` need to evaluate this network
        as :meth:`forward_at` does: ``(plan, slope, params)``, or ``None`` when they cannot
        (d = 4, or a network other than convolutions with biases and LeakyReLUs of one positive
        slope between them). For coupling layers that fuse the network into their own autograd
        function.

        Arguments:
            lattice: (L_0, ..., L_{d-1}).
            device: Device of the index tensors.
            sites: Output sites as for :meth:`forward_at`.
            grad_of: When given, also ``None`` unless gradients are enabled and this input or a
                parameter of the network requires one (nothing for a fused backward to do).
            inputs: Flat row-major indices (long, shape (m,)) of the only sites where the input
                can be non-zero (a checkerboard's frozen sites), or ``None`` (every site). With
                them the input of :func:`stack_forward` is (C_in, m + 1, B): the input at those
                sites in this order, then a row of zeros that the first gather reads for every
                other site; :func:`stack_backward` returns the input gradient at those m sites
                only (C_in, m, B), and its first convolution's transposed gather and products
                shrink by the same factor (:meth:`_plan`).
        """
        lat = tuple(int(n) for n in lattice)
        slope, params = self._stack_params()
        if slope is None:
            return None
        if grad_of is not None and not (
            torch.is_grad_enabled() and (grad_of.requires_grad or any(p.requires_grad for p in params))
        ):
            return None
        convs = self.__dict__["_stack_struct"][1]
        if not 1 <= len(lat) <= 3 or convs[0].ndim != len(lat):
            return None
        return self._plan(lat, convs[0].kernel_size, len(convs), device, sites, inputs), slope, params

    def _stack_params(self) -> tuple[float | None, list[torch.Tensor]]:
        """``(slope, [w_0, b_0, w_1, b_1, ...])`` when the network is convolutions with biases
        separated by single LeakyReLUs of one positive slope (what :class:`_GatheredConvStack`
        differentiates by hand); ``(None, [])`` otherwise."""
        struct = self.__dict__.get("_stack_struct")
        if struct is None:  # the module structure, found once (the parameters are read at every call)
            mods = list(self.layers)
            convs, acts = mods[0::2], mods[1::2]
            slopes = {float(a.negative_slope) for a in acts if isinstance(a, nn.LeakyReLU) and not a.inplace}
            ok = (
                len(mods) % 2 == 1
                and all(isinstance(c, PeriodicConv) and c.conv.bias is not None for c in convs)
                and len(slopes) <= 1
                and all(isinstance(a, nn.LeakyReLU) and not a.inplace for a in acts)
                and all(v > 0 for v in slopes)
            )
            struct = ((slopes.pop() if slopes else 0.01), convs) if ok else (None, [])
            self.__dict__["_stack_struct"] = struct
        slope, stack = cast("tuple[float | None, list[PeriodicConv]]", struct)
        params: list[torch.Tensor] = []
        for conv in stack:
            # the registered tensors read straight from the modules' dicts, what attribute access
            # returns (nn.Module.__getattr__ costs about 1 us per name, some 10 us per layer call);
            # anything not registered there (a parametrization, a weight-norm hook) by attribute
            inner = conv._modules["conv"]
            reg = inner._parameters if inner is not None else {}
            w: torch.Tensor | None = reg.get("weight")
            b: torch.Tensor | None = reg.get("bias")
            if w is None or b is None or "weight" in inner.__dict__ or "bias" in inner.__dict__:
                w, b = conv.conv.weight, conv.conv.bias
            params += [w, cast(torch.Tensor, b)]  # biases: checked above
        return slope, params

    def _plan(
        self,
        lattice: tuple[int, ...],
        kernel_size: int,
        n_conv: int,
        device: torch.device,
        sites: torch.Tensor | None,
        inputs: torch.Tensor | None = None,
    ) -> list[PlanStep]:
        """Per convolution of :meth:`forward_at`: ``(idx, n_out, inv, n_in, pad)``, the gather
        index into the rows of its input, its number of output sites, the transposed index, its
        number of input rows and whether ``inv`` reads a zero row n_out (cached per lattice,
        device, ``sites`` and ``inputs``).

        Each convolution is evaluated only where a later one reads it: the last at ``sites``,
        every earlier one on the sites within reach of the kernel of the next (for a
        checkerboard with a 3^d kernel every site; for a U(1) stripe of period 4, 3 of 4 rows).
        ``idx`` (k^d n_out,) holds, tap-major, the input row of tap t of output site o; ``inv``
        (k^d n_in,) holds, tap-major, the output site o whose tap t reads input row r, or n_out
        where no output site does (a zero row appended by the backward of
        :class:`_GatheredConvStack`): a translation of the lattice is one to one, so each
        (t, r) has at most one such o; ``pad`` is False when the convolution's output covers
        every site (then no (t, r) lacks its o). With ``inputs`` (:meth:`gathered_stack`) the
        first convolution's input rows are those sites, plus a zero row m read by the taps of
        every other site; its ``inv`` covers those m rows only. A call with the very ``sites``
        and ``inputs`` tensors of the call before returns that call's plan without reading the
        tensors again (the layers keep their index tensors and never change them in place).
        """
        last = self.__dict__.get("_plan_last")  # the same index tensors as the last call: no key to build
        if (
            last is not None
            and last[0] is sites
            and last[1] is inputs
            and last[2] == (lattice, kernel_size, n_conv, device)
        ):
            return last[3]
        cache: dict[Any, list[PlanStep]] = self.__dict__.setdefault("_plan_cache", {})
        key = (
            lattice,
            device,
            None if sites is None else tuple(sites.tolist()),
            None if inputs is None else tuple(inputs.tolist()),
        )
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
            back = taps.flip(0)  # [t, s]: the site s - offset_t (the tap order reversed negates every offset)
            for j, out in enumerate(outs):
                if j > 0:  # the sites of the input rows: every site a tap of an output reads
                    rows = outs[j - 1]
                else:
                    rows = torch.arange(n_sites) if inputs is None else inputs.cpu().long()
                # the other sites (only with inputs, for the first convolution): the zero row m
                pos = torch.full((n_sites,), len(rows), dtype=torch.long)
                pos[rows] = torch.arange(len(rows))
                idx = pos[taps[:, out]]  # (k^d, n): rows of the input
                at = torch.full((n_sites,), len(out), dtype=torch.long)
                at[out] = torch.arange(len(out))
                inv = at[back[:, rows]]  # (k^d, n_in): output site reading row r through tap t, or n_out
                step = (idx.flatten().to(device), len(out), inv.flatten().to(device), len(rows), len(out) < n_sites)
                plan.append(step)
            cache[key] = plan
        self.__dict__["_plan_last"] = (sites, inputs, (lattice, kernel_size, n_conv, device), plan)
        return plan


def gathered_input(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The input of :func:`stack_forward` for a plan with ``inputs``
    (:meth:`ConvNet.gathered_stack`): values (B, C, m) at the m input sites, any real dtype ->
    (C, m + 1, B) in ``dtype``, those sites in order and then the row of zeros that the first
    gather reads for every other site. Differentiable."""
    b, c, m = values.shape
    h = values.new_zeros((c, m + 1, b), dtype=dtype)
    h[:, :m] = values.permute(1, 2, 0)
    return h


#: One convolution of a :meth:`ConvNet._plan`: ``(idx, n_out, inv, n_in, pad)``.
PlanStep = tuple[torch.Tensor, int, torch.Tensor, int, bool]


_WORKSPACE = threading.local()


def _workspace(name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A scratch tensor of ``shape`` (dtype and device of ``like``), reused by
    :func:`stack_forward` and :func:`stack_backward` of this thread on a CPU: temporaries of a
    megabyte, freshly allocated at every call, cost a page fault per 4 KiB on Linux (the C
    allocator hands such blocks back to the kernel), more than the gather that fills them. Its
    contents are meaningful only until the next call, and nothing is ever saved or returned in
    it. One flat buffer per name and dtype, grown to the largest size asked for and handed out
    as a view of its first elements, so the memory held per thread is bounded (the largest
    scratch tensor per name) whatever the batch sizes and lattices; on other devices a fresh
    tensor (their caching allocators already reuse blocks, and a reused buffer could be
    overwritten while another stream still reads it)."""
    if like.device.type != "cpu":
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    state = _WORKSPACE.__dict__
    views: dict[Any, tuple[torch.Tensor, torch.Tensor]] | None = state.get("views")
    if views is None:
        views = state["views"] = {}
        state["pool"] = {}
    key = (name, like.dtype)
    hit = views.get((key, shape))
    pool: dict[Any, torch.Tensor] = state["pool"]
    buf = pool.get(key)
    if hit is not None and hit[0] is buf:  # the view made of the current buffer (the common case)
        return hit[1]
    n = math.prod(shape)
    if buf is None or buf.numel() < n:
        buf = pool[key] = torch.empty(n, dtype=like.dtype)
        # views of the old buffer are dropped with it, so memory stays bounded
        for k in [k for k in views if k[0] == key]:
            del views[k]
    view = buf[:n].view(shape)
    if len(views) < 256:  # a bounded cache of views (shapes vary with batch size and lattice)
        views[(key, shape)] = (buf, view)
    return view


#: torch's private queries for functorch-wrapped (vmap, grad transforms) and legacy-batched
#: tensors, looked up once (those torch has)
_BATCH_QUERIES = tuple(
    q
    for q in (
        getattr(getattr(torch._C, "_functorch", None), name, None)
        for name in ("is_functorch_wrapped_tensor", "is_legacy_batchedtensor")
    )
    if q is not None
)


def _is_batched(t: torch.Tensor) -> bool:
    """True for a tensor batched by ``torch.vmap`` or by the legacy vmap of
    ``torch.autograd.grad(..., is_grads_batched=True)`` (torch's private queries; without them,
    False: a vmapped backward pass of :func:`stack_backward` then raises in ``copy_``)."""
    return any(query(t) for query in _BATCH_QUERIES)


def will_compute(ctx: Any, positions: Sequence[int]) -> list[bool]:
    """Which tensor arguments of a custom autograd function the backward pass running now needs
    gradients for: an argument must require one, and the engine must be about to run the node
    its gradient flows into (``torch.autograd.grad`` with respect to the field skips the
    weights' nodes). Without torch's query every argument that requires a gradient counts.

    Arguments:
        ctx: The ``ctx`` of the function's ``backward``.
        positions: The positions in ``apply``'s arguments of all its tensor arguments, in order.

    Returns:
        One flag per entry of ``positions``.
    """
    flags = [bool(ctx.needs_input_grad[i]) for i in positions]
    query = getattr(torch._C, "_will_engine_execute_node", None)
    if query is None:
        return flags
    nodes = ctx.next_functions  # one entry per tensor argument; read once (each read builds the tuple)
    for k, needed in enumerate(flags):
        node = nodes[k][0] if needed and k < len(nodes) else None
        if node is not None:
            try:
                flags[k] = bool(query(node))
            except RuntimeError:  # outside the engine, or (torch refuses) a leaf that autograd.grad captures
                pass
    return flags


#: Fewest columns that :func:`weight_product` hands to the matrix product, and the multiple their
#: number is rounded up to (zero columns pad the rest).
MIN_COLUMNS, COLUMN_MULTIPLE = 64, 16


def padded_columns(n: int) -> int:
    """The number of columns, >= n, that :func:`weight_product` computes for n columns."""
    return max(MIN_COLUMNS, -(-n // COLUMN_MULTIPLE) * COLUMN_MULTIPLE)


def weight_product(w: torch.Tensor, cols: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``w @ cols + bias[:, None]`` with each column rounded as in any other number of columns.

    A network's output for one configuration must not depend on the batch it is evaluated in
    (DESIGN section 4: the inverse of one configuration sees the parameters of the batched
    forward map). MKL's single-precision product rounds a column by where it sits: with fewer
    than 12 columns it takes another code path, and with few rows (2 or 3 output channels) the
    last columns of a number not a multiple of 8 are computed apart (measured with torch 2.13 on
    AVX2; a row-major batch, ``torch.nn.functional.linear``, is worse: with 8 outputs from 10
    inputs half of the row positions of 64 rows round differently). Here the batch runs along
    the columns and their number is padded with zeros to :func:`padded_columns` (at least
    :data:`MIN_COLUMNS`, a multiple of :data:`COLUMN_MULTIPLE`); then a column's rounding did not
    depend on its position or their number in any shape tried (1-576 inner, 1-96 outer, 64-4096
    columns, one and two threads; a review also tried 1-12288 columns with 3 and 16 threads).

    Arguments:
        w: (C_out, K) weights.
        cols: (K, N) inputs, one column per site and configuration.
        bias: (C_out,) or ``None``.

    Returns:
        (C_out, N), contiguous, in the dtype of the inputs.
    """
    n = cols.shape[1]
    m = padded_columns(n)
    if m != n:
        cols = F.pad(cols, (0, m - n))
    y = w @ cols if bias is None else torch.addmm(bias.unsqueeze(1), w, cols)
    return y[:, :n].contiguous() if m != n else y


def stack_forward(
    h: torch.Tensor,
    plan: Sequence[PlanStep],
    slope: float,
    params: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The convolutions and LeakyReLUs of :meth:`ConvNet.forward_at` without autograd, keeping
    what :func:`stack_backward` needs.

    Where :func:`_compiled_stack` allows (float32 on an x86-64 CPU with AVX2 and FMA), each
    convolution is one call of the compiled kernel (:func:`flowplug.compiled.conv_gather`:
    gather, product, bias and LeakyReLU in one pass, a configuration's values independent of
    its batch); otherwise the same gathers and matrix products as the generic loop of
    :meth:`ConvNet.forward_at` (the same values, bit for bit). Both compute the same function;
    they differ at float32 rounding.

    Arguments:
        h: Input (C_in, S, B) in the network dtype; (C_in, m + 1, B) for a plan with ``inputs``
            (:meth:`ConvNet.gathered_stack`: the m input sites, then a row of zeros).
        plan: From :meth:`ConvNet._plan`.
        slope: The LeakyReLU slope (> 0).
        params: ``w_0, b_0, w_1, b_1, ...`` of the convolutions.

    Returns:
        ``(out, saved)``: out (C_out, n, B); saved, per convolution, its input (the gathered
        columns, C_in k^d times larger, are gathered again by the backward pass into scratch
        memory: cheaper than keeping a fresh megabyte per convolution alive until then).
    """
    b = h.shape[2]
    saved: list[torch.Tensor] = []
    fast = _compiled_stack(h, params)
    if fast and not h.is_contiguous():
        h = h.contiguous()
    for j, (idx, n_out, _inv, _n_in, _pad) in enumerate(plan):
        w, bias = params[2 * j], params[2 * j + 1]
        saved.append(h)
        if fast:  # the gather, the product, the bias and the LeakyReLU in one compiled pass
            y = torch.empty((w.shape[0], n_out, b), dtype=h.dtype)
            # contiguous float32 CPU tensors (_compiled_stack and fresh outputs): no Python checks,
            # which cost more than a small convolution; the C side checks every size and index
            mode = 1 if j < len(plan) - 1 else 0
            compiled._conv_gather_unchecked(y, h, w, bias, idx, compiled.NO_ZERO_ROW, slope, mode, None, False)
            h = y
            continue
        cols = _workspace("fwd", (h.shape[0], idx.shape[0], b), h)
        torch.index_select(h, 1, idx, out=cols)  # (C, k^d n, B): tap-minor rows
        y = weight_product(w.view(w.shape[0], -1), cols.view(-1, n_out * b), bias)
        if j < len(plan) - 1:
            y = F.leaky_relu_(y, slope)  # same sign as its input (slope > 0): the backward's mask
        h = y.view(w.shape[0], n_out, b)
    return h, saved


#: ``aten::leaky_relu_backward.grad_input`` (the out= overload), looked up once: the attribute
#: chain ``torch.ops.aten.<op>.<overload>`` costs about as much as the call on these small tensors.
_LEAKY_BACKWARD_INTO = torch.ops.aten.leaky_relu_backward.grad_input


def stack_backward(
    grad: torch.Tensor,
    plan: Sequence[PlanStep],
    slope: float,
    params: Sequence[torch.Tensor],
    saved: Sequence[torch.Tensor],
    need: Sequence[bool],
    need_input: bool,
) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """Backward pass of :func:`stack_forward`.

    Each convolution's weight gradient is one product with its saved gathered input; its input
    gradient is a convolution with the transposed taps: one gather of the output gradient (zero
    where no output site reads a row, :meth:`ConvNet._plan`) and one product
    (C_in, C_out k^d) x (C_out k^d, n_in B). The same sums as autograd's scatter-add of the
    gathered columns, cheaper on a CPU. From batch 8 on, where :func:`_compiled_stack` allows,
    the compiled kernels do the same (:func:`_compiled_backward`).

    Arguments:
        grad: Gradient of the output (C_out, n, B).
        plan, slope, params: As for :func:`stack_forward`; saved: its second output.
        need: Per entry of ``params``, whether its gradient is wanted.
        need_input: Whether the input's gradient is wanted.

    Returns:
        ``(grad_input, grads)``: (C_in, S, B) (with ``inputs``, (C_in, m, B): the m input sites,
        not the zero row) or ``None``; per parameter its gradient or ``None``.
    """
    n_conv = len(plan)
    b = grad.shape[-1]
    grads: list[torch.Tensor | None] = [None] * len(params)
    g = grad.contiguous()
    # batches of 8 or more: the weight-gradient kernel keeps eight batch entries in the lanes of
    # a vector, so smaller ones leave lanes idle and torch's products are faster (gradients, unlike
    # the map, need not match between batch sizes bit for bit)
    if b >= 8 and _compiled_stack(g, params) and all(s.is_contiguous() for s in saved):
        return _compiled_backward(g, plan, slope, params, saved, need, need_input)
    # a batched gradient (vmap over the backward pass: is_grads_batched, Jacobians with
    # vectorize=True) cannot be copied into the plain scratch tensors: out-of-place there
    batched = _is_batched(g)
    for j in range(n_conv - 1, -1, -1):
        # pad False: an output on every site, so every (tap, input row) has its output site and
        # the transposed gather reads the output gradient itself, without a zero row appended
        idx, n_out, inv, n_in, pad = plan[j]
        w = params[2 * j]
        n_o = w.shape[0]
        padded = None
        if j < n_conv - 1:  # through the LeakyReLU after convolution j: its output is the next input
            act = saved[j + 1]
            if pad and not batched:  # straight into the scratch rows that the transposed gather reads
                padded = _workspace("pad", (n_o, n_out + 1, b), g)
                rows = padded.narrow(1, 0, n_out)
                _LEAKY_BACKWARD_INTO(g.view(act.shape), act, slope, False, grad_input=rows)
                g = rows
            elif batched:
                g = torch.ops.aten.leaky_relu_backward(g.reshape(act.shape), act, slope, False)
            else:  # in place: g is the input gradient of convolution j + 1, fresh from its product
                g = g.view(act.shape)
                _LEAKY_BACKWARD_INTO(g, act, slope, False, grad_input=g)
        g2 = g.reshape(n_o, n_out * b)
        if need[2 * j + 1]:
            grads[2 * j + 1] = g2.sum(1)
        n_taps = idx.shape[0] // n_out
        h = saved[j]
        n_i = h.shape[0]
        # the weight gradient from the gathered input, (O, n B) x (n B, C k^d), where the output
        # has fewer sites than the input; else from the gathered output gradient below
        from_input = n_in > n_out or (j == 0 and not need_input)
        if need[2 * j] and from_input:
            cols = _workspace("fwd", (n_i, idx.shape[0], b), h)
            torch.index_select(h, 1, idx, out=cols)
            grads[2 * j] = (g2 @ cols.view(-1, n_out * b).t()).view_as(w)
        if j == 0 and not need_input:
            return None, grads
        # row n_out is read by the taps that no output site reads: zero
        if not pad:
            src = g2.view(n_o, n_out, b)
        elif batched:  # vmapped (batched gradients): no writes into plain scratch tensors
            src = torch.cat([g2.view(n_o, n_out, b), g2.new_zeros(n_o, 1, b)], 1)
        else:
            if padded is None:  # the gradient of the last convolution's output, as given
                padded = _workspace("pad", (n_o, n_out + 1, b), g2)
                padded.narrow(1, 0, n_out).copy_(g2.view(n_o, n_out, b))
            padded.narrow(1, n_out, 1).zero_()
            src = padded
        if batched:
            g_cols = src.index_select(1, inv)
        else:
            g_cols = _workspace("cols", (n_o, n_taps * n_in, b), g2)
            torch.index_select(src, 1, inv, out=g_cols)
        g_cols2 = g_cols.view(n_o * n_taps, n_in * b)  # output-channel-major rows
        if need[2 * j] and not from_input:  # the same sums: (C, n_in B) x (n_in B, O k^d)
            # h.narrow: the input rows without the zero row of :meth:`ConvNet.gathered_stack`'s inputs
            gw = h.narrow(1, 0, n_in).reshape(n_i, n_in * b) @ g_cols2.t()
            grads[2 * j] = gw.view(n_i, n_o, n_taps).transpose(0, 1).reshape(w.shape)
        w_t = w.reshape(n_o, -1, n_taps).transpose(0, 1).reshape(n_i, n_o * n_taps)
        g = (w_t @ g_cols2).view(n_i, n_in, b)
    return g, grads


def _compiled_stack(h: torch.Tensor, params: Sequence[torch.Tensor]) -> bool:
    """Whether :func:`stack_forward` and :func:`stack_backward` run the compiled kernels
    (:func:`flowplug.compiled.conv_gather`): available on this CPU, and float32 CPU tensors that
    are neither batched (vmap) nor parameters of another layout."""
    if torch.compiler.is_compiling():  # torch.compile traces torch's operations (first: it cannot trace the rest)
        return False
    return (
        h.dtype == torch.float32
        and h.device.type == "cpu"
        and not h.is_neg()  # torch's lazy negation: the kernels would read the stored values
        and compiled.conv_available()
        and all(
            p.dtype == torch.float32 and p.device.type == "cpu" and p.is_contiguous() and not p.is_neg() for p in params
        )
        and not any(_is_batched(t) for t in (h, *params))  # no storage to hand to C under vmap
    )


def _compiled_backward(
    g: torch.Tensor,
    plan: Sequence[PlanStep],
    slope: float,
    params: Sequence[torch.Tensor],
    saved: Sequence[torch.Tensor],
    need: Sequence[bool],
    need_input: bool,
) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
    """:func:`stack_backward` with the compiled kernels: per convolution, last first, its weight
    and bias gradients in one pass (:func:`flowplug.compiled.conv_weight_grad`, the zero row of a
    plan with ``inputs`` skipped) and its input gradient in another (``conv_gather`` with the
    transposed taps ``inv`` and the transposed weight, times the derivative of the LeakyReLU before
    it). Arguments and result as :func:`stack_backward`."""
    b = g.shape[-1]
    grads: list[torch.Tensor | None] = [None] * len(params)
    for j in range(len(plan) - 1, -1, -1):
        idx, n_out, inv, n_in, _pad = plan[j]
        w, h = params[2 * j], saved[j]
        gb = torch.empty(w.shape[0], dtype=w.dtype) if need[2 * j + 1] else None
        if need[2 * j] or gb is not None:
            # with inputs (gathered_stack), row n_in of the first input is the row of zeros; the kernel
            # writes gw and gb together (the checks of _compiled_stack and the caller: no Python ones)
            gw = torch.empty_like(w)
            zero = n_in if h.shape[1] > n_in else compiled.NO_ZERO_ROW
            compiled._conv_weight_grad_unchecked(gw, gb, g, h, idx, zero)
            grads[2 * j], grads[2 * j + 1] = (gw if need[2 * j] else None), gb
        if j == 0 and not need_input:
            return None, grads
        g_in = torch.empty((h.shape[0], n_in, b), dtype=g.dtype)
        gate = saved[j] if j > 0 else None  # the LeakyReLU's output before convolution j: its sign
        compiled._conv_gather_unchecked(g_in, g, w, None, inv, n_out, slope, 0 if gate is None else 2, gate, True)
        g = g_in
    return g, grads


class _GatheredConvStack(torch.autograd.Function):
    """:func:`stack_forward` with :func:`stack_backward` as its backward; gradients the running
    backward pass does not need (the weights' when differentiating with respect to the field
    only) are not computed. First order only (a double backward raises).

    Arguments of ``apply(h, plan, slope, *params)``: as :func:`stack_forward`. Returns (C_out, n, B).
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, plan: Any, slope: float, *params: torch.Tensor) -> torch.Tensor:
        out, saved = stack_forward(h, plan, slope, params)
        ctx.save_for_backward(*saved, *params)
        ctx.plan, ctx.slope, ctx.n_saved = plan, slope, len(saved)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        tensors = ctx.saved_tensors
        saved, params = tensors[: ctx.n_saved], tensors[ctx.n_saved :]
        flags = will_compute(ctx, [0, *range(3, 3 + len(params))])
        g, grads = stack_backward(grad, ctx.plan, ctx.slope, params, saved, flags[1:], flags[0])
        if g is not None and g.shape[1] < saved[0].shape[1]:  # a plan with inputs: the zero row's (zero) gradient
            g = torch.cat([g, g.new_zeros(g.shape[0], saved[0].shape[1] - g.shape[1], g.shape[2])], 1)
        return (g, None, None, *grads)


def run_stack(h: torch.Tensor, plan: Sequence[PlanStep], slope: float, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Evaluate a gathered network (:meth:`ConvNet.gathered_stack`): :func:`stack_forward`
    alone when no gradient is wanted, else through :class:`_GatheredConvStack` (the same
    products, with the hand-written backward). Arguments as :func:`stack_forward`; returns
    (C_out, n, B) in the network dtype."""
    if torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in params)):
        return cast(torch.Tensor, _GatheredConvStack.apply(h, plan, slope, *params))
    return stack_forward(h, plan, slope, params)[0]


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


class _SiLUFunction(torch.autograd.Function):
    """x sigmoid(x) = x / (1 + exp(-x)) from single operations; the backward is the SiLU
    derivative in differentiable operations (gradients need no batch independence)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x / torch.exp(-x).add_(1.0)  # exp(-x) = inf for x -> -inf: -0, the limit

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        if not torch.is_grad_enabled():  # first order: torch's fused derivative
            return torch.ops.aten.silu_backward(grad, x)
        sig = torch.sigmoid(x)
        return grad * sig * (1.0 + x * (1.0 - sig))


class SiLU(nn.Module):
    """SiLU, x sigmoid(x), evaluated as x / (1 + exp(-x)) (the function of ``torch.nn.SiLU``).

    torch's CPU kernels of ``silu`` and ``sigmoid`` evaluate the last entries of a tensor (or of
    a thread's share of it), those past its last full vector, with scalar code that rounds
    differently, so an entry's float32 value would depend on where it sits, that is on the batch
    size. ``exp``, sums and quotients give each entry the same value wherever it sits (checked
    for every length up to 400, any offset, one and two threads), so a configuration's network
    output does not depend on its batch (DESIGN section 4). It costs about twice torch's
    ``silu``. The gradient is the SiLU derivative, twice differentiable. Shapes and dtype: those
    of the input. Source: Elfwing et al., arXiv:1702.03118 (SiLU).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x sigmoid(x), elementwise."""
        return cast(torch.Tensor, _SiLUFunction.apply(x))


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
                layers.append(SiLU())
        self.layers = nn.Sequential(*layers)
        with torch.no_grad():  # the last linear layer's weight and bias
            for p in layers[-1].parameters():
                p.mul_(float(final_scale))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights, in which the network computes (float64 once
        :func:`flowplug.flow.place_flow` put the flow on a CUDA device)."""
        first = cast(nn.Linear, self.layers[0])
        return first.weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the network; the input is cast to the network dtype first.

        The items run along the columns of each product, padded with zeros as in
        :func:`weight_product`, so that one item's output rounds as in any batch (a row-major
        ``nn.Linear`` does not); the activations are :class:`SiLU` for the same reason.
        """
        h = x.to(self.dtype)
        lead, n = h.shape[:-1], h[..., 0].numel()
        h = h.reshape(n, h.shape[-1]).t()
        h = F.pad(h, (0, padded_columns(n) - n))  # (features, items): contiguous, padded once
        for layer in self.layers:
            h = weight_product(layer.weight, h, layer.bias) if isinstance(layer, nn.Linear) else layer(h)
        out = cast(nn.Linear, self.layers[-1]).out_features
        return h[:, :n].t().reshape(*lead, out)
