"""Optional adapter over lyncs-io (``pip install flowplug[lyncs]``): read LIME/ILDG and openQCD.

lyncs-io (Lyncs-API) reads lattice files into numpy arrays in the files' own layout.
It is used here as an independent second reader -- useful to cross-check flowplug's
own readers (the interoperability tests do) -- and never decides correctness:

* the released lyncs-io 0.2.3 imports only with numpy < 2.3; where it does not import,
  reading with ``format="lyncs"`` raises :class:`FormatError` saying so (the built-in
  ``ildg``/``lime``/``openqcd`` readers need no extra package);
* lyncs-io unpickles a ``lyncs-io-info`` record when it finds one; files holding such
  a record are refused before lyncs-io sees them (never unpickle untrusted data);
* lyncs-io verifies nothing: flowplug evaluates the file's SciDAC checksum (LIME) or
  plaquette (openQCD) itself, exactly as its own readers do.

The format is never chosen by detection (``sniff`` returns 0): ask for it with
``format="lyncs"`` (CLI ``--format lyncs``).

References:
    lyncs-io 0.2.3, ``lyncs_io/lime.py`` and ``lyncs_io/openqcd.py``.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowplug.adapters.checksums import scidac_checksum
from flowplug.adapters.common import float_check, hex_check
from flowplug.errors import FormatError
from flowplug.gauge import plaquette
from flowplug.hookspecs import hookimpl
from flowplug.io import Ensemble, FormatHandler, from_ildg
from flowplug.records import FileFormatSpec

#: LIME record type that lyncs-io unpickles.
PICKLED_RECORD = "lyncs-io-info"


def import_lyncs_io():
    """Import and return ``lyncs_io``.

    Raises:
        FormatError: if it cannot be imported, with the reason and the remedy.
    """
    try:
        import lyncs_io
    except Exception as exc:  # ImportError, or numpy >= 2.3 breaking its import
        raise FormatError(
            f"the lyncs format needs lyncs-io, which cannot be imported here ({type(exc).__name__}: "
            f"{str(exc)[:120]}). lyncs-io 0.2.3 needs numpy < 2.3: install 'flowplug[lyncs]' in an "
            "environment with numpy < 2.3, or read with the built-in formats (ildg, lime, openqcd)"
        ) from None
    return lyncs_io


class LyncsHandler(FormatHandler):
    """Read LIME/ILDG and openQCD files through lyncs-io (SU(3), 4D)."""

    name = "lyncs"
    fields = ("su3",)
    extension = "lime"

    def read(self, path: Path, *, lattice=None, group=None, **options: Any) -> Ensemble:
        """Read ``path`` with lyncs-io and convert it to the canonical layout.

        Raises:
            FormatError: if lyncs-io does not import, the file holds a pickled
                ``lyncs-io-info`` record, or lyncs-io fails on it.
        """
        from flowplug.adapters.lime import LIME_MAGIC, read_lime, scan

        with path.open("rb") as fh:
            head = fh.read(4)
        if len(head) < 4 or struct.unpack(">I", head)[0] != LIME_MAGIC:
            raise FormatError(
                f"{path}: the lyncs adapter reads LIME/ILDG files; this is not one (read "
                "openQCD and other files with their built-in formats)"
            )
        if any(r.type == PICKLED_RECORD for r in scan(path)):
            raise FormatError(
                f"{path}: holds a '{PICKLED_RECORD}' record, which lyncs-io would unpickle; "
                "refused (read it with format='ildg', which never unpickles)"
            )
        lyncs_io = import_lyncs_io()
        try:
            arr = np.asarray(lyncs_io.load(str(path), format="lime"))
        except Exception as exc:
            raise FormatError(f"{path}: lyncs-io could not read it ({type(exc).__name__}: {exc})") from None
        if arr.ndim != 7 or arr.shape[4:] != (4, 3, 3):
            raise FormatError(f"{path}: lyncs-io returned shape {arr.shape}, not (lt, lz, ly, lx, 4, 3, 3)")
        precision = 32 if arr.dtype.itemsize == 8 else 64
        raw = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder(">"))).reshape(-1).view(np.uint8)
        own = read_lime(path, lattice=lattice, group=group)  # records, header values, stored checksum
        links = np.ascontiguousarray(from_ildg(arr)).astype(np.complex128)[None]
        # every stored check is verified again on the data lyncs-io returned
        checks = []
        found = scidac_checksum(raw, 4 * 9 * precision // 4)
        for c in own.meta[0].checks:
            if isinstance(c.expected, str):  # the scidac-checksum suma and sumb (hex)
                value = found[0] if c.quantity.endswith("suma") else found[1]
                checks.append(hex_check(c.quantity, int(c.expected, 16), value))
            else:  # tmLQCD's xlf-info plaquette, the one float check of a LIME file
                plaq = float(plaquette(torch.from_numpy(links))[0])
                checks.append(float_check(c.quantity, c.expected, plaq, c.tolerance))
        meta = own.meta[0]
        meta.format, meta.checks = "lyncs", checks
        return Ensemble(torch.from_numpy(links), precision=precision, meta=[meta])


@hookimpl
def flowplug_file_formats() -> list[FileFormatSpec]:
    """The optional lyncs-io reader."""
    return [
        FileFormatSpec(
            name="lyncs",
            description="read LIME/ILDG through lyncs-io (optional; needs numpy < 2.3; never auto-detected)",
            factory=LyncsHandler,
        )
    ]
