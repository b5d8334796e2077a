"""A flow whose inverse is broken is refused, not used (issue 11, item 3).

- :func:`flowplug.flowtools.check_inverse` measures the round trips and log q through the
  inverse on a small fixed-seed batch;
- ``sample``, ``resample``, ``propose`` and ``FlowProposal.from_checkpoint`` refuse a flow
  that fails it (exit 1, message naming checkpoint, errors, tolerance and override),
  record it in their summaries and take ``--no-check-inverse`` / ``check_inverse=False``;
- a training run never writes a checkpoint with non-finite parameters, and loading one
  is refused with a message naming the file;
- the scalar ``spline`` (and ``affine``) layers stay finite and invertible when a
  conditioning site is huge.

Flows are tiny (4x4 lattices, two layers, a few training steps); the corrupted inverse is
a monkeypatched layer method, so the tests do not depend on training dynamics, except
one that trains at ``train.lr = 10`` as a user would.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from flowplug import io
from flowplug.cli import main
from flowplug.errors import InverseCheckError, InverseCheckWarning, NonFiniteParametersError
from flowplug.flow import build_flow, make_layer
from flowplug.flowtools import INVERSE_TOLERANCES, InverseCheck, check_inverse, open_flow
from flowplug.plugins.flow_gauge import U1Coupling
from flowplug.plugins.theories import WilsonGaugeAction
from flowplug.proposal import FlowProposal
from flowplug.train import build_trainer, load_flow

pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(*args) -> int:
    return main([str(a) for a in args])


def _u1_config(steps=3, lr=3e-3, seed=0, **train):
    return {
        "lattice": [4, 4],
        "seed": seed,
        "device": "cpu",
        "action": {"name": "wilson", "group": "u1", "beta": 1.5},
        "flow": {"layers": ["u1-spline"], "n_layers": 2, "options": {"hidden": [8]}},
        "train": {"steps": steps, "batch_size": 16, "lr": lr, "progress": False, "checkpoint_every": 0, **train},
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A healthy U(1) 4x4 flow (3 training steps), a 2-configuration input and a 1-configuration input."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("invcheck")
    trainer = build_trainer(_u1_config(), out=d / "u1-run")
    trainer.run()
    trainer.save_checkpoint(d / "u1.pt")
    act = WilsonGaugeAction(1.5, "u1")
    g = torch.Generator().manual_seed(3)
    io.write(d / "two.h5", io.Ensemble(act.hot_start((4, 4), 2, generator=g)))
    io.write(d / "one.h5", io.Ensemble(act.hot_start((4, 4), 1, generator=g)))
    return d


@pytest.fixture
def broken_inverse(monkeypatch):
    """Every U(1) coupling's inverse rotates its output by 0.7 rad: f^-1 no longer undoes f."""
    original = U1Coupling.inverse

    def shifted(self, theta):
        out, logdet = original(self, theta)
        return out + 0.7, logdet

    monkeypatch.setattr(U1Coupling, "inverse", shifted)


def _no_traceback(err: str) -> None:
    assert "Traceback" not in err


# ------------------------------------------------------------------ the check itself


@pytest.mark.parametrize(
    "field,lattice,layer",
    [
        ("scalar", (4, 4), "affine"),
        ("scalar", (4, 4), "spline"),
        ("u1", (4, 4), "u1-ncp"),
        ("u1", (4, 4), "u1-spline"),
        ("su2", (2, 2), "sun-spectral"),
    ],
)
def test_check_inverse_passes_healthy_flows(field, lattice, layer):
    torch.manual_seed(0)
    flow = build_flow(
        field,
        lattice,
        [layer],
        n_layers=2,
        options={"hidden": [4], "init_scale": 1.0} if layer != "u1-ncp" else {"hidden": [4]},
    )
    flow.train()
    res = check_inverse(flow)
    assert isinstance(res, InverseCheck) and res.passed and res.problem == ""
    assert res.n_samples == 8 and res.seed == 0 and res.dtype == "float64"
    assert res.latent_error < 1e-7 and res.field_error < 1e-7 and res.log_q_error < 1e-7
    assert res.roundtrip_tolerance >= INVERSE_TOLERANCES["float64"]["roundtrip"]
    assert res.log_q_tolerance >= INVERSE_TOLERANCES["float64"]["log_q_abs"]
    assert flow.training  # mode restored
    d = res.as_dict()
    assert set(d) == {
        "passed",
        "latent_error",
        "field_error",
        "roundtrip_tolerance",
        "log_q_error",
        "log_q_tolerance",
        "n_samples",
        "seed",
        "dtype",
        "problem",
    }
    assert check_inverse(flow).as_dict() == d  # fixed seed: reproducible


def test_check_inverse_leaves_the_callers_random_streams_alone():
    flow = build_flow("u1", (4, 4), ["u1-spline"], n_layers=2, options={"hidden": [4]})
    torch.manual_seed(5)
    a = torch.rand(3)
    torch.manual_seed(5)
    check_inverse(flow)
    assert torch.equal(torch.rand(3), a)


def test_check_inverse_detects_a_broken_inverse(broken_inverse):
    flow = build_flow("u1", (4, 4), ["u1-spline"], n_layers=2, options={"hidden": [4]})
    res = check_inverse(flow)
    assert not res.passed
    assert res.latent_error == pytest.approx(1.4, abs=1e-6)  # two layers, 0.7 rad each
    assert res.field_error > 0.1
    assert "round trip error" in res.describe() and "nats" in res.describe()


def test_check_inverse_compares_angles_modulo_two_pi(monkeypatch):
    """An inverse that is off by exactly 2 pi is the same U(1) link: it passes."""
    original = U1Coupling.inverse
    monkeypatch.setattr(
        U1Coupling, "inverse", lambda self, t: (original(self, t)[0] + 2 * math.pi, original(self, t)[1])
    )
    flow = build_flow("u1", (4, 4), ["u1-spline"], n_layers=1, options={"hidden": [4]})
    res = check_inverse(flow)
    assert res.passed, res.describe()


def test_check_inverse_reports_non_finite_values_and_exceptions(monkeypatch):
    flow = build_flow("scalar", (4, 4), ["affine"], n_layers=2, options={"hidden": [4]})
    layer_cls = type(flow.layers[0])
    original = layer_cls.inverse
    monkeypatch.setattr(
        layer_cls, "inverse", lambda self, y: (original(self, y)[0] * float("nan"), original(self, y)[1])
    )
    res = check_inverse(flow)
    assert not res.passed and "inverse gives non-finite" in res.problem and math.isinf(res.latent_error)

    def boom(self, y):
        raise RuntimeError("singular matrix")

    monkeypatch.setattr(layer_cls, "inverse", boom)
    res = check_inverse(flow)
    assert not res.passed and "RuntimeError: singular matrix" in res.problem


# ------------------------------------------------------------------ the commands


def test_sample_records_a_passing_check(files, tmp_path):
    out = tmp_path / "s"
    assert (
        _cli(
            "sample",
            "--flow",
            files / "u1.pt",
            "--out",
            out,
            "--no-progress",
            "--set",
            "chains=2",
            "--set",
            "steps=2",
            "--set",
            "thermalize=0",
            "--set",
            "ess_samples=8",
        )
        == 0
    )
    ic = json.loads((out / "summary.json").read_text())["inverse_check"]
    assert ic["passed"] is True and ic["enforced"] is True and ic["field_error"] < ic["roundtrip_tolerance"]


def _assert_refusal(err: str, path) -> None:
    _no_traceback(err)
    err = " ".join(err.split())  # the CLI wraps messages at 100 columns
    assert str(path) in err and "inverse does not undo" in err
    assert "round trip error" in err and "tolerance" in err and "nats" in err
    assert "--no-check-inverse" in err


def test_sample_refuses_a_broken_inverse_and_takes_the_override(files, tmp_path, capsys, broken_inverse):
    out = tmp_path / "s"
    args = [
        "sample",
        "--flow",
        files / "u1.pt",
        "--out",
        out,
        "--no-progress",
        "--set",
        "chains=2",
        "--set",
        "steps=2",
        "--set",
        "thermalize=0",
        "--set",
        "ess_samples=8",
    ]
    assert _cli(*args) == 1
    _assert_refusal(capsys.readouterr().err, files / "u1.pt")
    assert not (out / "summary.json").exists() and not (out / "ensemble.h5").exists()
    assert _cli(*args, "--no-check-inverse") == 0
    assert "used anyway" in capsys.readouterr().err
    ic = json.loads((out / "summary.json").read_text())["inverse_check"]
    assert ic["passed"] is False and ic["enforced"] is False and ic["latent_error"] > ic["roundtrip_tolerance"]


def test_resample_refuses_a_broken_inverse_and_takes_the_override(files, tmp_path, capsys, broken_inverse):
    out = tmp_path / "r"
    args = [
        "resample",
        files / "two.h5",
        "--flow",
        files / "u1.pt",
        "--out",
        out,
        "--no-progress",
        "--set",
        "steps=2",
        "--set",
        "save_every=0",
    ]
    assert _cli(*args) == 1
    _assert_refusal(capsys.readouterr().err, files / "u1.pt")
    assert not (out / "summary.json").exists()
    assert _cli(*args, "--no-check-inverse") == 0
    ic = json.loads((out / "summary.json").read_text())["inverse_check"]
    assert ic["passed"] is False and ic["enforced"] is False


def test_propose_refuses_a_broken_inverse_and_takes_the_override(files, tmp_path, capsys, broken_inverse):
    out = tmp_path / "next.h5"
    args = ["propose", "--flow", files / "u1.pt", "--current", files / "one.h5", "--out", out, "--seed", 2]
    assert _cli(*args) == 1
    _assert_refusal(capsys.readouterr().err, files / "u1.pt")
    assert not out.exists()
    assert _cli(*args, "--no-check-inverse") == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["inverse_check"]["passed"] is False and line["inverse_check"]["enforced"] is False


def test_propose_line_records_a_passing_check(files, tmp_path, capsys):
    assert (
        _cli(
            "propose", "--flow", files / "u1.pt", "--current", files / "one.h5", "--out", tmp_path / "n.h5", "--seed", 2
        )
        == 0
    )
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["inverse_check"]["passed"] is True


def test_flow_proposal_from_checkpoint_checks_by_default(files, broken_inverse):
    with pytest.raises(InverseCheckError, match=r"u1\.pt.*round trip error.*check_inverse=False"):
        FlowProposal.from_checkpoint(str(files / "u1.pt"), layout="canonical", seed=1)
    with pytest.warns(InverseCheckWarning, match="used anyway"):
        prop = FlowProposal.from_checkpoint(str(files / "u1.pt"), layout="canonical", seed=1, check_inverse=False)
    assert prop.inverse_check is not None and not prop.inverse_check.passed


def test_flow_proposal_from_checkpoint_keeps_a_passing_check(files):
    prop = FlowProposal.from_checkpoint(str(files / "u1.pt"), layout="canonical", seed=1)
    assert prop.inverse_check.passed


def test_a_flow_trained_at_a_huge_learning_rate_is_refused(tmp_path, capsys):
    """``flowplug train --set train.lr=10``: the U(1) spline flow's inverse is off by radians
    (measured: round trip ~3 rad, log q ~190 nats); ``sample`` refuses it."""
    run = tmp_path / "t"
    sets = [
        "lattice=[4,4]",
        "seed=0",
        'device="cpu"',
        'action.name="wilson"',
        'action.group="u1"',
        'flow.layers=["u1-spline"]',
        "flow.n_layers=4",
        "flow.options.hidden=[8]",
        "train.steps=40",
        "train.batch_size=32",
        "train.lr=10.0",
        "eval.samples=64",
        "eval.batch_size=64",
        f'out="{run}"',
    ]
    assert _cli("train", "--no-progress", *[a for s in sets for a in ("--set", s)]) == 0
    assert "will refuse it" in " ".join(capsys.readouterr().err.split())  # train warns at once
    summary = json.loads((run / "summary.json").read_text())
    assert summary["inverse_check"]["passed"] is False
    res = check_inverse(load_flow(run).flow)
    assert not res.passed and res.log_q_error > 1.0
    assert summary["inverse_check"]["log_q_error"] == res.log_q_error
    assert (
        _cli(
            "sample",
            "--flow",
            run,
            "--out",
            tmp_path / "s",
            "--no-progress",
            "--set",
            "chains=2",
            "--set",
            "steps=2",
            "--set",
            "thermalize=0",
            "--set",
            "ess_samples=8",
        )
        == 1
    )
    _assert_refusal(capsys.readouterr().err, run / "checkpoint.pt")


# ------------------------------------------------------------------ non-finite parameters


def _nan_after(monkeypatch, step: int, once: bool = False) -> None:
    """The optimizer's update writes NaN into the parameters at training step ``step`` (counted
    from 0) and, unless ``once``, at every later step."""
    original = torch.optim.Adam.step
    calls = [0]

    def step_then_nan(self, *a, **k):
        out = original(self, *a, **k)
        calls[0] += 1
        if calls[0] == step + 1 or (calls[0] > step and not once):
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", step_then_nan)


def test_training_that_diverges_to_nan_writes_no_checkpoint(tmp_path, capsys, monkeypatch):
    run = tmp_path / "nan"
    _nan_after(monkeypatch, 2)
    sets = [
        "lattice=[4,4]",
        "seed=0",
        'device="cpu"',
        'action.name="wilson"',
        'action.group="u1"',
        'flow.layers=["u1-spline"]',
        "flow.n_layers=2",
        "flow.options.hidden=[4]",
        "train.steps=5",
        "train.batch_size=8",
        "train.checkpoint_every=0",
        "eval.samples=16",
        f'out="{run}"',
    ]
    assert _cli("train", "--no-progress", *[a for s in sets for a in ("--set", s)]) == 1
    err = " ".join(capsys.readouterr().err.split())
    _no_traceback(err)
    assert "not finite after step 2" in err and "no checkpoint was written" in err and "train.lr" in err
    assert not (run / "checkpoint.pt").exists()
    assert _cli("sample", "--flow", run, "--out", tmp_path / "s", "--no-progress") == 1
    err = " ".join(capsys.readouterr().err.split())  # the message is wrapped for the terminal
    _no_traceback(err)
    assert "no checkpoint" in err


def test_training_that_diverges_keeps_the_last_finite_checkpoint(tmp_path, monkeypatch):
    _nan_after(monkeypatch, 5)
    trainer = build_trainer(_u1_config(steps=8, checkpoint_every=2), out=tmp_path / "run")
    with pytest.raises(NonFiniteParametersError, match=r"after step 5 .*still holds step 4"):
        trainer.run()
    loaded = load_flow(tmp_path / "run")
    assert loaded.step == 4
    assert all(bool(torch.isfinite(p).all()) for p in loaded.flow.parameters())


def test_guard_rolls_back_non_finite_parameters(tmp_path, monkeypatch):
    """With the divergence guard on and a snapshot taken, NaN parameters are a divergence:
    back to the snapshot with half the learning rate, and the run finishes."""
    _nan_after(monkeypatch, 5, once=True)
    trainer = build_trainer(_u1_config(steps=8, guard=1.0, guard_window=2), out=tmp_path / "run")
    with pytest.warns(RuntimeWarning, match=r"non-finite parameters .* after step 5.*rollback 1"):
        trainer.run()
    assert trainer.rollbacks == 1 and trainer.step == 8 and trainer.non_finite_parameters() == []
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * 3e-3)
    assert load_flow(tmp_path / "run").step == 8


def test_save_checkpoint_refuses_non_finite_parameters(tmp_path):
    trainer = build_trainer(_u1_config(steps=1), out=tmp_path / "run")
    trainer.run()
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with torch.no_grad():
        next(trainer.flow.parameters()).fill_(float("inf"))
    assert trainer.non_finite_parameters()
    with pytest.raises(NonFiniteParametersError, match=r"checkpoint\.pt: not written.*still holds step 1"):
        trainer.save_checkpoint()
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
    with pytest.raises(NonFiniteParametersError, match="nothing was written"):
        trainer.save_checkpoint(tmp_path / "other.pt")
    assert not (tmp_path / "other.pt").exists()


def test_open_flow_refuses_a_checkpoint_with_nan_parameters(files, tmp_path, capsys):
    """A checkpoint written before this check existed, holding NaN weights: refused, with
    the file named (``sample`` used to write a NaN ensemble and die with a traceback)."""
    state = torch.load(files / "u1.pt", weights_only=True)
    key = next(k for k, v in state["model"].items() if v.is_floating_point() and v.numel() > 1)
    state["model"][key] = torch.full_like(state["model"][key], float("nan"))
    bad = tmp_path / "nan.pt"
    torch.save(state, bad)
    with pytest.raises(NonFiniteParametersError, match=rf"nan\.pt.*not finite.*{key}"):
        open_flow(bad)
    assert (
        _cli(
            "sample",
            "--flow",
            bad,
            "--out",
            tmp_path / "s",
            "--no-progress",
            "--set",
            "chains=2",
            "--set",
            "steps=2",
            "--set",
            "thermalize=0",
        )
        == 1
    )
    err = " ".join(capsys.readouterr().err.split())
    _no_traceback(err)
    assert "nan.pt" in err and "not finite" in err
    assert not (tmp_path / "s" / "ensemble.h5").exists()


# ------------------------------------------------------------------ huge conditioning values


@pytest.mark.parametrize("layer", ["spline", "affine"])
@pytest.mark.parametrize("dtype,huge", [("float32", 1e39), ("float32", 1e30), ("float64", 1e300)])
def test_scalar_coupling_stays_finite_and_invertible_for_huge_conditioning(layer, dtype, huge):
    """docs/flows.md: no NaN/Inf can arise. A frozen (conditioning) site of 1e39 is beyond
    float32 (the network's dtype); 1e300 makes a float64 network's outputs overflow the spline."""
    torch.manual_seed(0)
    lay = make_layer(layer, lattice=(4, 4), field="scalar", index=0, dtype=dtype, init_scale=1.0, hidden=[8])
    x = torch.randn(4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    i, j = (lay.active == 0).nonzero()[0].tolist()
    x[0, i, j], x[1, i, j], x[2, i, j] = huge, -huge, huge
    x[2, (i + 1) % 4, j] = huge  # an active site too: outside the spline interval, identity
    with torch.no_grad():
        y, ld = lay(x)
        back, ld_inv = lay.inverse(y)
    assert torch.isfinite(y).all() and torch.isfinite(ld).all() and torch.isfinite(ld_inv).all()
    assert y[0, i, j] == huge and y[1, i, j] == -huge  # frozen sites pass unchanged
    torch.testing.assert_close(back, x, rtol=1e-12, atol=1e-8)
    torch.testing.assert_close(ld + ld_inv, torch.zeros_like(ld), rtol=0, atol=1e-8)
    # ordinary configurations are untouched by the limits: same map as a plain network call
    z = torch.randn(3, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        raw = lay.net((z * (1 - lay.active)).unsqueeze(1)).to(torch.float64).movedim(1, -1)
    # the layer evaluates the network on its active sites only (ConvNet.forward_at: the same
    # function up to float rounding) and reads nothing on the frozen sites, where it gives 0
    act = lay.active > 0
    params = lay._params(z)
    torch.testing.assert_close(params[:, act], raw[:, act], rtol=1e-5, atol=1e-5)
    assert (params[:, ~act] == 0).all()
