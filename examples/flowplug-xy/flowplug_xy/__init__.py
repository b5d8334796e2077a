"""flowplug-xy: the XY model as an out-of-tree flowplug plugin (see ``plugin.py``)."""

from flowplug_xy.model import XYAction, bond_energy

__all__ = ["XYAction", "bond_energy"]
__version__ = "0.1.0"
