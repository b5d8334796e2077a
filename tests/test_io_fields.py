"""Ensembles of any field kind (issue 12, item 4): phi^4, O(2), U(1) and SU(N) fields in
the HDF5 store, refusals by the gauge-only formats, old (format_version 1) stores."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch

from flowplug import io
from flowplug.cli import main
from flowplug.errors import FormatError, ShapeError

from _io_helpers import random_su


def _field(kind: str, lattice: tuple[int, ...], batch: int, precision: int, seed: int) -> torch.Tensor:
    """Random canonical values of ``kind``; float32-representable when precision is 32."""
    rng = np.random.default_rng(seed)
    d = len(lattice)
    if kind == "scalar":
        x = rng.normal(size=(batch, *lattice))
    elif kind in ("o2", "u1"):
        shape = (batch, *lattice) if kind == "o2" else (batch, d, *lattice)
        x = rng.uniform(-math.pi, math.pi, size=shape)
    else:
        x = random_su(int(kind[2:]), (batch, d, *lattice), rng)
    if precision == 32:
        x = x.astype(np.complex64 if np.iscomplexobj(x) else np.float32)
    return torch.from_numpy(x.astype(np.complex128 if np.iscomplexobj(x) else np.float64))


KINDS = [
    ("scalar", (4, 6)),
    ("scalar", (2, 3, 4)),
    ("o2", (4, 6)),
    ("u1", (4, 6)),
    ("su2", (2, 3, 4, 5)),
    ("su3", (4, 6)),
]


@pytest.mark.parametrize("precision", [64, 32])
@pytest.mark.parametrize("kind,lattice", KINDS)
def test_hdf5_round_trips_every_field_kind(tmp_path, kind, lattice, precision):
    """Non-cubic lattices, seeds 1 and 2; bit-exact values, kind, lattice, metadata, appends."""
    a = _field(kind, lattice, 3, precision, seed=1)
    b = _field(kind, lattice, 2, precision, seed=2)
    ens = io.Ensemble.from_links(
        a,
        field=kind,
        precision=precision,
        header=[{"trajectory": t} for t in (10, 20, 30)],
        provenance={"generator": "test"},
        attrs={"beta": 1.5},
    )
    assert ens.field == kind and ens.lattice == lattice
    assert ens.group == (kind if kind in ("u1", "su2", "su3") else None)
    path = tmp_path / f"{kind}.h5"
    io.write(path, ens)
    io.write(path, io.Ensemble(b, field=kind, precision=precision), append=True)
    back = io.read(path)
    assert back.field == kind and back.lattice == lattice and len(back) == 5
    assert back.links is back.data and back.data.dtype == (torch.complex128 if kind.startswith("su") else torch.float64)
    assert torch.equal(back.data, torch.cat([a, b])) and back.precision == precision
    assert [m.header.get("trajectory") for m in back.meta[:3]] == [10, 20, 30]
    assert back.meta[0].provenance["generator"] == "test" and back.attrs == {"beta": 1.5}
    assert back.checksum_status == "ok"
    assert torch.equal(io.read(path, index=[4]).data, b[1:])
    with h5py.File(path) as f:
        assert f.attrs["field"] == kind and int(f.attrs["format_version"]) == 2
        stored = {(True, 32): "<c8", (True, 64): "<c16", (False, 32): "<f4", (False, 64): "<f8"}
        assert f["links"].dtype == np.dtype(stored[kind.startswith("su"), precision])
    # one configuration per file of the store's kind, and back
    one = tmp_path / "one.h5"
    io.write(one, back[2])
    assert torch.equal(io.read(one, field=kind).data, a[2:3])


def test_a_store_holds_one_field_kind(tmp_path):
    phi = _field("scalar", (4, 6), 2, 64, seed=3)
    path = tmp_path / "phi4.h5"
    io.write(path, io.Ensemble(phi, field="scalar"))
    with pytest.raises(FormatError, match="holds scalar on 4x6; cannot append o2 on 4x6"):
        io.write(path, io.Ensemble(phi, field="o2"), append=True)
    with pytest.raises(FormatError, match="holds a site field of kind scalar, not o2 as asked"):
        io.read(path, field="o2")
    with pytest.raises(FormatError, match="holds a site field of kind scalar, not u1 as asked"):
        io.read(path, group="u1")


@pytest.mark.parametrize("kind", ["scalar", "o2", "u1", "su2"])
def test_gauge_only_formats_refuse_other_fields(tmp_path, kind):
    """ILDG, NERSC, openQCD refuse what they cannot hold, naming the field, what the
    format holds and where it can go; nothing is written."""
    ens = io.Ensemble(_field(kind, (2, 2, 2, 4), 1, 64, seed=4), field=kind)
    refusing = [name for name in io.formats(writable=True) if not io.get_format(name).holds(kind)]
    assert {"nersc", "openqcd"} <= set(refusing) and "hdf5" not in refusing
    assert ("ildg" in refusing) == (kind != "su2")
    what = f"a site field of kind {kind}" if kind in ("scalar", "o2") else f"{kind} links"
    for name in refusing:
        out = tmp_path / f"x.{io.get_format(name).extension}"
        with pytest.raises(FormatError) as info:
            io.write(out, ens, name)
        text = str(info.value)
        assert f"format {name} holds su3" in text and "gauge links only" in text, text
        assert f"the data are {what}" in text and "hdf5" in text, text
        assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_convert_of_a_phi4_store_refuses_gauge_formats_and_copies_to_hdf5(tmp_path, capsys):
    store = tmp_path / "phi4.h5"
    phi = _field("scalar", (2, 2, 2, 4), 2, 64, seed=5)
    io.write(store, io.Ensemble(phi, field="scalar"))
    assert main(["convert", str(store), str(tmp_path / "out"), "--to", "ildg", "--no-progress"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "format ildg holds su3, su2 gauge links only; the data are a site field of kind scalar" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    copy = tmp_path / "copy.h5"
    assert main(["convert", str(store), str(copy), "--no-progress"]) == 0
    assert main(["convert", str(store), str(copy), "--no-progress"]) == 0  # kept, checked against input
    back = io.read(copy)
    assert back.field == "scalar" and torch.equal(back.data, phi)


def test_ensemble_needs_the_kind_of_a_site_field():
    phi = torch.zeros(2, 4, 6, dtype=torch.float64)
    with pytest.raises(ShapeError, match="field='scalar'"):
        io.Ensemble(phi)
    with pytest.raises(ShapeError, match="su3 fields are complex128"):
        io.Ensemble(phi, field="su3")
    with pytest.raises(ShapeError, match="unknown field kind 'so3'"):
        io.Ensemble(phi, field="so3")
    ens = io.Ensemble(phi.numpy(), field="Scalar")
    assert ens.field == "scalar" and ens.ndim == 2 and ens.n_colors == 1 and ens.volume == 24
    assert ens[1].field == "scalar" and "2 x scalar on 4x6" in repr(ens)
    with pytest.raises(ShapeError, match="cannot concatenate"):
        io.Ensemble.concat([ens, io.Ensemble(phi, field="o2")])
    # what a gauge tensor alone says is still inferred
    assert io.Ensemble(torch.zeros(1, 2, 4, 6, dtype=torch.float64)).field == "u1"


def test_hdf5_reads_and_appends_format_version_1_stores(tmp_path):
    """Stores written before the field attribute (format_version 1, ``group``) still read."""
    old = tmp_path / "old.h5"
    su3 = _field("su3", (2, 3, 4, 5), 2, 64, seed=6)
    io.write(old, io.Ensemble(su3))
    with h5py.File(old, "r+") as f:  # exactly what flowplug wrote before: same data, version 1
        del f.attrs["field"]
        f.attrs["group"] = "su3"
        f.attrs["format_version"] = 1
    back = io.read(old)
    assert back.field == "su3" and torch.equal(back.data, su3)
    more = _field("su3", (2, 3, 4, 5), 1, 64, seed=7)
    io.write(old, io.Ensemble(more), append=True)
    assert torch.equal(io.read(old).data, torch.cat([su3, more]))
    with h5py.File(old) as f:
        assert int(f.attrs["format_version"]) == 1 and "field" not in f.attrs
    with h5py.File(old, "r+") as f:
        f.attrs["format_version"] = 3
    with pytest.raises(FormatError, match="format_version 3; this flowplug reads 1, 2"):
        io.read(old)
    with h5py.File(old, "r+") as f:
        f.attrs["format_version"] = 2
        f.attrs["field"] = "so3"
    with pytest.raises(FormatError, match="kind 'so3', which this flowplug cannot represent"):
        io.read(old)


def test_info_on_a_phi4_store(tmp_path, capsys):
    phi = _field("scalar", (4, 6), 3, 64, seed=8)
    path = tmp_path / "phi4.h5"
    io.write(path, io.Ensemble(phi, field="scalar"))
    assert main(["info", "--json", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["field"] == "scalar" and info["group"] is None and info["lattice"] == [4, 6]
    assert info["configurations"] == 3 and info["checksum"] == "ok"
    assert info["plaquette"] == [None] * 3 and info["unitarity"] == [None] * 3
    assert info["observables"]["magnetization"] == pytest.approx(phi.mean((1, 2)).tolist(), abs=1e-15)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "field         scalar" in out and "magnetization" in out and "plaquette" not in out


def test_what_an_hmc_writer_of_site_fields_calls(tmp_path):
    """The calls a phi^4 HMC run makes to build an ensemble store trajectory by trajectory."""
    path = tmp_path / "ensemble.h5"
    chains = _field("scalar", (4, 6), 2, 64, seed=9)
    for step in (1, 2, 3):
        ens = io.Ensemble.from_links(
            chains * step,
            field="scalar",
            precision=64,
            header={"trajectory": step},
            provenance=[{"chain": c, "trajectory": step} for c in range(2)],
            attrs={"action": {"name": "phi4", "m2": -4.0, "lam": 8.0}},
        )
        assert io.get_format("hdf5").can_write(ens) is None
        io.write(path, ens, "hdf5", append=True)  # created by the first call
    back = io.read(path)
    assert len(back) == 6 and back.field == "scalar" and back.attrs["action"]["name"] == "phi4"
    assert [m.header["trajectory"] for m in back.meta] == [1, 1, 2, 2, 3, 3]
    assert torch.equal(back.data[4:], chains * 3)
