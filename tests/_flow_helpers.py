"""Shared by the flow tests that check exact inverses (``test_fast_4d_paths.py``,
``test_plaquette_traces.py``)."""

from __future__ import annotations

import torch


def assert_inverts_each_configuration(flow: torch.nn.Module, batch: int, seed: int) -> None:
    """f^-1 of each configuration of a batch mapped by f, alone, gives back its latent
    configuration to float64 rounding (1e-12) and the two log-dets cancel (1e-10): the inverse
    of one configuration must see exactly the parameters of the batched forward map."""
    with torch.no_grad():
        z, _ = flow.sample_latent(batch, torch.Generator().manual_seed(seed))
        x, logdet = flow.forward(z)
        for i in range(z.shape[0]):
            z_i, logdet_inv = flow.inverse(x[i : i + 1])
            assert float((z_i - z[i : i + 1]).abs().max()) < 1e-12
            assert abs(float(logdet[i] + logdet_inv[0])) < 1e-10
