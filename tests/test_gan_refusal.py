"""GAN proposals are refused with an explanation; configurations of a generator may seed exact
chains, which then reproduce exact values whatever the seeds were (docs/chains.md)."""

from __future__ import annotations

import math

import pytest
import torch

from flowplug import io
from flowplug.config import build_config
from flowplug.errors import ConfigError
from flowplug.exact import u1_2d
from flowplug.jobs.chains import build_kernel
from flowplug.jobs.hmc import DEFAULT_CONFIG, run_hmc
from flowplug.theory import action_from_config


@pytest.mark.parametrize("name", ["gan", "generator"])
def test_gan_kernel_is_refused_with_the_alternatives(name):
    act = action_from_config({"name": "wilson", "group": "u1", "beta": 2.0})
    with pytest.raises(ConfigError) as err:
        build_kernel(None, act, {"type": name, "hmc_every": 0, "options": {}, "hmc": {}})
    msg = " ".join(str(err.value).split())
    assert "no tractable density" in msg and "normalizing flow" in msg and "start=FILE" in msg


def test_chains_seeded_by_wrong_configurations_are_exact(tmp_path):
    """A stand-in for a poor generator: 16 nearly ordered 8 x 8 U(1) configurations (plaquette
    ~0.99, far from the exact 0.6978 at beta = 2) seed HMC; after 50 trajectories of
    thermalisation the plaquette of 300 more agrees with the exact value within 3 sigma."""
    gen = torch.Generator().manual_seed(7)
    seeds = 0.1 * torch.randn(16, 2, 8, 8, generator=gen, dtype=torch.float64)
    path = tmp_path / "generator.h5"
    io.write(path, io.Ensemble(seeds))
    cfg = build_config(
        DEFAULT_CONFIG,
        overrides=[
            f"out='{tmp_path / 'run'}'",
            f"start='{path}'",
            "lattice=[8, 8]",
            "chains=16",
            'action.name="wilson"',
            'action.group="u1"',
            "action.beta=2.0",
            "hmc.trajectories=350",
            "hmc.thermalization=50",
            "progress=false",
            "save_every=0",
        ],
    )
    s = run_hmc(cfg)
    p = s["observables"]["plaquette"]
    exact = u1_2d(8, 2.0)["plaquette"]
    assert math.isfinite(p["error"]) and p["error"] < 0.01
    assert abs(p["mean"] - exact) < 3 * p["error"], (p, exact)
