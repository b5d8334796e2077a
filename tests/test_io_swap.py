"""The swapping copies of the ILDG reader and writer, and the space reserved before a payload.

``adapters.common._to_native``/``_to_stored`` replace numpy's in-place byte swap (issue 16
item 5): they must give the same bits, NaN payloads included, for 32- and 64-bit data in
either byte order; ``_reserve`` (Linux ``fallocate``) must leave the written file exactly as
long as its records, and the file must read back bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowplug import io
from flowplug.adapters import common
from flowplug.adapters.lime import scan

from _io_helpers import make_ensemble


@pytest.mark.parametrize("stored", [">c16", "<c16", ">c8", "<c8"])
def test_swapping_copy_equals_numpy_byteswap_bit_for_bit(stored):
    dtype = np.dtype(stored)
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, size=64 * dtype.itemsize, dtype=np.uint8)  # any bits: NaNs, denormals
    expected = raw.copy()
    if not dtype.isnative:
        expected.view(dtype).byteswap(inplace=True)
    out = np.empty_like(raw)
    common._to_native(out, raw, dtype)
    assert np.array_equal(out, expected)
    back = np.empty_like(raw)
    common._to_stored(back, out, dtype)  # the inverse
    assert np.array_equal(back, raw)
    assert not dtype.isnative or np.array_equal(out, raw)


def test_reserved_payload_leaves_the_file_exact(tmp_path):
    """A payload over PARALLEL_BYTES (fallocate is called): the file ends with its last record
    (no reserved bytes left over) and reads back bit for bit."""
    ens = make_ensemble(lattice=(8, 8, 8, 16), seed=21)  # 8192 sites x 576 bytes = 4.7 MB
    path = tmp_path / "big.ildg"
    io.write(path, ens)
    assert payload_bytes(path) > common.PARALLEL_BYTES
    last = scan(path)[-1]
    assert path.stat().st_size == last.data_offset + last.length + (-last.length) % 8
    back = io.read(path)
    assert torch.equal(back.links, ens.links) and all(c.ok for c in back.meta[0].checks)


def payload_bytes(path) -> int:
    return next(r.length for r in scan(path) if r.type == "ildg-binary-data")
