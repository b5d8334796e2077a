"""I/O benchmark: read+verify and write of a 16^4 double-precision SU(3) configuration.

Every figure is compared with the limit measured in the same run on the same bytes:
``numpy.fromfile`` of the ILDG payload plus an in-place byte swap (no checksum, no
layout change). All candidates are called round-robin, ``--repeat`` rounds, and the
best time of each is kept, so that every ratio compares times taken under the same
machine load. Prints a table and one JSON line per operation (times in ms, ratio =
raw time / this time; 1.0 = as fast as the raw read).

Run:  OMP_NUM_THREADS=1 python benchmarks/io.py [--lattice 16x16x16x16] [--repeat 9] [--clock wall|cpu] [--threads N]
      (``--clock cpu`` times the process's CPU time instead of the wall clock: steadier
      on a shared machine, but it adds up the time of every thread, so it cannot show
      what threads gain)
      (``--threads N`` sets torch's intra-op threads, which flowplug's I/O uses as its
      pool size (``flowplug.linkcheck.io_threads``); default: torch's setting, i.e.
      OMP_NUM_THREADS. The raw reference is always one single-threaded numpy call.)
      (FLOWPLUG_LYNCS_PYTHON=/path/to/python with lyncs-io adds lyncs-io's load time)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from _timing import best  # (benchmarks/ is on sys.path when run as a script)

LYNCS_TIMER = """
import time, numpy as np, lyncs_io
def best(fn):
    ts = []
    for _ in range({repeat}):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return min(ts)
def raw():
    a = np.fromfile({path!r}, dtype=">c16", count={count}, offset={offset}); a.byteswap(inplace=True)
print(best(lambda: np.asarray(lyncs_io.load({path!r}, format="lime"))), best(raw))
"""


def best_interleaved(fns: dict, repeat: int, clock=time.perf_counter) -> dict:
    """Best time of each function, calling them round-robin ``repeat`` times (after one warm-up round).

    Interleaving exposes every candidate to the same machine load, so the ratios are
    meaningful on a shared machine even when absolute times drift. A function may
    return a path: it is deleted after the timing (a file written for the occasion).
    """
    times: dict = {k: [] for k in fns}
    for rnd in range(repeat + 1):
        for k, fn in fns.items():
            t0 = clock()
            out = fn()
            elapsed = clock() - t0
            if rnd:
                times[k].append(elapsed)
            if isinstance(out, Path):
                out.unlink()
    return {k: min(v) for k, v in times.items()}


def random_su3(shape, rng):
    """Random SU(3) matrices, shape (*shape, 3, 3), complex128 (QR of Gaussian matrices)."""
    z = rng.normal(size=(*shape, 3, 3)) + 1j * rng.normal(size=(*shape, 3, 3))
    q, r = np.linalg.qr(z)
    d = np.diagonal(r, axis1=-2, axis2=-1)
    q = q * (d / np.abs(d))[..., None, :]
    q[..., :, 0] /= np.linalg.det(q)[..., None]
    return q


def main() -> None:
    """Parse the arguments and run the benchmark in a temporary folder (removed afterwards)."""
    from flowplug import io

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lattice", default="16x16x16x16")
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--threads", type=int, default=0, help="torch/flowplug I/O threads (0: torch's setting)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    lattice = io.parse_lattice(args.lattice)
    rng = np.random.default_rng(0)
    links = torch.from_numpy(random_su3((1, 4, *lattice), rng))
    ens = io.Ensemble(links, precision=64)
    work = Path(tempfile.mkdtemp(prefix="flowplug-bench-"))
    try:
        run(args, io, ens, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args, io, ens, work: Path) -> None:
    """Write the test file into ``work``, time every candidate, print the table."""
    from flowplug.adapters.checksums import scidac_checksum
    from flowplug.adapters.common import read_payload
    from flowplug.adapters.lime import scan

    path = work / "cfg.ildg"
    io.write(path, ens, overwrite=True)
    rec = next(r for r in scan(path) if r.type == "ildg-binary-data")
    nbytes = rec.length
    site_bytes = 4 * 9 * 16

    def raw():
        a = np.fromfile(path, dtype=">c16", count=nbytes // 16, offset=rec.data_offset)
        a.byteswap(inplace=True)
        return a

    def raw_plus_crc():
        a = np.fromfile(path, dtype=np.uint8, count=nbytes, offset=rec.data_offset)
        import zlib

        zlib.crc32(a)
        return a

    def read_checksum():
        a = read_payload(path, rec.data_offset, nbytes, "payload")
        scidac_checksum(a, site_bytes)
        a = a.view(">c16")
        a.byteswap(inplace=True)
        return a

    payload = np.fromfile(path, dtype=np.uint8, count=nbytes, offset=rec.data_offset)  # read once, outside the timing

    def checksum_only():
        return scidac_checksum(payload, site_bytes)

    h5 = work / "cfg.h5"
    io.write(h5, ens)
    import h5py

    def h5_raw():
        with h5py.File(h5, "r") as f:
            return f["links"][0]

    counter = itertools.count()
    stored = ens.links.numpy().copy()

    def write_over():  # replaces the file read by the other candidates (same bytes)
        io.write(path, ens, overwrite=True)

    def write_new():  # a new file each time (the production case); deleted outside the timing
        out = work / f"new{next(counter)}.ildg"
        io.write(out, ens)
        return out

    view = io.read(path, contiguous=False)  # links whose memory is in file order
    links = ens.links

    def write_view_new():  # no permutation needed (a read-convert-write job)
        out = work / f"view{next(counter)}.ildg"
        io.write(out, view)
        return out

    def raw_write():  # numpy tofile of the same number of bytes, new file: the write limit
        out = work / f"raw{next(counter)}.bin"
        stored.tofile(out)
        return out

    from flowplug.threads import job_threads

    def one_thread(fn):  # the same operation on one thread, timed in the same rounds
        def run_one():
            with job_threads(1):
                return fn()

        return run_one

    single = {}
    if args.threads > 1:
        single = {
            "full_1t": one_thread(lambda: io.read(path)),
            "nounit_1t": one_thread(lambda: io.read(path, unitarity="ignore")),
            "h5_1t": one_thread(lambda: io.read(h5, unitarity="ignore")),
            "write_new_1t": one_thread(write_new),
        }
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = best_interleaved(
            {
                **single,
                "raw": raw,
                "rawcrc": raw_plus_crc,
                "ck": checksum_only,
                "rc": read_checksum,
                "nounit": lambda: io.read(path, unitarity="ignore"),
                "full": lambda: io.read(path),
                "view_nounit": lambda: io.read(path, unitarity="ignore", contiguous=False),
                "view_full": lambda: io.read(path, contiguous=False),
                "group": lambda: io.group_deviation(links),
                "h5": lambda: io.read(h5, unitarity="ignore"),
                "h5raw": h5_raw,
                "write": write_over,
                "write_new": write_new,
                "write_view_new": write_view_new,
                "raw_write": raw_write,
            },
            args.repeat,
            clock,
        )
    t_raw = t["raw"]
    mb = nbytes / 2**20
    print(
        f"lattice {args.lattice}, SU(3) double, payload {nbytes / 1e6:.1f} MB, best of {args.repeat} "
        f"interleaved rounds, {args.clock} clock, {args.threads} flowplug I/O thread(s)"
    )
    rows = [
        ("raw", "raw numpy.fromfile + byteswap (the limit)"),
        ("rawcrc", "raw numpy.fromfile + one zlib.crc32 of the payload"),
        ("ck", "SciDAC checksum alone (in memory, vectorised)"),
        ("rc", "flowplug read + SciDAC checksum + byteswap (file order)"),
        ("nounit", "flowplug io.read, canonical torch tensor, no unitarity check"),
        ("full", "flowplug io.read, full (finite + unitarity + det check)"),
        ("view_nounit", "io.read(contiguous=False), view of file order, no unitarity"),
        ("view_full", "io.read(contiguous=False), full checks"),
        ("group", "max |UU^+ - 1| and |det U - 1| alone (in memory)"),
        ("h5", "flowplug io.read of the HDF5 store (CRC-32 verified)"),
        ("h5raw", "h5py read of the same dataset (no check)"),
        ("write", "flowplug io.write ILDG, overwriting (layout, checksum, records)"),
        ("write_new", "flowplug io.write ILDG to a new file"),
        ("write_view_new", "io.write ILDG to a new file of links read contiguous=False"),
        ("raw_write", "raw numpy tofile of the same bytes to a new file"),
    ]
    if single:
        rows += [
            ("full_1t", "  the same full io.read on 1 thread (same rounds)"),
            ("nounit_1t", "  the same io.read, no unitarity, on 1 thread"),
            ("h5_1t", "  the same HDF5 io.read on 1 thread"),
            ("write_new_1t", "  the same io.write ILDG (new file) on 1 thread"),
        ]
    for key, label in rows:
        tk = t[key]
        print(f"  {label:<62s} {tk * 1e3:8.1f} ms  {mb / tk:7.0f} MiB/s  ratio raw/this {t_raw / tk:5.2f}")
    for key, label in rows:
        tk = t[key]
        print(
            json.dumps(
                {
                    "bench": "io",
                    "lattice": args.lattice,
                    "clock": args.clock,
                    "repeat": args.repeat,
                    "threads": args.threads,
                    "op": key,
                    "label": label,
                    "ms": round(tk * 1e3, 3),
                    "mib_per_s": round(mb / tk, 1),
                    "ratio_raw_over_this": round(t_raw / tk, 3),
                }
            )
        )
    other = os.environ.get("FLOWPLUG_LYNCS_PYTHON")
    try:
        import lyncs_io
    except Exception as exc:  # numpy >= 2.3 breaks lyncs-io 0.2.3
        if other:
            # time lyncs-io and the raw read again in that interpreter, same file, same cache
            code = LYNCS_TIMER.format(path=str(path), offset=rec.data_offset, count=nbytes // 16, repeat=args.repeat)
            res = subprocess.run([other, "-c", code], capture_output=True, text=True, timeout=600)
            if res.returncode == 0:
                t_ly, t_raw2 = (float(x) for x in res.stdout.split())
                print(
                    f"  {'lyncs-io load (big-endian array, no checksum; own process)':<62s} "
                    f"{t_ly * 1e3:8.1f} ms  {mb / t_ly:7.0f} MiB/s  ratio raw/this {t_raw2 / t_ly:5.2f}"
                    f"  (raw there {t_raw2 * 1e3:.1f} ms)"
                )
            else:
                print(f"  lyncs-io via {other} failed: {res.stderr.strip()[-200:]}")
        else:
            print(
                f"  lyncs-io: not importable here ({type(exc).__name__}: {str(exc)[:80]}); "
                "set FLOWPLUG_LYNCS_PYTHON to an interpreter where it imports"
            )
    else:
        t_ly = best(lambda: lyncs_io.load(str(path), format="lime"), args.repeat, warmup=False)
        print(
            f"  {'lyncs-io load (big-endian array, no checksum)':<62s} {t_ly * 1e3:8.1f} ms  "
            f"{mb / t_ly:7.0f} MiB/s  ratio raw/this {t_raw / t_ly:5.2f}"
        )


if __name__ == "__main__":
    main()
