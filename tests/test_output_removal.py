"""What a fresh run (``--force`` or not) may remove from its output location.

A fresh start removes an earlier run's configuration files (:meth:`ChainOutput.start`,
:meth:`Configurations.start`). These tests pin what it must never remove nor write into:

1. an input that is the ensemble store (``resample <out>/ensemble.h5 --out <out>``): refused,
   not appended to;
2. a user's files that are merely named as the job names its outputs (another program's
   ``<name>.c000.s00010.h5``) when no earlier run of the job is recorded there: refused, also
   with ``--force``, with a message that says so;
3. the inputs of the earlier run (recorded in its ``run_files.json``/``provenance.json``);
4. files that ``provenance.json`` names in another folder of the same name, or that a run of
   another command wrote (a hand-edited or copied ``provenance.json``).

The refusal that precedes ``--force`` says that ``--force`` deletes the files, and how many.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from flowplug import io
from flowplug.cli import main
from flowplug.errors import FormatError
from flowplug.jobs.output import ChainOutput, Configurations

SETS = ["action.name=wilson", "action.group=u1", "action.beta=2.0", "kernel.type=hmc", "seed=4", "steps=2"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _sets(*pairs: str) -> list[str]:
    return [w for p in pairs for w in ("--set", p)]


def _u1(path: Path, n: int = 1, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    io.write(path, io.Ensemble(0.5 * torch.randn((n, 2, 4, 4), generator=g, dtype=torch.float64), field="u1"), "hdf5")
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _resample(*inputs: Path, out: Path, force: bool = False) -> int:
    args = ["resample", *map(str, inputs), "--out", str(out), "--no-progress", *_sets(*SETS)]
    return main([*args, "--force"] if force else args)


def _confs(folder: Path, pattern: str = r"resample\.s\d+|.+\.c\d+\.s\d+", **kw) -> Configurations:
    return Configurations(
        folder,
        "hdf5",
        "u1",
        name=lambda t, c: f"resample.s{t:05d}",
        provenance=lambda t, c: {},
        store=folder / "ensemble.h5",
        pattern=pattern,
        **kw,
    )


# ------------------------------------------------------------------ 1. the store an input


def test_resample_never_writes_into_an_input_that_is_its_ensemble_store(tmp_path, capsys):
    """``resample d/ensemble.h5 --out d``: the input is not an earlier run's store; the run is
    refused (with and without --force) instead of appending its configurations to the input."""
    d = tmp_path / "d"
    d.mkdir()
    inp = _u1(d / "ensemble.h5", n=2)
    before = _sha(inp)
    for force in (False, True):
        capsys.readouterr()
        assert _resample(inp, out=d, force=force) == 1
        err = " ".join(capsys.readouterr().err.split())
        assert "is an input; refusing to write this run's ensemble store into it" in err
        assert _sha(inp) == before and len(io.read(inp)) == 2


# -------------------------------------- 2. a user's files named as outputs, no earlier run


def test_force_does_not_delete_a_users_files_named_as_outputs_without_an_earlier_run(tmp_path, capsys):
    """A directory of another program's ensemble named ``<name>.c<c>.s<t>.h5`` (as resample
    names its outputs), one of them the input: without an earlier run recorded there, the
    others are not an earlier run's, and --force does not delete them; the message says so."""
    d = tmp_path / "data"
    d.mkdir()
    mine = [_u1(d / f"cfg.c{c:03d}.s00010.h5", seed=c) for c in range(3)]
    digests = [_sha(p) for p in mine]
    for force in (False, True):
        capsys.readouterr()
        assert _resample(mine[0], out=d, force=force) == 1
        err = " ".join(capsys.readouterr().err.split())
        assert "no earlier run of this job is recorded there" in err and "--force does not delete them" in err
        assert "cfg.c001.s00010.h5" in err and "an earlier run (" not in err
        assert [_sha(p) for p in mine] == digests


def test_by_name_matches_are_refused_not_removed_when_no_earlier_run_is_recorded(tmp_path):
    """API: ChainOutput.start with --force and no provenance.json, run_files.json or checkpoint
    of the command removes nothing named by the pattern alone; with its checkpoint it does."""
    (tmp_path / "x.c000.s00002.h5").write_bytes(b"x")
    out = ChainOutput(tmp_path, "resample", configurations=_confs(tmp_path))
    with pytest.raises(FormatError, match="no earlier run of this job is recorded there"):
        out.start(force=True)
    assert (tmp_path / "x.c000.s00002.h5").exists()
    (tmp_path / "chain.ckpt").write_bytes(b"")  # a run of an earlier version (no run_files.json)
    out.start(force=True)
    assert not (tmp_path / "x.c000.s00002.h5").exists()


def test_run_files_of_another_command_is_no_earlier_run_of_this_one(tmp_path):
    """run_files.json of ``sample`` in the directory: a resample --force does not take the
    files named as resample's outputs for an earlier resample run's."""
    (tmp_path / "x.c000.s00002.h5").write_bytes(b"x")
    (tmp_path / "run_files.json").write_text(json.dumps({"command": "sample", "flow": None}))
    (tmp_path / "chain.ckpt").write_bytes(b"")  # sample's checkpoint has the same name
    out = ChainOutput(tmp_path, "resample", configurations=_confs(tmp_path))
    with pytest.raises(FormatError, match="no earlier run of this job is recorded there"):
        out.start(force=True)
    assert (tmp_path / "x.c000.s00002.h5").exists()


# ---------------------------------------------------------- 3. the earlier run's inputs


def test_force_keeps_the_inputs_of_the_earlier_run(tmp_path, monkeypatch):
    """An earlier resample run read the user's ensemble inside its output directory (named as
    resample names its outputs); a later ``--force`` run with other inputs keeps those files."""
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "data"
    d.mkdir()
    mine = [_u1(d / f"cfg.c{c:03d}.s00010.h5", seed=c) for c in range(2)]
    digests = [_sha(p) for p in mine]
    assert _resample(*mine, out=Path("data")) == 0
    other = _u1(tmp_path / "other.h5", n=2, seed=9)
    assert _resample(other, out=Path("data"), force=True) == 0
    assert [_sha(p) for p in mine] == digests
    records = json.loads((d / "provenance.json").read_text())["outputs"]
    assert {r["input"] for r in records} == {str(other)}


def test_an_earlier_runs_input_recorded_relative_from_another_directory_is_kept(tmp_path, monkeypatch):
    """run_files.json records each input as given and resolved: the resolved path protects it
    when the new run starts from another working directory."""
    d = tmp_path / "data"
    d.mkdir()
    inp = d / "cfg.c000.s00010.h5"
    inp.write_bytes(b"x")
    (d / "run_files.json").write_text(
        json.dumps({"command": "resample", "files": [{"given": "data/cfg.c000.s00010.h5", "path": str(inp)}]})
    )
    (d / "resample.s00002.h5").write_bytes(b"x")  # the earlier run's own output
    monkeypatch.chdir(tmp_path / "..")
    out = ChainOutput(d, "resample", configurations=_confs(d))
    out.start(force=True)
    assert inp.exists() and not (d / "resample.s00002.h5").exists()


# ------------------------------------------- 4. provenance.json naming files elsewhere


def test_a_record_in_another_folder_of_the_same_name_names_no_file_here(tmp_path):
    """provenance.json lists ``/elsewhere/<same folder name>/mine.h5``: mine.h5 here is not the
    earlier run's (hmc's folder is always called ``ensemble``); a relative record from another
    working directory whose folder path ends as this one's still names the file here."""
    here = tmp_path / "run" / "ensemble"
    here.mkdir(parents=True)
    for n in ("mine.h5", "theirs.h5", "up.h5"):
        (here / n).write_bytes(b"x")
    confs = _confs(here, pattern=r"traj_\d+(?:_chain_\d+)?")
    records = [
        {"path": str(tmp_path / "elsewhere" / "ensemble" / "mine.h5")},
        {"path": "run/ensemble/theirs.h5"},
        {"path": "../ensemble/up.h5"},
    ]
    assert [p.name for p in confs.earlier_files(records)] == ["theirs.h5"]


def test_hmc_force_keeps_a_file_that_provenance_names_in_another_ensemble_folder(tmp_path, monkeypatch):
    """End to end: an hmc --force run over a directory whose provenance.json (hand-edited or
    copied) lists ``/somewhere/else/ensemble/mine.h5`` keeps ``<out>/ensemble/mine.h5``."""
    monkeypatch.chdir(tmp_path)
    common = ["--out", "run", "--no-progress", *_sets("lattice=[4,4]", "chains=1", "hmc.steps=2")]
    common += _sets("save_every=2", "hmc.thermalization=1", "hmc.trajectories=4")
    assert main(["hmc", *common]) == 0
    ens = tmp_path / "run" / "ensemble"
    (ens / "mine.h5").write_bytes((ens / "traj_000002.h5").read_bytes())
    prov = json.loads((tmp_path / "run" / "provenance.json").read_text())
    prov["outputs"].append({**prov["outputs"][0], "path": "/somewhere/else/ensemble/mine.h5"})
    (tmp_path / "run" / "provenance.json").write_text(json.dumps(prov))
    assert main(["hmc", *common, "--force"]) == 0
    assert sorted(p.name for p in ens.iterdir()) == ["mine.h5", "traj_000002.h5", "traj_000004.h5"]


def test_records_of_another_command_remove_nothing(tmp_path):
    """provenance.json of a ``sample`` run lists ``listed.h5`` here: a resample --force (an
    earlier resample run recorded by its run_files.json) does not remove it."""
    (tmp_path / "listed.h5").write_bytes(b"x")
    (tmp_path / "ours.h5").write_bytes(b"x")
    outputs = [{"path": str(tmp_path / "listed.h5"), "command": "sample", "step": 1, "chain": 0}]
    outputs.append({"path": str(tmp_path / "ours.h5"), "command": "resample", "step": 1, "chain": 0})
    (tmp_path / "provenance.json").write_text(json.dumps({"outputs": outputs}))
    (tmp_path / "run_files.json").write_text(json.dumps({"command": "resample"}))
    out = ChainOutput(tmp_path, "resample", configurations=_confs(tmp_path))
    out.start(force=True)
    assert (tmp_path / "listed.h5").exists() and not (tmp_path / "ours.h5").exists()


# ------------------------------------------------------------------ the refusal message


def test_the_refusal_says_that_force_deletes_the_files_and_how_many(tmp_path):
    for t in range(7):
        (tmp_path / f"resample.s{t:05d}.h5").write_bytes(b"x")
    (tmp_path / "run_files.json").write_text(json.dumps({"command": "resample"}))
    out = ChainOutput(tmp_path, "resample", configurations=_confs(tmp_path))
    with pytest.raises(FormatError) as e:
        out.start()
    msg = str(e.value)
    assert "configuration files of an earlier run" in msg and "and 2 more" in msg
    assert "--force starts afresh and DELETES these 7 files" in msg
    assert len(list(tmp_path.glob("resample.*.h5"))) == 7
    assert os.path.exists(tmp_path / "run_files.json")
