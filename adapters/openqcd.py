"""openQCD gauge configuration files: read and write.

Layout (openQCD ``modules/archive/archive.c``, ``export_cnfg``/``import_cnfg``),
little-endian throughout: int32 N0, N1, N2, N3 = lattice extents in directions
0 = t, 1 = x, 2 = y, 3 = z; float64 plaquette = average of Re tr U_P over the 6V
plaquettes, **not** divided by 3 (3 for the unit gauge); then, for the odd sites
only (x0 + x1 + x2 + x3 odd) taken in lexicographic order with x3 (z) fastest, the 8
double-precision SU(3) matrices U(x, 0), U(x - 0^, 0), U(x, 1), U(x - 1^, 1), ...,
U(x, 3), U(x - 3^, 3) (row-major, (re, im)). Every link is stored once. Size
24 + 576 V bytes. The extents must be even.

The stored plaquette is verified on read (there is no checksum).

Open boundary conditions in time (CLS ensembles): openQCD stores the time links
U(x, 0) at x0 = N0 - 1 as zero matrices. :func:`flowplug.io.read` marks such a
configuration ``header["boundary"] = "open"`` and leaves those links out of the
unitarity check. The stored plaquette needs no special case: ``export_cnfg`` divides
the plaquette sum by 6 N0 N1 N2 N3 for every boundary condition (openQCD 2.x
``archive.c``), and the time-like plaquettes at x0 = N0 - 1, which contain a zero link,
contribute 0 -- exactly what the plaquette of the stored field gives.

References:
    M. Luescher et al., openQCD 1.6, ``doc/gauge_action.pdf`` and ``archive.c``.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowplug.adapters.common import float_check, fmt_lattice, read_payload
from flowplug.errors import FormatError
from flowplug.gauge import plaquette
from flowplug.hookspecs import hookimpl
from flowplug.io import Ensemble, FormatHandler, Metadata
from flowplug.records import FileFormatSpec

HEADER = struct.Struct("<4id")
#: openQCD direction 0..3 (t, x, y, z) -> canonical direction (x, y, z, t = 0..3).
CANONICAL_DIR = (3, 0, 1, 2)
#: Absolute tolerance on the stored plaquette (3x normalisation).
PLAQ_TOL = 1e-10


def _odd_sites(lx: int, ly: int, lz: int, lt: int) -> tuple[np.ndarray, ...]:
    """Canonical coordinates (x, y, z, t) of the odd sites in openQCD's order (t slowest, z fastest)."""
    t, x, y, z = (a.reshape(-1) for a in np.indices((lt, lx, ly, lz)))
    odd = (t + x + y + z) % 2 == 1
    return x[odd], y[odd], z[odd], t[odd]


def _shift(coords: tuple[np.ndarray, ...], mu: int, lattice: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    out = list(coords)
    out[mu] = (out[mu] - 1) % lattice[mu]
    return tuple(out)


class OpenQcdHandler(FormatHandler):
    """openQCD reader/writer (SU(3), float64, even extents)."""

    name = "openqcd"
    fields = ("su3",)
    extension = "openqcd"
    precisions = (64,)

    def sniff(self, path: Path, head: bytes, size: int) -> int:
        """50 when the header's extents are even and positive and the size is 24 + 576 V."""
        if len(head) < HEADER.size:
            return 0
        *dims, _ = HEADER.unpack(head[: HEADER.size])
        if any(n <= 0 or n % 2 or n > 1 << 16 for n in dims):
            return 0
        return 50 if size == HEADER.size + 576 * math.prod(dims) else 0

    def read(self, path: Path, *, lattice=None, group=None, **options: Any) -> Ensemble:
        """Read an openQCD configuration; the stored plaquette is evaluated.

        Returns:
            One configuration, precision 64; ``meta[0].header["plaquette"]`` in the
            DESIGN.md normalisation (stored value / 3).

        Raises:
            FormatError: on odd or non-positive extents or a size other than 24 + 576 V.
        """
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(HEADER.size)
        if len(head) < HEADER.size:
            raise FormatError(f"{path}: openQCD header is {len(head)} of 24 bytes (truncated)")
        n0, n1, n2, n3, plaq3 = HEADER.unpack(head)
        dims = (n1, n2, n3, n0)  # x, y, z, t
        if any(n <= 0 or n % 2 for n in dims):
            raise FormatError(
                f"{path}: openQCD extents (t, x, y, z) = {(n0, n1, n2, n3)} must be positive "
                "and even (corrupt header, or not an openQCD file)"
            )
        vol = math.prod(dims)
        nbytes = 576 * vol
        if size - HEADER.size != nbytes:
            raise FormatError(
                f"{path}: openQCD data are {size - HEADER.size} bytes; lattice "
                f"{fmt_lattice(dims)} needs 576 V = {nbytes} (truncated file or wrong header)"
            )
        raw = read_payload(path, HEADER.size, nbytes, "openQCD data")
        data = raw.view("<c16").reshape(vol // 2, 4, 2, 3, 3)
        lx, ly, lz, lt = dims
        out = np.empty((1, 4, lx, ly, lz, lt, 3, 3), dtype=np.complex128)
        odd = _odd_sites(lx, ly, lz, lt)
        for d in range(4):
            mu = CANONICAL_DIR[d]
            out[0, mu][odd] = data[:, d, 0]
            out[0, mu][_shift(odd, mu, dims)] = data[:, d, 1]
        links = torch.from_numpy(out)
        found = float(plaquette(links)[0]) * 3 if torch.isfinite(torch.view_as_real(links)).all() else float("nan")
        check = float_check("openQCD plaquette", plaq3, found, PLAQ_TOL)
        meta = Metadata(
            format="openqcd",
            path=str(path),
            precision=64,
            header={"plaquette": plaq3 / 3, "openqcd_plaquette": plaq3},
            record_list=["openqcd-header (24 bytes)", f"odd-site links ({nbytes} bytes)"],
            checks=[check],
            provenance={"source": str(path), "format": "openqcd"},
        )
        return Ensemble(links, precision=64, meta=[meta])

    def can_write(self, ensemble: Ensemble) -> str | None:
        """As the base class, and the extents must be even."""
        reason = super().can_write(ensemble)
        if reason is None and any(n % 2 for n in ensemble.lattice):
            reason = f"openQCD needs even extents; the lattice is {fmt_lattice(ensemble.lattice)}"
        return reason

    def write(self, path: Path, ensemble: Ensemble, *, precision: int, **options: Any) -> None:
        """Write one SU(3) configuration as openQCD (always 64-bit: the format has no other).

        The canonical complex128 links are written as they are, whatever ``precision``
        says (32-bit data are already exact doubles; values that need more bits, such
        as a third row rebuilt from a two-row NERSC file, are kept), so reading back
        returns the same numbers. Open boundaries (zero time links at t = T-1) are
        written as such.
        """
        links = ensemble.links[0].detach().cpu().resolve_conj().numpy()
        lx, ly, lz, lt = ensemble.lattice
        odd = _odd_sites(lx, ly, lz, lt)
        data = np.empty((len(odd[0]), 4, 2, 3, 3), dtype="<c16")
        for d in range(4):
            mu = CANONICAL_DIR[d]
            data[:, d, 0] = links[mu][odd]
            data[:, d, 1] = links[mu][_shift(odd, mu, ensemble.lattice)]
        plaq3 = 3 * float(plaquette(torch.from_numpy(links[None]))[0])
        with open(path, "wb") as fh:
            fh.write(HEADER.pack(lt, lx, ly, lz, plaq3))
            fh.write(memoryview(data.reshape(-1).view(np.uint8)))  # type: ignore[arg-type]  # numpy's stubs give ndarray __buffer__ only for Python >= 3.12


@hookimpl
def flowplug_file_formats() -> list[FileFormatSpec]:
    """The openQCD format."""
    return [
        FileFormatSpec(
            name="openqcd",
            description="openQCD gauge configuration (64-bit, odd-site storage)",
            factory=OpenQcdHandler,
            extensions=("openqcd",),
            writable=True,
        )
    ]
