"""The Schwinger and Yukawa examples run from the command line with every fermion scheme.

A few training steps of ``examples/train_schwinger.toml`` and ``examples/train_yukawa.toml``
on 4x4, then ``flowplug sample`` with each of the four kernels of arXiv:2106.05934 (Fig. 1)
as the examples' comments show them; the chains' exactness is tested in
``tests/test_fermion_schemes.py``, here the plumbing: configurations, registries, options,
summaries.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowplug.cli import main

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEMES = {
    "exact-marginal": [],
    "pseudo-marginal": ["kernel.options.n_pseudofermions=2", "kernel.options.scale=1.2"],
    "fermion-gibbs": [],
    "fermion-joint": [],
}


@pytest.fixture(scope="module")
def flows(tmp_path_factory):
    d = tmp_path_factory.mktemp("fermion-cli")
    for model in ("schwinger", "yukawa"):
        args = ["train", "--config", str(REPO / "examples" / f"train_{model}.toml")]
        for s in (f"out={d / model}", "train.steps=3", "lattice=[4,4]", "eval.samples=32", "train.progress=false"):
            args += ["--set", s]
        assert main(args) == 0
    return d


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize(("model", "pf_model"), [("schwinger", "eo-ilu"), ("yukawa", "free")])
def test_every_scheme_runs_from_the_command_line(flows, tmp_path, model, pf_model, scheme):
    out = tmp_path / "s"
    sets = ["kernel.type=" + scheme, "chains=3", "steps=3", "thermalize=1", "ess_samples=16"]
    sets += SCHEMES[scheme]
    if scheme in ("pseudo-marginal", "fermion-joint"):
        sets.append(f"kernel.options.pseudofermion={pf_model}")
    args = ["sample", "--flow", str(flows / model), "--out", str(out), "--no-progress"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kernel"] == scheme and summary["chains"] == 3 and summary["steps"] == 3
    condensate = "chiral_condensate" if model == "schwinger" else "staggered_condensate"
    assert condensate in summary["observables"]
    if scheme in ("pseudo-marginal", "fermion-joint"):
        assert summary["kernel_config"]["options"]["pseudofermion"] == pf_model
