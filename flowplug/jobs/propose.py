"""The job behind ``flowplug propose``: one exact flow step on a configuration file.

A production code (openQCD, MILC, Grid, Chroma...) writes its current configuration, calls
``flowplug propose`` between two HMC trajectories and continues from the file this job
writes: the proposal if it was accepted, else the current configuration again. The rules
(what is decided here, ``no_decide`` and the production code's own test, fresh seeds, the
flow's inverse check, precision) are those of the command (``flowplug propose --help``,
docs/chains.md).

Public API: :func:`run_propose`, :func:`propose_kernel`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["run_propose", "propose_kernel"]


def propose_kernel(flow: Any, action: Any, name: str | None, options: Mapping[str, Any]) -> tuple[Any, str]:
    """The proposal kernel of ``flowplug propose``, built through the kernel registry.

    Arguments:
        flow: The loaded flow (:class:`flowplug.flow.Flow`).
        action: The flow's target action (:class:`flowplug.theory.Action`).
        name: A registered kernel name (``nonequilibrium``...), ``"flow"`` or ``None`` for
            flow independence Metropolis.
        options: The kernel's options (``n_step``...).

    Returns:
        ``(kernel, registry name)``; the kernel is ``None`` for flow independence Metropolis
        without options, which :class:`flowplug.proposal.FlowProposal` builds itself.

    Raises:
        ConfigError: for an option the kernel rejects.
        UnknownComponentError: for an unregistered kernel.
    """
    from flowplug.jobs.chains import DEFAULT_FLOW_KERNEL, build_kernel
    from flowplug.manager import registry

    if not name and not options:
        return None, DEFAULT_FLOW_KERNEL
    key = str(name or DEFAULT_FLOW_KERNEL).strip().lower()
    spec = registry("kernel").get(DEFAULT_FLOW_KERNEL if key == "flow" else key)
    if spec.name == DEFAULT_FLOW_KERNEL and not options:
        return None, spec.name
    return build_kernel(flow, action, {"type": spec.name, "options": dict(options)}), spec.name


def run_propose(
    flow: str | Path,
    current: str | Path,
    out: str | Path,
    *,
    to: str | None = None,
    seed: int | None = None,
    decide: bool = True,
    kernel: str | None = None,
    kernel_options: Mapping[str, Any] | None = None,
    precision: int | None = None,
    force: bool = False,
    input_format: str | None = None,
    lattice: str | None = None,
    group: str | None = None,
    verify: bool = True,
    check_inverse: bool = True,
    device: str = "cpu",
) -> dict[str, Any]:
    """Read ``current``, make one exact flow step (or only the proposal), write ``out``.

    Arguments:
        flow: What ``flowplug train`` wrote (run directory or ``checkpoint.pt``).
        current: The production code's current configuration (one configuration, any
            readable format).
        out: The next configuration, written atomically in the format of ``current``
            (``to`` to change), at its precision (``precision`` 32 or 64 to change); never
            over ``current``; an existing file only with ``force``.
        seed: Random seed; ``None`` draws fresh entropy (returned as ``seed``).
        decide: ``False`` writes the proposal and returns both log q values with
            ``accepted = None`` (the production code decides with its own action);
            a proposal with a non-finite log q is rejected here (``accepted = False``, a
            ``reason``, ``out`` = the current configuration).
        kernel, kernel_options: Another proposal kernel (:func:`propose_kernel`).
        input_format, lattice, group, verify: How to read ``current``
            (:func:`flowplug.io.read`).
        check_inverse: Refuse a flow whose inverse fails the round-trip check
            (:func:`flowplug.flowtools.check_inverse`).
        device: Torch device of the flow and of the step (``"cpu"``, ``"cuda"``, ``"cuda:N"``);
            the file is read and written on the CPU. The random numbers of a seed differ
            between CPU and CUDA.

    Returns:
        The command's JSON line as a dict: ``accepted``, the log p / log q values of the
        current configuration and the proposal (log q alone without ``decide``),
        ``delta_S``, ``log_accept``, ``seed``, ``out``, ``format``, ``kernel`` (when one was
        given), ``inverse_check``, and ``file_action`` when the file's metadata states an
        action other than the flow's (:func:`flowplug.jobs.chains.stated_action_mismatch`;
        with ``decide`` a :class:`~flowplug.errors.CouplingMismatchWarning` says the step
        is exact for the flow's action, not the file's).

    Raises:
        FormatError: for a file that cannot be read, holds several configurations, or a
            format that cannot be written.
        ConfigError: for a configuration of another lattice or group than the flow's, a
            bad kernel option, or a device torch cannot use (naming it).
        CheckpointError, InverseCheckError: for a flow that cannot be used.
        OutputExistsError: when ``out`` exists and ``force`` is not given.
    """
    import warnings

    import torch

    from flowplug import io
    from flowplug.errors import CouplingMismatchWarning
    from flowplug.flowtools import file_sha256, open_flow
    from flowplug.fsutil import remove_stale_temp_files
    from flowplug.jobs.chains import check_compatible, job_device, stated_action_mismatch
    from flowplug.jobs.output import output_format, write_configuration
    from flowplug.proposal import FlowProposal

    ck = open_flow(flow, device=job_device({"device": device}), check_inverse=check_inverse)
    src = Path(current)
    ens = io.read(src, input_format, lattice=lattice, group=group, verify=verify)
    if len(ens) != 1:
        raise io.FormatError(
            f"{src}: holds {len(ens)} configurations; propose takes one (use flowplug resample for ensembles)"
        )
    check_compatible(ens, ck.flow, str(src))
    mismatch = stated_action_mismatch(ens, ck.action_config)
    if mismatch is not None and decide:
        said, want, note = mismatch
        warnings.warn(
            f"{src}: the file states the action {said}; this step is decided with the flow's action {want}, "
            "so it leaves that action's distribution invariant, not the file's: inside a production chain of "
            "the stated action, call propose with --no-decide and let the production code decide with its "
            "own action" + (f" ({note})" if note and "quark" in note else ""),
            CouplingMismatchWarning,
            stacklevel=2,
        )
    fmt = output_format(ens.meta[0].format, to)
    target = ck.action()
    built, kernel_name = propose_kernel(ck.flow, target, kernel, kernel_options or {})
    action = target if decide else None
    prop = FlowProposal(ck.flow, action, layout="canonical", seed=seed, kernel=built)
    x = ens.links
    prov = {
        "command": "propose",
        "input": str(src),
        "input_sha256": file_sha256(src),
        "flow": str(flow),
        "flow_sha256": ck.sha256,
        "seed": prop.seed,
    }
    if not decide:
        x1, lq0, lq1 = prop.propose(x)
        line: dict[str, Any] = {"accepted": None, "log_q_current": float(lq0[0]), "log_q_proposal": float(lq1[0])}
        nxt = x1
        prov["result"] = "proposal (decision left to the production code)"
        if not (math.isfinite(line["log_q_current"]) and math.isfinite(line["log_q_proposal"])):
            # no production action can make this proposal acceptable (flowplug.metropolis):
            # decided here, and OUT is the current configuration
            line["accepted"] = False
            line["reason"] = "non-finite log q: rejected without the production action"
            nxt = x
            prov["result"] = "rejected: non-finite log q; current configuration"
    else:
        nxt, res = prop.step(x)
        line = res.as_dict()
        prov["result"] = "accepted proposal" if line["accepted"] else "rejected: current configuration"
    remove_stale_temp_files(Path(out))  # left by an interrupted earlier call
    write_configuration(
        Path(out),
        torch.as_tensor(nxt),
        fmt,
        source_meta=ens.meta[0],
        precision=precision or ens.precision,
        provenance=prov,
        overwrite=force,
        inputs=[src],
        field=ens.field,
    )
    line.update({"seed": prop.seed, "out": str(out), "format": fmt})
    if mismatch is not None:
        line["file_action"] = mismatch[0]  # the action the file's metadata states (differs from the flow's)
    if built is not None:
        line["kernel"] = kernel_name
    assert ck.inverse_check is not None  # open_flow always runs the check
    line["inverse_check"] = {
        k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
        for k, v in {**ck.inverse_check.as_dict(), "enforced": check_inverse}.items()
    }
    return line
