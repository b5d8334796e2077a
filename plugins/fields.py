r"""Built-in field kinds (hook ``flowplug_field_kinds``): ``scalar``, ``o2``, ``u1``, ``su<N>``.

Each record names a kind, the :class:`flowplug.theory.FieldSpace` its fields live on
(canonical layouts of DESIGN.md section 2), whether the field lives on the links, the
observables measured on it by default and the default flow prior. The SU(N) kinds are
one family, ``su``: every name ``su<N>`` (su2, su3, su4...) is a kind, its space
``SUNSpace(n=N)`` (N >= 2).

Default observables (a run's ``observables = []``) and default flow priors:

* ``scalar``: magnetization, abs_magnetization, chi_2, ising_energy; prior ``normal``;
  symmetry ``z2`` (phi -> -phi, :func:`negate`; ``flow.symmetrize``, :mod:`flowplug.symmetric`);
* ``o2``: none built in (the XY plugin brings its own); no default prior;
* ``u1``: plaquette, topological_charge (2D lattices only); prior ``uniform``;
* ``su<N>``: plaquette, topological_charge (4D lattices only); prior ``haar``.

The topological charge is kept where :func:`flowplug.plugins.observables.topological_charge`
defines it: the geometric charge of 2D U(1), the clover charge of 4D SU(N).

This module uses only the public hook API, exactly as a third-party plugin would.
"""

from __future__ import annotations

from functools import partial

import torch

from flowplug.hookspecs import hookimpl
from flowplug.records import FieldKindSpec
from flowplug.theory import AngleSpace, EuclideanSpace, SUNSpace


def negate(phi: torch.Tensor) -> torch.Tensor:
    """phi -> -phi, the Z2 symmetry of a real scalar field (same shape and dtype; an
    involution with |det| = 1), the ``z2`` symmetry of the ``scalar`` kind."""
    return -phi


SCALAR_OBSERVABLES = ("magnetization", "abs_magnetization", "chi_2", "ising_energy")
GAUGE_OBSERVABLES = ("plaquette", "topological_charge")


@hookimpl
def flowplug_field_kinds() -> list[FieldKindSpec]:
    """The built-in field kinds."""
    return [
        FieldKindSpec(
            name="scalar",
            description="real scalar field phi, (B, L...) float64",
            factory=EuclideanSpace,
            observables=SCALAR_OBSERVABLES,
            prior="normal",
            symmetries={"z2": (negate,)},
        ),
        FieldKindSpec(
            name="o2",
            description="O(2) spin angles per site, (B, L...) float64 in (-pi, pi]",
            factory=partial(AngleSpace, "o2", links=False),
        ),
        FieldKindSpec(
            name="u1",
            description="U(1) link angles, (B, d, L...) float64 in (-pi, pi]",
            factory=partial(AngleSpace, "u1", links=True),
            gauge=True,
            observables=GAUGE_OBSERVABLES,
            observable_dims={"topological_charge": (2,)},
            prior="uniform",
        ),
        FieldKindSpec(
            name="su",
            description="SU(N) links su<N>, N >= 2, (B, d, L..., N, N) complex128",
            factory=SUNSpace,
            pattern=r"su(?P<n>\d+)",
            examples=("su2", "su3"),
            gauge=True,
            observables=GAUGE_OBSERVABLES,
            observable_dims={"topological_charge": (4,)},
            prior="haar",
        ),
    ]
