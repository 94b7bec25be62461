"""``fixedram receive``: a live QEMU migration stream in, a mapped-ram file out.

The main channel is walked by the one stream parser; its page records are
pwritten at the fixed offsets of a :class:`MappedRamWriter`, so a page that
the guest re-dirties is overwritten in place and the file stays bounded by
RAM size however many passes the migration makes. With socket multifd the
extra channels are decoded in threads that pwrite in parallel; a barrier at
every SYNC packet keeps one round's writes from overtaking the previous
round's, which is the ordering QEMU's own destination enforces.
Uncompressed page data go from socket to file with ``splice``; with
``multifd-compression`` zlib or zstd each channel keeps its own decoder for
the whole migration (the sender's stream spans all of a channel's packets).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..errors import (
    BadMagic,
    CorruptFile,
    FixedramError,
    FormatError,
    TransportError,
    TruncatedFile,
    UnsupportedFeature,
)
from ..format.constants import STREAM_MAGIC_BYTES, TARGET_PAGE_SIZE, Command
from ..format.libvirt import MAGIC_DONE, LibvirtHeader, probe_libvirt
from ..format.machine import DeviceRecord, MachineState
from ..format.multifd import (
    FLAG_SYNC,
    INIT_ID_OFFSET,
    INIT_SIZE,
    MAX_COMPRESSED_SIZE,
    MULTIFD_MAGIC_BYTES,
    MULTIFD_PACKET_SIZE,
    MultifdPacket,
    PageDecompressor,
    decode_init,
    decode_packet,
    packet_size,
)
from ..format.primitives import ByteReader
from ..format.ram import PageBudget, RAMBlockRecord, RamStreamState
from ..format.stream import SectionHeader
from ..format.walker import DeviceSection, StreamEvents, walk_stream
from ..format.writer import BlockSpec, MappedRamWriter, refuse_unloadable_mapped_ram
from ..io.runs import index_runs
from ..io.stream import input_stat
from ..memory.copy import WRITEBACK_BYTES
from ..output import AtomicOutput, output_error
from .net import (
    PEEK_TIMEOUT,
    FdReader,
    Listener,
    SocketReader,
    Splicer,
    peek4,
    peek_now,
    peer_name,
    recv_exact,
)

__all__ = ["ReceiveSummary", "libvirt_header_of", "receive"]

# After the main stream ends, channels must finish within this time.
DRAIN_TIMEOUT = 60.0
# Connections accepted but not yet identified by their first bytes.
MAX_PENDING = 64
# At the end, how long unidentified connections may still turn into channels.
JOIN_GRACE = 1.0
# A multifd channel sends its init message when it connects: a connection
# silent for longer is not counted as a channel at the first SYNC.
CHANNEL_GRACE = 2.0


@dataclass
class ReceiveSummary:
    output: str
    source: str
    machine: str | None = None
    ram_bytes: int = 0
    bytes_received: int = 0
    main_bytes: int = 0
    multifd_channels: int = 0
    multifd_compression: str | None = None  # none, zlib or zstd (from the packets' flags)
    multifd_packets: int = 0
    page_records: int = 0
    zero_records: int = 0
    pages_rewritten: int = 0
    passes: int = 0
    sync_rounds: int = 0
    device_sections: int = 0
    apparent_bytes: int = 0
    allocated_bytes: int = 0
    seconds: float = 0.0
    channel_bytes: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        from ..describe import SCHEMA_VERSION

        return {"schema_version": SCHEMA_VERSION, **asdict(self)}


class _Receiver(StreamEvents):
    """RAM sink and stream events of the main channel; owns the writer."""

    def __init__(self, out: AtomicOutput, summary: ReceiveSummary, start: int = 0) -> None:
        self.out = out
        self.start = start  # where the QEMU data start (after a libvirt header)
        self.s = summary
        self.w: MappedRamWriter | None = None
        # Per block, how often each page was sent: grown with the pages that
        # arrived (claimed from ``budget`` first), None until a record names one.
        self.sends: list[np.ndarray | None] = []
        self.records: list[RAMBlockRecord] = []
        self.budget = PageBudget(summary.source)
        self.arrived: Callable[[], int] = lambda: 0  # stream bytes received so far
        self.lock = threading.Lock()  # channel threads claim and count too
        self.ram_sid: int | None = None
        self.state: MachineState | None = None
        self.ready = threading.Event()
        self.block_index: dict[str, int] = {}

    # -- events ----------------------------------------------------------

    def section(self, sh: SectionHeader) -> None:
        if self.ram_sid is None:
            self.ram_sid = sh.section_id

    def ram_blocks(self, state: RamStreamState) -> None:
        summ = self.summary
        assert summ is not None
        if state.mapped_ram:
            raise UnsupportedFeature("the source has mapped-ram on; a live socket stream needs it "
                                     "off (turn mapped-ram off on the source)", path=self.s.source)
        refuse_unloadable_mapped_ram(summ.header, self.s.source)
        specs = BlockSpec.of(state.blocks)
        hdr = summ.header
        self.s.machine = hdr.machine
        self.s.ram_bytes = sum(b.used_length for b in specs)
        # Devices join the state as they arrive; the writer reads them at finish.
        self.state = MachineState(hdr.machine, tuple(hdr.capabilities), hdr.uuid,
                                  self.ram_sid or 2).with_mapped_ram(True)
        self.w = MappedRamWriter(self.out.fd, self.state, specs, start=self.start, fresh=True)
        self.records = state.blocks
        self.sends = [None] * len(specs)
        self.block_index = {b.idstr: i for i, b in enumerate(specs)}
        self.ready.set()

    def device(self, dev: DeviceSection, r: ByteReader) -> None:
        data = r.read(dev.data_length, f"device section {dev.idstr!r}")
        assert self.state is not None  # the RAM section comes first
        self.state.devices.append(DeviceRecord(dev.idstr, dev.instance_id, dev.version_id,
                                               dev.section_id, bytes(data)))
        self.s.device_sections += 1

    # -- RAM sink --------------------------------------------------------

    def claim(self, bi: int, top: int) -> None:
        """Page ``top`` of block ``bi`` is about to be written or marked: the bytes
        received so far must be able to hold records that far (before any
        write, and before the counts grow to cover it)."""
        with self.lock:
            s = self.sends[bi]
            if s is not None and top < s.size:
                return
            self.budget.claim(self.records[bi], top + 1, self.arrived())
            have = 0 if s is None else s.size
            n = min(self.records[bi].npages, max(top + 1, 2 * have, 1 << 16))
            grown = np.zeros(n, dtype=np.uint16)
            if s is not None:
                grown[:have] = s
            self.sends[bi] = grown

    def claim_whole(self) -> None:
        """At the end: every block a record named must fit the stream's size whole
        (the bitmaps written at finish cover it), as a file of this size must."""
        n = self.arrived()
        for rec, s in zip(self.records, self.sends, strict=True):
            if s is not None:
                self.budget.claim(rec, rec.npages, n, what=f"a stream of {n} bytes")

    def _count(self, bi: int, idx: np.ndarray | int) -> None:
        with self.lock:
            s = self.sends[bi]
            assert s is not None  # claimed first
            self.s.pages_rewritten += int(np.count_nonzero(s[idx])) if isinstance(
                idx, np.ndarray) else int(s[idx] > 0)
            s[idx] += 1

    def page(self, block: int, page_index: int, r: ByteReader) -> None:
        assert self.w is not None
        self.claim(block, page_index)
        self.w.write_pages(block, page_index, r.view(4096, "page data"))
        self._count(block, page_index)
        self.s.page_records += 1

    def zero(self, block: int, page_index: int) -> None:
        assert self.w is not None
        self.claim(block, page_index)
        self.w.mark_zero(block, page_index)
        self._count(block, page_index)
        self.s.zero_records += 1

    def pages_batch(self, block: int, page_index: np.ndarray, data: np.ndarray,
                    positions: np.ndarray) -> None:
        assert self.w is not None
        self.claim(block, int(page_index.max()))
        self.w.write_runs(block, page_index, data)
        self._count(block, page_index)
        self.s.page_records += page_index.size

    def zeros_batch(self, block: int, page_index: np.ndarray) -> None:
        assert self.w is not None
        self.claim(block, int(page_index.max()))
        self.w.mark_zero(block, page_index)
        self._count(block, page_index)
        self.s.zero_records += page_index.size


class _Multifd:
    """The multifd side: channel threads, the SYNC barrier, errors."""

    def __init__(self, rx: _Receiver, listener: Listener, expected: int | None,
                 on_error: Callable[[BaseException], None], *,
                 peer_timeout: float = PEEK_TIMEOUT,
                 on_dropped: Callable[[str, str], None] | None = None) -> None:
        self.rx = rx
        self.listener = listener
        self.expected = expected
        self.on_error = on_error
        self.peer_timeout = peer_timeout
        self.on_dropped = on_dropped
        self.lock = threading.Lock()
        self.classified = threading.Condition(self.lock)
        self._pending_socks: dict[socket.socket, float] = {}  # -> when it was accepted
        self.main_found = False  # the accept loop has handed over what it held
        self.sealed = False  # no channel may be added any more (the end was reached)
        self.threads: list[threading.Thread] = []
        self.socks: list[socket.socket] = []
        # Set at the first SYNC, once the channels are counted (and, with
        # ``expected``, found to be all there).
        self.barrier: threading.Barrier | None = None
        self.ids: set[int] = set()  # channel ids claimed by init messages
        self.accepted = 0  # multifd connections, plus the main one when counted
        self.byte_counts: list[list[int]] = []
        self.packets = 0
        self.rounds = 0

    def _add_locked(self, sock: socket.socket) -> TransportError | None:
        """Start a channel thread for ``sock`` and list it (called under the lock).

        Started before it is listed: :meth:`join` and the count at the first
        SYNC take whatever ``threads`` holds, and a thread listed but not yet
        started cannot be joined. Returns the error to report (once the lock
        is released) if no thread could be started.
        """
        counter = [0]
        k = len(self.threads)
        t = threading.Thread(target=self._run, args=(sock, counter, k), daemon=True,
                             name=f"multifd-{k}")
        try:
            t.start()
        except RuntimeError as e:  # out of threads: the migration cannot go on
            return TransportError(f"multifd channel {k}: cannot start a thread for it: {e}", e)
        self.socks.append(sock)
        self.byte_counts.append(counter)
        self.threads.append(t)
        return None

    def _freeze(self) -> threading.Barrier:
        """The channel count, fixed at the first SYNC.

        QEMU connects every channel before it sends the first SYNC on any of
        them, so once a SYNC has arrived all channels are in the listen
        backlog or already accepted (see :meth:`_settle_locked`). With
        ``--multifd-channels`` N, fewer than N is an error now: the channels
        that came would wait at the barrier for ones that never will.
        """
        with self.lock:
            # Channels that connected before the main stream are only known
            # once it has been found (the accept loop hands them over).
            while self.barrier is None and not self.failed and not self.main_found:
                self.classified.wait(0.1)
            if self.barrier is None and not self.failed:
                self._settle_locked()
            if self.barrier is None and not self.failed:  # nobody counted meanwhile
                n = len(self.threads)
                if self.expected and n < self.expected:
                    self.failed = True  # the other channels' SYNCs give up, not count again
                    raise self._short(n, "by the first SYNC packet")
                self.barrier = threading.Barrier(n, action=self._round_done)
            if self.barrier is None:  # failed: let the caller's wait fail at once
                broken = threading.Barrier(1)
                broken.abort()
                return broken
            return self.barrier

    def _settle_locked(self) -> None:
        """Take in every connection made so far (called under the lock).

        A channel sends its init message as soon as it connects, so
        connections still being classified are waited for while they have
        data or are younger than :data:`CHANNEL_GRACE`; older silent ones
        cannot be channels and are left out of the count (and dropped when
        their turn comes), so only real channels are counted.
        """
        if self.expected and len(self.threads) >= self.expected:
            return  # all here: whatever else connected is dropped, not counted
        for c in self.listener.drain():
            self._classify_later(c)
        deadline = time.monotonic() + self.peer_timeout + 1.0
        while self.barrier is None and not self.failed and any(
                _has_data(c) or time.monotonic() - t < CHANNEL_GRACE
                for c, t in self._pending_socks.items()):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.classified.wait(min(left, 0.1))

    def _short(self, n: int, when: str) -> TransportError:
        return TransportError(
            f"{self.listener.address}: {n} of {self.expected} multifd channels connected "
            f"{when} (--multifd-channels {self.expected}); give the source's "
            "multifd-channels, or leave the option out to detect it")

    def require_all(self) -> None:
        """The main stream has ended, so every channel the source opens has
        connected: with ``--multifd-channels`` N, fewer than N is said now
        rather than after :data:`DRAIN_TIMEOUT` (those that came may be
        waiting for the others at their first SYNC)."""
        if not self.expected:
            return
        with self.lock:
            if self.barrier is None and not self.failed:
                self._settle_locked()
            n = len(self.threads)
            if n < self.expected and not self.failed:
                raise self._short(n, "by the end of the main stream")

    def _claim(self, cid: int, name: str) -> None:
        """One connection per channel id, below ``--multifd-channels`` when
        given: QEMU's destination refuses a second connection with an id it
        has already set up, and ids past its channel count."""
        with self.lock:
            if self.expected and cid >= self.expected:
                raise CorruptFile(f"channel id {cid}, but --multifd-channels {self.expected} "
                                  f"numbers them 0 to {self.expected - 1}", path=name,
                                  offset=INIT_ID_OFFSET)
            if cid in self.ids:
                raise CorruptFile(f"channel id {cid} received twice (another connection is "
                                  f"already multifd channel {cid})", path=name,
                                  offset=INIT_ID_OFFSET)
            self.ids.add(cid)

    _pending = 0

    def _counted(self, pending: int = 0) -> bool:
        """No channel may join any more (called under the lock): the end was reached,
        the count was fixed at the first SYNC, or ``--multifd-channels`` are all here."""
        if self.sealed or self.failed:
            return True
        if self.expected:
            return len(self.threads) + pending >= self.expected
        return self.barrier is not None

    def _full(self) -> str | None:
        """Why a new connection cannot be a channel now (called under the lock)."""
        if self._counted(self._pending):
            return "it connected after the multifd channels were counted"
        if self._pending >= MAX_PENDING:
            return f"{MAX_PENDING} connections are already waiting to be identified"
        return None

    def adopt(self, c: socket.socket) -> None:
        """A connection already seen to start with the multifd magic."""
        with self.lock:
            late = self._counted()
            err = None if late else self._add_locked(c)
        if late:
            self._drop(c, "it connected after the multifd channels were counted")
        elif err is not None:
            self._failed_start(c, err)

    def _failed_start(self, c: socket.socket, err: TransportError) -> None:
        with contextlib.suppress(OSError):
            c.close()
        self.on_error(err)

    def _classify_later(self, c: socket.socket, accepted: float | None = None) -> None:
        # Called under self.lock, for a connection accepted after the main one.
        why = self._full()
        if why is not None:
            self._drop(c, why)
            return
        self._pending += 1
        self._pending_socks[c] = time.monotonic() if accepted is None else accepted
        threading.Thread(target=self._classify, args=(c,), daemon=True,
                         name="multifd-classify").start()

    def _drop(self, c: socket.socket, why: str) -> None:
        if self.on_dropped is not None:
            self.on_dropped(peer_name(c), why)
        with contextlib.suppress(OSError):
            c.close()

    def _classify(self, c: socket.socket) -> None:
        why: str | None = None
        try:
            head = peek4(c, self.peer_timeout, (MULTIFD_MAGIC_BYTES,))
            if head != MULTIFD_MAGIC_BYTES:
                why = _not_qemu(head)
        except TransportError as e:
            why = str(e)
        with self.lock:
            # One step, so a count taken meanwhile sees it as pending or as a thread.
            self._pending -= 1
            self._pending_socks.pop(c, None)
            if why is None and self._counted():
                why = "it connected after the multifd channels were counted"
            err = self._add_locked(c) if why is None else None
            self.classified.notify_all()
        if why is not None:
            self._drop(c, why)
        elif err is not None:
            self._failed_start(c, err)

    def _round_done(self) -> None:
        self.rounds += 1

    def _run(self, sock: socket.socket, counter: list[int], k: int) -> None:
        name = f"multifd channel {k}"  # until its init message gives QEMU's number
        try:
            self._channel(sock, counter, name)
        except threading.BrokenBarrierError:
            pass  # another thread failed and said why
        except BaseException as e:
            self.on_error(e)

    def _channel(self, sock: socket.socket, counter: list[int], name: str) -> None:
        init = bytearray(INIT_SIZE)
        if not recv_exact(sock, memoryview(init), name):
            raise TransportError(f"{name}: closed before its init message")
        counter[0] += INIT_SIZE
        # From here on, the channel as QEMU numbers it (its log says the same).
        cid = decode_init(bytes(init), name).channel_id
        name = f"multifd channel {cid}"
        self._claim(cid, name)
        ps = TARGET_PAGE_SIZE  # multifd packets carry target pages
        hsize = packet_size(ps)
        hdr = bytearray(hsize)
        payload = bytearray(MULTIFD_PACKET_SIZE)
        splicer = Splicer.create()
        try:
            self._packets(sock, counter, name, hdr, payload, splicer)
        finally:
            if splicer is not None:
                splicer.close()

    method: str | None = None  # multifd-compression, from the first packet with pages

    def _method(self, p: MultifdPacket, name: str, offset: int) -> str:
        """The packet's compression, which must be every packet's."""
        m = p.compression
        with self.lock:
            if self.method is None:
                self.method = m
            elif m != self.method:
                raise CorruptFile(f"packet {p.packet_num} has multifd-compression {m}, earlier "
                                  f"packets {self.method}", path=name, offset=offset + 8)
        return m

    def _packets(self, sock: socket.socket, counter: list[int], name: str, hdr: bytearray,
                 payload: bytearray, splicer: Splicer | None) -> None:
        ps = TARGET_PAGE_SIZE  # multifd packets carry target pages
        hsize = len(hdr)
        rx = self.rx
        # Compressed channels: this channel's decoder (its state spans every
        # packet) and a buffer for one packet's compressed data.
        dec: PageDecompressor | None = None
        zbuf: bytearray | None = None
        wb: _Writeback | None = None
        while True:
            if not recv_exact(sock, memoryview(hdr), name):
                return
            counter[0] += hsize
            at = counter[0] - hsize
            p = decode_packet(hdr, ps, name=name, offset=at)
            if p.normal_pages or p.zero_pages:
                method = self._method(p, name, at)
                while not rx.ready.wait(1.0):
                    if self.failed:
                        return
                bi = rx.block_index.get(p.ramblock)
                if bi is None:
                    raise _corrupt(name, f"multifd packet names unknown RAMBlock "
                                         f"{p.ramblock!r}")
                w = rx.w
                assert w is not None
                npages = w.placed[bi].spec.npages
                top = max(int(p.normal.max()) if p.normal.size else -1,
                          int(p.zero.max()) if p.zero.size else -1)
                if top >= npages:
                    raise _corrupt(name, f"multifd page offset outside RAMBlock "
                                         f"{p.ramblock!r}")
                if top >= 0:
                    rx.claim(bi, top)
                if p.next_packet_size and method != "none":
                    if dec is None or zbuf is None or wb is None:
                        dec = PageDecompressor(method, ps)
                        zbuf = bytearray(MAX_COMPRESSED_SIZE)
                        wb = _Writeback(w.fd)
                    mv = memoryview(zbuf)[:p.next_packet_size]
                    if not recv_exact(sock, mv, name):
                        raise TransportError(f"{name}: ended before the page data")
                    counter[0] += p.next_packet_size
                    pages = dec.decompress(mv, p.normal.size, memoryview(payload),
                                           name=f"{name} packet {p.packet_num}",
                                           offset=counter[0] - p.next_packet_size)
                    data = np.frombuffer(pages, dtype=np.uint8).reshape(-1, ps)
                    w.write_runs(bi, p.normal, data)
                    wb.wrote(w.page_offset(bi, int(p.normal.min())),
                             w.page_offset(bi, int(p.normal.max())) + ps)
                    rx._count(bi, p.normal)
                    rx.s.page_records += p.normal.size
                elif p.next_packet_size and splicer is not None:
                    try:
                        _splice_pages(splicer, sock, w, bi, p.normal, name)
                    except OSError as e:
                        if e.errno != errno.EINVAL:
                            raise
                        splicer.close()
                        splicer = None  # not spliceable here: recv + pwrite below
                    else:
                        counter[0] += p.next_packet_size
                        rx._count(bi, p.normal)
                        rx.s.page_records += p.normal.size
                if p.next_packet_size and method == "none" and splicer is None:
                    mv = memoryview(payload)[:p.next_packet_size]
                    if not recv_exact(sock, mv, name):
                        raise TransportError(f"{name}: ended before the page data")
                    counter[0] += p.next_packet_size
                    data = np.frombuffer(mv, dtype=np.uint8).reshape(-1, ps)
                    w.write_runs(bi, p.normal, data)
                    rx._count(bi, p.normal)
                    rx.s.page_records += p.normal.size
                if p.zero.size:
                    w.mark_zero(bi, p.zero)
                    rx._count(bi, p.zero)
                    rx.s.zero_records += p.zero.size
            with self.lock:
                self.packets += 1
            if p.flags & FLAG_SYNC:
                self._freeze().wait()

    failed = False

    def abort(self) -> None:
        self.failed = True
        with self.lock:
            b = self.barrier
            socks = list(self.socks)
        if b is not None:
            b.abort()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def join(self, timeout: float) -> bool:
        """Wait for the channel threads to end; then no channel can be added.

        Connections still unidentified once every channel has ended get a
        short grace: a QEMU channel shows its magic at once, so a silent one
        is not a channel and must not hold up the end of the migration.
        """
        deadline = time.monotonic() + timeout
        grace_end: float | None = None
        while True:
            with self.lock:
                if self.barrier is None:
                    for c in self.listener.drain():
                        self._classify_later(c)
                threads = list(self.threads)
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
            now = time.monotonic()
            with self.lock:
                settled = len(self.threads) == len(threads) and not any(
                    t.is_alive() for t in threads)
                if settled and (self._pending == 0 or (grace_end is not None
                                                       and now >= grace_end)):
                    self.sealed = True
                    return True
                if settled:
                    if grace_end is None:
                        grace_end = now + JOIN_GRACE
                    self.classified.wait(0.1)
            if now > deadline:
                with self.lock:
                    self.sealed = True
                return False

    def close(self) -> None:
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.close()


class _Writeback:
    """Writeback of what a channel has written, started every
    :data:`WRITEBACK_BYTES` (``posix_fadvise`` DONTNEED, as the run copier
    does): the disk works while pages are decoded, so the output's final
    fsync has little left to wait for."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.on = hasattr(os, "posix_fadvise")
        self.lo, self.hi, self.n = -1, 0, 0

    def wrote(self, lo: int, hi: int) -> None:
        if not self.on:
            return
        self.lo = lo if self.lo < 0 else min(self.lo, lo)
        self.hi = max(self.hi, hi)
        self.n += hi - lo
        if self.n >= WRITEBACK_BYTES:
            try:
                os.posix_fadvise(self.fd, self.lo, self.hi - self.lo, os.POSIX_FADV_DONTNEED)
            except OSError:
                self.on = False
            self.lo, self.hi, self.n = -1, 0, 0


def _splice_pages(sp: Splicer, sock: socket.socket, w: MappedRamWriter, bi: int,
                  idx: np.ndarray, name: str) -> None:
    """A packet's page data spliced from the socket to their offsets, one
    splice per run of consecutive pages."""
    ps = w.placed[bi].spec.page_size
    firsts = idx.tolist()
    for a, cnt in index_runs(idx):
        first = firsts[a]
        sp.copy(sock, w.fd, w.page_offset(bi, first), cnt * ps, name)
        w.set_present(bi, slice(first, first + cnt))


def _corrupt(name: str, msg: str) -> FormatError:
    return CorruptFile(msg, path=name)


class _Ticker:
    """Bytes received, handed to ``progress`` every 0.1 s from a thread (the
    channels count their own bytes: nothing is added to their hot path), and
    the incoming guest's RAM size to ``on_total`` once its RAMBlocks are known."""

    def __init__(self, summary: ReceiveSummary, counters: Callable[[], int],
                 progress: Callable[[int], None] | None,
                 on_total: Callable[[int], None] | None) -> None:
        self.s = summary
        self.counters = counters
        self.progress = progress
        self.on_total = on_total
        self.done = 0
        self.told = False
        self.stop = threading.Event()
        self.t: threading.Thread | None = None
        if progress is not None or on_total is not None:
            self.t = threading.Thread(target=self._run, daemon=True, name="receive-progress")
            self.t.start()

    def _tick(self) -> None:
        if not self.told and self.s.ram_bytes and self.on_total is not None:
            self.told = True
            self.on_total(self.s.ram_bytes)
        n = self.counters()
        if n > self.done and self.progress is not None:
            self.progress(n - self.done)
            self.done = n

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            self._tick()

    def close(self) -> None:
        self.stop.set()
        if self.t is not None:
            self.t.join()
            self._tick()


def libvirt_header_of(path: str) -> LibvirtHeader:
    """The header of the libvirt save image ``path`` (any format, finished or not),
    made the header of a sparse image: the same domain XML, cookie and ``data_len``.

    :raise BadMagic: ``path`` is not a libvirt save image.
    """
    with open(path, "rb") as f:
        fd = f.fileno()
        hdr = probe_libvirt(fd, os.fstat(fd).st_size, path, allow_compressed=True)
    if hdr is None:
        raise BadMagic(f"not a libvirt save image (no {MAGIC_DONE.decode()} header), so it has "
                       "no domain XML for --libvirt-header", path=path, offset=0)
    try:
        hdr.encode()  # now, not after the whole migration has arrived
    except ValueError as e:
        raise CorruptFile(f"libvirt save header cannot be rewritten: {e}", path=path,
                          offset=20) from None
    return hdr.with_format("sparse")


def receive(source: str, output: str, *, force: bool = False,
            multifd_channels: int | None = None, stdin_fd: int = 0,
            on_listening: Callable[[str], None] | None = None,
            accept_timeout: float | None = None, peer_timeout: float = PEEK_TIMEOUT,
            on_dropped: Callable[[str, str], None] | None = None,
            libvirt_header: LibvirtHeader | None = None,
            progress: Callable[[int], None] | None = None,
            on_total: Callable[[int], None] | None = None) -> ReceiveSummary:
    """Receive one migration from ``source`` (``tcp:``/``unix:`` URI or ``-``) into ``output``.

    Connections that do not start like QEMU's (the stream magic, or the
    multifd magic) or send nothing within ``peer_timeout`` seconds are closed
    and the receiver keeps listening, like QEMU's ``-incoming``, until a
    migration arrives or ``accept_timeout`` seconds pass.

    :param multifd_channels: the source's channel count, if known; by
        default it is found at the first SYNC packet.
    :param on_listening: called with the bound address (``tcp:127.0.0.1:PORT``).
    :param accept_timeout: give up if no migration has started after this
        many seconds (default: wait for ever).
    :param on_dropped: called with (peer, reason) for each connection closed.
    :param libvirt_header: write a libvirt save image with this header (see
        :func:`libvirt_header_of`): the mapped-ram data start at its
        ``data_offset``, with offsets absolute in the image as libvirt 11
        writes them, and the header is written only once the migration is
        complete, so ``virsh restore`` never meets a half-received image.
    :param progress: called with the bytes received on all connections since
        the last call, about every 0.1 s, from a thread of its own.
    :param on_total: called once, from that thread, with the incoming guest's
        RAM size once its RAMBlock list has arrived (a live migration sends
        more than that: pages the guest dirties again are sent again).
    :raise TransportError: the peer disconnected or a socket failed.
    :raise FormatError: the peer sent something that is not a migration stream.
    Nothing is left under ``output`` unless the whole migration arrived.
    """
    t0 = time.monotonic()
    summary = ReceiveSummary(output=os.path.abspath(output), source=source)
    if source == "-":
        input_stat(stdin_fd, "stdin")  # before the output could take a closed stdin's number
    out = AtomicOutput(output, force=force)
    lv = libvirt_header.with_format("sparse") if libvirt_header is not None else None
    rx = _Receiver(out, summary, lv.data_offset if lv is not None else 0)
    listener: Listener | None = None
    mfd: _Multifd | None = None
    main_sock: socket.socket | None = None
    errors: list[BaseException] = []
    err_lock = threading.Lock()
    main_count = [0]

    def on_error(e: BaseException) -> None:
        with err_lock:
            errors.append(e)
        if mfd is not None:
            mfd.abort()
        if main_sock is not None:
            with contextlib.suppress(OSError):
                main_sock.shutdown(socket.SHUT_RDWR)

    def total() -> int:
        extra = sum(c[0] for c in mfd.byte_counts) if mfd is not None else 0
        return main_count[0] + extra

    ticker: _Ticker | None = None
    try:
        if source == "-":
            f: Any = FdReader(stdin_fd, main_count)
            name = "stdin"
        else:
            listener = Listener(source)
            if on_listening is not None:
                on_listening(listener.address)
            mfd = _Multifd(rx, listener, multifd_channels, on_error,
                           peer_timeout=peer_timeout, on_dropped=on_dropped)
            main_sock = _accept_main(listener, mfd, peer_timeout=peer_timeout,
                                     accept_timeout=accept_timeout)
            f = SocketReader(main_sock, main_count)
            name = listener.address
            threading.Thread(target=_accept_rest, args=(listener, mfd, on_error),
                             daemon=True).start()
        ticker = _Ticker(summary, total, progress, on_total)
        rx.budget.path = name
        rx.arrived = total
        r = ByteReader(f, name)
        try:
            walked = walk_stream(r, rx, rx)
        except TruncatedFile as e:
            if errors:
                raise errors[0] from e
            raise TransportError(f"{name}: the source disconnected before the end of the "
                                 f"migration stream ({e.message}, after {main_count[0]} bytes); "
                                 "no file was written") from e
        except FixedramError:
            if errors:
                raise errors[0] from None
            raise
        if mfd is not None:
            if not errors:
                mfd.require_all()
            if not mfd.join(DRAIN_TIMEOUT):
                raise TransportError(f"{name}: multifd channels did not finish within "
                                     f"{DRAIN_TIMEOUT:.0f} s after the main stream ended")
            if errors:
                raise errors[0]
            summary.multifd_channels = len(mfd.threads)
            summary.multifd_compression = mfd.method
            summary.multifd_packets = mfd.packets
            summary.sync_rounds = mfd.rounds
            summary.channel_bytes = [c[0] for c in mfd.byte_counts]
        if errors:
            raise errors[0]
        w, state = rx.w, rx.state
        assert w is not None and state is not None  # walk_stream requires a RAM section
        state.switchover_start = any(c == Command.SWITCHOVER_START for _, c, _ in walked.commands)
        state.attach_descs(walked.vmdesc)
        rx.claim_whole()
        try:
            end = w.finish()
            if lv is not None:  # last: the image is whole only now
                os.pwrite(out.fd, lv.encode(complete=True), 0)
            out.commit(end)
        except OSError as e:
            raise output_error(output, e) from e
        summary.main_bytes = main_count[0]
        summary.bytes_received = total()
        summary.passes = max((int(a.max()) for a in rx.sends if a is not None), default=0)
        st = os.stat(output)
        summary.apparent_bytes = st.st_size
        summary.allocated_bytes = st.st_blocks * 512
        summary.seconds = round(time.monotonic() - t0, 3)
        return summary
    except OSError as e:
        raise output_error(output, e) from e
    finally:
        if ticker is not None:
            ticker.close()
        if listener is not None:
            listener.close()
        if mfd is not None:
            mfd.abort()
            # Channel threads write into the output: they must be gone before
            # its descriptor is closed (the number could be reused) and removed.
            mfd.join(5.0)
            mfd.close()
        if main_sock is not None:
            main_sock.close()
        if not out.done:
            out.abort()


def _has_data(c: socket.socket) -> bool:
    """The peer has sent something (or closed) already."""
    return peek_now(c) is not None


def _not_qemu(head: bytes) -> str:
    if not head:
        return "it closed without sending anything"
    return f"it is not a QEMU migration source (first bytes {head!r})"


def _accept_main(listener: Listener, mfd: _Multifd, *, peer_timeout: float,
                 accept_timeout: float | None) -> socket.socket:
    """The first connection that starts with the stream magic.

    Connections are watched together, so a silent one cannot hold up the
    others: each must show its first four bytes within ``peer_timeout``.
    Early multifd channels are handed to ``mfd``; anything else is dropped.
    """
    start = time.monotonic()
    pending: dict[socket.socket, float] = {}  # connection -> when it was accepted
    partial: set[socket.socket] = set()  # sent a prefix of a magic, not all of it
    found: socket.socket | None = None
    try:
        while found is None:
            now = time.monotonic()
            waits = [t + peer_timeout - now for t in pending.values()]
            if accept_timeout is not None:
                waits.append(start + accept_timeout - now)
            if partial:
                waits.append(0.05)  # readable already: poll them, do not spin
            timeout = max(0.0, min(waits)) if waits else None
            watch = [listener.sock, *(c for c in pending if c not in partial)]
            try:
                ready, _, _ = select.select(watch, [], [], timeout)
            except (OSError, ValueError) as e:
                raise TransportError(f"listening on {listener.address} failed: {e}", e) from e
            now = time.monotonic()
            if listener.sock in ready:
                for c in listener.drain():
                    if len(pending) >= MAX_PENDING:
                        oldest = min(pending, key=pending.__getitem__)
                        del pending[oldest]
                        partial.discard(oldest)
                        mfd._drop(oldest, "too many connections waiting to be identified")
                    pending[c] = now
            for c in [c for c in pending if c in ready or c in partial]:
                head = peek_now(c)
                if head is None:
                    continue
                if len(head) < 4 and head and (STREAM_MAGIC_BYTES.startswith(head)
                                               or MULTIFD_MAGIC_BYTES.startswith(head)):
                    partial.add(c)
                    continue
                del pending[c]
                partial.discard(c)
                if head == STREAM_MAGIC_BYTES[:4]:
                    found = c
                    break
                if head == MULTIFD_MAGIC_BYTES:
                    mfd.adopt(c)  # QEMU may connect a channel before the main stream
                else:
                    mfd._drop(c, _not_qemu(head))
            for c, t in list(pending.items()):
                if c is not found and t + peer_timeout <= now:
                    del pending[c]
                    partial.discard(c)
                    mfd._drop(c, f"it sent nothing like QEMU's for {peer_timeout:g} s")
            if found is None and accept_timeout is not None and now - start >= accept_timeout:
                raise TransportError(f"no QEMU migration source connected to "
                                     f"{listener.address} within {accept_timeout:g} s")
        # The rest may be channels that have not shown their magic yet.
        with mfd.lock:
            for c, t in pending.items():
                mfd._classify_later(c, t)
            mfd.main_found = True
            mfd.classified.notify_all()
        pending.clear()
        return found
    finally:
        for c in pending:
            with contextlib.suppress(OSError):
                c.close()


def _accept_rest(listener: Listener, mfd: _Multifd, on_error: Callable[[BaseException], None]
                 ) -> None:
    """Accept multifd channels until the listener closes.

    Accepting and counting happen under the multifd lock, so the channel
    count fixed at the first SYNC never misses a connection in flight.
    """
    while not listener.closed and not mfd.failed:
        if not listener.wait_readable(0.2):
            continue
        with mfd.lock:
            for c in listener.drain():
                mfd._classify_later(c)
