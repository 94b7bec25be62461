"""One-pass sources read on a thread, ahead of the stream parser.

A pipe, or a decompressor, hands the parser chunks from a bounded queue, so
the reading (system calls, decompression: both release the GIL) overlaps the
parsing and the writing of the previous chunk. Each chunk has free room in
front (:attr:`ReadAhead.room`): the stream reader copies the few bytes it has
not parsed yet into it instead of copying the whole chunk behind them
(:class:`~fixedram.format.primitives.ByteReader`).

Imported only for one-pass inputs: its threads cost every other command
import time for nothing.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from typing import TYPE_CHECKING

from ..errors import FixedramError
from .stream import DECODED_CHUNK as CHUNK

if TYPE_CHECKING:
    from .stream import Prefixed

__all__ = ["CHUNK", "ROOM", "PipeAhead", "ReadAhead"]

# The stream reader refills when less than a quarter of its buffer is left
# (ByteReader.window): that much room takes what it has not read.
ROOM = CHUNK // 4
# Chunks queued ahead of the parser.
QUEUE_DEPTH = 8


class ReadAhead:
    """A thread filling chunks from :meth:`readinto` into a bounded queue.

    Memory stays at ``QUEUE_DEPTH`` chunks however long the input. An error
    reaches the reader after every byte read before it, so the offset it
    names is where the input broke.
    """

    room = ROOM

    def __init__(self, name: str, thread_name: str) -> None:
        self.name = name
        self.pos = 0  # bytes handed over
        self._q: queue.Queue[bytearray | BaseException | None] = queue.Queue(QUEUE_DEPTH)
        self._stop = threading.Event()
        self._eof = False
        self._t = threading.Thread(target=self._run, name=thread_name, daemon=True)

    def start(self) -> None:
        self._t.start()

    # -- for subclasses ----------------------------------------------------------

    def readinto(self, mv: memoryview) -> int:
        """Fill some of ``mv``; 0 at the end of the input (on the thread)."""
        raise NotImplementedError

    def finished(self) -> None:
        """The input ended: raise if it ended badly (on the thread)."""

    def error(self, e: BaseException) -> FixedramError:
        """``e``, raised on the thread, as the reader's error (the byte
        sources raise typed errors themselves; anything else is a bug)."""
        if isinstance(e, FixedramError):
            return e
        raise e

    # -- the thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                b, failed = self._chunk()
                if failed is not None:
                    self._q.put(b)  # the bytes read before the error, then the error
                    raise failed
                if len(b) == ROOM:
                    self.finished()
                    break
                self._q.put(b)
            self._q.put(None)
        except BaseException as e:  # handed to the reader, in order
            self._q.put(e)

    def _chunk(self) -> tuple[bytearray, BaseException | None]:
        """Up to CHUNK bytes behind ROOM free ones (ROOM alone at the end), and
        the error that stopped a chunk part-filled."""
        b = bytearray(ROOM + CHUNK)
        mv = memoryview(b)
        got = ROOM
        try:
            while got < len(b):
                n = self.readinto(mv[got:])
                if not n:
                    break
                got += n
        except BaseException as e:
            if got == ROOM:
                raise
            # A copy: the error's traceback still holds a view of ``b``.
            return b[:got], e
        mv.release()
        if got < len(b):
            del b[got:]
        return b, None

    # -- the reader's side ---------------------------------------------------------

    def read_spaced(self) -> bytearray:
        """The next chunk, its data after :attr:`room` free bytes; only the room at the end."""
        if self._eof:
            return bytearray(ROOM)
        item = self._q.get()
        if item is None:
            self._eof = True
            return bytearray(ROOM)
        if isinstance(item, BaseException):
            self._eof = True
            raise self.error(item)
        self.pos += len(item) - ROOM
        return item

    def read(self, n: int = -1) -> bytes:
        # A whole chunk even past ``n``: the stream reader takes it (it only
        # needs at least what it asked for, or the end).
        return bytes(memoryview(self.read_spaced())[ROOM:])

    def seekable(self) -> bool:
        return False

    def close(self) -> bool:
        """Stop the thread; False when it is still blocked in a read (the
        caller must then leave the descriptor open: it may be reused)."""
        self._stop.set()
        deadline = time.monotonic() + 0.5  # a chunk takes milliseconds; a stalled pipe, forever
        while self._t.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):  # unblock a put() on a full queue
                self._q.get(timeout=0.05)
        return not self._t.is_alive()


class PipeAhead(ReadAhead):
    """A pipe (or any unseekable input) read ahead."""

    def __init__(self, src: Prefixed, name: str) -> None:
        super().__init__(name, "fixedram-pipe-reader")
        self.src = src
        self.start()

    def readinto(self, mv: memoryview) -> int:
        return self.src.readinto(mv)
