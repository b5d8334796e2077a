"""Two modes: HMC against a Z2-symmetrised flow in the broken phase of 2D phi^4.

phi^4 (Albergo et al. convention, DESIGN.md section 3) at a broken-phase point, default the
one of ``examples/train_phi4_broken.toml`` (L = 16, m2 = -4, lam = 3.5), where the
distribution of the magnetisation M/V has two modes at +-0.59 separated by a barrier
that local updates practically never cross. In one run, on one machine, with the same
torch thread count and the measured segments of the samplers alternating (``--segments``)
so that they see the same load:

* **HMC** (:class:`flowplug.plugins.hmc.HMC`, leapfrog, ``--hmc-steps`` steps, trajectory
  length 1), ``--chains`` chains started in the M > 0 mode (phi = +0.6 everywhere, then
  ``--thermalize`` trajectories: the start of every sampler), ``--thermalize`` more, then
  ``--hmc-trajectories`` measured ones;
* **flow**: independence Metropolis (:class:`flowplug.plugins.kernels.IndependenceMetropolis`)
  with the symmetrised flow q_s(x) = (q(x) + q(-x))/2 of a ``flowplug train`` run
  (``--flow RUN``; default: trained here from ``--train-config``,
  ``examples/train_phi4_broken.toml``), ``--chains`` chains started from the same
  thermalised configurations, ``--thermalize`` proposals, then ``--flow-steps`` measured ones;
* **flow, not symmetrised**: the same weights with the base density q (the layers'
  parameters are shared), same chains and budget: what mode collapse does to a sampler;
* **reference**: a long HMC run (``--reference-trajectories`` on ``--reference-chains``
  chains from random starts, another seed) for the Z2-even observables <|M|>/V and chi_2
  (:func:`flowplug.plugins.observables.abs_magnetization`, ``chi_2``): they have the same
  value in both modes, so a chain that never tunnels still estimates them exactly.

Figures per sampler (one JSON line each with ``--json``, then a summary line): acceptance;
``tunnelling_per_step`` (sign changes of M per trajectory or proposal, all chains) and
``tunnelling_per_second``; <M>/V with its Gamma-method error (exact value 0 by symmetry)
and its distance from 0 in errors; <|M|>/V and chi_2 with errors and their distance from
the reference; tau_int of chi_2 and of M (Wolff's convention, 1/2 for independent samples);
the cost per independent sample, ``seconds_per_step`` x 2 tau_int (``null`` for M where
the chain never changed sign: tau_int cannot be measured, it is larger than the chain);
wall time. The summary line has the ratios of the tunnelling rates per second and of the
costs per independent chi_2 sample (HMC / flow).

    python benchmarks/multimodal.py --json                          # trains the flow first (~6 min)
    python benchmarks/multimodal.py --flow runs/phi4_broken --json  # reuse a trained flow
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

from flowplug.flow import Flow
from flowplug.plugins.hmc import HMC
from flowplug.plugins.kernels import IndependenceMetropolis
from flowplug.plugins.observables import abs_magnetization, chi_2, magnetization
from flowplug.stats import gamma_method

REPO = Path(__file__).resolve().parents[1]


def measure(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """M/V, |M|/V and chi_2 of a (B, L, L) batch, each (B,) float64."""
    return {"m": magnetization(x), "abs_m": abs_magnetization(x), "chi_2": chi_2(x)}


def run_segment(kernel: Any, state: Any, steps: int, gen: torch.Generator, hist: dict[str, list]) -> tuple[Any, float]:
    """``steps`` steps of ``kernel`` from ``state``; appends measurements to ``hist``; returns (state, seconds)."""
    t0 = time.perf_counter()
    for _ in range(steps):
        state, info = kernel.step(state, gen)
        for k, v in measure(state.x).items():
            hist.setdefault(k, []).append(v)
        hist.setdefault("accepted", []).append(info["accepted"].to(torch.float64))
    return state, time.perf_counter() - t0


def gamma(data: torch.Tensor) -> dict[str, float]:
    """Gamma-method mean, error, tau_int of (steps, chains) data."""
    g = gamma_method(data.numpy(), step_axis=0)
    return {"mean": g.mean, "error": g.error, "tau_int": g.tau_int}


def summarise(
    name: str, hist: dict[str, list], seconds: float, ref: dict[str, dict[str, float]] | None
) -> dict[str, Any]:
    """The figures of one sampler (module docstring) from its (steps, chains) histories."""
    h = {k: torch.stack(v) for k, v in hist.items()}
    m = h["m"]
    steps, chains = m.shape
    flips = int((torch.sign(m[1:]) != torch.sign(m[:-1])).sum())
    per_step = seconds / steps  # one step moves every chain: seconds per step of the batch
    out: dict[str, Any] = {
        "sampler": name,
        "chains": chains,
        "steps": steps,
        "seconds": seconds,
        "seconds_per_step": per_step,
        "acceptance": float(h["accepted"].mean()),
        "sign_changes": flips,
        "tunnelling_per_step": flips / (chains * (steps - 1)),
        "tunnelling_per_second": flips / seconds if seconds > 0 else None,
        "fraction_m_negative": float((m < 0).double().mean()),
    }
    for key in ("m", "abs_m", "chi_2"):
        if flips == 0 and key == "m":
            out["m"] = {
                "mean": float(m.mean()),
                "error": None,
                "tau_int": None,
                "note": "no sign change: stuck in one mode",
            }
            continue
        out[key] = gamma(h[key])
    if out["m"]["error"]:
        out["m"]["sigma_from_zero"] = abs(out["m"]["mean"]) / out["m"]["error"]
    if ref is not None:
        for key in ("abs_m", "chi_2"):
            a, b = out[key], ref[key]
            out[key]["sigma_from_reference"] = abs(a["mean"] - b["mean"]) / math.hypot(a["error"], b["error"])
    # cost per independent sample = seconds per measurement of one chain x 2 tau_int
    per_sample = seconds / (steps * chains)
    out["seconds_per_independent_chi_2"] = per_sample * 2 * out["chi_2"]["tau_int"]
    tau_m = out["m"]["tau_int"]
    out["seconds_per_independent_m"] = per_sample * 2 * tau_m if tau_m else None
    return out


def train_flow(a: argparse.Namespace, runs: Path) -> tuple[str, float]:
    """Train from ``--train-config`` into ``runs``; (run directory, training seconds)."""
    from flowplug.config import parse_toml
    from flowplug.jobs.train import run_train

    cfg = parse_toml(Path(a.train_config).read_text())
    cfg["out"] = str(runs / "flow")
    cfg.setdefault("train", {})["progress"] = False
    summary = run_train(cfg, force=True)
    return str(runs / "flow"), float(summary["wall_time_s"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flow", default="", help="a trained run (default: train from --train-config)")
    p.add_argument("--train-config", default=str(REPO / "examples" / "train_phi4_broken.toml"))
    p.add_argument("--chains", type=int, default=8)
    p.add_argument("--hmc-trajectories", type=int, default=2000)
    p.add_argument("--hmc-steps", type=int, default=10)
    p.add_argument("--flow-steps", type=int, default=2000)
    p.add_argument("--thermalize", type=int, default=100)
    p.add_argument("--segments", type=int, default=10)
    p.add_argument("--reference-chains", type=int, default=32)
    p.add_argument("--reference-trajectories", type=int, default=4000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true", help="JSON lines instead of a readable summary")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from flowplug.checkpoints import load_flow

    train_s = None
    with tempfile.TemporaryDirectory() as tmp:
        run = a.flow
        if not run:
            run, train_s = train_flow(a, Path(tmp))
        elif (Path(run) / "summary.json").exists():
            train_s = json.loads((Path(run) / "summary.json").read_text()).get("wall_time_s")
        lf = load_flow(run)
    flow, action = lf.flow, lf.action
    base = Flow.from_spec({k: v for k, v in (flow.spec or {}).items() if k != "symmetrize"})
    base.load_state_dict(flow.state_dict())
    base.eval()
    lattice = tuple(flow.lattice)
    start = torch.full((a.chains, *lattice), 0.6, dtype=torch.float64)  # the M > 0 mode

    # reference: long HMC from random starts (both modes), another seed
    g_ref = torch.Generator().manual_seed(a.seed + 1000)
    hmc = HMC(action, integrator="leapfrog", steps=a.hmc_steps, trajectory_length=1.0)
    x_ref = 0.6 * torch.sign(torch.randn(a.reference_chains, generator=g_ref, dtype=torch.float64))
    x_ref = x_ref.reshape(-1, *([1] * len(lattice))).expand(-1, *lattice).clone()
    h_ref: dict[str, list] = {}
    st = hmc.init(x_ref)
    st, _ = run_segment(hmc, st, a.thermalize, g_ref, {})
    st, t_ref = run_segment(hmc, st, a.reference_trajectories, g_ref, h_ref)
    ref_h = {k: torch.stack(v) for k, v in h_ref.items()}
    ref = {k: gamma(ref_h[k]) for k in ("abs_m", "chi_2")}
    reference = {
        "sampler": "reference-hmc",
        "chains": a.reference_chains,
        "steps": a.reference_trajectories,
        "seconds": t_ref,
        **ref,
    }

    samplers: dict[str, Any] = {
        "hmc": hmc,
        "flow-symmetrised": IndependenceMetropolis(flow, action),
        "flow-unsymmetrised": IndependenceMetropolis(base, action),
    }
    gens = {n: torch.Generator().manual_seed(a.seed + i) for i, n in enumerate(samplers)}
    # every sampler starts from the same HMC-thermalised configurations of the M > 0 mode (an
    # independence chain started on a constant field, far out in the tail of q, would stay there)
    x0, _ = run_segment(hmc, hmc.init(start), a.thermalize, gens["hmc"], {})
    states = {n: k.init(x0.x) for n, k in samplers.items()}
    for n, k in samplers.items():  # thermalisation (not timed)
        with torch.no_grad():
            states[n], _ = run_segment(k, states[n], a.thermalize, gens[n], {})
    hists: dict[str, dict[str, list]] = {n: {} for n in samplers}
    secs = dict.fromkeys(samplers, 0.0)
    total = {"hmc": a.hmc_trajectories, "flow-symmetrised": a.flow_steps, "flow-unsymmetrised": a.flow_steps}
    for s in range(a.segments):
        for n, k in samplers.items():
            todo = total[n] * (s + 1) // a.segments - total[n] * s // a.segments
            with torch.no_grad():
                states[n], dt = run_segment(k, states[n], todo, gens[n], hists[n])
            secs[n] += dt
    results = [summarise(n, hists[n], secs[n], ref) for n in samplers]
    h, f = results[0], results[1]
    summary = {
        "point": {"lattice": list(lattice), **action.couplings()} if hasattr(action, "couplings") else {},
        "flow": str(run) if a.flow else "trained here",
        "train_seconds": train_s,
        # HMC without a sign change: fewer than 1 per its measured seconds, so the ratio is a lower bound
        "tunnelling_per_second_ratio_flow_over_hmc": f["tunnelling_per_second"]
        / (h["tunnelling_per_second"] or 1.0 / h["seconds"]),
        "tunnelling_ratio_lower_bound": not h["tunnelling_per_second"],
        "chi_2_cost_ratio_hmc_over_flow": h["seconds_per_independent_chi_2"] / f["seconds_per_independent_chi_2"],
        "threads": torch.get_num_threads(),
    }
    if a.json:
        for r in (reference, *results, summary):
            print(json.dumps(r))
    else:
        print(
            f"reference HMC: <|M|>/V = {ref['abs_m']['mean']:.4f}({ref['abs_m']['error']:.4f}), "
            f"chi_2 = {ref['chi_2']['mean']:.3f}({ref['chi_2']['error']:.3f})"
        )
        for r in results:
            m = r["m"]
            err = f"{m['error']:.4f}" if m["error"] else "n/a"
            print(
                f"{r['sampler']:>20}: acc {r['acceptance']:.3f}, sign changes {r['sign_changes']} "
                f"({r['tunnelling_per_step']:.4f}/step, {r['tunnelling_per_second'] or 0:.2f}/s), "
                f"<M>/V = {m['mean']:.4f} +- {err}, <|M|>/V = {r['abs_m']['mean']:.4f}({r['abs_m']['error']:.4f}), "
                f"chi_2 = {r['chi_2']['mean']:.3f}({r['chi_2']['error']:.3f}), "
                f"s/indep chi_2 = {r['seconds_per_independent_chi_2']:.2e}"
            )
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
