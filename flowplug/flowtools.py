r"""Trained flows as the samplers use them: provenance and the action, on top of :mod:`flowplug.train`.

There is one flow checkpoint format, the one ``flowplug train`` writes
(:class:`flowplug.train.Trainer`, ``<run>/checkpoint.pt``), and one loader,
:func:`flowplug.train.load_flow` (``torch.load(weights_only=True)``: nothing is
unpickled). The commands ``sample``, ``resample``, ``propose`` and ``demo`` need a little
more than the loader returns; :func:`open_flow` adds it:

- the SHA-256 of the checkpoint file, recorded as ``flow_sha256`` in provenance;
- the ``[action]`` table the flow was trained for, and the action rebuilt with couplings
  overridden from the command line (``--set action.beta=...``).

Lattice and field checks against input ensembles are in
:func:`flowplug.resampling.check_compatible`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

from flowplug.errors import CheckpointError, ConfigError


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (provenance of inputs and flow checkpoints).

    Raises:
        CheckpointError: if the file cannot be read.
    """
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return h.hexdigest()


class FlowCheckpoint:
    """A trained flow, loaded by :func:`flowplug.train.load_flow`, with its provenance.

    Attributes:
        loaded: The :class:`flowplug.train.LoadedFlow`.
        path: The checkpoint file.
        sha256: Hex SHA-256 of the checkpoint file.
        flow: The :class:`flowplug.flow.Flow`, in eval mode.
        action_config: The ``[action]`` table of the training configuration.
    """

    def __init__(self, loaded: Any, sha256: str) -> None:
        self.loaded = loaded
        self.path = Path(loaded.path)
        self.sha256 = sha256
        self.flow = loaded.flow
        self.action_config: dict[str, Any] = dict(loaded.config.get("action", {}))

    @property
    def field(self) -> str:
        """Field kind of the flow."""
        return self.loaded.field

    @property
    def lattice(self) -> tuple[int, ...]:
        """Lattice of the flow, x first."""
        return tuple(self.loaded.lattice)

    def action(self, override: Mapping[str, Any] | None = None) -> Any:
        """The action the flow was trained for, with non-empty ``override`` entries replacing
        keys of its ``[action]`` table.

        Raises:
            ConfigError: if the overridden table does not describe a valid action.
        """
        changes = {k: v for k, v in dict(override or {}).items() if v not in ("", None)}
        if not changes:
            return self.loaded.action
        from flowplug.theory import action_from_config

        table = {**self.action_config, **changes}
        if not table.get("name"):
            raise ConfigError(f"{self.path}: no action name (give --set action.name=...)")
        return action_from_config({"action": table})


def open_flow(path: str | Path, *, device: Any = None) -> FlowCheckpoint:
    """Load a trained flow for sampling (module docstring).

    Arguments:
        path: A ``flowplug train`` run directory or its checkpoint file.
        device: Device of the flow (default CPU).

    Raises:
        CheckpointError: from :func:`flowplug.train.load_flow` (missing, unreadable or
            mismatched checkpoints).
    """
    from flowplug.train import load_flow

    loaded = load_flow(path, device="cpu" if device is None else device)
    return FlowCheckpoint(loaded, file_sha256(loaded.path))
