"""Sign convention of the SU(N) force (flowplug.theory module docstring).

F = -sum_a (d/ds S[exp(s t_a) U]) t_a with tr(t_a t_b) = -delta_ab / 2, hence for every
X in su(N): d/ds S[exp(s X) U] at s = 0 equals +2 Re tr(X F) (summed over links). Checked
by central finite differences on small 2D lattices, for the analytic Wilson force and
for the autograd force, and on the resulting HMC force direction (a small step along F
lowers S).
"""

from __future__ import annotations

import pytest
import torch

from flowplug import groups
from flowplug.plugins.theories import WilsonGaugeAction


def _directional(action, u, x, s=1e-5):
    """Central difference of S[exp(s X) U] at s = 0, shape (B,)."""
    plus = action.action(groups.expmap(s * x) @ u)
    minus = action.action(groups.expmap(-s * x) @ u)
    return (plus - minus) / (2 * s)


def _two_re_tr(x, f):
    """2 Re tr(X F) summed over links, shape (B,)."""
    return 2 * torch.einsum("...ij,...ji->...", x, f).real.flatten(1).sum(1)


@pytest.mark.parametrize("group,beta", [("su2", 2.3), ("su3", 5.5)])
def test_directional_derivative_is_plus_two_re_tr_x_f(group, beta):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    act = WilsonGaugeAction(beta, group)
    u = act.hot_start((3, 4), 2, generator=g)
    x = act.space.momenta(u, g)  # random su(N) direction per link
    fd = _directional(act, u, x)
    analytic = act.force(u)
    auto = act.space.autograd_force(act.action, u)
    torch.testing.assert_close(analytic, auto, rtol=1e-9, atol=1e-9)
    for f in (analytic, auto):
        torch.testing.assert_close(_two_re_tr(x, f), fd, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(-_two_re_tr(x, f), fd, rtol=1e-3, atol=1e-3)  # the sign is +
    # F points downhill: a small step U <- exp(eps F) U lowers the action
    eps = 1e-4
    lower = act.action(groups.expmap(eps * analytic) @ u)
    assert bool((lower < act.action(u)).all())
