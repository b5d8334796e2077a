r"""The interface every lattice theory implements, and the field spaces HMC moves on.

An **action** is an object with

``field``
    the field kind it acts on (``"scalar"``, ``"u1"``, ``"su2"``, ``"su3"``, ``"su<N>"``,
    or a kind introduced by a plugin, e.g. ``"o2"``; see :mod:`flowplug.records`);
``action(x) -> (B,) float64``
    S[x] in lattice units, log p(x) = -S[x] - log Z;
``force(x)``
    the force F = -(derivative of S along the field space) (see below), same shape and
    dtype as x.

``refresh(x, generator)`` (optional)
    redraw the action's auxiliary fields (pseudofermions) for the configurations x from
    their exact conditional distribution, using ``generator``. An action with auxiliary
    fields is the action of the joint distribution p(x, phi) ~ exp(-S[x; phi]): its
    ``action`` and ``force`` use the fields drawn last. The HMC kernel calls ``refresh``
    at the start of every trajectory, before drawing the momenta (a Gibbs step for phi,
    then a trajectory for x at fixed phi), and recomputes S there; kernels that do not
    call it cannot use such an action. Nothing else of the auxiliary fields is part of
    the chain state, so checkpoints and resumes need no change.

:class:`Action` is a convenient base class: it supplies ``force`` by automatic
differentiation (subclasses override it with an analytic force), ``cold_start``,
``hot_start``, ``log_prob`` and shape checks. Third-party actions need not derive
from it; the HMC kernel only uses ``field``, ``action`` and (if present) ``force`` and
``refresh``.

Field spaces and the force convention
-------------------------------------
Each field kind lives on a manifold described by a :class:`FieldSpace`. Field kinds come
from plugins (hook ``flowplug_field_kinds``, records
:class:`flowplug.records.FieldKindSpec`); :func:`field_space` finds the record of a kind
and builds its space. The built-in kinds (:mod:`flowplug.plugins.fields`) use the classes
of this module, which a plugin may reuse or subclass:

* ``scalar`` (:class:`EuclideanSpace`): phi in R^n; momenta p in R^n, kinetic energy
  (1/2) sum p^2; update phi <- phi + eps p; force F = -dS/dphi.
* ``u1`` and ``o2`` (:class:`AngleSpace`): angles theta, the same as ``scalar`` with the
  result wrapped into (-pi, pi]; force F = -dS/dtheta.
* ``su<N>`` (:class:`SUNSpace`): links U in SU(N); momenta P in su(N) (traceless
  anti-Hermitian), P = sum_a p_a t_a with t_a = i lambda_a / 2, tr(t_a t_b) = -delta_ab/2,
  p_a ~ N(0, 1); kinetic energy -tr(P^2) = (1/2) sum_a p_a^2; update U <- exp(eps P) U;
  force F = -sum_a (d/ds S[exp(s t_a) U] at s = 0) t_a, an element of su(N). Equivalently,
  for every X in su(N): d/ds S[exp(s X) U] at s=0 equals +2 Re tr(X F) (summed over
  links). The sign is plus although F = -grad S because tr(t_a t_b) = -delta_ab/2 is
  negative definite: with X = sum_a x_a t_a, 2 Re tr(X F) = sum_a x_a dS/ds_a. In particular
  d/ds S[exp(s F) U] = 2 tr(F^2) <= 0: a step along F lowers S. Both the analytic Wilson
  force and :meth:`SUNSpace.autograd_force` are checked against finite differences in
  tests/test_force_convention.py.

With these conventions the equations of motion are dx/dt = p (resp. dU/dt = P U) and
dp/dt = F for every kind, which is what :mod:`flowplug.plugins.hmc` integrates. (The sign
is the physical one, F = -grad S, as in the example XY plugin.)

References:
    Duane, Kennedy, Pendleton, Roweth, Phys. Lett. B 195 (1987) 216 (HMC);
    Gattringer & Lang, "Quantum Chromodynamics on the Lattice" (2010), section 8.2
    (molecular dynamics on SU(N)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch

from flowplug import groups
from flowplug.errors import ConfigError, FlowplugError, PluginError, ShapeError, UnknownFieldKindError

if TYPE_CHECKING:
    from flowplug.records import FieldKindSpec
    from flowplug.registry import FieldKindRegistry

# ---------------------------------------------------------------------- field spaces


class FieldSpace:
    """The manifold of one field kind: shapes, momenta, kinetic energy and updates.

    Subclasses: :class:`EuclideanSpace`, :class:`AngleSpace`, :class:`SUNSpace`. Get one
    with :func:`field_space`.

    Attributes:
        kind: The field kind (``"scalar"``, ``"u1"``, ``"su3"``...).
        dtype: Canonical dtype of the field tensor.
        gauge: Whether the field lives on the links, with a direction axis after the
            batch axis (``u1``, ``su<N>``: shape (B, d, L_0, ..., L_{d-1}, ...)), rather
            than on the sites (``scalar``, ``o2``: shape (B, L_0, ..., L_{d-1})).
    """

    kind: str = ""
    dtype: torch.dtype = torch.float64
    gauge: bool = False

    def shape(self, lattice: Sequence[int], batch: int) -> tuple[int, ...]:
        """Canonical tensor shape for ``batch`` configurations on ``lattice`` (x first)."""
        raise NotImplementedError

    def lattice_of(self, x: torch.Tensor) -> tuple[int, ...]:
        """The lattice (L_0, ..., L_{d-1}) of a field tensor.

        Raises:
            ShapeError: if ``x`` does not have the canonical layout of this kind.
        """
        raise NotImplementedError

    def cold(self, lattice: Sequence[int], batch: int, *, device: Any = None) -> torch.Tensor:
        """Ordered start: zero field, zero angles or unit links."""
        return torch.zeros(self.shape(lattice, batch), dtype=self.dtype, device=device)

    def hot(
        self, lattice: Sequence[int], batch: int, *, generator: torch.Generator | None = None, device: Any = None
    ) -> torch.Tensor:
        """Disordered start (standard normal field, uniform angles, Haar-random links)."""
        raise NotImplementedError

    def momenta(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Gaussian momenta conjugate to ``x`` (same shape; the algebra for SU(N))."""
        return torch.randn(x.shape, generator=generator, dtype=torch.float64, device=x.device)

    def kinetic(self, p: torch.Tensor) -> torch.Tensor:
        """Kinetic energy per configuration, shape (B,), float64."""
        return 0.5 * (p.to(torch.float64) ** 2).flatten(1).sum(1)

    def update(self, x: torch.Tensor, p: torch.Tensor, eps: float) -> torch.Tensor:
        """Move the field along the momentum for a time ``eps``."""
        return torch.add(x, p, alpha=eps)

    def finalize(self, x: torch.Tensor) -> torch.Tensor:
        """Bring a field back to its canonical range after a trajectory (identity here)."""
        return x

    def autograd_force(self, action: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The force of ``action`` at ``x`` by automatic differentiation (module docstring)."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(action(xg).sum(), xg)
        return -g

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """max |x - y| per configuration (angles compared modulo 2 pi), shape (B,)."""
        return (x - y).abs().flatten(1).amax(1)


class EuclideanSpace(FieldSpace):
    """Real scalar fields phi, shape (B, L_0, ..., L_{d-1}), float64."""

    kind = "scalar"

    def shape(self, lattice: Sequence[int], batch: int) -> tuple[int, ...]:
        """(batch, L_0, ..., L_{d-1})."""
        return (batch, *map(int, lattice))

    def lattice_of(self, x: torch.Tensor) -> tuple[int, ...]:
        """(L_0, ..., L_{d-1}) of a real (B, L...) tensor; ShapeError otherwise."""
        if x.dim() < 2 or x.is_complex():
            raise ShapeError(
                f"{self.kind} field must be real with shape (B, L_0, ..., L_(d-1)); found {x.dtype} {tuple(x.shape)}"
            )
        return tuple(x.shape[1:])

    def hot(self, lattice, batch, *, generator=None, device=None):
        """Independent standard normal entries, float64."""
        return torch.randn(self.shape(lattice, batch), generator=generator, dtype=torch.float64, device=device)


class AngleSpace(EuclideanSpace):
    """Angles in (-pi, pi]: U(1) links (B, d, L...) (``u1``) or O(2) spins (B, L...) (``o2``).

    Arguments:
        kind: The field kind.
        links: Angles on the links, shape (B, d, L...) (a gauge field), rather than on the
            sites, shape (B, L...); default: ``kind == "u1"``.
    """

    def __init__(self, kind: str = "u1", *, links: bool | None = None) -> None:
        self.kind = kind
        self.links = (kind == "u1") if links is None else bool(links)
        self.gauge = self.links

    def shape(self, lattice, batch):
        """(batch, d, L...) for ``u1`` links, (batch, L...) for ``o2`` spins."""
        lattice = tuple(map(int, lattice))
        return (batch, len(lattice), *lattice) if self.links else (batch, *lattice)

    def lattice_of(self, x):
        """The lattice of an angle tensor; ShapeError if the layout does not fit the kind."""
        if not self.links:
            return super().lattice_of(x)
        if x.dim() < 3 or x.is_complex() or x.dim() != x.shape[1] + 2:
            raise ShapeError(
                f"U(1) links must be real angles of shape (B, d, L_0, ..., L_(d-1)); found {x.dtype} {tuple(x.shape)}"
            )
        return tuple(x.shape[2:])

    def hot(self, lattice, batch, *, generator=None, device=None):
        """Independent uniform angles in (-pi, pi]."""
        u = torch.rand(self.shape(lattice, batch), generator=generator, dtype=torch.float64, device=device)
        return groups.wrap_angle(2 * math.pi * u - math.pi)

    def finalize(self, x):
        """Angles wrapped into (-pi, pi]."""
        return groups.wrap_angle(x)

    def distance(self, x, y):
        """max |wrap(x - y)| per configuration, shape (B,)."""
        return groups.wrap_angle(x - y).abs().flatten(1).amax(1)


class SUNSpace(FieldSpace):
    """SU(N) links, shape (B, d, L_0, ..., L_{d-1}, N, N), complex128 (module docstring)."""

    dtype = torch.complex128
    gauge = True

    def __init__(self, n: int) -> None:
        if n < 2:
            raise ConfigError(f"SU(N) needs N >= 2; found N = {n} (use group 'u1' for U(1))")
        self.n = n
        self.kind = f"su{n}"

    def shape(self, lattice, batch):
        """(batch, d, L..., N, N)."""
        lattice = tuple(map(int, lattice))
        return (batch, len(lattice), *lattice, self.n, self.n)

    def lattice_of(self, x):
        """The lattice of an SU(N) link tensor; ShapeError if the layout does not fit."""
        n = self.n
        if x.dim() < 5 or not x.is_complex() or x.shape[-1] != n or x.shape[-2] != n or x.dim() != x.shape[1] + 4:
            raise ShapeError(
                f"{self.kind.upper()} links must be complex with shape "
                f"(B, d, L_0, ..., L_(d-1), {n}, {n}); found {x.dtype} {tuple(x.shape)}"
            )
        return tuple(x.shape[2:-2])

    def cold(self, lattice, batch, *, device=None):
        """Unit links, complex128."""
        eye = torch.eye(self.n, dtype=self.dtype, device=device)
        return eye.expand(self.shape(lattice, batch)).clone()

    def hot(self, lattice, batch, *, generator=None, device=None):
        """Independent Haar-random SU(N) links (:func:`flowplug.groups.haar_random`)."""
        shape = self.shape(lattice, batch)[:-2]
        return groups.haar_random(shape, self.n, generator=generator, device=device)

    def momenta(self, x, generator=None):
        """P = sum_a p_a t_a with p_a ~ N(0, 1): shape of x, traceless anti-Hermitian."""
        return groups.random_algebra(tuple(x.shape[:-2]), self.n, generator=generator, dtype=x.dtype, device=x.device)

    def kinetic(self, p):
        """-tr(P^2) = sum_ij |P_ij|^2 summed over links, shape (B,), float64."""
        # -tr(P^2) = sum_ij |P_ij|^2 for anti-Hermitian P
        return (p.real**2 + p.imag**2).flatten(1).sum(1).to(torch.float64)

    def update(self, x, p, eps):
        """U <- exp(eps P) U (:func:`flowplug.groups.expmap`)."""
        return groups.small_matmul(groups.expmap(eps * p), x)

    def autograd_force(self, action, x):
        """F = -sum_a (d/ds S[exp(s t_a) U]) t_a from autograd, an su(N) element per link."""
        # torch returns G = 2 dS/d(conj U); d/ds S[exp(sX) U] = Re tr(U G^+ X), hence
        # F = -sum_a Re tr(t_a U G^+) t_a = (1/2) Pi(U G^+) with Pi the algebra projection.
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(action(xg).sum(), xg)
        return 0.5 * groups.project_algebra(x @ g.mH)

    def distance(self, x, y):
        """max |x - y| over matrix entries per configuration, shape (B,)."""
        return (x - y).abs().flatten(1).amax(1)


def _resolve(kind: str) -> tuple[FieldKindSpec, dict]:
    from flowplug import manager

    reg = cast("FieldKindRegistry", manager.registry("field_kind"))  # the field-kind registry is one
    try:
        return reg.resolve(kind)
    except UnknownFieldKindError:
        if str(kind).strip().lower() in reg:  # a family's name: the registry's message says so
            raise
        raise UnknownFieldKindError(
            f"unknown field kind {kind!r}. {reg.available(str(kind))} A plugin adds field kinds "
            "with the hook flowplug_field_kinds."
        ) from None


def field_kind(kind: str) -> FieldKindSpec:
    """The :class:`flowplug.records.FieldKindSpec` that covers a field kind.

    Field kinds come from plugins (hook ``flowplug_field_kinds``; the built-ins from
    :mod:`flowplug.plugins.fields`); the record of a family covers all its members
    (``field_kind("su4")`` is the ``su`` record).

    Arguments:
        kind: ``"scalar"``, ``"u1"``, ``"o2"``, ``"su<N>"`` or a plugin's kind (case-blind).

    Raises:
        UnknownFieldKindError: (a :class:`ConfigError`) if no plugin provides the kind,
            listing the kinds that exist, or ``kind`` names a family (``su``), not a kind.
    """
    return _resolve(kind)[0]


def field_space(kind: str) -> FieldSpace:
    """The :class:`FieldSpace` of a field kind, built by the plugin that registers the kind.

    Arguments:
        kind: ``"scalar"``, ``"u1"``, ``"o2"``, ``"su<N>"`` (``"su2"``, ``"su3"``...) or a
            kind a plugin registers (hook ``flowplug_field_kinds``); case-blind.

    Raises:
        ConfigError: for a kind no plugin provides (:class:`flowplug.errors.UnknownFieldKindError`,
            listing the known ones), or parameters the kind's space rejects (``su1``).
        PluginError: if the plugin's factory fails otherwise, or builds no
            :class:`FieldSpace` or one whose ``gauge`` contradicts its record.
    """
    spec, params = _resolve(kind)
    try:
        space = spec.factory(**params)
    except FlowplugError:
        raise
    except Exception as exc:
        raise PluginError(f"{_where(kind, spec)}: its factory raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(space, FieldSpace):
        raise PluginError(
            f"{_where(kind, spec)}: its factory returned {type(space).__name__}, expected a flowplug.theory.FieldSpace"
        )
    if bool(space.gauge) != spec.gauge:
        raise PluginError(
            f"{_where(kind, spec)}: the record says gauge={spec.gauge}, its space "
            f"{type(space).__name__} says gauge={bool(space.gauge)}"
        )
    return space


def _where(kind: str, spec: FieldKindSpec) -> str:
    return f"field kind '{str(kind).strip().lower()}' of {spec.provided_by}"


def su_n(kind: str | None) -> int | None:
    """N if ``kind`` is an SU(N) field kind (its space is a :class:`SUNSpace`), else None.

    ``su_n("su3") == 3``; ``None`` for ``u1``, ``scalar``, ``su1`` or a kind no plugin
    provides. Components that act on SU(N) links for any N use it to find N.
    """
    if kind is None:
        return None
    try:
        space = field_space(kind)
    except FlowplugError:
        return None
    return space.n if isinstance(space, SUNSpace) else None


def kind_accepted(kind: str, fields: Sequence[str]) -> bool:
    """Whether a component declared for ``fields`` (a record's ``fields``) accepts ``kind``.

    True if ``kind`` is listed, or it belongs to a family (:class:`flowplug.records.FieldKindSpec`
    with a pattern) that is listed by name or by any member: an observable declared for
    ``("u1", "su2", "su3")`` is measured on su4 links too. An empty ``fields`` accepts nothing
    here (callers treat "no fields" as "any kind" themselves).
    """
    k = str(kind).strip().lower()
    if k in fields:
        return True
    try:
        spec = field_kind(k)
    except ConfigError:
        return False
    if not spec.pattern or spec.match(k) is None:
        return False
    return any(f == spec.name or spec.match(f) is not None for f in fields)


# --------------------------------------------------------------------------- actions


class Action:
    """Base class of lattice actions (see the module docstring for the interface).

    Subclasses set :attr:`field` and implement :meth:`action`; they may override
    :meth:`force` with an analytic expression (tests compare it with autograd).

    Attributes:
        field: Field kind acted on.
        parameters: Coupling names, for metadata (``{"beta": 2.0}`` via :meth:`couplings`).
    """

    field: str = "scalar"
    parameters: tuple[str, ...] = ()

    @property
    def space(self) -> FieldSpace:
        """The :class:`FieldSpace` of :attr:`field` (built once per field kind and kept)."""
        cached = self.__dict__.get("_field_space")
        if cached is None or cached[0] != self.field:
            cached = self.__dict__["_field_space"] = (self.field, field_space(self.field))
        return cached[1]

    def couplings(self) -> dict[str, Any]:
        """The action's couplings as a dict (for metadata and summaries)."""
        return {p: getattr(self, p) for p in self.parameters}

    def check(self, x: torch.Tensor) -> tuple[int, ...]:
        """Validate ``x`` against :attr:`field`'s canonical layout; returns the lattice.

        Raises:
            ShapeError: with the expected and the found shape/dtype.
        """
        return self.space.lattice_of(x)

    def action(self, x: torch.Tensor) -> torch.Tensor:
        """S[x], shape (B,), float64. Subclasses implement this."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.action(x)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised log density -S[x], shape (B,), float64."""
        return -self.action(x)

    def force(self, x: torch.Tensor) -> torch.Tensor:
        """Force along the field space (module docstring), by autograd unless overridden."""
        return self.space.autograd_force(self.action, x)

    def cold_start(self, lattice: Sequence[int], batch: int = 1, *, device: Any = None) -> torch.Tensor:
        """``batch`` ordered configurations on ``lattice`` (x first) in canonical layout."""
        return self.space.cold(lattice, batch, device=device)

    def hot_start(
        self, lattice: Sequence[int], batch: int = 1, *, generator: torch.Generator | None = None, device: Any = None
    ) -> torch.Tensor:
        """``batch`` disordered configurations on ``lattice`` in canonical layout."""
        return self.space.hot(lattice, batch, generator=generator, device=device)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.couplings().items())
        return f"{type(self).__name__}({args})"


def start_field(
    action: Any,
    how: str,
    lattice: Sequence[int],
    batch: int,
    *,
    generator: torch.Generator | None = None,
    device: Any = None,
) -> torch.Tensor:
    """Cold or hot start for any action object (its own ``cold_start``/``hot_start`` if it
    has them, else those of its field space).

    Arguments:
        action: Object with ``field`` (and optionally ``cold_start``/``hot_start``).
        how: ``"cold"`` or ``"hot"``.
        lattice: Extents, x first.
        batch: Number of configurations.
        generator: Random generator for the hot start.
        device: Target device.

    Raises:
        ConfigError: if ``how`` is neither, or the field kind is unknown.
    """
    if how not in ("cold", "hot"):
        raise ConfigError(f"start must be 'cold', 'hot' or a file; found {how!r}")
    own = getattr(action, f"{how}_start", None)
    if own is not None:
        if how == "cold":
            return own(lattice, batch, device=device)
        return own(lattice, batch, generator=generator, device=device)
    space = field_space(action.field)
    if how == "cold":
        return space.cold(lattice, batch, device=device)
    return space.hot(lattice, batch, generator=generator, device=device)


def action_force(action: Any, x: torch.Tensor) -> torch.Tensor:
    """The force of any action object: its ``force`` method, else autograd on its field space."""
    f = getattr(action, "force", None)
    if f is not None:
        return f(x)
    return field_space(action.field).autograd_force(action.action, x)


#: Configuration keys of the ``[action]`` table that :func:`action_from_config` knows.
ACTION_KEYS: tuple[str, ...] = ("name", "group", "beta", "m2", "lam")


def check_action_keys(cfg: Mapping[str, Any], defaults: Iterable[str], *, registry: Any = None) -> None:
    """Refuse ``[action]`` keys that the selected action does not take.

    A command's default ``[action]`` table lists the parameters of several actions
    (``defaults``); those are dropped quietly for an action that does not take them. Any
    other key set for an action that does not take it (``c1`` with ``iwasaki``, which fixes
    it; ``kappa`` with ``wilson``) would be a silent no-op, so it is refused.

    Arguments:
        cfg: The whole configuration or its ``[action]`` table.
        defaults: Keys of the command's default ``[action]`` table.
        registry: Action registry to use; default the process-wide one.

    Raises:
        ConfigError: naming the keys, the action and the parameters it takes.
        UnknownComponentError: if ``action.name`` is not registered.
    """
    table = cfg.get("action", cfg) if isinstance(cfg, Mapping) else None
    if not isinstance(table, Mapping) or "name" not in table:
        return
    if registry is None:
        from flowplug.manager import registry as _registry

        registry = _registry("action")
    spec = registry.get(table["name"])
    ignored = sorted(set(table) - set(spec.parameters) - {"name"} - set(defaults))
    if ignored:
        raise ConfigError(
            f"action '{spec.name}' does not take {', '.join(repr(k) for k in ignored)}; it takes: "
            f"{', '.join(spec.parameters) or 'no parameters'} (`flowplug plugins` lists every action)"
        )


def action_from_config(cfg: Mapping[str, Any], *, registry: Any = None) -> Any:
    """Build the action described by the ``[action]`` table of a run configuration.

    ``action.name`` is looked up in the action registry; the keys of ``[action]`` named
    in the record's ``parameters`` (``beta``, ``group``, ``m2``, ``lam``, or a plugin's
    own couplings) are passed to its factory.

    Arguments:
        cfg: The whole configuration (with an ``action`` table) or the table itself.
        registry: Action registry to use; default the process-wide one.

    Returns:
        The action object.

    Raises:
        ConfigError: if the table or ``action.name`` is missing, a key is taken by no
            registered action (a typo; the message suggests the closest key), or the
            factory rejects the parameters (message names the action and the keys).
        UnknownComponentError: if ``action.name`` is not registered.
    """
    table = cfg.get("action", cfg) if isinstance(cfg, Mapping) else None
    if not isinstance(table, Mapping) or "name" not in table:
        raise ConfigError("configuration has no 'action.name' (e.g. --set action.name=wilson)")
    if registry is None:
        from flowplug.manager import registry as _registry

        registry = _registry("action")
    spec = registry.get(table["name"])
    # the table is open (plugins bring their own couplings): a key that no registered
    # action takes is a typo, not a parameter of some other action
    known = {"name"}.union(*(set(rec.parameters) for rec in registry))
    unknown = sorted(set(table) - known)
    if unknown:
        import difflib

        hints = [
            f"'{k}' (did you mean '{m[0]}'?)" if (m := difflib.get_close_matches(k, sorted(known), n=1)) else f"'{k}'"
            for k in unknown
        ]
        raise ConfigError(
            f"[action] key(s) {', '.join(hints)} taken by no registered action; "
            f"action '{spec.name}' takes: {', '.join(spec.parameters) or 'no parameters'}"
        )
    kwargs = {p: table[p] for p in spec.parameters if p in table}
    try:
        return spec.factory(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"action '{spec.name}' rejects parameters {kwargs}: {exc}") from None
