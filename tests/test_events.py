"""Event hooks reach monitor plugins with the documented arguments."""

from __future__ import annotations

import json

import pytest

import flowplug
from flowplug.errors import PluginLoadWarning
from flowplug.fsutil import write_summary


class Recorder:
    """A monitor plugin implementing every event hook."""

    def __init__(self):
        self.calls = []

    @flowplug.hookimpl
    def flowplug_after_chain_step(self, step, kernel, info):
        self.calls.append(("flowplug_after_chain_step", step, kernel, dict(info)))

    @flowplug.hookimpl
    def flowplug_after_train_step(self, step, metrics):
        self.calls.append(("flowplug_after_train_step", step, dict(metrics)))

    @flowplug.hookimpl
    def flowplug_checkpoint_written(self, path, step, what):
        self.calls.append(("flowplug_checkpoint_written", path, step, what))

    @flowplug.hookimpl
    def flowplug_run_finished(self, command, out, summary):
        self.calls.append(("flowplug_run_finished", command, out, summary["acceptance"]))


def test_event_hooks_reach_a_monitor_plugin(fresh_pm, tmp_path):
    rec = Recorder()
    fresh_pm.register(rec, name="recorder")
    fresh_pm.check_pending()
    fresh_pm.hook.flowplug_after_chain_step(step=3, kernel="hmc", info={"accepted": True})
    fresh_pm.hook.flowplug_after_train_step(step=4, metrics={"loss": 1.5})
    fresh_pm.hook.flowplug_checkpoint_written(path="ck.pt", step=4, what="train")
    path = write_summary(tmp_path, "hmc", {"acceptance": 0.75})
    assert json.loads(path.read_text())["acceptance"] == 0.75
    assert rec.calls == [
        ("flowplug_after_chain_step", 3, "hmc", {"accepted": True}),
        ("flowplug_after_train_step", 4, {"loss": 1.5}),
        ("flowplug_checkpoint_written", "ck.pt", 4, "train"),
        ("flowplug_run_finished", "hmc", str(tmp_path), 0.75),
    ]


class Raiser:
    """A third-party monitor that raises in every event hook."""

    def __init__(self):
        self.calls = 0

    def _boom(self):
        self.calls += 1
        raise RuntimeError("monitor bug")

    @flowplug.hookimpl
    def flowplug_after_chain_step(self, step, kernel, info):
        self._boom()

    @flowplug.hookimpl
    def flowplug_after_train_step(self, step, metrics):
        self._boom()

    @flowplug.hookimpl
    def flowplug_checkpoint_written(self, path, step, what):
        self._boom()

    @flowplug.hookimpl
    def flowplug_run_finished(self, command, out, summary):
        self._boom()


@pytest.fixture
def raiser(fresh_pm):
    mon = Raiser()
    fresh_pm.register(mon, name="raising-monitor")
    fresh_pm.check_pending()
    return mon


def test_a_raising_monitor_does_not_stop_training(raiser, tmp_path, one_thread):
    from flowplug.train import build_trainer

    cfg = {
        "lattice": [4, 4],
        "seed": 0,
        "device": "cpu",
        "action": {"name": "wilson", "group": "u1", "beta": 1.0},
        "flow": {"layers": ["u1-ncp"], "n_layers": 2, "options": {"hidden": [4]}},
        "train": {"steps": 3, "batch_size": 8, "progress": False, "checkpoint_every": 0},
    }
    trainer = build_trainer(cfg, out=tmp_path / "t")
    with pytest.warns(PluginLoadWarning, match="raising-monitor.*monitor bug"):
        trainer.run()
    assert trainer.step == 3 and (tmp_path / "t" / "checkpoint.pt").exists()
    assert raiser.calls == 4  # three steps and the final checkpoint


def test_a_raising_monitor_does_not_stop_hmc_or_sample(raiser, tmp_path, one_thread, capsys):
    """The commands show warnings on stderr (one line each, flowplug.cli)."""
    from flowplug.cli import main

    out = tmp_path / "h"
    assert (
        main(
            [
                "hmc",
                "--set",
                f"out={out}",
                "--set",
                "lattice=[4,4]",
                "--set",
                "chains=2",
                "--set",
                "hmc.trajectories=4",
                "--set",
                "hmc.thermalization=1",
                "--no-progress",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    for hook in ("flowplug_after_chain_step", "flowplug_checkpoint_written", "flowplug_run_finished"):
        assert (
            f"'raising-monitor' (raising-monitor) raised in {hook}: RuntimeError: monitor bug; the run goes on" in err
        )
    assert (out / "summary.json").exists()
    hmc_calls = raiser.calls
    assert hmc_calls >= 4 + 1  # chain steps (and checkpoints) and run_finished

    from flowplug.train import build_trainer

    cfg = {
        "lattice": [4, 4],
        "seed": 0,
        "device": "cpu",
        "action": {"name": "wilson", "group": "u1", "beta": 1.0},
        "flow": {"layers": ["u1-ncp"], "n_layers": 2, "options": {"hidden": [4]}},
        "train": {"steps": 0, "batch_size": 8, "progress": False, "checkpoint_every": 0},
    }
    trainer = build_trainer(cfg, out=tmp_path / "f")
    trainer.run()
    s = tmp_path / "s"
    capsys.readouterr()
    assert (
        main(
            [
                "sample",
                "--flow",
                str(tmp_path / "f"),
                "--out",
                str(s),
                "--no-progress",
                "--set",
                "chains=2",
                "--set",
                "steps=3",
                "--set",
                "thermalize=0",
                "--set",
                "ess_samples=8",
            ]
        )
        == 0
    )
    assert "raised in flowplug_after_chain_step" in capsys.readouterr().err
    assert (s / "summary.json").exists() and raiser.calls > hmc_calls + 3
