"""Tests of ``flowplug hmc``: outputs, resume identity, errors, starting from a real file."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from flowplug import config as _config
from flowplug import hookimpl
from flowplug.cli import main
from flowplug.errors import ConfigError, FormatError
from flowplug.jobs.hmc import DEFAULT_CONFIG, run_fingerprint, run_hmc


def cfg(tmp_path: Path, *overrides: str, name: str = "out") -> dict:
    base = [
        f"out={tmp_path / name}",
        "progress=false",
        "threads=0",
        "lattice=[6, 6]",
        "chains=3",
        "hmc.trajectories=12",
        "hmc.thermalization=2",
        "hmc.steps=4",
        "save_every=5",
        "checkpoint_every=5",
    ]
    return _config.build_config(DEFAULT_CONFIG, overrides=base + list(overrides))


def read_h5(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}


def test_print_config(capsys):
    assert main(["hmc", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert text == DEFAULT_CONFIG
    parsed = _config.parse_toml(text)
    for key in ("name", "group", "beta", "m2", "lam"):
        assert key in parsed["action"]
    for key in ("trajectories", "integrator", "steps", "trajectory_length"):
        assert key in parsed["hmc"]
    for key in ("lattice", "start", "seed", "out", "format", "save_every"):
        assert key in parsed


def test_cli_run_writes_everything(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "hmc",
            "--set",
            f"out={out}",
            "--set",
            "lattice=[6,6]",
            "--set",
            "hmc.trajectories=12",
            "--set",
            "save_every=5",
            "--set",
            "chains=2",
            "--no-progress",
        ]
    )
    assert rc == 0
    assert "acceptance" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["command"] == "hmc" and 0 < summary["acceptance"] <= 1
    for name in ("plaquette", "topological_charge"):
        assert set(summary["observables"][name]) >= {"mean", "error", "tau_int"}
    m = read_h5(out / "measurements.h5")
    assert m["plaquette"].shape == (12, 2) and m["trajectory"].tolist() == list(range(1, 13))
    with h5py.File(out / "measurements.h5", "r") as f:  # each dataset carries its layout
        assert f["trajectory"].attrs["axes"] == "steps"
        assert {k: f[k].attrs["axes"] for k in f if k != "trajectory"} == {
            k: "steps,chains" for k in m if k != "trajectory"
        }
        assert {"plaquette", "accepted", "delta_h"} <= set(f)
    from flowplug import io

    files = sorted((out / "ensemble").iterdir())
    # the default thermalization is min(10, trajectories // 2) = 6: saved at 10 and at the end
    assert summary["thermalization"] == 6
    assert [f.name for f in files] == ["traj_000010.h5", "traj_000012.h5"]
    ens = io.read(files[-1])
    assert len(ens) == 2 and ens.group == "u1" and ens.lattice == (6, 6)
    np.testing.assert_allclose(
        m["plaquette"][-1],
        torch.cos(ens.links[:, 0] + ens.links[:, 1].roll(-1, 1) - ens.links[:, 0].roll(-1, 2) - ens.links[:, 1])
        .mean((1, 2))
        .numpy(),
        atol=1e-12,
    )


def test_refuses_to_clobber_and_resumes_only_same_run(tmp_path, capsys):
    c = cfg(tmp_path)
    run_hmc(c)
    out = str(tmp_path / "out")
    assert main(["hmc", "--set", f"out={out}", "--set", "lattice=[6,6]", "--no-progress"]) == 1
    assert "--resume" in capsys.readouterr().err
    # a different coupling is a different chain: --resume refuses
    assert (
        main(
            [
                "hmc",
                "--set",
                f"out={out}",
                "--set",
                "action.beta=3.0",
                "--resume",
                "--set",
                "lattice=[6,6]",
                "--no-progress",
            ]
        )
        == 1
    )
    assert "different run" in capsys.readouterr().err
    assert run_fingerprint(cfg(tmp_path, "hmc.trajectories=99", "save_every=1")) == run_fingerprint(c)


def test_fingerprint_of_the_default_is_pinned():
    """Checkpoints of earlier runs must stay resumable: the fingerprint of a configuration does
    not change between flowplug versions (value of flowplug 0.1 for the default configuration)."""
    assert run_fingerprint(_config.build_config(DEFAULT_CONFIG)) == "19c0800e24c26676"


class Interrupt:
    """Monitor plugin that interrupts the run after a given step (like Ctrl-C)."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.checkpoints: list[tuple[str, int, str]] = []

    @hookimpl
    def flowplug_checkpoint_written(self, path, step, what):
        self.checkpoints.append((Path(path).name, step, what))

    @hookimpl
    def flowplug_after_chain_step(self, step, kernel, info):
        if step == self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize(
    "extra",
    [
        ("action.group=u1", "measurements=csv"),
        ("action.name=phi4", "hmc.integrator=leapfrog", "hmc.steps=6"),
        ("action.group=su2", "lattice=[2, 2, 2, 4]", "format=ildg", "start=cold"),
    ],
)
def test_interrupted_run_resumes_to_the_same_chain(tmp_path, fresh_pm, extra):
    full = run_hmc(cfg(tmp_path, *extra, name="full"))
    interrupted = cfg(tmp_path, *extra, name="part")
    monitor = Interrupt(at=7)
    fresh_pm.register(monitor, name="interrupt")
    with pytest.raises(KeyboardInterrupt):
        run_hmc(interrupted)
    fresh_pm.unregister(name="interrupt")
    assert monitor.checkpoints == [("checkpoint.pt", 5, "hmc")]
    ck = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 5
    resumed = run_hmc(interrupted, resume=True)
    assert resumed["observables"] == full["observables"]
    assert resumed["acceptance"] == full["acceptance"]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert torch.equal(a["state"]["x"], b["state"]["x"])
    for k in a["history"]:
        assert torch.equal(a["history"][k], b["history"][k])
    meas = "measurements.csv" if "measurements=csv" in extra else "measurements.h5"
    if meas.endswith("csv"):
        assert (tmp_path / "full" / meas).read_text() == (tmp_path / "part" / meas).read_text()
    else:
        ma, mb = read_h5(tmp_path / "full" / meas), read_h5(tmp_path / "part" / meas)
        assert ma.keys() == mb.keys()
        for k in ma:
            np.testing.assert_array_equal(ma[k], mb[k])
    names = sorted(p.name for p in (tmp_path / "full" / "ensemble").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "part" / "ensemble").iterdir())
    assert names  # configurations were written
    from flowplug import io

    for n in names:  # same links / fields (files differ only in their time stamps)
        ea, eb = io.read(tmp_path / "full" / "ensemble" / n), io.read(tmp_path / "part" / "ensemble" / n)
        assert torch.equal(ea.links, eb.links)
        assert eb.checksum_status in ("ok", "absent")


def test_extend_finished_run(tmp_path):
    short = run_hmc(cfg(tmp_path, "hmc.trajectories=6", name="a"))
    assert short["trajectories"] == 6
    longer = run_hmc(cfg(tmp_path, "hmc.trajectories=12", name="a"), resume=True)
    straight = run_hmc(cfg(tmp_path, "hmc.trajectories=12", name="b"))
    assert longer["trajectories"] == 12
    assert longer["observables"] == straight["observables"]


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="holds su3, su2 fields, not scalar: write them as hdf5"):
        run_hmc(cfg(tmp_path, "action.name=phi4", "format=ildg"))
    with pytest.raises(ConfigError, match="holds su3, su2"):
        run_hmc(cfg(tmp_path, "format=ildg"))  # U(1) cannot go to ILDG
    with pytest.raises(ConfigError, match="integrator"):
        run_hmc(cfg(tmp_path, "hmc.integrator=euler"))
    with pytest.raises(ConfigError, match="no such file"):
        run_hmc(cfg(tmp_path, "start=/nonexistent/file.ildg"))
    with pytest.raises(ConfigError, match="csv"):
        run_hmc(cfg(tmp_path, "measurements=xml"))


MILC = "ensembles/milc.lat.sample.l4444.ildg"


def test_start_from_production_ensemble(tmp_path, shared_dir, capsys, one_thread):
    """HMC at beta = 6 from MILC's 4^4 configuration (plaquette 0.5949) stays near it
    (every measured plaquette within 0.03; the thermal spread on 4^4 is ~0.007), while
    cold and hot starts are still far away after the same 6 trajectories; the ILDG
    files it writes read back with checksums ok."""
    src = shared_dir / MILC
    common = (
        "action.group=su3",
        "action.beta=6.0",
        "hmc.thermalization=0",
        "hmc.trajectories=6",
        "chains=2",
        "save_every=3",
        "hmc.steps=6",
        "lattice=[4, 4, 4, 4]",
    )
    milc = run_hmc(cfg(tmp_path, *common, f"start={src}", "format=ildg", name="milc"))
    m = read_h5(tmp_path / "milc" / "measurements.h5")["plaquette"]
    assert np.all(np.abs(m - 0.5949) < 0.03), m
    assert milc["acceptance"] >= 0.5
    cold = read_h5(Path(run_hmc(cfg(tmp_path, *common, "start=cold", "format=none", name="cold"))["measurements"]))[
        "plaquette"
    ]
    hot = read_h5(Path(run_hmc(cfg(tmp_path, *common, "start=hot", "format=none", name="hot"))["measurements"]))[
        "plaquette"
    ]
    assert cold[-1].min() > 0.65 and hot[-1].max() < 0.52
    files = sorted((tmp_path / "milc" / "ensemble").glob("*.ildg"))
    assert len(files) == 4  # trajectories 3 and 6, two chains
    capsys.readouterr()
    assert main(["info", "--json", *map(str, files)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["checksum"] for r in rows] == ["ok"] * 4
    assert all(abs(r["plaquette"] - 0.5949) < 0.03 for r in rows)
    assert all(r["lattice"] == [4, 4, 4, 4] and r["group"] == "su3" for r in rows)


def test_start_file_of_other_group_is_refused(tmp_path, shared_dir):
    with pytest.raises(ConfigError, match="su3 links"):
        run_hmc(cfg(tmp_path, f"start={shared_dir / MILC}", "action.group=su2"))


def test_reunitarisation_of_file_links_is_needed(shared_dir):
    """32-bit files are off the group by ~1e-7 (why the start is projected back)."""
    from flowplug import io
    from flowplug.gauge import unitarity_deviation
    from flowplug.groups import reunitarize

    links = io.read(shared_dir / MILC).links
    assert unitarity_deviation(links).max() > 1e-8
    assert unitarity_deviation(reunitarize(links)).max() < 1e-14


def test_force_removes_the_earlier_runs_configurations_and_keeps_inputs(tmp_path, capsys):
    """--force over an earlier run: none of its configuration files stay next to the new ones
    (``ensemble/*.h5`` is one run's), a start file inside the directory survives (also one the
    earlier run wrote), files of other names are untouched; a fresh start without --force that
    finds such files (the checkpoint gone: stopped before it) refuses, naming them."""
    out = tmp_path / "h11"
    ens = out / "ensemble"
    common = ["--out", str(out), "--no-progress", "--set", "lattice=[4,4]", "--set", "chains=2"]
    common += ["--set", "hmc.steps=2", "--set", "save_every=10", "--set", "hmc.thermalization=2"]
    assert main(["hmc", *common, "--set", "hmc.trajectories=40", "--set", "action.beta=2.0"]) == 0
    assert sorted(p.name for p in ens.iterdir()) == [f"traj_0000{t}.h5" for t in (10, 20, 30, 40)]
    (ens / "notes.txt").write_text("mine")
    (ens / "mine.h5").write_bytes((ens / "traj_000020.h5").read_bytes())
    (ens / "traj_000010.h5.bak").write_bytes(b"x")
    start = ens / "traj_000030.h5"  # an input inside the directory, named as the job names its own
    before = start.read_bytes()
    new = ["--set", "hmc.trajectories=20", "--set", "action.beta=3.0", "--set", f"start={start}"]
    assert main(["hmc", *common, *new, "--force"]) == 0
    names = sorted(p.name for p in ens.iterdir())
    assert names == ["mine.h5", "notes.txt", "traj_000010.h5", "traj_000010.h5.bak", "traj_000020.h5", "traj_000030.h5"]
    assert start.read_bytes() == before  # traj_000040.h5 (beta 2.0) is gone
    records = json.loads((out / "provenance.json").read_text())["outputs"]
    assert sorted({Path(r["path"]).name for r in records}) == ["traj_000010.h5", "traj_000020.h5"]
    assert {r["action"]["beta"] for r in records} == {3.0}
    assert int(read_h5(out / "measurements.h5")["trajectory"][-1]) == 20
    # stopped before its first checkpoint (none left): a fresh start refuses, naming the files
    (out / "checkpoint.pt").unlink()
    capsys.readouterr()
    assert main(["hmc", *common, "--set", "hmc.trajectories=20"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "configuration files of an earlier run" in err and str(ens / "traj_000010.h5") in err
    assert "--force" in err and "mine.h5" not in err
    assert (ens / "traj_000010.h5").exists()
    # a start file where the run writes a configuration is never written over
    with pytest.raises(FormatError, match="is an input; refusing to overwrite it"):
        run_hmc(
            cfg(
                tmp_path,
                f"start={ens / 'traj_000010.h5'}",
                "lattice=[4,4]",
                "chains=2",
                "save_every=10",
                "hmc.trajectories=10",
                name="h11",
            ),
            force=True,
        )
