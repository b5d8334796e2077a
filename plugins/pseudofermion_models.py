r"""Pseudofermion models r(phi | U) built on the even-odd factorisation of D (hook
``flowplug_pseudofermion_models``): ``eo-ilu`` and the trained ``conditional`` model.

The determinant-free fermion schemes of arXiv:2106.05934 (pseudo-marginal, joint; section III
and Fig. 1) need a normalised proposal density r(phi | U) for the pseudofermion field that
follows the exact conditional p(phi | U), the complex Gaussian of covariance M(U) = D^+ D:
the closer r is to p, the smaller the noise of the pseudo-marginal determinant estimate and
the higher the joint scheme's acceptance. Both models here are complex Gaussians
r = CN(0, s^2 A^+ A) with phi = s A^+ chi, chi of density exp(-|chi|^2) / pi^n, and

    A = [[1, 0], [D_oe, 1]] [[1, D_eo], [0, A_S]]       (even sites first),

the exact even-odd factorisation of D = [[1, D_eo], [D_oe, 1]] with the Schur complement
S = 1 - D_oe D_eo replaced by a factorisation A_S with a known determinant:

``eo-ilu`` (:class:`EvenOddILUModel`)
    A_S = (1 + L_S)(1 + R_S), the incomplete LU factors of S (its strictly lower and upper
    site-ordered parts): det A = 1, and A - D = L_S R_S is of order kappa^4 where the
    ``ilu`` model of :mod:`flowplug.plugins.fermion_schemes` misses D by order kappa^2.
``conditional`` (:class:`ConditionalGaussianModel`)
    the same with learned gauge-invariant parameters per odd site x: a width exp l(x) and
    complex factors on the rows of L_S and R_S, outputs of a periodic convolutional network
    of the plaquettes around x, and a learned s; log det A = sum of the widths' logs.
    Trained (:func:`train_conditional_model`) by minimising KL(r || p) = -E_r[log w]
    averaged over gauge fields (flow samples or an ensemble), or the forward KL(p || r)
    from exact draws phi = D^+ eta; stored with :func:`save_conditional_model`, used with
    ``pseudofermion = "conditional"`` and ``pseudofermion_options = {checkpoint = "..."}``.

Any r gives exact schemes: the Metropolis tests use log r exactly, and the models need no
determinant of D(U) (det A is 1 or a sum of learned logs). r is gauge covariant,
r(Omega phi | U^Omega) = r(phi | U): the parameters are gauge invariant and multiply blocks
that transform covariantly. :func:`model_diagnostics` measures, on given gauge fields, the
exact forward KL and the mean and variance of log w = log p - log r for phi ~ r (-mean = the
reverse KL; the variance is the noise of a one-draw estimate of log det M).

Measured (``benchmarks/pseudofermion_models.py``: 16 configurations of 8x8 pure-gauge U(1) at
beta = 4, Wilson kappa = 0.24): reverse KL 13.1 nats and var log w = 90 for ``ilu``, 5.3 and
22 for ``eo-ilu``, 5.2 and 24 for ``conditional`` after 300 Adam steps (16 s); at kappa = 0.2:
3.9 / 11 for ``ilu``, 0.66 / 1.3 for ``eo-ilu`` and the trained model (docs/fermions.md).

Scope: operators of the hopping form (even-even and odd-odd blocks of D the identity, and
identity diagonal blocks of S: Wilson fermions with r = 1, where the hop to x + mu and back
is projected out), even extents, lattices small enough for dense matrices
(:data:`flowplug.plugins.fermion_actions.MAX_DENSE`); the convolutions need d = 2 to 4.

References:
    M. S. Albergo et al., arXiv:2106.05934, section III (pseudofermion proposals and
    conditional models); T. DeGrand & P. Rossi, Comput. Phys. Commun. 60 (1990) 211
    (even-odd preconditioning); Y. Saad, "Iterative Methods for Sparse Linear Systems"
    (2003), section 10.3 (incomplete LU); docs/fermions.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowplug.errors import CheckpointError, ConfigError, ShapeError
from flowplug.hookspecs import hookimpl
from flowplug.plugins.fermion_schemes import PseudofermionModel
from flowplug.records import PseudofermionModelSpec

__all__ = [
    "EvenOddILUModel",
    "ConditionalGaussianModel",
    "train_conditional_model",
    "model_diagnostics",
    "gaussian_covariance",
    "log_second_moment",
    "save_conditional_model",
    "load_conditional_model",
    "CHECKPOINT_FORMAT",
]

#: The ``format`` entry of a checkpoint written by :func:`save_conditional_model`.
CHECKPOINT_FORMAT = "flowplug-conditional-pseudofermion"
CHECKPOINT_VERSION = 1

_LOG_PI = math.log(math.pi)


def _plaquette_features(x: torch.Tensor) -> torch.Tensor:
    """Gauge-invariant features per site: (B, 2 P, L...) float64, P = d(d-1)/2 planes
    (cos, sin of U(1) plaquette angles; Re, Im of tr U_P / N for SU(N))."""
    from flowplug.gauge import sun_plaquettes, u1_plaquettes

    if x.is_complex():
        p = sun_plaquettes(x)
        tr = torch.diagonal(p, dim1=-2, dim2=-1).sum(-1) / x.shape[-1]  # (B, P, L...)
        return torch.cat([tr.real, tr.imag], dim=1).to(torch.float64)
    a = u1_plaquettes(x)
    return torch.cat([torch.cos(a), torch.sin(a)], dim=1).to(torch.float64)


def _even_odd(x: torch.Tensor, operator: Any, who: str) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """The dense D of the links x in even-odd order.

    Returns:
        ``(dp, perm, n_even, per_site)``: dp (B, n, n) complex128 = D[perm][:, perm] with the
        components of even sites (sum of coordinates even) first, each parity in site order;
        perm (n,) int64.

    Raises:
        ShapeError: for an odd extent or n above MAX_DENSE.
        ConfigError: when D is not of the hopping form (its even-even and odd-odd blocks are
            not the identity).
    """
    from flowplug.plugins.fermion_actions import MAX_DENSE

    lattice, _ = operator.geometry(x)
    lattice = tuple(int(v) for v in lattice)
    if any(v % 2 for v in lattice):
        raise ShapeError(f"pseudofermion model '{who}': needs even extents (even-odd split); found {list(lattice)}")
    n = operator.size(x)
    if n > MAX_DENSE:
        raise ShapeError(f"pseudofermion model '{who}': dense D has n = {n} > MAX_DENSE = {MAX_DENSE} rows")
    try:
        dense = operator.dense(x, by="blocks")
    except TypeError:
        dense = operator.dense(x)
    volume = math.prod(lattice)
    ps = n // volume
    coords = torch.stack(torch.meshgrid(*[torch.arange(v) for v in lattice], indexing="ij")).reshape(len(lattice), -1)
    parity = (coords.sum(0) % 2).repeat_interleave(ps)
    perm = torch.cat([torch.nonzero(parity == 0).flatten(), torch.nonzero(parity == 1).flatten()]).to(dense.device)
    ne = int((parity == 0).sum())
    dp = dense[:, perm][:, :, perm]
    eye = torch.eye(n, dtype=dense.dtype, device=dense.device)
    same = torch.zeros(n, n, dtype=torch.bool, device=dense.device)
    same[:ne, :ne] = True
    same[ne:, ne:] = True
    if not torch.allclose(dp * same, eye.expand_as(dp), atol=1e-12, rtol=0):
        raise ConfigError(
            f"pseudofermion model '{who}' needs an operator of the hopping form D = 1 + hops between sites of "
            f"opposite parity (as 'wilson'); {operator!r} is not"
        )
    return dp, perm, ne, ps


def _check_hopping_form(operator: Any, who: str) -> None:
    """Refuse, when the model is built (before a run creates outputs), an operator that does not
    declare the hopping form D = 1 - kappa H: it must have a ``kappa`` (the Wilson convention).
    The structure itself is checked again on the first links (:func:`_even_odd`).

    Raises:
        ConfigError: naming the operator.
    """
    if getattr(operator, "kappa", None) is None:
        raise ConfigError(
            f"pseudofermion model '{who}' needs an operator of the hopping form D = 1 - kappa H (as 'wilson'); "
            f"{operator!r} has no hopping parameter kappa (for the staggered operators use 'free' or 'white')"
        )


class EvenOddILUModel(PseudofermionModel):
    r"""Gaussian r(phi | U) = CN(0, s^2 A^+ A) with A the even-odd factorisation of D whose
    Schur complement is replaced by its incomplete LU factors: det A = 1.

    With the sites split by parity, ``D = [[1, D_eo], [D_oe, 1]] = [[1, 0], [D_oe, 1]] [[1, D_eo],
    [0, S]]`` with the Schur complement S = 1 - D_oe D_eo on the odd sites (det D = det S). The
    model keeps the exact triangular factor and replaces S by A_S = (1 + L_S)(1 + R_S), L_S and
    R_S the strictly lower and upper (site-ordered) parts of S - 1 (for Wilson fermions with
    r = 1 the diagonal blocks of S are the identity: the hop to x + mu and back is projected
    out, (1 - gamma_mu)(1 + gamma_mu) = 0). Then A = D + [[0, 0], [0, L_S R_S]] differs from D
    by a term of order kappa^4 instead of the order kappa^2 of :class:`~flowplug.plugins.
    fermion_schemes.ILUModel`, and det A = det A_S = 1, so log r needs no determinant of D(U).

    On 8x8 U(1) gauge fields at beta = 4 (``benchmarks/pseudofermion_models.py``,
    docs/fermions.md) the reverse KL(r || p) falls from 13.1 (``ilu``) to 5.3 nats at
    kappa = 0.24 and from 3.9 to 0.66 at kappa = 0.2.

    Arguments:
        operator: The Dirac operator, of the hopping form (even-even and odd-odd blocks of D
            the identity; ``dense``, ``geometry``, ``spinor_shape``, ``size``).
        scale: Width s (> 0).

    Shapes: as :class:`~flowplug.plugins.fermion_schemes.PseudofermionModel`; dense matrices
    (n <= MAX_DENSE), O(n^3) per configuration for ``log_prob``, O(n^2) for ``sample``
    after the O(n^3) product D_oe D_eo.

    Raises:
        ConfigError: for scale <= 0, an operator not of the hopping form, or diagonal blocks
            of S that are not the identity; ShapeError for odd extents or large lattices.

    References:
        arXiv:2106.05934, section III (pseudofermion proposals); T. DeGrand & P. Rossi, Comput.
        Phys. Commun. 60 (1990) 211 (even-odd preconditioning); Saad (2003), section 10.3.
    """

    name = "eo-ilu"

    def __init__(self, operator: Any, *, scale: float = 1.0) -> None:
        if not float(scale) > 0:
            raise ConfigError(f"pseudofermion model '{self.name}': scale must be > 0; found {scale}")
        _check_hopping_form(operator, self.name)
        self.operator = operator
        self.scale = float(scale)

    def _schur_factors(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """``(dp, perm, lo, up, site, n_even)``: D in even-odd order, the unit lower/upper ILU
        factors of the Schur complement (B, n_odd, n_odd), the odd components' site index."""
        dp, perm, ne, ps = _even_odd(x, self.operator, self.name)
        n = dp.shape[-1]
        schur = torch.eye(n - ne, dtype=dp.dtype, device=dp.device) - dp[:, ne:, :ne] @ dp[:, :ne, ne:]
        site = perm[ne:] // ps
        same = site[:, None] == site[None, :]
        eye = torch.eye(n - ne, dtype=dp.dtype, device=dp.device)
        if not torch.allclose(schur * same, eye.expand_as(schur), atol=1e-10, rtol=0):
            raise ConfigError(
                f"pseudofermion model '{self.name}': the Schur complement 1 - D_oe D_eo of {self.operator!r} has "
                "diagonal blocks other than the identity (Wilson fermions with r = 1 have none)"
            )
        off = schur - eye
        lo = eye + off * (site[:, None] > site[None, :])
        up = eye + off * (site[:, None] < site[None, :])
        return dp, perm, lo, up, site, ne

    def matrix(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, log det A)``: A (B, n, n) complex128 in the operator's ordering, log det A (B,)
        float64 (0 here)."""
        dp, perm, lo, up, _, ne = self._schur_factors(x)
        return self._assemble(dp, perm, lo @ up, ne), torch.zeros(dp.shape[0], dtype=torch.float64, device=dp.device)

    @staticmethod
    def _assemble(dp: torch.Tensor, perm: torch.Tensor, a_s: torch.Tensor, ne: int) -> torch.Tensor:
        d_eo, d_oe = dp[:, :ne, ne:], dp[:, ne:, :ne]
        top = torch.cat([dp[:, :ne, :ne], d_eo], dim=2)
        bottom = torch.cat([d_oe, d_oe @ d_eo + a_s], dim=2)
        a = torch.cat([top, bottom], dim=1)
        inv = torch.argsort(perm)
        return a[:, inv][:, :, inv]

    def _log_scale(self) -> torch.Tensor | float:
        return math.log(self.scale)

    def covariance(self, x: torch.Tensor) -> torch.Tensor:
        """C = s^2 A^+ A, (B, n, n) complex128 (no gradients)."""
        with torch.no_grad():
            a, _ = self.matrix(x)
            return torch.exp(2.0 * torch.as_tensor(self._log_scale(), dtype=torch.float64)) * (a.mH @ a)

    def sample(
        self, x: torch.Tensor, k: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """phi = s A^+ chi: (B, k, L..., s[, N]) complex128 and log r (B, k) float64."""
        shape = self.operator.spinor_shape(x)
        n = math.prod(shape[1:])
        chi = torch.randn((shape[0], int(k), n), generator=generator, dtype=torch.complex128, device=x.device)
        with torch.no_grad():
            a, logdet_a = self.matrix(x)
            ls = torch.as_tensor(self._log_scale(), dtype=torch.float64)
            phi = torch.exp(ls) * (a.mH @ chi.transpose(1, 2)).transpose(1, 2)
            norm = (chi.real**2 + chi.imag**2).sum(-1).to(torch.float64)
            log_r = -norm - n * (_LOG_PI + 2.0 * ls) - 2.0 * logdet_a[:, None]
        return phi.reshape(shape[0], int(k), *shape[1:]), log_r

    def log_prob(self, x: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
        """log r(phi | U), (B, k) float64 (a dense solve with A^+)."""
        bsz, k = phi.shape[0], phi.shape[1]
        n = self.operator.size(x)
        with torch.no_grad():
            a, logdet_a = self.matrix(x)
            ls = torch.as_tensor(self._log_scale(), dtype=torch.float64)
            y = torch.linalg.solve(a.mH, phi.reshape(bsz, k, n).transpose(1, 2)) / torch.exp(ls)
            quad = (y.real**2 + y.imag**2).sum(1).to(torch.float64)
            return -quad - n * (_LOG_PI + 2.0 * ls) - 2.0 * logdet_a[:, None]


class ConditionalGaussianModel(nn.Module, EvenOddILUModel):
    r"""Learned gauge-covariant Gaussian pseudofermion model r_theta(phi | U) (module docstring).

    The :class:`EvenOddILUModel` with learned parameters: the ILU factors of the Schur
    complement get a width per odd site, A_S = (1 + L_S) diag(delta) (1 + R_S) with
    delta(x) = exp l(x), and the rows of L_S and R_S of site x are multiplied by complex
    coefficients c_L(x), c_R(x); l, c_L - 1 and c_R - 1 are the outputs of a periodic
    convolutional network of the plaquettes around x (zero for an untrained model, which is
    ``eo-ilu``). log det A = sum_x (components per site) l(x) stays tractable, the
    coefficients are gauge invariant and the blocks they multiply gauge covariant, so
    r(Omega phi | U^Omega) = r(phi | U). The width s is learned too.

    Arguments:
        operator: The Dirac operator (hopping form, as for :class:`EvenOddILUModel`).
        ndim: Lattice dimension d (2 to 4).
        hidden: Channels of the hidden convolutions (default (8, 8)).
        kernel_size: Odd extent of the convolutions (default 3).
        scale: Initial width s (> 0).

    Shapes: links as for the operator; fields phi (B, k, L..., s[, N]) complex128; log r
    (B, k) float64. Parameters are float64.

    Raises:
        ConfigError: for a bad ``scale``/``ndim`` or (at use) an operator not of the hopping
            form; ShapeError for odd extents, another d or a lattice too large for dense
            matrices.

    References:
        arXiv:2106.05934, section III; DeGrand & Rossi (1990); Saad (2003), section 10.3.
    """

    name = "conditional"

    def __init__(
        self,
        operator: Any,
        ndim: int,
        *,
        hidden: Sequence[int] = (8, 8),
        kernel_size: int = 3,
        scale: float = 1.0,
    ) -> None:
        nn.Module.__init__(self)
        from flowplug.plugins.flow_nets import ConvNet

        _check_hopping_form(operator, "conditional")

        if not float(scale) > 0:
            raise ConfigError(f"pseudofermion model 'conditional': scale must be > 0; found {scale}")
        self.ndim = int(ndim)
        if not 2 <= self.ndim <= 4:
            raise ConfigError(f"pseudofermion model 'conditional': d must be 2, 3 or 4; found {ndim}")
        self.operator = operator
        self.hidden = tuple(int(h) for h in hidden)
        self.kernel_size = int(kernel_size)
        planes = self.ndim * (self.ndim - 1) // 2
        # outputs per site: log width l, Re and Im of c_L - 1 and of c_R - 1
        self.net = ConvNet(2 * planes, 5, self.hidden, self.kernel_size, self.ndim, torch.float64, 0.0)
        self.log_scale = nn.Parameter(torch.tensor(math.log(float(scale)), dtype=torch.float64))
        self.trained_kappa: float | None = None

    def extra_repr(self) -> str:
        return f"operator={self.operator!r}, ndim={self.ndim}, hidden={self.hidden}, kernel_size={self.kernel_size}"

    def _log_scale(self) -> torch.Tensor:
        return self.log_scale

    def site_parameters(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(l, c_L, c_R)`` per site, each (B, V): l float64, c complex128 (flattened lattice)."""
        lattice, _ = self.operator.geometry(x)
        if len(lattice) != self.ndim:
            raise ShapeError(f"pseudofermion model 'conditional': built for d = {self.ndim}; found {list(lattice)}")
        if self.log_scale.device != x.device:  # a model read from its file (on the CPU) follows the links
            self.to(x.device)
        out = self.net(_plaquette_features(x)).to(torch.float64).flatten(2)  # (B, 5, V)
        return out[:, 0], torch.complex(1.0 + out[:, 1], out[:, 2]), torch.complex(1.0 + out[:, 3], out[:, 4])

    def matrix(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, log det A)``: (B, n, n) complex128 (differentiable in the parameters) and (B,) float64."""
        dp, perm, lo, up, site, ne = self._schur_factors(x)
        logw, c_l, c_r = self.site_parameters(x)
        eye = torch.eye(lo.shape[-1], dtype=lo.dtype, device=lo.device)
        lo = eye + (lo - eye) * c_l[:, site][:, :, None]
        up = eye + (up - eye) * c_r[:, site][:, :, None]
        delta = torch.exp(logw[:, site])  # (B, n_odd)
        a_s = (lo * delta[:, None, :].to(lo.dtype)) @ up
        return self._assemble(dp, perm, a_s, ne), torch.log(delta).sum(-1)

    def reverse_kl_loss(self, x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
        r"""E_chi[phi^+ M^{-1} phi] - 2 n log s - 2 log det A for phi = s A^+ chi, per
        configuration: (B,) float64 with gradients (reparameterised draws of r), the reverse
        KL(r(. | U) || p(. | U)) up to a theta-independent constant (loss = KL + n - log det M);
        M^{-1} dense.

        Arguments:
            x: Gauge fields (B, ...).
            k: Draws of r per configuration.
            generator: Random generator for chi.
        """
        shape = self.operator.spinor_shape(x)
        n = math.prod(shape[1:])
        with torch.no_grad():
            dense = self.operator.dense(x, by="blocks") if _takes_by(self.operator) else self.operator.dense(x)
            minv = torch.linalg.inv(dense.mH @ dense)
        chi = torch.randn((shape[0], int(k), n), generator=generator, dtype=torch.complex128, device=x.device)
        a, logdet_a = self.matrix(x)
        phi = torch.exp(self.log_scale) * (a.mH @ chi.transpose(1, 2))  # (B, n, k)
        quad = torch.einsum("bik,bij,bjk->bk", phi.conj(), minv, phi).real
        return quad.mean(-1) - 2.0 * n * self.log_scale - 2.0 * logdet_a

    def forward_kl_loss(self, x: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
        r"""E_eta[|A^{-+} D^+ eta|^2 / s^2] + 2 n log s + 2 log det A per configuration, (B,)
        float64 with gradients: the forward KL(p(. | U) || r(. | U)) up to the theta-independent
        n + log det M (exact draws phi = D^+ eta of p(phi | U)).
        """
        shape = self.operator.spinor_shape(x)
        n = math.prod(shape[1:])
        eta = torch.randn((shape[0], int(k), n), generator=generator, dtype=torch.complex128, device=x.device)
        with torch.no_grad():
            phi = self.operator.apply_dagger(x, eta.reshape(shape[0], int(k), *shape[1:])).reshape(shape[0], int(k), n)
        a, logdet_a = self.matrix(x)
        y = torch.linalg.solve(a.mH, phi.transpose(1, 2)) / torch.exp(self.log_scale)
        return (y.real**2 + y.imag**2).sum(1).mean(-1) + 2.0 * n * self.log_scale + 2.0 * logdet_a


# -------------------------------------------------------------------- training


def model_diagnostics(
    model: Any, x: torch.Tensor, *, k: int = 4, generator: torch.Generator | None = None
) -> dict[str, float | None]:
    r"""How close r(phi | U) is to p(phi | U) on the gauge fields x.

    Arguments:
        model: A pseudofermion model (``sample``/``log_prob``; any of this module or of
            :data:`flowplug.plugins.fermion_schemes.PSEUDOFERMION_MODELS`).
        x: Gauge fields (B, ...) (dense determinants: small lattices).
        k: Draws per configuration.
        generator: Random generator.

    Returns:
        ``kl_forward``: E_U KL(p || r) in nats (exact draws of p, exact log det M);
        ``kl_reverse``: E_U KL(r || p) = -``mean_log_w``;
        ``log_second_moment``: the largest over the configurations of log E_r[w^2] / E_r[w]^2
        (:func:`log_second_moment`; +inf where the weights' variance is infinite; None for a
        model that is not Gaussian), and ``log_second_moment_median`` its median;
        ``var_log_w``: variance over U and draws of log w = log[exp(-phi^+ M^{-1} phi) / (pi^n r)]
        - log det M for phi ~ r, the noise of a one-draw pseudo-marginal estimate of log det M;
        ``mean_log_w``: its mean (<= 0, Jensen).
    """
    operator = model.operator
    with torch.no_grad():
        dense = operator.dense(x, by="blocks") if _takes_by(operator) else operator.dense(x)
        logdet_m = 2.0 * torch.linalg.slogdet(dense)[1].to(torch.float64)  # (B,)
        minv = torch.linalg.inv(dense.mH @ dense)
        shape = operator.spinor_shape(x)
        n = math.prod(shape[1:])
        bsz = shape[0]
        eta = torch.randn((bsz, int(k), *shape[1:]), generator=generator, dtype=torch.complex128, device=x.device)
        phi_p = operator.apply_dagger(x, eta)
        log_p = -(eta.real**2 + eta.imag**2).flatten(2).sum(-1) - logdet_m[:, None] - n * _LOG_PI
        kl = (log_p - model.log_prob(x, phi_p)).mean()
        phi_r, log_r = model.sample(x, int(k), generator)
        flat = phi_r.reshape(bsz, int(k), n)
        quad = torch.einsum("bki,bij,bkj->bk", flat.conj(), minv, flat).real.to(torch.float64)
        log_w = -quad - n * _LOG_PI - log_r - logdet_m[:, None]
    cov = gaussian_covariance(model, x)
    second = None if cov is None else log_second_moment(cov, dense.mH @ dense)
    return {
        "log_second_moment": None if second is None else float(second.max()),
        "log_second_moment_median": None if second is None else float(second.median()),
        "kl_forward": float(kl),
        "kl_reverse": -float(log_w.mean()),
        "mean_log_w": float(log_w.mean()),
        "var_log_w": float(log_w.var()),
    }


def gaussian_covariance(model: Any, x: torch.Tensor) -> torch.Tensor | None:
    """The covariance C(U) (B, n, n) complex128 of a Gaussian pseudofermion model, or None.

    Models of this module (``covariance``), and the built-in ``ilu`` (C = s^2 D_a^+ D_a),
    ``white`` (s^2 1) and ``free`` (s^2 D_0^+ D_0) models; None for other models.
    """
    from flowplug.plugins.fermion_schemes import FreeFieldModel, ILUModel, WhiteNoiseModel, _unit_links

    with torch.no_grad():
        if callable(getattr(model, "covariance", None)):
            return model.covariance(x)
        if isinstance(model, ILUModel):
            lo, up = model.factors(x)
            da = lo @ up
            return model.scale**2 * (da.mH @ da)
        n = model.operator.size(x) if hasattr(model, "operator") else 0
        if isinstance(model, WhiteNoiseModel):
            eye = torch.eye(n, dtype=torch.complex128, device=x.device)
            return (model.scale**2 * eye).expand(x.shape[0], n, n)
        if isinstance(model, FreeFieldModel):
            d0 = model.operator.dense(_unit_links(x))
            return model.scale**2 * (d0.mH @ d0)
    return None


def log_second_moment(covariance: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    r"""log E_r[w^2] / E_r[w]^2 for w = p / r, p = CN(0, M), r = CN(0, C): (B,) float64.

    = log det C - log det(2 M^{-1} - C^{-1}) - 2 log det M, +inf unless 2 M^{-1} - C^{-1} is
    positive definite (C > M / 2): the relative variance of a one-draw importance-sampling
    estimate of det M, which the pseudo-marginal scheme needs finite.

    Arguments:
        covariance: C (B, n, n) complex128, Hermitian positive definite.
        m: M = D^+ D (B, n, n) complex128.
    """
    minv = torch.linalg.inv(m)
    cinv = torch.linalg.inv(covariance)
    k = 2.0 * minv - cinv
    k = 0.5 * (k + k.mH)
    chol, info = torch.linalg.cholesky_ex(k)
    logdet_k = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1).real).sum(-1)
    out = torch.linalg.slogdet(covariance)[1] - logdet_k - 2.0 * torch.linalg.slogdet(m)[1]
    return torch.where(info == 0, out.to(torch.float64), torch.full_like(out, math.inf, dtype=torch.float64))


def _takes_by(operator: Any) -> bool:
    import inspect

    try:
        return "by" in inspect.signature(operator.dense).parameters
    except (TypeError, ValueError):
        return False


def train_conditional_model(
    model: ConditionalGaussianModel,
    configurations: torch.Tensor | Callable[[int, torch.Generator], torch.Tensor],
    *,
    steps: int = 200,
    batch_size: int = 16,
    k: int = 2,
    lr: float = 1e-2,
    seed: int = 0,
    objective: str = "reverse",
    log: Callable[[int, float], None] | None = None,
) -> list[float]:
    r"""Fit r_theta to p(phi | U) by minimising a Kullback-Leibler divergence with Adam.

    Arguments:
        model: The model to train (in place).
        configurations: Gauge fields to train on: a tensor (N, ...) from which batches are
            drawn at random, or a function ``(batch_size, generator) -> (batch_size, ...)``
            (e.g. samples of the gauge flow the scheme will use).
        steps, batch_size, lr: Adam steps, configurations per step, learning rate.
        k: Exact pseudofermion draws per configuration and step.
        seed: Seed of the batches and draws.
        objective: ``"reverse"`` (default): KL(r || p) = -E_r[log w], the quantity that sets
            the noise of the pseudo-marginal estimate and the joint scheme's acceptance
            (reparameterised draws of r, dense M^{-1}); ``"forward"``: KL(p || r) from exact
            draws of p (module docstring), which makes r wider than p.
        log: Called as ``log(step, loss)`` after every step.

    Returns:
        The loss per step: the chosen KL averaged over the batch, up to a theta-independent
        constant (``reverse``: KL + n - log det M; ``forward``: KL + n + log det M).

    Raises:
        ConfigError: for steps, batch_size or k < 1, lr <= 0 or another objective; FloatingPointError if the loss
            becomes non-finite.
    """
    if min(int(steps), int(batch_size), int(k)) < 1 or not float(lr) > 0:
        raise ConfigError(
            f"train_conditional_model: need steps, batch_size, k >= 1 and lr > 0; "
            f"found {steps}, {batch_size}, {k}, {lr}"
        )
    if objective not in ("reverse", "forward"):
        raise ConfigError(f"train_conditional_model: objective must be 'reverse' or 'forward'; found {objective!r}")
    loss_fn = model.reverse_kl_loss if objective == "reverse" else model.forward_kl_loss
    g = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.Adam(model.parameters(), lr=float(lr))
    losses: list[float] = []
    for step in range(int(steps)):
        if callable(configurations):
            x = configurations(int(batch_size), g).detach()
        else:
            idx = torch.randint(configurations.shape[0], (int(batch_size),), generator=g)
            x = configurations[idx]
        loss = loss_fn(x, int(k), g).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train_conditional_model: non-finite loss at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if log is not None:
            log(step, losses[-1])
    return losses


# ------------------------------------------------------------------ checkpoints


def save_conditional_model(model: ConditionalGaussianModel, path: str | Path, metadata: dict | None = None) -> Path:
    """Write the model's architecture, its operator's parameters and its weights atomically.

    The file holds only tensors and plain Python values (read with
    ``torch.load(weights_only=True)`` by :func:`load_conditional_model`).

    Returns:
        The path written.
    """
    from flowplug.fsutil import atomic_path

    op = model.operator
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": {
            "ndim": model.ndim,
            "hidden": list(model.hidden),
            "kernel_size": model.kernel_size,
            "operator": getattr(op, "name", type(op).__name__),
            "kappa": getattr(op, "kappa", None),
        },
        "metadata": dict(metadata or {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_conditional_model(operator: Any, path: str | Path) -> ConditionalGaussianModel:
    """Read a model written by :func:`save_conditional_model` for ``operator``.

    A model trained at another hopping parameter is still an exact proposal density: it is a
    normalised Gaussian r(phi | U) whose log r the Metropolis tests of the schemes use exactly
    (:mod:`flowplug.plugins.fermion_schemes`), built on the operator it is given, so the
    chains stay exact and only its closeness to p(phi | U), hence the acceptance and the noise
    of the determinant estimate, suffers. It is therefore used, with a
    :class:`~flowplug.errors.CouplingMismatchWarning` naming both hopping parameters; its
    ``trained_kappa`` attribute says where it was trained.

    Warns:
        CouplingMismatchWarning: if the model was trained at a hopping parameter other than
            ``operator.kappa`` (relative difference above 1e-12).

    Raises:
        CheckpointError: if the file is missing, unreadable, of another format or version, or
            its weights do not fit the architecture it states.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no such conditional pseudofermion model (write one with save_conditional_model)"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file is reported the same way
        raise CheckpointError(f"{path}: cannot be read as a conditional pseudofermion model: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path}: expected format {CHECKPOINT_FORMAT!r}; found {found!r}")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: expected version {CHECKPOINT_VERSION}; found {payload.get('version')!r}")
    cfg = payload.get("config")
    if not isinstance(cfg, dict) or "state_dict" not in payload:
        raise CheckpointError(f"{path}: conditional pseudofermion model lacks 'config' or 'state_dict'")
    model = ConditionalGaussianModel(
        operator, int(cfg["ndim"]), hidden=tuple(cfg["hidden"]), kernel_size=int(cfg["kernel_size"])
    )
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the stated architecture: {exc}") from None
    model.trained_kappa = cfg.get("kappa")
    _warn_other_kappa(model, path)
    return model


def _warn_other_kappa(model: ConditionalGaussianModel, path: Path) -> None:
    """Warn when a model is used at a hopping parameter other than the one it was trained at."""
    import warnings

    from flowplug.errors import CouplingMismatchWarning

    trained, used = model.trained_kappa, getattr(model.operator, "kappa", None)
    if trained is None or used is None or math.isclose(float(trained), float(used), rel_tol=1e-12, abs_tol=0.0):
        return
    warnings.warn(
        f"pseudofermion model 'conditional' ({path}) was trained at kappa = {float(trained):g} and is used at "
        f"kappa = {float(used):g}: the chains stay exact (the model is a normalised proposal density whose "
        "log r enters the Metropolis tests exactly), but it proposes the pseudofermions of the other kappa: "
        "expect a lower acceptance and a noisier determinant estimate; train a model at this kappa "
        "(train_conditional_model)",
        CouplingMismatchWarning,
        stacklevel=3,
    )


def _conditional(operator: Any, *, checkpoint: str | None = None) -> ConditionalGaussianModel:
    """Registry factory of ``conditional``: the trained model stored in ``checkpoint``.

    Raises:
        ConfigError: without a checkpoint (an untrained model is ``eo-ilu``).
        CheckpointError: as :func:`load_conditional_model`.
    """
    if not checkpoint:
        raise ConfigError(
            "pseudofermion model 'conditional' is a trained model: give its file "
            '(pseudofermion_options = {checkpoint = "model.pt"}, written by save_conditional_model after '
            "train_conditional_model); untrained it equals 'eo-ilu'"
        )
    return load_conditional_model(operator, checkpoint)


@hookimpl
def flowplug_pseudofermion_models() -> list[PseudofermionModelSpec]:
    """The pseudofermion models ``eo-ilu`` and ``conditional`` (trained)."""
    return [
        PseudofermionModelSpec(
            name="eo-ilu",
            description="Gaussian: even-odd factorisation of D with the ILU of its Schur complement, det 1",
            factory=EvenOddILUModel,
            parameters=("scale",),
        ),
        PseudofermionModelSpec(
            name="conditional",
            description="trained gauge-covariant Gaussian on the eo-ilu structure (2106.05934 sec. III)",
            factory=_conditional,
            parameters=("checkpoint",),
        ),
    ]
