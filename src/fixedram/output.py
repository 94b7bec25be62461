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
import ctypes
import errno
import json
import os
import queue
import secrets
import shutil
import stat
import sys
import threading
from collections.abc import Iterator
from types import TracebackType

from .errors import OutputError

__all__ = ["AtomicOutput", "BackgroundWriter", "check_replaceable_directory", "never_replaced",
           "output_error", "register_temporary", "remove_temporaries", "replace_dir",
           "staged_directory", "unlink_stale_socket", "unregister_temporary"]

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


def never_replaced(path: str) -> str | None:
    """Why the directory ``path`` may never be replaced by an output, or None.

    Replacing a directory swaps out everything under it, so the places a
    user works from are off limits whatever they hold: the root, the home
    directory, the current directory and its ancestors (``.``, ``..``), and
    mount points (a rename cannot replace them, and their contents are
    another file system's).
    """
    real = os.path.realpath(path)
    if real == os.path.realpath(os.sep):
        return "the root directory"
    if real == os.path.realpath(os.path.expanduser("~")):
        return "the home directory"
    with contextlib.suppress(OSError):
        cwd = os.path.realpath(os.getcwd())
        if cwd == real:
            return "the current directory"
        if cwd.startswith(real.rstrip(os.sep) + os.sep):
            return "a directory holding the current directory"
    if os.path.ismount(real):
        return "a mount point"
    return None


def unlink_stale_socket(path: str) -> None:
    """Remove a socket left at ``path`` by an earlier server, before binding.

    Anything else there is a user's file and is never removed.

    :raise FileExistsError: ``path`` exists and is not a socket.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket; not removed", path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class AtomicOutput:
    """A file that appears under ``path`` only when :meth:`commit` succeeds.

    A symlink is written through: the link stays and its target is replaced
    (a dangling link creates its target). Only a regular file is ever
    replaced: a directory, a device, a FIFO or a socket under ``path`` is an
    error even with ``force``, because fixedram never writes one.

    :param path: final name.
    :param force: replace an existing regular file; otherwise an existing
        ``path`` is an error and is never touched.
    :param mode: permission bits of the new file (migration files hold guest
        memory, so private by default).
    """

    def __init__(self, path: str | os.PathLike[str], *, force: bool = False,
                 mode: int = 0o600) -> None:
        self.path = os.path.abspath(os.fspath(path))
        named = os.path.lexists(self.path)
        target = os.path.realpath(self.path) if os.path.islink(self.path) else self.path
        try:
            st: os.stat_result | None = os.stat(target)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise output_error(self.path, e) from e
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{self.path}: is a directory (a file output never replaces one)")
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{self.path}: exists and is not a regular file; not replaced")
        if named and not force:
            raise OutputError(f"{self.path}: already exists (use --force to replace it)")
        self.target = target
        self.fd = -1
        self.done = False
        self.tmp = ""
        try:
            self.fd, self.tmp = _create_temporary(target, mode)
        except OSError as e:
            raise output_error(self.path, e) from e

    def commit(self, size: int | None = None) -> None:
        """Set the final size (sparse tail), fsync, rename into place."""
        try:
            if size is not None:
                os.ftruncate(self.fd, size)
            os.fsync(self.fd)
            os.rename(self.tmp, self.target)
            unregister_temporary(self.tmp)
            dfd = os.open(os.path.dirname(self.target), os.O_RDONLY)
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


INDEX_NAME = "index.json"
_INDEX_LIMIT = 64 << 20  # an index of 20,000 RAMBlocks is a few MiB


def _extract_listing(outdir: str) -> set[str] | None:
    """The names an earlier fixedram extract in ``outdir`` consists of (its
    index.json and the block files that index lists), or None if ``outdir``
    holds no readable index of ours."""
    path = os.path.join(outdir, INDEX_NAME)
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _INDEX_LIMIT:
            return None
        with open(path, "rb") as f:
            doc = json.loads(f.read(_INDEX_LIMIT))
    except (OSError, ValueError):
        return None
    blocks = doc.get("blocks") if isinstance(doc, dict) else None
    if not isinstance(blocks, list):
        return None
    names = {INDEX_NAME}
    for b in blocks:
        name = b.get("file") if isinstance(b, dict) else None
        if not isinstance(name, str) or not name or os.path.basename(name) != name:
            return None
        names.add(name)
    return names


def _would_be_lost(outdir: str) -> str | None:
    """The first name in ``outdir`` (in sorted order) that replacing the
    directory would delete although fixedram did not write it; None when the
    directory holds nothing but an earlier extract."""
    entries = sorted(os.listdir(outdir))
    listed = _extract_listing(outdir)
    for name in entries:
        if listed is None or name not in listed:
            return name
        if not stat.S_ISREG(os.lstat(os.path.join(outdir, name)).st_mode):
            return name  # a directory or link under a listed name is not ours
    return None


def check_replaceable_directory(outdir: str, force: bool) -> bool:
    """Check that ``outdir`` may become an extract's directory; True if it
    exists and holds an earlier extract that will be replaced.

    :raise OutputError: ``outdir`` is not a directory, is one of the places
        never replaced (:func:`never_replaced`), or holds files; with
        ``force``, files other than an earlier extract's, naming one of them.
    """
    if not os.path.lexists(outdir):
        return False
    if not os.path.isdir(outdir) or os.path.islink(outdir):
        raise OutputError(f"{outdir}: exists and is not a directory")
    reason = never_replaced(outdir)
    if reason is not None:
        raise OutputError(f"{outdir}: {reason} is never replaced; name a new directory "
                          "for the extract")
    try:
        if not os.listdir(outdir):
            return False
        lost = _would_be_lost(outdir)
    except OSError as e:
        raise output_error(outdir, e) from e
    if lost is not None:
        raise OutputError(f"{outdir}: not replaced: {lost} is not part of an earlier fixedram "
                          "extract and would be lost; name a new directory")
    if not force:
        raise OutputError(f"{outdir}: directory is not empty: it holds an earlier extract "
                          "(use --force to replace it)")
    return True


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


def _remove_earlier_extract(old: str, outdir: str) -> None:
    """Delete the earlier extract swapped out to ``old``: only the files its
    index lists, then the directory. Anything that appeared there meanwhile
    is kept, and one line says where."""
    for name in _extract_listing(old) or ():
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(old, name))
    try:
        os.rmdir(old)
    except OSError:
        print(f"fixedram: {outdir}: files added to the earlier extract while it was replaced "
              f"were kept in {old}", file=sys.stderr)


def replace_dir(tmp: str, outdir: str, force: bool) -> None:
    """Move the finished directory ``tmp`` into place as ``outdir``.

    The check of :func:`check_replaceable_directory` is made again here,
    since the user may have written into ``outdir`` while the set was being
    built. A directory holding an earlier extract is swapped out atomically
    (at no moment is neither set in place), and only its own files are
    deleted.
    """
    try:
        if not check_replaceable_directory(outdir, force):
            os.rename(tmp, outdir)  # new, or replaces an empty directory
            return
        if _exchange(tmp, outdir):
            old = tmp
        else:
            old = f"{tmp}.old"
            os.rename(outdir, old)
            try:
                os.rename(tmp, outdir)
            except OSError:
                os.rename(old, outdir)
                raise
        _remove_earlier_extract(old, outdir)
    except OSError as e:
        raise output_error(outdir, e) from e


@contextlib.contextmanager
def staged_directory(outdir: str | os.PathLike[str], force: bool) -> Iterator[str]:
    """A hidden temporary directory beside ``outdir`` to build an output set in.

    When the block ends normally it is moved into place (:func:`replace_dir`);
    on an exception or signal it is removed. An existing empty directory is
    replaced; one holding an earlier extract only with ``force``; any other
    directory never (:func:`check_replaceable_directory`), and that is
    refused before any work is done.
    """
    outdir = os.path.abspath(os.fspath(outdir))
    check_replaceable_directory(outdir, force)
    parent, base = os.path.split(outdir)
    tmp = os.path.join(parent, f".{base}.partial-{secrets.token_hex(4)}")
    placed = False
    register_temporary(tmp)
    try:
        try:
            os.mkdir(tmp, 0o755)
        except OSError as e:
            raise output_error(outdir, e) from e
        yield tmp
        replace_dir(tmp, outdir, force)
        placed = True
    finally:
        # After an exchange the earlier set was at this name and has been
        # emptied of its own files: what is left there is the user's.
        if not placed and os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        unregister_temporary(tmp)
