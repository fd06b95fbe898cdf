"""jaccli.summarize: spectra, determinants and definiteness against torch.linalg and closed forms."""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch

import jaccli
from jaccli.show import layout, summary
from jaccli.show.summary import Accumulator, summarize_blocks
from problems import FIELD, POTENTIAL, _field_j, _potential_h


def _rotation(theta: float) -> torch.Tensor:
    c, s = math.cos(theta), math.sin(theta)
    return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)


def test_doctests_of_the_core_modules():
    for module in (summary, layout):
        failed, attempted = doctest.testmod(module)
        assert attempted > 0 and failed == 0, module.__name__


@pytest.mark.parametrize("shape", [(7, 4, 3), (7, 3, 4), (7, 5, 5)])
def test_jacobian_summary_matches_torch_linalg_on_random_matrices(shape):
    g = torch.Generator().manual_seed(sum(shape))
    J = torch.randn(*shape, generator=g, dtype=torch.float64)
    s = jaccli.summarize(J, "jacobian", per_sample=True)
    sv = torch.linalg.svdvals(J)
    torch.testing.assert_close(s.per_point["sigma_max"], sv[:, 0])
    torch.testing.assert_close(s.per_point["sigma_min"], sv[:, -1])
    torch.testing.assert_close(s.per_point["condition"], torch.linalg.cond(J))
    torch.testing.assert_close(s.per_point["frobenius"], torch.linalg.matrix_norm(J, "fro"))
    torch.testing.assert_close(s.spectra, sv)
    stats = s.stats()
    assert stats["sigma_max"] == pytest.approx(
        {"min": float(sv[:, 0].min()), "median": float(sv[:, 0].median()), "max": float(sv[:, 0].max())}
    )  # 7 points: the median is the middle one
    square = shape[1] == shape[2]
    assert ("logabsdet" in s.per_point) is square and ("det_sign" in s.as_dict()) is square
    if square:
        sign, logabsdet = torch.linalg.slogdet(J)
        torch.testing.assert_close(s.per_point["logabsdet"], logabsdet)
        assert s.counts == {"positive": int((sign > 0).sum()), "negative": int((sign < 0).sum()), "zero": 0}


def test_rotations_have_unit_singular_values_and_zero_log_det():
    J = torch.stack([_rotation(t) for t in np.linspace(0, 6, 9)])
    st = jaccli.summarize(J, "jacobian", per_sample=True).stats()
    for q in ("sigma_max", "sigma_min", "condition"):
        for v in st[q].values():
            assert v == pytest.approx(1.0, abs=1e-12)
    for v in st["logabsdet"].values():
        assert v == pytest.approx(0.0, abs=1e-12)
    assert st["frobenius"]["max"] == pytest.approx(math.sqrt(2))


def test_reflection_and_singular_maps():
    J = torch.tensor([[[2.0, 0.0], [0.0, -3.0]], [[1.0, 0.0], [0.0, 0.0]], [[1.0, 2.0], [2.0, 4.0]]]).double()
    s = jaccli.summarize(J, "jacobian", per_sample=True)
    assert s.counts == {"positive": 0, "negative": 1, "zero": 2}
    assert s.per_point["logabsdet"][0] == pytest.approx(math.log(6))
    assert s.per_point["logabsdet"][1] == -math.inf and s.per_point["condition"][1] == math.inf
    assert s.per_point["condition"][2] > 1e15  # singular up to rounding, as torch.linalg.cond says
    doc = s.as_dict()
    assert doc["condition"]["max"] is None and doc["condition"]["min"] == pytest.approx(1.5)  # null: infinite


def test_diagonal_hessian_eigenvalues_are_its_diagonal():
    d = torch.tensor([[3.0, -1.0, 0.5], [2.0, 4.0, 1.0]], dtype=torch.float64)
    H = torch.diag_embed(d)
    s = jaccli.summarize(H, "hessian", per_sample=True)
    torch.testing.assert_close(s.spectra, d.sort(-1).values)
    torch.testing.assert_close(s.per_point["eigenvalue_min"], torch.tensor([-1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(s.per_point["eigenvalue_max"], torch.tensor([3.0, 4.0], dtype=torch.float64))
    assert s.counts["indefinite"] == 1 and s.counts["positive_definite"] == 1


DEFINITENESS = [
    ([1.0, 2.0], "positive_definite"),
    ([1.0, 0.0], "positive_semidefinite"),
    ([-1.0, -2.0], "negative_definite"),
    ([0.0, -2.0], "negative_semidefinite"),
    ([1.0, -1.0], "indefinite"),
    ([0.0, 0.0], "zero"),
    ([1.0, 1e-9], "positive_semidefinite"),  # below the float32 slack: rounding noise
    ([1.0, -1e-9], "positive_semidefinite"),
    ([1.0, 1e-3], "positive_definite"),
    ([1.0, -1e-3], "indefinite"),
]


@pytest.mark.parametrize("diag,want", DEFINITENESS)
def test_definiteness_classes_with_the_documented_tolerance(diag, want):
    q = _rotation(0.7).float()
    H = q @ torch.diag(torch.tensor(diag)) @ q.T  # a rotated diagonal: not read off the entries
    s = jaccli.summarize(H, "hessian")  # one point, scalar output
    assert s.counts[want] == 1 and sum(s.counts.values()) == 1
    assert s.rtol == pytest.approx(100 * 2 * torch.finfo(torch.float32).eps)


def test_the_tolerance_follows_the_dtype_and_can_be_given():
    H = torch.diag(torch.tensor([1.0, 1e-9], dtype=torch.float64))
    assert jaccli.summarize(H, "hessian").counts["positive_definite"] == 1  # float64 resolves 1e-9
    assert jaccli.summarize(H, "hessian", rtol=1e-6).counts["positive_semidefinite"] == 1


def test_potential_hessians_against_the_closed_form():
    x = torch.linspace(-2, 2, 15, dtype=torch.float64)[:, None].repeat(1, 3) * torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64)
    H = jaccli.hessian(POTENTIAL, x, per_sample=True)
    want = torch.linalg.eigvalsh(torch.stack([_potential_h(xi) for xi in x]))
    s = jaccli.summarize(H, "hessian", per_sample=True)
    torch.testing.assert_close(s.spectra, want)
    expected = ["positive_definite" if lam.min() > 0 else "indefinite" for lam in want]
    assert s.counts["positive_definite"] == expected.count("positive_definite")


def test_field_jacobian_log_det_against_the_closed_form():
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    J = jaccli.jacobian(FIELD, x, per_sample=True)
    want = torch.linalg.slogdet(torch.stack([_field_j(xi) for xi in x]))[1]
    torch.testing.assert_close(jaccli.summarize(J, "jacobian", per_sample=True).per_point["logabsdet"], want)


def test_multi_output_hessians_and_tensor_shaped_inputs():
    H = torch.randn(4, 2, 3, 2, 2, 2, 2, dtype=torch.float64)  # [N, out=(2, 3), in=(2, 2), in'=(2, 2)]
    H = H + H.permute(0, 1, 2, 5, 6, 3, 4)
    s = jaccli.summarize(H, "hessian", per_sample=True, in_ndim=2)
    assert s.points == 4 and s.components == 6 and s.matrix == (4, 4)
    torch.testing.assert_close(s.spectra, torch.linalg.eigvalsh(H.reshape(24, 4, 4)))
    J = torch.randn(3, 5, 2, 2, dtype=torch.float64)  # whole input [2, 2] -> [3, 5]
    sj = jaccli.summarize(J, "jacobian", in_ndim=2)
    assert sj.points == 1 and sj.matrix == (15, 4)
    torch.testing.assert_close(sj.spectra[0], torch.linalg.svdvals(J.reshape(15, 4)))


def test_chunked_equals_one_pass():
    J = torch.randn(50, 3, 3, dtype=torch.float64)
    blocks = J[:, None]
    one = summarize_blocks(blocks, "jacobian")
    many = summarize_blocks(blocks, "jacobian", chunk_elements=20)  # two points per chunk
    for q in one.per_point:
        torch.testing.assert_close(one.per_point[q], many.per_point[q])
    assert one.counts == many.counts and one.as_dict() == many.as_dict()


def test_non_finite_matrices_are_counted_and_left_out():
    J = torch.stack([torch.eye(2), torch.full((2, 2), float("nan")), 3 * torch.eye(2)])
    s = jaccli.summarize(J, "jacobian", per_sample=True)
    assert s.non_finite == 1 and math.isnan(s.per_point["sigma_max"][1])
    assert s.stats()["sigma_max"] == {"min": 1.0, "median": 2.0, "max": 3.0}
    assert sum(s.counts.values()) == 2


@pytest.mark.parametrize(
    "call",
    [
        lambda: jaccli.summarize(torch.ones(3), "laplacian"),
        lambda: jaccli.summarize(torch.ones(3), "hessian", per_sample=True),
        lambda: Accumulator("hessian").add(torch.ones(1, 1, 2, 3)),
        lambda: Accumulator("jacobian").finish(),
    ],
)
def test_bad_requests_are_usage_errors(call):
    with pytest.raises(jaccli.UsageError):
        call()
