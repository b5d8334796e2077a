"""Hook specifications of flowplug (pluggy project name ``flowplug``).

This module is the whole plugin contract. A plugin is any module or object with
functions decorated by :data:`hookimpl` whose names match the specifications below.
Built-in plugins (``flowplug.plugins``, ``flowplug.adapters``, ``flowplug.cli``) use
exactly this API; third-party packages expose a plugin module through the entry-point
group ``flowplug``::

    # pyproject.toml of a third-party package
    [project.entry-points.flowplug]
    xy = "flowplug_xy.plugin"

There are two families of hooks:

* **Component hooks** (``flowplug_field_kinds``, ``flowplug_actions``,
  ``flowplug_flow_layers``, ``flowplug_priors``, ``flowplug_kernels``,
  ``flowplug_file_formats``, ``flowplug_observables``, ``flowplug_dirac_operators``,
  ``flowplug_pseudofermion_models``, ``flowplug_commands``) take no
  arguments and return an iterable of frozen records from :mod:`flowplug.records`. The
  manager files them into typed registries; a name given twice is an error naming both
  providers.
* **Event hooks** (``flowplug_after_chain_step``, ``flowplug_after_train_step``,
  ``flowplug_checkpoint_written``, ``flowplug_run_finished``) are called by the
  drivers; monitors and loggers implement them. Their return values are ignored and
  they must not modify their arguments.

The layout of the model is pytest's ``hookspec.py`` (one module, every hook
documented with an example); ``tests/test_hookspecs.py`` checks that every hook has a
docstring with an example and a test.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pluggy

from flowplug.records import (
    ActionSpec,
    CommandSpec,
    Component,
    DiracOperatorSpec,
    FieldKindSpec,
    FileFormatSpec,
    FlowLayerSpec,
    KernelSpec,
    ObservableSpec,
    PriorSpec,
    PseudofermionModelSpec,
)

PROJECT = "flowplug"

#: Decorator marking a hook specification (used in this module only).
hookspec = pluggy.HookspecMarker(PROJECT)
#: Decorator marking a hook implementation, for plugins: ``@hookimpl def flowplug_actions(): ...``
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------- components


@hookspec
def flowplug_field_kinds() -> Iterable[FieldKindSpec]:
    """Return the field kinds (the manifolds lattice fields live on) this plugin provides.

    A field kind is what an action's ``field`` and a record's ``fields`` name. Its
    factory builds a :class:`flowplug.theory.FieldSpace` (canonical shape, cold/hot
    starts, momenta, kinetic energy, update; what HMC moves on), which
    :func:`flowplug.theory.field_space` finds by kind; the record also says whether the
    field lives on the links (``gauge``), what is measured on it by default
    (``observables``, ``observable_dims``) and the default flow prior (``prior``).
    A record with a ``pattern`` stands for a family of kinds (``su`` for su2, su3...).
    The built-ins ``scalar``, ``o2``, ``u1`` and ``su<N>`` come from
    ``flowplug.plugins.fields``.

    Example::

        from flowplug import hookimpl, FieldKindSpec
        from flowplug.theory import EuclideanSpace

        class VectorSpace(EuclideanSpace):            # N real components per site
            def __init__(self, n):
                self.n, self.kind = n, f"vec{n}"
            def shape(self, lattice, batch):
                return (batch, *lattice, self.n)
            def lattice_of(self, x):
                return tuple(x.shape[1:-1])

        @hookimpl
        def flowplug_field_kinds():
            return [FieldKindSpec(name="vec", description="N-component real field",
                                  factory=VectorSpace, pattern=r"vec(?P<n>\\d+)",
                                  examples=("vec2", "vec3"), observables=("vec_norm",))]
    """


@hookspec
def flowplug_actions() -> Iterable[ActionSpec]:
    """Return the lattice actions this plugin provides.

    Example::

        from flowplug import hookimpl, ActionSpec

        @hookimpl
        def flowplug_actions():
            return [ActionSpec(name="xy", description="2D XY model",
                               factory=XYAction, fields=("o2",), parameters=("beta",))]
    """


@hookspec
def flowplug_flow_layers() -> Iterable[FlowLayerSpec]:
    """Return the flow layers this plugin provides.

    Each factory builds a ``torch.nn.Module`` whose ``forward(x)`` returns
    ``(y, logdet)`` with ``logdet`` of shape (B,) float64, and whose ``inverse(y)``
    returns ``(x, logdet_inverse)``.

    Example::

        @hookimpl
        def flowplug_flow_layers():
            return [FlowLayerSpec(name="affine", description="real-NVP coupling",
                                  factory=AffineCoupling, fields=("scalar",))]
    """


@hookspec
def flowplug_priors() -> Iterable[PriorSpec]:
    """Return the prior (base) distributions of flows this plugin provides.

    Example::

        @hookimpl
        def flowplug_priors():
            return [PriorSpec(name="normal", description="standard normal",
                              factory=NormalPrior, fields=("scalar",))]
    """


@hookspec
def flowplug_kernels() -> Iterable[KernelSpec]:
    """Return the Markov-chain kernels (HMC, independence Metropolis, ...) provided.

    Example::

        @hookimpl
        def flowplug_kernels():
            return [KernelSpec(name="hmc", description="hybrid Monte Carlo",
                               factory=HMC, aliases=("hybrid-monte-carlo",))]
    """


@hookspec
def flowplug_file_formats() -> Iterable[FileFormatSpec]:
    """Return the lattice file formats this plugin reads and/or writes.

    Example::

        @hookimpl
        def flowplug_file_formats():
            return [FileFormatSpec(name="nersc", description="NERSC archive",
                                   factory=NerscFormat, extensions=("nersc",),
                                   writable=True)]
    """


@hookspec
def flowplug_observables() -> Iterable[ObservableSpec]:
    """Return the observables this plugin provides.

    Example::

        @hookimpl
        def flowplug_observables():
            return [ObservableSpec(name="magnetization", description="sum_x phi_x / V",
                                   factory=magnetization, fields=("scalar",))]
    """


@hookspec
def flowplug_dirac_operators() -> Iterable[DiracOperatorSpec]:
    """Return the lattice Dirac operators this plugin provides.

    ``factory(**parameters)`` builds the operator; fermionic actions and observables find
    it by name in the registry ``dirac_operator``. The built-in ``wilson`` operator
    (:mod:`flowplug.plugins.dirac`) documents the methods they use: ``apply(links, psi)``,
    ``apply_dagger``, ``solve``/``solve_normal`` (conjugate gradient with a report),
    ``logdet`` (dense, small lattices) and ``derivative`` (for forces).

    Example::

        from flowplug import hookimpl, DiracOperatorSpec

        @hookimpl
        def flowplug_dirac_operators():
            return [DiracOperatorSpec(name="twisted-mass", description="Wilson twisted mass",
                                      factory=TwistedMass, fields=("su3",),
                                      parameters=("kappa", "mu"), dims=(4,))]
    """


@hookspec
def flowplug_pseudofermion_models() -> Iterable[PseudofermionModelSpec]:
    """Return the pseudofermion models r(phi | U) this plugin provides.

    ``factory(operator, **options)`` builds the model for a Dirac operator; the fermion flow
    schemes (``pseudo-marginal``, ``fermion-joint``; arXiv:2106.05934, Fig. 1) take it by
    name (kernel option ``pseudofermion``, its options in ``pseudofermion_options``). The
    model needs ``sample(x, k, generator) -> (phi, log_r)`` and ``log_prob(x, phi)``, with
    log r a normalised density on C^n in float64
    (:class:`flowplug.plugins.fermion_schemes.PseudofermionModel`).

    Example::

        from flowplug import hookimpl, PseudofermionModelSpec

        @hookimpl
        def flowplug_pseudofermion_models():
            return [PseudofermionModelSpec(name="even-odd-gaussian", description="...",
                                           factory=EvenOddGaussian, parameters=("scale",))]
    """


@hookspec
def flowplug_commands() -> Iterable[CommandSpec]:
    """Return ``flowplug`` subcommands this plugin adds to the command line.

    Example::

        def add_arguments(parser):
            parser.add_argument("--json", action="store_true")

        def run(args):
            print("hello")
            return 0

        @hookimpl
        def flowplug_commands():
            return [CommandSpec(name="hello", description="say hello",
                                factory=add_arguments, run=run)]
    """


# ------------------------------------------------------------------------------ events


@hookspec
def flowplug_after_chain_step(step: int, kernel: str, info: Mapping[str, Any]) -> None:
    """Called after every Markov-chain step (one trajectory or one proposal) of a driver.

    Arguments:
        step: Index of the step just completed, counting from 0 over the whole run.
        kernel: Registry name of the kernel that made the step.
        info: Read-only figures of the step, for instance ``accepted`` (B,) bool,
            ``delta_h`` (B,) float64 and measured observables.

    Example::

        @hookimpl
        def flowplug_after_chain_step(step, kernel, info):
            if step % 100 == 0:
                print(step, kernel, float(info["accepted"].float().mean()))
    """


@hookspec
def flowplug_after_train_step(step: int, metrics: Mapping[str, float]) -> None:
    """Called after every training step of a flow.

    Arguments:
        step: Index of the step just completed, counting from 0.
        metrics: Figures of the step: ``loss``, ``free_energy``, ``ess``, ``skipped``...

    Example::

        @hookimpl
        def flowplug_after_train_step(step, metrics):
            wandb.log(dict(metrics), step=step)
    """


@hookspec
def flowplug_checkpoint_written(path: str, step: int, what: str) -> None:
    """Called after a checkpoint file has been written (atomically) to ``path``.

    Arguments:
        path: The checkpoint file.
        step: Training step or chain step the checkpoint holds.
        what: ``"train"``, ``"hmc"``, ``"chain"``... the driver that wrote it.

    Example::

        @hookimpl
        def flowplug_checkpoint_written(path, step, what):
            shutil.copy(path, "/backup/")
    """


@hookspec
def flowplug_run_finished(command: str, out: str, summary: Mapping[str, Any]) -> None:
    """Called when a CLI command has written ``<out>/summary.json``.

    Arguments:
        command: Subcommand name (``hmc``, ``train``, ...).
        out: Output directory.
        summary: The figures written to ``summary.json``.

    Example::

        @hookimpl
        def flowplug_run_finished(command, out, summary):
            print(f"{command} done: acceptance {summary.get('acceptance')}")
    """


#: Component hook name -> record type it must return.
COMPONENT_HOOKS: dict[str, type[Component]] = {
    "flowplug_field_kinds": FieldKindSpec,
    "flowplug_actions": ActionSpec,
    "flowplug_flow_layers": FlowLayerSpec,
    "flowplug_priors": PriorSpec,
    "flowplug_kernels": KernelSpec,
    "flowplug_file_formats": FileFormatSpec,
    "flowplug_observables": ObservableSpec,
    "flowplug_dirac_operators": DiracOperatorSpec,
    "flowplug_pseudofermion_models": PseudofermionModelSpec,
    "flowplug_commands": CommandSpec,
}

#: Event hook names.
EVENT_HOOKS: tuple[str, ...] = (
    "flowplug_after_chain_step",
    "flowplug_after_train_step",
    "flowplug_checkpoint_written",
    "flowplug_run_finished",
)
