"""Typed registries of components, one per kind (field kinds, actions, flow layers, kernels, ...).

:func:`new_registry` builds the registry of a kind: a :class:`Registry`, or for field
kinds a :class:`FieldKindRegistry`, which also finds the members of families (``su3`` in
the family ``su``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Generic, TypeVar

from flowplug.errors import DuplicateComponentError, UnknownComponentError, UnknownFieldKindError
from flowplug.records import Component, FieldKindSpec

C = TypeVar("C", bound=Component)

_KIND_WORDS = {
    "field_kind": "field kind",
    "action": "action",
    "flow_layer": "flow layer",
    "prior": "prior",
    "kernel": "kernel",
    "file_format": "file format",
    "observable": "observable",
    "dirac_operator": "Dirac operator",
    "pseudofermion_model": "pseudofermion model",
    "command": "command",
}


def kind_word(kind: str) -> str:
    """Human-readable name of a component kind (``flow_layer`` -> ``flow layer``)."""
    return _KIND_WORDS.get(kind, kind.replace("_", " "))


class Registry(Generic[C]):
    """Components of one kind, looked up by lower-case name or alias.

    Arguments:
        kind: The record kind held (``"action"``, ``"flow_layer"``, ...).

    Lookup is case-blind. Registering a name or alias that is already taken raises
    :class:`DuplicateComponentError` naming both providers; looking up a name that is
    not there raises :class:`UnknownComponentError` listing the available names.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._records: dict[str, C] = {}
        self._lookup: dict[str, C] = {}

    def add(self, record: C) -> None:
        """Register ``record`` under its name and aliases.

        Raises:
            DuplicateComponentError: if the name or an alias is registered already.
        """
        for key in (record.name, *record.aliases):
            other = self._lookup.get(key)
            if other is not None:
                via = "" if key == other.name else f" (alias of '{other.name}')"
                raise self.clash(key, other, record, via)
        self._records[record.name] = record
        for key in (record.name, *record.aliases):
            self._lookup[key] = record

    def clash(self, key: str, other: C, record: C, via: str = "", via_new: str = "") -> DuplicateComponentError:
        """The error for ``key`` provided by ``other`` (registered first) and by ``record``.

        Arguments:
            key: The name both provide.
            other, record: The two records, in registration order.
            via, via_new: Text after each provider, e.g. `` (alias of 'x')``.
        """
        label = kind_word(self.kind).capitalize()
        third = [p.provider for p in (other, record) if p.provider and p.provider != "flowplug"]
        fix = f"FLOWPLUG_BLOCK_PLUGINS={third[-1]}" if third else "FLOWPLUG_BLOCK_PLUGINS=<distribution name>"
        return DuplicateComponentError(
            f"{label} '{key}' is provided twice: by {other.provided_by}{via} "
            f"and by {record.provided_by}{via_new}. Uninstall one of them or block it ({fix})."
        )

    def get(self, name: str) -> C:
        """Return the record registered under ``name`` (case-blind; aliases allowed).

        Raises:
            UnknownComponentError: if nothing is registered under that name.
        """
        key = str(name).strip().lower()
        try:
            return self._lookup[key]
        except KeyError:
            pass
        raise UnknownComponentError(f"Unknown {kind_word(self.kind)} '{name}'. {self.available(key)}")

    def available(self, name: str = "") -> str:
        """``"Available: a, b (from pkg 1.0). Did you mean 'a'?"``: what an unknown-name
        error lists, with the closest registered name to ``name``."""
        available = ", ".join(self._describe(r) for r in self) or "none"
        message = f"Available: {available}."
        hint = difflib.get_close_matches(str(name).strip().lower(), self._hint_names(), n=1)
        if hint:
            message += f" Did you mean '{hint[0]}'?"
        return message

    def _hint_names(self) -> list[str]:
        return list(self._lookup)

    @staticmethod
    def _label(record: Component) -> str:
        return record.name

    @classmethod
    def _describe(cls, record: Component) -> str:
        if record.provider and record.provider != "flowplug":
            return f"{cls._label(record)} (from {record.provider} {record.provider_version})".replace(" )", ")")
        return cls._label(record)

    def names(self) -> list[str]:
        """Registered names (aliases excluded), sorted."""
        return sorted(self._records)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.strip().lower() in self._lookup

    def __iter__(self) -> Iterator[C]:
        return iter(sorted(self._records.values(), key=lambda r: r.name))

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


class FieldKindRegistry(Registry[FieldKindSpec]):
    """The registry of field kinds: names, aliases and families (:class:`FieldKindSpec`).

    :meth:`get` returns the record registered under a name, else the one family whose
    pattern matches it (``get("su3")`` is the ``su`` record). A kind covered by two
    records, a name and a pattern or two patterns, is a clash: :meth:`add` detects it for
    names, aliases and family examples, :meth:`get` for any other kind.
    """

    def __init__(self, kind: str = "field_kind") -> None:
        super().__init__(kind)
        self._members: dict[str, FieldKindSpec] = {}  # kinds found through a pattern
        self._resolved: dict[str, tuple[FieldKindSpec, dict]] = {}

    def add(self, record: FieldKindSpec) -> None:
        """Register ``record``; see :meth:`Registry.add`.

        Raises:
            DuplicateComponentError: if its name or an alias is taken, or it covers a kind
                that another record covers (a name in a family, a family's example).
        """
        for other in self._records.values():
            for key in self._kinds(record):
                if other.match(key) is not None:
                    raise self.clash(key, other, record, self._via(other), self._via(record))
            for key in self._kinds(other):
                if record.match(key) is not None:
                    raise self.clash(key, other, record, self._via(other), self._via(record))
        super().add(record)
        self._members.clear()
        self._resolved.clear()

    @staticmethod
    def _kinds(record: FieldKindSpec) -> tuple[str, ...]:
        """Kinds known to be covered: a family's examples, else the name and aliases."""
        return record.examples if record.pattern else (record.name, *record.aliases)

    @staticmethod
    def _via(record: FieldKindSpec) -> str:
        return f" (family '{record.name}', /{record.pattern}/)" if record.pattern else ""

    def get(self, name: str) -> FieldKindSpec:
        """The record of a field kind or family name (case-blind).

        Raises:
            UnknownFieldKindError: if no record covers ``name`` (a
                :class:`flowplug.errors.ConfigError` too), listing what exists.
            DuplicateComponentError: if two families cover ``name``.
        """
        key = str(name).strip().lower()
        record = self._lookup.get(key) or self._members.get(key)
        if record is not None:
            return record
        hits = [r for r in self if r.pattern and r.match(key) is not None]
        if len(hits) > 1:
            raise self.clash(key, hits[0], hits[1], self._via(hits[0]), self._via(hits[1]))
        if hits:
            self._members[key] = hits[0]
            return hits[0]
        raise UnknownFieldKindError(f"Unknown field kind '{name}'. {self.available(key)}")

    def resolve(self, kind: str) -> tuple[FieldKindSpec, dict]:
        """``(record, factory keyword arguments)`` of a field kind (cached).

        Raises:
            UnknownFieldKindError: as :meth:`get`, and for the name of a family (which is
                not a kind: ``su`` is the family of su2, su3...).
            DuplicateComponentError: if two families cover ``kind``.
        """
        key = str(kind).strip().lower()
        hit = self._resolved.get(key)
        if hit is None:
            record = self.get(key)
            params = record.match(key)
            if params is None:
                raise UnknownFieldKindError(
                    f"field kind '{key}' names a family, {record.label} (from "
                    f"{record.provided_by}); give one of its members"
                )
            hit = self._resolved[key] = (record, params)
        return hit[0], dict(hit[1])

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        key = name.strip().lower()
        return key in self._lookup or any(r.pattern and r.match(key) is not None for r in self)

    def _hint_names(self) -> list[str]:
        return [k for k in self._lookup if self._lookup[k].match(k) is not None] + [e for r in self for e in r.examples]

    @staticmethod
    def _label(record: Component) -> str:
        return record.label if isinstance(record, FieldKindSpec) else record.name


#: Registry classes of the kinds that need more than :class:`Registry`.
REGISTRY_CLASSES: dict[str, type[Registry]] = {"field_kind": FieldKindRegistry}


def new_registry(kind: str) -> Registry:
    """An empty registry for components of ``kind`` (``"action"``, ``"field_kind"``...)."""
    return REGISTRY_CLASSES.get(kind, Registry)(kind)
