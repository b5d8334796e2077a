"""flowplug: normalizing-flow sampling for lattice field theory, as plugins.

The core (this package) holds the hook specifications, the plugin manager and typed
registries, the configuration system, the drivers and the command line; it knows no
theory and no file format. Everything concrete is a plugin: the built-ins in
``flowplug.plugins`` and ``flowplug.adapters``, third-party packages through the
entry-point group ``flowplug``.

Quick use::

    import flowplug
    flowplug.registry("action").names()          # registered actions
    spec = flowplug.get_component("action", "xy")
    action = spec.factory(beta=1.0)
"""

from flowplug._version import __version__
from flowplug.errors import (
    ChecksumError,
    ConfigError,
    DuplicateComponentError,
    FlowplugError,
    FormatError,
    PluginError,
    PluginLoadWarning,
    ShapeError,
    UnknownComponentError,
)
from flowplug.hookspecs import hookimpl
from flowplug.manager import get_component, get_plugin_manager, new_plugin_manager, registry
from flowplug.records import (
    ActionSpec,
    CommandSpec,
    FileFormatSpec,
    FlowLayerSpec,
    KernelSpec,
    ObservableSpec,
    PriorSpec,
)

__all__ = [
    "__version__",
    "hookimpl",
    "get_plugin_manager",
    "new_plugin_manager",
    "registry",
    "get_component",
    "ActionSpec",
    "FlowLayerSpec",
    "PriorSpec",
    "KernelSpec",
    "FileFormatSpec",
    "ObservableSpec",
    "CommandSpec",
    "FlowplugError",
    "PluginError",
    "UnknownComponentError",
    "DuplicateComponentError",
    "ConfigError",
    "FormatError",
    "ChecksumError",
    "ShapeError",
    "PluginLoadWarning",
]
