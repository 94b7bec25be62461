"""Moving page runs between files with few, large system calls.

Runs come from :meth:`fixedram.format.migfile.RAMBlock.runs`. A run whose
pages are contiguous in the source (mapped-ram) is copied in the kernel with
``copy_file_range``; a run of stream page records (data every 4104 bytes) is
read in one ``preadv`` and its pages gathered with a strided numpy view.
A source without a descriptor (the VM state of a qcow2 snapshot) is read
with its own ``preadv`` and written with ``pwrite``. Pages never written stay
holes, so outputs are sparse. Gathered runs are
written by a second thread while the next run is read and gathered: both are
system calls or numpy copies that release the GIL.

Written ranges are handed to writeback as the copy goes (``posix_fadvise``
DONTNEED every few MiB): the disk works while we copy, the final fsync of an
atomic output has little left to wait for, and a GiB of output does not push
the input out of the page cache.
"""

from __future__ import annotations

import errno
import functools
import os
import queue
import threading
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from ..errors import CorruptFile
from ..format.migfile import Run
from ..io.source import Buffer, ByteSource

__all__ = ["RUN_PAGES", "RunCopier"]

# Pages per run that extract/convert ask for: 4 MiB per system call.
RUN_PAGES = 1024
# Start writeback of the output every this many bytes written.
WRITEBACK_BYTES = 16 << 20

_FALLBACK_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}


class RunCopier:
    """Copies runs from one file descriptor to another; reuses its buffers.

    :param src_fd: the source: a file descriptor, or a byte source (read
        through its descriptor when it has one, else through its ``preadv``).
    :param page_size: guest page size.
    :param max_pages: longest run it will be given.
    :param src_name: file name for error messages.
    """

    def __init__(self, src_fd: int | ByteSource, page_size: int, max_pages: int = 256,
                 src_name: str = "input") -> None:
        fd = src_fd if isinstance(src_fd, int) else src_fd.fd
        self.src_fd = -1 if fd is None else fd
        self._preadv: Callable[[Sequence[Buffer], int], int]
        if fd is not None:
            self._preadv = functools.partial(os.preadv, fd)
        else:
            assert not isinstance(src_fd, int)
            self._preadv = src_fd.preadv
        self.ps = page_size
        self.src_name = src_name
        self._gather = bytearray(max_pages * (page_size + 64))
        self._out = np.empty((max_pages, page_size), dtype=np.uint8)
        # Gathered runs rotate through three buffers: one being filled, one
        # queued, one being written (the queue holds at most one).
        # (Separate from _out, which the synchronous paths use.)
        self._ring = [np.empty_like(self._out) for _ in range(3)]
        self._ring_i = 0
        self._q: queue.Queue[tuple[int, memoryview, int] | None] | None = None
        self._writer: threading.Thread | None = None
        self._werr: OSError | None = None
        self._kernel_copy = hasattr(os, "copy_file_range") and fd is not None
        self._writeback = hasattr(os, "posix_fadvise")

    def copy(self, runs: Iterable[Run], dst_fd: int, dst_base: int,
             progress: Callable[[int], None] | None = None) -> int:
        """Write each run's pages at ``dst_base + first * page_size``; return bytes."""
        try:
            return self._copy(runs, dst_fd, dst_base, progress)
        finally:
            self._stop_writer()

    def _copy(self, runs: Iterable[Run], dst_fd: int, dst_base: int,
              progress: Callable[[int], None] | None) -> int:
        total = 0
        ps = self.ps
        lo, hi = -1, 0  # output range written since the last writeback
        for run in runs:
            n = run.count * ps
            dst = dst_base + run.first * ps
            if run.stride == ps:
                self._copy_contiguous(run.file_offset, dst_fd, dst, n)
            else:
                self._copy_strided(run, dst_fd, dst)
            total += n
            lo = dst if lo < 0 else min(lo, dst)
            hi = max(hi, dst + n)
            if hi - lo >= WRITEBACK_BYTES:
                self._drain()  # writeback can only start on what has been written
                self._start_writeback(dst_fd, lo, hi)
                lo, hi = -1, 0
            if progress is not None:
                progress(n)
        self._drain()
        if lo >= 0:
            self._start_writeback(dst_fd, lo, hi)
        return total

    # -- the writing thread -----------------------------------------------

    def _write_loop(self, q: queue.Queue[tuple[int, memoryview, int] | None]) -> None:
        while True:
            item = q.get()
            try:
                if item is None:
                    return
                fd, data, off = item
                if self._werr is None:
                    done = 0
                    while done < len(data):
                        done += os.pwrite(fd, data[done:], off + done)
            except OSError as e:
                self._werr = e
            finally:
                q.task_done()

    def _queue_write(self, fd: int, data: memoryview, off: int) -> None:
        if self._q is None:
            self._q = queue.Queue(maxsize=1)
            self._writer = threading.Thread(target=self._write_loop, args=(self._q,),
                                            name="fixedram-copy-writer", daemon=True)
            self._writer.start()
        if self._werr is not None:
            raise self._werr
        self._q.put((fd, data, off))

    def _drain(self) -> None:
        """Wait until every queued write is done; re-raise a write error."""
        if self._q is not None:
            self._q.join()
        if self._werr is not None:
            err, self._werr = self._werr, None
            raise err

    def _stop_writer(self) -> None:
        if self._q is not None and self._writer is not None:
            self._q.put(None)
            self._writer.join()
        self._q, self._writer = None, None

    def _start_writeback(self, fd: int, lo: int, hi: int) -> None:
        # DONTNEED starts asynchronous writeback of dirty pages in the range
        # (Linux) and drops the clean ones; the data are unaffected.
        if not self._writeback:
            return
        try:
            os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
        except OSError:
            self._writeback = False  # a pipe or a file system without it

    def read_run(self, run: Run) -> memoryview:
        """The run's pages as one contiguous buffer (valid until the next call)."""
        ps = self.ps
        if run.stride == ps:
            if run.count > self._out.shape[0]:
                self._out = np.empty((run.count, ps), dtype=np.uint8)
            buf = self._out.data.cast("B")[: run.count * ps]
            self._pread_into(buf, run.file_offset)
            return buf
        return self._gather_strided(run)

    def read_records(self, rec: np.ndarray, skip: int, offset: int) -> None:
        """Read ``len(rec)`` consecutive pages from ``offset`` straight into the
        data slots of records (``rec[k, skip:]``) with one scattering ``preadv``,
        e.g. into stream page records, so no interleaving copy is needed."""
        n, width = rec.shape
        flat = rec.data.cast("B")
        views = [flat[a:a + width - skip] for a in range(skip, n * width, width)]
        got = self._preadv(views, offset)
        if got != n * (width - skip):  # rare short read: finish slot by slot
            for k, v in enumerate(views):
                lo = k * len(v)
                if got < lo + len(v):
                    part = v[max(0, got - lo):]
                    self._pread_into(part, offset + lo + len(v) - len(part))

    # -- internals -------------------------------------------------------------

    def _pread_into(self, buf: memoryview, offset: int) -> None:
        got = 0
        while got < len(buf):
            k = self._preadv([buf[got:]], offset + got)
            if k == 0:
                raise CorruptFile(f"page data ends early ({len(buf) - got} bytes missing)",
                                  path=self.src_name, offset=offset + got)
            got += k

    def _copy_contiguous(self, src: int, dst_fd: int, dst: int, n: int) -> None:
        if self._kernel_copy:
            try:
                done = 0
                while done < n:
                    k = os.copy_file_range(self.src_fd, dst_fd, n - done, src + done, dst + done)
                    if k == 0:
                        raise CorruptFile("page data ends early", path=self.src_name,
                                          offset=src + done)
                    done += k
                return
            except OSError as e:
                if e.errno not in _FALLBACK_ERRNOS:
                    raise
                self._kernel_copy = False
        if n > self._out.nbytes:
            self._out = np.empty((n // self.ps + 1, self.ps), dtype=np.uint8)
        buf = self._out.data.cast("B")[:n]
        self._pread_into(buf, src)
        os.pwrite(dst_fd, buf, dst)

    def _gather_strided(self, run: Run) -> memoryview:
        ps, st, cnt = self.ps, run.stride, run.count
        span = (cnt - 1) * st + ps
        if cnt * st > len(self._gather):
            self._gather = bytearray(cnt * st)
        mv = memoryview(self._gather)
        self._pread_into(mv[:span], run.file_offset)
        src = np.frombuffer(self._gather, dtype=np.uint8, count=cnt * st).reshape(cnt, st)
        self._ring_i = (self._ring_i + 1) % len(self._ring)
        if cnt > self._ring[self._ring_i].shape[0]:
            self._ring[self._ring_i] = np.empty((cnt, ps), dtype=np.uint8)
        out = self._ring[self._ring_i][:cnt]
        np.copyto(out, src[:, :ps])
        return out.data.cast("B")

    def _copy_strided(self, run: Run, dst_fd: int, dst: int) -> None:
        self._queue_write(dst_fd, self._gather_strided(run), dst)
