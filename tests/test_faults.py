"""Fault injection: signals, full disks, closed pipes, races, lying headers, endless streams.

Real processes (``python -m jaccli``) where the fault needs one — a signal, a file-size limit,
/dev/full, a pipe whose reader leaves, another process creating the target — all started at
once by one fixture, since each pays torch's import; the hostile inputs run in-process.

Test-only hook: ``JACCLI_TEST_PAUSE_BEFORE_RENAME=PATH`` makes the atomic writer create PATH
once its temporary file is complete and wait until PATH is removed (read in
``jaccli/io/write.py`` only), so that a test can act at exactly that moment.
"""

from __future__ import annotations

import io
import json
import os
import re
import resource
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import jaccli
from jaccli import signals
from jaccli.cli.main import app
from jaccli.errors import EXIT_CODES, OutputClosed
from jaccli.io import write as jwrite
from problems import EXAMPLES

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals, /proc and /dev/full")

MODEL = str(EXAMPLES / "field.pt")  # R^3 -> R^3: a [N, 3, 3] Jacobian per sample
PAUSE = "JACCLI_TEST_PAUSE_BEFORE_RENAME"
#: several processes share two cores here: one thread each, or their thread pools fight
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

runner = CliRunner(env={"COLUMNS": "200"})


def run(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def _clean(code: int, stderr: str, want: int, *needles: str) -> str:
    """One line, the wanted code, no traceback, no "internal error"."""
    lines = stderr.strip().splitlines()
    assert code == want, (code, stderr)
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and "internal error" not in stderr and "Exception ignored" not in stderr
    for needle in needles:
        assert re.search(needle, lines[0]), (needle, lines[0])
    return lines[0]


# ----------------------------------------------------------------- real processes, all at once


def _sigcgt(pid: int) -> int:
    """The mask of signals ``pid`` catches, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return int(line.split()[1], 16)
    return 0


def _zygote() -> None:
    """``python tests/test_faults.py --zygote``: import jaccli and torch once, then fork one
    child per case read from stdin (JSON) and run the real ``jaccli`` entry point in it with
    its own directory, stdout, stderr, environment and file-size limit. Prints ``NAME PID``
    per child, then ``NAME CODE`` as each ends. Each process would otherwise pay torch's
    import (seconds); the start-up and closed-pipe cases, which are about the start and the
    end of an interpreter, run as fresh processes instead."""
    import jaccli.__main__ as entry
    import jaccli.cli.main  # noqa: F401 - imported before the fork, as torch is
    import jaccli.io  # noqa: F401

    pids = {}
    for spec in json.load(sys.stdin):
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.chdir(spec["cwd"])
                os.environ.update(spec["env"])
                for fd, path in ((1, spec["stdout"]), (2, spec["stderr"])):
                    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(target, fd)
                    os.close(target)
                if spec["fsize"]:
                    resource.setrlimit(resource.RLIMIT_FSIZE, (spec["fsize"], resource.RLIM_INFINITY))
                sys.argv = ["jaccli", *spec["args"]]
                entry.main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            finally:
                for stream in (sys.stdout, sys.stderr):
                    try:
                        stream.flush()
                    except Exception:
                        pass
                os._exit(code)
        pids[pid] = spec["name"]
        print(spec["name"], pid, flush=True)
    while pids:
        pid, status = os.wait()
        print(pids.pop(pid), os.waitstatus_to_exitcode(status), flush=True)


class Case:
    """One process: its command, when to act on it, and what it left."""

    def __init__(self, name, args, cwd, logs, *, stdout=None, fsize=None, pause=False, act=None):
        self.name, self.args, self.cwd, self.act, self.fsize = name, [str(a) for a in args], cwd, act, fsize
        self.marker = logs / f"{name}.paused" if pause else None
        self.env = {"COLUMNS": "200", **({PAUSE: str(self.marker)} if pause else {})}
        self.stdout_path = stdout or str(logs / f"{name}.out")
        self.stderr_path = logs / f"{name}.err"
        self.pid = self.returncode = self.proc = None

    def spawn_fresh(self, **kw) -> None:
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jaccli", *self.args], cwd=self.cwd, env={**os.environ, **ONE_THREAD, **self.env},
                stdin=subprocess.DEVNULL, stderr=err, **kw,
            )  # fmt: skip
        self.pid = self.proc.pid

    def spec(self) -> dict:
        return dict(name=self.name, args=self.args, cwd=str(self.cwd), env=self.env, stdout=self.stdout_path,
                    stderr=str(self.stderr_path), fsize=self.fsize)  # fmt: skip

    @property
    def stderr(self) -> str:
        return Path(self.stderr_path).read_text()

    def files(self) -> list[str]:
        return sorted(p.name for p in self.cwd.iterdir())


@pytest.fixture(scope="module")
def processes(tmp_path_factory):
    """Start every process case at once, act on each at its moment, collect what they left."""
    root = tmp_path_factory.mktemp("faults")
    logs = root / "logs"
    logs.mkdir()
    x = root / "x.npy"
    np.save(x, np.random.default_rng(0).random((3000, 3), dtype=np.float32))  # a 108 KB result: more than a pipe holds
    cases = {}

    def case(name, *args, **kw):
        cwd = root / name
        cwd.mkdir()
        cases[name] = Case(name, args, cwd, logs, **kw)
        return cwd

    def kill_with(sig):
        return lambda c: os.kill(c.pid, sig)

    save = ("jacobian", MODEL, x, "-p", "-q", "--save")
    case("sigterm-while-saving", *save, "r.npy", pause=True, act=kill_with(signal.SIGTERM))
    (case("sighup-force-pt", *save, "r.pt", "--force", pause=True, act=kill_with(signal.SIGHUP)) / "r.pt").write_bytes(b"the old result")
    case("race", *save, "r.npy", pause=True, act=lambda c: (c.cwd / "r.npy").write_bytes(b"another process's file"))
    case("file-size-limit", *save, "r.pt", fsize=64 * 1024)
    case("dev-full", *save, "-", stdout="/dev/full")
    case("sigint-at-start-up", *save, "r.npy")
    case("closed-pipe", *save, "-")

    fresh = {"sigint-at-start-up", "closed-pipe"}
    zygote = subprocess.Popen(
        [sys.executable, __file__, "--zygote"], cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, **ONE_THREAD},
    )  # fmt: skip
    zygote.stdin.write(json.dumps([c.spec() for n, c in cases.items() if n not in fresh]))
    zygote.stdin.close()
    startup, pipe = cases["sigint-at-start-up"], cases["closed-pipe"]
    startup.spawn_fresh(stdout=subprocess.DEVNULL)
    pipe.spawn_fresh(stdout=subprocess.PIPE)

    def head_c_100():  # the reader takes 100 bytes and leaves, as `| head -c 100` does
        pipe.cut = pipe.proc.stdout.read(100)
        pipe.proc.stdout.close()

    reader = threading.Thread(target=head_c_100)
    reader.start()
    for _ in range(len(cases) - len(fresh)):
        name, pid = zygote.stdout.readline().split()
        cases[name].pid = int(pid)
    deadline = time.monotonic() + 120
    pending = {n for n, c in cases.items() if c.marker is not None}
    sent_startup = False
    while time.monotonic() < deadline and (pending or not sent_startup):
        if not sent_startup and _sigcgt(startup.pid) & (1 << (signal.SIGTERM - 1)):
            # the handlers are in place: jaccli is still importing its CLI or torch
            os.kill(startup.pid, signal.SIGINT)
            sent_startup = True
        for name in list(pending):
            c = cases[name]
            if c.marker.exists():
                c.act(c)
                c.marker.unlink()
                pending.discard(name)
        time.sleep(0.005)
    for line in zygote.stdout:
        name, code = line.split()
        cases[name].returncode = int(code)
    zygote.stdout.close()
    zygote.wait(timeout=120)
    reader.join(timeout=120)
    for name in fresh:
        cases[name].returncode = cases[name].proc.wait(timeout=120)
    assert all(c.returncode is not None for c in cases.values()), {n: c.returncode for n, c in cases.items()}
    return cases


def test_sigterm_while_saving_leaves_nothing_at_the_target(processes):
    """A per-sample .npy streams: nothing appears at the target, and what stays beside it is
    the partial run that --resume continues (issue 10), hidden and named as such."""
    c = processes["sigterm-while-saving"]
    _clean(c.returncode, c.stderr, 128 + signal.SIGTERM, "interrupted", "SIGTERM")
    assert c.files() and all(f.startswith(".r.npy.jaccli-partial") for f in c.files())


def test_sighup_while_saving_pt_over_an_existing_file_keeps_it(processes):
    c = processes["sighup-force-pt"]
    _clean(c.returncode, c.stderr, 128 + signal.SIGHUP, "interrupted", "SIGHUP")
    assert c.files() == ["r.pt"] and (c.cwd / "r.pt").read_bytes() == b"the old result"


def test_a_target_created_meanwhile_is_not_replaced(processes):
    c = processes["race"]
    _clean(c.returncode, c.stderr, EXIT_CODES[jaccli.OutputError], "r.npy", "appeared while", "--force")
    assert c.files() == ["r.npy"] and (c.cwd / "r.npy").read_bytes() == b"another process's file"


def test_ctrl_c_during_start_up_is_one_line(processes):
    c = processes["sigint-at-start-up"]
    _clean(c.returncode, c.stderr, 130, "interrupted")
    assert c.files() == []


def test_file_size_limit_is_an_output_error(processes):
    c = processes["file-size-limit"]
    _clean(c.returncode, c.stderr, EXIT_CODES[jaccli.OutputError], "r.pt", "File too large")
    assert c.files() == []


def test_stdout_on_a_full_device_is_an_output_error(processes):
    c = processes["dev-full"]
    _clean(c.returncode, c.stderr, EXIT_CODES[jaccli.OutputError], "<stdout>", "No space left")


def test_a_reader_leaving_early_is_exit_11(processes):
    c = processes["closed-pipe"]
    assert len(c.cut) == 100 and c.cut.startswith(b"\x93NUMPY")
    assert EXIT_CODES[OutputClosed] == 11
    _clean(c.returncode, c.stderr, 11, "<stdout>", "closed the pipe")


# ----------------------------------------------------------------- signals inside torch's writer


def test_a_signal_inside_torch_save_is_an_interruption_not_an_internal_error(tmp_path, monkeypatch):
    """torch's C++ writer turns the exception the signal handler raises in its write callback
    into a RuntimeError; the writer reports the signal and leaves the old file as it was."""
    target = tmp_path / "r.pt"
    target.write_bytes(b"old")
    calls = []

    def write(self, data):
        calls.append(len(data))
        if len(calls) == 3:
            signals._handler(signal.SIGINT, None)  # what a Ctrl-C does at this point
        return self._fh.write(data)

    monkeypatch.setattr(jwrite._Recorder, "write", write)
    monkeypatch.setattr(signals, "_received", None)
    monkeypatch.setattr(signals, "_exiting", False)  # an earlier in-process CLI error set it
    with pytest.raises(signals.Interrupted) as caught:
        jaccli.save_tensors(target, torch.zeros(1000, 3), force=True)
    assert caught.value.exit_code == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.pt"] and target.read_bytes() == b"old"


def test_a_full_disk_under_torch_save_names_the_reason(tmp_path, monkeypatch):
    def write(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(jwrite._Recorder, "write", write)
    with pytest.raises(jaccli.OutputError, match="No space left on device"):
        jaccli.save_tensors(tmp_path / "r.pt", torch.zeros(3))
    assert list(tmp_path.iterdir()) == []


def test_deferred_signals_arrive_after_the_block(monkeypatch):
    monkeypatch.setattr(signals, "_received", None)
    monkeypatch.setattr(signals, "_exiting", False)
    with pytest.raises(signals.Interrupted) as caught:
        with signals.deferred():
            signals._handler(signal.SIGTERM, None)
            done = True  # the handler raised nothing inside the block
    assert done and caught.value.exit_code == 143


def test_a_signal_python_swallowed_still_ends_the_command(monkeypatch, capsys):
    """Raised in a weakref callback or __del__, the handler's exception is "ignored" by Python;
    the command that would have exited 0 reports the signal instead."""
    monkeypatch.setattr(signals, "install", lambda: None)  # no real handlers in the test process
    monkeypatch.setattr(signals, "_received", None)
    monkeypatch.setattr(signals, "_exiting", False)

    def entry():
        signals._received = signal.SIGTERM  # what the handler notes before raising, swallowed

    with pytest.raises(SystemExit) as caught:
        signals.run(entry)
    assert caught.value.code == 143
    assert capsys.readouterr().err == "error: interrupted (SIGTERM)\n"
    hook = signals._unraisable(lambda info: pytest.fail("an Interrupted reached the default hook"))
    hook(type("Info", (), {"exc_value": signals.Interrupted(signal.SIGINT)})())


# ----------------------------------------------------------------- hostile inputs, in-process


def _npy_with_header(path: Path, shape_text: str, payload: bytes = b"\0" * 64) -> Path:
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (%s), }" % shape_text
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + payload)
    return path


@pytest.fixture
def hostile(tmp_path):
    """name -> (CLI arguments, expected error class, patterns in the one line)."""
    from safetensors.torch import save

    x = tmp_path / "x.npy"
    np.save(x, np.ones((4, 3), np.float32))
    cases = {}
    cases["400-digit dimension"] = (
        [MODEL, _npy_with_header(tmp_path / "absurd.npy", "9" * 400 + ", 3")],
        jaccli.InputError, "truncated or corrupt", "402-digit number of bytes",
    )  # fmt: skip
    sparse = tmp_path / "sparse.npy"
    _npy_with_header(sparse, f"{(4 * 2**30) // 12 + 1}, 3", b"")
    with open(sparse, "r+b") as fh:  # a truthful header over 4 GiB of holes: costs no disk
        fh.truncate(4 * 2**30 + 128)
    cases["4 GiB input"] = ([MODEL, sparse], jaccli.ResourceError, "larger than the input limit", "got 4.0 GiB", "--max-input-bytes")
    np.save(tmp_path / "x1000.npy", np.ones((1000, 3), np.float32))  # 12 128 bytes; the model is 2.7 KiB
    cases["over --max-input-bytes"] = (
        [MODEL, tmp_path / "x1000.npy", "--max-input-bytes", "5K"], jaccli.ResourceError, "x1000.npy", "at most 5.0 KiB", "got 11.8 KiB",
    )  # fmt: skip
    bomb = io.BytesIO()
    np.save(bomb, np.ones((4, 3), np.float32))
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", bomb.getvalue() + b"\0" * (32 * 2**20))  # 32 MiB of padding in ~32 KB
    cases["npz bomb, limit below its inflated size"] = (
        [MODEL, tmp_path / "bomb.npz", "--max-input-bytes", "1M", "--save", tmp_path / "bomb_r.npy"], None,
    )  # fmt: skip
    lying = {"0.weight": torch.zeros(2, 3), "0.bias": torch.zeros(2)}
    meta = {"jaccli.arch": "mlp", "jaccli.activation": "tanh"}
    (tmp_path / "huge.safetensors").write_bytes(save(lying, metadata={**meta, "jaccli.sizes": "[3, 40000, 40000, 3]"}))
    cases["metadata declares a 1.6 GB network"] = (
        [tmp_path / "huge.safetensors", x], jaccli.ModelError, "metadata declares", "0.weight \\[40000, 3\\]",
    )  # fmt: skip
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "deep.safetensors").write_bytes(save(lying, metadata={**meta, "jaccli.sizes": deep}))
    cases["metadata nested 100 000 deep"] = ([tmp_path / "deep.safetensors", x], jaccli.InputError, "bad jaccli metadata")
    cases["--arch-kwargs nested 100 000 deep"] = (
        [EXAMPLES / "pinn.safetensors", x, "--arch", "mlp", "--activation", "tanh", "--arch-kwargs", deep],
        jaccli.UsageError, "nested too deeply",
    )  # fmt: skip
    long = "n" * 300
    cases["input name too long"] = ([MODEL, tmp_path / f"{long}.npy"], jaccli.InputError, "File name too long", "303 characters|…")
    cases["model name too long"] = ([tmp_path / f"{long}.pt", x], jaccli.InputError, "model file", "File name too long")
    cases["--input path too long"] = ([MODEL, "-i", "x=" + "d/" * 3000 + "x.npy"], jaccli.InputError, "File name too long")
    cases["--save name too long"] = ([MODEL, x, "--save", tmp_path / f"{long}.npy"], jaccli.OutputError, "File name too long")
    cases["/dev/zero as input"] = ([MODEL, "/dev/zero"], jaccli.InputError, "unrecognised binary data")
    cases["/dev/zero as model"] = (["/dev/zero", x], jaccli.InputError, "unrecognised binary data, not a model")
    return cases


HOSTILE = [
    "400-digit dimension", "4 GiB input", "over --max-input-bytes", "npz bomb, limit below its inflated size",
    "metadata declares a 1.6 GB network", "metadata nested 100 000 deep", "--arch-kwargs nested 100 000 deep",
    "input name too long", "model name too long", "--input path too long", "--save name too long",
    "/dev/zero as input", "/dev/zero as model",
]  # fmt: skip


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_inputs_end_in_one_line(hostile, name):
    args, error, *needles = hostile[name]
    result = run("jacobian", *args, "-p", "-q")
    if error is None:  # handled: only the declared 48 bytes of the bomb are inflated
        assert result.exit_code == 0, result.stderr
        return
    _clean(result.exit_code, result.stderr, EXIT_CODES[error], *needles)


def test_endless_streams_stop_at_their_first_bytes_or_the_limit(tmp_path):
    result = run("jacobian", MODEL, "-", "-p", "-q", input=b"\0" * 200_000)
    _clean(result.exit_code, result.stderr, EXIT_CODES[jaccli.InputError], "<stdin>", "unrecognised binary data")
    fifo = tmp_path / "endless"
    os.mkfifo(fifo)
    for line, want, needle in ((b"y\n", jaccli.InputError, "not a numeric table"), (b"1,2,3\n", jaccli.ResourceError, "stream larger than")):
        stop = threading.Event()

        def writer():
            try:
                with open(fifo, "wb") as fh:
                    while not stop.is_set():
                        fh.write(line * 4096)
            except BrokenPipeError:  # the reader refused and left, as it should
                pass

        t = threading.Thread(target=writer)
        t.start()
        try:
            result = run("jacobian", MODEL, fifo, "-p", "-q", "--max-input-bytes", "2M")
        finally:
            stop.set()
            t.join(timeout=30)
        _clean(result.exit_code, result.stderr, EXIT_CODES[want], needle)


@pytest.mark.parametrize("fmt", ["npy", "safetensors"])
def test_a_stream_is_read_only_as_far_as_its_header_declares(tmp_path, fmt):
    from safetensors.torch import save

    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, np.ones((4, 3), np.float32))
        data = buf.getvalue()
    else:
        data = save({"x": torch.ones(4, 3)})
    endless = data + b"\0" * 100_000  # what follows the declared end is not read as the file's
    result = run("jacobian", MODEL, "-", "-p", "-q", "--save", tmp_path / "r.npy", input=endless)
    assert result.exit_code == 0, result.stderr
    assert np.load(tmp_path / "r.npy").shape == (4, 3, 3)


def test_max_input_bytes_from_the_environment_and_the_api(tmp_path, monkeypatch):
    x = tmp_path / "x.npy"
    np.save(x, np.ones((100, 3)))
    monkeypatch.setenv("JACCLI_MAX_INPUT_BYTES", "1K")
    with pytest.raises(jaccli.ResourceError, match="at most 1.0 KiB"):
        jaccli.load_tensor(x)
    assert jaccli.load_tensor(x, max_bytes=10_000).shape == (100, 3)
    from jaccli.io.read import limit_input_bytes

    with limit_input_bytes("1M"):
        assert jaccli.load_tensor(x).shape == (100, 3)
    result = run("jacobian", MODEL, x, "-p", "-q", "--max-input-bytes", "nonsense")
    _clean(result.exit_code, result.stderr, EXIT_CODES[jaccli.UsageError], "--max-input-bytes")


def test_no_fault_is_an_internal_error(processes, hostile):
    """The issue's rule: "internal error" is kept for bugs; none of the faults above is one."""
    seen = [c.stderr for c in processes.values()]
    for name in HOSTILE:
        seen.append(run("jacobian", *hostile[name][0], "-p", "-q").stderr)
    assert len(seen) == len(processes) + len(HOSTILE)
    for text in seen:
        assert "internal error" not in text and "Traceback" not in text, text


if __name__ == "__main__" and sys.argv[1:] == ["--zygote"]:
    _zygote()
