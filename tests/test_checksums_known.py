"""Known-answer tests of the file checksums, independent of the code under test.

The SciDAC (QIO/Grid), MILC v5 and NERSC checksums are defined here once more, written
directly from their published definitions with nothing taken from
``flowplug.adapters.checksums`` (not even CRC-32: a bitwise CRC-32 from the reflected
polynomial 0xEDB88320, checked against the standard check value of b"123456789"):

* SciDAC (QIO ``lib/dml/dml_utils.c`` ``DML_checksum_accum``, Grid ``BinaryIO.h``;
  ``../shared/ensembles/README.md``): per site of global lexicographic rank r (x
  fastest), c = CRC-32 of the site's bytes as stored; suma ^= rotl32(c, r mod 29),
  sumb ^= rotl32(c, r mod 31).
* MILC v5 (``generic/io_lat4.c``: ``sum29 ^= (*val)<<rank29 | (*val)>>(32-rank29)``,
  rank29 = i mod 29, rank31 = i mod 31): per 32-bit word of global index i over the
  payload, read in the file's byte order; sum29 ^= rotl32(w, i mod 29),
  sum31 ^= rotl32(w, i mod 31).
* NERSC: sum modulo 2^32 of the stored 32-bit words in the file's byte order.

The payloads are small, in-repository and deliberately asymmetric (a linear
congruential byte stream; configurations whose every float differs), so a rotation in
the wrong direction, another site order or another word order changes the answer. The
hex constants were computed once with these reference functions and are pinned; the
reference functions themselves reproduce the checksums stored in the production files
of ``../shared/ensembles`` (MILC sum29=02352c05 sum31=d137321d, QIO suma=37affb9c
sumb=2fc07bbf, tmLQCD suma=35b49a1b sumb=b49a1b35, SIMULATeQCD NERSC ba83ff12), which
:func:`test_reference_definitions_reproduce_the_production_files` checks where that
folder exists.
"""

from __future__ import annotations

import contextlib
import re
import struct
import warnings

import numpy as np
import pytest
import torch

from flowplug import io
from flowplug.adapters.checksums import (
    milc_checksum,
    milc_checksum_reference,
    nersc_checksum,
    scidac_checksum,
    scidac_checksum_reference,
)
from flowplug.errors import ChecksumError

from _io_helpers import ensembles_dir

MASK = 0xFFFFFFFF

# ------------------------------------------------------------ reference definitions


def crc32_bitwise(data: bytes) -> int:
    """CRC-32 (ISO-HDLC, as zlib): reflected polynomial 0xEDB88320, init and final XOR 0xFFFFFFFF."""
    crc = MASK
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
    return crc ^ MASK


def rotl(value: int, shift: int) -> int:
    """Rotate a 32-bit word left: (v << s) | (v >> (32 - s)); s = 0 leaves it as it is."""
    shift %= 32
    return (((value << shift) & MASK) | (value >> (32 - shift))) if shift else value


def scidac_ref(payload: bytes, site_bytes: int) -> tuple[int, int]:
    suma = sumb = 0
    for r in range(len(payload) // site_bytes):
        c = crc32_bitwise(payload[r * site_bytes : (r + 1) * site_bytes])
        suma ^= rotl(c, r % 29)
        sumb ^= rotl(c, r % 31)
    return suma, sumb


def milc_ref(payload: bytes, endian: str) -> tuple[int, int]:
    s29 = s31 = 0
    for i, (w,) in enumerate(struct.iter_unpack(endian + "I", payload)):
        s29 ^= rotl(w, i % 29)
        s31 ^= rotl(w, i % 31)
    return s29, s31


def nersc_ref(payload: bytes, endian: str) -> int:
    return sum(w for (w,) in struct.iter_unpack(endian + "I", payload)) % 2**32


def byte_stream(n: int, seed: int) -> bytes:
    """n bytes of the LCG x <- (1103515245 x + 12345) mod 2^31, byte = bits 16..23."""
    x, out = seed, bytearray()
    for _ in range(n):
        x = (1103515245 * x + 12345) % 2**31
        out.append((x >> 16) & 0xFF)
    return bytes(out)


def test_reference_definitions_are_sound():
    assert crc32_bitwise(b"123456789") == 0xCBF43926  # the CRC-32 check value
    assert crc32_bitwise(b"") == 0
    assert rotl(0x80000001, 1) == 0x00000003 and rotl(0x80000001, 31) == 0xC0000000
    assert rotl(0x12345678, 0) == 0x12345678 and rotl(0x12345678, 4) == 0x23456781


# ------------------------------------------------------------ pinned raw payloads

# (sites, bytes per site, seed) -> (suma, sumb). 67 and 45 sites pass both moduli (and
# give classes of odd and even size); 7 sites stay below them (suma == sumb); the site
# sizes 24, 36, 10 and 288 take the uint64, uint32, uint16 and uint64 paths.
SCIDAC_KNOWN = {
    (67, 24, 1): (0xC9CCCB26, 0xD9156688),
    (45, 36, 2): (0x1B97088F, 0xEA1F7535),
    (7, 10, 3): (0x8A767466, 0x8A767466),
    (120, 288, 4): (0xF0E78CC4, 0xA6BF0FE9),
}

# (words, seed) -> {byte order: (sum29, sum31, nersc)}
WORDS_KNOWN = {
    (97, 5): {">": (0x308AB493, 0x07D0FC97, 0x276D6356), "<": (0x6ABE733A, 0x704A37B1, 0x83636AF8)},
    (2000, 6): {">": (0x3496AB7C, 0x8C853DB2, 0x85D81E61), "<": (0x5217B888, 0xF71FC0AE, 0x563DC98A)},
}


@pytest.mark.parametrize("key", list(SCIDAC_KNOWN))
def test_scidac_checksum_known_answers(key):
    nsites, site_bytes, seed = key
    payload = byte_stream(nsites * site_bytes, seed)
    assert scidac_ref(payload, site_bytes) == SCIDAC_KNOWN[key]
    assert scidac_checksum(payload, site_bytes) == SCIDAC_KNOWN[key]
    assert scidac_checksum_reference(payload, site_bytes) == SCIDAC_KNOWN[key]
    assert scidac_checksum(np.frombuffer(payload, dtype=np.uint8).copy(), site_bytes) == SCIDAC_KNOWN[key]


@pytest.mark.parametrize("key", list(WORDS_KNOWN))
@pytest.mark.parametrize("endian", [">", "<"])
def test_milc_and_nersc_checksums_known_answers(key, endian):
    nwords, seed = key
    payload = byte_stream(4 * nwords, seed)
    sum29, sum31, nsum = WORDS_KNOWN[key][endian]
    assert milc_ref(payload, endian) == (sum29, sum31)
    assert nersc_ref(payload, endian) == nsum
    assert milc_checksum(payload, endian) == (sum29, sum31)
    assert milc_checksum_reference(payload, endian) == (sum29, sum31)
    assert nersc_checksum(payload, endian) == nsum


# ------------------------------------------------------------ through the file formats

LATTICE = (2, 3, 4, 5)  # x, y, z, t: non-cubic, so a swapped axis changes the site order


def ildg_payload(precision: int) -> np.ndarray:
    """A configuration as the ILDG payload array, (lt, lz, ly, lx, mu, 3, 3) complex,
    every float different (8640 < 10007, a prime), with full mantissas:
    ((7919 k) mod 10007 - 5003) / 2501 (correctly rounded IEEE division, then rounded to
    float32 for ``precision`` 32)."""
    lx, ly, lz, lt = LATTICE
    n = lt * lz * ly * lx * 4 * 9
    k = np.arange(2 * n)
    f = (((7919 * k) % 10007) - 5003) / 2501.0
    z = f[0::2] + 1j * f[1::2]
    return z.astype(np.complex64 if precision == 32 else np.complex128).reshape(lt, lz, ly, lx, 4, 3, 3)


def canonical(payload: np.ndarray) -> torch.Tensor:
    """(lt, lz, ly, lx, mu, N, N) -> (1, mu, x, y, z, t, N, N), complex128 (DESIGN.md section 2)."""
    return torch.from_numpy(payload.astype(np.complex128).transpose(4, 3, 2, 1, 0, 5, 6).copy())[None]


def lime_records(data: bytes) -> dict[str, bytes]:
    """LIME records by type: 144-byte big-endian header (magic, version, flags, length, type)."""
    out, off = {}, 0
    while off < len(data):
        magic, _version, _flags, length = struct.unpack(">IHHQ", data[off : off + 16])
        assert magic == 0x456789AB
        kind = data[off + 16 : off + 144].rstrip(b"\0").decode()
        out[kind] = data[off + 144 : off + 144 + length]
        off += 144 + (length + 7) // 8 * 8
    return out


@contextlib.contextmanager
def quiet():
    """Silence the unitarity warnings: the links are deliberately not unitary."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# precision -> (suma, sumb) of ildg_payload(precision) as big-endian bytes, 288/576 bytes a site
ILDG_KNOWN = {32: (0x808B3D9B, 0x63D0BB2B), 64: (0xAE38EF5B, 0x6F1DD274)}
# (sum29, sum31) of the float32 payload in MILC files: the words are read in the file's
# byte order, so both byte orders give the same sums
MILC_KNOWN = {">": (0x1ED8F871, 0x5D80B77C), "<": (0x1ED8F871, 0x5D80B77C)}
# NERSC CHECKSUM of 3x3 big-endian files: precision -> value
NERSC_KNOWN = {32: 0xF8D5C6B6, 64: 0x5DEFC4A1}


@pytest.mark.parametrize("precision", [32, 64])
def test_ildg_writer_stores_the_known_scidac_checksum(precision, tmp_path):
    payload = ildg_payload(precision)
    stored = payload.astype(">c8" if precision == 32 else ">c16").tobytes()
    assert scidac_ref(stored, 4 * 9 * precision // 4) == ILDG_KNOWN[precision]
    path = tmp_path / "known.ildg"
    with quiet():
        io.write(path, io.Ensemble(canonical(payload), precision=precision), "ildg", precision=precision)
    recs = lime_records(path.read_bytes())
    assert recs["ildg-binary-data"] == stored  # x fastest, big-endian, links mu = x..t
    xml = recs["scidac-checksum"].decode()
    suma = int(re.search(r"<suma>\s*([0-9a-fA-F]+)\s*</suma>", xml).group(1), 16)
    sumb = int(re.search(r"<sumb>\s*([0-9a-fA-F]+)\s*</sumb>", xml).group(1), 16)
    assert (suma, sumb) == ILDG_KNOWN[precision]
    back = io.read(path, unitarity="ignore")
    assert torch.equal(back.links, canonical(payload))


def milc_file(payload: bytes, endian: str, sums: tuple[int, int]) -> bytes:
    """MILC v5: int32 magic 20103, int32 nx ny nz nt, char[64] time stamp, int32 order 0,
    uint32 sum29, sum31, in the writer's byte order; then the float32 payload."""
    head = struct.pack(endian + "5i", 20103, *LATTICE) + b"known-answer test".ljust(64, b"\0")
    return head + struct.pack(endian + "iII", 0, *sums) + payload


@pytest.mark.parametrize("endian", [">", "<"])
def test_milc_reader_accepts_the_known_checksums_only(endian, tmp_path):
    values = ildg_payload(32)
    payload = values.astype(endian + "c8").tobytes()
    assert milc_ref(payload, endian) == MILC_KNOWN[endian]
    path = tmp_path / "known.milc"
    path.write_bytes(milc_file(payload, endian, MILC_KNOWN[endian]))
    ens = io.read(path, "milc", unitarity="ignore")
    assert torch.equal(ens.links, canonical(values))
    # the sums of the other rotation direction (rotr) are refused
    s29 = s31 = 0
    for i, (w,) in enumerate(struct.iter_unpack(endian + "I", payload)):
        s29 ^= rotl(w, (32 - i % 29) % 32)
        s31 ^= rotl(w, (32 - i % 31) % 32)
    assert (s29, s31) != MILC_KNOWN[endian]
    path.write_bytes(milc_file(payload, endian, (s29, s31)))
    with pytest.raises(ChecksumError, match="sum29"):
        io.read(path, "milc", unitarity="ignore")


@pytest.mark.parametrize("precision", [32, 64])
def test_nersc_writer_stores_the_known_checksum(precision, tmp_path):
    payload = ildg_payload(precision)
    stored = payload.astype(">c8" if precision == 32 else ">c16").tobytes()
    assert nersc_ref(stored, ">") == NERSC_KNOWN[precision]
    path = tmp_path / "known.nersc"
    with quiet():
        io.write(path, io.Ensemble(canonical(payload), precision=precision), "nersc", precision=precision)
    data = path.read_bytes()
    end = data.index(b"END_HEADER\n") + len(b"END_HEADER\n")
    assert data[end:] == stored  # 3x3, IEEE big-endian, ILDG site order
    header = dict(line.split("=", 1) for line in data[:end].decode().splitlines() if "=" in line)
    header = {k.strip(): v.strip() for k, v in header.items()}
    assert header["DATATYPE"] == "4D_SU3_GAUGE_3x3"
    assert int(header["CHECKSUM"], 16) == NERSC_KNOWN[precision]


# ------------------------------------------------------------ production files


def test_reference_definitions_reproduce_the_production_files():
    """The definitions above give the checksums MILC, QIO, tmLQCD and SIMULATeQCD stored."""
    folder = ensembles_dir()  # skips with the reason when the files are absent
    data = (folder / "milc.lat.sample.l4444").read_bytes()
    endian = "<" if struct.unpack("<i", data[:4])[0] == 20103 else ">"
    assert struct.unpack(endian + "II", data[88:96]) == (0x02352C05, 0xD137321D)
    assert milc_ref(data[96:], endian) == (0x02352C05, 0xD137321D)
    recs = lime_records((folder / "milc.lat.sample.l4444.ildg").read_bytes())
    assert scidac_ref(recs["ildg-binary-data"], 288) == (0x37AFFB9C, 0x2FC07BBF)
    recs = lime_records((folder / "tmlqcd.unity.l4444.lime").read_bytes())
    assert scidac_ref(recs["ildg-binary-data"], 576) == (0x35B49A1B, 0xB49A1B35)
    data = (folder / "simulateqcd.lat.sample.l6666_nersc").read_bytes()
    end = data.index(b"END_HEADER\n") + len(b"END_HEADER\n")
    assert b"CHECKSUM = ba83ff12" in data[:end]
    assert nersc_ref(data[end:], ">") == 0xBA83FF12


@pytest.mark.parametrize("site_bytes", [12, 72, 576])
def test_scidac_checksum_fed_in_pieces_equals_the_definition(site_bytes):
    """The one-pass accumulator (classes mod 899 = 29 * 31) fed in uneven, unaligned pieces."""
    from flowplug.adapters.checksums import ScidacChecksum

    rng = np.random.default_rng(site_bytes)
    for nsites in (1, 28, 900, 2 * 899 + 31):
        payload = rng.integers(0, 256, nsites * site_bytes, dtype=np.uint8)
        expected = scidac_checksum_reference(payload.tobytes(), site_bytes)
        acc = ScidacChecksum(site_bytes)
        cuts = sorted(int(c) for c in rng.integers(0, nsites + 1, 4))
        start = 0
        for stop in [*cuts, nsites]:
            piece = np.empty((stop - start) * site_bytes + 1, dtype=np.uint8)[1:]  # unaligned
            piece[:] = payload[start * site_bytes : stop * site_bytes]
            acc.update(piece)
            start = stop
        assert acc.nsites == nsites
        assert acc.digest() == expected == scidac_checksum(payload, site_bytes)
    with pytest.raises(ValueError, match="not a whole number of"):
        ScidacChecksum(site_bytes).update(bytes(site_bytes + 1))
