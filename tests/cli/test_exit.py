"""How the ``jaccli`` process ends (jaccli/__main__.py): the atexit handlers run and the output
is complete, but the interpreter is not torn down object by object (``os._exit``) — unless
something else is still to run in the process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from jaccli.errors import EXIT_CODES, InputError
from problems import EXAMPLES, HANG_GUARD_S

#: the console script's shape (``from jaccli.__main__ import main; main()``), with a handler, and
#: ``os._exit`` saying that it was called
SCRIPT = """
import atexit, json, os, sys
real_exit = os._exit
os._exit = lambda code: (os.write(2, b"skipped the teardown\\n"), real_exit(code))
atexit.register(lambda: sys.stderr.write("handler ran\\n"))
{before}
from jaccli.__main__ import main
sys.argv = ["jaccli", *json.loads(sys.argv[1])]
main()
"""


def _run(args, before: str = "", **kw):
    code = SCRIPT.format(before=before)
    return subprocess.run([sys.executable, "-c", code, json.dumps([str(a) for a in args])], capture_output=True,
                          text=True, timeout=HANG_GUARD_S, **kw)  # fmt: skip


def _jacobian(*extra):
    return ["jacobian", EXAMPLES / "pinn.pt", EXAMPLES / "pinn_x.npy", "-p", *extra]


def test_a_finished_command_runs_the_handlers_flushes_and_skips_the_teardown():
    done = _run(_jacobian("--json"))
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)  # all of it, though the process ended with os._exit
    assert doc["results"]["jacobian"]["shape"] == [1000, 501, 1]
    assert "handler ran" in done.stderr and "skipped the teardown" in done.stderr


def test_a_failing_command_keeps_its_exit_code_and_its_message():
    done = _run(["jacobian", EXAMPLES / "missing.pt", EXAMPLES / "pinn_x.npy"])
    assert done.returncode == EXIT_CODES[InputError]
    assert "no such model file" in done.stderr
    assert "handler ran" in done.stderr and "skipped the teardown" in done.stderr


def test_the_result_file_is_complete_when_the_process_has_ended(tmp_path):
    import numpy as np

    done = _run(_jacobian("--save", tmp_path / "J.npy", "-q"))
    assert done.returncode == 0, done.stderr
    assert np.load(tmp_path / "J.npy").shape == (1000, 501, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["J.npy"]


@pytest.mark.parametrize("before", [
    # a thread still running when the command is done: it outlives the command's start by 2 s
    "import threading, time\n"
    "def wait():\n    while 'jaccli.engine.api' not in sys.modules:\n        time.sleep(0.01)\n    time.sleep(2)\n"
    "threading.Thread(target=wait).start()",
    "import cProfile; cProfile.Profile().enable()",  # a profiler writes its output after the program
])  # fmt: skip
def test_the_usual_exit_where_something_else_is_still_to_run(before):
    done = _run(_jacobian("-q"), before=before)
    assert done.returncode == 0, done.stderr
    assert "handler ran" in done.stderr and "skipped the teardown" not in done.stderr


def test_main_run_from_another_programs_main_returns_to_it(tmp_path):
    # runpy (as a test or a wrapper runs `python -m jaccli`): the program goes on after it
    code = (
        "import runpy, sys\nsys.argv = ['jaccli', '--version']\n"
        "try:\n    runpy.run_module('jaccli', run_name='__main__')\nexcept SystemExit as exc:\n"
        "    print('returned', exc.code)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert done.returncode == 0 and "returned 0" in done.stdout, done.stderr
