"""A plain HMC loop with flowplug's drop-in flow proposal between trajectories.

The HMC here is the user's own code (2D U(1) gauge theory, leapfrog, written out in a
few lines, knowing nothing of flowplug); after every ``--hmc-per-flow`` trajectories it
calls ``FlowProposal.step(U)``, which returns the next configuration of an exact chain
(flow proposal accepted or rejected in float64, log q of U from the inverse flow).

    python examples/dropin_hmc_loop.py            # L = 8, beta = 2, ~1 minute
    python examples/dropin_hmc_loop.py --quick    # seconds (smoke test)

The result is compared with the exact <P> and <Q^2> on the torus.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from flowplug.exact import u1_2d
from flowplug.flow import build_flow
from flowplug.plugins.theories import WilsonGaugeAction
from flowplug.proposal import FlowProposal
from flowplug.stats import gamma_method
from flowplug.train import Trainer

# ---------------------------------------------------------------- the user's own HMC


def plaquette_angles(theta):
    """theta: (2, L, L) link angles -> (L, L) plaquette angles."""
    t0, t1 = theta[0], theta[1]
    return t0 + np.roll(t1, -1, axis=0) - np.roll(t0, -1, axis=1) - t1


def action(theta, beta):
    """S = -beta sum_x cos theta_P(x)."""
    return -beta * np.cos(plaquette_angles(theta)).sum()


def force(theta, beta):
    """dS/dtheta, shape (2, L, L)."""
    s = beta * np.sin(plaquette_angles(theta))
    return np.stack([s - np.roll(s, 1, axis=1), np.roll(s, 1, axis=0) - s])


def hmc_trajectory(theta, beta, rng, n=10, eps=0.1):
    """One leapfrog trajectory with a Metropolis test; returns the next configuration."""
    p = rng.standard_normal(theta.shape)
    h0 = 0.5 * (p**2).sum() + action(theta, beta)
    x = theta.copy()
    p = p - 0.5 * eps * force(x, beta)
    for i in range(n):
        x = x + eps * p
        p = p - (eps if i < n - 1 else 0.5 * eps) * force(x, beta)
    h1 = 0.5 * (p**2).sum() + action(x, beta)
    if rng.random() < math.exp(min(0.0, h0 - h1)):
        return (x + math.pi) % (2 * math.pi) - math.pi
    return theta


def main() -> None:
    """Train a flow, run HMC with a flow step after every k trajectories, compare with exact."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--L", type=int, default=8)
    ap.add_argument("--beta", type=float, default=2.0)
    ap.add_argument("--trajectories", type=int, default=2000)
    ap.add_argument("--hmc-per-flow", type=int, default=1)
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.L, a.trajectories, a.train_steps = 4, 60, 10
    torch.set_num_threads(1)
    torch.manual_seed(0)

    # a flow for the same action as the HMC (the production action)
    flow = build_flow("u1", (a.L, a.L), "u1-spline", n_layers=8 if not a.quick else 2, options={"hidden": [8]})
    target = WilsonGaugeAction(a.beta, "u1")
    Trainer(flow, target, {"steps": a.train_steps, "lr": 0.01, "progress": False}, seed=1).run()
    flow.eval()
    step = FlowProposal(flow, target, layout="canonical", seed=2)

    rng = np.random.default_rng(3)
    theta = np.zeros((2, a.L, a.L))
    plaq, q, acc = [], [], []
    for t in range(a.trajectories):
        theta = hmc_trajectory(theta, a.beta, rng)
        if (t + 1) % a.hmc_per_flow == 0:
            theta, res = step.step(theta)  # numpy in, numpy out
            acc.append(bool(res.accepted[0]))
        pa = (plaquette_angles(theta) + math.pi) % (2 * math.pi) - math.pi
        plaq.append(np.cos(pa).mean())
        q.append(pa.sum() / (2 * math.pi))
    burn = len(plaq) // 10
    ex = u1_2d(a.L, a.beta)
    p = gamma_method(np.array(plaq[burn:]))
    q2 = gamma_method(np.array(q[burn:]) ** 2)
    print(f"flow acceptance {np.mean(acc):.3f}")
    print(f"<P>   = {p.mean:.5f} +- {p.error:.5f}   exact {ex['plaquette']:.5f}")
    print(f"<Q^2> = {q2.mean:.4f} +- {q2.error:.4f}   exact {ex['q2']:.4f}   tau_int(Q^2) {q2.tau_int:.2f}")


if __name__ == "__main__":
    main()
