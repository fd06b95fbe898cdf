"""One request path and one behaviour for every command (issue 19 "one request path",
issue 21 items 2, 4, 5, 7, 8, 9, 10), each driven through the real command."""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import jaccli
from jaccli.cli.main import COMMAND_EXAMPLES, app
from jaccli.request.kinds import kind, kinds
from problems import EXAMPLES, save_torchscript

runner = CliRunner()
HEAT = ["partials", EXAMPLES / "heat.pt", EXAMPLES / "heat_x.npy", "-p", "--in", "t,x"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def fresh(*args: str, env: dict | None = None) -> dict:
    """The command in a new interpreter: exit code, stderr and whether torch was imported."""
    code = (
        "import json, sys\nfrom jaccli.cli.main import app\nfrom typer.testing import CliRunner\n"
        "r = CliRunner().invoke(app, sys.argv[1:])\n"
        "print(json.dumps({'code': r.exit_code, 'err': r.stderr, 'torch': 'torch' in sys.modules}))"
    )
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the registry


def test_every_command_is_a_registered_kind_with_its_own_help():
    names = {c.name for c in app.registered_commands}
    for k in kinds():
        assert k.name in names and k.examples
        result = run(k.name, "--help")
        assert result.exit_code == 0 and k.examples[0] in " ".join(result.stdout.split())


def test_every_kind_resolves_its_engine_and_names_are_unique():
    from jaccli.request.kinds import Kind, register

    for k in kinds():
        assert callable(k.engine()) and k.engine().__name__ == k.name
    with pytest.raises(ValueError, match="registered already"):
        register(Kind(**{**kind("laplacian").__dict__, "title": "another"}))


def test_the_command_list_is_the_registry_then_info_check_example():
    from jaccli.cli.main import COMMAND_EXAMPLES

    names = [c.name for c in app.registered_commands]
    assert names == [k.name for k in kinds()] + ["info", "check", "example"]
    assert {"curvature", "grads"} <= set(names) and set(COMMAND_EXAMPLES) == {"info", "check"}
    # a kind with options of its own names its command; the shared one serves the planned kinds
    assert [k.name for k in kinds() if k.typer_command() is not None] == ["partials", "curvature", "grads"]
    assert all(k.planned == (k.command is None) for k in kinds())
    top = " ".join(run("--help").stdout.split())
    for k in kinds():
        assert k.help.split(".")[0][:40] in top


def test_result_names_come_from_the_kind():
    assert kind("jacobian").result_names(["t", "x"]) == [("jacobian_t", ("t",)), ("jacobian_x", ("x",))]
    assert [n for n, _ in kind("hessian").result_names(["t", "x"])] == ["hessian_t_t", "hessian_t_x", "hessian_x_t", "hessian_x_x"]
    assert kind("laplacian").result_names(["t", "x"]) == [("laplacian", ())]


# --------------------------------------------------------------------------- item 2: --select


def _classifier(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5)).double().eval()
    path = save_torchscript(net, tmp_path / "clf.pt")
    x = torch.randn(20, 3, dtype=torch.float64)
    np.save(tmp_path / "x.npy", x.numpy())
    return net, x, path, tmp_path / "x.npy"


def _jacobian64(net, x):
    return torch.func.vmap(torch.func.jacrev(net))(x)


@pytest.mark.parametrize("select, pick", [("2", lambda J, y: J[:, 2]), ("1:3", lambda J, y: J[:, 1:3]),
                                          ("argmax", lambda J, y: J[torch.arange(len(J)), y.argmax(1)]),
                                          ("argmin", lambda J, y: J[torch.arange(len(J)), y.argmin(1)])])  # fmt: skip
def test_select_matches_the_full_jacobian(tmp_path, select, pick):
    net, x, model, data = _classifier(tmp_path)
    out = tmp_path / "j.npy"
    result = run("jacobian", model, data, "-p", "--select", select, "--save", out, "-q")
    assert result.exit_code == 0, result.output
    want = pick(_jacobian64(net, x), net(x).detach())
    np.testing.assert_allclose(np.load(out), want.detach().numpy(), rtol=1e-12, atol=1e-12)


def test_select_in_python_and_only_the_selected_outputs_cost(tmp_path):
    net, x, _, _ = _classifier(tmp_path)
    H = jaccli.hessian(net, x, per_sample=True, select="argmax")
    full = torch.func.vmap(torch.func.hessian(net))(x)
    torch.testing.assert_close(H, full[torch.arange(len(x)), net(x).argmax(1)])
    # reverse mode differentiates the selected element only: one direction per point, not five
    assert jaccli.plan("jacobian", net, x, per_sample=True, select=3, mode="reverse").directions == 1
    assert jaccli.plan("jacobian", net, x, per_sample=True, mode="reverse").directions == 5


def test_select_out_of_range_is_a_usage_error_in_cli_words(tmp_path):
    _, _, model, data = _classifier(tmp_path)
    result = run("jacobian", model, data, "-p", "--select", "7")
    assert result.exit_code == 2 and "does not fit the output of one point" in result.stderr and "[5]" in result.stderr
    bad = run("jacobian", model, data, "-p", "--select", "two")
    assert bad.exit_code == 2 and "bad --select" in bad.stderr


# --------------------------------------------------------------------------- item 4: one behaviour


def test_partials_saves_several_tensors_to_stdout_as_npz():
    result = runner.invoke(app, [str(a) for a in [*HEAT, "--want", "u_x,u_xx", "--save", "-"]])
    assert result.exit_code == 0, result.stderr
    saved = np.load(io.BytesIO(result.stdout_bytes))
    assert sorted(saved) == ["u_x", "u_xx"] and saved["u_xx"].shape == (256, 1)
    want = jaccli.partials(jaccli.load_model(EXAMPLES / "heat.pt"), jaccli.load_tensor(EXAMPLES / "heat_x.npy"),
                           ["u_xx"], inputs="t,x", per_sample=True)["u_xx"]  # fmt: skip
    np.testing.assert_array_equal(saved["u_xx"], want.numpy())


def test_jacobian_of_two_arguments_to_stdout_is_an_npz(tmp_path):
    data = EXAMPLES / "decay_inputs.npz"
    result = runner.invoke(app, ["jacobian", str(EXAMPLES / "decay.pt"), "-i", f"t={data}:t", "-i", f"x={data}:x", "-p",
                                 "--wrt", "t", "--wrt", "x", "--save", "-"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert sorted(np.load(io.BytesIO(result.stdout_bytes))) == ["jacobian_t", "jacobian_x"]


def test_partials_plot_summary_and_json(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "u.png"
    result = run(*HEAT, "--want", "u_x,r = u_t - 0.1*u_xx", "--plot", png, "--summary", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    u_x = np.array(doc["results"]["u_x"]["values"]).reshape(-1)
    s = doc["summary"]["u_x"]["components"]["out"]
    assert s["max"] == pytest.approx(u_x.max()) and s["median"] == pytest.approx(np.median(u_x), abs=0.05)
    assert s["worst_point"] == int(np.abs(u_x).argmax())


@pytest.mark.parametrize("command", ["divergence", "laplacian"])
def test_summary_on_every_command(command):
    model, data = (EXAMPLES / "field.pt", EXAMPLES / "field_x.npy")
    result = run(command, model, data, "-p", "--summary", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    values = np.array(doc["results"][command]["values"]).reshape(len(np.load(data)), -1)
    rows = doc["summary"][command]["components"]
    first = next(iter(rows.values()))
    assert first["min"] == pytest.approx(values[:, 0].min()) and first["max"] == pytest.approx(values[:, 0].max())


# --------------------------------------------------------------------------- item 5: CLI words


def test_partials_without_per_sample_hints_the_cli_option():
    result = run("partials", EXAMPLES / "heat.pt", EXAMPLES / "heat_x.npy", "--in", "t,x", "--want", "u_t")
    assert result.exit_code == 2 and "--per-sample" in result.stderr and "per_sample=True" not in result.stderr
    with pytest.raises(jaccli.UsageError, match="per_sample=True"):
        jaccli.partials(jaccli.load_model(EXAMPLES / "heat.pt"), jaccli.load_tensor(EXAMPLES / "heat_x.npy"), ["u_t"],
                        inputs="t,x")  # fmt: skip


def test_a_whole_input_too_large_hints_per_sample_in_cli_words(tmp_path):
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((60000, 1), dtype=np.float32))
    result = run("hessian", EXAMPLES / "pinn.pt", x)
    assert result.exit_code == 6 and "pass --per-sample" in result.stderr and "per_sample=True" not in result.stderr


def test_two_arguments_without_wrt_hint_the_option():
    data = EXAMPLES / "decay_inputs.npz"
    result = run("jacobian", EXAMPLES / "decay.pt", "-i", f"t={data}:t", "-i", f"x={data}:x", "-p")
    assert result.exit_code == 2 and "--wrt" in result.stderr and "wrt=" not in result.stderr


# --------------------------------------------------------------------------- item 7: the gate line


def test_the_gate_line_says_the_comparison_and_the_inputs_of_the_worst_point():
    result = run(*HEAT, "--want", "r = u_t - u_xx", "--fail-above", "r=1e-3")
    assert result.exit_code == 9
    x = np.load(EXAMPLES / "heat_x.npy")
    line = [l for l in result.stdout.splitlines() if l.startswith("r: max |r|")][0]
    assert line.endswith(": FAIL") and " > 0.001 at point " in line
    point = int(line.split(" at point ")[1].split()[0])
    t, xx = x[point]
    assert f"(t={t:.4g}, x={xx:.4g})" in line
    assert result.stderr.strip().endswith(line.removesuffix(": FAIL"))
    ok = run(*HEAT, "--want", "r = u_t - 0.1*u_xx", "--fail-above", "r=1e-3")
    assert ok.exit_code == 0 and " ≤ 0.001 at point " in ok.stdout and ": PASS" in ok.stdout


# --------------------------------------------------------------------------- items 8 and 10: before torch


@pytest.mark.parametrize(
    "args, listed",
    [
        (["jacobian", "m.pt", "x.npy", "--dtype", "float16"], "float32"),
        (["hessian", "m.pt", "x.npy", "--mode", "fwd"], "forward"),
        (["divergence", "m.pt", "x.npy", "--estimator", "hutch"], "hutchinson"),
        (["partials", "m.pt", "x.npy", "--want", "u_x", "--dtype", "half"], "float64"),
        (["laplacian", "m.pt", "x.npy", "--arch", "mlp", "--activation", "swish"], "softplus"),
        (["example", "nope"], "pinn"),
    ],
)
def test_bad_choices_are_refused_before_torch_with_the_choices(args, listed):
    got = fresh(*args)
    assert got["code"] == 2 and listed in got["err"] and not got["torch"], got


@pytest.mark.parametrize("command", ["jacobian", "hessian", "divergence", "laplacian", "partials"])
def test_help_lists_the_choices(command):
    text = " ".join(CliRunner(env={"COLUMNS": "250"}).invoke(app, [command, "--help"]).stdout.split())
    assert "<float32|float64>" in text
    if command != "partials":
        assert "<auto|forward|reverse>" in text


@pytest.mark.parametrize("command", ["jacobian", "partials"])
def test_plot_without_matplotlib_fails_before_torch(tmp_path, command):
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\nclass _No:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'matplotlib' or name.startswith('matplotlib.'):\n"
        "            raise ModuleNotFoundError(name)\n        return None\n"
        "sys.meta_path.insert(0, _No())\n"
    )
    args = [command, str(EXAMPLES / "heat.pt"), str(EXAMPLES / "heat_x.npy"), "-p", "--plot", str(tmp_path / "p.png")]
    if command == "partials":
        args += ["--in", "t,x", "--want", "u_x"]
    got = fresh(*args, env={"PYTHONPATH": f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert got["code"] == 10 and "matplotlib" in got["err"] and not got["torch"], got
    assert not (tmp_path / "p.png").exists()


# --------------------------------------------------------------------------- item 9: examples that run as written


def _help_examples() -> list[str]:
    found = [e for k in kinds() for e in k.examples] + list(COMMAND_EXAMPLES.values())
    assert len(found) >= 2 * len(kinds())
    return found


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("examples")
    done = subprocess.run([sys.executable, "-m", "jaccli", "example", "all", str(out)], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out


def test_example_writes_what_the_repository_ships(example_dir):
    # files only: Python's bytecode cache (examples/models/__pycache__, written where the
    # generator is imported without PYTHONDONTWRITEBYTECODE) is not shipped
    shipped = sorted(p.name for p in EXAMPLES.iterdir() if p.is_file() and p.suffix != ".py")
    assert sorted(p.name for p in example_dir.iterdir()) == shipped
    for name in ("heat_x.npy", "decay_inputs.npz", "pinn_x.npy"):
        assert (example_dir / name).read_bytes() == (EXAMPLES / name).read_bytes()
    x = jaccli.load_tensor(EXAMPLES / "pinn_x.npy")
    torch.testing.assert_close(jaccli.load_model(example_dir / "pinn.pt")(x), jaccli.load_model(EXAMPLES / "pinn.pt")(x))


def test_example_names_are_the_generators():
    from jaccli.cli import example_models
    from jaccli.cli.main import EXAMPLE_NAMES

    assert list(EXAMPLE_NAMES) == list(example_models.examples())


def test_example_refuses_to_overwrite(example_dir):
    result = run("example", "heat", example_dir)
    assert result.exit_code == 7 and "--force" in result.stderr


@pytest.mark.parametrize("line", _help_examples())
def test_every_help_example_runs_as_written(example_dir, line):
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(line, shell=True, cwd=example_dir, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, (line, done.stderr[-2000:])
    words = shlex.split(line.split("|")[0].split(">")[0])
    if "--save" in words and words[words.index("--save") + 1] != "-":
        assert (example_dir / words[words.index("--save") + 1]).exists()


def test_select_on_info_and_check(tmp_path):
    net, x, model, data = _classifier(tmp_path)
    info = run("info", model, data, "--select", "1:4", "--json")
    assert info.exit_code == 0 and json.loads(info.stdout)["output_shape"] == [3]
    check = run("check", model, data, "--select", "argmax", "--hessian", "--json")
    doc = json.loads(check.stdout)
    assert check.exit_code == 0 and doc["passed"] and doc["jacobian_error"] < 1e-7
    report = jaccli.check(net, x, select="argmax")
    assert report.passed and report.jacobian_error < 1e-7
