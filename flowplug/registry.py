"""Typed registries of components, one per kind (actions, flow layers, kernels, ...)."""

from __future__ import annotations

import difflib
from typing import Generic, Iterator, TypeVar

from flowplug.errors import DuplicateComponentError, UnknownComponentError
from flowplug.records import Component

C = TypeVar("C", bound=Component)

_KIND_WORDS = {
    "action": "action",
    "flow_layer": "flow layer",
    "prior": "prior",
    "kernel": "kernel",
    "file_format": "file format",
    "observable": "observable",
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
                label = kind_word(self.kind).capitalize()
                via = "" if key == other.name else f" (alias of '{other.name}')"
                third = [p.provider for p in (other, record) if p.provider and p.provider != "flowplug"]
                fix = (f"FLOWPLUG_BLOCK_PLUGINS={third[-1]}" if third
                       else "FLOWPLUG_BLOCK_PLUGINS=<distribution name>")
                raise DuplicateComponentError(
                    f"{label} '{key}' is provided twice: by {other.provided_by}{via} "
                    f"and by {record.provided_by}. Uninstall one of them or block it ({fix})."
                )
        self._records[record.name] = record
        for key in (record.name, *record.aliases):
            self._lookup[key] = record

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
        available = ", ".join(self._describe(r) for r in self) or "none"
        hint = difflib.get_close_matches(key, list(self._lookup), n=1)
        message = f"Unknown {kind_word(self.kind)} '{name}'. Available: {available}."
        if hint:
            message += f" Did you mean '{hint[0]}'?"
        raise UnknownComponentError(message)

    @staticmethod
    def _describe(record: Component) -> str:
        if record.provider and record.provider != "flowplug":
            return f"{record.name} (from {record.provider} {record.provider_version})".replace(" )", ")")
        return record.name

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
