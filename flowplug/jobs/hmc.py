"""The ``hmc`` job: exact HMC ensembles for any registered action, resumable.

:func:`run_hmc` (``flowplug hmc --config FILE.toml [--set key=value ...] [--resume]``)
runs ``chains`` independent HMC chains as one batch and writes to ``out``:

``ensemble/traj_<t>[_chain_<c>].<ext>``
    configurations every ``save_every`` trajectories (after thermalisation) and at the
    end, in ``format`` (gauge fields: any writable file format of :mod:`flowplug.io`,
    hdf5 holding all chains of a trajectory in one file, ildg/nersc/openqcd one
    configuration per file; other field kinds (phi^4, plugins' kinds): a plain HDF5 file
    with dataset ``field`` (chains first) and attributes ``kind`` and ``provenance``;
    ``none`` writes no configurations); ``provenance.json`` lists them;
``measurements.h5`` or ``measurements.csv``
    every observable, acceptance and dH per trajectory and chain (HDF5: one dataset per
    name, layout (steps, chains) as in ``Chain.history_tensors()``, stated by its
    attribute ``axes`` = ``"steps,chains"``; give ``step_axis=0`` to :mod:`flowplug.stats`);
``checkpoint.pt``
    state, generator state and history (``torch.save`` of tensors, written atomically)
    every ``checkpoint_every`` trajectories (default 100, as ``sample``; 0: only after the
    last) and after the last, independently of ``save_every`` (which earlier versions
    checkpointed at); ``resume=True`` (``--resume``) continues from it and gives the same
    chain as an uninterrupted run (also to extend a finished run: raise
    ``hmc.trajectories`` and resume; configurations written after the checkpoint by a run
    that died are written again, once);
``run_files.json``
    ``start``: the start file (as given, resolved, and its SHA-256) when ``start`` names
    one, ``null`` for a cold or hot start. A ``--resume`` does not read the start file (the
    chains go on from the checkpoint, :func:`flowplug.jobs.output.checkpoint_configurations`),
    so it may have moved or changed since; ``config.toml`` keeps ``start`` as given, and
    another ``start`` on the resume is refused as a change of the chain;
``config.toml``
    the resolved configuration, written with every checkpoint: ``--resume`` starts from
    it (the original ``--set`` values need not be repeated) and refuses a change of a
    key of the chain, naming each (:func:`flowplug.jobs.provenance.check_resume_config`;
    the checkpoint's fingerprint stays the final guard; a run directory without it, of an
    earlier version, resumes as before);
``summary.json``
    ``acceptance``, ``thermalization`` (the value used: the default ``-1`` is
    ``min(10, hmc.trajectories // 2)``, fixed when the run starts,
    :func:`flowplug.jobs.provenance.resolve_thermalization`; an explicit value must be
    below ``hmc.trajectories``; a ``--resume`` that gives another value than the stored one is
    refused, naming both, as ``sample``'s ``thermalize``),
    ``observables.<name>.{mean,error,tau_int,tau_int_error}`` (Gamma method, chains as
    replicas, after ``hmc.thermalization``), with
    ``observables.topological_susceptibility`` = chi_t = <Q^2>/V (V = number of sites)
    wherever the topological charge is measured, and ``exp_minus_delta_h``; for an action
    with pseudofermions ``cg`` = ``{iterations, trajectories, per_trajectory: {mean, max},
    trajectories_without_count}`` (:func:`flowplug.jobs.summary.cg_summary` of the
    measurements' ``cg_iterations``, :class:`CGCounting`); with a pion observable, ``pion_t``.

``pion_t`` is the time separation of ``pion_effective_mass`` and ``pion_correlator``
(:func:`observable_options`).

A :class:`flowplug.jobs.summary.ShortChainWarning` says when the chains are too short
for the tau_int of an observable. ``start`` may be a bare LIME file (only a binary
record; it stores neither lattice nor group): it is read with ``lattice`` and
``action.group``. ``threads`` (default 1) sets torch's CPU threads for the run
(:mod:`flowplug.threads`).

Under ``torchrun --standalone --nproc_per_node=W -m flowplug hmc ...`` the chains are
shared out among the W processes by random streams (``streams``; docs/chains.md,
"Several processes", :mod:`flowplug.distributed`): rank r writes the configurations of its
chains (global chain indices; ``traj_<t>.rank<r>.h5`` for files holding several chains)
and ``checkpoint.rank<r>.pt``; rank 0 holds the lock and writes the merged
``measurements``, ``provenance.json`` and ``summary.json`` (with ``world_size`` and
``streams``). The run equals the one-process run with the same ``seed`` and ``streams``
bit for bit.

The configuration schema is :data:`DEFAULT_CONFIG` (``flowplug hmc --print-config``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from flowplug import distributed
from flowplug.errors import ConfigError, FlowplugError

__all__ = [
    "DEFAULT_CONFIG",
    "NON_CHAIN_KEYS",
    "ADDED_KEYS",
    "OPEN_TABLES",
    "run_hmc",
    "run_fingerprint",
    "start_configuration",
    "read_start_file",
    "observable_options",
    "CGCounting",
]

DEFAULT_CONFIG = """\
# flowplug hmc: exact hybrid Monte Carlo (Duane et al. 1987) for any registered action.
# Every key can be overridden with --set key=value (values are TOML).

seed = 1                # random seed (generator of momenta, accept tests and hot starts)
out = "hmc-out"         # output directory
lattice = [8, 8]        # lattice extents, x first; a start file's own lattice takes precedence
                        # (a bare LIME start file stores none: it is read with this lattice)
start = "hot"           # "cold" (ordered), "hot" (disordered), or a path to a configuration
                        # or ensemble file in any readable format (ILDG, NERSC, HDF5, ...;
                        # a bare LIME file is read with lattice and action.group)
chains = 4              # independent chains, run as one batch
streams = 0             # random streams: groups of chains with their own generator; 0 = one per
                        # process (torchrun); the same seed and streams give the same chains
                        # on any number of processes (a divisor of streams, which divides chains)
format = "hdf5"         # ensemble format: hdf5, ildg, nersc, openqcd (a writable format), or "none"
save_every = 10         # write configurations every this many trajectories (after thermalization)
checkpoint_every = 100  # write a checkpoint every this many trajectories and after the last (0: only
                        # after the last); a resume continues from the last one
measurements = "hdf5"   # per-trajectory measurements: "hdf5" (measurements.h5) or "csv"
observables = []        # observable names; empty: plaquette (+ topological charge where
                        # defined) for gauge fields, magnetization, chi_2, ising_energy for phi^4,
                        # and the action's own (schwinger: chiral_condensate, pion_effective_mass)
pion_t = 1              # time separation t of pion_effective_mass (from C(t)/C(t+1), cosh form:
                        # 0 <= t <= T/2 - 1, T = the last lattice extent) and of pion_correlator
device = "cpu"          # torch device: "cpu", "cuda" or "cuda:N" (under torchrun "cuda" is cuda:LOCAL_RANK)
threads = 1             # torch CPU threads; 1 is fastest on small lattices and busy machines,
                        # 0 keeps torch's default (one per core), more for large lattices
progress = true         # progress bar with acceptance and plaquette

[action]                # also takes any other coupling of the action (schwinger: kappa = 0.2)
name = "wilson"         # a registered action (`flowplug plugins` lists them): wilson, symanzik,
                        # iwasaki, dbw2, plaquette-rectangle, milc-symanzik, phi4, schwinger, ...
group = "u1"            # gauge actions: u1, su2, su3 (also the group of a bare LIME start file);
                        # flowplug sample without --flow has the same default
beta = 2.0              # wilson: inverse coupling
m2 = -4.0               # phi4: bare mass squared (tutorial convention)
lam = 8.0               # phi4: quartic coupling

[hmc]
trajectories = 100      # total trajectories per chain (raise it and --resume to extend a run)
thermalization = -1     # first trajectories left out of summary.json and of the saved ensemble;
                        # -1: min(10, trajectories // 2), fixed when the run starts (config.toml
                        # and summary.json record the value used); an explicit value must be
                        # < trajectories; fixed for the run: another value on --resume is refused
integrator = "omelyan"  # "leapfrog" or "omelyan" (2MN)
steps = 10              # integration steps per trajectory
trajectory_length = 1.0 # molecular-dynamics time per trajectory
"""

#: Tables whose keys are free: an action's couplings (``action.kappa`` of ``schwinger``).
OPEN_TABLES = ("action",)

#: Keys that do not change the Markov chain: a run may be resumed with other values.
#: (``observables`` is not among them: the history of a resumed run must stay rectangular.)
NON_CHAIN_KEYS = (
    "hmc.trajectories",
    "progress",
    "save_every",
    "checkpoint_every",
    "format",
    "threads",
    "measurements",
    "out",
    "hmc.thermalization",  # not in the fingerprint (as before), yet fixed: resolve_thermalization refuses a change
    "streams",  # the effective number of streams enters the run's id instead (0 = one per process)
)


#: Keys added after runs of the job existed, with the value that reproduces those runs: left
#: out of the fingerprint at that value, so earlier checkpoints stay resumable.
ADDED_KEYS: dict[str, Any] = {"pion_t": 1}


def run_fingerprint(cfg: Mapping[str, Any]) -> str:
    """Hash of the configuration keys that determine the chain (for ``--resume`` checks)."""
    from flowplug.jobs.provenance import fingerprint

    return fingerprint(cfg, ignore=NON_CHAIN_KEYS, omit_defaults=ADDED_KEYS)


#: Observables that take the time separation ``pion_t``, with the largest t each allows for
#: a time extent T.
PION_OBSERVABLES: dict[str, Callable[[int], int]] = {
    "pion_effective_mass": lambda tsize: tsize // 2 - 1,  # cosh form: t + 1 <= T/2
    "pion_correlator": lambda tsize: tsize - 1,
}


def observable_options(cfg: Mapping[str, Any], names: list[str], lattice: list[int] | tuple[int, ...]) -> dict:
    """Per-observable options of a chain job from its configuration: ``pion_t`` as the time
    separation ``t`` of ``pion_effective_mass`` and ``pion_correlator`` (when measured).

    Arguments:
        cfg: The job's configuration (``pion_t`` absent: 1, the observables' default).
        names: The observables measured.
        lattice: The lattice extents, x first; the time extent T is the last.

    Returns:
        ``{observable: {"t": pion_t}}`` for the pion observables among ``names``
        (:func:`flowplug.measure.measurement` ``options``).

    Raises:
        ConfigError: if ``pion_t`` is not an integer or outside 0 <= t <= T/2 - 1
            (``pion_effective_mass``, cosh form) or 0 <= t <= T - 1 (``pion_correlator``),
            naming the range and the value found.

    References:
        Gattringer & Lang (2010), chapter 6 (effective mass of a periodic correlator).
    """
    measured = [n for n in names if n in PION_OBSERVABLES]
    if not measured:
        return {}
    t = cfg.get("pion_t", 1)
    if isinstance(t, bool) or not isinstance(t, int):
        raise ConfigError(f"pion_t must be an integer time separation; found {t!r}")
    tsize = int(lattice[-1])
    for name in measured:
        top = PION_OBSERVABLES[name](tsize)
        if not 0 <= t <= top:
            why = "" if name == "pion_correlator" else " (C(t)/C(t+1), symmetric about T/2: t + 1 <= T/2)"
            raise ConfigError(
                f"pion_t = {t}: {name} needs 0 <= pion_t <= {top} on a lattice of time extent T = {tsize}{why}"
            )
    return {name: {"t": t} for name in measured}


class CGCounting:
    """A kernel whose ``info`` also holds ``cg_iterations``: the conjugate-gradient iterations
    of each chain's solves during the step, (B,) float64.

    Wraps a kernel whose action counts its solves per chain
    (``take_cg_iterations()``, as the pseudofermion actions of
    :mod:`flowplug.plugins.fermion_actions` and :mod:`flowplug.plugins.yukawa`); every
    other attribute is the wrapped kernel's. The count changes nothing of the chain (no
    random numbers, no arithmetic of the step). :class:`flowplug.chain.Chain` records
    ``cg_iterations`` in the history (checkpointed, in the measurements), and
    :func:`flowplug.jobs.summary.cg_summary` summarises it.

    Arguments:
        kernel: The kernel (``init``/``step``).
        action: Its action, with ``take_cg_iterations() -> (B,) int64 tensor or None``.
    """

    def __init__(self, kernel: Any, action: Any) -> None:
        self.kernel = kernel
        self.action = action

    def __getattr__(self, name: str) -> Any:
        kernel = self.__dict__.get("kernel")
        if kernel is None:  # not yet initialised (copies): no attributes to forward
            raise AttributeError(name)
        return getattr(kernel, name)

    def init(self, x: torch.Tensor) -> Any:
        """The wrapped kernel's ``init``."""
        return self.kernel.init(x)

    def step(self, state: Any, generator: torch.Generator | None = None) -> tuple[Any, dict[str, Any]]:
        """One step of the wrapped kernel, with ``info["cg_iterations"]`` (B,) float64: 0 for a
        step without a solve, NaN when the tally does not hold one count per chain of the
        batch (solves of sub-batches, as in a ``mixture``, restart it: the count is lost, and
        :func:`flowplug.jobs.summary.cg_summary` reports such steps as
        ``trajectories_without_count``, not as free)."""
        self.action.take_cg_iterations()  # forget solves outside the step (init, measurements)
        new, info = self.kernel.step(state, generator)
        counts = self.action.take_cg_iterations()
        if counts is None:
            row = torch.zeros(state.batch, dtype=torch.float64)
        elif counts.dim() != 1 or counts.shape[0] != state.batch:
            row = torch.full((state.batch,), torch.nan, dtype=torch.float64)
        else:
            row = counts.to(torch.float64)
        return new, {**info, "cg_iterations": row}


def start_configuration(
    cfg: Mapping[str, Any],
    action: Any,
    chains: int,
    generator: torch.Generator,
    device: torch.device,
    log: Callable[[str], None] | None = None,
) -> tuple[torch.Tensor, str]:
    """The start of the chains: ``cold``, ``hot`` or the configurations of a file.

    A bare LIME file (format ``lime``: one binary record, no lattice or group stored)
    is read with the configuration's ``lattice`` and ``action.group``
    (:func:`read_start_file`).

    Returns:
        ``(x0, description)``: x0 (chains, ...) on ``device``; a file's single
        configuration is copied to every chain, of several the first ``chains`` are
        taken; 32-bit links are projected back onto the group.

    Raises:
        ConfigError: on a bad lattice, a missing file, a file of another group, too
            few configurations in it, or a bare LIME file that ``lattice`` and
            ``action.group`` do not describe.
    """
    start = str(cfg["start"])
    lattice = [int(n) for n in cfg["lattice"]]
    if start in ("cold", "hot"):
        if not lattice or any(n < 1 for n in lattice):
            raise ConfigError(f"lattice must be a list of positive extents, x first (e.g. [8, 8]); found {lattice}")
        from flowplug.theory import start_field

        return start_field(action, start, lattice, chains, generator=generator, device=device), start
    path = Path(start)
    if not path.exists():
        raise ConfigError(f"start = {start!r}: no such file (use 'cold', 'hot' or a configuration file)")
    ens = read_start_file(path, lattice, dict(cfg.get("action", {})).get("group"))
    if ens.field != action.field:
        raise ConfigError(
            f"start file {path} holds {ens.describe_field()}, but the action acts on "
            f"{action.field}" + (f' (set action.group = "{ens.field}")' if ens.is_gauge else "")
        )
    if list(ens.lattice) != lattice and log is not None:
        log(
            f"lattice {'x'.join(map(str, ens.lattice))} taken from {path} "
            f"(the configuration said {'x'.join(map(str, lattice))})"
        )
    links = ens.links
    n = links.shape[0]
    if n == 1:
        links = links.expand(chains, *links.shape[1:]).clone()
    elif n >= chains:
        links = links[:chains].clone()
    else:
        raise ConfigError(f"start file {path} holds {n} configurations; chains = {chains} needs 1 or at least {chains}")
    if links.is_complex():
        from flowplug.groups import reunitarize

        # files store 32-bit data: project back to the group to double precision
        links = reunitarize(links)
    return links.to(device), str(path)


def _without_option_hints(message: str) -> str:
    """A reader's message without its command-line hints (``--lattice``, ``--group``),
    which ``hmc`` does not take: it has configuration keys instead."""
    import re

    message = re.sub(r"\s*\((?:CLI: )?[^()]*--(?:lattice|group)[^()]*\)", "", message)
    message = re.sub(r";?\s*check --lattice and --group", "", message)
    return message.rstrip(" .;:")


def read_start_file(path: Path, lattice: list[int], group: str | None) -> Any:
    """Read a start file; a bare LIME file (which stores neither) with ``lattice`` and ``group``.

    Arguments:
        path: The file (any readable format).
        lattice: The configuration's ``lattice`` (x first).
        group: The configuration's ``action.group`` (``None`` for actions without one).

    Returns:
        The :class:`flowplug.io.Ensemble`.

    Raises:
        ConfigError: for a bare LIME file that ``lattice`` and ``action.group`` do not
            describe (the message names these keys, the values used and an example).
        FormatError, ChecksumError: from reading any other file.
    """
    from flowplug import io
    from flowplug.errors import FormatError

    if io.detect(path) != "lime":
        return io.read(path)
    keys = (
        "set the configuration keys lattice (the file's 4 extents, x first) and action.group (su3 or "
        "su2), e.g. --set lattice=[4,4,4,4] --set action.group=su3"
    )
    used = f"lattice = {list(lattice)} and action.group = {group!r}"
    if len(lattice) != 4 or not group:
        raise ConfigError(
            f"start = {str(path)!r} is a bare LIME file, which stores neither its lattice nor its "
            f"gauge group; hmc reads it with lattice and action.group (found {used}): {keys}"
        )
    try:
        return io.read(path, lattice=lattice, group=group)
    except FormatError as exc:
        raise ConfigError(
            f"start = {str(path)!r} is a bare LIME file, read with {used}: {_without_option_hints(str(exc))}; {keys}"
        ) from None


def run_hmc(
    cfg: Mapping[str, Any],
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) an HMC job for an effective configuration (:data:`DEFAULT_CONFIG`).

    ``out`` is locked for the run (:func:`flowplug.fsutil.run_lock`); torch runs on
    ``threads`` CPU threads (:func:`flowplug.threads.job_threads`: the caller's setting
    is restored afterwards). Under torchrun every process runs its share of the chains
    (:func:`flowplug.distributed.sharded_job`; rank 0 locks ``out`` and writes the merged
    outputs; the other ranks return ``{"rank", "world_size"}``).

    Arguments:
        cfg: The effective configuration (:func:`flowplug.config.build_config` of
            :data:`DEFAULT_CONFIG`, with ``open_tables=OPEN_TABLES``).
        resume: Continue from ``out/checkpoint.pt`` (the same chain as an uninterrupted run).
        force: Start afresh although ``out`` holds a checkpoint (the earlier run's
            configurations, ``provenance.json`` and measurements are removed first).
        progress: Progress bar (default: ``cfg["progress"]``).
        log: Receives one-line notes (a start file's lattice replacing ``lattice``).

    Returns:
        The figures written to ``out/summary.json``.

    Warns:
        ShortChainWarning: when the chains are too short for the tau_int of an
            observable (:func:`flowplug.jobs.summary.warn_short_chains`).

    Raises:
        ConfigError: on inconsistent settings (unknown integrator, format that cannot hold
            the field, start file of another group, ``trajectories <= thermalization``
            (naming both), ``checkpoint_every < 0``, ``threads < 0``...).
        CheckpointError: on ``resume`` without a checkpoint or with one of another run.
        FlowplugError: when ``out`` holds a checkpoint and neither ``resume`` nor ``force``.
        FormatError: when ``out/ensemble`` holds configuration files of an earlier run
            (``traj_<t>[_chain_<c>].<ext>`` or listed in its ``provenance.json``) and neither
            ``resume`` nor ``force`` (``force`` removes them, never the start file:
            :meth:`flowplug.jobs.output.ChainOutput.start`).
    """
    from flowplug.jobs.chains import job_device
    from flowplug.threads import job_threads

    with distributed.sharded_job("hmc", cfg["out"], job_device(cfg)) as device, job_threads(cfg["threads"]):
        return _run_hmc(cfg, device, resume=resume, force=force, progress=progress, log=log)


def _run_hmc(
    cfg: Mapping[str, Any],
    device: torch.device,
    *,
    resume: bool,
    force: bool,
    progress: bool | None,
    log: Callable[[str], None] | None,
) -> dict[str, Any]:
    """The body of :func:`run_hmc` (inside its lock and thread setting)."""
    from flowplug.config import parse_toml
    from flowplug.jobs.chains import run_chains
    from flowplug.jobs.output import ChainOutput, Configurations, checkpoint_configurations
    from flowplug.jobs.provenance import (
        check_resume_config,
        file_record,
        file_sha256,
        provenance,
        resolve_thermalization,
        resume_start_file,
        stored_run_files,
    )
    from flowplug.jobs.summary import cg_summary, chain_summary, warn_short_chains
    from flowplug.manager import get_plugin_manager
    from flowplug.measure import default_observables, measurement
    from flowplug.theory import action_from_config, check_action_keys

    pm = get_plugin_manager()
    out = Path(str(cfg["out"]))
    total = int(cfg["hmc"]["trajectories"])
    if total < 0:
        raise ConfigError(f"hmc.trajectories must be >= 0; found {total}")
    # the default hmc.thermalization (-1) becomes min(10, trajectories // 2) here, for the whole run
    cfg, therm = resolve_thermalization(
        cfg, key="hmc.thermalization", steps_key="hmc.trajectories", cap=10, out=out, resume=resume
    )
    if resume:  # names every changed key of the chain (the fingerprint stays the final guard)
        check_resume_config(out, cfg, ignore=NON_CHAIN_KEYS, omit_defaults=ADDED_KEYS)
    ckpt = out / distributed.rank_name("checkpoint.pt")
    if any(distributed.all_gather_object(ckpt.exists())) and not resume and not force:
        raise FlowplugError(
            f"{ckpt} exists: continue that run with --resume, or start afresh with --force (or another out)"
        )
    hmc = cfg["hmc"]
    chains = int(cfg["chains"])
    if chains < 1:
        raise ConfigError(f"chains must be >= 1; found {chains}")
    checkpoint_every = int(cfg.get("checkpoint_every", 100))
    if checkpoint_every < 0:
        raise ConfigError(f"checkpoint_every must be >= 0 (0: only after the last); found {checkpoint_every}")
    seed = int(cfg["seed"])
    streams, per, mine, local = distributed.chain_streams(chains, int(cfg.get("streams", 0)))
    if not distributed.is_main():
        log = None
    check_action_keys(cfg, parse_toml(DEFAULT_CONFIG)["action"])
    action = action_from_config(cfg)
    kernel = (
        pm.registry("kernel")
        .get("hmc")
        .factory(
            action,
            integrator=hmc["integrator"],
            steps=int(hmc["steps"]),
            trajectory_length=float(hmc["trajectory_length"]),
        )
    )
    generator = torch.Generator(device=device).manual_seed(seed)
    start = str(cfg["start"])
    start_file: dict[str, Any] | None = None
    if resume and start not in ("cold", "hot"):
        # the chains go on from the checkpoint: the start file is not read (it may have moved or
        # changed since; config.toml holds start as the text it was, run_files.json its record)
        start, _ = resume_start_file(out, start)
        x0, start_desc = checkpoint_configurations(ckpt).to(device), str(Path(start))
    else:
        if start not in ("cold", "hot") and Path(start).is_file():
            start_file = file_record(start, sha256=file_sha256(start))
        # every process draws (or reads) the start of all chains and keeps its own
        x0, start_desc = start_configuration({**cfg, "start": start}, action, chains, generator, device, log)
        x0 = x0[local]
    ndim = len(kernel.space.lattice_of(x0))
    if callable(getattr(action, "take_cg_iterations", None)):  # CG iterations per trajectory and chain
        kernel = CGCounting(kernel, action)
    couplings: dict[str, Any] = getattr(action, "couplings", dict)()
    stated = {"name": str(cfg["action"]["name"]), **couplings}  # what files and provenance record
    names = list(cfg["observables"]) or [
        *default_observables(action.field, ndim),
        *getattr(action, "observables", ()),  # an action's own (fermionic actions: condensate, pion)
    ]
    options = observable_options(cfg, names, list(kernel.space.lattice_of(x0)))
    save_every = int(cfg["save_every"])
    configurations = Configurations(
        out / "ensemble",
        str(cfg["format"]),
        action.field,
        save_every=save_every,
        total=total,
        thermalize=therm,
        name=lambda t, c: f"traj_{t:06d}" + ("" if c is None or chains == 1 else f"_chain_{c:03d}"),
        provenance=lambda t, c: provenance("hmc", seed=seed, step=t, chain=c, action=stated, hmc=dict(hmc)),
        header=lambda t: {"trajectory": t},
        attrs={"action": stated},
        overwrite=True,
        first_chain=local.start,
        pattern=r"traj_\d+(?:_chain_\d+)?",  # the names above: an earlier run's go on --force
        inputs=[] if start in ("cold", "hot") else [Path(start)],  # a start file here is never removed
    )
    configurations.check(x0)
    output = ChainOutput(
        out,
        "hmc",
        checkpoint="checkpoint.pt",
        configurations=configurations,
        measurements=cfg["measurements"],
        step_label="trajectory",
        config=cfg,
        what="hmc",
    )
    output.start(resume=resume, force=force)
    # the start file, for --resume (written with every checkpoint; a resume keeps the stored record)
    files_record = (stored_run_files(out) if resume else None) or {"command": "hmc", "start": start_file}
    show = (bool(cfg["progress"]) if progress is None else progress) and distributed.is_main()
    run_id = run_fingerprint(cfg) + (f"/streams={streams}" if streams > 1 else "")
    if streams > 1:
        split: dict[str, Any] = {
            "sizes": [per] * len(mine),
            "generators": distributed.stream_generators(seed, streams, device),
            "stream_ids": list(mine),
        }
    else:  # one stream: the generator of the start goes on (runs of earlier versions are unchanged)
        split = {"generator": generator}
    t0 = time.perf_counter()
    output.run_files = files_record  # written with every checkpoint, as config.toml
    chain = run_chains(
        kernel,
        x0,
        total,
        **split,
        measure=measurement(action.field, names, couplings=couplings, options=options),
        output=output,
        resume=resume,
        run_id=run_id,
        checkpoint_every=checkpoint_every,
        progress=show,
        desc=f"hmc {action.field}",
        kernel_name="hmc",
        steps_key="hmc.trajectories",
    )
    seconds = time.perf_counter() - t0
    lattice = list(kernel.space.lattice_of(chain.state.x))
    history, records = output.merged(chain)  # every process's chains (collective under torchrun)
    stats = chain_summary(history, burn=therm, lattice=lattice)
    stats["measured_trajectories"] = stats.pop("measured_steps")
    stats.pop("acceptance_by_kernel", None)
    if distributed.is_main():
        warn_short_chains(
            stats.get("observables", {}),
            stats["measured_trajectories"],
            job="hmc",
            steps_key="hmc.trajectories",
            unit="trajectories",
        )
    summary = {
        "trajectories": chain.step_count,
        "chains": chains,
        "thermalization": therm,
        "lattice": lattice,
        "start": start_desc,
        "action": {"name": str(cfg["action"]["name"]), **couplings},
        "hmc": {"integrator": kernel.integrator, "steps": kernel.steps, "trajectory_length": kernel.trajectory_length},
        "seed": seed,
        **stats,
        "seconds_this_run": seconds,
        "threads": torch.get_num_threads(),
        "measurements": str(output.measurements_path),
        "checkpoint": str(output.checkpoint_path),
        "ensemble_format": configurations.format,
        "written": len(records),
        "world_size": distributed.world_size(),
        "device": str(device),
        "streams": streams,
    }
    if "cg_iterations" in history:
        summary["cg"] = cg_summary(history["cg_iterations"])
    if options:
        summary["pion_t"] = int(cfg.get("pion_t", 1))
    return output.finish(chain, summary)
