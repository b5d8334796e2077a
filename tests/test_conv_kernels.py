"""The compiled convolution kernels of the coupling networks (``flowplug/_compiled.c``,
:func:`flowplug.compiled.conv_gather` and :func:`flowplug.compiled.conv_weight_grad`).

Each result is compared with the same sums in float64, within the bound of float32
summation: a sum of K products, each rounded once by a fused multiply-add, is within
K * 2^-24 of the sum of their absolute values (Higham, "Accuracy and Stability of Numerical
Algorithms", section 3.1; the weight gradient sums n * B terms, tiles and lanes included).
The batch- and thread-independence that the flows rely on (a configuration's network output
does not depend on its batch, DESIGN section 4) is checked bit for bit, and the networks'
forward and backward passes with the kernels against the same passes through torch.
"""

from __future__ import annotations

import pytest
import torch

from flowplug import compiled
from flowplug.plugins import flow_nets
from flowplug.plugins.flow_nets import ConvNet, periodic_taps, run_stack

pytestmark = pytest.mark.skipif(not compiled.conv_available(), reason="compiled convolution kernels not available")

EPS32 = 2.0**-24


def _reference(h, w, bias, idx, n, *, transpose=False, zero_row=-1, slope=0.0, mode=0, gate=None):
    """out (Q, n, B) in float64 and the float32 error bound of each entry."""
    a, r, b = h.shape
    hz = torch.cat([h.double(), torch.zeros(a, 1, b, dtype=torch.float64)], 1)
    rows = torch.where(idx == zero_row, r, idx)
    t = idx.numel() // n
    cols = hz.index_select(1, rows).view(a, t, n, b)
    weights = w.double().reshape(w.shape[0], -1, t)
    weights = weights.transpose(0, 1) if transpose else weights  # (Q, A, T)
    out = torch.einsum("qat,atsb->qsb", weights, cols)
    bound = torch.einsum("qat,atsb->qsb", weights.abs(), cols.abs())
    if bias is not None:
        out = out + bias.double()[:, None, None]
        bound = bound + bias.double().abs()[:, None, None]
    bound = (a * t + 1) * EPS32 * bound
    if mode == 1:
        out = torch.where(out > 0, out, slope * out)
    elif mode == 2:
        out = torch.where(gate > 0, out, slope * out)
    return out, bound


def _case(q, a, n, b, r=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    taps = periodic_taps((8, 8), 3)  # (9, 64)
    sites = torch.randperm(64, generator=g)[:n]
    idx = (taps[:, sites] % r).flatten().contiguous()
    h = torch.randn(a, r, b, generator=g)
    w = torch.randn(q, a, 9, generator=g)
    bias = torch.randn(q, generator=g)
    return h, w, bias, idx


@pytest.mark.parametrize(
    ("q", "a", "n", "b"),
    [(8, 8, 64, 64), (2, 8, 32, 64), (1, 8, 16, 16), (3, 2, 16, 5), (5, 3, 20, 19), (17, 1, 7, 1), (4, 4, 9, 33)],
)
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_conv_gather_equals_the_sums(q, a, n, b, mode):
    h, w, bias, idx = _case(q, a, n, b)
    gate = torch.randn(q, n, b) if mode == 2 else None
    out = torch.full((q, n, b), float("nan"))
    assert compiled.conv_gather(out, h, w, bias, idx, slope=0.01, mode=mode, gate=gate)
    want, bound = _reference(h, w, bias, idx, n, slope=0.01, mode=mode, gate=gate)
    assert torch.isfinite(out).all()
    assert ((out.double() - want).abs() <= bound).all()
    # the transposed weight (the input gradient's form), rows of zeros and no bias
    wt = torch.randn(a, q, 9)
    zero = idx.clone()
    zero[::3] = h.shape[1]
    out_t = torch.full((q, n, b), float("nan"))
    kw = {"transpose": True, "zero_row": h.shape[1], "slope": 0.01, "mode": mode, "gate": gate}
    compiled.conv_gather(out_t, h, wt, None, zero, **kw)
    want_t, bound_t = _reference(h, wt, None, zero, n, **kw)
    assert ((out_t.double() - want_t).abs() <= bound_t).all()


@pytest.mark.parametrize(("q", "a", "n", "b"), [(8, 8, 64, 64), (2, 8, 32, 21), (3, 1, 16, 9), (1, 4, 8, 1)])
def test_conv_weight_grad_equals_the_sums(q, a, n, b):
    h, _, _, idx = _case(q, a, n, b, seed=1)
    zero = idx.clone()
    zero[::4] = h.shape[1]
    g = torch.randn(q, n, b)
    gw, gb = torch.full((q, a, 9), float("nan")), torch.full((q,), float("nan"))
    assert compiled.conv_weight_grad(gw, gb, g, h, zero, zero_row=h.shape[1])
    hz = torch.cat([h.double(), torch.zeros(a, 1, b, dtype=torch.float64)], 1)
    cols = hz.index_select(1, torch.where(zero == h.shape[1], h.shape[1], zero)).view(a, 9, n, b)
    want = torch.einsum("osb,atsb->oat", g.double(), cols)
    bound = (n * b + 8) * EPS32 * torch.einsum("osb,atsb->oat", g.double().abs(), cols.abs())
    assert ((gw.double() - want).abs() <= bound).all()
    want_b = g.double().sum((1, 2))
    assert ((gb.double() - want_b).abs() <= (n * b + 8) * EPS32 * g.double().abs().sum((1, 2))).all()
    gb_alone = torch.empty(q)  # the bias gradient alone
    compiled.conv_weight_grad(None, gb_alone, g, h, zero, zero_row=h.shape[1])
    assert torch.equal(gb_alone, gb)


@pytest.mark.parametrize("q", [1, 2, 3, 5, 8, 17, 32])
@pytest.mark.parametrize("mode", [1, 2])
def test_a_configuration_does_not_depend_on_its_batch(q, mode):
    """Each batch entry goes through the same operations wherever it sits: computed alone, in
    a batch of another size or at another position, its output is the same bit for bit. The
    batch sizes take every blocking of the kernel (channels in the lanes for one or two
    entries, one to eight blocks of eight entries, a masked tail)."""
    b = 70
    h, w, bias, idx = _case(q, 8, 64, b)
    gate = torch.randn(q, 64, b) if mode == 2 else None
    out = torch.empty(q, 64, b)
    compiled.conv_gather(out, h, w, bias, idx, slope=0.01, mode=mode, gate=gate)
    for sel in (slice(0, 1), slice(69, 70), slice(3, 5), slice(5, 9), slice(1, 9), slice(2, 19), slice(6, 39)):
        part = h[:, :, sel].contiguous()
        alone = torch.empty(q, 64, part.shape[2])
        g = None if gate is None else gate[:, :, sel].contiguous()
        compiled.conv_gather(alone, part, w, bias, idx, slope=0.01, mode=mode, gate=g)
        assert torch.equal(alone, out[:, :, sel]), sel


def test_results_do_not_depend_on_the_threads():
    """Enough work to split between threads (one per 2^22 products): the forward pass and both
    gradients equal those of one thread bit for bit."""
    taps = periodic_taps((32, 32), 3)
    idx = taps.flatten().contiguous()
    gen = torch.Generator().manual_seed(2)
    h, g = torch.randn(8, 1024, 64, generator=gen), torch.randn(8, 1024, 64, generator=gen)
    w, bias = torch.randn(8, 8, 9, generator=gen), torch.randn(8, generator=gen)
    saved = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out, gw, gb = torch.empty(8, 1024, 64), torch.empty(8, 8, 9), torch.empty(8)
            compiled.conv_gather(out, h, w, bias, idx, slope=0.01, mode=1)
            compiled.conv_weight_grad(gw, gb, g, h, idx)
            results.append((out, gw, gb))
    finally:
        torch.set_num_threads(saved)
    for other in results[1:]:
        assert all(torch.equal(x, y) for x, y in zip(other, results[0], strict=True))


def test_bad_arguments_are_refused():
    h, w, bias, idx = _case(8, 8, 64, 8)
    out = torch.empty(8, 64, 8)
    bad = idx.clone()
    bad[7] = 64  # past the rows, and not the zero row
    with pytest.raises(IndexError, match="row index"):
        compiled.conv_gather(out, h, w, bias, bad)
    bad[7] = -1  # before them (not a row of zeros unless asked for)
    with pytest.raises(IndexError, match="row index"):
        compiled.conv_gather(out, h, w, bias, bad)
    with pytest.raises(IndexError, match="row index"):
        compiled.conv_weight_grad(torch.empty(8, 8, 9), None, out, h, bad)
    with pytest.raises(ValueError, match="float32"):
        compiled.conv_gather(out, h.double(), w, bias, idx)
    with pytest.raises(ValueError, match="contiguous"):
        compiled.conv_gather(out, h.transpose(1, 2).contiguous().transpose(1, 2), w, bias, idx)
    with pytest.raises(ValueError, match="shape"):
        compiled.conv_gather(out, h, w, bias, idx[:-1])
    with pytest.raises(ValueError, match="contiguous"):
        compiled.conv_gather(out, h, w.transpose(0, 1).contiguous().transpose(0, 1), bias, idx)
    with pytest.raises(ValueError, match="contiguous"):
        compiled.conv_weight_grad(torch.empty(9, 8, 8).transpose(0, 2), None, out, h, idx)
    with pytest.raises(ValueError, match="gate"):
        compiled.conv_gather(out, h, w, bias, idx, mode=2)
    with pytest.raises(ValueError, match="overlaps h"):
        compiled.conv_gather(h[:, :64].view(8, 64, 8), h, w, bias, idx)
    with pytest.raises(ValueError, match="negated view"):
        compiled.conv_gather(out, torch._neg_view(h), w, bias, idx)
    with pytest.raises(ValueError, match="requires a gradient"):
        compiled.conv_gather(out.clone().requires_grad_(True), h, w, bias, idx)
    with pytest.raises(ValueError, match="channels"):
        compiled.conv_gather(torch.empty(0, 64, 8), h, w, bias, idx)


def test_the_c_side_checks_sizes_without_the_python_checks():
    """The networks call the kernels without the Python checks; a size that does not fit a
    tensor's entries is still refused, by the C function, before anything is read or written."""
    h, w, bias, idx = _case(8, 8, 64, 8)
    out = torch.full((8, 64, 8), 7.0)
    unchecked = compiled._conv_gather_unchecked
    none = compiled.NO_ZERO_ROW
    for args in (
        (out, h, w[:7], bias, idx, none, 0.01, 1, None, False),  # fewer weights than 8 x 8 x 9
        (out, h, w, bias[:5], idx, none, 0.01, 1, None, False),  # a short bias
        (out, h, w, bias, idx[:-9], none, 0.01, 1, None, False),  # a short index
        (out, h[:, :, :4], w, bias, idx, none, 0.01, 1, None, False),  # another batch than out's
        (out, h, w, bias, idx, none, 0.01, 2, torch.randn(8, 64, 4), False),  # a short gate
        (out, h, w, bias, idx, none, 0.01, 2, None, False),  # mode 2 without a gate
    ):
        with pytest.raises(ValueError, match="do not fit"):
            unchecked(*args)
    assert bool((out == 7.0).all())
    g = torch.randn(8, 64, 8)
    with pytest.raises(ValueError, match="do not fit"):
        compiled._conv_weight_grad_unchecked(torch.empty(8, 8, 8), None, g, h, idx, compiled.NO_ZERO_ROW)
    with pytest.raises(ValueError, match="do not fit"):
        compiled._conv_weight_grad_unchecked(torch.empty(8, 8, 9), torch.empty(3), g, h, idx, compiled.NO_ZERO_ROW)


def _nets(dtype=torch.float32):
    torch.manual_seed(3)
    net = ConvNet(2, 3, (8, 8), 3, 2, dtype, final_scale=1.0)
    return net


@pytest.mark.parametrize("batch", [5, 9, 64])
@pytest.mark.parametrize("sites", [None, "stripe"])
def test_networks_with_the_kernels_equal_torch(sites, batch, monkeypatch):
    """A network's gathered forward and backward passes (:func:`run_stack`) with the kernels
    agree with the same passes through torch's gathers and products, to float32 rounding
    (2^-16 of the largest entry). Batch 5 runs the kernels forward only (their backward pass
    starts at batch 8), 9 and 64 both ways (9: a masked tail)."""
    net = _nets()
    lattice = (8, 8)
    sel = None if sites is None else torch.arange(64).view(8, 8)[:, 1::4].flatten()
    x = torch.randn(batch, 2, *lattice)

    def run():
        plan, slope, params = net.gathered_stack(lattice, x.device, sel)
        h = x.flatten(2).permute(1, 2, 0).clone().requires_grad_(True)
        out = run_stack(h, plan, slope, params)
        go = torch.linspace(-1, 1, out.numel()).view_as(out)
        grads = torch.autograd.grad(out, [h, *params], go)
        return out.detach(), grads

    out_c, grads_c = run()
    monkeypatch.setattr(compiled, "conv_available", lambda: False)
    out_t, grads_t = run()
    scale = float(out_t.abs().max())
    torch.testing.assert_close(out_c, out_t, rtol=0, atol=2.0**-16 * scale)
    for gc, gt in zip(grads_c, grads_t, strict=True):
        torch.testing.assert_close(gc, gt, rtol=0, atol=2.0**-16 * float(gt.abs().max()))


def test_float64_networks_and_vmapped_gradients_keep_torch(monkeypatch):
    """The kernels are float32 only: a float64 network runs torch's products (the kernels are
    never called), and so do batched (vmapped) parameters, which have no storage to hand over."""
    calls = []
    real = compiled.conv_gather
    monkeypatch.setattr(compiled, "conv_gather", lambda *a, **k: calls.append(1) or real(*a, **k))
    net = _nets(torch.float64)
    plan, slope, params = net.gathered_stack((8, 8), torch.device("cpu"), None)
    run_stack(torch.randn(2, 64, 3, dtype=torch.float64), plan, slope, params)
    assert not calls
    assert not flow_nets._compiled_stack(torch.randn(2, 64, 3, dtype=torch.float64), params)
    # an ensemble of one-convolution networks under torch.vmap (stacked parameters, one input;
    # with hidden layers torch's own gathers have no batching rule)
    torch.manual_seed(4)
    net32 = ConvNet(2, 3, (), 3, 2, torch.float32, final_scale=1.0)
    plan, slope, params = net32.gathered_stack((8, 8), torch.device("cpu"), None)
    stacked = [torch.stack([p.detach(), p.detach() * 0.5]) for p in params]
    h = torch.randn(2, 64, 3)
    out = torch.vmap(lambda *ps: flow_nets.stack_forward(h, plan, slope, ps)[0])(*stacked)
    for k in range(2):
        one = flow_nets.stack_forward(h, plan, slope, [p[k] for p in stacked])[0]
        torch.testing.assert_close(out[k], one, rtol=0, atol=2.0**-16 * float(one.abs().max()))


def test_outputs_written_in_place_are_seen_by_autograd():
    """A tensor that autograd saved and a kernel then overwrote makes the backward pass raise,
    as after any in-place operation, instead of giving a gradient of the overwritten values."""
    h, w, bias, idx = _case(8, 8, 64, 8)
    x = torch.randn(8, 64, 8, requires_grad=True)
    out = torch.empty(8, 64, 8)
    y = (x * out).sum()  # saves out
    compiled.conv_gather(out, h, w, bias, idx)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_negated_views_and_torch_compile_keep_torch():
    """A negated view (torch's lazy negation) and a torch.compile trace take torch's products:
    the kernels would read the stored values, and dynamo cannot trace them."""
    net = _nets()
    plan, slope, params = net.gathered_stack((8, 8), torch.device("cpu"), None)
    h = torch.randn(2, 64, 3)
    assert flow_nets._compiled_stack(h, params)
    assert not flow_nets._compiled_stack(torch._neg_view(h), params)
    with torch.no_grad():  # the forward pass alone
        want = run_stack(-h, plan, slope, params)  # the kernels: torch's products round otherwise
        got = run_stack(torch._neg_view(h), plan, slope, params)
        torch.testing.assert_close(got, want, rtol=0, atol=2.0**-16 * float(want.abs().max()))
        torch._dynamo.reset()
        traced = torch.compile(lambda t: run_stack(t, plan, slope, params), backend="eager")
        got, want = traced(h), run_stack(h, plan, slope, params)
        torch.testing.assert_close(got, want, rtol=0, atol=2.0**-16 * float(want.abs().max()))
