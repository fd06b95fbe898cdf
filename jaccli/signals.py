"""The signals the command line ends on: SIGINT (Ctrl-C), SIGTERM and SIGHUP.

:func:`install` makes each of them raise :class:`Interrupted` wherever the program is,
so that cleanup runs (the atomic writer removes its temporary file) before the command
exits with ``128 + n`` and one line. :class:`Interrupted` derives from ``BaseException``
and not from ``KeyboardInterrupt`` on purpose: code that catches ``Exception`` cannot
swallow it, and Typer, which turns ``KeyboardInterrupt`` into a silent exit 130, lets
it through. Torch-free: installed before anything heavy is imported.

The library never installs handlers; only the ``jaccli`` command does.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from contextlib import contextmanager

#: the signals that end the command cleanly, where the platform has them
NAMES = ("SIGINT", "SIGTERM", "SIGHUP")
SIGNALS = tuple(getattr(signal, n) for n in NAMES if hasattr(signal, n))

_received: int | None = None
_exiting = False
_deferring = False
_pending: int | None = None


class Interrupted(BaseException):
    """The process received ``signum`` and is to stop, cleaning up on the way."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        self.signum = int(signum)
        super().__init__(self.name)

    @property
    def name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:  # pragma: no cover - a number without a name
            return f"signal {self.signum}"

    @property
    def exit_code(self) -> int:
        """``128 + n``, as shells report a process ended by signal ``n``."""
        return 128 + self.signum


def _handler(signum, frame) -> None:
    global _received, _pending
    _received = signum
    if _deferring:
        _pending = signum
    elif not _exiting:
        raise Interrupted(signum)


def install() -> None:
    """Raise :class:`Interrupted` on SIGINT, SIGTERM and SIGHUP from now on.

    A signal the parent set to be ignored (``nohup`` ignores SIGHUP, a background job
    SIGINT) stays ignored.
    """
    global _received, _exiting
    _received, _exiting = None, False
    if not getattr(sys.unraisablehook, "jaccli", False):
        sys.unraisablehook = _unraisable(sys.unraisablehook)
    for sig in SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _handler)


def run(entry: Callable[[], object]) -> None:
    """Install the handlers, then call ``entry`` (the command line). An interruption that
    escapes it — during imports, or while Typer builds the commands, before the command's
    own error handling begins — still ends with one line and ``128 + n``; so does one that
    Python swallowed (raised in a weakref callback or ``__del__``) where ``entry`` would
    have exited 0."""
    install()
    try:
        entry()
    except (Interrupted, KeyboardInterrupt) as exc:
        _report(exc if isinstance(exc, Interrupted) else Interrupted())
    except Exception:  # an import that C code failed because the handler raised inside it
        if _received is None:
            raise
        _report(Interrupted(_received))
    except SystemExit as exc:
        if _received is not None and exc.code in (0, None):
            _report(Interrupted(_received))
        raise
    if _received is not None:
        _report(Interrupted(_received))


def _report(exc: Interrupted) -> None:
    exiting()
    sys.stderr.write(f"error: interrupted ({exc.name})\n")
    sys.exit(exc.exit_code)


def _unraisable(hook):
    """``sys.unraisablehook`` that drops :class:`Interrupted`: raised where Python cannot
    propagate it (a weakref callback, ``__del__``), it is noted in :func:`received` and
    reported once, by :func:`run`, instead of as an "Exception ignored" traceback."""

    def unraisable(info) -> None:
        if not isinstance(info.exc_value, Interrupted):
            hook(info)

    unraisable.jaccli = True
    return unraisable


def received() -> int | None:
    """The last signal :func:`install`'s handler saw, or None.

    Needed where a library turns the exception raised inside its own callback into
    another one (``torch.save`` reports it as a ``RuntimeError``): the signal is
    still known here and the writer re-raises :class:`Interrupted`.
    """
    return _received


def exiting() -> None:
    """From now on, signals are noted but raise nothing: the process is already ending,
    and an exception raised while it prints its last line would show a traceback."""
    global _exiting
    _exiting = True


@contextmanager
def deferred():
    """Hold SIGINT, SIGTERM and SIGHUP back for the duration; one that arrived meanwhile
    raises :class:`Interrupted` at the end.

    For the few steps that must not be cut in half, such as moving a finished file into
    place and removing its temporary name. A flag and not ``pthread_sigmask``: torch's
    worker threads would still take the signal, and Python runs handlers in the main
    thread whatever the mask.
    """
    global _deferring, _pending
    outer = _deferring
    _deferring = True
    try:
        yield
    finally:
        _deferring = outer
        if not outer and _pending is not None:
            signum, _pending = _pending, None
            if not _exiting:
                raise Interrupted(signum)
