r"""4D SU(3) Wilson at beta = 6.0: wall time per effectively independent plaquette and Q sample.

Every sampler of the production theory, side by side in one run, on one machine, with the same
torch thread count, batch of chains and random seed (issue 14, item 5). All kernels are built
through the kernel registry (:func:`flowplug.jobs.chains.build_kernel`), as a user's
``[kernel]`` table would build them:

``heatbath-or``
    the production baseline: one Cabibbo-Marinari / Kennedy-Pendleton heatbath sweep followed by
    ``--overrelax`` (4) overrelaxation sweeps per step (:mod:`flowplug.plugins.heatbath`);
``hmc``
    Omelyan (2MN) integrator, trajectory length 1, the step count tuned upwards on short runs
    from the thermalised configurations until the acceptance is >= ``--hmc-target`` (0.8);
``independence-metropolis``
    proposals from a trained flow (``--flow RUN_DIR``, a ``flowplug train`` output directory;
    without it a flow is trained here from ``--train-config``, default
    ``examples/train_su3_4d.toml``, with ``--train-set`` overrides, and its training time is
    reported separately as ``training_s``);
``nonequilibrium``
    non-equilibrium (Jarzynski) proposals / stochastic normalizing flows, **only if the kernel
    is registered when the script runs** (otherwise a note is printed and its JSON line says
    ``skipped``). Its options come from ``--ne-set KEY=VALUE`` (e.g. ``n_step=20``,
    ``inner="heatbath-or"``, ``start="flow"``); the benchmark hands it the flow and sets
    ``start = "prior"`` (Haar start, beta driven from 0) unless ``--ne-set start=...`` says
    otherwise. One step = one proposal = one run of the protocol, so its seconds per step are
    the protocol cost (``protocol_s_per_proposal``, with ``protocol_updates_per_proposal``);
``flow-hmc``
    HMC in the latent space of the same flow, Omelyan with the HMC's tuned step count
    (``--flow-hmc-steps`` to change it; not tuned: a trajectory through a deep flow costs
    seconds).

Starts and thermalisation
    every sampler starts from the same thermalised configurations: ``--chains`` Haar-random
    (hot) starts, ``--thermalize`` heatbath-or sweeps (``thermalisation_s`` in every line).
    HMC is tuned from there (``tuning_s``); then each sampler runs ``--burn`` steps of its own
    that are discarded (``burn_s``; they also time one step, for the budget below, and give
    the flow kernels their log q / work of the start configurations).
Measurement
    the samplers' measured runs alternate in ``--segments`` (10) pieces, so that all of them
    see the same load on a shared machine. Each sampler runs ``--steps`` steps per chain, or,
    by default, as many as fit into ``--seconds`` (60) of wall time (from the burn-in's
    timing; at least ``--min-steps``). The kernel steps are timed alone: measuring the
    observables is not counted.
Observables
    the mean plaquette (registered ``plaquette``: mean Re tr U_P / 3) and the topological
    charge Q of the registered ``topological_charge`` observable, the clover definition in 4D
    (Di Vecchia, Fabricius, Rossi, Veneziano, Nucl. Phys. B 192 (1981) 392): on the
    unsmoothed links by default, or after ``--q-stout N`` stout-smearing steps of weight
    ``--q-rho`` (:func:`stout_smear`; Morningstar and Peardon, hep-lat/0311018), which bring
    Q close to an integer. Both are measured after every step of every chain.
Cost per effectively independent sample
    = seconds per step x 2 tau_int, tau_int by the Gamma method (Wolff, hep-lat/0306017;
    1/2 for independent samples), seconds per step = measured wall time / (steps x chains)
    (the chains run as one batch). tau_int is flagged a **lower bound** (``*_bound: true``),
    as in ``benchmarks/chains.py``, when the Gamma window reaches half the chain length or the
    value changes rarely: for a smoothed Q (``--q-stout`` > 0) the rules of
    :func:`flowplug.jobs.demo.topology_freezing` (the rounded Q changed sector fewer than
    :data:`~flowplug.jobs.demo.MIN_TOPOLOGY_CHANGES` times per chain); for the plaquette and
    the unsmoothed Q, which are not integers, the same count of steps at which the value
    changed at all (a flow chain that rarely accepts). A value that never changed gets the
    chain length as its tau_int. The cost is then a lower bound too.
Ratios
    each line has ``ratio_*_vs_heatbath_or`` = the sampler's cost / heatbath-or's cost (> 1:
    more expensive than the production baseline) with ``ratio_*_bound`` ``"="``, ``">="``
    (only the sampler's cost is a lower bound), ``"<="`` (only heatbath-or's) or null (both:
    the ratio is not determined, and null too).

Output: one JSON line per sampler on stdout (keys ``sampler``, ``kernel``, ``options``,
``lattice``, ``beta``, ``chains``, ``steps``, ``step_unit``, ``seconds``, ``seconds_per_step``,
``acceptance``, ``plaquette``, ``plaquette_err``, ``tau_int_plaquette``,
``tau_int_plaquette_bound``, ``Q_definition``, ``Q2``, ``Q2_err``, ``tau_int_Q``,
``tau_int_Q_bound``, ``cost_per_independent_plaquette_s``,
``cost_per_independent_plaquette_bound``, ``cost_per_independent_Q_s``,
``cost_per_independent_Q_bound``, ``ratio_plaquette_vs_heatbath_or``,
``ratio_plaquette_bound``, ``ratio_Q_vs_heatbath_or``, ``ratio_Q_bound``, ``bound_reasons``,
``thermalisation_s``, ``burn_s``; ``tuning_s`` and ``mean_exp_minus_delta_h`` for HMC and
flow HMC; ``training_s`` (the flow's optimisation steps, from its ``summary.json``),
``training_job_s`` (the whole training job here, evaluation included; null for ``--flow``),
``flow``, ``flow_ess``, ``proposal_ess`` for the flow samplers; ``protocol`` (n_step, inner,
start, couplings), ``protocol_updates_per_proposal``, ``protocol_s_per_proposal``,
``work_mean``, ``work_std`` for nonequilibrium); a skipped sampler's line has ``sampler`` and
``skipped`` (the reason) only. Figures that do not exist are null. A readable table with the
ratios goes to stderr, with the notes.

    python benchmarks/su3.py --quick                                   # < 1 min smoke run, numbers meaningless
    python benchmarks/su3.py --flow runs/su3-4d                        # 4^4, a flow trained beforehand
    python benchmarks/su3.py --train-set train.steps=60 --seconds 45   # trains a (short) flow first
    python benchmarks/su3.py --lattice 8,8,8,8 --samplers heatbath-or,hmc,nonequilibrium --seconds 120
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

#: Samplers in the order they run within each segment.
SAMPLERS = ("heatbath-or", "hmc", "independence-metropolis", "nonequilibrium", "flow-hmc")
#: Samplers that need a trained flow.
FLOW_SAMPLERS = ("independence-metropolis", "flow-hmc")
#: The production baseline the ratios refer to.
BASELINE = "heatbath-or"
#: Training overrides of ``--quick`` (before the user's ``--train-set``): a tiny, nearly untrained flow.
QUICK_TRAIN = (
    "train.steps=1",
    "train.batch_size=4",
    "train.checkpoint_every=0",
    "flow.n_layers=2",
    "eval.samples=8",
    "eval.batch_size=8",
)


# --------------------------------------------------------------------------- observables


def stout_smear(links: torch.Tensor, action: Any, rho: float, steps: int) -> torch.Tensor:
    r"""Isotropic stout smearing of SU(N) links, every link at once, ``steps`` times.

    U_mu(x) -> exp(i Q_mu(x)) U_mu(x) with i Q = TA(rho (U_mu(x) V_mu(x))^+), TA the traceless
    anti-Hermitian part (:func:`flowplug.groups.project_algebra`) and V_mu(x) the staple sum of
    :meth:`flowplug.plugins.theories.WilsonGaugeAction.staples` (so that U V is the sum of the
    2(d-1) plaquettes through the link; (U V)^+ = C U^+ = Omega of Morningstar and Peardon with
    C = rho times the sum of the staples in their orientation). Each step increases
    sum_P Re tr U_P for small rho; steps x rho is close to the Wilson-flow time t (smoothing
    radius sqrt(8 t) lattice units), so keep it well below (L/2)^2 / 8.

    Arguments:
        links: SU(N) links, shape (B, d, L_0, ..., L_{d-1}, N, N), complex128 (not modified).
        action: Object with ``staples(links)`` of the same shape (the Wilson action).
        rho: Smearing weight per step (dimensionless; 0.1 is customary).
        steps: Number of smearing steps (>= 0; 0 returns ``links``).

    Returns:
        Smeared links, same shape and dtype.

    References:
        Morningstar and Peardon, Phys. Rev. D 69 (2004) 054501, hep-lat/0311018, eqs. (1)-(3);
        Luscher, JHEP 08 (2010) 071, arXiv:1006.4518 (stout steps as Wilson-flow steps).
    """
    from flowplug.groups import expmap, project_algebra

    u = links
    for _ in range(int(steps)):
        w = u @ action.staples(u)
        u = expmap(project_algebra(rho * w.mH)) @ u
    return u


class Measure:
    """The measurement after every step: plaquette and Q through the observable registry, self-timed.

    Arguments:
        action: The Wilson action (``field``, ``staples``; used for the stout smearing).
        q_stout: Stout steps before Q is measured (0: Q of the unsmoothed links).
        q_rho: Stout weight rho.

    Calling it on links x, shape (B, 4, L_0, ..., L_3, 3, 3) complex128, returns
    ``{"plaquette": (B,), "topological_charge": (B,)}``, float64 (plaquette: mean Re tr U_P / 3;
    Q: clover definition, :func:`flowplug.plugins.observables.topological_charge`, Di Vecchia
    et al., Nucl. Phys. B 192 (1981) 392). ``seconds`` accumulates the wall time spent in
    calls, so that callers can leave it out of a kernel's timing.
    """

    def __init__(self, action: Any, q_stout: int = 0, q_rho: float = 0.1) -> None:
        from flowplug.measure import measurement

        self.action = action
        self.q_stout = int(q_stout)
        self.q_rho = float(q_rho)
        self.plaquette = measurement(action.field, ["plaquette"])
        self.charge = measurement(action.field, ["topological_charge"])
        self.seconds = 0.0

    @property
    def q_definition(self) -> str:
        """The charge measured, in words."""
        if self.q_stout == 0:
            return "clover (Di Vecchia et al. 1981), unsmoothed links"
        return f"clover (Di Vecchia et al. 1981) after {self.q_stout} stout steps, rho = {self.q_rho:g}"

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = dict(self.plaquette(x))
            y = stout_smear(x, self.action, self.q_rho, self.q_stout) if self.q_stout else x
            out.update(self.charge(y))
        self.seconds += time.perf_counter() - t0
        return out


# --------------------------------------------------------------------------- statistics


def autocorrelation(values: Any, *, integer: bool = False, unit: str = "steps") -> dict[str, Any]:
    """Gamma-method mean, error and tau_int of (steps, chains) histories, with the lower-bound rules.

    tau_int is a lower bound (``bound``) when, as in ``benchmarks/chains.py``:

    * ``integer`` (a smoothed, near-integer Q): :func:`flowplug.jobs.demo.topology_freezing`
      says the chains are frozen (the rounded value never changed, changed fewer than
      :data:`~flowplug.jobs.demo.MIN_TOPOLOGY_CHANGES` times per chain, or the Gamma window
      reached half the chain length);
    * otherwise (plaquette, unsmoothed Q): the value changed (by more than rounding, 1e-12
      relative) at fewer than MIN_TOPOLOGY_CHANGES steps per chain, or the window reached half
      the chain length.

    A value that never changed has no measurable tau_int: the chain length T is quoted.

    Arguments:
        values: Shape (T, R) (steps x chains), tensor or array, finite.
        integer: Apply the integer-charge rules (sector changes of the rounded value).
        unit: The chains' steps in words, for ``reasons``.

    Returns:
        ``mean``, ``error`` (NaN when no chain changed), ``tau_int`` (in steps),
        ``tau_int_error``, ``bound`` (bool), ``reasons`` (list of sentences; empty when not
        a bound) and ``changes_per_chain`` (float).

    References:
        Wolff, Comput. Phys. Commun. 156 (2004) 143, hep-lat/0306017.
    """
    from flowplug.jobs.demo import MIN_TOPOLOGY_CHANGES, topology_freezing
    from flowplug.jobs.summary import observable_summary

    v = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    v = np.asarray(v, dtype=np.float64)
    steps, chains = v.shape
    s = observable_summary({"v": v})["v"]
    if integer:
        fr = topology_freezing(v, unit=unit)
        return {
            "mean": s["mean"],
            "error": s["error"],
            "tau_int": float(fr["tau_int"]),
            "tau_int_error": float(fr["tau_int_error"]),
            "bound": bool(fr["tau_int_lower_bound"]),
            "reasons": list(fr["reasons"]),
            "changes_per_chain": fr["topology_changes"] / chains,
        }
    scale = max(1.0, float(np.abs(v).max()))
    changes = int((np.abs(np.diff(v, axis=0)) > 1e-12 * scale).sum())
    reasons = []
    if changes == 0:
        reasons.append(f"the value never changed in any of the {chains} chains of {steps} {unit}")
    elif changes / chains < MIN_TOPOLOGY_CHANGES:
        reasons.append(
            f"the value changed only {changes} times in {chains} chains of {steps} {unit} "
            f"({changes / chains:.2g} per chain; at least {MIN_TOPOLOGY_CHANGES} per chain are needed)"
        )
    window = s.get("window")
    if window is not None and window >= max(steps // 2, 1):
        reasons.append("the Gamma-method window of tau_int reached half the chain length")
    tau = float(s["tau_int"])
    if not math.isfinite(tau):
        tau = float(steps)
    return {
        "mean": s["mean"],
        "error": s["error"],
        "tau_int": tau,
        "tau_int_error": float(s["tau_int_error"]),
        "bound": bool(reasons),
        "reasons": reasons,
        "changes_per_chain": changes / chains,
    }


def relative_cost(cost: float, bound: bool, base_cost: float, base_bound: bool) -> tuple[float, str | None]:
    """A sampler's cost over the baseline's, and what the ratio is when either is a lower bound.

    Arguments:
        cost: The sampler's seconds per independent sample (a lower bound if ``bound``).
        bound: Whether ``cost`` is a lower bound.
        base_cost: heatbath-or's cost.
        base_bound: Whether ``base_cost`` is a lower bound.

    Returns:
        ``(ratio, how)``: ``how`` as :func:`flowplug.jobs.demo.ratio_bound` (``"="``, ``">="``
        when only the sampler's cost is a bound, ``"<="`` when only the baseline's, ``None``
        when both, and then the ratio is NaN).
    """
    from flowplug.jobs.demo import ratio_bound

    how = ratio_bound(bound, base_bound)
    if how is None or not (base_cost > 0):
        return math.nan, how
    return cost / base_cost, how


# --------------------------------------------------------------------------- samplers


@dataclass
class Sampler:
    """One sampler of the run: its kernel, chain, timings and history."""

    name: str
    kernel: Any
    table: dict[str, Any]
    unit: str
    facts: dict[str, Any] = field(default_factory=dict)
    chain: Any = None
    burn: int = 0
    burn_s: float = 0.0
    seconds: float = 0.0
    steps: int = 0
    calibration: float = math.nan
    collected: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def collect(self, chain: Any, info: Mapping[str, Any]) -> None:
        """``on_step`` callback: keep the proposal log-weights, works and dH of each measured step."""
        if chain.step_count <= self.burn:
            return
        if "log_p_proposal" in info and "log_q_proposal" in info:
            lw = info["log_p_proposal"].to(torch.float64) - info["log_q_proposal"].to(torch.float64)
            self.collected.setdefault("log_w", []).append(lw.detach())
        if "work_proposal" in info:
            self.collected.setdefault("work", []).append(info["work_proposal"].detach().to(torch.float64))
        if "delta_h" in info:
            self.collected.setdefault("delta_h", []).append(info["delta_h"].detach().to(torch.float64))


def build(flow: Any, action: Any, table: Mapping[str, Any]) -> Any:
    """A kernel from a ``[kernel]`` table, through the kernel registry (as ``flowplug sample`` builds it)."""
    from flowplug.jobs.chains import build_kernel

    return build_kernel(flow, action, dict(table))


def hmc_table(steps: int, integrator: str, kind: str = "hmc") -> dict[str, Any]:
    """The ``[kernel]`` table of (latent) HMC with trajectory length 1."""
    return {"type": kind, "hmc": {"integrator": integrator, "steps": int(steps), "trajectory_length": 1.0}}


def omelyan_or_leapfrog(action: Any) -> str:
    """``"omelyan"`` if the registered HMC kernel accepts it, else ``"leapfrog"``."""
    from flowplug.errors import ConfigError

    try:
        build(None, action, hmc_table(1, "omelyan"))
    except ConfigError:
        return "leapfrog"
    return "omelyan"


def tune_hmc(action: Any, x: torch.Tensor, a: argparse.Namespace, integrator: str) -> tuple[dict[str, Any], Any]:
    """Smallest step count (trajectory length 1) whose acceptance on short runs is >= ``--hmc-target``.

    Starts at ``--hmc-min-steps`` and grows by 25 % (at least one step) up to
    ``--hmc-max-steps``; each try runs ``--tune-trajectories`` trajectories of every chain,
    continuing from the previous try's configurations (the thermalised ones at first).

    Returns:
        ``(table, facts)``: the HMC ``[kernel]`` table and ``{steps, tuning_acceptance,
        tuning_s, x}`` (x: the configurations after tuning, (B, 4, L..., 3, 3)).
    """
    from flowplug.jobs.chains import run_chains

    t0 = time.perf_counter()
    steps, seed = a.hmc_min_steps, a.seed + 100
    while True:
        table = hmc_table(steps, integrator)
        ch = run_chains(build(None, action, table), x, a.tune_trajectories, seed=seed)
        x = ch.state.x
        acc = float(ch.history_tensors()["accepted"].mean())
        if acc >= a.hmc_target or steps >= a.hmc_max_steps:
            break
        steps = min(max(steps + 1, int(round(steps * 1.25))), a.hmc_max_steps)
        seed += 1
    return table, {"steps": steps, "tuning_acceptance": acc, "tuning_s": time.perf_counter() - t0, "x": x}


def get_flow(lattice: tuple[int, ...], a: argparse.Namespace, runs: Path) -> tuple[Any, dict[str, Any]]:
    """The trained flow: loaded from ``--flow``, or trained here (``--train-config``, ``--train-set``).

    Returns:
        ``(flow, facts)``: the flow in eval mode with frozen parameters, and ``flow`` (its run),
        ``training_s`` (optimisation wall time from the run's ``summary.json``),
        ``training_job_s`` (the training job here, evaluation included; None for ``--flow``),
        ``flow_ess`` and ``train_steps`` where known.

    Raises:
        SystemExit: if ``--flow`` holds a flow for another lattice or field kind.
    """
    from flowplug.checkpoints import load_flow

    if a.flow:
        lf = load_flow(a.flow)
        if tuple(lf.flow.lattice) != lattice or lf.flow.field != "su3":
            raise SystemExit(
                f"--flow {a.flow}: a flow for {lf.flow.field} on {list(lf.flow.lattice)}, not su3 on {list(lattice)}"
            )
        path = Path(a.flow)
        summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").is_file() else {}
        facts = {"flow": str(a.flow), "training_job_s": None}
        flow = lf.flow
    else:
        from flowplug.config import build_config
        from flowplug.jobs.train import DEFAULT_CONFIG, OPEN_TABLES, run_train

        config = a.train_config or str(REPO / "examples" / "train_su3_4d.toml")
        out = runs / ("su3_" + "x".join(map(str, lattice)) + f"_beta{a.beta:g}")
        overrides = [
            f"lattice={list(lattice)}",
            "action.name='wilson'",
            "action.group='su3'",
            f"action.beta={a.beta}",
            f"out='{out}'",
            f"threads={a.threads}",
            "device='cpu'",
            "train.progress=false",
            *(QUICK_TRAIN if a.quick else ()),
            *a.train_set,
        ]
        cfg = build_config(DEFAULT_CONFIG, config_file=config, overrides=overrides, open_tables=OPEN_TABLES)
        note(f"training a flow: {config} with {' '.join(overrides[8:]) or 'no overrides'} -> {out}")
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON lines
            summary = run_train(cfg, force=True)
        facts = {"flow": f"trained here from {config}", "training_job_s": time.perf_counter() - t0}
        flow = load_flow(out).flow
    facts.update(
        training_s=summary.get("wall_time_s"),
        train_steps=summary.get("steps"),
        flow_ess=summary.get("ess"),
        flow_train_acceptance=summary.get("acceptance"),
    )
    flow = flow.eval()
    flow.requires_grad_(False)  # sampling only: no parameter gradients in flow HMC's forces
    return flow, facts


def nonequilibrium_options(a: argparse.Namespace) -> dict[str, Any]:
    """The ``[kernel.options]`` of ``nonequilibrium``: the ``--ne-set`` values, ``start = "prior"`` by default.

    ``--quick`` sets ``n_step = 2`` unless ``--ne-set`` gives it.
    """
    from flowplug.config import parse_override

    opts: dict[str, Any] = {}
    for text in a.ne_set:
        opts.update(parse_override(text))
    opts.setdefault("start", "prior")
    if a.quick:
        opts.setdefault("n_step", 2)
    return opts


def make_samplers(
    action: Any, x: torch.Tensor, flow: Any, flow_facts: dict[str, Any], a: argparse.Namespace
) -> tuple[list[Sampler], list[dict[str, Any]], torch.Tensor]:
    """Build the chosen samplers through the registry; tune HMC on the thermalised configurations.

    Returns:
        ``(samplers, skipped, x_hmc)``: the samplers in :data:`SAMPLERS` order, the JSON lines of
        skipped ones (``{"sampler", "skipped"}``), and HMC's configurations after tuning.
    """
    from flowplug.errors import FlowplugError, UnknownComponentError
    from flowplug.manager import registry

    chosen = [s for s in SAMPLERS if s in a.samplers]
    integrator = omelyan_or_leapfrog(action)
    out: list[Sampler] = []
    skipped: list[dict[str, Any]] = []
    x_hmc = x
    hmc_steps = None
    if "hmc" in chosen or "flow-hmc" in chosen:
        table, tuned = tune_hmc(action, x, a, integrator)
        x_hmc, hmc_steps = tuned.pop("x"), tuned.pop("steps")
        note(
            f"HMC ({integrator}, tau = 1): {hmc_steps} steps, acceptance {tuned['tuning_acceptance']:.3f} "
            f"while tuning ({tuned['tuning_s']:.1f} s)"
        )
    for name in chosen:
        if name == "heatbath-or":
            table = {"type": "heatbath-or", "options": {"overrelax": a.overrelax}}
            unit = f"sweep (1 heatbath + {a.overrelax} overrelaxation)"
            out.append(Sampler(name, build(None, action, table), table, unit, {"overrelax_per_heatbath": a.overrelax}))
        elif name == "hmc":
            table = hmc_table(hmc_steps, integrator)
            facts = {"integrator": integrator, "md_steps": hmc_steps, **tuned}
            out.append(Sampler(name, build(None, action, table), table, "trajectory", facts))
        elif name == "independence-metropolis":
            table = {"type": "independence-metropolis"}
            out.append(Sampler(name, build(flow, action, table), table, "proposal", dict(flow_facts)))
        elif name == "flow-hmc":
            steps = a.flow_hmc_steps or (1 if a.quick else hmc_steps)
            table = hmc_table(steps, integrator, "flow-hmc")
            facts = {"integrator": integrator, "md_steps": steps, "tuning_s": None, **flow_facts}
            out.append(Sampler(name, build(flow, action, table), table, "latent trajectory", facts))
        elif name == "nonequilibrium":
            try:
                registry("kernel").get("nonequilibrium")
            except UnknownComponentError:
                reason = "kernel 'nonequilibrium' is not registered (flowplug plugins lists the kernels)"
                note(f"skipping nonequilibrium: {reason}")
                skipped.append({"sampler": name, "skipped": reason})
                continue
            table = {"type": "nonequilibrium", "options": nonequilibrium_options(a)}
            try:
                kernel = build(flow, action, table)
            except (FlowplugError, TypeError, ValueError) as exc:
                reason = f"kernel 'nonequilibrium' could not be built with options {table['options']}: {exc}"
                note(f"skipping nonequilibrium: {reason}")
                skipped.append({"sampler": name, "skipped": reason})
                continue
            n_step = int(getattr(kernel, "n_step", 0) or 0)
            sched = list(getattr(kernel, "schedule", []) or [])
            protocol = {
                "n_step": n_step,
                "inner": getattr(kernel, "inner", None),
                "start": "flow" if getattr(kernel, "flow", None) is not None else "prior",
                "coupling_first": sched[0] if sched else None,
                "coupling_last": sched[-1] if sched else None,
                "repr": repr(kernel),
            }
            facts = {"protocol": protocol, "protocol_updates_per_proposal": n_step}
            if protocol["start"] == "flow":
                facts.update(flow_facts)
            out.append(Sampler(name, kernel, table, f"proposal ({n_step}-stage protocol)", facts))
    return out, skipped, x_hmc


def run(samplers: list[Sampler], x: torch.Tensor, x_hmc: torch.Tensor, measure: Measure, a: argparse.Namespace) -> None:
    """Burn in every sampler, choose its steps, then run all of them in alternating segments.

    Every chain is one :class:`flowplug.chain.Chain` for the whole run (the kernels keep their
    cached log q / work between segments). The kernel steps are timed; the time spent in
    ``measure`` is subtracted.
    """
    from flowplug.chain import Chain
    from flowplug.manager import get_plugin_manager

    hooks = get_plugin_manager()
    for i, s in enumerate(samplers):
        start = x_hmc if s.name == "hmc" else x
        gen = torch.Generator(device=start.device).manual_seed(a.seed + 1000 * (i + 1))
        s.chain = Chain(s.kernel, s.kernel.init(start.clone()), gen, measure=measure, kernel_name=s.name)
        s.burn = a.burn
        times = []
        for _ in range(a.burn):
            m0 = measure.seconds
            t0 = time.perf_counter()
            s.chain.run(1, hooks=hooks, on_step=s.collect)
            times.append(time.perf_counter() - t0 - (measure.seconds - m0))
        s.burn_s = sum(times)
        s.calibration = float(np.median(times[1:] if len(times) > 1 else times))
        if a.steps:
            s.steps = a.steps
        else:
            s.steps = max(a.min_steps, int(a.seconds / max(s.calibration, 1e-9)))
        note(f"{s.name}: {s.calibration:.3g} s per step of {a.chains} chains; {s.steps} steps to measure")
    for k in range(a.segments):
        for s in samplers:
            n = s.steps * (k + 1) // a.segments - s.steps * k // a.segments
            if n == 0:
                continue
            m0 = measure.seconds
            t0 = time.perf_counter()
            s.chain.run(n, hooks=hooks, on_step=s.collect)
            s.seconds += time.perf_counter() - t0 - (measure.seconds - m0)
        note(f"segment {k + 1}/{a.segments} done")


def result(
    s: Sampler, lattice: tuple[int, ...], a: argparse.Namespace, measure: Measure, therm_s: float
) -> dict[str, Any]:
    """The JSON record of one sampler (without the ratios, which :func:`add_ratios` fills in)."""
    from flowplug.stats import ess

    hist = {k: v[s.burn :] for k, v in s.chain.history_tensors().items()}
    per_step = s.seconds / (s.steps * a.chains)
    p = autocorrelation(hist["plaquette"], unit=f"steps ({s.unit})")
    q = autocorrelation(hist["topological_charge"], integer=measure.q_stout > 0, unit=f"steps ({s.unit})")
    q2 = autocorrelation(hist["topological_charge"] ** 2)
    acc = hist["accepted"]
    r: dict[str, Any] = {
        "sampler": s.name,
        "kernel": s.table["type"],
        "kernel_table": s.table,
        "lattice": list(lattice),
        "beta": a.beta,
        "chains": a.chains,
        "steps": s.steps,
        "step_unit": s.unit,
        "seconds": s.seconds,
        "seconds_per_step": per_step,
        "acceptance": float(acc.mean()),
        "plaquette": p["mean"],
        "plaquette_err": p["error"],
        "tau_int_plaquette": p["tau_int"],
        "tau_int_plaquette_err": p["tau_int_error"],
        "tau_int_plaquette_bound": p["bound"],
        "Q_definition": measure.q_definition,
        "Q2": q2["mean"],
        "Q2_err": q2["error"],
        "tau_int_Q": q["tau_int"],
        "tau_int_Q_err": q["tau_int_error"],
        "tau_int_Q_bound": q["bound"],
        "Q_changes_per_chain": q["changes_per_chain"],
        "cost_per_independent_plaquette_s": per_step * 2 * p["tau_int"],
        "cost_per_independent_plaquette_bound": p["bound"],
        "cost_per_independent_Q_s": per_step * 2 * q["tau_int"],
        "cost_per_independent_Q_bound": q["bound"],
        "bound_reasons": {"plaquette": p["reasons"], "Q": q["reasons"]},
        "thermalisation_s": therm_s,
        "start": (
            f"{a.chains} hot starts + {a.thermalize} heatbath-or sweeps (shared)"
            + (", HMC tuning trajectories" if s.name == "hmc" else "")
            + f", then {s.burn} own steps discarded"
        ),
        "burn_s": s.burn_s,
        "threads": a.threads,
        "seed": a.seed,
    }
    r.update(s.facts)
    if "log_w" in s.collected:
        r["proposal_ess"] = float(ess(torch.cat(s.collected["log_w"])))
    if "work" in s.collected:
        w = torch.cat(s.collected["work"])
        w = w[torch.isfinite(w)]
        r["work_mean"] = float(w.mean()) if w.numel() else math.nan
        r["work_std"] = float(w.std()) if w.numel() > 1 else math.nan
    if s.name == "nonequilibrium":
        r["protocol_s_per_proposal"] = per_step
    if "delta_h" in s.collected:
        dh = torch.cat(s.collected["delta_h"])
        r["mean_exp_minus_delta_h"] = float(torch.exp(-dh[torch.isfinite(dh)]).mean())
    return r


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Fill in ``ratio_*_vs_heatbath_or`` and ``ratio_*_bound`` (null without a heatbath-or row)."""
    base = next((r for r in rows if r["sampler"] == BASELINE), None)
    for r in rows:
        for obs in ("plaquette", "Q"):
            if base is None:
                r[f"ratio_{obs}_vs_heatbath_or"], r[f"ratio_{obs}_bound"] = math.nan, None
                continue
            key = f"cost_per_independent_{obs}"
            ratio, how = relative_cost(r[f"{key}_s"], r[f"{key}_bound"], base[f"{key}_s"], base[f"{key}_bound"])
            r[f"ratio_{obs}_vs_heatbath_or"], r[f"ratio_{obs}_bound"] = ratio, how


def finite_or_null(v: Any) -> Any:
    """``v`` with NaN and infinities replaced by None (JSON has neither), recursively."""
    if isinstance(v, dict):
        return {k: finite_or_null(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [finite_or_null(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def table(rows: list[dict[str, Any]]) -> str:
    """A readable table of the rows, with the ratios to heatbath-or (``>=``: lower bounds)."""
    ge = lambda flag: ">=" if flag else "  "  # noqa: E731

    def ratio(r: dict[str, Any], obs: str) -> str:
        how, v = r[f"ratio_{obs}_bound"], r[f"ratio_{obs}_vs_heatbath_or"]
        if how is None:
            return "undetermined"
        return f"{'' if how == '=' else how}{v:.3g}"

    lines = [
        f"{'sampler':24s} {'s/step':>9s} {'acc':>6s} {'<P>':>17s} {'tau(P)':>9s} {'tau(Q)':>9s} "
        f"{'s/indep P':>11s} {'s/indep Q':>11s} {'P vs HB-OR':>12s} {'Q vs HB-OR':>12s}"
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['sampler']:24s} skipped: {r['skipped']}")
            continue
        err = r["plaquette_err"]
        plaq = f"{r['plaquette']:.5f}({err:.5f})" if math.isfinite(err) else f"{r['plaquette']:.5f}(-)"
        lines.append(
            f"{r['sampler']:24s} {r['seconds_per_step']:9.3g} {r['acceptance']:6.3f} {plaq:>17s} "
            f"{ge(r['tau_int_plaquette_bound'])}{r['tau_int_plaquette']:7.3g} "
            f"{ge(r['tau_int_Q_bound'])}{r['tau_int_Q']:7.3g} "
            f"{ge(r['cost_per_independent_plaquette_bound'])}{r['cost_per_independent_plaquette_s']:9.3g} "
            f"{ge(r['cost_per_independent_Q_bound'])}{r['cost_per_independent_Q_s']:9.3g} "
            f"{ratio(r, 'plaquette'):>12s} {ratio(r, 'Q'):>12s}"
        )
    extra = []
    for r in rows:
        bits = [f"{k} {r[k]:.1f} s" for k in ("training_s", "training_job_s", "tuning_s") if r.get(k) is not None]
        if r.get("protocol_updates_per_proposal") is not None:
            bits.append(
                f"protocol {r['protocol_updates_per_proposal']} updates, "
                f"{r['protocol_s_per_proposal']:.3g} s per proposal"
            )
        if bits:
            extra.append(f"  {r['sampler']}: " + ", ".join(bits))
    if rows and "thermalisation_s" in rows[0]:
        extra.append(f"  thermalisation (shared): {rows[0]['thermalisation_s']:.1f} s; Q: {rows[0]['Q_definition']}")
    return "\n".join(lines + extra)


def note(text: str) -> None:
    """A progress or skip note on stderr (stdout carries only the JSON lines)."""
    print(f"[su3] {text}", file=sys.stderr, flush=True)


def parse_lattice(text: str) -> tuple[int, ...]:
    """``"4,4,4,4"`` -> (4, 4, 4, 4); the clover charge needs four dimensions."""
    try:
        lat = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lattice {text!r}: expected four integers such as 4,4,4,4") from None
    if len(lat) != 4 or min(lat) < 2:
        raise argparse.ArgumentTypeError(f"--lattice {text!r}: expected four extents >= 2 (the clover Q is 4D)")
    return lat


def parser() -> argparse.ArgumentParser:
    """The command line (``--help`` prints the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lattice", type=parse_lattice, default=(4, 4, 4, 4), help="L0,L1,L2,L3 (default 4,4,4,4)")
    ap.add_argument("--beta", type=float, default=6.0)
    ap.add_argument("--chains", type=int, default=8, help="chains per sampler, run as one batch")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument(
        "--samplers",
        type=lambda t: [s.strip() for s in t.split(",") if s.strip()],
        default=list(SAMPLERS),
        help=f"comma-separated subset of {','.join(SAMPLERS)}",
    )
    ap.add_argument("--thermalize", type=int, default=100, help="shared heatbath-or sweeps from the hot starts")
    ap.add_argument("--overrelax", type=int, default=4, help="overrelaxation sweeps per heatbath sweep (heatbath-or)")
    ap.add_argument("--hmc-target", type=float, default=0.8, help="HMC acceptance the step tuning reaches")
    ap.add_argument("--hmc-min-steps", type=int, default=4)
    ap.add_argument("--hmc-max-steps", type=int, default=64)
    ap.add_argument("--tune-trajectories", type=int, default=10, help="trajectories per chain and tuning try")
    ap.add_argument("--flow-hmc-steps", type=int, default=0, help="Omelyan steps of flow HMC (0: HMC's tuned count)")
    ap.add_argument("--burn", type=int, default=2, help="own steps discarded per sampler (>= 1; they time a step)")
    ap.add_argument("--seconds", type=float, default=60.0, help="measured wall time per sampler (unless --steps)")
    ap.add_argument("--steps", type=int, default=0, help="measured steps per chain for every sampler (0: --seconds)")
    ap.add_argument("--min-steps", type=int, default=4, help="least measured steps per sampler with --seconds")
    ap.add_argument("--segments", type=int, default=10, help="alternating segments (same machine load on all)")
    ap.add_argument("--q-stout", type=int, default=0, help="stout steps before measuring Q (0: unsmoothed clover Q)")
    ap.add_argument("--q-rho", type=float, default=0.1, help="stout weight rho of --q-stout")
    ap.add_argument("--flow", help="a flowplug train run directory (or checkpoint) for the flow samplers")
    ap.add_argument("--train-config", help="TOML of the training without --flow (default examples/train_su3_4d.toml)")
    ap.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE", help="training override")
    ap.add_argument("--ne-set", action="append", default=[], metavar="KEY=VALUE", help="nonequilibrium option")
    ap.add_argument("--runs", help="directory for the training run (default: a temporary one)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads of every sampler and the training")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="seconds-long smoke run: 2 chains, a few steps, a 2-layer flow trained 1 step (numbers meaningless)",
    )
    return ap


QUICK = {
    "chains": 2,
    "thermalize": 2,
    "tune_trajectories": 2,
    "hmc_min_steps": 2,
    "hmc_max_steps": 4,
    "burn": 1,
    "steps": 4,
    "segments": 2,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build, thermalise, tune, run and report every sampler (module docstring)."""
    ap = parser()
    a = ap.parse_args(argv)
    if a.quick:  # the quick defaults, unless given on the command line
        args = list(sys.argv[1:] if argv is None else argv)
        given = {
            opt.dest
            for opt in ap._actions
            if any(t == o or t.startswith(o + "=") for t in args for o in opt.option_strings)
        }
        for k, v in QUICK.items():
            if k not in given:
                setattr(a, k, v)
    unknown = set(a.samplers) - set(SAMPLERS)
    if unknown:
        ap.error(f"--samplers: unknown {sorted(unknown)}; choose from {','.join(SAMPLERS)}")
    if a.burn < 1 or a.chains < 1 or a.segments < 1:
        ap.error("--burn, --chains and --segments must be >= 1")
    torch.set_num_threads(a.threads)
    from flowplug.jobs.chains import run_chains
    from flowplug.theory import action_from_config

    lattice = tuple(a.lattice)
    action = action_from_config({"action": {"name": "wilson", "group": "su3", "beta": a.beta}})
    measure = Measure(action, a.q_stout, a.q_rho)
    with tempfile.TemporaryDirectory() as tmp:
        flow, flow_facts = None, {}
        ne_start = str(nonequilibrium_options(a)["start"]).strip().lower()
        if any(s in a.samplers for s in FLOW_SAMPLERS) or (
            "nonequilibrium" in a.samplers and ne_start in ("flow", "auto")
        ):
            flow, flow_facts = get_flow(lattice, a, Path(a.runs or tmp))
        gen = torch.Generator().manual_seed(a.seed)
        x = action.hot_start(lattice, a.chains, generator=gen)
        t0 = time.perf_counter()
        therm = build(None, action, {"type": "heatbath-or", "options": {"overrelax": a.overrelax}})
        x = run_chains(therm, x, a.thermalize, seed=a.seed + 1).state.x
        therm_s = time.perf_counter() - t0
        note(f"thermalised {a.chains} hot starts with {a.thermalize} heatbath-or sweeps in {therm_s:.1f} s")
        samplers, skipped, x_hmc = make_samplers(action, x, flow, flow_facts, a)
        run(samplers, x, x_hmc, measure, a)
    rows = [result(s, lattice, a, measure, therm_s) for s in samplers]
    add_ratios(rows)
    order = {name: i for i, name in enumerate(SAMPLERS)}
    rows = sorted(rows + skipped, key=lambda r: order[r["sampler"]])
    for r in rows:
        print(json.dumps(finite_or_null(r)), flush=True)
    print(table(rows), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
