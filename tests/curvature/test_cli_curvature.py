"""``jaccli curvature`` and ``jaccli grads`` as a user runs them: tables, JSON, saved files,
the density plot, streamed per-sample gradients with --resume, torchrun, exit codes."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import jaccli
from jaccli.cli.main import app
from jaccli.io import stream as st
from problems import save_torchscript, tanh_mlp

runner = CliRunner(env={"COLUMNS": "200"})


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    net = tanh_mlp((2, 6, 3))
    jaccli.save_mlp(net, d / "m.safetensors")
    rng = np.random.default_rng(0)
    np.save(d / "x.npy", rng.standard_normal((40, 2)))
    np.save(d / "y.npy", rng.integers(0, 3, 40))
    np.save(d / "y_bad.npy", rng.integers(0, 3, 39))
    return d, net


def _ref(case, **kw):
    d, net = case
    x = torch.from_numpy(np.load(d / "x.npy"))
    y = torch.from_numpy(np.load(d / "y.npy"))
    return jaccli.curvature(net, x, y, loss="cross-entropy", **kw)


def test_json_has_the_documented_keys_and_the_api_numbers(case):
    d, _ = case
    r = run("curvature", d / "m.safetensors", d / "x.npy", "--target", d / "y.npy", "--loss", "cross-entropy",
            "--eig", "3", "--trace", "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    for key in ("schema", "loss", "loss_value", "matrix", "params", "eigenvalues", "trace", "trace_stderr"):
        assert key in doc
    ref = _ref(case, eig=3, trace=True)
    np.testing.assert_allclose(doc["eigenvalues"], ref.eigenvalues, rtol=1e-6)
    assert doc["trace"] == pytest.approx(ref.trace, rel=1e-12) and doc["trace_stderr"] is None
    assert doc["params"][2] == {"name": "2.weight", "shape": [3, 6], "offset": 18}


def test_table_save_and_plot(case, tmp_path):
    d, _ = case
    r = run("curvature", d / "m.safetensors", d / "x.npy", "--target", d / "y.npy", "--loss", "cross-entropy",
            "--matrix", "ggn", "--full", "--eig", "2", "--density", "--steps", "10", "--by-layer",
            "--save", tmp_path / "c.npz", "--plot", tmp_path / "d.png")  # fmt: skip
    assert r.exit_code == 0, r.output
    for needle in ("ggn of the cross-entropy loss", "eigenvalues (largest)", "spectral density", "2.weight", "diagonal blocks"):
        assert needle in r.stdout
    with np.load(tmp_path / "c.npz") as z:  # closed here, not whenever the collector runs
        assert set(z.files) >= {"full", "eigenvalues", "eigenvectors", "density_nodes", "density_weights"}
        full = z["full"]
    ref = _ref(case, matrix="ggn", full=True)
    np.testing.assert_allclose(full, ref.full, rtol=1e-12)
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"


def test_standard_errors_of_a_log_likelihood_model(tmp_path):
    class Gauss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mu = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
            self.log_sigma = torch.nn.Parameter(torch.tensor(0.0, dtype=torch.float64))

        def forward(self, x):
            return -0.5 * ((x[:, 0] - self.mu) / self.log_sigma.exp()) ** 2 - self.log_sigma - 0.9189385332046727

    save_torchscript(Gauss(), tmp_path / "g.pt")
    x = np.random.default_rng(1).standard_normal((200, 1))
    x = (x - x.mean()) / x.std() + 0.5  # the MLE is μ = 0.5, σ = 1
    np.save(tmp_path / "x.npy", x)
    r = run("curvature", tmp_path / "g.pt", tmp_path / "x.npy", "--loss", "log-likelihood", "--standard-errors", "--json")
    assert r.exit_code == 0, r.output
    se = {s["name"]: s["values"] for s in json.loads(r.stdout)["standard_errors"]}
    assert se["mu"][0] == pytest.approx(1 / np.sqrt(200), rel=1e-9)
    assert se["log_sigma"][0] == pytest.approx(1 / np.sqrt(400), rel=1e-9)


@pytest.mark.parametrize(
    "extra, code, needle",
    [
        (["--loss", "huber"], 2, "unknown --loss"),
        (["--loss", "cross-entropy", "--target", "y_bad.npy"], 3, "number of samples"),
        (["--loss", "cross-entropy", "--target", "y.npy", "--params", "zz*"], 2, "no parameter matches"),
        (["--loss", "cross-entropy", "--target", "y.npy", "--plot", "d.png"], 2, "--density"),
        (["--loss", "log-likelihood"], 4, "one value per sample"),
        (["--loss", "cross-entropy", "--target", "y.npy", "--which", "middle", "--eig", "1"], 2, "unknown --which"),
        (["--loss", "cross-entropy", "--target", "y.npy", "--matrix", "fisher"], 2, "unknown matrix"),
        (["--loss", "output", "--matrix", "ggn"], 2, "not defined"),
        (["--loss", "cross-entropy", "--target", "y.npy", "--trace-method", "exact"], 2, "unknown --trace-method"),
    ],
)
def test_bad_requests_get_one_line_and_their_exit_code(case, extra, code, needle):
    d, _ = case
    args = [(d / a if str(a).endswith(".npy") else a) for a in extra]
    r = run("curvature", d / "m.safetensors", d / "x.npy", *args)
    assert r.exit_code == code, r.output
    assert needle in r.output and "Traceback" not in r.output


def test_grads_streams_per_sample_rows_and_reports_norms(case, tmp_path):
    d, net = case
    r = run("grads", d / "m.safetensors", d / "x.npy", "--target", d / "y.npy", "--loss", "cross-entropy",
            "--per-sample", "--chunk-size", "7", "--save", tmp_path / "g.npy", "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    x, y = torch.from_numpy(np.load(d / "x.npy")), torch.from_numpy(np.load(d / "y.npy"))
    ref = jaccli.grads(net, x, y, loss="cross-entropy", per_sample=True)
    np.testing.assert_allclose(np.load(tmp_path / "g.npy"), ref.per_sample.numpy(), rtol=1e-10, atol=1e-15)
    assert doc["per_sample_norms"]["max"] == pytest.approx(ref.norms["max"], rel=1e-12)
    assert doc["gradient_norm"] == pytest.approx(float(ref.gradient.norm()), rel=1e-10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.npy"]
    r = run("grads", d / "m.safetensors", d / "x.npy", "--target", d / "y.npy", "--loss", "cross-entropy", "--resume")
    assert r.exit_code == 12


def test_float32_gradients_to_npz_with_params(case, tmp_path):
    d, net = case
    r = run("grads", d / "m.safetensors", d / "x.npy", "--target", d / "y.npy", "--loss", "cross-entropy",
            "--dtype", "float32", "--params", "2.*", "--save", tmp_path / "g.npz", "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    with np.load(tmp_path / "g.npz") as z:
        g = z["grads"]
    assert g.dtype == np.float32 and g.shape == (21,)
    x, y = torch.from_numpy(np.load(d / "x.npy")), torch.from_numpy(np.load(d / "y.npy"))
    ref = jaccli.grads(net, x, y, loss="cross-entropy")
    np.testing.assert_allclose(g, ref.gradient[18:].numpy(), rtol=2e-5, atol=1e-7)
    assert [p["name"] for p in json.loads(r.stdout)["params"]] == ["2.weight", "2.bias"]


def _jaccli(cwd, *args, env=None, torchrun=False):
    pre = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "jaccli"] \
        if torchrun else [sys.executable, "-m", "jaccli"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([*pre, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def test_a_killed_grads_run_resumes_to_the_same_file(case, tmp_path):
    d, _ = case
    args = ["grads", d / "m.safetensors", d / "x.npy", "--target", d / "y.npy", "--loss", "cross-entropy",
            "--per-sample", "--chunk-size", "5", "--save", "g.npy"]  # fmt: skip
    killed = _jaccli(tmp_path, *args, env={st.KILL_HOOK: "3"})
    assert killed.returncode != 0 and not (tmp_path / "g.npy").exists()
    done = _jaccli(tmp_path, *args, "--resume", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["resumed_samples"] >= 15
    x, y = torch.from_numpy(np.load(d / "x.npy")), torch.from_numpy(np.load(d / "y.npy"))
    ref = jaccli.grads(case[1], x, y, loss="cross-entropy", per_sample=True)
    np.testing.assert_allclose(np.load(tmp_path / "g.npy"), ref.per_sample.numpy(), rtol=1e-10, atol=1e-15)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="gloo")
def test_torchrun_shards_the_samples_and_gives_the_single_process_results(case, tmp_path):
    d, net = case
    common = [d / "m.safetensors", d / "x.npy", "--target", d / "y.npy", "--loss", "cross-entropy", "--chunk-size", "6"]
    r = _jaccli(tmp_path, "curvature", *common, "--matrix", "ggn", "--eig", "2", "--trace", "--save", "c.npz", "--json",
                torchrun=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    (doc,) = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]  # rank 0 alone prints
    ref = _ref(case, matrix="ggn", eig=2, trace=True)
    np.testing.assert_allclose(doc["eigenvalues"], ref.eigenvalues, rtol=1e-8)
    assert doc["trace"] == pytest.approx(ref.trace, rel=1e-12)
    assert doc["loss_value"] == pytest.approx(ref.loss_value, rel=1e-12)
    r = _jaccli(tmp_path, "grads", *common, "--per-sample", "--save", "g.npy", "--json", torchrun=True)
    assert r.returncode == 0, r.stderr
    x, y = torch.from_numpy(np.load(d / "x.npy")), torch.from_numpy(np.load(d / "y.npy"))
    ref_g = jaccli.grads(net, x, y, loss="cross-entropy", per_sample=True)
    np.testing.assert_allclose(np.load(tmp_path / "g.npy"), ref_g.per_sample.numpy(), rtol=1e-10, atol=1e-15)


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="gloo")
def test_the_layers_trace_estimate_under_torchrun_equals_the_single_process_one(tmp_path):
    """A sample's probes depend on the seed, the round and its index alone: two ranks' shards
    (and their chunks) give the single process's estimate and standard error."""
    net = tanh_mlp((2, 64, 32, 3))  # P = 2 371: past the exact trace's limit
    jaccli.save_mlp(net, tmp_path / "big.safetensors")
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((50, 2)), rng.integers(0, 3, 50)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    r = _jaccli(tmp_path, "curvature", "big.safetensors", "x.npy", "--target", "y.npy", "--loss", "cross-entropy",
                "--trace", "--samples", "5", "--seed", "4", "--chunk-size", "7", "--json", torchrun=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    (doc,) = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    ref = jaccli.curvature(net, torch.from_numpy(x), torch.from_numpy(y), loss="cross-entropy", trace=True, samples=5,
                           seed=4)  # fmt: skip
    assert doc["trace_estimator"] == ref.trace_estimator == "per-sample Hutchinson"
    assert doc["trace"] == pytest.approx(ref.trace, rel=1e-10)
    assert doc["trace_stderr"] == pytest.approx(ref.trace_stderr, rel=1e-8)
    r = run("curvature", tmp_path / "big.safetensors", tmp_path / "x.npy", "--target", tmp_path / "y.npy", "--loss",
            "cross-entropy", "--trace", "--samples", "5", "--trace-method", "products", "--json")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["trace_estimator"] in ("Hutch++", "Hutchinson")


def test_the_help_examples_run(tmp_path, monkeypatch):
    from problems import EXAMPLES

    from jaccli.request.kinds import kind

    monkeypatch.chdir(EXAMPLES)  # the folder jaccli example all fills
    for name in ("curvature", "grads"):
        for line in kind(name).examples:
            words = [str(tmp_path / w) if w.endswith((".npy", ".npz")) and w.startswith(("g.", "curvature.")) else w
                     for w in shlex.split(line)[1:]]  # fmt: skip
            r = run(*words)
            assert r.exit_code == 0, (line, r.output)
