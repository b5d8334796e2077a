"""``--resume`` from the run's stored configuration (``config.toml``, flowplug.jobs.provenance).

Checks: a chain run writes its resolved configuration; ``--resume`` without the original
``--set`` values continues the very same chain (bit for bit the uninterrupted run); a resume
that changes a key of the Markov chain is refused naming each such key with its stored and
its given value; keys that do not change the chain may change; a run directory of an earlier
version (no ``config.toml``) resumes as before (the fingerprint alone decides); keys added
to a job keep the fingerprints of earlier runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from flowplug import config as _config
from flowplug.cli import main
from flowplug.errors import CheckpointError
from flowplug.jobs.hmc import DEFAULT_CONFIG, run_fingerprint, run_hmc
from flowplug.jobs.provenance import (
    RUN_CONFIG,
    chain_key_differences,
    check_resume_config,
    fingerprint,
    resume_configuration,
    stored_run_config,
)

pytestmark = pytest.mark.filterwarnings("ignore::flowplug.jobs.summary.ShortChainWarning")

#: The original command's settings (all of them chain keys but the first three).
SETTINGS = [
    "progress=false",
    "threads=1",
    "save_every=3",
    "lattice=[6, 6]",
    "chains=2",
    "seed=11",
    "action.beta=2.5",
    "hmc.thermalization=1",
    "hmc.steps=4",
    "hmc.trajectory_length=0.8",
]


def _sets(*pairs: str) -> list[str]:
    return [w for p in pairs for w in ("--set", p)]


def _measurements(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}


def _hmc(out: Path, *extra: str, resume: bool = False) -> int:
    args = ["hmc", *_sets(f"out={out}", *extra), "--no-progress"]
    return main(args + (["--resume"] if resume else []))


def test_resume_without_the_set_values_is_the_uninterrupted_run(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert _hmc(full, *SETTINGS, "hmc.trajectories=8") == 0
    assert _hmc(part, *SETTINGS, "hmc.trajectories=5") == 0
    stored = stored_run_config(part)
    assert stored is not None and stored["action"]["beta"] == 2.5 and stored["hmc"]["steps"] == 4
    # only what changes: the number of trajectories
    assert _hmc(part, "hmc.trajectories=8", resume=True) == 0
    a, b = _measurements(full / "measurements.h5"), _measurements(part / "measurements.h5")
    assert a.keys() == b.keys() and "plaquette" in a
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    sa = json.loads((full / "summary.json").read_text())
    sb = json.loads((part / "summary.json").read_text())
    assert sa["observables"] == sb["observables"] and sb["trajectories"] == 8
    # the stored configuration now says 8 trajectories: a second resume extends from there
    assert stored_run_config(part)["hmc"]["trajectories"] == 8  # type: ignore[index]


def test_resume_refuses_a_changed_chain_key_and_names_each(tmp_path, capsys):
    out = tmp_path / "run"
    assert _hmc(out, *SETTINGS, "hmc.trajectories=4") == 0
    capsys.readouterr()
    assert _hmc(out, "hmc.trajectories=6", "action.beta=3.0", "hmc.steps=5", resume=True) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "different run" in err
    assert "action.beta: stored 2.5, given 3.0" in err
    assert "hmc.steps: stored 4, given 5" in err
    assert "2 keys of the Markov chain or its measurements" in err
    # giving the original values again is fine (the command of earlier versions still works)
    assert _hmc(out, *SETTINGS, "hmc.trajectories=6", resume=True) == 0
    assert json.loads((out / "summary.json").read_text())["trajectories"] == 6


def test_run_hmc_resume_with_another_configuration_names_the_keys(tmp_path):
    """The job itself (the Python API, no command line) names the differing keys too."""
    cfg = _config.build_config(DEFAULT_CONFIG, overrides=[f"out={tmp_path / 'r'}", *SETTINGS, "hmc.trajectories=4"])
    run_hmc(cfg)
    other = _config.build_config(
        DEFAULT_CONFIG, overrides=[f"out={tmp_path / 'r'}", *SETTINGS, "hmc.trajectories=6", "seed=12"]
    )
    with pytest.raises(CheckpointError, match=r"seed: stored 11, given 12") as info:
        run_hmc(other, resume=True)
    assert "action.beta" not in str(info.value)  # equal keys are not named
    # non-chain keys (trajectories, save_every, format) may change
    same = _config.build_config(
        DEFAULT_CONFIG,
        overrides=[f"out={tmp_path / 'r'}", *SETTINGS, "hmc.trajectories=6", "save_every=2", 'format="none"'],
    )
    assert run_hmc(same, resume=True)["trajectories"] == 6


def test_old_run_directory_without_config_resumes_as_before(tmp_path, capsys):
    """No config.toml (a run of an earlier version): the --set values are needed again, and a
    resume without them is refused by the fingerprint with its old message."""
    out = tmp_path / "old"
    assert _hmc(out, *SETTINGS, "hmc.trajectories=4") == 0
    (out / RUN_CONFIG).unlink()
    capsys.readouterr()
    forgot_beta = [s for s in SETTINGS if not s.startswith("action.beta")]
    assert _hmc(out, *forgot_beta, "hmc.trajectories=6", resume=True) == 1
    assert "checkpoint belongs to a different run: its configuration fingerprint" in capsys.readouterr().err
    assert _hmc(out, *SETTINGS, "hmc.trajectories=6", resume=True) == 0
    assert json.loads((out / "summary.json").read_text())["trajectories"] == 6


def test_fingerprint_guards_what_config_toml_cannot_see(tmp_path, capsys):
    """config.toml edited by hand to match a changed command: the checkpoint's fingerprint
    still refuses the resume (the final guard)."""
    out = tmp_path / "run"
    assert _hmc(out, *SETTINGS, "hmc.trajectories=4") == 0
    text = (out / RUN_CONFIG).read_text().replace("beta = 2.5", "beta = 3.0")
    (out / RUN_CONFIG).write_text(text)
    capsys.readouterr()
    assert _hmc(out, "hmc.trajectories=6", resume=True) == 1
    assert "fingerprint" in capsys.readouterr().err


def test_print_config_on_resume_shows_the_stored_configuration(tmp_path, capsys):
    out = tmp_path / "run"
    assert _hmc(out, *SETTINGS, "hmc.trajectories=4") == 0
    capsys.readouterr()
    assert main(["hmc", "--set", f"out={out}", "--resume", "--print-config"]) == 0
    printed = _config.parse_toml(capsys.readouterr().out)
    assert printed["action"]["beta"] == 2.5 and printed["seed"] == 11 and printed["lattice"] == [6, 6]


def test_sample_resume_without_the_set_values(tmp_path, capsys):
    """The same for `flowplug sample` (no flow: HMC on [action] and lattice)."""
    settings = _sets(
        "action.name=phi4",
        "action.m2=-4.0",
        "action.lam=8.0",
        "lattice=[4,4]",
        "chains=2",
        "thermalize=1",
        "seed=3",
        "kernel.hmc.steps=3",
    )

    def sample(out: Path, *extra: str, resume: bool = False) -> int:
        return main(["sample", "--out", str(out), "--no-progress", *extra] + (["--resume"] if resume else []))

    assert sample(tmp_path / "full", *settings, "--set", "steps=6") == 0
    assert sample(tmp_path / "part", *settings, "--set", "steps=3") == 0
    assert sample(tmp_path / "part", "--set", "steps=6", resume=True) == 0
    a = (tmp_path / "full" / "measurements.csv").read_text()
    assert a == (tmp_path / "part" / "measurements.csv").read_text()
    capsys.readouterr()
    assert sample(tmp_path / "part", "--set", "steps=8", "--set", "action.lam=7.0", resume=True) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "action.lam: stored 8.0, given 7.0" in err


def test_chain_key_differences():
    stored = {"seed": 1, "steps": 10, "action": {"beta": 2.0, "kappa": 0.2}, "kernel": {"options": {"a": 1}}}
    given = {"seed": 1, "steps": 20, "action": {"beta": 2, "kappa": 0.2}, "kernel": {"options": {"b": 1}}}
    # 2 and 2.0 are different TOML values (and fingerprints); a missing key is None
    assert chain_key_differences(stored, given, ignore=["steps"]) == [
        ("action.beta", 2.0, 2),
        ("kernel.options.a", 1, None),
        ("kernel.options.b", None, 1),
    ]
    assert chain_key_differences(stored, given, ignore=["steps", "action", "kernel.options"]) == []
    assert chain_key_differences({"a": 1}, {}, omit_defaults={"pion_t": 1}) == [("a", 1, None)]
    assert chain_key_differences({}, {"pion_t": 1}, omit_defaults={"pion_t": 1}) == []
    assert chain_key_differences({}, {"pion_t": 2}, omit_defaults={"pion_t": 1}) == [("pion_t", 1, 2)]


def test_float_values_compare_as_the_fingerprint_writes_them(tmp_path):
    """A stored nan is the same value as a given nan (the fingerprint, which writes floats with
    repr, agrees: the resume goes on), while -0.0 and 0.0 differ (different fingerprints too):
    the refusal names the key instead of the fingerprint's unnamed mismatch."""
    import math

    from flowplug.jobs.provenance import write_run_config

    cfg = {"seed": 1, "action": {"name": "x", "theta": math.nan}, "kernel": {"options": {"eps": -0.0}}}
    write_run_config(tmp_path, cfg)
    check_resume_config(tmp_path, cfg)  # nothing changed
    assert fingerprint(cfg) == fingerprint(stored_run_config(tmp_path))  # type: ignore[arg-type]
    other = {"seed": 1, "action": {"name": "x", "theta": math.nan}, "kernel": {"options": {"eps": 0.0}}}
    assert fingerprint(other) != fingerprint(cfg)
    with pytest.raises(CheckpointError, match=r"kernel\.options\.eps: stored -0\.0, given 0\.0"):
        check_resume_config(tmp_path, other)


def test_resume_configuration_merges_over_the_stored_one(tmp_path):
    assert resume_configuration(tmp_path, DEFAULT_CONFIG) is None  # no config.toml: the caller's defaults
    cfg = _config.build_config(
        DEFAULT_CONFIG, overrides=["action.kappa=0.3", "action.name=schwinger", "seed=4"], open_tables=("action",)
    )
    (tmp_path / RUN_CONFIG).write_text(_config.dumps(cfg))
    got = resume_configuration(tmp_path, DEFAULT_CONFIG, overrides=["hmc.trajectories=7"], open_tables=("action",))
    assert got is not None
    assert got["seed"] == 4 and got["action"]["kappa"] == 0.3 and got["hmc"]["trajectories"] == 7
    check_resume_config(tmp_path, got, ignore=["hmc.trajectories"])  # nothing else changed
    with pytest.raises(CheckpointError, match="action.kappa: stored 0.3, given 0.25"):
        check_resume_config(tmp_path, {**got, "action": {**got["action"], "kappa": 0.25}}, ignore=["hmc.trajectories"])


def test_added_keys_keep_the_fingerprints_of_earlier_runs():
    base = _config.build_config(DEFAULT_CONFIG)
    assert run_fingerprint(base) == "19c0800e24c26676"  # flowplug 0.1's value: pion_t = 1 is left out
    assert run_fingerprint({**base, "pion_t": 2}) != run_fingerprint(base)
    without = {k: v for k, v in base.items() if k != "pion_t"}
    assert fingerprint(without, omit_defaults={"pion_t": 1}) == fingerprint(base, omit_defaults={"pion_t": 1})


def test_resample_resume_without_the_set_values(tmp_path, capsys):
    """The same for `flowplug resample` (no flow: HMC on [action], seeded by a file)."""
    import torch

    from flowplug import io

    g = torch.Generator().manual_seed(0)
    links = 0.5 * torch.randn((2, 2, 4, 4), generator=g, dtype=torch.float64)
    src = tmp_path / "in.h5"
    io.write(src, io.Ensemble(links, field="u1"), "hdf5")
    settings = _sets("action.name=wilson", "action.group=u1", "action.beta=2.0", "kernel.type=hmc", "seed=5")

    def resample(out: Path, *extra: str, resume: bool = False) -> int:
        args = ["resample", str(src), "--out", str(out), "--no-progress", *extra]
        return main(args + (["--resume"] if resume else []))

    assert resample(tmp_path / "full", *settings, "--set", "steps=6") == 0
    assert resample(tmp_path / "part", *settings, "--set", "steps=3") == 0
    assert resample(tmp_path / "part", "--set", "steps=6", resume=True) == 0
    assert (tmp_path / "full" / "measurements.csv").read_text() == (tmp_path / "part" / "measurements.csv").read_text()
    capsys.readouterr()
    assert resample(tmp_path / "part", "--set", "steps=8", "--set", "kernel.hmc.steps=5", resume=True) == 1
    assert "kernel.hmc.steps: stored 10, given 5" in " ".join(capsys.readouterr().err.split())
