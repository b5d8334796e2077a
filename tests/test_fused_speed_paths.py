"""The shortcuts of the fused training nodes: a network input restricted to the sites where it can
be non-zero, transposed gathers without a zero row, and clip masks built only when a clip was met.

``ConvNet.gathered_stack(..., inputs=...)`` (``plugins/flow_nets.py``) lets the first convolution
read its input on a subset of sites plus one zero row, and its backward pass return the input
gradient on that subset only; ``_AffineMap`` (``plugins/flow_phi4.py``) feeds the frozen sites
that way and skips the masks of its two clips when neither clipped anything. Each must give the
values of the full evaluation: maps and log-dets bit for bit, gradients to rounding.
Deterministic: fixed seeds, no statistics.
"""

from __future__ import annotations

import pytest
import torch
from _fused_helpers import fused_and_generic

from flowplug.plugins import flow_nets
from flowplug.plugins.flow_phi4 import AffineCoupling


@pytest.mark.parametrize(
    "lattice,sites,inputs",
    [((4, 4), [1, 3, 6, 9], [0, 2, 5, 7, 8, 10, 13, 15]), ((6,), None, [0, 3, 4]), ((2, 3, 4), [1, 5], [0, 7, 22])],
    ids=["4x4", "6", "2x3x4"],
)
def test_stack_with_restricted_inputs_equals_the_full_input(lattice, sites, inputs):
    """The stack with ``inputs``: the same outputs bit for bit as the full input that is zero off
    those sites, weight gradients to rounding, and the input gradient on those sites equal to the
    full input gradient there; the plan's ``pad`` flag is False exactly where an output covers
    every site."""
    torch.manual_seed(12)
    n_sites = 1
    for n in lattice:
        n_sites *= n
    net = flow_nets.ConvNet(2, 3, (4, 5), 3, len(lattice), torch.float64, final_scale=1.0)
    net.requires_grad_(False)  # the stack functions run inside autograd nodes, never on a graph
    idx = None if sites is None else torch.tensor(sites)
    rows = torch.tensor(inputs)
    full_plan, slope, params = net.gathered_stack(lattice, torch.device("cpu"), idx)
    part_plan, _, _ = net.gathered_stack(lattice, torch.device("cpu"), idx, inputs=rows)
    for full, part in zip(full_plan, part_plan, strict=True):
        assert full[4] == part[4] == (full[1] < n_sites)
    assert part_plan[0][3] == len(inputs) and full_plan[0][3] == n_sites
    x = torch.zeros(2, n_sites, 3, dtype=torch.float64)
    x[:, rows] = torch.randn(2, len(inputs), 3, dtype=torch.float64)
    h_part = torch.cat([x[:, rows], x.new_zeros(2, 1, 3)], 1)
    out_full, saved_full = flow_nets.stack_forward(x, full_plan, slope, params)
    out_part, saved_part = flow_nets.stack_forward(h_part, part_plan, slope, params)
    assert torch.equal(out_full, out_part)
    g = torch.randn(out_full.shape, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    need = [True] * len(params)
    gx_full, gw_full = flow_nets.stack_backward(g, full_plan, slope, params, saved_full, need, True)
    gx_part, gw_part = flow_nets.stack_backward(g, part_plan, slope, params, saved_part, need, True)
    assert gx_part.shape == (2, len(inputs), 3)
    torch.testing.assert_close(gx_part, gx_full[:, rows], rtol=1e-12, atol=1e-12)
    for a, b in zip(gw_part, gw_full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    _, gw_only = flow_nets.stack_backward(g, part_plan, slope, params, saved_part, need, False)
    for a, b in zip(gw_only, gw_full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _affine_grads(m, x, inverse, generic):
    if generic:
        m._fused = lambda x, inverse: None  # instance attribute: the generic autograd path
    try:
        xx = x.clone().requires_grad_(True)
        y, ld = (m.inverse if inverse else m)(xx * 1.0)
        g = torch.Generator().manual_seed(14)
        gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
        gl = torch.randn(ld.shape, generator=g, dtype=torch.float64)
        return y.detach(), ld.detach(), torch.autograd.grad((y, ld), [xx, *m.parameters()], (gy, gl))
    finally:
        m.__dict__.pop("_fused", None)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_fused_affine_without_clips_equals_generic_path(dtype, inverse):
    """Nothing clipped (no frozen site beyond COND_LIMIT, network outputs within PARAM_LIMIT), the
    case of every training step: the fused node skips both clip masks and feeds the network the
    frozen sites only; map and log-det bit for bit, gradients to rounding, both parities."""
    for index in (0, 1):
        torch.manual_seed(15 + index)
        m = AffineCoupling(lattice=(6, 4), index=index, dtype=dtype, init_scale=1.0)
        x = 2.0 * torch.randn(4, 6, 4, dtype=torch.float64)
        y_f, ld_f, g_f = _affine_grads(m, x, inverse, generic=False)
        y_g, ld_g, g_g = _affine_grads(m, x, inverse, generic=True)
        assert torch.equal(y_f, y_g) and torch.equal(ld_f, ld_g)
        tol = 1e-12 if dtype == "float64" else 1e-5
        for a, b in zip(g_f, g_g, strict=True):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))


@pytest.mark.parametrize("lattice", [(8, 8), (4, 2, 4), (6,)], ids=lambda v: "x".join(map(str, v)))
def test_scalar_network_on_frozen_rows_equals_forward_at(lattice):
    """The scalar couplings' conditioner reads the frozen sites only (``_network_at_active``):
    its output equals :meth:`ConvNet.forward_at` of the full masked input bit for bit, with and
    without gradients, a frozen site beyond COND_LIMIT and NaN on an active site included."""
    from flowplug.plugins.flow_phi4 import COND_LIMIT

    torch.manual_seed(16)
    m = AffineCoupling(lattice=lattice, index=1, dtype="float32", init_scale=1.0)
    x = 3.0 * torch.randn(3, *lattice, dtype=torch.float64)
    x.view(3, -1)[0, m._frozen_sites()[0]] = 10 * COND_LIMIT
    x.view(3, -1)[1, m._active_sites()[0]] = float("nan")
    want = m.net.forward_at(m._frozen(x), m._active_sites()).detach()
    assert torch.isfinite(want).all()
    with torch.no_grad():
        assert torch.equal(m._network_at_active(x), want)
    assert torch.equal(m._network_at_active(x.clone().requires_grad_(True)).detach(), want)


@pytest.mark.parametrize("lattice", [(8, 8), (6, 6), (4, 2, 4)], ids=lambda v: "x".join(map(str, v)))
def test_u1_network_on_frozen_plaquettes_equals_the_masked_features(lattice):
    """The U(1) coupling's conditioner reads the sites of frozen plaquettes only
    (``U1Coupling._network_at``; on 6x6 the stripes have period 2 and no plaquette is frozen):
    its output equals ``_condition`` of the masked cos/sin features over all sites bit for bit,
    for every layer of the schedule; the fused node's map and log-det equal the generic path's,
    and its gradients (float32 network) equal them to rounding."""
    import math

    from flowplug import gauge
    from flowplug.plugins.flow_gauge import U1Coupling

    for index in range(2 * len(lattice)):
        torch.manual_seed(17 + index)
        m = U1Coupling(lattice=lattice, index=index, init_scale=1.0)
        theta = (2 * torch.rand(3, len(lattice), *lattice, dtype=torch.float64) - 1) * math.pi
        plaq = gauge.u1_plaquettes(theta)
        idx = m._site_index()
        with torch.no_grad():
            want = m._condition(torch.cos(plaq), torch.sin(plaq), sites=idx)
            assert torch.equal(m._network_at(plaq, idx), want)
        (y_f, ld_f, g_f), (y_g, ld_g, g_g) = fused_and_generic(m, theta, 18)
        assert torch.equal(y_f, y_g) and torch.equal(ld_f, ld_g)
        for a, b in zip(g_f, g_g, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
