"""The one-pass byte path: a real pipe read ahead on a thread into chunks with room in
front, read through ByteReader; and extract's O_DIRECT writes falling back where
the device refuses them."""

from __future__ import annotations

import fcntl
import os
import random
import threading
from pathlib import Path

import numpy as np
import pytest

from fixedram.errors import FixedramError, TruncatedFile
from fixedram.format.sequential import open_sequential
from fixedram.io.readahead import CHUNK, ROOM
from fixedram.memory.stream_extract import _Placed, _Segment


def _pipe_with(payload: bytes, piece: int = 70_001) -> int:
    """Read end of a pipe a thread fills with ``payload`` in odd-sized writes."""
    r, w = os.pipe()

    def feed() -> None:
        with os.fdopen(w, "wb", buffering=0) as f:
            for i in range(0, len(payload), piece):
                f.write(payload[i:i + piece])

    threading.Thread(target=feed, daemon=True).start()
    return r


def test_reads_across_chunks_equal_the_bytes(tmp_path: Path) -> None:
    rng = random.Random(7)
    payload = rng.randbytes(5 * CHUNK + 12345)
    fd = _pipe_with(payload)
    try:
        si = open_sequential("-", offset=0, stdin_fd=fd)
        r = si.reader
        assert si._head.room == ROOM  # the pipe is read ahead
        pos = 0
        # Small typed reads, a window/advance, and reads larger than a chunk, so
        # that refills happen with every amount of unread bytes left.
        while pos < len(payload) - 3 * CHUNK:
            kind = rng.randrange(4)
            if kind == 0:
                assert r.be64() == int.from_bytes(payload[pos:pos + 8], "big")
                pos += 8
            elif kind == 1:
                n = rng.randrange(1, 9000)
                assert r.read(n) == payload[pos:pos + n]
                pos += n
            elif kind == 2:
                buf, i, avail = r.window(CHUNK)
                assert bytes(memoryview(buf)[i:i + avail]) == payload[pos:pos + avail]
                k = rng.randrange(avail + 1)
                r.advance(k)
                pos += k
            else:
                n = rng.randrange(CHUNK, 2 * CHUNK + ROOM)
                got = r.read(n)
                assert type(got) is bytes and got == payload[pos:pos + n]
                pos += n
            assert r.tell() == pos
        rest = len(payload) - pos
        assert r.read(rest) == payload[pos:]
        with pytest.raises(TruncatedFile) as e:
            r.u8()
        assert e.value.offset == len(payload)
        si.close()
    finally:
        os.close(fd)


def test_tee_sees_every_byte_once(tmp_path: Path) -> None:
    payload = random.Random(3).randbytes(3 * CHUNK + 99)
    fd = _pipe_with(payload)
    try:
        si = open_sequential("-", offset=0, stdin_fd=fd)
        seen: list[bytes] = []
        si.tee(lambda b: seen.append(bytes(b)))
        r = si.reader
        r.skip(len(payload))
        assert b"".join(seen) == payload
        si.close()
    finally:
        os.close(fd)


def test_read_error_names_the_input(tmp_path: Path) -> None:
    # A directory opened for reading fails at read(): one typed error naming
    # the input and where, not an OSError.
    d = os.open(str(tmp_path), os.O_RDONLY)
    try:
        with pytest.raises(FixedramError, match=r"^stdin: reading at byte 0 failed: Is a "):
            open_sequential("-", offset=0, stdin_fd=d)
    finally:
        os.close(d)


class _OneFile(_Placed):
    def __init__(self, fd: int, base: int) -> None:
        super().__init__()
        self.direct(fd)
        self.segments = [[_Segment(0, 64, fd, base)]]


@pytest.mark.parametrize("base", [0, 4096 * 3, 512 + 100])
def test_direct_writes_and_unaligned_fallback(tmp_path: Path, base: int) -> None:
    out = tmp_path / "out.bin"
    fd = os.open(out, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        t = _OneFile(fd, base)
        direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
        data = np.frombuffer(random.Random(base).randbytes(10 * 4096),
                             dtype=np.uint8).reshape(10, 4096)
        t.pages(0, np.array([0, 1, 2, 5, 6, 9, 10, 11, 12, 40]), data)
        t.drain()
        got = out.read_bytes()
        for row, page in enumerate([0, 1, 2, 5, 6, 9, 10, 11, 12, 40]):
            at = base + page * 4096
            assert got[at:at + 4096] == data[row].tobytes()
        still = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
        if base % 4096:
            assert not still  # refused as unaligned: written through the page cache
        else:
            assert still == direct
    finally:
        os.close(fd)


def test_closed_stdin_is_one_error() -> None:
    # ``fixedram extract - <&-``: standard input is not open at all.
    fd = 4000
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(FixedramError, match=r"^stdin: Bad file descriptor"):
        open_sequential("-", stdin_fd=fd)
