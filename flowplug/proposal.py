r"""A drop-in flow proposal step for production HMC codes.

:class:`FlowProposal` wraps a trained flow and the action it was trained for. Between
two HMC trajectories, a driver (GPT, Chroma's Python bindings, a user's own loop) calls

.. code-block:: python

    step = FlowProposal.from_checkpoint("flow.pt", layout="ildg", seed=1)
    U, result = step.step(U)       # U: numpy or torch, ILDG or canonical layout

and gets the next configuration of an exact Markov chain: a fresh x' ~ q is accepted
with probability min(1, exp([log p(x') - log q(x')] - [log p(U) - log q(U)])) in float64,
log q(U) coming from the inverse flow (U did not come from the flow). A composition of
HMC trajectories (exact for p) and these steps (exact for p) is exact for p (Tierney
1994, section 2.4).

Layouts (``layout=``):

``"ildg"``       one configuration (L_{d-1}, ..., L_0, d, N, N) (4D: (lt, lz, ly, lx, 4, N, N)),
                 directions mu = x, y, z, t, as production codes store it; or a batch
                 with a leading axis;
``"canonical"``  flowplug's (d, L_0, ..., L_{d-1}, N, N) (U(1): (d, L_0, ...) angles), or
                 a batch (B, ...).

The result has the type (numpy/torch), dtype, device and layout of the input.

The action must be the production action
    The Metropolis test uses the flow's stored action (pure gauge Wilson action at the
    flow's beta). This is exact for the production chain only if the production code
    samples exactly that action. With dynamical fermions (or any other action), do not
    use the built-in decision: call :meth:`FlowProposal.propose` for x' and the two log
    q values, evaluate the production action S_prod (fermion determinant/pseudofermions
    included) on U and x', and accept with log A = [-S_prod(x') - log q(x')] -
    [-S_prod(U) - log q(U)] (:meth:`FlowProposal.decide` does this arithmetic).

Non-equilibrium proposals
    ``FlowProposal(flow, action, kernel=NonEquilibrium(action, flow=flow, ...))``
    (``flowplug propose --kernel nonequilibrium``) proposes the endpoint of a
    non-equilibrium evolution instead of a flow sample; the role of log q is played by
    W - S(x), W the work (:mod:`flowplug.plugins.nonequilibrium`; the current
    configuration's work comes from a path drawn backwards from it), so the decision and
    the ``--no-decide`` rule for another production action are unchanged.

References:
    Albergo, Kanwar, Shanahan, arXiv:1904.12072, section III (flow independence
    Metropolis); Caselle et al., arXiv:2201.08862 (non-equilibrium proposals); Tierney,
    Ann. Statist. 22 (1994) 1701, sections 2.3.3 and 2.4.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any

import numpy as np
import torch

from flowplug.errors import ConfigError, ShapeError
from flowplug.layout import from_ildg, ildg_shape, to_ildg
from flowplug.metropolis import independence_log_accept, metropolis_test
from flowplug.theory import SUNSpace, field_space

LAYOUTS = ("ildg", "canonical")


@dataclasses.dataclass
class ProposalResult:
    """Outcome of one :meth:`FlowProposal.step`.

    Attributes:
        accepted: Accept decision per configuration, numpy bool array of shape (B,)
            (B = 1 for a single configuration).
        log_p_current, log_q_current: -S and log q of the input, (B,) float64 numpy.
        log_p_proposal, log_q_proposal: -S and log q of the flow proposal, (B,) float64.
        delta_S: S(proposal) - S(current), (B,) float64.
        log_accept: The float64 log acceptance ratio, (B,).
    """

    accepted: np.ndarray
    log_p_current: np.ndarray
    log_q_current: np.ndarray
    log_p_proposal: np.ndarray
    log_q_proposal: np.ndarray
    delta_S: np.ndarray
    log_accept: np.ndarray

    def as_dict(self, index: int = 0) -> dict[str, Any]:
        """JSON-ready values of configuration ``index`` (plain bool/floats)."""
        return {
            "accepted": bool(self.accepted[index]),
            **{
                k: float(getattr(self, k)[index])
                for k in ("log_p_current", "log_q_current", "log_p_proposal", "log_q_proposal", "delta_S", "log_accept")
            },
        }


def to_canonical(
    u: np.ndarray | torch.Tensor, field: str, lattice: tuple[int, ...], layout: str
) -> tuple[torch.Tensor, bool]:
    """Convert a configuration (or batch) to the canonical batched layout.

    Arguments:
        u: numpy array or torch tensor.
        field: Field kind of the flow (``u1``, ``su2``, ``su3``, ``scalar``...).
        lattice: The flow's lattice (L_0, ..., L_{d-1}), x first.
        layout: ``"ildg"`` or ``"canonical"`` (module docstring).

    Returns:
        ``(x, batched)``: x in the canonical layout of the kind (SU(N): (B, d, L..., N, N)
        complex128; U(1): (B, d, L...) float64; site fields: (B, L...) float64) on u's
        device; batched says whether the input had a batch axis.

    Raises:
        ShapeError: if the shape fits neither a single configuration nor a batch of the
            given layout, lattice and field kind (message shows the expected shape).
        ConfigError: on an unknown layout or field kind, or ``ildg`` for non-SU(N) fields.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    t = torch.from_numpy(np.ascontiguousarray(u)) if isinstance(u, np.ndarray) else u
    if not isinstance(t, torch.Tensor):
        raise ShapeError(f"configuration must be a numpy array or torch tensor; found {type(u).__name__}")
    space = field_space(field)
    if layout == "ildg":
        if not isinstance(space, SUNSpace):
            raise ConfigError(f"layout 'ildg' holds SU(N) matrices; give {field} fields in the canonical layout")
        single = ildg_shape(lattice, space.n)
    else:
        single = space.shape(lattice, 1)[1:]
    shape = tuple(t.shape)
    if shape == single:
        t, batched = t.unsqueeze(0), False
    elif shape[1:] == single:
        batched = True
    else:
        raise ShapeError(
            f"configuration of shape {shape} does not fit a {field} field on lattice "
            f"{'x'.join(map(str, lattice))} (x first) in layout '{layout}': expected "
            f"{single} or (B, {', '.join(map(str, single))})"
        )
    if layout == "ildg":
        t = from_ildg(t, batched=True)
    t = t.to(space.dtype).contiguous()
    return t, batched


def from_canonical(
    x: torch.Tensor, like: np.ndarray | torch.Tensor, layout: str, batched: bool
) -> np.ndarray | torch.Tensor:
    """Inverse of :func:`to_canonical`: the type, dtype, device and layout of ``like``.

    Arguments:
        x: Canonical batched field, as :func:`to_canonical` returns it.
        like: The array the caller gave (its type, dtype and device are copied).
        layout: ``"ildg"`` or ``"canonical"``.
        batched: Whether to keep the batch axis.

    Returns:
        A numpy array or torch tensor like ``like``.
    """
    if layout == "ildg":
        x = to_ildg(x, batched=True)
    if not batched:
        x = x[0]
    if isinstance(like, np.ndarray):
        return np.ascontiguousarray(x.detach().cpu().numpy()).astype(like.dtype, copy=False)
    return x.contiguous().to(dtype=like.dtype, device=like.device)


class FlowProposal:
    r"""Drop-in flow proposal step with an exact float64 Metropolis test (module docstring).

    Arguments:
        flow: Trained :class:`flowplug.flow.Flow`.
        action: The action the chain samples (default: none; then :meth:`step` is
            unavailable and only :meth:`propose`/:meth:`decide` are used).
        layout: ``"ildg"`` (default) or ``"canonical"``.
        seed: Seed of the proposal/decision random numbers (default: fresh entropy;
            :attr:`seed` tells which was used).
        device: Device for the flow's computations (default: the flow's).
        kernel: Another independence-type kernel to propose with instead of flow
            independence Metropolis, e.g. :class:`flowplug.plugins.nonequilibrium.NonEquilibrium`:
            its ``step`` info must hold ``log_p_*``, ``log_q_*`` and ``log_accept``
            (``log_q`` = the kernel's effective log q; for non-equilibrium proposals
            W - S), and :meth:`propose` needs its ``propose_from(x, generator) ->
            (x', log_q_current, log_q_proposal)``.

    Raises:
        ConfigError: on a field mismatch between flow and action, a bad layout, or a kernel
            whose chain state must persist between steps (``requires_persistent_state``,
            e.g. ``pseudo-marginal``): a one-step proposal would redraw that state.

    References:
        Albergo, Kanwar, Shanahan, arXiv:1904.12072, section III.
    """

    #: The :class:`flowplug.flowtools.InverseCheck` of :meth:`from_checkpoint`; ``None``
    #: for an object built directly from a flow.
    inverse_check: Any = None

    def __init__(
        self,
        flow: Any,
        action: Any = None,
        *,
        layout: str = "ildg",
        seed: int | None = None,
        device: Any = None,
        kernel: Any = None,
    ) -> None:
        if layout not in LAYOUTS:
            raise ConfigError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
        if action is not None and action.field != flow.field:
            raise ConfigError(f"flow samples '{flow.field}' fields but the action acts on '{action.field}'")
        if getattr(kernel, "requires_persistent_state", False):
            name = getattr(kernel, "name", type(kernel).__name__)
            raise ConfigError(
                f"kernel {name!r} keeps part of its chain state between steps (e.g. the pseudo-marginal "
                "determinant estimate of the current configuration); one step per call on a configuration "
                "would redraw it, which is not exact: run its chains with flowplug sample or resample"
            )
        self.flow = flow
        self.action = action
        self.layout = layout
        self.device = torch.device(device) if device is not None else flow.device
        self.seed = int(secrets.randbits(62) if seed is None else seed)
        self.generator = torch.Generator(device=self.device).manual_seed(self.seed)
        from flowplug.manager import registry

        #: Whether a kernel other than flow independence Metropolis proposes.
        self.custom_kernel = kernel is not None
        self.kernel = (
            kernel
            if kernel is not None
            else registry("kernel").get("independence-metropolis").factory(flow=flow, action=action)
            if action is not None
            else None
        )

    @classmethod
    def from_checkpoint(
        cls,
        path: str,
        *,
        layout: str = "ildg",
        seed: int | None = None,
        device: Any = None,
        action: Any = None,
        check_inverse: bool = True,
    ) -> FlowProposal:
        """Build from a ``flowplug train`` run directory or checkpoint file, with its action.

        log q of the configurations handed to :meth:`step` comes from the inverse flow, so
        the flow must first pass :func:`flowplug.flowtools.check_inverse`; its result is
        the returned object's ``inverse_check`` attribute.

        Arguments:
            check_inverse: Refuse a flow that fails the check (default); ``False`` warns
                (:class:`flowplug.errors.InverseCheckWarning`) and uses it anyway.

        Raises:
            CheckpointError: if the checkpoint cannot be read (NonFiniteParametersError
                for NaN/Inf parameters).
            InverseCheckError: if the flow fails the inverse check and ``check_inverse``
                is true.
            ConfigError: if it names no action and none is given.
        """
        from flowplug.flowtools import open_flow

        ck = open_flow(path, device=device, check_inverse=check_inverse)
        prop = cls(ck.flow, action if action is not None else ck.action(), layout=layout, seed=seed, device=device)
        prop.inverse_check = ck.inverse_check
        return prop

    # ----------------------------------------------------------------- pieces

    def _canonical(self, u: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, bool]:
        x, batched = to_canonical(u, self.flow.field, tuple(self.flow.lattice), self.layout)
        return x.to(self.device), batched

    def log_q(self, u: np.ndarray | torch.Tensor) -> np.ndarray:
        """log q of configurations through the inverse flow, (B,) float64 numpy."""
        x, _ = self._canonical(u)
        with torch.no_grad():
            return self.flow.log_prob(x).detach().to(torch.float64).cpu().numpy()

    def propose(self, u: np.ndarray | torch.Tensor) -> tuple[np.ndarray | torch.Tensor, np.ndarray, np.ndarray]:
        """A flow proposal for each input configuration, without deciding.

        With a ``kernel`` (non-equilibrium proposals), its ``propose_from`` gives the
        proposal and the effective log q values (W - S: the current configuration's
        work from a reverse path).

        Returns:
            ``(proposal, log_q_current, log_q_proposal)``: the proposal in the input's
            type and layout; log q values (B,) float64 numpy. A non-finite
            ``log_q_proposal`` (a flow that broke down on that draw) marks a proposal
            that must be rejected; :meth:`decide` does so.
        """
        x, batched = self._canonical(u)
        if self.custom_kernel:
            propose_from = getattr(self.kernel, "propose_from", None)
            if propose_from is None:
                raise ConfigError(
                    f"kernel {getattr(self.kernel, 'name', type(self.kernel).__name__)!r} cannot propose "
                    "without deciding (it has no propose_from)"
                )
            with torch.no_grad():
                x1, lq0, lq1 = propose_from(x, self.generator)
            return (
                from_canonical(x1, u, self.layout, batched),
                lq0.to(torch.float64).cpu().numpy(),
                lq1.to(torch.float64).cpu().numpy(),
            )
        with torch.no_grad():
            lq0 = self.flow.log_prob(x).to(torch.float64)
            z, log_r = self.flow.sample_latent(x.shape[0], self.generator)
            x1, logdet = self.flow(z)
            lq1 = log_r.to(torch.float64) - logdet.to(torch.float64)
        return from_canonical(x1, u, self.layout, batched), lq0.cpu().numpy(), lq1.cpu().numpy()

    def decide(
        self, log_p_current: Any, log_q_current: Any, log_p_proposal: Any, log_q_proposal: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """Float64 Metropolis decision from externally computed log-densities.

        Arguments:
            log_p_current, log_p_proposal: -S_prod of the current configuration and the
                proposal (the production code's own action), (B,) or scalars.
            log_q_current, log_q_proposal: From :meth:`propose`.

        Returns:
            ``(accepted, log_accept)``: (B,) bool and float64 numpy arrays; a proposal
            with a non-finite log p or log q has log_accept = -inf and is rejected
            (:mod:`flowplug.metropolis`).
        """
        f = lambda v: torch.as_tensor(np.atleast_1d(np.asarray(v, dtype=np.float64)))  # noqa: E731
        la = independence_log_accept(f(log_p_proposal), f(log_q_proposal), f(log_p_current), f(log_q_current)).to(
            self.device
        )
        acc = metropolis_test(la, self.generator)
        return acc.cpu().numpy(), la.cpu().numpy()

    # ------------------------------------------------------------------- step

    def step(self, u: np.ndarray | torch.Tensor) -> tuple[np.ndarray | torch.Tensor, ProposalResult]:
        """One exact flow-Metropolis step from configuration(s) ``u``.

        Arguments:
            u: numpy array or torch tensor, one configuration or a batch, in :attr:`layout`.

        Returns:
            ``(next, result)``: the next configuration(s) (the proposal where accepted,
            else ``u`` unchanged), same type/dtype/layout as ``u``; and a
            :class:`ProposalResult`.

        Raises:
            ShapeError: if ``u`` does not fit the flow's lattice and group.
            ConfigError: if the object was built without an action.
        """
        if self.kernel is None or self.action is None:
            raise ConfigError(
                "FlowProposal without an action cannot decide; use propose() and decide() "
                "with the production code's action"
            )
        x, batched = self._canonical(u)
        state = self.kernel.init(x)
        new, info = self.kernel.step(state, self.generator)
        acc = info["accepted"]
        out = from_canonical(new.x, u, self.layout, batched)
        if not bool(acc.any()):
            out = u
        res = ProposalResult(
            accepted=acc.cpu().numpy(),
            log_p_current=info["log_p_current"].cpu().numpy(),
            log_q_current=info["log_q_current"].cpu().numpy(),
            log_p_proposal=info["log_p_proposal"].cpu().numpy(),
            log_q_proposal=info["log_q_proposal"].cpu().numpy(),
            delta_S=(info["log_p_current"] - info["log_p_proposal"]).cpu().numpy(),
            log_accept=info["log_accept"].cpu().numpy(),
        )
        return out, res

    def __repr__(self) -> str:
        return (
            f"FlowProposal({self.flow.field} on {list(self.flow.lattice)}, "
            f"action={self.action!r}, layout={self.layout!r})"
        )
