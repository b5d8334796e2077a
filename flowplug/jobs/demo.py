"""The ``demo`` job: 2D U(1), L = 8, beta = 6, where HMC freezes and the flow does not.

:func:`run_demo` (``flowplug demo [--out DIR]``, about 3 minutes on two CPU cores) runs
the other jobs one after the other in sub-directories of DIR and puts HMC and the flow
chains side by side against the exact values. At beta = 6 on 8x8 the topological charge
Q of HMC freezes (tau_int(Q) ~ 10^3 trajectories; topological freezing, as in Kanwar et
al., arXiv:2003.06413), while flow independence-Metropolis chains change sector
at almost every accepted proposal.

1. **HMC ensemble** (:func:`flowplug.jobs.hmc.run_hmc`, ``DIR/hmc/``, a ``flowplug hmc``
   run directory): ``hmc.chains`` chains (Omelyan integrator) from a cold start (Q = 0),
   ``hmc.thermalize`` trajectories of thermalisation, then ``hmc.trajectories``
   trajectories; every ``hmc.save_every`` trajectories (counted from the start) after the
   thermalisation, and at the end, the configurations of all chains are written as files
   (``DIR/hmc/ensemble/traj_<t>.h5``, HDF5 ensemble stores: U(1) fits no ILDG-type
   format). Many chains of a few tau_int(Q) each: on a CPU a batch of hundreds of chains
   gives the cheapest trajectories.
2. **Flow** (:func:`flowplug.jobs.train.run_train`, ``DIR/flow/``, a ``flowplug train``
   run directory usable as ``--flow`` of ``sample``, ``resample`` and ``propose``): the
   best flow of ``examples/train_u1_b6_l8.toml``, one pass of six ``u1-multiscale``
   layers (gauge-equivariant, arXiv:2003.06413; multiscale, arXiv:2404.10819) with the
   large-beta options, trained by :class:`flowplug.train.Trainer` (reverse KL with path
   gradients, cosine schedule; ESS ~0.9 after 800 steps) and evaluated on 1024 fresh
   samples. ``init_beta`` (the layers' initial widths) is the demo's ``beta`` unless
   ``[flow.options]`` sets it.
3. **Resampling** (:func:`flowplug.jobs.resample.run_resample`, ``DIR/resample/``): one
   flow independence-Metropolis chain seeded by every HMC configuration.
4. **Report**: ``DIR/report.txt``, ``DIR/summary.json`` and ``DIR/report.png`` compare
   the plaquette and <Q^2> of both samplers with their exact values on the torus
   (:func:`flowplug.exact.u1_2d`), and tau_int of Q and the seconds per independent
   sample of Q (wall time per step x 2 tau_int(Q)) of HMC and of the flow chains.

Frozen chains (:func:`topology_freezing`): when Q never or rarely changes (fewer than
:data:`MIN_TOPOLOGY_CHANGES` changes per chain), the Gamma-method window of tau_int(Q)
reaches half the chain length, or <Q^2> is more than 3 errors from exact, the report
says the sampler is frozen (topological freezing), prints its tau_int(Q) and seconds per
independent Q as lower bounds (">="), and so the HMC/flow cost ratio as a lower bound;
``summary.json`` has, under ``hmc`` and ``flow``: ``frozen``, ``frozen_reasons``,
``topology_changes``, ``topology_changes_per_chain``, ``tau_int_q``,
``tau_int_q_lower_bound``, ``seconds_per_independent_q`` and
``seconds_per_independent_q_lower_bound``; at the top: ``sigma_from_exact``,
``tau_int_q_ratio_hmc_over_flow``, ``seconds_per_independent_q_ratio_hmc_over_flow`` and
``ratio_bound`` (:func:`ratio_bound`: ``"="``, ``">="``, ``"<="`` or ``null``).

Every number comes with a Gamma-method error (:func:`flowplug.jobs.summary.observable_summary`,
Wolff hep-lat/0306017); the report says "agrees" when the estimate is within 3 sigma of the
exact value. The configuration schema is :data:`DEFAULT_CONFIG`; :data:`QUICK` makes a
seconds-long smoke run (its numbers are not meaningful; both samplers come out frozen).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowplug.fsutil import LOCK_NAME, locked_run

__all__ = [
    "Comparison",
    "compare_samplers",
    "comparison_lines",
    "DEFAULT_CONFIG",
    "MIN_TOPOLOGY_CHANGES",
    "OPEN_TABLES",
    "QUICK",
    "ratio_bound",
    "run_demo",
    "topology_freezing",
]

DEFAULT_CONFIG = """\
# flowplug demo: HMC ensemble -> trained flow -> exact flow resampling -> report
# 2D U(1), L = 8, beta = 6: HMC's topological charge freezes (tau_int(Q) ~ 10^3 trajectories)

seed = 2026
lattice = [8, 8]
beta = 6.0
threads = 1                 # torch CPU threads of every stage (small tensors: 1 is fastest; 0: torch's default)

[hmc]                       # a flowplug hmc run in DIR/hmc (cold start: every chain begins at Q = 0)
chains = 384                # many chains in one batch: the cheapest trajectories on a CPU
thermalize = 200            # trajectories discarded
trajectories = 3800         # trajectories after thermalisation (a few tau_int(Q) per chain)
save_every = 4000           # write every chain's configuration every this many trajectories (counted
                            # from the start; and at the end): here once, after the last
integrator = "omelyan"
steps = 8
trajectory_length = 1.0

[flow]                      # as in flowplug train (examples/train_u1_b6_l8.toml)
layers = ["u1-multiscale"]  # multiscale gauge-equivariant couplings (flowplug plugins lists the layers)
n_layers = 6                # one pass over the six levels of the 8x8 block hierarchy

[flow.options]              # options of the layers; init_beta (initial widths) is the demo's beta unless set here
concentrate = true
saddle_width = true
branches = 2
centre = true
shift = "spread"
n_modes = 4
hidden = [32, 32]
n_bins = 16
dtype = "float32"

[train]                     # [train] of flowplug train (flowplug train --print-config)
steps = 800                 # ESS ~0.9 already after 700 (examples/train_u1_b6_l8.toml trains 1000)
batch_size = 64
lr = 1.5e-3
warmup_steps = 50
schedule = "cosine"
lr_min_factor = 0.1
path_gradient = true        # through the exact inverse (u1-multiscale with shift = "spread")
guard = 1.0

[resample]                  # a flowplug resample run in DIR/resample
steps = 200                 # flow-Metropolis steps per chain (one chain per HMC configuration)
save_every = 100            # write the chains' configurations every this many steps
"""

#: Tables of :data:`DEFAULT_CONFIG` whose keys are free (layer options, as in ``flowplug train``).
OPEN_TABLES = ("flow.options",)

#: ``--set`` overrides of ``flowplug demo --quick``: a seconds-long smoke run.
QUICK = (
    "hmc.chains=4",
    "hmc.thermalize=10",
    "hmc.trajectories=20",
    "hmc.save_every=10",
    "hmc.steps=4",
    "flow.options.hidden=[4]",
    "train.steps=5",
    "train.batch_size=16",
    "train.warmup_steps=0",
    "resample.steps=10",
    "resample.save_every=5",
)

#: A chain whose topological charge changes (sector) fewer times than this, on average,
#: has not sampled Q: with c the probability that two independent draws of Q differ
#: (c ~ 0.4 at beta = 6, L = 8), k changes in a chain of N steps mean tau_int(Q) ~ c N / (2 k)
#: (Wolff's convention), so fewer than 10 changes is a chain shorter than ~50 tau_int(Q)
#: (:data:`flowplug.jobs.summary.MIN_LENGTH_IN_TAU`).
MIN_TOPOLOGY_CHANGES = 10

#: Fresh samples on which the trained flow is evaluated.
EVAL_SAMPLES = 1024


def _sub_config(default_text: str, tree: Mapping[str, Any], open_tables: tuple[str, ...] = ()) -> dict[str, Any]:
    """A job's default configuration with ``tree`` merged in (keys and types checked)."""
    from flowplug import config as _config

    return _config.merge(
        _config.parse_toml(default_text, "default configuration"), tree, source="flowplug demo", open_tables=open_tables
    )


def _stats(history: Mapping[str, Any], burn: int = 0) -> dict[str, dict[str, Any]]:
    """Gamma-method figures of the plaquette, Q^2 and Q of (steps, chains) histories."""
    from flowplug.jobs.summary import observable_summary

    q = history["topological_charge"]
    return observable_summary({"plaquette": history["plaquette"], "q2": q**2, "q": q}, burn=burn)


def topology_freezing(
    charge: Any,
    *,
    exact_q2: float | None = None,
    min_changes: float = MIN_TOPOLOGY_CHANGES,
    max_sigma: float = 3.0,
    unit: str = "steps",
) -> dict[str, Any]:
    """Whether chains of the topological charge Q are frozen, and the tau_int(Q) to quote.

    Topological freezing: as the continuum is approached, local update algorithms (HMC)
    move Q between sectors ever more rarely, so tau_int(Q) grows until the chains keep
    the charge they started with (for 2D U(1): Kanwar et al., arXiv:2003.06413).
    The chains are called frozen when any of these holds:

    1. Q never changed (rounded to an integer) in any chain;
    2. Q changed fewer than ``min_changes`` times per chain on average
       (:data:`MIN_TOPOLOGY_CHANGES`);
    3. the Gamma-method summation window of tau_int(Q) reached its maximum, half the
       chain length (Wolff, hep-lat/0306017; :func:`flowplug.jobs.summary.observable_summary`);
    4. <Q^2> is more than ``max_sigma`` errors from ``exact_q2``.

    For frozen chains tau_int(Q) is a lower bound: the Gamma-method value, or, when Q
    never changed (its autocorrelation function is 1 at every lag the chains measure, and
    the Gamma method has nothing to sum), the chain length T.

    Arguments:
        charge: Q per step and chain after thermalisation: a (T, R) array or tensor
            (steps x chains, as :func:`flowplug.jobs.output.read_measurements` returns),
            or (T,) for one chain. Q of 2D U(1) is an integer up to rounding.
        exact_q2: The exact <Q^2> (:func:`flowplug.exact.u1_2d`, Bonati & Rossi,
            Phys. Rev. D 99 (2019) 054503), or ``None`` (criterion 4 is then skipped).
        min_changes: Topology changes per chain below which the chains are frozen.
        max_sigma: Distance from ``exact_q2``, in errors, beyond which they are frozen.
        unit: The chains' steps in words, for ``reasons`` ("trajectories", "proposals").

    Returns:
        ``frozen`` (bool); ``reasons`` (one sentence per criterion that holds; empty when
        not frozen); ``topology_changes`` (int: steps at which the rounded Q changed,
        summed over chains); ``topology_changes_per_chain`` (list of R ints); ``chains``
        (R) and ``steps`` (T); ``tau_int`` (float, the value to quote, a lower bound when
        frozen), ``tau_int_error`` (Gamma method; NaN when Q never changed),
        ``tau_int_lower_bound`` (bool, = ``frozen``), ``window`` (the Gamma-method window;
        ``None`` when Q never changed); ``q2`` (``{mean, error}`` of Q^2, error NaN when
        Q never changed) and ``q2_sigma_from_exact`` (float, ``inf`` for an estimate
        without error that differs from ``exact_q2``; ``None`` without ``exact_q2``).

    Raises:
        ValueError: if ``charge`` is empty, has more than two dimensions, or holds NaN or Inf.
    """
    import math

    import numpy as np
    import torch

    from flowplug.jobs.summary import observable_summary

    if isinstance(charge, torch.Tensor):
        charge = charge.detach().cpu().numpy()
    q = np.asarray(charge, dtype=np.float64)
    if q.ndim == 1:
        q = q[:, None]
    if q.ndim != 2 or q.size == 0:
        raise ValueError(f"topology_freezing: expected Q of shape (T, R) with T, R > 0; found {q.shape}")
    if not np.all(np.isfinite(q)):
        raise ValueError("topology_freezing: Q contains NaN or Inf")
    steps, chains = q.shape
    per_chain = (np.diff(np.rint(q), axis=0) != 0).sum(axis=0).astype(int)
    total = int(per_chain.sum())
    st = observable_summary({"q": q, "q2": q * q})
    tau, window = float(st["q"]["tau_int"]), st["q"].get("window")
    reasons = []
    if total == 0:
        reasons.append(f"Q never changed in any of the {chains} chains of {steps} {unit}")
    elif total / chains < min_changes:
        reasons.append(
            f"Q changed only {total} times in {chains} chains of {steps} {unit} "
            f"({total / chains:.2g} per chain; sampling Q takes at least {min_changes:g} per chain)"
        )
    if window is not None and window >= max(steps // 2, 1):
        reasons.append("the Gamma-method window of tau_int(Q) reached half the chain length")
    q2_mean, q2_err = float(st["q2"]["mean"]), float(st["q2"]["error"])
    sigma = None
    if exact_q2 is not None:
        dev = abs(q2_mean - float(exact_q2))
        sigma = dev / q2_err if math.isfinite(q2_err) and q2_err > 0 else (0.0 if dev == 0 else math.inf)
        ex = float(exact_q2)
        if sigma > max_sigma and math.isinf(sigma):
            reasons.append(f"<Q^2> = {q2_mean:.4f}, not the exact {ex:.4f} (no error bar: Q never changed)")
        elif sigma > max_sigma:
            reasons.append(f"<Q^2> = {q2_mean:.4f}({q2_err:.4f}) is {sigma:.1f} sigma from the exact {ex:.4f}")
    if not math.isfinite(tau):  # Q never changed: rho(t) = 1 at every measurable lag
        tau = float(steps)
    return {
        "frozen": bool(reasons),
        "reasons": reasons,
        "topology_changes": total,
        "topology_changes_per_chain": per_chain.tolist(),
        "chains": chains,
        "steps": steps,
        "tau_int": tau,
        "tau_int_error": float(st["q"]["tau_int_error"]),
        "tau_int_lower_bound": bool(reasons),
        "window": window,
        "q2": {"mean": q2_mean, "error": q2_err},
        "q2_sigma_from_exact": sigma,
    }


def ratio_bound(numerator_lower_bound: bool, denominator_lower_bound: bool) -> str | None:
    """What a ratio of two costs is when either may be a lower bound.

    Arguments:
        numerator_lower_bound: The numerator (HMC's cost) is a lower bound.
        denominator_lower_bound: The denominator (the flow's cost) is a lower bound.

    Returns:
        ``"="`` (both measured), ``">="`` (only the numerator bounded: the ratio is a lower
        bound), ``"<="`` (only the denominator: an upper bound), or ``None`` (both: the
        ratio is not determined).
    """
    if numerator_lower_bound and denominator_lower_bound:
        return None
    return ">=" if numerator_lower_bound else "<=" if denominator_lower_bound else "="


def _last_train_metrics(run_dir: Path) -> dict[str, float]:
    """loss, free energy, ESS and acceptance of the last training step (``train_log.csv``)."""
    import csv

    from flowplug.train import LOG_NAME

    try:
        with open(run_dir / LOG_NAME, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError:
        return {}
    last = rows[-1] if rows else {}
    return {k: float(last[k]) for k in ("loss", "free_energy", "ess", "acceptance") if last.get(k) not in (None, "")}


def _flow_options(flow: Mapping[str, Any], beta: float) -> dict[str, Any]:
    """The layer options of the demo's flow: ``[flow.options]``, and for a flow with
    ``u1-multiscale`` layers ``init_beta`` = the demo's ``beta`` unless set there (or in
    ``[flow.options.u1-multiscale]``): the initial widths of the couplings follow the
    coupling the flow is trained for (``plugins/flow_multiscale.py``)."""
    options = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in flow["options"].items()}
    own = options.get("u1-multiscale", {})
    if "u1-multiscale" in flow["layers"] and "init_beta" not in options and "init_beta" not in own:
        options["init_beta"] = beta
    return options


def _bounded(value: float, lower: bool, fmt: str) -> str:
    """``value`` formatted with ``fmt``, after ">= " when it is a lower bound."""
    return f"{'>= ' if lower else ''}{value:{fmt}}"


#: The samplers of the demo: label -> (step unit, plural).
SAMPLERS = {"HMC": ("trajectory", "trajectories"), "flow Metropolis": ("proposal", "proposals")}


@dataclass
class Comparison:
    """HMC and flow chains side by side (:func:`compare_samplers`).

    Attributes:
        figures: The ``summary.json`` entries: ``hmc`` and ``flow`` (``acceptance``,
            ``observables``, ``seconds``, ``trajectories`` / ``proposals``, ``frozen``,
            ``frozen_reasons``, ``topology_changes``, ``topology_changes_per_chain``,
            ``tau_int_q``, ``tau_int_q_lower_bound``, ``seconds_per_independent_q``,
            ``seconds_per_independent_q_lower_bound``; ``stuck_chains`` for the flow),
            ``sigma_from_exact`` (label -> {plaquette, q2}, empty without exact values),
            ``tau_int_q_ratio_hmc_over_flow``, ``seconds_per_independent_q_ratio_hmc_over_flow``
            and ``ratio_bound`` (:func:`ratio_bound`).
        rows: The rows of :func:`flowplug.jobs.report.comparison_figure` (with ``lower_bound``).
        verdict: Label ("HMC", "flow Metropolis") -> :func:`topology_freezing`.
        stats: Label -> Gamma-method figures of plaquette, Q^2 and Q.
    """

    figures: dict[str, Any]
    rows: list[dict[str, Any]]
    verdict: dict[str, dict[str, Any]]
    stats: dict[str, dict[str, Any]]


def compare_samplers(
    hmc_history: Mapping[str, Any],
    flow_history: Mapping[str, Any],
    *,
    exact: Mapping[str, float] | None,
    hmc_seconds: float,
    hmc_trajectories: int,
    hmc_acceptance: float,
    flow_seconds: float,
    flow_proposals: int,
    flow_acceptance: float,
) -> Comparison:
    """Estimates, freezing verdicts and cost per independent Q of HMC and of the flow chains.

    The seconds per independent sample of Q are (wall time / steps) x 2 tau_int(Q), with
    tau_int(Q) from :func:`topology_freezing`: for a frozen sampler a lower bound, and so
    is its cost; the ratio HMC/flow is then bounded as :func:`ratio_bound` says, never
    shown as a measured win.

    Arguments:
        hmc_history: ``plaquette`` and ``topological_charge`` (and optionally ``accepted``)
            of HMC after thermalisation, each a (T, R) array or tensor (trajectories x chains).
        flow_history: The same for the flow chains, (T', R') (proposals x chains).
        exact: Exact ``plaquette`` and ``q2`` (:func:`flowplug.exact.u1_2d`), or ``None``.
        hmc_seconds: Wall time of HMC, thermalisation included.
        hmc_trajectories: Trajectories it ran, all chains, thermalisation included.
        hmc_acceptance: Its acceptance.
        flow_seconds: Wall time of the flow chains.
        flow_proposals: Proposals they made, all chains.
        flow_acceptance: Their acceptance.

    Returns:
        :class:`Comparison`.

    Raises:
        ValueError: as :func:`topology_freezing`, for an empty or non-finite charge history.
        KeyError: if a history lacks ``plaquette`` or ``topological_charge``.
    """
    q2_exact = float(exact["q2"]) if exact else None
    figures: dict[str, Any] = {"sigma_from_exact": {}}
    rows, verdict, stats = [], {}, {}
    runs = (
        ("HMC", "hmc", hmc_history, hmc_seconds, hmc_trajectories, hmc_acceptance),
        ("flow Metropolis", "flow", flow_history, flow_seconds, flow_proposals, flow_acceptance),
    )
    for label, key, hist, seconds, steps, acc in runs:
        st = _stats(hist)
        v = topology_freezing(hist["topological_charge"], exact_q2=q2_exact, unit=SAMPLERS[label][1])
        cost = seconds / steps * 2 * v["tau_int"]
        stats[label], verdict[label] = st, v
        figures[key] = {
            "acceptance": acc,
            "observables": st,
            "seconds": seconds,
            SAMPLERS[label][1]: steps,
            "frozen": v["frozen"],
            "frozen_reasons": v["reasons"],
            "topology_changes": v["topology_changes"],
            "topology_changes_per_chain": v["topology_changes"] / v["chains"],
            "tau_int_q": v["tau_int"],
            "tau_int_q_lower_bound": v["tau_int_lower_bound"],
            "seconds_per_independent_q": cost,
            "seconds_per_independent_q_lower_bound": v["tau_int_lower_bound"],
        }
        rows.append(
            {
                "label": label,
                "step": SAMPLERS[label][0],
                "plaquette": st["plaquette"],
                "q2": st["q2"],
                "q": {**st["q"], "tau_int": v["tau_int"], "tau_int_error": v["tau_int_error"]},
                "seconds_per_independent_q": cost,
                "lower_bound": v["tau_int_lower_bound"],
            }
        )
        if exact:
            p = st["plaquette"]
            figures["sigma_from_exact"][label] = {
                "plaquette": abs(p["mean"] - float(exact["plaquette"])) / max(p["error"], 1e-300),
                "q2": v["q2_sigma_from_exact"],
            }
    accepted = flow_history.get("accepted")
    figures["flow"]["stuck_chains"] = int((accepted.sum(0) == 0).sum()) if accepted is not None else 0
    vh, vf = verdict["HMC"], verdict["flow Metropolis"]
    figures["tau_int_q_ratio_hmc_over_flow"] = vh["tau_int"] / vf["tau_int"]
    figures["seconds_per_independent_q_ratio_hmc_over_flow"] = (
        figures["hmc"]["seconds_per_independent_q"] / figures["flow"]["seconds_per_independent_q"]
    )
    figures["ratio_bound"] = ratio_bound(vh["tau_int_lower_bound"], vf["tau_int_lower_bound"])
    return Comparison(figures, rows, verdict, stats)


def comparison_lines(
    cmp: Comparison, exact: Mapping[str, float] | None, train_seconds: float | None = None
) -> list[str]:
    """The lines of ``report.txt`` that put HMC and the flow chains side by side.

    One line per sampler (estimates against ``exact``, acceptance, tau_int(Q), with
    ">=" when it is a lower bound); for a frozen sampler a plain statement that it is
    frozen, why, whether its estimates are off because of it, and that its tau_int(Q)
    and cost are lower bounds; the tau_int(Q) and cost lines with the HMC/flow ratios
    (">=" when only HMC is frozen, "not determined" when both are).

    Arguments:
        cmp: :func:`compare_samplers`.
        exact: Exact ``plaquette`` and ``q2``, or ``None``.
        train_seconds: The flow's training time, to add its cost with training.

    Returns:
        The lines, without newlines.
    """
    fig, verdict, stats = cmp.figures, cmp.verdict, cmp.stats
    h, fl = fig["hmc"], fig["flow"]
    lines = []
    if exact:
        lines.append(f"exact (torus):   <P> = {exact['plaquette']:.6f}   <Q^2> = {exact['q2']:.6f}")
    for label, key in (("HMC", "hmc"), ("flow Metropolis", "flow")):
        st, v = stats[label], verdict[label]
        p, q2 = st["plaquette"], st["q2"]
        if v["tau_int_lower_bound"]:
            tau = f">= {v['tau_int']:.3g}"
        else:
            tau = f"= {v['tau_int']:.2f}({v['tau_int_error']:.2f})"
        check = ""
        if exact:
            dev = fig["sigma_from_exact"][label]
            ok = all(x is not None and x < 3 for x in dev.values())
            check = (
                f"  [{'agrees' if ok else 'DISAGREES'} with exact: {dev['plaquette']:.1f} and {dev['q2']:.1f} sigma]"
            )
        lines.append(
            f"{label:16s} <P> = {p['mean']:.5f}({p['error']:.5f})  <Q^2> = {q2['mean']:.4f}({q2['error']:.4f})"
            f"  acceptance {fig[key]['acceptance']:.3f}  tau_int(Q) {tau} {SAMPLERS[label][1]}{check}"
        )
    lines.append("")
    for label in ("HMC", "flow Metropolis"):
        v = verdict[label]
        moves = (
            f"Q changed {v['topology_changes']} times in {v['chains']} chains of {v['steps']} {SAMPLERS[label][1]} "
            f"({v['topology_changes'] / v['chains']:.3g} per chain)"
        )
        if not v["frozen"]:
            lines.append(f"{label}: {moves}: topology sampled")
            if label == "flow Metropolis" and fl.get("stuck_chains"):
                lines.append(
                    f"  {fl['stuck_chains']} flow chain(s) accepted no proposal: they began at configurations the "
                    "flow rarely proposes (large p/q), where an exact chain stays long"
                )
            continue
        what = "HMC is FROZEN (topological freezing)" if label == "HMC" else "the flow chains are FROZEN"
        lines.append(f"{what}: " + "; ".join(v["reasons"]) + ".")
        if v["topology_changes"] and not any(r.startswith("Q changed only") for r in v["reasons"]):
            lines.append(f"  {moves}.")
        dev = fig["sigma_from_exact"].get(label, {})
        off = [name for name, k in (("<P>", "plaquette"), ("<Q^2>", "q2")) if (dev.get(k) or 0) > 3]
        if off:
            start = " (cold start: every chain began at Q = 0)" if label == "HMC" else ""
            lines.append(
                f"  Its {' and '.join(off)} {'are' if len(off) > 1 else 'is'} off because it is frozen: its chains "
                f"stay in the sectors they began in{start}, and the errors miss that slow mode."
            )
        lines.append("  Its tau_int(Q) and seconds per independent Q are lower bounds (>=).")
    bound = fig["ratio_bound"]
    if bound is None:
        ratio_tau = ratio_cost = "not determined: both samplers frozen"
    else:
        prefix = "" if bound == "=" else f"{bound} "
        ratio_tau = f"{prefix}{fig['tau_int_q_ratio_hmc_over_flow']:.3g}"
        ratio_cost = f"{prefix}{fig['seconds_per_independent_q_ratio_hmc_over_flow']:.3g}"
        ratio_cost += {"=": "", ">=": ", a lower bound: HMC is frozen", "<=": ", an upper bound: the flow is frozen"}[
            bound
        ]
    flow_lb = fl["tau_int_q_lower_bound"]
    cost_h = _bounded(h["seconds_per_independent_q"], h["tau_int_q_lower_bound"], ".2e")
    cost_f = _bounded(fl["seconds_per_independent_q"], flow_lb, ".2e")
    cost_line = f"seconds per independent Q: HMC {cost_h}, flow {cost_f} (ratio HMC/flow {ratio_cost})"
    if train_seconds is not None:
        n_indep = fl["proposals"] / (2 * fl["tau_int_q"])
        cost_line += (
            f"; flow with its training time: {_bounded((train_seconds + fl['seconds']) / n_indep, flow_lb, '.2e')}"
        )
    lines += [
        "",
        f"sampling time: HMC {h['seconds']:.1f} s for {h['trajectories']} trajectories, flow Metropolis "
        f"{fl['seconds']:.1f} s for {fl['proposals']} proposals",
        f"tau_int(Q): HMC {_bounded(h['tau_int_q'], h['tau_int_q_lower_bound'], '.3g')} per trajectory, flow "
        f"{_bounded(fl['tau_int_q'], flow_lb, '.3g')} per proposal (ratio HMC/flow {ratio_tau})",
        cost_line,
    ]
    return lines


@locked_run("demo", lambda a: a["out"])
def run_demo(
    cfg: Mapping[str, Any],
    out: Path,
    *,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the demo (module docstring); ``out`` is locked for the run.

    Arguments:
        cfg: The effective configuration (of :data:`DEFAULT_CONFIG`, with
            ``open_tables=OPEN_TABLES``), a nested mapping as :func:`flowplug.config.build_config`
            returns.
        out: The output directory.
        force: Replace the outputs of an earlier demo in ``out``.
        progress: Progress bars.
        log: Receives a line as each stage starts.

    Returns:
        The figures written to ``out/summary.json`` (dict; keys in the module docstring:
        ``exact``, ``hmc`` and ``flow`` with their ``seconds_per_independent_q`` and
        freezing verdicts, ``sigma_from_exact``, ...); the report text is ``out/report.txt``.

    Raises:
        FlowplugError: if ``out`` holds an earlier demo and ``force`` is false, or the
            lattice is not 2D.
        ConfigError: from the stages, on a configuration they refuse (e.g. a flow option
            that no layer accepts).
    """
    from flowplug.threads import job_threads

    with job_threads(cfg["threads"]):
        return _run_demo(cfg, Path(out), force=force, progress=progress, log=log)


def _run_demo(
    cfg: Mapping[str, Any], out: Path, *, force: bool, progress: bool, log: Callable[[str], None] | None
) -> dict[str, Any]:
    """The body of :func:`run_demo` (inside its lock and thread setting)."""
    import shutil

    from flowplug.errors import FlowplugError
    from flowplug.exact import u1_2d
    from flowplug.fsutil import atomic_write
    from flowplug.jobs import hmc as hmc_job
    from flowplug.jobs import resample as resample_job
    from flowplug.jobs import train as train_job
    from flowplug.jobs.output import read_measurements, write_job_summary
    from flowplug.jobs.report import comparison_report

    say = log or (lambda text: None)
    threads = int(cfg["threads"])
    lattice = tuple(int(v) for v in cfg["lattice"])
    if len(lattice) != 2:
        raise FlowplugError(f"demo: lattice must be 2D (L0, L1); found {list(lattice)}")
    beta, seed = float(cfg["beta"]), int(cfg["seed"])
    exact = u1_2d(lattice[0], beta) if lattice[0] == lattice[1] else None
    if out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()):
        if not force:
            raise FlowplugError(f"{out} holds an earlier run; choose another --out or add --force to replace it")
        for sub in ("hmc", "flow", "resample"):
            shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    action = {"name": "wilson", "group": "u1", "beta": beta}
    h = cfg["hmc"]
    therm, n_meas = int(h["thermalize"]), int(h["trajectories"])

    # 1. HMC ensemble, written as files
    say(
        f"[1/4] HMC: {h['chains']} chains x {therm} + {n_meas} trajectories on {lattice[0]}x{lattice[1]}, beta = {beta}"
    )
    hcfg = _sub_config(
        hmc_job.DEFAULT_CONFIG,
        {
            "seed": seed,
            "out": str(out / "hmc"),
            "lattice": list(lattice),
            "start": "cold",
            "chains": int(h["chains"]),
            "format": "hdf5",
            "save_every": int(h["save_every"]),
            "measurements": "hdf5",
            "observables": ["plaquette", "topological_charge"],
            "device": "cpu",
            "threads": threads,
            "progress": progress,
            "action": action,
            "hmc": {
                "trajectories": therm + n_meas,
                "thermalization": therm,
                "integrator": h["integrator"],
                "steps": int(h["steps"]),
                "trajectory_length": float(h["trajectory_length"]),
            },
        },
    )
    hsum = hmc_job.run_hmc(hcfg, force=True)
    hmc_hist = read_measurements(Path(hsum["measurements"]))
    t_hmc, hmc_acc = hsum["seconds_this_run"], hsum["acceptance"]
    ensemble = out / "hmc" / "ensemble"

    # 2. train the flow
    f, tr = cfg["flow"], cfg["train"]
    layer_names = "+".join(f["layers"])
    options = _flow_options(f, beta)
    say(
        f"[2/4] training a {f['n_layers']}-layer {layer_names} flow for {tr['steps']} steps of batch {tr['batch_size']}"
    )
    run_dir = out / "flow"
    tcfg = _sub_config(
        train_job.DEFAULT_CONFIG,
        {
            "out": str(run_dir),
            "lattice": list(lattice),
            "seed": seed + 2,
            "device": "cpu",
            "threads": threads,
            "action": action,
            "flow": {"layers": list(f["layers"]), "n_layers": int(f["n_layers"]), "options": options},
            "train": {**dict(tr), "progress": progress, "checkpoint_every": 0},
            "eval": {"samples": EVAL_SAMPLES, "batch_size": 512, "seed": seed + 5},
        },
        train_job.OPEN_TABLES,
    )
    tsum = train_job.run_train(tcfg, force=True)
    t_train = tsum["wall_time_s"]

    # 3. resample the HMC ensemble with flow proposals
    r = cfg["resample"]
    n_configs = int(h["chains"]) * len(list(ensemble.glob("traj_*.h5")))
    say(f"[3/4] resampling the {n_configs} HMC configurations with flow proposals ({r['steps']} steps each)")
    rcfg = _sub_config(
        resample_job.DEFAULT_CONFIG,
        {
            "seed": seed + 3,
            "steps": int(r["steps"]),
            "save_every": int(r["save_every"]),
            "checkpoint_every": 0,
            "observables": ["plaquette", "topological_charge"],
            "threads": threads,
        },
    )
    t0 = time.perf_counter()
    rsum = resample_job.run_resample(rcfg, [ensemble], run_dir, out / "resample", force=True, progress=progress)
    t_flow = time.perf_counter() - t0
    flow_hist = read_measurements(out / "resample" / "measurements.csv")

    # 4. report
    cmp = compare_samplers(
        {k: v[therm:] for k, v in hmc_hist.items()},
        flow_hist,
        exact=exact,
        hmc_seconds=t_hmc,
        hmc_trajectories=int(h["chains"]) * (therm + n_meas),
        hmc_acceptance=hmc_acc,
        flow_seconds=t_flow,
        flow_proposals=rsum["chains"] * rsum["steps"],
        flow_acceptance=rsum["acceptance"],
    )
    fig = cmp.figures
    summary = {
        "lattice": list(lattice),
        "beta": beta,
        "seed": seed,
        "exact": exact,
        "acceptance": rsum["acceptance"],
        "ess": tsum["ess"],
        "ess_hmc_inputs": rsum.get("ess_p_samples"),
        "hmc": fig["hmc"],
        "flow": {
            **fig["flow"],
            "train_seconds": t_train,
            "train": _last_train_metrics(run_dir),
            "train_steps": tsum["steps"],
            "skipped_steps": tsum["skipped_steps"],
            "layer_options": options,
            "fresh_samples": {
                "n_samples": tsum["eval_samples"],
                "ess": tsum["ess"],
                "acceptance": tsum["acceptance"],
                "free_energy": tsum["free_energy"],
            },
        },
        "observables": {k: cmp.stats["flow Metropolis"][k] for k in ("plaquette", "q2")},
        **{k: v for k, v in fig.items() if k not in ("hmc", "flow")},
    }
    ess_inputs = summary["ess_hmc_inputs"]
    lines = [
        f"flowplug demo: 2D U(1), {lattice[0]}x{lattice[1]}, beta = {beta}",
        "",
        *comparison_lines(cmp, exact, train_seconds=t_train),
        "",
        f"flow: {f['n_layers']} x {layer_names}, trained {tsum['steps']} steps x {tr['batch_size']} in "
        f"{t_train:.1f} s; on {tsum['eval_samples']} fresh samples ESS per sample {tsum['ess']:.3f} and expected "
        f"acceptance {tsum['acceptance']:.3f}; ESS {ess_inputs if ess_inputs is not None else float('nan'):.3g} "
        "estimated from the HMC configurations",
        "",
        f"files: {out / 'hmc'}/, {run_dir}/, {out / 'resample'}/, {out / 'report.png'}",
    ]
    text = "\n".join(lines) + "\n"
    with atomic_write(out / "report.txt", "w") as fh:
        fh.write(text)
    say("[4/4] report")
    q_hist = {
        "HMC": hmc_hist["topological_charge"][therm:, 0],
        "flow Metropolis": flow_hist["topological_charge"][:, 0],
    }
    frozen_note = "; HMC topologically frozen" if fig["hmc"]["frozen"] else ""
    comparison_report(
        out / "report.png",
        cmp.rows,
        {"plaquette": exact["plaquette"], "q2": exact["q2"]} if exact else {},
        q_hist,
        title=f"2D U(1) {lattice[0]}x{lattice[1]}, beta = {beta}: HMC and flow Metropolis side by side "
        f"against exact{frozen_note}",
    )
    return write_job_summary(out, "demo", summary)
