"""Meta-tests of the hook contract: every hook is documented, has an example and a test."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from flowplug import hookspecs

TESTS = Path(__file__).resolve().parent


def _hook_names() -> list[str]:
    return sorted(n for n, f in vars(hookspecs).items() if n.startswith("flowplug_") and inspect.isfunction(f))


def test_every_hook_is_classified():
    assert set(_hook_names()) == set(hookspecs.COMPONENT_HOOKS) | set(hookspecs.EVENT_HOOKS)


@pytest.mark.parametrize("name", _hook_names())
def test_hook_is_documented_with_example(name):
    doc = inspect.getdoc(getattr(hookspecs, name)) or ""
    assert len(doc.splitlines()[0]) > 20, f"{name}: one-line summary missing"
    assert "Example::" in doc and "@hookimpl" in doc, f"{name}: no example implementation"


@pytest.mark.parametrize("name", _hook_names())
def test_hook_is_exercised_by_a_test(name):
    """Some other test file implements the hook (``def <name>(``) and so exercises it."""
    pattern = re.compile(rf"def {name}\(")
    users = [p.name for p in TESTS.glob("test_*.py") if p.name != Path(__file__).name and pattern.search(p.read_text())]
    assert users, f"no test implements hook {name}"


def test_component_hooks_of_builtins_return_records(fresh_pm):
    for hook_name, record_type in hookspecs.COMPONENT_HOOKS.items():
        for impl in getattr(fresh_pm.hook, hook_name).get_hookimpls():
            for record in impl.function():
                assert isinstance(record, record_type)
                assert record.description, f"{record.kind} {record.name} has no description"
