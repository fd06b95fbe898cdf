"""``python -m jaccli`` and the ``jaccli`` console script.

Signal handling is installed before the CLI (Typer, Rich) is imported: Ctrl-C, SIGTERM
or SIGHUP during start-up (importing, or Typer building the commands) then end with one
line too, not a traceback. Only the interpreter's own first milliseconds, before any of
jaccli runs, are out of reach.

The process ends without tearing the interpreter down (:func:`_end`): once the command is
done, with its files closed and renamed into place, the ``atexit`` handlers run and stdout
and stderr are flushed as at any exit, and then ``os._exit`` skips the rest, which is freeing
every object and module one by one: 0.1 to 0.3 s of a command that imported torch (0.6 to
0.8 s after a bare ``import torch``; measured under load), the memory going back to the
system all at once anyway. Where something else is still to run in the process — a thread,
a ``torch.distributed`` group, a profiler or tracer (cProfile and coverage write their
output after the program returns), a program that runs this module's :func:`main` from a
``__main__`` of its own — it exits as usual.
"""

import os
import sys

from jaccli import signals
from jaccli.cli import collector


def _cli() -> None:
    from jaccli.cli.main import app

    app()


def main() -> None:
    collector.pause()  # until the model is loaded: start-up's full collections would free nothing
    try:
        signals.run(_cli)
    except SystemExit as exc:
        _end(exc.code)
        raise
    _end(0)


def _end(code) -> None:
    """Exit with ``code`` now, skipping the interpreter's teardown, where nothing else is to run
    in the process; otherwise return (the caller exits as usual)."""
    if code is None:
        code = 0
    if not isinstance(code, int) or not _alone():
        return
    signals.exiting()  # a signal from here on is noted, not raised: the command is done
    try:
        import atexit

        atexit._run_exitfuncs()  # what an exit runs: weakref finalizers, logging, torch's own
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except BaseException:  # a closed pipe, a failing handler: the usual exit reports it
        return
    os._exit(code)


def _alone() -> bool:
    """Whether this process is jaccli's own and nothing in it is still to run."""
    import threading

    entry = sys.modules.get("__main__")
    if getattr(entry, "main", None) is not main:  # run from another program's __main__ (runpy, a test)
        return False
    if sys.getprofile() is not None or sys.gettrace() is not None or threading.active_count() > 1:
        return False
    monitoring = getattr(sys, "monitoring", None)  # 3.12+: cProfile and coverage's sysmon core use it
    if monitoring is not None and any(monitoring.get_tool(i) is not None for i in range(6)):
        return False
    dist = sys.modules.get("torch.distributed")
    return not (dist is not None and dist.is_available() and dist.is_initialized())


if __name__ == "__main__":
    main()
