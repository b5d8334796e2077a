"""MILC native gauge files, version 5: read.

Header (96 bytes, in the writer's native byte order): int32 magic 20103 (the byte
order is detected from it), int32 dims[4] (nx, ny, nz, nt), char time_stamp[64],
int32 order, uint32 sum29, uint32 sum31. ``order == 0`` means sites in lexicographic
order (x fastest) with no site list; then per site the 4 links mu = x, y, z, t as
3 x 3 complex float32 matrices, row-major (the ILDG layout, in the header's byte order).
The checksums are verified (see :func:`flowplug.adapters.checksums.milc_checksum`).

References:
    MILC ``generic/io_lat4.c`` and ``include/io_lat.h`` (``gauge_header``, version 5).
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

from flowplug.adapters.checksums import milc_checksum
from flowplug.adapters.common import fmt_lattice, hex_check, ildg_to_canonical, read_payload
from flowplug.errors import FormatError
from flowplug.hookspecs import hookimpl
from flowplug.io import Ensemble, FormatHandler, Metadata, Record
from flowplug.records import FileFormatSpec

MILC_MAGIC = 20103
HEADER_BYTES = 96


def byte_order(head: bytes) -> str | None:
    """``"<"`` or ``">"`` if ``head`` starts with the MILC v5 magic number, else ``None``."""
    if len(head) < 4:
        return None
    if struct.unpack("<i", head[:4])[0] == MILC_MAGIC:
        return "<"
    if struct.unpack(">i", head[:4])[0] == MILC_MAGIC:
        return ">"
    return None


class MilcHandler(FormatHandler):
    """MILC v5 reader (SU(3), float32)."""

    name = "milc"
    fields = ("su3",)
    extension = "milc"

    def sniff(self, path: Path, head: bytes, size: int) -> int:
        """90 when the file starts with the MILC magic number 20103 in either byte order."""
        return 90 if byte_order(head) else 0

    def read(self, path: Path, *, lattice=None, group=None, **options: Any) -> Ensemble:
        """Read a MILC v5 file; sum29 and sum31 are evaluated.

        Returns:
            One configuration, precision 32; ``meta[0].header`` holds ``time_stamp``,
            ``order``, ``sum29``/``sum31`` (hex) and the byte order.

        Raises:
            FormatError: on a wrong magic number, non-positive dimensions, a site list
                (``order != 0``, not supported), or a size that does not match.
        """
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(HEADER_BYTES)
        order = byte_order(head)
        if order is None:
            raise FormatError(
                f"{path}: MILC magic 20103 expected in the first 4 bytes, found {head[:4].hex() or 'nothing'}"
            )
        if len(head) < HEADER_BYTES:
            raise FormatError(f"{path}: MILC header is {len(head)} of {HEADER_BYTES} bytes (truncated)")
        magic, nx, ny, nz, nt = struct.unpack(order + "5i", head[:20])
        stamp = head[20:84].split(b"\0", 1)[0].decode("ascii", errors="replace").strip()
        site_order, sum29, sum31 = struct.unpack(order + "iII", head[84:96])
        dims = (nx, ny, nz, nt)
        if any(n <= 0 for n in dims):
            raise FormatError(f"{path}: MILC dims {dims} must be positive (corrupt header)")
        if site_order != 0:
            raise FormatError(
                f"{path}: MILC order = {site_order}: files with a site list are not supported "
                "(only order 0, lexicographic)"
            )
        nbytes = math.prod(dims) * 4 * 18 * 4
        if size - HEADER_BYTES != nbytes:
            raise FormatError(
                f"{path}: MILC data are {size - HEADER_BYTES} bytes; lattice "
                f"{fmt_lattice(dims)} needs {nbytes} (truncated file or wrong dims)"
            )
        raw = read_payload(path, HEADER_BYTES, nbytes, "MILC data")
        f29, f31 = milc_checksum(raw, order)
        checks = [hex_check("MILC sum29", sum29, f29), hex_check("MILC sum31", sum31, f31)]
        links = ildg_to_canonical(raw, dims, 3, 32, order)
        header = {
            "time_stamp": stamp,
            "order": site_order,
            "sum29": f"{sum29:08x}",
            "sum31": f"{sum31:08x}",
            "byte_order": "little" if order == "<" else "big",
        }
        meta = Metadata(
            format="milc",
            path=str(path),
            precision=32,
            header=header,
            records=[Record("milc-header", head)],
            record_list=[f"milc-header ({HEADER_BYTES} bytes)", f"float32 data ({nbytes} bytes)"],
            checks=checks,
            provenance={"source": str(path), "format": "milc"},
        )
        return Ensemble(links, precision=32, meta=[meta])


@hookimpl
def flowplug_file_formats() -> list[FileFormatSpec]:
    """The MILC v5 format (read)."""
    return [
        FileFormatSpec(
            name="milc", description="MILC native v5 gauge file (read)", factory=MilcHandler, extensions=("milc",)
        )
    ]
