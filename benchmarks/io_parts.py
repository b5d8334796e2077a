"""Parts of the I/O benchmark: the group check and the permuted copy, formulation against formulation.

Times, on the links of a 16^4 configuration (262144 SU(3) matrices, in memory), round-robin
and best of ``--repeat`` rounds (as ``benchmarks/io.py``):

- the group check: flowplug's (``flowplug.linkcheck.matrices_deviation`` over chunks of
  16384, structure of arrays), the formula used before (products of the strided entries,
  chunks of 32768), and a cheaper test that flowplug does not use (rows 0 and 1
  orthonormal, row 2 equal to conj(row 0 x row 1); it bounds the documented quantities
  only up to constant factors, see docs/io.md);
- the byte swap of a stored (big-endian) 1 MiB piece that is in cache, as the reader's
  pieces are (36 times, about one configuration): numpy's in-place ``byteswap``
  (flowplug's before issue 16 item 5), the swapping copy into a second buffer
  (``flowplug.adapters.common._to_native``, flowplug's now) and a plain copy (the limit);
- the permuted copy ILDG order -> canonical order of the whole configuration: numpy with
  one void item per 3 x 3 matrix (flowplug's), torch's strided ``copy_``, and a plain
  contiguous copy of the same bytes (the limit); then piece by piece, as the reader does
  it (each piece first copied to a scratch buffer, standing for the read): pieces of
  about 1 MiB in file order (flowplug's reader), and pieces of the same size that span 4
  or all 16 time slices (runs of 4 / 16 consecutive matrices in the canonical output,
  tried for issue 16 item 5: faster here, but not in ``io.read``, where each piece then
  needs one positional read and one checksum call per time slice).

Prints one JSON line per candidate: ms and the ratio to the first candidate of its group.

Run:  OMP_NUM_THREADS=1 python benchmarks/io_parts.py [--repeat 9] [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def random_su3(count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` random SU(3) matrices (QR of Gaussian matrices, det fixed), complex128."""
    z = rng.normal(size=(count, 3, 3)) + 1j * rng.normal(size=(count, 3, 3))
    q, r = np.linalg.qr(z)
    d = np.diagonal(r, axis1=-2, axis2=-1)
    q = q * (d / np.abs(d))[..., None, :]
    q[..., :, 0] /= np.linalg.det(q)[..., None]
    return q


def strided_check(u: np.ndarray) -> tuple[float, float]:
    """The formula of flowplug before issue 16 item 5: products of strided entries, chunks of 32768."""
    unit = det = 0.0
    for start in range(0, u.shape[0], 32768):
        c = u[start : start + 32768]
        e = [[c[:, i, k] for k in range(3)] for i in range(3)]
        r = c.view(np.float64)
        norms = np.einsum("mik,mik->mi", r, r) - 1
        unit = max(unit, float(np.abs(norms).max()))
        for i in range(3):
            for j in range(i + 1, 3):
                g = sum(e[i][k] * e[j][k].conj() for k in range(3))
                unit = max(unit, float(np.abs(g).max()))
        d = (
            e[0][0] * (e[1][1] * e[2][2] - e[1][2] * e[2][1])
            - e[0][1] * (e[1][0] * e[2][2] - e[1][2] * e[2][0])
            + e[0][2] * (e[1][0] * e[2][1] - e[1][1] * e[2][0])
        )
        det = max(det, float(np.abs(d - 1).max()))
    return unit, det


def cheap_check(u: np.ndarray) -> float:
    """Rows 0, 1 orthonormal and row 2 = conj(row 0 x row 1): one number per chunk (not flowplug's test)."""
    worst = 0.0
    for start in range(0, u.shape[0], 16384):
        c = u[start : start + 16384]
        s = np.empty((9, c.shape[0]), dtype=np.complex128)
        np.copyto(s.T, c.reshape(-1, 9))
        e = s.reshape(3, 3, -1)
        n0 = (np.abs(e[0]) ** 2).sum(0) - 1
        n1 = (np.abs(e[1]) ** 2).sum(0) - 1
        g = (e[0] * e[1].conj()).sum(0)
        cross = [
            e[0, 1] * e[1, 2] - e[0, 2] * e[1, 1],
            e[0, 2] * e[1, 0] - e[0, 0] * e[1, 2],
            e[0, 0] * e[1, 1] - e[0, 1] * e[1, 0],
        ]
        worst = max(worst, float(np.abs(n0).max()), float(np.abs(n1).max()), float(np.abs(g).max()))
        for k in range(3):
            worst = max(worst, float(np.abs(e[2, k] - cross[k].conj()).max()))
    return worst


def main() -> None:
    """Parse the arguments, time the candidates round-robin, print JSON lines."""
    from flowplug.adapters.common import _block, _to_native
    from flowplug.layout import from_ildg, to_ildg
    from flowplug.linkcheck import matrices_deviation

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = parser.parse_args()
    lattice = (16, 16, 16, 16)
    rng = np.random.default_rng(0)
    u = random_su3(4 * int(np.prod(lattice)), rng)
    src = u.reshape(*reversed(lattice), 4, 3, 3)  # the values in ILDG (file) order
    out = np.empty((4, *lattice, 3, 3), dtype=np.complex128)
    block = _block(3, 16)
    dst_blocks = to_ildg(out.reshape(4, *lattice, 9).view(block).reshape(4, *lattice, 1, 1))[..., 0, 0]
    src_blocks = src.reshape(*reversed(lattice), 4, 9).view(block)[..., 0]
    t_src, t_out = torch.from_numpy(src), torch.from_numpy(out)
    stored = np.dtype(">c16")
    swap_src = u.reshape(-1).view(np.uint8)[: 1 << 20].copy()
    swap_dst = np.empty_like(swap_src)
    flat = np.empty_like(src)

    def flowplug_check() -> None:
        for start in range(0, u.shape[0], 16384):
            matrices_deviation(u[start : start + 16384])

    lt = lattice[-1]
    slice_shape = (*reversed(lattice[:-1]), 4)  # one time slice of the file order, in matrices
    piece_buf = np.empty(2 << 20, dtype=np.uint8)

    def pieces_file_order() -> None:  # 1 MiB pieces: one time slice, a range of its z index
        zs = max(1, (1 << 20) // (int(np.prod(slice_shape[1:])) * 144))
        for t in range(lt):
            for z in range(0, slice_shape[0], zs):
                part = src_blocks[t, z : z + zs]
                buf = piece_buf[: part.size * 144].view(block).reshape(part.shape)
                np.copyto(buf, part)  # the read of the piece
                np.copyto(dst_blocks[t, z : z + zs], buf)

    def pieces_across(span: int) -> None:  # pieces of about 1 MiB spanning ``span`` time slices
        ys = max(1, (1 << 20) // span // (int(np.prod(slice_shape[2:])) * 144))
        for t in range(0, lt, span):
            for z in range(slice_shape[0]):
                for y in range(0, slice_shape[1], ys):
                    part = src_blocks[t : t + span, z, y : y + ys]
                    buf = piece_buf[: part.size * 144].view(block).reshape(part.shape)
                    np.copyto(buf, part)
                    np.copyto(dst_blocks[t : t + span, z, y : y + ys], buf)

    groups = {
        "group check": {
            "flowplug (structure of arrays)": flowplug_check,
            "before (strided products)": lambda: strided_check(u),
            "cheaper test, not used": lambda: cheap_check(u),
        },
        "byte swap": {  # big-endian stored bytes -> native, one 1 MiB piece in cache, 36 times (as the reader's)
            "numpy in-place byteswap": lambda: [swap_src.view(">c16").byteswap(inplace=True) for _ in range(36)],
            "swapping copy (flowplug)": lambda: [_to_native(swap_dst, swap_src, stored) for _ in range(36)],
            "plain copy (limit)": lambda: [np.copyto(swap_dst, swap_src) for _ in range(36)],
        },
        "permuted copy": {
            "numpy, void blocks (flowplug)": lambda: np.copyto(dst_blocks, src_blocks),
            "torch strided copy_": lambda: t_out.copy_(from_ildg(t_src)),
            "plain contiguous copy (limit)": lambda: np.copyto(flat, src),
        },
        "permuted copy in pieces": {
            "1 MiB pieces in file order (flowplug's reader)": pieces_file_order,
            "1 MiB pieces across 4 time slices": lambda: pieces_across(4),
            "1 MiB pieces across all time slices": lambda: pieces_across(lt),
        },
    }
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times: dict = {(g, k): [] for g, cands in groups.items() for k in cands}
    for rnd in range(args.repeat + 1):
        for g, cands in groups.items():
            for k, fn in cands.items():
                t0 = clock()
                fn()
                if rnd:
                    times[(g, k)].append(clock() - t0)
    for g, cands in groups.items():
        first = min(times[(g, next(iter(cands)))])
        for k in cands:
            t = min(times[(g, k)])
            print(
                json.dumps(
                    {
                        "bench": "io_parts",
                        "clock": args.clock,
                        "repeat": args.repeat,
                        "threads": torch.get_num_threads(),
                        "group": g,
                        "candidate": k,
                        "ms": round(t * 1e3, 3),
                        "ratio_to_first": round(t / first, 3),
                    }
                )
            )


if __name__ == "__main__":
    main()
