"""Mutation run over the code that decides exactness: accept/reject, chain bookkeeping,
checksums, error bars. Run it by hand (it is not collected by pytest)::

    python tests/mutation.py             # every mutant against the fast tests that guard it
    python tests/mutation.py --list      # the mutants only
    python tests/mutation.py -k rotl     # mutants whose name contains "rotl"

Each mutant replaces one snippet of a source file (the snippet must occur exactly once),
runs the fast tests (``-m "not slow"``) of the files listed for it, and restores the
file (also on Ctrl-C; the script refuses to start if a target file differs from git's
index, so a crash can always be undone with ``git checkout``). A mutant is *killed* when
a test fails; a *surviving* mutant is a change of behaviour no fast test notices, and
is reported with exit status 1. It edits the working tree: run it on a tree no other
process is editing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

KERNEL_TESTS = ["tests/test_metropolis.py", "tests/test_kernels.py"]
CHAIN_TESTS = ["tests/test_metropolis.py", "tests/test_kernels.py", "tests/test_hmc.py"]
IO_TESTS = [
    "tests/test_checksums_known.py",
    "tests/test_io_cli.py",
    "tests/test_io_bad.py",
    "tests/test_io_roundtrip.py",
]

#: (name, file, original snippet, mutated snippet, test files)
MUTANTS: list[tuple[str, str, str, str, list[str]]] = [
    (
        "accept-comparison-flipped",
        "flowplug/metropolis.py",
        "return torch.log(_uniform(la.shape, generator, la.device)) < la",
        "return torch.log(_uniform(la.shape, generator, la.device)) > la",
        KERNEL_TESTS,
    ),
    (
        "accept-ties",
        "flowplug/metropolis.py",
        "return torch.log(_uniform(la.shape, generator, la.device)) < la",
        "return torch.log(_uniform(la.shape, generator, la.device)) <= la",
        KERNEL_TESTS,
    ),
    (
        "independence-ratio-sign",
        "flowplug/metropolis.py",
        "la = (log_p_new.to(_F64) - log_q_new.to(_F64)) - (log_p_old.to(_F64) - log_q_old.to(_F64))",
        "la = (log_p_old.to(_F64) - log_q_old.to(_F64)) - (log_p_new.to(_F64) - log_q_new.to(_F64))",
        KERNEL_TESTS,
    ),
    (
        "independence-ratio-log-q-sign",
        "flowplug/metropolis.py",
        "la = (log_p_new.to(_F64) - log_q_new.to(_F64)) - (log_p_old.to(_F64) - log_q_old.to(_F64))",
        "la = (log_p_new.to(_F64) + log_q_new.to(_F64)) - (log_p_old.to(_F64) + log_q_old.to(_F64))",
        KERNEL_TESTS,
    ),
    (
        "non-finite-accepted",
        "flowplug/metropolis.py",
        '    return torch.where(ok, la, torch.full_like(la, -float("inf")))',
        "    return la",
        KERNEL_TESTS,
    ),
    (
        "nan-accepted",
        "flowplug/metropolis.py",
        "    ok = ~torch.isnan(la)",
        "    ok = torch.ones_like(la, dtype=torch.bool)",
        KERNEL_TESTS,
    ),
    (
        "hmc-sign",
        "flowplug/metropolis.py",
        "return guarded_log_accept(-(h_new.to(_F64) - h_old.to(_F64)), h_new)",
        "return guarded_log_accept(h_new.to(_F64) - h_old.to(_F64), h_new)",
        CHAIN_TESTS,
    ),
    (
        "moved-keeps-old-x",
        "flowplug/chain.py",
        "new_x = torch.where(mask_x, x, self.x)",
        "new_x = torch.where(mask_x, self.x, x)",
        CHAIN_TESTS,
    ),
    (
        "moved-keeps-old-log-p",
        "flowplug/chain.py",
        "new_lp = torch.where(accepted, log_p, self.log_p)",
        "new_lp = self.log_p.clone()",
        CHAIN_TESTS,
    ),
    (
        "im-current-log-q-from-proposal",
        "plugins/kernels.py",
        "log_a = independence_log_accept(lp1, lq1, lp0, lq0)",
        "log_a = independence_log_accept(lp1, lq1, lp0, lq1)",
        KERNEL_TESTS,
    ),
    (
        "flow-hmc-ignores-log-q",
        "plugins/kernels.py",
        "accepted = metropolis_test(guarded_log_accept(hmc_log_accept(h0, h1), s_phys1, log_q1), generator)",
        "accepted = metropolis_test(hmc_log_accept(h0, h1), generator)",
        KERNEL_TESTS,
    ),
    (
        "step-returns-input",
        "flowplug/proposal.py",
        "out = from_canonical(new.x, u, self.layout, batched)",
        "out = u",
        ["tests/test_metropolis.py", "tests/test_chains_cli.py"],
    ),
    ("merge-states-drops-parts", "plugins/kernels.py", "        x[idx] = sub.x\n", "        pass\n", KERNEL_TESTS),
    (
        "rotl-direction",
        "adapters/checksums.py",
        "return ((value << shift) | (value >> (32 - shift))) & 0xFFFFFFFF if shift else value",
        "return ((value >> shift) | (value << (32 - shift))) & 0xFFFFFFFF if shift else value",
        IO_TESTS,
    ),
    (
        "scidac-modulus",
        "adapters/checksums.py",
        "    for modulus in (29, 31):\n        classes = _xor_classes(rows, modulus)",
        "    for modulus in (31, 29):\n        classes = _xor_classes(rows, modulus)",
        IO_TESTS,
    ),
    (
        "nersc-byte-order",
        "adapters/checksums.py",
        "def nersc_checksum(data: bytes | np.ndarray, byteorder: str) -> int:",
        "def nersc_checksum(data: bytes | np.ndarray, byteorder: str) -> int:\n    byteorder = '<'",
        IO_TESTS,
    ),
    (
        "gamma-default-centring",
        "flowplug/stats.py",
        'center: str = "global"',
        'center: str = "replica"',
        ["tests/test_stats.py"],
    ),
]


def _git_clean(path: str) -> bool:
    return subprocess.run(["git", "diff", "--quiet", "--", path], cwd=ROOT).returncode == 0


def run_mutant(name: str, path: str, old: str, new: str, tests: list[str]) -> tuple[bool, str, float]:
    """Apply one mutant, run its tests, restore the file. Returns (killed, detail, seconds)."""
    file = ROOT / path
    text = file.read_text()
    if text.count(old) != 1:
        raise SystemExit(f"mutant {name}: the snippet occurs {text.count(old)} times in {path}; update the script")
    tests = [t for t in tests if (ROOT / t).exists()]
    t0 = time.perf_counter()
    try:
        file.write_text(text.replace(old, new))
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider", *tests],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    finally:
        file.write_text(text)
    killed = proc.returncode != 0
    detail = ""
    if killed:
        failed = [ln for ln in proc.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
        detail = failed[0] if failed else proc.stdout.strip().splitlines()[-1]
    return killed, detail, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    """Run the mutants; exit 1 if any survives."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", default="", help="only mutants whose name contains this")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if args.k in m[0]]
    if args.list:
        for name, path, *_ in chosen:
            print(f"{name:34s} {path}")
        return 0
    dirty = sorted({m[1] for m in chosen if not _git_clean(m[1])})
    if dirty:
        raise SystemExit(f"uncommitted changes in {', '.join(dirty)}: commit or stash them first")
    survivors = []
    for name, path, old, new, tests in chosen:
        killed, detail, secs = run_mutant(name, path, old, new, tests)
        print(f"{'killed  ' if killed else 'SURVIVED'} {name:34s} {secs:6.1f} s  {detail}", flush=True)
        if not killed:
            survivors.append(name)
    print(
        f"{len(chosen) - len(survivors)} of {len(chosen)} mutants killed"
        + (f"; survivors: {', '.join(survivors)}" if survivors else "")
    )
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
