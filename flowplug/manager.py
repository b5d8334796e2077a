"""The plugin manager: loads built-in and third-party plugins and builds typed registries.

Loading order (DESIGN.md section 1):

1. built-in plugins, in the fixed order of :data:`BUILTIN_MODULES` (CLI commands from
   ``flowplug.cli``, then ``flowplug.plugins.BUILTIN``, then ``flowplug.adapters.BUILTIN``);
2. third-party plugins from the entry-point group ``flowplug``, sorted by entry-point
   name, then distribution name.

Environment variables:

``FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD=1``
    do not load entry points (built-ins still load; the test suite sets this);
``FLOWPLUG_STRICT_PLUGINS=1``
    a third-party plugin that fails to load is an error instead of a warning;
``FLOWPLUG_BLOCK_PLUGINS=name1,name2``
    entry-point (or distribution) names that are never loaded.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as metadata
import os
import warnings
from typing import Any, Iterable, Iterator

import pluggy

from flowplug import hookspecs
from flowplug._version import __version__
from flowplug.errors import PluginError, PluginLoadWarning
from flowplug.records import Component
from flowplug.registry import Registry

ENTRY_POINT_GROUP = "flowplug"

#: Core modules registered before ``flowplug.plugins`` and ``flowplug.adapters``.
CORE_MODULES: tuple[str, ...] = ("flowplug.cli.commands",)


def builtin_modules() -> tuple[str, ...]:
    """Module names of every built-in plugin, in registration order."""
    from flowplug import adapters, plugins

    return CORE_MODULES + tuple(plugins.BUILTIN) + tuple(adapters.BUILTIN)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _env_list(name: str) -> set[str]:
    return {x.strip().lower() for x in os.environ.get(name, "").split(",") if x.strip()}


class PluginManager(pluggy.PluginManager):
    """pluggy manager for the ``flowplug`` project with provider bookkeeping.

    Use :func:`get_plugin_manager` for the process-wide instance, or
    :func:`new_plugin_manager` for a fresh one (tests).

    Attributes:
        strict: Third-party failures raise :class:`PluginError` instead of warning.
        failures: ``(plugin name, distribution, message)`` for every plugin skipped.
    """

    def __init__(self, *, strict: bool = False) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.strict = strict
        self.failures: list[tuple[str, str, str]] = []
        self._providers: dict[str, tuple[str, str]] = {}
        self._builtin: set[str] = set()
        self._registries: dict[str, Registry] | None = None

    # ------------------------------------------------------------------ registration

    def register(self, plugin: Any, name: str | None = None, *,  # type: ignore[override]
                 provider: tuple[str, str] | None = None) -> str | None:
        """Register ``plugin`` (a module or object with hook implementations).

        Arguments:
            plugin: Module or object whose ``flowplug_*`` functions are hook implementations.
            name: Plugin name; defaults to pluggy's canonical name.
            provider: ``(distribution, version)`` reported for its components; defaults
                to ``(name, "")``.

        Raises:
            pluggy.PluginValidationError: if a hook implementation's signature does not
                match its specification.
        """
        plugin_name = super().register(plugin, name)
        if plugin_name is not None:
            self._providers[plugin_name] = provider or (plugin_name, "")
            self._registries = None
        return plugin_name

    def unregister(self, plugin: Any = None, name: str | None = None) -> Any:
        """Unregister a plugin (by object or name) and forget its components."""
        out = super().unregister(plugin, name)
        self._registries = None
        return out

    def load_builtins(self) -> None:
        """Import and register every built-in plugin module in the fixed order.

        Raises:
            PluginError: if a built-in module fails to import or validate (a bug in
                flowplug itself, never tolerated).
        """
        for modname in builtin_modules():
            try:
                module = importlib.import_module(modname)
                self.register(module, name=modname, provider=("flowplug", __version__))
            except Exception as exc:  # pragma: no cover - a broken installation
                raise PluginError(f"built-in plugin {modname} failed to load: {exc}") from exc
            self._builtin.add(modname)
        self.check_pending()

    def load_entrypoints(self, *, blocked: Iterable[str] = ()) -> list[str]:
        """Load third-party plugins from the entry-point group ``flowplug``.

        Each entry point names a module or object with hook implementations. A plugin
        that fails to import, has a malformed hook, or implements a hook that does not
        exist is skipped with one :class:`PluginLoadWarning` naming its distribution
        and the error (or raises :class:`PluginError` when ``strict``).

        Arguments:
            blocked: Entry-point or distribution names not to load (case-blind).

        Returns:
            Names of the plugins registered.
        """
        blocked = {b.lower() for b in blocked}
        for b in blocked:
            self.set_blocked(b)
        loaded = []
        eps = sorted(metadata.entry_points(group=ENTRY_POINT_GROUP),
                     key=lambda e: (e.name, _dist_of(e)[0].lower()))
        for ep in eps:
            dist_name, dist_version = _dist_of(ep)
            if ep.name.lower() in blocked or dist_name.lower() in blocked:
                continue
            if self.is_blocked(ep.name):
                continue
            # Two distributions may use one entry-point name: keep both, apart.
            name = ep.name if self.get_plugin(ep.name) is None else f"{dist_name}:{ep.name}"
            if self.get_plugin(name) is not None:
                continue  # the same distribution seen twice on sys.path
            try:
                plugin = ep.load()
                self.register(plugin, name=name, provider=(dist_name, dist_version))
                try:
                    self._check_plugin(name)
                except PluginError:
                    self.unregister(name=name)
                    raise
            except Exception as exc:
                self._fail(name, f"{dist_name} {dist_version}".strip(), exc)
                continue
            loaded.append(name)
        return loaded

    def _fail(self, name: str, dist: str, exc: BaseException) -> None:
        message = f"flowplug plugin '{name}' from {dist} could not be loaded: {type(exc).__name__}: {exc}"
        self.failures.append((name, dist, str(exc)))
        if self.strict:
            raise PluginError(message + " (FLOWPLUG_STRICT_PLUGINS is set)") from exc
        warnings.warn(message + ". It is skipped; everything else works.", PluginLoadWarning, stacklevel=3)

    # --------------------------------------------------------------------- validation

    def _unknown_hooks(self, only: str | None = None) -> list[tuple[str, str]]:
        """(plugin name, hook name) of implementations of hooks that have no spec."""
        out = []
        for hook_name, caller in vars(self.hook).items():
            if hook_name.startswith("_") or caller.has_spec():
                continue
            for impl in caller.get_hookimpls():
                if impl.opts.get("optionalhook"):
                    continue
                if only is None or impl.plugin_name == only:
                    out.append((impl.plugin_name, hook_name))
        return out

    def _check_plugin(self, name: str) -> None:
        problems = self._unknown_hooks(only=name)
        if problems:
            raise PluginError(self._unknown_message(problems))

    def _unknown_message(self, problems: list[tuple[str, str]]) -> str:
        known = sorted(set(hookspecs.COMPONENT_HOOKS) | set(hookspecs.EVENT_HOOKS))
        parts = []
        for plugin_name, hook_name in problems:
            dist, version = self._providers.get(plugin_name, (plugin_name, ""))
            text = f"plugin '{plugin_name}' ({dist} {version}".rstrip() + f") implements unknown hook '{hook_name}'"
            close = difflib.get_close_matches(hook_name, known, n=1)
            if close:
                text += f"; did you mean '{close[0]}'?"
            parts.append(text)
        return "; ".join(parts) + f". Known hooks: {', '.join(known)}."

    def check_pending(self) -> None:
        """Raise :class:`PluginError` for any implementation of a hook that does not exist.

        A misspelled hook name (``flowplug_actoins``) would otherwise be ignored
        silently; the message names the plugin, its distribution and the closest
        hook name.
        """
        problems = self._unknown_hooks()
        if problems:
            raise PluginError(self._unknown_message(problems))

    # --------------------------------------------------------------------- registries

    def provider_of(self, plugin_name: str) -> tuple[str, str]:
        """``(distribution, version)`` of a registered plugin."""
        return self._providers.get(plugin_name, (plugin_name, ""))

    def _build_registries(self) -> dict[str, Registry]:
        registries: dict[str, Registry] = {}
        for hook_name, record_type in hookspecs.COMPONENT_HOOKS.items():
            registry: Registry = Registry(record_type.kind)
            caller = getattr(self.hook, hook_name)
            # get_hookimpls() lists implementations in registration order.
            for impl in caller.get_hookimpls():
                dist, version = self.provider_of(impl.plugin_name)
                builtin = impl.plugin_name in self._builtin
                try:
                    records = list(impl.function() or ())
                    for record in records:
                        if not isinstance(record, record_type):
                            raise PluginError(
                                f"{hook_name} of plugin '{impl.plugin_name}' ({dist} {version}) "
                                f"returned {type(record).__name__}, expected {record_type.__name__}"
                            )
                except Exception as exc:
                    if builtin or self.strict:
                        if isinstance(exc, PluginError):
                            raise
                        raise PluginError(
                            f"{hook_name} of plugin '{impl.plugin_name}' ({dist} {version}) "
                            f"raised {type(exc).__name__}: {exc}"
                        ) from exc
                    self._fail(impl.plugin_name, f"{dist} {version}".strip(), exc)
                    continue
                for record in records:
                    registry.add(record.with_provider(dist, version))
            registries[record_type.kind] = registry
        return registries

    def registry(self, kind: str) -> Registry:
        """The registry of one component kind.

        Arguments:
            kind: ``"action"``, ``"flow_layer"``, ``"prior"``, ``"kernel"``,
                ``"file_format"``, ``"observable"`` or ``"command"``.

        Raises:
            PluginError: if ``kind`` is not a component kind, or two plugins provide one
                name (:class:`flowplug.errors.DuplicateComponentError`).
        """
        if self._registries is None:
            self._registries = self._build_registries()
        try:
            return self._registries[kind]
        except KeyError:
            raise PluginError(
                f"unknown component kind {kind!r}; kinds are {', '.join(self._registries)}"
            ) from None

    def components(self) -> Iterator[Component]:
        """Every registered component of every kind, kind by kind, sorted by name."""
        for record_type in hookspecs.COMPONENT_HOOKS.values():
            yield from self.registry(record_type.kind)


def _dist_of(ep: metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return ep.name, ""
    try:
        return dist.metadata["Name"] or ep.name, dist.version or ""
    except Exception:  # pragma: no cover - broken metadata
        return ep.name, ""


def new_plugin_manager(*, autoload: bool | None = None, strict: bool | None = None,
                       blocked: Iterable[str] | None = None) -> PluginManager:
    """Build a fresh plugin manager with built-ins and (optionally) third-party plugins.

    Arguments:
        autoload: Load entry points; default: unless ``FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD`` is set.
        strict: Failing third-party plugins raise; default: ``FLOWPLUG_STRICT_PLUGINS``.
        blocked: Names never loaded; default: ``FLOWPLUG_BLOCK_PLUGINS`` (comma separated).

    Raises:
        PluginError: on a broken built-in, or on a broken third-party plugin when strict.
    """
    if autoload is None:
        autoload = not _env_flag("FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD")
    if strict is None:
        strict = _env_flag("FLOWPLUG_STRICT_PLUGINS")
    if blocked is None:
        blocked = _env_list("FLOWPLUG_BLOCK_PLUGINS")
    pm = PluginManager(strict=strict)
    pm.load_builtins()
    if autoload:
        pm.load_entrypoints(blocked=blocked)
    return pm


_default: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, built on first use by :func:`new_plugin_manager`."""
    global _default
    if _default is None:
        _default = new_plugin_manager()
    return _default


def set_plugin_manager(pm: PluginManager | None) -> PluginManager | None:
    """Replace the process-wide manager (``None`` rebuilds it on next use); returns the old one."""
    global _default
    old, _default = _default, pm
    return old


def registry(kind: str) -> Registry:
    """Shortcut: ``get_plugin_manager().registry(kind)``."""
    return get_plugin_manager().registry(kind)


def get_component(kind: str, name: str) -> Component:
    """Shortcut: look up ``name`` in the registry of ``kind``.

    Raises:
        UnknownComponentError: listing the available names.
    """
    return registry(kind).get(name)
