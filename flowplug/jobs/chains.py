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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from flowplug.errors import ConfigError, FormatError

__all__ = [
    "run_chains",
    "build_kernel",
    "importance_weights",
    "weight_figures",
    "check_compatible",
    "action_override",
    "job_device",
]


def job_device(cfg: Mapping[str, Any], default: str = "cpu") -> str:
    """The ``device`` key of a sampling job's configuration, checked.

    Arguments:
        cfg: The job's effective configuration.
        default: The value when the key is absent (configurations of older runs).

    Returns:
        The device string as given (``"cpu"``, ``"cuda"``, ``"cuda:N"``); under torchrun
        :func:`flowplug.distributed.init_from_env` turns ``"cuda"`` into ``cuda:LOCAL_RANK``.

    Raises:
        ConfigError: for a string torch does not read as a device, a device other than CPU
            and CUDA, or a CUDA device that torch does not see (naming the value).
    """
    value = str(cfg.get("device", default))
    try:
        dev = torch.device(value)
    except RuntimeError as exc:
        raise ConfigError(f"device = {value!r}: {exc}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device = {value!r}: the jobs run on 'cpu' or 'cuda' ('cuda:N'); found a {dev.type} device")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device = {value!r}, but torch sees no CUDA device (torch {torch.__version__})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device = {value!r}, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return value


def run_chains(
    kernel: Any,
    x0: torch.Tensor,
    steps: int,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    measure: Callable[[torch.Tensor], Mapping[str, torch.Tensor]] | None = None,
    output: Any = None,
    resume: bool = False,
    run_id: str = "",
    checkpoint_every: int = 0,
    on_step: Callable[[Any, dict[str, Any]], None] | None = None,
    progress: bool = False,
    desc: str = "",
    kernel_name: str | None = None,
    steps_key: str = "steps",
    sizes: Sequence[int] | None = None,
    generators: Sequence[torch.Generator] | None = None,
    stream_ids: Sequence[int] | None = None,
    start: Callable[[int, torch.Generator], Any] | None = None,
) -> Any:
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
        sizes: Random streams (:mod:`flowplug.chain`, :mod:`flowplug.distributed`): the
            number of chains of each stream (consecutive groups of x0, summing to B);
            ``None``: one stream.
        generators: One generator per stream (with ``sizes``; instead of ``seed`` or
            ``generator``).
        stream_ids: Global indices of the streams (checkpointed; default 0, 1, ...).
        start: Optional ``start(n, generator) -> ChainState``: draws the start states of
            n chains from the given generator (e.g. a kernel's ``start_states``, exact
            draws of its proposal with what it caches, such as the work of a
            non-equilibrium evolution), used instead of ``kernel.init`` of x0. It is
            called once per stream with that stream's generator, before the first step, so
            the draws are the same on any number of processes; x0 then fixes only the
            number of chains and the device. Not called on a resume (the checkpoint holds
            the states).

    Returns:
        The :class:`flowplug.chain.Chain` (state, history of every step, ``step_count``).

    Raises:
        CheckpointError: on a resume from a missing or foreign checkpoint.
        ConfigError: if the checkpoint is already beyond ``steps``, or ``sizes`` and
            ``generators`` do not match each other and x0.
    """
    from flowplug.chain import Chain
    from flowplug.manager import get_plugin_manager

    if sizes is not None:
        if generators is None or len(generators) != len(sizes) or sum(sizes) != x0.shape[0] or min(sizes) < 1:
            raise ConfigError(
                f"run_chains: streams of {list(sizes)} chains need as many generators "
                f"({0 if generators is None else len(generators)} given) and {x0.shape[0]} chains in all, "
                "none empty"
            )
        states, first = [], 0
        for n, gen in zip(sizes, generators, strict=True):  # each stream's state on its own batch
            if start is not None and not resume:
                states.append(start(n, gen))
            else:
                states.append(kernel.init(x0[first : first + n]))
            first += n
        chain = Chain(
            kernel,
            states,
            list(generators),
            measure=measure,
            kernel_name=kernel_name,
            run_id=run_id,
            stream_ids=stream_ids,
        )
    else:
        if generator is None:
            if seed is None:
                raise ConfigError("run_chains needs a seed or a generator")
            generator = torch.Generator(device=x0.device).manual_seed(int(seed))
        state = start(x0.shape[0], generator) if start is not None and not resume else kernel.init(x0)
        chain = Chain(kernel, state, generator, measure=measure, kernel_name=kernel_name, run_id=run_id)
    if resume:
        if output is None:
            raise ConfigError("run_chains: resume needs an output with a checkpoint")
        _check_checkpoint_present(output.checkpoint_path)
        chain.load(output.checkpoint_path)
        _check_same_step(chain.step_count, output.checkpoint_path)
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
        chain.run(
            remaining,
            progress=progress,
            checkpoint_every=int(checkpoint_every),
            on_checkpoint=output.checkpoint if output is not None else None,
            on_step=_after_step,
            hooks=get_plugin_manager(),
            desc=desc,
        )
    return chain


def _check_same_step(step: int, path: Any) -> None:
    """Refuse a sharded resume whose processes' checkpoints are at different steps.

    The processes of a torchrun world write their checkpoints one after the other; a run
    stopped between two of those writes leaves them at different steps, and processes that
    resumed from them would call the collectives of :class:`flowplug.jobs.output.ChainOutput`
    at different steps (a hang or mismatched histories). Collective: every rank calls it.

    Raises:
        CheckpointError: on every rank, naming the steps found (nothing in one process).
    """
    from flowplug import distributed

    steps = [int(s) for s in distributed.all_gather_object(int(step))]
    if len(set(steps)) > 1:
        from flowplug.errors import CheckpointError

        raise CheckpointError(
            f"{path}: the processes' checkpoints are at different steps {steps} (rank order): the run "
            "stopped while they were being written; it cannot be resumed bit for bit from them "
            "(start a new --out)"
        )


def _check_checkpoint_present(path: Any) -> None:
    """Refuse a resume whose checkpoint is missing because another number of processes wrote
    the run (``checkpoint.pt`` of one process, ``checkpoint.rank<r>.pt`` of a torchrun world).

    Raises:
        CheckpointError: naming the checkpoints found and how to resume them.
    """
    import re
    from pathlib import Path

    from flowplug.errors import CheckpointError

    path = Path(path)
    if path.exists():
        return
    base = re.sub(r"\.rank\d+$", "", path.stem)
    ranks = sorted(path.parent.glob(f"{base}.rank*{path.suffix}"))
    single = path.parent / f"{base}{path.suffix}"
    if ranks and path not in ranks:
        found = [q for q in ranks if re.fullmatch(rf"{re.escape(base)}\.rank\d+", q.stem)]
        if found:
            raise CheckpointError(
                f"{path}: no checkpoint of this process, but {len(found)} processes wrote this run "
                f"({', '.join(q.name for q in found)}): resume it under torchrun --nproc_per_node={len(found)} "
                "with the same streams"
            )
    if single.exists() and single != path:
        raise CheckpointError(
            f"{path}: no checkpoint of this process, but one process wrote this run ({single.name}): "
            "resume it in one process (without torchrun)"
        )


# --------------------------------------------------------------------------- kernels


#: Keys of the ``[kernel]`` table that are not options of the kernel's factory.
KERNEL_TABLE_KEYS = ("type", "hmc_every", "hmc", "options")
#: Flow kernels' names: ``type = "flow"`` is independence Metropolis.
DEFAULT_FLOW_KERNEL = "independence-metropolis"


def kernel_type(table: Mapping[str, Any], with_flow: bool) -> str:
    """The kernel a ``[kernel]`` table names, as written (lower case): ``type``, or the default
    (``"flow"`` with a flow, ``"hmc"`` without) when it is empty."""
    return str(table.get("type") or ("flow" if with_flow else "hmc")).strip().lower()


def kernel_name(table: Mapping[str, Any], with_flow: bool) -> str:
    """The name a run's summary records for its kernel: :func:`kernel_type` with ``"flow"``
    spelled as the registered ``independence-metropolis``."""
    name = kernel_type(table, with_flow)
    return DEFAULT_FLOW_KERNEL if name == "flow" else name


def build_kernel(flow: Any, action: Any, table: Mapping[str, Any], *, registry: Any = None) -> Any:
    """The kernel described by a ``[kernel]`` table, built through the kernel registry.

    Keys:
        ``type``: a registered kernel name or alias (``flowplug plugins`` lists them):
            ``"flow"`` / ``"independence-metropolis"`` (default with a flow), ``"flow-hmc"``,
            ``"hmc"`` (default without a flow), or a plugin's kernel.
        ``options``: table of keyword options for the kernel's factory (a plugin
            kernel's own options, e.g. ``kernel.options.step_size = 2.0``).
        ``hmc``: table of HMC options (``integrator``, ``steps``, ``trajectory_length``),
            passed to any factory that takes them (plain and latent HMC) unless
            ``options`` names them.
        ``hmc_every``: k > 0 puts k HMC trajectories before each step of the kernel
            (a ``composition`` kernel; ignored for ``hmc`` itself).

    The factory receives ``action=`` and, if it has such a parameter, ``flow=``; a
    factory whose ``flow`` has a default (``nonequilibrium``: the flow is an optional start
    distribution) gets it only when a flow is given.

    Arguments:
        flow: The flow (:class:`flowplug.flow.Flow`) or ``None`` (no ``--flow``).
        action: The action the chains sample.
        table: The ``[kernel]`` table.
        registry: The kernel registry (default: the process-wide one).

    Returns:
        The kernel (``init``/``step``, :mod:`flowplug.chain`).

    Raises:
        UnknownComponentError: for an unregistered ``type`` (the message lists what exists).
        ConfigError: if the kernel needs a flow and none is given, acts on other field
            kinds than the action's, or rejects its options (message names the kernel
            and the options).
    """
    import inspect

    if registry is None:
        from flowplug.manager import registry as _registry

        registry = _registry("kernel")
    from flowplug.theory import kind_accepted

    name = kernel_type(table, flow is not None)
    spec = registry.get(DEFAULT_FLOW_KERNEL if name == "flow" else name)
    if spec.fields and not kind_accepted(action.field, spec.fields):
        raise ConfigError(
            f"kernel '{spec.name}' updates {', '.join(spec.fields)} fields; the action acts on {action.field}"
        )
    hmc_opts = {
        k: v for k, v in dict(table.get("hmc", {})).items() if k in ("integrator", "steps", "trajectory_length")
    }

    def build(kernel_spec: Any, options: Mapping[str, Any]) -> Any:
        params = inspect.signature(kernel_spec.factory).parameters
        kwargs = {k: v for k, v in hmc_opts.items() if k in params}
        kwargs.update(options)
        # a factory whose flow is optional (nonequilibrium) runs without one
        if "flow" in params and (flow is not None or params["flow"].default is inspect.Parameter.empty):
            if flow is None:
                raise ConfigError(
                    f"kernel '{kernel_spec.name}' proposes from a flow: give --flow CHECKPOINT, "
                    'or choose a kernel without one (e.g. kernel.type = "hmc")'
                )
            kwargs["flow"] = flow
        try:  # options checked against the signature; errors inside the factory stay its own
            inspect.signature(kernel_spec.factory).bind(action=action, **kwargs)
        except TypeError as exc:
            raise ConfigError(
                f"kernel '{kernel_spec.name}' rejects the options {sorted(options) or '{}'} (kernel.options): {exc}"
            ) from None
        return kernel_spec.factory(action=action, **kwargs)

    unknown = set(table) - set(KERNEL_TABLE_KEYS)
    if unknown:
        raise ConfigError(
            f"[kernel] has unknown keys {sorted(unknown)}; a kernel's own options go into [kernel.options]"
        )
    kernel = build(spec, dict(table.get("options", {})))
    k = int(table.get("hmc_every", 0))
    if k < 0:
        raise ConfigError(f"kernel.hmc_every must be >= 0; found {k}")
    if k and spec.name != "hmc":
        hmc = build(registry.get("hmc"), {})
        kernel = registry.get("composition").factory([hmc, kernel], [k, 1], labels=["hmc", name])
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
    if ensemble.field != flow.field:
        raise FormatError(
            f"{source}: holds {ensemble.describe_field()} but the flow was trained for "
            f"{flow.field} (use a flow trained for {ensemble.field} on "
            f"{fmt(ensemble.lattice)})"
        )
    if tuple(ensemble.lattice) != tuple(flow.lattice):
        raise FormatError(
            f"{source}: lattice is {fmt(ensemble.lattice)} (x first) but the flow was trained "
            f"on {fmt(flow.lattice)} (train a flow on {fmt(ensemble.lattice)})"
        )


def stated_action_mismatch(ensemble: Any, target: Mapping[str, Any]) -> tuple[str, str, str | None] | None:
    """Compare the action a file's metadata states with the action a job samples.

    Arguments:
        ensemble: A :class:`flowplug.io.Ensemble`; the stated action is
            ``meta[0].header["action"]`` (a mapping with ``name`` and couplings, set by the
            format adapters, e.g. MILC's Symanzik action read by the ILDG adapter).
        target: The ``[action]`` table the job samples (``name`` and couplings).

    Returns:
        ``None`` when the file states no action, or the same name with the same couplings
        (couplings the target does not name are not compared); else ``(stated, sampled,
        note)``: the stated action as ``"name = ..., beta = ..."``, the sampled one in the
        same keys, and the adapter's ``action_note`` (e.g. about quark flavours) or None.
    """
    stated = ensemble.meta[0].header.get("action") if ensemble.meta else None
    if not isinstance(stated, Mapping) or not stated.get("name"):
        return None
    differ = [k for k in stated if k in target and stated[k] != target[k]]
    if stated.get("name") == target.get("name") and not differ:
        return None
    said = ", ".join(f"{k} = {v}" for k, v in stated.items())
    want = ", ".join(f"{k} = {target[k]}" for k in ("name", *sorted(set(stated) - {"name"})) if k in target)
    note = ensemble.meta[0].header.get("action_note")
    return said, want, (str(note) if note else None)


# ----------------------------------------------------------------------- weights


def importance_weights(
    flow: Any,
    action: Any,
    x: torch.Tensor,
    measure: Callable[[torch.Tensor], Mapping[str, torch.Tensor]] | None = None,
    chunk: int = 64,
) -> dict[str, Any]:
    """Importance weights w = p/q of configurations x and reweighting estimates.

    Arguments:
        flow, action: The flow q and the target p = exp(-S)/Z.
        x: Configurations, canonical layout (B, ...).
        measure: Optional observables for reweighted estimates sum w O / sum w.
        chunk: Batch size for the inverse flow.

    Returns:
        ``{"log_p", "log_q", "log_w"}`` (lists of B floats; log p is NaN, and ``ess``,
        ``ess_p_samples`` are ``None`` and ``reweighted`` empty, for an action with auxiliary
        fields, e.g. pseudofermions, whose ``refresh`` marks that it has no density of x
        alone); ``ess`` = (sum w)^2 /
        (n sum w^2) (DESIGN.md; the flow's ESS when x ~ q); ``ess_p_samples`` =
        n^2 / (sum w sum 1/w), which estimates the same quantity, (E_q w)^2 / E_q w^2 =
        1 / (E_p[w] E_p[1/w]), when x ~ p (an HMC ensemble); ``reweighted`` {name:
        sum w O / sum w}, an estimate of <O>_p when x ~ q (for x ~ p it is biased
        towards regions q under-covers, so the two ESS values are the useful diagnostic);
        with ``measure``, ``observables`` {name: list of B values}.
    """
    lps: list[torch.Tensor] = []
    lqs: list[torch.Tensor] = []
    obs: dict[str, list[torch.Tensor]] = {}
    # an action with auxiliary fields (``refresh``: pseudofermions) has no density of x alone
    marginal = not callable(getattr(action, "refresh", None))
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            xb = x[i : i + chunk]
            if marginal:
                lps.append(-action.action(xb).to(torch.float64))
            else:
                lps.append(torch.full((xb.shape[0],), math.nan, dtype=torch.float64, device=xb.device))
            lqs.append(flow.log_prob(xb).to(torch.float64))
            if measure is not None:
                for k, v in measure(xb).items():
                    obs.setdefault(k, []).append(v.to(torch.float64))
    out = weight_figures(torch.cat(lps), torch.cat(lqs), {k: torch.cat(v) for k, v in obs.items()}, marginal=marginal)
    if obs:
        out["observables"] = {k: torch.cat(v).tolist() for k, v in obs.items()}
    return out


def weight_figures(
    log_p: torch.Tensor,
    log_q: torch.Tensor,
    observables: Mapping[str, torch.Tensor] | None = None,
    *,
    marginal: bool = True,
) -> dict[str, Any]:
    """The reweighting figures of :func:`importance_weights` from log p and log q of n configurations.

    Arguments:
        log_p, log_q: (n,) float64: -S(x) and the flow's log density of each configuration.
        observables: name -> (n,) float64 values O(x), or ``None``.
        marginal: ``False`` for an action with auxiliary fields (no density of x alone):
            then ``ess`` and ``ess_p_samples`` are ``None`` and ``reweighted`` is empty.

    Returns:
        ``{"log_p", "log_q", "log_w", "ess", "reweighted"}`` and, for n > 0,
        ``ess_p_samples`` (see :func:`importance_weights`); used to join the weights of
        configurations that several processes computed (``resample`` under torchrun).
    """
    from flowplug.stats import ess

    lp, lq = log_p.to(torch.float64), log_q.to(torch.float64)
    lw = lp - lq
    out: dict[str, Any] = {
        "log_p": lp.tolist(),
        "log_q": lq.tolist(),
        "log_w": lw.tolist(),
        "ess": float(ess(lw)) if lw.numel() else math.nan,
        "reweighted": {},
    }
    if not marginal:  # no density of x alone (an action with auxiliary fields)
        out.update(ess=None, ess_p_samples=None)
        return out
    if lw.numel():
        c = lw - lw.mean()
        out["ess_p_samples"] = float(lw.numel() ** 2 / (torch.exp(c).sum() * torch.exp(-c).sum()))
    if observables and lw.numel():
        w = torch.exp(lw - lw.max())
        for k, v in observables.items():
            out["reweighted"][k] = float((w * v.to(torch.float64)).sum() / w.sum())
    return out
