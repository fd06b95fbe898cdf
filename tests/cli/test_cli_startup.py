"""The CLI answers at once: help, version and completion import no torch, and a command
imports nothing a plain torch.func script does not (no torch._dynamo), in a fresh process.

Run in subprocesses so that what this test session has already imported does not count;
they look at ``sys.modules``, never at the clock (timings live in benchmarks/startup.py).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import jaccli
from problems import EXAMPLES, HANG_GUARD_S, tanh_mlp

#: what the probe reports: torch and numpy (help must not load them) and the big imports a
#: small command must not pay for (each 0.05-1 s of start-up)
JVP_DECOMPOSITIONS = "torch._decomp.decompositions_for_jvp"
HEAVY = ("torch", "numpy", "torch._dynamo", "sympy", "scipy", "pydantic", JVP_DECOMPOSITIONS)

PROBE = f"""
HEAVY = {HEAVY!r}
import json, sys
from jaccli.cli.main import app
from typer.testing import CliRunner
result = CliRunner().invoke(app, json.loads(sys.argv[1]))
print(json.dumps({{"code": result.exit_code, "out": result.output,
                  "modules": [m for m in HEAVY if m in sys.modules]}}))
"""


def run_fresh(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(list(args))], capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "args", [["--help"], ["--version"], ["jacobian", "--help"], ["hessian", "--help"], ["info", "--help"], ["check", "--help"], ["partials", "--help"]]
)
def test_help_and_version_import_no_torch(args):
    got = run_fresh(*args)
    assert got["code"] == 0 and got["out"].strip()
    assert "torch" not in got["modules"]


def test_shell_completion_imports_no_torch():
    code = (
        "import os, sys; os.environ.update(_JACCLI_COMPLETE='complete_bash', COMP_WORDS='jaccli jac', COMP_CWORD='1'); "
        "from jaccli.cli.main import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD_S)
    lines = done.stdout.split()
    assert "jacobian" in lines and lines[-1] == "False", (done.stdout, done.stderr)


def test_import_jaccli_imports_no_torch_until_a_name_is_used():
    code = (
        "import sys, jaccli; before = 'torch' in sys.modules; jaccli.jacobian; "
        "print(before, 'torch' in sys.modules, sorted(set(jaccli.__all__) - set(dir(jaccli))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.stdout.split() == ["False", "True", "[]"], done.stderr


def test_every_exported_name_resolves():
    for name in jaccli.__all__:
        assert getattr(jaccli, name) is not None
    assert callable(jaccli.check) and jaccli.check.__module__ == "jaccli.engine.check"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        jaccli.nope  # noqa: B018


# not .pt2: torch.export.load itself imports torch._dynamo (its serde module needs it)
@pytest.mark.parametrize("model", ["pinn.pt", "pinn.safetensors"])
@pytest.mark.parametrize("command", ["jacobian", "hessian"])
def test_a_per_sample_command_never_imports_dynamo(tmp_path, model, command):
    x = tmp_path / "x.npy"
    np.save(x, np.linspace(-1, 1, 50, dtype=np.float32)[:, None])
    got = run_fresh(command, str(EXAMPLES / model), str(x), "-p", "--save", str(tmp_path / "r.npy"), "-q")
    assert got["code"] == 0, got["out"]
    assert "torch._dynamo" not in got["modules"]


def loaded_after(code: str, modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` a fresh interpreter holds after running ``code``."""
    probe = f"{code}\nimport sys; print(' '.join(m for m in {modules!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_the_activation_byte_counter_does_not_wake_dynamo():
    # a plain TorchDispatchMode subclass imports torch._dynamo on its first op (~1 s)
    code = (
        "import torch\nfrom jaccli.curvature.runtime import _Bytes\n"
        "a, b, counter = torch.ones(4, 3), torch.ones(3, 2), _Bytes()\nwith counter:\n    a @ b\n"
        "assert counter.bytes == 4 * 2 * 4, counter.bytes"
    )
    assert loaded_after(code, ("torch._dynamo",)) == []


#: small runs of every command on TorchScript models, and the modules each must not import
SMALL_RUNS = {
    "jacobian": (["jacobian", "pinn.pt", "pinn_x.npy", "-p"], ("torch._dynamo", "sympy", "scipy", "pydantic", JVP_DECOMPOSITIONS)),
    "hessian": (["hessian", "pinn.pt", "pinn_x.npy", "-p"], ("torch._dynamo", "sympy", "scipy", "pydantic", JVP_DECOMPOSITIONS)),
    "info": (["info", "pinn.pt", "pinn_x.npy"], ("torch._dynamo", "sympy", "scipy", "pydantic", JVP_DECOMPOSITIONS)),
    "laplacian": (["laplacian", "pinn.pt", "pinn_x.npy", "-p"], ("torch._dynamo", "sympy", "scipy", "pydantic", JVP_DECOMPOSITIONS)),
    "divergence": (["divergence", "field.pt", "field_x.npy", "-p"], ("torch._dynamo", "sympy", "scipy", "pydantic", JVP_DECOMPOSITIONS)),
    # the gradient by torch.autograd (torch.func's reverse mode would import torch._dynamo)
    "grads": (["grads", "potential.pt", "potential_x.npy", "--loss", "output"], ("torch._dynamo", "scipy", "pydantic")),
    "partials": (["partials", "heat.pt", "heat_x.npy", "-p", "--in", "t,x", "--want", "u_x,u_xx"], ("torch._dynamo", "sympy", "scipy", "pydantic", JVP_DECOMPOSITIONS)),
}


@pytest.mark.parametrize("name", sorted(SMALL_RUNS))
def test_a_small_run_skips_the_big_imports(name):
    args, banned = SMALL_RUNS[name]
    got = run_fresh(*(str(EXAMPLES / a) if (EXAMPLES / a).is_file() else a for a in args), *(["-q"] if name != "info" else []))
    assert got["code"] == 0, got["out"]
    assert not set(banned) & set(got["modules"]), got["modules"]


def test_forward_mode_loads_the_decompositions_quietly_on_first_use():
    # a run that never takes torch.func's forward mode does not pay 0.15-0.3 s for them; one
    # that does gets them without torch's TorchScript deprecation warning
    code = (
        "import warnings, sys, torch\nwarnings.simplefilter('error')\n"
        "from jaccli.engine import strategies\n"
        f"assert {JVP_DECOMPOSITIONS!r} not in sys.modules\n"
        "t = strategies.jvp(torch.sin, (torch.zeros(3),), (torch.ones(3),))[1]\n"
        "assert torch.equal(t, torch.ones(3))"
    )
    assert loaded_after(code, (JVP_DECOMPOSITIONS,)) == [JVP_DECOMPOSITIONS]


def test_importing_the_cli_loads_none_of_the_big_modules():
    assert loaded_after("import jaccli.cli.main", HEAVY) == []


@pytest.fixture(scope="module")
def script_mlp(tmp_path_factory):
    """A TorchScript tanh MLP with its inputs and targets, as files."""
    import warnings

    import torch

    d = tmp_path_factory.mktemp("mlp")
    net = tanh_mlp((3, 16, 1), dtype=torch.float32)
    with warnings.catch_warnings():  # torch's deprecation of TorchScript; users still bring such files
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(net).save(str(d / "mlp.pt"))
    rng = np.random.default_rng(0)
    np.save(d / "x.npy", rng.standard_normal((64, 3)).astype(np.float32))
    np.save(d / "y.npy", rng.standard_normal((64, 1)).astype(np.float32))
    return d


def test_a_trace_estimate_imports_neither_scipy_nor_sympy(tmp_path):
    # the estimate runs on torch alone (no scipy operator), and a Hessian product's backward starts
    # from the scalar v·∇L (tensor grad_outputs would import symbolic_shapes, hence sympy); the
    # chunk (2048 points) is past the size where a block of columns runs as one batched backward
    import warnings

    import torch

    net = tanh_mlp((3, 64, 64, 1), dtype=torch.float32)  # P = 4 481: past the exact trace's limit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(net).save(str(tmp_path / "mlp.pt"))
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.standard_normal((2048, 3)).astype(np.float32))
    np.save(tmp_path / "y.npy", rng.standard_normal((2048, 1)).astype(np.float32))
    got = run_fresh("curvature", str(tmp_path / "mlp.pt"), str(tmp_path / "x.npy"), "--loss", "mse", "--target",
                    str(tmp_path / "y.npy"), "--trace", "--samples", "6", "--json")  # fmt: skip
    assert got["code"] == 0, got["out"]
    assert json.loads(got["out"])["trace_estimator"] is not None  # estimated, not exact
    assert not {"scipy", "sympy", "torch._dynamo"} & set(got["modules"]), got["modules"]


# the gradient, the per-sample rows of linear layers and the Hessian's products go through
# torch.autograd, as a PyHessian script does (torch.func's reverse mode imports torch._dynamo);
# sympy is not checked: these small chunks take the batched backward, whose tensor grad_outputs
# torch checks with symbolic_shapes (PyHessian's products import it too)
@pytest.mark.parametrize("extra", [
    ["grads"],
    ["grads", "--per-sample"],
    ["curvature", "--trace", "--eig", "2"],
    ["curvature", "--matrix", "ggn", "--eig", "2"],
])  # fmt: skip
def test_a_small_curvature_run_never_imports_dynamo(script_mlp, extra):
    d = script_mlp
    command, *options = extra
    got = run_fresh(command, str(d / "mlp.pt"), str(d / "x.npy"), "--loss", "mse", "--target", str(d / "y.npy"),
                    *options, "-q")  # fmt: skip
    assert got["code"] == 0, got["out"]
    assert "torch._dynamo" not in got["modules"]


#: runs ``python -m jaccli ARGS`` in this interpreter and reports every collection of the cyclic
#: garbage collector: whether torch was imported then, and how many objects were frozen
COLLECTIONS = """
import gc, json, runpy, sys
seen = []
gc.callbacks.append(lambda phase, info: phase == "start" and seen.append(("torch" in sys.modules, gc.get_freeze_count())))
sys.argv = ["jaccli", *json.loads(sys.argv[1])]
try:
    runpy.run_module("jaccli", run_name="__main__")
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "seen": seen, "enabled": gc.isenabled(), "frozen": gc.get_freeze_count()}))
"""


@pytest.mark.parametrize("command", [["laplacian", "-p", "-q"], ["info"], ["grads", "--loss", "output", "-q"]])
def test_the_process_walks_no_start_up_objects_in_a_collection(tmp_path, command):
    # jaccli.cli.collector: no full collection walks torch's ~170k objects while the command starts
    name, *options = command
    model, x = ("potential.pt", "potential_x.npy") if name == "grads" else ("pinn.pt", "pinn_x.npy")
    args = [name, str(EXAMPLES / model), str(EXAMPLES / x), *options]
    done = subprocess.run([sys.executable, "-c", COLLECTIONS, json.dumps(args)], capture_output=True, text=True,
                          timeout=HANG_GUARD_S, cwd=tmp_path)  # fmt: skip
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["code"] in (0, None), done.stderr
    assert got["enabled"] and got["frozen"] > 10_000, got  # resumed, with torch's objects frozen
    assert all(frozen for with_torch, frozen in got["seen"] if with_torch), got["seen"]


def test_only_the_process_entry_pauses_the_collector():
    # an embedding program (CliRunner, a script calling main()) keeps its collector as it is
    code = (
        "import gc\nfrom jaccli.cli import collector\n"
        "collector.resume(); assert gc.isenabled() and gc.get_freeze_count() == 0\n"
        "gc.disable(); collector.pause(); collector.resume(); assert not gc.isenabled()\n"
        "gc.enable(); collector.pause(); assert not gc.isenabled()\n"
        "x = []; x.append(x); collector.resume(); assert gc.isenabled() and gc.get_freeze_count() > 0\n"
        "collector.resume(); print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.stdout.split() == ["ok"], done.stderr
