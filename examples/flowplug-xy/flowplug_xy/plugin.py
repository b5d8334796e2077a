"""Hook implementations of flowplug-xy (registered through the ``flowplug`` entry point)."""

from flowplug import ActionSpec, KernelSpec, ObservableSpec, hookimpl
from flowplug_xy.kernel import XYMetropolis
from flowplug_xy.model import XYAction, bond_energy


@hookimpl
def flowplug_actions():
    """The XY model action, field kind ``o2``."""
    return [
        ActionSpec(
            name="xy",
            aliases=("plane-rotator",),
            description="XY (O(2)) model, S = -beta sum cos(theta_x - theta_x+mu)",
            factory=XYAction,
            fields=("o2",),
            parameters=("beta",),
        )
    ]


@hookimpl
def flowplug_observables():
    """Bond energy of the XY model."""
    return [
        ObservableSpec(
            name="xy_bond_energy",
            description="mean cos(theta_x - theta_x+mu) of the XY model",
            factory=bond_energy,
            fields=("o2",),
        )
    ]


@hookimpl
def flowplug_kernels():
    """Local (checkerboard) Metropolis sweeps of the XY model."""
    return [
        KernelSpec(
            name="xy-metropolis",
            description="checkerboard local Metropolis sweeps of the XY model",
            factory=XYMetropolis,
            fields=("o2",),
        )
    ]
