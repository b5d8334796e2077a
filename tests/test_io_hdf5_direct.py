"""HDF5 stores read straight from the file (issue 16, item 5).

Where HDF5 keeps a configuration's bytes as they are (no filter, the stored datatype the
one read, chunks that are runs of one configuration), the reader asks HDF5 where they
lie (``_storage_runs``) and reads them with positional reads, each piece checked (CRC-32
and finiteness) while in cache. These tests pin that the runs are the configuration's
bytes for every chunking flowplug writes and for stores relaid out by other tools; that
every other layout falls back to HDF5's own read; and that damage, a NaN or a short file
is caught on the direct path as on the other.
"""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch

from flowplug import io
from flowplug.adapters import hdf5
from flowplug.errors import ChecksumError, FormatError
from flowplug.threads import job_threads

from _io_helpers import make_ensemble

h5py = pytest.importorskip("h5py")


def _small_chunks(monkeypatch, target):
    """Stores written from now on have chunks of at most ``target`` bytes (many chunks on tiny lattices)."""
    small = hdf5.chunk_shape
    monkeypatch.setattr(hdf5, "chunk_shape", lambda shape, itemsize: small(shape, itemsize, target=target))


def _stored(tmp_path, ens, name="s.h5"):
    """``ens`` written to a new store ``name`` in ``tmp_path``; its path."""
    path = tmp_path / name
    io.write(path, ens)
    return path


def _runs_bytes(path, runs):
    data = path.read_bytes()
    return b"".join(data[offset : offset + length] for offset, length in runs)


@pytest.mark.parametrize(
    ("lattice", "target"),
    [((4, 4, 4, 4), hdf5.CHUNK_BYTES), ((2, 3, 4, 5), 1000), ((2, 3, 4, 5), 4096), ((3, 5, 2, 7), 300), ((5, 6), 50)],
)
def test_runs_are_the_stored_configuration(tmp_path, monkeypatch, lattice, target):
    """For chunks that cut the direction axis, a lattice axis (with padded edge chunks) or
    nothing, the runs hold each configuration's bytes in storage order."""
    _small_chunks(monkeypatch, target)
    ens = make_ensemble(lattice, batch=3, seed=5)
    path = _stored(tmp_path, ens)
    with h5py.File(path, "r") as f:
        ds = f["links"]
        for i in range(3):
            runs = hdf5._storage_runs(ds, i)
            assert runs is not None
            assert _runs_bytes(path, runs) == ds[i].tobytes()
    back = io.read(path)
    assert torch.equal(back.links, ens.links) and all(c.ok for m in back.meta for c in m.checks)


def _check_runs_and_read(path, i, direct, ens, name):
    """Configuration ``i`` of the store at ``path`` is (``direct``) or is not read straight from
    the file; its runs hold its bytes; the whole store reads back ``ens`` with every check passed."""
    with h5py.File(path, "r") as f:
        runs = hdf5._storage_runs(f["links"], i)
        assert (runs is not None) == direct, name
        if runs is not None:
            assert _runs_bytes(path, runs) == f["links"][i].tobytes()
    back = io.read(path)
    assert torch.equal(back.links, ens.links) and all(c.ok for m in back.meta for c in m.checks)


def _relayout(src, dst, userblock=0, **create):
    """Copy a flowplug store with /links created with other HDF5 options (as h5repack would)."""
    with h5py.File(src, "r") as f, h5py.File(dst, "w", userblock_size=userblock) as g:
        for key, value in f.attrs.items():
            g.attrs[key] = value
        f.copy("meta", g)
        g.create_dataset("links", data=f["links"][...], **create)


@pytest.mark.parametrize(
    ("name", "userblock", "create", "direct"),
    [
        ("contiguous", 0, {}, True),
        ("user block", 512, {"chunks": (1, 1, 2, 3, 4, 5, 3, 3), "maxshape": (None,) * 8}, True),
        ("one chunk per configuration", 0, {"chunks": (1, 4, 2, 3, 4, 5, 3, 3)}, True),
        ("chunks cut two axes", 0, {"chunks": (1, 2, 1, 3, 4, 5, 3, 3)}, False),
        ("direction cut in two", 0, {"chunks": (1, 2, 2, 3, 4, 5, 3, 3)}, True),
        ("two configurations per chunk", 0, {"chunks": (2, 4, 2, 3, 4, 5, 3, 3)}, False),
        ("gzip", 0, {"chunks": (1, 1, 2, 3, 4, 5, 3, 3), "compression": "gzip"}, False),
        ("shuffle", 0, {"chunks": (1, 4, 2, 3, 4, 5, 3, 3), "shuffle": True}, False),
        ("chunk wider than an inner axis", 0, {"chunks": (1, 1, 2, 3, 4, 8, 3, 3), "maxshape": (None,) * 8}, False),
    ],
)
def test_other_layouts_read_direct_or_through_hdf5(tmp_path, name, userblock, create, direct):
    ens = make_ensemble(batch=3, seed=8)
    src, path = tmp_path / "a.h5", tmp_path / "b.h5"
    io.write(src, ens)
    _relayout(src, path, userblock, **create)
    _check_runs_and_read(path, 2, direct, ens, name)
    with h5py.File(path, "r+") as f:
        f["links"][2, 3, 1, 2, 3, 4, 1, 1] += 1e-12  # one changed number in configuration 2
    with pytest.raises(ChecksumError, match="hdf5 crc32 of configuration 2 mismatch"):
        io.read(path)


def test_unallocated_chunk_reads_through_hdf5(tmp_path):
    """A chunk HDF5 never wrote (a store grown without data) has no file offset: no runs."""
    ens = make_ensemble(batch=1, seed=2)
    path = tmp_path / "g.h5"
    io.write(path, ens)
    with h5py.File(path, "r+") as f:
        f["links"].resize(2, axis=0)
        assert hdf5._storage_runs(f["links"], 0) is not None
        assert hdf5._storage_runs(f["links"], 1) is None


@pytest.mark.parametrize("threads", [1, 2])
def test_pieces_and_pipeline_verify_every_byte(tmp_path, monkeypatch, threads):
    """Many small pieces, checked inline (1 thread) or by the helper thread (2): the same
    links, the finiteness proven, every byte checked once, in pieces of at most PIECE_BYTES
    (a NaN in any piece and a changed number: tests/test_io_threads.py)."""
    from flowplug.linkcheck import _known_finite

    _small_chunks(monkeypatch, 1000)
    monkeypatch.setattr(hdf5, "PIECE_BYTES", 160)  # several pieces per run, one edge piece
    monkeypatch.setattr(hdf5, "PIPELINE_BYTES", 0)
    calls = []
    checked = hdf5.compiled.crc32_finite
    monkeypatch.setattr(hdf5.compiled, "crc32_finite", lambda a, v=0: calls.append(a.nbytes) or checked(a, v))
    ens = make_ensemble(batch=2, seed=14)
    path = _stored(tmp_path, ens)
    with job_threads(threads):
        back = hdf5.Hdf5Handler().read(path)
        assert torch.equal(back.links, ens.links) and all(c.ok for m in back.meta for c in m.checks)
        assert _known_finite(back.links)
        assert len(calls) > 20 and max(calls) <= 160 and sum(calls) == 2 * ens.links[0].numel() * 16


def test_short_file_and_wrong_runs_are_named(tmp_path):
    out = np.empty(40, dtype=np.complex128)
    path = tmp_path / "short.bin"
    path.write_bytes(bytes(600))
    with pytest.raises(FormatError, match=r"short\.bin: /links: read 600 of 640 bytes at offset 0"):
        hdf5._read_many(path, [[(0, 640)]], out[None])
    with pytest.raises(FormatError, match=r"short\.bin: /links runs cover 320 bytes; the configuration has 640"):
        hdf5._read_many(path, [[(0, 320)]], out[None])
    ((crc, finite),) = hdf5._read_many(path, [[(0, 320), (0, 320)]], out[None])
    assert finite and crc == hdf5.compiled.crc32(np.zeros(640, np.uint8))
    strided = np.ones((8, 10), dtype=np.complex128)[:, :5]  # reshape(-1) would read into a copy
    with pytest.raises(ValueError, match="C-contiguous"):
        hdf5._read_many(path, [[(0, 160)]] * 8, strided)
    assert np.all(strided == 1)


def _padded_complex(group, data):
    """/links of a compound {r, i} padded to 24 bytes: h5py reads it as complex128."""
    stored = h5py.h5t.create(h5py.h5t.COMPOUND, 24)
    stored.insert(b"r", 0, h5py.h5t.IEEE_F64LE)
    stored.insert(b"i", 8, h5py.h5t.IEEE_F64LE)
    h5py.h5d.create(group.id, b"links", stored, h5py.h5s.create_simple(data.shape))
    group["links"][...] = data


def test_stored_type_other_than_the_one_read_goes_through_hdf5(tmp_path):
    """A stored compound that h5py reads as complex128 but whose bytes are laid out otherwise
    (padded to 24 bytes): the file's bytes are not the values, HDF5 converts them."""
    ens = make_ensemble(batch=3, seed=9)
    src, path = tmp_path / "a.h5", tmp_path / "padded.h5"
    io.write(src, ens)
    with h5py.File(src, "r") as f, h5py.File(path, "w") as g:
        for key, value in f.attrs.items():
            g.attrs[key] = value
        f.copy("meta", g)
        _padded_complex(g, f["links"][...])
    with h5py.File(path, "r") as f:
        assert f["links"].dtype == np.complex128 and f["links"].id.get_type().get_size() == 24
        assert hdf5._storage_runs(f["links"], 1) is None
    back = io.read(path)
    assert torch.equal(back.links, ens.links) and all(c.ok for m in back.meta for c in m.checks)


def test_user_block_under_an_hdf5_whose_chunk_offsets_omit_it(tmp_path, monkeypatch):
    """HDF5 before 1.14.4 reports chunk offsets from the end of a user block (HDFGroup/hdf5
    issue 3003): a chunked store with one is then read through HDF5, one without it and a
    contiguous one (H5Dget_offset has always counted the user block) still directly."""
    ens = make_ensemble(batch=2, seed=3)
    src = tmp_path / "a.h5"
    io.write(src, ens)
    chunked = {"chunks": (1, 1, 2, 3, 4, 5, 3, 3), "maxshape": (None,) * 8}
    _relayout(src, tmp_path / "ub.h5", 512, **chunked)
    _relayout(src, tmp_path / "plain.h5", 0, **chunked)
    _relayout(src, tmp_path / "ub_contiguous.h5", 1024)
    monkeypatch.setattr(h5py.version, "hdf5_version_tuple", (1, 14, 3))
    for name, direct in (("ub.h5", False), ("plain.h5", True), ("ub_contiguous.h5", True)):
        _check_runs_and_read(tmp_path / name, 1, direct, ens, name)


def test_other_file_drivers_read_through_hdf5(tmp_path):
    """Only the default sec2 driver's addresses are offsets of one file read through HDF5's
    descriptor: the family driver spreads them over several files; under core and stdio
    (HDF5_DRIVER=core in the environment) HDF5's handle is a pointer, not a descriptor."""
    ens = make_ensemble(batch=2, seed=4)
    src = tmp_path / "a.h5"
    io.write(src, ens)
    pattern = str(tmp_path / "fam%d.h5")
    with h5py.File(src, "r") as f, h5py.File(pattern, "w", driver="family", memb_size=64 << 10) as g:
        for key, value in f.attrs.items():
            g.attrs[key] = value
        f.copy("meta", g)
        g.create_dataset("links", data=f["links"][...], chunks=(1, 1, 2, 3, 4, 5, 3, 3))
    assert (tmp_path / "fam1.h5").exists()  # the data spans several member files
    with h5py.File(pattern, "r", driver="family", memb_size=64 << 10) as f:
        assert hdf5._direct_fd(f["links"]) is None
        data = np.empty((1, *f["links"].shape[1:]), dtype=f["links"].dtype)
        found, finite = hdf5._read_configuration(tmp_path / "fam0.h5", f["links"], data, 1, 0)
        assert finite and np.array_equal(data[0], ens.links[1].numpy())
    for driver in ("core", "stdio"):  # file offsets, but HDF5's handle is no descriptor (a memory image, a FILE *)
        with h5py.File(src, "r", driver=driver) as f:
            assert hdf5._direct_fd(f["links"]) is None, driver
            found, finite = hdf5._read_configuration(src, f["links"], data, 1, 0)
            assert finite and np.array_equal(data[0], ens.links[1].numpy())
    with h5py.File(src, "r") as f:
        assert hdf5._direct_fd(f["links"]) is not None  # the default (sec2) driver


def test_direct_read_takes_the_file_hdf5_opened(tmp_path):
    """The runs are offsets in the file HDF5 has open: a store replaced at the same path
    while it is open (a writer renaming a new store over it) does not mix in its bytes."""
    first, second = make_ensemble(batch=2, seed=21), make_ensemble(batch=2, seed=22)
    path, other = tmp_path / "s.h5", tmp_path / "t.h5"
    io.write(path, first)
    io.write(other, second)
    with h5py.File(path, "r") as f:
        runs = hdf5._storage_runs(f["links"], 1)
        assert runs is not None
        other.replace(path)
        data = np.empty((1, *f["links"].shape[1:]), dtype=f["links"].dtype)
        ((found, finite),) = hdf5._read_many(path, [runs], data, hdf5._direct_fd(f["links"]))
        assert np.array_equal(data[0], first.links[1].numpy())
        assert found == hdf5.compiled.crc32(np.ascontiguousarray(first.links[1].numpy()))


def test_size_guard_only_where_the_bytes_are_in_the_file(tmp_path):
    """A gzip'd copy of a cold start needs more bytes than its file has and is a good store
    (read through HDF5); an uncompressed store whose count claims more configurations than
    its file can hold is refused before anything is allocated."""
    links = torch.zeros(3, 4, 2, 3, 4, 5, 3, 3, dtype=torch.complex128)
    for a in range(3):
        links[..., a, a] = 1
    src, packed = tmp_path / "cold.h5", tmp_path / "cold_gz.h5"
    io.write(src, io.Ensemble(links, precision=64))
    _relayout(src, packed, chunks=(1, 4, 2, 3, 4, 5, 3, 3), compression="gzip")
    assert packed.stat().st_size < links.numel() * 16
    back = io.read(packed)
    assert torch.equal(back.links, links) and all(c.ok for m in back.meta for c in m.checks)
    with h5py.File(src, "r+") as f:
        f["links"].resize(1 << 20, axis=0)
        f["meta"].resize(1 << 20, axis=0)
        f.attrs["count"] = 1 << 20
    with pytest.raises(FormatError, match=r"cold\.h5: /links claims \d+ bytes for 1048576 configuration\(s\) but the"):
        io.read(src)


def test_size_guard_counts_a_repeated_configuration_once(tmp_path):
    """A selection that repeats configurations asks for more bytes than the file holds, yet
    each is stored once: it is read (every copy checked), not refused as a damaged file."""
    ens = make_ensemble(batch=2, seed=17)
    path = _stored(tmp_path, ens)
    times = path.stat().st_size // ens.links[0].numel() // 16 + 2
    picked = io.read(path, index=[1, 0] * times)
    assert torch.equal(picked.links, ens.links[[1, 0] * times])
    assert len(picked.meta) == 2 * times and all(c.ok for m in picked.meta for c in m.checks)


def test_without_positional_reads_hdf5_reads(tmp_path, monkeypatch):
    """A platform without ``os.preadv`` (Windows) reads every layout through HDF5."""
    ens = make_ensemble(batch=2, seed=6)
    path = _stored(tmp_path, ens)
    monkeypatch.delattr(hdf5.os, "preadv")
    with h5py.File(path, "r") as f:
        assert hdf5._direct_fd(f["links"]) is None
    back = io.read(path)
    assert torch.equal(back.links, ens.links) and all(c.ok for m in back.meta for c in m.checks)


@pytest.mark.parametrize("threads", [1, 2])
def test_many_small_configurations_are_read_together_and_checked_each(tmp_path, monkeypatch, threads):
    """A store of many small configurations (one chunk each, one after the other in the file):
    neighbouring configurations are read with one call, yet each has its own CRC-32 and
    finiteness verdict; any selection (out of order, repeated) reads the right ones."""
    theta = torch.from_numpy(np.random.default_rng(3).uniform(-np.pi, np.pi, size=(40, 2, 4, 4)))
    path = tmp_path / "u1.h5"
    io.write(path, io.Ensemble(theta, field="u1"))
    monkeypatch.setattr(hdf5, "PIPELINE_BYTES", 0)
    monkeypatch.setattr(hdf5, "PIECE_BYTES", 1024)
    calls = []
    preadv = hdf5.os.preadv
    monkeypatch.setattr(
        hdf5.os, "preadv", lambda fd, bufs, offset: calls.append(len(bufs[0])) or preadv(fd, bufs, offset)
    )
    with job_threads(threads):
        back = io.read(path)
        assert torch.equal(back.links, theta) and all(c.ok for m in back.meta for c in m.checks)
        assert calls == [1024] * 10  # 40 configurations of 256 bytes, in reads of PIECE_BYTES
        picked = io.read(path, index=[7, 0, 7, 39, 8])
        assert torch.equal(picked.links, theta[[7, 0, 7, 39, 8]])
        assert all(c.ok for m in picked.meta for c in m.checks)
        assert [m.record_list[0].split()[1] for m in picked.meta] == [
            "/links[7]",
            "/links[0]",
            "/links[7]",
            "/links[39]",
            "/links[8]",
        ]
    with h5py.File(path, "r+") as f:
        f["links"][12, 1, 2, 3] += 1e-9  # damage configuration 12 only
    with pytest.raises(ChecksumError, match="hdf5 crc32 of configuration 12 mismatch"):
        io.read(path)
    back = io.read(path, verify=False)
    assert [i for i, m in enumerate(back.meta) if not all(c.ok for c in m.checks)] == [12]


def test_chunk_table_equals_chunk_queries(tmp_path, monkeypatch):
    """The table of one pass over the chunk index (many configurations wanted) gives the runs
    that one query per chunk gives; a configuration whose chunks were never written has none."""
    _small_chunks(monkeypatch, 1000)
    ens = make_ensemble(batch=6, seed=12)
    path = _stored(tmp_path, ens)
    with h5py.File(path, "r+") as f:
        f["links"].resize(8, axis=0)  # configurations 6 and 7: no chunk written
        ds = f["links"]
        table = hdf5._storage_plan(ds, wanted=8)
        query = hdf5._storage_plan(ds, wanted=1)
        assert table is not None and query is not None
        queried = [query(i) for i in range(8)]
        assert [table(i) for i in range(8)] == queried
        assert all(r is not None and len(r) > 2 for r in queried[:6]) and queried[6] is None and queried[7] is None


class _CountingId:
    """A dataset id that counts the chunk queries asked of it (and forwards everything)."""

    def __init__(self, real):
        self.real, self.queries = real, 0

    def get_chunk_info_by_coord(self, coord):
        self.queries += 1
        return self.real.get_chunk_info_by_coord(coord)

    def __getattr__(self, name):
        return getattr(self.real, name)


class _Dataset:
    def __init__(self, ds):
        self.id = _CountingId(ds.id)
        self.shape, self.dtype, self.chunks = ds.shape, ds.dtype, ds.chunks


def test_chunk_table_is_made_only_for_many_configurations(tmp_path, monkeypatch):
    """One pass over the chunk index when the wanted chunks are 32 or more and a quarter or
    more of the store's; else one query per chunk (a few configurations of a large store)."""
    _small_chunks(monkeypatch, 20000)
    ens = make_ensemble(batch=40, seed=15)
    path = _stored(tmp_path, ens)
    with h5py.File(path, "r") as f:
        assert len(hdf5._storage_runs(f["links"], 0)) == 4  # one chunk per direction
        # 40 configurations of 4 chunks: a table from 10 wanted (40 chunks, a quarter of 160)
        for wanted, table in ((40, True), (10, True), (9, False), (2, False), (1, False)):
            ds = _Dataset(f["links"])
            plan = hdf5._storage_plan(ds, wanted=wanted)
            assert plan is not None
            runs = [plan(i) for i in range(wanted)]
            assert runs == [hdf5._storage_runs(f["links"], i) for i in range(wanted)]
            assert ds.id.queries == (0 if table else 4 * wanted), wanted
    # a small store, all of it wanted: a table only from 32 chunks (8 configurations of 4)
    for batch, table in ((7, False), (8, True)):
        path = tmp_path / f"s{batch}.h5"
        io.write(path, make_ensemble(batch=batch, seed=16))
        with h5py.File(path, "r") as f:
            ds = _Dataset(f["links"])
            plan = hdf5._storage_plan(ds, wanted=batch)
            assert plan is not None
            assert [plan(i) for i in range(batch)] == [hdf5._storage_runs(f["links"], i) for i in range(batch)]
            assert ds.id.queries == (0 if table else 4 * batch), batch


class _IdWithOffsetsInChunks(_CountingId):
    """A dataset id whose chunk iteration gives each chunk's index instead of its first
    element (HDF5 before pull request 1969, HDFGroup/hdf5 issue 1419)."""

    def __init__(self, real, chunks):
        super().__init__(real)
        self.chunks = chunks

    def chunk_iter(self, callback):
        def scaled(info):
            offset = tuple(o // c for o, c in zip(info.chunk_offset, self.chunks, strict=True))
            return callback(info._replace(chunk_offset=offset))

        return self.real.chunk_iter(scaled)


def test_chunk_table_with_offsets_in_chunks_is_not_used(tmp_path, monkeypatch):
    """Chunk offsets that are not in dataset elements (some are not multiples of the chunk
    shape) would name other chunks of the configuration: the table is dropped and each
    chunk asked for."""
    _small_chunks(monkeypatch, 128)
    theta = torch.from_numpy(np.random.default_rng(4).uniform(-np.pi, np.pi, size=(40, 2, 8, 8)))
    path = tmp_path / "u1.h5"
    io.write(path, io.Ensemble(theta, field="u1"))
    with h5py.File(path, "r") as f:
        assert f["links"].chunks == (1, 1, 2, 8)  # 4 chunks along x: indices 0..3, offsets 0, 2, 4, 6
        queried = [hdf5._storage_runs(f["links"], i) for i in range(40)]
        ds = _Dataset(f["links"])
        ds.id = _IdWithOffsetsInChunks(f["links"].id, f["links"].chunks)
        plan = hdf5._storage_plan(ds, wanted=40)
        assert plan is not None and [plan(i) for i in range(40)] == queried
        assert ds.id.queries == 40 * 8


def test_configurations_hdf5_must_read_leave_the_others_direct(tmp_path, monkeypatch):
    """A configuration without runs (its chunk never written) among ones with runs: HDF5
    reads that one, the others are still read straight from the file, and each keeps its
    own metadata and CRC-32 verdict, in any order of the selection."""
    theta = torch.from_numpy(np.random.default_rng(6).uniform(-np.pi, np.pi, size=(40, 2, 4, 4)))
    path = tmp_path / "u1.h5"
    io.write(path, io.Ensemble(theta, field="u1"))
    with h5py.File(path, "r+") as f:  # configuration 40: all zeros, never written (HDF5's fill value)
        f["links"].resize(41, axis=0)
        f["meta"].resize(41, axis=0)
        meta = json.loads(f["meta"][0])
        meta["crc32"] = f"{zlib.crc32(np.zeros((2, 4, 4)).tobytes()):08x}"
        meta["provenance"]["source"] = "zeros"
        f["meta"][40] = json.dumps(meta)
        f.attrs["count"] = 41
        assert hdf5._storage_runs(f["links"], 40) is None
    expected = torch.cat([theta, torch.zeros(1, 2, 4, 4, dtype=theta.dtype)])
    preadv = hdf5.os.preadv
    calls = []
    monkeypatch.setattr(
        hdf5.os, "preadv", lambda fd, bufs, offset: calls.append(len(bufs[0])) or preadv(fd, bufs, offset)
    )
    for index, direct in ((None, 40), ([40, 3, 4, 40, 39], 3), ([40], 0)):
        calls.clear()
        back = io.read(path, index=index)
        picked = list(range(41)) if index is None else index
        assert torch.equal(back.links, expected[picked]) and all(c.ok for m in back.meta for c in m.checks)
        assert [m.provenance["source"] == "zeros" for m in back.meta] == [i == 40 for i in picked]
        assert sum(calls) == direct * 2 * 4 * 4 * 8, index


class _CountingMeta:
    """A /meta dataset that counts the reads asked of it."""

    def __init__(self, real):
        self.real, self.reads = real, 0

    def __getitem__(self, key):
        self.reads += 1
        return self.real[key]


@pytest.mark.parametrize("kind", ["vlen utf-8", "vlen as str", "fixed length"])
def test_meta_of_a_run_is_read_with_one_call(tmp_path, kind):
    """/meta of consecutive configurations is one read, of any other selection one read
    each; either way entry j is the text of configuration sel[j], as read one by one."""
    texts = [json.dumps({"n": i, "pad": "x" * (i % 7)}) for i in range(12)]
    path = tmp_path / "m.h5"
    with h5py.File(path, "w") as f:
        if kind == "fixed length":
            f.create_dataset("meta", data=np.array([t.encode() for t in texts], dtype="S40"))
        else:
            f.create_dataset("meta", data=texts, dtype=h5py.string_dtype("utf-8"))
    with h5py.File(path, "r") as f:
        ds = f["meta"].asstr() if kind == "vlen as str" else f["meta"]
        for sel, reads in (
            (list(range(12)), 1),
            ([3, 4, 5], 1),
            ([11], 1),
            ([], 0),
            ([5, 4, 3], 3),
            ([2, 2], 2),
            ([0, 2, 4], 3),
        ):
            meta = _CountingMeta(ds)
            got = hdf5._meta_texts(meta, sel)
            assert got == [ds[i] for i in sel] and meta.reads == reads, sel
            assert [json.loads(t)["n"] for t in got] == sel


def test_chunk_table_counts_the_user_block(tmp_path):
    """A chunked store with a user block, many configurations wanted: the offsets of the one
    pass over the chunk index count the user block, as the chunk queries do, and the store
    reads back with every check passed."""
    theta = torch.from_numpy(np.random.default_rng(9).uniform(-np.pi, np.pi, size=(40, 2, 4, 4)))
    src, path = tmp_path / "a.h5", tmp_path / "b.h5"
    io.write(src, io.Ensemble(theta, field="u1"))
    _relayout(src, path, 512, chunks=(1, 1, 4, 4), maxshape=(None, 2, 4, 4))
    with h5py.File(path, "r") as f:
        ds = _Dataset(f["links"])
        plan = hdf5._storage_plan(ds, wanted=40)
        if tuple(h5py.version.hdf5_version_tuple) < hdf5.CHUNK_OFFSETS_FROM_FILE_START:
            assert plan is None
        else:
            assert plan is not None
            runs = [plan(i) for i in range(40)]
            assert ds.id.queries == 0 and runs == [hdf5._storage_runs(f["links"], i) for i in range(40)]
            assert all(_runs_bytes(path, r) == f["links"][i].tobytes() for i, r in enumerate(runs))
    back = io.read(path)
    assert torch.equal(back.links, theta) and all(c.ok for m in back.meta for c in m.checks)


def test_chunks_of_several_configurations_are_read_once_per_stretch(tmp_path, monkeypatch):
    """A compressed copy with chunks of many configurations (h5py's default chunking): each
    stretch of consecutive stored configurations is one HDF5 read, any selection gets its own
    configurations and CRC verdicts, and damage is still named by its configuration."""
    theta = torch.from_numpy(np.random.default_rng(9).uniform(-np.pi, np.pi, size=(30, 2, 4, 4)))
    src, path = _stored(tmp_path, io.Ensemble(theta, field="u1")), tmp_path / "gz.h5"
    _relayout(src, path, chunks=(10, 2, 4, 4), compression="gzip")
    calls = []
    real = hdf5._read_by_stretches
    monkeypatch.setattr(
        hdf5, "_read_by_stretches", lambda ds, data, sel: calls.append(list(sel)) or real(ds, data, sel)
    )
    back = io.read(path)
    assert torch.equal(back.links, theta) and all(c.ok for m in back.meta for c in m.checks) and len(calls) == 1
    reads = []
    import h5py as _h5

    real_read = _h5.Dataset.read_direct
    monkeypatch.setattr(_h5.Dataset, "read_direct", lambda self, *a: reads.append(a[1]) or real_read(self, *a))
    for index in ([7, 0, 7, 29, 8], slice(25, 3, -4), [12]):
        reads.clear()
        picked = io.read(path, index=index)
        want = theta[list(range(30))[index] if isinstance(index, slice) else index]
        assert torch.equal(picked.links, want) and all(c.ok for m in picked.meta for c in m.checks)
        stored = sorted(set(list(range(30))[index] if isinstance(index, slice) else index))
        stretches = sum(1 for k, i in enumerate(stored) if k == 0 or stored[k - 1] != i - 1)
        assert len(reads) == stretches
    with h5py.File(path, "r+") as f:
        f["links"][17, 1, 2, 3] += 1e-9
    with pytest.raises(ChecksumError, match="hdf5 crc32 of configuration 17 mismatch"):
        io.read(path, index=slice(10, 20))


@pytest.mark.parametrize(
    "index",
    [slice(0, 10, 0), 1.5, "12", True, [True, False], np.ones(30, dtype=bool), torch.tensor([[1, 2]]), [1, "2"]],
)
def test_an_index_of_another_kind_is_refused_by_name(tmp_path, index):
    """Not blamed on the file, and not reinterpreted (a mask as integers, a string as digits)."""
    path = _stored(tmp_path, make_ensemble(batch=3, seed=3))
    with pytest.raises(ValueError, match="index"):
        io.read(path, index=index)


def test_integer_arrays_and_scalars_are_indices(tmp_path):
    ens = make_ensemble(batch=4, seed=5)
    path = _stored(tmp_path, ens)
    for index, want in (
        (np.array([3, 1]), [3, 1]),
        (torch.tensor([0, 0]), [0, 0]),
        (torch.tensor(2), [2]),
        (np.int64(-1), [3]),
        (range(1, 3), [1, 2]),
    ):
        assert torch.equal(io.read(path, index=index).links, ens.links[want])
