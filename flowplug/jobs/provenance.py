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
  configuration, checked by the fingerprint alone. A flow job's ``[action]`` (an override
  of the flow's action, ``""``/``0`` = the flow's) is compared as it takes effect instead
  (:func:`check_resume_action`): the flow's own coupling given on a resume is the same chain.
* :func:`resolve_thermalization`: the value of a job's thermalisation key whose default
  (``-1``) adapts to the run's length (``min(cap, steps // 2)``), fixed at the start of
  the run and stored in ``config.toml``, so that the fingerprint and a resume see the
  value used.
* :func:`write_run_files` / :func:`stored_run_files`: the files a chain run reads (the
  flow checkpoint, the input configurations, an HMC start file), as given and resolved,
  with their SHA-256, in ``run_files.json`` of the run directory. A ``--resume`` takes
  them from there (:func:`resume_flow_path`, :func:`resume_inputs`, :func:`resume_start_file`),
  refuses a path given again that is not the stored one, and refuses a flow or input whose
  SHA-256 is not the stored one (:func:`check_file_sha256`), naming the file and both values.
  An HMC start file is not read on a resume (the checkpoint holds the chains).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
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
    "check_resume_action",
    "refuse_earlier_checkpoint",
    "DEFAULT_THERMALIZATION",
    "resolve_thermalization",
    "RUN_FILES",
    "file_record",
    "write_run_files",
    "stored_run_files",
    "resume_flow_path",
    "resume_inputs",
    "resume_read_options",
    "resume_start_file",
    "check_file_sha256",
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

    raise CheckpointError(
        f"--resume: {out} holds a different run; its configuration ({Path(out) / RUN_CONFIG}) differs in "
        f"{_count_keys(diff)} of the Markov chain or its measurements (a changed "
        f"observable would mix two definitions in one history): {_list_differences(diff)}. Resume without "
        "these --set values (the stored ones are used), or start a new run with --force or another output "
        f"directory; only {', '.join(sorted(set(ignore)))} may change on --resume"
    )


def _count_keys(diff: Sequence[Any]) -> str:
    """``"1 key"`` / ``"N keys"`` of a list of differences."""
    return f"{len(diff)} key{'s' if len(diff) != 1 else ''}"


def _list_differences(diff: Sequence[tuple[str, Any, Any]], stored_note: str = "") -> str:
    """``"key: stored S<note>, given G; ..."`` of :func:`chain_key_differences`' output."""
    return "; ".join(f"{k}: stored {_show_value(a)}{stored_note}, given {_show_value(b)}" for k, a, b in diff)


def _show_value(v: Any) -> str:
    """A configuration value as TOML writes it (``(not set)`` for a missing key)."""
    return "(not set)" if v is None else _config.dumps({"v": v})[4:].strip()


def check_resume_action(
    out: str | Path,
    config: Mapping[str, Any],
    effective: Callable[[Mapping[str, Any]], Mapping[str, Any]],
) -> dict[str, Any]:
    """Refuse a ``--resume`` of a flow run whose ``[action]`` changes the action in effect.

    A flow job's ``[action]`` is an override of the flow's stored action (``""`` / ``0`` =
    the flow's), so ``config.toml`` may hold ``beta = 0.0`` for a run at the flow's own
    ``beta = 2.0``. The stored and the given table are compared as they take effect
    (``effective``, the job's resolution against the flow): giving the value in effect is
    the same chain and is accepted; the returned configuration then holds the stored table,
    so the run's fingerprint is unchanged.

    Arguments:
        out: The run directory.
        config: The effective configuration of the resume.
        effective: Maps a configuration to the ``[action]`` table in effect (the flow's
            action table updated with the configuration's non-empty entries).

    Returns:
        A copy of ``config`` with the stored ``[action]`` (``config`` itself, copied, when
        ``out`` holds no ``config.toml``: the fingerprint decides, as before).

    Raises:
        CheckpointError: naming every key whose value in effect differs, with the stored
            value in effect and the given one.
        ConfigError: if ``config.toml`` cannot be read.
    """
    import copy

    from flowplug.errors import CheckpointError

    stored = stored_run_config(out)
    if stored is None:
        return copy.deepcopy(dict(config))
    diff = chain_key_differences({"action": dict(effective(stored))}, {"action": dict(effective(config))})
    if diff:
        raise CheckpointError(
            f"--resume: {out} holds a different run; the action in effect (its [action] in "
            f"{Path(out) / RUN_CONFIG} resolved against the flow's) differs in {_count_keys(diff)}: "
            f"{_list_differences(diff, ' (in effect)')}. Resume without these --set values (the stored "
            "ones are used), or start a new run with --force or another output directory"
        )
    resolved = copy.deepcopy(dict(config))
    resolved["action"] = copy.deepcopy(dict(stored.get("action", {})))
    return resolved


def refuse_earlier_checkpoint(out: str | Path, name: str, *, resume: bool, force: bool) -> None:
    """Refuse a fresh run (neither ``resume`` nor ``force``) into a directory that holds a
    chain checkpoint of an earlier run (``name``: ``chain.ckpt``, or ``chain.rank<r>.ckpt``
    of a process under torchrun), also when that run wrote no configuration files yet (which
    :meth:`flowplug.jobs.output.ChainOutput.start` refuses on their own), as ``hmc`` does
    with its ``checkpoint.pt``.

    Raises:
        FlowplugError: naming the checkpoint, ``--resume`` and ``--force``.
    """
    from flowplug import distributed
    from flowplug.errors import FlowplugError

    if resume or force:
        return
    ckpt = Path(out) / distributed.rank_name(name)
    if any(distributed.all_gather_object(ckpt.exists())):
        raise FlowplugError(
            f"{ckpt} exists: {out} holds an earlier run; continue that run with --resume, or start afresh "
            "with --force (or another --out)"
        )


# ------------------------------------------------------------------ thermalisation default

#: The default of a job's thermalisation key (``sample``'s ``thermalize``, ``hmc``'s
#: ``hmc.thermalization``): the number is chosen from the run's length at its start
#: (:func:`resolve_thermalization`).
DEFAULT_THERMALIZATION = -1


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *head, last = dotted.split(".")
    for part in head:
        node = node[part]
    node[last] = value


def resolve_thermalization(
    cfg: Mapping[str, Any],
    *,
    key: str,
    steps_key: str,
    cap: int,
    out: str | Path,
    resume: bool,
) -> tuple[dict[str, Any], int]:
    """The number of thermalisation steps of a chain run, and the configuration that records it.

    An explicit value (``>= 0``) is used as given and must leave steps to measure
    (``value < steps``). The default, :data:`DEFAULT_THERMALIZATION` (``-1``), becomes
    ``min(cap, steps // 2)`` at the start of a run (so a short run of a few steps works:
    ``steps = 10`` thermalises 5). The number is fixed for the whole run: the returned
    configuration holds it, and the job fingerprints it and writes it to ``config.toml``,
    so extending the run (more steps on ``--resume``) keeps it. On a ``--resume`` the
    default takes the value stored in ``config.toml``, and another value is refused; a run directory without one (an
    earlier version, whose default was ``cap``) resumes with ``cap``, the value it ran
    with, so its fingerprint is unchanged. A run with ``steps >= 2 cap`` and the default
    has the fingerprint it had when the default was ``cap``.

    Arguments:
        cfg: The effective configuration.
        key: The dotted key of the thermalisation (``"thermalize"``, ``"hmc.thermalization"``).
        steps_key: The dotted key of the total number of steps (``"steps"``,
            ``"hmc.trajectories"``).
        cap: The largest default (the fixed default of earlier versions: 20 for ``sample``,
            10 for ``hmc``).
        out: The run directory (its ``config.toml`` on a resume).
        resume: Whether the run resumes.

    Returns:
        ``(configuration with the value at key, value)``; the configuration is a copy.

    Raises:
        ConfigError: for a value below -1, or a value that is not below the number of
            steps, naming both keys and their values.
        CheckpointError: on a resume that gives another value than the one in
            ``config.toml`` (naming the key, the stored and the given value): the run's
            saved configurations and statistics leave out exactly the stored number of
            steps, so ``hmc``'s ``hmc.thermalization`` (not in its fingerprint) is fixed as
            ``sample``'s ``thermalize`` is.
    """
    import copy

    from flowplug.errors import ConfigError

    value = int(_lookup(cfg, key))
    steps = int(_lookup(cfg, steps_key))
    rule = f"min({cap}, {steps_key} // 2)"
    stored = stored_run_config(out) if resume else None
    found = _lookup(stored, key) if stored is not None else _MISSING
    kept = int(found) if isinstance(found, int) and not isinstance(found, bool) and found >= 0 else None
    if resume and kept is not None and value not in (DEFAULT_THERMALIZATION, kept):
        # saved configurations of the run would fall inside (or a new window leave out) the
        # thermalisation: the same chain keeps its thermalisation, in every job
        from flowplug.errors import CheckpointError

        raise CheckpointError(
            f"--resume: {out} holds a run thermalised for {kept} steps; {key}: stored {kept} "
            f"({Path(out) / RUN_CONFIG}), given {value}. The thermalisation is fixed when a run starts (its "
            "saved configurations and statistics leave out exactly those steps): resume without "
            f"{key} (the stored value is used), or start a new run with --force or another output directory"
        )
    if value == DEFAULT_THERMALIZATION:
        if resume:
            value = kept if kept is not None else cap
        else:
            value = min(cap, steps // 2)
    elif value < 0:
        raise ConfigError(
            f"{key} = {value}: give the number of thermalisation steps (>= 0), or {DEFAULT_THERMALIZATION} "
            f"for the default {rule}"
        )
    if value >= steps:
        raise ConfigError(
            f"{steps_key} = {steps} leaves nothing after {key} = {value}: need {key} < {steps_key} (the first "
            f"{key} steps are left out of the statistics and of the written configurations, so nothing would "
            f"be measured); lower {key}, raise {steps_key}, or leave {key} unset (its default is {rule}, fixed "
            "when the run starts)"
        )
    out_cfg = copy.deepcopy(dict(cfg))
    _set_dotted(out_cfg, key, value)
    return out_cfg, value


# ------------------------------------------------------------------ files a run reads

#: File name of the record of the files a chain run reads, in its run directory.
RUN_FILES = "run_files.json"


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def file_record(given: str | Path, *, sha256: str | None = None, file: str | Path | None = None) -> dict[str, Any]:
    """One entry of ``run_files.json``.

    Arguments:
        given: The path as the user gave it (relative paths stay relative).
        sha256: The SHA-256 of the file read, or ``None`` (a directory or a pattern).
        file: The file actually read, when it is not ``given`` itself (the ``checkpoint.pt``
            of a flow run directory).

    Returns:
        ``{"given", "path"}`` (``path``: ``given`` resolved to an absolute path), with
        ``"file"`` (resolved) when ``file`` is given and ``"sha256"`` when known.
    """
    rec: dict[str, Any] = {"given": str(given), "path": str(_resolved(given))}
    if file is not None:
        rec["file"] = str(_resolved(file))
    if sha256 is not None:
        rec["sha256"] = str(sha256)
    return rec


def write_run_files(out: str | Path, record: Mapping[str, Any]) -> Path:
    """Write ``out/run_files.json`` (atomically): the files a chain run reads.

    :class:`flowplug.jobs.output.ChainOutput` writes it (its ``run_files``, set by the job)
    with ``config.toml`` just before each checkpoint, on rank 0, so it describes the run
    that wrote the checkpoint; a resume
    writes the record it read back unchanged (a run of an earlier version gets one).

    Arguments:
        out: The run directory.
        record: ``{"command", "flow": file_record or None, "inputs": [file_record],
            "files": [file_record with sha256], "skipped": [str], "read_options": {...},
            "start": file_record}`` (the keys the job has).

    Returns:
        The path written.
    """
    from flowplug.fsutil import write_json

    return write_json(Path(out) / RUN_FILES, dict(record))


def stored_run_files(out: str | Path) -> dict[str, Any] | None:
    """The record of :func:`write_run_files`, or ``None`` when ``out`` has none (a run of an
    earlier version, or one that has not started).

    Raises:
        CheckpointError: if the file exists but is not a JSON object.
    """
    import json

    from flowplug.errors import CheckpointError

    path = Path(out) / RUN_FILES
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot be read as JSON ({exc}); restore it or give the paths again") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _usable(entry: Mapping[str, Any]) -> str:
    """The stored path as given when it still names the same place from here, else the
    resolved absolute path (a resume from another working directory)."""
    given, path = str(entry["given"]), str(entry["path"])
    return given if _resolved(given) == Path(path) else path


def check_file_sha256(out: str | Path, what: str, entry: Mapping[str, Any], found: str) -> None:
    """Refuse a file read on a ``--resume`` whose SHA-256 is not the one stored when the run started.

    Arguments:
        out: The run directory (named in the message).
        what: What the file is (``"flow checkpoint"``, ``"input"``, ``"start file"``).
        entry: Its :func:`file_record` (with ``sha256``).
        found: The SHA-256 of the file now.

    Raises:
        CheckpointError: naming the file, the stored and the found SHA-256.
    """
    from flowplug.errors import CheckpointError

    stored = entry.get("sha256")
    if stored is None or stored == found:
        return
    name = entry.get("file") or entry["path"]
    raise CheckpointError(
        f"--resume: the {what} {name} changed since the run in {out} started: SHA-256 stored "
        f"{stored} ({Path(out) / RUN_FILES}), found {found}. The run's fingerprint holds the stored one; "
        "restore that file, or start a new run (--force or another output directory)"
    )


def _refuse_other_path(out: str | Path, what: str, stored: str, given: str) -> None:
    from flowplug.errors import CheckpointError

    raise CheckpointError(
        f"--resume: the {what} given, {given}, is not the one of the run in {out}: stored {stored} "
        f"({Path(out) / RUN_FILES}), found {given}. Leave it out (the stored one is used), or start a new "
        "run (--force or another output directory)"
    )


def resume_flow_path(out: str | Path, given: str | Path | None) -> tuple[str | None, dict[str, Any] | None]:
    """The flow of a ``--resume``: the stored one unless given; a given one must be it, or,
    when the stored file no longer exists (the flow moved), a file of the stored SHA-256.

    Arguments:
        out: The run directory.
        given: ``--flow`` as given on the resume, or ``None``.

    Returns:
        ``(flow path to open or None, its flow entry or None)`` (the entry of the new place
        for a moved flow, which the job records). Without ``run_files.json``
        (a run of an earlier version) the given path is returned unchanged (``None`` if none):
        the checkpoint's fingerprint decides, as before.

    Raises:
        CheckpointError: if a flow is given that resolves to another checkpoint file than
            the stored one while that exists, or to a file of another SHA-256, or one is given
            for a run that had none (naming both), or none is given and the stored one no
            longer exists.
    """
    from flowplug.checkpoints import checkpoint_path

    stored = stored_run_files(out)
    if stored is None:
        return (None if given is None else str(given)), None
    entry = stored.get("flow")
    if given is None:
        if entry is not None and not Path(entry.get("file") or entry["path"]).is_file():
            from flowplug.errors import CheckpointError

            raise CheckpointError(
                f"--resume: the flow checkpoint {entry.get('file') or entry['path']} of the run in {out} "
                f"({Path(out) / RUN_FILES}) no longer exists; restore it, give its new place with --flow (a "
                "file of the stored SHA-256), or start a new run (--force or another output directory)"
            )
        return (None if entry is None else _usable(entry)), entry
    if entry is None:
        _refuse_other_path(out, "flow", "(no flow)", str(given))
    assert entry is not None
    here = _resolved(checkpoint_path(given))
    there = Path(entry.get("file") or entry["path"])
    if here == there:
        return str(given), entry
    if there.is_file() or not here.is_file() or entry.get("sha256") is None:
        _refuse_other_path(out, "flow", f"{entry['given']} ({there})", f"{given} ({here})")
    # the stored file is gone: the flow moved; the same file (SHA-256) at the given path is the run's
    from flowplug.errors import CheckpointError

    found = file_sha256(here)
    if found != entry["sha256"]:
        raise CheckpointError(
            f"--resume: the flow given, {given} ({here}), is not the flow of the run in {out}: SHA-256 stored "
            f"{entry['sha256']} ({Path(out) / RUN_FILES}, for {there}, which no longer exists), found {found}; "
            "give the run's flow, or start a new run (--force or another output directory)"
        )
    return str(given), file_record(given, sha256=found, file=here)


def resume_inputs(out: str | Path, given: list[str]) -> tuple[list[Path], list[Path], dict[str, Any]] | None:
    """The input files of a ``resample --resume``: the stored list, in its order.

    Arguments:
        out: The run directory.
        given: The inputs as given on the resume (files, directories, patterns); may be empty.

    Returns:
        ``(files, skipped, {resolved path: stored entry})`` from ``run_files.json``, or ``None``
        when there is none (a run of an earlier version: the caller expands ``given``, which
        must then name the inputs again), or when ``given`` names other inputs and a stored
        file no longer exists (the inputs moved: the caller reads ``given``, and the
        fingerprint, which holds every input's SHA-256 in order, decides).

    Raises:
        CheckpointError: if ``given`` names other inputs than the stored ones while these
            exist (naming both lists), or none are given and a stored file no longer exists.
    """
    from flowplug.errors import CheckpointError

    stored = stored_run_files(out)
    if stored is None or "files" not in stored:
        return None
    if given:
        here = [str(_resolved(g)) for g in given]
        there = [str(e["path"]) for e in stored.get("inputs", [])]
        if here != there:
            if not all(Path(str(e["path"])).is_file() for e in stored["files"]):
                return None  # moved: the given inputs, checked by the fingerprint
            _refuse_other_path(
                out,
                "inputs",
                ", ".join(str(e["given"]) for e in stored.get("inputs", [])) + f" ({', '.join(there)})",
                ", ".join(map(str, given)) + f" ({', '.join(here)})",
            )
    files = [Path(_usable(e)) for e in stored["files"]]
    for f, e in zip(files, stored["files"], strict=True):
        if not f.is_file():
            raise CheckpointError(
                f"--resume: the input {e['path']} of the run in {out} ({Path(out) / RUN_FILES}) no longer exists; "
                "restore it, name the inputs at their new place, or start a new run (--force or another output "
                "directory)"
            )
    by_path = {str(e["path"]): dict(e) for e in stored["files"]}
    return files, [Path(s) for s in stored.get("skipped", [])], by_path


def resume_read_options(out: str | Path, given: Mapping[str, Any]) -> dict[str, Any]:
    """The options of reading the inputs on a ``resample --resume``: the stored ones where
    none is given.

    Arguments:
        out: The run directory.
        given: ``format``, ``lattice``, ``group``, ``verify`` as given (``None``: not given).

    Returns:
        The options to read with (``None`` where neither gives one).

    Raises:
        CheckpointError: if ``format``, ``lattice`` or ``group`` is given with another value
            than the stored one (they decide what the inputs hold).
    """
    stored = stored_run_files(out)
    old = dict((stored or {}).get("read_options") or {})
    merged = dict(given)
    for key, value in old.items():
        if merged.get(key) is None:
            merged[key] = value
        elif key != "verify" and value is not None and merged[key] != value:
            _refuse_other_path(out, f"--{key}", str(value), str(merged[key]))
    return merged


def resume_start_file(out: str | Path, start: str) -> tuple[str, dict[str, Any] | None]:
    """The start file of an ``hmc --resume`` (``start`` = a path, as stored in ``config.toml``).

    The file is not read: a resume goes on from the checkpoint (``hmc`` records the path in
    its summary), so it may have moved or changed since the run started.

    Returns:
        ``(path, stored entry or None)``: the stored file when ``start`` is the path the run
        started with (also from another working directory), else ``start``.

    Raises:
        CheckpointError: if ``start`` resolves to another file than the stored one.
    """
    stored = stored_run_files(out)
    entry = (stored or {}).get("start")
    if entry is None:
        return start, None
    if start == entry["given"]:
        return _usable(entry), entry
    if _resolved(start) != Path(entry["path"]):
        _refuse_other_path(out, "start file", f"{entry['given']} ({entry['path']})", f"{start} ({_resolved(start)})")
    return start, entry
