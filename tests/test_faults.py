"""Fault injection: signals, kills, full disks, closed pipes, races and rival writers.

Real processes (the ``jaccli`` entry point) where the fault needs one — a signal, SIGKILL, a
file-size limit, /dev/full, a pipe whose reader leaves, another process creating the target,
a second writer of the same result — all run by one fixture and forked from one interpreter
that imported torch once (tests/faults_driver.py). Hostile and damaged input files are in
tests/test_hostile.py.

Nothing here waits on the clock. Each fault lands at a named moment of the write, through a
test-only hook read in ``jaccli/io/write.py``: ``JACCLI_TEST_PAUSE_AT=MOMENT=PATH[,…]`` makes
the program create PATH at MOMENT and wait until PATH is removed (the older
``JACCLI_TEST_PAUSE_BEFORE_RENAME=PATH`` is the moment ``before-rename``). The moments of a
streamed ``.npy`` / ``.safetensors`` save (``jaccli/io/stream.py``), in order: ``locked`` (the
partial file exists and is locked, nothing recorded), ``meta-record`` (the request record's
temporary file is written, not yet renamed), ``meta-written``, ``allocated`` (header written,
space reserved), ``chunk-K`` (K chunks written), ``done-record`` (inside the atomic write of a
record of finished chunks), ``before-rename``. The fixture polls for the marker files the
program creates; the only time limit is a hang guard.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

import jaccli
from jaccli import signals
from jaccli.errors import EXIT_CODES, OutputClosed
from jaccli.io import write as jwrite
from faults_driver import MODEL, Case, Driver, _sigcgt, rivals, send
from problems import HANG_GUARD_S

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals, /proc and /dev/full")


EXIT_OUTPUT = EXIT_CODES[jaccli.OutputError]
EXIT_RESUME = EXIT_CODES[jaccli.ResumeError]


def _clean(code: int, stderr: str, want: int, *needles: str) -> str:
    """One line, the wanted code, no traceback, no "internal error"."""
    lines = stderr.strip().splitlines()
    assert code == want, (code, stderr)
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and "internal error" not in stderr and "Exception ignored" not in stderr
    for needle in needles:
        assert re.search(needle, lines[0]), (needle, lines[0])
    return lines[0]


# ----------------------------------------------------------------- real processes


@pytest.fixture(scope="module")
def processes(tmp_path_factory):
    """Run every process case, act on each at its moments, collect what they left."""
    root = tmp_path_factory.mktemp("faults")
    logs = root / "logs"
    logs.mkdir()
    x = root / "x.npy"
    np.save(x, np.random.default_rng(0).random((3000, 3), dtype=np.float32))  # a 108 KB result: more than a pipe holds
    cases = {}

    def case(name, *args, cwd_of=None, **kw):
        cwd = cases[cwd_of].cwd if cwd_of else root / name
        cwd.mkdir(exist_ok=True)
        cases[name] = Case(name, args, cwd, logs, **kw)
        return cwd

    save = ("jacobian", MODEL, x, "-p", "-q", "--save")
    case("sigterm-while-saving", *save, "r.npy", steps=[("before-rename", send(signal.SIGTERM))])
    (case("sighup-force-pt", *save, "r.pt", "--force", steps=[("before-rename", send(signal.SIGHUP))]) / "r.pt").write_bytes(b"the old result")
    case("race", *save, "r.npy", steps=[("before-rename", lambda d, c: (c.cwd / "r.npy").write_bytes(b"another process's file"))])
    case("file-size-limit", *save, "r.pt", fsize=64 * 1024)
    case("kill-while-saving-pt", *save, "r.pt", steps=[("before-rename", send(signal.SIGKILL))])
    case("kill-while-saving-pt+rerun", *save, "r.pt", cwd_of="kill-while-saving-pt", after="kill-while-saving-pt")
    case("dev-full", *save, "-", stdout="/dev/full")
    case("sigint-at-start-up", *save, "r.npy")
    case("closed-pipe", *save, "-")

    # streamed saves (30 chunks of 100 points), a fault at each moment, then the next run
    stream = ("jacobian", MODEL, x, "-p", "--chunk-size", "100")
    for fmt in ("npy", "safetensors"):
        case(f"ref-{fmt}", *stream, "-q", "--save", f"r.{fmt}")
    resume = (*stream, "--json", "--resume", "--save")
    case("sigint-locked", *stream, "-q", "--save", "r.npy", steps=[("locked", send(signal.SIGINT))])
    case("sigint-locked+resume", *resume, "r.npy", cwd_of="sigint-locked", after="sigint-locked")
    case("kill-locked", *stream, "-q", "--save", "r.safetensors", steps=[("locked", send(signal.SIGKILL))])
    case("kill-locked+resume", *resume, "r.safetensors", cwd_of="kill-locked", after="kill-locked")
    case("sigterm-recorded", *stream, "-q", "--save", "r.safetensors", steps=[("meta-written", send(signal.SIGTERM))])
    case("sigterm-recorded+resume", *resume, "r.safetensors", cwd_of="sigterm-recorded", after="sigterm-recorded")
    (case("sigint-force", *stream, "-q", "--force", "--save", "r.npy", steps=[("allocated", send(signal.SIGINT))]) / "r.npy").write_bytes(b"old")
    case("sigint-force+resume", *resume, "r.npy", "--force", cwd_of="sigint-force", after="sigint-force")
    case("kill-in-record", *stream, "-q", "--save", "r.npy", steps=[("meta-record", send(signal.SIGKILL))])
    case("kill-in-record+rerun", *stream, "--json", "--save", "r.npy", cwd_of="kill-in-record", after="kill-in-record")
    for fmt in ("npy", "safetensors"):
        name = f"sigterm-in-done-record-{fmt}"
        case(name, *stream, "-q", "--save", f"r.{fmt}",
             steps=[("chunk-2", send(signal.SIGTERM)), ("done-record", send(signal.SIGTERM))])  # fmt: skip
        case(f"{name}+resume", *resume, f"r.{fmt}", cwd_of=name, after=name)
    case("kill-in-done-record", *stream, "-q", "--save", "r.npy",
         steps=[("chunk-2", send(signal.SIGINT)), ("done-record", send(signal.SIGKILL))])  # fmt: skip
    case("kill-in-done-record+resume", *resume, "r.npy", cwd_of="kill-in-done-record", after="kill-in-done-record")
    case("kill-mid-run", *stream, "-q", "--save", "r.npy", steps=[("chunk-5", send(signal.SIGKILL))])
    case("kill-mid-run+resume", *resume, "r.npy", cwd_of="kill-mid-run", after="kill-mid-run")

    # rival writers: while one holds the lock, others (with --force, with --resume) fail at once
    for fmt, force in (("npy", ()), ("safetensors", ("--force",))):
        holder = f"holder-{fmt}"
        names = [f"{holder}-rival", f"{holder}-rival-resume"]
        case(holder, *stream, "-q", *force, "--save", f"r.{fmt}", steps=[("allocated", rivals(*names))])
        case(names[0], *stream, "-q", *force, "--save", f"r.{fmt}", cwd_of=holder, manual=True)
        case(names[1], *resume, f"r.{fmt}", *force, cwd_of=holder, manual=True)
        case(f"{holder}+next", *stream, "-q", "--force", "--save", f"r.{fmt}", cwd_of=holder, after=holder)
    for i in range(4):  # the four writers started together, --force
        case(f"four-{i}", *stream, "-q", "--force", "--save", "r.npy", cwd_of="four-0" if i else None)

    fresh = {"sigint-at-start-up", "closed-pipe"}
    startup, pipe = cases["sigint-at-start-up"], cases["closed-pipe"]
    for n in fresh:
        cases[n].manual = True
    startup.spawn_fresh(stdout=subprocess.DEVNULL)
    pipe.spawn_fresh(stdout=subprocess.PIPE)

    def head_c_100():  # the reader takes 100 bytes and leaves, as `| head -c 100` does
        pipe.cut = pipe.proc.stdout.read(100)
        pipe.proc.stdout.close()

    reader = threading.Thread(target=head_c_100)
    reader.start()

    def interrupt_start_up():
        # its own thread, so that no action of the driver (waiting for rivals) delays it:
        # SIGINT as soon as the handlers are in place, while jaccli still imports its CLI or torch
        while startup.proc.poll() is None and not _sigcgt(startup.pid) & (1 << (signal.SIGTERM - 1)):
            time.sleep(0.001)
        if startup.proc.poll() is None:
            os.kill(startup.pid, signal.SIGINT)

    interrupter = threading.Thread(target=interrupt_start_up)
    interrupter.start()
    forked = {n: c for n, c in cases.items() if n not in fresh}
    for c in forked.values():
        c.returncode = None
    driver = Driver(forked, root)
    try:
        driver.run()
    except BaseException:
        driver.kill_all()
        raise
    interrupter.join(timeout=HANG_GUARD_S)
    reader.join(timeout=HANG_GUARD_S)
    for name in fresh:
        cases[name].returncode = cases[name].proc.wait(timeout=HANG_GUARD_S)
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
    _clean(c.returncode, c.stderr, EXIT_OUTPUT, "r.npy", "appeared while", "--force")
    assert c.files() == ["r.npy"] and (c.cwd / "r.npy").read_bytes() == b"another process's file"


def test_a_kill_inside_an_atomic_write_leaves_a_temporary_the_next_write_removes(processes):
    c = processes["kill-while-saving-pt"]
    assert c.returncode == -signal.SIGKILL
    (left,) = c.left
    assert re.fullmatch(rf"\.r\.pt\.[\w-]+-{c.pid}\.\w+\.part", left), left
    r = processes["kill-while-saving-pt+rerun"]
    assert r.returncode == 0, r.stderr
    assert r.left == ["r.pt"] and torch.load(r.cwd / "r.pt").shape == (3000, 3, 3)


def test_ctrl_c_during_start_up_is_one_line(processes):
    c = processes["sigint-at-start-up"]
    _clean(c.returncode, c.stderr, 130, "interrupted")
    assert c.files() == []


def test_file_size_limit_is_an_output_error(processes):
    c = processes["file-size-limit"]
    _clean(c.returncode, c.stderr, EXIT_OUTPUT, "r.pt", "File too large")
    assert c.files() == []


def test_stdout_on_a_full_device_is_an_output_error(processes):
    c = processes["dev-full"]
    _clean(c.returncode, c.stderr, EXIT_OUTPUT, "<stdout>", "No space left")


def test_a_reader_leaving_early_is_exit_11(processes):
    c = processes["closed-pipe"]
    assert len(c.cut) == 100 and c.cut.startswith(b"\x93NUMPY")
    assert EXIT_CODES[OutputClosed] == 11
    _clean(c.returncode, c.stderr, 11, "<stdout>", "closed the pipe")


def test_no_fault_is_an_internal_error(processes):
    """The rule: "internal error" is kept for bugs; none of the faults above is one."""
    for name, c in processes.items():
        assert "internal error" not in c.stderr and "Traceback" not in c.stderr, (name, c.stderr)


# ----------------------------------------------------------------- streamed saves: signals and kills


def _result(c: Case, fmt: str) -> np.ndarray:
    path = c.cwd / f"r.{fmt}"
    if fmt == "npy":
        return np.load(path)
    from safetensors.numpy import load_file

    (arr,) = load_file(path).values()
    return arr


def _finished(processes, name: str, fmt: str, *, resumed: int | None = None) -> None:
    """The follow-up run ended well: the reference result, byte for byte, and nothing beside it."""
    c = processes[name]
    assert c.returncode == 0, c.stderr
    ref = processes[f"ref-{fmt}"]
    assert (c.cwd / f"r.{fmt}").read_bytes() == (ref.cwd / f"r.{fmt}").read_bytes()
    assert c.files() == [f"r.{fmt}"], c.files()
    if resumed is not None:
        assert json.loads(c.stdout)["resumed_points"] == resumed


def _partial(fmt: str, *suffixes: str) -> list[str]:
    return sorted(f".r.{fmt}.jaccli-partial{s}" for s in suffixes)


def test_references_ran(processes):
    for fmt in ("npy", "safetensors"):
        c = processes[f"ref-{fmt}"]
        assert c.returncode == 0 and c.files() == [f"r.{fmt}"], c.stderr
    assert _result(processes["ref-npy"], "npy").shape == (3000, 3, 3)
    np.testing.assert_array_equal(_result(processes["ref-npy"], "npy"), _result(processes["ref-safetensors"], "safetensors"))


def test_a_signal_before_the_record_cleans_up_and_resume_finds_nothing(processes):
    c = processes["sigint-locked"]
    _clean(c.returncode, c.stderr, 130, "interrupted")
    assert c.left == []
    r = processes["sigint-locked+resume"]
    _clean(r.returncode, r.stderr, EXIT_RESUME, "nothing to resume", "without --resume")
    assert r.left == []


def test_a_kill_before_the_record_resumes_from_chunk_0(processes):
    c = processes["kill-locked"]
    assert c.returncode == -signal.SIGKILL and c.left == _partial("safetensors", "")
    _finished(processes, "kill-locked+resume", "safetensors", resumed=0)


def test_a_signal_after_the_record_keeps_a_partial_run_that_resumes(processes):
    c = processes["sigterm-recorded"]
    _clean(c.returncode, c.stderr, 143, "interrupted", "SIGTERM")
    assert c.left == _partial("safetensors", "", ".json")
    _finished(processes, "sigterm-recorded+resume", "safetensors", resumed=0)


def test_with_force_the_old_target_stays_until_the_resumed_run_replaces_it(processes):
    c = processes["sigint-force"]
    _clean(c.returncode, c.stderr, 130, "interrupted")
    assert c.left == sorted(["r.npy", *_partial("npy", "", ".json")])
    _finished(processes, "sigint-force+resume", "npy", resumed=0)


def test_a_kill_inside_a_record_leaves_a_temporary_the_next_run_removes(processes):
    c = processes["kill-in-record"]
    assert c.returncode == -signal.SIGKILL and c.left == _partial("npy", "", ".json.tmp")
    _finished(processes, "kill-in-record+rerun", "npy", resumed=0)


@pytest.mark.parametrize("fmt", ["npy", "safetensors"])
def test_a_signal_inside_a_record_waits_for_it_and_leaves_no_temporary(processes, fmt):
    c = processes[f"sigterm-in-done-record-{fmt}"]
    _clean(c.returncode, c.stderr, 143, "interrupted", "SIGTERM")
    assert c.left == _partial(fmt, "", ".json", ".done0.json")
    _finished(processes, f"sigterm-in-done-record-{fmt}+resume", fmt, resumed=200)


def test_a_kill_inside_a_done_record_resumes_from_the_last_whole_record(processes):
    c = processes["kill-in-done-record"]
    assert c.returncode == -signal.SIGKILL and c.left == _partial("npy", "", ".json", ".done0.json.tmp")
    _finished(processes, "kill-in-done-record+resume", "npy", resumed=0)


def test_a_kill_mid_run_leaves_a_stale_lock_that_blocks_no_one(processes):
    assert processes["kill-mid-run"].returncode == -signal.SIGKILL
    _finished(processes, "kill-mid-run+resume", "npy", resumed=0)  # killed before any record


# ----------------------------------------------------------------- rival writers


@pytest.mark.parametrize("fmt", ["npy", "safetensors"])
def test_a_second_writer_fails_at_once_naming_the_first(processes, fmt):
    holder = processes[f"holder-{fmt}"]
    for name in (f"holder-{fmt}-rival", f"holder-{fmt}-rival-resume"):
        r = processes[name]
        _clean(r.returncode, r.stderr, EXIT_OUTPUT, rf"another jaccli \(pid {holder.pid}\) is writing r\.{fmt}")
    assert holder.returncode == 0, holder.stderr
    assert holder.left == [f"r.{fmt}"]
    # the next writer, --force, replaces the holder's result with its own complete one
    _finished(processes, f"holder-{fmt}+next", fmt)


def test_four_writers_started_together_leave_one_complete_result(processes):
    four = [processes[f"four-{i}"] for i in range(4)]
    codes = [c.returncode for c in four]
    assert 0 in codes and set(codes) <= {0, EXIT_OUTPUT}, [(c.returncode, c.stderr) for c in four]
    for c in four:
        if c.returncode:
            # the pid where the holder still held the lock when the rival looked it up
            _clean(c.returncode, c.stderr, EXIT_OUTPUT, r"another jaccli (\(pid \d+\)|process) is writing r\.npy")
    ref = processes["ref-npy"]
    assert four[0].files() == ["r.npy"]
    assert (four[0].cwd / "r.npy").read_bytes() == (ref.cwd / "r.npy").read_bytes()


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
