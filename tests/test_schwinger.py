"""Two-flavour Wilson fermions (flowplug.plugins.fermion_actions): the Schwinger model.

Checks: forces of the exact-determinant and pseudofermion actions against autograd and
finite differences; the pseudofermion heat bath; HMC reversibility with pseudofermions;
the fermionic observables against the free field in momentum space; and, statistically,
pseudofermion HMC, exact-determinant HMC and the reweighting <O det^2>/<det^2> of
pure-gauge chains agree at 4x4 (fixed seeds, Gamma-method errors, 3 sigma); ``flowplug
hmc`` runs pseudofermion HMC, reproducibly and resumably.
"""

from __future__ import annotations

import math

import pytest
import torch
from _hmc_helpers import assert_reversible

from flowplug import config as _config
from flowplug import groups
from flowplug.chain import Chain
from flowplug.errors import ConfigError, ShapeError
from flowplug.measure import measurement
from flowplug.plugins.dirac import WilsonDiracOperator
from flowplug.plugins.fermion_actions import (
    ExactFermionAction,
    PseudofermionAction,
    chiral_condensate,
    cosh_effective_mass,
    pion_correlators,
    pion_effective_mass,
)
from flowplug.plugins.hmc import HMC
from flowplug.stats import ess, gamma_method

pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- registry


def test_actions_and_observables_are_registered(fresh_pm):
    actions = fresh_pm.registry("action")
    for name in ("schwinger", "schwinger-exact", "wilson-nf2", "wilson-nf2-exact"):
        assert actions.get(name).provider == "flowplug"
    a = actions.get("schwinger").factory(beta=1.5, kappa=0.21)
    assert isinstance(a, PseudofermionAction) and a.field == "u1" and a.kappa == 0.21
    assert isinstance(actions.get("schwinger-exact").factory(kappa=0.2), ExactFermionAction)
    assert actions.get("wilson-nf2").factory(kappa=0.1, group="su3").field == "su3"
    assert a.couplings() == {
        "beta": 1.5,
        "kappa": 0.21,
        "group": "u1",
        "dirac": "wilson",
        "cg_tol": 1e-12,
        "cg_maxiter": 2000,
    }
    for name in ("chiral_condensate", "pion_correlator", "pion_effective_mass"):
        assert "u1" in fresh_pm.registry("observable").get(name).fields


def test_unknown_dirac_operator_is_named(fresh_pm):
    with pytest.raises(Exception, match="Unknown Dirac operator 'staggerd'"):
        ExactFermionAction(2.0, 0.2, dirac="staggerd")


# ------------------------------------------------------------------------------ forces


@pytest.mark.parametrize("group", ["u1", "su2"])
def test_exact_force_is_the_autograd_gradient_of_the_action(group):
    act = ExactFermionAction(2.0, 0.22, group)
    x = act.hot_start((4, 4), 2, generator=_gen(1))

    def reference(y):  # S_g - log det(D^+ D) by autograd through slogdet of the dense matrix
        return act.gauge.action(y) - 2 * torch.linalg.slogdet(act.operator.dense(y))[1]

    torch.testing.assert_close(act.force(x), act.space.autograd_force(reference, x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(act.action(x), reference(x), rtol=1e-12, atol=1e-12)


def test_exact_action_on_a_4d_lattice():
    act = ExactFermionAction(2.0, 0.12, "su2")
    x = act.hot_start((2, 2, 2, 2), 1, generator=_gen(2))
    ref = act.space.autograd_force(
        lambda y: act.gauge.action(y) - 2 * torch.linalg.slogdet(act.operator.dense(y))[1], x
    )
    torch.testing.assert_close(act.force(x), ref, rtol=1e-10, atol=1e-10)


def test_pseudofermion_force_u1_matches_finite_differences():
    act = PseudofermionAction(2.0, 0.23)
    x = act.hot_start((4, 4), 2, generator=_gen(3))
    act.refresh(x, _gen(4))
    force = act.force(x)
    eps = 1e-6
    for idx in [(0, 0, 1, 2), (1, 1, 3, 0), (0, 1, 2, 3), (1, 0, 0, 3)]:  # incl. links across the time boundary
        up, dn = x.clone(), x.clone()
        up[idx] += eps
        dn[idx] -= eps
        fd = -(act.action(up) - act.action(dn))[idx[0]] / (2 * eps)
        assert abs(float(fd) - float(force[idx])) < 1e-6 * max(1.0, abs(float(fd)))


@pytest.mark.parametrize("group", ["su2", "su3"])
def test_pseudofermion_force_sun_directional_derivative(group):
    """d/ds S[exp(s X) U] = 2 Re tr(X F) (flowplug.theory's convention)."""
    act = PseudofermionAction(2.0, 0.2, group)
    u = act.hot_start((4, 2), 2, generator=_gen(5))
    act.refresh(u, _gen(6))
    x = act.space.momenta(u, _gen(7))
    eps = 1e-6
    fd = (act.action(groups.expmap(eps * x) @ u) - act.action(groups.expmap(-eps * x) @ u)) / (2 * eps)
    two_re_tr = 2 * torch.einsum("...ij,...ji->...", x, act.force(u)).real.flatten(1).sum(1)
    torch.testing.assert_close(two_re_tr, fd, rtol=1e-6, atol=1e-6)


def test_pseudofermion_heat_bath_and_its_errors():
    act = PseudofermionAction(2.0, 0.24)
    x = act.hot_start((4, 4), 3, generator=_gen(8))
    with pytest.raises(ConfigError, match="no pseudofermion field drawn yet; call refresh"):
        act.action(x)
    act.refresh(x, _gen(9))
    fresh = act.fermion_action(x)  # chi^+ chi, no solve
    assert act.last_report is None
    solved = act.fermion_action(x.clone())  # through the CG
    torch.testing.assert_close(solved, fresh, rtol=1e-10, atol=0)
    assert act.last_report.converged.all()
    # phi^+ (D^+ D)^{-1} phi = |chi|^2 is chi-squared with 2n degrees of freedom, / 2: mean n
    n = act.operator.size(x)
    big = x[:1].expand(400, *x.shape[1:]).clone()
    act.refresh(big, _gen(10))
    s = act.fermion_action(big.clone())  # through the CG: tests that phi = D^+ chi has the right law
    assert abs(float(s.mean()) - n) < 4 * math.sqrt(n / 400)  # var of |chi|^2 = n
    with pytest.raises(ShapeError, match="the one drawn last has shape"):
        act.action(x)
    x.add_(0.0)  # an in-place change invalidates the solve-free value
    act.refresh(x, _gen(11))
    x.add_(0.1)
    assert act.fermion_action(x) is not act._fresh[2]


@pytest.mark.parametrize("cls", [PseudofermionAction, ExactFermionAction])
def test_hmc_trajectories_are_reversible(cls):
    act = cls(2.0, 0.24)
    kernel = HMC(act, integrator="omelyan", steps=5, trajectory_length=1.0)
    x0 = act.hot_start((4, 4), 3, generator=_gen(12))
    if hasattr(act, "refresh"):
        act.refresh(x0, _gen(13))
    p0 = kernel.space.momenta(x0, _gen(14))
    assert_reversible(kernel, x0, p0)


def test_hmc_with_pseudofermions_is_reproducible_from_the_seed():
    def run(seed):
        act = PseudofermionAction(2.0, 0.22)
        kernel = HMC(act, steps=3)
        g = _gen(seed)
        state = kernel.init(act.hot_start((4, 4), 2, generator=g))
        assert torch.isnan(state.log_p).all()  # S needs phi: each step draws it
        chain = Chain(kernel, state, g, measure=measurement("u1", ["plaquette"])).run(3)
        return chain.state.x, chain.history_tensors()

    (xa, ha), (xb, hb), (xc, _) = run(5), run(5), run(6)
    assert torch.equal(xa, xb) and all(torch.equal(ha[k], hb[k]) for k in ha)
    assert not torch.equal(xa, xc)
    assert torch.isfinite(ha["delta_h"]).all()


# ------------------------------------------------------------------------- observables


def _free_trace(lattice, kappa):
    """tr D^{-1} of the free operator: sum_p s a / (a^2 + b^2) (module docstring of dirac.py)."""
    grids = []
    for mu, n in enumerate(lattice):
        shift = 0.5 if mu == len(lattice) - 1 else 0.0
        grids.append(2 * math.pi * (torch.arange(n, dtype=torch.float64) + shift) / n)
    ps = torch.meshgrid(*grids, indexing="ij")
    a = 1 - 2 * kappa * sum(torch.cos(p) for p in ps)
    b2 = 4 * kappa**2 * sum(torch.sin(p) ** 2 for p in ps)
    s = 2 ** (len(lattice) // 2)
    return float((s * a / (a * a + b2)).sum())


@pytest.mark.parametrize("lattice, kappa", [((4, 4), 0.2), ((6, 8), 0.24), ((2, 2, 2, 4), 0.12)])
def test_free_condensate_equals_momentum_space_trace(lattice, kappa):
    unit = torch.zeros(1, len(lattice), *lattice, dtype=torch.float64)
    volume = math.prod(lattice)
    expected = 2 * kappa * _free_trace(lattice, kappa) / volume
    assert abs(float(chiral_condensate(unit, kappa, method="exact")) - expected) < 1e-12


def test_stochastic_condensate_agrees_with_exact():
    x = ExactFermionAction(2.0, 0.22).hot_start((6, 6), 2, generator=_gen(15))
    exact = chiral_condensate(x, 0.22, method="exact")
    stoch = torch.stack([chiral_condensate(x, 0.22, method="stochastic", noise=64, seed=s) for s in range(4)])
    # Z2 noise: the estimate of each configuration scatters by O(1/sqrt(noise)) of its off-diagonal part
    err = stoch.std(0) / 2 + 1e-3
    assert torch.all((stoch.mean(0) - exact).abs() < 4 * err)
    with pytest.raises(ConfigError, match="needs the hopping parameter kappa"):
        chiral_condensate(x)
    with pytest.raises(ConfigError, match="method must be"):
        chiral_condensate(x, 0.2, method="dense")


def test_pion_correlator_free_field_and_gauge_invariance():
    lattice = (4, 8)
    unit = torch.zeros(1, 2, *lattice, dtype=torch.float64)
    exact = pion_correlators(unit, 0.2, method="exact")[0]
    point = pion_correlators(unit, 0.2, method="point", cg_tol=1e-13)[0]
    torch.testing.assert_close(point, exact, rtol=1e-9, atol=0)  # translation invariance: one source = all
    torch.testing.assert_close(exact[1:], exact.flip(0)[:-1], rtol=1e-10, atol=0)  # C(t) = C(T - t)
    assert torch.all(exact[1:5] < exact[:4])  # decays to the middle
    x = ExactFermionAction(2.0, 0.2).hot_start(lattice, 2, generator=_gen(16))
    alpha = 2 * math.pi * torch.rand(2, *lattice, generator=_gen(17), dtype=torch.float64)
    xg = torch.stack([x[:, mu] + alpha - torch.roll(alpha, -1, 1 + mu) for mu in range(2)], 1)
    torch.testing.assert_close(pion_correlators(xg, 0.2), pion_correlators(x, 0.2), rtol=1e-10, atol=0)
    m = pion_effective_mass(x, 0.2, t=2)
    c = pion_correlators(x, 0.2)
    torch.testing.assert_close(torch.cosh(m * 2) / torch.cosh(m * 1), c[:, 2] / c[:, 3], rtol=1e-12, atol=0)
    torch.testing.assert_close(pion_effective_mass(x, 0.2, t=2, kind="log"), torch.log(c[:, 2] / c[:, 3]))
    with pytest.raises(ConfigError, match="t must be in 0..6"):
        pion_effective_mass(x, 0.2, t=7)


def test_cosh_effective_mass_inverts_a_cosh():
    tsize, mass = 16, torch.tensor([0.05, 0.4, 1.3], dtype=torch.float64)
    for t in (0, 3, 7):
        ratio = torch.cosh(mass * (tsize / 2 - t)) / torch.cosh(mass * (tsize / 2 - t - 1))
        torch.testing.assert_close(cosh_effective_mass(ratio, t, tsize), mass, rtol=1e-12, atol=1e-12)
    assert torch.isnan(cosh_effective_mass(torch.tensor([0.9], dtype=torch.float64), 1, 8)).all()
    with pytest.raises(ConfigError, match="t \\+ 1 <= T/2"):
        cosh_effective_mass(torch.tensor([2.0]), 4, 8)


def test_measurement_passes_the_action_couplings(fresh_pm):
    x = ExactFermionAction(2.0, 0.2).hot_start((4, 4), 2, generator=_gen(18))
    measure = measurement("u1", ["plaquette", "chiral_condensate"], couplings={"beta": 2.0, "kappa": 0.2})
    out = measure(x)
    torch.testing.assert_close(out["chiral_condensate"], chiral_condensate(x, 0.2))
    with pytest.raises(ConfigError, match="needs the hopping parameter kappa"):
        measurement("u1", ["chiral_condensate"])(x)
    # an explicit option wins over the coupling
    measure = measurement(
        "u1", ["chiral_condensate"], couplings={"kappa": 0.2}, options={"chiral_condensate": {"kappa": 0.1}}
    )
    torch.testing.assert_close(measure(x)["chiral_condensate"], chiral_condensate(x, 0.1))


# ------------------------------------------------------------- statistical validation

#: 4x4, beta = 2, kappa = 0.24 (free critical kappa 1/4): the fermions move the plaquette
#: from 0.699 (pure gauge, exact) to ~0.73, <Q^2> from 0.29 to ~0.17, the condensate by ~20 sigma.
BETA, KAPPA, LATTICE = 2.0, 0.24, (4, 4)
CHAINS, TRAJECTORIES, THERM = 64, 50, 10
OBSERVABLES = ("plaquette", "topological_charge", "chiral_condensate")


def _run(action, seed: int, extra=None) -> dict[str, torch.Tensor]:
    """HMC (Omelyan, 3 steps, tau = 1) histories after thermalisation, (steps, chains); Q -> Q^2."""
    kernel = HMC(action, integrator="omelyan", steps=3, trajectory_length=1.0)
    g = _gen(seed)
    measure = measurement("u1", list(OBSERVABLES), couplings={"kappa": KAPPA})

    def both(x):
        out = measure(x)
        if extra is not None:
            out.update(extra(x))
        return out

    chain = Chain(kernel, kernel.init(action.hot_start(LATTICE, CHAINS, generator=g)), g, measure=both)
    hist = {k: v[THERM:] for k, v in chain.run(TRAJECTORIES).history_tensors().items()}
    hist["topological_charge"] = hist["topological_charge"] ** 2
    return hist


@pytest.fixture(scope="module")
def exact_chain():
    """Exact-determinant HMC at (BETA, KAPPA) on 4x4, seed 21."""
    return _run(ExactFermionAction(BETA, KAPPA), seed=21)


def _agree(a, b, what):
    """|a - b| <= 3 sigma (a, b: (mean, error)); returns the distance in sigma."""
    sigma = math.hypot(a[1], b[1])
    z = abs(a[0] - b[0]) / sigma
    assert z < 3, f"{what}: {a[0]:.5f} +- {a[1]:.5f} vs {b[0]:.5f} +- {b[1]:.5f} ({z:.1f} sigma)"
    return z


def _gamma(h):
    return {o: (gamma_method(h[o], step_axis=0).mean, gamma_method(h[o], step_axis=0).error) for o in OBSERVABLES}


def test_exact_determinant_hmc_agrees_with_reweighted_pure_gauge_chains(exact_chain, fresh_pm):
    """<O>_{N_f=2} = <O det(D^+D)>_g / <det(D^+D)>_g, pure-gauge chains from the registered wilson action."""
    gauge = fresh_pm.registry("action").get("wilson").factory(beta=BETA, group="u1")
    det = ExactFermionAction(BETA, KAPPA)
    pure = _run(gauge, seed=22, extra=lambda x: {"log_w": -det.fermion_action(x)})
    log_w = pure["log_w"]
    assert float(ess(log_w.flatten())) > 0.3  # the reweighting is reliable here
    w = torch.exp(log_w - log_w.max())
    exact = _gamma(exact_chain)
    for o in OBSERVABLES:
        ratio = float((pure[o] * w).mean() / w.mean())
        # linearised error of a ratio of means (Wolff, hep-lat/0306017, section 3): Gamma method
        # of the projected series (O - R) w / <w>
        err = gamma_method((pure[o] - ratio) * w / w.mean(), step_axis=0).error
        _agree((ratio, err), exact[o], f"{o}: reweighted pure gauge vs exact determinant")
    # the fermions matter here: the pure-gauge plaquette (exact: flowplug.exact) is far off
    from flowplug.exact import u1_2d

    assert abs(exact["plaquette"][0] - u1_2d(4, BETA)["plaquette"]) > 5 * exact["plaquette"][1]


def test_pseudofermion_hmc_agrees_with_exact_determinant_hmc(exact_chain):
    pf = _run(PseudofermionAction(BETA, KAPPA), seed=23)
    ours, exact = _gamma(pf), _gamma(exact_chain)
    for o in OBSERVABLES:
        _agree(ours[o], exact[o], f"{o}: pseudofermion vs exact-determinant HMC")
    assert float(pf["accepted"].mean()) > 0.9
    emdh = gamma_method(torch.exp(-pf["delta_h"]), step_axis=0)
    assert abs(emdh.mean - 1) < 3 * emdh.error + 1e-3  # <exp(-dH)> = 1


@pytest.mark.parametrize(
    "options, seed",
    [({"even_odd": True}, 24), ({"even_odd": True, "hasenbusch_kappa": 0.2}, 25)],
)
def test_preconditioned_pseudofermion_hmc_agrees_with_exact_determinant_hmc(exact_chain, options, seed):
    """Even-odd and Hasenbusch preconditioning (tests/test_preconditioning.py) sample the same U."""
    pf = _run(PseudofermionAction(BETA, KAPPA, **options), seed=seed)
    ours, exact = _gamma(pf), _gamma(exact_chain)
    for o in OBSERVABLES:
        _agree(ours[o], exact[o], f"{o}: pseudofermion HMC with {options} vs exact-determinant HMC")
    assert float(pf["accepted"].mean()) > 0.9
    emdh = gamma_method(torch.exp(-pf["delta_h"]), step_axis=0)
    assert abs(emdh.mean - 1) < 3 * emdh.error + 1e-3


# ------------------------------------------------------------------------ flowplug hmc


def _cfg(tmp_path, *overrides, name="run"):
    from flowplug.jobs.hmc import DEFAULT_CONFIG, OPEN_TABLES

    base = [
        f"out={tmp_path / name}",
        "progress=false",
        "lattice=[4, 4]",
        "chains=2",
        "hmc.trajectories=6",
        "hmc.thermalization=2",
        "hmc.steps=3",
        "save_every=3",
        "format=none",
        "action.name=schwinger",
        "action.kappa=0.2",
    ]
    return _config.build_config(DEFAULT_CONFIG, overrides=base + list(overrides), open_tables=OPEN_TABLES)


@pytest.mark.filterwarnings("ignore::flowplug.jobs.summary.ShortChainWarning")
def test_flowplug_hmc_runs_pseudofermion_hmc_and_resumes(tmp_path, fresh_pm, capsys):
    from flowplug.cli import main
    from flowplug.jobs.hmc import run_hmc

    full = run_hmc(_cfg(tmp_path, name="full"))
    assert full["action"]["name"] == "schwinger" and full["action"]["kappa"] == 0.2
    for o in (
        "plaquette",
        "topological_charge",
        "topological_susceptibility",
        "chiral_condensate",
        "pion_effective_mass",
    ):
        assert o in full["observables"], o
    part = run_hmc(_cfg(tmp_path, "hmc.trajectories=3", name="part"))
    assert part["trajectories"] == 3
    resumed = run_hmc(_cfg(tmp_path, name="part"), resume=True)
    assert resumed["observables"] == full["observables"] and resumed["acceptance"] == full["acceptance"]
    # the command line takes the action's couplings (the [action] table is open)
    rc = main(
        [
            "hmc",
            "--set",
            f"out={tmp_path / 'cli'}",
            "--set",
            "action.name=schwinger-exact",
            "--set",
            "action.kappa=0.2",
            "--set",
            "lattice=[4,4]",
            "--set",
            "chains=2",
            "--set",
            "hmc.trajectories=4",
            "--set",
            "hmc.thermalization=1",
            "--set",
            "format=none",
            "--set",
            "observables=['plaquette','chiral_condensate']",
            "--no-progress",
        ]
    )
    assert rc == 0
    assert "chiral_condensate" in capsys.readouterr().out


def test_condensate_of_a_wilson_gauge_run_needs_kappa(tmp_path, fresh_pm):
    from flowplug.jobs.hmc import run_hmc

    # with action.kappa set, the wilson action refuses it (it would be a silent no-op); the
    # condensate observable then has no kappa to read from the pure-gauge action
    with pytest.raises(ConfigError, match="action 'wilson' does not take 'kappa'"):
        run_hmc(_cfg(tmp_path, "action.name=wilson", "observables=['chiral_condensate']"))
    cfg = _cfg(tmp_path, "action.name=wilson", "observables=['chiral_condensate']", name="run2")
    del cfg["action"]["kappa"]
    with pytest.raises(ConfigError, match="needs the hopping parameter kappa"):
        run_hmc(cfg)


def test_wilson_operator_kappa_is_the_actions():
    act = PseudofermionAction(2.0, 0.19)
    assert isinstance(act.operator, WilsonDiracOperator) and act.operator.kappa == 0.19
