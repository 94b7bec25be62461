"""Safe output files: written under a temporary name, renamed when complete.

An interrupted run (error, ENOSPC, Ctrl-C, a peer that disconnects) must never
leave a file that looks complete, so every output goes to a hidden temporary
in the destination directory and is fsynced and renamed only on success.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import tempfile
import threading
from types import TracebackType

from .errors import OutputError

__all__ = ["AtomicOutput", "BackgroundWriter", "output_error"]


def output_error(path: str, e: OSError) -> OutputError:
    if e.errno == errno.ENOSPC:
        return OutputError(f"{path}: no space left on device; nothing was written", e)
    if e.errno == errno.EDQUOT:
        return OutputError(f"{path}: disk quota exceeded; nothing was written", e)
    return OutputError(f"{path}: {e.strerror or e}", e)


class AtomicOutput:
    """A file that appears under ``path`` only when :meth:`commit` succeeds.

    :param path: final name.
    :param force: replace an existing file; otherwise an existing ``path``
        is an error and is never touched.
    :param mode: permission bits of the new file (migration files hold guest
        memory, so private by default).
    """

    def __init__(self, path: str | os.PathLike[str], *, force: bool = False,
                 mode: int = 0o600) -> None:
        self.path = os.path.abspath(os.fspath(path))
        if os.path.lexists(self.path) and not force:
            raise OutputError(f"{self.path}: already exists (use --force to replace it)")
        if os.path.isdir(self.path):
            raise OutputError(f"{self.path}: is a directory")
        d = os.path.dirname(self.path)
        try:
            self.fd, self.tmp = tempfile.mkstemp(prefix=f".{os.path.basename(self.path)}.",
                                                 suffix=".partial", dir=d)
            os.fchmod(self.fd, mode)
        except OSError as e:
            raise output_error(self.path, e) from e
        self.done = False

    def commit(self, size: int | None = None) -> None:
        """Set the final size (sparse tail), fsync, rename into place."""
        try:
            if size is not None:
                os.ftruncate(self.fd, size)
            os.fsync(self.fd)
            os.rename(self.tmp, self.path)
            dfd = os.open(os.path.dirname(self.path), os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            self.abort()
            raise output_error(self.path, e) from e
        os.close(self.fd)
        self.fd = -1
        self.done = True

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self.done:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)

    def __enter__(self) -> AtomicOutput:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.done:
            self.abort()


class BackgroundWriter:
    """Sequential writes to a file descriptor, done by a second thread.

    Producing output (reading the source, building records) and writing it
    then overlap, which matters on a machine with few cores: both halves are
    system calls that release the GIL. Small writes are gathered in a buffer;
    large ones are queued by reference, so a caller must not reuse a large
    buffer it has handed over (:class:`~fixedram.format.writer.StreamWriter`
    never does). Writeback of written data is started every ``writeback``
    bytes so that a final fsync has little left to wait for.

    :param fd: output, written with ``pwrite`` from ``start`` on.
    :raise OSError: from :meth:`write` or :meth:`close`, the first error the
        writing thread met.
    """

    def __init__(self, fd: int, start: int = 0, *, gather: int = 1 << 20,
                 writeback: int = 16 << 20, depth: int = 4) -> None:
        self.fd = fd
        self.pos = start
        self._wpos = start
        self._wb_lo = start
        self._gather = gather
        self._writeback = writeback
        self._small = bytearray()
        self._q: queue.Queue[memoryview | None] = queue.Queue(depth)
        self._error: OSError | None = None
        self._t = threading.Thread(target=self._run, name="fixedram-writer", daemon=True)
        self._t.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            if self._error is not None:
                continue
            try:
                done = 0
                while done < len(item):
                    done += os.pwrite(self.fd, item[done:], self._wpos + done)
                self._wpos += done
                if self._wpos - self._wb_lo >= self._writeback:
                    with contextlib.suppress(OSError):
                        os.posix_fadvise(self.fd, self._wb_lo, self._wpos - self._wb_lo,
                                         os.POSIX_FADV_DONTNEED)
                    self._wb_lo = self._wpos
            except OSError as e:
                self._error = e

    def _put(self, item: memoryview) -> None:
        if self._error is not None:
            raise self._error
        self._q.put(item)

    def write(self, b: bytes | bytearray | memoryview) -> int:
        mv = memoryview(b).cast("B")
        n = mv.nbytes
        if n < self._gather:
            self._small += mv
            if len(self._small) >= self._gather:
                self._put(memoryview(bytes(self._small)))
                self._small.clear()
        else:
            if self._small:
                self._put(memoryview(bytes(self._small)))
                self._small.clear()
            self._put(mv)
        self.pos += n
        return n

    def close(self) -> None:
        """Write what is left and wait for the thread; re-raise its error."""
        if self._t.is_alive():
            if self._small and self._error is None:
                self._q.put(memoryview(bytes(self._small)))
                self._small.clear()
            self._q.put(None)
            self._t.join()
        if self._error is not None:
            raise self._error
