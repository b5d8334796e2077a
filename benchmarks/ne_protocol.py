r"""Non-equilibrium (Jarzynski) proposals on 4D SU(3) Wilson: the work W against the protocol.

For the ``nonequilibrium`` kernel (:mod:`flowplug.plugins.nonequilibrium`) the independence-
Metropolis acceptance is E[min(1, exp(W_current - W_proposal))], the current path drawn from
the reverse-path measure P_R and the proposal from the forward measure P_F. This script runs
``--chains`` independent forward evolutions per protocol in one batch (Haar start, beta driven
from 0 to ``--beta``) and prints, per protocol, one JSON line with

``n_step``, ``schedule`` (``linear`` or the knots), ``inner``, ``overrelax``, ``chains``,
``work_mean``, ``work_std`` (nats), ``acceptance_gauss`` = erfc(std / 2) (the acceptance for
Gaussian works of that spread: W_current - W_proposal is then normal with mean -var and
variance 2 var, so the acceptance is 2 Phi(-std / sqrt 2)), ``acceptance_from_works`` = sum_i w_i
mean_{j != i} min(1, exp(W_i - W_j)) with w_i = exp(-W_i) / sum exp(-W) (the same expectation
with P_R reached by reweighting the forward works; biased upwards while ``chains`` is not
much larger than 1/acceptance), ``ess`` (of exp(-W), :func:`flowplug.stats.ess`),
``log_z`` (:func:`~flowplug.plugins.nonequilibrium.jarzynski`), ``plaquette_end`` (mean over the
endpoints; the equilibrium value at beta = 6 on 4^4 is 0.594), ``s_per_proposal`` (wall time of
the batch / chains) and ``s_per_batch``, and, with ``--profile``, the variance of the partial
work after each tenth of the stages (``work_var_profile``: where the work is dissipated).
With ``--reverse SWEEPS`` it also draws one path backwards from each of ``--chains``
equilibrium configurations (hot starts after SWEEPS heatbath-or sweeps at the target): exact
draws of P_R, whose works give ``work_reverse_mean``, ``work_reverse_std`` and the
stationary acceptance itself, ``acceptance_pairs`` = the mean of min(1, exp(W_R - W_F)) over
all pairs (with ``acceptance_pairs_err``). For Gaussian works E_F[W] - E_R[W] = var W; the
measured gap is larger (the works are skewed), and ``acceptance_gauss`` is optimistic.

Protocols: ``--n-step`` (several), ``--knots`` (a JSON list of [t, beta] pairs, or ``linear``;
several), ``--inner`` (``heatbath`` or ``heatbath-or``) with ``--overrelax``. ``--metric
BETA:G,...`` prints (one JSON line) the knots that space a protocol evenly in thermodynamic
length for the friction profile g, linear between the given points, at couplings
``--metric-grid`` apart (:func:`~flowplug.plugins.nonequilibrium.thermodynamic_knots`); the
knots of ``examples/sample_su3_4d_ne.toml`` are those of
``--metric 0:1.5,3:3,4.5:6,5:15,5.5:25,5.8:40,6:80`` at beta = 0, 3, 4, 5, 5.4, 5.6, 5.8, 6
(a profile shaped after the growth of the partial-work variance of a linear 300-stage
protocol, ``--profile``).

    OMP_NUM_THREADS=1 python benchmarks/ne_protocol.py --n-step 30 100 300 1000 --chains 16
    OMP_NUM_THREADS=1 python benchmarks/ne_protocol.py --n-step 1000 --knots-from-config examples/sample_su3_4d_ne.toml
    OMP_NUM_THREADS=1 python benchmarks/ne_protocol.py --n-step 2500 --chains 16 \
        --knots-from-config examples/sample_su3_4d_ne.toml --inner heatbath-or --overrelax 1 --reverse 60
    OMP_NUM_THREADS=1 python benchmarks/ne_protocol.py --quick     # seconds; numbers meaningless

References: Jarzynski, PRL 78 (1997) 2690; Caselle, Cellini, Nada, Panero, arXiv:2201.08862;
Bulgarelli, Cellini, Nada, arXiv:2412.00200; Sivak and Crooks, PRL 108 (2012) 190602.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import tomllib
import torch


def acceptance_from_works(w: torch.Tensor) -> float:
    """sum_i p_i mean_{j != i} min(1, exp(W_i - W_j)), p_i = exp(-W_i) / sum exp(-W); w (n,) float64, n >= 2."""
    w = w.to(torch.float64)
    n = w.numel()
    p = torch.softmax(-w, 0)
    a = (torch.clamp(torch.exp(w[:, None] - w[None, :]), max=1.0).sum(1) - 1.0) / (n - 1)
    return float((p * a).sum())


def acceptance_from_pairs(w_reverse: torch.Tensor, w_forward: torch.Tensor) -> tuple[float, float]:
    """The stationary acceptance E[min(1, exp(W_R - W_F))] over all pairs of reverse-path works
    W_R (m,) (paths drawn backwards from equilibrium configurations: exact draws from P_R) and
    forward works W_F (n,); with the error of the mean over the m reverse works of their
    per-work averages (the reverse works are independent). Unbiased for any n, unlike
    :func:`acceptance_from_works`."""
    a = torch.clamp(torch.exp(w_reverse.to(torch.float64)[:, None] - w_forward.to(torch.float64)[None, :]), max=1.0)
    per = a.mean(1)
    err = float(per.std() / math.sqrt(per.numel())) if per.numel() > 1 else float("nan")
    return float(per.mean()), err


def reverse_works(kernel: Any, chains: int, lattice: tuple[int, ...], seed: int, sweeps: int) -> torch.Tensor:
    """W of paths drawn backwards from ``chains`` equilibrium configurations at the target
    (hot starts, ``sweeps`` sweeps of heatbath with 4 overrelaxation sweeps each), (chains,) float64."""
    from flowplug.plugins.heatbath import HeatbathOR

    g = torch.Generator().manual_seed(seed + 104729)
    hb = HeatbathOR(kernel.action)
    state = hb.init(kernel.action.hot_start(lattice, chains, generator=g))
    with torch.no_grad():
        for _ in range(sweeps):
            state, _ = hb.step(state, g)
        return kernel.reverse_work(state.x, g).to(torch.float64)


def run_protocol(kernel: Any, chains: int, lattice: tuple[int, ...], seed: int, profile: bool) -> dict[str, Any]:
    """One batch of forward evolutions of ``kernel`` with the partial-work variances; a dict of figures."""
    from flowplug.plugins.nonequilibrium import jarzynski
    from flowplug.stats import ess

    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    with torch.no_grad():
        if profile:
            x, work = kernel.start_sample(chains, lattice, g)
            work = work.clone()
            marks = {max(1, round(kernel.n_step * f / 10)) for f in range(1, 11)}
            prof = []
            for k in range(1, kernel.n_step + 1):
                if k > 1:
                    work = work - kernel._s(k - 1, x)
                work = work + kernel._s(k, x)
                x = kernel._update.forward(x, k - 1, g)
                if k in marks:
                    prof.append([kernel.schedule[k - 1], float(work.var())])
            lp = -kernel.action.action(x).to(torch.float64)
        else:
            x, work, lp = kernel.sample(chains, g, lattice=lattice)
            prof = None
    dt = time.perf_counter() - t0
    from flowplug.gauge import plaquette

    std = float(work.std())
    j = jarzynski(work)
    out = {
        "work_mean": float(work.mean()),
        "work_std": std,
        "acceptance_gauss": math.erfc(std / 2),
        "acceptance_from_works": acceptance_from_works(work),
        "ess": float(ess(-work)),
        "log_z": j["log_ratio"],
        "log_z_err": j["error"],
        "plaquette_end": float(plaquette(x).mean()),
        "s_per_proposal": dt / chains,
        "s_per_batch": dt,
    }
    if prof is not None:
        out["work_var_profile"] = prof
    out["works"] = work
    assert bool(torch.isfinite(lp).all())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n-step", type=int, nargs="+", default=[30, 100, 300, 1000])
    ap.add_argument("--knots", nargs="+", default=["linear"], help="'linear' or a JSON list of [t, beta] pairs")
    ap.add_argument("--knots-from-config", default=None, help="a sample config: use its kernel.options.schedule_knots")
    ap.add_argument("--inner", default="heatbath", choices=("heatbath", "heatbath-or"))
    ap.add_argument("--overrelax", type=int, default=None)
    ap.add_argument("--chains", type=int, default=16)
    ap.add_argument("--lattice", default="4,4,4,4")
    ap.add_argument("--beta", type=float, default=6.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="partial-work variances after each tenth of the stages")
    ap.add_argument("--metric", default=None, help="BETA:G,... print thermodynamic knots of this friction profile")
    ap.add_argument("--metric-grid", type=float, default=0.2, help="coupling spacing of the knots of --metric")
    ap.add_argument(
        "--reverse",
        type=int,
        default=0,
        metavar="SWEEPS",
        help="also draw paths backwards from --chains equilibrium configurations (hot starts after SWEEPS\n"
        "heatbath-or sweeps) and print the stationary acceptance over all (reverse, forward) pairs",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 2^4, 2 chains, 4 and 8 stages")
    a = ap.parse_args(argv)

    from flowplug.plugins.nonequilibrium import NonEquilibrium, thermodynamic_knots
    from flowplug.plugins.theories import WilsonGaugeAction

    torch.set_num_threads(a.threads)
    if a.metric:
        import numpy as np

        pairs = [tuple(float(v) for v in item.split(":")) for item in a.metric.split(",")]
        cs = np.linspace(pairs[0][0], pairs[-1][0], int(round(abs(pairs[-1][0] - pairs[0][0]) / a.metric_grid)) + 1)
        gs = np.interp(cs, [p[0] for p in pairs], [p[1] for p in pairs])  # g linear between the given points
        knots = thermodynamic_knots(cs.tolist(), gs.tolist())
        print(json.dumps({"metric": pairs, "knots": [[round(t, 4), round(c, 6)] for t, c in knots]}), flush=True)
        return 0
    lattice = tuple(int(v) for v in a.lattice.split(","))
    n_steps, chains = a.n_step, a.chains
    if a.quick:
        lattice, n_steps, chains = (2, 2, 2, 2), [4, 8], 2
    knot_sets: list[Any] = []
    if a.knots_from_config:
        cfg = tomllib.loads(Path(a.knots_from_config).read_text())
        knot_sets.append(cfg["kernel"]["options"]["schedule_knots"])
    else:
        knot_sets = [None if k == "linear" else json.loads(k) for k in a.knots]
    act = WilsonGaugeAction(a.beta, "su3")
    opts: dict[str, Any] = {}
    if a.overrelax is not None:
        opts["overrelax"] = a.overrelax
    for knots in knot_sets:
        for n in n_steps:
            sched: dict[str, Any] = {"n_step": n}
            if knots is not None:
                sched["schedule_knots"] = knots
            kernel = NonEquilibrium(act, inner=a.inner, start="prior", **sched, **opts)
            r = run_protocol(kernel, chains, lattice, a.seed, a.profile)
            works = r.pop("works")
            if a.reverse:
                t0 = time.perf_counter()
                w_rev = reverse_works(kernel, chains, lattice, a.seed, a.reverse)
                acc, err = acceptance_from_pairs(w_rev, works)
                r.update(
                    {
                        "work_reverse_mean": float(w_rev.mean()),
                        "work_reverse_std": float(w_rev.std()),
                        "acceptance_pairs": acc,
                        "acceptance_pairs_err": err,
                        "s_reverse_batch": time.perf_counter() - t0,
                    }
                )
            line = {
                "n_step": n,
                "schedule": "linear" if knots is None else knots,
                "inner": a.inner,
                "overrelax": kernel._update.kernel.overrelax if kernel._update is not None else None,
                "chains": chains,
                "lattice": list(lattice),
                "beta": a.beta,
                "threads": a.threads,
                **r,
            }
            print(json.dumps(line), flush=True)
            print(
                f"n_step {n:5d} {'linear' if knots is None else 'knots':6s} {a.inner}: W = {r['work_mean']:.1f} "
                f"+- {r['work_std']:.2f}, acc(gauss) {r['acceptance_gauss']:.3g}, acc(works) "
                f"{r['acceptance_from_works']:.3g}, plaq_end {r['plaquette_end']:.4f}, "
                f"{r['s_per_proposal']:.2f} s/proposal"
                + (f", acc(pairs) {r['acceptance_pairs']:.3g} +- {r['acceptance_pairs_err']:.2g}" if a.reverse else ""),
                file=sys.stderr,
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
