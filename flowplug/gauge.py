"""Gauge-field measurements shared by adapters, actions and drivers.

Canonical layouts (DESIGN.md section 2): SU(N) links ``(B, d, L_0, ..., L_{d-1}, N, N)``
complex128; U(1) link angles ``(B, d, L_0, ..., L_{d-1})`` float64. Direction mu is
array axis ``2 + mu`` of the link tensor (axis mu of the lattice).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch

from flowplug import groups
from flowplug.errors import ShapeError
from flowplug.threads import one_thread


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
    return out[0].unsqueeze(1) if len(out) == 1 else torch.stack(out, dim=1)  # 2D: one plane, no copy


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


# --------------------------------------------------------------------------- plaquette traces


@functools.cache
def plaquette_index(lattice: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Flat link indices of the four factors of every plaquette.

    Arguments:
        lattice: (L_0, ..., L_{d-1}), d >= 2.
        device: Where the index lives (cached per lattice and device).

    Returns:
        (4, P V) long, P = d(d-1)/2, V the volume: rows U_mu(x), U_nu(x+mu), U_nu(x),
        U_mu(x+nu) of the plaquette of plane (mu, nu) at site x, planes mu < nu in the order of
        :func:`sun_plaquettes`, then sites in row-major order; the link of direction a at site y
        has index a V + y (the layout of ``links.flatten(1, d)``).
    """
    d, vol = len(lattice), math.prod(lattice)
    flat = torch.arange(vol).reshape(lattice)
    rows: list[list[torch.Tensor]] = [[], [], [], []]
    for mu in range(d):
        for nu in range(mu + 1, d):
            rows[0].append(mu * vol + flat.flatten())
            rows[1].append(nu * vol + torch.roll(flat, -1, dims=mu).flatten())
            rows[2].append(nu * vol + flat.flatten())
            rows[3].append(mu * vol + torch.roll(flat, -1, dims=nu).flatten())
    return torch.stack([torch.cat(r) for r in rows]).to(device)


def _traces_by_autograd(links: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The traces of :class:`PlaquetteTraces` by plain differentiable operations (its double
    backward): links (B, n_links, N, N), index (4, P) -> (B, P) in ``dtype``."""
    b, _, n, _ = links.shape
    x = links.to(dtype).index_select(1, index.flatten()).view(b, 4, -1, n, n).unbind(1)
    return ((x[0] @ x[1]) * (x[2] @ x[3]).conj()).sum((-2, -1)) / n


#: the elementwise products of :class:`PlaquetteTraces` run over columns padded to a multiple of
#: this: torch's CPU kernels round the vectorised body and a scalar tail differently, so without
#: the padding a plaquette's trace could depend on the batch size it was computed in
_TRACE_COLUMNS = 32


class PlaquetteTraces(torch.autograd.Function):
    """tr(U_1 U_2 (U_3 U_4)^+) / N for the link quadruples of an index, with a hand-written
    backward; the products run matrix-axes-first (:func:`flowplug.groups.matmul_axes_first`) in
    ``dtype``, over the index's columns padded to a multiple of 32 (the padding repeats the first
    plaquette and is dropped), so that every trace is bitwise the same in any batch.

    ``apply(links (B, n_links, N, N) complex, index (4, P) long, dtype) -> (B, P)`` in ``dtype``.
    A double backward (``create_graph=True``, e.g. Hessian-vector products) runs through the same
    traces formed by differentiable operations (:func:`_traces_by_autograd`). Forward-mode AD and
    ``torch.func`` transforms are not supported (no ``jvp``/``setup_context``).
    """

    @staticmethod
    def forward(
        ctx: Any, links: torch.Tensor, index: torch.Tensor, dtype: torch.dtype, save_links: bool = True
    ) -> torch.Tensor:
        b, n_links, n, _ = links.shape  # (B, d V, N, N)
        p = index.shape[1]
        pad = -p % _TRACE_COLUMNS
        if pad:
            index = torch.cat([index, index[:, :1].expand(-1, pad)], 1)
        s = torch.empty((n, n, n_links, b), dtype=dtype, device=links.device)
        s.copy_(links.permute(2, 3, 1, 0))
        # one gather of the four factors (over the merged matrix axes: selecting along a middle
        # axis of the 4D tensor is many times slower in torch)
        x = s.view(n * n, n_links, b).index_select(1, index.flatten()).view(n, n, 4, -1, b).unbind(2)
        # complex64 products round a thread's tail differently (threads.one_thread); complex128
        # (the actions) keeps every thread: its rounding differs by one float64 ulp at most
        with one_thread(dtype == torch.complex64):
            left = groups.matmul_axes_first(x[0], x[1])
            right = groups.matmul_axes_first(x[2], x[3])
            tr = (left * right.conj()).sum((0, 1)) / n
        # the input only for a double backward (a caller that never takes one, the sun-stout
        # features, passes save_links=False: nothing then stops it changing its input in place)
        saved = (links, index, *x, left, right) if save_links else (index, *x, left, right)
        ctx.save_for_backward(*saved)
        ctx.in_shape, ctx.in_dtype, ctx.dtype, ctx.n_plaquettes, ctx.with_links = (
            links.shape,
            links.dtype,
            dtype,
            p,
            save_links,
        )
        return tr.t()[:, :p].contiguous()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        saved = ctx.saved_tensors
        links, (index, x0, x1, x2, x3, left, right) = (saved[0], saved[1:]) if ctx.with_links else (None, saved)
        p = ctx.n_plaquettes
        if torch.is_grad_enabled():
            # create_graph = True: the saved products carry no graph; the same derivative
            # through differentiable operations on the saved input
            if links is None:
                raise RuntimeError("plaquette traces computed without their input kept: no double backward")
            tr = _traces_by_autograd(links, index[:, :p], ctx.dtype)
            (g,) = torch.autograd.grad(tr, links, grad, create_graph=True)
            return g, None, None, None
        # tr = sum_ij L_ij conj(R_ij) / N with L = X0 X1, R = X2 X3; torch's convention for
        # complex gradients: grad_L = R g / N, grad_R = L conj(g) / N, then grad_X0 = grad_L X1^+, ...
        b, n_links, n, _ = ctx.in_shape
        g = grad.t().to(left.dtype) / n  # (P, B): a transposed view would slow every product
        if left.shape[2] > p:  # the padding's columns get no gradient
            g = torch.cat([g, g.new_zeros(left.shape[2] - p, g.shape[1])])
        g = g.contiguous()
        g_left, g_right = right * g, left * g.conj()
        mm = groups.matmul_axes_first
        # the first sum out of place, into a tensor derived from the (possibly vmapped) gradient,
        # so that the backward can be vmapped (batched gradients, Jacobians); the others in place
        out = torch.zeros((n, n, n_links, b), dtype=left.dtype, device=left.device)
        out = out.index_add(2, index[0], mm(g_left, x1.conj().transpose(0, 1)))
        out.index_add_(2, index[1], mm(x0.conj().transpose(0, 1), g_left))
        out.index_add_(2, index[2], mm(g_right, x3.conj().transpose(0, 1)))
        out.index_add_(2, index[3], mm(x2.conj().transpose(0, 1), g_right))
        # one converting copy into the links' layout (contiguous: every later operation on the
        # gradient, its accumulation included, then runs over contiguous rows; copy=True: ``to``
        # would return the permuted view when the dtype does not change)
        g_links = out.permute(3, 2, 0, 1).to(ctx.in_dtype, memory_format=torch.contiguous_format, copy=True)
        return g_links, None, None, None


def plaquette_traces(links: torch.Tensor | Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    r"""tr P_{mu nu}(x) / N for every plane mu < nu, without forming the plaquettes.

    tr(U_mu(x) U_nu(x+mu) U_mu(x+nu)^+ U_nu(x)^+) = sum_ab (U_mu(x) U_nu(x+mu))_ab
    conj((U_nu(x) U_mu(x+nu))_ab): two matrix products per plane instead of three. The
    products run on matrices stored matrix-axes-first, elementwise over sites and batch, with
    a hand-written backward (the same derivative as autograd's through the products; a double
    backward, ``create_graph=True``, goes through differentiable operations instead).

    Arguments:
        links: Gauge links (B, d, L_0, ..., L_{d-1}, N, N), complex, or the d link fields
            U_mu, each (B, L..., N, N) (e.g. ``u.unbind(1)``).
        dtype: Complex dtype of the arithmetic (``torch.complex64`` for a float32
            conditioner); default: that of the links.

    Returns:
        (B, d(d-1)/2, L...) in ``dtype``, planes ordered as :func:`sun_plaquettes`.

    Raises:
        ShapeError: on a link tensor that is not (B, d, L..., N, N) with d >= 2 and N x N
            complex matrices.

    References:
        Wilson, Phys. Rev. D 10 (1974) 2445.
    """
    u = links if isinstance(links, torch.Tensor) else torch.stack(list(links), dim=1)
    if u.dim() < 6 or u.shape[-1] != u.shape[-2] or not u.is_complex() or u.dim() - 4 != u.shape[1]:
        raise ShapeError(
            f"plaquette_traces: expected complex links of shape (B, d, L_0, ..., L_(d-1), N, N) with d >= 2; "
            f"found {u.dtype} {tuple(u.shape)}"
        )
    d = u.shape[1]
    lattice = tuple(u.shape[2 : 2 + d])
    index = plaquette_index(lattice, u.device)
    tr = PlaquetteTraces.apply(u.flatten(1, 1 + d), index, u.dtype if dtype is None else dtype)
    return tr.view(u.shape[0], d * (d - 1) // 2, *lattice)
