"""Gamma-method summaries of chain histories: the figures every job writes to ``summary.json``.

Chain histories have the layout (steps, chains) (:meth:`flowplug.chain.Chain.history_tensors`,
the datasets of ``measurements.h5``); the chains are replicas of one Markov chain and
errors and tau_int come from :func:`flowplug.stats.gamma_method` with ``step_axis=0``
(Wolff, hep-lat/0306017).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import numpy as np
import torch

__all__ = ["observable_summary", "chain_summary", "NON_OBSERVABLES"]


def _is_bookkeeping(name: str) -> bool:
    return name in ("accepted", "delta_h") or name.startswith("accepted.")


#: History entries that are kernel bookkeeping, not observables.
NON_OBSERVABLES = ("accepted", "accepted.<label>", "delta_h")


def _array(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def _nan_mean(values: np.ndarray) -> float:
    """Mean over the entries that are not NaN (NaN if there are none)."""
    keep = values[~np.isnan(values)]
    return float(keep.mean()) if keep.size else math.nan


def observable_summary(history: Mapping[str, Any], names: Iterable[str] | None = None, *,
                       burn: int = 0) -> dict[str, dict[str, Any]]:
    """Gamma-method mean, error and tau_int of each observable.

    Arguments:
        history: name -> (T, B) array or tensor (steps x chains), as from
            :meth:`flowplug.chain.Chain.history_tensors` or :func:`flowplug.jobs.output.read_measurements`.
        names: Observables to summarise (missing ones are skipped); default: every
            entry that is not bookkeeping (``accepted``, ``accepted.<label>``, ``delta_h``).
        burn: Steps discarded at the start (thermalisation).

    Returns:
        name -> ``{mean, error, tau_int, tau_int_error, n, window}``, with a ``note``
        when the summation window reached half the chain length (then tau_int and the
        error are lower bounds). If no chain ever changed its value (a flow whose
        proposals are all rejected), error and tau_int cannot be estimated: they are
        NaN and infinity, with ``note`` saying so.
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
            out[name] = {"mean": float(data.mean()), "error": math.nan, "tau_int": math.inf,
                         "tau_int_error": math.nan, "n": int(data.size),
                         "note": "no chain changed this value: error and tau_int not measurable"}
            continue
        r = gamma_method(data, step_axis=0)
        out[name] = {"mean": r.mean, "error": r.error, "tau_int": r.tau_int,
                     "tau_int_error": r.tau_int_error, "n": r.n, "window": r.window}
        if r.window >= max(data.shape[0] // 2, 1):
            out[name]["note"] = ("the summation window reached half the chain length: tau_int and the "
                                 "error are lower bounds (run longer chains)")
    return out


def chain_summary(history: Mapping[str, Any], names: Iterable[str] | None = None, *,
                  burn: int = 0) -> dict[str, Any]:
    """The ``summary.json`` figures of a chain run, after dropping ``burn`` steps.

    Arguments:
        history: name -> (T, B) histories with ``accepted`` (and ``delta_h`` for HMC,
            ``accepted.<label>`` for compositions and mixtures of kernels).
        names: Observables (default: every non-bookkeeping entry).
        burn: Thermalisation steps left out.

    Returns:
        ``measured_steps``; and when that is positive: ``acceptance``,
        ``acceptance_by_kernel`` (label -> acceptance of that part of a composed
        kernel; empty for a single kernel), ``observables`` (:func:`observable_summary`),
        and with ``delta_h``: ``exp_minus_delta_h`` {mean, error} (must be 1 within
        errors for exact HMC; absent if some dH is not finite) and ``delta_h_mean``.
    """
    from flowplug.stats import exp_mean

    n = _array(history["accepted"]).shape[0] - burn if "accepted" in history else 0
    out: dict[str, Any] = {"measured_steps": max(n, 0)}
    if n <= 0:
        return out
    out["acceptance"] = float(_array(history["accepted"])[burn:].mean())
    out["acceptance_by_kernel"] = {k[len("accepted."):]: _nan_mean(_array(v)[burn:])
                                   for k, v in history.items() if k.startswith("accepted.")}
    out["observables"] = observable_summary(history, names, burn=burn)
    if "delta_h" in history:
        dh = _array(history["delta_h"])[burn:]
        if np.all(np.isfinite(dh)):
            g = exp_mean(-dh, step_axis=0)
            out["exp_minus_delta_h"] = {"mean": g.mean, "error": g.error}
        out["delta_h_mean"] = _nan_mean(dh)
    return out
