"""Reading and writing lattice files: the in-memory :class:`Ensemble` and format dispatch.

Everything format-specific lives in the file-format plugins (``flowplug.adapters`` and
third-party packages, hook ``flowplug_file_formats``); this module finds the right one,
calls it, and applies the checks every read shares.

Quick use::

    from flowplug import io

    ens = io.read("milc.lat.sample.l4444.ildg")       # format detected from content
    ens.links.shape          # torch.Size([1, 4, 4, 4, 4, 4, 3, 3]), complex128
    ens.lattice, ens.group, ens.precision              # (4, 4, 4, 4), 'su3', 32
    ens.meta[0].header["plaquette"]                   # header values, when present
    io.write("out.ildg", ens)                           # 32-bit again, bit-exact
    io.write("ensemble.h5", ens, append=True)          # HDF5 ensemble store

Canonical layout (DESIGN.md section 2): SU(N) links ``(B, d, L_0, ..., L_{d-1}, N, N)``
complex128, direction mu = x, y, z, t = array axis 1 index 0..3, lattice axes x first;
U(1) links ``(B, d, L_0, ..., L_{d-1})`` float64 angles. Files store other layouts
(ILDG: ``(lt, lz, ly, lx, mu, N, N)`` big-endian); adapters permute at the boundary.

Reads are exact: 32-bit data widened to complex128 keeps every bit, and
``Ensemble.precision`` remembers the file's precision, so writing back (default
precision = the source's) reproduces the stored numbers bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from flowplug.errors import (
    ChecksumError,
    FlowplugError,
    FormatError,
    NonUnitaryWarning,
    PrecisionLossWarning,
    ShapeError,
)

__all__ = [
    "Record",
    "Check",
    "Metadata",
    "Ensemble",
    "FormatHandler",
    "formats",
    "get_format",
    "detect",
    "read",
    "write",
    "parse_lattice",
    "group_of",
    "unitarity_tolerance",
    "check_links",
    "group_deviation",
    "link_deviations",
    "open_time_boundary",
    "float32_exact",
]

#: Bytes read from the start of a file for content detection.
SNIFF_BYTES = 4096


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Record:
    """One metadata record of a file, verbatim (an XML record of a LIME file, a header).

    Attributes:
        type: Record type as the file names it (``scidac-file-xml``, ``ildg-data-lfn``,
            ``xlf-info``, ``nersc-header``, ...).
        data: The record's bytes exactly as stored (including a trailing NUL if any).
    """

    type: str
    data: bytes

    @property
    def text(self) -> str:
        """The data decoded as UTF-8 (invalid bytes replaced), trailing NULs removed."""
        return self.data.rstrip(b"\0").decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Check:
    """The outcome of verifying one stored check value against the data.

    Attributes:
        quantity: What was checked (``scidac-checksum suma``, ``CHECKSUM``, ``PLAQUETTE``...).
        expected: The value the file stores (hex string for checksums, float otherwise).
        found: The value computed from the data, same type as ``expected``.
        ok: Whether they agree (exactly for checksums, within ``tolerance`` otherwise).
        tolerance: Absolute tolerance used for floating-point values (0 for checksums).
    """

    quantity: str
    expected: Any
    found: Any
    ok: bool
    tolerance: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dataclasses.asdict(self)


@dataclass
class Metadata:
    """Everything known about one configuration besides its links.

    Attributes:
        format: Registry name of the format it was read from (``ildg``, ``nersc``...),
            or ``None`` for data made in memory.
        path: File it was read from, or ``None``.
        precision: Storage precision in bits of the source (32 or 64).
        header: Header values under standard names where the file has them:
            ``plaquette`` (DESIGN.md normalisation: Re tr U_P / N, 1 for unit gauge),
            ``link_trace`` (Re tr U / N), ``beta``, ``trajectory``, ``ensemble_id``,
            ``lfn`` (ILDG logical file name), ``boundary`` (``"open"`` for open
            boundary conditions in time), plus format-specific keys as found.
        records: The file's metadata records verbatim (XML records, NERSC header...),
            in file order; writers reuse those the target can hold.
        record_list: Human-readable list of every record of the file with its length
            (for ``flowplug info``), including binary payloads.
        checks: Outcome of every check value the file carries (see :class:`Check`).
        provenance: Free-form JSON-able history: source path and format, conversion
            steps, generating run (HMC parameters, flow model...). Carried by HDF5.
    """

    format: str | None = None
    path: str | None = None
    precision: int = 64
    header: dict[str, Any] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)
    record_list: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    def record(self, type_: str) -> Record | None:
        """The first record of the given type, or ``None``."""
        for rec in self.records:
            if rec.type == type_:
                return rec
        return None

    @property
    def checksum_status(self) -> str:
        """``"ok"`` (every check passed), ``"mismatch"`` (one failed) or ``"absent"`` (none)."""
        if not self.checks:
            return "absent"
        return "ok" if all(c.ok for c in self.checks) else "mismatch"

    def copy(self) -> "Metadata":
        """A deep-enough copy (dicts and lists copied; records are immutable)."""
        return Metadata(self.format, self.path, self.precision, dict(self.header),
                        list(self.records), list(self.record_list), list(self.checks),
                        _deepcopy_json(self.provenance))


def _deepcopy_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deepcopy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deepcopy_json(v) for v in value]
    return value


# ---------------------------------------------------------------------------- ensemble


def group_of(links: torch.Tensor) -> str:
    """Gauge group name of a canonical link tensor: ``su<N>`` for complex, ``u1`` for real.

    Raises:
        ShapeError: if the tensor has fewer than 3 axes or a non-square colour block.
    """
    if links.dim() < 3:
        raise ShapeError(f"links need at least (B, d, L_0) axes; found shape {tuple(links.shape)}")
    if links.is_complex():
        if links.dim() < 5 or links.shape[-1] != links.shape[-2]:
            raise ShapeError(f"SU(N) links need shape (B, d, L..., N, N); found {tuple(links.shape)}")
        return f"su{links.shape[-1]}"
    return "u1"


class Ensemble:
    """A batch of gauge configurations in the canonical layout, with per-configuration metadata.

    One file of a single-configuration format (ILDG, NERSC, MILC, openQCD) reads as an
    ensemble of one (B = 1); an HDF5 ensemble store holds any number.

    Arguments:
        links: SU(N) links, shape (B, d, L_0, ..., L_{d-1}, N, N), complex128, or U(1)
            link angles, shape (B, d, L_0, ..., L_{d-1}), float64; x-first lattice axes,
            direction mu = x, y, z, t. Other float/complex dtypes are widened.
        precision: Storage precision in bits (32 or 64) that writers use by default.
        meta: One :class:`Metadata` per configuration (default: empty ones).
        attrs: Ensemble-wide JSON-able values (``beta``, ``ensemble_id``, action
            parameters...); HDF5 stores them as file attributes.

    Attributes:
        links: As above (a ``torch.Tensor`` on the CPU).
        group: ``su3``, ``su2`` (``su<N>``) or ``u1``.
        precision, meta, attrs: As above.

    Raises:
        ShapeError: on a malformed tensor or a ``meta`` list of the wrong length.

    Example::

        ens = Ensemble(torch.eye(3, dtype=torch.complex128).expand(2, 4, 4, 4, 4, 8, 3, 3))
        ens.lattice   # (4, 4, 4, 8)
        ens[1]        # the second configuration, an Ensemble of one
    """

    def __init__(self, links: torch.Tensor | np.ndarray, *, precision: int = 64,
                 meta: Sequence[Metadata] | None = None, attrs: Mapping[str, Any] | None = None) -> None:
        if isinstance(links, np.ndarray):
            links = torch.from_numpy(np.ascontiguousarray(links))
        if not isinstance(links, torch.Tensor):
            raise ShapeError(f"links must be a torch tensor or numpy array; found {type(links).__name__}")
        if links.is_complex():
            links = links.to(torch.complex128)
        elif links.is_floating_point():
            links = links.to(torch.float64)
        else:
            raise ShapeError(f"links must be complex (SU(N)) or real angles (U(1)); found {links.dtype}")
        self.group = group_of(links)
        d = links.shape[1]
        expected_dim = d + (4 if self.group != "u1" else 2)
        if links.dim() != expected_dim:
            raise ShapeError(f"{self.group} links with d = {d} directions need {expected_dim} axes "
                             f"(B, d, L_0..L_{d - 1}{', N, N' if self.group != 'u1' else ''}); "
                             f"found shape {tuple(links.shape)}")
        if precision not in (32, 64):
            raise ShapeError(f"precision must be 32 or 64 bits; found {precision!r}")
        self.links = links
        self.precision = int(precision)
        if meta is None:
            meta = [Metadata(precision=self.precision) for _ in range(links.shape[0])]
        meta = list(meta)
        if len(meta) != links.shape[0]:
            raise ShapeError(f"{len(meta)} metadata entries for {links.shape[0]} configurations")
        self.meta: list[Metadata] = meta
        self.attrs: dict[str, Any] = dict(attrs or {})

    # ---------------------------------------------------------------- shape helpers

    @property
    def lattice(self) -> tuple[int, ...]:
        """Lattice extents ``(L_0, ..., L_{d-1})``, x first."""
        d = self.links.shape[1]
        return tuple(int(n) for n in self.links.shape[2:2 + d])

    @property
    def ndim(self) -> int:
        """Number of space-time dimensions d."""
        return int(self.links.shape[1])

    @property
    def n_colors(self) -> int:
        """N of SU(N) (1 for U(1))."""
        return 1 if self.group == "u1" else int(self.links.shape[-1])

    @property
    def volume(self) -> int:
        """Number of lattice sites."""
        return math.prod(self.lattice)

    def __len__(self) -> int:
        return int(self.links.shape[0])

    def __getitem__(self, index: int | slice) -> "Ensemble":
        """The configuration(s) at ``index`` as a new Ensemble sharing the link storage.

        Its precision is the highest ``meta[i].precision`` of the selection (capped at
        this ensemble's), so 32-bit sources stored in a 64-bit HDF5 store write back as
        32-bit files.
        """
        if isinstance(index, int):
            n = len(self)
            if not -n <= index < n:
                raise IndexError(f"configuration {index} out of range for an ensemble of {n}")
            index = slice(index % n, index % n + 1)
        meta = self.meta[index]
        # a mixed ensemble (HDF5 store of 32- and 64-bit sources): each part keeps its own
        precision = min(self.precision, max((m.precision for m in meta), default=self.precision))
        return Ensemble(self.links[index], precision=precision, meta=meta, attrs=self.attrs)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        fmt = {m.format for m in self.meta} - {None}
        return (f"Ensemble({len(self)} x {self.group} on {'x'.join(map(str, self.lattice))}, "
                f"precision {self.precision}{', from ' + '/'.join(sorted(fmt)) if fmt else ''})")

    # ---------------------------------------------------------------- conversions

    def numpy(self) -> np.ndarray:
        """The links as a numpy array (a view of the tensor), canonical layout."""
        return self.links.numpy()

    @property
    def header(self) -> dict[str, Any]:
        """Header values of the first configuration (convenience for single files)."""
        return self.meta[0].header if self.meta else {}

    @property
    def checksum_status(self) -> str:
        """``mismatch`` if any configuration failed a check, ``ok`` if all checked ones
        passed, ``absent`` if no configuration carries a check value."""
        states = {m.checksum_status for m in self.meta}
        if "mismatch" in states:
            return "mismatch"
        return "ok" if "ok" in states else "absent"

    @classmethod
    def from_links(cls, links: torch.Tensor | np.ndarray, *, precision: int = 64,
                   header: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
                   provenance: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
                   attrs: Mapping[str, Any] | None = None) -> "Ensemble":
        """Wrap links made in memory (HMC, a flow, resampling) with their metadata.

        Arguments:
            links: Canonical links (see the class docstring).
            precision: Storage precision writers will use by default (32 or 64).
            header: Header values (``beta``, ``trajectory``, ``plaquette``...): one mapping
                for every configuration, or a sequence of one mapping per configuration.
            provenance: JSON-able history (generating run, kernel, seed, flow model...):
                one mapping for all, or one per configuration.
            attrs: Ensemble-wide values.

        Example::

            ens = Ensemble.from_links(links, header=[{"trajectory": t} for t in trajs],
                                      provenance={"kernel": "hmc", "beta": 5.7, "seed": 1})
            io.write("run.h5", ens, append=True)

        Raises:
            ShapeError: on a malformed tensor or a per-configuration list of the wrong length.
        """
        n = int(links.shape[0])

        def per(value: Any) -> list[dict[str, Any]]:
            if value is None:
                return [{} for _ in range(n)]
            if isinstance(value, Mapping):
                return [_deepcopy_json(dict(value)) for _ in range(n)]
            items = [dict(v) for v in value]
            if len(items) != n:
                raise ShapeError(f"{len(items)} metadata mappings for {n} configurations")
            return items

        metas = [Metadata(precision=precision, header=h, provenance=p)
                 for h, p in zip(per(header), per(provenance))]
        return cls(links, precision=precision, meta=metas, attrs=attrs)

    @classmethod
    def concat(cls, ensembles: Iterable["Ensemble"]) -> "Ensemble":
        """Concatenate ensembles along the batch axis.

        The precision is the highest of the parts; attributes of the first are kept.

        Raises:
            ShapeError: if the parts differ in group or lattice, or the list is empty.
        """
        parts = list(ensembles)
        if not parts:
            raise ShapeError("cannot concatenate an empty list of ensembles")
        first = parts[0]
        for p in parts[1:]:
            if p.group != first.group or p.lattice != first.lattice:
                raise ShapeError(f"cannot concatenate {p.group} on {p.lattice} with "
                                 f"{first.group} on {first.lattice}")
        return cls(torch.cat([p.links for p in parts]), precision=max(p.precision for p in parts),
                   meta=[m for p in parts for m in p.meta], attrs=first.attrs)


# ------------------------------------------------------------------------ format base


class FormatHandler:
    """Base class of file-format handlers (what ``FileFormatSpec.factory()`` returns).

    Subclasses set the class attributes and implement :meth:`sniff`, :meth:`read` and,
    when writable, :meth:`write`. :func:`read` and :func:`write` in this module do the
    shared work (detection, overwrite protection, atomic rename, finiteness and
    unitarity checks, raising on failed checks), so handlers only translate bytes.

    Attributes:
        name: Registry name.
        groups: Gauge groups the handler can write (``("su3",)``; ``("*",)`` = any).
        multi: Whether one file holds many configurations (HDF5).
        extension: File-name extension used by ``flowplug convert`` for outputs.
        dims: Space-time dimensions the format holds (``(4,)``; ``()`` = any).
        precisions: Storage precisions the format writes (openQCD: ``(64,)`` only).
    """

    name: str = ""
    groups: tuple[str, ...] = ("su3",)
    multi: bool = False
    extension: str = ""
    dims: tuple[int, ...] = (4,)
    precisions: tuple[int, ...] = (32, 64)

    def sniff(self, path: Path, head: bytes, size: int) -> int:
        """Score how surely ``path`` is in this format from its content.

        Arguments:
            path: The file (handlers may read more than ``head``; they must never
                allocate by a size claimed in the file).
            head: Its first :data:`SNIFF_BYTES` bytes.
            size: Its size in bytes.

        Returns:
            0 if not this format; 100 for a magic number or header; lower values for
            weaker evidence (a size that fits).
        """
        return 0

    def read(self, path: Path, *, lattice: tuple[int, ...] | None = None, group: str | None = None,
             **options: Any) -> Ensemble:
        """Read ``path`` into an :class:`Ensemble` with every stored check evaluated.

        Handlers record check outcomes in ``Metadata.checks`` and do not raise on a
        mismatch (:func:`read` does, unless ``verify=False``); they raise
        :class:`FormatError` on anything structurally wrong.
        """
        raise FormatError(f"{self.name}: reading is not supported")

    def write(self, path: Path, ensemble: Ensemble, *, precision: int, **options: Any) -> None:
        """Write ``ensemble`` to ``path`` (a temporary file; :func:`write` renames it)."""
        raise FormatError(f"{self.name}: writing is not supported; writable formats: "
                          f"{', '.join(formats(writable=True))}")

    def append(self, path: Path, ensemble: Ensemble, *, precision: int, **options: Any) -> None:
        """Append to an existing multi-configuration file in place (multi formats only)."""
        raise FormatError(f"{self.name} holds one configuration per file; appending is not "
                          "supported (write to an HDF5 ensemble instead)")

    def rounds(self, ensemble: Ensemble, precision: int, **options: Any) -> bool:
        """Whether writing ``ensemble`` at ``precision`` would round any stored value.

        The base class: a 32-bit write of links that are not all exactly float32
        numbers (formats that store only part of each matrix override this).
        """
        return precision == 32 and 32 in self.precisions and not float32_exact(ensemble.links)

    def can_write(self, ensemble: Ensemble) -> str | None:
        """``None`` if ``ensemble`` fits this format, else the reason it does not."""
        if "*" not in self.groups and ensemble.group not in self.groups:
            return (f"format {self.name} holds {', '.join(self.groups)} links only; "
                    f"the data are {ensemble.group}")
        if self.dims and ensemble.ndim not in self.dims:
            return f"format {self.name} holds {self.dims} dimensional lattices; the data are {ensemble.ndim}D"
        if not self.multi and len(ensemble) != 1:
            return (f"format {self.name} holds one configuration per file; the ensemble has "
                    f"{len(ensemble)} (write each one, or use hdf5)")
        return None


def _specs():
    from flowplug.manager import registry

    return registry("file_format")


def formats(*, readable: bool | None = None, writable: bool | None = None) -> list[str]:
    """Names of registered file formats, optionally only the readable/writable ones."""
    out = []
    for spec in _specs():
        if readable is not None and spec.readable != readable:
            continue
        if writable is not None and spec.writable != writable:
            continue
        out.append(spec.name)
    return out


_handlers: dict[tuple[str, int], FormatHandler] = {}


def get_format(name: str) -> FormatHandler:
    """The handler of the format registered as ``name`` (aliases and any case accepted).

    Raises:
        UnknownComponentError: listing the registered formats.
    """
    spec = _specs().get(name)
    key = (spec.name, id(spec.factory))
    if key not in _handlers:
        _handlers[key] = spec.factory()
    return _handlers[key]


def _head(path: Path) -> tuple[bytes, int]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            return fh.read(SNIFF_BYTES), size
    except IsADirectoryError:
        raise FormatError(f"{path}: is a directory, not a lattice file") from None
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except OSError as exc:
        raise FormatError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def detect(path: str | os.PathLike) -> str:
    """Name of the format of ``path``: by content (magic numbers, headers) first, extension second.

    Raises:
        FormatError: if the file is missing or no registered format recognises it
            (the message lists the formats and says how to force one).
    """
    path = Path(path)
    head, size = _head(path)
    best, best_score = None, 0
    for spec in _specs():
        if not spec.readable:
            continue
        try:
            score = int(get_format(spec.name).sniff(path, head, size))
        except Exception:  # a sniffer that fails (even a third party's) only says "not mine"
            score = 0
        if score > best_score:
            best, best_score = spec.name, score
    if best is not None:
        return best
    name = path.name.lower()
    for spec in _specs():
        if spec.readable and any(name.endswith("." + ext.lower()) for ext in spec.extensions):
            return spec.name
    raise FormatError(
        f"{path}: not a recognised lattice file (no magic number or header of "
        f"{', '.join(formats(readable=True))}; size {size} bytes). Force a format with "
        "format=... (CLI: --format NAME); a bare LIME file also needs the lattice and group."
    )


def parse_lattice(text: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """Parse a lattice given as ``"4x4x4x8"``, ``"4,4,4,8"``, ``"4 4 4 8"`` or a sequence.

    Returns:
        Extents x first, or ``None`` for ``None``.

    Raises:
        FormatError: on a non-positive or non-integer extent.
    """
    if text is None:
        return None
    if isinstance(text, str):
        parts = [p for p in text.replace("x", " ").replace("X", " ").replace(",", " ").split()]
    else:
        parts = list(text)
    try:
        dims = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise FormatError(f"lattice {text!r}: expected extents like 4x4x4x8 (x first)") from None
    if not dims or any(n <= 0 for n in dims):
        raise FormatError(f"lattice {text!r}: extents must be positive integers, x first, like 4x4x4x8")
    return dims


def _normalise_group(group: str | None) -> str | None:
    if group is None:
        return None
    g = str(group).strip().lower().replace("(", "").replace(")", "")
    if g not in {"u1"} and not (g.startswith("su") and g[2:].isdigit() and int(g[2:]) >= 2):
        raise FormatError(f"group {group!r}: expected su3, su2 (su<N>) or u1")
    return g


def unitarity_tolerance(precision: int, n_colors: int = 3) -> float:
    """Largest max |U U^+ - 1| (and |det U - 1|) accepted silently for a storage precision.

    About 30 N units of roundoff of 32-bit storage: 1.1e-5 for SU(3) at 32 bits; at 64
    bits 1e-6, loose enough for double-precision files holding data that were once
    rounded to 32 bits (deviations ~5e-7), tight enough to flag real damage.
    """
    if precision == 32:
        return 30.0 * n_colors * 1.2e-7
    return 1e-6


def open_time_boundary(links: torch.Tensor) -> list[bool]:
    """Which configurations have open boundary conditions in time (CLS/openQCD style).

    openQCD stores a configuration generated with open boundaries with every
    time-direction link on the last time slice, U_t(x, t = T - 1), set to zero. Those
    links are not group elements; they mark the boundary.

    Arguments:
        links: SU(N) links (B, d, L_0, ..., L_{d-1}, N, N); the time direction is the
            last one (mu = d - 1, lattice axis L_{d-1}).

    Returns:
        One bool per configuration: True when all those links are exactly zero (False
        for U(1) links and for d < 2 or T < 2).
    """
    n = int(links.shape[0])
    if not links.is_complex() or links.dim() < 5 or links.numel() == 0:
        return [False] * n
    d = int(links.shape[1])
    if d < 2 or int(links.shape[1 + d]) < 2:
        return [False] * n
    last = links[:, d - 1].select(d, -1)  # (B, L_0..L_{d-2}, N, N): U_t(x, T - 1)
    return [bool((last[i] == 0).all()) for i in range(n)]


def link_deviations(ensemble: Ensemble) -> list[tuple[float, float]]:
    """``(max |U U^+ - 1|, max |det U - 1|)`` of each configuration (SU(N) only).

    The zero time links of a configuration with open boundaries in time (see
    :func:`open_time_boundary`) are left out: they mark the boundary and are not
    group elements.
    """
    links = ensemble.links
    d = ensemble.ndim
    out = []
    for i, is_open in enumerate(open_time_boundary(links)):
        if not is_open:
            out.append(group_deviation(links[i:i + 1]))
            continue
        space = group_deviation(links[i:i + 1, :d - 1])
        time_ = group_deviation(links[i:i + 1, d - 1:].narrow(1 + d, 0, links.shape[1 + d] - 1))
        out.append((max(space[0], time_[0]), max(space[1], time_[1])))
    return out


def check_links(ensemble: Ensemble, *, source: str = "data", unitarity: str = "warn",
                finite: bool = True) -> dict[str, float]:
    """Check that links are finite and (for SU(N)) on the group.

    Arguments:
        ensemble: The links to check.
        source: Name used in messages (the file).
        unitarity: ``"warn"`` (default: :class:`NonUnitaryWarning` with the deviation),
            ``"error"`` (raise :class:`FormatError`) or ``"ignore"``.
        finite: Check for NaN/Inf (skip when done already).

    Returns:
        ``{"unitarity": max |U U^+ - 1|, "determinant": max |det U - 1|}`` over the
        ensemble (empty for U(1)). The zero time links on the last time slice of a
        configuration with open boundaries (:func:`open_time_boundary`) are not counted.

    Raises:
        FormatError: on NaN or Inf values (naming the first bad configuration and
            link), or on non-unitary links when ``unitarity="error"``.
    """
    links = ensemble.links
    if finite:
        flat = links.detach().cpu().resolve_conj().numpy()
        if not np.isfinite(flat.view(np.float64) if flat.dtype == np.complex128 else flat).all():
            ok = torch.isfinite(torch.view_as_real(links) if links.is_complex() else links)
            bad = (~ok).nonzero()[0].tolist()
            raise FormatError(f"{source}: payload holds NaN or Inf values (first at configuration "
                              f"{bad[0]}, direction {bad[1]}, site {tuple(bad[2:2 + ensemble.ndim])}); "
                              "the file is corrupt")
    if ensemble.group == "u1" or unitarity == "ignore":
        return {}
    devs = link_deviations(ensemble)
    unit = max((u for u, _ in devs), default=0.0)
    det = max((v for _, v in devs), default=0.0)
    tol = unitarity_tolerance(ensemble.precision, ensemble.n_colors)
    worst = max(unit, det)
    if worst > tol:
        text = (f"{source}: links are not in {ensemble.group.upper()}: max |U U^+ - 1| = {unit:.3g}, "
                f"max |det U - 1| = {det:.3g} (tolerance {tol:.1g} at {ensemble.precision}-bit precision)")
        if unitarity == "error":
            raise FormatError(text + "; read with unitarity='warn' to accept them")
        if unitarity == "warn":
            warnings.warn(text, NonUnitaryWarning, stacklevel=3)
    return {"unitarity": unit, "determinant": det}


def group_deviation(links: torch.Tensor) -> tuple[float, float]:
    r"""``(max |U U^+ - 1|, max |det U - 1|)`` over all SU(N) links of a tensor.

    The same quantities as :func:`flowplug.gauge.unitarity_deviation` and
    :func:`flowplug.gauge.determinant_deviation` (maximum over the batch), evaluated for
    N = 2, 3 with explicit element-wise formulas on strided numpy views, in chunks of
    4096 matrices (5-10x faster than batched 3x3 matrix products on large lattices);
    other N use those functions.

    Arguments:
        links: SU(N) links (B, d, L..., N, N), complex128.

    Returns:
        Two floats.
    """
    n = links.shape[-1]
    if n not in (2, 3) or links.dtype != torch.complex128:
        from flowplug.gauge import determinant_deviation, unitarity_deviation

        return float(unitarity_deviation(links).max()), float(determinant_deviation(links).max())
    flat = links.detach().cpu().resolve_conj().numpy().reshape(-1, n, n)
    unit = det = 0.0  # (also for an empty tensor)
    for start in range(0, flat.shape[0], _GROUP_CHUNK):  # chunks keep the temporaries in cache
        a, b = _group_deviation_chunk(flat[start:start + _GROUP_CHUNK], n)
        unit, det = max(unit, a), max(det, b)
    return unit, det


#: Matrices per chunk in :func:`group_deviation` (temporaries of ~64 KiB each).
_GROUP_CHUNK = 4096


def _group_deviation_chunk(u: np.ndarray, n: int) -> tuple[float, float]:
    e = [[u[:, i, k] for k in range(n)] for i in range(n)]
    unit = 0.0
    for i in range(n):
        norm = sum(e[i][k].real ** 2 + e[i][k].imag ** 2 for k in range(n))
        unit = max(unit, float(np.abs(norm - 1).max()))
        for j in range(i + 1, n):
            g = sum(e[i][k] * e[j][k].conj() for k in range(n))
            unit = max(unit, float(np.abs(g).max()))
    if n == 2:
        d = e[0][0] * e[1][1] - e[0][1] * e[1][0]
    else:
        d = (e[0][0] * (e[1][1] * e[2][2] - e[1][2] * e[2][1])
             - e[0][1] * (e[1][0] * e[2][2] - e[1][2] * e[2][0])
             + e[0][2] * (e[1][0] * e[2][1] - e[1][1] * e[2][0]))
    return unit, float(np.abs(d - 1).max())


def float32_exact(values: torch.Tensor | np.ndarray) -> bool:
    """Whether every number in ``values`` is exactly representable in float32.

    Checked in chunks of 2^20 numbers (no full-size temporary copy); NaN counts as exact.
    """
    arr = values.detach().cpu().resolve_conj().numpy() if isinstance(values, torch.Tensor) else values
    flat = np.ascontiguousarray(arr).reshape(-1)
    if flat.dtype in (np.complex64, np.float32):
        return True
    real = flat.view(np.float64) if flat.dtype == np.complex128 else flat.astype(np.float64, copy=False)
    for start in range(0, real.size, 1 << 20):
        chunk = real[start:start + (1 << 20)]
        with np.errstate(over="ignore", invalid="ignore"):
            if not np.array_equal(chunk.astype(np.float32).astype(np.float64), chunk, equal_nan=True):
                return False
    return True


def raise_failed_checks(ensemble: Ensemble, source: str) -> None:
    """Raise :class:`ChecksumError` for the first failed check of ``ensemble``.

    The message names the file, the quantity, the expected and the found value.
    """
    for i, m in enumerate(ensemble.meta):
        for c in m.checks:
            if not c.ok:
                where = f" (configuration {i})" if len(ensemble) > 1 else ""
                tol = f" within {c.tolerance:g}" if c.tolerance else ""
                raise ChecksumError(
                    f"{source}{where}: {c.quantity} mismatch: expected {c.expected}{tol}, "
                    f"found {c.found} (file corrupt or truncated; verify=False / --no-verify "
                    "reads it anyway)")


def read(path: str | os.PathLike, format: str | None = None, *, lattice: str | Sequence[int] | None = None,
         group: str | None = None, verify: bool = True, unitarity: str = "warn",
         **options: Any) -> Ensemble:
    """Read a lattice file into an :class:`Ensemble` (canonical layout, complex128/float64).

    Arguments:
        path: The file.
        format: Registry name to force a format; default: :func:`detect`.
        lattice: Extents x first (``"4x4x4x8"`` or a sequence); required for bare LIME
            files, otherwise checked against the file's own.
        group: ``su3``, ``su2``, ``u1``; required where the file does not say (bare
            LIME), otherwise checked against the file's own.
        verify: Raise :class:`ChecksumError` on a failed stored check (checksums,
            header plaquette/link trace). With ``False`` the outcomes are still recorded
            in ``Metadata.checks``, nothing is raised.
        unitarity: ``"warn"``, ``"error"`` or ``"ignore"`` (see :func:`check_links`).
        **options: Format-specific options (HDF5: ``index`` to select configurations).

    Returns:
        The ensemble; ``meta[i].header["unitarity"]``/``["determinant"]`` hold the
        deviations found; ``meta[i].header["boundary"] = "open"`` marks a configuration
        whose time links on the last time slice are all zero (openQCD/CLS open
        boundaries; those links are left out of the unitarity check).

    Raises:
        FormatError: on missing, truncated or malformed files, NaN/Inf payloads, a
            lattice/group that disagrees with the file, or (``unitarity="error"``)
            non-unitary links.
        ChecksumError: on a failed check when ``verify`` is true.
        UnknownComponentError: if ``format`` is not registered.
    """
    path = Path(path)
    if format is None:
        name = detect(path)
    else:
        name = _specs().get(format).name
        _head(path)  # a clear error for a missing file or a directory
    handler = get_format(name)
    dims = parse_lattice(lattice)
    grp = _normalise_group(group)
    try:
        ensemble = handler.read(path, lattice=dims, group=grp, **options)
    except FlowplugError:
        raise
    except MemoryError:
        raise FormatError(f"{path}: not enough memory to read it as {name}") from None
    except (OSError, ValueError, KeyError, IndexError, TypeError, ArithmeticError, EOFError,
            UnicodeError, RuntimeError, struct.error) as exc:
        raise FormatError(f"{path}: unreadable as {name}: {type(exc).__name__}: {exc}") from None
    if grp is not None and ensemble.group != grp:
        raise FormatError(f"{path}: holds {ensemble.group} links, not {grp} as asked")
    if dims is not None and ensemble.lattice != dims:
        raise FormatError(f"{path}: lattice is {'x'.join(map(str, ensemble.lattice))}, "
                          f"not {'x'.join(map(str, dims))} as given")
    check_links(ensemble, source=str(path), unitarity="ignore")  # NaN/Inf first: the clearest message
    if ensemble.group != "u1":
        for m, is_open in zip(ensemble.meta, open_time_boundary(ensemble.links)):
            if is_open:
                m.header["boundary"] = "open"
    if verify:
        raise_failed_checks(ensemble, str(path))
    dev = check_links(ensemble, source=str(path), unitarity=unitarity, finite=False)
    for m in ensemble.meta:
        m.header.update(dev)
    return ensemble


def write(path: str | os.PathLike, ensemble: Ensemble, format: str | None = None, *,
          precision: int | None = None, overwrite: bool = False, append: bool = False,
          **options: Any) -> Path:
    """Write ``ensemble`` to ``path`` atomically (temporary file + rename).

    Arguments:
        path: Output file.
        ensemble: What to write (:class:`Ensemble`, or a link tensor in canonical layout).
        format: Registry name; default: from the extension of ``path``.
        precision: 32 or 64 bits; default: ``ensemble.precision`` (the source's), so a
            file read and written back is bit-exact. When that default is 32 and the
            values need more bits (the third row rebuilt in double precision from a
            two-row NERSC file), they are rounded and a :class:`PrecisionLossWarning`
            says so; ``precision=64`` keeps them exactly.
        overwrite: Replace an existing file (never done otherwise).
        append: Multi-configuration formats (HDF5): add to an existing file in place
            (each configuration is committed before the next; see the HDF5 adapter).
        **options: Format-specific options (NERSC: ``datatype``, ``endian``; ILDG: ``lfn``).

    Returns:
        ``path``.

    Raises:
        FormatError: if ``path`` exists and neither ``overwrite`` nor ``append`` is set,
            if the format cannot hold the data (group, dimension, batch size), or on an
            unknown extension without ``format``.
        FlowplugError: if the operating system refuses the write (disk full, permissions).
    """
    path = Path(path)
    if not isinstance(ensemble, Ensemble):
        ensemble = Ensemble(ensemble)
    if format is None:
        format = _format_from_extension(path)
    name = _specs().get(format).name
    spec = _specs().get(name)
    if not spec.writable:
        raise FormatError(f"format {name} is read-only; writable formats: {', '.join(formats(writable=True))}")
    handler = get_format(name)
    prec = ensemble.precision if precision is None else int(precision)
    if prec not in (32, 64):
        raise FormatError(f"precision must be 32 or 64 bits; found {precision!r}")
    reason = handler.can_write(ensemble)
    if reason:
        raise FormatError(f"{path}: {reason}")
    if precision is None and prec == 32 and handler.rounds(ensemble, prec, **options):
        warnings.warn(f"{path}: written at the source's 32-bit precision, which rounds values that "
                      "need more bits (such as the third row rebuilt from a two-row NERSC file, computed "
                      "in double precision); precision=64 / --precision 64 keeps them exactly",
                      PrecisionLossWarning, stacklevel=2)
    from flowplug.fsutil import atomic_path

    try:
        if path.exists():
            if append:
                handler.append(path, ensemble, precision=prec, **options)
                return path
            if not overwrite:
                raise FormatError(f"{path} exists; refusing to overwrite it (overwrite=True / --force "
                                  "replaces it)")
        with atomic_path(path) as tmp:
            handler.write(tmp, ensemble, precision=prec, **options)
    except OSError as exc:  # disk full, permissions...: a clear message, no partial file
        raise FlowplugError(f"{path}: cannot be written ({exc.strerror or exc})") from None
    return path


def _format_from_extension(path: Path) -> str:
    name = path.name.lower()
    for spec in _specs():
        if spec.writable and any(name.endswith("." + ext.lower()) for ext in spec.extensions):
            return spec.name
    raise FormatError(f"{path}: cannot tell the format from the extension; give format=... "
                      f"(one of {', '.join(formats(writable=True))})")
