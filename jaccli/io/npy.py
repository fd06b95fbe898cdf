"""The numpy formats: ``.npy`` and ``.npz`` readers (rows of :data:`~.read.READERS`), their
header checks, and a ``.npy`` file memory-mapped instead of read.

A header is checked in exact integers before anything is allocated; ``.npz`` members are
inflated no further than their ``.npy`` header needs; ``np.load(allow_pickle=False)`` only.

Imports: numpy, torch, :mod:`.sources` (bounded reading, the input limit), :mod:`.archives`,
:mod:`jaccli.request.choices`, :mod:`jaccli.errors`; never :mod:`.read` (which holds the table).
"""

from __future__ import annotations

import io
import math
import os
import re
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from jaccli.io.archives import damaged, open_zip
from jaccli.io.sources import (
    _HEAD_BYTES,
    _NPY_MAGIC,
    Source,
    _npy_header,
    _read_at_most,
    _too_big,
    declared_extent,
    max_input_bytes,
)
from jaccli.request.choices import STDIO
from jaccli.errors import first_line, format_bytes, InputError, JaccliError, shape_str


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
