r"""Training normalizing flows for lattice actions: the :class:`Trainer`, built from a configuration, resumed exactly.

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
    configurations, read through any file-format adapter by
    :func:`flowplug.training_data.load_ensemble`): minimise -E_{x~data}[log q(x)]
    (the forward KL up to a constant).

Per-step figures (float64, from log weights log w = -S(x) - log q(x) of the batch)
    ``ess`` = (sum w)^2 / (n sum w^2) (:func:`flowplug.stats.ess`);
    ``acceptance`` = the expected acceptance rate of an independence Metropolis chain
    with the flow as proposal (:func:`flowplug.diagnostics.imh_acceptance_estimate`).
    The figures of a trained flow on fresh samples are :func:`flowplug.diagnostics.evaluate_flow`
    (:meth:`Trainer.evaluate`).

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
    parameters is never written, and :func:`flowplug.checkpoints.load_flow` refuses one.
    Checkpoints (:mod:`flowplug.checkpoints`: format, writing, reading, loading a flow for
    sampling without a trainer) hold the model, optimizer, scheduler and
    random-number-generator states and the configuration; they are written atomically
    and read with ``torch.load(weights_only=True)`` (nothing is unpickled). A resumed run
    repeats the uninterrupted run bit for bit on the same device and thread count.

Public API: :class:`Trainer`, :func:`build_trainer`, :func:`resume_trainer`,
:data:`TRAIN_DEFAULTS`. For compatibility this module also re-exports the names that
moved out of it; new code imports them from their homes:
:mod:`flowplug.checkpoints` (:func:`load_flow`, :class:`LoadedFlow`, :func:`read_checkpoint`,
:func:`checkpoint_path`, :func:`non_finite_entries`, :func:`resolve_device`,
:data:`CHECKPOINT_NAME`, :data:`CHECKPOINT_FORMAT`, :data:`CHECKPOINT_VERSION`),
:mod:`flowplug.diagnostics` (:func:`evaluate_flow`, :func:`imh_acceptance_estimate`,
:func:`imh_chain_acceptance`, :func:`imh_chain_states`) and :mod:`flowplug.training_data`
(:func:`load_ensemble`).
"""

from __future__ import annotations

import copy
import csv
import math
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors

from flowplug import distributed
from flowplug.checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    CHECKPOINT_VERSION,
    LoadedFlow,
    checkpoint_path,
    load_flow,
    non_finite_entries,
    read_checkpoint,
    resolve_device,
    short_list,
    write_checkpoint,
)
from flowplug.diagnostics import evaluate_flow, imh_acceptance_estimate, imh_chain_acceptance, imh_chain_states
from flowplug.errors import CheckpointError, ConfigError, NonFiniteParametersError
from flowplug.flow import Flow, build_flow, check_field, layers_without_forward_diag, path_gradient_loss, place_flow
from flowplug.fsutil import locked_run
from flowplug.stats import ess as _ess
from flowplug.symmetric import check_action_symmetry
from flowplug.theory import Action, action_from_config
from flowplug.threads import set_threads
from flowplug.training_data import load_ensemble

__all__ = [
    "Trainer",
    "build_trainer",
    "resume_trainer",
    "TRAIN_DEFAULTS",
    "LOG_NAME",
    "LOG_COLUMNS",
    # re-exported from flowplug.checkpoints
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CHECKPOINT_NAME",
    "LoadedFlow",
    "load_flow",
    "read_checkpoint",
    "checkpoint_path",
    "non_finite_entries",
    "resolve_device",
    # re-exported from flowplug.diagnostics
    "evaluate_flow",
    "imh_acceptance_estimate",
    "imh_chain_acceptance",
    "imh_chain_states",
    # re-exported from flowplug.training_data
    "load_ensemble",
]

#: File name of the per-step log in the output directory.
LOG_NAME = "train_log.csv"
#: Columns of :data:`LOG_NAME`, one row per step.
LOG_COLUMNS = ("step", "loss", "free_energy", "ess", "acceptance", "lr", "grad_norm", "skipped", "wall_time_s")


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


def _fused_optimizer_ok(params: list[nn.Parameter], device: torch.device) -> bool:
    """Whether Adam/AdamW can take ``fused=True`` here: floating-point parameters on a CPU or CUDA
    device of a torch that supports it (same update rule, one kernel per parameter group)."""
    if not params or device.type not in ("cpu", "cuda"):
        return False
    if not all(p.is_floating_point() and p.device.type == device.type for p in params):
        return False
    try:
        torch.optim.Adam([torch.zeros(1, device=device, requires_grad=True)], fused=True)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


#: Defaults of the [train] table (the CLI's default configuration documents each key).
TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 1000,
    "batch_size": 64,
    "objective": "reverse",
    "path_gradient": False,
    "path_gradient_method": "auto",
    "guard": 0.0,
    "guard_window": 25,
    "optimizer": "adam",
    "lr": 1e-3,
    "weight_decay": 0.0,
    "betas": [0.9, 0.999],
    "schedule": "constant",
    "warmup_steps": 0,
    "lr_min_factor": 0.0,
    "grad_clip": 0.0,
    "ensemble": "",
    "ensemble_format": "",
    "init_from": "",
    "checkpoint_every": 250,
    "progress": True,
}


class Trainer:
    r"""Trains a :class:`Flow` towards exp(-S)/Z (module docstring for objectives and figures).

    Arguments:
        flow: The flow (moved to ``device``).
        action: The target action: ``field`` and ``action(x) -> (B,) float64`` (an
            :class:`~flowplug.theory.Action`, or any object with those two).
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
        initialised_layers: ``(layer, source layer)`` indices set from ``train.init_from``
            by :func:`build_trainer` (empty otherwise).

    Raises:
        ConfigError: on invalid options or a flow/action field mismatch.
    """

    def __init__(
        self,
        flow: Flow,
        action: Action,
        train: Mapping[str, Any] | None = None,
        *,
        seed: int = 1,
        device: torch.device | str = "cpu",
        ensemble: torch.Tensor | None = None,
        config: Mapping[str, Any] | None = None,
        out: str | Path | None = None,
    ) -> None:
        opts = dict(TRAIN_DEFAULTS)
        unknown = set(train or {}) - set(opts)
        if unknown:
            raise ConfigError(f"unknown [train] option(s): {', '.join(sorted(unknown))}")
        opts.update(train or {})
        self.opts = opts
        self.device = torch.device(device)
        self.flow = place_flow(flow, self.device)  # float64 networks on CUDA (flowplug.flow.place_flow)
        self.action = action
        if getattr(action, "field", flow.field) != flow.field:
            raise ConfigError(f"the flow produces '{flow.field}' fields but the action acts on '{action.field}'")
        self.config = copy.deepcopy(dict(config or {}))
        self.out = Path(out) if out is not None else None
        self.batch_size = int(opts["batch_size"])
        self.steps_total = int(opts["steps"])
        if self.batch_size < 2:
            raise ConfigError(f"train.batch_size must be >= 2; found {self.batch_size}")
        if self.batch_size % distributed.world_size():
            raise ConfigError(
                f"train.batch_size ({self.batch_size}) is the global batch: it must be a multiple of the "
                f"number of processes ({distributed.world_size()})"
            )
        distributed.broadcast_parameters(self.flow)  # the same start on every rank
        self.objective = str(opts["objective"]).lower()
        if self.objective not in ("reverse", "forward"):
            raise ConfigError(f"train.objective must be 'reverse' or 'forward'; found {opts['objective']!r}")
        self.path_gradient = bool(opts["path_gradient"])
        method = str(opts["path_gradient_method"]).lower()
        if method not in ("auto", "fast", "inverse"):
            raise ConfigError(
                f"train.path_gradient_method must be 'auto', 'fast' or 'inverse'; "
                f"found {opts['path_gradient_method']!r}"
            )
        missing = layers_without_forward_diag(self.flow)
        if self.path_gradient and method == "fast" and missing:
            raise ConfigError(
                f"train.path_gradient_method = 'fast' needs forward_diag on every flow layer; "
                f"{', '.join(missing)} lack it: use 'inverse' or 'auto'"
            )
        self.fast_path_gradient = method == "fast" or (method == "auto" and not missing)
        self.guard = float(opts["guard"])
        self.guard_window = int(opts["guard_window"])
        if self.guard < 0 or not math.isfinite(self.guard) or self.guard_window < 2:
            raise ConfigError(
                f"train.guard must be a finite value >= 0 (nats) and train.guard_window >= 2; "
                f"found {opts['guard']!r} and {opts['guard_window']!r}"
            )
        self.rollbacks = 0
        self.initialised_layers: list[tuple[int, int]] = []
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
        self._params = params  # the trained parameters, in a fixed order (the hot loop reads this list)
        self._finite_watch: list[torch.Tensor] | None = None  # see _parameters_finite
        name = str(opts["optimizer"]).lower()
        kw: dict[str, Any] = dict(
            lr=float(opts["lr"]), betas=tuple(float(b) for b in opts["betas"]), weight_decay=float(opts["weight_decay"])
        )
        if _fused_optimizer_ok(params, self.device):
            kw["fused"] = True  # one kernel per parameter group instead of ~10 Python-level ops per tensor
        if name == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(params, **kw)
        elif name == "adamw":
            self.optimizer = torch.optim.AdamW(params, **kw)
        else:
            raise ConfigError(f"train.optimizer must be 'adam' or 'adamw'; found {opts['optimizer']!r}")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            _schedule(opts["schedule"], self.steps_total, int(opts["warmup_steps"]), float(opts["lr_min_factor"])),
        )
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed))
        self.seed = int(seed)
        self.step = 0
        self.skipped = 0
        self.wall_time_s = 0.0
        self.history: list[dict[str, float]] = []
        self._saved_step: int | None = None  # step of the checkpoint last written or read

    # ------------------------------------------------------------------------- one step

    # Each loss returns (this rank's share of the global-batch mean, this rank's log weights);
    # every rank draws the global batch and keeps its slice (flowplug.distributed).

    def _reverse_loss(self) -> tuple[torch.Tensor, torch.Tensor]:
        z, log_r = self.flow.sample_latent(self.batch_size, self.generator)
        part = distributed.slice_of(self.batch_size)
        z, log_r = z[part], log_r[part]
        share = z.shape[0] / self.batch_size
        if self.path_gradient and self.fast_path_gradient:
            loss, log_q, s = path_gradient_loss(self.flow, z, self.action.action)
            return loss * share, -(log_q + s)
        if self.path_gradient:
            x, _ = self.flow(z)
            frozen = {f"flow.{k}": v.detach() for k, v in self.flow.named_parameters()}
            log_q = torch.func.functional_call(_LogProb(self.flow), frozen, (x,), strict=False)
        else:
            x, logdet = self.flow(z)
            log_q = log_r - logdet
        per = log_q + self.action.action(x).to(torch.float64)
        return per.mean() * share, -per.detach()

    def _forward_loss(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.ensemble is not None
        idx = torch.randint(len(self.ensemble), (self.batch_size,), generator=self.generator, device=self.device)
        part = distributed.slice_of(self.batch_size)
        idx = idx[part]
        loss = -self.flow.log_prob(self.ensemble[idx]).mean() * (idx.shape[0] / self.batch_size)
        with torch.no_grad():
            z, log_r = self.flow.sample_latent(self.batch_size, self.generator)
            x, logdet = self.flow(z[part])
            log_w = -self.action.action(x).to(torch.float64) - (log_r[part] - logdet)
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
        if not self.flow.training:  # Module.train() walks every submodule: only when needed
            self.flow.train()
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        lr = float(self.optimizer.param_groups[0]["lr"])
        loss, log_w = self._reverse_loss() if self.objective == "reverse" else self._forward_loss()
        total = loss.detach().clone()
        distributed.all_reduce_sum([total])  # the global batch mean, on every rank
        log_w = distributed.all_gather_cat(log_w)
        skipped = not bool(torch.isfinite(total))
        grad_norm = float("nan")
        if not skipped:
            loss.backward()
            if distributed.world_size() > 1:
                # a parameter that no rank's loss reached stays without gradient (as in one process,
                # where the optimizer skips it); one that some rank's did gets zeros elsewhere
                params = self._params
                reached = torch.tensor([float(p.grad is not None) for p in params], device=self.device)
                distributed.all_reduce_sum([reached])
                for p, n in zip(params, reached.tolist(), strict=True):
                    if n > 0 and p.grad is None:
                        p.grad = torch.zeros_like(p)
                distributed.all_reduce_sum(p.grad for p in params if p.grad is not None)
            params = [p for p in self._params if p.grad is not None]
            grad_norm = self._grad_norm(params, float(self.opts["grad_clip"]))
            skipped = not math.isfinite(grad_norm)
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
        else:
            self.optimizer.step()
        self.scheduler.step()
        ok = torch.isfinite(log_w)
        finite = log_w if bool(ok.all()) else log_w[ok]
        metrics = {
            "step": float(self.step),
            "loss": float(total),
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
        if distributed.is_main():
            from flowplug.manager import get_plugin_manager

            get_plugin_manager().notify("flowplug_after_train_step", step=self.step - 1, metrics=dict(metrics))
        return metrics

    @staticmethod
    def _grad_norm(params: list[nn.Parameter], clip: float) -> float:
        """The global 2-norm of the gradients of ``params`` (NaN or Inf when one is not finite),
        clipped to ``clip`` when ``clip`` > 0 (``torch.nn.utils.clip_grad_norm_``). Without
        clipping, the norm of the per-gradient norms (one ``torch._foreach_norm`` call):
        clip_grad_norm_ with an infinite bound would also multiply every gradient by 1."""
        if clip > 0 or not params:
            return float(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf")))
        grads = [p.grad for p in params if p.grad is not None]
        first = grads[0]
        if any(g.dtype != first.dtype or g.device != first.device for g in grads):
            return float(torch.nn.utils.clip_grad_norm_(params, float("inf")))
        return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))

    def non_finite_parameters(self) -> list[str]:
        """Names of the flow's parameters and buffers that hold NaN or Inf (empty when all are finite)."""
        return non_finite_entries(self.flow.state_dict())

    def _parameters_finite(self) -> bool:
        """True when every floating-point parameter and buffer of the flow is finite, cheaply.

        The parameters of each dtype and device are flattened into one vector (one C++ call,
        ``torch._utils._flatten_dense_tensors``) and checked with one ``isfinite``: exact, and
        about half the cost of a norm per tensor for the ~100 small tensors of a 16-layer
        flow. The buffers (masks and frozen sites, which grow with the lattice: copying them
        every step took 10-30x the old check on 4D lattices) keep one
        ``torch._foreach_norm`` call (a norm is finite when its tensor is, short of
        overflow). The caller runs the per-tensor :meth:`non_finite_parameters`, which is
        exact and names the tensors, when this says no.
        """
        if self._finite_watch is None:  # the buffers, found once: walking the modules costs more than the check
            self._finite_watch = [b for b in self.flow.buffers() if b.is_floating_point() or b.is_complex()]
        # the parameters are read at every call: a rollback or a load may give them new storage
        params: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        buffers: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
        for group, tensors in ((params, self._params), (buffers, self._finite_watch)):
            for t in tensors:
                group.setdefault((t.dtype, t.device), []).append(t)
        try:
            with torch.no_grad():
                return all(bool(torch.isfinite(_flatten_dense_tensors(ts)).all()) for ts in params.values()) and all(
                    bool(torch.isfinite(torch.stack(torch._foreach_norm(ts))).all()) for ts in buffers.values()
                )
        except RuntimeError:  # tensors the flattening or the stack refuses (devices, dtypes): per tensor
            return not self.non_finite_parameters()

    def _check_finite_parameters(self) -> None:
        """After a step: parameters that are no longer finite are rolled back to the divergence
        guard's snapshot (``train.guard`` > 0 and a snapshot taken), else the run stops.

        Raises:
            NonFiniteParametersError: when there is no snapshot to return to; no checkpoint
                of the non-finite state is written, the last one written stays.
        """
        if self._parameters_finite():
            return
        bad = self.non_finite_parameters()
        if not bad:
            return
        if self.guard > 0 and self._guard_snapshot is not None:
            self._guard_losses = []
            self._rollback(f"non-finite parameters ({short_list(bad)}) after step {self.step - 1}")
            return
        raise NonFiniteParametersError(
            f"training diverged: the flow's parameters are not finite after step {self.step - 1} "
            f"(NaN/Inf in {short_list(bad)}); {self._kept_checkpoint()}. Lower train.lr, or set "
            "train.grad_clip, or train.guard to roll back to the last good state automatically"
        )

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
        guard = self._guard_snapshot
        assert guard is not None  # the guard rolls back only to a snapshot it took
        snap = copy.deepcopy(guard)
        self.flow.load_state_dict(snap["model"])
        self.optimizer.load_state_dict(snap["optimizer"])
        self.scheduler.load_state_dict(snap["scheduler"])
        self.scheduler.base_lrs = [0.5 * lr for lr in self.scheduler.base_lrs]
        guard["scheduler"]["base_lrs"] = list(self.scheduler.base_lrs)
        # the schedule continues at the current step, with the halved base rate
        self.scheduler.last_epoch = self.step - 1
        self.scheduler.step()
        self.rollbacks += 1
        import warnings

        warnings.warn(
            f"training diverged ({reason}): back to the last snapshot with lr x 0.5 (rollback {self.rollbacks})",
            RuntimeWarning,
            stacklevel=3,
        )
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
            self._rollback(
                f"mean loss {mean:.4g} over steps {self.step - self.guard_window}-"
                f"{self.step - 1}, best {self._guard_best:.4g}"
            )
            return
        self._guard_best = min(self._guard_best, mean)
        self._guard_snapshot = {
            "model": copy.deepcopy(self.flow.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "scheduler": copy.deepcopy(self.scheduler.state_dict()),
        }

    # ------------------------------------------------------------------------------ run

    @locked_run("train", lambda a: a["self"].out)
    def run(
        self, steps: int | None = None, *, progress: bool | None = None, checkpoint_every: int | None = None
    ) -> list[dict[str, float]]:
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
        writes = self.out is not None and distributed.is_main()  # rank 0 alone writes
        if writes:
            assert self.out is not None
            self.out.mkdir(parents=True, exist_ok=True)
            log_fh, writer = self._open_log(self.out)
        bar = None
        if show and distributed.is_main():
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
                if writer is not None and log_fh is not None:  # both set together, with out
                    writer.writerow([int(m["step"])] + [m[c] for c in LOG_COLUMNS[1:]])
                    log_fh.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{m['loss']:.3f}",
                        ess=f"{m['ess']:.3f}",
                        acc=f"{m['acceptance']:.3f}",
                        skipped=self.skipped,
                        rollbacks=self.rollbacks,
                        refresh=False,
                    )
                if distributed.world_size() > 1:  # every rank stops after the same step
                    flag = torch.tensor([float(bool(stop))], device=self.device)
                    distributed.all_reduce_sum([flag])
                    if flag.item() > 0 and not stop:
                        stop.append(signal.SIGINT)
                if stop:
                    if writes:
                        self.save_checkpoint()
                    raise KeyboardInterrupt
                if writes and every > 0 and self.step % every == 0 and self.step < total:
                    self.save_checkpoint()
            if writes:
                self.save_checkpoint()
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
            if bar is not None:
                bar.close()
            if log_fh is not None:
                log_fh.close()
        return done

    def _open_log(self, out: Path) -> tuple[IO[str], Any]:
        """Open ``out/train_log.csv`` for appending rows: the rows before this step kept,
        the header written; returns the file and its csv writer."""
        path = out / LOG_NAME
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

    # ------------------------------------------------------------------------- evaluation

    def evaluate(
        self,
        n_samples: int = 8192,
        *,
        batch_size: int = 1024,
        seed: int = 12345,
        observables: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
        progress: bool | None = None,
    ) -> dict[str, Any]:
        """Figures of the flow on fresh samples: :func:`flowplug.diagnostics.evaluate_flow`
        of :attr:`flow` and :attr:`action` (ESS, acceptance, free energy, observables; float64).

        Arguments:
            n_samples, batch_size, seed, observables: As :func:`~flowplug.diagnostics.evaluate_flow`.
            progress: Progress bar of the samples drawn; default ``train.progress`` (shown
                when :meth:`run` shows one).

        Returns:
            The figures of :func:`~flowplug.diagnostics.evaluate_flow`.

        Raises:
            FlowplugError: if every sample has a non-finite log weight.
        """
        show = bool(self.opts["progress"]) if progress is None else bool(progress)
        return evaluate_flow(
            self.flow, self.action, n_samples, batch_size=batch_size, seed=seed, observables=observables, progress=show
        )

    # ------------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: model, optimizer, scheduler, RNG states, config, counters.

        Returns:
            A checkpoint dict in the format of :mod:`flowplug.checkpoints` (references to
            the live model, optimizer and scheduler tensors; copy before changing them).
        """
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
            "guard": {
                "rollbacks": self.rollbacks,
                "losses": list(self._guard_losses),
                "best": self._guard_best,
                "snapshot": copy.deepcopy(self._guard_snapshot),
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (from :func:`flowplug.checkpoints.read_checkpoint`).

        Raises:
            CheckpointError: if the checkpoint belongs to a different flow architecture.
        """
        if state.get("flow_spec") != self.flow.spec:
            raise CheckpointError(
                "checkpoint was written for a different flow architecture "
                f"({state.get('flow_spec')!r} vs {self.flow.spec!r})"
            )
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
        """Write :meth:`state_dict` atomically with :func:`flowplug.checkpoints.write_checkpoint`
        (default ``<out>/checkpoint.pt``) and call the ``flowplug_checkpoint_written`` hook.

        Returns:
            The file written.

        Raises:
            ConfigError: if neither ``path`` nor ``out`` is set.
            NonFiniteParametersError: if the flow's parameters hold NaN or Inf; nothing is
                written (a file already at ``path`` stays as it was, and the message says
                which step it holds).
        """
        if path is None:
            if self.out is None:
                raise ConfigError("save_checkpoint needs a path when the trainer has no output directory")
            path = self.out / CHECKPOINT_NAME
        path = Path(path)
        own = self.out is not None and path == self.out / CHECKPOINT_NAME
        write_checkpoint(path, self.state_dict(), kept=self._kept_checkpoint() if own else "nothing was written")
        if own:
            self._saved_step = self.step
        from flowplug.manager import get_plugin_manager

        get_plugin_manager().notify("flowplug_checkpoint_written", path=str(path), step=self.step, what="train")
        return path


# ---------------------------------------------------------------------- build / resume


def build_trainer(
    config: Mapping[str, Any],
    *,
    out: str | Path | None = None,
    device: str | torch.device | None = None,
    initialise: bool = True,
) -> Trainer:
    r"""Build action, flow and trainer from a run configuration (the ``flowplug train`` TOML).

    Keys used: ``lattice``, ``seed``, ``device``, ``threads`` (CPU threads set with
    :func:`flowplug.threads.set_threads`; 0 = leave torch's setting), ``[action]`` (see
    :func:`flowplug.theory.action_from_config`), ``[flow]`` (``layers``, ``n_layers``,
    ``prior``, ``options``; :func:`flowplug.flow.build_flow`), ``[train]``
    (:data:`TRAIN_DEFAULTS`; for ``objective = "forward"`` the ensemble is read by
    :func:`flowplug.training_data.load_ensemble`; a non-empty ``train.init_from`` names a
    trained run whose parameters initialise the flow, :func:`flowplug.flowtools.init_flow_from`).

    Arguments:
        config: The run configuration.
        out: Output directory (default the configuration's ``out``, else ``flowplug-train``).
        device: Device override (default the configuration's ``device``, ``"auto"``).
        initialise: Apply ``train.init_from`` (false when a checkpoint's state follows).

    Returns:
        A :class:`Trainer` at step 0.

    Raises:
        ConfigError, UnknownComponentError: on invalid configurations.
        ShapeError, FormatError: from reading a forward-KL ensemble.
        CheckpointError: if ``train.init_from`` cannot be read.
    """
    action = action_from_config(config)
    lattice = [int(v) for v in config.get("lattice", [])]
    if not lattice:
        raise ConfigError("configuration key 'lattice' is empty (e.g. lattice = [8, 8])")
    fcfg = dict(config.get("flow", {}))
    set_threads(config.get("threads", 0))  # flowplug.threads: 0 leaves torch's setting
    seed = int(config.get("seed", 1))
    torch.manual_seed(seed)  # network initialisation
    flow = build_flow(
        action.field,
        lattice,
        fcfg.get("layers", []),
        n_layers=fcfg.get("n_layers"),
        options=fcfg.get("options", {}),
        prior=fcfg.get("prior") or None,
        symmetrize=check_action_symmetry(str(config["action"]["name"]), fcfg.get("symmetrize") or ""),
    )
    dev = resolve_device(str(device if device is not None else config.get("device", "auto")))
    dev = distributed.init_from_env(dev)  # under torchrun: join the process group (cuda:LOCAL_RANK)
    train = dict(config.get("train", {}))
    initialised: list[tuple[int, int]] = []
    if initialise and train.get("init_from"):
        from flowplug.flowtools import init_flow_from

        initialised = init_flow_from(flow, Path(str(train["init_from"])))
    ensemble = None
    if str(train.get("objective", "reverse")).lower() == "forward":
        if not train.get("ensemble"):
            raise ConfigError("train.objective = 'forward' needs train.ensemble = PATH (or glob)")
        ensemble = load_ensemble(
            train["ensemble"], field=action.field, lattice=lattice, format=train.get("ensemble_format") or None
        )
    trainer = Trainer(
        flow,
        action,
        train,
        seed=seed,
        device=dev,
        ensemble=ensemble,
        config=config,
        out=Path(out if out is not None else config.get("out", "flowplug-train")),
    )
    trainer.initialised_layers = initialised
    return trainer


def resume_trainer(
    path: str | Path, *, overrides: Mapping[str, Any] | None = None, device: str | torch.device | None = None
) -> Trainer:
    """Rebuild a trainer from a checkpoint and restore its state exactly.

    Arguments:
        path: Run directory or checkpoint file.
        overrides: ``[train]`` keys to change on resume (only ``steps``,
            ``checkpoint_every`` and ``progress`` may change).
        device: Device override (default: the configuration's).

    Returns:
        The :class:`Trainer` at the checkpoint's step, writing to the checkpoint's directory.

    Raises:
        CheckpointError: on unreadable checkpoints, a forbidden override, or a checkpoint
            of a different flow architecture.
    """
    state = read_checkpoint(path)
    config = copy.deepcopy(state["config"])
    allowed = {"steps", "checkpoint_every", "progress"}
    bad = set(overrides or {}) - allowed
    if bad:
        raise CheckpointError(
            f"cannot change {', '.join(sorted('train.' + b for b in bad))} when resuming; "
            f"only {', '.join(sorted('train.' + a for a in allowed))} may change"
        )
    config.setdefault("train", {}).update(overrides or {})
    out = checkpoint_path(path).parent
    trainer = build_trainer(config, out=out, device=device, initialise=False)
    trainer.load_state_dict(state)
    return trainer
