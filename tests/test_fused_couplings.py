"""The hand-written backward passes of the training hot path against autograd of the generic code.

The affine coupling (``plugins/flow_phi4.py``: ``_AffineMap``), the gathered convolution stack
(``plugins/flow_nets.py``: ``stack_forward``/``stack_backward``) and the NCP mixture
(``plugins/flow_transforms.py``: ``_NCPForward``) evaluate, when a gradient will be taken,
the same operations as their generic code, with the derivatives written out. Forward values
must be bit for bit those of the generic path (so a flow maps a configuration the same way in
training and in sampling), gradients equal to autograd's up to rounding, clipped inputs and
outputs included, and a pass that differentiates with respect to the field only must not
compute the weights' gradients. Deterministic: fixed seeds, no statistics.
"""

from __future__ import annotations

import math

import pytest
import torch
from _fused_helpers import fused_and_generic

from flowplug.plugins import flow_nets, flow_transforms
from flowplug.plugins.flow_phi4 import COND_LIMIT, PARAM_LIMIT, AffineCoupling


def _affine_case(lattice, dtype, index, seed=0):
    torch.manual_seed(seed)
    m = AffineCoupling(lattice=lattice, index=index, dtype=dtype, init_scale=1.0)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3.0)
    x = 2.0 * torch.randn(5, *lattice, dtype=torch.float64)
    frozen = (~m.updated).flatten().nonzero().flatten()
    x.view(5, -1)[0, frozen[0]] = 10 * COND_LIMIT  # a frozen site beyond the conditioner's clip
    return m, x


def _run(m, x, inverse, generic):
    if generic:
        m._fused = lambda x, inverse: None  # instance attribute: the generic autograd path
    try:
        xx = x.clone().requires_grad_(True)
        y, ld = (m.inverse if inverse else m)(xx)
        g = torch.Generator().manual_seed(3)
        gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
        gl = torch.randn(ld.shape, generator=g, dtype=torch.float64)
        grads = torch.autograd.grad((y, ld), [xx, *m.parameters()], (gy, gl))
    finally:
        m.__dict__.pop("_fused", None)
    return y.detach(), ld.detach(), grads


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("lattice", [(8, 8), (4, 2, 4), (6,)], ids=lambda v: "x".join(map(str, v)))
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_fused_affine_equals_generic_path(lattice, dtype, inverse):
    """Map and log-det bit for bit; gradients (field, weights, biases) to rounding, with a
    frozen site beyond COND_LIMIT (its conditioner gradient is zero) and float32 networks."""
    for index in (0, 1):
        m, x = _affine_case(lattice, dtype, index)
        y_f, ld_f, g_f = _run(m, x, inverse, generic=False)
        y_g, ld_g, g_g = _run(m, x, inverse, generic=True)
        assert torch.equal(y_f, y_g) and torch.equal(ld_f, ld_g)
        with torch.no_grad():  # sampling takes the generic path: the same numbers
            y_n, ld_n = (m.inverse if inverse else m)(x)
        assert torch.equal(y_f, y_n) and torch.equal(ld_f, ld_n)
        tol = 1e-12 if dtype == "float64" else 1e-5
        for a, b in zip(g_f, g_g, strict=True):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))


def test_fused_affine_clipped_network_output_has_zero_gradient():
    """Network outputs beyond +-PARAM_LIMIT are clipped: the fused backward, like autograd's,
    passes no gradient through them (weights scaled until the clip is reached)."""
    m, x = _affine_case((8, 8), "float64", 0, seed=1)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(40.0)
        raw = m.net.forward_at(m._frozen(x), m._active_sites())
    assert float(raw.abs().max()) > PARAM_LIMIT  # the case is what it claims to be
    _, _, g_f = _run(m, x, False, generic=False)
    _, _, g_g = _run(m, x, False, generic=True)
    for a, b in zip(g_f, g_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max()))


def test_field_only_gradient_skips_the_weights(monkeypatch):
    """``torch.autograd.grad`` with respect to the field (the path-gradient step) does not compute
    the network's weight gradients; ``backward()`` does."""
    seen = []
    original = flow_nets.stack_backward

    def spy(grad, plan, slope, params, saved, need, need_input):
        seen.append((list(need), need_input))
        return original(grad, plan, slope, params, saved, need, need_input)

    import flowplug.plugins.flow_phi4 as flow_phi4

    monkeypatch.setattr(flow_phi4, "stack_backward", spy)
    monkeypatch.setattr(flow_nets, "stack_backward", spy)
    m, x = _affine_case((8, 8), "float32", 0)
    z = x.clone().requires_grad_(True)
    h = z * 1.0  # a non-leaf field, as inside a flow
    y, ld = m(h)
    (g,) = torch.autograd.grad((y, ld), z, (torch.ones_like(y), torch.ones_like(ld)), retain_graph=True)
    assert seen[-1] == ([False] * len(seen[-1][0]), True)
    assert torch.isfinite(g).all()
    (y.sum() + ld.sum()).backward()
    assert seen[-1] == ([True] * len(seen[-1][0]), True)
    assert all(p.grad is not None for p in m.parameters())
    # a leaf field that autograd.grad captures (the first layer of a flow): its gradient is computed
    z2 = x.clone().requires_grad_(True)
    y, ld = m(z2)
    (g2,) = torch.autograd.grad((y, ld), z2, (torch.ones_like(y), torch.ones_like(ld)))
    assert seen[-1][1] and torch.equal(g2, g)
    # the same through the stand-alone stack (u(1) couplings)
    net = m.net
    sites = m._active_sites()
    out = net.forward_at(m._frozen(z * 1.0), sites)
    torch.autograd.grad(out.sum(), z)
    assert seen[-1] == ([False] * len(seen[-1][0]), True)


@pytest.mark.parametrize("rotation", [True, False])
def test_ncp_forward_gradients_match_autograd(rotation):
    """The NCP mixture's written-out derivatives pass torch.autograd.gradcheck (float64,
    angles over several turns, 3 components), and its values equal the generic path's."""
    g = torch.Generator().manual_seed(5)
    x = (8 * torch.rand(3, 4, generator=g, dtype=torch.float64) - 1).requires_grad_(True)
    ls = (2 * torch.randn(3, 4, 3, generator=g, dtype=torch.float64)).requires_grad_(True)
    lg = torch.randn(3, 4, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    args = [x, ls, lg]
    if rotation:
        args.append(torch.randn(3, 4, generator=g, dtype=torch.float64).requires_grad_(True))
    assert torch.autograd.gradcheck(lambda *a: flow_transforms._NCPForward.apply(5.0, *a), tuple(args))
    y, ld = flow_transforms.ncp_mixture(*args[:3], args[3] if rotation else None)
    with torch.no_grad():
        y0, ld0 = flow_transforms.ncp_mixture(*args[:3], args[3] if rotation else None)
    assert torch.equal(y.detach(), y0) and torch.equal(ld.detach(), ld0)
    assert float(y0.min()) >= 0 and float(y0.max()) < 2 * math.pi


def test_trainer_grad_norm_equals_clip_grad_norm():
    """The trainer's unclipped gradient norm (fused per-tensor norms) equals
    torch.nn.utils.clip_grad_norm_'s, and is not finite when a gradient is not."""
    from flowplug.train import Trainer

    torch.manual_seed(2)
    params = [torch.nn.Parameter(torch.randn(n)) for n in (3, 7, 1)]
    for p in params:
        p.grad = torch.randn_like(p)
    want = float(torch.nn.utils.clip_grad_norm_(params, float("inf")))
    assert Trainer._grad_norm(params, 0.0) == pytest.approx(want, rel=1e-12)
    params[1].grad[2] = float("nan")
    assert not math.isfinite(Trainer._grad_norm(params, 0.0))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("lattice", [(8, 8), (4, 2, 4)], ids=lambda v: "x".join(map(str, v)))
def test_fused_u1_ncp_equals_generic_path(lattice, dtype):
    """The U(1) NCP coupling's fused node (``_U1NCPMap``): links and log-det bit for bit, gradients
    (links, weights, biases) to rounding, for every direction pair of the schedule (in 3D also
    mu > nu, where the active loop is not one of the plaquettes as stored)."""
    from flowplug.plugins.flow_gauge import U1Coupling

    torch.manual_seed(4)
    for index in range(2 * len(lattice)):
        m = U1Coupling(lattice=lattice, index=index, dtype=dtype)
        theta = (2 * torch.rand(3, len(lattice), *lattice, dtype=torch.float64) - 1) * math.pi
        (y_f, ld_f, g_f), (y_g, ld_g, g_g) = fused_and_generic(m, theta, 3)
        assert torch.equal(y_f, y_g) and torch.equal(ld_f, ld_g)
        for a, b in zip(g_f, g_g, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max()))


def _layers():
    from flowplug.plugins.flow_gauge import U1Coupling

    torch.manual_seed(6)
    affine = AffineCoupling(lattice=(8, 8), index=1, dtype="float32", init_scale=1.0)
    u1 = U1Coupling(lattice=(4, 2, 4), index=4, dtype="float64", init_scale=1.0)
    g = torch.Generator().manual_seed(7)
    return [
        (affine, lambda b: torch.randn(b, 8, 8, generator=g, dtype=torch.float64)),
        (u1, lambda b: (2 * torch.rand(b, 3, 4, 2, 4, generator=g, dtype=torch.float64) - 1) * math.pi),
    ]


@pytest.mark.parametrize("which", [0, 1], ids=["affine", "u1"])
def test_scratch_memory_is_not_shared_between_graphs(which):
    """Two forward passes before either backward pass, graphs retained and differentiated
    twice in any order (a loss that calls the flow twice, the path-gradient estimator's
    repeated products): each gives exactly the gradients of its own forward pass alone, so no
    tensor that a graph keeps lives in the per-thread scratch memory."""
    layer, make = _layers()[which]
    xa, xb = make(3), make(3)
    g = torch.Generator().manual_seed(8)
    go = (torch.randn(xa.shape, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64))
    wrt = list(layer.parameters())

    def alone(x):
        v = x.clone().requires_grad_(True)
        return torch.autograd.grad(layer(v * 1.0), [v, *wrt], go)

    want_a, want_b = alone(xa), alone(xb)
    va, vb = xa.clone().requires_grad_(True), xb.clone().requires_grad_(True)
    out_a, out_b = layer(va * 1.0), layer(vb * 1.0)
    got_b = torch.autograd.grad(out_b, [vb, *wrt], go, retain_graph=True)
    got_a = torch.autograd.grad(out_a, [va, *wrt], go, retain_graph=True)
    again_a = torch.autograd.grad(out_a, [va, *wrt], go)
    for want, got in ((want_a, got_a), (want_b, got_b), (want_a, again_a)):
        assert all(torch.equal(p, q) for p, q in zip(want, got, strict=True))


def test_scratch_memory_is_bounded():
    """The per-thread scratch memory does not grow with the number of batch sizes seen
    (sampling in chunks of varying size after training): one buffer per name and dtype."""
    layer, make = _layers()[0]
    sum(o.sum() for o in layer(make(16).requires_grad_(True))).backward()
    with torch.no_grad():
        for b in range(1, 17):
            layer(make(b))
    pool = flow_nets._WORKSPACE.__dict__.get("pool", {})
    assert len(pool) <= 3 * 2  # ("fwd", "pad", "cols") x (float32, float64)


@pytest.mark.parametrize("compiled_convs", [False, True], ids=["torch", "compiled"])
@pytest.mark.parametrize("which", [0, 1], ids=["affine", "u1"])
def test_vectorized_jacobian_through_fused_nodes(which, compiled_convs, monkeypatch):
    """A vmapped backward pass (``torch.autograd.functional.jacobian(vectorize=True)``, i.e.
    ``is_grads_batched``) through the fused nodes gives the row-by-row Jacobian, of the map and
    of the log-det, to float64 rounding: with the compiled convolution kernels in the forward
    pass (:func:`flowplug.compiled.conv_gather`) and without them. Both backward passes run
    torch's products (a vmapped one always, a batch of one because the kernels' backward
    starts at batch 8)."""
    from flowplug import compiled

    if compiled_convs and not compiled.conv_available():
        pytest.skip("the compiled convolution kernels are not available here")
    if not compiled_convs:
        monkeypatch.setattr(compiled, "conv_available", lambda: False)
    layer, make = _layers()[which]
    x = make(1)
    for k in (0, 1):
        f = lambda v, k=k: layer(v * 1.0)[k]  # noqa: E731
        j_loop = torch.autograd.functional.jacobian(f, x)
        j_vec = torch.autograd.functional.jacobian(f, x, vectorize=True)
        torch.testing.assert_close(j_vec, j_loop, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("which", [0, 1], ids=["affine", "u1"])
def test_gradients_without_torch_node_query(which, monkeypatch):
    """Without ``torch._C._will_engine_execute_node`` (private; absent in some torch versions)
    every gradient that is required is computed, the same to rounding."""
    layer, make = _layers()[which]
    x = make(2)
    wrt = list(layer.parameters())

    def grads():
        v = x.clone().requires_grad_(True)
        y, ld = layer(v * 1.0)
        ones = (torch.ones_like(y), torch.ones_like(ld))
        return [
            *torch.autograd.grad((y, ld), v, ones, retain_graph=True),
            *torch.autograd.grad((y, ld), wrt, ones),
        ]

    with_query = grads()
    monkeypatch.delattr(torch._C, "_will_engine_execute_node", raising=False)
    without = grads()
    for a, b in zip(with_query, without, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


def test_inplace_leaky_relu_takes_the_generic_loop():
    """A network whose activations are in-place LeakyReLUs (another slope than the default) is
    not evaluated by the hand-differentiated stack, whose slope would be wrong for it."""
    torch.manual_seed(9)
    net = flow_nets.ConvNet(1, 2, (4,), 3, 2, torch.float64, final_scale=1.0)
    net.layers[1] = torch.nn.LeakyReLU(0.3, inplace=True)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        want = net(x).flatten(2).transpose(1, 2)
        torch.testing.assert_close(net.forward_at(x), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "lattice,sites",
    [((5, 3), [0, 4, 7, 14]), ((6,), None), ((2, 3, 4), [1, 5, 22]), ((4, 4), None)],
    ids=["5x3-sites", "6", "2x3x4-sites", "4x4"],
)
def test_gathered_stack_gradients_match_autograd_of_the_convolutions(lattice, sites):
    """The hand-written backward of the gathered stack (``_GatheredConvStack``, which the generic
    path of the couplings also takes) against autograd of the same network evaluated by
    :meth:`ConvNet.forward` (torch's convolutions): gradients of the input, weights and biases,
    float64, odd extents, 1D to 3D, all sites or a few; plus gradcheck."""
    torch.manual_seed(10)
    net = flow_nets.ConvNet(2, 3, (4, 5), 3, len(lattice), torch.float64, final_scale=1.0)
    x = torch.randn(3, 2, *lattice, dtype=torch.float64, requires_grad=True)
    idx = None if sites is None else torch.tensor(sites)
    out = net.forward_at(x, idx)
    ref = net(x).flatten(2).transpose(1, 2)
    ref = ref if idx is None else ref.index_select(1, idx)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    wrt = [x, *net.parameters()]
    for a, b in zip(torch.autograd.grad(out, wrt, go), torch.autograd.grad(ref, wrt, go), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max()))
    assert torch.autograd.gradcheck(lambda v: net.forward_at(v, idx), (x[:1].detach().requires_grad_(True),))


def test_fused_affine_conditioner_clip_has_zero_gradient(monkeypatch):
    """Frozen sites beyond +-COND_LIMIT pass no gradient through the network, fused or generic
    (COND_LIMIT lowered so that clipped inputs meet unclipped network outputs)."""
    import flowplug.plugins.flow_phi4 as flow_phi4

    monkeypatch.setattr(flow_phi4, "COND_LIMIT", 1.0)
    m, x = _affine_case((8, 8), "float64", 1, seed=3)
    with torch.no_grad():
        raw = m.net.forward_at(m._frozen(x), m._active_sites())
        clipped = (x.abs() > 1.0) & ~m.updated
    assert float(raw.abs().max()) < PARAM_LIMIT and int(clipped.sum()) > 10  # what the case claims
    for inverse in (False, True):
        _, _, g_f = _run(m, x, inverse, generic=False)
        _, _, g_g = _run(m, x, inverse, generic=True)
        for a, b in zip(g_f, g_g, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max()))


@pytest.mark.parametrize("which", [0, 1], ids=["affine", "u1"])
def test_gradient_with_respect_to_a_captured_non_leaf_input(which):
    """``torch.autograd.grad`` with respect to the layer's own input, a non-leaf (what
    ``path_gradient_loss`` does at every layer but the first): the engine captures the gradient
    there without running the input's node, and the fused node must still compute it."""
    layer, make = _layers()[which]
    z = make(2).requires_grad_(True)
    h = z * 1.0
    y, ld = layer(h)
    ones = (torch.ones_like(y), torch.ones_like(ld))
    (g_h,) = torch.autograd.grad((y, ld), h, ones, retain_graph=True)
    (g_z,) = torch.autograd.grad((y, ld), z, ones)
    assert torch.equal(g_h, g_z) and bool(g_h.abs().sum() > 0)


def test_stack_params_are_the_modules_tensors_also_under_a_parametrization():
    """``ConvNet._stack_params`` reads the registered weights and biases from the modules' dicts;
    a weight that is not registered there (a parametrization computes it) is read by attribute,
    so the gathered stack still sees the tensor the module's own forward uses."""
    net = flow_nets.ConvNet(1, 2, (4,), 3, 2, torch.float64, final_scale=1.0)
    convs = [m for m in net.layers if isinstance(m, flow_nets.PeriodicConv)]
    slope, params = net._stack_params()
    assert slope is not None
    want = [t for c in convs for t in (c.conv.weight, c.conv.bias)]
    assert len(params) == len(want) and all(p is w for p, w in zip(params, want, strict=True))

    class Doubled(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    torch.nn.utils.parametrize.register_parametrization(convs[0].conv, "weight", Doubled())
    _, params = net._stack_params()
    assert torch.equal(params[0], convs[0].conv.weight) and torch.equal(
        params[0], 2 * convs[0].conv.parametrizations.weight.original
    )
    assert params[1] is convs[0].conv.bias and params[2] is convs[1].conv.weight
