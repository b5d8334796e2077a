"""Built-in lattice file formats (``flowplug.adapters``).

Each module listed in :data:`BUILTIN` is a plugin answering ``flowplug_file_formats``;
the plugin manager registers them in this order, after ``flowplug.plugins``. Helper
modules (``action_metadata``, ``checksums``, ``common``) are not plugins.
"""

#: Built-in file-format plugin modules, in registration order.
BUILTIN: tuple[str, ...] = (
    "flowplug.adapters.lime",
    "flowplug.adapters.nersc",
    "flowplug.adapters.milc",
    "flowplug.adapters.openqcd",
    "flowplug.adapters.hdf5",
    "flowplug.adapters.lyncs",
)
