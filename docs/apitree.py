"""MkDocs hook: the package tree as it is installed, for the API reference.

``plugins/`` and ``adapters/`` ship as ``flowplug.plugins`` and ``flowplug.adapters``
(``[tool.setuptools.package-dir]`` in pyproject.toml), so the docstrings are read from
``build/apisrc/flowplug``, a folder of links that puts them where the installed package
has them. Nothing is imported: the reference is built from the source alone.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def on_startup(**kwargs) -> None:
    """Build ``build/apisrc/flowplug`` before the documentation is read."""
    tree = ROOT / "build" / "apisrc" / "flowplug"
    if tree.parent.exists():
        shutil.rmtree(tree.parent)
    tree.mkdir(parents=True)
    for entry in (ROOT / "flowplug").iterdir():
        if entry.name != "__pycache__":
            os.symlink(entry, tree / entry.name)
    for name in ("plugins", "adapters"):
        os.symlink(ROOT / name, tree / name)


if __name__ == "__main__":  # CI: `python docs/apitree.py`, then mypy checks build/apisrc/flowplug
    on_startup()
