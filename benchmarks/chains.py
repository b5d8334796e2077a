"""Flow sampling versus HMC where HMC freezes: wall time per independent sample of Q.

2D U(1) Wilson gauge theory (default L = 8, beta = 6). For each point (``--lattice``,
``--betas``), in one run, on one machine, with the same torch thread count:

* **HMC**: Omelyan integrator, trajectory length 1, the number of steps tuned upwards on
  short runs until the acceptance is >= ``--hmc-target`` (0.9); ``--chains`` chains from hot
  starts (so that the chains sit in different topological sectors), ``--thermalize``
  trajectories, then ``--hmc-trajectories`` measured ones;
* the two samplers' measured runs alternate in ``--segments`` (10) pieces, so that both see the
  same load on a shared machine;
* **flow**: independence Metropolis (arXiv:2003.06413 Sec. III), each proposal followed by
  ``--hmc-per-proposal`` (1) trajectories of the tuned HMC (a cycle of exact kernels,
  :class:`~flowplug.plugins.kernels.Composition`), with a flow trained by
  ``flowplug train`` from ``--train-config`` (default: ``examples/train_u1_b6_l8.toml`` for
  L <= 8, ``examples/train_u1_b6_l16.toml`` above, lattice and beta of the point; the
  ``init_beta`` layer option follows beta), or a trained run given with ``--flow RUN``;
  ``--chains`` chains started from the thermalised HMC configurations, ``--flow-steps`` cycles.

Why the HMC trajectories: an independence-Metropolis chain stays on a state until a proposal
with a larger importance weight w = p/q arrives. The flows' weights are light-tailed on their
own samples (ESS 0.7-0.9) but about 1 % of equilibrium configurations on 16 x 16 have
w = 100-3000 times the mean (a block loop near W = pi, where the flow is poor), and a pure
flow chain that reaches one sits there for hundreds of steps (measured: tau_int(Q) >= 170
proposals at acceptance 0.73). One cheap HMC trajectory moves such a state locally, and the
next proposal is accepted again. ``--hmc-per-proposal 0`` measures the pure flow chain.

Cost per independent sample of Q = (sampling wall time / samples) x 2 tau_int(Q), with
tau_int by the Gamma method (Wolff's convention: 1/2 for independent samples), per HMC
trajectory and per flow proposal. Where the Gamma window reaches half the chain length, or
no chain ever changed Q (a frozen HMC), the chain is too short to measure tau_int: it is
then reported as a lower bound (``*_lower_bound: true``; the chain length N for chains
that never changed Q), as it is when Q changed sector fewer than 10 times per chain or <Q^2>
is more than 3 errors from exact (the rules of the demo, :func:`flowplug.jobs.demo.topology_freezing`). A
frozen chain is never given a finite win it did not earn: ``ratio_bound`` is ``">="`` when
only HMC's cost is a lower bound, ``"<="`` when only the flow's is, and with both the ratio
and the break-even are null; ``break_even_bound`` says the same of the break-even.

One JSON line per point (``--json``; otherwise a readable summary) with the keys ``L``,
``beta``, ``hmc_seconds_per_independent_q``, ``flow_seconds_per_independent_q``,
``train_seconds``, ``ratio`` (HMC cost / flow cost, sampling only), ``break_even_samples``
(independent Q samples after which the training time has paid for itself:
train_seconds / (HMC cost - flow cost)), ``hmc_tau_int_q``, ``flow_tau_int_q`` (with
``*_lower_bound`` flags), and under ``hmc`` and ``flow`` the plaquette and <Q^2> with
Gamma-method errors and their distance from the exact values (``exact``,
:func:`flowplug.exact.u1_2d`) in sigma. Figures that do not exist are ``null``: an error
or tau_int that cannot be measured, a break-even that never comes (the flow is not cheaper).

    python benchmarks/chains.py --json                                  # L = 8, beta = 6 (~4 min)
    python benchmarks/chains.py --lattice 16 --json                     # L = 16 (~10 min)
    python benchmarks/chains.py --lattice 8 --flow runs/u1-b6-l8 --json # reuse a trained flow
    python benchmarks/chains.py --lattice 8 --betas 4 5 6               # a readable table
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from flowplug.exact import u1_2d
from flowplug.jobs.chains import run_chains
from flowplug.jobs.demo import ratio_bound, topology_freezing
from flowplug.jobs.summary import observable_summary
from flowplug.plugins.hmc import HMC
from flowplug.plugins.kernels import Composition, IndependenceMetropolis
from flowplug.plugins.observables import plaquette, topological_charge
from flowplug.plugins.theories import WilsonGaugeAction

REPO = Path(__file__).resolve().parents[1]


def measure(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Plaquette and topological charge of a (B, 2, L, L) batch of U(1) angles."""
    return {"plaquette": plaquette(x), "q": topological_charge(x)}


def stats(hist: dict[str, torch.Tensor], burn: int = 0, exact_q2: float | None = None) -> dict[str, Any]:
    """Gamma-method plaquette and Q^2, and tau_int(Q) with the demo's freezing rules, of
    (steps, chains) histories (``q``, ``plaquette``, ``accepted``; ``burn`` steps dropped).

    tau_int(Q) and its lower-bound flag are those of :func:`flowplug.jobs.demo.topology_freezing`:
    a lower bound when Q never changed (then the chain length), changed sector fewer than
    :data:`~flowplug.jobs.demo.MIN_TOPOLOGY_CHANGES` times per chain, the Gamma window reached
    half the chain, or <Q^2> is more than 3 errors from ``exact_q2``.
    """
    q = hist["q"][burn:]
    s = observable_summary({"plaquette": hist["plaquette"][burn:], "q2": q**2})
    frozen = topology_freezing(q, exact_q2=exact_q2)
    return {
        "plaquette": {"mean": s["plaquette"]["mean"], "error": s["plaquette"]["error"]},
        "q2": {"mean": s["q2"]["mean"], "error": s["q2"]["error"]},
        "tau_int_q": frozen["tau_int"],
        "tau_int_q_lower_bound": frozen["tau_int_lower_bound"],
        "q_sector_changes_per_chain": frozen["topology_changes"] / frozen["chains"],
        "acceptance": float(hist["accepted"][burn:].mean()),
    }


def sigma(st: dict[str, Any], exact: dict[str, float]) -> dict[str, float]:
    """|estimate - exact| / error for the plaquette and <Q^2> (inf when the error is not measurable)."""
    out = {}
    for k in ("plaquette", "q2"):
        err = st[k]["error"]
        out[k] = abs(st[k]["mean"] - exact[k]) / err if err > 0 and math.isfinite(err) else math.inf
    return out


def tune_hmc(act: WilsonGaugeAction, x: torch.Tensor, a: argparse.Namespace) -> tuple[HMC, torch.Tensor, float]:
    """Smallest Omelyan step count (trajectory length 1) with acceptance >= target on short runs."""
    steps = a.hmc_min_steps
    seed = 100
    while True:
        hmc = HMC(act, integrator="omelyan", steps=steps, trajectory_length=1.0)
        ch = run_chains(hmc, x, a.tune_trajectories, seed=seed)
        x = ch.state.x
        acc = float(ch.history_tensors()["accepted"].mean())
        if acc >= a.hmc_target or steps >= 64:
            return hmc, x, acc
        steps = max(steps + 1, int(round(steps * 1.25)))
        seed += 1


def train_flow(L: int, beta: float, a: argparse.Namespace, runs: Path) -> tuple[Any, float, dict[str, Any]]:
    """Train (or load with ``--flow``) the flow of a point: (flow, training seconds, facts)."""
    from flowplug.checkpoints import load_flow

    if a.flow:
        lf = load_flow(a.flow)
        if list(lf.flow.lattice) != [L, L]:
            raise SystemExit(f"--flow {a.flow}: a flow for lattice {list(lf.flow.lattice)}, not [{L}, {L}]")
        summary = json.loads((Path(a.flow) / "summary.json").read_text()) if Path(a.flow).is_dir() else {}
        return lf.flow, float(summary.get("wall_time_s", math.nan)), {"flow": str(a.flow), **_train_facts(summary)}
    from flowplug.config import build_config
    from flowplug.jobs.train import DEFAULT_CONFIG, OPEN_TABLES, run_train

    config = a.train_config or str(REPO / "examples" / ("train_u1_b6_l8.toml" if L <= 8 else "train_u1_b6_l16.toml"))
    out = runs / f"L{L}_beta{beta:g}"
    cfg = build_config(
        DEFAULT_CONFIG,
        config_file=config,
        overrides=[
            f"lattice=[{L}, {L}]",
            f"action.beta={beta}",
            f"flow.options.init_beta={beta}",
            f"out='{out}'",
            f"threads={a.threads}",
            "device='cpu'",
            "train.progress=false",
            *a.train_set,
        ],
        open_tables=OPEN_TABLES,
    )
    summary = run_train(cfg, force=True)
    return load_flow(out).flow, float(summary["wall_time_s"]), {"train_config": config, **_train_facts(summary)}


def _train_facts(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("steps", "ess", "acceptance", "free_energy")
    return {f"train_{k}" if k != "ess" else "ess": summary[k] for k in keys if k in summary}


def _joined(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Histories of consecutive segments of the same chains, joined along the step axis."""
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def bench(L: int, beta: float, a: argparse.Namespace, runs: Path) -> dict[str, Any]:
    """HMC and flow independence Metropolis at one (L, beta), timed in this process."""
    exact = u1_2d(L, beta)
    act = WilsonGaugeAction(beta, "u1")
    gen = torch.Generator().manual_seed(1)
    x = act.hot_start((L, L), a.chains, generator=gen)
    hmc, x, tune_acc = tune_hmc(act, x, a)
    x = run_chains(hmc, x, a.thermalize, seed=2).state.x
    flow, t_train, facts = train_flow(L, beta, a, runs)
    flow = flow.eval()
    im = IndependenceMetropolis(flow, act)
    kernel = im if a.hmc_per_proposal == 0 else Composition([im, hmc], [1, a.hmc_per_proposal], labels=["flow", "hmc"])
    # both samplers run in alternating segments, so that they see the same machine load
    t_hmc = t_flow = 0.0
    xh, xf = x, x
    hist_h: list[dict[str, torch.Tensor]] = []
    hist_f: list[dict[str, torch.Tensor]] = []
    for k in range(a.segments):
        n_h = a.hmc_trajectories * (k + 1) // a.segments - a.hmc_trajectories * k // a.segments
        n_f = a.flow_steps * (k + 1) // a.segments - a.flow_steps * k // a.segments
        t0 = time.perf_counter()
        ch = run_chains(hmc, xh, n_h, seed=1000 + k, measure=measure)
        t_hmc += time.perf_counter() - t0
        t0 = time.perf_counter()
        cf = run_chains(kernel, xf, n_f, seed=2000 + k, measure=measure)
        t_flow += time.perf_counter() - t0
        xh, xf = ch.state.x, cf.state.x
        hist_h.append(ch.history_tensors())
        hist_f.append(cf.history_tensors())
    h = stats(_joined(hist_h), exact_q2=exact["q2"])
    c_hmc = t_hmc / (a.hmc_trajectories * a.chains) * 2 * h["tau_int_q"]
    hf = _joined(hist_f)
    f = stats(hf, burn=a.flow_burn, exact_q2=exact["q2"])
    if a.hmc_per_proposal:
        f["acceptance"] = float(hf["accepted.flow"][a.flow_burn :].mean())
        f["hmc_acceptance"] = float(hf["accepted.hmc"][a.flow_burn :].mean())
    f["hmc_trajectories_per_proposal"] = a.hmc_per_proposal
    c_flow = t_flow / (a.flow_steps * a.chains) * 2 * f["tau_int_q"]
    ratio = c_hmc / c_flow
    gain = c_hmc - c_flow
    # HMC's cost bounded below: the ratio is at least, the break-even at most what is printed;
    # the flow's bounded: the reverse; both: neither is determined (null)
    bound = ratio_bound(h["tau_int_q_lower_bound"], f["tau_int_q_lower_bound"])
    h.update(
        steps=hmc.steps,
        tuning_acceptance=tune_acc,
        trajectories=a.hmc_trajectories * a.chains,
        seconds=t_hmc,
        sigma_from_exact=sigma(h, exact),
    )
    f.update(proposals=a.flow_steps * a.chains, seconds=t_flow, sigma_from_exact=sigma(f, exact), **facts)
    return {
        "L": L,
        "beta": beta,
        "hmc_seconds_per_independent_q": c_hmc,
        "flow_seconds_per_independent_q": c_flow,
        "train_seconds": t_train,
        "ratio": ratio if bound is not None else math.nan,
        "ratio_bound": bound,
        "break_even_samples": (t_train / gain if gain > 0 else math.inf) if bound is not None else math.nan,
        "break_even_bound": {"=": "=", ">=": "<=", "<=": ">="}.get(bound or "", None),
        "hmc_tau_int_q": h["tau_int_q"],
        "hmc_tau_int_q_lower_bound": h["tau_int_q_lower_bound"],
        "flow_tau_int_q": f["tau_int_q"],
        "flow_tau_int_q_lower_bound": f["tau_int_q_lower_bound"],
        "exact": {"plaquette": exact["plaquette"], "q2": exact["q2"]},
        "hmc": h,
        "flow": f,
        "threads": a.threads,
        "chains": a.chains,
    }


def finite_or_null(v: Any) -> Any:
    """``v`` with NaN and infinities replaced by None (JSON has neither)."""
    if isinstance(v, dict):
        return {k: finite_or_null(x) for k, x in v.items()}
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def show(r: dict[str, Any]) -> str:
    """A readable block for one point."""
    ge = lambda flag: ">=" if flag else "="  # noqa: E731
    h, f, ex = r["hmc"], r["flow"], r["exact"]
    lines = [f"L = {r['L']}, beta = {r['beta']}: exact <P> = {ex['plaquette']:.5f}, <Q^2> = {ex['q2']:.4f}"]
    for name, s, unit in (("HMC", h, "trajectory"), ("flow", f, "flow step")):
        lines.append(
            f"  {name:4s} acc {s['acceptance']:.3f}  <P> = {s['plaquette']['mean']:.5f}({s['plaquette']['error']:.5f}) "
            f"[{s['sigma_from_exact']['plaquette']:.1f} sigma]  <Q^2> = {s['q2']['mean']:.4f}({s['q2']['error']:.4f}) "
            f"[{s['sigma_from_exact']['q2']:.1f} sigma]  tau_int(Q) {ge(s['tau_int_q_lower_bound'])} "
            f"{s['tau_int_q']:.3g} per {unit}"
        )
    lines.append(
        f"  HMC {h['steps']} Omelyan steps; flow trained {r['train_seconds']:.0f} s (ESS {f.get('ess', math.nan):.3f})"
    )
    if r["ratio_bound"] is None:
        verdict = "ratio HMC/flow not determined (both chains too short to measure tau_int(Q))"
    else:
        verdict = (
            f"ratio HMC/flow {r['ratio_bound']} {r['ratio']:.3g}; training pays for itself after "
            f"{r['break_even_bound']} {r['break_even_samples']:.3g} independent samples"
        )
    lines.append(
        f"  seconds per independent Q: HMC {ge(r['hmc_tau_int_q_lower_bound'])} "
        f"{r['hmc_seconds_per_independent_q']:.3g}, flow {ge(r['flow_tau_int_q_lower_bound'])} "
        f"{r['flow_seconds_per_independent_q']:.3g}; {verdict}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: run :func:`bench` for every (L, beta) and print the results."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lattice", type=int, nargs="+", default=[8], help="lattice sizes L (L x L)")
    ap.add_argument("--betas", type=float, nargs="+", default=[6.0])
    ap.add_argument("--chains", type=int, default=16)
    ap.add_argument("--hmc-target", type=float, default=0.9, help="HMC acceptance the step tuning reaches")
    ap.add_argument("--hmc-min-steps", type=int, default=4)
    ap.add_argument("--tune-trajectories", type=int, default=30)
    ap.add_argument("--thermalize", type=int, default=200)
    ap.add_argument("--hmc-trajectories", type=int, default=10000)
    ap.add_argument("--flow-steps", type=int, default=1000)
    ap.add_argument(
        "--segments", type=int, default=10, help="alternating segments of HMC and flow sampling (same load on both)"
    )
    ap.add_argument("--flow-burn", type=int, default=20, help="flow steps discarded (the chains start on HMC states)")
    ap.add_argument(
        "--hmc-per-proposal",
        type=int,
        default=1,
        help="HMC trajectories after each flow proposal in the flow sampler (0: flow proposals only)",
    )
    ap.add_argument("--flow", help="a trained run directory (or checkpoint) to use instead of training")
    ap.add_argument("--train-config", help="TOML of the training (default: examples/train_u1_b6_l8/l16.toml)")
    ap.add_argument(
        "--train-set", action="append", default=[], metavar="KEY=VALUE", help="override of the training config"
    )
    ap.add_argument("--runs", help="directory for the training runs (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads of both samplers and the training")
    ap.add_argument("--json", action="store_true", help="one JSON line per point instead of the readable summary")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(a.runs or tmp)
        for L in a.lattice:
            for beta in a.betas:
                r = bench(L, beta, a, runs)
                print(json.dumps(finite_or_null(r)) if a.json else show(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
