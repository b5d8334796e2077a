r"""Symmetrised flows: the average of a flow's density over a finite symmetry group.

A theory whose action is invariant under a finite group G of field transformations
(phi -> -phi for phi^4: the Z2 of the Ising universality class) has a target density
p(g x) = p(x) with as many modes as G has elements in its broken phase. A flow q trained
by the reverse KL divergence from a unimodal prior typically captures one mode (mode
collapse), and its independence-Metropolis chain then never leaves it. The symmetrised
density

    q_s(x) = (1/|G|) sum_{g in G} q(g x)

(Hackett et al., arXiv:2107.00734, section III, "symmetrised" mixture flows) is exactly
G-invariant, normalised (each g is a bijection with |det g| = 1 in the reference measure),
and is sampled exactly by drawing y ~ q and applying an element g drawn uniformly from G.
A flow that models one mode well gives a q_s that models all of them, so the chain
tunnels at every accepted proposal. Training the reverse KL with q_s in place of q is
just as cheap per sample and no longer penalises a flow for finding only one mode: the
loss E_{x~q_s}[log q_s(x) + S(x)] equals E_{y~q}[log q_s(y) + S(y)], since both terms
are G-invariant (same value and same gradient for every latent sample).

How flowplug does it
    The core knows no symmetry: a field kind's record
    (:class:`flowplug.records.FieldKindSpec`, ``symmetries``) names the transformations
    of its fields (``scalar``: ``z2``, phi -> -phi), and an action's record
    (:class:`flowplug.records.ActionSpec`, ``symmetries``) names those that leave it
    invariant (``phi4``: ``z2``). ``[flow] symmetrize = "z2"`` (:func:`flowplug.flow.build_flow`)
    builds a :class:`SymmetrizedFlow`; the name is part of :attr:`flowplug.flow.Flow.spec`,
    so a checkpoint rebuilds the same density.

Latent variables
    The map from latent variables to x is |G|-to-1, so the latent variable of a
    :class:`SymmetrizedFlow` is the pair (k, z): the index k of the group element and the
    base flow's latent z, packed into one tensor u of shape (B, 1 + n_z) (k in column 0,
    then z flattened; the dtype of z). Its prior is r(z) / |G|. ``forward(u)`` returns
    x = g_k f(z) and ``inverse(x)`` the branch with the largest q(g x); both return in
    place of a log-Jacobian the log density ratio that makes every sampler's bookkeeping,
    log q_s(x) = log prior(u) - logdet = log prior(u) + logdet_inv, exact. Everything that
    draws proposals as ``sample_latent`` then ``forward`` (the independence Metropolis
    kernel, ``flowplug propose``, the training loop) therefore samples q_s with its exact
    density. Kernels that move the latent variables continuously (``flow-hmc``) need a
    bijection and refuse a symmetrised flow (the index k would stop being an integer).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import torch
from torch import nn

from flowplug.errors import ConfigError, ShapeError
from flowplug.flow import Flow

__all__ = ["SymmetrizedFlow", "GroupIndexPrior", "symmetrize_flow", "field_symmetry", "check_action_symmetry"]

Transform = Callable[[torch.Tensor], torch.Tensor]


def field_symmetry(field: str, name: str) -> tuple[Transform, ...]:
    """The non-identity elements of the symmetry ``name`` of a field kind.

    Arguments:
        field: Field kind (``"scalar"``...).
        name: Symmetry name from the kind's record (``"z2"``).

    Returns:
        The transformations g (each x -> g x, same shape and dtype; involutions with
        |det g| = 1), from :attr:`flowplug.records.FieldKindSpec.symmetries`.

    Raises:
        ConfigError: if the field kind has no symmetry of that name (listing those it has),
            or is unknown.
    """
    from flowplug.theory import field_kind

    rec = field_kind(field)
    table = dict(rec.symmetries)
    key = str(name).strip().lower()
    if key not in table:
        have = ", ".join(sorted(table)) or "none"
        raise ConfigError(
            f"flow.symmetrize = {name!r}: field kind '{field}' has no symmetry of that name "
            f"(its symmetries: {have}); a plugin declares them in its FieldKindSpec(symmetries=...)"
        )
    return tuple(table[key])


def check_action_symmetry(action: str, name: str) -> str:
    """Check that the registered action ``action`` is invariant under the symmetry ``name``.

    Arguments:
        action: Registry name of the action (``action.name``).
        name: Symmetry name (``flow.symmetrize``); empty means no symmetrisation.

    Returns:
        ``name``, lower case and stripped ("" when empty).

    Raises:
        ConfigError: if the action's record does not list ``name`` in its ``symmetries``
            (symmetrising over a transformation that changes the action still gives an
            exact sampler, but one that wastes proposals; flowplug refuses it).
        UnknownComponentError: if ``action`` is not registered.
    """
    from flowplug.manager import registry

    key = str(name or "").strip().lower()
    if not key:
        return ""
    rec = registry("action").get(action)
    have = tuple(getattr(rec, "symmetries", ()))
    if key not in have:
        raise ConfigError(
            f"flow.symmetrize = {name!r}: action '{rec.name}' is not invariant under '{key}' "
            f"(its symmetries: {', '.join(have) or 'none'}); drop flow.symmetrize"
        )
    return key


class GroupIndexPrior(nn.Module):
    """Prior of a :class:`SymmetrizedFlow`: a base prior r(z) times a uniform group index k.

    Arguments:
        base: The base flow's prior (``sample(n, generator)``, ``log_prob(z)``).
        order: |G| (>= 2).
        event_shape: Shape of one base latent z (the field layout without the batch axis).

    ``sample(n, generator)`` returns packed u of shape (n, 1 + prod(event_shape)) (column 0:
    k in {0, ..., order - 1}, in the dtype of z; then z flattened); ``log_prob(u)`` is
    log r(z) - log |G|, shape (n,), float64.

    Raises:
        ConfigError: from :meth:`unpack`, if k is not an integer in range.
        ShapeError: from :meth:`unpack`, if u does not have the packed shape.
    """

    def __init__(self, base: nn.Module, order: int, event_shape: Sequence[int]) -> None:
        super().__init__()
        self.base = base
        self.order = int(order)
        self.event_shape = tuple(int(v) for v in event_shape)
        self.log_order = math.log(self.order)

    def pack(self, k: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """u = [k, z flattened], shape (B, 1 + n_z), dtype of z."""
        return torch.cat([k.to(z.dtype).reshape(-1, 1), z.reshape(z.shape[0], -1)], dim=1)

    def unpack(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k, z)``: k (B,) long, z (B, *event_shape).

        Raises:
            ShapeError: if u is not (B, 1 + n_z).
            ConfigError: if k is not an integer in [0, order) (a kernel moved it).
        """
        n_z = math.prod(self.event_shape)
        if u.dim() != 2 or u.shape[1] != 1 + n_z:
            raise ShapeError(
                f"symmetrised flow: latent variables are packed (B, 1 + {n_z}) = [group index, z]; "
                f"found shape {tuple(u.shape)}"
            )
        kf = u[:, 0].real if u.is_complex() else u[:, 0]
        k = torch.round(kf.detach())
        if not bool(((k - kf.detach()).abs() == 0).all() and ((k >= 0) & (k < self.order)).all()):
            raise ConfigError(
                f"symmetrised flow: the latent group index must be an integer in [0, {self.order}); "
                f"found {kf.detach().flatten()[:4].tolist()}... A symmetrised flow is a mixture, not a "
                "bijection: kernels that move its latent variables (flow-hmc) cannot use it; use "
                "independence-metropolis"
            )
        return k.long(), u[:, 1:].reshape(u.shape[0], *self.event_shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` packed latent samples (class docstring)."""
        z = cast(Any, self.base).sample(n, generator=generator)
        k = torch.randint(self.order, (int(n),), generator=generator, device=z.device)
        return self.pack(k, z)

    def log_prob(self, u: torch.Tensor) -> torch.Tensor:
        """log r(z) - log |G|, shape (B,), float64."""
        _, z = self.unpack(u)
        return cast(Any, self.base).log_prob(z).to(torch.float64) - self.log_order


def _select(k: torch.Tensor, candidates: Sequence[torch.Tensor]) -> torch.Tensor:
    """candidates[k[b]][b] for every b (differentiable in the candidates)."""
    out = candidates[0]
    for j in range(1, len(candidates)):
        mask = (k == j).reshape(-1, *([1] * (out.dim() - 1)))
        out = torch.where(mask, candidates[j], out)
    return out


class SymmetrizedFlow(Flow):
    r"""A flow whose density is averaged over a finite symmetry group G (module docstring).

    q_s(x) = (1/|G|) sum_g q(g x), q the density of the base flow (``prior`` and
    ``layers``), log q_s computed in float64 with a logsumexp over the |G| branches, each
    through the base flow's exact inverse. Sampling: y = f(z), z ~ r, then x = g_k y with
    k uniform. The group must consist of the identity and the given involutions
    (g g = identity), closed under composition (Z2: {1, phi -> -phi}).

    Arguments:
        prior: The base prior (a registered prior); wrapped in a :class:`GroupIndexPrior`.
        layers, field, lattice, spec: As :class:`flowplug.flow.Flow` (the layers' parameters
            keep their names, ``layers.<i>...``, so weights move between the symmetrised
            and the plain flow).
        symmetry: The symmetry's name (``"z2"``), recorded in ``spec["symmetrize"]``.
        transforms: Its non-identity elements (:func:`field_symmetry`).

    Attributes:
        symmetry: As given.
        order: |G|.
        path_gradient_blockers: Names reported by
            :func:`flowplug.flow.layers_without_forward_diag`: the fast path-gradient
            estimator follows the base flow's Jacobian and does not know the mixture, so a
            symmetrised flow trains path gradients through its inverse (``auto`` picks it).

    Raises:
        ConfigError: without transforms, or for elements whose inverses are not among them
            (tried on a prior sample; involutions are their own).

    ``forward(u) -> (x, log prior(u) - log q_s(x))``, ``inverse(x) -> (u, log q_s(x) -
    log prior(u))``, both (B,) float64 (module docstring, "Latent variables").

    References:
        Hackett et al., arXiv:2107.00734, section III (mixtures over a symmetry group) and
        section VIII (sampling the broken phase of phi^4).
    """

    path_gradient_blockers = ("SymmetrizedFlow (a mixture over a symmetry group)",)

    def __init__(
        self,
        prior: nn.Module,
        layers: Sequence[nn.Module],
        *,
        field: str,
        lattice: Sequence[int],
        spec: Mapping[str, Any] | None = None,
        symmetry: str,
        transforms: Sequence[Transform],
    ) -> None:
        if not transforms:
            raise ConfigError(f"symmetry {symmetry!r} has no transformations besides the identity")
        from flowplug.theory import field_space

        try:
            event = field_space(field).shape(tuple(int(v) for v in lattice), 1)[1:]
        except ConfigError:
            event = tuple(int(v) for v in lattice)
        super().__init__(
            GroupIndexPrior(prior, 1 + len(transforms), event), layers, field=field, lattice=lattice, spec=spec
        )
        self.symmetry = str(symmetry)
        self._transforms = tuple(transforms)
        self.order = 1 + len(self._transforms)
        self._check_involutions(prior)

    def _check_involutions(self, prior: nn.Module) -> None:
        """Refuse a set of elements that is not closed under inverses, tried on two prior samples.

        Sampling x = g_k y (k uniform) draws from (1/|G|) sum_k q(g_k^{-1} x), and the density
        here is (1/|G|) sum_k q(g_k x): the two agree when the inverse of every element is an
        element (involutions, g g = identity, are their own). A plugin's set without the
        inverses would make an inexact sampler silently, so it is refused (seeded locally:
        the global random state is left alone).
        """
        try:
            z = cast(Any, prior).sample(2, generator=torch.Generator().manual_seed(0))
        except Exception:  # a prior that cannot sample here: nothing to try the elements on
            return
        for i, g in enumerate(self._transforms, start=1):
            gz = g(z)
            if not any(
                h(gz).shape == z.shape and torch.allclose(h(gz), z, rtol=0.0, atol=1e-12) for h in self._transforms
            ):
                raise ConfigError(
                    f"symmetry {self.symmetry!r}: the inverse of element {i} is not among the elements "
                    "(tried on a prior sample); a symmetrised flow needs a set closed under inverses, "
                    "e.g. involutions (g g = identity): declare it so in the FieldKindSpec"
                )

    @property
    def group_prior(self) -> GroupIndexPrior:
        """The :class:`GroupIndexPrior` (``self.prior``)."""
        return cast(GroupIndexPrior, self.prior)

    def _elements(self, y: torch.Tensor) -> list[torch.Tensor]:
        """[y, g_1 y, ..., g_{|G|-1} y]."""
        return [y, *(g(y) for g in self._transforms)]

    def _base_log_q(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, log q(x))`` of the base flow through its exact inverse; (B,) float64."""
        z, ld = Flow.inverse(self, x)
        return z, cast(Any, self.group_prior.base).log_prob(z).to(torch.float64) + ld

    def _log_q_s(self, log_qs: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.logsumexp(torch.stack(list(log_qs)), dim=0) - math.log(self.order)

    def forward(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x = g_k f(z) for packed u = (k, z); returns ``(x, log prior(u) - log q_s(x))``, (B,) float64.

        Raises:
            ShapeError, ConfigError: if u is not a packed latent with integer k
                (:meth:`GroupIndexPrior.unpack`).
        """
        prior = self.group_prior
        k, z = prior.unpack(u)
        y, logdet = Flow.forward(self, z)
        log_r = cast(Any, prior.base).log_prob(z).to(torch.float64)
        images = self._elements(y)
        log_q = [log_r - logdet] + [self._base_log_q(gy)[1] for gy in images[1:]]
        log_q_s = self._log_q_s(log_q)
        x = _select(k, images)
        return x, (log_r - prior.log_order) - log_q_s

    def _branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(k, z, log q_s(x))``: the branch k with the largest q(g_k x), its z = f^{-1}(g_k x)."""
        pairs = [self._base_log_q(gx) for gx in self._elements(x)]
        log_q = torch.stack([lq for _, lq in pairs])
        k = torch.nan_to_num(log_q.detach(), nan=-math.inf).argmax(dim=0)
        z = _select(k, [zz for zz, _ in pairs])
        return k, z, self._log_q_s(list(log_q))

    def inverse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u, log q_s(x) - log prior(u))`` with u = (k, f^{-1}(g_k x)), k the most likely branch.

        forward(inverse(x)) = x (each g is an involution); inverse(forward(u)) = u only on
        that branch, since the map is |G|-to-1 (:meth:`latent_distance` compares latents
        modulo G).
        """
        prior = self.group_prior
        k, z, log_q_s = self._branches(x)
        log_prior = cast(Any, prior.base).log_prob(z).to(torch.float64) - prior.log_order
        return prior.pack(k, z), log_q_s - log_prior

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log q_s(x), shape (B,), float64 (|G| passes through the base flow's inverse).

        Raises:
            ShapeError: if x does not have the flow's layout.
        """
        return self._branches(x)[2]

    def base_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log q(x) of the base (unsymmetrised) flow, shape (B,), float64."""
        return self._base_log_q(x)[1]

    def latent_distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Distance of two packed latents modulo G, shape (B,) float64: the field distance of
        their canonical representatives inverse(forward(u)), inf where their branches differ.

        Used by :func:`flowplug.flowtools.check_inverse` (the latent round trip of a
        |G|-to-1 map is defined only up to the group).
        """
        from flowplug.theory import field_space

        prior = self.group_prior
        ka, za = prior.unpack(self.inverse(self.forward(a)[0])[0])
        kb, zb = prior.unpack(self.inverse(self.forward(b)[0])[0])
        try:
            d = field_space(self.field).distance(za, zb)
        except ConfigError:
            d = (za - zb).abs().flatten(1).amax(1)
        return torch.where(ka == kb, d.to(torch.float64), torch.full_like(d, math.inf, dtype=torch.float64))


def symmetrize_flow(flow: Flow, symmetry: str) -> SymmetrizedFlow:
    """The :class:`SymmetrizedFlow` of ``flow``'s prior and layers over ``symmetry`` of its field.

    Shares the modules of ``flow`` (same parameters); ``spec["symmetrize"]`` is set.

    Raises:
        ConfigError: if the field kind has no such symmetry (:func:`field_symmetry`), or
            ``flow`` is already symmetrised.
    """
    if isinstance(flow, SymmetrizedFlow):
        raise ConfigError(f"the flow is already symmetrised over '{flow.symmetry}'")
    key = str(symmetry).strip().lower()
    transforms = field_symmetry(flow.field, key)
    spec = dict(flow.spec or {})
    spec["symmetrize"] = key
    return SymmetrizedFlow(
        cast(nn.Module, flow.prior),
        list(flow.layers),
        field=flow.field,
        lattice=flow.lattice,
        spec=spec,
        symmetry=key,
        transforms=transforms,
    )
