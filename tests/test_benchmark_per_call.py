"""``benchmarks/per_call.py`` at tiny sizes: its rows have the structure the docs' per-call
table is made from, the stage wrappers are taken off again, and its float64 check passes a
right result and marks a wrong one (no timing is asserted: the machine is shared)."""

from __future__ import annotations


import pytest
from problems import benchmark


@pytest.fixture(scope="module")
def bench():
    return benchmark("per_call")


def test_rows_of_every_stage_and_format_agree_with_float64(bench):
    from jaccli.engine import choice

    check_inputs = choice.check_inputs
    lines: list[str] = []
    rows = bench.breakdown(["silu_mlp"], "laplacian", points=9, calls=2, out=lines.append)
    assert choice.check_inputs is check_inputs  # the wrappers are gone
    assert [r["format"] for r in rows] == ["pt", "pt2"]
    for r in rows:
        assert r["err"] <= 1e-4 and not r["wrong"]
        assert r["call"] > 0 and r["compute"] > 0 and r["lookup"] >= r["recheck"] > 0
        assert r["call"] >= r["check_inputs"] + r["lookup"] + r["plan"] + r["compute"]
    assert len(lines) == 2 + len(rows) and "WRONG" not in "".join(lines)


def test_a_result_off_the_float64_reference_is_marked_wrong(bench, monkeypatch):
    import jaccli

    right = jaccli.hessian
    monkeypatch.setattr(jaccli, "hessian", lambda *a, **k: right(*a, **k) * 1.01)
    lines: list[str] = []
    rows = bench.breakdown(["silu_mlp"], "hessian", points=5, calls=1, out=lines.append)
    assert all(r["wrong"] and r["err"] > 1e-3 for r in rows)
    assert all("WRONG" in line for line in lines[2:])
