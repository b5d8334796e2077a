"""LIME containers: ILDG (read/write), SciDAC (read) and bare LIME (read) gauge files.

LIME record (DESIGN.md section 5): 144-byte big-endian header -- magic 0x456789AB
(uint32), version (uint16), flags (uint16: 0x8000 message begin, 0x4000 message end),
data length (uint64, without padding), record type (128 bytes ASCII, NUL padded) --
then the data and NUL padding to a multiple of 8 bytes.

Reading accepts what production codes write: XML records ending in a NUL byte (QIO),
``ildgFormat`` with or without its namespace (Grid omits it), ``scidac-binary-data``
with dimensions and precision from the private SciDAC records (QIO/QUDA), tmLQCD's
``xlf-info`` message (its plaquette is verified), careless MB/ME flags, checksum hex
of any case or width, and bare LIME files holding only a binary record (the caller
supplies lattice and group).

Writing produces the record set QIO (MILC, Chroma) and Grid write and Grid's reader
requires: message 1 ``scidac-private-file-xml``, ``scidac-file-xml``; message 2
``scidac-private-record-xml``, ``scidac-record-xml``, ``ildg-format``,
``ildg-data-lfn``, ``ildg-binary-data``, ``scidac-checksum``. ``scidac-file-xml``,
``scidac-record-xml`` and the LFN of the source are kept verbatim, and further records
of a LIME source (tmLQCD's ``xlf-info``) follow as messages of their own.

Payload: sites in lexicographic order, x fastest; per site the links mu = x, y, z, t;
each an N x N complex matrix, row-major, big-endian IEEE (``>c8``/``>c16``), i.e. a
numpy array of shape (lt, lz, ly, lx, 4, N, N).

References:
    USQCD c-lime (LIME format); QIO ``lib/qio_*`` record names; ILDG file format
    (``http://www.lqcd.org/ildg/filefmt.xsd``); Grid ``IldgIO.h``.
"""

from __future__ import annotations

import math
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flowplug.adapters.action_metadata import stated_action
from flowplug.adapters.checksums import ScidacChecksum, scidac_checksum
from flowplug.adapters.common import (
    canonical_to_ildg,
    decimals_tolerance,
    float_check,
    fmt_lattice,
    hex_check,
    read_ildg_canonical,
    read_ildg_file_order,
    write_ildg_payload,
)
from flowplug.errors import FormatError
from flowplug.hookspecs import hookimpl
from flowplug.io import Check, Ensemble, FormatHandler, Metadata, Record
from flowplug.records import FileFormatSpec
from flowplug.theory import su_n

LIME_MAGIC = 0x456789AB
LIME_HEADER = struct.Struct(">IHHQ128s")
MB_FLAG = 0x8000
ME_FLAG = 0x4000
BINARY_TYPES = ("ildg-binary-data", "scidac-binary-data")
ILDG_NS = "http://www.lqcd.org/ildg"
#: Largest metadata (non-binary) record read into memory.
MAX_META_RECORD = 64 * 2**20


@dataclass(frozen=True)
class LimeRecord:
    """Location of one LIME record: header offset, data offset and length, type, flags."""

    index: int
    offset: int
    data_offset: int
    length: int
    type: str
    flags: int
    version: int


#: The last :func:`scan` of :func:`_scan_once`: the file's identity (path, device, inode,
#: size, modification and change times in ns) and its records.
_last_scan: tuple[tuple[Any, ...], tuple[LimeRecord, ...]] | None = None


def _scan_once(path: Path) -> list[LimeRecord]:
    """:func:`scan`, reusing the previous result when it was of the same, unchanged file:
    reading a file sniffs its format with three handlers (ildg, scidac, lime) and then reads
    it, each of which needs its records (four scans of the same headers before). A file
    rewritten in place to the same size within one tick of the file system's clock (a few
    ms) would keep its old records: its checksums would then fail, not pass wrongly;
    flowplug itself writes a new file and renames it (a new inode)."""
    global _last_scan
    st = path.stat()
    key = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    last = _last_scan
    if last is not None and last[0] == key:
        return list(last[1])
    records = scan(path)
    _last_scan = (key, tuple(records))
    return records


def scan(path: Path) -> list[LimeRecord]:
    """List the records of a LIME file without reading their data.

    Raises:
        FormatError: on a wrong magic number, an undecodable record type, or a record
            whose length runs past the end of the file (never allocated).
    """
    size = path.stat().st_size
    records: list[LimeRecord] = []
    offset = 0
    with open(path, "rb") as fh:
        while offset < size:
            fh.seek(offset)
            head = fh.read(LIME_HEADER.size)
            if len(head) < LIME_HEADER.size:
                if records and not head.strip(b"\0"):
                    break  # trailing padding
                raise FormatError(
                    f"{path}: record {len(records)} header at byte {offset} is cut off "
                    f"({len(head)} of 144 bytes; truncated file)"
                )
            magic, version, flags, length, rtype = LIME_HEADER.unpack(head)
            if magic != LIME_MAGIC:
                if records and not head.strip(b"\0"):
                    break
                raise FormatError(
                    f"{path}: record {len(records)} at byte {offset}: LIME magic expected "
                    f"456789ab, found {magic:08x} (not a LIME file, or corrupt)"
                )
            name_bytes = rtype.split(b"\0", 1)[0]
            try:
                name = name_bytes.decode("ascii")
            except UnicodeDecodeError:
                name = ""
            if not name or not name.isprintable():
                raise FormatError(
                    f"{path}: record {len(records)} at byte {offset}: record type "
                    f"{name_bytes[:40]!r} is not printable ASCII (corrupt header)"
                )
            data_offset = offset + LIME_HEADER.size
            if length > size - data_offset:
                raise FormatError(
                    f"{path}: record {len(records)} '{name}' claims {length} bytes at byte "
                    f"{data_offset} but only {size - data_offset} remain (truncated file or "
                    "corrupt length field)"
                )
            records.append(LimeRecord(len(records), offset, data_offset, length, name, flags, version))
            offset = data_offset + length + (-length) % 8
    if not records:
        raise FormatError(f"{path}: empty file, no LIME record")
    return records


def _tag(xml: str, tag: str) -> str | None:
    m = re.search(rf"<(?:[\w.\-]+:)?{tag}(?:\s[^>]*)?>(.*?)</(?:[\w.\-]+:)?{tag}\s*>", xml, re.S)
    return m.group(1).strip() if m else None


def _int_tag(path: Path, rec: str, xml: str, tag: str) -> int | None:
    value = _tag(xml, tag)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise FormatError(f"{path}: {rec}: <{tag}> should be an integer, found {value[:40]!r}") from None


def _key_values(text: str) -> dict[str, str]:
    """``key = value`` pairs of tmLQCD ``xlf-info`` or MILC ``<info>`` text.

    tmLQCD puts several pairs on a line, separated by commas (``beta = 6.0, kappa = 0.17``);
    a comma inside quotes, or followed by text without ``=`` (MILC's
    ``quark.description = "O(a^2): couplings(pi)=0, Naik term, ..."``), belongs to the value.
    """
    out: dict[str, str] = {}
    for line in text.splitlines():
        pieces: list[str] = []
        for piece in re.split(r',(?=(?:[^"]*"[^"]*")*[^"]*$)', line):  # commas outside quotes
            if "=" in piece or not pieces:
                pieces.append(piece)
            else:
                pieces[-1] += "," + piece
        for piece in pieces:
            if "=" in piece:
                k, v = piece.split("=", 1)
                k, v = k.strip(), v.strip().strip('"')
                if k:
                    out[k] = v
    return out


def _number(value: str) -> Any:
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        return value


def _field_colors(path: Path, field: str) -> int:
    m = re.fullmatch(r"su(\d+)gauge", field.strip().lower())
    if not m:
        raise FormatError(f"{path}: ildg-format: <field> {field!r} is not supported; expected su3gauge (or su2gauge)")
    return int(m.group(1))


def read_lime(
    path: Path, *, lattice: tuple[int, ...] | None = None, group: str | None = None, **options: Any
) -> Ensemble:
    """Read an ILDG, SciDAC or bare LIME gauge file (see the module docstring).

    Arguments:
        path: The file.
        lattice: (lx, ly, lz, lt); required when the file has neither ``ildg-format``
            nor SciDAC private records, checked against them otherwise.
        group: ``su3``/``su2``; required (or guessed from the record length when
            unambiguous) for bare LIME files.
        **options: ``contiguous=False`` (``io.read(path, contiguous=False)``) returns the
            links as a canonical-shaped view of the file order (see
            :func:`flowplug.adapters.common.read_ildg_file_order`): the same values and
            checks, without the permuted copy; default ``True``, the contiguous
            canonical layout. Other options are ignored.

    Returns:
        An ensemble of one configuration; ``meta[0].format`` is ``ildg``, ``scidac`` or
        ``lime`` after what the file holds, with the SciDAC checksum outcome in
        ``meta[0].checks`` when the file carries one.

    Raises:
        FormatError: on structural problems (see :func:`scan`), a missing binary
            record, missing geometry, or a binary length that does not match
            lattice x group x precision.
    """
    recs = _scan_once(path)
    records: list[Record] = []
    binary: LimeRecord | None = None
    with open(path, "rb") as fh:
        for r in recs:
            if r.type in BINARY_TYPES:
                if binary is None:
                    binary = r
                continue
            if r.length > MAX_META_RECORD:
                raise FormatError(
                    f"{path}: metadata record '{r.type}' claims {r.length} bytes "
                    f"(over {MAX_META_RECORD}); corrupt length field"
                )
            fh.seek(r.data_offset)
            records.append(Record(r.type, fh.read(r.length)))
    record_list = [f"{r.type} ({r.length} bytes)" for r in recs]
    if binary is None:
        raise FormatError(
            f"{path}: no ildg-binary-data or scidac-binary-data record; the file holds "
            f"{', '.join(r.type for r in recs)}"
        )
    by_type: dict[str, Record] = {}
    for rec in records:
        by_type.setdefault(rec.type, rec)

    header: dict[str, Any] = {}
    n_colors = precision = None
    dims: tuple[int, ...] | None = None
    fmt_rec = by_type.get("ildg-format")
    if fmt_rec is not None:
        xml = fmt_rec.text
        field = _tag(xml, "field")
        prec = _int_tag(path, "ildg-format", xml, "precision")
        ext = [_int_tag(path, "ildg-format", xml, t) for t in ("lx", "ly", "lz", "lt")]
        if field is None or prec is None or None in ext:
            raise FormatError(f"{path}: ildg-format record lacks <field>, <precision> or <lx>..<lt>: {xml[:300]!r}")
        n_colors = _field_colors(path, field)
        if prec not in (32, 64):
            raise FormatError(f"{path}: ildg-format: <precision> must be 32 or 64, found {prec}")
        precision, dims = prec, tuple(ext)  # type: ignore[arg-type]
    else:
        prf = by_type.get("scidac-private-record-xml")
        pff = by_type.get("scidac-private-file-xml")
        if prf is not None and pff is not None:
            rxml, fxml = prf.text, pff.text
            p = (_tag(rxml, "precision") or "").upper()
            if p not in ("F", "D"):
                raise FormatError(f"{path}: scidac-private-record-xml: <precision> must be F or D, found {p[:20]!r}")
            precision = 32 if p == "F" else 64
            n_colors = _int_tag(path, "scidac-private-record-xml", rxml, "colors")
            count = _int_tag(path, "scidac-private-record-xml", rxml, "datacount")
            tsize = _int_tag(path, "scidac-private-record-xml", rxml, "typesize")
            if n_colors is None or n_colors < 1 or n_colors > 16:
                raise FormatError(
                    f"{path}: scidac-private-record-xml: <colors> missing or invalid "
                    f"({n_colors}); cannot tell the gauge group"
                )
            if count is not None and count != 4:
                raise FormatError(
                    f"{path}: scidac-private-record-xml: datacount {count}, expected 4 "
                    "(one matrix per direction); not a gauge configuration"
                )
            if tsize is not None and tsize != n_colors * n_colors * 2 * precision // 8:
                raise FormatError(
                    f"{path}: scidac-private-record-xml: typesize {tsize}, expected "
                    f"{n_colors * n_colors * 2 * precision // 8} for SU({n_colors}) at "
                    f"precision {p}"
                )
            text = _tag(fxml, "dims") or ""
            try:
                dims = tuple(int(t) for t in text.split())
            except ValueError:
                raise FormatError(f"{path}: scidac-private-file-xml: <dims> {text[:40]!r} are not integers") from None
            if len(dims) != 4 or any(n <= 0 for n in dims):
                raise FormatError(f"{path}: scidac-private-file-xml: <dims> {text[:40]!r}: expected 4 positive extents")
            header["scidac_datatype"] = _tag(rxml, "datatype")
    if dims is not None and lattice is not None and tuple(lattice) != dims:
        raise FormatError(f"{path}: file says lattice {fmt_lattice(dims)}, given {fmt_lattice(lattice)}")
    if n_colors is not None and group is not None and group != f"su{n_colors}":
        raise FormatError(f"{path}: file says SU({n_colors}) links, given group {group}")

    if dims is None:
        if lattice is None:
            raise FormatError(
                f"{path}: bare LIME file (record '{binary.type}', {binary.length} bytes, no ildg-format "
                "or SciDAC private records): the lattice is not stored. Give it: lattice=(lx, ly, lz, "
                "lt) and group='su3'/'su2' (CLI: --lattice 4x4x4x4 --group su2)"
            )
        if len(lattice) != 4:
            raise FormatError(f"{path}: LIME gauge files are 4-dimensional; given lattice {fmt_lattice(lattice)}")
        dims = tuple(lattice)
        vol = math.prod(dims)
        given_n = su_n(group)
        colors = [given_n] if given_n else [3, 2]
        fits = [(n, p) for n in colors for p in (64, 32) if vol * 4 * n * n * 2 * p // 8 == binary.length]
        if not fits:
            need = ", ".join(f"SU({n}) {p}-bit {vol * 4 * n * n * p // 4}" for n in colors for p in (64, 32))
            raise FormatError(
                f"{path}: record '{binary.type}' holds {binary.length} bytes, which fits no "
                f"gauge field on {fmt_lattice(dims)} (expected {need} bytes); check --lattice "
                "and --group"
            )
        if len(fits) > 1:
            raise FormatError(
                f"{path}: {binary.length} bytes on {fmt_lattice(dims)} fit both "
                f"{' and '.join(f'SU({n}) {p}-bit' for n, p in fits)}; give the group"
            )
        n_colors, precision = fits[0]
    assert n_colors is not None and precision is not None
    if len(dims) != 4 or any(n <= 0 for n in dims):
        raise FormatError(
            f"{path}: lattice extents {dims} must be 4 positive integers (corrupt ildg-format "
            "or scidac-private-file-xml record)"
        )
    vol = math.prod(dims)
    site_bytes = 4 * n_colors * n_colors * 2 * precision // 8
    if vol * site_bytes != binary.length:
        raise FormatError(
            f"{path}: record '{binary.type}' holds {binary.length} bytes; lattice "
            f"{fmt_lattice(dims)} with SU({n_colors}) links at precision {precision} needs "
            f"{vol * site_bytes} bytes (dims do not match the data length)"
        )

    checks = []
    ck = by_type.get("scidac-checksum")
    summer = ScidacChecksum(site_bytes) if ck is not None else None
    # one pass over the payload: each piece is checksummed, byte swapped and put in place
    # (pieces on flowplug.linkcheck.io_threads() threads, each checksummed by rank)
    reader = read_ildg_canonical if options.get("contiguous", True) else read_ildg_file_order
    links = reader(
        path,
        binary.data_offset,
        dims,
        n_colors,
        precision,
        what=f"record '{binary.type}'",
        on_piece=None if summer is None else lambda piece, start: summer.update_at(piece, start // site_bytes),
    )
    if ck is not None and summer is not None:
        xml = ck.text
        found = summer.digest()
        for tag, value in zip(("suma", "sumb"), found, strict=True):
            tag_text = _tag(xml, tag)
            try:
                expected = int((tag_text or "").strip(), 16)
            except ValueError:
                raise FormatError(f"{path}: scidac-checksum: <{tag}> {tag_text!r} is not a hex number") from None
            checks.append(hex_check(f"scidac-checksum {tag}", expected, value))
        header["scidac_checksum"] = {"suma": f"{found[0]:08x}", "sumb": f"{found[1]:08x}"}

    lfn = by_type.get("ildg-data-lfn")
    if lfn is not None:
        header["lfn"] = lfn.text.strip()
    xlf = by_type.get("xlf-info")
    if xlf is not None:
        kv = _key_values(xlf.text)
        header["xlf_info"] = {k: _number(v) for k, v in kv.items()}
        for key, std in (("plaquette", "plaquette"), ("trajectory nr", "trajectory"), ("beta", "beta")):
            if key in kv:
                header[std] = _number(kv[key])
        check = _xlf_plaquette_check(kv.get("plaquette"), links, precision)
        if check is not None:
            checks.append(check)
    for rtype in ("scidac-file-xml", "scidac-record-xml"):
        xml_rec = by_type.get(rtype)
        if xml_rec is not None:
            info = _tag(xml_rec.text, "info")
            if info:
                header.setdefault("xml_info", {}).update({k: _number(v) for k, v in _key_values(info).items()})
    action, action_note = stated_action(header, group=f"su{n_colors}")  # the action the metadata states
    if action is not None:
        header["action"] = action
    if action_note is not None:
        header["action_note"] = action_note
    if binary.type == "scidac-binary-data":
        source = "scidac"
    elif fmt_rec is not None:
        source = "ildg"
    else:
        source = "lime"
    meta = Metadata(
        format=source,
        path=str(path),
        precision=precision,
        header=header,
        records=records,
        record_list=record_list,
        checks=checks,
        provenance={"source": str(path), "format": source},
    )
    return Ensemble(links, precision=precision, meta=[meta])


def _xlf_plaquette_check(text: str | None, links: Any, precision: int) -> Check | None:
    """tmLQCD's ``xlf-info`` plaquette against the data, or ``None`` if it is absent or not a number.

    tmLQCD writes the mean over sites and planes of Re tr U_P / 3 (1 for the unit gauge,
    as its test file ``unity.lime`` stores: ``plaquette = 1.000000000000``), the
    normalisation of :func:`flowplug.gauge.plaquette`. It is computed from tmLQCD's
    double-precision field, so a 32-bit file agrees only to about 1e-7.
    """
    if text is None:
        return None
    try:
        expected = float(text)
    except ValueError:
        return None
    import torch

    from flowplug.gauge import plaquette

    finite = bool(torch.isfinite(torch.view_as_real(links)).all())
    found = float(plaquette(links)[0]) if finite else float("nan")
    tolerance = decimals_tolerance(text, 1e-6 if precision == 32 else 1e-10)
    return float_check("xlf-info plaquette", expected, found, tolerance)


def _lime_record(rtype: str, data: bytes, flags: int) -> bytes:
    head = LIME_HEADER.pack(LIME_MAGIC, 1, flags, len(data), rtype.encode("ascii"))
    return head + data + b"\0" * ((-len(data)) % 8)


def _xml(body: str) -> bytes:
    return ('<?xml version="1.0" encoding="UTF-8"?>' + body).encode("utf-8")


def ildg_records(
    ensemble: Ensemble, precision: int, *, lfn: str | None = None, date: str | None = None
) -> list[tuple[str, bytes | np.ndarray]]:
    """The (type, data) records of an ILDG file for a one-configuration ensemble, in order.

    The data of ``ildg-binary-data`` is the payload as a uint8 array (not copied into
    ``bytes``); every other record's data is ``bytes``. (:meth:`LimeHandler.write`
    writes the same records, streaming the payload instead of holding it.)

    Metadata records of the source (``scidac-file-xml``, ``scidac-record-xml``) and its
    LFN are reused verbatim; the private records, ``ildg-format`` and the checksum are
    generated for what is written. ``scidac-private-record-xml`` has the elements QIO
    1.1 writes for a colour matrix (``version, date, recordtype, datatype, precision,
    colors, typesize, datacount``): QIO leaves out ``spins`` when it is 0, as for gauge
    links, and its version 1.0 files (the MILC sample) say ``globaldata`` for ``recordtype``.
    """
    n = ensemble.n_colors
    payload = canonical_to_ildg(ensemble.links[0], precision).reshape(-1).view("u1")
    site_bytes = 4 * n * n * 2 * precision // 8
    suma, sumb = scidac_checksum(payload, site_bytes)
    return [
        *_ildg_head_records(ensemble, precision, lfn=lfn, date=date),
        ("ildg-binary-data", payload),
        _checksum_record(suma, sumb),
    ]


def _ildg_head_records(
    ensemble: Ensemble, precision: int, *, lfn: str | None = None, date: str | None = None
) -> list[tuple[str, bytes]]:
    """The records of :func:`ildg_records` before ``ildg-binary-data``."""
    meta = ensemble.meta[0]
    lx, ly, lz, lt = ensemble.lattice
    n = ensemble.n_colors
    letter = "F" if precision == 32 else "D"
    src_private = meta.record("scidac-private-record-xml")
    if date is None and src_private is not None:
        date = _tag(src_private.text, "date")
    if date is None:
        date = time.strftime("%a %b %d %H:%M:%S %Y UTC", time.gmtime())
    file_xml = meta.record("scidac-file-xml")
    record_xml = meta.record("scidac-record-xml")
    if lfn is None:
        lfn = meta.header.get("lfn")
    return [
        (
            "scidac-private-file-xml",
            _xml(
                f"<scidacFile><version>1.1</version><spacetime>4</spacetime><dims>{lx} {ly} {lz} {lt} </dims>"
                "<volfmt>0</volfmt></scidacFile>"
            ),
        ),
        (
            "scidac-file-xml",
            file_xml.data if file_xml is not None else _xml("<info>gauge configuration written by flowplug</info>"),
        ),
        (
            "scidac-private-record-xml",
            _xml(
                f"<scidacRecord><version>1.1</version><date>{date}</date><recordtype>0</recordtype>"
                f"<datatype>USQCD_{letter}{n}_ColorMatrix</datatype><precision>{letter}</precision>"
                f"<colors>{n}</colors><typesize>{n * n * 2 * precision // 8}</typesize>"
                "<datacount>4</datacount></scidacRecord>"
            ),
        ),
        ("scidac-record-xml", record_xml.data if record_xml is not None else _xml("<info>flowplug gauge field</info>")),
        (
            "ildg-format",
            _xml(
                f'<ildgFormat xmlns="{ILDG_NS}"><version>1.0</version><field>su{n}gauge</field>'
                f"<precision>{precision}</precision><lx>{lx}</lx><ly>{ly}</ly><lz>{lz}</lz><lt>{lt}</lt>"
                "</ildgFormat>"
            ),
        ),
        ("ildg-data-lfn", (lfn or "lfn://flowplug/unnamed").encode("utf-8")),
    ]


def _checksum_record(suma: int, sumb: int) -> tuple[str, bytes]:
    return (
        "scidac-checksum",
        _xml(f"<scidacChecksum><version>1.0</version><suma>{suma:08x}</suma><sumb>{sumb:08x}</sumb></scidacChecksum>"),
    )


#: Record types :func:`ildg_records` writes itself.
STANDARD_RECORDS = frozenset(
    {
        "scidac-private-file-xml",
        "scidac-file-xml",
        "scidac-private-record-xml",
        "scidac-record-xml",
        "ildg-format",
        "ildg-data-lfn",
        "ildg-binary-data",
        "scidac-binary-data",
        "scidac-checksum",
    }
)
#: Metadata records made by non-LIME readers (headers of other formats): not copied into LIME files.
FOREIGN_RECORDS = frozenset({"nersc-header", "milc-header"})


def extra_records(ensemble: Ensemble) -> list[tuple[str, bytes]]:
    """Further metadata records of a LIME source (tmLQCD ``xlf-info``, ...), verbatim.

    :meth:`LimeHandler.write` appends them after the ILDG message, one message each, so
    that what a production code stored survives ILDG -> HDF5 -> ILDG. Readers that do
    not know them (QIO, Grid) skip them.
    """
    out = []
    for rec in ensemble.meta[0].records:
        if rec.type not in STANDARD_RECORDS and rec.type not in FOREIGN_RECORDS and len(rec.type) <= 128:
            out.append((rec.type, rec.data))
    return out


class LimeHandler(FormatHandler):
    """Reader shared by the ``ildg``, ``scidac`` and ``lime`` formats; ILDG writer."""

    fields = ("su3", "su2")
    extension = "ildg"

    def __init__(self, name: str) -> None:
        self.name = name

    def sniff(self, path: Path, head: bytes, size: int) -> int:
        """100 for the LIME flavour this handler names (ildg/scidac/bare lime), else 0."""
        if len(head) < 4 or struct.unpack(">I", head[:4])[0] != LIME_MAGIC:
            return 0
        try:
            types = [r.type for r in _scan_once(path)]
        except FormatError:
            return 10 if self.name == "ildg" else 0  # LIME, but broken: let ildg explain
        if "scidac-binary-data" in types:
            kind = "scidac"
        elif "ildg-format" in types:
            kind = "ildg"
        elif "ildg-binary-data" in types:
            kind = "lime"
        else:
            kind = "ildg"
        return 100 if kind == self.name else 0

    def read(self, path: Path, *, lattice=None, group=None, **options: Any) -> Ensemble:
        """See :func:`read_lime`."""
        return read_lime(path, lattice=lattice, group=group, **options)

    def write(
        self,
        path: Path,
        ensemble: Ensemble,
        *,
        precision: int,
        lfn: str | None = None,
        date: str | None = None,
        **options: Any,
    ) -> None:
        """Write one configuration as an ILDG file (QIO/Grid record set, SciDAC checksum).

        Arguments:
            path: Output (a temporary name; :func:`flowplug.io.write` renames it).
            ensemble: One SU(3) or SU(2) configuration (SU(2) as ``su2gauge``).
            precision: 32 or 64.
            lfn: ILDG logical file name; default: the source's, else a placeholder.
            date: Date in ``scidac-private-record-xml``; default the source's or now.
        """
        if self.name != "ildg":
            raise FormatError(f"format {self.name} is read-only; write ildg")
        head = _ildg_head_records(ensemble, precision, lfn=lfn, date=date)
        n = ensemble.n_colors
        site_bytes = 4 * n * n * 2 * precision // 8
        nbytes = math.prod(ensemble.lattice) * site_bytes
        summer = ScidacChecksum(site_bytes)
        # records 0-1: message 1; 2-7: message 2 (binary data = record 6, checksum = 7)
        with open(path, "wb") as fh:
            for i, (rtype, data) in enumerate(head):
                fh.write(_lime_record(rtype, data, MB_FLAG if i in (0, 2) else ME_FLAG if i == 1 else 0))
            fh.write(LIME_HEADER.pack(LIME_MAGIC, 1, 0, nbytes, b"ildg-binary-data"))
            # the payload is produced, checksummed and written piece by piece
            written = write_ildg_payload(
                fh,
                ensemble.links[0],
                precision,
                on_piece=lambda piece, start: summer.update_at(piece, start // site_bytes),
            )
            if written != nbytes:  # pragma: no cover - the layout fixes the size
                raise FormatError(f"{path}: wrote {written} payload bytes, expected {nbytes}")
            fh.write(b"\0" * ((-nbytes) % 8))
            rtype, data = _checksum_record(*summer.digest())
            fh.write(_lime_record(rtype, data, ME_FLAG))
            for rtype, data in extra_records(ensemble):
                fh.write(_lime_record(rtype, data, MB_FLAG | ME_FLAG))


def _ildg() -> LimeHandler:
    return LimeHandler("ildg")


def _scidac() -> LimeHandler:
    return LimeHandler("scidac")


def _lime() -> LimeHandler:
    return LimeHandler("lime")


@hookimpl
def flowplug_file_formats() -> list[FileFormatSpec]:
    """ILDG (read/write), SciDAC (read) and bare LIME (read)."""
    return [
        FileFormatSpec(
            name="ildg",
            description="ILDG/LIME gauge configuration (QIO/Grid record set, SciDAC checksum)",
            factory=_ildg,
            extensions=("ildg",),
            aliases=("ildg-lime",),
            writable=True,
        ),
        FileFormatSpec(
            name="scidac",
            description="SciDAC (QIO/QUDA) LIME file with scidac-binary-data",
            factory=_scidac,
            extensions=("scidac",),
        ),
        FileFormatSpec(
            name="lime",
            description="bare LIME file with only a binary record (give lattice and group)",
            factory=_lime,
            extensions=("lime",),
            aliases=("bare-lime",),
        ),
    ]
