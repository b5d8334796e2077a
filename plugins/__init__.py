"""Built-in field kinds, theories, observables, flow layers, priors, kernels and Dirac operators
(``flowplug.plugins``).

Each module listed in :data:`BUILTIN` is a plugin using only the public hook API of
:mod:`flowplug.hookspecs`; the plugin manager registers them in this order, before
any third-party plugin.
"""

#: Built-in plugin modules, in registration order.
BUILTIN: tuple[str, ...] = (
    "flowplug.plugins.fields",  # field kinds: scalar, o2, u1, su<N>
    "flowplug.plugins.theories",  # actions: phi4, wilson
    "flowplug.plugins.gauge_actions",  # improved gauge actions: symanzik, iwasaki, dbw2, milc-symanzik, ...
    "flowplug.plugins.observables",  # plaquette, topological_charge, ...
    "flowplug.plugins.hmc",  # HMC kernel
    "flowplug.plugins.heatbath",  # heatbath and overrelaxation kernels (SU(N) Wilson)
    "flowplug.plugins.flows",  # flow layers and priors
    "flowplug.plugins.kernels",  # flow kernels: independence Metropolis, mixtures, flow HMC
    "flowplug.plugins.l2hmc",  # L2HMC: trainable generalised leapfrog (2D U(1))
    "flowplug.plugins.nonequilibrium",  # non-equilibrium (Jarzynski) proposals / stochastic normalizing flows
    "flowplug.plugins.dirac",  # Dirac operators: wilson
    "flowplug.plugins.fermion_actions",  # schwinger(-exact), wilson-nf2(-exact); condensate, pion
    "flowplug.plugins.fermion_schemes",  # kernels: exact-marginal, pseudo-marginal, fermion-gibbs, fermion-joint
    "flowplug.plugins.pseudofermion_models",  # pseudofermion models: eo-ilu, conditional (trained)
    "flowplug.plugins.staggered",  # Dirac operators: staggered (links), staggered-yukawa (scalar field)
    "flowplug.plugins.yukawa",  # actions yukawa(-exact): phi^4 + 2 staggered flavours; staggered_condensate
)
