"""The driver of tests/test_faults.py: real ``jaccli`` processes forked from one interpreter
that imported torch once (the *zygote*), started at once, after another or from an action,
and acted on (a signal, a kill, a rival) at the named moments the program pauses at
(``JACCLI_TEST_PAUSE_AT``, see tests/test_faults.py). Not a test module: pytest collects
nothing here; ``python tests/faults_driver.py --zygote`` is the zygote."""

from __future__ import annotations

import json
import os
import queue
import resource
import selectors
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from problems import EXAMPLES, HANG_GUARD_S

MODEL = str(EXAMPLES / "field.pt")  # R^3 -> R^3: a [N, 3, 3] Jacobian per sample
PAUSE_AT = "JACCLI_TEST_PAUSE_AT"
#: several processes share two cores here: one thread each, or their thread pools fight
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _sigcgt(pid: int) -> int:
    """The mask of signals ``pid`` catches, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return int(line.split()[1], 16)
    return 0


def _as_from_a_terminal() -> None:
    """In the child before exec: SIGINT, SIGQUIT and SIGHUP at their defaults, as a command
    typed at a terminal has them. A test run started in the background of a non-interactive
    shell (a CI job's ``cmd &``) inherits SIGINT and SIGQUIT ignored, one started by ``nohup``
    SIGHUP, and jaccli keeps an ignored signal ignored (as it should, for ``nohup``), so a
    Ctrl-C or hang-up case would otherwise run to its end (under ``nohup bash .ci/run`` the
    SIGHUP case ended 0)."""
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def _zygote() -> None:
    """``python tests/faults_driver.py --zygote``: import jaccli and torch once, then fork one
    child per case and run the real ``jaccli`` entry point in it with its own directory,
    stdout, stderr, environment and file-size limit. Reads batches of cases (a JSON list
    per line) from stdin until it closes; prints ``start NAME PID`` per child and
    ``end NAME CODE`` as each ends. Each process would otherwise pay torch's import
    (seconds); the start-up and closed-pipe cases, which are about the start and the end
    of an interpreter, run as fresh processes instead."""
    import jaccli.__main__ as entry
    import jaccli.cli.main  # noqa: F401 - imported before the fork, as torch is
    import jaccli.io  # noqa: F401

    _warm_up()
    pids: dict[int, str] = {}
    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ)
    pending, reading = b"", True

    def reap(block: bool) -> None:
        while pids:
            pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            if pid == 0:
                return
            print("end", pids.pop(pid), os.waitstatus_to_exitcode(status), flush=True)
            block = False

    while reading or pids:
        if reading and sel.select(timeout=0.01 if pids else None):  # the tick only reaps children sooner
            data = os.read(0, 1 << 16)
            reading = bool(data)
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                for spec in json.loads(line):
                    _fork(spec, entry, pids)
        reap(block=not reading)


def _warm_up() -> None:
    """Run the command once in the zygote, in-process, on ten points: what a first run pays
    (lazy imports, TorchScript's first calls; ~1.5 s) is paid once, not once per child."""
    import tempfile

    from typer.testing import CliRunner

    from jaccli.cli.main import app

    with tempfile.TemporaryDirectory() as d:
        np.save(f"{d}/x.npy", np.ones((10, 3), np.float32))
        for target in ("w.npy", "w.safetensors", "w.pt"):
            done = CliRunner().invoke(app, ["jacobian", MODEL, f"{d}/x.npy", "-p", "-q", "--chunk-size", "5",
                                            "--save", f"{d}/{target}"])  # fmt: skip
            assert done.exit_code == 0, done.output


def _fork(spec: dict, entry, pids: dict) -> None:
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
    print("start", spec["name"], pid, flush=True)


class Case:
    """One process: its command, the moments to act on it, and what it left.

    ``steps`` are ``(moment, act)`` pairs, in the order the program reaches them; ``act``
    gets the :class:`Driver` and the case. ``after`` names the case whose end starts this
    one (a follow-up in the same directory: ``--resume``, the next writer); ``manual``
    cases are started by another case's action."""

    def __init__(self, name, args, cwd, logs, *, stdout=None, fsize=None, steps=(), after=None, manual=False):
        self.name, self.args, self.cwd, self.fsize = name, [str(a) for a in args], cwd, fsize
        self.steps = [(moment, logs / f"{name}.{moment}", act) for moment, act in steps]
        self.after, self.manual = after, manual
        # records of finished chunks only where a case makes them (a signal, a kill), never
        # because a second passed: on a loaded machine that second could come at any chunk
        self.env = {"COLUMNS": "200", "JACCLI_RECORD_INTERVAL": "1e9"}
        if self.steps:
            self.env[PAUSE_AT] = ",".join(f"{m}={marker}" for m, marker, _ in self.steps)
        self.stdout_path = stdout or str(logs / f"{name}.out")
        self.stderr_path = logs / f"{name}.err"
        self.pid = self.returncode = self.proc = None
        self.left: list[str] | None = None  # the directory's files when the case ended

    def spawn_fresh(self, **kw) -> None:
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "jaccli", *self.args], cwd=self.cwd, env={**os.environ, **ONE_THREAD, **self.env},
                stdin=subprocess.DEVNULL, stderr=err, preexec_fn=_as_from_a_terminal, **kw,
            )  # fmt: skip
        self.pid = self.proc.pid

    def spec(self) -> dict:
        return dict(name=self.name, args=self.args, cwd=str(self.cwd), env=self.env, stdout=self.stdout_path,
                    stderr=str(self.stderr_path), fsize=self.fsize)  # fmt: skip

    @property
    def stderr(self) -> str:
        return Path(self.stderr_path).read_text()

    @property
    def stdout(self) -> str:
        return Path(self.stdout_path).read_text()

    def files(self) -> list[str]:
        return sorted(p.name for p in self.cwd.iterdir())


class Driver:
    """Runs cases in the zygote: starts them (at once, after another, or from an action),
    acts at their moments, and records each one's exit code and the files it left."""

    def __init__(self, cases: dict[str, Case], root: Path) -> None:
        self.cases = cases
        self.events: queue.Queue = queue.Queue()
        self.zygote = subprocess.Popen(
            [sys.executable, __file__, "--zygote"], cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, **ONE_THREAD}, preexec_fn=_as_from_a_terminal,
        )  # fmt: skip
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.deadline = time.monotonic() + HANG_GUARD_S

    def _read(self) -> None:
        for line in self.zygote.stdout:
            self.events.put(line.split())
        self.events.put(None)

    def spawn(self, names) -> None:
        self.zygote.stdin.write(json.dumps([self.cases[n].spec() for n in names]) + "\n")
        self.zygote.stdin.flush()

    def _next_event(self, block: bool) -> bool:
        """Take one start/end line from the zygote; False when none was there."""
        try:
            event = self.events.get(timeout=max(1.0, self.deadline - time.monotonic()) if block else 0.005)
        except queue.Empty:
            if block:
                raise AssertionError("hang guard: the zygote said nothing") from None
            return False
        assert event is not None, "the zygote ended early"
        kind, name, number = event
        case = self.cases[name]
        if kind == "start":
            case.pid = int(number)
        else:
            case.left, case.returncode = case.files(), int(number)
            followers = [n for n, c in self.cases.items() if c.after == name]
            if followers:
                self.spawn(followers)
        return True

    def wait(self, names) -> None:
        """Block until every named case has ended (an action waiting for rivals)."""
        while any(self.cases[n].returncode is None for n in names):
            assert time.monotonic() < self.deadline, "hang guard"
            self._next_event(block=True)

    def kill_all(self) -> None:
        """After a failed run: end the cases still running (paused ones wait for a marker)
        and the zygote, so that nothing outlives the test."""
        for c in self.cases.values():
            if c.pid is not None and c.returncode is None:
                try:
                    os.kill(c.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.zygote.kill()
        self.zygote.wait(timeout=HANG_GUARD_S)

    def run(self) -> None:
        """Start the first cases, act at every moment, until all cases are done."""
        for c in self.cases.values():
            c.step = 0
        self.spawn([n for n, c in self.cases.items() if c.after is None and not c.manual])
        while any(c.returncode is None for c in self.cases.values()):
            assert time.monotonic() < self.deadline, {n: (c.returncode, c.step) for n, c in self.cases.items()}
            for c in self.cases.values():
                if c.pid is not None and c.returncode is None and c.step < len(c.steps):
                    moment, marker, act = c.steps[c.step]
                    if marker.exists():  # the program is waiting at ``moment``
                        act(self, c)
                        marker.unlink()
                        c.step += 1
            while self._next_event(block=False):
                pass
        self.zygote.stdin.close()
        assert self.zygote.wait(timeout=HANG_GUARD_S) == 0
        self.reader.join(timeout=HANG_GUARD_S)
        self.zygote.stdout.close()


def send(sig):
    return lambda driver, c: os.kill(c.pid, sig)


def rivals(*names):
    """The action that starts the named cases while this one holds its moment, and waits for them."""

    def act(driver, c):
        driver.spawn(names)
        driver.wait(names)

    return act


if __name__ == "__main__" and sys.argv[1:] == ["--zygote"]:
    _zygote()
