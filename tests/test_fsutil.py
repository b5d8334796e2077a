"""Atomic output: no partial file under the final name, no silent overwrite."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from flowplug.errors import FlowplugError
from flowplug.fsutil import atomic_path, atomic_write, write_json


def test_interrupted_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as fh:
            fh.write(b"partial")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_keeps_old_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target, "w") as fh:
            fh.write("new")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_refuses_overwrite_when_asked(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("input")
    with pytest.raises(FlowplugError, match="refusing to overwrite"):
        with atomic_write(target, "w", overwrite=False) as fh:
            fh.write("x")
    assert target.read_text() == "input"


def test_atomic_path_for_libraries(tmp_path):
    with atomic_path(tmp_path / "a.npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.arange(3))
    assert np.load(tmp_path / "a.npy", allow_pickle=False).tolist() == [0, 1, 2]
    assert len(list(tmp_path.iterdir())) == 1


def test_write_json_converts_arrays_and_non_finite(tmp_path):
    path = write_json(tmp_path / "s.json", {"a": np.float64(0.5), "b": np.arange(2), "c": math.nan, "d": math.inf})
    assert json.loads(path.read_text()) == {"a": 0.5, "b": [0, 1], "c": "nan", "d": "inf"}


def test_outputs_get_default_permissions(tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        path = write_json(tmp_path / "p.json", {})
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
