"""Random-access byte sources: what a :class:`~fixedram.format.migfile.MigrationFile`
reads its stream from.

A plain file is read with positional system calls on its descriptor; other
sources (the VM state of a qcow2 internal snapshot) map their offsets onto
something else. Readers ask :attr:`ByteSource.fd` first: when it is a
descriptor, the source's offsets are that file's offsets and the kernel can
copy from it directly (``copy_file_range``, ``sendfile``); when it is None,
they read through :meth:`ByteSource.preadv` and write what they read.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from ..errors import TruncatedFile

__all__ = ["ByteSource", "FileSource", "SourceReader", "read_exact"]

Buffer = memoryview | bytearray


@runtime_checkable
class ByteSource(Protocol):
    """Bytes ``[0, size)`` readable at any offset.

    :ivar name: how errors name the source (a file, or ``image (snapshot tag)``).
    :ivar size: bytes in the source.
    :ivar fd: a descriptor whose offsets are the source's, or None.
    """

    name: str
    size: int
    fd: int | None

    def preadv(self, buffers: Sequence[Buffer], offset: int) -> int:
        """Fill ``buffers`` in turn from ``offset``; return the bytes read,
        fewer only where the source ends (as ``os.preadv``)."""
        ...

    def pread(self, n: int, offset: int) -> bytes:
        """Exactly ``n`` bytes at ``offset``.

        :raise TruncatedFile: the source ends first (names the source and the offset).
        """
        ...

    def allocated_bytes(self) -> int | None:
        """Bytes the source occupies on disk, when known."""
        ...

    def close(self) -> None:
        ...


def read_exact(src: ByteSource, n: int, offset: int) -> bytes:
    """``src.pread`` for sources that only implement :meth:`ByteSource.preadv`."""
    buf = bytearray(n)
    got = src.preadv([buf], offset) if n else 0
    if got != n:
        raise TruncatedFile(f"the input ends {n - got} bytes short of a {n}-byte read",
                            path=src.name, offset=offset + got)
    return bytes(buf)


class FileSource:
    """A plain file (or block device) read at its own offsets.

    :param fd: the descriptor; borrowed unless ``owned``.
    :param name: the file's name in errors.
    :param size: its size.
    """

    def __init__(self, fd: int, name: str, size: int, *, owned: bool = False) -> None:
        self.fd: int | None = fd
        self.name = name
        self.size = size
        self._owned = owned

    def preadv(self, buffers: Sequence[Buffer], offset: int) -> int:
        assert self.fd is not None
        return os.preadv(self.fd, buffers, offset)

    def pread(self, n: int, offset: int) -> bytes:
        assert self.fd is not None
        data = os.pread(self.fd, n, offset)
        if len(data) != n:
            raise TruncatedFile(f"file ends inside a {n}-byte read: {len(data)} bytes left",
                                path=self.name, offset=offset + len(data))
        return data

    def allocated_bytes(self) -> int | None:
        assert self.fd is not None
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        if self._owned and self.fd is not None and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


class SourceReader(io.RawIOBase):
    """A seekable, read-only file object over a :class:`ByteSource`, for
    :class:`~fixedram.format.primitives.ByteReader`. It has no ``fileno``, so
    the reader never maps it; the source stays reachable as :attr:`source`."""

    def __init__(self, source: ByteSource, pos: int = 0) -> None:
        super().__init__()
        self.source = source
        self._pos = pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self.source.size}[whence]
        if base + pos < 0:
            raise ValueError("negative seek position")
        self._pos = base + pos
        return self._pos

    def readinto(self, b: Buffer) -> int:  # type: ignore[override]
        n = min(len(b), max(0, self.source.size - self._pos))
        if n <= 0:
            return 0
        got = self.source.preadv([memoryview(b).cast("B")[:n]], self._pos)
        self._pos += got
        return got
