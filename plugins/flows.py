"""Built-in flow layers and priors (hooks ``flowplug_flow_layers``, ``flowplug_priors``)."""
