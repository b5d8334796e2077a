"""Fresh-user findings of the chain commands (``hmc``, ``sample``, ``resample``).

1. The default thermalisation adapts to short runs (``min(20, steps // 2)`` for ``sample``,
   ``min(10, hmc.trajectories // 2)`` for ``hmc``), fixed when the run starts; an explicit
   value that leaves nothing to measure is refused naming both keys; the fingerprints of
   runs made with the old fixed default are unchanged, and such run directories resume.
2. ``hmc`` has ``checkpoint_every`` (not ``save_every``): a run stopped between two
   checkpoints resumes to the uninterrupted run, without gaps or duplicates.
3. ``summary.json`` of a run without a flow has no null flow-only entries.
4. ``--resume`` needs only ``--out``: the flow and the inputs come from ``run_files.json``;
   another path, or a file whose SHA-256 changed, is refused naming the file, the stored and
   the found value. ``hmc``'s start file is not read on a resume (the checkpoint holds the
   chains), so it may have moved.

Plumbing tests: tiny lattices, untrained flows, fixed seeds; results are compared bit for
bit with uninterrupted runs (the kernels' exactness is tested in tests/test_kernels.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from flowplug import config as _config
from flowplug import io
from flowplug.cli import main
from flowplug.errors import CheckpointError, ConfigError
from flowplug.hookspecs import hookimpl
from flowplug.jobs import hmc as hmc_job
from flowplug.jobs import sample as sample_job
from flowplug.jobs.provenance import (
    RUN_CONFIG,
    RUN_FILES,
    fingerprint,
    resolve_thermalization,
    stored_run_config,
    stored_run_files,
)

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::flowplug.jobs.summary.ShortChainWarning"),
]

PHI4 = ["action.name=phi4", "action.m2=-4.0", "action.lam=8.0", "lattice=[4,4]", "chains=2", "kernel.hmc.steps=2"]


def _sets(*pairs: str) -> list[str]:
    return [w for p in pairs for w in ("--set", p)]


def _flat(err: str) -> str:
    return " ".join(err.split())


def _sample(out: Path | str, *sets: str, flow: Path | str | None = None, resume: bool = False) -> int:
    args = ["sample", "--out", str(out), "--no-progress", *_sets(*sets)]
    if flow is not None:
        args += ["--flow", str(flow)]
    return main(args + (["--resume"] if resume else []))


def _h5(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}


# ------------------------------------------------------------------ 1. thermalisation default


def test_sample_short_run_works_with_the_default_thermalize(tmp_path, capsys):
    assert _sample(tmp_path / "s", *PHI4, "steps=10") == 0
    s = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert s["thermalize"] == 5 and s["steps"] == 10  # min(20, 10 // 2)
    assert stored_run_config(tmp_path / "s")["thermalize"] == 5  # type: ignore[index]
    # the statistics leave out exactly those steps: 5 steps x 2 chains measured
    assert s["observables"]["magnetization"]["n"] == 5 * 2
    capsys.readouterr()
    # an explicit value that leaves nothing to measure is still an error naming both keys
    assert _sample(tmp_path / "t", *PHI4, "steps=10", "thermalize=10") == 1
    err = _flat(capsys.readouterr().err)
    assert "steps = 10 leaves nothing after thermalize = 10: need thermalize < steps" in err
    assert "min(20, steps // 2)" in err
    assert _sample(tmp_path / "u", *PHI4, "steps=10", "thermalize=-2") == 1
    assert "thermalize = -2" in _flat(capsys.readouterr().err)


def test_the_default_is_fixed_when_the_run_starts(tmp_path):
    """Extending a short run keeps its thermalisation: the same chain and the same statistics as
    an uninterrupted run with that value set explicitly."""
    assert _sample(tmp_path / "part", *PHI4, "steps=6") == 0  # thermalize 3
    assert _sample(tmp_path / "part", "steps=12", resume=True) == 0
    assert _sample(tmp_path / "full", *PHI4, "steps=12", "thermalize=3") == 0
    a = json.loads((tmp_path / "part" / "summary.json").read_text())
    b = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert a["thermalize"] == b["thermalize"] == 3
    assert a["observables"] == b["observables"]
    assert (tmp_path / "part" / "measurements.csv").read_text() == (tmp_path / "full" / "measurements.csv").read_text()


def test_a_python_resume_with_the_default_takes_the_stored_value(tmp_path):
    """run_sample(resume=True) with a configuration still holding the default (-1) resumes with
    the value the run started with (config.toml), not with the rule applied to the new steps."""

    def cfg(steps: int) -> dict:
        return _config.build_config(
            sample_job.DEFAULT_CONFIG,
            overrides=["progress=false", *PHI4, f"steps={steps}"],
            open_tables=sample_job.OPEN_TABLES,
        )

    assert sample_job.run_sample(cfg(6), None, tmp_path / "r")["thermalize"] == 3
    resumed = sample_job.run_sample(cfg(50), None, tmp_path / "r", resume=True)
    assert resumed["thermalize"] == 3 and resumed["steps"] == 50  # min(20, 25) would be 20


def test_resolve_thermalization_rules(tmp_path):
    cfg = _config.build_config(sample_job.DEFAULT_CONFIG, open_tables=sample_job.OPEN_TABLES)
    assert cfg["thermalize"] == -1
    for steps, want in [(1, 0), (3, 1), (10, 5), (39, 19), (40, 20), (200, 20)]:
        got, value = resolve_thermalization({**cfg, "steps": steps}, **_SAMPLE_RULE, out=tmp_path, resume=False)
        assert value == want and got["thermalize"] == want, steps
    # an explicit value is kept, also when the default rule would give another
    assert resolve_thermalization({**cfg, "thermalize": 7}, **_SAMPLE_RULE, out=tmp_path, resume=False)[1] == 7
    # a resume of a directory of an earlier version (no config.toml) takes that version's default
    assert resolve_thermalization({**cfg, "steps": 30}, **_SAMPLE_RULE, out=tmp_path, resume=True)[1] == 20
    with pytest.raises(ConfigError, match=r"steps = 15 leaves nothing after thermalize = 20"):
        resolve_thermalization({**cfg, "steps": 15}, **_SAMPLE_RULE, out=tmp_path, resume=True)
    # hmc: nested keys
    h = _config.build_config(hmc_job.DEFAULT_CONFIG, open_tables=hmc_job.OPEN_TABLES)
    rule = {"key": "hmc.thermalization", "steps_key": "hmc.trajectories", "cap": 10}
    got, value = resolve_thermalization(h, **rule, out=tmp_path, resume=False)
    assert value == 10 and got["hmc"]["thermalization"] == 10 and h["hmc"]["thermalization"] == -1  # a copy
    h["hmc"]["trajectories"] = 4
    assert resolve_thermalization(h, **rule, out=tmp_path, resume=False)[1] == 2
    h["hmc"]["thermalization"] = 4
    with pytest.raises(ConfigError, match=r"hmc.trajectories = 4 leaves nothing after hmc.thermalization = 4"):
        resolve_thermalization(h, **rule, out=tmp_path, resume=False)


_SAMPLE_RULE: dict[str, Any] = {"key": "thermalize", "steps_key": "steps", "cap": 20}


def test_the_default_keeps_the_fingerprints_of_earlier_runs():
    """The fingerprint of sample's default configuration (steps = 200) is the value it had when
    the default was thermalize = 20 (flowplug 0.1), once the job resolves the default."""
    cfg = _config.build_config(sample_job.DEFAULT_CONFIG, open_tables=sample_job.OPEN_TABLES)
    resolved, value = resolve_thermalization(cfg, **_SAMPLE_RULE, out="/nonexistent", resume=False)
    assert value == 20
    ignore = {"ignore": sample_job.NON_CHAIN_KEYS, "omit_defaults": sample_job.ADDED_KEYS}
    assert fingerprint(resolved, "", **ignore) == "b1c0c9a490ff6d23"
    # hmc's thermalization and checkpoint_every do not enter its fingerprint at all
    h = _config.build_config(hmc_job.DEFAULT_CONFIG)
    assert hmc_job.run_fingerprint(h) == "19c0800e24c26676"
    h["checkpoint_every"] = 7
    h["hmc"]["thermalization"] = 3
    assert hmc_job.run_fingerprint(h) == "19c0800e24c26676"


def test_a_run_directory_of_the_old_default_resumes(tmp_path):
    """A run made when the default was thermalize = 20 (simulated: set explicitly, without
    config.toml and run_files.json, which earlier versions did not write) resumes from the
    command line without thermalize, and its checkpoint's fingerprint equals that of a new run
    with the default at steps >= 40. Its 30 steps are fewer than 40, where today's rule would
    give 15: the resume must take 20 (the fingerprint holds it)."""
    old, new = tmp_path / "old", tmp_path / "new"
    assert _sample(old, *PHI4, "steps=30", "thermalize=20") == 0
    assert _sample(new, *PHI4, "steps=40") == 0
    a = torch.load(old / "chain.ckpt", weights_only=True)
    b = torch.load(new / "chain.ckpt", weights_only=True)
    assert a["run_id"] == b["run_id"]  # steps is not in the fingerprint
    (old / RUN_CONFIG).unlink()
    (old / RUN_FILES).unlink()
    assert _sample(old, *PHI4, "steps=34", resume=True) == 0  # the default: 20, as that run had
    assert json.loads((old / "summary.json").read_text())["thermalize"] == 20


def test_hmc_short_run_works_with_the_default_thermalization(tmp_path, capsys):
    base = [f"out={tmp_path / 'h'}", "lattice=[4,4]", "chains=2", "hmc.steps=2", "progress=false", "format='none'"]
    assert main(["hmc", *_sets(*base, "hmc.trajectories=4")]) == 0
    s = json.loads((tmp_path / "h" / "summary.json").read_text())
    assert s["thermalization"] == 2 and s["measured_trajectories"] == 2
    capsys.readouterr()
    base[0] = f"out={tmp_path / 'g'}"
    assert main(["hmc", *_sets(*base, "hmc.trajectories=4", "hmc.thermalization=4")]) == 1
    err = _flat(capsys.readouterr().err)
    assert "hmc.trajectories = 4 leaves nothing after hmc.thermalization = 4" in err


# ------------------------------------------------------------------ 2. hmc checkpoint_every


class _Monitor:
    """Records the checkpoints written; stops the run (like Ctrl-C) after step ``at``."""

    def __init__(self, at: int | None = None) -> None:
        self.at = at
        self.steps: list[int] = []

    @hookimpl
    def flowplug_checkpoint_written(self, path, step, what):
        self.steps.append(step)

    @hookimpl
    def flowplug_after_chain_step(self, step, kernel, info):
        if step == self.at:
            raise KeyboardInterrupt


def _hmc_cfg(out: Path, *extra: str) -> dict:
    base = [
        f"out={out}",
        "progress=false",
        "lattice=[4,4]",
        "chains=2",
        "seed=5",
        "hmc.trajectories=12",
        "hmc.thermalization=1",
        "hmc.steps=3",
        "save_every=2",
        "checkpoint_every=4",
        "measurements=csv",
    ]
    return _config.build_config(hmc_job.DEFAULT_CONFIG, overrides=base + list(extra), open_tables=hmc_job.OPEN_TABLES)


def test_hmc_checkpoint_every_and_a_resume_between_checkpoints(tmp_path, fresh_pm):
    full_mon = _Monitor()
    fresh_pm.register(full_mon, name="watch")
    full = hmc_job.run_hmc(_hmc_cfg(tmp_path / "full"))
    fresh_pm.unregister(name="watch")
    assert full_mon.steps == [4, 8, 12]  # checkpoint_every, not save_every (2)
    stop = _Monitor(at=7)  # between the checkpoints at 4 and 8; configurations of 6 are written
    fresh_pm.register(stop, name="stop")
    with pytest.raises(KeyboardInterrupt):
        hmc_job.run_hmc(_hmc_cfg(tmp_path / "part"))
    fresh_pm.unregister(name="stop")
    assert stop.steps == [4]
    assert torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["step"] == 4
    # checkpoint_every is not a key of the chain: it may change on the resume
    resumed = hmc_job.run_hmc(_hmc_cfg(tmp_path / "part", "checkpoint_every=5"), resume=True)
    assert resumed["observables"] == full["observables"] and resumed["trajectories"] == 12
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert torch.equal(a["state"]["x"], b["state"]["x"])
    for k in a["history"]:  # every step once: no gap, no duplicate
        assert a["history"][k].shape[0] == 12, k
        assert torch.equal(a["history"][k], b["history"][k]), k
    text = (tmp_path / "part" / "measurements.csv").read_text()
    assert text == (tmp_path / "full" / "measurements.csv").read_text()
    pa = json.loads((tmp_path / "full" / "provenance.json").read_text())["outputs"]
    pb = json.loads((tmp_path / "part" / "provenance.json").read_text())["outputs"]
    keys = [(o["step"], o["chain"]) for o in pb]
    assert keys == [(o["step"], o["chain"]) for o in pa] == [(t, c) for t in (2, 4, 6, 8, 10, 12) for c in (0, 1)]
    for name in sorted(p.name for p in (tmp_path / "full" / "ensemble").iterdir()):
        ea, eb = io.read(tmp_path / "full" / "ensemble" / name), io.read(tmp_path / "part" / "ensemble" / name)
        assert torch.equal(ea.links, eb.links), name


def test_hmc_checkpoint_every_is_validated(tmp_path):
    with pytest.raises(ConfigError, match=r"checkpoint_every must be >= 0.*found -1"):
        hmc_job.run_hmc(_hmc_cfg(tmp_path / "x", "checkpoint_every=-1"))


# ------------------------------------------------------------------ 3. no null flow-only entries


def _nulls(tree: Any, prefix: str = "") -> list[str]:
    if tree is None:
        return [prefix]
    if isinstance(tree, dict):
        return [n for k, v in tree.items() for n in _nulls(v, f"{prefix}{k}.")]
    if isinstance(tree, list):
        return [n for i, v in enumerate(tree) for n in _nulls(v, f"{prefix}{i}.")]
    return []


def test_sample_without_a_flow_writes_no_null_entries(tmp_path, capsys):
    assert _sample(tmp_path / "s", *PHI4, "steps=6") == 0
    assert "results in" in capsys.readouterr().out  # the one-line result still prints
    s = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert _nulls(s) == []
    assert not {"flow", "ess", "inverse_check"} & set(s)
    assert (tmp_path / "s" / "report.png").stat().st_size > 0


def test_resample_without_a_flow_writes_no_null_entries(tmp_path, capsys):
    src = _u1_file(tmp_path / "in.h5")
    sets = _sets("action.name=wilson", "action.group=u1", "action.beta=2.0", "kernel.type=hmc", "steps=3")
    assert main(["resample", str(src), "--out", str(tmp_path / "r"), "--no-progress", *sets]) == 0
    assert "ESS of input weights n/a (no flow)" in capsys.readouterr().out
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert _nulls(s) == []
    assert not {"flow", "ess", "ess_p_samples", "reweighted_inputs", "inverse_check"} & set(s)


# ------------------------------------------------------------------ 4. --resume with --out alone


def _u1_file(path: Path, n: int = 2, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    path.unlink(missing_ok=True)
    io.write(path, io.Ensemble(0.5 * torch.randn((n, 2, 4, 4), generator=g, dtype=torch.float64), field="u1"), "hdf5")
    return path


@pytest.fixture(scope="module")
def flows(tmp_path_factory):
    """Two untrained U(1) 4x4 flows (different seeds), written by flowplug.train."""
    from flowplug.train import build_trainer

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("flows")
    for name, seed in (("a", 0), ("b", 1)):
        cfg = {
            "lattice": [4, 4],
            "seed": seed,
            "device": "cpu",
            "action": {"name": "wilson", "group": "u1", "beta": 1.5},
            "flow": {"layers": ["u1-spline"], "n_layers": 2, "options": {"hidden": [4]}},
            "train": {"steps": 0, "batch_size": 8, "lr": 1e-3, "progress": False, "checkpoint_every": 0},
        }
        trainer = build_trainer(cfg, out=d / f"{name}-run")
        trainer.save_checkpoint(d / f"{name}.pt")
    return d


FLOW_SETS = ["chains=2", "thermalize=1", "ess_samples=8", "seed=3"]


def test_sample_resumes_with_out_alone_and_refuses_another_flow(tmp_path, flows, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(flows / "a.pt", work / "flow.pt")
    shutil.copy(flows / "b.pt", work / "other.pt")
    monkeypatch.chdir(work)
    assert _sample("full", *FLOW_SETS, "steps=6", flow="flow.pt") == 0
    assert _sample("part", *FLOW_SETS, "steps=3", flow="flow.pt") == 0
    rec = stored_run_files(work / "part")
    assert rec is not None and rec["flow"]["given"] == "flow.pt"
    assert rec["flow"]["path"] == str((work / "flow.pt").resolve())
    # from another working directory, with --out alone
    monkeypatch.chdir(tmp_path)
    assert _sample(work / "part", "steps=6", resume=True) == 0
    assert (work / "part" / "measurements.csv").read_text() == (work / "full" / "measurements.csv").read_text()
    a = json.loads((work / "full" / "summary.json").read_text())
    b = json.loads((work / "part" / "summary.json").read_text())
    assert a["observables"] == b["observables"] and a["ess"] == b["ess"] and b["flow"]["sha256"] == a["flow"]["sha256"]
    # the same flow given again (another spelling of the path) is fine
    assert _sample(work / "part", "steps=7", flow=work / "flow.pt", resume=True) == 0
    capsys.readouterr()
    # another flow is refused, naming the stored and the found path
    assert _sample(work / "part", "steps=8", flow=work / "other.pt", resume=True) == 1
    err = _flat(capsys.readouterr().err)
    assert "is not the one of the run" in err
    assert f"stored flow.pt ({(work / 'flow.pt').resolve()})" in err and f"found {work / 'other.pt'}" in err
    # the flow file changed since the run started: refused naming the file and both SHA-256
    stored = rec["flow"]["sha256"]
    shutil.copy(flows / "b.pt", work / "flow.pt")
    assert _sample(work / "part", "steps=8", resume=True) == 1
    err = _flat(capsys.readouterr().err)
    found = _sha(work / "flow.pt")
    assert f"flow checkpoint {(work / 'flow.pt').resolve()} changed" in err
    assert f"SHA-256 stored {stored}" in err and f"found {found}" in err


def _sha(path: Path) -> str:
    from flowplug.flowtools import file_sha256

    return file_sha256(path)


def test_sample_without_a_flow_refuses_a_flow_on_resume(tmp_path, flows, capsys):
    assert _sample(tmp_path / "s", *PHI4, "steps=3") == 0
    capsys.readouterr()
    assert _sample(tmp_path / "s", "steps=4", flow=flows / "a.pt", resume=True) == 1
    assert "stored (no flow)" in _flat(capsys.readouterr().err)


def test_resample_resumes_with_out_alone_and_refuses_changed_inputs(tmp_path, flows, monkeypatch, capsys):
    work = tmp_path / "work"
    (work / "cfg").mkdir(parents=True)
    shutil.copy(flows / "a.pt", work / "flow.pt")
    _u1_file(work / "cfg" / "e1.h5", seed=1)
    _u1_file(work / "cfg" / "e2.h5", seed=2)
    (work / "cfg" / "README").write_text("not a lattice file\n")
    monkeypatch.chdir(work)

    def resample(out: str | Path, *extra: str, inputs: tuple[str | Path, ...] = (), resume: bool = False) -> int:
        args = ["resample", *map(str, inputs), "--out", str(out), "--no-progress", *extra]
        return main(args + (["--resume"] if resume else []))

    sets = _sets("seed=4")
    assert resample("full", *sets, "--set", "steps=6", "--flow", "flow.pt", inputs=("cfg",)) == 0
    assert resample("part", *sets, "--set", "steps=3", "--flow", "flow.pt", inputs=("cfg",)) == 0
    rec = stored_run_files(work / "part")
    assert rec is not None and [e["given"] for e in rec["inputs"]] == ["cfg"]
    assert [Path(e["given"]).name for e in rec["files"]] == ["e1.h5", "e2.h5"] and rec["skipped"] == ["cfg/README"]
    monkeypatch.chdir(tmp_path)
    assert resample(work / "part", "--set", "steps=6", resume=True) == 0
    assert (work / "part" / "measurements.csv").read_text() == (work / "full" / "measurements.csv").read_text()
    a = json.loads((work / "full" / "summary.json").read_text())
    b = json.loads((work / "part" / "summary.json").read_text())
    assert a["observables"] == b["observables"] and a["ess"] == b["ess"]
    assert [i["sha256"] for i in a["inputs"]] == [i["sha256"] for i in b["inputs"]]
    capsys.readouterr()
    # other inputs named on the resume are refused, naming both
    assert resample(work / "part", "--set", "steps=7", inputs=(work / "cfg" / "e1.h5",), resume=True) == 1
    err = _flat(capsys.readouterr().err)
    assert "the inputs given" in err and f"stored cfg ({(work / 'cfg').resolve()})" in err
    # the same inputs, named from here, are fine
    assert resample(work / "part", "--set", "steps=7", inputs=(work / "cfg",), resume=True) == 0
    # an input changed since the run started: refused naming the file and both SHA-256
    old = rec["files"][1]["sha256"]
    _u1_file(work / "cfg" / "e2.h5", seed=9)
    assert resample(work / "part", "--set", "steps=8", resume=True) == 1
    err = _flat(capsys.readouterr().err)
    assert f"input {(work / 'cfg' / 'e2.h5').resolve()} changed" in err
    assert f"stored {old}" in err and f"found {_sha(work / 'cfg' / 'e2.h5')}" in err


def test_resample_of_an_earlier_version_needs_its_inputs(tmp_path, capsys):
    src = _u1_file(tmp_path / "in.h5")
    sets = _sets("action.name=wilson", "action.group=u1", "action.beta=2.0", "kernel.type=hmc", "steps=2")
    out = tmp_path / "r"
    assert main(["resample", str(src), "--out", str(out), "--no-progress", *sets]) == 0
    (out / RUN_FILES).unlink()
    capsys.readouterr()
    assert main(["resample", "--out", str(out), "--no-progress", "--set", "steps=3", "--resume"]) == 1
    assert f"{out} holds no {RUN_FILES}" in _flat(capsys.readouterr().err)
    assert main(["resample", str(src), "--out", str(out), "--no-progress", "--set", "steps=3", "--resume"]) == 0
    assert stored_run_files(out) is not None  # written now: the next resume needs --out alone


def test_moved_inputs_are_named_again_at_their_new_place(tmp_path, monkeypatch, capsys):
    """The stored inputs no longer exist: --out alone says so; the inputs named at their new
    place resume the run (the fingerprint holds their SHA-256) and are recorded there."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg").mkdir()
    _u1_file(tmp_path / "cfg" / "e1.h5", seed=1)
    _u1_file(tmp_path / "cfg" / "e2.h5", seed=2)
    sets = _sets("action.name=wilson", "action.group=u1", "action.beta=2.0", "kernel.type=hmc", "seed=4")
    assert main(["resample", "cfg", "--out", "full", "--no-progress", *sets, "--set", "steps=4"]) == 0
    assert main(["resample", "cfg", "--out", "part", "--no-progress", *sets, "--set", "steps=2"]) == 0
    (tmp_path / "cfg").rename(tmp_path / "moved")
    capsys.readouterr()
    assert main(["resample", "--out", "part", "--no-progress", "--set", "steps=3", "--resume"]) == 1
    err = _flat(capsys.readouterr().err)
    assert f"input {(tmp_path / 'cfg' / 'e1.h5').resolve()} of the run in part" in err and "new place" in err
    assert main(["resample", "moved", "--out", "part", "--no-progress", "--set", "steps=3", "--resume"]) == 0
    assert [e["given"] for e in stored_run_files(tmp_path / "part")["inputs"]] == ["moved"]  # type: ignore[index]
    assert main(["resample", "--out", "part", "--no-progress", "--set", "steps=4", "--resume"]) == 0
    assert (tmp_path / "part" / "measurements.csv").read_text() == (tmp_path / "full" / "measurements.csv").read_text()


def test_hmc_resumes_with_out_alone_without_reading_its_start_file(tmp_path, monkeypatch, capsys):
    """A resume takes the chains from the checkpoint: the start file is not read, so one moved
    (or changed) since the run started stops nothing; config.toml keeps ``start`` as given and
    run_files.json its record; another ``start`` on the resume is refused as a change of the chain."""
    work = tmp_path / "work"
    (work / "st").mkdir(parents=True)
    monkeypatch.chdir(work)
    _u1_file(work / "st" / "a.h5", n=1, seed=3)
    sets = ["start=st/a.h5", "lattice=[4,4]", "chains=2", "hmc.steps=2", "hmc.thermalization=1", "progress=false"]
    sets.append("format='none'")
    assert main(["hmc", "--out", "full", *_sets(*sets, "hmc.trajectories=6")]) == 0
    assert main(["hmc", "--out", "part", *_sets(*sets, "hmc.trajectories=3")]) == 0
    rec = stored_run_files(work / "part")
    assert rec is not None and rec["start"]["given"] == "st/a.h5" and rec["start"]["sha256"] == _sha(work / "st/a.h5")
    monkeypatch.chdir(tmp_path)  # another working directory
    assert main(["hmc", "--out", str(work / "part"), "--set", "hmc.trajectories=4", "--resume"]) == 0
    capsys.readouterr()
    assert main(["hmc", "--out", str(work / "part"), "--set", f"out={work / 'part'}", "--resume"]) == 1
    assert "--out DIR or --set out=DIR, not both" in capsys.readouterr().err
    _u1_file(work / "st" / "a.h5", n=1, seed=4)  # changed, then moved away: not needed any more
    (work / "st").rename(work / "moved")
    assert main(["hmc", "--out", str(work / "part"), "--set", "hmc.trajectories=6", "--resume"]) == 0
    a = json.loads((work / "full" / "summary.json").read_text())
    b = json.loads((work / "part" / "summary.json").read_text())
    assert a["observables"] == b["observables"] and b["trajectories"] == 6
    assert stored_run_files(work / "part") == rec  # the record of the run's start stays
    assert stored_run_config(work / "part")["start"] == "st/a.h5"  # type: ignore[index]
    capsys.readouterr()
    moved = str(work / "moved" / "a.h5")
    assert main(["hmc", "--out", str(work / "part"), "--set", f"start={moved}", "--resume"]) == 1
    err = _flat(capsys.readouterr().err)
    assert f'start: stored "st/a.h5", given "{moved}"' in err


def test_hmc_run_files_start_is_null_for_cold_and_hot_starts(tmp_path):
    """run_files.json records the start file when ``start`` names one, and null for cold/hot."""
    sets = ["lattice=[4,4]", "chains=1", "hmc.steps=2", "hmc.trajectories=2", "format='none'", "progress=false"]
    for start in ("cold", "hot"):
        assert main(["hmc", "--out", str(tmp_path / start), *_sets(*sets, f"start={start}")]) == 0
        assert stored_run_files(tmp_path / start) == {"command": "hmc", "start": None}


# ------------------------------------------------- 5. a fresh start over an earlier run's files


def test_earlier_configuration_files_are_refused_or_removed_by_name(tmp_path):
    """Configurations.start: the files of an earlier run are those its provenance.json lists and
    those named exactly as the job names its own (any writable format's extension, ``.rank<r>``),
    and the store whatever the format; refused without --force (naming them), removed with it;
    inputs (also named as outputs) and files of other names are never among them."""
    from flowplug.errors import FormatError
    from flowplug.jobs.output import Configurations

    stale = [
        "sample.c000.s00010.ildg",
        "sample.c001.s00010.rank1.ildg",
        "sample.s00010.h5",
        "sample.c003.s00020.nersc",
        "ensemble.h5",
        "ensemble.rank1.h5",
        "listed.ildg",  # of another name, but listed in the earlier provenance.json
    ]
    kept = [
        "sample.c002.s00010.ildg",  # an input
        "other.ildg",
        "sample.c000.s00010.ildg.txt",
        "xsample.c000.s00010.ildg",
        "sample.c0.s1x.ildg",
        "notes.txt",
        "checkpoint.pt",
        "listed.txt",  # listed, but not a configuration file's extension
    ]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    confs = Configurations(
        tmp_path,
        "ildg",
        "su3",
        name=lambda t, c: f"sample.c{c:03d}.s{t:05d}",
        provenance=lambda t, c: {},
        store=tmp_path / "ensemble.h5",
        pattern=r"sample(?:\.c\d+)?\.s\d+",
        inputs=[tmp_path / "sample.c002.s00010.ildg"],
    )
    records = [{"path": str(tmp_path / "listed.ildg")}, {"path": "elsewhere/listed.txt"}]
    records.append({"path": str(tmp_path / "elsewhere" / "other.ildg")})  # another folder's file of that name
    assert [p.name for p in confs.earlier_files(records)] == sorted(stale)
    with pytest.raises(FormatError, match=r"configuration files of an earlier run .*ensemble\.h5.*--force"):
        confs.start(resume=False, force=False, records=records)
    assert confs.start(resume=True, force=False, records=records) == []  # a resume rolls back instead
    assert all((tmp_path / n).exists() for n in stale)
    assert [p.name for p in confs.start(resume=False, force=True, records=records)] == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    # resample's names: <input name>.c<c>.s<t>.<ext>, never an input
    (tmp_path / "a.ildg.c000.s00010.ildg").write_bytes(b"x")
    (tmp_path / "b.ildg.c001.s00020.ildg").write_bytes(b"x")
    confs.pattern = r"resample\.s\d+|.+\.c\d+\.s\d+"
    confs.inputs = [tmp_path / "b.ildg.c001.s00020.ildg", tmp_path / "sample.c002.s00010.ildg"]
    # (an input named "xsample" gives "xsample.c000.s00010.ildg": resample's name too)
    assert [p.name for p in confs.earlier_files()] == ["a.ildg.c000.s00010.ildg", "xsample.c000.s00010.ildg"]


def test_resample_force_keeps_inputs_inside_the_output_directory(tmp_path, monkeypatch):
    """resample --force over an earlier run with its inputs inside the output directory, named
    as the job names its outputs: the inputs survive, the earlier store and tables are replaced;
    such an input does not stop a fresh start either."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r").mkdir()
    inp = _u1_file(tmp_path / "r" / "e.h5.c000.s00004.h5", seed=1)
    before = inp.read_bytes()
    sets = _sets("action.name=wilson", "action.group=u1", "action.beta=2.0", "kernel.type=hmc", "seed=4")
    assert main(["resample", str(inp), "--out", "r", "--no-progress", *sets, "--set", "steps=4"]) == 0
    assert (tmp_path / "r" / "ensemble.h5").exists()
    assert main(["resample", str(inp), "--out", "r", "--no-progress", *sets, "--set", "steps=2"]) == 1
    more = _sets("action.beta=3.0", "steps=2", "measurements='hdf5'")
    assert main(["resample", str(inp), "--out", "r", "--no-progress", *sets, *more, "--force"]) == 0
    assert inp.read_bytes() == before
    assert not (tmp_path / "r" / "measurements.csv").exists()  # the earlier run's table, in the other format
    assert int(_h5(tmp_path / "r" / "measurements.h5")["step"][-1]) == 2
    assert sorted(p.name for p in (tmp_path / "r").iterdir() if p.suffix == ".h5") == [
        "e.h5.c000.s00004.h5",
        "ensemble.h5",
        "measurements.h5",
    ]
    assert io.read(tmp_path / "r" / "ensemble.h5").links.shape[0] == 2  # this run's 2 chains, once


def test_run_files_api_refusals(tmp_path):
    from flowplug.jobs.provenance import file_record, resume_flow_path, resume_inputs, write_run_files

    assert resume_flow_path(tmp_path, None) == (None, None)  # nothing stored: as before
    assert resume_inputs(tmp_path, ["x"]) is None
    write_run_files(tmp_path, {"flow": file_record(tmp_path / "f.pt", sha256="ab"), "files": []})
    with pytest.raises(CheckpointError, match=r"stored .*f\.pt.*found .*g\.pt"):
        resume_flow_path(tmp_path, tmp_path / "g.pt")
    (tmp_path / RUN_FILES).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object, found list"):
        resume_flow_path(tmp_path, None)


def test_read_options_are_stored_and_a_different_one_is_refused(tmp_path):
    from flowplug.jobs.provenance import resume_read_options, write_run_files

    stored = {"format": "lime", "lattice": "4x4x4x4", "group": "su3", "verify": False}
    write_run_files(tmp_path, {"read_options": stored})
    none = dict.fromkeys(stored)
    assert resume_read_options(tmp_path, none) == stored  # nothing given: as the run read them
    assert resume_read_options(tmp_path, {**none, "lattice": "4x4x4x4"}) == stored  # repeated: fine
    with pytest.raises(CheckpointError, match=r"--lattice given, 8x8x8x8.*stored 4x4x4x4.*found 8x8x8x8"):
        resume_read_options(tmp_path, {**none, "lattice": "8x8x8x8"})


def test_a_moved_flow_is_found_again_by_its_sha256(tmp_path, flows, monkeypatch, capsys):
    """The stored flow no longer exists: --out alone names it; --flow at its new place resumes
    (the same SHA-256) and is recorded; another file there is refused naming both SHA-256."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(flows / "a.pt", tmp_path / "flow.pt")
    assert _sample("full", *FLOW_SETS, "steps=5", flow="flow.pt") == 0
    assert _sample("part", *FLOW_SETS, "steps=3", flow="flow.pt") == 0
    (tmp_path / "moved").mkdir()
    (tmp_path / "flow.pt").rename(tmp_path / "moved" / "flow.pt")
    shutil.copy(flows / "b.pt", tmp_path / "moved" / "other.pt")
    capsys.readouterr()
    assert _sample("part", "steps=4", resume=True) == 1
    err = _flat(capsys.readouterr().err)
    assert f"flow checkpoint {(tmp_path / 'flow.pt').resolve()} of the run in part" in err and "no longer exists" in err
    assert _sample("part", "steps=4", flow="moved/other.pt", resume=True) == 1
    err = _flat(capsys.readouterr().err)
    assert f"SHA-256 stored {_sha(flows / 'a.pt')}" in err and f"found {_sha(flows / 'b.pt')}" in err
    assert _sample("part", "steps=4", flow="moved/flow.pt", resume=True) == 0
    assert stored_run_files(tmp_path / "part")["flow"]["path"] == str((tmp_path / "moved" / "flow.pt").resolve())  # type: ignore[index]
    assert _sample("part", "steps=5", resume=True) == 0  # --out alone again
    assert (tmp_path / "part" / "measurements.csv").read_text() == (tmp_path / "full" / "measurements.csv").read_text()


# ------------------------------------------------- 6. a fresh user's findings: group, action, format


WILSON_2D = ["action.name=wilson", "action.beta=2.0", "lattice=[4,4]", "chains=2", "kernel.hmc.steps=2"]


def test_sample_without_a_flow_samples_hmcs_default_group_and_records_it(tmp_path):
    """The same flags sample the same theory in ``sample`` (no flow) and ``hmc``: a gauge action
    without ``action.group`` is U(1), hmc's default, recorded in config.toml and summary.json."""
    hmc_default = _config.build_config(hmc_job.DEFAULT_CONFIG)["action"]["group"]
    assert hmc_default == "u1"
    assert _sample(tmp_path / "s", *WILSON_2D, "steps=4") == 0
    s = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert s["field"] == hmc_default and s["action"]["group"] == hmc_default
    assert stored_run_config(tmp_path / "s")["action"]["group"] == hmc_default  # type: ignore[index]
    # extending it keeps the group (and the chain: the resume is accepted)
    assert _sample(tmp_path / "s", "steps=6", resume=True) == 0
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["field"] == "u1"
    # an explicit group is sampled as given
    assert _sample(tmp_path / "t", *WILSON_2D, "steps=4", "action.group=su2") == 0
    assert json.loads((tmp_path / "t" / "summary.json").read_text())["field"] == "su2"
    # the --help example says what it samples
    from flowplug.cli import cmd_sample

    text = "\n".join(cmd_sample.EXAMPLES)
    assert "2D U(1)" in text and "action.group defaults to u1" in text


def test_a_flowless_sample_of_an_earlier_version_resumes_as_the_su3_chain_it_is(tmp_path, monkeypatch):
    """Earlier versions left ``group = ""`` to the action's own default (SU(3)): such a run
    directory resumes as that chain, with its fingerprint, and its summary names the group."""
    monkeypatch.setattr(sample_job, "_default_group", lambda: "")  # the earlier behaviour
    assert _sample(tmp_path / "old", *WILSON_2D, "steps=3", "thermalize=1") == 0
    assert _sample(tmp_path / "full", *WILSON_2D, "steps=5", "thermalize=1") == 0
    assert stored_run_config(tmp_path / "old")["action"]["group"] == ""  # type: ignore[index]
    monkeypatch.undo()
    assert _sample(tmp_path / "old", "steps=5", resume=True) == 0
    a = torch.load(tmp_path / "old" / "chain.ckpt", weights_only=True)
    b = torch.load(tmp_path / "full" / "chain.ckpt", weights_only=True)
    assert a["run_id"] == b["run_id"] and torch.equal(a["state"]["x"], b["state"]["x"])
    s = json.loads((tmp_path / "old" / "summary.json").read_text())
    assert s["field"] == "su3" and s["action"]["group"] == "su3"


def test_a_flow_run_resumes_with_the_flows_own_coupling_given(tmp_path, flows, capsys):
    """config.toml of a flow run keeps [action] as given ("" / 0.0 = the flow's); a resume with
    the flow's own coupling is the same chain (accepted, fingerprint unchanged); another value is
    refused naming the value in effect and the given one."""
    flow = flows / "a.pt"  # trained at wilson u1, beta = 1.5
    assert _sample(tmp_path / "full", *FLOW_SETS, "steps=5", flow=flow) == 0
    assert _sample(tmp_path / "part", *FLOW_SETS, "steps=3", flow=flow) == 0
    assert stored_run_config(tmp_path / "part")["action"]["beta"] == 0.0  # type: ignore[index]
    assert _sample(tmp_path / "part", "steps=4", "action.beta=1.5", "action.group=u1", resume=True) == 0
    capsys.readouterr()
    assert _sample(tmp_path / "part", "steps=5", "action.beta=2.0", resume=True) == 1
    err = _flat(capsys.readouterr().err)
    assert "action.beta: stored 1.5 (in effect), given 2.0" in err
    assert _sample(tmp_path / "part", "steps=5", "action.name=wilson", resume=True) == 0
    a = torch.load(tmp_path / "full" / "chain.ckpt", weights_only=True)
    b = torch.load(tmp_path / "part" / "chain.ckpt", weights_only=True)
    assert a["run_id"] == b["run_id"]
    assert (tmp_path / "part" / "measurements.csv").read_text() == (tmp_path / "full" / "measurements.csv").read_text()
    assert stored_run_config(tmp_path / "part")["action"]["beta"] == 0.0  # type: ignore[index]


def test_a_resample_flow_run_resumes_with_the_flows_own_coupling_given(tmp_path, flows, capsys):
    src = _u1_file(tmp_path / "in.h5")
    base = ["resample", str(src), "--out", str(tmp_path / "r"), "--no-progress", "--flow", str(flows / "a.pt")]
    assert main([*base, *_sets("steps=2")]) == 0
    assert main([*base, *_sets("steps=3", "action.beta=1.5"), "--resume"]) == 0
    capsys.readouterr()
    assert main([*base, *_sets("steps=4", "action.beta=2.5"), "--resume"]) == 1
    assert "action.beta: stored 1.5 (in effect), given 2.5" in _flat(capsys.readouterr().err)


class _Steps:
    """Counts the chain steps run; stops the run (like Ctrl-C) after step ``at``."""

    def __init__(self, at: int | None = None) -> None:
        self.at = at
        self.steps = 0

    @hookimpl
    def flowplug_after_chain_step(self, step, kernel, info):
        self.steps += 1
        if step == self.at:
            raise KeyboardInterrupt


def _sample_cfg(*sets: str) -> dict:
    return _config.build_config(
        sample_job.DEFAULT_CONFIG, overrides=["progress=false", *sets], open_tables=sample_job.OPEN_TABLES
    )


def test_a_format_that_cannot_hold_the_lattice_is_refused_before_sampling(tmp_path, fresh_pm):
    """ILDG holds 4D lattices: a 2D SU(3) sample (or resample) with format ildg is refused
    before the first step, naming the format and the dimension, not at the first save point."""
    from flowplug.jobs.resample import DEFAULT_CONFIG as RESAMPLE_CONFIG
    from flowplug.jobs.resample import OPEN_TABLES as RESAMPLE_TABLES
    from flowplug.jobs.resample import run_resample

    counter = _Steps()
    fresh_pm.register(counter, name="count")
    su3 = [*WILSON_2D, "action.group=su3", "steps=3", "format='ildg'"]
    with pytest.raises(ConfigError, match=r"format = 'ildg': format ildg holds \(4,\) dimensional lattices; the data"):
        sample_job.run_sample(_sample_cfg(*su3), None, tmp_path / "s")
    assert counter.steps == 0 and not (tmp_path / "s" / "chain.ckpt").exists()
    from flowplug.groups import haar_random

    links = haar_random((1, 2, 4, 4), 3, generator=torch.Generator().manual_seed(0))
    io.write(tmp_path / "in.h5", io.Ensemble(links, field="su3"), "hdf5")
    cfg = _config.build_config(
        RESAMPLE_CONFIG,
        overrides=["progress=false", "action.name=wilson", "action.group=su3", "action.beta=2.0"]
        + ["kernel.type=hmc", "steps=2", "to='ildg'", "kernel.hmc.steps=2"],
        open_tables=RESAMPLE_TABLES,
    )
    with pytest.raises(ConfigError, match=r"format ildg holds \(4,\) dimensional lattices"):
        run_resample(cfg, [tmp_path / "in.h5"], None, tmp_path / "r")
    assert counter.steps == 0 and not (tmp_path / "r" / "chain.ckpt").exists()


def test_a_fresh_run_over_an_earlier_checkpoint_is_refused(tmp_path, fresh_pm, capsys):
    """A run stopped after its first checkpoint, before any configuration was written, leaves
    chain.ckpt alone: a fresh sample or resample there is refused (naming it, --resume and
    --force), as hmc is with its checkpoint.pt; --resume and --force go on."""
    stop = _Steps(at=3)
    fresh_pm.register(stop, name="stop")
    with pytest.raises(KeyboardInterrupt):
        sample_job.run_sample(_sample_cfg(*PHI4, "steps=6", "checkpoint_every=2"), None, tmp_path / "s")
    fresh_pm.unregister(name="stop")
    assert (tmp_path / "s" / "chain.ckpt").exists() and not (tmp_path / "s" / "ensemble.h5").exists()
    capsys.readouterr()
    assert _sample(tmp_path / "s", *PHI4, "steps=6") == 1
    err = _flat(capsys.readouterr().err)
    assert f"{tmp_path / 's' / 'chain.ckpt'} exists" in err and "--resume" in err and "--force" in err
    assert _sample(tmp_path / "s", "steps=6", resume=True) == 0
    # a run that wrote configurations: refused naming them and what --force deletes (not the checkpoint alone)
    capsys.readouterr()
    assert _sample(tmp_path / "s", *PHI4, "steps=6") == 1
    err = _flat(capsys.readouterr().err)
    assert "configuration files of an earlier run" in err and "ensemble.h5" in err and "DELETES" in err
    # resample: the same
    src = _u1_file(tmp_path / "in.h5")
    sets = _sets("action.name=wilson", "action.group=u1", "action.beta=2.0", "kernel.type=hmc", "steps=2")
    args = ["resample", str(src), "--out", str(tmp_path / "r"), "--no-progress", *sets]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 1  # a completed run: its configurations are named, with what --force deletes
    assert "DELETES" in _flat(capsys.readouterr().err)
    for name in ("ensemble.h5", "provenance.json"):  # as if stopped before its first save point
        (tmp_path / "r" / name).unlink()
    capsys.readouterr()
    assert main(args) == 1
    err = _flat(capsys.readouterr().err)
    assert f"{tmp_path / 'r' / 'chain.ckpt'} exists" in err and "--resume" in err and "--force" in err
    assert main([*args, "--force"]) == 0


def test_hmc_refuses_another_thermalization_on_resume(tmp_path, capsys):
    """Raising hmc.thermalization on a resume would leave saved configurations inside the new
    window: refused naming the stored and the given value, as sample's thermalize; the stored
    value is used when none is given, and repeating it is fine."""
    out = tmp_path / "h"
    base = ["lattice=[4,4]", "chains=2", "hmc.steps=2", "progress=false", "save_every=1"]
    assert main(["hmc", "--out", str(out), *_sets(*base, "hmc.trajectories=4", "hmc.thermalization=1")]) == 0
    capsys.readouterr()
    assert main(["hmc", "--out", str(out), *_sets("hmc.trajectories=6", "hmc.thermalization=3"), "--resume"]) == 1
    err = _flat(capsys.readouterr().err)
    assert "hmc.thermalization: stored 1" in err and "given 3" in err
    assert main(["hmc", "--out", str(out), *_sets("hmc.trajectories=5", "hmc.thermalization=1"), "--resume"]) == 0
    assert main(["hmc", "--out", str(out), *_sets("hmc.trajectories=6"), "--resume"]) == 0
    assert json.loads((out / "summary.json").read_text())["thermalization"] == 1
    # sample: the same refusal (it was refused before as a key of the chain; the message names both)
    assert _sample(tmp_path / "s", *PHI4, "steps=4", "thermalize=1") == 0
    capsys.readouterr()
    assert _sample(tmp_path / "s", "steps=6", "thermalize=2", resume=True) == 1
    assert "thermalize: stored 1" in _flat(capsys.readouterr().err)
