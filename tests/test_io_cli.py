"""``flowplug info`` and ``flowplug convert``: outputs, safety rules, resuming, failures."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from flowplug import io
from flowplug.adapters.checksums import (
    milc_checksum,
    milc_checksum_reference,
    scidac_checksum,
    scidac_checksum_reference,
)
from flowplug.cli import main
from flowplug.errors import FormatError

from _io_helpers import make_ensemble


@pytest.fixture()
def inputs(tmp_path):
    folder = tmp_path / "in"
    for i in range(3):
        io.write(folder / f"cfg{i}.ildg", make_ensemble(precision=32, seed=i))
    return folder


def test_info_text_and_json(inputs, capsys):
    assert main(["info", str(inputs / "cfg0.ildg")]) == 0
    out = capsys.readouterr().out
    for word in ("format        ildg", "lattice       2x3x4x5", "precision     32", "checksum      ok",
                 "plaquette", "link trace", "max|UU^+-1|", "ildg-binary-data (34560 bytes)"):
        assert word in out
    assert main(["info", "--json", *(str(p) for p in sorted(inputs.iterdir()))]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3 and all(d["checksum"] == "ok" and d["lattice"] == [2, 3, 4, 5] for d in lines)
    assert lines[0]["unitarity"] < 1e-5


def test_info_reports_mismatch_and_continues(inputs, tmp_path, capsys):
    bad = tmp_path / "bad.ildg"
    data = bytearray((inputs / "cfg0.ildg").read_bytes())
    data[2000] ^= 0x40
    bad.write_bytes(bytes(data))
    junk = tmp_path / "junk.txt"
    junk.write_text("hello")
    assert main(["info", "--json", str(bad), str(junk), str(inputs / "cfg1.ildg")]) == 1
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows[0]["checksum"] == "mismatch" and "error" in rows[1] and rows[2]["checksum"] == "ok"
    assert "junk.txt: not a recognised lattice file" in err


def test_convert_directory_to_formats_and_back(inputs, tmp_path):
    for fmt in ("nersc", "openqcd", "ildg"):
        out = tmp_path / f"out-{fmt}"
        code = main(["convert", str(inputs), str(out), "--to", fmt, "--no-progress"])
        if fmt == "openqcd":  # 2x3x4x5 has odd extents: every input fails, first error stops
            assert code == 1
            continue
        assert code == 0
        names = sorted(p.name for p in out.iterdir())
        assert names == [f"cfg{i}.ildg.{io.get_format(fmt).extension}" for i in range(3)]
        for i in range(3):
            assert torch.equal(io.read(out / names[i]).links, io.read(inputs / f"cfg{i}.ildg").links)


def test_convert_to_hdf5_resumes_and_never_overwrites(inputs, tmp_path, capsys):
    store = tmp_path / "ens.h5"
    assert main(["convert", str(inputs / "cfg0.ildg"), str(store)]) == 0
    assert len(io.read(store)) == 1
    # rerun with every input: only the two missing ones are added
    assert main(["convert", str(inputs), str(store)]) == 0
    ens = io.read(store)
    assert len(ens) == 3
    sources = [m.provenance["source"] for m in ens.meta]
    assert sources == [str((inputs / f"cfg{i}.ildg").resolve()) for i in range(3)]
    assert ens.meta[0].provenance["converted_from"] == "ildg"
    assert main(["convert", str(inputs), str(store)]) == 0
    assert len(io.read(store)) == 3
    assert "kept 3 existing" in capsys.readouterr().err
    # --force rebuilds it from scratch (atomically)
    assert main(["convert", str(inputs / "cfg2.ildg"), str(store), "--force"]) == 0
    assert len(io.read(store)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ens.h5", "in"]
    # and back to a directory of ILDG files, bit-exact with the sources' payloads
    back = tmp_path / "back"
    assert main(["convert", str(store), str(back), "--to", "ildg"]) == 0
    (only,) = back.iterdir()
    assert only.read_bytes() == (inputs / "cfg2.ildg").read_bytes()


def test_convert_keeps_existing_outputs_without_force(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", str(inputs), str(out), "--to", "nersc"]) == 0
    target = out / "cfg1.ildg.nersc"
    target.write_bytes(b"sentinel")
    assert main(["convert", str(inputs), str(out), "--to", "nersc"]) == 0
    assert target.read_bytes() == b"sentinel"  # never overwritten without --force
    assert main(["convert", str(inputs), str(out), "--to", "nersc", "--force"]) == 0
    assert target.read_bytes() != b"sentinel"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_convert_stops_or_keeps_going(inputs, tmp_path, capsys):
    bad = inputs / "cfg1.ildg"
    data = bytearray(bad.read_bytes())
    data[3000] ^= 1
    bad.write_bytes(bytes(data))
    out = tmp_path / "out"
    assert main(["convert", str(inputs), str(out), "--to", "nersc"]) == 1
    err = capsys.readouterr().err
    assert "cfg1.ildg" in err and "scidac-checksum" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["cfg0.ildg.nersc"]  # stopped at the bad one
    assert main(["convert", str(inputs), str(out), "--to", "nersc", "--keep-going"]) == 1
    err = capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["cfg0.ildg.nersc", "cfg2.ildg.nersc"]
    assert "1 input(s) failed" in err and "failed: " in err and "cfg1.ildg" in err


def test_convert_globs_and_refuses_input_as_output(inputs, tmp_path):
    out = tmp_path / "globbed"
    assert main(["convert", str(inputs / "cfg[02].ildg"), str(out), "--to", "ildg"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cfg0.ildg.ildg", "cfg2.ildg.ildg"]
    assert main(["convert", str(inputs / "nothing*.ildg"), str(out)]) == 1
    store = tmp_path / "s.h5"
    io.write(store, make_ensemble())
    assert main(["convert", str(store), str(store)]) == 1


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    ens = make_ensemble()
    handler = io.get_format("nersc")

    def boom(path, *args, **kwargs):
        path.write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(handler, "write", boom)
    with pytest.raises(KeyboardInterrupt):
        io.write(tmp_path / "x.nersc", ens)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("nsites", [1, 28, 29, 30, 31, 62, 900, 1234])
def test_vectorised_checksums_equal_the_definitions(nsites):
    rng = np.random.default_rng(nsites)
    for site_bytes in (288, 576, 128, 12):
        raw = rng.integers(0, 256, nsites * site_bytes, dtype=np.uint8)
        assert scidac_checksum(raw, site_bytes) == scidac_checksum_reference(raw.tobytes(), site_bytes)
    words = rng.integers(0, 256, nsites * 72, dtype=np.uint8)
    for order in "<>":
        assert milc_checksum(words, order) == milc_checksum_reference(words.tobytes(), order)


def test_unknown_format_lists_the_registered_ones(tmp_path):
    from flowplug.errors import UnknownComponentError

    with pytest.raises(UnknownComponentError, match="Available: .*hdf5.*ildg.*nersc"):
        io.write(tmp_path / "x.dat", make_ensemble(), "nerscc")
    with pytest.raises(FormatError, match="cannot tell the format from the extension"):
        io.write(tmp_path / "x.dat", make_ensemble())
    assert set(io.formats(writable=True)) >= {"ildg", "nersc", "openqcd", "hdf5"}
    assert os.path.exists(tmp_path)


def test_convert_mixed_precisions_into_one_store_and_back(tmp_path):
    folder = tmp_path / "in"
    io.write(folder / "a32.ildg", make_ensemble(precision=32, seed=1))
    io.write(folder / "b64.ildg", make_ensemble(precision=64, seed=2))
    store = tmp_path / "mixed.h5"
    assert main(["convert", str(folder), str(store)]) == 0
    back = tmp_path / "back"
    assert main(["convert", str(store), str(back), "--to", "ildg"]) == 0
    outs = sorted(back.iterdir())
    assert [io.read(p).precision for p in outs] == [32, 64]
    assert outs[0].read_bytes() == (folder / "a32.ildg").read_bytes()
    assert outs[1].read_bytes() == (folder / "b64.ildg").read_bytes()
