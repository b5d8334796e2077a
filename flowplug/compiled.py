"""Compiled inner loops of the readers, with their numpy and zlib equivalents, and the
convolution kernels of the flows' float32 networks (:func:`conv_gather`,
:func:`conv_weight_grad`; torch's gathers and products where they are missing).

The extension module ``flowplug._compiled`` (``flowplug/_compiled.c``) is built by
``pip install`` when a C compiler is present (``optional`` in pyproject.toml: without one
the install goes on). When it is missing, or built from another version of the C file,
every function here runs numpy or zlib code that gives the same bytes, checksums and
finiteness verdicts, and the same group deviations up to the last bit of a modulus for
moduli between about 1e-154 and 1e154 (:func:`sun_deviation` squares before it takes the
root; outside that range the two differ, the verdict against a tolerance does not).
:func:`available` says which one runs; ``FLOWPLUG_COMPILED=0`` in the environment forces
numpy.

The compiled functions release the GIL, so :func:`flowplug.linkcheck.map_pieces` runs
them on several threads. Measured on one core (``benchmarks/io.py``, docs/io.md "Speed"):
the SU(3) group check 6x faster than numpy's, CRC-32 4x faster than zlib 1.2, the byte
swap with its finiteness proof 1.3x faster than numpy's swap and sum.
"""

from __future__ import annotations

import os
import warnings
import zlib
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "available",
    "fast_crc32",
    "crc32",
    "crc32_finite",
    "swap_copy",
    "copy_blocks",
    "sun_deviation",
    "xor_sites",
    "conv_available",
    "conv_gather",
    "conv_weight_grad",
    "NO_ZERO_ROW",
    "ABI",
]

#: The version of the C module's interface this file expects (``COMPILED_ABI`` in the C file).
ABI = 4


def _load() -> ModuleType | None:
    if os.environ.get("FLOWPLUG_COMPILED", "") == "0":
        return None
    try:
        from flowplug import _compiled  # type: ignore[attr-defined]
    except ImportError:
        return None
    if getattr(_compiled, "ABI", None) != ABI:
        warnings.warn(
            f"flowplug._compiled was built from another version (ABI {getattr(_compiled, 'ABI', None)}, "
            f"expected {ABI}); using numpy. Rebuild with `pip install -e .`",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return _compiled


_native: ModuleType | None = _load()


def available() -> bool:
    """Whether the compiled module is built, current and in use (else numpy)."""
    return _native is not None


def fast_crc32() -> bool:
    """Whether :func:`crc32` folds with carry-less products (compiled, on an x86-64 CPU with
    PCLMULQDQ); else it is zlib's."""
    return _native is not None and bool(getattr(_native, "fast_crc32", 0))


def _bytes_of(data: np.ndarray | bytes | bytearray | memoryview) -> np.ndarray | bytes | bytearray | memoryview:
    if isinstance(data, np.ndarray):
        if not data.flags.c_contiguous:
            raise ValueError("crc32: the array must be C-contiguous")
        return data.reshape(-1).view(np.uint8)
    return data


def crc32(data: np.ndarray | bytes | bytearray | memoryview, value: int = 0) -> int:
    """zlib's CRC-32 of the bytes of ``data``, continuing from ``value`` (``zlib.crc32``'s result).

    With the compiled module on an x86-64 CPU with PCLMULQDQ (:func:`fast_crc32`) the
    bytes are folded 64 at a time with carry-less products (Gopal et al., Intel 2009),
    4x faster than zlib 1.2; elsewhere ``zlib.crc32``. Both give the same number.

    Arguments:
        data: Bytes, or a C-contiguous numpy array (its bytes in memory order).
        value: The CRC of the bytes before these (0 to start).

    Returns:
        The CRC as an int in [0, 2^32).

    Raises:
        ValueError: for a numpy array that is not C-contiguous.
    """
    raw = _bytes_of(data)
    if _native is not None and fast_crc32():
        return int(_native.crc32(raw, value & 0xFFFFFFFF))
    return zlib.crc32(raw, value)  # type: ignore[arg-type]  # numpy's stubs give ndarray __buffer__ only for Python >= 3.12


def crc32_finite(values: np.ndarray, value: int = 0) -> tuple[int, bool]:
    """:func:`crc32` of the bytes of ``values`` and whether they hold no NaN or Inf, in one pass.

    Arguments:
        values: C-contiguous float32/float64/complex64/complex128 array, either byte order
            (the compiled pass takes native order; the other goes through zlib and numpy).
        value: As in :func:`crc32`.

    Returns:
        ``(crc, finite)``.

    Raises:
        ValueError: for another dtype or an array that is not C-contiguous.
    """
    word = values.dtype.itemsize // (2 if values.dtype.kind == "c" else 1)
    if values.dtype.kind not in "fc" or word not in (4, 8):
        raise ValueError(f"crc32_finite: expected float32/64 or complex64/128 values, found {values.dtype}")
    raw = _bytes_of(values)
    if _native is not None and fast_crc32() and values.dtype.isnative:
        crc, finite = _native.crc32(raw, value & 0xFFFFFFFF, word)
        return int(crc), bool(finite)
    flat = values.reshape(-1)
    real = flat.view(flat.real.dtype)  # the float words, in the array's byte order
    return zlib.crc32(raw, value), bool(np.isfinite(real).all())  # type: ignore[arg-type]


def _word_view(values: np.ndarray, word: int) -> np.ndarray:
    return values.reshape(-1).view(np.uint8).view(f"u{word}")


def swap_copy(dst: np.ndarray, src: np.ndarray, word: int, swap: bool) -> bool:
    """Copy ``src`` into ``dst`` (byte swapping each ``word``-byte word when ``swap``) and
    tell whether every word, read as a float of that size in ``dst``, is finite.

    Arguments:
        dst: C-contiguous, writable, the same number of bytes as ``src`` (any dtype; the
            bytes are what counts). May be ``src`` itself (an in-place swap).
        src: C-contiguous.
        word: 4 (float32 words) or 8 (float64 words).
        swap: Reverse the bytes of every word (big- to little-endian and back).

    Returns:
        True when no word of the result is a NaN or an Inf (exponent bits not all set).

    Raises:
        ValueError: for another word size, different sizes, a size not a multiple of
            ``word``, or an array that is not C-contiguous.
    """
    if word not in (4, 8):
        raise ValueError(f"swap_copy: word must be 4 or 8 bytes, found {word}")
    if dst.nbytes != src.nbytes or src.nbytes % word:
        raise ValueError(f"swap_copy: {src.nbytes} source and {dst.nbytes} destination bytes")
    if not (dst.flags.c_contiguous and src.flags.c_contiguous):
        raise ValueError("swap_copy: source and destination must be C-contiguous")
    if _native is not None:
        return bool(_native.swap_copy(src.reshape(-1).view(np.uint8), dst.reshape(-1).view(np.uint8), word, swap))
    s, d = _word_view(src, word), _word_view(dst, word)
    if swap:
        np.copyto(d, s.view(s.dtype.newbyteorder()))
    elif d.ctypes.data != s.ctypes.data:
        np.copyto(d, s)
    exponent = np.uint64(0x7FF0000000000000) if word == 8 else np.uint32(0x7F800000)
    return not bool(np.any((d & exponent) == exponent))


def copy_blocks(
    packed: np.ndarray,
    placed: np.ndarray,
    offsets: np.ndarray,
    unit: int,
    count: int,
    pstride: int,
    ostride: int,
    gather: bool,
) -> bool:
    """Move blocks between a packed buffer and their places, compiled; ``False`` (nothing
    done) when the compiled module is not in use, so that the caller copies with numpy.

    Block ``i`` (``unit`` bytes) of group ``t`` (``0 <= t < count``) lies at byte
    ``i * unit + t * pstride`` of ``packed`` and at byte ``offsets[i] + t * ostride`` of
    ``placed``. ``gather`` copies packed -> placed, else placed -> packed. The canonical
    ILDG read uses it for the permuted copy of a tile into the canonical layout (one group
    per time slice, ``ostride`` one matrix: each block's groups are a run of the output),
    the ILDG writer for the gather of a piece from the canonical links (placed -> packed).
    On x86-64 a packed -> placed copy of 16-byte multiples writes with non-temporal
    (streaming) stores wherever the placed block, ``placed`` itself and ``ostride`` are
    16-byte aligned, and fences them (``sfence``) before it returns, so the bytes are
    visible to any thread that synchronises with the caller afterwards. Measured on a
    16^4 SU(3) tile copy (one core, 7 pairs): 2.4x numpy's strided copy of one void item
    per matrix into memory already touched, 1.6-1.7x into a new array (page faults
    included), as the reader's is (docs/io.md).

    Arguments:
        packed, placed: C-contiguous arrays (their bytes count; any dtype); only the one
            written to (``placed`` for a gather, else ``packed``) need be writable. They
            must not overlap.
        offsets: int64, C-contiguous and aligned, byte offsets in ``placed``, one per block.

    Raises:
        ValueError: if a block of either side would lie outside its array, a stride or an
            offset is negative, ``unit`` is not positive, an array is not C-contiguous, the
            array written to is read-only, or ``offsets`` is misaligned.
    """
    if _native is None:
        return False
    for a in (packed, placed, offsets):
        if not a.flags.c_contiguous:
            raise ValueError("copy_blocks: the arrays must be C-contiguous")
    _native.copy_blocks(
        packed.reshape(-1).view(np.uint8),
        placed.reshape(-1).view(np.uint8),
        np.asarray(offsets, dtype=np.int64).reshape(-1),
        unit,
        count,
        pstride,
        ostride,
        gather,
    )
    return True


def sun_deviation(values: np.ndarray) -> tuple[float, float] | None:
    """``(max |U U^+ - 1|, max |det U - 1|)`` of a stack of SU(2) or SU(3) matrices, compiled;
    ``None`` when the compiled module is not in use.

    The entries of U U^+ are the squared row norms (diagonal) and the row products
    sum_k U_ik conj(U_jk); the determinant is expanded along row 0. The moduli are the
    square roots of the largest squared moduli (so a modulus beyond about 1e154 reads as
    inf, one below 1e-154 as 0). A term that is NaN counts as 0 (the other entries of the
    matrix still count); :func:`flowplug.io.read` rejects NaN before it looks at these.
    :func:`flowplug.linkcheck.matrices_deviation` calls it and otherwise computes the
    same quantities with numpy (equal up to the last bit of a modulus in that range).

    Arguments:
        values: (m, N, N) complex128, N = 2 or 3, any strides and alignment (copied to an
            aligned C-order array when needed).

    Raises:
        ValueError: for another shape or dtype.
    """
    if _native is None:
        return None
    if values.ndim != 3 or values.shape[1:] not in ((2, 2), (3, 3)) or values.dtype != np.complex128:
        raise ValueError(f"sun_deviation: expected (m, N, N) complex128, N = 2, 3; found {values.shape} {values.dtype}")
    values = np.require(values, requirements=("C", "A"))  # C order, aligned (the compiled loop reads doubles)
    unit, det = _native.sun_deviation(values.reshape(-1).view(np.uint8), values.shape[1])
    return float(unit), float(det)


def xor_sites(data: np.ndarray, acc: np.ndarray, site_bytes: int, first_site: int) -> bool:
    """XOR site i of ``data`` into row (``first_site`` + i) mod R of ``acc``, compiled; ``False``
    (nothing done) when the compiled module is not in use.

    The reduction of :class:`flowplug.adapters.checksums.ScidacChecksum` (sites grouped by
    rank mod 29 x 31, CRC-32 being affine over GF(2)), which does it with numpy otherwise.

    Arguments:
        data: C-contiguous uint8, a whole number of sites.
        acc: C-contiguous, writable, (R, site_bytes) uint8.
        site_bytes: Bytes per site.
        first_site: Rank of the first site of ``data`` (>= 0).

    Raises:
        ValueError: for sizes that are not whole sites or a negative first site.
    """
    if _native is None:
        return False
    if not (data.flags.c_contiguous and acc.flags.c_contiguous):
        raise ValueError("xor_sites: data and accumulator must be C-contiguous")
    _native.xor_sites(data.reshape(-1).view(np.uint8), acc.reshape(-1).view(np.uint8), int(site_bytes), int(first_site))
    return True


# ------------------------------------------------------------------ network convolutions


#: The ``zero_row`` of a convolution without a row of zeros: no index equals it (-1 is an
#: index out of range, refused like any other).
NO_ZERO_ROW = -(2**62)


def conv_available() -> bool:
    """Whether :func:`conv_gather` and :func:`conv_weight_grad` run compiled here: the module
    is in use and the CPU is x86-64 with AVX2 and FMA (Linux). Elsewhere the coupling networks
    evaluate the same sums with torch's gathers and matrix products."""
    return _native is not None and bool(getattr(_native, "conv", 0))


#: (key, tensor or None, expected shape) of one argument of the kernels
_Arg = tuple[str, "torch.Tensor | None", tuple[int, ...]]


def _conv_checked(name: str, outs: tuple[_Arg, ...], ins: tuple[_Arg, ...]) -> None:
    """Refuse what the kernels cannot take: another dtype, device, layout or shape; a view with
    torch's lazy negation; an output that autograd tracks or that overlaps another argument (the
    kernels read their inputs while they write). For the public wrappers; the C functions
    check sizes and row indices themselves. Messages are built only for a refusal."""
    import torch

    f32, i64 = torch.float32, torch.int64
    args = outs + ins
    for key, t, shape in args:
        if t is not None and not (
            t.dtype is (i64 if key == "idx" else f32)
            and t.is_cpu
            and t.shape == shape
            and t.is_contiguous()
            and not t.is_neg()
        ):
            want = i64 if key == "idx" else f32
            if t.is_neg():
                raise ValueError(f"{name}: {key} is a negated view (torch._neg_view); pass t.resolve_neg()")
            raise ValueError(
                f"{name}: {key} must be a contiguous CPU {want} tensor of shape {shape}; "
                f"found {t.dtype} {tuple(t.shape)} on {t.device}" + ("" if t.is_contiguous() else ", not contiguous")
            )
    for out_key, out, _ in outs:
        if out is None or out.numel() == 0:
            continue
        if out.requires_grad:
            raise ValueError(f"{name}: {out_key} requires a gradient; the kernels write outside autograd")
        start = out.data_ptr()
        end = start + out.numel() * out.element_size()
        for key, t, _ in args:
            if t is None or t is out or t.numel() == 0:
                continue
            other = t.data_ptr()
            if other < end and start < other + t.numel() * t.element_size():
                raise ValueError(f"{name}: {out_key} overlaps {key} in memory; an output must be a tensor of its own")


def conv_gather(
    out: torch.Tensor,
    h: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    idx: torch.Tensor,
    *,
    transpose: bool = False,
    zero_row: int | None = None,
    slope: float = 0.0,
    mode: int = 0,
    gate: torch.Tensor | None = None,
) -> bool:
    """A periodic convolution in gathered form, compiled: ``out`` (Q, n, B) float32 becomes

        out[q, s, b] = bias[q] + sum_{a, t} W[q, a, t] h[a, idx[t n + s], b]

    with the sum over a and, within each a, over t in ascending order, one fused multiply-add
    per term; W = w (Q, A, T) or, with ``transpose``, W[q, a, t] = w[a, q, t] (w of shape
    (A, Q, T): the input gradient of the convolution w). Then ``mode`` 1 applies the LeakyReLU
    (x > 0 ? x : slope x) and ``mode`` 2 multiplies by its derivative at ``gate`` (gate > 0 ?
    1 : slope; gate of the shape of out). Each output entry goes through the same operations
    wherever it sits in the batch and however many threads share the work (the torch threads:
    ``torch.get_num_threads()``), so a configuration's output does not depend on its batch.
    The networks (:func:`flowplug.plugins.flow_nets.stack_forward` and ``stack_backward``)
    call the same C function through :func:`_conv_gather_unchecked`, without these checks.

    Arguments:
        out: (Q, n, B) float32, contiguous, written.
        h: (A, R, B) float32, contiguous: A channels of R rows of B batch entries.
        w: (Q, A, T) float32 (or (A, Q, T) with ``transpose``), contiguous; any shape with
            those entries in that order (a convolution's (Q, A, k, ..., k) weight).
        bias: (Q,) float32 or ``None`` (zero).
        idx: (T n,) int64, tap-major: the row of h that tap t of output site s reads, in
            0 .. R - 1, or ``zero_row`` for a row of zeros.
        zero_row: The index that reads a row of zeros; ``None``: none (every index must be a row).
        transpose, slope, mode, gate: As above.

    Returns:
        False (nothing done) when the kernels are not available here (:func:`conv_available`).

    Raises:
        ValueError: for a tensor of another dtype, device, layout or shape, or a bad mode.
        IndexError: for a row index outside 0 .. R - 1 that is not ``zero_row``.
    """
    if not conv_available():
        return False

    q, n, b = out.shape
    a, r = h.shape[0], h.shape[1]
    if q * a == 0:
        raise ValueError(f"conv_gather: {q} output and {a} input channels; both must be at least 1")
    if not w.is_contiguous():
        raise ValueError(f"conv_gather: w must be contiguous; found strides {w.stride()}")
    t = w.numel() // (q * a)
    if mode not in (0, 1, 2) or (mode == 2) != (gate is not None) or t == 0 or w.numel() != q * a * t:
        raise ValueError(
            f"conv_gather: mode {mode} with{'out' if gate is None else ''} a gate, w of shape {tuple(w.shape)} "
            f"for {q} output and {a} input channels"
        )
    _conv_checked(
        "conv_gather",
        (("out", out, (q, n, b)),),
        (
            ("h", h, (a, r, b)),
            ("w", w.view(-1), (q * a * t,)),
            ("bias", bias, (q,)),
            ("idx", idx, (t * n,)),
            ("gate", gate, (q, n, b)),
        ),
    )
    if out.numel() == 0:
        return True
    import torch

    zero = NO_ZERO_ROW if zero_row is None else int(zero_row)
    _conv_gather_unchecked(out, h, w, bias, idx, zero, float(slope), int(mode), gate, transpose)
    torch.autograd.graph.increment_version(out)  # written in place: what autograd saved of it is stale
    return True


def _conv_gather_unchecked(
    out: torch.Tensor,
    h: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    idx: torch.Tensor,
    zero_row: int,
    slope: float,
    mode: int,
    gate: torch.Tensor | None,
    transpose: bool,
) -> None:
    """:func:`conv_gather` without the Python-side checks, for the networks' own calls
    (:func:`flowplug.plugins.flow_nets.stack_forward`), whose tensors are contiguous float32
    CPU tensors by construction (fresh outputs, parameters and saved inputs checked by the
    caller). The C function still checks every size against each tensor's number of entries,
    and every row index, so a wrong shape is a ValueError, never a read outside a tensor;
    what it cannot see (dtype, layout) is the caller's to guarantee. Requires the kernels
    (:func:`conv_available`)."""
    q, n, b = out.shape
    a, r = h.shape[0], h.shape[1]
    wn = w.numel()
    t = wn // (q * a) if q * a else 0
    import torch

    _native.conv_gather(  # type: ignore[union-attr]
        out.data_ptr(),
        q * n * b,
        h.data_ptr(),
        h.numel(),
        w.data_ptr(),
        wn,
        0 if bias is None else bias.data_ptr(),
        0 if bias is None else bias.numel(),
        idx.data_ptr(),
        idx.numel(),
        0 if gate is None else gate.data_ptr(),
        0 if gate is None else gate.numel(),
        q,
        a,
        t,
        r,
        n,
        b,
        zero_row,
        t if transpose else a * t,
        q * t if transpose else t,
        1,
        slope,
        mode,
        torch.get_num_threads(),
    )


def conv_weight_grad(
    gw: torch.Tensor | None,
    gb: torch.Tensor | None,
    g: torch.Tensor,
    h: torch.Tensor,
    idx: torch.Tensor,
    *,
    zero_row: int | None = None,
) -> bool:
    """The weight and bias gradients of :func:`conv_gather` (``transpose`` False), compiled:

        gw[o, a, t] = sum_{s, b} g[o, s, b] h[a, idx[t n + s], b],   gb[o] = sum_{s, b} g[o, s, b]

    The sites are cut into at most 64 tiles set by n alone; each tile is summed in one order
    (batch entries in eight lanes, rows of ``zero_row`` skipped) and the tiles are added in
    order, so the result does not depend on the number of threads.

    Arguments:
        gw: (O, A, T) float32, contiguous, written (any shape with those entries in that
            order); or ``None``.
        gb: (O,) float32, written; or ``None``.
        g: (O, n, B) float32, contiguous: the gradient of the convolution's output.
        h: (A, R, B) float32, contiguous: its input.
        idx: (T n,) int64, as for :func:`conv_gather`.
        zero_row: A row index that reads zeros (skipped); ``None``: none.

    Returns:
        False (nothing done) when the kernels are not available here.

    Raises:
        ValueError, IndexError: as :func:`conv_gather`.
    """
    if not conv_available():
        return False
    if gw is None and gb is None:
        return True
    import torch

    o, n, b = g.shape
    a, r = h.shape[0], h.shape[1]
    if o * a == 0:
        raise ValueError(f"conv_weight_grad: {o} output and {a} input channels; both must be at least 1")
    t = idx.shape[0] // n if n else (gw.numel() // (o * a) if gw is not None and o * a else 1)
    if t == 0 or t * n != idx.shape[0]:
        raise ValueError(f"conv_weight_grad: {idx.shape[0]} row indices for {n} output sites")
    if gw is None:  # the bias gradient alone: the kernel writes both
        gw = torch.empty((o, a, t), dtype=torch.float32)
    if gw.numel() != o * a * t or not gw.is_contiguous():
        raise ValueError(
            f"conv_weight_grad: gw must be contiguous with {o} x {a} x {t} entries; found shape "
            f"{tuple(gw.shape)}, strides {gw.stride()}"
        )
    _conv_checked(
        "conv_weight_grad",
        (("gw", gw.view(-1), (o * a * t,)), ("gb", gb, (o,))),
        (("g", g, (o, n, b)), ("h", h, (a, r, b)), ("idx", idx, (t * n,))),
    )
    if g.numel() == 0:  # no terms: zero gradients
        gw.zero_()
        if gb is not None:
            gb.zero_()
        return True
    _conv_weight_grad_unchecked(gw, gb, g, h, idx, NO_ZERO_ROW if zero_row is None else int(zero_row))
    torch.autograd.graph.increment_version([t for t in (gw, gb) if t is not None])
    return True


def _conv_weight_grad_unchecked(
    gw: torch.Tensor, gb: torch.Tensor | None, g: torch.Tensor, h: torch.Tensor, idx: torch.Tensor, zero_row: int
) -> None:
    """:func:`conv_weight_grad` (gw required, batch and sites not empty) without the Python-side
    checks, for :func:`flowplug.plugins.flow_nets.stack_backward`; as
    :func:`_conv_gather_unchecked`, the C function checks every size and row index."""
    o, n, b = g.shape
    a, r = h.shape[0], h.shape[1]
    gn = gw.numel()
    import torch

    _native.conv_weight_grad(  # type: ignore[union-attr]
        gw.data_ptr(),
        gn,
        0 if gb is None else gb.data_ptr(),
        0 if gb is None else gb.numel(),
        g.data_ptr(),
        o * n * b,
        h.data_ptr(),
        h.numel(),
        idx.data_ptr(),
        idx.numel(),
        o,
        a,
        gn // (o * a) if o * a else 0,
        r,
        n,
        b,
        zero_row,
        torch.get_num_threads(),
    )
