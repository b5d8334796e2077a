"""Even-odd and Hasenbusch preconditioning of the two-flavour Wilson action (issue 15, items 1-2).

Checks, all exact or against finite differences unless stated: det D = det D_hat (and D_hat
is the Schur complement of the dense D); D_hat^+ is the adjoint of D_hat; the even-odd solve
equals the unpreconditioned one; the even-odd link derivative and the preconditioned
actions' forces against finite differences (U(1), SU(2) in 2D, SU(3) in 4D); the Hasenbusch
factorisation sum_j log det K_j = log det(D^+ D) and each term's action against its dense
form; the heat baths (E[phi^+ K^{-1} phi] = n per field, statistical: 4 sigma); HMC
reversibility with each option; the default (no option) bit for bit the plain action;
fewer CG iterations with even-odd near the critical kappa; option errors; the command line
records the options; ``benchmarks/preconditioning.py --quick`` runs. The chains against
the exact-determinant values are in tests/test_schwinger.py (they share its fixture).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from _hmc_helpers import assert_reversible

import flowplug
from flowplug import groups
from flowplug.errors import ConfigError, ShapeError
from flowplug.plugins.dirac import WilsonDiracOperator
from flowplug.plugins.fermion_actions import PseudofermionAction
from flowplug.plugins.hmc import HMC
from flowplug.records import DiracOperatorSpec
from flowplug.theory import AngleSpace, SUNSpace

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]

OPTIONS = [
    {"even_odd": True},
    {"hasenbusch_kappa": 0.2},
    {"hasenbusch_kappa": [0.15, 0.2]},
    {"even_odd": True, "hasenbusch_kappa": 0.2},
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _links(kind: str, lattice, batch: int, seed: int) -> torch.Tensor:
    space = AngleSpace("u1") if kind == "u1" else SUNSpace(int(kind[2:]))
    return space.hot(lattice, batch, generator=_gen(seed))


def _even(op, links, seed, extra=()):
    shape = op.even_shape(links)
    return torch.randn((shape[0], *extra, *shape[1:]), generator=_gen(seed), dtype=torch.complex128)


def _inner(a, b):
    return (a.conj() * b).flatten(1).sum(1)


def _dense(matrix, x):
    """Dense matrix of a pseudofermion term's operator (D or D_hat)."""
    return matrix.operator.dense_even_odd(x) if matrix.even_odd else matrix.operator.dense(x)


# ----------------------------------------------------------------------- the operator

CASES = [("u1", (4, 4)), ("u1", (4, 6)), ("su2", (4, 2)), ("su3", (2, 2, 2, 4)), ("u1", (2, 4, 2, 4))]


@pytest.mark.parametrize("kind, lattice", CASES)
def test_even_odd_determinant_and_schur_complement(kind, lattice):
    op = WilsonDiracOperator(0.23)
    x = _links(kind, lattice, 2, seed=1)
    sign, logabs = torch.linalg.slogdet(op.dense(x))
    sign_hat, logabs_hat = torch.linalg.slogdet(op.dense_even_odd(x))
    assert float((logabs - logabs_hat).abs().max()) < 1e-10  # det D = det D_hat
    assert float((sign - sign_hat).abs().max()) < 1e-10
    # D_hat = D_ee - D_eo D_oo^{-1} D_oe from the dense D (D_oo = 1: the hopping term is off-diagonal in parity)
    dense = op.dense(x)
    even, odd = op.parity_sites(x)
    inner = op.size(x) // math.prod(lattice)
    ie = (even[:, None] * inner + torch.arange(inner)).flatten()
    io = (odd[:, None] * inner + torch.arange(inner)).flatten()
    d_oo = dense[:, io][:, :, io]
    assert torch.equal(d_oo, torch.eye(len(io), dtype=d_oo.dtype).expand_as(d_oo))
    schur = dense[:, ie][:, :, ie] - dense[:, ie][:, :, io] @ dense[:, io][:, :, ie]
    torch.testing.assert_close(op.dense_even_odd(x), schur, rtol=0, atol=1e-13)


@pytest.mark.parametrize("kind, lattice", CASES[:4])
def test_even_odd_dagger_is_the_adjoint_and_the_solve_is_the_unpreconditioned_one(kind, lattice):
    op = WilsonDiracOperator(0.22)
    x = _links(kind, lattice, 2, seed=2)
    a, b = _even(op, x, 3), _even(op, x, 4)
    torch.testing.assert_close(_inner(a, op.apply_even_odd(x, b)), _inner(op.apply_even_odd_dagger(x, a), b))
    # D_hat^+ = gamma_5 D_hat gamma_5 (gamma_5 acts site by site)
    g5 = lambda v: op.to_even(x, op.gamma5(x, op.embed_even_odd(x, v)))  # noqa: E731
    torch.testing.assert_close(op.apply_even_odd_dagger(x, a), g5(op.apply_even_odd(x, g5(a))))
    # to_even / embed_even_odd are inverse on the even sites
    assert torch.equal(op.to_even(x, op.embed_even_odd(x, a)), a)
    # (D^{-1})_ee = D_hat^{-1}: X = (D_hat^+ D_hat)^{-1} b = [D^{-1} [D^{-+} b]_e]_e
    sol, report = op.solve_even_odd_normal(x, b, tol=1e-13)
    assert report.converged.all() and float(report.residual.max()) < 1e-12
    y, _ = op.solve(x, op.gamma5(x, op.embed_even_odd(x, b)), tol=1e-13)
    y = op.gamma5(x, y)  # D^{-+} b = gamma_5 D^{-1} gamma_5 b
    z, _ = op.solve(x, op.embed_even_odd(x, op.to_even(x, y)), tol=1e-13)
    torch.testing.assert_close(sol, op.to_even(x, z), rtol=1e-9, atol=1e-11)
    # several right-hand sides per configuration (extra axis)
    many = _even(op, x, 5, extra=(3,))
    out = op.apply_even_odd(x, many)
    for k in range(3):
        torch.testing.assert_close(out[:, k], op.apply_even_odd(x, many[:, k]))


def test_even_odd_errors_name_expected_and_found():
    op = WilsonDiracOperator(0.2)
    with pytest.raises(ShapeError, match=r"even extents in every direction; the lattice \(4, 5\) has odd extents"):
        op.apply_even_odd(_links("u1", (4, 5), 1, 0), torch.zeros(1, 10, 2, dtype=torch.complex128))
    x = _links("u1", (4, 4), 2, 0)
    with pytest.raises(ShapeError, match=r"expected a complex even-site field of shape \(2, 8, 2\)"):
        op.apply_even_odd(x, torch.zeros(2, 16, 2, dtype=torch.complex128))
    with pytest.raises(ShapeError, match="expected a complex even-site field"):
        op.solve_even_odd_normal(x, torch.zeros(2, 8, 2))  # real


def test_u1_even_odd_derivative_matches_finite_differences():
    op = WilsonDiracOperator(0.24)
    x = _links("u1", (4, 6), 2, seed=6)
    left, right = _even(op, x, 7), _even(op, x, 8)
    g = op.derivative_even_odd(x, left, right)
    eps = 1e-6
    for idx in [(0, 0, 1, 2), (1, 1, 3, 5), (0, 1, 2, 0), (1, 0, 3, 4)]:  # incl. the time boundary
        up, dn = x.clone(), x.clone()
        up[idx] += eps
        dn[idx] -= eps
        fd = (_inner(left, op.apply_even_odd(up, right)) - _inner(left, op.apply_even_odd(dn, right)))[idx[0]]
        assert abs(complex(fd / (2 * eps)) - complex(g[idx])) < 1e-7


@pytest.mark.parametrize("n, lattice", [(2, (4, 2)), (3, (2, 2, 2, 4))])
def test_sun_even_odd_derivative_matches_finite_differences(n, lattice):
    op = WilsonDiracOperator(0.15)
    x = _links(f"su{n}", lattice, 2, seed=9)
    left, right = _even(op, x, 10), _even(op, x, 11)
    m = op.derivative_even_odd(x, left, right)
    direction = SUNSpace(n).momenta(x, _gen(12))
    eps = 1e-6
    up, dn = groups.expmap(eps * direction) @ x, groups.expmap(-eps * direction) @ x
    fd = (_inner(left, op.apply_even_odd(up, right)) - _inner(left, op.apply_even_odd(dn, right))) / (2 * eps)
    exact = torch.einsum("...ij,...ji->...", direction, m).flatten(1).sum(1)
    torch.testing.assert_close(exact, fd, rtol=1e-7, atol=1e-7)


# ------------------------------------------------------------------------ the actions


@pytest.mark.parametrize("options", OPTIONS)
def test_preconditioned_u1_force_matches_finite_differences(options):
    act = PseudofermionAction(2.0, 0.23, cg_tol=1e-14, **options)
    x = act.hot_start((4, 4), 2, generator=_gen(3))
    act.refresh(x, _gen(4))
    force = act.force(x)
    eps = 1e-6
    for idx in [(0, 0, 1, 2), (1, 1, 3, 0), (0, 1, 2, 3), (1, 0, 0, 3)]:
        up, dn = x.clone(), x.clone()
        up[idx] += eps
        dn[idx] -= eps
        fd = -(act.action(up) - act.action(dn))[idx[0]] / (2 * eps)
        assert abs(float(fd) - float(force[idx])) < 1e-7 * max(1.0, abs(float(fd)))


@pytest.mark.parametrize(
    "group, lattice, kappa, options",
    [
        ("su2", (4, 2), 0.2, {"even_odd": True, "hasenbusch_kappa": 0.15}),
        ("su2", (4, 2), 0.2, {"hasenbusch_kappa": [0.1, 0.15]}),
        ("su3", (2, 2, 2, 4), 0.12, {"even_odd": True, "hasenbusch_kappa": 0.08}),
    ],
)
def test_preconditioned_sun_force_directional_derivative(group, lattice, kappa, options):
    """d/ds S[exp(s X) U] = 2 Re tr(X F) (flowplug.theory's convention)."""
    act = PseudofermionAction(2.0, kappa, group, cg_tol=1e-14, **options)
    u = act.hot_start(lattice, 2, generator=_gen(5))
    act.refresh(u, _gen(6))
    x = act.space.momenta(u, _gen(7))
    eps = 1e-6
    fd = (act.action(groups.expmap(eps * x) @ u) - act.action(groups.expmap(-eps * x) @ u)) / (2 * eps)
    two_re_tr = 2 * torch.einsum("...ij,...ji->...", x, act.force(u)).real.flatten(1).sum(1)
    torch.testing.assert_close(two_re_tr, fd, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("options", OPTIONS)
def test_terms_factorise_the_determinant_and_match_their_dense_forms(options):
    """sum_j log det K_j = log det(D^+ D), K^{-1} = B (A^+ A)^{-1} B^+; each term's action = phi^+ K^{-1} phi."""
    act = PseudofermionAction(2.0, 0.24, **options)
    x = act.hot_start((4, 4), 2, generator=_gen(13))
    total = torch.zeros(2, dtype=torch.float64)
    fields, dense_quadratic = [], torch.zeros(2, dtype=torch.float64)
    for k, term in enumerate(act.terms):
        a = _dense(term.numerator, x)
        k_inv = torch.linalg.inv(a.mH @ a)
        total += 2 * torch.linalg.slogdet(a)[1]
        if term.denominator is not None:
            b = _dense(term.denominator, x)
            total -= 2 * torch.linalg.slogdet(b)[1]
            k_inv = b @ k_inv @ b.mH
        phi = torch.randn(term.numerator.shape(x), generator=_gen(20 + k), dtype=torch.complex128)
        fields.append(phi)
        dense_quadratic += torch.einsum("bi,bij,bj->b", phi.flatten(1).conj(), k_inv, phi.flatten(1)).real
    assert len(act.terms) == 1 + len(act.terms[1:])
    log_det_m = 2 * torch.linalg.slogdet(act.operator.dense(x))[1]
    torch.testing.assert_close(total, log_det_m, rtol=0, atol=1e-10)
    act.set_pseudofermions(fields)
    torch.testing.assert_close(act.fermion_action(x), dense_quadratic, rtol=1e-10, atol=0)


@pytest.mark.parametrize("options", [{"even_odd": True, "hasenbusch_kappa": 0.2}, {"hasenbusch_kappa": [0.15, 0.2]}])
def test_heat_baths_have_the_right_law(options):
    """E[phi^+ K^{-1} phi] = n for each field (|chi|^2: variance n), 400 draws at one configuration, 4 sigma."""
    act = PseudofermionAction(2.0, 0.24, **options)
    x = act.hot_start((4, 4), 1, generator=_gen(14))
    big = x.expand(400, *x.shape[1:]).clone()
    act.refresh(big, _gen(15))
    fresh = act.fermion_action(big)  # sum chi^+ chi, no solve
    solved = act.fermion_action(big.clone())  # through the CG
    torch.testing.assert_close(solved, fresh, rtol=1e-9, atol=0)
    assert act.phis is not None and len(act.phis) == len(act.terms)
    for term, phi in zip(act.terms, act.phis, strict=True):
        n = math.prod(term.numerator.shape(x)[1:])
        b, sol = act._term_solve(big, term, phi)
        s = (b.conj() * sol).flatten(1).sum(1).real
        assert abs(float(s.mean()) - n) < 4 * math.sqrt(n / 400), term.label
        if term.denominator is not None:  # the test has power: phi = A^+ chi (no B^{-+}) has another law
            chi = torch.randn(phi.shape, generator=_gen(16), dtype=torch.complex128)
            naive = term.numerator.apply_dagger(big, chi)
            b, sol = act._term_solve(big, term, naive)
            wrong = (b.conj() * sol).flatten(1).sum(1).real
            assert abs(float(wrong.mean()) - n) > 10 * math.sqrt(n / 400), term.label


@pytest.mark.parametrize("options", OPTIONS)
def test_hmc_trajectories_are_reversible_with_each_option(options):
    act = PseudofermionAction(2.0, 0.24, **options)
    kernel = HMC(act, integrator="omelyan", steps=5, trajectory_length=1.0)
    x0 = act.hot_start((4, 4), 3, generator=_gen(12))
    act.refresh(x0, _gen(13))
    p0 = kernel.space.momenta(x0, _gen(14))
    assert_reversible(kernel, x0, p0)


def test_default_is_the_plain_action_bit_for_bit():
    """even_odd = false and no hasenbusch_kappa: phi = D^+ chi from the same draw, the same force."""
    act = PseudofermionAction(2.0, 0.22, even_odd=False, hasenbusch_kappa=None)
    assert act._plain and len(act.terms) == 1
    x = act.hot_start((4, 4), 2, generator=_gen(17))
    act.refresh(x, _gen(18))
    chi = torch.randn(act.operator.spinor_shape(x), generator=_gen(18), dtype=torch.complex128)
    assert torch.equal(act.phi, act.operator.apply_dagger(x, chi))
    sol, _ = act.operator.solve_normal(x, act.phi, tol=1e-12, maxiter=2000)
    g = act.operator.derivative(x, act.operator.apply(x, sol), sol)
    assert torch.equal(act.fermion_force(x), 2.0 * g.real)
    assert set(act.couplings()) == {"beta", "kappa", "group", "dirac", "cg_tol", "cg_maxiter"}
    assert PseudofermionAction(2.0, 0.22, even_odd=True).couplings()["even_odd"] is True


def test_even_odd_needs_fewer_cg_iterations_near_the_critical_kappa():
    x = PseudofermionAction(2.0, 0.25).hot_start((8, 8), 2, generator=_gen(19))
    counts = {}
    for eo in (False, True):
        act = PseudofermionAction(2.0, 0.25, even_odd=eo)
        act.refresh(x, _gen(20))
        act.force(x)
        (solves, iterations), *_ = act.cg_counts.values()
        counts[eo] = iterations / solves
    assert counts[True] < 0.75 * counts[False], counts


def test_option_errors_are_named(fresh_pm):
    with pytest.raises(ConfigError, match="even_odd must be true or false; found 'yes'"):
        PseudofermionAction(2.0, 0.2, even_odd="yes")
    with pytest.raises(ConfigError, match=r"0 < kappa_1 < \.\.\. < kappa_k < kappa = 0.2.*found 0.3"):
        PseudofermionAction(2.0, 0.2, hasenbusch_kappa=0.3)
    with pytest.raises(ConfigError, match=r"increasing.*found \[0.15, 0.1\]"):
        PseudofermionAction(2.0, 0.2, hasenbusch_kappa=[0.15, 0.1])
    with pytest.raises(ConfigError, match="a number or a list of numbers"):
        PseudofermionAction(2.0, 0.2, hasenbusch_kappa="0.1")
    act = PseudofermionAction(2.0, 0.2, hasenbusch_kappa=0.1)
    with pytest.raises(
        ConfigError, match=r"2 pseudofermion fields expected \(terms \['kappa=0.1', 'kappa=0.2/0.1'\]\)"
    ):
        act.set_pseudofermions(torch.zeros(1, 4, 4, 2, dtype=torch.complex128))
    x = act.hot_start((4, 4), 1)
    with pytest.raises(ConfigError, match="no pseudofermion field drawn yet"):
        act.action(x)
    eo = PseudofermionAction(2.0, 0.2, even_odd=True)
    with pytest.raises(ShapeError, match="odd extents"):
        eo.refresh(eo.hot_start((4, 3), 1), _gen(0))
    eo.refresh(x, _gen(0))
    with pytest.raises(ShapeError, match=r"need pseudofermion fields of shape \(2, 8, 2\)"):
        eo.action(x.expand(2, *x.shape[1:]).clone())

    class NoEvenOdd(WilsonDiracOperator):  # a plugin operator without the even-odd form
        apply_even_odd = None  # type: ignore[assignment]

    class Plugin:
        @flowplug.hookimpl
        def flowplug_dirac_operators(self):
            return [DiracOperatorSpec(name="plain-wilson", description="no even-odd", factory=NoEvenOdd)]

    fresh_pm.register(Plugin(), name="plain", provider=("plain-pkg", "0.1"))
    with pytest.raises(ConfigError, match="operator 'plain-wilson', which has no apply_even_odd"):
        PseudofermionAction(2.0, 0.2, dirac="plain-wilson", even_odd=True)
    # Hasenbusch works with any operator: the generic force (two derivatives per ratio) equals the
    # Wilson one (one derivative of (A X - c phi), dB = c dA)
    generic = PseudofermionAction(2.0, 0.2, dirac="plain-wilson", hasenbusch_kappa=0.1)
    wilson = PseudofermionAction(2.0, 0.2, hasenbusch_kappa=0.1)
    assert generic.terms[1].numerator.derivative_ratio(generic.terms[1].denominator) is None
    assert wilson.terms[1].numerator.derivative_ratio(wilson.terms[1].denominator) == 0.5
    generic.refresh(x, _gen(1))
    wilson.refresh(x, _gen(1))
    torch.testing.assert_close(generic.force(x), wilson.force(x), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------- command line


@pytest.mark.filterwarnings("ignore::flowplug.jobs.summary.ShortChainWarning")
def test_command_line_takes_and_records_the_options(tmp_path, fresh_pm, capsys):
    from flowplug.cli import main

    def run(name, *sets):
        argv = ["hmc", "--no-progress"]
        for s in (
            f"out={tmp_path / name}",
            "action.name=schwinger",
            "action.kappa=0.24",
            "lattice=[4,4]",
            "chains=2",
            "hmc.trajectories=3",
            "hmc.thermalization=1",
            "hmc.steps=3",
            "format=hdf5",
            "save_every=3",
            "observables=['plaquette']",
            *sets,
        ):
            argv += ["--set", s]
        assert main(argv) == 0
        capsys.readouterr()
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        provenance = json.loads((tmp_path / name / "provenance.json").read_text())
        return summary["action"], provenance["outputs"][0]["action"]

    action, stated = run("both", "action.even_odd=true", "action.hasenbusch_kappa=0.2")
    assert action["even_odd"] is True and action["hasenbusch_kappa"] == 0.2 and stated == action
    action, stated = run("chain", "action.hasenbusch_kappa=[0.18, 0.21]")
    assert action["hasenbusch_kappa"] == [0.18, 0.21] and "even_odd" not in action and stated == action
    action, _ = run("plain")
    assert "even_odd" not in action and "hasenbusch_kappa" not in action  # plain runs record what they did before
    with pytest.raises(ConfigError, match="action 'schwinger-exact' does not take 'even_odd'"):
        from flowplug import config as _config
        from flowplug.jobs.hmc import DEFAULT_CONFIG, OPEN_TABLES, run_hmc

        cfg = _config.build_config(
            DEFAULT_CONFIG,
            overrides=[f"out={tmp_path / 'x'}", "action.name=schwinger-exact", "action.even_odd=true"],
            open_tables=OPEN_TABLES,
        )
        run_hmc(cfg)


# --------------------------------------------------------------------------- benchmark


def test_benchmark_quick_mode_prints_every_variant():
    spec = importlib.util.spec_from_file_location("bench_preconditioning", REPO / "benchmarks" / "preconditioning.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse(["--quick"])
    records = bench.run(args)
    variants = [r["variant"] for r in records if "variant" in r]
    assert variants == [v for _, v in bench.variant_list(args)]
    for r in records:
        if "variant" not in r:
            continue
        assert 0 <= r["acceptance"] <= 1 and r["seconds_per_trajectory"] > 0
        assert r["cg_iterations_per_solve"] and all(v > 0 for v in r["cg_iterations_per_solve"].values())
        assert r["ratio_cost_plain_over_this"] > 0
    json.dumps(records)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_even_odd_runs_on_the_links_device():
    op = WilsonDiracOperator(0.2)
    x = _links("su2", (4, 2), 2, seed=21)
    b = _even(op, x, 22)
    sol, _ = op.solve_even_odd_normal(x, b)
    on_gpu, _ = op.solve_even_odd_normal(x.cuda(), b.cuda())
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), sol, rtol=1e-10, atol=1e-12)
    act = PseudofermionAction(2.0, 0.2, "su2", even_odd=True, hasenbusch_kappa=0.15)
    act.refresh(x.cuda(), torch.Generator(device="cuda").manual_seed(0))
    assert act.force(x.cuda()).device.type == "cuda"
