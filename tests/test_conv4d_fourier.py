"""The 4D convolution through dense DFT matrices (small lattices):

- the channel sum in Fourier space (:class:`flowplug.plugins.flow_nets._ChannelSum`): its forward
  pass is the per-channel loop bit for bit, its hand-written backward pass equals autograd's
  through that loop, and it supports a double backward and gradcheck;
- the whole convolution against a direct one (circular padding and 3D convolutions);
- strided outputs against the full output's rows, on every axis, with gradients;
- each configuration's float32 output bitwise the same in a batch as alone with two threads, on
  non-cubic lattices and odd channel counts (a flow layer's inverse of one configuration must see
  the parameters of its batched forward map)."""

from __future__ import annotations

import pytest
import torch

from flowplug.plugins.flow_nets import PeriodicConv, _ChannelSum


def _loop(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    y = x[:, 0, None] * k[None, :, 0]
    for c in range(1, x.shape[1]):
        y = y + x[:, c, None] * k[None, :, c]
    return y


def _inputs(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 7, 12, dtype=dtype, generator=g)
    k = torch.randn(3, 7, 12, dtype=dtype, generator=g)
    grad = torch.randn(5, 3, 12, dtype=dtype, generator=g)
    return x, k, grad


def test_forward_is_the_channel_loop_and_backward_equals_autograd():
    x, k, grad = _inputs(torch.complex64)
    xa, ka = x.clone().requires_grad_(True), k.clone().requires_grad_(True)
    xb, kb = x.clone().requires_grad_(True), k.clone().requires_grad_(True)
    y_ref, y = _loop(xa, ka), _ChannelSum.apply(xb, kb)
    assert torch.equal(y_ref.detach(), y.detach())
    gx_ref, gk_ref = torch.autograd.grad(y_ref, (xa, ka), grad)
    gx, gk = torch.autograd.grad(y, (xb, kb), grad)
    assert (gx - gx_ref).abs().max() < 1e-5 and (gk - gk_ref).abs().max() < 1e-5
    assert gx.abs().max() > 0.1 and gk.abs().max() > 0.1
    # each configuration's output does not depend on the batch it is in
    assert torch.equal(_ChannelSum.apply(x[2:3], k), y.detach()[2:3])


def test_gradcheck_and_double_backward():
    x, k, _ = _inputs(torch.complex128, seed=1)
    x, k = x[:2, :3, :4].clone().requires_grad_(True), k[:2, :3, :4].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(_ChannelSum.apply, (x, k))
    assert torch.autograd.gradgradcheck(_ChannelSum.apply, (x, k))


def test_periodic_conv_4d_gradients_equal_a_direct_convolution():
    """The whole 4D convolution (dense DFT path) with the channel sum inside: output and input and
    weight gradients against circular padding + a 3D convolution per slice, summed over the taps
    along axis 0 (float64)."""
    torch.manual_seed(3)
    conv = PeriodicConv(2, 2, 3, 4, dtype=torch.float64)
    x = torch.randn(2, 2, 4, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    y = conv(x)
    w = conv.conv.weight.view(2, 3, 2, 3, 3, 3)  # (O, k along axis 0, C, k, k, k)
    ref = conv.conv.bias.view(1, -1, 1, 1, 1, 1).expand(2, 2, 4, 4, 4, 4)
    xp = torch.nn.functional.pad(x.flatten(1, 2), (1, 1, 1, 1, 1, 1), mode="circular").unflatten(1, (2, 4))
    for t in range(3):  # tap t along axis 0 reads x at x_0 + t - 1
        shifted = torch.roll(xp, 1 - t, dims=2)
        slices = shifted.permute(0, 2, 1, 3, 4, 5).flatten(0, 1)  # (B L_0, C, L+2, L+2, L+2)
        out = torch.nn.functional.conv3d(slices, w[:, t])
        ref = ref + out.unflatten(0, (2, 4)).permute(0, 2, 1, 3, 4, 5)
    assert (y - ref).abs().max() < 1e-12
    gy = torch.randn_like(y)
    g = torch.autograd.grad(y, (x, conv.conv.weight), gy)
    g_ref = torch.autograd.grad(ref, (x, conv.conv.weight), gy)
    assert all((a - b).abs().max() < 1e-11 for a, b in zip(g, g_ref, strict=True))


@pytest.mark.parametrize("lattice", [(4, 2, 6, 4), (2, 4, 4, 6)], ids=lambda v: "x".join(map(str, v)))
@pytest.mark.parametrize("axis", [0, 1, 2, 3])
def test_strided_output_is_the_full_outputs_rows_with_gradients(lattice, axis):
    """``out_sites`` on the dense path (the full Fourier convolution, then the strided rows): the
    full output's rows at every axis and offset, with their shape and order, and the same input,
    weight and bias gradients (float64)."""
    torch.manual_seed(4 + axis)
    conv = PeriodicConv(3, 2, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        conv.conv.bias.normal_()
    x = torch.randn(2, 3, *lattice, dtype=torch.float64, requires_grad=True)
    step = 2
    for offset in (0, 1):
        strided = conv(x, (axis, offset, step))
        rows = torch.arange(offset, lattice[axis], step)
        ref = conv(x).index_select(2 + axis, rows)
        assert strided.shape == ref.shape and strided.shape[2 + axis] == lattice[axis] // step
        assert (strided - ref).abs().max() < 1e-12
        g = torch.randn_like(ref)
        params = (x, conv.conv.weight, conv.conv.bias)
        grads = torch.autograd.grad(strided, params, g)
        grads_ref = torch.autograd.grad(ref, params, g)
        assert all((a - b).abs().max() < 1e-11 for a, b in zip(grads, grads_ref, strict=True))


@pytest.mark.parametrize("lattice", [(2, 4, 4, 6), (4, 2, 6, 4), (4, 4, 4, 4)], ids=lambda v: "x".join(map(str, v)))
@pytest.mark.parametrize(("n_in", "n_out"), [(2, 3), (5, 2), (12, 8)])
def test_each_configuration_gets_the_same_output_in_a_batch_with_two_threads(lattice, n_in, n_out):
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(7)
        conv = PeriodicConv(n_in, n_out, 3, 4, dtype=torch.float32)
        x = torch.randn(6, n_in, *lattice)
        sites = [None] + [(a, o, st) for a in range(4) for st in (2, 4) if lattice[a] % st == 0 for o in (0, 1)]
        with torch.no_grad():
            for out_sites in sites:
                batch = conv(x, out_sites)
                alone = torch.cat([conv(x[i : i + 1], out_sites) for i in range(x.shape[0])])
                assert torch.equal(batch, alone), (out_sites, float((batch - alone).abs().max()))
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("lattice", [(4, 4, 4, 10), (4, 4, 6, 6)], ids=lambda v: "x".join(map(str, v)))
def test_fft_path_gives_each_configuration_the_same_output_in_a_batch(lattice, threads):
    """Lattices above the dense-DFT limit go through torch.fft, whose CPU transforms round a
    group of arrays (vector instructions) differently from a single one: the batch is padded to a
    multiple of 16, so a configuration's float32 output is bitwise the same alone and in a batch
    (one input and one output channel was the failing case), and gradients still flow."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n_in, n_out in ((1, 1), (2, 3)):
            torch.manual_seed(2)
            conv = PeriodicConv(n_in, n_out, 3, 4, dtype=torch.float32)
            x = torch.randn(5, n_in, *lattice)
            with torch.no_grad():
                batch = conv(x)
                alone = torch.cat([conv(x[i : i + 1]) for i in range(x.shape[0])])
            assert torch.equal(batch, alone), (n_in, n_out, float((batch - alone).abs().max()))
        xg = x.double().requires_grad_(True)
        conv64 = PeriodicConv(2, 3, 3, 4, dtype=torch.float64)
        y = conv64(xg)
        (g,) = torch.autograd.grad(y.square().sum(), xg)
        assert g.shape == xg.shape and torch.isfinite(g).all() and g.abs().max() > 0
    finally:
        torch.set_num_threads(old)
