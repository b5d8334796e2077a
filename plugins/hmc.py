"""Built-in HMC kernel (hook ``flowplug_kernels``)."""
