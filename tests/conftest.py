"""Shared fixtures.

Third-party plugin autoload is disabled for the whole suite, so that whatever a user
has installed cannot leak into the tests; tests that exercise entry-point discovery
turn it on explicitly.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD"] = "1"
os.environ.pop("FLOWPLUG_STRICT_PLUGINS", None)
os.environ.pop("FLOWPLUG_BLOCK_PLUGINS", None)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture
def fresh_pm():
    """A fresh plugin manager with built-ins only, installed as the process-wide one."""
    from flowplug.manager import new_plugin_manager, set_plugin_manager

    pm = new_plugin_manager(autoload=False)
    old = set_plugin_manager(pm)
    yield pm
    set_plugin_manager(old)


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (small tensors: more threads only add contention)."""
    from flowplug.threads import one_thread as single

    with single():
        yield


@pytest.fixture
def shared_dir() -> Path:
    """``../shared`` beside the repository; skips the test when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (real ensembles and reference values live there)")
    return SHARED
