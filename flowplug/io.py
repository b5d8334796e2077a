"""Reading and writing lattice files: format dispatch over the file-format plugins.

Everything format-specific lives in the file-format plugins (``flowplug.adapters`` and
third-party packages, hook ``flowplug_file_formats``); this module finds the right one,
calls it, and applies the checks every read shares. The data model lives in
:mod:`flowplug.ensemble`, the value checks in :mod:`flowplug.linkcheck`, the ILDG axis
order in :mod:`flowplug.layout`; their public names are importable from here as well
(``io.Ensemble``, ``io.Metadata``, ``io.check_links``, ``io.from_ildg``...), so
``from flowplug import io`` is all a script or a format plugin needs.

Quick use::

    from flowplug import io

    ens = io.read("milc.lat.sample.l4444.ildg")       # format detected from content
    ens.links.shape          # torch.Size([1, 4, 4, 4, 4, 4, 3, 3]), complex128
    ens.lattice, ens.group, ens.precision              # (4, 4, 4, 4), 'su3', 32
    ens.meta[0].header["plaquette"]                   # header values, when present
    io.write("out.ildg", ens)                           # 32-bit again, bit-exact
    io.write("ensemble.h5", ens, append=True)          # HDF5 ensemble store
    io.write("phi4.h5", io.Ensemble(phi, field="scalar"))   # any field kind in HDF5

Canonical layout (DESIGN.md section 2): SU(N) links ``(B, d, L_0, ..., L_{d-1}, N, N)``
complex128, direction mu = x, y, z, t = array axis 1 index 0..3, lattice axes x first;
U(1) links ``(B, d, L_0, ..., L_{d-1})`` float64 angles; site fields (``scalar``,
``o2``) ``(B, L_0, ..., L_{d-1})`` float64. Files store other layouts (ILDG:
``(lt, lz, ly, lx, mu, N, N)`` big-endian); adapters permute at the boundary
(:mod:`flowplug.layout`).

Reads are exact: 32-bit data widened to complex128 keeps every bit, and
``Ensemble.precision`` remembers the file's precision, so writing back (default
precision = the source's) reproduces the stored numbers bit for bit.
"""

from __future__ import annotations

import glob
import os
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from flowplug.ensemble import Check, Ensemble, Metadata, Record, field_of, group_of
from flowplug.errors import (
    ChecksumError,
    FlowplugError,
    FormatError,
    NonUnitaryWarning,
    PrecisionLossWarning,
    ShapeError,
)
from flowplug.layout import from_ildg, ildg_axes, ildg_shape, to_ildg
from flowplug.linkcheck import (
    check_links,
    float32_exact,
    group_deviation,
    is_sun,
    link_deviations,
    open_time_boundary,
    raise_failed_checks,
    unitarity_tolerance,
    wanting_group_check,
)
from flowplug.registry import Registry

__all__ = [
    # data model (flowplug.ensemble)
    "Record",
    "Check",
    "Metadata",
    "Ensemble",
    "field_of",
    "group_of",
    # format dispatch (this module)
    "FormatHandler",
    "formats",
    "get_format",
    "detect",
    "read",
    "write",
    "parse_lattice",
    "format_of_name",
    "strip_format_extension",
    "expand_inputs",
    "lattice_inputs",
    # value checks (flowplug.linkcheck)
    "unitarity_tolerance",
    "check_links",
    "group_deviation",
    "link_deviations",
    "open_time_boundary",
    "float32_exact",
    "raise_failed_checks",
    "is_sun",
    # the ILDG axis order (flowplug.layout)
    "to_ildg",
    "from_ildg",
    "ildg_axes",
    "ildg_shape",
    # errors, for ``io.FormatError`` in scripts
    "FlowplugError",
    "FormatError",
    "ChecksumError",
    "ShapeError",
    "NonUnitaryWarning",
    "PrecisionLossWarning",
]

#: Bytes read from the start of a file for content detection.
SNIFF_BYTES = 4096


# ------------------------------------------------------------------------ format base


class FormatHandler:
    """Base class of file-format handlers (what ``FileFormatSpec.factory()`` returns).

    Subclasses set the class attributes and implement :meth:`sniff`, :meth:`read` and,
    when writable, :meth:`write`. :func:`read` and :func:`write` in this module do the
    shared work (detection, overwrite protection, atomic rename, finiteness and
    unitarity checks, raising on failed checks), so handlers only translate bytes.

    Attributes:
        name: Registry name.
        fields: Field kinds the handler can write (``("su3",)``; ``("*",)`` = any kind,
            site fields included; see :mod:`flowplug.ensemble`). ``groups`` is the same
            tuple under its former name (a subclass that still sets ``groups`` gets it
            as ``fields``).
        multi: Whether one file holds many configurations (HDF5).
        extension: File-name extension used by ``flowplug convert`` for outputs.
        dims: Space-time dimensions the format holds (``(4,)``; ``()`` = any).
        precisions: Storage precisions the format writes (openQCD: ``(64,)`` only).
    """

    name: str = ""
    fields: tuple[str, ...] = ("su3",)
    multi: bool = False
    extension: str = ""
    dims: tuple[int, ...] = (4,)
    precisions: tuple[int, ...] = (32, 64)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = vars(cls)
        if "groups" in own and "fields" not in own:  # a handler written before ``fields``
            cls.fields = tuple(own["groups"])

    @property
    def groups(self) -> tuple[str, ...]:
        """The former name of :attr:`fields`."""
        return self.fields

    def holds(self, field: str) -> bool:
        """Whether the format can write fields of kind ``field``."""
        return "*" in self.fields or field in self.fields

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

    def read(
        self, path: Path, *, lattice: tuple[int, ...] | None = None, group: str | None = None, **options: Any
    ) -> Ensemble:
        """Read ``path`` into an :class:`Ensemble` with every stored check evaluated.

        Handlers record check outcomes in ``Metadata.checks`` and do not raise on a
        mismatch (:func:`read` does, unless ``verify=False``); they raise
        :class:`FormatError` on anything structurally wrong.
        """
        raise FormatError(f"{self.name}: reading is not supported")

    def write(self, path: Path, ensemble: Ensemble, *, precision: int, **options: Any) -> None:
        """Write ``ensemble`` to ``path`` (a temporary file; :func:`write` renames it)."""
        raise FormatError(
            f"{self.name}: writing is not supported; writable formats: {', '.join(formats(writable=True))}"
        )

    def append(self, path: Path, ensemble: Ensemble, *, precision: int, **options: Any) -> None:
        """Append to an existing multi-configuration file in place (multi formats only)."""
        raise FormatError(
            f"{self.name} holds one configuration per file; appending is not "
            "supported (write to an HDF5 ensemble instead)"
        )

    def rounds(self, ensemble: Ensemble, precision: int, **options: Any) -> bool:
        """Whether writing ``ensemble`` at ``precision`` would round any stored value.

        The base class: a 32-bit write of values that are not all exactly float32
        numbers (formats that store only part of each matrix override this).
        """
        return precision == 32 and 32 in self.precisions and not float32_exact(ensemble.links)

    def can_write(self, ensemble: Ensemble) -> str | None:
        """``None`` if ``ensemble`` fits this format, else the reason it does not.

        The reason names the format, the field kinds it holds, the ensemble's field
        kind and the writable formats that do hold it.
        """
        if not self.holds(ensemble.field):
            others = [name for name in formats(writable=True) if get_format(name).holds(ensemble.field)]
            what = "gauge links" if all(_is_gauge_kind(k) for k in self.fields) else "fields"
            return (
                f"format {self.name} holds {', '.join(self.fields)} {what} only; the data are "
                f"{ensemble.describe_field()}" + (f" (write them as {' or '.join(others)})" if others else "")
            )
        if self.dims and ensemble.ndim not in self.dims:
            return f"format {self.name} holds {self.dims} dimensional lattices; the data are {ensemble.ndim}D"
        if not self.multi and len(ensemble) != 1:
            return (
                f"format {self.name} holds one configuration per file; the ensemble has "
                f"{len(ensemble)} (write each one, or use hdf5)"
            )
        return None


def _is_gauge_kind(kind: str) -> bool:
    from flowplug.theory import field_space

    try:
        return bool(field_space(kind).gauge)
    except FlowplugError:
        return False


def _specs() -> Registry:
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
    parts: list[str] | list[int]
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
    """``"SU(3)"`` -> ``"su3"``; a gauge field kind of :func:`flowplug.theory.field_space`.

    Raises:
        FormatError: for anything but a gauge group (site fields are asked for by ``field``).
    """
    if group is None:
        return None
    g = str(group).strip().lower().replace("(", "").replace(")", "")
    if not _is_gauge_kind(g):
        raise FormatError(
            f"group {group!r}: expected su3, su2 (su<N>) or u1 (site fields such as scalar "
            "are asked for with field=...)"
        )
    return g


def read(
    path: str | os.PathLike,
    format: str | None = None,
    *,
    lattice: str | Sequence[int] | None = None,
    group: str | None = None,
    field: str | None = None,
    verify: bool = True,
    unitarity: str = "warn",
    **options: Any,
) -> Ensemble:
    """Read a lattice file into an :class:`Ensemble` (canonical layout, complex128/float64).

    Arguments:
        path: The file.
        format: Registry name to force a format; default: :func:`detect`.
        lattice: Extents x first (``"4x4x4x8"`` or a sequence); required for bare LIME
            files, otherwise checked against the file's own.
        group: ``su3``, ``su2``, ``u1``; required where the file does not say (bare
            LIME), otherwise checked against the file's own.
        field: The field kind expected (``scalar``, ``o2``, ``u1``, ``su3``...), checked
            against the file's own (an HDF5 store says which kind it holds).
        verify: Raise :class:`ChecksumError` on a failed stored check (checksums,
            header plaquette/link trace). With ``False`` the outcomes are still recorded
            in ``Metadata.checks``, nothing is raised.
        unitarity: ``"warn"``, ``"error"`` or ``"ignore"`` (see :func:`check_links`).
        **options: Format-specific options (HDF5: ``index`` to select configurations;
            ILDG/SciDAC/LIME: ``contiguous=False`` returns the links as a canonical-shaped
            view of the file order, without the permuted copy; other formats ignore it).

    The work on one configuration (reading, checksums, byte swaps, the value checks, the
    permuted copy) is spread over :func:`flowplug.linkcheck.io_threads` threads (torch's
    intra-op setting: ``OMP_NUM_THREADS``, :mod:`flowplug.threads`); the result is the same
    bit for bit whatever their number.

    Returns:
        The ensemble; ``meta[i].header["unitarity"]``/``["determinant"]`` hold the
        deviations found; ``meta[i].header["boundary"] = "open"`` marks a configuration
        whose time links on the last time slice are all zero (openQCD/CLS open
        boundaries; those links are left out of the unitarity check).

    Raises:
        FormatError: on missing, truncated or malformed files, NaN/Inf payloads, a
            lattice/group/field that disagrees with the file, or (``unitarity="error"``)
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
        with wanting_group_check(unitarity != "ignore"):  # readers may measure it while in cache
            ensemble = handler.read(path, lattice=dims, group=grp, **options)
    except FlowplugError:
        raise
    except MemoryError:
        raise FormatError(f"{path}: not enough memory to read it as {name}") from None
    except (
        OSError,
        ValueError,
        KeyError,
        IndexError,
        TypeError,
        ArithmeticError,
        EOFError,
        UnicodeError,
        RuntimeError,
        struct.error,
    ) as exc:
        raise FormatError(f"{path}: unreadable as {name}: {type(exc).__name__}: {exc}") from None
    for asked in (grp, None if field is None else str(field).strip().lower()):
        if asked is not None and ensemble.field != asked:
            raise FormatError(f"{path}: holds {ensemble.describe_field()}, not {asked} as asked")
    if dims is not None and ensemble.lattice != dims:
        raise FormatError(
            f"{path}: lattice is {'x'.join(map(str, ensemble.lattice))}, not {'x'.join(map(str, dims))} as given"
        )
    check_links(ensemble, source=str(path), unitarity="ignore")  # NaN/Inf first: the clearest message
    if is_sun(ensemble):
        for m, is_open in zip(ensemble.meta, open_time_boundary(ensemble.links), strict=True):
            if is_open:
                m.header["boundary"] = "open"
    if verify:
        raise_failed_checks(ensemble, str(path))
    dev = check_links(ensemble, source=str(path), unitarity=unitarity, finite=False)
    for m in ensemble.meta:
        m.header.update(dev)
    return ensemble


def write(
    path: str | os.PathLike,
    ensemble: Ensemble | torch.Tensor,
    format: str | None = None,
    *,
    precision: int | None = None,
    overwrite: bool = False,
    append: bool = False,
    **options: Any,
) -> Path:
    """Write ``ensemble`` to ``path`` atomically (temporary file + rename).

    Arguments:
        path: Output file.
        ensemble: What to write: an :class:`Ensemble` (any field kind), or a gauge-link
            tensor in canonical layout (site fields need an Ensemble naming their kind).
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

    ILDG payloads are produced on :func:`flowplug.linkcheck.io_threads` threads (the
    bytes do not depend on their number).

    Returns:
        ``path``.

    Raises:
        FormatError: if ``path`` exists and neither ``overwrite`` nor ``append`` is set,
            if the format cannot hold the data (field kind, dimension, batch size), or on an
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
        warnings.warn(
            f"{path}: written at the source's 32-bit precision, which rounds values that "
            "need more bits (such as the third row rebuilt from a two-row NERSC file, computed "
            "in double precision); precision=64 / --precision 64 keeps them exactly",
            PrecisionLossWarning,
            stacklevel=2,
        )
    from flowplug.fsutil import atomic_path

    try:
        if path.exists():
            if append:
                handler.append(path, ensemble, precision=prec, **options)
                return path
            if not overwrite:
                raise FormatError(f"{path} exists; refusing to overwrite it (overwrite=True / --force replaces it)")
        with atomic_path(path) as tmp:
            handler.write(tmp, ensemble, precision=prec, **options)
    except OSError as exc:  # disk full, permissions...: a clear message, no partial file
        raise FlowplugError(f"{path}: cannot be written ({exc.strerror or exc})") from None
    return path


def format_of_name(path: str | os.PathLike, *, writable: bool | None = None) -> str | None:
    """The registered format whose file extension ``path`` ends in, or ``None``.

    Arguments:
        path: A file name (only its name is looked at; the file need not exist).
        writable: Only writable (``True``) or read-only (``False``) formats; default any.

    Returns:
        The format name (``"x.h5"`` -> ``"hdf5"``, ``"cfg.ILDG"`` -> ``"ildg"``), the first
        registered one when several claim the extension.
    """
    name = Path(path).name.lower()
    for spec in _specs():
        if writable is not None and spec.writable != writable:
            continue
        if any(name.endswith("." + ext.lower()) for ext in spec.extensions):
            return spec.name
    return None


def strip_format_extension(name: str) -> str:
    """``name`` without a trailing extension of a registered format (``x.ildg`` -> ``x``).

    Names without such an extension are returned as they are (``ckpoint_lat.1000``),
    as are names that would become empty.
    """
    lower = name.lower()
    for spec in _specs():
        for ext in sorted(spec.extensions, key=len, reverse=True):
            suffix = "." + ext.lower()
            if lower.endswith(suffix) and len(name) > len(suffix):
                return name[: -len(suffix)]
    return name


def _format_from_extension(path: Path) -> str:
    name = format_of_name(path, writable=True)
    if name is not None:
        return name
    raise FormatError(
        f"{path}: cannot tell the format from the extension; give format=... "
        f"(one of {', '.join(formats(writable=True))})"
    )


# ------------------------------------------------------------------------ input lists


def _expand_item(item: str | os.PathLike) -> tuple[list[Path], bool]:
    """Files named by one input item, and whether the item named a file itself."""
    text = str(item)
    p = Path(text)
    if p.is_dir():
        return sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith(".")), False
    if p.exists():
        return [p], True
    if glob.has_magic(text):
        found = sorted(Path(q) for q in glob.glob(text) if Path(q).is_file())
        if not found:
            raise FormatError(f"input pattern {text!r} matches no file")
        return found, False
    raise FormatError(f"input {text}: no such file or directory")


def expand_inputs(items: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named by ``items`` (files, directories, glob patterns), in order, without repeats.

    A directory gives its regular, non-hidden files, sorted; a glob pattern the files it
    matches, sorted.

    Raises:
        FormatError: for an item that names nothing.
    """
    out: list[Path] = []
    for item in items:
        for q in _expand_item(item)[0]:
            if q not in out:
                out.append(q)
    return out


def lattice_inputs(items: Sequence[str | os.PathLike], *, format: str | None = None) -> tuple[list[Path], list[Path]]:
    """Like :func:`expand_inputs`, leaving out the files of directories and globs that are
    not lattice files.

    A file found in a directory or by a glob pattern is left out when no registered
    format recognises it, by content or by extension (:func:`detect`): a ``README``, a
    log, a script. A file that looks like a lattice file (a LIME magic number, an
    ``.ildg`` name...) stays in, so that a corrupt one still fails when it is read, and
    so does every file named explicitly. With ``format`` forced, nothing is left out (the
    caller said what the files are).

    Returns:
        ``(files, skipped)``: the inputs, in order, without repeats; the files left out.

    Raises:
        FormatError: for an item that names nothing, or a file that cannot be read.
    """
    files: list[Path] = []
    skipped: list[Path] = []
    for item in items:
        found, explicit = _expand_item(item)
        for q in found:
            if q in files or q in skipped:
                continue
            if not explicit and format is None:
                _head(q)  # an unreadable file is an error, not a file to skip
                try:
                    detect(q)
                except FormatError:
                    skipped.append(q)
                    continue
            files.append(q)
    return files, skipped
