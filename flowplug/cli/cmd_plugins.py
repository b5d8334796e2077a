"""``flowplug plugins [--json]``: list every registered component and its provider.

Components are listed kind by kind (field kinds first, then actions, flow layers, ...);
a family of field kinds (``su``) shows its pattern's examples, and ``--json`` adds a
field kind's ``pattern``, ``gauge``, default ``observables`` and ``prior``.
"""

from __future__ import annotations

import argparse
import json
import sys

from flowplug.records import CommandSpec
from flowplug.registry import kind_word


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``flowplug plugins``."""
    parser.add_argument(
        "--json", action="store_true", help="one JSON array of {kind, name, aliases, provider, version, description}"
    )


def run(args: argparse.Namespace) -> int:
    """List components (kind, name, provider distribution and version, description)."""
    from flowplug.manager import get_plugin_manager

    pm = get_plugin_manager()
    rows = [c.summary() for c in pm.components()]
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    headers = ("kind", "name", "provider", "description")
    table = [
        (kind_word(r["kind"]), _name(r), f"{r['provider']} {r['version']}".strip(), r["description"]) for r in rows
    ]
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    print(fmt.format(*headers))
    for t in table:
        print(fmt.format(*t))
    return 0


def _name(row: dict) -> str:
    """Name, aliases in parentheses; a family of field kinds shows its members (``su: su2, su3, ...``)."""
    name = row["name"]
    if row.get("pattern"):
        name += ": " + ", ".join([*row.get("examples", []), "..."])
    if row["aliases"]:
        name += f" ({', '.join(row['aliases'])})"
    return name


COMMAND = CommandSpec(
    name="plugins", description="list registered components and their providers", factory=add_arguments, run=run
)
