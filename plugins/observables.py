"""Built-in observables (hook ``flowplug_observables``)."""
