"""The ``sample`` job: exact Markov chains from a trained flow.

:func:`run_sample` (``flowplug sample --flow CHECKPOINT --out DIR``): ``chains`` chains
start from flow samples and run ``steps`` steps of flow independence Metropolis (or
``kernel.type = "flow-hmc"``, or with ``kernel.hmc_every`` HMC trajectories before each
flow step). The first ``thermalize`` steps are left out of the statistics and of the
written configurations (a flow sample is not yet a sample of p; the chain forgets it).
Every ``save_every`` steps and after the last the configurations are written: into one
HDF5 ensemble ``DIR/ensemble.h5`` (default), or one file per configuration in another
format (``format = "ildg"`` for 4D SU(3)/SU(2)); ``DIR/provenance.json`` lists them.
``DIR/measurements.csv`` (or ``.h5``) has every measurement, ``DIR/summary.json``
``acceptance``, ``ess`` (of the flow proposals' weights p/q),
``observables.<name>.{mean,error,tau_int}`` (Gamma method); ``DIR/report.png``
histories, autocorrelation functions and acceptance. ``resume=True`` continues from
``DIR/chain.ckpt``. The flow must pass the inverse check
(:func:`flowplug.flowtools.check_inverse`, recorded as ``inverse_check`` in the summary)
unless ``check_inverse=False``.

The configuration schema is :data:`DEFAULT_CONFIG` (``flowplug sample --print-config``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from flowplug.fsutil import locked_run

__all__ = ["DEFAULT_CONFIG", "NON_CHAIN_KEYS", "run_sample"]

DEFAULT_CONFIG = """\
# flowplug sample: exact Markov chains with flow proposals

seed = 1
chains = 16         # independent chains, run as one batch
steps = 200         # kernel steps per chain
thermalize = 20     # steps left out of the statistics and of the written configurations
save_every = 0      # write the configurations every this many steps (0: only the last)
checkpoint_every = 100
format = "hdf5"     # output format of the configurations
measurements = "csv"  # per-step measurements: "csv" (measurements.csv) or "hdf5" (measurements.h5)
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

#: Keys that do not change the Markov chain: a run may be resumed with other values.
NON_CHAIN_KEYS = ("steps", "save_every", "checkpoint_every", "measurements")


@locked_run("sample", lambda a: a["out"])
def run_sample(cfg: Mapping[str, Any], flow: Path, out: Path, *, resume: bool = False, force: bool = False,
               progress: bool = False, check_inverse: bool = True) -> dict[str, Any]:
    """Run (or resume) a sample job; ``out`` is locked for the run.

    Arguments:
        cfg: The effective configuration (of :data:`DEFAULT_CONFIG`).
        flow: What ``flowplug train`` wrote: the run directory or its ``checkpoint.pt``.
        out: The run directory.
        resume: Continue from ``out/chain.ckpt`` (bit for bit the uninterrupted run).
        force: Replace the outputs of an earlier run.
        progress: Progress bar.
        check_inverse: Refuse a flow that fails the inverse check.

    Returns:
        The figures written to ``out/summary.json``.

    Raises:
        FlowplugError: on a bad checkpoint or configuration, or existing outputs;
            :class:`flowplug.errors.InverseCheckError` if the flow fails the inverse check
            and ``check_inverse`` is true.
    """
    import torch

    from flowplug.errors import ConfigError
    from flowplug.flowtools import open_flow
    from flowplug.jobs.chains import (
        action_override,
        build_kernel,
        importance_weights,
        run_chains,
    )
    from flowplug.jobs.output import ChainOutput, Configurations, output_format
    from flowplug.jobs.provenance import fingerprint, provenance
    from flowplug.jobs.summary import chain_summary
    from flowplug.plugins.observables import default_observables, measurement

    out = Path(out)
    ck = open_flow(flow, check_inverse=check_inverse)
    action = ck.action(action_override(cfg))
    chains, steps, therm = int(cfg["chains"]), int(cfg["steps"]), int(cfg["thermalize"])
    if chains < 1 or steps < 1 or not 0 <= therm < steps:
        raise ConfigError(f"need chains >= 1, steps >= 1 and 0 <= thermalize < steps; found chains={chains}, "
                          f"steps={steps}, thermalize={therm}")
    fmt = output_format(None, cfg["format"])
    field, ndim = ck.flow.field, len(ck.flow.lattice)
    names = list(cfg.get("observables") or default_observables(field, ndim))
    seed = int(cfg["seed"])
    kernel = build_kernel(ck.flow, action, cfg["kernel"])  # validate before creating outputs
    configurations = Configurations(
        out, fmt, field, store=out / "ensemble.h5", save_every=int(cfg.get("save_every", 0)), total=steps,
        thermalize=therm, overwrite=force or resume,
        name=lambda t, c: f"sample.s{t:05d}" if c is None else f"sample.c{c:03d}.s{t:05d}",
        provenance=lambda t, c: provenance("sample", seed=seed, step=t, chain=c, flow=ck))
    output = ChainOutput(out, "sample", configurations=configurations,
                         measurements=cfg.get("measurements", "csv"), config=cfg)
    output.start(resume=resume, force=force)
    g0 = torch.Generator().manual_seed(seed + 7919)
    with torch.no_grad():
        x0, _ = ck.flow.sample(chains, g0)
        xs, _ = ck.flow.sample(int(cfg.get("ess_samples", 256)), g0)
    weights = importance_weights(ck.flow, action, xs.detach())
    run_id = fingerprint(cfg, ck.sha256, ignore=NON_CHAIN_KEYS)
    chain = run_chains(kernel, x0.detach(), steps, seed=seed, measure=measurement(field, names), output=output,
                       resume=resume, run_id=run_id, checkpoint_every=int(cfg.get("checkpoint_every", 100)),
                       progress=progress, desc="sample")
    hist = chain.history_tensors()
    stats = chain_summary(hist, names, burn=therm)
    acc = stats["acceptance"]
    summary = {
        "acceptance": acc,
        "acceptance_by_kernel": stats["acceptance_by_kernel"],
        "ess": weights["ess"],
        "chains": chains, "steps": chain.step_count, "thermalize": therm, "seed": seed, "format": fmt,
        "flow": {"path": str(flow), "sha256": ck.sha256, "field": field, "lattice": list(ck.flow.lattice)},
        "action": ck.action_config | action_override(cfg),
        "observables": stats["observables"],
        "written": len(output.written),
        "inverse_check": {**ck.inverse_check.as_dict(), "enforced": check_inverse},
    }
    report = {"history": {k: v[therm:] for k, v in hist.items()}, "names": names,
              "title": f"flowplug sample: {chains} chains x {chain.step_count} steps, acceptance {acc:.3f}",
              "acceptance": summary["acceptance_by_kernel"] or {"all": acc}}
    return output.finish(chain, summary, report=report)
