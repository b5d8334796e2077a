"""The ``resample`` job: exact flow chains seeded by an existing ensemble.

:func:`run_resample` (``flowplug resample ENSEMBLE... --flow CHECKPOINT --out DIR``):
every configuration of the inputs (files of any readable format, directories, globs, or
HDF5 ensembles) starts one chain of flow independence-Metropolis steps (optionally
``kernel.hmc_every`` HMC trajectories before each flow step, or flow-transformed HMC).
Without ``--flow`` the chains run a kernel that needs none (``hmc``, ``heatbath``,
``heatbath-or``, ``nonequilibrium`` from ``start = "prior"``, a plugin's) on the action
``[action]``, which must then be given; there are no importance weights then.
Files of a directory or glob that are not lattice files (a ``README``, logs: no format
recognises them, :func:`flowplug.io.lattice_inputs`) are skipped with one note; a file
that looks like a lattice file but does not read is an error.
log q of the inputs comes from the inverse flow. After the last step (and, with
``save_every`` > 0, every ``save_every`` steps) each chain's configuration is written to
DIR in the inputs' format (``to`` to change; SciDAC and bare LIME inputs are written as
ILDG; HDF5 into one store ``DIR/ensemble.h5``), with provenance (input file and its
SHA-256, flow checkpoint SHA-256, seed, chain, step) in the file's metadata where the
format has room and in ``DIR/provenance.json``. The default ``save_every = 0`` writes one
resampled configuration per input, the ensemble the run exists for; intermediate steps
of a chain are strongly correlated with each other.

``DIR/summary.json`` holds ``acceptance``, ``ess`` (of the importance weights p/q of the
input configurations, (sum w)^2 / (n sum w^2)), ``ess_p_samples`` (the flow's ESS
estimated from inputs distributed by p: n^2 / (sum w sum 1/w)), per-kernel acceptances,
``observables.<name>.{mean,error,tau_int}`` of the chains (Gamma method; with
``topological_susceptibility`` = <Q^2>/V where the topological charge is measured),
``inputs``: per input configuration its file, checksum, log p, log q and log w, and
``skipped_inputs`` (the files left out as not lattice files).
``DIR/measurements.csv`` (or ``.h5``) has every measurement per step and chain;
``DIR/report.png`` draws histories, autocorrelations, acceptance and the weights. Long
runs checkpoint to ``DIR/chain.ckpt``; ``resume=True`` continues bit for bit (and an
HDF5 store written past the checkpoint by a run that died is rolled back to it first).
The flow must pass the inverse check (:func:`flowplug.flowtools.check_inverse`, recorded
as ``inverse_check`` in the summary) unless ``check_inverse=False``: log q of every input
comes from the inverse.

Under ``torchrun --standalone --nproc_per_node=W -m flowplug resample ...`` the input
files are shared out (docs/chains.md, "Several processes", :mod:`flowplug.distributed`):
the lattice files, in order, are cut into ``streams`` contiguous shares of nearly equal
numbers of files (:func:`flowplug.distributed.share`), one random stream each, and rank r
reads, checksums, weighs and resamples the files of its streams only, so a directory of
thousands of files takes 1/W of the time per process. Rank r writes the outputs of its
chains (per-configuration files named by global chain index, ``ensemble.rank<r>.h5``) and
``chain.rank<r>.ckpt``; rank 0 holds the lock and writes the merged measurements,
``provenance.json``, ``report.png`` and ``summary.json`` (every input, ``world_size``,
``streams``). The run equals the one-process run with the same ``seed`` and ``streams``
bit for bit.

The configuration schema is :data:`DEFAULT_CONFIG` (``flowplug resample --print-config``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowplug import distributed
from flowplug.errors import ConfigError, FormatError

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_CONFIG", "NON_CHAIN_KEYS", "ADDED_KEYS", "OPEN_TABLES", "run_resample"]

DEFAULT_CONFIG = """\
# flowplug resample: exact flow chains seeded by an existing ensemble

seed = 1            # random seed of the chains
steps = 20          # kernel steps per chain (one chain per input configuration)
streams = 0         # random streams: contiguous shares of the input files, each with its own
                    # generator; 0 = one per process (torchrun); the same seed and streams give
                    # the same chains on any number of processes (a divisor of streams)
save_every = 0      # 0: write each chain's configuration after the last step only (one output
                    # per input); N > 0: also every N steps
threads = 1         # torch CPU threads (1: fastest on small lattices and busy machines; 0: torch's default)
checkpoint_every = 50
measurements = "csv"  # per-step measurements: "csv" (measurements.csv) or "hdf5" (measurements.h5)
progress = true     # progress bar (--no-progress turns it off)
device = "cpu"      # torch device of the flow and the chains: "cpu", "cuda" or "cuda:N" (under
                    # torchrun "cuda" is cuda:LOCAL_RANK); the inputs are read on the CPU and
                    # moved there; random streams differ between CPU and CUDA (a resume keeps it)
observables = []    # measured after every step ([] = defaults of the field kind)
pion_t = 1          # time separation t of pion_effective_mass (0 <= t <= T/2 - 1) and pion_correlator
to = ""             # output format ("" = the inputs' format)
precision = 0       # output precision in bits (0 = the inputs')

[kernel]
type = "flow"       # "flow" (independence Metropolis), "flow-hmc" (HMC in latent space), "hmc",
                    # "nonequilibrium" (Jarzynski proposals, docs/chains.md) or any registered kernel
hmc_every = 0       # > 0: this many HMC trajectories before every flow step

[kernel.options]    # the kernel's own options (e.g. n_step = 20 for nonequilibrium)

[kernel.hmc]
integrator = "omelyan"
steps = 10
trajectory_length = 1.0

[action]            # "" = the action stored with the flow (the production action must be it)
name = ""
beta = 0.0
group = ""
"""

#: Tables whose keys are free: a kernel's options, and the action's couplings (any coupling the
#: action's record names: ``kappa``, ``m2``...).
OPEN_TABLES = ("kernel.options", "action")

#: Keys that do not change the Markov chains: a run may be resumed with other values.
NON_CHAIN_KEYS = ("steps", "save_every", "checkpoint_every", "measurements", "threads", "streams", "progress")
# (the effective number of streams enters the run's id instead: 0 means one per process)

#: Keys added after runs of the job existed, left out of the fingerprint at these values
#: (:func:`flowplug.jobs.provenance.fingerprint`), so earlier checkpoints stay resumable.
ADDED_KEYS: dict[str, Any] = {"pion_t": 1, "device": "cpu"}


def _warn_other_action(path: Any, ens: Any, target: Mapping[str, Any], seen: set[str], *, weighted: bool) -> None:
    """Warn (:class:`~flowplug.errors.CouplingMismatchWarning`) when a file's metadata states an
    action (``header["action"]``, e.g. MILC's gauge action) other than the one the chains
    sample: the chains stay exact, but the inputs then only seed them, and their importance
    weights (``reweighted_inputs``) estimate nothing about the file's own theory. Once per
    distinct stated action (``seen`` collects them), so thousands of files give one line."""
    import warnings

    from flowplug.errors import CouplingMismatchWarning
    from flowplug.jobs.chains import stated_action_mismatch

    found = stated_action_mismatch(ens, target)
    if found is None:
        return
    said, want, note = found
    if said in seen:
        return
    seen.add(said)
    warnings.warn(
        f"{path}: the file states the action {said}; the chains sample {want}: they stay exact, but "
        "the inputs only seed them"
        + (" and their reweighted averages describe the chains' action" if weighted else "")
        + (f" ({note})" if note and "quark" in str(note) else ""),
        CouplingMismatchWarning,
        stacklevel=3,
    )


def _action_without_flow(cfg: Mapping[str, Any]) -> Any:
    """The ``[action]`` of a resample job without a flow (kernels that need none).

    Raises:
        ConfigError: without ``action.name``.
    """
    from flowplug.jobs.chains import action_override
    from flowplug.theory import action_from_config

    table = action_override(cfg)
    if not table.get("name"):
        raise ConfigError(
            "flowplug resample without --flow samples the action [action] with a kernel that needs no flow: "
            "give action.name and its couplings (e.g. --set action.name=wilson --set action.beta=6.0 "
            "--set action.group=su3) and kernel.type (hmc, heatbath, nonequilibrium...), or give --flow CHECKPOINT"
        )
    return action_from_config(table)


def _check_field(ens: Any, action: Any, source: str, first: Any) -> None:
    """Refuse a file whose field kind is not the action's, or whose lattice differs from the
    first file's (resample without a flow).

    Raises:
        FormatError: naming the file, what it holds and what was expected.
    """
    if ens.field != action.field:
        raise FormatError(
            f"{source}: holds {ens.describe_field()} but the action {type(action).__name__} acts on "
            f"{action.field} fields"
        )
    if first is not None and tuple(ens.lattice) != tuple(first.lattice):
        fmt = lambda lat: "x".join(map(str, lat))  # noqa: E731
        raise FormatError(
            f"{source}: lattice is {fmt(ens.lattice)} but the first input's is {fmt(first.lattice)}: "
            "one resample run takes configurations of one lattice"
        )


def run_resample(
    cfg: Mapping[str, Any],
    inputs: Sequence[Path | str],
    flow: Path | None,
    out: Path,
    *,
    resume: bool = False,
    force: bool = False,
    read_options: Mapping[str, Any] | None = None,
    progress: bool | None = None,
    check_inverse: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) a resample job; ``out`` is locked for the run.

    torch runs on ``threads`` CPU threads (:func:`flowplug.threads.job_threads`; the
    caller's setting is restored afterwards). Under torchrun every process resamples its
    share of the input files (:func:`flowplug.distributed.sharded_job`; rank 0 locks
    ``out`` and writes the merged outputs; the other ranks return ``{"rank", "world_size"}``).

    Arguments:
        cfg: The effective configuration (of :data:`DEFAULT_CONFIG`).
        inputs: Configuration files, directories or glob patterns.
        flow: What ``flowplug train`` wrote: the run directory or its ``checkpoint.pt``;
            ``None`` for a kernel that needs no flow (``hmc``, ``heatbath``,
            ``nonequilibrium`` from ``start = "prior"``...), which samples the action
            ``[action]`` (required then); the summary then has no importance weights
            (no ``flow``, ``ess``, ``ess_p_samples``, ``reweighted_inputs``,
            ``inverse_check``; ``inputs`` without log p/q). On a resume ``None`` (and empty
            ``inputs``, ``read_options`` of ``None``) take the run's own from
            ``out/run_files.json`` (:func:`flowplug.jobs.provenance.resume_inputs`).
        resume: Continue from ``out/chain.ckpt`` (bit for bit the uninterrupted run).
        force: Replace the outputs of an earlier run.
        read_options: Options of :func:`flowplug.io.read` (``format``, ``lattice``,
            ``group``, ``verify``).
        progress: Progress bar (default: ``cfg["progress"]``).
        check_inverse: Refuse a flow that fails the inverse check.
        log: Receives one-line notes (the files of a directory or glob skipped as not
            lattice files).

    Returns:
        The figures written to ``out/summary.json``; the chains' histories are in
        ``out/measurements.csv`` (:func:`flowplug.jobs.output.read_measurements`), their
        state in ``out/chain.ckpt``.

    Warns:
        ShortChainWarning: when the chains are too short for the tau_int of an
            observable (:func:`flowplug.jobs.summary.warn_short_chains`).

    Raises:
        FlowplugError: on bad inputs (no lattice file among them, a lattice file that
            does not read, fewer lattice files than random streams), a mismatched flow,
            or an output that exists (an earlier run's configuration files, or its
            ``chain.ckpt``, without ``resume`` or ``force``);
            :class:`flowplug.errors.InverseCheckError` if the flow fails the inverse check
            and ``check_inverse`` is true.
    """
    from flowplug.jobs.chains import job_device
    from flowplug.threads import job_threads

    with distributed.sharded_job("resample", out, job_device(cfg)) as device, job_threads(cfg.get("threads", 1)):
        return _run_resample(
            cfg,
            inputs,
            flow,
            out,
            device,
            resume=resume,
            force=force,
            read_options=read_options,
            progress=bool(cfg.get("progress", False)) if progress is None else bool(progress),
            check_inverse=check_inverse,
            log=log,
        )


def _run_resample(
    cfg: Mapping[str, Any],
    inputs: Sequence[Path | str],
    flow: Path | None,
    out: Path,
    device: torch.device,
    *,
    resume: bool,
    force: bool,
    read_options: Mapping[str, Any] | None,
    progress: bool,
    check_inverse: bool,
    log: Callable[[str], None] | None,
) -> dict[str, Any]:
    """The body of :func:`run_resample` (inside its lock and thread setting), on ``device``."""
    import torch

    from flowplug import io
    from flowplug.flowtools import open_flow
    from flowplug.jobs.chains import (
        action_override,
        build_kernel,
        check_compatible,
        importance_weights,
        kernel_name,
        run_chains,
        weight_figures,
    )
    from flowplug.jobs.output import ChainOutput, Configurations, output_format
    from flowplug.jobs.provenance import (
        RUN_FILES,
        check_file_sha256,
        check_resume_action,
        check_resume_config,
        file_record,
        file_sha256,
        fingerprint,
        kernel_record,
        provenance,
        refuse_earlier_checkpoint,
        resume_flow_path,
        resume_inputs,
        resume_read_options,
        stored_run_files,
    )
    from flowplug.jobs.summary import chain_summary, warn_short_chains
    from flowplug.measure import default_observables, measurement

    out = Path(out)
    if int(cfg.get("checkpoint_every", 50)) < 0:
        raise ConfigError(f"checkpoint_every must be >= 0 (0: only after the last); found {cfg['checkpoint_every']}")
    given_read_options = dict(read_options or {})
    flow_entry = None
    stored_inputs = None
    if resume:  # the flow, the inputs and how they were read (run_files.json): need not be given again
        given, flow_entry = resume_flow_path(out, flow)
        flow = None if given is None else Path(given)
        # names every changed key of the chains (the fingerprint stays the final guard); with a
        # flow, [action] is compared as it takes effect (resolved against the flow's), below
        skip = (*NON_CHAIN_KEYS, "action") if flow is not None else NON_CHAIN_KEYS
        check_resume_config(out, cfg, ignore=skip, omit_defaults=ADDED_KEYS)
        stored_inputs = resume_inputs(out, [str(p) for p in inputs])
        given_read_options = resume_read_options(out, given_read_options)
    read_options = {k: v for k, v in given_read_options.items() if v is not None}
    if flow is not None and flow_entry is not None:  # the file the run started with, unchanged
        from flowplug.checkpoints import checkpoint_path

        check_file_sha256(out, "flow checkpoint", flow_entry, file_sha256(checkpoint_path(flow)))
    ck = None if flow is None else open_flow(flow, device=device, check_inverse=check_inverse)
    if resume and ck is not None:  # the stored [action] against the given one, each as it takes effect
        trained = dict(ck.action_config)
        cfg = check_resume_action(out, cfg, lambda c: trained | action_override(c))
    action = ck.action(action_override(cfg)) if ck is not None else _action_without_flow(cfg)
    if stored_inputs is not None:  # the very files of the run, in their order
        files, skipped, stored_files = stored_inputs
    else:
        if not inputs:
            raise ConfigError(
                "flowplug resample needs its inputs (ENSEMBLE...)"
                + (f": {out} holds no {RUN_FILES} (a run of an earlier version) to take them from" if resume else "")
            )
        files, skipped = io.lattice_inputs([str(p) for p in inputs], format=read_options.get("format"))
        stored_files = {}
    if not distributed.is_main():
        log = None
    if skipped and log is not None:
        log(
            f"skipped {len(skipped)} file{'s' if len(skipped) != 1 else ''} that no lattice format "
            f"recognises: {', '.join(map(str, skipped))}"
        )
    if not files:
        raise FormatError(
            f"no lattice file among the inputs {', '.join(map(str, inputs))}"
            + (f" (skipped: {', '.join(map(str, skipped))})" if skipped else "")
        )
    streams = distributed.effective_streams(int(cfg.get("streams", 0)))
    if len(files) < streams:
        raise ConfigError(
            f"streams = {streams} random streams (one per process for streams = 0) need at least as many "
            f"lattice files; found {len(files)}"
        )
    mine = distributed.shard(streams)
    shares = [distributed.share(len(files), streams, g) for g in mine]  # this process's files, per stream
    parts: list[io.Ensemble] = []
    sources: list[dict[str, Any]] = []
    sizes: list[int] = []
    target = (ck.action_config if ck is not None else {}) | action_override(cfg)
    stated_actions: set[str] = set()
    for part in shares:
        n0 = len(sources)
        for f in files[part]:
            ens = io.read(f, **read_options)
            if ck is not None:
                check_compatible(ens, ck.flow, str(f))
            else:
                _check_field(ens, action, str(f), parts[0] if parts else None)
            _warn_other_action(f, ens, target, stated_actions, weighted=ck is not None)
            digest = file_sha256(f)
            if str(Path(f).resolve()) in stored_files:  # a resume: the file the run started with
                check_file_sha256(out, "input", stored_files[str(Path(f).resolve())], digest)
            for i in range(len(ens)):
                sources.append(
                    {
                        "file": str(f),
                        "index": i,
                        "sha256": digest,
                        "format": ens.meta[i].format,
                        "precision": ens.meta[i].precision,
                    }
                )
            parts.append(ens)
        sizes.append(len(sources) - n0)
    every = distributed.all_gather_object(sources)  # every process's inputs, in rank (= file) order
    first = sum(len(p) for p in every[: distributed.rank()])  # global index of this process's first chain
    all_sources = [s for p in every for s in p]
    ensemble = io.Ensemble.concat(parts)
    fmt = output_format(ensemble.meta[0].format if ensemble.meta[0].format != "hdf5" else "hdf5", cfg.get("to"))
    precision = int(cfg.get("precision") or ensemble.precision)
    x0 = ensemble.links.to(device=device, dtype=ensemble.space.dtype)
    lattice = tuple(ck.flow.lattice) if ck is not None else tuple(ensemble.lattice)
    field, ndim = (ck.flow.field if ck is not None else ensemble.field), len(lattice)
    names = list(cfg.get("observables") or [*default_observables(field, ndim), *getattr(action, "observables", ())])
    from flowplug.jobs.hmc import observable_options

    options = observable_options(cfg, names, lattice)  # pion_t
    measure = measurement(
        field, names, couplings=getattr(action, "couplings", dict)(), options=options
    )  # kappa for the condensate
    kernel = build_kernel(ck.flow if ck is not None else None, action, cfg["kernel"])  # validate before outputs
    # weights stream by stream (the same batches in any process), joined over every process
    weights: dict[str, Any] = {"ess": None, "reweighted": None}
    if ck is not None:
        lp: list[float] = []
        lq: list[float] = []
        values: dict[str, list[float]] = {}
        start = 0
        for n in sizes:
            w = importance_weights(ck.flow, action, x0[start : start + n], measure)
            start += n
            lp += w["log_p"]
            lq += w["log_q"]
            for k, v in w.get("observables", {}).items():
                values.setdefault(k, []).extend(v)
        joined = distributed.all_gather_object((lp, lq, values))
        weights = weight_figures(
            torch.tensor([v for p in joined for v in p[0]], dtype=torch.float64),
            torch.tensor([v for p in joined for v in p[1]], dtype=torch.float64),
            {k: torch.tensor([v for p in joined for v in p[2][k]], dtype=torch.float64) for k in values},
            marginal=not callable(getattr(action, "refresh", None)),
        )
    seed = int(cfg["seed"])
    steps = int(cfg["steps"])
    # steps and output settings may change on --resume; the flow and the inputs may not
    run_id = fingerprint(
        cfg,
        ck.sha256 if ck is not None else "",
        *[s["sha256"] for s in all_sources],
        ignore=NON_CHAIN_KEYS,
        omit_defaults=ADDED_KEYS,
    )
    if streams > 1:
        run_id += f"/streams={streams}"
        split: dict[str, Any] = {
            "sizes": sizes,
            "generators": distributed.stream_generators(seed, streams, x0.device),
            "stream_ids": list(mine),
        }
    else:
        split = {"seed": seed}

    def _provenance(t: int, c: int) -> dict[str, Any]:
        src = all_sources[c]
        return provenance(
            "resample",
            seed=seed,
            step=t,
            chain=c,
            flow=ck,
            input=src["file"],
            input_index=src["index"],
            input_sha256=src["sha256"],
        )

    configurations = Configurations(
        out,
        fmt,
        field,
        store=out / "ensemble.h5",
        save_every=int(cfg.get("save_every", 0)),
        total=steps,
        precision=precision,
        source_meta=ensemble.meta,
        inputs=[Path(f) for f in (*files, *skipped)],  # never written over nor removed
        overwrite=force,
        name=lambda t, c: (
            f"resample.s{t:05d}" if c is None else f"{Path(all_sources[c]['file']).name}.c{c:03d}.s{t:05d}"
        ),
        pattern=r"resample\.s\d+|.+\.c\d+\.s\d+",  # the names above (never an input: Configurations.start)
        provenance=_provenance,
        first_chain=first,
    )
    # a format that cannot hold these configurations (ILDG of a 2D lattice) is refused before
    # anything is written or sampled, not at the first save point
    configurations.check(x0)
    output = ChainOutput(
        out, "resample", configurations=configurations, measurements=cfg.get("measurements", "csv"), config=cfg
    )
    output.start(resume=resume, force=force)
    # after output.start (which writes nothing on a fresh run without --force), so that an earlier
    # run's configuration files are refused by name, saying what --force deletes; its chain.ckpt
    # alone (stopped before the first save point) is refused here, as hmc does with its checkpoint.pt
    refuse_earlier_checkpoint(out, "chain.ckpt", resume=resume, force=force)
    # what --resume needs besides config.toml: the flow and the inputs, as given and resolved, with
    # their SHA-256 (written with every checkpoint, as config.toml; a resume keeps the stored record
    # unless the inputs were named at a new place, resume_inputs)
    digests = {s["file"]: s["sha256"] for s in all_sources}
    files_record = (stored_run_files(out) if stored_inputs is not None else None) or {
        "command": "resample",
        "flow": file_record(str(flow), sha256=ck.sha256, file=ck.path) if ck is not None else None,
        "inputs": [file_record(p) for p in inputs],
        "files": [file_record(f, sha256=digests[str(f)]) for f in files],
        "skipped": [str(f) for f in skipped],
        "read_options": {k: given_read_options.get(k) for k in ("format", "lattice", "group", "verify")},
    }
    if flow_entry is not None:  # the run's flow, at its new place if it moved (resume_flow_path)
        files_record["flow"] = flow_entry
    output.run_files = files_record  # written with every checkpoint, as config.toml
    chain = run_chains(
        kernel,
        x0,
        steps,
        **split,
        measure=measure,
        output=output,
        resume=resume,
        run_id=run_id,
        checkpoint_every=int(cfg.get("checkpoint_every", 50)),
        progress=progress and distributed.is_main(),
        desc="resample",
    )
    hist, records = output.merged(chain)  # every process's chains (collective under torchrun)
    stats = chain_summary(hist, names, lattice=lattice)
    if distributed.is_main():
        warn_short_chains(stats.get("observables", {}), chain.step_count, job="resample", steps_key="steps")
    acc = stats.get("acceptance", float("nan"))
    inverse_check = None
    if ck is not None:
        assert ck.inverse_check is not None  # open_flow runs the check
        inverse_check = {**ck.inverse_check.as_dict(), "enforced": check_inverse}
    if ck is not None:
        inputs_table = [
            {**s, "log_p": lp, "log_q": lq, "log_w": lw}
            for s, lp, lq, lw in zip(all_sources, weights["log_p"], weights["log_q"], weights["log_w"], strict=True)
        ]
    else:  # no flow: no proposal density, no importance weights
        inputs_table = list(all_sources)
    summary = {
        "acceptance": acc,
        "acceptance_by_kernel": stats.get("acceptance_by_kernel", {}),
        "kernel_config": kernel_record(cfg["kernel"]),  # its options, and the SHA-256 of files they name
        **({"jarzynski": stats["jarzynski"]} if "jarzynski" in stats else {}),  # non-equilibrium proposals
        # the weights p/q of the inputs: only with a flow and an action with a density of x alone
        **{k: weights[k] for k in ("ess", "ess_p_samples") if weights.get(k) is not None},
        "steps": chain.step_count,
        "chains": len(all_sources),
        "seed": seed,
        "format": fmt,
        "precision": precision,
        **(
            {"flow": {"path": str(flow), "sha256": ck.sha256, "field": field, "lattice": list(lattice)}}
            if ck is not None
            else {}
        ),
        "kernel": kernel_name(cfg["kernel"], ck is not None),
        "action": target,
        "observables": stats.get("observables", {}),
        # sum w O / sum w over the inputs (with a flow)
        **({"reweighted_inputs": weights["reweighted"]} if weights["reweighted"] is not None else {}),
        "inputs": inputs_table,
        "skipped_inputs": [str(f) for f in skipped],
        "written": len(records),
        "world_size": distributed.world_size(),
        "device": str(device),
        "streams": streams,
        **({"pion_t": int(cfg.get("pion_t", 1))} if options else {}),
        "threads": torch.get_num_threads(),
        **({"inverse_check": inverse_check} if inverse_check is not None else {}),
    }
    report = {
        "history": hist,
        "names": names,
        "weights": weights.get("log_w"),
        "title": f"flowplug resample: {len(all_sources)} chains, acceptance {acc:.3f}",
        "acceptance": summary["acceptance_by_kernel"] or {"all": acc},
    }
    return output.finish(chain, summary, report=report)
