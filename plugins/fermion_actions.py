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
    Y = D X, dS/dtheta = dS_g/dtheta - 2 Re(Y^+ (dD/dtheta) X).

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
    J. S. Schwinger, Phys. Rev. 128 (1962) 2425 (the model); docs/fermions.md.
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


class _TwoFlavourAction(Action):
    """Common part of the two-flavour actions: gauge action, Dirac operator, checks, forces."""

    parameters = ("beta", "kappa", "group", "dirac", "cg_tol", "cg_maxiter")
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
        self.cg_tol = float(cg_tol)
        self.cg_maxiter = int(cg_maxiter)
        if not self.cg_tol > 0 or self.cg_maxiter < 1:
            raise ConfigError(
                f"{type(self).__name__}: cg_tol must be > 0 and cg_maxiter >= 1; found {cg_tol}, {cg_maxiter}"
            )
        self.last_report: Any = None  # the CG report of the last solve (diagnostics)

    def check(self, x: torch.Tensor) -> tuple[int, ...]:
        """Validate the links (layout of :attr:`field`, d supported by the operator); returns the lattice.

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
        conventions of :mod:`flowplug.theory`."""
        if g is None:
            assert left is not None and right is not None
            g = self.operator.derivative(x, left, right)
        if x.is_complex():
            # dS/ds = -2 Re tr(X M) = -2 tr(X Pi(M)) for X in su(N), and dS/ds = 2 Re tr(X F)
            return -groups.project_algebra(g)
        return 2.0 * g.real


class ExactFermionAction(_TwoFlavourAction):
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

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        n = self.operator.size(x)
        if n > MAX_DENSE:
            raise ShapeError(
                f"exact determinant: D has n = {n} rows per configuration, more than MAX_DENSE = {MAX_DENSE}; "
                "use the pseudofermion action (schwinger / wilson-nf2) on lattices this large"
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

    def action(self, x: torch.Tensor) -> torch.Tensor:
        """S_g - log det(D^+ D), shape (B,), float64."""
        return self.gauge.action(x).to(torch.float64) + self.fermion_action(x)

    def fermion_force(self, x: torch.Tensor) -> torch.Tensor:
        r"""Force of -log det(D^+ D): with S_f = -2 Re log det D, dS_f = -2 Re tr(D^{-1} dD).

        With the dense inverse: the operator's ``trace_derivative(links, D^{-1})`` where it
        has one (Wilson: reads the neighbour blocks of D^{-1}), else the sum over the n unit
        vectors e_k of ``derivative`` with left = D^{-+} e_k, right = e_k (memory B n^2 x a few).

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

    def force(self, x: torch.Tensor) -> torch.Tensor:
        """Gauge force plus :meth:`fermion_force`, same shape and dtype as x."""
        return self.gauge.force(x) + self.fermion_force(x)


class PseudofermionAction(_TwoFlavourAction):
    r"""Gauge action plus two Wilson flavours through pseudofermions: S = S_g + phi^+ (D^+ D)^{-1} phi.

    An action of the joint distribution of the links and the pseudofermion field phi
    (module docstring). :meth:`refresh` draws phi; the HMC kernel calls it at the start of
    every trajectory. ``action`` and ``force`` use the phi drawn last and solve
    (D^+ D) X = phi by the conjugate gradient with ``cg_tol``/``cg_maxiter``.

    Arguments:
        beta, kappa, group, dirac: As for :class:`ExactFermionAction`.
        cg_tol: Relative CG tolerance (default 1e-12, so that the float64 accept/reject and
            the reversibility of trajectories are not limited by the solver).
        cg_maxiter: CG iteration limit.

    Attributes:
        phi: The pseudofermion field, (B, L..., s[, N]) complex128, or None before :meth:`refresh`.
        last_report: The :class:`flowplug.plugins.dirac.CGReport` of the last solve.

    Raises:
        ConfigError: for bad couplings; from ``action``/``force``: ConfigError before any
            :meth:`refresh`, ShapeError if the batch differs from phi's,
            ConvergenceError if the CG does not converge.

    References:
        arXiv:2106.05934, section II (pseudofermions); Gattringer & Lang (2010), sections
        8.1-8.2 (heat bath phi = D^+ chi, force through the solver).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.phi: torch.Tensor | None = None
        self._fresh: tuple[torch.Tensor, int, torch.Tensor] | None = None  # (links, their version, chi^+ chi)

    def refresh(self, x: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Draw phi = D^+ chi, chi complex Gaussian with density exp(-|chi|^2) (real and
        imaginary parts N(0, 1/2)): exactly distributed as exp(-phi^+ (D^+ D)^{-1} phi).

        Arguments:
            x: Links (B, ...), canonical layout.
            generator: Random generator (on x's device); None uses torch's global one.

        Raises:
            ShapeError: for links of another layout.
        """
        self.check(x)
        shape = self.operator.spinor_shape(x)
        chi = torch.randn(shape, generator=generator, dtype=torch.complex128, device=x.device)
        self.phi = self.operator.apply_dagger(x, chi)
        # phi^+ (D^+ D)^{-1} phi = chi^+ chi exactly at these links: no solve for the S that
        # the trajectory starts from
        self._fresh = (x, x._version, (chi.real**2 + chi.imag**2).flatten(1).sum(1).to(torch.float64))

    def set_pseudofermions(self, phi: torch.Tensor | None) -> None:
        """Set phi directly (tests, samplers that draw it themselves); None forgets it."""
        self.phi = None if phi is None else phi.to(torch.complex128)
        self._fresh = None

    def _phi(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        if self.phi is None:
            raise ConfigError(
                "pseudofermion action: no pseudofermion field drawn yet; call refresh(x, generator) first "
                "(the hmc kernel does at every trajectory), or use the exact-determinant action "
                "(schwinger-exact / wilson-nf2-exact) with kernels that do not refresh auxiliary fields"
            )
        shape = self.operator.spinor_shape(x)
        if tuple(self.phi.shape) != tuple(shape):
            raise ShapeError(
                f"pseudofermion action: the links {tuple(x.shape)} need a pseudofermion field of shape "
                f"{shape}; the one drawn last has shape {tuple(self.phi.shape)} (call refresh for these links)"
            )
        return self.phi

    def _solve(self, x: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        sol, report = self.operator.solve_normal(x, phi, tol=self.cg_tol, maxiter=self.cg_maxiter)
        self.last_report = report
        return sol

    def fermion_action(self, x: torch.Tensor) -> torch.Tensor:
        """phi^+ (D^+ D)^{-1} phi, shape (B,), float64 (>= 0); at the links of the last
        :meth:`refresh` (the same tensor object, not modified since) the exact value chi^+ chi,
        without a solve."""
        phi = self._phi(x)
        if self._fresh is not None and self._fresh[0] is x and self._fresh[1] == x._version:
            return self._fresh[2]
        sol = self._solve(x, phi)
        return (phi.conj() * sol).flatten(1).sum(1).real.to(torch.float64)

    def action(self, x: torch.Tensor) -> torch.Tensor:
        """S_g + phi^+ (D^+ D)^{-1} phi, shape (B,), float64."""
        return self.gauge.action(x).to(torch.float64) + self.fermion_action(x)

    def fermion_force(self, x: torch.Tensor) -> torch.Tensor:
        """Force of phi^+ (D^+ D)^{-1} phi: X = (D^+ D)^{-1} phi, Y = D X, dS = -2 Re(Y^+ dD X)."""
        phi = self._phi(x)
        sol = self._solve(x, phi)
        return self._fermion_force(x, self.operator.apply(x, sol), sol)

    def force(self, x: torch.Tensor) -> torch.Tensor:
        """Gauge force plus :meth:`fermion_force`, same shape and dtype as x."""
        return self.gauge.force(x) + self.fermion_force(x)


def _schwinger(cls: type[_TwoFlavourAction]) -> Any:
    def build(
        beta: float = 2.0, kappa: float = 0.2, *, dirac: str = "wilson", cg_tol: float = 1e-12, cg_maxiter: int = 2000
    ) -> _TwoFlavourAction:
        return cls(beta, kappa, "u1", dirac=dirac, cg_tol=cg_tol, cg_maxiter=cg_maxiter)

    build.__name__ = f"schwinger_{cls.__name__}"
    build.__doc__ = f"The Schwinger model: :class:`{cls.__name__}` with group ``u1``."
    return build


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
    shape = op.spinor_shape(links)
    n = math.prod(shape[1:])
    volume = math.prod(op.geometry(links)[0])
    if method == "auto":
        method = "exact" if n <= MAX_DENSE_OBSERVABLE else "stochastic"
    if method == "exact":
        tr = torch.linalg.inv(op.dense(links)).diagonal(dim1=-2, dim2=-1).sum(-1).real
    elif method == "stochastic":
        g = torch.Generator(device=links.device).manual_seed(int(seed))
        eta = torch.randint(0, 2, (shape[0], int(noise), *shape[1:]), generator=g, device=links.device)
        eta = (2.0 * eta - 1.0).to(torch.complex128)
        sol, _ = op.solve(links, eta, tol=cg_tol, maxiter=cg_maxiter)
        tr = (eta.conj() * sol).flatten(2).sum(2).real.mean(1)
    else:
        raise ConfigError(f"chiral_condensate: method must be 'auto', 'exact' or 'stochastic'; found {method!r}")
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
    return [
        ActionSpec(
            name="schwinger",
            description="Schwinger model: U(1) Wilson gauge + 2 Wilson flavours, pseudofermions (HMC refreshes phi)",
            factory=_schwinger(PseudofermionAction),
            fields=("u1",),
            parameters=schwinger_params,
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
            parameters=_TwoFlavourAction.parameters,
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
