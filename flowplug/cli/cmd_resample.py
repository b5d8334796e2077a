"""``flowplug resample ENSEMBLE... --flow CHECKPOINT --out DIR``: exact flow chains seeded
by an existing ensemble.

Every configuration of the inputs (files of any readable format, directories, globs, or
HDF5 ensembles) starts one chain of flow independence-Metropolis steps (optionally
``kernel.hmc_every`` HMC trajectories before each flow step, or flow-transformed HMC).
log q of the inputs comes from the inverse flow. Every ``save_every`` steps each chain's
configuration is written to DIR in the inputs' format (``--to`` to change; SciDAC and
bare LIME inputs are written as ILDG; HDF5 into one store ``DIR/ensemble.h5``), with
provenance (input file and its SHA-256, flow checkpoint SHA-256, seed, chain, step) in
the file's metadata where the format has room and in ``DIR/provenance.json``.

``DIR/summary.json`` holds ``acceptance``, ``ess`` (of the importance weights p/q of the
input configurations, (sum w)^2 / (n sum w^2)), ``ess_p_samples`` (the flow's ESS
estimated from inputs distributed by p: n^2 / (sum w sum 1/w)), per-kernel acceptances, ``observables.<name>.{mean,error,tau_int}``
of the chains (Gamma method), and ``inputs``: per input configuration its file,
checksum, log p, log q and log w. ``DIR/report.png`` draws histories, autocorrelations,
acceptance and the weights. Long runs checkpoint to ``DIR/chain.ckpt``; ``--resume``
continues bit for bit. The flow must pass the inverse check
(:func:`flowplug.flowtools.check_inverse`, recorded as ``inverse_check`` in the summary)
unless ``--no-check-inverse`` is given: log q of every input comes from the inverse.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flowplug.cli.common import add_config_arguments, config_from_args
from flowplug.fsutil import locked_run
from flowplug.records import CommandSpec

DEFAULT_CONFIG = """\
# flowplug resample: exact flow chains seeded by an existing ensemble

seed = 1            # random seed of the chains
steps = 20          # kernel steps per chain (one chain per input configuration)
save_every = 1      # write each chain's configuration every this many steps (0: only the last)
checkpoint_every = 50
observables = []    # measured after every step ([] = defaults of the field kind)
to = ""             # output format ("" = the inputs' format)
precision = 0       # output precision in bits (0 = the inputs')

[kernel]
type = "flow"       # "flow" (independence Metropolis), "flow-hmc" (HMC in latent space), "hmc"
hmc_every = 0       # > 0: this many HMC trajectories before every flow step

[kernel.hmc]
integrator = "omelyan"
steps = 10
trajectory_length = 1.0

[action]            # "" = the action stored with the flow (the production action must be it)
name = ""
beta = 0.0
group = ""
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``flowplug resample``."""
    parser.add_argument("inputs", nargs="*", metavar="ENSEMBLE", help="configuration files, directories or globs")
    parser.add_argument("--flow", metavar="CHECKPOINT", help="trained flow: a `flowplug train` run directory or its checkpoint.pt (required)")
    parser.add_argument("--out", metavar="DIR", help="output directory (required)")
    parser.add_argument("--to", metavar="FORMAT", help="output format (default: the inputs')")
    parser.add_argument("--resume", action="store_true", help="continue from DIR/chain.ckpt")
    parser.add_argument("--force", action="store_true", help="replace existing output files")
    parser.add_argument("--format", metavar="NAME", help="force the input format")
    parser.add_argument("--lattice", metavar="LXxLYxLZxLT", help="lattice of bare LIME inputs")
    parser.add_argument("--group", metavar="GROUP", help="group of bare LIME inputs")
    parser.add_argument("--no-verify", action="store_true", help="accept inputs whose checksums fail")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-check-inverse", action="store_true",
                        help="use a flow whose inverse fails the round-trip check (log q through it is wrong)")
    add_config_arguments(parser)


def _action_override(cfg):
    a = dict(cfg.get("action", {}))
    return {k: v for k, v in a.items() if v not in ("", 0.0, None)}


def run(args: argparse.Namespace) -> int:
    """Resample the inputs (module docstring)."""
    cfg = config_from_args(args, DEFAULT_CONFIG)
    if cfg is None:
        return 0
    from flowplug.errors import ConfigError

    if not args.flow or not args.out or not args.inputs:
        raise ConfigError("flowplug resample needs ENSEMBLE..., --flow CHECKPOINT and --out DIR")
    if args.to:
        cfg["to"] = args.to
    resample(cfg, [Path(p) for p in args.inputs], Path(args.flow), Path(args.out), resume=args.resume,
             force=args.force, read_options={"format": args.format, "lattice": args.lattice,
                                             "group": args.group, "verify": not args.no_verify},
             progress=not args.no_progress, check_inverse=not args.no_check_inverse)
    return 0


@locked_run("resample", lambda a: a["out"])
def resample(cfg, inputs, flow_path: Path, out: Path, *, resume: bool = False, force: bool = False,
             read_options=None, progress: bool = False, quiet: bool = False, check_inverse: bool = True):
    """Library form of ``flowplug resample`` (used by ``flowplug demo``).

    Returns:
        ``(summary, chain)``: the figures written to ``summary.json`` and the
        :class:`flowplug.chain.Chain` (its history holds every measurement).

    Raises:
        FlowplugError: on bad inputs, a mismatched flow, or an output that exists;
            :class:`flowplug.errors.InverseCheckError` if the flow fails the inverse check
            and ``check_inverse`` is true.
    """
    import torch

    from flowplug import io
    from flowplug.cli.cmd_convert import expand_inputs
    from flowplug.flowtools import file_sha256, open_flow
    from flowplug.fsutil import write_json, write_summary
    from flowplug.plugins.observables import default_observables, measurement
    from flowplug.report import chain_report
    from flowplug.resampling import (build_kernel, check_compatible, extension_of, fingerprint,
                                     importance_weights, observable_summary, output_format,
                                     run_chains, write_configuration)

    read_options = {k: v for k, v in dict(read_options or {}).items() if v is not None}
    ck = open_flow(flow_path, check_inverse=check_inverse)
    action = ck.action(_action_override(cfg))
    files = expand_inputs([str(p) for p in inputs])
    parts, sources = [], []
    for f in files:
        ens = io.read(f, **read_options)
        check_compatible(ens, ck.flow, str(f))
        digest = file_sha256(f)
        for i in range(len(ens)):
            sources.append({"file": str(f), "index": i, "sha256": digest, "format": ens.meta[i].format,
                            "precision": ens.meta[i].precision})
        parts.append(ens)
    ensemble = io.Ensemble.concat(parts)
    fmt = output_format(ensemble.meta[0].format if ensemble.meta[0].format != "hdf5" else "hdf5", cfg.get("to"))
    precision = int(cfg.get("precision") or ensemble.precision)
    x0 = ensemble.links.to(torch.complex128 if ensemble.group != "u1" else torch.float64)
    field, ndim = ck.flow.field, len(ck.flow.lattice)
    names = list(cfg.get("observables") or default_observables(field, ndim))
    measure = measurement(field, names)
    kernel = build_kernel(ck.flow, action, cfg["kernel"])  # validate before creating outputs
    weights = importance_weights(ck.flow, action, x0, measure)
    out.mkdir(parents=True, exist_ok=True)
    seed = int(cfg["seed"])
    run_id = fingerprint({k: v for k, v in cfg.items() if k != "steps"}, ck.sha256,
                         *[s["sha256"] for s in sources])  # steps may grow on --resume
    save_every = int(cfg.get("save_every", 1))
    steps = int(cfg["steps"])
    written: list[dict] = []
    ext = extension_of(fmt)
    store = out / "ensemble.h5"
    input_paths = [Path(s["file"]) for s in sources]

    def _write(chain, info=None):
        step = chain.step_count
        if not ((save_every and step % save_every == 0) or step == steps):
            return
        for b in range(chain.state.batch):
            src = sources[b]
            prov = {"command": "resample", "input": src["file"], "input_index": src["index"],
                    "input_sha256": src["sha256"], "flow": str(flow_path), "flow_sha256": ck.sha256,
                    "seed": seed, "chain": b, "step": step}
            x = chain.state.x[b:b + 1]
            if fmt == "hdf5":
                meta = io.Metadata(precision=precision, provenance=prov)
                io.write(store, io.Ensemble(x.cpu(), precision=precision, meta=[meta]), "hdf5",
                         append=store.exists())
                path = store
            else:
                path = out / f"{Path(src['file']).name}.c{b:03d}.s{step:05d}.{ext}"
                if path.exists() and not force:
                    if resume:
                        continue
                write_configuration(path, x, fmt, source_meta=ensemble.meta[b], precision=precision,
                                    provenance=prov, overwrite=force or resume, inputs=input_paths)
            written.append({"path": str(path), **prov})

    if fmt == "hdf5" and store.exists() and not (resume or force):
        raise io.FormatError(f"{store} exists; use --resume to continue or --force to start over")
    if fmt == "hdf5" and force and store.exists() and not resume:
        store.unlink()
    chain = run_chains(kernel, x0, steps, seed=seed, measure=measure, checkpoint=out / "chain.ckpt",
                       resume=resume, run_id=run_id, on_step=_write,
                       checkpoint_every=int(cfg.get("checkpoint_every", 50)), progress=progress,
                       desc="resample")
    hist = chain.history_tensors()
    acc = float(hist["accepted"].mean()) if "accepted" in hist else float("nan")
    summary = {
        "acceptance": acc,
        "acceptance_by_kernel": getattr(chain, "extra_acceptance", {}),
        "ess": weights["ess"],
        "ess_p_samples": weights.get("ess_p_samples"),
        "steps": chain.step_count, "chains": chain.state.batch, "seed": seed,
        "format": fmt, "precision": precision,
        "flow": {"path": str(flow_path), "sha256": ck.sha256, "field": field, "lattice": list(ck.flow.lattice)},
        "action": ck.action_config | _action_override(cfg),
        "observables": observable_summary(hist, names),
        "reweighted_inputs": weights["reweighted"],  # sum w O / sum w over the inputs
        "inputs": [{**s, "log_p": lp, "log_q": lq, "log_w": lw}
                   for s, lp, lq, lw in zip(sources, weights["log_p"], weights["log_q"], weights["log_w"])],
        "written": len(written),
        "inverse_check": {**ck.inverse_check.as_dict(), "enforced": check_inverse},
    }
    write_json(out / "provenance.json", {"outputs": written})
    chain_report(out / "report.png", hist, names, title=f"flowplug resample: {len(sources)} chains, "
                 f"acceptance {acc:.3f}", acceptance=summary["acceptance_by_kernel"] or {"all": acc},
                 weights=weights["log_w"])
    write_summary(out, "resample", summary)
    if not quiet:
        print(f"resample: {len(sources)} chains x {chain.step_count} steps, acceptance {acc:.3f}, "
              f"ESS of input weights {weights['ess']:.3f}; {len(written)} configurations written to {out}")
    return summary, chain


COMMAND = CommandSpec(name="resample", description="exact flow-Metropolis chains seeded by an existing ensemble",
                      factory=add_arguments, run=run)
