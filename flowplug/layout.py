"""Axis orders of gauge fields: flowplug's canonical layout and the ILDG (file) order.

This module is the one place where the ILDG permutation is written down. Everything
that moves links between the two orders (the ILDG, SciDAC, NERSC and MILC adapters,
:mod:`flowplug.proposal` for C/C++ drivers, the lyncs-io bridge) calls it.

``canonical``  (d, L_0, ..., L_{d-1}, N, N): direction mu first, then the lattice axes
               x first (DESIGN.md section 2);
``ildg``       (L_{d-1}, ..., L_0, d, N, N): the lattice axes t first (x fastest in
               memory), then the direction mu = x, y, z, t, then the colour matrix
               (4D: (lt, lz, ly, lx, 4, N, N)), as ILDG, SciDAC, NERSC and MILC files
               store a configuration and production codes hold it in memory.

Going from one order to the other reverses the first d + 1 axes (the direction and
the lattice axes) and keeps the colour axes, so the permutation is its own inverse.
A batch axis, if any, stays in front. Tests pin it on non-cubic lattices (a cubic
lattice cannot detect a swapped axis).

References:
    ILDG file format (``http://www.lqcd.org/ildg/filefmt.xsd``); QIO site order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch

from flowplug.errors import ShapeError

__all__ = ["ildg_axes", "ildg_shape", "to_ildg", "from_ildg"]

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def ildg_axes(d: int, *, batched: bool = False) -> tuple[int, ...]:
    """The axis permutation between the canonical and the ILDG order of SU(N) links.

    Arguments:
        d: Number of space-time dimensions.
        batched: Whether the arrays have a leading batch axis (it stays first).

    Returns:
        ``axes`` such that ``array.transpose(axes)`` (numpy) or ``tensor.permute(axes)``
        (torch) converts either way: (d, d-1, ..., 0, d+1, d+2) for one configuration
        (4D: (4, 3, 2, 1, 0, 5, 6)), shifted by one behind a batch axis 0.

    Raises:
        ShapeError: if d < 1.
    """
    if d < 1:
        raise ShapeError(f"links need d >= 1 directions; found d = {d}")
    core = (*range(d, -1, -1), d + 1, d + 2)
    return (0, *(a + 1 for a in core)) if batched else core


def ildg_shape(lattice: Sequence[int], n: int) -> tuple[int, ...]:
    """Shape of one configuration of SU(n) links in ILDG order: (L_{d-1}, ..., L_0, d, n, n).

    Arguments:
        lattice: Extents (L_0, ..., L_{d-1}), x first.
        n: Colours N.
    """
    lattice = tuple(int(v) for v in lattice)
    return (*reversed(lattice), len(lattice), n, n)


def _permute(x: ArrayT, batched: bool, what: str) -> ArrayT:
    extra = 4 if batched else 3  # (B,) d axis, N, N
    d = x.ndim - extra
    if d < 1 or x.shape[-1] != x.shape[-2]:
        batch = "B, " if batched else ""
        raise ShapeError(
            f"{what}: SU(N) links need shape ({batch}..., N, N) with d >= 1 lattice axes and "
            f"a square colour block; found {tuple(x.shape)}"
        )
    # the direction axis has d entries: this catches a batch axis passed without batched=True
    mu_axis = (1 if batched else 0) if what == "to_ildg" else x.ndim - 3
    if x.shape[mu_axis] != d:
        hint = "" if batched else "; a batch of configurations needs batched=True"
        raise ShapeError(
            f"{what}: shape {tuple(x.shape)} read as {d}D links{' with a batch axis' if batched else ''} "
            f"needs {d} directions on axis {mu_axis}; found {x.shape[mu_axis]}{hint}"
        )
    axes = ildg_axes(d, batched=batched)
    if isinstance(x, torch.Tensor):
        return x.permute(axes)
    return x.transpose(axes)


def to_ildg(links: ArrayT, *, batched: bool = False) -> ArrayT:
    """Canonical links -> ILDG order (a view; copy with ``np.ascontiguousarray``/``.contiguous()``).

    Arguments:
        links: SU(N) links, shape (d, L_0, ..., L_{d-1}, N, N) (or (B, d, ...) with
            ``batched``), numpy array or torch tensor of any dtype.
        batched: Whether axis 0 is a batch axis.

    Returns:
        Shape (L_{d-1}, ..., L_0, d, N, N) (or (B, L_{d-1}, ...)), same type and dtype.

    Raises:
        ShapeError: if the array has too few axes, a non-square colour block, or a
            direction axis whose length is not the number of lattice axes (a batch
            without ``batched=True``).
    """
    return _permute(links, batched, "to_ildg")


def from_ildg(links: ArrayT, *, batched: bool = False) -> ArrayT:
    """ILDG-order links -> canonical order (a view; the inverse of :func:`to_ildg`).

    Arguments:
        links: SU(N) links, shape (L_{d-1}, ..., L_0, d, N, N) (or (B, L_{d-1}, ...)
            with ``batched``), numpy array or torch tensor of any dtype.
        batched: Whether axis 0 is a batch axis.

    Returns:
        Shape (d, L_0, ..., L_{d-1}, N, N) (or (B, d, ...)), same type and dtype.

    Raises:
        ShapeError: if the array has too few axes, a non-square colour block, or a
            direction axis whose length is not the number of lattice axes (a batch
            without ``batched=True``).
    """
    return _permute(links, batched, "from_ildg")
