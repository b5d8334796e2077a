"""Deterministic tests of the HMC kernel, the kernel/state interface and the chain driver.

Reversibility, dH ~ eps^2 for both integrators, links on the group, Metropolis
bookkeeping, checkpoint/resume identity. Statistical validation against exact values
is in ``tests/test_hmc_validation.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from flowplug.chain import Chain, ChainState
from flowplug.errors import CheckpointError, ConfigError
from flowplug.gauge import determinant_deviation, unitarity_deviation
from flowplug.manager import new_plugin_manager
from flowplug.measure import measurement
from flowplug.plugins.hmc import HMC
from flowplug.plugins.theories import Phi4Action, WilsonGaugeAction

THEORIES = [
    pytest.param(WilsonGaugeAction(2.0, "u1"), (8, 8), id="u1-2d"),
    pytest.param(WilsonGaugeAction(1.0, "u1"), (4, 4, 4), id="u1-3d"),
    pytest.param(WilsonGaugeAction(2.0, "su2"), (4, 4), id="su2-2d"),
    pytest.param(WilsonGaugeAction(5.5, "su3"), (2, 2, 2, 2), id="su3-4d"),
    pytest.param(Phi4Action(-4.0, 8.0), (8, 8), id="phi4-2d"),
]


def start(act, lattice, batch, seed):
    x = act.hot_start(lattice, batch, generator=torch.Generator().manual_seed(seed))
    return 0.3 * x if act.field == "scalar" else x


@pytest.mark.parametrize("integrator", ["leapfrog", "omelyan"])
@pytest.mark.parametrize("act,lattice", THEORIES)
def test_reversibility(act, lattice, integrator):
    """Forward trajectory, momentum flip, forward again: back to the start to 1e-10."""
    k = HMC(act, integrator=integrator, steps=8, trajectory_length=1.0)
    x = start(act, lattice, 4, 1)
    p = k.space.momenta(x, torch.Generator().manual_seed(2))
    x1, p1 = k.integrate(x, p)
    assert k.space.distance(x1, x).max() > 1e-2  # it did move
    x2, p2 = k.integrate(x1, -p1)
    assert k.space.distance(x2, x).max() < 1e-10
    assert (p2 + p).abs().max() < 1e-10


@pytest.mark.parametrize("act,lattice", THEORIES)
def test_dh_scales_as_eps_squared(act, lattice):
    """rms dH over a fixed trajectory drops 4x when eps halves; Omelyan's coefficient is smaller."""
    x = start(act, lattice, 8, 3)
    rms = {}
    for integ in ("leapfrog", "omelyan"):
        for n in (16, 32):
            k = HMC(act, integrator=integ, steps=n, trajectory_length=1.0)
            p = k.space.momenta(x, torch.Generator().manual_seed(4))
            x1, p1 = k.integrate(x, p)
            dh = k.hamiltonian(x1, p1) - k.hamiltonian(x, p)
            rms[integ, n] = dh.pow(2).mean().sqrt().item()
        ratio = rms[integ, 16] / rms[integ, 32]
        assert 3.6 < ratio < 4.4, (integ, rms)
    assert rms["omelyan", 16] < 0.3 * rms["leapfrog", 16]


@pytest.mark.parametrize("group", ["su2", "su3"])
def test_links_stay_on_group_without_reunitarisation(group):
    act = WilsonGaugeAction(3.0, group)
    k = HMC(act, integrator="omelyan", steps=4, trajectory_length=1.0)
    g = torch.Generator().manual_seed(5)
    state = k.init(act.hot_start((4, 4), 4, generator=g))
    for _ in range(60):
        state, info = k.step(state, g)
    assert unitarity_deviation(state.x).max() < 1e-12
    assert determinant_deviation(state.x).max() < 1e-12


def test_u1_angles_are_wrapped():
    act = WilsonGaugeAction(1.0, "u1")
    k = HMC(act, steps=5)
    g = torch.Generator().manual_seed(6)
    state = k.init(act.hot_start((6, 6), 8, generator=g))
    for _ in range(5):
        state, _ = k.step(state, g)
    assert (state.x > -math.pi).all() and (state.x <= math.pi).all()


def test_metropolis_bookkeeping():
    """Rejected chains keep x and log p exactly; accepted ones take the proposal; log p = -S(x)."""
    act = WilsonGaugeAction(2.0, "u1")
    k = HMC(act, steps=3, trajectory_length=1.0)  # coarse from a cold start: many rejections
    g = torch.Generator().manual_seed(7)
    state = k.init(act.cold_start((6, 6), 64))
    new, info = k.step(state, g)
    acc = info["accepted"]
    assert 0 < int(acc.sum()) < 64
    assert torch.equal(new.x[~acc], state.x[~acc])
    assert torch.equal(new.log_p[~acc], state.log_p[~acc])
    assert not torch.equal(new.x[acc], state.x[acc])
    torch.testing.assert_close(new.log_p, -act.action(new.x), rtol=0, atol=1e-10)
    assert info["delta_h"].dtype == torch.float64
    # acceptance test: accepted exactly where log u < -dH, with u the generator's next draw
    g2 = torch.Generator().manual_seed(7)
    _ = k.space.momenta(state.x, g2)
    u = torch.rand(64, generator=g2, dtype=torch.float64)
    assert torch.equal(acc, torch.log(u) < -info["delta_h"])


def test_state_extras_dropped_when_moved():
    x = torch.zeros(3, 2)
    s = ChainState(x, torch.zeros(3), {"log_q": torch.tensor([1.0, 2.0, 3.0])})
    acc = torch.tensor([True, False, True])
    moved = s.moved(acc, torch.ones(3, 2), torch.ones(3))
    assert "log_q" not in moved.extras
    kept = s.moved(torch.zeros(3, dtype=torch.bool), torch.ones(3, 2), torch.ones(3))
    assert torch.equal(kept.extras["log_q"], s.extras["log_q"])
    both = s.moved(acc, torch.ones(3, 2), torch.ones(3), {"log_q": torch.tensor([9.0, 9.0, 9.0])})
    assert both.extras["log_q"].tolist() == [9.0, 2.0, 9.0]


def test_bad_settings():
    act = Phi4Action()
    with pytest.raises(ConfigError, match="integrator"):
        HMC(act, integrator="verlet")
    with pytest.raises(ConfigError, match="steps"):
        HMC(act, steps=0)
    with pytest.raises(ConfigError, match="trajectory_length"):
        HMC(act, trajectory_length=-1)


def test_kernel_registered():
    pm = new_plugin_manager(autoload=False)
    spec = pm.registry("kernel").get("hmc")
    k = spec.factory(Phi4Action(), integrator="omelyan", steps=3)
    assert isinstance(k, HMC) and k.step_size == pytest.approx(1 / 3)


def _chain(seed=11, run_id="r"):
    act = WilsonGaugeAction(2.0, "su2")
    k = HMC(act, integrator="omelyan", steps=3, trajectory_length=0.7)
    g = torch.Generator().manual_seed(seed)
    x = act.hot_start((4, 4), 3, generator=g)
    return Chain(k, k.init(x), g, measure=measurement("su2", ["plaquette"]), run_id=run_id)


def test_chain_resume_is_identical(tmp_path):
    full = _chain().run(10)
    part = _chain()
    part.run(4, checkpoint_every=4, on_checkpoint=lambda c: c.save(tmp_path / "ck.pt"))
    resumed = _chain(seed=999)  # different generator state: the checkpoint must restore it
    resumed.load(tmp_path / "ck.pt")
    assert resumed.step_count == 4
    resumed.run(6)
    assert torch.equal(resumed.state.x, full.state.x)
    a, b = resumed.history_tensors(), full.history_tensors()
    assert a.keys() == b.keys() == {"accepted", "delta_h", "plaquette"}
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_chain_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        _chain().load(tmp_path / "missing.pt")
    c = _chain(run_id="one").run(2)
    c.save(tmp_path / "ck.pt")
    with pytest.raises(CheckpointError, match="different run"):
        _chain(run_id="two").load(tmp_path / "ck.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        _chain().load(tmp_path / "junk.pt")


def test_chain_events_and_progress(capsys):
    calls = []

    class Recorder:
        def flowplug_after_chain_step(self, step, kernel, info):
            calls.append((step, kernel, float(info["observables"]["plaquette"].mean())))

    _chain().run(3, hooks=Recorder(), progress=True)
    assert [c[0] for c in calls] == [0, 1, 2] and calls[0][1] == "hmc"
    assert "plaq" in capsys.readouterr().err
