"""``flowplug demo [--out DIR]``: the whole job on 2D U(1), L = 8, beta = 2, in minutes.

1. **HMC ensemble**: ``hmc.chains`` HMC chains (Omelyan integrator) are thermalised and
   run; every ``hmc.save_every`` trajectories their configurations are written as files
   (``DIR/hmc/ensemble.h5``, an HDF5 ensemble store; U(1) fits no ILDG-type format).
2. **Flow**: a gauge-equivariant U(1) flow (``[flow]``, as in ``flowplug train``) is
   trained by :class:`flowplug.train.Trainer` (``[train]``: reverse KL, cosine schedule);
   ``DIR/flow/`` is a ``flowplug train`` run directory (``checkpoint.pt``,
   ``train_log.csv``), usable as ``--flow`` of ``sample``, ``resample`` and ``propose``.
   The defaults follow ``examples/train_u1.toml`` with fewer steps to keep the demo at
   about two minutes on two cores (docs/flows.md: 1000 steps give acceptance ~0.27).
3. **Resampling**: ``flowplug resample`` seeds one flow independence-Metropolis chain
   with every HMC configuration (``DIR/resample/``: ensemble, provenance, summary, PNG).
4. **Report**: ``DIR/report.txt``, ``DIR/summary.json`` and ``DIR/report.png`` compare
   the plaquette and <Q^2> of both samplers with their exact values on the torus
   (:mod:`flowplug.exact`), and tau_int of the topological charge Q of flow chains with
   HMC's, per step and per second of sampling.

Every number comes with a Gamma-method error (:mod:`flowplug.stats`); the demo says
"agrees" when the estimate is within 3 sigma of the exact value. Config: ``--print-config``,
``--config``, ``--set`` as for every command (``--quick`` = a seconds-long smoke run).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from flowplug.cli.common import add_config_arguments, config_from_args
from flowplug.fsutil import LOCK_NAME, locked_run
from flowplug.records import CommandSpec

DEFAULT_CONFIG = """\
# flowplug demo: HMC ensemble -> trained flow -> exact flow resampling -> report

seed = 2026
lattice = [8, 8]
beta = 2.0
threads = 1                 # torch CPU threads (small tensors: 1 is fastest)

[hmc]
chains = 16
thermalize = 50             # trajectories discarded
trajectories = 400          # trajectories after thermalisation
save_every = 100            # write every chain's configuration every this many trajectories
integrator = "omelyan"
steps = 8
trajectory_length = 1.0

[flow]                      # as in flowplug train (examples/train_u1.toml)
layers = ["u1-ncp"]         # gauge-equivariant couplings (flowplug plugins lists the layers)
n_layers = 16

[flow.options]
hidden = [8, 8]
kernel_size = 3
n_mix = 2
dtype = "float32"

[train]                     # [train] of flowplug train (flowplug train --print-config)
steps = 600                 # examples/train_u1.toml trains 1000 (acceptance ~0.27, docs/flows.md)
batch_size = 64
lr = 3e-3
schedule = "cosine"
lr_min_factor = 0.1

[resample]
steps = 400                 # flow-Metropolis steps per chain (one chain per HMC configuration)
save_every = 100            # write the chains' configurations every this many steps
"""

QUICK = ["hmc.chains=4", "hmc.thermalize=5", "hmc.trajectories=20", "hmc.save_every=10", "hmc.steps=4",
         "flow.n_layers=2", "train.steps=5", "train.batch_size=16", "resample.steps=10", "resample.save_every=5"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``flowplug demo``."""
    parser.add_argument("--out", metavar="DIR", default="flowplug-demo", help="output directory (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run (numbers not meaningful)")
    parser.add_argument("--force", action="store_true", help="replace the outputs of an earlier demo in DIR")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Run the demo (module docstring)."""
    if args.quick:
        args.overrides = QUICK + list(args.overrides)
    cfg = config_from_args(args, DEFAULT_CONFIG)
    if cfg is None:
        return 0
    demo(cfg, Path(args.out), force=args.force, progress=not args.no_progress)
    return 0


def _stats(h, burn=0):
    from flowplug.stats import gamma_method

    q = h["topological_charge"][burn:]
    out = {}
    for name, data in (("plaquette", h["plaquette"][burn:]), ("q2", q ** 2), ("q", q)):
        r = gamma_method(data, step_axis=0)
        out[name] = {"mean": r.mean, "error": r.error, "tau_int": r.tau_int, "tau_int_error": r.tau_int_error,
                     "window": r.window, "window_at_max": r.window >= data.shape[0] // 2}
    return out


@locked_run("demo", lambda a: a["out"])
def demo(cfg, out: Path, *, force: bool = False, progress: bool = True) -> dict:
    """Library form of ``flowplug demo``; returns the summary.

    Raises:
        FlowplugError: if DIR holds an earlier demo and ``force`` is false.
    """
    import shutil

    import torch

    from flowplug import io
    from flowplug.cli.cmd_resample import resample
    from flowplug.errors import FlowplugError
    from flowplug.exact import u1_2d
    from flowplug.fsutil import atomic_write, write_summary
    from flowplug.plugins.hmc import HMC
    from flowplug.plugins.observables import measurement
    from flowplug.plugins.theories import WilsonGaugeAction
    from flowplug.report import comparison_report
    from flowplug.resampling import run_chains
    from flowplug.train import build_trainer, evaluate_flow

    torch.set_num_threads(max(1, int(cfg["threads"])))
    lattice = tuple(int(v) for v in cfg["lattice"])
    if len(lattice) != 2:
        raise FlowplugError(f"demo: lattice must be 2D (L0, L1); found {list(lattice)}")
    beta, seed = float(cfg["beta"]), int(cfg["seed"])
    exact = u1_2d(lattice[0], beta) if lattice[0] == lattice[1] else None
    if out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()):
        if not force:
            raise FlowplugError(f"{out} holds an earlier run; choose another --out or add --force to replace it")
        for sub in ("hmc", "flow", "resample"):
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    say = print
    action = WilsonGaugeAction(beta, "u1")
    measure = measurement("u1", ["plaquette", "topological_charge"])
    h = cfg["hmc"]

    # 1. HMC ensemble, written as files
    say(f"[1/4] HMC: {h['chains']} chains x {h['thermalize']} + {h['trajectories']} trajectories "
        f"on {lattice[0]}x{lattice[1]}, beta = {beta}")
    hmc = HMC(action, integrator=h["integrator"], steps=int(h["steps"]), trajectory_length=float(h["trajectory_length"]))
    g = torch.Generator().manual_seed(seed)
    x0 = action.cold_start(lattice, int(h["chains"]))
    t0 = time.perf_counter()
    therm = run_chains(hmc, x0, int(h["thermalize"]), seed=seed, measure=None, progress=progress,
                       desc="HMC thermalise")
    store = out / "hmc" / "ensemble.h5"
    store.parent.mkdir(parents=True, exist_ok=True)
    every = max(1, int(h["save_every"]))

    def _save(ch, info=None):
        if ch.step_count % every == 0:
            prov = {"command": "demo", "sampler": "hmc", "trajectory": ch.step_count, "seed": seed,
                    "beta": beta}
            metas = [io.Metadata(provenance={**prov, "chain": b}) for b in range(ch.state.batch)]
            io.write(store, io.Ensemble(ch.state.x.cpu(), meta=metas, attrs={"beta": beta, "action": "wilson"}),
                     "hdf5", append=store.exists())

    chain_h = run_chains(hmc, therm.state.x, int(h["trajectories"]), seed=seed + 1, measure=measure,
                         on_step=_save, progress=progress, desc="HMC")
    t_hmc = time.perf_counter() - t0
    hmc_hist = chain_h.history_tensors()
    hmc_stats = _stats(hmc_hist)
    hmc_acc = float(hmc_hist["accepted"].mean())
    n_traj = int(h["chains"]) * (int(h["thermalize"]) + int(h["trajectories"]))

    # 2. train the flow
    f, tr = cfg["flow"], cfg["train"]
    layer_names = "+".join(f["layers"])
    say(f"[2/4] training a {f['n_layers']}-layer {layer_names} flow for {tr['steps']} steps of batch "
        f"{tr['batch_size']}")
    run_dir = out / "flow"
    tcfg = {"lattice": list(lattice), "seed": seed + 2, "device": "cpu", "threads": 0,
            "action": {"name": "wilson", "group": "u1", "beta": beta},
            "flow": {"layers": list(f["layers"]), "n_layers": int(f["n_layers"]), "options": dict(f["options"])},
            "train": {**dict(tr), "progress": progress, "checkpoint_every": 0}}
    trainer = build_trainer(tcfg, out=run_dir)
    t0 = time.perf_counter()
    trainer.run()
    t_train = time.perf_counter() - t0
    last = trainer.history[-1] if trainer.history else {}
    metrics = {k: float(last[k]) for k in ("loss", "free_energy", "ess", "acceptance") if k in last}
    # the trained flow on fresh samples: ESS and the expected independence-Metropolis acceptance
    fresh = evaluate_flow(trainer.flow, action, 1024, batch_size=512, seed=seed + 5)
    flow_ess = fresh["ess"]

    # 3. resample the HMC ensemble with flow proposals
    r = cfg["resample"]
    say(f"[3/4] resampling the {io.read(store).links.shape[0]} HMC configurations with flow proposals "
        f"({r['steps']} steps each)")
    rcfg = {"seed": seed + 3, "steps": int(r["steps"]), "save_every": int(r["save_every"]), "checkpoint_every": 0,
            "observables": ["plaquette", "topological_charge"], "to": "", "precision": 0,
            "kernel": {"type": "flow", "hmc_every": 0, "hmc": {}}, "action": {}}
    t0 = time.perf_counter()
    rsum, chain_f = resample(rcfg, [store], run_dir, out / "resample", force=True, progress=progress,
                             quiet=True)
    t_flow = time.perf_counter() - t0
    flow_hist = chain_f.history_tensors()
    flow_stats = _stats(flow_hist)
    n_prop = chain_f.state.batch * chain_f.step_count

    # 4. report
    def cost(st, seconds, n):
        """Seconds per effectively independent sample of Q: (time / samples) x 2 tau_int(Q)."""
        return seconds / n * 2 * st["q"]["tau_int"]

    cost_hmc, cost_flow = cost(hmc_stats, t_hmc, n_traj), cost(flow_stats, t_flow, n_prop)
    agree = {}
    rows = []
    for label, st in (("HMC", hmc_stats), ("flow Metropolis", flow_stats)):
        row = {"label": label, "plaquette": st["plaquette"], "q2": st["q2"], "q": st["q"]}
        rows.append(row)
        if exact:
            agree[label] = {k: abs(st[k]["mean"] - exact[k]) / max(st[k]["error"], 1e-300) for k in ("plaquette", "q2")}
    summary = {
        "lattice": list(lattice), "beta": beta, "seed": seed,
        "exact": exact,
        "acceptance": rsum["acceptance"], "ess": flow_ess, "ess_hmc_inputs": rsum.get("ess_p_samples"),
        "hmc": {"acceptance": hmc_acc, "observables": hmc_stats, "seconds": t_hmc, "trajectories": n_traj,
                "seconds_per_independent_q": cost_hmc},
        "flow": {"acceptance": rsum["acceptance"], "observables": flow_stats, "seconds": t_flow, "proposals": n_prop,
                 "seconds_per_independent_q": cost_flow, "train_seconds": t_train, "train": metrics,
                 "train_steps": trainer.step, "skipped_steps": trainer.skipped,
                 "fresh_samples": {k: fresh[k] for k in ("n_samples", "ess", "acceptance", "free_energy")}},
        "observables": {k: flow_stats[k] for k in ("plaquette", "q2")},
        "sigma_from_exact": agree,
        "tau_int_q_ratio_hmc_over_flow": hmc_stats["q"]["tau_int"] / flow_stats["q"]["tau_int"],
    }
    lines = [f"flowplug demo: 2D U(1), {lattice[0]}x{lattice[1]}, beta = {beta}", ""]
    if exact:
        lines.append(f"exact (torus):   <P> = {exact['plaquette']:.6f}   <Q^2> = {exact['q2']:.6f}")
    for label, st, acc in (("HMC", hmc_stats, hmc_acc), ("flow Metropolis", flow_stats, rsum["acceptance"])):
        p, q2, q = st["plaquette"], st["q2"], st["q"]
        verdict = ""
        if exact:
            dev = agree[label]
            ok = all(v < 3 for v in dev.values())
            verdict = (f"  [{'agrees' if ok else 'DISAGREES'} with exact: {dev['plaquette']:.1f} and "
                       f"{dev['q2']:.1f} sigma]")
        lines.append(f"{label:16s} <P> = {p['mean']:.5f}({p['error']:.5f})  <Q^2> = {q2['mean']:.4f}({q2['error']:.4f})"
                     f"  acceptance {acc:.3f}  tau_int(Q) {'>=' if q['window_at_max'] else '='} "
                     f"{q['tau_int']:.2f}({q['tau_int_error']:.2f}){verdict}")
    lines += ["",
              f"flow: {f['n_layers']} x {layer_names}, trained {trainer.step} steps x {tr['batch_size']} in "
              f"{t_train:.1f} s; on {fresh['n_samples']} fresh samples ESS per sample {flow_ess:.3f} and expected "
              f"acceptance {fresh['acceptance']:.3f}; ESS {rsum.get('ess_p_samples', float('nan')):.3g} "
              "estimated from the HMC configurations",
              f"tau_int(Q): HMC {hmc_stats['q']['tau_int']:.2f} per trajectory, flow {flow_stats['q']['tau_int']:.2f} per "
              f"proposal (ratio {summary['tau_int_q_ratio_hmc_over_flow']:.2f})",
              f"seconds per independent Q: HMC {cost_hmc:.2e}, flow {cost_flow:.2e} (ratio HMC/flow "
              f"{cost_hmc / cost_flow:.2f}); with training: flow {(t_train + t_flow) / max(n_prop / (2 * flow_stats['q']['tau_int']), 1e-300):.2e}",
              "",
              f"files: {store}, {run_dir}/, {out / 'resample'}/, {out / 'report.png'}"]
    text = "\n".join(lines) + "\n"
    with atomic_write(out / "report.txt", "w") as fh:
        fh.write(text)
    q_hist = {"HMC": hmc_hist["topological_charge"][:, 0].numpy(),
              "flow": flow_hist["topological_charge"][:, 0].numpy()}
    comparison_report(out / "report.png", rows, {"plaquette": exact["plaquette"], "q2": exact["q2"]} if exact else {},
                      q_hist, title=f"2D U(1) {lattice[0]}x{lattice[1]}, beta = {beta}: flow Metropolis vs HMC vs exact")
    write_summary(out, "demo", summary)
    say("[4/4] report")
    print(text, end="")
    return summary


COMMAND = CommandSpec(name="demo", description="the whole job on 2D U(1) L=8 beta=2: HMC ensemble, flow "
                      "training, exact flow resampling, report against exact values",
                      factory=add_arguments, run=run)
