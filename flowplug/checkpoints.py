r"""Flow checkpoints: the one file format of trained flows, written and read without a trainer.

``flowplug train`` (:class:`flowplug.train.Trainer`) writes ``<run>/checkpoint.pt``; the
samplers (``sample``, ``resample``, ``propose``, ``demo``, :func:`flowplug.flowtools.open_flow`)
read it with :func:`load_flow`, which rebuilds the flow from its recorded architecture and
never constructs a trainer or an optimizer.

Format (``format = "flowplug.train-checkpoint"``, ``version = 1``)
    A ``torch.save`` file of a dict of tensors, numbers, strings, lists and dicts, read
    with ``torch.load(weights_only=True)``: nothing is unpickled, so a checkpoint from an
    untrusted source cannot run code. Keys:

    - ``format``, ``version``: :data:`CHECKPOINT_FORMAT`, :data:`CHECKPOINT_VERSION`
      (a newer version is refused with a message to upgrade);
    - ``field`` (``"scalar"``, ``"u1"``, ``"su3"``...), ``lattice`` [L_0, ..., L_{d-1}];
    - ``flow_spec``: the architecture (:attr:`flowplug.flow.Flow.spec`), from which
      :meth:`flowplug.flow.Flow.from_spec` rebuilds an untrained flow;
    - ``model``: the flow's ``state_dict`` (parameters float32 or float64 as the layers
      make them; the densities they define are float64);
    - ``config``: the full run configuration (its ``[action]`` table rebuilds the target);
    - ``step``, ``skipped``, ``wall_time_s``, ``seed``;
    - trainer state, needed only to resume training (:func:`flowplug.train.resume_trainer`):
      ``optimizer``, ``scheduler``, ``rng`` (``generator``, ``torch_cpu``), ``train``,
      ``guard`` (``rollbacks``, ``losses``, ``best``, ``snapshot``).

Safety
    Files are written atomically (:func:`flowplug.fsutil.atomic_path`): a crash leaves the
    previous checkpoint, never half a file. A state whose model parameters hold NaN or Inf
    (a diverged run) is never written (:func:`write_checkpoint`), and :func:`load_flow`
    refuses one written by an older version, both with
    :class:`flowplug.errors.NonFiniteParametersError`.

Public API: :data:`CHECKPOINT_FORMAT`, :data:`CHECKPOINT_VERSION`, :data:`CHECKPOINT_NAME`,
:func:`checkpoint_path`, :func:`read_checkpoint`, :func:`write_checkpoint`, :func:`load_flow`,
:class:`LoadedFlow`, :func:`non_finite_entries`, :func:`resolve_device`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flowplug.errors import CheckpointError, ConfigError, FlowplugError, NonFiniteParametersError
from flowplug.flow import Flow, place_flow
from flowplug.fsutil import atomic_path
from flowplug.theory import Action, action_from_config

#: Value of the ``format`` key of every flowplug flow checkpoint.
CHECKPOINT_FORMAT = "flowplug.train-checkpoint"
#: Newest checkpoint version this flowplug reads and the one it writes.
CHECKPOINT_VERSION = 1
#: File name of the checkpoint in a ``flowplug train`` run directory.
CHECKPOINT_NAME = "checkpoint.pt"


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """The torch device for a configuration's or caller's device name.

    Arguments:
        name: ``"auto"`` (cuda when available, else cpu), ``"cpu"``, ``"cuda"``,
            ``"cuda:N"``, or a :class:`torch.device`.

    Returns:
        The device.

    Raises:
        ConfigError: for an unknown device name, or cuda requested but unavailable.
    """
    name = str(name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N; found {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f'device {name!r} requested but CUDA is not available (use device = "auto" or "cpu")')
    return dev


def non_finite_entries(tensors: Mapping[str, object]) -> list[str]:
    """Names of the floating-point or complex tensors of a state dict that hold NaN or Inf.

    When every tensor is finite (the common case) this costs one device synchronisation.

    Arguments:
        tensors: A ``state_dict`` (name -> tensor; entries that are not floating-point or
            complex tensors are ignored).

    Returns:
        The offending names in the dict's order; empty when all are finite.
    """
    floats = {
        k: v for k, v in tensors.items() if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())
    }
    if not floats:
        return []
    try:
        if bool(torch.stack([torch.isfinite(v).all() for v in floats.values()]).all()):
            return []
    except RuntimeError:  # tensors on several devices: check them one by one
        pass
    return [k for k, v in floats.items() if not bool(torch.isfinite(v).all())]


def short_list(names: Sequence[str], limit: int = 4) -> str:
    """``"a, b, c, d and 3 more"``: the first ``limit`` names, for error messages."""
    more = len(names) - limit
    return ", ".join(names[:limit]) + (f" and {more} more" if more > 0 else "")


def checkpoint_path(path: str | Path) -> Path:
    """The checkpoint file for a run directory (``<dir>/checkpoint.pt``) or a file path (itself)."""
    p = Path(path)
    return p / CHECKPOINT_NAME if p.is_dir() else p


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a flow checkpoint with ``torch.load(weights_only=True)`` (module docstring for its keys).

    Arguments:
        path: ``checkpoint.pt`` or the run directory holding it.
        map_location: Where to put the tensors.

    Returns:
        The checkpoint's dict.

    Raises:
        CheckpointError: if the file is missing, unreadable, or not a flowplug checkpoint
            of a supported version.
    """
    p = checkpoint_path(path)
    if not p.exists():
        raise CheckpointError(
            f"{p}: no checkpoint (expected a run directory with {CHECKPOINT_NAME} or a checkpoint file)"
        )
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{p}: cannot read checkpoint ({type(exc).__name__}: {exc}); "
            "the file is damaged or not a flowplug checkpoint"
        ) from None
    if not isinstance(state, Mapping) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{p}: not a flowplug training checkpoint")
    if int(state.get("version", 0)) > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{p}: checkpoint version {state.get('version')} is newer than this "
            f"flowplug supports ({CHECKPOINT_VERSION}); upgrade flowplug"
        )
    return dict(state)


def write_checkpoint(path: str | Path, state: Mapping[str, Any], *, kept: str = "nothing was written") -> Path:
    """Write a checkpoint state atomically with ``torch.save``.

    Arguments:
        path: The file to write (its directory must exist).
        state: The checkpoint dict (module docstring; :meth:`flowplug.train.Trainer.state_dict`
            makes one), with ``format`` = :data:`CHECKPOINT_FORMAT`.
        kept: What the refusal message says about the file already at ``path`` (the
            trainer names the step its last checkpoint holds).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        CheckpointError: if ``state`` is not a flowplug checkpoint of this version.
        NonFiniteParametersError: if the ``model`` entries hold NaN or Inf; nothing is
            written (a file already at ``path`` stays as it was).
    """
    path = Path(path)
    if state.get("format") != CHECKPOINT_FORMAT or int(state.get("version", 0)) != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: not written: the state is not a flowplug checkpoint of version "
            f"{CHECKPOINT_VERSION} (format {state.get('format')!r}, version {state.get('version')!r})"
        )
    bad = non_finite_entries(state.get("model") or {})
    if bad:
        raise NonFiniteParametersError(
            f"{path}: not written: the flow's parameters are not finite at step {state.get('step')} "
            f"(NaN/Inf in {short_list(bad)}); {kept}. Lower train.lr, or set train.grad_clip or train.guard"
        )
    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)
    return path


@dataclass
class LoadedFlow:
    """A trained flow with what a sampler needs (returned by :func:`load_flow`).

    Attributes:
        flow: The :class:`~flowplug.flow.Flow` in eval mode.
        action: The action it was trained for (``action(x) -> (B,)`` float64, ``field``),
            rebuilt from the ``[action]`` table of ``config``.
        lattice: (L_0, ..., L_{d-1}).
        field: Field kind (``"scalar"``, ``"u1"``, ``"su3"``...).
        config: The full training configuration.
        step: Training steps done.
        path: The checkpoint file.
    """

    flow: Flow
    action: Action
    lattice: tuple[int, ...]
    field: str
    config: dict[str, Any] = dataclasses.field(default_factory=dict)  # (the attribute `field` shadows the name)
    step: int = 0
    path: Path | None = None


def load_flow(path: str | Path, *, device: str | torch.device = "cpu") -> LoadedFlow:
    r"""Load a trained flow from a ``flowplug train`` run directory or checkpoint file.

    Only the flow (architecture and weights) and the action are rebuilt: no trainer,
    optimizer or scheduler is constructed, and the optimizer and random-number states in
    the file are not used.

    Example (independence Metropolis with the flow as proposal)::

        lf = load_flow("runs/phi4")
        with torch.no_grad():
            x, log_q = lf.flow.sample(1024)          # fresh proposals and log q(x), (B,) float64
            log_q_hmc = lf.flow.log_prob(x_hmc)      # log q of states not from the flow
            log_p = -lf.action.action(x)             # up to log Z

    Arguments:
        path: Run directory (holding ``checkpoint.pt``) or checkpoint file.
        device: Device for the flow (names as :func:`resolve_device`).

    Returns:
        :class:`LoadedFlow`.

    Raises:
        CheckpointError: if the checkpoint cannot be read or does not match its architecture.
        NonFiniteParametersError: if its parameters hold NaN or Inf (a diverged run).
        ConfigError, UnknownComponentError: if its ``[action]`` table names no registered
            action or bad couplings (a plugin that is not installed).
    """
    state = read_checkpoint(path)
    bad = non_finite_entries(state.get("model") or {})
    if bad:
        raise NonFiniteParametersError(
            f"{checkpoint_path(path)}: the flow's parameters are not finite (NaN/Inf in {short_list(bad)}; "
            f"step {state.get('step')}): the training run diverged and this flow cannot be used. "
            "Retrain with a lower train.lr, or with train.grad_clip or train.guard"
        )
    try:
        flow = Flow.from_spec(state["flow_spec"])
        flow.load_state_dict(state["model"])
    except (KeyError, RuntimeError, FlowplugError) as exc:
        raise CheckpointError(f"{checkpoint_path(path)}: cannot rebuild the flow: {exc}") from None
    flow = place_flow(flow, resolve_device(str(device))).eval()  # float64 networks on CUDA
    return LoadedFlow(
        flow=flow,
        action=action_from_config(state["config"]),
        lattice=tuple(state["lattice"]),
        field=str(state["field"]),
        config=dict(state["config"]),
        step=int(state["step"]),
        path=checkpoint_path(path),
    )
