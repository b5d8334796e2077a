"""The XY (O(2) sigma) model on a periodic hypercubic lattice.

Field kind ``o2``: one angle theta_x per site, tensor shape (B, L_0, ..., L_{d-1}),
float64, any real values (the action is 2 pi periodic in every angle).
"""

from __future__ import annotations

import torch


def _check(theta: torch.Tensor) -> None:
    if theta.dim() < 2 or theta.is_complex():
        raise ValueError(
            f"XY field must be real angles of shape (B, L_0, ..., L_(d-1)); found {theta.dtype} {tuple(theta.shape)}"
        )


def _bond_cos(theta: torch.Tensor) -> torch.Tensor:
    """cos(theta_x - theta_{x+mu}) for every site and direction, shape (B, d, L...)."""
    d = theta.dim() - 1
    return torch.stack([torch.cos(theta - torch.roll(theta, -1, dims=1 + mu)) for mu in range(d)], dim=1)


class XYAction:
    r"""XY model action S = -beta sum_x sum_mu cos(theta_x - theta_{x+mu}).

    Periodic boundary conditions, each nearest-neighbour bond counted once.

    Arguments:
        beta: Inverse temperature (coupling), in lattice units.

    Attributes:
        field: ``"o2"`` (one angle per site).

    References:
        Kosterlitz & Thouless, J. Phys. C 6 (1973) 1181; the 1D periodic chain is solved
        by the character expansion exp(beta cos t) = sum_n I_n(beta) e^{i n t}, giving
        Z = (2 pi)^V sum_n I_n(beta)^V.
    """

    field = "o2"

    def __init__(self, beta: float) -> None:
        self.beta = float(beta)

    def action(self, theta: torch.Tensor) -> torch.Tensor:
        """S for a batch of configurations.

        Arguments:
            theta: Angles, shape (B, L_0, ..., L_{d-1}), float64.

        Returns:
            Shape (B,), float64.

        Raises:
            ValueError: if ``theta`` is complex or has no lattice axis.

        Other real dtypes are converted to float64 first.
        """
        _check(theta)
        return -self.beta * _bond_cos(theta.to(torch.float64)).flatten(1).sum(1)

    def force(self, theta: torch.Tensor) -> torch.Tensor:
        r"""Force F_x = -dS/dtheta_x = -beta sum_mu [sin(theta_x - theta_{x+mu}) + sin(theta_x - theta_{x-mu})].

        Arguments:
            theta: Angles, shape (B, L_0, ..., L_{d-1}), float64.

        Returns:
            Same shape and dtype.
        """
        _check(theta)
        d = theta.dim() - 1
        f = torch.zeros_like(theta)
        for mu in range(d):
            f -= torch.sin(theta - torch.roll(theta, -1, dims=1 + mu))
            f -= torch.sin(theta - torch.roll(theta, 1, dims=1 + mu))
        return self.beta * f

    def __repr__(self) -> str:
        return f"XYAction(beta={self.beta})"


def bond_energy(theta: torch.Tensor) -> torch.Tensor:
    """Mean bond energy <cos(theta_x - theta_{x+mu})> over sites and directions.

    Arguments:
        theta: Angles, shape (B, L_0, ..., L_{d-1}), float64.

    Returns:
        Shape (B,), float64; 1 for an ordered configuration.
    """
    _check(theta)
    return _bond_cos(theta.to(torch.float64)).flatten(1).mean(1)
