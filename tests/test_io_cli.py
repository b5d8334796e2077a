"""``flowplug info`` and ``flowplug convert``: outputs, safety rules, resuming, failures."""

from __future__ import annotations

import json
import warnings

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
    for word in (
        "format        ildg",
        "lattice       2x3x4x5",
        "precision     32",
        "checksum      ok",
        "plaquette",
        "link trace",
        "max|UU^+-1|",
        "ildg-binary-data (34560 bytes)",
    ):
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
        # the input's extension is replaced, never doubled (cfg0.ildg -> cfg0.nersc, cfg0.ildg)
        assert names == [f"cfg{i}.{io.get_format(fmt).extension}" for i in range(3)]
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
    # an input that changed since it was stored is not skipped silently
    before = store.read_bytes()
    io.write(inputs / "cfg1.ildg", make_ensemble(precision=32, seed=7), overwrite=True)
    assert main(["convert", str(inputs), str(store)]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "entry 1 was converted from" in err and "cfg1.ildg now holds another configuration" in err
    assert "--force" in err and store.read_bytes() == before
    # --force rebuilds it from scratch (atomically)
    assert main(["convert", str(inputs / "cfg2.ildg"), str(store), "--force"]) == 0
    assert len(io.read(store)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ens.h5", "in"]
    # and back to a directory of ILDG files, bit-exact with the sources' payloads
    back = tmp_path / "back"
    assert main(["convert", str(store), str(back), "--to", "ildg"]) == 0
    (only,) = back.iterdir()
    assert only.read_bytes() == (inputs / "cfg2.ildg").read_bytes()


def test_convert_keeps_an_existing_output_only_when_it_is_the_same_configuration(inputs, tmp_path, capsys):
    """A rerun keeps what verifies as the configuration it would write (read back, compared
    bit for bit with a fresh conversion); junk or another configuration under the output
    name stops the run (exit 1, file untouched, message naming file, expected, found and
    --force); --force replaces it (issue 11, item 6)."""
    out = tmp_path / "out"
    convert = ["convert", str(inputs), str(out), "--to", "nersc", "--no-progress"]
    assert main(convert) == 0
    target = out / "cfg1.nersc"
    good = target.read_bytes()
    # an identical configuration: kept (not rewritten), exit 0
    inode = target.stat().st_ino
    capsys.readouterr()
    assert main(convert) == 0
    assert "kept 3 existing" in capsys.readouterr().err
    assert target.read_bytes() == good and target.stat().st_ino == inode
    # the same configuration converted from a copy of the input elsewhere is still the same
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "cfg1.ildg").write_bytes((inputs / "cfg1.ildg").read_bytes())
    assert main(["convert", str(copy / "cfg1.ildg"), str(out), "--to", "nersc", "--no-progress"]) == 0
    assert target.stat().st_ino == inode

    def refused(content: bytes, *words: str) -> str:
        target.write_bytes(content)
        capsys.readouterr()
        assert main(convert) == 1
        err = " ".join(capsys.readouterr().err.split())
        assert target.read_bytes() == content  # never replaced without --force
        for word in (str(target), "expected", "found", "--force", *words):
            assert word in err, (word, err)
        assert "Traceback" not in err
        return err

    # junk under the output name
    refused(b"sentinel", "unreadable")
    # a truncated copy of the right file
    refused(good[: len(good) // 2])
    # another configuration, itself a valid file of the target format
    other = tmp_path / "other.nersc"
    io.write(other, make_ensemble(precision=32, seed=7), "nersc")
    err = refused(other.read_bytes(), "another configuration", "CHECKSUM")
    assert "cfg1.ildg" in err
    # the same links stored at another precision are not what this conversion writes
    io.write(other, io.read(inputs / "cfg1.ildg"), "nersc", precision=64, overwrite=True)
    refused(other.read_bytes(), "precision")
    # --keep-going converts the rest and lists the refusal as a failure
    target.write_bytes(b"sentinel")
    (out / "cfg0.nersc").unlink()
    assert main([*convert, "--keep-going"]) == 1
    assert target.read_bytes() == b"sentinel" and (out / "cfg0.nersc").is_file()
    assert "1 input(s) failed" in capsys.readouterr().err
    # --force replaces it with the conversion
    assert main([*convert, "--force"]) == 0
    assert target.read_bytes() == good
    assert torch.equal(io.read(target).links, io.read(inputs / "cfg1.ildg").links)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_convert_stops_or_keeps_going(inputs, tmp_path, capsys):
    bad = inputs / "cfg1.ildg"
    data = bytearray(bad.read_bytes())
    data[3000] ^= 1
    bad.write_bytes(bytes(data))
    out = tmp_path / "out"
    assert main(["convert", str(inputs), str(out), "--to", "nersc"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "cfg1.ildg" in err and "scidac-checksum" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["cfg0.nersc"]  # stopped at the bad one
    assert f"The 1 file(s) converted before this input stay in {out}" in err
    # into one store: the message says what the store holds
    store = tmp_path / "all.h5"
    assert main(["convert", str(inputs), str(store), "--no-progress"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"The store {store} keeps the 1 configuration(s) converted before this input" in err
    assert len(io.read(store)) == 1
    # replacing a store (--force): the old one stays as it was
    assert main(["convert", str(inputs / "cfg0.ildg"), str(store), "--force", "--no-progress"]) == 0
    capsys.readouterr()
    before = store.read_bytes()
    assert main(["convert", str(inputs), str(store), "--force", "--no-progress"]) == 1
    assert f"{store} is unchanged" in " ".join(capsys.readouterr().err.split())
    assert store.read_bytes() == before
    assert main(["convert", str(inputs), str(out), "--to", "nersc", "--keep-going"]) == 1
    err = capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["cfg0.nersc", "cfg2.nersc"]
    assert "1 input(s) failed" in err and "failed: " in err and "cfg1.ildg" in err


def test_convert_globs_and_refuses_input_as_output(inputs, tmp_path):
    out = tmp_path / "globbed"
    assert main(["convert", str(inputs / "cfg[02].ildg"), str(out), "--to", "ildg"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cfg0.ildg", "cfg2.ildg"]
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
    assert not any(tmp_path.iterdir())  # a refused write leaves nothing behind


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


def test_convert_removes_stale_temporaries_of_its_outputs_only(inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # what a killed conversion leaves: the temporary of an output that was being written
    stale = [out / ".cfg0.nersc.k3j_9x0a.part", out / ".cfg2.nersc.convert.part"]
    # anything else stays: other names, other outputs, another pattern, a folder, a link
    keep = [
        out / ".cfg0.nersc.notes",
        out / ".cfg0.nersc.abc.part",
        out / "cfg0.nersc.k3j_9x0a.part",
        out / ".other.nersc.k3j_9x0a.part",
        out / ".cfg0.nersc.K3J_9X0A.part",
        out / ".cfg0.nersc.k3j_9x0a.part.bak",
        out / "mine.txt",
    ]
    for p in stale + keep:
        p.write_bytes(b"x")
    folder = out / ".cfg1.nersc.abcdefgh.part"
    folder.mkdir()
    link = out / ".cfg1.nersc.zzzzzzzz.part"
    link.symlink_to(out / "mine.txt")
    assert main(["convert", str(inputs), str(out), "--to", "nersc", "--no-progress"]) == 0
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in keep) and folder.is_dir() and link.is_symlink()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.suffix == ".nersc") == [
        "cfg0.nersc",
        "cfg1.nersc",
        "cfg2.nersc",
    ]
    # an HDF5 store: temporaries of a killed first write and of a killed --force run
    store = tmp_path / "ens.h5"
    leftovers = [tmp_path / ".ens.h5.a1b2c3d4.part", tmp_path / ".ens.h5.convert.part"]
    for p in leftovers:
        p.write_bytes(b"x")
    assert main(["convert", str(inputs), str(store), "--no-progress"]) == 0
    assert not any(p.exists() for p in leftovers) and len(io.read(store)) == 3


def test_remove_stale_temp_files_matches_the_names_fsutil_makes(tmp_path):
    from flowplug.fsutil import atomic_path, atomic_write, remove_stale_temp_files, temp_name_pattern

    for _ in range(20):  # random names: several draws
        with atomic_write(tmp_path / "x.ildg") as fh:
            (name,) = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
            assert temp_name_pattern(tmp_path / "x.ildg").fullmatch(name)
            fh.write(b"data")
        with atomic_path(tmp_path / "y.h5") as tmp:
            assert temp_name_pattern(tmp_path / "y.h5").fullmatch(tmp.name)
            assert not temp_name_pattern(tmp_path / "x.ildg").fullmatch(tmp.name)
    assert remove_stale_temp_files(tmp_path / "absent-folder" / "z") == []


def test_convert_refuses_a_file_name_of_another_format(inputs, tmp_path, capsys):
    """An output named like a file of another format than the target is refused, with the
    name that would work; an existing directory is used whatever its name."""
    for name in ("x.h5", "x.ildg"):
        out = tmp_path / "out" / name
        assert main(["convert", str(inputs / "cfg0.ildg"), str(out), "--to", "nersc"]) == 1
        err = " ".join(capsys.readouterr().err.split())  # messages are wrapped at 100 columns
        assert f"output {out} names a {out.suffix} file" in err and "directory" in err
        assert "--to nersc writes .nersc files: name the output file x.nersc" in err
        assert ("drop --to nersc to write one HDF5 ensemble store" in err) == (name == "x.h5")
        assert not out.exists()
    existing = tmp_path / "out" / "y.nersc"
    existing.mkdir(parents=True)
    assert main(["convert", str(inputs / "cfg0.ildg"), str(existing), "--to", "nersc"]) == 0
    assert (existing / "cfg0.nersc").is_file()


def test_convert_one_file_into_a_named_file_for_every_writable_format(tmp_path, capsys):
    """`flowplug convert in.ildg out.ildg` writes exactly out.ildg (issue 12, item 6): for
    every writable format, with or without --to (the target then comes from the
    extension); a rerun keeps it, another configuration under that name is refused, and
    --force replaces it."""
    src = tmp_path / "in.ildg"
    io.write(src, make_ensemble((2, 2, 2, 4), precision=64, seed=3))  # even extents: openQCD too
    expected = io.read(src).links
    formats = io.formats(writable=True)
    assert {"ildg", "nersc", "openqcd", "hdf5"} <= set(formats)
    for fmt in formats:
        ext = io.get_format(fmt).extension
        for to in ([], ["--to", fmt]):
            out = tmp_path / f"{fmt}{len(to)}" / f"copy.{ext}"
            assert main(["convert", str(src), str(out), "--no-progress", *to]) == 0, (fmt, to)
            assert out.is_file() and sorted(p.name for p in out.parent.iterdir()) == [out.name]
            back = io.read(out)
            assert back.meta[0].format == fmt and len(back) == 1 and torch.equal(back.links, expected)
    # the same ILDG file again is kept; another configuration under that name is refused
    out = tmp_path / "ildg0" / "copy.ildg"
    before = out.read_bytes()
    capsys.readouterr()
    assert main(["convert", str(src), str(out), "--no-progress"]) == 0
    assert "kept 1 existing" in capsys.readouterr().err and out.read_bytes() == before
    other = tmp_path / "other.ildg"
    io.write(other, make_ensemble((2, 2, 2, 4), precision=64, seed=4))
    assert main(["convert", str(other), str(out), "--no-progress"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"output {out} exists and is not the conversion of {other}" in err and "--force" in err
    assert out.read_bytes() == before
    assert main(["convert", str(other), str(out), "--no-progress", "--force"]) == 0
    assert torch.equal(io.read(out).links, io.read(other).links)
    # one file holds one configuration: several inputs, or a store of several, are refused
    assert main(["convert", str(src), str(other), str(tmp_path / "two.ildg")]) == 1
    assert "2 inputs were given: give a directory" in " ".join(capsys.readouterr().err.split())
    store = tmp_path / "three.h5"
    io.write(store, make_ensemble((2, 2, 2, 4), batch=3))
    assert main(["convert", str(store), str(tmp_path / "three.ildg")]) == 1
    assert "holds 3 configurations" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "two.ildg").exists() and not (tmp_path / "three.ildg").exists()


def test_convert_output_names_never_double_the_extension(tmp_path):
    """In an output directory the input's format extension is replaced by the target's:
    x.ildg -> x.ildg (--to ildg) and x.nersc; a name without a format extension keeps it
    (ckpoint_lat.1000 -> ckpoint_lat.1000.ildg); several configurations are numbered
    before the extension (ens.h5 -> ens.00000.ildg)."""
    folder = tmp_path / "in"
    io.write(folder / "x.ildg", make_ensemble(seed=1))
    io.write(folder / "ckpoint_lat.1000", make_ensemble(seed=2), "nersc")
    io.write(folder / "ens.h5", make_ensemble(batch=2, seed=3))
    for fmt, ext in (("ildg", "ildg"), ("nersc", "nersc")):
        out = tmp_path / f"out-{fmt}"
        assert main(["convert", str(folder), str(out), "--to", fmt, "--no-progress"]) == 0
        assert sorted(p.name for p in out.iterdir()) == sorted(
            [f"x.{ext}", f"ckpoint_lat.1000.{ext}", f"ens.00000.{ext}", f"ens.00001.{ext}"]
        )
    # two inputs that would get the same name are refused, not overwritten
    io.write(folder / "x.nersc", make_ensemble(seed=4))
    assert (
        main(
            [
                "convert",
                str(folder / "x.ildg"),
                str(folder / "x.nersc"),
                str(tmp_path / "clash"),
                "--to",
                "ildg",
                "--no-progress",
            ]
        )
        == 1
    )


def test_info_names_an_unreadable_file_once(inputs, tmp_path, capsys):
    junk = tmp_path / "README.md"
    junk.write_text("# not a lattice file\n")
    assert main(["info", str(junk), str(inputs / "cfg0.ildg")]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"flowplug info: error: {junk}: not a recognised lattice file" in err
    assert err.count(str(junk)) == 1
    assert main(["info", str(junk)]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert err.count(str(junk)) == 1 and "not a recognised lattice file" in err


def test_two_row_nersc_inputs_keep_every_bit_in_a_store(tmp_path, capsys):
    from flowplug.errors import PrecisionLossWarning

    folder = tmp_path / "in"
    for i in range(2):
        io.write(
            folder / f"c{i}.nersc", make_ensemble((2, 2, 2, 4), precision=32, seed=40 + i), datatype="4D_SU3_GAUGE"
        )
    store = tmp_path / "two-row.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionLossWarning)
        assert main(["convert", str(folder / "c0.nersc"), str(store), "--no-progress"]) == 0
        assert main(["convert", str(folder), str(store), "--no-progress"]) == 0  # appends c1
    ens = io.read(store)
    for i in range(2):
        src = io.read(folder / f"c{i}.nersc")
        assert torch.equal(ens.links[i], src.links[0])  # the rebuilt third rows too
        assert ens.meta[i].precision == 32
    # writing them back as two-row NERSC files reproduces the stored bytes
    back = tmp_path / "back"
    assert main(["convert", str(store), str(back), "--to", "nersc", "--no-progress"]) == 0
    for i, p in enumerate(sorted(back.iterdir())):
        body = p.read_bytes()
        orig = (folder / f"c{i}.nersc").read_bytes()
        assert body[body.index(b"END_HEADER\n") :] == orig[orig.index(b"END_HEADER\n") :]
    # a 32-bit ILDG of a two-row source rounds the third row, and says so; --precision 64 does not
    capsys.readouterr()
    assert main(["convert", str(folder / "c0.nersc"), str(tmp_path / "ildg"), "--no-progress"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "flowplug: warning:" in err and "rounds values" in err and "--precision 64" in err
    assert (
        main(["convert", str(folder / "c0.nersc"), str(tmp_path / "ildg64"), "--precision", "64", "--no-progress"]) == 0
    )
    assert "warning" not in capsys.readouterr().err
    (out64,) = (tmp_path / "ildg64").iterdir()
    assert torch.equal(io.read(out64).links, io.read(folder / "c0.nersc").links)


def test_convert_splits_a_store_into_files_with_trailing_slash(inputs, tmp_path):
    store = tmp_path / "ens.h5"
    assert main(["convert", str(inputs), str(store), "--no-progress"]) == 0
    split = tmp_path / "split"
    assert main(["convert", str(store), str(split) + "/", "--to", "hdf5", "--no-progress"]) == 0
    files = sorted(split.iterdir())
    assert [p.name for p in files] == [f"ens.{i:05d}.h5" for i in range(3)]
    whole = io.read(store)
    for i, path in enumerate(files):
        one = io.read(path)
        assert len(one) == 1 and torch.equal(one.links[0], whole.links[i])
