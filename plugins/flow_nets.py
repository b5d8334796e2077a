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

import itertools
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from flowplug.errors import ConfigError, ShapeError

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


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
    convolution with a ``kernel_size**4`` kernel.

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
        self._pad_index: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}
        self.conv: nn.Conv1d | nn.Conv2d | nn.Conv3d
        if ndim == 4:
            self.conv = nn.Conv3d(
                in_channels * kernel_size, out_channels, kernel_size, padding=pad, padding_mode="circular", dtype=dtype
            )
        else:
            cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[ndim - 1]
            self.conv = cls(in_channels, out_channels, kernel_size, padding=pad, padding_mode="circular", dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the convolution; see the class docstring for shapes."""
        if x.dim() != self.ndim + 2:
            raise ShapeError(
                f"PeriodicConv({self.ndim}D) expects (B, C, L_0, ..., L_{self.ndim - 1}); found shape {tuple(x.shape)}"
            )
        k, half = self.kernel_size, self.kernel_size // 2
        if self.ndim < 4 and not half:
            return self.conv(x)
        # pad every axis circularly at once: one gather of the padded lattice's sites
        lat = tuple(x.shape[2:])
        x = x.flatten(2).index_select(2, self._padded_sites(lat, x.device))
        x = x.view(*x.shape[:2], *(n + 2 * half for n in lat))
        if self.ndim < 4:
            conv = (F.conv1d, F.conv2d, F.conv3d)[self.ndim - 1]
            return conv(x, self.conv.weight, self.conv.bias)
        # take the k windows along axis 0 as channels (offset-major, the order of the
        # weights) and convolve the other three axes
        b, c, l0 = x.shape[0], x.shape[1], lat[0]
        win = x.unfold(2, k, 1)  # (B, C, L_0, L_1 + 2h, L_2 + 2h, L_3 + 2h, k)
        y = win.permute(0, 2, 6, 1, 3, 4, 5).reshape(b * l0, k * c, *win.shape[3:6])
        y = F.conv3d(y, self.conv.weight, self.conv.bias)
        return y.reshape(b, l0, -1, *y.shape[2:]).transpose(1, 2)

    def _padded_sites(self, lattice: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Flat site index of every site of the circularly padded lattice (cached per shape)."""
        key = (lattice, device)
        idx = self._pad_index.get(key)
        if idx is None:
            half = self.kernel_size // 2
            idx = torch.zeros((), dtype=torch.long)
            for n in lattice:  # row-major flat index of the wrapped coordinates
                idx = idx.unsqueeze(-1) * n + torch.arange(-half, n + half) % n
            idx = idx.flatten().to(device)
            self._pad_index[key] = idx
        return idx


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the network; the input is cast to the network dtype first."""
        return self.layers(x.to(self.dtype))


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
