r"""Per-part profile of one 4D ``sun-stout`` layer, next to a whole ``sun-spectral`` layer.

Forward and backward (a stand-in loss: log-det plus the real part of the output) of one coupling
of ``examples/train_su3_4d.toml``'s architecture (4^4, SU(3), hidden [8], 2 modes x 2 steps,
batch 16, randomised weights), and of its parts, each on its own with the same inputs:

``features``
    the traces of the frozen plaquettes (the conditioner's input) and their backward;
``conditioner``
    the convolutional network (full first convolution, strided last one);
``stout_map``
    eigensystem, eigenphase steps, left factor and log-det, with the hand-written backward;
``gathers_products``
    the gather of the active loops' four links, their products, the update G U and the
    scatter back;
``rest``
    the layer minus the parts (what the parts share, autograd bookkeeping);
``pair_shared_per_layer``, ``pair_plain_per_layer``
    half the time of two consecutive layers (``--index`` - 1 and ``--index``), forward and
    backward, as in a flow: the second layer takes the traces of the frozen plaquettes that
    the first one left (``shared``), or computes all of its own (``plain``,
    ``share_traces = False``). The single-layer figures above start from a plain tensor, so
    they are those of the first layer of a flow.

Every part runs in turn in each round (thread CPU time, the median of ``--repeat`` rounds), so
that all see the same load. Prints one JSON line with the times in ms and the ratio of the
``sun-spectral`` layer to the ``sun-stout`` layer.

Run: ``OMP_NUM_THREADS=1 python benchmarks/stout_profile.py``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from flowplug import gauge, groups
from flowplug.plugins import flow_stout
from flowplug.plugins.flow_gauge import SUNSpectralCoupling


def main() -> None:
    """Build the layers, time the parts in alternation, print one JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--index", type=int, default=5, help="position of the layer in the flow (its mask)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    lattice, b = (4, 4, 4, 4), args.batch
    torch.manual_seed(0)
    stout = flow_stout.SUNStoutCoupling(
        lattice=lattice, field="su3", index=args.index, hidden=(8,), n_modes=2, n_steps=2, init_scale=1.0
    )
    previous = flow_stout.SUNStoutCoupling(
        lattice=lattice, field="su3", index=args.index - 1, hidden=(8,), n_modes=2, n_steps=2, init_scale=1.0
    )
    spectral = SUNSpectralCoupling(
        lattice=lattice, field="su3", index=args.index, hidden=(8,), n_bins=8, init_scale=1.0
    )
    z = groups.haar_random((b, 4, *lattice), 3, generator=torch.Generator().manual_seed(0))

    def layer(m: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            u = z.clone().requires_grad_(True)
            x, ld = m(u)
            (ld.sum() + x.real.sum()).backward()

        return run

    def features() -> None:
        u = z.clone().requires_grad_(True)
        part = gauge.PlaquetteTraces.apply(u.flatten(1, 5), stout.frozen_plaquettes, torch.complex64)
        tr = part.new_zeros(b, 6 * 256).index_copy(1, stout.frozen_at, part)
        (tr.real.sum() + tr.imag.sum()).backward()

    tr = flow_stout.plaquette_traces(z, torch.complex64)
    re, im = tr.real.clone().requires_grad_(True), tr.imag.clone().requires_grad_(True)

    def conditioner() -> None:
        stout._condition(re, im, None, stripe=True).sum().backward()

    with torch.no_grad():
        params = stout._condition(tr.real, tr.imag, None, stripe=True).flatten(0, 4)
        link, a, c, d = z.flatten(1, 5).index_select(1, stout.loop_links).unflatten(1, (4, -1)).unbind(1)
        loop = (link @ (a @ c.mH @ d.mH)).permute(2, 3, 0, 1).reshape(3, 3, -1).contiguous()

    def stout_map() -> None:
        w, p = loop.clone().requires_grad_(True), params.clone().requires_grad_(True)
        g, ld = flow_stout._stout_left_axes_first(w, p, 2, 2, max_curvature=0.9, inverse=False)
        (ld.sum() + g.real.sum()).backward()

    def gathers_products() -> None:
        u = z.clone().requires_grad_(True)
        flat = u.flatten(1, 5)
        link, a1, c1, d1 = flat.index_select(1, stout.loop_links).unflatten(1, (4, -1)).unbind(1)
        lp = (link @ (a1 @ c1.mH @ d1.mH)).permute(2, 3, 0, 1).reshape(3, 3, -1).contiguous()
        g = lp.detach().clone().requires_grad_(True)
        out = flat.index_copy(1, stout.loop_links[: link.shape[1]], g.view(3, 3, b, -1).permute(2, 3, 0, 1) @ link)
        (out.real.sum() + lp.real.sum()).backward()

    def pair(share: bool) -> Callable[[], None]:
        def run() -> None:
            previous.share_traces = stout.share_traces = share
            u = z.clone().requires_grad_(True)
            y, ld0 = previous(u)
            x, ld1 = stout(y)
            (ld0.sum() + ld1.sum() + x.real.sum()).backward()
            previous.share_traces = stout.share_traces = True

        return run

    parts: dict[str, Callable[[], None]] = {
        "sun_stout_layer": layer(stout),
        "features": features,
        "conditioner": conditioner,
        "stout_map": stout_map,
        "gathers_products": gathers_products,
        "sun_spectral_layer": layer(spectral),
        "pair_shared": pair(True),
        "pair_plain": pair(False),
    }
    times: dict[str, list[float]] = {k: [] for k in parts}
    for rep in range(args.repeat + 2):
        for name, fn in parts.items():
            t0 = time.thread_time()
            fn()
            if rep >= 2:  # two warm-up rounds
                times[name].append(time.thread_time() - t0)
    ms = {k: round(1e3 * statistics.median(v), 2) for k, v in times.items()}
    ms["rest"] = round(
        ms["sun_stout_layer"] - ms["features"] - ms["conditioner"] - ms["stout_map"] - ms["gathers_products"], 2
    )
    ms["pair_shared_per_layer"] = round(ms.pop("pair_shared") / 2, 2)
    ms["pair_plain_per_layer"] = round(ms.pop("pair_plain") / 2, 2)
    row = {"lattice": list(lattice), "batch": b, "threads": torch.get_num_threads(), "ms": ms}
    row["spectral_over_stout"] = round(ms["sun_spectral_layer"] / ms["sun_stout_layer"], 2)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
