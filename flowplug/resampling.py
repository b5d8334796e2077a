r"""Exact flow chains over ensembles: the work behind ``flowplug sample``, ``resample``,
``propose`` and ``demo``.

* :func:`build_kernel` turns a ``[kernel]`` configuration table into a kernel: flow
  independence Metropolis, optionally interleaved with HMC (a composition: ``hmc_every``
  trajectories then one flow proposal) or flow-transformed HMC.
* :func:`run_chains` drives B chains with :class:`flowplug.chain.Chain`, measuring
  observables, writing checkpoints (resumable) and configurations as it goes.
* :func:`importance_weights` gives log w = log p - log q of every configuration of an
  ensemble (the inverse flow), with reweighting estimates <O> = sum w O / sum w and the
  ESS (sum w)^2 / (n sum w^2) (DESIGN.md section 3).
* :func:`observable_summary` gives Gamma-method means, errors and tau_int
  (:mod:`flowplug.stats`).
* :func:`check_compatible`, :func:`output_format`, :func:`write_configuration` handle
  files: an input must match the flow's lattice and group; outputs are written
  atomically in the input's format (or the one asked for), never over an input, with
  provenance (input file, its SHA-256, flow checkpoint hash, seed, step) in the file's
  metadata where the format has room for it (ILDG: the ``scidac-record-xml`` record;
  HDF5: per-configuration provenance) and always in ``provenance.json`` beside them.

References:
    Albergo, Kanwar, Shanahan, arXiv:1904.12072, section III; Tierney, Ann. Statist.
    22 (1994) 1701 (independence chains, cycles); Wolff, hep-lat/0306017 (errors).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from flowplug.errors import ConfigError, FormatError

#: Formats that only read: where their configurations are written instead.
READ_ONLY_FALLBACK = {"scidac": "ildg", "lime": "ildg"}


# --------------------------------------------------------------------------- kernels


def build_kernel(flow: Any, action: Any, table: Mapping[str, Any]) -> Any:
    """The kernel described by a ``[kernel]`` table.

    Keys: ``type`` = ``"flow"`` (independence Metropolis; default), ``"flow-hmc"``
    (HMC in the latent space), ``"hmc"`` (plain HMC, the reference); ``hmc_every`` =
    k > 0 puts k HMC trajectories before each flow step (a :class:`Composition`);
    ``hmc`` = sub-table of HMC options (``integrator``, ``steps``, ``trajectory_length``),
    used by plain and latent HMC.

    Raises:
        ConfigError: on an unknown type or bad options.
    """
    from flowplug.plugins.hmc import HMC
    from flowplug.plugins.kernels import Composition, FlowHMC, IndependenceMetropolis

    kind = str(table.get("type", "flow")).lower()
    hmc_opts = dict(table.get("hmc", {}))
    hmc_opts = {k: hmc_opts[k] for k in ("integrator", "steps", "trajectory_length") if k in hmc_opts}
    if kind in ("flow", "independence-metropolis", "im"):
        kernel = IndependenceMetropolis(flow, action)
    elif kind in ("flow-hmc", "latent-hmc"):
        kernel = FlowHMC(flow, action, **hmc_opts)
    elif kind == "hmc":
        kernel = HMC(action, **hmc_opts)
    else:
        raise ConfigError(f"kernel.type {kind!r}: expected 'flow', 'flow-hmc' or 'hmc'")
    k = int(table.get("hmc_every", 0))
    if k < 0:
        raise ConfigError(f"kernel.hmc_every must be >= 0; found {k}")
    if k and kind != "hmc":
        kernel = Composition([HMC(action, **hmc_opts), kernel], [k, 1], labels=["hmc", kind])
    return kernel


# ---------------------------------------------------------------------- compatibility


def check_compatible(ensemble: Any, flow: Any, source: str) -> None:
    """Refuse configurations whose group or lattice differ from the flow's.

    Raises:
        FormatError: naming the file, the flow's and the file's group/lattice and the fix.
    """
    fmt = lambda lat: "x".join(map(str, lat))  # noqa: E731
    if ensemble.group != flow.field:
        raise FormatError(f"{source}: holds {ensemble.group} links but the flow was trained for "
                          f"{flow.field} (use a flow trained for {ensemble.group} on "
                          f"{fmt(ensemble.lattice)})")
    if tuple(ensemble.lattice) != tuple(flow.lattice):
        raise FormatError(f"{source}: lattice is {fmt(ensemble.lattice)} (x first) but the flow was trained "
                          f"on {fmt(flow.lattice)} (train a flow on {fmt(ensemble.lattice)})")


def output_format(input_format: str | None, to: str | None) -> str:
    """The format outputs are written in: ``to`` if given, else the input's (read-only
    SciDAC/bare LIME inputs are written as ILDG).

    Raises:
        FormatError: if the input's format is read-only and has no fallback (MILC native).
        UnknownComponentError: if ``to`` is not registered.
    """
    from flowplug import io
    from flowplug.manager import registry

    if to:
        name = registry("file_format").get(to).name
        if name not in io.formats(writable=True):
            raise FormatError(f"format {name} is read-only; writable formats: {', '.join(io.formats(writable=True))}")
        return name
    if input_format is None:
        return "hdf5"
    if input_format in io.formats(writable=True):
        return input_format
    if input_format in READ_ONLY_FALLBACK:
        return READ_ONLY_FALLBACK[input_format]
    raise FormatError(f"inputs in format {input_format} cannot be written back in that format (read-only); "
                      f"choose one with --to ({', '.join(io.formats(writable=True))})")


def extension_of(fmt: str) -> str:
    """File-name extension used for outputs of a format."""
    from flowplug import io

    return io.get_format(fmt).extension or fmt


def _provenance_xml(prov: Mapping[str, Any]) -> bytes:
    body = "".join(f"<{k}>{html.escape(str(v))}</{k}>" for k, v in prov.items()
                    if isinstance(v, (str, int, float, bool)))
    return ('<?xml version="1.0" encoding="UTF-8"?><info><flowplug>' + body + "</flowplug></info>").encode()


def write_configuration(path: Path, x: torch.Tensor, fmt: str, *, source_meta: Any = None,
                        precision: int = 64, provenance: Mapping[str, Any] | None = None,
                        overwrite: bool = False, inputs: Sequence[Path] = ()) -> Path:
    """Write one configuration (canonical layout, batch of 1) atomically.

    The source's metadata records are carried over (ILDG file XML), the record XML is
    replaced by the provenance (ILDG), HDF5 stores it per configuration.

    Raises:
        FormatError: if ``path`` is one of ``inputs``, exists and ``overwrite`` is false,
            or the format cannot hold the data.
    """
    from flowplug import io

    path = Path(path)
    for p in inputs:
        if path.resolve() == Path(p).resolve():
            raise FormatError(f"{path}: is an input; refusing to overwrite it (choose another output)")
    prov = dict(provenance or {})
    if source_meta is not None:
        meta = source_meta.copy()
        meta.records = [r for r in meta.records if r.type != "scidac-record-xml"]
        meta.checks = []
    else:
        meta = io.Metadata(precision=precision)
    meta.precision = precision
    meta.provenance = {**meta.provenance, **prov}
    meta.records.append(io.Record("scidac-record-xml", _provenance_xml(prov)))
    ens = io.Ensemble(x.detach().cpu(), precision=precision, meta=[meta])
    opts: dict[str, Any] = {}
    if fmt == "ildg":
        opts["lfn"] = f"lfn://flowplug/{path.name}"
    return io.write(path, ens, fmt, precision=precision, overwrite=overwrite, **opts)


# ----------------------------------------------------------------------- statistics


def observable_summary(history: Mapping[str, torch.Tensor], names: Sequence[str], *,
                       burn: int = 0) -> dict[str, dict[str, float]]:
    """Gamma-method mean, error and tau_int of each observable.

    Arguments:
        history: name -> (T, B) tensors (steps x chains), as from
            :meth:`flowplug.chain.Chain.history_tensors`.
        names: Observables to summarise.
        burn: Steps discarded at the start.

    Returns:
        name -> ``{mean, error, tau_int, tau_int_error, n, window}`` (with a ``note`` when
        the window reached half the chain length: then tau_int is a lower bound). If no chain ever changed
        its value (a flow whose proposals are all rejected), error and tau_int cannot be
        estimated: they are NaN and infinity, with ``note`` saying so.
    """
    from flowplug.stats import gamma_method

    out = {}
    for name in names:
        if name not in history:
            continue
        data = history[name][burn:]  # (steps, chains)
        if data.numel() == 0:
            continue
        spread = float((data.amax(0) - data.amin(0)).max())
        if spread <= 1e-12 * max(1.0, float(data.abs().max())):
            out[name] = {"mean": float(data.mean()), "error": math.nan, "tau_int": math.inf,
                         "tau_int_error": math.nan, "n": int(data.numel()),
                         "note": "no chain changed this value: error and tau_int not measurable"}
            continue
        r = gamma_method(data, step_axis=0)
        out[name] = {"mean": r.mean, "error": r.error, "tau_int": r.tau_int,
                     "tau_int_error": r.tau_int_error, "n": r.n, "window": r.window}
        if r.window >= max(data.shape[0] // 2, 1):
            out[name]["note"] = ("the summation window reached half the chain length: tau_int and the "
                                 "error are lower bounds (run longer chains)")
    return out


def importance_weights(flow: Any, action: Any, x: torch.Tensor,
                       measure: Callable[[torch.Tensor], Mapping[str, torch.Tensor]] | None = None,
                       chunk: int = 64) -> dict[str, Any]:
    """Importance weights w = p/q of configurations x and reweighting estimates.

    Arguments:
        flow, action: The flow q and the target p = exp(-S)/Z.
        x: Configurations, canonical layout (B, ...).
        measure: Optional observables for reweighted estimates sum w O / sum w.
        chunk: Batch size for the inverse flow.

    Returns:
        ``{"log_p", "log_q", "log_w"}`` (lists of B floats); ``ess`` = (sum w)^2 /
        (n sum w^2) (DESIGN.md; the flow's ESS when x ~ q); ``ess_p_samples`` =
        n^2 / (sum w sum 1/w), which estimates the same quantity, (E_q w)^2 / E_q w^2 =
        1 / (E_p[w] E_p[1/w]), when x ~ p (an HMC ensemble); ``reweighted`` {name:
        sum w O / sum w}, an estimate of <O>_p when x ~ q (for x ~ p it is biased
        towards regions q under-covers, so the two ESS values are the useful diagnostic).
    """
    from flowplug.stats import ess

    lps, lqs, obs = [], [], {}
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            xb = x[i:i + chunk]
            lps.append(-action.action(xb).to(torch.float64))
            lqs.append(flow.log_prob(xb).to(torch.float64))
            if measure is not None:
                for k, v in measure(xb).items():
                    obs.setdefault(k, []).append(v.to(torch.float64))
    lp, lq = torch.cat(lps), torch.cat(lqs)
    lw = lp - lq
    out: dict[str, Any] = {"log_p": lp.tolist(), "log_q": lq.tolist(), "log_w": lw.tolist(),
                           "ess": float(ess(lw)) if lw.numel() else math.nan, "reweighted": {}}
    if lw.numel():
        c = lw - lw.mean()
        out["ess_p_samples"] = float(lw.numel() ** 2 / (torch.exp(c).sum() * torch.exp(-c).sum()))
    if obs:
        w = torch.exp(lw - lw.max())
        for k, parts in obs.items():
            v = torch.cat(parts)
            out["reweighted"][k] = float((w * v).sum() / w.sum())
    return out


# ------------------------------------------------------------------------ chain runs


def run_chains(kernel: Any, x0: torch.Tensor, steps: int, *, seed: int,
               measure: Callable[[torch.Tensor], Mapping[str, torch.Tensor]] | None = None,
               checkpoint: Path | None = None, resume: bool = False, run_id: str = "",
               on_step: Callable[[Any, dict[str, Any]], None] | None = None,
               checkpoint_every: int = 50, progress: bool = False, desc: str = "") -> Any:
    """Run B chains from x0 for ``steps`` kernel steps; resumable from a checkpoint.

    Arguments:
        kernel: Kernel (``init``/``step``).
        x0: Start configurations (B, ...), canonical layout.
        steps: Total steps per chain (including those done before a resume).
        seed: Seed of the chain's generator.
        measure: Observables measured after every step.
        checkpoint: Checkpoint file (written atomically every ``checkpoint_every`` steps
            and at the end); ``None`` for none.
        resume: Continue from ``checkpoint`` (bit-for-bit the uninterrupted run).
        run_id: Fingerprint of the run's configuration (a resume must match).
        on_step: ``on_step(chain, info)`` after each step (writing configurations, ...).
        progress: tqdm bar.

    Returns:
        The :class:`flowplug.chain.Chain` (history, state, per-kernel acceptances in
        ``chain.extra_acceptance``).

    Raises:
        CheckpointError: on a resume from a missing or foreign checkpoint.
    """
    from flowplug.chain import Chain
    from flowplug.manager import get_plugin_manager

    g = torch.Generator(device=x0.device).manual_seed(int(seed))
    chain = Chain(kernel, kernel.init(x0), g, measure=measure, run_id=run_id)
    if resume and checkpoint is not None:
        chain.load(checkpoint)
    sub: dict[str, list[torch.Tensor]] = {}

    pm = get_plugin_manager()

    def _on_step(ch, info):
        # event hook through notify(): a failing monitor cannot stop the run
        pm.notify("flowplug_after_chain_step", step=ch.step_count - 1, kernel=ch.kernel_name, info=info)
        for k, v in info.items():
            if k.startswith("accepted."):
                sub.setdefault(k[len("accepted."):], []).append(v.detach().to(torch.float64).cpu())
        if on_step is not None:
            on_step(ch, info)

    def _save(ch):
        if checkpoint is not None:
            ch.save(checkpoint)
            pm.notify("flowplug_checkpoint_written", path=str(checkpoint), step=ch.step_count, what="chain")

    remaining = max(int(steps) - chain.step_count, 0)
    if remaining:
        chain.run(remaining, progress=progress, checkpoint_every=checkpoint_every, on_checkpoint=_save,
                  on_step=_on_step, desc=desc)
    chain.extra_acceptance = {k: float(np.nanmean(torch.stack(v).numpy())) for k, v in sub.items()}
    return chain


def fingerprint(config: Mapping[str, Any], *extra: str) -> str:
    """A short hash of a configuration (and extra strings) to tie checkpoints to runs."""
    import hashlib

    text = json.dumps(config, sort_keys=True, default=str) + "|".join(extra)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
