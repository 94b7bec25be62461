"""Safe output files: written under a temporary name, renamed when complete.

An interrupted run (error, ENOSPC, Ctrl-C, SIGTERM, a peer that disconnects)
must never leave a file that looks complete, so every output goes to a hidden
temporary in the destination directory and is fsynced and renamed only on
success. It must not leave the temporary either: every temporary is listed
from before it exists until it is renamed or removed, and
:func:`remove_temporaries` (run at exit, and by the command line on a second
signal) removes whatever is still listed.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import queue
import secrets
import shutil
import threading
from types import TracebackType

from .errors import OutputError

__all__ = ["AtomicOutput", "BackgroundWriter", "output_error", "register_temporary",
           "remove_temporaries", "unregister_temporary"]

_temporaries: set[str] = set()
_temporaries_lock = threading.Lock()


def register_temporary(path: str) -> None:
    """List ``path`` (a file or a directory) as a temporary to remove if the
    process ends before it is unregistered. Register before creating it."""
    with _temporaries_lock:
        _temporaries.add(path)


def unregister_temporary(path: str) -> None:
    """``path`` was renamed into place or removed: no longer a temporary."""
    with _temporaries_lock:
        _temporaries.discard(path)


def remove_temporaries() -> None:
    """Remove every listed temporary (interrupted run, interpreter exit)."""
    with _temporaries_lock:
        paths = list(_temporaries)
        _temporaries.clear()
    for p in paths:
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(p)


atexit.register(remove_temporaries)


def output_error(path: str, e: OSError) -> OutputError:
    if e.errno == errno.ENOSPC:
        return OutputError(f"{path}: no space left on device; nothing was written", e)
    if e.errno == errno.EDQUOT:
        return OutputError(f"{path}: disk quota exceeded; nothing was written", e)
    return OutputError(f"{path}: {e.strerror or e}", e)


def _create_temporary(path: str, mode: int) -> tuple[int, str]:
    """A new hidden file next to ``path``, listed before it exists, so that an
    exception (a signal) at any point after cannot orphan it."""
    d, base = os.path.split(path)
    for _ in range(100):
        tmp = os.path.join(d, f".{base}.{secrets.token_hex(4)}.partial")
        register_temporary(tmp)
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            unregister_temporary(tmp)
            continue
        except BaseException:
            unregister_temporary(tmp)
            raise
        try:
            os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            unregister_temporary(tmp)
            raise
        return fd, tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", path)


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
        self.fd = -1
        self.done = False
        self.tmp = ""
        try:
            self.fd, self.tmp = _create_temporary(self.path, mode)
        except OSError as e:
            raise output_error(self.path, e) from e

    def commit(self, size: int | None = None) -> None:
        """Set the final size (sparse tail), fsync, rename into place."""
        try:
            if size is not None:
                os.ftruncate(self.fd, size)
            os.fsync(self.fd)
            os.rename(self.tmp, self.path)
            unregister_temporary(self.tmp)
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
        if not self.done and self.tmp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)
            unregister_temporary(self.tmp)

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
