"""Pseudofermion models on the even-odd factorisation of D (flowplug.plugins.pseudofermion_models).

Checks: the structure of A (A - D only on the odd-odd block, det A = 1 for eo-ilu, log det A
the learned widths for the conditional model), the normalisation of r (E_r[p / r] = 1 with a
Monte Carlo error), the consistency of sample and log_prob, gauge covariance, training
lowering the reverse KL, checkpoints, the registry and the refusals.
"""

from __future__ import annotations

import math

import pytest
import torch

from flowplug.errors import CheckpointError, ConfigError, ShapeError
from flowplug.plugins.dirac import WilsonDiracOperator
from flowplug.plugins.fermion_schemes import ILUModel
from flowplug.plugins.pseudofermion_models import (
    ConditionalGaussianModel,
    EvenOddILUModel,
    load_conditional_model,
    model_diagnostics,
    save_conditional_model,
    train_conditional_model,
)
from flowplug.plugins.theories import WilsonGaugeAction

LOG_PI = math.log(math.pi)


def _u1(lattice=(4, 4), batch=3, seed=0, width=0.6):
    g = torch.Generator().manual_seed(seed)
    return width * torch.randn((batch, len(lattice), *lattice), generator=g, dtype=torch.float64)


def _conditional(op, seed=0):
    """A :class:`ConditionalGaussianModel` (hidden (4,)) whose network starts from a fixed
    initialisation: torch's default initialisation draws from the global generator, which the
    tests run before in the same process move, and with some of those draws the importance
    weights p / r of the statistical checks below are too heavy-tailed for their error estimate
    (4 of 40 global seeds failed the normalisation check)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ConditionalGaussianModel(op, 2, hidden=(4,))


def _randomize(model, seed=1, size=0.05):
    """Give a conditional model non-zero network outputs (an untrained one is eo-ilu)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(size * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _parity(lattice, ps):
    coords = torch.stack(torch.meshgrid(*[torch.arange(v) for v in lattice], indexing="ij")).reshape(len(lattice), -1)
    return (coords.sum(0) % 2).repeat_interleave(ps).bool()


@pytest.mark.parametrize("group", ["u1", "su2"])
def test_eo_ilu_differs_from_d_only_on_the_odd_block_and_has_unit_determinant(group):
    op = WilsonDiracOperator(0.22)
    if group == "u1":
        x = _u1()
    else:
        x = WilsonGaugeAction(2.0, "su2").hot_start((4, 4), 2, generator=torch.Generator().manual_seed(2))
    a, logdet = EvenOddILUModel(op).matrix(x)
    d = op.dense(x)
    odd = _parity((4, 4), op.size(x) // 16)
    diff = a - d
    assert diff[:, ~odd].abs().max() < 1e-14 and diff[:, :, ~odd].abs().max() < 1e-14
    assert diff[:, odd][:, :, odd].abs().max() > 1e-3  # the ILU's kappa^4 term
    assert torch.all(logdet == 0)
    assert torch.linalg.slogdet(a)[1].abs().max() < 1e-10  # det A = 1


def test_sample_and_log_prob_agree_and_r_is_normalised():
    """E_{phi~r}[p(phi|U) / r(phi|U)] = 1 for a normalised r: checked within 4 sigma (kappa small,
    so the weights have a small variance); a wrong constant in log r moves it by a factor."""
    op = WilsonDiracOperator(0.08)
    x = _u1(batch=2)
    n = op.size(x)
    d = op.dense(x)
    minv = torch.linalg.inv(d.mH @ d)
    logdet_m = 2.0 * torch.linalg.slogdet(d)[1]
    for model in (EvenOddILUModel(op, scale=1.1), _randomize(_conditional(op))):
        phi, log_r = model.sample(x, 4000, torch.Generator().manual_seed(5))
        torch.testing.assert_close(model.log_prob(x, phi), log_r, rtol=0, atol=1e-8)
        _assert_normalised(phi, log_r, minv, logdet_m, n)


def test_conditional_model_log_det_is_the_learned_widths_and_untrained_equals_eo_ilu():
    op = WilsonDiracOperator(0.2)
    x = _u1(batch=2, seed=3)
    m = ConditionalGaussianModel(op, 2, hidden=(4,))
    a0, ld0 = m.matrix(x)
    a1, _ = EvenOddILUModel(op).matrix(x)
    torch.testing.assert_close(a0.detach(), a1, rtol=0, atol=1e-14)
    assert torch.all(ld0 == 0)
    _randomize(m, size=0.2)
    a, logdet = m.matrix(x)
    torch.testing.assert_close(torch.linalg.slogdet(a.detach())[1], logdet.detach(), rtol=0, atol=1e-9)
    assert logdet.detach().abs().max() > 1e-3


def test_models_are_gauge_covariant():
    """r(Omega phi | U^Omega) = r(phi | U) with U_mu(x) -> e^{i a(x)} U_mu(x) e^{-i a(x+mu)}."""
    op = WilsonDiracOperator(0.2)
    x = _u1(batch=2, seed=4)
    g = torch.Generator().manual_seed(6)
    alpha = torch.rand((2, 4, 4), generator=g, dtype=torch.float64) * 2 * math.pi
    xg = torch.stack([x[:, mu] + alpha - torch.roll(alpha, -1, 1 + mu) for mu in range(2)], dim=1)
    omega = torch.exp(1j * alpha)[..., None]  # acts on (B, L, L, s)
    psi = torch.randn((2, 4, 4, 2), generator=g, dtype=torch.complex128)
    torch.testing.assert_close(op.apply(xg, omega * psi), omega * op.apply(x, psi))  # the convention
    for model in (EvenOddILUModel(op), _randomize(ConditionalGaussianModel(op, 2, hidden=(4,)), size=0.2)):
        phi, _ = model.sample(x, 3, g)
        torch.testing.assert_close(model.log_prob(xg, omega[:, None] * phi), model.log_prob(x, phi))


def test_eo_ilu_is_closer_to_p_than_ilu_and_training_lowers_the_reverse_kl():
    act, op = WilsonGaugeAction(2.0, "u1"), WilsonDiracOperator(0.25)
    x = 0.6 * act.hot_start((4, 4), 12, generator=torch.Generator().manual_seed(7))  # rough, not random fields
    ilu = model_diagnostics(ILUModel(op), x, k=32, generator=torch.Generator().manual_seed(8))
    eo = model_diagnostics(EvenOddILUModel(op), x, k=32, generator=torch.Generator().manual_seed(8))
    assert eo["kl_reverse"] < 0.6 * ilu["kl_reverse"] and eo["kl_forward"] < ilu["kl_forward"]
    m = ConditionalGaussianModel(op, 2, hidden=(4,))
    before = model_diagnostics(m, x, k=32, generator=torch.Generator().manual_seed(8))
    losses = train_conditional_model(m, x, steps=40, batch_size=6, k=2, lr=3e-3, seed=1)
    after = model_diagnostics(m, x, k=32, generator=torch.Generator().manual_seed(8))
    assert before["kl_reverse"] == pytest.approx(eo["kl_reverse"], abs=1e-9)
    assert after["kl_reverse"] < before["kl_reverse"] - 0.05, (before, after)  # 0.61 -> 0.51 nats
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    m2 = ConditionalGaussianModel(op, 2, hidden=(4,))
    train_conditional_model(m2, lambda b, g: x[:b], steps=3, batch_size=4, objective="forward")
    with pytest.raises(ConfigError, match="objective"):
        train_conditional_model(m2, x, steps=1, objective="sideways")


def test_log_second_moment_is_the_monte_carlo_ratio_and_infinite_below_half_of_m():
    """log E[w^2]/E[w]^2 of two Gaussians against its Monte Carlo estimate; +inf for C < M/2."""
    from flowplug.plugins.pseudofermion_models import log_second_moment

    g = torch.Generator().manual_seed(11)
    n = 3
    b = torch.randn((1, n, n), generator=g, dtype=torch.complex128) * 0.3 + torch.eye(n, dtype=torch.complex128)
    m = b.mH @ b
    c = 1.3 * m + 0.1 * torch.eye(n, dtype=torch.complex128)
    exact = float(log_second_moment(c, m)[0])
    lc = torch.linalg.cholesky(c[0])
    chi = torch.randn((200000, n), generator=g, dtype=torch.complex128)
    phi = chi @ lc.mT  # covariance C
    quad_m = torch.einsum("ki,ij,kj->k", phi.conj(), torch.linalg.inv(m[0]), phi).real
    quad_c = (chi.abs() ** 2).sum(-1)
    log_w = -quad_m + quad_c - torch.linalg.slogdet(m[0])[1] + torch.linalg.slogdet(c[0])[1]
    w = torch.exp(log_w)
    m1, m2 = w.mean(), (w**2).mean()
    estimate = math.log(float(m2 / m1**2))
    # delta-method error of log m2 - 2 log m1
    grad = torch.stack([w**2 / m2 - 2 * w / m1])
    error = float(grad.std() / math.sqrt(w.numel()))
    assert abs(estimate - exact) < 4 * error, (estimate, exact, error)
    assert math.isinf(float(log_second_moment(0.4 * m, m)[0]))


def test_checkpoint_round_trip_and_refusals(tmp_path):
    op = WilsonDiracOperator(0.2)
    x = _u1(batch=2, seed=9)
    m = _randomize(ConditionalGaussianModel(op, 2, hidden=(4,)), size=0.2)
    path = save_conditional_model(m, tmp_path / "m.pt", {"note": "test"})
    back = load_conditional_model(op, path)
    phi, _ = m.sample(x, 2, torch.Generator().manual_seed(1))
    torch.testing.assert_close(back.log_prob(x, phi), m.log_prob(x, phi), rtol=0, atol=0)
    assert back.trained_kappa == 0.2
    with pytest.raises(CheckpointError, match="no such"):
        load_conditional_model(op, tmp_path / "missing.pt")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="expected format"):
        load_conditional_model(op, tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_conditional_model(op, tmp_path / "junk.pt")


def test_registry_and_refusals(fresh_pm, tmp_path):
    op = WilsonDiracOperator(0.2)
    reg = fresh_pm.registry("pseudofermion_model")
    assert {"eo-ilu", "conditional"} <= set(reg.names())
    assert isinstance(reg.get("eo-ilu").factory(op, scale=1.2), EvenOddILUModel)
    with pytest.raises(ConfigError, match="trained model: give its file"):
        reg.get("conditional").factory(op)
    path = save_conditional_model(ConditionalGaussianModel(op, 2, hidden=(4,)), tmp_path / "m.pt")
    assert isinstance(reg.get("conditional").factory(op, checkpoint=str(path)), ConditionalGaussianModel)
    with pytest.raises(ShapeError, match="even extents"):
        EvenOddILUModel(op).matrix(_u1(lattice=(3, 4)))
    with pytest.raises(ConfigError, match="scale must be > 0"):
        EvenOddILUModel(op, scale=0)

    class Doubled(WilsonDiracOperator):
        def dense(self, links, *, by="columns"):
            return 2.0 * super().dense(links, by=by)

    with pytest.raises(ConfigError, match="hopping form"):
        EvenOddILUModel(Doubled(0.2)).matrix(_u1())
    staggered = fresh_pm.registry("dirac_operator").get("staggered-yukawa").factory(mass=0.1, g=1.0)
    for build in (lambda: EvenOddILUModel(staggered), lambda: ConditionalGaussianModel(staggered, 2)):
        with pytest.raises(ConfigError, match="has no hopping parameter kappa"):  # refused when built
            build()


def test_benchmark_quick_run_prints_every_model(capsys):
    """benchmarks/pseudofermion_models.py --quick: one JSON line per model with finite figures."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "pseudofermion_models.py"
    spec = importlib.util.spec_from_file_location("bench_pf_models", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.set_num_threads(1)
    assert mod.main(["--quick", "--json"]) == 0
    lines = [json.loads(v) for v in capsys.readouterr().out.strip().splitlines()]
    assert [v["model"] for v in lines] == ["white", "free", "ilu", "eo-ilu", "conditional", "ilu-1.2", "eo-ilu-1.1"]
    for v in lines:
        assert v["kl_reverse"] >= 0 and math.isfinite(v["var_log_w"]) and v["time_ratio_to_ilu"] > 0
        assert v["log_second_moment"] > 0
    assert lines[2]["time_ratio_to_ilu"] == 1.0 and lines[4]["train_steps"] == 5


def test_model_used_at_another_kappa_warns_and_stays_normalised(tmp_path):
    """A conditional model trained at one kappa and used at another: a CouplingMismatchWarning
    naming both, and r is still a normalised density of the operator it is used with
    (E_r[p / r] = 1 within 4 sigma), so the schemes that use log r exactly stay exact."""
    import warnings

    from flowplug.errors import CouplingMismatchWarning

    trained = _randomize(_conditional(WilsonDiracOperator(0.06)), size=0.02)
    path = save_conditional_model(trained, tmp_path / "m.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same kappa: no warning
        load_conditional_model(WilsonDiracOperator(0.06), path)
    op = WilsonDiracOperator(0.09)
    with pytest.warns(CouplingMismatchWarning, match=r"trained at kappa = 0\.06 and is used at kappa = 0\.09"):
        model = load_conditional_model(op, path)
    assert model.trained_kappa == 0.06 and model.operator is op
    x = _u1(batch=2, seed=4)
    n = op.size(x)
    d = op.dense(x)
    minv = torch.linalg.inv(d.mH @ d)
    logdet_m = 2.0 * torch.linalg.slogdet(d)[1]
    phi, log_r = model.sample(x, 4000, torch.Generator().manual_seed(6))
    _assert_normalised(phi, log_r, minv, logdet_m, n)


def _assert_normalised(phi, log_r, minv, logdet_m, n):
    """E_r[p / r] = 1 within 4 standard errors for the 4000 draws of each of the 2 gauge
    fields (p the exact pseudofermion density exp(-phi^+ M^-1 phi) / (pi^n det M))."""
    flat = phi.reshape(2, 4000, n)
    quad = torch.einsum("bki,bij,bkj->bk", flat.conj(), minv, flat).real
    w = torch.exp(-quad - logdet_m[:, None] - n * LOG_PI - log_r)
    mean, err = w.mean(1), w.std(1) / math.sqrt(4000)
    assert torch.all((mean - 1).abs() < 4 * err), (mean, err)
    assert torch.all(err < 0.05)
