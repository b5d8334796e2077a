"""Options and helpers shared by every subcommand that runs from a configuration.

Conventions: ``--config FILE`` (TOML), ``--set dotted.key=value`` (repeatable),
``--print-config`` (print the complete commented default configuration and exit), and
results in ``<out>/summary.json``. Each command's ``--help`` ends with examples
(:func:`add_examples`) that use only keys the command accepts (``tests/test_help_examples.py``
parses every one). When Ctrl-C stops a run, :func:`resume_hint` makes the message name
the checkpoint and the exact command that continues the run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from flowplug import config as _config


def add_config_arguments(parser: argparse.ArgumentParser, *, example: str = "") -> None:
    """Add ``--config``, ``--set`` and ``--print-config`` to a subcommand parser.

    Arguments:
        parser: The subcommand's parser.
        example: A ``KEY=VALUE`` the command accepts, shown in the help of ``--set``
            (``hmc.trajectories=200`` for ``hmc``); empty: no example.
    """
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file")
    shown = f", e.g. --set {example}" if example else ""
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help=f"override one key{shown} (repeatable; values are TOML; --print-config lists the keys)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the complete default configuration with comments and exit "
        "(with --config/--set: the effective configuration)",
    )


def config_from_args(
    args: argparse.Namespace,
    default_text: str,
    *,
    open_tables: Iterable[str] = (),
    run_dir: Callable[[dict[str, Any]], Path | None] | None = None,
) -> dict[str, Any] | None:
    """The effective configuration of a run, or ``None`` after ``--print-config`` printed it.

    Arguments:
        args: The parsed arguments (``config``, ``overrides``, ``print_config``; ``resume``).
        default_text: The command's complete default configuration.
        open_tables: Its open tables.
        run_dir: For a chain command with ``--resume``: the run directory of a
            configuration (``None``: not known). When it holds the run's ``config.toml``,
            the configuration starts from that instead of the defaults
            (:func:`flowplug.jobs.provenance.resume_configuration`): the ``--set`` values of
            the original command need not be given again.

    Raises:
        ConfigError: on an unreadable file, an unknown key or a wrongly typed value.
    """
    effective = _config.build_config(
        default_text, config_file=args.config, overrides=args.overrides, open_tables=open_tables
    )
    resumed = None
    if run_dir is not None and getattr(args, "resume", False):
        directory = run_dir(effective)
        if directory is not None:
            from flowplug.jobs.provenance import resume_configuration

            resumed = resume_configuration(
                directory, default_text, config_file=args.config, overrides=args.overrides, open_tables=open_tables
            )
    if resumed is not None:
        effective = resumed
    if args.print_config:
        if args.config or args.overrides or resumed is not None:
            sys.stdout.write("# effective configuration\n" + _config.dumps(effective))
        else:
            sys.stdout.write(default_text)
        return None
    return effective


def add_examples(parser: argparse.ArgumentParser, examples: Sequence[str]) -> None:
    """End a subcommand's ``--help`` with example command lines, kept as written.

    Arguments:
        parser: The subcommand's parser.
        examples: Complete command lines (``flowplug hmc --set ...``), each optionally
            preceded by a comment line (``# seeded from a production file``); every
            command line must parse with the command's parser and configuration
            (``tests/test_help_examples.py``).
    """
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)


# ------------------------------------------------------------------ Ctrl-C


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def command_line(argv: Sequence[str], *, add: Sequence[str] = (), drop: Sequence[str] = ()) -> str:
    """``flowplug`` + ``argv`` as a shell command, with the flags ``drop`` removed and ``add``
    appended where missing (quoted for a POSIX shell)."""
    words = [a for a in argv if a not in drop]
    words += [a for a in add if a not in words]
    return shlex.join(["flowplug", *words])


def interrupted_message(checkpoint: Path, *, step: int | None, unit: str, resume: str | None, restart: str) -> str:
    """What a run stopped by Ctrl-C tells the user.

    Arguments:
        checkpoint: The run's checkpoint file.
        step: Its step (``None``: not readable).
        unit: What a step is (``trajectory``, ``step``).
        resume: The command that continues from the checkpoint, or ``None`` when this
            run has no checkpoint to continue from.
        restart: The command that starts the run again (when there is no checkpoint).
    """
    if resume is None:
        return f"no checkpoint of this run yet ({checkpoint} not written); start again with:\n  {restart}"
    at = f" ({unit} {step})" if step is not None else ""
    return f"the last checkpoint is {checkpoint}{at}; continue from it with:\n  {resume}"


@contextlib.contextmanager
def resume_hint(
    checkpoint: Path, *, resume: str, restart: str, resumed: bool = False, unit: str = "step"
) -> Iterator[None]:
    """Name the checkpoint and the resume command when Ctrl-C stops the block.

    A ``KeyboardInterrupt`` leaving the block gets the attribute ``flowplug_hint``
    (:func:`interrupted_message`), which :func:`flowplug.cli.main` prints after
    ``interrupted``. The checkpoint counts when this run wrote it, or when the run
    resumed from it (``resumed``); a checkpoint left by an earlier run that was started
    afresh (``--force``) does not.

    Arguments:
        checkpoint: The run's checkpoint file.
        resume: The command line that continues the run (:func:`command_line`).
        restart: The command line that starts it again.
        resumed: Whether the run resumed from ``checkpoint``.
        unit: What a step of the run is called.
    """
    before = _stat(checkpoint)
    try:
        yield
    except KeyboardInterrupt as exc:
        after = _stat(checkpoint)
        valid = after is not None and (after != before or resumed)
        step = None
        if valid:
            from flowplug.jobs.output import checkpoint_step

            step = checkpoint_step(checkpoint)
        # the attribute of the docstring, read by the command-line handler
        exc.flowplug_hint = interrupted_message(  # type: ignore[attr-defined]
            checkpoint, step=step, unit=unit, resume=resume if valid else None, restart=restart
        )
        raise


def chain_resume_hint(
    args: argparse.Namespace, checkpoint: Path, *, unit: str = "step"
) -> contextlib.AbstractContextManager[None]:
    """:func:`resume_hint` for a chain command (``hmc``, ``sample``, ``resample``): the
    command as typed, with ``--resume`` instead of ``--force`` (to continue) or with
    ``--force`` instead of ``--resume`` (to start again). Under torchrun the checkpoint is
    the process's own (``checkpoint.rank<r>.pt``, :mod:`flowplug.distributed`)."""
    import os

    argv = list(getattr(args, "_argv", None) or sys.argv[1:])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        checkpoint = checkpoint.with_name(f"{checkpoint.stem}.rank{os.environ.get('RANK', '0')}{checkpoint.suffix}")
    return resume_hint(
        Path(checkpoint),
        resume=command_line(argv, add=["--resume"], drop=["--force"]),
        restart=command_line(argv, add=["--force"], drop=["--resume"]),
        resumed=bool(args.resume),
        unit=unit,
    )


def observables_text(summary: dict[str, Any]) -> str:
    """``"; plaquette 0.6982 +- 0.0011 (tau_int 1.3); ..."`` for every observable of a job's
    summary (``"(frozen)"`` where tau_int is not finite), ``""`` when it has none."""
    import math

    parts = []
    for name, v in summary.get("observables", {}).items():
        tau = v.get("tau_int", float("nan"))
        parts.append(
            f"{name} {v['mean']:.6g} +- {v['error']:.2g} (tau_int {tau:.2g})"
            if math.isfinite(tau)
            else f"{name} {v['mean']:.6g} (frozen)"
        )
    return "".join(f"; {p}" for p in parts)
