"""Scaling with the lattice size: ESS, acceptance, training time to a target ESS and cost per
independent sample against L (cf. Del Debbio et al., arXiv:2105.12481).

Not a timed test: run it by hand, on an otherwise idle machine if the times are to be quoted.

    python benchmarks/scaling.py --out scaling-run        # the study (about 25 CPU minutes, one thread)
    python benchmarks/scaling.py --quick --out /tmp/sq    # seconds: plumbing only (tiny L and steps)
    python benchmarks/scaling.py --theories u1 --sizes u1=8,16 --steps u1=400 --out s2
    python benchmarks/scaling.py --theories phi4 --sizes 6,8,10 --steps 1500 --target-ess 0.2 --out s3
    python benchmarks/scaling.py --out scaling-run --replot --target-ess phi4=0.2   # no training: new
                                                          # target from the runs' logs, plot and fits

Points (seed 1, ``--threads`` torch threads, default 1):

* ``phi4``: the tutorial point of arXiv:2101.08176 (m2 = -4, lam = 8) with the flow of
  examples/train_phi4.toml (16 affine couplings, path gradients, cosine schedule) at
  L = 6, 8, 12, 16, 20, the same number of steps at every L (default 600);
* ``u1``: 2D U(1) at beta = 6 with the u1-multiscale flow of examples/train_u1_b6_l16.toml
  (one pass over the min(6, all) finest levels) at L = 8, 16, 32 (default 700 steps, 350 at
  L = 32), trained from scratch (series ``u1-scratch``) and with transfer (``u1-transfer``):
  ``train.init_from`` the previous size of the transfer chain (L = 16 from the L = 8 scratch
  run, L = 32 from the L = 16 transfer run).

Every point is a ``flowplug train`` run (:func:`flowplug.jobs.train.run_train`) in
``OUT/runs/<series>-L<L>``; an ``OUT`` that already holds runs or results is refused
unless ``--force`` is given (the runs are then retrained in place). Per point:

* ``ess``, ``acceptance`` (estimate), ``acceptance_chain``: on ``--eval-samples`` fresh
  samples (the run's ``summary.json``);
* ``cpu_to_target_s`` / ``time_to_target_s``: training CPU time (the process's, noted after
  every step by a ``flowplug_after_train_step`` hook, kept in ``cpu_seconds.json`` of the
  run) / wall time (the ``wall_time_s`` column of ``train_log.csv``; both optimisation steps
  only) at which the running mean over ``--window`` steps of the batch ESS (``ess`` column
  of ``train_log.csv``, batch of 64) first reaches ``--target-ess``; NaN when it never does
  within the budget; ``best_running_ess`` is the highest running mean of the run. A target
  reached at step ``window - 1`` (the first full window) was met from the start, and its
  time is an upper bound. For ``u1-transfer`` also ``..._incl_source_s``, which add the training time of the source
  runs of the chain. On a shared machine the CPU time of a one-thread run is the steadier
  measure; the plot and the first fit use it;
* ``s_per_sample`` / ``samples_per_s``: CPU seconds of one flow proposal (``flow.sample``
  and the action, one thread) on a batch of ``--time-samples`` (best of two);
* ``cost_indep_s_tau`` = s_per_sample x 2 tau_int: seconds per effectively independent
  sample, with tau_int (Gamma method, Wolff's convention, 1/2 for independent samples) of
  ``tau_obs`` (the magnetisation for phi4, the topological charge for U(1)) on the
  independence-Metropolis chain that the run's evaluation runs over its fresh samples;
  inf when that chain never moved. ``cost_indep_s_ess`` = s_per_sample / ESS, the usual
  estimate, for comparison.

Writes ``OUT/scaling.csv`` (one row per point), ``OUT/scaling.png`` (ESS, training time to
the target and cost per independent sample against L; a time to target that was not reached
is drawn as an open triangle at the run's training time, a lower bound) and
``OUT/scaling_fits.json``, atomically. Prints one line per point, then least-squares fits on
log-log axes per series: CPU (and wall) time to target ~ L^z (where at least two points
reached it),
-ln ESS ~ V^a (V = L^2; a = 1 is the exponential decay ESS ~ exp(-c V) of a fixed flow
architecture) and cost per independent sample ~ L^z.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

#: theory -> (example config, observable whose IMH tau_int sets the cost)
THEORIES = {
    "phi4": ("train_phi4.toml", "magnetization"),
    "u1": ("train_u1_b6_l16.toml", "topological_charge"),
}
DEFAULT_SIZES = {"phi4": [6, 8, 12, 16, 20], "u1": [8, 16, 32]}
DEFAULT_STEPS = ["phi4=600", "u1=700", "u1@32=350"]
CPU_LOG = "cpu_seconds.json"  # per run: cumulative CPU seconds at the end of each step
QUICK_SIZES = {"phi4": [4, 6], "u1": [4, 8]}

COLUMNS = (
    "theory",
    "series",
    "L",
    "volume",
    "steps",
    "batch_size",
    "init_from_L",
    "train_time_s",
    "train_cpu_s",
    "steps_per_s",
    "source_train_s",
    "source_train_cpu_s",
    "target_ess",
    "window",
    "time_to_target_s",
    "step_to_target",
    "time_to_target_incl_source_s",
    "cpu_to_target_s",
    "cpu_to_target_incl_source_s",
    "best_running_ess",
    "ess",
    "acceptance",
    "acceptance_chain",
    "free_energy",
    "tau_obs",
    "tau_int",
    "s_per_sample",
    "samples_per_s",
    "cost_indep_s_tau",
    "cost_indep_s_ess",
    "rollbacks",
    "skipped",
    "run_dir",
)


# ----------------------------------------------------------------------------- options


def parse_per_theory(tokens, theories, cast, default):
    """``["0.3"]`` (all theories) or ``["phi4=0.2", "u1=0.3"]`` -> {theory: value}."""
    out = {t: default[t] if isinstance(default, dict) else default for t in theories}
    for tok in tokens or []:
        if "=" in tok:
            name, val = tok.split("=", 1)
            if name not in THEORIES:
                raise SystemExit(f"unknown theory {name!r} in {tok!r} (one of {', '.join(THEORIES)})")
            if name in out:
                out[name] = cast(val)
        else:
            for t in out:
                out[t] = cast(tok)
    return out


def sizes_list(text):
    """``"6,8,12"`` -> [6, 8, 12]."""
    return sorted({int(v) for v in text.split(",") if v.strip()})


def steps_for(tokens, theory, L):
    """Training steps of a point from ``--steps`` tokens: ``N`` (every point), ``theory=N``,
    ``theory@L=N``; the most specific token wins."""
    best, rank = None, -1
    for tok in tokens:
        if "=" not in tok:
            key, val, r = None, tok, 0
        else:
            key, val = tok.split("=", 1)
            r = 2 if "@" in key else 1
        if key is not None:
            name, _, size = key.partition("@")
            if name != theory or (size and int(size) != L):
                continue
        if r >= rank:
            best, rank = int(val), r
    if best is None:
        raise SystemExit(f"--steps gives no number of steps for {theory} at L = {L}")
    return best


# ------------------------------------------------------------------------------ points


def time_to_target(log_path, target, window, cpu=None):
    """(wall time, step, best running mean, CPU time) of the first step whose running mean of
    the batch ESS over ``window`` steps reaches ``target``; (nan, nan, best, nan) when none
    does. ``cpu``: the cumulative CPU seconds of every step (:func:`cpu_clock`)."""
    with open(log_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    ess = [float(r["ess"]) if math.isfinite(float(r["ess"])) else 0.0 for r in rows]
    wall = [float(r["wall_time_s"]) for r in rows]
    best = math.nan
    hit = (math.nan, math.nan, math.nan)
    acc = 0.0
    for i, e in enumerate(ess):
        acc += e
        if i >= window:
            acc -= ess[i - window]
        if i + 1 < window:
            continue
        mean = acc / window
        best = mean if math.isnan(best) else max(best, mean)
        if mean >= target and math.isnan(hit[1]):
            hit = (wall[i], int(rows[i]["step"]), cpu[i] if cpu and i < len(cpu) else math.nan)
    return hit[0], hit[1], best, hit[2]


def cpu_clock():
    """A plugin on ``flowplug_after_train_step`` that notes the process's CPU seconds at the end
    of every training step (``.marks``). On a shared machine the wall time of a single-threaded
    run stretches with the load; its CPU time does not."""
    from flowplug import hookimpl

    class CpuClock:
        def __init__(self):
            self.marks = []

        @hookimpl
        def flowplug_after_train_step(self, step, metrics):
            self.marks.append(time.process_time())

    return CpuClock()


def proposal_seconds(run_dir, n, threads):
    """CPU seconds per flow proposal (flow.sample and the action; one thread), best of two
    batches of ``n``: on a shared machine a single thread's CPU time is steadier than its wall time."""
    import torch

    from flowplug.checkpoints import load_flow

    lf = load_flow(run_dir)
    flow, action = lf.flow.eval(), lf.action
    gen = torch.Generator()
    gen.manual_seed(99)
    torch.set_num_threads(threads)
    best = math.inf
    with torch.no_grad():
        flow.sample(min(n, 8), gen)  # warm-up
        for _ in range(2):
            t0 = time.process_time()
            x, _ = flow.sample(n, gen)
            action.action(x)
            best = min(best, time.process_time() - t0)
    return best / n


def u1_levels(L):
    """Levels of the multiscale flow at L: the six finest, or all on smaller lattices."""
    from flowplug.plugins.flow_multiscale import block_hierarchy

    return min(6, len(block_hierarchy((L, L))))


def run_point(theory, series, L, steps, args, *, init_from=None):
    """Train one point with :func:`flowplug.jobs.train.run_train`; returns its CSV row."""
    from flowplug import config as fconfig
    from flowplug.fsutil import atomic_write
    from flowplug.jobs.train import DEFAULT_CONFIG, OPEN_TABLES, run_train
    from flowplug.manager import get_plugin_manager
    from flowplug.train import LOG_NAME

    example, obs = THEORIES[theory]
    run_dir = args.out / "runs" / f"{series}-L{L}"
    overrides = [
        f"out={json.dumps(run_dir.as_posix())}",
        f"lattice=[{L},{L}]",
        "seed=1",
        f"threads={args.threads}",
        "device=cpu",
        f"train.steps={steps}",
        "train.progress=false",
        "train.checkpoint_every=0",
        f"eval.samples={args.eval_samples}",
        f"eval.batch_size={min(1024, args.eval_samples)}",
    ]
    if theory == "u1":
        k = u1_levels(L)
        overrides += [f"flow.options.levels={k}", f"flow.n_layers={k}"]
    if init_from is not None:
        overrides.append(f"train.init_from={json.dumps(Path(init_from['run_dir']).as_posix())}")
    overrides += args.set
    cfg = fconfig.build_config(
        DEFAULT_CONFIG, config_file=EXAMPLES / example, overrides=overrides, open_tables=OPEN_TABLES
    )
    clock = cpu_clock()
    pm = get_plugin_manager()
    name = f"scaling-cpu-clock-{id(clock)}"
    pm.register(clock, name=name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            t0 = time.process_time()
            summary = run_train(cfg, force=args.force)
    finally:
        pm.unregister(name=name)
    # the trainer was built between t0 and step 0: count step 0 as long as step 1
    cpu = [m - t0 for m in clock.marks]
    if len(cpu) >= 2:
        cpu = [c - cpu[0] + (cpu[1] - cpu[0]) for c in cpu]
    with atomic_write(run_dir / CPU_LOG, "w") as fh:
        json.dump(cpu, fh)
    target = args.target_ess[theory]
    t_hit, step_hit, best, c_hit = time_to_target(run_dir / LOG_NAME, target, args.window, cpu)
    s_per = proposal_seconds(run_dir, args.time_samples, args.threads)
    tau = summary["observables"].get(f"{obs}_chain_tau_int", math.nan)
    moved = summary["acceptance_chain"] > 0 and tau is not None and math.isfinite(tau)
    source_s = source_cpu = 0.0
    if init_from is not None:
        source_s = init_from["train_time_s"] + init_from["source_train_s"]
        source_cpu = init_from["train_cpu_s"] + init_from["source_train_cpu_s"]
    ess = summary["ess"]
    return {
        "theory": theory,
        "series": series,
        "L": L,
        "volume": L * L,
        "steps": summary["steps"],
        "batch_size": int(cfg["train"]["batch_size"]),
        "init_from_L": init_from["L"] if init_from is not None else "",
        "train_time_s": summary["wall_time_s"],
        "train_cpu_s": cpu[-1] if cpu else math.nan,
        "steps_per_s": summary["steps_per_s"],
        "source_train_s": source_s,
        "source_train_cpu_s": source_cpu,
        "target_ess": target,
        "window": args.window,
        "time_to_target_s": t_hit,
        "step_to_target": step_hit,
        "time_to_target_incl_source_s": t_hit + source_s,
        "cpu_to_target_s": c_hit,
        "cpu_to_target_incl_source_s": c_hit + source_cpu,
        "best_running_ess": best,
        "ess": ess,
        "acceptance": summary["acceptance"],
        "acceptance_chain": summary["acceptance_chain"],
        "free_energy": summary["free_energy"],
        "tau_obs": obs,
        "tau_int": tau if moved else math.inf,
        "s_per_sample": s_per,
        "samples_per_s": 1.0 / s_per,
        "cost_indep_s_tau": s_per * 2 * tau if moved else math.inf,
        "cost_indep_s_ess": s_per / ess if ess > 0 else math.inf,
        "rollbacks": summary["rollbacks"],
        "skipped": summary["skipped_steps"],
        "run_dir": str(run_dir),
    }


def describe(r):
    """One line of figures for a point."""
    c = r["cpu_to_target_s"]
    hit = (
        f"target ESS {r['target_ess']:g} at step {r['step_to_target']:.0f}"
        f"{' (first full window)' if r['step_to_target'] == r['window'] - 1 else ''}, {c:.1f} CPU s "
        f"({r['time_to_target_s']:.1f} s wall)"
        if math.isfinite(c)
        else f"target ESS {r['target_ess']:g} not reached (best running mean {r['best_running_ess']:.3f})"
    )
    if r["series"] == "u1-transfer" and math.isfinite(c):
        hit += f", {r['cpu_to_target_incl_source_s']:.1f} CPU s with the sources' training"
    src = f" from L={r['init_from_L']}" if r["init_from_L"] != "" else ""
    return (
        f"{r['series']:12s} L={r['L']:3d}{src}: {r['steps']} steps in {r['train_cpu_s']:.1f} CPU s "
        f"({r['train_time_s']:.1f} s wall); ESS {r['ess']:.4f}, acceptance {r['acceptance']:.3f} "
        f"(chain {r['acceptance_chain']:.3f}); {hit}; tau_int({r['tau_obs']}) {r['tau_int']:.2f}; "
        f"{r['samples_per_s']:.0f} samples/s; {r['cost_indep_s_tau']:.3g} s per independent sample "
        f"({r['cost_indep_s_ess']:.3g} from 1/ESS)"
    )


# --------------------------------------------------------------------------- fits / plot


def power_fit(xs, ys):
    """Least squares of log y = z log x + c over the finite positive points: (z, c, n)."""
    pts = [
        (math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if y is not None and 0 < y < math.inf and x > 0
    ]
    n = len(pts)
    if n < 2 or len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    z = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
    return {"exponent": z, "prefactor": math.exp(my - z * mx), "points": n}


def series_rows(rows):
    """{series: rows sorted by L}; the transfer chain starts at the smallest scratch run."""
    out = {}
    for r in rows:
        out.setdefault(r["series"], []).append(r)
    if "u1-transfer" in out and "u1-scratch" in out:
        first = min(out["u1-scratch"], key=lambda r: r["L"])
        out["u1-transfer"] = [first] + out["u1-transfer"]
    return {k: sorted(v, key=lambda r: r["L"]) for k, v in out.items()}


def fits(rows):
    """Power-law fits per series (module docstring)."""
    out = {}
    for name, rs in series_rows(rows).items():
        Ls = [r["L"] for r in rs]
        incl = "_incl_source_s" if name == "u1-transfer" else "_s"
        f = {
            "cpu_to_target_vs_L": power_fit(Ls, [r["cpu_to_target" + incl] for r in rs]),
            "time_to_target_vs_L": power_fit(Ls, [r["time_to_target" + incl] for r in rs]),
            "minus_log_ess_vs_volume": power_fit(
                [r["volume"] for r in rs], [-math.log(r["ess"]) if 0 < r["ess"] < 1 else None for r in rs]
            ),
            "cost_indep_vs_L": power_fit(Ls, [r["cost_indep_s_tau"] for r in rs]),
        }
        if name == "u1-transfer":
            f["cpu_to_target_this_run_vs_L"] = power_fit(Ls[1:], [r["cpu_to_target_s"] for r in rs[1:]])
        out[name] = f
    return out


def describe_fits(all_fits):
    """Lines naming each fit (or why there is none)."""
    lines = []
    what = {
        "cpu_to_target_vs_L": ("training CPU time to target", "L"),
        "time_to_target_vs_L": ("training wall time to target", "L"),
        "cpu_to_target_this_run_vs_L": ("training CPU time to target, this run only", "L"),
        "minus_log_ess_vs_volume": ("-ln ESS", "V"),
        "cost_indep_vs_L": ("cost per independent sample", "L"),
    }
    for name, fs in all_fits.items():
        for key, f in fs.items():
            label, var = what[key]
            if f is None:
                lines.append(f"{name:12s} {label}: fewer than two usable points, no fit")
            else:
                note = "" if f["points"] >= 3 else " (two points only: indicative)"
                lines.append(
                    f"{name:12s} {label} ~ {f['prefactor']:.3g} {var}^{f['exponent']:.2f} ({f['points']} points){note}"
                )
    return lines


def plot(rows, path):
    """Three panels against L, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flowplug.fsutil import atomic_write

    style = {"phi4": ("C0", "o"), "u1-scratch": ("C1", "s"), "u1-transfer": ("C2", "D")}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for name, rs in series_rows(rows).items():
        color, marker = style.get(name, ("C3", "v"))
        Ls = [r["L"] for r in rs]
        axes[0].plot(Ls, [r["ess"] for r in rs], marker=marker, color=color, label=name)
        key = "cpu_to_target_incl_source_s" if name == "u1-transfer" else "cpu_to_target_s"
        hit = [(r["L"], r[key]) for r in rs if math.isfinite(r[key])]
        miss = [(r["L"], r["train_cpu_s"] + (r["source_train_cpu_s"] if name == "u1-transfer" else 0.0)) for r in rs]
        miss = [m for m, r in zip(miss, rs, strict=True) if not math.isfinite(r[key])]
        label = f"{name} (incl. sources)" if name == "u1-transfer" else name
        if hit:
            axes[1].plot(*zip(*hit, strict=True), marker=marker, color=color, label=label)
        first = [(r["L"], r[key]) for r in rs if r["step_to_target"] == r["window"] - 1]
        if first and name != "u1-transfer":
            axes[1].plot(*zip(*first, strict=True), marker="v", ls="none", ms=4, color="k")
        if miss:
            axes[1].plot(*zip(*miss, strict=True), marker="^", ms=9, ls="none", mfc="none", color=color, zorder=5)
        if name == "u1-transfer":
            own = [(r["L"], r["cpu_to_target_s"]) for r in rs[1:] if math.isfinite(r["cpu_to_target_s"])]
            if own:
                axes[1].plot(
                    *zip(*own, strict=True), marker=marker, ls="--", mfc="none", color=color, label=f"{name} (this run)"
                )
            first = [(r["L"], r["cpu_to_target_s"]) for r in rs[1:] if r["step_to_target"] == r["window"] - 1]
            if first:
                axes[1].plot(*zip(*first, strict=True), marker="v", ls="none", ms=4, color="k")
        cost = [(r["L"], r["cost_indep_s_tau"]) for r in rs if math.isfinite(r["cost_indep_s_tau"])]
        if cost:
            axes[2].plot(*zip(*cost, strict=True), marker=marker, color=color, label=name)
    targets = {r["theory"]: r["target_ess"] for r in rows}
    axes[0].set(xlabel="L", ylabel="ESS (fresh samples)", yscale="log", title="effective sample size")
    axes[1].set(
        xlabel="L",
        ylabel="training CPU time [s] (1 thread)",
        xscale="log",
        yscale="log",
        title="time to running-mean batch ESS >= " + ", ".join(f"{t:g} ({k})" for k, t in targets.items()),
    )
    axes[1].plot([], [], marker="^", ls="none", mfc="none", color="k", label="not reached (> run time)")
    axes[1].plot([], [], marker="v", ls="none", ms=4, color="k", label="in the first window (upper bound)")
    axes[2].set(
        xlabel="L",
        ylabel="seconds",
        xscale="log",
        yscale="log",
        title="cost per independent sample (2 tau_int x s/proposal)",
    )
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    sizes = sorted({r["L"] for r in rows})
    for ax in axes:
        ax.xaxis.set_major_locator(FixedLocator(sizes))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3, which="both")
        if ax is axes[1]:  # room above the points for the legend
            lo, hi = ax.get_ylim()
            ax.set_ylim(lo, hi * (hi / lo) ** 0.6)
            ax.legend(fontsize=7, loc="upper left", ncol=2)
        else:
            ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    with atomic_write(path, "wb") as fh:
        fh.write(buf.getvalue())


def write_csv(rows, path):
    """``rows`` as CSV (:data:`COLUMNS`; NaN and inf as Python writes them), atomically."""
    from flowplug.fsutil import atomic_write

    with atomic_write(path, "w") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


INT_COLUMNS = ("L", "volume", "steps", "batch_size", "window", "rollbacks", "skipped")
STR_COLUMNS = ("theory", "series", "tau_obs", "run_dir")


def read_csv(path):
    """Rows of a ``scaling.csv`` with the types :func:`run_point` gives them."""
    rows = []
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            row = {}
            for k in COLUMNS:
                v = r[k]
                if k in STR_COLUMNS:
                    row[k] = v
                elif k == "init_from_L":
                    row[k] = int(v) if v else ""
                elif k in INT_COLUMNS:
                    row[k] = int(v)
                else:
                    row[k] = float(v)
            rows.append(row)
    return rows


def retarget(row, target, window):
    """Recompute a row's time to ``target`` from its run's ``train_log.csv`` (``--replot``)."""
    from flowplug.train import LOG_NAME

    run = Path(row["run_dir"])
    cpu = json.loads((run / CPU_LOG).read_text()) if (run / CPU_LOG).exists() else None
    t_hit, step_hit, best, c_hit = time_to_target(run / LOG_NAME, target, window, cpu)
    row.update(
        cpu_to_target_s=c_hit,
        cpu_to_target_incl_source_s=c_hit + row["source_train_cpu_s"],
        target_ess=target,
        window=window,
        time_to_target_s=t_hit,
        step_to_target=step_hit,
        time_to_target_incl_source_s=t_hit + row["source_train_s"],
        best_running_ess=best,
    )
    return row


def finish(rows, out):
    """Write CSV, PNG and fits of ``rows`` to ``out`` and print the fits."""
    from flowplug.fsutil import atomic_write

    write_csv(rows, out / "scaling.csv")
    plot(rows, out / "scaling.png")
    all_fits = fits(rows)
    with atomic_write(out / "scaling_fits.json", "w") as fh:
        json.dump(all_fits, fh, indent=1)
    print("power-law fits (least squares on log-log axes):")
    for line in describe_fits(all_fits):
        print("  " + line)


# ------------------------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (runs under OUT/runs)")
    p.add_argument("--theories", nargs="+", default=list(THEORIES), choices=list(THEORIES))
    p.add_argument("--sizes", nargs="+", default=[], help="'6,8,12' for every theory, or 'phi4=6,8 u1=8,16'")
    p.add_argument(
        "--steps", nargs="+", default=[], help=f"N, theory=N or theory@L=N (default {' '.join(DEFAULT_STEPS)})"
    )
    p.add_argument("--target-ess", nargs="+", default=[], help="0.3 (every theory) or 'phi4=0.2 u1=0.3'")
    p.add_argument("--window", type=int, default=None, help="steps in the running mean of the batch ESS (50)")
    p.add_argument("--eval-samples", type=int, default=8192, help="fresh samples for ESS, acceptance, tau_int")
    p.add_argument("--time-samples", type=int, default=512, help="batch timed for the seconds per proposal")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-transfer", action="store_true", help="u1: only the runs from scratch")
    p.add_argument("--set", action="append", default=[], help="extra config override KEY=VALUE for every run")
    p.add_argument("--force", action="store_true", help="reuse an OUT that holds results (runs are retrained)")
    p.add_argument("--quick", action="store_true", help="seconds-long smoke run: tiny L, steps and samples")
    p.add_argument(
        "--replot",
        action="store_true",
        help="no training: redraw OUT's plot and fits from scaling.csv (times to target recomputed from the "
        "runs' logs when --target-ess or --window is given)",
    )
    args = p.parse_args(argv)
    os.environ.setdefault("FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD", "1")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    out = args.out
    if args.replot:
        rows = read_csv(out / "scaling.csv")
        if args.target_ess or args.window is not None:
            targets = parse_per_theory(args.target_ess, THEORIES, float, {r["theory"]: r["target_ess"] for r in rows})
            rows = [retarget(r, targets[r["theory"]], args.window or r["window"]) for r in rows]
        for r in rows:
            print(describe(r))
        finish(rows, out)
        return 0

    theories = list(dict.fromkeys(args.theories))
    sizes = dict(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    for tok in args.sizes:
        if "=" in tok:
            name, val = tok.split("=", 1)
            if name not in THEORIES:
                raise SystemExit(f"unknown theory {name!r} in --sizes {tok!r}")
            sizes[name] = sizes_list(val)
        else:
            sizes = {t: sizes_list(tok) for t in THEORIES}
    step_tokens = (["6"] if args.quick else DEFAULT_STEPS) + args.steps
    args.target_ess = parse_per_theory(args.target_ess, theories, float, 0.3)
    args.window = 50 if args.window is None else args.window
    if args.quick:
        args.window = min(args.window, 3)
        args.eval_samples = min(args.eval_samples, 128)
        args.time_samples = min(args.time_samples, 64)
    held = [out / "scaling.csv", out / "scaling.png", out / "runs"]
    if not args.force and any(h.exists() for h in held):
        print(
            f"{out} already holds a study ({', '.join(str(h) for h in held if h.exists())}): "
            "use a fresh --out, or --force to retrain its runs",
            file=sys.stderr,
        )
        return 2
    out.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    rows = []
    targets = ", ".join(f"{t} {args.target_ess[t]:g}" for t in theories)
    print(
        f"scaling study: {', '.join(f'{t} L={sizes[t]}' for t in theories)}; target ESS {targets} "
        f"(running mean over {args.window} steps); {args.eval_samples} eval samples; "
        f"{args.threads} thread(s)",
        flush=True,
    )

    def add(row):
        rows.append(row)
        print(describe(row), flush=True)
        write_csv(rows, out / "scaling.csv")  # partial results survive a later failure
        return row

    for theory in theories:
        if theory == "phi4":
            for L in sizes[theory]:
                add(run_point("phi4", "phi4", L, steps_for(step_tokens, "phi4", L), args))
            continue
        previous = None  # the transfer chain's last run
        for L in sizes[theory]:
            n = steps_for(step_tokens, "u1", L)
            scratch = add(run_point("u1", "u1-scratch", L, n, args))
            if args.no_transfer:
                continue
            if previous is None:
                previous = scratch
            else:
                previous = add(run_point("u1", "u1-transfer", L, n, args, init_from=previous))
    finish(rows, out)
    print(
        f"wrote {out / 'scaling.csv'}, {out / 'scaling.png'}, {out / 'scaling_fits.json'}; "
        f"total wall time {time.perf_counter() - t_start:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
