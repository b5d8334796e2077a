r"""Ensembles of configurations as training data (forward-KL training, ``train.ensemble``).

:func:`load_ensemble` reads configurations from ``.pt`` files, HDF5 files of scalar
fields, or any lattice file format a plugin adapter reads (through :func:`flowplug.io.read`),
and returns them as one batch in the canonical layout (DESIGN.md section 2), checked
against the field kind and lattice of the flow they will train.

Public API: :func:`load_ensemble`.
"""

from __future__ import annotations

import glob
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from flowplug.errors import ConfigError
from flowplug.flow import check_field
from flowplug.theory import field_space


def load_ensemble(
    source: str | Sequence[str], *, field: str, lattice: Sequence[int], format: str | None = None
) -> torch.Tensor:
    r"""Read configurations for forward-KL training, in the canonical layout.

    Arguments:
        source: A path, a glob pattern, or a list of them. ``.pt`` files hold a tensor
            (or a dict with key ``"configs"``) read with ``torch.load(weights_only=True)``;
            ``.h5``/``.hdf5`` files of site fields (``scalar``, ``o2``: kinds whose
            record is not ``gauge``) hold a dataset ``configs`` (or a
            single dataset) of shape (B, L...); every other file goes through
            :func:`flowplug.io.read` (ILDG, SciDAC, NERSC, openQCD, HDF5 ensembles...).
            A single configuration (no batch axis) counts as a batch of one.
        field: Field kind the flow produces (``"scalar"``, ``"u1"``, ``"su3"``...).
        lattice: Lattice the flow is built for, (L_0, ..., L_{d-1}).
        format: Force a file-format name for :func:`flowplug.io.read`.

    Returns:
        Configurations of all files in order, shape (B, L_0, ...) for scalars or
        (B, d, L_0, ..., [N, N]) for gauge links; float64, or complex128 for SU(N).

    Raises:
        ConfigError: if nothing matches ``source``, or a file holds no tensor.
        ShapeError: if the configurations do not fit ``field`` and ``lattice``.
        FormatError: from the format adapters.
    """
    try:
        space = field_space(field)
    except ConfigError:
        space = None  # a kind no plugin registers: read as given, checked by check_field
    gauge = space is None or bool(space.gauge)
    patterns = [source] if isinstance(source, str) else list(source)
    paths: list[str] = []
    for pat in patterns:
        hits = sorted(glob.glob(str(pat)))
        paths.extend(hits if hits else ([str(pat)] if Path(pat).exists() else []))
    if not paths:
        raise ConfigError(f"train.ensemble: no file matches {source!r}")
    chunks = []
    for p in paths:
        suffix = Path(p).suffix.lower()
        if suffix == ".pt":
            obj = torch.load(p, map_location="cpu", weights_only=True)
            t = obj["configs"] if isinstance(obj, Mapping) else obj
        elif suffix in (".h5", ".hdf5") and not gauge:
            import h5py

            with h5py.File(p, "r") as fh:
                names = [k for k in fh if isinstance(fh[k], h5py.Dataset)]
                key = "configs" if "configs" in names else (names[0] if len(names) == 1 else None)
                if key is None:
                    raise ConfigError(f"{p}: expected a dataset 'configs'; found {names}")
                t = torch.from_numpy(np.asarray(fh[key]))
        else:
            try:
                from flowplug import io as _io
            except ImportError:  # pragma: no cover - io module not present
                raise ConfigError(f"{p}: reading lattice files needs flowplug.io; give a .pt or .h5 file") from None
            group = field if gauge else None
            t = _io.read(p, format or None, lattice=list(lattice), group=group).links
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"{p}: expected a tensor of configurations; found {type(t).__name__}")
        t = t.to(torch.complex128 if t.is_complex() else torch.float64)
        one = (
            len(space.shape(tuple(lattice), 1)) - 1
            if space is not None
            else len(lattice) + 1 + (2 if t.is_complex() else 0)
        )
        if t.dim() == one:
            t = t.unsqueeze(0)
        chunks.append(t)
    data = torch.cat(chunks)
    holder = type("L", (), {"field": field, "lattice": tuple(lattice)})
    check_field(holder, data)  # type: ignore[arg-type]
    return data
