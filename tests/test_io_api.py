"""The Ensemble type and the reader's tolerance for what real codes write."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowplug import io
from flowplug.adapters.lime import _lime_record, ildg_records
from flowplug.errors import ShapeError
from flowplug.io import Ensemble, Metadata

from _io_helpers import make_ensemble


def _lime_file(path, records, flags=None):
    out = b""
    for i, (rtype, data) in enumerate(records):
        data = data.tobytes() if isinstance(data, np.ndarray) else data
        out += _lime_record(rtype, data, 0 if flags is None else flags[i])
    path.write_bytes(out)
    return path


def test_ensemble_basics():
    ens = make_ensemble((2, 3, 4, 5), batch=3)
    assert len(ens) == 3 and ens.lattice == (2, 3, 4, 5) and ens.group == "su3" and ens.volume == 120
    assert ens.n_colors == 3 and ens.ndim == 4
    one = ens[1]
    assert len(one) == 1 and one.header["trajectory"] == 1
    assert torch.equal(one.links[0], ens.links[1])
    both = Ensemble.concat([ens[0], ens[2]])
    assert len(both) == 2 and [m.header["trajectory"] for m in both.meta] == [0, 2]
    assert "3 x su3 on 2x3x4x5" in repr(ens)
    with pytest.raises(ShapeError):
        Ensemble(torch.zeros(1, 4, 2, 2, 2, 3, 3, dtype=torch.complex128))
    with pytest.raises(ShapeError):
        Ensemble(ens.links, meta=[Metadata()])
    with pytest.raises(ShapeError):
        Ensemble.concat([ens, make_ensemble((2, 2, 2, 2))])


def test_from_links_carries_provenance_into_hdf5(tmp_path):
    links = make_ensemble(batch=2).links
    ens = Ensemble.from_links(
        links,
        header=[{"trajectory": 10}, {"trajectory": 20}],
        provenance={"kernel": "hmc", "seed": 1},
        attrs={"beta": 5.7},
    )
    io.write(tmp_path / "run.h5", ens)
    back = io.read(tmp_path / "run.h5")
    assert [m.header["trajectory"] for m in back.meta] == [10, 20]
    assert back.meta[1].provenance["kernel"] == "hmc" and back.attrs == {"beta": 5.7}


def test_reader_accepts_grid_qio_and_careless_variants(tmp_path):
    ens = make_ensemble(precision=64, seed=8)
    recs = dict(ildg_records(ens, 64))
    # Grid: ildgFormat without namespace, no NUL, no LFN, no flags at all
    grid_fmt = recs["ildg-format"].replace(b' xmlns="http://www.lqcd.org/ildg"', b"")
    grid = _lime_file(
        tmp_path / "grid.lime",
        [
            ("ildg-format", grid_fmt),
            ("ildg-binary-data", recs["ildg-binary-data"]),
            ("scidac-checksum", recs["scidac-checksum"]),
        ],
    )
    assert torch.equal(io.read(grid).links, ens.links)
    # QIO: XML records ending in NUL; checksum in upper case with spaces and no leading zeros
    ck = recs["scidac-checksum"].decode()
    import re

    suma = re.search("<suma>(.*)</suma>", ck).group(1)
    ck = ck.replace(f"<suma>{suma}</suma>", f"<suma> {suma.upper().lstrip('0')} </suma>")
    qio = _lime_file(
        tmp_path / "qio.ildg",
        [
            (t, d + b"\0" if t != "ildg-binary-data" else d)
            for t, d in [*[(k, v) for k, v in recs.items() if k != "scidac-checksum"], ("scidac-checksum", ck.encode())]
        ],
    )
    back = io.read(qio)
    assert torch.equal(back.links, ens.links) and back.checksum_status == "ok"
    # SciDAC: scidac-binary-data and no ildg-format; dims/precision from private records
    sci = _lime_file(
        tmp_path / "x.scidac",
        [(("scidac-binary-data" if k == "ildg-binary-data" else k), v) for k, v in recs.items() if k != "ildg-format"],
    )
    back = io.read(sci)
    assert back.meta[0].format == "scidac" and torch.equal(back.links, ens.links)
    # tmLQCD: xlf-info message first; its plaquette (Re tr U_P / 3, 12 decimals) is verified
    from flowplug.errors import ChecksumError
    from flowplug.gauge import plaquette

    plaq = float(plaquette(ens.links)[0])
    xlf = f"plaquette = {plaq:14.12f}\n trajectory nr = 42\n beta = 5.6, kappa = 0.1\n".encode()
    tm = _lime_file(tmp_path / "tm.lime", [("xlf-info", xlf), *recs.items()], flags=[0xC000] + [0] * 8)
    back = io.read(tm)
    assert back.header["trajectory"] == 42 and back.header["beta"] == 5.6
    assert [c.quantity for c in back.meta[0].checks if c.ok][-1] == "xlf-info plaquette"
    wrong = xlf.replace(f"{plaq:14.12f}".encode(), f"{plaq + 1e-6:14.12f}".encode())
    tm_bad = _lime_file(tmp_path / "tm-bad.lime", [("xlf-info", wrong), *recs.items()], flags=[0xC000] + [0] * 8)
    with pytest.raises(ChecksumError, match="xlf-info plaquette mismatch"):
        io.read(tm_bad)
    assert io.read(tm_bad, verify=False).checksum_status == "mismatch"


def test_forced_format_and_unknown_group(tmp_path):
    path = tmp_path / "cfg.ildg"
    io.write(path, make_ensemble())
    assert io.read(path, format="ILDG").meta[0].format == "ildg"
    from flowplug.errors import FormatError

    with pytest.raises(FormatError, match="group 'so3'"):
        io.read(path, group="so3")
