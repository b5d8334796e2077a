"""The out-of-tree example package examples/flowplug-xy, installed as a user would.

The XY action's exact properties: O(2) symmetry, 2 pi periodicity, the ordered state's
action, the analytic force against autograd, and the exact 1D periodic chain
<cos(theta_x - theta_x+1)> = sum_n I_n^(V-1) I_n' / sum_n I_n^V (character expansion)
reproduced by direct quadrature over the angles with the plugin's own action.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from flowplug.manager import new_plugin_manager

xy = pytest.importorskip(
    "flowplug_xy",
    reason="examples/flowplug-xy is not installed (pip install -e examples/flowplug-xy, as the README says)",
)


@pytest.fixture(scope="module")
def xy_spec():
    pm = new_plugin_manager(autoload=True)
    return pm.registry("action").get("xy")


def test_discovered_through_entry_point_with_provider(xy_spec):
    assert (xy_spec.provider, xy_spec.provider_version) == ("flowplug-xy", xy.__version__)
    assert xy_spec.fields == ("o2",)


def test_listed_by_flowplug_plugins_json():
    env = {k: v for k, v in os.environ.items() if k != "FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD"}
    proc = subprocess.run(
        [sys.executable, "-m", "flowplug", "plugins", "--json"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    rows = {(r["kind"], r["name"]): r for r in json.loads(proc.stdout)}
    assert rows[("action", "xy")]["provider"] == "flowplug-xy"
    assert rows[("observable", "xy_bond_energy")]["version"] == xy.__version__


def test_used_by_name_and_alias(xy_spec):
    pm = new_plugin_manager(autoload=True)
    assert pm.registry("action").get("Plane-Rotator") == xy_spec
    action = xy_spec.factory(beta=0.7)
    theta = torch.zeros(2, 4, 5, dtype=torch.float64)
    assert torch.allclose(action.action(theta), torch.full((2,), -0.7 * 2 * 20, dtype=torch.float64))
    energy = pm.registry("observable").get("xy_bond_energy").factory(theta)
    assert energy.tolist() == [1.0, 1.0]


def test_symmetry_periodicity_and_force():
    g = torch.Generator().manual_seed(1)
    action = xy.XYAction(beta=1.3)
    theta = (torch.rand(3, 4, 6, generator=g, dtype=torch.float64) - 0.5) * 2 * math.pi
    s = action.action(theta)
    assert torch.allclose(action.action(theta + 0.37), s, atol=1e-12)  # global O(2)
    shift = torch.zeros_like(theta)
    shift[:, 1, 2] = 2 * math.pi
    assert torch.allclose(action.action(theta + shift), s, atol=1e-12)  # periodicity
    assert torch.allclose(action.action(-theta), s, atol=1e-12)  # reflection
    t = theta.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(action.action(t).sum(), t)
    assert torch.allclose(action.force(theta), -grad, atol=1e-12)
    with pytest.raises(ValueError, match="XY field must be real angles"):
        action.action(torch.zeros(4, dtype=torch.complex128))


def _bessel_i(n: int, beta: float, points: int = 4096) -> float:
    """I_n(beta) = (1/2pi) int e^{beta cos t} cos(n t) dt by the (spectrally exact) periodic trapezoid rule."""
    t = torch.arange(points, dtype=torch.float64) * (2 * math.pi / points)
    return float((torch.exp(beta * torch.cos(t)) * torch.cos(n * t)).mean())


def exact_bond_energy(volume: int, beta: float) -> float:
    """<cos(theta_x - theta_x+1)> on the periodic chain of ``volume`` sites (module docstring)."""
    terms = range(-30, 31)
    i = {n: _bessel_i(n, beta) for n in range(-31, 32)}
    num = sum(i[n] ** (volume - 1) * 0.5 * (i[n - 1] + i[n + 1]) for n in terms)
    den = sum(i[n] ** volume for n in terms)
    return num / den


@pytest.mark.parametrize("beta", [0.5, 1.7])
def test_exact_1d_periodic_chain(beta):
    volume = 3
    exact = exact_bond_energy(volume, beta)
    # quadrature with the plugin's action: fix theta_0 = 0 (global symmetry), grid the rest
    m = 256
    grid = torch.arange(m, dtype=torch.float64) * (2 * math.pi / m)
    t1, t2 = torch.meshgrid(grid, grid, indexing="ij")
    theta = torch.stack([torch.zeros_like(t1), t1, t2], dim=-1).reshape(-1, volume)
    action = xy.XYAction(beta=beta)
    weights = torch.exp(-action.action(theta))
    energy = xy.bond_energy(theta)
    measured = float((weights * energy).sum() / weights.sum())
    assert measured == pytest.approx(exact, abs=1e-10)


# ----------------------------------------------------------------- the plugin's kernel


def test_kernel_registered_by_the_plugin():
    pm = new_plugin_manager(autoload=True)
    spec = pm.registry("kernel").get("xy-metropolis")
    assert spec.provider == "flowplug-xy" and spec.fields == ("o2",)
    with pytest.raises(Exception, match="odd extents"):
        spec.factory(xy.XYAction(1.0)).init(torch.zeros(1, 5, dtype=torch.float64))


def test_kernel_is_exact_on_the_periodic_chain(one_thread):
    """64 chains x 300 sweeps of L = 16 at beta = 1 (seed 3) reproduce the exact bond energy
    within 3 Gamma-method sigma (chains as replicas, first 30 sweeps dropped)."""
    from flowplug.stats import gamma_method

    action = xy.XYAction(beta=1.0)
    kernel = xy.XYMetropolis(action, step_size=2.0)
    g = torch.Generator().manual_seed(3)
    state = kernel.init(torch.zeros(64, 16, dtype=torch.float64))
    energies, acc = [], []
    for _ in range(300):
        state, info = kernel.step(state, g)
        energies.append(xy.bond_energy(state.x))
        acc.append(info["accepted"])
    torch.testing.assert_close(state.log_p, -action.action(state.x), rtol=0, atol=1e-10)
    r = gamma_method(torch.stack(energies[30:]), step_axis=0)
    exact = exact_bond_energy(16, 1.0)
    assert r.error < 0.01
    assert abs(r.mean - exact) < 3 * r.error, (r.mean, r.error, exact)
    rate = float(torch.stack(acc).mean())
    assert 0.2 < rate < 0.9


def test_flowplug_sample_runs_the_plugins_kernel(tmp_path, one_thread, capsys):
    """The plugin's kernel, action and observable from the command line, as built-ins run:
    `flowplug sample` without a flow (default 16 chains x 200 sweeps, 20 dropped, seed 1)
    reproduces the exact bond energy of the periodic chain within 3 Gamma-method sigma."""
    from flowplug.cli import main
    from flowplug.manager import new_plugin_manager, set_plugin_manager

    old = set_plugin_manager(new_plugin_manager(autoload=True))
    try:
        out = tmp_path / "xy"
        assert (
            main(
                [
                    "sample",
                    "--out",
                    str(out),
                    "--no-progress",
                    "--set",
                    "action.name=xy",
                    "--set",
                    "action.beta=1.0",
                    "--set",
                    "lattice=[16]",
                    "--set",
                    "kernel.type=xy-metropolis",
                ]
            )
            == 0
        )
    finally:
        set_plugin_manager(old)
    assert "steps of xy-metropolis" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kernel"] == "xy-metropolis" and "flow" not in summary and summary["lattice"] == [16]
    r = summary["observables"]["xy_bond_energy"]
    exact = exact_bond_energy(16, 1.0)
    assert 0 < r["error"] < 0.01
    assert abs(r["mean"] - exact) < 3 * r["error"], (r, exact)
