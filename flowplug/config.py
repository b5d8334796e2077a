"""TOML run configurations with dotted overrides, shared by every subcommand.

Each subcommand declares its complete default configuration as commented TOML text;
``--print-config`` prints that text, ``--config FILE`` merges a user's file over it and
``--set a.b=value`` (repeatable) overrides single keys. Values given with ``--set`` are
parsed as TOML (``--set lattice=[8,8]``, ``--set hmc.integrator=omelyan``; a bare word
that is not valid TOML is taken as a string). Unknown keys and type mismatches are
:class:`ConfigError`\\ s that name the key, the expected and the found type.
"""

from __future__ import annotations

import copy
import difflib
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from flowplug.errors import ConfigError


def parse_toml(text: str, source: str = "<string>") -> dict[str, Any]:
    """Parse TOML text.

    Raises:
        ConfigError: naming ``source`` and the parser's message.
    """
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None


def load_toml_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML file.

    Raises:
        ConfigError: if the file is missing, unreadable or not valid TOML.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    return parse_toml(text, str(path))


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "list", dict: "table"}.get(
        type(value), type(value).__name__
    )


def _compatible(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, int):
        return isinstance(value, int)
    if isinstance(default, dict):
        return isinstance(value, dict)
    if isinstance(default, list):
        if not isinstance(value, list):
            return False
        # a non-empty default list fixes the element type (lattice = [8, 8] takes integers)
        return not default or all(_compatible(default[0], v) for v in value)
    if isinstance(default, str):
        return isinstance(value, str)
    return True


def _all_keys(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in tree.items():
        keys.append(prefix + k)
        if isinstance(v, dict):
            keys.extend(_all_keys(v, prefix + k + "."))
    return keys


def merge(
    defaults: Mapping[str, Any],
    override: Mapping[str, Any],
    *,
    source: str,
    open_tables: Iterable[str] = (),
    _prefix: str = "",
) -> dict[str, Any]:
    """Merge ``override`` into a deep copy of ``defaults``, checking keys and types.

    Arguments:
        defaults: Complete default configuration.
        override: User values (from a file or ``--set``).
        source: Where ``override`` came from, for messages.
        open_tables: Dotted table names whose sub-keys are free (plugin options): new
            keys are accepted there and existing ones are still type-checked.

    Raises:
        ConfigError: on an unknown key (with the closest known key) or a type mismatch.
    """
    open_tables = set(open_tables)
    is_open = _prefix.rstrip(".") in open_tables
    out = copy.deepcopy(dict(defaults))
    for key, value in override.items():
        dotted = _prefix + key
        if key not in out:
            if is_open:
                out[key] = copy.deepcopy(value)
                continue
            known = _all_keys(defaults, _prefix)
            close = difflib.get_close_matches(dotted, known, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"{source}: unknown configuration key '{dotted}'.{hint} `--print-config` lists every key."
            )
        default = out[key]
        if not _compatible(default, value):
            raise ConfigError(
                f"{source}: '{dotted}' must be of type {_type_name(default)}, found {_type_name(value)} {value!r}"
            )
        if isinstance(default, dict):
            out[key] = merge(default, value, source=source, open_tables=open_tables, _prefix=dotted + ".")
        elif isinstance(default, float) and not isinstance(value, bool):
            out[key] = float(value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> dict[str, Any]:
    """Turn ``"a.b.c=value"`` into ``{"a": {"b": {"c": value}}}``.

    The value is parsed as a TOML value; if that fails it is taken as a plain string.

    Raises:
        ConfigError: if there is no ``=`` or the key is empty.
    """
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, for example --set hmc.trajectories=200")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: empty key")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    tree: dict[str, Any] = {}
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


def build_config(
    default_text: str,
    *,
    config_file: str | Path | None = None,
    overrides: Iterable[str] = (),
    open_tables: Iterable[str] = (),
) -> dict[str, Any]:
    """The effective configuration: defaults, then ``config_file``, then each override.

    Arguments:
        default_text: Complete, commented default configuration (TOML).
        config_file: User's TOML file, or ``None``.
        overrides: ``"dotted.key=value"`` strings, applied in order.
        open_tables: Dotted table names whose sub-keys are free.

    Raises:
        ConfigError: see :func:`merge`, :func:`parse_override`, :func:`load_toml_file`.
    """
    config = parse_toml(default_text, "default configuration")
    if config_file is not None:
        config = merge(config, load_toml_file(config_file), source=str(config_file), open_tables=open_tables)
    for text in overrides:
        config = merge(config, parse_override(text), source=f"--set {text}", open_tables=open_tables)
    return config


def get(config: Mapping[str, Any], dotted: str) -> Any:
    """``config["a"]["b"]`` for ``dotted = "a.b"``.

    Raises:
        ConfigError: if the key is missing.
    """
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(f"configuration key '{dotted}' is missing")
        node = node[part]
    return node


def dumps(config: Mapping[str, Any]) -> str:
    """Write a configuration back as TOML (no comments), for provenance records."""
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise ConfigError(f"cannot write {type(v).__name__} {v!r} as TOML")

    def key(k: str) -> str:
        return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else value(k)

    def emit(prefix: str, tree: Mapping[str, Any]) -> None:
        sub = []
        for k, v in tree.items():
            if isinstance(v, Mapping):
                sub.append((f"{prefix}{key(k)}", v))
            else:
                lines.append(f"{key(k)} = {value(v)}")
        for name, t in sub:
            tables.append((name, t))

    emit("", config)
    while tables:
        name, t = tables.pop(0)
        lines.append(f"\n[{name}]")
        emit(name + ".", t)
    return "\n".join(lines) + "\n"
