"""``flowplug demo [--out DIR]``: the whole workflow on 2D U(1), L = 8, beta = 6, in about 3 minutes.

HMC ensemble (topologically frozen at this coupling), flow training, exact flow
resampling and a report that puts both samplers side by side against exact values;
the job, its outputs and its configuration are :mod:`flowplug.jobs.demo`. Config:
``--print-config``, ``--config``, ``--set`` as for every command (``--quick`` = a
seconds-long smoke run, numbers not meaningful).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flowplug.cli.common import add_config_arguments, add_examples, config_from_args
from flowplug.jobs.demo import DEFAULT_CONFIG, OPEN_TABLES, QUICK, run_demo
from flowplug.records import CommandSpec

#: The examples at the end of ``flowplug demo --help``.
EXAMPLES = (
    "# about three minutes on two CPU cores",
    "flowplug demo --out demo",
    "# seconds; the numbers are not meaningful",
    "flowplug demo --quick --out demo-quick",
    "flowplug demo --out demo --set train.steps=600 --set resample.steps=200",
    "flowplug demo --out demo-b5 --set beta=5.0 --force",
    "flowplug demo --out demo-b6 --set flow.options.init_beta=5.5 --force",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``flowplug demo``."""
    parser.add_argument("--out", metavar="DIR", default="flowplug-demo", help="output directory (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (numbers not meaningful)")
    parser.add_argument("--force", action="store_true", help="replace the outputs of an earlier demo in DIR")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_arguments(parser, example="train.steps=1000")
    add_examples(parser, EXAMPLES)


def run(args: argparse.Namespace) -> int:
    """Run the demo (:mod:`flowplug.jobs.demo`), print its stages and the report."""
    if args.quick:
        args.overrides = list(QUICK) + list(args.overrides)
    cfg = config_from_args(args, DEFAULT_CONFIG, open_tables=OPEN_TABLES)
    if cfg is None:
        return 0
    out = Path(args.out)
    run_demo(cfg, out, force=args.force, progress=not args.no_progress, log=print)
    print((out / "report.txt").read_text(encoding="utf-8"), end="")
    return 0


COMMAND = CommandSpec(
    name="demo",
    description="the whole job on 2D U(1) L=8 beta=6, where HMC freezes: HMC ensemble, "
    "flow training, exact flow resampling, both samplers against exact values",
    factory=add_arguments,
    run=run,
)
