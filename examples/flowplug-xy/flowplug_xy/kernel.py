"""Local Metropolis updates of the XY model: a kernel contributed by a third-party plugin.

One step is a checkerboard sweep: every site of one parity gets a proposal
theta_x' = theta_x + delta u, u ~ U(-1, 1), accepted with probability
min(1, exp(-dS_x)), where dS_x involves only its 2d neighbours (all of the other
parity, so the sites of one parity are updated independently and at once); then the
other parity. Each site update satisfies detailed balance for exp(-S), so the sweep
leaves it invariant.
"""

from __future__ import annotations

import math

import torch

from flowplug.chain import ChainState, Kernel
from flowplug.errors import ConfigError
from flowplug.groups import wrap_angle
from flowplug.metropolis import metropolis_test


class XYMetropolis(Kernel):
    r"""Checkerboard local Metropolis sweep for the XY model (module docstring).

    Arguments:
        action: An :class:`flowplug_xy.XYAction` (field ``o2``; its ``beta`` is used).
        step_size: delta, the half-width of the uniform angle proposal, in radians
            (0 < delta <= pi; default 1.0).
        sweeps: Sweeps per kernel step (>= 1).

    Raises:
        ConfigError: on a field other than ``o2``, bad options, or an odd lattice extent
            (a checkerboard needs even extents on a periodic lattice).

    ``step`` returns ``info`` with ``accepted``: (B,) float64, the fraction of the
    site updates accepted in the step (a kernel of many local tests reports a
    fraction, not one decision).

    References:
        Metropolis et al., J. Chem. Phys. 21 (1953) 1087.
    """

    name = "xy-metropolis"

    def __init__(self, action, *, step_size: float = 1.0, sweeps: int = 1) -> None:
        if getattr(action, "field", None) != "o2":
            raise ConfigError(f"xy-metropolis updates o2 fields; the action acts on {getattr(action, 'field', None)!r}")
        if not 0 < float(step_size) <= math.pi:
            raise ConfigError(f"xy-metropolis: step_size must be in (0, pi]; found {step_size}")
        if int(sweeps) < 1:
            raise ConfigError(f"xy-metropolis: sweeps must be >= 1; found {sweeps}")
        self.action = action
        self.beta = float(action.beta)
        self.step_size = float(step_size)
        self.sweeps = int(sweeps)

    def init(self, x: torch.Tensor) -> ChainState:
        """State of configurations x, shape (B, L_0, ..., L_{d-1}), float64 angles."""
        x = x.detach().to(torch.float64)
        odd = [n for n in x.shape[1:] if n % 2]
        if odd:
            raise ConfigError(
                f"xy-metropolis: lattice {list(x.shape[1:])} has odd extents; the checkerboard update needs even ones"
            )
        return ChainState(x, -self.action.action(x).to(torch.float64))

    def _neighbour_sum(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sum over the 2d neighbours n of (cos theta_n, sin theta_n), each (B, L...)."""
        c, s = torch.cos(theta), torch.sin(theta)
        cs = torch.zeros_like(theta)
        ss = torch.zeros_like(theta)
        for ax in range(1, theta.dim()):
            for shift in (1, -1):
                cs += torch.roll(c, shift, dims=ax)
                ss += torch.roll(s, shift, dims=ax)
        return cs, ss

    def step(
        self, state: ChainState, generator: torch.Generator | None = None
    ) -> tuple[ChainState, dict[str, torch.Tensor]]:
        """``sweeps`` checkerboard sweeps for every chain."""
        theta = state.x.clone()
        shape = theta.shape
        grids = torch.meshgrid(*[torch.arange(n, device=theta.device) for n in shape[1:]], indexing="ij")
        parity = (sum(grids) % 2).bool()
        accepted = torch.zeros(shape[0], dtype=torch.float64, device=theta.device)
        for _ in range(self.sweeps):
            for colour in (False, True):
                mask = (parity == colour).expand(shape)
                cs, ss = self._neighbour_sum(theta)
                delta = self.step_size * (
                    2 * torch.rand(shape, generator=generator, dtype=torch.float64, device=theta.device) - 1
                )
                new = theta + delta
                # S_x = -beta [cos theta_x sum_n cos theta_n + sin theta_x sum_n sin theta_n]
                ds = -self.beta * ((torch.cos(new) - torch.cos(theta)) * cs + (torch.sin(new) - torch.sin(theta)) * ss)
                acc = metropolis_test(-ds.flatten(), generator).view(shape) & mask
                theta = torch.where(acc, new, theta)
                accepted += acc.flatten(1).to(torch.float64).sum(1)
        theta = wrap_angle(theta)
        n_updates = self.sweeps * math.prod(shape[1:])
        return ChainState(theta, -self.action.action(theta).to(torch.float64)), {"accepted": accepted / n_updates}

    def __repr__(self) -> str:
        return f"XYMetropolis(beta={self.beta}, step_size={self.step_size}, sweeps={self.sweeps})"
