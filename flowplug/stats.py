"""Statistics for Markov chains and importance weights.

``ess`` (effective sample size of importance weights, DESIGN.md section 3). The Gamma
method (``tau_int``, errors) is documented with its functions below.
"""

from __future__ import annotations

import torch


def ess(log_weights: torch.Tensor) -> torch.Tensor:
    r"""Effective sample size per sample, (sum w)^2 / (n sum w^2), with w = p/q.

    Computed from log-weights with the maximum subtracted, so any normalisation
    (an unknown log Z) cancels.

    Arguments:
        log_weights: log p(x_i) - log q(x_i), shape (n,), float64.

    Returns:
        Scalar tensor in (0, 1], float64; 1 when p = q.

    Raises:
        ValueError: if ``log_weights`` is empty.

    References:
        Kong (1992); used for flows in Albergo et al., arXiv:2101.08176, section III.C.
    """
    lw = torch.as_tensor(log_weights, dtype=torch.float64).flatten()
    if lw.numel() == 0:
        raise ValueError("ess of an empty sample")
    lw = lw - lw.max()
    w = torch.exp(lw)
    return w.sum() ** 2 / (lw.numel() * (w**2).sum())
