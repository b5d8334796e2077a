"""Sharded sampling under torchrun (flowplug.distributed, docs/chains.md "Several processes").

hmc, sample and resample on 2 gloo processes equal the one-process run with the same seed and
``streams = 2`` bit for bit (chains, measurements, summaries, configurations); no file is
written by two processes; summary.json records world_size; resample over a directory gives
each input file to exactly one rank; a 2-rank run resumes. The fast tests check the
mechanism in one process: a chain of two random streams is exactly two independent chains
with their own generators.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _sharded_jobs import run_spec

from flowplug import distributed, io
from flowplug.chain import Chain
from flowplug.errors import CheckpointError, ConfigError
from flowplug.jobs.output import read_measurements
from flowplug.measure import measurement
from flowplug.plugins.hmc import HMC
from flowplug.plugins.theories import WilsonGaugeAction

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "_sharded_jobs.py"

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::flowplug.jobs.summary.ShortChainWarning"),  # tiny runs
]

#: Summary entries that describe the process, not the chains.
PER_PROCESS = {"world_size", "seconds_this_run", "checkpoint", "measurements", "threads"}


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env["PYTHONPATH"] = os.pathsep.join([str(WORKER.parent), env.get("PYTHONPATH", "")])
    return env


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())


def _same_summary(a: dict, b: dict) -> None:
    """Every figure of the chains equal (paths and timings aside)."""
    for key in set(a) | set(b):
        if key in PER_PROCESS or key == "inverse_check":
            continue
        assert a.get(key) == b.get(key), key


def _configuration(record: dict) -> torch.Tensor:
    """The configuration a provenance record names (its file may hold several: chosen by the
    step and chain of each configuration's own provenance)."""
    ens = io.read(record["path"])
    keys = [(m.provenance["step"], m.provenance["chain"]) for m in ens.meta]
    return ens.links[keys.index((record["step"], record["chain"]))]


# ------------------------------------------------------------------ one process: the mechanism


def test_two_streams_are_two_independent_chains():
    """A Chain of two streams steps, measures and checkpoints each stream as a chain of its own
    with its own generator: bit for bit (the property that makes a sharded run equal one process)."""
    act = WilsonGaugeAction(1.0, "u1")
    k = HMC(act, steps=3)
    x0 = act.hot_start((4, 4), 5, generator=torch.Generator().manual_seed(3))
    meas = measurement("u1", ["plaquette"])
    gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
    both = Chain(k, [k.init(x0[:2]), k.init(x0[2:])], gens, measure=meas, stream_ids=[0, 1]).run(4)
    alone = [
        Chain(k, k.init(x0[:2]), torch.Generator().manual_seed(11), measure=meas).run(4),
        Chain(k, k.init(x0[2:]), torch.Generator().manual_seed(12), measure=meas).run(4),
    ]
    assert torch.equal(both.state.x, torch.cat([c.state.x for c in alone]))
    for name in ("plaquette", "accepted", "delta_h"):
        assert torch.equal(
            both.history_tensors()[name], torch.cat([c.history_tensors()[name] for c in alone], dim=1)
        ), name
    assert both.sizes == [2, 3]


def test_stream_checkpoint_resumes_bit_for_bit_and_refuses_other_streams(tmp_path):
    act = WilsonGaugeAction(1.0, "u1")
    k = HMC(act, steps=3)
    x0 = act.hot_start((4, 4), 4, generator=torch.Generator().manual_seed(3))

    def chain(ids=(0, 1)):
        gens = [torch.Generator().manual_seed(s) for s in (5, 6)][: len(ids)]
        states = [k.init(x0[:2]), k.init(x0[2:])][: len(ids)]
        return Chain(k, states, gens, stream_ids=list(ids), run_id="r")

    full = chain().run(6)
    part = chain().run(3)
    part.save(tmp_path / "c.pt")
    again = chain()
    again.load(tmp_path / "c.pt")
    again.run(3)
    assert torch.equal(again.state.x, full.state.x)
    assert torch.equal(again.history_tensors()["delta_h"], full.history_tensors()["delta_h"])
    with pytest.raises(CheckpointError, match=r"random streams \[0, 1\].*runs \[1\]"):
        chain(ids=(1,)).load(tmp_path / "c.pt")


def test_streams_split_and_refusals(monkeypatch):
    assert distributed.effective_streams(0) == 1 and distributed.shard(4) == range(0, 4)
    assert [distributed.share(5, 2, g) for g in range(2)] == [slice(0, 2), slice(2, 5)]
    assert distributed.stream_seed(7, 0, 1) == 7  # one stream: the run's seed, as before streams existed
    seeds = {distributed.stream_seed(7, s, 4) for s in range(4)} | {distributed.stream_seed(8, s, 4) for s in range(4)}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)
    assert distributed.rank_name("checkpoint.pt") == "checkpoint.pt"
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert distributed.effective_streams(0) == 2 and distributed.shard(6) == range(3, 6)
    assert distributed.rank_name("chain.ckpt") == "chain.rank1.ckpt"
    assert distributed.rank_name("ensemble.h5") == "ensemble.rank1.h5"
    with pytest.raises(ConfigError, match=r"streams = 3 .* by 2 processes: use a multiple of 2"):
        distributed.effective_streams(3)


def test_hmc_refuses_chains_that_streams_do_not_divide(tmp_path):
    with pytest.raises(ConfigError, match=r"chains = 3 cannot be split into streams = 2"):
        run_spec({"job": "hmc", "set": ["chains=3", "streams=2"], "out": str(tmp_path / "h")})


def test_resume_of_a_run_of_two_processes_in_one_names_the_process_count(tmp_path):
    """A run written by 2 processes (checkpoint.rank0.pt, checkpoint.rank1.pt) resumed in one
    process is refused with the torchrun setting to use, and the other way round."""
    spec = {
        "job": "hmc",
        "set": ["chains=2", "lattice=[4,4]", "hmc.trajectories=3", "hmc.thermalization=1"],
        "out": str(tmp_path / "h"),
    }
    run_spec(spec)
    out = tmp_path / "h"
    (out / "checkpoint.pt").rename(out / "checkpoint.rank0.pt")
    (out / "checkpoint.rank1.pt").write_bytes((out / "checkpoint.rank0.pt").read_bytes())
    with pytest.raises(CheckpointError, match=r"2 processes wrote this run .*--nproc_per_node=2"):
        run_spec({**spec, "resume": True})
    from flowplug.jobs.chains import _check_checkpoint_present

    (out / "checkpoint.rank0.pt").rename(out / "checkpoint.pt")
    (out / "checkpoint.rank1.pt").unlink()
    with pytest.raises(CheckpointError, match=r"one process wrote this run \(checkpoint.pt\)"):
        _check_checkpoint_present(out / "checkpoint.rank1.pt")


def test_other_commands_still_refuse_a_torchrun_world(monkeypatch, tmp_path):
    """demo (several jobs in one) is not sharded: under WORLD_SIZE = 2 it is refused before it writes."""
    from flowplug.errors import FlowplugError
    from flowplug.jobs.demo import run_demo

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(FlowplugError, match="only train is data-parallel"):
        run_demo({}, tmp_path / "d")
    assert not (tmp_path / "d").exists()


# ------------------------------------------------------------------ two processes


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """An untrained U(1) 4x4 flow and a directory of 5 HDF5 files (1, 2, 1, 3, 1 configurations) and a README."""
    from flowplug.train import build_trainer

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("sharded")
    cfg = {
        "lattice": [4, 4],
        "seed": 0,
        "device": "cpu",
        "action": {"name": "wilson", "group": "u1", "beta": 1.0},
        "flow": {"layers": ["u1-spline"], "n_layers": 2, "options": {"hidden": [4]}},
        "train": {"steps": 0, "batch_size": 8, "progress": False, "checkpoint_every": 0},
    }
    trainer = build_trainer(cfg, out=d / "flow-run")
    trainer.run()
    trainer.save_checkpoint(d / "u1.pt")
    act = WilsonGaugeAction(1.0, "u1")
    g = torch.Generator().manual_seed(2)
    (d / "files").mkdir()
    for i, n in enumerate((1, 2, 1, 3, 1)):
        io.write(d / "files" / f"cfg{i}.h5", io.Ensemble(act.hot_start((4, 4), n, generator=g)))
    (d / "files" / "README").write_text("not a lattice file\n")
    return d


def _specs(root: Path, d: Path, streams: list[str]) -> list[dict]:
    """hmc (3 trajectories, then resumed to 5), sample with the flow, sample with non-equilibrium
    proposals (chains started from forward evolutions drawn per stream), resample of the directory."""
    hmc = [
        "chains=4",
        "lattice=[4,4]",
        "hmc.thermalization=1",
        "hmc.steps=3",
        "save_every=2",
        'format="hdf5"',
        "action.beta=1.0",
        *streams,
    ]
    sample = ["chains=4", "steps=6", "thermalize=1", "save_every=3", "ess_samples=16", *streams]
    resample = ["steps=4", "kernel.hmc_every=1", "kernel.hmc.steps=3", *streams]
    sample_ne = [
        "chains=4",
        "steps=3",
        "thermalize=1",
        "save_every=2",
        "lattice=[4,4]",
        "action.name=wilson",
        "action.group=su2",
        "action.beta=2.0",
        "kernel.type=nonequilibrium",
        "kernel.options.n_step=3",
        *streams,
    ]
    flow = str(d / "u1.pt")
    return [
        {"job": "hmc", "set": [*hmc, "hmc.trajectories=3"], "out": str(root / "hmc")},
        {"job": "hmc", "set": [*hmc, "hmc.trajectories=5"], "out": str(root / "hmc"), "resume": True},
        {"job": "sample", "set": sample, "out": str(root / "sample"), "flow": flow},
        {"job": "sample", "set": sample_ne, "out": str(root / "sample-ne")},  # starts: forward evolutions
        {"job": "resample", "set": resample, "out": str(root / "resample"), "flow": flow, "inputs": [str(d / "files")]},
    ]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_two_streams(inputs, tmp_path):
    """One torchrun launch of 2 gloo ranks runs hmc (3 trajectories, resumed to 5), sample (with a
    flow, and with non-equilibrium proposals) and resample; the same jobs in one process with
    streams = 2 give identical results."""
    two, one = tmp_path / "two", tmp_path / "one"
    specs = tmp_path / "specs.json"
    specs.write_text(json.dumps(_specs(two, inputs, [])))  # streams = 0: one per process
    r = _torchrun(str(WORKER), str(specs))
    assert r.returncode == 0, r.stderr[-4000:]
    for spec in _specs(one, inputs, ["streams=2"]):
        run_spec(spec)

    for job in ("hmc", "sample", "sample-ne", "resample"):
        a = json.loads((one / job / "summary.json").read_text())
        b = json.loads((two / job / "summary.json").read_text())
        assert b["world_size"] == 2 and b["streams"] == 2 and a["world_size"] == 1 and a["streams"] == 2
        _same_summary(a, b)
        ext = "h5" if job == "hmc" else "csv"
        ma, mb = (
            read_measurements(one / job / f"measurements.{ext}"),
            read_measurements(two / job / f"measurements.{ext}"),
        )
        assert set(ma) == set(mb)
        for name in ma:
            assert np.array_equal(ma[name], mb[name], equal_nan=True), (job, name)
        # every configuration written once, by one process, and equal to the one-process run's
        pa = json.loads((one / job / "provenance.json").read_text())["outputs"]
        pb = json.loads((two / job / "provenance.json").read_text())["outputs"]
        assert [(r["step"], r["chain"]) for r in pa] == [(r["step"], r["chain"]) for r in pb]
        # resample: cfg0.h5, cfg1.h5 on rank 0
        first_of_rank1 = {"hmc": 2, "sample": 2, "sample-ne": 2, "resample": 3}[job]
        owners: dict[str, set[int]] = {}
        for rec in pb:
            owners.setdefault(rec["path"], set()).add(int(rec["chain"] >= first_of_rank1))
        assert all(len(v) == 1 for v in owners.values()), owners
        for rec_a, rec_b in zip(pa, pb, strict=True):
            assert torch.equal(_configuration(rec_a), _configuration(rec_b)), (job, rec_a["step"], rec_a["chain"])

    # the resumed 2-process hmc run equals an uninterrupted one-process run of 5 trajectories
    straight = _specs(tmp_path / "straight", inputs, ["streams=2"])[1] | {"resume": False}
    run_spec(straight)
    ma = read_measurements(tmp_path / "straight" / "hmc" / "measurements.h5")
    mb = read_measurements(two / "hmc" / "measurements.h5")
    assert all(np.array_equal(ma[k], mb[k]) for k in ma) and ma["plaquette"].shape == (5, 4)
    # hmc: per-rank files and checkpoints, nothing of one process's names
    names = {p.name for p in (two / "hmc").rglob("*") if p.is_file()}
    assert {"checkpoint.rank0.pt", "checkpoint.rank1.pt", "traj_000005.rank0.h5", "traj_000005.rank1.h5"} <= names
    assert "checkpoint.pt" not in names and "traj_000005.h5" not in names
    # resample: every input configuration once; rank 0 read the first 2 files, rank 1 the last 3
    s = json.loads((two / "resample" / "summary.json").read_text())
    assert sorted((Path(i["file"]).name, i["index"]) for i in s["inputs"]) == sorted(
        (f"cfg{f}.h5", i) for f, n in enumerate((1, 2, 1, 3, 1)) for i in range(n)
    )
    assert s["skipped_inputs"] == [str(inputs / "files" / "README")]
    written = json.loads((two / "resample" / "provenance.json").read_text())["outputs"]
    assert sorted((Path(r["input"]).name, r["input_index"]) for r in written) == sorted(
        (f"cfg{f}.h5", i) for f, n in enumerate((1, 2, 1, 3, 1)) for i in range(n)
    )  # save_every = 0: one output per input configuration, each once
    by_store: dict[str, set[str]] = {}
    for rec in json.loads((two / "resample" / "provenance.json").read_text())["outputs"]:
        by_store.setdefault(Path(rec["path"]).name, set()).add(Path(rec["input"]).name)
    assert by_store == {
        "ensemble.rank0.h5": {"cfg0.h5", "cfg1.h5"},
        "ensemble.rank1.h5": {"cfg2.h5", "cfg3.h5", "cfg4.h5"},
    }


@pytest.mark.slow
def test_torchrun_hmc_command(tmp_path):
    """``torchrun -m flowplug hmc``: the ranks share the chains, only rank 0 reports."""
    out = tmp_path / "h"
    sets = ["chains=2", "lattice=[4,4]", "hmc.trajectories=3", "hmc.thermalization=1", "hmc.steps=2", f"out='{out}'"]
    r = _torchrun("-m", "flowplug", "hmc", "--no-progress", *[a for s in sets for a in ("--set", s)])
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count("flowplug hmc: 3 trajectories x 2 chains") == 1
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and s["streams"] == 2 and s["chains"] == 2
    assert sorted(p.name for p in out.glob("checkpoint*")) == ["checkpoint.rank0.pt", "checkpoint.rank1.pt"]
