"""Shared plaquette traces between ``sun-stout`` layers (issue 14 item 1, speed).

A ``sun-stout`` layer leaves the traces of its frozen plaquettes on its output, and the next
layer computes only those of its own frozen plaquettes that the previous one did not have.
Checked against the same flows with sharing switched off (``share_traces = False``, every
layer computes all of its traces): maps and log-dets bit for bit, forward and inverse;
gradients with respect to the parameters and the flow's input to float rounding; fewer
plaquettes computed; no sharing after an in-place change or ``requires_grad_()``; a
derivative with respect to an intermediate tensor through ``x.clone()``; batch independence.
All random numbers come from fixed seeds.
"""

from __future__ import annotations

import gc
import io

import pytest
import torch
from _sun_helpers import gen, randomize

from flowplug.flow import build_flow
from flowplug.plugins import flow_stout


def _flow(lattice, n_layers=6, dtype="float64", field="su3", rectangles=False):
    options = {"hidden": [4], "dtype": dtype, "rectangles": rectangles}
    flow = build_flow(field, lattice, "sun-stout", n_layers=n_layers, options=options)
    randomize(flow, seed=7, scale=1.0)
    return flow


def _stout_layers(flow):
    return [m for m in flow.modules() if isinstance(m, flow_stout.SUNStoutCoupling)]


def _set_sharing(flow, on):
    for m in _stout_layers(flow):
        m.share_traces = on


def _run(flow, z, share, inverse=False):
    """Output, log-det and the gradients (parameters, input) of a fixed scalar of both."""
    _set_sharing(flow, share)
    flow.zero_grad(set_to_none=True)
    z = z.clone().requires_grad_(True)
    x, ld = flow.inverse(z) if inverse else flow(z)
    weights = torch.linspace(-1.0, 1.0, x.numel(), dtype=torch.float64).view(x.shape)
    (ld.sum() + (weights * x.real).sum() + x.imag.sum()).backward()
    grads = {k: p.grad.clone() for k, p in flow.named_parameters() if p.grad is not None}
    _set_sharing(flow, True)
    return x.detach(), ld.detach(), grads, z.grad.clone()


@pytest.mark.parametrize(
    "lattice, field, dtype, rectangles",
    [
        ((4, 4, 4, 4), "su3", "float64", False),
        ((2, 4, 4, 4), "su3", "float32", False),
        ((4, 4, 4), "su2", "float64", True),
    ],
)
@pytest.mark.parametrize("inverse", [False, True])
def test_shared_traces_give_the_same_flow(lattice, field, dtype, rectangles, inverse):
    """Sharing changes nothing but the cost: outputs and log-dets are bitwise those of the
    flow that recomputes every trace; gradients agree to float rounding (1e-12 relative with a
    float64 network; 1e-5 with a float32 one, whose complex64 trace gradients are summed in
    another order: measured 1.2e-7 relative for the input's gradient)."""
    flow = _flow(lattice, dtype=dtype, field=field, rectangles=rectangles)
    n = int(field[2:])
    z = flow.prior.sample(3, generator=gen(11))
    x1, ld1, g1, gz1 = _run(flow, z, share=True, inverse=inverse)
    x0, ld0, g0, gz0 = _run(flow, z, share=False, inverse=inverse)
    assert torch.equal(x1, x0)
    assert torch.equal(ld1, ld0)
    tol = 1e-12 if dtype == "float64" else 1e-5
    assert g1.keys() == g0.keys() and g1
    for k in g0:
        assert (g1[k] - g0[k]).abs().max() <= tol * g0[k].abs().max(), k
    assert (gz1 - gz0).abs().max() <= tol * gz0.abs().max()
    assert x1.shape == (3, len(lattice), *lattice, n, n)


def test_forward_then_inverse_with_shared_traces():
    """The inverse flow takes the traces that the forward flow left on its output: the round
    trip returns the input, and the inverse's log-det is bitwise that without sharing."""
    flow = _flow((4, 4, 4, 4), n_layers=8)
    with torch.no_grad():
        z = flow.prior.sample(2, generator=gen(5))
        x, ld = flow(z)
        assert isinstance(flow_stout._shared_traces(x), flow_stout._SharedTraces)
        z_back, ldi = flow.inverse(x)
        _set_sharing(flow, False)
        z_plain, ldi_plain = flow.inverse(x.clone())
        _set_sharing(flow, True)
    assert torch.equal(z_back, z_plain) and torch.equal(ldi, ldi_plain)
    assert (z_back - z).abs().max() < 1e-10
    assert (ld + ldi).abs().max() < 1e-9


def test_next_layer_computes_fewer_plaquettes(monkeypatch):
    """In 4D the second layer computes only the frozen plaquettes that the first one changed
    or did not have (here 384 of 1280); without sharing it computes all 1280."""
    flow = _flow((4, 4, 4, 4), n_layers=2)
    counts = []
    apply = flow_stout._TracesAndRows.apply

    def counting(links, index, dtype, rows):
        counts.append(index.shape[1])
        return apply(links, index, dtype, rows)

    monkeypatch.setattr(flow_stout._TracesAndRows, "apply", counting)
    z = flow.prior.sample(2, generator=gen(2))
    with torch.no_grad():
        flow(z)
    first, second = _stout_layers(flow)
    assert counts[0] == first.frozen_at.numel() == 1280
    assert 0 < counts[1] < second.frozen_at.numel() / 2
    counts.clear()
    flow(z)[1].sum().backward()  # with gradients (training), the same
    assert counts[0] == 1280 and 0 < counts[1] < 640
    counts.clear()
    _set_sharing(flow, False)
    with torch.no_grad():
        flow(z)
    assert counts == [1280, 1280]


def test_in_place_change_or_requires_grad_stops_sharing():
    """Traces are taken only from the tensor as the layer returned it: after an in-place change
    of a frozen link the next layer recomputes (same result as without sharing), and after
    ``requires_grad_()`` on a no-grad output the derivative with respect to it is complete."""
    flow = _flow((4, 4, 4, 4), n_layers=2)
    first, second = _stout_layers(flow)
    z = flow.prior.sample(2, generator=gen(4))
    with torch.no_grad():
        y, _ = first(z)
        y[:, 2, 1, 3] = y[:, 2, 1, 3] @ y[:, 3, 0, 0]  # a frozen link of the second layer, in place
        out, _ = second(y)
        second.share_traces = False
        ref, _ = second(y.clone())
        second.share_traces = True
    assert torch.equal(out, ref)
    # requires_grad_() on an output computed without gradients: full derivative
    with torch.no_grad():
        y, _ = first(z)
    y.requires_grad_(True)
    _, ld = second(y)
    (g,) = torch.autograd.grad(ld.sum(), y)
    y0 = y.detach().clone().requires_grad_(True)
    _, ld0 = second(y0)
    (g0,) = torch.autograd.grad(ld0.sum(), y0)
    assert torch.equal(ld, ld0)
    assert (g - g0).abs().max() <= 1e-12 * g0.abs().max()


def test_clone_gives_derivatives_at_an_intermediate_tensor():
    """``x.clone()`` carries no traces, so the next layer's derivative with respect to x is
    complete (the documented way to differentiate at a tensor between two layers)."""
    flow = _flow((4, 4, 4, 4), n_layers=2)
    first, second = _stout_layers(flow)
    z = flow.prior.sample(2, generator=gen(6)).requires_grad_(True)
    y, _ = first(z)
    y_cut = y.clone()
    _, ld = second(y_cut)
    (g,) = torch.autograd.grad(ld.sum(), y_cut)
    y0 = y.detach().clone().requires_grad_(True)
    _, ld0 = second(y0)
    (g0,) = torch.autograd.grad(ld0.sum(), y0)
    assert (g - g0).abs().max() <= 1e-12 * g0.abs().max()


def test_shared_traces_are_batch_independent():
    """Each configuration's output and log-det through a sharing flow are those of the same
    configuration alone (float64 network: to 1e-12)."""
    flow = _flow((4, 4, 4, 4), n_layers=4)
    z = flow.prior.sample(3, generator=gen(9))
    with torch.no_grad():
        x, ld = flow(z)
        for i in range(3):
            xi, ldi = flow(z[i : i + 1])
            assert (xi[0] - x[i]).abs().max() < 1e-12
            assert (ldi[0] - ld[i]).abs().max() < 1e-12


def test_outputs_pickle_as_plain_tensors_and_the_registry_empties():
    """The traces are kept beside the output, not on it: ``torch.save`` of a flow sample writes
    a plain tensor that ``torch.load(weights_only=True)`` reads, and the record goes when the
    sample does."""
    flow = _flow((4, 4, 4, 4), n_layers=2)
    with torch.no_grad():
        x, _ = flow(flow.prior.sample(1, generator=gen(8)))
    assert flow_stout._shared_traces(x) is not None
    assert flow_stout._shared_traces(x.clone()) is None
    buf = io.BytesIO()
    torch.save(x, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=True), x)
    key = id(x)
    del x
    gc.collect()
    assert key not in flow_stout._SHARED


def test_batched_gradients_through_shared_traces():
    """Batched vector-Jacobian products (``is_grads_batched``, vmapped backward) through two
    layers that share traces equal one product at a time; the in-place accumulation of the
    active loops' gradient into the features' gradient is vmappable."""
    flow = _flow((4, 4), n_layers=2)
    z = flow.prior.sample(2, generator=gen(12)).requires_grad_(True)
    x, ld = flow(z)
    weights = torch.randn(3, *ld.shape, dtype=ld.dtype, generator=gen(13))
    (g,) = torch.autograd.grad(ld, z, grad_outputs=weights, is_grads_batched=True, retain_graph=True)
    ref = torch.stack([torch.autograd.grad(ld, z, grad_outputs=w, retain_graph=True)[0] for w in weights])
    assert (g - ref).abs().max() <= 1e-12 * ref.abs().max()
