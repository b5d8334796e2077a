"""Built-in lattice actions (hook ``flowplug_actions``)."""
