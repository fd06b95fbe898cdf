"""Sources: the bytes of one input, read no further than the input limit allows.

Memory is bounded by what the request needs, never by what a file claims or a stream
supplies: a regular file larger than :func:`max_input_bytes` is refused before it is
read; a pipe, FIFO or device is read no further than its header declares (``.npy``,
``.safetensors``, :func:`declared_extent`) or than the limit. The limit itself
(``--max-input-bytes``, ``$JACCLI_MAX_INPUT_BYTES``, :func:`limit_input_bytes`) lives here.
What the bytes mean is :mod:`.read`'s (the reader table) and :mod:`.npy`'s.

Imports: numpy (``.npy`` headers only), :mod:`.archives` (the zip magic),
:mod:`jaccli.request.choices`, :mod:`jaccli.errors`; :mod:`.read` only for its suffix
table in one error message (read imports this module).
"""

from __future__ import annotations

import contextvars
import io
import json
import math
import os
import re
import stat
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from jaccli.io.archives import ZIP_MAGIC as _ZIP_MAGIC
from jaccli.request.choices import STDIO
from jaccli.errors import format_bytes, InputError, ResourceError, UsageError

_NPY_MAGIC = b"\x93NUMPY"
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """Bytes of one input, with the name errors should show."""

    name: str
    data: bytes

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix.lower() if self.name != STDIO else ""


#: default of ``--max-input-bytes``: the largest input or model file jaccli reads
DEFAULT_MAX_INPUT_BYTES = 4 * 2**30
#: environment variable that sets the limit where ``--max-input-bytes`` is not given
MAX_INPUT_ENV = "JACCLI_MAX_INPUT_BYTES"

_max_input: contextvars.ContextVar[int | None] = contextvars.ContextVar("jaccli_max_input_bytes", default=None)

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}  # fmt: skip
_HEAD_BYTES = 64 * 2**10
_CHUNK = 2**20


def parse_size(text: str | int, *, what: str = "--max-input-bytes") -> int:
    """Bytes from ``4294967296``, ``4G``/``4GiB`` (powers of 1024) or ``4GB`` (powers of 1000)."""
    if isinstance(text, int):
        n = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
        unit = m and _UNITS.get(m.group(2).lower())
        if not m or unit is None:
            raise UsageError(f"bad {what}", expected="a size such as 4G, 512MiB or 1000000", got=text)
        n = int(float(m.group(1)) * unit)
    if n <= 0:
        raise UsageError(f"bad {what}", expected="a positive size", got=text)
    return n


def max_input_bytes() -> int:
    """The largest input jaccli reads: :func:`limit_input_bytes`, else ``$JACCLI_MAX_INPUT_BYTES``,
    else :data:`DEFAULT_MAX_INPUT_BYTES` (4 GiB)."""
    value = _max_input.get()
    if value is not None:
        return value
    env = os.environ.get(MAX_INPUT_ENV)
    return parse_size(env, what=MAX_INPUT_ENV) if env else DEFAULT_MAX_INPUT_BYTES


def set_max_input_bytes(limit: int | str | None) -> None:
    """Set the limit for what follows in this context (None: back to the environment or default)."""
    _max_input.set(None if limit is None else parse_size(limit))


@contextmanager
def limit_input_bytes(limit: int | str | None):
    """``with limit_input_bytes("64M"): load_tensor(...)`` — the limit for the block only."""
    token = _max_input.set(None if limit is None else parse_size(limit))
    try:
        yield
    finally:
        _max_input.reset(token)


def shown_path(name: str, most: int = 120) -> str:
    """``name`` for an error line, its middle elided when it is absurdly long."""
    return name if len(name) <= most else f"{name[:60]}…{name[-50:]} ({len(name)} characters)"


def _too_big(name: str, what: str, size: int, limit: int, *, more: bool = False) -> ResourceError:
    return ResourceError(
        f"{what} larger than the input limit",
        where=name,
        expected=f"at most {format_bytes(limit)}",
        got=("more than " if more else "") + format_bytes(size),
        hint="raise --max-input-bytes (or JACCLI_MAX_INPUT_BYTES) where the machine has the memory",
    )


def read_source(
    path: str | os.PathLike, *, what: str = "file", max_bytes: int | None = None, binary_only: bool = False
) -> Source:
    """The whole content of ``path`` (``-``: standard input), or one clear error.

    At most ``max_bytes`` (default :func:`max_input_bytes`) are read: a larger regular
    file is refused before reading; a stream (stdin, a FIFO, a device) is read up to the
    size its header declares, or to the limit. ``binary_only`` (model files): a stream
    whose first bytes are no binary format jaccli reads is refused at once.
    """
    name = os.fspath(path)
    limit = max_input_bytes() if max_bytes is None else max_bytes
    if name == STDIO:
        name = "<stdin>"
        data = _read_stream(sys.stdin.buffer, name, what, limit, binary_only)
    else:
        try:
            data = _read_path(name, what, limit, binary_only)
        except OSError as exc:  # a name too long, a loop of links, permission, an I/O error
            raise InputError(f"cannot read {what}: {exc.strerror or exc}", where=shown_path(name)) from None
    if not data:
        raise InputError(f"empty {what}", where=name, expected="tensor data", got="0 bytes")
    if data.startswith(_LFS_POINTER):
        raise InputError(
            "is a Git LFS pointer, not the real file",
            where=name,
            hint="fetch it with `git lfs pull`",
        )
    return Source(name, data)


def _read_path(name: str, what: str, limit: int, binary_only: bool) -> bytes:
    try:
        st = os.stat(name)
    except FileNotFoundError:
        raise InputError(f"no such {what}", where=name) from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"is a directory, not a {what}", where=name)
    if stat.S_ISREG(st.st_mode):
        if st.st_size > limit:
            raise _too_big(name, what, st.st_size, limit)
        with open(name, "rb") as fh:
            # read(n) allocates n bytes before reading: ask for the size the stat gave, then
            # follow a file that grew (or a /proc file whose size reads 0) up to the limit
            data = fh.read(st.st_size + 1)
            if len(data) <= st.st_size:
                return data
            buf = bytearray(data)
            _read_at_most(fh, limit + 1, buf)
        if len(buf) > limit:
            raise _too_big(name, what, limit, limit, more=True)
        return bytes(buf)
    with open(name, "rb") as fh:  # a FIFO, a character device: no size to trust
        return _read_stream(fh, name, what, limit, binary_only)


def _read_at_most(fh: BinaryIO, n: int, into: bytearray) -> None:
    while len(into) < n:
        chunk = fh.read(min(_CHUNK, n - len(into)))
        if not chunk:
            return
        into += chunk


def _read_stream(fh: BinaryIO, name: str, what: str, limit: int, binary_only: bool = False) -> bytes:
    """A stream's bytes, read no further than its header declares or than ``limit``."""
    buf = bytearray()
    _read_at_most(fh, min(_HEAD_BYTES, limit + 1), buf)
    head = bytes(buf)
    extent = declared_extent(head)
    if extent is None and not _known_binary(head):
        # refuse at the first bytes what cannot become valid: /dev/zero, `yes`, …
        if binary_only or b"\0" in head:
            from jaccli.io.read import SUFFIXES  # the format table (read imports this module)

            expected = "a model format" if binary_only else "one of " + ", ".join(sorted(SUFFIXES)) + " content"
            raise InputError(f"unrecognised binary data, not a {what}", where=name, expected=expected)
        if not _plausible_table(head):
            raise InputError(f"not a numeric table, nor any {what} format", where=name, expected="rows of numbers")
    if extent is not None and extent > limit:
        raise _too_big(name, f"the header declares a {what}", extent, limit)
    if extent is not None:  # what follows the declared end (the head may hold some) is not the file's
        _read_at_most(fh, extent, buf)
        return bytes(buf[:extent])
    _read_at_most(fh, limit + 1, buf)
    if len(buf) > limit:
        raise _too_big(name, f"a {what} stream", limit, limit, more=True)
    return bytes(buf)


def _plausible_table(head: bytes) -> bool:
    """Whether the complete lines of ``head`` could start a text table (a header row, then
    numbers): an endless stream of anything else is refused before it fills memory."""
    lines = head.decode("utf-8", errors="replace").splitlines()[:-1]  # the last may be cut
    rows = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")][:4]
    delimiter = "," if rows and "," in rows[0] else None
    for row in rows[1:]:  # the first may be a header of column names
        try:
            [float(v) for v in row.split(delimiter)]
        except ValueError:
            return False
    return True


def _known_binary(head: bytes) -> bool:
    return head.startswith((_NPY_MAGIC, _ZIP_MAGIC, b"\x80")) or is_safetensors(head, complete=False)


def _npy_header(buf: BinaryIO):
    fmt = np.lib.format
    version = fmt.read_magic(buf)
    reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, fortran, dtype = reader(buf)
    return shape, fortran, dtype


def declared_extent(head: bytes) -> int | None:
    """The size in bytes a file starting with ``head`` declares itself to have: a ``.npy``
    header plus its array, or a ``.safetensors`` header plus its largest data offset;
    None where the format says nothing or the header is not all in ``head``."""
    if head.startswith(_NPY_MAGIC):
        buf = io.BytesIO(head)
        try:
            shape, _fortran, dtype = _npy_header(buf)
        except Exception:  # a bad header: the reader reports it in full
            return None
        if any(int(d) < 0 for d in shape):
            return None
        return buf.tell() + math.prod(int(d) for d in shape) * dtype.itemsize
    if len(head) >= 8:
        header_len = int.from_bytes(head[:8], "little")
        if head[8:9] == b"{" and 8 + header_len <= len(head):
            try:
                header = json.loads(head[8 : 8 + header_len])
                ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
            except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
                return None
            return 8 + header_len + max(ends, default=0)
    return None


def is_safetensors(data: bytes, *, complete: bool = True) -> bool:
    """Whether ``data`` starts like a safetensors file (``complete=False``: ``data`` may be
    only the first bytes, so the header may end beyond them)."""
    if len(data) < 10:
        return False
    header_len = int.from_bytes(data[:8], "little")
    fits = header_len <= len(data) - 8 or not complete and header_len <= 100 * 2**20
    return 2 <= header_len and fits and data[8:9] == b"{"
