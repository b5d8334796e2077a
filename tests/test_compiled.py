"""The compiled inner loops (flowplug._compiled) against zlib and numpy, and the numpy fallback.

Every function of :mod:`flowplug.compiled` must give what its numpy/zlib equivalent gives:
the same CRC-32 as zlib for every length, alignment and starting value, the same bytes
and finiteness verdict for byte swaps, and the same group deviations up to the last bit
of a modulus. The readers must give the same tensors and checks with and without the
compiled module.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import warnings
import zlib

import numpy as np
import pytest
import torch

from flowplug import compiled
from flowplug.linkcheck import group_deviation, matrices_deviation

needs_compiled = pytest.mark.skipif(not compiled.available(), reason="flowplug._compiled is not built here")


def test_extension_is_built_where_a_compiler_is():
    """pip builds the module wherever a C compiler and Python's headers are (as in CI); a
    missing build there would silently leave every user on the slow path."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    headers = os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
    if not (compiler and headers):
        pytest.skip("no C compiler or Python headers here: the numpy fallback is the product")
    if os.environ.get("FLOWPLUG_COMPILED", "") == "0":
        pytest.skip("FLOWPLUG_COMPILED=0 forces the fallback")
    assert compiled.available(), "flowplug._compiled did not build or is stale: run `pip install -e .`"


def test_environment_forces_numpy():
    code = "from flowplug import compiled; print(compiled.available(), compiled.fast_crc32())"
    env = {**os.environ, "FLOWPLUG_COMPILED": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_stale_build_is_refused(monkeypatch):
    """A module built from another version of the C file (another ABI number) is not used."""
    if not compiled.available():
        pytest.skip("flowplug._compiled is not built here")
    monkeypatch.setattr(compiled, "ABI", compiled.ABI + 1)
    with pytest.warns(RuntimeWarning, match="another version"):
        assert compiled._load() is None


LENGTHS = [*range(0, 200), 255, 256, 257, 1000, 4095, 4096, 65537, (1 << 20) + 3]


@pytest.mark.parametrize("offset", [0, 1, 5])
def test_crc32_equals_zlib_for_every_length_alignment_and_start(offset):
    rng = np.random.default_rng(offset)
    for n in LENGTHS:
        data = rng.integers(0, 256, n + offset, dtype=np.uint8)[offset:]
        for start in (0, 1, 0xDEADBEEF, 0xFFFFFFFF):
            assert compiled.crc32(data, start) == zlib.crc32(data, start), (n, start)
    assert compiled.crc32(b"123456789") == 0xCBF43926  # the CRC-32 check value


def test_crc32_in_pieces_equals_crc32_whole():
    data = np.random.default_rng(1).integers(0, 256, 100_003, dtype=np.uint8)
    crc = 0
    for a in range(0, data.size, 777):
        crc = compiled.crc32(data[a : a + 777], crc)
    assert crc == zlib.crc32(data)


@needs_compiled
def test_crc32_uses_carry_less_products_where_the_cpu_has_them():
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        pytest.skip("the carry-less path is x86-64 only")
    flags = open("/proc/cpuinfo").read()
    if " pclmulqdq " not in flags or " sse4_1 " not in flags:
        pytest.skip("this CPU has no PCLMULQDQ")
    assert compiled.fast_crc32()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.complex64, np.complex128])
@pytest.mark.parametrize("fallback", [False, True])
def test_crc32_finite_finds_every_nan_and_inf(dtype, fallback, monkeypatch):
    if fallback:
        monkeypatch.setattr(compiled, "_native", None)
    rng = np.random.default_rng(2)
    real = np.empty(0, dtype=dtype).real.dtype
    scale = 1e300 if real == np.float64 else 1e30  # huge values are finite too
    for n in (1, 3, 4, 7, 8, 9, 31, 32, 33, 100):
        values = (rng.normal(size=n) * scale).astype(dtype)
        crc, finite = compiled.crc32_finite(values, 7)
        assert crc == zlib.crc32(values, 7) and finite
        flat = values.view(real)
        for pos in range(flat.size):
            for bad in (np.nan, np.inf, -np.inf):
                spoilt = flat.copy()
                spoilt[pos] = bad
                crc, finite = compiled.crc32_finite(spoilt.view(dtype), 0)
                assert crc == zlib.crc32(spoilt) and not finite, (n, pos, bad)


def test_crc32_finite_refuses_other_dtypes():
    with pytest.raises(ValueError, match="float32/64 or complex64/128"):
        compiled.crc32_finite(np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="float32/64 or complex64/128"):
        compiled.crc32_finite(np.zeros(4, dtype=np.longdouble))
    swapped = np.array([1.0, np.inf, 2.0], dtype=">f8")  # the other byte order: zlib and numpy
    assert compiled.crc32_finite(swapped) == (zlib.crc32(swapped), False)
    assert compiled.crc32_finite(swapped[[0, 2]].copy(), 5) == (zlib.crc32(swapped[[0, 2]].copy(), 5), True)
    with pytest.raises(ValueError, match="C-contiguous"):
        compiled.crc32_finite(np.zeros((4, 4))[:, ::2])


@pytest.mark.parametrize("word", [4, 8])
@pytest.mark.parametrize("fallback", [False, True])
def test_swap_copy_is_numpys_byteswap_and_proves_finiteness(word, fallback, monkeypatch):
    if fallback:
        monkeypatch.setattr(compiled, "_native", None)
    rng = np.random.default_rng(3)
    real = np.float32 if word == 4 else np.float64
    for n in (1, 2, 5, 16, 17, 1000):
        values = rng.normal(size=n).astype(real)
        stored = values.astype(values.dtype.newbyteorder(">"))
        out = np.empty(n, dtype=real)
        assert compiled.swap_copy(out, stored.view(np.uint8), word, True)
        assert np.array_equal(out, values)
        out.fill(0)
        assert compiled.swap_copy(out, values, word, False) and np.array_equal(out, values)
        inplace = stored.copy().view(np.uint8)
        assert compiled.swap_copy(inplace, inplace, word, True)
        assert np.array_equal(inplace.view(real), values)
        for bad in (np.nan, np.inf):
            spoilt = values.copy()
            spoilt[n // 2] = bad
            assert not compiled.swap_copy(out, spoilt.astype(spoilt.dtype.newbyteorder(">")), word, True)
            assert np.array_equal(out, spoilt, equal_nan=True)


def test_swap_copy_refuses_bad_sizes():
    with pytest.raises(ValueError, match="word must be 4 or 8"):
        compiled.swap_copy(np.zeros(4), np.zeros(4), 2, True)
    with pytest.raises(ValueError, match="destination bytes"):
        compiled.swap_copy(np.zeros(4), np.zeros(3), 8, True)
    with pytest.raises(ValueError, match="C-contiguous"):  # a copy would be written, not dst
        compiled.swap_copy(np.zeros((4, 2))[:, 0], np.zeros(4), 8, True)


def _random_sun(rng, m: int, n: int, noise: float) -> np.ndarray:
    z = rng.normal(size=(m, n, n)) + 1j * rng.normal(size=(m, n, n))
    q, r = np.linalg.qr(z)
    d = np.diagonal(r, axis1=-2, axis2=-1)
    q = q * (d / np.abs(d))[:, None, :]
    q[:, :, 0] /= np.linalg.det(q)[:, None]
    return q + noise * (rng.normal(size=q.shape) + 1j * rng.normal(size=q.shape))


@needs_compiled
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("noise", [0.0, 1e-9, 1e-3])
def test_sun_deviation_equals_numpys_to_the_last_bit_of_a_modulus(n, noise):
    rng = np.random.default_rng(n)
    u = _random_sun(rng, 5000, n, noise)
    got = compiled.sun_deviation(u)
    saved_native = compiled._native
    try:
        compiled._native = None
        want = matrices_deviation(u)
    finally:
        compiled._native = saved_native
    assert got is not None
    # the same sums in the same order; only the modulus (sqrt of the square against hypot) differs
    for g, w in zip(got, want, strict=True):
        assert abs(g - w) <= 4 * np.spacing(max(w, 1.0)) + 4 * np.spacing(w), (got, want)
    # against the definition, in complex arithmetic
    unit = np.abs(u @ np.conj(np.swapaxes(u, -1, -2)) - np.eye(n)).max()
    det = np.abs(np.linalg.det(u) - 1).max()
    assert got[0] == pytest.approx(unit, abs=1e-14, rel=1e-9)
    assert got[1] == pytest.approx(det, abs=1e-14, rel=1e-9)


@needs_compiled
def test_sun_deviation_ignores_nan_and_takes_any_strides():
    rng = np.random.default_rng(5)
    u = _random_sun(rng, 64, 3, 0.0)
    u[10, 1, 2] += 0.5  # the largest deviation
    base = compiled.sun_deviation(u)
    assert base is not None and base[0] > 0.4
    spoilt = u.copy()
    spoilt[3] = np.nan
    assert compiled.sun_deviation(spoilt) == base
    strided = np.empty((64, 3, 3, 2), dtype=np.complex128)[..., 0]
    strided[...] = u
    assert compiled.sun_deviation(strided) == base
    assert compiled.sun_deviation(u[:0]) == (0.0, 0.0)
    with pytest.raises(ValueError, match="complex128"):
        compiled.sun_deviation(u.astype(np.complex64))


@needs_compiled
def test_group_deviation_does_not_depend_on_chunking_or_threads(monkeypatch):
    """The maxima the readers mark piece by piece must equal group_deviation's bit for bit."""
    from flowplug import linkcheck

    rng = np.random.default_rng(6)
    links = torch.from_numpy(_random_sun(rng, 4 * 4 * 4 * 4 * 4, 3, 1e-8).reshape(1, 4, 4, 4, 4, 4, 3, 3))
    want = group_deviation(links)
    saved = torch.get_num_threads()
    try:
        for chunk in (1, 7, 100, 10_000):
            monkeypatch.setattr(linkcheck, "_GROUP_CHUNK", chunk)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                assert group_deviation(links) == want
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("precision", [32, 64])
@pytest.mark.parametrize("lattice", [(4, 4, 4, 6), (2, 3, 5, 4), (4, 2, 2, 1), (2, 2, 4, 2), (6, 4)])
@pytest.mark.parametrize("threads", [1, 2])
def test_readers_give_the_same_with_and_without_the_compiled_module(tmp_path, precision, lattice, threads, monkeypatch):
    """ILDG (tiles of the canonical read, file order) and HDF5: tensor, checks, the
    finiteness mark and the group deviations (an open boundary in time for one
    configuration) are the same with the numpy/zlib fallbacks, on 1 and 2 threads."""
    from flowplug import io
    from flowplug.adapters import common
    from flowplug.linkcheck import link_deviations
    from flowplug.threads import job_threads

    rng = np.random.default_rng(7)
    d = len(lattice)
    n = 3 if d == 4 else 2
    links = torch.from_numpy(_random_sun(rng, d * int(np.prod(lattice)), n, 1e-12).reshape(1, d, *lattice, n, n))
    links[0, 0, 0, 0, 0] *= 1.0 + 1e-3  # one link off the group: deviations well above roundoff
    if lattice[-1] > 1:
        links[0, d - 1, ..., -1, :, :] = 0  # open boundary in time (openQCD): edge links left out
    if precision == 32:
        links = links.to(torch.complex64).to(torch.complex128)
    ens = io.Ensemble(links, precision=precision)
    monkeypatch.setattr(common, "CHUNK_BYTES", 700)  # several tiles of one site per time slice
    monkeypatch.setattr(common, "PARALLEL_BYTES", 0)  # threads even for a tiny payload
    paths = []
    if d == 4:
        paths.append(tmp_path / "cfg.ildg")
        io.write(paths[-1], ens)
    paths.append(tmp_path / "cfg.h5")
    io.write(paths[-1], ens)
    with warnings.catch_warnings(), job_threads(threads):
        warnings.simplefilter("ignore", io.NonUnitaryWarning)
        for path in paths:
            for contiguous in (True, False):
                options = {"contiguous": contiguous} if path.suffix == ".ildg" else {}
                fast = io.read(path, **options)
                with monkeypatch.context() as m:
                    m.setattr(compiled, "_native", None)
                    slow = io.read(path, **options)
                assert torch.equal(fast.links, slow.links)
                assert torch.equal(fast.links, links)
                assert fast.links.is_contiguous() == slow.links.is_contiguous()
                assert [(c.quantity, c.found, c.ok) for m in fast.meta for c in m.checks] == [
                    (c.quantity, c.found, c.ok) for m in slow.meta for c in m.checks
                ]
                for key in ("unitarity", "determinant"):  # as measured by the readers
                    assert abs(fast.meta[0].header[key] - slow.meta[0].header[key]) <= 8 * np.spacing(1.0)
                assert 1e-4 < fast.meta[0].header["unitarity"] < 0.1  # the zero edge links are left out
                for g, w in zip(link_deviations(fast), link_deviations(slow), strict=True):
                    assert abs(g[0] - w[0]) <= 8 * np.spacing(1.0) and abs(g[1] - w[1]) <= 8 * np.spacing(1.0)


@pytest.mark.parametrize("fallback", [False, True])
@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize("precision", [32, 64])
def test_tiled_conversion_of_either_byte_order_and_nan_verdict(fallback, byteorder, precision, monkeypatch):
    """ildg_to_canonical (MILC's little-endian and NERSC's payloads take it): the stored bytes
    of either order give the links back, in tiles, and a NaN anywhere clears the mark."""
    from flowplug.adapters import common
    from flowplug.linkcheck import _known_finite

    if fallback:
        monkeypatch.setattr(compiled, "_native", None)
    monkeypatch.setattr(common, "CHUNK_BYTES", 700)
    rng = np.random.default_rng(8)
    lattice = (2, 3, 2, 5)
    links = torch.from_numpy(_random_sun(rng, 4 * 60, 3, 0.0).reshape(4, *lattice, 3, 3))
    if precision == 32:
        links = links.to(torch.complex64).to(torch.complex128)
    stored = common.canonical_to_ildg(links, precision, byteorder)
    back = common.ildg_to_canonical(stored.reshape(-1).view(np.uint8), lattice, 3, precision, byteorder)
    assert torch.equal(back[0], links)
    assert _known_finite(back)
    for site in (0, 77, stored.size - 1):
        spoilt = stored.copy().reshape(-1)
        spoilt[site] = complex(np.nan, 0) if site % 2 else complex(0, np.inf)
        bad = common.ildg_to_canonical(spoilt.view(np.uint8), lattice, 3, precision, byteorder)
        assert not _known_finite(bad)


@pytest.mark.parametrize("fallback", [False, True])
@pytest.mark.parametrize("site_bytes", [72, 576, 100])
def test_scidac_reduction_fed_in_pieces_equals_the_reference(fallback, site_bytes, monkeypatch):
    """xor_sites (compiled) and the numpy reduction give the SciDAC checksum of the
    reference definition, for pieces that wrap around the 899 classes, in any order."""
    from flowplug.adapters.checksums import ScidacChecksum, scidac_checksum_reference

    if fallback:
        monkeypatch.setattr(compiled, "_native", None)
    rng = np.random.default_rng(site_bytes)
    nsites = 2 * 899 + 131
    payload = rng.integers(0, 256, nsites * site_bytes, dtype=np.uint8)
    cuts = [0, 1, 898, 900, 1797, 1799, nsites]
    pieces = list(zip(cuts[:-1], cuts[1:], strict=True))
    rng.shuffle(pieces)
    acc = ScidacChecksum(site_bytes)
    for a, b in pieces:
        acc.update_at(payload[a * site_bytes : b * site_bytes], a)
    assert acc.digest() == scidac_checksum_reference(payload.tobytes(), site_bytes)


@needs_compiled
def test_xor_sites_refuses_bad_sizes():
    acc = np.zeros((899, 8), dtype=np.uint8)
    with pytest.raises(ValueError, match="whole sites|sites of"):
        compiled.xor_sites(np.zeros(12, dtype=np.uint8), acc, 8, 0)
    with pytest.raises(ValueError, match="sites of"):
        compiled.xor_sites(np.zeros(16, dtype=np.uint8), acc, 8, -1)


def _copy_blocks_reference(packed, placed, offsets, unit, count, pstride, ostride, gather):
    for i, off in enumerate(offsets):
        for t in range(count):
            p, o = i * unit + t * pstride, int(off) + t * ostride
            if gather:
                placed[o : o + unit] = packed[p : p + unit]
            else:
                packed[p : p + unit] = placed[o : o + unit]


@needs_compiled
@pytest.mark.parametrize("unit", [144, 72, 64, 32, 48, 8])
@pytest.mark.parametrize("shift", [0, 1, 8, 16])
@pytest.mark.parametrize("gather", [True, False])
def test_copy_blocks_equals_the_block_by_block_copy(unit, shift, gather):
    """Every unit specialisation, both directions, the placed side 16-byte aligned (streaming
    stores on x86-64) or not, blocks at aligned and unaligned offsets, one and several groups:
    the same bytes as a copy block by block, and nothing outside the blocks touched."""
    rng = np.random.default_rng(unit + shift)
    for count in (1, 3):
        nblocks = 37
        ostride = unit if count > 1 else 0
        slots = rng.permutation(nblocks * 2)[:nblocks]  # distinct runs of `count` blocks, in any order
        offsets = (slots * unit * count + (rng.integers(0, 2, nblocks) * 8 if unit % 16 else 0)).astype(np.int64)
        pstride = nblocks * unit + 24
        placed_size = nblocks * 2 * unit * count + 64
        raw = rng.integers(0, 256, placed_size + shift, dtype=np.uint8)
        placed = raw[shift:]
        packed = rng.integers(0, 256, (count - 1) * pstride + nblocks * unit, dtype=np.uint8)
        want_packed, want_placed = packed.copy(), placed.copy()
        _copy_blocks_reference(want_packed, want_placed, offsets, unit, count, pstride, ostride, gather)
        assert compiled.copy_blocks(packed, placed, offsets, unit, count, pstride, ostride, gather) is True
        assert np.array_equal(packed, want_packed) and np.array_equal(placed, want_placed)


@needs_compiled
@pytest.mark.parametrize("unit", [144, 64, 32, 48])
def test_copy_blocks_streams_only_aligned_stores(unit):
    """A 16-byte aligned placed array, blocks of 16-byte multiples, but some blocks at
    offsets 8 past a multiple of 16, or a group stride that is not a multiple of 16: those
    stores are unaligned and must be plain ones (a streaming store there faults); the same
    bytes as the block-by-block copy either way."""
    rng = np.random.default_rng(unit)
    nblocks, count = 29, 3
    for ostride, shifts in ((unit, (0, 8)), (unit + 8, (0,)), (unit * nblocks * 2 + 16, (0, 8))):
        slots = rng.permutation(nblocks * 2)[:nblocks]
        offsets = (slots * (ostride * count + 16) + rng.choice(shifts, nblocks)).astype(np.int64)
        backing = np.zeros(int(offsets.max()) + count * ostride + unit + 64, dtype=np.uint8)
        placed = backing[(-backing.ctypes.data) % 16 :][: backing.size - 16]  # 16-byte aligned start
        assert placed.ctypes.data % 16 == 0
        pstride = nblocks * unit
        packed = rng.integers(0, 256, count * pstride, dtype=np.uint8)
        want = placed.copy()
        _copy_blocks_reference(packed.copy(), want, offsets, unit, count, pstride, ostride, True)
        assert compiled.copy_blocks(packed, placed, offsets, unit, count, pstride, ostride, True)
        assert np.array_equal(placed, want)


@needs_compiled
def test_copy_blocks_reads_read_only_arrays():
    """Only the side written to must be writable: a gather from a read-only packed buffer and
    a scatter from read-only placed memory work; a read-only destination is refused."""
    rng = np.random.default_rng(3)
    source = rng.integers(0, 256, 288, dtype=np.uint8)
    source.flags.writeable = False
    offsets = np.array([144, 0], dtype=np.int64)
    placed = np.zeros(288, dtype=np.uint8)
    assert compiled.copy_blocks(source, placed, offsets, 144, 1, 0, 0, True)
    assert placed.tobytes() == source[144:].tobytes() + source[:144].tobytes()
    packed = np.zeros(288, dtype=np.uint8)
    assert compiled.copy_blocks(packed, source, offsets, 144, 1, 0, 0, False)
    assert packed.tobytes() == source[144:].tobytes() + source[:144].tobytes()
    for args in ((packed, source, True), (source, placed, False)):
        with pytest.raises(ValueError, match="read-only"):
            compiled.copy_blocks(args[0], args[1], offsets, 144, 1, 0, 0, args[2])


@needs_compiled
def test_copy_blocks_refuses_blocks_outside_the_arrays():
    packed, placed = np.zeros(288, dtype=np.uint8), np.zeros(288, dtype=np.uint8)
    ok = np.array([0, 144], dtype=np.int64)
    assert compiled.copy_blocks(packed, placed, ok, 144, 1, 0, 0, True)
    for offsets, unit, count, pstride, ostride in [
        (np.array([0, 145], dtype=np.int64), 144, 1, 0, 0),  # a placed block past the end
        (np.array([-1, 0], dtype=np.int64), 144, 1, 0, 0),  # a negative offset
        (np.array([0, 0, 0], dtype=np.int64), 144, 1, 0, 0),  # more packed blocks than packed bytes
        (ok, 144, 2, 0, 1),  # the second group past the end of placed
        (ok, 144, 2, 1, 0),  # ... of packed
        (ok, 144, 1 << 62, 1 << 40, 0),  # spans that overflow
        (ok, 0, 1, 0, 0),  # no unit
        (ok, 144, 2, -144, 0),  # a negative stride
    ]:
        with pytest.raises(ValueError, match="copy_blocks"):
            compiled.copy_blocks(packed, placed, offsets, unit, count, pstride, ostride, True)
    assert not placed.any() and not packed.any()  # nothing copied by a refused call
    with pytest.raises(ValueError, match="C-contiguous"):
        compiled.copy_blocks(packed, np.zeros((4, 144), np.uint8)[:, :72], ok, 144, 1, 0, 0, True)


def test_copy_blocks_leaves_the_copy_to_numpy_without_the_module(monkeypatch):
    monkeypatch.setattr(compiled, "_native", None)
    placed = np.zeros(144, dtype=np.uint8)
    assert compiled.copy_blocks(np.ones(144, np.uint8), placed, np.zeros(1, np.int64), 144, 1, 0, 0, True) is False
    assert not placed.any()


@needs_compiled
@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize("precision", [32, 64])
@pytest.mark.parametrize("chunk", [700, 3000, 1 << 20])
@pytest.mark.parametrize("lattice", [(4, 4, 4, 6), (2, 3, 5, 4), (6, 4), (3, 5)])
def test_writer_gather_equals_numpys(byteorder, precision, chunk, lattice, monkeypatch):
    """The stored payload of canonical links, gathered by copy_blocks (pieces within one time
    slice, or of whole time slices) or by numpy: the same bytes, in either order, at either
    precision, one thread and several."""
    from flowplug.adapters import common
    from flowplug.threads import job_threads

    monkeypatch.setattr(common, "CHUNK_BYTES", chunk)
    monkeypatch.setattr(common, "PARALLEL_BYTES", 0)
    rng = np.random.default_rng(11)
    d = len(lattice)
    n = 3 if d == 4 else 2
    links = torch.from_numpy(_random_sun(rng, d * int(np.prod(lattice)), n, 0.0).reshape(d, *lattice, n, n))
    chunks = common._file_chunks((*reversed(lattice), d), n * n * (8 if precision == 32 else 16))
    per_slice = int(np.prod(lattice[:-1])) * d
    assert all((b - 1) // per_slice == a // per_slice or a % per_slice == b % per_slice == 0 for _, a, b in chunks)
    fast = common.canonical_to_ildg(links, precision, byteorder)
    with monkeypatch.context() as m:
        m.setattr(compiled, "_native", None)
        slow = common.canonical_to_ildg(links, precision, byteorder)
    assert fast.tobytes() == slow.tobytes()
    for threads in (1, 2):
        with job_threads(threads):
            out = io_bytes(lambda fh, t=threads: common.write_ildg_payload(fh, links, precision, byteorder, threads=t))
        assert out == slow.tobytes()


def io_bytes(write):
    import io as pyio

    buf = pyio.BytesIO()
    write(buf)
    return buf.getvalue()


@needs_compiled
@pytest.mark.parametrize("precision", [32, 64])
def test_a_declined_copy_blocks_leaves_the_copy_to_numpy(precision, monkeypatch):
    """copy_blocks returns False when it did nothing (its contract): the tile copy of the
    canonical read and the writer's gather then copy with numpy instead of leaving the
    output (a new, uninitialised array) or the written piece as it was."""
    from flowplug.adapters import common

    monkeypatch.setattr(common, "CHUNK_BYTES", 700)  # several tiles and pieces
    rng = np.random.default_rng(12)
    lattice = (2, 3, 2, 5)
    links = torch.from_numpy(_random_sun(rng, 4 * 60, 3, 0.0).reshape(4, *lattice, 3, 3))
    if precision == 32:
        links = links.to(torch.complex64).to(torch.complex128)
    want = common.canonical_to_ildg(links, precision, ">")
    calls = []
    monkeypatch.setattr(compiled, "copy_blocks", lambda *args: calls.append(args[3]) or False)
    assert common.canonical_to_ildg(links, precision, ">").tobytes() == want.tobytes()
    back = common.ildg_to_canonical(want.reshape(-1).view(np.uint8), lattice, 3, precision, ">")
    assert torch.equal(back[0], links)
    assert len(calls) > 2  # both paths asked it
