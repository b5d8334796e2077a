"""Run flowplug's sampling jobs from a list of specifications, in one process or as one rank of
a torchrun world (tests/test_sharded_sampling.py).

As a script under torchrun, ``python -m torch.distributed.run --standalone --nproc_per_node=2
tests/_sharded_jobs.py SPECS.json`` joins a gloo process group once, runs every specification
in order on every rank (so a run and its resume share one launch) and leaves the group.

A specification is ``{"job": "hmc" | "sample" | "resample", "set": [key=value, ...],
"out": DIR, "resume": bool, "flow": CHECKPOINT, "inputs": [PATH, ...]}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one job specification in this process (one rank of the world, or a world of one)."""
    from flowplug.config import build_config

    job = spec["job"]
    sets = list(spec.get("set", []))
    resume = bool(spec.get("resume", False))
    if job == "hmc":
        from flowplug.jobs.hmc import DEFAULT_CONFIG, OPEN_TABLES, run_hmc

        cfg = build_config(DEFAULT_CONFIG, overrides=[*sets, f"out='{spec['out']}'"], open_tables=OPEN_TABLES)
        return run_hmc(cfg, resume=resume, progress=False)
    if job == "sample":
        from flowplug.jobs.sample import DEFAULT_CONFIG, OPEN_TABLES, run_sample

        cfg = build_config(DEFAULT_CONFIG, overrides=sets, open_tables=OPEN_TABLES)
        flow = Path(spec["flow"]) if spec.get("flow") else None
        return run_sample(cfg, flow, Path(spec["out"]), resume=resume)
    if job == "resample":
        from flowplug.jobs.resample import DEFAULT_CONFIG, OPEN_TABLES, run_resample

        cfg = build_config(DEFAULT_CONFIG, overrides=sets, open_tables=OPEN_TABLES)
        return run_resample(cfg, spec["inputs"], Path(spec["flow"]), Path(spec["out"]), resume=resume)
    raise ValueError(f"unknown job {job!r}")


def main(path: str) -> int:
    """Join the gloo group torchrun describes, run every specification of ``path``, leave."""
    import warnings

    import torch
    import torch.distributed as dist

    warnings.simplefilter("ignore")  # ShortChainWarning of the tiny runs
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        for spec in json.loads(Path(path).read_text()):
            run_spec(spec)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
