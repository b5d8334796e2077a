r"""The files of a chain run: configurations, measurements, checkpoint, ``summary.json``, report.

Every chain job (``hmc``, ``sample``, ``resample``; ``demo`` through them) writes its run
directory through one :class:`ChainOutput`:

``ensemble.h5``, ``ensemble/traj_<t>.<ext>`` or one file per configuration
    the chains' configurations at the save points (:class:`Configurations`): after
    the thermalisation, every ``save_every`` steps and after the last step. Gauge fields
    go through :mod:`flowplug.io` in any writable format, with the provenance record of
    :func:`flowplug.jobs.provenance.provenance` in the file's metadata (ILDG: the
    ``scidac-record-xml`` record; HDF5: per configuration); other field kinds (phi^4,
    plugins' kinds) go to a plain HDF5 file per save point (dataset ``field``, chains
    first; attributes ``kind`` and ``provenance``).
``provenance.json``
    ``{"outputs": [{"path", **provenance}, ...]}``, one entry per configuration written.
``measurements.h5`` or ``measurements.csv``
    every history entry per step and chain (:func:`write_measurements`).
``checkpoint.pt`` / ``chain.ckpt``
    the chain checkpoint (:meth:`flowplug.chain.Chain.save`), written after the
    configurations and measurements it covers.
``config.toml``
    the run's resolved configuration (:func:`flowplug.jobs.provenance.write_run_config`),
    written just before each checkpoint: ``--resume`` starts from it
    (:func:`flowplug.jobs.provenance.resume_configuration`) and refuses changes of the
    chain's keys (:func:`flowplug.jobs.provenance.check_resume_config`).
``run_files.json``
    the files the run reads besides its configuration (the flow, ``resample``'s inputs and
    read options, ``hmc``'s start file), each as given, resolved and with its SHA-256
    (:func:`flowplug.jobs.provenance.write_run_files`), written with each checkpoint by
    ``sample``, ``resample`` and ``hmc``: ``--resume`` needs only ``--out``.
``summary.json``, ``report.png``
    at the end (:func:`flowplug.fsutil.write_summary`, :func:`flowplug.jobs.report.chain_report`).

Starting afresh: a fresh run (neither ``--resume`` nor ``--force``) is refused when its
configuration location holds configuration files of an earlier run, naming them, and
``--force`` removes them first (:meth:`ChainOutput.start`, :meth:`Configurations.start`):
those the earlier run's ``provenance.json`` lists and those named exactly as the job names
its own (``ensemble/traj_<t>[_chain_<c>].<ext>``, ``sample[.c<c>].s<t>.<ext>``,
``resample.s<t>.<ext>``, ``<input>.c<c>.s<t>.<ext>``, ``.rank<r>`` before the extension;
the store ``ensemble.h5``), never an input (of this run, or of an earlier one as its
``run_files.json`` and ``provenance.json`` record them) and never a file of another name;
``provenance.json`` counts with the records of this command, each naming a file here only
at its recorded path (or a relative one from another working directory); files named so
when no earlier run of this command is recorded in ``out`` are refused, also with
``--force`` (they may be another program's); an input that is the store is refused. ``--force``
also removes the earlier ``provenance.json`` and measurements. So a new ensemble never
mixes with an old one (``ensemble/*.h5`` is one run's).

Resuming: a run can die after writing configurations of steps its last checkpoint does
not hold. :meth:`ChainOutput.resumed` therefore rolls the outputs back to the
checkpoint's step before the chain goes on: entries of later steps are removed from the
HDF5 store (they would otherwise be appended a second time), ``provenance.json`` keeps
the entries up to that step, and files of later steps are replaced when the resumed
chain reaches them. The outputs of a resumed run equal those of an uninterrupted one.

Several processes (torchrun, :mod:`flowplug.distributed`): each rank writes the
configurations of its own chains (named by their global chain index; files holding
several chains and the HDF5 store get ``.rank<r>`` before the extension) and its own
checkpoint (``checkpoint.rank<r>.pt``, ``chain.rank<r>.ckpt``); rank 0 alone writes the
merged measurements (every chain, in global order), ``provenance.json`` (every rank's
records), ``report.png`` and ``summary.json``. So no file is written by two processes.

Also here: :func:`output_format` (which format a run writes), :func:`write_configuration`
(one configuration, atomically, never over an input), :func:`read_measurements`.
"""

from __future__ import annotations

import csv
import html
import io as _stdio
import json
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowplug.errors import ConfigError, FormatError

__all__ = [
    "ChainOutput",
    "Configurations",
    "write_measurements",
    "read_measurements",
    "write_job_summary",
    "write_configuration",
    "output_format",
    "extension_of",
    "checkpoint_step",
    "checkpoint_configurations",
    "READ_ONLY_FALLBACK",
]

#: Formats that only read: where their configurations are written instead.
READ_ONLY_FALLBACK = {"scidac": "ildg", "lime": "ildg"}


# ------------------------------------------------------------------------ formats


def output_format(input_format: str | None, to: str | None) -> str:
    """The format outputs are written in: ``to`` if given, else the input's (read-only
    SciDAC/bare LIME inputs are written as ILDG; ``hdf5`` without inputs).

    Raises:
        FormatError: if ``to`` or the input's format is read-only and has no fallback
            (MILC native).
        UnknownComponentError: if ``to`` is not registered.
    """
    from flowplug import io
    from flowplug.manager import registry

    if to:
        name = registry("file_format").get(to).name
        if name not in io.formats(writable=True):
            raise FormatError(f"format {name} is read-only; writable formats: {', '.join(io.formats(writable=True))}")
        return name
    if input_format is None:
        return "hdf5"
    if input_format in io.formats(writable=True):
        return input_format
    if input_format in READ_ONLY_FALLBACK:
        return READ_ONLY_FALLBACK[input_format]
    raise FormatError(
        f"inputs in format {input_format} cannot be written back in that format (read-only); "
        f"choose one with --to ({', '.join(io.formats(writable=True))})"
    )


def extension_of(fmt: str) -> str:
    """File-name extension used for outputs of a format."""
    from flowplug import io

    return io.get_format(fmt).extension or fmt


def _provenance_xml(prov: Mapping[str, Any]) -> bytes:
    body = "".join(
        f"<{k}>{html.escape(str(v))}</{k}>" for k, v in prov.items() if isinstance(v, (str, int, float, bool))
    )
    return ('<?xml version="1.0" encoding="UTF-8"?><info><flowplug>' + body + "</flowplug></info>").encode()


def _metadata(
    source_meta: Any, precision: int, provenance: Mapping[str, Any], header: Mapping[str, Any] | None = None
) -> Any:
    """Metadata of one written configuration: the source's records carried over (without
    its record XML, check outcomes and the action the source states: a new configuration
    does not come from the source's generating action), the precision, header values and
    provenance."""
    from flowplug import io

    if source_meta is not None:
        meta = source_meta.copy()
        meta.records = [r for r in meta.records if r.type != "scidac-record-xml"]
        meta.checks = []
        for key in ("action", "action_note"):
            meta.header.pop(key, None)
    else:
        meta = io.Metadata(precision=precision)
    meta.precision = precision
    meta.header.update(header or {})
    meta.provenance = {**meta.provenance, **provenance}
    return meta


def _refuse_input(path: Path, resolved_inputs: Collection[Path]) -> None:
    """Refuse to write ``path`` when it resolves to one of ``resolved_inputs`` (resolved paths).

    Raises:
        FormatError: naming the path.
    """
    if path.resolve() in resolved_inputs:
        raise FormatError(f"{path}: is an input; refusing to overwrite it (choose another output)")


def write_configuration(
    path: Path,
    x: torch.Tensor,
    fmt: str,
    *,
    source_meta: Any = None,
    precision: int = 64,
    provenance: Mapping[str, Any] | None = None,
    header: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    inputs: Sequence[Path] = (),
    field: str | None = None,
) -> Path:
    """Write one configuration (canonical layout, batch of 1) atomically.

    The source's metadata records are carried over (ILDG file XML); the record XML is
    replaced by the provenance (ILDG ``scidac-record-xml``); HDF5 stores the provenance
    per configuration.

    Arguments:
        path: Output file.
        x: Configuration, shape (1, ...) in the canonical layout (DESIGN.md section 2).
        fmt: A writable format.
        source_meta: :class:`flowplug.io.Metadata` of the input it descends from, or ``None``.
        precision: 32 or 64 bits.
        provenance: Record of :func:`flowplug.jobs.provenance.provenance`.
        header: Header values (``{"trajectory": 10}``).
        overwrite: Replace an existing file.
        inputs: Files that must never be overwritten.

    Raises:
        FormatError: if ``path`` is one of ``inputs``, exists and ``overwrite`` is false,
            or the format cannot hold the data.
    """
    from flowplug import io

    path = Path(path)
    _refuse_input(path, {Path(p).resolve() for p in inputs})
    prov = dict(provenance or {})
    meta = _metadata(source_meta, precision, prov, header)
    meta.records.append(io.Record("scidac-record-xml", _provenance_xml(prov)))
    ens = io.Ensemble(x.detach().cpu(), field=field, precision=precision, meta=[meta])
    opts: dict[str, Any] = {}
    if fmt == "ildg":
        opts["lfn"] = f"lfn://flowplug/{path.name}"
    return io.write(path, ens, fmt, precision=precision, overwrite=overwrite, **opts)


def _truncate_store(path: Path, step: int) -> int:
    """Drop the configurations of steps after ``step`` from the end of an HDF5 ensemble store.

    The store is appended in step order and its ``count`` attribute says how many entries
    are committed (the commit protocol of :mod:`flowplug.adapters.hdf5`): ``count`` is
    lowered first, then the datasets are shrunk, so the store stays readable whenever this
    stops. Returns the number of entries removed.
    """
    import h5py

    try:
        with h5py.File(path, "r+") as f:
            count = int(f.attrs["count"])
            keep = count
            while keep > 0:
                doc = f["meta"][keep - 1]
                doc = json.loads(doc.decode() if isinstance(doc, bytes) else doc)
                if int(doc.get("provenance", {}).get("step", -1)) <= step:
                    break
                keep -= 1
            if keep < count:
                f.attrs["count"] = keep
                f.flush()
                f["links"].resize(keep, axis=0)
                f["meta"].resize(keep, axis=0)
    except (OSError, KeyError, ValueError) as exc:
        raise FormatError(
            f"{path}: cannot roll the ensemble store back to step {step} "
            f"({type(exc).__name__}: {exc}); remove it and start afresh with --force"
        ) from None
    return count - keep


# ------------------------------------------------------------------ configurations


class Configurations:
    """Writes the chains' configurations at the save points of a run.

    Save points are the steps t > ``thermalize`` with t a multiple of ``save_every``
    (if > 0) or t = ``total``. At a save point, gauge fields in an HDF5 format go into
    ``store`` when one is given (all chains of the step in one append); otherwise
    multi-configuration formats and non-gauge kinds write ``name(t, None) + "." + ext``
    holding all chains, single-configuration formats ``name(t, c) + "." + ext`` per chain
    (``ext`` = the format's extension, ``h5`` for HDF5).

    Arguments:
        folder: Where the files go.
        fmt: A writable format name, or ``"none"`` (nothing is written).
        field: The field kind of the chains.
        name: ``name(step, chain or None) -> file name without extension`` (in ``folder``).
        provenance: ``provenance(step, chain) -> record`` (see
            :func:`flowplug.jobs.provenance.provenance`).
        store: HDF5 store for all steps (``ensemble.h5``), or ``None``.
        save_every, total, thermalize: The save points.
        source_meta: Per chain, the :class:`flowplug.io.Metadata` of its input (resample).
        precision: 32 or 64 bits.
        header: ``header(step) -> dict`` of header values of each configuration.
        attrs: Ensemble-wide attributes of multi-configuration files.
        overwrite: Replace existing files (``--force``; always on a resume for the
            steps the resumed chain does again).
        inputs: Files never to write over (nor to remove as an earlier run's, :meth:`start`).
        pattern: Regular expression that the names ``name`` gives match exactly, without
            the extension (``traj_\\d+(?:_chain_\\d+)?``): files of an earlier run in
            ``folder`` so named are refused or removed on a fresh start (:meth:`start`).
        first_chain: Global index of this process's first chain (a sharded run,
            :mod:`flowplug.distributed`): ``name`` and ``provenance`` receive global
            indices, ``source_meta`` is indexed by the local one. Under torchrun, files
            holding several chains and the store get ``.rank<r>`` before the extension.

    Raises:
        ConfigError: if the format is read-only or cannot hold the field kind.
    """

    def __init__(
        self,
        folder: Path,
        fmt: str,
        field: str,
        *,
        name: Callable[[int, int | None], str],
        provenance: Callable[[int, int], dict[str, Any]],
        store: Path | None = None,
        save_every: int = 0,
        total: int = 0,
        thermalize: int = 0,
        source_meta: Sequence[Any] | None = None,
        precision: int = 64,
        header: Callable[[int], Mapping[str, Any]] | None = None,
        attrs: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        inputs: Sequence[Path] = (),
        first_chain: int = 0,
        pattern: str | None = None,
    ) -> None:
        from flowplug import distributed, io
        from flowplug.manager import registry

        if save_every < 0:
            raise ConfigError(f"save_every must be >= 0; found {save_every}")
        self.folder = Path(folder)
        self.field = field
        self.format = str(fmt).strip().lower()
        self.handler = None
        if self.format != "none":
            spec = registry("file_format").get(self.format)
            if not spec.writable:
                raise ConfigError(
                    f"format {spec.name} is read-only; writable formats: {', '.join(io.formats(writable=True))}"
                )
            self.format = spec.name
            self.handler = io.get_format(spec.name)
            if not self.handler.holds(field):
                raise ConfigError(
                    f"format = {self.format!r} holds {', '.join(self.handler.fields)} fields, not "
                    f'{field}: write them as hdf5 (or format = "none")'
                )
            self.ext = extension_of(spec.name)
        self.name, self.provenance = name, provenance
        # the store of an earlier run goes on --force whatever this run's format (earlier_files)
        self._store_base = Path(store) if store is not None else None
        self.store = Path(store) if store is not None and self.format == "hdf5" else None
        if self.store is not None:
            self.store = self.store.with_name(distributed.rank_name(self.store.name))
        self.first_chain = int(first_chain)
        self._rank_name = distributed.rank_name
        self.save_every, self.total, self.thermalize = int(save_every), int(total), int(thermalize)
        self.source_meta = list(source_meta) if source_meta is not None else None
        self.precision = int(precision)
        self.header = header
        self.attrs = dict(attrs or {})
        self.overwrite = overwrite
        self.inputs = list(inputs)
        #: The inputs resolved once (checked before every write: thousands of resample inputs)
        self._resolved_inputs = {Path(q).resolve() for q in self.inputs}
        self.pattern = pattern
        #: One entry per configuration written: ``{"path", **provenance}``.
        self.records: list[dict[str, Any]] = []
        #: Steps up to this one are on disk already (a resumed run does not write them again).
        self.done = 0

    @property
    def enabled(self) -> bool:
        """Whether configurations are written at all (``format != "none"``)."""
        return self.format != "none"

    def check(self, x: torch.Tensor) -> None:
        """Refuse, before anything runs, a format that cannot hold these configurations.

        Raises:
            ConfigError: naming the format and the reason.
        """
        if self.handler is None:
            return
        from flowplug import io

        reason = self.handler.can_write(io.Ensemble(x[:1].detach().cpu(), field=self.field))
        if reason:
            raise ConfigError(f"format = {self.format!r}: {reason}")

    def is_save_point(self, step: int) -> bool:
        """Whether configurations are written after ``step``."""
        return (
            self.enabled
            and step > max(self.thermalize, self.done)
            and ((self.save_every > 0 and step % self.save_every == 0) or step == self.total)
        )

    def earlier_files(self, records: Sequence[Mapping[str, Any]] = (), keep: Sequence[Path] = ()) -> list[Path]:
        """The configuration files of an earlier run in this run's location.

        These are the files in ``folder`` (and the store's folder) that are listed in the
        earlier run's ``records`` (``provenance.json``: the file at the recorded path, or,
        recorded as a relative path from another working directory, the file of that name
        here when this folder's path ends with the recorded folder; an absolute path
        elsewhere never names a file here),
        or whose names match exactly the job's naming ``pattern`` (with ``.rank<r>``
        before the extension, as sharded runs write them), or the store (``ensemble.h5``,
        ``ensemble.rank<r>.h5``, whatever this run's format); each with the extension of a
        writable format. Files of other names, the ``inputs`` and ``keep`` (also when they
        lie here and match), are never among them.

        Arguments:
            records: The ``outputs`` of the earlier run's ``provenance.json``.
            keep: Further files never among them (the earlier run's inputs).

        Returns:
            The files, sorted.
        """
        listed, named = self._earlier(records, keep)
        return sorted({*listed, *named})

    def _earlier(
        self, records: Sequence[Mapping[str, Any]], keep: Sequence[Path] = ()
    ) -> tuple[list[Path], list[Path]]:
        """:meth:`earlier_files` as ``(listed in records, matched by name alone)``."""
        import re

        from flowplug import io

        exts = "|".join(re.escape(extension_of(f)) for f in io.formats(writable=True))
        rank = r"(?:\.rank\d+)?"
        listed = [Path(str(r["path"])) for r in records if isinstance(r, Mapping) and "path" in r]
        ours = re.compile(rf"(?:{self.pattern}){rank}\.(?:{exts})") if self.pattern else None
        kinds = re.compile(rf".+\.(?:{exts})")
        places: dict[Path, list[re.Pattern[str]]] = {self.folder: [ours] if ours is not None else []}
        if self._store_base is not None:
            stem = re.escape(self._store_base.stem)
            places.setdefault(self._store_base.parent, []).append(re.compile(rf"{stem}{rank}\.h5"))
        inputs = {Path(p).resolve() for p in [*self.inputs, *keep]}
        found: set[Path] = set()
        by_name: set[Path] = set()

        def recorded_here(q: Path, here: Path) -> bool:
            # the file at its recorded path, or (a relative path recorded from another working
            # directory) in a folder whose path ends with the recorded one; never a folder of
            # the same name elsewhere (which would name files here the earlier run did not write)
            if q.resolve().parent == here:
                return True
            tail = q.parent.parts
            return not q.is_absolute() and bool(tail) and ".." not in tail and here.parts[-len(tail) :] == tail

        for place, patterns in places.items():
            if not place.is_dir():
                continue
            here = place.resolve()
            named = {q.name for q in listed if recorded_here(q, here)}
            for p in place.iterdir():
                if not (p.is_file() or p.is_symlink()) or p.resolve() in inputs:
                    continue
                if p.name in named and kinds.fullmatch(p.name):
                    found.add(p)
                elif any(rx.fullmatch(p.name) for rx in patterns):
                    by_name.add(p)
        return sorted(found), sorted(by_name - found)

    def start(
        self,
        *,
        resume: bool,
        force: bool,
        records: Sequence[Mapping[str, Any]] = (),
        keep: Sequence[Path] = (),
        by_name: bool = True,
    ) -> list[Path]:
        """Before the first step of a fresh run: refuse, or with ``force`` remove, the
        configuration files of an earlier run in this run's location
        (:meth:`earlier_files`; the store among them), so that a new ensemble never mixes
        with an old one. Under torchrun rank 0 removes them (every rank's).

        Arguments:
            resume: A resumed run: nothing is checked (:meth:`resumed` rolls back).
            force: Remove the earlier run's files.
            records: The ``outputs`` of the earlier run's ``provenance.json``.
            keep: Files never to remove nor write over (the earlier run's inputs).
            by_name: Whether files matched by name alone (not in ``records``) count as an
                earlier run's (:class:`ChainOutput`: only when an earlier run of the job is
                recorded in its directory); if not, they are refused, also with ``force``.

        Returns:
            The files removed.

        Raises:
            FormatError: if such files exist and neither ``resume`` nor ``force`` is set,
                naming them and saying that ``force`` deletes them; if files matched by name
                alone exist and ``by_name`` is false; if the store is an input.
        """
        from flowplug import distributed

        if self.store is not None and self.store.exists():
            protected = {Path(q).resolve() for q in [*self.inputs, *(() if resume else keep)]}
            if self.store.resolve() in protected:
                raise FormatError(
                    f"{self.store}: is an input; refusing to write this run's ensemble store into it "
                    "(choose another output)"
                )
        if resume:
            return []
        listed, named = self._earlier(records, keep)
        stale = sorted({*listed, *named})
        here = [q for q in keep if Path(q).exists()]
        self.inputs += [q for q in here if q not in self.inputs]  # never written over either
        self._resolved_inputs = {Path(q).resolve() for q in self.inputs}
        if not stale:
            return []

        def show(paths: Sequence[Path]) -> str:
            return ", ".join(str(p) for p in paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")

        if named and not by_name:
            raise FormatError(
                f"output exists: {self.folder} holds {len(named)} file{'s' if len(named) != 1 else ''} named as "
                f"this job names its configurations ({show(named)}), but no earlier run of this job is recorded "
                "there (its provenance.json, run_files.json or checkpoint): they may be another program's or "
                "yours, so --force does not delete them; move them away or choose another output"
            )
        if not force:
            n = len(stale)
            raise FormatError(
                f"output exists: {self.folder} holds configuration files of an earlier run ({show(stale)}); continue "
                f"that run with --resume, or choose another output; --force starts afresh and DELETES these {n} "
                f"file{'s' if n != 1 else ''} (and the earlier provenance.json and measurements)"
            )
        if distributed.is_main():
            for p in stale:
                p.unlink(missing_ok=True)
        return stale

    def resumed(self, step: int, records: Sequence[Mapping[str, Any]] = (), chains: int | None = None) -> None:
        """Roll back to a checkpoint at ``step``: later store entries go, earlier records stay
        (of a sharded run, the records of this process's ``chains`` chains from ``first_chain``)."""
        self.done = int(step)
        mine = range(self.first_chain, self.first_chain + chains) if chains is not None else None
        self.records = [
            dict(r)
            for r in records
            if int(r.get("step", 0)) <= self.done and (mine is None or int(r.get("chain", -1)) in mine)
        ]
        self.overwrite = True  # files of later steps are the dead run's: the resumed chain replaces them
        if self.store is not None and self.store.exists():
            _truncate_store(self.store, self.done)

    def save(self, step: int, x: torch.Tensor) -> None:
        """Write the configurations ``x`` (B, ...) after ``step`` if it is a save point."""
        if not self.is_save_point(step):
            return
        from flowplug import io

        x = x.detach().cpu()
        n = x.shape[0]
        provs = [self.provenance(step, self.first_chain + c) for c in range(n)]
        header = dict(self.header(step)) if self.header is not None else {}
        src = self.source_meta or [None] * n
        assert self.handler is not None  # a save point needs a format (enabled)
        if self.store is not None or self.handler.multi:
            metas = [_metadata(src[c], self.precision, provs[c], header) for c in range(n)]
            ens = io.Ensemble(
                x, field=self.field, precision=self.precision, meta=metas, attrs={**self.attrs, "step": step}
            )
            if self.store is not None:
                path = self.store
                io.write(path, ens, "hdf5", precision=self.precision, append=path.exists())
            else:
                path = self.folder / self._rank_name(f"{self.name(step, None)}.{self.ext}")
                _refuse_input(path, self._resolved_inputs)
                io.write(path, ens, self.format, precision=self.precision, overwrite=self.overwrite)
            self.records += [{"path": str(path), **p} for p in provs]
            return
        for c in range(n):
            path = self.folder / f"{self.name(step, self.first_chain + c)}.{self.ext}"
            _refuse_input(path, self._resolved_inputs)
            write_configuration(
                path,
                x[c : c + 1],
                self.format,
                source_meta=src[c],
                precision=self.precision,
                provenance=provs[c],
                header=header,
                overwrite=self.overwrite,
                field=self.field,
            )
            self.records.append({"path": str(path), **provs[c]})


# ------------------------------------------------------------------- measurements


def write_measurements(
    path: Path,
    history: Mapping[str, torch.Tensor],
    *,
    step_label: str = "step",
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Write chain histories atomically, as HDF5 (``.h5``) or CSV (``.csv``).

    HDF5: one dataset per name, layout (steps, chains) as in
    :meth:`flowplug.chain.Chain.history_tensors`, stated by its attribute ``axes`` =
    ``"steps,chains"`` (give ``step_axis=0`` to :mod:`flowplug.stats`); a dataset
    ``step_label`` (``"trajectory"``, ``"step"``) = 1..T with ``axes = "steps"``; the
    run configuration as TOML in the root attribute ``config``. CSV: columns
    ``step_label, chain, <names>``, one row per step (from 1) and chain.

    Arguments:
        path: ``measurements.h5`` or ``measurements.csv``.
        history: name -> (T, B) float64 tensors.
        step_label: Name of the step counter.
        config: The run configuration (HDF5 only).
    """
    from flowplug.fsutil import atomic_path, atomic_write

    path = Path(path)
    names = list(history)
    t = next(iter(history.values())).shape[0] if history else 0
    if path.suffix == ".h5":
        import h5py

        from flowplug import config as _config

        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as f:
                ds = f.create_dataset(step_label, data=np.arange(1, t + 1, dtype=np.int64))
                ds.attrs["axes"] = "steps"
                for name in names:
                    # the layout travels with the data: (steps, chains), step_axis=0 in flowplug.stats
                    ds = f.create_dataset(name, data=history[name].numpy())
                    ds.attrs["axes"] = "steps,chains"
                f.attrs["layout"] = f"<name>[{step_label} - 1, chain]"
                if config is not None:
                    f.attrs["config"] = _config.dumps(config)
        return path
    buf = _stdio.StringIO()
    w = csv.writer(buf)
    w.writerow([step_label, "chain", *names])
    b = history[names[0]].shape[1] if names else 0
    cols = [history[n].numpy() for n in names]
    for i in range(t):
        for c in range(b):
            w.writerow([i + 1, c, *(repr(float(col[i, c])) for col in cols)])
    with atomic_write(path, "w") as fh:
        fh.write(buf.getvalue())
    return path


def read_measurements(path: Path) -> dict[str, np.ndarray]:
    """Read what :func:`write_measurements` wrote: name -> (steps, chains) float64 arrays.

    The step counter (``trajectory``/``step``) is left out.

    Raises:
        FormatError: if the file is missing or not a measurements file.
    """
    path = Path(path)
    try:
        if path.suffix == ".h5":
            import h5py

            with h5py.File(path, "r") as f:
                return {
                    k: np.asarray(f[k][()], dtype=np.float64) for k in f if f[k].attrs.get("axes") == "steps,chains"
                }
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except (OSError, KeyError, ValueError) as exc:
        raise FormatError(f"{path}: cannot read measurements ({type(exc).__name__}: {exc})") from None
    if not rows or len(rows[0]) < 2 or rows[0][1] != "chain":
        raise FormatError(f"{path}: not a flowplug measurements file (header {rows[:1]})")
    names = rows[0][2:]
    data = np.asarray([[float(v) for v in r] for r in rows[1:]], dtype=np.float64).reshape(-1, len(rows[0]))
    steps = int(data[:, 0].max()) if len(data) else 0
    chains = int(data[:, 1].max()) + 1 if len(data) else 0
    return {n: data[:, 2 + j].reshape(steps, chains) for j, n in enumerate(names)}


# ------------------------------------------------------------------- the run directory


class ChainOutput:
    """The run directory of a chain job; :func:`flowplug.jobs.chains.run_chains` calls it.

    Arguments:
        out: The run directory.
        command: The job's name (``summary.json`` ``command``).
        checkpoint: File name of the chain checkpoint in ``out``.
        configurations: Writer of the configurations, or ``None``.
        measurements: ``"hdf5"`` (``measurements.h5``), ``"csv"`` (``measurements.csv``)
            or ``None``.
        step_label: Name of the step counter in the measurements (``trajectory`` for HMC).
        config: The run configuration (stored with HDF5 measurements, and as
            ``config.toml`` with every checkpoint).
        what: ``what`` of the ``flowplug_checkpoint_written`` event.

    Under torchrun (:mod:`flowplug.distributed`) every rank builds its own
    :class:`ChainOutput`: the checkpoint is the rank's (``checkpoint.rank<r>.pt``); the
    measurements, ``provenance.json``, report and summary are rank 0's, written from what
    :meth:`merged` gathers. :meth:`checkpoint`, :meth:`merged` and :meth:`finish` are then
    collective: every rank calls them at the same steps (they do: the ranks step in
    lockstep).

    Raises:
        ConfigError: on an unknown measurements format.
    """

    def __init__(
        self,
        out: Path,
        command: str,
        *,
        checkpoint: str = "chain.ckpt",
        configurations: Configurations | None = None,
        measurements: str | None = None,
        step_label: str = "step",
        config: Mapping[str, Any] | None = None,
        what: str = "chain",
    ) -> None:
        from flowplug import distributed

        self.out = Path(out)
        self.command = command
        self.world_size = distributed.world_size()
        self.is_main = distributed.is_main()
        self.checkpoint_path = self.out / distributed.rank_name(checkpoint)
        self.configurations = configurations
        if measurements is not None and str(measurements).strip().lower() not in ("hdf5", "csv"):
            raise ConfigError(f"measurements = {measurements!r}: choose 'hdf5' or 'csv'")
        self.measurements = None if measurements is None else str(measurements).strip().lower()
        self.step_label = step_label
        self.config = config
        #: what ``run_files.json`` records (set by the job; written with every checkpoint)
        self.run_files: Mapping[str, Any] | None = None
        self.what = what
        self._measured = -1
        self._merged: tuple[int, dict[str, torch.Tensor], list[dict[str, Any]]] | None = None

    @property
    def measurements_path(self) -> Path | None:
        """``out/measurements.h5`` or ``.csv`` (``None`` without measurements)."""
        if self.measurements is None:
            return None
        return self.out / ("measurements.h5" if self.measurements == "hdf5" else "measurements.csv")

    @property
    def provenance_path(self) -> Path:
        """``out/provenance.json``."""
        return self.out / "provenance.json"

    @property
    def written(self) -> list[dict[str, Any]]:
        """Every configuration this process wrote in the run (across resumes):
        ``{"path", **provenance}`` (of all processes: :meth:`merged`)."""
        return list(self.configurations.records) if self.configurations is not None else []

    def merged(self, chain: Any) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
        """The history of every chain of the run and every configuration written.

        In one process: ``chain.history_tensors()`` and :attr:`written`. Under torchrun
        (collective: every rank calls it at the same step): the ranks' histories joined
        along the chains' axis in rank order, which is the global chain order (a rank's
        chains are a contiguous block), and every rank's records, sorted by step and
        chain as one process appends them.

        Returns:
            ``(history, records)``: name -> (steps, chains) float64, and
            ``[{"path", **provenance}, ...]``.
        """
        if self._merged is not None and self._merged[0] == chain.step_count:
            return self._merged[1], self._merged[2]
        history = chain.history_tensors()
        records = self.written
        if self.world_size > 1:
            from flowplug import distributed

            history = distributed.gather_history(history)
            records = [r for part in distributed.all_gather_object(records) for r in part]
            records.sort(key=lambda r: (int(r.get("step", 0)), int(r.get("chain", 0))))
        self._merged = (chain.step_count, history, records)
        return history, records

    def _earlier_records(self) -> list[Mapping[str, Any]]:
        """The ``outputs`` of ``provenance.json`` in ``out`` (an earlier run's, or this run's
        before a resume); none if it is missing or unreadable."""
        if not self.provenance_path.exists():
            return []
        try:
            records = json.loads(self.provenance_path.read_text(encoding="utf-8")).get("outputs", [])
        except (OSError, ValueError, AttributeError):
            return []
        return [r for r in records if isinstance(r, Mapping)] if isinstance(records, list) else []

    def _earlier_run(self) -> tuple[list[Mapping[str, Any]], list[Path], bool]:
        """What ``out`` records of an earlier run, for a fresh start: the records of its
        ``provenance.json`` written by this command, the files earlier runs read (their
        inputs, flow and start file, in ``provenance.json`` and ``run_files.json``: never
        removed nor written over), and whether an earlier run of this command is recorded
        (such records, ``run_files.json`` of this command, or, without ``run_files.json``,
        a checkpoint)."""
        import re

        from flowplug.jobs.provenance import RUN_FILES

        records = self._earlier_records()
        ours = [r for r in records if r.get("command") == self.command]
        read = [r[k] for r in records for k in ("input", "flow") if isinstance(r.get(k), str)]
        files: Any = None
        try:
            files = json.loads((self.out / RUN_FILES).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass
        files = files if isinstance(files, Mapping) else None

        def walk(v: Any) -> None:
            if isinstance(v, str):
                read.append(v)
            elif isinstance(v, Mapping):
                for k in ("path", "file", "given"):
                    if isinstance(v.get(k), str):
                        read.append(v[k])
            elif isinstance(v, list):
                for x in v:
                    walk(x)

        for key in ("flow", "inputs", "files", "skipped", "start"):
            walk((files or {}).get(key))
        keep = [Path(v) for v in read if v]
        if files is not None:
            recorded = bool(ours) or files.get("command") == self.command
        else:
            stem, suffix = re.sub(r"\.rank\d+$", "", self.checkpoint_path.stem), self.checkpoint_path.suffix
            rx = re.compile(rf"{re.escape(stem)}(?:\.rank\d+)?{re.escape(suffix)}")
            recorded = bool(ours) or (
                self.out.is_dir() and any(rx.fullmatch(q.name) for q in self.out.glob(f"{stem}*{suffix}"))
            )
        return ours, keep, recorded

    def start(self, *, resume: bool = False, force: bool = False) -> None:
        """Create ``out``; on a fresh run refuse, or with ``force`` remove, the outputs of an
        earlier run that would mix with this run's.

        These are the earlier run's configuration files (:meth:`Configurations.start`: those
        its ``provenance.json`` lists as written by this command and those named as this job
        names them, the ensemble store among them; never an input of this run or of an earlier
        one, :meth:`_earlier_run`; files named so when no earlier run of this command is
        recorded in ``out`` are refused, also with ``force``) and, with ``force``, its ``provenance.json`` and
        measurements (``measurements.h5``, ``measurements.csv``). Nothing else is touched
        (the checkpoint, ``config.toml`` and ``run_files.json`` are replaced at the first
        checkpoint, ``summary.json`` at the end).

        Raises:
            FormatError: if earlier configuration files exist and neither ``resume`` nor
                ``force`` is set, naming them.
        """
        if resume:
            if self.configurations is not None:
                self.configurations.start(resume=True, force=force)
        else:
            if self.configurations is not None:
                records, keep, recorded = self._earlier_run()
                if force and self.world_size > 1:
                    from flowplug import distributed

                    distributed.barrier()  # every rank read what the earlier run recorded before rank 0 removes
                self.configurations.start(resume=False, force=force, records=records, keep=keep, by_name=recorded)
            if force and self.is_main:
                for path in (self.provenance_path, self.out / "measurements.h5", self.out / "measurements.csv"):
                    path.unlink(missing_ok=True)
            if force and self.world_size > 1:
                from flowplug import distributed

                distributed.barrier()  # rank 0 removed every rank's files before any writes
        self.out.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------- called by the driver

    def resumed(self, chain: Any) -> None:
        """After the chain was restored from its checkpoint: roll the outputs back to its step."""
        if self.configurations is None:
            return
        records = self._earlier_records()
        # of a sharded run's records (rank 0 wrote every rank's), each rank keeps its own chains'
        mine = chain.state.batch if self.world_size > 1 else None
        self.configurations.resumed(chain.step_count, records, chains=mine)

    def after_step(self, chain: Any, info: Mapping[str, Any] | None = None) -> None:
        """After every step: configurations at save points."""
        if self.configurations is not None and self.configurations.is_save_point(chain.step_count):
            self.configurations.save(chain.step_count, chain.state.x)  # (the streams joined only here)

    def checkpoint(self, chain: Any) -> None:
        """Measurements and ``provenance.json`` up to the chain's step, ``config.toml`` and
        ``run_files.json``, then its checkpoint."""
        from flowplug.manager import get_plugin_manager

        self._write_tables(chain)
        if self.is_main and self.config is not None:
            from flowplug.jobs.provenance import write_run_config

            write_run_config(self.out, self.config)
        if self.is_main and self.run_files is not None:
            from flowplug.jobs.provenance import write_run_files

            write_run_files(self.out, self.run_files)
        chain.save(self.checkpoint_path)
        get_plugin_manager().notify(
            "flowplug_checkpoint_written", path=str(self.checkpoint_path), step=chain.step_count, what=self.what
        )

    # --------------------------------------------------------------- at the end

    def _write_tables(self, chain: Any) -> None:
        history, records = self.merged(chain)  # collective under torchrun
        if not self.is_main:
            return
        if self.measurements_path is not None and self._measured != chain.step_count:
            write_measurements(self.measurements_path, history, step_label=self.step_label, config=self.config)
            self._measured = chain.step_count
        if self.configurations is not None and self.configurations.enabled:
            from flowplug.fsutil import write_json

            write_json(self.provenance_path, {"outputs": records})

    def finish(
        self, chain: Any, summary: Mapping[str, Any], *, report: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Write the last measurements, ``provenance.json``, ``report.png`` and ``summary.json``.

        Arguments:
            chain: The chain at the end of the run.
            summary: The job's figures.
            report: Keyword arguments of :func:`flowplug.jobs.report.chain_report`
                (``history``, ``names``, ``title``, ``acceptance``, ``weights``), or ``None``
                for no report.

        Returns:
            ``summary`` as written (with ``command`` and ``flowplug_version``); on a rank
            other than 0 of a torchrun world, which writes none of these,
            ``{"rank", "world_size"}``.
        """
        self._write_tables(chain)
        if not self.is_main:
            from flowplug import distributed

            return {"rank": distributed.rank(), "world_size": self.world_size}
        if report is not None:
            from flowplug.jobs.report import chain_report

            chain_report(self.out / "report.png", **report)
        return write_job_summary(self.out, self.command, summary)


def write_job_summary(out: Path, command: str, summary: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``out/summary.json`` (:func:`flowplug.fsutil.write_summary`: tells plugins through
    ``flowplug_run_finished``) and return what it holds: ``command``, ``flowplug_version``
    and the figures."""
    from flowplug._version import __version__
    from flowplug.fsutil import write_summary

    write_summary(out, command, summary)
    return {"command": command, "flowplug_version": __version__, **summary}


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint holds (a chain checkpoint or a training checkpoint), or ``None``
    if it cannot be read (``torch.load(weights_only=True)``: nothing is unpickled)."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        return int(state["step"])
    except Exception:  # a message helper: an unreadable file has no step
        return None


def checkpoint_configurations(path: Path) -> torch.Tensor:
    """The configurations a chain checkpoint holds: this process's chains, (B, ...), the
    random streams' joined in order (``torch.load(weights_only=True)``: nothing is unpickled).

    A resumed job starts its chains from these instead of reading its start again (the
    checkpoint replaces the start anyway): ``hmc --resume`` of a run started from a file
    does not need that file.

    Raises:
        CheckpointError: if the checkpoint is missing (naming those of another number of
            processes, as :func:`flowplug.jobs.chains.run_chains` does), unreadable, or holds
            no configurations.
    """
    from flowplug.chain import read_checkpoint
    from flowplug.errors import CheckpointError
    from flowplug.jobs.chains import _check_checkpoint_present

    path = Path(path)
    _check_checkpoint_present(path)
    d = read_checkpoint(path)
    try:
        parts = d["streams"] if "streams" in d else [d]
        xs = [part["state"]["x"] for part in parts]
        return torch.cat(xs) if len(xs) > 1 else xs[0]
    except (KeyError, TypeError, IndexError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a flowplug chain checkpoint (no configurations: {exc})") from None
