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
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

from flowplug import config as _config
from flowplug.flowtools import file_sha256

__all__ = ["fingerprint", "file_sha256", "provenance", "kernel_record"]


def _strip(tree: Mapping[str, Any], ignore: set[tuple[str, ...]], prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = prefix + (str(k),)
        if key in ignore:
            continue
        out[k] = _strip(v, ignore, key) if isinstance(v, Mapping) else v
    return out


def fingerprint(config: Mapping[str, Any], *extra: str, ignore: Iterable[str] = ()) -> str:
    """A 16-hex-digit hash of a run configuration, to tie checkpoints to runs.

    Arguments:
        config: The effective configuration (a TOML tree: tables, strings, numbers,
            booleans, lists).
        *extra: Further strings that identify the run (SHA-256 of the flow checkpoint
            and of the inputs).
        ignore: Dotted keys (``"hmc.trajectories"``, ``"out"``) that do not change the
            chain and may differ on resume.

    Returns:
        SHA-256 of the configuration written as TOML (without the ignored keys; key
        order as in the configuration, which :func:`flowplug.config.build_config` takes
        from the job's default), followed by ``|``-joined extras, first 16 hex digits.

    Raises:
        ConfigError: if a value cannot be written as TOML.
    """
    skip = {tuple(k.split(".")) for k in ignore}
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
