"""A streamed result's file: the formats whose header is known before the data (so rows can
be written in place), the header bytes written first, and the finished file opened as a
tensor backed by it. How the rows get there is :mod:`.stream`'s.

Imports: torch, numpy, :mod:`.write` (output formats), :mod:`jaccli.errors`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import numpy as np
import torch

from jaccli.errors import UsageError
from jaccli.io.write import output_format

#: result formats whose header is known before the data, so that rows can be written in place
STREAM_FORMATS = ("npy", "safetensors")

_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float64: "F64"}


def file_header(fmt: str, shape: tuple[int, ...], dtype: torch.dtype, name: str, metadata: Mapping) -> bytes:
    """The bytes before the data of a ``.npy`` or ``.safetensors`` file of ``shape``."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if fmt == "npy":
        import io

        buf = io.BytesIO()
        d = {"descr": np.lib.format.dtype_to_descr(np.dtype(str(dtype).removeprefix("torch."))),
             "fortran_order": False, "shape": tuple(shape)}  # fmt: skip
        try:
            np.lib.format.write_array_header_1_0(buf, d)
        except ValueError:  # a header over 64 KiB needs format 2.0
            buf = io.BytesIO()
            np.lib.format.write_array_header_2_0(buf, d)
        return buf.getvalue()
    if dtype not in _SAFETENSORS_DTYPES:
        raise UsageError("cannot stream this dtype to .safetensors", got=str(dtype))
    doc: dict = {}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    if meta:
        doc["__metadata__"] = meta
    doc[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [0, nbytes]}
    text = json.dumps(doc, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)  # data start 8-byte aligned, as safetensors writes it
    return len(text).to_bytes(8, "little") + text


def open_result(path: str | os.PathLike, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The finished file as a tensor backed by it (copy-on-write: writes never reach the file)."""
    name = os.fspath(path)
    np_dtype = np.dtype(str(dtype).removeprefix("torch."))
    if output_format(name) == "npy":
        arr = np.load(name, mmap_mode="c", allow_pickle=False)
    else:
        with open(name, "rb") as fh:
            offset = 8 + int.from_bytes(fh.read(8), "little")
        arr = np.memmap(name, dtype=np_dtype, mode="c", offset=offset, shape=tuple(shape))
    return torch.from_numpy(arr)
