"""Options and helpers shared by every subcommand that runs from a configuration.

Conventions: ``--config FILE`` (TOML), ``--set dotted.key=value`` (repeatable),
``--print-config`` (print the complete commented default configuration and exit), and
results in ``<out>/summary.json``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Iterable

from flowplug import config as _config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config``, ``--set`` and ``--print-config`` to a subcommand parser."""
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append",
                        default=[], help="override one key, e.g. --set hmc.trajectories=200 "
                                         "(repeatable; values are TOML)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the complete default configuration with comments and exit "
                             "(with --config/--set: the effective configuration)")


def config_from_args(args: argparse.Namespace, default_text: str, *,
                     open_tables: Iterable[str] = ()) -> dict[str, Any] | None:
    """The effective configuration of a run, or ``None`` after ``--print-config`` printed it.

    Raises:
        ConfigError: on an unreadable file, an unknown key or a wrongly typed value.
    """
    effective = _config.build_config(default_text, config_file=args.config,
                                     overrides=args.overrides, open_tables=open_tables)
    if args.print_config:
        if args.config or args.overrides:
            sys.stdout.write("# effective configuration\n" + _config.dumps(effective))
        else:
            sys.stdout.write(default_text)
        return None
    return effective
