"""Conjugate-gradient iteration counts of fermion HMC runs (``summary.json`` ``cg``) and the
time separation ``pion_t`` of the pion observables of ``flowplug hmc``.

Checks: the per-trajectory, per-chain counts of :class:`flowplug.jobs.hmc.CGCounting` add up
to the action's own tally of every solve (plain and Hasenbusch-preconditioned actions) and
leave the chain unchanged; ``summary.json`` ``cg`` of an ``hmc`` run (and of a resumed one:
the same as uninterrupted); NaN rows for trajectories before a resume from an old checkpoint;
``pion_t`` reaches the measured pion effective mass and is validated against the lattice.
"""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import torch

from flowplug import config as _config
from flowplug.chain import Chain
from flowplug.errors import ConfigError
from flowplug.jobs.hmc import DEFAULT_CONFIG, OPEN_TABLES, CGCounting, observable_options, run_hmc
from flowplug.jobs.summary import cg_summary
from flowplug.manager import registry
from flowplug.plugins.fermion_actions import PseudofermionAction, pion_effective_mass

pytestmark = pytest.mark.filterwarnings("ignore::flowplug.jobs.summary.ShortChainWarning")


def _kernel(action):
    return registry("kernel").get("hmc").factory(action, integrator="omelyan", steps=3, trajectory_length=0.5)


def _start(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.5 * torch.randn((batch, 2, 4, 4), generator=g, dtype=torch.float64)


@pytest.mark.parametrize("options", [{}, {"hasenbusch_kappa": 0.15}])
def test_counts_per_trajectory_and_chain_add_up_to_every_solve(options):
    action = PseudofermionAction(2.0, 0.2, "u1", **options)
    kernel = _kernel(action)
    x0 = _start()
    counted = Chain(CGCounting(kernel, action), kernel.init(x0), torch.Generator().manual_seed(3))
    action.reset_cg_counts()
    counted.run(4)
    h = counted.history_tensors()["cg_iterations"]
    assert h.shape == (4, 2) and torch.all(h > 0)
    # the action's own tally (batch sums over every solve, every term) is the same total
    assert int(h.sum()) == sum(it for _, it in action.cg_counts.values())
    # the count does not touch the chain: the same states as without it
    plain = Chain(kernel, kernel.init(x0), torch.Generator().manual_seed(3))
    plain.run(4)
    assert torch.equal(plain.state.x, counted.state.x)
    assert torch.equal(plain.history_tensors()["delta_h"], counted.history_tensors()["delta_h"])


def test_a_step_whose_solves_are_of_sub_batches_has_no_count_not_zero():
    """A mixture steps sub-batches of the chains: their solves restart the action's tally, so
    the step's count per chain is lost; CGCounting records NaN (left out of cg_summary and
    counted in trajectories_without_count), never 0 iterations for a step that solved."""
    from flowplug.plugins.kernels import Mixture

    action = PseudofermionAction(2.0, 0.2, "u1")
    kernel = Mixture([_kernel(action), _kernel(action)], [0.5, 0.5])
    x0 = _start(batch=4)
    chain = Chain(CGCounting(kernel, action), kernel.init(x0), torch.Generator().manual_seed(3))
    chain.run(4)
    h = chain.history_tensors()["cg_iterations"]
    choice_split = torch.isnan(h).any(1)
    assert bool(choice_split.any())  # some step gave the chains to both kernels
    assert torch.isnan(h[choice_split]).all() and not bool((h == 0).any())
    assert bool((h[~choice_split] > 0).all())  # a step whose chains all used one kernel is counted
    s = cg_summary(h.numpy())
    assert s["trajectories_without_count"] == 4 * int(choice_split.sum())


def test_cg_summary():
    h = np.array([[10.0, 12.0], [np.nan, np.nan], [11.0, 30.0]])
    s = cg_summary(h)
    assert s == {
        "iterations": 63,
        "trajectories": 4,
        "per_trajectory": {"mean": 63 / 4, "max": 30.0},
        "trajectories_without_count": 2,
    }
    empty = cg_summary(np.full((2, 1), np.nan))
    assert empty["iterations"] == 0 and math.isnan(empty["per_trajectory"]["mean"])


def _cfg(tmp_path, *extra, name="run"):
    sets = [
        f"out={tmp_path / name}",
        "progress=false",
        "lattice=[4, 6]",
        "chains=2",
        "action.name=schwinger",
        "action.beta=2.0",
        "action.kappa=0.2",
        "hmc.thermalization=1",
        "hmc.steps=3",
        "hmc.trajectory_length=0.5",
        "format=none",
        *extra,
    ]
    return _config.build_config(DEFAULT_CONFIG, overrides=sets, open_tables=OPEN_TABLES)


def _history(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}


def test_hmc_summary_has_cg_counts_and_a_resume_keeps_them(tmp_path):
    full = run_hmc(_cfg(tmp_path, "hmc.trajectories=4", name="full"))
    cg = full["cg"]
    h = _history(tmp_path / "full" / "measurements.h5")["cg_iterations"]
    assert h.shape == (4, 2) and np.all(h > 0)
    assert cg["iterations"] == int(h.sum()) and cg["trajectories"] == 8
    assert cg["per_trajectory"]["max"] == h.max() and cg["per_trajectory"]["mean"] == pytest.approx(h.mean())
    assert "cg_iterations" not in full["observables"]  # bookkeeping, not an observable
    written = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert written["cg"] == cg
    run_hmc(_cfg(tmp_path, "hmc.trajectories=2", name="part"))
    resumed = run_hmc(_cfg(tmp_path, "hmc.trajectories=4", name="part"), resume=True)
    assert resumed["cg"] == cg  # counted across the resume, from the checkpointed history


def test_pure_gauge_runs_have_no_cg_entry(tmp_path):
    cfg = _config.build_config(
        DEFAULT_CONFIG,
        overrides=[f"out={tmp_path / 'g'}", "progress=false", "lattice=[4,4]", "chains=1", "hmc.trajectories=3"]
        + ["hmc.thermalization=1", "format=none"],
    )
    assert "cg" not in run_hmc(cfg)


def test_history_entry_first_reported_after_a_resume_is_nan_before():
    """A checkpoint of an earlier version has no cg_iterations: the steps before the resume get
    NaN (every history entry keeps one row per step; cg_summary counts them apart)."""
    action = PseudofermionAction(2.0, 0.2, "u1")
    kernel = _kernel(action)
    old = Chain(kernel, kernel.init(_start()), torch.Generator().manual_seed(1))
    old.run(2)
    state = old.state_dict()
    new = Chain(CGCounting(kernel, action), kernel.init(_start()), torch.Generator().manual_seed(1))
    new.load_state_dict(state)
    new.run(2)
    h = new.history_tensors()
    assert h["cg_iterations"].shape == h["accepted"].shape == (4, 2)
    assert torch.isnan(h["cg_iterations"][:2]).all() and (h["cg_iterations"][2:] > 0).all()
    assert cg_summary(h["cg_iterations"])["trajectories_without_count"] == 4


def test_pion_t_sets_the_separation_of_the_measured_effective_mass(tmp_path):
    out = run_hmc(_cfg(tmp_path, "hmc.trajectories=2", "pion_t=2", 'format="hdf5"', name="t2"))
    assert out["pion_t"] == 2
    # the last measured value equals the effective mass at t = 2 of the last configurations
    from flowplug import io

    (last,) = sorted((tmp_path / "t2" / "ensemble").glob("*.h5"))[-1:]
    links = io.read(last).links
    h = _history(tmp_path / "t2" / "measurements.h5")["pion_effective_mass"]
    torch.testing.assert_close(
        torch.as_tensor(h[-1]), pion_effective_mass(links.to(torch.float64), 0.2, t=2), rtol=1e-9, atol=0
    )
    assert not np.allclose(h[-1], pion_effective_mass(links.to(torch.float64), 0.2, t=1).numpy())


def test_pion_t_is_validated_against_the_time_extent():
    names = ["plaquette", "pion_effective_mass"]
    assert observable_options({}, names, [4, 6]) == {"pion_effective_mass": {"t": 1}}
    assert observable_options({"pion_t": 2}, names, [4, 6]) == {"pion_effective_mass": {"t": 2}}
    assert observable_options({"pion_t": 9}, ["plaquette"], [4, 6]) == {}  # no pion observable measured
    with pytest.raises(ConfigError, match=r"pion_t = 3: pion_effective_mass needs 0 <= pion_t <= 2 .*T = 6"):
        observable_options({"pion_t": 3}, names, [4, 6])
    with pytest.raises(ConfigError, match=r"0 <= pion_t <= 5"):
        observable_options({"pion_t": 6}, ["pion_correlator"], [4, 6])
    with pytest.raises(ConfigError, match="integer"):
        observable_options({"pion_t": 1.5}, names, [4, 6])
    with pytest.raises(ConfigError, match="pion_t = -1"):
        observable_options({"pion_t": -1}, names, [4, 6])


def test_sample_records_cg_counts_and_pion_t(tmp_path):
    """`flowplug sample` (hmc kernel, Schwinger action) has ``cg`` and ``pion_t`` in its summary;
    the counts equal a recount of the same chain's solves through the kernel's history."""
    from flowplug.jobs.output import read_measurements
    from flowplug.jobs.sample import DEFAULT_CONFIG as SAMPLE_CONFIG
    from flowplug.jobs.sample import OPEN_TABLES as SAMPLE_TABLES
    from flowplug.jobs.sample import run_sample

    sets = [
        "lattice=[4,4]",
        "chains=2",
        "steps=3",
        "thermalize=1",
        "progress=false",
        'action.name="schwinger"',
        "action.kappa=0.2",
        "action.beta=2.0",
        "kernel.hmc.steps=3",
        "pion_t=1",
    ]
    out = tmp_path / "s"
    summary = run_sample(_config.build_config(SAMPLE_CONFIG, overrides=sets, open_tables=SAMPLE_TABLES), None, out)
    assert summary["pion_t"] == 1
    cg = summary["cg"]
    counts = read_measurements(out / "measurements.csv")["cg_iterations"]
    assert counts.shape == (3, 2) and np.all(counts > 0)
    assert cg["trajectories"] == 6 and cg["iterations"] == int(counts.sum())
    assert cg["per_trajectory"]["max"] == float(counts.max())
    with pytest.raises(ConfigError, match="pion_t = 2"):
        run_sample(
            _config.build_config(SAMPLE_CONFIG, overrides=[*sets, "pion_t=2"], open_tables=SAMPLE_TABLES),
            None,
            tmp_path / "bad",
        )
