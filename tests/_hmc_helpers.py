"""HMC trajectory checks shared by the fermion tests (``test_schwinger.py``,
``test_preconditioning.py``, ``test_yukawa.py``)."""

from __future__ import annotations


def assert_reversible(kernel, x0, p0, *, tol=1e-10, max_dh=0.5):
    """Integrate (x0, p0) forward, flip the momenta, integrate back: x and p return to within
    ``tol``, and |dH| of the forward trajectory stays below ``max_dh`` (a sensible trajectory,
    not a blow-up). ``kernel``: an HMC kernel (``integrate``, ``hamiltonian``)."""
    x1, p1 = kernel.integrate(x0, p0)
    x2, p2 = kernel.integrate(x1, -p1)
    assert float((x2 - x0).abs().max()) < tol
    assert float((p2 + p0).abs().max()) < tol
    dh = kernel.hamiltonian(x1, p1) - kernel.hamiltonian(x0, p0)
    assert float(dh.abs().max()) < max_dh
