"""Finished chunks of a streamed result, from the memory they were computed in to the host.

Owns the two *copiers* :class:`~jaccli.io.stream.FileSink` writes through:

* :class:`SyncChunks` (CPU, and any device without CUDA streams): one buffer; a chunk is
  handed on as soon as it is committed. On CPU the buffer *is* host memory, so nothing
  is copied: the rows go from the buffer to ``pwrite``, as before copiers existed.
* :class:`DeviceChunks` (CUDA): the chunk loop computes into one of two device buffers
  (*slots*) in turn (the second made when a second chunk needs it), and each finished
  chunk is copied to the host on a side stream, in pieces of at most :data:`STAGE_BYTES`,
  through a ring of :data:`STAGES` pinned host buffers. The side stream waits for an
  event the compute stream records after the chunk (never for the whole device), so the
  copy of chunk k runs while chunk k+1 computes, and the host writes chunk k's pieces to
  the file as their copies complete, again while the GPU computes. A slot is handed out
  again only after every chunk still in it has been copied and written: the host waited
  for those copies' events, so nothing queued on the compute stream afterwards can
  overwrite rows before they are copied.

Both call back ``write(key, row0, host_rows)`` for each piece of a chunk, in order
(``host_rows`` is valid during the call only: its buffer is refilled next), then
``finish(key, note, rows)`` once all of the chunk is written: ``note`` is the host copy
of the small device tensor :meth:`submit` took (statistics, brought along with the
rows), ``rows`` the chunk where it was computed, still intact during the call. A chunk's
``finish`` is the only place that may claim the chunk is on disk (the resume records do).

Why not a writer thread: the GPU already runs asynchronously from the host, so the one
host thread writing chunk k while chunk k+1 computes is the overlap; a thread would add
locking to the resume records and to error handling for no gain while the file is the
bottleneck (a few GB/s, against tens of GB/s for the copy).

Why pieces: pinned memory is scarce and slow to allocate, and a GPU chunk can hold
gigabytes; pieces bound the pinned memory to :data:`STAGES` × :data:`STAGE_BYTES` and let
the first bytes reach the file before the whole chunk has crossed the bus.

Imports: torch only. The CUDA calls sit in :class:`CudaStreams`, so that the tests drive
:class:`DeviceChunks` with a fake of it on a machine without a GPU.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable

import torch

#: bytes of one pinned staging buffer: large enough to copy near the bus's full speed
STAGE_BYTES = 64 * 2**20
#: pinned staging buffers: one being written to the file while the others are being filled
STAGES = 3
#: ``JACCLI_STREAM_OVERLAP=0`` copies CUDA chunks synchronously, one after the other (to compare)
OVERLAP_ENV = "JACCLI_STREAM_OVERLAP"

Write = Callable[[object, int, torch.Tensor], None]
Finish = Callable[[object, "torch.Tensor | None", torch.Tensor], None]


def make_copier(device: torch.device, capacity: int, row_shape: tuple[int, ...], dtype: torch.dtype,
                write: Write, finish: Finish):  # fmt: skip
    """The copier for chunks of at most ``capacity`` rows of ``row_shape`` computed on ``device``."""
    if device.type == "cuda" and os.environ.get(OVERLAP_ENV, "1") != "0":
        return DeviceChunks(CudaStreams(device), capacity, row_shape, dtype, write, finish)
    return SyncChunks(device, capacity, row_shape, dtype, write, finish)


class SyncChunks:
    """One buffer on ``device``; each chunk is written and finished inside :meth:`submit`."""

    #: whether chunks are still in flight after :meth:`submit` (statistics must travel with them)
    overlaps = False

    def __init__(self, device: torch.device, capacity: int, row_shape: tuple[int, ...], dtype: torch.dtype,
                 write: Write, finish: Finish) -> None:  # fmt: skip
        self.buffer = torch.empty((capacity, *row_shape), dtype=dtype, device=device)
        self.write, self.finish = write, finish

    def rows(self, n: int) -> torch.Tensor:
        return self.buffer[:n]

    def submit(self, key, n: int, note: torch.Tensor | None = None) -> None:
        block = self.buffer[:n]
        self.write(key, 0, block)
        self.finish(key, note, block)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class CudaStreams:
    """The CUDA calls of :class:`DeviceChunks`: buffers, the side stream, events.

    The compute stream is whatever stream is current on the device when the chunk loop
    runs (the engine launches its kernels there); the copies go to a stream of their own.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.side = torch.cuda.Stream(device)

    def device_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def host_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        # only page-locked memory lets a device-to-host copy run asynchronously: into
        # pageable memory cudaMemcpyAsync returns when the copy is done
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def mark(self):
        """An event after the work queued so far on the compute stream (the chunk just computed)."""
        return torch.cuda.current_stream(self.device).record_event()

    def after(self, event) -> None:
        """Copies issued from now on wait for ``event`` (of the compute stream)."""
        self.side.wait_event(event)

    def copy(self, dst: torch.Tensor, src: torch.Tensor):
        """Copy device ``src`` into pinned ``dst`` on the side stream; the event that marks it done."""
        with torch.cuda.stream(self.side):
            dst.copy_(src, non_blocking=True)
        # src was allocated on the compute stream: should it be freed with this copy still
        # queued (close() without its synchronize, after an error), the caching allocator
        # must not hand its memory out before the side stream is past the copy
        src.record_stream(self.side)
        # blocking: the host sleeps in synchronize() rather than spinning on a core
        return self.side.record_event(torch.cuda.Event(blocking=True))

    def wait(self, event) -> None:
        event.synchronize()

    def close(self) -> None:
        self.side.synchronize()


class _Chunk:
    """A submitted chunk: its slot, rows, the event after its computation, how far it got."""

    __slots__ = ("key", "slot", "n", "note", "note_host", "ready", "issued", "written")

    def __init__(self, key, slot: int, n: int, note: torch.Tensor | None, ready) -> None:
        self.key, self.slot, self.n, self.note, self.ready = key, slot, n, note, ready
        self.note_host: torch.Tensor | None = None
        self.issued = 0  # rows whose copy is queued
        self.written = 0  # rows handed to write()


class DeviceChunks:
    """Two device slots in turn, copies on a side stream, pinned pieces, writes in order.

    ``streams`` is a :class:`CudaStreams` (or, in the tests, a fake with its methods).
    A failed callback leaves the copier unusable: :meth:`close` it.
    """

    overlaps = True

    def __init__(self, streams, capacity: int, row_shape: tuple[int, ...], dtype: torch.dtype,
                 write: Write, finish: Finish, *, stage_bytes: int = STAGE_BYTES,
                 stages: int = STAGES) -> None:  # fmt: skip
        self.streams = streams
        self.write, self.finish = write, finish
        row_bytes = max(1, math.prod(row_shape) * torch.empty((), dtype=dtype).element_size())
        self.piece = max(1, min(capacity, stage_bytes // row_bytes))
        self.shape, self.dtype = (capacity, *row_shape), dtype
        # the second slot is made when a second chunk asks for rows: a run of one chunk
        # (common on a large GPU, whose chunks are large) needs no more memory than before
        self.slots = [streams.device_buffer(self.shape, dtype)]
        self.nslots = 2
        self.stages = [streams.host_buffer((self.piece, *row_shape), dtype) for _ in range(stages)]
        self.free = list(range(stages))  # staging buffers with no copy in flight
        self.pending: deque[_Chunk] = deque()  # submitted, not finished; oldest first
        self.inflight: deque[tuple[_Chunk, int, int, int, object]] = deque()  # chunk, row0, rows, stage, event
        self.turn = 0

    def rows(self, n: int) -> torch.Tensor:
        """Where to compute the next chunk: a slot whose previous chunk is copied out and written
        (with two slots, the chunk before last: it is written while the last one computes)."""
        s = self.turn % self.nslots
        if s == len(self.slots):
            try:
                self.slots.append(self.streams.device_buffer(self.shape, self.dtype))
            except torch.OutOfMemoryError:
                # the plan budgets one chunk's rows; with one slot each chunk waits for the
                # previous one's copy (still correct, and the file writes overlap the copies)
                self.nslots, s = 1, 0
        while any(c.slot == s for c in self.pending):
            self._step()
        return self.slots[s][:n]

    def submit(self, key, n: int, note: torch.Tensor | None = None) -> None:
        """The work computing the chunk in :meth:`rows` (and ``note``) is queued: copy it out."""
        s = self.turn % self.nslots
        self.turn += 1
        self.pending.append(_Chunk(key, s, n, note, self.streams.mark()))
        self._issue()

    def flush(self) -> None:
        """Write and finish every chunk submitted."""
        while self.pending:
            self._step()

    def close(self) -> None:
        """Drop what is in flight (unwritten chunks are not finished: a resumption redoes them)."""
        try:
            self.streams.close()  # no copy may still be filling a buffer once it is dropped
        finally:
            self.pending.clear()
            self.inflight.clear()

    # ------------------------------------------------------------------ the pipeline

    def _issue(self) -> None:
        """Queue copies of the oldest unissued rows into every free staging buffer."""
        chunks = iter(self.pending)
        c = next(chunks, None)
        while self.free and c is not None:
            if c.issued == c.n:
                c = next(chunks, None)
                continue
            if c.issued == 0:
                self.streams.after(c.ready)
                if c.note is not None:
                    c.note_host = self.streams.host_buffer(tuple(c.note.shape), c.note.dtype)
                    self.streams.copy(c.note_host, c.note)  # covered by the events of the pieces after it
            i = self.free.pop()
            r = min(self.piece, c.n - c.issued)
            event = self.streams.copy(self.stages[i][:r], self.slots[c.slot][c.issued : c.issued + r])
            self.inflight.append((c, c.issued, r, i, event))
            c.issued += r

    def _step(self) -> None:
        """Wait for the oldest copy, write its piece, and finish its chunk if that was the last."""
        if not self.inflight:
            self._issue()
        c, row0, r, i, event = self.inflight.popleft()
        self.streams.wait(event)
        self.write(c.key, row0, self.stages[i][:r])
        self.free.append(i)
        c.written += r
        self._issue()  # refill the staging buffer before finish(), which may wait for the disk
        if c.written == c.n:
            self.pending.popleft()
            self.finish(c.key, c.note_host, self.slots[c.slot][: c.n])
