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
"""

from __future__ import annotations

import os
from collections.abc import Iterable

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
        ConfigError: if torch was built without distributed support, or the world has
            several processes on one CUDA device (``cuda:N`` given explicitly).
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
