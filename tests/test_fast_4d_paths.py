"""The fast paths behind the 4D SU(3) flows: dense-DFT 4D convolutions, their batch
independence, and the Haar SU(3) draw without QR.

Each path is compared with an independent computation (torch.fft, the unfold + strided 3D
convolution path, the explicit sum over kernel taps, exact Haar moments).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from _flow_helpers import assert_inverts_each_configuration

from flowplug import groups
from flowplug.errors import ShapeError
from flowplug.plugins import flow_nets
from flowplug.plugins.flow_nets import PeriodicConv, _dft_matrices
from flowplug.plugins.priors import HaarPrior


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _explicit_conv4d(conv: PeriodicConv, x: torch.Tensor) -> torch.Tensor:
    """sum_t W_t x(x + t - h) + b over every tap t of a 4D kernel, by rolling the input."""
    k = conv.kernel_size
    w = conv.conv.weight
    w = w.view(w.shape[0], k, -1, k, k, k).transpose(1, 2)  # (O, C, k, k, k, k)
    y = torch.zeros(x.shape[0], w.shape[0], *x.shape[2:], dtype=x.dtype)
    for t in itertools.product(range(k), repeat=4):
        shifted = torch.roll(x, shifts=[k // 2 - ti for ti in t], dims=[2, 3, 4, 5])
        y = y + torch.einsum("bc...,oc->bo...", shifted, w[(slice(None), slice(None), *t)])
    return y + conv.conv.bias.view(1, -1, 1, 1, 1, 1)


def _grads(out: torch.Tensor, conv: PeriodicConv, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(out, (x, conv.conv.weight, conv.conv.bias), g)


@pytest.mark.parametrize("lattice", [(4, 4, 4, 4), (4, 2, 4, 6), (2, 4, 2, 4)], ids=lambda v: "x".join(map(str, v)))
def test_dense_dft_convolution_equals_fft_path_and_explicit_sum(lattice, monkeypatch):
    """The 4D Fourier convolution with dense DFT matrices (small lattices) gives the explicit
    tap sum and the values and gradients (input, weight, bias) of the torch.fft path, float64,
    also for a kernel wider than the lattice."""
    torch.manual_seed(1)
    for k in (3, 5):
        conv = PeriodicConv(3, 2, k, 4, torch.float64)
        with torch.no_grad():
            conv.conv.bias.normal_()
        x = torch.randn(2, 3, *lattice, dtype=torch.float64, requires_grad=True)
        dense = conv(x)
        torch.testing.assert_close(dense, _explicit_conv4d(conv, x), rtol=0, atol=1e-12)
        g = torch.randn_like(dense)
        grads = _grads(dense, conv, x, g)
        monkeypatch.setattr(flow_nets, "_DENSE_DFT_SITES", 0)
        fft = conv(x)
        monkeypatch.undo()
        torch.testing.assert_close(dense, fft, rtol=0, atol=1e-12)
        for a, b in zip(grads, _grads(fft, conv, x, g), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_dft_matrices_are_torch_rfftn_and_irfftn():
    """x @ fwd = rfftn(x) (real and imaginary parts interleaved) and y_hat @ inv = irfftn(y_hat)
    on random inputs, in float64; inv is a left inverse of fwd."""
    lattice = (4, 2, 4, 6)
    fwd, inv = _dft_matrices(lattice, torch.device("cpu"), torch.float64)
    x = torch.randn(5, *lattice, dtype=torch.float64, generator=gen(2))
    want = torch.view_as_real(torch.fft.rfftn(x, dim=(1, 2, 3, 4))).reshape(5, -1)
    torch.testing.assert_close(x.reshape(5, -1) @ fwd, want, rtol=0, atol=1e-12)
    y_hat = torch.fft.rfftn(torch.randn(3, *lattice, dtype=torch.float64, generator=gen(3)), dim=(1, 2, 3, 4))
    back = torch.view_as_real(y_hat).reshape(3, -1) @ inv
    torch.testing.assert_close(back, torch.fft.irfftn(y_hat, s=lattice, dim=(1, 2, 3, 4)).reshape(3, -1))
    torch.testing.assert_close(fwd @ inv, torch.eye(math.prod(lattice), dtype=torch.float64), rtol=0, atol=1e-12)


def test_haar_su3_is_special_unitary_and_reproducible():
    u = groups.haar_random_su3((7, 5), generator=gen(5))
    assert u.shape == (7, 5, 3, 3) and u.dtype == torch.complex128
    eye = torch.eye(3, dtype=torch.complex128)
    assert float((u @ u.mH - eye).abs().max()) < 1e-14
    assert float((torch.linalg.det(u) - 1).abs().max()) < 1e-14
    torch.testing.assert_close(u, groups.haar_random_su3((7, 5), generator=gen(5)), rtol=0, atol=0)
    assert groups.haar_random_su3((2,), dtype=torch.complex64).dtype == torch.complex64
    with pytest.raises(ShapeError, match="complex64 or complex128"):
        groups.haar_random_su3((2,), dtype=torch.float64)
    # the SU(3) Haar prior draws with it
    z = HaarPrior((2, 2), n=3).sample(3, generator=gen(6))
    torch.testing.assert_close(z, groups.haar_random_su3((3, 2, 2, 2), generator=gen(6)), rtol=0, atol=0)


def test_haar_su3_moments_are_exact_haar():
    """Exact SU(3) Haar moments of t = tr U: E t = 0, E |t|^2 = 1, E |t|^4 = 2, E t^3 = 1 (the
    last one distinguishes SU(3) from U(3), where it is 0) and E tr U^2 = 0, from 200000
    draws, each within 5 standard errors."""
    u = groups.haar_random_su3((200000,), generator=gen(7))
    t = torch.diagonal(u, dim1=-2, dim2=-1).sum(-1)
    t2 = torch.diagonal(u @ u, dim1=-2, dim2=-1).sum(-1)
    checks = [
        (t.real, 0.0),
        (t.imag, 0.0),
        (t.abs() ** 2, 1.0),
        (t.abs() ** 4, 2.0),
        ((t**3).real, 1.0),
        ((t**3).imag, 0.0),
        (t2.real, 0.0),
    ]
    for values, exact in checks:
        err = float(values.std()) / math.sqrt(values.numel())
        assert abs(float(values.mean()) - exact) < 5 * err, (exact, float(values.mean()), err)


@pytest.mark.parametrize("n_in", [1, 2, 8])
def test_4d_convolutions_give_each_configuration_the_same_float32_output_in_any_batch(n_in, monkeypatch):
    """A float32 4D convolution (dense-DFT and torch.fft full output; unfolded strided output)
    gives every configuration bitwise the same output in a batch of 9 as alone: a flow layer's
    inverse on one configuration must see exactly the parameters of its forward map on a batch
    (a product over the batch folded into one matrix changes the float32 rounding)."""
    torch.manual_seed(8)
    lattice = (4, 4, 4, 4)
    conv = PeriodicConv(n_in, 3, 3, 4, torch.float32)
    x = torch.randn(9, n_in, *lattice)
    for dense in (flow_nets._DENSE_DFT_SITES, 0):
        monkeypatch.setattr(flow_nets, "_DENSE_DFT_SITES", dense)
        for out_sites in (None, (1, 3, 4), (0, 0, 2)):
            with torch.no_grad():
                batch = conv(x, out_sites)
                alone = torch.cat([conv(x[i : i + 1], out_sites) for i in range(x.shape[0])])
            assert torch.equal(batch, alone), (dense, out_sites, float((batch - alone).abs().max()))


@pytest.mark.parametrize(
    ("field", "layer", "options"),
    [
        ("scalar", "affine", {"hidden": [4], "init_scale": 1.0}),
        ("scalar", "spline", {"hidden": [4], "init_scale": 1.0}),
        ("su3", "sun-stout", {"hidden": [4], "init_scale": 1.0}),
    ],
)
def test_4d_flow_inverts_one_configuration_of_a_forward_batch_exactly(field, layer, options, monkeypatch):
    """f^-1 of one configuration of a batch mapped by f gives back its latent configuration to
    float64 rounding, and the two log-dets cancel, with float32 networks on 4^4 (dense-DFT
    convolutions)."""
    from flowplug.flow import build_flow

    torch.manual_seed(9)
    flow = build_flow(field, (4, 4, 4, 4), [layer], n_layers=2, options=options).eval()
    assert_inverts_each_configuration(flow, 6, 10)
