"""``flowplug hmc``: exact HMC ensembles for any registered action, resumable.

``flowplug hmc --config FILE.toml [--set key=value ...] [--resume]``; the job, its
outputs and its configuration are :mod:`flowplug.jobs.hmc`. ``--print-config`` prints
the commented default configuration.
"""

from __future__ import annotations

import argparse
import sys

from flowplug.cli.common import add_config_arguments, config_from_args
from flowplug.jobs.hmc import DEFAULT_CONFIG, run_hmc
from flowplug.records import CommandSpec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``flowplug hmc``."""
    add_config_arguments(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue from <out>/checkpoint.pt (same chain as an uninterrupted run)")
    parser.add_argument("--force", action="store_true",
                        help="start afresh even though <out> holds a checkpoint of an earlier run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Execute ``flowplug hmc``."""
    cfg = config_from_args(args, DEFAULT_CONFIG)
    if cfg is None:
        return 0
    summary = run_hmc(cfg, resume=args.resume, force=args.force, progress=False if args.no_progress else None,
                      log=lambda text: print(f"flowplug hmc: {text}", file=sys.stderr))
    parts = [f"acceptance {summary.get('acceptance', float('nan')):.3f}"]
    for name, v in summary.get("observables", {}).items():
        parts.append(f"{name} {v['mean']:.6g} +- {v['error']:.2g} (tau_int {v['tau_int']:.2g})")
    chains = summary["chains"]
    print(f"flowplug hmc: {summary['trajectories']} trajectories x {chains} chain{'s' if chains != 1 else ''}; "
          + "; ".join(parts) + f"; results in {cfg['out']}")
    return 0


COMMAND = CommandSpec(name="hmc", description="exact HMC ensembles (phi4, U(1)/SU(N) Wilson, plugins), resumable",
                      factory=add_arguments, run=run)
