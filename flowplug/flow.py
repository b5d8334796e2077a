r"""Normalizing flows: a prior composed with registered flow layers.

Sign convention
    A :class:`Flow` maps latent samples z ~ r (the prior) through layers
    f_1, ..., f_K to x = f_K(... f_1(z)). Every layer returns
    ``(y, log|det dy/dx|)``; the flow's ``forward`` returns ``(x, logdet)`` with
    logdet = sum_k log|det J_k| (float64, shape (B,)). The model density is

        log q(x) = log r(z) - logdet(z),        z = f^{-1}(x),

    (Albergo et al., arXiv:2101.08176, eq. 20; Rezende & Mohamed, arXiv:1505.05770).
    ``inverse(x)`` returns ``(z, logdet_inv)`` with logdet_inv = log|det dz/dx| =
    -logdet(z), so log q(x) = log r(z) + logdet_inv. Densities of gauge fields are
    relative to the product of Haar measures (angles d theta for U(1); normalised Haar
    for SU(N)), the measure in which the actions define p(x) = exp(-S(x)) / Z.

For samplers
    :meth:`Flow.sample` gives fresh proposals with their log q in one pass;
    :meth:`Flow.log_prob` gives log q(x) for states that did *not* come from the flow
    (an HMC configuration, a file), through the exact inverse. An independence
    Metropolis step with proposal x' ~ q accepts with probability
    min(1, exp([log p(x') - log q(x')] - [log p(x) - log q(x)])), all in float64
    (DESIGN.md section 4).

Path gradients
    A layer may also provide ``forward_diag(x) -> (y, logdet, log_diag, updated)`` (its
    Jacobian's diagonal and updated coordinates); when every layer does,
    :func:`path_gradient_loss` computes path gradients without inverting the flow.

Layers and priors are looked up by name in the plugin registries (hooks
``flowplug_flow_layers`` and ``flowplug_priors``); :func:`build_flow` builds a flow
from names and options, and records them in :attr:`Flow.spec` so that a checkpoint can
rebuild the same architecture with :meth:`Flow.from_spec`.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar, cast

import torch
from torch import nn

from flowplug.errors import ConfigError, ShapeError
from flowplug.records import FlowLayerSpec, PriorSpec


def default_prior(field: str) -> str:
    """Registry name of the default prior of a field kind (``normal``, ``uniform``, ``haar``).

    It is the ``prior`` of the kind's record (:class:`flowplug.records.FieldKindSpec`).

    Raises:
        ConfigError: for a field kind without a default prior (or one no plugin provides).
    """
    from flowplug.theory import field_kind

    try:
        prior = field_kind(field).prior
    except ConfigError:
        prior = ""
    if not prior:
        raise ConfigError(f"no default prior for field kind '{field}'; name one with flow.prior")
    return prior


class _PriorModule(Protocol):
    """What a flow calls on its prior (an ``nn.Module`` built by a registered factory)."""

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def log_prob(self, z: torch.Tensor) -> torch.Tensor: ...


class _LayerModule(Protocol):
    """What a flow calls on a layer besides ``layer(x) -> (y, logdet)`` (an ``nn.Module``)."""

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def forward_diag(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]: ...


def _layer_modules(layers: nn.ModuleList) -> list[_LayerModule]:
    # ModuleList yields plain nn.Module (whose other attributes the stubs type as
    # Tensor | Module); a flow's layers are registered flow layers with these methods.
    return cast("list[_LayerModule]", list(layers))


class Flow(nn.Module):
    r"""A prior and a sequence of flow layers (module docstring for the sign convention).

    Arguments:
        prior: Module with ``sample(n, generator) -> z`` and ``log_prob(z) -> (B,)``.
        layers: Modules with ``forward(x) -> (y, logdet)`` and ``inverse(y) -> (x, logdet_inv)``,
            applied in order to z.
        field: Field kind (``"scalar"``, ``"u1"``, ``"su3"``...).
        lattice: (L_0, ..., L_{d-1}).
        spec: JSON-ready description (from :func:`build_flow`) for checkpoints.

    Attributes:
        field, lattice, spec: As given.
    """

    def __init__(
        self,
        prior: nn.Module,
        layers: Sequence[nn.Module],
        *,
        field: str,
        lattice: Sequence[int],
        spec: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # registered as a submodule; typed by the methods the flow calls on it
        self.prior: _PriorModule = cast(_PriorModule, prior)
        self.layers = nn.ModuleList(layers)
        self.field = str(field)
        self.lattice = tuple(int(v) for v in lattice)
        self.spec = copy.deepcopy(dict(spec)) if spec is not None else None

    @property
    def device(self) -> torch.device:
        """Device of the flow's buffers and parameters."""
        for t in self.buffers():
            return t.device
        for t in self.parameters():
            return t.device
        return torch.device("cpu")

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Push latent z through the layers.

        Arguments:
            z: Batch in the canonical layout of :attr:`field` (DESIGN.md section 2).

        Returns:
            ``(x, logdet)``: x like z; logdet = log|det dx/dz|, shape (B,), float64.
        """
        logdet = torch.zeros(z.shape[0], dtype=torch.float64, device=z.device)
        x = z
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pull x back to the latent space through the exact inverses, last layer first.

        Returns:
            ``(z, logdet_inv)``: logdet_inv = log|det dz/dx|, shape (B,), float64.
        """
        logdet = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        z = x
        for layer in reversed(_layer_modules(self.layers)):
            z, ld = layer.inverse(z)
            logdet = logdet + ld
        return z, logdet

    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, log r(z))`` for ``n`` prior samples drawn with ``generator``."""
        z = self.prior.sample(n, generator=generator)
        return z, self.prior.log_prob(z).to(torch.float64)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n`` configurations from the flow.

        Arguments:
            n: Batch size.
            generator: Random number generator on the flow's device (reproducibility).

        Returns:
            ``(x, log_q)``: x in the canonical layout of :attr:`field`; log q(x) =
            log r(z) - logdet, shape (n,), float64. Gradients flow to the parameters
            (wrap in ``torch.no_grad()`` when sampling for a Markov chain).
        """
        z, log_r = self.sample_latent(n, generator)
        x, logdet = self(z)
        return x, log_r - logdet

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log q(x) for any configuration x (not necessarily drawn from the flow).

        Arguments:
            x: Batch in the canonical layout of :attr:`field`.

        Returns:
            Shape (B,), float64: log r(f^{-1}(x)) + log|det d f^{-1}/dx|.

        Raises:
            ShapeError: if x does not have the flow's layout.
        """
        z, logdet_inv = self.inverse(x)
        return self.prior.log_prob(z).to(torch.float64) + logdet_inv

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Flow:
        """Rebuild an (untrained) flow from :attr:`spec`; load weights with ``load_state_dict``.

        Raises:
            ConfigError: if the spec names unknown components or bad options.
        """
        layers = [(entry["name"], dict(entry.get("options", {}))) for entry in spec["layers"]]
        return build_flow_from_layers(
            spec["field"],
            spec["lattice"],
            layers,
            prior=spec.get("prior"),
            prior_options=spec.get("prior_options", {}),
            symmetrize=spec.get("symmetrize", ""),
        )


_ModuleT = TypeVar("_ModuleT", bound=nn.Module)


def place_flow(flow: _ModuleT, device: str | torch.device) -> _ModuleT:
    """Move a flow to ``device``; on a CUDA device its float32 parameters and buffers become
    float64 (its networks then compute in float64).

    Exactness needs the inverse of one configuration to see the parameters that the batched
    forward map gave it (DESIGN section 4), so a network's output for one configuration must
    not depend on its batch. On the CPU flowplug's float32 networks are arranged so
    (``flowplug.plugins.flow_nets.weight_product``). On a GPU, cuBLAS and cuDNN choose their
    kernels by the problem's shape: measured on an H200 with float32 conditioners, the inverse
    of one configuration of a batch of 16 missed its forward map by up to 1.5e-5 in log q
    (4D SU(3), TF32 off) and 0.02 with TF32 on; in float64 every example flow inverted each
    configuration to 1e-12, and training ran at 0.9-1.2 times the float32 speed side by side in
    one process (the small networks of these flows are bound by kernel launches, not
    arithmetic). The values of float32 weights are kept exactly; a checkpoint saved from the
    device holds float64 weights, which a CPU run rounds back to its float32 networks. A flow
    moved with ``flow.to("cuda")`` instead keeps float32 networks (and the batch dependence).

    Arguments:
        flow: The flow (any ``torch.nn.Module``).
        device: ``cpu``, ``cuda`` or ``cuda:N`` (a ``torch.device`` or its name).

    Returns:
        The same module, moved (and on CUDA, widened), for chaining.
    """
    dev = torch.device(device)
    flow.to(dev)
    if dev.type == "cuda":
        widen_float32(flow)
    return flow


def widen_float32(module: _ModuleT) -> _ModuleT:
    """Turn ``module``'s float32 parameters and buffers into float64 in place (the same
    ``Parameter`` objects, so an optimizer built before keeps them); what :func:`place_flow`
    does on a CUDA device. Returns the module."""
    for t in [*module.parameters(), *module.buffers()]:
        if t.dtype == torch.float32:
            t.data = t.data.to(torch.float64)
    return module


def _accepted_options(factory: Any) -> set[str] | None:
    """Keyword names ``factory`` accepts; ``None`` when it takes ``**kwargs``."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return {
        n
        for n, p in sig.parameters.items()
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    }


def make_layer(name: str, *, lattice: Sequence[int], field: str, index: int = 0, **options: Any) -> nn.Module:
    """Build one registered flow layer.

    Arguments:
        name: Registry name (``affine``, ``spline``, ``u1-ncp``, ``u1-spline``, ``sun-spectral``...).
        lattice: (L_0, ..., L_{d-1}).
        field: Field kind the flow acts on.
        index: Position in the flow (masks alternate with it).
        **options: Layer options (``hidden``, ``kernel_size``, ...).

    Raises:
        UnknownComponentError: for an unregistered name (listing the registered ones).
        ConfigError: if the layer does not act on ``field`` or on a lattice of this
            dimension, or rejects an option.
    """
    from flowplug.manager import get_component

    # the manager files only FlowLayerSpec records under "flow_layer"
    rec = cast(FlowLayerSpec, get_component("flow_layer", name))
    if rec.fields and field not in rec.fields:
        raise ConfigError(f"flow layer '{rec.name}' acts on {', '.join(rec.fields)} fields, not on '{field}'")
    if rec.dims and len(lattice) not in rec.dims:
        raise ConfigError(
            f"flow layer '{rec.name}' acts on {' or '.join(f'{d}D' for d in rec.dims)} lattices; "
            f"found lattice {list(lattice)} ({len(lattice)}D)"
        )
    accepted = _accepted_options(rec.factory)
    if accepted is not None:
        unknown = sorted(set(options) - accepted)
        if unknown:
            allowed = sorted(accepted - {"lattice", "field", "index"})
            raise ConfigError(
                f"flow layer '{rec.name}' has no option {', '.join(map(repr, unknown))}; "
                f"its options are: {', '.join(allowed)}"
            )
    try:
        return rec.factory(lattice=tuple(lattice), field=field, index=index, **options)
    except TypeError as exc:
        raise ConfigError(f"flow layer '{rec.name}': bad options {options!r}: {exc}") from None


def make_prior(name: str | None, *, lattice: Sequence[int], field: str, **options: Any) -> nn.Module:
    """Build a registered prior (default: :func:`default_prior` of ``field``).

    Raises:
        UnknownComponentError: for an unregistered name.
        ConfigError: if the prior does not produce ``field`` or rejects an option.
    """
    from flowplug.manager import get_component

    rec = cast(PriorSpec, get_component("prior", name or default_prior(field)))  # only PriorSpec records there
    if rec.fields and field not in rec.fields:
        raise ConfigError(f"prior '{rec.name}' produces {', '.join(rec.fields)} fields, not '{field}'")
    try:
        return rec.factory(lattice=tuple(lattice), field=field, **options)
    except TypeError as exc:
        raise ConfigError(f"prior '{rec.name}': bad options {options!r}: {exc}") from None


def build_flow_from_layers(
    field: str,
    lattice: Sequence[int],
    layers: Sequence[tuple[str, Mapping[str, Any]]],
    *,
    prior: str | None = None,
    prior_options: Mapping[str, Any] | None = None,
    symmetrize: str = "",
) -> Flow:
    """Build a :class:`Flow` from an explicit list of ``(layer name, options)``.

    Layer i receives ``index=i``. A non-empty ``symmetrize`` (a symmetry of the field kind,
    ``"z2"``) gives a :class:`flowplug.symmetric.SymmetrizedFlow`, recorded in the spec.
    Raises as :func:`make_layer` and :func:`make_prior`, and ConfigError for a symmetry
    the field kind does not have.
    """
    lattice = [int(v) for v in lattice]
    prior_name = prior or default_prior(field)
    prior_mod = make_prior(prior_name, lattice=lattice, field=field, **dict(prior_options or {}))
    modules, entries = [], []
    for i, (name, opts) in enumerate(layers):
        opts = dict(opts)
        modules.append(make_layer(name, lattice=lattice, field=field, index=i, **opts))
        entries.append({"name": str(name), "options": opts})
    spec = {
        "field": field,
        "lattice": lattice,
        "prior": prior_name,
        "prior_options": dict(prior_options or {}),
        "layers": entries,
    }
    flow = Flow(prior_mod, modules, field=field, lattice=lattice, spec=spec)
    if symmetrize:
        from flowplug.symmetric import symmetrize_flow

        return symmetrize_flow(flow, symmetrize)
    return flow


def build_flow(
    field: str,
    lattice: Sequence[int],
    layers: Sequence[str] | str,
    *,
    n_layers: int | None = None,
    options: Mapping[str, Any] | None = None,
    prior: str | None = None,
    prior_options: Mapping[str, Any] | None = None,
    symmetrize: str = "",
) -> Flow:
    """Build a flow from layer names, cycling through them, and shared/per-layer options.

    Arguments:
        field: Field kind (``"scalar"``, ``"u1"``, ``"su2"``, ``"su3"``...).
        lattice: (L_0, ..., L_{d-1}).
        layers: One registry name or a list of them, used in turn.
        n_layers: Total number of layers (default: ``len(layers)``).
        options: Options for the layers. Non-table entries are shared and given to every
            layer that accepts them (``hidden = [8, 8]``); a table named after a layer
            (``options["u1-ncp"] = {"n_mix": 4}``) is given to that layer only, strictly.
        prior: Prior registry name; default by field kind.
        prior_options: Options of the prior.
        symmetrize: Name of a symmetry of the field kind (``"z2"``) over which the density
            is averaged (:mod:`flowplug.symmetric`); empty: none.

    Returns:
        The flow, with :attr:`Flow.spec` set.

    Raises:
        ConfigError: on an empty layer list, a layer that does not fit the field, or an
            option no layer accepts.
        UnknownComponentError: for unregistered names.
    """
    from flowplug.manager import get_component

    names = [layers] if isinstance(layers, str) else [str(n) for n in layers]
    if not names:
        raise ConfigError("flow.layers is empty; name at least one flow layer (flowplug plugins lists them)")
    n_layers = len(names) if n_layers is None else int(n_layers)
    if n_layers < 1:
        raise ConfigError(f"flow.n_layers must be >= 1; found {n_layers}")
    options = dict(options or {})
    shared = {k: v for k, v in options.items() if not isinstance(v, Mapping)}
    tables = {k.lower(): dict(v) for k, v in options.items() if isinstance(v, Mapping)}
    used: set[str] = set()
    plan = []
    for i in range(n_layers):
        rec = get_component("flow_layer", names[i % len(names)])
        accepted = _accepted_options(rec.factory)
        opts = {k: v for k, v in shared.items() if accepted is None or k in accepted}
        used.update(opts)
        for key in (rec.name, *rec.aliases):
            opts.update(tables.get(key, {}))
        plan.append((rec.name, opts))
    unused = sorted(set(shared) - used)
    if unused:
        import difflib

        accepts: set[str] = set()
        for name in {n for n, _ in plan}:
            accepts |= set(_accepted_options(get_component("flow_layer", name).factory) or ())
        accepts -= {"lattice", "field", "index"}
        hints = [f"'{u}': did you mean '{m[0]}'?" for u in unused if (m := difflib.get_close_matches(u, accepts, 1))]
        raise ConfigError(
            f"flow option(s) {', '.join(map(repr, unused))} accepted by none of the layers "
            f"{', '.join(sorted(set(n for n, _ in plan)))}"
            + (f" ({'; '.join(hints)})" if hints else "")
            + (f"; they accept: {', '.join(sorted(accepts))}" if accepts else "")
        )
    known = {n for n, _ in plan}
    for table in tables:
        try:
            rec = get_component("flow_layer", table)
        except Exception:
            raise ConfigError(
                f"flow.options.{table}: no flow layer of that name in this flow (layers: {', '.join(sorted(known))})"
            ) from None
        if rec.name not in known:
            raise ConfigError(
                f"flow.options.{table}: layer '{rec.name}' is not used in this flow "
                f"(layers: {', '.join(sorted(known))})"
            )
    return build_flow_from_layers(field, lattice, plan, prior=prior, prior_options=prior_options, symmetrize=symmetrize)


def _defining_class(layer: nn.Module, name: str) -> type | None:
    for cls in type(layer).__mro__:
        if name in cls.__dict__:
            return cls
    return None


def has_forward_diag(layer: nn.Module) -> bool:
    """True when ``layer`` provides ``forward_diag`` for fast path gradients.

    The method must be defined by the same class as ``forward``: a subclass that
    overrides ``forward`` without ``forward_diag`` would otherwise inherit a diagonal
    that no longer describes its map, and its path gradients would be silently wrong.
    """
    if not callable(getattr(layer, "forward_diag", None)):
        return False
    return _defining_class(layer, "forward_diag") is _defining_class(layer, "forward")


def layers_without_forward_diag(flow: Flow) -> list[str]:
    """Sorted class names of the layers of ``flow`` that fail :func:`has_forward_diag`, and the
    flow's own ``path_gradient_blockers`` (a symmetrised flow: :mod:`flowplug.symmetric`)."""
    names = {type(layer).__name__ for layer in flow.layers if not has_forward_diag(layer)}
    return sorted(names | set(getattr(flow, "path_gradient_blockers", ())))


def supports_fast_path_gradient(flow: Flow) -> bool:
    """True when every layer of ``flow`` passes :func:`has_forward_diag` (see
    :func:`path_gradient_loss`; Vaitl et al., arXiv:2403.15881)."""
    return not layers_without_forward_diag(flow)


def _logdet_from_frozen(layer: Any) -> bool:
    """True when ``layer`` declares (class attribute ``logdet_from_frozen``, set by the class that
    defines ``forward``) that its log|det J| depends on the coordinates it does not update only
    (affine couplings: the sum of s(frozen sites)); :func:`path_gradient_loss` then needs one
    vector-Jacobian product per layer instead of two."""
    return bool(getattr(layer, "logdet_from_frozen", False)) and _defining_class(
        layer, "logdet_from_frozen"
    ) is _defining_class(layer, "forward")


def _grad_or_zeros(out: torch.Tensor, inp: torch.Tensor, grad_outputs: torch.Tensor | None = None) -> torch.Tensor:
    if not out.requires_grad:
        return torch.zeros_like(inp)
    if grad_outputs is None:
        out = out.sum()
    (g,) = torch.autograd.grad(out, inp, grad_outputs=grad_outputs, retain_graph=True, allow_unused=True)
    return torch.zeros_like(inp) if g is None else g


def path_gradient_loss(
    flow: Flow, z: torch.Tensor, action: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Reverse-KL loss whose gradient is the path gradient, without inverting the flow.

    The path gradient of F_q = E_z[log q(x) + S(x)], x = f_theta(z), keeps only the
    dependence through x: grad_theta = E[(grad_x log q(x) + grad_x S(x)) . dx/dtheta]
    with log q evaluated at fixed parameters (Vaitl et al., arXiv:2207.08219). The score
    g_k = grad log q_k at x_k is carried forward through the layers (Vaitl et al.,
    arXiv:2403.15881, section 3): from log q_k(f_k(x)) = log q_{k-1}(x) - log|det J_k(x)|,

        g_k = J_k^{-T} (g_{k-1} - grad_x log|det J_k(x)|),   g_0 = grad log r(z).

    Each layer's ``forward_diag(x) -> (y, logdet, log_diag, updated)`` gives y and
    logdet as ``forward`` does, the log-diagonal log dy_i/dx_i of its Jacobian (like x,
    float64) and the mask of updated coordinates (bool, shape x.shape[1:]); an updated
    y_i must depend on x only through x_i and coordinates that are not updated (true of
    coupling layers; ``tests/test_flow_layers.py`` checks it against autograd for every
    registered layer); a layer that breaks this gives silently wrong gradients. Then
    J^T = D + N^T with N non-zero only from frozen to updated coordinates, and with
    v = g_{k-1} - grad log|det J_k|:
    w = v / d on updated coordinates, w = v - (J^T c) on the others, where c is w on
    the updated coordinates and 0 elsewhere (one vector-Jacobian product). The cost is
    two vector-Jacobian products per layer on top of the usual forward and backward
    passes, instead of a pass through the (possibly iterative) inverse; one for a layer
    whose log|det J| depends on its frozen coordinates only (class attribute
    ``logdet_from_frozen = True``, e.g. affine couplings): then v = g on the updated
    coordinates and a single product gives grad log|det J| + J^T c.

    Arguments:
        flow: A flow whose layers all have ``forward_diag``
            (:func:`supports_fast_path_gradient`).
        z: Prior samples, shape (B, ...) as the flow's input, real (float64 for the
            built-in priors).
        action: Callable giving S(x) of shape (B,), differentiable in x.

    Returns:
        ``(loss, log_q, S)``: loss is a scalar whose value is the batch mean of
        log q(x) + S(x) and whose gradient with respect to the flow parameters is the
        path gradient; log_q and S have shape (B,), float64, detached.

    Raises:
        ConfigError: if a layer lacks ``forward_diag``.
    """
    missing = layers_without_forward_diag(flow)
    if missing:
        raise ConfigError(f"fast path gradients need forward_diag on every layer; missing on {', '.join(missing)}")
    z = z.detach().requires_grad_(True)
    log_r = flow.prior.log_prob(z).to(torch.float64)
    g = _grad_or_zeros(log_r, z)
    x, logdet = z, torch.zeros_like(log_r)
    for layer in _layer_modules(flow.layers):
        y, ld, log_diag, updated = layer.forward_diag(x)
        if _logdet_from_frozen(layer) and ld.requires_grad and y.requires_grad:
            # grad log|det J| vanishes on the updated coordinates, so v = g there, c is known
            # before any product, and one vector-Jacobian product gives grad log|det J| + J^T c
            c = torch.where(updated, g * torch.exp(-log_diag.detach()), torch.zeros_like(g))
            vjp = torch.autograd.grad((ld, y), x, grad_outputs=(torch.ones_like(ld), c), retain_graph=True)[0]
            g = torch.where(updated, c, g - vjp)
        else:
            v = g - _grad_or_zeros(ld, x)
            c = torch.where(updated, v * torch.exp(-log_diag.detach()), torch.zeros_like(v))
            u = _grad_or_zeros(y, x, grad_outputs=c)
            g = torch.where(updated, c, v - u)
        x, logdet = y, logdet + ld
    s = action(x).to(torch.float64)
    g = g + _grad_or_zeros(s, x)
    log_q = (log_r - logdet).detach()
    value = (log_q + s.detach()).mean()
    surrogate = (g.detach() * x).flatten(1).sum(1).mean()
    return value + surrogate - surrogate.detach(), log_q, s.detach()


def check_field(flow: Flow, x: torch.Tensor) -> None:
    """Raise :class:`ShapeError` unless x has the layout of ``flow`` (field kind and lattice)."""
    from flowplug.theory import field_space

    try:
        space = field_space(flow.field)
    except ConfigError:
        return  # a kind no plugin registers: nothing to check against
    expected = space.shape(tuple(flow.lattice), 1)[1:]
    if tuple(x.shape[1:]) != tuple(expected):
        raise ShapeError(
            f"flow for {flow.field} fields on lattice {list(flow.lattice)} expects shape "
            f"(B, {', '.join(map(str, expected))}); found {tuple(x.shape)}"
        )
