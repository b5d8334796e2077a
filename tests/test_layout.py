"""The ILDG axis order (flowplug.layout, written down once) and the split of flowplug.io
into data model, value checks and format dispatch (issue 12, item 5)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from flowplug import io
from flowplug.errors import ShapeError
from flowplug.layout import from_ildg, ildg_axes, ildg_shape, to_ildg
from flowplug.proposal import from_canonical, to_canonical

ROOT = Path(__file__).resolve().parents[1]


def _coded(lattice: tuple[int, ...], n: int = 2) -> np.ndarray:
    """Canonical (d, L_0, ..., L_{d-1}, n, n) links whose entries encode (mu, x_0, ..., row, col)."""
    d = len(lattice)
    idx = np.indices((d, *lattice, n, n))
    return sum(idx[k] * 10.0 ** (d + 2 - k) for k in range(d + 3)).astype(np.complex128)


@pytest.mark.parametrize("lattice", [(3, 5), (2, 3, 4), (2, 3, 4, 5)])  # non-cubic: a swap shows
def test_ildg_order_is_lattice_reversed_then_direction(lattice):
    d = len(lattice)
    can = _coded(lattice)
    ildg = to_ildg(can)
    assert ildg.shape == ildg_shape(lattice, 2) == (*reversed(lattice), d, 2, 2)
    rng = np.random.default_rng(0)
    for _ in range(20):
        mu = int(rng.integers(d))
        x = tuple(int(rng.integers(n)) for n in lattice)
        a, b = (int(v) for v in rng.integers(2, size=2))
        assert ildg[(*reversed(x), mu, a, b)] == can[(mu, *x, a, b)]
    np.testing.assert_array_equal(from_ildg(ildg), can)
    # torch tensors, with a batch axis, the same way
    t = torch.from_numpy(np.stack([can, 2 * can]))
    ti = to_ildg(t, batched=True)
    assert isinstance(ti, torch.Tensor) and torch.equal(ti[1], torch.from_numpy(2 * ildg))
    assert torch.equal(from_ildg(ti, batched=True), t)


def test_ildg_axes_values_and_errors():
    assert ildg_axes(4) == (4, 3, 2, 1, 0, 5, 6)
    assert ildg_axes(4, batched=True) == (0, 5, 4, 3, 2, 1, 6, 7)
    assert ildg_axes(2) == (2, 1, 0, 3, 4)
    with pytest.raises(ShapeError):
        ildg_axes(0)
    with pytest.raises(ShapeError, match="square colour block"):
        to_ildg(np.zeros((4, 2, 2, 2, 2, 3, 2)))


def test_the_ildg_permutation_is_written_once():
    """No module but flowplug/layout.py spells the ILDG permutation out."""
    pattern = re.compile(r"(transpose|permute)\(\s*4,\s*3,\s*2,\s*1,\s*0|range\(d(\s*\+\s*1)?,\s*[01],\s*-1\)")
    offenders = []
    for folder in ("flowplug", "adapters", "plugins"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "layout.py" and folder == "flowplug":
                continue
            if pattern.search(path.read_text()):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_adapters_and_the_proposal_step_agree_with_layout():
    from flowplug.adapters.common import canonical_to_ildg, ildg_to_canonical

    lattice = (2, 3, 4, 5)
    can = torch.from_numpy(_coded(lattice, 3))
    stored = canonical_to_ildg(can, 64)
    np.testing.assert_array_equal(stored, to_ildg(can.numpy()))
    back = ildg_to_canonical(stored.reshape(-1).view(np.uint8), lattice, 3, 64)
    assert torch.equal(back[0], can)
    x, batched = to_canonical(stored.astype(np.complex128), "su3", lattice, "ildg")
    assert not batched and torch.equal(x[0], can)
    assert np.array_equal(from_canonical(x, stored.astype(np.complex128), "ildg", False), stored)


def test_proposal_layouts_of_site_fields():
    """The canonical layout of a site field has no direction axis (old code expected one)."""
    phi = torch.randn(3, 5, dtype=torch.float64)
    x, batched = to_canonical(phi, "scalar", (3, 5), "canonical")
    assert not batched and x.shape == (1, 3, 5) and torch.equal(x[0], phi)
    xb, batched = to_canonical(phi.expand(2, 3, 5), "o2", (3, 5), "canonical")
    assert batched and xb.shape == (2, 3, 5)
    from flowplug.errors import ConfigError

    with pytest.raises(ConfigError, match="layout 'ildg' holds SU\\(N\\) matrices"):
        to_canonical(phi, "scalar", (3, 5), "ildg")


def test_io_keeps_its_public_names():
    """``from flowplug import io`` still gives the data model, the checks and the dispatch."""
    from flowplug import ensemble, layout, linkcheck

    for name in ("Record", "Check", "Metadata", "Ensemble", "group_of", "field_of"):
        assert getattr(io, name) is getattr(ensemble, name)
    for name in (
        "unitarity_tolerance",
        "check_links",
        "group_deviation",
        "link_deviations",
        "open_time_boundary",
        "float32_exact",
        "raise_failed_checks",
    ):
        assert getattr(io, name) is getattr(linkcheck, name)
    for name in ("to_ildg", "from_ildg", "ildg_axes", "ildg_shape"):
        assert getattr(io, name) is getattr(layout, name)
    for name in io.__all__:
        assert hasattr(io, name), name
    for name in (
        "FormatHandler",
        "formats",
        "get_format",
        "detect",
        "read",
        "write",
        "parse_lattice",
        "FormatError",
        "ChecksumError",
    ):
        assert name in io.__all__


def test_a_format_handler_written_with_groups_still_works():
    class Legacy(io.FormatHandler):
        name = "legacy"
        groups = ("su2",)

    assert Legacy.fields == ("su2",) and Legacy().groups == ("su2",)
    su2 = io.Ensemble(torch.eye(2, dtype=torch.complex128).expand(1, 4, 2, 2, 2, 2, 2, 2))
    assert Legacy().can_write(su2) is None
    assert "holds su2 gauge links only" in Legacy().can_write(
        su2.__class__(su2.links.new_zeros(1, 4, 2, 2, 2, 2, 3, 3))
    )


def test_a_batch_without_batched_is_refused():
    """(1, 4, 4, 4, 4, 4, 3, 3) is one 4D configuration in a batch, not a 5D lattice."""
    from flowplug.errors import ShapeError
    from flowplug.layout import from_ildg, to_ildg

    x = torch.zeros(1, 4, 4, 4, 4, 4, 3, 3, dtype=torch.complex128)
    with pytest.raises(ShapeError, match="batched=True"):
        to_ildg(x)
    assert to_ildg(x, batched=True).shape == (1, 4, 4, 4, 4, 4, 3, 3)
    y = torch.zeros(1, 6, 5, 4, 3, 4, 3, 3, dtype=torch.complex128)  # (B, lt, lz, ly, lx, 4, N, N)
    with pytest.raises(ShapeError, match="batched=True"):
        from_ildg(y)
    assert from_ildg(y, batched=True).shape == (1, 4, 3, 4, 5, 6, 3, 3)


# ----------------------------------------------------------------- chunked conversions (issue 16, item 5)


@pytest.mark.parametrize("target", [1, 100, 10_000, 1 << 30])
def test_file_chunks_cover_the_payload_in_order(target):
    from flowplug.adapters.common import _file_chunks

    shape = (5, 4, 3, 2, 4)  # (lt, lz, ly, lx, d), non-cubic
    flat = np.arange(int(np.prod(shape))).reshape(shape)
    pieces = _file_chunks(shape, 72, target)
    assert pieces[0][1] == 0 and pieces[-1][2] == flat.size
    for (index, a, b), nxt in zip(pieces, [*pieces[1:], None], strict=True):
        assert np.array_equal(flat[index].reshape(-1), np.arange(a, b))  # the piece is that byte range
        if nxt is not None:
            assert nxt[1] == b  # consecutive, no gap
        assert (b - a) * 72 <= max(target, 72 * 4) and (b - a) % 4 == 0  # whole sites


@pytest.mark.parametrize("precision", [32, 64])
@pytest.mark.parametrize("byteorder", [">", "<"])
def test_chunked_reads_and_writes_agree_with_layout(tmp_path, monkeypatch, precision, byteorder):
    """Piecewise file -> canonical copies (contiguous and file-order view) and the
    piecewise writer give exactly layout's permutation, with pieces smaller than a slice."""
    from flowplug.adapters import common
    from flowplug.adapters.checksums import ScidacChecksum, scidac_checksum

    monkeypatch.setattr(common, "CHUNK_BYTES", 500)  # many pieces, cut inside time slices
    lattice = (2, 3, 4, 5)
    rng = np.random.default_rng(7)
    can = rng.normal(size=(4, *lattice, 3, 3)) + 1j * rng.normal(size=(4, *lattice, 3, 3))
    if precision == 32:
        can = can.astype(np.complex64).astype(np.complex128)  # exactly representable
    dtype = common.complex_dtype(precision, byteorder)
    stored = np.ascontiguousarray(to_ildg(can)).astype(dtype)
    payload = stored.reshape(-1).view(np.uint8)
    path = tmp_path / "payload.bin"
    path.write_bytes(b"xyz" + payload.tobytes())  # an odd offset
    site_bytes = 4 * 9 * precision // 4
    for reader in (common.read_ildg_canonical, common.read_ildg_file_order):
        summer = ScidacChecksum(site_bytes)
        got = reader(path, 3, lattice, 3, precision, byteorder, on_chunk=summer.update)
        assert got.shape == (1, 4, *lattice, 3, 3) and got.dtype == torch.complex128
        assert torch.equal(got[0], torch.from_numpy(can))
        assert summer.digest() == scidac_checksum(payload, site_bytes)
    assert common.read_ildg_canonical(path, 3, lattice, 3, precision, byteorder).is_contiguous()
    assert torch.equal(common.ildg_to_canonical(payload, lattice, 3, precision, byteorder)[0], torch.from_numpy(can))
    # writing: the same bytes from contiguous links and from a file-order view
    view = common.read_ildg_file_order(path, 3, lattice, 3, precision, byteorder)[0]
    for links in (torch.from_numpy(can), view):
        assert np.array_equal(common.canonical_to_ildg(links, precision, byteorder), stored)
        out = tmp_path / "out.bin"
        with open(out, "wb") as fh:
            assert common.write_ildg_payload(fh, links, precision, byteorder) == payload.size
        assert out.read_bytes() == payload.tobytes()


def test_chunked_read_of_a_truncated_payload_is_a_format_error(tmp_path):
    from flowplug.adapters import common
    from flowplug.errors import FormatError

    path = tmp_path / "short.bin"
    path.write_bytes(bytes(100))
    for reader in (common.read_ildg_canonical, common.read_ildg_file_order):
        with pytest.raises(FormatError, match="needs bytes 0..576 but the file has 100 bytes"):
            reader(path, 0, (1, 1, 1, 1), 3, 64)
