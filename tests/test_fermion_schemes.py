"""The four flow sampling schemes for two-flavour fermions (flowplug.plugins.fermion_schemes).

Checks: the determinant estimate of every pseudofermion model is unbiased (mean of w against
the exact det(D^+ D), with the error from the exact second moment of the Gaussian model) and
exact with the exact conditional; the models' densities are normalised consistently (sample
vs log_prob); each scheme samples the two-flavour Schwinger model exactly at 4x4, beta = 2
(fixed seeds, Gamma-method errors, 3 sigma) against exact-determinant reweighting of flow
samples (the inexact variants fail these tests: redrawing the pseudo-marginal estimate at
every step by 6 sigma, redrawing the joint scheme's current phi from r by 3.7 sigma,
dropping the fermions from the Gibbs test by 4.6 sigma); bookkeeping on rejections; clear
errors for unsupported actions, fields and options; the kernels build from a ``[kernel]``
table as ``flowplug sample`` does.
The flow is an untrained u1-multiscale flow started at the pure-gauge widths of beta = 2
(acceptance 0.05-0.7 depending on the scheme), so no training is needed.

The Yukawa model (arXiv:2106.05934, section IV; ``yukawa`` / ``yukawa-exact``, scalar field):
every scheme (pseudo-marginal with the ``free`` and ``ilu`` models, joint with ``free``),
built from the pseudofermion action through the kernel registry, reproduces <phi^2>, <|M|> and
the staggered condensate of the exact-determinant reweighting of a briefly trained affine flow
within 4 sigma (4x4, m2 = -4, lam = 8, g = 1, mass = 0.3); the reference itself agrees with
exact-determinant HMC and differs from pure phi^4 by more than 8 sigma.
"""

from __future__ import annotations

import math

import pytest
import torch

import flowplug
from flowplug.chain import Chain
from flowplug.errors import ConfigError, UnknownComponentError
from flowplug.flow import build_flow
from flowplug.jobs.chains import build_kernel
from flowplug.measure import measurement
from flowplug.plugins.fermion_actions import ExactFermionAction, PseudofermionAction
from flowplug.plugins.fermion_schemes import (
    ExactConditionalModel,
    FermionGibbs,
    FermionJoint,
    FreeFieldModel,
    ILUModel,
    PseudoMarginal,
    WhiteNoiseModel,
    log_det_estimate,
    pseudofermion_model,
)
from flowplug.plugins.hmc import HMC
from flowplug.plugins.kernels import IndependenceMetropolis
from flowplug.stats import gamma_method

pytestmark = pytest.mark.usefixtures("one_thread")

BETA = 2.0
LATTICE = (4, 4)
OBS = ("plaquette", "topological_charge")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _flow(lattice=LATTICE):
    torch.manual_seed(0)
    opts = dict(
        concentrate=True,
        saddle_width=True,
        branches=2,
        init_beta=BETA,
        centre=True,
        shift="spread",
        n_modes=4,
        hidden=[8, 8],
        n_bins=8,
    )
    return build_flow("u1", lattice, "u1-multiscale", n_layers=4, options=opts)


@pytest.fixture(scope="module")
def flow():
    return _flow()


def _thermalised(kappa: float, batch: int, seed: int) -> torch.Tensor:
    """Links from short exact-determinant HMC runs (beta = 2, 4x4)."""
    act = ExactFermionAction(BETA, kappa)
    g = _gen(seed)
    hmc = HMC(act, steps=8)
    state = hmc.init(act.hot_start(LATTICE, batch, generator=g))
    for _ in range(25):
        state, _ = hmc.step(state, g)
    return state.x


def _dense_m(op, x):
    d = op.dense(x)
    return d.mH @ d


def _quad_dense(m):
    def quad(_x, phi):
        b, k = phi.shape[:2]
        sol = torch.linalg.solve(m, phi.reshape(b, k, -1).transpose(1, 2)).transpose(1, 2)
        return (phi.reshape(b, k, -1).conj() * sol).sum(-1).real

    return quad


# ------------------------------------------------------------------ estimator, models


def _log_rel_second_moment(c, m):
    """log E_r[w^2] / E_r[w]^2 for r = CN(0, C), w = exp(-phi^+ M^-1 phi) / (pi^n r): exactly
    det C / (det(2 M^-1 - C^-1) det(M)^2), +inf when 2 M^-1 - C^-1 is not positive definite."""
    b = 2 * torch.linalg.inv(m) - torch.linalg.inv(c)
    if float(torch.linalg.eigvalsh(b).min()) <= 0:
        return math.inf
    return float(torch.linalg.slogdet(c)[1] - torch.linalg.slogdet(b)[1] - 2 * torch.linalg.slogdet(m)[1])


@pytest.mark.parametrize(
    ("name", "kappa", "lattice"),
    [("ilu", 0.15, (4, 4)), ("eo-ilu", 0.2, (4, 4)), ("free", 0.1, (2, 4)), ("white", 0.05, (2, 4))],
)
def test_determinant_estimate_is_unbiased(name, kappa, lattice):
    act = ExactFermionAction(BETA, kappa)
    op = act.operator
    x = act.hot_start(lattice, 1, generator=_gen(5)) * 0.5  # a moderately rough field
    m = _dense_m(op, x)
    logdet = float(torch.linalg.slogdet(m)[1][0])
    model = pseudofermion_model(name, op)
    n = op.size(x)
    if name == "ilu":
        lo, up = model.factors(x)
        da = lo @ up
        c = da.mH @ da
    elif name == "eo-ilu":
        c = model.covariance(x)
    elif name == "free":
        d0 = op.dense(torch.zeros_like(x))
        c = d0.mH @ d0
    else:
        c = torch.eye(n, dtype=torch.complex128)[None]
    rel = _log_rel_second_moment(c[0], m[0])
    assert rel < 3.0, f"the test needs a finite, moderate variance (log E[w^2]/E[w]^2 = {rel})"
    k = 20000
    assert log_det_estimate(x, model, _quad_dense(m), 2, _gen(6)).shape == (1,)
    phi, log_r = model.sample(x, k, _gen(7))
    log_terms = -_quad_dense(m)(x, phi)[0] - n * math.log(math.pi) - log_r[0]
    w = torch.exp(log_terms - logdet)  # w / det(D^+ D): mean 1
    sigma = math.sqrt(math.expm1(rel) / k)  # exact standard error of the mean
    assert abs(float(w.mean()) - 1.0) < 4 * sigma, (float(w.mean()), sigma)


def test_exact_conditional_model_gives_the_determinant_exactly():
    act = ExactFermionAction(BETA, 0.24)
    x = _thermalised(0.24, 3, 11)
    m = _dense_m(act.operator, x)
    logdet = torch.linalg.slogdet(m)[1]
    model = ExactConditionalModel(act.operator)
    lw = log_det_estimate(x, model, _quad_dense(m), 4, _gen(1))
    torch.testing.assert_close(lw, logdet, atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", ["free", "ilu", "eo-ilu", "white", "exact"])
def test_model_log_prob_matches_its_samples(name):
    act = ExactFermionAction(BETA, 0.22)
    x = _thermalised(0.22, 2, 3)
    model = pseudofermion_model(name, act.operator, **({} if name == "exact" else {"scale": 1.1}))
    phi, log_r = model.sample(x, 3, _gen(2))
    assert phi.shape == (2, 3, 4, 4, 2) and phi.dtype == torch.complex128 and log_r.dtype == torch.float64
    torch.testing.assert_close(model.log_prob(x, phi), log_r, atol=1e-8, rtol=0)


def test_free_model_normalisation_uses_the_momentum_space_determinant():
    op = ExactFermionAction(BETA, 0.24).operator
    x = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    model = FreeFieldModel(op, scale=1.3)
    dense = 2 * float(torch.linalg.slogdet(op.dense(x))[1][0]) + 2 * op.size(x) * math.log(1.3)
    assert model.log_det_covariance(x) == pytest.approx(dense, abs=1e-10)


def test_ilu_model_factors_have_unit_determinant_and_approximate_d():
    act = ExactFermionAction(BETA, 0.2)
    x = _thermalised(0.2, 2, 4)
    lo, up = ILUModel(act.operator).factors(x)
    da = lo @ up
    torch.testing.assert_close(torch.linalg.slogdet(da)[1], torch.zeros(2, dtype=torch.float64), atol=1e-10, rtol=0)
    d = act.operator.dense(x)
    # D_a = D + L R: the difference is second order in kappa
    assert float((da - d).abs().max()) < 4 * 0.2**2 * 2


# ------------------------------------------------------------------ exactness of the schemes


def _reference(flow, kappa: float, n: int = 12288, seed: int = 101) -> dict[str, tuple[float, float]]:
    """<O> of the two-flavour theory by exact-determinant reweighting of flow samples:
    sum w O / sum w, w = exp(-S_eff) / q, error by linearisation (ratio estimator)."""
    act = ExactFermionAction(BETA, kappa)
    meas = measurement("u1", list(OBS))
    g = _gen(seed)
    lws, obs = [], {k: [] for k in OBS}
    with torch.no_grad():
        for _ in range(n // 1024):
            x, lq = flow.sample(1024, g)
            lws.append(-act.action(x) - lq)
            for k, v in meas(x).items():
                obs[k].append(v)
    lw = torch.cat(lws)
    w = torch.exp(lw - lw.max())
    out = {}
    for k in OBS:
        o = torch.cat(obs[k]) ** (2 if k == "topological_charge" else 1)
        mean = float((w * o).sum() / w.sum())
        err = float(torch.sqrt(((w * (o - mean)) ** 2).sum()) / w.sum())
        out[k] = (mean, err)
    return out


@pytest.fixture(scope="module")
def reference_024(flow):
    return _reference(flow, 0.24)


@pytest.fixture(scope="module")
def reference_012(flow):
    return _reference(flow, 0.12)


def _run(kernel, flow, chains: int, steps: int, seed: int, burn: int = 15):
    g = _gen(seed)
    with torch.no_grad():
        x0, _ = flow.sample(chains, g)
    chain = Chain(kernel, kernel.init(x0.detach()), g, measure=measurement("u1", list(OBS)))
    chain.run(steps)
    hist = chain.history_tensors()
    res = {}
    for k in OBS:
        h = hist[k][burn:] ** (2 if k == "topological_charge" else 1)
        res[k] = gamma_method(h, step_axis=0)
    return res, float(hist["accepted"][burn:].double().mean())


def _agree(res, ref, label, keys=OBS, n_sigma=3.0):
    """Each observable of ``res`` (Gamma-method results) within n_sigma combined errors of ``ref``."""
    for k in keys:
        mean, err = ref[k]
        r = res[k]
        sigma = math.hypot(r.error, err)
        assert abs(r.mean - mean) < n_sigma * sigma, (
            f"{label} {k}: {r.mean:.4f}({r.error:.4f}) vs exact {mean:.4f}({err:.4f})"
        )


def test_reference_differs_from_pure_gauge(flow, reference_024):
    """The fermions matter at kappa = 0.24: the reference plaquette is above the pure-gauge
    exact value 0.6993 (docs/fermions.md) by far more than the errors the tests allow."""
    mean, err = reference_024["plaquette"]
    assert mean - 0.6993 > 8 * err


def test_exact_marginal_scheme(flow, reference_024):
    kernel = build_kernel(flow, PseudofermionAction(BETA, 0.24), {"type": "exact-marginal"})
    assert isinstance(kernel, IndependenceMetropolis) and isinstance(kernel.action, ExactFermionAction)
    res, acc = _run(kernel, flow, 32, 60, seed=31)
    assert 0.3 < acc < 0.8
    _agree(res, reference_024, "exact-marginal")


@pytest.mark.parametrize(("model", "scale", "acc_range"), [("ilu", 1.2, (0.03, 0.5)), ("eo-ilu", 1.2, (0.1, 0.8))])
def test_pseudo_marginal_scheme(flow, reference_024, model, scale, acc_range):
    """Both models widened by 1.2: at scale 1 the weights of eo-ilu have infinite variance on
    most of these rough 4x4 fields (C > M/2 fails), and its chains then stick (a 3 sigma miss
    of <Q^2> in 60 steps)."""
    act = ExactFermionAction(BETA, 0.24)
    kernel = PseudoMarginal(flow, act, n_pseudofermions=2, pseudofermion=model, scale=scale)
    res, acc = _run(kernel, flow, 48, 60, seed=32)  # acceptance ilu 0.12, eo-ilu 0.17
    assert acc_range[0] < acc < acc_range[1]
    _agree(res, reference_024, f"pseudo-marginal ({model})")


def test_joint_scheme(flow, reference_024):
    kernel = FermionJoint(flow, PseudofermionAction(BETA, 0.24), pseudofermion="ilu")
    res, acc = _run(kernel, flow, 48, 60, seed=33)
    assert 0.03 < acc < 0.5
    _agree(res, reference_024, "fermion-joint")


def test_gibbs_scheme(flow, reference_012):
    """At kappa = 0.24 an unconditional flow is accepted < 0.1% of the time in the Gibbs
    scheme (phi is tied to U); at kappa = 0.12 about 5%."""
    kernel = FermionGibbs(flow, PseudofermionAction(BETA, 0.12))
    res, acc = _run(kernel, flow, 64, 60, seed=34)
    assert 0.02 < acc < 0.3
    _agree(res, reference_012, "fermion-gibbs")


# ------------------------------------------------------------------ bookkeeping, errors


def test_rejected_chains_keep_their_state_and_estimate(flow):
    kernel = PseudoMarginal(flow, ExactFermionAction(BETA, 0.24), pseudofermion="ilu")
    g = _gen(8)
    x0, _ = flow.sample(16, g)
    state = kernel.init(x0.detach())
    assert torch.isnan(state.extras["log_det_estimate"]).all() and torch.isnan(state.log_p).all()
    state, _ = kernel.step(state, g)
    for _ in range(3):
        new, info = kernel.step(state, g)
        rej = ~info["accepted"]
        assert torch.equal(new.x[rej], state.x[rej])
        assert torch.equal(new.extras["log_det_estimate"][rej], state.extras["log_det_estimate"][rej])
        assert torch.equal(new.extras["log_q"][rej], state.extras["log_q"][rej])
        acc = info["accepted"]
        assert torch.equal(new.extras["log_det_estimate"][acc], info["log_det_estimate"][acc])
        torch.testing.assert_close(new.extras["log_q"], kernel.log_q(new.x), atol=1e-9, rtol=0)
        state = new


def test_gibbs_test_is_the_exact_conditional_ratio(flow):
    """log A of the Gibbs U-step equals log [p(U' | phi) q(U)] / [p(U | phi) q(U')] computed with
    dense matrices, p(U | phi) ∝ exp(-S_g(U) - phi^+ (D^+ D)^{-1} phi), phi the step's draw."""
    act = PseudofermionAction(BETA, 0.2)
    kernel = FermionGibbs(flow, act)
    g = _gen(12)
    state = kernel.init(flow.sample(6, g)[0].detach())
    new, info = kernel.step(state, g)

    def log_cond(x):
        m = _dense_m(act.operator, x)
        phi = info["phi"].reshape(x.shape[0], 1, -1)
        return -act.gauge.action(x) - _quad_dense(m)(x, phi)[:, 0] - flow.log_prob(x)

    with torch.no_grad():
        expected = log_cond(info["proposal"]) - log_cond(state.x)
    torch.testing.assert_close(info["log_accept"], expected, atol=1e-8, rtol=0)
    acc = info["accepted"]
    assert torch.equal(new.x[acc], info["proposal"][acc]) and torch.equal(new.x[~acc], state.x[~acc])


def test_joint_state_keeps_phi_and_its_densities(flow):
    act = PseudofermionAction(BETA, 0.24)
    kernel = FermionJoint(flow, act, pseudofermion="ilu")
    g = _gen(9)
    x0, _ = flow.sample(8, g)
    state = kernel.init(x0.detach())
    for _ in range(3):
        state, _ = kernel.step(state, g)
    phi = state.extras["phi"]
    lp = -act.gauge.action(state.x) - kernel.quadratic(state.x, phi)
    torch.testing.assert_close(state.extras["log_p_joint"], lp, atol=1e-8, rtol=0)
    lr = kernel.model.log_prob(state.x, phi[:, None])[:, 0]
    torch.testing.assert_close(state.extras["log_r"], lr, atol=1e-8, rtol=0)


def test_pseudo_marginal_refuses_a_state_without_its_estimate(flow):
    act = PseudofermionAction(BETA, 0.24)
    kernel = PseudoMarginal(flow, act)
    hmc = HMC(act)
    state = hmc.init(flow.sample(2, _gen(1))[0].detach())
    with pytest.raises(ConfigError, match="Monte Carlo within Metropolis"):
        kernel.step(state, _gen(2))


def test_runs_are_reproducible_from_the_seed(flow):
    kernel = FermionJoint(flow, PseudofermionAction(BETA, 0.24))
    outs = []
    for _ in range(2):
        g = _gen(4)
        state = kernel.init(flow.sample(4, g)[0].detach())
        for _ in range(3):
            state, _ = kernel.step(state, g)
        outs.append(state.x)
    assert torch.equal(outs[0], outs[1])


def test_unsupported_actions_fields_and_options(flow, fresh_pm):
    from flowplug.theory import action_from_config

    wilson = action_from_config({"action": {"name": "wilson", "group": "u1", "beta": 2.0}})
    for cls in (PseudoMarginal, FermionGibbs, FermionJoint):
        with pytest.raises(ConfigError, match="two-flavour fermion"):
            cls(flow, wilson)
    with pytest.raises(ConfigError, match="two-flavour fermion"):
        build_kernel(flow, wilson, {"type": "exact-marginal"})
    su2 = ExactFermionAction(BETA, 0.2, "su2")
    with pytest.raises(ConfigError, match="'u1' fields but the action acts on 'su2'"):
        FermionGibbs(flow, su2)
    phi4 = action_from_config({"action": {"name": "phi4", "m2": -4.0, "lam": 8.0}})
    with pytest.raises(ConfigError, match="two-flavour fermion"):  # a scalar action, but without fermions
        build_kernel(flow, phi4, {"type": "pseudo-marginal"})
    yukawa = action_from_config({"action": {"name": "yukawa", "g": 0.5}})
    with pytest.raises(ConfigError, match="'u1' fields but the action acts on 'scalar'"):
        FermionJoint(flow, yukawa)
    act = PseudofermionAction(BETA, 0.2)
    with pytest.raises(UnknownComponentError, match="Unknown pseudofermion model 'gaussian'. Available: .*eo-ilu"):
        PseudoMarginal(flow, act, pseudofermion="gaussian")
    with pytest.raises(ConfigError, match="pseudofermion_options must be a table"):
        PseudoMarginal(flow, act, pseudofermion_options="model.pt")
    with pytest.raises(ConfigError, match="go to a model given by name"):
        FermionJoint(flow, act, pseudofermion=ILUModel(act.operator), scale=1.2)
    with pytest.raises(ConfigError, match="'exact' rejects the options \\['scale'\\]"):
        FermionJoint(flow, act, pseudofermion="exact", scale=1.2)
    with pytest.raises(ConfigError, match="n_pseudofermions must be >= 1"):
        PseudoMarginal(flow, act, n_pseudofermions=0)
    with pytest.raises(ConfigError, match="scale must be > 0"):
        FermionJoint(flow, act, pseudofermion="free", scale=0.0)
    with pytest.raises(ConfigError, match="rejects the options"):
        build_kernel(flow, act, {"type": "fermion-gibbs", "options": {"n_pseudofermions": 2}})
    with pytest.raises(ConfigError, match="expected a registered name"):
        pseudofermion_model(object(), act.operator)


def test_kernels_build_from_a_kernel_table(flow, fresh_pm):
    act = PseudofermionAction(BETA, 0.24)
    k = build_kernel(
        flow,
        act,
        {"type": "pseudo-marginal", "options": {"n_pseudofermions": 3, "pseudofermion": "white", "scale": 1.5}},
    )
    assert isinstance(k, PseudoMarginal) and k.n_pseudofermions == 3 and isinstance(k.model, WhiteNoiseModel)
    assert k.model.scale == 1.5
    assert isinstance(build_kernel(flow, act, {"type": "fermion-gibbs"}), FermionGibbs)
    j = build_kernel(flow, act, {"type": "fermion-joint", "options": {"refresh": True, "cg_tol": 1e-11}})
    assert isinstance(j, FermionJoint) and j.refresh and j.cg_tol == 1e-11
    for name in ("exact-marginal", "pseudo-marginal", "fermion-gibbs", "fermion-joint"):
        assert fresh_pm.registry("kernel").get(name).provider == "flowplug"


def test_kernels_take_registered_and_trained_pseudofermion_models(flow, fresh_pm, tmp_path):
    """Models come from the registry pseudofermion_model, with their options in a table."""
    from flowplug.jobs.provenance import kernel_record
    from flowplug.plugins.pseudofermion_models import (
        ConditionalGaussianModel,
        EvenOddILUModel,
        save_conditional_model,
    )
    from flowplug.records import PseudofermionModelSpec

    act = PseudofermionAction(BETA, 0.24)
    k = build_kernel(flow, act, {"type": "fermion-joint", "options": {"pseudofermion": "eo-ilu", "scale": 1.1}})
    assert isinstance(k.model, EvenOddILUModel) and k.model.scale == 1.1
    path = save_conditional_model(ConditionalGaussianModel(act.operator, 2, hidden=(4,)), tmp_path / "pf.pt")
    table = {
        "type": "pseudo-marginal",
        "options": {"pseudofermion": "conditional", "pseudofermion_options": {"checkpoint": str(path)}},
    }
    k = build_kernel(flow, act, table)
    assert isinstance(k.model, ConditionalGaussianModel)
    assert kernel_record(table)["files"]["pseudofermion_options.checkpoint"]["path"] == str(path)

    class Plugin:  # a third-party model, used by name like a built-in one
        @flowplug.hookimpl
        def flowplug_pseudofermion_models(self):
            return [PseudofermionModelSpec(name="t-white", description="test", factory=WhiteNoiseModel)]

    fresh_pm.register(Plugin(), name="t-pf")
    k = build_kernel(flow, act, {"type": "fermion-joint", "options": {"pseudofermion": "t-white", "scale": 2.0}})
    assert isinstance(k.model, WhiteNoiseModel) and k.model.scale == 2.0


def test_one_step_proposals_refuse_a_kernel_whose_state_must_persist(flow):
    """FlowProposal (``flowplug propose``) starts from the configuration alone at every call;
    for the pseudo-marginal kernel that would redraw the current estimate (not exact)."""
    from flowplug.proposal import FlowProposal

    act = PseudofermionAction(BETA, 0.24)
    with pytest.raises(ConfigError, match="pseudo-marginal.*redraw it, which is not exact"):
        FlowProposal(flow, ExactFermionAction(BETA, 0.24), kernel=PseudoMarginal(flow, act), seed=1)


def test_importance_weights_of_an_action_with_auxiliary_fields(flow):
    """The pseudofermion action has no density of the links alone: resample/sample report its
    ESS as None (log p NaN) instead of failing; the exact-determinant action gives weights."""
    from flowplug.jobs.chains import importance_weights

    with torch.no_grad():
        x, _ = flow.sample(4, _gen(3))
    w = importance_weights(flow, PseudofermionAction(BETA, 0.24), x)
    assert w["ess"] is None and w["ess_p_samples"] is None and w["reweighted"] == {}
    assert all(math.isnan(v) for v in w["log_p"])
    w = importance_weights(flow, ExactFermionAction(BETA, 0.24), x)
    assert 0 < w["ess"] <= 1 and all(math.isfinite(v) for v in w["log_p"])


def test_flowplug_sample_measures_the_action_s_own_observables(tmp_path, fresh_pm):
    """`flowplug sample` with a flow trained for `schwinger-exact` measures the chiral condensate
    and the pion effective mass by default, with the run's kappa, as `flowplug hmc` does."""
    import json

    from flowplug.cli import main
    from flowplug.train import build_trainer

    cfg = {
        "lattice": [4, 4],
        "seed": 0,
        "device": "cpu",
        "action": {"name": "schwinger-exact", "beta": BETA, "kappa": 0.2},
        "flow": {"layers": ["u1-ncp"], "n_layers": 2, "options": {"hidden": [4]}},
        "train": {"steps": 1, "batch_size": 4, "progress": False, "checkpoint_every": 0},
    }
    build_trainer(cfg, out=tmp_path / "flow").run()
    out = tmp_path / "s"
    args = ["sample", "--flow", str(tmp_path / "flow"), "--out", str(out), "--no-progress"]
    for kv in ("chains=2", "steps=4", "thermalize=1", "kernel.type=fermion-joint"):
        args += ["--set", kv]
    assert main(args) == 0
    obs = json.loads((out / "summary.json").read_text())["observables"]
    assert {"plaquette", "chiral_condensate", "pion_effective_mass"} <= set(obs)
    assert 0 < obs["chiral_condensate"]["mean"] < 2


# ------------------------------------------------------------------ the Yukawa model (scalar field)

YUKAWA = {"m2": -4.0, "lam": 8.0, "g": 1.0, "mass": 0.3}
YUKAWA_OBS = ("phi2", "abs_magnetization", "staggered_condensate")


@pytest.fixture(scope="module")
def yukawa_flow():
    """An affine flow for 4x4 phi, trained 400 steps against ``yukawa-exact`` (about 15 s on one
    busy core; ESS about 0.14). The bare mass 0.3 makes the model nearly unimodal (M < 0 in 0.7%
    of exact-HMC configurations), which a reverse-KL flow captures; at mass 0.1 (10% at M < 0) it
    found only the M > 0 mode and its reweighting missed HMC's <|M|> by 5 sigma."""
    from flowplug.train import build_trainer

    cfg = {
        "lattice": [4, 4],
        "seed": 0,
        "device": "cpu",
        "threads": 1,
        "action": {"name": "yukawa-exact", **YUKAWA},
        "flow": {"layers": ["affine"], "n_layers": 4, "options": {"hidden": [32, 32]}},
        "train": {"steps": 400, "batch_size": 64, "lr": 2e-3, "progress": False, "checkpoint_every": 0},
    }
    trainer = build_trainer(cfg, out=None, device="cpu")
    trainer.out = None
    for _ in range(400):
        trainer.train_step()
    return trainer.flow.eval()


def _yukawa_measure():
    from flowplug.plugins.yukawa import staggered_condensate

    def meas(x):
        with torch.no_grad():
            return {
                "phi2": (x**2).flatten(1).mean(1),
                "abs_magnetization": x.flatten(1).mean(1).abs(),
                "staggered_condensate": staggered_condensate(x, g=YUKAWA["g"], mass=YUKAWA["mass"]),
            }

    return meas


@pytest.fixture(scope="module")
def yukawa_reference(yukawa_flow):
    """<O> of the Yukawa model by exact-determinant reweighting of 8192 flow samples."""
    from flowplug.plugins.yukawa import YukawaExactAction

    act = YukawaExactAction(**YUKAWA)
    meas = _yukawa_measure()
    g = _gen(202)
    lws, obs = [], {k: [] for k in YUKAWA_OBS}
    with torch.no_grad():
        for _ in range(8):
            x, lq = yukawa_flow.sample(1024, g)
            lws.append(-act.action(x) - lq)
            for k, v in meas(x).items():
                obs[k].append(v)
    lw = torch.cat(lws)
    w = torch.exp(lw - lw.max())
    out = {}
    for k in YUKAWA_OBS:
        o = torch.cat(obs[k])
        mean = float((w * o).sum() / w.sum())
        out[k] = (mean, float(torch.sqrt(((w * (o - mean)) ** 2).sum()) / w.sum()))
    return out


def _run_yukawa(kernel, flow, chains: int, steps: int, seed: int, burn: int = 10):
    g = _gen(seed)
    with torch.no_grad():
        x0, _ = flow.sample(chains, g)
    meas = _yukawa_measure()
    chain = Chain(kernel, kernel.init(x0.detach()), g, measure=meas)
    chain.run(steps)
    hist = chain.history_tensors()
    res = {k: gamma_method(hist[k][burn:], step_axis=0) for k in YUKAWA_OBS}
    return res, float(hist["accepted"][burn:].double().mean())


@pytest.mark.parametrize(
    ("scheme", "options", "acc_range"),
    [
        ("exact-marginal", {}, (0.2, 0.9)),
        ("pseudo-marginal", {"n_pseudofermions": 2, "pseudofermion": "free", "scale": 1.5}, (0.05, 0.9)),
        ("fermion-gibbs", {}, (0.02, 0.9)),
        ("fermion-joint", {"pseudofermion": "free", "scale": 1.5}, (0.02, 0.9)),
    ],
)
def test_yukawa_schemes_sample_the_exact_theory(yukawa_flow, yukawa_reference, scheme, options, acc_range, fresh_pm):
    """Each scheme on the Yukawa model (4x4, m2 = -4, lam = 8, g = 1, mass = 0.3), built from the
    pseudofermion action ``yukawa`` through the kernel registry, against exact reweighting; 4 sigma.

    The ``free`` model is widened by 1.5: at scale 1 its weights have infinite variance on every
    one of 32 thermalised configurations (log E[w^2]/E[w]^2 finite on all 32 at 1.5, median
    2.9), and such chains stick. ``ilu`` is not used: on the staggered-yukawa operator its
    factors drop the site masses (they sit in the diagonal blocks), so it does not depend on phi
    and stays infinite up to scale 1.5."""
    from flowplug.plugins.yukawa import YukawaExactAction, YukawaPseudofermionAction

    kernel = build_kernel(yukawa_flow, YukawaPseudofermionAction(**YUKAWA), {"type": scheme, "options": options})
    if scheme == "exact-marginal":
        assert isinstance(kernel, IndependenceMetropolis) and isinstance(kernel.action, YukawaExactAction)
    res, acc = _run_yukawa(kernel, yukawa_flow, 32, 50, seed=41)
    assert acc_range[0] < acc < acc_range[1], acc
    _agree(res, yukawa_reference, scheme, keys=YUKAWA_OBS, n_sigma=4.0)


def test_yukawa_reference_agrees_with_hmc_and_differs_from_pure_phi4(yukawa_flow, yukawa_reference):
    """The reweighting reference equals exact-determinant HMC (64 chains x 200 trajectories, 60
    dropped; 4 sigma), and the fermions matter at this point: reweighting the same flow to pure
    phi^4 moves <|M|>, <phi^2> and the condensate by far more than the 4 sigma the scheme tests
    allow, so a scheme that lost the determinant would fail them."""
    from flowplug.plugins.yukawa import YukawaExactAction
    from flowplug.theory import action_from_config

    act = YukawaExactAction(**YUKAWA)
    g = _gen(204)
    hmc = HMC(act, steps=6)
    state = hmc.init(act.hot_start(LATTICE, 64, generator=g))
    meas = _yukawa_measure()
    hist = {k: [] for k in YUKAWA_OBS}
    for i in range(200):
        state, _ = hmc.step(state, g)
        if i >= 60:
            for k, v in meas(state.x).items():
                hist[k].append(v)
    for k in YUKAWA_OBS:
        r = gamma_method(torch.stack(hist[k]), step_axis=0)
        ref, ref_err = yukawa_reference[k]
        assert abs(r.mean - ref) < 4 * math.hypot(r.error, ref_err), (k, r.mean, r.error, ref, ref_err)
    phi4 = action_from_config({"action": {"name": "phi4", "m2": YUKAWA["m2"], "lam": YUKAWA["lam"]}})
    with torch.no_grad():
        x, lq = yukawa_flow.sample(8192, _gen(203))
        lw = -phi4.action(x) - lq
        obs = meas(x)
    w = torch.exp(lw - lw.max())
    for k in YUKAWA_OBS:
        o = obs[k]
        mean = float((w * o).sum() / w.sum())
        err = float(torch.sqrt(((w * (o - mean)) ** 2).sum()) / w.sum())
        ref, ref_err = yukawa_reference[k]
        assert abs(ref - mean) > 8 * math.hypot(err, ref_err), (k, ref, mean)


@pytest.mark.parametrize("name", ["free", "ilu", "white", "exact"])
def test_models_on_the_staggered_yukawa_operator(name):
    """Every pseudofermion model works on the scalar background: log_prob of its own draws equals
    their log r, the free model's normalisation is the momentum-space one (phi = 0), and the
    determinant estimate is unbiased (mean of w / det(D^+ D) over 20 000 draws within 4 standard
    errors, the error from the exact second moment of the Gaussian model)."""
    from flowplug.plugins.yukawa import YukawaPseudofermionAction

    act = YukawaPseudofermionAction(**YUKAWA)
    op = act.operator
    x = 0.15 * torch.randn(1, 2, 4, generator=_gen(21), dtype=torch.float64)  # M(phi) near D_0^+ D_0
    scale = {"free": 1.1, "ilu": 1.0, "white": 0.8}.get(name)  # log E[w^2]/E[w]^2 = 1.1, 3.2, 1.1
    model = pseudofermion_model(name, op, **({} if scale is None else {"scale": scale}))
    phi, log_r = model.sample(x, 3, _gen(22))
    assert phi.shape == (1, 3, 2, 4) and log_r.shape == (1, 3)
    torch.testing.assert_close(model.log_prob(x, phi), log_r, atol=1e-8, rtol=0)
    m = _dense_m(op, x)
    n = op.size(x)
    if name == "free":
        zero = torch.zeros_like(x)
        dense = 2 * float(torch.linalg.slogdet(op.dense(zero))[1][0]) + 2 * n * math.log(scale)
        assert model.log_det_covariance(x) == pytest.approx(dense, abs=1e-10)
        d0 = op.dense(zero)
        c = scale**2 * d0.mH @ d0
    elif name == "ilu":
        lo, up = model.factors(x)
        c = scale**2 * (lo @ up).mH @ (lo @ up)
    elif name == "white":
        c = scale**2 * torch.eye(n, dtype=torch.complex128)[None]
    else:
        c = m
    rel = _log_rel_second_moment(c[0], m[0])
    assert rel < 3.5, f"the test needs a finite, moderate variance (log E[w^2]/E[w]^2 = {rel})"
    k = 20000
    logdet = float(torch.linalg.slogdet(m)[1][0])
    phi, log_r = model.sample(x, k, _gen(23))
    w = torch.exp(-_quad_dense(m)(x, phi)[0] - n * math.log(math.pi) - log_r[0] - logdet)
    sigma = math.sqrt(max(math.expm1(rel), 1e-30) / k)
    assert abs(float(w.mean()) - 1.0) < 4 * sigma + 1e-9, (float(w.mean()), sigma)
