"""The ``device`` key of the sampling jobs (``hmc``, ``sample``, ``resample``) on a CPU-only machine.

What runs on a CUDA device is checked by tests/test_cuda_exact.py (skipped without one); here:
the key is listed, a bad value is refused before anything is written, the device used is
recorded in ``summary.json``, and the default ``"cpu"`` leaves the fingerprints of runs
made before the key existed unchanged (so they stay resumable).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from flowplug.cli import main
from flowplug.errors import ConfigError
from flowplug.jobs import resample as resample_job
from flowplug.jobs import sample as sample_job
from flowplug.jobs.chains import job_device
from flowplug.jobs.provenance import fingerprint

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL_HMC = ["--set", "action.name=wilson", "--set", "action.group=u1", "--set", "action.beta=1.0"]


@pytest.mark.parametrize("command", ["hmc", "sample", "resample"])
def test_every_sampling_job_lists_a_device_key(command, capsys):
    assert main([command, "--print-config"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("device = ")]
    assert lines and lines[0].split("#")[0].strip() == 'device = "cpu"'


def test_job_device_accepts_torch_devices_and_names_a_bad_value():
    assert job_device({}) == "cpu" and job_device({"device": "cpu"}) == "cpu"
    with pytest.raises(ConfigError, match="device = 'gpu0'"):
        job_device({"device": "gpu0"})
    with pytest.raises(ConfigError, match="device = 'meta'.*'cpu' or 'cuda'"):
        job_device({"device": "meta"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_cuda_device_without_cuda_is_refused_by_name():
    with pytest.raises(ConfigError, match="device = 'cuda'.*no CUDA device"):
        job_device({"device": "cuda"})


@pytest.mark.parametrize("command", ["hmc", "sample"])
def test_a_bad_device_is_refused_before_anything_is_written(command, tmp_path, capsys):
    out = tmp_path / "run"
    args = [command, *SMALL_HMC, "--set", "lattice=[4, 4]", "--set", 'device="nonsense"', "--no-progress"]
    args += ["--set", f'out="{out}"'] if command == "hmc" else ["--out", str(out)]
    assert main(args) != 0
    assert "device = 'nonsense'" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_sample_records_its_device_in_the_summary(tmp_path):
    out = tmp_path / "s"
    args = ["sample", *SMALL_HMC, "--set", "lattice=[4, 4]", "--set", "chains=2", "--set", "steps=4"]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "summary.json").read_text())["device"] == "cpu"


@pytest.mark.parametrize("job", [sample_job, resample_job])
def test_the_default_device_leaves_earlier_fingerprints_unchanged(job):
    # a configuration written before the key existed, and the same one with the default added
    old = {"seed": 1, "steps": 10, "kernel": {"type": "flow"}}
    new = {**old, "device": "cpu"}
    ignore, added = job.NON_CHAIN_KEYS, job.ADDED_KEYS

    def fp(cfg):
        return fingerprint(cfg, ignore=ignore, omit_defaults=added)

    assert fp(new) == fp(old)
    assert fp({**old, "device": "cuda"}) != fp(old)


def _u1_flow_and_file(tmp_path):
    """A tiny untrained 2D U(1) flow checkpoint and one HDF5 configuration for it."""
    from flowplug import io
    from flowplug.plugins.theories import WilsonGaugeAction
    from flowplug.train import build_trainer

    cfg = {
        "lattice": [4, 4],
        "seed": 0,
        "device": "cpu",
        "action": {"name": "wilson", "group": "u1", "beta": 1.0},
        "flow": {"layers": ["u1-ncp"], "n_layers": 2, "options": {"hidden": [4]}},
        "train": {"steps": 0, "batch_size": 8, "progress": False, "checkpoint_every": 0},
    }
    trainer = build_trainer(cfg, out=tmp_path / "run")
    flow = trainer.save_checkpoint(tmp_path / "flow.pt")
    act = WilsonGaugeAction(1.0, "u1")
    io.write(tmp_path / "cfg.h5", io.Ensemble(act.hot_start((4, 4), 1, generator=torch.Generator().manual_seed(3))))
    return flow, tmp_path / "cfg.h5"


def test_propose_takes_a_device_and_names_a_bad_one(tmp_path, capsys):
    flow, current = _u1_flow_and_file(tmp_path)
    base = ["propose", "--flow", str(flow), "--current", str(current), "--seed", "4", "--no-decide"]
    assert main([*base, "--out", str(tmp_path / "a.h5"), "--device", "cpu"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["accepted"] is None and math.isfinite(line["log_q_current"])
    assert main([*base, "--out", str(tmp_path / "b.h5"), "--device", "gpu0"]) != 0
    assert "device = 'gpu0'" in capsys.readouterr().err
    assert not (tmp_path / "b.h5").exists()
