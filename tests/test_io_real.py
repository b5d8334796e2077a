"""The six real configurations of ../shared/ensembles (see its README.md).

Each must read with its reference plaquette and checksums, ``flowplug info --json``
must reproduce them, and converting to every writable format and back must be
bit-exact. The folder is never copied into the repository; without it these tests skip.
"""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch

from flowplug import io
from flowplug.cli import main
from flowplug.errors import PrecisionLossWarning
from flowplug.gauge import link_trace, plaquette

from _io_helpers import ensembles_dir

# file -> format, lattice, group, precision, plaquette (tolerance), link trace, checks
REFERENCE = {
    "milc.lat.sample.l4444.ildg": dict(
        format="ildg",
        lattice=[4, 4, 4, 4],
        group="su3",
        precision=32,
        plaquette=(1.794675 + 1.774426) / 6,
        plaquette_tol=1e-6,
        link_trace=0.6467587,
        checks={"scidac-checksum suma": "37affb9c", "scidac-checksum sumb": "2fc07bbf"},
    ),
    "milc.lat.sample.l4444.scidac": dict(
        format="scidac",
        lattice=[4, 4, 4, 4],
        group="su3",
        precision=32,
        plaquette=(1.794675 + 1.774426) / 6,
        plaquette_tol=1e-6,
        link_trace=0.6467587,
        checks={"scidac-checksum suma": "37affb9c", "scidac-checksum sumb": "2fc07bbf"},
    ),
    "milc.lat.sample.l4444": dict(
        format="milc",
        lattice=[4, 4, 4, 4],
        group="su3",
        precision=32,
        plaquette=(1.794675 + 1.774426) / 6,
        plaquette_tol=1e-6,
        link_trace=0.6467587,
        checks={"MILC sum29": "02352c05", "MILC sum31": "d137321d"},
    ),
    "tmlqcd.unity.l4444.lime": dict(
        format="ildg",
        lattice=[4, 4, 4, 4],
        group="su3",
        precision=64,
        plaquette=1.0,
        plaquette_tol=1e-15,
        link_trace=1.0,
        checks={"scidac-checksum suma": "35b49a1b", "scidac-checksum sumb": "b49a1b35", "xlf-info plaquette": 1.0},
    ),
    "gaugefields.conf_00000100_4444_test.su2.ildg": dict(
        format="lime",
        lattice=[4, 4, 4, 4],
        group="su2",
        precision=64,
        plaquette=-0.007853743153861798,
        plaquette_tol=1e-14,
        link_trace=None,
        checks={},
        given={"lattice": "4x4x4x4", "group": "su2"},
    ),
    "simulateqcd.lat.sample.l6666_nersc": dict(
        format="nersc",
        lattice=[6, 6, 6, 6],
        group="su3",
        precision=32,
        plaquette=0.6606482315,
        plaquette_tol=1e-8,
        link_trace=0.9015920048,
        checks={"CHECKSUM": "ba83ff12", "PLAQUETTE": 0.6606482315, "LINK_TRACE": 0.9015920048},
    ),
}


def test_every_shared_file_has_a_reference():
    folder = ensembles_dir()
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != "README.md")
    assert files == sorted(REFERENCE)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_read_matches_reference(name):
    ref = REFERENCE[name]
    ens = io.read(ensembles_dir() / name, unitarity="error", **ref.get("given", {}))
    meta = ens.meta[0]
    assert meta.format == ref["format"]
    assert list(ens.lattice) == ref["lattice"] and ens.group == ref["group"]
    assert ens.precision == ref["precision"]
    assert float(plaquette(ens.links)[0]) == pytest.approx(ref["plaquette"], abs=ref["plaquette_tol"])
    if ref["link_trace"] is not None:
        assert float(link_trace(ens.links)[0]) == pytest.approx(ref["link_trace"], abs=1e-7)
    assert {c.quantity: c.expected for c in meta.checks} == ref["checks"]
    assert all(c.ok for c in meta.checks)
    assert meta.checksum_status == ("ok" if ref["checks"] else "absent")


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_info_json_reproduces_reference(name, capsys):
    ref = REFERENCE[name]
    extra = []
    for key, value in ref.get("given", {}).items():
        extra += [f"--{key}", value]
    assert main(["info", "--json", str(ensembles_dir() / name), *extra]) == 0
    info = json.loads(capsys.readouterr().out)
    for key in ("path", "format", "lattice", "group", "precision", "checksum", "plaquette", "link_trace"):
        assert key in info
    assert info["format"] == ref["format"] and info["lattice"] == ref["lattice"]
    assert info["group"] == ref["group"] and info["precision"] == ref["precision"]
    assert info["checksum"] == ("ok" if ref["checks"] else "absent")
    assert info["plaquette"] == pytest.approx(ref["plaquette"], abs=ref["plaquette_tol"])
    assert {c["quantity"]: c["expected"] for c in info["checks"]} == ref["checks"]
    assert all(c["ok"] for c in info["checks"])


def _targets(ens):
    for fmt in io.formats(writable=True):
        if io.get_format(fmt).can_write(ens) is None:
            yield fmt


def _payload(path, fmt):
    """The stored link data of a file (without headers or metadata records)."""
    data = path.read_bytes()
    if fmt == "ildg":
        from flowplug.adapters.lime import scan

        r = next(r for r in scan(path) if r.type == "ildg-binary-data")
        return data[r.data_offset : r.data_offset + r.length]
    if fmt == "nersc":
        return data[data.index(b"END_HEADER\n") + 11 :]
    raise AssertionError(fmt)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_convert_to_every_writable_format_and_back(tmp_path, name):
    ref = REFERENCE[name]
    src = io.read(ensembles_dir() / name, **ref.get("given", {}))
    home = "nersc" if ref["format"] == "nersc" else "ildg"
    two_row = src.header.get("nersc_datatype") == "4D_SU3_GAUGE"
    # the configuration in its own (or the nearest writable) format, at its own precision
    start = tmp_path / f"start.{io.get_format(home).extension}"
    io.write(start, src, home)
    start_ens = io.read(start)
    for fmt in _targets(src):
        mid = tmp_path / f"mid.{fmt}.{io.get_format(fmt).extension}"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            io.write(mid, start_ens, fmt)
        lossy = [w for w in caught if issubclass(w.category, PrecisionLossWarning)]
        via = io.read(mid)
        # a two-row NERSC file stores rows 0 and 1; the third is rebuilt in double precision,
        # so a 32-bit target that stores all three rows rounds that row (and says so)
        rounds_third_row = two_row and fmt in ("ildg", "hdf5") and src.precision == 32
        assert bool(lossy) == rounds_third_row, (fmt, [str(w.message) for w in caught])
        if rounds_third_row:
            assert torch.equal(via.links[..., :2, :], src.links[..., :2, :]), fmt  # stored rows exact
            third = src.links[..., 2, :]
            assert torch.equal(via.links[..., 2, :], third.to(torch.complex64).to(torch.complex128)), fmt
            assert not torch.equal(via.links, src.links)  # the rounding is real, not hypothetical
        else:
            assert torch.equal(via.links, src.links), fmt  # every bit, third row included
        end = tmp_path / f"end.{fmt}.{io.get_format(home).extension}"
        # ILDG/openQCD cannot record that the source stored two rows: ask for them again
        io.write(
            end,
            via,
            home,
            precision=src.precision,
            **({"datatype": src.header["nersc_datatype"]} if home == "nersc" else {}),
        )
        assert _payload(end, home) == _payload(start, home), f"{name} -> {fmt} -> {home} is not bit-exact"
        back = io.read(end)
        assert back.precision == src.precision
        # (after rounding too: the stored rows come back bit for bit, the third is rebuilt again)
        assert torch.equal(back.links, start_ens.links)
        if fmt in (home, "hdf5"):  # these keep every record: the whole file is identical
            assert end.read_bytes() == start.read_bytes(), f"{name} -> {fmt} -> {home}: metadata lost"


def test_two_row_nersc_converts_exactly_at_64_bits(tmp_path):
    """The exact alternative the warning names: 64-bit targets keep the rebuilt third row."""
    src = io.read(ensembles_dir() / "simulateqcd.lat.sample.l6666_nersc")
    for fmt in ("ildg", "nersc", "hdf5", "openqcd"):
        out = tmp_path / f"x.{io.get_format(fmt).extension}"
        with warnings.catch_warnings():
            warnings.simplefilter("error", PrecisionLossWarning)
            io.write(out, src, fmt, precision=64, **({"datatype": "4D_SU3_GAUGE_3x3"} if fmt == "nersc" else {}))
        assert torch.equal(io.read(out).links, src.links), fmt


def test_two_row_nersc_rewritten_byte_identical_payload(tmp_path):
    src_path = ensembles_dir() / "simulateqcd.lat.sample.l6666_nersc"
    ens = io.read(src_path)
    out = tmp_path / "copy.nersc"
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionLossWarning)  # two rows at 32 bits: nothing rounded
        io.write(out, ens)
    original, written = src_path.read_bytes(), out.read_bytes()
    assert b"DATATYPE = 4D_SU3_GAUGE\n" in written and b"FLOATING_POINT = IEEE32BIG\n" in written
    assert written[written.index(b"END_HEADER\n") + 11 :] == original[original.index(b"END_HEADER\n") + 11 :]
    again = tmp_path / "again.nersc"
    io.write(again, io.read(out))
    assert again.read_bytes() == written


def test_ildg_rewrite_of_milc_file_keeps_payload_and_records(tmp_path):
    src_path = ensembles_dir() / "milc.lat.sample.l4444.ildg"
    ens = io.read(src_path)
    out = tmp_path / "copy.ildg"
    io.write(out, ens)
    from flowplug.adapters.lime import scan

    def payload(p):
        r = next(r for r in scan(p) if r.type == "ildg-binary-data")
        return p.read_bytes()[r.data_offset : r.data_offset + r.length]

    assert payload(out) == payload(src_path)
    back = io.read(out)
    assert back.header["lfn"] == "lfn://USQCD/MILC/test/lat.sample.l4444"
    for rtype in ("scidac-file-xml", "scidac-record-xml"):
        assert back.meta[0].record(rtype).data == ens.meta[0].record(rtype).data
    assert {c.expected for c in back.meta[0].checks} == {"37affb9c", "2fc07bbf"}


def test_tmlqcd_xlf_info_survives_ildg_and_hdf5(tmp_path):
    src = io.read(ensembles_dir() / "tmlqcd.unity.l4444.lime")
    io.write(tmp_path / "a.h5", src)
    io.write(tmp_path / "b.ildg", io.read(tmp_path / "a.h5"))
    back = io.read(tmp_path / "b.ildg")
    assert back.meta[0].record("xlf-info").data == src.meta[0].record("xlf-info").data
    assert back.header["trajectory"] == 0 and back.header["plaquette"] == 1.0
    from flowplug.adapters.lime import scan

    recs = scan(tmp_path / "b.ildg")
    assert recs[-1].type == "xlf-info" and recs[-1].flags == 0xC000


def _elements(xml: str) -> list[str]:
    """Element names of a flat XML record, in order (without the root and the declaration)."""
    return re.findall(r"<([A-Za-z_][\w.-]*)>", xml)[1:]


def test_ildg_private_record_has_the_qio_element_set(tmp_path):
    src = io.read(ensembles_dir() / "milc.lat.sample.l4444.ildg")
    qio = src.meta[0].record("scidac-private-record-xml").text
    for precision in (32, 64):
        out = tmp_path / f"copy{precision}.ildg"
        io.write(out, src, precision=precision)
        ours = io.read(out).meta[0].record("scidac-private-record-xml").text
        # the sample is QIO record version 1.0, which says globaldata where 1.1 says recordtype
        assert _elements(ours) == [("recordtype" if e == "globaldata" else e) for e in _elements(qio)]
        assert "<spins>" not in ours and "<version>1.1</version>" in ours
        letter, size = ("F", 72) if precision == 32 else ("D", 144)
        assert f"<datatype>USQCD_{letter}3_ColorMatrix</datatype><precision>{letter}</precision>" in ours
        assert f"<colors>3</colors><typesize>{size}</typesize><datacount>4</datacount>" in ours


def test_ensembles_folder_from_environment(tmp_path, monkeypatch):
    import _io_helpers

    monkeypatch.setenv("FLOWPLUG_ENSEMBLES", str(tmp_path))
    assert _io_helpers.ensembles_dir() == tmp_path
    monkeypatch.setenv("FLOWPLUG_ENSEMBLES", str(tmp_path / "absent"))
    monkeypatch.setattr(_io_helpers, "ENSEMBLES", tmp_path / "also-absent")
    with pytest.raises(pytest.skip.Exception, match="FLOWPLUG_ENSEMBLES"):
        _io_helpers.ensembles_dir()
