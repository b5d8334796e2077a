"""Gauge-field measurements shared by adapters, actions and drivers.

Canonical layouts (DESIGN.md section 2): SU(N) links ``(B, d, L_0, ..., L_{d-1}, N, N)``
complex128; U(1) link angles ``(B, d, L_0, ..., L_{d-1})`` float64. Direction mu is
array axis ``2 + mu`` of the link tensor (axis mu of the lattice).
"""

from __future__ import annotations

import torch

from flowplug import groups
from flowplug.errors import ShapeError


def _check_sun(links: torch.Tensor) -> int:
    if links.dim() < 5 or links.shape[-1] != links.shape[-2] or not links.is_complex():
        raise ShapeError(
            f"SU(N) links must be complex with shape (B, d, L_0, ..., L_(d-1), N, N); "
            f"found {links.dtype} {tuple(links.shape)}"
        )
    d = links.shape[1]
    if links.dim() != d + 4:
        raise ShapeError(f"SU(N) links: {d} directions need {d} lattice axes; found shape {tuple(links.shape)}")
    if d < 2:
        raise ShapeError(f"plaquettes need d >= 2 directions; found d = {d}")
    return d


def _check_u1(links: torch.Tensor) -> int:
    if links.dim() < 3 or links.is_complex():
        raise ShapeError(
            f"U(1) links must be real angles of shape (B, d, L_0, ..., L_(d-1)); "
            f"found {links.dtype} {tuple(links.shape)}"
        )
    d = links.shape[1]
    if links.dim() != d + 2:
        raise ShapeError(f"U(1) links: {d} directions need {d} lattice axes; found shape {tuple(links.shape)}")
    if d < 2:
        raise ShapeError(f"plaquettes need d >= 2 directions; found d = {d}")
    return d


def sun_plaquettes(links: torch.Tensor) -> torch.Tensor:
    r"""Untraced SU(N) plaquettes U_mu(x) U_nu(x+mu) U_mu(x+nu)^+ U_nu(x)^+ for all mu < nu.

    Arguments:
        links: Shape (B, d, L_0, ..., L_{d-1}, N, N), complex.

    Returns:
        Shape (B, d(d-1)/2, L_0, ..., L_{d-1}, N, N), planes in the order
        (0,1), (0,2), ..., (d-2,d-1).

    Raises:
        ShapeError: on a malformed link tensor.

    References:
        Wilson, Phys. Rev. D 10 (1974) 2445.
    """
    d = _check_sun(links)
    mm = groups.small_matmul  # a @ b on the CPU
    out = []
    for mu in range(d):
        for nu in range(mu + 1, d):
            u_mu, u_nu = links[:, mu], links[:, nu]
            u_nu_xmu = torch.roll(u_nu, -1, dims=1 + mu)
            u_mu_xnu = torch.roll(u_mu, -1, dims=1 + nu)
            out.append(mm(mm(mm(u_mu, u_nu_xmu), u_mu_xnu.mH), u_nu.mH))
    return torch.stack(out, dim=1)


def u1_plaquettes(theta: torch.Tensor) -> torch.Tensor:
    r"""U(1) plaquette angles theta_mu(x) + theta_nu(x+mu) - theta_mu(x+nu) - theta_nu(x), unwrapped.

    Arguments:
        theta: Link angles, shape (B, d, L_0, ..., L_{d-1}), float64.

    Returns:
        Shape (B, d(d-1)/2, L_0, ..., L_{d-1}), planes ordered as in :func:`sun_plaquettes`;
        values in (-4 pi, 4 pi) (not wrapped).

    Raises:
        ShapeError: on a malformed tensor.
    """
    d = _check_u1(theta)
    out = []
    for mu in range(d):
        for nu in range(mu + 1, d):
            t_mu, t_nu = theta[:, mu], theta[:, nu]
            out.append(t_mu + torch.roll(t_nu, -1, dims=1 + mu) - torch.roll(t_mu, -1, dims=1 + nu) - t_nu)
    return torch.stack(out, dim=1)


def plaquette(links: torch.Tensor) -> torch.Tensor:
    r"""Mean plaquette: mean over sites and planes mu < nu of Re tr U_P / N.

    Arguments:
        links: SU(N) links (B, d, L..., N, N) complex, or U(1) angles (B, d, L...) real.

    Returns:
        Shape (B,), float64; 1.0 for the unit gauge.

    Raises:
        ShapeError: on a malformed tensor.

    References:
        Wilson, Phys. Rev. D 10 (1974) 2445; normalisation of DESIGN.md section 3.
    """
    if links.is_complex():
        p = sun_plaquettes(links)
        n = links.shape[-1]
        tr = torch.diagonal(p, dim1=-2, dim2=-1).sum(-1).real / n
        return tr.flatten(1).mean(1).to(torch.float64)
    return torch.cos(u1_plaquettes(links)).flatten(1).mean(1).to(torch.float64)


def link_trace(links: torch.Tensor) -> torch.Tensor:
    r"""Mean link trace Re tr U / N over all links (cos theta for U(1)).

    Arguments:
        links: SU(N) links (B, d, L..., N, N) complex, or U(1) angles (B, d, L...) real.

    Returns:
        Shape (B,), float64; 1.0 for the unit gauge (gauge variant: a check value stored
        by NERSC files, not an observable).

    Raises:
        ShapeError: on a malformed tensor.
    """
    if links.is_complex():
        _check_sun(links)
        n = links.shape[-1]
        return (torch.diagonal(links, dim1=-2, dim2=-1).sum(-1).real / n).flatten(1).mean(1).to(torch.float64)
    _check_u1(links)
    return torch.cos(links).flatten(1).mean(1).to(torch.float64)


def unitarity_deviation(links: torch.Tensor) -> torch.Tensor:
    r"""max over links of max_ij |(U U^+ - 1)_ij|, per configuration.

    Arguments:
        links: SU(N) links (B, d, L..., N, N), complex.

    Returns:
        Shape (B,), float64.

    Raises:
        ShapeError: on a malformed tensor.
    """
    _check_sun(links)
    n = links.shape[-1]
    eye = torch.eye(n, dtype=links.dtype, device=links.device)
    dev = (links @ links.mH - eye).abs()
    return dev.flatten(1).amax(1).to(torch.float64)


def determinant_deviation(links: torch.Tensor) -> torch.Tensor:
    r"""max over links of |det U - 1|, per configuration.

    Arguments:
        links: SU(N) links (B, d, L..., N, N), complex.

    Returns:
        Shape (B,), float64.

    Raises:
        ShapeError: on a malformed tensor.
    """
    _check_sun(links)
    return (torch.linalg.det(links) - 1).abs().flatten(1).amax(1).to(torch.float64)
