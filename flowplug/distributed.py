r"""Several processes, one run: :mod:`torch.distributed` under ``torchrun``.

flowplug does not start processes itself; the standard launcher does::

    torchrun --standalone --nproc_per_node=2 -m flowplug train --config examples/train_phi4.toml
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 \
        --nproc_per_node=4 -m flowplug train --config ...          # on each node, its node_rank

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`init_from_env` reads them and joins the process group (backend
``gloo`` for CPU runs, ``nccl`` for CUDA, one GPU per process: ``cuda:LOCAL_RANK``). Without
those variables (a plain ``flowplug`` or ``python`` process) everything here is a no-op for a
world of one process, so the same code runs in both.

Data-parallel training (:class:`flowplug.train.Trainer`): every rank draws the *global*
batch of prior samples from the same seeded generator and keeps its own contiguous slice
(rank r of W: samples r B/W ... (r+1) B/W - 1). The loss is the sum over the slice divided by
the global batch B, and the gradients are summed over the ranks (all-reduce), so the update
is the gradient of the global batch mean, as in one process; loss, ESS and acceptance are
computed on the gathered global batch. Drawing the whole batch on every rank costs a prior
sample of B configurations per rank, small next to the flow, and buys two properties: a run
on W ranks follows the one-process run with the same seed and batch to floating-point
rounding (the order of the sums differs), and a checkpoint (written by rank 0 alone, with the
generator's state) resumes on any number of ranks.

Only rank 0 takes the run directory's lock and writes (checkpoints, ``train_log.csv``,
``config.toml``, ``summary.json``, progress bars); the others compute.

Sharded sampling (``hmc``, ``sample``, ``resample``; docs/chains.md, "Several processes";
``torchrun --standalone --nproc_per_node=4 -m flowplug hmc --config run.toml``): the chains
are divided into ``streams`` random streams, contiguous groups of chains that each step as
one batch with their own generator (:func:`stream_seed`); ``streams = 0`` (the default)
means one stream per process. Rank r of W runs the streams r S/W ... (r+1) S/W - 1
(:func:`shard`); for ``resample`` a stream is a contiguous share of the input files
(:func:`share`), so each rank reads, checksums, weighs and resamples only its share.

Why a W-rank run equals the one-process run with the same ``seed`` and ``streams = S``
bit for bit: (1) every rank draws the start of *all* chains (hot start, flow samples) from
the seeded generator and keeps its slice, as a training step draws its global batch;
(2) each stream draws from its own generator, seeded from ``(seed, stream)`` only;
(3) a stream is stepped, measured and weighed as one batch of its own chains wherever it
runs: one process steps its streams one after the other (:class:`flowplug.chain.Chain`
with several streams), so every stream sees the same random numbers and the same
arithmetic as in a process that holds it alone. The default ``streams = 0`` on W ranks
therefore equals one process with ``streams = W``, not the plain one-process run
(``streams = 1``, whose single generator's numbers cannot be cut between processes);
``summary.json`` records ``streams`` and ``world_size``.

Each rank writes only files that carry its chains' global indices or its rank
(``ensemble.rank1.h5``, ``checkpoint.rank1.pt``); rank 0 holds the lock
(:func:`sharded_job`) and writes the merged ``measurements``, ``provenance.json``,
``report.png`` and ``summary.json`` from the histories and records gathered from every
rank (:func:`gather_history`, :func:`all_gather_object`) at each checkpoint and at the end.
A sharded run resumes on the same number of processes and streams (each rank from its own
checkpoint).

If one process fails, ``torchrun`` stops the others; a collective that never completes
is ended by the process group's timeout.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from flowplug.errors import ConfigError

__all__ = [
    "init_from_env",
    "world_size",
    "rank",
    "is_main",
    "launched",
    "all_reduce_sum",
    "all_gather_cat",
    "broadcast_parameters",
    "barrier",
    "shutdown",
    "slice_of",
    "all_gather_object",
    "gather_chains",
    "gather_history",
    "broadcast_flag",
    "sharded_job",
    "effective_streams",
    "shard",
    "chain_streams",
    "share",
    "stream_seed",
    "stream_generators",
    "rank_name",
]


#: Set when :func:`init_from_env` joined the process group (then :func:`shutdown` leaves it).
_joined: list[bool] = []


def launched() -> bool:
    """True when the process was started by ``torchrun`` with more than one process in the world."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes of the run (1 without a process group)."""
    if not _active():
        return 1
    import torch.distributed as dist

    return dist.get_world_size()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    if not _active():
        return 0
    import torch.distributed as dist

    return dist.get_rank()


def is_main() -> bool:
    """True on rank 0, the process that writes; true without a process group. Before the
    group is joined, ``RANK`` from the environment decides (so a run directory's lock is
    taken by rank 0 alone)."""
    if _active():
        return rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def init_from_env(device: str | torch.device) -> torch.device:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Arguments:
        device: The run's device (``cpu``, ``cuda``, ``cuda:N``). Under torchrun a bare
            ``cuda`` becomes ``cuda:LOCAL_RANK``.

    Returns:
        The device this process computes on.

    Raises:
        ConfigError: if torch was built without distributed support, the world has
            several processes on one CUDA device (``cuda:N`` given explicitly), or a process's
            ``LOCAL_RANK`` names a CUDA device that torch does not see (more processes per node
            than GPUs).
    """
    dev = torch.device(device)
    if not launched():
        return dev
    import torch.distributed as dist

    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        if dev.index is not None and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            raise ConfigError(
                f"device = '{device}' under torchrun with several processes per node: use device = 'cuda' "
                "(each process takes cuda:LOCAL_RANK)"
            )
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        count = torch.cuda.device_count()
        if dev.index >= count and torch.device(device).index is not None:
            raise ConfigError(f"device = '{device}' under torchrun: torch sees {count} CUDA device(s) on this node")
        if dev.index >= count:
            raise ConfigError(
                f"device = '{device}' under torchrun: the process of LOCAL_RANK {local} takes {dev}, but torch "
                f"sees {count} CUDA device(s) on this node; start at most {count} process(es) per node "
                "(torchrun --nproc_per_node)"
            )
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        _joined.append(True)
    return dev


def all_reduce_sum(tensors: Iterable[torch.Tensor]) -> None:
    """Sum each tensor over the ranks, in place (nothing in a world of one process)."""
    if world_size() == 1:
        return
    import torch.distributed as dist

    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``t`` along dim 0, in rank order (all ranks' shapes equal).

    Arguments:
        t: Shape (n, ...), the same on every rank.

    Returns:
        Shape (W n, ...); ``t`` itself in a world of one process.
    """
    if world_size() == 1:
        return t
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (in place)."""
    if world_size() == 1:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for t in module.state_dict().values():
            dist.broadcast(t, src=0)


def barrier() -> None:
    """Wait for every rank (nothing in a world of one process)."""
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def shutdown() -> None:
    """Leave the process group if :func:`init_from_env` joined it (a group the caller set up stays)."""
    if _joined and _active():
        _joined.clear()
        import torch.distributed as dist

        dist.destroy_process_group()


def slice_of(n: int) -> slice:
    """This rank's contiguous share of a global batch of ``n`` samples.

    Raises:
        ConfigError: if ``n`` is not a multiple of the world size.
    """
    w, r = world_size(), rank()
    if n % w:
        raise ConfigError(f"the global batch ({n}) must be a multiple of the number of processes ({w})")
    b = n // w
    return slice(r * b, (r + 1) * b)


# --------------------------------------------------------------------- sharded sampling


def _comm_device() -> torch.device:
    """Where collectives' tensors live: the current CUDA device under nccl, else the CPU."""
    import torch.distributed as dist

    if _active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable Python data made of lists, dicts, numbers, strings), in rank order.

    Used for small bookkeeping only (file lists, provenance records, counts); the objects
    travel between the processes of one run, never through files. ``[obj]`` in a world of
    one process.
    """
    if world_size() == 1:
        return [obj]
    import torch.distributed as dist

    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, obj)
    return parts


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (``flag`` itself in a world of one process)."""
    if world_size() == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_comm_device())
    dist.broadcast(t, src=0)
    return bool(t.item())


def gather_chains(t: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Concatenate every rank's ``t`` along ``dim`` (the chains' axis), in rank order.

    The ranks may hold different numbers of chains (``resample``: files of different
    sizes); the other extents must agree.

    Arguments:
        t: A chain history, e.g. (steps, chains) float64 (layout of
            :meth:`flowplug.chain.Chain.history_tensors`), on any device.

    Returns:
        (steps, sum of the ranks' chains) on ``t``'s device; ``t`` itself in a world of one
        process.
    """
    if world_size() == 1:
        return t
    import torch.distributed as dist

    dev = _comm_device()
    local = t.to(dev).movedim(dim, 0).contiguous()
    n = torch.tensor([local.shape[0]], dtype=torch.int64, device=dev)
    sizes = [torch.empty_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    big = max(counts)
    padded = torch.zeros((big, *local.shape[1:]), dtype=local.dtype, device=dev)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    joined = torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])
    return joined.movedim(0, dim).contiguous().to(t.device)  # contiguous: the layout one process has


def gather_history(history: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:func:`gather_chains` of every entry of a (steps, chains) history (the same names on every rank),
    gathered in sorted order (the same collectives on every rank), returned in the history's order
    (the column order of the measurement files, as in one process)."""
    if world_size() <= 1:
        return dict(history)
    gathered = {k: gather_chains(history[k], 1) for k in sorted(history)}
    return {k: gathered[k] for k in history}


@contextlib.contextmanager
def sharded_job(command: str, out: str | Path | None, device: str | torch.device = "cpu") -> Iterator[torch.device]:
    """Run a sampling job (``hmc``, ``sample``, ``resample``) on every process of the world.

    Joins the process group that ``torchrun`` describes (:func:`init_from_env`; nothing
    without torchrun), takes the lock of the run directory ``out`` on rank 0
    (:func:`flowplug.fsutil.run_lock`) and tells every rank whether it got it, so that no
    rank writes into a directory another run holds. Leaves the group at the end if it
    joined it.

    Arguments:
        command: The job's name (recorded in the lock file).
        out: The run directory, or ``None`` (nothing locked).
        device: The job's device (``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun).

    Yields:
        The device this process computes on.

    Raises:
        RunLockedError: on every rank, if another process holds ``out`` (on the other ranks
            also when rank 0 fails to lock it otherwise, e.g. an unwritable directory; rank 0
            then raises that error itself).
        ConfigError: from :func:`init_from_env`.
    """
    from flowplug.errors import RunLockedError
    from flowplug.fsutil import run_lock

    dev = init_from_env(device)
    try:
        with contextlib.ExitStack() as stack:
            failure: Exception | None = None
            if out is not None and is_main():
                try:
                    stack.enter_context(run_lock(out, command))
                except Exception as exc:  # any failure (held lock, unwritable directory): tell the others
                    failure = exc
            locked = broadcast_flag(failure is None)
            if failure is not None:
                raise failure
            if not locked:
                raise RunLockedError(f"{out}: rank 0 could not lock the run directory (its message says why)")
            yield dev
    finally:
        shutdown()


def effective_streams(streams: int) -> int:
    """The number of random streams S of a sampling run: ``streams``, or the world size for 0.

    Raises:
        ConfigError: if ``streams`` is negative or not a multiple of the world size.
    """
    s, w = int(streams), world_size()
    if s < 0:
        raise ConfigError(f"streams must be >= 0 (0: one per process); found {s}")
    s = s or w
    if s % w:
        raise ConfigError(
            f"streams = {s} random streams cannot be shared by {w} processes: use a multiple of {w} "
            "(or 0: one per process)"
        )
    return s


def shard(streams: int) -> range:
    """The streams this rank runs: r S/W ... (r+1) S/W - 1 (all of them in a world of one).

    Arguments:
        streams: S, a multiple of the world size (:func:`effective_streams`).
    """
    per = streams // world_size()
    return range(rank() * per, (rank() + 1) * per)


def chain_streams(chains: int, streams: int) -> tuple[int, int, range, slice]:
    """How a sampling run's chains are cut into random streams, and this rank's part.

    Arguments:
        chains: Total number of chains of the run (>= 1).
        streams: The configured ``streams`` (0: one per process; :func:`effective_streams`).

    Returns:
        ``(S, per, mine, local)``: the effective number of streams S, the chains per stream
        (chains / S), this rank's streams (:func:`shard`) and its chains as a slice of the
        global chain index.

    Raises:
        ConfigError: if ``streams`` is invalid (:func:`effective_streams`) or S does not
            divide ``chains``.
    """
    s = effective_streams(streams)
    if chains % s:
        how = "" if streams else f" (streams = 0: one per process, {world_size()} processes)"
        raise ConfigError(
            f"chains = {chains} cannot be split into streams = {s} equal random streams{how}; "
            f"choose chains a multiple of {s}"
        )
    per = chains // s
    mine = shard(s)
    return s, per, mine, slice(mine.start * per, mine.stop * per)


def share(n: int, parts: int, index: int) -> slice:
    """Part ``index`` of ``parts`` contiguous, nearly equal parts of n items: items
    floor(index n / parts) ... floor((index+1) n / parts) - 1."""
    return slice(index * n // parts, (index + 1) * n // parts)


def stream_seed(seed: int, stream: int, streams: int) -> int:
    """The seed of random stream ``stream`` of ``streams`` for a run's ``seed``.

    One stream uses ``seed`` itself (the one-process runs of earlier versions are
    unchanged); of several, stream s uses 63 bits of :class:`numpy.random.SeedSequence`
    ``([seed, s])`` (independent streams for nearby seeds and indices; O'Neill, PCG
    report HMC-CS-2014-0905, section 7, on seeding).
    """
    if streams == 1:
        return int(seed)
    import numpy as np

    word = np.random.SeedSequence([int(seed) % 2**64, int(stream)]).generate_state(1, np.uint64)[0]
    return int(word) >> 1


def stream_generators(seed: int, streams: int, device: str | torch.device = "cpu") -> list[torch.Generator]:
    """The generators of this rank's random streams (:func:`shard`, :func:`stream_seed`)."""
    return [torch.Generator(device=device).manual_seed(stream_seed(seed, s, streams)) for s in shard(streams)]


def rank_name(name: str) -> str:
    """A file name of this rank: ``name`` in a world of one process, else ``.rank<r>``
    before its extension (``checkpoint.pt`` -> ``checkpoint.rank1.pt``)."""
    if world_size() == 1:
        return name
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        return f"{name}.rank{rank()}"
    return f"{stem}.rank{rank()}.{ext}"
