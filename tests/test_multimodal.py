"""Z2-symmetrised flows (flowplug.symmetric; Hackett et al., arXiv:2107.00734, section III).

Statistical tests state seed, statistics and the sigma they allow (SIGMA); the exact phi^4
values on a 2 x 2 lattice come from a quadrature of the 4-dimensional integral (the
trapezoidal rule on a smooth, Gaussian-decaying integrand: accurate far beyond the
statistical errors), so the tests can fail.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from flowplug.errors import ConfigError
from flowplug.flow import Flow, build_flow, make_prior
from flowplug.flowtools import check_inverse
from flowplug.plugins.kernels import FlowHMC, IndependenceMetropolis
from flowplug.plugins.theories import Phi4Action
from flowplug.stats import gamma_method
from flowplug.symmetric import SymmetrizedFlow, field_symmetry, symmetrize_flow

SIGMA = 4.0

pytestmark = pytest.mark.usefixtures("one_thread")


class Affine1(nn.Module):
    """y = mu + s x on every site (a test layer: a Gaussian q centred on one mode)."""

    def __init__(self, mu: float, s: float) -> None:
        super().__init__()
        self.mu, self.s = float(mu), float(s)

    def forward(self, x):
        ld = torch.full((x.shape[0],), x[0].numel() * math.log(self.s), dtype=torch.float64)
        return self.mu + self.s * x, ld

    def inverse(self, y):
        ld = torch.full((y.shape[0],), -y[0].numel() * math.log(self.s), dtype=torch.float64)
        return (y - self.mu) / self.s, ld


def _shifted_flow(lattice, mu, s, symmetrize):
    prior = make_prior("normal", lattice=lattice, field="scalar")
    spec = {"field": "scalar", "lattice": list(lattice)}
    flow = Flow(prior, [Affine1(mu, s)], field="scalar", lattice=lattice, spec=spec)
    return symmetrize_flow(flow, "z2") if symmetrize else flow


def _randomised(flow: Flow, seed: int, scale: float = 0.3) -> Flow:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return flow.eval()


def test_log_q_s_is_the_average_of_the_two_branches():
    """log q_s(x) = log[(q(x) + q(-x)) / 2] with q the same layers unsymmetrised; sample and
    log_prob agree; the density is even; the inverse check passes."""
    torch.manual_seed(0)
    f = _randomised(build_flow("scalar", [4, 4], ["affine"], n_layers=4, options={"hidden": [8]}, symmetrize="z2"), 1)
    assert isinstance(f, SymmetrizedFlow) and f.spec["symmetrize"] == "z2"
    base = Flow.from_spec({k: v for k, v in f.spec.items() if k != "symmetrize"}).eval()
    base.load_state_dict(f.state_dict())
    with torch.no_grad():
        x, lq = f.sample(32, torch.Generator().manual_seed(2))
        direct = torch.logaddexp(base.log_prob(x), base.log_prob(-x)) - math.log(2.0)
        assert torch.allclose(f.log_prob(x), direct, atol=1e-10, rtol=0)
        assert torch.allclose(lq, direct, atol=1e-10, rtol=0)
        assert torch.allclose(f.log_prob(-x), direct, atol=1e-10, rtol=0)
        u, _ = f.inverse(x)
        assert torch.allclose(f(u)[0], x, atol=1e-10)
        # both signs are drawn
        m = x.flatten(1).mean(1)
        assert bool((m > 0).any() and (m < 0).any())
    assert check_inverse(f).passed


def test_symmetrised_density_is_normalised_and_sampled_exactly():
    """E_{x ~ q_s}[p~(x) / q_s(x)] = Z for an unnormalised Gaussian p~ that is *not* even
    (centre 0.6 on every site, unit width, Z = (2 pi)^(n/2)): tests the normalisation of
    q_s and that samples follow q_s (forgetting the sign flip, or the 1/2, would bias it by
    factors of order 1). q is a randomised affine flow, widened by 1.3 (light-tailed
    weights) and shifted to +0.5. 40000 samples, seed 3; the test also demands a relative
    error below 4 % so that it has power."""
    torch.manual_seed(0)
    lattice = [2, 2]
    body = _randomised(build_flow("scalar", lattice, ["affine"], n_layers=2, options={"hidden": [4]}), 4, 0.1)
    flow = Flow(body.prior, [*body.layers, Affine1(0.5, 1.3)], field="scalar", lattice=lattice, spec=body.spec)
    f = symmetrize_flow(flow, "z2").eval()
    n = 4
    with torch.no_grad():
        x, lq = f.sample(40000, torch.Generator().manual_seed(3))
        log_p = -0.5 * ((x - 0.6) ** 2).flatten(1).sum(1)
        w = torch.exp(log_p - 0.5 * n * math.log(2 * math.pi) - lq)  # p / q_s with p normalised
    est, err = float(w.mean()), float(w.std() / math.sqrt(len(w)))
    assert err < 0.04, f"error {err} too large to test anything"
    assert abs(est - 1.0) < SIGMA * err, f"E[p/q_s] = {est:.4f} +- {err:.4f}, expected 1"


# ------------------------------------------------------------------ phi^4 on 2 x 2, broken


M2, LAM = -4.0, 1.0  # modes at phi ~ +-1.3; a barrier of ~16 in S between them


def _exact_2x2() -> dict[str, float]:
    """<M/V>, <|M|/V>, <chi_2> of phi^4 on the 2 x 2 torus by quadrature (27^4 points,
    spacing 0.2; 41^4 points on [-3, 3] agree to 1e-7)."""
    act = Phi4Action(m2=M2, lam=LAM)
    t = torch.linspace(-2.6, 2.6, 27, dtype=torch.float64)
    g = torch.stack(torch.meshgrid(t, t, t, t, indexing="ij"), -1).reshape(-1, 2, 2)
    s = act.action(g)
    w = torch.exp(-(s - s.min()))
    m = g.flatten(1).mean(1)
    z = w.sum()
    return {
        "m": float((w * m).sum() / z),
        "abs_m": float((w * m.abs()).sum() / z),
        "chi_2": float((w * 4 * m**2).sum() / z),
    }


def _imh_chain(flow, steps=300, chains=64, seed=5):
    act = Phi4Action(m2=M2, lam=LAM)
    k = IndependenceMetropolis(flow, act)
    st = k.init(torch.full((chains, 2, 2), 1.3, dtype=torch.float64))  # all in the M > 0 mode
    g = torch.Generator().manual_seed(seed)
    ms, acc = [], []
    with torch.no_grad():
        for _ in range(steps):
            st, info = k.step(st, g)
            ms.append(st.x.flatten(1).mean(1))
            acc.append(info["accepted"].double().mean())
    return torch.stack(ms)[50:], float(torch.stack(acc).mean())


def test_imh_with_symmetrised_flow_is_exact_and_tunnels():
    """Independence Metropolis with q_s (q a Gaussian on the M > 0 mode) from the M > 0
    mode: <M> = 0 and <|M|>, <chi_2> = exact (quadrature) within SIGMA Gamma errors; the
    same q unsymmetrised on the same budget never leaves the mode (<M> > 10 errors from 0).
    64 chains x 250 measured steps, seed 5."""
    ex = _exact_2x2()
    assert abs(ex["m"]) < 1e-12 and ex["abs_m"] > 1.0  # bimodal, even
    m, acc = _imh_chain(_shifted_flow([2, 2], ex["abs_m"], 0.3, True))
    assert acc > 0.3
    for name, data, exact in (("m", m, 0.0), ("abs_m", m.abs(), ex["abs_m"]), ("chi_2", 4 * m**2, ex["chi_2"])):
        r = gamma_method(data.numpy(), step_axis=0)
        assert r.error < 0.05 * max(abs(exact), 1.0), f"{name}: error {r.error} too large to test anything"
        assert abs(r.mean - exact) < SIGMA * r.error, f"{name}: {r.mean:.4f} +- {r.error:.4f} vs exact {exact:.4f}"
    flips = int((torch.sign(m[1:]) != torch.sign(m[:-1])).sum())
    assert flips > 100
    m0, _ = _imh_chain(_shifted_flow([2, 2], ex["abs_m"], 0.3, False))
    assert bool((m0 > 0).all()), "the unsymmetrised flow's chain left its mode"
    r0 = gamma_method(m0.numpy(), step_axis=0)
    assert r0.mean / r0.error > 10 * SIGMA / 4


def _z2_train_config() -> dict:
    """A two-step training run of a small Z2-symmetrised phi^4 flow on 4x4."""
    return {
        "lattice": [4, 4],
        "seed": 3,
        "device": "cpu",
        "action": {"name": "phi4", "m2": -4.0, "lam": 3.5},
        "flow": {"layers": ["affine"], "n_layers": 2, "options": {"hidden": [4]}, "symmetrize": "z2"},
        "train": {"steps": 2, "batch_size": 8, "progress": False, "checkpoint_every": 0},
    }


def test_training_objective_uses_the_symmetrised_density(tmp_path):
    """The reverse-KL loss of a step is the batch mean of log q_s(x) + S(x); a checkpoint
    keeps ``symmetrize`` and the loaded flow has the same density; resume rebuilds it."""
    from flowplug.checkpoints import load_flow
    from flowplug.train import build_trainer, resume_trainer

    cfg = _z2_train_config()
    tr = build_trainer(cfg, out=tmp_path / "run")
    assert isinstance(tr.flow, SymmetrizedFlow)
    g = torch.Generator().manual_seed(0)
    g.set_state(tr.generator.get_state())
    with torch.no_grad():
        z, _ = tr.flow.sample_latent(8, g)
        x, _ = tr.flow(z)
        expected = float((tr.flow.log_prob(x) + tr.action.action(x)).mean())
    metrics = tr.train_step()
    assert metrics["loss"] == pytest.approx(expected, abs=1e-9)
    tr.run()
    lf = load_flow(tmp_path / "run")
    assert isinstance(lf.flow, SymmetrizedFlow) and lf.flow.spec["symmetrize"] == "z2"
    with torch.no_grad():
        x, _ = tr.flow.sample(16, torch.Generator().manual_seed(1))
        assert torch.allclose(lf.flow.log_prob(x), tr.flow.log_prob(x), atol=1e-12, rtol=0)
    again = resume_trainer(tmp_path / "run", overrides={"steps": 3})
    assert isinstance(again.flow, SymmetrizedFlow) and again.step == 2


def test_clear_errors_without_the_symmetry(tmp_path):
    """A field kind without the symmetry, an unknown symmetry, an action that is not
    invariant, a kernel that moves the latent variables, fast path gradients."""
    from flowplug.train import build_trainer

    with pytest.raises(ConfigError, match=r"field kind 'u1' has no symmetry.*none"):
        build_flow("u1", [4, 4], ["u1-ncp"], n_layers=2, symmetrize="z2")
    with pytest.raises(ConfigError, match=r"no symmetry of that name \(its symmetries: z2\)"):
        field_symmetry("scalar", "z3")
    cfg = {
        "lattice": [4, 4],
        "action": {"name": "wilson", "beta": 2.0, "group": "u1"},
        "flow": {"layers": ["u1-ncp"], "n_layers": 2, "symmetrize": "z2"},
        "train": {"steps": 1, "progress": False},
    }
    with pytest.raises(ConfigError, match=r"action 'wilson' is not invariant under 'z2'"):
        build_trainer(cfg, out=tmp_path / "w")
    cfg = {
        "lattice": [4, 4],
        "action": {"name": "phi4", "m2": -4.0, "lam": 3.5},
        "flow": {"layers": ["affine"], "n_layers": 2, "options": {"hidden": [4]}, "symmetrize": "z2"},
        "train": {"steps": 1, "progress": False, "path_gradient": True, "path_gradient_method": "fast"},
    }
    with pytest.raises(ConfigError, match=r"SymmetrizedFlow"):
        build_trainer(cfg, out=tmp_path / "p")
    flow = build_flow("scalar", [2, 2], ["affine"], n_layers=2, options={"hidden": [4]}, symmetrize="z2")
    with pytest.raises(ConfigError, match=r"flow-hmc needs a bijection.*independence-metropolis"):
        FlowHMC(flow, Phi4Action(m2=M2, lam=LAM), steps=2)  # refused when the kernel is built


def test_z2_is_an_involution_and_declared_by_phi4():
    from flowplug.manager import registry

    (neg,) = field_symmetry("scalar", "z2")
    x = torch.randn(3, 4, 4, dtype=torch.float64)
    assert torch.equal(neg(neg(x)), x)
    act = Phi4Action(m2=-4.0, lam=3.5)
    assert torch.allclose(act.action(neg(x)), act.action(x), rtol=1e-14, atol=0)
    assert "z2" in registry("action").get("phi4").symmetries
    assert np.isclose(float(act.action(x)[0]), float(act.action(-x)[0]))


def test_benchmark_multimodal_plumbing(tmp_path, capsys):
    """benchmarks/multimodal.py --json end to end on 4 x 4 with a 2-step flow: one JSON line
    per sampler, the reference and the summary, with the keys of docs/flows.md (no timing or
    physics is asserted: the figures need long runs)."""
    import importlib.util
    import json
    from pathlib import Path

    from flowplug.train import build_trainer

    cfg = {
        "lattice": [4, 4],
        "seed": 1,
        "action": {"name": "phi4", "m2": -4.0, "lam": 3.5},
        "flow": {"layers": ["affine"], "n_layers": 2, "options": {"hidden": [4]}, "symmetrize": "z2"},
        "train": {"steps": 2, "batch_size": 8, "progress": False, "checkpoint_every": 0},
    }
    build_trainer(cfg, out=tmp_path / "run").run()
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "multimodal.py"
    spec = importlib.util.spec_from_file_location("bench_multimodal", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = "--chains 2 --hmc-trajectories 6 --flow-steps 6 --thermalize 2 --segments 2"
    args += " --reference-chains 2 --reference-trajectories 6 --json"
    assert mod.main(["--flow", str(tmp_path / "run"), *args.split()]) == 0
    lines = [json.loads(s) for s in capsys.readouterr().out.splitlines() if s.strip()]
    names = [r.get("sampler") for r in lines[:-1]]
    assert names == ["reference-hmc", "hmc", "flow-symmetrised", "flow-unsymmetrised"]
    for r in lines[1:-1]:
        assert {"acceptance", "sign_changes", "tunnelling_per_step", "m", "abs_m", "chi_2"} <= set(r)
        assert "sigma_from_reference" in r["chi_2"] and r["steps"] == 6 and r["chains"] == 2
    assert {"tunnelling_per_second_ratio_flow_over_hmc", "chi_2_cost_ratio_hmc_over_flow"} <= set(lines[-1])


def test_propose_with_a_symmetrised_phi4_flow(tmp_path, capsys):
    """`flowplug propose` on a phi^4 configuration file (a field on the sites): the next
    configuration is written as a scalar field, and the decision uses log q_s."""
    import json

    from flowplug import io
    from flowplug.cli import main
    from flowplug.train import build_trainer

    cfg = _z2_train_config()
    build_trainer(cfg, out=tmp_path / "run").run()
    cur = tmp_path / "cur.h5"
    io.write(cur, io.Ensemble(torch.randn(1, 4, 4, dtype=torch.float64), field="scalar"))
    rc = main(
        [
            "propose",
            "--flow",
            str(tmp_path / "run"),
            "--current",
            str(cur),
            "--out",
            str(tmp_path / "n.h5"),
            "--seed",
            "1",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    nxt = io.read(tmp_path / "n.h5")
    assert nxt.field == "scalar" and tuple(nxt.data.shape) == (1, 4, 4)
    assert isinstance(line["accepted"], bool) and math.isfinite(line["log_q_current"])
