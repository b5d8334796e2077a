"""Shared by the tests of the fused couplings (``test_fused_couplings.py``,
``test_fused_speed_paths.py``): a layer's values and gradients through its fused autograd node
and through its generic path."""

from __future__ import annotations

import torch


def fused_and_generic(m: torch.nn.Module, theta: torch.Tensor, seed: int) -> list[tuple]:
    """``[(y, logdet, grads) fused, (y, logdet, grads) generic]`` of layer ``m`` at ``theta``: the
    generic path by a ``_fused`` that declines; grads of (y, logdet) with random cotangents from
    ``seed``, with respect to the input and every parameter."""
    res = []
    for generic in (False, True):
        if generic:
            m._fused = lambda theta: None
        try:
            x = theta.clone().requires_grad_(True)
            y, ld = m(x * 1.0)
            g = torch.Generator().manual_seed(seed)
            gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
            gl = torch.randn(ld.shape, generator=g, dtype=torch.float64)
            res.append((y.detach(), ld.detach(), torch.autograd.grad((y, ld), [x, *m.parameters()], (gy, gl))))
        finally:
            m.__dict__.pop("_fused", None)
    return res
