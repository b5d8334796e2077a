"""Threaded I/O (issue 16, item 5): pieces of one configuration on several threads.

The readers, the ILDG writer, the SciDAC checksum, the HDF5 slab pipeline and the value
checks split the work into pieces that run on ``flowplug.linkcheck.io_threads()``
threads. These tests pin that the result does not depend on the number of threads (bit
for bit), and that a bad value in a piece handled by a worker thread is still caught and
named. Small pieces (monkeypatched sizes) give many pieces on tiny lattices.
"""

from __future__ import annotations

import os
import re
import threading
import warnings

import numpy as np
import pytest
import torch

from flowplug import io
from flowplug.adapters.checksums import scidac_checksum_reference
from flowplug.adapters.lime import scan
from flowplug.errors import FormatError, NonUnitaryWarning
from flowplug.threads import job_threads

from _io_helpers import make_ensemble


def _payload(path):
    rec = next(r for r in scan(path) if r.type == "ildg-binary-data")
    return path.read_bytes()[rec.data_offset : rec.data_offset + rec.length]


def test_io_threads_follows_torch():
    from flowplug.linkcheck import io_threads

    with job_threads(3):
        assert io_threads() == 3
    with job_threads(1):
        assert io_threads() == 1


def test_map_pieces_keeps_order_and_reraises():
    from flowplug.linkcheck import map_pieces

    seen = set()

    def square(k):
        seen.add(threading.get_ident())
        return k * k

    assert map_pieces(square, range(20), threads=3) == [k * k for k in range(20)]
    assert map_pieces(square, [], threads=3) == []

    def fail(k):
        if k in (5, 7):
            raise ValueError(f"piece {k}")
        return k

    with pytest.raises(ValueError, match="piece 5"):
        map_pieces(fail, range(10), threads=2)


def test_scidac_checksum_fed_from_threads_in_any_order():
    from flowplug.adapters.checksums import ScidacChecksum, scidac_checksum_reference

    site_bytes = 72
    rng = np.random.default_rng(3)
    nsites = 3 * 899 + 17
    payload = rng.integers(0, 256, nsites * site_bytes, dtype=np.uint8)
    cuts = [0, *sorted(int(c) for c in rng.integers(1, nsites, 9)), nsites]
    pieces = [(a, payload[a * site_bytes : b * site_bytes]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    rng.shuffle(pieces)
    acc = ScidacChecksum(site_bytes)
    workers = [
        threading.Thread(target=lambda part: [acc.update_at(p, a) for a, p in part], args=(pieces[k::3],))
        for k in range(3)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert acc.nsites == nsites
    assert acc.digest() == scidac_checksum_reference(payload.tobytes(), site_bytes)
    with pytest.raises(ValueError, match="first_site"):
        acc.update_at(payload[:site_bytes], -1)


@pytest.mark.parametrize("precision", [32, 64])
def test_threaded_reads_and_writes_are_bit_identical(tmp_path, monkeypatch, precision):
    """1, 2 and 3 threads: the same tensors (contiguous and file order), checks, deviations
    and written bytes as the one-thread path."""
    from flowplug.adapters import common
    from flowplug.linkcheck import map_pieces

    monkeypatch.setattr(common, "CHUNK_BYTES", 700)  # many pieces, cut inside time slices
    monkeypatch.setattr(common, "PARALLEL_BYTES", 0)  # threads even for a tiny payload
    used = []  # threads of every piecewise read (a spy on the pool helper)

    def spy(fn, items, threads=None):
        used.append(threads)
        return map_pieces(fn, items, threads)

    monkeypatch.setattr(common, "map_pieces", spy)
    ens = make_ensemble(precision=precision, seed=11)
    results = {}
    for threads in (1, 2, 3):
        with job_threads(threads):
            path = tmp_path / f"t{threads}.ildg"
            io.write(path, ens, date="fixed")
            back = io.read(path)
            view = io.read(path, contiguous=False)
            results[threads] = (_payload(path), back, view)
    assert used == [1, 1, 2, 2, 3, 3]  # the reads ran on that many threads
    payload1, back1, view1 = results[1]
    for threads in (2, 3):
        payload, back, view = results[threads]
        assert payload == payload1
        assert torch.equal(back.links, back1.links) and torch.equal(back.links, ens.links)
        assert torch.equal(view.links, view1.links) and view.links.stride() == view1.links.stride()
        assert [c.as_dict() for c in back.meta[0].checks] == [c.as_dict() for c in back1.meta[0].checks]
        assert all(c.ok for c in back.meta[0].checks)
        for key in ("unitarity", "determinant"):
            assert back.meta[0].header[key] == back1.meta[0].header[key]


@pytest.mark.parametrize("contiguous", [True, False])
def test_a_nan_in_a_piece_of_a_worker_thread_is_caught_and_named(tmp_path, monkeypatch, contiguous):
    from flowplug.adapters import common

    monkeypatch.setattr(common, "CHUNK_BYTES", 700)
    monkeypatch.setattr(common, "PARALLEL_BYTES", 0)
    ens = make_ensemble(seed=12)
    links = ens.links.clone()
    # site (x, y, z, t) = (1, 0, 0, 0): file rank 1, in the first piece ...
    links[0, 2, 1, 0, 0, 0, 1, 1] = complex(float("nan"), 0.0)
    bad = tmp_path / "bad.ildg"
    with job_threads(1):
        io.write(bad, io.Ensemble(links))
    with job_threads(2), pytest.raises(FormatError, match=r"NaN or Inf .*direction 2, site \(1, 0, 0, 0\)"):
        io.read(bad, contiguous=contiguous, verify=False)
    # ... and in piece 28 of 120 (one site per piece: rank x + 2y + 6z + 24t), t = 1
    links = ens.links.clone()
    links[0, 1, 0, 2, 0, 1, 0, 2] = complex(0.0, float("inf"))
    with job_threads(1):
        io.write(bad, io.Ensemble(links), overwrite=True)
    with job_threads(2), pytest.raises(FormatError, match=r"NaN or Inf .*direction 1, site \(0, 2, 0, 1\)"):
        io.read(bad, contiguous=contiguous, verify=False)


def test_one_bad_link_anywhere_is_caught_with_threads(tmp_path, monkeypatch):
    """The unitarity/determinant maxima over chunks on several threads: one link off the
    group in the last chunk gives the same deviation as one thread, and the same error."""
    from flowplug import linkcheck

    monkeypatch.setattr(linkcheck, "_GROUP_CHUNK", 16)  # 480 matrices: 30 chunks
    ens = make_ensemble(seed=13)
    links = ens.links.clone()
    links[0, 3, 1, 2, 3, 4] *= 1 + 1e-4  # the very last link of the canonical order
    path = tmp_path / "off.ildg"
    io.write(path, io.Ensemble(links))
    devs = {}
    for threads in (1, 2):
        with job_threads(threads):
            devs[threads] = linkcheck.group_deviation(links)
            with pytest.raises(FormatError, match=r"off\.ildg: links are not in SU3: max \|U U\^\+ - 1\| = 0\.0002"):
                io.read(path, unitarity="error")
    assert devs[1] == devs[2] and devs[1][0] > 1e-4 and devs[1][1] > 1e-4


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "through-hdf5"])
@pytest.mark.parametrize("threads", [1, 2])
def test_hdf5_slabs_prove_finiteness_and_catch_damage(tmp_path, monkeypatch, threads, direct):
    """Both reads of a store: straight from the file (flowplug's layout) and through HDF5
    slab by slab (any layout HDF5 must transform)."""
    from flowplug.adapters import hdf5
    from flowplug.errors import ChecksumError
    from flowplug.linkcheck import _known_finite

    if direct:
        monkeypatch.setattr(hdf5, "PIECE_BYTES", 160)  # many pieces per run, checked one by one
    else:
        monkeypatch.setattr(hdf5, "_storage_plan", lambda links_ds, wanted=1: None)
    small = hdf5.chunk_shape
    monkeypatch.setattr(hdf5, "chunk_shape", lambda shape, itemsize: small(shape, itemsize, target=1000))
    monkeypatch.setattr(hdf5, "PIPELINE_BYTES", 0)  # slab by slab even for a tiny configuration
    ens = make_ensemble(batch=2, seed=14)
    path = tmp_path / "s.h5"
    io.write(path, ens)
    with job_threads(threads):
        back = hdf5.Hdf5Handler().read(path)
        assert torch.equal(back.links, ens.links) and all(c.ok for m in back.meta for c in m.checks)
        assert _known_finite(back.links)  # proven while reading
        for where in ((1, 3, 1, 2, 3, 4), (1, 0, 0, 0, 0, 1), (1, 2, 0, 1, 2, 3)):  # last, first, a middle slab
            links = ens.links.clone()
            links[(*where, 2, 2)] = float("nan")
            bad = tmp_path / f"bad{where[1]}.h5"
            io.write(bad, io.Ensemble(links))
            site = ", ".join(map(str, where[2:]))
            named = rf"NaN or Inf .*configuration 1, direction {where[1]}, site \({site}\)"
            with pytest.raises(FormatError, match=named):
                io.read(bad)
        import h5py

        with h5py.File(path, "r+") as f:  # one changed number in the stored data: the CRC-32 fails
            f["links"][1, 3, 1, 2, 3, 4, 0, 0] += 1e-9
        with pytest.raises(ChecksumError, match="hdf5 crc32 of configuration 1 mismatch"):
            io.read(path)


@pytest.mark.parametrize("n", [2, 3])
def test_group_deviation_equals_the_gauge_definitions(monkeypatch, n):
    """The chunked, structure-of-arrays evaluation on 2 threads gives the maxima of
    flowplug.gauge's max |U U^+ - 1| and |det U - 1| (to rounding), for links slightly off
    the group here and there."""
    from flowplug import linkcheck
    from flowplug.gauge import determinant_deviation, unitarity_deviation

    from _io_helpers import random_su

    monkeypatch.setattr(linkcheck, "_GROUP_CHUNK", 100)
    rng = np.random.default_rng(n)
    u = random_su(n, (2, 2, 5, 6), rng)
    off = rng.random(u.shape[:-2]) < 0.02
    u = u + 1e-6 * (rng.normal(size=u.shape) + 1j * rng.normal(size=u.shape)) * off[..., None, None]
    links = torch.from_numpy(u)
    expected = (float(unitarity_deviation(links).max()), float(determinant_deviation(links).max()))
    for threads in (1, 2):
        with job_threads(threads):
            found = linkcheck.group_deviation(links)
        assert found == pytest.approx(expected, rel=1e-12, abs=1e-16)
        assert found[0] > 1e-7 and found[1] > 1e-7


@pytest.mark.parametrize("precision", [32, 64])
@pytest.mark.parametrize("contiguous", [True, False])
def test_group_check_measured_in_the_reader_equals_the_separate_pass(tmp_path, monkeypatch, precision, contiguous):
    """io.read measures max |U U^+ - 1| and |det U - 1| piece by piece while reading (the
    mark is used by check_links): bit-identical to group_deviation over the tensor, for one
    bad link in the bulk, one on the last time slice, and an open boundary."""
    from flowplug import linkcheck
    from flowplug.adapters import common

    monkeypatch.setattr(common, "CHUNK_BYTES", 1500)  # pieces of 2 sites, some cut at the last slice
    monkeypatch.setattr(common, "PARALLEL_BYTES", 0)
    ens = make_ensemble(precision=precision, seed=15)
    cases = {}
    bulk = ens.links.clone()
    bulk[0, 0, 1, 1, 2, 1] *= 1 + 3e-5  # a space link inside
    cases["bulk"] = bulk
    edge = ens.links.clone()
    edge[0, 3, 1, 2, 0, 4] *= 1 + 3e-5  # a time link on the last time slice t = 4
    cases["edge"] = edge
    opened = edge.clone()
    opened[0, 3, :, :, :, 4] = 0  # open boundary: those links zero, left out of the check
    cases["open"] = opened
    for name, links in cases.items():
        if precision == 32:
            links = links.to(torch.complex64).to(torch.complex128)
        path = tmp_path / f"{name}.ildg"
        io.write(path, io.Ensemble(links, precision=precision), precision=precision)
        for threads in (1, 2):
            with job_threads(threads):
                if name == "open":
                    with warnings.catch_warnings():
                        warnings.simplefilter("error")  # no warning: the boundary is left out
                        back = io.read(path, contiguous=contiguous)
                else:
                    with pytest.warns(NonUnitaryWarning, match=rf"{name}\.ildg: links are not in SU3"):
                        back = io.read(path, contiguous=contiguous)
            expected = linkcheck.link_deviations(io.Ensemble(back.links.clone(), precision=precision))
            header = back.meta[0].header
            assert (header["unitarity"], header["determinant"]) == expected[0], (name, threads)
            assert header.get("boundary") == ("open" if name == "open" else None)
            assert (header["unitarity"] > 1e-5) == (name != "open")
    plain = io.read(tmp_path / "bulk.ildg", unitarity="ignore")
    assert id(plain.links) not in linkcheck._KNOWN_DEVIATIONS  # nothing measured when not asked


def test_matrices_deviation_refuses_other_shapes():
    from flowplug.errors import ShapeError
    from flowplug.linkcheck import matrices_deviation

    assert matrices_deviation(np.zeros((0, 3, 3), dtype=np.complex128)) == (0.0, 0.0)
    with pytest.raises(ShapeError, match="N = 2, 3"):
        matrices_deviation(np.zeros((4, 4, 4), dtype=np.complex128))


@pytest.mark.parametrize("precision", [32, 64])
def test_threaded_ildg_write_checksum_equals_the_per_site_definition(tmp_path, monkeypatch, precision):
    """The SciDAC checksum record of an ILDG file written on 3 threads, in an odd number of
    pieces (31, one time slice each) on 930 sites (> 899: pieces cross the rank-mod-899
    wrap), equals the per-site definition of the bytes written; the threaded read verifies it."""
    from flowplug.adapters import common

    site_bytes = 4 * 9 * 2 * precision // 8
    monkeypatch.setattr(common, "CHUNK_BYTES", 30 * site_bytes)  # one time slice of 2 x 3 x 5 sites
    monkeypatch.setattr(common, "PARALLEL_BYTES", 0)
    ens = make_ensemble(lattice=(2, 3, 5, 31), precision=precision, seed=16)
    assert len(common._file_chunks((31, 5, 3, 2, 4), site_bytes // 4)) == 31
    for threads in (1, 3):
        path = tmp_path / f"c{threads}.ildg"
        with job_threads(threads):
            io.write(path, ens, precision=precision)
            back = io.read(path)
        rec = next(r for r in scan(path) if r.type == "scidac-checksum")
        xml = path.read_bytes()[rec.data_offset : rec.data_offset + rec.length].decode()
        stored = tuple(int(re.search(rf"<{tag}>\s*([0-9a-fA-F]+)", xml).group(1), 16) for tag in ("suma", "sumb"))
        assert stored == scidac_checksum_reference(_payload(path), site_bytes), threads
        assert torch.equal(back.links, ens.links) and all(c.ok for c in back.meta[0].checks)


def _open_fds() -> int | None:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None


def _io_workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("flowplug-io")]


def test_a_failure_in_a_worker_propagates_and_leaves_nothing_behind(tmp_path, monkeypatch):
    """A short read in one piece of a threaded read, and a failure in one piece of a threaded
    ILDG write: the same error as on one thread, the pool's threads gone, the file closed,
    the existing file untouched and no temporary left."""
    from flowplug.adapters import common

    monkeypatch.setattr(common, "CHUNK_BYTES", 700)
    monkeypatch.setattr(common, "PARALLEL_BYTES", 0)
    ens = make_ensemble(seed=17)
    path = tmp_path / "in.ildg"
    io.write(path, ens)
    original = path.read_bytes()
    binary = next(r for r in scan(path) if r.type == "ildg-binary-data")
    chunks = common._file_chunks((5, 4, 3, 2, 4), 144)
    bad_start = chunks[len(chunks) // 2][1] * 144  # a piece in the middle
    real_preadv = os.preadv

    def short_read(fd, buffers, offset):
        return 0 if offset == binary.data_offset + bad_start else real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", short_read)
    expected = f"record 'ildg-binary-data': read {bad_start} of {binary.length} bytes"
    for threads in (1, 3):
        for contiguous in (True, False):
            before = _open_fds()
            with job_threads(threads), pytest.raises(FormatError, match=re.escape(f"{path}: {expected}")):
                io.read(path, contiguous=contiguous)
            assert _open_fds() == before and not _io_workers()
    monkeypatch.setattr(os, "preadv", real_preadv)

    producer = common._ildg_producer

    def failing_producer(can, precision, byteorder):
        chunks, largest, produce = producer(can, precision, byteorder)

        def produce_or_fail(chunk, scratch):
            if chunk[1] * 144 == bad_start:
                raise FormatError(f"piece at byte {bad_start} failed")
            return produce(chunk, scratch)

        return chunks, largest, produce_or_fail

    monkeypatch.setattr(common, "_ildg_producer", failing_producer)
    for threads in (1, 3):
        before = _open_fds()
        with job_threads(threads), pytest.raises(FormatError, match=f"piece at byte {bad_start} failed"):
            io.write(path, ens, overwrite=True)
        assert _open_fds() == before and not _io_workers()
        assert path.read_bytes() == original
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in.ildg"]


def test_scratch_buffers_are_kept_reused_and_capped(monkeypatch):
    """The readers' and the writer's scratch memory is kept between calls (a small lattice
    would otherwise pay the page faults of fresh buffers at every read), handed to one call
    at a time, and at most SCRATCH_KEEP_BYTES of it is kept."""
    from flowplug.adapters import common

    monkeypatch.setattr(common, "_scratch_free", [])
    monkeypatch.setattr(common, "SCRATCH_KEEP_BYTES", 3000)
    a, b = common._take_scratch(2, 1000)
    assert a.size == b.size == 1000 and not np.shares_memory(a, b)
    common._give_scratch([a, b])
    (c,) = common._take_scratch(1, 800)
    assert c.size == 800 and (np.shares_memory(c, a) or np.shares_memory(c, b))  # a kept one
    d, e = common._take_scratch(2, 800)  # the other kept one, and a new one
    assert sum(np.shares_memory(x, y) for x in (c, d, e) for y in (a, b)) == 2
    assert not np.shares_memory(c, d) and not np.shares_memory(d, e) and not np.shares_memory(c, e)
    (big,) = common._take_scratch(1, 2500)  # none kept is large enough
    common._give_scratch([c, d, e, big])
    assert sum(x.size for x in common._scratch_free) <= 3000
    assert [x.size for x in common._scratch_free] == [2500]  # the largest are kept


def test_concurrent_reads_and_writes_get_their_own_scratch(tmp_path):
    """Reads and writes in several Python threads at once (each with its own pieces on two
    I/O threads), a failing read among them: every result is its own file's."""
    from flowplug.adapters import common

    ensembles = [make_ensemble((2, 2, 4, 6), seed=40 + k) for k in range(4)]
    paths = []
    for k, ens in enumerate(ensembles):
        paths.append(tmp_path / f"c{k}.ildg")
        io.write(paths[-1], ens)
    short = tmp_path / "short.ildg"
    short.write_bytes(paths[0].read_bytes()[:-700])
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            with job_threads(2):
                for r in range(15):
                    j = (k + r) % 4
                    back = io.read(paths[j])
                    assert torch.equal(back.links, ensembles[j].links), (k, r, j)
                    out = tmp_path / f"w{k}_{r}.ildg"
                    io.write(out, back)
                    assert torch.equal(io.read(out).links, ensembles[j].links)
                    if r % 5 == 0:
                        with pytest.raises(FormatError):
                            io.read(short)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    old = (common.CHUNK_BYTES, common.PARALLEL_BYTES)
    common.CHUNK_BYTES, common.PARALLEL_BYTES = 700, 0  # many pieces, threads even for tiny payloads
    try:
        workers = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        common.CHUNK_BYTES, common.PARALLEL_BYTES = old
    assert not errors, errors[0]
