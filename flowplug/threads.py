"""CPU threads of torch for a run: the ``threads`` key of every job that computes.

torch's default uses every core for each small tensor operation. On the lattices of
flowplug's typical runs (8^2 to 8^4 sites, a few chains) the work per operation is
small, and on a machine shared with other jobs the threads mostly wait for each other:
the README's SU(3) ``flowplug hmc`` command (4^4, 4 chains x 100 trajectories) took 301 s
with torch's default against 23 s with one thread on a user's busy machine, and 124 s and
277 s against 27 s and 31 s on a shared two-core machine. Every job (``hmc``, ``sample``,
``resample``, ``train``, ``demo``) therefore has a ``threads`` key, default :data:`DEFAULT_THREADS` = 1, applied through
:func:`job_threads`; ``threads = 0`` leaves torch's own setting (torch's default: one
thread per core, or ``OMP_NUM_THREADS``). Raise it for large lattices on a machine of
your own.

Example::

    from flowplug.threads import job_threads

    with job_threads(cfg["threads"]):     # 1 thread inside, the caller's setting after
        ...
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["DEFAULT_THREADS", "check_threads", "job_threads", "one_thread", "set_threads"]

#: The default of every job's ``threads`` key.
DEFAULT_THREADS = 1


def check_threads(value: Any, key: str = "threads") -> int:
    """The thread count of a configuration value: an integer >= 0 (0 = torch's own setting).

    Raises:
        ConfigError: for a negative or non-integer value, naming ``key``.
    """
    from flowplug.errors import ConfigError

    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(
            f"{key} = {value!r}: expected an integer >= 0 (torch CPU threads; 0 keeps "
            f"torch's default, {DEFAULT_THREADS} is fastest on small lattices and busy machines)"
        )
    return value


def set_threads(value: Any, key: str = "threads") -> int:
    """Set torch's intra-op CPU threads to ``value`` (0: leave them as they are).

    Returns:
        The number of threads torch uses now.

    Raises:
        ConfigError: see :func:`check_threads`.
    """
    import torch

    n = check_threads(value, key)
    if n and torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


@contextlib.contextmanager
def job_threads(value: Any, key: str = "threads") -> Iterator[int]:
    """Run a block with ``value`` torch threads (:func:`set_threads`), then restore the caller's.

    Yields:
        The number of threads in use inside the block.

    Raises:
        ConfigError: see :func:`check_threads` (before anything is changed).
    """
    import torch

    before = torch.get_num_threads()
    n = set_threads(value, key)
    try:
        yield n
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@contextlib.contextmanager
def one_thread(active: bool = True) -> Iterator[None]:
    """Run a block on one torch CPU thread, then restore the caller's count (with ``active``
    false: leave the threads alone, for callers that need it for some dtypes only).

    torch splits an elementwise operation of more than 32768 entries between its threads at
    positions that depend on the tensor's size, and each share ends in a scalar tail that
    rounds some operations differently from the vectorised body (a complex64 product, for
    one). A flow's float32 conditioner must give a configuration the same value in any batch
    (DESIGN section 4), so the few such operations on its path (the complex64 channel sum of
    the 4D Fourier convolution and plaquette traces of the SU(N) features; not their complex128
    forms, the actions' traces among them) run inside this block;
    their shapes keep every configuration out of the single-thread tail. Measured before: with
    16 threads a `sun-stout` layer on 4x2x6 gave 9 of 256 configurations another log-det alone
    than in the batch (up to 1e-7; 4D flows up to 1.4e-5). Switching costs about a microsecond.
    torch's thread count is global to the process: other Python threads computing at the same
    time run on one thread during the block.
    """
    import torch

    n = torch.get_num_threads()
    if n == 1 or not active:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
