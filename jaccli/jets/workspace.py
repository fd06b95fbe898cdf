"""Buffers that the passes of a program reuse, chunk after chunk (CPU).

A chunked computation allocates the same tensors for every chunk: each step's rows, the
products of its rule. glibc serves blocks past its mmap threshold (128 KiB, rising to at
most 32 MiB) with fresh pages and trims freed heap above its trim threshold, so each
chunk page-faults its whole working set again: the seed PINN's ``u_xxxx`` took 0.19 s
instead of 0.15 s, and 10 000 page faults a call, for that alone. The remedy used to be
an allocator setting (``MALLOC_MMAP_THRESHOLD_``), which the Python API did not apply and
no other allocator honours; a :class:`Workspace` removes the need: the rows a rule asks
for (:meth:`~.jet._Call.empty`) come from buffers kept for the duration of a
computation, and a buffer is handed out again only once nothing refers to it any more.

That test is the storage's use count (every tensor viewing a buffer holds its storage):
a buffer whose rows are still in an environment, or were returned to a caller that
keeps them (a series' coefficients), is never reused, so reuse changes no result. Free
buffers are matched best-fit by size (a last, smaller chunk reuses the big ones), so
the pool holds what the largest moment of a pass holds, as the planner budgets it.
When the computation ends the program keeps its workspace for its next computation
(:meth:`TaylorProgram.workspace <jaccli.jets.program.TaylorProgram.workspace>`, at most
``KEEP_BYTES``): a call of one pass, which a repeated call of a small request is, would
otherwise page-fault its whole working set every time. It goes with the program (eight
kept per process, least recently used dropped first).

Only CPU tensors are pooled: CUDA's caching allocator already reuses its blocks.

Imports: torch and :func:`.jet.broadcast_shapes`.
"""

from __future__ import annotations

import contextvars

import torch
from torch import Tensor

from jaccli.jets.jet import broadcast_shapes

#: smaller blocks come from malloc's bins without page faults: not worth a lookup
_MIN_BYTES = 64 * 1024


def _in_use(storage: torch.UntypedStorage) -> bool:
    # the pool's own reference is the only one of a free buffer
    return torch._C._storage_Use_Count(storage._cdata) > 1


class Workspace:
    """A pool of flat CPU buffers handed out as shaped tensors (see the module docstring)."""

    def __init__(self) -> None:
        #: (dtype) -> storages held, each with its size in bytes
        self._free: dict[torch.dtype, list[tuple[int, torch.UntypedStorage]]] = {}
        self.allocated = 0  # bytes held (for tests and benchmarks)
        self.reused = 0  # tensors served from a held buffer

    def empty(self, shape, dtype: torch.dtype, like: Tensor) -> Tensor:
        """An uninitialised tensor of ``shape`` and ``dtype`` on ``like``'s device."""
        shape = tuple(shape)
        itemsize = torch.empty((), dtype=dtype).element_size() if dtype != like.dtype else like.element_size()
        n = 1
        for d in shape:
            n *= d
        nbytes = n * itemsize
        if like.device.type != "cpu" or nbytes < _MIN_BYTES:
            return like.new_empty(shape, dtype=dtype)
        held = self._free.setdefault(dtype, [])
        best = None
        for entry in held:  # a few dozen at most: one per live row block of a pass
            size, storage = entry
            if size >= nbytes and (best is None or size < best[0]) and not _in_use(storage):
                best = entry
                if size == nbytes:
                    break
        if best is None:
            storage = torch.empty(n, dtype=dtype).untyped_storage()
            best = (nbytes, storage)
            held.append(best)
            self.allocated += nbytes
        else:
            self.reused += 1
        return torch.empty(0, dtype=dtype).set_(best[1], 0, shape)

    def clear(self) -> None:
        self._free.clear()
        self.allocated = 0


#: the workspace of the computation running in this thread (rules' temporaries come from it)
_CURRENT: contextvars.ContextVar[Workspace | None] = contextvars.ContextVar("jaccli_workspace", default=None)


def empty(shape, like: Tensor) -> Tensor:
    """An uninitialised contiguous tensor of ``shape`` with ``like``'s dtype and device, from the
    current workspace if there is one."""
    pool = _CURRENT.get()
    return like.new_empty(shape) if pool is None else pool.empty(shape, like.dtype, like)


def empty_like(x: Tensor) -> Tensor:
    """An uninitialised tensor like ``x`` (contiguous), from the current workspace if there is one."""
    return empty(x.shape, x)


def mul(a: Tensor, b: Tensor) -> Tensor:
    """``a * b`` (broadcast) into a tensor of the current workspace if there is one."""
    pool = _CURRENT.get()
    if pool is None or not isinstance(a, Tensor) or not isinstance(b, Tensor):
        return a * b
    out = pool.empty(broadcast_shapes(a.shape, b.shape), torch.result_type(a, b), a)
    return torch.mul(a, b, out=out)
