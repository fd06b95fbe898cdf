"""``benchmarks/peers.py`` at tiny N with the torch.func peers only: it runs every measure and
prints the table, and its float64 check refuses a deliberately wrong result (no timing is
asserted: the machine is shared; JAX and folx, when installed, are left out by ``--peers``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from problems import benchmark

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    return benchmark("peers")


def test_the_quick_run_measures_both_ways_and_prints_the_table(bench, tmp_path, capsys):
    out = tmp_path / "rows.json"
    args = ["--quick", "--jobs", "hessian", "--peers", "torch.func", "--points", "16", "--repeats", "1",
            "--process-repeats", "1", "--json", str(out), "--no-compiled"]  # fmt: skip
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
            "--process-repeats", "1", "--perturb", "jaccli", "--no-compiled"]  # fmt: skip
    assert bench.main(args) == 0
    text = capsys.readouterr().out
    assert any(line.strip().startswith("jaccli") and "DISAGREES with float64" in line for line in text.splitlines())
    assert "whole process, medians" not in text
    table_line = next(line for line in text.splitlines() if line.strip().startswith("laplacian-pinn "))
    assert "met" not in table_line.lower()


def test_the_compiled_candidate_is_jaccli_with_fused_kernels_forced_on(bench):
    for job in bench.JOBS.values():
        text = bench.source(job, bench.COMPILED)
        assert text.count('compile="on"') == 1 and text.replace(', compile="on"', "") == bench.source(job, "jaccli")
        assert bench.needs(job, bench.COMPILED) == "jaccli"


def test_disagreement_is_relative_to_the_reference_and_refuses_a_shape_mismatch(bench):
    ref = np.array([[1.0, -4.0], [2.0, 0.0]])
    assert bench.disagreement(ref.astype(np.float32), ref) == 0.0
    assert bench.disagreement(ref + np.array([[0.0, 0.04], [0.0, 0.0]]), ref) == pytest.approx(0.01)
    assert bench.disagreement(ref[:, :1], ref) == float("inf")


def test_the_readme_table_is_rewritten_between_its_marks_only(bench, tmp_path):
    start, end = bench.README_MARKS
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{start}\nold table\n{end}\nafter\n")
    bench.write_readme("| new | table |\n", readme)
    assert readme.read_text() == f"# title\n\nbefore\n{start}\n| new | table |\n{end}\nafter\n"
    readme.write_text("# no marks\n")
    with pytest.raises(SystemExit, match="no table to replace"):
        bench.write_readme("| t |\n", readme)
    assert readme.read_text() == "# no marks\n"  # left as it was


def test_the_project_readme_has_the_marks_the_benchmark_rewrites(bench):
    text = (ROOT / "README.md").read_text()
    start, end = bench.README_MARKS
    assert text.count(start) == 1 and text.count(end) == 1 and text.index(start) < text.index(end)


def test_the_markdown_table_names_date_machine_command_and_verdicts(bench):
    rows = [
        {"job": "hessian", "title": "per-sample Hessian", "points": 100_000,
         "in_process": {"jaccli": 0.2, "torch.func": 0.4}, "peer": "torch.func", "ratio": 0.5,
         "process": {"jaccli": 1.5, "torch.func": 1.2}, "process_peer": "torch.func", "process_ratio": 1.25},
        {"job": "u_xxxx", "title": "u_xxxx", "points": 2_000},  # its reference failed: no figures
    ]  # fmt: skip
    a = bench.argparse.Namespace(device="cpu", threads=1, tol=1e-4,
                                 argv_given=["--jobs", "hessian", "--json", "rows.json", "--readme"])  # fmt: skip
    text = bench.markdown(rows, a, "2026-12-06")
    head, _, *table = text.splitlines()
    assert "Measured 2026-12-06 on " in head and "cores" in head and "torch " in head
    assert "`python benchmarks/peers.py --jobs hessian`" in head  # where it wrote is left out
    assert table[2] == "| per-sample Hessian | 100,000 | 0.2 | torch.func 0.4 | 0.50 ✓ | 1.50 / 1.20 (torch.func) | 1.25 ✗ |"
    assert table[3] == "| u_xxxx | 2,000 | – | – | – | – / – | – |"


def test_gpu_table_without_cuda_says_so_and_does_nothing(tmp_path):
    import subprocess

    if __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is present: --table would measure")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--table"], capture_output=True,
                       text=True, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0 and "no CUDA device" in r.stdout and not list(tmp_path.iterdir())


def test_children_are_pinned_to_as_many_cpus_as_threads(bench):
    import os
    import subprocess

    if not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs to pin to one")
    code = "import os; print(len(os.sched_getaffinity(0)))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=bench.pinned(1))
    assert r.stdout.strip() == "1"
    assert bench.pinned(len(os.sched_getaffinity(0))) is None  # all CPUs: nothing to pin


def test_the_toggle_benchmark_runs_both_sides(capsys):
    module = benchmark("taylor_toggles")
    import jaccli.jets.elementwise as elementwise

    import jaccli.jets.chain as chain

    kept, kept_chain = elementwise._tanh, chain._ode_chain
    assert module.main(["--jobs", "hessian,u_xxxx", "--points", "32", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("CPU s") == 2 and "hessian" in out and "u_xxxx" in out
    assert elementwise._tanh is kept and chain._ode_chain is kept_chain  # the current behaviour is restored


@pytest.mark.parametrize(
    "toggle,job,names",
    [("fold", "hessian", ("MIN_ROWS", "_low_derivs")), ("tanh-series", "u_xxxx", ("_first_series_run", "NUMPY_TANH"))],
)
def test_the_toggle_benchmark_toggles_and_restores(capsys, toggle, job, names):
    module = benchmark("taylor_toggles")
    import jaccli.jets.elementwise as elementwise
    import jaccli.jets.fold as fold

    def state():
        return [getattr(fold if hasattr(fold, n) else elementwise, n) for n in names]

    kept = state()
    assert module.main(["--set", toggle, "--eager", "--jobs", job, "--points", "32", "--rounds", "1"]) == 0
    assert capsys.readouterr().out.count("CPU s") == 1
    assert state() == kept  # the current behaviour is restored
