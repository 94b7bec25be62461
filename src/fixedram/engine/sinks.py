"""Where precopy sends pages: a sequential stream, or a mapped-ram file.

* :class:`StreamSink` writes QEMU's sequential stream through
  :class:`~fixedram.format.writer.StreamWriter` on any channel. Every pass
  appends, so a guest that keeps re-dirtying memory makes the file grow
  without bound.
* :class:`MappedRamSink` lays the file out with
  :class:`~fixedram.format.writer.MappedRamWriter` and has ``multifd-channels``
  threads ``pwritev`` coalesced runs straight from guest memory to each
  page's fixed offset (O_DIRECT descriptors with ``direct-io``). A re-dirtied
  page overwrites itself, so the file stays bounded by RAM size. Zero pages
  are detected by the channel threads (numpy on whole runs), never written,
  and their bits cleared; the bitmap is written at completion.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import queue
import socket
import struct
import tempfile
import threading
from collections.abc import Callable

import numpy as np

from ..errors import CapabilityError, MigrationError, TransportError
from ..format.constants import Command
from ..format.machine import MachineState
from ..format.stream import encode_command
from ..format.writer import BlockSpec, MappedRamWriter, StreamWriter
from ..transports.channels import FileOut, OutChannel
from ..transports.fdsets import FdSetError, is_fdset, qemu_open
from .guest import MACHINE, PAGE, BuiltinGuest, GuestBlock

__all__ = ["MappedRamSink", "Sink", "StreamSink", "probe_direct_io"]

RAM_SECTION_ID = 2
DEVICE_SECTION_ID = 3


def _specs(guest: BuiltinGuest) -> list[BlockSpec]:
    return [BlockSpec(b.idstr, b.size) for b in guest.blocks]


def _machine(mapped_ram: bool) -> MachineState:
    # Machine types >= 10.0 send SWITCHOVER_START; the device joins at finish.
    caps = ("mapped-ram",) if mapped_ram else ()
    return MachineState(MACHINE, caps, ram_section_id=RAM_SECTION_ID, switchover_start=True)


def _finish_state(state: MachineState, guest: BuiltinGuest) -> None:
    """The device section as it is at switchover (the guest is stopped)."""
    state.devices = [guest.device_record(DEVICE_SECTION_ID)]


def zero_mask(blk: GuestBlock, first: int, count: int) -> np.ndarray:
    """True for each non-zero page of the run (one vectorised pass)."""
    return np.asarray(blk.words[first:first + count].any(axis=1))


def mask_runs(nz: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of runs of True in ``nz``."""
    d = np.diff(np.concatenate(([False], nz, [False])).astype(np.int8))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist(),
                    strict=True))


class Sink:
    """Interface precopy drives. Counters are read by the stats."""

    normal_pages = 0
    zero_pages = 0
    transferred = 0  # bytes put on the wire / into the file
    multifd_bytes = 0  # of which written by multifd channels

    @property
    def accounted(self) -> int:
        """Bytes for max-bandwidth: sent, plus handed to channels and not yet
        written (so queued pages count at once, not when a thread gets to them)."""
        return self.transferred

    def begin(self) -> None: ...

    def begin_pass(self, final: bool) -> None: ...

    def send(self, bi: int, first: int, count: int) -> None:
        """Pages ``[first, first+count)`` of block ``bi`` (any of them may be zero)."""

    def end_pass(self) -> None:
        """Wait until every page handed over so far is written (QEMU's per-round sync)."""

    def finish(self) -> None: ...

    def abort(self) -> None: ...


class StreamSink(Sink):
    """Sequential stream on any channel (file, tcp, unix, exec, fd).

    :param detect_zero: find zero pages and send ZERO records for them
        (``zero-page-detection`` other than ``none``).
    :param return_path: QEMU's return-path capability (a socket channel):
        the stream asks the destination to open its return path, and the
        migration completes only when the destination reports that it has
        loaded everything (its SHUT message, status 0).
    """

    def __init__(self, guest: BuiltinGuest, ch: OutChannel, *, detect_zero: bool = True,
                 return_path: bool = False) -> None:
        self.g = guest
        self.ch = ch
        self.detect = detect_zero
        self.return_path = return_path
        self.w = StreamWriter(self._write, _machine(False), _specs(guest))
        self.normal_pages = self.zero_pages = self.transferred = 0
        self._final = False
        self._open_rp = False

    def _write(self, b: bytes | memoryview) -> None:
        if self._open_rp:
            # QEMU sends OPEN_RETURN_PATH right after the header and configuration.
            self._open_rp = False
            hdr = self.w.state.header()
            if bytes(b[:len(hdr)]) != hdr:  # pragma: no cover - the writer's layout changed
                raise MigrationError("stream header not where the return path expects it")
            b = hdr + encode_command(Command.OPEN_RETURN_PATH) + bytes(b[len(hdr):])
        self.ch.write(b)
        self.transferred += len(b)

    def begin(self) -> None:
        self._open_rp = self.return_path
        self.w.begin()

    def begin_pass(self, final: bool) -> None:
        self._final = final
        self.w.begin_part(end=final)

    def send(self, bi: int, first: int, count: int) -> None:
        blk = self.g.blocks[bi]
        if not self.detect:
            self.w.pages(bi, first, blk.data[first * PAGE:(first + count) * PAGE])
            self.normal_pages += count
            return
        nz = zero_mask(blk, first, count)
        for s, e in mask_runs(nz):
            self.w.pages(bi, first + s, blk.data[(first + s) * PAGE:(first + e) * PAGE])
            self.normal_pages += e - s
        zeros = np.flatnonzero(~nz)
        for p in zeros.tolist():
            self.w.zero(bi, first + p)
        self.zero_pages += zeros.size

    def end_pass(self) -> None:
        self.w.end_part()
        if not self._final:
            self.ch.flush()

    def finish(self) -> None:
        _finish_state(self.w.state, self.g)
        self.w.finish()
        if self.return_path:
            self.ch.flush()
            await_shut(self.ch)
        self.ch.commit()

    def destination_error(self) -> MigrationError | None:
        """After a failed write: what the destination said on the return path
        (its SHUT), if it said anything within a second."""
        if not self.return_path:
            return None
        try:
            await_shut(self.ch, timeout=1.0, half_close=False)
        except MigrationError as e:
            return e if str(e).startswith("Sibling") else None
        return None

    def abort(self) -> None:
        self.ch.abort()


def probe_direct_io(directory: str) -> None:
    """Check O_DIRECT works where the file goes: a 1 MiB aligned write at
    offset 1 MiB (as QEMU's tests probe). tmpfs, for one, refuses it."""
    buf = mmap.mmap(-1, 1 << 20)
    path = ""
    try:
        fd, path = tempfile.mkstemp(prefix=".fixedram-odirect-", dir=directory)
        os.close(fd)
        dfd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        try:
            os.pwrite(dfd, buf, 1 << 20)
        finally:
            os.close(dfd)
    except OSError as e:
        raise CapabilityError(f"direct-io: the filesystem holding {directory} does not accept "
                              f"O_DIRECT ({e.strerror or e}); write the file to a disk "
                              "filesystem or turn direct-io off") from e
    finally:
        buf.close()
        if path:
            with contextlib.suppress(OSError):
                os.unlink(path)

class MappedRamSink(Sink):
    """mapped-ram file on ``file:``; ``channels`` threads write pages (0 = the
    migration thread writes them itself through the main descriptor, as
    QEMU does without multifd)."""

    def __init__(self, guest: BuiltinGuest, ch: FileOut, *, channels: int = 0,
                 direct_io: bool = False, detect_zero: bool = True,
                 queue_depth: int = 4) -> None:
        self.g = guest
        self.ch = ch
        self.detect = detect_zero
        self.normal_pages = self.zero_pages = self.transferred = 0
        self.multifd_bytes = 0
        self.inflight = 0  # bytes of runs queued to channels, not yet written
        self._lock = threading.Lock()
        self._err: BaseException | None = None
        self.w = MappedRamWriter(ch.fd, _machine(True), _specs(guest), start=ch.offset)
        # Header and block list (the pages regions between them are not sent).
        self.transferred = self.w.placed[0].record_offset - ch.offset + sum(
            p.bitmap_offset - p.record_offset for p in self.w.placed)
        self._fds: list[int] = []
        self._threads: list[threading.Thread] = []
        self._q: queue.Queue[tuple[int, int, int] | None] = queue.Queue(
            maxsize=max(1, channels) * queue_depth)
        if direct_io and not is_fdset(ch.write_path):  # an fd set's O_DIRECT fd is given
            probe_direct_io(os.path.dirname(os.path.abspath(ch.write_path)))
        flags = os.O_WRONLY | (os.O_DIRECT if direct_io else 0)
        try:
            for _ in range(channels):
                self._fds.append(qemu_open(ch.write_path, flags))
        except FdSetError as e:
            self._close_fds()
            raise TransportError(str(e)) from None
        except OSError as e:
            self._close_fds()
            raise TransportError(f"{ch.uri.path}: cannot open a multifd channel: "
                                 f"{e.strerror or e}", e) from e
        for i, fd in enumerate(self._fds):
            t = threading.Thread(target=self._channel, args=(fd,), daemon=True,
                                 name=f"multifdsend_{i}")
            t.start()
            self._threads.append(t)

    # -- page writing ------------------------------------------------------------

    def _write_run(self, fd: int, bi: int, first: int, count: int) -> None:
        blk = self.g.blocks[bi]
        nz = zero_mask(blk, first, count) if self.detect else np.ones(count, dtype=bool)
        runs = [(0, count)] if nz.all() else mask_runs(nz)
        base = self.w.page_offset(bi, first)
        written = 0
        for s, e in runs:
            mv = blk.view(first + s, e - s)
            off = base + s * PAGE
            done = 0
            while done < len(mv):
                done += os.pwritev(fd, [mv[done:]], off + done)
            written += e - s
        self.w.bits(bi)[first:first + count] = nz
        with self._lock:
            self.normal_pages += written
            self.zero_pages += count - written
            self.transferred += written * PAGE
            self.inflight -= count * PAGE
            if fd != self.ch.fd:
                self.multifd_bytes += written * PAGE

    def _channel(self, fd: int) -> None:
        while True:
            job = self._q.get()
            try:
                if job is None:
                    return
                if self._err is None:
                    self._write_run(fd, *job)
            except BaseException as e:
                self._err = e
            finally:
                self._q.task_done()

    def _check(self) -> None:
        if self._err is not None:
            e = self._err
            msg = e.strerror if isinstance(e, OSError) else str(e)
            raise MigrationError(f"multifd channel failed: {msg}", e)

    @property
    def accounted(self) -> int:
        with self._lock:
            return self.transferred + self.inflight

    def send(self, bi: int, first: int, count: int) -> None:
        self._check()
        with self._lock:
            self.inflight += count * PAGE
        if not self._threads:
            self._write_run(self.ch.fd, bi, first, count)
            return
        self._q.put((bi, first, count))

    def end_pass(self) -> None:
        if self._threads:
            self._q.join()
        self._check()

    # -- completion ----------------------------------------------------------------

    def finish(self) -> None:
        self.end_pass()
        self._stop_threads()
        _finish_state(self.w.state, self.g)
        end = self.w.finish()
        self.transferred += sum(len(self.w.encode_bitmap(i)) for i in range(len(self.g.blocks)))
        self.transferred += len(self.w.tail_bytes)
        self.file_end = end
        self.ch.commit()

    def _stop_threads(self) -> None:
        for _ in self._threads:
            self._q.put(None)
        for t in self._threads:
            t.join()
        self._threads.clear()
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    def abort(self) -> None:
        # Drain queued jobs so the channel threads can see their stop marker.
        self._err = self._err or MigrationError("aborted")
        with contextlib.suppress(queue.Empty):
            while True:
                self._q.get_nowait()
                self._q.task_done()
        self._stop_threads()
        self.ch.abort()


SinkFactory = Callable[[], Sink]

# Return-path messages (destination -> source): be16 type, be16 length, data.
RP_MSG_SHUT = 1  # be32 status: 0 when the destination loaded everything
RP_TIMEOUT = 120.0


def await_shut(ch: OutChannel, timeout: float = RP_TIMEOUT, half_close: bool = True) -> None:
    """Wait for the destination's SHUT on the return path; raise unless it is 0.

    The error for a non-zero status is QEMU's ("Sibling indicated error 1").
    """
    sock = getattr(ch, "sock", None)
    if sock is None:
        raise MigrationError(f"{ch.uri.text}: no return path on this transport")

    def exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            try:
                got = sock.recv(n - len(buf))
            except OSError as e:
                raise MigrationError(f"return path: {e.strerror or e}", e) from e
            if not got:
                raise MigrationError("return path: the destination closed it before "
                                     "reporting the migration loaded")
            buf += got
        return buf

    if half_close:
        # The destination sees the stream end (a reader may read to the end
        # for the vmdesc trailer) while the return path stays open.
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            raise MigrationError(f"return path: {e.strerror or e}", e) from e
    sock.settimeout(timeout)
    while True:
        typ, ln = struct.unpack(">HH", exact(4))
        data = exact(ln) if ln else b""
        if typ == RP_MSG_SHUT:
            status = struct.unpack(">I", data[:4])[0] if len(data) >= 4 else 1
            if status:
                raise MigrationError(f"Sibling indicated error {status}")
            return
        # Other messages (PONG, ...) need no answer in precopy.
