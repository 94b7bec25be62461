"""One-pass byte sources: an input file or pipe read front to back.

The one-pass reader of :mod:`fixedram.format.sequential` is built on these:
:class:`RawInput` (the descriptor, with a 1 MiB pipe buffer), :class:`Prefixed`
(bytes already read to recognise the input, then the rest) and :class:`Tap`
(keeps the stream's first bytes and hands every byte to a copy). The read-ahead
thread (:mod:`.readahead`) and the decoders (:mod:`.decompress`) read from them.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import Any

from ..errors import InputError

__all__ = ["DECODED_CHUNK", "HEAD_KEEP", "PIPE_READ", "PIPE_SIZE", "READ_SIZE", "Prefixed",
           "RawInput", "ReadOnly", "Tap", "grow_pipe", "input_stat"]

# Bytes the stream reader buffers (one read-ahead chunk).
DECODED_CHUNK = 1 << 20
# Bytes read per system call, and bytes asked of a pipe per read.
READ_SIZE = 1 << 20
PIPE_READ = 64 << 10
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032  # Linux fcntl commands
# The stream's first bytes kept for the configuration section (far below this).
HEAD_KEEP = 64 << 10


def input_stat(fd: int, name: str) -> os.stat_result:
    """``fstat`` of an input descriptor; one error naming it when it is not open.

    Standard input may be closed (``<&-``): then the next file opened would
    take descriptor 0 and be read as the input, so a command reading ``-``
    checks it before it opens anything.
    """
    try:
        return os.fstat(fd)
    except OSError as e:
        raise InputError(name, e) from e


class ReadOnly:
    """A readable, unseekable file object built on ``read`` alone."""

    def read(self, n: int = -1) -> bytes:
        raise NotImplementedError

    def readinto(self, buf: Any) -> int:
        b = self.read(len(buf))
        buf[:len(b)] = b
        return len(b)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False


class RawInput(ReadOnly):
    """The input file or pipe, read with plain ``read`` calls; counts bytes."""

    def __init__(self, fd: int, name: str, close: bool) -> None:
        self.fd = fd
        self.name = name
        self._close = close
        self.pos = 0
        self.is_pipe = not stat.S_ISREG(input_stat(fd, name).st_mode)
        if self.is_pipe:
            grow_pipe(fd)

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = READ_SIZE
        # A pipe is read 64 KiB at a time here (the read-ahead thread reads it
        # into its own chunks instead): larger reads of uneven size cost an
        # allocation each (measured 2.5x slower) and grew the heap.
        try:
            b = os.read(self.fd, min(n, PIPE_READ) if self.is_pipe else n)
        except OSError as e:
            raise self._failed(e) from e
        self.pos += len(b)
        return b

    def _failed(self, e: OSError) -> InputError:
        return InputError(self.name, e, offset=self.pos)

    def readinto(self, buf: Any) -> int:
        try:
            n = os.readv(self.fd, [buf])
        except OSError as e:
            raise self._failed(e) from e
        self.pos += n
        return n

    def read_exact(self, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            b = self.read(n - got)
            if not b:
                break
            parts.append(b)
            got += len(b)
        return b"".join(parts)

    def close(self) -> None:
        if self._close and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


def grow_pipe(fd: int) -> None:
    """Give a pipe a 1 MiB buffer (Linux's default unprivileged ceiling).

    With the default 64 KiB the writer and this reader wake each other for
    every 64 KiB: reading 1 GiB through ``cat |`` took 0.85-1.0 s, against
    0.30-0.36 s with 1 MiB.
    """
    try:
        import fcntl

        if fcntl.fcntl(fd, F_GETPIPE_SZ) < PIPE_SIZE:
            fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
    except (OSError, ImportError):
        pass  # not a pipe (a socket, a tty), or over the user's pipe quota: keep it


class Prefixed(ReadOnly):
    """``prefix`` then the rest of ``raw``: bytes already read to recognise the input."""

    def __init__(self, prefix: bytes, raw: RawInput) -> None:
        self.prefix = prefix
        self.raw = raw

    def read(self, n: int = -1) -> bytes:
        if self.prefix:
            k = len(self.prefix) if n < 0 else min(n, len(self.prefix))
            b, self.prefix = self.prefix[:k], self.prefix[k:]
            return b
        return self.raw.read(n)

    def readinto(self, buf: Any) -> int:
        if self.prefix:
            return super().readinto(buf)
        return self.raw.readinto(buf)


class Tap:
    """Passes reads through, keeps the first ``HEAD_KEEP`` bytes and hands
    every byte to ``sink`` when one is set (a copy of the stream)."""

    def __init__(self, src: Any) -> None:
        self.src = src
        self.head = bytearray()
        self.sink: Callable[[bytes | memoryview], object] | None = None
        self.room: int = getattr(src, "room", 0)  # see ByteReader: passed through

    def read(self, n: int = -1) -> bytes:
        b: bytes = self.src.read(n)
        self._saw(b)
        return b

    def read_spaced(self) -> bytearray:
        b: bytearray = self.src.read_spaced()
        self._saw(memoryview(b)[self.room:])
        return b

    def _saw(self, b: bytes | memoryview) -> None:
        if len(self.head) < HEAD_KEEP:
            self.head += b[:HEAD_KEEP - len(self.head)]
        if self.sink is not None and b:
            self.sink(b)

    def seekable(self) -> bool:
        return False
