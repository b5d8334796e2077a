"""Helpers shared by the built-in format adapters (not a plugin module).

Conversions between ILDG-order payload bytes and the canonical tensor (the axis
permutation itself is :mod:`flowplug.layout`'s), bounded reads, and the construction
of :class:`flowplug.io.Check` records.
"""

from __future__ import annotations

import ctypes
import math
import os
import queue
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowplug import compiled
from flowplug.adapters.checksums import _in_order
from flowplug.errors import FormatError
from flowplug.io import Check, from_ildg, to_ildg
from flowplug.linkcheck import (
    group_check_wanted,
    io_threads,
    map_pieces,
    mark_finite,
    mark_group_deviations,
    matrices_deviation,
)

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


#: Scratch memory (bytes) that the readers and the writer keep between calls
#: (:func:`_take_scratch`): a read of a small lattice would otherwise spend more on the page
#: faults of fresh scratch buffers than on its bytes (8^4 SU(3), 2.4 MB: about 1900 minor
#: faults a read, most of its time).
SCRATCH_KEEP_BYTES = 32 << 20

_scratch_lock = threading.Lock()
_scratch_free: list[np.ndarray] = []


def _take_scratch(count: int, nbytes: int) -> list[np.ndarray]:
    """``count`` uint8 scratch buffers of ``nbytes`` bytes each (views of kept buffers where
    one is large enough, else new), for one call's exclusive use until :func:`_give_scratch`.
    Thread-safe. Their content is undefined."""
    out: list[np.ndarray] = []
    with _scratch_lock:
        for _ in range(count):
            fits = [k for k, b in enumerate(_scratch_free) if b.size >= nbytes]
            if not fits:
                break
            k = min(fits, key=lambda k: _scratch_free[k].size)  # the smallest that fits
            out.append(_scratch_free.pop(k))
    out += [np.empty(nbytes, dtype=np.uint8) for _ in range(count - len(out))]
    return [b[:nbytes] for b in out]


def _give_scratch(buffers: list[np.ndarray]) -> None:
    """Return buffers of :func:`_take_scratch`; the largest are kept, up to
    :data:`SCRATCH_KEEP_BYTES` in all, the rest freed."""
    with _scratch_lock:
        for b in buffers:
            base = b.base if isinstance(b.base, np.ndarray) and b.base.ndim == 1 else b
            if all(base is not kept for kept in _scratch_free):
                _scratch_free.append(base)
        _scratch_free.sort(key=lambda b: b.size, reverse=True)
        total = 0
        for k, b in enumerate(_scratch_free):
            total += b.size
            if total > SCRATCH_KEEP_BYTES:
                del _scratch_free[k:]
                break


#: A tile of a canonical read (:func:`_tiles`) holds about this many pieces' bytes: more
#: time slices per call of the checksum and of the copy than a piece would give, fewer
#: than the 32 MiB of a server's last-level cache (16^4, one core: 4 pieces 1.3x faster
#: than 1, 8 no faster than 4).
TILE_PIECES = 4


#: Payloads smaller than this are read and written on one thread (starting a pool of
#: threads costs more than it saves on them).
PARALLEL_BYTES = 4 << 20


def _threads_for(nbytes: int, threads: int | None, pieces: int) -> int:
    """Threads for a piecewise conversion of ``nbytes`` bytes in ``pieces`` pieces."""
    if nbytes < PARALLEL_BYTES:
        return 1
    return max(1, min(io_threads() if threads is None else int(threads), pieces))


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

    return _read_pieces(fill, lattice, n, precision, byteorder, None, None, contiguous=True)


def _file_filler(fh: Any, path: Path, offset: int, what: str, nbytes: int) -> Callable[[np.ndarray, int], None]:
    """``fill(buf, start)``: read payload bytes ``start .. start + buf.size`` of an open file
    into ``buf``; positional reads (``os.preadv``), so several threads may fill at once."""
    fd = fh.fileno()
    if not hasattr(os, "preadv"):  # pragma: no cover - every POSIX system flowplug runs on has it
        lock = threading.Lock()

        def fill_locked(buf: np.ndarray, start: int) -> None:
            with lock:
                fh.seek(offset + start)
                _read_exactly(fh, buf, path, what, nbytes)

        return fill_locked

    def fill(buf: np.ndarray, start: int) -> None:
        pread_exactly(fd, buf, offset + start, path, what, done=start, total=nbytes)

    return fill


def pread_exactly(
    fd: int, buf: np.ndarray, offset: int, path: Path, what: str, *, done: int = 0, total: int | None = None
) -> None:
    """Fill ``buf`` (uint8, C-contiguous) with the bytes of the open file ``fd`` from byte
    ``offset``, by positional reads (``os.preadv``: the file position is not used, so several
    threads may read one descriptor at once); a short read is continued.

    Arguments:
        done, total: For the error message of a piece of a larger read (``what``): the
            bytes of it before this piece, and all its bytes.

    Raises:
        FormatError: if the file ends first, naming ``path``, ``what`` and the bytes read of
            those asked (of ``total`` when given, else of this piece, at ``offset``).
    """
    view = memoryview(buf)  # type: ignore[arg-type]  # numpy's stubs give ndarray __buffer__ only for Python >= 3.12
    got = 0
    while got < buf.size:
        k = os.preadv(fd, [view[got:]], offset + got)
        if not k:
            where = f"{got} of {buf.size} bytes at offset {offset}"
            if total is not None:
                where = f"{done + got} of {total} bytes"
            raise FormatError(f"{path}: {what}: read {where} (file truncated or changed while reading?)")
        got += k


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
    on_piece: Callable[[np.ndarray, int], None] | None = None,
    threads: int | None = None,
) -> torch.Tensor:
    """Read an ILDG-order payload from a file straight into the canonical tensor.

    Like :func:`read_payload` followed by :func:`ildg_to_canonical`, without holding the
    stored bytes: the payload is read in tiles of about :data:`TILE_PIECES` x
    :data:`CHUNK_BYTES` (:func:`_tiles`: the same run of whole sites of every time slice,
    one positional read per time slice; with ``on_chunk``, pieces of about
    :data:`CHUNK_BYTES` in file order instead). Each run is passed to
    ``on_chunk``/``on_piece`` (a checksum, as stored); the tile is byte swapped into a
    scratch buffer with every word's exponent checked in the same pass
    (:func:`flowplug.compiled.swap_copy`), measured for group membership when
    :func:`flowplug.io.read` will ask, and its N x N blocks copied to their canonical
    positions, while it is still in cache. The tiles are processed on ``threads`` threads
    at once (positional reads; the compiled loops, numpy and file reads release the GIL);
    the tensor is the same bit for bit whatever the number. When every tile is finite the
    tensor is marked so (:func:`flowplug.linkcheck.mark_finite`) and
    :func:`flowplug.io.read` does not scan it again.

    Arguments:
        path: The file; ``offset``: byte offset of the payload.
        lattice, n, precision, byteorder: As in :func:`ildg_to_canonical`.
        what: Name of the payload in error messages.
        on_chunk: Called with every piece (uint8, whole sites, stored bytes) before it is
            changed, in file order, from one thread at a time (its use makes the read
            single-threaded and untiled).
        on_piece: Called as ``on_piece(run, start)`` with every run of stored bytes and
            its byte offset in the payload, in any order and possibly from several threads
            at once (for example :meth:`~flowplug.adapters.checksums.ScidacChecksum.update_at`).
        threads: Threads; default :func:`flowplug.linkcheck.io_threads`.

    Returns:
        (1, d, L_0, ..., L_{d-1}, N, N) complex128, contiguous.

    Raises:
        FormatError: if the file ends before the payload does.
    """
    lattice = tuple(int(v) for v in lattice)
    nbytes = math.prod(lattice) * len(lattice) * n * n * 2 * precision // 8
    _check_extent(path, offset, nbytes, what)
    with open(path, "rb", buffering=0) as fh:
        fill = _file_filler(fh, path, offset, what, nbytes)
        return _read_pieces(
            fill, lattice, n, precision, byteorder, on_chunk, on_piece, contiguous=True, threads=threads
        )


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
    on_piece: Callable[[np.ndarray, int], None] | None = None,
    threads: int | None = None,
) -> torch.Tensor:
    """Read an ILDG-order payload as a canonical-shaped *view* of the file order (no permutation).

    The values are read in file order into one complex128 array (piece by piece: each
    piece is passed to ``on_chunk``/``on_piece``, byte swapped and proven finite while it
    is in cache, on ``threads`` threads, as in :func:`read_ildg_canonical`) and returned
    as :func:`flowplug.layout.from_ildg` of it: a tensor of the canonical shape and
    indexing whose strides follow the file. It saves the permuted copy of
    :func:`read_ildg_canonical`; ``.contiguous()`` makes the canonical memory layout.

    Arguments and errors as :func:`read_ildg_canonical`.

    Returns:
        (1, d, L_0, ..., L_{d-1}, N, N) complex128, not contiguous (for d > 0 and a lattice
        larger than one site).
    """
    lattice = tuple(int(v) for v in lattice)
    nbytes = math.prod(lattice) * len(lattice) * n * n * 2 * precision // 8
    _check_extent(path, offset, nbytes, what)
    with open(path, "rb", buffering=0) as fh:
        fill = _file_filler(fh, path, offset, what, nbytes)
        return _read_pieces(
            fill, lattice, n, precision, byteorder, on_chunk, on_piece, contiguous=False, threads=threads
        )


def _read_pieces(
    fill: Callable[[np.ndarray, int], None],
    lattice: tuple[int, ...],
    n: int,
    precision: int,
    byteorder: str,
    on_chunk: Callable[[np.ndarray], None] | None,
    on_piece: Callable[[np.ndarray, int], None] | None,
    *,
    contiguous: bool,
    threads: int | None = None,
) -> torch.Tensor:
    """The piecewise read: ``fill(buf, start)`` supplies stored bytes; canonical copy or file order.

    Every piece is handled by one call of ``task`` (below), independent of the others
    (its own scratch buffer, a disjoint part of the output), so the pieces can run on
    several threads; the output is the same whatever the number.

    The canonical copy reads *tiles* (:func:`_tiles`): the same run of sites of every time
    slice, read run by run (each run is checksummed, ``on_piece``, at its own offset).
    The time index is the fastest axis of the canonical layout and the slowest of the
    file, so a tile's blocks land in runs of L_t consecutive matrices of the output
    instead of one matrix per memory page (1.5x faster on a 16^4 lattice). With
    ``on_chunk`` (an ordered callback) the pieces are runs of the file in its order.
    """
    lattice = tuple(int(v) for v in lattice)
    d = len(lattice)
    stored = complex_dtype(precision, byteorder)
    unit = n * n * stored.itemsize
    word = stored.itemsize // 2
    file_shape = (*reversed(lattice), d)
    nbytes = math.prod(file_shape) * unit
    if contiguous and on_chunk is None and d >= 2 and file_shape[0] > 1:
        pieces = _tiles(file_shape, unit)
    else:
        pieces = [(index, [(a, b)]) for index, a, b in _file_chunks(file_shape, unit)]
    largest = max(sum(b - a for a, b in runs) for _, runs in pieces) * unit
    nthreads = 1 if on_chunk is not None else _threads_for(nbytes, threads, len(pieces))
    # scratch buffers of each running task: the stored bytes, and (when they are not in
    # native byte order) the native values, made by a swapping copy
    scratch: queue.SimpleQueue[tuple[np.ndarray, np.ndarray]] = queue.SimpleQueue()
    need_scratch = contiguous or precision != 64 or not stored.isnative
    per_task = 1 if stored.isnative else 2
    kept = _take_scratch((nthreads if need_scratch else 0) * per_task, largest)
    for k in range(0, len(kept), per_task):
        scratch.put((kept[k], kept[k + per_task - 1]))
    block = _block(n, stored.itemsize)
    narrow = None
    placed, slice_offsets = None, None
    if contiguous:
        out = np.empty((1, d, *lattice, n, n), dtype=np.complex128)
        if precision == 64:  # the output seen in file order, one void item per N x N matrix (a strided view)
            blocks = out[0].reshape(d, *lattice, n * n).view(block).reshape(d, *lattice, 1, 1)
        else:  # 32 bits: move the (half as many) stored bytes, then widen once, exactly
            narrow = np.empty((d, *lattice), dtype=block)
            blocks = narrow.reshape(d, *lattice, 1, 1)
        dst = to_ildg(blocks)[..., 0, 0]
        # the compiled tile copy: byte offsets (in `placed`) of the blocks of one time slice
        placed = (out if narrow is None else narrow).reshape(-1).view(np.uint8)
        slice_offsets = _block_offsets(dst[0], placed) if compiled.available() else None
    else:
        out = np.empty((*file_shape, n, n), dtype=np.complex128)
    flat = out.reshape(-1)
    # the group check of flowplug.io.read, on each piece while it is in cache (64-bit and
    # file-order 32-bit values are complex128 there; other cases are left to check_links)
    measure = group_check_wanted() and n in (2, 3) and (precision == 64 or not contiguous)
    edge_from = (lattice[-1] - 1) * math.prod(lattice[:-1]) * d if d >= 2 and lattice[-1] >= 2 else None
    zero = (0.0, 0.0)

    def deviations(values: np.ndarray, a: int, b: int) -> tuple[tuple[float, float], tuple[float, float]]:
        """(bulk, edge) deviations of matrices a..b-1 (file order): edge = the time links of the
        last time slice (an open boundary when they are all zero), bulk = the others."""
        if not measure:
            return zero, zero
        cut = b - a if edge_from is None else min(b - a, max(0, edge_from - a))
        bulk = matrices_deviation(values[:cut])
        if cut == b - a:
            return bulk, zero
        sites = values[cut:].reshape(-1, d, n, n)  # whole sites of the last time slice
        space = matrices_deviation(sites[:, : d - 1].reshape(-1, n, n))
        edge = matrices_deviation(sites[:, d - 1])
        return (max(bulk[0], space[0]), max(bulk[1], space[1])), edge

    def task(piece: tuple[Any, list[tuple[int, int]]]) -> tuple[bool, tuple[float, float], tuple[float, float]]:
        index, runs = piece
        if not contiguous:  # one run: file order, straight into place where the values allow
            ((a, b),) = runs
            if precision == 64 and stored.isnative:  # read in place
                buf = flat[a * n * n : b * n * n].view(np.uint8)
                fill(buf, a * unit)
                _call(on_chunk, on_piece, buf, a * unit)
                finite = _finite_piece(buf, np.float64)
                return (finite, *deviations(buf.view(np.complex128).reshape(-1, n, n), a, b))
        own_raw, own_native = scratch.get()
        try:
            size = sum(b - a for a, b in runs) * unit
            raw = own_raw[:size]
            at = 0
            for a, b in runs:  # the runs of the piece, one after the other in the scratch
                part = raw[at : at + (b - a) * unit]
                fill(part, a * unit)
                _call(on_chunk, on_piece, part, a * unit)
                at += (b - a) * unit
            if not contiguous:
                ((a, b),) = runs
                if precision == 64:  # swap straight into place
                    buf = flat[a * n * n : b * n * n].view(np.uint8)
                    finite = compiled.swap_copy(buf, raw, 8, not stored.isnative)
                    return (finite, *deviations(buf.view(np.complex128).reshape(-1, n, n), a, b))
                piece_values = flat[a * n * n : b * n * n]  # 32-bit file order: widen into place
                with np.errstate(invalid="ignore"):
                    np.copyto(piece_values, raw.view(stored))
                return (_finite_piece(piece_values, np.float64), *deviations(piece_values.reshape(-1, n, n), a, b))
            buf = (own_raw if stored.isnative else own_native)[:size]
            # now native, in cache; finiteness checked in the same pass
            finite = compiled.swap_copy(buf, raw, word, not stored.isnative)
            bulk, edge = zero, zero
            if precision == 64 and measure:
                values = buf.view(np.complex128).reshape(-1, n, n)
                (a, b) = runs[-1]  # the last time slice's run: the only one holding edge links
                head = values.shape[0] - (b - a)
                bulk, edge = deviations(values[head:], a, b)
                if head:  # the earlier runs: bulk links only, checked in one call
                    more = matrices_deviation(values[:head])
                    bulk = (max(bulk[0], more[0]), max(bulk[1], more[1]))
            if len(runs) > 1 and slice_offsets is not None and placed is not None:
                a, b = runs[0]  # a tile: each block's L_t copies make one run of the output
                if compiled.copy_blocks(
                    buf, placed, slice_offsets[a:b], unit, len(runs), (b - a) * unit, dst.strides[0], True
                ):
                    return (finite, bulk, edge)
            target = dst[index]
            source = buf.view(block).reshape(target.shape)
            if len(runs) > 1:  # a tile: copy with the time index innermost (runs of the output)
                target, source = np.moveaxis(target, 0, -1), np.moveaxis(source, 0, -1)
            np.copyto(target, source)
            return (finite, bulk, edge)
        finally:
            scratch.put((own_raw, own_native))

    try:
        results = map_pieces(task, pieces, nthreads)
    finally:
        _give_scratch(kept)
    finite = all(r[0] for r in results)
    if narrow is not None:
        native = stored.newbyteorder("=")
        with np.errstate(invalid="ignore"):  # NaN payloads are reported by flowplug.io.read
            np.copyto(out[0], narrow.view(native).reshape(d, *lattice, n, n))
    links = torch.from_numpy(out if contiguous else from_ildg(out)[None])
    if finite:
        mark_finite(links)
    if measure:
        bulk = (max(r[1][0] for r in results), max(r[1][1] for r in results))
        edge = (max(r[2][0] for r in results), max(r[2][1] for r in results))
        mark_group_deviations(links, [(bulk, edge)])
    return links


def _block_offsets(view: np.ndarray, base: np.ndarray) -> np.ndarray | None:
    """Byte offsets in ``base`` of the items of ``view`` (a strided view into it), in C order.

    Returns:
        int64 array of ``view.size`` entries, or ``None`` when a stride is negative or the
        view does not start inside ``base`` (the caller then copies with numpy).
    """
    start = view.__array_interface__["data"][0] - base.__array_interface__["data"][0]
    if start < 0 or start >= base.nbytes or any(st < 0 for st in view.strides):
        return None
    offsets = np.full((1,) * view.ndim, start, dtype=np.int64)
    for axis, (size, stride) in enumerate(zip(view.shape, view.strides, strict=True)):
        shape = [1] * view.ndim
        shape[axis] = size
        offsets = offsets + (np.arange(size, dtype=np.int64) * stride).reshape(shape)
    return offsets.reshape(-1)


def _tiles(file_shape: tuple[int, ...], unit: int) -> list[tuple[Any, list[tuple[int, int]]]]:
    """Pieces of a canonical read: the same run of sites of every time slice.

    Arguments:
        file_shape: (L_{d-1}, ..., L_0, d) in units of one N x N matrix, L_{d-1} = L_t > 1.
        unit: Bytes per matrix.

    Returns:
        ``(index, runs)`` per piece: ``index`` selects the piece of an array of
        ``file_shape`` (all time slices, then the run's index within one time slice, as
        :func:`_file_chunks` gives it); ``runs`` are the matrix offsets ``(start, stop)`` in
        the flat payload, one per time slice, in time order. A piece holds about
        :data:`TILE_PIECES` x :data:`CHUNK_BYTES` (at least one site per time slice).
    """
    lt, inner = file_shape[0], file_shape[1:]
    per_slice = math.prod(inner)
    out = []
    for index, a, b in _file_chunks(inner, unit, max(1, TILE_PIECES * CHUNK_BYTES // lt)):
        out.append(((slice(None), *index), [(t * per_slice + a, t * per_slice + b) for t in range(lt)]))
    return out


def _call(
    on_chunk: Callable[[np.ndarray], None] | None,
    on_piece: Callable[[np.ndarray, int], None] | None,
    buf: np.ndarray,
    start: int,
) -> None:
    if on_chunk is not None:
        on_chunk(buf)
    if on_piece is not None:
        on_piece(buf, start)


def _to_native(dst: np.ndarray, src: np.ndarray, stored: np.dtype) -> None:
    """Copy the stored bytes ``src`` (uint8) into ``dst`` (uint8, same size) in native byte order.

    A byte-swapping copy of the real and imaginary words as unsigned integers (bit for bit,
    NaN payloads included): about the cost of a plain copy, two to three times cheaper than
    numpy's in-place ``byteswap``. A plain copy when ``stored`` is native already.
    """
    if stored.isnative:
        if dst.ctypes.data != src.ctypes.data:
            np.copyto(dst, src)
        return
    word = _in_order(f"u{stored.itemsize // 2}", stored.byteorder)
    np.copyto(dst.view(word.newbyteorder("=")), src.view(word))


def _to_stored(dst: np.ndarray, src: np.ndarray, stored: np.dtype) -> None:
    """Copy native values ``src`` (uint8 view) into ``dst`` (uint8, same size) in the byte order
    of ``stored``: the inverse of :func:`_to_native` (a byte swap is its own inverse)."""
    _to_native(dst, src, stored)


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
    *,
    on_piece: Callable[[np.ndarray, int], None] | None = None,
    threads: int | None = None,
) -> int:
    """Write the stored ILDG payload of one canonical configuration to an open file.

    The bytes are those of :func:`canonical_to_ildg`, produced and written in pieces of
    about :data:`CHUNK_BYTES` (no payload-sized temporary array). With ``threads`` > 1
    the pieces are gathered, byte swapped and passed to ``on_piece`` on a pool of
    threads (numpy releases the GIL) while the calling thread writes the finished ones
    in file order; the bytes are the same whatever the number. The payload's disk space
    is reserved first (:func:`_reserve`).

    Arguments:
        fh: A binary file open for writing.
        links, precision, byteorder: As in :func:`canonical_to_ildg`.
        on_chunk: Called with every piece (uint8, whole sites, file order) before it is
            written, in order, in the calling thread.
        on_piece: Called as ``on_piece(piece, start)`` with every piece and its byte
            offset in the payload, in any order and possibly from several threads at
            once (for example :meth:`~flowplug.adapters.checksums.ScidacChecksum.update_at`).
        threads: Threads producing pieces; default :func:`flowplug.linkcheck.io_threads`.

    Returns:
        The number of bytes written.

    Raises:
        ShapeError: if ``links`` is not shaped (d, L_0, ..., L_{d-1}, N, N).
    """
    can = _canonical_array(links)
    chunks, largest, produce = _ildg_producer(can, precision, byteorder)
    nthreads = _threads_for(can.size * complex_dtype(precision).itemsize, threads, len(chunks))
    _reserve(fh, chunks[-1][2] * can.shape[-1] ** 2 * complex_dtype(precision).itemsize)
    total = 0
    if nthreads <= 1:
        (scratch,) = kept = _take_scratch(1, largest)
        try:
            for chunk in chunks:
                piece, start, stop = produce(chunk, scratch)
                if on_piece is not None:
                    on_piece(piece, start)
                if on_chunk is not None:
                    on_chunk(piece)
                fh.write(memoryview(piece))  # type: ignore[arg-type]  # numpy's stubs give ndarray __buffer__ only for Python >= 3.12
                total = stop
        finally:
            _give_scratch(kept)
        return total
    window = 2 * nthreads  # pieces in flight: the writer never waits for a free buffer
    kept = _take_scratch(window, largest)
    free = list(kept)

    def job(chunk: tuple[Any, int, int], buf: np.ndarray) -> tuple[np.ndarray, int, int, np.ndarray]:
        piece, start, stop = produce(chunk, buf)
        if on_piece is not None:
            on_piece(piece, start)
        return piece, start, stop, buf

    pending: deque = deque()
    items: list[tuple[Any, int, int] | None] = [*chunks, None]  # None: drain what is in flight
    with ThreadPoolExecutor(max_workers=nthreads, thread_name_prefix="flowplug-io") as pool:
        try:
            for item in items:
                while pending and (item is None or not free):
                    piece, _, stop, buf = pending.popleft().result()
                    if on_chunk is not None:
                        on_chunk(piece)
                    fh.write(memoryview(piece))
                    total = stop
                    free.append(buf)
                if item is not None:
                    pending.append(pool.submit(job, item, free.pop()))
        finally:
            for fut in pending:  # after a failure: let the started pieces finish before leaving
                fut.cancel()
    _give_scratch(kept)  # (not after a failure: a cancelled piece may still be running)
    return total


def _reserve(fh: Any, nbytes: int) -> None:
    """Reserve ``nbytes`` of disk space from the current position of the open file ``fh``.

    Linux ``fallocate(2)`` (what ``numpy.ndarray.tofile`` does before it writes): the
    file system then allocates the blocks at once instead of write by write (part of the
    ILDG write gain in ``benchmarks/io.py``, docs/io.md "Speed"). The bytes that follow must be
    written (the file is extended to the reserved end). Does nothing elsewhere, for small
    payloads, or when the call fails (a file system without it, a pipe).
    """
    if nbytes < PARALLEL_BYTES or not sys.platform.startswith("linux"):
        return
    try:
        fd = fh.fileno()
        fh.flush()
        start = os.lseek(fd, 0, os.SEEK_CUR)
        fallocate = ctypes.CDLL(None, use_errno=True).fallocate
        fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
        fallocate(fd, 0, start, nbytes)  # a failure (-1) leaves the file as it was: plain writes follow
    except (AttributeError, OSError, ValueError):
        return


def _canonical_array(links: torch.Tensor) -> np.ndarray:
    can = links.detach().cpu().resolve_conj().numpy()
    to_ildg(can)  # the shape check (a view; nothing is copied)
    if can.dtype not in (np.complex64, np.complex128):
        can = can.astype(np.complex128)
    return can


def _ildg_producer(
    can: np.ndarray, precision: int, byteorder: str
) -> tuple[list[tuple[Any, int, int]], int, Callable[[tuple[Any, int, int], np.ndarray], tuple[np.ndarray, int, int]]]:
    """How to make the stored bytes of canonical links ``can`` piece by piece, in any order.

    Returns ``(chunks, largest, produce)``: the pieces (:func:`_file_chunks`), the bytes
    of scratch memory one call needs (the largest piece, twice that when the blocks are
    gathered and then byte swapped), and ``produce(chunk, scratch) -> (piece, start, stop)``,
    which makes the uint8 bytes of one piece in ``scratch`` (the returned ``piece`` is a view of it)
    and gives their byte range in the payload. Values are first rounded (or widened) to
    the stored precision, keeping their memory order; each piece is then gathered as
    whole N x N blocks (or sliced, when the memory is in file order already: a
    file-order read) and byte swapped in cache by a swapping copy (:func:`_to_stored`).
    Calls on different pieces and scratch buffers are independent (they may run on
    several threads).
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
    largest = max(b - a for _, a, b in chunks) * unit
    block = _block(n, stored.itemsize)
    in_file_order = to_ildg(can)
    flat: np.ndarray | None = None
    src: np.ndarray | None = None
    placed: np.ndarray | None = None
    slice_offsets: np.ndarray | None = None
    per_slice = math.prod(lattice[:-1]) * d if d else 1
    if in_file_order.flags.c_contiguous:  # memory already in file order: no permutation
        flat = in_file_order.reshape(-1).view(np.uint8)
    else:
        contiguous = np.ascontiguousarray(can)
        blocks = contiguous.reshape(d, *lattice, n * n).view(block).reshape(d, *lattice, 1, 1)
        src = to_ildg(blocks)[..., 0, 0]
        if compiled.available() and d >= 1:  # the compiled gather: offsets of one time slice's blocks
            placed = contiguous.reshape(-1).view(np.uint8)
            slice_offsets = _block_offsets(src[0], placed)

    def gather(into: np.ndarray, index: Any, a: int, b: int) -> None:
        """The blocks of file-order matrices a..b-1 into ``into`` (uint8, (b - a) * unit bytes)."""
        assert src is not None
        if slice_offsets is not None and placed is not None:
            t, tstride = a // per_slice, src.strides[0]
            if (b - 1) // per_slice == t:  # within one time slice
                offsets = slice_offsets[a - t * per_slice : b - t * per_slice] + t * tstride
                if compiled.copy_blocks(into, placed, offsets, unit, 1, 0, 0, False):
                    return
            elif a % per_slice == 0 and b % per_slice == 0:  # whole time slices: one group per slice
                count = (b - a) // per_slice
                if compiled.copy_blocks(
                    into, placed, slice_offsets + t * tstride, unit, count, per_slice * unit, tstride, False
                ):
                    return
        np.copyto(into.view(block).reshape(src[index].shape), src[index])

    def produce(chunk: tuple[Any, int, int], scratch: np.ndarray) -> tuple[np.ndarray, int, int]:
        index, a, b = chunk
        buf = scratch[: (b - a) * unit]
        if src is None:
            assert flat is not None
            _to_stored(buf, flat[a * unit : b * unit], stored)
        elif stored.isnative:
            gather(buf, index, a, b)
        else:  # gather the native blocks behind ``buf``, then one swapping copy (cheaper than an in-place swap)
            gathered = scratch[largest : largest + (b - a) * unit]
            gather(gathered, index, a, b)
            _to_stored(buf, gathered, stored)
        return buf, a * unit, b * unit

    return chunks, largest if (src is None or stored.isnative) else 2 * largest, produce


def _ildg_pieces(can: np.ndarray, precision: int, byteorder: str) -> Iterator[tuple[np.ndarray, int, int]]:
    """Stored bytes of canonical links ``can``, in file order, piece by piece (one thread).

    Yields ``(piece, start, stop)``: a uint8 array (one reused buffer: consume it before
    the next piece) and its byte range in the payload (see :func:`_ildg_producer`).
    """
    chunks, largest, produce = _ildg_producer(can, precision, byteorder)
    scratch = np.empty(largest, dtype=np.uint8)
    for chunk in chunks:
        yield produce(chunk, scratch)


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
