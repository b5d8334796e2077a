r"""4D conditioner convolutions: the per-configuration fast paths against their fallbacks.

A training step (forward map, a stand-in loss, backward) of a ``sun-stout`` or ``sun-spectral``
flow on a 4D lattice, timed with each :class:`flowplug.plugins.flow_nets.PeriodicConv` path:

``fast``
    the default: full convolutions with dense DFT matrices in two stages (lattices of at most
    ``_DENSE_DFT_SITES`` sites), one product per configuration (``torch.bmm``), and strided
    outputs as the strided rows of those;
``fallback``
    ``_DENSE_DFT_SITES = 0``: torch.fft, and the direct strided convolution.

The two alternate in the same process (thread CPU time, the median of ``--repeat`` steps
each), so both see the same load. Prints one JSON line per layer kind with both times and
their ratio ``fast_over_fallback``.

Run: ``OMP_NUM_THREADS=1 python benchmarks/conv4d_paths.py --lattice 4 4 4 4 --batch 16``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from flowplug.flow import build_flow
from flowplug.plugins import flow_nets


def _step(flow, z: torch.Tensor) -> None:
    """One forward map and the backward of a stand-in loss (log-det plus the real part of the field)."""
    x, logdet = flow.forward(z)
    loss = (logdet + x.real.flatten(1).sum(1)).mean()
    loss.backward()


def main() -> None:
    """Parse the options, time both paths per layer kind, print JSON lines."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lattice", type=int, nargs=4, default=[4, 4, 4, 4])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, nargs="+", default=[8])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--kinds", nargs="+", default=["sun-stout", "sun-spectral"])
    args = ap.parse_args()
    default = flow_nets._DENSE_DFT_SITES
    for kind in args.kinds:
        torch.manual_seed(0)
        flow = build_flow(
            "su3", tuple(args.lattice), [kind], n_layers=args.layers, options={"hidden": args.hidden, "init_scale": 1.0}
        )
        z, _ = flow.sample_latent(args.batch, torch.Generator().manual_seed(0))
        times: dict[str, list[float]] = {"fast": [], "fallback": []}
        for rep in range(args.repeat + 1):
            for name, sites in (("fast", default), ("fallback", 0)):
                flow_nets._DENSE_DFT_SITES = sites
                t0 = time.process_time()
                _step(flow, z)
                if rep:  # the first round warms the caches
                    times[name].append(time.process_time() - t0)
        flow_nets._DENSE_DFT_SITES = default
        fast, fallback = statistics.median(times["fast"]), statistics.median(times["fallback"])
        print(
            json.dumps(
                {
                    "layer": kind,
                    "lattice": args.lattice,
                    "batch": args.batch,
                    "n_layers": args.layers,
                    "hidden": args.hidden,
                    "threads": torch.get_num_threads(),
                    "fast_s": round(fast, 4),
                    "fallback_s": round(fallback, 4),
                    "fast_over_fallback": round(fast / fallback, 3),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
