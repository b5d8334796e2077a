"""The split of the training module (issue 12, items 5 and 6).

- :mod:`flowplug.checkpoints` writes and reads flow checkpoints; the samplers
  (:func:`flowplug.flowtools.open_flow`) load a flow through it without constructing a
  trainer, an optimizer or a scheduler, and without importing :mod:`flowplug.train`;
- :mod:`flowplug.train` still exports every name that moved (same objects);
- :func:`flowplug.checkpoints.write_checkpoint` refuses non-finite parameters and states
  that are not checkpoints, leaving the file in place;
- :func:`flowplug.diagnostics.evaluate_flow` shows a progress bar on request, none in
  tests by default, and its figures do not depend on the bar.

Flows are tiny (4x4 U(1), two layers, two training steps, seed 0); nothing is statistical.
"""

from __future__ import annotations

import sys

import pytest
import torch

from flowplug import checkpoints, diagnostics, training_data
from flowplug.errors import CheckpointError, NonFiniteParametersError
from flowplug.flowtools import open_flow
from flowplug.manager import new_plugin_manager, set_plugin_manager

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_manager():
    old = set_plugin_manager(new_plugin_manager(autoload=False))
    yield
    set_plugin_manager(old)


def _u1_config(steps=2, progress=False):
    return {
        "lattice": [4, 4],
        "seed": 0,
        "device": "cpu",
        "action": {"name": "wilson", "group": "u1", "beta": 1.5},
        "flow": {"layers": ["u1-spline"], "n_layers": 2, "options": {"hidden": [4]}},
        "train": {"steps": steps, "batch_size": 8, "lr": 3e-3, "progress": progress, "checkpoint_every": 0},
    }


@pytest.fixture
def trained(tmp_path):
    from flowplug.train import build_trainer

    trainer = build_trainer(_u1_config(), out=tmp_path / "run")
    trainer.run()
    return trainer


def _same_density(flow, trainer):
    x = trainer.action.hot_start((4, 4), 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(flow.log_prob(x), trainer.flow.log_prob(x), rtol=0, atol=1e-10)


def test_open_flow_builds_no_trainer_and_imports_no_trainer(trained, monkeypatch):
    """open_flow works when flowplug.train cannot be imported and no trainer, optimizer or
    scheduler can be constructed."""
    import flowplug.train

    def refuse(*args, **kwargs):
        raise AssertionError("a sampler constructed a trainer, an optimizer or a scheduler")

    monkeypatch.setattr(flowplug.train.Trainer, "__init__", refuse)
    monkeypatch.setattr(torch.optim.Optimizer, "__init__", refuse)
    monkeypatch.setattr(torch.optim.lr_scheduler.LRScheduler, "__init__", refuse)
    # `import flowplug.train` and `from flowplug import train` now raise ImportError
    monkeypatch.delattr(flowplug, "train")
    monkeypatch.setitem(sys.modules, "flowplug.train", None)
    with pytest.raises(ImportError):
        from flowplug import train  # noqa: F401
    ck = open_flow(trained.out)
    assert ck.inverse_check.passed and ck.field == "u1" and ck.lattice == (4, 4)
    assert ck.loaded.step == 2 and not ck.flow.training
    assert ck.path == trained.out / checkpoints.CHECKPOINT_NAME
    _same_density(ck.flow, trained)
    lf = checkpoints.load_flow(trained.out / "checkpoint.pt")
    assert lf.action.field == "u1" and abs(lf.action.beta - 1.5) < 1e-12
    _same_density(lf.flow, trained)


def test_train_reexports_the_moved_names():
    import flowplug.train as train

    moved = {
        checkpoints: [
            "CHECKPOINT_FORMAT",
            "CHECKPOINT_VERSION",
            "CHECKPOINT_NAME",
            "LoadedFlow",
            "load_flow",
            "read_checkpoint",
            "checkpoint_path",
            "non_finite_entries",
            "resolve_device",
        ],
        diagnostics: ["evaluate_flow", "imh_acceptance_estimate", "imh_chain_acceptance", "imh_chain_states"],
        training_data: ["load_ensemble"],
    }
    for module, names in moved.items():
        for name in names:
            assert getattr(train, name) is getattr(module, name), name
            assert name in train.__all__
    for name in train.__all__:
        assert hasattr(train, name), name


def test_write_checkpoint_refuses_and_keeps_the_file(trained, tmp_path):
    path = trained.out / checkpoints.CHECKPOINT_NAME
    before = path.read_bytes()
    state = trained.state_dict()
    state["model"] = {k: v.clone() for k, v in state["model"].items()}
    first = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][first].view(-1)[0] = float("nan")
    with pytest.raises(
        NonFiniteParametersError,
        match=rf"not written: .*at step 2 \(NaN/Inf in {first}\); "
        r"it is kept.*train\.lr",
    ):
        checkpoints.write_checkpoint(path, state, kept="it is kept")
    with pytest.raises(CheckpointError, match="not a flowplug checkpoint of version 1"):
        checkpoints.write_checkpoint(path, {**trained.state_dict(), "format": "other"})
    assert path.read_bytes() == before
    assert checkpoints.non_finite_entries(state["model"]) == [first]
    assert checkpoints.non_finite_entries(trained.flow.state_dict()) == []
    # a good state round-trips through write and read
    out = checkpoints.write_checkpoint(tmp_path / "copy.pt", trained.state_dict())
    assert checkpoints.read_checkpoint(out)["step"] == 2


def test_evaluate_flow_progress_bar(trained, capsys):
    """The bar is shown on request (on stderr), never by default in tests (stderr is not a
    terminal), and does not change the figures."""
    run = dict(n_samples=48, batch_size=16, seed=3, observables={"m": lambda x: torch.cos(x).flatten(1).mean(1)})
    quiet = diagnostics.evaluate_flow(trained.flow, trained.action, **run)
    assert capsys.readouterr().err == ""
    shown = diagnostics.evaluate_flow(trained.flow, trained.action, progress=True, **run)
    err = capsys.readouterr().err
    assert "eval" in err and "48/48" in err
    off = diagnostics.evaluate_flow(trained.flow, trained.action, progress=False, **run)
    assert capsys.readouterr().err == ""
    assert quiet == shown == off
    assert isinstance(quiet["free_energy"], float) and isinstance(quiet["m_chain_err"], float)


def test_trainer_evaluate_follows_train_progress(tmp_path, capsys):
    from flowplug.train import build_trainer

    trainer = build_trainer(_u1_config(steps=0), out=None)
    fig = trainer.evaluate(32, batch_size=16, seed=5)
    assert capsys.readouterr().err == "" and fig["n_samples"] == 32
    assert fig == diagnostics.evaluate_flow(trainer.flow, trainer.action, 32, batch_size=16, seed=5)
    trainer.opts["progress"] = True
    trainer.evaluate(32, batch_size=16, seed=5)
    assert "32/32" in capsys.readouterr().err
    trainer.evaluate(32, batch_size=16, seed=5, progress=False)
    assert capsys.readouterr().err == ""


def _sun_spectral_run(tmp_path, group):
    from flowplug.train import build_trainer

    cfg = {
        "lattice": [4, 4],
        "seed": 0,
        "device": "cpu",
        "action": {"name": "wilson", "group": group, "beta": 2.0},
        "flow": {"layers": ["sun-spectral"], "n_layers": 2, "options": {"hidden": [4], "n_bins": 4}},
        "train": {"steps": 1, "batch_size": 4, "lr": 1e-3, "progress": False, "checkpoint_every": 0},
    }
    trainer = build_trainer(cfg, out=tmp_path / group)
    trainer.run()
    return trainer.out / checkpoints.CHECKPOINT_NAME


@pytest.mark.parametrize("group", ["su2", "su3"])
def test_sun_spectral_checkpoints_carry_the_map_version(tmp_path, group):
    """SU(3) sun-spectral weights from before the centre-continuity fix (no ``map_version``)
    define another density and are refused when loaded, naming the file and what to do;
    SU(2) weights of the same era describe the unchanged map and load; a current checkpoint
    loads with the same density."""
    from flowplug.plugins.flow_sun import SPECTRAL_MAP_VERSION

    path = _sun_spectral_run(tmp_path, group)
    state = checkpoints.read_checkpoint(path)
    versions = [k for k in state["model"] if k.endswith("map_version")]
    assert len(versions) == 2 and all(int(state["model"][k]) == SPECTRAL_MAP_VERSION for k in versions)
    assert checkpoints.load_flow(path).step == 1

    old = {**state, "model": {k: v for k, v in state["model"].items() if not k.endswith("map_version")}}
    old_path = checkpoints.write_checkpoint(tmp_path / f"old-{group}.pt", old)
    if group == "su2":
        loaded = checkpoints.load_flow(old_path)
        assert int(loaded.flow.layers[0].map_version) == SPECTRAL_MAP_VERSION
    else:
        with pytest.raises(CheckpointError, match=r"old-su3\.pt: cannot rebuild .*version 1 \(unversioned\).*retrain"):
            checkpoints.load_flow(old_path)
        wrong = {**state, "model": {**state["model"], versions[0]: torch.tensor(1)}}
        with pytest.raises(CheckpointError, match="map version 1, this flowplug has version 2"):
            checkpoints.load_flow(checkpoints.write_checkpoint(tmp_path / "v1.pt", wrong))
