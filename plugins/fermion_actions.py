r"""Fermionic actions and observables (hooks ``flowplug_actions``, ``flowplug_observables``).

Two degenerate flavours of Wilson fermions coupled to a Wilson gauge field:

    Z = int dU det(D[U])^2 exp(-S_g[U]),   S_eff[U] = S_g[U] - log det(D^+ D),

with D the Dirac operator found by name in the ``dirac_operator`` registry (default the
built-in ``wilson``, :mod:`flowplug.plugins.dirac`: D = 1 - kappa H, antiperiodic in time)
and S_g the registered ``wilson`` gauge action (S_g = -beta sum_P Re U_P for U(1)). Since
D is gamma_5-hermitian, det D is real and det(D^+ D) = (det D)^2 = |det D|^2.

Actions (field kinds ``u1``; the ``wilson-nf2`` pair also ``su<N>``; d = 2 or 4):

``schwinger-exact`` / ``wilson-nf2-exact`` (:class:`ExactFermionAction`)
    S = S_g - 2 log|det D|, the determinant computed exactly from the dense matrix (small
    lattices). Force, analytic: dS/dtheta = dS_g/dtheta - 2 Re tr(D^{-1} dD/dtheta), the
    trace taken with the dense inverse (:meth:`flowplug.plugins.dirac.WilsonDiracOperator.derivative`).
``schwinger`` / ``wilson-nf2`` (:class:`PseudofermionAction`)
    pseudofermions: det(D^+ D) = int dphi dphi^* exp(-phi^+ (D^+ D)^{-1} phi) / const, so
    S[U; phi] = S_g + phi^+ (D^+ D)^{-1} phi samples the joint distribution of (U, phi).
    ``refresh`` draws phi = D^+ chi with chi complex Gaussian (density exp(-chi^+ chi)),
    the exact heat bath of phi at fixed U; the HMC kernel calls it at the start of every
    trajectory (:mod:`flowplug.theory`). With X = (D^+ D)^{-1} phi (conjugate gradient) and
    Y = D X, dS/dtheta = dS_g/dtheta - 2 Re(Y^+ (dD/dtheta) X). Options (off by default):
    ``even_odd`` (phi on the even sites, D -> D_hat = 1 - kappa^2 H_eo H_oe, det D_hat = det D)
    and ``hasenbusch_kappa`` (det(D^+ D) = det(W^+ W) det(W^{-+} D^+ D W^{-1}), W = D at a
    heavier mass, one pseudofermion field per factor); see :class:`PseudofermionAction`.

Observables (per configuration, (B,) float64; ``kappa`` comes from the action's couplings
in ``flowplug hmc``): ``chiral_condensate`` (1/V) Re tr D_m^{-1} per flavour, with
D_m = D/(2 kappa) the mass-normalised operator; ``pion_correlator`` C(t);
``pion_effective_mass`` of the source-averaged correlator of each configuration.

References:
    M. S. Albergo et al., "Flow-based sampling for fermionic lattice field theories",
    arXiv:2106.05934, section II (pseudofermions, the Schwinger model's determinant);
    C. Gattringer & C. B. Lang, "Quantum Chromodynamics on the Lattice" (Springer 2010),
    section 8.1 (pseudofermions), section 8.2 (HMC with dynamical fermions), chapter 6
    (meson correlators), chapter 7 (chiral condensate);
    J. S. Schwinger, Phys. Rev. 128 (1962) 2425 (the model); M. Hasenbusch, Phys. Lett. B 519
    (2001) 177, hep-lat/0107019 (mass preconditioning); docs/fermions.md.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from flowplug import groups
from flowplug.errors import ConfigError, ShapeError
from flowplug.hookspecs import hookimpl
from flowplug.records import ActionSpec, ObservableSpec
from flowplug.theory import Action

__all__ = [
    "ExactFermionAction",
    "PseudofermionAction",
    "chiral_condensate",
    "pion_correlators",
    "pion_correlator",
    "pion_effective_mass",
    "cosh_effective_mass",
    "MAX_DENSE",
    "MAX_DENSE_OBSERVABLE",
]

#: Largest dimension n = V s N of D for which dense matrices (exact determinant, exact
#: traces, all-to-all propagators) are built; 4096 is 256 MiB per configuration.
MAX_DENSE = 4096

#: Observables (``method="auto"``) use dense inverses up to this n = V s N: exact traces and
#: all-to-all propagators cost O(n^3) per configuration (n = 512 on 16x16 U(1)).
MAX_DENSE_OBSERVABLE = 1024

#: Observables the fermionic actions add to the defaults of their field kind.
FERMION_OBSERVABLES = ("chiral_condensate", "pion_effective_mass")


def _dirac(name: str, kappa: float) -> Any:
    """The Dirac operator ``name`` from the registry, built with ``kappa``."""
    from flowplug.manager import registry

    return registry("dirac_operator").get(name).factory(kappa=kappa)


def _gauge(beta: float, group: str) -> Any:
    """The registered ``wilson`` gauge action."""
    from flowplug.manager import registry

    return registry("action").get("wilson").factory(beta=beta, group=group)


def _chi_norm(chi: torch.Tensor) -> torch.Tensor:
    """chi^+ chi per batch element, (B,) float64, of a complex field (B, ...)."""
    return (chi.real**2 + chi.imag**2).flatten(1).sum(1).to(torch.float64)


class _FermionAction(Action):
    r"""Common part of the actions with two degenerate fermion flavours, S = S_bos - log det(D^+ D).

    Shared by the Wilson-fermion actions of this module (S_bos the gauge action S_g) and the
    Yukawa actions of :mod:`flowplug.plugins.yukawa` (S_bos the phi^4 action S_B). A subclass
    builds ``operator`` (the Dirac operator, from the registry), returns its bosonic action
    from :meth:`_bosonic`, calls :meth:`_solver_settings`, and implements
    :meth:`fermion_action` and :meth:`fermion_force` (or takes them from
    :class:`_ExactDeterminant` / :class:`_Pseudofermions`).

    References:
        arXiv:2106.05934, section II; Gattringer & Lang (2010), sections 8.1-8.2.
    """

    operator: Any

    def _solver_settings(self, cg_tol: float, cg_maxiter: int) -> None:
        """Set ``cg_tol``, ``cg_maxiter`` and ``last_report``; ConfigError for cg_tol <= 0 or cg_maxiter < 1."""
        self.cg_tol = float(cg_tol)
        self.cg_maxiter = int(cg_maxiter)
        if not self.cg_tol > 0 or self.cg_maxiter < 1:
            raise ConfigError(
                f"{type(self).__name__}: cg_tol must be > 0 and cg_maxiter >= 1; found {cg_tol}, {cg_maxiter}"
            )
        self.last_report: Any = None  # the CG report of the last solve (diagnostics)

    def _bosonic(self) -> Any:
        """The bosonic action (gauge or phi^4). Subclasses implement this."""
        raise NotImplementedError

    def check(self, x: torch.Tensor) -> tuple[int, ...]:
        """Validate the field (layout of :attr:`field`, accepted by the Dirac operator: for
        instance d = 2 or 4 for Wilson fermions, even extents for staggered ones); returns the lattice.

        Raises:
            ShapeError: naming the expected and the found layout.
        """
        lattice = self.space.lattice_of(x)
        self.operator.geometry(x)
        return lattice

    def _fermion_force(
        self, x: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None, g: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The force of -2 Re(left^+ D right) (or of -2 Re of the derivative ``g`` given) in the
        conventions of :mod:`flowplug.theory`: 2 Re g for real fields (U(1) angles, phi), minus
        the traceless anti-Hermitian projection of g for SU(N) links."""
        if g is None:
            assert left is not None and right is not None
            g = self.operator.derivative(x, left, right)
        if x.is_complex():
            # dS/ds = -2 Re tr(X M) = -2 tr(X Pi(M)) for X in su(N), and dS/ds = 2 Re tr(X F)
            return -groups.project_algebra(g)
        return 2.0 * g.real

    def fermion_action(self, x: torch.Tensor) -> torch.Tensor:
        """The fermionic part S_f of the action, shape (B,), float64. Subclasses implement this."""
        raise NotImplementedError

    def fermion_force(self, x: torch.Tensor) -> torch.Tensor:
        """The force of S_f, same shape and dtype as x. Subclasses implement this."""
        raise NotImplementedError

    def action(self, x: torch.Tensor) -> torch.Tensor:
        """The bosonic action (S_g or S_B) plus :meth:`fermion_action`, shape (B,), float64."""
        return self._bosonic().action(x).to(torch.float64) + self.fermion_action(x)

    def force(self, x: torch.Tensor) -> torch.Tensor:
        """The bosonic force plus :meth:`fermion_force`, same shape and dtype as x."""
        return self._bosonic().force(x) + self.fermion_force(x)


class _ExactDeterminant(_FermionAction):
    r"""S_f = -log det(D^+ D) = -2 log|det D| from the dense D (small lattices), force through D^{-1}.

    Subclasses name themselves and their pseudofermion counterpart in the error of a lattice
    too large (:attr:`_too_large`).
    """

    #: (who, what to use instead) in the error of a lattice with n > MAX_DENSE.
    _too_large = ("exact determinant", "the pseudofermion action (schwinger / wilson-nf2)")

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        n = self.operator.size(x)
        if n > MAX_DENSE:
            who, instead = self._too_large
            raise ShapeError(
                f"{who}: D has n = {n} rows per configuration, more than MAX_DENSE = {MAX_DENSE}; "
                f"use {instead} on lattices this large"
            )
        try:
            return self.operator.dense(x, by="blocks")
        except TypeError:  # an operator without block assembly
            return self.operator.dense(x)

    def fermion_action(self, x: torch.Tensor) -> torch.Tensor:
        """-log det(D^+ D) = -2 log|det D|, shape (B,), float64."""
        self.check(x)
        _, logabs = torch.linalg.slogdet(self._dense(x))
        return -2.0 * logabs.to(torch.float64)

    def fermion_force(self, x: torch.Tensor) -> torch.Tensor:
        r"""Force of -log det(D^+ D): with S_f = -2 Re log det D, dS_f = -2 Re tr(D^{-1} dD).

        With the dense inverse: the operator's ``trace_derivative(x, D^{-1})`` where it has one
        (Wilson, staggered: reads the neighbour blocks of D^{-1}; on a scalar field
        2 g Re (D^{-1})_{xx}), else the sum over the n unit vectors e_k of ``derivative`` with
        left = D^{-+} e_k, right = e_k (memory B n^2 x a few).

        Returns:
            Same shape and dtype as x.
        """
        self.check(x)
        dense = self._dense(x)
        inv = torch.linalg.inv(dense)  # (B, n, n)
        trace_derivative = getattr(self.operator, "trace_derivative", None)
        if trace_derivative is not None:  # the operator reads the blocks it couples (fast)
            return self._fermion_force(x, None, None, trace_derivative(x, inv))
        shape = self.operator.spinor_shape(x)
        bsz, n = shape[0], inv.shape[-1]
        left = inv.conj().reshape(bsz, n, *shape[1:])  # row k of D^{-1}, conjugated: D^{-+} e_k
        right = torch.eye(n, dtype=inv.dtype, device=inv.device).reshape(n, *shape[1:]).expand(bsz, n, *shape[1:])
        return self._fermion_force(x, left, right)


class _Pseudofermions(_FermionAction):
    r"""One pseudofermion field phi on the full lattice: S_f = phi^+ (D^+ D)^{-1} phi.

    The exact heat bath phi = D^+ chi (:meth:`_heat_bath`), the check of the field drawn last
    (:meth:`_checked`), the action with the shortcut at the configuration of the last draw
    (:meth:`_plain_fermion_action`) and the force (:meth:`_plain_force`). Subclasses name
    themselves in the error messages (:attr:`_messages`).

    Every solve's CG iterations are also summed per chain (batch element) until
    :meth:`take_cg_iterations` returns them: ``flowplug hmc`` records them per trajectory
    (:class:`flowplug.jobs.hmc.CGCounting`, ``summary.json`` ``cg``).
    """

    #: CG iterations per chain summed since the last :meth:`take_cg_iterations`, (B,) int64, or None.
    _cg_chain_iterations: torch.Tensor | None = None

    def _tally(self, report: Any) -> None:
        """Add a solve's iterations per chain (``report.iterations``, (B,) int64) to the tally
        (restarted when the batch changes)."""
        its = report.iterations.detach().to("cpu", torch.int64).reshape(-1)
        have = self._cg_chain_iterations
        self._cg_chain_iterations = its.clone() if have is None or have.shape != its.shape else have + its

    def take_cg_iterations(self) -> torch.Tensor | None:
        """The CG iterations of each chain summed over the solves since the last call (heat
        bath, forces, actions; every pseudofermion term), (B,) int64 on the CPU, and restart
        the tally; ``None`` if there was no solve.

        Between two calls the solves must be of one batch (one stream of chains): a solve of
        another batch size restarts the tally.
        """
        out, self._cg_chain_iterations = self._cg_chain_iterations, None
        return out

    #: (who, the exact action to use instead, the field's name, "need"/"needs", "these links"/"this phi").
    _messages = (
        "pseudofermion action",
        "the exact-determinant action (schwinger-exact / wilson-nf2-exact)",
        "the links",
        "need",
        "these links",
    )
    #: (configuration, its tensor version, chi^+ chi) of the last draw, or None.
    _fresh: tuple[torch.Tensor, int, torch.Tensor] | None = None

    def _heat_bath(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """phi = D^+ chi, chi complex Gaussian (density exp(-chi^+ chi)), remembering chi^+ chi."""
        shape = self.operator.spinor_shape(x)
        chi = torch.randn(shape, generator=generator, dtype=torch.complex128, device=x.device)
        phi = self.operator.apply_dagger(x, chi)
        # phi^+ (D^+ D)^{-1} phi = chi^+ chi exactly at this x: no solve for the S that the
        # trajectory starts from
        self._fresh = (x, x._version, _chi_norm(chi))
        return phi

    def _is_fresh(self, x: torch.Tensor) -> bool:
        return self._fresh is not None and self._fresh[0] is x and self._fresh[1] == x._version

    def _no_field(self) -> ConfigError:
        who, exact = self._messages[:2]
        return ConfigError(
            f"{who}: no pseudofermion field drawn yet; call refresh(x, generator) first "
            f"(the hmc kernel does at every trajectory), or use {exact} with kernels that do not refresh "
            "auxiliary fields"
        )

    def _wrong_shape(self, x: torch.Tensor, shape: tuple[int, ...], found: torch.Tensor, noun: str) -> ShapeError:
        who, _, name, verb, these = self._messages
        return ShapeError(
            f"{who}: {name} {tuple(x.shape)} {verb} {noun} of shape {shape}; the one drawn last has shape "
            f"{tuple(found.shape)} (call refresh for {these})"
        )

    def _checked(self, x: torch.Tensor, phi: torch.Tensor | None) -> torch.Tensor:
        """phi, after checking x and that phi fits it (ConfigError if None, ShapeError on a mismatch)."""
        self.check(x)
        if phi is None:
            raise self._no_field()
        shape = tuple(self.operator.spinor_shape(x))
        if tuple(phi.shape) != shape:
            raise self._wrong_shape(x, shape, phi, "a pseudofermion field")
        return phi

    def _record(self, report: Any) -> None:
        """Keep the CG report of a solve and tally its iterations per chain."""
        self.last_report = report
        self._tally(report)

    def _solve(self, x: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        sol, report = self.operator.solve_normal(x, phi, tol=self.cg_tol, maxiter=self.cg_maxiter)
        self._record(report)
        return sol

    def _plain_fermion_action(self, x: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """phi^+ (D^+ D)^{-1} phi, (B,) float64; chi^+ chi without a solve at the x of the last draw."""
        if self._is_fresh(x):
            assert self._fresh is not None
            return self._fresh[2]
        sol = self._solve(x, phi)
        return (phi.conj() * sol).flatten(1).sum(1).real.to(torch.float64)

    def _plain_force(self, x: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """Force of phi^+ (D^+ D)^{-1} phi: X = (D^+ D)^{-1} phi, Y = D X, dS = -2 Re(Y^+ dD X)."""
        sol = self._solve(x, phi)
        return self._fermion_force(x, self.operator.apply(x, sol), sol)


class _TwoFlavourAction(_FermionAction):
    """Common part of the two-flavour Wilson-fermion actions: gauge action, Dirac operator, couplings."""

    parameters: tuple[str, ...] = ("beta", "kappa", "group", "dirac", "cg_tol", "cg_maxiter")
    observables = FERMION_OBSERVABLES

    def __init__(
        self,
        beta: float = 2.0,
        kappa: float = 0.2,
        group: str = "u1",
        *,
        dirac: str = "wilson",
        cg_tol: float = 1e-12,
        cg_maxiter: int = 2000,
    ) -> None:
        self.beta = float(beta)
        self.kappa = float(kappa)
        self.gauge = _gauge(self.beta, group)
        self.group = self.gauge.group
        self.field = self.gauge.field
        self.dirac = str(dirac).strip().lower()
        self.operator = _dirac(self.dirac, self.kappa)
        self._solver_settings(cg_tol, cg_maxiter)

    def _bosonic(self) -> Any:
        """The gauge action S_g."""
        return self.gauge


class ExactFermionAction(_ExactDeterminant, _TwoFlavourAction):
    r"""Gauge action plus two Wilson flavours with the exact determinant: S = S_g - 2 log|det D|.

    For small lattices (the dense D has n = V s N <= :data:`MAX_DENSE` rows).

    Arguments:
        beta: Gauge coupling of the ``wilson`` gauge action.
        kappa: Hopping parameter of the Dirac operator.
        group: ``u1`` (the Schwinger model in 2D) or ``su<N>``.
        dirac: Registered Dirac operator (default ``wilson``).
        cg_tol, cg_maxiter: Unused here (kept so both actions take the same couplings).

    Fields: ``u1`` angles (B, d, L...) float64 or ``su<N>`` links (B, d, L..., N, N) complex128,
    d = 2 or 4.

    Raises:
        ConfigError: for bad couplings or an unknown group; ShapeError (from ``action``/
            ``force``) for links of another layout or a lattice too large for dense matrices.

    References:
        arXiv:2106.05934, section II; Gattringer & Lang (2010), section 8.1 (determinant).
    """


class _FermionMatrix:
    """The matrix a pseudofermion term is built on: D on the full lattice, or the even-odd
    preconditioned D_hat on the even sites (``even_odd``), with the methods the terms need."""

    METHODS = (
        "even_shape",
        "apply_even_odd",
        "apply_even_odd_dagger",
        "solve_even_odd_normal",
        "derivative_even_odd",
    )

    def __init__(self, operator: Any, even_odd: bool, dirac: str) -> None:
        if even_odd:
            missing = [m for m in self.METHODS if getattr(operator, m, None) is None]
            if missing:
                raise ConfigError(
                    f"pseudofermion action: even_odd = true needs the even-odd preconditioned form of the Dirac "
                    f"operator '{dirac}', which has no {', '.join(missing)}; use even_odd = false with it"
                )
        self.operator = operator
        self.even_odd = bool(even_odd)
        self.kappa = float(operator.kappa)

    def shape(self, x: torch.Tensor) -> tuple[int, ...]:
        return tuple(self.operator.even_shape(x) if self.even_odd else self.operator.spinor_shape(x))

    def apply(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.operator.apply_even_odd(x, v) if self.even_odd else self.operator.apply(x, v)

    def apply_dagger(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.operator.apply_even_odd_dagger(x, v) if self.even_odd else self.operator.apply_dagger(x, v)

    def solve_normal(self, x: torch.Tensor, b: torch.Tensor, tol: float, maxiter: int) -> tuple[torch.Tensor, Any]:
        solve = self.operator.solve_even_odd_normal if self.even_odd else self.operator.solve_normal
        return solve(x, b, tol=tol, maxiter=maxiter)

    def derivative(self, x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        if self.even_odd:
            return self.operator.derivative_even_odd(x, left, right)
        return self.operator.derivative(x, left, right)

    def derivative_ratio(self, other: _FermionMatrix) -> float | None:
        """c with d(l^+ other r) = c d(l^+ self r) for all l, r, or None if not known.

        Two Wilson operators on the same boundary conditions differ only in kappa, and
        dD = -kappa dH: c = kappa_other / kappa (D_hat = 1 - kappa^2 H_eo H_oe: its square)."""
        from flowplug.plugins.dirac import WilsonDiracOperator

        a, b = self.operator, other.operator
        if type(a) is not WilsonDiracOperator or type(b) is not WilsonDiracOperator or self.kappa == 0:
            return None
        if a.antiperiodic != b.antiperiodic or self.even_odd != other.even_odd:
            return None
        c = other.kappa / self.kappa
        return c * c if self.even_odd else c


class _Term:
    """One pseudofermion term phi^+ B (A^+ A)^{-1} B^+ phi (B = 1 when ``denominator`` is None)."""

    def __init__(self, numerator: _FermionMatrix, denominator: _FermionMatrix | None) -> None:
        self.numerator = numerator
        self.denominator = denominator
        k = f"{numerator.kappa:g}"
        self.label = f"kappa={k}" if denominator is None else f"kappa={k}/{denominator.kappa:g}"


def _even_odd_flag(value: Any) -> bool:
    """``even_odd`` as a bool; ConfigError for anything but a bool (or 0/1)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ConfigError(f"pseudofermion action: even_odd must be true or false; found {value!r}")


def _hasenbusch_kappas(value: Any, kappa: float) -> tuple[float, ...]:
    """The Hasenbusch hopping parameters 0 < kappa_1 < ... < kappa_k < kappa (None: none)."""
    if value is None:
        return ()
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    out = []
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise ConfigError(
                f"pseudofermion action: hasenbusch_kappa must be a number or a list of numbers "
                f"(heavier masses: 0 < kappa_h < kappa = {kappa}); found {value!r}"
            )
        out.append(float(v))
    chain = [*out, kappa]
    if not out or out[0] <= 0 or any(a >= b for a, b in zip(chain, chain[1:], strict=False)):
        raise ConfigError(
            f"pseudofermion action: hasenbusch_kappa must be increasing and between 0 and the action's "
            f"kappa (0 < kappa_1 < ... < kappa_k < kappa = {kappa}: the Hasenbusch operators are heavier); "
            f"found {value!r}"
        )
    return tuple(out)


class PseudofermionAction(_Pseudofermions, _TwoFlavourAction):
    r"""Gauge action plus two Wilson flavours through pseudofermions: S = S_g + phi^+ (D^+ D)^{-1} phi.

    An action of the joint distribution of the links and the pseudofermion fields
    (module docstring). :meth:`refresh` draws the fields; the HMC kernel calls it at the start
    of every trajectory. ``action`` and ``force`` use the fields drawn last and solve the
    normal equations by the conjugate gradient with ``cg_tol``/``cg_maxiter``.

    **Even-odd preconditioning** (``even_odd = true``): det D = det D_hat with
    D_hat = 1 - kappa^2 H_eo H_oe on the even sites, so S_f = phi_e^+ (D_hat^+ D_hat)^{-1} phi_e
    with phi_e (B, V/2, s[, N]) on the even sites; heat bath phi_e = D_hat^+ chi_e; force
    -2 Re(Y^+ dD_hat X), X = (D_hat^+ D_hat)^{-1} phi_e, Y = D_hat X. Every extent must be even.

    **Hasenbusch mass preconditioning** (``hasenbusch_kappa`` = kappa_1 or [kappa_1, ..., kappa_k],
    0 < kappa_1 < ... < kappa_k < kappa): with W_j = D at kappa_j and W_{k+1} = D,
    det(D^+ D) = det(W_1^+ W_1) prod_j det(W_j^{-+} W_{j+1}^+ W_{j+1} W_j^{-1}), one field per factor:

        S_f = phi_1^+ (W_1^+ W_1)^{-1} phi_1 + sum_j phi_{j+1}^+ W_j (W_{j+1}^+ W_{j+1})^{-1} W_j^+ phi_{j+1}.

    A term phi^+ B (A^+ A)^{-1} B^+ phi (A = W_{j+1}, B = W_j; B = 1 for the first) has
    covariance K = B^{-+} A^+ A B^{-1}; its heat bath (exact up to the CG tolerance of the solve)
    is phi = B^{-+} A^+ chi
    = B (B^+ B)^{-1} A^+ chi (one CG solve with the heavier B^+ B), since then
    phi^+ K^{-1} phi = chi^+ A (A^+ A)^{-1} A^+ chi = chi^+ chi. With X = (A^+ A)^{-1} B^+ phi
    and Y = A X its derivative is

        dS = 2 Re(phi^+ dB X) - 2 Re(Y^+ dA X),

    (from d(B^+ phi) = dB^+ phi and d(A^+ A)^{-1} = -(A^+ A)^{-1} d(A^+ A) (A^+ A)^{-1}), evaluated
    with the operators' ``derivative``. Both options combine (all operators even-odd
    preconditioned: det D_hat = det D for every kappa, so the ratios are unchanged). The
    product of the factors is det(D^+ D) for every U, so the distribution of U is that of
    the plain action; only the cost changes.

    With both options off (the default) the action, its random draws and its arithmetic are
    those of the plain action, bit for bit.

    Arguments:
        beta, kappa, group, dirac: As for :class:`ExactFermionAction`.
        cg_tol: Relative CG tolerance (default 1e-12, so that the float64 accept/reject and
            the reversibility of trajectories are not limited by the solver).
        cg_maxiter: CG iteration limit.
        even_odd: Even-odd preconditioning (bool, default False).
        hasenbusch_kappa: None (default: off), a hopping parameter kappa_1 < kappa, or an
            increasing list of them (a chain of Hasenbusch masses).

    Attributes:
        phi: The first pseudofermion field, (B, L..., s[, N]) (or (B, V/2, s[, N]) with
            ``even_odd``) complex128, or None before :meth:`refresh`.
        phis: All fields, one per term (a tuple), or None.
        terms: The terms (``label`` ``kappa=k`` for phi^+ (W^+ W)^{-1} phi, ``kappa=k/k_h``
            for a ratio).
        last_report: The :class:`flowplug.plugins.dirac.CGReport` of the last solve.
        cg_counts: Per term label, [batch-element solves, CG iterations] summed since the
            action was built (or :meth:`reset_cg_counts`): iterations per solve = ratio.

    Raises:
        ConfigError: for bad couplings or options (even_odd not a bool; hasenbusch_kappa not
            increasing in (0, kappa); even_odd with an operator that has no even-odd form);
            from ``action``/``force``: ConfigError before any :meth:`refresh`, ShapeError if
            the batch differs from phi's or (even_odd) an extent is odd, ConvergenceError if
            the CG does not converge.

    References:
        arXiv:2106.05934, section II (pseudofermions); Gattringer & Lang (2010), sections
        8.1-8.2 (heat bath phi = D^+ chi, force through the solver); M. Hasenbusch, Phys.
        Lett. B 519 (2001) 177, hep-lat/0107019 (mass preconditioning); T. DeGrand and P.
        Rossi, Comput. Phys. Commun. 60 (1990) 211 (even-odd preconditioning); R. Abbott et
        al., arXiv:2207.08945, section 2 (both, for flows).
    """

    parameters = _TwoFlavourAction.parameters + ("even_odd", "hasenbusch_kappa")

    def __init__(
        self,
        beta: float = 2.0,
        kappa: float = 0.2,
        group: str = "u1",
        *,
        dirac: str = "wilson",
        cg_tol: float = 1e-12,
        cg_maxiter: int = 2000,
        even_odd: bool = False,
        hasenbusch_kappa: float | list[float] | None = None,
    ) -> None:
        super().__init__(beta, kappa, group, dirac=dirac, cg_tol=cg_tol, cg_maxiter=cg_maxiter)
        self.even_odd = _even_odd_flag(even_odd)
        kappas = _hasenbusch_kappas(hasenbusch_kappa, self.kappa)
        self.hasenbusch_kappa: float | list[float] | None = (
            None if not kappas else (list(kappas) if isinstance(hasenbusch_kappa, (list, tuple)) else kappas[0])
        )
        matrices = [_FermionMatrix(_dirac(self.dirac, k), self.even_odd, self.dirac) for k in kappas]
        matrices.append(_FermionMatrix(self.operator, self.even_odd, self.dirac))
        self.terms = [_Term(a, b) for a, b in zip(matrices, [None, *matrices[:-1]], strict=True)]
        self._plain = not self.even_odd and not kappas  # the unpreconditioned action, as before the options
        self.phi: torch.Tensor | None = None
        self.phis: tuple[torch.Tensor, ...] | None = None
        self._fresh: tuple[torch.Tensor, int, torch.Tensor] | None = None  # (links, their version, sum chi^+ chi)
        self.cg_counts: dict[str, list[int]] = {}

    def couplings(self) -> dict[str, Any]:
        """The couplings; ``even_odd`` and ``hasenbusch_kappa`` only when set (so that the
        records of plain runs are unchanged)."""
        out = super().couplings()
        if not self.even_odd:
            out.pop("even_odd")
        if self.hasenbusch_kappa is None:
            out.pop("hasenbusch_kappa")
        return out

    def reset_cg_counts(self) -> None:
        """Forget :attr:`cg_counts`."""
        self.cg_counts = {}

    def _count(self, label: str, report: Any) -> None:
        self.last_report = report
        self._tally(report)
        entry = self.cg_counts.setdefault(label, [0, 0])
        entry[0] += int(report.iterations.numel())
        entry[1] += int(report.iterations.sum())

    def refresh(self, x: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Draw the fields from their exact conditional distribution at the links x.

        Plain action: phi = D^+ chi, chi complex Gaussian with density exp(-|chi|^2) (real and
        imaginary parts N(0, 1/2)): exactly distributed as exp(-phi^+ (D^+ D)^{-1} phi). With
        the options, one chi per term (in the order of :attr:`terms`) and phi = B^{-+} A^+ chi
        (class docstring; D -> D_hat with ``even_odd``). The ratio terms' B^{-+} is one CG
        solve with B^+ B to ``cg_tol``.

        Arguments:
            x: Links (B, ...), canonical layout.
            generator: Random generator (on x's device); None uses torch's global one.

        Raises:
            ShapeError: for links of another layout (or odd extents with ``even_odd``).
            ConvergenceError: if a heat-bath solve does not converge.
        """
        self.check(x)
        if self._plain:
            self.phi = self._heat_bath(x, generator)
            self.phis = (self.phi,)
            return
        phis = []
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for term in self.terms:
            chi = torch.randn(term.numerator.shape(x), generator=generator, dtype=torch.complex128, device=x.device)
            phi = term.numerator.apply_dagger(x, chi)
            if term.denominator is not None:  # B^{-+} A^+ chi = B (B^+ B)^{-1} A^+ chi
                sol, report = term.denominator.solve_normal(x, phi, self.cg_tol, self.cg_maxiter)
                self._count(f"heat bath {term.label}", report)
                phi = term.denominator.apply(x, sol)
            phis.append(phi)
            total = total + _chi_norm(chi)
        self.phis = tuple(phis)
        self.phi = phis[0]
        self._fresh = (x, x._version, total)  # sum of phi^+ K^{-1} phi = chi^+ chi over the terms

    def set_pseudofermions(self, phi: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...] | None) -> None:
        """Set the fields directly (tests, samplers that draw them themselves); None forgets them.

        Arguments:
            phi: One tensor (one term) or a sequence with one tensor per term (:attr:`terms`).

        Raises:
            ConfigError: if the number of fields is not the number of terms.
        """
        self._fresh = None
        if phi is None:
            self.phi, self.phis = None, None
            return
        fields = [phi] if isinstance(phi, torch.Tensor) else list(phi)
        if len(fields) != len(self.terms):
            raise ConfigError(
                f"pseudofermion action: {len(self.terms)} pseudofermion fields expected (terms "
                f"{[t.label for t in self.terms]}); found {len(fields)}"
            )
        self.phis = tuple(f.to(torch.complex128) for f in fields)
        self.phi = self.phis[0]

    def _phi(self, x: torch.Tensor) -> torch.Tensor:
        return self._checked(x, self.phi)

    def _phis(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.check(x)
        if self.phis is None:
            raise self._no_field()
        for term, phi in zip(self.terms, self.phis, strict=True):
            shape = term.numerator.shape(x)
            if tuple(phi.shape) != shape:
                raise self._wrong_shape(x, shape, phi, "pseudofermion fields")
        return self.phis

    def _record(self, report: Any) -> None:
        """Keep the CG report of a plain solve and count it under the (only) term's label."""
        self._count(self.terms[0].label, report)

    def _term_solve(self, x: torch.Tensor, term: _Term, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B^+ phi, X = (A^+ A)^{-1} B^+ phi) of one term."""
        b = phi if term.denominator is None else term.denominator.apply_dagger(x, phi)
        sol, report = term.numerator.solve_normal(x, b, self.cg_tol, self.cg_maxiter)
        self._count(term.label, report)
        return b, sol

    def fermion_action(self, x: torch.Tensor) -> torch.Tensor:
        """S_f = sum over the terms of phi^+ B (A^+ A)^{-1} B^+ phi (plain: phi^+ (D^+ D)^{-1} phi),
        shape (B,), float64 (>= 0); at the links of the last :meth:`refresh` (the same tensor
        object, not modified since) the exact value sum chi^+ chi, without a solve."""
        if self._plain:
            return self._plain_fermion_action(x, self._phi(x))
        phis = self._phis(x)
        if self._is_fresh(x):
            assert self._fresh is not None
            return self._fresh[2]
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for term, phi in zip(self.terms, phis, strict=True):
            b, sol = self._term_solve(x, term, phi)
            total = total + (b.conj() * sol).flatten(1).sum(1).real.to(torch.float64)
        return total

    def fermion_force(self, x: torch.Tensor) -> torch.Tensor:
        """Force of S_f. Plain: X = (D^+ D)^{-1} phi, Y = D X, dS = -2 Re(Y^+ dD X); per term
        with the options: X = (A^+ A)^{-1} B^+ phi, Y = A X, dS = -2 Re(Y^+ dA X - phi^+ dB X)
        (class docstring).

        Returns:
            Same shape and dtype as x.
        """
        if self._plain:
            return self._plain_force(x, self._phi(x))
        phis = self._phis(x)
        g: torch.Tensor | None = None
        for term, phi in zip(self.terms, phis, strict=True):
            _, sol = self._term_solve(x, term, phi)
            left = term.numerator.apply(x, sol)
            c = None if term.denominator is None else term.numerator.derivative_ratio(term.denominator)
            if c is not None:  # Wilson: dB = c dA, so one derivative of (A X - c phi)^+ dA X
                left = left - c * phi
            part = term.numerator.derivative(x, left, sol)
            if term.denominator is not None and c is None:
                part = part - term.denominator.derivative(x, phi, sol)
            g = part if g is None else g + part
        assert g is not None
        return self._fermion_force(x, None, None, g)


def _schwinger(cls: type[_TwoFlavourAction]) -> Any:
    def build(
        beta: float = 2.0, kappa: float = 0.2, *, dirac: str = "wilson", cg_tol: float = 1e-12, cg_maxiter: int = 2000
    ) -> _TwoFlavourAction:
        return cls(beta, kappa, "u1", dirac=dirac, cg_tol=cg_tol, cg_maxiter=cg_maxiter)

    build.__name__ = f"schwinger_{cls.__name__}"
    build.__doc__ = f"The Schwinger model: :class:`{cls.__name__}` with group ``u1``."
    return build


def schwinger_pseudofermions(
    beta: float = 2.0,
    kappa: float = 0.2,
    *,
    dirac: str = "wilson",
    cg_tol: float = 1e-12,
    cg_maxiter: int = 2000,
    even_odd: bool = False,
    hasenbusch_kappa: float | list[float] | None = None,
) -> PseudofermionAction:
    """The Schwinger model with pseudofermions (action ``schwinger``): :class:`PseudofermionAction`
    with group ``u1``, with its options ``even_odd`` and ``hasenbusch_kappa``.

    Raises:
        ConfigError: as :class:`PseudofermionAction`.
    """
    return PseudofermionAction(
        beta,
        kappa,
        "u1",
        dirac=dirac,
        cg_tol=cg_tol,
        cg_maxiter=cg_maxiter,
        even_odd=even_odd,
        hasenbusch_kappa=hasenbusch_kappa,
    )


# --------------------------------------------------------------------------- observables


def _operator(links: torch.Tensor, kappa: float | None, dirac: str, who: str) -> tuple[Any, float]:
    """(operator, kappa) for an observable; ConfigError without kappa."""
    if kappa is None:
        raise ConfigError(
            f"{who} needs the hopping parameter kappa: measure it in a run of a fermionic action "
            f"(whose kappa is passed on), or give it as an option ({who}: kappa = 0.2)"
        )
    op = _dirac(dirac, float(kappa))
    op.geometry(links)
    return op, float(kappa)


def _re_trace_inverse(
    op: Any,
    x: torch.Tensor,
    method: str,
    *,
    noise: int,
    seed: int,
    cg_tol: float,
    cg_maxiter: int,
    who: str,
    dense: Any = None,
) -> tuple[torch.Tensor, int]:
    r"""Re tr D^{-1} per configuration, exactly (dense inverse) or by a stochastic estimate.

    The condensates of the Wilson (:func:`chiral_condensate`) and the staggered operators
    (:func:`flowplug.plugins.yukawa.staggered_condensate`) are this trace over the volume.

    Arguments:
        op: The Dirac operator (its ``spinor_shape``, ``geometry``, ``dense``, ``solve``).
        x: Its background (links or scalar field).
        method: ``"exact"``, ``"stochastic"`` (``noise`` Z2 vectors eta drawn from ``seed``,
            tr D^{-1} ~ mean eta^+ D^{-1} eta, CG solves: unbiased) or ``"auto"`` (exact when
            n <= :data:`MAX_DENSE_OBSERVABLE`).
        noise, seed, cg_tol, cg_maxiter: Of the stochastic estimate.
        who: The observable, first word of the error message.
        dense: x -> the dense D, (B, n, n) (default ``op.dense``).

    Returns:
        ``(trace, volume)``: (B,) float64 and the number of sites V.

    Raises:
        ConfigError: for an unknown method; ConvergenceError if the CG fails.

    References:
        Hutchinson, Commun. Stat. Simul. Comput. 19 (1990) 433 (stochastic trace).
    """
    shape = op.spinor_shape(x)
    n = math.prod(shape[1:])
    volume = math.prod(op.geometry(x)[0])
    if method == "auto":
        method = "exact" if n <= MAX_DENSE_OBSERVABLE else "stochastic"
    if method == "exact":
        matrix = op.dense(x) if dense is None else dense(x)
        tr = torch.linalg.inv(matrix).diagonal(dim1=-2, dim2=-1).sum(-1).real
    elif method == "stochastic":
        g = torch.Generator(device=x.device).manual_seed(int(seed))
        eta = torch.randint(0, 2, (shape[0], int(noise), *shape[1:]), generator=g, device=x.device)
        eta = (2.0 * eta - 1.0).to(torch.complex128)
        sol, _ = op.solve(x, eta, tol=cg_tol, maxiter=cg_maxiter)
        tr = (eta.conj() * sol).flatten(2).sum(2).real.mean(1)
    else:
        raise ConfigError(f"{who}: method must be 'auto', 'exact' or 'stochastic'; found {method!r}")
    return tr, volume


def chiral_condensate(
    links: torch.Tensor,
    kappa: float | None = None,
    *,
    dirac: str = "wilson",
    method: str = "auto",
    noise: int = 16,
    seed: int = 0,
    cg_tol: float = 1e-10,
    cg_maxiter: int = 2000,
) -> torch.Tensor:
    r"""Chiral condensate per flavour, Sigma = (1/V) Re tr D_m^{-1} = (2 kappa / V) Re tr D^{-1}.

    D_m = D / (2 kappa) is the mass-normalised Wilson operator (m + d - H/2); in the
    Grassmann sign convention <psibar psi> = -Sigma per flavour. Unrenormalised, with the
    additive contribution of the Wilson term (lattice units).

    Arguments:
        links: U(1) angles (B, d, L...) float64 or SU(N) links (B, d, L..., N, N) complex128.
        kappa: Hopping parameter (passed on from the action's couplings by ``flowplug hmc``).
        dirac: Registered Dirac operator.
        method: ``"exact"`` (dense inverse), ``"stochastic"`` (``noise`` Z2 vectors, CG
            solves: unbiased; the vectors are drawn from ``seed``, the same for every call),
            ``"auto"``: exact when n = V s N <= :data:`MAX_DENSE_OBSERVABLE`.
        noise: Number of noise vectors of the stochastic estimate.
        seed: Seed of the noise vectors.
        cg_tol, cg_maxiter: Solver settings of the stochastic estimate.

    Returns:
        (B,) float64.

    Raises:
        ConfigError: without kappa, or for an unknown method.
        ShapeError: for links of another layout; ConvergenceError if the CG fails.

    References:
        Gattringer & Lang (2010), chapter 7 (chiral condensate); Hutchinson, Commun. Stat.
        Simul. Comput. 19 (1990) 433 (stochastic trace).
    """
    op, k = _operator(links, kappa, dirac, "chiral_condensate")
    tr, volume = _re_trace_inverse(
        op, links, method, noise=noise, seed=seed, cg_tol=cg_tol, cg_maxiter=cg_maxiter, who="chiral_condensate"
    )
    return (2.0 * k * tr / volume).to(torch.float64)


def pion_correlators(
    links: torch.Tensor,
    kappa: float | None = None,
    *,
    dirac: str = "wilson",
    method: str = "auto",
    cg_tol: float = 1e-10,
    cg_maxiter: int = 2000,
) -> torch.Tensor:
    r"""Pion correlator C(t) for every time separation t of each configuration.

    C(t) = (1/V) sum_{x, y: x_{d-1} - y_{d-1} = t mod T} tr[S(x, y) S(x, y)^+],
    S = D_m^{-1} = 2 kappa D^{-1}, using gamma_5 S(y, x) gamma_5 = S(x, y)^+ (gamma_5-
    hermiticity): the pion two-point function with pseudoscalar densities psibar gamma_5 psi,
    positive on every configuration, summed over space, averaged over all source points
    (``exact``: dense inverse) or taken from the source at the origin (``point``: s N CG
    solves). ``auto``: exact when n <= :data:`MAX_DENSE_OBSERVABLE`.

    Arguments:
        links: As for :func:`chiral_condensate`.
        kappa, dirac, cg_tol, cg_maxiter: As for :func:`chiral_condensate`.
        method: ``"auto"``, ``"exact"`` or ``"point"``.

    Returns:
        (B, T) float64, T = L_{d-1}; C(t) = C(T - t) up to noise.

    Raises:
        ConfigError: without kappa or for an unknown method; ShapeError for links of another layout.

    References:
        Gattringer & Lang (2010), chapter 6 (meson correlators, gamma_5-hermiticity trick).
    """
    op, k = _operator(links, kappa, dirac, "pion_correlator")
    lattice, ncol = op.geometry(links)
    shape = op.spinor_shape(links)
    bsz, n, volume, tsize = shape[0], math.prod(shape[1:]), math.prod(lattice), lattice[-1]
    internal = n // volume
    if method == "auto":
        method = "exact" if n <= MAX_DENSE_OBSERVABLE else "point"
    scale = (2.0 * k) ** 2
    if method == "exact":
        inv = torch.linalg.inv(op.dense(links)).reshape(bsz, volume, internal, volume, internal)
        w = (inv.real**2 + inv.imag**2).sum((2, 4))  # (B, V, V)
        t = torch.arange(volume, device=links.device) % tsize  # time coordinate: last axis fastest
        dt = (t[:, None] - t[None, :]) % tsize
        out = torch.zeros(bsz, tsize, dtype=torch.float64, device=links.device)
        out.index_add_(1, dt.flatten(), w.flatten(1))
        return scale * out / volume
    if method == "point":
        src = torch.zeros(bsz, internal, n, dtype=torch.complex128, device=links.device)
        src[:, torch.arange(internal), torch.arange(internal)] = 1.0  # the source at the origin
        sol, _ = op.solve(links, src.reshape(bsz, internal, *shape[1:]), tol=cg_tol, maxiter=cg_maxiter)
        dens = (sol.real**2 + sol.imag**2).reshape(bsz, internal, volume, internal).sum((1, 3))
        return scale * dens.reshape(bsz, -1, tsize).sum(1)
    raise ConfigError(f"pion_correlator: method must be 'auto', 'exact' or 'point'; found {method!r}")


def pion_correlator(
    links: torch.Tensor,
    kappa: float | None = None,
    *,
    t: int = 1,
    dirac: str = "wilson",
    method: str = "auto",
    cg_tol: float = 1e-10,
    cg_maxiter: int = 2000,
) -> torch.Tensor:
    """C(t) of :func:`pion_correlators` at one time separation ``t``, (B,) float64.

    Arguments:
        links, kappa, dirac, method, cg_tol, cg_maxiter: As for :func:`pion_correlators`.
        t: Time separation, 0 <= t < T.

    Raises:
        ConfigError: for t outside 0 .. T-1, and as :func:`pion_correlators`.
    """
    corr = pion_correlators(links, kappa, dirac=dirac, method=method, cg_tol=cg_tol, cg_maxiter=cg_maxiter)
    tsize = corr.shape[1]
    if not 0 <= int(t) < tsize:
        raise ConfigError(f"pion_correlator: t must be in 0..{tsize - 1} (T = {tsize}); found {t}")
    return corr[:, int(t)]


def cosh_effective_mass(ratio: torch.Tensor, t: int, tsize: int) -> torch.Tensor:
    r"""Solve C(t)/C(t+1) = cosh(m (T/2 - t)) / cosh(m (T/2 - t - 1)) for m >= 0.

    The effective mass of a correlator that is symmetric about T/2 (a meson on a lattice
    periodic in time), by bisection (the right side grows monotonically from 1, and is
    >= e^m / 2, so m lies in [0, log(2 r)]).

    Arguments:
        ratio: r = C(t)/C(t+1), any shape, float64.
        t: Time separation, 0 <= t and t + 1 <= T/2.
        tsize: T.

    Returns:
        m, same shape; NaN where r <= 1 (no decay).

    Raises:
        ConfigError: if t + 1 > T/2 or t < 0.
    """
    a = tsize / 2 - t
    if t < 0 or a < 1:
        raise ConfigError(f"cosh effective mass needs 0 <= t and t + 1 <= T/2 (T = {tsize}); found t = {t}")
    r = ratio.to(torch.float64)
    ok = r > 1
    lo = torch.zeros_like(r)
    hi = torch.where(ok, torch.log(2 * r.clamp(min=1.0)), torch.ones_like(r))
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        f = torch.cosh(mid * a) / torch.cosh(mid * (a - 1))
        below = f < r
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return torch.where(ok, 0.5 * (lo + hi), torch.full_like(r, torch.nan))


def pion_effective_mass(
    links: torch.Tensor,
    kappa: float | None = None,
    *,
    t: int = 1,
    kind: str = "cosh",
    dirac: str = "wilson",
    method: str = "auto",
    cg_tol: float = 1e-10,
    cg_maxiter: int = 2000,
) -> torch.Tensor:
    r"""Pion effective mass of each configuration's source-averaged correlator, (B,) float64.

    ``cosh``: :func:`cosh_effective_mass` of C(t)/C(t+1); ``log``: log(C(t)/C(t+1)).
    The mean over an ensemble of this per-configuration estimate differs from the
    effective mass of the ensemble-averaged correlator by terms of the order of the
    relative variance of C (small with the all-to-all average of ``exact``); for the
    latter, measure ``pion_correlator`` at t and t + 1 and form the ratio of means.

    Arguments:
        links, kappa: As for :func:`pion_correlators`.
        t: Time separation (0 <= t, t + 1 <= T/2 for ``cosh``).
        kind: ``"cosh"`` or ``"log"``.
        dirac, method, cg_tol, cg_maxiter: As for :func:`pion_correlators`.

    Raises:
        ConfigError: for a bad t or kind, and as :func:`pion_correlators`.

    References:
        Gattringer & Lang (2010), chapter 6 (effective mass).
    """
    corr = pion_correlators(links, kappa, dirac=dirac, method=method, cg_tol=cg_tol, cg_maxiter=cg_maxiter)
    tsize = corr.shape[1]
    if not 0 <= int(t) < tsize - 1:
        raise ConfigError(f"pion_effective_mass: t must be in 0..{tsize - 2} (T = {tsize}); found {t}")
    ratio = corr[:, int(t)] / corr[:, int(t) + 1]
    if kind == "cosh":
        return cosh_effective_mass(ratio, int(t), tsize)
    if kind == "log":
        return torch.log(ratio)
    raise ConfigError(f"pion_effective_mass: kind must be 'cosh' or 'log'; found {kind!r}")


# ------------------------------------------------------------------------------ hooks

_FERMION_GROUPS = ("u1", "su2", "su3")


@hookimpl
def flowplug_actions() -> list[ActionSpec]:
    """Two-flavour Wilson-fermion actions: exact determinant and pseudofermions."""
    schwinger_params = ("beta", "kappa", "dirac", "cg_tol", "cg_maxiter")
    preconditioning = ("even_odd", "hasenbusch_kappa")
    return [
        ActionSpec(
            name="schwinger",
            description="Schwinger model: U(1) Wilson gauge + 2 Wilson flavours, pseudofermions (HMC refreshes phi)",
            factory=schwinger_pseudofermions,
            fields=("u1",),
            parameters=schwinger_params + preconditioning,
        ),
        ActionSpec(
            name="schwinger-exact",
            description="Schwinger model with the exact determinant det(D^+ D) (small lattices)",
            factory=_schwinger(ExactFermionAction),
            fields=("u1",),
            parameters=schwinger_params,
        ),
        ActionSpec(
            name="wilson-nf2",
            description="Wilson gauge (U(1)/SU(N)) + 2 Wilson flavours, pseudofermions",
            factory=PseudofermionAction,
            fields=_FERMION_GROUPS,
            parameters=PseudofermionAction.parameters,
        ),
        ActionSpec(
            name="wilson-nf2-exact",
            description="Wilson gauge (U(1)/SU(N)) + 2 Wilson flavours, exact determinant (small lattices)",
            factory=ExactFermionAction,
            fields=_FERMION_GROUPS,
            parameters=_TwoFlavourAction.parameters,
        ),
    ]


@hookimpl
def flowplug_observables() -> list[ObservableSpec]:
    """Fermionic observables: chiral condensate, pion correlator and effective mass."""
    return [
        ObservableSpec(
            name="chiral_condensate",
            description="(1/V) Re tr D_m^-1 per flavour (needs kappa; exact or stochastic)",
            factory=chiral_condensate,
            fields=_FERMION_GROUPS,
        ),
        ObservableSpec(
            name="pion_correlator",
            description="pion correlator C(t), all-to-all or point source (needs kappa; option t)",
            factory=pion_correlator,
            fields=_FERMION_GROUPS,
        ),
        ObservableSpec(
            name="pion_effective_mass",
            description="pion effective mass of a configuration's correlator at t (needs kappa)",
            factory=pion_effective_mass,
            fields=_FERMION_GROUPS,
        ),
    ]
