"""Checks of field values: finiteness, SU(N) group membership, open boundaries, precision.

:func:`flowplug.io.read` runs them on every configuration it reads (NaN/Inf are an
error, links off the group a :class:`NonUnitaryWarning`, failed stored check values a
:class:`ChecksumError`); ``flowplug info`` reports the deviations; writers ask
:func:`float32_exact` whether a 32-bit write would round. Layouts are those of
:mod:`flowplug.ensemble` (DESIGN.md section 2).
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from typing import TypeVar

import numpy as np
import torch

from flowplug import compiled
from flowplug.ensemble import Ensemble
from flowplug.errors import ChecksumError, FormatError, NonUnitaryWarning, ShapeError
from flowplug.theory import SUNSpace

__all__ = [
    "unitarity_tolerance",
    "open_time_boundary",
    "link_deviations",
    "check_links",
    "is_sun",
    "group_deviation",
    "float32_exact",
    "raise_failed_checks",
    "mark_finite",
    "io_threads",
    "map_pieces",
    "group_check_wanted",
    "wanting_group_check",
    "mark_group_deviations",
    "matrices_deviation",
]

_T = TypeVar("_T")
_R = TypeVar("_R")


def io_threads() -> int:
    """Threads that flowplug's readers, writers and value checks use: torch's intra-op setting.

    That is ``torch.get_num_threads()``: one per core by default, ``OMP_NUM_THREADS``
    when set, and the ``threads`` key of a job (:mod:`flowplug.threads`, default 1)
    inside one. With 1 everything runs in the calling thread, as before threads were used.
    """
    return max(1, int(torch.get_num_threads()))


def map_pieces(fn: Callable[[_T], _R], items: Sequence[_T], threads: int | None = None) -> list[_R]:
    """``[fn(item) for item in items]``, on a pool of ``threads`` threads when that is > 1.

    For work that spends its time in numpy, zlib or file reads, which release the GIL
    (byte swaps, checksums, the value checks, copies), so that pieces of one
    configuration are processed on several cores at once.

    Arguments:
        fn: Called once per item; calls on different items must not conflict.
        items: The pieces.
        threads: Pool size; default :func:`io_threads`. The pool never has more threads
            than items.

    Returns:
        The results, in the order of ``items``.

    Raises:
        Exception: whatever ``fn`` raised for the first failing item, in the order of
            ``items`` (the items not started yet are dropped; the running calls finish
            first).
    """
    n = min(io_threads() if threads is None else max(1, int(threads)), len(items))
    if n <= 1:
        return [fn(item) for item in items]
    pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="flowplug-io")
    try:
        futures = [pool.submit(fn, item) for item in items]
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def unitarity_tolerance(precision: int, n_colors: int = 3) -> float:
    """Largest max |U U^+ - 1| (and |det U - 1|) accepted silently for a storage precision.

    About 30 N units of roundoff of 32-bit storage: 1.1e-5 for SU(3) at 32 bits; at 64
    bits 1e-6, loose enough for double-precision files holding data that were once
    rounded to 32 bits (deviations ~5e-7), tight enough to flag real damage.
    """
    if precision == 32:
        return 30.0 * n_colors * 1.2e-7
    return 1e-6


def open_time_boundary(links: torch.Tensor) -> list[bool]:
    """Which configurations have open boundary conditions in time (CLS/openQCD style).

    openQCD stores a configuration generated with open boundaries with every
    time-direction link on the last time slice, U_t(x, t = T - 1), set to zero. Those
    links are not group elements; they mark the boundary.

    Arguments:
        links: SU(N) links (B, d, L_0, ..., L_{d-1}, N, N); the time direction is the
            last one (mu = d - 1, lattice axis L_{d-1}).

    Returns:
        One bool per configuration: True when all those links are exactly zero (False
        for U(1) links and for d < 2 or T < 2).
    """
    n = int(links.shape[0])
    if not links.is_complex() or links.dim() < 5 or links.numel() == 0:
        return [False] * n
    d = int(links.shape[1])
    if d < 2 or int(links.shape[1 + d]) < 2:
        return [False] * n
    last = links[:, d - 1].select(d, -1).detach()  # (B, L_0..L_{d-2}, N, N): U_t(x, T - 1)
    # numpy, not torch: a torch op this large would wake torch's OpenMP threads, whose
    # spinning afterwards takes a core from the threads of the checks that follow
    values = last.cpu().resolve_conj().numpy()
    return [not bool(np.any(values[i])) for i in range(n)]


def is_sun(ensemble: Ensemble) -> bool:
    """Whether ``ensemble`` holds SU(N) links (the fields whose group membership is checked)."""
    return isinstance(ensemble.space, SUNSpace)


def link_deviations(ensemble: Ensemble) -> list[tuple[float, float]]:
    """``(max |U U^+ - 1|, max |det U - 1|)`` of each configuration (SU(N) only).

    The zero time links of a configuration with open boundaries in time (see
    :func:`open_time_boundary`) are left out: they mark the boundary and are not
    group elements.

    Arguments:
        ensemble: SU(N) links (B, d, L_0, ..., L_{d-1}, N, N), complex128.

    Returns:
        One pair of floats per configuration.

    Raises:
        ShapeError: if the ensemble does not hold SU(N) links.
    """
    if not is_sun(ensemble):
        raise ShapeError(f"link deviations are defined for SU(N) links; the ensemble holds {ensemble.describe_field()}")
    links = ensemble.links
    d = ensemble.ndim
    opens = open_time_boundary(links)
    known = _known_deviations(links)
    if known is not None and len(known) == len(opens):  # measured by the reader, in cache
        return [
            bulk if is_open else (max(bulk[0], edge[0]), max(bulk[1], edge[1]))
            for (bulk, edge), is_open in zip(known, opens, strict=True)
        ]
    out = []
    for i, is_open in enumerate(opens):
        if not is_open:
            out.append(group_deviation(links[i : i + 1]))
            continue
        space = group_deviation(links[i : i + 1, : d - 1])
        time_ = group_deviation(links[i : i + 1, d - 1 :].narrow(1 + d, 0, links.shape[1 + d] - 1))
        out.append((max(space[0], time_[0]), max(space[1], time_[1])))
    return out


#: Tensors a reader has already proven free of NaN/Inf: id -> (weak reference, version then).
#: (Keyed by id: a WeakKeyDictionary would compare tensors with ``==``.)
_KNOWN_FINITE: dict[int, tuple[weakref.ref, int]] = {}


def mark_finite(values: torch.Tensor) -> None:
    """Record that ``values`` holds no NaN or Inf (a reader checked it while the data were in cache).

    The next :func:`check_links` of the same tensor (the one :func:`flowplug.io.read`
    makes right after the reader) skips its own pass over the values; the record is
    used once, and voided by an in-place change of the tensor (its version counter).
    """
    key = id(values)
    ref = weakref.ref(values, lambda _, key=key: _KNOWN_FINITE.pop(key, None))  # type: ignore[misc]
    _KNOWN_FINITE[key] = (ref, values._version)


def _known_finite(values: torch.Tensor) -> bool:
    """Whether ``values`` was marked by :func:`mark_finite` and not changed since (uses the mark)."""
    entry = _KNOWN_FINITE.pop(id(values), None)
    return entry is not None and entry[0]() is values and entry[1] == values._version


#: Whether the :func:`flowplug.io.read` running in this context will check group membership.
_GROUP_CHECK_WANTED: ContextVar[bool] = ContextVar("flowplug_group_check_wanted", default=False)


@contextlib.contextmanager
def wanting_group_check(wanted: bool) -> Iterator[None]:
    """Tell the readers called inside the block whether group membership will be checked.

    :func:`flowplug.io.read` wraps the format handler's read in it (``wanted`` unless
    ``unitarity="ignore"``), so that a reader that holds the values in cache piece by
    piece can measure the deviations there (:func:`mark_group_deviations`) instead of
    :func:`check_links` making a second pass over memory.
    """
    token = _GROUP_CHECK_WANTED.set(bool(wanted))
    try:
        yield
    finally:
        _GROUP_CHECK_WANTED.reset(token)


def group_check_wanted() -> bool:
    """Whether the running :func:`flowplug.io.read` will check group membership (see
    :func:`wanting_group_check`); ``False`` outside one."""
    return _GROUP_CHECK_WANTED.get()


#: Group deviations a reader measured: id -> (weak reference, version then, per configuration
#: ((unit, det) of the bulk, (unit, det) of the time links on the last time slice)).
_KNOWN_DEVIATIONS: dict[int, tuple[weakref.ref, int, list]] = {}


def mark_group_deviations(
    values: torch.Tensor, deviations: Sequence[tuple[tuple[float, float], tuple[float, float]]]
) -> None:
    """Record the group deviations of SU(N) links that a reader measured piece by piece.

    The next :func:`link_deviations` of the same tensor (the one of the
    :func:`check_links` that :func:`flowplug.io.read` makes after the reader) uses them
    instead of a pass over the values; the record is used once, and voided by an
    in-place change of the tensor (its version counter). The maxima must be those
    :func:`group_deviation` would give (the same per-matrix arithmetic, any chunking).

    Arguments:
        values: The links (B, d, L_0, ..., L_{d-1}, N, N), complex128.
        deviations: Per configuration ``(bulk, edge)``: ``(max |U U^+ - 1|, max |det U - 1|)``
            of every link but the time-direction links on the last time slice (bulk), and
            of those (edge: left out when they are all zero, an open boundary).
    """
    key = id(values)
    ref = weakref.ref(values, lambda _, key=key: _KNOWN_DEVIATIONS.pop(key, None))  # type: ignore[misc]
    _KNOWN_DEVIATIONS[key] = (ref, values._version, [tuple(map(tuple, dev)) for dev in deviations])


def _known_deviations(values: torch.Tensor) -> list | None:
    """The deviations marked by :func:`mark_group_deviations` if ``values`` is unchanged since (uses the mark)."""
    entry = _KNOWN_DEVIATIONS.pop(id(values), None)
    if entry is None or entry[0]() is not values or entry[1] != values._version:
        return None
    return entry[2]


def check_links(
    ensemble: Ensemble, *, source: str = "data", unitarity: str = "warn", finite: bool = True
) -> dict[str, float]:
    """Check that field values are finite and (for SU(N) links) on the group.

    Arguments:
        ensemble: The field to check (any kind; the group check applies to SU(N) only).
        source: Name used in messages (the file).
        unitarity: ``"warn"`` (default: :class:`NonUnitaryWarning` with the deviation),
            ``"error"`` (raise :class:`FormatError`) or ``"ignore"``.
        finite: Check for NaN/Inf (skip when done already).

    Returns:
        ``{"unitarity": max |U U^+ - 1|, "determinant": max |det U - 1|}`` over the
        ensemble (empty for U(1) and site fields). The zero time links on the last time slice of a
        configuration with open boundaries (:func:`open_time_boundary`) are not counted.

    Raises:
        FormatError: on NaN or Inf values (naming the first bad configuration and
            link), or on non-unitary links when ``unitarity="error"``.
    """
    links = ensemble.links
    if finite and not _known_finite(links):
        flat = _memory_order(links.detach().cpu().resolve_conj().numpy())
        if not _all_finite(flat):
            ok = torch.isfinite(torch.view_as_real(links) if links.is_complex() else links)
            bad = (~ok).nonzero()[0].tolist()
            where = (
                f"direction {bad[1]}, site {tuple(bad[2 : 2 + ensemble.ndim])}"
                if ensemble.is_gauge
                else f"site {tuple(bad[1 : 1 + ensemble.ndim])}"
            )
            raise FormatError(
                f"{source}: payload holds NaN or Inf values (first at configuration "
                f"{bad[0]}, {where}); the file is corrupt"
            )
    if not is_sun(ensemble) or unitarity == "ignore":
        return {}
    devs = link_deviations(ensemble)
    unit = max((u for u, _ in devs), default=0.0)
    det = max((v for _, v in devs), default=0.0)
    tol = unitarity_tolerance(ensemble.precision, ensemble.n_colors)
    worst = max(unit, det)
    if worst > tol:
        group = str(ensemble.group)  # "su<N>" (is_sun above)
        text = (
            f"{source}: links are not in {group.upper()}: max |U U^+ - 1| = {unit:.3g}, "
            f"max |det U - 1| = {det:.3g} (tolerance {tol:.1g} at {ensemble.precision}-bit precision)"
        )
        if unitarity == "error":
            raise FormatError(text + "; read with unitarity='warn' to accept them")
        if unitarity == "warn":
            warnings.warn(text, NonUnitaryWarning, stacklevel=3)
    return {"unitarity": unit, "determinant": det}


def _memory_order(values: np.ndarray, keep: int = 0) -> np.ndarray:
    """``values`` with its axes (but the last ``keep``) reordered to follow memory, when that
    makes it C-contiguous (a permuted view such as a file-order read); else ``values``.

    The checks here are maxima and sums over all entries, independent of the axis order,
    so a permuted array can be reduced in memory order without a copy.
    """
    if values.flags.c_contiguous or values.ndim <= keep + 1:
        return values
    lead = sorted(range(values.ndim - keep), key=lambda k: -abs(values.strides[k]))
    out = values.transpose(*lead, *range(values.ndim - keep, values.ndim))
    return out if out.flags.c_contiguous else values


def _all_finite(values: np.ndarray) -> bool:
    """Whether no value of a numpy array is NaN or Inf.

    A NaN or Inf makes the sum non-finite, so a finite sum (one pass, no temporary
    array) proves it; only a non-finite sum (a bad value, or huge finite values whose
    sum overflows) is settled element by element.
    """
    if values.dtype.kind == "c" and values.flags.c_contiguous:
        values = values.view(values.real.dtype)
    if values.dtype.kind == "f":
        if values.flags.c_contiguous and values.size >= 2 * _FINITE_PIECE:  # pieces, on io_threads() threads
            flat = values.reshape(-1)
            starts = range(0, flat.size, _FINITE_PIECE)
            if all(map_pieces(lambda a: _finite_sum(flat[a : a + _FINITE_PIECE]), starts)):
                return True
        elif _finite_sum(values):
            return True
    return bool(np.isfinite(values).all())


#: Numbers per piece of the parallel finiteness proof (4 MiB of float64).
_FINITE_PIECE = 1 << 19


def _finite_sum(values: np.ndarray) -> bool:
    """Whether the sum of ``values`` (floats) is finite: then none of them is NaN or Inf."""
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(values.sum()))


def group_deviation(links: torch.Tensor) -> tuple[float, float]:
    r"""``(max |U U^+ - 1|, max |det U - 1|)`` over all SU(N) links of a tensor.

    The same quantities as :func:`flowplug.gauge.unitarity_deviation` and
    :func:`flowplug.gauge.determinant_deviation` (maximum over the batch), evaluated for
    N = 2, 3 with explicit element-wise formulas on numpy arrays, in chunks of 16384
    matrices (5-10x faster than batched 3x3 matrix products on large lattices)
    spread over :func:`io_threads` threads (numpy releases the GIL; the result does not
    depend on the number of threads); other N use those functions.

    Arguments:
        links: SU(N) links (B, d, L..., N, N), complex128.

    Returns:
        Two floats.
    """
    n = links.shape[-1]
    if n not in (2, 3) or links.dtype != torch.complex128:
        from flowplug.gauge import determinant_deviation, unitarity_deviation

        return float(unitarity_deviation(links).max()), float(determinant_deviation(links).max())
    flat = _memory_order(links.detach().cpu().resolve_conj().numpy(), keep=2).reshape(-1, n, n)
    unit = det = 0.0  # (also for an empty tensor)
    starts = range(0, flat.shape[0], _GROUP_CHUNK)  # chunks keep the temporaries in cache
    for a, b in map_pieces(lambda start: _group_deviation_chunk(flat[start : start + _GROUP_CHUNK], n), starts):
        unit, det = max(unit, a), max(det, b)
    return unit, det


#: Matrices per chunk in :func:`group_deviation` (temporaries of 256 KiB each).
_GROUP_CHUNK = 16384


def matrices_deviation(values: np.ndarray) -> tuple[float, float]:
    """``(max |U U^+ - 1|, max |det U - 1|)`` of a numpy stack of SU(2) or SU(3) matrices.

    The per-matrix arithmetic of :func:`group_deviation` (so maxima over pieces combine to
    exactly its result), for readers that check pieces while they are in cache.

    Arguments:
        values: Shape (m, N, N), N = 2 or 3, complex128 (any strides); m may be 0.

    Returns:
        Two floats, 0.0 for an empty stack. A NaN entry's terms count as 0 in the compiled
        loop and can hide its chunk's deviations in the numpy one (no warning either way;
        :func:`check_links` rejects NaN before it looks at these).

    Raises:
        ShapeError: for another shape or dtype.
    """
    if values.ndim != 3 or values.shape[1:] not in ((2, 2), (3, 3)) or values.dtype != np.complex128:
        raise ShapeError(f"expected (m, N, N) complex128 matrices with N = 2, 3; found {values.shape} {values.dtype}")
    if values.shape[0] == 0:
        return 0.0, 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        return _group_deviation_chunk(values, values.shape[1])


def _group_deviation_chunk(u: np.ndarray, n: int) -> tuple[float, float]:
    """``(max |U U^+ - 1|, max |det U - 1|)`` of a chunk of matrices ``u`` (m, n, n), n = 2, 3.

    The compiled loop (:func:`flowplug.compiled.sun_deviation`) when it is built, 6x faster
    for SU(3); otherwise the numpy code below (the same quantities, equal up to the last
    bit of a modulus between about 1e-154 and 1e154: numpy takes each modulus with
    ``hypot``, the compiled loop the square root of the largest squared modulus). Without
    the compiled loop a NaN can hide the deviations of its whole chunk.

    The numpy code: the chunk is first copied to structure-of-arrays form (entry (i, k) of every matrix
    contiguous), so that every product below runs over contiguous memory (about 15%
    faster than on the strided entries). Entries of U U^+: the squared row norms
    |U_i.|^2 on the diagonal, the row products sum_k U_ik conj(U_jk) off it; max |x - 1|
    over the norms is max(max x - 1, 1 - min x). A NaN in the chunk can hide the chunk's
    deviations; :func:`check_links` rejects NaN before.
    """
    fast = compiled.sun_deviation(u)
    if fast is not None:
        return fast
    m = u.shape[0]
    s = np.empty((n * n, m), dtype=np.complex128)
    np.copyto(s.T, u.reshape(m, n * n))
    e = s.reshape(n, n, m)
    parts = s.view(np.float64).reshape(n * n, m, 2)
    mod2 = parts[..., 0] * parts[..., 0]
    mod2 += parts[..., 1] * parts[..., 1]  # |U_ik|^2
    norms = mod2.reshape(n, n, m).sum(axis=1)  # |U_i.|^2, (n, m)
    unit = max(0.0, float(norms.max()) - 1.0, 1.0 - float(norms.min()))
    ec = np.conjugate(s).reshape(n, n, m)
    t = np.empty(m, dtype=np.complex128)
    for i in range(n):
        for j in range(i + 1, n):
            g = e[i, 0] * ec[j, 0]
            for k in range(1, n):
                np.multiply(e[i, k], ec[j, k], out=t)
                g += t
            unit = max(unit, float(np.abs(g).max()))
    if n == 2:
        d = e[0, 0] * e[1, 1]
        np.multiply(e[0, 1], e[1, 0], out=t)
        d -= t
    else:  # expansion along row 0, cofactors from rows 1 and 2
        c = e[1, 1] * e[2, 2]
        np.multiply(e[1, 2], e[2, 1], out=t)
        c -= t
        d = e[0, 0] * c
        np.multiply(e[1, 2], e[2, 0], out=c)
        np.multiply(e[1, 0], e[2, 2], out=t)
        c -= t
        c *= e[0, 1]
        d += c
        np.multiply(e[1, 0], e[2, 1], out=c)
        np.multiply(e[1, 1], e[2, 0], out=t)
        c -= t
        c *= e[0, 2]
        d += c
    d -= 1
    return unit, max(0.0, float(np.abs(d).max()))


def float32_exact(values: torch.Tensor | np.ndarray) -> bool:
    """Whether every number in ``values`` is exactly representable in float32.

    Checked in chunks of 2^20 numbers (no full-size temporary copy); NaN counts as exact.
    """
    arr = values.detach().cpu().resolve_conj().numpy() if isinstance(values, torch.Tensor) else values
    flat = np.ascontiguousarray(arr).reshape(-1)
    if flat.dtype in (np.complex64, np.float32):
        return True
    real = flat.view(np.float64) if flat.dtype == np.complex128 else flat.astype(np.float64, copy=False)
    for start in range(0, real.size, 1 << 20):
        chunk = real[start : start + (1 << 20)]
        with np.errstate(over="ignore", invalid="ignore"):
            if not np.array_equal(chunk.astype(np.float32).astype(np.float64), chunk, equal_nan=True):
                return False
    return True


def raise_failed_checks(ensemble: Ensemble, source: str) -> None:
    """Raise :class:`ChecksumError` for the first failed check of ``ensemble``.

    The message names the file, the quantity, the expected and the found value.
    """
    for i, m in enumerate(ensemble.meta):
        for c in m.checks:
            if not c.ok:
                where = f" (entry {i} of the {len(ensemble)} configurations read)" if len(ensemble) > 1 else ""
                tol = f" within {c.tolerance:g}" if c.tolerance else ""
                raise ChecksumError(
                    f"{source}{where}: {c.quantity} mismatch: expected {c.expected}{tol}, "
                    f"found {c.found} (file corrupt or truncated; verify=False / --no-verify "
                    "reads it anyway)"
                )
