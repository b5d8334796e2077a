r"""Built-in HMC kernel (hook ``flowplug_kernels``): exact hybrid Monte Carlo for any action.

The kernel works on every field kind of :mod:`flowplug.theory` (scalar fields, U(1)
angles, SU(N) links) through the action's :class:`~flowplug.theory.FieldSpace`, on B
independent chains at once, with the Metropolis test in float64. It follows the kernel
contract of :mod:`flowplug.chain` (``init``, ``step``).

Integrators (trajectory length tau, n steps, eps = tau / n; F = -dS/dx the force):

``leapfrog``
    p <- p + eps/2 F; then n times { x <- x + eps p; p <- p + eps F }, the last kick
    halved. n + 1 force evaluations; dH = O(eps^2).
``omelyan``
    second-order minimum-norm (2MN) scheme, per step
    p <- p + lam eps F; x <- x + eps/2 p; p <- p + (1 - 2 lam) eps F; x <- x + eps/2 p;
    p <- p + lam eps F, with lam = 0.1931833275037836 (consecutive kicks merged):
    2n + 1 force evaluations; dH = O(eps^2) with a much smaller coefficient.

References:
    Duane, Kennedy, Pendleton, Roweth, Phys. Lett. B 195 (1987) 216 (HMC);
    Omelyan, Mryglod, Folk, Comput. Phys. Commun. 151 (2003) 272, eq. (31) (2MN, lam);
    Takaishi & de Forcrand, hep-lat/0505020, section 2 (2MN in lattice HMC).
"""

from __future__ import annotations

from typing import Any

import torch

from flowplug.chain import ChainState, Kernel
from flowplug.errors import ConfigError
from flowplug.hookspecs import hookimpl
from flowplug.metropolis import hmc_log_accept, metropolis_test
from flowplug.records import KernelSpec
from flowplug.theory import action_force, field_space

#: Omelyan-Mryglod-Folk 2MN parameter (CPC 151 (2003) 272, eq. (31)).
OMELYAN_LAMBDA = 0.1931833275037836

INTEGRATORS = ("leapfrog", "omelyan")


class HMC(Kernel):
    r"""Hybrid Monte Carlo kernel for B independent chains.

    Arguments:
        action: Object with ``field``, ``action(x) -> (B,)`` and optionally ``force(x)``
            (:mod:`flowplug.theory`); the force falls back to autograd.
        integrator: ``"leapfrog"`` or ``"omelyan"`` (module docstring).
        steps: Integration steps n per trajectory (>= 1).
        trajectory_length: tau in molecular-dynamics time units (> 0).
        omelyan_lambda: The 2MN parameter.
        reunitarize: Project SU(N) links back onto the group after every trajectory
            (off by default: ``tests/test_hmc.py`` shows the drift stays at rounding level).

    Raises:
        ConfigError: for an unknown integrator, steps < 1, or trajectory_length <= 0.

    The kernel state (:class:`flowplug.chain.ChainState`) holds x and log p = -S(x);
    ``step`` returns ``info`` with ``accepted`` (B,) bool and ``delta_h`` (B,) float64
    (H' - H; <exp(-delta_h)> = 1 is a test of exactness).

    An action with auxiliary fields (pseudofermions) has a ``refresh(x, generator)`` method
    (:mod:`flowplug.theory`): ``step`` calls it first, so that the fields are drawn from
    their exact conditional distribution at the start of every trajectory, then computes
    H with them. For such an action ``init`` stores log p = NaN (S is undefined until the
    fields are drawn) and every ``step`` recomputes it.
    """

    name = "hmc"

    def __init__(
        self,
        action: Any,
        *,
        integrator: str = "leapfrog",
        steps: int = 10,
        trajectory_length: float = 1.0,
        omelyan_lambda: float = OMELYAN_LAMBDA,
        reunitarize: bool = False,
    ) -> None:
        integrator = str(integrator).strip().lower()
        if integrator not in INTEGRATORS:
            raise ConfigError(f"hmc: unknown integrator {integrator!r}; choose one of {', '.join(INTEGRATORS)}")
        if int(steps) < 1:
            raise ConfigError(f"hmc: steps must be >= 1; found {steps}")
        if not float(trajectory_length) > 0:
            raise ConfigError(f"hmc: trajectory_length must be > 0; found {trajectory_length}")
        self.action = action
        self.space = field_space(action.field)
        self.integrator = integrator
        self.steps = int(steps)
        self.trajectory_length = float(trajectory_length)
        self.omelyan_lambda = float(omelyan_lambda)
        self.reunitarize = bool(reunitarize)

    @property
    def step_size(self) -> float:
        """eps = trajectory_length / steps."""
        return self.trajectory_length / self.steps

    def force(self, x: torch.Tensor) -> torch.Tensor:
        """The action's force at x (analytic if the action has one, else autograd)."""
        return action_force(self.action, x)

    def hamiltonian(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """H = K(p) + S(x), shape (B,), float64."""
        return self.space.kinetic(p) + self.action.action(x).to(torch.float64)

    def integrate(self, x: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One molecular-dynamics trajectory from (x, p); returns (x', p') (not wrapped).

        Reversible: integrating (x', -p') gives back (x, -p) up to rounding.
        """
        eps, n, sp = self.step_size, self.steps, self.space

        def kick(p: torch.Tensor, x: torch.Tensor, dt: float) -> torch.Tensor:
            return torch.add(p, self.force(x), alpha=dt)

        if self.integrator == "leapfrog":
            p = kick(p, x, 0.5 * eps)
            for i in range(n):
                x = sp.update(x, p, eps)
                p = kick(p, x, eps if i < n - 1 else 0.5 * eps)
            return x, p
        lam = self.omelyan_lambda
        p = kick(p, x, lam * eps)
        for i in range(n):
            x = sp.update(x, p, 0.5 * eps)
            p = kick(p, x, (1.0 - 2.0 * lam) * eps)
            x = sp.update(x, p, 0.5 * eps)
            p = kick(p, x, (2.0 * lam if i < n - 1 else lam) * eps)
        return x, p

    def init(self, x: torch.Tensor) -> ChainState:
        """State for configurations x (canonical layout of ``action.field``).

        Raises:
            ShapeError: if x does not fit the action.
        """
        x = x.detach()
        if getattr(self.action, "refresh", None) is not None:  # S needs the auxiliary fields: each step draws them
            self.space.lattice_of(x)
            return ChainState(x, torch.full((x.shape[0],), torch.nan, dtype=torch.float64, device=x.device))
        return ChainState(x, -self.action.action(x).to(torch.float64))

    def step(self, state: ChainState, generator: torch.Generator | None = None) -> tuple[ChainState, dict[str, Any]]:
        """One HMC trajectory and float64 Metropolis test for every chain.

        Returns:
            (new state, info) with info ``accepted`` (B,) bool and ``delta_h`` (B,) float64.
        """
        x0 = state.x
        with torch.no_grad():
            refresh = getattr(self.action, "refresh", None)
            if refresh is not None:  # auxiliary fields (pseudofermions): Gibbs step, then S with them
                refresh(x0, generator)
                state = ChainState(x0, -self.action.action(x0).to(torch.float64), state.extras)
            p0 = self.space.momenta(x0, generator)
            h0 = self.space.kinetic(p0) - state.log_p
            x1, p1 = self.integrate(x0, p0)
            x1 = self.space.finalize(x1)
            if self.reunitarize and x1.is_complex():
                from flowplug.groups import reunitarize

                x1 = reunitarize(x1)
            s1 = self.action.action(x1).to(torch.float64)
            h1 = self.space.kinetic(p1) + s1
            dh = h1 - h0
            # accept with probability min(1, exp(-dH)); a non-finite H1 or dH is rejected
            accepted = metropolis_test(hmc_log_accept(h0, h1), generator)
            new = state.moved(accepted, x1, -s1)
        return new, {"accepted": accepted, "delta_h": dh}

    def __repr__(self) -> str:
        return (
            f"HMC(action={self.action!r}, integrator={self.integrator!r}, steps={self.steps}, "
            f"trajectory_length={self.trajectory_length})"
        )


@hookimpl
def flowplug_kernels() -> list[KernelSpec]:
    """The built-in ``hmc`` kernel."""
    return [
        KernelSpec(
            name="hmc",
            description="hybrid Monte Carlo (leapfrog / Omelyan 2MN), any field kind",
            factory=HMC,
            aliases=("hybrid-monte-carlo",),
        )
    ]
