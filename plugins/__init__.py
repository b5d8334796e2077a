"""Built-in field kinds, theories, observables, flow layers, priors and kernels (``flowplug.plugins``).

Each module listed in :data:`BUILTIN` is a plugin using only the public hook API of
:mod:`flowplug.hookspecs`; the plugin manager registers them in this order, before
any third-party plugin.
"""

#: Built-in plugin modules, in registration order.
BUILTIN: tuple[str, ...] = (
    "flowplug.plugins.fields",  # field kinds: scalar, o2, u1, su<N>
    "flowplug.plugins.theories",  # actions: phi4, wilson
    "flowplug.plugins.observables",  # plaquette, topological_charge, ...
    "flowplug.plugins.hmc",  # HMC kernel
    "flowplug.plugins.heatbath",  # heatbath and overrelaxation kernels (SU(N) Wilson)
    "flowplug.plugins.flows",  # flow layers and priors
    "flowplug.plugins.kernels",  # flow kernels: independence Metropolis, mixtures, flow HMC
)
