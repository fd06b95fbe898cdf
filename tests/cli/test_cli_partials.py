"""``jaccli partials`` as a user runs it: tables, JSON, saved files, gates and bad requests."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import jaccli
from jaccli.cli.main import app
from jaccli.errors import EXIT_CODES
from problems import EXAMPLES, HEAT_KAPPA

runner = CliRunner(env={"COLUMNS": "200"})
HEAT = ["partials", str(EXAMPLES / "heat.pt"), str(EXAMPLES / "heat_x.npy"), "-p", "--in", "t,x"]
RESIDUAL = f"r = u_t - {HEAT_KAPPA}*u_xx"


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_table_names_every_result_and_the_gate():
    result = run(*HEAT, "--want", "u_t,u_xx", "--want", RESIDUAL, "--fail-above", "r=1e-4")
    assert result.exit_code == 0, result.output
    for needle in ("u_t", "u_xx", "r", "[256, 1]", "r: max |r| = ", "PASS", "inputs t, x"):
        assert needle in result.stdout


def test_terms_and_an_expression_share_one_comma_list():
    result = run(*HEAT, "--want", f"u_t,u_xx,{RESIDUAL}", "--json")
    assert result.exit_code == 0, result.output
    assert list(json.loads(result.stdout)["results"]) == ["u_t", "u_xx", "r"]


def test_a_narrow_terminal_drops_point_columns_but_never_cuts_a_number():
    narrow = CliRunner(env={"COLUMNS": "72"})
    result = narrow.invoke(app, [*HEAT, "--want", f"u_t,{RESIDUAL}"])
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout and "[256, 1]" in result.stdout
    assert "point 0" in result.stdout and "point 2" not in result.stdout


def test_json_values_match_the_api_and_say_which_gate_passed():
    result = run(*HEAT, "--want", "u_xx", "--want", RESIDUAL, "--fail-above", "r=1e-4", "--json")
    doc = json.loads(result.stdout)
    assert doc["schema"] == "jaccli.partials" and doc["passed"] is True and doc["engine"] == "taylor"
    assert doc["names"] == {"inputs": ["t", "x"], "outputs": ["u"]}
    model = jaccli.load_model(EXAMPLES / "heat.pt")
    x = jaccli.load_tensor(EXAMPLES / "heat_x.npy")
    want = jaccli.partials(model, x, ["u_xx"], inputs="t,x", per_sample=True)["u_xx"]
    assert np.allclose(np.array(doc["results"]["u_xx"]["values"]), want.numpy(), rtol=1e-6, atol=1e-7)
    assert doc["gates"][0]["name"] == "r" and doc["gates"][0]["passed"] is True


def test_a_failing_gate_exits_9_naming_the_worst_point_and_still_reports(tmp_path):
    out = tmp_path / "p.npz"
    result = run(*HEAT, "--want", "r = u_t - u_xx", "--fail-above", "r=1e-4", "--save", out, "--json")
    assert result.exit_code == EXIT_CODES[jaccli.GateFailed] == 9
    doc = json.loads(result.stdout)
    gate = doc["gates"][0]
    assert doc["passed"] is False and gate["passed"] is False and gate["worst_point"] is not None
    r = np.load(out)["r"]
    assert gate["worst_point"] == int(np.abs(r).reshape(len(r), -1).max(1).argmax())
    assert f"at point {gate['worst_point']}" in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pt"])
def test_saved_files_hold_one_tensor_per_name(tmp_path, suffix):
    out = tmp_path / f"p{suffix}"
    assert run(*HEAT, "--want", "u,u_t", "--want", RESIDUAL, "--save", out, "-q").exit_code == 0
    saved = jaccli.load_tensors(out)
    assert set(saved) == {"u", "u_t", "r"} and saved["u_t"].shape == (256, 1)


def test_verbose_names_the_engine():
    result = run(*HEAT, "--want", "u_t", "--verbose")
    assert "partials on the taylor engine" in result.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--want", "w_t"], "unknown output"),
        (["--want", "u_q"], "unknown input"),
        (["--in", "t", "--want", "u_t"], "must name every input component"),
        (["--in", "t,t", "--want", "u_t"], "duplicate input names"),
        (["--want", "u_" + "t" * 9], "at most order 8"),
        (["--want", "r = u_t + q"], "reads 'q'"),
        (["--want", "r = u_t +* 2"], "syntax error at column"),
        (["--want", "r = open('x')"], "unsupported call"),
        (["--want", "u_t", "--fail-above", "s=1"], "names no computed result"),
        (["--want", "u_t", "--fail-above", "u_t=abc"], "not a number"),
        ([], "nothing to compute"),
    ],
)
def test_bad_requests_are_one_line_usage_errors_and_save_nothing(tmp_path, args, needle):
    out = tmp_path / "p.npz"
    extra = [] if "--save" in args else ["--save", out]
    result = run(*HEAT, *args, *extra)
    assert result.exit_code == 2, result.output
    # one line; an expression's error then shows the expression and a caret under the column
    lines = 3 if any(" = " in a for a in args) else 1
    assert needle in result.stderr and result.stderr.count("\n") == lines and "Traceback" not in result.stderr
    assert not out.exists()


def test_whole_input_partials_of_one_point(tmp_path):
    x = tmp_path / "x.npy"
    np.save(x, np.array([[0.3, 1.1]], dtype=np.float64))  # one point, as the model takes it
    result = run("partials", EXAMPLES / "heat.pt", x, "--in", "t,x", "--want", "u_xx,u_tt", "--json")
    doc = json.loads(result.stdout)
    t, xx = torch.tensor(0.3, dtype=torch.float64), torch.tensor(1.1, dtype=torch.float64)
    k = HEAT_KAPPA
    u_xx = -torch.exp(-k * t) * torch.sin(xx) - 2 * torch.exp(-4 * k * t) * torch.cos(2 * xx)
    assert result.exit_code == 0, result.output
    assert doc["results"]["u_xx"]["shape"] == [1, 1] and doc["per_sample"] is False
    assert doc["results"]["u_xx"]["values"][0][0] == pytest.approx(float(u_xx), rel=1e-10)


def test_a_forgotten_per_sample_names_the_fix_and_not_a_thousand_inputs():
    """Without -p the 1000 points of pinn_x.npy are one point of 1000 components: the error says
    to pass -p, in CLI words, and lists a few of the default names, not all of them."""
    result = CliRunner().invoke(app, ["partials", str(EXAMPLES / "pinn.pt"), str(EXAMPLES / "pinn_x.npy"), "--want", "u_x"])
    assert result.exit_code == EXIT_CODES[jaccli.UsageError]
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and len(line) < 400, line
    assert "pass -p" in line and "1,000 components" in line and "x999 (1,000 names)" in line
    assert "per_sample=True" not in line  # Python wording stays in the Python API
    with pytest.raises(jaccli.UsageError, match="pass per_sample=True"):
        jaccli.partials(jaccli.load_model(EXAMPLES / "pinn.pt"), jaccli.load_tensor(EXAMPLES / "pinn_x.npy"), ["u_x"])
