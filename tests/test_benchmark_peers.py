"""``benchmarks/peers.py`` at tiny N with the torch.func peers only: it runs every measure and
prints the table, and its float64 check refuses a deliberately wrong result (no timing is
asserted: the machine is shared; JAX and folx, when installed, are left out by ``--peers``)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "benchmarks" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_peers"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_the_quick_run_measures_both_ways_and_prints_the_table(bench, tmp_path, capsys):
    out = tmp_path / "rows.json"
    args = ["--quick", "--jobs", "hessian", "--peers", "torch.func", "--points", "16", "--repeats", "1",
            "--process-repeats", "1", "--json", str(out)]  # fmt: skip
    assert bench.main(args) == 0
    text = capsys.readouterr().out
    (row,) = json.loads(out.read_text())
    assert row["job"] == "hessian" and row["points"] == 16
    assert set(row["in_process"]) == {"jaccli", "torch.func"} and set(row["process"]) == {"jaccli", "torch.func"}
    assert row["peer"] == row["process_peer"] == "torch.func"
    assert row["ratio"] == pytest.approx(row["in_process"]["jaccli"] / row["in_process"]["torch.func"])
    assert row["process_ratio"] == pytest.approx(row["process"]["jaccli"] / row["process"]["torch.func"])
    assert "summary" in text and "DISAGREES" not in text
    table_line = next(line for line in text.splitlines() if line.strip().startswith("hessian "))
    assert table_line.lower().count("met") == 2  # both targets judged ("met" or "NOT MET")


def test_a_result_off_the_float64_reference_gets_no_figure(bench, capsys):
    """jaccli's Laplacian scaled by 1.01 is refused: no time, no ratio, and no whole-process race."""
    args = ["--jobs", "laplacian-pinn", "--peers", "torch.func", "--points", "16", "--repeats", "1",
            "--process-repeats", "1", "--perturb", "jaccli"]  # fmt: skip
    assert bench.main(args) == 0
    text = capsys.readouterr().out
    assert any(line.strip().startswith("jaccli") and "DISAGREES with float64" in line for line in text.splitlines())
    assert "whole process, medians" not in text
    table_line = next(line for line in text.splitlines() if line.strip().startswith("laplacian-pinn "))
    assert "met" not in table_line.lower()


def test_disagreement_is_relative_to_the_reference_and_refuses_a_shape_mismatch(bench):
    ref = np.array([[1.0, -4.0], [2.0, 0.0]])
    assert bench.disagreement(ref.astype(np.float32), ref) == 0.0
    assert bench.disagreement(ref + np.array([[0.0, 0.04], [0.0, 0.0]]), ref) == pytest.approx(0.01)
    assert bench.disagreement(ref[:, :1], ref) == float("inf")
