"""Exactness of the samplers on a CUDA device: Markov chains run there against exact torus values.

Skipped unless a CUDA device is present (CI has none; ``benchmarks/gpu_run.sh`` runs this
module on a lent GPU machine). ``FLOWPLUG_TEST_DEVICE=cpu`` runs it on the CPU instead,
to check the tests themselves (about a minute).

Every chain, its random numbers and its accept/reject decisions live on the device; the
estimates must agree with the exact values of 2D U(1) and SU(2) Wilson gauge theory on the
torus (:mod:`flowplug.exact`; Rusakov, Mod. Phys. Lett. A 5 (1990) 693; Bonati and
Rossi, arXiv:1901.09830) within 3 Gamma-method sigma (:func:`flowplug.stats.gamma_method`,
many independent chains, fixed seeds). A poor flow may cost acceptance, never correctness,
so the flows here are untrained (random weights).
"""

from __future__ import annotations

import os

import pytest
import torch

from flowplug.chain import Chain
from flowplug.exact import su2_2d, u1_2d
from flowplug.flow import build_flow
from flowplug.plugins.heatbath import HeatbathOR
from flowplug.plugins.hmc import HMC
from flowplug.plugins.kernels import FlowHMC, IndependenceMetropolis
from flowplug.plugins.observables import plaquette, topological_charge
from flowplug.plugins.theories import WilsonGaugeAction
from flowplug.stats import gamma_method

SIGMA = 3.0
_CHOICE = os.environ.get("FLOWPLUG_TEST_DEVICE", "")
if not _CHOICE and not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (or FLOWPLUG_TEST_DEVICE=cpu)", allow_module_level=True)
DEVICE = torch.device(_CHOICE or "cuda")


def _u1_measure(x):
    return {"plaquette": plaquette(x), "q2": topological_charge(x) ** 2}


def _check(chain: Chain, exact: dict[str, float], burn: int, names: tuple[str, ...]) -> None:
    h = chain.history_tensors()
    for name in names:
        r = gamma_method(h[name][burn:].cpu(), step_axis=0)
        dev = (r.mean - exact[name]) / r.error
        assert abs(dev) < SIGMA, f"{name}: {r.mean:.5f} +- {r.error:.5f} vs exact {exact[name]:.6f} ({dev:+.1f} sigma)"
        # an error this small means the test can fail: a bias of a few percent would show
        assert r.error < 0.05 * max(abs(exact[name]), 0.1), f"{name}: error {r.error} too large to test anything"


def _random_flow(lattice, layer, n_layers, seed, noise=0.3):
    torch.manual_seed(seed)
    flow = build_flow("u1", lattice, layer, n_layers=n_layers, options={"hidden": [4], "dtype": "float64"})
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(noise * torch.randn_like(p))
    return flow.eval().to(DEVICE)


def _hmc_start(act, lattice, batch, g, n=30):
    hmc = HMC(act, integrator="omelyan", steps=4)
    st = hmc.init(act.cold_start(lattice, batch).to(DEVICE))
    for _ in range(n):
        st, _ = hmc.step(st, g)
    return st.x


def test_hmc_u1_on_the_device_is_exact():
    """2D U(1), L = 6, beta = 2: 512 HMC chains from a cold start, 150 trajectories, 50 dropped."""
    L, beta = 6, 2.0
    act = WilsonGaugeAction(beta, "u1")
    g = torch.Generator(device=DEVICE).manual_seed(11)
    hmc = HMC(act, integrator="omelyan", steps=6)
    chain = Chain(hmc, hmc.init(act.cold_start((L, L), 512).to(DEVICE)), g, measure=_u1_measure)
    chain.run(150)
    assert chain.state.x.device.type == DEVICE.type
    acc = float(chain.history_tensors()["accepted"].mean())
    assert 0.5 < acc <= 1.0
    _check(chain, u1_2d(L, beta), 50, ("plaquette", "q2"))


def test_independence_metropolis_with_a_random_flow_on_the_device_is_exact():
    """2D U(1), L = 4, beta = 1: a random-weight u1-ncp flow, 2048 chains from HMC configurations, 400 steps."""
    L, beta = 4, 1.0
    act = WilsonGaugeAction(beta, "u1")
    flow = _random_flow((L, L), "u1-ncp", 2, seed=7, noise=0.1)
    k = IndependenceMetropolis(flow, act)
    g = torch.Generator(device=DEVICE).manual_seed(2)
    chain = Chain(k, k.init(_hmc_start(act, (L, L), 2048, g)), g, measure=_u1_measure)
    chain.run(400)
    acc = float(chain.history_tensors()["accepted"].mean())
    assert 0.01 < acc < 0.9  # a poor flow: some proposals rejected, some accepted
    _check(chain, u1_2d(L, beta), 0, ("plaquette", "q2"))


def test_flow_hmc_with_a_random_flow_on_the_device_is_exact():
    """2D U(1), L = 4, beta = 1: HMC in the latent space of a random-weight flow, 256 chains, 150 steps."""
    L, beta = 4, 1.0
    act = WilsonGaugeAction(beta, "u1")
    flow = _random_flow((L, L), "u1-ncp", 2, seed=9)
    k = FlowHMC(flow, act, steps=4, trajectory_length=1.0)
    g = torch.Generator(device=DEVICE).manual_seed(3)
    chain = Chain(k, k.init(_hmc_start(act, (L, L), 256, g)), g, measure=_u1_measure)
    chain.run(150)
    _check(chain, u1_2d(L, beta), 20, ("plaquette",))


def test_heatbath_su2_on_the_device_is_exact():
    """2D SU(2), 8 x 8, beta = 4: heatbath with 2 overrelaxation sweeps, 64 hot chains, 60 sweeps, 10 dropped."""
    beta = 4.0
    act = WilsonGaugeAction(beta, "su2")
    g = torch.Generator(device=DEVICE).manual_seed(7)
    kernel = HeatbathOR(act, overrelax=2)
    start = act.hot_start((8, 8), 64, generator=g, device=DEVICE)
    chain = Chain(kernel, kernel.init(start), g, measure=lambda x: {"plaquette": plaquette(x)})
    chain.run(60)
    _check(chain, su2_2d(8, beta), 10, ("plaquette",))


def test_history_recorded_on_the_device_reads_back_on_the_cpu_across_a_checkpoint():
    """Rows are recorded on the device and moved to the CPU when read (no copy per step); a
    chain restored from a checkpoint (CPU rows) and run on (device rows) gives the history of
    the uninterrupted chain."""
    act = WilsonGaugeAction(1.0, "u1")
    hmc = HMC(act, integrator="omelyan", steps=3)

    def fresh():
        g = torch.Generator(device=DEVICE).manual_seed(5)
        return Chain(hmc, hmc.init(act.cold_start((4, 4), 8).to(DEVICE)), g, measure=_u1_measure)

    whole = fresh().run(12)
    part = fresh().run(5)
    saved = part.state_dict()
    assert all(v.device.type == "cpu" for v in saved["history"].values())
    resumed = fresh()
    resumed.load_state_dict(saved)
    resumed.run(7)
    a, b = whole.history_tensors(), resumed.history_tensors()
    assert a.keys() == b.keys() and all(v.device.type == "cpu" and v.shape[0] == 12 for v in b.values())
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_propose_on_the_device_gives_the_cpu_log_densities(tmp_path, capsys):
    """``flowplug propose --device``: log q of the current configuration (the inverse flow, no
    random numbers) is the CPU's to float64 rounding of a float32 network."""
    import json

    from flowplug import io
    from flowplug.cli import main
    from flowplug.train import build_trainer

    cfg = {
        "lattice": [4, 4],
        "seed": 0,
        "device": "cpu",
        "action": {"name": "wilson", "group": "u1", "beta": 1.0},
        "flow": {"layers": ["u1-ncp"], "n_layers": 2, "options": {"hidden": [4], "dtype": "float64"}},
        "train": {"steps": 0, "batch_size": 8, "progress": False, "checkpoint_every": 0},
    }
    flow = build_trainer(cfg, out=tmp_path / "run").save_checkpoint(tmp_path / "flow.pt")
    act = WilsonGaugeAction(1.0, "u1")
    io.write(tmp_path / "c.h5", io.Ensemble(act.hot_start((4, 4), 1, generator=torch.Generator().manual_seed(3))))
    lines = []
    for dev, name in (("cpu", "a.h5"), (str(DEVICE), "b.h5")):
        args = ["propose", "--flow", str(flow), "--current", str(tmp_path / "c.h5"), "--out", str(tmp_path / name)]
        assert main([*args, "--seed", "4", "--device", dev]) == 0
        lines.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    a, b = lines
    assert abs(a["log_q_current"] - b["log_q_current"]) < 1e-9 * max(1.0, abs(a["log_q_current"]))
    assert abs(a["log_p_current"] - b["log_p_current"]) < 1e-9 * max(1.0, abs(a["log_p_current"]))
    assert io.read(tmp_path / "b.h5").links.shape == io.read(tmp_path / "c.h5").links.shape


def test_train_sample_resample_and_hmc_jobs_run_on_the_device(tmp_path):
    """The commands end to end with ``device`` set: train a tiny U(1) flow, sample with it,
    resample the sample's configurations, and an HMC run; each summary names the device."""
    import json

    from flowplug.cli import main

    dev = str(DEVICE)
    flow = tmp_path / "flow"
    common = ["--set", "action.name=wilson", "--set", "action.group=u1", "--set", "action.beta=1.0"]
    train = ["train", *common, "--set", "lattice=[4, 4]", "--set", 'flow.layers=["u1-ncp"]', "--set", "flow.n_layers=2"]
    train += ["--set", "train.steps=3", "--set", "train.batch_size=16", "--set", "eval.samples=64"]
    assert main([*train, "--set", f'device="{dev}"', "--set", f'out="{flow}"', "--no-progress"]) == 0
    sample = ["sample", "--flow", str(flow), "--out", str(tmp_path / "s"), "--no-progress"]
    assert main([*sample, "--set", "chains=4", "--set", "steps=6", "--set", f'device="{dev}"']) == 0
    s = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert s["device"].startswith(DEVICE.type) and 0.0 <= s["acceptance"] <= 1.0
    files = sorted((tmp_path / "s").glob("ensemble*.h5"))
    assert files
    resample = ["resample", *map(str, files), "--flow", str(flow), "--out", str(tmp_path / "r"), "--no-progress"]
    assert main([*resample, "--set", "steps=4", "--set", f'device="{dev}"']) == 0
    r = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert r["device"].startswith(DEVICE.type) and 0.0 <= r["acceptance"] <= 1.0
    hmc = ["hmc", *common, "--set", "lattice=[4, 4]", "--set", "hmc.trajectories=6", "--set", f'device="{dev}"']
    assert main([*hmc, "--set", f'out="{tmp_path / "h"}"', "--no-progress"]) == 0
    h = json.loads((tmp_path / "h" / "summary.json").read_text())
    assert h["device"].startswith(DEVICE.type) and 0.0 < h["acceptance"] <= 1.0


def test_gauge_forces_and_actions_on_the_device_equal_the_cpu_values():
    """Wilson and Symanzik SU(3) on 4^4: force and action on the device (products of
    flowplug.groups.small_matmul) against the CPU's float64 values."""
    from flowplug.plugins.gauge_actions import SymanzikGaugeAction

    for act in (WilsonGaugeAction(6.0, "su3"), SymanzikGaugeAction(6.0, "su3")):
        x = act.hot_start((4, 4, 4, 4), 2, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(act.force(x.to(DEVICE)).cpu(), act.force(x), rtol=0, atol=1e-13)
        torch.testing.assert_close(act.action(x.to(DEVICE)).cpu(), act.action(x), rtol=1e-13, atol=0)


def test_a_conditional_pseudofermion_model_read_from_its_file_follows_the_links_device(tmp_path):
    """The model is read onto the CPU; used on links on the device, it moves there and gives the
    CPU's log-density of the same pseudofermions."""
    from flowplug.plugins.dirac import WilsonDiracOperator
    from flowplug.plugins.pseudofermion_models import (
        ConditionalGaussianModel,
        load_conditional_model,
        save_conditional_model,
    )

    op = WilsonDiracOperator(0.2)
    model = ConditionalGaussianModel(op, 2, hidden=(4,))
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    path = save_conditional_model(model, tmp_path / "m.pt")
    x = 0.6 * torch.randn((2, 2, 4, 4), generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    phi, _ = model.sample(x, 2, torch.Generator().manual_seed(1))
    back = load_conditional_model(op, path)
    on_device = back.log_prob(x.to(DEVICE), phi.to(DEVICE))
    assert back.log_scale.device.type == DEVICE.type
    torch.testing.assert_close(on_device.cpu(), model.log_prob(x, phi), rtol=1e-10, atol=1e-10)


def test_history_read_cleared_and_recorded_again_reads_back_on_the_cpu():
    """Read (a checkpoint), cleared (after thermalisation), run on, read again: every row on the CPU."""
    act = WilsonGaugeAction(1.0, "u1")
    hmc = HMC(act, integrator="omelyan", steps=3)
    g = torch.Generator(device=DEVICE).manual_seed(6)
    chain = Chain(hmc, hmc.init(act.cold_start((4, 4), 4).to(DEVICE)), g, measure=_u1_measure)
    chain.run(5)
    chain.history_tensors()
    chain.history.clear()
    chain.run(3)
    h = chain.history_tensors()
    assert all(v.device.type == "cpu" and v.shape[0] == 3 for v in h.values())
    chain.run(4)
    assert all(v.device.type == "cpu" and v.shape[0] == 7 for v in chain.history_tensors().values())
