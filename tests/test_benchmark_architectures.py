"""``benchmarks/architectures.py --vs-func`` at tiny sizes: its rows have the structure the
docs' table is made from, and its float64 check both passes right results and refuses a wrong
one (no timing is asserted: the machine is shared)."""

from __future__ import annotations


import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from problems import benchmark


@pytest.fixture(scope="module")
def bench():
    return benchmark("architectures")


@pytest.mark.parametrize("name", ["groupnorm_residual", "multihead_attention", "realnvp"])
def test_rows_of_every_format_and_kind_agree_with_float64(bench, name):
    lines: list[str] = []
    with sdpa_kernel([SDPBackend.MATH]):
        rows = bench.vs_func([name], points=3, repeats=1, tol=1e-4, out=lines.append)
    assert [(r["format"], r["kind"]) for r in rows] == [(f, k) for f in ("pt", "pt2") for k in ("hessian", "laplacian")]
    for r in rows:
        assert r["model"] == name and r["engine"] in ("taylor", "torch.func")
        assert r["err_jaccli"] <= 1e-4 and r["err_func"] <= 1e-4
        assert r["jaccli"] > 0 and r["func"] > 0
        assert r["ratio"] == pytest.approx(r["func"] / r["jaccli"])
        assert r["jaccli_alone"] > 0 and r["func_alone"] > 0
        assert r["ratio_alone"] == pytest.approx(r["func_alone"] / r["jaccli_alone"])
    assert len(lines) == len(rows) and all(name in line and "func/jaccli" in line for line in lines)


def test_a_result_off_the_float64_reference_gets_no_figure(bench, monkeypatch):
    """A fast wrong answer cannot win: jaccli's Laplacian scaled by 1.01 is reported wrong."""
    import jaccli

    right = jaccli.laplacian
    monkeypatch.setattr(jaccli, "laplacian", lambda *a, **k: right(*a, **k) * 1.01)
    rows = bench.vs_func(["silu_mlp"], points=3, repeats=1, tol=1e-4, formats=("pt",), out=lambda line: None)
    by_kind = {r["kind"]: r for r in rows}
    assert by_kind["hessian"]["ratio"] is not None
    lap = by_kind["laplacian"]
    assert lap["err_jaccli"] > 1e-3 and lap["jaccli"] is None and lap["ratio"] is None
    assert lap["jaccli_alone"] is None and lap["ratio_alone"] is None
    assert "wrong" in bench._vs_func_line(lap)


def test_func_hessian_matches_the_float64_definition(bench):
    """The peer itself: ``vmap(hessian)`` of one point's outputs, against autograd's Hessian."""
    from architectures import ZOO

    module = ZOO["silu_mlp"][0]().double().eval()
    x = torch.randn(2, 4, dtype=torch.float64)
    got = bench.func_hessian(module, (4,), None)(x)
    for i in range(2):
        for o in range(3):
            want = torch.autograd.functional.hessian(lambda v: module(v[None])[0, o], x[i])
            torch.testing.assert_close(got[i, o], want)
