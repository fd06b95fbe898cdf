"""``benchmarks/forward_over_reverse.py`` at tiny sizes: the Hessian it gets from a recorded
gradient program agrees with float64 ``vmap(hessian)``, a result off the reference gets no
ratio, and what it installs in the recorder for a record is taken back (no timing is
asserted: the machine is shared)."""

from __future__ import annotations


import pytest
from problems import benchmark


@pytest.fixture(scope="module")
def bench():
    return benchmark("forward_over_reverse")


@pytest.mark.parametrize("name", ["silu_mlp", "maf", "bert", "groupnorm_residual"])
def test_the_hessian_of_the_gradient_program_agrees_with_float64(bench, name):
    rows = bench.compare([name], points=3, repeats=1, formats=("pt",), per_output=name == "maf", out=lambda line: None)
    by = {r["candidate"]: r for r in rows}
    assert set(by) == {"fr", "jaccli", "func"} | ({"fr per output"} if name == "maf" else set())
    for r in rows:
        assert r["err"] <= 1e-4 and r["seconds"] > 0
        assert r["ratio"] == pytest.approx(by["func"]["seconds"] / r["seconds"])


def test_a_result_off_the_float64_reference_gets_no_ratio(bench):
    rows = bench.compare(["silu_mlp"], points=3, repeats=1, formats=("pt",), tol=0.0, out=lambda line: None)
    assert rows and all(r["ratio"] is None for r in rows)


def test_the_recorder_is_given_back_as_it_was(bench):
    from jaccli.jets import decompose, record

    table = dict(decompose.DECOMPOSITIONS)
    methods = (record._Recorder.__init__, record._Recorder._register, record._Recorder.__torch_dispatch__)
    with pytest.raises(RuntimeError, match="inside"):
        with bench.gradient_recording():
            assert len(decompose.DECOMPOSITIONS) > len(table)
            assert record._Recorder.__torch_dispatch__ is not methods[2]
            raise RuntimeError("inside")
    assert decompose.DECOMPOSITIONS == table
    assert (record._Recorder.__init__, record._Recorder._register, record._Recorder.__torch_dispatch__) == methods
