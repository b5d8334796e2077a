"""``flowplug sample [--flow CHECKPOINT] --out DIR``: exact Markov chains of any registered
kernel, from a trained flow or without one.

The job, its outputs and its configuration are :mod:`flowplug.jobs.sample`;
``--print-config`` prints the commented default configuration. Ctrl-C names the
checkpoint and the command that continues the run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flowplug.cli.common import (
    add_config_arguments,
    add_examples,
    chain_resume_hint,
    config_from_args,
    observables_text,
)
from flowplug.errors import ConfigError
from flowplug.jobs.sample import DEFAULT_CONFIG, OPEN_TABLES, run_sample
from flowplug.records import CommandSpec

#: The examples at the end of ``flowplug sample --help``.
EXAMPLES = (
    "flowplug sample --flow runs/u1 --out run1",
    "flowplug sample --flow runs/u1 --out run1 --set chains=32 --set steps=1000 --set thermalize=50",
    "# four HMC trajectories before every flow proposal",
    "flowplug sample --flow runs/u1 --out run1 --set kernel.hmc_every=4",
    "# HMC in the flow's latent space",
    "flowplug sample --flow runs/u1 --out run1 --set kernel.type=flow-hmc",
    "# continue a run, or extend a finished one (the flow comes from run1/run_files.json)",
    "flowplug sample --out run1 --set steps=2000 --resume",
    "# a quick look: thermalize defaults to min(20, steps // 2)",
    "flowplug sample --flow runs/u1 --out run0 --set steps=10",
    "# no flow: plain HMC, or any registered kernel (a plugin's too), on [action] and lattice;",
    "# 2D U(1) Wilson at beta = 2 (action.group defaults to u1, as in flowplug hmc; su3: --set action.group=su3)",
    "flowplug sample --out run2 --set action.name=wilson --set action.beta=2.0 --set 'lattice=[8,8]'",
    "flowplug sample --out run3 --set action.name=xy --set action.beta=1.0 --set 'lattice=[16]' "
    "--set kernel.type=xy-metropolis",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``flowplug sample``."""
    parser.add_argument(
        "--flow",
        metavar="CHECKPOINT",
        help="trained flow: a `flowplug train` run directory or its checkpoint.pt (optional for "
        "kernels that need no flow)",
    )
    parser.add_argument("--out", metavar="DIR", help="output directory (required)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from DIR/chain.ckpt with the configuration stored in DIR/config.toml and the flow "
        "in DIR/run_files.json (give only what changes: steps, output settings)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace existing outputs: an earlier run's configuration files, ensemble.h5, provenance.json and "
        "measurements are removed first",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--no-check-inverse",
        action="store_true",
        help="use a flow whose inverse fails the round-trip check (log q through it is wrong)",
    )
    add_config_arguments(parser, example="steps=1000")
    add_examples(parser, EXAMPLES)


def run(args: argparse.Namespace) -> int:
    """Sample (:mod:`flowplug.jobs.sample`) and print one line."""
    cfg = config_from_args(
        args, DEFAULT_CONFIG, open_tables=OPEN_TABLES, run_dir=lambda c: Path(args.out) if args.out else None
    )  # on --resume: from DIR/config.toml
    if cfg is None:
        return 0
    if not args.out:
        raise ConfigError("flowplug sample needs --out DIR")
    with chain_resume_hint(args, Path(args.out) / "chain.ckpt"):
        s = run_sample(
            cfg,
            Path(args.flow) if args.flow else None,
            Path(args.out),
            resume=args.resume,
            force=args.force,
            progress=False if args.no_progress else None,
            check_inverse=not args.no_check_inverse,
        )
    if "rank" in s:  # a rank > 0 of a torchrun world: rank 0 reports
        return 0
    by_kernel = s["acceptance_by_kernel"]
    accs = ", ".join(f"{k} {v:.3f}" for k, v in by_kernel.items()) if by_kernel else f"{s['acceptance']:.3f}"
    ess = f", ESS of the flow weights {s['ess']:.3f}" if s.get("ess") is not None else ""
    j = s.get("jarzynski") or {}
    jz = f", log(Z/Z_0) {j['log_ratio']:.6g} +- {j['error']:.2g} (Jarzynski, {j['n']} works)" if "n" in j else ""
    print(
        f"sample: {s['chains']} chains x {s['steps']} steps of {s['kernel']} (the first {s['thermalize']} left "
        f"out), acceptance {accs}{ess}{jz}"
        f"{observables_text(s)}; results in {args.out}"
    )
    return 0


COMMAND = CommandSpec(
    name="sample",
    description="exact Markov chains of any registered kernel: from a trained "
    "flow (independence Metropolis, flow HMC, mixtures with HMC) or without one",
    factory=add_arguments,
    run=run,
)
