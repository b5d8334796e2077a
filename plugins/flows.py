"""Built-in flow layers and priors (hooks ``flowplug_flow_layers``, ``flowplug_priors``).

Layers (every factory takes ``lattice``, ``field``, ``index`` and its own options):

``affine``        real-NVP checkerboard coupling for scalar fields (arXiv:1904.12072);
``spline``        rational-quadratic spline checkerboard coupling for scalar fields
                  (arXiv:1906.04032);
``u1-ncp``        U(1) gauge-equivariant coupling with NCP mixtures (arXiv:2003.06413);
``u1-spline``     U(1) gauge-equivariant coupling with circular splines (arXiv:2002.02428);
``u1-multiscale`` 2D U(1) coupling on a hierarchy of block Wilson loops (arXiv:2404.10819);
``sun-spectral``  SU(N) gauge-equivariant coupling through the eigenvalues of the active
                  loops (arXiv:2008.05456);
``sun-stout``     SU(N) gauge-equivariant coupling by stout steps of the active loops with
                  learned class-function potentials (hep-lat/0311018, arXiv:2103.11965).

Priors: ``normal`` (scalar), ``uniform`` (U(1)), ``haar`` (SU(N)).
"""

from __future__ import annotations

from functools import partial

from flowplug.hookspecs import hookimpl
from flowplug.plugins.flow_gauge import SUNSpectralCoupling, U1Coupling
from flowplug.plugins.flow_multiscale import U1MultiscaleCoupling, transfer_multiscale
from flowplug.plugins.flow_phi4 import AffineCoupling, SplineCoupling
from flowplug.plugins.flow_stout import SUNStoutCoupling
from flowplug.plugins.priors import HaarPrior, NormalPrior, UniformU1Prior
from flowplug.records import FlowLayerSpec, PriorSpec


def _u1(transform: str):
    factory = partial(U1Coupling, transform=transform)
    factory.__doc__ = U1Coupling.__doc__
    return factory


@hookimpl
def flowplug_flow_layers() -> list[FlowLayerSpec]:
    """The built-in flow layers."""
    return [
        FlowLayerSpec(
            name="affine",
            description="real-NVP affine checkerboard coupling (scalar; 1904.12072)",
            factory=AffineCoupling,
            fields=("scalar",),
            aliases=("realnvp",),
        ),
        FlowLayerSpec(
            name="spline",
            description="rational-quadratic spline checkerboard coupling (scalar; 1906.04032)",
            factory=SplineCoupling,
            fields=("scalar",),
            aliases=("rqs",),
        ),
        FlowLayerSpec(
            name="u1-ncp",
            description="U(1) gauge-equivariant coupling, NCP mixtures (2003.06413)",
            factory=_u1("ncp"),
            fields=("u1",),
        ),
        FlowLayerSpec(
            name="u1-spline",
            description="U(1) gauge-equivariant coupling, circular RQ splines (2002.02428)",
            factory=_u1("spline"),
            fields=("u1",),
        ),
        FlowLayerSpec(
            name="u1-multiscale",
            description="2D U(1) coupling of block Wilson loops, coarse to fine (2404.10819)",
            factory=U1MultiscaleCoupling,
            fields=("u1",),
            dims=(2,),
            transfer=transfer_multiscale,
        ),
        FlowLayerSpec(
            name="sun-spectral",
            description="SU(N) gauge-equivariant spectral spline coupling (2008.05456)",
            factory=SUNSpectralCoupling,
            fields=("su2", "su3"),
            aliases=("su-spectral",),
        ),
        FlowLayerSpec(
            name="sun-stout",
            description="SU(N) gauge-equivariant stout-step coupling, learned potentials (2103.11965)",
            factory=SUNStoutCoupling,
            fields=("su2", "su3"),
        ),
    ]


@hookimpl
def flowplug_priors() -> list[PriorSpec]:
    """The built-in priors."""
    return [
        PriorSpec(
            name="normal",
            description="independent standard normal sites (scalar)",
            factory=NormalPrior,
            fields=("scalar",),
        ),
        PriorSpec(
            name="uniform",
            description="independent uniform U(1) link angles",
            factory=UniformU1Prior,
            fields=("u1",),
            aliases=("uniform-u1",),
        ),
        PriorSpec(
            name="haar", description="independent Haar-random SU(N) links", factory=HaarPrior, fields=("su2", "su3")
        ),
    ]
