"""Safe output files: written under a temporary name, renamed when complete.

An interrupted run (error, ENOSPC, Ctrl-C, a peer that disconnects) must never
leave a file that looks complete, so every output goes to a hidden temporary
in the destination directory and is fsynced and renamed only on success.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from types import TracebackType

from .errors import OutputError

__all__ = ["AtomicOutput", "output_error"]


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
