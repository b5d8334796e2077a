"""``flowplug hmc``: exact HMC ensembles for any registered action, resumable.

``flowplug hmc --config FILE.toml [--set key=value ...] [--resume]``; the job, its
outputs and its configuration are :mod:`flowplug.jobs.hmc`. ``--print-config`` prints
the commented default configuration. Ctrl-C names the checkpoint and the command that
continues the run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flowplug.cli.common import (
    add_config_arguments,
    add_examples,
    chain_resume_hint,
    config_from_args,
    observables_text,
)
from flowplug.errors import ConfigError
from flowplug.jobs.hmc import DEFAULT_CONFIG, OPEN_TABLES, run_hmc
from flowplug.records import CommandSpec

#: The examples at the end of ``flowplug hmc --help``.
EXAMPLES = (
    "# a U(1) ensemble on 8x8 at beta = 2",
    "flowplug hmc --set action.group=u1 --set action.beta=2.0 --set lattice=[8,8] --set out=u1-run",
    "# seeded from a production file (its lattice is used)",
    "flowplug hmc --set action.group=su3 --set action.beta=6.0 --set format=ildg --set start=cfg.ildg "
    "--set out=su3-run",
    "# a bare LIME file stores no lattice or group: give them as lattice and action.group",
    "flowplug hmc --set action.group=su3 --set lattice=[4,4,4,4] --set start=cfg.lime --set out=su3-run",
    "# phi^4 at the tutorial point",
    "flowplug hmc --set action.name=phi4 --set action.m2=-4.0 --set action.lam=8.0 --set out=phi4-run",
    "# the Schwinger model: two Wilson flavours, pseudofermion HMC",
    "flowplug hmc --set action.name=schwinger --set action.beta=2.0 --set action.kappa=0.2 --set lattice=[8,8] "
    "--set out=schwinger-run",
    "# continue a run, or extend a finished one (its other settings come from u1-run/config.toml)",
    "flowplug hmc --set out=u1-run --set hmc.trajectories=500 --resume",
    "flowplug hmc --out u1-run --resume",
    "# configurations every 10 trajectories, a checkpoint every 50",
    "flowplug hmc --set out=u1-run --set save_every=10 --set checkpoint_every=50",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``flowplug hmc``."""
    add_config_arguments(parser, example="hmc.trajectories=200")
    parser.add_argument("--out", metavar="DIR", help="output directory (the same as --set out=DIR)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from <out>/checkpoint.pt (same chain as an uninterrupted run), with the configuration "
        "stored in <out>/config.toml (a start file is not read again: it may have moved): give only what "
        "changes (hmc.trajectories, output settings)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="start afresh even though <out> holds an earlier run: its configuration files (ensemble/traj_*), "
        "provenance.json and measurements are removed first (never the start file)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_examples(parser, EXAMPLES)


def result_line(summary: dict, out: str) -> str:
    """The one-line result of an HMC run: the trajectories left out as thermalisation, acceptance,
    every observable (with chi_t), the output."""
    chains = summary["chains"]
    return (
        f"flowplug hmc: {summary['trajectories']} trajectories x {chains} chain{'s' if chains != 1 else ''}"
        + (f" (the first {summary['thermalization']} left out)" if "thermalization" in summary else "")
        + f"; acceptance {summary.get('acceptance', float('nan')):.3f}"
        + observables_text(summary)
        + f"; results in {out}"
    )


def run(args: argparse.Namespace) -> int:
    """Execute ``flowplug hmc``."""
    if args.out and any(o.split("=", 1)[0].strip() == "out" for o in args.overrides):
        raise ConfigError("give the output directory once: --out DIR or --set out=DIR, not both")
    cfg = config_from_args(
        args, DEFAULT_CONFIG, open_tables=OPEN_TABLES, run_dir=lambda c: Path(args.out or str(c["out"]))
    )  # on --resume: from <out>/config.toml
    if cfg is None:
        return 0
    if args.out:
        cfg["out"] = args.out
    with chain_resume_hint(args, Path(str(cfg["out"])) / "checkpoint.pt", unit="trajectory"):
        summary = run_hmc(
            cfg,
            resume=args.resume,
            force=args.force,
            progress=False if args.no_progress else None,
            log=lambda text: print(f"flowplug hmc: {text}", file=sys.stderr),
        )
    if "rank" in summary:  # a rank > 0 of a torchrun world: rank 0 reports
        return 0
    print(result_line(summary, str(cfg["out"])))
    return 0


COMMAND = CommandSpec(
    name="hmc",
    description="exact HMC ensembles (phi4, Wilson and improved gauge actions, Schwinger, plugins), resumable",
    factory=add_arguments,
    run=run,
)
