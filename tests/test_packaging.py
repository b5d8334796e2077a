"""Packaging: the plugin folders ship under the flowplug namespace, from a built wheel too."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sys as _sys
import zipfile
from pathlib import Path

import pytest

if _sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import flowplug
from flowplug.manager import builtin_modules

REPO = Path(__file__).resolve().parents[1]
MAPPED = {"flowplug": "flowplug", "flowplug.plugins": "plugins", "flowplug.adapters": "adapters"}


def _tree_packages() -> set[str]:
    found = set()
    for pkg, folder in MAPPED.items():
        base = REPO / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            found.add(".".join((pkg, *rel)))
    return found


def test_pyproject_lists_every_package():
    conf = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(conf["packages"]) == _tree_packages()
    assert conf["package-dir"] == MAPPED


def test_no_generic_top_level_names_installed():
    import importlib.metadata as md

    top = md.distribution("flowplug").read_text("top_level.txt")
    if top is not None:  # setuptools writes it for wheels/editables
        assert set(top.split()) <= {"flowplug"}


def test_editable_install_imports_every_builtin():
    import importlib

    for name in builtin_modules():
        module = importlib.import_module(name)
        assert module.__name__.startswith("flowplug.")


@pytest.mark.slow
def test_built_wheel_contains_and_imports_every_builtin(tmp_path):
    pytest.importorskip("setuptools", reason="building the wheel without isolation needs setuptools")
    try:
        import setuptools.command.bdist_wheel  # noqa: F401  (setuptools >= 70.1)
    except ImportError:
        pytest.importorskip("wheel", reason="this setuptools needs the wheel package to build wheels")
    src = tmp_path / "src"
    src.mkdir()
    for item in ("pyproject.toml", "README.md", "flowplug", "plugins", "adapters"):
        path = REPO / item
        if path.is_dir():
            shutil.copytree(path, src / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / item)
    wheels = tmp_path / "wheels"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = wheels.glob("flowplug-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
        assert tops == {"flowplug"}, tops
        assert "flowplug/plugins/__init__.py" in names and "flowplug/adapters/__init__.py" in names
        site = tmp_path / "site"
        zf.extractall(site)
    script = (
        "import importlib, flowplug, flowplug.manager as m;"
        "mods=[importlib.import_module(n) for n in m.builtin_modules()];"
        f"assert all(x.__file__.startswith({str(site)!r}) for x in mods), [x.__file__ for x in mods];"
        "pm=m.new_plugin_manager(autoload=False);"
        "print(flowplug.__version__, len(list(pm.components())))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    version, count = proc.stdout.split()
    assert version == flowplug.__version__ and int(count) > 0
