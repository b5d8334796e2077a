"""Tests of the training driver, checkpoints, resume, the loader and ``flowplug train``.

All runs are tiny (4x4 lattices, a few layers, tens of steps) and seeded; nothing depends
on wall time.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from flowplug import config as fconfig
from flowplug.cli import main
from flowplug.errors import CheckpointError, ConfigError
from flowplug.hookspecs import hookimpl
from flowplug.jobs.train import DEFAULT_CONFIG as DEFAULT_TOML_TEXT
from flowplug.jobs.train import OPEN_TABLES
from flowplug.manager import new_plugin_manager, set_plugin_manager
from flowplug.train import (
    build_trainer,
    evaluate_flow,
    imh_acceptance_estimate,
    imh_chain_acceptance,
    load_flow,
    read_checkpoint,
    resume_trainer,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(autouse=True)
def fresh_manager():
    old = set_plugin_manager(new_plugin_manager(autoload=False))
    yield
    set_plugin_manager(old)


def cfg(tmp_path, *overrides):
    base = [
        "lattice=[4,4]",
        "flow.n_layers=4",
        "train.steps=8",
        "train.batch_size=16",
        "train.progress=false",
        "eval.samples=256",
        f"out='{tmp_path / 'run'}'",
        "train.checkpoint_every=4",
    ]
    return fconfig.build_config(DEFAULT_TOML_TEXT, overrides=base + list(overrides), open_tables=OPEN_TABLES)


def params(trainer):
    return [p.detach().clone() for p in trainer.flow.parameters()]


def test_short_training_lowers_the_loss(tmp_path):
    c = cfg(tmp_path, "train.steps=60", "train.lr=0.01", "train.batch_size=32")
    tr = build_trainer(c, out=None)
    tr.out = None
    hist = tr.run(progress=False)
    first = np.mean([m["loss"] for m in hist[:10]])
    last = np.mean([m["loss"] for m in hist[-10:]])
    assert last < first - 0.2 * abs(first)
    assert tr.skipped == 0 and tr.step == 60
    m = hist[-1]
    assert set(m) >= {"loss", "free_energy", "ess", "acceptance", "lr", "grad_norm", "skipped"}
    assert 0 < m["ess"] <= 1 and 0 <= m["acceptance"] <= 1


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["train.path_gradient=true"],
        ["action.name=wilson", "action.group=u1", "flow.layers=['u1-ncp']", "train.path_gradient=true"],
        [
            "action.name=wilson",
            "action.group=su2",
            "flow.layers=['sun-spectral']",
            "train.optimizer=adamw",
            "train.grad_clip=1.0",
            "train.schedule=cosine",
            "train.warmup_steps=2",
        ],
    ],
)
def test_resume_gives_the_identical_next_step(tmp_path, extra):
    c = cfg(tmp_path, *extra)
    a = build_trainer(c)
    a.run(steps=3, progress=False, checkpoint_every=0)
    ck = a.save_checkpoint(tmp_path / "mid.pt")
    ma = a.train_step()
    pa = params(a)
    b = resume_trainer(ck)
    assert b.step == 3
    mb = b.train_step()
    for key in ("loss", "free_energy", "ess", "acceptance", "lr", "grad_norm"):
        assert ma[key] == mb[key] or (math.isnan(ma[key]) and math.isnan(mb[key])), key
    for x, y in zip(pa, params(b), strict=True):
        assert torch.equal(x, y)
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


def test_checkpoint_round_trip_and_loader(tmp_path):
    c = cfg(tmp_path, "action.name=wilson", "action.group=u1", "action.beta=1.5", "flow.layers=['u1-ncp', 'u1-spline']")
    tr = build_trainer(c)
    tr.run(progress=False)
    state = read_checkpoint(tmp_path / "run")
    assert state["step"] == 8 and state["field"] == "u1" and state["lattice"] == [4, 4]
    # plain weights_only load works: nothing needs unpickling
    torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    lf = load_flow(tmp_path / "run")
    assert lf.field == "u1" and lf.lattice == (4, 4) and lf.step == 8
    assert lf.action.field == "u1" and abs(lf.action.beta - 1.5) < 1e-12
    x = tr.action.hot_start((4, 4), 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(lf.flow.log_prob(x), tr.flow.log_prob(x), rtol=0, atol=1e-10)
    rows = list(csv.reader(open(tmp_path / "run" / "train_log.csv")))
    assert rows[0][0] == "step" and len(rows) == 9


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        read_checkpoint(tmp_path)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_checkpoint(bad)
    torch.save({"hello": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a flowplug"):
        read_checkpoint(tmp_path / "other.pt")
    tr = build_trainer(cfg(tmp_path))
    ck = tr.save_checkpoint(tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="cannot change"):
        resume_trainer(ck, overrides={"lr": 0.1})


class _Nan:
    field = "scalar"

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def action(self, x):
        self.calls += 1
        s = self.inner.action(x)
        return s * float("nan") if self.calls == 2 else s


def test_non_finite_steps_are_skipped_and_counted(tmp_path):
    tr = build_trainer(cfg(tmp_path))
    tr.action = _Nan(tr.action)
    tr.train_step()
    before = params(tr)
    m = tr.train_step()
    assert m["skipped"] == 1.0 and tr.skipped == 1
    for x, y in zip(before, params(tr), strict=True):
        assert torch.equal(x, y)
    m = tr.train_step()
    assert m["skipped"] == 0.0 and tr.skipped == 1


def test_parameter_finiteness_check_sees_every_tensor_and_dtype(tmp_path):
    """Trainer._parameters_finite (after every step) flattens the tensors of each dtype into one
    vector: NaN, +Inf or -Inf in any float32 parameter or float64 buffer is seen, wherever it sits,
    and finite values of any size (1e38 in float32, whose norm would overflow) are not flagged."""
    tr = build_trainer(cfg(tmp_path))
    assert tr._parameters_finite()
    tensors = [*tr._params, *tr._finite_watch]
    assert {t.dtype for t in tensors} >= {torch.float32, torch.float64}
    for t in (tr._params[0], tr._params[-1], tr._finite_watch[-1]):
        for bad in (float("nan"), float("inf"), float("-inf"), 3.0e38):
            with torch.no_grad():
                keep = t.flatten()[-1].clone()
                t.view(-1)[-1] = bad
                assert tr._parameters_finite() == (bad == 3.0e38), (t.dtype, bad)
                t.view(-1)[-1] = keep
    assert tr._parameters_finite()


def test_forward_kl_from_an_ensemble(tmp_path):
    # configurations of a broad Gaussian stand in for an ensemble of the target
    g = torch.Generator().manual_seed(3)
    data = 0.6 * torch.randn(512, 4, 4, generator=g, dtype=torch.float64) + 0.3
    torch.save({"configs": data}, tmp_path / "ens.pt")
    import h5py

    with h5py.File(tmp_path / "ens.h5", "w") as fh:
        fh["configs"] = data.numpy()
    for name in ("ens.pt", "ens.h5"):
        c = cfg(
            tmp_path,
            "train.objective=forward",
            f"train.ensemble='{tmp_path / name}'",
            "train.steps=40",
            "train.lr=0.01",
        )
        tr = build_trainer(c)
        hist = tr.run(progress=False)
        assert np.mean([m["loss"] for m in hist[-5:]]) < np.mean([m["loss"] for m in hist[:5]]) - 1.0
    with pytest.raises(ConfigError, match="needs"):
        build_trainer(cfg(tmp_path, "train.objective=forward"))


def test_hooks_are_called(tmp_path):
    seen = {"steps": [], "ckpt": []}

    class Monitor:
        @hookimpl
        def flowplug_after_train_step(self, step, metrics):
            seen["steps"].append((step, metrics["loss"]))

        @hookimpl
        def flowplug_checkpoint_written(self, path, step, what):
            seen["ckpt"].append((Path(path).name, step, what))

    from flowplug.manager import get_plugin_manager

    get_plugin_manager().register(Monitor(), name="monitor")
    tr = build_trainer(cfg(tmp_path))
    tr.run(progress=False)
    assert [s for s, _ in seen["steps"]] == list(range(8))
    assert seen["ckpt"] == [("checkpoint.pt", 4, "train"), ("checkpoint.pt", 8, "train")]


def test_acceptance_estimates():
    assert imh_acceptance_estimate(torch.zeros(10)) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(5)
    lw = torch.randn(200, generator=g, dtype=torch.float64)
    w = torch.exp(lw)
    brute = sum(min(w[i], w[j]) for i in range(200) for j in range(200) if i != j) / (199 * w.sum())
    assert imh_acceptance_estimate(lw) == pytest.approx(float(brute), rel=1e-12)
    # the chain's acceptance agrees with the estimate on a long sample (seed 6, 200000 draws;
    # the chain's autocorrelated acceptance scatters by well below 0.01 here)
    lw = torch.randn(200000, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert abs(imh_chain_acceptance(lw, 6) - imh_acceptance_estimate(lw)) < 0.01


def test_imh_chain_states_is_an_exact_chain():
    """Independence Metropolis over proposals x ~ N(0, 1.5^2) for the target N(0.3, 1):
    the chain mean of x agrees with 0.3 within 4 Gamma-method errors (seed 8, 40000
    proposals), and the states agree with imh_chain_acceptance."""
    from flowplug.stats import gamma_method
    from flowplug.train import imh_chain_states

    rng = np.random.default_rng(8)
    x = 1.5 * rng.standard_normal(40000)
    log_w = -0.5 * (x - 0.3) ** 2 + 0.5 * (x / 1.5) ** 2
    states = imh_chain_states(torch.as_tensor(log_w), 9)
    assert states[0] == 0 and (np.diff(states) >= 0).all() and (states <= np.arange(x.size)).all()
    moved = np.diff(states) != 0
    assert (states[1:][moved] == np.arange(1, x.size)[moved]).all()
    # the chain of the straightforward loop (independent re-implementation)
    u = np.log(np.random.default_rng(9).random(x.size - 1))
    cur, ref = 0, [0]
    for i in range(1, x.size):
        if u[i - 1] < log_w[i] - log_w[cur]:
            cur = i
        ref.append(cur)
    assert (states == np.array(ref)).all()
    assert imh_chain_acceptance(torch.as_tensor(log_w), 9) == pytest.approx(moved.mean(), abs=0)
    with pytest.raises(ValueError, match="at least one"):
        imh_chain_states(torch.zeros(0))
    g = gamma_method(x[states])
    assert g.tau_int > 0.6 and abs(g.mean - 0.3) < 4 * g.error
    assert abs(gamma_method(x[states] ** 2).mean - 1.09) < 4 * gamma_method(x[states] ** 2).error


def test_cli_train_and_resume(tmp_path, capsys):
    out = tmp_path / "cli"
    args = [
        "train",
        "--config",
        str(EXAMPLES / "train_u1.toml"),
        "--set",
        f"out='{out}'",
        "--set",
        "lattice=[4,4]",
        "--set",
        "flow.n_layers=2",
        "--set",
        "train.steps=4",
        "--set",
        "train.batch_size=8",
        "--set",
        "eval.samples=64",
        "--set",
        "threads=0",
        "--no-progress",
    ]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("ess", "acceptance", "free_energy", "steps", "skipped_steps", "wall_time_s"):
        assert key in summary
    assert summary["steps"] == 4 and summary["skipped_steps"] == 0
    assert "plaquette" in summary["observables"]
    assert (out / "config.toml").exists()
    assert main(["train", "--resume", str(out), "--set", "train.steps=6", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6
    rows = list(csv.reader(open(out / "train_log.csv")))
    assert [int(r[0]) for r in rows[1:]] == list(range(6))
    assert main(["train", "--resume", str(out), "--set", "train.lr=0.1"]) == 1
    assert "cannot change train.lr" in capsys.readouterr().err
    assert main(["train", "--set", "flow.layers=['nope']", "--set", f"out='{tmp_path / 'x'}'"]) == 1
    assert "Available" in capsys.readouterr().err


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("train_*.toml")))
def test_example_configs_build(example, tmp_path):
    """Every example config builds its action, flow and trainer and takes one step; a
    ``train.init_from`` names the ``out`` of another example (the chain of a transfer recipe),
    which is not trained here."""
    source = fconfig.parse_toml((EXAMPLES / example).read_text()).get("train", {}).get("init_from", "")
    if source:
        outs = {fconfig.parse_toml(p.read_text()).get("out") for p in EXAMPLES.glob("train_*.toml")}
        assert source in outs, f"{example}: train.init_from = {source!r} is no example's out"
    c = fconfig.build_config(
        DEFAULT_TOML_TEXT,
        config_file=EXAMPLES / example,
        open_tables=OPEN_TABLES,
        overrides=["train.batch_size=2", "threads=0", "train.init_from=''"],
    )
    tr = build_trainer(c, out=tmp_path)
    m = tr.train_step()
    assert math.isfinite(m["loss"])


def test_evaluate_flow_figures(tmp_path):
    tr = build_trainer(cfg(tmp_path))
    fig = evaluate_flow(
        tr.flow, tr.action, 300, batch_size=128, seed=1, observables={"m": lambda x: x.flatten(1).mean(1)}
    )
    assert fig["n_samples"] == 300 and 0 < fig["ess"] <= 1 and 0 <= fig["acceptance"] <= 1
    assert math.isfinite(fig["free_energy"]) and "m" in fig
    assert {"m_err", "m_chain", "m_chain_err", "m_chain_tau_int"} <= set(fig)
    assert fig["m_chain_err"] > 0

    # an observable that is not finite on some samples gives NaN chain figures, no error
    def first_nan(x):  # not finite on sample 0, where every chain starts
        v = x.flatten(1).mean(1)
        return torch.where(torch.arange(len(v)) == 0, float("nan"), v)

    fig = evaluate_flow(tr.flow, tr.action, 64, batch_size=64, seed=1, observables={"logm": first_nan})
    assert math.isnan(fig["logm_chain"]) and math.isnan(fig["logm_chain_err"])


def test_forward_kl_from_an_ildg_file(tmp_path, shared_dir):
    """Seeds from a production configuration: forward KL reads the ILDG file through flowplug.io."""
    path = shared_dir / "ensembles" / "milc.lat.sample.l4444.ildg"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    c = cfg(
        tmp_path,
        "lattice=[4,4,4,4]",
        "action.name=wilson",
        "action.group=su3",
        "action.beta=6.0",
        "flow.layers=['sun-spectral']",
        "flow.n_layers=1",
        "flow.options={hidden=[2]}",
        "train.objective=forward",
        f"train.ensemble='{path}'",
        "train.batch_size=2",
        "train.steps=2",
    )
    tr = build_trainer(c)
    assert tr.ensemble.shape == (1, 4, 4, 4, 4, 4, 3, 3)
    hist = tr.run(progress=False)
    assert all(math.isfinite(m["loss"]) for m in hist) and tr.skipped == 0


@pytest.mark.parametrize(
    "field,lattice,layers,action,opts",
    [
        ("scalar", [4, 4], ["affine", "spline"], ("phi4", {"m2": -4.0, "lam": 8.0}), {}),
        ("u1", [4, 4], ["u1-ncp", "u1-spline"], ("wilson", {"group": "u1", "beta": 2.0}), {}),
        ("u1", [4, 4], ["u1-ncp"], ("wilson", {"group": "u1", "beta": 2.0}), {"rectangles": True, "period": 2}),
        ("u1", [4, 4, 4], ["u1-ncp"], ("wilson", {"group": "u1", "beta": 1.0}), {"rectangles": True}),
        ("u1", [6, 4], ["u1-multiscale"], ("wilson", {"group": "u1", "beta": 2.0}), {"n_modes": 2}),
    ],
)
def test_fast_path_gradient_equals_gradient_through_the_inverse(field, lattice, layers, action, opts):
    """The forward-propagated score (no inversion) gives the same parameter gradient as
    differentiating log q(x) computed through the exact inverse at frozen parameters."""
    from flowplug.flow import build_flow, path_gradient_loss, supports_fast_path_gradient
    from flowplug.theory import action_from_config
    from flowplug.train import _LogProb

    torch.manual_seed(0)
    flow = build_flow(field, lattice, layers, n_layers=4, options={"dtype": "float64", "init_scale": 0.5, **opts})
    assert supports_fast_path_gradient(flow)
    act = action_from_config({"name": action[0], **action[1]})
    z, log_r = flow.sample_latent(6, torch.Generator().manual_seed(2))
    loss, log_q, s = path_gradient_loss(flow, z, act.action)
    flow.zero_grad()
    loss.backward()
    fast = torch.cat([p.grad.flatten() for p in flow.parameters()])
    x, logdet = flow(z)
    torch.testing.assert_close(log_q, (log_r - logdet).detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(loss.detach(), (log_q + act.action(x).detach()).mean(), rtol=0, atol=1e-12)
    frozen = {f"flow.{k}": v.detach() for k, v in flow.named_parameters()}
    lq = torch.func.functional_call(_LogProb(flow), frozen, (x,), strict=False)
    flow.zero_grad()
    (lq + act.action(x)).mean().backward()
    slow = torch.cat([p.grad.flatten() for p in flow.parameters()])
    assert slow.abs().max() > 1e-3
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-11)


def test_trainer_takes_the_fast_path_gradient(tmp_path, monkeypatch):
    """With forward_diag on every layer, a path-gradient step never inverts the flow;
    path_gradient_method = 'inverse' does, and both give the same first step."""
    from flowplug.flow import Flow

    c = cfg(
        tmp_path,
        "action.name=wilson",
        "action.group=u1",
        "flow.layers=['u1-ncp']",
        "train.path_gradient=true",
        "flow.options={dtype='float64'}",
    )
    slow = build_trainer(
        cfg(
            tmp_path / "slow",
            "action.name=wilson",
            "action.group=u1",
            "flow.layers=['u1-ncp']",
            "train.path_gradient=true",
            "flow.options={dtype='float64'}",
            "train.path_gradient_method='inverse'",
        ),
        out=None,
    )
    ms = slow.train_step()

    def no_inverse(self, x):
        raise AssertionError("the fast path gradient must not invert the flow")

    monkeypatch.setattr(Flow, "inverse", no_inverse)
    fast = build_trainer(c, out=None)
    assert fast.fast_path_gradient and not slow.fast_path_gradient
    mf = fast.train_step()
    assert mf["loss"] == pytest.approx(ms["loss"], rel=1e-12)
    assert mf["grad_norm"] == pytest.approx(ms["grad_norm"], rel=1e-8)
    with pytest.raises(AssertionError, match="must not invert"):
        slow.train_step()
    with pytest.raises(ConfigError, match="path_gradient_method must be"):
        build_trainer(cfg(tmp_path, "train.path_gradient_method='magic'"), out=None)
    with pytest.raises(ConfigError, match="'fast' needs forward_diag.*SUNSpectralCoupling lack it"):
        build_trainer(
            cfg(
                tmp_path,
                "action.name=wilson",
                "action.group=su2",
                "flow.layers=['sun-spectral']",
                "train.path_gradient_method='fast'",
                "train.path_gradient=true",
            ),
            out=None,
        )
    # without path gradients the method is irrelevant
    build_trainer(
        cfg(
            tmp_path,
            "action.name=wilson",
            "action.group=su2",
            "flow.layers=['sun-spectral']",
            "train.path_gradient_method='fast'",
        ),
        out=None,
    )


def test_subclass_overriding_forward_loses_the_fast_path():
    from flowplug.flow import has_forward_diag, make_layer
    from flowplug.plugins.flow_phi4 import AffineCoupling

    class Shifted(AffineCoupling):
        def forward(self, x):
            y, ld = super().forward(x)
            return y + 1.0, ld

    assert has_forward_diag(make_layer("affine", lattice=[4, 4], field="scalar"))
    assert not has_forward_diag(Shifted(lattice=[4, 4]))


def test_path_gradient_falls_back_without_forward_diag(tmp_path):
    from flowplug.flow import path_gradient_loss, supports_fast_path_gradient

    c = cfg(
        tmp_path,
        "action.name=wilson",
        "action.group=su2",
        "flow.layers=['sun-spectral']",
        "train.path_gradient=true",
        "train.steps=2",
    )
    tr = build_trainer(c, out=None)
    assert not supports_fast_path_gradient(tr.flow)
    z, _ = tr.flow.sample_latent(2)
    with pytest.raises(ConfigError, match="forward_diag.*SUNSpectralCoupling"):
        path_gradient_loss(tr.flow, z, tr.action.action)
    hist = tr.run(progress=False)
    assert len(hist) == 2 and all(math.isfinite(m["grad_norm"]) for m in hist)


class _Jump:
    """phi^4 action that jumps by a constant from a given call on (a divergence)."""

    field = "scalar"

    def __init__(self, inner, after):
        self.inner, self.after, self.calls = inner, after, 0

    def action(self, x):
        self.calls += 1
        return self.inner.action(x) + (1000.0 if self.calls > self.after else 0.0)


def test_divergence_guard_rolls_back_and_halves_the_learning_rate(tmp_path):
    c = cfg(tmp_path, "train.guard=100.0", "train.guard_window=4", "train.steps=16", "train.lr=0.01")
    tr = build_trainer(c, out=None)
    tr.action = _Jump(tr.action, after=10)
    tr.run(steps=8, progress=False)
    assert tr.rollbacks == 0 and tr._guard_snapshot is not None
    snap = [v.clone() for v in tr._guard_snapshot["model"].values()]
    with pytest.warns(RuntimeWarning, match=r"training diverged .* steps 8-11.*rollback 1"):
        tr.run(steps=12, progress=False)  # steps 11 and 12 jump by 1000: window 9-12 is 500 nats worse
    assert tr.rollbacks == 1
    for a, b in zip(snap, tr.flow.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert tr.scheduler.base_lrs == [0.005]
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(0.005)
    assert tr.step == 12
    tr.action = tr.action.inner
    tr.run(steps=16, progress=False)
    assert tr.rollbacks == 1 and tr.optimizer.param_groups[0]["lr"] == pytest.approx(0.005)
    with pytest.raises(ConfigError, match="train.guard must be"):
        build_trainer(cfg(tmp_path, "train.guard=-1"), out=None)


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_guard_rebaselines_after_a_rollback(tmp_path):
    """A snapshot may sit up to ``guard`` above the best window; after rolling back to it the
    next window sets the reference, so a flow that stays at the snapshot's level is not rolled
    back again and again (which would halve the learning rate to nothing)."""
    tr = build_trainer(cfg(tmp_path, "train.guard=1.0", "train.guard_window=2", "train.lr=0.01"), out=None)
    feed = lambda *losses: [tr._guard_update(v) for v in losses]  # noqa: E731
    feed(0.0, 0.0)  # best window 0.0, snapshot
    feed(0.9, 0.9)  # within guard: snapshot at 0.9
    with pytest.warns(RuntimeWarning, match="rollback 1"):
        feed(5.0, 5.0)  # blow-up: back to the 0.9 snapshot, lr halved
    feed(0.9, 1.2)  # the restored level (1.05 > 0 + guard) is the new reference
    feed(1.0, 1.0)
    assert tr.rollbacks == 1 and tr.scheduler.base_lrs == [0.005] and tr._guard_best == 1.0
    with pytest.warns(RuntimeWarning, match="rollback 2"):
        feed(3.0, 3.0)  # more than guard above the new reference
    assert tr.rollbacks == 2


def test_ctrl_c_checkpoints_the_current_step_and_resumes_identically(tmp_path, monkeypatch):
    """SIGINT during a step: the step completes, a checkpoint of it is written, then
    KeyboardInterrupt; resuming gives the parameters of the uninterrupted run."""
    import os
    import signal as _signal

    ref = build_trainer(cfg(tmp_path / "ref", "train.checkpoint_every=0"))
    ref.run(progress=False)
    tr = build_trainer(cfg(tmp_path / "int", "train.checkpoint_every=0"))
    step = tr.train_step

    def step_with_sigint():
        if tr.step == 2:
            os.kill(os.getpid(), _signal.SIGINT)  # arrives inside the step
        return step()

    monkeypatch.setattr(tr, "train_step", step_with_sigint)
    with pytest.raises(KeyboardInterrupt):
        tr.run(progress=False)
    assert tr.step == 3
    assert read_checkpoint(tmp_path / "int" / "run")["step"] == 3
    assert _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler
    res = resume_trainer(tmp_path / "int" / "run")
    res.run(progress=False)
    for a, b in zip(params(ref), params(res), strict=True):
        assert torch.equal(a, b)


def test_guard_state_resumes_identically(tmp_path):
    c = cfg(tmp_path, "train.guard=2.0", "train.guard_window=3")
    a = build_trainer(c)
    a.run(steps=5, progress=False, checkpoint_every=0)
    ck = a.save_checkpoint(tmp_path / "mid.pt")
    b = resume_trainer(ck)
    assert b._guard_losses == a._guard_losses and b._guard_best == a._guard_best
    for x, y in zip(a._guard_snapshot["model"].values(), b._guard_snapshot["model"].values(), strict=True):
        assert torch.equal(x, y)
    ma, mb = a.train_step(), b.train_step()
    assert ma["loss"] == mb["loss"] and ma["grad_norm"] == mb["grad_norm"]


def test_cli_train_refuses_to_overwrite_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "train",
        "--config",
        str(EXAMPLES / "train_phi4.toml"),
        "--set",
        f"out='{out}'",
        "--set",
        "lattice=[4,4]",
        "--set",
        "flow.n_layers=2",
        "--set",
        "train.steps=2",
        "--set",
        "train.batch_size=4",
        "--set",
        "eval.samples=16",
        "--no-progress",
    ]
    assert main(args) == 0
    before = (out / "checkpoint.pt").read_bytes()
    assert main(args) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "checkpoint.pt exists: continue that run with --resume" in err and "--force" in err
    assert (out / "checkpoint.pt").read_bytes() == before
    assert main(args + ["--force"]) == 0
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert "nothing to train" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="n_mix >= 1"):
        from flowplug.flow import make_layer

        make_layer("u1-ncp", lattice=[4, 4], field="u1", n_mix=0)
