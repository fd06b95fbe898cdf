"""One exception family: every error a user can cause is a :class:`JaccliError`.

Each subclass carries the process exit code the command line uses for it, so the
CLI needs no if-chain to map errors to codes and the README's table is checked
against :data:`EXIT_CODES` by the tests.
"""

from __future__ import annotations

from pathlib import Path


class JaccliError(Exception):
    """Base class of every error jaccli raises for a problem the user can fix.

    The message is built from parts so that every error reads the same way:
    ``<where>: <what> (expected <expected>, got <got>); <hint>``. A hint that names
    Python keywords (``per_sample=True``) has its command-line twin in ``cli_hint``
    (``--per-sample``), which the CLI prints instead (:meth:`cli_message`).
    """

    exit_code = 1
    label = "error"
    #: the hint in the command line's words, where it differs from ``hint`` (class default
    #: for errors rebuilt without ``__init__``, as a rank's error is on the other ranks)
    cli_hint: str | None = None

    def __init__(
        self,
        what: str,
        *,
        where: str | Path | None = None,
        expected: object = None,
        got: object = None,
        hint: str | None = None,
        cli_hint: str | None = None,
    ) -> None:
        self.what = what
        self.where = None if where is None else str(where)
        self.expected = expected
        self.got = got
        self.hint = hint
        self.cli_hint = cli_hint
        super().__init__(self._compose())

    def cli_message(self) -> str:
        """The message in the command line's words: ``cli_hint`` (which names options such
        as ``--per-sample``) in place of ``hint`` (which names keywords such as
        ``per_sample=True``) where the error has one."""
        return self._compose(self.cli_hint if self.cli_hint is not None else self.hint)

    def _compose(self, hint: str | None = None) -> str:
        hint = self.hint if hint is None else hint
        text = self.what
        if self.where:
            text = f"{self.where}: {text}"
        if self.expected is not None or self.got is not None:
            parts = []
            if self.expected is not None:
                parts.append(f"expected {self.expected}")
            if self.got is not None:
                parts.append(f"got {self.got}")
            text += f" ({', '.join(parts)})"
        if hint:
            text += f"; {hint}"
        return text


class UsageError(JaccliError):
    """An option or argument value is invalid (unknown device, dtype, mode, …)."""

    exit_code = 2
    label = "usage error"


class InputError(JaccliError):
    """A model or tensor file is missing, unreadable, corrupt, unsafe or unsupported."""

    exit_code = 3
    label = "input error"


class ModelError(JaccliError):
    """The model fails on the input, or its output does not fit the request."""

    exit_code = 4
    label = "model error"


class NumericalError(JaccliError):
    """Non-finite values where ``strict`` forbids them."""

    exit_code = 5
    label = "numerical error"


class ResourceError(JaccliError):
    """The device is unavailable or the work cannot fit in memory."""

    exit_code = 6
    label = "resource error"


class OutputError(JaccliError):
    """The result cannot be written where it was asked to go."""

    exit_code = 7
    label = "output error"


class CheckFailed(JaccliError):
    """``jaccli check`` found a derivative that disagrees with finite differences."""

    exit_code = 8
    label = "check failed"


class GateFailed(CheckFailed):
    """A ``--fail-above NAME=TOL`` gate: a computed result exceeds its tolerance somewhere."""

    exit_code = 9
    label = "gate failed"


class DependencyError(JaccliError):
    """An optional dependency a feature needs is not installed (``--plot`` without matplotlib)."""

    exit_code = 10
    label = "missing dependency"


class OutputClosed(OutputError):
    """The reader of standard output went away (``jaccli … --save - | head -c 100``):
    the result was cut short, which a pipeline must be able to tell from success."""

    exit_code = 11
    label = "output closed"


class ResumeError(JaccliError):
    """``--resume`` cannot continue: no partial run, one made with another model, input,
    command or options, or a result format that does not stream."""

    exit_code = 12
    label = "resume error"


class JaccliWarning(UserWarning):
    """Something the user should know about a result that is still returned."""


#: exit code of each error class, the single source the CLI and README follow
EXIT_CODES: dict[type[JaccliError], int] = {
    cls: cls.exit_code
    for cls in (
        JaccliError,
        UsageError,
        InputError,
        ModelError,
        NumericalError,
        ResourceError,
        OutputError,
        CheckFailed,
        GateFailed,
        DependencyError,
        OutputClosed,
        ResumeError,
    )
}

#: exit code after Ctrl-C, as shells report SIGINT; SIGTERM and SIGHUP give 128 + their number
EXIT_INTERRUPTED = 130


def shape_str(shape) -> str:
    """``[4, 3]`` for a shape; ``[]`` for a scalar."""
    return "[" + ", ".join(str(int(s)) if not isinstance(s, str) else s for s in shape) + "]"


def format_bytes(n: float) -> str:
    """``4.0 GiB`` for messages and summaries; an absurd figure as its number of digits.

    >>> format_bytes(512), format_bytes(3 * 2**30)
    ('512 B', '3.0 GiB')
    """
    if n >= 2**80:
        return f"a {len(str(int(n)))}-digit number of bytes"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if abs(n) < 1024 or unit == "EiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def first_line(exc: BaseException, most: int = 300) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0][:most] if text else type(exc).__name__
