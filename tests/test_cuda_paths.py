"""The code paths taken on CUDA only, checked here on the CPU against the paths the CPU takes.

* flowplug.groups.small_matmul: a @ b on the CPU bit for bit; its CUDA branch (broadcast
  multiply-adds, 15x faster there than a batched GEMM of 3x3 matrices: benchmarks/gpu_parts.py)
  equals the product to rounding, with broadcasting and conjugate-transposed views.
* The Wilson staples with the planes of each direction gathered at once (far fewer kernel
  launches) equal the loop over planes.
* The SU(3) exponential's series, summed in place (half the launches), gives bitwise the values
  of the out-of-place recursion.
"""

from __future__ import annotations

import pytest
import torch

from flowplug import groups


def _links(shape, n, seed):
    return groups.haar_random(shape, n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n", [2, 3, 4])
def test_the_cuda_branch_equals_the_matrix_product(n):
    a, b = _links((2, 3, 5), n, 1), _links((2, 3, 5), n, 2)
    for x, y in ((a, b), (a, b.mH), (a.mH, b), (a[:, :1], b), (a, b[0])):
        torch.testing.assert_close(groups._matmul_elementwise(x, y), x @ y, rtol=0, atol=1e-15)
    real = torch.randn(4, n, n, dtype=torch.float64)
    torch.testing.assert_close(groups._matmul_elementwise(real, real), real @ real, rtol=0, atol=1e-14)


def test_on_the_cpu_it_is_the_matrix_product_bit_for_bit():
    a, b = _links((3, 4), 3, 3), _links((3, 4), 3, 4)
    assert torch.equal(groups.small_matmul(a, b), a @ b)
    assert torch.equal(groups.small_matmul(a, b.mH), a @ b.mH)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_it_is_the_product_to_rounding():
    a, b = _links((64, 3), 3, 5).cuda(), _links((64, 3), 3, 6).cuda()
    torch.testing.assert_close(groups.small_matmul(a, b).cpu(), a.cpu() @ b.cpu(), rtol=0, atol=1e-15)


@pytest.mark.parametrize(("group", "lattice"), [("su3", (4, 4, 4, 4)), ("su2", (6, 4)), ("su3", (4, 6, 2))])
def test_gathered_staples_equal_the_loop_over_planes(group, lattice):
    from flowplug.plugins.theories import WilsonGaugeAction, _gathered_staples

    act = WilsonGaugeAction(2.0, group)
    x = act.hot_start(lattice, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_gathered_staples(x), act.staples(x), rtol=0, atol=1e-14)
    # the force through them: the staples pair with their own links (a shifted gather would not)
    shifted = torch.roll(x, 1, dims=2)
    assert (_gathered_staples(shifted) - act.staples(x)).abs().max() > 1e-3


@pytest.mark.parametrize("scale", [1e-8, 0.1, 1.0])
def test_exponential_series_equals_the_out_of_place_sums_bit_for_bit(scale):
    """The SU(3) exponential's series (in-place multiply-adds, fewer launches on a GPU) gives on
    the CPU bitwise the values of the plain out-of-place recursion it replaced."""
    x = scale * groups.random_algebra((500,), 3, generator=torch.Generator().manual_seed(7))
    x2 = x @ x
    s1 = 0.5 * torch.diagonal(x2, dim1=-2, dim2=-1).sum(-1)
    s0 = (x2 * x.transpose(-1, -2)).sum((-1, -2)) / 3.0
    a, b, c = torch.ones_like(s1), torch.zeros_like(s1), torch.zeros_like(s1)
    plain = [a, b, c]
    fact = 1.0
    for k in range(1, 41):
        a, b, c = c * s0, a + c * s1, b
        fact /= k
        plain = [plain[0] + fact * a, plain[1] + fact * b, plain[2] + fact * c]
    fused = groups._cayley_series(s0, s1, 40)
    for p, f in zip(plain, fused, strict=True):
        assert torch.equal(f, p)
    eye = torch.eye(3, dtype=x.dtype)
    u = fused[0][:, None, None] * eye + fused[1][:, None, None] * x + fused[2][:, None, None] * x2
    torch.testing.assert_close(u, torch.linalg.matrix_exp(x), rtol=0, atol=5e-15)
