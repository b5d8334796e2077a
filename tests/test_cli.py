"""Command-line conventions: --version, plugins, exit codes, config handling."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import flowplug
from flowplug.cli import main
from flowplug.cli.common import add_config_arguments, config_from_args
from flowplug.errors import ConfigError
from flowplug.records import CommandSpec

DEFAULT = """\
# Example run configuration.
seed = 1          # random seed
lattice = [8, 8]  # x first

[hmc]
trajectories = 100  # number of trajectories
step_size = 0.1
"""


class DemoCommands:
    """A test plugin adding a configurable subcommand that can fail on request."""

    @flowplug.hookimpl
    def flowplug_commands(self):
        def add(parser):
            add_config_arguments(parser)
            parser.add_argument("--out")

        def run(args):
            cfg = config_from_args(args, DEFAULT)
            if cfg is None:
                return 0
            if cfg["hmc"]["trajectories"] < 0:
                raise ConfigError(f"hmc.trajectories must be >= 0, found {cfg['hmc']['trajectories']:d}")
            if args.out:
                flowplug.fsutil.write_summary(args.out, "demo-run", {"trajectories": cfg["hmc"]["trajectories"]})
            print(json.dumps(cfg))
            return 0

        return [CommandSpec(name="demo-run", description="test command", factory=add, run=run)]


@pytest.fixture
def demo_pm(fresh_pm):
    import flowplug.fsutil  # noqa: F401  (used inside the command)

    fresh_pm.register(DemoCommands(), name="democmd", provider=("demo", "1"))
    return fresh_pm


def test_version(capsys, monkeypatch):
    def no_plugins():
        raise AssertionError("--version must not load plugins")

    monkeypatch.setattr("flowplug.manager.get_plugin_manager", no_plugins)
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"flowplug {flowplug.__version__}"


def test_plugins_json_lists_components_with_providers(fresh_pm, capsys):
    assert main(["plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"kind", "name", "aliases", "provider", "version", "description"} <= set(rows[0])
    plugins_row = next(r for r in rows if r["name"] == "plugins")
    assert (plugins_row["kind"], plugins_row["provider"], plugins_row["version"]) == (
        "command",
        "flowplug",
        flowplug.__version__,
    )
    assert len(rows) == sum(1 for _ in fresh_pm.components())


def test_plugins_table(fresh_pm, capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["kind", "name", "provider", "description"]
    assert any(line.startswith("command") and "plugins" in line for line in out[1:])


def test_usage_error_exits_2(fresh_pm, capsys):
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["plugins", "--no-such-flag"])
    assert info.value.code == 2


def test_no_command_prints_help_and_exits_2(fresh_pm, capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().err


def test_print_config_prints_commented_defaults(demo_pm, capsys):
    assert main(["demo-run", "--print-config"]) == 0
    assert capsys.readouterr().out == DEFAULT


def test_print_config_with_overrides_prints_effective(demo_pm, capsys):
    assert main(["demo-run", "--print-config", "--set", "hmc.trajectories=7"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# effective configuration")
    assert "trajectories = 7" in out


def test_config_file_and_overrides(demo_pm, capsys, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text("seed = 5\n[hmc]\ntrajectories = 20\n")
    assert (
        main(
            [
                "demo-run",
                "--config",
                str(cfg),
                "--set",
                "hmc.step_size=0.05",
                "--set",
                "lattice=[4, 6]",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    got = json.loads(capsys.readouterr().out)
    assert got == {"seed": 5, "lattice": [4, 6], "hmc": {"trajectories": 20, "step_size": 0.05}}
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["command"] == "demo-run" and summary["trajectories"] == 20


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--set", "hmc.trajectorie=3"],
            "unknown configuration key 'hmc.trajectorie'. Did you mean 'hmc.trajectories'?",
        ),
        (["--set", "hmc.trajectories=2.5"], "'hmc.trajectories' must be of type integer, found float 2.5"),
        (["--set", "seed"], "expected KEY=VALUE"),
        (["--config", "/no/such/file.toml"], "cannot read config file /no/such/file.toml"),
        (["--set", "hmc.trajectories=-1"], "hmc.trajectories must be >= 0, found -1"),
    ],
)
def test_user_errors_exit_1_with_message_and_no_traceback(demo_pm, capsys, args, message):
    assert main(["demo-run", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("flowplug demo-run: error: ")
    assert message in " ".join(err.split())
    assert "Traceback" not in err


def test_invalid_toml_file(demo_pm, capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[hmc\n")
    assert main(["demo-run", "--config", str(bad)]) == 1
    assert f"{bad}: not valid TOML" in capsys.readouterr().err


def test_debug_shows_traceback(demo_pm, capsys):
    assert main(["demo-run", "--set", "hmc.trajectories=-1", "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_console_script_runs_in_subprocess():
    script = shutil.which(
        "flowplug", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    )
    assert script, "the flowplug console script is not installed"
    proc = subprocess.run([script, "--version"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"flowplug {flowplug.__version__}"
    proc = subprocess.run([sys.executable, "-m", "flowplug", "plugins"], capture_output=True, text=True)
    assert proc.returncode == 0 and "plugins" in proc.stdout


def test_broken_third_party_command_is_skipped(fresh_pm, capsys):
    class BadCommand:
        @flowplug.hookimpl
        def flowplug_commands(self):
            def add(parser):
                parser.add_argument("--debug")  # clashes with the common option

            return [CommandSpec(name="bad-cmd", description="broken", factory=add, run=lambda a: 0)]

    fresh_pm.register(BadCommand(), name="badcmd", provider=("badcmd-pkg", "0.1"))
    assert main(["plugins"]) == 0
    err = capsys.readouterr().err
    assert err.startswith(
        "flowplug: warning: flowplug plugin 'badcmd' (badcmd-pkg 0.1) failed to add command 'bad-cmd'"
    )
    with pytest.raises(SystemExit) as info:
        main(["bad-cmd"])
    assert info.value.code == 2


def test_strict_mode_broken_plugin_exits_1(tmp_path, monkeypatch, capsys):
    from flowplug.manager import set_plugin_manager

    from fakedist import activate, forget_modules, make_distribution

    make_distribution(
        tmp_path,
        "fakebroken",
        "0.3",
        {"broken": "fakebroken_cli"},
        {"fakebroken_cli": "raise ImportError('missing dependency foo')\n"},
    )
    forget_modules("fakebroken_cli")
    activate(tmp_path, monkeypatch)
    monkeypatch.setenv("FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD", "0")
    monkeypatch.setenv("FLOWPLUG_STRICT_PLUGINS", "1")
    monkeypatch.setenv("FLOWPLUG_BLOCK_PLUGINS", "flowplug-xy")
    old = set_plugin_manager(None)
    try:
        assert main(["plugins"]) == 1
    finally:
        set_plugin_manager(old)
    err = capsys.readouterr().err
    assert err.startswith(
        "flowplug: error: flowplug plugin 'broken' (fakebroken 0.3) could not be loaded: "
        "ImportError: missing dependency foo"
    )
    assert "Traceback" not in err
