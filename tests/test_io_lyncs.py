"""Interoperability with lyncs-io: files flowplug writes are read back identically by it.

lyncs-io 0.2.3 imports only with numpy < 2.3. The check runs in this interpreter when
``lyncs_io`` imports here, or in the interpreter named by ``FLOWPLUG_LYNCS_PYTHON``
(e.g. a separate virtual environment with numpy < 2.3 and lyncs-io); otherwise it is
skipped with the reason.
"""

from __future__ import annotations

import os
import struct
import subprocess

import numpy as np
import pytest
import torch

from flowplug import io
from flowplug.errors import FormatError

from _io_helpers import make_ensemble

try:
    import lyncs_io

    HERE = True
except Exception as exc:  # numpy >= 2.3 breaks lyncs-io's import
    HERE = False
    WHY = f"lyncs_io does not import here ({type(exc).__name__}: {str(exc)[:80]})"

OTHER = os.environ.get("FLOWPLUG_LYNCS_PYTHON")

SCRIPT = """
import os, sys, numpy as np, lyncs_io
out = sys.argv[1]
for path in sys.argv[2:]:
    arr = np.asarray(lyncs_io.load(path, format="lime"))
    np.save(os.path.join(out, os.path.basename(path) + ".npy"), np.ascontiguousarray(arr), allow_pickle=False)
"""


def _lyncs_arrays(paths, out):
    if HERE:
        return [np.asarray(lyncs_io.load(str(p), format="lime")) for p in paths]
    subprocess.run([OTHER, "-c", SCRIPT, str(out), *(str(p) for p in paths)], check=True, timeout=120)
    return [np.load(out / (p.name + ".npy"), allow_pickle=False) for p in paths]


def _files(tmp_path):
    out = []
    for precision in (32, 64):
        ens = make_ensemble((2, 3, 4, 5), precision=precision, seed=precision)
        path = tmp_path / f"cfg{precision}.ildg"
        io.write(path, ens)
        out.append((path, ens))
    return out


def _file_order(ens, precision):
    return ens.links[0].numpy().transpose(4, 3, 2, 1, 0, 5, 6).astype(">c8" if precision == 32 else ">c16")


@pytest.mark.skipif(
    not HERE and not OTHER,
    reason="lyncs-io unavailable: "
    + ("" if HERE else WHY)
    + "; set FLOWPLUG_LYNCS_PYTHON to an interpreter where it imports",
)
def test_lyncs_reads_flowplug_ildg_identically(tmp_path):
    files = _files(tmp_path)
    arrays = _lyncs_arrays([p for p, _ in files], tmp_path)
    if HERE:
        for path, ens in files:
            assert torch.equal(io.read(path, format="lyncs").links, ens.links)
    for (path, ens), arr in zip(files, arrays, strict=True):
        precision = 32 if "32" in path.name else 64
        expected = _file_order(ens, precision)
        assert arr.shape == expected.shape == (5, 4, 3, 2, 4, 3, 3)
        assert arr.dtype.itemsize == expected.dtype.itemsize
        assert np.array_equal(arr, expected)  # same values, bit for bit (also the axis order)


@pytest.mark.skipif(
    not HERE and not OTHER,
    reason="lyncs-io unavailable: "
    + ("" if HERE else WHY)
    + "; set FLOWPLUG_LYNCS_PYTHON to an interpreter where it imports",
)
def test_lyncs_and_flowplug_agree_on_real_ildg_files(tmp_path):
    from _io_helpers import ensembles_dir

    folder = ensembles_dir()
    # (lyncs-io 0.2.3 fails on MILC/QIO's NUL-terminated XML records: ExpatError; flowplug reads them)
    names = ["tmlqcd.unity.l4444.lime"]
    arrays = _lyncs_arrays([folder / n for n in names], tmp_path)
    for name, arr in zip(names, arrays, strict=True):
        ens = io.read(folder / name)
        assert np.array_equal(arr, ens.links[0].numpy().transpose(4, 3, 2, 1, 0, 5, 6))


@pytest.mark.skipif(HERE, reason="lyncs_io imports here")
def test_lyncs_format_says_why_it_cannot_work(tmp_path):
    path, _ = _files(tmp_path)[0]
    with pytest.raises(FormatError, match="needs lyncs-io, which cannot be imported here .* numpy < 2.3"):
        io.read(path, format="lyncs")


def test_lyncs_format_refuses_pickled_records(tmp_path):
    data = b"\x80\x04N."  # a pickle: must never reach pickle.loads
    rec = struct.pack(">IHHQ128s", 0x456789AB, 1, 0xC000, len(data), b"lyncs-io-info") + data + b"\0" * 4
    path = tmp_path / "evil.lime"
    path.write_bytes(rec)
    with pytest.raises(FormatError, match="'lyncs-io-info' record, which lyncs-io would unpickle; refused"):
        io.read(path, format="lyncs")
    assert io.detect(tmp_path / "evil.lime") != "lyncs"


def test_lyncs_format_verifies_every_check_of_a_tmlqcd_file(monkeypatch):
    """The lyncs adapter re-verifies each stored check on the data lyncs-io returns: the
    scidac checksums and tmLQCD's xlf-info plaquette (a float check, which once crashed
    the adapter with a TypeError). lyncs-io itself is replaced by a stand-in returning
    the file's array, so this runs wherever the real configurations are."""
    from types import SimpleNamespace

    import flowplug.adapters.lyncs as lyncs_adapter

    from _io_helpers import ensembles_dir

    path = ensembles_dir() / "tmlqcd.unity.l4444.lime"
    own = io.read(path)
    arr = np.ascontiguousarray(own.links[0].numpy().transpose(4, 3, 2, 1, 0, 5, 6))
    monkeypatch.setattr(lyncs_adapter, "import_lyncs_io", lambda: SimpleNamespace(load=lambda p, format: arr))
    ens = io.read(path, format="lyncs")
    assert torch.equal(ens.links, own.links)
    checks = {c.quantity: c for c in ens.meta[0].checks}
    assert set(checks) == {c.quantity for c in own.meta[0].checks}
    assert "xlf-info plaquette" in checks and "scidac-checksum suma" in checks
    assert all(c.ok for c in checks.values()), checks
    assert checks["xlf-info plaquette"].found == 1.0
