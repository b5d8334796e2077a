"""PNG reports of Markov-chain runs (matplotlib, Agg backend, written atomically).

The ``report.png`` of the chain jobs (:class:`flowplug.jobs.output.ChainOutput`) and of
``flowplug demo``. :func:`chain_report` draws, for each observable, its history (chain
mean and a few single chains) and its normalised autocorrelation function rho(t) with the
Gamma-method window; and the running acceptance. :func:`comparison_report` (``flowplug demo``) puts
several runs side by side against exact values (1-sigma error bars), with tau_int of Q in
each sampler's own steps (HMC trajectories, flow proposals; linear axis from zero), Q
histories in separate panels, and the seconds per independent sample of Q; a run whose
topological charge is frozen has its tau_int(Q) and cost drawn as lower bounds (hatched,
labelled ">=").

If matplotlib is missing, the functions warn and return ``None``; the numbers are in
``summary.json`` either way.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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


def _write(fig: Any, path: str | Path) -> Path:
    """Write the PNG atomically and close the figure."""
    import matplotlib.pyplot as plt

    from flowplug.fsutil import atomic_write

    path = Path(path)
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)
    return path


def _finish(fig: Any, path: str | Path, title: str | None) -> Path:
    """Add the title, lay out, write the PNG atomically and close the figure."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _write(fig, path)


def chain_report(
    path: str | Path,
    history: Mapping[str, torch.Tensor],
    names: Sequence[str],
    *,
    title: str = "",
    acceptance: Mapping[str, float] | None = None,
    weights: Sequence[float] | None = None,
    first_step: int = 1,
) -> Path | None:
    """Histories, autocorrelation functions and acceptance of a run, as one PNG.

    Arguments:
        path: Output PNG.
        history: name -> (T, B) float64 tensors (steps x chains), with ``accepted``.
        names: Observables to draw.
        title: Figure title.
        acceptance: Acceptance per kernel, shown in the acceptance panel's legend.
        weights: log importance weights of input configurations, drawn as a histogram.
        first_step: The run's number of the history's first row (steps count from 1; after
            ``thermalize`` steps left out, ``thermalize + 1``): the step axes show the run's steps.

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
        steps = np.arange(first_step, first_step + len(h))
        ax = axes[i][0]
        for c in range(min(h.shape[1], 3)):
            ax.plot(steps, h[:, c], lw=0.6, alpha=0.6)
        ax.plot(steps, h.mean(axis=1), color="k", lw=1.2, label="mean over chains")
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
        ax.plot(
            np.arange(first_step, first_step + len(a)),
            np.cumsum(a) / np.arange(1, len(a) + 1),
            label="running acceptance",
        )
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


#: Axis labels of the observables of :func:`comparison_report` (mathtext): physics name, units.
OBSERVABLE_LABELS = {
    "plaquette": r"$\langle P\rangle = \langle \mathrm{Re}\,U_P\rangle$ (dimensionless)",
    "q2": r"$\langle Q^2\rangle$ (Q: topological charge, an integer)",
}

#: Panel titles of the observables of :func:`comparison_report`.
OBSERVABLE_TITLES = {
    "plaquette": r"plaquette $\langle P\rangle$",
    "q2": r"topological charge squared $\langle Q^2\rangle$",
}

#: Longest Q history drawn point by point in :func:`comparison_figure`; longer ones are thinned.
MAX_HISTORY_POINTS = 4000

#: Caption of the comparison figure: what the error bars and the time units are.
COMPARISON_CAPTION = (
    r"Error bars: 1$\sigma$ statistical errors (Gamma method, Wolff hep-lat/0306017). "
    r"$\tau_\mathrm{int}$ is in units of each sampler's own step (HMC: trajectory; flow: "
    "Metropolis proposal). Cost per independent Q = wall time per step "
    r"$\times\ 2\tau_\mathrm{int}(Q)$, both measured in this run; hatched bars marked $\geq$ are lower "
    "bounds (the sampler's topology is frozen)."
)


def comparison_figure(
    rows: Sequence[Mapping[str, Any]],
    exact: Mapping[str, float],
    histories: Mapping[str, np.ndarray],
    *,
    title: str = "",
) -> Any:
    """The figure of :func:`comparison_report` (a matplotlib ``Figure``; ``None`` without matplotlib).

    Panels, top row: one per observable of ``exact`` (estimates with 1-sigma error bars
    against the exact value), tau_int(Q) per sampler on a linear axis from zero, each bar
    labelled with its step unit; bottom row: the Q history of one chain of each sampler
    in its own panel, x axis in that sampler's steps, and the seconds per independent
    sample of Q. Labels: :data:`OBSERVABLE_LABELS`; caption: :data:`COMPARISON_CAPTION`.

    Arguments:
        rows: One mapping per run: ``label``, ``step`` (its unit of time: ``"trajectory"``,
            ``"proposal"``), per observable ``<name>`` -> {mean, error, tau_int,
            tau_int_error}, ``q`` (the topological charge's entry) and optionally
            ``seconds_per_independent_q`` and ``lower_bound`` (bool: the run is frozen in
            Q, so its tau_int(Q) and cost are lower bounds, drawn hatched with ">=").
        exact: name -> exact value (drawn as a line).
        histories: label -> (T,) topological-charge history of one chain (drawn whole up
            to :data:`MAX_HISTORY_POINTS` steps, thinned evenly beyond).
        title: Figure title.
    """
    plt = _plt()
    if plt is None:
        return None
    names = list(exact) or [n for n in OBSERVABLE_LABELS if any(n in r for r in rows)]
    ncols = max(len(names) + 1, len(histories) + 1, 3)
    fig, axes = plt.subplots(2, ncols, figsize=(4.2 * ncols, 7.6), squeeze=False)
    unit = {r["label"]: str(r.get("step", "step")) for r in rows}
    bounded = {r["label"]: bool(r.get("lower_bound")) for r in rows}
    for ax, name in zip(axes[0], names, strict=False):  # ncols > len(names): the rest are used below
        for j, row in enumerate(rows):
            est = row.get(name)
            if est:
                ok = np.isfinite(est["error"])
                ax.errorbar(
                    [j],
                    [est["mean"]],
                    yerr=[est["error"] if ok else 0],
                    fmt="o",
                    capsize=4,
                    color=f"C{j}",
                    label=rf"{row['label']}: estimate $\pm 1\sigma$" + ("" if ok else " (error not measurable)"),
                )
        if name in exact:
            ax.axhline(exact[name], color="k", ls="--", lw=1, label=f"exact (torus) {exact[name]:.6g}")
        ends = [
            v
            for row in rows
            if row.get(name)
            for v in (
                row[name]["mean"] - np.nan_to_num(row[name]["error"]),
                row[name]["mean"] + np.nan_to_num(row[name]["error"]),
            )
        ]
        ends += [exact[name]] if name in exact else []
        ends = [v for v in ends if np.isfinite(v)]
        if ends:  # the exact line inside, and room for the legend above the points
            lo, hi = min(ends), max(ends)
            span = (hi - lo) or max(abs(hi), 1e-3) * 0.05
            ax.set_ylim(lo - 0.1 * span, hi + 0.6 * span)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r["label"] for r in rows], fontsize=8)
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.set_ylabel(OBSERVABLE_LABELS.get(name, name), fontsize=8)
        ax.set_title(OBSERVABLE_TITLES.get(name, name), fontsize=9)
        ax.legend(fontsize=7, loc="upper center")
    ax = axes[0][len(names)]
    taus = [
        (r["label"], r.get("q", {}).get("tau_int"), r.get("q", {}).get("tau_int_error", 0)) for r in rows if r.get("q")
    ]
    for j, (label, tau, err) in enumerate(taus):
        if tau is not None and np.isfinite(tau) and bounded.get(label):  # frozen: a lower bound, no error bar
            ax.bar([j], [tau], color=f"C{j}", hatch="//", alpha=0.6, label=rf"{label}: $\geq$ (lower bound, frozen)")
            ax.annotate(f">= {tau:.3g}", (j, tau), ha="center", va="bottom", fontsize=8)
        elif tau is not None and np.isfinite(tau):
            ax.bar(
                [j],
                [tau],
                yerr=[err if np.isfinite(err) else 0],
                capsize=4,
                color=f"C{j}",
                label=rf"{label}: per {unit.get(label, 'step')} $\pm 1\sigma$",
            )
            ax.annotate(f"{tau:.3g}", (j, tau + (err if np.isfinite(err) else 0)), ha="center", va="bottom", fontsize=8)
        else:  # no chain moved: tau_int is not measurable
            ax.text(j, 0.5, "not\nmeasurable", ha="center", va="center", fontsize=8, transform=ax.get_xaxis_transform())
    ax.set_xlim(-0.6, len(taus) - 0.4)
    ax.set_xticks(range(len(taus)))
    ax.set_xticklabels([f"{t[0]}\n(per {unit.get(t[0], 'step')})" for t in taus], fontsize=8)
    ax.set_yscale("linear")
    tops = [t + (e if np.isfinite(e) else 0) for _, t, e in taus if t is not None and np.isfinite(t)]
    ax.set_ylim(0, 1.3 * max(tops) if tops else 1)
    ax.set_ylabel(r"$\tau_\mathrm{int}(Q)$ in the sampler's steps", fontsize=8)
    ax.set_title(r"integrated autocorrelation time of Q", fontsize=9)
    if taus:
        ax.legend(fontsize=7)
    for ax in axes[0][len(names) + 1 :]:
        ax.axis("off")
    from matplotlib.ticker import MaxNLocator

    for j, (label, h) in enumerate(histories.items()):
        ax = axes[1][j]
        h = np.asarray(h, dtype=float)
        steps = np.arange(1, len(h) + 1)
        if len(h) > MAX_HISTORY_POINTS:
            keep = np.linspace(0, len(h) - 1, MAX_HISTORY_POINTS).astype(int)
            h, steps = h[keep], steps[keep]
        ax.plot(steps, h, lw=0.8, color=f"C{j}", drawstyle="steps-mid")
        if len(h) and np.all(np.isfinite(h)):  # Q is an integer up to rounding: integer ticks, no offset
            ax.set_ylim(np.floor(h.min()) - 0.5, np.ceil(h.max()) + 0.5)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        frozen = " (frozen)" if bounded.get(label) else ""
        ax.set_title(f"Q history, one {label} chain{frozen}", fontsize=9)
        ax.set_xlabel(f"{label} {unit.get(label, 'step')}", fontsize=8)
        ax.set_ylabel("topological charge Q", fontsize=8)
    ax = axes[1][len(histories)]
    stated = [(r["label"], r.get("seconds_per_independent_q")) for r in rows]
    costs = [(label, c) for label, c in stated if c is not None]
    if costs:
        for j, (label, c) in enumerate(costs):
            if np.isfinite(c) and bounded.get(label):
                ax.bar([j], [c], color=f"C{j}", hatch="//", alpha=0.6)
                ax.annotate(f">= {c:.2g} s (frozen)", (j, c), ha="center", va="bottom", fontsize=8)
            elif np.isfinite(c):
                ax.bar([j], [c], color=f"C{j}")
                ax.annotate(f"{c:.2g} s", (j, c), ha="center", va="bottom", fontsize=8)
            else:
                ax.text(
                    j, 0.5, "not\nmeasurable", ha="center", va="center", fontsize=8, transform=ax.get_xaxis_transform()
                )
        ax.set_xlim(-0.6, len(costs) - 0.4)
        ax.set_xticks(range(len(costs)))
        ax.set_xticklabels([label for label, _ in costs], fontsize=8)
        finite = [c for _, c in costs if np.isfinite(c)]
        ax.set_ylim(0, 1.15 * max(finite) if finite else 1)
        ax.set_ylabel("seconds per independent sample of Q", fontsize=8)
        ax.set_title(r"cost: wall time per step $\times\ 2\tau_\mathrm{int}(Q)$", fontsize=9)
    else:
        ax.axis("off")
    for ax in axes[1][len(histories) + 1 :]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.text(0.5, 0.01, COMPARISON_CAPTION, ha="center", va="bottom", fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def comparison_report(
    path: str | Path,
    rows: Sequence[Mapping[str, Any]],
    exact: Mapping[str, float],
    histories: Mapping[str, np.ndarray],
    *,
    title: str = "",
) -> Path | None:
    """Estimates of several runs against exact values, tau_int of Q, Q histories, cost, as one PNG.

    Arguments:
        path: Output PNG.
        rows, exact, histories, title: See :func:`comparison_figure`.

    Returns:
        The path, or ``None`` without matplotlib.
    """
    fig = comparison_figure(rows, exact, histories, title=title)
    if fig is None:
        return None
    return _write(fig, path)
