"""train.init_from: a new run starts from a trained run's parameters (flowplug.flowtools.init_flow_from)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flowplug.config import build_config
from flowplug.errors import CheckpointError, ConfigError, FlowplugError
from flowplug.jobs.train import DEFAULT_CONFIG, OPEN_TABLES, resume_train, run_train


def cfg(out: Path, *overrides: str) -> dict:
    """A seconds-long 2D U(1) u1-ncp run on 4 x 4."""
    return build_config(
        DEFAULT_CONFIG,
        overrides=[
            f"out='{out}'",
            "lattice=[4, 4]",
            'action.name="wilson"',
            'action.group="u1"',
            'flow.layers=["u1-ncp"]',
            "flow.n_layers=2",
            "flow.options.hidden=[4]",
            "train.steps=3",
            "train.batch_size=8",
            "train.progress=false",
            "eval.samples=32",
            *overrides,
        ],
        open_tables=OPEN_TABLES,
    )


def params(run: Path) -> dict[str, torch.Tensor]:
    from flowplug.checkpoints import load_flow

    return {k: v.clone() for k, v in load_flow(run).flow.state_dict().items()}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("init_from") / "beta2"
    run_train(cfg(out, "train.lr=0.05"))
    return out


def test_same_architecture_copies_every_parameter(tmp_path, source):
    """Another beta, same flow: the new run starts exactly at the source's parameters (0 steps),
    unlike a run from scratch with the same seed."""
    new = tmp_path / "beta3"
    s = run_train(cfg(new, "action.beta=3.0", "train.steps=0", f"train.init_from='{source}'"))
    assert s["init_from"] == {"source": str(source), "layers": [[0, 0], [1, 1]]}
    a, b = params(source), params(new)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    scratch = tmp_path / "scratch"
    run_train(cfg(scratch, "action.beta=3.0", "train.steps=0"))
    c = params(scratch)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_resume_does_not_read_the_source_again(tmp_path, source):
    """The checkpoint holds the state: a resumed run continues although the source is gone."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    new = tmp_path / "new"
    run_train(cfg(new, "train.steps=2", f"train.init_from='{copy}'"))
    shutil.rmtree(copy)
    s = resume_train(new, overrides={"steps": 4})
    assert s["steps"] == 4 and s["init_from"] == {"source": str(copy)}


def test_architectures_without_a_transfer_are_refused(tmp_path, source):
    """u1-ncp on another lattice: nothing can be copied, and the error names both flows."""
    with pytest.raises(ConfigError) as err:
        run_train(cfg(tmp_path / "l6", "lattice=[6, 6]", f"train.init_from='{source}'"))
    msg = " ".join(str(err.value).split())
    assert "lattice [6, 6], 2 layers (u1-ncp)" in msg and "lattice [4, 4], 2 layers (u1-ncp)" in msg
    assert not (tmp_path / "l6" / "checkpoint.pt").exists()


def test_other_field_kinds_are_refused(tmp_path, source):
    with pytest.raises(ConfigError, match="u1 fields; this run's field is scalar"):
        run_train(
            cfg(
                tmp_path / "phi4",
                'action.name="phi4"',
                'flow.layers=["affine"]',
                f"train.init_from='{source}'",
            )
        )


def test_missing_source_and_own_output_are_refused(tmp_path, source):
    with pytest.raises(CheckpointError, match="train.init_from = .*nothing.*run directory or its checkpoint"):
        run_train(cfg(tmp_path / "a", f"train.init_from='{tmp_path / 'nothing'}'"))
    with pytest.raises(FlowplugError, match="own output directory"):
        run_train(cfg(source, f"train.init_from='{source}'"), force=True)
    assert json.loads((source / "summary.json").read_text())["steps"] == 3  # the source is untouched


def test_sampling_another_coupling_warns_naming_both(source):
    """A flow used at another beta than it was trained for: exact chains, but a warning that
    names the trained and the requested coupling."""
    from flowplug.errors import CouplingMismatchWarning
    from flowplug.flowtools import open_flow

    ck = open_flow(source)
    with pytest.warns(CouplingMismatchWarning, match=r"beta = 3.0 \(trained at 2.0\)"):
        act = ck.action({"beta": 3.0})
    assert act.couplings()["beta"] == 3.0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ck.action({"beta": 2.0})  # the trained value: no warning
