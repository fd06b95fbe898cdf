"""Writing results: the writer table, output checks and atomic writes.

Each format is a row of :data:`WRITERS`; a result is written to a temporary file beside
the target and moved into place, so a failure never leaves a partial file (SIGKILL
leaves the temporary file, which the next write of that target on this machine removes). Every
``OSError`` or ``RuntimeError`` a writer raises (a full disk, a file-size limit, a name
too long) is an :class:`~jaccli.OutputError`; a closed pipe on stdout is
:class:`~jaccli.errors.OutputClosed`.
"""

from __future__ import annotations

import errno
import glob
import io
import json
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from jaccli import signals
from jaccli.request.choices import STDIO
from jaccli.errors import OutputClosed, OutputError, UsageError
from jaccli.io.read import SUFFIXES
from jaccli.io.sources import shown_path


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def _write_npy(fh: BinaryIO, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    if len(tensors) != 1:
        raise OutputError(
            ".npy holds one array",
            expected="one result",
            got=f"{len(tensors)} ({', '.join(tensors)})",
            hint="save to .npz, .pt or .safetensors",
        )
    (t,) = tensors.values()
    np.save(fh, _to_numpy(t), allow_pickle=False)


def _write_npz(fh: BinaryIO, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    np.savez(fh, **{k: _to_numpy(v) for k, v in tensors.items()})


def _write_torch(fh: BinaryIO, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    obj = next(iter(tensors.values())) if len(tensors) == 1 else dict(tensors)
    recorder = _Recorder(fh)
    try:
        torch.save(_detached(obj), recorder)
    except RuntimeError:
        # torch's C++ writer reports a failed write ("No space left", a signal) as
        # "[enforce fail at inline_container.cc]"; the original is the one to report
        if recorder.error is not None:
            raise recorder.error from None
        raise


class _Recorder:
    """A file object that keeps the first exception its ``write`` raised."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self.error: BaseException | None = None

    def write(self, data) -> int:
        try:
            return self._fh.write(data)
        except BaseException as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self._fh.flush()


def _detached(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().contiguous()
    return {k: _detached(v) for k, v in obj.items()}


def _write_safetensors(fh: BinaryIO, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    from safetensors.torch import save

    fh.write(save(_detached(dict(tensors)), metadata=dict(meta)))


#: result format name -> writer of ``{name: tensor}`` and string metadata to a binary stream
WRITERS: dict[str, Callable[[BinaryIO, dict[str, torch.Tensor], dict[str, str]], None]] = {
    "npy": _write_npy,
    "npz": _write_npz,
    "pt": _write_torch,
    "safetensors": _write_safetensors,
}

_SAVE_SUFFIXES = {s: f for s, f in SUFFIXES.items() if f in WRITERS}


def output_format(path: str | os.PathLike) -> str:
    """The result format ``--save PATH`` implies (``-`` is ``.npy`` on stdout)."""
    name = os.fspath(path)
    if name == STDIO:
        return "npy"
    suffix = Path(name).suffix.lower()
    if suffix not in _SAVE_SUFFIXES:
        raise UsageError(
            "cannot tell the output format from the suffix",
            where=name,
            expected="one of " + ", ".join(sorted(_SAVE_SUFFIXES)) + " or - for stdout",
            got=suffix or "no suffix",
        )
    return _SAVE_SUFFIXES[suffix]


def check_output(path: str | os.PathLike, *, force: bool = False) -> None:
    """Fail now, before any work, if ``path`` cannot receive a result."""
    output_format(path)
    if os.fspath(path) != STDIO:
        check_writable(path, force=force)


def check_writable(path: str | os.PathLike, *, force: bool = False) -> None:
    """Fail now if a file cannot be written at ``path`` (any format)."""
    name = os.fspath(path)
    try:
        _check_writable(name, force)
    except OSError as exc:  # a name too long, a loop of links, …: the path itself is unusable
        raise OutputError(f"cannot write: {_reason(exc)}", where=shown_path(name)) from None


def _check_writable(name: str, force: bool) -> None:
    p = Path(name)
    if p.is_dir():
        raise OutputError("is a directory", where=name, expected="a file path")
    if p.exists() and not force:
        raise OutputError("already exists", where=name, hint="pass --force to overwrite it")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError("directory does not exist", where=str(parent))
    try:  # a real file, not os.access: root passes permission bits but not read-only mounts
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise OutputError(f"directory is not writable: {exc.strerror or exc}", where=str(parent)) from None


def _reason(exc: BaseException) -> str:
    """The first line of what went wrong: ``No space left on device``."""
    text = getattr(exc, "strerror", None) or str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_tensors(
    path: str | os.PathLike,
    tensors: torch.Tensor | Mapping[str, torch.Tensor],
    *,
    metadata: Mapping[str, object] | None = None,
    force: bool = False,
) -> None:
    """Write result tensor(s) to ``path``; the suffix picks the format.

    The file appears complete or not at all: data go to a temporary file beside
    it that is renamed into place, and removed on any failure (Ctrl-C included).
    ``metadata`` (JSON-able values) is stored where the format has room for it
    (``.safetensors`` header).
    """
    fmt = output_format(path)
    check_output(path, force=force)
    if isinstance(tensors, torch.Tensor):
        tensors = {"result": tensors}
    tensors = dict(tensors)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    name = os.fspath(path)
    if name == STDIO:
        buf = io.BytesIO()
        WRITERS[fmt](buf, tensors, meta)
        write_stdout(buf.getbuffer())
        return
    write_atomically(name, lambda fh: WRITERS[fmt](fh, tensors, meta), force=force)


def write_stdout(data) -> None:
    """Write bytes to standard output; a closed pipe is :class:`OutputClosed`, a failing
    device (``/dev/full``) an :class:`OutputError`."""
    out = sys.stdout.buffer
    view = memoryview(data).cast("B")
    try:
        while view:  # a pipe may take part of a large write, and the buffered writer says so
            done = out.write(view)
            view = view[done if done is not None else len(view) :]
        out.flush()
    except BrokenPipeError:
        raise OutputClosed("the reader closed the pipe before the result was complete", where="<stdout>") from None
    except OSError as exc:
        raise OutputError(f"cannot write: {_reason(exc)}", where="<stdout>") from None


#: test hook, documented in tests/test_faults.py and nowhere else used: a path; the
#: writer creates it once the temporary file is complete and waits until it is removed
_PAUSE_ENV = "JACCLI_TEST_PAUSE_BEFORE_RENAME"
#: test hook of the same kind for the named moments of a streamed save (:mod:`.stream`):
#: ``MOMENT=PATH[,MOMENT=PATH…]``, e.g. ``meta-written=/tmp/m``; see :func:`_pause_for_tests`
PAUSE_AT_ENV = "JACCLI_TEST_PAUSE_AT"
#: how long a paused writer waits for the test to remove the marker: a guard against a
#: test that died, never a timing the test relies on
_PAUSE_GUARD_S = 600

#: errors of os.link that mean "no hard links here", not "cannot write"
_NO_LINKS = {errno.EPERM, errno.EACCES, errno.EXDEV, errno.EMLINK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, force: bool = True) -> None:
    """Call ``write`` on a temporary file beside ``path`` and move it into place: the
    file appears complete or not at all (removed on any failure, signals included).

    With ``force=False`` an existing file is never replaced, not even one another
    process created while ``write`` ran: the last step is a hard link, which fails
    where a name exists (where the file system has no links, an existence check and
    a rename). ``OSError`` and ``RuntimeError`` (torch's writer) become
    :class:`~jaccli.OutputError`.
    """
    name = os.fspath(path)
    target = Path(name)
    prefix = f".{target.name[:100]}."
    _remove_stale_parts(target.parent, prefix)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f"{prefix}{_OWNER}-{os.getpid()}.", suffix=".part")
    except OSError as exc:
        raise OutputError(f"cannot write: {_reason(exc)}", where=shown_path(name)) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a result is an ordinary file
        _pause_for_tests()
        with signals.deferred():  # not cut between placing the file and dropping its temporary name
            _place(tmp, target, force)
    except BaseException as exc:
        with signals.deferred():
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, signals.Interrupted | KeyboardInterrupt):
            raise
        if signals.received() is not None:  # torch.save reports a signal in its callback as RuntimeError
            raise signals.Interrupted(signals.received()) from None
        if isinstance(exc, OutputError):
            raise
        if isinstance(exc, OSError | RuntimeError):
            raise OutputError(f"cannot write: {_reason(exc)}", where=shown_path(name)) from None
        raise


#: this machine in the names of temporary files (letters, digits and dashes): a file system
#: shared between machines shows others' files, whose pids mean nothing here
_OWNER = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def _remove_stale_parts(directory: Path, prefix: str) -> None:
    """Remove the temporary files a killed writer of this target left (only SIGKILL can:
    any other end removes its own): those made on this machine by a process that is gone.
    A live writer's, or another machine's, are left alone."""
    try:
        found = list(directory.glob(glob.escape(prefix) + "*.part"))
    except OSError:
        return
    for path in found:
        m = re.fullmatch(r"(?P<owner>[A-Za-z0-9-]+)-(?P<pid>\d+)\.[^.]+\.part", path.name[len(prefix) :])
        if m is None or m["owner"] != _OWNER or int(m["pid"]) == os.getpid() or _alive(int(m["pid"])):
            continue
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _place(tmp: str, target: Path, force: bool) -> None:
    if force:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise OutputError(
            "appeared while the result was computed; not replaced",
            where=str(target),
            hint="pass --force to overwrite it",
        ) from None
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        if os.path.lexists(target):
            raise OutputError("already exists", where=str(target), hint="pass --force to overwrite it") from None
        os.replace(tmp, target)
    else:
        os.unlink(tmp)


def _pause_for_tests(moment: str = "before-rename") -> None:
    """Test hook: at ``moment``, create the marker file the environment names and wait
    until the test removes it, so that a test acts (sends a signal, starts a rival) at
    exactly that point of the write instead of guessing it from the clock."""
    marker = os.environ.get(_PAUSE_ENV) if moment == "before-rename" else None
    for spec in os.environ.get(PAUSE_AT_ENV, "").split(","):
        at, _, path = spec.partition("=")
        if at == moment and path:
            marker = path
    if not marker:
        return
    Path(marker).touch()
    deadline = time.monotonic() + _PAUSE_GUARD_S
    while os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.005)
