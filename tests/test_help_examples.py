"""Every example a user is shown works with the command it is shown for.

Collected from each built-in command's ``--help`` (argument help and the examples of its
epilog), from each job's default configuration (the ``--print-config`` text), from
``flowplug demo --quick``'s overrides, and from the fenced code blocks of ``README.md``
and ``docs/*.md``. Each example command line must parse with that command's parser, and
its ``--set`` overrides (and an ``examples/*.toml`` given with ``--config``) must pass that
command's configuration validation (:func:`flowplug.config.build_config`: known keys,
right types).
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

from flowplug import config as _config
from flowplug.cli import build_parser
from flowplug.cli.commands import builtin_command_modules

REPO = Path(__file__).resolve().parents[1]
PLACEHOLDER = re.compile(r"<[a-z_]+>|\.\.\.|\[--|\bKEY=VALUE\b|\bkey=value\b|\b[A-Z]{2,}\b(?![=.])")


def _commands() -> dict[str, object]:
    """name -> cmd module of every built-in command."""
    out = {}
    for name in builtin_command_modules():
        module = importlib.import_module(name)
        out[module.COMMAND.name] = module
    return out


COMMANDS = _commands()


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _check_overrides(command: str, overrides: list[str], config_file: str | None = None) -> None:
    """Validate ``--set`` values (and an example config file) with the command's configuration."""
    module = COMMANDS[command]
    default = getattr(module, "DEFAULT_CONFIG", None)
    if default is None:
        assert not overrides and not config_file, f"{command} takes no configuration"
        return
    path = None
    if config_file is not None:
        candidate = REPO / config_file
        if candidate.exists():
            path = candidate
        else:
            assert not config_file.startswith("examples/"), f"{config_file}: no such example file"
    _config.build_config(default, config_file=path, overrides=overrides, open_tables=getattr(module, "OPEN_TABLES", ()))


def _check_line(line: str, where: str) -> None:
    """Parse one example command line with the parser and configuration of its command."""
    words = shlex.split(line, comments=True)
    assert words[0] == "flowplug", f"{where}: {line}"
    command = words[1]
    assert command in COMMANDS, f"{where}: unknown command {command!r} in {line!r}"
    parser = build_parser()
    try:
        args = parser.parse_args(words[1:])
    except SystemExit as exc:  # argparse refuses it
        raise AssertionError(f"{where}: `{line}` does not parse with flowplug {command}'s parser") from exc
    _check_overrides(command, list(getattr(args, "overrides", []) or []), getattr(args, "config", None))


def _help_examples() -> list[tuple[str, str, str]]:
    """(command, source, example) for every example in each command's --help."""
    out = []
    for name in COMMANDS:
        text = _subparser(name).format_help()
        for line in text.splitlines():
            if line.strip().startswith("flowplug ") and not PLACEHOLDER.search(line.split("#")[0]):
                out.append((name, f"flowplug {name} --help", line.strip()))
        for value in re.findall(r"--set\s+([A-Za-z0-9_.-]+=\S+)", " ".join(text.split())):
            if not PLACEHOLDER.search(value):
                out.append((name, f"flowplug {name} --help (--set)", value.rstrip(").,;")))
    return out


def _config_doc_examples() -> list[tuple[str, str, str]]:
    """(command, source, KEY=VALUE) for every ``--set`` in a job's default configuration text."""
    out = []
    for name, module in COMMANDS.items():
        text = getattr(module, "DEFAULT_CONFIG", "")
        for value in re.findall(r"--set\s+([A-Za-z0-9_.-]+=\S+)", text):
            if not PLACEHOLDER.search(value):
                out.append((name, f"flowplug {name} --print-config", value.rstrip(").,;")))
    return out


def _docs_examples() -> list[tuple[str, str]]:
    """(source, command line) of every concrete ``flowplug`` command in the fenced code blocks
    of README.md and docs/*.md (lines with placeholders such as ``<command>`` or ``FILE...`` left out)."""
    out = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        if not path.exists():
            continue
        for block in re.findall(r"```[a-z]*\n(.*?)```", path.read_text(encoding="utf-8"), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip()
                if line.startswith("flowplug ") and not PLACEHOLDER.search(line.split("#")[0]):
                    out.append((path.name, line))
    return out


HELP = _help_examples()
CONFIG_DOCS = _config_doc_examples()
DOCS = _docs_examples()


def test_the_examples_are_found():
    """Every command that runs from a configuration shows examples in its --help."""
    with_config = {n for n, m in COMMANDS.items() if hasattr(m, "DEFAULT_CONFIG")}
    assert with_config >= {"hmc", "sample", "resample", "train", "demo"}
    shown = {c for c, src, line in HELP if line.startswith("flowplug ")}
    assert shown >= with_config, with_config - shown
    assert {c for c, src, v in HELP if "(--set)" in src} >= with_config  # the --set help shows a real key
    assert any(src == "README.md" for src, _ in DOCS)


@pytest.mark.parametrize("command, source, example", HELP, ids=[f"{c}:{e[:60]}" for c, _, e in HELP])
def test_help_examples_use_what_the_command_accepts(command, source, example):
    if example.startswith("flowplug "):
        _check_line(example, source)
        assert shlex.split(example, comments=True)[1] == command, f"{source} shows another command: {example}"
    else:
        _check_overrides(command, [example])


def test_config_doc_examples_use_keys_of_the_command():
    """Every ``--set KEY=VALUE`` in a ``--print-config`` text names a key of that command
    (and each default configuration validates against itself)."""
    for command, module in COMMANDS.items():
        if hasattr(module, "DEFAULT_CONFIG"):
            _check_overrides(command, [])
    for command, _source, value in CONFIG_DOCS:
        _check_overrides(command, [value])


@pytest.mark.parametrize("source, line", DOCS, ids=[f"{s}:{line[:60]}" for s, line in DOCS])
def test_docs_examples_parse(source, line):
    _check_line(line, source)


def test_demo_quick_overrides_are_demo_keys():
    from flowplug.jobs.demo import QUICK

    _check_overrides("demo", list(QUICK))


def test_the_check_catches_a_wrong_key():
    """The old shared help of --set showed hmc's key to every command."""
    with pytest.raises(Exception, match="unknown configuration key 'hmc"):
        _check_overrides("sample", ["hmc.trajectories=200"])
    with pytest.raises(AssertionError, match="does not parse"):
        _check_line("flowplug hmc --lattice 4x4x4x4", "test")
