"""makedumpfile's compressed kdump format: what ``makedumpfile -c -d 1`` writes.

crash, makedumpfile and drgn (through libkdumpfile) read this format. The file
(facts from makedumpfile's ``diskdump_mod.h`` and ``makedumpfile.c``, crash's
and libkdumpfile's ``diskdump.c``, QEMU's ``dump/dump.c``; x86-64, little
endian, blocks of the 4 KiB page size):

* block 0: ``disk_dump_header`` ("KDUMP   ", version 6, the kernel's utsname,
  the codec bit in ``status``, ``nr_cpus``);
* block 1: ``kdump_sub_header`` (``phys_base``, ``dump_level`` 1, where the
  notes and the VMCOREINFO text are, ``max_mapnr_64``), followed by the ELF
  notes of :mod:`.elfcore` (each vCPU's NT_PRSTATUS and QEMU CPU state, then
  the guest's VMCOREINFO note);
* two bitmaps of one bit per page frame (LSB first): frames that exist, frames
  dumped. Both name every frame of the ELF core's LOADs, so each bitmap is
  written in full (crash and libkdumpfile read the second only then);
* one 24-byte ``page_desc`` per dumped frame, in frame order: offset, size,
  codec flags;
* the page data: first one zero page that every zero frame's descriptor
  points at (``-d 1``: zero pages left out, yet readable), then each other
  page compressed, or raw when compression does not shrink it.

Pages are read, tested for zero and compressed in batches on a thread pool
(zlib, zstd, LZO and snappy run without the GIL); the main thread writes the
data in order and each batch's descriptors at their fixed offsets.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import struct
import threading
import weakref
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import CorruptFile, IncompleteSave, UnsupportedFeature, UsageError
from ..format.migfile import MigrationFile, Run
from ..output import AtomicOutput, BackgroundWriter, output_error
from .elfcore import EM_X86_64, NHDR, VMCOREINFO_NAME, ElfCore, _guest_reader, build_core
from .elfcore import log as elfcore_log

if TYPE_CHECKING:
    from ..format.migfile import RAMBlock
    from ..format.walker import Save
    from .layout import PhysRange

__all__ = ["CODECS", "DEFAULT_CODEC", "KdumpLayout", "extract_kdump", "kdump_layout",
           "page_compressor", "utsname"]

log = logging.getLogger(__name__)

BLOCK = 4096
# disk_dump_header: signature, header_version, utsname (6 x 65), timeval
# (8-aligned), status, block_size, sub_hdr_size, bitmap_blocks, max_mapnr,
# total_ram_blocks, device_blocks, written_blocks, current_cpu, nr_cpus.
DISK_DUMP_HEADER = struct.Struct("<8si390s6xqqIiiIIIIIIi")
# kdump_sub_header up to version 6: phys_base, dump_level, split, start_pfn,
# end_pfn, offset/size of vmcoreinfo, of the notes, of eraseinfo,
# start_pfn_64, end_pfn_64, max_mapnr_64.
SUB_HEADER = struct.Struct("<QiiQQQQQQQQQQQ")
PAGE_DESC = np.dtype([("offset", "<i8"), ("size", "<u4"), ("flags", "<u4"),
                      ("page_flags", "<u8")])
KDUMP_SIGNATURE = b"KDUMP   "
HEADER_VERSION = 6
DUMP_LEVEL = 1  # makedumpfile -d 1: zero pages excluded
UTS_LEN = 65
# The codec bits of disk_dump_header.status and page_desc.flags.
CODECS = {"zlib": 0x1, "lzo": 0x2, "snappy": 0x4, "zstd": 0x20, "none": 0}
# Read by this machine's crash 8.0.2, makedumpfile 1.7.2 and drgn 0.3.0 alike:
# zlib and lzo (makedumpfile reads neither snappy nor zstd); zlib's pages are
# 15% smaller than LZO's, and through libdeflate cost less CPU than makedumpfile's.
DEFAULT_CODEC = "zlib"
# Pages per batch: 4 MiB read per task, descriptors written 24 KiB at a time.
BATCH_PAGES = 1024
# Bitmap bytes built at once: memory stays bounded whatever RAM size the save declares.
BITMAP_CHUNK = 1 << 20
# The x86-64 kernel image mapping (__START_KERNEL_map): a symbol's physical
# address is its address minus this plus phys_base.
START_KERNEL_MAP = 0xFFFFFFFF80000000
KERNEL_IMAGE_MAX = 1 << 30
# x86-64's 52-bit physical address space, in page frames.
MAX_PFN = 1 << 40
_U64 = (1 << 64) - 1

Compress = Callable[[memoryview, int], bytes]
"""compress(page, address of the page's bytes) -> compressed bytes."""


# -- codecs ---------------------------------------------------------------------

def _library(names: Sequence[str], codec: str, package: str) -> ctypes.CDLL:
    for name in names:
        found = ctypes.util.find_library(name) or f"lib{name}.so"
        for candidate in (found, *(f"lib{name}.so.{v}" for v in (2, 1))):
            with contextlib.suppress(OSError):
                return ctypes.CDLL(candidate)
    raise UsageError(f"--compress {codec} needs the {names[0]} library "
                     f"(Debian package {package}), which is not installed")


class _Lzo:
    """LZO1X-1 through liblzo2, as makedumpfile compresses (ctypes drops the GIL)."""

    # LZO1X_1_MEM_COMPRESS is 16384 dictionary entries of at most a pointer each.
    WORK = 16384 * 8

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._fn = lib.lzo1x_1_compress
        self._dst = ctypes.create_string_buffer(BLOCK + BLOCK // 16 + 64 + 3)
        self._work = ctypes.create_string_buffer(self.WORK)
        self._n = ctypes.c_size_t()

    @staticmethod
    def bind(lib: ctypes.CDLL) -> None:
        f = lib.lzo1x_1_compress
        f.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                      ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p]
        f.restype = ctypes.c_int

    def __call__(self, page: memoryview, addr: int) -> bytes:
        if self._fn(addr, len(page), self._dst, ctypes.byref(self._n), self._work) != 0:
            return bytes(page)  # stored raw
        return ctypes.string_at(self._dst, self._n.value)


class _Snappy:
    """Raw snappy (not the framing format) through libsnappy's C interface."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._fn = lib.snappy_compress
        self._dst = ctypes.create_string_buffer(32 + BLOCK + BLOCK // 6)
        self._n = ctypes.c_size_t()

    @staticmethod
    def bind(lib: ctypes.CDLL) -> None:
        f = lib.snappy_compress
        f.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                      ctypes.POINTER(ctypes.c_size_t)]
        f.restype = ctypes.c_int

    def __call__(self, page: memoryview, addr: int) -> bytes:
        self._n.value = len(self._dst)
        if self._fn(addr, len(page), self._dst, ctypes.byref(self._n)) != 0:
            return bytes(page)
        return ctypes.string_at(self._dst, self._n.value)


class _Libdeflate:
    """zlib-format pages through libdeflate, when the system has it: the same format
    uncompress() reads, at under half zlib's CPU time per page (level 1, as makedumpfile)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._fn = lib.libdeflate_zlib_compress
        self._c = lib.libdeflate_alloc_compressor(1)
        if not self._c:
            raise MemoryError("libdeflate_alloc_compressor")
        weakref.finalize(self, lib.libdeflate_free_compressor, self._c)
        self._dst = ctypes.create_string_buffer(BLOCK)

    @staticmethod
    def load() -> ctypes.CDLL | None:
        name = ctypes.util.find_library("deflate") or "libdeflate.so.0"
        try:
            lib = ctypes.CDLL(name)
            alloc, free = lib.libdeflate_alloc_compressor, lib.libdeflate_free_compressor
            fn = lib.libdeflate_zlib_compress
        except (OSError, AttributeError):
            return None
        alloc.argtypes, alloc.restype = [ctypes.c_int], ctypes.c_void_p
        free.argtypes, free.restype = [ctypes.c_void_p], None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                       ctypes.c_size_t]
        fn.restype = ctypes.c_size_t
        return lib

    def __call__(self, page: memoryview, addr: int) -> bytes:
        # Room for one byte less than a page: 0 back means it would not shrink (stored raw).
        n = self._fn(self._c, addr, len(page), self._dst, len(page) - 1)
        return ctypes.string_at(self._dst, n) if n else bytes(page)


def page_compressor(codec: str) -> Callable[[], Compress]:
    """A factory of page compressors for ``codec`` (one per thread: none is shared).

    :raise UsageError: an unknown codec, or its library is missing.
    """
    if codec == "zlib":
        deflate = _Libdeflate.load()
        if deflate is not None:
            return lambda: _Libdeflate(deflate)
        # zlib-wrapped, level 1: makedumpfile's compress2(Z_BEST_SPEED), read by uncompress().
        return lambda: lambda page, _addr: zlib.compress(page, 1)
    if codec == "zstd":
        import zstandard

        def zstd() -> Compress:
            c = zstandard.ZstdCompressor(level=1)
            return lambda page, _addr: c.compress(page)
        return zstd
    if codec == "lzo":
        lib = _library(("lzo2",), "lzo", "liblzo2-2")
        _Lzo.bind(lib)
        return lambda: _Lzo(lib)
    if codec == "snappy":
        lib = _library(("snappy",), "snappy", "libsnappy1v5")
        _Snappy.bind(lib)
        return lambda: _Snappy(lib)
    if codec == "none":
        return lambda: lambda page, _addr: bytes(page)
    raise UsageError(f"unknown --compress {codec!r} (one of {', '.join(CODECS)})")


# -- what the headers say ---------------------------------------------------------

def _notes(notes: bytes) -> Iterator[tuple[bytes, int, int, int]]:
    """(name, type, descriptor offset, descriptor size) of each ELF note."""
    pos = 0
    while pos + NHDR.size <= len(notes):
        namesz, descsz, ntype = NHDR.unpack_from(notes, pos)
        name_at = pos + NHDR.size
        desc_at = name_at + (namesz + 3) // 4 * 4
        if desc_at + descsz > len(notes):
            return
        yield notes[name_at:name_at + namesz].rstrip(b"\0"), ntype, desc_at, descsz
        pos = desc_at + (descsz + 3) // 4 * 4


def vmcoreinfo_fields(text: bytes) -> dict[str, str]:
    """``KEY=VALUE`` lines of a VMCOREINFO text (other lines ignored)."""
    out: dict[str, str] = {}
    for line in text.decode("ascii", "replace").splitlines():
        key, eq, value = line.partition("=")
        if eq:
            out.setdefault(key, value)
    return out


def _number(fields: dict[str, str], key: str, base: int) -> int | None:
    try:
        v = int(fields[key], base)
    except (KeyError, ValueError):
        return None
    return v if 0 <= v < 1 << 64 else None


def _phys_base(fields: dict[str, str]) -> int:
    """``NUMBER(phys_base)`` as the u64 the kernel holds, 0 when absent or not a number.

    The kernel prints it as a signed long (``%ld``): a kernel that KASLR loaded below
    its link address has a negative one.
    """
    try:
        v = int(fields.get("NUMBER(phys_base)", ""), 10)
    except ValueError:
        return 0
    return v & _U64 if -(1 << 63) <= v < 1 << 64 else 0


def _uts_field(s: bytes) -> bytes:
    return s.split(b"\0", 1)[0][:UTS_LEN - 1]


def utsname(fields: dict[str, str], read: Callable[[int, int], bytes | None],
            phys_base: int) -> list[bytes]:
    """The kernel's six utsname strings: ``init_uts_ns`` read from guest RAM, else
    what VMCOREINFO tells (sysname, release, machine; libkdumpfile wants these set).

    Every address comes from the guest and is checked before it is read.
    """
    release = fields.get("OSRELEASE", "").encode()[:UTS_LEN - 1]
    fallback = [b"Linux", b"", release, b"unknown", b"x86_64", b""]
    sym = _number(fields, "SYMBOL(init_uts_ns)", 16)
    if sym is None or not 0 <= sym - START_KERNEL_MAP < KERNEL_IMAGE_MAX:
        return fallback
    gpa = (sym - START_KERNEL_MAP + phys_base) & _U64
    off = _number(fields, "OFFSET(uts_namespace.name)", 10)
    if off is None:  # kernels before 4.x: a kref before the name
        head = read(gpa, 16 + UTS_LEN)
        at = head.find(b"Linux\0") if head is not None else -1
        if at < 0:
            return fallback
        off = at
    if off > 4096:
        return fallback
    raw = read(gpa + off, 6 * UTS_LEN)
    if raw is None:
        return fallback
    uts = [_uts_field(raw[i * UTS_LEN:(i + 1) * UTS_LEN]) for i in range(6)]
    if uts[0] != b"Linux" or uts[2] != release or not uts[3] or not uts[4]:
        return fallback
    return uts


@dataclass(frozen=True)
class KdumpLayout:
    """Where everything goes; sizes in bytes unless said."""

    spans: list[tuple[int, int]]  # dumped page frames [first, end), ascending
    max_mapnr: int
    sub_hdr_blocks: int
    bitmap_bytes: int  # one bitmap, padded to whole blocks
    notes_size: int

    @property
    def bitmap_offset(self) -> int:
        return (1 + self.sub_hdr_blocks) * BLOCK

    @property
    def desc_offset(self) -> int:
        return self.bitmap_offset + 2 * self.bitmap_bytes

    @property
    def pages(self) -> int:
        return sum(e - s for s, e in self.spans)

    @property
    def data_offset(self) -> int:
        """The shared zero page; the other pages follow it."""
        return self.desc_offset + self.pages * PAGE_DESC.itemsize


def _blocks(n: int, size: int) -> int:
    return (n + size - 1) // size


def kdump_layout(loads: Sequence[PhysRange[RAMBlock]], notes_size: int) -> KdumpLayout:
    """The layout for the ELF core's LOADs (every frame of them dumped).

    :raise UnsupportedFeature: pages that are not 4 KiB, or ranges off page boundaries.
    :raise CorruptFile: ranges that overlap or end past x86-64's physical address space.
    """
    spans: list[tuple[int, int]] = []
    for r in sorted(loads, key=lambda r: r.gpa):
        if r.block.page_size != BLOCK or (r.gpa | r.length | r.block_offset) % BLOCK:
            raise UnsupportedFeature(f"RAMBlock {r.block.idstr!r}: a kdump file needs 4 KiB "
                                     "pages on 4 KiB boundaries")
        s, e = r.gpa // BLOCK, (r.gpa + r.length) // BLOCK
        if spans and s < spans[-1][1]:
            raise CorruptFile(f"guest-physical ranges overlap at 0x{r.gpa:x}")
        if e > MAX_PFN:
            raise CorruptFile(f"RAMBlock {r.block.idstr!r} ends at 0x{r.gpa + r.length:x}, "
                              "past x86-64's physical address space")
        if e > s:
            spans.append((s, e))
    max_mapnr = spans[-1][1] if spans else 0
    bitmap = _blocks(_blocks(max_mapnr, 8), BLOCK) * BLOCK
    sub = _blocks(SUB_HEADER.size + notes_size, BLOCK)
    return KdumpLayout(spans, max_mapnr, sub, bitmap, notes_size)


def bitmap_chunks(spans: Sequence[tuple[int, int]], nbytes: int,
                  chunk: int = BITMAP_CHUNK) -> Iterator[tuple[int, bytes]]:
    """``(byte offset, bytes)`` of the bitmap with the spans' frames set, chunk by
    chunk; chunks with no bit set are left out (the file reads zero there)."""
    for b0 in range(0, nbytes, chunk):
        b1 = min(nbytes, b0 + chunk)
        lo, hi = b0 * 8, b1 * 8
        hits = [(max(s, lo), min(e, hi)) for s, e in spans if s < hi and e > lo]
        if not hits:
            continue
        bits = np.zeros(hi - lo, dtype=bool)
        for a, z in hits:
            bits[a - lo:z - lo] = True
        yield b0, np.packbits(bits, bitorder="little").tobytes()


def _headers(core: ElfCore[RAMBlock], lay: KdumpLayout, codec: str, mf: MigrationFile) -> bytes:
    """Block 0 and the sub header block(s) with the notes."""
    notes = core.notes
    vmci = [(at, n) for name, t, at, n in _notes(notes) if name == VMCOREINFO_NAME and t == 0]
    assert vmci, "build_core gave no VMCOREINFO note"
    at, size = vmci[-1]
    fields = vmcoreinfo_fields(notes[at:at + size])
    phys_base = _phys_base(fields)
    uts = utsname(fields, _guest_reader(core.ram), phys_base)
    mtime = os.fstat(mf.fd).st_mtime_ns
    note_off = BLOCK + SUB_HEADER.size
    dh = DISK_DUMP_HEADER.pack(
        KDUMP_SIGNATURE, HEADER_VERSION, b"".join(u.ljust(UTS_LEN, b"\0") for u in uts),
        mtime // 10**9, mtime // 1000 % 10**6, CODECS[codec], BLOCK, lay.sub_hdr_blocks,
        2 * lay.bitmap_bytes // BLOCK, min(lay.max_mapnr, 0xFFFFFFFF), 0, 0, 0, 0,
        max(1, len(core.cpus)))
    sub = SUB_HEADER.pack(phys_base, DUMP_LEVEL, 0, 0, 0, note_off + at, size,
                          note_off, len(notes), 0, 0, 0, 0, lay.max_mapnr)
    return dh.ljust(BLOCK, b"\0") + sub + notes


# -- pages ----------------------------------------------------------------------

@dataclass(frozen=True)
class _Batch:
    rank: int  # index of its first frame among all dumped frames (descriptor slot)
    pages: int
    pieces: list[tuple[Run, int]]  # a run of present pages, and its first page's index here


def _batches(loads: Sequence[PhysRange[RAMBlock]], pages: int = BATCH_PAGES) -> Iterator[_Batch]:
    """The LOADs cut into batches of at most ``pages`` frames, in frame order."""
    rank = 0
    for pr in sorted(loads, key=lambda r: r.gpa):
        lo = pr.block_offset // BLOCK
        hi = lo + pr.length // BLOCK
        runs = (c for r in pr.block.runs(pages) if (c := r.clip(lo, hi)) is not None)
        run = next(runs, None)
        for start in range(lo, hi, pages):
            end = min(start + pages, hi)
            pieces = []
            while run is not None and run.first < end:
                part = run.clip(start, end)
                if part is not None:
                    pieces.append((part, part.first - start))
                if run.first + run.count > end:
                    run = run.clip(end, hi)
                    break
                run = next(runs, None)
            yield _Batch(rank + start - lo, end - start, pieces)
        rank += hi - lo


class _Packer:
    """Reads, zero-tests and compresses batches; one scratch set per thread.

    A mapped-ram file holds its zero pages as holes (QEMU writes none of them):
    holes are found with SEEK_DATA/SEEK_HOLE, and their pages are zero without
    being read or tested.
    """

    def __init__(self, mf: MigrationFile, make: Callable[[], Compress], flag: int) -> None:
        self.fd, self.path = mf.fd, mf.path
        self.make, self.flag = make, flag
        self.local = threading.local()
        self.size = os.fstat(mf.fd).st_size
        # Our own open file: lseek moves the offset, which the save's fd keeps.
        try:
            self.seek_fd = os.open(f"/proc/self/fd/{mf.fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.seek_fd = -1

    def close(self) -> None:
        if self.seek_fd >= 0:
            os.close(self.seek_fd)
            self.seek_fd = -1

    def _pread(self, buf: memoryview, offset: int) -> None:
        got = 0
        while got < len(buf):
            k = os.preadv(self.fd, [buf[got:]], offset + got)
            if k == 0:
                raise CorruptFile("page data ends early", path=self.path, offset=offset + got)
            got += k

    def _data_pages(self, run: Run) -> list[tuple[int, int]]:
        """Pages [a, z) of a contiguous run that hold data (not wholly in a hole)."""
        start, end = run.file_offset, run.file_offset + run.count * BLOCK
        if self.seek_fd < 0 or end > self.size:  # past the end: read, and fail there
            return [(0, run.count)]
        out: list[tuple[int, int]] = []
        pos = start
        while pos < end:
            try:
                d = os.lseek(self.seek_fd, pos, os.SEEK_DATA)
                h = os.lseek(self.seek_fd, d, os.SEEK_HOLE) if d < end else end
            except OSError as e:
                if e.errno == errno.ENXIO:  # only holes from pos to the end of the file
                    break
                return [(0, run.count)]  # a file system without it: read everything
            if d >= end:
                break
            a, z = (d - start) // BLOCK, _blocks(min(h, end) - start, BLOCK)
            if out and a <= out[-1][1]:
                out[-1] = (out[-1][0], z)
            else:
                out.append((a, z))
            pos = start + z * BLOCK
        return out

    def pack(self, b: _Batch) -> tuple[np.ndarray, list[int], list[int], bytes, int]:
        """(indices of the nonzero pages, their sizes, flags, data, bytes covered)."""
        t = self.local
        if not hasattr(t, "buf"):
            t.buf = np.empty((BATCH_PAGES, BLOCK), dtype=np.uint8)
            t.scratch = bytearray()
            t.compress = self.make()
        buf: np.ndarray = t.buf
        rows_read: list[tuple[int, int]] = []
        covered = 0
        for run, at in b.pieces:
            if run.stride == BLOCK:
                for a, z in self._data_pages(run):
                    self._pread(buf[at + a:at + z].data.cast("B"), run.file_offset + a * BLOCK)
                    rows_read.append((at + a, at + z))
            else:  # stream page records: data every stride bytes
                span = (run.count - 1) * run.stride + BLOCK
                if len(t.scratch) < run.count * run.stride:
                    t.scratch = bytearray(run.count * run.stride)
                self._pread(memoryview(t.scratch)[:span], run.file_offset)
                src = np.frombuffer(t.scratch, dtype=np.uint8, count=run.count * run.stride)
                np.copyto(buf[at:at + run.count],
                          src.reshape(run.count, run.stride)[:, :BLOCK])
                rows_read.append((at, at + run.count))
            covered += run.count * BLOCK
        found = [a + np.flatnonzero(buf[a:z].view(np.uint64).any(axis=1)) for a, z in rows_read]
        idx = np.concatenate(found) if found else np.zeros(0, dtype=np.intp)
        if self.flag == 0:  # none: every nonzero page raw, gathered at once
            n = int(idx.size)
            return idx, [BLOCK] * n, [0] * n, buf[idx].tobytes(), covered
        mv = buf.data.cast("B")
        base = buf.ctypes.data
        compress = t.compress
        parts, sizes, flags = [], [], []
        for i in idx.tolist():
            page = mv[i * BLOCK:(i + 1) * BLOCK]
            c = compress(page, base + i * BLOCK)
            if len(c) < BLOCK:
                parts.append(c)
                sizes.append(len(c))
                flags.append(self.flag)
            else:  # readers take a page of exactly block size as raw
                parts.append(bytes(page))
                sizes.append(BLOCK)
                flags.append(0)
        return idx, sizes, flags, b"".join(parts), covered


def _workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _write_pages(mf: MigrationFile, core: ElfCore[RAMBlock], lay: KdumpLayout, fd: int, codec: str,
                 progress: Callable[[int], None] | None) -> int:
    """Descriptors and page data; returns the file's size."""
    packer = _Packer(mf, page_compressor(codec), CODECS[codec])
    zero = lay.data_offset
    data = BackgroundWriter(fd, zero)
    descs: list[bytes] = []
    desc_at = lay.desc_offset  # where descs go
    pos = zero + BLOCK
    workers = _workers()

    def flush_descs() -> None:
        nonlocal desc_at
        blob = b"".join(descs)
        descs.clear()
        done = 0
        while done < len(blob):
            done += os.pwrite(fd, memoryview(blob)[done:], desc_at + done)
        desc_at += len(blob)

    def consume(b: _Batch, fut: Future[tuple[np.ndarray, list[int], list[int], bytes, int]]
                ) -> None:
        nonlocal pos
        idx, sizes, flags, blob, read = fut.result()
        d = np.zeros(b.pages, dtype=PAGE_DESC)
        d["offset"] = zero
        d["size"] = BLOCK
        if idx.size:
            sz = np.asarray(sizes, dtype=np.int64)
            d["offset"][idx] = pos + np.cumsum(sz) - sz
            d["size"][idx] = sz
            d["flags"][idx] = flags
        data.write(blob)
        pos += len(blob)
        descs.append(d.tobytes())
        if len(descs) >= 64:
            flush_descs()
        if progress is not None and read:
            progress(read)

    pool = ThreadPoolExecutor(workers, thread_name_prefix="fixedram-kdump")
    window: deque[tuple[_Batch, Future[tuple[np.ndarray, list[int], list[int], bytes, int]]]]
    window = deque()
    done = False
    try:
        data.write(bytes(BLOCK))  # the zero page every zero frame points at
        # Batches are consumed in order, so data and descriptors both go in frame order.
        for b in _batches(core.loads):
            window.append((b, pool.submit(packer.pack, b)))
            if len(window) > 2 * workers:
                consume(*window.popleft())
        while window:
            consume(*window.popleft())
        flush_descs()
        done = True
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        packer.close()
        # Stop the data writer before the caller closes the descriptor; after another
        # error, its own (e.g. the same ENOSPC) must not hide that one.
        if done:
            data.close()
        else:
            with contextlib.suppress(OSError):
                data.close()
    return pos


# -- the command ------------------------------------------------------------------

def _warn(path: str, warnings: Sequence[str]) -> None:
    for w in warnings:
        w = w.replace("in the ELF core", "in the kdump file")
        elfcore_log.warning("fixedram: warning: %s: %s", path, w)


def extract_kdump(save: Save, output: str, *, compress: str | None = None,
                  force: bool = False, allow_incomplete: bool = False,
                  progress: Callable[[int], None] | None = None) -> KdumpLayout:
    """Write ``save``'s guest memory as a compressed kdump file at ``output``.

    :param compress: a key of :data:`CODECS`; default :data:`DEFAULT_CODEC`.
    :raise UsageError: ``-o -``, a one-pass input, a codec without its library.
    :raise UnsupportedFeature: no Linux VMCOREINFO note in guest RAM (the readers
        of this format need one), or pages that are not 4 KiB.
    :raise IncompleteSave: the save has no end, without ``allow_incomplete``.
    """
    codec = compress or DEFAULT_CODEC
    page_compressor(codec)  # a missing library is said before anything is written
    if output == "-":
        raise UsageError("--format kdump cannot go to standard output: its page "
                         "descriptors are written after the pages they describe are sized")
    if not isinstance(save, MigrationFile):
        raise UsageError(f"{save.path}: --format kdump needs an input file that can be read "
                         "at any offset (not a pipe or a compressed image)")
    mf = save
    if not mf.complete and not allow_incomplete:
        raise IncompleteSave(f"{mf.path}: the save is incomplete "
                             f"({mf.error or 'unfinished'}); use --allow-incomplete to "
                             "extract what it holds")
    with AtomicOutput(output, force=force) as out:
        core = build_core(mf, scan_ram=True)
        if core.vmcoreinfo is None:
            raise UnsupportedFeature("no Linux VMCOREINFO note in guest RAM, and crash, "
                                     "makedumpfile and drgn read a kdump file only with one: "
                                     "use --format elf", path=mf.path)
        if core.machine != EM_X86_64:  # the sub header's layout is the 64-bit kernel's
            raise UnsupportedFeature("the vCPUs are not in long mode, and this kdump writer "
                                     "is for x86-64 kernels: use --format elf", path=mf.path)
        _warn(mf.path, core.warnings)
        lay = kdump_layout(core.loads, len(core.notes))
        try:
            head = _headers(core, lay, codec, mf)
            os.pwrite(out.fd, head, 0)
            for half in (0, lay.bitmap_bytes):  # bitmap 1 (present) = bitmap 2 (dumped)
                for at, chunk in bitmap_chunks(lay.spans, lay.bitmap_bytes):
                    os.pwrite(out.fd, chunk, lay.bitmap_offset + half + at)
            size = _write_pages(mf, core, lay, out.fd, codec, progress)
            out.commit(size)
        except OSError as e:
            raise output_error(out.path, e) from e
    return lay
