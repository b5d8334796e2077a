"""Data-parallel training under torchrun (flowplug.distributed): 2 CPU processes (gloo) follow the
one-process run with the same seed and global batch, rank 0 alone writes, and the checkpoint of a
2-process run resumes in one process exactly where the one-process run would be. Sharded
sampling (hmc, sample, resample) is tested in tests/test_sharded_sampling.py."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowplug import distributed
from flowplug.config import build_config
from flowplug.errors import ConfigError
from flowplug.jobs.train import DEFAULT_CONFIG, OPEN_TABLES, resume_train, run_train

REPO = Path(__file__).resolve().parents[1]

SETTINGS = [
    "lattice=[4, 4]",
    "flow.n_layers=2",
    "flow.options.hidden=[8]",
    'flow.options.dtype="float64"',  # float64 networks: the curves agree to rounding
    "train.batch_size=8",
    "train.lr=0.01",
    "eval.samples=64",
    "threads=1",
]


def _log(run: Path) -> list[dict[str, float]]:
    with open(run / "train_log.csv", newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def _torchrun(out: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    sets = [a for s in [*SETTINGS, f"train.steps={steps}", f"out='{out}'", *extra] for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "flowplug", "train", "--config", str(REPO / "examples" / "train_phi4.toml"), "--no-progress"]
    return subprocess.run([*cmd, *sets], capture_output=True, text=True, timeout=600, env=env)


def _one_process(out: Path, steps: int, *extra: str) -> dict:
    cfg = build_config(
        DEFAULT_CONFIG,
        config_file=str(REPO / "examples" / "train_phi4.toml"),
        overrides=[*SETTINGS, f"train.steps={steps}", f"out='{out}'", "train.progress=false", *extra],
        open_tables=OPEN_TABLES,
    )
    return run_train(cfg)


def test_one_process_is_a_world_of_one():
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    assert distributed.slice_of(6) == slice(0, 6)


@pytest.mark.slow
def test_two_processes_follow_one_process_and_resume_in_one(tmp_path):
    """Path gradients (train_phi4.toml) on 2 gloo ranks: the loss, free energy and ESS of every
    step equal the one-process run's to 1e-9 relative; summary.json records world_size 2 and only
    rank 0 reports; resuming the 2-rank checkpoint in one process continues as the one-process
    run does."""
    one = tmp_path / "one"
    _one_process(one, 3)
    resume_train(one, overrides={"steps": 5})  # the schedule follows train.steps: 3, then 5, in both
    two = tmp_path / "two"
    r = _torchrun(two, 3)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("steps 3") == 1  # only rank 0 reports
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    resume_train(two, overrides={"steps": 5})
    a, b = _log(one), _log(two)
    assert [row["step"] for row in b] == [0, 1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss", "free_energy", "ess", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-9, abs=1e-12), (ra["step"], key)


def test_more_processes_than_gpus_are_refused_by_name(monkeypatch):
    """Two processes per node on one GPU: the second one's cuda:1 is refused with the count that
    torch sees (on an H200 machine torch raised 'invalid device ordinal' from deep inside)."""
    for var, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: pytest.fail(f"set_device({dev}) reached"))
    with pytest.raises(ConfigError, match=r"LOCAL_RANK 1 takes cuda:1, but torch sees 1 CUDA device.*nproc_per_node"):
        distributed.init_from_env("cuda")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    explicit = r"device = 'cuda:3' under torchrun: torch sees 1 CUDA device\(s\) on this node$"
    with pytest.raises(ConfigError, match=explicit):
        distributed.init_from_env("cuda:3")


def test_global_batch_must_split_evenly(monkeypatch, tmp_path):
    """A global batch that the world size does not divide is refused with the two numbers."""
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(ConfigError, match=r"batch_size \(8\) is the global batch.*\(3\)"):
        _one_process(tmp_path / "x", 1)
