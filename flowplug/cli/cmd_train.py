"""``flowplug train``: train a normalizing flow for a lattice action, with checkpoints and resume.

    flowplug train --config examples/train_phi4.toml [--set train.steps=500 ...]
    flowplug train --resume OUT_DIR [--set train.steps=5000]

Writes ``<out>/checkpoint.pt`` (atomically, every ``train.checkpoint_every`` steps, at
the end, and after the step in progress when Ctrl-C stops the run), ``<out>/train_log.csv`` (one row per step), ``<out>/config.toml`` and
``<out>/summary.json`` with ``ess``, ``acceptance``, ``free_energy``, ``steps``,
``skipped_steps``, ``wall_time_s`` (figures from ``eval.samples`` fresh samples).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flowplug.cli.common import add_config_arguments, config_from_args
from flowplug.errors import ConfigError, FlowplugError
from flowplug.records import CommandSpec

DEFAULT_TOML_TEXT = """\
# flowplug train: complete default configuration (every key, with its default).
out = "flowplug-train"       # output directory (checkpoint.pt, train_log.csv, summary.json)
lattice = [8, 8]             # lattice extents L_0, ..., L_{d-1} (x first)
seed = 1                     # seeds network initialisation and all sampling
device = "auto"              # auto (cuda when available) | cpu | cuda | cuda:N
threads = 0                  # CPU threads for torch; 0: torch's default (1 is often fastest on a busy machine)

[action]                     # the target theory: p(x) = exp(-S(x)) / Z
name = "phi4"                # registered action (flowplug plugins): phi4, wilson, ...
group = "u1"                 # wilson: u1 | su2 | su3
beta = 2.0                   # wilson coupling
m2 = -4.0                    # phi4: mass term (Albergo et al. convention)
lam = 8.0                    # phi4: quartic coupling

[flow]
layers = ["affine"]          # registered flow layers, used in turn (flowplug plugins)
n_layers = 16                # total number of coupling layers
prior = ""                   # empty: normal (scalar), uniform (u1), haar (su<N>)

[flow.options]               # options for every layer that accepts them; a sub-table
hidden = [8, 8]              # named after a layer (e.g. [flow.options.u1-ncp]) holds
                             # options for that layer only (kernel_size = 3 by default)
dtype = "float32"            # network dtype; densities and the map stay float64

[train]
steps = 1000                 # total optimisation steps
batch_size = 64              # samples per step
objective = "reverse"        # reverse (free energy, self-training) | forward (max. likelihood on an ensemble)
path_gradient = false        # reverse only: path-gradient estimator (arXiv:2207.08219)
path_gradient_method = "auto"  # auto | fast (score carried forward, arXiv:2403.15881) | inverse
optimizer = "adam"           # adam | adamw
lr = 1e-3                    # learning rate
weight_decay = 0.0
betas = [0.9, 0.999]
schedule = "constant"        # constant | cosine | linear (decay to lr * lr_min_factor)
warmup_steps = 0             # linear warm-up steps
lr_min_factor = 0.0
grad_clip = 0.0              # max gradient norm; 0 = no clipping
guard = 0.0                  # reverse only: divergence guard in nats; 0 = off (see docs/flows.md)
guard_window = 25            # steps per guard window
ensemble = ""                # forward: configurations (path or glob; any readable lattice format, .pt, .h5)
ensemble_format = ""         # forward: force a file format (default: detect)
checkpoint_every = 250       # steps between checkpoints (0: only at the end)
progress = true              # progress bar with loss, ESS and acceptance

[eval]
samples = 8192               # fresh samples for the final ESS / acceptance / free energy
batch_size = 1024            # samples per forward pass
seed = 12345                 # seed of the evaluation samples
"""

OPEN_TABLES = ("flow.options",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``flowplug train``."""
    add_config_arguments(parser)
    parser.add_argument("--resume", metavar="DIR",
                        help="continue the run in DIR from its checkpoint (bit-for-bit); only "
                             "train.steps, train.checkpoint_every, train.progress may be changed with --set")
    parser.add_argument("--force", action="store_true",
                        help="start afresh even though <out> holds a checkpoint of an earlier run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _observables(field: str):
    from flowplug import gauge

    if field == "scalar":
        return {"magnetization_abs": lambda x: x.flatten(1).mean(1).abs()}
    if field == "u1" or field.startswith("su"):
        obs = {"plaquette": gauge.plaquette}
        if field == "u1":
            import math

            from flowplug.groups import wrap_angle

            def q2(x):
                if x.shape[1] != 2:
                    return torch_nan(x)
                q = wrap_angle(gauge.u1_plaquettes(x)).flatten(1).sum(1) / (2 * math.pi)
                return q * q
            obs["topological_charge_squared"] = q2
        return obs
    return {}


def torch_nan(x):
    import torch

    return torch.full((x.shape[0],), float("nan"), dtype=torch.float64, device=x.device)


def run(args: argparse.Namespace) -> int:
    """Train (or resume) and write the outputs, holding the run directory's lock; returns 0."""
    import contextlib

    from flowplug.fsutil import run_lock

    with contextlib.ExitStack() as stack:
        return _run(args, lambda out: stack.enter_context(run_lock(out, "train")))


def _run(args: argparse.Namespace, lock) -> int:
    import warnings

    from flowplug import config as _config
    from flowplug.errors import InverseCheckWarning
    from flowplug.flowtools import check_inverse
    from flowplug import train as _train
    from flowplug.fsutil import write_summary

    if args.resume:
        if args.config:
            raise ConfigError("--resume takes its configuration from the checkpoint; drop --config")
        state = _train.read_checkpoint(args.resume)
        overrides: dict = {}
        for text in args.overrides:
            tree = _config.parse_override(text)
            if set(tree) != {"train"}:
                raise ConfigError(f"--set {text}: only train.steps, train.checkpoint_every and "
                                  "train.progress may change on --resume")
            overrides.update(tree["train"])
        if args.no_progress:
            overrides["progress"] = False
        if args.print_config:
            sys.stdout.write(_config.dumps(state["config"]))
            return 0
        trainer = _train.resume_trainer(args.resume, overrides=overrides)
        lock(trainer.out)
        config = trainer.config
        config.setdefault("train", {}).update(overrides)
        print(f"resuming {args.resume} at step {trainer.step} of {trainer.steps_total}", file=sys.stderr)
        if trainer.step >= trainer.steps_total:
            print(f"nothing to train: the run already has {trainer.step} steps (raise train.steps to "
                  "continue); evaluating", file=sys.stderr)
    else:
        config = config_from_args(args, DEFAULT_TOML_TEXT, open_tables=OPEN_TABLES)
        if config is None:
            return 0
        if args.no_progress:
            config["train"]["progress"] = False
        lock(Path(str(config["out"])))
        ckpt = Path(str(config["out"])) / _train.CHECKPOINT_NAME
        if ckpt.exists() and not args.force:
            raise FlowplugError(f"{ckpt} exists: continue that run with --resume {ckpt.parent}, or start "
                                "afresh with --force (or another out)")
        trainer = _train.build_trainer(config)
        out = Path(config["out"])
        out.mkdir(parents=True, exist_ok=True)
        from flowplug.fsutil import atomic_write

        with atomic_write(out / "config.toml", "w") as fh:
            fh.write(_config.dumps(config))
    trainer.run()
    ev = dict(config.get("eval", {}))
    figures = _train.evaluate_flow(trainer.flow, trainer.action, int(ev.get("samples", 8192)),
                                   batch_size=int(ev.get("batch_size", 1024)), seed=int(ev.get("seed", 12345)),
                                   observables=_observables(trainer.flow.field))
    # the samplers refuse a flow whose inverse is broken: say so now, not at the first `sample`
    inverse = check_inverse(trainer.flow)
    if not inverse.passed:
        warnings.warn(f"{trainer.out}: the trained flow's inverse does not undo its forward map "
                      f"({inverse.describe()}); sample, resample and propose will refuse it "
                      "(retrain with a lower train.lr or with train.guard)", InverseCheckWarning, stacklevel=1)
    last = trainer.history[-1] if trainer.history else {}
    summary = {
        "ess": figures["ess"],
        "acceptance": figures["acceptance"],
        "acceptance_chain": figures["acceptance_chain"],
        "free_energy": figures["free_energy"],
        "steps": trainer.step,
        "skipped_steps": trainer.skipped,
        "rollbacks": trainer.rollbacks,
        "wall_time_s": trainer.wall_time_s,
        "steps_per_s": trainer.step / trainer.wall_time_s if trainer.wall_time_s > 0 else None,
        "eval_samples": figures["n_samples"],
        "eval_non_finite": figures["non_finite"],
        "final_loss": last.get("loss"),
        "field": trainer.flow.field,
        "lattice": list(trainer.flow.lattice),
        "action": {"name": str(config["action"]["name"]), **getattr(trainer.action, "couplings", dict)()},
        "device": str(trainer.device),
        "checkpoint": str(trainer.out / _train.CHECKPOINT_NAME),
        "observables": {k: v for k, v in figures.items()
                        if k not in ("ess", "acceptance", "acceptance_chain", "free_energy", "n_samples",
                                     "non_finite")},
        "inverse_check": inverse.as_dict(),
    }
    write_summary(trainer.out, "train", summary)
    print(f"steps {trainer.step} (skipped {trainer.skipped}, rollbacks {trainer.rollbacks}), ESS {figures['ess']:.4f}, "
          f"acceptance {figures['acceptance']:.4f}, free energy {figures['free_energy']:.4f}, "
          f"{summary['steps_per_s'] or 0:.2f} steps/s -> {trainer.out}/summary.json")
    return 0


COMMAND = CommandSpec(name="train", description="train a normalizing flow for a lattice action (checkpoints, resume)",
                      factory=add_arguments, run=run)
