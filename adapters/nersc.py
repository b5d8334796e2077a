"""NERSC (Gauge Connection) archive format: read and write.

File: an ASCII header of ``KEY = VALUE`` lines between ``BEGIN_HEADER`` and
``END_HEADER\\n``, then the links in ILDG site/link order (x fastest; per site mu = x,
y, z, t). ``DATATYPE`` is ``4D_SU3_GAUGE`` (two rows of each matrix stored, the third
is conj(row0 x row1)) or ``4D_SU3_GAUGE_3x3``; ``FLOATING_POINT`` is ``IEEE32BIG``,
``IEEE64BIG`` (big-endian) or ``IEEE32``/``IEEE64`` (little-endian; also read as
``IEEE32LITTLE``/``IEEE64LITTLE``, but never written so: Grid's reader does not accept
``IEEE32LITTLE``). Check values: ``CHECKSUM`` (sum mod 2^32 of the stored 32-bit words,
hex), ``PLAQUETTE`` (Re tr U_P / 3, 1 for the unit gauge) and ``LINK_TRACE``
(Re tr U / 3); all three are verified on read.

References:
    NERSC Gauge Connection archive format description; Grid ``NerscIO.h``;
    SIMULATeQCD ``src/gauge/gaugefield.cpp``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowplug.adapters.checksums import nersc_checksum
from flowplug.adapters.common import (
    canonical_to_ildg,
    complex_dtype,
    decimals_tolerance,
    float_check,
    fmt_lattice,
    hex_check,
    read_payload,
)
from flowplug.errors import FormatError
from flowplug.gauge import link_trace, plaquette
from flowplug.hookspecs import hookimpl
from flowplug.io import (
    Ensemble,
    FormatHandler,
    Metadata,
    Record,
    float32_exact,
    from_ildg,
    open_time_boundary,
)
from flowplug.records import FileFormatSpec

#: FLOATING_POINT value -> (bits, byte order).
FLOATING_POINT = {
    "IEEE32BIG": (32, ">"),
    "IEEE64BIG": (64, ">"),
    "IEEE32LITTLE": (32, "<"),
    "IEEE32": (32, "<"),
    "IEEE64LITTLE": (64, "<"),
    "IEEE64": (64, "<"),
}
#: FLOATING_POINT written for (bits, byte order): Grid's NERSC reader accepts IEEE32BIG,
#: IEEE32, IEEE64BIG, IEEE64 (newer versions also IEEE64LITTLE), not IEEE32LITTLE.
WRITE_FLOATING_POINT = {(32, ">"): "IEEE32BIG", (64, ">"): "IEEE64BIG", (32, "<"): "IEEE32", (64, "<"): "IEEE64"}
DATATYPES = {"4D_SU3_GAUGE": 2, "4D_SU3_GAUGE_3X3": 3}
MAX_HEADER = 64 * 1024


def parse_header(path: Path, head: bytes) -> tuple[dict[str, str], int, bytes]:
    """Parse the ASCII header at the start of ``head``.

    Returns:
        ``(keys, data_offset, header_bytes)``: upper-case keys to stripped values, the
        offset of the first data byte, the header verbatim.

    Raises:
        FormatError: if ``BEGIN_HEADER`` or ``END_HEADER`` is missing.
    """
    if not head.lstrip().startswith(b"BEGIN_HEADER"):
        raise FormatError(f"{path}: NERSC header must start with BEGIN_HEADER; found {head[:20]!r}")
    end = head.find(b"END_HEADER")
    if end < 0:
        raise FormatError(
            f"{path}: no END_HEADER in the first {min(len(head), MAX_HEADER)} bytes (truncated or not a NERSC file)"
        )
    nl = head.find(b"\n", end)
    if nl < 0:
        raise FormatError(f"{path}: END_HEADER is not followed by a newline (truncated file)")
    text = head[:end].decode("ascii", errors="replace")
    keys: dict[str, str] = {}
    for line in text.splitlines()[1:]:
        if "=" in line:
            k, v = line.split("=", 1)
            keys[k.strip().upper()] = v.strip()
    return keys, nl + 1, head[: nl + 1]


def _int_key(path: Path, keys: dict[str, str], key: str) -> int:
    if key not in keys:
        raise FormatError(f"{path}: NERSC header lacks {key}")
    try:
        value = int(keys[key])
    except ValueError:
        raise FormatError(f"{path}: NERSC header {key} = {keys[key][:30]!r} is not an integer") from None
    if value <= 0:
        raise FormatError(f"{path}: NERSC header {key} = {value}; extents must be positive")
    return value


def reconstruct_third_row(m: np.ndarray) -> np.ndarray:
    """Complete two stored rows (..., 2, 3) of SU(3) matrices with row2 = conj(row0 x row1).

    Returns:
        Shape (..., 3, 3), complex128.
    """
    r0, r1 = m[..., 0, :], m[..., 1, :]
    r2 = np.conj(
        np.stack(
            [
                r0[..., 1] * r1[..., 2] - r0[..., 2] * r1[..., 1],
                r0[..., 2] * r1[..., 0] - r0[..., 0] * r1[..., 2],
                r0[..., 0] * r1[..., 1] - r0[..., 1] * r1[..., 0],
            ],
            axis=-1,
        )
    )
    return np.concatenate([m, r2[..., None, :]], axis=-2)


class NerscHandler(FormatHandler):
    """NERSC reader/writer (SU(3) links, 4D)."""

    name = "nersc"
    fields = ("su3",)
    extension = "nersc"

    def sniff(self, path: Path, head: bytes, size: int) -> int:
        """100 when the file starts with ``BEGIN_HEADER``."""
        return 100 if head.lstrip()[:12] == b"BEGIN_HEADER" else 0

    def read(self, path: Path, *, lattice=None, group=None, **options: Any) -> Ensemble:
        """Read a NERSC file; CHECKSUM, PLAQUETTE and LINK_TRACE are evaluated.

        Returns:
            One configuration; ``meta[0].header`` holds ``plaquette``, ``link_trace``,
            ``ensemble_id``, ``trajectory`` (SEQUENCE_NUMBER), ``beta`` where present and
            every key under ``nersc``; ``records`` holds the header verbatim.

        Raises:
            FormatError: on a malformed header, unknown DATATYPE/FLOATING_POINT, or a
                data length that does not match the dimensions.
        """
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(MAX_HEADER)
        keys, offset, header_bytes = parse_header(path, head)
        dims = tuple(_int_key(path, keys, f"DIMENSION_{i}") for i in range(1, 5))
        dt = keys.get("DATATYPE", "").upper()
        if dt not in DATATYPES:
            raise FormatError(
                f"{path}: NERSC DATATYPE {keys.get('DATATYPE')!r} is not supported; "
                "expected 4D_SU3_GAUGE or 4D_SU3_GAUGE_3x3"
            )
        rows = DATATYPES[dt]
        fp = keys.get("FLOATING_POINT", "").upper()
        if fp not in FLOATING_POINT:
            raise FormatError(
                f"{path}: NERSC FLOATING_POINT {keys.get('FLOATING_POINT')!r} is not one of {', '.join(FLOATING_POINT)}"
            )
        precision, order = FLOATING_POINT[fp]
        vol = math.prod(dims)
        nbytes = vol * 4 * rows * 3 * 2 * precision // 8
        if size - offset != nbytes:
            raise FormatError(
                f"{path}: NERSC data are {size - offset} bytes after the header; "
                f"{fmt_lattice(dims)} {dt} {fp} needs {nbytes} (truncated file or wrong "
                "DIMENSION_*)"
            )
        raw = read_payload(path, offset, nbytes, "NERSC data")
        checks = []
        if "CHECKSUM" in keys:
            try:
                expected = int(keys["CHECKSUM"].strip(), 16)
            except ValueError:
                raise FormatError(f"{path}: NERSC CHECKSUM {keys['CHECKSUM'][:20]!r} is not hex") from None
            checks.append(hex_check("CHECKSUM", expected, nersc_checksum(raw, order)))
        lx, ly, lz, lt = dims
        cdt = complex_dtype(precision, order)
        arr = raw.view(cdt).reshape(lt, lz, ly, lx, 4, rows, 3).astype(np.complex128)
        if rows == 2:
            arr = reconstruct_third_row(arr)
        links = torch.from_numpy(np.ascontiguousarray(from_ildg(arr))[None])
        header: dict[str, Any] = {"nersc": dict(keys), "nersc_datatype": dt, "nersc_floating_point": fp}
        floor = 1e-5 if precision == 32 else 1e-9
        for key, std, fn in (("PLAQUETTE", "plaquette", plaquette), ("LINK_TRACE", "link_trace", link_trace)):
            if key in keys:
                try:
                    stored = float(keys[key])
                except ValueError:
                    raise FormatError(f"{path}: NERSC {key} {keys[key][:30]!r} is not a number") from None
                header[std] = stored
                if torch.isfinite(torch.view_as_real(links)).all():
                    found = float(fn(links)[0])
                else:
                    found = float("nan")
                checks.append(float_check(key, stored, found, decimals_tolerance(keys[key], floor)))
        if "ENSEMBLE_ID" in keys:
            header["ensemble_id"] = keys["ENSEMBLE_ID"]
        if "SEQUENCE_NUMBER" in keys:
            try:
                header["trajectory"] = int(keys["SEQUENCE_NUMBER"])
            except ValueError:
                header["trajectory"] = keys["SEQUENCE_NUMBER"]
        if "BETA" in keys:
            try:
                header["beta"] = float(keys["BETA"])
            except ValueError:
                pass
        meta = Metadata(
            format="nersc",
            path=str(path),
            precision=precision,
            header=header,
            records=[Record("nersc-header", header_bytes)],
            record_list=[f"nersc-header ({offset} bytes)", f"{dt} data ({nbytes} bytes)"],
            checks=checks,
            provenance={"source": str(path), "format": "nersc"},
        )
        return Ensemble(links, precision=precision, meta=[meta])

    def _layout(
        self, ensemble: Ensemble, precision: int, datatype: str | None, endian: str | None
    ) -> tuple[str, int, str, str]:
        """``(DATATYPE, rows stored, byte order, FLOATING_POINT)`` of a write."""
        src = ensemble.meta[0].header if "nersc_datatype" in ensemble.meta[0].header else {}
        dt = (datatype or src.get("nersc_datatype") or "4D_SU3_GAUGE_3x3").upper()
        if dt not in DATATYPES:
            raise FormatError(f"NERSC datatype {datatype!r}: expected 4D_SU3_GAUGE or 4D_SU3_GAUGE_3x3")
        if endian is None:
            endian = "little" if FLOATING_POINT.get(src.get("nersc_floating_point", ""), (0, ">"))[1] == "<" else "big"
        if endian not in ("big", "little"):
            raise FormatError(f"NERSC endian {endian!r}: expected big or little")
        order = ">" if endian == "big" else "<"
        return dt, DATATYPES[dt], order, WRITE_FLOATING_POINT[(precision, order)]

    def rounds(
        self,
        ensemble: Ensemble,
        precision: int,
        *,
        datatype: str | None = None,
        endian: str | None = None,
        **options: Any,
    ) -> bool:
        """Whether a 32-bit write rounds a stored value (two-row files store rows 0 and 1 only)."""
        if precision != 32:
            return False
        _, rows, _, _ = self._layout(ensemble, precision, datatype, endian)
        return not float32_exact(ensemble.links[..., :rows, :])

    def write(
        self,
        path: Path,
        ensemble: Ensemble,
        *,
        precision: int,
        datatype: str | None = None,
        endian: str | None = None,
        **options: Any,
    ) -> None:
        """Write one SU(3) configuration as NERSC.

        Arguments:
            precision: 32 (IEEE32BIG / IEEE32) or 64 (IEEE64BIG / IEEE64).
            datatype: ``4D_SU3_GAUGE_3x3`` (default, exact) or ``4D_SU3_GAUGE`` (two rows;
                the default when the source was a two-row NERSC file).
            endian: ``big`` (default, IEEE32BIG/IEEE64BIG) or ``little`` (written as
                IEEE32/IEEE64, the names Grid's reader accepts); default the source's
                byte order when it was NERSC (also after a trip through HDF5).

        The header's PLAQUETTE and LINK_TRACE are computed from the data as stored (after
        rounding to ``precision`` and, for two rows, reconstruction), CHECKSUM from the
        bytes. ``BOUNDARY_4`` is ``OPEN`` for a configuration with open boundaries in time
        (zero time links at t = T-1); otherwise every ``BOUNDARY_i`` is the source's, or
        ``PERIODIC``. The source's other header lines (``ENSEMBLE_ID``, ``ENSEMBLE_LABEL``,
        ``SEQUENCE_NUMBER``, ``CREATOR``, ``CREATOR_MACHINE``, ``CREATION_DATE``,
        ``ARCHIVE_DATE``, ``BETA``, ...) are kept; for other sources ``ensemble_id``,
        ``trajectory`` and ``beta`` of the header fill them.
        """
        dt, rows, order, fp = self._layout(ensemble, precision, datatype, endian)
        stored = canonical_to_ildg(ensemble.links[0], precision, order)
        if rows == 2:
            stored = np.ascontiguousarray(stored[..., :2, :])
        # check values from exactly what a reader will see
        seen = stored.astype(np.complex128)
        if rows == 2:
            seen = reconstruct_third_row(seen)
        seen_t = torch.from_numpy(np.ascontiguousarray(from_ildg(seen))[None])
        plaq, trace = float(plaquette(seen_t)[0]), float(link_trace(seen_t)[0])
        csum = nersc_checksum(stored.reshape(-1).view(np.uint8), order)
        text = header_text(
            ensemble, dt, fp, plaq=plaq, trace=trace, checksum=csum, open_time=open_time_boundary(seen_t)[0]
        )
        with open(path, "wb") as fh:
            fh.write(text)
            fh.write(memoryview(stored.reshape(-1).view(np.uint8)))  # type: ignore[arg-type]  # numpy's stubs give ndarray __buffer__ only for Python >= 3.12


#: Header keys the writer computes itself; every other key of a NERSC source is kept.
COMPUTED_KEYS = frozenset(
    {
        "HDR_VERSION",
        "DATATYPE",
        "STORAGE_FORMAT",
        "DIMENSION_1",
        "DIMENSION_2",
        "DIMENSION_3",
        "DIMENSION_4",
        "LINK_TRACE",
        "PLAQUETTE",
        "CHECKSUM",
        "FLOATING_POINT",
        "BOUNDARY_1",
        "BOUNDARY_2",
        "BOUNDARY_3",
        "BOUNDARY_4",
    }
)
#: Descriptive keys, written in this order (defaults where the source has none).
DESCRIPTIVE_KEYS = (
    "ENSEMBLE_ID",
    "ENSEMBLE_LABEL",
    "SEQUENCE_NUMBER",
    "CREATOR",
    "CREATOR_MACHINE",
    "CREATOR_HARDWARE",
    "CREATION_DATE",
    "ARCHIVE_DATE",
    "BETA",
)


def format_number(value: Any) -> str | None:
    """A header number as NERSC files write it: ``5.7``, ``6``, ``1e-05``; ``None`` if not a number.

    Floats use the shortest text that reads back to the same double; strings are
    kept as written when they parse as a number (never quoted).
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return repr(float(value)) if math.isfinite(value) else None
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return None
    return text if math.isfinite(number) else None


def _header_value(value: Any) -> str:
    """A header value on one line (newlines and ``=`` cannot be parsed back)."""
    return " ".join(str(value).replace("=", " ").split())


def header_text(
    ensemble: Ensemble, datatype: str, fp: str, *, plaq: float, trace: float, checksum: int, open_time: bool
) -> bytes:
    """The ASCII header (``BEGIN_HEADER`` ... ``END_HEADER\\n``) of one configuration."""
    meta = ensemble.meta[0]
    source = meta.header.get("nersc")
    old: dict[str, str] = dict(source) if isinstance(source, dict) else {}
    lx, ly, lz, lt = ensemble.lattice
    boundary = [old.get(f"BOUNDARY_{i}", "PERIODIC") for i in range(1, 5)]
    if open_time:
        boundary[3] = "OPEN"
    lines = [
        "BEGIN_HEADER",
        "HDR_VERSION = 1.0",
        f"DATATYPE = {'4D_SU3_GAUGE_3x3' if DATATYPES[datatype] == 3 else '4D_SU3_GAUGE'}",
        "STORAGE_FORMAT = 1.0",
        f"DIMENSION_1 = {lx}",
        f"DIMENSION_2 = {ly}",
        f"DIMENSION_3 = {lz}",
        f"DIMENSION_4 = {lt}",
        f"LINK_TRACE = {trace:.12f}",
        f"PLAQUETTE = {plaq:.12f}",
        *[f"BOUNDARY_{i} = {_header_value(b)}" for i, b in enumerate(boundary, 1)],
        f"CHECKSUM = {checksum:08x}",
    ]
    fallback = {
        "ENSEMBLE_ID": meta.header.get("ensemble_id", "flowplug"),
        "ENSEMBLE_LABEL": "flowplug",
        "SEQUENCE_NUMBER": format_number(meta.header.get("trajectory")) or "0",
        "CREATOR": "flowplug",
        "BETA": format_number(meta.header.get("beta")),
    }
    for key in DESCRIPTIVE_KEYS:
        value = old.get(key, fallback.get(key))
        if key == "BETA" and value is not None:
            value = format_number(value)
        if value is not None and _header_value(value):
            lines.append(f"{key} = {_header_value(value)}")
    for key, value in old.items():  # anything else the source header had, in its order
        if key not in COMPUTED_KEYS and key not in DESCRIPTIVE_KEYS and key.replace("_", "").isalnum():
            lines.append(f"{key} = {_header_value(value)}")
    lines += [f"FLOATING_POINT = {fp}", "END_HEADER", ""]
    return "\n".join(lines).encode("ascii", errors="replace")


@hookimpl
def flowplug_file_formats() -> list[FileFormatSpec]:
    """The NERSC format."""
    return [
        FileFormatSpec(
            name="nersc",
            description="NERSC archive (4D_SU3_GAUGE two-row and 3x3; 32/64-bit; big/little endian)",
            factory=NerscHandler,
            extensions=("nersc", "cfg"),
            writable=True,
        )
    ]
