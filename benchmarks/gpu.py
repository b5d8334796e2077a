"""Absolute speed on an accelerator, each next to the CPU figure measured in the same run.

One JSON line per measurement: ``{"item", "size", "device", "value", "unit", "cpu_value",
"ratio_device_over_cpu", "seconds"}``. Items:

* ``train_u1_multiscale``: training steps/s of the ``u1-multiscale`` flow of
  ``examples/train_u1_b6_l16.toml`` (path gradients, batch 64) at L = 16, 32, 64;
* ``train_su3_4d``: training steps/s of a 4-layer SU(3) flow (the layer and options of
  ``examples/train_su3_4d.toml``, batch 8) at 4^4 and 8^4;
* ``hmc_su3_4d``: HMC trajectories/s (Omelyan, 10 steps, one chain) of Wilson SU(3), beta 6,
  at 8^4 and 16^4;
* ``flow_samples_u1``: fresh samples/s (``flow.sample``, batch 1024, no gradients) of the
  L = 32 ``u1-multiscale`` flow;
* ``ildg_read``: GB/s of ``flowplug.io.read`` of a double-precision SU(3) ILDG file (SciDAC
  checksum, unitarity checks) including the copy to the device, 16^4.

Each rate is the number of operations done in about ``--budget`` seconds after one warm-up
operation, divided by their wall time (CUDA synchronised). On the CPU the large sizes get
one timed operation if one takes longer than the budget. ``--quick`` shrinks every size
(a smoke run for CI: ``python benchmarks/gpu.py --device cpu --quick``). An item that raises
gives a row with ``error`` (exception type and message) instead of figures, the others are
still measured, and the exit status is 1.

    python benchmarks/gpu.py                       # cuda when available, else cpu (< 10 min on one GPU)
    python benchmarks/gpu.py --device cpu --quick  # seconds
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def sync(device: torch.device) -> None:
    """Wait for queued work on ``device`` (CUDA) before reading the clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(op: Callable[[], object], device: torch.device, budget: float) -> tuple[float, float]:
    """(operations per second, seconds timed): one warm-up call, then calls until ``budget`` s."""
    op()
    sync(device)
    n, t0 = 0, time.perf_counter()
    while True:
        op()
        n += 1
        sync(device)
        elapsed = time.perf_counter() - t0
        if elapsed >= budget:
            return n / elapsed, elapsed


def _train_config(kind: str, L: int, quick: bool) -> dict[str, Any]:
    from flowplug.config import build_config
    from flowplug.jobs.train import DEFAULT_CONFIG, OPEN_TABLES

    if kind == "u1":
        overrides = [f"lattice=[{L}, {L}]", "flow.options.levels=6" if L > 8 else "flow.options.levels=4"]
        if quick:
            overrides += ["flow.options.hidden=[8]", "train.batch_size=8", "flow.n_layers=2"]
        config = REPO / "examples" / "train_u1_b6_l16.toml"
    else:
        overrides = [f"lattice=[{L}, {L}, {L}, {L}]", "flow.n_layers=4" if not quick else "flow.n_layers=1"]
        overrides += ["train.batch_size=8" if not quick else "train.batch_size=2"]
        config = REPO / "examples" / "train_su3_4d.toml"
    return build_config(
        DEFAULT_CONFIG,
        config_file=str(config),
        overrides=[*overrides, "train.progress=false", "threads=0"],
        open_tables=OPEN_TABLES,
    )


def train_rate(kind: str, L: int, device: torch.device, budget: float, quick: bool) -> tuple[float, float]:
    """Training steps/s of a fresh trainer (no output directory)."""
    from flowplug.train import build_trainer

    trainer = build_trainer(_train_config(kind, L, quick), device=device)
    trainer.out = None
    return rate(trainer.train_step, device, budget)


def hmc_rate(L: int, device: torch.device, budget: float) -> tuple[float, float]:
    """HMC trajectories/s of Wilson SU(3) at beta 6 on L^4 (one chain)."""
    from flowplug.plugins.hmc import HMC
    from flowplug.plugins.theories import WilsonGaugeAction

    act = WilsonGaugeAction(6.0, "su3")
    hmc = HMC(act, integrator="omelyan", steps=10, trajectory_length=1.0)
    gen = torch.Generator(device=device).manual_seed(1)
    state = [hmc.init(act.hot_start((L, L, L, L), 1, generator=gen, device=device))]

    def op() -> None:
        state[0], _ = hmc.step(state[0], gen)

    return rate(op, device, budget)


def sample_rate(L: int, device: torch.device, budget: float, quick: bool) -> tuple[float, float]:
    """Flow samples/s of a fresh u1-multiscale flow (batch 1024; 64 with --quick)."""
    from flowplug.train import build_trainer

    flow = build_trainer(_train_config("u1", L, quick), device=device).flow.eval()
    batch = 64 if quick else 1024
    gen = torch.Generator(device=device).manual_seed(2)

    def op() -> None:
        with torch.no_grad():
            flow.sample(batch, gen)

    r, t = rate(op, device, budget)
    return r * batch, t


def read_rate(L: int, device: torch.device, budget: float, work: Path) -> tuple[float, float]:
    """GB/s of io.read (checksum and checks) of an L^4 double SU(3) ILDG file, to ``device``."""
    import numpy as np

    from flowplug import io

    path = work / f"su3_{L}.ildg"
    if not path.exists():
        rng = np.random.default_rng(0)
        z = rng.normal(size=(1, 4, L, L, L, L, 3, 3)) + 1j * rng.normal(size=(1, 4, L, L, L, L, 3, 3))
        q, r = np.linalg.qr(z)
        d = np.diagonal(r, axis1=-2, axis2=-1)
        q = q * (d / np.abs(d))[..., None, :]
        q[..., :, 0] /= np.linalg.det(q)[..., None]
        io.write(path, io.Ensemble(torch.from_numpy(q), precision=64))
    gbytes = 4 * L**4 * 9 * 16 / 1e9

    def op() -> None:
        io.read(path).links.to(device)

    r, t = rate(op, device, budget)
    return r * gbytes, t


def measurements(
    a: argparse.Namespace, work: Path
) -> list[tuple[str, int, str, Callable[[torch.device], tuple[float, float]]]]:
    """(item, size, unit, measure(device)) of the run; files go to ``work``."""
    q, b = a.quick, a.budget
    out: list[tuple[str, int, str, Callable[[torch.device], tuple[float, float]]]] = []
    for L in [8] if q else [16, 32, 64]:
        out.append(("train_u1_multiscale", L, "steps/s", lambda d, L=L: train_rate("u1", L, d, b, q)))
    for L in [2] if q else [4, 8]:
        out.append(("train_su3_4d", L, "steps/s", lambda d, L=L: train_rate("su3", L, d, b, q)))
    for L in [4] if q else [8, 16]:
        out.append(("hmc_su3_4d", L, "trajectories/s", lambda d, L=L: hmc_rate(L, d, b)))
    L = 8 if q else 32
    out.append(("flow_samples_u1", L, "samples/s", lambda d, L=L: sample_rate(L, d, b, q)))
    L = 4 if q else 16
    out.append(("ildg_read", L, "GB/s", lambda d, L=L: read_rate(L, d, b, work)))
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: one JSON line per measurement, device and CPU side by side."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    ap.add_argument("--budget", type=float, default=None, help="seconds per measurement (default 5; 0.2 with --quick)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for the CPU figures (0: torch's default)")
    ap.add_argument("--items", default="", help="comma-separated items to measure (default: all)")
    a = ap.parse_args(argv)
    a.items = [s for s in a.items.split(",") if s]
    known = {"train_u1_multiscale", "train_su3_4d", "hmc_su3_4d", "flow_samples_u1", "ildg_read"}
    unknown = sorted(set(a.items) - known)
    if unknown:
        ap.error(f"--items: unknown {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    a.failed = []
    if a.budget is None:
        a.budget = 0.2 if a.quick else 5.0
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    with tempfile.TemporaryDirectory(prefix="flowplug-gpu-") as work:
        for row in rows(a, device, Path(work)):
            print(json.dumps(row), flush=True)
    if a.failed:
        print(f"gpu.py: failed: {', '.join(a.failed)} (rows with 'error')", file=sys.stderr)
    return 1 if a.failed else 0


def rows(a: argparse.Namespace, device: torch.device, work: Path):
    """Measure every item on ``device`` and on the CPU; yields the JSON rows."""
    cpu = torch.device("cpu")
    for item, size, unit, measure in measurements(a, work):
        if a.items and item not in a.items:
            continue
        try:
            value, seconds = measure(device)
            cpu_value = value if device.type == "cpu" else measure(cpu)[0]
        except Exception as exc:  # one failing item must not hide the others' figures
            a.failed.append(item)
            yield {"item": item, "size": size, "device": str(device), "error": f"{type(exc).__name__}: {exc}"}
            continue
        row = {
            "item": item,
            "size": size,
            "device": str(device),
            "value": value,
            "unit": unit,
            "cpu_value": cpu_value,
            "ratio_device_over_cpu": value / cpu_value if cpu_value > 0 else math.nan,
            "seconds": seconds,
            "cpu_threads": torch.get_num_threads(),
        }
        yield row


if __name__ == "__main__":
    sys.exit(main())
