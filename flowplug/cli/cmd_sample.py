"""``flowplug sample --flow CHECKPOINT --out DIR``: exact Markov chains from a trained flow.

``chains`` chains start from flow samples and run ``steps`` steps of flow independence
Metropolis (or ``kernel.type = "flow-hmc"``, or with ``kernel.hmc_every`` HMC
trajectories before each flow step). The first ``thermalize`` steps are discarded from
the statistics (a flow sample is not yet a sample of p; the chain forgets it). Every
``save_every`` steps the configurations are written: into one HDF5 ensemble
``DIR/ensemble.h5`` (default; any field kind), or one file per configuration in another
format (``format = "ildg"`` for 4D SU(3)/SU(2)). ``DIR/measurements.csv`` has every
measurement, ``DIR/summary.json`` ``acceptance``, ``ess`` (of the flow proposals' weights
p/q), ``observables.<name>.{mean,error,tau_int}`` (Gamma method); ``DIR/report.png``
histories, autocorrelation functions and acceptance. ``--resume`` continues from
``DIR/chain.ckpt``. The flow must pass the inverse check
(:func:`flowplug.flowtools.check_inverse`, recorded as ``inverse_check`` in the summary)
unless ``--no-check-inverse`` is given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flowplug.cli.common import add_config_arguments, config_from_args
from flowplug.fsutil import locked_run
from flowplug.records import CommandSpec

DEFAULT_CONFIG = """\
# flowplug sample: exact Markov chains with flow proposals

seed = 1
chains = 16         # independent chains, run as one batch
steps = 200         # kernel steps per chain
thermalize = 20     # steps left out of the statistics
save_every = 0      # write the configurations every this many steps (0: only the last)
checkpoint_every = 100
format = "hdf5"     # output format of the configurations
observables = []    # [] = defaults of the field kind
ess_samples = 256   # flow samples used for the ESS of the proposal weights

[kernel]
type = "flow"       # "flow" (independence Metropolis), "flow-hmc" (HMC in latent space), "hmc"
hmc_every = 0       # > 0: this many HMC trajectories before every flow step

[kernel.hmc]
integrator = "omelyan"
steps = 10
trajectory_length = 1.0

[action]            # "" / 0 = the action stored with the flow
name = ""
beta = 0.0
group = ""
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``flowplug sample``."""
    parser.add_argument("--flow", metavar="CHECKPOINT", help="trained flow: a `flowplug train` run directory or its checkpoint.pt (required)")
    parser.add_argument("--out", metavar="DIR", help="output directory (required)")
    parser.add_argument("--resume", action="store_true", help="continue from DIR/chain.ckpt")
    parser.add_argument("--force", action="store_true", help="replace existing outputs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-check-inverse", action="store_true",
                        help="use a flow whose inverse fails the round-trip check (log q through it is wrong)")
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Sample (module docstring)."""
    cfg = config_from_args(args, DEFAULT_CONFIG)
    if cfg is None:
        return 0
    from flowplug.errors import ConfigError

    if not args.flow or not args.out:
        raise ConfigError("flowplug sample needs --flow CHECKPOINT and --out DIR")
    return sample(cfg, Path(args.flow), Path(args.out), resume=args.resume, force=args.force,
                  progress=not args.no_progress, check_inverse=not args.no_check_inverse)


@locked_run("sample", lambda a: a["out"])
def sample(cfg, flow_path: Path, out: Path, *, resume: bool = False, force: bool = False,
           progress: bool = False, quiet: bool = False, check_inverse: bool = True) -> int:
    """Library form of ``flowplug sample``; returns 0.

    Raises:
        FlowplugError: on a bad checkpoint or configuration, or existing outputs;
            :class:`flowplug.errors.InverseCheckError` if the flow fails the inverse check
            and ``check_inverse`` is true.
    """
    import torch

    from flowplug import io
    from flowplug.cli.cmd_resample import _action_override
    from flowplug.errors import ConfigError, FormatError
    from flowplug.flowtools import open_flow
    from flowplug.fsutil import atomic_write, write_summary
    from flowplug.plugins.observables import default_observables, measurement
    from flowplug.report import chain_report
    from flowplug.resampling import (build_kernel, extension_of, fingerprint, importance_weights,
                                     observable_summary, output_format, run_chains, write_configuration)

    ck = open_flow(flow_path, check_inverse=check_inverse)
    action = ck.action(_action_override(cfg))
    chains, steps, therm = int(cfg["chains"]), int(cfg["steps"]), int(cfg["thermalize"])
    if chains < 1 or steps < 1 or not 0 <= therm < steps:
        raise ConfigError(f"need chains >= 1, steps >= 1 and 0 <= thermalize < steps; found chains={chains}, "
                          f"steps={steps}, thermalize={therm}")
    fmt = output_format(None, cfg["format"])
    field, ndim = ck.flow.field, len(ck.flow.lattice)
    names = list(cfg.get("observables") or default_observables(field, ndim))
    measure = measurement(field, names)
    seed = int(cfg["seed"])
    kernel = build_kernel(ck.flow, action, cfg["kernel"])  # validate before creating outputs
    out.mkdir(parents=True, exist_ok=True)
    store = out / "ensemble.h5"
    if fmt == "hdf5" and store.exists() and not resume:
        if not force:
            raise FormatError(f"{store} exists; use --resume to continue or --force to start over")
        store.unlink()
    g0 = torch.Generator().manual_seed(seed + 7919)
    with torch.no_grad():
        x0, _ = ck.flow.sample(chains, g0)
        xs, _ = ck.flow.sample(int(cfg.get("ess_samples", 256)), g0)
    weights = importance_weights(ck.flow, action, xs.detach())
    save_every = int(cfg.get("save_every", 0))
    ext = extension_of(fmt)
    n_written = [0]

    def _write(chain, info=None):
        step = chain.step_count
        if not ((save_every and step % save_every == 0) or step == steps):
            return
        for b in range(chain.state.batch):
            prov = {"command": "sample", "flow": str(flow_path), "flow_sha256": ck.sha256, "seed": seed,
                    "chain": b, "step": step}
            x = chain.state.x[b:b + 1]
            if fmt == "hdf5":
                io.write(store, io.Ensemble(x.cpu(), meta=[io.Metadata(provenance=prov)]), "hdf5",
                         append=store.exists())
            else:
                write_configuration(out / f"sample.c{b:03d}.s{step:05d}.{ext}", x, fmt, provenance=prov,
                                    overwrite=force or resume)
            n_written[0] += 1

    chain = run_chains(kernel, x0.detach(), steps, seed=seed, measure=measure, checkpoint=out / "chain.ckpt",
                       resume=resume, run_id=fingerprint({k: v for k, v in cfg.items() if k != "steps"}, ck.sha256), on_step=_write,
                       checkpoint_every=int(cfg.get("checkpoint_every", 100)), progress=progress,
                       desc="sample")
    hist = chain.history_tensors()
    with atomic_write(out / "measurements.csv", "w") as fh:
        cols = ["accepted", *[n for n in names if n in hist]]
        fh.write("step,chain," + ",".join(cols) + "\n")
        for t in range(hist["accepted"].shape[0]):
            for b in range(hist["accepted"].shape[1]):
                fh.write(f"{t},{b}," + ",".join(repr(float(hist[c][t, b])) for c in cols) + "\n")
    acc = float(hist["accepted"][therm:].mean())
    summary = {
        "acceptance": acc,
        "acceptance_by_kernel": getattr(chain, "extra_acceptance", {}),
        "ess": weights["ess"],
        "chains": chains, "steps": chain.step_count, "thermalize": therm, "seed": seed, "format": fmt,
        "flow": {"path": str(flow_path), "sha256": ck.sha256, "field": field, "lattice": list(ck.flow.lattice)},
        "action": ck.action_config | _action_override(cfg),
        "observables": observable_summary(hist, names, burn=therm),
        "written": n_written[0],
        "inverse_check": {**ck.inverse_check.as_dict(), "enforced": check_inverse},
    }
    chain_report(out / "report.png", {k: v[therm:] for k, v in hist.items()}, names,
                 title=f"flowplug sample: {chains} chains x {chain.step_count} steps, acceptance {acc:.3f}",
                 acceptance=summary["acceptance_by_kernel"] or {"all": acc})
    write_summary(out, "sample", summary)
    if not quiet:
        by_kernel = summary["acceptance_by_kernel"]
        accs = (", ".join(f"{k} {v:.3f}" for k, v in by_kernel.items()) if by_kernel
                else f"{acc:.3f}")
        print(f"sample: {chains} chains x {chain.step_count} steps, acceptance {accs}, "
              f"ESS of the flow weights {weights['ess']:.3f}; results in {out}")
    return 0


COMMAND = CommandSpec(name="sample", description="exact Markov chains from a trained flow (independence "
                      "Metropolis, flow HMC, mixtures with HMC)", factory=add_arguments, run=run)
