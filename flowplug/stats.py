"""Statistics for Markov chains and importance weights.

``ess`` (effective sample size of importance weights, DESIGN.md section 3), the
Jarzynski estimate of a free-energy difference from non-equilibrium works
(:func:`jarzynski`), and the
Gamma method with automatic windowing (:func:`gamma_method`, :func:`tau_int`; Wolff,
hep-lat/0306017) for errors of Markov-chain averages.

Layout: one chain is a 1-D array; several chains are a 2-D array together with
``step_axis`` naming its step axis (``step_axis=0`` for (steps, chains), the layout of
:meth:`flowplug.chain.Chain.history_tensors` and of ``measurements.h5``; ``step_axis=1`` for
(chains, steps)). 2-D data without it are refused, since reading one layout as the other
gives a wrong error and tau_int without any sign of it.

Why a small implementation rather than a dependency on pyerrors 2.17 (which implements
the same method): pyerrors pulls pandas, matplotlib, scipy, iminuit, autograd and
numdifftools into every installation, for about a hundred lines of arithmetic that we
need. :func:`gamma_method` follows pyerrors' formulas and defaults (S_tau = 2, Wolff's
bias correction), and ``tests/test_stats.py`` checks it against values
computed with pyerrors and against exact AR(1) autocorrelation times
(``reference/estimators_check.txt``); where pyerrors is importable the test also
compares with it directly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
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


# ------------------------------------------------------------------ Gamma method


@dataclasses.dataclass(frozen=True)
class GammaResult:
    """Result of :func:`gamma_method` for one observable.

    Attributes:
        mean: Sample mean over every chain and step.
        error: Statistical error of the mean, autocorrelations included.
        tau_int: Integrated autocorrelation time at the chosen window, bias corrected
            (Wolff's convention: 0.5 for uncorrelated data).
        tau_int_error: Its statistical error (Wolff eq. (42)).
        error_of_error: Statistical error of ``error``.
        window: The automatically chosen summation window W (0 for constant data).
        n: Total number of measurements N (all chains).
        rho: Normalised autocorrelation function rho(t), t = 0 .. W_max.
    """

    mean: float
    error: float
    tau_int: float
    tau_int_error: float
    error_of_error: float
    window: int
    n: int
    rho: np.ndarray = dataclasses.field(repr=False, compare=False)

    def as_dict(self) -> dict[str, float]:
        """``{mean, error, tau_int, tau_int_error, window, n}`` as plain Python numbers."""
        return {
            "mean": self.mean,
            "error": self.error,
            "tau_int": self.tau_int,
            "tau_int_error": self.tau_int_error,
            "window": self.window,
            "n": self.n,
        }


def _autocov_sum(d: np.ndarray, w_max: int) -> np.ndarray:
    """sum over replicas (rows) of sum_i d[r, i] d[r, i + t], t = 0 .. w_max - 1, by FFT."""
    n = d.shape[1]
    size = 1 << int(2 * n - 1).bit_length()
    f = np.fft.rfft(d, n=size, axis=1)
    ac = np.fft.irfft(f * np.conj(f), n=size, axis=1)[:, :w_max]
    return ac.sum(axis=0)


_LAYOUT_HELP = (
    "pass step_axis=0 for (steps, chains), the layout in which chain histories are stored "
    "(Chain.history_tensors(), measurements.h5), or step_axis=1 for (chains, steps)"
)


def _chains_by_steps(data: Any, step_axis: int | None, who: str) -> np.ndarray:
    """``data`` as a float64 (R, N_r) array (replicas as rows), its step axis given by ``step_axis``.

    1-D data are one chain (``step_axis`` None or 0); 2-D data need ``step_axis`` (0 or 1,
    or -2, -1): which axis counts Markov-chain steps cannot be told from the shape.
    """
    if hasattr(data, "detach"):
        data = data.detach().cpu().numpy()
    a = np.asarray(data, dtype=np.float64)
    if step_axis is not None and (isinstance(step_axis, bool) or not isinstance(step_axis, (int, np.integer))):
        raise ValueError(f"{who}: step_axis must be an axis number (0 or 1); found {step_axis!r}")
    if a.ndim == 1:
        if step_axis not in (None, 0, -1):
            raise ValueError(
                f"{who}: data of shape {a.shape} are one chain with step_axis 0; found step_axis={step_axis}"
            )
        return a[None, :]
    if a.ndim == 2:
        if step_axis is None:
            raise ValueError(
                f"{who}: data of shape {a.shape} have two axes and no step_axis, so which one counts "
                f"steps is unknown: {_LAYOUT_HELP}"
            )
        if step_axis not in (0, 1, -1, -2):
            raise ValueError(
                f"{who}: step_axis must be 0 or 1 for data of shape {a.shape}; found {step_axis}: {_LAYOUT_HELP}"
            )
        return a.T if step_axis in (0, -2) else a
    raise ValueError(f"{who}: expected shape (N,) or two axes with step_axis; found shape {a.shape}")


def gamma_method(data: Any, *, step_axis: int | None = None, s_tau: float = 2.0, center: str = "global") -> GammaResult:
    r"""Mean, error and integrated autocorrelation time by the Gamma method.

    Implements U. Wolff, "Monte Carlo errors with less errors", Comput. Phys. Commun.
    156 (2004) 143, hep-lat/0306017, for a primary observable measured on R independent
    chains (replicas) of equal length N_r:

    * Gamma(t) = sum_r sum_{i} (a_{r,i} - abar)(a_{r,i+t} - abar) / (N - R t), abar the
      mean over all N = R N_r measurements (Wolff's UWerr; ``center="global"``), or
      each replica centred on its own mean (``center="replica"``, what pyerrors does);
    * tau_int(W) = 1/2 + sum_{t=1}^{W} Gamma(t)/Gamma(0);
    * automatic windowing (eq. (52)): the smallest W with
      g(W) = exp(-W/tau) - tau/sqrt(W N) < 0, tau = S_tau / ln[(2 tau_int(W)+1)/(2 tau_int(W)-1)];
    * bias correction tau_int -> tau_int (1 + (2W+1)/N) / (1 + 1/N) (eq. (49));
      error = sqrt(2 tau_int Gamma(0) (1 + 1/N) / N); error of tau_int
      2 tau_int sqrt((W + 1/2 - tau_int)/N) (eq. (42)); error of the error
      error sqrt((W + 1/2)/N).

    These are the formulas and the default S_tau = 2 of pyerrors 2.17
    (``Obs.gamma_method``), so results agree with it to rounding: exactly for one chain,
    and with ``center="replica"`` for several (``tests/test_stats.py`` checks both
    against values pyerrors computed, and against exact AR(1) times). The default for
    several chains is the global mean, as in Wolff's UWerr: with many short chains
    (the batches HMC runs) per-replica centring removes the spread of the chain means
    from Gamma(0) and biases the error low by O(tau_int / N_r).

    Why not depend on pyerrors: it is the same hundred lines of arithmetic, while pyerrors
    pulls pandas, matplotlib, scipy, iminuit, autograd and numdifftools into every
    installation of flowplug; a small tested implementation keeps the dependency set at
    torch, pluggy, numpy, h5py and tqdm.

    Arguments:
        data: Measurements, shape (N,) for one chain, or R chains of N_r steps each as a
            2-D array whose step axis ``step_axis`` names; numpy array, torch tensor or
            nested lists.
        step_axis: Required for 2-D data, refused otherwise except 0: ``0`` for
            (steps, chains), the layout of :meth:`flowplug.chain.Chain.history_tensors`
            and of the datasets in ``measurements.h5``; ``1`` for (chains, steps).
        s_tau: Wolff's S_tau (ratio tau_exp / tau_int guessed by the windowing), 1 to 2.
        center: ``"global"`` (default) or ``"replica"`` (see above).

    Returns:
        :class:`GammaResult`.

    Raises:
        ValueError: for empty data, a non-finite value, data of more than 2 dimensions,
            2-D data without ``step_axis`` (their layout is not known), or an unknown
            ``center``.
    """
    if center not in ("global", "replica"):
        raise ValueError(f"gamma_method: center must be 'global' or 'replica'; found {center!r}")
    a = _chains_by_steps(data, step_axis, "gamma_method")
    if a.size == 0:
        raise ValueError(f"gamma_method: expected shape (N,) or (R, N) with N > 0; found {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("gamma_method: data contain NaN or Inf")
    r, n_r = a.shape
    n = r * n_r
    mean = float(a.mean())
    if n_r < 2:
        # one measurement per chain: no autocorrelation to estimate
        var = float(a.var(ddof=1)) if n > 1 else 0.0
        return GammaResult(mean, float(np.sqrt(var / n)), 0.5, 0.0, 0.0, 0, n, np.ones(1))
    d = a - (mean if center == "global" else a.mean(axis=1, keepdims=True))
    w_max = max(n_r // 2, 1)
    gamma = _autocov_sum(d, w_max + 1) / (n - r * np.arange(w_max + 1))
    if gamma[0] <= 10 * np.finfo(float).tiny * max(1.0, mean * mean):
        return GammaResult(mean, 0.0, 0.5, 0.0, 0.0, 0, n, np.ones(1))
    rho = gamma / gamma[0]
    tau_n = np.cumsum(np.concatenate(([0.5], rho[1:])))
    tau_n = np.where(tau_n <= 0.5, 0.5 + np.finfo(np.float64).eps, tau_n)
    window = w_max
    for w in range(1, w_max + 1):
        tau = s_tau / np.log((2 * tau_n[w] + 1) / (2 * tau_n[w] - 1))
        g = np.exp(-w / tau) - tau / np.sqrt(w * n)
        if g < 0:
            window = w
            break
    tau_int = float(tau_n[window] * (1 + (2 * window + 1) / n) / (1 + 1 / n))
    dtau = float(tau_n[window] * 2 * np.sqrt(abs(window + 0.5 - tau_n[window]) / n))
    error = float(np.sqrt(2 * tau_int * gamma[0] * (1 + 1 / n) / n))
    return GammaResult(mean, error, tau_int, dtau, float(error * np.sqrt((window + 0.5) / n)), int(window), n, rho)


def tau_int(data: Any, *, step_axis: int | None = None, s_tau: float = 2.0) -> float:
    """Integrated autocorrelation time (Wolff's convention) by :func:`gamma_method`.

    ``data`` and ``step_axis`` as there: 2-D data need ``step_axis`` (0 for (steps, chains),
    as histories are stored; 1 for (chains, steps)).
    """
    return gamma_method(_chains_by_steps(data, step_axis, "tau_int"), step_axis=1, s_tau=s_tau).tau_int


def exp_mean(log_values: Any, *, step_axis: int | None = None) -> GammaResult:
    """Gamma-method mean and error of exp(v) for values v, e.g. <exp(-dH)> of HMC.

    ``log_values`` and ``step_axis`` as ``data`` and ``step_axis`` of :func:`gamma_method`:
    2-D values need ``step_axis`` (0 for (steps, chains), as histories are stored).
    """
    return gamma_method(np.exp(_chains_by_steps(log_values, step_axis, "exp_mean")), step_axis=1)


def jarzynski(work: torch.Tensor) -> dict[str, float]:
    r"""Jarzynski estimate of log(Z / Z_0) = log E_F[exp(-W)] from independent works.

    Arguments:
        work: Works W of independent forward evolutions, shape (n,), float64 (n >= 2).

    Returns:
        ``log_ratio`` (log of the mean of exp(-W): an estimate of log Z - log Z_0, biased
        low by O(var / n)), ``error`` (its statistical error by the delta method, with the
        error of the mean of exp(-W) from :func:`flowplug.stats.gamma_method`), ``ess``
        ((sum w)^2 / (n sum w^2), w = exp(-W); :func:`flowplug.stats.ess`),
        ``mean_work`` (E_F[W] >= log Z_0 - log Z; the gap is the KL divergence of the path
        measures), ``n``.

    Raises:
        ValueError: for fewer than two works or a non-finite one.

    ``flowplug sample``/``resample`` with the ``nonequilibrium`` kernel record every
    proposal's work (``work_proposal``) and put this estimate in ``summary.json``.

    References:
        Jarzynski, Phys. Rev. Lett. 78 (1997) 2690; Caselle et al., arXiv:2201.08862,
        section 2 (free energies, ESS and KL of non-equilibrium evolutions).
    """
    w = torch.as_tensor(work, dtype=torch.float64).flatten()
    if w.numel() < 2 or not bool(torch.isfinite(w).all()):
        raise ValueError(
            f"jarzynski: needs >= 2 finite works; found {w.numel()} values, finite: {int(torch.isfinite(w).sum())}"
        )
    shift = float((-w).max())
    e = torch.exp(-w - shift)
    r = gamma_method(e.cpu().numpy())
    return {
        "log_ratio": shift + math.log(r.mean),
        "error": r.error / r.mean,
        "ess": float(ess(-w)),
        "mean_work": float(w.mean()),
        "n": int(w.numel()),
    }
