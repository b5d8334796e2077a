r"""Flow-based sampling schemes for two-flavour fermions (hook ``flowplug_kernels``).

The four schemes of Albergo et al., arXiv:2106.05934, section III and Fig. 1, for a gauge
field U with two degenerate Wilson flavours (the Schwinger model, or ``wilson-nf2``).
With M(U) = D(U)^+ D(U) (n x n, n = V s N) and a complex pseudofermion field phi in C^n,

    p(U, phi) = exp(-S_g(U) - phi^+ M(U)^{-1} phi) / (pi^n Z),
    int dphi p(U, phi) = exp(-S_g(U)) det M(U) / Z = p(U)          (the two-flavour theory),

and p(phi | U) is the complex Gaussian of covariance M(U), drawn exactly as phi = D(U)^+ chi
with chi of density exp(-chi^+ chi) / pi^n (then phi^+ M^{-1} phi = chi^+ chi). A flow q(U)
proposes gauge fields; a **pseudofermion model** r(phi | U) (:class:`PseudofermionModel`,
:data:`PSEUDOFERMION_MODELS`) proposes pseudofermions with a tractable density that needs
no determinant of D(U): ``ilu`` (default; Gaussian with covariance D_a^+ D_a, det D_a = 1),
``free`` (the unit-gauge operator), ``white``, and ``exact`` (p(phi | U), for checks).

The same kernels sample the **Yukawa model** (``yukawa`` / ``yukawa-exact``,
:mod:`flowplug.plugins.yukawa`; arXiv:2106.05934, section IV): there U stands for the real
scalar field phi (field kind ``scalar``), S_g for its phi^4 action S_B and D for the staggered
operator with site mass m + g phi (n = V). The kernels read the bosonic action from the
action's attribute ``bosonic`` (or ``gauge``, the gauge theories' name), the free background
of the ``free`` model from the operator's ``free_background`` (phi = 0; unit links otherwise),
and the exact-determinant action of ``exact-marginal`` from the action's
``exact_counterpart()`` where it has one.

``exact-marginal`` (:func:`exact_marginal`: the ``independence-metropolis`` kernel with the exact determinant)
    U' ~ q, accepted with min(1, [p(U') / q(U')] / [p(U) / q(U)]), p(U) from the dense
    det M(U) (``schwinger-exact``); scheme (a).
``pseudo-marginal`` (:class:`PseudoMarginal`)
    det M(U) replaced by the unbiased estimate
    w(U) = (1/N) sum_i exp(-phi_i^+ M(U)^{-1} phi_i) / (pi^n r(phi_i | U)), phi_i ~ r(. | U),
    E_r[w(U)] = det M(U); U' ~ q with a fresh estimate w(U'), accepted with
    min(1, [exp(-S_g(U')) w(U') / q(U')] / [exp(-S_g(U)) w(U) / q(U)]), the current
    state's estimate **kept** (part of the chain state, never redrawn): the chain on
    (U, w) leaves exp(-S_g(U)) w g(w | U) invariant, whose U-marginal is p(U)
    (Andrieu & Roberts, Ann. Statist. 37 (2009) 697; Beaumont, Genetics 164 (2003) 1139);
    scheme (b).
``fermion-gibbs`` (:class:`FermionGibbs`)
    phi ~ p(phi | U) exactly, then U' ~ q accepted with the Metropolis test of
    p(U | phi) ∝ exp(-S_g(U) - phi^+ M(U)^{-1} phi): log A = [-S(U', phi) - log q(U')] -
    [-S(U, phi) - log q(U)]. Each half leaves p(U, phi) invariant; scheme (c) with an
    unconditional flow (the paper's conditional flow q(U | phi) is not implemented).
``fermion-joint`` (:class:`FermionJoint`)
    (U', phi') ~ q(U') r(phi' | U'), accepted with
    min(1, [p(U', phi') / (q(U') r(phi' | U'))] / [p(U, phi) / (q(U) r(phi | U))]); the
    chain state is (U, phi); scheme (d).

Chain state: x = U (canonical layout); ``log_p`` is NaN (the marginal density needs the
determinant, which these kernels avoid), as for HMC with pseudofermions; per chain
``extras``: ``log_q`` (all), ``log_det_estimate`` (pseudo-marginal: log w(U); NaN after
``init``, drawn by the first step with the chain's generator, so a run is reproducible from
its seed), and for the joint scheme (drawn by the first step from p(phi | U)) ``phi`` (B,
L..., s[, N]) complex128, ``log_r`` and ``log_p_joint`` = -S_g(U) - phi^+ M(U)^{-1} phi.
Densities, quadratic forms and accept/reject are float64 / complex128. The quadratic forms
are solved by the conjugate gradient with ``cg_tol`` (default the action's, 1e-12): CG
started at 0 gives phi^+ x_k = phi^+ M^{-1} phi - e_k^+ M e_k (e_k the error), an absolute
error at most tol^2 |phi|^2 / lambda_min(M), below float64 rounding of S for tol = 1e-12
unless lambda_min(M) < 1e-20 |phi|^2.

Composition with other kernels: the Gibbs kernel needs only U (log q is recomputed by the
inverse flow when missing), the joint kernel redraws phi from p(phi | U) when another
kernel moved U (an exact Gibbs step); the pseudo-marginal kernel refuses a state without
its estimate (redrawing it would be Monte-Carlo-within-Metropolis, which is not exact).
``exact-marginal`` reads ``log_p``, which the other three leave NaN: in one mixture or cycle
with them it would reject every proposal (a stuck chain, not a bias); do not combine them.

References:
    M. S. Albergo, G. Kanwar, S. Racanière, D. J. Rezende, J. M. Urban, D. Boyda,
    K. Cranmer, D. C. Hackett, P. E. Shanahan, arXiv:2106.05934, sections II-III and Fig. 1;
    C. Andrieu & G. O. Roberts, Ann. Statist. 37 (2009) 697 (pseudo-marginal MCMC);
    Gattringer & Lang (2010), section 8.1 (pseudofermions); docs/fermions.md.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from flowplug.chain import ChainState, Kernel
from flowplug.errors import ConfigError, ShapeError
from flowplug.hookspecs import hookimpl
from flowplug.metropolis import guarded_log_accept, metropolis_test
from flowplug.records import KernelSpec, PseudofermionModelSpec

__all__ = [
    "PseudofermionModel",
    "FreeFieldModel",
    "WhiteNoiseModel",
    "ILUModel",
    "ExactConditionalModel",
    "PSEUDOFERMION_MODELS",
    "pseudofermion_model",
    "exact_marginal",
    "PseudoMarginal",
    "FermionGibbs",
    "FermionJoint",
    "log_det_estimate",
]

_LOG_PI = math.log(math.pi)


def _norm2(a: torch.Tensor, keep: int) -> torch.Tensor:
    """sum |a|^2 over all axes after the first ``keep``, float64."""
    return (a.real**2 + a.imag**2).flatten(keep).sum(-1).to(torch.float64)


def _complex_normal(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """chi with density exp(-|chi|^2) / pi^n (real and imaginary parts N(0, 1/2)), complex128."""
    return torch.randn(shape, generator=generator, dtype=torch.complex128, device=device)


def _unit_links(x: torch.Tensor) -> torch.Tensor:
    """Unit gauge links of the layout of x: zero angles (U(1)) or identity matrices (SU(N))."""
    if x.is_complex():
        eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
        return eye.expand_as(x).clone()
    return torch.zeros_like(x)


def _free_background(operator: Any, x: torch.Tensor) -> torch.Tensor:
    """The free background of x's layout for ``operator``: its ``free_background(x)`` where it
    has one (the staggered operators: phi = 0 on a scalar field, unit links), else unit links."""
    free = getattr(operator, "free_background", None)
    return free(x) if callable(free) else _unit_links(x)


# ------------------------------------------------------------------ pseudofermion models


class PseudofermionModel:
    r"""Interface of a pseudofermion model r(phi | U): a normalised density on C^n.

    ``sample(x, k, generator) -> (phi, log_r)``: k draws per configuration, phi of shape
    (B, k, L..., s[, N]) complex128 and log r(phi | U) (B, k) float64 (density with respect
    to the Lebesgue measure on C^n = R^{2n}, constants included).
    ``log_prob(x, phi) -> (B, k)``: log r of given fields (same shapes).

    Any object with these two methods can be passed as ``pseudofermion=`` to the kernels of
    this module; registered by name in :data:`PSEUDOFERMION_MODELS`.
    """

    name = "pseudofermion-model"

    def sample(
        self, x: torch.Tensor, k: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k draws per configuration (class docstring)."""
        raise NotImplementedError

    def log_prob(self, x: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """log r(phi | U), (B, k) float64 (class docstring)."""
        raise NotImplementedError


class WhiteNoiseModel(PseudofermionModel):
    r"""phi = scale chi: complex Gaussian of covariance C = scale^2 1, independent of U.

    log r(phi) = -|phi|^2 / scale^2 - n log(pi scale^2).

    Arguments:
        operator: The Dirac operator (fixes the spinor layout).
        scale: Width (> 0). The pseudo-marginal estimate has finite variance when
            C > M(U) / 2, i.e. scale^2 > lambda_max(D^+ D) / 2 (<= (1 + 2 d kappa)^2 / 2).

    Raises:
        ConfigError: for scale <= 0.
    """

    name = "white"

    def __init__(self, operator: Any, *, scale: float = 1.0) -> None:
        if not float(scale) > 0:
            raise ConfigError(f"pseudofermion model 'white': scale must be > 0; found {scale}")
        self.operator = operator
        self.scale = float(scale)

    def sample(
        self, x: torch.Tensor, k: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """phi = scale chi, (B, k, L..., s[, N]); log r (B, k)."""
        shape = self.operator.spinor_shape(x)
        chi = _complex_normal((shape[0], int(k), *shape[1:]), generator, x.device)
        n = math.prod(shape[1:])
        log_r = -_norm2(chi, 2) - n * (_LOG_PI + 2 * math.log(self.scale))
        return self.scale * chi, log_r

    def log_prob(self, x: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """log r(phi), (B, k) float64."""
        n = self.operator.size(x)
        return -_norm2(phi, 2) / self.scale**2 - n * (_LOG_PI + 2 * math.log(self.scale))


class FreeFieldModel(PseudofermionModel):
    r"""phi = scale D_0^+ chi, D_0 the Dirac operator at unit links (the free field).

    A complex Gaussian of covariance C = scale^2 D_0^+ D_0, independent of U:
    log r(phi) = -phi^+ C^{-1} phi - log det C - n log pi, with
    log det C = 2 n log(scale) + 2 log|det D_0| from momentum space for the Wilson operator
    (:func:`flowplug.plugins.dirac.free_wilson_logdet`), else from the dense D_0 once per
    lattice. For draws of the model phi^+ C^{-1} phi = chi^+ chi exactly (no solve); for
    other fields (``log_prob``) one CG solve with D_0. It matches p(phi | U) where U is
    close to the unit gauge (weak coupling), so r needs no determinant of D(U).

    Arguments:
        operator: The Dirac operator (``apply_dagger``, ``solve_normal``, ``spinor_shape``).
        scale: Overall width (> 0); scale > 1 widens r, which keeps the variance of the
            pseudo-marginal weights finite for rougher fields (finite when C > M(U) / 2).
        cg_tol, cg_maxiter: Solver settings for ``log_prob``.

    Raises:
        ConfigError: for scale <= 0; ShapeError for an operator without a dense matrix on a
            lattice too large for one.

    References:
        arXiv:2106.05934, section III (pseudofermion proposals); Gattringer & Lang (2010),
        chapter 5 (free Wilson operator in momentum space).
    """

    name = "free"

    def __init__(self, operator: Any, *, scale: float = 1.0, cg_tol: float = 1e-12, cg_maxiter: int = 5000) -> None:
        if not float(scale) > 0:
            raise ConfigError(f"pseudofermion model 'free': scale must be > 0; found {scale}")
        self.operator = operator
        self.scale = float(scale)
        self.cg_tol = float(cg_tol)
        self.cg_maxiter = int(cg_maxiter)
        self._logdet: dict[tuple[int, ...], float] = {}

    def log_det_covariance(self, x: torch.Tensor) -> float:
        """log det C = 2 n log(scale) + log det(D_0^+ D_0) for the lattice of x (cached)."""
        shape = self.operator.spinor_shape(x)
        key = tuple(shape[1:]) + (int(x.is_complex()),)
        if key not in self._logdet:
            lattice, ncol = self.operator.geometry(x)
            from flowplug.plugins.dirac import WilsonDiracOperator, free_wilson_logdet

            if isinstance(self.operator, WilsonDiracOperator):
                ld = free_wilson_logdet(
                    tuple(lattice), self.operator.kappa, ncolor=ncol, antiperiodic=self.operator.antiperiodic
                )
            elif callable(getattr(self.operator, "free_logdet", None)):  # momentum space (staggered)
                ld = float(self.operator.free_logdet(x[:1]))
            else:
                from flowplug.plugins.fermion_actions import MAX_DENSE

                n = self.operator.size(x)
                if n > MAX_DENSE:
                    raise ShapeError(
                        f"pseudofermion model 'free': log det D_0 of operator {self.operator!r} needs a dense "
                        f"matrix of n = {n} > MAX_DENSE = {MAX_DENSE} rows; use a Wilson operator or a smaller lattice"
                    )
                ld = float(torch.linalg.slogdet(self.operator.dense(_free_background(self.operator, x[:1])))[1][0])
            self._logdet[key] = 2.0 * ld
        n = math.prod(shape[1:])
        return self._logdet[key] + 2.0 * n * math.log(self.scale)

    def sample(
        self, x: torch.Tensor, k: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """phi = scale D_0^+ chi, (B, k, L..., s[, N]); log r (B, k), exact without a solve."""
        shape = self.operator.spinor_shape(x)
        chi = _complex_normal((shape[0], int(k), *shape[1:]), generator, x.device)
        phi = self.scale * self.operator.apply_dagger(_free_background(self.operator, x), chi)
        n = math.prod(shape[1:])
        log_r = -_norm2(chi, 2) - self.log_det_covariance(x) - n * _LOG_PI
        return phi, log_r

    def log_prob(self, x: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """log r(phi), (B, k) float64 (one CG solve with D_0^+ D_0)."""
        unit = _free_background(self.operator, x)
        sol, _ = self.operator.solve_normal(unit, phi, tol=self.cg_tol, maxiter=self.cg_maxiter)
        quad = (phi.conj() * sol).flatten(2).sum(-1).real.to(torch.float64) / self.scale**2
        return -quad - self.log_det_covariance(x) - self.operator.size(x) * _LOG_PI


class ExactConditionalModel(PseudofermionModel):
    r"""r(phi | U) = p(phi | U): phi = D(U)^+ chi, with the exact determinant (small lattices).

    log r = -phi^+ M(U)^{-1} phi - log det M(U) - n log pi. With it the pseudo-marginal
    estimate is exactly det M(U) (zero variance) and the joint scheme is the exact-marginal
    one: a check of the bookkeeping, not a production model (it needs the dense determinant).

    Arguments:
        operator: The Dirac operator (``dense``, ``apply_dagger``, ``solve_normal``).
        cg_tol, cg_maxiter: Solver settings for ``log_prob``.
    """

    name = "exact"

    def __init__(self, operator: Any, *, cg_tol: float = 1e-12, cg_maxiter: int = 5000) -> None:
        self.operator = operator
        self.cg_tol = float(cg_tol)
        self.cg_maxiter = int(cg_maxiter)

    def _logdet(self, x: torch.Tensor) -> torch.Tensor:
        from flowplug.plugins.fermion_actions import MAX_DENSE

        n = self.operator.size(x)
        if n > MAX_DENSE:
            raise ShapeError(
                f"pseudofermion model 'exact': dense D has n = {n} > MAX_DENSE = {MAX_DENSE} rows; use 'free'"
            )
        return 2.0 * torch.linalg.slogdet(self.operator.dense(x))[1].to(torch.float64)

    def sample(
        self, x: torch.Tensor, k: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """phi = D(U)^+ chi, (B, k, L..., s[, N]); log r (B, k)."""
        shape = self.operator.spinor_shape(x)
        chi = _complex_normal((shape[0], int(k), *shape[1:]), generator, x.device)
        phi = self.operator.apply_dagger(x, chi)
        n = math.prod(shape[1:])
        log_r = -_norm2(chi, 2) - self._logdet(x)[:, None] - n * _LOG_PI
        return phi, log_r

    def log_prob(self, x: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """log p(phi | U), (B, k) float64."""
        sol, _ = self.operator.solve_normal(x, phi, tol=self.cg_tol, maxiter=self.cg_maxiter)
        quad = (phi.conj() * sol).flatten(2).sum(-1).real.to(torch.float64)
        return -quad - self._logdet(x)[:, None] - self.operator.size(x) * _LOG_PI


class ILUModel(PseudofermionModel):
    r"""Gaussian with covariance C(U) = scale^2 D_a(U)^+ D_a(U), D_a = (1 + L)(1 + R): det D_a = 1.

    L and R are the strictly lower and upper parts of D(U) - 1 in the site ordering of the
    dense matrix (blocks between different sites: the hops to earlier and to later sites).
    The factors are unit triangular matrices, so det D_a(U) = 1 for every U and
    log r = -phi^+ C^{-1} phi - 2 n log(scale) - n log pi needs no determinant of D(U);
    D_a = D + L R differs from D by a term of order kappa^2 (a symmetric Gauss-Seidel /
    incomplete-LU approximation), so r follows M(U) = D^+ D mode by mode far better than a
    U-independent Gaussian. Draws: phi = scale D_a^+ chi (phi^+ C^{-1} phi = chi^+ chi);
    ``log_prob``: two triangular solves. Dense (n <= MAX_DENSE), O(n^2) per configuration.
    On an operator whose diagonal blocks are not the identity (the staggered-yukawa operator,
    site masses m + g phi) the factors drop those blocks: r is then independent of the
    background and far from p (still exact, det D_a = 1).

    Arguments:
        operator: The Dirac operator (``dense``, ``spinor_shape``, ``geometry``).
        scale: Overall width (> 0); the pseudo-marginal weights have finite variance when
            C > M(U)/2, which a scale slightly above 1 secures near the critical kappa.

    Raises:
        ConfigError: for scale <= 0; ShapeError for lattices too large for dense matrices.

    References:
        arXiv:2106.05934, section III (pseudofermion proposals with tractable densities);
        Saad, "Iterative Methods for Sparse Linear Systems" (2003), section 10.3 (ILU(0)).
    """

    name = "ilu"

    def __init__(self, operator: Any, *, scale: float = 1.0) -> None:
        if not float(scale) > 0:
            raise ConfigError(f"pseudofermion model 'ilu': scale must be > 0; found {scale}")
        self.operator = operator
        self.scale = float(scale)

    def factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1 + L, 1 + R)``, each (B, n, n) complex128, unit lower / unit upper triangular."""
        from flowplug.plugins.fermion_actions import MAX_DENSE

        n = self.operator.size(x)
        if n > MAX_DENSE:
            raise ShapeError(
                f"pseudofermion model 'ilu': dense D has n = {n} > MAX_DENSE = {MAX_DENSE} rows; use 'free'"
            )
        try:
            d = self.operator.dense(x, by="blocks")
        except TypeError:
            d = self.operator.dense(x)
        lattice, _ = self.operator.geometry(x)
        per_site = n // math.prod(lattice)
        site = torch.arange(n, device=x.device) // per_site
        eye = torch.eye(n, dtype=d.dtype, device=d.device)
        off = d - eye
        lower = off * (site[:, None] > site[None, :])
        upper = off * (site[:, None] < site[None, :])
        return eye + lower, eye + upper

    def sample(
        self, x: torch.Tensor, k: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """phi = scale D_a^+ chi, (B, k, L..., s[, N]); log r (B, k)."""
        shape = self.operator.spinor_shape(x)
        n = math.prod(shape[1:])
        chi = _complex_normal((shape[0], int(k), *shape[1:]), generator, x.device)
        lo, up = self.factors(x)
        da = lo @ up
        phi = self.scale * (da.mH @ chi.reshape(shape[0], int(k), n).transpose(1, 2)).transpose(1, 2)
        log_r = -_norm2(chi, 2) - n * (_LOG_PI + 2 * math.log(self.scale))
        return phi.reshape(chi.shape), log_r

    def log_prob(self, x: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """log r(phi | U), (B, k) float64: D_a^+ y = phi / scale by two triangular solves."""
        bsz, k = phi.shape[0], phi.shape[1]
        n = self.operator.size(x)
        lo, up = self.factors(x)
        rhs = phi.reshape(bsz, k, n).transpose(1, 2) / self.scale
        # D_a^+ = R'^+ L'^+ with R'^+ unit lower and L'^+ unit upper triangular
        v = torch.linalg.solve_triangular(up.mH, rhs, upper=False, unitriangular=True)
        y = torch.linalg.solve_triangular(lo.mH, v, upper=True, unitriangular=True)
        quad = (y.real**2 + y.imag**2).sum(1).to(torch.float64)
        return -quad - n * (_LOG_PI + 2 * math.log(self.scale))


#: The built-in pseudofermion models of this module by name: ``factory(operator, **options)``.
#: They are registered (:func:`flowplug_pseudofermion_models`) in the registry
#: ``pseudofermion_model``, where the kernels look every model up, plugins' included
#: (hook ``flowplug_pseudofermion_models``; more built-ins: :mod:`flowplug.plugins.pseudofermion_models`).
PSEUDOFERMION_MODELS: dict[str, Callable[..., PseudofermionModel]] = {
    "free": FreeFieldModel,
    "ilu": ILUModel,
    "white": WhiteNoiseModel,
    "exact": ExactConditionalModel,
}


def pseudofermion_model(spec: Any, operator: Any, **options: Any) -> PseudofermionModel:
    """The pseudofermion model ``spec``: a name in the registry ``pseudofermion_model`` (built
    with ``factory(operator, **options)``) or a model object (returned as it is).

    Raises:
        UnknownComponentError: for an unknown name (naming the registered ones).
        ConfigError: for options the model rejects, or an object without ``sample``/``log_prob``.
    """
    if isinstance(spec, str):
        from flowplug.manager import registry

        record = registry("pseudofermion_model").get(spec.strip().lower())
        try:
            inspect.signature(record.factory).bind(operator, **options)
        except TypeError as exc:
            params = [p for p in inspect.signature(record.factory).parameters if p != "operator"]
            raise ConfigError(
                f"pseudofermion model {record.name!r} rejects the options {sorted(options)} ({exc}); "
                f"it takes {', '.join(params) or 'no options'}"
            ) from None
        return record.factory(operator, **options)
    if not (callable(getattr(spec, "sample", None)) and callable(getattr(spec, "log_prob", None))):
        raise ConfigError(
            "pseudofermion model: expected a registered name (flowplug plugins lists them) or an object with "
            f"sample(x, k, generator) and log_prob(x, phi); found {type(spec).__name__}"
        )
    return spec


def _model_options(kernel: str, spec: Any, scale: float | None, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The options a kernel passes to its pseudofermion model: ``pseudofermion_options`` plus
    ``scale`` where given (the default width 1 for the built-in Gaussian models otherwise).

    Raises:
        ConfigError: for ``pseudofermion_options`` that is not a table, or options given with a
            model object.
    """
    if options is not None and not isinstance(options, Mapping):
        raise ConfigError(
            f"kernel '{kernel}': pseudofermion_options must be a table of the model's options "
            f'(e.g. {{checkpoint = "model.pt"}}); found {options!r}'
        )
    opts = dict(options or {})
    if scale is not None:
        opts.setdefault("scale", float(scale))
    if opts and not isinstance(spec, str):
        raise ConfigError(
            f"kernel '{kernel}': options {sorted(opts)} go to a model given by name; the model object "
            f"{type(spec).__name__} was built with its own"
        )
    return opts


# ------------------------------------------------------------------------------ kernels


def _fermion_parts(action: Any, who: str) -> tuple[Any, Any]:
    """(bosonic action, Dirac operator) of a two-flavour action; ConfigError otherwise.

    The bosonic action is the attribute ``bosonic`` (the Yukawa actions: phi^4) or, for the
    gauge theories, ``gauge`` (the Wilson gauge action)."""
    bosonic = getattr(action, "bosonic", None)
    if bosonic is None:
        bosonic = getattr(action, "gauge", None)
    operator = getattr(action, "operator", None)
    if bosonic is None or operator is None or not hasattr(operator, "solve_normal"):
        raise ConfigError(
            f"kernel '{who}' samples two-flavour fermion theories: it needs an action with a bosonic action "
            f"(attribute 'bosonic' or 'gauge') and a Dirac operator (schwinger, schwinger-exact, wilson-nf2, "
            f"wilson-nf2-exact, yukawa, yukawa-exact); found {type(action).__name__} "
            f"({getattr(action, 'field', '?')} fields)"
        )
    return bosonic, operator


class _FermionFlowKernel(Kernel):
    """Common parts: flow proposals, log q of states, bosonic action, quadratic forms.

    ``bosonic`` is the action's bosonic part (gauge action or phi^4); ``gauge`` is the same
    object (the name the gauge-theory code used)."""

    name = "fermion-flow-kernel"

    def __init__(self, flow: Any, action: Any, *, cg_tol: float | None = None, cg_maxiter: int | None = None) -> None:
        self.bosonic, self.operator = _fermion_parts(action, self.name)
        self.gauge = self.bosonic
        field = getattr(flow, "field", None)
        if field is not None and field != action.field:
            raise ConfigError(
                f"kernel '{self.name}': the flow samples '{field}' fields but the action acts on '{action.field}'"
            )
        self.flow = flow
        self.action = action
        self.cg_tol = float(cg_tol if cg_tol is not None else getattr(action, "cg_tol", 1e-12))
        self.cg_maxiter = int(cg_maxiter if cg_maxiter is not None else getattr(action, "cg_maxiter", 2000))
        if not self.cg_tol > 0 or self.cg_maxiter < 1:
            raise ConfigError(
                f"kernel '{self.name}': cg_tol must be > 0 and cg_maxiter >= 1; found {cg_tol}, {cg_maxiter}"
            )
        self.last_report: Any = None

    def _check(self, x: torch.Tensor) -> None:
        if getattr(self.flow, "lattice", None) is not None:
            from flowplug.flow import check_field

            check_field(self.flow, x)
        self.operator.geometry(x)

    def log_q(self, x: torch.Tensor) -> torch.Tensor:
        """log q(x) through the inverse flow, (B,) float64 (no gradients)."""
        self._check(x)
        with torch.no_grad():
            z, ld_inv = self.flow.inverse(x)
            return self.flow.prior.log_prob(z).to(torch.float64) + ld_inv.to(torch.float64)

    def propose(self, n: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, log q(x))`` for n flow samples (x in float64 / complex128), log q (n,) float64."""
        with torch.no_grad():
            z, log_r = self.flow.sample_latent(n, generator)
            x, logdet = self.flow(z)
        x = x.detach().to(torch.complex128 if x.is_complex() else torch.float64)
        return x, log_r.to(torch.float64) - logdet.to(torch.float64)

    def bosonic_action(self, x: torch.Tensor) -> torch.Tensor:
        """S_B(x): the gauge action S_g(U) or the scalar action S_B(phi), (B,) float64."""
        with torch.no_grad():
            return self.bosonic.action(x).to(torch.float64)

    #: The name the gauge-theory code used for :meth:`bosonic_action`.
    gauge_action = bosonic_action

    def _pseudofermion_model(
        self, pseudofermion: Any, scale: float | None, options: Mapping[str, Any] | None
    ) -> PseudofermionModel:
        """The kernel's pseudofermion model on its operator (:func:`pseudofermion_model`), with the
        options checked by :func:`_model_options` (ConfigError naming this kernel)."""
        opts = _model_options(self.name, pseudofermion, scale, options)
        return pseudofermion_model(pseudofermion, self.operator, **opts)

    def quadratic(self, x: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """phi^+ (D^+ D)^{-1} phi, phi (B, [k,] L..., s[, N]); returns (B[, k]) float64 (CG, ``cg_tol``).

        Raises:
            ConvergenceError: if the CG does not converge within ``cg_maxiter``.
        """
        with torch.no_grad():
            sol, report = self.operator.solve_normal(x, phi, tol=self.cg_tol, maxiter=self.cg_maxiter)
        self.last_report = report
        keep = phi.dim() - len(self.operator.spinor_shape(x)) + 1
        return (phi.conj() * sol).flatten(keep).sum(-1).real.to(torch.float64)

    def _nan(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0],), torch.nan, dtype=torch.float64, device=x.device)

    def init(self, x: torch.Tensor) -> ChainState:
        """State for links x with log q(x) in ``extras["log_q"]``; log p is NaN (the links
        alone have no density without the determinant). Kernels that need more state (phi,
        a determinant estimate) draw it at their first step with the chain's generator."""
        x = x.detach()
        return ChainState(x, self._nan(x), {"log_q": self.log_q(x)})

    def _state_log_q(self, state: ChainState) -> torch.Tensor:
        """log q of the state's links: the cached ``extras["log_q"]``, else through the inverse flow."""
        lq = state.extras.get("log_q")
        return self.log_q(state.x) if lq is None else lq


def log_det_estimate(
    x: torch.Tensor,
    model: PseudofermionModel,
    quadratic: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    k: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""log w(U) with w(U) = (1/k) sum_i exp(-phi_i^+ M^{-1} phi_i) / (pi^n r(phi_i | U)), phi_i ~ r.

    E_r[w(U)] = det(D^+ D) exactly (importance sampling of the Gaussian integral
    det M = int dphi exp(-phi^+ M^{-1} phi) / pi^n); log w is computed as a logsumexp in
    float64.

    Arguments:
        x: Links (B, ...), canonical layout.
        model: The pseudofermion model r.
        quadratic: (x, phi (B, k, ...)) -> phi^+ M(U)^{-1} phi, (B, k) float64.
        k: Number of draws per configuration (>= 1).
        generator: Random generator.

    Returns:
        (B,) float64.

    References:
        arXiv:2106.05934, section III (stochastic determinant estimate); Andrieu & Roberts,
        Ann. Statist. 37 (2009) 697.
    """
    phi, log_r = model.sample(x, int(k), generator)
    n = math.prod(phi.shape[2:])
    log_terms = -quadratic(x, phi) - n * _LOG_PI - log_r.to(torch.float64)
    return torch.logsumexp(log_terms, dim=1) - math.log(int(k))


def exact_marginal(flow: Any, action: Any) -> Kernel:
    r"""Scheme (a), exact marginal: independence Metropolis with the exact determinant.

    Returns the registered ``independence-metropolis`` kernel
    (:class:`flowplug.plugins.kernels.IndependenceMetropolis`) for the exact-determinant
    action: ``schwinger-exact`` / ``wilson-nf2-exact`` / ``yukawa-exact`` as given, or, for a
    pseudofermion action, its ``exact_counterpart()`` (``yukawa`` -> ``yukawa-exact``) or the
    :class:`flowplug.plugins.fermion_actions.ExactFermionAction` with its couplings
    (``schwinger`` / ``wilson-nf2``). Its test is
    log A = [-S_eff(U') - log q(U')] - [-S_eff(U) - log q(U)], S_eff = S_g - log det(D^+ D)
    from the dense matrix (small lattices, :data:`flowplug.plugins.fermion_actions.MAX_DENSE`).

    Raises:
        ConfigError: for an action that is not a two-flavour fermion action.

    References:
        arXiv:2106.05934, section III, Fig. 1 (a).
    """
    _fermion_parts(action, "exact-marginal")
    from flowplug.plugins.fermion_actions import ExactFermionAction
    from flowplug.plugins.kernels import IndependenceMetropolis

    counterpart = getattr(action, "exact_counterpart", None)
    if callable(counterpart):  # the action knows its exact-determinant form (yukawa -> yukawa-exact)
        if getattr(action, "refresh", None) is not None:
            action = counterpart()
    elif getattr(action, "refresh", None) is not None:  # Wilson pseudofermion action: same couplings, exact det
        action = ExactFermionAction(
            action.beta,
            action.kappa,
            action.group,
            dirac=action.dirac,
            cg_tol=action.cg_tol,
            cg_maxiter=action.cg_maxiter,
        )
    return IndependenceMetropolis(flow, action)


class PseudoMarginal(_FermionFlowKernel):
    r"""Scheme (b): pseudo-marginal independence Metropolis with a stochastic determinant.

    Each step: U' ~ q; log w(U') from ``n_pseudofermions`` fresh draws of the pseudofermion
    model (:func:`log_det_estimate`); accept with

        log A = [-S_g(U') + log w(U') - log q(U')] - [-S_g(U) + log w(U) - log q(U)],

    where log w(U) is the estimate made when U was accepted (``extras["log_det_estimate"]``),
    never redrawn. Exact for any model r with r > 0 wherever p(phi | U) > 0 (Andrieu &
    Roberts 2009, theorem 1): the chain on (U, w) has the invariant density
    exp(-S_g(U)) w g(w | U) / Z, whose U-marginal is p(U) because E[w | U] = det(D^+ D).
    A noisy estimate (large variance of log w) only lowers the acceptance and makes the
    chain sticky; the variance is finite when C > M(U)/2 for a Gaussian model of
    covariance C.

    Arguments:
        flow: The gauge-field flow q(U).
        action: A two-flavour action (``schwinger``, ``schwinger-exact``, ...): its gauge
            action and Dirac operator are used; its determinant is not.
        n_pseudofermions: Draws per estimate (>= 1).
        pseudofermion: Model name in the registry ``pseudofermion_model`` (default ``ilu``;
            ``eo-ilu`` and the trained ``conditional`` of
            :mod:`flowplug.plugins.pseudofermion_models` follow p(phi | U) far more closely) or
            a model object.
        scale: Width option of the Gaussian models (``ilu``, ``eo-ilu``, ``free``,
            ``white``; default 1): the weights have finite variance only for C > M(U)/2.
        pseudofermion_options: The model's other options, e.g. ``{checkpoint = "model.pt"}``
            for ``conditional`` (the run's summary records the file's SHA-256).
        cg_tol, cg_maxiter: Solver settings (default the action's).

    Raises:
        ConfigError: for a non-fermionic action, a field mismatch, bad options, or (in
            ``step``) a state without its estimate.

    ``info``: ``accepted`` (B,) bool, ``log_accept``, ``log_det_estimate`` (of the
    proposals), ``log_q_proposal`` (B,) float64, ``cg_iterations`` (B,) int64.

    References:
        arXiv:2106.05934, section III, Fig. 1 (b); Andrieu & Roberts, Ann. Statist. 37
        (2009) 697; Beaumont, Genetics 164 (2003) 1139.
    """

    name = "pseudo-marginal"
    #: The chain state carries the estimate: a driver must keep the state between steps
    #: (re-initialising it every step would redraw the estimate: not exact).
    requires_persistent_state = True

    def __init__(
        self,
        flow: Any,
        action: Any,
        *,
        n_pseudofermions: int = 1,
        pseudofermion: Any = "ilu",
        scale: float | None = None,
        pseudofermion_options: Mapping[str, Any] | None = None,
        cg_tol: float | None = None,
        cg_maxiter: int | None = None,
    ) -> None:
        super().__init__(flow, action, cg_tol=cg_tol, cg_maxiter=cg_maxiter)
        self.n_pseudofermions = int(n_pseudofermions)
        if self.n_pseudofermions < 1:
            raise ConfigError(f"kernel 'pseudo-marginal': n_pseudofermions must be >= 1; found {n_pseudofermions}")
        self.model = self._pseudofermion_model(pseudofermion, scale, pseudofermion_options)

    def estimate(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """log w(U), (B,) float64 (:func:`log_det_estimate` with this kernel's model)."""
        with torch.no_grad():
            return log_det_estimate(x, self.model, self.quadratic, self.n_pseudofermions, generator)

    def init(self, x: torch.Tensor) -> ChainState:
        """State with log q; the estimate is NaN ("not drawn yet"): the first step draws it with
        the chain's generator (so a run is reproducible from its seed)."""
        x = x.detach()
        return ChainState(x, self._nan(x), {"log_q": self.log_q(x), "log_det_estimate": self._nan(x)})

    def step(self, state: ChainState, generator: torch.Generator | None = None) -> tuple[ChainState, dict[str, Any]]:
        """One pseudo-marginal step for every chain (class docstring)."""
        if "log_det_estimate" not in state.extras:
            raise ConfigError(
                "kernel 'pseudo-marginal': the state has no determinant estimate (extras['log_det_estimate']); "
                "another kernel moved the links. Redrawing it would be Monte Carlo within Metropolis, which is "
                "not exact: run the pseudo-marginal kernel alone (or start it with its own init)"
            )
        lq0 = self._state_log_q(state)
        lw0 = state.extras["log_det_estimate"]
        fresh = torch.isnan(lw0)
        if bool(fresh.any()):  # a chain just started by init: its first estimate
            lw0 = torch.where(fresh, self.estimate(state.x, generator), lw0)
        x1, lq1 = self.propose(state.batch, generator)
        lw1 = self.estimate(x1, generator)
        t1 = -self.bosonic_action(x1) + lw1
        t0 = -self.bosonic_action(state.x) + lw0
        log_a = guarded_log_accept((t1 - lq1) - (t0 - lq0), t1, lq1)
        accepted = metropolis_test(log_a, generator)
        old = ChainState(state.x, state.log_p, {"log_q": lq0, "log_det_estimate": lw0})
        new = old.moved(accepted, x1, self._nan(x1), {"log_q": lq1, "log_det_estimate": lw1})
        info = {"accepted": accepted, "log_accept": log_a, "log_det_estimate": lw1, "log_q_proposal": lq1}
        if self.last_report is not None:
            info["cg_iterations"] = self.last_report.iterations
        return new, info

    def __repr__(self) -> str:
        return (
            f"PseudoMarginal(action={self.action!r}, model={self.model.name}, n_pseudofermions={self.n_pseudofermions})"
        )


class FermionGibbs(_FermionFlowKernel):
    r"""Scheme (c): Gibbs sampling of (U, phi) with a flow proposal for U given phi.

    Each step: (1) phi = D(U)^+ chi, chi complex Gaussian: an exact draw from p(phi | U), with
    phi^+ M(U)^{-1} phi = chi^+ chi; (2) U' ~ q(U') (an unconditional flow), accepted with the
    independence-Metropolis test of the conditional p(U | phi) ∝ exp(-S_g(U) - phi^+ M(U)^{-1} phi):

        log A = [-S_g(U') - phi^+ M(U')^{-1} phi - log q(U')] - [-S_g(U) - chi^+ chi - log q(U)].

    Both halves leave p(U, phi) invariant, so the U chain samples the two-flavour theory.
    One CG solve per step (at U'); no determinant. phi is redrawn every step, so it is not
    part of the chain state. The paper's improvement, a flow q(U | phi) conditioned on phi,
    is not implemented: with an unconditional q the acceptance is lower, exactness the same.

    Arguments:
        flow: The gauge-field flow q(U).
        action: A two-flavour action (gauge action and Dirac operator used).
        cg_tol, cg_maxiter: Solver settings (default the action's).

    Raises:
        ConfigError: for a non-fermionic action or a field mismatch.

    ``info``: ``accepted`` (B,) bool, ``log_accept`` (B,) float64, ``cg_iterations`` (B,) int64,
    ``phi`` (the pseudofermions drawn, (B, L..., s[, N]) complex128) and ``proposal`` (U').

    References:
        arXiv:2106.05934, section III, Fig. 1 (c); Geman & Geman, IEEE PAMI 6 (1984) 721 (Gibbs
        sampling); Tierney, Ann. Statist. 22 (1994) 1701 (Metropolis-within-Gibbs).
    """

    name = "fermion-gibbs"

    def step(self, state: ChainState, generator: torch.Generator | None = None) -> tuple[ChainState, dict[str, Any]]:
        """phi | U exactly, then U | phi by a flow independence-Metropolis step (class docstring)."""
        x0 = state.x
        lq0 = self._state_log_q(state)
        with torch.no_grad():
            chi = _complex_normal(tuple(self.operator.spinor_shape(x0)), generator, x0.device)
            phi = self.operator.apply_dagger(x0, chi)
            s0 = self.bosonic_action(x0) + _norm2(chi, 1)
            x1, lq1 = self.propose(state.batch, generator)
            s1 = self.bosonic_action(x1) + self.quadratic(x1, phi)
        log_a = guarded_log_accept((-s1 - lq1) - (-s0 - lq0), s1, lq1)
        accepted = metropolis_test(log_a, generator)
        old = ChainState(x0, state.log_p, {"log_q": lq0})
        new = old.moved(accepted, x1, self._nan(x1), {"log_q": lq1})
        info: dict[str, Any] = {"accepted": accepted, "log_accept": log_a, "phi": phi, "proposal": x1}
        if self.last_report is not None:
            info["cg_iterations"] = self.last_report.iterations
        return new, info

    def __repr__(self) -> str:
        return f"FermionGibbs(action={self.action!r})"


class FermionJoint(_FermionFlowKernel):
    r"""Scheme (d): joint independence Metropolis on (U, phi).

    Each step: U' ~ q(U'), phi' ~ r(phi' | U') (the pseudofermion model), accepted with

        log A = [log p(U', phi') - log q(U') - log r(phi' | U')] - [same at (U, phi)],
        log p(U, phi) = -S_g(U) - phi^+ M(U)^{-1} phi  (+ a constant),

    the state (U, phi) kept on rejection. This is independence Metropolis for the joint
    density p(U, phi) with proposal q r, exact for any r > 0. The chain's phi is kept in
    ``extras["phi"]``; where it is missing (the first step after another kernel moved U)
    it is drawn from p(phi | U) exactly (phi = D(U)^+ chi), a Gibbs step that keeps p(U, phi)
    invariant. With ``refresh = True`` that exact draw is made before every step (a Gibbs
    step on phi, then the joint test: a variant that forgets phi between steps).

    Arguments:
        flow: The gauge-field flow q(U).
        action: A two-flavour action (gauge action and Dirac operator used).
        pseudofermion, scale, pseudofermion_options: The pseudofermion model r(phi | U), as
            for :class:`PseudoMarginal` (default ``ilu``; ``eo-ilu`` and the trained
            ``conditional`` follow p(phi | U) far more closely).
        refresh: Redraw phi from p(phi | U) before every step.
        cg_tol, cg_maxiter: Solver settings (default the action's).

    Raises:
        ConfigError: for a non-fermionic action, a field mismatch or bad options.

    ``info``: ``accepted`` (B,) bool, ``log_accept`` (B,) float64, ``cg_iterations`` (B,) int64.

    References:
        arXiv:2106.05934, section III, Fig. 1 (d); Tierney, Ann. Statist. 22 (1994) 1701.
    """

    name = "fermion-joint"

    def __init__(
        self,
        flow: Any,
        action: Any,
        *,
        pseudofermion: Any = "ilu",
        scale: float | None = None,
        pseudofermion_options: Mapping[str, Any] | None = None,
        refresh: bool = False,
        cg_tol: float | None = None,
        cg_maxiter: int | None = None,
    ) -> None:
        super().__init__(flow, action, cg_tol=cg_tol, cg_maxiter=cg_maxiter)
        self.model = self._pseudofermion_model(pseudofermion, scale, pseudofermion_options)
        self.refresh = bool(refresh)

    def _heat_bath(self, x: torch.Tensor, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """phi ~ p(phi | U) with its log p(U, phi) and log r(phi | U), (B, ...)."""
        with torch.no_grad():
            chi = _complex_normal(tuple(self.operator.spinor_shape(x)), generator, x.device)
            phi = self.operator.apply_dagger(x, chi)
            log_p = -self.bosonic_action(x) - _norm2(chi, 1)
            log_r = self.model.log_prob(x, phi[:, None])[:, 0].to(torch.float64)
        return {"phi": phi, "log_p_joint": log_p, "log_r": log_r}

    def step(self, state: ChainState, generator: torch.Generator | None = None) -> tuple[ChainState, dict[str, Any]]:
        """One joint independence-Metropolis step for every chain (class docstring)."""
        x0 = state.x
        lq0 = self._state_log_q(state)
        keys = ("phi", "log_p_joint", "log_r")
        if self.refresh or not all(k in state.extras for k in keys):
            cur = self._heat_bath(x0, generator)
        else:
            cur = {k: state.extras[k] for k in keys}
        with torch.no_grad():
            x1, lq1 = self.propose(state.batch, generator)
            phi1, lr1 = self.model.sample(x1, 1, generator)
            phi1, lr1 = phi1[:, 0], lr1[:, 0].to(torch.float64)
            lp1 = -self.bosonic_action(x1) - self.quadratic(x1, phi1)
        log_a = guarded_log_accept((lp1 - lq1 - lr1) - (cur["log_p_joint"] - lq0 - cur["log_r"]), lp1, lq1, lr1)
        accepted = metropolis_test(log_a, generator)
        old = ChainState(x0, state.log_p, {"log_q": lq0, **cur})
        new = old.moved(accepted, x1, self._nan(x1), {"log_q": lq1, "phi": phi1, "log_p_joint": lp1, "log_r": lr1})
        info: dict[str, Any] = {"accepted": accepted, "log_accept": log_a}
        if self.last_report is not None:
            info["cg_iterations"] = self.last_report.iterations
        return new, info

    def __repr__(self) -> str:
        return f"FermionJoint(action={self.action!r}, model={self.model.name}, refresh={self.refresh})"


_FIELDS = ("u1", "su2", "su3", "scalar")


@hookimpl
def flowplug_pseudofermion_models() -> list[PseudofermionModelSpec]:
    """The pseudofermion models ``ilu``, ``free``, ``white`` and ``exact``."""
    descriptions = {
        "ilu": ("Gaussian, covariance s^2 D_a^+ D_a, D_a = (1 + L)(1 + R) the ILU factors of D: det 1", ("scale",)),
        "free": ("Gaussian, covariance s^2 D_0^+ D_0 (D at the free background), independent of U", ("scale",)),
        "white": ("Gaussian, covariance s^2 (white noise), independent of U", ("scale",)),
        "exact": ("p(phi | U) itself, with the dense determinant (checks; small lattices)", ()),
    }
    return [
        PseudofermionModelSpec(
            name=name, description=descriptions[name][0], factory=factory, parameters=descriptions[name][1]
        )
        for name, factory in PSEUDOFERMION_MODELS.items()
    ]


@hookimpl
def flowplug_kernels() -> list[KernelSpec]:
    """The four fermion sampling schemes of arXiv:2106.05934 (Fig. 1)."""
    return [
        KernelSpec(
            name="exact-marginal",
            description="flow independence Metropolis with the exact fermion determinant (2106.05934 Fig. 1a)",
            factory=exact_marginal,
            fields=_FIELDS,
        ),
        KernelSpec(
            name="pseudo-marginal",
            description="flow proposals, stochastic pseudofermion estimate of det(D^+D), kept per state (Fig. 1b)",
            factory=PseudoMarginal,
            fields=_FIELDS,
        ),
        KernelSpec(
            name="fermion-gibbs",
            description="exact pseudofermion heat bath, then a flow Metropolis step for U given phi (Fig. 1c)",
            factory=FermionGibbs,
            fields=_FIELDS,
        ),
        KernelSpec(
            name="fermion-joint",
            description="flow x pseudofermion-model proposals with a Metropolis test on p(U, phi) (Fig. 1d)",
            factory=FermionJoint,
            fields=_FIELDS,
        ),
    ]
