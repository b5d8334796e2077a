"""The ``sample`` job: exact Markov chains of any registered kernel, with or without a flow.

:func:`run_sample` (``flowplug sample [--flow CHECKPOINT] --out DIR``): ``chains`` chains
run ``steps`` steps of the kernel ``kernel.type``, built through the kernel registry
(:func:`flowplug.jobs.chains.build_kernel`), so a plugin's kernel runs as a built-in
does. With a flow, the chains start from flow samples and the default kernel is flow
independence Metropolis (or ``kernel.type = "flow-hmc"``, or with ``kernel.hmc_every``
HMC trajectories before each flow step); the action is the flow's unless ``[action]``
overrides it. Without a flow, the action is ``[action]`` (``action.name`` and its
couplings; an action that takes a ``group`` given none samples ``u1``, ``flowplug hmc``'s
default, recorded in ``config.toml`` and the summary's ``action.group``), the lattice
``lattice``, the chains start hot (disordered) and the default
kernel is ``hmc``. A kernel that offers ``start_states(n, lattice, generator, device)``
(exact draws of its own proposal with what it caches; ``nonequilibrium``: one forward
evolution per chain, with its work) starts its chains from those instead, also when
``kernel.hmc_every`` puts HMC trajectories before its steps (``start = "auto"``, the
default; ``start = "hot"`` forces a hot start, also with a flow). The first ``thermalize``
steps are left out of the statistics and of the written configurations (a flow sample
or a proposal draw is not yet a sample of p; the chain forgets it); its default ``-1``
is ``min(20, steps // 2)``, fixed when the run starts
(:func:`flowplug.jobs.provenance.resolve_thermalization`: ``config.toml`` and the summary's
``thermalize`` hold the value used, and a run of ``steps >= 40`` keeps the fingerprint
it had when the default was 20); an explicit ``thermalize >= steps`` is a ``ConfigError``
naming both. Every
``save_every`` steps and after the last the configurations are written: into one
HDF5 ensemble ``DIR/ensemble.h5`` (default), or one file per configuration in another
format (``format = "ildg"`` for 4D SU(3)/SU(2); a format that cannot hold the chains'
configurations is a ``ConfigError`` before any step); ``DIR/provenance.json`` lists them.
``DIR/measurements.csv`` (or ``.h5``) has every measurement, ``DIR/summary.json``
``acceptance``, ``start`` (how the chains started), ``thermalize``, ``ess`` (of the flow proposals'
weights p/q), ``observables.<name>.{mean,error,tau_int}`` (Gamma method); the flow-only
entries ``flow``, ``ess`` and ``inverse_check`` are left out of a run without a flow (and
``ess`` of a flow run whose action has auxiliary fields, which has no density of x alone:
no weights); ``DIR/report.png``
histories, autocorrelation functions and acceptance; for an action with pseudofermions
``cg`` (conjugate-gradient iterations, :func:`flowplug.jobs.summary.cg_summary`; its
"trajectories" are kernel steps: with ``kernel.hmc_every = k`` one count covers the k HMC
trajectories and the proposal of a step), with a
pion observable ``pion_t`` (its time separation). ``resume=True`` continues from
``DIR/chain.ckpt``, with the flow recorded in ``DIR/run_files.json`` (as given, resolved,
and its SHA-256) when ``flow`` is ``None``: a flow given again must be that file, and a flow
file whose SHA-256 changed is refused (:func:`flowplug.jobs.provenance.resume_flow_path`).
The flow must pass the inverse check
(:func:`flowplug.flowtools.check_inverse`, recorded as ``inverse_check`` in the summary)
unless ``check_inverse=False``.

Under ``torchrun --standalone --nproc_per_node=W -m flowplug sample ...`` the chains are
shared out among the W processes by random streams (``streams``; docs/chains.md,
"Several processes", :mod:`flowplug.distributed`): every process draws the start of all
chains (flow samples or a hot start, from the seeded generator) and keeps its own (a
kernel's ``start_states`` are drawn per stream, from the stream's generator); rank r
writes its chains' configurations (``ensemble.rank<r>.h5``) and ``chain.rank<r>.ckpt``;
rank 0 holds the lock and writes the merged measurements, ``provenance.json``,
``report.png`` and ``summary.json`` (with ``world_size`` and ``streams``). The run equals
the one-process run with the same ``seed`` and ``streams`` bit for bit.

The configuration schema is :data:`DEFAULT_CONFIG` (``flowplug sample --print-config``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowplug import distributed

if TYPE_CHECKING:
    import torch

__all__ = ["ADDED_KEYS", "DEFAULT_CONFIG", "NON_CHAIN_KEYS", "OPEN_TABLES", "run_sample"]

DEFAULT_CONFIG = """\
# flowplug sample: exact Markov chains with flow proposals

seed = 1
threads = 1         # torch CPU threads (1: fastest on small lattices and busy machines; 0: torch's default)
lattice = []        # without --flow: lattice extents, x first (with a flow: the flow's)
chains = 16         # independent chains, run as one batch
streams = 0         # random streams: groups of chains with their own generator; 0 = one per
                    # process (torchrun); the same seed and streams give the same chains on
                    # any number of processes (a divisor of streams, which divides chains)
steps = 200         # kernel steps per chain
thermalize = -1     # steps left out of the statistics and of the written configurations;
                    # -1: min(20, steps // 2), fixed when the run starts (config.toml and
                    # summary.json record the value used); an explicit value must be < steps
start = "auto"      # "auto": exact draws of the kernel's proposal where the kernel offers them
                    # (nonequilibrium, also with hmc_every: one forward evolution per chain,
                    # with its work), else
                    # flow samples (with --flow) or a hot start; "hot": a hot (disordered) start
pion_t = 1          # time separation t of pion_effective_mass (0 <= t <= T/2 - 1) and pion_correlator
save_every = 0      # write the configurations every this many steps (0: only the last)
checkpoint_every = 100  # write a checkpoint every this many steps and after the last (0: only after the last)
format = "hdf5"     # output format of the configurations
measurements = "csv"  # per-step measurements: "csv" (measurements.csv) or "hdf5" (measurements.h5)
progress = true     # progress bar (--no-progress turns it off)
device = "cpu"      # torch device of the flow and the chains: "cpu", "cuda" or "cuda:N" (under
                    # torchrun "cuda" is cuda:LOCAL_RANK); random streams differ between CPU and
                    # CUDA, so the device is part of the run (a resume keeps it)
observables = []    # [] = defaults of the field kind
ess_samples = 256   # flow samples used for the ESS of the proposal weights

[kernel]
type = ""           # "" = "flow" (independence Metropolis) with --flow, "hmc" without; "flow-hmc"
                    # (HMC in the flow's latent space) or any registered kernel (flowplug plugins)
hmc_every = 0       # > 0: this many HMC trajectories before every step of the kernel

[kernel.options]    # the kernel's own options (e.g. step_size = 2.0 for xy-metropolis)

[kernel.hmc]
integrator = "omelyan"
steps = 10
trajectory_length = 1.0

[action]            # with --flow, "" / 0 = the action stored with the flow; without, the action
name = ""           # (and any of its couplings: m2, lam, ... or a plugin action's)
beta = 0.0
group = ""          # without --flow, "" = "u1" for an action with a group (wilson, symanzik, ...), as
                    # in flowplug hmc; config.toml and summary.json record the group sampled
"""

#: Tables whose keys are free: a kernel's options and an action's couplings.
OPEN_TABLES = ("kernel.options", "action")

#: Keys that do not change the Markov chain: a run may be resumed with other values.
NON_CHAIN_KEYS = ("steps", "save_every", "checkpoint_every", "measurements", "threads", "streams", "progress")
# (the effective number of streams enters the run's id instead: 0 means one per process)

#: Keys added after runs of the job existed, with the value that reproduces those runs: left
#: out of the fingerprint at that value, so earlier checkpoints stay resumable.
ADDED_KEYS: dict[str, Any] = {"start": "auto", "pion_t": 1, "device": "cpu"}


def run_sample(
    cfg: Mapping[str, Any],
    flow: Path | None,
    out: Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool | None = None,
    check_inverse: bool = True,
) -> dict[str, Any]:
    """Run (or resume) a sample job; ``out`` is locked for the run.

    Under torchrun every process runs its share of the chains
    (:func:`flowplug.distributed.sharded_job`; rank 0 locks ``out`` and writes the merged
    outputs; the other ranks return ``{"rank", "world_size"}``).

    Arguments:
        cfg: The effective configuration (of :data:`DEFAULT_CONFIG`).
        flow: What ``flowplug train`` wrote: the run directory or its ``checkpoint.pt``;
            ``None`` for a kernel that needs no flow, or on a resume for the run's own flow
            (``out/run_files.json``).
        out: The run directory.
        resume: Continue from ``out/chain.ckpt`` (bit for bit the uninterrupted run).
        force: Replace the outputs of an earlier run.
        progress: Progress bar (default: ``cfg["progress"]``).
        check_inverse: Refuse a flow that fails the inverse check.

    Returns:
        The figures written to ``out/summary.json``.

    Raises:
        ConfigError: on a bad configuration (``thermalize >= steps``, naming both).
        CheckpointError: on a resume with another flow than the run's, or a flow file whose
            SHA-256 changed (naming the file, the stored and the found value).
        FlowplugError: on a bad checkpoint or configuration, or existing outputs (an earlier
            run's configuration files, or its ``chain.ckpt``, without ``resume`` or ``force``);
            :class:`flowplug.errors.InverseCheckError` if the flow fails the inverse check
            and ``check_inverse`` is true.
    """
    from flowplug.jobs.chains import job_device
    from flowplug.threads import job_threads

    with distributed.sharded_job("sample", out, job_device(cfg)) as device, job_threads(cfg.get("threads", 1)):
        show = bool(cfg.get("progress", False)) if progress is None else bool(progress)
        return _run_sample(
            cfg, flow, out, device, resume=resume, force=force, progress=show, check_inverse=check_inverse
        )


def _run_sample(
    cfg: Mapping[str, Any],
    flow: Path | None,
    out: Path,
    device: torch.device,
    *,
    resume: bool,
    force: bool,
    progress: bool,
    check_inverse: bool,
) -> dict[str, Any]:
    """The body of :func:`run_sample` (inside its lock and thread setting), on ``device``."""
    import torch

    from flowplug.errors import ConfigError
    from flowplug.flowtools import open_flow
    from flowplug.jobs.chains import (
        action_override,
        build_kernel,
        importance_weights,
        kernel_name,
        run_chains,
    )
    from flowplug.jobs.hmc import CGCounting, observable_options
    from flowplug.jobs.output import ChainOutput, Configurations, output_format
    from flowplug.jobs.provenance import (
        check_file_sha256,
        check_resume_action,
        file_record,
        fingerprint,
        kernel_record,
        provenance,
        refuse_earlier_checkpoint,
        resolve_thermalization,
        resume_flow_path,
        stored_run_files,
    )
    from flowplug.jobs.summary import cg_summary, chain_summary, warn_short_chains
    from flowplug.measure import default_observables, measurement

    out = Path(out)
    chains, steps = int(cfg["chains"]), int(cfg["steps"])
    if chains < 1 or steps < 1:
        raise ConfigError(f"need chains >= 1 and steps >= 1; found chains = {chains}, steps = {steps}")
    if int(cfg.get("checkpoint_every", 100)) < 0:
        raise ConfigError(f"checkpoint_every must be >= 0 (0: only after the last); found {cfg['checkpoint_every']}")
    # the default thermalize (-1) becomes min(20, steps // 2) here, for the whole run
    cfg, therm = resolve_thermalization(cfg, key="thermalize", steps_key="steps", cap=20, out=out, resume=resume)
    flow_entry = None
    if resume:  # the flow of the run (run_files.json): --flow need not be given again
        given, flow_entry = resume_flow_path(out, flow)
        flow = None if given is None else Path(given)
    if flow is None:  # a gauge action's group: hmc's default (u1) unless given, recorded in config.toml
        cfg = _resolve_group(cfg, out, resume=resume)
    if resume:  # names every changed key of the chains (the fingerprint stays the final guard)
        from flowplug.jobs.provenance import check_resume_config

        # with a flow, [action] is compared as it takes effect (resolved against the flow's), below
        skip = (*NON_CHAIN_KEYS, "action") if flow is not None else NON_CHAIN_KEYS
        check_resume_config(out, cfg, ignore=skip, omit_defaults=ADDED_KEYS)
    seed = int(cfg["seed"])
    streams, per, mine, local = distributed.chain_streams(chains, int(cfg.get("streams", 0)))
    g0 = torch.Generator(device=device).manual_seed(seed + 7919)
    ck = None
    if flow is not None:
        if flow_entry is not None:  # the file the run started with, unchanged
            from flowplug.checkpoints import checkpoint_path
            from flowplug.jobs.provenance import file_sha256

            check_file_sha256(out, "flow checkpoint", flow_entry, file_sha256(checkpoint_path(flow)))
        ck = open_flow(flow, device=device, check_inverse=check_inverse)
        if resume:  # the stored [action] against the given one, each as it takes effect with this flow
            trained = dict(ck.action_config)
            cfg = check_resume_action(out, cfg, lambda c: trained | action_override(c))
        action = ck.action(action_override(cfg))
        lattice = tuple(ck.flow.lattice)
        if cfg.get("lattice") and tuple(int(n) for n in cfg["lattice"]) != lattice:
            raise ConfigError(
                f"lattice = {list(cfg['lattice'])} but the flow was trained on {list(lattice)}; "
                "drop lattice (a flow job runs on the flow's lattice)"
            )
    else:
        action, lattice = _action_and_lattice(cfg)
    field, ndim = action.field, len(lattice)
    fmt = output_format(None, cfg["format"])
    names = list(cfg.get("observables") or [*default_observables(field, ndim), *getattr(action, "observables", ())])
    kernel = build_kernel(ck.flow if ck else None, action, cfg["kernel"])  # validate before creating outputs
    options = observable_options(cfg, names, lattice)  # pion_t
    if callable(getattr(action, "take_cg_iterations", None)):  # CG iterations per step and chain
        kernel = CGCounting(kernel, action)
    start = str(cfg.get("start", "auto"))
    if start not in ("auto", "hot"):
        hint = (
            f' (the start distribution of a kernel\'s proposals is kernel.options.start = "{start}")'
            if start in ("prior", "flow")
            else ""
        )
        raise ConfigError(f'start must be "auto" or "hot"; found {start!r}{hint}')
    configurations = Configurations(
        out,
        fmt,
        field,
        store=out / "ensemble.h5",
        save_every=int(cfg.get("save_every", 0)),
        total=steps,
        thermalize=therm,
        overwrite=force or resume,
        name=lambda t, c: f"sample.s{t:05d}" if c is None else f"sample.c{c:03d}.s{t:05d}",
        pattern=r"sample(?:\.c\d+)?\.s\d+",  # the names above: an earlier run's go on --force
        provenance=lambda t, c: provenance("sample", seed=seed, step=t, chain=c, flow=ck),
        first_chain=local.start,
    )
    output = ChainOutput(
        out, "sample", configurations=configurations, measurements=cfg.get("measurements", "csv"), config=cfg
    )
    # every process draws the start of all chains and keeps its own, before rank 0 alone
    # draws the ESS samples from the same generator (so the start is the same on every rank)
    with torch.no_grad():
        if ck is not None and start != "hot":
            x0, _ = ck.flow.sample(chains, g0)
        else:
            from flowplug.theory import field_space

            x0 = field_space(field).hot(lattice, chains, generator=g0, device=device)
    # a format that cannot hold these configurations (ILDG of a 2D lattice) is refused before
    # anything is written or sampled, not at the first save point
    configurations.check(x0)
    output.start(resume=resume, force=force)
    # after output.start (which writes nothing on a fresh run without --force), so that an earlier
    # run's configuration files are refused by name, saying what --force deletes; its chain.ckpt
    # alone (stopped before the first save point) is refused here, as hmc does with its checkpoint.pt
    refuse_earlier_checkpoint(out, "chain.ckpt", resume=resume, force=force)
    # what --resume needs besides config.toml: the flow, as given and resolved, and its SHA-256
    # (written with every checkpoint, as config.toml; a resume keeps the stored record)
    files_record = (stored_run_files(out) if resume else None) or {
        "command": "sample",
        "flow": file_record(str(flow), sha256=ck.sha256, file=ck.path) if ck else None,
    }
    if flow_entry is not None:  # the run's flow, at its new place if it moved (resume_flow_path)
        files_record["flow"] = flow_entry
    weights: dict[str, Any] = {"ess": None}
    with torch.no_grad():
        if ck is not None and distributed.is_main():  # the ESS of the proposals: rank 0 reports it
            xs, _ = ck.flow.sample(int(cfg.get("ess_samples", 256)), g0)
            weights = importance_weights(ck.flow, action, xs.detach())
    x0 = x0[local]
    draw = _start_draw(kernel) if start == "auto" else None
    start_states = None
    if draw is not None:  # the kernel's own proposal draws, each stream from its generator (run_chains)
        device = x0.device

        def start_states(n: int, generator: torch.Generator) -> Any:
            return draw(n, lattice, generator, device)

    # how the chains started, for the summary
    start_desc = (
        "kernel proposal draws (start_states)"
        if draw is not None
        else ("flow samples" if ck is not None and start != "hot" else "hot")
    )
    run_id = fingerprint(cfg, ck.sha256 if ck else "", ignore=NON_CHAIN_KEYS, omit_defaults=ADDED_KEYS)
    if streams > 1:
        run_id += f"/streams={streams}"
        split: dict[str, Any] = {
            "sizes": [per] * len(mine),
            "generators": distributed.stream_generators(seed, streams, x0.device),
            "stream_ids": list(mine),
        }
    else:
        split = {"seed": seed}
    output.run_files = files_record  # written with every checkpoint, as config.toml
    chain = run_chains(
        kernel,
        x0.detach(),
        steps,
        **split,
        # kappa for the condensate, pion_t for the pion observables
        measure=measurement(field, names, couplings=getattr(action, "couplings", dict)(), options=options),
        output=output,
        resume=resume,
        run_id=run_id,
        checkpoint_every=int(cfg.get("checkpoint_every", 100)),
        progress=progress and distributed.is_main(),
        desc="sample",
        start=start_states,
    )
    hist, records = output.merged(chain)  # every process's chains (collective under torchrun)
    stats = chain_summary(hist, names, burn=therm, lattice=lattice)
    if distributed.is_main():
        warn_short_chains(stats.get("observables", {}), chain.step_count - therm, job="sample", steps_key="steps")
    acc = stats["acceptance"]
    inverse_check = None
    if ck is not None:
        assert ck.inverse_check is not None  # open_flow runs the check
        inverse_check = {**ck.inverse_check.as_dict(), "enforced": check_inverse}
    summary = {
        "acceptance": acc,
        "acceptance_by_kernel": stats["acceptance_by_kernel"],
        **({"jarzynski": stats["jarzynski"]} if "jarzynski" in stats else {}),  # non-equilibrium proposals
        # the ESS of the flow's weights: only with a flow and an action with a density of x alone
        **({"ess": weights["ess"]} if weights["ess"] is not None else {}),
        "threads": torch.get_num_threads(),
        "chains": chains,
        "steps": chain.step_count,
        "thermalize": therm,
        "start": start_desc,
        "seed": seed,
        "format": fmt,
        "kernel": kernel_name(cfg["kernel"], ck is not None),
        "kernel_config": kernel_record(cfg["kernel"]),  # its options, and the SHA-256 of files they name
        "field": field,
        "lattice": list(lattice),
        **({"flow": {"path": str(flow), "sha256": ck.sha256, "field": field, "lattice": list(lattice)}} if ck else {}),
        "action": (ck.action_config | action_override(cfg)) if ck else _action_record(cfg, action),
        "observables": stats["observables"],
        "written": len(records),
        **({"inverse_check": inverse_check} if inverse_check is not None else {}),
        "world_size": distributed.world_size(),
        "device": str(device),
        "streams": streams,
        **({"pion_t": int(cfg.get("pion_t", 1))} if options else {}),
    }
    if "cg_iterations" in hist:
        summary["cg"] = cg_summary(hist["cg_iterations"])
    report = {
        "history": {k: v[therm:] for k, v in hist.items()},
        "names": names,
        "title": f"flowplug sample: {chains} chains x {chain.step_count} steps, acceptance {acc:.3f}",
        "acceptance": summary["acceptance_by_kernel"] or {"all": acc},
        "first_step": therm + 1,  # the step axes count the run's steps, the thermalisation included
    }
    return output.finish(chain, summary, report=report)


def _start_draw(kernel: Any) -> Any:
    """The ``start_states(n, lattice, generator, device)`` of a kernel, or of the first part
    of a composed kernel (``kernel.hmc_every``: HMC, then the kernel) that offers it; ``None``
    if none does.

    Any start leaves the chains exact; a part's proposal draws are a valid state of the whole
    kernel (x with log p = -S(x) and that part's cached extras, which the other parts drop
    when they move x: :meth:`flowplug.chain.ChainState.moved`).
    """
    draw = getattr(kernel, "start_states", None)
    if callable(draw):
        return draw
    for part in getattr(kernel, "kernels", None) or ():
        draw = _start_draw(part)
        if draw is not None:
            return draw
    return None


def _action_and_lattice(cfg: Mapping[str, Any]) -> tuple[Any, tuple[int, ...]]:
    """The ``[action]`` and ``lattice`` of a sample job without a flow.

    Raises:
        ConfigError: without ``action.name`` or ``lattice``.
    """
    from flowplug.errors import ConfigError
    from flowplug.theory import action_from_config

    table = {k: v for k, v in dict(cfg.get("action", {})).items() if v not in ("", None)}
    if not table.get("name"):
        raise ConfigError(
            "flowplug sample without --flow samples the action [action]: give action.name "
            "(and its couplings, e.g. --set action.name=wilson --set action.beta=2.0)"
        )
    lattice = tuple(int(n) for n in cfg.get("lattice") or ())
    if not lattice or any(n < 1 for n in lattice):
        raise ConfigError(
            f"flowplug sample without --flow needs lattice = [L0, L1, ...]; found {list(cfg.get('lattice') or [])}"
        )
    return action_from_config({"action": table}), lattice


def _default_group() -> str:
    """The gauge group of ``flowplug hmc``'s default configuration (``action.group``): a
    flow-less sample of an action with a group and none given samples it too."""
    from flowplug.config import parse_toml
    from flowplug.jobs.hmc import DEFAULT_CONFIG as HMC_CONFIG

    return str(parse_toml(HMC_CONFIG, "hmc default configuration")["action"]["group"])


def _resolve_group(cfg: Mapping[str, Any], out: Path, *, resume: bool) -> dict[str, Any]:
    """The configuration of a flow-less sample with ``action.group`` resolved.

    An action that takes a ``group`` (wilson, symanzik, ...) with none given gets the one
    of ``flowplug hmc``'s default (:func:`_default_group`, u1), so the same flags sample
    the same theory in both jobs; the returned configuration holds it (``config.toml``,
    the fingerprint and ``summary.json`` record it). On a resume an empty group takes the
    one in ``out/config.toml``; a run that recorded none (an earlier version, which
    sampled the action's own default group, su3) keeps it empty, so it resumes as the
    same chain with the same fingerprint.

    Raises:
        UnknownComponentError: if ``action.name`` is not a registered action.
    """
    import copy

    from flowplug.jobs.provenance import stored_run_config
    from flowplug.manager import registry

    table = dict(cfg.get("action", {}))
    if not table.get("name") or table.get("group") not in ("", None):
        return dict(cfg)
    if "group" not in registry("action").get(str(table["name"])).parameters:
        return dict(cfg)
    if resume:
        stored = stored_run_config(out) or {}
        group = str(dict(stored.get("action", {})).get("group") or "")
        if not group:  # an earlier version's run: the action's own default, as it ran
            return dict(cfg)
    else:
        group = _default_group()
    resolved = copy.deepcopy(dict(cfg))
    resolved["action"] = {**dict(resolved.get("action", {})), "group": group}
    return resolved


def _action_record(cfg: Mapping[str, Any], action: Any) -> dict[str, Any]:
    """``summary.json``'s ``action`` of a flow-less sample: the ``[action]`` table with the
    group in effect (also for a resumed run of an earlier version that left it empty)."""
    table = dict(cfg.get("action", {}))
    group = getattr(action, "group", None)
    if isinstance(group, str) and group and not table.get("group"):
        table["group"] = group
    return table
