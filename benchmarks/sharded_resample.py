"""Sharded ``flowplug resample`` over a directory of many small files: 1 process against W.

Writes ``--files`` U(1) configurations (one HDF5 file each) and an untrained U(1) flow, then
times, side by side in the same run, the command as a user types it (wall clock of the whole
command, process start-up included):

* ``flowplug resample DIR --flow F`` in one process (``streams = 1``),
* ``torchrun --standalone --nproc_per_node=W -m flowplug resample DIR --flow F``
  (each process reads, checksums, weighs and resamples 1/W of the files),
* ``flowplug resample ... --set streams=W`` in one process, whose ``summary.json`` must equal
  the W-process run's figure for figure (``identical``).

Prints one JSON line per run and a last line with the ratio (W-process files/s over
1-process files/s). On a machine shared with other work the ratio is a lower bound of what
W free cores give.

Run:  OMP_NUM_THREADS=1 python benchmarks/sharded_resample.py [--files 1000] [--nproc 2]
      [--lattice 8x8] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _setup(root: Path, files: int, lattice: list[int]) -> Path:
    """The input directory and the flow checkpoint (returned)."""
    from flowplug import io
    from flowplug.plugins.theories import WilsonGaugeAction
    from flowplug.train import build_trainer

    cfg = {
        "lattice": lattice,
        "seed": 0,
        "device": "cpu",
        "action": {"name": "wilson", "group": "u1", "beta": 1.0},
        "flow": {"layers": ["u1-spline"], "n_layers": 2, "options": {"hidden": [8]}},
        "train": {"steps": 0, "batch_size": 8, "progress": False, "checkpoint_every": 0},
    }
    trainer = build_trainer(cfg, out=root / "flow-run")
    trainer.run()
    flow = trainer.save_checkpoint(root / "flow.pt")
    act = WilsonGaugeAction(1.0, "u1")
    g = torch.Generator().manual_seed(1)
    (root / "cfgs").mkdir()
    for i in range(files):
        io.write(root / "cfgs" / f"cfg{i:05d}.h5", io.Ensemble(act.hot_start(tuple(lattice), 1, generator=g)))
    return Path(flow)


def _run(cmd: list[str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--lattice", default="8x8")
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    lattice = [int(n) for n in args.lattice.split("x")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        flow = _setup(root, args.files, lattice)
        base = ["resample", str(root / "cfgs"), "--flow", str(flow), "--no-progress", "--set", f"steps={args.steps}"]
        runs = {
            "one": [sys.executable, "-m", "flowplug", *base, "--out", str(root / "one")],
            "sharded": [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={args.nproc}",
                "-m",
                "flowplug",
                *base,
                "--out",
                str(root / "sharded"),
            ],
            "one_streams": [
                sys.executable,
                "-m",
                "flowplug",
                *base,
                "--set",
                f"streams={args.nproc}",
                "--out",
                str(root / "one_streams"),
            ],
        }
        seconds = {}
        for name, cmd in runs.items():
            seconds[name] = _run(cmd)
            procs = args.nproc if name == "sharded" else 1
            print(
                json.dumps(
                    {
                        "run": name,
                        "processes": procs,
                        "files": args.files,
                        "lattice": lattice,
                        "steps": args.steps,
                        "seconds": round(seconds[name], 3),
                        "files_per_s": round(args.files / seconds[name], 2),
                    }
                ),
                flush=True,
            )
        a = json.loads((root / "sharded" / "summary.json").read_text())
        b = json.loads((root / "one_streams" / "summary.json").read_text())
        same = all(a[k] == b[k] for k in ("acceptance", "ess", "ess_p_samples", "observables", "inputs"))
        print(
            json.dumps(
                {
                    "ratio_sharded_over_one": round(seconds["one"] / seconds["sharded"], 3),
                    "processes": args.nproc,
                    "cpus": os.cpu_count(),
                    "load_average_1min": round(os.getloadavg()[0], 2),  # other work on the machine
                    "identical_to_one_process_with_streams": same,
                }
            )
        )


if __name__ == "__main__":
    main()
