r"""Markov-chain states, the kernel interface, and the chain driver.

Kernel interface
----------------
A **kernel** is an object with

``name``
    its registry name (``"hmc"``, ...);
``init(x) -> ChainState``
    wrap configurations x (canonical layout, batch first: B independent chains) into a
    state, computing log p(x) = -S(x) and whatever the kernel caches per chain;
``step(state, generator) -> (ChainState, info)``
    one exact Markov step for every chain of the batch. ``info`` is a dict with at least
    ``accepted``: (B,) bool, or (B,) float64 in [0, 1] for a kernel of many local tests
    per step (the fraction accepted, e.g. a sweep of site updates); HMC adds ``delta_h``:
    (B,) float64. The kernel must leave p(x) = exp(-S(x)) / Z invariant (detailed balance
    or a composition of such steps).

Optionally, ``start_states(n, lattice, generator, device) -> ChainState``: exact draws of
the kernel's own proposal, with what it caches per chain (the ``nonequilibrium`` kernel:
the endpoints of forward evolutions with their works). ``flowplug sample`` starts its
chains from them instead of a hot start (:func:`flowplug.jobs.chains.run_chains`
``start``); any start leaves a chain exact, this one shortens its thermalisation.

Kernels compose: a mixture or a cycle of kernels is itself a kernel that calls the
``step`` of its parts on the same state. To make that safe, :class:`ChainState`
carries, besides x and log p, a dict ``extras`` of per-chain cached quantities valid
for the current x (a flow kernel keeps log q there). A kernel that moves x returns a
state whose ``extras`` holds only what it recomputed for the new x (:meth:`ChainState.moved`
drops stale entries chain by chain); a kernel needing a quantity that is missing
recomputes it.

Chain driver
------------
:class:`Chain` runs a kernel for N steps, measures observables after every step,
keeps the history (one (B,) row per step), shows a tqdm progress bar with acceptance
and plaquette, calls the event hook ``flowplug_after_chain_step``, and writes
checkpoints (``torch.save`` of tensors only, written atomically; read back with
``weights_only=True``). A checkpoint holds the state, the history and the generator
state, so a resumed chain is bit-for-bit the uninterrupted one.

Random streams: a :class:`Chain` may hold its chains as several contiguous groups, each
with its own generator (``Chain(kernel, [state_0, state_1], [gen_0, gen_1])``). Every
step runs the kernel on each group in turn, and measurements are taken group by group,
so each group's chains see the same batch, the same random numbers and the same
arithmetic wherever the group runs: this is how a run sharded over processes under
torchrun equals one process (:mod:`flowplug.distributed`). The history and
:attr:`Chain.state` join the groups in order. The jobs run their
chains through :func:`flowplug.jobs.chains.run_chains`, which builds a :class:`Chain`,
resumes it and connects it to the run directory's outputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from flowplug.errors import CheckpointError
from flowplug.fsutil import atomic_path


@dataclasses.dataclass
class ChainState:
    """The state of B independent Markov chains.

    Attributes:
        x: Configurations, canonical layout (batch first; DESIGN.md section 2).
        log_p: Unnormalised log density -S(x), shape (B,), float64.
        extras: Per-chain cached quantities valid for the current x, each of shape (B, ...)
            (for example ``log_q`` of a flow kernel).
    """

    x: torch.Tensor
    log_p: torch.Tensor
    extras: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    @property
    def batch(self) -> int:
        """Number of chains B."""
        return int(self.x.shape[0])

    def moved(
        self,
        accepted: torch.Tensor,
        x: torch.Tensor,
        log_p: torch.Tensor,
        extras: Mapping[str, torch.Tensor] | None = None,
    ) -> ChainState:
        """The state after a proposal (x, log_p, extras) accepted where ``accepted`` is true.

        Cached extras of the old state survive only if the new state provides them too
        (chain by chain from old or new) or if no chain moved.

        Arguments:
            accepted: (B,) bool.
            x: Proposed configurations, same shape as ``self.x``.
            log_p: Their -S, (B,) float64.
            extras: Quantities the proposing kernel computed for the proposals.

        Returns:
            A new :class:`ChainState`.
        """
        mask_x = accepted.view(-1, *([1] * (x.dim() - 1)))
        new_x = torch.where(mask_x, x, self.x)
        new_lp = torch.where(accepted, log_p, self.log_p)
        new_extras: dict[str, torch.Tensor] = {}
        any_moved = bool(accepted.any())
        extras = dict(extras or {})
        for key in set(self.extras) | set(extras):
            if key in extras and key in self.extras:
                old, new = self.extras[key], extras[key]
                m = accepted.view(-1, *([1] * (new.dim() - 1)))
                new_extras[key] = torch.where(m, new, old)
            elif key in extras and bool(accepted.all()):
                new_extras[key] = extras[key]
            elif key in self.extras and not any_moved:
                new_extras[key] = self.extras[key]
        return ChainState(new_x, new_lp, new_extras)

    def state_dict(self) -> dict[str, Any]:
        """Tensors only (for ``torch.save`` / ``torch.load(weights_only=True)``)."""
        return {"x": self.x, "log_p": self.log_p, "extras": dict(self.extras)}

    @classmethod
    def from_state_dict(cls, d: Mapping[str, Any]) -> ChainState:
        """Inverse of :meth:`state_dict`."""
        return cls(d["x"], d["log_p"], dict(d.get("extras", {})))


class Kernel:
    """Base class of Markov-chain kernels (see the module docstring for the contract)."""

    name: str = "kernel"

    def init(self, x: torch.Tensor) -> ChainState:
        """Wrap configurations into a :class:`ChainState` (computes log p)."""
        raise NotImplementedError

    def step(self, state: ChainState, generator: torch.Generator | None = None) -> tuple[ChainState, dict[str, Any]]:
        """One Markov step for every chain; returns the new state and an info dict."""
        raise NotImplementedError


Measure = Callable[[torch.Tensor], Mapping[str, torch.Tensor]]

CHECKPOINT_VERSION = 1

#: Per-chain entries of a step's ``info`` that :class:`Chain` records in its history besides
#: ``accepted`` (and ``accepted.<label>``): HMC's dH, a non-equilibrium proposal's work, the CG
#: iterations of a fermion step. They are bookkeeping, not observables
#: (:data:`flowplug.jobs.summary.NON_OBSERVABLES`).
KERNEL_INFO_RECORDED = ("delta_h", "work_proposal", "cg_iterations")


class Chain:
    """Drives a kernel: steps, measurements, history, progress bar, events, checkpoints.

    Arguments:
        kernel: The kernel (module docstring).
        state: Initial :class:`ChainState` (from ``kernel.init(x)``), or one per random
            stream (contiguous groups of chains, module docstring).
        generator: The random generator the kernel draws from (its state is
            checkpointed), or one per random stream.
        measure: Callable x -> {name: (B,) tensor}, evaluated after every step (per stream).
        kernel_name: Name reported to the event hook (default ``kernel.name``).
        run_id: Opaque string stored in checkpoints; :meth:`load` refuses a checkpoint
            with a different one (a resume must continue the same run).
        stream_ids: Global indices of the streams (stored in checkpoints, so that a
            process resumes only the streams it ran); default 0, 1, ...

    Attributes:
        step_count: Steps done so far (over the whole run, across resumes).
        history: name -> list of (B,) float64 tensors, one per step, including
            ``accepted`` (as 0/1) and, if the kernel reports them, ``delta_h``, ``work_proposal``,
            ``cg_iterations`` (:class:`flowplug.jobs.hmc.CGCounting`) and
            ``accepted.<label>`` (acceptance of the part ``label`` of a composed kernel;
            NaN for chains a mixture did not give to that part in that step). The rows of
            the steps since the history was last read stay on the chain's device;
            :meth:`history_tensors` moves them to the CPU (read the history through it).
        generators: One generator per stream.

    Raises:
        ValueError: if the numbers of states, generators and stream ids differ.
    """

    def __init__(
        self,
        kernel: Any,
        state: ChainState | Sequence[ChainState],
        generator: torch.Generator | Sequence[torch.Generator],
        *,
        measure: Measure | None = None,
        kernel_name: str | None = None,
        run_id: str = "",
        stream_ids: Sequence[int] | None = None,
    ) -> None:
        self.kernel = kernel
        self.streams: list[ChainState] = [state] if isinstance(state, ChainState) else list(state)
        self.generators: list[torch.Generator] = (
            [generator] if isinstance(generator, torch.Generator) else list(generator)
        )
        self.stream_ids = list(range(len(self.streams))) if stream_ids is None else [int(i) for i in stream_ids]
        if not self.streams or len(self.generators) != len(self.streams) or len(self.stream_ids) != len(self.streams):
            raise ValueError(
                f"Chain: one generator and one id per stream; found {len(self.streams)} states, "
                f"{len(self.generators)} generators, {len(self.stream_ids)} ids"
            )
        self.measure = measure
        self.kernel_name = kernel_name or getattr(kernel, "name", "kernel")
        self.run_id = run_id
        self.step_count = 0
        self.history: dict[str, list[torch.Tensor]] = {}

    @property
    def generator(self) -> torch.Generator:
        """The generator of the first (with one stream: the only) stream."""
        return self.generators[0]

    @property
    def sizes(self) -> list[int]:
        """Number of chains of each stream."""
        return [s.batch for s in self.streams]

    @property
    def state(self) -> ChainState:
        """All chains as one :class:`ChainState` (streams joined in order; of the cached
        extras, those every stream holds)."""
        if len(self.streams) == 1:
            return self.streams[0]
        keys = set.intersection(*(set(s.extras) for s in self.streams))
        return ChainState(
            torch.cat([s.x for s in self.streams]),
            torch.cat([s.log_p for s in self.streams]),
            {k: torch.cat([s.extras[k] for s in self.streams]) for k in sorted(keys)},
        )

    @state.setter
    def state(self, value: ChainState) -> None:
        if len(self.streams) == 1:
            self.streams = [value]
            return
        bounds, start = [], 0
        for n in self.sizes:
            bounds.append(slice(start, start + n))
            start += n
        self.streams = [
            ChainState(value.x[b], value.log_p[b], {k: v[b] for k, v in value.extras.items()}) for b in bounds
        ]

    def _step(self) -> dict[str, Any]:
        """One kernel step of every stream; the info of the streams joined chain-wise
        (entries that are not per chain are the first stream's)."""
        if len(self.streams) == 1:
            self.streams[0], info = self.kernel.step(self.streams[0], self.generators[0])
            return dict(info)
        infos = []
        for i, g in enumerate(self.generators):
            self.streams[i], part = self.kernel.step(self.streams[i], g)
            infos.append(dict(part))
        merged = dict(infos[0])
        for key in infos[0]:
            values = [inf.get(key) for inf in infos]
            if all(
                isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == s.batch
                for v, s in zip(values, self.streams, strict=True)
            ):
                merged[key] = torch.cat(values)  # type: ignore[arg-type]
        return merged

    def _measure(self) -> dict[str, torch.Tensor]:
        """The observables of every chain, measured stream by stream."""
        assert self.measure is not None
        if len(self.streams) == 1:
            return {k: v.detach() for k, v in self.measure(self.streams[0].x).items()}
        parts = [self.measure(s.x) for s in self.streams]
        return {k: torch.cat([p[k].detach() for p in parts]) for k in parts[0]}

    # ------------------------------------------------------------------ running

    def _record(self, name: str, value: torch.Tensor) -> None:
        # rows stay on the chain's device until the history is read (_flush): no copy to the
        # host, and so no wait for the device, at every step
        row = value.detach().to(torch.float64).reshape(-1)
        accepted = self.history.get("accepted")  # recorded first at every step
        earlier = len(accepted) - 1 if name not in self.history and accepted else 0
        if earlier > 0:
            # an entry first reported after a resume from a checkpoint of an earlier version
            # (cg_iterations): NaN for the steps before that the history holds, so that every
            # entry has a row per step (none when the history was cleared, e.g. after
            # thermalisation)
            self.history[name] = [torch.full_like(row, torch.nan) for _ in range(earlier)]
        self.history.setdefault(name, []).append(row)

    def run(
        self,
        n_steps: int,
        *,
        progress: bool = False,
        checkpoint_every: int = 0,
        on_checkpoint: Callable[[Chain], None] | None = None,
        on_step: Callable[[Chain, dict[str, Any]], None] | None = None,
        hooks: Any = None,
        desc: str = "",
    ) -> Chain:
        """Advance every chain by ``n_steps`` steps.

        Arguments:
            n_steps: Number of kernel steps.
            progress: Show a tqdm bar with running acceptance and plaquette (if measured).
            checkpoint_every: Call ``on_checkpoint(self)`` every this many steps (of the
                whole run) and after the last step; 0 only after the last.
            on_checkpoint: Writes checkpoints / ensemble files (see :meth:`save`).
            on_step: Called as ``on_step(self, info)`` after each step (info includes the
                measurements).
            hooks: The plugin manager (``get_plugin_manager()``, whose ``notify`` isolates
                failing monitors) or any object with a ``flowplug_after_chain_step``
                method; if given, that event is sent after each step.
            desc: Progress-bar label.

        Returns:
            ``self``.
        """
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_steps, desc=desc or self.kernel_name, leave=True, dynamic_ncols=True)
        n_acc = 0.0
        try:
            for i in range(n_steps):
                info = self._step()
                acc = info["accepted"]
                self._record("accepted", acc.to(torch.float64))
                for key in KERNEL_INFO_RECORDED:
                    if key in info:
                        self._record(key, info[key])
                for key, value in info.items():  # parts of composed kernels: accepted.<label>
                    if key.startswith("accepted.") and isinstance(value, torch.Tensor):
                        self._record(key, value.to(torch.float64))
                if self.measure is not None:
                    meas = self._measure()
                    for k, v in meas.items():
                        self._record(k, v)
                    info["observables"] = meas
                step = self.step_count
                self.step_count += 1
                if hooks is not None:
                    if hasattr(hooks, "notify"):
                        hooks.notify("flowplug_after_chain_step", step=step, kernel=self.kernel_name, info=info)
                    else:
                        hooks.flowplug_after_chain_step(step=step, kernel=self.kernel_name, info=info)
                if on_step is not None:
                    on_step(self, info)
                if bar is not None:  # (reads the device: only with a progress bar)
                    n_acc += float(acc.to(torch.float64).mean())
                    post = {"acc": f"{n_acc / (i + 1):.3f}"}
                    if "plaquette" in info.get("observables", {}):
                        post["plaq"] = f"{float(info['observables']['plaquette'].mean()):.5f}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                last = i == n_steps - 1
                if on_checkpoint is not None and (
                    last or (checkpoint_every and self.step_count % checkpoint_every == 0)
                ):
                    on_checkpoint(self)
        finally:
            if bar is not None:
                bar.close()
        return self

    def history_tensors(self) -> dict[str, torch.Tensor]:
        """History as name -> (T, B) float64 tensors: layout (steps, chains).

        Row t holds the B chains' values after the (t+1)-th recorded step (T rows); the datasets of
        ``measurements.h5`` have the same layout (attribute ``axes`` = ``"steps,chains"``).
        :mod:`flowplug.stats` needs the step axis said: ``gamma_method(h, step_axis=0)``.
        """
        self._flush()
        return {k: torch.stack(v) for k, v in self.history.items() if v}

    def _flush(self) -> None:
        """Move the rows recorded on the chain's device to the CPU, one copy per entry: the rows
        since the history was last read trail every list (whatever was cleared or restored in
        between)."""
        for rows in self.history.values():
            k = len(rows)
            while k and rows[k - 1].device.type != "cpu":
                k -= 1
            if k < len(rows):
                rows[k:] = list(torch.stack(rows[k:]).cpu().unbind(0))

    # -------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the chain exactly: tensors, ints and strings only.

        With one stream (numbered 0): ``state`` and ``rng``. Otherwise ``streams`` holds
        each stream's ``state`` and ``rng`` and ``stream_ids`` their global indices."""
        d: dict[str, Any] = {
            "version": CHECKPOINT_VERSION,
            "run_id": self.run_id,
            "kernel": self.kernel_name,
            "step": self.step_count,
            "history": self.history_tensors(),
        }
        if len(self.streams) == 1 and self.stream_ids == [0]:
            d.update(state=self.streams[0].state_dict(), rng=self.generators[0].get_state())
        else:
            d["streams"] = [
                {"state": s.state_dict(), "rng": g.get_state()}
                for s, g in zip(self.streams, self.generators, strict=True)
            ]
            d["stream_ids"] = list(self.stream_ids)
        return d

    def save(self, path: str | Path) -> Path:
        """Write a checkpoint atomically (temporary file, then rename)."""
        path = Path(path)
        with atomic_path(path) as tmp:
            torch.save(self.state_dict(), tmp)
        return path

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`.

        Raises:
            CheckpointError: on a version or run-id mismatch, or a batch/shape mismatch.
        """
        if d.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(
                f"checkpoint version {d.get('version')!r} is not supported (expected {CHECKPOINT_VERSION})"
            )
        if self.run_id and d.get("run_id") != self.run_id:
            raise CheckpointError(
                "checkpoint belongs to a different run: its configuration "
                f"fingerprint is {d.get('run_id')!r}, this run's is {self.run_id!r} "
                "(resume with the same configuration, or start a new --out)"
            )
        ids = [int(i) for i in d.get("stream_ids", [0])]
        if ids != self.stream_ids:
            raise CheckpointError(
                f"checkpoint holds the random streams {ids}, this process runs {self.stream_ids}: "
                "resume with the settings and the number of processes (torchrun --nproc_per_node) "
                "that wrote it"
            )
        saved = d["streams"] if "streams" in d else [{"state": d["state"], "rng": d["rng"]}]
        restored = []
        for part, mine in zip(saved, self.streams, strict=True):
            state = ChainState.from_state_dict(part["state"])
            if state.x.shape != mine.x.shape:
                raise CheckpointError(
                    f"checkpoint holds configurations of shape {tuple(state.x.shape)}, "
                    f"this run expects {tuple(mine.x.shape)}"
                )
            restored.append(
                ChainState(
                    state.x.to(mine.x.device),
                    state.log_p.to(mine.log_p.device),
                    {k: v.to(mine.x.device) for k, v in state.extras.items()},
                )
            )
        self.streams = restored
        for part, g in zip(saved, self.generators, strict=True):
            g.set_state(part["rng"])
        self.step_count = int(d["step"])
        self.history = {k: list(v.unbind(0)) for k, v in d["history"].items()}

    def load(self, path: str | Path) -> None:
        """Restore from a checkpoint file (``torch.load(weights_only=True)``; nothing is unpickled).

        Raises:
            CheckpointError: if the file is missing, unreadable, or from another run.
        """
        path = Path(path)
        d = read_checkpoint(path)
        if not isinstance(d, Mapping):
            raise CheckpointError(f"{path}: not a flowplug chain checkpoint")
        try:
            self.load_state_dict(d)
        except KeyError as exc:
            raise CheckpointError(f"{path}: checkpoint lacks the entry {exc}") from None


def read_checkpoint(path: str | Path) -> Any:
    """The contents of a checkpoint file, read with ``torch.load(weights_only=True)`` onto the
    CPU (nothing is unpickled).

    Raises:
        CheckpointError: if the file is missing (``run without --resume``) or unreadable.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no checkpoint to resume from (run without --resume)") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable flowplug checkpoint: {exc}") from None
