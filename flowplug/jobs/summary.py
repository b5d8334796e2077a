"""Gamma-method summaries of chain histories: the figures every job writes to ``summary.json``.

Chain histories have the layout (steps, chains) (:meth:`flowplug.chain.Chain.history_tensors`,
the datasets of ``measurements.h5``); the chains are replicas of one Markov chain and
errors and tau_int come from :func:`flowplug.stats.gamma_method` with ``step_axis=0``
(Wolff, hep-lat/0306017).

Shared by every chain job (``hmc``, ``sample``, ``resample``; ``demo`` through them):

* :func:`chain_summary` / :func:`observable_summary`: mean, error, tau_int of each
  observable; given the lattice, also the **topological susceptibility**
  chi_t = <Q^2>/V (V = number of sites, lattice units) wherever the topological charge
  Q is measured (:func:`topological_susceptibility`, DESIGN.md section 3);
* :func:`cg_summary`: the conjugate-gradient cost of a fermion run (``summary.json`` ``cg``);
* :func:`warn_short_chains`: one :class:`ShortChainWarning` naming the observables whose
  chains are too short for their tau_int (:data:`MIN_LENGTH_IN_TAU`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from flowplug.chain import KERNEL_INFO_RECORDED
from flowplug.stats import jarzynski

__all__ = [
    "observable_summary",
    "chain_summary",
    "topological_susceptibility",
    "warn_short_chains",
    "short_chain_observables",
    "ShortChainWarning",
    "MIN_LENGTH_IN_TAU",
    "NON_OBSERVABLES",
    "cg_summary",
]

#: A chain shorter than this many tau_int gives an unreliable error: the relative error
#: of tau_int is then about 4 sqrt(tau_int / N) ~ 0.9 for one chain of N = 20 tau_int
#: (Wolff, hep-lat/0306017, eq. (42) with W ~ 4 tau_int), and the error of the mean is
#: uncertain by half of that.
MIN_LENGTH_IN_TAU = 20

#: Name of the derived entry chi_t = <Q^2>/V in ``summary.json`` ``observables``.
SUSCEPTIBILITY = "topological_susceptibility"


class ShortChainWarning(UserWarning):
    """The chains of a run are too short for the tau_int of some observable."""


def _is_bookkeeping(name: str) -> bool:
    return name == "accepted" or name in KERNEL_INFO_RECORDED or name.startswith("accepted.")


#: History entries that are kernel bookkeeping, not observables.
NON_OBSERVABLES = ("accepted", "accepted.<label>", *KERNEL_INFO_RECORDED)


def _array(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def _nan_mean(values: np.ndarray) -> float:
    """Mean over the entries that are not NaN (NaN if there are none)."""
    keep = values[~np.isnan(values)]
    return float(keep.mean()) if keep.size else math.nan


def observable_summary(
    history: Mapping[str, Any], names: Iterable[str] | None = None, *, burn: int = 0
) -> dict[str, dict[str, Any]]:
    """Gamma-method mean, error and tau_int of each observable.

    Arguments:
        history: name -> (T, B) array or tensor (steps x chains), as from
            :meth:`flowplug.chain.Chain.history_tensors` or :func:`flowplug.jobs.output.read_measurements`.
        names: Observables to summarise (missing ones are skipped); default: every
            entry that is not bookkeeping (``accepted``, ``accepted.<label>``, ``delta_h``,
            ``work_proposal``).
        burn: Steps discarded at the start (thermalisation).

    Returns:
        name -> ``{mean, error, tau_int, tau_int_error, n, window}``, with a ``note``
        when the summation window reached half the chain length (then tau_int and the
        error are lower bounds) or when the chains are shorter than
        :data:`MIN_LENGTH_IN_TAU` tau_int (then both are unreliable). If no chain ever
        changed its value (a flow whose proposals are all rejected), error and tau_int
        cannot be estimated: they are NaN and infinity, with ``note`` saying so.
    """
    from flowplug.stats import gamma_method

    if names is None:
        names = [n for n in history if not _is_bookkeeping(n)]
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        if name not in history:
            continue
        data = _array(history[name])[burn:]  # (steps, chains)
        if data.size == 0:
            continue
        spread = float((data.max(0) - data.min(0)).max())
        if spread <= 1e-12 * max(1.0, float(np.abs(data).max())):
            out[name] = {
                "mean": float(data.mean()),
                "error": math.nan,
                "tau_int": math.inf,
                "tau_int_error": math.nan,
                "n": int(data.size),
                "note": "no chain changed this value: error and tau_int not measurable",
            }
            continue
        r = gamma_method(data, step_axis=0)
        out[name] = {
            "mean": r.mean,
            "error": r.error,
            "tau_int": r.tau_int,
            "tau_int_error": r.tau_int_error,
            "n": r.n,
            "window": r.window,
        }
        steps = data.shape[0]
        if r.window >= max(steps // 2, 1):
            out[name]["note"] = (
                "the summation window reached half the chain length: tau_int and the "
                "error are lower bounds (run longer chains)"
            )
        elif steps < MIN_LENGTH_IN_TAU * r.tau_int:
            out[name]["note"] = (
                f"the chains ({steps} steps) are shorter than {MIN_LENGTH_IN_TAU} tau_int: "
                "tau_int and the error are unreliable (run longer chains)"
            )
    return out


def topological_susceptibility(charge: Any, lattice: Sequence[int], *, burn: int = 0) -> dict[str, Any]:
    r"""Topological susceptibility chi_t = <Q^2>/V of chain histories of Q, Gamma method.

    Q^2/V per step and chain is the primary observable, so mean, error and tau_int are
    those of :func:`flowplug.stats.gamma_method` (``step_axis=0``) on it.

    Arguments:
        charge: Topological charge Q, (T, B) array or tensor (steps x chains).
        lattice: Lattice extents; V = their product (number of sites, lattice units).
        burn: Steps discarded at the start (thermalisation).

    Returns:
        ``{mean, error, tau_int, tau_int_error, n, window, volume, definition}`` as in
        :func:`observable_summary` (with its ``note`` where it applies), ``volume`` = V
        and ``definition`` = ``"<Q^2>/V"``; mean * V estimates <Q^2>.

    Raises:
        ValueError: if the lattice is empty or has a non-positive extent.

    References:
        DESIGN.md section 3; for 2D U(1), exact <Q^2> on the torus:
        :func:`flowplug.exact.u1_2d` (Bonati & Rossi, Phys. Rev. D 99 (2019) 054503).
    """
    dims = [int(n) for n in lattice]
    if not dims or any(n < 1 for n in dims):
        raise ValueError(f"lattice {dims}: expected positive extents")
    volume = math.prod(dims)
    q = _array(charge)
    entry = observable_summary({SUSCEPTIBILITY: q * q / volume}, burn=burn)
    if SUSCEPTIBILITY not in entry:
        return {}
    return {**entry[SUSCEPTIBILITY], "volume": volume, "definition": "<Q^2>/V"}


def cg_summary(iterations: Any) -> dict[str, Any]:
    """The conjugate-gradient cost of a run from its history of CG iterations per step and chain.

    Every trajectory of the run counts, thermalisation included (this is the cost of the
    run, not a physical observable); steps recorded without a count (NaN: trajectories of a
    run resumed from a checkpoint of an earlier version) are left out and counted in
    ``trajectories_without_count``.

    Arguments:
        iterations: (T, B) array or tensor (steps x chains): CG iterations of each chain's
            solves in each trajectory (heat bath, forces, the final action; every
            pseudofermion term), as ``cg_iterations`` of the history
            (:class:`flowplug.jobs.hmc.CGCounting`).

    Returns:
        ``{"iterations": total over every trajectory and chain, "trajectories": counted
        trajectories summed over the chains, "per_trajectory": {"mean", "max"} over the
        (trajectory, chain) pairs, "trajectories_without_count"}``; ``per_trajectory``
        values are NaN when nothing was counted.
    """
    data = _array(iterations)
    counted = data[~np.isnan(data)]
    return {
        "iterations": int(counted.sum()),
        "trajectories": int(counted.size),
        "per_trajectory": {
            "mean": float(counted.mean()) if counted.size else math.nan,
            "max": float(counted.max()) if counted.size else math.nan,
        },
        "trajectories_without_count": int(data.size - counted.size),
    }


def chain_summary(
    history: Mapping[str, Any],
    names: Iterable[str] | None = None,
    *,
    burn: int = 0,
    lattice: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The ``summary.json`` figures of a chain run, after dropping ``burn`` steps.

    Arguments:
        history: name -> (T, B) histories with ``accepted`` (and ``delta_h`` for HMC,
            ``accepted.<label>`` for compositions and mixtures of kernels).
        names: Observables (default: every non-bookkeeping entry).
        burn: Thermalisation steps left out.
        lattice: The lattice extents. Given, and with ``topological_charge`` among the
            observables, ``observables`` gains ``topological_susceptibility``
            (:func:`topological_susceptibility`).

    Returns:
        ``measured_steps``; and when that is positive: ``acceptance``,
        ``acceptance_by_kernel`` (label -> acceptance of that part of a composed
        kernel; empty for a single kernel), ``observables`` (:func:`observable_summary`,
        and chi_t), and with ``delta_h``: ``exp_minus_delta_h`` {mean, error} (must be
        1 within errors for exact HMC; absent if some dH is not finite) and ``delta_h_mean``;
        with ``work_proposal`` (non-equilibrium proposals), ``jarzynski``: log(Z/Z_0) with
        its error, the ESS of exp(-W) and E[W] over every proposal's work, thermalisation
        included (the proposals do not depend on the chain; :func:`flowplug.stats.jarzynski`).
    """
    from flowplug.stats import exp_mean

    n = _array(history["accepted"]).shape[0] - burn if "accepted" in history else 0
    out: dict[str, Any] = {"measured_steps": max(n, 0)}
    if n <= 0:
        return out
    out["acceptance"] = float(_array(history["accepted"])[burn:].mean())
    out["acceptance_by_kernel"] = {
        k[len("accepted.") :]: _nan_mean(_array(v)[burn:]) for k, v in history.items() if k.startswith("accepted.")
    }
    names = None if names is None else list(names)
    out["observables"] = observable_summary(history, names, burn=burn)
    if lattice is not None and "topological_charge" in out["observables"]:
        chi = topological_susceptibility(history["topological_charge"], lattice, burn=burn)
        if chi:
            out["observables"][SUSCEPTIBILITY] = chi
    if "delta_h" in history:
        dh = _array(history["delta_h"])[burn:]
        if np.all(np.isfinite(dh)):
            g = exp_mean(-dh, step_axis=0)
            out["exp_minus_delta_h"] = {"mean": g.mean, "error": g.error}
        out["delta_h_mean"] = _nan_mean(dh)
    if "work_proposal" in history:
        # every step draws a fresh, independent evolution per chain: all of them count
        w = torch.as_tensor(_array(history["work_proposal"]), dtype=torch.float64).flatten()
        bad = int((~torch.isfinite(w)).sum())
        if bad:
            out["jarzynski"] = {"note": f"{bad} of {w.numel()} works are not finite: no estimate"}
        elif w.numel() >= 2:
            out["jarzynski"] = jarzynski(w)
    return out


def short_chain_observables(observables: Mapping[str, Mapping[str, Any]], steps: int) -> dict[str, float]:
    """The observables whose chains of ``steps`` steps are too short for their tau_int.

    Too short: the summation window reached half the chain, the chains are shorter than
    :data:`MIN_LENGTH_IN_TAU` tau_int, or no chain moved (tau_int infinite).

    Returns:
        name -> tau_int (in steps), in the order of ``observables``.
    """
    out: dict[str, float] = {}
    for name, entry in observables.items():
        tau = float(entry.get("tau_int", math.nan))
        if math.isnan(tau):
            continue
        if steps < MIN_LENGTH_IN_TAU * tau or "summation window" in str(entry.get("note", "")):
            out[name] = tau
    return out


def warn_short_chains(
    observables: Mapping[str, Mapping[str, Any]], steps: int, *, job: str, steps_key: str = "steps", unit: str = "steps"
) -> str | None:
    """Warn (one :class:`ShortChainWarning`) when the chains are too short for some tau_int.

    Arguments:
        observables: ``summary.json`` ``observables`` (:func:`observable_summary`).
        steps: Measured steps per chain (after thermalisation).
        job: The job's name, to start the message (``hmc``, ``resample``, ...).
        steps_key: The configuration key that sets the chain length, named in the fix.
        unit: What a step is (``trajectories`` for HMC, ``steps`` for flow chains).

    Returns:
        The message, or ``None`` if no observable needed it.
    """
    short = short_chain_observables(observables, steps)
    if not short:
        return None
    taus = ", ".join(
        f"{name} (tau_int {tau:.3g})" if math.isfinite(tau) else f"{name} (no chain moved)"
        for name, tau in short.items()
    )
    need = max((t for t in short.values() if math.isfinite(t)), default=math.nan)
    fix = (
        f"raise {steps_key}: at least {math.ceil(MIN_LENGTH_IN_TAU * need)} {unit} per chain after thermalisation"
        if math.isfinite(need)
        else f"raise {steps_key}"
    )
    message = (
        f"{job}: chains of {steps} {unit} are too short for {taus}: errors and tau_int need chains of "
        f"at least {MIN_LENGTH_IN_TAU} tau_int ({fix})"
    )
    warnings.warn(message, ShortChainWarning, stacklevel=2)
    return message
