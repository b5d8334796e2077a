"""What users asked for while trying the jobs (issue 12, item 6).

The topological susceptibility in every chain summary (against the exact 2D U(1) value),
one ``threads`` key and helper for every job, a bare LIME start file for ``hmc``,
``resample DIR`` skipping files that are not lattice files, Ctrl-C naming the checkpoint
and the resume command, ``resample``'s default ``save_every``, a ``train`` run's
``config.toml`` with only its action's keys, and the short-chain warning shared by the
chain jobs. Runs are tiny and seeded; the statistical test states its statistics.
"""

from __future__ import annotations

import json
import shlex
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from flowplug import config as _config
from flowplug import hookimpl, io
from flowplug.cli import main
from flowplug.errors import ConfigError, FormatError
from flowplug.jobs import hmc as hmc_job
from flowplug.jobs import resample as resample_job
from flowplug.jobs.summary import (
    MIN_LENGTH_IN_TAU,
    ShortChainWarning,
    topological_susceptibility,
    warn_short_chains,
)

pytestmark = pytest.mark.usefixtures("fresh_pm")


def hmc_cfg(tmp_path: Path, *overrides: str, name: str = "hmc") -> dict:
    base = [
        f"out={tmp_path / name}",
        "progress=false",
        "lattice=[4, 4]",
        "chains=2",
        "hmc.trajectories=8",
        "hmc.thermalization=2",
        "hmc.steps=4",
        "save_every=4",
        "format='none'",
    ]
    return _config.build_config(hmc_job.DEFAULT_CONFIG, overrides=base + list(overrides))


@pytest.fixture(scope="module")
def u1_flow_and_ensemble(tmp_path_factory):
    """An untrained 2-layer U(1) 4x4 flow (a `flowplug train` run directory) and 3 hot configurations."""
    from flowplug.jobs.train import DEFAULT_CONFIG, OPEN_TABLES
    from flowplug.manager import new_plugin_manager, set_plugin_manager
    from flowplug.plugins.theories import WilsonGaugeAction

    old = set_plugin_manager(new_plugin_manager(autoload=False))
    try:
        d = tmp_path_factory.mktemp("flow")
        cfg = _config.build_config(
            DEFAULT_CONFIG,
            overrides=[
                f"out='{d / 'flow'}'",
                "lattice=[4,4]",
                "action.name=wilson",
                "action.group=u1",
                "action.beta=1.0",
                'flow.layers=["u1-spline"]',
                "flow.n_layers=2",
                "flow.options.hidden=[4]",
                "train.steps=0",
                "train.progress=false",
            ],
            open_tables=OPEN_TABLES,
        )
        from flowplug.train import build_trainer

        build_trainer(cfg).run()
        act = WilsonGaugeAction(1.0, "u1")
        io.write(d / "u1.h5", io.Ensemble(act.hot_start((4, 4), 3, generator=torch.Generator().manual_seed(3))))
    finally:
        set_plugin_manager(old)
    return d / "flow", d / "u1.h5"


def resample_cfg(*overrides: str) -> dict:
    return _config.build_config(resample_job.DEFAULT_CONFIG, overrides=list(overrides))


# ------------------------------------------------------- 1. topological susceptibility


def test_topological_susceptibility_is_q2_over_v_by_the_gamma_method():
    from flowplug.stats import gamma_method

    rng = np.random.default_rng(5)
    q = np.round(rng.normal(0, 1.3, size=(400, 3)))  # (steps, chains), integer charges
    chi = topological_susceptibility(q, [6, 4], burn=10)
    g = gamma_method((q[10:] ** 2) / 24, step_axis=0)
    assert chi["volume"] == 24 and chi["definition"] == "<Q^2>/V"
    assert chi["mean"] == pytest.approx(float((q[10:] ** 2).mean()) / 24, rel=1e-12)
    assert (chi["error"], chi["tau_int"], chi["n"]) == pytest.approx((g.error, g.tau_int, g.n), rel=1e-12)


def test_hmc_topological_susceptibility_agrees_with_exact_2d_u1(tmp_path, capsys):
    """2D U(1), L = 6, beta = 2, seed 1: 16 chains x 280 measured trajectories (tau_int(Q^2) ~ 1.5);
    chi_t V = <Q^2> must agree with the exact torus value 0.69703 within 3 sigma (Gamma method)."""
    from flowplug.exact import u1_2d

    out = tmp_path / "chi"
    rc = main(
        [
            "hmc",
            "--set",
            f"out={out}",
            "--set",
            "lattice=[6,6]",
            "--set",
            "action.beta=2.0",
            "--set",
            "chains=16",
            "--set",
            "hmc.trajectories=300",
            "--set",
            "hmc.thermalization=20",
            "--set",
            "hmc.steps=6",
            "--set",
            "format='none'",
            "--set",
            "save_every=1000",
            "--set",
            "seed=1",
            "--no-progress",
        ]
    )
    assert rc == 0
    chi = json.loads((out / "summary.json").read_text())["observables"]["topological_susceptibility"]
    assert chi["volume"] == 36 and chi["n"] == 16 * 280
    exact = u1_2d(6, 2.0)["q2"]
    assert abs(chi["mean"] * 36 - exact) < 3 * chi["error"] * 36, (chi, exact)
    assert 0 < chi["tau_int"] < 10
    line = capsys.readouterr().out
    assert f"topological_susceptibility {chi['mean']:.6g} +- {chi['error']:.2g}" in line


def test_susceptibility_whenever_the_charge_is_measured(tmp_path, u1_flow_and_ensemble):
    with pytest.warns(ShortChainWarning):
        s = hmc_job.run_hmc(hmc_cfg(tmp_path, name="a"))  # 2D U(1): Q by default
        assert {"topological_charge", "topological_susceptibility"} <= set(s["observables"])
        s = hmc_job.run_hmc(hmc_cfg(tmp_path, "observables=['plaquette']", name="b"))
        assert "topological_susceptibility" not in s["observables"]
        s = hmc_job.run_hmc(hmc_cfg(tmp_path, "action.group=su2", "lattice=[2,2,2,2]", name="c"))  # 4D clover Q
        assert s["observables"]["topological_susceptibility"]["volume"] == 16
        s = hmc_job.run_hmc(hmc_cfg(tmp_path, "action.name=phi4", name="d"))
        assert "topological_charge" not in s["observables"]
        assert "topological_susceptibility" not in s["observables"]
    flow, ens = u1_flow_and_ensemble
    r = resample_job.run_resample(resample_cfg("steps=3"), [ens], flow, tmp_path / "r")
    assert r["observables"]["topological_susceptibility"]["volume"] == 16


def test_sample_reports_the_susceptibility(tmp_path, u1_flow_and_ensemble):
    from flowplug.jobs.sample import DEFAULT_CONFIG, run_sample

    flow, _ = u1_flow_and_ensemble
    cfg = _config.build_config(DEFAULT_CONFIG, overrides=["chains=2", "steps=4", "thermalize=1", "ess_samples=8"])
    s = run_sample(cfg, flow, tmp_path / "s")
    assert "topological_susceptibility" in s["observables"]


# ----------------------------------------------------------------- 2. threads


JOBS_WITH_THREADS = ["hmc", "resample", "train", "demo", "sample"]


@pytest.mark.parametrize("job", JOBS_WITH_THREADS)
def test_every_computing_job_has_a_threads_key_defaulting_to_one(job):
    import importlib

    from flowplug.threads import DEFAULT_THREADS

    text = importlib.import_module(f"flowplug.jobs.{job}").DEFAULT_CONFIG
    assert _config.parse_toml(text)["threads"] == DEFAULT_THREADS == 1
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("threads"))
    doc = " ".join([lines[i]] + [line for line in lines[i + 1 : i + 3] if line.lstrip().startswith("#")])
    assert "0" in doc.split("#", 1)[1] and "default" in doc  # the comment says what 0 means


class ThreadProbe:
    """Monitor recording torch's thread count during chain and training steps."""

    def __init__(self) -> None:
        self.seen: set[int] = set()

    @hookimpl
    def flowplug_after_chain_step(self, step, kernel, info):
        self.seen.add(torch.get_num_threads())

    @hookimpl
    def flowplug_after_train_step(self, step, metrics):
        self.seen.add(torch.get_num_threads())


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(old)


def test_jobs_run_on_their_threads_and_restore_the_callers(tmp_path, fresh_pm, two_threads, u1_flow_and_ensemble):
    from flowplug.jobs.train import DEFAULT_CONFIG, OPEN_TABLES, run_train

    probe = ThreadProbe()
    fresh_pm.register(probe, name="probe")
    s = hmc_job.run_hmc(hmc_cfg(tmp_path, "hmc.trajectories=40", name="one"))  # default: 1
    assert probe.seen == {1} and s["threads"] == 1 and torch.get_num_threads() == 2
    probe.seen.clear()
    s = hmc_job.run_hmc(hmc_cfg(tmp_path, "hmc.trajectories=40", "threads=0", name="zero"))  # torch's setting
    assert probe.seen == {2} and s["threads"] == 2
    probe.seen.clear()
    flow, ens = u1_flow_and_ensemble
    r = resample_job.run_resample(resample_cfg("steps=2"), [ens], flow, tmp_path / "r")
    assert probe.seen == {1} and r["threads"] == 1 and torch.get_num_threads() == 2
    probe.seen.clear()
    tcfg = _config.build_config(
        DEFAULT_CONFIG,
        overrides=[
            f"out='{tmp_path / 't'}'",
            "lattice=[4,4]",
            "flow.n_layers=2",
            "train.steps=2",
            "train.batch_size=4",
            "train.progress=false",
            "eval.samples=16",
        ],
        open_tables=OPEN_TABLES,
    )
    run_train(tcfg)
    assert probe.seen == {1} and torch.get_num_threads() == 2
    with pytest.raises(ConfigError, match="threads = -1"):
        hmc_job.run_hmc(hmc_cfg(tmp_path, "threads=-1", name="neg"))


# ------------------------------------------------------ 3. hmc from a bare LIME file


@pytest.fixture
def bare_lime(tmp_path):
    """A bare LIME file (one ildg-binary-data record) of one SU(2) configuration on 2x2x2x4."""
    from flowplug.plugins.theories import WilsonGaugeAction

    links = WilsonGaugeAction(2.0, "su2").hot_start((2, 2, 2, 4), 1, generator=torch.Generator().manual_seed(2))
    full = tmp_path / "full.ildg"
    io.write(full, io.Ensemble(links), "ildg", precision=64)
    data = full.read_bytes()
    payload, pos = None, 0
    while pos < len(data):
        _, _, _, length, rtype = struct.unpack(">IHHQ128s", data[pos : pos + 144])
        if rtype.rstrip(b"\0") == b"ildg-binary-data":
            payload = data[pos + 144 : pos + 144 + length]
        pos += 144 + length + (-length % 8)
    bare = tmp_path / "start.lime"
    bare.write_bytes(
        struct.pack(">IHHQ128s", 0x456789AB, 1, 0xC000, len(payload), b"ildg-binary-data")
        + payload
        + b"\0" * (-len(payload) % 8)
    )
    assert io.detect(bare) == "lime"
    return bare, links


def test_hmc_from_a_bare_lime_file_names_the_keys_that_work(tmp_path, bare_lime, capsys):
    bare, links = bare_lime
    common = [
        "hmc",
        "--set",
        f"start={bare}",
        "--set",
        "action.group=su2",
        "--set",
        "chains=1",
        "--set",
        "hmc.trajectories=3",
        "--set",
        "hmc.thermalization=0",
        "--set",
        "format='none'",
        "--set",
        "hmc.steps=3",
        "--no-progress",
    ]
    for extra in ([], ["--set", "lattice=[2,2,2,2]"]):  # the default 8x8, a lattice that does not fit
        assert main(common + ["--set", f"out={tmp_path / 'x'}"] + extra) == 1
        err = " ".join(capsys.readouterr().err.split())
        assert "bare LIME" in err and "lattice" in err and "action.group" in err, err
        assert "--lattice" not in err and "--group" not in err, err  # hmc has no such options
        assert "--set lattice=[" in err and "--set action.group=" in err
    # with the keys it names, the run starts from the file's configuration
    from flowplug.plugins.theories import WilsonGaugeAction

    x0, desc = hmc_job.start_configuration(
        hmc_cfg(tmp_path, f"start={bare}", "action.group=su2", "lattice=[2,2,2,4]"),
        WilsonGaugeAction(2.0, "su2"),
        1,
        torch.Generator(),
        torch.device("cpu"),
    )
    torch.testing.assert_close(x0, links, rtol=0, atol=1e-12)
    assert main(common + ["--set", f"out={tmp_path / 'ok'}", "--set", "lattice=[2,2,2,4]"]) == 0


# ------------------------------------------------- 4. resample DIR with other files


def test_resample_skips_files_that_are_not_lattice_files(tmp_path, u1_flow_and_ensemble, capsys):
    flow, ens = u1_flow_and_ensemble
    d = tmp_path / "cfg"
    d.mkdir()
    (d / "u1.h5").write_bytes(ens.read_bytes())
    (d / "README.md").write_text("# my ensemble\nbeta = 1.0, produced with ...\n")
    (d / "notes.txt").write_text("trajectory 100 looked odd\n")
    out = tmp_path / "r"
    assert main(["resample", str(d), "--flow", str(flow), "--out", str(out), "--no-progress", "--set", "steps=2"]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "skipped" in line]
    assert len(notes) == 1 and "README.md" in notes[0] and "notes.txt" in notes[0], err
    s = json.loads((out / "summary.json").read_text())
    assert s["chains"] == 3 and sorted(Path(p).name for p in s["skipped_inputs"]) == ["README.md", "notes.txt"]
    # a file that looks like a lattice file but is corrupt still stops the run
    (d / "broken.ildg").write_bytes(b"\x45\x67\x89\xab" + b"\0" * 200)
    assert main(["resample", str(d), "--flow", str(flow), "--out", str(tmp_path / "r2"), "--no-progress"]) == 1
    assert "broken.ildg" in capsys.readouterr().err
    # a non-lattice file named explicitly is an error, not skipped
    assert (
        main(["resample", str(d / "README.md"), "--flow", str(flow), "--out", str(tmp_path / "r3"), "--no-progress"])
        == 1
    )
    assert "README.md" in capsys.readouterr().err


def test_lattice_inputs_and_expand_inputs_live_in_io(tmp_path):
    import flowplug.cli.cmd_convert as cmd_convert

    d = tmp_path / "d"
    d.mkdir()
    io.write(d / "a.h5", io.Ensemble(torch.zeros(1, 2, 4, 4, dtype=torch.float64)))
    (d / "README").write_text("text")
    (d / ".hidden").write_text("x")
    assert io.expand_inputs([d]) == [d / "README", d / "a.h5"]
    assert io.lattice_inputs([d]) == ([d / "a.h5"], [d / "README"])
    assert io.lattice_inputs([d], format="hdf5") == ([d / "README", d / "a.h5"], [])  # the caller said
    assert io.lattice_inputs([d / "README"]) == ([d / "README"], [])  # named explicitly
    with pytest.raises(FormatError, match="matches no file"):
        io.lattice_inputs([str(d / "*.ildg")])
    assert not hasattr(cmd_convert, "expand_inputs")
    jobs = Path(hmc_job.__file__).parent
    for path in jobs.glob("*.py"):  # a job never imports from the command-line layer
        assert "flowplug.cli" not in path.read_text(encoding="utf-8"), path


# ---------------------------------------------------------------------- 5. Ctrl-C


class InterruptAt:
    """Monitor that stops a chain run after a given step, like Ctrl-C."""

    def __init__(self, at: int) -> None:
        self.at = at

    @hookimpl
    def flowplug_after_chain_step(self, step, kernel, info):
        if step == self.at:
            raise KeyboardInterrupt


def _resume_command(err: str) -> list[str]:
    line = next(line.strip() for line in err.splitlines() if line.startswith("  flowplug "))
    words = shlex.split(line)
    assert words[0] == "flowplug"
    return words[1:]


def test_ctrl_c_in_hmc_names_the_checkpoint_and_the_resume_command(tmp_path, fresh_pm, capsys):
    out = tmp_path / "h"
    argv = [
        "hmc",
        "--set",
        f"out={out}",
        "--set",
        "lattice=[4,4]",
        "--set",
        "chains=2",
        "--set",
        "hmc.trajectories=12",
        "--set",
        "hmc.thermalization=2",
        "--set",
        "save_every=5",
        "--set",
        "checkpoint_every=5",
        "--set",
        "format='none'",
        "--no-progress",
    ]
    fresh_pm.register(InterruptAt(7), name="stop")
    assert main(argv) == 130
    fresh_pm.unregister(name="stop")
    err = capsys.readouterr().err
    assert f"{out / 'checkpoint.pt'} (trajectory 5)" in err, err
    again = _resume_command(err)
    assert again == argv + ["--resume"]
    assert main(again) == 0
    assert json.loads((out / "summary.json").read_text())["trajectories"] == 12
    # started afresh over that run (--force) and stopped before its first checkpoint: the
    # old checkpoint is not offered; the command starts again
    fresh_pm.register(InterruptAt(2), name="stop")
    assert main(argv + ["--force"]) == 130
    fresh_pm.unregister(name="stop")
    err = capsys.readouterr().err
    assert "no checkpoint of this run yet" in err and "--resume" not in err, err
    assert _resume_command(err) == argv + ["--force"]


def test_ctrl_c_in_resample_and_sample(tmp_path, fresh_pm, capsys, u1_flow_and_ensemble):
    flow, ens = u1_flow_and_ensemble
    for cmd, head in (
        ("resample", [str(ens)]),
        ("sample", ["--set", "chains=2", "--set", "ess_samples=8", "--set", "thermalize=1"]),
    ):
        out = tmp_path / cmd
        argv = [
            cmd,
            *head,
            "--flow",
            str(flow),
            "--out",
            str(out),
            "--no-progress",
            "--set",
            "steps=8",
            "--set",
            "checkpoint_every=3",
        ]
        fresh_pm.register(InterruptAt(4), name="stop")
        assert main(argv) == 130
        fresh_pm.unregister(name="stop")
        err = capsys.readouterr().err
        assert f"{out / 'chain.ckpt'} (step 3)" in err, err
        assert _resume_command(err) == argv + ["--resume"]
        assert main(_resume_command(err)) == 0
        capsys.readouterr()


def test_ctrl_c_in_train_names_the_checkpoint_and_the_resume_command(tmp_path, monkeypatch, capsys):
    import os
    import signal

    from flowplug.train import Trainer

    out = tmp_path / "t"
    step = Trainer.train_step

    def step_with_sigint(self):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives inside the step
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", step_with_sigint)
    argv = [
        "train",
        "--set",
        f"out={out}",
        "--set",
        "lattice=[4,4]",
        "--set",
        "flow.n_layers=2",
        "--set",
        "train.steps=5",
        "--set",
        "train.batch_size=4",
        "--set",
        "eval.samples=16",
        "--no-progress",
    ]
    assert main(argv) == 130
    monkeypatch.setattr(Trainer, "train_step", step)
    err = capsys.readouterr().err
    assert f"{out / 'checkpoint.pt'} (step 3)" in err, err
    again = _resume_command(err)
    assert again == ["train", "--resume", str(out), "--no-progress"]
    assert main(again) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 5


# ------------------------------------------------------- 6. resample's save_every


def test_resample_writes_one_configuration_per_input_by_default(tmp_path, u1_flow_and_ensemble):
    assert _config.parse_toml(resample_job.DEFAULT_CONFIG)["save_every"] == 0
    flow, ens = u1_flow_and_ensemble
    s = resample_job.run_resample(resample_cfg("steps=6"), [ens], flow, tmp_path / "r")
    assert s["written"] == 3  # one per input configuration, after the last step
    assert {io.read(tmp_path / "r" / "ensemble.h5").meta[i].provenance["step"] for i in range(3)} == {6}


# ------------------------------------------------ 7. train's config.toml: its action's keys


@pytest.mark.parametrize(
    "action, keys",
    [
        (["action.name=wilson", "action.group=u1", "action.beta=1.5"], {"name", "group", "beta"}),
        (["action.name=phi4"], {"name", "m2", "lam"}),
    ],
)
def test_train_config_toml_carries_only_the_keys_of_its_action(tmp_path, action, keys):
    from flowplug.jobs.train import DEFAULT_CONFIG, OPEN_TABLES, resume_train, run_train, stored_config

    layer = ['flow.layers=["u1-spline"]'] if "action.group=u1" in action else []
    cfg = _config.build_config(
        DEFAULT_CONFIG,
        overrides=[
            f"out='{tmp_path / 't'}'",
            "lattice=[4,4]",
            "flow.n_layers=2",
            "train.steps=1",
            "train.batch_size=4",
            "train.progress=false",
            "eval.samples=16",
            *action,
            *layer,
        ],
        open_tables=OPEN_TABLES,
    )
    run_train(cfg)
    written = _config.load_toml_file(tmp_path / "t" / "config.toml")
    assert set(written["action"]) == keys
    assert set(stored_config(tmp_path / "t")["action"]) == keys
    assert resume_train(tmp_path / "t", overrides={"steps": 2})["steps"] == 2  # still resumable


# ------------------------------------------------------- 9. short-chain warning


def test_warn_short_chains_is_shared_and_quiet_for_long_chains(recwarn):
    obs = {"plaquette": {"tau_int": 2.0}, "topological_charge": {"tau_int": 8.0}}
    assert warn_short_chains(obs, steps=int(MIN_LENGTH_IN_TAU * 8.0), job="hmc") is None
    assert not [w for w in recwarn if w.category is ShortChainWarning]
    with pytest.warns(
        ShortChainWarning,
        match=r"hmc: chains of 100 trajectories .* topological_charge \(tau_int 8\)"
        r".*hmc\.trajectories: at least 160 trajectories",
    ):
        warn_short_chains(obs, steps=100, job="hmc", steps_key="hmc.trajectories", unit="trajectories")
    with pytest.warns(ShortChainWarning, match="no chain moved"):
        warn_short_chains({"q": {"tau_int": float("inf"), "note": "no chain changed"}}, steps=10, job="resample")


def test_hmc_warns_when_its_chains_are_too_short(tmp_path):
    """Three measured trajectories of tiny steps: tau_int far beyond the chain."""
    with pytest.warns(ShortChainWarning, match="hmc: chains of 3 trajectories are too short for plaquette"):
        hmc_job.run_hmc(hmc_cfg(tmp_path, "hmc.trajectories=5", "hmc.trajectory_length=0.05"))
