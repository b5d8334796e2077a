"""The in-memory data model of lattice files: :class:`Ensemble` and its metadata records.

An :class:`Ensemble` is a batch of configurations of one field kind on one lattice,
in flowplug's canonical layout (DESIGN.md section 2), with one :class:`Metadata` per
configuration. Field kinds and their layouts are those of
:func:`flowplug.theory.field_space` (the spaces HMC moves on), so a kind the core can
simulate is a kind it can store:

========== ====================================== ===========
kind       shape                                  dtype
========== ====================================== ===========
scalar     (B, L_0, ..., L_{d-1})                 float64
o2         (B, L_0, ..., L_{d-1}), angles         float64
u1         (B, d, L_0, ..., L_{d-1}), angles      float64
su<N>      (B, d, L_0, ..., L_{d-1}, N, N)        complex128
========== ====================================== ===========

The file formats (:mod:`flowplug.io`, the adapters) read into and write from this
model; :mod:`flowplug.linkcheck` checks its values.

Quick use::

    from flowplug.ensemble import Ensemble

    ens = Ensemble(phi, field="scalar")       # phi: (B, 8, 8) float64
    ens.field, ens.lattice, ens.group          # 'scalar', (8, 8), None (not a gauge field)
    Ensemble(links).field                      # 'su3' for complex (B, 4, L..., 3, 3) links
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from flowplug.errors import ConfigError, ShapeError
from flowplug.theory import FieldSpace, SUNSpace, field_space

__all__ = ["Record", "Check", "Metadata", "Ensemble", "field_of", "group_of"]


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
    expected: str | float
    found: str | float
    ok: bool
    tolerance: float = 0.0

    def as_dict(self) -> dict[str, str | float | bool]:
        """JSON-ready form."""
        return dataclasses.asdict(self)


@dataclass
class Metadata:
    """Everything known about one configuration besides its field values.

    Attributes:
        format: Registry name of the format it was read from (``ildg``, ``nersc``...),
            or ``None`` for data made in memory.
        path: File it was read from, or ``None``.
        precision: Storage precision in bits of the source (32 or 64).
        header: Header values under standard names where the file has them:
            ``plaquette`` (DESIGN.md normalisation: Re tr U_P / N, 1 for unit gauge),
            ``link_trace`` (Re tr U / N), ``beta``, ``trajectory``, ``ensemble_id``,
            ``lfn`` (ILDG logical file name), ``boundary`` (``"open"`` for open
            boundary conditions in time), ``action`` (the ``[action]`` table of the gauge
            action the file states it was generated with, for
            :func:`flowplug.theory.action_from_config`) and ``action_note`` (where that was
            read, what it leaves out), plus format-specific keys as found.
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

    def copy(self) -> Metadata:
        """A deep-enough copy (dicts and lists copied; records are immutable)."""
        return Metadata(
            self.format,
            self.path,
            self.precision,
            dict(self.header),
            list(self.records),
            list(self.record_list),
            list(self.checks),
            _deepcopy_json(self.provenance),
        )


def _deepcopy_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deepcopy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deepcopy_json(v) for v in value]
    return value


# ---------------------------------------------------------------------- field kinds


def field_of(data: torch.Tensor) -> str:
    """The field kind of a tensor given without one: ``su<N>`` if complex, ``u1`` if real.

    Site fields (``scalar``, ``o2``) have the same real layout as each other and cannot
    be told apart from the tensor: they are always named (``Ensemble(x, field="scalar")``).

    Arguments:
        data: A field tensor, batch first.

    Returns:
        ``su<N>`` (N = the size of the last axis) for a complex tensor, ``u1`` for a real one.

    Raises:
        ShapeError: if a complex tensor has fewer than 5 axes or a non-square colour block.
    """
    if data.is_complex():
        if data.dim() < 5 or data.shape[-1] != data.shape[-2]:
            raise ShapeError(f"SU(N) links need shape (B, d, L..., N, N); found {tuple(data.shape)}")
        return f"su{data.shape[-1]}"
    return "u1"


def group_of(links: torch.Tensor) -> str:
    """Gauge group name of a canonical link tensor: ``su<N>`` for complex, ``u1`` for real.

    Arguments:
        links: Gauge links, (B, d, L..., N, N) complex or (B, d, L...) real.

    Raises:
        ShapeError: if the tensor has fewer than 3 axes or a non-square colour block.
    """
    if links.dim() < 3:
        raise ShapeError(f"links need at least (B, d, L_0) axes; found shape {tuple(links.shape)}")
    return field_of(links)


def _space(kind: str) -> FieldSpace:
    try:
        return field_space(kind)
    except ConfigError as exc:
        raise ShapeError(str(exc)) from None


# ---------------------------------------------------------------------------- ensemble


class Ensemble:
    """A batch of configurations of one field kind in the canonical layout, with metadata.

    One file of a single-configuration format (ILDG, NERSC, MILC, openQCD: SU(3) links)
    reads as an ensemble of one (B = 1); an HDF5 ensemble store holds any number, of
    any field kind.

    Arguments:
        data: The field values, batch first, x-first lattice axes (module docstring):
            SU(N) links (B, d, L_0, ..., L_{d-1}, N, N) complex128, U(1) link angles
            (B, d, L_0, ..., L_{d-1}) float64 (direction mu = x, y, z, t), or a site
            field (B, L_0, ..., L_{d-1}) float64 (``scalar``; ``o2`` angles). Other
            float/complex dtypes are widened exactly; numpy arrays are accepted.
        field: The field kind (``scalar``, ``o2``, ``u1``, ``su2``, ``su3``...; any kind
            :func:`flowplug.theory.field_space` knows). Default: ``su<N>`` for complex
            data, ``u1`` for real data (site fields must be named).
        precision: Storage precision in bits (32 or 64) that writers use by default.
        meta: One :class:`Metadata` per configuration (default: empty ones).
        attrs: Ensemble-wide JSON-able values (``beta``, ``ensemble_id``, action
            parameters...); HDF5 stores them as file attributes.

    Attributes:
        data: As above (a ``torch.Tensor`` on the CPU).
        links: The same tensor (the name used for gauge fields).
        field: The field kind.
        group: The gauge group (``su3``, ``su2``, ``u1``: the field kind) for gauge
            fields, ``None`` for site fields.
        precision, meta, attrs: As above.

    Raises:
        ShapeError: on a tensor that does not have the layout or dtype of its field
            kind, an unknown kind, or a ``meta`` list of the wrong length.

    Example::

        ens = Ensemble(torch.eye(3, dtype=torch.complex128).expand(2, 4, 4, 4, 4, 8, 3, 3))
        ens.lattice   # (4, 4, 4, 8)
        ens[1]        # the second configuration, an Ensemble of one
        Ensemble(torch.zeros(5, 8, 8, dtype=torch.float64), field="scalar").lattice   # (8, 8)
    """

    def __init__(
        self,
        data: torch.Tensor | np.ndarray,
        *,
        field: str | None = None,
        precision: int = 64,
        meta: Sequence[Metadata] | None = None,
        attrs: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(data, np.ndarray):
            data = torch.from_numpy(np.ascontiguousarray(data))
        if not isinstance(data, torch.Tensor):
            raise ShapeError(f"field values must be a torch tensor or numpy array; found {type(data).__name__}")
        if data.is_complex():
            data = data.to(torch.complex128)
        elif data.is_floating_point():
            data = data.to(torch.float64)
        else:
            raise ShapeError(
                f"field values must be complex (SU(N) links) or real (angles, scalar fields); found {data.dtype}"
            )
        inferred = field is None
        kind = field_of(data) if inferred else str(field).strip().lower()
        space = _space(kind)
        if data.is_complex() != space.dtype.is_complex:
            raise ShapeError(
                f"{kind} fields are {str(space.dtype).replace('torch.', '')}; found "
                f"{str(data.dtype).replace('torch.', '')} values of shape {tuple(data.shape)}"
            )
        try:
            lattice = space.lattice_of(data)
        except ShapeError as exc:
            if inferred and not data.is_complex():
                raise ShapeError(
                    f"{exc}; a field on the sites (B, L_0, ..., L_(d-1)) needs its kind: "
                    "field='scalar' (phi^4) or field='o2'"
                ) from None
            raise
        if not lattice or any(n < 1 for n in lattice):
            raise ShapeError(f"{kind} field of shape {tuple(data.shape)} has no lattice axes or an empty one")
        if precision not in (32, 64):
            raise ShapeError(f"precision must be 32 or 64 bits; found {precision!r}")
        self.data = data
        self.field = kind
        self._space = space
        self._lattice = tuple(int(n) for n in lattice)
        self.precision = int(precision)
        if meta is None:
            meta = [Metadata(precision=self.precision) for _ in range(data.shape[0])]
        meta = list(meta)
        if len(meta) != data.shape[0]:
            raise ShapeError(f"{len(meta)} metadata entries for {data.shape[0]} configurations")
        self.meta: list[Metadata] = meta
        self.attrs: dict[str, Any] = dict(attrs or {})

    # ---------------------------------------------------------------- field kind

    @property
    def links(self) -> torch.Tensor:
        """The field tensor (same object as :attr:`data`; the usual name for gauge links)."""
        return self.data

    @property
    def space(self) -> FieldSpace:
        """The :class:`flowplug.theory.FieldSpace` of :attr:`field`."""
        return self._space

    @property
    def is_gauge(self) -> bool:
        """Whether the field lives on links (``u1``, ``su<N>``) rather than on sites."""
        return bool(self._space.gauge)

    @property
    def group(self) -> str | None:
        """Gauge group (``su3``, ``su2``, ``u1``) of a gauge field; ``None`` for a site field."""
        return self.field if self.is_gauge else None

    def describe_field(self) -> str:
        """``"su3 links"``, ``"u1 links"``, ``"a site field of kind scalar"`` (for messages)."""
        return f"{self.field} links" if self.is_gauge else f"a site field of kind {self.field}"

    # ---------------------------------------------------------------- shape helpers

    @property
    def lattice(self) -> tuple[int, ...]:
        """Lattice extents ``(L_0, ..., L_{d-1})``, x first."""
        return self._lattice

    @property
    def ndim(self) -> int:
        """Number of space-time dimensions d."""
        return len(self._lattice)

    @property
    def n_colors(self) -> int:
        """N of SU(N) (1 for U(1) and for site fields)."""
        return self._space.n if isinstance(self._space, SUNSpace) else 1

    @property
    def volume(self) -> int:
        """Number of lattice sites."""
        return math.prod(self.lattice)

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def __getitem__(self, index: int | slice) -> Ensemble:
        """The configuration(s) at ``index`` as a new Ensemble sharing the storage.

        Its precision is the highest ``meta[i].precision`` of the selection (capped at
        this ensemble's), so 32-bit sources stored in a 64-bit HDF5 store write back as
        32-bit files.

        Raises:
            IndexError: for an integer index out of range.
        """
        if isinstance(index, int):
            n = len(self)
            if not -n <= index < n:
                raise IndexError(f"configuration {index} out of range for an ensemble of {n}")
            index = slice(index % n, index % n + 1)
        meta = self.meta[index]
        # a mixed ensemble (HDF5 store of 32- and 64-bit sources): each part keeps its own
        precision = min(self.precision, max((m.precision for m in meta), default=self.precision))
        return Ensemble(self.data[index], field=self.field, precision=precision, meta=meta, attrs=self.attrs)

    def __iter__(self) -> Iterator[Ensemble]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        fmt = {m.format for m in self.meta if m.format is not None}
        return (
            f"Ensemble({len(self)} x {self.field} on {'x'.join(map(str, self.lattice))}, "
            f"precision {self.precision}{', from ' + '/'.join(sorted(fmt)) if fmt else ''})"
        )

    # ---------------------------------------------------------------- conversions

    def numpy(self) -> np.ndarray:
        """The field values as a numpy array (a view of the tensor), canonical layout."""
        return self.data.numpy()

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
    def from_links(
        cls,
        links: torch.Tensor | np.ndarray,
        *,
        field: str | None = None,
        precision: int = 64,
        header: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
        provenance: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
        attrs: Mapping[str, Any] | None = None,
    ) -> Ensemble:
        """Wrap field values made in memory (HMC, a flow, resampling) with their metadata.

        Arguments:
            links: Canonical field values of any kind (see the class docstring).
            field: The field kind (default: ``su<N>`` for complex, ``u1`` for real
                values; give ``"scalar"`` or ``"o2"`` for site fields).
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
            phi4 = Ensemble.from_links(phi, field="scalar", header={"trajectory": 10})

        Raises:
            ShapeError: on a malformed tensor or a per-configuration list of the wrong length.
        """
        n = int(links.shape[0])

        def per(value: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
            if value is None:
                return [{} for _ in range(n)]
            if isinstance(value, Mapping):
                return [_deepcopy_json(dict(value)) for _ in range(n)]
            items = [dict(v) for v in value]
            if len(items) != n:
                raise ShapeError(f"{len(items)} metadata mappings for {n} configurations")
            return items

        metas = [
            Metadata(precision=precision, header=h, provenance=p)
            for h, p in zip(per(header), per(provenance), strict=True)
        ]
        return cls(links, field=field, precision=precision, meta=metas, attrs=attrs)

    @classmethod
    def concat(cls, ensembles: Iterable[Ensemble]) -> Ensemble:
        """Concatenate ensembles along the batch axis.

        The precision is the highest of the parts; attributes of the first are kept.

        Raises:
            ShapeError: if the parts differ in field kind or lattice, or the list is empty.
        """
        parts = list(ensembles)
        if not parts:
            raise ShapeError("cannot concatenate an empty list of ensembles")
        first = parts[0]
        for p in parts[1:]:
            if p.field != first.field or p.lattice != first.lattice:
                raise ShapeError(f"cannot concatenate {p.field} on {p.lattice} with {first.field} on {first.lattice}")
        return cls(
            torch.cat([p.data for p in parts]),
            field=first.field,
            precision=max(p.precision for p in parts),
            meta=[m for p in parts for m in p.meta],
            attrs=first.attrs,
        )
