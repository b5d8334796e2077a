"""Bad input: every defect gives FormatError/ChecksumError with a precise message."""

from __future__ import annotations

import re
import struct
import tracemalloc

import numpy as np
import pytest

from flowplug import io
from flowplug.adapters.lime import scan
from flowplug.cli import main
from flowplug.errors import ChecksumError, FormatError

from _io_helpers import make_ensemble


@pytest.fixture()
def ildg(tmp_path):
    path = tmp_path / "cfg.ildg"
    io.write(path, make_ensemble(precision=64, seed=21))
    return path


def _record(path, rtype):
    return next(r for r in scan(path) if r.type == rtype)


def test_truncated_binary_record(ildg, tmp_path):
    bad = tmp_path / "cut.ildg"
    rec = _record(ildg, "ildg-binary-data")
    bad.write_bytes(ildg.read_bytes()[: rec.data_offset + rec.length // 2])
    with pytest.raises(FormatError, match=r"record 6 'ildg-binary-data' claims \d+ bytes .*truncated"):
        io.read(bad)


def test_truncated_record_header(ildg, tmp_path):
    bad = tmp_path / "cut.ildg"
    bad.write_bytes(ildg.read_bytes()[: 144 + 152 + 50])
    with pytest.raises(FormatError, match="header at byte .* is cut off"):
        io.read(bad)


def test_wrong_magic(ildg, tmp_path):
    bad = tmp_path / "magic.bin"  # no extension to fall back on
    bad.write_bytes(b"\x00\x11\x22\x33" + ildg.read_bytes()[4:])
    with pytest.raises(FormatError, match="not a recognised lattice file"):
        io.read(bad)
    with pytest.raises(FormatError, match="LIME magic expected 456789ab, found 00112233"):
        io.read(bad, format="ildg")


def test_record_length_beyond_file_is_not_allocated(ildg, tmp_path):
    data = bytearray(ildg.read_bytes())
    rec = _record(ildg, "ildg-binary-data")
    struct.pack_into(">Q", data, rec.offset + 8, 2**62)
    bad = tmp_path / "huge.ildg"
    bad.write_bytes(bytes(data))
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match=r"claims 4611686018427387904 bytes .* only \d+ remain"):
            io.read(bad)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 * 2**20


def test_bare_lime_needs_lattice_and_checks_length(tmp_path):
    ens = make_ensemble(n=2, precision=64, seed=3)
    full = tmp_path / "full.ildg"
    io.write(full, ens)
    rec = _record(full, "ildg-binary-data")
    payload = full.read_bytes()[rec.data_offset : rec.data_offset + rec.length]
    bare = tmp_path / "bare.lime"
    bare.write_bytes(
        struct.pack(">IHHQ128s", 0x456789AB, 1, 0xC000, len(payload), b"ildg-binary-data")
        + payload
        + b"\0" * (-len(payload) % 8)
    )
    assert io.detect(bare) == "lime"
    with pytest.raises(FormatError, match="bare LIME file .* --lattice 4x4x4x4 --group su2"):
        io.read(bare)
    with pytest.raises(FormatError, match="fits no gauge field on 2x3x4x4"):
        io.read(bare, lattice="2x3x4x4", group="su2")
    back = io.read(bare, lattice="2x3x4x5", group="su2")
    assert np.array_equal(back.numpy(), ens.numpy())
    assert back.checksum_status == "absent"


def test_dims_that_do_not_match_data_length(ildg, tmp_path):
    data = ildg.read_bytes().replace(b"<lx>2</lx>", b"<lx>3</lx>")
    bad = tmp_path / "dims.ildg"
    bad.write_bytes(data)
    with pytest.raises(FormatError, match=r"lattice 3x3x4x5 .* needs \d+ bytes \(dims do not match"):
        io.read(bad)


def test_lattice_given_must_agree(ildg):
    with pytest.raises(FormatError, match="file says lattice 2x3x4x5, given 2x3x4x4"):
        io.read(ildg, lattice="2x3x4x4")
    with pytest.raises(FormatError, match="SU\\(3\\) links, given group su2"):
        io.read(ildg, group="su2")


@pytest.mark.parametrize("fmt", ["ildg", "nersc", "hdf5", "openqcd"])
def test_nan_and_inf_payloads(tmp_path, fmt):
    ens = make_ensemble((2, 4, 6, 8) if fmt == "openqcd" else (2, 3, 4, 5), seed=2)
    ens.links[0, 2, 1, 1, 1, 1, 0, 0] = complex(float("nan"), 0)
    ens.links[0, 0, 0, 0, 0, 0, 1, 1] = complex(0, float("inf"))
    path = tmp_path / f"nan.{io.get_format(fmt).extension}"
    io.write(path, ens, fmt)
    with pytest.raises(FormatError, match="NaN or Inf values .* corrupt"):
        io.read(path)


def test_wrong_scidac_checksum(ildg, tmp_path):
    text = ildg.read_bytes()
    suma = re.search(rb"<suma>([0-9a-f]+)</suma>", text).group(1)
    wrong = f"{int(suma, 16) ^ 1:08x}".encode()
    bad = tmp_path / "sum.ildg"
    bad.write_bytes(text.replace(b"<suma>" + suma, b"<suma>" + wrong))
    with pytest.raises(ChecksumError) as err:
        io.read(bad)
    message = str(err.value)
    assert str(bad) in message and "scidac-checksum suma mismatch" in message
    assert f"expected {wrong.decode()}" in message and f"found {suma.decode()}" in message
    assert "--no-verify" in message
    ens = io.read(bad, verify=False)
    assert ens.checksum_status == "mismatch"


def test_checksum_hex_any_case_width_and_spaces(ildg, tmp_path):
    text = ildg.read_bytes()
    suma = re.search(rb"<suma>([0-9a-f]+)</suma>", text).group(1)
    loose = b"  "  # leading spaces, upper case, no leading zeros, trailing space and newline
    value = loose + suma.upper().lstrip(b"0") + b" \n"
    ok = tmp_path / "loose.ildg"
    # keep the record length: rewrite the record with the new text via the LIME layer
    rec = _record(ildg, "scidac-checksum")
    body = text[rec.data_offset : rec.data_offset + rec.length].replace(b"<suma>" + suma, b"<suma>" + value)
    head = struct.pack(">IHHQ128s", 0x456789AB, 1, 0x4000, len(body), b"scidac-checksum")
    ok.write_bytes(text[: rec.offset] + head + body + b"\0" * (-len(body) % 8))
    assert io.read(ok).checksum_status == "ok"


def test_corrupt_payload_is_a_checksum_error(ildg, tmp_path):
    data = bytearray(ildg.read_bytes())
    rec = _record(ildg, "ildg-binary-data")
    data[rec.data_offset + 1000] ^= 0x01
    bad = tmp_path / "flip.ildg"
    bad.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="scidac-checksum suma mismatch"):
        io.read(bad)


def test_nersc_defects(tmp_path):
    path = tmp_path / "cfg.nersc"
    io.write(path, make_ensemble(precision=32, seed=4), "nersc")
    data = path.read_bytes()
    head_end = data.index(b"END_HEADER\n") + 11
    # wrong checksum
    m = re.search(rb"CHECKSUM = ([0-9a-f]+)", data)
    bad = tmp_path / "sum.nersc"
    bad.write_bytes(data.replace(m.group(0), b"CHECKSUM = " + f"{int(m.group(1), 16) ^ 4:08x}".encode()))
    with pytest.raises(ChecksumError, match="CHECKSUM mismatch: expected"):
        io.read(bad)
    # wrong plaquette
    m = re.search(rb"PLAQUETTE = ([-0-9.]+)", data)
    bad.write_bytes(data.replace(m.group(0), b"PLAQUETTE = 0.123456789012"))
    with pytest.raises(ChecksumError, match="PLAQUETTE mismatch: expected 0.123456789012"):
        io.read(bad)
    # truncated data
    bad.write_bytes(data[: head_end + 100])
    with pytest.raises(FormatError, match="NERSC data are 100 bytes .* needs"):
        io.read(bad)
    # missing END_HEADER
    bad.write_bytes(data[:head_end].replace(b"END_HEADER", b"END_HEADEX") + data[head_end:])
    with pytest.raises(FormatError, match="no END_HEADER"):
        io.read(bad)
    # unknown floating point
    bad.write_bytes(data.replace(b"IEEE32BIG", b"IEEE16BIG"))
    with pytest.raises(FormatError, match="FLOATING_POINT 'IEEE16BIG' is not one of"):
        io.read(bad)


def test_milc_and_openqcd_defects(tmp_path):
    path = tmp_path / "cfg.openqcd"
    io.write(path, make_ensemble((2, 4, 6, 8), seed=5), "openqcd")
    data = path.read_bytes()
    bad = tmp_path / "cut.openqcd"
    bad.write_bytes(data[:-8])
    with pytest.raises(FormatError, match="not a recognised lattice file"):
        io.read(bad.rename(tmp_path / "cut.bin"))
    bad = tmp_path / "cut.bin"
    with pytest.raises(FormatError, match="openQCD data are .* needs 576 V"):
        io.read(bad, format="openqcd")
    bad = tmp_path / "plaq.openqcd"
    bad.write_bytes(data[:16] + struct.pack("<d", 2.5) + data[24:])
    with pytest.raises(ChecksumError, match="openQCD plaquette mismatch: expected 2.5"):
        io.read(bad)
    milc = tmp_path / "lat.milc"
    milc.write_bytes(struct.pack("<5i", 20103, 2, 2, 2, 2) + b"\0" * 64 + struct.pack("<iII", 0, 0, 0) + b"\0" * 100)
    with pytest.raises(FormatError, match="MILC data are 100 bytes; lattice 2x2x2x2 needs 4608"):
        io.read(milc)


def test_hdf5_truncated_and_foreign(tmp_path):
    path = tmp_path / "ens.h5"
    io.write(path, make_ensemble(batch=2))
    bad = tmp_path / "cut.h5"
    bad.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(FormatError, match="damaged or not a flowplug HDF5 ensemble"):
        io.read(bad)
    import h5py

    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(FormatError, match="not a flowplug ensemble store"):
        io.read(tmp_path / "other.h5")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        io.read(tmp_path / "nothing.ildg")
    with pytest.raises(FormatError, match="is a directory"):
        io.read(tmp_path)


def test_cli_exits_1_without_traceback(ildg, tmp_path, capsys):
    bad = tmp_path / "cut.ildg"
    bad.write_bytes(ildg.read_bytes()[:5000])
    assert main(["info", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "flowplug info: error:" in err and "truncated" in err and "Traceback" not in err
    assert main(["convert", str(bad), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "flowplug convert: error:" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_zero_extent_and_empty_store(ildg, tmp_path, capsys):
    data = ildg.read_bytes().replace(b"<lx>2</lx>", b"<lx>0</lx>")
    bad = tmp_path / "zero.ildg"
    bad.write_bytes(data)
    with pytest.raises(FormatError, match="must be 4 positive integers"):
        io.read(bad)
    store = tmp_path / "empty.h5"
    io.write(store, make_ensemble(batch=2))
    import h5py

    with h5py.File(store, "r+") as f:
        f.attrs["count"] = 0  # as after an append interrupted before its commit
    assert len(io.read(store)) == 0
    assert main(["info", "--json", str(store)]) == 0
    assert '"configurations": 0' in capsys.readouterr().out


def test_all_finite_fast_path_agrees_with_isfinite():
    """The sum-based finiteness test: huge finite values (whose sum overflows) pass, NaN/Inf fail."""
    import numpy as np

    from flowplug.linkcheck import _all_finite

    big = np.full((4, 3, 3), 1e308 + 1e308j)
    assert _all_finite(big)
    for bad in (np.nan, np.inf, -np.inf, complex(0, np.nan)):
        a = np.zeros((4, 3, 3), dtype=np.complex128)
        a[2, 1, 0] = bad
        assert not _all_finite(a)
        assert not _all_finite(a[:, :, ::2])  # a non-contiguous view
    x = np.ones(10)
    x[3] = np.inf
    x[7] = -np.inf  # their sum is NaN, still non-finite
    assert not _all_finite(x)
    assert _all_finite(np.arange(5))


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("precision", [32, 64])
def test_finiteness_proven_while_reading_still_catches_nan(tmp_path, monkeypatch, contiguous, precision):
    """The ILDG reader proves finiteness piece by piece (then io.read skips its own pass);
    a NaN in any piece, or a huge value whose sum overflows, still ends as before."""
    import torch

    from flowplug.adapters import common
    from flowplug.linkcheck import _known_finite, check_links

    monkeypatch.setattr(common, "CHUNK_BYTES", 700)
    ens = make_ensemble(precision=precision, seed=5)
    good = tmp_path / "good.ildg"
    io.write(good, ens)
    back = io.read(good, contiguous=contiguous)
    assert torch.equal(back.links, ens.links)
    links = ens.links.clone()
    links[0, 3, 1, 2, 3, 4, 2, 1] = complex(float("nan"), 0.0)  # the last piece
    bad = tmp_path / "bad.ildg"
    io.write(bad, io.Ensemble(links, precision=precision), precision=precision)
    with pytest.raises(FormatError, match="NaN or Inf values .*configuration 0, direction 3, site \\(1, 2, 3, 4\\)"):
        io.read(bad, contiguous=contiguous, verify=False)
    # marks are used once and voided by an in-place change
    t = common.read_ildg_canonical(
        good, next(r for r in scan(good) if r.type == "ildg-binary-data").data_offset, (2, 3, 4, 5), 3, precision
    )
    t.add_(0)
    assert not _known_finite(t)
    t[0, 0, 0, 0, 0, 0, 0, 0] = float("inf")
    with pytest.raises(FormatError, match="NaN or Inf"):
        check_links(io.Ensemble(t), source="x")
