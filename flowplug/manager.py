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

Event hooks are called through :meth:`PluginManager.notify`, which keeps a failing
monitor from stopping a run.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as metadata
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import pluggy

from flowplug import hookspecs
from flowplug._version import __version__
from flowplug.errors import DuplicateComponentError, PluginError, PluginLoadWarning
from flowplug.records import Component
from flowplug.registry import Registry, kind_word, new_registry

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
        self._registries: dict[str, Registry] | None = None  # kind -> registry, lazily

    # ------------------------------------------------------------------ registration

    def register(
        self,
        plugin: Any,
        name: str | None = None,
        *,
        provider: tuple[str, str] | None = None,
    ) -> str | None:
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

    def load_entrypoints(self, *, blocked: Iterable[str] = (), path: Sequence[str] | None = None) -> list[str]:
        """Load third-party plugins from the entry-point group ``flowplug``.

        Each entry point names a module or object with hook implementations. A plugin
        that fails to import, has a malformed or unmarked hook, or implements a hook
        that does not exist is skipped with one :class:`PluginLoadWarning` naming its
        distribution and the error (or raises :class:`PluginError` when ``strict``).

        Arguments:
            blocked: Entry-point or distribution names not to load (case-blind;
                ``-``, ``_`` and ``.`` in distribution names are equivalent). Built-ins
                cannot be blocked.
            path: Folders to search for installed distributions; default ``sys.path``.

        Returns:
            Names of the plugins registered.
        """
        blocked = {_normalise(b) for b in blocked}
        loaded = []
        eps = []
        seen: set[tuple[str, str]] = set()
        for dist in metadata.distributions() if path is None else metadata.distributions(path=list(path)):
            for ep in dist.entry_points:
                if ep.group != ENTRY_POINT_GROUP:
                    continue
                dist_name, dist_version = _dist_of(ep, dist)
                key = (_normalise(dist_name), ep.name)
                if key in seen:
                    continue  # the same distribution found twice on the path
                seen.add(key)
                eps.append((ep.name, _normalise(dist_name), ep, dist_name, dist_version))
        for ep_name, norm_dist, ep, dist_name, dist_version in sorted(eps, key=lambda e: e[:2]):
            if _normalise(ep_name) in blocked or norm_dist in blocked:
                continue
            # Two distributions may use one entry-point name: keep both, apart.
            name = ep_name if self.get_plugin(ep_name) is None else f"{dist_name}:{ep_name}"
            try:
                plugin = ep.load()
                self.register(plugin, name=name, provider=(dist_name, dist_version))
                try:
                    self._check_plugin(name, plugin)
                except PluginError:
                    self.unregister(name=name)
                    raise
            except Exception as exc:
                self.report_failure(
                    name, f"{dist_name} {dist_version}".strip(), f"could not be loaded: {_describe(exc)}", exc
                )
                continue
            loaded.append(name)
        return loaded

    def report_failure(self, name: str, dist: str, what: str, exc: BaseException | None = None) -> None:
        """Record a third-party plugin failure: one :class:`PluginLoadWarning`, or in strict mode
        a :class:`PluginError`, naming the plugin, its distribution and what failed.
        """
        message = f"flowplug plugin '{name}' ({dist}) {what}"
        self.failures.append((name, dist, what))
        if self.strict:
            raise PluginError(f"{message} (FLOWPLUG_STRICT_PLUGINS is set)") from exc
        warnings.warn(message, PluginLoadWarning, stacklevel=3)

    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call an event hook on every plugin, isolating failures.

        A monitor that raises does not stop the run or the other monitors: a
        third-party failure is one :class:`PluginLoadWarning` (an error when strict);
        a failure in a built-in is re-raised.

        Arguments:
            hook_name: One of :data:`flowplug.hookspecs.EVENT_HOOKS`.
            **kwargs: The hook's arguments, by name.

        Raises:
            PluginError: if ``hook_name`` is not an event hook.
        """
        if hook_name not in hookspecs.EVENT_HOOKS:
            raise PluginError(f"{hook_name!r} is not an event hook; event hooks are {', '.join(hookspecs.EVENT_HOOKS)}")
        caller = getattr(self.hook, hook_name)
        for impl in caller.get_hookimpls():
            try:
                impl.function(*(kwargs[a] for a in impl.argnames))
            except Exception as exc:
                if impl.plugin_name in self._builtin:
                    raise
                dist, version = self.provider_of(impl.plugin_name)
                self.report_failure(
                    impl.plugin_name,
                    f"{dist} {version}".strip(),
                    f"raised in {hook_name}: {_describe(exc)}; the run goes on",
                    exc,
                )

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

    def _check_plugin(self, name: str, plugin: Any = None) -> None:
        problems = self._unknown_hooks(only=name)
        if problems:
            raise PluginError(self._unknown_message(problems))
        if plugin is not None:
            marked = {
                impl.function.__name__
                for hn in vars(self.hook)
                if not hn.startswith("_")
                for impl in getattr(self.hook, hn).get_hookimpls()
                if impl.plugin_name == name
            }
            unmarked = sorted(
                a
                for a in dir(plugin)
                if a.startswith("flowplug_") and a not in marked and callable(getattr(plugin, a, None))
            )
            if unmarked:
                raise PluginError(f"{', '.join(unmarked)} not marked with @hookimpl (from flowplug import hookimpl)")

    def _unknown_message(self, problems: list[tuple[str, str]]) -> str:
        known = sorted(set(hookspecs.COMPONENT_HOOKS) | set(hookspecs.EVENT_HOOKS))
        parts = []
        for plugin_name, hook_name in problems:
            dist, version = self._providers.get(plugin_name, (plugin_name, ""))
            text = f"plugin '{plugin_name}' ({f'{dist} {version}'.strip()}) implements unknown hook '{hook_name}'"
            close = difflib.get_close_matches(hook_name, known, n=1)
            if close:
                text += f" (did you mean '{close[0]}'?)"
            parts.append(text)
        return "; ".join(parts) + f". Known hooks: {', '.join(known)}"

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

    def _build_registry(self, hook_name: str) -> Registry:
        record_type = hookspecs.COMPONENT_HOOKS[hook_name]
        registry: Registry = new_registry(record_type.kind)
        caller = getattr(self.hook, hook_name)
        # get_hookimpls() lists implementations in registration order (built-ins first).
        for impl in caller.get_hookimpls():
            dist, version = self.provider_of(impl.plugin_name)
            provider = f"{dist} {version}".strip()
            builtin = impl.plugin_name in self._builtin
            try:
                records = list(impl.function() or ())
                for record in records:
                    if not isinstance(record, record_type):
                        raise PluginError(
                            f"{hook_name} of plugin '{impl.plugin_name}' ({provider}) "
                            f"returned {type(record).__name__}, expected {record_type.__name__}"
                        )
            except Exception as exc:
                if builtin or self.strict:
                    if isinstance(exc, PluginError):
                        raise
                    raise PluginError(
                        f"{hook_name} of plugin '{impl.plugin_name}' ({provider}) raised {_describe(exc)}"
                    ) from exc
                self.report_failure(
                    impl.plugin_name,
                    provider,
                    f"failed in {hook_name}: {_describe(exc)}; its {kind_word(record_type.kind)}s are skipped",
                    exc,
                )
                continue
            for record in records:
                stamped = record.with_provider(dist, version, impl.plugin_name)
                try:
                    registry.add(stamped)
                except DuplicateComponentError as exc:
                    if builtin or self.strict:
                        raise
                    self.report_failure(impl.plugin_name, provider, f"skipped: {exc}", exc)
        return registry

    def registry(self, kind: str) -> Registry:
        """The registry of one component kind, built on first use.

        Arguments:
            kind: ``"field_kind"``, ``"action"``, ``"flow_layer"``, ``"prior"``, ``"kernel"``,
                ``"file_format"``, ``"observable"``, ``"dirac_operator"``, ``"pseudofermion_model"``
                or ``"command"``. The field-kind
                registry is a :class:`flowplug.registry.FieldKindRegistry` (it also
                finds the members of families: ``get("su3")``).

        Raises:
            PluginError: if ``kind`` is not a component kind, or (strict mode, or between
                built-ins) two plugins provide one name
                (:class:`flowplug.errors.DuplicateComponentError`). In tolerant mode a
                third-party component whose name is taken is skipped with a warning.
        """
        if self._registries is None:
            self._registries = {}
        hooks = {t.kind: h for h, t in hookspecs.COMPONENT_HOOKS.items()}
        if kind not in hooks:
            raise PluginError(f"unknown component kind {kind!r}; kinds are {', '.join(hooks)}")
        if kind not in self._registries:
            self._registries[kind] = self._build_registry(hooks[kind])
        return self._registries[kind]

    def components(self) -> Iterator[Component]:
        """Every registered component of every kind, kind by kind, sorted by name."""
        for record_type in hookspecs.COMPONENT_HOOKS.values():
            yield from self.registry(record_type.kind)


def _normalise(name: str) -> str:
    """Distribution-name normalisation (PEP 503): lower case, runs of -_. become -."""
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _dist_of(ep: metadata.EntryPoint, dist: Any = None) -> tuple[str, str]:
    dist = dist if dist is not None else getattr(ep, "dist", None)
    if dist is None:
        return ep.name, ""
    try:
        return dist.metadata["Name"] or ep.name, dist.version or ""
    except Exception:  # pragma: no cover - broken metadata
        return ep.name, ""


def new_plugin_manager(
    *,
    autoload: bool | None = None,
    strict: bool | None = None,
    blocked: Iterable[str] | None = None,
    path: Sequence[str] | None = None,
) -> PluginManager:
    """Build a fresh plugin manager with built-ins and (optionally) third-party plugins.

    Arguments:
        autoload: Load entry points; default: unless ``FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD`` is set.
        strict: Failing third-party plugins raise; default: ``FLOWPLUG_STRICT_PLUGINS``.
        blocked: Names never loaded; default: ``FLOWPLUG_BLOCK_PLUGINS`` (comma separated).
        path: Folders searched for installed plugin distributions; default ``sys.path``.

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
        pm.load_entrypoints(blocked=blocked, path=path)
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
