"""How close each pseudofermion model r(phi | U) is to p(phi | U), side by side, on one set of gauge fields.

For the two-flavour Schwinger model's Wilson operator at each ``--kappas`` value, on
``--configs`` 2D U(1) configurations (HMC of the pure gauge action at ``--beta``, a stand-in
for the gauge fields a flow proposes; the first half trains the ``conditional`` model, the
second half is measured), each registered model is measured with
:func:`flowplug.plugins.pseudofermion_models.model_diagnostics`:

* ``kl_forward`` = E KL(p || r), ``kl_reverse`` = E KL(r || p) = -E_r[log w] in nats,
  w = p(phi | U) / r(phi | U);
* ``var_log_w``: the variance of log w for phi ~ r, the noise of a one-draw pseudo-marginal
  estimate of log det(D^+ D), which lowers the pseudo-marginal acceptance as much as a poor
  flow does;
* ``log_second_moment`` (largest over the configurations) and its median: log E_r[w^2] /
  E_r[w]^2, exact from the covariances (infinite unless C > M / 2: then the estimate of
  det M has infinite variance and a pseudo-marginal chain sticks after lucky draws);
* ``seconds_per_sample``: wall time of one ``sample`` call per configuration (k = 1), and its
  ratio to ``ilu``'s measured in the same run.

Models: ``white`` (scale 1), ``free``, ``ilu`` (:mod:`flowplug.plugins.fermion_schemes`),
``eo-ilu``, ``conditional`` (trained here by reverse KL, ``--train-steps`` Adam steps;
:mod:`flowplug.plugins.pseudofermion_models`), and ``ilu-1.2`` and ``eo-ilu-1.1`` (widened by
1.2 and 1.1). One JSON line per (kappa, model).

    python benchmarks/pseudofermion_models.py --json                 # 8x8, ~3 min on one core
    python benchmarks/pseudofermion_models.py --quick --json         # 4x4 smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import torch


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lattice", type=int, default=8)
    p.add_argument("--beta", type=float, default=4.0)
    p.add_argument("--kappas", type=str, default="0.2,0.24,0.26")
    p.add_argument("--configs", type=int, default=32)
    p.add_argument("--draws", type=int, default=16, help="draws per configuration for the diagnostics")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="4x4, few configurations and steps")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.lattice, a.configs, a.draws, a.train_steps, a.kappas = 4, 8, 4, 5, "0.24"
    return a


def gauge_fields(lattice: int, beta: float, n: int, seed: int) -> torch.Tensor:
    """n thermalised 2D U(1) configurations (HMC of the Wilson gauge action), (n, 2, L, L) float64."""
    from flowplug.plugins.hmc import HMC
    from flowplug.plugins.theories import WilsonGaugeAction

    act = WilsonGaugeAction(beta, "u1")
    hmc, g = HMC(act, steps=8), torch.Generator().manual_seed(seed)
    st = hmc.init(act.hot_start((lattice, lattice), n, generator=g))
    for _ in range(60):
        st, _ = hmc.step(st, g)
    return st.x


def run(a: argparse.Namespace) -> list[dict[str, Any]]:
    """Measure every model at every kappa; returns the JSON lines."""
    from flowplug.plugins.dirac import WilsonDiracOperator
    from flowplug.plugins.fermion_schemes import PSEUDOFERMION_MODELS
    from flowplug.plugins.pseudofermion_models import (
        ConditionalGaussianModel,
        EvenOddILUModel,
        model_diagnostics,
        train_conditional_model,
    )

    torch.set_num_threads(1)
    x = gauge_fields(a.lattice, a.beta, a.configs, a.seed)
    half = a.configs // 2
    train_x, test_x = x[:half], x[half:]
    lines = []
    for kappa in [float(k) for k in a.kappas.split(",")]:
        op = WilsonDiracOperator(kappa)
        models: dict[str, Any] = {name: PSEUDOFERMION_MODELS[name](op) for name in ("white", "free", "ilu")}
        models["eo-ilu"] = EvenOddILUModel(op)
        cond = ConditionalGaussianModel(op, 2, hidden=(8, 8))
        t0 = time.perf_counter()
        losses = train_conditional_model(cond, train_x, steps=a.train_steps, batch_size=8, k=2, lr=3e-3, seed=a.seed)
        train_seconds = time.perf_counter() - t0
        models["conditional"] = cond
        timing: dict[str, float] = {}
        models["ilu-1.2"] = PSEUDOFERMION_MODELS["ilu"](op, scale=1.2)
        models["eo-ilu-1.1"] = EvenOddILUModel(op, scale=1.1)
        for name, model in models.items():
            diag = model_diagnostics(model, test_x, k=a.draws, generator=torch.Generator().manual_seed(a.seed + 7))
            t0 = time.perf_counter()
            model.sample(test_x, 1, torch.Generator().manual_seed(0))
            timing[name] = (time.perf_counter() - t0) / test_x.shape[0]
            line = {
                "lattice": [a.lattice, a.lattice],
                "beta": a.beta,
                "kappa": kappa,
                "model": name,
                **{k: (v if v is None or not math.isfinite(v) else round(v, 4)) for k, v in diag.items()},
                "seconds_per_sample": timing[name],
            }
            if name == "conditional":
                line.update({"train_steps": a.train_steps, "train_seconds": round(train_seconds, 1)})
                line["train_loss_first_last"] = [round(losses[0], 3), round(losses[-1], 3)]
            lines.append(line)
        for line in lines:
            if line["kappa"] == kappa:
                line["time_ratio_to_ilu"] = round(timing[line["model"]] / timing["ilu"], 3)
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run and print JSON lines (``--json``) or a table."""
    a = parse(argv)
    lines = run(a)
    for line in lines:
        if a.json:
            print(json.dumps(line))
        else:
            print(
                f"kappa {line['kappa']:<5} {line['model']:<12} KL(p||r) {line['kl_forward']:8.3f}  "
                f"KL(r||p) {line['kl_reverse']:8.3f}  var log w {line['var_log_w']:10.3f}  "
                f"log E[w^2]/E[w]^2 {line['log_second_moment']}  "
                f"time/ilu {line['time_ratio_to_ilu']:.2f}"
            )
    ok = all(math.isfinite(v) for line in lines for k, v in line.items() if k.startswith("kl_"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
