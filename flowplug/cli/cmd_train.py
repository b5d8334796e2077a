"""``flowplug train``: train a normalizing flow for a lattice action, with checkpoints and resume.

    flowplug train --config examples/train_phi4.toml [--set train.steps=500 ...]
    flowplug train --resume OUT_DIR [--set train.steps=5000]

The job, its outputs and its configuration are :mod:`flowplug.jobs.train`;
``--print-config`` prints the commented default configuration (with ``--resume``: the
run's stored configuration). Ctrl-C finishes the step in progress, writes a checkpoint
and names it with the command that continues the run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flowplug.cli.common import add_config_arguments, add_examples, command_line, config_from_args, resume_hint
from flowplug.errors import ConfigError
from flowplug.jobs.train import (
    DEFAULT_CONFIG,
    OPEN_TABLES,
    RESUME_KEYS,
    resume_train,
    run_train,
    stored_config,
)
from flowplug.records import CommandSpec

#: The examples at the end of ``flowplug train --help``.
EXAMPLES = (
    "# train from an example configuration (writes runs/u1/checkpoint.pt)",
    "flowplug train --config examples/train_u1.toml",
    "flowplug train --config examples/train_phi4.toml --set train.steps=500 --set out=runs/phi4",
    "flowplug train --set action.name=wilson --set action.group=u1 --set action.beta=2.0 "
    "--set 'flow.layers=[\"u1-ncp\"]' --set out=runs/u1",
    "# continue a run, or extend a finished one",
    "flowplug train --resume runs/u1 --set train.steps=5000",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``flowplug train``."""
    add_config_arguments(parser, example="train.steps=500")
    parser.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR from its checkpoint (bit-for-bit); only "
        "train.steps, train.checkpoint_every, train.progress may be changed with --set",
    )
    parser.add_argument(
        "--force", action="store_true", help="start afresh even though <out> holds a checkpoint of an earlier run"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_examples(parser, EXAMPLES)


def _resume_overrides(args: argparse.Namespace) -> dict:
    """The ``[train]`` keys of ``--set`` (and ``--no-progress``) on ``--resume``."""
    from flowplug import config as _config

    keys = ", ".join(f"train.{k}" for k in RESUME_KEYS)
    overrides: dict = {}
    for text in args.overrides:
        tree = _config.parse_override(text)
        if set(tree) != {"train"}:
            raise ConfigError(f"--set {text}: only {keys} may change on --resume")
        overrides.update(tree["train"])
    if args.no_progress:
        overrides["progress"] = False
    return overrides


def _hint(args: argparse.Namespace, out: Path):
    """:func:`flowplug.cli.common.resume_hint` of a training run writing to ``out``."""
    from flowplug.train import CHECKPOINT_NAME

    argv = list(getattr(args, "_argv", None) or sys.argv[1:])
    if args.resume:
        again = command_line(argv)  # the resumed run's command continues it again
    else:
        again = command_line(["train", "--resume", str(out)] + (["--no-progress"] if args.no_progress else []))
    return resume_hint(
        out / CHECKPOINT_NAME, resume=again, restart=command_line(argv, add=["--force"]), resumed=bool(args.resume)
    )


def run(args: argparse.Namespace) -> int:
    """Train (or resume) with :mod:`flowplug.jobs.train` and print one line; returns 0."""
    if args.resume:
        if args.config:
            raise ConfigError("--resume takes its configuration from the checkpoint; drop --config")
        overrides = _resume_overrides(args)
        if args.print_config:
            from flowplug import config as _config

            sys.stdout.write(_config.dumps(stored_config(args.resume)))
            return 0
        from flowplug.train import checkpoint_path

        with _hint(args, checkpoint_path(args.resume).parent):
            s = resume_train(args.resume, overrides=overrides, log=lambda text: print(text, file=sys.stderr))
    else:
        cfg = config_from_args(args, DEFAULT_CONFIG, open_tables=OPEN_TABLES)
        if cfg is None:
            return 0
        if args.no_progress:
            cfg["train"]["progress"] = False
        with _hint(args, Path(str(cfg["out"]))):
            s = run_train(cfg, force=args.force)
    if "checkpoint" not in s:  # a rank > 0 of a torchrun world: rank 0 reports
        return 0
    out = Path(s["checkpoint"]).parent
    if s.get("init_from", {}).get("layers"):
        print(
            f"started from {s['init_from']['source']}: {len(s['init_from']['layers'])} layers took its parameters",
            file=sys.stderr,
        )
    print(
        f"steps {s['steps']} (skipped {s['skipped_steps']}, rollbacks {s['rollbacks']}), ESS {s['ess']:.4f}, "
        f"acceptance {s['acceptance']:.4f}, free energy {s['free_energy']:.4f}, "
        f"{s['steps_per_s'] or 0:.2f} steps/s -> {out}/summary.json"
    )
    return 0


COMMAND = CommandSpec(
    name="train",
    description="train a normalizing flow for a lattice action (checkpoints, resume)",
    factory=add_arguments,
    run=run,
)
