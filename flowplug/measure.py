"""Measurements of registered observables: what a job measures, and how.

The core knows no observable: :func:`measurement` builds a callable from observable
names through the observable registry (built-ins of :mod:`flowplug.plugins.observables`
and any plugin's), and :func:`default_observables` reads the defaults of a field kind
from its record (:class:`flowplug.records.FieldKindSpec`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from flowplug.errors import ConfigError

__all__ = ["default_observables", "measurement"]


def default_observables(field: str, ndim: int) -> tuple[str, ...]:
    """Names measured by default for a field kind on a d = ``ndim`` lattice.

    They come from the field kind's record (:class:`flowplug.records.FieldKindSpec`:
    ``observables``, less those its ``observable_dims`` leave out in ``ndim`` D: the
    topological charge is measured on 2D U(1) and 4D SU(N) fields only; see
    :mod:`flowplug.plugins.fields`). A kind whose record names none (``o2``, or a
    plugin's kind) gets every registered observable defined for it that needs no options
    (the XY plugin's ``xy_bond_energy`` for ``o2``); a kind no plugin registers has none.
    """
    from flowplug.theory import field_kind

    try:
        spec = field_kind(field)
    except ConfigError:
        return ()
    if spec.observables:  # the record's list, even where observable_dims leaves none in ndim D
        return spec.default_observables(ndim)
    return _registered_for(field)


def _registered_for(field: str) -> tuple[str, ...]:
    """Every registered observable defined for ``field`` that needs no options."""
    import inspect

    from flowplug.manager import registry
    from flowplug.theory import kind_accepted

    out = []
    for spec in registry("observable"):
        if not spec.fields or not kind_accepted(field, spec.fields):
            continue
        params = list(inspect.signature(spec.factory).parameters.values())[1:]
        if all(p.default is not inspect.Parameter.empty or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params):
            out.append(spec.name)
    return tuple(out)


def _coupling_options(factory: Callable, couplings: Mapping[str, Any] | None) -> dict[str, Any]:
    """The couplings that ``factory`` names among its parameters (after the field)."""
    if not couplings:
        return {}
    import inspect

    try:
        params = list(inspect.signature(factory).parameters.values())[1:]
    except (TypeError, ValueError):  # a builtin without a signature
        return {}
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in couplings.items() if k in names}


def measurement(
    field: str,
    names: Sequence[str],
    *,
    registry=None,
    options: Mapping[str, Mapping] | None = None,
    couplings: Mapping[str, Any] | None = None,
) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """A callable x -> {name: (B,) float64} evaluating registered observables.

    Arguments:
        field: Field kind of the configurations.
        names: Observable names (registry lookup, so plugins' observables work too).
        registry: The observable registry; default the process-wide one.
        options: Optional per-observable keyword options.
        couplings: The action's couplings (``action.couplings()``): each is passed to the
            observables whose factory has a parameter of that name (the hopping parameter
            ``kappa`` of the fermionic observables), unless ``options`` sets it.

    An observable declared for one member of a family of field kinds is measured on every
    member (declared for ``su2``/``su3``, it is measured on ``su4`` links too;
    :func:`flowplug.theory.kind_accepted`).

    Raises:
        UnknownComponentError: for an unregistered name.
        ConfigError: if an observable is not defined for ``field``.
    """
    from flowplug.theory import kind_accepted

    if registry is None:
        from flowplug.manager import registry as _registry

        registry = _registry("observable")
    options = dict(options or {})
    specs = []
    for name in names:
        spec = registry.get(name)
        if spec.fields and not kind_accepted(field, spec.fields):
            raise ConfigError(
                f"observable '{spec.name}' is defined for {', '.join(spec.fields)}, not for field kind '{field}'"
            )
        opts = {**_coupling_options(spec.factory, couplings), **dict(options.get(spec.name, {}))}
        specs.append((spec.name, spec.factory, opts))

    def measure(x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {n: f(x, **o).to(torch.float64) for n, f, o in specs}

    return measure
