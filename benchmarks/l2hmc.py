"""L2HMC against HMC on 2D U(1): cost per independent topological charge, side by side.

For each lattice L and coupling beta, in one run:

1. B hot-started chains are thermalised by flowplug's HMC (leapfrog, n steps, tau);
2. HMC (the same n and tau) runs ``--measure`` trajectories from those configurations;
3. an L2HMC kernel (flowplug.plugins.l2hmc) with n leapfrog layers, initial tau, is
   trained for ``--train`` iterations (loss -E[A dQ_sin^2], arXiv:2105.03418) on chains
   started from the same configurations, saved to a checkpoint, then run for
   ``--measure`` steps from the same thermalised configurations;
4. for both: seconds per step of the batch (CPU time of this process, which a busy shared
   machine distorts less than wall time; wall time is printed too), tau_int(Q) by the
   Gamma method (chains as replicas), cost per independent Q = (CPU seconds per step / B)
   x 2 tau_int(Q) (seconds of one chain), acceptance, and <P>, <Q^2> against the exact
   values (flowplug.exact.u1_2d).

tau_int(Q) is flagged as a lower bound (``"lower_bound": true``) when the chains barely
move Q (fewer than 25 changes of Q in all chains together) or are shorter than
50 tau_int: the Gamma method then cannot see the slow mode, and the true cost is higher.
Training time is reported separately and not amortised into the cost.

Every result is a JSON line; the last line of each (L, beta) is the ratio
cost(HMC) / cost(L2HMC) (> 1: L2HMC is cheaper per independent Q; null when a sampler never
changed Q, whose cost is then unbounded).

Run:  OMP_NUM_THREADS=1 python benchmarks/l2hmc.py [--lattice 8] [--betas 4 5 6]
      [--chains 16] [--steps 10] [--tau 1.0] [--train 150] [--therm 200] [--measure 400]
      [--seed 1] [--out /tmp/l2hmc-bench]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowplug.chain import Chain, Kernel
from flowplug.exact import u1_2d
from flowplug.measure import measurement
from flowplug.plugins.hmc import HMC
from flowplug.plugins.l2hmc import L2HMC, save_l2hmc, train_l2hmc
from flowplug.plugins.theories import WilsonGaugeAction
from flowplug.stats import gamma_method

MIN_CHANGES = 25
MIN_LENGTH_OVER_TAU = 50


def emit(record: dict[str, Any]) -> None:
    """One JSON line on stdout."""
    print(json.dumps(record), flush=True)


def measure_run(kernel: Kernel, x0: torch.Tensor, n: int, seed: int) -> tuple[dict[str, np.ndarray], float, float]:
    """n steps of ``kernel`` from x0: histories (T, B), wall and CPU (process) seconds per step."""
    g = torch.Generator().manual_seed(seed)
    chain = Chain(kernel, kernel.init(x0), g, measure=measurement("u1", ["plaquette", "topological_charge"]))
    t0, c0 = time.perf_counter(), time.process_time()
    chain.run(n)
    wall, cpu = (time.perf_counter() - t0) / n, (time.process_time() - c0) / n
    return {k: v.numpy() for k, v in chain.history_tensors().items()}, wall, cpu


def summarize(
    name: str, h: dict[str, np.ndarray], wall: float, sec: float, exact: dict[str, float], extra: dict[str, Any]
) -> dict:
    """The JSON record of one sampler (costs from the CPU seconds ``sec`` per step)."""
    q = np.round(h["topological_charge"])
    t, b = q.shape
    changes = int((np.diff(q, axis=0) != 0).sum())
    gq = gamma_method(q, step_axis=0)
    tau = max(gq.tau_int, 0.5)
    lower = changes < MIN_CHANGES or t < MIN_LENGTH_OVER_TAU * tau
    gp = gamma_method(h["plaquette"], step_axis=0)
    gq2 = gamma_method(q**2, step_axis=0)
    # no change of Q at all: the cost per independent Q is unknown (unbounded), not a number
    cost = sec / b * 2 * tau if changes else None
    return {
        "sampler": name,
        **extra,
        "chains": b,
        "steps": t,
        "wall_seconds_per_step": wall,
        "cpu_seconds_per_step": sec,
        "acceptance": float(h["accepted"].mean()),
        "q_changes": changes,
        "tau_int_q": gq.tau_int,
        "tau_int_q_error": gq.tau_int_error,
        "lower_bound": bool(lower),
        "cost_per_independent_q_s": cost,
        "plaquette": [gp.mean, gp.error],
        "plaquette_exact": exact["plaquette"],
        "plaquette_pull": (gp.mean - exact["plaquette"]) / gp.error if gp.error > 0 else None,
        "q2": [gq2.mean, gq2.error],
        "q2_exact": exact["q2"],
        "q2_pull": (gq2.mean - exact["q2"]) / gq2.error if gq2.error > 0 else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lattice", type=int, nargs="+", default=[8])
    ap.add_argument("--betas", type=float, nargs="+", default=[4.0, 5.0, 6.0])
    ap.add_argument("--chains", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10, help="leapfrog steps per trajectory (both samplers)")
    ap.add_argument("--tau", type=float, default=1.0, help="trajectory length (L2HMC: initial value)")
    ap.add_argument("--train", type=int, default=150, help="L2HMC training iterations")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--hidden", type=int, default=8)
    ap.add_argument("--therm", type=int, default=200)
    ap.add_argument("--measure", type=int, default=400)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="/tmp/l2hmc-bench", help="folder for the trained checkpoints")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for L in args.lattice:
        for beta in args.betas:
            act = WilsonGaugeAction(beta, "u1")
            exact = u1_2d(L, beta)
            common = {"L": L, "beta": beta, "n_leapfrog": args.steps, "tau": args.tau}
            g = torch.Generator().manual_seed(args.seed)
            hmc = HMC(act, integrator="leapfrog", steps=args.steps, trajectory_length=args.tau)
            state = hmc.init(act.hot_start((L, L), args.chains, generator=g))
            for _ in range(args.therm):
                state, _ = hmc.step(state, g)
            x0 = state.x
            h, wall, sec = measure_run(hmc, x0, args.measure, args.seed + 1)
            rec_h = summarize("hmc", h, wall, sec, exact, common)
            emit(rec_h)

            l2 = L2HMC(act, steps=args.steps, trajectory_length=args.tau, hidden=args.hidden)
            t0 = time.process_time()
            _, hist = train_l2hmc(
                l2,
                x0,
                iterations=args.train,
                learning_rate=args.lr,
                generator=torch.Generator().manual_seed(args.seed + 2),
            )
            train_s = time.process_time() - t0
            ckpt = save_l2hmc(l2, Path(args.out) / f"l2hmc_L{L}_b{beta:g}.pt", {"L": L, "beta": beta})
            last = hist[-max(1, len(hist) // 5) :]
            emit(
                {
                    "training": "l2hmc",
                    **common,
                    "iterations": args.train,
                    "cpu_seconds": train_s,
                    "final_acceptance": float(np.mean([r["acceptance"] for r in last])),
                    "final_dq2": float(np.mean([r["dq2"] for r in last])),
                    "first_dq2": float(np.mean([r["dq2"] for r in hist[: len(last)]])),
                    "trained_tau": float(l2.step_sizes.sum()),
                    "checkpoint": str(ckpt),
                }
            )
            h, wall, sec = measure_run(l2, x0, args.measure, args.seed + 3)
            rec_l = summarize("l2hmc", h, wall, sec, exact, {**common, "trained_tau": float(l2.step_sizes.sum())})
            emit(rec_l)
            c_h, c_l = rec_h["cost_per_independent_q_s"], rec_l["cost_per_independent_q_s"]
            emit(
                {
                    "ratio": "cost_hmc / cost_l2hmc",
                    **common,
                    "value": c_h / c_l if c_h is not None and c_l is not None else None,
                    "cpu_seconds_per_step_ratio_l2hmc_over_hmc": rec_l["cpu_seconds_per_step"]
                    / rec_h["cpu_seconds_per_step"],
                    "tau_int_q_ratio_hmc_over_l2hmc": rec_h["tau_int_q"] / rec_l["tau_int_q"],
                    "either_lower_bound": rec_h["lower_bound"] or rec_l["lower_bound"],
                    "note": "a sampler that never changed Q has no cost figure (value null)"
                    if c_h is None or c_l is None
                    else "",
                }
            )
            shown = "n/a (Q never changed)" if c_h is None or c_l is None else f"{c_h / c_l:.3g}"
            bound = " (lower bounds involved)" if rec_h["lower_bound"] or rec_l["lower_bound"] else ""
            print(f"L={L} beta={beta:g}: cost per independent Q, HMC / L2HMC = {shown}{bound}", file=sys.stderr)


if __name__ == "__main__":
    main()
