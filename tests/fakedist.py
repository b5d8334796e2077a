"""Build fake installed distributions (dist-info with entry_points.txt) for plugin tests."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path


def make_distribution(
    root: Path, dist: str, version: str, entry_points: dict[str, str], modules: dict[str, str]
) -> None:
    """Write modules and a ``<dist>-<version>.dist-info`` folder under ``root``.

    Arguments:
        root: Folder that will be put on ``sys.path``.
        dist: Distribution name.
        version: Distribution version.
        entry_points: Entry-point name -> object reference in the ``flowplug`` group.
        modules: Module name -> source text.
    """
    for name, source in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = ["[flowplug]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


def activate(root: Path, monkeypatch) -> None:
    """Put ``root`` on ``sys.path`` for the duration of a test."""
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()


def forget_modules(*names: str) -> None:
    """Drop modules from ``sys.modules`` so the next import re-executes them."""
    for n in names:
        sys.modules.pop(n, None)
