"""Frozen records that plugins return from the component hooks.

A component hook (see :mod:`flowplug.hookspecs`) returns an iterable of these records.
The plugin manager stamps each record with its provider (distribution name and version)
and files it into the typed registry of its kind (:mod:`flowplug.registry`).

Field kinds
    Records that act on lattice fields say which field kinds they accept, as lower-case
    strings. Field kinds themselves are components too (:class:`FieldKindSpec`, hook
    ``flowplug_field_kinds``): each names the manifold its fields live on. The built-in
    kinds (``flowplug.plugins.fields``) and their canonical tensors (DESIGN.md section 2):

    ``scalar``  real scalar field, shape (B, L_0, ..., L_{d-1}), float64;
    ``o2``      O(2) spin angles, one per site, shape (B, L_0, ..., L_{d-1}), float64 in
                (-pi, pi] (the example package's XY model acts on it);
    ``u1``      U(1) link angles, shape (B, d, L_0, ..., L_{d-1}), float64 in (-pi, pi];
    ``su2``, ``su3`` (the family ``su``: any ``su<N>``, N >= 2) SU(N) links,
                shape (B, d, L_0, ..., L_{d-1}, N, N), complex128.

    Plugins may introduce further kinds with their own :class:`FieldKindSpec`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

_NAME = re.compile(r"^[a-z][a-z0-9_.\-]*$")


@dataclass(frozen=True, kw_only=True)
class Component:
    """Base record of a named component provided by a plugin.

    Attributes:
        name: Registry name, lower case (``[a-z][a-z0-9_.-]*``), unique per kind.
        description: One line shown by ``flowplug plugins``.
        factory: Class or callable that builds the component from keyword options.
        aliases: Further lower-case names under which the component can be looked up.
        provider: Distribution that registered the record; filled in by the manager.
        provider_version: Version of that distribution; filled in by the manager.
        plugin: Name of the plugin (entry point) that registered it; filled in by the manager.
    """

    kind: ClassVar[str] = "component"

    name: str
    description: str
    factory: Callable[..., Any]
    aliases: tuple[str, ...] = ()
    provider: str = ""
    provider_version: str = ""
    plugin: str = ""

    def __post_init__(self) -> None:
        for n in (self.name, *self.aliases):
            if not isinstance(n, str) or not _NAME.match(n):
                raise ValueError(f"{self.kind} name {n!r} is not a lower-case identifier ([a-z][a-z0-9_.-]*)")
        if not callable(self.factory):
            raise TypeError(f"{self.kind} {self.name!r}: factory {self.factory!r} is not callable")
        object.__setattr__(self, "aliases", tuple(self.aliases))

    @property
    def provided_by(self) -> str:
        """``"<distribution> <version>"``, with ``(built-in)`` for flowplug's own plugins."""
        text = f"{self.provider} {self.provider_version}".strip()
        if self.provider == "flowplug":
            text += " (built-in)"
        return text or "unknown provider"

    def with_provider(self, provider: str, version: str, plugin: str = "") -> Component:
        """Return a copy of the record stamped with its provider and plugin name."""
        return dataclasses.replace(self, provider=provider, provider_version=version, plugin=plugin)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description: kind, name, aliases, provider, version, description."""
        return {
            "kind": self.kind,
            "name": self.name,
            "aliases": list(self.aliases),
            "provider": self.provider,
            "version": self.provider_version,
            "description": self.description,
        }


def _param(value: str) -> Any:
    return int(value) if value.isdigit() else value


@dataclass(frozen=True, kw_only=True)
class FieldKindSpec(Component):
    r"""A field kind: the manifold its fields live on, and what is measured on it by default.

    A record is either **one kind**, called ``name`` (``scalar``, ``u1``), or a **family**
    of kinds: every lower-case name that matches ``pattern`` in full (the built-in family
    ``su``, pattern ``su(?P<n>\d+)``, is su2, su3, su4...). The family's own ``name``
    is only its registry name (for listings and clashes), not a kind.

    ``factory(**parameters)`` returns the kind's :class:`flowplug.theory.FieldSpace`
    (shapes, cold/hot starts, momenta, kinetic energy, updates; what HMC moves on): with
    no arguments for one kind; for a family, with the named groups of ``pattern`` as
    keyword arguments (converted to ``int`` when they are all digits): ``su3`` gives
    ``factory(n=3)``. Build it with :meth:`build`, or with
    :func:`flowplug.theory.field_space`, which finds the record by kind.

    A kind matched by two records (a name and another record's pattern, two patterns)
    is an error naming both providers, like a name given twice.

    Attributes:
        pattern: For a family, a regular expression the kind names match in full (lower
            case); its named groups are the factory's keyword arguments. Empty for one kind.
        examples: Members of a family, shown by ``flowplug plugins`` and in error
            messages, and used to find clashes between families; each must match ``pattern``.
        gauge: Whether the fields live on the links, with a direction axis after the batch
            axis, shape (B, d, L_0, ..., L_{d-1}, ...) (``u1``, ``su<N>``), rather than on
            the sites (``scalar``, ``o2``). Must agree with the ``gauge`` attribute of the
            space the factory builds.
        observables: Registry names of the observables measured by default on this kind
            (a run's ``observables = []``), in order.
        observable_dims: ``{observable: lattice dimensions}``: a default observable that
            is defined only in these dimensions is left out elsewhere (the topological
            charge: ``{"topological_charge": (2,)}`` for ``u1``, ``(4,)`` for ``su``).
            Given as a mapping; stored as sorted ``(name, dims)`` pairs.
        prior: Registry name of the flow prior used when a flow names none (``normal``,
            ``uniform``, ``haar``); empty if the kind has no default prior.
        symmetries: ``{name: (g_1, g_2, ...)}``: finite symmetry groups of the field, each
            given by its non-identity elements, callables x -> g x (same shape and dtype)
            that are involutions (g g = identity) with |det g| = 1 in the field's reference
            measure, and that with the identity form a group (``scalar``: ``{"z2":
            (negate,)}``, phi -> -phi). ``flow.symmetrize`` averages a flow's density over
            one of them (:mod:`flowplug.symmetric`, arXiv:2107.00734). Given as a mapping;
            stored as sorted ``(name, elements)`` pairs.

    Example::

        FieldKindSpec(name="su", description="SU(N) links", factory=SUNSpace,
                      pattern=r"su(?P<n>\d+)", examples=("su2", "su3"), gauge=True,
                      observables=("plaquette", "topological_charge"),
                      observable_dims={"topological_charge": (4,)}, prior="haar")
    """

    kind: ClassVar[str] = "field_kind"
    pattern: str = ""
    examples: tuple[str, ...] = ()
    gauge: bool = False
    observables: tuple[str, ...] = ()
    observable_dims: Any = ()
    prior: str = ""
    symmetries: Any = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pattern:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(
                    f"field kind {self.name!r}: pattern {self.pattern!r} is not a regular expression ({exc})"
                ) from None
        elif self.examples:
            raise ValueError(f"field kind {self.name!r}: examples are for a family (give a pattern)")
        object.__setattr__(self, "examples", tuple(self.examples))
        for e in self.examples:
            if not isinstance(e, str) or re.fullmatch(self.pattern, e) is None:
                raise ValueError(f"field kind {self.name!r}: example {e!r} does not match pattern {self.pattern!r}")
        object.__setattr__(self, "observables", tuple(self.observables))
        dims = self.observable_dims
        pairs = dims.items() if hasattr(dims, "items") else dims
        object.__setattr__(
            self, "observable_dims", tuple(sorted((str(n), tuple(int(d) for d in ds)) for n, ds in pairs))
        )
        object.__setattr__(self, "gauge", bool(self.gauge))
        syms = self.symmetries.items() if hasattr(self.symmetries, "items") else self.symmetries
        pairs_s = tuple(sorted((str(n).lower(), tuple(g)) for n, g in syms))
        for n, gs in pairs_s:
            if not _NAME.match(n) or not gs or not all(callable(g) for g in gs):
                raise ValueError(
                    f"field kind {self.name!r}: symmetry {n!r} must be a lower-case name with a "
                    "non-empty tuple of callables (its non-identity elements)"
                )
        object.__setattr__(self, "symmetries", pairs_s)

    @property
    def label(self) -> str:
        """The name, and for a family its members: ``"su (su2, su3, ...)"``."""
        if not self.pattern:
            return self.name
        members = ", ".join((*self.examples, "...")) if self.examples else f"/{self.pattern}/"
        return f"{self.name} ({members})"

    def match(self, kind: str) -> dict[str, Any] | None:
        """The factory's keyword arguments for ``kind`` if this record covers it, else None.

        One kind covers its name and aliases (``{}``); a family covers the names matching
        its pattern in full (the named groups, digits as ``int``).
        """
        k = str(kind).strip().lower()
        if not self.pattern:
            return {} if k in (self.name, *self.aliases) else None
        m = re.fullmatch(self.pattern, k)
        if m is None:
            return None
        return {key: _param(v) for key, v in m.groupdict().items() if v is not None}

    def build(self, kind: str | None = None) -> Any:
        """The field space of ``kind`` (default: ``name``, for one kind).

        Raises:
            LookupError: if this record does not cover ``kind``.
        """
        params = self.match(self.name if kind is None else kind)
        if params is None:
            raise LookupError(f"field kind record {self.label!r} does not cover {kind!r}")
        return self.factory(**params)

    def default_observables(self, ndim: int) -> tuple[str, ...]:
        """:attr:`observables` without those that :attr:`observable_dims` excludes in ``ndim`` D."""
        dims = dict(self.observable_dims)
        return tuple(n for n in self.observables if n not in dims or int(ndim) in dims[n])

    def summary(self) -> dict[str, Any]:
        """JSON-ready description; adds ``pattern``, ``examples``, ``gauge``, ``observables``
        and ``prior`` to :meth:`Component.summary`."""
        out = super().summary()
        out.update(
            pattern=self.pattern,
            examples=list(self.examples),
            gauge=self.gauge,
            observables=list(self.observables),
            observable_dims={n: list(d) for n, d in self.observable_dims},
            prior=self.prior,
            symmetries=[n for n, _ in self.symmetries],
        )
        return out


@dataclass(frozen=True, kw_only=True)
class ActionSpec(Component):
    """A lattice action S[field] (log p = -S up to log Z).

    ``factory(**parameters)`` returns an object with ``action(field) -> (B,) float64``
    and ``force(field)``; see the theory plugins for the full interface.

    Attributes:
        fields: Field kinds the action accepts (see the module docstring).
        parameters: Names of the couplings ``factory`` takes (``beta``, ``m2``, ``lam``...).
        symmetries: Names of field-kind symmetries (:attr:`FieldKindSpec.symmetries`) that
            leave the action invariant for every value of its couplings (``phi4``: ``z2``);
            ``flow.symmetrize`` accepts only these.
    """

    kind: ClassVar[str] = "action"
    fields: tuple[str, ...] = ()
    parameters: tuple[str, ...] = ()
    symmetries: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class FlowLayerSpec(Component):
    """A flow layer: ``factory(**options)`` returns a module mapping a batch to ``(y, logdet)``.

    Attributes:
        fields: Field kinds the layer transforms.
        dims: Lattice dimensions d the layer supports; empty means any.
        transfer: Optional ``transfer(src, dst) -> [(dst_index, src_index), ...]``: copy the
            trained parameters of this family's layers of the flow ``src`` into the layers of
            ``dst``, a flow of the same field on another lattice (or with other options), and
            return the pairs of layer indices it copied. Used by ``train.init_from``
            (:func:`flowplug.flowtools.init_flow_from`) when the two flows' architectures
            differ; None: the family transfers only between identical architectures.
    """

    kind: ClassVar[str] = "flow_layer"
    fields: tuple[str, ...] = ()
    dims: tuple[int, ...] = ()
    transfer: Callable[[Any, Any], Sequence[tuple[int, int]]] | None = None


@dataclass(frozen=True, kw_only=True)
class PriorSpec(Component):
    """A prior (base) distribution of a flow: ``factory(**options)`` gives ``sample``/``log_prob``.

    Attributes:
        fields: Field kinds the prior produces.
    """

    kind: ClassVar[str] = "prior"
    fields: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class KernelSpec(Component):
    """A Markov-chain (proposal) kernel: ``factory(**options)`` returns the kernel object.

    Attributes:
        fields: Field kinds the kernel can update; empty means any.
    """

    kind: ClassVar[str] = "kernel"
    fields: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class FileFormatSpec(Component):
    """A lattice file format: ``factory()`` returns the format handler.

    Attributes:
        extensions: File-name endings (without the dot) used as a second guess when
            detection by content is inconclusive.
        readable: Whether the handler can read.
        writable: Whether the handler can write.
    """

    kind: ClassVar[str] = "file_format"
    extensions: tuple[str, ...] = ()
    readable: bool = True
    writable: bool = False


@dataclass(frozen=True, kw_only=True)
class ObservableSpec(Component):
    """An observable: ``factory(field, **options)`` returns a ``(B,)`` float64 tensor.

    Attributes:
        fields: Field kinds the observable is defined for.
    """

    kind: ClassVar[str] = "observable"
    fields: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class DiracOperatorSpec(Component):
    """A lattice Dirac operator: ``factory(**parameters)`` returns the operator object.

    The operator acts on fermion fields in the gauge background of a link field; its
    methods (``apply``, ``apply_dagger``, ``solve``, ``logdet``...) are documented by the
    plugin that provides it (the built-in Wilson operator: :mod:`flowplug.plugins.dirac`).
    Fermionic actions and observables look operators up by name in the registry
    ``dirac_operator``, so a plugin's operator works wherever a built-in one does.

    Attributes:
        fields: Field kinds of the gauge links the operator accepts (``u1``, ``su3``...).
        parameters: Names of the couplings ``factory`` takes (``kappa``, ``mass``...).
        dims: Lattice dimensions d the operator supports; empty means any.
    """

    kind: ClassVar[str] = "dirac_operator"
    fields: tuple[str, ...] = ()
    parameters: tuple[str, ...] = ()
    dims: tuple[int, ...] = ()


@dataclass(frozen=True, kw_only=True)
class PseudofermionModelSpec(Component):
    """A pseudofermion model r(phi | U): a normalised proposal density for pseudofermion fields.

    ``factory(operator, **options)`` returns an object with ``sample(x, k, generator) ->
    (phi, log_r)`` and ``log_prob(x, phi) -> log_r`` (shapes and conventions:
    :class:`flowplug.plugins.fermion_schemes.PseudofermionModel`). The determinant-free
    fermion flow schemes (``pseudo-marginal``, ``fermion-joint``) look models up by name in
    the registry ``pseudofermion_model``, so a plugin's model works wherever a built-in one
    does.

    Attributes:
        parameters: Names of the options ``factory`` takes besides the operator (``scale``,
            ``checkpoint``...).
    """

    kind: ClassVar[str] = "pseudofermion_model"
    parameters: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class CommandSpec(Component):
    """A ``flowplug`` subcommand.

    ``factory(parser)`` adds the subcommand's arguments to an ``argparse`` parser;
    ``run(args)`` (required) executes it and returns the exit code (0 on success).
    Raising a :class:`flowplug.errors.FlowplugError` gives exit code 1 and a message on
    stderr.
    """

    kind: ClassVar[str] = "command"
    run: Callable[[Any], int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not callable(self.run):
            raise TypeError(f"command {self.name!r}: run={self.run!r} is not callable")


#: Every record type, in the order ``flowplug plugins`` lists them.
RECORD_TYPES: tuple[type[Component], ...] = (
    FieldKindSpec,
    ActionSpec,
    FlowLayerSpec,
    PriorSpec,
    KernelSpec,
    FileFormatSpec,
    ObservableSpec,
    DiracOperatorSpec,
    PseudofermionModelSpec,
    CommandSpec,
)
