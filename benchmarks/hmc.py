"""HMC benchmark: 4D SU(3) Wilson action + force on 8^4, and 2D U(1) trajectories.

Every figure is compared with a limit measured in the same run:

* SU(3): action + force evaluations per second on one 8^4 configuration, as achieved
  floating-point rate (counting 216 real flops per 3x3 complex matrix product, the
  products the code does) and as a fraction of (a) batched 3x3 complex matrix products
  of the same count and size (``torch.matmul``; the limit for this data layout) and
  (b) one large complex matrix product (the machine's dense complex throughput);
* 2D U(1), L = 16, beta = 4: HMC trajectories per second (Omelyan, 10 steps) for one
  chain and per chain in a batch of 64, against the cost of the same number of bare
  force evaluations (the limit the integrator cannot beat).

Run:  python benchmarks/hmc.py [--repeat 5] [--threads N]
"""

from __future__ import annotations

import argparse
import functools

import torch

from flowplug.plugins.hmc import HMC
from flowplug.plugins.theories import WilsonGaugeAction

from _timing import best

FLOPS_PER_MATMUL = 216  # 27 complex multiply-adds = 27 * 8 real flops


def matmuls_per_site(d: int) -> int:
    """3x3 products per site of one action + force evaluation in WilsonGaugeAction."""
    pairs = d * (d - 1)
    force = pairs * 4 + d  # 4 per ordered staple pair, then U V per link
    action = (pairs // 2) * 2  # two products per plane, trace of a product is elementwise
    return force + action


def su3(repeat: int) -> None:
    lattice = (8, 8, 8, 8)
    act = WilsonGaugeAction(6.0, "su3")
    u = act.hot_start(lattice, 1, generator=torch.Generator().manual_seed(1))
    sites = 8**4

    def both():
        act.action(u)
        act.force(u)

    t_eval = best(both, repeat)
    n_mm = matmuls_per_site(4) * sites
    a = torch.randn(sites * 4, 3, 3, dtype=torch.complex128)
    b = torch.randn(sites * 4, 3, 3, dtype=torch.complex128)
    reps = n_mm // (sites * 4)
    t_small = best(lambda: [a @ b for _ in range(reps)], repeat) * (n_mm / (reps * sites * 4))
    big = torch.randn(1024, 1024, dtype=torch.complex128)
    t_big = best(lambda: big @ big, repeat)
    flops_big = 8 * 1024**3
    rate = n_mm * FLOPS_PER_MATMUL / t_eval
    print(f"4D SU(3) Wilson action + force, 8^4, one configuration ({n_mm} 3x3 products):")
    print(f"  {1 / t_eval:8.2f} evaluations/s   ({t_eval * 1e3:.1f} ms each, {rate / 1e9:.2f} GFLOP/s)")
    print(
        f"  same number of batched 3x3 products alone: {t_small * 1e3:.1f} ms "
        f"-> ratio limit/ours = {t_small / t_eval:.2f}"
    )
    print(
        f"  dense 1024^2 complex matmul: {flops_big / t_big / 1e9:.2f} GFLOP/s "
        f"-> ours is {rate / (flops_big / t_big):.3f} of it"
    )


def _trajectories(k: HMC, state: list, g: torch.Generator, n_traj: int) -> None:
    """``n_traj`` trajectories of ``k`` from ``state[0]``, leaving the last state there."""
    for _ in range(n_traj):
        state[0], _ = k.step(state[0], g)


def _forces(act: WilsonGaugeAction, x: torch.Tensor, n: int) -> None:
    for _ in range(n):
        act.force(x)


def u1(repeat: int) -> None:
    act = WilsonGaugeAction(4.0, "u1")
    print("2D U(1), L = 16, beta = 4, Omelyan 10 steps, trajectory length 1:")
    for batch in (1, 64):
        k = HMC(act, integrator="omelyan", steps=10, trajectory_length=1.0)
        g = torch.Generator().manual_seed(2)
        state = [k.init(act.hot_start((16, 16), batch, generator=g))]
        n_traj = 20
        t = best(functools.partial(_trajectories, k, state, g, n_traj), repeat) / n_traj
        t_force = best(functools.partial(_forces, act, state[0].x, 21), repeat)
        print(
            f"  {batch:3d} chain(s): {1 / t:9.1f} trajectories/s, {batch / t:9.1f} chain-trajectories/s; "
            f"21 bare force calls take {t_force / t:.2f} of a trajectory"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    su3(args.repeat)
    u1(args.repeat)


if __name__ == "__main__":
    main()
