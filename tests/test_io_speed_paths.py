"""The piecewise ILDG-order reader (issue 16, item 5) against a straightforward reference.

The reader moves the payload in cache-sized pieces (a checksum, a swapping copy, a
finiteness sum, the group check and the permuted copy per piece, on one or more
threads). These tests pin that the result is the one of the obvious implementation
(``numpy.frombuffer`` of the stored bytes, ``astype(complex128)``, transpose to the
canonical axes) bit for bit, big- and little-endian, 32 and 64 bits, on one or two
threads; that the checksum callbacks see every stored byte once; that the group check
measured in the pieces equals a separate pass; and that bad payloads (NaN/Inf, links off
the group, a wrong determinant, a truncated or damaged file) are reported, naming the file.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowplug import io
from flowplug.adapters import common
from flowplug.adapters.lime import scan
from flowplug.errors import ChecksumError, FormatError, NonUnitaryWarning
from flowplug.linkcheck import group_deviation, wanting_group_check

from _io_helpers import make_ensemble, random_su


def _reference(payload: bytes, lattice, n: int, precision: int, byteorder: str) -> torch.Tensor:
    """The canonical links of stored ILDG-order bytes, the obvious way (whole arrays, no pieces)."""
    dtype = np.dtype("c8" if precision == 32 else "c16").newbyteorder(byteorder)
    d = len(lattice)
    values = np.frombuffer(payload, dtype=dtype).astype(np.complex128)
    values = values.reshape(*reversed(lattice), d, n, n)
    axes = (d, *range(d - 1, -1, -1), d + 1, d + 2)  # (t, z, y, x, mu, N, N) -> (mu, x, y, z, t, N, N)
    return torch.from_numpy(np.ascontiguousarray(values.transpose(axes))[None])


def _stored_bytes(links: np.ndarray, precision: int, byteorder: str) -> bytes:
    """ILDG-order bytes of canonical links (1, d, L..., N, N), the obvious way."""
    d = links.ndim - 4
    dtype = np.dtype("c8" if precision == 32 else "c16").newbyteorder(byteorder)
    axes = (*range(d, 0, -1), 0, d + 1, d + 2)
    return np.ascontiguousarray(links[0].transpose(axes)).astype(dtype).tobytes()


@pytest.mark.parametrize("chunk", [1000, 1 << 20])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("byteorder", [">", "<"])
@pytest.mark.parametrize("precision", [32, 64])
@pytest.mark.parametrize("lattice", [(2, 3, 4, 5), (3, 2, 2, 1), (4, 4, 4, 4), (5, 7)])
def test_canonical_read_equals_the_reference(tmp_path, monkeypatch, lattice, precision, byteorder, threads, chunk):
    monkeypatch.setattr(common, "CHUNK_BYTES", chunk)  # 1000: many pieces, cut inside the slices
    monkeypatch.setattr(common, "PARALLEL_BYTES", 0)  # threads even for a tiny payload
    rng = np.random.default_rng(len(lattice) * precision)
    links = random_su(3, (1, len(lattice), *lattice), rng)
    payload = _stored_bytes(links, precision, byteorder)
    path = tmp_path / "payload.bin"
    path.write_bytes(b"head" * 5 + payload + b"tail")
    seen: list[tuple[int, bytes]] = []

    def on_piece(piece, start):
        seen.append((start, piece.tobytes()))

    got = common.read_ildg_canonical(path, 20, lattice, 3, precision, byteorder, on_piece=on_piece, threads=threads)
    want = _reference(payload, lattice, 3, precision, byteorder)
    assert got.is_contiguous() and got.dtype == torch.complex128
    assert torch.equal(torch.view_as_real(got), torch.view_as_real(want))  # bit for bit (NaN-free data)
    assert got.numpy().tobytes() == want.numpy().tobytes()
    # the checksum callback saw every stored byte exactly once, unmodified
    seen.sort()
    assert b"".join(piece for _, piece in seen) == payload
    assert [s for s, _ in seen] == list(np.cumsum([0] + [len(p) for _, p in seen[:-1]]))


@pytest.mark.parametrize("precision", [32, 64])
def test_io_read_of_ildg_files_equals_the_reference(tmp_path, monkeypatch, precision):
    monkeypatch.setattr(common, "CHUNK_BYTES", 1500)
    monkeypatch.setattr(common, "PARALLEL_BYTES", 0)
    ens = make_ensemble((4, 3, 2, 6), precision=precision, seed=3)
    path = io.write(tmp_path / "cfg.ildg", ens)
    rec = next(r for r in scan(path) if r.type == "ildg-binary-data")
    payload = path.read_bytes()[rec.data_offset : rec.data_offset + rec.length]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            got = io.read(path, unitarity="error")
        finally:
            torch.set_num_threads(1)
        assert torch.equal(got.links, _reference(payload, (4, 3, 2, 6), 3, precision, ">"))
        assert torch.equal(got.links, ens.links)


@pytest.mark.parametrize("open_boundary", [False, True])
def test_group_check_of_the_pieces_equals_a_separate_pass(tmp_path, monkeypatch, open_boundary):
    monkeypatch.setattr(common, "CHUNK_BYTES", 1500)
    lattice = (3, 2, 4, 5)
    rng = np.random.default_rng(7)
    links = random_su(3, (1, 4, *lattice), rng)
    links[0, 1, 2, 1, 3, 0] *= 1 + 3e-6  # off the group, in a slice before the last
    links[0, 0, 1, 0, 2, 4] *= np.exp(2e-6j)  # a wrong determinant in the last slice
    if open_boundary:
        links[0, 3, :, :, :, -1] = 0
    else:
        links[0, 3, 2, 1, 0, -1] *= 1 + 5e-6  # the largest deviation, a time link of the last slice
    path = io.write(tmp_path / "cfg.ildg", io.Ensemble(torch.from_numpy(links), precision=64))
    for contiguous in (True, False):
        with pytest.warns(NonUnitaryWarning, match="cfg.ildg"):
            ens = io.read(path, contiguous=contiguous)
        with wanting_group_check(False):  # the separate pass, over memory
            if open_boundary:
                assert ens.meta[0].header["boundary"] == "open"
                want_space = group_deviation(ens.links[:, :3])
                want_time = group_deviation(ens.links[:, 3:, :, :, :, :-1])
                want = (max(want_space[0], want_time[0]), max(want_space[1], want_time[1]))
            else:
                want = group_deviation(ens.links)
        assert (ens.meta[0].header["unitarity"], ens.meta[0].header["determinant"]) == want
        assert want[0] > 1e-6 and want[1] > 1e-6
        with pytest.raises(FormatError, match=r"cfg\.ildg: links are not in SU3"):
            io.read(path, unitarity="error", contiguous=contiguous)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("precision", [32, 64])
def test_non_finite_payload_is_named(tmp_path, monkeypatch, bad, precision):
    monkeypatch.setattr(common, "CHUNK_BYTES", 1000)
    ens = make_ensemble((2, 3, 2, 4), precision=precision)
    links = ens.links.clone()
    links[0, 2, 1, 2, 0, 3, 1, 2] = complex(1.0, bad)
    path = io.write(tmp_path / "bad.ildg", io.Ensemble(links, precision=precision))
    with pytest.raises(FormatError, match=r"bad\.ildg: payload holds NaN or Inf.*direction 2, site \(1, 2, 0, 3\)"):
        io.read(path)


def test_truncated_and_damaged_files_are_named(tmp_path):
    path = io.write(tmp_path / "cfg.ildg", make_ensemble((2, 3, 2, 4)))
    rec = next(r for r in scan(path) if r.type == "ildg-binary-data")
    data = path.read_bytes()
    cut = tmp_path / "cut.ildg"
    cut.write_bytes(data[: rec.data_offset + rec.length // 2])
    with pytest.raises(FormatError, match="cut.ildg"):
        io.read(cut)
    with pytest.raises(FormatError, match=r"cut\.ildg.*(truncated|bytes)"):
        common.read_ildg_canonical(cut, rec.data_offset, (2, 3, 2, 4), 3, 64)
    flipped = bytearray(data)
    flipped[rec.data_offset + rec.length - 3] ^= 0x01  # a payload byte of the last time slice
    damaged = tmp_path / "damaged.ildg"
    damaged.write_bytes(bytes(flipped))
    with pytest.raises(ChecksumError, match=r"damaged\.ildg: .*checksum.* mismatch: expected \S+, found \S+"):
        io.read(damaged, unitarity="ignore")
