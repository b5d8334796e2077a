r"""Figures of merit of a trained flow: ESS, acceptance, free energy, reweighted and chain observables.

Everything is computed in float64 from the log weights of flow samples x ~ q,

    log w(x) = log p(x) - log q(x) = -S(x) - log q(x)      (up to log Z),

shape (n,), float64 (DESIGN.md section 2):

- ``ess`` = (sum w)^2 / (n sum w^2) (:func:`flowplug.stats.ess`);
- ``acceptance`` = the expected acceptance rate of an independence Metropolis chain with
  the flow as proposal, E_{q x q}[min(w, w')] / E_q[w], estimated without random numbers
  (:func:`imh_acceptance_estimate`);
- ``acceptance_chain`` = the accepted fraction of an actual independence Metropolis chain
  over the samples (:func:`imh_chain_states`);
- ``free_energy`` = E_q[log q + S] = F + D(q || p) >= F = -log Z, the variational free
  energy (an upper bound of -log Z; it is *not* a KL divergence, since log Z is unknown);
- observables: reweighted means sum(w O)/sum(w) with delta-method errors, and means over
  the independence Metropolis chain with Gamma-method errors (Wolff, hep-lat/0306017).

The chain is exact for exp(-S)/Z (Albergo et al., arXiv:1904.12072, section IV): accept
x' when log u < log w(x') - log w(x), float64; a sample with a non-finite log weight is
never accepted (it is dropped before the chain runs).

Public API: :func:`evaluate_flow`, :func:`imh_acceptance_estimate`,
:func:`imh_chain_acceptance`, :func:`imh_chain_states`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from flowplug.errors import FlowplugError
from flowplug.flow import Flow
from flowplug.stats import ess as _ess
from flowplug.theory import Action


def imh_acceptance_estimate(log_w: torch.Tensor) -> float:
    r"""Expected acceptance of independence Metropolis with proposal q, from one sample of q.

    With w = p/q (up to a constant) the stationary acceptance rate is
    A = E_{x~p, x'~q}[min(1, w(x')/w(x))] = E_{x, x' ~ q}[min(w, w')] / E_q[w];
    it is estimated by sum_{i != j} min(w_i, w_j) / ((n-1) sum_i w_i), computed in
    O(n log n) after sorting. Deterministic (no random numbers are drawn). Non-finite
    entries are dropped first.

    Arguments:
        log_w: log p(x_i) - log q(x_i) for x_i ~ q, shape (n,), n >= 2 (any real dtype;
            computed in float64).

    Returns:
        The estimate in [0, 1] (1 when q = p; 0 when fewer than two entries are finite).

    Raises:
        ValueError: if fewer than two samples are given.

    References:
        Albergo et al., arXiv:1904.12072, section IV (independence Metropolis with flows).
    """
    lw = torch.as_tensor(log_w, dtype=torch.float64).detach().flatten().cpu()
    n = lw.numel()
    if n < 2:
        raise ValueError("imh_acceptance_estimate needs at least two samples")
    lw = lw[torch.isfinite(lw)] if not torch.isfinite(lw).all() else lw
    if lw.numel() < 2:
        return 0.0
    n = lw.numel()
    w = torch.exp(lw - lw.max())
    ws, _ = torch.sort(w)
    k = torch.arange(n, dtype=torch.float64)
    pair_min = 2.0 * (ws * (n - 1 - k)).sum()
    return float(pair_min / ((n - 1) * w.sum()))


def imh_chain_acceptance(log_w: torch.Tensor, generator: np.random.Generator | int = 0) -> float:
    r"""Acceptance rate of an independence Metropolis chain run over a sequence of flow samples.

    The chain starts at the first sample and proposes the others in order, accepting
    with probability min(1, w'/w) (log u < log w' - log w, float64).

    Arguments:
        log_w: log p - log q of the proposals in order, shape (n,), n >= 2.
        generator: numpy Generator or seed for the uniform numbers.

    Returns:
        Accepted fraction of the n - 1 proposals.

    Raises:
        ValueError: if ``log_w`` is empty.

    References:
        Albergo et al., arXiv:1904.12072, section IV.
    """
    return _moved_fraction(imh_chain_states(log_w, generator))


def _moved_fraction(states: np.ndarray) -> float:
    """Accepted fraction of the proposals 1..n-1 of a chain given by its states, shape (n,)."""
    return float((np.diff(states) != 0).sum()) / max(states.size - 1, 1)


def imh_chain_states(log_w: torch.Tensor, generator: np.random.Generator | int = 0) -> np.ndarray:
    r"""The states of the independence Metropolis chain of :func:`imh_chain_acceptance`.

    Arguments:
        log_w: log p - log q of the proposals in order, shape (n,), n >= 1 (computed in
            float64).
        generator: numpy Generator or seed for the uniform numbers.

    Returns:
        Shape (n,), int64: entry i is the index of the sample the chain holds after
        proposal i (entry 0 is 0). Measuring an observable on ``x[states]`` gives an exact
        Markov chain for exp(-S)/Z (Albergo et al., arXiv:1904.12072, section IV),
        whose error the Gamma method estimates with the rejections' autocorrelation.

    Raises:
        ValueError: if ``log_w`` is empty.
    """
    lw = torch.as_tensor(log_w, dtype=torch.float64).detach().flatten().cpu().numpy()
    if lw.size == 0:
        raise ValueError("imh_chain_states needs at least one log weight")
    rng = generator if isinstance(generator, np.random.Generator) else np.random.default_rng(generator)
    u = np.log(rng.random(max(lw.size - 1, 0)))
    states = np.zeros(lw.size, dtype=np.int64)
    cur = 0
    for i in range(1, lw.size):
        if u[i - 1] < lw[i] - lw[cur]:
            cur = i
        states[i] = cur
    return states


@torch.no_grad()
def evaluate_flow(
    flow: Flow,
    action: Action,
    n_samples: int = 8192,
    *,
    batch_size: int = 1024,
    seed: int = 12345,
    observables: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    r"""Figures of a flow from ``n_samples`` fresh samples (module docstring; float64).

    The flow is put in eval mode. Samples are drawn in batches with a generator of their
    own (seeded by ``seed``, on the flow's device), so the caller's random streams are
    untouched and the figures repeat for a given seed, device and thread count.

    Arguments:
        flow: The flow; ``flow.sample(b, generator) -> (x, log_q)`` with log q shape (b,).
        action: The target action; ``action.action(x) -> (b,)``.
        n_samples: Number of fresh samples.
        batch_size: Samples per forward pass.
        seed: Seed of the sampling generator (and of the chain's uniforms).
        observables: Name -> function of a batch of configurations returning shape (b,);
            their reweighted means sum(w O)/sum(w) are reported as ``<name>``, with the
            delta-method error sqrt(sum w^2 (O - mean)^2)/sum(w) as ``<name>_err``
            (optimistic when the weights are heavy-tailed), and their means over the
            independence Metropolis chain of ``acceptance_chain`` as ``<name>_chain`` with
            the Gamma-method error ``<name>_chain_err`` and ``<name>_chain_tau_int``
            (Wolff, hep-lat/0306017; NaN when the observable is not finite on a chain state).
        progress: Show a tqdm progress bar of the samples drawn (on stderr): ``True``
            always, ``False`` never, ``None`` (default) only when stderr is a terminal.
            A 4D SU(3) evaluation of 8192 samples takes minutes.

    Returns:
        ``ess``, ``acceptance`` (estimate), ``acceptance_chain`` (an independence
        Metropolis chain over the samples), ``free_energy`` (mean of log q + S, an upper
        bound of -log Z), ``n_samples``, ``non_finite`` (samples with a non-finite log
        weight, left out of every figure), and the observables; all Python floats/ints.

    Raises:
        FlowplugError: if every sample has a non-finite log weight.

    References:
        Albergo et al., arXiv:1904.12072 (ESS, independence Metropolis); Albergo et al.,
        arXiv:2101.08176, section III.B (variational free energy); Wolff, hep-lat/0306017.
    """
    flow.eval()
    gen = torch.Generator(device=flow.device)
    gen.manual_seed(int(seed))
    bar = None
    if progress is not False:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=int(n_samples),
            desc="eval",
            unit="sample",
            dynamic_ncols=True,
            disable=None if progress is None else False,
        )
    log_ws: list[torch.Tensor] = []
    obs: dict[str, list[torch.Tensor]] = {k: [] for k in (observables or {})}
    try:
        left = int(n_samples)
        while left > 0:
            b = min(batch_size, left)
            x, log_q = flow.sample(b, gen)
            log_ws.append((-action.action(x).to(torch.float64) - log_q.to(torch.float64)).cpu())
            for k, fn in (observables or {}).items():
                obs[k].append(fn(x).to(torch.float64).cpu())
            left -= b
            if bar is not None:
                bar.update(b)
    finally:
        if bar is not None:
            bar.close()
    log_w = torch.cat(log_ws)
    finite = torch.isfinite(log_w)
    lw = log_w[finite]
    if lw.numel() == 0:
        raise FlowplugError(
            f"evaluate_flow: all {int(n_samples)} samples have non-finite log weights "
            "(the flow or the action gives NaN/Inf)"
        )
    out: dict[str, Any] = {
        "n_samples": int(n_samples),
        "non_finite": int((~finite).sum()),
        "ess": float(_ess(lw)),
        "acceptance": imh_acceptance_estimate(lw),
        "free_energy": float(-lw.mean()),
    }
    states = imh_chain_states(lw, int(seed))
    out["acceptance_chain"] = _moved_fraction(states)
    if obs:
        from flowplug.stats import gamma_method

        w = torch.exp(lw - lw.max())
        for k, vals in obs.items():
            v = torch.cat(vals)[finite]
            mean = (w * v).sum() / w.sum()
            out[k] = float(mean)
            out[k + "_err"] = float(torch.sqrt((w * w * (v - mean) ** 2).sum()) / w.sum())
            series = v.numpy()[states]
            if np.isfinite(series).all():
                g = gamma_method(series)
                out[k + "_chain"], out[k + "_chain_err"], out[k + "_chain_tau_int"] = g.mean, g.error, g.tau_int
            else:
                out[k + "_chain"] = out[k + "_chain_err"] = out[k + "_chain_tau_int"] = float("nan")
    return out
