r"""The chain driver of every job, and the kernels and weights of flow chains.

* :func:`run_chains` drives B chains of a kernel with :class:`flowplug.chain.Chain`:
  seeding, resume from the checkpoint (refused for another run: the fingerprint of
  :func:`flowplug.jobs.provenance.fingerprint`), thermalisation steps counted in the
  run, measurements after every step, a checkpoint every N steps and at the end,
  events through :meth:`flowplug.manager.PluginManager.notify` (a failing
  monitor cannot stop a run), a progress bar, and the outputs of a
  :class:`flowplug.jobs.output.ChainOutput`. ``hmc``, ``sample`` and ``resample`` run
  their chains through it (``demo`` through them), as does ``benchmarks/chains.py``.
* :func:`build_kernel` turns a ``[kernel]`` configuration table into a kernel: flow
  independence Metropolis, optionally interleaved with HMC (a composition: ``hmc_every``
  trajectories then one flow proposal), flow-transformed HMC, or plain HMC.
* :func:`importance_weights` gives log w = log p - log q of configurations (through
  the inverse flow), with reweighting estimates <O> = sum w O / sum w and the ESS
  (sum w)^2 / (n sum w^2) (DESIGN.md section 3).
* :func:`check_compatible` refuses input configurations whose group or lattice are not
  the flow's.

References:
    Albergo, Kanwar, Shanahan, arXiv:1904.12072, section III; Tierney, Ann. Statist.
    22 (1994) 1701 (independence chains, cycles).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch

from flowplug.errors import ConfigError, FormatError

__all__ = ["run_chains", "build_kernel", "importance_weights", "check_compatible", "action_override"]


def run_chains(kernel: Any, x0: torch.Tensor, steps: int, *, seed: int | None = None,
               generator: torch.Generator | None = None,
               measure: Callable[[torch.Tensor], Mapping[str, torch.Tensor]] | None = None,
               output: Any = None, resume: bool = False, run_id: str = "", checkpoint_every: int = 0,
               on_step: Callable[[Any, dict[str, Any]], None] | None = None, progress: bool = False,
               desc: str = "", kernel_name: str | None = None, steps_key: str = "steps") -> Any:
    """Run B chains from x0 until ``steps`` kernel steps are done; resumable.

    Thermalisation steps are steps of the run (the summary and the outputs leave them
    out: :func:`flowplug.jobs.summary.chain_summary` ``burn``, the ``thermalize`` of
    :class:`flowplug.jobs.output.Configurations`).

    Arguments:
        kernel: Kernel (``init``/``step``, :mod:`flowplug.chain`).
        x0: Start configurations (B, ...), canonical layout.
        steps: Total steps per chain (including those done before a resume).
        seed: Seed of the chains' generator (on the device of x0); or give ``generator``.
        generator: The generator to draw from (a job that drew its hot start from it).
        measure: Observables measured after every step (x -> {name: (B,)}).
        output: :class:`flowplug.jobs.output.ChainOutput` (configurations, measurements,
            checkpoint), or ``None`` (nothing written).
        resume: Continue from ``output``'s checkpoint (bit for bit the uninterrupted run).
        run_id: Fingerprint of the run; a checkpoint of another run is refused.
        checkpoint_every: Checkpoint every this many steps (of the whole run); 0: only
            after the last.
        on_step: ``on_step(chain, info)`` after each step (after ``output``'s).
        progress: tqdm bar with acceptance (and the plaquette, if measured).
        desc: Label of the bar.
        kernel_name: Name sent with ``flowplug_after_chain_step`` (default ``kernel.name``).
        steps_key: The configuration key of ``steps``, for messages.

    Returns:
        The :class:`flowplug.chain.Chain` (state, history of every step, ``step_count``).

    Raises:
        CheckpointError: on a resume from a missing or foreign checkpoint.
        ConfigError: if the checkpoint is already beyond ``steps``.
    """
    from flowplug.chain import Chain
    from flowplug.manager import get_plugin_manager

    if generator is None:
        if seed is None:
            raise ConfigError("run_chains needs a seed or a generator")
        generator = torch.Generator(device=x0.device).manual_seed(int(seed))
    chain = Chain(kernel, kernel.init(x0), generator, measure=measure, kernel_name=kernel_name, run_id=run_id)
    if resume:
        if output is None:
            raise ConfigError("run_chains: resume needs an output with a checkpoint")
        chain.load(output.checkpoint_path)
        if chain.step_count > int(steps):
            raise ConfigError(f"the checkpoint is at step {chain.step_count}, beyond {steps_key} = {steps}")
        output.resumed(chain)

    def _after_step(ch: Any, info: dict[str, Any]) -> None:
        if output is not None:
            output.after_step(ch, info)
        if on_step is not None:
            on_step(ch, info)

    remaining = int(steps) - chain.step_count
    if remaining > 0:
        chain.run(remaining, progress=progress, checkpoint_every=int(checkpoint_every),
                  on_checkpoint=output.checkpoint if output is not None else None, on_step=_after_step,
                  hooks=get_plugin_manager(), desc=desc)
    return chain


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


def action_override(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The non-empty entries of a flow job's ``[action]`` table (``""``/0 = the flow's own)."""
    a = dict(cfg.get("action", {}))
    return {k: v for k, v in a.items() if v not in ("", 0.0, None)}


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


# ----------------------------------------------------------------------- weights


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
