"""Flow Metropolis versus HMC: wall time per effectively independent sample of Q.

2D U(1) Wilson gauge theory, L = 16, beta = 4 and 6 (by default). For each beta, in the
same run and on the same machine:

* HMC (Omelyan, ``--hmc-steps`` steps, tau = 1): ``--chains`` chains, thermalised, then
  ``--hmc-trajectories`` trajectories;
* a gauge-equivariant flow (``--layer`` couplings, default u1-ncp with two hidden layers as
  in examples/train_u1.toml) trained by :class:`flowplug.train.Trainer` (reverse KL, cosine
  schedule) for ``--train-steps`` steps, then ``--flow-steps`` independence-Metropolis steps of
  ``--chains`` chains started from HMC configurations.

Cost per effectively independent sample of Q = (wall time of sampling / number of
samples) x 2 tau_int(Q) (Gamma method, Wolff's convention, tau_int = 1/2 for independent
samples), without and with the training time spread over the flow samples. A chain that
never accepted has no measurable tau_int: its cost is printed as inf. The script prints
ratios HMC cost / flow cost (> 1: the flow wins); never a bare time.

    python benchmarks/chains.py                    # minutes
    python benchmarks/chains.py --betas 4 --train-steps 2000
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time

import torch

from flowplug.exact import u1_2d
from flowplug.jobs.chains import run_chains
from flowplug.plugins.hmc import HMC
from flowplug.plugins.kernels import IndependenceMetropolis
from flowplug.plugins.observables import topological_charge
from flowplug.plugins.theories import WilsonGaugeAction
from flowplug.stats import gamma_method
from flowplug.train import build_trainer


def cost(q_hist: torch.Tensor, accepted: float, seconds: float) -> tuple[float, float]:
    """(tau_int(Q), seconds per independent sample); inf when nothing moved."""
    if accepted <= 0:
        return math.inf, math.inf
    r = gamma_method(q_hist, step_axis=0)
    return r.tau_int, seconds / q_hist.numel() * 2 * r.tau_int


def bench(L: int, beta: float, a: argparse.Namespace) -> dict:
    """HMC and flow Metropolis at one (L, beta), timed in this process; returns the figures."""
    lattice = (L, L)
    act = WilsonGaugeAction(beta, "u1")
    measure = lambda x: {"q": topological_charge(x)}  # noqa: E731
    hmc = HMC(act, integrator="omelyan", steps=a.hmc_steps, trajectory_length=1.0)
    therm = run_chains(hmc, act.cold_start(lattice, a.chains), a.thermalize, seed=1)
    t0 = time.perf_counter()
    ch = run_chains(hmc, therm.state.x, a.hmc_trajectories, seed=2, measure=measure)
    t_hmc = time.perf_counter() - t0
    h = ch.history_tensors()
    tau_h, c_h = cost(h["q"], float(h["accepted"].mean()), t_hmc)

    cfg = {
        "lattice": list(lattice),
        "seed": 3,
        "device": "cpu",
        "action": {"name": "wilson", "group": "u1", "beta": beta},
        "flow": {"layers": [a.layer], "n_layers": a.layers, "options": {"hidden": [a.hidden] * 2}},
        "train": {
            "steps": a.train_steps,
            "batch_size": a.batch,
            "lr": a.lr,
            "schedule": "cosine",
            "lr_min_factor": 0.1,
            "progress": False,
            "checkpoint_every": 0,
        },
    }
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(cfg, out=run_dir)
        t0 = time.perf_counter()
        trainer.run()
        t_train = time.perf_counter() - t0
    flow = trainer.flow.eval()
    m = trainer.history[-1] if trainer.history else {"ess": math.nan}
    im = IndependenceMetropolis(flow, act)
    t0 = time.perf_counter()
    cf = run_chains(im, ch.state.x, a.flow_steps, seed=5, measure=measure)
    t_flow = time.perf_counter() - t0
    hf = cf.history_tensors()
    acc = float(hf["accepted"].mean())
    tau_f, c_f = cost(hf["q"], acc, t_flow)
    c_f_train = (t_train + t_flow) / hf["q"].numel() * 2 * tau_f if math.isfinite(tau_f) else math.inf
    q2 = {k: float((v["q"] ** 2).mean()) for k, v in (("hmc", h), ("flow", hf))}
    return {
        "L": L,
        "beta": beta,
        "exact_q2": u1_2d(L, beta)["q2"],
        "q2": q2,
        "hmc": {
            "acceptance": float(h["accepted"].mean()),
            "tau_int_q": tau_h,
            "seconds": t_hmc,
            "seconds_per_independent_q": c_h,
        },
        "flow": {
            "acceptance": acc,
            "train_ess": m["ess"],
            "tau_int_q": tau_f,
            "seconds": t_flow,
            "train_seconds": t_train,
            "seconds_per_independent_q": c_f,
            "seconds_per_independent_q_with_training": c_f_train,
        },
        "ratio_hmc_over_flow": c_h / c_f if c_f > 0 else math.nan,
        "ratio_hmc_over_flow_with_training": c_h / c_f_train if c_f_train > 0 else math.nan,
    }


def main() -> None:
    """Command line: run :func:`bench` for every beta and print the ratios."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--L", type=int, default=16)
    ap.add_argument("--betas", type=float, nargs="+", default=[4.0, 6.0])
    ap.add_argument("--chains", type=int, default=32)
    ap.add_argument("--thermalize", type=int, default=100)
    ap.add_argument("--hmc-trajectories", type=int, default=400)
    ap.add_argument("--hmc-steps", type=int, default=10)
    ap.add_argument("--flow-steps", type=int, default=400)
    ap.add_argument("--train-steps", type=int, default=500)
    ap.add_argument("--layer", default="u1-ncp", help="coupling layer (flowplug plugins lists them)")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=8, help="width of the two hidden layers of each conditioner")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (cosine schedule)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    results = []
    for beta in a.betas:
        r = bench(a.L, beta, a)
        results.append(r)
        h, f = r["hmc"], r["flow"]
        print(
            f"L={a.L} beta={beta}: HMC acc {h['acceptance']:.3f} tau_int(Q) {h['tau_int_q']:.2f} | "
            f"flow acc {f['acceptance']:.4f} (train ESS {f['train_ess']:.3f}) tau_int(Q) {f['tau_int_q']:.2f} | "
            f"<Q^2> HMC {r['q2']['hmc']:.3f} flow {r['q2']['flow']:.3f} exact {r['exact_q2']:.3f}"
        )
        if not math.isfinite(f["seconds_per_independent_q"]):
            print(
                "    cost ratio HMC/flow per independent Q: 0 (the flow chains never accepted a proposal: "
                "train longer, e.g. --train-steps 5000, or on a GPU)"
            )
        else:
            print(
                f"    cost ratio HMC/flow per independent Q: {r['ratio_hmc_over_flow']:.3g} without training, "
                f"{r['ratio_hmc_over_flow_with_training']:.3g} with training (> 1: the flow is cheaper)"
            )
    if a.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
