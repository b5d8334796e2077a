"""PNG reports of Markov-chain runs (matplotlib, Agg backend, written atomically).

The ``report.png`` of the chain jobs (:class:`flowplug.jobs.output.ChainOutput`) and of
``flowplug demo``. :func:`chain_report` draws, for each observable, its history (chain
mean and a few single chains) and its normalised autocorrelation function rho(t) with the
Gamma-method window; and the running acceptance. :func:`comparison_report` (``flowplug demo``) puts
several runs side by side against exact values, and their tau_int.

If matplotlib is missing, the functions warn and return ``None``; the numbers are in
``summary.json`` either way.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        warnings.warn("matplotlib is not installed: no PNG report (pip install matplotlib)", stacklevel=3)
        return None
    return plt


def _finish(fig: Any, path: str | Path, title: str | None) -> Path:
    """Add the title, lay out, write the PNG atomically and close the figure."""
    import matplotlib.pyplot as plt

    from flowplug.fsutil import atomic_write

    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)
    return path


def chain_report(path: str | Path, history: Mapping[str, torch.Tensor], names: Sequence[str], *,
                 title: str = "", acceptance: Mapping[str, float] | None = None,
                 weights: Sequence[float] | None = None) -> Path | None:
    """Histories, autocorrelation functions and acceptance of a run, as one PNG.

    Arguments:
        path: Output PNG.
        history: name -> (T, B) float64 tensors (steps x chains), with ``accepted``.
        names: Observables to draw.
        title: Figure title.
        acceptance: Acceptance per kernel, shown in the acceptance panel's legend.
        weights: log importance weights of input configurations, drawn as a histogram.

    Returns:
        The path, or ``None`` without matplotlib.
    """
    plt = _plt()
    if plt is None:
        return None
    from flowplug.stats import gamma_method

    names = [n for n in names if n in history]
    rows = len(names) + 1
    fig, axes = plt.subplots(rows, 2, figsize=(10, 2.6 * rows), squeeze=False)
    for i, name in enumerate(names):
        h = history[name].numpy()
        ax = axes[i][0]
        for c in range(min(h.shape[1], 3)):
            ax.plot(h[:, c], lw=0.6, alpha=0.6)
        ax.plot(h.mean(axis=1), color="k", lw=1.2, label="mean over chains")
        ax.set_ylabel(name)
        ax.set_xlabel("step")
        ax.legend(fontsize=7, loc="best")
        r = gamma_method(h, step_axis=0)
        ax = axes[i][1]
        t = np.arange(len(r.rho))
        ax.plot(t[: max(4 * r.window, 10)], r.rho[: max(4 * r.window, 10)], marker=".", lw=0.8)
        ax.axvline(r.window, color="r", ls="--", lw=0.8, label=f"window W={r.window}")
        ax.axhline(0, color="gray", lw=0.5)
        ax.set_title(f"{name}: {r.mean:.5g} +- {r.error:.2g}, tau_int = {r.tau_int:.2f}", fontsize=9)
        ax.set_xlabel("lag t")
        ax.set_ylabel("rho(t)")
        ax.legend(fontsize=7)
    acc = history.get("accepted")
    ax = axes[-1][0]
    if acc is not None and acc.numel():
        a = acc.numpy().mean(axis=1)
        ax.plot(np.cumsum(a) / np.arange(1, len(a) + 1), label="running acceptance")
        for k, v in (acceptance or {}).items():
            ax.axhline(v, ls=":", lw=0.8, label=f"{k}: {v:.3f}", color="C1")
        ax.set_ylim(0, 1)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    ax = axes[-1][1]
    if weights is not None and len(weights):
        lw = np.asarray(weights, dtype=float)
        ax.hist(lw - lw.max(), bins=min(30, max(5, len(lw) // 2)))
        ax.set_xlabel("log w - max log w (inputs)")
        ax.set_title("importance weights p/q of the input configurations", fontsize=9)
    else:
        ax.axis("off")
    return _finish(fig, path, title)


def comparison_report(path: str | Path, rows: Sequence[Mapping[str, Any]], exact: Mapping[str, float],
                      histories: Mapping[str, np.ndarray], *, title: str = "") -> Path | None:
    """Estimates of several runs against exact values, tau_int of Q, Q histories.

    Arguments:
        path: Output PNG.
        rows: One mapping per run: ``label``, and per observable ``<name>`` ->
            {mean, error, tau_int}.
        exact: name -> exact value (drawn as a line).
        histories: label -> (T,) topological-charge history of one chain.
        title: Figure title.
    """
    plt = _plt()
    if plt is None:
        return None
    names = list(exact)
    fig, axes = plt.subplots(1, len(names) + 2, figsize=(4 * (len(names) + 2), 3.6))
    for ax, name in zip(axes, names):
        for j, row in enumerate(rows):
            est = row.get(name)
            if est:
                ax.errorbar([j], [est["mean"]], yerr=[est["error"]], fmt="o", capsize=4)
        ax.axhline(exact[name], color="k", ls="--", lw=1, label=f"exact {exact[name]:.6g}")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r["label"] for r in rows], fontsize=8, rotation=15)
        ax.set_title(name)
        ax.legend(fontsize=7)
    ax = axes[len(names)]
    taus = [(r["label"], r.get("q", {}).get("tau_int"), r.get("q", {}).get("tau_int_error", 0))
            for r in rows if r.get("q")]
    for j, (_, tau, err) in enumerate(taus):
        if tau is not None and np.isfinite(tau):
            ax.bar([j], [tau], yerr=[err if np.isfinite(err) else 0], capsize=4, color=f"C{j}")
        else:  # no chain moved: tau_int is not measurable
            ax.text(j, 0.5, "not\nmeasurable", ha="center", va="center", fontsize=8,
                    transform=ax.get_xaxis_transform())
    ax.set_xlim(-0.6, len(taus) - 0.4)
    ax.set_xticks(range(len(taus)))
    ax.set_xticklabels([t[0] for t in taus], fontsize=8, rotation=15)
    ax.set_yscale("log")
    ax.set_title("tau_int(Q) per step")
    ax = axes[len(names) + 1]
    for label, h in histories.items():
        ax.plot(np.asarray(h)[:300], lw=0.8, label=label, drawstyle="steps-mid")
    ax.set_title("Q, one chain")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    return _finish(fig, path, title)
