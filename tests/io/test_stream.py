"""Per-sample results streamed to disk chunk by chunk: equality with the in-memory result,
atomicity, resume after a kill, the refusals, disk full, and the progress bar."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import jaccli
from jaccli.cli.main import app
from jaccli.errors import EXIT_CODES
from jaccli.io import stream as st
from problems import tanh_mlp

runner = CliRunner(env={"COLUMNS": "200"})


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture()
def case(tmp_path):
    """A 2→16→16→4 tanh MLP saved by save_mlp and 3000 float32 points."""
    net = tanh_mlp((2, 16, 16, 4), dtype=torch.float32)
    jaccli.save_mlp(net, tmp_path / "m.safetensors")
    x = np.random.default_rng(0).standard_normal((3000, 2)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    return net, torch.from_numpy(x), tmp_path


def _files(d):
    return sorted(p.name for p in d.iterdir())


# ----------------------------------------------------------------- the API


@pytest.mark.parametrize("kind", ["jacobian", "hessian", "laplacian", "divergence"])
def test_streamed_npy_is_byte_for_byte_the_in_memory_result(case, kind):
    net, x, d = case
    f = net if kind != "divergence" else torch.nn.Sequential(net, torch.nn.Linear(4, 2))
    want = getattr(jaccli, kind)(f, x, per_sample=True, chunk_size=700)
    got = getattr(jaccli, kind)(f, x, per_sample=True, chunk_size=700, save=d / "r.npy")
    assert torch.equal(got, want)
    np.save(d / "ref.npy", want.numpy())
    assert (d / "r.npy").read_bytes() == (d / "ref.npy").read_bytes()
    assert not [n for n in _files(d) if "jaccli-partial" in n]


def test_streamed_safetensors_holds_the_result_and_metadata(case):
    net, x, d = case
    spec = jaccli.Stream(d / "J.safetensors", name="jacobian", metadata={"command": "jacobian", "axes": [1, 2]})
    got = jaccli.jacobian(net, x, per_sample=True, chunk_size=512, save=spec)
    want = jaccli.jacobian(net, x, per_sample=True, chunk_size=512)
    with safe_open(d / "J.safetensors", "pt") as fh:
        assert fh.metadata() == {"command": "jacobian", "axes": "[1, 2]"}
        assert torch.equal(fh.get_tensor("jacobian"), want)
    assert torch.equal(got, want)
    s = spec.stats
    assert s["all_finite"] and s["min"] == float(want.min()) and s["max"] == float(want.max())
    assert s["mean"] == pytest.approx(float(want.double().mean()), rel=1e-9)


def test_progress_callback_counts_the_points(case):
    net, x, d = case
    for save in (None, d / "J.npy"):
        seen = []
        jaccli.jacobian(net, x, per_sample=True, chunk_size=1000, save=save, progress=lambda a, b: seen.append((a, b)))
        assert seen[-1] == (3000, 3000) and seen[1:] == [(1000, 3000), (2000, 3000), (3000, 3000)]


def test_a_model_error_mid_stream_leaves_nothing(case):
    net, x, d = case
    calls = []

    def flaky(z):
        calls.append(1)
        if len(calls) > 6:  # the probe, the batch check and the trace pass; a later chunk fails
            raise RuntimeError("boom")
        return net(z)

    with pytest.raises(jaccli.ModelError, match="boom"):
        jaccli.jacobian(flaky, x, per_sample=True, chunk_size=100, mode="reverse", save=d / "J.npy")
    assert _files(d) == ["m.safetensors", "x.npy"]


def test_an_interrupted_stream_keeps_its_partial_run_and_resumes(case):
    net, x, d = case
    want = jaccli.jacobian(net, x, per_sample=True, chunk_size=300)

    def stop(done, total):
        if done >= 1500:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        jaccli.jacobian(net, x, per_sample=True, chunk_size=300, save=d / "J.npy", progress=stop)
    assert not (d / "J.npy").exists() and (d / ".J.npy.jaccli-partial").exists()
    spec = jaccli.Stream(d / "J.npy", name="jacobian", resume=True)
    got = jaccli.jacobian(net, x, per_sample=True, chunk_size=300, save=spec)
    assert spec.resumed_points == 1500
    assert torch.equal(got, want)
    # the statistics cover the rows the interrupted run wrote as well
    assert (spec.stats["min"], spec.stats["max"]) == (float(want.min()), float(want.max()))
    assert spec.stats["mean"] == pytest.approx(float(want.double().mean()), rel=1e-9)
    assert _files(d) == ["J.npy", "m.safetensors", "x.npy"]


def test_disk_full_is_exit_7_with_the_figure_and_no_file(case, monkeypatch):
    net, x, d = case

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st.os, "posix_fallocate", full)
    with pytest.raises(jaccli.OutputError, match=r"not enough disk space.*expected 93\.9 KiB.*free"):
        jaccli.jacobian(net, x, per_sample=True, save=d / "J.npy")
    assert _files(d) == ["m.safetensors", "x.npy"]


def test_strict_nan_in_a_streamed_result_leaves_no_file(case):
    net, x, d = case
    x = x.clone()
    x[2500, 0] = float("nan")
    with pytest.raises(jaccli.NumericalError):
        jaccli.jacobian(net, x, per_sample=True, strict=True, check_batch=False, save=d / "J.npy")
    assert _files(d) == ["m.safetensors", "x.npy"]


def test_a_result_too_large_for_memory_streams_where_an_in_memory_one_is_refused(case, monkeypatch):
    from jaccli.engine import planner

    net, x, d = case
    monkeypatch.setattr(planner, "memory_available", lambda device: 50_000)  # the result is 96 kB
    with pytest.raises(jaccli.ResourceError, match=r"would not fit in memory.*FILE\.npy"):
        jaccli.jacobian(net, x, per_sample=True)
    got = jaccli.jacobian(net, x, per_sample=True, save=d / "J.npy")
    assert got.shape == (3000, 4, 2) and (d / "J.npy").exists()


# ----------------------------------------------------------------- the command


def test_command_streams_npy_and_safetensors_like_the_in_memory_save(case):
    net, x, d = case
    m, xs = d / "m.safetensors", d / "x.npy"
    assert run("jacobian", m, xs, "-p", "--save", d / "J.npz", "--quiet").exit_code == 0
    want = np.load(d / "J.npz")["jacobian"]
    r = run("jacobian", m, xs, "-p", "--save", d / "J.npy", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["streamed"] and doc["plan"]["world_size"] == 1 and doc["resumed_points"] == 0
    assert doc["results"]["jacobian"]["max"] == pytest.approx(float(want.max()))
    np.testing.assert_array_equal(np.load(d / "J.npy"), want)
    r = run("hessian", m, xs, "-p", "--flatten", "--save", d / "H.safetensors", "--quiet")
    assert r.exit_code == 0, r.stderr
    with safe_open(d / "H.safetensors", "pt") as fh:
        assert json.loads(fh.metadata()["axes"]) == {"hessian": ["sample", "out", "in", "in'"]}
        np.testing.assert_array_equal(fh.get_tensor("hessian").numpy(), jaccli.hessian(net, x, per_sample=True).numpy())


def _cmd(d, *extra):
    return [sys.executable, "-m", "jaccli", "jacobian", str(d / "m.safetensors"), str(d / "x.npy"), "-p",
            "--chunk-size", "100", "--quiet", *map(str, extra)]  # fmt: skip


def test_resume_after_sigkill_at_a_random_chunk_is_bit_identical(case):
    net, x, d = case
    done = subprocess.run(_cmd(d, "--save", d / "ref.npy"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    k = random.Random().randint(1, 29)  # 30 chunks of 100 points
    env = {**os.environ, st.KILL_HOOK: str(k)}
    killed = subprocess.run(_cmd(d, "--save", d / "J.npy"), capture_output=True, text=True, timeout=120, env=env)
    assert killed.returncode == -9, (k, killed.stderr)
    assert not (d / "J.npy").exists()
    record = json.loads((d / ".J.npy.jaccli-partial.done0.json").read_text())
    assert record["chunks"] == [[0, k]]
    r = subprocess.run(_cmd(d, "--save", d / "J.npy", "--resume", "--json"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["resumed_points"] == 100 * k
    assert (d / "J.npy").read_bytes() == (d / "ref.npy").read_bytes()
    assert not [n for n in _files(d) if "jaccli-partial" in n]


def test_resume_refusals_are_exit_12_and_delete_nothing(case):
    net, x, d = case
    m, xs = d / "m.safetensors", d / "x.npy"
    code = EXIT_CODES[jaccli.ResumeError]
    r = run("jacobian", m, xs, "-p", "--save", d / "J.npy", "--resume")
    assert r.exit_code == code and "nothing to resume" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run("jacobian", m, xs, "-p", "--save", d / "J.npz", "--resume")
    assert r.exit_code == code and ".npy or FILE.safetensors" in r.stderr
    env = {**os.environ, st.KILL_HOOK: "3"}
    subprocess.run(_cmd(d, "--save", d / "J.npy"), capture_output=True, timeout=120, env=env)
    before = _files(d)
    r = subprocess.run(_cmd(d, "--save", d / "J.npy", "--resume", "--dtype", "float64"), capture_output=True, text=True, timeout=120)
    assert r.returncode == code and "differs in" in r.stderr and "cli" in r.stderr, r.stderr
    np.save(xs, x.numpy() + 1)
    r = subprocess.run(_cmd(d, "--save", d / "J.npy", "--resume"), capture_output=True, text=True, timeout=120)
    assert r.returncode == code and "inputs" in r.stderr, r.stderr
    assert _files(d) == before


def test_progress_bar_goes_to_stderr_only_when_asked_or_on_a_terminal(case):
    net, x, d = case
    m, xs = d / "m.safetensors", d / "x.npy"
    r = run("jacobian", m, xs, "-p", "--chunk-size", "500", "--save", d / "J.npy", "--progress", "--show", "0")
    assert r.exit_code == 0
    assert "points/s" in r.stderr and "3000/3000" in r.stderr and "points/s" not in r.stdout
    r = run("jacobian", m, xs, "-p", "--chunk-size", "500", "--save", d / "K.npy", "--progress", "--json")
    assert r.exit_code == 0 and "points/s" not in r.stderr
    json.loads(r.stdout)
    r = run("jacobian", m, xs, "-p", "--chunk-size", "500", "--save", d / "L.npy")  # not a terminal: no bar
    assert r.exit_code == 0 and "points/s" not in r.stderr


def test_lazy_npy_input_is_memory_mapped_and_never_written(case):
    net, x, d = case
    t = jaccli.load_tensor(d / "x.npy")
    with open("/proc/self/maps") as fh:
        maps = [line.split()[0].split("-") for line in fh if line.rstrip().endswith(str(d / "x.npy"))]
    assert any(int(a, 16) <= t.data_ptr() < int(b, 16) for a, b in maps)
    t += 1  # copy-on-write: the file keeps its data
    np.testing.assert_array_equal(np.load(d / "x.npy"), x.numpy())


class _Square(torch.autograd.Function):
    """x², with a backward but no forward-mode derivative: forward mode falls back to reverse."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g

    @staticmethod
    def jvp(ctx, t):
        raise NotImplementedError("this op has no forward AD formula")


def test_a_fall_back_mid_stream_rewrites_the_file_with_the_new_plan(tmp_path, monkeypatch):
    from jaccli.engine import planner

    monkeypatch.setattr(planner, "FAST_PATH", False)  # the Taylor path would record x * x and need no fall-back
    x = torch.linspace(-1, 1, 3000, dtype=torch.float64).reshape(1000, 3)
    with pytest.warns(jaccli.JaccliWarning, match="instead of forward"):
        got = jaccli.jacobian(_Square.apply, x, per_sample=True, mode="forward", chunk_size=100, save=tmp_path / "J.npy")
    assert torch.equal(got, torch.diag_embed(2 * x))
    assert _files(tmp_path) == ["J.npy"]
