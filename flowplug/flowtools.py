r"""Trained flows as the samplers use them: provenance and the action, on top of :mod:`flowplug.checkpoints`.

There is one flow checkpoint format, the one ``flowplug train`` writes
(:class:`flowplug.train.Trainer`, ``<run>/checkpoint.pt``; described in
:mod:`flowplug.checkpoints`), and one loader, :func:`flowplug.checkpoints.load_flow`
(``torch.load(weights_only=True)``: nothing is unpickled), which rebuilds the flow and its
action without constructing a trainer or an optimizer. The commands ``sample``,
``resample``, ``propose`` and ``demo`` need a little more than the loader returns;
:func:`open_flow` adds it:

- the SHA-256 of the checkpoint file, recorded as ``flow_sha256`` in provenance;
- the ``[action]`` table the flow was trained for, and the action rebuilt with couplings
  overridden from the command line (``--set action.beta=...``);
- the inverse check (:func:`check_inverse`): the samplers evaluate log q of states that
  did not come from the flow through its inverse, which is only as good as the inverse
  (DESIGN.md section 4). A flow whose inverse does not undo its forward map (a badly
  trained one: ``train.lr`` far too high) is refused with :class:`InverseCheckError`
  unless the caller opts out.

Lattice and field checks against input ensembles are in
:func:`flowplug.resampling.check_compatible`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowplug.errors import CheckpointError, ConfigError, FlowplugError, InverseCheckError, InverseCheckWarning

if TYPE_CHECKING:  # torch and the flow modules are imported when a flow is opened
    import torch

    from flowplug.checkpoints import LoadedFlow
    from flowplug.flow import Flow
    from flowplug.theory import Action


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


#: Tolerances of :func:`check_inverse`, by the real dtype of the flow's field:
#: ``roundtrip`` (relative to max(1, largest |entry| of z and x)), ``log_q_abs`` (nats)
#: and ``log_q_rel`` (relative to the largest |log q|).
#:
#: Why these values (float64): healthy flows round-trip far below them. Measured on 8
#: samples, 8 layers with random networks (init_scale 1 and 5, but see ``spline`` below):
#: scalar ``affine`` / ``spline``, ``u1-ncp``, ``u1-spline`` and ``u1-multiscale``
#: round trips <= 2e-10 and log q <= 2e-10 nats; ``sun-spectral`` with 16 layers on
#: SU(3) lattices round trips up to 7e-5 (through its eigen-decompositions) and log q up
#: to 1.4e-6 nats. U(1) flows trained at ``train.lr = 10`` fail by radians and by 30 to
#: 190 nats; so does an 8-layer ``spline`` flow at init_scale 5, which contracts so hard
#: that the inverse lands on another z (4.4 off, 70 nats), rightly refused. An error of
#: 1e-3 nats in log q changes each Metropolis ratio by at most 0.2 %, below the
#: statistical error of any chain; ``log_q_rel`` keeps the bound meaningful for
#: lattices whose |log q| runs into the millions. float32 fields (no built-in layer
#: makes them: the maps and densities are float64 even with float32 networks) get
#: ten times looser bounds.
INVERSE_TOLERANCES: dict[str, dict[str, float]] = {
    "float64": {"roundtrip": 1e-3, "log_q_abs": 1e-3, "log_q_rel": 1e-8},
    "float32": {"roundtrip": 1e-2, "log_q_abs": 1e-2, "log_q_rel": 1e-5},
}


@dataclasses.dataclass(frozen=True)
class InverseCheck:
    """Result of :func:`check_inverse` (JSON-ready with :meth:`as_dict`).

    Attributes:
        passed: True when every error is finite and within its tolerance.
        latent_error: max over the batch of the field-kind distance between
            f^{-1}(f(z)) and z (angles compared modulo 2 pi; SU(N) by matrix entries).
        field_error: The same for f(f^{-1}(x)) and x, with x = f(z).
        roundtrip_tolerance: The bound both round trips must meet (``roundtrip`` of
            :data:`INVERSE_TOLERANCES` times max(1, largest |entry| of z and x)).
        log_q_error: max |log q(x) from the forward pass - ``flow.log_prob(x)``| in nats.
        log_q_tolerance: ``log_q_abs`` + ``log_q_rel`` x largest |log q|, nats.
        n_samples: Batch size of the check.
        seed: Seed of the check's own generator.
        dtype: Real dtype of the field (``"float64"``, ``"float32"``...).
        problem: Empty, or what went wrong beyond the numbers (non-finite values, an
            exception raised by the flow).
    """

    passed: bool
    latent_error: float
    field_error: float
    roundtrip_tolerance: float
    log_q_error: float
    log_q_tolerance: float
    n_samples: int
    seed: int
    dtype: str
    problem: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (for ``summary.json``)."""
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One sentence with the measured errors and the tolerances."""
        text = (
            f"round trip error {self.field_error:.3g} (f(f^-1(x)) - x) and {self.latent_error:.3g} "
            f"(f^-1(f(z)) - z) against tolerance {self.roundtrip_tolerance:.3g}; log q through the "
            f"inverse differs from the forward log q by up to {self.log_q_error:.3g} nats against "
            f"tolerance {self.log_q_tolerance:.3g} ({self.n_samples} samples, seed {self.seed})"
        )
        return f"{text}; {self.problem}" if self.problem else text


def _finite_max(t: torch.Tensor) -> float:
    """max of a tensor as a float; inf when any entry is not finite (NaN included)."""
    import torch

    t = t.detach()
    if t.numel() == 0:
        return 0.0
    if not bool(torch.isfinite(t).all()):
        return math.inf
    return float(t.max())


def check_inverse(
    flow: Any, *, n_samples: int = 8, seed: int = 0, tolerances: Mapping[str, float] | None = None
) -> InverseCheck:
    r"""Check that a flow's inverse undoes its forward map, on a small fixed-seed batch.

    Draws z ~ r with the flow's own ``sample_latent`` and a generator of its own (the
    caller's random streams are untouched), maps x = f(z) with ``forward``, and measures

    - the round trips f^{-1}(f(z)) vs z and f(f^{-1}(x)) vs x, with the distance of the
      field kind (:meth:`flowplug.theory.FieldSpace.distance`: plain for scalars,
      wrapped angle differences for U(1)/O(2), matrix entries for SU(N); plain for a
      kind :func:`flowplug.theory.field_space` does not know);
    - log q(x) = log r(z) - log|det J(z)| from the forward pass against
      ``flow.log_prob(x)``, which goes through the inverse as the samplers do for states
      that did not come from the flow.

    The flow is evaluated in eval mode without gradients and put back in its mode.

    Arguments:
        flow: A :class:`flowplug.flow.Flow`, or any object with ``field``,
            ``sample_latent(n, generator) -> (z, log_r)``, ``forward(z) -> (x, logdet)``,
            ``inverse(x) -> (z, logdet_inv)`` and ``log_prob(x) -> (B,)``.
        n_samples: Batch size (>= 1).
        seed: Seed of the check's generator (on the flow's device).
        tolerances: Keys of :data:`INVERSE_TOLERANCES` to override.

    Returns:
        :class:`InverseCheck`. Errors raised by the flow itself (``FlowplugError``,
        ``RuntimeError``, ``ValueError``) are reported in ``problem`` with
        ``passed = False``, not raised.

    Raises:
        ConfigError: on an unknown tolerance key or ``n_samples`` < 1.
    """
    import torch

    n = int(n_samples)
    if n < 1:
        raise ConfigError(f"check_inverse: n_samples must be >= 1; found {n_samples!r}")
    try:
        from flowplug.theory import field_space

        distance = field_space(getattr(flow, "field", "")).distance
    except ConfigError:  # a field kind of a plugin: plain distance

        def distance(a, b):
            return (a - b).abs().flatten(1).amax(1)

    device = getattr(flow, "device", None) or torch.device("cpu")
    gen = torch.Generator(device=device).manual_seed(int(seed))
    was_training = bool(getattr(flow, "training", False))
    if hasattr(flow, "eval"):
        flow.eval()
    problem = ""
    dtype = "float64"
    nan = math.nan
    latent_err = field_err = lq_err = nan
    scale, lq_scale = 1.0, 0.0
    try:
        with torch.no_grad():
            z, log_r = flow.sample_latent(n, gen)
            x, logdet = flow(z)
            real = x.real if x.is_complex() else x
            dtype = str(real.dtype).replace("torch.", "")
            lq_fwd = log_r.to(torch.float64) - logdet.to(torch.float64)
            z_back, _ = flow.inverse(x)
            x_back, _ = flow(z_back)
            lq_inv = flow.log_prob(x).to(torch.float64)
            latent_err = _finite_max(getattr(flow, "latent_distance", distance)(z_back, z))  # modulo G if symmetrised
            field_err = _finite_max(distance(x_back, x))
            lq_err = _finite_max((lq_fwd - lq_inv).abs())
            if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(lq_fwd).all())):
                problem = "the forward map gives non-finite values"
            elif not (bool(torch.isfinite(z_back).all()) and bool(torch.isfinite(lq_inv).all())):
                problem = "the inverse gives non-finite values"
            else:
                scale = max(1.0, float(z.abs().max()), float(x.abs().max()))
                lq_scale = float(lq_fwd.abs().max())
    except (FlowplugError, RuntimeError, ValueError) as exc:
        problem = f"the flow failed during the check: {type(exc).__name__}: {exc}"
    finally:
        if hasattr(flow, "train"):
            flow.train(was_training)
    tol = dict(INVERSE_TOLERANCES["float32" if dtype in ("float32", "float16", "bfloat16") else "float64"])
    unknown = set(tolerances or {}) - set(tol)
    if unknown:
        raise ConfigError(
            f"check_inverse: unknown tolerance(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(tol))}"
        )
    tol.update({k: float(v) for k, v in dict(tolerances or {}).items()})
    rt_tol = tol["roundtrip"] * scale
    lq_tol = tol["log_q_abs"] + tol["log_q_rel"] * lq_scale
    passed = not problem and latent_err <= rt_tol and field_err <= rt_tol and lq_err <= lq_tol
    return InverseCheck(
        passed=bool(passed),
        latent_error=latent_err,
        field_error=field_err,
        roundtrip_tolerance=rt_tol,
        log_q_error=lq_err,
        log_q_tolerance=lq_tol,
        n_samples=n,
        seed=int(seed),
        dtype=dtype,
        problem=problem,
    )


class FlowCheckpoint:
    """A trained flow, loaded by :func:`flowplug.checkpoints.load_flow`, with its provenance.

    Attributes:
        loaded: The :class:`flowplug.checkpoints.LoadedFlow`.
        path: The checkpoint file.
        sha256: Hex SHA-256 of the checkpoint file.
        flow: The :class:`flowplug.flow.Flow`, in eval mode.
        action_config: The ``[action]`` table of the training configuration.
        inverse_check: The :class:`InverseCheck` of :meth:`verify_inverse` (``None``
            until it ran).
    """

    def __init__(self, loaded: LoadedFlow, sha256: str) -> None:
        self.loaded = loaded
        assert loaded.path is not None  # load_flow records the file it read
        self.path = Path(loaded.path)
        self.sha256 = sha256
        self.flow: Flow = loaded.flow
        self.action_config: dict[str, Any] = dict(loaded.config.get("action", {}))
        self.inverse_check: InverseCheck | None = None

    def verify_inverse(self, enforce: bool = True, **options: Any) -> InverseCheck:
        """Run :func:`check_inverse` on the flow and keep the result in :attr:`inverse_check`.

        Arguments:
            enforce: Raise when the check fails; with ``False`` an
                :class:`flowplug.errors.InverseCheckWarning` is issued instead and the
                flow is used anyway.
            **options: ``n_samples``, ``seed``, ``tolerances`` of :func:`check_inverse`.

        Raises:
            InverseCheckError: if the check fails and ``enforce`` is true; the message
                names the checkpoint, the errors, the tolerances and the override.
        """
        res = check_inverse(self.flow, **options)
        self.inverse_check = res
        if not res.passed:
            what = (
                f"{self.path}: the flow's inverse does not undo its forward map: {res.describe()}; "
                "log q of configurations that did not come from the flow (resampled inputs, "
                "chain states, a production code's configuration) would be wrong"
            )
            if enforce:
                raise InverseCheckError(
                    f"{what}, so the flow is refused. Retrain it (lower train.lr, "
                    "or set train.grad_clip or train.guard), or use it anyway with "
                    "--no-check-inverse (check_inverse=False in Python)."
                )
            warnings.warn(
                f"{what}; used anyway (--no-check-inverse / check_inverse=False)", InverseCheckWarning, stacklevel=2
            )
        return res

    @property
    def field(self) -> str:
        """Field kind of the flow."""
        return self.loaded.field

    @property
    def lattice(self) -> tuple[int, ...]:
        """Lattice of the flow, x first."""
        return tuple(self.loaded.lattice)

    def action(self, override: Mapping[str, Any] | None = None) -> Action:
        """The action the flow was trained for, with non-empty ``override`` entries replacing
        keys of its ``[action]`` table.

        Warns:
            CouplingMismatchWarning: when an override changes the trained action.

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
        differ = {k: (self.action_config.get(k), v) for k, v in changes.items() if self.action_config.get(k) != v}
        if differ:
            from flowplug.errors import CouplingMismatchWarning

            said = ", ".join(f"{k} = {new} (trained at {old})" for k, (old, new) in differ.items())
            warnings.warn(
                f"{self.path}: sampling {said}: the chains are exact, but the flow proposes for the "
                "action it was trained for, so expect a low acceptance (train at this point, or start "
                "from this run with train.init_from)",
                CouplingMismatchWarning,
                stacklevel=2,
            )
        return action_from_config({"action": table})


def open_flow(
    path: str | Path, *, device: str | torch.device | None = None, check_inverse: bool = True
) -> FlowCheckpoint:
    """Load a trained flow for sampling and check its inverse (module docstring).

    The flow is read by :func:`flowplug.checkpoints.load_flow` alone: no trainer, optimizer
    or scheduler is built, and :mod:`flowplug.train` is not imported.

    The inverse check always runs (its result is ``inverse_check`` of the returned
    object, for ``summary.json``); ``check_inverse`` decides whether a failure refuses
    the flow or only warns.

    Arguments:
        path: A ``flowplug train`` run directory or its checkpoint file.
        device: Device of the flow (default CPU).
        check_inverse: Refuse a flow that fails :func:`check_inverse` (default); ``False``
            warns (:class:`flowplug.errors.InverseCheckWarning`) and returns it.

    Raises:
        CheckpointError: from :func:`flowplug.checkpoints.load_flow` (missing, unreadable or
            mismatched checkpoints); its subclass
            :class:`flowplug.errors.NonFiniteParametersError` for NaN/Inf parameters.
        InverseCheckError: if the flow fails the inverse check and ``check_inverse`` is true.
    """
    from flowplug.checkpoints import load_flow

    loaded = load_flow(path, device="cpu" if device is None else device)
    assert loaded.path is not None  # load_flow records the file it read
    ck = FlowCheckpoint(loaded, file_sha256(loaded.path))
    ck.verify_inverse(enforce=check_inverse)
    return ck


def init_flow_from(flow: Flow, source: str | Path | Flow) -> list[tuple[int, int]]:
    """Initialise ``flow``'s parameters from a trained flow (``train.init_from``).

    Two cases, tried in this order:

    1. The source has the same architecture (:attr:`Flow.spec`: field, lattice, prior,
       layers and their options): every parameter and buffer is copied. This starts a run
       at another coupling from a trained one (a curriculum in beta, arXiv:2003.06413
       Sec. IV trains at the target coupling; starting nearby shortens it).
    2. Otherwise each layer family of ``flow`` that registered a ``transfer`` function
       (:class:`flowplug.records.FlowLayerSpec`) copies what it can, e.g. ``u1-multiscale``
       from a smaller lattice (:func:`flowplug.plugins.flow_multiscale.transfer_multiscale`):
       layers it does not match keep their initialisation.

    Arguments:
        flow: The new flow (modified in place).
        source: A trained flow, or a ``flowplug train`` run directory or checkpoint file
            (read with :func:`flowplug.checkpoints.load_flow`: ``weights_only``, nothing
            is unpickled).

    Returns:
        ``(flow layer index, source layer index)`` of every layer that took parameters.

    Raises:
        CheckpointError, NonFiniteParametersError: if ``source`` cannot be read.
        ConfigError: if the field kinds differ, or no layer could take parameters (the
            message names both architectures).
    """
    from flowplug.manager import get_component

    if isinstance(source, (str, Path)):
        from flowplug.checkpoints import load_flow

        try:
            src = load_flow(source).flow
        except CheckpointError as exc:
            raise CheckpointError(
                f"train.init_from = '{source}' ({Path(source).resolve()}): {exc} "
                "(init_from takes a flowplug train run directory or its checkpoint.pt)"
            ) from None
        where = str(source)
    else:
        src, where = source, "the source flow"
    if src.field != flow.field:
        raise ConfigError(f"train.init_from: {where} is a flow of {src.field} fields; this run's field is {flow.field}")
    if src.spec == flow.spec:
        flow.load_state_dict(src.state_dict())
        return [(i, i) for i in range(len(flow.layers))]
    copied: list[tuple[int, int]] = []
    done: set[str] = set()
    for entry in (flow.spec or {}).get("layers", []):
        rec = get_component("flow_layer", entry["name"])
        if rec.name in done:
            continue
        done.add(rec.name)
        transfer = getattr(rec, "transfer", None)
        if transfer is not None:
            copied += [(int(j), int(i)) for j, i in transfer(src, flow)]
    if not copied:

        def shape(f: Flow) -> str:
            names = sorted({e["name"] for e in (f.spec or {}).get("layers", [])})
            return f"lattice {list(f.lattice)}, {len(f.layers)} layers ({', '.join(names)})"

        raise ConfigError(
            f"train.init_from: no layer of this flow ({shape(flow)}) can take parameters from {where} "
            f"({shape(src)}): the architectures differ and no layer family transfers between them "
            "(same lattice, layers and options copy everything; u1-multiscale transfers between lattices)"
        )
    return sorted(copied)
