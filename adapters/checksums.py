"""Checksums that lattice files carry: SciDAC (QIO/Grid), MILC sum29/sum31, NERSC word sum.

All three are computed on the payload bytes exactly as stored in the file, without
ever looping over sites in Python.

SciDAC checksum (QIO ``DML_checksum_accum``, Grid ``BinaryIO``)
    For every site with global lexicographic rank r (x fastest) let c_r be zlib's
    CRC-32 of the site's stored bytes. Then ``suma = XOR_r rotl32(c_r, r mod 29)`` and
    ``sumb = XOR_r rotl32(c_r, r mod 31)``.

    Fast evaluation. For a fixed length n, CRC-32 is affine over GF(2):
    ``crc(a XOR b) = crc(a) XOR crc(b) XOR crc(0^n)``, and a rotation is linear. Sites
    with the same ``r mod 29`` share one rotation, so

        XOR_{r = k mod 29} c_r = crc(X_k) XOR [(m_k + 1) mod 2] * crc(0^n),

    where X_k is the byte-wise XOR of the m_k sites of class k. The payload is
    therefore XOR-reduced into 29 (and 31) site-sized rows with numpy (memory-bandwidth
    bound), and only 29 + 31 CRC-32 calls are made, whatever the volume. The result is
    identical to the per-site definition (tests compare the two).

MILC v5 checksum (``io_lat4.c``)
    The payload as 32-bit words in the file's byte order, w_i with global word index i:
    ``sum29 = XOR_i rotl32(w_i, i mod 29)``, ``sum31 = XOR_i rotl32(w_i, i mod 31)``;
    evaluated with the same grouping (XOR-reduce by class, then rotate 29 + 31 words).

NERSC checksum
    Sum modulo 2^32 of the stored 32-bit words read in the file's byte order.
"""

from __future__ import annotations

import threading
import zlib
from typing import Literal, cast

import numpy as np

from flowplug import compiled

#: The byte-order codes numpy's stubs accept in ``dtype.newbyteorder``; the functions
#: here take the order as a plain ``str`` ("<" or ">") and pass it on through :func:`_in_order`.
_NumpyByteOrder = Literal["S", "<", "L", "little", ">", "B", "big", "=", "N", "native", "|", "I"]


def _in_order(dtype: type[np.generic] | str, byteorder: str) -> np.dtype:
    """``np.dtype(dtype).newbyteorder(byteorder)`` for a byte order held in a ``str``."""
    return np.dtype(dtype).newbyteorder(cast(_NumpyByteOrder, byteorder))


__all__ = [
    "ScidacChecksum",
    "scidac_checksum",
    "scidac_checksum_reference",
    "milc_checksum",
    "milc_checksum_reference",
    "nersc_checksum",
    "rotl32",
]


def rotl32(value: int, shift: int) -> int:
    """Rotate a 32-bit unsigned integer left by ``shift`` bits (0 <= shift < 32)."""
    value &= 0xFFFFFFFF
    shift %= 32
    return ((value << shift) | (value >> (32 - shift))) & 0xFFFFFFFF if shift else value


def _word_view(raw: np.ndarray, row_bytes: int) -> tuple[np.ndarray, int]:
    """View ``raw`` (uint8) as rows of the widest unsigned integers dividing ``row_bytes``."""
    for width, dtype in ((8, np.uint64), (4, np.uint32), (2, np.uint16), (1, np.uint8)):
        if row_bytes % width == 0 and raw.ctypes.data % width == 0:
            return raw.view(dtype).reshape(-1, row_bytes // width), width
    return raw.reshape(-1, row_bytes), 1  # pragma: no cover - uint8 always divides


def _xor_classes(rows: np.ndarray, modulus: int) -> np.ndarray:
    """XOR-reduce rows (n, w) into (modulus, w): row k = XOR of rows r with r mod modulus = k."""
    n, w = rows.shape
    full = (n // modulus) * modulus
    out = np.zeros((modulus, w), dtype=rows.dtype)
    if full:
        np.bitwise_xor.reduce(rows[:full].reshape(n // modulus, modulus, w), axis=0, out=out)
    rest = n - full
    if rest:
        out[:rest] ^= rows[full:]
    return out


def _as_uint8(data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return data.reshape(-1).view(np.uint8)
    return np.frombuffer(data, dtype=np.uint8)


#: Classes of the one-pass SciDAC reduction: 29 * 31, so that rank mod 899 fixes both
#: rank mod 29 and rank mod 31.
SCIDAC_CLASSES = 29 * 31


class ScidacChecksum:
    """The SciDAC checksum of a payload fed in pieces (see the module docstring).

    ``update`` XOR-reduces the sites it is given into 899 = 29 * 31 site-sized rows by
    rank mod 899 (one pass over the bytes, which can still be in cache from the read);
    ``digest`` reduces those rows to the 29 and 31 classes and takes 29 + 31 CRC-32s.
    The result equals :func:`scidac_checksum_reference` of the concatenated pieces.

    Pieces may also be fed out of order and from several threads at once with
    :meth:`update_at`, which names the rank of the piece's first site: each thread XORs
    into an accumulator of its own (numpy releases the GIL), and :meth:`digest` XORs
    those together (XOR is commutative, so the order does not matter). The digest is
    that of sites 0 .. ``nsites`` - 1, each of which must have been fed exactly once.

    Arguments:
        site_bytes: Bytes per site (4 links * N * N * 2 * 4 or 8).

    Raises:
        ValueError: from ``update``/``update_at``, on a piece that is not a whole number
            of sites or a negative first site.
    """

    def __init__(self, site_bytes: int) -> None:
        if site_bytes <= 0:
            raise ValueError(f"site_bytes must be positive; found {site_bytes}")
        self.site_bytes = int(site_bytes)
        self.nsites = 0
        self._lock = threading.Lock()
        #: One accumulator per feeding thread, (899, site_bytes) uint8: row j holds the XOR
        #: of the sites of rank r = j mod 899 that thread was given.
        self._accs: dict[int, np.ndarray] = {}

    def _own_accumulator(self) -> np.ndarray:
        key = threading.get_ident()
        acc = self._accs.get(key)
        if acc is None:
            with self._lock:
                acc = self._accs.setdefault(key, np.zeros((SCIDAC_CLASSES, self.site_bytes), dtype=np.uint8))
        return acc

    def update(self, data: bytes | np.ndarray) -> None:
        """Add the next sites, in file order (the stored bytes of a whole number of sites)."""
        self.update_at(data, self.nsites)

    def update_at(self, data: bytes | np.ndarray, first_site: int) -> None:
        """Add the sites of rank ``first_site``, ``first_site + 1``, ... (stored bytes of whole sites).

        Thread-safe: several threads may feed disjoint pieces at the same time, in any order.
        """
        raw = _as_uint8(data)
        if raw.size % self.site_bytes:
            raise ValueError(f"payload of {raw.size} bytes is not a whole number of {self.site_bytes}-byte sites")
        if first_site < 0:
            raise ValueError(f"first_site must be >= 0; found {first_site}")
        n = raw.size // self.site_bytes
        if n == 0:
            return
        if not compiled.xor_sites(raw, self._own_accumulator(), self.site_bytes, int(first_site)):
            self._xor_numpy(raw, int(first_site))
        with self._lock:
            self.nsites += n

    def _xor_numpy(self, raw: np.ndarray, first_site: int) -> None:
        """The reduction of :meth:`update_at` with numpy (without the compiled ``xor_sites``)."""
        rows, _ = _word_view(raw, self.site_bytes)
        n = rows.shape[0]
        acc = self._own_accumulator().view(rows.dtype)  # (899, words); np.zeros is aligned for any width
        k = first_site % SCIDAC_CLASSES
        head = min(n, (SCIDAC_CLASSES - k) % SCIDAC_CLASSES)
        if head:
            acc[k : k + head] ^= rows[:head]
        body = (n - head) // SCIDAC_CLASSES * SCIDAC_CLASSES
        for start in range(head, head + body, SCIDAC_CLASSES):  # in place: no temporaries
            np.bitwise_xor(acc, rows[start : start + SCIDAC_CLASSES], out=acc)
        tail = rows[head + body :]
        if len(tail):
            acc[: len(tail)] ^= tail

    def digest(self) -> tuple[int, int]:
        """``(suma, sumb)`` of everything fed so far, as Python ints in [0, 2^32)."""
        if self.nsites == 0:
            return 0, 0
        accs = list(self._accs.values())
        total = accs[0].copy()
        for acc in accs[1:]:
            np.bitwise_xor(total, acc, out=total)
        rows, _ = _word_view(total.reshape(-1), self.site_bytes)
        return _scidac_sums(rows, self.nsites, self.site_bytes)


def _scidac_sums(rows: np.ndarray, nsites: int, site_bytes: int) -> tuple[int, int]:
    """``(suma, sumb)`` from site rows whose row j holds the XOR of the sites of rank r = j mod
    (a multiple of 29 * 31, or every site in order): class k of modulus 29 (31) is the XOR
    of the rows j = k mod 29 (31)."""
    zero_crc = zlib.crc32(bytes(site_bytes))
    sums = []
    for modulus in (29, 31):
        classes = _xor_classes(rows, modulus)
        total = 0
        for k in range(min(modulus, nsites)):
            count = nsites // modulus + (1 if k < nsites % modulus else 0)
            crc = zlib.crc32(classes[k].tobytes())
            if count % 2 == 0:
                crc ^= zero_crc
            total ^= rotl32(crc, k)
        sums.append(total)
    return sums[0], sums[1]


def scidac_checksum(data: bytes | np.ndarray, site_bytes: int) -> tuple[int, int]:
    """SciDAC checksum ``(suma, sumb)`` of a payload, vectorised (see the module docstring).

    One pass over the payload (:class:`ScidacChecksum`), whatever the volume.

    Arguments:
        data: The payload exactly as stored (big-endian bytes), length V * site_bytes;
            bytes or a contiguous numpy array of any dtype (its raw bytes are used).
        site_bytes: Bytes per site (4 links * N * N * 2 * 4 or 8).

    Returns:
        ``(suma, sumb)`` as Python ints in [0, 2^32).

    Raises:
        ValueError: if the payload length is not a multiple of ``site_bytes``.

    References:
        QIO ``lib/dml/dml_utils.c`` (``DML_checksum_accum``); Grid ``BinaryIO.h``.
    """
    raw = _as_uint8(data)
    if site_bytes <= 0 or raw.size % site_bytes:
        raise ValueError(f"payload of {raw.size} bytes is not a whole number of {site_bytes}-byte sites")
    acc = ScidacChecksum(site_bytes)
    acc.update(raw)
    return acc.digest()


def scidac_checksum_reference(data: bytes, site_bytes: int) -> tuple[int, int]:
    """Per-site SciDAC checksum, literally as QIO defines it (slow; for tests).

    Arguments and result as :func:`scidac_checksum`.
    """
    raw = bytes(_as_uint8(data))
    suma = sumb = 0
    for r in range(len(raw) // site_bytes):
        c = zlib.crc32(raw[r * site_bytes : (r + 1) * site_bytes])
        suma ^= rotl32(c, r % 29)
        sumb ^= rotl32(c, r % 31)
    return suma, sumb


def milc_checksum(data: bytes | np.ndarray, byteorder: str) -> tuple[int, int]:
    """MILC v5 checksum ``(sum29, sum31)`` of a payload of 32-bit words, vectorised.

    Arguments:
        data: The stored payload (length a multiple of 4 bytes).
        byteorder: ``"<"`` or ``">"``: the file's byte order (words are read in it).

    Returns:
        ``(sum29, sum31)`` as Python ints.

    Raises:
        ValueError: if the length is not a multiple of 4.

    References:
        MILC ``generic/io_lat4.c`` (checksums accumulated per 32-bit word).
    """
    raw = _as_uint8(data)
    if raw.size % 4:
        raise ValueError(f"payload of {raw.size} bytes is not a whole number of 32-bit words")
    if raw.size == 0:
        return 0, 0
    words = np.frombuffer(raw.data, dtype=_in_order(np.uint32, byteorder)).astype(np.uint32)
    out = []
    for modulus in (29, 31):
        classes = _xor_classes(words.reshape(-1, 1), modulus)[:, 0]
        total = 0
        for k in range(min(modulus, words.size)):
            total ^= rotl32(int(classes[k]), k)
        out.append(total)
    return out[0], out[1]


def milc_checksum_reference(data: bytes, byteorder: str) -> tuple[int, int]:
    """Word-by-word MILC checksum (slow; for tests). Arguments as :func:`milc_checksum`."""
    words = np.frombuffer(bytes(_as_uint8(data)), dtype=_in_order(np.uint32, byteorder))
    s29 = s31 = 0
    for i, w in enumerate(words.tolist()):
        s29 ^= rotl32(w, i % 29)
        s31 ^= rotl32(w, i % 31)
    return s29, s31


def nersc_checksum(data: bytes | np.ndarray, byteorder: str) -> int:
    """NERSC checksum: sum mod 2^32 of the stored 32-bit words read in ``byteorder``.

    Arguments:
        data: The stored payload (length a multiple of 4 bytes).
        byteorder: ``"<"`` or ``">"``.

    Returns:
        The checksum as a Python int in [0, 2^32).

    References:
        NERSC archive format (Gauge Connection); Grid ``NerscIO.h``.
    """
    raw = _as_uint8(data)
    if raw.size % 4:
        raise ValueError(f"payload of {raw.size} bytes is not a whole number of 32-bit words")
    words = np.frombuffer(raw.data, dtype=_in_order(np.uint32, byteorder))
    return int(words.sum(dtype=np.uint64)) & 0xFFFFFFFF
