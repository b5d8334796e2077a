"""Frozen records that plugins return from the component hooks.

A component hook (see :mod:`flowplug.hookspecs`) returns an iterable of these records.
The plugin manager stamps each record with its provider (distribution name and version)
and files it into the typed registry of its kind (:mod:`flowplug.registry`).

Field kinds
    Records that act on lattice fields say which field kinds they accept, as lower-case
    strings. The built-in kinds and their canonical tensors (DESIGN.md section 2) are:

    ``scalar``  real scalar field, shape (B, L_0, ..., L_{d-1}), float64;
    ``u1``      U(1) link angles, shape (B, d, L_0, ..., L_{d-1}), float64 in (-pi, pi];
    ``su2``, ``su3`` (and ``su<N>``) SU(N) links, shape (B, d, L_0, ..., L_{d-1}, N, N),
                complex128.

    Plugins may introduce further kinds (the example package's XY model uses ``o2``:
    one angle per site, shape (B, L_0, ..., L_{d-1}), float64).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

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
                raise ValueError(
                    f"{self.kind} name {n!r} is not a lower-case identifier "
                    "([a-z][a-z0-9_.-]*)"
                )
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

    def with_provider(self, provider: str, version: str, plugin: str = "") -> "Component":
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


@dataclass(frozen=True, kw_only=True)
class ActionSpec(Component):
    """A lattice action S[field] (log p = -S up to log Z).

    ``factory(**parameters)`` returns an object with ``action(field) -> (B,) float64``
    and ``force(field)``; see the theory plugins for the full interface.

    Attributes:
        fields: Field kinds the action accepts (see the module docstring).
        parameters: Names of the couplings ``factory`` takes (``beta``, ``m2``, ``lam``...).
    """

    kind: ClassVar[str] = "action"
    fields: tuple[str, ...] = ()
    parameters: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class FlowLayerSpec(Component):
    """A flow layer: ``factory(**options)`` returns a module mapping a batch to ``(y, logdet)``.

    Attributes:
        fields: Field kinds the layer transforms.
        dims: Lattice dimensions d the layer supports; empty means any.
    """

    kind: ClassVar[str] = "flow_layer"
    fields: tuple[str, ...] = ()
    dims: tuple[int, ...] = ()


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
    ActionSpec,
    FlowLayerSpec,
    PriorSpec,
    KernelSpec,
    FileFormatSpec,
    ObservableSpec,
    CommandSpec,
)
