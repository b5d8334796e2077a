"""flowplug: normalizing-flow sampling for lattice field theory, as plugins.

The core (this package) holds the hook specifications, the plugin manager and typed
registries, the configuration system, the drivers and the command line; it knows no
theory and no file format. Everything concrete is a plugin: the built-ins in
``flowplug.plugins`` and ``flowplug.adapters``, third-party packages through the
entry-point group ``flowplug``.

Quick use::

    import flowplug
    flowplug.registry("action").names()          # registered actions
    flowplug.registry("field_kind").names()      # field kinds: o2, scalar, su (su<N>), u1
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
    UnknownFieldKindError,
)
from flowplug.hookspecs import hookimpl
from flowplug.manager import get_component, get_plugin_manager, new_plugin_manager, registry
from flowplug.records import (
    ActionSpec,
    CommandSpec,
    DiracOperatorSpec,
    FieldKindSpec,
    FileFormatSpec,
    FlowLayerSpec,
    KernelSpec,
    ObservableSpec,
    PriorSpec,
    PseudofermionModelSpec,
)

__all__ = [
    "__version__",
    "hookimpl",
    "get_plugin_manager",
    "new_plugin_manager",
    "registry",
    "get_component",
    "FieldKindSpec",
    "ActionSpec",
    "FlowLayerSpec",
    "PriorSpec",
    "KernelSpec",
    "FileFormatSpec",
    "ObservableSpec",
    "DiracOperatorSpec",
    "PseudofermionModelSpec",
    "CommandSpec",
    "FlowplugError",
    "PluginError",
    "UnknownComponentError",
    "UnknownFieldKindError",
    "DuplicateComponentError",
    "ConfigError",
    "FormatError",
    "ChecksumError",
    "ShapeError",
    "PluginLoadWarning",
]
