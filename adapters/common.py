"""Helpers shared by the built-in format adapters (not a plugin module).

Conversions between ILDG-order payload bytes and the canonical tensor (the axis
permutation itself is :mod:`flowplug.layout`'s), bounded reads, and the construction
of :class:`flowplug.io.Check` records.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowplug.adapters.checksums import _in_order
from flowplug.errors import FormatError
from flowplug.io import Check, from_ildg, to_ildg
from flowplug.linkcheck import mark_finite

__all__ = [
    "read_payload",
    "read_ildg_canonical",
    "read_ildg_file_order",
    "ildg_to_canonical",
    "canonical_to_ildg",
    "write_ildg_payload",
    "complex_dtype",
    "hex_check",
    "float_check",
    "decimals_tolerance",
    "fmt_lattice",
]


def fmt_lattice(dims) -> str:
    """``(4, 4, 4, 8)`` -> ``"4x4x4x8"``."""
    return "x".join(str(int(n)) for n in dims)


def complex_dtype(precision: int, byteorder: str = ">") -> np.dtype:
    """numpy complex dtype of a storage precision (32 -> c8, 64 -> c16) and byte order."""
    return _in_order("c8" if precision == 32 else "c16", byteorder)


def read_payload(path: Path, offset: int, nbytes: int, what: str) -> np.ndarray:
    """Read ``nbytes`` bytes at ``offset`` into a fresh aligned uint8 array.

    The size is checked against the file before anything is allocated.

    Raises:
        FormatError: if the file ends before ``offset + nbytes`` (naming ``what``).
    """
    _check_extent(path, offset, nbytes, what)
    out = np.empty(nbytes, dtype=np.uint8)
    with open(path, "rb", buffering=0) as fh:
        fh.seek(offset)
        _read_exactly(fh, out, path, what, nbytes)
    return out


def _check_extent(path: Path, offset: int, nbytes: int, what: str) -> None:
    size = path.stat().st_size
    if offset < 0 or nbytes < 0 or offset + nbytes > size:
        raise FormatError(
            f"{path}: {what} needs bytes {offset}..{offset + nbytes} but the file has "
            f"{size} bytes (truncated file or wrong length field)"
        )


def _read_exactly(fh: Any, buf: np.ndarray, path: Path, what: str, total: int) -> None:
    """Fill ``buf`` (uint8) from the unbuffered file ``fh`` (a short read is retried; EOF is an error)."""
    view = memoryview(buf)  # type: ignore[arg-type]  # numpy's stubs give ndarray __buffer__ only for Python >= 3.12
    got = 0
    while got < buf.size:
        n = fh.readinto(view[got:])
        if not n:
            raise FormatError(f"{path}: {what}: read {got} of {total} bytes (file changed while reading?)")
        got += n


#: Bytes moved per step by the chunked conversions below: small enough that a chunk stays
#: in the (L2) cache between reading, checksumming, byte swapping and the permuted copy.
CHUNK_BYTES = 1 << 20


def _block(n: int, itemsize: int) -> np.dtype:
    """A void dtype holding one N x N matrix of ``itemsize``-byte numbers (the unit the layout moves)."""
    return np.dtype((np.void, n * n * itemsize))


def _file_chunks(file_shape: tuple[int, ...], unit: int, target: int | None = None) -> list[tuple[Any, int, int]]:
    """Split an array of ILDG (file) shape into consecutive pieces of about ``target`` bytes.

    Arguments:
        file_shape: (L_{d-1}, ..., L_0, d), in units of one N x N matrix.
        unit: Bytes per matrix.
        target: Bytes per piece; default :data:`CHUNK_BYTES` (a piece holds whole sites,
            at least one).

    Returns:
        ``(index, start, stop)`` per piece, in file order: ``index`` selects the piece of
        an array of ``file_shape`` (integers on the outer axes, a slice on one axis, the
        inner axes whole); ``start``/``stop`` are its matrix offsets in the flat payload.
    """
    site = unit * (file_shape[-1] if file_shape else 1)  # pieces hold whole sites (all directions)
    target = max(site, CHUNK_BYTES if target is None else int(target))
    inner = [math.prod(file_shape[k:]) for k in range(len(file_shape) + 1)]  # matrices below axis k
    if inner[0] * unit <= target:
        return [((), 0, inner[0])]
    k = next(k for k in range(1, len(file_shape) + 1) if inner[k] * unit <= target)
    axis = k - 1  # split this axis into runs of ``step``; the axes before it one index at a time
    step = max(1, target // (inner[k] * unit))
    out = []
    for outer in np.ndindex(*file_shape[:axis]):
        base = sum(i * inner[j + 1] for j, i in enumerate(outer))
        for a in range(0, file_shape[axis], step):
            b = min(file_shape[axis], a + step)
            out.append(((*outer, slice(a, b)), base + a * inner[k], base + b * inner[k]))
    return out


def ildg_to_canonical(
    raw: np.ndarray, lattice: tuple[int, ...], n: int, precision: int, byteorder: str = ">"
) -> torch.Tensor:
    """Stored ILDG-order links -> canonical tensor (1, d, L_0, ..., L_{d-1}, N, N) complex128.

    Arguments:
        raw: Payload bytes (uint8), length V * d * N * N * (8 or 16).
        lattice: (L_0, ..., L_{d-1}), x first (4D: (lx, ly, lz, lt)).
        n: Colours N.
        precision: 32 or 64.
        byteorder: ``">"`` (ILDG, NERSC big) or ``"<"``.

    The file array has shape (L_{d-1}, ..., L_0, mu, N, N); the conversion is
    :func:`flowplug.layout.from_ildg` plus an exact widening to complex128, done in
    cache-sized pieces (see :func:`read_ildg_canonical`); ``raw`` is not modified.
    """
    raw = raw.reshape(-1).view(np.uint8)

    def fill(buf: np.ndarray, start: int) -> None:
        np.copyto(buf, raw[start : start + buf.size])

    return _to_canonical(fill, lattice, n, precision, byteorder, None)


def read_ildg_canonical(
    path: Path,
    offset: int,
    lattice: tuple[int, ...],
    n: int,
    precision: int,
    byteorder: str = ">",
    *,
    what: str = "payload",
    on_chunk: Callable[[np.ndarray], None] | None = None,
) -> torch.Tensor:
    """Read an ILDG-order payload from a file straight into the canonical tensor.

    Like :func:`read_payload` followed by :func:`ildg_to_canonical`, without holding the
    stored bytes: the payload is read in pieces of about :data:`CHUNK_BYTES` into one
    small buffer, in file order; each piece is passed to ``on_chunk`` (a checksum, as
    stored), byte swapped in place, summed (a finite sum proves it free of NaN/Inf) and
    its N x N blocks copied to their canonical positions, while it is still in cache.
    When every piece is finite the tensor is marked so (:func:`flowplug.linkcheck.mark_finite`)
    and :func:`flowplug.io.read` does not scan it again.

    Arguments:
        path: The file; ``offset``: byte offset of the payload.
        lattice, n, precision, byteorder: As in :func:`ildg_to_canonical`.
        what: Name of the payload in error messages.
        on_chunk: Called with every piece (uint8, whole sites, file order) before it is
            changed.

    Returns:
        (1, d, L_0, ..., L_{d-1}, N, N) complex128, contiguous.

    Raises:
        FormatError: if the file ends before the payload does.
    """
    lattice = tuple(int(v) for v in lattice)
    nbytes = math.prod(lattice) * len(lattice) * n * n * 2 * precision // 8
    _check_extent(path, offset, nbytes, what)
    with open(path, "rb", buffering=0) as fh:
        fh.seek(offset)
        expected = [0]

        def fill(buf: np.ndarray, start: int) -> None:
            if start != expected[0]:  # pragma: no cover - the pieces come in file order
                fh.seek(offset + start)
            _read_exactly(fh, buf, path, what, nbytes)
            expected[0] = start + buf.size

        return _to_canonical(fill, lattice, n, precision, byteorder, on_chunk)


def read_ildg_file_order(
    path: Path,
    offset: int,
    lattice: tuple[int, ...],
    n: int,
    precision: int,
    byteorder: str = ">",
    *,
    what: str = "payload",
    on_chunk: Callable[[np.ndarray], None] | None = None,
) -> torch.Tensor:
    """Read an ILDG-order payload as a canonical-shaped *view* of the file order (no permutation).

    The values are read in file order into one complex128 array (piece by piece: each
    piece is passed to ``on_chunk``, byte swapped and proven finite while it is in cache,
    as in :func:`read_ildg_canonical`) and returned
    as :func:`flowplug.layout.from_ildg` of it: a tensor of the canonical shape and
    indexing whose strides follow the file. It saves the permuted copy of
    :func:`read_ildg_canonical`; ``.contiguous()`` makes the canonical memory layout.

    Arguments and errors as :func:`read_ildg_canonical`.

    Returns:
        (1, d, L_0, ..., L_{d-1}, N, N) complex128, not contiguous (for d > 0 and a lattice
        larger than one site).
    """
    lattice = tuple(int(v) for v in lattice)
    d = len(lattice)
    stored = complex_dtype(precision, byteorder)
    unit = n * n * stored.itemsize
    nbytes = math.prod(lattice) * d * unit
    _check_extent(path, offset, nbytes, what)
    file_shape = (*reversed(lattice), d)
    out = np.empty((*file_shape, n, n), dtype=np.complex128)
    flat = out.reshape(-1).view(np.uint8)
    chunks = _file_chunks(file_shape, unit)
    scratch = None if precision == 64 else np.empty(max(b - a for _, a, b in chunks) * unit, dtype=np.uint8)
    finite = True  # every piece's values summed to a finite number so far
    with open(path, "rb", buffering=0) as fh:
        fh.seek(offset)
        for _, a, b in chunks:
            if scratch is None:  # 64-bit: read in place, swap in place
                buf = flat[a * unit : b * unit]
                _read_exactly(fh, buf, path, what, nbytes)
                if on_chunk is not None:
                    on_chunk(buf)
                if not stored.isnative:
                    buf.view(stored).byteswap(inplace=True)
                finite = finite and _finite_piece(buf, np.float64)
            else:  # 32-bit: widen into place
                buf = scratch[: (b - a) * unit]
                _read_exactly(fh, buf, path, what, nbytes)
                if on_chunk is not None:
                    on_chunk(buf)
                piece = out.reshape(-1)[a * n * n : b * n * n]
                with np.errstate(invalid="ignore"):
                    np.copyto(piece, buf.view(stored))
                finite = finite and _finite_piece(piece, np.float64)
    links = torch.from_numpy(from_ildg(out)[None])
    if finite:
        mark_finite(links)
    return links


def _to_canonical(
    fill: Callable[[np.ndarray, int], None],
    lattice: tuple[int, ...],
    n: int,
    precision: int,
    byteorder: str,
    on_chunk: Callable[[np.ndarray], None] | None,
) -> torch.Tensor:
    """The piecewise file order -> canonical copy; ``fill(buf, start)`` supplies stored bytes."""
    lattice = tuple(int(v) for v in lattice)
    d = len(lattice)
    stored = complex_dtype(precision, byteorder)
    unit = n * n * stored.itemsize
    out = np.empty((1, d, *lattice, n, n), dtype=np.complex128)
    file_shape = (*reversed(lattice), d)
    chunks = _file_chunks(file_shape, unit)
    scratch = np.empty(max(b - a for _, a, b in chunks) * unit, dtype=np.uint8)
    finite = True  # every piece's values summed to a finite number so far
    if precision == 64:
        block = _block(n, stored.itemsize)
        # the output seen in file order, one void item per N x N matrix (a strided view)
        blocks = out[0].reshape(d, *lattice, n * n).view(block).reshape(d, *lattice, 1, 1)
        dst = to_ildg(blocks)[..., 0, 0]
        for index, a, b in chunks:
            buf = scratch[: (b - a) * unit]
            fill(buf, a * unit)
            if on_chunk is not None:
                on_chunk(buf)
            if not stored.isnative:
                buf.view(stored).byteswap(inplace=True)  # now native complex128, in cache
            finite = finite and _finite_piece(buf, np.float64)
            np.copyto(dst[index], buf.view(block).reshape(dst[index].shape))
    else:  # 32 bits: move the (half as many) stored bytes, then widen once, exactly
        native = stored.newbyteorder("=")
        block = _block(n, stored.itemsize)
        narrow = np.empty((d, *lattice), dtype=block)
        dst = to_ildg(narrow.reshape(d, *lattice, 1, 1))[..., 0, 0]
        for index, a, b in chunks:
            buf = scratch[: (b - a) * unit]
            fill(buf, a * unit)
            if on_chunk is not None:
                on_chunk(buf)
            if not stored.isnative:
                buf.view(stored).byteswap(inplace=True)
            finite = finite and _finite_piece(buf, np.float32)
            np.copyto(dst[index], buf.view(block).reshape(dst[index].shape))
        with np.errstate(invalid="ignore"):  # NaN payloads are reported by flowplug.io.read
            np.copyto(out[0], narrow.view(native).reshape(d, *lattice, n, n))
    links = torch.from_numpy(out)
    if finite:
        mark_finite(links)
    return links


def _finite_piece(buf: np.ndarray, real: type[np.floating]) -> bool:
    """Whether a piece of native floats holds no NaN/Inf, proven by a finite sum (in cache).

    ``False`` also for huge finite values whose sum overflows: the reader then leaves the
    check to :func:`flowplug.linkcheck.check_links`, element by element.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(buf.view(real).sum(dtype=np.float64)))


def canonical_to_ildg(links: torch.Tensor, precision: int, byteorder: str = ">") -> np.ndarray:
    """Canonical (d, L_0, ..., L_{d-1}, N, N) links of one configuration -> stored ILDG array.

    Arguments:
        links: One configuration (no batch axis), complex.
        precision: 32 or 64 (values are rounded to it).
        byteorder: ``">"`` or ``"<"``.

    Returns:
        Contiguous array of shape (L_{d-1}, ..., L_0, d, N, N) (4D: (lt, lz, ly, lx, 4,
        N, N)), dtype complex64/128 in ``byteorder``; ``.tobytes()`` is the payload.

    Raises:
        ShapeError: if ``links`` is not shaped (d, L_0, ..., L_{d-1}, N, N).
    """
    can = _canonical_array(links)
    stored = complex_dtype(precision, byteorder)
    d, n = can.ndim - 3, can.shape[-1]
    lattice = can.shape[1 : 1 + d]
    out = np.empty((*reversed(lattice), d, n, n), dtype=stored)
    flat = out.reshape(-1).view(np.uint8)
    for piece, a, b in _ildg_pieces(can, precision, byteorder):
        flat[a:b] = piece
    return out


def write_ildg_payload(
    fh: Any,
    links: torch.Tensor,
    precision: int,
    byteorder: str = ">",
    on_chunk: Callable[[np.ndarray], None] | None = None,
) -> int:
    """Write the stored ILDG payload of one canonical configuration to an open file.

    The bytes are those of :func:`canonical_to_ildg`, produced and written in pieces of
    about :data:`CHUNK_BYTES` (no payload-sized temporary array); each piece is passed to
    ``on_chunk`` (a checksum) before it is written.

    Arguments:
        fh: A binary file open for writing.
        links, precision, byteorder: As in :func:`canonical_to_ildg`.
        on_chunk: Called with every piece (uint8, whole sites, file order).

    Returns:
        The number of bytes written.

    Raises:
        ShapeError: if ``links`` is not shaped (d, L_0, ..., L_{d-1}, N, N).
    """
    total = 0
    for piece, _, b in _ildg_pieces(_canonical_array(links), precision, byteorder):
        if on_chunk is not None:
            on_chunk(piece)
        fh.write(memoryview(piece))  # type: ignore[arg-type]  # numpy's stubs give ndarray __buffer__ only for Python >= 3.12
        total = b
    return total


def _canonical_array(links: torch.Tensor) -> np.ndarray:
    can = links.detach().cpu().resolve_conj().numpy()
    to_ildg(can)  # the shape check (a view; nothing is copied)
    if can.dtype not in (np.complex64, np.complex128):
        can = can.astype(np.complex128)
    return can


def _ildg_pieces(can: np.ndarray, precision: int, byteorder: str) -> Iterator[tuple[np.ndarray, int, int]]:
    """Stored bytes of canonical links ``can``, in file order, piece by piece.

    Yields ``(piece, start, stop)``: a uint8 array (one reused buffer: consume it before
    the next piece) and its byte range in the payload. Values are first rounded (or
    widened) to the stored precision, keeping their memory order; each piece is then
    gathered as whole N x N blocks (or sliced, when the memory is in file order already:
    a file-order read) and byte swapped in cache.
    """
    stored = complex_dtype(precision, byteorder)
    native = stored.newbyteorder("=")
    if can.dtype != native:  # 32-bit storage: round once (as numpy's astype), half the bytes to move
        with np.errstate(over="ignore", invalid="ignore"):
            can = can.astype(native, order="K")
    d, n = can.ndim - 3, can.shape[-1]
    lattice = tuple(can.shape[1 : 1 + d])
    unit = n * n * stored.itemsize
    chunks = _file_chunks((*reversed(lattice), d), unit)
    scratch = np.empty(max(b - a for _, a, b in chunks) * unit, dtype=np.uint8)
    block = _block(n, stored.itemsize)
    in_file_order = to_ildg(can)
    if in_file_order.flags.c_contiguous:  # memory already in file order: no permutation
        flat = in_file_order.reshape(-1).view(np.uint8)
        src = None
    else:
        blocks = np.ascontiguousarray(can).reshape(d, *lattice, n * n).view(block).reshape(d, *lattice, 1, 1)
        src = to_ildg(blocks)[..., 0, 0]
    for index, a, b in chunks:
        buf = scratch[: (b - a) * unit]
        if src is None:
            np.copyto(buf, flat[a * unit : b * unit])
        else:
            np.copyto(buf.view(block).reshape(src[index].shape), src[index])
        if not stored.isnative:
            buf.view(stored).byteswap(inplace=True)
        yield buf, a * unit, b * unit


def hex_check(quantity: str, expected: int, found: int) -> Check:
    """A checksum comparison; values shown as 8-digit lower-case hex."""
    return Check(quantity, f"{expected:08x}", f"{found:08x}", expected == found)


def decimals_tolerance(text: str, floor: float) -> float:
    """Tolerance for a decimal number printed as ``text``: max(floor, 1 unit of its last digit)."""
    t = text.strip().lower()
    mant = t.split("e")[0]
    exp = int(t.split("e")[1]) if "e" in t and t.split("e")[1].lstrip("+-").isdigit() else 0
    decimals = len(mant.split(".")[1]) if "." in mant else 0
    return max(floor, 10.0 ** (exp - decimals))


def float_check(quantity: str, expected: float, found: float, tolerance: float) -> Check:
    """A floating-point comparison within an absolute tolerance (NaN never passes)."""
    ok = math.isfinite(expected) and math.isfinite(found) and abs(expected - found) <= tolerance
    return Check(quantity, float(expected), float(found), bool(ok), float(tolerance))
