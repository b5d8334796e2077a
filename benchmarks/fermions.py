"""Two-flavour Schwinger or Yukawa model: cost per independent sample, pseudofermion HMC vs the flow schemes.

For one point (``--lattice``, ``--beta``, ``--kappa``), in one run, on one machine, with one
torch thread:

* a u1-multiscale flow is trained by reverse KL against the exact-determinant action
  ``schwinger-exact`` (``--train-steps``, timed separately; layer widths started at the
  pure-gauge values of beta), or loaded with ``--flow RUN`` (what ``flowplug train`` wrote);
* **HMC**: the ``hmc`` kernel (Omelyan, ``--hmc-steps`` steps, trajectory length 1) on the
  pseudofermion action ``schwinger`` (phi redrawn every trajectory, CG tolerance 1e-12),
  ``--chains`` chains from hot starts, ``--thermalize`` trajectories;
* the four schemes of arXiv:2106.05934 (:mod:`flowplug.plugins.fermion_schemes`):
  ``exact-marginal`` (dense determinant), ``pseudo-marginal`` (``--n-pseudofermions`` draws of
  the ``ilu`` model, ``--scale``), ``fermion-gibbs`` (unconditional flow), ``fermion-joint``
  (``ilu`` model); their chains start from the thermalised HMC configurations;
* the measured runs of all samplers alternate in ``--segments`` pieces, so that they see the
  same load on a shared machine; only the kernel steps are timed (measurements are not).

Cost per independent sample of an observable = (wall seconds per step and chain) x 2 tau_int,
tau_int by the Gamma method (Wolff's convention, 1/2 for independent samples), for the
topological charge Q and the chiral condensate (``chiral_condensate``, exact trace). tau_int is
a **lower bound** (``*_lower_bound: true``) where the Gamma window reaches half the chain,
where no chain changed Q (then tau_int = the chain length), or where Q changed sector fewer
than 5 times per chain, and for every observable where the chains made fewer than 10 accepted
moves each (then tau_int >= the chain length); a ratio involving a lower bound is flagged the same way
(``ratio_bound``: ``">="`` when only HMC's cost is a bound, ``"<="`` when only the scheme's
is, ``"?"`` when both are).

Output: one JSON line per sampler (``--json``) with ``sampler``, ``seconds_per_step``,
``acceptance``, and per observable ``mean``, ``error``, ``tau_int``, ``tau_int_lower_bound``,
``seconds_per_independent`` (and the plaquette, or ``ising_energy`` for Yukawa, for the agreement
check); then one line ``{"summary": ...}`` with the training time, the ratios HMC cost /
scheme cost, and ``agreement``: the z-scores of every sampler's means against HMC's and the
exact-marginal chain's (``max_abs_z``; samplers whose tau_int is only a lower bound are left
out, their errors being unreliable). Without ``--json``, a readable table.

    python benchmarks/fermions.py --quick --json               # 4x4 smoke run (~1 min)
    python benchmarks/fermions.py --lattice 8 --beta 6 --kappa 0.24 --chains 8 --steps 160 \
        --thermalize 30 --segments 8 --train-steps 200 --hmc-steps 6 --json   # ~20 min on 2 busy cores
    python benchmarks/fermions.py --flow runs/schwinger-l8 --json        # a flow trained before

``--model yukawa`` runs the same comparison for the Yukawa model of arXiv:2106.05934, section IV
(:mod:`flowplug.plugins.yukawa`: phi^4 with ``--m2``, ``--lam`` and two staggered flavours with
Yukawa coupling ``--g`` and bare mass ``--mass``): the flow is an affine flow trained against
``yukawa-exact``, HMC runs on the pseudofermion action ``yukawa``, the ``free`` pseudofermion
model (phi = 0) replaces ``ilu`` (``--pf-model``), and the observables are the absolute
magnetisation |M| (key ``abs_magnetization``, in place of ``q2``) and the staggered condensate.
``--symmetrize`` averages the trained flow over phi -> -phi (:func:`flowplug.symmetric.symmetrize_flow`:
a reverse-KL flow finds one of the two modes of the massless model; the average proposes both).

    python benchmarks/fermions.py --model yukawa --lattice 8 --m2 -4 --lam 8 --g 1 --mass 0.3 --json

The figures of these runs are in docs/fermions.md ("Benchmark"; Yukawa: "Staggered fermions and
the Yukawa model").
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

SAMPLERS = ("hmc", "exact-marginal", "pseudo-marginal", "fermion-gibbs", "fermion-joint")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("schwinger", "yukawa"), default="schwinger")
    p.add_argument("--m2", type=float, default=-4.0, help="yukawa: phi^4 bare mass squared")
    p.add_argument("--lam", type=float, default=8.0, help="yukawa: phi^4 quartic coupling")
    p.add_argument("--g", type=float, default=1.0, help="yukawa: Yukawa coupling")
    p.add_argument("--mass", type=float, default=0.3, help="yukawa: bare staggered mass")
    p.add_argument("--pf-model", default=None, help="pseudofermion model (default: ilu, yukawa: free)")
    p.add_argument(
        "--symmetrize",
        action="store_true",
        help="yukawa: average the trained flow over phi -> -phi (the symmetry of the massless model)",
    )
    p.add_argument("--lattice", type=int, default=8)
    p.add_argument("--beta", type=float, default=4.0)
    p.add_argument("--kappa", type=float, default=0.24)
    p.add_argument("--chains", type=int, default=16)
    p.add_argument("--thermalize", type=int, default=40)
    p.add_argument("--steps", type=int, default=200, help="measured steps per sampler and chain")
    p.add_argument("--segments", type=int, default=10)
    p.add_argument("--hmc-steps", type=int, default=10)
    p.add_argument("--n-pseudofermions", type=int, default=4)
    p.add_argument("--scale", type=float, default=1.2, help="width of the ilu pseudofermion model")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--flow", type=Path, default=None, help="a trained run (flowplug train) instead of training")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="4x4, short runs (smoke test)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.pf_model is None:
        a.pf_model = "free" if a.model == "yukawa" else "ilu"
    if a.quick:
        a.lattice, a.beta, a.chains, a.thermalize, a.steps, a.segments, a.train_steps = 4, 2.0, 4, 4, 12, 2, 10
    return a


def train_flow(lattice: int, beta: float, kappa: float, steps: int, seed: int) -> tuple[Any, float]:
    """A u1-multiscale flow trained against ``schwinger-exact``; returns (flow, seconds)."""
    from flowplug.train import build_trainer

    levels = 2 * int(round(math.log2(lattice)))
    cfg = {
        "lattice": [lattice, lattice],
        "seed": seed,
        "threads": 1,
        "device": "cpu",
        "action": {"name": "schwinger-exact", "beta": beta, "kappa": kappa},
        "flow": {
            "layers": ["u1-multiscale"],
            "n_layers": levels,
            "options": {
                "concentrate": True,
                "saddle_width": True,
                "branches": 2,
                "init_beta": beta,
                "centre": True,
                "shift": "spread",
                "n_modes": 4,
                "hidden": [16, 16],
                "n_bins": 8,
            },
        },
        "train": {
            "steps": steps,
            "batch_size": 32,
            "lr": 1.5e-3,
            "schedule": "cosine",
            "lr_min_factor": 0.1,
            "path_gradient": True,
            "guard": 1.0,
        },
    }
    trainer = build_trainer(cfg, out=None, device="cpu")
    trainer.out = None
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return trainer.flow.eval(), time.perf_counter() - t0


def yukawa_couplings(a: argparse.Namespace) -> dict[str, float]:
    """The Yukawa couplings of the options."""
    return {"m2": a.m2, "lam": a.lam, "g": a.g, "mass": a.mass}


def train_yukawa_flow(a: argparse.Namespace) -> tuple[Any, float]:
    """An affine flow trained against ``yukawa-exact``; returns (flow, seconds)."""
    from flowplug.train import build_trainer

    cfg = {
        "lattice": [a.lattice, a.lattice],
        "seed": a.seed,
        "threads": 1,
        "device": "cpu",
        "action": {"name": "yukawa-exact", **yukawa_couplings(a)},
        "flow": {"layers": ["affine"], "n_layers": 8, "options": {"hidden": [32, 32]}},
        "train": {"steps": a.train_steps, "batch_size": 64, "lr": 2e-3, "schedule": "cosine", "lr_min_factor": 0.1},
    }
    trainer = build_trainer(cfg, out=None, device="cpu")
    trainer.out = None
    t0 = time.perf_counter()
    for _ in range(a.train_steps):
        trainer.train_step()
    return trainer.flow.eval(), time.perf_counter() - t0


def load_flow(path: Path) -> Any:
    """The flow of a ``flowplug train`` run (inverse check enforced)."""
    from flowplug.flowtools import open_flow

    return open_flow(path, check_inverse=True).flow


def observable_stats(hist: torch.Tensor, *, charge: bool = False) -> dict[str, Any]:
    """Gamma-method mean, error, tau_int of a (steps, chains) history, with the lower-bound rules."""
    from flowplug.stats import gamma_method

    steps = hist.shape[0]
    out: dict[str, Any] = {"mean": None, "error": None, "tau_int": float(steps), "tau_int_lower_bound": True}
    if charge:
        q = hist.round()
        changes = float((q[1:] != q[:-1]).double().sum(0).mean())
        out["sector_changes_per_chain"] = changes
        if changes == 0:
            out["mean"] = float((hist**2).mean())
            return out
        values = hist**2
    else:
        values = hist
    r = gamma_method(values, step_axis=0)
    out.update(mean=r.mean, error=r.error, tau_int=r.tau_int)
    out["tau_int_lower_bound"] = bool(r.window >= steps // 2 - 1 or (charge and out["sector_changes_per_chain"] < 5))
    return out


def pseudofermion_action(a: argparse.Namespace) -> Any:
    """The pseudofermion action of the model: ``schwinger`` or ``yukawa``."""
    if a.model == "yukawa":
        from flowplug.plugins.yukawa import YukawaPseudofermionAction

        return YukawaPseudofermionAction(**yukawa_couplings(a))
    from flowplug.plugins.fermion_actions import PseudofermionAction

    return PseudofermionAction(a.beta, a.kappa)


def build_samplers(flow: Any, a: argparse.Namespace) -> dict[str, Any]:
    """The five kernels of the comparison."""
    from flowplug.plugins.fermion_schemes import FermionGibbs, FermionJoint, PseudoMarginal, exact_marginal
    from flowplug.plugins.hmc import HMC

    pf = pseudofermion_action(a)
    return {
        "hmc": HMC(pf, integrator="omelyan", steps=a.hmc_steps, trajectory_length=1.0),
        "exact-marginal": exact_marginal(flow, pf),
        "pseudo-marginal": PseudoMarginal(
            flow, pf, n_pseudofermions=a.n_pseudofermions, pseudofermion=a.pf_model, scale=a.scale
        ),
        "fermion-gibbs": FermionGibbs(flow, pf),
        "fermion-joint": FermionJoint(flow, pf, pseudofermion=a.pf_model, scale=1.0),
    }


def run(a: argparse.Namespace) -> list[dict[str, Any]]:
    """Train (or load) the flow, run every sampler, return the JSON records."""
    from flowplug.measure import measurement
    from flowplug.threads import set_threads

    set_threads(1)
    torch.manual_seed(a.seed)
    g = torch.Generator().manual_seed(a.seed)
    yukawa = a.model == "yukawa"
    if a.flow is not None:
        flow, train_s = load_flow(a.flow), None
    elif yukawa:
        flow, train_s = train_yukawa_flow(a)
    else:
        flow, train_s = train_flow(a.lattice, a.beta, a.kappa, a.train_steps, a.seed)
    if yukawa and a.symmetrize:
        from flowplug.symmetric import symmetrize_flow

        flow = symmetrize_flow(flow, "z2")
    samplers = build_samplers(flow, a)
    first = "abs_magnetization" if yukawa else "q2"  # the key of the first observable
    if yukawa:
        meas_q = measurement("scalar", ["abs_magnetization"])
        meas_c = measurement("scalar", ["staggered_condensate"], couplings={"g": a.g, "mass": a.mass})
    else:
        meas_q = measurement("u1", ["topological_charge"])
        meas_c = measurement("u1", ["chiral_condensate"], couplings={"kappa": a.kappa})
    keys = ("abs_magnetization", "staggered_condensate") if yukawa else ("topological_charge", "chiral_condensate")
    # a third observable for the agreement check: the plaquette, or the scalar's nearest-neighbour energy
    meas_p = measurement("scalar", ["ising_energy"]) if yukawa else measurement("u1", ["plaquette"])
    third = "ising_energy" if yukawa else "plaquette"

    def measure(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return meas_q(x)[keys[0]], meas_c(x)[keys[1]], meas_p(x)[third]

    pf = pseudofermion_action(a)
    x0 = pf.hot_start((a.lattice, a.lattice), a.chains, generator=g)
    hmc = samplers["hmc"]
    st = hmc.init(x0)
    for _ in range(a.thermalize):
        st, _ = hmc.step(st, g)
    states = {name: k.init(st.x.clone()) for name, k in samplers.items()}
    for name, k in samplers.items():  # a few unmeasured steps from the common start
        if name != "hmc":
            for _ in range(max(2, a.thermalize // 4)):
                states[name], _ = k.step(states[name], g)
    hist: dict[str, dict[str, list[torch.Tensor]]] = {n: {"q": [], "c": [], "p": [], "acc": []} for n in samplers}
    seconds = dict.fromkeys(samplers, 0.0)
    per_segment = max(1, a.steps // a.segments)
    print(f"flow ready (train {train_s} s); {a.segments} segments of {per_segment} steps", file=sys.stderr, flush=True)
    for seg in range(a.segments):
        print(f"segment {seg + 1}/{a.segments}", file=sys.stderr, flush=True)
        for name, k in samplers.items():
            for _ in range(per_segment):
                t0 = time.perf_counter()
                states[name], info = k.step(states[name], g)
                seconds[name] += time.perf_counter() - t0
                q, c, pl = measure(states[name].x)
                hist[name]["q"].append(q)
                hist[name]["c"].append(c)
                hist[name]["p"].append(pl)
                hist[name]["acc"].append(info["accepted"].double())
    records = []
    steps = per_segment * a.segments
    for name in samplers:
        sps = seconds[name] / (steps * a.chains)
        qs = observable_stats(torch.stack(hist[name]["q"]), charge=not yukawa)
        cs = observable_stats(torch.stack(hist[name]["c"]))
        moves = float(torch.stack(hist[name]["acc"]).sum(0).mean())
        for s in (qs, cs):
            if moves < 10:  # fewer than 10 accepted moves per chain: tau_int is not measurable
                s["tau_int"], s["tau_int_lower_bound"] = max(s["tau_int"], float(steps)), True
            s["seconds_per_independent"] = 2 * s["tau_int"] * sps
        records.append(
            {
                "sampler": name,
                "model": a.model,
                "L": a.lattice,
                **(
                    {**yukawa_couplings(a), "pseudofermion": a.pf_model, "symmetrize": a.symmetrize}
                    if yukawa
                    else {"beta": a.beta, "kappa": a.kappa}
                ),
                "chains": a.chains,
                "steps": steps,
                "seconds_per_step": sps,
                "acceptance": float(torch.stack(hist[name]["acc"]).mean()),
                "moves_per_chain": moves,
                first: qs,
                "condensate": cs,
                third: observable_stats(torch.stack(hist[name]["p"])),
            }
        )
    hmc_rec = records[0]
    summary: dict[str, Any] = {"train_seconds": train_s, "flow": str(a.flow) if a.flow else "trained here"}
    for rec in records[1:]:
        for key in (first, "condensate"):
            h, f = hmc_rec[key], rec[key]
            ratio = h["seconds_per_independent"] / f["seconds_per_independent"]
            bound = {(False, False): "=", (True, False): ">=", (False, True): "<=", (True, True): "?"}[
                (h["tau_int_lower_bound"], f["tau_int_lower_bound"])
            ]
            summary[f"ratio_{key}.{rec['sampler']}"] = ratio
            summary[f"ratio_bound_{key}.{rec['sampler']}"] = bound
    summary["agreement"] = agreement(records, (first, "condensate", third))
    records.append({"summary": summary})
    return records


def agreement(records: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    """z = (mean - mean_ref) / sqrt(error^2 + error_ref^2) of every sampler against HMC and against
    the exact-marginal chain, per observable; None where an error is missing or tau_int is only a
    lower bound (the error is then not trustworthy). ``max_abs_z`` over the trustworthy ones."""
    by = {r["sampler"]: r for r in records}
    out: dict[str, Any] = {}
    zs = []
    for ref in ("hmc", "exact-marginal"):
        for r in records:
            if r["sampler"] == ref:
                continue
            for key in keys:
                a, b = r[key], by[ref][key]
                z = None
                ok = a["error"] and b["error"] and not (a["tau_int_lower_bound"] or b["tau_int_lower_bound"])
                if ok:
                    z = (a["mean"] - b["mean"]) / math.hypot(a["error"], b["error"])
                    zs.append(abs(z))
                out[f"z_{key}.{r['sampler']}_vs_{ref}"] = z
    out["max_abs_z"] = max(zs) if zs else None
    out["compared"] = len(zs)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run and print (module docstring)."""
    a = parse(argv)
    records = run(a)
    if a.json:
        for r in records:
            print(json.dumps(r), flush=True)
        return 0
    first = "abs_magnetization" if a.model == "yukawa" else "q2"
    point = f"g = {a.g}, mass = {a.mass}" if a.model == "yukawa" else f"beta = {a.beta}, kappa = {a.kappa}"
    print(f"{a.model}: L = {a.lattice}, {point}: seconds per independent sample (per chain)")
    for r in records[:-1]:
        q, c = r[first], r["condensate"]
        flag = lambda s: ">=" if s["tau_int_lower_bound"] else ""  # noqa: E731
        print(
            f"  {r['sampler']:16s} acc {r['acceptance']:.3f}  s/step {r['seconds_per_step']:.2e}  "
            f"{first}: tau {flag(q)}{q['tau_int']:.1f} cost {flag(q)}{q['seconds_per_independent']:.3g} s  "
            f"condensate: tau {flag(c)}{c['tau_int']:.1f} cost {flag(c)}{c['seconds_per_independent']:.3g} s"
        )
    print(json.dumps(records[-1]["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
