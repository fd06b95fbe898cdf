"""``jets.jet.sum_few``, the sums of the ``sum`` and ``mean`` rules and of the adjoints' weights:
torch's sum, made slice by slice over a few elements, a new tensor, and the same bits at any
number of points (a chunk's sums must equal the whole run's)."""

from __future__ import annotations

import pytest
import torch

from jaccli.jets.jet import FEW, sum_few


@pytest.mark.parametrize(("shape", "dims"), [
    ((7, 40, 3, 2), (3,)), ((7, 40, 3, FEW), (3,)), ((7, 40, 3, FEW + 1), (3,)),  # the last: torch's own
    ((7, 40, 4, 1), (2, 3)), ((7, 40, 2, 2), (3, 2)), ((5, 40, 3), (0,)), ((3, 40, 3, 4), (1,)), ((3, 40, 1), (2,)),
])  # fmt: skip
@pytest.mark.parametrize("keepdim", [False, True])
def test_is_torch_sum_in_a_tensor_of_its_own(shape, dims, keepdim):
    t = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    before = t.clone()
    got = sum_few(t, dims, keepdim)
    want = t.sum(dims, keepdim=keepdim)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    got.add_(1.0)  # the mean rule divides the sum in place: never a view of the jet
    assert torch.equal(t, before)


@pytest.mark.parametrize("length", [2, 3, 4, FEW])
def test_the_bits_do_not_move_with_the_points(length):
    t = torch.randn(15, 3000, 3, length, generator=torch.Generator().manual_seed(2))
    whole = sum_few(t, (3,))
    for points in (1, 7, 300, 1001):
        assert torch.equal(sum_few(t[:, :points], (3,)), whole[:, :points])
