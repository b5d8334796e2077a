"""The ``demo`` job: the whole workflow on 2D U(1), L = 8, beta = 2, in minutes.

:func:`run_demo` (``flowplug demo [--out DIR]``) runs the other jobs one after the other
in sub-directories of DIR and compares their results:

1. **HMC ensemble** (:func:`flowplug.jobs.hmc.run_hmc`, ``DIR/hmc/``, a ``flowplug hmc``
   run directory): ``hmc.chains`` chains (Omelyan integrator) from a cold start,
   ``hmc.thermalize`` trajectories of thermalisation, then ``hmc.trajectories``
   trajectories; every ``hmc.save_every`` trajectories after the thermalisation the
   configurations of all chains are written as files (``DIR/hmc/ensemble/traj_<t>.h5``,
   HDF5 ensemble stores: U(1) fits no ILDG-type format).
2. **Flow** (:func:`flowplug.jobs.train.run_train`, ``DIR/flow/``, a ``flowplug train``
   run directory usable as ``--flow`` of ``sample``, ``resample`` and ``propose``): a
   gauge-equivariant U(1) flow (``[flow]``, as in ``flowplug train``) trained by
   :class:`flowplug.train.Trainer` (``[train]``: reverse KL, cosine schedule) and
   evaluated on 1024 fresh samples. The defaults follow ``examples/train_u1.toml`` with
   fewer steps to keep the demo at about two minutes on two cores (docs/flows.md: 1000
   steps give acceptance ~0.27).
3. **Resampling** (:func:`flowplug.jobs.resample.run_resample`, ``DIR/resample/``): one
   flow independence-Metropolis chain seeded by every HMC configuration.
4. **Report**: ``DIR/report.txt``, ``DIR/summary.json`` and ``DIR/report.png`` compare
   the plaquette and <Q^2> of both samplers with their exact values on the torus
   (:mod:`flowplug.exact`), and tau_int of the topological charge Q of flow chains with
   HMC's, per step and per second of sampling.

Every number comes with a Gamma-method error (:func:`flowplug.jobs.summary.observable_summary`);
the report says "agrees" when the estimate is within 3 sigma of the exact value. The
configuration schema is :data:`DEFAULT_CONFIG`; :data:`QUICK` makes a seconds-long smoke run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flowplug.fsutil import LOCK_NAME, locked_run

__all__ = ["DEFAULT_CONFIG", "QUICK", "run_demo"]

DEFAULT_CONFIG = """\
# flowplug demo: HMC ensemble -> trained flow -> exact flow resampling -> report

seed = 2026
lattice = [8, 8]
beta = 2.0
threads = 1                 # torch CPU threads of every stage (small tensors: 1 is fastest; 0: torch's default)

[hmc]                       # a flowplug hmc run in DIR/hmc
chains = 16
thermalize = 100            # trajectories discarded
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

[resample]                  # a flowplug resample run in DIR/resample
steps = 400                 # flow-Metropolis steps per chain (one chain per HMC configuration)
save_every = 100            # write the chains' configurations every this many steps
"""

#: ``--set`` overrides of ``flowplug demo --quick``: a seconds-long smoke run.
QUICK = (
    "hmc.chains=4",
    "hmc.thermalize=10",
    "hmc.trajectories=20",
    "hmc.save_every=10",
    "hmc.steps=4",
    "flow.n_layers=2",
    "train.steps=5",
    "train.batch_size=16",
    "resample.steps=10",
    "resample.save_every=5",
)

#: Fresh samples on which the trained flow is evaluated.
EVAL_SAMPLES = 1024


def _sub_config(default_text: str, tree: Mapping[str, Any], open_tables: tuple[str, ...] = ()) -> dict[str, Any]:
    """A job's default configuration with ``tree`` merged in (keys and types checked)."""
    from flowplug import config as _config

    return _config.merge(
        _config.parse_toml(default_text, "default configuration"), tree, source="flowplug demo", open_tables=open_tables
    )


def _stats(history: Mapping[str, Any], burn: int = 0) -> dict[str, dict[str, Any]]:
    """Gamma-method figures of the plaquette, Q^2 and Q of (steps, chains) histories."""
    from flowplug.jobs.summary import observable_summary

    q = history["topological_charge"]
    return observable_summary({"plaquette": history["plaquette"], "q2": q**2, "q": q}, burn=burn)


def _last_train_metrics(run_dir: Path) -> dict[str, float]:
    """loss, free energy, ESS and acceptance of the last training step (``train_log.csv``)."""
    import csv

    from flowplug.train import LOG_NAME

    try:
        with open(run_dir / LOG_NAME, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError:
        return {}
    last = rows[-1] if rows else {}
    return {k: float(last[k]) for k in ("loss", "free_energy", "ess", "acceptance") if last.get(k) not in (None, "")}


@locked_run("demo", lambda a: a["out"])
def run_demo(
    cfg: Mapping[str, Any],
    out: Path,
    *,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the demo (module docstring); ``out`` is locked for the run.

    Arguments:
        cfg: The effective configuration (of :data:`DEFAULT_CONFIG`).
        out: The output directory.
        force: Replace the outputs of an earlier demo in ``out``.
        progress: Progress bars.
        log: Receives a line as each stage starts.

    Returns:
        The figures written to ``out/summary.json``; the report text is ``out/report.txt``.

    Raises:
        FlowplugError: if ``out`` holds an earlier demo and ``force`` is false, or the
            lattice is not 2D.
    """
    from flowplug.threads import job_threads

    with job_threads(cfg["threads"]):
        return _run_demo(cfg, Path(out), force=force, progress=progress, log=log)


def _run_demo(
    cfg: Mapping[str, Any], out: Path, *, force: bool, progress: bool, log: Callable[[str], None] | None
) -> dict[str, Any]:
    """The body of :func:`run_demo` (inside its lock and thread setting)."""
    import shutil

    from flowplug.errors import FlowplugError
    from flowplug.exact import u1_2d
    from flowplug.fsutil import atomic_write
    from flowplug.jobs import hmc as hmc_job
    from flowplug.jobs import resample as resample_job
    from flowplug.jobs import train as train_job
    from flowplug.jobs.output import read_measurements, write_job_summary
    from flowplug.jobs.report import comparison_report

    say = log or (lambda text: None)
    threads = int(cfg["threads"])
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
    action = {"name": "wilson", "group": "u1", "beta": beta}
    h = cfg["hmc"]
    therm, n_meas = int(h["thermalize"]), int(h["trajectories"])

    # 1. HMC ensemble, written as files
    say(
        f"[1/4] HMC: {h['chains']} chains x {therm} + {n_meas} trajectories on {lattice[0]}x{lattice[1]}, beta = {beta}"
    )
    hcfg = _sub_config(
        hmc_job.DEFAULT_CONFIG,
        {
            "seed": seed,
            "out": str(out / "hmc"),
            "lattice": list(lattice),
            "start": "cold",
            "chains": int(h["chains"]),
            "format": "hdf5",
            "save_every": int(h["save_every"]),
            "measurements": "hdf5",
            "observables": ["plaquette", "topological_charge"],
            "device": "cpu",
            "threads": threads,
            "progress": progress,
            "action": action,
            "hmc": {
                "trajectories": therm + n_meas,
                "thermalization": therm,
                "integrator": h["integrator"],
                "steps": int(h["steps"]),
                "trajectory_length": float(h["trajectory_length"]),
            },
        },
    )
    hsum = hmc_job.run_hmc(hcfg, force=True)
    hmc_hist = read_measurements(Path(hsum["measurements"]))
    hmc_stats = _stats(hmc_hist, burn=therm)
    t_hmc, hmc_acc = hsum["seconds_this_run"], hsum["acceptance"]
    n_traj = int(h["chains"]) * (therm + n_meas)
    ensemble = out / "hmc" / "ensemble"

    # 2. train the flow
    f, tr = cfg["flow"], cfg["train"]
    layer_names = "+".join(f["layers"])
    say(
        f"[2/4] training a {f['n_layers']}-layer {layer_names} flow for {tr['steps']} steps of batch {tr['batch_size']}"
    )
    run_dir = out / "flow"
    tcfg = _sub_config(
        train_job.DEFAULT_CONFIG,
        {
            "out": str(run_dir),
            "lattice": list(lattice),
            "seed": seed + 2,
            "device": "cpu",
            "threads": threads,
            "action": action,
            "flow": {"layers": list(f["layers"]), "n_layers": int(f["n_layers"]), "options": dict(f["options"])},
            "train": {**dict(tr), "progress": progress, "checkpoint_every": 0},
            "eval": {"samples": EVAL_SAMPLES, "batch_size": 512, "seed": seed + 5},
        },
        train_job.OPEN_TABLES,
    )
    tsum = train_job.run_train(tcfg, force=True)
    t_train = tsum["wall_time_s"]
    flow_ess = tsum["ess"]

    # 3. resample the HMC ensemble with flow proposals
    r = cfg["resample"]
    n_configs = int(h["chains"]) * len(list(ensemble.glob("traj_*.h5")))
    say(f"[3/4] resampling the {n_configs} HMC configurations with flow proposals ({r['steps']} steps each)")
    rcfg = _sub_config(
        resample_job.DEFAULT_CONFIG,
        {
            "seed": seed + 3,
            "steps": int(r["steps"]),
            "save_every": int(r["save_every"]),
            "checkpoint_every": 0,
            "observables": ["plaquette", "topological_charge"],
            "threads": threads,
        },
    )
    t0 = time.perf_counter()
    rsum = resample_job.run_resample(rcfg, [ensemble], run_dir, out / "resample", force=True, progress=progress)
    t_flow = time.perf_counter() - t0
    flow_hist = read_measurements(out / "resample" / "measurements.csv")
    flow_stats = _stats(flow_hist)
    n_prop = rsum["chains"] * rsum["steps"]

    # 4. report
    def cost(st: Mapping[str, Any], seconds: float, n: int) -> float:
        """Seconds per effectively independent sample of Q: (time / samples) x 2 tau_int(Q)."""
        return seconds / n * 2 * st["q"]["tau_int"]

    cost_hmc, cost_flow = cost(hmc_stats, t_hmc, n_traj), cost(flow_stats, t_flow, n_prop)
    agree = {}
    rows = []
    for label, st, step, c in (
        ("HMC", hmc_stats, "trajectory", cost_hmc),
        ("flow Metropolis", flow_stats, "proposal", cost_flow),
    ):
        rows.append(
            {
                "label": label,
                "step": step,
                "plaquette": st["plaquette"],
                "q2": st["q2"],
                "q": st["q"],
                "seconds_per_independent_q": c,
            }
        )
        if exact:
            agree[label] = {k: abs(st[k]["mean"] - exact[k]) / max(st[k]["error"], 1e-300) for k in ("plaquette", "q2")}
    summary = {
        "lattice": list(lattice),
        "beta": beta,
        "seed": seed,
        "exact": exact,
        "acceptance": rsum["acceptance"],
        "ess": flow_ess,
        "ess_hmc_inputs": rsum.get("ess_p_samples"),
        "hmc": {
            "acceptance": hmc_acc,
            "observables": hmc_stats,
            "seconds": t_hmc,
            "trajectories": n_traj,
            "seconds_per_independent_q": cost_hmc,
        },
        "flow": {
            "acceptance": rsum["acceptance"],
            "observables": flow_stats,
            "seconds": t_flow,
            "proposals": n_prop,
            "seconds_per_independent_q": cost_flow,
            "train_seconds": t_train,
            "train": _last_train_metrics(run_dir),
            "train_steps": tsum["steps"],
            "skipped_steps": tsum["skipped_steps"],
            "fresh_samples": {
                "n_samples": tsum["eval_samples"],
                "ess": tsum["ess"],
                "acceptance": tsum["acceptance"],
                "free_energy": tsum["free_energy"],
            },
        },
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
            verdict = (
                f"  [{'agrees' if ok else 'DISAGREES'} with exact: {dev['plaquette']:.1f} and {dev['q2']:.1f} sigma]"
            )
        lines.append(
            f"{label:16s} <P> = {p['mean']:.5f}({p['error']:.5f})  <Q^2> = {q2['mean']:.4f}({q2['error']:.4f})"
            f"  acceptance {acc:.3f}  tau_int(Q) {'>=' if 'note' in q else '='} "
            f"{q['tau_int']:.2f}({q['tau_int_error']:.2f}){verdict}"
        )
    cost_flow_with_training = (t_train + t_flow) / max(n_prop / (2 * flow_stats["q"]["tau_int"]), 1e-300)
    lines += [
        "",
        f"flow: {f['n_layers']} x {layer_names}, trained {tsum['steps']} steps x {tr['batch_size']} in "
        f"{t_train:.1f} s; on {tsum['eval_samples']} fresh samples ESS per sample {flow_ess:.3f} and expected "
        f"acceptance {tsum['acceptance']:.3f}; ESS {rsum.get('ess_p_samples', float('nan')):.3g} "
        "estimated from the HMC configurations",
        f"tau_int(Q): HMC {hmc_stats['q']['tau_int']:.2f} per trajectory, flow {flow_stats['q']['tau_int']:.2f} per "
        f"proposal (ratio {summary['tau_int_q_ratio_hmc_over_flow']:.2f})",
        f"seconds per independent Q: HMC {cost_hmc:.2e}, flow {cost_flow:.2e} (ratio HMC/flow "
        f"{cost_hmc / cost_flow:.2f}); with training: flow {cost_flow_with_training:.2e}",
        "",
        f"files: {out / 'hmc'}/, {run_dir}/, {out / 'resample'}/, {out / 'report.png'}",
    ]
    text = "\n".join(lines) + "\n"
    with atomic_write(out / "report.txt", "w") as fh:
        fh.write(text)
    say("[4/4] report")
    q_hist = {
        "HMC": hmc_hist["topological_charge"][therm:, 0],
        "flow Metropolis": flow_hist["topological_charge"][:, 0],
    }
    comparison_report(
        out / "report.png",
        rows,
        {"plaquette": exact["plaquette"], "q2": exact["q2"]} if exact else {},
        q_hist,
        title=f"2D U(1) {lattice[0]}x{lattice[1]}, beta = {beta}: flow Metropolis vs HMC vs exact",
    )
    return write_job_summary(out, "demo", summary)
