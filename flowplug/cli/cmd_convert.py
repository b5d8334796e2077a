"""``flowplug convert INPUT... OUTPUT [--to FORMAT]``: convert lattice files.

Inputs are files, directories (their regular, non-hidden files, sorted) or glob
patterns. The output is

* one file, when ``OUTPUT`` is not an existing directory, is not written with a
  trailing ``/`` and ends in an extension of the target format (``flowplug convert
  in.ildg out.ildg``, ``in.ildg out.nersc``): one input holding one configuration,
  converted into exactly that file. Without ``--to`` the target is the format of that
  extension;
* one HDF5 ensemble store, when ``OUTPUT`` ends in ``.h5``/``.hdf5``, or ``--to hdf5``
  is given and ``OUTPUT`` is neither an existing directory nor written with a trailing
  ``/``;
* otherwise a directory of files, one per configuration, named after the input with
  its format extension replaced by the target's (``x.ildg`` -> ``x.nersc``;
  ``x.ildg --to ildg`` -> ``x.ildg``; a name without a known format extension keeps
  it: ``ckpoint_lat.1000`` -> ``ckpoint_lat.1000.nersc``), with ``.<index>`` (five
  digits) before the extension for inputs holding several configurations
  (``ens.h5`` -> ``ens.00000.ildg``, ...). ``--to hdf5 DIR/`` splits an ensemble into
  one HDF5 file per configuration.

An ``OUTPUT`` that is not an existing directory and ends in an extension of another
format than the target (``out/x.h5 --to nersc``) is an error naming the name that
would work.

Safety: an existing output is never replaced without ``--force``. An existing output
file is kept and skipped only when it reads back, checks verified, as the very
configuration this conversion would write (values bit for bit, lattice, field kind,
storage precision), so rerunning an interrupted conversion continues where it stopped;
anything else under an output name (junk, a truncated file, another configuration,
another precision) is an error naming the file, the expected and the found
configuration, and ``--force`` replaces it (the same rules hold for a single named
output file). An existing HDF5 store gets only the inputs it does not hold yet (by
source path); every output file is written to a temporary name
(``.<name>.<random>.part``) and renamed when complete, and such temporary files left
by an interrupted earlier run are removed
when their output is written (only names of that exact pattern; do not run two
conversions into the same output at once); an input is never overwritten. The
first bad input stops the run with its error, or with ``--keep-going`` the rest are
converted and every failure is listed at the end (exit code 1).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

from flowplug.errors import FlowplugError, FormatError
from flowplug.fsutil import remove_stale_temp_files
from flowplug.records import CommandSpec

if TYPE_CHECKING:
    from flowplug.ensemble import Ensemble
    from flowplug.io import FormatHandler


class _StoreHandler(Protocol):
    """What ``convert`` calls on the handler of a one-file ensemble store (a ``multi``
    format: HDF5) beyond :class:`flowplug.io.FormatHandler`."""

    def sources(self, path: Path) -> list[str]: ...

    def stored_precision(self, path: Path) -> int: ...


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``flowplug convert``."""
    parser.usage = "flowplug convert INPUT... OUTPUT [--to FORMAT] [--force] [--keep-going] [options]"
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="INPUT... OUTPUT: input files, directories or globs, then the output "
        "directory, .h5 file, or (one input) output file",
    )
    parser.add_argument(
        "--to",
        metavar="FORMAT",
        help="output format (default: the format of OUTPUT's extension, such as hdf5 "
        "for .h5 or nersc for .nersc; else ildg)",
    )
    parser.add_argument("--force", action="store_true", help="replace existing outputs")
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="convert the remaining inputs after a failure; list failures at the end",
    )
    parser.add_argument(
        "--precision",
        type=int,
        choices=(32, 64),
        help="output precision in bits (default: each input's own; a new HDF5 "
        "store is 64-bit so that inputs of both precisions fit)",
    )
    parser.add_argument("--format", metavar="NAME", help="force the input format")
    parser.add_argument("--lattice", metavar="LXxLYxLZxLT", help="lattice of bare LIME inputs, x first")
    parser.add_argument("--group", metavar="GROUP", help="gauge group of bare LIME inputs (su3, su2)")
    parser.add_argument(
        "--no-verify", action="store_true", help="convert inputs whose checksums do not match (not recommended)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _is_hdf5_path(path: Path) -> bool:
    return path.suffix.lower() in (".h5", ".hdf5")


def _named_as(path: Path, target: str) -> bool:
    """Whether ``path``'s name ends in an extension of the format ``target``."""
    from flowplug.manager import registry

    name = path.name.lower()
    return any(name.endswith("." + ext.lower()) for ext in registry("file_format").get(target).extensions)


def output_name(src: Path, handler: FormatHandler, index: int | None = None) -> str:
    """Name of the file converted from ``src`` in an output directory.

    The input's format extension (any registered format's) is replaced by the target's,
    never doubled: ``x.ildg`` -> ``x.nersc`` (``x.ildg`` for an ILDG target); a name
    without a known format extension keeps it (``ckpoint_lat.1000`` ->
    ``ckpoint_lat.1000.nersc``). ``index`` (configuration ``index`` of an input holding
    several) goes before the extension as five digits: ``ens.h5`` -> ``ens.00002.ildg``.
    """
    from flowplug import io

    stem = io.strip_format_extension(src.name)
    return stem + (f".{index:05d}" if index is not None else "") + f".{handler.extension}"


def run(args: argparse.Namespace) -> int:
    """Convert every input; see the module docstring for the rules."""
    from tqdm import tqdm

    from flowplug import io

    if len(args.paths) < 2:
        raise FormatError("convert needs at least one INPUT and the OUTPUT (directory, .h5 file, or output file)")
    output = Path(args.paths[-1])
    inputs = io.expand_inputs(args.paths[:-1])
    # an output written with a trailing slash, or an existing folder, is a folder of files
    as_folder = args.paths[-1].endswith(("/", os.sep)) or output.is_dir()
    looks_like = None if as_folder else io.format_of_name(output)
    if args.to:
        target = io.get_format(args.to).name
    elif looks_like is not None and looks_like in io.formats(writable=True):
        target = looks_like  # out.nersc -> nersc, out.h5 -> hdf5
    else:
        target = "ildg"
    if target not in io.formats(writable=True):
        raise FormatError(f"format {target} cannot be written; writable: {', '.join(io.formats(writable=True))}")
    handler = io.get_format(target)
    single = handler.multi and (_is_hdf5_path(output) or not as_folder)
    # one named file of a one-configuration format: `convert in.ildg out.ildg`
    one_file = not handler.multi and not as_folder and _named_as(output, target)
    resolved_inputs = {p.resolve() for p in inputs}
    if (single or one_file) and output.resolve() in resolved_inputs:
        raise FormatError(f"output {output} is also an input; choose another output")
    if one_file and len(inputs) != 1:
        raise FormatError(
            f"output {output} is one {target} file, which holds one configuration, but "
            f"{len(inputs)} inputs were given: give a directory as OUTPUT (one file per "
            "configuration), or an .h5 file (one HDF5 ensemble store)"
        )
    if not single and not one_file and output.exists() and not output.is_dir():
        raise FormatError(f"output {output} exists and is not a directory")
    if not single and not one_file and looks_like is not None:
        raise FormatError(
            f"output {output} names a {output.suffix} file, but "
            f"{'--to ' + target if args.to else 'the default format ' + target} writes "
            f"{'.' + handler.extension} files: name the output file "
            f"{output.with_name(io.strip_format_extension(output.name) + '.' + handler.extension).name}, "
            "or give a directory name (an existing directory is used as it is)"
            + (f", or drop --to {args.to} to write one HDF5 ensemble store" if looks_like == "hdf5" else "")
        )

    done_sources: dict[str, int] = {}  # source -> its index in the store
    fresh_store = single and (args.force or not output.exists())
    if single and output.exists() and not args.force:
        # resume an interrupted conversion (each kept entry is checked against its input)
        done_sources = {src: i for i, src in enumerate(cast(_StoreHandler, handler).sources(output))}
    store_tmp = None
    if fresh_store and output.exists():
        store_tmp = output.with_name(f".{output.name}.convert.part")  # --force: replace at the end
        if store_tmp.exists():
            store_tmp.unlink()
    store_path = store_tmp or output
    if single:  # temporary files of an interrupted earlier run into this store
        remove_stale_temp_files(output)
        if store_tmp is not None:
            remove_stale_temp_files(store_tmp)
    failures: list[tuple[str, str]] = []
    written = skipped = 0
    planned: dict[Path, Path] = {}

    bar = tqdm(
        inputs, desc=f"convert -> {target}", unit="file", file=sys.stderr, disable=True if args.no_progress else None
    )
    for src in bar:
        try:
            ens = io.read(src, args.format, lattice=args.lattice, group=args.group, verify=not args.no_verify)
            for i, one in enumerate(ens):
                source = str(src.resolve()) + (f"#{i}" if len(ens) > 1 else "")
                meta = one.meta[0]
                meta.provenance = {
                    **meta.provenance,
                    "source": source,
                    "converted_from": meta.format,
                    "converted_to": target,
                }
                if single:
                    if source in done_sources:
                        if done_sources[source] >= 0:  # an entry of an earlier run
                            _check_in_store(handler, output, done_sources[source], one, src)
                        skipped += 1
                        continue
                    if not store_path.exists():
                        # a new store holds 64-bit data unless told otherwise, so that inputs of
                        # both precisions fit; 32-bit inputs keep precision 32 in their metadata
                        # and read back as 32-bit data (bit-exact)
                        io.write(store_path, one, target, precision=args.precision or 64)
                    else:
                        # the store's own precision: a 64-bit store takes 32-bit inputs exactly
                        # (and keeps values that need more bits, such as a rebuilt third row)
                        stored = getattr(handler, "stored_precision", None)
                        prec = args.precision or (stored(store_path) if stored else None)
                        io.write(store_path, one, target, precision=prec, append=True)
                    done_sources[source] = -1  # written by this run
                    written += 1
                    continue
                if one_file:
                    if len(ens) != 1:
                        raise FormatError(
                            f"{src} holds {len(ens)} configurations, but output {output} is "
                            f"one {target} file, which holds one: give a directory as OUTPUT"
                        )
                    dest = output
                else:
                    dest = output / output_name(src, handler, i if len(ens) > 1 else None)
                if dest.resolve() in resolved_inputs:
                    raise FormatError(f"{src}: output {dest} would overwrite an input")
                if dest in planned and planned[dest] != src:
                    raise FormatError(
                        f"{src}: output {dest} is also the output of {planned[dest]}; inputs must have distinct names"
                    )
                planned[dest] = src
                if dest.exists() and not args.force:
                    # kept only when it is the very configuration this run would write (a rerun
                    # continues where it stopped); anything else stops with an error
                    _check_existing(dest, one, target, args.precision, src)
                    skipped += 1
                    continue
                remove_stale_temp_files(dest)  # left by an interrupted earlier run
                io.write(dest, one, target, precision=args.precision, overwrite=args.force)
                written += 1
        except FlowplugError as exc:
            if not args.keep_going:
                bar.close()
                _finish_store(store_tmp, output, keep=False)
                message = f"{src}: {exc}" if str(src) not in str(exc) else str(exc)
                raise FormatError(message + _left_behind(output, single, store_tmp, written, skipped)) from None
            failures.append((str(src), str(exc)))
    bar.close()
    _finish_store(store_tmp, output, keep=True)
    print(
        f"converted {written} configuration(s) to {target} in {output}"
        + (f"; kept {skipped} existing" if skipped else "")
        + (f"; {len(failures)} input(s) failed" if failures else ""),
        file=sys.stderr,
    )
    for src, message in failures:
        print(f"flowplug convert: failed: {message if src in message else src + ': ' + message}", file=sys.stderr)
    return 1 if failures else 0


def _left_behind(output: Path, single: bool, store_tmp: Path | None, written: int, skipped: int) -> str:
    """What a conversion stopped by a failed input leaves in ``output``, for its error message."""
    rerun = "rerun the same command to go on (what is kept is checked against its inputs), or add --keep-going"
    if single and store_tmp is not None:
        return f". {output} is unchanged (the new store was discarded)"
    if single and written + skipped:
        return (
            f". The store {output} keeps the {written + skipped} configuration(s) converted before this "
            f"input; {rerun} to skip failing inputs"
        )
    if written + skipped:
        return f". The {written + skipped} file(s) converted before this input stay in {output}; {rerun}"
    return ""


def _describe(ens: Ensemble) -> str:
    """``su3 2x3x4x5, 32-bit, links sha256 0123456789abcdef`` (the configuration's content)."""
    import hashlib

    digest = hashlib.sha256(ens.data.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
    return (
        f"{ens.field} {'x'.join(map(str, ens.lattice))}, {ens.meta[0].precision}-bit, "
        f"{'links' if ens.is_gauge else 'values'} sha256 {digest}"
    )


def _check_existing(dest: Path, one: Ensemble, target: str, precision: int | None, src: Path) -> None:
    """Return if ``dest`` holds exactly the configuration converting ``one`` would write.

    What would be written is written to a temporary folder and read back; ``dest`` is read
    as ``target`` with its checks verified, and the two must agree bit for bit in their
    values, lattice, field kind and storage precision (provenance such as the source path may
    differ). Raises :class:`FormatError` naming the file, the expected and the found
    configuration and the fix (``--force``) otherwise.
    """
    import tempfile
    import warnings

    import torch

    from flowplug import io

    with tempfile.TemporaryDirectory(prefix="flowplug-convert-") as tmp:
        fresh = Path(tmp) / dest.name
        with warnings.catch_warnings():  # the real write warns, if it ever happens
            warnings.simplefilter("ignore")
            io.write(fresh, one, target, precision=precision)
        expected = io.read(fresh, target, unitarity="ignore")
    want = _describe(expected)
    fix = f"remove it or rerun with --force to replace it with the conversion of {src}"
    try:
        found = io.read(dest, target, unitarity="ignore")
    except FlowplugError as exc:
        raise FormatError(
            f"output {dest} exists but is unreadable as {target} ({exc}); expected the "
            f"conversion of {src}: {want}; found no such configuration; {fix}"
        ) from None
    same = (
        len(found) == 1
        and found.field == expected.field
        and found.lattice == expected.lattice
        and found.meta[0].precision == expected.meta[0].precision
        and torch.equal(found.links, expected.links)
    )
    if same:
        return
    have = _describe(found) if len(found) == 1 else f"{len(found)} configurations"
    ours = {c.quantity: c.expected for c in expected.meta[0].checks if not c.tolerance}
    theirs = {c.quantity: c.expected for c in found.meta[0].checks if not c.tolerance} if len(found) else {}
    differ = [f"{q} expected {ours[q]}, found {theirs[q]}" for q in ours if q in theirs and theirs[q] != ours[q]]
    if found.meta and found.meta[0].precision != expected.meta[0].precision:
        differ.append(f"precision expected {expected.meta[0].precision}, found {found.meta[0].precision}")
    what = (
        "the same links at another storage precision"
        if len(found) == 1 and found.lattice == expected.lattice and torch.equal(found.links, expected.links)
        else "another configuration"
    )
    raise FormatError(
        f"output {dest} exists and is not the conversion of {src}, it holds {what}: "
        f"expected {want}; found {have}" + (f" ({'; '.join(differ)})" if differ else "") + f"; {fix}"
    )


def _check_in_store(handler: FormatHandler, store: Path, index: int, one: Ensemble, src: Path) -> None:
    """Return if entry ``index`` of the ensemble store is ``one`` (rounded to the store's
    precision), bit for bit; raise :class:`FormatError` naming both otherwise."""
    import torch

    entry = handler.read(store, index=index)
    values = one.data
    if int(cast(_StoreHandler, handler).stored_precision(store)) == 32:
        values = values.to(torch.complex64 if values.is_complex() else torch.float32)
    values = values.to(entry.data.dtype)
    if entry.field == one.field and entry.data.shape == values.shape and torch.equal(entry.data, values):
        return
    raise FormatError(
        f"{store}: entry {index} was converted from {src}, but {src} now holds another "
        f"configuration ({_describe(one)}; the store holds {_describe(entry)}): the input "
        "changed since; rebuild the store with --force, or convert into a new one"
    )


def _finish_store(tmp: Path | None, output: Path, *, keep: bool) -> None:
    if tmp is None:
        return
    if keep and tmp.exists():
        os.replace(tmp, output)
    elif tmp.exists():
        tmp.unlink()


COMMAND = CommandSpec(
    name="convert",
    description="convert lattice files between formats (files, directories or globs -> directory or HDF5 ensemble)",
    factory=add_arguments,
    run=run,
)
