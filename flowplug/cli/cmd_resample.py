"""``flowplug resample ENSEMBLE... --flow CHECKPOINT --out DIR``: exact flow chains seeded
by an existing ensemble.

The job, its outputs and its configuration are :mod:`flowplug.jobs.resample`;
``--print-config`` prints the commented default configuration. Files of a directory that
are not lattice files (a ``README``) are skipped with one note on stderr. Ctrl-C names
the checkpoint and the command that continues the run.
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
from flowplug.jobs.resample import DEFAULT_CONFIG, OPEN_TABLES, run_resample
from flowplug.records import CommandSpec

#: The examples at the end of ``flowplug resample --help``.
EXAMPLES = (
    "# one chain per configuration of every lattice file in cfg/ (other files are skipped)",
    "flowplug resample cfg/ --flow runs/u1 --out run2",
    "flowplug resample cfg/*.ildg --flow runs/u1 --out run2 --set steps=100 --set save_every=50",
    "flowplug resample ens.h5 --flow runs/u1 --out run2 --to ildg --set kernel.hmc_every=4",
    "# a bare LIME file stores no lattice or group",
    "flowplug resample cfg.lime --lattice 4x4x4x4 --group su3 --flow runs/su3 --out run3",
    "# no flow: exact heatbath + overrelaxation chains of [action], one per input configuration",
    "flowplug resample cfg/ --out run4 --set action.name=wilson --set action.group=su3 --set action.beta=6.0 "
    "--set kernel.type=heatbath",
    "# continue a run, or extend a finished one (the flow and the inputs come from run2/run_files.json)",
    "flowplug resample --out run2 --set steps=200 --resume",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``flowplug resample``."""
    parser.add_argument("inputs", nargs="*", metavar="ENSEMBLE", help="configuration files, directories or globs")
    parser.add_argument(
        "--flow",
        metavar="CHECKPOINT",
        help="trained flow: a `flowplug train` run directory or its checkpoint.pt (required by flow "
        "kernels; without it the chains sample [action] with a kernel that needs no flow)",
    )
    parser.add_argument("--out", metavar="DIR", help="output directory (required)")
    parser.add_argument("--to", metavar="FORMAT", help="output format (default: the inputs')")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from DIR/chain.ckpt with the configuration stored in DIR/config.toml and the flow, "
        "inputs and read options in DIR/run_files.json (give only what changes: steps, output settings)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace existing output files: an earlier run's configuration files, ensemble.h5, provenance.json and "
        "measurements are removed first (never an input)",
    )
    parser.add_argument("--format", metavar="NAME", help="force the input format")
    parser.add_argument("--lattice", metavar="LXxLYxLZxLT", help="lattice of bare LIME inputs")
    parser.add_argument("--group", metavar="GROUP", help="group of bare LIME inputs")
    parser.add_argument("--no-verify", action="store_true", help="accept inputs whose checksums fail")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--no-check-inverse",
        action="store_true",
        help="use a flow whose inverse fails the round-trip check (log q through it is wrong)",
    )
    add_config_arguments(parser, example="steps=100")
    add_examples(parser, EXAMPLES)


def run(args: argparse.Namespace) -> int:
    """Resample the inputs (:mod:`flowplug.jobs.resample`) and print one line."""
    cfg = config_from_args(
        args, DEFAULT_CONFIG, open_tables=OPEN_TABLES, run_dir=lambda c: Path(args.out) if args.out else None
    )  # on --resume: from DIR/config.toml
    if cfg is None:
        return 0
    if not args.out or not (args.inputs or args.resume):
        raise ConfigError("flowplug resample needs ENSEMBLE... and --out DIR (and --flow CHECKPOINT for flow kernels)")
    if args.to:
        cfg["to"] = args.to
    with chain_resume_hint(args, Path(args.out) / "chain.ckpt"):
        s = run_resample(
            cfg,
            [Path(p) for p in args.inputs],
            Path(args.flow) if args.flow else None,
            Path(args.out),
            resume=args.resume,
            force=args.force,
            read_options={
                "format": args.format,
                "lattice": args.lattice,
                "group": args.group,
                "verify": False if args.no_verify else None,  # None: verify (or, on --resume, as the run did)
            },
            progress=False if args.no_progress else None,
            check_inverse=not args.no_check_inverse,
            log=lambda text: print(f"flowplug resample: {text}", file=sys.stderr),
        )
    if "rank" in s:  # a rank > 0 of a torchrun world: rank 0 reports
        return 0
    if "flow" not in s:
        ess = "n/a (no flow)"
    elif s.get("ess") is None:
        ess = "n/a (an action with auxiliary fields)"
    else:
        ess = f"{s['ess']:.3f}"
    print(
        f"resample: {s['chains']} chains x {s['steps']} steps, acceptance {s['acceptance']:.3f}, "
        f"ESS of input weights {ess}{observables_text(s)}; {s['written']} configurations "
        f"written to {args.out}"
    )
    return 0


COMMAND = CommandSpec(
    name="resample",
    description="exact flow-Metropolis chains seeded by an existing ensemble",
    factory=add_arguments,
    run=run,
)
