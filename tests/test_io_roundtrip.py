"""Round trips through every writable format and the axis order of every format.

Non-cubic lattices (2x3x4x5; openQCD needs even extents: 2x4x6x8) pin the axis order:
a swapped axis would not survive them.
"""

from __future__ import annotations

import os
import re
import struct
import warnings

import numpy as np
import pytest
import torch

from flowplug import io
from flowplug.adapters.checksums import milc_checksum_reference, nersc_checksum, scidac_checksum_reference
from flowplug.adapters.lime import scan
from flowplug.errors import FormatError, NonUnitaryWarning

from _io_helpers import coded_ensemble, make_ensemble

WRITABLE = io.formats(writable=True)


def _lattice_for(fmt: str) -> tuple[int, ...]:
    return (2, 4, 6, 8) if fmt == "openqcd" else (2, 3, 4, 5)


def _cases():
    for fmt in WRITABLE:
        handler = io.get_format(fmt)
        for group in ("su3", "su2"):
            if not handler.holds(group):
                continue
            for precision in (32, 64):
                yield pytest.param(fmt, group, precision, id=f"{fmt}-{group}-{precision}")


@pytest.mark.parametrize("fmt,group,precision", list(_cases()))
def test_round_trip_bit_exact(tmp_path, fmt, group, precision):
    ens = make_ensemble(_lattice_for(fmt), n=int(group[2:]), precision=precision, seed=7)
    path = tmp_path / f"cfg.{io.get_format(fmt).extension}"
    io.write(path, ens, fmt)
    assert io.detect(path) == fmt
    back = io.read(path, unitarity="error")
    assert back.group == group and back.lattice == ens.lattice
    assert torch.equal(back.links, ens.links)  # bit-exact, complex128
    expected_precision = 64 if fmt == "openqcd" else precision
    assert back.precision == expected_precision
    assert back.checksum_status == "ok"
    # writing what was read reproduces the file byte for byte
    again = tmp_path / f"again.{io.get_format(fmt).extension}"
    io.write(again, back, fmt)
    if fmt != "hdf5":  # HDF5 files embed object timestamps
        assert again.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("fmt", [f for f in WRITABLE if f != "openqcd"])
def test_axis_order_pinned_by_coded_links(tmp_path, fmt):
    ens = coded_ensemble()
    path = tmp_path / f"coded.{io.get_format(fmt).extension}"
    io.write(path, ens, fmt, **({"datatype": "4D_SU3_GAUGE_3x3"} if fmt == "nersc" else {}))
    back = io.read(path, unitarity="ignore")
    assert torch.equal(back.links, ens.links)
    u = back.links[0, ..., 0, 0].real
    assert float(u[1, 1, 2, 3, 4]) == 10000 + 1000 + 200 + 30 + 4  # mu=y at x=1,y=2,z=3,t=4


def _ildg_payload(path):
    rec = next(r for r in scan(path) if r.type == "ildg-binary-data")
    return path.read_bytes()[rec.data_offset : rec.data_offset + rec.length]


def test_ildg_file_layout_is_t_z_y_x_mu(tmp_path):
    ens = coded_ensemble()
    path = tmp_path / "coded.ildg"
    io.write(path, ens, "ildg", precision=64)
    lx, ly, lz, lt = ens.lattice
    arr = np.frombuffer(_ildg_payload(path), ">c16").reshape(lt, lz, ly, lx, 4, 3, 3)
    # file index (t, z, y, x, mu) holds code of (mu, x, y, z, t)
    for t, z, y, x, mu in [(4, 3, 2, 1, 1), (0, 0, 0, 1, 3), (2, 1, 0, 0, 2)]:
        assert arr[t, z, y, x, mu, 0, 0] == 10000 * mu + 1000 * x + 100 * y + 10 * z + t + 0.5j
    # x fastest: the second site in the file is x = 1
    assert arr.reshape(-1, 4, 3, 3)[1, 0, 0, 0].real == 1000


def test_ildg_record_set_and_checksum(tmp_path):
    ens = make_ensemble(precision=32, seed=3)
    path = tmp_path / "cfg.ildg"
    io.write(path, ens, "ildg")
    recs = scan(path)
    assert [r.type for r in recs] == [
        "scidac-private-file-xml",
        "scidac-file-xml",
        "scidac-private-record-xml",
        "scidac-record-xml",
        "ildg-format",
        "ildg-data-lfn",
        "ildg-binary-data",
        "scidac-checksum",
    ]
    mb = [bool(r.flags & 0x8000) for r in recs]
    me = [bool(r.flags & 0x4000) for r in recs]
    assert mb[0] and me[-1]
    assert all(me[i] == mb[i + 1] for i in range(len(recs) - 1))
    data = path.read_bytes()
    text = {
        r.type: data[r.data_offset : r.data_offset + r.length].decode() for r in recs if r.type != "ildg-binary-data"
    }
    assert "<precision>32</precision>" in text["ildg-format"] and "<lx>2</lx>" in text["ildg-format"]
    assert "<lt>5</lt>" in text["ildg-format"] and 'xmlns="http://www.lqcd.org/ildg"' in text["ildg-format"]
    assert "USQCD_F3_ColorMatrix" in text["scidac-private-record-xml"]
    assert "<typesize>72</typesize>" in text["scidac-private-record-xml"]
    suma, sumb = scidac_checksum_reference(_ildg_payload(path), 288)
    assert f"<suma>{suma:08x}</suma>" in text["scidac-checksum"]
    assert f"<sumb>{sumb:08x}</sumb>" in text["scidac-checksum"]
    assert all(r.offset % 8 == 0 for r in recs)


def test_nersc_two_row_and_endianness(tmp_path):
    ens = make_ensemble(precision=64, seed=5)
    for dt in ("4D_SU3_GAUGE", "4D_SU3_GAUGE_3x3"):
        for endian in ("big", "little"):
            for precision in (32, 64):
                path = tmp_path / f"{dt}.{endian}.{precision}.nersc"
                io.write(path, ens, "nersc", precision=precision, datatype=dt, endian=endian)
                head = path.read_bytes()[:2000].decode("ascii", "replace")
                assert f"DATATYPE = {dt}\n" in head
                back = io.read(path)
                assert back.checksum_status == "ok" and back.precision == precision
                ref = ens.links if precision == 64 else ens.links.to(torch.complex64).to(torch.complex128)
                assert torch.equal(back.links[..., :2, :], ref[..., :2, :])  # stored rows exact
                assert torch.allclose(back.links, ens.links, atol=1e-6 if precision == 32 else 1e-13)
                again = tmp_path / "again.nersc"
                io.write(again, back, "nersc", overwrite=True)
                assert again.read_bytes() == path.read_bytes()


def test_nersc_checksum_is_word_sum(tmp_path):
    ens = make_ensemble(precision=32, seed=9)
    path = tmp_path / "cfg.nersc"
    io.write(path, ens, "nersc", endian="big")
    data = path.read_bytes()
    body = data[data.index(b"END_HEADER\n") + 11 :]
    words = np.frombuffer(body, ">u4").astype(np.uint64)
    assert f"CHECKSUM = {int(words.sum()) % 2**32:08x}" in data[:2000].decode("ascii", "replace")
    assert nersc_checksum(body, ">") == int(words.sum()) % 2**32


def test_openqcd_layout(tmp_path):
    lattice = (2, 4, 6, 8)
    ens = make_ensemble(lattice, seed=11)
    path = tmp_path / "cfg.openqcd"
    io.write(path, ens, "openqcd")
    raw = path.read_bytes()
    n0, n1, n2, n3, plaq3 = struct.unpack("<4id", raw[:24])
    assert (n0, n1, n2, n3) == (8, 2, 4, 6)  # (t, x, y, z)
    assert len(raw) == 24 + 576 * np.prod(lattice)
    from flowplug.gauge import plaquette

    assert plaq3 == pytest.approx(3 * float(plaquette(ens.links)[0]), abs=1e-13)
    data = np.frombuffer(raw[24:], "<c16").reshape(-1, 4, 2, 3, 3)
    links = ens.links[0].numpy()
    # odd sites, t slowest and z fastest: the first odd site is (t, x, y, z) = (0, 0, 0, 1)
    x, y, z, t = 0, 0, 1, 0
    assert np.array_equal(data[0, 0, 0], links[3, x, y, z, t])  # U(x, +t)
    assert np.array_equal(data[0, 0, 1], links[3, x, y, z, (t - 1) % 8])  # U(x - t^, t)
    assert np.array_equal(data[0, 1, 0], links[0, x, y, z, t])  # direction 1 = x
    assert np.array_equal(data[0, 1, 1], links[0, (x - 1) % 2, y, z, t])
    assert np.array_equal(data[0, 3, 1], links[2, x, y, z - 1, t])  # direction 3 = z
    # the second odd site is (0, 0, 0, 3)
    assert np.array_equal(data[1, 2, 0], links[1, 0, 0, 3, 0])


def test_openqcd_rejects_odd_extents(tmp_path):
    with pytest.raises(FormatError, match="even extents"):
        io.write(tmp_path / "x.openqcd", make_ensemble((2, 3, 4, 5)), "openqcd")


def _milc_file(path, ens, byteorder="<"):
    lx, ly, lz, lt = ens.lattice
    data = ens.links[0].numpy().transpose(4, 3, 2, 1, 0, 5, 6).astype(np.dtype("c8").newbyteorder(byteorder))
    body = data.tobytes()
    s29, s31 = milc_checksum_reference(body, byteorder)
    head = struct.pack(byteorder + "5i", 20103, lx, ly, lz, lt) + b"Sun Nov 29 2026".ljust(64, b"\0")
    head += struct.pack(byteorder + "iII", 0, s29, s31)
    path.write_bytes(head + body)


@pytest.mark.parametrize("byteorder", ["<", ">"])
def test_milc_read_both_byte_orders(tmp_path, byteorder):
    ens = make_ensemble(precision=32, seed=13)
    path = tmp_path / "lat.milc"
    _milc_file(path, ens, byteorder)
    assert io.detect(path) == "milc"
    back = io.read(path)
    assert back.checksum_status == "ok"
    assert torch.equal(back.links, ens.links)


def test_hdf5_ensemble_append_and_metadata(tmp_path):
    a, b = make_ensemble(batch=2, seed=1), make_ensemble(batch=3, seed=2)
    a.attrs["beta"] = 5.7
    a.meta[0].provenance["run"] = {"kernel": "hmc", "trajectory": 10}
    path = tmp_path / "ens.h5"
    io.write(path, a)
    io.write(path, b, append=True)
    back = io.read(path)
    assert len(back) == 5 and back.attrs["beta"] == 5.7
    assert torch.equal(back.links, torch.cat([a.links, b.links]))
    assert back.meta[0].provenance["run"]["trajectory"] == 10
    assert [m.header["trajectory"] for m in back.meta] == [0, 1, 0, 1, 2]
    assert torch.equal(io.read(path, index=3).links, b.links[1:2])
    with pytest.raises(FormatError, match="exists"):
        io.write(path, a)
    with pytest.raises(FormatError, match="cannot append"):
        io.write(path, make_ensemble(n=2), append=True)


@pytest.mark.parametrize("layout", ["contiguous", "fixed chunks", "fixed with room"])
def test_hdf5_append_to_a_fixed_size_copy(tmp_path, layout):
    """A copy of a store whose /links cannot grow (contiguous, or chunked without maxshape) is
    refused by name before anything is written, and the store reads as before; a fixed-size
    copy with room left for the new entries takes them."""
    import h5py

    a, b = make_ensemble(batch=2, seed=1), make_ensemble(batch=1, seed=2)
    path = tmp_path / "ens.h5"
    io.write(path, a)
    with h5py.File(path, "r+") as f:
        links = f["links"][...]
        del f["links"]
        if layout == "contiguous":
            f.create_dataset("links", data=links)
        elif layout == "fixed chunks":
            f.create_dataset("links", data=links, chunks=(1, *links.shape[1:]))
        else:
            room = np.zeros((3, *links.shape[1:]), links.dtype)
            room[:2] = links
            f.create_dataset("links", data=room)
    before = path.read_bytes()
    if layout == "fixed with room":
        io.write(path, b, append=True)
        assert torch.equal(io.read(path).links, torch.cat([a.links, b.links]))
        return
    with pytest.raises(FormatError, match=r"/links has room for 2 entries .* append 1 more; nothing was written"):
        io.write(path, b, append=True)
    assert path.read_bytes() == before
    assert torch.equal(io.read(path).links, a.links)


def test_hdf5_holds_u1_and_2d(tmp_path):
    theta = torch.rand(3, 2, 4, 6, dtype=torch.float64) * 2 * np.pi - np.pi
    ens = io.Ensemble(theta)
    path = tmp_path / "u1.h5"
    io.write(path, ens)
    back = io.read(path)
    assert back.group == "u1" and torch.equal(back.links, theta)
    with pytest.raises(FormatError, match="holds su3"):
        io.write(tmp_path / "u1.ildg", ens[0])


def test_hdf5_keeps_32_bit_data_in_64_bit_store(tmp_path):
    e64, e32 = make_ensemble(precision=64, seed=1), make_ensemble(precision=32, seed=2)
    path = tmp_path / "mixed.h5"
    io.write(path, e64)
    io.write(path, e32, append=True)
    back = io.read(path, index=[1])
    assert back.precision == 32 and torch.equal(back.links, e32.links)
    with pytest.raises(FormatError, match="without rounding"):
        io.write(tmp_path / "s32.h5", e32)
        io.write(tmp_path / "s32.h5", e64, append=True)


def test_ildg_hdf5_ildg_keeps_xml_records_and_lfn(tmp_path):
    ens = make_ensemble(precision=32)
    from flowplug.io import Record

    ens.meta[0].records = [
        Record("scidac-file-xml", b"<?xml version='1.0'?><title>my file</title>\0"),
        Record("scidac-record-xml", b"<info>beta = 6.0</info>\0"),
    ]
    ens.meta[0].header["lfn"] = "lfn://test/cfg.100"
    io.write(tmp_path / "a.ildg", ens)
    a = io.read(tmp_path / "a.ildg")
    io.write(tmp_path / "b.h5", a)
    b = io.read(tmp_path / "b.h5")
    io.write(tmp_path / "c.ildg", b)
    c = io.read(tmp_path / "c.ildg")
    for rtype in ("scidac-file-xml", "scidac-record-xml"):
        assert c.meta[0].record(rtype).data == ens.meta[0].records[0 if rtype == "scidac-file-xml" else 1].data
    assert c.header["lfn"] == "lfn://test/cfg.100"
    assert (tmp_path / "a.ildg").read_bytes() == (tmp_path / "c.ildg").read_bytes()


def test_write_refuses_overwrite_and_is_atomic(tmp_path):
    ens = make_ensemble()
    path = tmp_path / "cfg.ildg"
    io.write(path, ens)
    before = path.read_bytes()
    with pytest.raises(FormatError, match="refusing to overwrite"):
        io.write(path, make_ensemble(seed=4))
    assert path.read_bytes() == before
    io.write(path, make_ensemble(seed=4), overwrite=True)
    assert path.read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["cfg.ildg"]  # no temporary left


def test_non_unitary_warns_or_raises(tmp_path):
    ens = make_ensemble()
    ens.links[0, 1, 1, 2, 3, 4] *= 1.01
    io.write(tmp_path / "bad.ildg", ens)
    with pytest.warns(NonUnitaryWarning, match=r"max \|U U\^\+ - 1\| = 0.02"):
        io.read(tmp_path / "bad.ildg")
    with pytest.raises(FormatError, match="not in SU3"):
        io.read(tmp_path / "bad.ildg", unitarity="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        io.read(tmp_path / "bad.ildg", unitarity="ignore")


def _nersc_header(path) -> dict[str, str]:
    data = path.read_bytes()
    text = data[: data.index(b"END_HEADER\n")].decode("ascii")
    return dict((k.strip(), v.strip()) for k, v in (line.split("=", 1) for line in text.splitlines()[1:]))


@pytest.mark.parametrize(
    "precision,endian,name",
    [(32, "big", "IEEE32BIG"), (64, "big", "IEEE64BIG"), (32, "little", "IEEE32"), (64, "little", "IEEE64")],
)
def test_nersc_floating_point_names_are_the_ones_grid_reads(tmp_path, precision, endian, name):
    ens = make_ensemble(precision=precision, seed=21)
    path = tmp_path / "cfg.nersc"
    io.write(path, ens, "nersc", endian=endian)
    assert f"\nFLOATING_POINT = {name}\n".encode() in path.read_bytes()
    assert _nersc_header(path)["FLOATING_POINT"] == name
    assert torch.equal(io.read(path).links, ens.links)
    # the long little-endian names stay readable, and a rewrite uses the short ones
    if endian == "little":
        old = path.read_bytes().replace(f"= {name}\n".encode(), f"= {name}LITTLE\n".encode())
        legacy = tmp_path / "legacy.nersc"
        legacy.write_bytes(old)
        back = io.read(legacy)
        assert torch.equal(back.links, ens.links)
        again = tmp_path / "again.nersc"
        io.write(again, back)
        assert _nersc_header(again)["FLOATING_POINT"] == name


def test_nersc_header_keeps_source_values_and_writes_plain_numbers(tmp_path):
    ens = make_ensemble(precision=32, seed=22)
    first = tmp_path / "first.nersc"
    io.write(first, ens)
    extra = (
        b"ENSEMBLE_ID = l2345_b6.0\nENSEMBLE_LABEL = test run\nSEQUENCE_NUMBER = 120\n"
        b"CREATOR = someone\nCREATOR_MACHINE = node17\nCREATION_DATE = Mon Jan  1 00:00:00 2024\n"
        b"ARCHIVE_DATE = Tue Jan  2 00:00:00 2024\nBETA = 6.00\nBOUNDARY_1 = ANTIPERIODIC\n"
        b"MY_OWN_KEY = kept\n"
    )
    data = first.read_bytes()
    source = tmp_path / "source.nersc"
    cut = data.index(b"FLOATING_POINT")
    text = data[:cut]
    for key in (b"ENSEMBLE_ID", b"ENSEMBLE_LABEL", b"SEQUENCE_NUMBER", b"CREATOR", b"BOUNDARY_1"):
        text = re.sub(rb"\n" + key + rb" = [^\n]*", b"", text)
    source.write_bytes(text + extra + data[cut:])
    src = io.read(source)
    assert src.header["beta"] == 6.0 and src.header["trajectory"] == 120
    out = tmp_path / "out.nersc"
    io.write(out, src)
    head = _nersc_header(out)
    for key, value in (
        ("ENSEMBLE_ID", "l2345_b6.0"),
        ("ENSEMBLE_LABEL", "test run"),
        ("SEQUENCE_NUMBER", "120"),
        ("CREATOR", "someone"),
        ("CREATOR_MACHINE", "node17"),
        ("CREATION_DATE", "Mon Jan 1 00:00:00 2024"),
        ("ARCHIVE_DATE", "Tue Jan 2 00:00:00 2024"),
        ("BETA", "6.00"),
        ("BOUNDARY_1", "ANTIPERIODIC"),
        ("BOUNDARY_4", "PERIODIC"),
        ("MY_OWN_KEY", "kept"),
    ):
        assert head[key] == value, key
    # header values of other sources: numbers written plainly, never quoted; non-numbers left out
    for beta, written in ((5.7, "5.7"), ("5.70", "5.70"), (6, "6"), (np.float64(5.85), "5.85"), ("weak", None)):
        one = io.Ensemble.from_links(ens.links, precision=32, header={"beta": beta, "trajectory": 7})
        path = tmp_path / f"beta-{beta}.nersc"
        io.write(path, one)
        head = _nersc_header(path)
        assert head.get("BETA") == written and head["SEQUENCE_NUMBER"] == "7"
        if written is not None:
            assert io.read(path).header["beta"] == float(written)


def _open_boundary(ens: io.Ensemble) -> io.Ensemble:
    """``ens`` with every time link on the last time slice set to zero (openQCD open boundaries)."""
    links = ens.links.clone()
    links[:, 3, :, :, :, -1] = 0
    return io.Ensemble(links, precision=ens.precision, meta=[m.copy() for m in ens.meta])


def test_openqcd_open_boundary_file(tmp_path):
    lattice = (2, 4, 4, 6)
    ens = _open_boundary(make_ensemble(lattice, seed=23))
    path = tmp_path / "cls.openqcd"
    io.write(path, ens, "openqcd")
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonUnitaryWarning)
        back = io.read(path, unitarity="error")
    assert back.header["boundary"] == "open" and back.checksum_status == "ok"
    assert back.header["unitarity"] < 1e-13 and back.header["determinant"] < 1e-13
    assert torch.equal(back.links, ens.links)
    # openQCD divides the plaquette sum by 6V with the vanishing time-like plaquettes at
    # x0 = T-1 included: the unit gauge with open boundaries stores 3 (1 - 1/(2T))
    unit = torch.eye(3, dtype=torch.complex128).expand(1, 4, *lattice, 3, 3).clone()
    unit_path = tmp_path / "unit.openqcd"
    io.write(unit_path, _open_boundary(io.Ensemble(unit)), "openqcd")
    stored = struct.unpack("<4id", unit_path.read_bytes()[:24])[4]
    assert stored == pytest.approx(3 * (1 - 1 / (2 * lattice[3])), abs=1e-14)
    assert io.read(unit_path, unitarity="error").checksum_status == "ok"
    # carried through other formats: NERSC says BOUNDARY_4 = OPEN; every read finds the boundary
    for fmt in ("nersc", "ildg", "hdf5"):
        out = tmp_path / f"cls.{io.get_format(fmt).extension}"
        io.write(out, back, fmt)
        again = io.read(out, unitarity="error")
        assert again.header["boundary"] == "open" and torch.equal(again.links, ens.links), fmt
    assert _nersc_header(tmp_path / "cls.nersc")["BOUNDARY_4"] == "OPEN"
    assert _nersc_header(tmp_path / "cls.nersc")["BOUNDARY_1"] == "PERIODIC"


def test_open_boundary_does_not_hide_other_damage(tmp_path):
    lattice = (2, 4, 4, 6)
    ens = _open_boundary(make_ensemble(lattice, seed=24))
    damaged = ens.links.clone()
    damaged[0, 1, 1, 2, 3, 2] *= 1.01  # a spatial link off the group
    path = tmp_path / "damaged.openqcd"
    io.write(path, io.Ensemble(damaged), "openqcd")
    with pytest.raises(FormatError, match="not in SU3"):
        io.read(path, unitarity="error")
    # a time slice only partly zero is not a boundary: those links are reported
    partly = make_ensemble(lattice, seed=25).links.clone()
    partly[0, 3, 0, :, :, -1] = 0
    path = tmp_path / "partly.openqcd"
    io.write(path, io.Ensemble(partly), "openqcd")
    with pytest.raises(FormatError, match="not in SU3"):
        io.read(path, unitarity="error")
    assert "boundary" not in io.read(path, unitarity="ignore").header


def test_info_reports_open_boundary_without_false_deviation(tmp_path, capsys):
    from flowplug.cli import main

    path = tmp_path / "cls.openqcd"
    io.write(path, _open_boundary(make_ensemble((2, 4, 4, 6), seed=26)), "openqcd")
    assert main(["info", "--json", str(path)]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    assert info["header"]["boundary"] == "open" and info["unitarity"] < 1e-13
    assert main(["info", str(path)]) == 0
    assert "boundary      open in time" in capsys.readouterr().out


def test_hdf5_chunks_stay_small_for_large_lattices(tmp_path):
    from flowplug.adapters.hdf5 import CHUNK_BYTES, chunk_shape

    for shape, itemsize in [
        ((4, 64, 64, 64, 128, 3, 3), 16),
        ((4, 96, 96, 96, 192, 3, 3), 16),
        ((4, 256, 256, 256, 512, 3, 3), 8),
        ((4, 48, 48, 48, 96, 2, 2), 8),
        ((2, 4096, 4096), 8),
        ((2, 10**9), 4),
    ]:
        chunk = chunk_shape(shape, itemsize)
        assert len(chunk) == len(shape) + 1 and chunk[0] == 1
        assert all(1 <= c <= n for c, n in zip(chunk[1:], shape, strict=True))
        nbytes = itemsize * int(np.prod(chunk))
        assert 1 << 20 <= nbytes <= min(16 << 20, CHUNK_BYTES), (shape, chunk)
    # a small configuration is one chunk; the store uses the computed chunks
    assert chunk_shape((4, 4, 4, 4, 4, 3, 3), 16) == (1, 4, 4, 4, 4, 4, 3, 3)
    import h5py

    path = tmp_path / "small.h5"
    io.write(path, make_ensemble((4, 4, 4, 4), batch=2, seed=27))
    with h5py.File(path, "r") as f:
        assert f["links"].chunks == chunk_shape((4, 4, 4, 4, 4, 3, 3), 16)


@pytest.mark.parametrize("precision", [32, 64])
def test_ildg_file_order_view_reads_the_same_and_checks_the_same(tmp_path, monkeypatch, precision):
    """``io.read(..., contiguous=False)``: the same links (a view of the file order), the
    same checks and deviations; written back bit for bit; damage still caught."""
    from flowplug.adapters import common
    from flowplug.errors import ChecksumError

    monkeypatch.setattr(common, "CHUNK_BYTES", 1000)  # many pieces
    ens = make_ensemble(precision=precision, seed=3)
    path = tmp_path / "a.ildg"
    io.write(path, ens)
    full, view = io.read(path), io.read(path, contiguous=False)
    assert full.links.is_contiguous() and not view.links.is_contiguous()
    assert torch.equal(view.links, ens.links) and torch.equal(full.links, ens.links)
    assert [c.as_dict() for c in view.meta[0].checks] == [c.as_dict() for c in full.meta[0].checks]
    assert all(c.ok for c in view.meta[0].checks)
    for key in ("unitarity", "determinant"):
        assert view.meta[0].header[key] == pytest.approx(full.meta[0].header[key], abs=1e-15)
    again = tmp_path / "b.ildg"
    io.write(again, view)
    assert _ildg_payload(again) == _ildg_payload(path)
    data = bytearray(path.read_bytes())
    rec = next(r for r in scan(path) if r.type == "ildg-binary-data")
    data[rec.data_offset + rec.length // 2] ^= 0x10  # one flipped bit in the payload
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="scidac-checksum suma mismatch"):
        io.read(path, contiguous=False)


def test_hdf5_slab_pipeline_reads_and_verifies(tmp_path, monkeypatch):
    """Configurations read through HDF5 (a layout it must transform, here forced) slab by
    slab with the CRC-32 summed in a helper thread."""
    from flowplug.adapters import hdf5
    from flowplug.errors import ChecksumError

    monkeypatch.setattr(hdf5, "_storage_plan", lambda links_ds, wanted=1: None)
    small = hdf5.chunk_shape
    monkeypatch.setattr(hdf5, "chunk_shape", lambda shape, itemsize: small(shape, itemsize, 4096))  # many chunks
    monkeypatch.setattr(hdf5, "PIPELINE_BYTES", 0)
    shape = (4, 2, 3, 4, 5, 3, 3)
    slabs = hdf5._slabs(shape, hdf5.chunk_shape(shape, 16)[1:])
    assert len(slabs) > 2
    covered = np.zeros(shape, dtype=int)
    for sel in slabs:
        covered[sel] += 1
    assert (covered == 1).all()
    ens = make_ensemble(batch=2, seed=4)
    path = tmp_path / "p.h5"
    io.write(path, ens)
    back = io.read(path)
    assert torch.equal(back.links, ens.links) and all(c.ok for m in back.meta for c in m.checks)
    import h5py

    with h5py.File(path, "r+") as f:
        f["links"][1, 2, 1, 0, 0, 0, 0, 0] += 1e-12  # damage one number of configuration 1
    with pytest.raises(ChecksumError, match="hdf5 crc32 of configuration 1"):
        io.read(path)


def test_lime_headers_are_scanned_once_per_read_and_again_after_a_change(tmp_path, monkeypatch):
    """Reading an ILDG file sniffs it with three handlers and reads it: one scan of its
    records; a file replaced or rewritten since is scanned again."""
    from flowplug.adapters import lime

    scans = []
    real = lime.scan
    monkeypatch.setattr(lime, "scan", lambda path: scans.append(path) or real(path))
    monkeypatch.setattr(lime, "_last_scan", None)
    a, b = make_ensemble(seed=51), make_ensemble(seed=52)
    path = tmp_path / "a.ildg"
    io.write(path, a)
    assert torch.equal(io.read(path).links, a.links) and len(scans) == 1
    assert torch.equal(io.read(path).links, a.links) and len(scans) == 1  # unchanged: not again
    io.write(path, b, overwrite=True)  # a new file under the same name
    assert torch.equal(io.read(path).links, b.links) and len(scans) == 2
    before = path.stat().st_mtime_ns
    with path.open("r+b") as fh:  # the same file, rewritten in place (same size)
        fh.write(path.read_bytes())
    os.utime(path, ns=(before + 10**7, before + 10**7))  # later than the file system's clock tick
    assert torch.equal(io.read(path).links, b.links) and len(scans) == 3
