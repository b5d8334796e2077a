"""Reference points of the flow layers: train from the example configs and print the figures.

Not a timed test: run it by hand on an otherwise idle machine.

    python benchmarks/flows.py                       # phi4 and u1 at the issue's budgets, seed 1
    python benchmarks/flows.py --points phi4 --seeds 1,2,3 --threads 2
    python benchmarks/flows.py --points su3,su3-4d --steps 200
    python benchmarks/flows.py --speed-only          # training steps/s against the tutorial's
                                                     # architecture, same run: one JSON line per point
    python benchmarks/flows.py --speed-only --profile 5  # and torch.profiler tables of 5 more steps
                                                     # of each contestant (stderr)
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
(../shared/reference).

``--speed-only`` (points ``phi4`` and ``u1`` and their variants with affine or ``u1-ncp``
layers) times flowplug's training step against a minimal implementation, written here, of
the tutorial's architecture (Albergo et al., arXiv:2101.08176: real-NVP affine couplings with
checkerboard masks and periodic convolutional networks for phi^4, section III; U(1)
gauge-equivariant couplings of plaquettes with NCP mixtures, section IV, after Kanwar et al.,
arXiv:2003.06413): same lattice, batch size, number of layers, hidden widths, kernel size
and number of mixture components, the same threads, plain reverse-KL gradients and Adam as in
the tutorial's ``train_step``. The contestants alternate in short segments after a warm-up,
so that both see the same machine load, and the JSON line gives each one's steps/s and the
ratios: ``ratio`` is flowplug with the tutorial's objective (plain gradients) over the
reference, ``ratio_path`` (configs with path gradients) flowplug as configured over the
reference. The reference runs in ``--reference-dtype`` (float32 by default, faster than the
tutorial's float64 default on CPU, so the ratio is conservative).
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
    overrides += args.set
    cfg = fconfig.build_config(
        DEFAULT_TOML_TEXT, config_file=EXAMPLES / example, overrides=overrides, open_tables=OPEN_TABLES
    )
    with tempfile.TemporaryDirectory() as tmp:
        tr = build_trainer(cfg, out=Path(tmp), device=args.device)
        tr.out = None
        t0 = time.perf_counter()
        tr.run(progress=False)
        wall = time.perf_counter() - t0
    rate = tr.step / wall
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


# ------------------------------------------------------------------ tutorial reference
# A minimal implementation of the tutorial's architectures (arXiv:2101.08176), written for
# this benchmark, in the tutorial's style: masks as multiplications, circular padding in
# torch's convolution, a loop over layers, plain reverse-KL loss and Adam.


def _tutorial_net(c_in, c_out, hidden, kernel, final_tanh, dtype):
    """Periodic convolutions with LeakyReLU between them (and tanh at the end for phi^4)."""
    from torch import nn

    sizes = [c_in, *hidden, c_out]
    mods = []
    for i in range(len(sizes) - 1):
        conv = nn.Conv2d(sizes[i], sizes[i + 1], kernel, padding=kernel // 2, padding_mode="circular", dtype=dtype)
        mods.append(conv)
        if i < len(sizes) - 2:
            mods.append(nn.LeakyReLU())
    if final_tanh:
        mods.append(nn.Tanh())
    return nn.Sequential(*mods)


class _TutorialAffine(torch.nn.Module):
    """Real-NVP coupling on a checkerboard: x_a -> x_a e^s + t on one parity, (s, t) = net(x_f)."""

    def __init__(self, lattice, parity, hidden, kernel, dtype):
        super().__init__()
        grid = torch.meshgrid(*[torch.arange(n) for n in lattice], indexing="ij")
        frozen = ((sum(grid) + parity) % 2 == 0).to(dtype)
        self.register_buffer("frozen", frozen)
        self.net = _tutorial_net(1, 2, hidden, kernel, True, dtype)

    def forward(self, x):
        active = 1 - self.frozen
        x_f = self.frozen * x
        out = self.net(x_f.unsqueeze(1))
        s, t = out[:, 0], out[:, 1]
        y = active * t + active * x * torch.exp(s) + x_f
        return y, (active * s).sum(dim=(1, 2))


class _TutorialU1(torch.nn.Module):
    """U(1) gauge-equivariant coupling: NCP mixture on the active plaquettes of a stripe, links shifted by
    the change of their plaquette (mu = index mod 2, stripes of period 4 moving every two layers)."""

    def __init__(self, lattice, index, hidden, kernel, n_mix, dtype):
        super().__init__()
        mu, off = index % 2, (index // 2) % 4
        nu = 1 - mu
        coord = torch.meshgrid(*[torch.arange(n) for n in lattice], indexing="ij")[nu] % 4
        # updated links U_mu(x) on x_nu = off: their plaquette P(x) is active, P(x - nu) passive
        self.register_buffer("active", (coord == off).to(dtype))
        self.register_buffer("frozen", ((coord != off) & (coord != (off - 1) % 4)).to(dtype))
        links = torch.zeros(2, *lattice, dtype=dtype)
        links[mu] = self.active
        self.register_buffer("links", links)
        self.sign = 1.0 if mu == 0 else -1.0  # U_0(x) enters P(x) with +, U_1(x) with -
        self.mu = mu
        self.n_mix = n_mix
        self.net = _tutorial_net(2, n_mix + 1, hidden, kernel, False, dtype)

    def forward(self, theta):
        two_pi = 2 * math.pi
        plaq = _tutorial_plaq(theta)
        p_f = self.frozen * plaq
        out = self.net(torch.stack([torch.cos(p_f), torch.sin(p_f)], dim=1))
        s, t = out[:, : self.n_mix], out[:, -1]
        x = torch.remainder(self.active * plaq, two_pi).unsqueeze(1)
        half = x / 2
        y = torch.remainder(2 * torch.atan(torch.exp(s) * torch.tan(half)), two_pi).mean(dim=1)
        log_j = -torch.log(torch.exp(-s) * torch.cos(half) ** 2 + torch.exp(s) * torch.sin(half) ** 2)
        log_j = torch.logsumexp(log_j, dim=1) - math.log(self.n_mix)
        new = self.active * torch.remainder(y + t, two_pi) + (1 - self.active) * plaq
        delta = new - plaq
        shift = torch.stack([delta, -delta], dim=1)
        out_theta = self.links * torch.remainder(theta + shift, two_pi) + (1 - self.links) * theta
        return out_theta, (self.active * log_j).sum(dim=(1, 2))


def _tutorial_plaq(theta):
    return theta[:, 0] + torch.roll(theta[:, 1], -1, 1) - torch.roll(theta[:, 0], -1, 2) - theta[:, 1]


class TutorialReference:
    """One training step of the tutorial's flow for phi^4 (``kind = "phi4"``) or 2D U(1) (``"u1"``).

    Arguments:
        kind: ``"phi4"`` or ``"u1"``.
        lattice: (L_0, L_1).
        n_layers, hidden, kernel, n_mix, batch: The architecture and batch size.
        params: ``{"m2", "lam"}`` for phi^4, ``{"beta"}`` for U(1).
        dtype: torch dtype of fields and networks.
        seed: Seed of the initialisation and of the prior samples.
    """

    def __init__(self, kind, lattice, *, n_layers, hidden, kernel, n_mix, batch, params, dtype, seed=1):
        gen_state = torch.get_rng_state()
        torch.manual_seed(seed)
        if kind == "phi4":
            layers = [_TutorialAffine(lattice, i % 2, hidden, kernel, dtype) for i in range(n_layers)]
        else:
            layers = [_TutorialU1(lattice, i, hidden, kernel, n_mix, dtype) for i in range(n_layers)]
        torch.set_rng_state(gen_state)
        self.kind, self.lattice, self.batch, self.params, self.dtype = kind, tuple(lattice), batch, params, dtype
        self.layers = torch.nn.ModuleList(layers)
        self.optimizer = torch.optim.Adam(self.layers.parameters(), lr=1e-3)
        self.generator = torch.Generator().manual_seed(seed)
        self.n_params = sum(p.numel() for p in self.layers.parameters())

    def _action(self, x):
        if self.kind == "phi4":
            m2, lam = self.params["m2"], self.params["lam"]
            dens = m2 * x**2 + lam * x**4
            for ax in (1, 2):
                dens = dens + 2 * x**2 - x * torch.roll(x, 1, ax) - x * torch.roll(x, -1, ax)
            return dens.sum(dim=(1, 2))
        return -self.params["beta"] * torch.cos(_tutorial_plaq(x)).sum(dim=(1, 2))

    def step(self):
        """One optimisation step (prior sample, flow, loss, backward, Adam) and the ESS; returns (loss, ess)."""
        self.optimizer.zero_grad()
        n_sites = math.prod(self.lattice)
        if self.kind == "phi4":
            x = torch.randn(self.batch, *self.lattice, generator=self.generator, dtype=self.dtype)
            log_q = -0.5 * (x * x).sum(dim=(1, 2)) - 0.5 * n_sites * math.log(2 * math.pi)
        else:
            shape = (self.batch, 2, *self.lattice)
            x = 2 * math.pi * torch.rand(shape, generator=self.generator, dtype=self.dtype)
            log_q = torch.full((self.batch,), -2 * n_sites * math.log(2 * math.pi), dtype=self.dtype)
        for layer in self.layers:
            x, log_j = layer(x)
            log_q = log_q - log_j
        log_p = -self._action(x)
        loss = (log_q - log_p).mean()
        loss.backward()
        self.optimizer.step()
        log_w = (log_p - log_q).detach()
        w = torch.exp(log_w - log_w.max())
        ess = w.sum() ** 2 / (w.numel() * (w * w).sum())
        return float(loss.detach()), float(ess)


def _reference_for(cfg, dtype, seed):
    """The tutorial reference with the architecture of a flowplug configuration (affine or u1-ncp)."""
    flow = cfg["flow"]
    layers = [str(n) for n in flow["layers"]]
    opts = dict(flow.get("options", {}))
    common = {
        "n_layers": int(flow.get("n_layers") or len(layers)),
        "hidden": [int(h) for h in opts.get("hidden", [8, 8])],
        "kernel": int(opts.get("kernel_size", 3)),
        "batch": int(cfg["train"]["batch_size"]),
        "dtype": dtype,
        "seed": seed,
    }
    action = cfg["action"]
    if layers == ["affine"]:
        params = {"m2": float(action["m2"]), "lam": float(action["lam"])}
        return TutorialReference("phi4", cfg["lattice"], n_mix=0, params=params, **common)
    if layers == ["u1-ncp"] and len(cfg["lattice"]) == 2:
        n_mix = int(opts.get("n_mix", 2))
        return TutorialReference("u1", cfg["lattice"], n_mix=n_mix, params={"beta": float(action["beta"])}, **common)
    raise SystemExit(f"--speed-only compares affine (phi4) and u1-ncp (2D) flows with the tutorial; found {layers}")


def speed_compare(name, seed, args, segments=8, per_segment=5, warm=5):
    """Training steps/s of a point's flowplug trainer and of the tutorial reference, alternating
    ``segments`` times (``per_segment`` steps each) after ``warm`` warm-up steps. With path gradients
    in the config the same trainer is also timed with plain gradients (its third contestant).
    Returns the JSON row."""
    from flowplug import config as fconfig
    from flowplug.jobs.train import DEFAULT_CONFIG as DEFAULT_TOML_TEXT
    from flowplug.jobs.train import OPEN_TABLES
    from flowplug.train import build_trainer

    example, _ = POINTS[name]
    overrides = [f"seed={seed}", f"threads={args.threads}", "train.progress=false", "train.checkpoint_every=0"]
    overrides += args.set
    cfg = fconfig.build_config(
        DEFAULT_TOML_TEXT, config_file=EXAMPLES / example, overrides=overrides, open_tables=OPEN_TABLES
    )
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.reference_dtype]
    with tempfile.TemporaryDirectory() as tmp:
        tr = build_trainer(cfg, out=Path(tmp), device=args.device)
        tr.out = None
        ref = _reference_for(cfg, dtype, seed)
        path = tr.path_gradient

        def flowplug_plain():
            tr.path_gradient = False
            tr.train_step()
            tr.path_gradient = path

        contestants = {"flowplug": tr.train_step, "reference": ref.step}
        if path:
            contestants["flowplug_plain"] = flowplug_plain
        for f in contestants.values():
            for _ in range(warm):
                f()
        wall = dict.fromkeys(contestants, 0.0)
        for _ in range(segments):
            for label, f in contestants.items():
                t0 = time.perf_counter()
                for _ in range(per_segment):
                    f()
                wall[label] += time.perf_counter() - t0
        if getattr(args, "profile", 0):
            _profile_contestants(name, seed, contestants, int(args.profile))
    rate = {k: segments * per_segment / v for k, v in wall.items()}
    plain = rate.get("flowplug_plain", rate["flowplug"])
    row = {
        "point": name,
        "seed": seed,
        "layers": cfg["flow"]["layers"],
        "n_layers": int(cfg["flow"].get("n_layers") or 1),
        "batch": tr.batch_size,
        "threads": torch.get_num_threads(),
        "path_gradient": path,
        "steps_per_s": rate["flowplug"],
        "plain_steps_per_s": plain,
        "reference_steps_per_s": rate["reference"],
        "reference_dtype": args.reference_dtype,
        "ratio": plain / rate["reference"],
        "flowplug_params": sum(p.numel() for p in tr.flow.parameters()),
        "reference_params": ref.n_params,
        "steps_timed": segments * per_segment,
    }
    if path:
        row["ratio_path"] = rate["flowplug"] / rate["reference"]
    return row


def _profile_contestants(name, seed, contestants, steps, rows=25):
    """``--profile N``: after the timing, N more steps of each contestant under torch.profiler
    (CPU), the operators with the most self time to stderr (stdout keeps the JSON lines). The
    profiler's own overhead per operator inflates small operators: for where the time goes,
    not for speed figures."""
    from torch.profiler import ProfilerActivity, profile

    for label, f in contestants.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                f()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
        print(f"--- {name} seed {seed}: {label}, {steps} steps\n{table}", file=sys.stderr, flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--points", default="phi4,u1", help=f"comma list of {', '.join(POINTS)}")
    p.add_argument("--seeds", default="1")
    p.add_argument("--steps", type=int, default=0, help="override train.steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--samples", type=int, default=8192)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--speed-only",
        action="store_true",
        help="training steps/s against the tutorial's architecture (module docstring), one JSON line per point",
    )
    p.add_argument("--reference-dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--segments", type=int, default=8, help="--speed-only: alternations of the contestants")
    p.add_argument("--per-segment", type=int, default=5, help="--speed-only: steps per contestant and segment")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="--speed-only: profile N more steps of each contestant (torch.profiler), tables to stderr",
    )
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
    if args.speed_only:
        for name in args.points.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                row = speed_compare(name.strip(), seed, args, segments=args.segments, per_segment=args.per_segment)
                rows.append(row)
                print(json.dumps(row), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        return 0
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
            line += (
                f"; ESS {row['ess']:.3f}, acceptance {row['acceptance']:.3f} "
                f"(chain {row['acceptance_chain']:.3f}), F_q {row['free_energy']:.3f}"
            )
            for k, ref in row["exact"].items():
                m, e = row[k]
                mc, ec = row[k + "_chain"]
                line += f"; {k} {m:.4f}({e:.4f}), chain {mc:.4f}({ec:.4f}) vs {ref:.4f}"
            print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
