"""Per-sample results streamed to disk chunk by chunk: equality with the in-memory result,
atomicity, resume after a kill, the refusals, disk full, and the progress bar."""

from __future__ import annotations

import errno
import json
import os
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
from problems import HANG_GUARD_S, tanh_mlp

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


def _interrupted_at(net, x, d, points, target="J.npy"):
    """A streamed run stopped (KeyboardInterrupt) once ``points`` points are written."""

    def stop(done, total):
        if done >= points:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        jaccli.jacobian(net, x, per_sample=True, chunk_size=300, save=d / target, progress=stop)


def test_an_unreadable_record_is_named_with_the_fix_and_nothing_is_deleted(case):
    net, x, d = case
    _interrupted_at(net, x, d, 900)
    meta = d / ".J.npy.jaccli-partial.json"
    good = meta.read_text()
    meta.write_text('{"fingerprint": ')  # damaged by something else than jaccli
    before = _files(d)
    with pytest.raises(jaccli.ResumeError, match=r"jaccli-partial\.json: the partial run's record is unreadable "
                       r"\(not valid JSON\); rerun without --resume to start over"):  # fmt: skip
        jaccli.jacobian(net, x, per_sample=True, chunk_size=300, save=jaccli.Stream(d / "J.npy", name="jacobian", resume=True))
    meta.write_text(good)
    (d / ".J.npy.jaccli-partial.done0.json").write_text("[]")
    with pytest.raises(jaccli.ResumeError, match=r"done0\.json: the partial run's record is unreadable \(not a jaccli record\)"):
        jaccli.jacobian(net, x, per_sample=True, chunk_size=300, save=jaccli.Stream(d / "J.npy", name="jacobian", resume=True))
    assert _files(d) == before
    (d / ".J.npy.jaccli-partial.done0.json").write_text('{"chunks": [[0, 3]]}')
    (d / ".J.npy.jaccli-partial").unlink()  # records of rows that are gone: not resumable, not deleted
    with pytest.raises(jaccli.ResumeError, match=r"does not match its records.*rerun without --resume"):
        jaccli.jacobian(net, x, per_sample=True, chunk_size=300, save=jaccli.Stream(d / "J.npy", name="jacobian", resume=True))
    assert _files(d) == [n for n in before if n != ".J.npy.jaccli-partial"]


def test_a_partial_file_without_records_resumes_from_chunk_0_and_stale_temporaries_go(case):
    """What SIGKILL leaves between creating the partial file and its record, and inside a record."""
    net, x, d = case
    want = jaccli.jacobian(net, x, per_sample=True, chunk_size=300)
    (d / ".J.npy.jaccli-partial").write_bytes(b"")
    (d / ".J.npy.jaccli-partial.json.tmp").write_text("{")
    spec = jaccli.Stream(d / "J.npy", resume=True)
    assert torch.equal(jaccli.jacobian(net, x, per_sample=True, chunk_size=300, save=spec), want)
    assert spec.resumed_points == 0 and _files(d) == ["J.npy", "m.safetensors", "x.npy"]
    # the same for a record of the request with no finished chunk, and a file of the wrong size
    _interrupted_at(net, x, d, 0, "K.npy")
    assert _files(d) == [".K.npy.jaccli-partial", ".K.npy.jaccli-partial.json", "J.npy", "m.safetensors", "x.npy"]
    os.truncate(d / ".K.npy.jaccli-partial", 100)
    spec = jaccli.Stream(d / "K.npy", name="jacobian", resume=True)
    assert torch.equal(jaccli.jacobian(net, x, per_sample=True, chunk_size=300, save=spec), want)
    assert spec.resumed_points == 0 and not [n for n in _files(d) if "partial" in n]


def test_the_record_interval_comes_from_the_environment(case, monkeypatch):
    net, x, d = case
    monkeypatch.setenv(st.RECORD_INTERVAL_ENV, "0.000001")  # a record after every chunk
    seen = []
    real = st._atomic_json
    monkeypatch.setattr(st, "_atomic_json", lambda path, doc, **kw: (seen.append(path.name), real(path, doc, **kw)))
    jaccli.jacobian(net, x, per_sample=True, chunk_size=1000, save=d / "J.npy")
    assert seen == [".J.npy.jaccli-partial.json"] + [".J.npy.jaccli-partial.done0.json"] * 3
    for bad in ("soon", "0", "-1", "nan"):
        monkeypatch.setenv(st.RECORD_INTERVAL_ENV, bad)
        with pytest.raises(jaccli.UsageError, match="JACCLI_RECORD_INTERVAL must be a positive number"):
            jaccli.jacobian(net, x, per_sample=True, save=d / "K.npy")


def test_a_target_whose_name_is_a_glob_pattern_finds_its_own_records(case):
    net, x, d = case
    _interrupted_at(net, x, d, 900, "J[0].npy")
    (d / ".J[0].npy.jaccli-partial.done0.json.tmp").write_text("{")  # what a kill inside a record leaves
    spec = jaccli.Stream(d / "J[0].npy", name="jacobian", resume=True)
    got = jaccli.jacobian(net, x, per_sample=True, chunk_size=300, save=spec)
    assert spec.resumed_points == 900 and torch.equal(got, jaccli.jacobian(net, x, per_sample=True))
    assert _files(d) == ["J[0].npy", "m.safetensors", "x.npy"]


def test_a_second_writer_fails_at_once_naming_the_first_and_a_released_lock_blocks_nothing(case):
    import fcntl  # noqa: F401 - the holder below uses it; POSIX only

    net, x, d = case
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()", d / ".J.npy.jaccli-partial"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "locked\n"
        for resume in (False, True):
            with pytest.raises(jaccli.OutputError, match=rf"^another jaccli \(pid {holder.pid}\) is writing .*J\.npy;"):
                jaccli.jacobian(net, x, per_sample=True, save=jaccli.Stream(d / "J.npy", resume=resume))
        assert _files(d) == [".J.npy.jaccli-partial", "m.safetensors", "x.npy"]  # the holder's file is kept
    finally:
        holder.stdin.close()
        holder.wait(timeout=HANG_GUARD_S)
        holder.stdout.close()
    got = jaccli.jacobian(net, x, per_sample=True, save=d / "J.npy")  # the kernel released the lock
    assert torch.equal(got, jaccli.jacobian(net, x, per_sample=True))
    assert _files(d) == ["J.npy", "m.safetensors", "x.npy"]


def test_too_little_space_is_refused_before_reserving_with_the_real_figure(case, monkeypatch):
    net, x, d = case
    real = os.statvfs(d)

    class Vfs:  # the real file system's figures, but 48.8 KiB available
        f_frsize = real.f_frsize
        f_bavail = 50_000 // real.f_frsize

    calls = []
    monkeypatch.setattr(st.os, "statvfs", lambda path: Vfs)
    monkeypatch.setattr(st.os, "posix_fallocate", lambda *a: calls.append(a))
    shown = jaccli.errors.format_bytes(Vfs.f_bavail * Vfs.f_frsize)
    with pytest.raises(jaccli.OutputError, match=rf"not enough disk space.*expected 93\.9 KiB.*got {shown} free"):
        jaccli.jacobian(net, x, per_sample=True, save=d / "J.npy")
    assert calls == [] and _files(d) == ["m.safetensors", "x.npy"]


def test_disk_full_is_exit_7_with_the_figure_and_no_file(case, monkeypatch):
    net, x, d = case

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st.os, "posix_fallocate", full)
    with pytest.raises(jaccli.OutputError, match=r"not enough disk space.*expected 93\.9 KiB.*free") as caught:
        jaccli.jacobian(net, x, per_sample=True, save=d / "J.npy")
    assert "got 0 B free" not in str(caught.value)  # what the file system has, not what a failed reservation left
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


def test_resume_after_sigkill_mid_run_is_bit_identical(case):
    net, x, d = case
    done = subprocess.run(_cmd(d, "--save", d / "ref.npy"), capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0, done.stderr
    k = 17  # of 30 chunks of 100 points (tests/test_faults.py kills at other moments)
    env = {**os.environ, st.KILL_HOOK: str(k)}
    killed = subprocess.run(_cmd(d, "--save", d / "J.npy"), capture_output=True, text=True, timeout=HANG_GUARD_S, env=env)
    assert killed.returncode == -9, (k, killed.stderr)
    assert not (d / "J.npy").exists()
    record = json.loads((d / ".J.npy.jaccli-partial.done0.json").read_text())
    assert record["chunks"] == [[0, k]]
    r = subprocess.run(_cmd(d, "--save", d / "J.npy", "--resume", "--json"), capture_output=True, text=True, timeout=HANG_GUARD_S)
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
    subprocess.run(_cmd(d, "--save", d / "J.npy"), capture_output=True, timeout=HANG_GUARD_S, env=env)
    before = _files(d)
    # the refusals in-process: the command computes the same fingerprints there
    r = run(*_cmd(d, "--save", d / "J.npy", "--resume", "--dtype", "float64")[3:])
    assert r.exit_code == code and "differs in" in r.stderr and "cli" in r.stderr, r.stderr
    np.save(xs, x.numpy() + 1)
    r = run(*_cmd(d, "--save", d / "J.npy", "--resume")[3:])
    assert r.exit_code == code and "inputs" in r.stderr, r.stderr
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


def test_the_one_fingerprint_takes_the_callers_files_over_digests():
    from jaccli.io.records import fingerprint

    net, x = torch.nn.Linear(2, 1).double(), torch.ones(3, 2, dtype=torch.float64)
    digests = fingerprint({"request": 1}, module=net, tensors={"x": x})
    assert set(digests) == {"request", "versions", "model", "inputs"} and digests["inputs"]["x"]["shape"] == [3, 2]
    changed = fingerprint({"request": 1}, module=net, tensors={"x": x + 1})
    assert changed["inputs"] != digests["inputs"] and changed["model"] == digests["model"]
    files = fingerprint({"request": 1, "model": {"sha256": "m"}, "inputs": {"": {"sha256": "i"}}}, module=net,
                        tensors={"x": x}, layout={"shape": [3, 1]})  # fmt: skip
    assert files["model"] == {"sha256": "m"} and files["inputs"] == {"": {"sha256": "i"}} and files["shape"] == [3, 1]
