"""Where the time of SU(3) HMC and of training goes on a GPU: parts timed side by side, kernels
and host synchronisations counted (one call on a lent GPU machine; ``--device cpu`` for a check).

Prints one JSON line per figure:

* ``check_force``: the SU(3) Wilson force and action on the device, with the link products of
  :func:`flowplug.groups.small_matmul` as broadcast multiply-adds and the staples of all planes
  gathered at once (``gathered``), as multiply-adds in a loop over planes (``loop``), and as
  batched GEMM (``gemm``, ``a @ b``), each against the CPU's float64 values (max abs difference);
* ``matmul``: 3x3 complex128 products of an L^4 field, ``a @ b`` against ``small_matmul``;
* ``force``, ``expmap``, ``roll``, ``trajectory`` (Omelyan, 10 steps; Wilson and Symanzik):
  milliseconds per call at L^4 (median of ``--repeat`` after a warm-up), in those three ways;
* ``profile_trajectory``: the ten CUDA kernels with the most device time in one trajectory;
* ``profile_train``: per training step of ``u1-multiscale`` (L = 16) and of the SU(3) 4D flow
  (8^4): kernel launches, device-to-host copies and synchronisations (hidden host round trips),
  and the operators that cause them.

    python benchmarks/gpu_parts.py                 # cuda
    python benchmarks/gpu_parts.py --device cpu --L 4 --repeat 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _ms(op, dev: torch.device, repeat: int) -> float:
    """Median milliseconds of ``op()`` over ``repeat`` calls after one warm-up call."""
    op()
    _sync(dev)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        op()
        _sync(dev)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _emit(**row) -> None:
    print(json.dumps(row), flush=True)


def _both(fn):
    """``fn()`` under the three ways of running the SU(N) products on CUDA: ``gathered`` (products
    as multiply-adds, Wilson staples of all planes at once), ``loop`` (multiply-adds, a loop over
    the planes) and ``gemm`` (``a @ b``, the loop): {variant: result}."""
    from flowplug import groups
    from flowplug.plugins import theories

    out = {}
    for name, elementwise, gathered in (("gathered", True, True), ("loop", True, False), ("gemm", False, False)):
        groups.SMALL_MATMUL_ELEMENTWISE, theories.GATHERED_STAPLES = elementwise, gathered
        try:
            out[name] = fn()
        finally:
            groups.SMALL_MATMUL_ELEMENTWISE, theories.GATHERED_STAPLES = True, True
    return out


def hmc_parts(dev: torch.device, L: int, repeat: int) -> None:
    from flowplug import groups
    from flowplug.plugins.gauge_actions import SymanzikGaugeAction
    from flowplug.plugins.hmc import HMC
    from flowplug.plugins.theories import WilsonGaugeAction

    act = WilsonGaugeAction(6.0, "su3")
    g = torch.Generator().manual_seed(1)
    x_cpu = act.hot_start((4, 4, 4, 4), 2, generator=g)
    x = x_cpu.to(dev)
    f_cpu, s_cpu = act.force(x_cpu), act.action(x_cpu)
    for name, (f, s) in _both(lambda: (act.force(x).cpu(), act.action(x).cpu())).items():
        _emit(
            item="check_force",
            products=name,
            force_max_abs_diff=float((f - f_cpu).abs().max()),
            action_max_abs_diff=float((s - s_cpu).abs().max()),
            force_max_abs=float(f_cpu.abs().max()),
        )
    gd = torch.Generator(device=dev).manual_seed(2)
    u = act.hot_start((L, L, L, L), 1, generator=gd, device=dev)
    a, b = u[:, 0], u[:, 1]
    _emit(
        item="matmul",
        L=L,
        gemm_ms=_ms(lambda: a @ b, dev, repeat),
        elementwise_ms=_ms(lambda: groups.small_matmul(a, b), dev, repeat),
    )
    _emit(item="roll", L=L, ms=_ms(lambda: torch.roll(a, -1, dims=1), dev, repeat))
    p = groups.random_algebra(tuple(u.shape[:-2]), 3, generator=gd, dtype=u.dtype, device=dev)
    for name, ms in _both(lambda: _ms(lambda: groups.expmap(0.1 * p), dev, repeat)).items():
        _emit(item="expmap", L=L, products=name, ms=ms)
    sym = SymanzikGaugeAction(6.0, "su3") if hasattr(SymanzikGaugeAction, "force") else None
    for label, action in (("wilson", act), ("symanzik", sym)):
        if action is None:
            continue
        for name, ms in _both(lambda action=action: _ms(lambda: action.force(u), dev, repeat)).items():
            _emit(item="force", action=label, L=L, products=name, ms=ms)
        hmc = HMC(action, integrator="omelyan", steps=10, trajectory_length=1.0)
        state = [hmc.init(u)]

        def traj(hmc=hmc, state=state):
            state[0], _ = hmc.step(state[0], gd)

        for name, ms in _both(lambda traj=traj: _ms(traj, dev, max(1, repeat // 3))).items():
            _emit(item="trajectory", action=label, L=L, products=name, ms=ms)
    if dev.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        hmc = HMC(act, integrator="omelyan", steps=10, trajectory_length=1.0)
        st = hmc.init(u)
        hmc.step(st, gd)
        _sync(dev)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            hmc.step(st, gd)
            _sync(dev)
        _emit(item="profile_trajectory", L=L, top=_top_kernels(prof, 10), **_launch_counts(prof))


def _device_time(e) -> float:
    return float(getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0))


def _top_kernels(prof, n: int) -> list:
    rows = [(e.key, _device_time(e) / 1e3, e.count) for e in prof.key_averages()]
    rows = [r for r in rows if r[1] > 0]
    rows.sort(key=lambda r: -r[1])
    return [{"name": k[:80], "device_ms": round(t, 3), "count": c} for k, t, c in rows[:n]]


_COUNTED = (
    "cudaLaunchKernel",
    "cuLaunchKernel",
    "cudaMemcpyAsync",
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "aten::_local_scalar_dense",
    "aten::item",
    "aten::nonzero",
)
_SYNCING = (
    "aten::item",
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::to",
    "aten::copy_",
    "aten::_to_copy",
    "aten::masked_select",
    "aten::unique",
    "aten::is_nonzero",
)


def _launch_counts(prof) -> dict:
    """Calls of the CUDA runtime and of the operators that read values back (``_COUNTED``)."""
    counts: dict[str, int] = {}
    for e in prof.key_averages():
        if e.key in _COUNTED:
            counts[e.key] = counts.get(e.key, 0) + e.count
    return {"counts": counts}


def _sync_sources(prof, n: int = 12) -> list:
    """CPU operators that include host synchronisation or copies (by name), most frequent first."""
    rows = [
        {"name": e.key[:80], "count": e.count, "cpu_ms": round(e.cpu_time_total / 1e3, 3)}
        for e in prof.key_averages()
        if e.key in _SYNCING
    ]
    rows.sort(key=lambda r: -r["count"])
    return rows[:n]


def train_parts(dev: torch.device, repeat: int, quick: bool) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu as gpu_bench  # the same configurations as benchmarks/gpu.py

    from flowplug.train import build_trainer

    for kind, L in (("u1", 8 if quick else 16), ("su3", 2 if quick else 8)):
        trainer = build_trainer(gpu_bench._train_config(kind, L, quick), device=dev)
        trainer.out = None
        ms = _ms(trainer.train_step, dev, repeat)
        row = {"item": "profile_train", "kind": kind, "L": L, "ms_per_step": ms}
        if dev.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                trainer.train_step()
                _sync(dev)
            row.update(_launch_counts(prof), sync_sources=_sync_sources(prof), top=_top_kernels(prof, 8))
            row["device_busy_ms"] = round(sum(_device_time(e) for e in prof.key_averages()) / 1e3, 2)
        _emit(**row)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--L", type=int, default=16, help="lattice extent of the HMC parts (L^4)")
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help="tiny training configurations")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: hmc, train")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    skip = set(a.skip.split(","))
    failed = False
    for name, part in (
        ("hmc", lambda: hmc_parts(dev, a.L, a.repeat)),
        ("train", lambda: train_parts(dev, a.repeat, a.quick)),
    ):
        if name in skip:
            continue
        try:
            part()
        except Exception as exc:  # report and go on: one call on a lent machine
            failed = True
            _emit(item=name, error=f"{type(exc).__name__}: {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
