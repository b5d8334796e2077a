"""One writer per run directory (``flowplug.fsutil.run_lock``), and runs that would do nothing.

A second process holds the lock (it waits on its stdin, so nothing here sleeps or
depends on wall time); every command that writes a run directory must then exit 1 and
name the holder, before it reads or writes anything. A lock file left by a dead process
never blocks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flowplug.cli import main
from flowplug.errors import RunLockedError
from flowplug.fsutil import LOCK_NAME, locked_run, run_lock

HOLDER = """
import sys
from flowplug.fsutil import run_lock
with run_lock(sys.argv[1], "holder-test"):
    print("locked", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def held(tmp_path):
    """A run directory locked by another live process (released when the test ends)."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    yield out, proc
    if proc.poll() is None:
        proc.stdin.close()
        proc.wait()


COMMANDS = {
    "hmc": lambda out: [
        "hmc",
        "--set",
        f"out={out}",
        "--set",
        "lattice=[4,4]",
        "--set",
        "hmc.trajectories=3",
        "--set",
        "hmc.thermalization=0",
        "--no-progress",
    ],
    "train": lambda out: ["train", "--set", f"out={out}", "--set", "train.steps=1", "--no-progress"],
    "sample": lambda out: ["sample", "--flow", str(out.parent / "no-such-flow"), "--out", str(out)],
    "resample": lambda out: [
        "resample",
        str(out.parent / "no-such.h5"),
        "--flow",
        str(out.parent / "no-such-flow"),
        "--out",
        str(out),
    ],
    "demo": lambda out: ["demo", "--out", str(out)],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_second_writer_is_refused_naming_the_holder(held, command, capsys):
    out, proc = held
    before = sorted(p.name for p in out.iterdir())
    assert main(COMMANDS[command](out)) == 1
    err = " ".join(capsys.readouterr().err.split())  # the message is wrapped for the terminal
    assert "another flowplug process is writing this run directory" in err
    assert f"holder-test pid={proc.pid}" in err
    assert sorted(p.name for p in out.iterdir()) == before == [LOCK_NAME]


def test_lock_of_a_dead_process_does_not_block(held):
    out, proc = held
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / LOCK_NAME).exists()  # the file stays; the lock went with the process
    with run_lock(out, "next") as path:
        assert f"next pid={os.getpid()}" in path.read_text()


def test_lock_is_released_and_reentrant_in_one_process(tmp_path):
    out = tmp_path / "run"
    with run_lock(out, "outer"):
        with run_lock(out, "inner"):  # the same process: a job calling another job
            pass
        probe = subprocess.run([sys.executable, "-c", HOLDER, str(out)], input="", capture_output=True, text=True)
        assert probe.returncode != 0 and "RunLockedError" in probe.stderr
    probe = subprocess.run([sys.executable, "-c", HOLDER, str(out)], input="", capture_output=True, text=True)
    assert probe.returncode == 0 and probe.stdout.strip() == "locked"


def test_locked_run_decorator(held, tmp_path):
    out, _ = held

    @locked_run("job", lambda a: a["where"])
    def job(where: Path | None, value: int = 1) -> int:
        return value

    with pytest.raises(RunLockedError, match="holder-test"):
        job(out)
    assert job(tmp_path / "free", value=3) == 3
    assert job(None) == 1


@pytest.mark.parametrize("traj,therm", [(5, 5), (3, 10), (0, 0)])
def test_hmc_refuses_a_run_that_measures_nothing(tmp_path, capsys, traj, therm):
    rc = main(
        [
            "hmc",
            "--set",
            f"out={tmp_path / 'o'}",
            "--set",
            f"hmc.trajectories={traj}",
            "--set",
            f"hmc.thermalization={therm}",
            "--no-progress",
        ]
    )
    assert rc == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"hmc.trajectories = {traj} leaves nothing after hmc.thermalization = {therm}" in err
    assert not (tmp_path / "o").exists()  # the refused run leaves no empty directory behind


def test_lock_removes_only_an_empty_directory_it_created(tmp_path):
    made = tmp_path / "made"
    with run_lock(made, "job"):
        assert (made / ".flowplug.lock").exists()
    assert not made.exists()
    with run_lock(made, "job"):
        (made / "summary.json").write_text("{}")
    assert (made / "summary.json").exists() and (made / ".flowplug.lock").exists()
    given = tmp_path / "given"
    given.mkdir()
    with run_lock(given, "job"):
        pass
    assert given.is_dir()
