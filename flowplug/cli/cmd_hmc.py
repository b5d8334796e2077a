"""``flowplug hmc``: exact HMC ensembles for any registered action, resumable.

``flowplug hmc --config FILE.toml [--set key=value ...] [--resume]`` runs ``chains``
independent HMC chains as one batch and writes to ``out``:

``ensemble/traj_<t>[_chain_<c>].<ext>``
    configurations every ``save_every`` trajectories (after thermalisation) and at the
    end, in ``format`` (gauge fields: any writable file format of :mod:`flowplug.io`,
    hdf5 holding all chains of a trajectory in one file, ildg/nersc/openqcd one
    configuration per file; other field kinds (phi^4, plugins' kinds): a plain HDF5 file
    with dataset ``field`` (chains first) and attributes ``kind`` and ``provenance``;
    ``none`` writes no configurations);
``measurements.h5`` or ``measurements.csv``
    every observable, acceptance and dH per trajectory and chain (HDF5: one dataset per
    name, layout (steps, chains) as in ``Chain.history_tensors()``, stated by its
    attribute ``axes`` = ``"steps,chains"``; give ``step_axis=0`` to :mod:`flowplug.stats`);
``checkpoint.pt``
    state, generator state and history (``torch.save`` of tensors, written atomically);
    ``--resume`` continues from it and gives the same chain as an uninterrupted run
    (also to extend a finished run: raise ``hmc.trajectories`` and resume);
``summary.json``
    ``acceptance``, ``observables.<name>.{mean,error,tau_int,tau_int_error}`` (Gamma
    method, chains as replicas, after ``hmc.thermalization``), ``exp_minus_delta_h``.

``--print-config`` prints the commented default configuration below.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io as _stdio
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from flowplug import config as _config
from flowplug.cli.common import add_config_arguments, config_from_args
from flowplug.fsutil import locked_run
from flowplug.errors import ConfigError, FlowplugError
from flowplug.records import CommandSpec

DEFAULT_CONFIG = """\
# flowplug hmc: exact hybrid Monte Carlo (Duane et al. 1987) for any registered action.
# Every key can be overridden with --set key=value (values are TOML).

seed = 1                # random seed (generator of momenta, accept tests and hot starts)
out = "hmc-out"         # output directory
lattice = [8, 8]        # lattice extents, x first; a start file's own lattice takes precedence
start = "hot"           # "cold" (ordered), "hot" (disordered), or a path to a configuration
                        # or ensemble file in any readable format (ILDG, NERSC, HDF5, ...)
chains = 4              # independent chains, run as one batch
format = "hdf5"         # ensemble format: hdf5, ildg, nersc, openqcd (a writable format), or "none"
save_every = 10         # write configurations and a checkpoint every this many trajectories
measurements = "hdf5"   # per-trajectory measurements: "hdf5" (measurements.h5) or "csv"
observables = []        # observable names; empty: plaquette (+ topological charge where
                        # defined) for gauge fields, magnetization, chi_2, ising_energy for phi^4
device = "cpu"          # torch device
threads = 0             # torch intra-op CPU threads; 0 keeps torch's default (on a busy
                        # machine, or for small lattices, 1 is often much faster)
progress = true         # progress bar with acceptance and plaquette

[action]
name = "wilson"         # a registered action: wilson, phi4, or a plugin's
group = "u1"            # wilson: u1, su2, su3
beta = 2.0              # wilson: inverse coupling
m2 = -4.0               # phi4: bare mass squared (tutorial convention)
lam = 8.0               # phi4: quartic coupling

[hmc]
trajectories = 100      # total trajectories per chain (raise it and --resume to extend a run)
thermalization = 10     # first trajectories left out of summary.json and of the saved ensemble
integrator = "omelyan"  # "leapfrog" or "omelyan" (2MN)
steps = 10              # integration steps per trajectory
trajectory_length = 1.0 # molecular-dynamics time per trajectory
"""

#: Keys that do not change the Markov chain: a run may be resumed with other values.
#: (``observables`` is not among them: the history of a resumed run must stay rectangular.)
_NON_CHAIN_KEYS = {("hmc", "trajectories"), ("progress",), ("save_every",), ("format",), ("threads",),
                   ("measurements",), ("out",), ("hmc", "thermalization")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``flowplug hmc``."""
    add_config_arguments(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue from <out>/checkpoint.pt (same chain as an uninterrupted run)")
    parser.add_argument("--force", action="store_true",
                        help="start afresh even though <out> holds a checkpoint of an earlier run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_fingerprint(cfg: Mapping[str, Any]) -> str:
    """Hash of the configuration keys that determine the chain (for --resume checks)."""
    def strip(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[str, Any]:
        out = {}
        for k, v in tree.items():
            key = prefix + (k,)
            if key in _NON_CHAIN_KEYS:
                continue
            out[k] = strip(v, key) if isinstance(v, Mapping) else v
        return out

    return hashlib.sha256(_config.dumps(strip(cfg)).encode()).hexdigest()[:16]


def _start_configuration(cfg: Mapping[str, Any], action: Any, chains: int, generator: torch.Generator,
                         device: torch.device) -> tuple[torch.Tensor, str]:
    start = str(cfg["start"])
    lattice = [int(n) for n in cfg["lattice"]]
    if start in ("cold", "hot"):
        if not lattice or any(n < 1 for n in lattice):
            raise ConfigError(f"lattice must be a list of positive extents, x first (e.g. [8, 8]); found {lattice}")
        from flowplug.theory import start_field

        return start_field(action, start, lattice, chains, generator=generator, device=device), start
    from flowplug import io

    path = Path(start)
    if not path.exists():
        raise ConfigError(f"start = {start!r}: no such file (use 'cold', 'hot' or a configuration file)")
    ens = io.read(path)
    if ens.group != action.field:
        raise ConfigError(f"start file {path} holds {ens.group} links, but the action acts on "
                          f"{action.field} (set action.group = \"{ens.group}\")")
    if list(ens.lattice) != lattice:
        print(f"flowplug hmc: lattice {'x'.join(map(str, ens.lattice))} taken from {path} "
              f"(the configuration said {'x'.join(map(str, lattice))})", file=sys.stderr)
    links = ens.links
    n = links.shape[0]
    if n == 1:
        links = links.expand(chains, *links.shape[1:]).clone()
    elif n >= chains:
        links = links[:chains].clone()
    else:
        raise ConfigError(f"start file {path} holds {n} configurations; chains = {chains} needs 1 or "
                          f"at least {chains}")
    if links.is_complex():
        from flowplug.groups import reunitarize

        # files store 32-bit data: project back to the group to double precision
        links = reunitarize(links)
    return links.to(device), str(path)


class _Output:
    """Writes configurations, measurements and checkpoints of one run."""

    def __init__(self, cfg: Mapping[str, Any], action: Any, out: Path, seed: int) -> None:
        self.cfg = cfg
        self.action = action
        self.out = out
        self.seed = seed
        self.format = str(cfg["format"]).strip().lower()
        self.meas_format = str(cfg["measurements"]).strip().lower()
        if self.meas_format not in ("hdf5", "csv"):
            raise ConfigError(f"measurements = {cfg['measurements']!r}: choose 'hdf5' or 'csv'")
        self.save_every = int(cfg["save_every"])
        if self.save_every < 0:
            raise ConfigError(f"save_every must be >= 0; found {self.save_every}")
        self.thermalization = int(cfg["hmc"]["thermalization"])
        self.handler = None
        self.ext = ""
        self.written: list[str] = []
        # gauge fields go through flowplug.io; other kinds (scalar, o2, ...) to plain HDF5
        self.gauge = action.field == "u1" or action.field.startswith("su")
        if self.format != "none":
            if not self.gauge:
                if self.format not in ("hdf5", "h5"):
                    raise ConfigError(f"format = {self.format!r}: {action.field} fields are written as "
                                      "hdf5 only (or format = \"none\")")
                self.ext = "h5"
            else:
                from flowplug import io
                from flowplug.manager import registry

                spec = registry("file_format").get(self.format)
                if not spec.writable:
                    raise ConfigError(f"format {spec.name} is read-only; writable formats: "
                                      f"{', '.join(io.formats(writable=True))}")
                self.format = spec.name
                self.handler = io.get_format(spec.name)
                self.ext = spec.extensions[0] if spec.extensions else spec.name

    def check_writable(self, x: torch.Tensor) -> None:
        if self.handler is None:
            return
        from flowplug import io

        reason = self.handler.can_write(io.Ensemble(x[:1].cpu()))
        if reason:
            raise ConfigError(f"format = {self.format!r}: {reason}")

    # ------------------------------------------------------------ ensemble

    def save_configurations(self, step: int, x: torch.Tensor) -> None:
        if self.format == "none" or step <= self.thermalization:
            return
        folder = self.out / "ensemble"
        x = x.detach().cpu()
        prov = {"generator": "flowplug hmc", "trajectory": step, "seed": self.seed,
                "action": self.action.couplings() if hasattr(self.action, "couplings") else {},
                "hmc": dict(self.cfg["hmc"])}
        if not self.gauge:
            import json

            import h5py

            from flowplug.fsutil import _jsonable, atomic_path

            path = folder / f"traj_{step:06d}.h5"
            with atomic_path(path) as tmp:
                with h5py.File(tmp, "w") as f:
                    f.create_dataset("field", data=x.numpy())
                    f.attrs["kind"] = self.action.field
                    f.attrs["layout"] = "field[chain, ...] in flowplug's canonical layout of the kind"
                    f.attrs["provenance"] = json.dumps(_jsonable(prov), sort_keys=True)
            self.written.append(str(path))
            return
        from flowplug import io

        attrs = {"action": getattr(self.action, "couplings", dict)(), "trajectory": step}
        if self.handler.multi:
            meta = [io.Metadata(precision=64, header={"trajectory": step},
                                provenance={**prov, "chain": c}) for c in range(x.shape[0])]
            path = folder / f"traj_{step:06d}.{self.ext}"
            io.write(path, io.Ensemble(x, precision=64, meta=meta, attrs=attrs), self.format,
                     overwrite=True)
            self.written.append(str(path))
            return
        for c in range(x.shape[0]):
            name = f"traj_{step:06d}" + (f"_chain_{c:03d}" if x.shape[0] > 1 else "")
            meta = [io.Metadata(precision=64, header={"trajectory": step},
                                provenance={**prov, "chain": c})]
            path = folder / f"{name}.{self.ext}"
            io.write(path, io.Ensemble(x[c:c + 1], precision=64, meta=meta, attrs=attrs), self.format,
                     overwrite=True)
            self.written.append(str(path))

    # -------------------------------------------------------- measurements

    def measurements_path(self) -> Path:
        return self.out / ("measurements.h5" if self.meas_format == "hdf5" else "measurements.csv")

    def save_measurements(self, history: Mapping[str, torch.Tensor]) -> Path:
        from flowplug.fsutil import atomic_path, atomic_write

        path = self.measurements_path()
        names = list(history)
        t = next(iter(history.values())).shape[0] if history else 0
        if self.meas_format == "hdf5":
            import h5py

            with atomic_path(path) as tmp:
                with h5py.File(tmp, "w") as f:
                    ds = f.create_dataset("trajectory", data=np.arange(1, t + 1, dtype=np.int64))
                    ds.attrs["axes"] = "steps"
                    for name in names:
                        # the layout travels with the data: (steps, chains), step_axis=0 in flowplug.stats
                        ds = f.create_dataset(name, data=history[name].numpy())
                        ds.attrs["axes"] = "steps,chains"
                    f.attrs["layout"] = "<name>[trajectory - 1, chain]"
                    f.attrs["config"] = _config.dumps(self.cfg)
            return path
        buf = _stdio.StringIO()
        w = csv.writer(buf)
        w.writerow(["trajectory", "chain", *names])
        b = history[names[0]].shape[1] if names else 0
        cols = [history[n].numpy() for n in names]
        for i in range(t):
            for c in range(b):
                w.writerow([i + 1, c, *(repr(float(col[i, c])) for col in cols)])
        with atomic_write(path, "w") as fh:
            fh.write(buf.getvalue())
        return path


def summarize(history: Mapping[str, torch.Tensor], thermalization: int) -> dict[str, Any]:
    """summary.json figures from (T, B) histories, dropping the first ``thermalization`` rows."""
    from flowplug.stats import exp_mean, gamma_method

    def cut(name: str) -> np.ndarray:
        return history[name][thermalization:].numpy()

    n = history["accepted"].shape[0] - thermalization if "accepted" in history else 0
    out: dict[str, Any] = {"measured_trajectories": max(n, 0)}
    if n <= 0:
        return out
    out["acceptance"] = float(cut("accepted").mean())
    obs = {}
    for name in history:
        if name in ("accepted", "delta_h"):
            continue
        g = gamma_method(cut(name), step_axis=0)
        obs[name] = {"mean": g.mean, "error": g.error, "tau_int": g.tau_int,
                     "tau_int_error": g.tau_int_error}
    out["observables"] = obs
    if "delta_h" in history:
        dh = cut("delta_h")
        if np.all(np.isfinite(dh)):
            g = exp_mean(-dh, step_axis=0)
            out["exp_minus_delta_h"] = {"mean": g.mean, "error": g.error}
        out["delta_h_mean"] = float(np.nanmean(dh))
    return out


@locked_run("hmc", lambda a: a["cfg"]["out"])
def run_hmc(cfg: Mapping[str, Any], *, resume: bool = False, force: bool = False,
            progress: bool | None = None) -> dict[str, Any]:
    """Run (or resume) ``flowplug hmc`` for an effective configuration; returns the summary.

    Raises:
        ConfigError: on inconsistent settings (unknown integrator, format that cannot hold
            the field, start file of another group, ``trajectories <= thermalization``...).
        CheckpointError: on ``resume`` without a checkpoint or with one of another run.
        FlowplugError: when ``out`` holds a checkpoint and neither ``resume`` nor ``force``.
    """
    from flowplug.chain import Chain
    from flowplug.fsutil import write_summary
    from flowplug.manager import get_plugin_manager
    from flowplug.plugins.observables import default_observables, measurement
    from flowplug.theory import action_from_config

    pm = get_plugin_manager()
    out = Path(str(cfg["out"]))
    ckpt = out / "checkpoint.pt"
    if ckpt.exists() and not resume and not force:
        raise FlowplugError(f"{ckpt} exists: continue that run with --resume, or start afresh with "
                            "--force (or another out)")
    hmc = cfg["hmc"]
    chains = int(cfg["chains"])
    if chains < 1:
        raise ConfigError(f"chains must be >= 1; found {chains}")
    total = int(hmc["trajectories"])
    therm = int(hmc["thermalization"])
    if total < 0 or therm < 0:
        raise ConfigError("hmc.trajectories and hmc.thermalization must be >= 0")
    if total <= therm:
        raise ConfigError(f"hmc.trajectories = {total} leaves nothing after hmc.thermalization = {therm}: "
                          "no trajectory would be measured; raise hmc.trajectories or lower "
                          "hmc.thermalization")
    seed = int(cfg["seed"])
    try:
        device = torch.device(str(cfg["device"]))
    except RuntimeError as exc:
        raise ConfigError(f"device = {cfg['device']!r}: {exc}") from None
    threads = int(cfg["threads"])
    if threads < 0:
        raise ConfigError(f"threads must be >= 0; found {threads}")
    if threads:
        torch.set_num_threads(threads)
    action = action_from_config(cfg)
    kernel = pm.registry("kernel").get("hmc").factory(
        action, integrator=hmc["integrator"], steps=int(hmc["steps"]),
        trajectory_length=float(hmc["trajectory_length"]))
    generator = torch.Generator(device=device).manual_seed(seed)
    x0, start_desc = _start_configuration(cfg, action, chains, generator, device)
    ndim = len(kernel.space.lattice_of(x0))
    names = list(cfg["observables"]) or list(default_observables(action.field, ndim))
    output = _Output(cfg, action, out, seed)
    output.check_writable(x0)
    chain = Chain(kernel, kernel.init(x0), generator, measure=measurement(action.field, names),
                  kernel_name="hmc", run_id=run_fingerprint(cfg))
    if resume:
        chain.load(ckpt)
    if chain.step_count > total:
        raise ConfigError(f"the checkpoint is at trajectory {chain.step_count}, beyond "
                          f"hmc.trajectories = {total}")
    out.mkdir(parents=True, exist_ok=True)

    def on_checkpoint(c: Chain) -> None:
        output.save_configurations(c.step_count, c.state.x)
        output.save_measurements(c.history_tensors())
        c.save(ckpt)
        pm.notify("flowplug_checkpoint_written", path=str(ckpt), step=c.step_count, what="hmc")

    show = bool(cfg["progress"]) if progress is None else progress
    t0 = time.perf_counter()
    remaining = total - chain.step_count
    if remaining > 0:
        chain.run(remaining, progress=show, checkpoint_every=output.save_every,
                  on_checkpoint=on_checkpoint, hooks=pm, desc=f"hmc {action.field}")
    elif not (out / "summary.json").exists():
        on_checkpoint(chain)
    seconds = time.perf_counter() - t0
    history = chain.history_tensors()
    summary = {
        "trajectories": chain.step_count,
        "chains": chains,
        "thermalization": therm,
        "lattice": list(kernel.space.lattice_of(chain.state.x)),
        "start": start_desc,
        "action": {"name": str(cfg["action"]["name"]), **getattr(action, "couplings", dict)()},
        "hmc": {"integrator": kernel.integrator, "steps": kernel.steps,
                "trajectory_length": kernel.trajectory_length},
        "seed": seed,
        **summarize(history, therm),
        "seconds_this_run": seconds,
        "measurements": str(output.measurements_path()),
        "checkpoint": str(ckpt),
        "ensemble_format": output.format,
    }
    write_summary(out, "hmc", summary)
    return summary


def run(args: argparse.Namespace) -> int:
    """Execute ``flowplug hmc``."""
    cfg = config_from_args(args, DEFAULT_CONFIG)
    if cfg is None:
        return 0
    summary = run_hmc(cfg, resume=args.resume, force=args.force,
                      progress=False if args.no_progress else None)
    obs = summary.get("observables", {})
    parts = [f"acceptance {summary.get('acceptance', float('nan')):.3f}"]
    for name, v in obs.items():
        parts.append(f"{name} {v['mean']:.6g} +- {v['error']:.2g} (tau_int {v['tau_int']:.2g})")
    print(f"flowplug hmc: {summary['trajectories']} trajectories x {summary['chains']} chain{'s' if summary['chains'] != 1 else ''}; "
          + "; ".join(parts) + f"; results in {cfg['out']}")
    return 0


COMMAND = CommandSpec(name="hmc", description="exact HMC ensembles (phi4, U(1)/SU(N) Wilson, plugins), resumable",
                      factory=add_arguments, run=run)
