r"""Flow checkpoints for samplers: save, load (never unpickling), hash, and a small trainer.

A flow checkpoint is a ``torch.save`` file of plain containers, strings and tensors,
read back with ``torch.load(weights_only=True)``, so a file from elsewhere cannot run
code. The layout written by :func:`save_flow`:

``format``      ``"flowplug-flow"``;
``version``     1;
``spec``        JSON text of :attr:`flowplug.flow.Flow.spec` (field, lattice, prior, layers);
``action``      JSON text of the action the flow was trained for
                (``{"name": "wilson", "beta": 2.0, "group": "u1"}``);
``state_dict``  the flow's parameters and buffers;
``meta``        JSON text of free-form facts (training steps, final loss, ESS, seed).

:func:`load_flow` also reads the checkpoints of ``flowplug train``
(:mod:`flowplug.train`: ``flow_spec``, ``model``, and the action in ``config.action``),
given as the file or as the run directory holding ``checkpoint.pt``.

:func:`train_reverse_kl` is the minimal reverse-KL trainer used by ``flowplug demo`` and
the tests (loss = E_q[log q + S], whose minimum -log Z is *not* a KL divergence; see
DESIGN.md section 3); full training lives in ``flowplug train``.

References:
    Albergo, Kanwar, Shanahan, arXiv:1904.12072, section III (reverse-KL training);
    Albergo et al., arXiv:2101.08176, section III.C (ESS as a diagnostic).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from flowplug.errors import CheckpointError, ConfigError
from flowplug.fsutil import atomic_path

FORMAT_TAG = "flowplug-flow"
FORMAT_VERSION = 1


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (provenance of inputs and flow checkpoints).

    Raises:
        FlowplugError subclass :class:`CheckpointError`: if the file cannot be read.
    """
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return h.hexdigest()


def action_record(action: Any) -> dict[str, Any]:
    """JSON-ready description of an action: registry name plus its couplings.

    Uses ``action.couplings()`` (:class:`flowplug.theory.Action`) and guesses the name
    ``wilson`` for gauge fields and ``phi4`` for scalar fields unless the action has a
    ``registry_name`` attribute.
    """
    name = getattr(action, "registry_name", None)
    if name is None:
        name = "phi4" if action.field == "scalar" else "wilson"
    params = dict(action.couplings()) if hasattr(action, "couplings") else {}
    return {"name": name, **params}


def save_flow(path: str | Path, flow: Any, action: Any | Mapping[str, Any], *,
              meta: Mapping[str, Any] | None = None) -> Path:
    """Write a flow checkpoint atomically (module docstring for the layout).

    Arguments:
        path: Output file.
        flow: :class:`flowplug.flow.Flow` with a ``spec``.
        action: The action object, or its record (``{"name": ..., couplings...}``).
        meta: Free-form JSON-able facts.

    Raises:
        ConfigError: if the flow has no ``spec`` (built without :func:`flowplug.flow.build_flow`).
    """
    if getattr(flow, "spec", None) is None:
        raise ConfigError("this flow has no spec (build it with flowplug.flow.build_flow) and "
                          "cannot be saved in a form that can be rebuilt")
    rec = dict(action) if isinstance(action, Mapping) else action_record(action)
    data = {"format": FORMAT_TAG, "version": FORMAT_VERSION, "spec": json.dumps(flow.spec),
            "action": json.dumps(rec), "state_dict": {k: v.detach().cpu() for k, v in flow.state_dict().items()},
            "meta": json.dumps(dict(meta or {}), default=str)}
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(data, tmp)
    return path


def _json_field(d: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        if k in d:
            v = d[k]
            if isinstance(v, (bytes, bytearray)):
                v = v.decode("utf-8")
            if isinstance(v, str):
                try:
                    return json.loads(v)
                except json.JSONDecodeError:
                    return v
            return v
    return None


class FlowCheckpoint:
    """A loaded flow checkpoint.

    Attributes:
        path: The file.
        sha256: Hex SHA-256 of the file (for provenance).
        flow: The rebuilt :class:`flowplug.flow.Flow` with its weights, in eval mode.
        action_config: The action record (``{"name": ..., couplings}``) or ``{}``.
        meta: Free-form facts stored with the flow.
    """

    def __init__(self, path: Path, sha256: str, flow: Any, action_config: dict[str, Any],
                 meta: dict[str, Any]) -> None:
        self.path, self.sha256, self.flow = path, sha256, flow
        self.action_config, self.meta = action_config, meta

    @property
    def field(self) -> str:
        """Field kind of the flow."""
        return self.flow.field

    @property
    def lattice(self) -> tuple[int, ...]:
        """Lattice of the flow, x first."""
        return tuple(self.flow.lattice)

    def action(self, override: Mapping[str, Any] | None = None) -> Any:
        """Build the action: the stored record, updated by non-empty ``override`` entries.

        Raises:
            ConfigError: if no action is stored and none is given, or the record is bad.
        """
        from flowplug.theory import action_from_config

        rec = dict(self.action_config)
        for k, v in dict(override or {}).items():
            if v not in ("", None):
                rec[k] = v
        if not rec.get("name"):
            raise ConfigError(f"{self.path}: the flow checkpoint does not name its action; give it "
                              "with --set action.name=wilson --set action.beta=... --set action.group=...")
        return action_from_config({"action": rec})


def load_flow(path: str | Path, *, device: Any = None) -> FlowCheckpoint:
    """Load a flow checkpoint without unpickling (``torch.load(weights_only=True)``).

    Arguments:
        path: The checkpoint file.
        device: Device to move the flow to (default CPU).

    Returns:
        :class:`FlowCheckpoint`.

    Raises:
        CheckpointError: if the file is missing, not a torch file of plain data, lacks
            the flow's spec or weights, or the weights do not fit the spec.
    """
    path = Path(path)
    if path.is_dir() and (path / "checkpoint.pt").is_file():  # a `flowplug train` run directory
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such flow checkpoint (train one with flowplug train)")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable flow checkpoint (expected a torch.save file of "
                              f"tensors and plain data): {type(exc).__name__}: {exc}") from None
    if not isinstance(d, Mapping):
        raise CheckpointError(f"{path}: not a flow checkpoint (top level is {type(d).__name__}, not a dict)")
    spec = _json_field(d, "spec", "flow_spec")
    if spec is None and isinstance(d.get("flow"), Mapping):
        spec = _json_field(d["flow"], "spec")
    state = d.get("state_dict", d.get("model", d.get("flow_state")))
    if state is None and isinstance(d.get("flow"), Mapping):
        state = d["flow"].get("state_dict")
    if not isinstance(spec, Mapping) or not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: flow checkpoint lacks the flow's spec or its weights "
                              f"(found entries: {', '.join(sorted(map(str, d)))})")
    from flowplug.flow import Flow

    try:
        flow = Flow.from_spec(spec)
        flow.load_state_dict(dict(state))
    except (RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: weights do not fit the stored flow spec: {exc}") from None
    if device is not None:
        flow = flow.to(device)
    flow.eval()
    action = _json_field(d, "action") or {}
    if not action and isinstance(d.get("config"), Mapping):  # `flowplug train` checkpoints
        action = dict(d["config"].get("action", {}))
    if not isinstance(action, Mapping):
        action = {}
    meta = _json_field(d, "meta") or {}
    return FlowCheckpoint(path, file_sha256(path), flow, dict(action), dict(meta) if isinstance(meta, Mapping) else {})


def train_reverse_kl(flow: Any, action: Any, *, steps: int, batch: int = 64, lr: float = 3e-3,
                     generator: torch.Generator | None = None, progress: bool = False,
                     callback: Callable[[int, dict[str, float]], None] | None = None,
                     desc: str = "train") -> dict[str, float]:
    """Train a flow by minimising E_{x~q}[log q(x) + S(x)] (reverse KL up to log Z).

    Arguments:
        flow: :class:`flowplug.flow.Flow` (trained in place).
        action: Target action.
        steps: Optimiser steps (Adam).
        batch: Samples per step.
        lr: Learning rate.
        generator: Random generator for the flow's samples.
        progress: Show a tqdm progress bar with loss and ESS.
        callback: Called as ``callback(step, metrics)`` after each step (metrics
            ``loss``, ``ess``); the event hook ``flowplug_after_train_step`` is called too.
        desc: Progress-bar label.

    Returns:
        Metrics of the last step: ``loss`` (E_q[log q + S], an upper bound of the free
        energy -log Z, reached when q = p) and ``ess`` (per sample).

    References:
        Albergo, Kanwar, Shanahan, arXiv:1904.12072, eq. (9).
    """
    from flowplug.manager import get_plugin_manager
    from flowplug.stats import ess as ess_fn

    pm = get_plugin_manager()
    opt = torch.optim.Adam([p for p in flow.parameters() if p.requires_grad], lr=lr)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=desc, dynamic_ncols=True)
    metrics: dict[str, float] = {"loss": math.nan, "ess": math.nan}
    flow.train()
    try:
        for i in range(int(steps)):
            x, log_q = flow.sample(batch, generator)
            log_w = -action.action(x).to(torch.float64) - log_q
            loss = -log_w.mean()
            opt.zero_grad(set_to_none=True)
            if torch.isfinite(loss):
                loss.backward()
                opt.step()
            metrics = {"loss": float(loss.detach()), "ess": float(ess_fn(log_w.detach()))}
            pm.notify("flowplug_after_train_step", step=i, metrics=dict(metrics))
            if callback is not None:
                callback(i, metrics)
            if bar is not None:
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", ess=f"{metrics['ess']:.3f}", refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        flow.eval()
    return metrics
