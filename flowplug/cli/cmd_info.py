"""``flowplug info FILE... [--json]``: what a lattice file holds and whether it checks out.

For every file: format, lattice (x first), group, precision, record list, checksum
status (``ok``/``mismatch``/``absent``: every check value the file carries, see
:func:`flowplug.io.read`), plaquette and link trace (Re tr / N, 1 for the unit gauge),
max |U U^+ - 1| and max |det U - 1|. ``--json`` prints one JSON object per file and
line with at least the keys ``path, format, lattice, group, precision, checksum,
plaquette, link_trace``. Exit code 1 if a file cannot be read or fails a check.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from flowplug.errors import FlowplugError
from flowplug.records import CommandSpec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``flowplug info``."""
    parser.add_argument("files", nargs="+", metavar="FILE", help="lattice files")
    parser.add_argument("--json", action="store_true", help="one JSON object per file (JSON Lines)")
    parser.add_argument("--format", metavar="NAME", help="force the format instead of detecting it")
    parser.add_argument("--lattice", metavar="LXxLYxLZxLT", help="lattice, x first (bare LIME files)")
    parser.add_argument("--group", metavar="GROUP", help="su3, su2 or u1 (bare LIME files)")


def describe(path: str, *, format: str | None = None, lattice: str | None = None,
             group: str | None = None) -> dict[str, Any]:
    """The ``flowplug info`` record of one file.

    Returns:
        JSON-ready dict: ``path, format, lattice, group, precision, configurations,
        checksum, checks, plaquette, link_trace, unitarity, determinant, records,
        header``. For a file of several configurations the per-configuration values
        are lists.

    Raises:
        FlowplugError: if the file cannot be read (checksum mismatches are reported in
            the result, not raised).
    """
    from flowplug import io
    from flowplug.fsutil import _jsonable
    from flowplug.gauge import link_trace, plaquette

    ens = io.read(path, format, lattice=lattice, group=group, verify=False, unitarity="ignore")
    many = len(ens) != 1  # an empty HDF5 store gives empty lists

    def per(values: list[Any]) -> Any:
        return values if many else values[0]

    plaq = [float(v) for v in plaquette(ens.links)]
    trace = [float(v) for v in link_trace(ens.links)]
    if ens.group != "u1":  # the zero links of an open time boundary are not counted
        devs = io.link_deviations(ens)
        unit = [float(u) for u, _ in devs]
        det = [float(v) for _, v in devs]
    else:
        unit = det = [None] * len(ens)
    formats = sorted({m.format or "" for m in ens.meta}) or [format or io.detect(path)]
    return {
        "path": str(path),
        "format": formats[0] if len(formats) == 1 else formats,
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
        "records": per([m.record_list for m in ens.meta]),
        "header": per([_jsonable({k: v for k, v in m.header.items() if k not in ("unitarity", "determinant")})
                       for m in ens.meta]),
    }


def _text(info: dict[str, Any]) -> str:
    def fmt(v: Any, spec: str) -> str:
        if isinstance(v, list):
            values = [x for x in v if x is not None]
            if not values:
                return "n/a"
            if len(v) <= 4:
                return ", ".join(fmt(x, spec) for x in v)
            # many configurations: a summary line (per-configuration values are in --json)
            return (f"mean {format(sum(values) / len(values), spec)}, min {format(min(values), spec)}, "
                    f"max {format(max(values), spec)} over {len(values)} configurations")
        return "n/a" if v is None else format(v, spec)

    one = info["configurations"] == 1
    checks = info["checks"] if one else [c for cs in info["checks"] for c in cs]
    if len(checks) > 4:
        bad = [c for c in checks if not c["ok"]]
        detail = f"{len(checks) - len(bad)} of {len(checks)} checks agree" + "".join(
            f"; {c['quantity']} expected {c['expected']}, found {c['found']}" for c in bad)
    else:
        detail = "; ".join(f"{c['quantity']} {c['expected']}" + ("" if c["ok"] else f" != found {c['found']}")
                           for c in checks)
    records = info["records"] if one else (info["records"][0] if info["records"] else [])
    lines = [
        info["path"],
        f"  format        {info['format']}",
        f"  lattice       {'x'.join(map(str, info['lattice']))} (x first)",
        f"  group         {info['group']}",
        f"  precision     {info['precision']}",
        f"  configs       {info['configurations']}",
        f"  records       {'; '.join(records)}",
        f"  checksum      {info['checksum']}" + (f" ({detail})" if detail else ""),
        f"  plaquette     {fmt(info['plaquette'], '.12f')}",
        f"  link trace    {fmt(info['link_trace'], '.12f')}",
        f"  max|UU^+-1|   {fmt(info['unitarity'], '.3e')}",
        f"  max|detU-1|   {fmt(info['determinant'], '.3e')}",
    ]
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


COMMAND = CommandSpec(name="info", description="describe lattice files: format, lattice, checksums, "
                      "plaquette", factory=add_arguments, run=run)
