"""Built-in plugin that registers the subcommands found in ``flowplug/cli/cmd_*.py``.

Adding a subcommand is adding one file ``cmd_<name>.py`` with a module-level
``COMMAND`` (:class:`flowplug.records.CommandSpec`); files are taken in name order.
"""

from __future__ import annotations

import importlib
import pkgutil

import flowplug.cli
from flowplug.hookspecs import hookimpl
from flowplug.records import CommandSpec


def builtin_command_modules() -> list[str]:
    """Module names of the built-in subcommand files, sorted."""
    return sorted(
        f"flowplug.cli.{m.name}" for m in pkgutil.iter_modules(flowplug.cli.__path__) if m.name.startswith("cmd_")
    )


@hookimpl
def flowplug_commands() -> list[CommandSpec]:
    """The built-in subcommands."""
    return [importlib.import_module(name).COMMAND for name in builtin_command_modules()]
