"""``fixedram send --postcopy``: a save restored into QEMU by postcopy.

fixedram plays the source side of QEMU's postcopy protocol, so the guest
runs on the destination as soon as its device state is loaded, and its RAM
follows: pages a vCPU faults on are requested on the return path and served
first, read at random from the file; the rest are pushed in the background
in address order. The destination needs ``-incoming defer``, capability
``postcopy-ram`` on and ``mapped-ram`` off; the save may be a mapped-ram
file or a stream (read through its index of each page's last copy).

Main stream, as QEMU 7.2-10.0 sources send it when they start postcopy
without having precopied anything (migration.c ``postcopy_start``)::

    QEVM header, configuration
    OPEN_RETURN_PATH, PING 1, POSTCOPY_ADVISE (page size summary, target page)
    START "ram" (the RAMBlock list)
    [SWITCHOVER_START]          when the save has it (machine types >= 10.0)
    RAM_DISCARD of each whole block
    PING 2, PACKAGED: LISTEN, device FULL sections, PING 3, RUN
    PING 4, PART "ram" (every page once), END "ram", EOF (no vmdesc)

One RAM_DISCARD per block, of all of it, goes before the package (see
:func:`_discard` for why it is needed at all). No page is
ever sent twice: placing a page that is already there fails the
destination (EEXIST from UFFDIO_COPY), so one bitmap per block records what
went out, and requests for pages already sent are answered by nothing.

Every page of every block is sent, data or a ZERO record: a page the
destination never receives reads as zero after the end, but until then a
vCPU touching it waits for a request round trip.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from ..errors import FixedramError, MigrationError, TransportError, UnsupportedFeature
from ..format.constants import TARGET_PAGE_SIZE, Command, SectionType
from ..format.machine import MachineState
from ..format.migfile import MigrationFile, Run
from ..format.primitives import BE32, BE64
from ..format.stream import encode_command
from ..format.writer import BlockSpec, StreamWriter
from ..memory.copy import RunCopier
from ..memory.map import stride_of
from ..save import reads_one_pass
from ..transports.channels import SocketOut
from ..transports.uri import MigrationURI, parse_uri

__all__ = ["PostcopySummary", "check_postcopy_destination", "send_postcopy"]

# Return-path message types (migration.c, enum mig_rp_message_type).
RP_SHUT = 1
RP_PONG = 2
RP_REQ_PAGES_ID = 3
RP_REQ_PAGES = 4
RP_RECV_BITMAP = 5
RP_RESUME_ACK = 6
RP_SWITCHOVER_ACK = 7
RP_NAMES = {RP_SHUT: "SHUT", RP_PONG: "PONG", RP_REQ_PAGES_ID: "REQ_PAGES_ID",
            RP_REQ_PAGES: "REQ_PAGES", RP_RECV_BITMAP: "RECV_BITMAP",
            RP_RESUME_ACK: "RESUME_ACK", RP_SWITCHOVER_ACK: "SWITCHOVER_ACK"}
# QEMU's source refuses longer messages (source_return_path_thread).
MAX_RP_LEN = 512

# The pings QEMU's postcopy_start sends: 2 before the package, 3 inside it
# (its PONG arrives just before the destination runs RUN), 4 after it.
PING_OPEN = 1
PING_BEFORE_PACKAGE = 2
PING_IN_PACKAGE = 3
PING_AFTER_PACKAGE = 4

# Pages pushed between two looks at the request queue: a requested page
# waits behind at most this much background data of ours (plus the socket
# buffer, kept small for the same reason).
PUSH_PAGES = 128
SNDBUF = 512 << 10
# A destination that reads nothing for this long is stuck.
STALL_SECONDS = 60
# After EOF, the destination confirms with SHUT once its listen thread ends.
SHUT_TIMEOUT = 120


@dataclass
class PostcopySummary:
    file: str
    destination: str
    postcopy: bool = True
    running_after_s: float | None = None  # until the destination reached RUN (PONG 3)
    complete_after_s: float | None = None  # until it confirmed the end (SHUT 0)
    pages_requested: int = 0  # pages in all page requests
    requests: int = 0  # page request messages
    pages_sent_on_request: int = 0  # pages that went out because a request named them
    request_latency_p50_ms: float | None = None
    request_latency_p99_ms: float | None = None
    pages_pushed: int = 0  # pages sent in the background (data and zero)
    zero_pages_sent: int = 0
    bytes_sent: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        from ..describe import SCHEMA_VERSION

        return {"schema_version": SCHEMA_VERSION, **asdict(self)}


Progress = Callable[[int], None]


def check_postcopy_destination(dest: str) -> MigrationURI:
    """The socket URI postcopy can go to (it needs QEMU's return path)."""
    if dest == "-":
        raise TransportError("postcopy needs QEMU's return path: send to tcp:HOST:PORT or "
                             "unix:PATH, not - (stdout)")
    u = parse_uri(dest)
    if u.kind not in ("tcp", "unix"):
        raise TransportError(f"postcopy needs QEMU's return path: send to tcp:HOST:PORT or "
                             f"unix:PATH, not {u.kind}:")
    return u


def send_postcopy(path: str, dest: str, *, offset: int | None = None,
                  bandwidth: int | None = None, progress: Progress | None = None,
                  on_total: Callable[[int], None] | None = None) -> PostcopySummary:
    """Restore the save at ``path`` into the QEMU listening at ``dest`` by postcopy.

    :param bandwidth: bytes per second for the background push (QEMU's
        ``max-postcopy-bandwidth``); requested pages are never held back.
    :param progress: called with the bytes of guest RAM sent, per chunk.
    :param on_total: called once with the bytes of guest RAM to send.
    :raise TransportError: the connection failed or broke.
    :raise MigrationError: the destination failed, or asked for what no
        QEMU asks for (a page outside every RAMBlock, a misaligned page).
    """
    u = check_postcopy_destination(dest)
    if bandwidth is not None and bandwidth <= 0:
        raise TransportError("the postcopy bandwidth must be positive")
    if reads_one_pass(path):
        raise UnsupportedFeature("postcopy reads pages in the order the destination asks "
                                 "for them: the save must be an uncompressed file (convert "
                                 "a pipe or a compressed image first)", path=path)
    t0 = time.monotonic()
    s = PostcopySummary(os.path.abspath(path), dest)
    with MigrationFile(path, offset=offset) as mf:
        if not mf.complete:
            raise UnsupportedFeature("the save is incomplete; refusing to send it", path=path,
                                     offset=mf.size)
        for b in mf.blocks:
            if b.page_size != TARGET_PAGE_SIZE:
                raise UnsupportedFeature(f"RAMBlock {b.idstr!r} has {b.page_size}-byte pages; "
                                         "postcopy of huge-page RAMBlocks is not supported",
                                         path=path)
        if on_total is not None:
            on_total(sum(b.used_length for b in mf.blocks))
        src = _Source(mf, u, s, t0, bandwidth, progress)
        src.run()
    s.seconds = round(time.monotonic() - t0, 3)
    return s


@dataclass
class _Request:
    block: int
    first: int
    count: int
    at: float  # when it arrived


class _Block:
    """One RAMBlock's pages as the postcopy source sees them."""

    def __init__(self, index: int, idstr: str, used_length: int, offs: np.ndarray,
                 stride: int) -> None:
        self.index = index
        self.idstr = idstr
        self.used_length = used_length
        self.npages = used_length // TARGET_PAGE_SIZE
        self.offs = offs  # file offset of each page's last copy, 0 = zero page
        self.stride = stride  # distance of consecutive pages' data in the file
        self.sent = np.zeros(self.npages, dtype=bool)
        self.cursor = 0  # the background push is done below this page


class _ReturnPath(threading.Thread):
    """Reads the destination's messages; page requests go to ``requests``."""

    def __init__(self, sock: socket.socket, blocks: list[_Block]) -> None:
        super().__init__(daemon=True, name="fixedram-return-path")
        self.sock = sock
        self.by_name = {b.idstr: b for b in blocks}
        self.requests: queue.Queue[_Request | None] = queue.Queue()
        self.pongs: dict[int, float] = {}
        self.shut: int | None = None
        self.shut_at: float | None = None
        self.error: FixedramError | None = None
        self.closed = False  # the destination closed its side cleanly
        self.stopping = False  # we closed the socket ourselves
        self.done = threading.Event()
        self._last: _Block | None = None

    def run(self) -> None:
        try:
            while self.shut is None:
                head = self._recv(4, at_boundary=True)
                if head is None:
                    self.closed = True
                    return
                typ, ln = struct.unpack(">HH", head)
                if ln > MAX_RP_LEN:
                    raise MigrationError(f"the destination sent a return-path message of "
                                         f"{ln} bytes (at most {MAX_RP_LEN})")
                body = self._recv(ln) if ln else b""
                assert body is not None
                self._handle(typ, body)
        except FixedramError as e:
            if not self.stopping:
                self.error = e
        finally:
            self.done.set()
            self.requests.put(None)  # wake the sender

    def _recv(self, n: int, at_boundary: bool = False) -> bytes | None:
        buf = bytearray(n)
        mv = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = self.sock.recv_into(mv[got:], n - got)
            except OSError as e:
                raise TransportError(f"the return path failed: {e.strerror or e}", e) from e
            if k == 0:
                if got == 0 and at_boundary:
                    return None
                raise TransportError("the destination closed the return path in the middle "
                                     f"of a message ({got} of {n} bytes)")
            got += k
        return bytes(buf)

    def _fixed(self, typ: int, body: bytes, n: int) -> None:
        if len(body) != n:
            raise MigrationError(f"the destination sent {RP_NAMES[typ]} of {len(body)} bytes "
                                 f"(it has {n})")

    def _handle(self, typ: int, body: bytes) -> None:
        now = time.monotonic()
        if typ == RP_SHUT:
            self._fixed(typ, body, 4)
            self.shut_at = now
            self.shut = BE32.unpack(body)[0]
        elif typ == RP_PONG:
            self._fixed(typ, body, 4)
            self.pongs.setdefault(BE32.unpack(body)[0], now)
        elif typ == RP_REQ_PAGES_ID:
            if len(body) < 13 or len(body) != 13 + body[12]:
                raise MigrationError(f"the destination sent REQ_PAGES_ID of {len(body)} bytes "
                                     "that do not match its RAMBlock name's length")
            name = body[13:].decode("latin-1")
            b = self.by_name.get(name)
            if b is None:
                raise MigrationError(f"the destination requested pages of RAMBlock {name!r}, "
                                     "which the save does not have")
            self._last = b
            start, length = struct.unpack(">QI", body[:12])
            self._request(b, start, length, now)
        elif typ == RP_REQ_PAGES:
            self._fixed(typ, body, 12)
            if self._last is None:
                raise MigrationError("the destination requested pages without naming their "
                                     "RAMBlock first")
            start, length = struct.unpack(">QI", body)
            self._request(self._last, start, length, now)
        elif typ == RP_SWITCHOVER_ACK:
            self._fixed(typ, body, 0)  # nothing waits for it: there is no precopy phase
        elif typ in (RP_RECV_BITMAP, RP_RESUME_ACK):
            raise MigrationError(f"the destination sent {RP_NAMES[typ]}, which belongs to "
                                 "postcopy recovery (--resume)")
        else:
            raise MigrationError(f"the destination sent an unknown return-path message "
                                 f"(type {typ})")

    def _request(self, b: _Block, start: int, length: int, now: float) -> None:
        # Refused by name, never served: a wrong range would read another
        # block's (or no block's) bytes from the file.
        if start % TARGET_PAGE_SIZE or length % TARGET_PAGE_SIZE or length == 0:
            raise MigrationError(f"the destination sent a misaligned page request "
                                 f"(0x{start:x}+0x{length:x} in RAMBlock {b.idstr!r})")
        if start + length > b.used_length:
            raise MigrationError(f"the destination requested pages 0x{start:x}+0x{length:x}, "
                                 f"outside RAMBlock {b.idstr!r} (0x{b.used_length:x} bytes)")
        self.requests.put(_Request(b.index, start // TARGET_PAGE_SIZE,
                                   length // TARGET_PAGE_SIZE, now))


class _Source:
    """The sending side: one thread writes everything on the main connection,
    requested pages first, background pages between requests."""

    def __init__(self, mf: MigrationFile, u: MigrationURI, s: PostcopySummary, t0: float,
                 bandwidth: int | None, progress: Progress | None) -> None:
        self.mf = mf
        self.u = u
        self.s = s
        self.t0 = t0
        self.bandwidth = bandwidth
        self.progress = progress
        self.blocks = [_Block(i, b.idstr, b.used_length, b.data_offsets(), stride_of(mf, b))
                       for i, b in enumerate(mf.blocks)]
        self.total_pages = sum(b.npages for b in self.blocks)
        self.pages_out = 0
        self.copier = RunCopier(mf.source, TARGET_PAGE_SIZE, PUSH_PAGES, src_name=mf.path)
        self.latencies: list[float] = []
        self.eof_sent = False

    # -- the whole migration ---------------------------------------------------

    def run(self) -> None:
        self.out = SocketOut(self.u)
        sock = self.out.sock
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                            struct.pack("ll", STALL_SECONDS, 0))
        self.rp = _ReturnPath(sock, self.blocks)
        try:
            self.rp.start()
            try:
                self._migrate()
            except (TransportError, OSError) as e:
                raise self._broken(e) from None
            self._wait_shut()
        finally:
            self.rp.stopping = True
            self.out.close()  # wakes the return-path thread
            self.rp.join(5)
            self.s.bytes_sent = self.out.bytes_out
            self._stats()

    def _migrate(self) -> None:
        state = replace(MachineState.from_file(self.mf).with_mapped_ram(False),
                        switchover_start=False)
        specs = BlockSpec.of(self.mf.blocks)
        self.w = StreamWriter(self.out.write, state, specs)
        summary = 0
        for b in specs:
            summary |= b.page_size
        advise = BE64.pack(summary) + BE64.pack(TARGET_PAGE_SIZE)
        self.w.begin(commands=encode_command(Command.OPEN_RETURN_PATH)
                     + _ping(PING_OPEN) + encode_command(Command.POSTCOPY_ADVISE, advise))
        head = b""
        if MachineState.from_file(self.mf).switchover_start:
            head += encode_command(Command.SWITCHOVER_START)
        for b in specs:
            head += _discard(b.idstr, b.used_length)
        package = (encode_command(Command.POSTCOPY_LISTEN) + state.device_sections()
                   + _ping(PING_IN_PACKAGE) + encode_command(Command.POSTCOPY_RUN))
        head += (_ping(PING_BEFORE_PACKAGE) + encode_command(Command.PACKAGED,
                                                             BE32.pack(len(package)))
                 + package + _ping(PING_AFTER_PACKAGE))
        self.w.raw(head)
        self.out.flush()
        self.w.begin_part()
        self._pages()
        self.w.end_part()
        # QEMU's END "ram" carries the pages still dirty; none are left here.
        self.w.begin_part(end=True)
        self.w.end_part()
        self.w.raw(bytes([SectionType.EOF]))
        self.out.flush()
        self.eof_sent = True

    def _pages(self) -> None:
        """Every page once: requests first, the background push in between."""
        rq = self.rp.requests
        bi = 0
        bg_bytes = 0
        bg_t0 = time.monotonic()
        while bi < len(self.blocks):
            self._serve(rq)
            if self.bandwidth:
                due = bg_t0 + bg_bytes / self.bandwidth - time.monotonic()
                if due > 0:  # rate-limited: wait for a request instead
                    with contextlib.suppress(queue.Empty):
                        self._answer(rq.get(timeout=due))
                    continue
            b = self.blocks[bi]
            if b.cursor >= b.npages:
                bi += 1
                continue
            end = min(b.cursor + PUSH_PAGES, b.npages)
            before = self.out.bytes_out
            n = self._send_range(b, b.cursor, end)
            b.cursor = end
            self.s.pages_pushed += n
            self.out.flush()
            bg_bytes += self.out.bytes_out - before

    def _serve(self, rq: queue.Queue[_Request | None]) -> None:
        while True:
            try:
                r = rq.get_nowait()
            except queue.Empty:
                return
            self._answer(r)

    def _answer(self, r: _Request | None) -> None:
        if r is None:  # the return path ended: an error, or SHUT before the end
            self._check_rp()
            raise TransportError("the destination closed the return path")
        b = self.blocks[r.block]
        self.s.requests += 1
        self.s.pages_requested += r.count
        # In pieces: a request may span a whole block (a huge destination
        # page size), and each piece is read into one reused buffer.
        for a in range(r.first, r.first + r.count, PUSH_PAGES):
            self.s.pages_sent_on_request += self._send_range(
                b, a, min(a + PUSH_PAGES, r.first + r.count))
        self.out.flush()
        self.latencies.append(time.monotonic() - r.at)

    def _send_range(self, b: _Block, a: int, e: int) -> int:
        """Records for the pages of [a, e) not sent yet; returns how many.

        Data runs are read with one positional read each (consecutive in the
        file: mapped-ram, or a stream's consecutive records); pages the save
        holds no data for go as ZERO records.
        """
        todo = np.flatnonzero(~b.sent[a:e]) + a
        if todo.size == 0:
            return 0
        offs = b.offs[todo]
        data = offs > 0
        zero = todo[~data]
        if zero.size:
            self.w.zeros(b.index, zero)
            self.s.zero_pages_sent += int(zero.size)
        idx, o = todo[data], offs[data]
        if idx.size:
            brk = np.flatnonzero((np.diff(idx) != 1) | (np.diff(o) != b.stride)) + 1
            bounds = np.concatenate(([0], brk, [idx.size])).tolist()
            for k in range(len(bounds) - 1):
                lo, hi = bounds[k], bounds[k + 1]
                n = hi - lo
                run = Run(int(idx[lo]), n, int(o[lo]), b.stride if n > 1 else TARGET_PAGE_SIZE)
                self.w.pages(b.index, run.first, self.copier.read_run(run))
        b.sent[todo] = True
        self.pages_out += int(todo.size)
        if self.progress is not None:
            self.progress(int(todo.size) * TARGET_PAGE_SIZE)
        return int(todo.size)

    # -- the end ---------------------------------------------------------------

    def _wait_shut(self) -> None:
        if not self.rp.done.wait(SHUT_TIMEOUT):
            raise TransportError(f"the destination did not confirm the end of the migration "
                                 f"within {SHUT_TIMEOUT} s of EOF (see its log)")
        self._check_rp()
        if self.rp.shut is None:
            raise TransportError("the destination closed the return path without confirming "
                                 "the end of the migration (see its log)")

    def _check_rp(self) -> None:
        rp = self.rp
        if rp.error is not None:
            raise rp.error
        if rp.shut is not None:
            if rp.shut != 0:
                raise self._shut_error(rp.shut)
            if not self.eof_sent:
                raise MigrationError("the destination ended the migration before every page "
                                     "was sent (SHUT 0 before EOF)")

    def _broken(self, e: BaseException) -> FixedramError:
        """One error naming what happened when the connection failed."""
        # The return path usually knows more (the destination's own SHUT, or
        # a refused request): give it a moment to finish reading.
        self.rp.done.wait(1)
        if self.rp.error is not None and not isinstance(self.rp.error, TransportError):
            return self.rp.error
        if self.rp.shut is not None and self.rp.shut != 0:
            return self._shut_error(self.rp.shut)
        why = (e.strerror or str(e)) if isinstance(e, OSError) else str(e)
        if isinstance(e, TransportError) and isinstance(e.exc, OSError):
            why = e.exc.strerror or why
            if isinstance(e.exc, BlockingIOError):
                why = f"it read nothing for {STALL_SECONDS} s"
        if PING_IN_PACKAGE not in self.rp.pongs:
            return TransportError(f"{self.u.text}: the destination closed the connection "
                                  f"before postcopy started (does it have capability "
                                  f"postcopy-ram on and mapped-ram off? see its log): {why}")
        return TransportError(f"{self.u.text}: the connection broke during postcopy after "
                              f"{self.pages_out} of {self.total_pages} pages (the guest on the "
                              f"destination is lost; see its log): {why}")

    def _shut_error(self, status: int) -> MigrationError:
        if PING_IN_PACKAGE not in self.rp.pongs:
            return MigrationError(f"the destination refused the migration before postcopy "
                                  f"started (it answered SHUT {status}; does it have "
                                  f"capability postcopy-ram on and mapped-ram off? see its log)")
        return MigrationError(f"the destination failed to load the migration during postcopy "
                              f"(it answered SHUT {status}; the guest there is lost; see its "
                              f"log)")

    def _stats(self) -> None:
        s, rp = self.s, self.rp
        run_at = rp.pongs.get(PING_IN_PACKAGE)
        if run_at is not None:
            s.running_after_s = round(run_at - self.t0, 3)
        if rp.shut == 0 and rp.shut_at is not None and self.eof_sent:
            s.complete_after_s = round(rp.shut_at - self.t0, 3)
        if self.latencies:
            ms = np.array(self.latencies) * 1000
            s.request_latency_p50_ms = round(float(np.percentile(ms, 50)), 3)
            s.request_latency_p99_ms = round(float(np.percentile(ms, 99)), 3)


def _discard(idstr: str, length: int) -> bytes:
    """RAM_DISCARD of a whole block: version 0, the name (NUL-ended), one range.

    Needed although ADVISE already emptied the block: a LISTEN that comes
    without any DISCARD before it (QEMU 10.0, ``loadvm_postcopy_handle_listen``)
    runs the discard setup after setting LISTENING, and that setup sets the
    state back to DISCARD; the listen thread then loads RAM the precopy way,
    touching missing pages itself, and waits forever for them.
    """
    name = idstr.encode()
    return encode_command(Command.POSTCOPY_RAM_DISCARD,
                          bytes([0, len(name)]) + name + b"\0" + BE64.pack(0) + BE64.pack(length))


def _ping(n: int) -> bytes:
    return encode_command(Command.PING, BE32.pack(n))
