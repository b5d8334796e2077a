"""Event hooks reach monitor plugins with the documented arguments."""

from __future__ import annotations

import json

import flowplug
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
