"""Reading tensor files: sources, format sniffing by content, the reader table.

A file is recognised by its content first (magic bytes), by its suffix second; each
format is a row of :data:`READERS`. Nothing here runs code from a data file:
``torch.load(weights_only=True)`` and ``np.load(allow_pickle=False)`` only.

Memory is bounded by what the request needs, never by what a file claims or a stream
supplies: a regular file larger than :func:`max_input_bytes` is refused before it is
read; a pipe, FIFO or device is read no further than its header declares (``.npy``,
``.safetensors``) or than the limit; ``.npz`` members are inflated no further than
their ``.npy`` header needs.
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
import warnings
import zipfile
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from jaccli.io.archives import ZIP_MAGIC as _ZIP_MAGIC, damaged, open_zip, verify_archive
from jaccli.request.choices import DTYPE_NAMES, STDIO
from jaccli.errors import first_line, format_bytes, InputError, JaccliError, JaccliWarning, ResourceError, shape_str, UsageError


#: dtype names accepted by ``--dtype`` and the API's ``dtype=``
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}

#: oldest torch whose ``torch.load(weights_only=True)`` has no known bypass (fixed in 2.6 and 2.10)
MIN_TORCH = (2, 10)

_NPY_MAGIC = b"\x93NUMPY"
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"
_SNIFF_BYTES = 64


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


# --------------------------------------------------------------------------- readers


def _check_npy_header(src: Source, buf: BinaryIO, offset: int = 0) -> None:
    """Refuse a ``.npy`` whose header promises more bytes than the file holds.

    Checked before any allocation, in exact integers: a hostile header can claim a
    shape of petabytes (or a 400-digit dimension), and numpy would try to allocate it.
    """
    try:
        shape, _fortran, dtype = _npy_header(buf)
    except Exception as exc:  # numpy raises ValueError/SyntaxError/... for bad headers
        raise _bad_header(exc, src.name) from None
    _check_npy_array(shape, dtype, src.name)
    need = math.prod(int(d) for d in shape) * dtype.itemsize
    have = len(src.data) - offset - buf.tell()
    if need > have:
        shown = shape_str(shape) if len(str(shape)) < 200 else f"of {len(shape)} dimensions"
        raise InputError(
            "truncated or corrupt .npy: the header promises more data than the file holds",
            where=src.name,
            expected=f"{format_bytes(need)} for shape {shown} {dtype}",
            got=format_bytes(have),
        )




def _bad_header(exc: BaseException, name: str) -> InputError:
    """A ``.npy`` header numpy cannot parse, in words: numpy's own message where it is
    plain, never the Python objects (``<ast.Name object at 0x…>``) some of them show."""
    text = first_line(exc)
    if re.search(r"<[^<>]* at 0x[0-9a-fA-F]+>|\\x[0-9a-f]{2}", text) or "malformed node" in text or len(text) > 200:
        text = "not the dictionary of 'descr', 'fortran_order' and 'shape' a .npy file starts with"
    return InputError(f"corrupt .npy header: {text}", where=name)


#: numpy dtype kinds torch holds: booleans, integers, floats, complex numbers
_TORCH_KINDS = "biufc"


def _check_npy_array(shape: tuple, dtype: np.dtype, name: str) -> None:
    """Refuse, from the header alone, an array torch cannot hold or numpy cannot build."""
    if dtype.hasobject:
        raise InputError(
            "holds Python objects, which would need pickle to load",
            where=name,
            expected="a numeric array",
            got=f"dtype {dtype}",
        )
    if any(int(d) < 0 for d in shape):
        shown = shape_str(shape) if len(str(shape)) < 200 else f"of {len(shape)} dimensions"
        raise InputError("corrupt .npy header: a negative dimension", where=name, got=f"shape {shown}")
    if dtype.kind not in _TORCH_KINDS or dtype.kind in "fc" and dtype.itemsize > (8 if dtype.kind == "f" else 16):
        what = {"M": "dates and times", "m": "time spans", "U": "text", "S": "bytes", "V": "raw records"}
        kind = what.get(dtype.kind, "extended-precision numbers" if dtype.kind in "fc" else "values")
        raise InputError(
            f"holds {kind}, which have no tensor type",
            where=name,
            expected="booleans, integers or floats up to float64",
            got=f"dtype {dtype}",
            hint="convert it, e.g. numpy's array.astype('float64')" if dtype.kind in "fc" else None,
        )


def _from_numpy(array: np.ndarray, src: Source) -> torch.Tensor:
    if array.dtype.hasobject or array.dtype.kind in "USV":
        raise InputError(
            "is not a numeric array", where=src.name, expected="numbers", got=f"dtype {array.dtype}"
        )
    _check_npy_array(array.shape, array.dtype, src.name)
    if not array.dtype.isnative:  # big-endian files: torch holds native byte order only
        array = array.astype(array.dtype.newbyteorder("="))
    try:
        return torch.from_numpy(np.asarray(array, order="C"))  # asarray keeps 0-d arrays 0-d
    except TypeError:  # a dtype torch has no type for that the check above let through
        raise InputError("holds values of a type tensors cannot hold", where=src.name, got=f"dtype {array.dtype}") from None


def _read_npy(src: Source) -> dict[str, torch.Tensor]:
    buf = io.BytesIO(src.data)
    _check_npy_header(src, buf)
    buf.seek(0)
    try:
        array = np.load(buf, allow_pickle=False)
    except Exception as exc:
        raise InputError(f"corrupt .npy: {exc}", where=src.name) from None
    return {"": _from_numpy(array, src)}


def _read_npz(src: Source) -> dict[str, torch.Tensor]:
    budget = max_input_bytes()
    archive = open_zip(src.data, src.name)
    out = {}
    for info in archive.infolist():
        if not info.filename.endswith(".npy"):
            continue
        name = f"{src.name}[{info.filename[:-4]}]"
        try:
            data = _inflate_npy(archive, info, name, budget)
        except JaccliError:
            raise
        except Exception as exc:  # a bad CRC, a damaged deflate stream, …
            raise damaged(exc, src.name, info.filename) from None
        budget -= len(data)
        out[info.filename[:-4]] = _read_npy(Source(name, data))[""]
    if not out:
        raise InputError("holds no arrays", where=src.name)
    return out


def _inflate_npy(archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, budget: int) -> bytes:
    """A member's bytes, inflated no further than its ``.npy`` header needs: a zip bomb
    (a 4×3 array followed by a gigabyte of padding) costs the 96 bytes it declares.

    A member whose declared size is within the budget is read whole, so that zipfile checks
    its CRC-32 before its bytes are used; only a member too large to read whole (a bomb's
    padding) is read no further than its header, unchecked beyond it."""
    if info.file_size <= budget:
        data = archive.read(info)  # raises BadZipFile on a CRC mismatch
        extent = declared_extent(data[:_HEAD_BYTES])
        return data if extent is None else data[:extent]
    with archive.open(info) as fh:
        buf = bytearray()
        _read_at_most(fh, min(_HEAD_BYTES, budget + 1), buf)
        extent = declared_extent(bytes(buf))
        if extent is None:  # a bad header: the .npy reader names what is wrong with it
            return bytes(buf)
        if extent > budget:
            raise _too_big(name, "the member's header declares an array", extent, budget)
        _read_at_most(fh, extent, buf)
        return bytes(buf[:extent])


def check_torch_version(version: str | None = None) -> None:
    """Refuse to unpickle anything with a torch whose safe loader is known to be bypassable."""
    text = version or torch.__version__
    parts = tuple(int(p) for p in text.split("+")[0].split(".")[:2] if p.isdigit())
    if parts < MIN_TORCH:
        raise JaccliError(
            f"torch {text} is too old to load .pt files safely: torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} "
            "is required (earlier releases have known torch.load(weights_only=True) bypasses)",
            hint="upgrade torch, or use .npy or .safetensors inputs",
        )


_MODEL_ARCHIVES = {"torchscript": "a TorchScript model", "export": "a torch.export model"}


def _read_torch(src: Source) -> dict[str, torch.Tensor]:
    kind = archive_kind(src.data, src.name)
    if kind in _MODEL_ARCHIVES:
        raise InputError(
            f"is {_MODEL_ARCHIVES[kind]}, not a tensor file",
            where=src.name,
            hint="the model comes first on the command line, then the input",
        )
    obj = read_torch_object(src)
    if isinstance(obj, torch.Tensor):
        return {"": obj}
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {str(k): v for k, v in obj.items()}
    raise InputError(
        "holds no tensor",
        where=src.name,
        expected="a tensor or a dict of tensors",
        got=type(obj).__name__,
    )


def read_torch_object(src: Source):
    """What a ``torch.save`` file holds, loaded with ``weights_only=True`` (never arbitrary code)."""
    check_torch_version()
    if src.data.startswith(_ZIP_MAGIC):  # torch's reader checks no CRC: a damaged record would load
        verify_archive(src.data, src.name)
    try:
        # weights_only=True is explicit, so TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot override it
        return torch.load(io.BytesIO(src.data), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise InputError(
                "refused: the file needs arbitrary code to load (pickle), which jaccli never runs",
                where=src.name,
                hint="save plain tensors (torch.save(tensor) or a dict of tensors), .npy or .safetensors",
            ) from None
        raise InputError(f"cannot read torch file: {first}", where=src.name) from None


def _read_safetensors(src: Source) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as st_load

    try:
        out = st_load(src.data)
    except Exception as exc:
        raise InputError(f"corrupt .safetensors: {exc}", where=src.name) from None
    if not out:
        raise InputError("holds no tensors", where=src.name)
    return out


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file's header (empty when absent)."""
    try:
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    except (ValueError, UnicodeDecodeError, RecursionError):  # nested 100 000 deep: not ours to parse
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(meta) if isinstance(meta, dict) else {}


def _read_text(src: Source) -> dict[str, torch.Tensor]:
    try:
        text = src.data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(
            "unrecognised binary file",
            where=src.name,
            expected="one of " + ", ".join(sorted(SUFFIXES)),
        ) from None
    delimiter = "," if src.suffix == ".csv" or ("," in text.split("\n", 1)[0]) else None
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if lines:
        try:
            [float(v) for v in lines[0].split(delimiter)]
        except ValueError:
            lines = lines[1:]  # a header row of column names
    if not lines:
        raise InputError("holds no numbers", where=src.name)
    try:
        array = np.loadtxt(lines, delimiter=delimiter, ndmin=2, dtype=np.float64)
    except ValueError as exc:
        raise InputError(f"not a numeric table: {exc}", where=src.name) from None
    return {"": torch.from_numpy(array)}


def _zip_names(data: bytes, name: str) -> list[str]:
    return open_zip(data, name).namelist()


def archive_kind(data: bytes, name: str = "<archive>") -> str | None:
    """``"torchscript"``, ``"export"`` or ``"torch"`` for a zip written by torch; else None.
    A zip archive too damaged to list is an :class:`InputError` naming ``name``."""
    if not data.startswith(_ZIP_MAGIC):
        return None
    names = _zip_names(data, name)
    if any(n.endswith("archive_format") or "/models/" in n and n.endswith(".json") for n in names):
        return "export"
    if any("/code/" in n or n.endswith("constants.pkl") for n in names):
        return "torchscript"
    if any(n.endswith("data.pkl") for n in names):
        return "torch"
    return None


def is_safetensors(data: bytes, *, complete: bool = True) -> bool:
    """Whether ``data`` starts like a safetensors file (``complete=False``: ``data`` may be
    only the first bytes, so the header may end beyond them)."""
    if len(data) < 10:
        return False
    header_len = int.from_bytes(data[:8], "little")
    fits = header_len <= len(data) - 8 or not complete and header_len <= 100 * 2**20
    return 2 <= header_len and fits and data[8:9] == b"{"


def _sniff(src: Source) -> str | None:
    """The tensor format of ``src`` by content, or None when the bytes do not say."""
    head = src.data[:_SNIFF_BYTES]
    if head.startswith(_NPY_MAGIC):
        return "npy"
    if head.startswith(_ZIP_MAGIC):
        names = _zip_names(src.data, src.name)
        if any(n.endswith(".npy") for n in names) and not any(n.endswith("data.pkl") for n in names):
            return "npz"
        return "pt"
    if is_safetensors(src.data):  # before the pickle test: a header length may start with 0x80
        return "safetensors"
    if head.startswith(b"\x80"):  # legacy (non-zip) torch.save: a pickle stream
        return "pt"
    return None


#: tensor format name -> reader of its bytes into ``{name: tensor}`` ("" for an unnamed one)
READERS: dict[str, Callable[[Source], dict[str, torch.Tensor]]] = {
    "npy": _read_npy,
    "npz": _read_npz,
    "pt": _read_torch,
    "safetensors": _read_safetensors,
    "text": _read_text,
}

#: file suffix -> tensor format, used when the content does not identify itself
SUFFIXES: dict[str, str] = {
    ".npy": "npy",
    ".npz": "npz",
    ".pt": "pt",
    ".pth": "pt",
    ".safetensors": "safetensors",
    ".csv": "text",
    ".txt": "text",
}


def load_tensors(path: str | os.PathLike, *, max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Every tensor in a file, by name (a single unnamed tensor has the name ``""``).

    >>> import numpy as np, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "x.npz")
    >>> np.savez(p, t=np.zeros(3), x=np.ones((3, 2)))
    >>> sorted(load_tensors(p))
    ['t', 'x']
    """
    mapped = _map_npy(path, max_input_bytes() if max_bytes is None else max_bytes)
    if mapped is not None:
        return mapped
    src = read_source(path, what="tensor file", max_bytes=max_bytes)
    fmt = _sniff(src) or SUFFIXES.get(src.suffix, "text")
    return READERS[fmt](src)


def _map_npy(path, limit: int) -> dict[str, torch.Tensor] | None:
    """A ``.npy`` file memory-mapped rather than read (None for anything else): the points
    are read as the chunks need them, so a large input costs no memory up front. The map is
    copy-on-write, so nothing jaccli does reaches the file. The input limit holds all the
    same: the computation reads every point."""
    name = os.fspath(path)
    try:
        if name == STDIO or not Path(name).is_file():
            return None
    except OSError:  # a name too long: read_source says so
        return None
    try:
        with open(name, "rb") as fh:
            head = fh.read(len(_NPY_MAGIC))
            if head != _NPY_MAGIC:
                return None
            fh.seek(0)
            src = Source(name, b"")
            fmt = np.lib.format
            version = fmt.read_magic(fh)
            reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = reader(fh)
            offset = fh.tell()
        size = os.path.getsize(name)
    except OSError:
        return None  # read_source says what is wrong
    except Exception as exc:  # numpy raises ValueError/SyntaxError/... for bad headers
        raise _bad_header(exc, name) from None
    _check_npy_array(shape, dtype, name)
    if dtype.hasobject or fortran or dtype.kind not in "biuf" or not dtype.isnative or not shape or 0 in shape:
        return None  # the reader's checks, casts and messages apply
    if size > limit:
        raise _too_big(name, "tensor file", size, limit)
    if math.prod(int(d) for d in shape) * dtype.itemsize > size - offset:
        return None  # a header that lies about its data: the reader's checks say how (exact ints)
    array = np.memmap(name, dtype=dtype, mode="c", offset=offset, shape=tuple(shape))
    return {"": _from_numpy(array, src)}


def load_tensor(
    path: str | os.PathLike,
    *,
    key: str | None = None,
    dtype: torch.dtype | str | None = None,
    max_bytes: int | None = None,
) -> torch.Tensor:
    """One floating-point tensor from ``path`` (``"-"`` reads ``.npy`` bytes from stdin).

    ``key`` picks a tensor from a file holding several. Integer and boolean data
    are cast to ``float32`` with a :class:`~jaccli.JaccliWarning` (a derivative needs
    a floating input); half precision is widened to ``float32`` likewise; complex
    data are refused. ``dtype`` (``"float32"``/``"float64"``) overrides the result's dtype.
    ``max_bytes`` caps what is read (default :func:`max_input_bytes`, 4 GiB).

    >>> import numpy as np, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "x.npy")
    >>> np.save(p, np.linspace(0, 1, 5)[:, None])
    >>> load_tensor(p).shape
    torch.Size([5, 1])
    """
    name = "<stdin>" if os.fspath(path) == STDIO else os.fspath(path)
    tensor = _pick(load_tensors(path, max_bytes=max_bytes), key, name)
    return as_float(tensor, dtype=dtype, where=name if key is None else f"{name}[{key}]")


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A :class:`torch.dtype` from a name in :data:`DTYPES` (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise UsageError(
        "unsupported dtype", expected="one of " + ", ".join(DTYPES), got=str(dtype)
    )


def as_float(tensor: torch.Tensor, *, dtype=None, where: str = "input") -> torch.Tensor:
    """``tensor`` as a float32/float64 tensor, casting with a notice where needed."""
    want = resolve_dtype(dtype)
    if tensor.is_complex():
        raise InputError(
            "complex inputs are not supported",
            where=where,
            expected="real numbers",
            got=str(tensor.dtype).removeprefix("torch."),
            hint="split real and imaginary parts into separate inputs",
        )
    if want is None:
        if tensor.dtype in DTYPES.values():
            return tensor
        want = torch.float32
        warnings.warn(
            f"{where}: {str(tensor.dtype).removeprefix('torch.')} data cast to float32 "
            "(derivatives need floating-point inputs; pass --dtype float64 for more precision)",
            JaccliWarning,
            stacklevel=2,
        )
    return tensor.to(want)


def _pick(found: dict[str, torch.Tensor], key: str | None, where: str) -> torch.Tensor:
    if key is None:
        if len(found) == 1:
            return next(iter(found.values()))
        raise InputError(
            "holds several tensors and no key was given",
            where=where,
            expected="--key with one of " + ", ".join(sorted(found)),
        )
    if key not in found:
        raise InputError(
            f"has no tensor named {key!r}", where=where, expected="one of " + ", ".join(sorted(found))
        )
    return found[key]
