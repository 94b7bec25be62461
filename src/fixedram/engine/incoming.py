"""Incoming migration: load a stream or a mapped-ram file into a built-in guest.

``migrate-incoming`` semantics: the destination's capabilities must match the
ones recorded in the stream (QEMU's check and message); a sequential stream
from any transport is parsed by :func:`~fixedram.format.walker.walk_stream`
with a sink that copies each page into guest RAM; a mapped-ram file is read
by ``multifd-channels`` threads that ``preadv`` coalesced runs straight into
guest memory (O_DIRECT with ``direct-io``). Pages whose bit is clear are not
touched: the destination guest is fresh, so they are already zero.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import queue
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO

from ..errors import CapabilityError, FixedramError, MigrationError, TransportError
from ..format.constants import Command
from ..format.migfile import MigrationFile, Run
from ..format.primitives import ByteReader
from ..format.ram import RamStreamState
from ..format.stream import read_header
from ..format.walker import DeviceSection, StreamEvents, walk_stream
from ..transports.channels import InChannel, open_incoming
from ..transports.uri import MigrationURI, parse_uri
from .capabilities import MigrationConfig, capability_mismatch
from .guest import DEVICE_NAME, PAGE, BuiltinGuest
from .lazy import LazyRAM, open_lazy, prefault

__all__ = ["Incoming", "load_file", "load_stream"]

_ZERO = bytes(PAGE)


class _Replay:
    """A pipe/socket reader whose first bytes can be read twice (header check)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.rec: bytearray | None = bytearray()
        self.pre = b""

    def read(self, n: int = -1) -> bytes:
        if self.pre:
            b, self.pre = self.pre[:n], self.pre[n:]
            return b
        b = self.f.read(n)
        if self.rec is not None:
            self.rec += b
        return b

    def rewind(self) -> None:
        assert self.rec is not None
        self.pre, self.rec = bytes(self.rec), None

    def seekable(self) -> bool:
        return False


class _GuestLoader(StreamEvents):
    """RAM sink + events for :func:`walk_stream`: copy pages and devices into the guest."""

    def __init__(self, guest: BuiltinGuest, on_page: Callable[[], None] | None = None) -> None:
        self.g = guest
        self.map: list[Any] = []
        self.pages = 0
        self.on_page = on_page

    def ram_blocks(self, state: RamStreamState) -> None:
        self.map = [_match_block(self.g, rec.idstr, rec.used_length).mm for rec in state.blocks]

    def page(self, block: int, page_index: int, r: ByteReader) -> None:
        off = page_index * PAGE
        self.map[block][off:off + PAGE] = r.view(PAGE, "page data")
        self.pages += 1
        if self.on_page is not None and not self.pages & 255:
            self.on_page()

    def zero(self, block: int, page_index: int) -> None:
        off = page_index * PAGE
        self.map[block][off:off + PAGE] = _ZERO

    def device(self, dev: DeviceSection, r: ByteReader) -> None:
        data = r.read(dev.data_length, f"device section {dev.idstr!r}")
        _load_device(self.g, dev, data)


def _match_block(g: BuiltinGuest, idstr: str, length: int) -> Any:
    for b in g.blocks:
        if b.idstr == idstr:
            if b.size != length:
                raise MigrationError(f"Length mismatch: {idstr}: 0x{length:x} in != "
                                     f"0x{b.size:x}: Invalid argument")
            return b
    raise MigrationError(f'Unknown ramblock "{idstr}", cannot accept migration')


def _load_device(g: BuiltinGuest, dev: DeviceSection, data: bytes) -> None:
    if dev.idstr != DEVICE_NAME or dev.instance_id != 0:
        raise MigrationError(f"Unknown savevm section or instance '{dev.idstr}' "
                             f"{dev.instance_id}. Make sure that your current VM setup matches "
                             "your saved VM setup, including any hotplugged devices")
    g.load_device_state(data)


def load_stream(f: BinaryIO, guest: BuiltinGuest, cfg: MigrationConfig, name: str,
                start: int = 0, on_page: Callable[[], None] | None = None) -> int:
    """Load a sequential stream from a file object (pipe, socket or file)."""
    return _load_stream(f, guest, cfg, name, start, on_page)[0]


def _load_stream(f: BinaryIO, guest: BuiltinGuest, cfg: MigrationConfig, name: str,
                 start: int = 0, on_page: Callable[[], None] | None = None
                 ) -> tuple[int, Any]:
    """:func:`load_stream`, also returning the walker's summary (its commands)."""
    seekable = False
    with contextlib.suppress(AttributeError, OSError, ValueError):
        seekable = f.seekable()
    if seekable:
        r = ByteReader(f, name, start=start)
        caps = read_header(r).capabilities
        f.seek(start)
        src: Any = f
    else:
        rp = _Replay(f)
        caps = read_header(ByteReader(rp, name, start=start, bufsize=4096)).capabilities
        rp.rewind()
        src = rp
    capability_mismatch(cfg.caps, caps)
    loader = _GuestLoader(guest, on_page)
    summary = walk_stream(ByteReader(src, name, start=start), loader, loader)
    if not summary.complete:
        raise MigrationError(f"{name}: stream ended before EOF")
    return loader.pages, summary


def load_file(path: str, guest: BuiltinGuest, cfg: MigrationConfig, offset: int = 0,
              progress: Callable[[int], None] | None = None) -> int:
    """Load a ``file:`` migration: mapped-ram in parallel, a stream through the walker."""
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        hdr = read_header(ByteReader(f, path, start=offset))
    capability_mismatch(cfg.caps, hdr.capabilities)
    if "mapped-ram" not in hdr.capabilities:
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            return load_stream(f, guest, cfg, path, offset,
                               on_page=(lambda: progress(256 * PAGE)) if progress else None)
    return _load_mapped(path, guest, cfg, offset, progress)


def _load_mapped(path: str, guest: BuiltinGuest, cfg: MigrationConfig, offset: int,
                 progress: Callable[[int], None] | None) -> int:
    with MigrationFile(path, offset=offset) as mf:
        if not mf.complete:
            raise MigrationError(f"{path}: the mapped-ram file is incomplete (no EOF)")
        jobs: list[tuple[memoryview, Run]] = []
        touched: list[Any] = []
        for fb in mf.blocks:
            gb = _match_block(guest, fb.idstr, fb.used_length)
            touched.append(gb)
            for run in fb.runs(max_pages=256):
                jobs.append((gb.view(run.first, run.count), run))
        # Huge pages would fault (zero) 2 MiB for every run of a sparse save, the
        # whole of RAM when runs are spread: load in small pages, then allow them again.
        for gb in touched:
            with contextlib.suppress(OSError, AttributeError):
                gb.mm.madvise(mmap.MADV_NOHUGEPAGE)
        nch = cfg.channels
        flags = os.O_RDONLY | (os.O_DIRECT if cfg.direct_io else 0)
        fds: list[int] = []
        try:
            try:
                fds = [os.open(path, flags) for _ in range(nch)]
            except OSError as e:
                raise TransportError(f"{path}: cannot open a multifd channel: "
                                     f"{e.strerror or e}", e) from e
            _parallel_reads(fds, jobs, path, progress)
        finally:
            for fd in fds:
                os.close(fd)
            for gb in touched:
                with contextlib.suppress(OSError, AttributeError):
                    gb.mm.madvise(mmap.MADV_HUGEPAGE)
        for dev in mf.sections:
            data = mf.source.pread(dev.data_length, dev.data_offset)
            _load_device(guest, dev, data)
        return sum(run.count for _, run in jobs)


def _parallel_reads(fds: list[int], jobs: list[tuple[memoryview, Run]], path: str,
                    progress: Callable[[int], None] | None) -> None:
    q: queue.SimpleQueue[tuple[memoryview, Run] | None] = queue.SimpleQueue()
    for j in jobs:
        q.put(j)
    errors: list[BaseException] = []

    def worker(i: int, fd: int) -> None:
        while not errors:
            job = q.get()
            if job is None:
                return
            mv, run = job
            try:
                # Fault the run in with one call (ctypes drops the GIL): far cheaper
                # than a fault per page inside preadv's copy.
                prefault(mv)
                got = 0
                while got < len(mv):
                    k = os.preadv(fd, [mv[got:]], run.file_offset + got)
                    if k == 0:
                        raise MigrationError(f"multifd recv ({i}): read 0x{got:x}, expected "
                                             f"0x{len(mv):x}")
                    got += k
            except BaseException as e:
                errors.append(e)
                return
            if progress is not None:
                progress(len(mv))

    threads = [threading.Thread(target=worker, args=(i, fd), daemon=True,
                                name=f"multifdrecv_{i}") for i, fd in enumerate(fds)]
    for _ in threads:
        q.put(None)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        e = errors[0]
        if isinstance(e, FixedramError):
            raise e
        raise MigrationError(f"{path}: {e}", e)


class Incoming:
    """``migrate-incoming URI`` into ``guest``: listen at once, load in a thread.

    States as QEMU's destination: ``setup`` when the command is issued,
    ``active`` once the stream flows, then ``completed`` or ``failed``. On
    completion the guest runs (RESUME, before MIGRATION completed, as QEMU
    orders them) when ``autostart``, else it is ``paused``.

    :param listen: bind/open the transport now (False: call :meth:`listen`).
    :param on_event: (name, data) for MIGRATION and RESUME.
    :param on_failed: called in the loading thread after a failure (the QMP
        guest exits there when exit-on-error is on).
    :param on_note: told, in one line, why a lazy load runs eagerly.

    With ``mapped-ram`` and ``postcopy-ram`` on and a ``file:`` URI the load
    is lazy (QEMU master's fast snapshot load, :mod:`fixedram.engine.lazy`):
    ``active`` while RAM is mapped and the devices load, ``postcopy-active``
    (and RESUME) once the guest can run, ``completed`` once every page is
    resident. ``t_running`` is when the guest could run, eager or lazy.
    """

    def __init__(self, guest: BuiltinGuest, config: MigrationConfig, uri: str | MigrationURI,
                 *, autostart: bool = True, listen: bool = True,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None,
                 on_failed: Callable[[Incoming], None] | None = None,
                 on_note: Callable[[str], None] | None = None) -> None:
        self.g = guest
        self.cfg = config.copy()
        self.uri = parse_uri(uri) if isinstance(uri, str) else uri
        self.cfg.check_transport(self.uri.kind, self.uri.seekable)
        why = self.cfg.unsupported_incoming(self.uri.kind)
        if why:
            raise CapabilityError(why)
        self.autostart = autostart
        self.on_event = on_event
        self.on_failed = on_failed
        self.status = "none"
        self.error: str | None = None
        self.exc: BaseException | None = None
        self.pages = 0
        self.t_start = self.t_end = self.t_running = 0.0
        self.on_note = on_note
        self.lazy: LazyRAM | None = None
        self.ch: InChannel = open_incoming(self.uri)
        self.g.stop("inmigrate")
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        if listen:
            self.listen()

    def listen(self) -> None:
        """Bind the socket (or open the file) now, as the command is answered."""
        self.ch.listen()

    def _set(self, s: str) -> None:
        self.status = s
        if self.on_event is not None:
            self.on_event("MIGRATION", {"status": s})

    def start(self) -> Incoming:
        self._thread = threading.Thread(target=self._run, name="incoming", daemon=True)
        self._thread.start()
        return self

    def run(self) -> Incoming:
        self._run()
        if self.status != "completed":
            if isinstance(self.exc, FixedramError):
                raise self.exc
            raise MigrationError(self.error or "incoming migration failed")
        return self

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def _run(self) -> None:
        self.t_start = time.monotonic()
        try:
            if self.status != "setup":
                self._set("setup")
            if self.uri.kind == "file":
                self._set("active")
                if self.cfg.caps["postcopy-ram"] and self.cfg.caps["mapped-ram"]:
                    self.lazy = open_lazy(self.ch.load_path, self.g, self.cfg, self.uri.offset,
                                          self._note)
                if self.lazy is None:
                    self.pages = load_file(self.ch.load_path, self.g, self.cfg, self.uri.offset)
            else:
                f = self.ch.open()
                self._set("active")
                self.pages, summary = _load_stream(f, self.g, self.cfg, self.uri.text)
                if any(cmd == Command.OPEN_RETURN_PATH for _, cmd, _ in summary.commands):
                    self._send_shut(0)
            lazy = self.lazy
            if lazy is not None:
                # QEMU's destination order: postcopy-active, RESUME, ..., completed.
                self.pages = lazy.pages
                self._set("postcopy-active")
                self._start_guest()
                lazy.start()
                lazy.wait()
                if lazy.error is not None:
                    raise lazy.error
                self.t_end = lazy.t_done
            else:
                self._start_guest()
                self.t_end = self.t_running  # eager: runnable and complete at once
            self._set("completed")
        except BaseException as e:
            if self.lazy is not None:
                self.lazy.stop()  # a signal or a failure: no thread outlives the load
            self.t_end = time.monotonic()
            self.exc = e
            self.error = str(e) or type(e).__name__
            self._send_shut(1)  # a source waiting on its return path learns it failed
            self._set("failed")
            if self.on_failed is not None:
                self.on_failed(self)
        finally:
            if self.lazy is not None:
                self.lazy.close()
            self.ch.close()
            self._done.set()

    def _start_guest(self) -> None:
        self.t_running = time.monotonic()
        self.g.clear_dirty()
        if self.autostart:
            self.g.cont()
            if self.on_event is not None:
                self.on_event("RESUME", {})
        else:
            self.g.status = "paused"

    def _note(self, text: str) -> None:
        if self.on_note is not None:
            self.on_note(text)

    def _send_shut(self, status: int) -> None:
        """The return path's SHUT message (QEMU's destination sends it when
        the source opened the return path)."""
        conn = self.ch.connection
        if conn is None:
            return
        with contextlib.suppress(OSError):
            conn.sendall(struct.pack(">HHI", 1, 4, status))

    def query(self) -> dict[str, Any]:
        """``query-migrate`` on a destination: QEMU 10.0 reports the state, the
        listening addresses and the error, nothing else."""
        out: dict[str, Any] = {"status": self.status}
        if isinstance(self.ch.address, tuple):
            host = str(self.ch.address[0])
            family = "ipv6" if ":" in host else "ipv4"  # QEMU says which
            out["socket-address"] = [{"type": "inet", "host": host,
                                      "port": str(self.ch.address[1]), family: True}]
        elif isinstance(self.ch.address, str):
            out["socket-address"] = [{"type": "unix", "path": self.ch.address}]
        if self.status == "failed" and self.error:
            out["error-desc"] = self.error
        return out
