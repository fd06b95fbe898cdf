"""A streamed result's bytes on their way to the disk: written whole, space reserved up front,
and written back while the run goes on, so that the flush a record or the rename needs finds
little left to do.

Owns :class:`DiskFile`, what :class:`~jaccli.io.stream.FileSink` writes rows through: the
``pwrite`` loop (a short write is continued; a full disk becomes the exit-7 error with the
figures), the reservation of the whole file before any work (``posix_fallocate``), the space
a result may use, the start of writeback as rows land (:meth:`DiskFile.written`) and the
flush (:meth:`DiskFile.sync`). Opening, locking and closing the file stay the sink's.

Rows go to the file with ``os.pwrite`` rather than through a memory map: dirty pages of a
shared mapping count in the process's resident memory until written back, so a mapped
1.3 GB result raises peak RSS by 1.3 GB while ``pwrite`` leaves them to the page cache.

Why writeback is started as rows land: the file must be on the disk (``fdatasync``) before a
resume record claims its chunks and before it is renamed into place, or a power cut could
leave a named file of holes. Left to the kernel, the dirty pages wait for its flusher (30 s
by default), so the one ``fdatasync`` before the rename waited for the whole result: 0.07 to
0.09 s of a 200 MB one here, after the compute. Every :data:`WRITEBACK_BYTES` written,
``sync_file_range(SYNC_FILE_RANGE_WRITE)`` (Linux; through :mod:`ctypes`, which Python's
:mod:`os` does not wrap) queues their writeback without waiting for it, so the disk writes
while the next chunks compute and the last ``fdatasync`` waits for the tail only (0.00 to
0.03 s). It only starts what ``fdatasync`` would do anyway: where the call is missing (not
Linux) or fails, nothing changes but the wait at the end. ``posix_fadvise(DONTNEED)`` also
starts writeback, but drops the pages from the cache too.

Imports: :mod:`jaccli.errors` and the standard library.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from jaccli.errors import format_bytes, OutputError

#: bytes written between two starts of writeback: large enough that the calls cost nothing
#: next to the writes, small enough that the disk starts early
WRITEBACK_BYTES = 8 * 2**20

_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range's dirty pages, do not wait


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range``, or None where there is none (not Linux, no ctypes)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (ImportError, OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_start_writeback = _sync_file_range() if os.name == "posix" else None


class DiskFile:
    """The bytes of an open result file ``fd`` (``target`` names it in errors; ``needed()`` is
    the size of the whole file, for the disk-full error)."""

    def __init__(self, fd: int, target: str, needed: Callable[[], int]) -> None:
        self.fd, self.target, self.needed = fd, target, needed
        self.pending: tuple[int, int] | None = None  # written bytes whose writeback is not started

    def write(self, data: memoryview, offset: int) -> None:
        """All of ``data`` at ``offset``; then its writeback starts once enough has gathered."""
        start, end = offset, offset + len(data)
        try:
            while data:
                n = os.pwrite(self.fd, data, offset)
                data, offset = data[n:], offset + n
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise self.disk_full() from None
            raise OutputError(f"cannot write: {exc.strerror or exc}", where=self.target) from None
        self.written(start, end)

    def written(self, start: int, stop: int) -> None:
        """Bytes ``[start, stop)`` are written: queue their writeback every :data:`WRITEBACK_BYTES`
        (ranges that are not adjacent, a resumed run's, are started apart)."""
        lo, hi = self.pending or (start, start)
        if start != hi:
            self._start()
            lo = start
        self.pending = (lo, stop)
        if stop - lo >= WRITEBACK_BYTES:
            self._start()

    def _start(self) -> None:
        if self.pending is not None and _start_writeback is not None:
            lo, hi = self.pending
            _start_writeback(self.fd, lo, hi - lo, _SYNC_FILE_RANGE_WRITE)  # a failure: fdatasync does it all
        self.pending = None

    def sync(self) -> None:
        """Everything written is on the disk (``fdatasync``)."""
        self._start()
        os.fdatasync(self.fd)

    def check_space(self, total: int) -> None:
        """Fail (exit 7, with the figures) where ``total`` bytes would not fit: before anything
        is written or allocated (a failed fallocate may hold the blocks it got)."""
        free = self.free_bytes()
        if free < total:
            raise self.disk_full(free)

    def reserve(self, header_len: int, total: int) -> None:
        """Hold ``total`` bytes for the file now, so that a full disk shows before any work."""
        try:
            os.posix_fallocate(self.fd, 0, total)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                os.ftruncate(self.fd, header_len)  # give back what the failed reservation took
                raise self.disk_full() from None
            os.ftruncate(self.fd, total)  # a filesystem without fallocate

    def free_bytes(self) -> int:
        """Space this result may use: what the file system has free for this user, plus what
        the file already holds (it is this result's and is given back on failure)."""
        st = os.statvfs(os.path.dirname(os.path.abspath(self.target)) or ".")
        return st.f_bavail * st.f_frsize + os.fstat(self.fd).st_blocks * 512

    def disk_full(self, free: int | None = None) -> OutputError:
        return OutputError(
            "not enough disk space for the result",
            where=self.target,
            expected=f"{format_bytes(self.needed())} for the file",
            got=f"{format_bytes(self.free_bytes() if free is None else free)} free",
        )
