"""Identity and provenance of a run: what makes two runs the same chain, and where data came from.

* :func:`fingerprint` hashes the configuration keys that determine a Markov chain
  (and extra strings: the flow checkpoint's and the inputs' SHA-256). A chain
  checkpoint stores it; a resume with another fingerprint is refused
  (:meth:`flowplug.chain.Chain.load`), so ``--resume`` always continues the very same
  chain. Keys that do not change the chain (the number of steps, output settings) are
  left out, so a finished run can be extended.
* :func:`file_sha256` is the SHA-256 of an input or flow checkpoint file (recorded as
  ``input_sha256`` / ``flow_sha256``).
* :func:`provenance` is the record written with every configuration (in the file's
  metadata where the format has room, and in ``provenance.json``).
* :func:`write_run_config` / :func:`stored_run_config`: a chain run's resolved
  configuration, ``config.toml`` in its run directory (written with every checkpoint).
  :func:`resume_configuration` starts a ``--resume`` from it, so the original ``--set``
  values need not be repeated, and :func:`check_resume_config` refuses a resume that
  changes a key of the Markov chain, naming each such key with its stored and its given
  value (before the fingerprint, which stays the final guard). A run directory without
  ``config.toml`` (written by an earlier version) resumes as before: from the given
  configuration, checked by the fingerprint alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flowplug import config as _config
from flowplug.flowtools import file_sha256

__all__ = [
    "fingerprint",
    "file_sha256",
    "provenance",
    "kernel_record",
    "RUN_CONFIG",
    "write_run_config",
    "stored_run_config",
    "resume_configuration",
    "chain_key_differences",
    "check_resume_config",
]

#: File name of a chain run's resolved configuration in its run directory.
RUN_CONFIG = "config.toml"


_MISSING = object()


def _lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    """``tree["a"]["b"]`` for ``"a.b"``, or ``_MISSING``."""
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _same(a: Any, b: Any) -> bool:
    """Equal values of equal TOML types, as the fingerprint sees them: ``2`` and ``2.0``
    differ, floats compare as written (``repr``: ``nan`` equals ``nan``, ``-0.0`` differs
    from ``0.0``)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is not type(b):
        return False
    return repr(a) == repr(b) if isinstance(a, float) else bool(a == b)


def _strip(tree: Mapping[str, Any], ignore: set[tuple[str, ...]], prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = prefix + (str(k),)
        if key in ignore:
            continue
        out[k] = _strip(v, ignore, key) if isinstance(v, Mapping) else v
    return out


def fingerprint(
    config: Mapping[str, Any],
    *extra: str,
    ignore: Iterable[str] = (),
    omit_defaults: Mapping[str, Any] | None = None,
) -> str:
    """A 16-hex-digit hash of a run configuration, to tie checkpoints to runs.

    Arguments:
        config: The effective configuration (a TOML tree: tables, strings, numbers,
            booleans, lists).
        *extra: Further strings that identify the run (SHA-256 of the flow checkpoint
            and of the inputs).
        ignore: Dotted keys (``"hmc.trajectories"``, ``"out"``) that do not change the
            chain and may differ on resume.
        omit_defaults: Dotted key -> value of keys added to a job after runs of it
            existed: such a key is left out while it has this value (the behaviour of the
            runs before it), so their checkpoints keep their fingerprint.

    Returns:
        SHA-256 of the configuration written as TOML (without the ignored keys; key
        order as in the configuration, which :func:`flowplug.config.build_config` takes
        from the job's default), followed by ``|``-joined extras, first 16 hex digits.

    Raises:
        ConfigError: if a value cannot be written as TOML.
    """
    skip = {tuple(k.split(".")) for k in ignore}
    for key, value in (omit_defaults or {}).items():
        found = _lookup(config, key)
        if found is not _MISSING and _same(found, value):
            skip.add(tuple(key.split(".")))
    text = _config.dumps(_strip(config, skip))
    if extra:
        text += "|" + "|".join(str(e) for e in extra)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def provenance(command: str, *, seed: int, step: int, chain: int, flow: Any = None, **extra: Any) -> dict[str, Any]:
    """The provenance record of one written configuration.

    Arguments:
        command: The job (``"hmc"``, ``"sample"``, ``"resample"``...).
        seed: Seed of the chains.
        step: Chain step (trajectory) after which the configuration was taken, from 1.
        chain: Index of the chain in the batch.
        flow: The :class:`flowplug.flowtools.FlowCheckpoint` of a flow job (adds
            ``flow`` = its path and ``flow_sha256``), or ``None``.
        **extra: Further entries (``input``, ``input_sha256``, ``action``...).

    Returns:
        ``{"command", **extra, "flow", "flow_sha256", "seed", "chain", "step"}``.
    """
    rec: dict[str, Any] = {"command": command, **extra}
    if flow is not None:
        rec["flow"] = str(flow.path)
        rec["flow_sha256"] = flow.sha256
    rec.update(seed=int(seed), chain=int(chain), step=int(step))
    return rec


def kernel_record(table: Mapping[str, Any]) -> dict[str, Any]:
    """What a run's summary records of its ``[kernel]`` table: the table itself and, for every
    option naming an existing file (a trained kernel's ``checkpoint``; in a nested table such
    as ``pseudofermion_options.checkpoint`` under its dotted name), its path and SHA-256.

    Arguments:
        table: The ``[kernel]`` table of a sample or resample configuration.

    Returns:
        ``{"type", "hmc_every", "hmc", "options", "files": {option: {"path", "sha256"}}}``
        (the keys the table has, plus ``files``).
    """
    from pathlib import Path

    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in table.items()}
    files = {}

    def scan(options: Mapping[str, Any], prefix: str) -> None:
        for key, value in options.items():
            if isinstance(value, Mapping):  # nested option tables (pseudofermion_options = {checkpoint = ...})
                scan(value, f"{prefix}{key}.")
            elif isinstance(value, str) and value and Path(value).is_file():
                files[f"{prefix}{key}"] = {"path": value, "sha256": file_sha256(value)}

    scan(dict(table.get("options", {})), "")
    out["files"] = files
    return out


# ------------------------------------------------------------------ resolved configuration


def write_run_config(out: str | Path, config: Mapping[str, Any]) -> Path:
    """Write a run's resolved configuration to ``out/config.toml``, atomically.

    Chain jobs write it with every checkpoint (:meth:`flowplug.jobs.output.ChainOutput.checkpoint`),
    so it holds the configuration of the run that wrote the checkpoint; it is also a valid
    ``--config`` file of the job.

    Arguments:
        out: The run directory.
        config: The effective configuration (a TOML tree).

    Returns:
        The path written.

    Raises:
        ConfigError: if a value cannot be written as TOML.
    """
    from flowplug.fsutil import atomic_write

    path = Path(out) / RUN_CONFIG
    text = "# the resolved configuration of this run (flowplug); --resume starts from it\n" + _config.dumps(config)
    with atomic_write(path, "w") as fh:
        fh.write(text)
    return path


def stored_run_config(out: str | Path) -> dict[str, Any] | None:
    """The configuration stored in ``out/config.toml``, or ``None`` if there is none (a run
    directory of an earlier version).

    Raises:
        ConfigError: if the file exists but cannot be read as TOML.
    """
    path = Path(out) / RUN_CONFIG
    if not path.is_file():
        return None
    return _config.load_toml_file(path)


def resume_configuration(
    out: str | Path,
    default_text: str,
    *,
    config_file: str | Path | None = None,
    overrides: Iterable[str] = (),
    open_tables: Iterable[str] = (),
) -> dict[str, Any] | None:
    """The effective configuration of a ``--resume``: the stored one, then ``config_file``,
    then each ``--set``.

    The stored configuration (:func:`stored_run_config`) takes the place of the job's
    defaults, so the keys the original command set need not be given again; keys of the
    job that it lacks (added in a later version) take their defaults. What is given on the
    resume is merged over it and checked as on a fresh run (:func:`flowplug.config.merge`);
    whether it may change the chain is :func:`check_resume_config`'s question.

    Arguments:
        out: The run directory.
        default_text: The job's complete default configuration (TOML text).
        config_file: A ``--config`` file given on the resume, or ``None``.
        overrides: ``--set`` strings given on the resume, applied in order.
        open_tables: The job's open tables (:func:`flowplug.config.merge`).

    Returns:
        The configuration, or ``None`` when ``out`` holds no ``config.toml`` (then the
        caller builds it from the defaults, as before).

    Raises:
        ConfigError: on an unreadable file, an unknown key or a wrongly typed value (of the
            stored file too, naming it).
    """
    stored = stored_run_config(out)
    if stored is None:
        return None
    open_tables = tuple(open_tables)
    base = _config.merge(
        _config.parse_toml(default_text, "default configuration"),
        stored,
        source=str(Path(out) / RUN_CONFIG),
        open_tables=open_tables,
    )
    if config_file is not None:
        base = _config.merge(
            base, _config.load_toml_file(config_file), source=str(config_file), open_tables=open_tables
        )
    for text in overrides:
        base = _config.merge(base, _config.parse_override(text), source=f"--set {text}", open_tables=open_tables)
    return base


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def chain_key_differences(
    stored: Mapping[str, Any],
    given: Mapping[str, Any],
    *,
    ignore: Iterable[str] = (),
    omit_defaults: Mapping[str, Any] | None = None,
) -> list[tuple[str, Any, Any]]:
    """The keys of the Markov chain whose values differ between two configurations.

    Arguments:
        stored: The configuration the run was started with (:func:`stored_run_config`).
        given: The configuration of the resume.
        ignore: Dotted keys (or tables) that do not change the chain (a job's ``NON_CHAIN_KEYS``).
        omit_defaults: As for :func:`fingerprint`: a key missing on one side counts as
            having this value.

    Returns:
        ``[(dotted key, stored value, given value), ...]`` in key order; a key missing on
        one side has the value ``None`` there. Values are compared with their TOML type
        (``2`` and ``2.0`` differ, as they do in the fingerprint).
    """
    skip = tuple(ignore)
    left, right = _leaves(stored), _leaves(given)
    for key, value in (omit_defaults or {}).items():
        left.setdefault(key, value)
        right.setdefault(key, value)
    out = []
    for key in [*left, *(k for k in right if k not in left)]:
        if any(key == s or key.startswith(s + ".") for s in skip):
            continue
        a, b = left.get(key, _MISSING), right.get(key, _MISSING)
        if a is _MISSING or b is _MISSING or not _same(a, b):
            out.append((key, None if a is _MISSING else a, None if b is _MISSING else b))
    return out


def check_resume_config(
    out: str | Path,
    config: Mapping[str, Any],
    *,
    ignore: Iterable[str] = (),
    omit_defaults: Mapping[str, Any] | None = None,
) -> None:
    """Refuse a ``--resume`` whose configuration changes the Markov chain of the stored run.

    Nothing is checked when ``out`` holds no ``config.toml`` (a run directory of an earlier
    version: the fingerprint of the checkpoint alone decides, as before).

    Arguments:
        out: The run directory.
        config: The effective configuration of the resume.
        ignore: The job's ``NON_CHAIN_KEYS`` (these may change: ``steps``, output settings).
        omit_defaults: As for :func:`fingerprint`.

    Raises:
        CheckpointError: naming every differing key with its stored and its given value.
        ConfigError: if ``config.toml`` cannot be read.
    """
    from flowplug.errors import CheckpointError

    stored = stored_run_config(out)
    if stored is None:
        return
    diff = chain_key_differences(stored, config, ignore=ignore, omit_defaults=omit_defaults)
    if not diff:
        return

    def show(v: Any) -> str:
        return "(not set)" if v is None else _config.dumps({"v": v})[4:].strip()

    keys = "; ".join(f"{k}: stored {show(a)}, given {show(b)}" for k, a, b in diff)
    raise CheckpointError(
        f"--resume: {out} holds a different run; its configuration ({Path(out) / RUN_CONFIG}) differs in "
        f"{len(diff)} key{'s' if len(diff) != 1 else ''} of the Markov chain or its measurements (a changed "
        f"observable would mix two definitions in one history): {keys}. Resume without "
        "these --set values (the stored ones are used), or start a new run with --force or another output "
        f"directory; only {', '.join(sorted(set(ignore)))} may change on --resume"
    )
