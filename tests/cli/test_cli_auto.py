"""The default a newcomer gets is the fast engine: each command run as a user runs it (a
fresh process, the real ``jaccli`` app), its choice read from ``--json``, never from the clock.

A PINN u(t, x) saved with torch.jit.script took 0.86 s by torch.func reverse mode against
0.07 s by the Taylor engine (``--mode forward``): most of the difference is importing
torch._dynamo, which torch.func needs and the Taylor engine does not, so these tests
also check that the fast choice never imports it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from problems import save_torchscript, tanh_mlp

PROBE = """
import json, sys
from jaccli.cli.main import app
from typer.testing import CliRunner
result = CliRunner().invoke(app, json.loads(sys.argv[1]))
print(json.dumps({"code": result.exit_code, "out": result.stdout,
                  "dynamo": "torch._dynamo" in sys.modules}))
"""


def fresh(*args) -> tuple[dict, bool]:
    """The JSON document a command prints, and whether it imported torch._dynamo."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps([str(a) for a in args])], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["code"] == 0, got["out"]
    return json.loads(got["out"]), got["dynamo"]


@pytest.fixture(scope="module")
def pinn(tmp_path_factory):
    """A user's PINN u(t, x): 2 -> 50 -> 50 -> 50 -> 1 tanh, TorchScript, 2 000 collocation points."""
    d = tmp_path_factory.mktemp("pinn")
    model = save_torchscript(tanh_mlp((2, 50, 50, 50, 1), dtype=torch.float32, seed=4), d / "u.pt")
    np.save(d / "col.npy", np.random.default_rng(0).uniform(0, 1, (2000, 2)).astype(np.float32))
    return model, d / "col.npy"


@pytest.mark.parametrize("command", ["jacobian", "hessian", "laplacian"])
def test_the_pinn_gets_the_taylor_engine_by_default(pinn, command):
    doc, dynamo = fresh(command, *pinn, "-p", "--json")
    assert (doc["plan"]["engine"], doc["plan"]["mode"]) == ("taylor", "forward"), doc["plan"]["engine_note"]
    costs = doc["plan"]["estimated_seconds"]
    assert min(costs, key=costs.get) == "taylor forward"
    assert not dynamo


def test_partials_of_the_pinn_take_the_taylor_series(pinn):
    doc, dynamo = fresh("partials", *pinn, "-p", "--in", "t,x", "--want", "u_t,u_xx", "--json")
    assert doc["engine"] == "taylor" and doc["engine_note"] is None
    assert not dynamo


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A scalar of 1 024 inputs (an energy of a flattened 32 × 32 field)."""
    d = tmp_path_factory.mktemp("wide")
    model = save_torchscript(tanh_mlp((1024, 50, 1), dtype=torch.float32, seed=5), d / "e.pt")
    x = np.random.default_rng(1).standard_normal((2000, 1024)).astype(np.float32)
    np.save(d / "many.npy", x)
    np.save(d / "few.npy", x[:20])
    return model, d


def test_wide_inputs_and_a_scalar_output_get_reverse_mode(wide):
    model, d = wide
    doc, _ = fresh("jacobian", model, d / "many.npy", "-p", "--dry-run", "--json")
    assert (doc["engine"], doc["mode"]) == ("torch.func", "reverse")
    assert doc["engine_note"].startswith("reverse mode: ") and "--mode forward" in doc["engine_note"]


def test_a_few_wide_points_are_done_before_torch_func_would_have_started(wide):
    model, d = wide
    doc, dynamo = fresh("jacobian", model, d / "few.npy", "-p", "--json")
    assert (doc["plan"]["engine"], doc["plan"]["mode"]) == ("taylor", "forward")
    assert doc["results"]["jacobian"]["shape"] == [20, 1, 1024] and not dynamo


def test_verbose_names_every_engine_weighed_with_its_predicted_time_cheapest_first(pinn):
    from typer.testing import CliRunner

    from jaccli.cli.main import app

    model, col = pinn
    done = CliRunner().invoke(app, ["hessian", str(model), str(col), "-p", "--verbose", "--dry-run"])
    assert done.exit_code == 0, done.output
    (line,) = [ln for ln in done.stderr.splitlines() if "predicted:" in ln]
    names = [part.strip().rsplit(" ", 2)[0] for part in line.split("predicted:", 1)[1].split(",")]
    # a Hessian also weighs the Taylor engine's reverse mode (by adjoints)
    assert names[0] == "taylor forward"
    assert set(names) == {"taylor forward", "taylor reverse", "torch.func forward", "torch.func reverse"}
