r"""Flow-based Markov-chain kernels (hook ``flowplug_kernels``).

Kernels registered here, all following the contract of :mod:`flowplug.chain`
(``init(x) -> ChainState``, ``step(state, generator) -> (state, info)``, B independent
chains per batch, accept/reject in float64):

``independence-metropolis`` (:class:`IndependenceMetropolis`)
    proposals x' ~ q drawn from a normalizing flow, accepted with probability
    min(1, exp([log p(x') - log q(x')] - [log p(x) - log q(x)])).
``mixture`` (:class:`Mixture`)
    per chain and step, one of several kernels chosen at random with fixed probabilities.
``composition`` (:class:`Composition`)
    a fixed cycle of kernels, each repeated a given number of times (for example k HMC
    trajectories followed by one flow proposal).
``flow-hmc`` (:class:`FlowHMC`)
    HMC in the latent space of a flow (trivializing-map idea): z = f^{-1}(x) is moved
    by HMC with the pulled-back action S(f(z)) - log|det J_f(z)|, exact through its own
    Metropolis test.

Per-chain bookkeeping
    :class:`~flowplug.chain.ChainState` carries x and log p = -S(x); these kernels keep
    ``extras["log_q"]`` (log q(x), float64, (B,)) and ``extras["latent"]`` (z = f^{-1}(x),
    the shape of x) for the current x. A state that did not come from the flow (an HMC
    configuration, a file) has no ``log_q``; it is then computed with the inverse flow
    before the test. On rejection a chain keeps its old x, log p, log q and z
    (:meth:`ChainState.moved`); ``tests/test_kernels.py`` checks this.

References:
    Tierney, Ann. Statist. 22 (1994) 1701, sections 2.3.3 (independence chains) and
    2.4 (mixtures and cycles of kernels);
    Albergo, Kanwar, Shanahan, arXiv:1904.12072, section III (flow-based independence
    Metropolis);
    Luscher, arXiv:0907.5491 (trivializing maps: HMC in transformed variables).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from flowplug.chain import ChainState, Kernel
from flowplug.errors import ConfigError
from flowplug.hookspecs import hookimpl
from flowplug.metropolis import guarded_log_accept, hmc_log_accept, independence_log_accept, metropolis_test
from flowplug.records import KernelSpec

if TYPE_CHECKING:
    from flowplug.theory import FieldSpace

__all__ = [
    "IndependenceMetropolis",
    "Mixture",
    "Composition",
    "FlowHMC",
    "LatentAction",
    "subset_state",
    "merge_states",
]


def subset_state(state: ChainState, index: torch.Tensor) -> ChainState:
    """The chains ``index`` (1-D long tensor) of a state, extras included."""
    return ChainState(state.x[index], state.log_p[index], {k: v[index] for k, v in state.extras.items()})


def merge_states(state: ChainState, parts: Sequence[tuple[torch.Tensor, ChainState]]) -> ChainState:
    """Write sub-batch states back into ``state`` (a new state; ``state`` is not modified).

    An extra survives only where every chain has a valid value: it is kept if it is
    present in ``state`` and in every part that moved chains, else dropped.

    Arguments:
        state: The full state before the sub-steps.
        parts: ``(index, sub_state)`` pairs with disjoint indices.
    """
    x = state.x.clone()
    lp = state.log_p.clone()
    keys = set(state.extras)
    for _, sub in parts:
        keys &= set(sub.extras)
    extras = {k: state.extras[k].clone() for k in keys}
    for idx, sub in parts:
        x[idx] = sub.x
        lp[idx] = sub.log_p
        for k in keys:
            extras[k][idx] = sub.extras[k]
    return ChainState(x, lp, extras)


def _check_pair(flow: Any, action: Any) -> None:
    field = getattr(flow, "field", None)
    if field is not None and field != action.field:
        raise ConfigError(f"flow samples '{field}' fields but the action acts on '{action.field}' fields")


class _FlowKernel(Kernel):
    """Shared parts of kernels built on a flow: latent variables and log q of states."""

    def __init__(self, flow: Any, action: Any) -> None:
        _check_pair(flow, action)
        self.flow = flow
        self.action = action

    def _check(self, x: torch.Tensor) -> None:
        lattice = getattr(self.flow, "lattice", None)
        if lattice is not None:
            from flowplug.flow import check_field

            check_field(self.flow, x)

    def density(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(log_p, log_q, z)`` of configurations x through the inverse flow (no gradients).

        Raises:
            ShapeError: if x does not have the flow's layout.
        """
        self._check(x)
        with torch.no_grad():
            z, ld_inv = self.flow.inverse(x)
            log_q = self.flow.prior.log_prob(z).to(torch.float64) + ld_inv.to(torch.float64)
            log_p = -self.action.action(x).to(torch.float64)
        return log_p, log_q, z

    def init(self, x: torch.Tensor) -> ChainState:
        """State for configurations x (canonical layout) with log p, log q and z filled in."""
        x = x.detach()
        log_p, log_q, z = self.density(x)
        return ChainState(x, log_p, {"log_q": log_q, "latent": z})

    def complete(self, state: ChainState) -> ChainState:
        """The state with ``log_q`` and ``latent`` computed where missing (inverse flow)."""
        if "log_q" in state.extras and "latent" in state.extras:
            return state
        _, log_q, z = self.density(state.x)
        extras = dict(state.extras)
        extras["log_q"], extras["latent"] = log_q, z
        return ChainState(state.x, state.log_p, extras)


class IndependenceMetropolis(_FlowKernel):
    r"""Independence Metropolis sampler with a normalizing flow as the proposal.

    Every step draws a fresh x' ~ q for each of the B chains and accepts it with
    probability min(1, exp(log A)), log A = [log p(x') - log q(x')] - [log p(x) - log q(x)],
    computed in float64 and tested by the rule of :mod:`flowplug.metropolis` (a proposal
    with a non-finite log p or log q is rejected). log q of the current state is
    cached per chain in ``state.extras["log_q"]`` and recomputed by the inverse flow only
    for states the flow did not produce. Exact for any proposal density q > 0 wherever
    p > 0: a poor flow only lowers the acceptance.

    Arguments:
        flow: :class:`flowplug.flow.Flow` (or any object with ``sample_latent``, ``forward``,
            ``inverse``, ``prior.log_prob``, ``field``).
        action: Action with ``field`` and ``action(x) -> (B,)`` (:mod:`flowplug.theory`).

    Raises:
        ConfigError: if the flow and the action act on different field kinds.

    ``step`` returns ``info`` with ``accepted`` (B,) bool, ``log_p_proposal``,
    ``log_q_proposal``, ``log_p_current``, ``log_q_current`` and ``log_accept`` (all (B,)
    float64; the ``current`` values are those before the step).

    References:
        Albergo, Kanwar, Shanahan, arXiv:1904.12072, section III; Tierney, Ann. Statist.
        22 (1994) 1701, section 2.3.3.
    """

    name = "independence-metropolis"

    def propose(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` flow samples: ``(x, log_p, log_q, z)``, log-densities (n,) float64."""
        with torch.no_grad():
            z, log_r = self.flow.sample_latent(n, generator)
            x, logdet = self.flow(z)
            log_q = log_r.to(torch.float64) - logdet.to(torch.float64)
            log_p = -self.action.action(x).to(torch.float64)
        return x, log_p, log_q, z

    def step(self, state: ChainState, generator: torch.Generator | None = None) -> tuple[ChainState, dict[str, Any]]:
        """One independence-Metropolis step for every chain (class docstring)."""
        state = self.complete(state)
        x1, lp1, lq1, z1 = self.propose(state.batch, generator)
        lp0, lq0 = state.log_p, state.extras["log_q"]
        log_a = independence_log_accept(lp1, lq1, lp0, lq0)
        accepted = metropolis_test(log_a, generator)
        new = state.moved(accepted, x1, lp1, {"log_q": lq1, "latent": z1})
        return new, {
            "accepted": accepted,
            "log_accept": log_a,
            "log_p_proposal": lp1,
            "log_q_proposal": lq1,
            "log_p_current": lp0,
            "log_q_current": lq0,
        }

    def __repr__(self) -> str:
        return f"IndependenceMetropolis(action={self.action!r})"


class LatentAction:
    r"""The physical action pulled back through a flow to its latent space.

    S~(z) = S(f(z)) - log|det df/dz|, so that exp(-S~(z)) dz is the image of
    exp(-S(x)) dx under x = f(z) (densities relative to the Haar / angle measure of the
    field kind, as for the flow's log-det). HMC on z with this action is exact for p.

    Arguments:
        flow: The flow f (``forward(z) -> (x, logdet)``).
        action: The physical action (``field``, ``action(x)``).

    Attributes:
        field: The field kind of z (the same as x).

    ``action(z)`` returns (B,) float64; z is first brought to its canonical range by its
    field space (U(1) and O(2) angles wrapped into (-pi, pi]: the identity almost
    everywhere, so the force is unchanged).

    References:
        Luscher, arXiv:0907.5491, section 2 (trivializing maps).
    """

    def __init__(self, flow: Any, action: Any) -> None:
        self.flow = flow
        self.physical = action
        self.field = action.field
        self._field_space: FieldSpace | None = None  # built on first use

    def transform(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, logdet)`` = f(z), z first brought to its canonical range by its field space
        (angles wrapped into (-pi, pi]; :meth:`flowplug.theory.FieldSpace.finalize`)."""
        return self.flow(self._space().finalize(z))

    def _space(self) -> FieldSpace:
        if self._field_space is None:
            from flowplug.theory import field_space

            self._field_space = field_space(self.field)
        return self._field_space

    def action(self, z: torch.Tensor) -> torch.Tensor:
        """S~(z), shape (B,), float64."""
        x, logdet = self.transform(z)
        return self.physical.action(x).to(torch.float64) - logdet.to(torch.float64)

    def force(self, z: torch.Tensor) -> torch.Tensor:
        """dS~ along the field space of z, by automatic differentiation through the flow."""
        return self._space().autograd_force(self.action, z)

    def __repr__(self) -> str:
        return f"LatentAction({self.physical!r})"


class FlowHMC(_FlowKernel):
    r"""HMC in the latent space of a flow (flow-transformed HMC).

    The chain state is the physical x; each step pulls it back, z = f^{-1}(x) (cached in
    ``extras["latent"]``), runs one HMC trajectory for the action
    S~(z) = S(f(z)) - log|det J_f(z)| (:class:`LatentAction`) with a float64
    Metropolis test on H = K(p) + S~(z), and maps the result forward. Since x = f(z) is a
    bijection and the latent chain leaves exp(-S~) invariant, the x chain leaves
    exp(-S) invariant, whatever the quality of the flow (an identity flow gives plain
    HMC). A good flow makes S~ nearly free, so trajectories decorrelate faster.

    Arguments:
        flow: :class:`flowplug.flow.Flow`.
        action: The physical action.
        integrator, steps, trajectory_length: As for :class:`flowplug.plugins.hmc.HMC`.

    Raises:
        ConfigError: on a field mismatch or bad HMC options.

    ``info``: ``accepted`` (B,) bool, ``delta_h`` (B,) float64.

    References:
        Luscher, arXiv:0907.5491 (trivializing maps); Duane et al., Phys. Lett. B 195
        (1987) 216 (HMC).
    """

    name = "flow-hmc"

    def __init__(
        self, flow: Any, action: Any, *, integrator: str = "leapfrog", steps: int = 10, trajectory_length: float = 1.0
    ) -> None:
        super().__init__(flow, action)
        from flowplug.plugins.hmc import HMC
        from flowplug.symmetric import SymmetrizedFlow

        if isinstance(flow, SymmetrizedFlow):
            raise ConfigError(
                "flow-hmc needs a bijection, and a symmetrised flow (flow.symmetrize) is a mixture of "
                "its images: use independence-metropolis (or a mixture with hmc) with it"
            )
        self.latent_action = LatentAction(flow, action)
        self.hmc = HMC(self.latent_action, integrator=integrator, steps=steps, trajectory_length=trajectory_length)

    def step(self, state: ChainState, generator: torch.Generator | None = None) -> tuple[ChainState, dict[str, Any]]:
        """One latent-space HMC trajectory for every chain (class docstring)."""
        state = self.complete(state)
        z0 = state.extras["latent"]
        hmc, space = self.hmc, self.hmc.space
        with torch.no_grad():
            log_r0 = self.flow.prior.log_prob(z0).to(torch.float64)
            # S~(z0) = -log p(x0) - logdet(z0) = -log p(x0) + log q(x0) - log r(z0)
            s0 = -state.log_p + state.extras["log_q"] - log_r0
            p0 = space.momenta(z0, generator)
            h0 = space.kinetic(p0) + s0
            z1, p1 = hmc.integrate(z0, p0)
            z1 = space.finalize(z1)
            x1, logdet1 = self.flow(z1)
            s_phys1 = self.action.action(x1).to(torch.float64)
            s1 = s_phys1 - logdet1.to(torch.float64)
            h1 = space.kinetic(p1) + s1
            dh = h1 - h0
            log_q1 = self.flow.prior.log_prob(z1).to(torch.float64) - logdet1.to(torch.float64)
            # a proposal whose physical density or log q is non-finite is rejected too
            accepted = metropolis_test(guarded_log_accept(hmc_log_accept(h0, h1), s_phys1, log_q1), generator)
            new = state.moved(accepted, x1, -s_phys1, {"log_q": log_q1, "latent": z1})
        return new, {"accepted": accepted, "delta_h": dh}

    def __repr__(self) -> str:
        return (
            f"FlowHMC(action={self.action!r}, integrator={self.hmc.integrator!r}, "
            f"steps={self.hmc.steps}, trajectory_length={self.hmc.trajectory_length})"
        )


def _kernel_name(k: Any) -> str:
    return str(getattr(k, "name", type(k).__name__))


class Mixture(Kernel):
    r"""Random mixture of kernels: each chain, at each step, uses kernel i with probability w_i.

    The choice is independent of the state, so the mixture leaves p invariant when every
    component does. Chains that chose the same kernel are stepped together as a sub-batch.

    Arguments:
        kernels: Component kernels (each with ``init``/``step``); the first one's ``init``
            is used.
        weights: Non-negative selection weights, normalised to probabilities.
        labels: Names of the components in ``info`` (default: their ``name``).

    Raises:
        ConfigError: on an empty list, a length mismatch, or weights that are negative or
            sum to zero.

    ``info``: ``accepted`` (B,) bool (of whichever kernel each chain used; (B,) float64
    if a kernel used in the step reports fractions, as sweeps of local updates do),
    ``choice`` (B,) long, and ``accepted.<label>`` (B,) float64: 1/0 (or the fraction)
    for chains that used that kernel, NaN for the others.

    References:
        Tierney, Ann. Statist. 22 (1994) 1701, section 2.4.
    """

    name = "mixture"

    def __init__(
        self, kernels: Sequence[Any], weights: Sequence[float], *, labels: Sequence[str] | None = None
    ) -> None:
        kernels = list(kernels)
        if not kernels:
            raise ConfigError("mixture: needs at least one kernel")
        w = torch.as_tensor([float(v) for v in weights], dtype=torch.float64)
        if w.numel() != len(kernels):
            raise ConfigError(f"mixture: {len(kernels)} kernels but {w.numel()} weights")
        if bool((w < 0).any()) or not float(w.sum()) > 0:
            raise ConfigError(f"mixture: weights must be >= 0 with a positive sum; found {w.tolist()}")
        self.kernels = kernels
        self.probabilities = w / w.sum()
        self.labels = list(labels) if labels is not None else [_kernel_name(k) for k in kernels]
        if len(self.labels) != len(kernels):
            raise ConfigError(f"mixture: {len(kernels)} kernels but {len(self.labels)} labels")

    def init(self, x: torch.Tensor) -> ChainState:
        """State from the first component's ``init``."""
        return self.kernels[0].init(x)

    def step(self, state: ChainState, generator: torch.Generator | None = None) -> tuple[ChainState, dict[str, Any]]:
        """One step: a kernel chosen per chain, then each sub-batch stepped by its kernel."""
        b = state.batch
        device = state.log_p.device
        u = torch.rand(b, generator=generator, dtype=torch.float64, device=device)
        edges = torch.cumsum(self.probabilities.to(device), 0)
        choice = torch.searchsorted(edges, u, right=True).clamp_(max=len(self.kernels) - 1)
        accepted = torch.zeros(b, dtype=torch.float64, device=device)
        fractions = False  # a part reported fractions (a sweep of local updates), not decisions
        info: dict[str, Any] = {"choice": choice}
        parts = []
        for i, (kernel, label) in enumerate(zip(self.kernels, self.labels, strict=True)):
            idx = (choice == i).nonzero().flatten()
            acc_i = torch.full((b,), float("nan"), dtype=torch.float64, device=device)
            if idx.numel():
                sub, sub_info = kernel.step(subset_state(state, idx), generator)
                parts.append((idx, sub))
                fractions = fractions or sub_info["accepted"].is_floating_point()
                accepted[idx] = sub_info["accepted"].to(torch.float64)
                acc_i[idx] = sub_info["accepted"].to(torch.float64)
            info[f"accepted.{label}"] = acc_i
        info["accepted"] = accepted if fractions else accepted.bool()
        return merge_states(state, parts), info

    def __repr__(self) -> str:
        parts = ", ".join(f"{p:.3g} {k!r}" for p, k in zip(self.probabilities.tolist(), self.kernels, strict=True))
        return f"Mixture({parts})"


class Composition(Kernel):
    r"""Cycle of kernels: kernel 1 applied ``repeats[0]`` times, then kernel 2, ...

    One ``step`` of the composition runs the whole cycle. A composition of kernels that
    each leave p invariant leaves p invariant (it need not satisfy detailed balance).
    Example: ``Composition([hmc, im], repeats=[4, 1])`` = four HMC trajectories, then one
    flow proposal.

    Arguments:
        kernels: Component kernels; the first one's ``init`` is used.
        repeats: Times each kernel is applied per cycle (>= 1); default once each.
        labels: Names of the components in ``info`` (default: their ``name``).

    Raises:
        ConfigError: on an empty list, a length mismatch or a repeat < 1.

    ``info``: ``accepted`` (B,) bool = acceptance of the last sub-step of the cycle;
    ``accepted.<label>`` (B,) float64 = fraction of that component's sub-steps accepted;
    ``delta_h`` (B,) float64 of the last sub-step that reports one.

    References:
        Tierney, Ann. Statist. 22 (1994) 1701, section 2.4 (cycles).
    """

    name = "composition"

    def __init__(
        self, kernels: Sequence[Any], repeats: Sequence[int] | None = None, *, labels: Sequence[str] | None = None
    ) -> None:
        kernels = list(kernels)
        if not kernels:
            raise ConfigError("composition: needs at least one kernel")
        repeats = [1] * len(kernels) if repeats is None else [int(r) for r in repeats]
        if len(repeats) != len(kernels):
            raise ConfigError(f"composition: {len(kernels)} kernels but {len(repeats)} repeat counts")
        if any(r < 1 for r in repeats):
            raise ConfigError(f"composition: repeat counts must be >= 1; found {repeats}")
        self.kernels = kernels
        self.repeats = repeats
        labels = list(labels) if labels is not None else [_kernel_name(k) for k in kernels]
        if len(labels) != len(kernels):
            raise ConfigError(f"composition: {len(kernels)} kernels but {len(labels)} labels")
        if len(set(labels)) != len(labels):
            labels = [f"{lab}{i}" for i, lab in enumerate(labels)]
        self.labels = labels

    def init(self, x: torch.Tensor) -> ChainState:
        """State from the first component's ``init``."""
        return self.kernels[0].init(x)

    def step(self, state: ChainState, generator: torch.Generator | None = None) -> tuple[ChainState, dict[str, Any]]:
        """One full cycle for every chain."""
        info: dict[str, Any] = {}
        last: dict[str, Any] = {}
        for kernel, rep, label in zip(self.kernels, self.repeats, self.labels, strict=True):
            acc = torch.zeros(state.batch, dtype=torch.float64, device=state.log_p.device)
            for _ in range(rep):
                state, last = kernel.step(state, generator)
                acc += last["accepted"].to(torch.float64)
                if "delta_h" in last:
                    info["delta_h"] = last["delta_h"]
            info[f"accepted.{label}"] = acc / rep
        info["accepted"] = last["accepted"]
        return state, info

    def __repr__(self) -> str:
        return "Composition(" + ", ".join(f"{r} x {k!r}" for k, r in zip(self.kernels, self.repeats, strict=True)) + ")"


@hookimpl
def flowplug_kernels() -> list[KernelSpec]:
    """Independence Metropolis, mixtures, compositions and flow-transformed HMC."""
    return [
        KernelSpec(
            name="independence-metropolis",
            description="flow proposals with a float64 independence-Metropolis test (1904.12072)",
            factory=IndependenceMetropolis,
            aliases=("flow", "im"),
        ),
        KernelSpec(name="mixture", description="random choice among kernels with fixed probabilities", factory=Mixture),
        KernelSpec(
            name="composition",
            description="fixed cycle of kernels (e.g. k HMC trajectories, then one flow proposal)",
            factory=Composition,
            aliases=("cycle",),
        ),
        KernelSpec(
            name="flow-hmc",
            description="HMC in the latent space of a flow (trivializing map, 0907.5491)",
            factory=FlowHMC,
            aliases=("latent-hmc",),
        ),
        KernelSpec(
            name="gan",
            description="refused: a generator without a tractable density gives no exact test (docs/chains.md)",
            factory=gan_refused,
            aliases=("generator",),
        ),
    ]


#: Why flowplug has no GAN proposal kernel, and what it offers instead (docs/chains.md).
GAN_REFUSAL = (
    "a GAN generator has no tractable density q(x), and the Metropolis-Hastings test of a proposal "
    "x' ~ q needs q(x') and q(x) (arXiv:1811.03533 uses the generator in an overrelaxation step that "
    "searches its latent space for a configuration of the same action, and checks balance "
    "empirically; it is not guaranteed). flowplug offers instead: a normalizing flow (exact log q; "
    "flowplug train, then "
    "sample/resample with independence-metropolis), or the generator's configurations as starting "
    "points only: write them to a file and start an exact kernel from it (flowplug hmc --set "
    "start=FILE, with thermalize long enough to forget them); the chain is then exactly as exact "
    "as that kernel, and the seeds bias nothing once the thermalisation is longer than the slowest "
    "autocorrelation time (not the case for a frozen topological charge)"
)


def gan_refused(*args: Any, **kwargs: Any) -> Kernel:
    """The registry entry ``gan`` (alias ``generator``): always refused.

    Raises:
        ConfigError: always, with :data:`GAN_REFUSAL` (what to use instead).
    """
    raise ConfigError(f"kernel 'gan' is not offered: {GAN_REFUSAL}")
