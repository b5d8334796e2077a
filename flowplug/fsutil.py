"""Atomic file output, and one writer per run directory.

Every output is written to a temporary file in the target folder, then renamed: an
interrupted run therefore never leaves a partial output file under the final name, and
an input is never overwritten unless the caller asks for it. A run (``hmc``, ``train``,
``sample``, ``resample``, ``demo``) holds :func:`run_lock` on its directory for as long
as it writes there.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar

from flowplug.errors import FlowplugError, RunLockedError

#: Suffix of every temporary file made here; the name is ``.<final name>.<tag>.part``.
TEMP_SUFFIX = ".part"
#: The ``<tag>`` of a temporary name: the 8 random characters of :func:`tempfile.mkstemp`,
#: or ``convert`` (the replacement store of ``flowplug convert --force``).
_TEMP_TAG = r"(?:[a-z0-9_]{8}|convert)"


def _temp_prefix(final: Path) -> str:
    return f".{final.name}."


def temp_name_pattern(path: str | Path) -> re.Pattern[str]:
    """The names this module gives temporary files for the final file ``path``.

    ``.<name>.<8 random characters>.part`` (and ``.<name>.convert.part``), in the
    folder of ``path``; nothing else matches.
    """
    return re.compile(re.escape(_temp_prefix(Path(path))) + _TEMP_TAG + re.escape(TEMP_SUFFIX))


def remove_stale_temp_files(path: str | Path) -> list[Path]:
    """Delete temporary files left next to ``path`` by an interrupted write of ``path``.

    Only regular files (not links or folders) whose whole name matches
    :func:`temp_name_pattern` are removed. Call it only when no other process is
    writing ``path`` at the same time (its temporary file would be removed too).

    Returns:
        The files removed.
    """
    final = Path(path)
    pattern = temp_name_pattern(final)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(final.parent))
    except OSError:  # no folder yet: nothing to clean
        return removed
    for entry in entries:
        if not pattern.fullmatch(entry.name):
            continue
        try:
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue  # gone already, or not ours to remove: leave it
    return removed


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb", *, overwrite: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success fsync it and rename it to ``path``.

    Arguments:
        path: Final file name.
        mode: ``"wb"`` or ``"w"`` (text, UTF-8).
        overwrite: If false and ``path`` exists, raise instead of replacing it.

    Raises:
        FlowplugError: if ``path`` exists and ``overwrite`` is false.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FlowplugError(f"{path} exists; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, mode) if "b" in mode else os.fdopen(fd, mode, encoding="utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        _default_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_path(path: str | Path) -> contextlib.AbstractContextManager[Path]:
    """Like :func:`atomic_write` for libraries that open files themselves (h5py, torch.save).

    Yields a temporary path in the target folder (ending in ``.part``; pass an open file
    to libraries that append their own suffix, such as ``numpy.save``); on success it is
    renamed to ``path``.
    """

    @contextlib.contextmanager
    def _cm() -> Iterator[Path]:
        final = Path(path)
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(final), suffix=TEMP_SUFFIX, dir=final.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            _default_permissions(tmp)
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    return _cm()


def _default_permissions(path: str) -> None:
    """Give a temporary file the mode a plain ``open`` would (0666 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def jsonable(value: Any) -> Any:
    """``value`` made JSON-ready: mappings with string keys, lists for tuples, arrays and
    tensors as (nested) lists, non-finite floats as the strings ``nan``/``inf``/``-inf``,
    paths as strings; anything else as it is."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | Path, data: Mapping[str, Any]) -> Path:
    """Write ``data`` as indented JSON atomically; returns the path.

    numpy/torch values become plain numbers or lists; non-finite floats become the
    strings ``"nan"``, ``"inf"``, ``"-inf"`` (strict JSON has no such numbers).
    """
    path = Path(path)
    with atomic_write(path, "w") as fh:
        json.dump(jsonable(data), fh, indent=2, sort_keys=False)
        fh.write("\n")
    return path


def write_summary(out: str | Path, command: str, summary: Mapping[str, Any]) -> Path:
    """Write ``<out>/summary.json`` and tell plugins (``flowplug_run_finished``).

    Arguments:
        out: Output directory (created if missing).
        command: Subcommand name recorded under ``"command"``.
        summary: Figures of the run.
    """
    from flowplug._version import __version__
    from flowplug.manager import get_plugin_manager

    data = {"command": command, "flowplug_version": __version__, **summary}
    path = write_json(Path(out) / "summary.json", data)
    get_plugin_manager().notify("flowplug_run_finished", command=command, out=str(out), summary=data)
    return path


#: Run directories this process holds (real path of the lock file -> nesting depth).
_HELD: dict[str, int] = {}
F = TypeVar("F", bound=Callable[..., Any])

#: The lock file of a run directory (kept after the run: removing it would let two
#: later runs lock two different files of the same name).
LOCK_NAME = ".flowplug.lock"


@contextlib.contextmanager
def run_lock(out: str | Path, command: str) -> Iterator[Path]:
    """Hold an exclusive lock on the run directory ``out`` for the duration of a run.

    The lock is an advisory ``flock`` on ``<out>/.flowplug.lock`` (created with ``out``
    if missing); the file records the holder (command, process id, host, start time).
    The operating system releases the lock when the holder exits, however it exits, so
    a lock file left by a dead process never blocks a new run. A directory the run created
    and left empty (a configuration refused before anything was written) is removed. POSIX only: without
    ``fcntl`` (Windows) the run goes on unlocked, with a ``RuntimeWarning``.

    Arguments:
        out: The run directory.
        command: Name of the run, recorded for the message a second process gets.

    Yields:
        The lock file's path.

    Raises:
        RunLockedError: if another process holds the lock; the message names it.
    """
    import datetime
    import socket

    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    key = os.path.realpath(path)
    if key in _HELD:  # this process holds it already (a job calling another job's code)
        _HELD[key] += 1
        try:
            yield path
        finally:
            _HELD[key] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            holder = _read_holder(path)
            raise RunLockedError(
                f"{out}: another flowplug process is writing this run directory "
                f"({holder}); wait for it to finish, or give this run another output "
                "directory"
            )
        if not _same_file(fd, path):  # removed by a run that wrote nothing, between our open and lock
            _unlock(fd)
            raise RunLockedError(
                f"{out}: another flowplug process removed this run directory while this run was starting; "
                "start it again"
            )
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        info = f"{command} pid={os.getpid()} host={socket.gethostname()} started={stamp}\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        _HELD[key] = 1
        try:
            yield path
        finally:
            del _HELD[key]
            if created:
                _remove_if_unused(out, path)  # a refused run leaves no empty directory behind
            _unlock(fd)
    finally:
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is still the file at ``path`` (not unlinked or replaced)."""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _remove_if_unused(out: Path, lock: Path) -> None:
    """Remove ``out`` (created by this run) when the run wrote nothing but its lock file."""
    try:
        if [p.name for p in out.iterdir()] == [lock.name]:
            lock.unlink()
            out.rmdir()
    except OSError:  # anything unexpected: keep what is there
        pass


def locked_run(command: str, out_of: Callable[[Mapping[str, Any]], Any]) -> Callable[[F], F]:
    """Decorator: run the function under :func:`run_lock` of its run directory.

    Arguments:
        command: Name recorded in the lock file.
        out_of: Maps the function's bound arguments (name -> value, defaults applied) to
            the run directory, e.g. ``lambda a: a["out"]``; ``None`` runs unlocked. Under
            torchrun only rank 0 (the process that writes) takes the lock
            (:mod:`flowplug.distributed`), and only ``train`` runs there: the other
            commands that use this decorator raise :class:`~flowplug.errors.FlowplugError`
            when ``WORLD_SIZE`` > 1 (``hmc``, ``sample`` and ``resample`` lock through
            :func:`flowplug.distributed.sharded_job` instead).
    """
    import functools
    import inspect

    def deco(fn: F) -> F:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            out = out_of(bound.arguments)
            from flowplug import distributed

            if distributed.launched() and command != "train":
                from flowplug.errors import FlowplugError

                raise FlowplugError(
                    f"flowplug {command} runs in one process; under torchrun only train is data-parallel "
                    "and only hmc, sample and resample share their chains (start the others without torchrun)"
                )
            if out is None or not distributed.is_main():  # nothing written here: nothing to lock
                return fn(*args, **kwargs)
            with run_lock(out, command):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return deco


def _read_holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        text = ""
    return f"held by {text}" if text else "holder unknown"


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # not POSIX (Windows): runs are not locked there
        import warnings

        warnings.warn(
            "no fcntl on this system: run directories are not locked against a second process",
            RuntimeWarning,
            stacklevel=3,
        )
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock(fd: int) -> None:
    try:
        import fcntl
    except ImportError:
        return
    fcntl.flock(fd, fcntl.LOCK_UN)
