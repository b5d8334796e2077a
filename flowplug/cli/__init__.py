"""The ``flowplug`` command line.

Subcommands are plugins (hook ``flowplug_commands``); the built-in ones live one file
each in this package (``cmd_<name>.py``, each defining a module-level ``COMMAND``
record). Exit codes: 0 success; 1 a user or input error (one-paragraph message on
stderr, no traceback unless ``--debug``); 2 a usage error (argparse); 130 Ctrl-C (the
message names the run's checkpoint and the command that continues it).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import traceback
import warnings
from collections.abc import Sequence

from flowplug._version import __version__
from flowplug.errors import FlowplugError, PluginLoadWarning


def _debug_parent(suppress: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="show the full traceback on errors",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand.

    Raises:
        PluginError: if loading plugins fails (strict mode, broken built-in).
    """
    from flowplug.manager import get_plugin_manager

    parser = argparse.ArgumentParser(
        prog="flowplug",
        description="Normalizing-flow sampling for lattice field theory: plugins, ensembles, exact Markov chains.",
        parents=[_debug_parent(False)],
    )
    parser.add_argument("--version", action="version", version=f"flowplug {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    pm = get_plugin_manager()
    for spec in pm.registry("command"):
        if spec.provider != "flowplug":
            # try a third-party command's arguments on a scratch parser first, so that a
            # broken one is skipped with a warning instead of breaking every command
            try:
                spec.factory(argparse.ArgumentParser(add_help=False, parents=[_debug_parent(True)]))
            except Exception as exc:
                pm.report_failure(
                    spec.plugin,
                    spec.provided_by,
                    f"failed to add command '{spec.name}': {type(exc).__name__}: {exc}",
                    exc,
                )
                continue
        sp = sub.add_parser(
            spec.name, help=spec.description, description=spec.description, parents=[_debug_parent(True)]
        )
        spec.factory(sp)
        sp.set_defaults(_run=spec.run)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line on stderr, without the source line that raised them."""
    print(f"flowplug: warning: {message}", file=sys.stderr if file is None else file)


def _message(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    # never split a word: paths, record names (scidac-checksum) and option names stay whole
    return textwrap.fill(text, width=100, subsequent_indent="  ", break_on_hyphens=False, break_long_words=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``flowplug`` command line; returns the exit code.

    Arguments:
        argv: Arguments without the program name; default ``sys.argv[1:]``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:  # answered without loading any plugin
        print(f"flowplug {__version__}")
        return 0
    debug = "--debug" in argv
    with warnings.catch_warnings():
        warnings.simplefilter("always", PluginLoadWarning)
        warnings.showwarning = _show_warning
        try:
            parser = build_parser()
        except FlowplugError as exc:
            if debug:
                traceback.print_exc()
            print(f"flowplug: error: {_message(exc)}", file=sys.stderr)
            return 1
        args = parser.parse_args(argv)
        if getattr(args, "_run", None) is None:
            parser.print_help(sys.stderr)
            return 2
        args._argv = list(argv)  # for messages that repeat the command (flowplug.cli.common.resume_hint)
        try:
            return int(args._run(args) or 0)
        except FlowplugError as exc:
            if args.debug:
                traceback.print_exc()
            print(f"flowplug {args.command}: error: {_message(exc)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt as exc:
            hint = getattr(exc, "flowplug_hint", "")
            print(f"flowplug {args.command}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
            return 130
        except BrokenPipeError:  # output piped into `head` and closed early
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
