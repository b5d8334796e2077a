"""The ``train`` job: train a normalizing flow for a lattice action, with checkpoints and resume.

The trainer itself is :class:`flowplug.train.Trainer`; this job is what ``flowplug train``
does around it: :func:`run_train` builds the trainer from a configuration
(:data:`DEFAULT_CONFIG`), writes ``<out>/config.toml``, trains, evaluates the flow and
writes ``<out>/summary.json``; :func:`resume_train` continues a run from its checkpoint
(bit for bit) and does the same. Outputs in ``out``: ``checkpoint.pt`` (atomically, every
``train.checkpoint_every`` steps, at the end, and after the step in progress when Ctrl-C
stops the run), ``train_log.csv`` (one row per step), ``config.toml`` (the run's
configuration, with only the ``[action]`` keys its action takes: :func:`action_keys_only`) and
``summary.json`` with ``ess``, ``acceptance``, ``free_energy``, ``steps``,
``skipped_steps``, ``wall_time_s`` (figures from ``eval.samples`` fresh samples) and
``inverse_check`` (:func:`flowplug.flowtools.check_inverse`; a flow that fails it is
trained to the end, with an :class:`flowplug.errors.InverseCheckWarning`, because
``sample``, ``resample`` and ``propose`` would refuse it). torch runs on ``threads`` CPU
threads (default 1; :func:`flowplug.threads.job_threads`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flowplug import distributed
from flowplug.errors import FlowplugError
from flowplug.fsutil import locked_run

__all__ = [
    "DEFAULT_CONFIG",
    "OPEN_TABLES",
    "RESUME_KEYS",
    "run_train",
    "resume_train",
    "stored_config",
    "action_keys_only",
]

DEFAULT_CONFIG = """\
# flowplug train: complete default configuration (every key, with its default).
out = "flowplug-train"       # output directory (checkpoint.pt, train_log.csv, summary.json)
lattice = [8, 8]             # lattice extents L_0, ..., L_{d-1} (x first)
seed = 1                     # seeds network initialisation and all sampling
device = "auto"              # auto (cuda when available) | cpu | cuda | cuda:N
threads = 1                  # CPU threads for torch; 1 is fastest on small lattices and busy machines,
                             # 0: torch's default (one per core)

[action]                     # the target theory: p(x) = exp(-S(x)) / Z; config.toml of a run
name = "phi4"                # keeps only the keys its action takes
                             # registered action (flowplug plugins): phi4, wilson, ...
group = "u1"                 # wilson: u1 | su2 | su3
beta = 2.0                   # wilson coupling
m2 = -4.0                    # phi4: mass term (Albergo et al. convention)
lam = 8.0                    # phi4: quartic coupling

[flow]
layers = ["affine"]          # registered flow layers, used in turn (flowplug plugins)
n_layers = 16                # total number of coupling layers
prior = ""                   # empty: normal (scalar), uniform (u1), haar (su<N>)
symmetrize = ""               # a symmetry of the field and action ("z2" for phi4): sample the density
                             # averaged over it, (q(x) + q(-x)) / 2, so both broken-phase modes (2107.00734)

[flow.options]               # options for every layer that accepts them; a sub-table
hidden = [8, 8]              # named after a layer (e.g. [flow.options.u1-ncp]) holds
                             # options for that layer only (kernel_size = 3 by default)
dtype = "float32"            # network dtype; densities and the map stay float64

[train]
steps = 1000                 # total optimisation steps
batch_size = 64              # samples per step
objective = "reverse"        # reverse (free energy, self-training) | forward (max. likelihood on an ensemble)
path_gradient = false        # reverse only: path-gradient estimator (arXiv:2207.08219)
path_gradient_method = "auto"  # auto | fast (score carried forward, arXiv:2403.15881) | inverse
optimizer = "adam"           # adam | adamw
lr = 1e-3                    # learning rate
weight_decay = 0.0
betas = [0.9, 0.999]
schedule = "constant"        # constant | cosine | linear (decay to lr * lr_min_factor)
warmup_steps = 0             # linear warm-up steps
lr_min_factor = 0.0
grad_clip = 0.0              # max gradient norm; 0 = no clipping
guard = 0.0                  # reverse only: divergence guard in nats; 0 = off (see docs/flows.md)
guard_window = 25            # steps per guard window
ensemble = ""                # forward: configurations (path or glob; any readable lattice format, .pt, .h5)
ensemble_format = ""         # forward: force a file format (default: detect)
init_from = ""               # a trained run (directory or checkpoint) whose parameters start this one:
                             # everything when the architectures match (e.g. another beta), else what
                             # each layer family transfers (u1-multiscale: from a smaller lattice)
checkpoint_every = 250       # steps between checkpoints (0: only at the end)
progress = true              # progress bar with loss, ESS and acceptance

[eval]
samples = 8192               # fresh samples for the final ESS / acceptance / free energy
batch_size = 1024            # samples per forward pass
seed = 12345                 # seed of the evaluation samples
"""

#: Tables whose keys are free (layer options, an action's own couplings such as ``action.c1``
#: of ``plaquette-rectangle`` or ``action.u0`` of ``milc-symanzik``), not checked against the default.
OPEN_TABLES = ("flow.options", "action")

#: The ``[train]`` keys a resumed run may change.
RESUME_KEYS = ("steps", "checkpoint_every", "progress")


def _observables(field: str, ndim: int) -> dict[str, Callable[[Any], Any]]:
    """Observables of the final evaluation: the field kind's defaults, through the observable
    registry (:func:`flowplug.measure.default_observables`), and Q^2 next to a topological
    charge Q."""
    from flowplug.manager import registry
    from flowplug.measure import default_observables

    reg = registry("observable")
    obs: dict[str, Callable[[Any], Any]] = {}
    for name in default_observables(field, ndim):
        f = reg.get(name).factory
        obs[name] = f
        if name == "topological_charge":
            obs["topological_charge_squared"] = _squared(f)
    return obs


def _squared(f: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """x -> f(x)^2 in float64."""
    import torch

    return lambda x: f(x).to(torch.float64) ** 2


def action_keys_only(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The configuration with only the ``[action]`` keys its action takes.

    ``[action]`` of :data:`DEFAULT_CONFIG` lists the parameters of every built-in action
    (``beta``, ``group``, ``m2``, ``lam``); an action takes only those named in its
    record's ``parameters`` (:func:`flowplug.theory.action_from_config`), so a run of
    ``wilson`` keeps ``name``, ``beta`` and ``group``, and a plugin's action its own.

    Raises:
        UnknownComponentError: if ``action.name`` is not registered.
    """
    import copy

    from flowplug.manager import registry

    out = copy.deepcopy(dict(cfg))
    table = dict(out.get("action", {}))
    if "name" not in table:
        return out
    spec = registry("action").get(table["name"])
    out["action"] = {k: v for k, v in table.items() if k == "name" or k in spec.parameters}
    return out


def stored_config(run: str | Path) -> dict[str, Any]:
    """The configuration a run was started with, from its checkpoint (run directory or file).

    Raises:
        CheckpointError: if there is no readable training checkpoint.
    """
    from flowplug.train import read_checkpoint

    return dict(read_checkpoint(run)["config"])


@locked_run("train", lambda a: a["cfg"]["out"])
def run_train(cfg: Mapping[str, Any], *, force: bool = False) -> dict[str, Any]:
    """Train a flow from a configuration (:data:`DEFAULT_CONFIG`); ``out`` is locked for the run.

    Arguments:
        cfg: The effective configuration (:func:`flowplug.config.build_config` of
            :data:`DEFAULT_CONFIG` with ``open_tables=OPEN_TABLES``).
        force: Start afresh although ``out`` holds a checkpoint.

    Returns:
        The figures written to ``out/summary.json``.

    Raises:
        FlowplugError: if ``out`` holds a checkpoint and ``force`` is false, or
            ``train.init_from`` is ``out`` itself.
        ConfigError, UnknownComponentError: on invalid configurations.
        CheckpointError: if ``train.init_from`` cannot be read.
    """
    from flowplug import config as _config
    from flowplug.config import parse_toml
    from flowplug.fsutil import atomic_write
    from flowplug.theory import check_action_keys
    from flowplug.threads import job_threads
    from flowplug.train import CHECKPOINT_NAME, build_trainer

    out = Path(str(cfg["out"]))
    ckpt = out / CHECKPOINT_NAME
    if ckpt.exists() and not force:
        raise FlowplugError(
            f"{ckpt} exists: continue that run with --resume {ckpt.parent}, or start "
            "afresh with --force (or another out)"
        )
    source = str(cfg.get("train", {}).get("init_from") or "")
    if source and (Path(source).resolve() in (out.resolve(), ckpt.resolve())):
        raise FlowplugError(
            f"train.init_from = {source!r} is this run's own output directory: the new run would "
            "overwrite the flow it starts from; write to another out"
        )
    check_action_keys(cfg, parse_toml(DEFAULT_CONFIG)["action"])  # no silently dropped coupling
    cfg = action_keys_only(cfg)  # stored in config.toml and the checkpoint
    with job_threads(cfg.get("threads", 0)):
        try:
            trainer = build_trainer(cfg)
            if distributed.is_main():
                out.mkdir(parents=True, exist_ok=True)
                with atomic_write(out / "config.toml", "w") as fh:
                    fh.write(_config.dumps(cfg))
            trainer.run()
            return _finish(trainer, cfg)
        finally:
            distributed.shutdown()


def _resume_dir(run: str | Path) -> Path | None:
    """The run directory to lock on resume (``None``, unlocked, if there is no checkpoint:
    the resume then fails without creating anything)."""
    from flowplug.train import checkpoint_path

    path = checkpoint_path(run)
    return path.parent if path.exists() else None


@locked_run("train", lambda a: _resume_dir(a["run"]))
def resume_train(
    run: str | Path, *, overrides: Mapping[str, Any] | None = None, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Continue a training run from its checkpoint (bit for bit), then evaluate and summarise.

    Arguments:
        run: The run directory (or its ``checkpoint.pt``); it is locked for the run.
        overrides: ``[train]`` keys to change (only :data:`RESUME_KEYS`).
        log: Receives one-line notes (where the run resumes; nothing left to train).

    Returns:
        The figures written to ``summary.json`` in the run directory.

    Raises:
        CheckpointError: on a missing or unreadable checkpoint, or a forbidden override.
    """
    from flowplug.threads import job_threads

    overrides = dict(overrides or {})
    # a run stored before `threads` existed, or with 0, keeps torch's default
    with job_threads(stored_config(run).get("threads", 0)):
        try:
            return _resume(run, overrides, log)
        finally:
            distributed.shutdown()


def _resume(run: str | Path, overrides: dict[str, Any], log: Callable[[str], None] | None) -> dict[str, Any]:
    """The body of :func:`resume_train` (inside its lock and thread setting)."""
    from flowplug.train import resume_trainer

    trainer = resume_trainer(run, overrides=overrides)
    config = trainer.config
    config.setdefault("train", {}).update(overrides)
    if log is not None and distributed.is_main():
        log(f"resuming {run} at step {trainer.step} of {trainer.steps_total}")
        if trainer.step >= trainer.steps_total:
            log(
                f"nothing to train: the run already has {trainer.step} steps (raise train.steps to "
                "continue); evaluating"
            )
    trainer.run()
    return _finish(trainer, config)


def _finish(trainer: Any, config: Mapping[str, Any]) -> dict[str, Any]:
    """Evaluate the trained flow, check its inverse, write ``summary.json``."""
    import warnings

    from flowplug.errors import InverseCheckWarning
    from flowplug.flowtools import check_inverse
    from flowplug.jobs.output import write_job_summary
    from flowplug.train import CHECKPOINT_NAME

    if not distributed.is_main():  # rank 0 evaluates and writes
        return {"rank": distributed.rank(), "world_size": distributed.world_size()}
    ev = dict(config.get("eval", {}))
    figures = trainer.evaluate(
        int(ev.get("samples", 8192)),
        batch_size=int(ev.get("batch_size", 1024)),
        seed=int(ev.get("seed", 12345)),
        observables=_observables(trainer.flow.field, len(trainer.flow.lattice)),
    )
    # the samplers refuse a flow whose inverse is broken: say so now, not at the first `sample`
    inverse = check_inverse(trainer.flow)
    if not inverse.passed:
        warnings.warn(
            f"{trainer.out}: the trained flow's inverse does not undo its forward map "
            f"({inverse.describe()}); sample, resample and propose will refuse it "
            "(retrain with a lower train.lr or with train.guard)",
            InverseCheckWarning,
            stacklevel=1,
        )
    last = trainer.history[-1] if trainer.history else {}
    summary = {
        "ess": figures["ess"],
        "acceptance": figures["acceptance"],
        "acceptance_chain": figures["acceptance_chain"],
        "free_energy": figures["free_energy"],
        "steps": trainer.step,
        "skipped_steps": trainer.skipped,
        "rollbacks": trainer.rollbacks,
        "wall_time_s": trainer.wall_time_s,
        "steps_per_s": trainer.step / trainer.wall_time_s if trainer.wall_time_s > 0 else None,
        "eval_samples": figures["n_samples"],
        "eval_non_finite": figures["non_finite"],
        "final_loss": last.get("loss"),
        "field": trainer.flow.field,
        "lattice": list(trainer.flow.lattice),
        "action": {"name": str(config["action"]["name"]), **getattr(trainer.action, "couplings", dict)()},
        "device": str(trainer.device),
        "checkpoint": str(trainer.out / CHECKPOINT_NAME),
        "observables": {
            k: v
            for k, v in figures.items()
            if k not in ("ess", "acceptance", "acceptance_chain", "free_energy", "n_samples", "non_finite")
        },
        "inverse_check": inverse.as_dict(),
        "world_size": distributed.world_size(),
    }
    if config.get("train", {}).get("init_from"):
        summary["init_from"] = {"source": str(config["train"]["init_from"])}
        if getattr(trainer, "initialised_layers", None):  # known in the process that started the run
            summary["init_from"]["layers"] = [list(p) for p in trainer.initialised_layers]
    return write_job_summary(trainer.out, "train", summary)
