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

import numpy as np
import pytest
import torch

from flowplug import io
from flowplug.adapters import hdf5
from flowplug.errors import ChecksumError, FormatError
from flowplug.threads import job_threads

from _io_helpers import make_ensemble

h5py = pytest.importorskip("h5py")


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
    small = hdf5.chunk_shape
    monkeypatch.setattr(hdf5, "chunk_shape", lambda shape, itemsize: small(shape, itemsize, target=target))
    ens = make_ensemble(lattice, batch=3, seed=5)
    path = tmp_path / "s.h5"
    io.write(path, ens)
    with h5py.File(path, "r") as f:
        ds = f["links"]
        for i in range(3):
            runs = hdf5._storage_runs(ds, i)
            assert runs is not None
            assert _runs_bytes(path, runs) == ds[i].tobytes()
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
    with h5py.File(path, "r") as f:
        runs = hdf5._storage_runs(f["links"], 2)
        assert (runs is not None) == direct, name
        if runs is not None:
            assert _runs_bytes(path, runs) == f["links"][2].tobytes()
    back = io.read(path)
    assert torch.equal(back.links, ens.links) and all(c.ok for m in back.meta for c in m.checks)
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
    links, the finiteness proven, a NaN in any piece and a changed number caught."""
    from flowplug.linkcheck import _known_finite

    small = hdf5.chunk_shape
    monkeypatch.setattr(hdf5, "chunk_shape", lambda shape, itemsize: small(shape, itemsize, target=1000))
    monkeypatch.setattr(hdf5, "PIECE_BYTES", 160)  # several pieces per run, one edge piece
    monkeypatch.setattr(hdf5, "PIPELINE_BYTES", 0)
    calls = []
    checked = hdf5.compiled.crc32_finite
    monkeypatch.setattr(hdf5.compiled, "crc32_finite", lambda a, v=0: calls.append(a.nbytes) or checked(a, v))
    ens = make_ensemble(batch=2, seed=14)
    path = tmp_path / "s.h5"
    io.write(path, ens)
    with job_threads(threads):
        back = hdf5.Hdf5Handler().read(path)
        assert torch.equal(back.links, ens.links) and all(c.ok for m in back.meta for c in m.checks)
        assert _known_finite(back.links)
        assert len(calls) > 20 and max(calls) <= 160 and sum(calls) == 2 * ens.links[0].numel() * 16
        for where in ((1, 3, 1, 2, 3, 4), (1, 0, 0, 0, 0, 1), (1, 2, 0, 1, 2, 3)):
            links = ens.links.clone()
            links[(*where, 1, 2)] = complex(0, float("inf"))
            bad = tmp_path / f"bad{where[1]}.h5"
            io.write(bad, io.Ensemble(links))
            site = ", ".join(map(str, where[2:]))
            named = rf"NaN or Inf .*configuration 1, direction {where[1]}, site \({site}\)"
            with pytest.raises(FormatError, match=named):
                io.read(bad)
        with h5py.File(path, "r+") as f:
            f["links"][1, 1, 1, 1, 1, 1, 2, 0] -= 1e-13
        with pytest.raises(ChecksumError, match="hdf5 crc32 of configuration 1 mismatch"):
            io.read(path)


def test_short_file_and_wrong_runs_are_named(tmp_path):
    out = np.empty(40, dtype=np.complex128)
    path = tmp_path / "short.bin"
    path.write_bytes(bytes(600))
    with pytest.raises(FormatError, match=r"short\.bin: /links: read 600 of 640 bytes at offset 0"):
        hdf5._read_runs(path, [(0, 640)], out)
    with pytest.raises(FormatError, match=r"short\.bin: /links runs cover 320 bytes; the configuration has 640"):
        hdf5._read_runs(path, [(0, 320)], out)
    crc, finite = hdf5._read_runs(path, [(0, 320), (0, 320)], out)
    assert finite and crc == hdf5.compiled.crc32(np.zeros(640, np.uint8))
