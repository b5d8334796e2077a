"""HDF5 ensemble store (h5py): many configurations of any field kind in one file, appendable.

Layout (``format_version`` 2)::

    /                    attributes:
        flowplug_format  "flowplug-ensemble"
        format_version   2
        field            field kind: "scalar" | "o2" | "u1" | "su2" | "su3" | "su<N>"
                         (any kind :func:`flowplug.theory.field_space` knows)
        lattice          int64[d], x first
        precision        32 | 64 (storage dtype of /links)
        count            configurations committed (0 .. count-1 are complete)
        layout           text describing the axes of /links
        attrs            JSON text: ensemble-wide values (beta, ensemble id, run parameters)
    /links   the field values, named links for every kind (the name of version 1):
             SU(N) (n, d, L_0, ..., L_{d-1}, N, N) complex64/complex128; U(1) angles
             (n, d, L...) float32/64; site fields (scalar, o2) (n, L_0, ..., L_{d-1})
             float32/64; little-endian, unlimited first axis, chunks of at most
             CHUNK_BYTES (4 MiB) within one configuration (see :func:`chunk_shape`)
    /meta    (n,) UTF-8 JSON text per configuration: source format and path, precision,
             header values, original records verbatim (base64), record list, check
             outcomes of the source, provenance, and ``crc32`` of the stored bytes

Version 1 stores (gauge fields only) name the kind in a ``group`` attribute instead of
``field``; they are read, and appended to, as they are.

The canonical layout is stored as is (no permutation, no byte swap). Appending grows
both datasets, writes the data and metadata, flushes, then raises ``count``; a reader
uses only the first ``count`` entries, so an interrupted append leaves the earlier
configurations readable. Reads verify each configuration's CRC-32. A 64-bit store
accepts 32-bit data (widened exactly; ``meta.precision`` keeps 32, and an ensemble read
back whose configurations all came from 32-bit data has precision 32 again).

References:
    h5py documentation (chunked, resizable datasets; variable-length strings).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from flowplug import compiled
from flowplug.adapters.common import fmt_lattice, hex_check, pread_exactly
from flowplug.errors import FlowplugError, FormatError, ShapeError
from flowplug.fsutil import jsonable
from flowplug.hookspecs import hookimpl
from flowplug.io import Check, Ensemble, FormatHandler, Metadata, Record
from flowplug.linkcheck import io_threads, mark_finite
from flowplug.records import FileFormatSpec
from flowplug.theory import FieldSpace, field_space

if TYPE_CHECKING:
    import h5py

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
FORMAT_TAG = "flowplug-ensemble"
#: Version written by this flowplug.
FORMAT_VERSION = 2
#: Versions read (1: gauge fields only, kind in the ``group`` attribute).
READ_VERSIONS = (1, 2)


def _h5py():
    import h5py

    return h5py


#: Target size of one HDF5 chunk of /links. HDF5 1.x refuses chunks of 4 GiB or more
#: (one direction of a 64^3 x 128 double SU(3) configuration is 4.8 GB); chunks of a few
#: MiB keep reads and appends efficient and the chunk cache useful.
CHUNK_BYTES = 4 << 20


def chunk_shape(shape: tuple[int, ...], itemsize: int, target: int = CHUNK_BYTES) -> tuple[int, ...]:
    """Chunk of /links for configurations of ``shape`` (without the batch axis).

    Whole configurations when they fit in ``target`` bytes; otherwise the outer axes
    (direction, then the lattice axes in storage order) are cut, keeping the inner
    ones whole, so that a chunk holds at most ``target`` bytes (or one innermost row of
    the colour matrices, whichever is larger).

    Returns:
        ``(1, c_0, c_1, ...)``: one configuration per chunk along the batch axis.
    """
    chunk = list(shape)
    for axis in range(len(shape)):
        inner = itemsize * int(np.prod(shape[axis + 1 :], dtype=np.int64))
        if inner * shape[axis] <= target:
            break  # this axis and everything inside it fit
        chunk[axis] = max(1, min(shape[axis], target // max(inner, 1)))
        if inner <= target:
            break
        # even one slice of this axis is too big: cut the next axis as well
    return (1, *chunk)


def _stored_dtype(field: str, precision: int) -> np.dtype:
    """Little-endian storage dtype of a field kind at a precision (c8/c16 or f4/f8)."""
    if field_space(field).dtype.is_complex:
        return np.dtype("<c8" if precision == 32 else "<c16")
    return np.dtype("<f4" if precision == 32 else "<f8")


def _layout_text(ensemble: Ensemble) -> str:
    """The ``layout`` attribute: what the axes of /links are."""
    lattice_axes = "x_0, ..., x_(d-1)"
    if not ensemble.is_gauge:
        return f"links[config, {lattice_axes}]: {ensemble.field} field on the sites; little-endian"
    if ensemble.n_colors == 1:
        what = f"mu, {lattice_axes}]: {ensemble.field} link angles"
    else:
        what = f"mu, {lattice_axes}, row, col]: {ensemble.field.upper()} link matrices"
    return f"links[config, {what}; mu = 0..d-1 = x, y, z, t; little-endian"


def _store_field(path: Path, f: h5py.File) -> tuple[str, FieldSpace]:
    """The field kind of an open store and its space (version 1: the ``group`` attribute).

    Raises:
        FormatError: if the store is not a flowplug ensemble store of a version this
            flowplug reads, or names a field kind it does not know.
    """
    if f.attrs.get("flowplug_format") not in (FORMAT_TAG, FORMAT_TAG.encode()):
        raise FormatError(
            f"{path}: HDF5 file without flowplug_format = '{FORMAT_TAG}' attribute: not a flowplug ensemble store"
        )
    version = int(f.attrs.get("format_version", -1))
    if version not in READ_VERSIONS:
        raise FormatError(
            f"{path}: ensemble store format_version {version}; this flowplug reads "
            f"{', '.join(map(str, READ_VERSIONS))} (a newer flowplug wrote it: upgrade)"
        )
    key = "group" if version == 1 else "field"
    if key not in f.attrs:
        raise FormatError(
            f"{path}: ensemble store (format_version {version}) lacks its '{key}' attribute (damaged file)"
        )
    kind = str(f.attrs[key]).strip().lower()
    try:
        return kind, field_space(kind)
    except FlowplugError as exc:
        raise FormatError(
            f"{path}: the store holds fields of kind {kind!r}, which this flowplug cannot represent ({exc})"
        ) from None


def _meta_json(meta: Metadata, stored: np.ndarray) -> str:
    doc = {
        "format": meta.format,
        "path": meta.path,
        "precision": meta.precision,
        "header": jsonable(meta.header),
        "records": [{"type": r.type, "data": base64.b64encode(r.data).decode("ascii")} for r in meta.records],
        "record_list": list(meta.record_list),
        "checks": [jsonable(c.as_dict()) for c in meta.checks],
        "provenance": jsonable(meta.provenance),
        "crc32": f"{compiled.crc32(np.ascontiguousarray(stored)):08x}",
    }
    return json.dumps(doc, sort_keys=True)


def _meta_from_json(path: Path, i: int, text: str | bytes) -> tuple[Metadata, str | None]:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    try:
        doc = json.loads(text)
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        records = [Record(str(r["type"]), base64.b64decode(r["data"], validate=True)) for r in doc.get("records", [])]
        checks = [
            Check(c["quantity"], c["expected"], c["found"], bool(c["ok"]), float(c.get("tolerance", 0)))
            for c in doc.get("checks", [])
        ]
        meta = Metadata(
            format=doc.get("format"),
            path=doc.get("path"),
            precision=int(doc.get("precision", 64)),
            header=dict(doc.get("header") or {}),
            records=records,
            record_list=list(doc.get("record_list") or []),
            checks=[],
            provenance=dict(doc.get("provenance") or {}),
        )
        meta.header.setdefault("source_checks", [c.as_dict() for c in checks])
    except (ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"{path}: /meta[{i}] is not valid flowplug metadata JSON ({exc})") from None
    return meta, doc.get("crc32")


#: With two or more I/O threads (:func:`flowplug.linkcheck.io_threads`), configurations
#: of at least this many bytes are read in chunk-aligned slabs, and the CRC-32 and the
#: finiteness proof of each slab are computed in a helper thread while the next slab is
#: read (the compiled pass and zlib release the GIL), so that the checks cost about the
#: read instead of adding to it. On one thread a configuration is read whole.
PIPELINE_BYTES = 8 << 20


def _slabs(shape: tuple[int, ...], chunk: tuple[int, ...] | None) -> list[tuple[Any, ...]]:
    """Selections cutting one configuration of ``shape`` into HDF5-chunk-aligned slabs.

    Each selection fixes the outer axes one index at a time up to the first axis the
    chunk cuts, takes a chunk-long range of that axis and the inner axes whole, so that
    every slab is contiguous in memory and the slabs, in order, cover the configuration
    in storage (C) order.
    """
    if chunk is None:
        return [()]
    cut = next((a for a in range(len(shape)) if chunk[a] < shape[a]), None)
    if cut is None:
        return [()]
    out = []
    for outer in np.ndindex(*shape[:cut]):
        for a in range(0, shape[cut], chunk[cut]):
            out.append((*outer, slice(a, min(shape[cut], a + chunk[cut]))))
    return out


#: Pieces of a direct read (:func:`_read_many`): small enough that a piece is still in the
#: (L2) cache when its CRC-32 and finiteness pass runs.
PIECE_BYTES = 1 << 20

#: The first HDF5 release whose chunk queries (``H5Dget_chunk_info``, ``..._by_coord``)
#: report file offsets that include a user block (HDFGroup/hdf5 issue 3003, fixed by pull
#: request 4236); before it they are short by the user block's size, and a chunked store
#: with a user block is read through HDF5 instead (:func:`_storage_runs`).
CHUNK_OFFSETS_FROM_FILE_START = (1, 14, 4)


def _storage_runs(links_ds: Any, i: int) -> list[tuple[int, int]] | None:
    """Where the bytes of stored configuration ``i`` lie in the file, when HDF5 keeps them there as they are.

    Returns:
        ``(file offset, length)`` runs (bytes) that, in order, hold configuration ``i``
        of /links in storage (C) order; ``None`` when the bytes are not stored that way
        and HDF5 must read them (any filter, external storage, a stored datatype other
        than the one read, a chunk that holds more than one configuration or cuts an
        axis while an axis outside it is more than one long, an unallocated or
        filtered chunk, a layout other than contiguous or chunked, an HDF5 library
        without chunk queries (before 1.10.5), a chunked store with a user block under
        an HDF5 before 1.14.4). The offsets are HDF5 addresses: offsets of the file only
        under the default ``sec2`` driver, which :func:`_direct_fd` checks.

    A chunk of the layout :func:`chunk_shape` writes, ``(1, 1, ..., 1, c, n_(k+1), ...)``,
    holds ``c`` slices of the axis k it cuts with every axis inside it whole: its first
    ``min(c, n_k - start) * row`` bytes are a run of the configuration (an edge chunk is
    padded at its end). The offsets are from the start of the file, a user block
    included: ``H5Dget_offset`` has always counted it, the chunk queries only from HDF5
    1.14.4 (:data:`CHUNK_OFFSETS_FROM_FILE_START`).
    """
    plan = _storage_plan(links_ds)
    return None if plan is None else plan(i)


def _storage_plan(links_ds: Any, wanted: int = 1) -> Callable[[int], list[tuple[int, int]] | None] | None:
    """:func:`_storage_runs` in two parts: what holds for the whole dataset, asked of HDF5 once
    (filters, datatype, layout, user block, chunk shape), and ``runs(i)`` for a configuration;
    ``None`` when no configuration can be read directly. ``runs(i)`` returns ``None`` for a
    configuration that cannot.

    For a chunked store ``runs(i)`` asks HDF5 where each chunk of configuration ``i`` lies
    (``H5Dget_chunk_info_by_coord``), or, when ``wanted`` configurations will be asked
    for and their chunks are at least a quarter of the store's (and 32 or more), looks
    them up in a table made by one pass over the chunk index (``H5Dchunk_iter``, about 2
    us a chunk against 6-60 us a query: reading a store of thousands of small
    configurations). A table whose chunk offsets are not all multiples of the chunk shape
    (chunk indices, as ``H5Dchunk_iter`` gave before HDFGroup/hdf5 pull request 1969) is
    not used: its keys would name other chunks."""
    h5py = _h5py()
    shape = tuple(int(n) for n in links_ds.shape[1:])
    itemsize = links_ds.dtype.itemsize
    config_bytes = itemsize * int(np.prod(shape, dtype=np.int64))
    errors = (AttributeError, TypeError, ValueError, KeyError, RuntimeError, OSError)
    try:
        dsid = links_ds.id
        dcpl = dsid.get_create_plist()
        if dcpl.get_nfilters() or dcpl.get_external_count():
            return None
        if not dsid.get_type() == h5py.h5t.py_create(links_ds.dtype):  # H5Tequal: the stored type is the one read
            return None
        layout = dcpl.get_layout()
        if layout == h5py.h5d.CONTIGUOUS:
            offset = dsid.get_offset()
            if offset is None:
                return None
            return lambda i: [(int(offset) + i * config_bytes, config_bytes)]
        chunks = links_ds.chunks
        if layout != h5py.h5d.CHUNKED or chunks is None or chunks[0] != 1:
            return None
        if (
            tuple(h5py.version.hdf5_version_tuple) < CHUNK_OFFSETS_FROM_FILE_START
            and h5py.h5i.get_file_id(dsid).get_create_plist().get_userblock()
        ):
            return None  # the chunk offsets would be short by the user block
        query = dsid.get_chunk_info_by_coord
    except errors:
        return None  # an HDF5 without the queries, or a layout it will not describe
    chunk = tuple(int(c) for c in chunks[1:])
    cuts = [a for a in range(len(shape)) if chunk[a] != shape[a]]
    cut = cuts[-1] if cuts else -1  # every axis inside it is whole in a chunk
    if any(chunk[a] != 1 for a in range(max(cut, 0))):
        return None
    row = itemsize * int(np.prod(shape[cut + 1 :], dtype=np.int64))
    step = chunk[cut] if cut >= 0 else 1
    extent = shape[cut] if cut >= 0 else 1
    # chunk coordinates (after the configuration's) and the bytes of the configuration in each
    places = [
        (
            (*outer, *((start,) if cut >= 0 else ()), *(0,) * (len(shape) - max(cut + 1, 0))),
            min(step, extent - start) * row,
        )
        for outer in np.ndindex(*shape[: max(cut, 0)])
        for start in range(0, extent, step)
    ]

    table: dict[tuple[int, ...], Any] = {}
    many = wanted * len(places)
    if many >= 32 and 4 * many >= int(links_ds.shape[0]) * len(places):
        try:
            dsid.chunk_iter(lambda info: table.__setitem__(tuple(info.chunk_offset), info))
            # HDF5 before pull request 1969 (HDFGroup/hdf5 issue 1419) gave each chunk's index
            # instead of its first element: keys that would name other chunks
            if table and (np.array(list(table), dtype=np.int64) % np.array(chunks, dtype=np.int64)).any():
                table.clear()
        except errors:
            table.clear()  # an HDF5 without the iteration: ask chunk by chunk
    lookup = table.get if table else query

    def runs(i: int) -> list[tuple[int, int]] | None:
        out = []
        try:
            for coord, length in places:
                info = lookup((i, *coord))
                if info is None:  # not in the table: never written
                    return None
                if info.byte_offset is None or info.filter_mask or info.size < length:
                    return None
                out.append((int(info.byte_offset), length))
        except errors:
            return None
        return out

    return runs


def _direct_fd(links_ds: Any) -> int | None:
    """HDF5's own file descriptor of the store holding ``links_ds``, when its
    configurations may be read from it directly (:func:`_read_many`); else ``None``.

    Only under the default ``sec2`` file driver are HDF5's addresses offsets of that one
    file (the family, multi/split and core drivers map them elsewhere), and only where the
    platform has ``os.preadv`` (not on Windows). Reading HDF5's descriptor rather than
    reopening the path keeps a store renamed over the path meanwhile out. Asked once per
    read: the property-list query costs about 20 us.
    """
    if not hasattr(os, "preadv"):
        return None
    h5py = _h5py()
    try:
        fid = h5py.h5i.get_file_id(links_ds.id)
        if fid.get_access_plist().get_driver() != h5py.h5fd.SEC2:
            return None
        return int(fid.get_vfd_handle())
    except (AttributeError, TypeError, ValueError, KeyError, RuntimeError, OSError):
        return None


def _read_many(
    path: Path, runs: list[list[tuple[int, int]]], data: np.ndarray, fd: int | None = None
) -> list[tuple[int, bool]]:
    """Read configuration ``j``'s ``runs[j]`` (:func:`_storage_runs`) into ``data[j]`` with
    positional reads; per configuration, the CRC-32 of its bytes and whether they are all finite.

    ``fd`` is the descriptor to read (the one HDF5 holds, so that the bytes come from the
    file whose offsets HDF5 gave even if ``path`` has been replaced since it was opened);
    ``None`` opens ``path``, which names the file in errors either way.

    The runs are cut into pieces of at most :data:`PIECE_BYTES`; pieces that follow each
    other both in the file and in ``data`` (the configurations of a store of small ones,
    one chunk each, written one after the other) are read with one call, up to that size.
    Each piece is checked (:func:`flowplug.compiled.crc32_finite`, continuing its
    configuration's CRC) right after it is read, while it is in cache; with two or more
    I/O threads and at least :data:`PIPELINE_BYTES` in all (one large configuration or many
    small ones), one helper thread checks the pieces read, in order, while the next are read.

    Raises:
        FormatError: if the file ends inside a run, or the runs of a configuration do not
            cover it exactly (naming the file and the byte counts).
        ValueError: if ``data`` is not C-contiguous.
    """
    if not data.flags.c_contiguous:
        raise ValueError("_read_many: data must be C-contiguous")
    flat = data.reshape(-1)
    raw = flat.view(np.uint8)
    itemsize = data.dtype.itemsize
    config_bytes = raw.size // max(1, len(runs))
    step = max(itemsize, PIECE_BYTES // itemsize * itemsize)
    # reads: [file offset, data offset, length, [(data offset, length, configuration), ...]]
    reads: list[list[Any]] = []
    for j, config_runs in enumerate(runs):
        at = j * config_bytes
        for offset, length in config_runs:
            for s in range(0, length, step):
                size = min(step, length - s)
                last = reads[-1] if reads else None
                # (in ``data`` the pieces always follow each other: configuration j, then j + 1)
                if last is not None and last[0] + last[2] == offset + s and last[2] + size <= step:
                    last[2] += size
                    last[3].append((at + s, size, j))
                else:
                    reads.append([offset + s, at + s, size, [(at + s, size, j)]])
            at += length
        if at != (j + 1) * config_bytes:
            raise FormatError(
                f"{path}: /links runs cover {at - j * config_bytes} bytes; the configuration has {config_bytes} "
                "(damaged file)"
            )
    crc = [0] * len(runs)
    finite = [True] * len(runs)

    def check(parts: list[tuple[int, int, int]]) -> None:
        for start, length, j in parts:
            crc[j], ok = compiled.crc32_finite(flat[start // itemsize : (start + length) // itemsize], crc[j])
            finite[j] = finite[j] and ok

    with contextlib.ExitStack() as stack:
        handle = fd if fd is not None else stack.enter_context(open(path, "rb", buffering=0)).fileno()

        def fill(offset: int, start: int, length: int) -> None:
            pread_exactly(handle, raw[start : start + length], offset, path, "/links")

        if len(reads) < 2 or raw.size < PIPELINE_BYTES or io_threads() < 2:
            for offset, start, length, parts in reads:
                fill(offset, start, length)
                check(parts)
        else:
            with ThreadPoolExecutor(max_workers=1) as pool:  # one worker: the pieces are summed in order
                pending = []
                for offset, start, length, parts in reads:
                    fill(offset, start, length)
                    pending.append(pool.submit(check, parts))
                for fut in pending:
                    fut.result()  # re-raises a failure of the worker
    return list(zip(crc, finite, strict=True))


#: Largest block of configurations :func:`_read_by_stretches` reads with one HDF5 call (bytes).
STRETCH_BYTES = 256 << 20


def _read_by_stretches(links_ds: Any, data: np.ndarray, sel: list[int]) -> list[tuple[int, bool]]:
    """Read stored configurations ``sel`` into ``data`` (``data[j]`` = configuration
    ``sel[j]``) through HDF5, one call per stretch of consecutive stored configurations (of
    at most :data:`STRETCH_BYTES`), for a store whose chunks hold several configurations
    (a compressed copy made by another tool, h5py's default chunks): read one configuration
    at a time, every chunk would be decompressed once for each configuration it holds (a
    gzip copy of 400 configurations of 4^4 took 32 s against 0.5 s for h5py). Each stored
    configuration is read once, however often it is selected.

    Returns:
        Per ``j``, the CRC-32 of the configuration's bytes and whether they are all finite.
    """
    where: dict[int, list[int]] = {}
    for j, i in enumerate(sel):
        where.setdefault(i, []).append(j)
    most = max(1, STRETCH_BYTES // max(1, data[0].nbytes if len(data) else 1))
    stretches: list[list[int]] = []
    for i in sorted(where):
        if stretches and stretches[-1][-1] == i - 1 and len(stretches[-1]) < most:
            stretches[-1].append(i)
        else:
            stretches.append([i])
    found: list[tuple[int, bool]] = [(0, True)] * len(sel)
    for stretch in stretches:
        a, m = stretch[0], len(stretch)
        block = np.empty((m, *data.shape[1:]), dtype=data.dtype)
        links_ds.read_direct(block, np.s_[a : a + m], np.s_[0:m])
        for k, i in enumerate(stretch):
            result = compiled.crc32_finite(block[k])
            for j in where[i]:
                data[j] = block[k]
                found[j] = result
    return found


def _checked_index(index: Any) -> int | slice | list[int] | None:
    """The ``index`` argument of a read as ``None``, an int, a slice or a list of ints.

    Raises:
        ShapeError: (a ValueError) for anything else, named: a bool or a boolean mask (not taken as the
            integers 0 and 1), a string, a float, a slice with step 0, a tensor or array of
            more than one axis.
    """
    if index is None or isinstance(index, slice):
        if isinstance(index, slice) and index.step == 0:
            raise ShapeError("index: a slice step cannot be zero")
        return index
    if isinstance(index, (torch.Tensor, np.ndarray)):
        if index.dtype in (torch.bool, np.bool_) or index.ndim > 1:
            raise ShapeError(
                f"index: expected integers (an int, a slice or a list), found an array of "
                f"{index.dtype} with shape {tuple(index.shape)}"
            )
        if index.ndim == 0:
            index = index.item()
        else:
            index = index.tolist()
    if isinstance(index, (bool, np.bool_)) or isinstance(index, (str, bytes)):
        raise ShapeError(f"index: expected an int, a slice or a list of ints, found {index!r}")
    if isinstance(index, (int, np.integer)):
        return int(index)
    try:
        items = list(index)
    except TypeError:
        raise ShapeError(f"index: expected an int, a slice or a list of ints, found {index!r}") from None
    for i in items:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise ShapeError(f"index: expected a list of ints, found {i!r} in it")
    return [int(i) for i in items]


def _meta_texts(meta_ds: Any, sel: list[int]) -> list[Any]:
    """The /meta entries of configurations ``sel``: one HDF5 read for a run of consecutive
    configurations (a whole store, a slice), one read each otherwise."""
    if len(sel) > 1 and sel == list(range(sel[0], sel[0] + len(sel))):
        return list(meta_ds[sel[0] : sel[0] + len(sel)])
    return [meta_ds[i] for i in sel]


def _bytes_in_file(links_ds: Any) -> bool:
    """Whether /links keeps the bytes of its values in its own file, one stored byte per
    byte (no filter, no external or virtual storage): then a selection cannot need more
    bytes than the file has. A compressed copy (h5repack -f GZIP) of compressible values
    (a cold start) or a dataset stored in other files can, and is read by HDF5."""
    h5py = _h5py()
    try:
        dcpl = links_ds.id.get_create_plist()
        return not (dcpl.get_nfilters() or dcpl.get_external_count() or dcpl.get_layout() == h5py.h5d.VIRTUAL)
    except (AttributeError, TypeError, ValueError, KeyError, RuntimeError, OSError):
        return True  # a dataset HDF5 will not describe: keep the size guard


def _read_configuration(path: Path, links_ds: Any, data: np.ndarray, i: int, j: int) -> tuple[int, bool]:
    """Read stored configuration ``i`` into ``data[j]`` through HDF5 (a store whose bytes HDF5
    must transform or locate: :func:`_storage_plan` gave no runs); the CRC-32 of its bytes and
    whether they are all finite, both from one pass (:func:`flowplug.compiled.crc32_finite`).

    With two or more I/O threads, a large configuration is read slab by slab
    (:func:`_slabs`), one helper thread checking the slabs already read while the next is
    read (:data:`PIPELINE_BYTES`); on one thread the configuration whole, then checked.
    ``path`` names the file in errors.
    """
    slabs = _slabs(tuple(data.shape[1:]), None if links_ds.chunks is None else tuple(links_ds.chunks[1:]))
    if len(slabs) < 2 or data[j].nbytes < PIPELINE_BYTES or io_threads() < 2:
        links_ds.read_direct(data, np.s_[i], np.s_[j])
        return compiled.crc32_finite(data[j])
    crc = [0]
    finite = [True]

    def accumulate(piece: np.ndarray) -> None:
        crc[0], piece_finite = compiled.crc32_finite(piece, crc[0])
        finite[0] = finite[0] and piece_finite

    with ThreadPoolExecutor(max_workers=1) as pool:  # one worker: the slabs are summed in order
        pending = []
        for sel in slabs:
            source, dest = (i, *sel), (j, *sel)
            links_ds.read_direct(data, source, dest)
            pending.append(pool.submit(accumulate, data[dest]))
        for fut in pending:
            fut.result()  # re-raises a failure of the worker
    return crc[0], finite[0]


class Hdf5Handler(FormatHandler):
    """HDF5 ensemble store: any field kind, any dimension, many configurations."""

    name = "hdf5"
    fields = ("*",)
    multi = True
    extension = "h5"
    dims = ()

    def sniff(self, path: Path, head: bytes, size: int) -> int:
        """100 for the HDF5 signature at offset 0."""
        return 100 if head.startswith(HDF5_MAGIC) else 0

    # ----------------------------------------------------------------------- reading

    def read(
        self,
        path: Path,
        *,
        lattice: tuple[int, ...] | None = None,
        group: str | None = None,
        index: int | slice | Sequence[int] | None = None,
        **options: Any,
    ) -> Ensemble:
        """Read (a selection of) the configurations of an HDF5 ensemble store.

        Arguments:
            index: ``None`` (all), an int, a slice, or a list of ints.

        Returns:
            The ensemble, of the store's field kind (format versions 1 and 2); each
            configuration's CRC-32 outcome is in ``meta[i].checks``; the source's own
            check outcomes are under ``meta[i].header["source_checks"]``.

        Raises:
            FormatError: if the file is not a flowplug ensemble store (of a version this
                flowplug reads), is damaged, names an unknown field kind, or the index is
                out of range.
            ShapeError: (a ValueError) if ``index`` is not an int, a slice or a list of
                ints (a boolean mask, a string or a float is refused, not reinterpreted).
        """
        index = _checked_index(index)
        h5py = _h5py()
        try:
            with h5py.File(path, "r") as f:
                return self._read(path, f, index)
        except FormatError:
            raise
        except Exception as exc:  # h5py raises OSError, KeyError, ValueError, RuntimeError...
            raise FormatError(
                f"{path}: damaged or not a flowplug HDF5 ensemble ({type(exc).__name__}: {exc})"
            ) from None

    def _read(self, path: Path, f: h5py.File, index: int | slice | Sequence[int] | None) -> Ensemble:
        field, space = _store_field(path, f)
        lattice = tuple(int(n) for n in f.attrs["lattice"])
        precision = int(f.attrs["precision"])
        count = int(f.attrs["count"])
        if not lattice or any(n <= 0 for n in lattice) or precision not in (32, 64):
            raise FormatError(
                f"{path}: attributes lattice {lattice} / precision {precision} are invalid (damaged file)"
            )
        links_ds, meta_ds = f["links"], f["meta"]
        shape = space.shape(lattice, 1)[1:]
        if tuple(links_ds.shape[1:]) != shape or links_ds.dtype != _stored_dtype(field, precision):
            raise FormatError(
                f"{path}: /links has shape {links_ds.shape[1:]} dtype {links_ds.dtype}; "
                f"attributes say {field} on {fmt_lattice(lattice)} at precision {precision}"
            )
        if not 0 <= count <= min(links_ds.shape[0], meta_ds.shape[0]):
            raise FormatError(
                f"{path}: count = {count} but /links holds {links_ds.shape[0]} and /meta "
                f"{meta_ds.shape[0]} entries (damaged file)"
            )
        if index is None:
            sel = list(range(count))
        elif isinstance(index, slice):
            sel = list(range(count))[index]
        else:
            sel = [index] if isinstance(index, (int, np.integer)) else list(index)
            for i in sel:
                if not -count <= int(i) < count:
                    raise FormatError(f"{path}: configuration {i} out of range (the store holds {count})")
            sel = [int(i) % count for i in sel]
        distinct = len(set(sel))  # a configuration asked for twice is stored once
        need = distinct * int(np.prod(shape)) * links_ds.dtype.itemsize
        if need > path.stat().st_size and _bytes_in_file(links_ds):  # then data cannot exceed the file
            raise FormatError(
                f"{path}: /links claims {need} bytes for {distinct} configuration(s) but the "
                f"file has {path.stat().st_size} bytes (damaged or not written by flowplug)"
            )
        data = np.empty((len(sel), *shape), dtype=links_ds.dtype)
        metas = []
        all_finite = True
        fd = _direct_fd(links_ds)
        plan = None if fd is None else _storage_plan(links_ds, len(sel))
        runs = [None] * len(sel) if plan is None else [plan(i) for i in sel]
        found_all: list[tuple[int, bool]] = []
        if plan is None and links_ds.chunks is not None and links_ds.chunks[0] > 1:
            found_all = _read_by_stretches(links_ds, data, sel)  # chunks holding several configurations
        j = len(found_all)
        while j < len(sel):  # each stretch of configurations straight from the file in one _read_many
            k = j
            while k < len(sel) and runs[k] is not None:
                k += 1
            if k > j:
                found_all += _read_many(path, cast("list[list[tuple[int, int]]]", runs[j:k]), data[j:k], fd)
                j = k
            else:  # one HDF5 cannot hand over (an unallocated chunk, say): HDF5 reads it
                found_all.append(_read_configuration(path, links_ds, data, sel[j], j))
                j += 1
        texts = _meta_texts(meta_ds, sel)
        for j, i in enumerate(sel):
            found, finite = found_all[j]
            all_finite = all_finite and finite
            meta, crc = _meta_from_json(path, i, texts[j])
            try:
                expected = int(str(crc), 16)
            except ValueError:
                raise FormatError(f"{path}: /meta[{i}] has no valid crc32") from None
            meta.checks.append(hex_check(f"hdf5 crc32 of configuration {i}", expected, found))
            meta.record_list = [f"hdf5 /links[{i}] ({data[j].nbytes} bytes)", f"hdf5 /meta[{i}]"]
            meta.format, meta.path = "hdf5", str(path)
            meta.precision = min(meta.precision, precision)
            metas.append(meta)
        out = data.astype(np.complex128 if space.dtype.is_complex else np.float64, copy=False)
        try:
            attrs = json.loads(str(f.attrs.get("attrs", "{}")))
        except ValueError:
            raise FormatError(f"{path}: root attribute 'attrs' is not JSON") from None
        # a 64-bit store may hold data exactly representable at 32 bits (their source precision)
        ens_precision = max((m.precision for m in metas), default=precision)
        values = torch.from_numpy(out)
        if all_finite:  # proven slab by slab while reading: flowplug.io.read skips its own pass
            mark_finite(values)
        return Ensemble(
            values,
            field=field,
            precision=ens_precision,
            meta=metas,
            attrs=attrs if isinstance(attrs, dict) else {},
        )

    def sources(self, path: Path) -> list[str]:
        """``provenance["source"]`` of every committed configuration (for resuming conversions)."""
        h5py = _h5py()
        out = []
        try:
            with h5py.File(path, "r") as f:
                count = int(f.attrs.get("count", 0))
                for i in range(count):
                    meta, _ = _meta_from_json(path, i, f["meta"][i])
                    out.append(str(meta.provenance.get("source", meta.path)))
        except FormatError:
            raise
        except Exception as exc:
            raise FormatError(f"{path}: damaged or not a flowplug HDF5 ensemble ({exc})") from None
        return out

    def stored_precision(self, path: Path) -> int:
        """Storage precision (32 or 64) of an existing store (for appending without rounding)."""
        h5py = _h5py()
        try:
            with h5py.File(path, "r") as f:
                value = int(f.attrs["precision"])
        except Exception as exc:
            raise FormatError(f"{path}: damaged or not a flowplug HDF5 ensemble ({exc})") from None
        if value not in (32, 64):
            raise FormatError(f"{path}: attribute precision = {value} (damaged file)")
        return value

    # ----------------------------------------------------------------------- writing

    def write(self, path: Path, ensemble: Ensemble, *, precision: int, **options: Any) -> None:
        """Create a store at ``path`` holding ``ensemble`` (any field kind, any number of
        configurations), format version 2."""
        h5py = _h5py()
        dtype = _stored_dtype(ensemble.field, precision)
        shape = tuple(ensemble.data.shape[1:])
        chunk = chunk_shape(shape, dtype.itemsize)
        with h5py.File(path, "w") as f:
            f.attrs["flowplug_format"] = FORMAT_TAG
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["field"] = ensemble.field
            f.attrs["lattice"] = np.asarray(ensemble.lattice, dtype=np.int64)
            f.attrs["precision"] = precision
            f.attrs["layout"] = _layout_text(ensemble)
            f.attrs["attrs"] = json.dumps(jsonable(ensemble.attrs), sort_keys=True)
            f.attrs["count"] = 0
            f.create_dataset("links", shape=(0, *shape), maxshape=(None, *shape), dtype=dtype, chunks=chunk)
            f.create_dataset("meta", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype("utf-8"), chunks=(64,))
            self._append(f, ensemble, dtype, precision)

    def append(self, path: Path, ensemble: Ensemble, *, precision: int, **options: Any) -> None:
        """Append ``ensemble`` to an existing store in place; ``count`` is raised last.

        Raises:
            FormatError: if the store holds another field kind, lattice or precision.
        """
        h5py = _h5py()
        try:
            with h5py.File(path, "r+") as f:
                if str(f.attrs.get("flowplug_format", "")) != FORMAT_TAG:
                    raise FormatError(f"{path}: not a flowplug ensemble store; cannot append")
                field, _ = _store_field(path, f)
                lattice = tuple(int(n) for n in f.attrs["lattice"])
                prec = int(f.attrs["precision"])
                if field != ensemble.field or lattice != ensemble.lattice:
                    raise FormatError(
                        f"{path}: holds {field} on {fmt_lattice(lattice)}; cannot append "
                        f"{ensemble.field} on {fmt_lattice(ensemble.lattice)}"
                    )
                if precision > prec:
                    raise FormatError(
                        f"{path}: stores {prec}-bit data; cannot append {precision}-bit data "
                        f"without rounding (pass precision={prec} / --precision {prec}, or "
                        "write a new store)"
                    )
                self._append(f, ensemble, _stored_dtype(field, prec), precision)
        except FormatError:
            raise
        except Exception as exc:
            raise FormatError(f"{path}: cannot append ({type(exc).__name__}: {exc})") from None

    def _append(self, f: h5py.File, ensemble: Ensemble, dtype: np.dtype, precision: int) -> None:
        count = int(f.attrs["count"])
        links_ds, meta_ds = f["links"], f["meta"]
        n = len(ensemble)
        # room for the new entries first, before anything is written: a copy of the store made
        # with fixed-size datasets (h5repack, h5py's create_dataset without maxshape) cannot grow
        for name, ds in (("links", links_ds), ("meta", meta_ds)):
            room = ds.maxshape[0] if ds.chunks is not None else ds.shape[0]
            if room is not None and room < count + n:
                raise FormatError(
                    f"{f.filename}: /{name} has room for {room} entries (a fixed-size dataset, as in a "
                    f"copy made by h5repack -l CONTI or by h5py without maxshape), and the store holds {count}: "
                    f"cannot append {n} more; nothing was written. Convert the store into a new "
                    "one (flowplug convert STORE NEW.h5) and append to that"
                )
        for ds in (links_ds, meta_ds):
            if ds.shape[0] < count + n:
                ds.resize(count + n, axis=0)
        src = ensemble.data.detach().cpu().resolve_conj().numpy()
        narrow = _stored_dtype(ensemble.field, 32)
        for j in range(n):
            value = src[j]
            if precision == 32 and dtype != narrow:
                value = value.astype(narrow)  # round first, then widen exactly
            stored = np.ascontiguousarray(value, dtype=dtype)
            links_ds.write_direct(stored, np.s_[...], np.s_[count + j])
            meta = ensemble.meta[j].copy()
            meta.precision = min(meta.precision, precision)
            meta.provenance.setdefault("source", meta.path)
            meta.provenance.setdefault("format", meta.format)
            meta_ds[count + j] = _meta_json(meta, stored)
        f.flush()
        f.attrs["count"] = count + n
        f.flush()


@hookimpl
def flowplug_file_formats() -> list[FileFormatSpec]:
    """The HDF5 ensemble store."""
    return [
        FileFormatSpec(
            name="hdf5",
            description="HDF5 ensemble store (many configurations, chunked, appendable, metadata and provenance)",
            factory=Hdf5Handler,
            extensions=("h5", "hdf5"),
            aliases=("h5",),
            writable=True,
        )
    ]
