"""``flowplug sample --flow CHECKPOINT --out DIR``: exact Markov chains from a trained flow.

The job, its outputs and its configuration are :mod:`flowplug.jobs.sample`;
``--print-config`` prints the commented default configuration.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flowplug.cli.common import add_config_arguments, config_from_args
from flowplug.errors import ConfigError
from flowplug.jobs.sample import DEFAULT_CONFIG, run_sample
from flowplug.records import CommandSpec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``flowplug sample``."""
    parser.add_argument("--flow", metavar="CHECKPOINT", help="trained flow: a `flowplug train` run directory or its checkpoint.pt (required)")
    parser.add_argument("--out", metavar="DIR", help="output directory (required)")
    parser.add_argument("--resume", action="store_true", help="continue from DIR/chain.ckpt")
    parser.add_argument("--force", action="store_true", help="replace existing outputs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-check-inverse", action="store_true",
                        help="use a flow whose inverse fails the round-trip check (log q through it is wrong)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Sample (:mod:`flowplug.jobs.sample`) and print one line."""
    cfg = config_from_args(args, DEFAULT_CONFIG)
    if cfg is None:
        return 0
    if not args.flow or not args.out:
        raise ConfigError("flowplug sample needs --flow CHECKPOINT and --out DIR")
    s = run_sample(cfg, Path(args.flow), Path(args.out), resume=args.resume, force=args.force,
                   progress=not args.no_progress, check_inverse=not args.no_check_inverse)
    by_kernel = s["acceptance_by_kernel"]
    accs = ", ".join(f"{k} {v:.3f}" for k, v in by_kernel.items()) if by_kernel else f"{s['acceptance']:.3f}"
    print(f"sample: {s['chains']} chains x {s['steps']} steps, acceptance {accs}, "
          f"ESS of the flow weights {s['ess']:.3f}; results in {args.out}")
    return 0


COMMAND = CommandSpec(name="sample", description="exact Markov chains from a trained flow (independence "
                      "Metropolis, flow HMC, mixtures with HMC)", factory=add_arguments, run=run)
