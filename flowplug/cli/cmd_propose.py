"""``flowplug propose --flow CHECKPOINT --current IN --out OUT``: one exact flow step
for a production code, through files.

The production code (openQCD, MILC, Grid, Chroma...) writes its current configuration
IN (ILDG, NERSC, openQCD or any readable format), runs this command between two HMC
trajectories, and continues from OUT, written in the format of IN (``--to`` to change):
the flow proposal if it was accepted, else the current configuration again. One JSON
line on stdout tells what happened::

    {"accepted": true, "log_p_current": ..., "log_q_current": ..., "log_p_proposal": ...,
     "log_q_proposal": ..., "delta_S": ..., "log_accept": ..., "seed": ..., "out": ...}

(delta_S = S(proposal) - S(current); log q of IN comes from the inverse flow, so the
flow must pass the inverse check, :func:`flowplug.flowtools.check_inverse`, whose result
is the line's ``inverse_check`` entry; ``--no-check-inverse`` uses a failing flow anyway.)

Assumptions:
  * The flow's stored action (pure gauge Wilson action at its beta) IS the production
    action. Only then is the accept/reject step exact for the production chain.
  * When it is not (dynamical fermions, improved gauge actions), use ``--no-decide``:
    OUT then holds the proposal, the JSON line gives ``log_q_current`` and
    ``log_q_proposal`` with ``accepted: null`` (or ``accepted: false`` with a ``reason``,
    and OUT = IN, when a log q is non-finite: such a proposal is always rejected, in
    every kernel); the production code evaluates its own
    action S_prod on IN and OUT and accepts with probability
    min(1, exp([-S_prod(OUT) - log_q_proposal] - [-S_prod(IN) - log_q_current])).
  * Each call needs fresh random numbers: the default seed is drawn from the operating
    system and printed; when you fix ``--seed`` for reproducibility, give every call of a
    chain a different one (e.g. base seed + trajectory number).

``--kernel nonequilibrium`` (with ``--kernel-option n_step=20`` etc.) proposes the endpoint
of a non-equilibrium evolution instead (docs/chains.md): the JSON line's log q values are
then W - S(x), W the work (the current configuration's from a path drawn backwards from
IN), and both the decision and the ``--no-decide`` rule above are unchanged.

The configuration must have the flow's lattice and group; anything else is refused with
a message naming both. OUT is written atomically and never over IN, at the precision of
IN (``--precision 64`` to keep an accepted proposal unrounded: a 32-bit file rounds it,
a change of the configuration at the 1e-7 level that the test above did not see, as for
any production code that stores configurations in single precision).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from flowplug.cli.common import add_examples
from flowplug.records import CommandSpec

#: The examples at the end of ``flowplug propose --help``.
EXAMPLES = (
    "# between two trajectories of a pure-gauge Wilson run at the flow's beta: flowplug decides",
    "flowplug propose --flow runs/su3 --current conf.0100.ildg --out conf.0100.next.ildg --seed 100",
    "# any other production action (fermions, Symanzik): OUT is the proposal, the production code decides",
    "flowplug propose --flow runs/su3 --current conf.0100.ildg --out prop.ildg --no-decide",
    "# a non-equilibrium proposal (docs/chains.md), written as a NERSC file",
    "flowplug propose --flow runs/su3 --current conf.0100.ildg --out next.nersc --to nersc "
    "--kernel nonequilibrium --kernel-option n_step=20",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``flowplug propose``."""
    parser.add_argument(
        "--flow",
        required=True,
        metavar="CHECKPOINT",
        help="trained flow: a `flowplug train` run directory or its checkpoint.pt",
    )
    parser.add_argument("--current", required=True, metavar="IN", help="the current configuration")
    parser.add_argument("--out", required=True, metavar="OUT", help="where to write the next configuration")
    parser.add_argument("--to", metavar="FORMAT", help="output format (default: the input's)")
    parser.add_argument("--seed", type=int, help="random seed (default: fresh entropy, printed)")
    parser.add_argument(
        "--no-decide",
        action="store_true",
        help="write the proposal and its log q values; the production code decides with its own action",
    )
    parser.add_argument(
        "--kernel",
        metavar="NAME",
        help="proposal kernel (default: flow independence Metropolis); 'nonequilibrium' proposes the "
        "endpoint of a non-equilibrium evolution (docs/chains.md)",
    )
    parser.add_argument(
        "--kernel-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of --kernel (repeatable), e.g. --kernel-option n_step=20",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        metavar="DEVICE",
        help="torch device of the flow's computations: cpu (default), cuda or cuda:N; the files are read "
        "and written on the CPU",
    )
    parser.add_argument("--precision", type=int, choices=(32, 64), help="output precision (default: input's)")
    parser.add_argument("--force", action="store_true", help="replace an existing OUT")
    parser.add_argument("--format", metavar="NAME", help="force the input format")
    parser.add_argument("--lattice", metavar="LXxLYxLZxLT", help="lattice of a bare LIME input")
    parser.add_argument("--group", metavar="GROUP", help="group of a bare LIME input")
    parser.add_argument("--no-verify", action="store_true", help="accept an input whose checksum fails")
    parser.add_argument(
        "--no-check-inverse",
        action="store_true",
        help="use a flow whose inverse fails the round-trip check (log q through it is wrong)",
    )
    add_examples(parser, EXAMPLES)


def run(args: argparse.Namespace) -> int:
    """Parse the options, run :func:`flowplug.jobs.propose.run_propose`, print its JSON line."""
    from flowplug.config import parse_override
    from flowplug.errors import ConfigError
    from flowplug.jobs.propose import run_propose

    options: dict[str, Any] = {}
    for text in args.kernel_option:
        tree = parse_override(text)
        ((key, value),) = tree.items()
        if isinstance(value, dict):
            raise ConfigError(f"--kernel-option {text!r}: expected KEY=VALUE with a plain key")
        options[key] = value
    line = run_propose(
        args.flow,
        args.current,
        args.out,
        to=args.to,
        seed=args.seed,
        decide=not args.no_decide,
        kernel=args.kernel,
        kernel_options=options,
        precision=args.precision,
        force=args.force,
        input_format=args.format,
        lattice=args.lattice,
        group=args.group,
        verify=not args.no_verify,
        check_inverse=not args.no_check_inverse,
        device=args.device,
    )
    print(json.dumps(line))
    return 0


COMMAND = CommandSpec(
    name="propose",
    description="one exact flow-Metropolis step on a configuration file (for production HMC codes)",
    factory=add_arguments,
    run=run,
)
