"""The real ``jaccli`` command, driven through Typer's CliRunner (and a subprocess where it matters)."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import jaccli
from jaccli.cli.main import app
from jaccli.errors import EXIT_CODES
from problems import BLOCKED, EXAMPLES, HANG_GUARD_S, ROOT, save_export, tanh_mlp

runner = CliRunner(env={"COLUMNS": "200"})  # wide enough that Rich does not wrap long paths


def run(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def ex(name: str) -> str:
    return str(EXAMPLES / name)


def _load(path):
    return jaccli.load_tensors(path)


# ----------------------------------------------------------------- every command on every example


# (command, model, input, extra args, expected result shape)
CASES = [
    ("jacobian", "pinn.pt", "pinn_x.npy", ["-p"], (1000, 501, 1)),
    ("jacobian", "pinn.pt2", "pinn_x.npy", ["-p"], (1000, 501, 1)),
    ("hessian", "pinn.pt", "pinn_x.npy", ["-p"], (1000, 501, 1, 1)),
    ("laplacian", "pinn.pt2", "pinn_x.npy", ["-p"], (1000, 501)),
    ("jacobian", "ode.pt", "ode_x.npy", ["-p"], (200, 2, 1)),
    ("hessian", "ode.pt2", "ode_x.npy", ["-p"], (200, 2, 1, 1)),
    ("jacobian", "field.pt2", "field_x.npy", ["-p"], (500, 3, 3)),
    ("divergence", "field.pt", "field_x.npy", ["-p"], (500,)),
    ("divergence", "field.pt2", "field_x.npy", ["-p", "--mode", "reverse"], (500,)),
    ("hessian", "potential.pt", "potential_x.npy", ["-p"], (500, 3, 3)),
    ("laplacian", "potential.pt2", "potential_x.npy", ["-p"], (500,)),
    ("jacobian", "field.pt", "field_x.npy", [], (500, 3, 500, 3)),
    ("laplacian", "potential.pt", "potential_x.npy", ["--chunk-size", "7"], (500,)),
]


@pytest.mark.parametrize("command,model,inp,extra,shape", CASES, ids=[f"{c[0]}-{c[1]}-{'-'.join(c[3])}" for c in CASES])
def test_commands_on_examples_save_the_api_result(tmp_path, command, model, inp, extra, shape):
    out = tmp_path / "r.npy"
    result = run(command, ex(model), ex(inp), *extra, "--save", out, "--quiet")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    saved = np.load(out)
    assert saved.shape == shape
    # the CLI calls the API: same numbers as calling it directly
    net = jaccli.load_model(ex(model))
    x = jaccli.load_tensor(ex(inp))
    kwargs = {"per_sample": "-p" in extra}
    if "--mode" in extra:
        kwargs["mode"] = extra[extra.index("--mode") + 1]
    want = getattr(jaccli, command)(net, x, **kwargs)
    np.testing.assert_allclose(saved, want.numpy(), rtol=1e-6, atol=1e-7)


def test_potential_hessian_on_the_command_line_is_the_closed_form(tmp_path):
    from problems import POTENTIAL, _potential_h

    out = tmp_path / "h.npy"
    assert run("hessian", ex("potential.pt2"), ex("potential_x.npy"), "-p", "--dtype", "float64", "--save", out, "-q").exit_code == 0
    x = np.load(ex("potential_x.npy")).astype(np.float64)
    want = torch.stack([_potential_h(torch.from_numpy(xi)) for xi in x]).numpy()
    np.testing.assert_allclose(np.load(out), want, rtol=1e-6, atol=1e-6)
    assert POTENTIAL is not None


def test_summary_names_axes_and_stats():
    result = run("jacobian", ex("pinn.pt2"), ex("pinn_x.npy"), "--per-sample")
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    assert "[sample=1000, out=501, in=1]" in text
    for word in ["per-sample Jacobian", "forward mode (taylor)", "min / max / mean", "all finite", "preview", "time", "30,751 parameters"]:
        assert word in text


def test_verbose_names_the_engine_and_the_op_that_keeps_the_fast_path_off(tmp_path):
    class LogGamma(torch.nn.Module):
        def forward(self, x):
            return torch.lgamma(2 + torch.tanh(x))  # lgamma has no Taylor rule

    save_export(LogGamma(), torch.zeros(4, 3), tmp_path / "lgamma.pt2")
    result = run("jacobian", tmp_path / "lgamma.pt2", ex("field_x.npy"), "-p", "-q", "--verbose")
    assert result.exit_code == 0, result.stderr
    assert "torch.func engine" in result.stderr and "Taylor path not used" in result.stderr
    assert "aten.lgamma" in result.stderr
    fast = run("jacobian", ex("pinn.pt"), ex("pinn_x.npy"), "-p", "-q", "-v")
    assert "taylor engine" in fast.stderr
    assert json.loads(run("jacobian", ex("pinn.pt"), ex("pinn_x.npy"), "-p", "--json").stdout)["plan"]["engine"] == "taylor"


def test_hutchinson_reports_a_standard_error():
    result = run("divergence", ex("field.pt2"), ex("field_x.npy"), "-p", "--estimator", "hutchinson", "--probes", "32", "--seed", "1")
    assert result.exit_code == 0, result.stderr
    assert "Hutchinson, 32 probes" in result.stdout and "standard error" in result.stdout


def test_hutchinson_saves_estimate_and_stderr(tmp_path):
    out = tmp_path / "d.npz"
    assert run("divergence", ex("field.pt2"), ex("field_x.npy"), "-p", "--estimator", "hutchinson", "--save", out, "-q").exit_code == 0
    saved = _load(out)
    assert set(saved) == {"divergence", "stderr"} and saved["stderr"].shape == (500,)


# ----------------------------------------------------------------- machine-readable output


def test_json_schema():
    result = run("hessian", ex("potential.pt"), ex("potential_x.npy"), "-p", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema"] == "jaccli.result" and doc["version"] == 1
    assert set(doc) >= {"command", "model", "inputs", "wrt", "per_sample", "plan", "results", "warnings", "seconds", "saved_to"}
    res = doc["results"]["hessian"]
    assert res["shape"] == [500, 3, 3] and res["axes"] == ["sample", "in", "in'"]
    assert res["all_finite"] is True and res["values"] is not None
    assert doc["plan"]["mode"] in ("forward", "reverse") and doc["inputs"]["x"]["shape"] == [500, 3]
    assert doc["wrt"] == ["x"]


def test_json_omits_values_of_large_results():
    doc = json.loads(run("jacobian", ex("pinn.pt"), ex("pinn_x.npy"), "-p", "--json").stdout)
    assert doc["results"]["jacobian"]["values"] is None


def test_dry_run_computes_nothing_and_reports_the_plan(tmp_path):
    out = tmp_path / "r.npy"
    result = run("hessian", ex("pinn.pt"), ex("pinn_x.npy"), "-p", "--dry-run", "--save", out)
    assert result.exit_code == 0, result.stderr
    assert "plan (nothing computed)" in result.stdout and "peak memory" in result.stdout
    assert not out.exists()
    plan = json.loads(run("hessian", ex("pinn.pt"), ex("pinn_x.npy"), "-p", "--dry-run", "--json").stdout)
    assert plan["schema"] == "jaccli.plan" and plan["result_shape"] == [1000, 501, 1, 1]
    assert plan["peak_bytes_estimate"] >= plan["result_bytes"] > 0


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".pt", ".safetensors"])
def test_save_formats(tmp_path, suffix):
    out = tmp_path / f"J{suffix}"
    assert run("jacobian", ex("field.pt"), ex("field_x.npy"), "-p", "--save", out, "-q").exit_code == 0
    (got,) = _load(out).values()
    assert tuple(got.shape) == (500, 3, 3)


def test_safetensors_result_carries_metadata(tmp_path):
    from safetensors import safe_open

    out = tmp_path / "J.safetensors"
    assert run("jacobian", ex("field.pt"), ex("field_x.npy"), "-p", "--save", out, "-q").exit_code == 0
    with safe_open(str(out), "pt") as fh:
        meta = fh.metadata()
    assert meta["command"] == "jacobian" and json.loads(meta["per_sample"]) is True
    assert json.loads(meta["axes"]) == {"jacobian": ["sample", "out", "in"]}


def test_save_to_stdout_is_npy_bytes():
    result = run("jacobian", ex("ode.pt2"), ex("ode_x.npy"), "-p", "--save", "-", "-q")
    assert result.exit_code == 0, result.stderr
    assert np.load(io.BytesIO(result.stdout_bytes)).shape == (200, 2, 1)


def test_stdin_input():
    buf = io.BytesIO()
    np.save(buf, np.load(ex("ode_x.npy")))
    result = run("jacobian", ex("ode.pt"), "-", "-p", "--json", input=buf.getvalue())
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["results"]["jacobian"]["shape"] == [200, 2, 1]


def test_shell_pipeline_through_the_installed_command(tmp_path):
    """cat x.npy | jaccli jacobian m.pt - --per-sample --save - | python (numpy.load needs a seekable stream)."""
    reader = "import io, sys, numpy; print(numpy.load(io.BytesIO(sys.stdin.buffer.read())).shape)"
    pipeline = (
        f"cat {ex('pinn_x.npy')} | {sys.executable} -m jaccli jacobian {ex('pinn.pt')} - --per-sample --save - | "
        f'{sys.executable} -c "{reader}"'
    )
    done = subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(1000, 501, 1)"
    assert "per-sample Jacobian" in done.stderr  # the summary moves to stderr when stdout carries data


# ----------------------------------------------------------------- several inputs


@pytest.fixture
def two_arg_model(tmp_path):
    class G(torch.nn.Module):
        def forward(self, t, x):
            return torch.sin(t)[:, None, None, None] * x**2

    t = torch.rand(5)
    x = torch.rand(5, 3, 2, 2)
    batch = torch.export.Dim("batch")
    torch.export.save(
        torch.export.export(G(), (t, x), dynamic_shapes={"t": {0: batch}, "x": {0: batch}}), tmp_path / "g.pt2"
    )
    np.savez(tmp_path / "tx.npz", t=t.numpy(), x=x.numpy())
    return tmp_path / "g.pt2", tmp_path / "tx.npz", t, x


def test_two_arguments_from_one_npz(two_arg_model, tmp_path):
    model, data, t, x = two_arg_model
    out = tmp_path / "J.npz"
    result = run("jacobian", model, data, "-p", "--wrt", "t", "--wrt", "x", "--save", out, "-q")
    assert result.exit_code == 0, result.stderr
    saved = _load(out)
    assert tuple(saved["jacobian_t"].shape) == (5, 3, 2, 2)
    assert tuple(saved["jacobian_x"].shape) == (5, 3, 2, 2, 3, 2, 2)
    torch.testing.assert_close(saved["jacobian_t"], torch.cos(t)[:, None, None, None] * x**2)


def test_two_arguments_from_input_specs_and_flatten(two_arg_model, tmp_path):
    model, data, t, x = two_arg_model
    np.save(tmp_path / "t.npy", t.numpy())
    out = tmp_path / "Jx.npy"
    result = run("jacobian", model, "--input", f"t={tmp_path / 't.npy'}", "--input", f"x={data}:x", "-p", "--wrt", "x", "--flatten", "--save", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert np.load(out).shape == (5, 12, 12)
    assert json.loads(result.stdout)["results"]["jacobian"]["axes"] == ["sample", "out", "in"]


def test_two_arguments_without_wrt_is_an_error(two_arg_model):
    model, data, _, _ = two_arg_model
    result = run("jacobian", model, data, "-p")
    assert result.exit_code == EXIT_CODES[jaccli.UsageError]
    assert "--wrt" in result.stderr and "t, x" in result.stderr


# ----------------------------------------------------------------- errors: one line, documented code


def _one_line_error(result, code: int, *needles: str):
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    for needle in needles:
        assert re.search(needle, lines[0]), (needle, lines[0])


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "garbage.pt").write_bytes(b"\x00" * 100)
    (tmp_path / "x3.npy").write_bytes(b"")
    np.save(tmp_path / "x3.npy", np.zeros((4, 3), np.float32))
    np.save(tmp_path / "x2.npy", np.zeros((4, 2), np.float32))
    np.save(tmp_path / "nan.npy", np.array([[np.nan]], np.float32))
    np.save(tmp_path / "int.npy", np.arange(4)[:, None])
    (tmp_path / "exists.npy").write_bytes(b"keep me")
    (tmp_path / "lfs.pt").write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:1\nsize 2\n")
    np.savez(tmp_path / "two.npz", a=np.zeros((4, 1)), b=np.zeros((4, 1)))
    torch.save(torch.nn.Linear(1, 1), tmp_path / "pickled.pt")
    for name in ("pinn.pt2", "pinn.pt"):
        data = (EXAMPLES / name).read_bytes()
        (tmp_path / f"half{name[4:]}").write_bytes(data[: len(data) // 2])
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000), }"
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    (tmp_path / "huge.npy").write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\0" * 64)
    from safetensors.numpy import save

    blob = save({"x": np.zeros((10, 1), np.float32)})
    (tmp_path / "half.safetensors").write_bytes(blob[: len(blob) - 8])
    np.save(tmp_path / "complex.npy", np.ones((4, 1), np.complex64))
    return tmp_path


ERRORS = [
    # (args, exit code class, patterns in the one line)
    (["jacobian", "{d}/missing.pt", "{ex}/pinn_x.npy"], jaccli.InputError, ["missing.pt", "no such model file"]),
    (["jacobian", "{d}", "{ex}/pinn_x.npy"], jaccli.InputError, ["is a directory"]),
    (["jacobian", "{ex}/pinn.pt", "{d}/empty.npy"], jaccli.InputError, ["empty.npy", "empty tensor file"]),
    (["jacobian", "{d}/garbage.pt", "{ex}/pinn_x.npy"], jaccli.InputError, ["garbage.pt", "not a model file"]),
    (["jacobian", "{d}/lfs.pt", "{ex}/pinn_x.npy"], jaccli.InputError, ["Git LFS pointer", "git lfs pull"]),
    (["jacobian", "{d}/pickled.pt", "{ex}/pinn_x.npy"], jaccli.InputError, ["pickled model"]),
    (["jacobian", "{ex}/pinn.pt", "{ex}/pinn.pt"], jaccli.InputError, ["pinn.pt", "TorchScript model, not a tensor file"]),
    (["jacobian", "{ex}/pinn.pt", "{d}/two.npz"], jaccli.InputError, ["several tensors", "--key with one of a, b"]),
    (["jacobian", "{ex}/pinn.pt", "{d}/x3.npy", "-p"], jaccli.ModelError, [r"failed on input \[4, 3\]"]),
    (["jacobian", "{ex}/pinn.pt2", "{d}/x3.npy", "-p"], jaccli.ModelError, [r"expected \[\*, 1\]"]),
    (["divergence", "{ex}/pinn.pt", "{ex}/pinn_x.npy", "-p"], jaccli.ModelError, ["square Jacobian", r"\[1\]", r"\[501\]"]),
    (["jacobian", "{ex}/pinn.pt", "{ex}/pinn_x.npy", "--device", "cuda:7"], jaccli.ResourceError, ["not available", "cpu"]),
    (["jacobian", "{ex}/pinn.pt", "{ex}/pinn_x.npy", "--device", "gpu"], jaccli.UsageError, ["unknown device"]),
    (["jacobian", "{ex}/pinn.pt", "{ex}/pinn_x.npy", "--dtype", "float16"], jaccli.UsageError, ["float32, float64", "float16"]),
    (["jacobian", "{ex}/pinn.pt", "{ex}/pinn_x.npy", "--mode", "sideways"], jaccli.UsageError, ["auto, forward, reverse"]),
    (["jacobian", "{ex}/pinn.pt", "{ex}/pinn_x.npy", "--save", "{d}/exists.npy"], jaccli.OutputError, ["already exists", "--force"]),
    (["jacobian", "{ex}/pinn.pt", "{ex}/pinn_x.npy", "--save", "{d}/no/dir/J.npy"], jaccli.OutputError, ["does not exist"]),
    (["jacobian", "{ex}/pinn.pt", "{ex}/pinn_x.npy", "--save", "/sys/J.npy"], jaccli.OutputError, ["not writable"]),
    (["jacobian", "{ex}/pinn.pt", "{ex}/pinn_x.npy", "--save", "{d}/J.h5"], jaccli.UsageError, ["suffix", ".h5"]),
    (["jacobian", "{d}/half.pt2", "{ex}/pinn_x.npy"], jaccli.InputError, ["half.pt2"]),
    (["jacobian", "{d}/half.pt", "{ex}/pinn_x.npy"], jaccli.InputError, ["half.pt"]),
    (["jacobian", "{ex}/pinn.pt", "{d}/huge.npy"], jaccli.InputError, ["promises more data"]),
    (["jacobian", "{ex}/pinn.pt", "{d}/half.safetensors"], jaccli.InputError, ["corrupt .safetensors"]),
    (["jacobian", "{ex}/pinn.pt", "{d}/complex.npy", "-p"], jaccli.InputError, ["complex inputs"]),
    (["jacobian", "{ex}/pinn_state.pt", "{ex}/pinn_x.npy", "--arch", "mlp"], jaccli.UsageError, ["needs --activation"]),
    (["jacobian", "{ex}/pinn_state.pt", "{ex}/pinn_x.npy", "--arch", "x.py:f", "--arch-kwargs", "{{oops"], jaccli.UsageError, ["not JSON"]),
    (["jacobian", "{ex}/pinn.pt", "{ex}/pinn_x.npy", "--save", "-", "--json"], jaccli.UsageError, ["stdout"]),
    (["jacobian", "{ex}/pinn.pt", "{d}/nan.npy", "-p", "--strict"], jaccli.NumericalError, ["input .input. holds NaN or Inf"]),
    (["hessian", "{ex}/pinn.pt", "{ex}/pinn_x.npy", "--probes", "3"], jaccli.UsageError, ["options of divergence"]),
    (["divergence", "{ex}/field.pt", "{ex}/field_x.npy", "--estimator", "guess"], jaccli.UsageError, ["exact, hutchinson"]),
    (["jacobian", "{ex}/pinn.pt", "{ex}/pinn_x.npy", "--chunk-size", "x"], jaccli.UsageError, ["chunk-size", "jaccli jacobian --help"]),
    (["jacobian", "{ex}/pinn.pt", "{ex}/pinn_x.npy", "--no-such-option"], jaccli.UsageError, ["no-such-option"]),
    (["jacobian", "{ex}/pinn.pt", "{ex}/pinn_x.npy", "--input", "t"], jaccli.UsageError, ["NAME=FILE"]),
    (["jacobian", "{ex}/pinn.pt"], jaccli.UsageError, ["no input"]),
    (["jacobian", "{ex}/pinn.pt", "{ex}/pinn_x.npy", "--output", "3"], jaccli.ModelError, ["single tensor"]),
]


@pytest.mark.parametrize("args,error,needles", ERRORS, ids=[" ".join(e[0][:1] + e[0][3:5]) + f"-{i}" for i, e in enumerate(ERRORS)])
def test_errors_are_one_line_with_a_documented_code(bad_files, args, error, needles):
    filled = [a.format(d=bad_files, ex=EXAMPLES) for a in args]
    result = run(*filled)
    _one_line_error(result, EXIT_CODES[error], *needles)
    assert (bad_files / "exists.npy").read_bytes() == b"keep me"
    assert not list(bad_files.glob("*.part")) and not list(bad_files.glob(".*.part"))


def _rename_op(src, dst, old: bytes, new: bytes) -> None:
    """A copy of a zip archive (TorchScript, .pt2) with every mention of an op namespace replaced."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, zin.read(item).replace(old, new))


@pytest.fixture(scope="module")
def blocked_files(tmp_path_factory):
    """Models no derivative gets through, or that cannot take the input given."""
    d = tmp_path_factory.mktemp("blocked")
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0)) * 3
    np.save(d / "x.npy", x.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation, the tracer's and export's notes
        for name, (factory, _) in BLOCKED.items():
            module = factory().eval()
            save_export(module, x[:4], d / f"{name}.pt2")
            torch.jit.save(torch.jit.trace(module, x[:4], check_trace=False), d / f"{name}.pt")
        torch.manual_seed(0)
        gru = _LastStep(torch.nn.GRU(2, 3, batch_first=True)).eval()
        save_export(gru, torch.zeros(2, 4, 2), d / "gru.pt2")  # the sequence length is fixed at 4
        save_export(_CDist().eval(), x[:4], d / "cdist.pt2")
    for suffix in (".pt", ".pt2"):  # as loaded where no library registers the op
        _rename_op(d / f"custom_op{suffix}", d / f"unregistered{suffix}", b"jaccli_tests", b"jaccli_absent")
    np.save(d / "seq5.npy", np.zeros((6, 5, 2), np.float32))
    return d


class _LastStep(torch.nn.Module):
    def __init__(self, rnn) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)[0][:, -1]


class _CDist(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = torch.nn.Parameter(torch.ones(2, 3))

    def forward(self, x):
        return torch.cdist(x, self.c, compute_mode="donot_use_mm_for_euclid_dist")  # no double backward


BLOCKED_ERRORS = [
    # (args, exit code class, patterns in the one line): the op, and what would work
    (["jacobian", "{d}/int_cast.pt2", "{d}/x.npy", "-p"], jaccli.ModelError, [r"input 'x' only through .*aten\._to_copy to int64", "floating point"]),
    (["hessian", "{d}/argmax.pt", "{d}/x.npy"], jaccli.ModelError, [r"aten\.argmax", "no derivative command"]),
    (["laplacian", "{d}/step.pt2", "{d}/x.npy", "-p"], jaccli.ModelError, [r"aten\.gt"]),
    (["check", "{d}/floor.pt2", "{d}/x.npy", "--hessian"], jaccli.ModelError, [r"aten\.floor"]),
    (["jacobian", "{d}/custom_op.pt2", "{d}/x.npy", "-p"], jaccli.ModelError, ["custom op jaccli_tests::cube", "torch.autograd.Function"]),
    (["hessian", "{d}/custom_op.pt", "{d}/x.npy", "-p", "--mode", "reverse"], jaccli.ModelError, ["jaccli_tests::cube"]),
    (["jacobian", "{d}/unregistered.pt2", "{d}/x.npy"], jaccli.InputError, ["custom op jaccli_absent::cube", "jaccli.load_model"]),
    (["jacobian", "{d}/unregistered.pt", "{d}/x.npy"], jaccli.InputError, ["custom op jaccli_absent::cube"]),
    (["jacobian", "{d}/gru.pt2", "{d}/seq5.npy", "-p"], jaccli.ModelError, [r"expected \[\*, 4, 2\], got \[6, 5, 2\]", "axis 1 was fixed at 4"]),
    (["hessian", "{d}/cdist.pt2", "{d}/x.npy", "-p"], jaccli.ModelError, [r"aten\._cdist_backward", "jaccli jacobian"]),
]


@pytest.mark.parametrize("args,error,needles", BLOCKED_ERRORS, ids=[f"{e[0][0]}-{e[0][1][4:]}" for e in BLOCKED_ERRORS])
def test_models_that_cannot_be_differentiated_or_called_fail_in_one_line(blocked_files, args, error, needles):
    import logging

    # torch.export logs a failed load with its traceback through a handler of its own, on
    # the real stderr (out of CliRunner's sight): nothing may reach it
    logged: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = logged.append
    logging.getLogger("torch.export").addHandler(handler)
    try:
        result = run(*[a.format(d=blocked_files) for a in args])
    finally:
        logging.getLogger("torch.export").removeHandler(handler)
    _one_line_error(result, EXIT_CODES[error], *needles)
    assert not logged


def test_warnings_go_to_stderr_and_json(bad_files):
    result = run("jacobian", ex("pinn.pt"), bad_files / "int.npy", "-p", "--json")
    assert result.exit_code == 0, result.stderr
    assert "warning:" in result.stderr and "cast to float32" in result.stderr
    assert any("cast to float32" in w for w in json.loads(result.stdout)["warnings"])


def test_relu_model_warns_on_the_command_line(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1)).eval()
    save_export(net, torch.zeros(4, 2), tmp_path / "relu.pt2")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((10, 2)).astype(np.float32))
    result = run("laplacian", tmp_path / "relu.pt2", tmp_path / "x.npy", "-p", "-q")
    assert result.exit_code == 0
    assert "identically zero" in result.stderr and "relu" in result.stderr


def test_batch_mixing_model_is_refused_with_an_escape_hatch(tmp_path):
    class Centre(torch.nn.Module):
        def forward(self, x):
            return x - x.mean(0)

    save_export(Centre(), torch.zeros(4, 3), tmp_path / "centre.pt2")
    np.save(tmp_path / "x.npy", np.ones((6, 3), np.float32))
    _one_line_error(run("jacobian", tmp_path / "centre.pt2", tmp_path / "x.npy", "-p"), EXIT_CODES[jaccli.ModelError], "mixes batch elements", "--no-batch-check")
    assert run("jacobian", tmp_path / "centre.pt2", tmp_path / "x.npy", "-p", "--no-batch-check", "-q").exit_code == 0


def test_result_too_large_is_refused_quickly(tmp_path):
    np.save(tmp_path / "big.npy", np.zeros((100_000,), np.float32))
    save_export(torch.nn.Identity(), torch.zeros(5), tmp_path / "id.pt2")
    result = run("jacobian", tmp_path / "id.pt2", tmp_path / "big.npy")
    _one_line_error(result, EXIT_CODES[jaccli.ResourceError], "would not fit in memory", "GiB")


def test_exit_codes_table_in_readme_matches_the_code():
    readme = (ROOT / "README.md").read_text()
    for cls, code in EXIT_CODES.items():
        assert re.search(rf"\|\s*{code}\s*\|\s*`{cls.__name__}`", readme), cls.__name__


# ----------------------------------------------------------------- check


@pytest.mark.parametrize("model,inp", [("pinn.pt", "pinn_x.npy"), ("potential.pt2", "potential_x.npy"), ("pinn.safetensors", "pinn_x.npy")])
def test_check_passes_on_examples(model, inp):
    result = run("check", ex(model), ex(inp), "--hessian", "--points", "3")
    assert result.exit_code == 0, result.stderr
    assert "PASS" in result.stdout and "Jacobian vs finite differences" in result.stdout


def test_check_fails_with_exit_8_on_a_wrong_derivative(tmp_path):
    class Detached(torch.nn.Module):
        def forward(self, x):
            return x.detach() * 2 + x  # the derivative misses the detached branch

    save_export(Detached(), torch.zeros(4, 2), tmp_path / "d.pt2")
    np.save(tmp_path / "x.npy", np.ones((5, 2), np.float32))
    result = run("check", tmp_path / "d.pt2", tmp_path / "x.npy", "--json")
    assert result.exit_code == EXIT_CODES[jaccli.CheckFailed]
    doc = json.loads(result.stdout)
    assert doc["schema"] == "jaccli.check" and doc["passed"] is False and doc["jacobian_error"] > 0.5
    assert len(result.stderr.strip().splitlines()) == 1 and "differs from finite differences" in result.stderr


# ----------------------------------------------------------------- info, help, version


def test_info_on_a_model_and_an_input():
    result = run("info", ex("pinn.pt"), ex("pinn_x.npy"), "--json")
    assert result.exit_code == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts["schema"] == "jaccli.info" and facts["format"] == "torchscript"
    assert facts["parameters"] == 30751 and facts["output_shape"] == [501]
    assert facts["smooth"] is True and facts["batch_independent"] is True
    text = run("info", ex("pinn.pt2")).stdout
    assert "export" in text and "[*, 1]" in text


def test_help_texts():
    top = run("--help").stdout
    for word in ["jacobian", "hessian", "divergence", "laplacian", "info", "check", "use only files you trust"]:
        assert word in top
    div = run("divergence", "--help").stdout
    assert "--estimator" in div and "--probes" in div
    assert "--estimator" not in run("jacobian", "--help").stdout
    assert run().exit_code == 0  # no arguments: the help


def test_version():
    result = run("--version")
    assert result.exit_code == 0 and jaccli.__version__ in result.stdout


def test_python_dash_m_and_exit_code_of_a_real_process(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "jaccli", "jacobian", str(tmp_path / "nope.pt"), ex("pinn_x.npy")],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert done.returncode == EXIT_CODES[jaccli.InputError]
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1


def test_internal_errors_are_one_line_too(monkeypatch):
    def boom(*a, **k):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(jaccli, "plan", boom)
    result = run("jacobian", ex("pinn.pt"), ex("pinn_x.npy"))
    _one_line_error(result, 1, "internal error", "ZeroDivisionError", "JACCLI_DEBUG")


def test_mixed_cpu_model_with_float64_input_casts_the_model(tmp_path):
    np.save(tmp_path / "x.npy", np.linspace(0, 1, 5)[:, None])
    doc = json.loads(run("jacobian", ex("pinn.pt"), tmp_path / "x.npy", "-p", "--json").stdout)
    assert doc["results"]["jacobian"]["dtype"] == "float64"
    doc = json.loads(run("jacobian", ex("pinn.pt"), tmp_path / "x.npy", "-p", "--json", "--dtype", "float32").stdout)
    assert doc["results"]["jacobian"]["dtype"] == "float32"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_on_the_command_line(tmp_path):
    out = tmp_path / "H.npy"
    assert run("hessian", ex("pinn.pt2"), ex("pinn_x.npy"), "-p", "--device", "cuda", "--save", out, "-q").exit_code == 0
    cpu = tmp_path / "Hc.npy"
    assert run("hessian", ex("pinn.pt2"), ex("pinn_x.npy"), "-p", "--save", cpu, "-q").exit_code == 0
    np.testing.assert_allclose(np.load(out), np.load(cpu), rtol=1e-4, atol=1e-5)


def test_tanh_mlp_helper_is_smooth():
    assert jaccli.describe(tanh_mlp(), torch.zeros(2, 3, dtype=torch.float64))["smooth"] is True


# ----------------------------------------------------------------- the README stays true


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _readme_blocks(lang: str) -> list[str]:
    """The ``lang`` code blocks of the README and of every page in docs/."""
    return [block for doc in DOCS for block in re.findall(rf"```{lang}\n(.*?)```", doc.read_text(), flags=re.S)]


#: each distinct ``$ …`` line once: the README and docs/ repeat some, and each run pays torch's start-up
README_COMMANDS = list(dict.fromkeys(
    line[2:] for block in _readme_blocks("console") for line in block.splitlines() if line.startswith("$ ")
))  # fmt: skip


@pytest.mark.parametrize("command", README_COMMANDS)
def test_readme_commands_run(tmp_path, monkeypatch, command):
    """Each ``$ …`` line of the README and docs/, in a scratch folder that sees examples/: a
    plain ``jaccli …`` line in-process (each fresh interpreter pays torch's start-up, which
    on a loaded machine is most of the suite's time), the others (pipes, torchrun) by bash."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    if command.startswith("jaccli ") and not re.search(r"[|<>;&`$]", command):
        monkeypatch.chdir(tmp_path)
        result = runner.invoke(app, shlex.split(command)[1:])
        assert result.exit_code == 0, result.stderr
        assert "Traceback" not in result.stderr
        return
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=HANG_GUARD_S
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr


PYTHON_BLOCKS = _readme_blocks("python")


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[f"python{i}" for i in range(len(PYTHON_BLOCKS))])
def test_python_examples_in_the_docs_run(monkeypatch, block):
    """Each ``python`` block of the README and docs/ runs as written, from the repository root."""
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    exec(compile(block, "README.md or docs/*.md", "exec"), namespace)
    if "est" in namespace:  # the tour of docs/python-api.md
        assert tuple(namespace["J"].shape) == (1000, 501, 1)
        assert tuple(namespace["H"].shape) == (1000, 501, 1, 1)
        assert float(namespace["est"].value) == pytest.approx(100.0)


def test_the_docs_hold_the_python_tour():
    assert any("est = jaccli.divergence" in b for b in PYTHON_BLOCKS)


# ----------------------------------------------------------------- help examples and shell completion


# every --help example runs as written: tests/cli/test_cli_request.py


def _bash(script: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(tmp_path), "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=HANG_GUARD_S, cwd=tmp_path)


def test_shell_completion_completes_commands_and_option_values(tmp_path):
    """The script --show-completion prints, sourced in bash, completes as a person's Tab would."""
    # "; exit $?" keeps bash as jaccli's parent (it would exec a lone command), so that Typer's
    # shell detection, which walks up the process tree, finds bash even in a detached CI job
    script = _bash("jaccli --show-completion; exit $?", tmp_path)
    assert script.returncode == 0 and "complete -o default -F _jaccli_completion jaccli" in script.stdout
    (tmp_path / "jaccli.sh").write_text(script.stdout)
    tab = (
        "source ./jaccli.sh; for line in 'jaccli jac' 'jaccli jacobian --mo' 'jaccli hessian --mode r' 'jaccli jacobian --sh'; do "
        "COMP_WORDS=($line); [[ $line == *' ' ]] && COMP_WORDS+=(''); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); "
        "COMPREPLY=(); _jaccli_completion jaccli; echo \"${COMPREPLY[*]}\"; done"
    )
    done = _bash(tab, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["jacobian", "--mode", "reverse", "--show"]


def test_install_completion_writes_the_shell_startup_file(tmp_path):
    done = _bash("jaccli --install-completion; exit $?", tmp_path)  # bash stays the parent (above)
    assert done.returncode == 0, done.stderr
    assert "_jaccli_completion" in (tmp_path / ".bash_completions" / "jaccli.sh").read_text()
    assert "jaccli.sh" in (tmp_path / ".bashrc").read_text()
