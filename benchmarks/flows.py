"""Reference points of the flow layers: train from the example configs and print the figures.

Not a timed test: run it by hand on an otherwise idle machine.

    python benchmarks/flows.py                       # phi4 and u1 at the issue's budgets, seed 1
    python benchmarks/flows.py --points phi4 --seeds 1,2,3 --threads 2
    python benchmarks/flows.py --points su3,su3-4d --steps 200
    python benchmarks/flows.py --speed-only          # steps/s only (50 steps per point; with
                                                     # path gradients also the plain-gradient rate)
    python benchmarks/flows.py --points su3-4d,su3 --compare-maps
                                                     # SU(N) configs: training steps/s of the shipped
                                                     # layer against the same architecture with the
                                                     # eigenvalue spline map (sun-spectral, 8 bins),
                                                     # alternating segments in one run, and the ratio

For every point and seed it trains with the example configuration (same number of
gradient steps and batch size as the tutorial of arXiv:2101.08176 for phi4 and u1),
then draws ``--samples`` (default 8192) fresh samples and prints: steps/s, ESS,
the independence-Metropolis acceptance (estimate and an actual chain), the free-energy
bound, and reweighted observables next to their exact or reference values
(../shared/reference). The tutorial's own code, on 2 CPU threads in float32, trains at
about 14 steps/s (phi4) and 11-12 steps/s (u1) on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

#: point -> (example config, exact/reference values of reweighted observables)
POINTS = {
    "phi4": ("train_phi4.toml", {"magnetization_abs": 0.08699}),  # long HMC, +- 0.00006
    "phi4-spline": ("train_phi4_spline.toml", {"magnetization_abs": 0.08699}),
    "u1": ("train_u1.toml", {"plaquette": 0.697774658011, "topological_charge_squared": 1.239298910723}),
    "u1-large": ("train_u1_large.toml", {"plaquette": 0.697774658011, "topological_charge_squared": 1.239298910723}),
    "u1-deep": ("train_u1_deep.toml", {"plaquette": 0.697774658011, "topological_charge_squared": 1.239298910723}),
    "u1-multiscale": (
        "train_u1_multiscale.toml",
        {"plaquette": 0.697774658011, "topological_charge_squared": 1.239298910723},
    ),
    "su2": ("train_su2.toml", {"plaquette": 0.433127426722312}),
    "su3": ("train_su3.toml", {"plaquette": 0.279619149409304}),
    "su3-4d": ("train_su3_4d.toml", {}),
}


def _observables(field):
    from flowplug import gauge
    from flowplug.groups import wrap_angle

    if field == "scalar":
        return {"magnetization_abs": lambda x: x.flatten(1).mean(1).abs()}
    obs = {"plaquette": gauge.plaquette}
    if field == "u1":
        obs["topological_charge_squared"] = lambda x: (
            (wrap_angle(gauge.u1_plaquettes(x)).flatten(1).sum(1) / (2 * math.pi)) ** 2
        )
    return obs


@torch.no_grad()
def figures(flow, action, n, seed):
    """ESS, acceptance, free energy and observables: reweighted (delta-method errors) and on
    the independence Metropolis chain over the same samples (Gamma-method errors)."""
    from flowplug.diagnostics import evaluate_flow

    obs = _observables(flow.field)
    fig = evaluate_flow(flow, action, n, batch_size=1024, seed=seed, observables=obs)
    out = {k: fig[k] for k in ("ess", "acceptance", "acceptance_chain", "free_energy")}
    for k in obs:
        out[k] = (fig[k], fig[k + "_err"])
        out[k + "_chain"] = (fig[k + "_chain"], fig[k + "_chain_err"])
    return out


def run_point(name, seed, args):
    from flowplug import config as fconfig
    from flowplug.jobs.train import DEFAULT_CONFIG as DEFAULT_TOML_TEXT
    from flowplug.jobs.train import OPEN_TABLES
    from flowplug.train import build_trainer

    example, exact = POINTS[name]
    overrides = [f"seed={seed}", f"threads={args.threads}", "train.progress=false", "train.checkpoint_every=0"]
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    if args.speed_only:
        overrides.append("train.steps=50")
    overrides += args.set
    cfg = fconfig.build_config(
        DEFAULT_TOML_TEXT, config_file=EXAMPLES / example, overrides=overrides, open_tables=OPEN_TABLES
    )
    with tempfile.TemporaryDirectory() as tmp:
        tr = build_trainer(cfg, out=Path(tmp), device=args.device)
        tr.out = None
        warm = 5 if args.speed_only else 0
        for _ in range(warm):
            tr.train_step()
        t0 = time.perf_counter()
        tr.run(progress=False)
        wall = time.perf_counter() - t0
    rate = (tr.step - warm) / wall
    row = {
        "point": name,
        "seed": seed,
        "steps": tr.step,
        "batch": tr.batch_size,
        "steps_per_s": rate,
        "threads": torch.get_num_threads(),
        "skipped": tr.skipped,
        "wall_s": wall,
    }
    if args.speed_only and tr.path_gradient:
        # reference in the same run: the same flow trained with plain reparameterised gradients
        tr.path_gradient = False
        n_plain = 50
        t0 = time.perf_counter()
        for _ in range(n_plain):
            tr.train_step()
        row["plain_steps_per_s"] = n_plain / (time.perf_counter() - t0)
    if not args.speed_only:
        row.update(figures(tr.flow, tr.action, args.samples, 10_000 + seed))
        row["exact"] = exact
    return row


#: options of the stout layer that the spectral layer does not take
_STOUT_ONLY = ("n_modes", "n_steps", "max_curvature")


def compare_maps(name, seed, args, segments=5, per_segment=4):
    """Training steps/s of an SU(N) point as shipped and with ``sun-spectral`` (8 bins) in its
    place, everything else equal; the two trainers alternate ``segments`` times so that both
    see the same machine load. Returns a row with both rates and their ratio."""
    from flowplug import config as fconfig
    from flowplug.jobs.train import DEFAULT_CONFIG as DEFAULT_TOML_TEXT
    from flowplug.jobs.train import OPEN_TABLES
    from flowplug.train import build_trainer

    example, _ = POINTS[name]
    overrides = [f"seed={seed}", f"threads={args.threads}", "train.progress=false", "train.checkpoint_every=0"]
    overrides += args.set
    shipped = fconfig.build_config(
        DEFAULT_TOML_TEXT, config_file=EXAMPLES / example, overrides=overrides, open_tables=OPEN_TABLES
    )
    spectral = json.loads(json.dumps(shipped))
    spectral["flow"]["layers"] = ["sun-spectral"]
    opts = {k: v for k, v in spectral["flow"].get("options", {}).items() if k not in _STOUT_ONLY}
    opts.setdefault("n_bins", 8)
    spectral["flow"]["options"] = opts
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {}
        for label, cfg in (("shipped", shipped), ("sun-spectral", spectral)):
            tr = build_trainer(cfg, out=Path(tmp) / label, device=args.device)
            tr.out = None
            for _ in range(2):  # warm-up
                tr.train_step()
            trainers[label] = [tr, 0.0, 0]
        for _ in range(segments):
            for entry in trainers.values():
                t0 = time.perf_counter()
                for _ in range(per_segment):
                    entry[0].train_step()
                entry[1] += time.perf_counter() - t0
                entry[2] += per_segment
        for label, (_, wall, steps) in trainers.items():
            rates[label] = steps / wall
    return {
        "point": name,
        "seed": seed,
        "layers": shipped["flow"]["layers"],
        "steps_per_s": rates["shipped"],
        "spectral_steps_per_s": rates["sun-spectral"],
        "ratio": rates["shipped"] / rates["sun-spectral"],
        "threads": torch.get_num_threads(),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--points", default="phi4,u1", help=f"comma list of {', '.join(POINTS)}")
    p.add_argument("--seeds", default="1")
    p.add_argument("--steps", type=int, default=0, help="override train.steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--samples", type=int, default=8192)
    p.add_argument("--device", default="cpu")
    p.add_argument("--speed-only", action="store_true")
    p.add_argument("--set", action="append", default=[], help="extra config override KEY=VALUE")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument(
        "--compare-maps",
        action="store_true",
        help="SU(N) points: steps/s of the shipped layer against sun-spectral, same run, and the ratio",
    )
    args = p.parse_args(argv)
    os.environ.setdefault("FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD", "1")
    rows = []
    if args.compare_maps:
        for name in args.points.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                row = compare_maps(name.strip(), seed, args)
                rows.append(row)
                print(
                    f"{row['point']:8s} seed {seed}: {'+'.join(row['layers'])} {row['steps_per_s']:.3f} steps/s, "
                    f"sun-spectral {row['spectral_steps_per_s']:.3f} steps/s, ratio {row['ratio']:.2f} "
                    f"({row['threads']} threads)",
                    flush=True,
                )
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        return 0
    for name in args.points.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            row = run_point(name.strip(), seed, args)
            rows.append(row)
            line = (
                f"{row['point']:8s} seed {seed}: {row['steps']} steps x {row['batch']}, "
                f"{row['steps_per_s']:.2f} steps/s ({row['threads']} threads), skipped {row['skipped']}"
            )
            if not args.speed_only:
                line += (
                    f"; ESS {row['ess']:.3f}, acceptance {row['acceptance']:.3f} "
                    f"(chain {row['acceptance_chain']:.3f}), F_q {row['free_energy']:.3f}"
                )
                for k, ref in row["exact"].items():
                    m, e = row[k]
                    mc, ec = row[k + "_chain"]
                    line += f"; {k} {m:.4f}({e:.4f}), chain {mc:.4f}({ec:.4f}) vs {ref:.4f}"
            if "plain_steps_per_s" in row:
                line += (
                    f"; plain gradients {row['plain_steps_per_s']:.2f} steps/s, path/plain "
                    f"{row['steps_per_s'] / row['plain_steps_per_s']:.2f}"
                )
            print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
