"""The mutants of ``tests/mutation.py`` still point at real code (each snippet once)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("flowplug_mutation_script", HERE / "mutation.py")
mutation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mutation)


@pytest.mark.parametrize("mutant", mutation.MUTANTS, ids=[m[0] for m in mutation.MUTANTS])
def test_mutant_snippet_occurs_once(mutant):
    name, path, old, new, tests = mutant
    text = (mutation.ROOT / path).read_text()
    assert text.count(old) == 1, f"{name}: snippet found {text.count(old)} times in {path}"
    assert old != new
    assert any((mutation.ROOT / t).exists() for t in tests)
