"""Pseudofermion HMC on the Schwinger model: plain, even-odd, Hasenbusch and both, side by side.

For each lattice L x L (``--lattices``), at one point (``--beta``, ``--kappa``, near the
critical kappa by default), in one run, on one machine, with one torch thread:

* a common start: ``--thermalize`` trajectories of plain pseudofermion HMC from a hot start,
  ``--chains`` chains;
* four variants of the ``schwinger`` action, each run by the ``hmc`` kernel (``--integrator``,
  trajectory length 1, its own number of steps from ``--steps`` so that the acceptances are
  comparable) from that start: ``plain``; ``even-odd`` (``even_odd = true``); ``hasenbusch``
  (``hasenbusch_kappa = --hasenbusch-kappa``); ``both``;
* the measured trajectories of the four alternate in ``--segments`` pieces, so that they see
  the same load on a shared machine; only the kernel steps are timed (refresh, molecular
  dynamics, accept/reject).

Per variant (one JSON line, ``variant`` key): acceptance, <exp(-dH)>, seconds per trajectory
and chain, CG iterations per solve for every pseudofermion term (``cg_iterations_per_solve``:
label ``kappa=k`` for phi^+ (W^+ W)^{-1} phi, ``kappa=k/k_h`` for a Hasenbusch ratio, ``heat
bath ...`` for the ratio's heat-bath solve), CG iterations per trajectory and chain (all terms;
an even-odd iteration applies the hopping term to half-lattice fields four times, about the
work of one unpreconditioned iteration), the plaquette (Gamma method), and the ratios
``ratio_cost_plain_over_this`` (seconds per trajectory, plain / this) and
``ratio_cost_per_acceptance_plain_over_this`` (seconds per accepted trajectory, plain / this).
Then one ``{"summary": ...}`` line per lattice. No timing is asserted anywhere; the figures
of a run are in docs/fermions.md ("Even-odd and Hasenbusch preconditioning").

    python benchmarks/preconditioning.py --quick            # 4x4 smoke run (seconds)
    OMP_NUM_THREADS=1 python benchmarks/preconditioning.py --lattices 8 --chains 8 --thermalize 20 \\
        --trajectories 40 --segments 4                                   # ~2 min on 2 busy cores
    OMP_NUM_THREADS=1 python benchmarks/preconditioning.py --lattices 16 --chains 6 --thermalize 10 \\
        --trajectories 24 --segments 4                                   # ~8 min

References:
    M. Hasenbusch, Phys. Lett. B 519 (2001) 177, hep-lat/0107019; T. DeGrand and P. Rossi,
    Comput. Phys. Commun. 60 (1990) 211; R. Abbott et al., arXiv:2207.08945, section 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

VARIANTS = ("plain", "even-odd", "hasenbusch", "both")
#: Omelyan steps per trajectory (tau = 1) by lattice extent, chosen in pilot runs at beta = 2,
#: kappa = 0.26, hasenbusch_kappa = 0.22 so that every variant accepts roughly 0.8-0.95; other
#: extents take the table of the nearest one.
DEFAULT_STEPS = {
    8: {"plain": 6, "even-odd": 4, "hasenbusch": 3, "both": 3},
    16: {"plain": 8, "even-odd": 6, "hasenbusch": 5, "both": 4},
}


def _default_steps(L: int) -> dict[str, int]:
    return dict(DEFAULT_STEPS[min(DEFAULT_STEPS, key=lambda k: abs(k - L))])


def _steps(specs: list[str] | None, lattices: list[int]) -> dict[int, dict[str, int]]:
    """``--steps`` values: ``plain=10,even-odd=10,hasenbusch=8,both=8`` (every lattice) or
    ``16:plain=14,...`` (one lattice); later ones override earlier ones."""
    out = {L: _default_steps(L) for L in lattices}
    for spec in specs or []:
        where, _, body = spec.rpartition(":")
        targets = [int(where)] if where else lattices
        for item in body.split(","):
            name, _, value = item.partition("=")
            name = name.strip()
            if name not in VARIANTS or not value.strip().isdigit() or int(value) < 1:
                raise SystemExit(f"--steps: expected VARIANT=N with VARIANT in {', '.join(VARIANTS)}; found {item!r}")
            for L in targets:
                out.setdefault(L, _default_steps(L))[name] = int(value)
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (module docstring)."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--lattices", type=int, nargs="+", default=[8, 16])
    p.add_argument("--beta", type=float, default=2.0)
    p.add_argument("--kappa", type=float, default=0.26)
    p.add_argument("--hasenbusch-kappa", type=float, default=0.22)
    p.add_argument("--chains", type=int, default=8)
    p.add_argument("--thermalize", type=int, default=20)
    p.add_argument("--trajectories", type=int, default=40, help="measured trajectories per variant and chain")
    p.add_argument("--segments", type=int, default=4)
    p.add_argument("--steps", action="append", help="VARIANT=N,... or L:VARIANT=N,... (module docstring)")
    p.add_argument("--integrator", default="omelyan")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="4x4, a few trajectories (smoke test)")
    a = p.parse_args(argv)
    if a.quick:
        a.lattices, a.chains, a.thermalize, a.trajectories, a.segments = [4], 2, 2, 2, 1
        a.kappa, a.hasenbusch_kappa = 0.24, 0.2
        a.steps = (a.steps or []) + ["plain=3,even-odd=3,hasenbusch=3,both=3"]
    a.step_table = _steps(a.steps, a.lattices)
    if a.trajectories % a.segments:
        raise SystemExit("--trajectories must be a multiple of --segments")
    return a


def variant_list(args: argparse.Namespace) -> list[tuple[int, str]]:
    """(lattice, variant) in the order of the output lines."""
    return [(L, v) for L in args.lattices for v in VARIANTS]


def _options(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "plain": {},
        "even-odd": {"even_odd": True},
        "hasenbusch": {"hasenbusch_kappa": args.hasenbusch_kappa},
        "both": {"even_odd": True, "hasenbusch_kappa": args.hasenbusch_kappa},
    }[variant]


def run_lattice(L: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The four variants at one lattice; returns their records and a summary."""
    from flowplug.manager import registry
    from flowplug.measure import measurement
    from flowplug.stats import gamma_method

    factory = registry("action").get("schwinger").factory
    hmc = registry("kernel").get("hmc").factory
    plaquette = measurement("u1", ["plaquette"])
    steps = args.step_table[L]
    g = torch.Generator().manual_seed(args.seed)
    plain = factory(beta=args.beta, kappa=args.kappa)
    therm = hmc(plain, integrator=args.integrator, steps=steps["plain"], trajectory_length=1.0)
    state = therm.init(plain.hot_start((L, L), args.chains, generator=g))
    t0 = time.perf_counter()
    for _ in range(args.thermalize):
        state, _ = therm.step(state, g)
    therm_seconds = time.perf_counter() - t0
    start = state.x.clone()

    runs = {}
    for k, v in enumerate(VARIANTS):
        action = factory(beta=args.beta, kappa=args.kappa, **_options(v, args))
        kernel = hmc(action, integrator=args.integrator, steps=steps[v], trajectory_length=1.0)
        runs[v] = {
            "action": action,
            "kernel": kernel,
            "state": kernel.init(start.clone()),
            "generator": torch.Generator().manual_seed(args.seed + 100 + k),
            "seconds": 0.0,
            "accepted": [],
            "delta_h": [],
            "plaquette": [],
        }
    per_segment = args.trajectories // args.segments
    for _segment in range(args.segments):
        for v in VARIANTS:
            r = runs[v]
            for _ in range(per_segment):
                t = time.perf_counter()
                r["state"], info = r["kernel"].step(r["state"], r["generator"])
                r["seconds"] += time.perf_counter() - t
                r["accepted"].append(info["accepted"].to(torch.float64))
                r["delta_h"].append(info["delta_h"])
                r["plaquette"].append(plaquette(r["state"].x)["plaquette"])
    # the variants' actions are fresh: their CG counts cover exactly the measured trajectories
    records = []
    for v in VARIANTS:
        r = runs[v]
        action = r["action"]
        n = args.trajectories * args.chains
        acc = float(torch.stack(r["accepted"]).mean())
        dh = torch.stack(r["delta_h"])
        plaq = gamma_method(torch.stack(r["plaquette"]), step_axis=0)
        counts = {label: it / max(solves, 1) for label, (solves, it) in sorted(action.cg_counts.items())}
        total_iterations = sum(it for _, it in action.cg_counts.values()) / n
        seconds = r["seconds"] / n
        records.append(
            {
                "lattice": [L, L],
                "variant": v,
                "beta": args.beta,
                "kappa": args.kappa,
                "even_odd": bool(getattr(action, "even_odd", False)),
                "hasenbusch_kappa": getattr(action, "hasenbusch_kappa", None),
                "integrator": args.integrator,
                "steps": steps[v],
                "trajectory_length": 1.0,
                "chains": args.chains,
                "trajectories": args.trajectories,
                "acceptance": acc,
                "exp_minus_delta_h": float(torch.exp(-dh).mean()),
                "delta_h_rms": float(dh.pow(2).mean().sqrt()),
                "seconds_per_trajectory": seconds,
                "seconds_per_accepted_trajectory": seconds / acc if acc > 0 else None,
                "cg_iterations_per_solve": counts,
                "cg_iterations_per_trajectory": total_iterations,
                "plaquette": {"mean": plaq.mean, "error": plaq.error},
            }
        )
    base = records[0]
    for rec in records:
        rec["ratio_cost_plain_over_this"] = base["seconds_per_trajectory"] / rec["seconds_per_trajectory"]
        a, b = base["seconds_per_accepted_trajectory"], rec["seconds_per_accepted_trajectory"]
        rec["ratio_cost_per_acceptance_plain_over_this"] = a / b if a and b else None
    summary = {
        "lattice": [L, L],
        "thermalize_seconds": therm_seconds,
        "torch_threads": torch.get_num_threads(),
        **{f"ratio_cost.{rec['variant']}": rec["ratio_cost_plain_over_this"] for rec in records[1:]},
        **{
            f"ratio_cost_per_acceptance.{rec['variant']}": rec["ratio_cost_per_acceptance_plain_over_this"]
            for rec in records[1:]
        },
        **{f"acceptance.{rec['variant']}": rec["acceptance"] for rec in records},
    }
    return [*records, {"summary": summary}]


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every lattice of ``args``; returns the records (and prints them as JSON lines)."""
    out: list[dict[str, Any]] = []
    for L in args.lattices:
        recs = run_lattice(L, args)
        for rec in recs:
            print(json.dumps(rec), flush=True)
        out.extend(recs)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point: run and print JSON lines."""
    torch.set_num_threads(1)
    run(parse(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
