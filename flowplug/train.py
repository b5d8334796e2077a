r"""Training normalizing flows for lattice actions, with exact checkpoints and resume.

Objectives
    ``reverse`` (default): minimise the variational free energy

        F_q = E_{x~q}[log q(x) + S(x)] = F + D(q || p) >= F = -log Z,

    estimated on a batch by reparameterisation (Albergo et al., arXiv:1904.12072,
    eq. 6; arXiv:2101.08176, section III.B). The figure reported as ``free_energy`` is
    this batch estimate; it is *not* a KL divergence, since log Z is unknown. With
    ``path_gradient`` the score term of the gradient is dropped: the loss is evaluated
    with log q at parameters held fixed and only the dependence through x = f(z) is
    differentiated (Vaitl et al., arXiv:2207.08219, "path gradients"), which has lower
    variance near convergence. ``path_gradient_method`` chooses how grad_x log q is
    obtained: ``"fast"`` carries it forward with the sample
    (:func:`flowplug.flow.path_gradient_loss`, arXiv:2403.15881), ``"inverse"``
    differentiates log q through the exact inverse flow, ``"auto"`` (default) takes
    ``"fast"`` when every layer supports it and ``"inverse"`` otherwise. The fast method
    pays off for layers with iterative inverses (NCP mixtures: about 3x faster per step);
    for closed-form inverses (affine couplings) the two cost about the same.

    ``forward``: maximum likelihood on an existing ensemble (for instance HMC
    configurations, read through any file-format adapter): minimise -E_{x~data}[log q(x)]
    (the forward KL up to a constant).

Diagnostics (all float64, from log weights log w = -S(x) - log q(x) of flow samples)
    ``ess`` = (sum w)^2 / (n sum w^2) (:func:`flowplug.stats.ess`);
    ``acceptance`` = the expected acceptance rate of an independence Metropolis chain
    with the flow as proposal, estimated without random numbers by
    E_{q x q}[min(w, w')] / E_q[w] (:func:`imh_acceptance_estimate`).

Robustness and exactness
    A step whose loss or gradient is not finite is skipped (no parameter update) and
    counted in ``skipped_steps``. With ``guard`` > 0 (nats), a run whose mean loss over a
    window of ``guard_window`` steps rises more than ``guard`` above the best window so far
    is rolled back to the last good snapshot (model, optimizer, scheduler) with half the
    learning rate, and counted in ``rollbacks``; the step budget and the random numbers
    go on, so a diverging run costs steps, not the night. Parameters that are no longer
    finite after a step (NaN or Inf) are rolled back the same way when the guard holds a
    snapshot; otherwise the run stops with :class:`flowplug.errors.NonFiniteParametersError`
    and leaves the last finite checkpoint in place: a checkpoint with non-finite
    parameters is never written, and :func:`load_flow` refuses one. Checkpoints hold the model,
    optimizer, scheduler and
    random-number-generator states and the configuration; they are written atomically
    and read with ``torch.load(weights_only=True)`` (nothing is unpickled). A resumed run
    repeats the uninterrupted run bit for bit on the same device and thread count.

Public API: :class:`Trainer`, :func:`build_trainer`, :func:`load_flow`,
:class:`LoadedFlow`, :func:`evaluate_flow`, :func:`imh_acceptance_estimate`,
:func:`imh_chain_acceptance`, :func:`imh_chain_states`, :func:`resolve_device`, :func:`load_ensemble`.
"""

from __future__ import annotations

import copy
import csv
import glob
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from flowplug.errors import CheckpointError, ConfigError, FlowplugError, NonFiniteParametersError, ShapeError
from flowplug.flow import (Flow, build_flow, check_field, layers_without_forward_diag, path_gradient_loss,
                           supports_fast_path_gradient)
from flowplug.fsutil import atomic_path, locked_run
from flowplug.stats import ess as _ess

CHECKPOINT_FORMAT = "flowplug.train-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.csv"
LOG_COLUMNS = ("step", "loss", "free_energy", "ess", "acceptance", "lr", "grad_norm", "skipped", "wall_time_s")


# ------------------------------------------------------------------------ diagnostics


def imh_acceptance_estimate(log_w: torch.Tensor) -> float:
    r"""Expected acceptance of independence Metropolis with proposal q, from one sample of q.

    With w = p/q (up to a constant) the stationary acceptance rate is
    A = E_{x~p, x'~q}[min(1, w(x')/w(x))] = E_{x, x' ~ q}[min(w, w')] / E_q[w];
    it is estimated by sum_{i != j} min(w_i, w_j) / ((n-1) sum_i w_i), computed in
    O(n log n) after sorting. Deterministic (no random numbers are drawn).

    Arguments:
        log_w: log p(x_i) - log q(x_i) for x_i ~ q, shape (n,), n >= 2.

    Returns:
        The estimate in [0, 1] (1 when q = p).

    Raises:
        ValueError: if fewer than two samples are given.

    References:
        Albergo et al., arXiv:1904.12072, section IV (independence Metropolis with flows).
    """
    lw = torch.as_tensor(log_w, dtype=torch.float64).detach().flatten().cpu()
    n = lw.numel()
    if n < 2:
        raise ValueError("imh_acceptance_estimate needs at least two samples")
    lw = lw[torch.isfinite(lw)] if not torch.isfinite(lw).all() else lw
    if lw.numel() < 2:
        return 0.0
    n = lw.numel()
    w = torch.exp(lw - lw.max())
    ws, _ = torch.sort(w)
    k = torch.arange(n, dtype=torch.float64)
    pair_min = 2.0 * (ws * (n - 1 - k)).sum()
    return float(pair_min / ((n - 1) * w.sum()))


def imh_chain_acceptance(log_w: torch.Tensor, generator: np.random.Generator | int = 0) -> float:
    r"""Acceptance rate of an independence Metropolis chain run over a sequence of flow samples.

    The chain starts at the first sample and proposes the others in order, accepting
    with probability min(1, w'/w) (log u < log w' - log w, float64).

    Arguments:
        log_w: log p - log q of the proposals in order, shape (n,), n >= 2.
        generator: numpy Generator or seed for the uniform numbers.

    Returns:
        Accepted fraction of the n - 1 proposals.
    """
    return _moved_fraction(imh_chain_states(log_w, generator))


def _moved_fraction(states: np.ndarray) -> float:
    """Accepted fraction of the proposals 1..n-1 of a chain given by its states."""
    return float((np.diff(states) != 0).sum()) / max(states.size - 1, 1)


def imh_chain_states(log_w: torch.Tensor, generator: np.random.Generator | int = 0) -> np.ndarray:
    r"""The states of the independence Metropolis chain of :func:`imh_chain_acceptance`.

    Arguments:
        log_w: log p - log q of the proposals in order, shape (n,), n >= 1.
        generator: numpy Generator or seed for the uniform numbers.

    Returns:
        Shape (n,), int64: entry i is the index of the sample the chain holds after
        proposal i (entry 0 is 0). Measuring an observable on ``x[states]`` gives an exact
        Markov chain for exp(-S)/Z (Albergo et al., arXiv:1904.12072, section IV),
        whose error the Gamma method estimates with the rejections' autocorrelation.

    Raises:
        ValueError: if ``log_w`` is empty.
    """
    lw = torch.as_tensor(log_w, dtype=torch.float64).detach().flatten().cpu().numpy()
    if lw.size == 0:
        raise ValueError("imh_chain_states needs at least one log weight")
    rng = generator if isinstance(generator, np.random.Generator) else np.random.default_rng(generator)
    u = np.log(rng.random(max(lw.size - 1, 0)))
    states = np.zeros(lw.size, dtype=np.int64)
    cur = 0
    for i in range(1, lw.size):
        if u[i - 1] < lw[i] - lw[cur]:
            cur = i
        states[i] = cur
    return states


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` gives cuda when available, else cpu; otherwise ``torch.device(name)``.

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
        raise ConfigError(f"device {name!r} requested but CUDA is not available (use device = \"auto\" or \"cpu\")")
    return dev


# ----------------------------------------------------------------------------- ensembles


def load_ensemble(source: str | Sequence[str], *, field: str, lattice: Sequence[int],
                  format: str | None = None) -> torch.Tensor:
    r"""Read configurations for forward-KL training, in the canonical layout.

    Arguments:
        source: A path, a glob pattern, or a list of them. ``.pt`` files hold a tensor
            (or a dict with key ``"configs"``) read with ``torch.load(weights_only=True)``;
            ``.h5``/``.hdf5`` files of scalar fields hold a dataset ``configs`` (or a
            single dataset) of shape (B, L...); every other file goes through
            :func:`flowplug.io.read` (ILDG, SciDAC, NERSC, openQCD, HDF5 ensembles...).
        field: Field kind the flow produces.
        lattice: Lattice the flow is built for.
        format: Force a file-format name for :func:`flowplug.io.read`.

    Returns:
        Configurations, shape (B, ...) float64 / complex128.

    Raises:
        ConfigError: if nothing matches ``source``.
        ShapeError: if the configurations do not fit ``field`` and ``lattice``.
        FormatError: from the format adapters.
    """
    patterns = [source] if isinstance(source, str) else list(source)
    paths: list[str] = []
    for pat in patterns:
        hits = sorted(glob.glob(str(pat)))
        paths.extend(hits if hits else ([str(pat)] if Path(pat).exists() else []))
    if not paths:
        raise ConfigError(f"train.ensemble: no file matches {source!r}")
    chunks = []
    for p in paths:
        suffix = Path(p).suffix.lower()
        if suffix == ".pt":
            obj = torch.load(p, map_location="cpu", weights_only=True)
            t = obj["configs"] if isinstance(obj, Mapping) else obj
        elif suffix in (".h5", ".hdf5") and field == "scalar":
            import h5py

            with h5py.File(p, "r") as fh:
                names = [k for k in fh if isinstance(fh[k], h5py.Dataset)]
                key = "configs" if "configs" in names else (names[0] if len(names) == 1 else None)
                if key is None:
                    raise ConfigError(f"{p}: expected a dataset 'configs'; found {names}")
                t = torch.from_numpy(np.asarray(fh[key]))
        else:
            try:
                from flowplug import io as _io
            except ImportError:  # pragma: no cover - io module not present
                raise ConfigError(f"{p}: reading lattice files needs flowplug.io; give a .pt or .h5 file") from None
            group = field if field != "scalar" else None
            t = _io.read(p, format or None, lattice=list(lattice), group=group).links
        if not isinstance(t, torch.Tensor):
            raise ConfigError(f"{p}: expected a tensor of configurations; found {type(t).__name__}")
        t = t.to(torch.complex128 if t.is_complex() else torch.float64)
        if t.dim() == (len(lattice) + (0 if field == "scalar" else 1) + (2 if t.is_complex() else 0)):
            t = t.unsqueeze(0)
        chunks.append(t)
    data = torch.cat(chunks)
    holder = type("L", (), {"field": field, "lattice": tuple(lattice)})
    check_field(holder, data)  # type: ignore[arg-type]
    return data


# ------------------------------------------------------------------- finite parameters


def non_finite_entries(tensors: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors in ``tensors`` (a state dict) holding NaN or Inf."""
    return [k for k, v in tensors.items()
            if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())
            and not bool(torch.isfinite(v).all())]


def _names(names: Sequence[str], limit: int = 4) -> str:
    more = len(names) - limit
    return ", ".join(names[:limit]) + (f" and {more} more" if more > 0 else "")


# ------------------------------------------------------------------------------ trainer


def _schedule(kind: str, steps: int, warmup: int, lr_min_factor: float) -> Callable[[int], float]:
    kind = str(kind).lower()
    if kind not in ("constant", "cosine", "linear"):
        raise ConfigError(f"train.schedule must be constant, cosine or linear; found {kind!r}")

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        frac = min(max(step - warmup, 0) / max(steps - warmup, 1), 1.0)
        if kind == "cosine":
            return lr_min_factor + (1 - lr_min_factor) * 0.5 * (1 + math.cos(math.pi * frac))
        return lr_min_factor + (1 - lr_min_factor) * (1 - frac)

    return factor


class _LogProb(nn.Module):
    """Wraps a flow so that ``torch.func.functional_call`` can evaluate log q with other parameters."""

    def __init__(self, flow: Flow) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flow.log_prob(x)


#: Defaults of the [train] table (the CLI's default configuration documents each key).
TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 1000, "batch_size": 64, "objective": "reverse", "path_gradient": False,
    "path_gradient_method": "auto", "guard": 0.0, "guard_window": 25,
    "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.999],
    "schedule": "constant", "warmup_steps": 0, "lr_min_factor": 0.0, "grad_clip": 0.0,
    "ensemble": "", "ensemble_format": "", "checkpoint_every": 250, "progress": True,
}


class Trainer:
    r"""Trains a :class:`Flow` towards exp(-S)/Z (module docstring for objectives and figures).

    Arguments:
        flow: The flow (moved to ``device``).
        action: Object with ``field`` and ``action(x) -> (B,) float64``.
        train: The ``[train]`` options (keys of :data:`TRAIN_DEFAULTS`; missing keys take
            the defaults).
        seed: Seed of the trainer's random number generator (prior samples, minibatches).
        device: Torch device.
        ensemble: Configurations for ``objective = "forward"``, shape (B, ...).
        config: Full run configuration, stored in checkpoints.
        out: Output directory for checkpoints and the log (``None``: nothing written).

    Attributes:
        step: Number of completed steps (applied or skipped).
        skipped: Number of skipped (non-finite) steps.
        history: Metrics of the steps run in this process.

    Raises:
        ConfigError: on invalid options or a flow/action field mismatch.
    """

    def __init__(self, flow: Flow, action: Any, train: Mapping[str, Any] | None = None, *, seed: int = 1,
                 device: torch.device | str = "cpu", ensemble: torch.Tensor | None = None,
                 config: Mapping[str, Any] | None = None, out: str | Path | None = None) -> None:
        opts = dict(TRAIN_DEFAULTS)
        unknown = set(train or {}) - set(opts)
        if unknown:
            raise ConfigError(f"unknown [train] option(s): {', '.join(sorted(unknown))}")
        opts.update(train or {})
        self.opts = opts
        self.device = torch.device(device)
        self.flow = flow.to(self.device)
        self.action = action
        if getattr(action, "field", flow.field) != flow.field:
            raise ConfigError(f"the flow produces '{flow.field}' fields but the action acts on '{action.field}'")
        self.config = copy.deepcopy(dict(config or {}))
        self.out = Path(out) if out is not None else None
        self.batch_size = int(opts["batch_size"])
        self.steps_total = int(opts["steps"])
        if self.batch_size < 2:
            raise ConfigError(f"train.batch_size must be >= 2; found {self.batch_size}")
        self.objective = str(opts["objective"]).lower()
        if self.objective not in ("reverse", "forward"):
            raise ConfigError(f"train.objective must be 'reverse' or 'forward'; found {opts['objective']!r}")
        self.path_gradient = bool(opts["path_gradient"])
        method = str(opts["path_gradient_method"]).lower()
        if method not in ("auto", "fast", "inverse"):
            raise ConfigError(f"train.path_gradient_method must be 'auto', 'fast' or 'inverse'; "
                              f"found {opts['path_gradient_method']!r}")
        missing = layers_without_forward_diag(self.flow)
        if self.path_gradient and method == "fast" and missing:
            raise ConfigError(f"train.path_gradient_method = 'fast' needs forward_diag on every flow layer; "
                              f"{', '.join(missing)} lack it: use 'inverse' or 'auto'")
        self.fast_path_gradient = method == "fast" or (method == "auto" and not missing)
        self.guard = float(opts["guard"])
        self.guard_window = int(opts["guard_window"])
        if self.guard < 0 or not math.isfinite(self.guard) or self.guard_window < 2:
            raise ConfigError(f"train.guard must be a finite value >= 0 (nats) and train.guard_window >= 2; "
                              f"found {opts['guard']!r} and {opts['guard_window']!r}")
        self.rollbacks = 0
        self._guard_losses: list[float] = []
        self._guard_best = float("inf")
        self._guard_snapshot: dict[str, Any] | None = None
        self.ensemble = None
        if self.objective == "forward":
            if ensemble is None or len(ensemble) == 0:
                raise ConfigError("train.objective = 'forward' needs an ensemble (train.ensemble = PATH)")
            check_field(flow, ensemble)
            self.ensemble = ensemble.to(self.device)
        params = [p for p in self.flow.parameters() if p.requires_grad]
        name = str(opts["optimizer"]).lower()
        kw = dict(lr=float(opts["lr"]), betas=tuple(float(b) for b in opts["betas"]),
                  weight_decay=float(opts["weight_decay"]))
        if name == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(params, **kw)
        elif name == "adamw":
            self.optimizer = torch.optim.AdamW(params, **kw)
        else:
            raise ConfigError(f"train.optimizer must be 'adam' or 'adamw'; found {opts['optimizer']!r}")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _schedule(opts["schedule"], self.steps_total, int(opts["warmup_steps"]),
                                      float(opts["lr_min_factor"])))
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed))
        self.seed = int(seed)
        self.step = 0
        self.skipped = 0
        self.wall_time_s = 0.0
        self.history: list[dict[str, float]] = []
        self._saved_step: int | None = None  # step of the checkpoint last written or read

    # ------------------------------------------------------------------------- one step

    def _reverse_loss(self) -> tuple[torch.Tensor, torch.Tensor]:
        z, log_r = self.flow.sample_latent(self.batch_size, self.generator)
        if self.path_gradient and self.fast_path_gradient:
            loss, log_q, s = path_gradient_loss(self.flow, z, self.action.action)
            return loss, -(log_q + s)
        if self.path_gradient:
            x, _ = self.flow(z)
            frozen = {f"flow.{k}": v.detach() for k, v in self.flow.named_parameters()}
            log_q = torch.func.functional_call(_LogProb(self.flow), frozen, (x,), strict=False)
        else:
            x, logdet = self.flow(z)
            log_q = log_r - logdet
        per = log_q + self.action.action(x).to(torch.float64)
        return per.mean(), -per.detach()

    def _forward_loss(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.ensemble is not None
        idx = torch.randint(len(self.ensemble), (self.batch_size,), generator=self.generator,
                            device=self.device)
        loss = -self.flow.log_prob(self.ensemble[idx]).mean()
        with torch.no_grad():
            x, log_q = self.flow.sample(self.batch_size, self.generator)
            log_w = -self.action.action(x).to(torch.float64) - log_q
        return loss, log_w

    def train_step(self) -> dict[str, float]:
        """Run one optimisation step; returns its metrics.

        Returns:
            ``step`` (index of this step, from 0), ``loss``, ``free_energy`` (batch
            estimate of F_q; for ``forward`` from a fresh flow batch), ``ess``,
            ``acceptance``, ``lr`` (used for this step), ``grad_norm`` and ``skipped``
            (1.0 if the loss or gradient was not finite and nothing was applied).

        Raises:
            NonFiniteParametersError: if the update left NaN/Inf in the parameters and the
                divergence guard has no snapshot to return to
                (:meth:`_check_finite_parameters`).
        """
        self.flow.train()
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        lr = float(self.optimizer.param_groups[0]["lr"])
        loss, log_w = self._reverse_loss() if self.objective == "reverse" else self._forward_loss()
        skipped = not bool(torch.isfinite(loss))
        grad_norm = float("nan")
        if not skipped:
            loss.backward()
            params = [p for p in self.flow.parameters() if p.grad is not None]
            clip = float(self.opts["grad_clip"])
            gn = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
            grad_norm = float(gn)
            skipped = not math.isfinite(grad_norm)
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
        else:
            self.optimizer.step()
        self.scheduler.step()
        finite = log_w[torch.isfinite(log_w)]
        metrics = {
            "step": float(self.step),
            "loss": float(loss.detach()),
            "free_energy": float(-finite.mean()) if finite.numel() else float("nan"),
            "ess": float(_ess(finite)) if finite.numel() else 0.0,
            "acceptance": imh_acceptance_estimate(finite) if finite.numel() >= 2 else 0.0,
            "lr": lr,
            "grad_norm": grad_norm,
            "skipped": float(skipped),
        }
        self.wall_time_s += time.perf_counter() - t0
        metrics["wall_time_s"] = self.wall_time_s
        self.step += 1
        self._check_finite_parameters()
        if self.guard > 0 and self.objective == "reverse":
            self._guard_update(metrics["loss"])
        self.history.append(metrics)
        from flowplug.manager import get_plugin_manager

        get_plugin_manager().notify("flowplug_after_train_step", step=self.step - 1, metrics=dict(metrics))
        return metrics

    def non_finite_parameters(self) -> list[str]:
        """Names of the flow's parameters and buffers that hold NaN or Inf (empty when all are finite)."""
        tensors = [t for t in self.flow.state_dict().values() if t.is_floating_point() or t.is_complex()]
        if not tensors or bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
            return []
        return non_finite_entries(self.flow.state_dict())

    def _check_finite_parameters(self) -> None:
        """After a step: parameters that are no longer finite are rolled back to the divergence
        guard's snapshot (``train.guard`` > 0 and a snapshot taken), else the run stops.

        Raises:
            NonFiniteParametersError: when there is no snapshot to return to; no checkpoint
                of the non-finite state is written, the last one written stays.
        """
        bad = self.non_finite_parameters()
        if not bad:
            return
        if self.guard > 0 and self._guard_snapshot is not None:
            self._guard_losses = []
            self._rollback(f"non-finite parameters ({_names(bad)}) after step {self.step - 1}")
            return
        raise NonFiniteParametersError(
            f"training diverged: the flow's parameters are not finite after step {self.step - 1} "
            f"(NaN/Inf in {_names(bad)}); {self._kept_checkpoint()}. Lower train.lr, or set "
            "train.grad_clip, or train.guard to roll back to the last good state automatically")

    def _kept_checkpoint(self) -> str:
        """What the output directory holds, for messages about a run that cannot be saved."""
        if self.out is None:
            return "no checkpoint was written"
        path = self.out / CHECKPOINT_NAME
        if self._saved_step is not None and path.exists():
            return f"{path} still holds step {self._saved_step}, the last finite state"
        return f"no checkpoint was written to {self.out}"

    def _rollback(self, reason: str) -> None:
        """Restore the guard's snapshot (model, optimizer, scheduler) with half the learning
        rate; the step counter and random numbers go on."""
        snap = copy.deepcopy(self._guard_snapshot)
        self.flow.load_state_dict(snap["model"])
        self.optimizer.load_state_dict(snap["optimizer"])
        self.scheduler.load_state_dict(snap["scheduler"])
        self.scheduler.base_lrs = [0.5 * lr for lr in self.scheduler.base_lrs]
        self._guard_snapshot["scheduler"]["base_lrs"] = list(self.scheduler.base_lrs)
        # the schedule continues at the current step, with the halved base rate
        self.scheduler.last_epoch = self.step - 1
        self.scheduler.step()
        self.rollbacks += 1
        import warnings

        warnings.warn(f"training diverged ({reason}): back to the last snapshot with lr x 0.5 "
                      f"(rollback {self.rollbacks})", RuntimeWarning, stacklevel=3)
        self._guard_best = float("inf")

    def _guard_update(self, loss: float) -> None:
        """Divergence guard (``train.guard`` > 0): every ``guard_window`` steps compare the
        window's mean loss with the best window mean so far; within ``guard`` nats keep a
        snapshot of model, optimizer and scheduler, beyond it restore the last snapshot and
        halve the learning rate (the step counter and random numbers go on). The window after
        a rollback sets a new reference: the restored snapshot may itself sit up to ``guard``
        above the best mean, and comparing it with the old best would roll back for ever."""
        self._guard_losses.append(loss if math.isfinite(loss) else float("inf"))
        if len(self._guard_losses) < self.guard_window:
            return
        mean = sum(self._guard_losses) / len(self._guard_losses)
        self._guard_losses = []
        if self._guard_snapshot is not None and not mean <= self._guard_best + self.guard:
            self._rollback(f"mean loss {mean:.4g} over steps {self.step - self.guard_window}-"
                           f"{self.step - 1}, best {self._guard_best:.4g}")
            return
        self._guard_best = min(self._guard_best, mean)
        self._guard_snapshot = {"model": copy.deepcopy(self.flow.state_dict()),
                                "optimizer": copy.deepcopy(self.optimizer.state_dict()),
                                "scheduler": copy.deepcopy(self.scheduler.state_dict())}

    # ------------------------------------------------------------------------------ run

    @locked_run("train", lambda a: a["self"].out)
    def run(self, steps: int | None = None, *, progress: bool | None = None,
            checkpoint_every: int | None = None) -> list[dict[str, float]]:
        """Train until ``steps`` steps in total (default ``train.steps``) are done.

        Writes ``<out>/train_log.csv`` (one row per step) and a checkpoint every
        ``checkpoint_every`` steps and at the end, when ``out`` is set. A tqdm progress
        bar shows loss, ESS and acceptance. Ctrl-C (SIGINT, in the main thread) finishes
        the current step, writes a checkpoint of it and then raises ``KeyboardInterrupt``,
        so ``--resume`` loses nothing; a second Ctrl-C stops at once. ``out`` is locked
        for the call (:func:`flowplug.fsutil.run_lock`).

        Returns:
            Metrics of the steps run by this call.
        """
        total = self.steps_total if steps is None else int(steps)
        every = int(self.opts["checkpoint_every"] if checkpoint_every is None else checkpoint_every)
        show = bool(self.opts["progress"]) if progress is None else progress
        log_fh = writer = None
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            log_fh, writer = self._open_log()
        bar = None
        if show:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        done = []
        stop: list[int] = []
        old_handler = None
        if threading.current_thread() is threading.main_thread():
            def _on_sigint(signum, frame):
                if stop:
                    raise KeyboardInterrupt
                stop.append(signum)
            old_handler = signal.signal(signal.SIGINT, _on_sigint)
        try:
            while self.step < total:
                m = self.train_step()
                done.append(m)
                if writer is not None:
                    writer.writerow([int(m["step"])] + [m[c] for c in LOG_COLUMNS[1:]])
                    log_fh.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{m['loss']:.3f}", ess=f"{m['ess']:.3f}",
                                    acc=f"{m['acceptance']:.3f}", skipped=self.skipped, rollbacks=self.rollbacks,
                                    refresh=False)
                if stop:
                    if self.out is not None:
                        self.save_checkpoint()
                    raise KeyboardInterrupt
                if self.out is not None and every > 0 and self.step % every == 0 and self.step < total:
                    self.save_checkpoint()
            if self.out is not None:
                self.save_checkpoint()
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
            if bar is not None:
                bar.close()
            if log_fh is not None:
                log_fh.close()
        return done

    def _open_log(self):
        path = self.out / LOG_NAME
        rows: list[list[str]] = []
        if path.exists():
            with open(path, newline="") as fh:
                reader = csv.reader(fh)
                header = next(reader, None)
                if header == list(LOG_COLUMNS):
                    rows = [r for r in reader if r and r[0].isdigit() and int(r[0]) < self.step]
        fh = open(path, "w", newline="")
        writer = csv.writer(fh)
        writer.writerow(LOG_COLUMNS)
        writer.writerows(rows)
        fh.flush()
        return fh, writer

    # ------------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: model, optimizer, scheduler, RNG states, config, counters."""
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "skipped": self.skipped,
            "wall_time_s": self.wall_time_s,
            "seed": self.seed,
            "field": self.flow.field,
            "lattice": list(self.flow.lattice),
            "flow_spec": copy.deepcopy(self.flow.spec),
            "model": self.flow.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"generator": self.generator.get_state(), "torch_cpu": torch.get_rng_state()},
            "train": copy.deepcopy(self.opts),
            "config": copy.deepcopy(self.config),
            "guard": {"rollbacks": self.rollbacks, "losses": list(self._guard_losses),
                      "best": self._guard_best, "snapshot": copy.deepcopy(self._guard_snapshot)},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (from :func:`read_checkpoint`).

        Raises:
            CheckpointError: if the checkpoint belongs to a different flow architecture.
        """
        if state.get("flow_spec") != self.flow.spec:
            raise CheckpointError("checkpoint was written for a different flow architecture "
                                  f"({state.get('flow_spec')!r} vs {self.flow.spec!r})")
        self.flow.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["rng"]["generator"])
        torch.set_rng_state(state["rng"]["torch_cpu"])
        self.step = int(state["step"])
        self.skipped = int(state["skipped"])
        self.wall_time_s = float(state.get("wall_time_s", 0.0))
        guard = state.get("guard") or {}
        self.rollbacks = int(guard.get("rollbacks", 0))
        self._guard_losses = [float(v) for v in guard.get("losses", [])]
        self._guard_best = float(guard.get("best", float("inf")))
        self._guard_snapshot = copy.deepcopy(guard.get("snapshot"))
        self._saved_step = self.step

    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """Write a checkpoint atomically (default ``<out>/checkpoint.pt``) and call the
        ``flowplug_checkpoint_written`` hook.

        Raises:
            ConfigError: if neither ``path`` nor ``out`` is set.
            NonFiniteParametersError: if the flow's parameters hold NaN or Inf; nothing is
                written (a file already at ``path`` stays as it was).
        """
        if path is None:
            if self.out is None:
                raise ConfigError("save_checkpoint needs a path when the trainer has no output directory")
            path = self.out / CHECKPOINT_NAME
        path = Path(path)
        bad = self.non_finite_parameters()
        if bad:
            own = self.out is not None and path == self.out / CHECKPOINT_NAME
            kept = self._kept_checkpoint() if own else "nothing was written"
            raise NonFiniteParametersError(
                f"{path}: not written: the flow's parameters are not finite at step {self.step} "
                f"(NaN/Inf in {_names(bad)}); {kept}. Lower train.lr, or set train.grad_clip or train.guard")
        with atomic_path(path) as tmp:
            torch.save(self.state_dict(), tmp)
        if self.out is not None and path == self.out / CHECKPOINT_NAME:
            self._saved_step = self.step
        from flowplug.manager import get_plugin_manager

        get_plugin_manager().notify("flowplug_checkpoint_written", path=str(path), step=self.step, what="train")
        return path


# ------------------------------------------------------------------------ build / load


def build_trainer(config: Mapping[str, Any], *, out: str | Path | None = None,
                  device: str | torch.device | None = None) -> Trainer:
    r"""Build action, flow and trainer from a run configuration (the ``flowplug train`` TOML).

    Keys used: ``lattice``, ``seed``, ``device``, ``threads`` (CPU threads, 0 = torch's
    default), ``[action]`` (see
    :func:`flowplug.theory.action_from_config`), ``[flow]`` (``layers``, ``n_layers``,
    ``prior``, ``options``), ``[train]`` (:data:`TRAIN_DEFAULTS`).

    Raises:
        ConfigError, UnknownComponentError: on invalid configurations.
    """
    from flowplug.theory import action_from_config

    action = action_from_config(config)
    lattice = [int(v) for v in config.get("lattice", [])]
    if not lattice:
        raise ConfigError("configuration key 'lattice' is empty (e.g. lattice = [8, 8])")
    fcfg = dict(config.get("flow", {}))
    threads = int(config.get("threads", 0))
    if threads > 0:
        torch.set_num_threads(threads)
    seed = int(config.get("seed", 1))
    torch.manual_seed(seed)  # network initialisation
    flow = build_flow(action.field, lattice, fcfg.get("layers", []), n_layers=fcfg.get("n_layers"),
                      options=fcfg.get("options", {}), prior=fcfg.get("prior") or None)
    dev = resolve_device(str(device if device is not None else config.get("device", "auto")))
    train = dict(config.get("train", {}))
    ensemble = None
    if str(train.get("objective", "reverse")).lower() == "forward":
        if not train.get("ensemble"):
            raise ConfigError("train.objective = 'forward' needs train.ensemble = PATH (or glob)")
        ensemble = load_ensemble(train["ensemble"], field=action.field, lattice=lattice,
                                 format=train.get("ensemble_format") or None)
    return Trainer(flow, action, train, seed=seed, device=dev, ensemble=ensemble, config=config,
                   out=Path(out if out is not None else config.get("out", "flowplug-train")))


def checkpoint_path(path: str | Path) -> Path:
    """The checkpoint file for a run directory or a file path."""
    p = Path(path)
    return p / CHECKPOINT_NAME if p.is_dir() else p


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a training checkpoint with ``torch.load(weights_only=True)``.

    Arguments:
        path: ``checkpoint.pt`` or the run directory holding it.
        map_location: Where to put the tensors.

    Raises:
        CheckpointError: if the file is missing, unreadable, or not a flowplug training
            checkpoint (of a supported version).
    """
    p = checkpoint_path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no checkpoint (expected a run directory with {CHECKPOINT_NAME} "
                              "or a checkpoint file)")
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{p}: cannot read checkpoint ({type(exc).__name__}: {exc}); "
                              "the file is damaged or not a flowplug checkpoint") from None
    if not isinstance(state, Mapping) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{p}: not a flowplug training checkpoint")
    if int(state.get("version", 0)) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{p}: checkpoint version {state.get('version')} is newer than this "
                              f"flowplug supports ({CHECKPOINT_VERSION}); upgrade flowplug")
    return dict(state)


def resume_trainer(path: str | Path, *, overrides: Mapping[str, Any] | None = None,
                   device: str | torch.device | None = None) -> Trainer:
    """Rebuild a trainer from a checkpoint and restore its state exactly.

    Arguments:
        path: Run directory or checkpoint file.
        overrides: ``[train]`` keys to change on resume (only ``steps``,
            ``checkpoint_every`` and ``progress`` may change).
        device: Device override (default: the configuration's).

    Raises:
        CheckpointError: on unreadable checkpoints or a forbidden override.
    """
    state = read_checkpoint(path)
    config = copy.deepcopy(state["config"])
    allowed = {"steps", "checkpoint_every", "progress"}
    bad = set(overrides or {}) - allowed
    if bad:
        raise CheckpointError(f"cannot change {', '.join(sorted('train.' + b for b in bad))} when resuming; "
                              f"only {', '.join(sorted('train.' + a for a in allowed))} may change")
    config.setdefault("train", {}).update(overrides or {})
    out = checkpoint_path(path).parent
    trainer = build_trainer(config, out=out, device=device)
    trainer.load_state_dict(state)
    return trainer


@dataclass
class LoadedFlow:
    """A trained flow with what a sampler needs (returned by :func:`load_flow`).

    Attributes:
        flow: The :class:`Flow` in eval mode.
        action: The action it was trained for (``action(x) -> (B,)``, ``field``).
        lattice: (L_0, ..., L_{d-1}).
        field: Field kind (``"scalar"``, ``"u1"``, ``"su3"``...).
        config: The full training configuration.
        step: Training steps done.
        path: The checkpoint file.
    """

    flow: Flow
    action: Any
    lattice: tuple[int, ...]
    field: str
    config: dict[str, Any] = field(default_factory=dict)
    step: int = 0
    path: Path | None = None


def load_flow(path: str | Path, *, device: str | torch.device = "cpu") -> LoadedFlow:
    r"""Load a trained flow from a ``flowplug train`` run directory or checkpoint file.

    Example (independence Metropolis with the flow as proposal)::

        lf = load_flow("runs/phi4")
        with torch.no_grad():
            x, log_q = lf.flow.sample(1024)          # fresh proposals and log q(x)
            log_q_hmc = lf.flow.log_prob(x_hmc)      # log q of states not from the flow
            log_p = -lf.action.action(x)             # up to log Z

    Arguments:
        path: Run directory (holding ``checkpoint.pt``) or checkpoint file.
        device: Device for the flow.

    Returns:
        :class:`LoadedFlow`.

    Raises:
        CheckpointError: if the checkpoint cannot be read or does not match its architecture.
        NonFiniteParametersError: if its parameters hold NaN or Inf (a diverged run).
    """
    from flowplug.theory import action_from_config

    state = read_checkpoint(path)
    bad = non_finite_entries(state.get("model") or {})
    if bad:
        raise NonFiniteParametersError(
            f"{checkpoint_path(path)}: the flow's parameters are not finite (NaN/Inf in {_names(bad)}; "
            f"step {state.get('step')}): the training run diverged and this flow cannot be used. "
            "Retrain with a lower train.lr, or with train.grad_clip or train.guard")
    try:
        flow = Flow.from_spec(state["flow_spec"])
        flow.load_state_dict(state["model"])
    except (KeyError, RuntimeError, FlowplugError) as exc:
        raise CheckpointError(f"{checkpoint_path(path)}: cannot rebuild the flow: {exc}") from None
    flow = flow.to(resolve_device(str(device))).eval()
    return LoadedFlow(flow=flow, action=action_from_config(state["config"]),
                      lattice=tuple(state["lattice"]), field=str(state["field"]),
                      config=dict(state["config"]), step=int(state["step"]), path=checkpoint_path(path))


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_flow(flow: Flow, action: Any, n_samples: int = 8192, *, batch_size: int = 1024,
                  seed: int = 12345, observables: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None
                  ) -> dict[str, Any]:
    r"""Figures of a flow from ``n_samples`` fresh samples (float64).

    Arguments:
        flow: The flow.
        action: The target action.
        n_samples: Number of fresh samples.
        batch_size: Samples per forward pass.
        seed: Seed of the sampling generator (and of the chain's uniforms).
        observables: Name -> function (B,) of configurations; their reweighted means
            sum(w O)/sum(w) are reported as ``<name>``, with the delta-method error
            sqrt(sum w^2 (O - mean)^2)/sum(w) as ``<name>_err`` (optimistic when the
            weights are heavy-tailed), and their means over the independence Metropolis
            chain of ``acceptance_chain`` as ``<name>_chain`` with the Gamma-method
            error ``<name>_chain_err`` and ``<name>_chain_tau_int`` (Wolff,
            hep-lat/0306017; NaN when the observable is not finite on a chain state).

    Returns:
        ``ess``, ``acceptance`` (estimate), ``acceptance_chain`` (an independence
        Metropolis chain over the samples), ``free_energy`` (mean of log q + S, an upper
        bound of -log Z), ``n_samples``, and the observables.

    Raises:
        FlowplugError: if every sample has a non-finite log weight.
    """
    flow.eval()
    gen = torch.Generator(device=flow.device)
    gen.manual_seed(int(seed))
    log_ws, obs = [], {k: [] for k in (observables or {})}
    left = int(n_samples)
    while left > 0:
        b = min(batch_size, left)
        x, log_q = flow.sample(b, gen)
        log_ws.append((-action.action(x).to(torch.float64) - log_q).cpu())
        for k, fn in (observables or {}).items():
            obs[k].append(fn(x).to(torch.float64).cpu())
        left -= b
    log_w = torch.cat(log_ws)
    finite = torch.isfinite(log_w)
    lw = log_w[finite]
    if lw.numel() == 0:
        raise FlowplugError(f"evaluate_flow: all {int(n_samples)} samples have non-finite log weights "
                            "(the flow or the action gives NaN/Inf)")
    out: dict[str, Any] = {
        "n_samples": int(n_samples),
        "non_finite": int((~finite).sum()),
        "ess": float(_ess(lw)),
        "acceptance": imh_acceptance_estimate(lw),
        "free_energy": float(-lw.mean()),
    }
    states = imh_chain_states(lw, int(seed))
    out["acceptance_chain"] = _moved_fraction(states)
    if obs:
        from flowplug.stats import gamma_method

        w = torch.exp(lw - lw.max())
        for k, vals in obs.items():
            v = torch.cat(vals)[finite]
            mean = (w * v).sum() / w.sum()
            out[k] = float(mean)
            out[k + "_err"] = float(torch.sqrt((w * w * (v - mean) ** 2).sum()) / w.sum())
            series = v.numpy()[states]
            if np.isfinite(series).all():
                g = gamma_method(series)
                out[k + "_chain"], out[k + "_chain_err"], out[k + "_chain_tau_int"] = g.mean, g.error, g.tau_int
            else:
                out[k + "_chain"] = out[k + "_chain_err"] = out[k + "_chain_tau_int"] = float("nan")
    return out
