r"""The Metropolis test, defined once for every kernel.

Every accept/reject decision in flowplug goes through :func:`metropolis_test`, and every
log acceptance ratio through :func:`guarded_log_accept` (directly, or through
:func:`independence_log_accept` and :func:`hmc_log_accept`). The rule, in float64:

* A proposal with a non-finite density (log p, log q or the energy H of the proposal
  is NaN, +inf or -inf) is **rejected**: log A = -inf. A density that overflowed or a
  flow whose log-det broke down says nothing trustworthy about the proposal, and an
  accepted proposal with log q = -inf would make log A = +inf at the next step and hold
  the chain there forever.
* A NaN log A (from any other cause) is rejected.
* Otherwise accept if log u < log A, u ~ U(0, 1) in float64; log A = +inf (the current
  state has zero target density, e.g. a start outside the support) accepts any finite
  proposal.

References:
    Metropolis et al., J. Chem. Phys. 21 (1953) 1087; Hastings, Biometrika 57 (1970) 97;
    Tierney, Ann. Statist. 22 (1994) 1701, section 2.3.3 (independence chains);
    Albergo, Kanwar, Shanahan, arXiv:1904.12072, eq. (11).
"""

from __future__ import annotations

import torch

__all__ = ["guarded_log_accept", "independence_log_accept", "hmc_log_accept", "metropolis_test"]

_F64 = torch.float64


def guarded_log_accept(log_accept: torch.Tensor, *proposal_terms: torch.Tensor) -> torch.Tensor:
    """log A with the non-finite rule of the module applied.

    Arguments:
        log_accept: Log acceptance ratios, shape (B,), any real dtype.
        proposal_terms: Quantities of the proposal that must all be finite for it to be
            acceptable (log p, log q, H of the proposal), each (B,) or broadcastable.

    Returns:
        (B,) float64: ``log_accept``, with -inf where it is NaN or where any proposal
        term is non-finite.
    """
    la = log_accept.to(_F64)
    ok = ~torch.isnan(la)
    for term in proposal_terms:
        ok = ok & torch.isfinite(term.to(_F64))
    return torch.where(ok, la, torch.full_like(la, -float("inf")))


def independence_log_accept(
    log_p_new: torch.Tensor, log_q_new: torch.Tensor, log_p_old: torch.Tensor, log_q_old: torch.Tensor
) -> torch.Tensor:
    r"""log A = [log p(x') - log q(x')] - [log p(x) - log q(x)] in float64, guarded.

    Arguments:
        log_p_new, log_q_new: Log-densities of the proposals x', shape (B,).
        log_p_old, log_q_old: Log-densities of the current states x, shape (B,).

    Returns:
        (B,) float64; -inf where log p(x') or log q(x') is non-finite or log A is NaN
        (:func:`guarded_log_accept`).

    References:
        Albergo et al., arXiv:1904.12072, eq. (11); Tierney (1994), section 2.3.3.
    """
    la = (log_p_new.to(_F64) - log_q_new.to(_F64)) - (log_p_old.to(_F64) - log_q_old.to(_F64))
    return guarded_log_accept(la, log_p_new, log_q_new)


def hmc_log_accept(h_old: torch.Tensor, h_new: torch.Tensor) -> torch.Tensor:
    """log A = -(H_new - H_old) = -dH in float64, guarded (-inf where H_new is non-finite).

    Arguments:
        h_old, h_new: Hamiltonians K(p) + S(x) before and after the trajectory, (B,).

    Returns:
        (B,) float64.

    References:
        Duane, Kennedy, Pendleton, Roweth, Phys. Lett. B 195 (1987) 216.
    """
    return guarded_log_accept(-(h_new.to(_F64) - h_old.to(_F64)), h_new)


def metropolis_test(log_accept: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Accept with probability min(1, exp(log A)): draws u ~ U(0,1) (float64), returns log u < log A.

    Arguments:
        log_accept: (B,) log acceptance ratios (guarded again here, so NaN rejects).
        generator: Random generator on the device of ``log_accept`` (one uniform per
            element is drawn, in order, whatever the values).

    Returns:
        (B,) bool.
    """
    la = guarded_log_accept(log_accept)
    return torch.log(_uniform(la.shape, generator, la.device)) < la


def _uniform(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """The u ~ U(0, 1) of :func:`metropolis_test`, float64 (one place, so tests can replay it)."""
    return torch.rand(shape, generator=generator, dtype=_F64, device=device)
