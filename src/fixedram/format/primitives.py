"""Byte primitives: a positional, buffered reader with bounds checks.

Every structure in the migration stream is read through :class:`ByteReader`,
the one choke point where a short read becomes a :class:`TruncatedFile` that
names the file and offset. It works on seekable files and on pipes alike:
a stream must be readable from ``stdin``, so nothing here requires seek
unless a caller asks for it.
"""

from __future__ import annotations

import io
import os
import struct
from typing import TYPE_CHECKING, BinaryIO, Protocol, cast

from ..errors import CorruptFile, TruncatedFile
from ..io.mapping import map_region

if TYPE_CHECKING:
    from mmap import mmap

__all__ = ["BE16", "BE32", "BE64", "ByteReader", "ReadSource"]

BE16 = struct.Struct(">H")
BE32 = struct.Struct(">I")
BE64 = struct.Struct(">Q")

_unpack16 = BE16.unpack_from
_unpack32 = BE32.unpack_from
_unpack64 = BE64.unpack_from


class ReadSource(Protocol):
    """What a :class:`ByteReader` reads: ``read``, and ``seekable``; a seekable
    source is also a file object (``tell``, ``seek``, ``fileno``)."""

    def read(self, n: int = -1, /) -> bytes: ...

    def seekable(self) -> bool: ...


class ByteReader:
    """Sequential reader with an absolute position, over a file or a pipe.

    :param f: binary file object; only ``readinto`` (and, if seekable,
        ``seek``) is used.
    :param name: name used in error messages.
    :param start: absolute offset (in the file being described) of the file
        object's current position; lets an in-memory tail keep real offsets.
    :param bufsize: read-ahead size; pages are 4 KiB so a large buffer keeps
        the per-record cost low.
    """

    def __init__(
        self, f: ReadSource, name: str, *, start: int = 0, bufsize: int = 1 << 20
    ) -> None:
        self.f = cast(BinaryIO, f)  # tell/seek/fileno are used only when seekable
        self.name = name
        self._bufsize = bufsize
        # bytes, or a bytearray from a spaced source (never changed once filled)
        self._buf: bytes | bytearray = b""
        # A source with ``room`` hands over chunks with that much free space in
        # front (``read_spaced``): the unread rest of the buffer is copied into
        # it, instead of the whole new chunk being copied behind the rest.
        self._room: int = getattr(f, "room", 0) or 0
        self._i = 0
        self._base = start  # absolute offset of _buf[0]
        try:
            self.seekable = self.f.seekable()
        except (AttributeError, OSError, ValueError):
            self.seekable = False
        self.size: int | None = None
        self._delta = 0  # absolute offset = file object position + _delta
        if self.seekable:
            cur = self.f.tell()
            self._delta = start - cur
            try:
                end = os.fstat(self.f.fileno()).st_size
            except (OSError, AttributeError, io.UnsupportedOperation):
                end = self.f.seek(0, os.SEEK_END)
                self.f.seek(cur)
            self.size = end + self._delta

    # -- position ---------------------------------------------------------

    def tell(self) -> int:
        return self._base + self._i

    def seek(self, pos: int) -> None:
        """Jump to absolute ``pos`` (seekable inputs only)."""
        if not self.seekable:
            raise CorruptFile("stream needs a seek but the input is a pipe", path=self.name,
                              offset=self.tell())
        if self._base <= pos <= self._base + len(self._buf):
            self._i = pos - self._base
            return
        self.f.seek(pos - self._delta)
        self._buf = b""
        self._i = 0
        self._base = pos

    def remaining(self) -> int | None:
        """Bytes left in the file, when the size is known."""
        return None if self.size is None else self.size - self.tell()

    # -- buffer management -------------------------------------------------

    def _fill(self, need: int) -> bool:
        """Make at least ``need`` bytes available; False at end of input."""
        avail = len(self._buf) - self._i
        if avail >= need:
            return True
        if self._room and avail <= self._room:
            b: bytearray = self.f.read_spaced()  # type: ignore[attr-defined]
            if len(b) <= self._room:
                return False  # end of input
            at = self._room - avail
            if avail:
                b[at:self._room] = memoryview(self._buf)[self._i:]
            self._base += self._i - at
            self._buf, self._i = b, at
            avail = len(b) - at
            if avail >= need:
                return True
        chunks: list[bytes | bytearray] = [self._buf[self._i:]] if avail else []
        self._base += self._i
        got = avail
        want = max(need, self._bufsize)
        while got < need:
            more = self.f.read(want - got)
            if not more:
                break
            chunks.append(more)
            got += len(more)
        self._buf = b"".join(chunks) if len(chunks) != 1 else chunks[0]
        self._i = 0
        return got >= need

    def _short(self, n: int, what: str) -> TruncatedFile:
        have = len(self._buf) - self._i
        return TruncatedFile(
            f"file ends inside {what}: needed {n} bytes, {have} left", path=self.name,
            offset=self.tell(),
        )

    # -- typed reads ---------------------------------------------------------

    def u8(self, what: str = "a byte") -> int:
        i = self._i
        if i < len(self._buf):
            self._i = i + 1
            return self._buf[i]
        if not self._fill(1):
            raise self._short(1, what)
        self._i = 1
        return self._buf[0]

    def peek_u8(self) -> int | None:
        """The next byte without consuming it, or None at end of input."""
        if self._i < len(self._buf) or self._fill(1):
            return self._buf[self._i]
        return None

    def be16(self, what: str = "a be16") -> int:
        if len(self._buf) - self._i < 2 and not self._fill(2):
            raise self._short(2, what)
        v: int = _unpack16(self._buf, self._i)[0]
        self._i += 2
        return v

    def be32(self, what: str = "a be32") -> int:
        if len(self._buf) - self._i < 4 and not self._fill(4):
            raise self._short(4, what)
        v: int = _unpack32(self._buf, self._i)[0]
        self._i += 4
        return v

    def be64(self, what: str = "a be64") -> int:
        if len(self._buf) - self._i < 8 and not self._fill(8):
            raise self._short(8, what)
        v: int = _unpack64(self._buf, self._i)[0]
        self._i += 8
        return v

    def window(self, want: int) -> tuple[bytes | bytearray, int, int]:
        """(buffer, index, available): lets a vectorised parser look ahead.

        Tries to have ``want`` bytes buffered; may return fewer near the end,
        and returns what is buffered when that is at least a quarter of
        ``want``: refilling copies the rest of the buffer, which a parser
        calling often between short runs would pay each time.
        The caller consumes with :meth:`advance`.
        """
        if len(self._buf) - self._i < want // 4:
            self._fill(want)
        return self._buf, self._i, len(self._buf) - self._i

    def mapped(self, want: int) -> tuple[mmap, int, int] | None:
        """A read-only mapping of up to ``want`` bytes from the current position.

        (mapping, index of the position in it, bytes available), or None when
        the input is not a seekable regular file. Lets a parser look at record
        headers without copying the page data between them through the
        buffer. The caller consumes with :meth:`seek` and closes the mapping.
        """
        if not self.seekable or self.size is None:
            return None
        try:
            fd = self.f.fileno()
            fsize = os.fstat(fd).st_size  # now, not at open: never map past the end
        except (OSError, AttributeError, io.UnsupportedOperation):
            return None
        fpos = self.tell() - self._delta
        avail = min(want, min(self.size - self._delta, fsize) - fpos)
        if avail <= 0:
            return None
        got = map_region(fd, fpos, avail)
        if got is None:
            return None
        return got[0], got[1], avail

    def advance(self, n: int) -> None:
        """Consume ``n`` bytes already seen through :meth:`window`."""
        self._i += n

    def read(self, n: int, what: str = "data") -> bytes:
        """Exactly ``n`` bytes. ``n`` must already be bounded by the caller."""
        if n < 0:
            raise CorruptFile(f"negative length for {what}", path=self.name, offset=self.tell())
        rem = self.remaining()
        if rem is not None and n > rem:
            raise TruncatedFile(f"file ends inside {what}: needed {n} bytes, {rem} left",
                                path=self.name, offset=self.tell())
        if len(self._buf) - self._i < n and not self._fill(n):
            raise self._short(n, what)
        i, buf = self._i, self._buf
        self._i = i + n
        return buf[i:i + n] if type(buf) is bytes else bytes(memoryview(buf)[i:i + n])

    def view(self, n: int, what: str = "data") -> memoryview:
        """Like :meth:`read` but without a copy; valid until the next read."""
        if len(self._buf) - self._i < n and not self._fill(n):
            raise self._short(n, what)
        i = self._i
        self._i = i + n
        return memoryview(self._buf)[i:i + n]

    def skip(self, n: int, what: str = "data") -> None:
        """Advance ``n`` bytes; seeks when it can, reads through pipes."""
        avail = len(self._buf) - self._i
        if n <= avail:
            self._i += n
            return
        if self.seekable:
            rem = self.remaining()
            if rem is not None and n > rem:
                raise TruncatedFile(f"file ends inside {what}: needed {n} bytes, {rem} left",
                                    path=self.name, offset=self.tell())
            self.seek(self.tell() + n)
            return
        left = n
        while left:
            step = min(left, self._bufsize)
            if not self._fill(step):
                raise self._short(left, what)
            self._i += step
            left -= step

    def read_rest(self, limit: int, what: str) -> bytes:
        """Everything up to end of input, refusing more than ``limit`` bytes."""
        chunks = [self._buf[self._i:]]
        total = len(chunks[0])
        self._base += len(self._buf)
        self._buf, self._i = b"", 0
        while True:
            b = self.f.read(1 << 20)
            if not b:
                break
            total += len(b)
            if total > limit:
                raise CorruptFile(f"{what} is larger than {limit} bytes", path=self.name,
                                  offset=self._base)
            chunks.append(b)
        data = b"".join(chunks)
        self._base += total - len(chunks[0])
        return data
