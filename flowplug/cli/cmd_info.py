"""``flowplug info FILE... [--json]``: what a lattice file holds and whether it checks out.

For every file: format, field kind, lattice (x first), gauge group, precision, record
list, checksum status (``ok``/``mismatch``/``absent``: every check value the file
carries, see :func:`flowplug.io.read`); for gauge fields the plaquette and link trace
(Re tr / N, 1 for the unit gauge) and, for SU(N), max |U U^+ - 1| and max |det U - 1|;
for site fields (an HDF5 store of phi^4 or O(2) configurations) the registered
observables of that field kind that need no options (``magnetization``...).
Where the file's metadata states the gauge action it was generated with (MILC's
``gauge.description``, ``gauge.beta11``, ``gauge.tadpole.u0``; tmLQCD's ``beta``,
``c2_rec``: :mod:`flowplug.adapters.action_metadata`), it prints that action as the
``[action]`` table that builds it (``action`` in the JSON, with ``action_note``: where
it was read and what it leaves out, such as dynamical quarks).
``--json`` prints one JSON object per file and line with at least the keys ``path,
format, field, lattice, group, precision, checksum, plaquette, link_trace`` (``group``,
``plaquette`` and ``link_trace`` are null for site fields). Exit code 1 if a file
cannot be read or fails a check.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from flowplug.errors import FlowplugError
from flowplug.records import CommandSpec

if TYPE_CHECKING:
    from flowplug.ensemble import Ensemble


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``flowplug info``."""
    parser.add_argument("files", nargs="+", metavar="FILE", help="lattice files")
    parser.add_argument("--json", action="store_true", help="one JSON object per file (JSON Lines)")
    parser.add_argument("--format", metavar="NAME", help="force the format instead of detecting it")
    parser.add_argument("--lattice", metavar="LXxLYxLZxLT", help="lattice, x first (bare LIME files)")
    parser.add_argument("--group", metavar="GROUP", help="su3, su2 or u1 (bare LIME files)")


def describe(
    path: str, *, format: str | None = None, lattice: str | None = None, group: str | None = None
) -> dict[str, Any]:
    """The ``flowplug info`` record of one file.

    Returns:
        JSON-ready dict: ``path, format, field, lattice, group, precision,
        configurations, checksum, checks, plaquette, link_trace, unitarity,
        determinant, observables, action, action_note, records, header``. ``action`` is
        the ``[action]`` table (name and parameters) of the action the file's metadata
        states (the reader's ``header["action"]``), ``None`` where it states none;
        ``action_note`` says where it was read. For a file of several
        configurations the per-configuration values are lists. Values that do not
        apply to the field kind are ``None`` (``group``, ``plaquette``, ``link_trace``
        of a site field; ``unitarity``, ``determinant`` of U(1) angles and site fields);
        ``observables`` maps the name of each option-free observable registered for a
        site field's kind to its value(s) (empty for gauge fields).

    Raises:
        FlowplugError: if the file cannot be read (checksum mismatches are reported in
            the result, not raised).
    """
    from flowplug import io
    from flowplug.fsutil import jsonable
    from flowplug.gauge import link_trace, plaquette

    ens = io.read(path, format, lattice=lattice, group=group, verify=False, unitarity="ignore")
    many = len(ens) != 1  # an empty HDF5 store gives empty lists

    def per(values: list[Any]) -> Any:
        return values if many else values[0]

    none: list[Any] = [None] * len(ens)
    if ens.is_gauge:
        plaq = [float(v) for v in plaquette(ens.links)]
        trace = [float(v) for v in link_trace(ens.links)]
    else:
        plaq = trace = none
    if io.is_sun(ens):  # the zero links of an open time boundary are not counted
        devs = io.link_deviations(ens)
        unit = [float(u) for u, _ in devs]
        det = [float(v) for _, v in devs]
    else:
        unit = det = none
    formats = sorted({m.format or "" for m in ens.meta}) or [format or io.detect(path)]
    return {
        "path": str(path),
        "format": formats[0] if len(formats) == 1 else formats,
        "field": ens.field,
        "lattice": list(ens.lattice),
        "group": ens.group,
        "precision": ens.precision,
        "configurations": len(ens),
        "checksum": ens.checksum_status,
        "checks": per([[c.as_dict() for c in m.checks] for m in ens.meta]),
        "plaquette": per(plaq),
        "link_trace": per(trace),
        "unitarity": per(unit),
        "determinant": per(det),
        "observables": {} if ens.is_gauge else {k: per(v) for k, v in site_observables(ens).items()},
        "action": per([m.header.get("action") for m in ens.meta]),
        "action_note": per([m.header.get("action_note") for m in ens.meta]),
        "records": per([m.record_list for m in ens.meta]),
        "header": per(
            [jsonable({k: v for k, v in m.header.items() if k not in ("unitarity", "determinant")}) for m in ens.meta]
        ),
    }


def site_observables(ens: Ensemble) -> dict[str, list[float]]:
    """Values of every registered observable of ``ens.field`` that needs no options.

    Arguments:
        ens: An ensemble (meant for site fields: ``scalar``, ``o2``...).

    Returns:
        ``{name: one float per configuration}`` in registry order; an observable that
        needs options, or fails on these data, is left out.
    """
    from flowplug.manager import registry

    out: dict[str, list[float]] = {}
    if len(ens) == 0:
        return out
    for spec in registry("observable"):
        if ens.field not in spec.fields:
            continue
        try:
            values = spec.factory(ens.data)
            out[spec.name] = [float(v) for v in values.reshape(len(ens))]
        except Exception:  # an observable that needs options (two_point's shift...) or fails
            continue
    return out


def _text(info: dict[str, Any]) -> str:
    def fmt(v: Any, spec: str) -> str:
        if isinstance(v, list):
            values = [x for x in v if x is not None]
            if not values:
                return "n/a"
            if len(v) <= 4:
                return ", ".join(fmt(x, spec) for x in v)
            # many configurations: a summary line (per-configuration values are in --json)
            return (
                f"mean {format(sum(values) / len(values), spec)}, min {format(min(values), spec)}, "
                f"max {format(max(values), spec)} over {len(values)} configurations"
            )
        return "n/a" if v is None else format(v, spec)

    one = info["configurations"] == 1
    checks = info["checks"] if one else [c for cs in info["checks"] for c in cs]
    if len(checks) > 4:
        bad = [c for c in checks if not c["ok"]]
        detail = f"{len(checks) - len(bad)} of {len(checks)} checks agree" + "".join(
            f"; {c['quantity']} expected {c['expected']}, found {c['found']}" for c in bad
        )
    else:
        detail = "; ".join(
            f"{c['quantity']} {c['expected']}" + ("" if c["ok"] else f" != found {c['found']}") for c in checks
        )
    records = info["records"] if one else (info["records"][0] if info["records"] else [])
    lines = [
        info["path"],
        f"  format        {info['format']}",
        f"  field         {info['field']}",
        f"  lattice       {'x'.join(map(str, info['lattice']))} (x first)",
    ]
    if info["group"] is not None:
        lines.append(f"  group         {info['group']}")
    lines += [
        f"  precision     {info['precision']}",
        f"  configs       {info['configurations']}",
        f"  records       {'; '.join(records)}",
        f"  checksum      {info['checksum']}" + (f" ({detail})" if detail else ""),
    ]
    if info["group"] is not None:
        lines += [
            f"  plaquette     {fmt(info['plaquette'], '.12f')}",
            f"  link trace    {fmt(info['link_trace'], '.12f')}",
            f"  max|UU^+-1|   {fmt(info['unitarity'], '.3e')}",
            f"  max|detU-1|   {fmt(info['determinant'], '.3e')}",
        ]
    for name, value in info.get("observables", {}).items():
        lines.append(f"  {name:<13} {fmt(value, '.12g')}")
    actions = [info.get("action")] if one else list(info.get("action") or [])
    notes = [info.get("action_note")] if one else list(info.get("action_note") or [])
    stated = [a for a in actions if a]
    if stated:
        same = all(a == stated[0] for a in stated)
        table = ", ".join(f"{k} = {json.dumps(v)}" for k, v in stated[0].items())
        lines.append(f"  action        {table}" + ("" if same else " (first configuration; they differ)"))
    if notes and notes[0]:
        if not stated:
            lines.append("  action        not read")
        lines.append(f"                ({notes[0]})")
    headers = [info["header"]] if one else info["header"]
    if any(h.get("boundary") == "open" for h in headers):
        lines.append("  boundary      open in time (zero links at t = T-1, left out of max|UU^+-1|)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Describe every file; errors on one file are reported and the others still shown."""
    status = 0
    errors: list[str] = []
    for path in args.files:
        try:
            info = describe(path, format=args.format, lattice=args.lattice, group=args.group)
        except FlowplugError as exc:
            if len(args.files) == 1:
                raise
            status = 1
            errors.append(str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}")
            if args.json:
                print(json.dumps({"path": path, "error": str(exc)}))
            continue
        if info["checksum"] == "mismatch":
            status = 1
        if args.json:
            print(json.dumps(info))
        else:
            print(_text(info))
    for e in errors:
        print(f"flowplug info: error: {e}", file=sys.stderr)
    return status


COMMAND = CommandSpec(
    name="info",
    description="describe lattice files: format, lattice, checksums, plaquette",
    factory=add_arguments,
    run=run,
)
