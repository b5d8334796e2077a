r"""Non-equilibrium (Jarzynski) proposals and stochastic normalizing flows (hook ``flowplug_kernels``).

Kernel ``nonequilibrium`` (alias ``snf``, :class:`NonEquilibrium`): an independence
Metropolis sampler whose proposal is a non-equilibrium Monte Carlo evolution. Each
proposal starts from an exact sample of a tractable, normalised distribution q_0 (the
Haar / uniform / normal prior of the field kind, or a trained flow) and is driven to the
target p = exp(-S)/Z through a protocol of ``n_step`` stages, each an exact Monte Carlo
update at an intermediate coupling, optionally preceded by a flow layer. The work W of
the evolution gives the importance weight exp(-W) and the acceptance.

Protocol and work
-----------------
Couplings c_1, ..., c_N (N = ``n_step``; c_N the target's): by default linear,
c_k = c_start + (k/N) (c_target - c_start), or c_k = c(k/N) with c piecewise linear
through given knots (``schedule_knots``; spaced by thermodynamic length they put the
stages where the work is dissipated, :func:`thermodynamic_knots`). S_k is the action at c_k (S_N = S), and
S_0(x) := -log q_0(x). From x_0 ~ q_0, stage k = 1..N

1. changes the coupling from c_{k-1} to c_k;
2. applies the flow layer f_k, if any: y_k = f_k(x_{k-1}) (else y_k = x_{k-1});
3. draws x_k ~ T_k(y_k, .), an exact update that leaves p_k ~ exp(-S_k) invariant
   (a heatbath(-overrelaxation) sweep for SU(N) Wilson, an HMC trajectory for any
   action, or a plugin kernel).

The generalised work of the path (x_0, ..., x_N) is

    W = sum_{k=1}^{N} [ S_k(y_k) - S_{k-1}(x_{k-1}) - log|det J_{f_k}(x_{k-1})| ]
      = S(x_N) + log q_0(x_0) - Q - sum_k log|det J_{f_k}|,

Q = sum_k [S_k(x_k) - S_k(y_k)] the heat absorbed in the Monte Carlo updates (Caselle,
Cellini, Nada, Panero, arXiv:2201.08862, sections 2-3: the work of non-equilibrium
Monte Carlo and its extension to stochastic normalizing flows, where the layers add their
log-Jacobians). N = 0 gives W = S(x_0) + log q_0(x_0): plain independence Metropolis
with q_0. Densities and log-Jacobians refer to the measure of the field kind (Haar for
SU(N), d theta for U(1) angles, Lebesgue for scalars; :mod:`flowplug.plugins.priors`).

Jarzynski's equality: with T~_k the time reversal of T_k with respect to p_k
(p_k(x) T_k(x, y) = p_k(y) T~_k(y, x)), the reverse-path measure
P_R = p(x_N) prod_k T~_k(x_k -> y_k) |det J_{f_k}| and the forward measure
P_F = q_0(x_0) prod_k T_k(y_k -> x_k) satisfy P_R / P_F = exp(-W) / Z (Z_0 = 1 for a
normalised q_0). Hence E_F[exp(-W)] = Z / Z_0 (Jarzynski, Phys. Rev. Lett. 78 (1997) 2690;
Crooks, Phys. Rev. E 61 (2000) 2361), exp(-W) is an exact importance weight for the
endpoint x_N, E_F[O(x_N) exp(-W)] / E_F[exp(-W)] = <O>_p, and E_F[W] + log Z >= 0 is the
Kullback-Leibler divergence of P_F from P_R (2201.08862, section 3; Bulgarelli, Cellini,
Nada, arXiv:2412.00200, section II).

The Markov chain
----------------
The chain runs on whole paths: its target is P_R, its proposals are independent draws
from P_F, and the independence-Metropolis test (Tierney, Ann. Statist. 22 (1994) 1701,
section 2.3.3) is

    log A = log[P_R/P_F](proposal) - log[P_R/P_F](current) = W(current) - W(proposal),

in float64 through :func:`flowplug.metropolis.guarded_log_accept` and
:func:`flowplug.metropolis.metropolis_test` (a proposal with a non-finite W or S is
rejected). Only x_N and W of a path are needed afterwards, so the state is x = x_N with
``extras[kernel.work_key]`` = W of the path that produced it, (B,) float64; a rejected
chain keeps its x and its W. The x-marginal of P_R is p, so the x chain is exact
whatever the protocol: a short protocol only lowers the acceptance, which rises towards 1
as n_step grows (the evolution approaches a quasi-static one, W -> -log Z).

A state that carries no W for this kernel (a hot start, a configuration read from a file,
a configuration another kernel of a mixture or cycle has just moved, a production
configuration handed to ``flowplug propose``) gets one from a path drawn backwards from
x: x_N = x, y_k ~ T~_k(x_k, .), x_{k-1} = f_k^{-1}(y_k) for k = N..1, and W evaluated on
it. That is an exact draw from the conditional P_R(path | x_N = x), a Gibbs step on the
path variables, so the combined kernel (refresh the path, then the test) leaves p
invariant on its own and composes exactly with any other p-invariant kernel; it costs
one more evolution. The time reversal of a heatbath sweep is the sweep with the colour
classes and the SU(2) subgroups visited in the opposite order (each class/subgroup
update is a reversible Gibbs step; the subgroup order is reversed by conjugating every
link with the anti-diagonal permutation J, U -> J U J, which maps the subgroup (i, j) to
(N-1-j, N-1-i) and leaves the action invariant); overrelaxation sweeps reverse likewise
(:func:`flowplug.plugins.heatbath.overrelaxation_sweep` with ``reverse=True``); an HMC
trajectory with fresh momenta and its Metropolis test satisfies detailed balance, so
T~ = T. A plugin kernel used inside must say which: ``reversible = True`` or a
``reverse_step(state, generator)`` method.

``flowplug propose``: the production code needs the work
-------------------------------------------------------
The quantity that replaces log q of a flow proposal is the work: with
log q_eff(x) := W + log p(x) = W - S(x), the test above is exactly the flow test
log A = [log p(x') - log q_eff(x')] - [log p(x) - log q_eff(x)]. So ``step`` reports
``log_q_proposal`` / ``log_q_current`` = W - S, and a production code whose action
S_prod is not the protocol's final action S accepts with
min(1, exp([-S_prod(x') - log q_eff(x')] - [-S_prod(x) - log q_eff(x)])), the rule of
``flowplug propose --no-decide`` for flows (a last stage that switches S to S_prod
without an update adds S_prod - S to both works). :meth:`NonEquilibrium.propose_from`
gives x' and both values (the current one through a reverse path).

References:
    Jarzynski, Phys. Rev. Lett. 78 (1997) 2690; Crooks, Phys. Rev. E 61 (2000) 2361;
    Neal, Stat. Comput. 11 (2001) 125 (annealed importance sampling);
    Wu, Koehler, Noe, arXiv:2002.06707 (stochastic normalizing flows);
    Caselle, Cellini, Nada, Panero, arXiv:2201.08862, sections 2-3;
    Bulgarelli, Cellini, Nada, arXiv:2412.00200, section II (SU(3) in 4D with heatbath
    and overrelaxation updates and gauge-equivariant layers);
    Tierney, Ann. Statist. 22 (1994) 1701, sections 2.3.3 and 2.4.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from flowplug.chain import ChainState, Kernel
from flowplug.errors import ConfigError
from flowplug.hookspecs import hookimpl
from flowplug.metropolis import guarded_log_accept, metropolis_test
from flowplug.records import KernelSpec
from flowplug.stats import jarzynski  # re-exported: part of this module's API

__all__ = [
    "NonEquilibrium",
    "jarzynski",
    "linear_schedule",
    "piecewise_linear_schedule",
    "reversed_heatbath_sweep",
    "thermodynamic_knots",
    "with_coupling",
]

_F64 = torch.float64

#: Inner kernels handled natively (heatbath sweeps at every stage's beta, sharing one checkerboard).
LOCAL_INNER = ("heatbath", "heatbath-or")


# --------------------------------------------------------------------------- helpers


def linear_schedule(start: float, target: float, n_step: int) -> list[float]:
    """The linear protocol c_k = start + (k / n_step) (target - start), k = 1..n_step.

    Arguments:
        start: Coupling of the start distribution (float).
        target: The target coupling (float); the last entry equals it exactly.
        n_step: Number of stages (int >= 0).

    Returns:
        ``n_step`` floats (an empty list for n_step = 0).

    Raises:
        ConfigError: for n_step < 0 or a non-finite coupling.

    References:
        Caselle et al., arXiv:2201.08862, section 4 (linear protocols in the coupling).
    """
    if isinstance(n_step, bool) or int(n_step) != n_step or int(n_step) < 0:
        raise ConfigError(f"nonequilibrium: n_step must be an integer >= 0; found {n_step!r}")
    start, target = float(start), float(target)
    if not (math.isfinite(start) and math.isfinite(target)):
        raise ConfigError(f"nonequilibrium: couplings must be finite; found start {start}, target {target}")
    n = int(n_step)
    return [start + (k / n) * (target - start) if k < n else target for k in range(1, n + 1)]


def _knot_pairs(knots: Any) -> list[tuple[float, float]]:
    """Validated (t, c) pairs: finite, t strictly increasing from 0 to 1; ConfigError otherwise."""
    try:
        pairs = [(float(t), float(c)) for t, c in knots]
    except (TypeError, ValueError):
        raise ConfigError(
            f"nonequilibrium: schedule_knots must be a list of [t, coupling] pairs; found {knots!r}"
        ) from None
    if len(pairs) < 2:
        raise ConfigError(f"nonequilibrium: schedule_knots needs >= 2 pairs [t, coupling]; found {len(pairs)}")
    if not all(math.isfinite(t) and math.isfinite(c) for t, c in pairs):
        raise ConfigError(f"nonequilibrium: schedule_knots entries must be finite; found {pairs}")
    ts = [t for t, _ in pairs]
    if ts[0] != 0.0 or ts[-1] != 1.0 or any(b <= a for a, b in zip(ts, ts[1:], strict=False)):
        raise ConfigError(
            f"nonequilibrium: the t of schedule_knots must rise strictly from 0 to 1 (first 0, last 1); found t = {ts}"
        )
    return pairs


def piecewise_linear_schedule(knots: Sequence[Sequence[float]], n_step: int) -> list[float]:
    r"""The protocol c_k = c(k / n_step), k = 1..n_step, c piecewise linear through ``knots``.

    A non-uniform protocol puts more stages where the driven system resists: equal steps
    in t cover equal thermodynamic length when the knots come from
    :func:`thermodynamic_knots` (Crooks, Phys. Rev. Lett. 99 (2007) 100602; Sivak and
    Crooks, Phys. Rev. Lett. 108 (2012) 190602: the dissipated work of a slow protocol is
    ~ (thermodynamic length)^2 / n_step, smallest when the length is covered evenly).
    ``[[0, c0], [1, c1]]`` is :func:`linear_schedule` (to rounding).

    Arguments:
        knots: Pairs [t, c] (floats), t rising strictly from t = 0 (first) to t = 1
            (last); c(0) is the start coupling, c(1) the target's (the last entry of the
            result equals it exactly).
        n_step: Number of stages (int >= 0).

    Returns:
        ``n_step`` floats (an empty list for n_step = 0).

    Raises:
        ConfigError: for n_step < 0, fewer than two knots, a non-finite entry, or t not
            rising strictly from 0 to 1.

    References:
        Caselle et al., arXiv:2201.08862, section 4 (protocols in the coupling);
        Bulgarelli, Cellini, Nada, arXiv:2412.00200, section V (protocol optimisation).
    """
    if isinstance(n_step, bool) or int(n_step) != n_step or int(n_step) < 0:
        raise ConfigError(f"nonequilibrium: n_step must be an integer >= 0; found {n_step!r}")
    pairs = _knot_pairs(knots)
    n = int(n_step)
    out = []
    for k in range(1, n + 1):
        t = k / n
        if k == n:
            out.append(pairs[-1][1])
            continue
        i = next(j for j in range(1, len(pairs)) if pairs[j][0] >= t)
        (t0, c0), (t1, c1) = pairs[i - 1], pairs[i]
        out.append(c0 + (t - t0) / (t1 - t0) * (c1 - c0))
    return out


def thermodynamic_knots(couplings: Sequence[float], metric: Sequence[float]) -> list[list[float]]:
    r"""Knots that space a protocol evenly in thermodynamic length.

    With the friction (metric) g(c) tabulated at ``couplings``, the thermodynamic length
    from the first coupling is l(c) = int sqrt(g(c')) dc' (trapezoidal rule); the knots are
    (t_i, c_i) = (l(c_i) / l(c_last), c_i), so that :func:`piecewise_linear_schedule`
    spends stages in proportion to sqrt(g). For a Monte Carlo protocol in beta, g(beta)
    = Var(E) (2 tau_int(E)) with E = dS/dbeta the action per unit coupling (Var(E) alone
    when the update equilibrates E in one step).

    Arguments:
        couplings: Couplings c_0 < c_1 < ... (or all decreasing), >= 2 floats; the first
            is the protocol's start, the last its target.
        metric: g at each coupling (floats > 0, same length).

    Returns:
        ``[[t_i, c_i], ...]`` (list of [float, float]) with t_0 = 0 and t_last = 1.

    Raises:
        ConfigError: for mismatched lengths, fewer than two couplings, non-monotone or
            non-finite couplings, or a metric value that is not finite and > 0.

    References:
        Sivak and Crooks, Phys. Rev. Lett. 108 (2012) 190602; Crooks, Phys. Rev. Lett. 99
        (2007) 100602.
    """
    c = [float(v) for v in couplings]
    g = [float(v) for v in metric]
    if len(c) != len(g) or len(c) < 2:
        raise ConfigError(
            f"thermodynamic_knots: needs >= 2 couplings and one metric value each; found {len(c)} and {len(g)}"
        )
    if not all(math.isfinite(v) for v in c + g) or not all(v > 0 for v in g):
        raise ConfigError(f"thermodynamic_knots: couplings must be finite and the metric finite and > 0; found {g}")
    steps = [b - a for a, b in zip(c, c[1:], strict=False)]
    if not (all(d > 0 for d in steps) or all(d < 0 for d in steps)):
        raise ConfigError(f"thermodynamic_knots: the couplings must be strictly monotone; found {c}")
    length = [0.0]
    for i, d in enumerate(steps):
        length.append(length[-1] + 0.5 * abs(d) * (math.sqrt(g[i]) + math.sqrt(g[i + 1])))
    knots = [[v / length[-1], ci] for v, ci in zip(length, c, strict=True)]
    knots[-1][0] = 1.0
    return knots


def with_coupling(action: Any, name: str, value: float) -> Any:
    """A copy of ``action`` with the coupling ``name`` set to ``value``.

    Built anew by its class from its ``parameters`` when it has them (so that derived
    constants are recomputed), else a shallow copy with the attribute replaced.

    Arguments:
        action: An action (``field``, ``action(x)``; :mod:`flowplug.theory`).
        name: Coupling attribute, e.g. ``"beta"``.
        value: New value (float).

    Returns:
        A new action object; ``action`` is not modified.

    Raises:
        ConfigError: if the action has no coupling ``name``.
    """
    if not hasattr(action, name):
        declared = ", ".join(getattr(action, "parameters", ())) or "none declared"
        raise ConfigError(
            f"nonequilibrium: the action {type(action).__name__} has no coupling {name!r} to drive "
            f"(its couplings: {declared}); set kernel.options.coupling"
        )
    params = tuple(getattr(action, "parameters", ()))
    if name in params:
        kwargs = {p: getattr(action, p) for p in params}
        kwargs[name] = float(value)
        try:
            return type(action)(**kwargs)
        except TypeError:
            pass
    new = copy.copy(action)
    setattr(new, name, float(value))
    new.__dict__.pop("_field_space", None)
    return new


def _flip(u: torch.Tensor) -> torch.Tensor:
    """J U J for the anti-diagonal permutation J: (J U J)_{ab} = U_{N-1-a, N-1-b}."""
    return u.flip((-2, -1))


def reversed_heatbath_sweep(
    u: torch.Tensor, beta: float, board: Any, generator: torch.Generator | None = None, **options: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The time reversal of :func:`flowplug.plugins.heatbath.heatbath_sweep`.

    A heatbath sweep is the product G_1 G_2 ... G_m of reversible Gibbs updates (one per
    colour class and SU(2) subgroup); its reversal with respect to exp(-S) is
    G_m ... G_1. This runs the colour classes in the opposite order, and the subgroups in
    the opposite order by conjugating the links with the anti-diagonal permutation J
    (U -> J U J maps the subgroup (i, j) to (N-1-j, N-1-i); the Wilson action, the staples'
    products and Haar measure are invariant), so that the sequential subgroup loop of
    :func:`~flowplug.plugins.heatbath.heatbath_links` visits them backwards.

    Arguments:
        u: SU(N) links (B, d, L..., N, N), complex128 (not modified).
        beta: Wilson coupling >= 0 of S = -(beta/N) sum_P Re tr U_P.
        board: The :class:`flowplug.plugins.heatbath.Checkerboard` of the lattice.
        generator: Random generator on the device of ``u``.
        **options: Passed to :func:`~flowplug.plugins.heatbath.sample_a0`.

    Returns:
        ``(u_new, tries)`` as :func:`~flowplug.plugins.heatbath.heatbath_sweep`.

    Raises:
        ValueError: if staples are not finite.

    References:
        Cabibbo and Marinari, Phys. Lett. B 119 (1982) 387; Tierney (1994), section 2.4
        (the reversal of a cycle of reversible kernels is the cycle reversed).
    """
    from flowplug.plugins.heatbath import heatbath_sweep

    rev = copy.copy(board)
    rev.classes = list(board.classes)[::-1]
    rev.neighbours = list(board.neighbours)[::-1]
    n = u.shape[-1]
    if n > 2:
        u = _flip(u)
    u, tries = heatbath_sweep(u, beta, rev, generator, **options)
    if n > 2:
        u = _flip(u)
    return u, tries


# --------------------------------------------------------------------------- inner updates


class _LocalUpdate:
    """Heatbath(-overrelaxation) sweeps at each stage's beta, and their time reversal."""

    def __init__(self, name: str, action: Any, betas: Sequence[float], options: Mapping[str, Any]) -> None:
        from flowplug.plugins.heatbath import Heatbath, HeatbathOR

        cls = HeatbathOR if name == "heatbath-or" else Heatbath
        try:
            self.kernel = cls(action, **dict(options))  # validates the action and the options
        except TypeError as exc:
            raise ConfigError(
                f"nonequilibrium: inner kernel '{name}' rejects the options {sorted(options)}: {exc}"
            ) from None
        bad = [b for b in betas if not b >= 0]
        if bad:
            raise ConfigError(
                f"nonequilibrium: the heatbath needs couplings beta >= 0 at every stage; found {bad[:3]} "
                "(beta_start < 0?)"
            )
        self.betas = [float(b) for b in betas]

    def _finish(self, u: torch.Tensor) -> torch.Tensor:
        from flowplug.plugins.heatbath import project_sun

        return project_sun(u) if self.kernel.reunitarize else u

    def forward(self, x: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
        from flowplug.plugins.heatbath import heatbath_sweep, overrelaxation_sweep

        hb = self.kernel
        board = hb.board(x)
        u, _ = heatbath_sweep(
            x, self.betas[k], board, generator, creutz_below=hb.creutz_below, candidates=hb.candidates
        )
        for _ in range(hb.overrelax):
            u = overrelaxation_sweep(u, board)
        return self._finish(u)

    def reverse(self, x: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
        from flowplug.plugins.heatbath import overrelaxation_sweep

        hb = self.kernel
        board = hb.board(x)
        u = x
        for _ in range(hb.overrelax):
            u = overrelaxation_sweep(u, board, reverse=True)
        u, _ = reversed_heatbath_sweep(
            u, self.betas[k], board, generator, creutz_below=hb.creutz_below, candidates=hb.candidates
        )
        return self._finish(u)


class _KernelUpdate:
    """One step of a registered kernel built for each stage's action, and its time reversal."""

    def __init__(self, spec: Any, actions: Sequence[Any], options: Mapping[str, Any], target: Any) -> None:
        self.spec = spec
        self.actions = list(actions)
        self.options = dict(options)
        self._kernels: dict[int, Any] = {}
        probe = self._build(target)  # validates the options now
        self.reverse_name = _reversal(probe, spec.name)

    def _build(self, action: Any) -> Any:
        try:
            return self.spec.factory(action=action, **self.options)
        except TypeError as exc:
            raise ConfigError(
                f"nonequilibrium: inner kernel '{self.spec.name}' rejects the options {sorted(self.options)}: {exc}"
            ) from None

    def kernel(self, k: int) -> Any:
        if k not in self._kernels:
            self._kernels[k] = self._build(self.actions[k])
        return self._kernels[k]

    def forward(self, x: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
        kern = self.kernel(k)
        state, _ = kern.step(kern.init(x), generator)
        return state.x

    def reverse(self, x: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
        kern = self.kernel(k)
        step = kern.reverse_step if self.reverse_name == "reverse_step" else kern.step
        state, _ = step(kern.init(x), generator)
        return state.x


def _reversal(kernel: Any, name: str) -> str:
    """``"step"`` for a reversible kernel, ``"reverse_step"`` if it has one; ConfigError otherwise."""
    from flowplug.plugins.hmc import HMC

    if callable(getattr(kernel, "reverse_step", None)):
        return "reverse_step"
    if isinstance(kernel, HMC) or getattr(kernel, "reversible", False) is True:
        return "step"
    raise ConfigError(
        f"nonequilibrium: inner kernel '{name}' does not declare its time reversal: the reverse paths "
        "(for states the kernel did not propose) need a kernel that satisfies detailed balance "
        "(attribute reversible = True) or has reverse_step(state, generator); use inner = 'hmc', "
        "'heatbath' or 'heatbath-or'"
    )


def _default_inner(action: Any) -> str:
    from flowplug.plugins.theories import WilsonGaugeAction

    if (
        isinstance(action, WilsonGaugeAction)
        and getattr(action, "n", 1) >= 2
        and type(action).action is WilsonGaugeAction.action
    ):
        return "heatbath"
    return "hmc"


# --------------------------------------------------------------------------- the kernel


class NonEquilibrium(Kernel):
    r"""Independence Metropolis with non-equilibrium (Jarzynski) proposals; a stochastic normalizing flow.

    Every ``step`` draws, for each of the B chains, a fresh evolution from the start
    distribution q_0 through the protocol (module docstring), with work W', and accepts
    its endpoint with probability min(1, exp(W - W')), W the work stored with the current
    configuration (computed from a reverse path when the state has none). Float64
    throughout; every decision through :mod:`flowplug.metropolis`.

    Arguments:
        action: The target action (``field``, ``action(x)``; no auxiliary fields).
        n_step: Number of stages N (int >= 0, default 10; 0 = independence Metropolis
            with q_0).
        beta_start: Start value of the driven coupling. Default: 0 without a flow (the
            prior: Haar / uniform U(1) is beta = 0 exactly); the target value with a flow
            (give the coupling the flow was trained at).
        coupling: Name of the driven coupling of the action (default ``"beta"``).
        schedule: Explicit couplings c_1..c_N (floats; the last must be the target's);
            overrides ``beta_start`` and sets N = len(schedule).
        schedule_knots: A non-uniform protocol of ``n_step`` stages: pairs [t, c] with t
            rising strictly from 0 to 1 and c(1) the target coupling; c_k = c(k / N), c
            piecewise linear through the knots (:func:`piecewise_linear_schedule`; knots
            from a measured friction profile, :func:`thermodynamic_knots`, put the stages
            where the work is dissipated). Not together with ``schedule`` or
            ``beta_start`` (the knot at t = 0 is the start coupling).
        inner: Exact update at every stage: ``"heatbath"`` or ``"heatbath-or"`` (SU(N)
            Wilson; beta driven), ``"hmc"`` (any action), or a registered kernel that is
            reversible or has ``reverse_step``. Default ``"auto"``: heatbath for the SU(N)
            Wilson action, hmc otherwise.
        start: ``"auto"`` (the flow if given, else the prior), ``"prior"`` (the field
            kind's default prior, :func:`flowplug.flow.default_prior`, even with a flow)
            or ``"flow"``.
        flow: Optional trained :class:`flowplug.flow.Flow`: the start distribution
            (samples with their exact log q); ``flowplug sample/resample --flow`` pass it.
        layers: Optional flow layers of the protocol (Python API), a sequence of N entries,
            each ``None`` or a module with ``forward(x) -> (y, logdet)`` and
            ``inverse(y) -> (x, logdet_inv)`` (logdet (B,) relative to the field's
            measure), applied at stage k after the coupling change and before the update.
        **inner_options: Options of the inner kernel (``overrelax``, ``creutz_below``,
            ``candidates`` for the heatbath; ``steps``, ``trajectory_length``,
            ``integrator`` for hmc; a plugin kernel's own).

    Raises:
        ConfigError: for n_step < 0, an unknown ``start``, ``start = "flow"`` without a
            flow, a flow or layers for another field kind, a wrong number of layers, a
            schedule or schedule_knots that does not end at the target coupling, knots
            that are not [t, c] pairs with t rising strictly from 0 to 1, schedule_knots
            together with schedule or beta_start, an action with auxiliary
            fields (``refresh``), a coupling the action does not have, an inner kernel
            that rejects the action or its options, or one without a known time reversal.
        UnknownComponentError: for an unregistered ``inner``.

    Attributes:
        schedule: The couplings c_1..c_N (list of float).
        work_key: Name of the (B,) float64 entry of ``ChainState.extras`` that holds W of
            the current configuration (``"work.<digest of the protocol>"``, so that two
            different protocols in one cycle never share a stale work).

    ``step`` returns ``info`` with ``accepted`` (B,) bool, ``log_accept``,
    ``work_proposal``, ``work_current``, ``log_p_proposal``, ``log_p_current``,
    ``log_q_proposal`` and ``log_q_current`` (the effective log q = W - S; all (B,)
    float64; the ``current`` values are those before the step), and ``refreshed``
    (B,) bool: chains whose work came from a reverse path in this step.

    References:
        Caselle, Cellini, Nada, Panero, arXiv:2201.08862, sections 2-3; Bulgarelli,
        Cellini, Nada, arXiv:2412.00200, section II; Jarzynski, Phys. Rev. Lett. 78 (1997)
        2690; Tierney, Ann. Statist. 22 (1994) 1701, section 2.3.3.
    """

    name = "nonequilibrium"

    def __init__(
        self,
        action: Any,
        *,
        n_step: int | None = None,
        beta_start: float | None = None,
        coupling: str = "beta",
        schedule: Sequence[float] | None = None,
        schedule_knots: Sequence[Sequence[float]] | None = None,
        inner: str = "auto",
        start: str = "auto",
        flow: Any = None,
        layers: Sequence[Any] | None = None,
        **inner_options: Any,
    ) -> None:
        if getattr(action, "refresh", None) is not None:
            raise ConfigError(
                "nonequilibrium: the action has auxiliary fields (refresh); the work needs S(x) alone, "
                "so pseudofermion actions are not supported (use an exact-determinant action)"
            )
        start = str(start).strip().lower()
        if start not in ("auto", "prior", "flow"):
            raise ConfigError(f"nonequilibrium: start must be 'auto', 'prior' or 'flow'; found {start!r}")
        if start == "flow" and flow is None:
            raise ConfigError("nonequilibrium: start = 'flow' needs a flow (--flow CHECKPOINT)")
        if flow is not None and getattr(flow, "field", action.field) != action.field:
            raise ConfigError(
                f"nonequilibrium: the flow samples '{flow.field}' fields but the action acts on '{action.field}'"
            )
        self.action = action
        self.field = action.field
        self.flow = flow if start in ("auto", "flow") else None
        self.coupling = str(coupling)
        if not hasattr(action, self.coupling):
            with_coupling(action, self.coupling, 0.0)  # raises the ConfigError naming the couplings
        target = getattr(action, self.coupling)
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target):
            raise ConfigError(
                f"nonequilibrium: the coupling {self.coupling!r} to drive must be a finite number; "
                f"the action has {self.coupling} = {target!r}"
            )
        target = float(target)
        if schedule_knots is not None:
            if schedule is not None or beta_start is not None:
                raise ConfigError(
                    "nonequilibrium: give schedule_knots alone, without schedule or beta_start "
                    "(the knot at t = 0 is the start coupling)"
                )
            pairs = _knot_pairs(schedule_knots)
            if pairs[-1][1] != target:
                raise ConfigError(
                    f"nonequilibrium: the last of schedule_knots must be [1, {target}] (the target "
                    f"{self.coupling}); found {list(pairs[-1])}"
                )
            schedule = piecewise_linear_schedule(pairs, 10 if n_step is None else n_step)
        if schedule is not None:
            sched = [float(c) for c in schedule]
            if n_step is not None and n_step != len(sched):
                raise ConfigError(f"nonequilibrium: n_step = {n_step} but the schedule has {len(sched)} entries")
            if sched and sched[-1] != target:
                raise ConfigError(
                    f"nonequilibrium: the schedule must end at the target {self.coupling} = {target}; found {sched[-1]}"
                )
            if not all(math.isfinite(c) for c in sched):
                raise ConfigError(f"nonequilibrium: schedule entries must be finite; found {sched}")
            self.schedule = sched
        else:
            if beta_start is None:
                beta_start = target if self.flow is not None else 0.0
            self.schedule = linear_schedule(float(beta_start), target, 10 if n_step is None else n_step)
        self.n_step = len(self.schedule)
        self.actions = [with_coupling(action, self.coupling, c) for c in self.schedule]
        if layers is not None:
            layers = list(layers)
            if len(layers) != self.n_step:
                raise ConfigError(
                    f"nonequilibrium: layers must have one entry (a layer or None) per stage: "
                    f"{self.n_step} stages, found {len(layers)}"
                )
        self.layers: list[Any] = list(layers) if layers is not None else [None] * self.n_step
        inner = str(inner).strip().lower()
        self.inner = _default_inner(action) if inner == "auto" else inner
        self.inner_options = dict(inner_options)
        self._update: _LocalUpdate | _KernelUpdate | None = None
        if self.n_step:
            self._update = self._build_update()
        self._priors: dict[tuple[tuple[int, ...], str], Any] = {}
        self.work_key = "work." + self._digest()

    # ------------------------------------------------------------ construction

    def _build_update(self) -> _LocalUpdate | _KernelUpdate:
        from flowplug.manager import registry
        from flowplug.theory import kind_accepted

        spec = registry("kernel").get(self.inner)
        if spec.name in LOCAL_INNER:
            if self.coupling != "beta":
                raise ConfigError(
                    f"nonequilibrium: the heatbath drives beta; found coupling = {self.coupling!r} (use inner = 'hmc')"
                )
            return _LocalUpdate(spec.name, self.action, self.schedule, self.inner_options)
        if spec.name == self.name:
            raise ConfigError("nonequilibrium: the inner kernel cannot be 'nonequilibrium' itself")
        if spec.fields and not kind_accepted(self.field, spec.fields):
            raise ConfigError(
                f"nonequilibrium: inner kernel '{spec.name}' updates {', '.join(spec.fields)} fields; "
                f"the action acts on {self.field}"
            )
        return _KernelUpdate(spec, self.actions, self.inner_options, self.action)

    def _digest(self) -> str:
        h = hashlib.sha256()
        h.update(
            repr(
                (
                    type(self.action).__name__,
                    self.field,
                    self.coupling,
                    self.schedule,
                    self.inner,
                    sorted((k, repr(v)) for k, v in self.inner_options.items()),
                    self.flow is not None,
                    [layer is not None for layer in self.layers],
                )
            ).encode()
        )
        for module in [self.flow, *self.layers]:
            if module is not None and hasattr(module, "state_dict"):
                for key, t in module.state_dict().items():
                    h.update(key.encode())
                    h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:12]

    # ------------------------------------------------------------ start distribution

    def _prior(self, lattice: tuple[int, ...], device: torch.device) -> Any:
        key = (lattice, str(device))
        if key not in self._priors:
            from flowplug.flow import make_prior

            self._priors[key] = make_prior(None, lattice=lattice, field=self.field).to(device)
        return self._priors[key]

    def start_sample(
        self, n: int, lattice: Sequence[int], generator: torch.Generator | None = None, device: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` exact draws x_0 ~ q_0 with log q_0(x_0), (n,) float64.

        Arguments:
            n: Number of draws.
            lattice: (L_0, ..., L_{d-1}) (the flow's, if it starts from a flow).
            generator: Random generator on ``device``.
            device: Device of the draws (default: the flow's, else CPU).
        """
        with torch.no_grad():
            if self.flow is not None:
                z, log_r = self.flow.sample_latent(int(n), generator)
                x, logdet = self.flow(z)
                return x, log_r.to(_F64) - logdet.to(_F64)
            dev = torch.device(device) if device is not None else torch.device("cpu")
            prior = self._prior(tuple(int(v) for v in lattice), dev)
            z = prior.sample(int(n), generator=generator)
            return z, prior.log_prob(z).to(_F64)

    def start_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log q_0(x), (B,) float64 (through the inverse flow for a flow start)."""
        with torch.no_grad():
            if self.flow is not None:
                return self.flow.log_prob(x).to(_F64)
            lattice = self._lattice(x)
            return self._prior(lattice, x.device).log_prob(x).to(_F64)

    def _lattice(self, x: torch.Tensor) -> tuple[int, ...]:
        from flowplug.theory import field_space

        return tuple(field_space(self.field).lattice_of(x))

    # ------------------------------------------------------------ evolutions

    def _s(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """S_k(x) for k = 1..N (1-based; S_N = the target action), (B,) float64."""
        return self.actions[k - 1].action(x).to(_F64)

    def evolve(
        self, x0: torch.Tensor, log_q0: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Run the forward protocol from given start configurations.

        Arguments:
            x0: Start configurations (B, ...), canonical layout, drawn from q_0.
            log_q0: log q_0(x0), (B,) float64.
            generator: Random generator of the updates.

        Returns:
            ``(x_N, W)``: the endpoints (same shape) and the works (B,) float64
            (module docstring: W = sum_k [S_k(y_k) - S_{k-1}(x_{k-1}) - log|det J_k|]).
        """
        with torch.no_grad():
            x = x0
            work = log_q0.to(_F64).clone()
            if self.n_step == 0:
                return x, work + self.action.action(x).to(_F64)
            for k in range(1, self.n_step + 1):
                if k > 1:
                    work = work - self._s(k - 1, x)
                layer = self.layers[k - 1]
                if layer is not None:
                    x, logdet = layer(x)
                    work = work - logdet.to(_F64)
                work = work + self._s(k, x)
                assert self._update is not None
                x = self._update.forward(x, k - 1, generator)
            return x, work

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        *,
        lattice: Sequence[int] | None = None,
        device: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` independent evolutions from q_0: ``(x_N, W, log_p)``.

        Arguments:
            n: Number of evolutions.
            generator: Random generator (start draws, then updates).
            lattice: The lattice (required without a flow; with one, the flow's).
            device: Device (default: the flow's, else CPU).

        Returns:
            x_N (n, ...) canonical layout; W and log p = -S(x_N), each (n,) float64.

        Raises:
            ConfigError: without a flow and without ``lattice``.
        """
        if lattice is None:
            if self.flow is None:
                raise ConfigError("nonequilibrium.sample: give the lattice (the kernel starts from the prior)")
            lattice = tuple(self.flow.lattice)
        x0, lq0 = self.start_sample(n, lattice, generator, device)
        x, w = self.evolve(x0, lq0, generator)
        with torch.no_grad():
            lp = -self.action.action(x).to(_F64)
        return x, w, lp

    def reverse_work(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        r"""W of a path drawn backwards from x: an exact draw from P_R(path | x_N = x).

        x_N = x; for k = N..1: y_k ~ T~_k(x_k, .) (the time-reversed update), x_{k-1} =
        f_k^{-1}(y_k); W from the same formula as the forward evolution, with
        log q_0(x_0) at the end (module docstring).

        Arguments:
            x: Configurations (B, ...), canonical layout.
            generator: Random generator of the reversed updates.

        Returns:
            W, (B,) float64 (non-finite where an action or log q_0 is).
        """
        with torch.no_grad():
            if self.n_step == 0:
                return self.action.action(x).to(_F64) + self.start_log_prob(x)
            work = torch.zeros(x.shape[0], dtype=_F64, device=x.device)
            for k in range(self.n_step, 0, -1):
                if k < self.n_step:
                    work = work - self._s(k, x)
                assert self._update is not None
                y = self._update.reverse(x, k - 1, generator)
                work = work + self._s(k, y)
                layer = self.layers[k - 1]
                if layer is not None:
                    y, logdet_inv = layer.inverse(y)
                    work = work + logdet_inv.to(_F64)  # -log|det J_k(x_{k-1})|
                x = y
            return work + self.start_log_prob(x)

    # ------------------------------------------------------------ kernel contract

    def init(self, x: torch.Tensor) -> ChainState:
        """State for configurations x (canonical layout; promoted to the field's float64 /
        complex128 dtype): log p = -S(x), (B,) float64, no work yet.

        The work of each chain is drawn at its first ``step`` (a reverse path), since
        that needs the generator.

        Raises:
            ShapeError: if x does not fit the action's field kind.
        """
        from flowplug.theory import field_space

        x = x.detach()
        dtype = field_space(self.field).dtype
        if x.dtype != dtype and x.is_complex() == dtype.is_complex:
            x = x.to(dtype)  # complex64 links (a single-precision file) are promoted, as by the heatbath
        check = getattr(self.action, "check", None)
        if check is not None:
            check(x)
        return ChainState(x, -self.action.action(x).to(_F64))

    def start_states(
        self, n: int, lattice: Sequence[int], generator: torch.Generator | None = None, device: Any = None
    ) -> ChainState:
        """Start states of ``n`` chains: the endpoints of ``n`` forward evolutions, with their works.

        An exact draw of the proposal, x ~ q_eff, whose work W is stored in
        ``extras[work_key]``, so that the first step needs no reverse path (a hot start
        costs one reverse path per chain and keeps its disordered configuration until the
        first acceptance, about 1/acceptance steps; a proposal draw is as close to p as the
        proposals are). Any start leaves the chain exact; this one also shortens its
        thermalisation. ``flowplug sample`` uses it (``start = "auto"``).

        Arguments:
            n: Number of chains (int >= 1).
            lattice: (L_0, ..., L_{d-1}) (the flow's, if the kernel starts from a flow).
            generator: Random generator of the start draws and the updates.
            device: Device (default: the flow's, else CPU).

        Returns:
            :class:`flowplug.chain.ChainState` with x (n, ...) in the field's float64 /
            complex128 dtype, log p = -S(x) (n,) float64 and ``extras[work_key]`` = W (n,)
            float64. One evolution costs n_step stages (as one ``step``).

        Raises:
            ConfigError: for n < 1 or a lattice the flow was not trained on.
        """
        from flowplug.theory import field_space

        if int(n) < 1:
            raise ConfigError(f"nonequilibrium.start_states: need n >= 1 chains; found {n}")
        lattice = tuple(int(v) for v in lattice)
        if self.flow is not None and tuple(self.flow.lattice) != lattice:
            raise ConfigError(
                f"nonequilibrium.start_states: the start flow was trained on {list(self.flow.lattice)}; "
                f"found lattice {list(lattice)}"
            )
        x, w, lp = self.sample(int(n), generator, lattice=lattice, device=device)
        x = x.to(field_space(self.field).dtype)
        return ChainState(x, lp, {self.work_key: w})

    def complete(self, state: ChainState, generator: torch.Generator | None = None) -> tuple[ChainState, bool]:
        """The state with ``extras[work_key]`` drawn by :meth:`reverse_work` if missing; and whether it was."""
        if self.work_key in state.extras:
            return state, False
        extras = dict(state.extras)
        extras[self.work_key] = self.reverse_work(state.x, generator)
        return ChainState(state.x, state.log_p, extras), True

    def step(self, state: ChainState, generator: torch.Generator | None = None) -> tuple[ChainState, dict[str, Any]]:
        """One non-equilibrium independence-Metropolis step for every chain (class docstring).

        Raises:
            ShapeError: if the configurations do not fit the action.
        """
        state, refreshed = self.complete(state, generator)
        lattice = self._lattice(state.x)
        x1, w1, lp1 = self.sample(state.batch, generator, lattice=lattice, device=state.x.device)
        w0, lp0 = state.extras[self.work_key].to(_F64), state.log_p.to(_F64)
        # log A = log[P_R/P_F](proposal) - log[P_R/P_F](current) = W - W'; a non-finite W' or S' rejects
        log_a = guarded_log_accept(w0 - w1, w1, lp1)
        accepted = metropolis_test(log_a, generator)
        new = state.moved(accepted, x1.to(state.x.dtype), lp1, {self.work_key: w1})
        return new, {
            "accepted": accepted,
            "log_accept": log_a,
            "work_proposal": w1,
            "work_current": w0,
            "log_p_proposal": lp1,
            "log_p_current": lp0,
            "log_q_proposal": w1 + lp1,
            "log_q_current": w0 + lp0,
            "refreshed": torch.full((state.batch,), refreshed, dtype=torch.bool, device=w0.device),
        }

    def propose_from(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A proposal and the effective log q values, without deciding (for production codes).

        The current configurations get their work from a reverse path; the proposals come
        from fresh forward evolutions.

        Arguments:
            x: Current configurations (B, ...), canonical layout.
            generator: Random generator.

        Returns:
            ``(x', log_q_current, log_q_proposal)`` with log q_eff = W - S (module
            docstring), (B,) float64 each; accept with
            min(1, exp([-S_prod(x') - log_q_proposal] - [-S_prod(x) - log_q_current])).
        """
        state = self.init(x)
        state, _ = self.complete(state, generator)
        x1, w1, lp1 = self.sample(x.shape[0], generator, lattice=self._lattice(x), device=x.device)
        return x1, state.extras[self.work_key] + state.log_p, w1 + lp1

    def __repr__(self) -> str:
        start = "flow" if self.flow is not None else "prior"
        span = f"{self.schedule[0]:g}..{self.schedule[-1]:g}" if self.schedule else "-"
        return (
            f"NonEquilibrium(n_step={self.n_step}, {self.coupling}={span}, inner={self.inner!r}, "
            f"start={start}, layers={sum(layer is not None for layer in self.layers)})"
        )


@hookimpl
def flowplug_kernels() -> list[KernelSpec]:
    """The ``nonequilibrium`` kernel (alias ``snf``)."""
    return [
        KernelSpec(
            name="nonequilibrium",
            description="independence Metropolis with non-equilibrium (Jarzynski) proposals / SNF (2201.08862)",
            factory=NonEquilibrium,
            aliases=("snf", "jarzynski"),
        )
    ]
