"""The plaquette traces of :mod:`flowplug.gauge` (``plaquette_traces``, ``PlaquetteTraces``) and the
Wilson action of SU(N) links that runs through them on a CPU:

- the action and its gradient equal the explicit sum over traced plaquettes
  (:func:`flowplug.gauge.sun_plaquettes`) in 2D, 3D and 4D for SU(2) and SU(3), and the gradient
  comes back contiguous;
- every trace is bitwise the same in any batch, also for index widths that are not a multiple
  of the padding (complex64, as the sun-stout features use it);
- a caller that keeps no input (``save_links=False``, the sun-stout features) may change its input
  in place after the forward pass.
"""

from __future__ import annotations

import pytest
import torch
from _flow_helpers import assert_inverts_each_configuration

from flowplug import gauge, groups
from flowplug.plugins.theories import WilsonGaugeAction


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("lattice", [(4, 2), (2, 4, 2), (2, 2, 4, 2)], ids=lambda v: "x".join(map(str, v)))
def test_wilson_action_and_gradient_equal_the_traced_plaquettes(lattice, n):
    beta = 2.3
    u0 = groups.haar_random((3, len(lattice), *lattice), n, generator=gen(1))
    u = u0.clone().requires_grad_(True)
    s = WilsonGaugeAction(beta=beta, group=f"su{n}").action(u)
    (g,) = torch.autograd.grad(s.sum(), u)
    ref_u = u0.clone().requires_grad_(True)
    tr = torch.diagonal(gauge.sun_plaquettes(ref_u), dim1=-2, dim2=-1).sum(-1).real
    ref = -(beta / n) * tr.flatten(1).sum(1)
    (g_ref,) = torch.autograd.grad(ref.sum(), ref_u)
    assert s.dtype == torch.float64 and s.shape == (3,)
    assert (s - ref).abs().max() < 1e-12 * ref.abs().max()
    assert (g - g_ref).abs().max() < 1e-13 and g_ref.abs().max() > 0.1
    assert g.is_contiguous()
    with torch.no_grad():  # and without a graph
        assert torch.equal(WilsonGaugeAction(beta=beta, group=f"su{n}").action(u0), s.detach())


@pytest.mark.parametrize("width", [1, 15, 37, 64, 100])
def test_traces_are_the_same_in_any_batch(width):
    lattice = (2, 2, 2, 6)
    u = groups.haar_random((5, 4, *lattice), 3, generator=gen(2)).flatten(1, 5)
    full = gauge.plaquette_index(lattice, u.device)
    index = full[:, torch.randperm(full.shape[1], generator=gen(3))[:width]]
    batch = gauge.PlaquetteTraces.apply(u, index, torch.complex64)
    alone = torch.cat([gauge.PlaquetteTraces.apply(u[i : i + 1], index, torch.complex64) for i in range(5)])
    assert batch.shape == (5, width) and torch.equal(batch, alone)
    ref = gauge.plaquette_traces(u.view(5, 4, *lattice, 3, 3), torch.complex128).flatten(1)
    lookup = {tuple(full[:, k].tolist()): k for k in range(full.shape[1])}
    pos = torch.tensor([lookup[tuple(index[:, k].tolist())] for k in range(width)])
    assert (batch - ref[:, pos]).abs().max() < 1e-6


def test_without_kept_input_the_input_may_change_in_place():
    lattice = (2, 4)
    u = groups.haar_random((2, 2, *lattice), 3, generator=gen(4)).flatten(1, 3).requires_grad_(True)
    x = u * 1  # a non-leaf input
    index = gauge.plaquette_index(lattice, u.device)

    class NoKeep(torch.autograd.Function):
        @staticmethod
        def forward(ctx, links):
            return gauge.PlaquetteTraces.forward(ctx, links, index, torch.complex128, False)

        @staticmethod
        def backward(ctx, grad):
            return gauge.PlaquetteTraces.backward(ctx, grad)[0]

    tr = NoKeep.apply(x)
    with torch.no_grad():
        x.mul_(1.0)  # an in-place change of the input after the forward pass
    (g,) = torch.autograd.grad(tr.real.sum(), u)
    v = u.detach().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(gauge.plaquette_traces(v.view(2, 2, *lattice, 3, 3)).real.sum(), v)
    assert (g - g_ref).abs().max() < 1e-13
    kept = gauge.PlaquetteTraces.apply(x, index, torch.complex128)  # the default keeps the input
    with torch.no_grad():
        x.mul_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(kept.real.sum(), u)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    ("field", "layer", "lattice", "rectangles"),
    [
        ("su3", "sun-stout", (8, 8), False),
        ("su2", "sun-stout", (6, 6), False),
        ("su3", "sun-stout", (6, 6), True),
        ("su3", "sun-stout", (2, 4, 6), True),
        ("su3", "sun-spectral", (6, 6), False),
    ],
)
def test_2d_3d_sun_flow_inverts_one_configuration_of_a_forward_batch_exactly(
    field, layer, lattice, rectangles, threads
):
    """With float32 conditioners in 2D and 3D (the gathered network at the updated sites, not
    torch's convolutions, which round by the batch size; the 1x2 loops' traces per matrix, not
    elementwise over the whole batch): f^-1 of one configuration of a batch
    mapped by f gives back its latent configuration to float64 rounding and the log-dets cancel."""
    from flowplug.flow import build_flow

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(9)
        options = {"hidden": [4], "init_scale": 1.0, "rectangles": rectangles}
        flow = build_flow(field, lattice, [layer], n_layers=3, options=options).eval()
        assert_inverts_each_configuration(flow, 7, 10)
    finally:
        torch.set_num_threads(old)
