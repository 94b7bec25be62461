"""Guest RAM of a one-pass input (a pipe, a compressed image as it is decoded):
extracted, or compared with a file, as the pages arrive.

Each page is written at its final offset as it arrives, so a live stream's
later copy of a page overwrites the earlier one in place (last copy wins)
and a page re-sent as a ZERO record becomes a hole again. The outputs are
those of :mod:`fixedram.memory.extract` (a raw set with ``index.json``, or a
guest-physical image), built under temporary names and renamed only when
the stream was read to its end. Memory stays at a few bytes per guest page
and the reader's buffers, however long the stream.

An ELF core's notes (the vCPUs' registers, from device state at the end of
the stream, and the guest's VMCOREINFO note) are known last: its LOAD data
are written as they arrive after room kept for the headers and notes
(:data:`~fixedram.memory.elfcore.ONE_PASS_NOTE_ROOM`), which are written at
the end. So it needs an output file it can seek in, not standard output.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import IncompleteSave, InputError, OutputError
from ..format.sequential import OnePassFile
from ..format.walker import BlockFacts, Save
from ..io.runs import index_runs
from ..output import AtomicOutput, output_error, staged_directory
from .copy import WRITEBACK_BYTES
from .elfcore import (
    EM_X86_64,
    ONE_PASS_NOTE_ROOM,
    ElfCore,
    device_vmcoreinfo,
    pages_with_name,
    register_notes,
    vmcoreinfo_in_pages,
)
from .elfcore import log as elfcore_log
from .extract import sha256_fd, unique_names, write_index
from .layout import physical_ranges, x86_firmware_ranges

__all__ = ["extract_one_pass"]

_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2
# Batches queued for the writing thread (each up to about 1 MiB of pages).
WRITE_QUEUE = 8
# Block files of a raw set kept open at once (a stream may declare thousands
# of RAMBlocks; the descriptor limit is often 1024).
OPEN_BLOCK_FILES = 64
_WRITE, _PUNCH = 0, 1


@dataclass(frozen=True)
class _Segment:
    """Pages [lo, hi) of a block go to output ``file`` at ``base + page * page_size``.

    ``file`` is what :meth:`_Placed._fd` turns into a descriptor: the
    descriptor itself, or a raw set's block number (its file is opened when
    written to).
    """

    lo: int
    hi: int
    file: int
    base: int


def _direct(fd: int, on: bool) -> bool:
    """Set or clear O_DIRECT on ``fd``; False when the file system refuses it."""
    try:
        fl = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, fl | os.O_DIRECT if on else fl & ~os.O_DIRECT)
    except OSError:
        return False
    return True


def _aligned(n: int) -> mmap.mmap:
    """``n`` zero bytes at a page-aligned address (O_DIRECT needs aligned memory)."""
    return mmap.mmap(-1, n)


class _Punch:
    """Holes where a page's data became zero; zeros written where holes cannot be made."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._fallocate = getattr(libc, "fallocate", None)
        if self._fallocate is not None:
            self._fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                                        ctypes.c_int64]
        self._zeros: mmap.mmap | bytes = b""

    def __call__(self, fd: int, off: int, n: int) -> None:
        if self._fallocate is not None:
            if self._fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, off, n) == 0:
                return
            err = ctypes.get_errno()
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise OSError(err, os.strerror(err))
            self._fallocate = None
        if len(self._zeros) < n:
            self._zeros = _aligned(n)
        done = 0
        while done < n:
            done += os.pwrite(fd, memoryview(self._zeros)[:n - done], off + done)


class _Placed:
    """A :class:`~fixedram.format.sequential.PageTarget` writing each block's
    pages through its segments.

    Writes and hole punches go, in order, to a thread, so the disk writes of
    one batch overlap the parsing (and decompression) of the next. Outputs
    are written with O_DIRECT where the file system takes it: every page is
    whole and aligned, and copying 1 GiB into the page cache and writing it
    back was measured at 0.2-1.1 s of CPU against 0.05 s direct, on a
    machine whose other core is decompressing. Elsewhere written ranges are
    handed to writeback as the copy goes, as in
    :class:`~fixedram.memory.copy.RunCopier`, so the final fsync has little
    left to wait for.
    """

    def __init__(self) -> None:
        self.segments: list[list[_Segment]] = []
        self.ps = 4096
        self.punch = _Punch()
        self.bytes_written = 0
        self._q: queue.Queue[tuple[int, int, Any, int] | None] = queue.Queue(WRITE_QUEUE)
        # Page buffers handed back by the writing thread, reused (fresh large
        # arrays cost a page fault per page; measured a fifth of the pass).
        self._free: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        self._err: BaseException | None = None
        self._t: threading.Thread | None = None
        self._dirty: dict[int, tuple[int, int]] = {}  # file -> range written since writeback
        self._is_direct: set[int] = set()  # files written with O_DIRECT

    def direct(self, fd: int) -> None:
        """Write ``fd`` with O_DIRECT if its file system allows it."""
        if _direct(fd, True):
            self._is_direct.add(fd)

    def _fd(self, file: int) -> int:
        """The descriptor of a segment's ``file`` (called by the writing thread)."""
        return file

    def begin(self, f: Save) -> None:
        raise NotImplementedError

    def _each(self, bi: int, idx: np.ndarray) -> list[tuple[_Segment, int, int, int]]:
        """(segment, position in idx, count, first page) for each run inside a segment."""
        out = []
        segs = self.segments[bi]
        for a, n in index_runs(idx):
            first = int(idx[a])
            end = first + n
            for s in segs:
                lo, hi = max(first, s.lo), min(end, s.hi)
                if lo < hi:
                    out.append((s, a + lo - first, hi - lo, lo))
        return out

    # -- the writing thread --------------------------------------------------

    def _put(self, item: tuple[int, int, Any, int]) -> None:
        if self._err is not None:
            raise self._err
        if self._t is None:
            self._t = threading.Thread(target=self._loop, name="fixedram-extract-writer",
                                       daemon=True)
            self._t.start()
        self._q.put(item)

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            if self._err is not None:
                continue
            op, file, data, off = item
            try:
                fd = self._fd(file)
                if op == _WRITE:
                    buf, n = data
                    mv = memoryview(buf[:n]).cast("B")
                    done = 0
                    while done < len(mv):
                        try:
                            done += os.pwrite(fd, mv[done:], off + done)
                        except OSError as e:
                            # Unaligned for this device (a short write, a
                            # small page size): go on through the page cache.
                            if e.errno != errno.EINVAL or file not in self._is_direct:
                                raise
                            self._buffered(file, fd)
                    if file not in self._is_direct:
                        self._writeback(file, fd, off, off + len(mv))
                    self._free.put(buf)
                else:
                    self.punch(fd, off, data)
            except BaseException as e:  # re-raised in the parsing thread
                self._err = e

    def _buffered(self, file: int, fd: int) -> None:
        """Write ``file`` through the page cache from now on."""
        self._is_direct.discard(file)
        _direct(fd, False)

    def _writeback(self, file: int, fd: int, lo: int, hi: int, force: bool = False) -> None:
        a, b = self._dirty.get(file, (lo, hi))
        a, b = min(a, lo), max(b, hi)
        if b - a < WRITEBACK_BYTES and not force:
            self._dirty[file] = (a, b)
            return
        self._dirty.pop(file, None)
        with contextlib.suppress(OSError):  # starts writeback; the data are unaffected
            os.posix_fadvise(fd, a, b - a, os.POSIX_FADV_DONTNEED)

    def drain(self) -> None:
        """Wait for every queued write; re-raise a write error."""
        if self._t is not None:
            self._q.put(None)
            self._t.join()
            self._t = None
        if self._err is not None:
            err, self._err = self._err, None
            raise err

    # -- PageTarget ----------------------------------------------------------

    def pages(self, bi: int, idx: np.ndarray, data: np.ndarray) -> None:
        ps = self.ps
        for s, a, n, first in self._each(bi, idx):
            # A copy: ``data`` is valid only during this call.
            buf = self._buffer(n)
            np.copyto(buf[:n], data[a:a + n])
            self._arrived(bi, first, buf[:n])
            self._put((_WRITE, s.file, (buf, n), s.base + first * ps))
            self.bytes_written += n * ps

    def _arrived(self, bi: int, first: int, rows: np.ndarray) -> None:
        """Pages ``first``... of block ``bi`` now hold ``rows`` (before they are written)."""

    def _buffer(self, n: int) -> np.ndarray:
        """A free (n or more, page_size) buffer: one handed back, or a new one."""
        try:
            buf = self._free.get_nowait()
        except queue.Empty:
            buf = None
        if buf is None or buf.shape[0] < n or buf.shape[1] != self.ps:
            rows = max(n, 256)
            buf = np.frombuffer(_aligned(rows * self.ps), dtype=np.uint8).reshape(rows, self.ps)
        return buf

    def zeros(self, bi: int, idx: np.ndarray, had_data: np.ndarray) -> None:
        if not had_data.any():
            return  # never written, or a hole already
        stale = idx[had_data]
        if stale.size > 1 and not bool((stale[1:] > stale[:-1]).all()):
            stale = np.unique(stale)
        for s, _a, n, first in self._each(bi, stale):
            self._put((_PUNCH, s.file, n * self.ps, s.base + first * self.ps))


class _RawSet(_Placed):
    """One sparse file per RAMBlock in a new directory, and ``index.json``.

    Every file is created at the start (a name that cannot be made fails
    before any page is read) and opened again when written to, with at most
    :data:`OPEN_BLOCK_FILES` open at once, the least recently written closed
    first: thousands of blocks stay within the descriptor limit, and the
    usual handful are each opened once.
    """

    def __init__(self, d: str) -> None:
        super().__init__()
        self.dir = d
        self.names: list[str] = []
        self.paths: list[str] = []
        self._open: OrderedDict[int, int] = OrderedDict()  # block -> descriptor, LRU first
        self._tried: set[int] = set()  # blocks whose O_DIRECT was tried once

    def begin(self, f: Save) -> None:
        self.names = unique_names(f)
        for b, name in zip(f.blocks, self.names, strict=True):
            path = os.path.join(self.dir, name)
            if os.path.dirname(path) != self.dir:  # defence in depth
                raise OutputError(f"block name {b.idstr!r} would leave the output directory")
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise output_error(path, e) from e
            os.close(fd)
            self.paths.append(path)
            self.segments.append([_Segment(0, b.npages, b.index, 0)])
            self.ps = b.page_size

    def _fd(self, file: int) -> int:
        fd = self._open.get(file)
        if fd is not None:
            self._open.move_to_end(file)
            return fd
        while len(self._open) >= OPEN_BLOCK_FILES:
            old, ofd = self._open.popitem(last=False)
            if old in self._dirty:
                self._writeback(old, ofd, *self._dirty[old], force=True)
            os.close(ofd)
        try:
            fd = os.open(self.paths[file], os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            raise output_error(self.paths[file], e) from e
        self._open[file] = fd
        # O_DIRECT is tried once per file; one that fell back stays buffered.
        if file not in self._tried or file in self._is_direct:
            self._tried.add(file)
            if _direct(fd, True):
                self._is_direct.add(file)
            else:
                self._is_direct.discard(file)
        return fd

    def finish(self, f: Save) -> dict[str, object]:
        self.drain()
        for b in f.blocks:
            fd = self._fd(b.index)  # the writing thread has stopped
            os.ftruncate(fd, b.used_length)
            os.fsync(fd)
        # A compressed image is a file, hashed as it is on disk; a pipe's bytes
        # are gone once walked, so it has no sha256.
        from ..save import random_access_path

        real = random_access_path(f.input_path)
        digest = None
        if real is not None:
            try:
                fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise InputError(f.input_path, e) from e
            try:
                digest = sha256_fd(fd, f.input_path)
            finally:
                os.close(fd)
        return write_index(self.dir, f, self.names, digest)

    def close(self) -> None:
        with contextlib.suppress(BaseException):
            self.drain()  # the thread must not write into a closed descriptor
        for fd in self._open.values():
            os.close(fd)
        self._open.clear()


class _Physical(_Placed):
    """A guest-physical image: main RAM below and above the 4 GiB hole."""

    def __init__(self, out: AtomicOutput) -> None:
        super().__init__()
        self.out = out
        self.size = 0

    def begin(self, f: Save) -> None:
        self.direct(self.out.fd)
        self.segments = [[] for _ in f.blocks]
        for r in physical_ranges(f):
            ps = r.block.page_size
            lo = r.block_offset // ps
            self.segments[r.block.index].append(
                _Segment(lo, lo + r.length // ps, self.out.fd, r.gpa - lo * ps))
            self.size = max(self.size, r.gpa + r.length)
            self.ps = ps


class _Elf(_Placed):
    """An ELF core, as :func:`~fixedram.memory.extract.extract_elf` makes one of
    a file: the same notes and LOADs, the data further into the file.

    Each LOAD's pages are written at their final offsets as they arrive, after
    :data:`~fixedram.memory.elfcore.ONE_PASS_NOTE_ROOM` bytes kept for the
    notes; the headers and notes are written last, from the device state and
    the written output. Main RAM pages holding a ``VMCO`` word are marked as
    they arrive, so the VMCOREINFO note is looked for in those pages of the
    output only, not in a second read of RAM.
    """

    def __init__(self, out: AtomicOutput) -> None:
        super().__init__()
        self.out = out
        self.core: ElfCore[BlockFacts] | None = None
        self._main = -1  # the block whose pages are looked at for the note
        self._hits: list[np.ndarray] = []  # its pages that held a VMCO word in some copy
        self._nhits = 0
        self._kept = 0  # hits after the last compaction

    def begin(self, f: Save) -> None:
        self.direct(self.out.fd)
        ram = physical_ranges(f)
        loads = sorted(ram + x86_firmware_ranges(f), key=lambda r: r.gpa)
        self.core = ElfCore(EM_X86_64, b"", loads, ram, reserved=ONE_PASS_NOTE_ROOM)
        self.segments = [[] for _ in f.blocks]
        for r, off in self.core.placed():
            ps = r.block.page_size
            lo = r.block_offset // ps
            self.segments[r.block.index].append(
                _Segment(lo, lo + r.length // ps, self.out.fd, off - lo * ps))
            self.ps = ps
        self._main = ram[0].block.index

    @property
    def size(self) -> int:
        assert self.core is not None
        return self.core.size

    def _arrived(self, bi: int, first: int, rows: np.ndarray) -> None:
        if bi != self._main:
            return
        hit = pages_with_name(rows)
        if not hit.any():
            return
        self._hits.append(np.flatnonzero(hit) + first)
        self._nhits += self._hits[-1].size
        if self._nhits > 2 * self._kept + 4096:  # re-sent pages: keep each page once
            self._hits = [np.unique(np.concatenate(self._hits))]
            self._nhits = self._kept = self._hits[0].size

    def _read(self, gpa: int, n: int) -> bytes | None:
        """Guest RAM as written to the output (holes and the unwritten tail read as zeros)."""
        assert self.core is not None
        for r, off in self.core.placed():
            if r in self.core.ram and r.gpa <= gpa and gpa + n <= r.gpa + r.length:
                return os.pread(self.out.fd, n, off + gpa - r.gpa).ljust(n, b"\0")
        return None

    def finish(self, f: Save) -> None:
        """The notes and headers, at offset 0, once every page is written."""
        self.drain()
        core = self.core
        assert core is not None
        fd = self.out.fd
        self._buffered(fd, fd)  # the reads and the head below are not page-aligned
        regs = register_notes(f)
        for w in regs.warnings:
            elfcore_log.warning("fixedram: warning: %s: %s", f.path, w)
        found = device_vmcoreinfo(regs.devices or [], self._read)
        source = "vmcoreinfo device"
        if found is None:
            pages = (np.unique(np.concatenate(self._hits)) if self._hits
                     else np.zeros(0, dtype=np.int64))
            found, source = vmcoreinfo_in_pages(self._read, core.ram, pages), "guest RAM"
        core.machine, core.notes, core.cpus = regs.machine, regs.notes, regs.cpus
        core.warnings = regs.warnings
        if found is not None:
            core.notes += found[1]
            core.vmcoreinfo = (found[0], source)
        head = core.head()  # refused here when the notes outgrew their room
        done = 0
        while done < len(head):
            done += os.pwrite(fd, head[done:], done)


def extract_one_pass(src: OnePassFile, output: str, fmt: str = "raw", *,
                     force: bool = False, allow_incomplete: bool = False) -> OnePassFile:
    """Extract guest RAM from ``src``, a one-pass save not yet walked.

    :param fmt: ``raw`` (a directory), ``physical`` or ``elf`` (one file).
    :return: ``src``, walked.
    :raise FormatError: the stream is malformed; IncompleteSave: incomplete without
        ``allow_incomplete``; OutputError: an ELF core whose notes would not fit
        the room kept for them; nothing is left under ``output`` then.
    """
    if fmt == "raw":
        return _extract_raw(src, output, force, allow_incomplete)
    if fmt not in ("physical", "elf"):
        raise ValueError(fmt)
    out = AtomicOutput(output, force=force)
    target: _Physical | _Elf = _Physical(out) if fmt == "physical" else _Elf(out)
    try:
        f = _run(src, target, allow_incomplete)
        try:
            target.drain()
            if isinstance(target, _Elf):
                target.finish(f)
            out.commit(target.size)
        except OSError as e:
            f.close()
            raise output_error(output, e) from e
        except BaseException:
            f.close()
            raise
        return f
    except OSError as e:
        raise output_error(output, e) from e
    finally:
        with contextlib.suppress(BaseException):
            target.drain()  # before the descriptor is closed
        if not out.done:
            out.abort()


def _run(src: OnePassFile, target: _Placed, allow_incomplete: bool) -> OnePassFile:
    f = src.walk(target)
    if not f.complete and not allow_incomplete:
        why = f.error or "unfinished"
        f.close()
        raise IncompleteSave(f"{src.path}: the save is incomplete ({why}); use "
                            "--allow-incomplete to extract what it holds")
    return f


def _extract_raw(src: OnePassFile, outdir: str, force: bool,
                 allow_incomplete: bool) -> OnePassFile:
    f: OnePassFile | None = None
    try:
        with staged_directory(outdir, force) as tmp:
            target = _RawSet(tmp)
            try:
                f = _run(src, target, allow_incomplete)
                target.finish(f)
            finally:
                target.close()
        return f
    except OSError as e:
        raise output_error(os.path.abspath(outdir), e) from e
    except BaseException:
        if f is not None:
            f.close()
        raise
