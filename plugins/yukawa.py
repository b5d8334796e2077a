r"""The Yukawa model: a real scalar and two staggered flavours (hooks ``flowplug_actions``, ``flowplug_observables``).

The model of Albergo et al., arXiv:2106.05934, section IV: a real scalar field phi coupled to
two degenerate flavours of staggered fermions through a Yukawa term,

    Z = int dphi det(D[phi])^2 exp(-S_B[phi]),   S_eff[phi] = S_B[phi] - log det(D^+ D),

with S_B the registered ``phi4`` action (S_B = sum_x [ -2 sum_mu phi_x phi_{x+mu} +
(2d + m2) phi_x^2 + lam phi_x^4 ]) and D the registered ``staggered-yukawa`` operator
(:mod:`flowplug.plugins.staggered`): D = M + K, M_x = mass + g phi_x, K the free staggered
hopping, antiperiodic in time. det D is real (even extents), so det(D)^2 = det(D^+ D). At
mass = 0 (the paper's massless fermions) S_eff is even in phi.

Actions (field kind ``scalar``, any d with even extents; the paper: d = 2):

``yukawa-exact`` (:class:`YukawaExactAction`)
    S = S_B - 2 log|det D|, the determinant from the dense matrix (small lattices). Force,
    analytic: dS/dphi_x = dS_B/dphi_x - 2 g Re (D^{-1})_{xx}.
``yukawa`` (:class:`YukawaPseudofermionAction`)
    pseudofermions: S[phi; pf] = S_B + pf^+ (D^+ D)^{-1} pf, the action of the joint
    distribution of phi and a complex field pf whose phi-marginal is the Yukawa model.
    ``refresh`` draws pf = D^+ eta, eta complex Gaussian (density exp(-eta^+ eta)): the exact
    heat bath at fixed phi; the HMC kernel calls it at every trajectory. With
    X = (D^+ D)^{-1} pf (conjugate gradient) and Y = D X, dS/dphi_x = dS_B/dphi_x - 2 g Re(Y_x^* X_x).

Observable ``staggered_condensate``: (1/V) Re tr D^{-1} per flavour, exact (dense inverse) or
stochastic (Z2 noise, CG), on the scalar background (needs ``g``, passed on from the action's
couplings) or on gauge links (``mass``).

References:
    M. S. Albergo et al., "Flow-based sampling for fermionic lattice field theories",
    arXiv:2106.05934, section IV (the Yukawa model) and section II (pseudofermions);
    M. S. Albergo, G. Kanwar, P. E. Shanahan, arXiv:1904.12072, eq. (6) (phi^4 convention);
    C. Gattringer & C. B. Lang, "Quantum Chromodynamics on the Lattice" (Springer 2010),
    sections 8.1-8.2 (pseudofermions, HMC forces), chapter 7 (chiral condensate);
    M. F. Hutchinson, Commun. Stat. Simul. Comput. 19 (1990) 433 (stochastic trace).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from flowplug.errors import ConfigError
from flowplug.hookspecs import hookimpl
from flowplug.plugins.fermion_actions import MAX_DENSE as _MAX_DENSE
from flowplug.plugins.fermion_actions import MAX_DENSE_OBSERVABLE as _MAX_DENSE_OBSERVABLE
from flowplug.plugins.fermion_actions import _ExactDeterminant, _FermionAction, _Pseudofermions, _re_trace_inverse
from flowplug.records import ActionSpec, ObservableSpec

__all__ = [
    "YukawaExactAction",
    "YukawaPseudofermionAction",
    "staggered_condensate",
    "MAX_DENSE",
    "MAX_DENSE_OBSERVABLE",
]

#: Largest n = V N of D for the exact determinant: the Wilson actions' limit (4096 rows), the same constant.
MAX_DENSE = _MAX_DENSE

#: ``staggered_condensate`` (``method="auto"``) inverts D densely up to this n: the Wilson observables' limit.
MAX_DENSE_OBSERVABLE = _MAX_DENSE_OBSERVABLE

#: Observables the Yukawa actions add to the defaults of the ``scalar`` kind.
YUKAWA_OBSERVABLES = ("staggered_condensate",)


def _component(kind: str, name: str, **kwargs: Any) -> Any:
    """Build the registered component ``name`` of registry ``kind``."""
    from flowplug.manager import registry

    return registry(kind).get(name).factory(**kwargs)


class _YukawaAction(_FermionAction):
    """Common part of the Yukawa actions: the phi^4 action, the staggered operator, starts
    (checks, solver settings and forces: :class:`flowplug.plugins.fermion_actions._FermionAction`)."""

    field = "scalar"
    parameters = ("m2", "lam", "g", "mass", "cg_tol", "cg_maxiter")
    observables = YUKAWA_OBSERVABLES

    def __init__(
        self,
        m2: float = -4.0,
        lam: float = 8.0,
        g: float = 0.5,
        mass: float = 0.0,
        *,
        cg_tol: float = 1e-12,
        cg_maxiter: int = 2000,
    ) -> None:
        self.m2 = float(m2)
        self.lam = float(lam)
        self.g = float(g)
        self.mass = float(mass)
        if not (math.isfinite(self.g) and math.isfinite(self.mass)):
            raise ConfigError(f"{type(self).__name__}: g and mass must be finite; found g={g}, mass={mass}")
        self.bosonic = _component("action", "phi4", m2=self.m2, lam=self.lam)
        self.dirac = "staggered-yukawa"
        self.operator = _component("dirac_operator", self.dirac, mass=self.mass, g=self.g)
        self._solver_settings(cg_tol, cg_maxiter)

    def _bosonic(self) -> Any:
        """The phi^4 action S_B."""
        return self.bosonic

    def hot_start(
        self, lattice: Any, batch: int = 1, *, generator: torch.Generator | None = None, device: Any = None
    ) -> torch.Tensor:
        """The phi^4 action's hot start (narrow Gaussian, (batch, L...) float64)."""
        return self.bosonic.hot_start(lattice, batch, generator=generator, device=device)

    def exact_counterpart(self) -> YukawaExactAction:
        """The exact-determinant action with the same couplings (used by the ``exact-marginal`` kernel)."""
        return YukawaExactAction(self.m2, self.lam, self.g, self.mass, cg_tol=self.cg_tol, cg_maxiter=self.cg_maxiter)


class YukawaExactAction(_ExactDeterminant, _YukawaAction):
    r"""phi^4 plus two staggered flavours with the exact determinant: S = S_B - 2 log|det D[phi]|.

    For small lattices (n = V <= :data:`MAX_DENSE`); differentiable by autograd (flow training).

    Arguments:
        m2, lam: Couplings of the ``phi4`` action (S_B, module docstring).
        g: Yukawa coupling (site mass mass + g phi).
        mass: Bare staggered mass (default 0: massless, as in arXiv:2106.05934).
        cg_tol, cg_maxiter: Unused here (both Yukawa actions take the same couplings).

    Field: ``scalar``, phi (B, L_0, ..., L_{d-1}) float64, every extent even.

    Raises:
        ConfigError: for bad couplings (lam < 0, non-finite g or mass); ShapeError (from
            ``action``/``force``) for another layout, odd extents or a lattice too large.

    References:
        arXiv:2106.05934, section IV; Gattringer & Lang (2010), section 8.1.
    """

    _too_large = ("yukawa-exact", "the pseudofermion action 'yukawa'")


class YukawaPseudofermionAction(_Pseudofermions, _YukawaAction):
    r"""phi^4 plus two staggered flavours through pseudofermions: S = S_B + pf^+ (D^+ D)^{-1} pf.

    The action of the joint distribution of phi and the pseudofermion field pf (module
    docstring). :meth:`refresh` draws pf; the HMC kernel calls it at the start of every
    trajectory. ``action`` and ``force`` use the pf drawn last and solve (D^+ D) X = pf by
    the conjugate gradient (``cg_tol``, ``cg_maxiter``).

    Arguments:
        m2, lam, g, mass: As for :class:`YukawaExactAction`.
        cg_tol: Relative CG tolerance (default 1e-12: the float64 accept/reject and the
            reversibility of trajectories are not limited by the solver).
        cg_maxiter: CG iteration limit.

    Attributes:
        pf: The pseudofermion field, (B, L...) complex128, or None before :meth:`refresh`.
        last_report: The :class:`flowplug.plugins.dirac.CGReport` of the last solve.

    Raises:
        ConfigError: for bad couplings; from ``action``/``force``: ConfigError before any
            :meth:`refresh`, ShapeError if the batch differs from pf's, ConvergenceError if
            the CG does not converge.

    References:
        arXiv:2106.05934, sections II and IV; Gattringer & Lang (2010), sections 8.1-8.2.
    """

    _messages = ("yukawa", "'yukawa-exact'", "phi", "needs", "this phi")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pf: torch.Tensor | None = None
        self._fresh = None  # (phi, its version, eta^+ eta) of the last refresh

    def refresh(self, x: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Draw pf = D^+ eta, eta complex Gaussian with density exp(-|eta|^2): exactly distributed
        as exp(-pf^+ (D^+ D)^{-1} pf) at fixed phi.

        Arguments:
            x: phi, (B, L...) float64.
            generator: Random generator (on x's device); None uses torch's global one.

        Raises:
            ShapeError: for another layout.
        """
        self.check(x)
        self.pf = self._heat_bath(x, generator)

    def set_pseudofermions(self, pf: torch.Tensor | None) -> None:
        """Set pf directly (tests, samplers that draw it themselves); None forgets it."""
        self.pf = None if pf is None else pf.to(torch.complex128)
        self._fresh = None

    def _pf(self, x: torch.Tensor) -> torch.Tensor:
        return self._checked(x, self.pf)

    def fermion_action(self, x: torch.Tensor) -> torch.Tensor:
        """pf^+ (D^+ D)^{-1} pf, (B,) float64; at the phi of the last :meth:`refresh` (the same,
        unmodified tensor) the exact value eta^+ eta, without a solve."""
        return self._plain_fermion_action(x, self._pf(x))

    def fermion_force(self, x: torch.Tensor) -> torch.Tensor:
        """Force of pf^+ (D^+ D)^{-1} pf: X = (D^+ D)^{-1} pf, Y = D X, F_x = 2 g Re(Y_x^* X_x)."""
        return self._plain_force(x, self._pf(x))


# --------------------------------------------------------------------------- observables


def staggered_condensate(
    x: torch.Tensor,
    g: float | None = None,
    mass: float = 0.0,
    *,
    background: str | None = None,
    method: str = "auto",
    noise: int = 16,
    seed: int = 0,
    cg_tol: float = 1e-10,
    cg_maxiter: int = 2000,
) -> torch.Tensor:
    r"""Staggered chiral condensate per flavour, Sigma = (1/V) Re tr D^{-1}.

    On a scalar field (the Yukawa model) D is the ``staggered-yukawa`` operator with site mass
    mass + g phi_x; on U(1)/SU(N) links the ``staggered`` operator with mass ``mass`` (then
    the trace also runs over colour). <psibar psi> = -Sigma per flavour in the Grassmann sign
    convention. Free field: (1/V) sum_p m / (m^2 + sum sin^2 p) per colour (N times that on
    SU(N) links)
    (:func:`flowplug.plugins.staggered.free_staggered_condensate`), 0 at m = 0.

    Arguments:
        x: phi (B, L...) float64, or U(1) angles (B, d, L...) float64 / SU(N) links
            (B, d, L..., N, N) complex128; every extent even.
        g: Yukawa coupling (needed on a scalar field; ``flowplug hmc`` passes the action's).
        mass: Bare staggered mass (passed on from the action's couplings).
        background: ``"scalar"`` or ``"links"``; default ``"scalar"`` when ``g`` is given (a
            Yukawa run passes it), else ``"links"`` (never guessed from the shape: a scalar
            field and U(1) angles can have the same shape).
        method: ``"exact"`` (dense inverse), ``"stochastic"`` (``noise`` Z2 vectors drawn from
            ``seed``, CG solves: unbiased), ``"auto"``: exact when n <= :data:`MAX_DENSE_OBSERVABLE`.
        noise, seed: Of the stochastic estimate.
        cg_tol, cg_maxiter: Solver settings of the stochastic estimate.

    Returns:
        (B,) float64.

    Raises:
        ConfigError: without g on a scalar field, or for an unknown background or method.
        ShapeError: for another layout or odd extents; ConvergenceError if the CG fails.

    References:
        Gattringer & Lang (2010), chapter 7 (chiral condensate); arXiv:2106.05934, section IV;
        Hutchinson, Commun. Stat. Simul. Comput. 19 (1990) 433.
    """
    bg = ("scalar" if g is not None else "links") if background is None else str(background).strip().lower()
    if bg == "scalar":
        if g is None:
            raise ConfigError(
                "staggered_condensate on a scalar field needs the Yukawa coupling g: measure it in a run of "
                "'yukawa'/'yukawa-exact' (whose g is passed on), or give it as an option "
                "(staggered_condensate: g = 0.5)"
            )
        op = _component("dirac_operator", "staggered-yukawa", mass=float(mass), g=float(g))
    elif bg == "links":
        op = _component("dirac_operator", "staggered", mass=float(mass))
    else:
        raise ConfigError(f"staggered_condensate: background must be 'scalar' or 'links'; found {background!r}")
    tr, volume = _re_trace_inverse(
        op,
        x,
        method,
        noise=noise,
        seed=seed,
        cg_tol=cg_tol,
        cg_maxiter=cg_maxiter,
        who="staggered_condensate",
        dense=functools.partial(op.dense, by="blocks"),
    )
    return (tr / volume).to(torch.float64)


# ------------------------------------------------------------------------------ hooks


@hookimpl
def flowplug_actions() -> list[ActionSpec]:
    """The Yukawa model: exact determinant and pseudofermions."""
    return [
        ActionSpec(
            name="yukawa",
            description="phi^4 + 2 staggered flavours, Yukawa coupling g phi, pseudofermions (HMC refreshes them)",
            factory=YukawaPseudofermionAction,
            fields=("scalar",),
            parameters=_YukawaAction.parameters,
        ),
        ActionSpec(
            name="yukawa-exact",
            description="phi^4 + 2 staggered flavours with the exact determinant det(D^+ D) (small lattices)",
            factory=YukawaExactAction,
            fields=("scalar",),
            parameters=_YukawaAction.parameters,
        ),
    ]


@hookimpl
def flowplug_observables() -> list[ObservableSpec]:
    """The staggered chiral condensate."""
    return [
        ObservableSpec(
            name="staggered_condensate",
            description="(1/V) Re tr D^-1 per flavour, staggered (scalar field: needs g; links: mass)",
            factory=staggered_condensate,
            fields=("scalar", "u1", "su2", "su3"),
        )
    ]
