r"""Trainable generalised-leapfrog kernel ``l2hmc`` for 2D U(1) gauge theory (hook ``flowplug_kernels``).

L2HMC (Levy, Hoffman, Sohl-Dickstein) replaces the leapfrog steps of HMC by steps whose
momentum kicks and link drifts are rescaled and shifted by neural networks, and keeps the
chain exact with a Metropolis-Hastings test that includes the log-Jacobian of the map.
Foreman, Jin and Osborn applied it to 2D U(1) gauge theory with one distinct set of networks
per leapfrog step and updates of the links in two complementary halves. This module builds
that scheme on flowplug's conventions: link angles theta of shape (B, 2, L0, L1), float64,
in (-pi, pi]; the action's force F = -dS/dtheta (:mod:`flowplug.theory`); momenta v with
kinetic energy (1/2) sum v^2.

One leapfrog step k with step size eps_k (trainable, initially tau / n) is, for d = +1:

* momentum half step (networks fed zeta_v = (cos theta, sin theta, F(theta))):
  v <- v exp(eps/2 s_v) + eps/2 (F exp(eps q_v) + t_v);
  log J += sum eps/2 s_v;
* link update of the links of even sites (mask m = 1 where x0 + x1 is even), networks fed
  zeta_x = (m' cos theta, m' sin theta, m, v) with m' = 1 - m (only the frozen links and the
  momenta, which this update leaves unchanged, so the Jacobian is triangular):
  theta <- m' theta + m [g(theta; eps s_x) + eps (v exp(eps q_x) + t_x)];
  log J += sum m log g'(theta; eps s_x);
* the same for the links of odd sites (mask m'), with its own networks;
* a second momentum half step with its own networks.

For d = -1 the kernel applies the exact inverse: the sub-steps in the opposite order, each
undone with the same network outputs (which depend only on quantities that sub-step did
not change), so L_{-1} = L_{+1}^{-1} and log J_{-1}(L_{+1}(xi)) = -log J_{+1}(xi).

The link rescaling. The papers write the drift as theta exp(eps s_x) + ...; for angles
that map does not take the circle onto itself (it is not defined modulo 2 pi), so an exact
kernel cannot use it as written. Here the rescaling is the circle diffeomorphism
g(theta; a) = 2 atan(e^a tan(theta / 2)), which fixes 0 and pi, equals theta e^a to first
order at theta = 0, has inverse g(.; -a) and derivative
g'(theta; a) = 1 / (e^{-a} cos^2(theta/2) + e^{a} sin^2(theta/2)); a = 0 is the identity.

Proposal and test (Levy et al., section 3): draw v ~ N(0, 1) and d = +-1 with probability
1/2 each, map (theta, v) -> (theta', v') = L_d(theta, v) with log J, and accept with
probability min(1, exp(-[H(theta', v') - H(theta, v)] + log J)), H = S(theta) + (1/2) sum v^2,
all in float64 (:mod:`flowplug.metropolis`). Since (theta, v, d) -> (L_d(theta, v), -d) is an
involution whose Jacobian determinant is exp(log J), the chain leaves exp(-S) invariant
whatever the networks are. Networks whose outputs are all zero (the state after
construction: the last layer of every network starts at zero) give exactly leapfrog HMC
with n steps of size tau / n.

Training (:func:`train_l2hmc`) maximises the expected squared change of the topological
charge, weighted by the acceptance probability, E[A(xi'|xi) dQ^2], with the differentiable
charge Q_sin = (1/2 pi) sum_x sin theta_P(x) (Foreman et al., section 3), optionally plus
a term for the change of the plaquettes.

References:
    Levy, Hoffman, Sohl-Dickstein, "Generalizing Hamiltonian Monte Carlo with neural
    networks", arXiv:1711.09268, sections 2-3 (augmented leapfrog, direction variable,
    log-Jacobian, expected-squared-jump loss);
    Foreman, Jin, Osborn, "Deep learning Hamiltonian Monte Carlo", arXiv:2105.03418,
    sections 2-3, eqs. (1)-(2) (distinct networks per leapfrog layer, masked link updates,
    loss with the charge difference);
    Neklyudov, Welling, Egorov, Vetrov, arXiv:2006.09316 (involutive MCMC);
    Duane, Kennedy, Pendleton, Roweth, Phys. Lett. B 195 (1987) 216 (HMC).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flowplug.chain import ChainState, Kernel
from flowplug.errors import CheckpointError, ConfigError
from flowplug.groups import wrap_angle
from flowplug.hookspecs import hookimpl
from flowplug.metropolis import guarded_log_accept, hmc_log_accept, metropolis_test
from flowplug.records import KernelSpec

__all__ = [
    "L2HMC",
    "L2HMCNetworks",
    "circle_scale",
    "sin_charge",
    "train_l2hmc",
    "save_l2hmc",
    "load_l2hmc",
    "CHECKPOINT_FORMAT",
]

#: ``format`` entry of an L2HMC checkpoint file.
CHECKPOINT_FORMAT = "flowplug-l2hmc"
CHECKPOINT_VERSION = 1

_F64 = torch.float64


def circle_scale(theta: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The circle map g(theta; a) = 2 atan(e^a tan(theta/2)) and log g'(theta; a), elementwise.

    A diffeomorphism of the circle for every real a (well defined modulo 2 pi), with
    inverse g(.; -a); it fixes 0 and pi and is theta e^a to first order at theta = 0.

    Arguments:
        theta: Angles, any shape, float64 (any real value; the result is in (-2 pi, 2 pi]).
        a: Log scale factors, broadcastable to ``theta``.

    Returns:
        ``(g, log_derivative)``, each of the shape of ``theta``;
        log g' = -log(e^{-a} cos^2(theta/2) + e^{a} sin^2(theta/2)).

    References:
        The rescaling of the link drift of arXiv:2105.03418, eq. (2), made periodic (module
        docstring).
    """
    h = 0.5 * theta
    c, s = torch.cos(h), torch.sin(h)
    half = torch.exp(0.5 * a)
    g = 2.0 * torch.atan2(half * s, c / half)
    log_d = -torch.log(torch.exp(-a) * c * c + torch.exp(a) * s * s)
    return g, log_d


def sin_charge(theta: torch.Tensor) -> torch.Tensor:
    r"""Differentiable topological charge Q_sin = (1/2 pi) sum_x sin theta_P(x) of 2D U(1) links.

    Arguments:
        theta: Link angles, shape (B, 2, L0, L1), float64.

    Returns:
        (B,) float64. Not an integer; it tends to the geometric charge on smooth fields.

    References:
        Foreman, Jin, Osborn, arXiv:2105.03418, section 3 (Q_R used in the loss).
    """
    return torch.sin(_plaquette_angles(theta)).flatten(1).sum(1) / (2 * math.pi)


def _plaquette_angles(theta: torch.Tensor) -> torch.Tensor:
    """theta_0(x) + theta_1(x + 0) - theta_0(x + 1) - theta_1(x), shape (B, L0, L1), unwrapped."""
    t0, t1 = theta[:, 0], theta[:, 1]
    return t0 + torch.roll(t1, -1, dims=1) - torch.roll(t0, -1, dims=2) - t1


def _even_mask(lattice: tuple[int, int], device: Any) -> torch.Tensor:
    """(1, 2, L0, L1) float64: 1 on both links of sites with x0 + x1 even."""
    i = torch.arange(lattice[0], device=device).view(-1, 1)
    j = torch.arange(lattice[1], device=device).view(1, -1)
    even = ((i + j) % 2 == 0).to(_F64)
    return even.expand(2, -1, -1).unsqueeze(0).contiguous()


class _ConvNet(nn.Module):
    """Translation-equivariant CNN (circular padding) returning (s, t, q), each (B, 2, L0, L1).

    s = c_s tanh(raw_s), q = c_q tanh(raw_q) (bounded, so exp(eps s) cannot overflow),
    t = raw_t; c_s, c_q trainable per output channel. The last layer starts at zero.
    """

    def __init__(self, c_in: int, hidden: int, layers: int, kernel_size: int) -> None:
        super().__init__()
        pad = kernel_size // 2
        convs: list[nn.Module] = []
        c = c_in
        for _ in range(layers):
            convs.append(nn.Conv2d(c, hidden, kernel_size, padding=pad, padding_mode="circular", dtype=_F64))
            c = hidden
        self.hidden = nn.ModuleList(convs)
        self.out = nn.Conv2d(c, 6, kernel_size, padding=pad, padding_mode="circular", dtype=_F64)
        nn.init.zeros_(self.out.weight)
        if self.out.bias is not None:
            nn.init.zeros_(self.out.bias)
        self.coef_s = nn.Parameter(torch.ones(1, 2, 1, 1, dtype=_F64))
        self.coef_q = nn.Parameter(torch.ones(1, 2, 1, 1, dtype=_F64))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        for conv in self.hidden:
            z = nn.functional.silu(conv(z))
        o = self.out(z)
        s, t, q = o[:, 0:2], o[:, 2:4], o[:, 4:6]
        return self.coef_s * torch.tanh(s), t, self.coef_q * torch.tanh(q)


class L2HMCNetworks(nn.Module):
    r"""The trainable parts of an :class:`L2HMC` kernel: networks and step sizes.

    Per leapfrog step k: two momentum networks (first and second half kick, input channels
    cos theta, sin theta, F: 6) and two link networks (even and odd sites, input channels
    masked cos theta, masked sin theta, mask, v: 7); each a :class:`torch.nn.Conv2d` stack
    with circular padding, float64, whose weights do not depend on the lattice size.

    Arguments:
        steps: Leapfrog steps n (>= 1).
        trajectory_length: Initial tau; the step sizes start at tau / n.
        hidden: Channels of the hidden layers (>= 1).
        layers: Hidden layers per network (>= 1).
        kernel_size: Odd convolution size (>= 1).

    Attributes:
        log_eps: (n,) float64 parameter, log of the step size of each leapfrog step.

    Raises:
        ConfigError: for values out of range.
    """

    def __init__(self, steps: int, trajectory_length: float, hidden: int, layers: int, kernel_size: int) -> None:
        super().__init__()
        if int(steps) < 1:
            raise ConfigError(f"l2hmc: steps must be >= 1; found {steps}")
        if not float(trajectory_length) > 0:
            raise ConfigError(f"l2hmc: trajectory_length must be > 0; found {trajectory_length}")
        if int(hidden) < 1 or int(layers) < 1:
            raise ConfigError(f"l2hmc: hidden and layers must be >= 1; found hidden={hidden}, layers={layers}")
        if int(kernel_size) < 1 or int(kernel_size) % 2 == 0:
            raise ConfigError(f"l2hmc: kernel_size must be odd and >= 1; found {kernel_size}")
        self.steps, self.hidden_channels, self.layers = int(steps), int(hidden), int(layers)
        self.kernel_size, self.trajectory_length = int(kernel_size), float(trajectory_length)
        n = self.steps
        self.v_nets = nn.ModuleList(
            [_ConvNet(6, self.hidden_channels, self.layers, self.kernel_size) for _ in range(2 * n)]
        )
        self.x_nets = nn.ModuleList(
            [_ConvNet(7, self.hidden_channels, self.layers, self.kernel_size) for _ in range(2 * n)]
        )
        self.log_eps = nn.Parameter(torch.full((n,), math.log(self.trajectory_length / n), dtype=_F64))

    def config(self) -> dict[str, Any]:
        """The constructor arguments (stored in checkpoints)."""
        return {
            "steps": self.steps,
            "trajectory_length": self.trajectory_length,
            "hidden": self.hidden_channels,
            "layers": self.layers,
            "kernel_size": self.kernel_size,
        }


class L2HMC(Kernel):
    r"""L2HMC kernel (trainable generalised leapfrog) for 2D U(1) gauge fields.

    The scheme, the exactness argument and the link rescaling are in the module docstring.
    A freshly built kernel (no checkpoint) is plain leapfrog HMC: train it with
    :func:`train_l2hmc`, save it with :func:`save_l2hmc`, and use it from a ``flowplug
    sample`` configuration with ``kernel.type = "l2hmc"`` and
    ``kernel.options.checkpoint = "PATH"``.

    Arguments:
        action: An action on ``u1`` fields (``field``, ``action(x) -> (B,)`` float64 and
            optionally an analytic ``force``; the registered ``wilson`` action with
            ``group = "u1"``).
        steps: Leapfrog steps n per trajectory (default 10, or the checkpoint's).
        trajectory_length: Initial tau (default 1.0, or the checkpoint's); the step sizes
            are trained afterwards, so tau = sum_k eps_k can drift from it.
        hidden, layers, kernel_size: Network size (defaults 8, 2, 3, or the checkpoint's).
        checkpoint: Path of a file written by :func:`save_l2hmc`; the architecture and the
            trained weights come from it. A value given for ``steps``, ``trajectory_length``,
            ``hidden``, ``layers`` or ``kernel_size`` must then agree with the file.

    Raises:
        ConfigError: if the action is not on ``u1`` fields (SU(N) is not supported), for
            options out of range, or options that contradict the checkpoint.
        CheckpointError: if the checkpoint cannot be read or is not an L2HMC checkpoint.

    ``step`` returns ``info`` with ``accepted`` (B,) bool, ``delta_h`` (B,) float64
    (H' - H), ``log_jacobian`` (B,) float64 and ``direction`` (B,) float64 (+1 / -1);
    <exp(-delta_h + log_jacobian)> = 1 is a test of exactness.

    References:
        arXiv:1711.09268, sections 2-3; arXiv:2105.03418, eqs. (1)-(2).
    """

    name = "l2hmc"

    def __init__(
        self,
        action: Any,
        *,
        steps: int | None = None,
        trajectory_length: float | None = None,
        hidden: int | None = None,
        layers: int | None = None,
        kernel_size: int | None = None,
        checkpoint: str | Path | None = None,
    ) -> None:
        field = getattr(action, "field", None)
        if field != "u1":
            raise ConfigError(
                f"l2hmc: supports U(1) gauge fields (field 'u1', 2D); the action acts on {field!r} fields. "
                "Use kernel 'hmc' (or 'heatbath' for SU(N) Wilson) for other field kinds"
            )
        given = {
            "steps": steps,
            "trajectory_length": trajectory_length,
            "hidden": hidden,
            "layers": layers,
            "kernel_size": kernel_size,
        }
        if checkpoint is not None:
            payload = _read_checkpoint(checkpoint)
            cfg = dict(payload["config"])
            clash = {
                k: (v, cfg[k])
                for k, v in given.items()
                if v is not None and not math.isclose(float(v), float(cfg[k]), rel_tol=1e-12)
            }
            if clash:
                detail = ", ".join(f"{k} = {v[0]} given, {v[1]} in the checkpoint" for k, v in sorted(clash.items()))
                raise ConfigError(
                    f"l2hmc: options contradict the checkpoint {checkpoint}: {detail}; "
                    "set them to the checkpoint's values (in a sample configuration kernel.hmc.steps and "
                    "kernel.hmc.trajectory_length, whose defaults 10 and 1.0 are passed on when not set; "
                    "in Python leave them out)"
                )
            self.network = L2HMCNetworks(**cfg)
            try:
                self.network.load_state_dict(payload["state_dict"])
            except (RuntimeError, KeyError, TypeError) as exc:
                raise CheckpointError(
                    f"{checkpoint}: weights do not fit the stored architecture {cfg}: {exc}"
                ) from None
            self.checkpoint_metadata: dict[str, Any] = dict(payload.get("metadata", {}))
        else:
            defaults = {"steps": 10, "trajectory_length": 1.0, "hidden": 8, "layers": 2, "kernel_size": 3}
            cfg = {k: (defaults[k] if v is None else v) for k, v in given.items()}
            self.network = L2HMCNetworks(**cfg)
            self.checkpoint_metadata = {}
        self.action = action
        self._masks: dict[tuple[Any, ...], torch.Tensor] = {}

    # ------------------------------------------------------------------ pieces

    @property
    def steps(self) -> int:
        """Leapfrog steps n."""
        return self.network.steps

    @property
    def step_sizes(self) -> torch.Tensor:
        """(n,) float64: eps_k = exp(log_eps_k) (detached)."""
        return self.network.log_eps.detach().exp()

    def check(self, x: torch.Tensor) -> tuple[int, int]:
        """The lattice (L0, L1) of 2D U(1) links x.

        Raises:
            ConfigError: if x is not a real float64 tensor of shape (B, 2, L0, L1).
        """
        if x.is_complex() or x.dim() != 4 or x.shape[1] != 2:
            raise ConfigError(
                f"l2hmc: expected 2D U(1) link angles of shape (B, 2, L0, L1); found {x.dtype} {tuple(x.shape)} "
                "(SU(N) links and other dimensions are not supported)"
            )
        if x.dtype != _F64:
            raise ConfigError(f"l2hmc: link angles must be float64; found {x.dtype}")
        return int(x.shape[2]), int(x.shape[3])

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape[2:]), x.device)
        m = self._masks.get(key)
        if m is None:
            m = self._masks[key] = _even_mask((int(x.shape[2]), int(x.shape[3])), x.device)
        return m

    def force(self, x: torch.Tensor) -> torch.Tensor:
        """F = -dS/dtheta, (B, 2, L0, L1) float64 (the action's analytic force, else autograd;
        differentiable with respect to x in both cases, for training)."""
        f = getattr(self.action, "force", None)
        if f is not None:
            return f(x)
        with torch.enable_grad():
            xg = x if x.requires_grad else x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.action.action(xg).sum(), xg, create_graph=torch.is_grad_enabled())
        return -g

    def _v_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.force(x)
        return torch.cat([torch.cos(x), torch.sin(x), f], dim=1), f

    def _x_features(self, x: torch.Tensor, v: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
        return torch.cat([frozen * torch.cos(x), frozen * torch.sin(x), frozen[:, :1].expand_as(x[:, :1]), v], dim=1)

    # ------------------------------------------------------------------ the map

    def _kick(
        self, k: int, x: torch.Tensor, v: torch.Tensor, eps: torch.Tensor, inverse: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        feats, f = self._v_features(x)
        s, t, q = self.network.v_nets[k](feats)
        half = 0.5 * eps
        shift = half * (f * torch.exp(eps * q) + t)
        if not inverse:
            v = v * torch.exp(half * s) + shift
            return v, (half * s).flatten(1).sum(1)
        v = (v - shift) * torch.exp(-half * s)
        return v, -(half * s).flatten(1).sum(1)

    def _drift(
        self, k: int, x: torch.Tensor, v: torch.Tensor, eps: torch.Tensor, update: torch.Tensor, inverse: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        frozen = 1.0 - update
        s, t, q = self.network.x_nets[k](self._x_features(x, v, frozen))
        shift = eps * (v * torch.exp(eps * q) + t)
        if not inverse:
            y, log_d = circle_scale(x, eps * s)
            new = wrap_angle(y + shift)
        else:
            new, log_d = circle_scale(x - shift, -eps * s)
            new = wrap_angle(new)
        upd = update.bool().expand_as(x)
        return torch.where(upd, new, x), (update * log_d).flatten(1).sum(1)

    def forward_map(self, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """L_{+1}: n generalised leapfrog steps (module docstring).

        Arguments:
            x: Link angles (B, 2, L0, L1), float64.
            v: Momenta, same shape, float64.

        Returns:
            ``(x', v', log_jacobian)``: x' wrapped into (-pi, pi], v', and log |det dL/d(x, v)|
            of shape (B,), float64. Differentiable with respect to the network parameters.
        """
        m = self._mask(x)
        log_j = torch.zeros(x.shape[0], dtype=_F64, device=x.device)
        for k in range(self.steps):
            eps = self.network.log_eps[k].exp()
            v, lj = self._kick(2 * k, x, v, eps, False)
            log_j = log_j + lj
            x, lj = self._drift(2 * k, x, v, eps, m, False)
            log_j = log_j + lj
            x, lj = self._drift(2 * k + 1, x, v, eps, 1.0 - m, False)
            log_j = log_j + lj
            v, lj = self._kick(2 * k + 1, x, v, eps, False)
            log_j = log_j + lj
        return x, v, log_j

    def inverse_map(self, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """L_{-1} = L_{+1}^{-1}; arguments and returns as :meth:`forward_map`."""
        m = self._mask(x)
        log_j = torch.zeros(x.shape[0], dtype=_F64, device=x.device)
        for k in reversed(range(self.steps)):
            eps = self.network.log_eps[k].exp()
            v, lj = self._kick(2 * k + 1, x, v, eps, True)
            log_j = log_j + lj
            x, lj = self._drift(2 * k + 1, x, v, eps, 1.0 - m, True)
            log_j = log_j + lj
            x, lj = self._drift(2 * k, x, v, eps, m, True)
            log_j = log_j + lj
            v, lj = self._kick(2 * k, x, v, eps, True)
            log_j = log_j + lj
        return x, v, log_j

    def integrate(
        self, x: torch.Tensor, v: torch.Tensor, direction: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """L_d(x, v) chain by chain.

        Arguments:
            x, v: As for :meth:`forward_map`.
            direction: (B,) of +1 / -1 (any real dtype).

        Returns:
            ``(x', v', log_jacobian)`` as for :meth:`forward_map`.
        """
        fwd = direction > 0
        if bool(fwd.all()):
            return self.forward_map(x, v)
        if not bool(fwd.any()):
            return self.inverse_map(x, v)
        i_f, i_b = fwd.nonzero().flatten(), (~fwd).nonzero().flatten()
        xf, vf, jf = self.forward_map(x[i_f], v[i_f])
        xb, vb, jb = self.inverse_map(x[i_b], v[i_b])
        x1 = torch.empty_like(x).index_copy(0, i_f, xf).index_copy(0, i_b, xb)
        v1 = torch.empty_like(v).index_copy(0, i_f, vf).index_copy(0, i_b, vb)
        j1 = torch.empty(x.shape[0], dtype=_F64, device=x.device).index_copy(0, i_f, jf).index_copy(0, i_b, jb)
        return x1, v1, j1

    # ------------------------------------------------------------------ kernel contract

    def propose(
        self, x: torch.Tensor, log_p: torch.Tensor, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """One proposal per chain (differentiable when gradients are enabled).

        Draws v ~ N(0, 1) (float64), then d = +-1 (probability 1/2 each), applies L_d.

        Arguments:
            x: Current links (B, 2, L0, L1), float64.
            log_p: Their -S, (B,) float64.
            generator: Random generator.

        Returns:
            dict with ``x`` (proposal, wrapped), ``v0``, ``v``, ``direction`` (B,),
            ``log_jacobian``, ``action`` S(x'), ``delta_h`` = H' - H and
            ``log_accept`` = -delta_h + log_jacobian (guarded: -inf where H' or log J is
            non-finite), all (B,) float64 where scalar per chain.
        """
        self.check(x)
        v0 = torch.randn(x.shape, generator=generator, dtype=_F64, device=x.device)
        direction = 2.0 * torch.randint(0, 2, (x.shape[0],), generator=generator, device=x.device).to(_F64) - 1.0
        x1, v1, log_j = self.integrate(x, v0, direction)
        s1 = self.action.action(x1).to(_F64)
        h0 = 0.5 * (v0 * v0).flatten(1).sum(1) - log_p
        h1 = 0.5 * (v1 * v1).flatten(1).sum(1) + s1
        log_a = guarded_log_accept(hmc_log_accept(h0, h1) + log_j, log_j)
        return {
            "x": x1,
            "v0": v0,
            "v": v1,
            "direction": direction,
            "log_jacobian": log_j,
            "action": s1,
            "delta_h": h1 - h0,
            "log_accept": log_a,
        }

    def init(self, x: torch.Tensor) -> ChainState:
        """State for links x (B, 2, L0, L1), float64, with log p = -S(x).

        Raises:
            ConfigError: if x is not 2D U(1) links.
        """
        self.check(x)
        x = x.detach()
        return ChainState(x, -self.action.action(x).to(_F64))

    def step(self, state: ChainState, generator: torch.Generator | None = None) -> tuple[ChainState, dict[str, Any]]:
        """One L2HMC proposal and float64 Metropolis-Hastings test for every chain (class docstring)."""
        with torch.no_grad():
            p = self.propose(state.x, state.log_p, generator)
            accepted = metropolis_test(p["log_accept"], generator)
            new = state.moved(accepted, p["x"], -p["action"])
        return new, {
            "accepted": accepted,
            "delta_h": p["delta_h"],
            "log_jacobian": p["log_jacobian"],
            "direction": p["direction"],
        }

    def __repr__(self) -> str:
        eps = ", ".join(f"{e:.4g}" for e in self.step_sizes.tolist())
        return f"L2HMC(action={self.action!r}, steps={self.steps}, step_sizes=[{eps}])"


# ---------------------------------------------------------------------- training


def train_l2hmc(
    kernel: L2HMC,
    x: torch.Tensor,
    *,
    iterations: int = 200,
    learning_rate: float = 1e-3,
    charge_weight: float = 1.0,
    plaquette_weight: float = 0.0,
    clip: float = 10.0,
    generator: torch.Generator | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[torch.Tensor, list[dict[str, float]]]:
    r"""Train an :class:`L2HMC` kernel to move the topological charge.

    Each iteration makes one proposal per chain from the current configurations (the
    chains advance with the kernel's own Metropolis test, so training also thermalises
    them) and takes an Adam step on the loss

        loss = -charge_weight E[A dQ_sin^2] - plaquette_weight E[A (1/V) sum_x (1 - cos(theta'_P - theta_P))],

    A = min(1, exp(-dH + log J)) the acceptance probability of the proposal, dQ_sin the
    change of the differentiable charge :func:`sin_charge` (Foreman et al., section 3;
    Levy et al., section 3.2, without its reciprocal term). Gradients flow through the
    proposal, its action, its log-Jacobian and A. Exactness of the trained kernel does
    not depend on the training.

    Arguments:
        kernel: The kernel; its ``network`` is trained in place.
        x: Starting links (B, 2, L0, L1), float64 (thermalised ones train faster).
        iterations: Optimiser steps (>= 0).
        learning_rate: Adam step size (> 0).
        charge_weight, plaquette_weight: Loss weights (>= 0).
        clip: Gradient-norm clipping threshold (> 0).
        generator: Random generator for momenta, directions and the tests.
        callback: Called as ``callback(iteration, record)`` after every iteration.

    Returns:
        ``(x, history)``: the chains' final links and one record per iteration with
        ``loss``, ``acceptance``, ``dq2`` (mean A dQ_sin^2), ``tau`` (sum of step sizes).

    Raises:
        ConfigError: for bad arguments or links that are not 2D U(1).

    References:
        arXiv:2105.03418, section 3; arXiv:1711.09268, section 3.2.
    """
    if int(iterations) < 0:
        raise ConfigError(f"train_l2hmc: iterations must be >= 0; found {iterations}")
    if not learning_rate > 0 or not clip > 0:
        raise ConfigError(f"train_l2hmc: learning_rate and clip must be > 0; found {learning_rate}, {clip}")
    if charge_weight < 0 or plaquette_weight < 0:
        raise ConfigError(f"train_l2hmc: weights must be >= 0; found {charge_weight}, {plaquette_weight}")
    kernel.check(x)
    x = x.detach()
    log_p = -kernel.action.action(x).to(_F64)
    opt = torch.optim.Adam(kernel.network.parameters(), lr=float(learning_rate))
    history: list[dict[str, float]] = []
    for it in range(int(iterations)):
        p = kernel.propose(x, log_p, generator)
        acc = torch.exp(torch.clamp(p["log_accept"], max=0.0))
        acc = torch.where(torch.isfinite(p["log_accept"]), acc, torch.zeros_like(acc))
        dq2 = (sin_charge(p["x"]) - sin_charge(x)) ** 2
        dplaq = (1.0 - torch.cos(_plaquette_angles(p["x"]) - _plaquette_angles(x))).flatten(1).mean(1)
        loss = -(charge_weight * (acc * dq2).mean() + plaquette_weight * (acc * dplaq).mean())
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(kernel.network.parameters(), float(clip))
        opt.step()
        with torch.no_grad():
            accepted = metropolis_test(p["log_accept"].detach(), generator)
            x = torch.where(accepted.view(-1, 1, 1, 1), p["x"].detach(), x)
            log_p = torch.where(accepted, -p["action"].detach(), log_p)
        rec = {
            "loss": float(loss.detach()),
            "acceptance": float(accepted.to(_F64).mean()),
            "dq2": float((acc * dq2).mean().detach()),
            "tau": float(kernel.step_sizes.sum()),
        }
        history.append(rec)
        if callback is not None:
            callback(it, rec)
    return x, history


# ---------------------------------------------------------------------- checkpoints


def save_l2hmc(kernel: L2HMC, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write the kernel's architecture and weights to ``path`` atomically (``torch.save``).

    Arguments:
        kernel: The kernel.
        path: Output file.
        metadata: Plain values (numbers, strings) stored alongside, e.g. the beta and
            lattice it was trained at.

    Returns:
        The path written.
    """
    from flowplug.fsutil import atomic_path

    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": kernel.network.config(),
        "state_dict": {k: v.detach().cpu() for k, v in kernel.network.state_dict().items()},
        "metadata": dict(metadata or {}),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def _read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such L2HMC checkpoint file (write one with save_l2hmc)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file: torch raises many types
        raise CheckpointError(f"{path}: cannot be read as an L2HMC checkpoint: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path}: expected format {CHECKPOINT_FORMAT!r}; found {found!r}")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: expected version {CHECKPOINT_VERSION}; found {payload.get('version')!r}")
    if not isinstance(payload.get("config"), dict) or not isinstance(payload.get("state_dict"), dict):
        raise CheckpointError(f"{path}: L2HMC checkpoint lacks 'config' or 'state_dict'")
    return payload


def load_l2hmc(action: Any, path: str | Path) -> L2HMC:
    """An :class:`L2HMC` kernel for ``action`` with the architecture and weights of ``path``.

    Raises:
        CheckpointError: if the file is missing, unreadable or not an L2HMC checkpoint.
        ConfigError: if the action is not on U(1) fields.
    """
    return L2HMC(action, checkpoint=path)


@hookimpl
def flowplug_kernels() -> list[KernelSpec]:
    """The ``l2hmc`` kernel (2D U(1))."""
    return [
        KernelSpec(
            name="l2hmc",
            description="trainable generalised leapfrog with log-Jacobian in the test, 2D U(1) (2105.03418)",
            factory=L2HMC,
            fields=("u1",),
        )
    ]
