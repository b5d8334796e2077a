"""flowplug-xy: the XY model as an out-of-tree flowplug plugin (see ``plugin.py``)."""

from flowplug_xy.kernel import XYMetropolis
from flowplug_xy.model import XYAction, bond_energy

__all__ = ["XYAction", "XYMetropolis", "bond_energy"]
try:
    from importlib.metadata import version as _version

    __version__ = _version("flowplug-xy")
except Exception:  # pragma: no cover - not installed
    __version__ = "0+unknown"
