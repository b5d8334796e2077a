"""flowplug sample / resample / propose / demo, the drop-in FlowProposal, and real files.

Flows here are tiny and (barely) untrained: these tests check plumbing, bookkeeping,
file safety and provenance; the statistical exactness of the kernels is tested in
tests/test_kernels.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flowplug import io
from flowplug.cli import main
from flowplug.errors import ConfigError, ShapeError
from flowplug.flowtools import open_flow
from flowplug.plugins.hmc import HMC
from flowplug.plugins.theories import WilsonGaugeAction
from flowplug.proposal import FlowProposal, from_canonical, to_canonical
from flowplug.train import build_trainer

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def train_checkpoint(path, group, lattice, beta, layer, *, steps, hidden=(8,), n_layers=2, seed=0):
    """Train a small flow with flowplug.train and write its checkpoint to ``path`` (returned)."""
    cfg = {
        "lattice": list(lattice),
        "seed": seed,
        "device": "cpu",
        "action": {"name": "wilson", "group": group, "beta": beta},
        "flow": {"layers": [layer], "n_layers": n_layers, "options": {"hidden": list(hidden)}},
        "train": {"steps": steps, "batch_size": 64, "lr": 3e-3, "progress": False, "checkpoint_every": 0},
    }
    trainer = build_trainer(cfg, out=path.parent / f"{path.stem}-run")
    trainer.run()
    return trainer.save_checkpoint(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A U(1) 4x4 flow (30 training steps) with an HMC ensemble, and an SU(2) 4^4 flow with an ILDG file."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("chains")
    act = WilsonGaugeAction(1.5, "u1")
    train_checkpoint(d / "u1.pt", "u1", (4, 4), 1.5, "u1-spline", steps=30)
    hmc, g = HMC(act, steps=4), torch.Generator().manual_seed(1)
    st = hmc.init(act.cold_start((4, 4), 5))
    for _ in range(10):
        st, _ = hmc.step(st, g)
    io.write(d / "u1.h5", io.Ensemble(st.x))
    a2 = WilsonGaugeAction(2.0, "su2")
    train_checkpoint(d / "su2.pt", "su2", (4, 4, 4, 4), 2.0, "sun-spectral", steps=0, hidden=(4,))  # untrained
    io.write(d / "su2.ildg", io.Ensemble(a2.hot_start((4, 4, 4, 4), 1, generator=g)), "ildg")
    return d


def _cli(*args, capsys=None):
    rc = main([str(a) for a in args])
    return rc


# ------------------------------------------------------------------ checkpoints


def test_flow_checkpoint_roundtrip_and_refusals(files, tmp_path):
    ck = open_flow(files / "u1.pt")
    assert ck.field == "u1" and ck.lattice == (4, 4) and len(ck.sha256) == 64
    assert ck.action_config == {"name": "wilson", "beta": 1.5, "group": "u1"}
    assert ck.action() is ck.loaded.action and ck.action({"beta": 2.5, "group": ""}).beta == 2.5
    assert ck.path == files / "u1.pt" and ck.loaded.step == 30
    z = torch.rand(3, 2, 4, 4, dtype=torch.float64) * 6 - 3
    flow2 = open_flow(files / "u1.pt").flow
    torch.testing.assert_close(ck.flow(z)[0], flow2(z)[0])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    from flowplug.errors import CheckpointError

    with pytest.raises(CheckpointError, match="bad.pt"):
        open_flow(bad)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        open_flow(tmp_path / "missing.pt")


# ------------------------------------------------------------------ drop-in step


def test_layout_conversion_matches_ildg_writer_on_a_non_cubic_lattice():
    from flowplug.adapters.common import canonical_to_ildg

    lat = (2, 3, 4, 5)
    x = WilsonGaugeAction(1.0, "su2").hot_start(lat, 1, generator=torch.Generator().manual_seed(0))
    ildg = canonical_to_ildg(x[0], 64)
    assert ildg.shape == (5, 4, 3, 2, 4, 2, 2)
    back, batched = to_canonical(np.asarray(ildg, dtype=np.complex128), "su2", lat, "ildg")
    assert not batched
    torch.testing.assert_close(back, x)
    again = from_canonical(back, np.zeros(1, np.complex64), "ildg", False)
    assert again.dtype == np.complex64 and again.shape == ildg.shape
    np.testing.assert_allclose(again, ildg.astype(np.complex64))
    with pytest.raises(ShapeError, match=r"expected \(5, 4, 3, 2, 4, 2, 2\)"):
        to_canonical(np.zeros((2, 3, 4, 5, 4, 2, 2), np.complex128), "su2", lat, "ildg")


def test_flow_proposal_step_numpy_ildg_and_torch_canonical(files):
    ck = open_flow(files / "su2.pt")
    prop = FlowProposal(ck.flow, ck.action(), layout="ildg", seed=4)
    x = io.read(files / "su2.ildg").links
    u = from_canonical(x, np.zeros(1, np.complex128), "ildg", False)  # (lt, lz, ly, lx, 4, 2, 2)
    nxt, res = prop.step(u)
    assert isinstance(nxt, np.ndarray) and nxt.shape == u.shape and nxt.dtype == u.dtype
    assert res.accepted.shape == (1,) and res.log_q_current.dtype == np.float64
    assert res.delta_S[0] == pytest.approx(res.log_p_current[0] - res.log_p_proposal[0])
    if not res.accepted[0]:
        assert nxt is u
    # log q of the current configuration is the inverse-flow density
    assert res.log_q_current[0] == pytest.approx(float(ck.flow.log_prob(x)[0].detach()), abs=1e-8)
    prop2 = FlowProposal(ck.flow, ck.action(), layout="canonical", seed=4)
    nxt2, res2 = prop2.step(x)
    assert isinstance(nxt2, torch.Tensor) and nxt2.shape == x.shape
    assert res2.as_dict()["log_q_proposal"] == pytest.approx(float(res.log_q_proposal[0]))  # same seed
    with pytest.raises(ShapeError):
        prop.step(np.zeros((4, 4, 4, 4, 4, 3, 3), np.complex128))
    with pytest.raises(ConfigError):
        FlowProposal(ck.flow, WilsonGaugeAction(1.0, "u1"))


def test_decide_with_an_external_action_is_the_metropolis_rule(files):
    ck = open_flow(files / "u1.pt")
    prop = FlowProposal(ck.flow, None, layout="canonical", seed=1)
    x = io.read(files / "u1.h5").links[:2]
    x1, lq0, lq1 = prop.propose(x)
    s = ck.action()
    acc, la = prop.decide(-s.action(x).numpy(), lq0, -s.action(x1).numpy(), lq1)
    expect = (-s.action(x1).numpy() - lq1) - (-s.action(x).numpy() - lq0)
    np.testing.assert_allclose(la, expect, rtol=0, atol=1e-12)
    with pytest.raises(ConfigError, match="propose"):
        prop.step(x)


@pytest.mark.slow
def test_example_hmc_loop_runs():
    ex = REPO / "examples" / "dropin_hmc_loop.py"
    r = subprocess.run(
        [sys.executable, str(ex), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        env={"FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD": "1", "PATH": "", "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr
    assert "flow acceptance" in r.stdout


# ------------------------------------------------------------------ propose


def test_propose_writes_next_configuration_with_provenance(files, tmp_path, capsys):
    out = tmp_path / "next.ildg"
    assert _cli("propose", "--flow", files / "su2.pt", "--current", files / "su2.ildg", "--out", out, "--seed", 9) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(line) >= {"accepted", "log_p_current", "log_q_current", "log_p_proposal", "log_q_proposal", "delta_S"}
    assert line["delta_S"] == pytest.approx(line["log_p_current"] - line["log_p_proposal"])
    ens = io.read(out)  # checksums verified on read
    assert ens.checksum_status == "ok" and ens.group == "su2"
    xml = ens.meta[0].record("scidac-record-xml").text
    assert "flow_sha256" in xml and "input_sha256" in xml and "<seed>9</seed>" in xml
    if not line["accepted"]:
        torch.testing.assert_close(ens.links, io.read(files / "su2.ildg").links)
    # never over an existing file or the input
    assert _cli("propose", "--flow", files / "su2.pt", "--current", files / "su2.ildg", "--out", out) == 1
    assert "exists" in capsys.readouterr().err
    before = (files / "su2.ildg").read_bytes()
    assert (
        _cli(
            "propose",
            "--flow",
            files / "su2.pt",
            "--current",
            files / "su2.ildg",
            "--out",
            files / "su2.ildg",
            "--force",
        )
        == 1
    )
    assert "is an input" in capsys.readouterr().err
    assert (files / "su2.ildg").read_bytes() == before


def test_propose_refuses_mismatched_group_and_lattice(files, tmp_path, capsys):
    assert (
        _cli("propose", "--flow", files / "u1.pt", "--current", files / "su2.ildg", "--out", tmp_path / "o.ildg") == 1
    )
    err = capsys.readouterr().err
    assert "su2" in err and "u1" in err
    a2 = WilsonGaugeAction(2.0, "su2")
    io.write(tmp_path / "l2.ildg", io.Ensemble(a2.cold_start((4, 4, 4, 2), 1)), "ildg")
    assert (
        _cli("propose", "--flow", files / "su2.pt", "--current", tmp_path / "l2.ildg", "--out", tmp_path / "o.ildg")
        == 1
    )
    err = capsys.readouterr().err
    assert "4x4x4x2" in err and "4x4x4x4" in err
    assert not (tmp_path / "o.ildg").exists()


def test_propose_no_decide(files, tmp_path, capsys):
    out = tmp_path / "p.ildg"
    assert (
        _cli(
            "propose",
            "--flow",
            files / "su2.pt",
            "--current",
            files / "su2.ildg",
            "--out",
            out,
            "--no-decide",
            "--seed",
            1,
        )
        == 0
    )
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["accepted"] is None and "log_q_proposal" in line
    assert io.read(out).checksum_status == "ok"


@pytest.mark.parametrize("bad", [float("-inf"), float("inf"), float("nan")])
def test_propose_no_decide_rejects_a_non_finite_log_q(files, tmp_path, capsys, monkeypatch, bad):
    """A proposal with a non-finite log q is rejected here (no production action can make
    it acceptable): accepted false, OUT = the current configuration."""
    propose = FlowProposal.propose

    def broken(self, u):
        x1, lq0, lq1 = propose(self, u)
        return x1, lq0, np.full_like(lq1, bad)

    monkeypatch.setattr(FlowProposal, "propose", broken)
    out = tmp_path / "p.ildg"
    assert (
        _cli(
            "propose",
            "--flow",
            files / "su2.pt",
            "--current",
            files / "su2.ildg",
            "--out",
            out,
            "--no-decide",
            "--seed",
            1,
        )
        == 0
    )
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["accepted"] is False and "non-finite" in line["reason"]
    torch.testing.assert_close(io.read(out).links, io.read(files / "su2.ildg").links, rtol=0, atol=0)


def test_propose_removes_its_stale_temporary_files(files, tmp_path, capsys):
    out = tmp_path / "next.ildg"
    stale = tmp_path / ".next.ildg.k3j9x_2a.part"  # left by a call killed while writing
    other = tmp_path / ".other.ildg.k3j9x_2a.part"  # another file's: not ours to remove
    stale.write_bytes(b"partial")
    other.write_bytes(b"partial")
    assert _cli("propose", "--flow", files / "su2.pt", "--current", files / "su2.ildg", "--out", out, "--seed", 2) == 0
    assert out.exists() and not stale.exists() and other.exists()


# ------------------------------------------------------------------ resample / sample


def test_resample_summary_provenance_and_resume(files, tmp_path, capsys):
    out = tmp_path / "r"
    args = [
        "resample",
        files / "u1.h5",
        "--flow",
        files / "u1.pt",
        "--out",
        out,
        "--no-progress",
        "--set",
        "steps=6",
        "--set",
        "save_every=3",
        "--set",
        "kernel.hmc_every=1",
    ]
    assert _cli(*args) == 0
    s = json.loads((out / "summary.json").read_text())
    assert set(s) >= {"acceptance", "ess", "observables", "inputs", "acceptance_by_kernel"}
    assert set(s["observables"]["plaquette"]) >= {"mean", "error", "tau_int"}
    assert len(s["inputs"]) == 5 and all(len(i["sha256"]) == 64 for i in s["inputs"])
    assert set(s["acceptance_by_kernel"]) == {"hmc", "flow"}
    ens = io.read(out / "ensemble.h5")
    assert len(ens) == 10  # 5 chains x steps 3 and 6
    prov = ens.meta[-1].provenance
    assert prov["flow_sha256"] == open_flow(files / "u1.pt").sha256 and prov["step"] == 6
    assert (out / "report.png").stat().st_size > 1000
    # the output exists: refused without --resume/--force
    assert _cli(*args) == 1
    assert "exists" in capsys.readouterr().err


def _chain_checkpoint(out):
    return torch.load(out / "chain.ckpt", weights_only=True)


def test_resample_resume_is_bit_for_bit(files, tmp_path):
    """Four steps, then --resume to eight, equals eight steps in one go (state and history)."""
    from flowplug.config import build_config
    from flowplug.jobs.output import read_measurements
    from flowplug.jobs.resample import DEFAULT_CONFIG, run_resample

    cfg = lambda n: build_config(DEFAULT_CONFIG, overrides=[f"steps={n}", "save_every=0"])  # noqa: E731
    s_full = run_resample(cfg(8), [files / "u1.h5"], files / "u1.pt", tmp_path / "a")
    run_resample(cfg(4), [files / "u1.h5"], files / "u1.pt", tmp_path / "b")
    s_res = run_resample(cfg(8), [files / "u1.h5"], files / "u1.pt", tmp_path / "b", resume=True)
    full, res = _chain_checkpoint(tmp_path / "a"), _chain_checkpoint(tmp_path / "b")
    torch.testing.assert_close(res["state"]["x"], full["state"]["x"], rtol=0, atol=0)
    assert res["step"] == full["step"] == 8 and full["history"].keys() == res["history"].keys()
    for k, v in full["history"].items():
        torch.testing.assert_close(res["history"][k], v, rtol=0, atol=0)
    ma, mb = (
        read_measurements(tmp_path / "a" / "measurements.csv"),
        read_measurements(tmp_path / "b" / "measurements.csv"),
    )
    assert ma.keys() == mb.keys() and ma["plaquette"].shape == (8, 5)
    for k in ma:
        np.testing.assert_array_equal(ma[k], mb[k])
    assert s_res["acceptance"] == s_full["acceptance"] and s_res["observables"] == s_full["observables"]
    # the store holds steps 4 (the first run's last) and 8, as the provenance says
    ens = io.read(tmp_path / "b" / "ensemble.h5")
    assert [m.provenance["step"] for m in ens.meta] == [4] * 5 + [8] * 5 and s_res["written"] == 10
    torch.testing.assert_close(ens.links[5:], io.read(tmp_path / "a" / "ensemble.h5").links, rtol=0, atol=0)
    # a different flow or seed is a different run: its checkpoint is refused
    from flowplug.errors import CheckpointError

    with pytest.raises(CheckpointError, match="different run"):
        run_resample(
            build_config(DEFAULT_CONFIG, overrides=["steps=9", "seed=5"]),
            [files / "u1.h5"],
            files / "u1.pt",
            tmp_path / "b",
            resume=True,
        )


class _Crash(Exception):
    """A process dying between writing configurations and writing the checkpoint."""


def test_resample_resumed_after_a_crash_between_checkpoints_writes_each_step_once(files, tmp_path, monkeypatch):
    """The run dies after the configurations of steps 5 and 6 went into the HDF5 store but before
    the next checkpoint (checkpoints every 4 steps): the resume continues from step 4, rolls the
    store back to step 4 first, and ends with exactly the store of an uninterrupted run."""
    from flowplug.config import build_config
    from flowplug.jobs import output as output_module
    from flowplug.jobs.output import ChainOutput
    from flowplug.jobs.resample import DEFAULT_CONFIG, run_resample

    cfg = build_config(DEFAULT_CONFIG, overrides=["steps=8", "save_every=1", "checkpoint_every=4"])
    inputs, flow = [files / "u1.h5"], files / "u1.pt"
    run_resample(cfg, inputs, flow, tmp_path / "full")

    real_after_step = ChainOutput.after_step

    def dies_after_step_6(self, chain, info=None):
        real_after_step(self, chain, info)  # step 6 appended to the store ...
        if chain.step_count == 6:
            raise _Crash  # ... and the process dies before step 8's checkpoint

    monkeypatch.setattr(ChainOutput, "after_step", dies_after_step_6)
    with pytest.raises(_Crash):
        run_resample(cfg, inputs, flow, tmp_path / "part")
    monkeypatch.setattr(ChainOutput, "after_step", real_after_step)
    assert torch.load(tmp_path / "part" / "chain.ckpt", weights_only=True)["step"] == 4
    assert len(io.read(tmp_path / "part" / "ensemble.h5")) == 6 * 5  # steps 1..6, 5 chains
    removed = []
    real_truncate = output_module._truncate_store
    monkeypatch.setattr(
        output_module,
        "_truncate_store",
        lambda path, step: removed.append((step, real_truncate(path, step))) or removed[-1][1],
    )
    s = run_resample(cfg, inputs, flow, tmp_path / "part", resume=True)
    assert removed == [(4, 2 * 5)] and s["steps"] == 8  # steps 5, 6 rolled back
    full, part = io.read(tmp_path / "full" / "ensemble.h5"), io.read(tmp_path / "part" / "ensemble.h5")
    assert len(part) == len(full) == 8 * 5  # each step once
    assert [m.provenance["step"] for m in part.meta] == [m.provenance["step"] for m in full.meta]
    assert [m.provenance["chain"] for m in part.meta] == [m.provenance["chain"] for m in full.meta]
    torch.testing.assert_close(part.links, full.links, rtol=0, atol=0)
    assert s["written"] == 40
    prov = json.loads((tmp_path / "part" / "provenance.json").read_text())["outputs"]
    assert [(o["step"], o["chain"]) for o in prov] == [(t, c) for t in range(1, 9) for c in range(5)]


def test_sample_writes_ensemble_summary_and_report(files, tmp_path):
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
            "chains=4",
            "--set",
            "steps=12",
            "--set",
            "thermalize=2",
            "--set",
            "save_every=6",
            "--set",
            "ess_samples=32",
        )
        == 0
    )
    s = json.loads((out / "summary.json").read_text())
    assert 0 <= s["acceptance"] <= 1 and 0 < s["ess"] <= 1
    assert set(s["observables"]) - {"topological_susceptibility"} == {"plaquette", "topological_charge"}
    assert len(io.read(out / "ensemble.h5")) == 8
    assert (out / "measurements.csv").read_text().count("\n") == 1 + 12 * 4
    assert (out / "report.png").exists()


def test_sample_flow_hmc_kernel(files, tmp_path):
    out = tmp_path / "fh"
    assert (
        _cli(
            "sample",
            "--flow",
            files / "u1.pt",
            "--out",
            out,
            "--no-progress",
            "--set",
            "chains=4",
            "--set",
            "steps=5",
            "--set",
            "thermalize=1",
            "--set",
            "kernel.type=flow-hmc",
            "--set",
            "kernel.hmc.steps=3",
            "--set",
            "ess_samples=8",
        )
        == 0
    )
    assert json.loads((out / "summary.json").read_text())["acceptance"] > 0


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert _cli("demo", "--quick", "--out", out, "--no-progress") == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["beta"] == 6.0  # where HMC freezes
    assert s["exact"]["plaquette"] == pytest.approx(0.912454914877, abs=1e-9)
    assert s["exact"]["q2"] == pytest.approx(0.279200845328, abs=1e-8)
    assert set(s) >= {"acceptance", "ess", "hmc", "flow", "observables", "sigma_from_exact", "ratio_bound"}
    assert set(s) >= {"tau_int_q_ratio_hmc_over_flow", "seconds_per_independent_q_ratio_hmc_over_flow"}
    # 4 cold chains of 20 trajectories at beta = 6 never change Q: frozen, lower bounds only
    h = s["hmc"]
    assert h["frozen"] and h["topology_changes"] == 0 and h["frozen_reasons"]
    assert h["tau_int_q_lower_bound"] and h["seconds_per_independent_q_lower_bound"] and h["tau_int_q"] == 20
    assert h["seconds_per_independent_q"] > 0 and s["flow"]["seconds_per_independent_q"] > 0
    assert s["ratio_bound"] in (">=", None)
    assert s["flow"]["layer_options"]["init_beta"] == 6.0  # the demo's beta
    text = (out / "report.txt").read_text()
    assert (out / "report.png").exists() and "exact" in text
    assert "HMC is FROZEN (topological freezing)" in text and "tau_int(Q) >= 20 trajectories" in text
    assert "HMC >= " in text  # its cost, a lower bound
    # the stages are run directories of hmc, train and resample
    assert [p.name for p in sorted((out / "hmc" / "ensemble").iterdir())] == ["traj_000020.h5", "traj_000030.h5"]
    for sub, command in (("hmc", "hmc"), ("flow", "train"), ("resample", "resample")):
        assert json.loads((out / sub / "summary.json").read_text())["command"] == command
    assert (out / "flow" / "checkpoint.pt").exists() and len(io.read(out / "resample" / "ensemble.h5")) == 8 * 2
    assert s["hmc"]["trajectories"] == 4 * 30 and s["flow"]["proposals"] == 8 * 10
    assert _cli("demo", "--quick", "--out", out, "--no-progress") == 1  # never over an earlier run


# ------------------------------------------------------------------ real MILC file


@pytest.mark.slow
def test_real_milc_ildg_resample_and_propose(shared_dir, tmp_path, capsys):
    """4D SU(3) 4^4 flow (beta = 6.0, untrained: acceptance is honest, i.e. ~0) on MILC's file."""
    src = shared_dir / "ensembles" / "milc.lat.sample.l4444.ildg"
    train_checkpoint(tmp_path / "su3.pt", "su3", (4, 4, 4, 4), 6.0, "sun-spectral", steps=0, hidden=(4,))
    out = tmp_path / "r"
    # the file states MILC's Symanzik action at beta11 = 7.0 (with quarks): a Wilson flow's
    # chains stay exact, and the user is told that the file only seeds them
    code = _cli(
        "resample",
        src,
        "--flow",
        tmp_path / "su3.pt",
        "--out",
        out,
        "--no-progress",
        "--set",
        "steps=2",
        "--set",
        "save_every=1",
    )
    assert code == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "the file states the action name = milc-symanzik" in err and "sample name = wilson" in err
    s = json.loads((out / "summary.json").read_text())
    assert s["format"] == "ildg" and s["precision"] == 32 and s["chains"] == 1
    outs = sorted(out.glob("*.ildg"))
    assert len(outs) == 2
    for p in outs:
        e = io.read(p)  # checksums verified on re-read
        assert e.checksum_status == "ok" and e.lattice == (4, 4, 4, 4)
    assert s["inputs"][0]["sha256"] and "<input_sha256>" in io.read(outs[0]).meta[0].record("scidac-record-xml").text
    assert (
        _cli("propose", "--flow", tmp_path / "su3.pt", "--current", src, "--out", tmp_path / "n.ildg", "--seed", 2) == 0
    )
    cap = capsys.readouterr()
    line = json.loads(cap.out.strip().splitlines()[-1])
    assert line["format"] == "ildg" and io.read(tmp_path / "n.ildg").checksum_status == "ok"
    # deciding with the flow's Wilson action inside a MILC chain would not be exact for MILC's action
    err = " ".join(cap.err.split())
    assert "decided with the flow's action name = wilson" in err and "--no-decide" in err
    assert line["file_action"].startswith("name = milc-symanzik")
    assert (
        _cli("propose", "--flow", tmp_path / "su3.pt", "--current", src, "--out", tmp_path / "m.ildg", "--no-decide")
        == 0
    )
    assert "--no-decide" not in capsys.readouterr().err  # the production code decides: nothing to warn about


def test_resample_reads_a_flowplug_train_run_directory(files, tmp_path):
    """A `flowplug train` run directory (its checkpoint.pt, action in the stored config) works as --flow."""
    run = tmp_path / "tr"
    assert (
        _cli(
            "train",
            "--set",
            f"out={run}",
            "--set",
            "lattice=[4,4]",
            "--set",
            "action.name=wilson",
            "--set",
            "action.group=u1",
            "--set",
            "action.beta=1.5",
            "--set",
            'flow.layers=["u1-spline"]',
            "--set",
            "flow.n_layers=2",
            "--set",
            "train.steps=3",
            "--set",
            "train.progress=false",
            "--set",
            "eval.samples=32",
            "--set",
            "threads=1",
        )
        == 0
    )
    ck = open_flow(run)
    assert ck.field == "u1" and ck.action().beta == 1.5
    out = tmp_path / "r"
    assert _cli("resample", files / "u1.h5", "--flow", run, "--out", out, "--no-progress", "--set", "steps=2") == 0
    assert json.loads((out / "summary.json").read_text())["flow"]["sha256"] == ck.sha256


def test_chain_events_reach_plugins_and_a_failing_monitor_does_not_stop_the_run(files, tmp_path, fresh_pm):
    from flowplug import hookimpl
    from flowplug.config import build_config
    from flowplug.jobs.sample import DEFAULT_CONFIG, run_sample

    seen = []

    class Monitor:
        @hookimpl
        def flowplug_after_chain_step(self, step, kernel, info):
            seen.append((step, kernel, bool(info["accepted"].any())))
            raise RuntimeError("monitor broke")

    fresh_pm.register(Monitor(), name="monitor")
    cfg = build_config(DEFAULT_CONFIG, overrides=["chains=2", "steps=3", "thermalize=0", "ess_samples=4"])
    with pytest.warns(Warning):
        run_sample(cfg, files / "u1.pt", tmp_path / "s")
    assert [s[0] for s in seen] == [0, 1, 2] and seen[0][1] == "independence-metropolis"
    assert (tmp_path / "s" / "summary.json").exists()


def test_resample_a_phi4_ensemble_written_by_hmc(tmp_path, capsys):
    """Ensembles of any field: `flowplug hmc` writes a phi^4 ensemble as HDF5 stores and
    `flowplug resample` runs on it, writing a phi^4 store of its own."""
    out = tmp_path / "h"
    phi4 = [
        "--set",
        "action.name=phi4",
        "--set",
        "action.m2=-4.0",
        "--set",
        "action.lam=6.975",
        "--set",
        "lattice=[6,6]",
    ]
    assert (
        _cli(
            "hmc",
            *phi4,
            "--set",
            "format=hdf5",
            "--set",
            f"out={out}",
            "--set",
            "hmc.trajectories=12",
            "--set",
            "hmc.thermalization=2",
            "--set",
            "save_every=5",
            "--no-progress",
        )
        == 0
    )
    files = sorted((out / "ensemble").glob("*.h5"))
    assert files and io.read(files[0]).field == "scalar"
    run = tmp_path / "f"
    assert (
        _cli(
            "train",
            *phi4,
            "--set",
            'flow.layers=["affine"]',
            "--set",
            "flow.n_layers=2",
            "--set",
            "train.steps=5",
            "--set",
            "eval.samples=64",
            "--set",
            f"out={run}",
            "--no-progress",
        )
        == 0
    )
    r = tmp_path / "r"
    assert _cli("resample", out / "ensemble", "--flow", run, "--out", r, "--set", "steps=4", "--no-progress") == 0
    ens = io.read(r / "ensemble.h5")
    assert ens.field == "scalar" and ens.lattice == (6, 6) and len(ens) == len(files) * 4
    summary = json.loads((r / "summary.json").read_text())
    assert "magnetization" in summary["observables"]


# ------------------------------------------------------------------ resample without a flow


def test_resample_without_a_flow_runs_a_flow_free_kernel_on_the_action(files, tmp_path, capsys):
    """No --flow: the chains of [action] with a kernel that needs none, started from the inputs."""
    from flowplug.jobs.chains import build_kernel, run_chains

    out = tmp_path / "r"
    args = ["resample", files / "u1.h5", "--out", out, "--no-progress", "--set", "steps=3", "--set", "seed=5"]
    action = ["--set", "action.name=wilson", "--set", "action.group=u1", "--set", "action.beta=1.5"]
    assert _cli(*args, *action, "--set", "kernel.type=hmc", "--set", "kernel.hmc.steps=4") == 0
    assert "ESS of input weights n/a (no flow)" in capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    assert not {"flow", "ess", "ess_p_samples", "reweighted_inputs", "inverse_check"} & set(s)  # left out, not null
    assert s["kernel"] == "hmc" and s["chains"] == 5 and s["written"] == 5
    assert [i["index"] for i in s["inputs"]] == [0, 1, 2, 3, 4] and "log_w" not in s["inputs"][0]
    # the written configurations are those of HMC chains of that action from the inputs, same seed
    act = WilsonGaugeAction(1.5, "u1")
    kernel = build_kernel(
        None, act, {"type": "hmc", "hmc": {"integrator": "omelyan", "steps": 4, "trajectory_length": 1.0}}
    )
    x0 = io.read(files / "u1.h5").links.to(torch.float64)
    chain = run_chains(kernel, x0, 3, seed=5)
    got = io.read(out / "ensemble.h5").links.to(torch.float64)
    assert not torch.equal(got, x0)
    diff = torch.remainder(got - chain.state.x + torch.pi, 2 * torch.pi) - torch.pi  # angles modulo 2 pi
    assert diff.abs().max() < 1e-12
    # the [action] table is open: a fermionic action's couplings (pseudofermion HMC from the inputs)
    fermions = ["--set", "action.name=schwinger", "--set", "action.beta=1.5", "--set", "action.kappa=0.1"]
    assert _cli(*args, "--out", tmp_path / "f", *fermions, "--set", "kernel.type=hmc") == 0
    s = json.loads((tmp_path / "f" / "summary.json").read_text())
    assert s["action"]["kappa"] == 0.1 and "chiral_condensate" in s["observables"]
    # refusals: no action, a flow kernel, a file of another field kind
    assert _cli(*args, "--out", tmp_path / "x1", "--set", "kernel.type=hmc") == 1
    assert "without --flow samples the action [action]" in " ".join(capsys.readouterr().err.split())
    assert _cli(*args, "--out", tmp_path / "x2", *action) == 1
    assert "proposes from a flow: give --flow" in " ".join(capsys.readouterr().err.split())
    su2 = ["resample", files / "su2.ildg", "--out", tmp_path / "x3", "--no-progress", "--set", "kernel.type=hmc"]
    assert _cli(*su2, *action) == 1
    assert "but the action WilsonGaugeAction acts on u1 fields" in " ".join(capsys.readouterr().err.split())
