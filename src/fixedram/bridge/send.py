"""``fixedram send``: a saved file streamed into a QEMU waiting with ``-incoming``.

The file (mapped-ram or stream, possibly inside a libvirt image) goes out as
one single-pass stream with mapped-ram off, the form every QEMU destination
accepts on ``tcp:``, ``unix:`` and ``exec:`` (stdout).

With ``multifd_channels`` the pages travel as QEMU 10's socket multifd does
(per-round sync): the main connection carries the stream without page
records, and N more connections carry page packets, with a SYNC packet on
every channel wherever the main stream has a MULTIFD_FLUSH record. With
``multifd_compression`` zlib or zstd each channel compresses its packets'
pages as one stream, as QEMU's ``multifd-compression`` does.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO

import numpy as np

from ..errors import FixedramError, IncompleteSave, TransportError, UsageError
from ..format.machine import MachineState
from ..format.migfile import MigrationFile, Run
from ..format.multifd import (
    COMPRESSION_FLAGS,
    PageCompressor,
    encode_init,
    encode_packet,
    encode_sync,
    split_packets,
)
from ..format.sequential import open_sequential
from ..format.writer import BlockSpec, StreamWriter
from ..memory.copy import RunCopier
from ..memory.extract import total_bytes
from ..save import reads_one_pass
from ..tools.convert import copy_one_pass, to_stream
from ..transports.channels import SocketOut, open_outgoing
from ..transports.uri import MigrationURI, parse_uri

__all__ = ["SendSummary", "send"]


@dataclass
class SendSummary:
    file: str
    destination: str
    bytes_sent: int = 0
    seconds: float = 0.0
    multifd_channels: int = 0
    multifd_compression: str = "none"
    multifd_packets: int = 0

    def as_dict(self) -> dict[str, Any]:
        from ..describe import SCHEMA_VERSION

        return {"schema_version": SCHEMA_VERSION, **asdict(self)}


Progress = Callable[[int], None]


def send(path: str, dest: str, *, stdout: BinaryIO | None = None,
         offset: int | None = None, multifd_channels: int = 0,
         uuid: bytes = bytes(16), multifd_compression: str = "none",
         progress: Progress | None = None,
         on_total: Callable[[int], None] | None = None,
         snapshot: str | None = None) -> SendSummary:
    """Stream ``path`` to ``dest`` (``tcp:HOST:PORT``, ``unix:PATH`` or ``-``).

    :param multifd_channels: send with socket multifd on this many channels;
        it must equal the destination's ``multifd-channels`` (which has
        ``multifd`` on and ``mapped-ram`` off).
    :param uuid: the destination's ``-uuid`` (16 bytes), zeros without one.
    :param multifd_compression: none, zlib or zstd; it must equal the
        destination's ``multifd-compression`` (levels are QEMU's defaults).
    :param progress: called with the bytes of guest RAM sent, per run or
        packet of pages; for a one-pass input (a pipe, a compressed image),
        with the stream bytes sent, per chunk read.
    :param on_total: called once with the bytes of guest RAM to send, when
        known (never for a one-pass input: its size is known at its end).
    :param snapshot: in a qcow2 image, the internal snapshot whose VM state is sent.
    """
    if multifd_channels and not 1 <= multifd_channels <= 255:
        raise TransportError(f"multifd channels must be 1..255, not {multifd_channels}")
    if len(uuid) != 16:
        raise ValueError("uuid must be 16 bytes")
    if multifd_compression not in ("none", "zlib", "zstd"):
        raise TransportError(f"multifd compression {multifd_compression!r} is not supported "
                             "(none, zlib or zstd)")
    if multifd_compression != "none" and not multifd_channels:
        raise TransportError("multifd compression needs --multifd-channels")
    t0 = time.monotonic()
    s = SendSummary(os.path.abspath(path), dest)
    if reads_one_pass(path):  # a pipe or a compressed image: its stream, checked as it goes
        if snapshot is not None:
            raise UsageError(f"{path}: --snapshot reads a qcow2 image's internal snapshot, "
                             "and this is not a qcow2 image")
        _send_one_pass(path, dest, s, stdout, offset, multifd_channels, progress)
        s.seconds = round(time.monotonic() - t0, 3)
        return s
    from ..save import open_file

    with open_file(path, offset=offset, snapshot=snapshot) as mf:
        if not mf.complete:
            raise IncompleteSave(f"{path}: the save is incomplete (no EOF marker, at byte "
                                 f"{mf.size}); refusing to send it")
        u = _destination(dest)
        if on_total is not None:
            on_total(total_bytes(mf))
        if u is not None and multifd_channels:
            s.multifd_channels = multifd_channels
            s.multifd_compression = multifd_compression
            s.bytes_sent, s.multifd_packets = _send_multifd(mf, u, multifd_channels, uuid,
                                                            multifd_compression, progress)
        else:
            s.bytes_sent = _write_stream(u, stdout, lambda write: to_stream(
                mf, write, progress=progress))
    s.seconds = round(time.monotonic() - t0, 3)
    return s


def _send_one_pass(path: str, dest: str, s: SendSummary, stdout: BinaryIO | None,
                   offset: int | None, multifd_channels: int,
                   progress: Progress | None = None) -> None:
    if multifd_channels:
        raise TransportError(f"{path}: --multifd-channels needs a seekable uncompressed file "
                             "(a pipe or a compressed image is sent on one connection)")
    with open_sequential(path, offset=offset) as si:
        def counted(write: Callable[[bytes | memoryview], object]
                    ) -> Callable[[bytes | memoryview], object]:
            if progress is None:
                return write

            def w(b: bytes | memoryview) -> None:  # one call per chunk the reader read
                write(b)
                progress(len(b))
            return w

        s.bytes_sent = _write_stream(_destination(dest), stdout,
                                     lambda write: copy_one_pass(si, counted(write)))


def _destination(dest: str) -> MigrationURI | None:
    """The socket URI to send to; None for ``-`` (stdout)."""
    if dest == "-":
        return None
    u = parse_uri(dest)
    if u.kind not in ("tcp", "unix"):
        raise TransportError(f"cannot send to {dest!r}: use tcp:HOST:PORT, unix:PATH or "
                             "- (stdout, for QEMU's -incoming exec:)")
    return u


def _write_stream(u: MigrationURI | None, stdout: BinaryIO | None,
                  produce: Callable[[Callable[[bytes | memoryview], object]], int]) -> int:
    """Run ``produce(write)`` into stdout (``u`` None) or one connection to ``u``;
    returns the bytes it wrote. A connection is committed only when complete."""
    if u is None:
        assert stdout is not None
        try:
            n = produce(stdout.write)
            stdout.flush()
            return n
        except BrokenPipeError as e:
            raise TransportError("stdout closed by the reader (did QEMU reject the "
                                 "stream? see its log)", e) from e
    ch = open_outgoing(u)
    try:
        n = produce(ch.write)
        ch.commit()
        return n
    except BaseException:
        ch.abort()
        raise


# Packets a channel may have queued: enough to keep its socket busy, little
# enough that a failed peer is noticed quickly.
QUEUE_DEPTH = 8
# A destination that stops reading for this long is stuck (typically it
# waits for more channels than were opened: multifd-channels differs).
STALL_SECONDS = 60

# A packet: its header block and the runs of its page data; compressed
# channels get (number, RAMBlock, normal pages, zero pages) and make the
# header themselves, as its payload size is known only once compressed.
_Item = tuple[bytes | tuple[int, str, np.ndarray, np.ndarray], list[Run]] | None


class _Channel:
    """One multifd connection: a thread sending queued packets in order.

    Page data go from the input file to the socket with ``sendfile`` when
    they are contiguous there (mapped-ram), so they are never copied
    through Python.
    """

    def __init__(self, uri: MigrationURI, cid: int, uuid: bytes, mf: MigrationFile,
                 failed: threading.Event, compression: str = "none") -> None:
        self.name = f"multifd channel {cid}"
        self.out = SocketOut(uri)
        self.sock = self.out.sock
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            # Kernel-side timeout: the socket stays blocking for sendfile.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                                 struct.pack("ll", STALL_SECONDS, 0))
        self.mf = mf
        self.copier = RunCopier(mf.source, 4096, 128, src_name=mf.path)
        self.compressor = PageCompressor(compression) if compression != "none" else None
        self.q: queue.Queue[_Item] = queue.Queue(QUEUE_DEPTH)
        self.failed = failed
        self.error: BaseException | None = None
        self.bytes = 0
        self._send(encode_init(cid, uuid))
        self.t = threading.Thread(target=self._run, daemon=True, name=self.name)
        self.t.start()

    def put(self, item: _Item) -> None:
        while True:
            if self.failed.is_set():
                raise _ChannelFailed
            try:
                self.q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _stalled(self) -> TransportError:
        return TransportError(f"{self.name}: the destination read nothing for {STALL_SECONDS} s "
                              "(is its multifd-channels the same as --multifd-channels?)")

    def _send(self, b: bytes | memoryview) -> None:
        try:
            self.sock.sendall(b)
        except BlockingIOError:
            raise self._stalled() from None
        except OSError as e:
            raise TransportError(f"{self.name}: {e.strerror or e} (did QEMU reject the "
                                 "migration? see its log)", e) from e
        self.bytes += len(b)

    def _sendfile(self, offset: int, n: int) -> None:
        if self.mf.fd < 0:  # a source without a descriptor: read, then send
            self._send(self.copier.read_run(Run(0, n // 4096, offset, 4096)))
            return
        done = 0
        while done < n:
            try:
                k = os.sendfile(self.sock.fileno(), self.mf.fd, offset + done, n - done)
            except BlockingIOError:
                raise self._stalled() from None
            except OSError as e:
                raise TransportError(f"{self.name}: {e.strerror or e} (did QEMU reject the "
                                     "migration? see its log)", e) from e
            if k == 0:
                raise TransportError(f"{self.mf.path}: page data end early at {offset + done}")
            done += k
        self.bytes += n

    def _run(self) -> None:
        try:
            while True:
                item = self.q.get()
                if item is None:
                    return
                hdr, runs = item
                if not isinstance(hdr, bytes):
                    self._send_compressed(hdr, runs)
                    continue
                self._send(hdr)
                for run in runs:
                    if run.stride == 4096:
                        self._sendfile(run.file_offset, run.count * 4096)
                    else:
                        self._send(self.copier.read_run(run))
        except BaseException as e:
            self.error = e
            self.failed.set()

    def _send_compressed(self, spec: tuple[int, str, np.ndarray, np.ndarray],
                         runs: list[Run]) -> None:
        num, idstr, normal, zero = spec
        c = self.compressor
        assert c is not None
        data = b""
        if runs:
            data = c.compress(b"".join(bytes(self.copier.read_run(r)) for r in runs))
        self._send(encode_packet(c.flag, num, idstr, normal, zero, payload_size=len(data))
                   + data)

    def finish(self) -> None:
        self.put(None)
        self.t.join()

    def close(self) -> None:
        self.out.close()  # shutdown wakes a thread blocked in send
        with contextlib.suppress(queue.Full):
            self.q.put_nowait(None)  # and this one blocked waiting for work


class _ChannelFailed(FixedramError):
    """A channel thread stopped; its own error is reported instead."""


def _send_multifd(mf: MigrationFile, u: MigrationURI, n: int, uuid: bytes,
                  compression: str = "none", progress: Progress | None = None
                  ) -> tuple[int, int]:
    """The whole migration over a main connection and ``n`` multifd ones;
    returns (bytes sent on all connections, multifd packets)."""
    main = open_outgoing(u)
    chans: list[_Channel] = []
    failed = threading.Event()
    pkt = _Packets(chans, compression, progress)
    try:
        try:
            state = MachineState.from_file(mf).with_mapped_ram(False)
            w = StreamWriter(main.write, state, BlockSpec.of(mf.blocks))
            # The destination sorts connections by their first bytes, so the
            # main one must carry something before the others connect.
            w.begin(multifd_flush=True)
            main.flush()
            for i in range(n):
                chans.append(_Channel(u, i, uuid, mf, failed, compression))
            pkt.sync()  # the setup sync, paired with the FLUSH sent above
            w.begin_part()
            for b in mf.blocks:
                pkt.block_pages(b.idstr, b.runs(128), b.zeroed_pages())
            pkt.sync()  # end of the (only) round
            w.multifd_flush()
            w.end_part()
            w.begin_part(end=True)
            pkt.sync()  # QEMU's completion sync
            w.multifd_flush()
            w.end_part()
            w.finish()
            main.flush()
            for c in chans:
                c.finish()
        except _ChannelFailed:
            pass
        for c in chans:
            if c.error is not None:
                raise c.error
        main.commit()
        return main.bytes_out + sum(c.bytes for c in chans), pkt.num
    except BaseException as e:
        failed.set()
        main.abort()
        if isinstance(e, FixedramError):
            raise
        if isinstance(e, OSError):
            raise TransportError(f"{u.text}: {e.strerror or e}", e) from e
        raise
    finally:
        for c in chans:
            c.close()


class _Packets:
    """Cuts a block's pages into packets, numbers them globally and deals
    them out round-robin (QEMU hands each batch to the next idle channel;
    which channel carries a page does not matter to the destination)."""

    def __init__(self, chans: list[_Channel], compression: str = "none",
                 progress: Progress | None = None) -> None:
        self.chans = chans
        self.progress = progress
        self.num = 0
        self.next = 0
        self.compressed = compression != "none"
        self.flags = COMPRESSION_FLAGS[compression]

    def _packet(self, idstr: str, normal: np.ndarray, zero: np.ndarray
                ) -> bytes | tuple[int, str, np.ndarray, np.ndarray]:
        if self.compressed:
            return (self.num, idstr, normal, zero)
        return encode_packet(0, self.num, idstr, normal, zero)

    def _deal(self, hdr: bytes | tuple[int, str, np.ndarray, np.ndarray],
              runs: list[Run]) -> None:
        self.chans[self.next].put((hdr, runs))
        self.next = (self.next + 1) % len(self.chans)
        self.num += 1

    def block_pages(self, idstr: str, runs: Iterable[Run], zero: np.ndarray) -> None:
        batch: list[Run] = []
        count = 0
        for run in runs:
            if count + run.count > 128:
                self._flush(idstr, batch)
                batch, count = [], 0
            batch.append(run)
            count += run.count
        if batch:
            self._flush(idstr, batch)
        empty = np.zeros(0, dtype=np.int64)
        for part in split_packets(zero):
            self._deal(self._packet(idstr, empty, part), [])

    def _flush(self, idstr: str, batch: list[Run]) -> None:
        pages = np.concatenate([np.arange(r.first, r.first + r.count, dtype=np.int64)
                                for r in batch])
        self._deal(self._packet(idstr, pages, np.zeros(0, dtype=np.int64)), batch)
        if self.progress is not None:  # queued: a channel holds at most QUEUE_DEPTH more
            self.progress(pages.size * 4096)

    def sync(self) -> None:
        for c in self.chans:
            c.put((encode_sync(self.num), []))
            self.num += 1
