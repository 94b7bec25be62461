"""Lazy restore of a mapped-ram file: QEMU master's fast snapshot load, by mmap.

QEMU loads a snapshot lazily by catching the guest's page faults with
userfaultfd and reading each page from its fixed offset in the file while an
eager thread loads the rest (docs/devel/migration/fast-snapshot-load.rst).
The built-in guest's RAM is process memory, so the kernel does both jobs:
each RAMBlock becomes a private (copy-on-write) mapping of its page region in
the file. The guest can run once the device state is loaded; a first touch
of a page reads it from the file, a write copies it, and the file never
changes. A thread then populates every page whose bit is set
(``MADV_POPULATE_READ``, 16 MiB at a time), after which every page is
resident.

A page whose bit is clear must read as zero, but QEMU leaves the old bytes
in the file under a bit it clears. Holes read as zero already, so only clear
runs over data (the file system's extent map says where: FIEMAP, else
SEEK_DATA/SEEK_HOLE) get an anonymous mapping laid over them before the
guest runs. A fixedram save has no such run, so mapping costs a few system
calls per RAMBlock whatever the size of RAM.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import CorruptFile, MigrationError
from ..format.migfile import MigrationFile
from .capabilities import MigrationConfig, capability_mismatch
from .guest import PAGE, BuiltinGuest, GuestBlock

__all__ = ["LazyBlock", "LazyRAM", "bitmap_runs", "data_extents", "open_lazy", "plan",
           "prefault", "set_runs", "stale_runs"]

PIECE_PAGES = 4096  # populate 16 MiB a call: a stop request waits for one piece at most
MAX_OVERLAYS = 4096  # anonymous mappings over stale runs (each costs VMAs); past it, writes

_MADV_WILLNEED = 3
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
_MAP_FIXED = getattr(mmap, "MAP_FIXED", 0x10)

_FS_IOC_FIEMAP = 0xC020660B
_FIEMAP = struct.Struct("=QQIIII")  # start, length, flags, mapped, count, reserved
_EXTENT_BYTES = 56
_EXTENT_LAST = 0x1
_FIEMAP_BATCH = 8192

_EMPTY = np.zeros((0, 2), dtype=np.int64)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.madvise.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


# -- runs ---------------------------------------------------------------------------


def set_runs(bits: np.ndarray) -> np.ndarray:
    """``(n, 2)`` ``[first, end)`` page ranges of the runs of True in ``bits``."""
    if bits.size == 0:
        return _EMPTY
    b = bits.view(np.int8)
    edges = np.flatnonzero(b[1:] != b[:-1]) + 1
    bounds = np.concatenate(([0], edges, [bits.size])).astype(np.int64)
    k = 0 if bits[0] else 1  # segments alternate, starting with bits[0]'s state
    return np.stack([bounds[:-1][k::2], bounds[1:][k::2]], axis=1)


def bitmap_runs(raw: bytes, npages: int) -> np.ndarray:
    """:func:`set_runs` of a mapped-ram bitmap as stored (64-bit little-endian
    words, page i at bit i), working on words: a 16 GiB block's 512 KiB
    bitmap is 64 Ki words, and only words where a run starts or ends are
    unpacked."""
    nwords = -(-npages // 64)
    if npages == 0:
        return _EMPTY
    w = np.zeros(nwords + 1, dtype=np.uint64)  # one spare word: a run ending at npages
    w[:nwords] = np.frombuffer(raw, dtype="<u8", count=nwords)
    tail = npages % 64
    if tail:
        w[nwords - 1] &= np.uint64((1 << tail) - 1)  # bits past the last page do not count
    # Bit i of t: page i differs from page i - 1 (page -1 is clear).
    prev = np.concatenate((np.zeros(1, dtype=np.uint64), w[:-1]))
    t = w ^ ((w << np.uint64(1)) | (prev >> np.uint64(63)))
    idx = np.flatnonzero(t).astype(np.int64)
    v = t[idx]
    found: list[np.ndarray] = []
    while v.size:  # lowest set bit of every word at once: as many rounds as edges per word
        low = v & (~v + np.uint64(1))
        found.append(idx * 64 + np.log2(low.astype(np.float64)).astype(np.int64))
        v = v ^ low
        more = v != 0
        idx, v = idx[more], v[more]
    if not found:
        return _EMPTY
    return np.sort(np.concatenate(found)).reshape(-1, 2)


def _coverage(starts: np.ndarray, ends: np.ndarray, at: np.ndarray) -> np.ndarray:
    """At each point of ``at``: inside one of the intervals (sorted starts and ends)."""
    return np.asarray(np.searchsorted(starts, at, "right") > np.searchsorted(ends, at, "right"))


def stale_runs(runs: np.ndarray, extents: np.ndarray, base: int, npages: int) -> np.ndarray:
    """Pages with data in the file (``extents``, bytes) but no bit set (``runs``).

    :param base: file offset of page 0; ``extents`` are absolute byte ranges.
    :return: ``(m, 2)`` ``[first, end)`` page ranges.
    """
    if extents.size == 0:
        return _EMPTY
    rel = extents - base
    first = np.clip(rel[:, 0] // PAGE, 0, npages)
    end = np.clip(-(-rel[:, 1] // PAGE), 0, npages)
    keep = first < end
    first, end = np.sort(first[keep]), np.sort(end[keep])
    if first.size == 0:
        return _EMPTY
    if runs.size:
        # The usual case, a file written by fixedram: every extent inside one run.
        j = np.searchsorted(runs[:, 0], first, "right") - 1
        if bool(((j >= 0) & (end <= runs[np.maximum(j, 0), 1])).all()):
            return _EMPTY
    pts = np.sort(np.concatenate([first, end, runs.ravel()]))
    keep = np.ones(pts.size, dtype=bool)
    keep[1:] = pts[1:] != pts[:-1]
    pts = pts[keep]  # np.unique, without its first-call import of numpy.ma
    seg = pts[:-1]
    bad = _coverage(first, end, seg) & ~_coverage(runs[:, 0], runs[:, 1], seg)
    s, t = seg[bad], pts[1:][bad]
    if s.size == 0:
        return _EMPTY
    new = np.ones(s.size, dtype=bool)
    new[1:] = s[1:] != t[:-1]  # merge segments that touch
    heads = np.flatnonzero(new)
    tails = np.concatenate((heads[1:] - 1, [s.size - 1]))
    return np.stack([s[heads], t[tails]], axis=1).astype(np.int64)


# -- where the file holds data ---------------------------------------------------------


def _fiemap(fd: int, lo: int, hi: int) -> np.ndarray:
    out: list[np.ndarray] = []
    pos = lo
    buf = bytearray(_FIEMAP.size + _FIEMAP_BATCH * _EXTENT_BYTES)
    while pos < hi:
        _FIEMAP.pack_into(buf, 0, pos, hi - pos, 0, 0, _FIEMAP_BATCH, 0)
        fcntl.ioctl(fd, _FS_IOC_FIEMAP, buf, True)
        n = _FIEMAP.unpack_from(buf)[3]
        if n == 0:
            break
        # Per extent: logical, physical, length, 2 reserved, flags | reserved << 32, reserved.
        ext = np.frombuffer(buf, dtype=np.uint64, count=n * 7, offset=_FIEMAP.size).reshape(n, 7)
        start = ext[:, 0].astype(np.int64)
        stop = start + ext[:, 2].astype(np.int64)
        out.append(np.stack([start, stop], axis=1))
        nxt = int(stop[-1])
        if int(ext[-1, 5]) & _EXTENT_LAST or nxt <= pos:
            break
        pos = nxt
    r = np.concatenate(out) if out else _EMPTY
    return np.clip(r, lo, hi)


def _seek_data(fd: int, lo: int, hi: int) -> np.ndarray:
    out: list[tuple[int, int]] = []
    pos = lo
    while pos < hi:
        try:
            a = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data past pos
                break
            raise
        if a >= hi:
            break
        b = os.lseek(fd, a, os.SEEK_HOLE)
        out.append((a, min(b, hi)))
        pos = b
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def data_extents(fd: int, lo: int, hi: int) -> np.ndarray:
    """``(k, 2)`` byte ranges of ``[lo, hi)`` that may hold data (the rest are holes).

    Unwritten (preallocated) extents count as data: the kernel may hold
    their bytes in the page cache still. Without FIEMAP or SEEK_DATA the
    whole range counts.
    """
    with contextlib.suppress(OSError):
        return _fiemap(fd, lo, hi)
    with contextlib.suppress(OSError):
        return _seek_data(fd, lo, hi)
    return np.array([[lo, hi]], dtype=np.int64)


# -- the plan and the mappings -------------------------------------------------------------


@dataclass
class LazyBlock:
    """One RAMBlock to map: its page region at ``base`` in the file, the runs
    of set bits to populate, and the clear runs over data to zero."""

    gb: GuestBlock
    base: int
    runs: np.ndarray
    stale: np.ndarray = field(default_factory=lambda: _EMPTY)

    @property
    def pages(self) -> int:
        return int((self.runs[:, 1] - self.runs[:, 0]).sum())


def plan(mf: MigrationFile, guest: BuiltinGuest,
         granularity: int = mmap.ALLOCATIONGRANULARITY) -> tuple[list[LazyBlock], str | None]:
    """The blocks to map, or why the file cannot be mapped (then loaded eagerly).

    :raise CorruptFile: a page region runs past the end of the file.
    :raise MigrationError: a block the guest lacks or of another size.
    """
    from .incoming import _match_block

    out: list[LazyBlock] = []
    for fb in mf.blocks:
        gb = _match_block(guest, fb.idstr, fb.used_length)
        m = fb.record.mapped
        if m is None:
            return [], f"RAMBlock {fb.idstr!r} has no mapped-ram header"
        end = m.pages_offset + fb.used_length
        if m.pages_offset < 0 or end > mf.size:
            raise CorruptFile(f"RAMBlock {fb.idstr!r} page region 0x{m.pages_offset:x}-"
                              f"0x{end:x} runs past the end of the file (0x{mf.size:x})",
                              path=mf.path, offset=m.offset + 20)
        if m.pages_offset % granularity:
            return [], (f"RAMBlock {fb.idstr!r} page region at 0x{m.pages_offset:x} is not "
                        f"aligned to the host page size ({granularity}), so it cannot be mapped")
        n = fb.record.bitmap_bytes
        if m.bitmap_offset < 0 or m.bitmap_offset + n > mf.size:
            raise CorruptFile(f"bitmap of RAMBlock {fb.idstr!r} ({n} bytes) runs past the end "
                              "of the file", path=mf.path, offset=m.bitmap_offset)
        raw = os.pread(mf.fd, n, m.bitmap_offset)
        if len(raw) < -(-fb.npages // 64) * 8:
            raise CorruptFile(f"short read of the bitmap of RAMBlock {fb.idstr!r}",
                              path=mf.path, offset=m.bitmap_offset)
        out.append(LazyBlock(gb, m.pages_offset, bitmap_runs(raw, fb.npages)))
    return out, None


def _pieces(runs: np.ndarray, size: int) -> np.ndarray:
    """``runs`` cut into pieces of at most ``size`` pages (vectorised)."""
    if runs.size == 0:
        return _EMPTY
    n = -(-(runs[:, 1] - runs[:, 0]) // size)
    idx = np.repeat(np.arange(runs.shape[0]), n)
    k = np.arange(idx.size) - np.repeat(np.cumsum(n) - n, n)
    first = runs[idx, 0] + k * size
    return np.stack([first, np.minimum(first + size, runs[idx, 1])], axis=1)


def prefault(mv: memoryview) -> None:
    """Make the pages of ``mv`` (page-aligned, writable) resident for writing,
    in one system call; nothing happens where the kernel cannot."""
    n = len(mv)
    if n:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mv))
        _libc.madvise(addr, n, _MADV_POPULATE_WRITE)


def _overlay_zero(addr: int, length: int) -> None:
    """Lay fresh anonymous (zero) memory over ``[addr, addr+length)`` of a mapping."""
    r = _libc.mmap(addr, length, mmap.PROT_READ | mmap.PROT_WRITE,
                   mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED, -1, 0)
    if r is None or r != addr:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class LazyRAM:
    """The guest's RAMBlocks mapped from a file, and the thread that faults them in.

    :ivar error: what stopped the thread, if anything did.
    :ivar populated_bytes: bytes of set pages made resident so far.
    """

    def __init__(self, path: str, fd: int, blocks: list[LazyBlock], bandwidth: int = 0) -> None:
        self.path = path
        self.fd = fd
        self.blocks = blocks
        self.bandwidth = bandwidth  # max-postcopy-bandwidth: bytes/s of fault-in, 0 = no cap
        self.total_bytes = sum(b.pages for b in blocks) * PAGE
        self.populated_bytes = 0
        self.error: BaseException | None = None
        self.t_done = 0.0
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def pages(self) -> int:
        return self.total_bytes // PAGE

    def map(self) -> None:
        """Map every block (all or none), then zero the clear runs over data.

        :raise OSError: a mapping was refused; the guest keeps its anonymous RAM.
        :raise MigrationError: the stale runs could not be zeroed (RAM is mapped).
        """
        mms = [mmap.mmap(self.fd, b.gb.size, flags=mmap.MAP_PRIVATE,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=b.base)
               for b in self.blocks]
        for b, mm in zip(self.blocks, mms, strict=True):
            b.gb.install(mm)
        for b in self.blocks:
            b.stale = stale_runs(b.runs, data_extents(self.fd, b.base, b.base + b.gb.size),
                                 b.base, b.gb.npages)
            try:
                self._zero(b)
            except OSError as e:  # the file's bytes show through: no guest may run on this
                raise MigrationError(f"{self.path}: cannot zero the cleared pages of RAMBlock "
                                     f"{b.gb.idstr!r}: {e.strerror or e}") from e

    @staticmethod
    def _zero(b: LazyBlock) -> None:
        if b.stale.shape[0] > MAX_OVERLAYS:  # too many VMAs: copy-on-write zeros instead
            for first, end in b.stale.tolist():
                b.gb.data[first * PAGE:end * PAGE] = 0
            return
        base = b.gb.address
        for first, end in b.stale.tolist():
            _overlay_zero(base + first * PAGE, (end - first) * PAGE)

    # -- fault-in -------------------------------------------------------------------

    def start(self) -> LazyRAM:
        self._thread = threading.Thread(target=self._run, name="postcopy/fault-in",
                                        daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        t0 = time.monotonic()
        try:
            advice = _MADV_POPULATE_READ
            for b in self.blocks:
                base = b.gb.address
                for first, end in _pieces(b.runs, PIECE_PAGES).tolist():
                    if self._stop.is_set():
                        return
                    addr, n = base + first * PAGE, (end - first) * PAGE
                    # ctypes drops the GIL: the vCPU threads run while pages come in.
                    if _libc.madvise(addr, n, advice) != 0:
                        e = ctypes.get_errno()
                        if e != errno.EINVAL or advice != _MADV_POPULATE_READ:
                            raise MigrationError(f"{self.path}: fault-in of RAMBlock "
                                                 f"{b.gb.idstr!r} page {first}: "
                                                 f"{os.strerror(e)}")
                        advice = _MADV_WILLNEED  # a kernel before 5.14
                    if advice == _MADV_WILLNEED:
                        _libc.madvise(addr, n, advice)
                        int(b.gb.data[first * PAGE:end * PAGE:PAGE].max())  # touch each page
                    self.populated_bytes += n
                    if self.bandwidth:  # the guest's own faults are not held back
                        ahead = t0 + self.populated_bytes / self.bandwidth - time.monotonic()
                        if ahead > 0 and self._stop.wait(ahead):
                            return
        except BaseException as e:
            self.error = e
        finally:
            self.t_done = time.monotonic()
            self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def stop(self) -> None:
        """Stop the fault-in thread and wait for it (it ends within one piece)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def close(self) -> None:
        """The descriptor only: the mappings stay the guest's RAM."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_lazy(path: str, guest: BuiltinGuest, cfg: MigrationConfig, offset: int,
              note: Callable[[str], None]) -> LazyRAM | None:
    """Map a mapped-ram file's RAMBlocks into ``guest`` and load its devices.

    :return: the mappings, their fault-in not started; None after
        ``note(why)`` when the file cannot be mapped (load it eagerly).
    """
    from .incoming import _load_device

    with MigrationFile(path, offset=offset) as mf:
        capability_mismatch(cfg.caps, mf.capabilities)
        if not mf.complete:
            raise MigrationError(f"{path}: the mapped-ram file is incomplete (no EOF)")
        blocks, why = plan(mf, guest)
        if why is not None:
            note(f"{path}: {why}; loading it eagerly")
            return None
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        lazy = LazyRAM(path, fd, blocks, int(cfg.params["max-postcopy-bandwidth"]))
        try:
            lazy.map()
        except OSError as e:
            lazy.close()
            note(f"{path}: cannot be mapped ({e.strerror or e}); loading it eagerly")
            return None
        try:
            for dev in mf.sections:
                _load_device(guest, dev, os.pread(mf.fd, dev.data_length, dev.data_offset))
        except BaseException:
            lazy.close()
            raise
    return lazy
