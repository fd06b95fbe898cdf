"""``--compile``: the choice reaches the engine, ``--verbose`` and ``--json`` report what the fused
kernels did, a failed compile is a note and never an error (no compiler needed: the compile
is made to fail), and a bad value is one usage line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from jaccli.cli.main import app
from jaccli.errors import EXIT_CODES, UsageError
from problems import EXAMPLES

runner = CliRunner(env={"COLUMNS": "200"})


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_on_with_a_failed_compile_is_a_note_and_the_eager_result(failing_compile, tmp_path):
    model, x = EXAMPLES / "pinn.pt", EXAMPLES / "pinn_x.npy"
    off = run("hessian", model, x, "-p", "--compile", "off", "--save", tmp_path / "off.npy")
    assert off.exit_code == 0, off.stderr
    on = run("hessian", model, x, "-p", "--compile", "on", "--verbose", "--save", tmp_path / "on.npy")
    assert on.exit_code == 0, on.stderr
    assert "note: fused Taylor kernels: 0 pass(es) through them" in on.stderr
    assert "failed, ran eager: RuntimeError: no C++ compiler here" in on.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "on.npy"), np.load(tmp_path / "off.npy"))
    doc = json.loads(run("hessian", model, x, "-p", "--compile", "on", "--json", "--show", "0").stdout)
    assert "failed, ran eager" in doc["plan"]["compiled"]
    doc = json.loads(run("hessian", model, x, "-p", "--json", "--show", "0").stdout)
    assert doc["plan"]["compiled"] is None  # auto: a small run compiles nothing


def test_partials_reports_it_too(failing_compile):
    result = run("partials", EXAMPLES / "heat.pt", EXAMPLES / "heat_x.npy", "-p", "--in", "t,x", "--want", "u_t,u_xx",
                 "--compile", "on", "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "failed, ran eager" in json.loads(result.stdout)["compiled"]


def test_a_bad_choice_is_refused():
    result = run("laplacian", EXAMPLES / "pinn.pt", EXAMPLES / "pinn_x.npy", "-p", "--compile", "sometimes")
    assert result.exit_code == EXIT_CODES[UsageError]
    assert "sometimes" in result.stderr and "Traceback" not in result.stderr


def test_the_api_takes_booleans():
    x = torch.linspace(-1, 1, 5)[:, None]
    net = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    torch.testing.assert_close(jaccli_laplacian(net, x, False), jaccli_laplacian(net, x, "off"))


def jaccli_laplacian(net, x, compile):
    import jaccli

    return jaccli.laplacian(net, x, per_sample=True, compile=compile)
