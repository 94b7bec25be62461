"""The file-level object: a QEMU migration file opened for random access.

``MigrationFile`` parses the stream once and keeps an index: for a mapped-ram
file that is each block's header (bitmaps load lazily); for a sequential
stream it is, per page, the file offset of the *last* copy sent, because a
live migration re-sends pages and the last copy wins. Page data is never
held in memory: readers get coalesced runs and copy them with positional I/O.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import BadMagic, CorruptFile, InputError, TruncatedFile, UnsupportedFeature
from ..io.source import ByteSource, FileSource, SourceReader
from .constants import STREAM_MAGIC_BYTES
from .primitives import ByteReader
from .ram import PageBudget, RAMBlockRecord, RamStreamState, ResendLedger
from .walker import (
    BlockFacts,
    PageTarget,
    SaveFacts,
    StreamEvents,
    StreamSummary,
    read_vmdesc_at_end,
    walk_stream,
)

if TYPE_CHECKING:
    from .stream import SectionHeader

__all__ = ["MigrationFile", "RAMBlock", "Run", "find_stream_start"]

# How far into a file the stream magic is looked for when no offset is given
# (file: URIs with offset=, libvirt save images with their XML and padding).
MAX_START_SEARCH = 64 << 20
_LE_MACHINE_PREFIXES = ("pc", "q35", "microvm", "isapc", "virt", "x-remote", "xenfv", "xenpv")

# Pages handed to a walk's target per call (1 MiB of 4 KiB pages).
WALK_RUN_PAGES = 256

# Location codes in the stream index (file offsets of data are > 0).
LOC_NONE = 0
LOC_ZERO = -1


@dataclass(frozen=True)
class Run:
    """``count`` guest pages starting at page ``first`` whose data sit at
    ``file_offset + k * stride`` in the file (stride = page size for
    mapped-ram, page size + 8 for a stream of CONTINUE page records)."""

    first: int
    count: int
    file_offset: int
    stride: int

    def clip(self, lo: int, hi: int) -> Run | None:
        """The part of this run within pages [lo, hi), or None."""
        a, b = max(self.first, lo), min(self.first + self.count, hi)
        if a >= b:
            return None
        return Run(a, b - a, self.file_offset + (a - self.first) * self.stride, self.stride)


def find_stream_start(fd: int, size: int, path: str, limit: int = MAX_START_SEARCH) -> int:
    """Offset of the QEVM magic: 0, or after a prefix (file offset, libvirt header)."""
    head = os.pread(fd, 9, 0)
    if head[:8] == STREAM_MAGIC_BYTES:
        return 0
    step = 1 << 20
    pos = 0
    while pos < min(size, limit):
        buf = os.pread(fd, step + 8, pos)
        i = buf.find(STREAM_MAGIC_BYTES)
        if i >= 0:
            return pos + i
        pos += step
    if head[:4] == b"QEVM":
        return 0  # let the header parser report the version
    raise BadMagic("not a QEMU migration file: no QEVM stream magic found "
                   f"in the first {min(size, limit)} bytes", path=path, offset=0)


def _count_sends(sends: np.ndarray, idx: np.ndarray) -> None:
    # A batch is almost always ascending pages (no repeats): plain fancy add.
    if idx.size < 2 or bool((idx[1:] > idx[:-1]).all()):
        sends[idx] += 1
    else:
        np.add.at(sends, idx, 1)


class _StreamIndex(StreamEvents):
    """RAM sink for files: remembers where the last copy of each page is.

    A block's arrays are allocated when its first record arrives, once the
    file's size is seen to hold records for its whole length
    (:class:`~fixedram.format.ram.PageBudget`).
    """

    def __init__(self, path: str, stream_bytes: int) -> None:
        self.path = path
        self.budget = PageBudget(path)
        self.stream_bytes = stream_bytes
        self.records: list[RAMBlockRecord] = []
        self.loc: list[np.ndarray | None] = []
        self.sends: list[np.ndarray | None] = []
        self.page_records = 0
        self.zero_records = 0
        self.ledger: ResendLedger | None = None
        self.mapped = False
        self.announced = False  # the whole RAMBlock list was read
        self.progress: Callable[[int], None] | None = None
        self.reported = 0  # bytes reported to progress

    def section(self, sh: SectionHeader) -> None:
        if self.progress is not None and sh.offset > self.reported:
            self.progress(sh.offset - self.reported)
            self.reported = sh.offset

    def ram_blocks(self, state: RamStreamState) -> None:
        self.mapped = state.mapped_ram
        self.announced = True
        if not self.mapped:  # mapped-ram files need no index: the bitmap is one
            self.records = state.blocks
            self.loc = [None] * len(state.blocks)
            self.sends = [None] * len(state.blocks)
            self.ledger = ResendLedger(state.blocks, state.page_size)

    def _arrays(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        loc, sends = self.loc[block], self.sends[block]
        if loc is not None and sends is not None:
            return loc, sends
        rec = self.records[block]
        self.budget.claim(rec, rec.npages, self.stream_bytes, what="a file of this size")
        loc = self.loc[block] = np.zeros(rec.npages, dtype=np.int64)
        sends = self.sends[block] = np.zeros(rec.npages, dtype=np.uint32)
        return loc, sends

    def page(self, block: int, page_index: int, r: ByteReader) -> None:
        # Skip first: a copy cut off by the end of the file must not replace
        # the last complete one.
        at = r.tell()
        r.skip(self.records[block].page_size, "page data")
        loc, sends = self._arrays(block)
        loc[page_index] = at
        sends[page_index] += 1
        self.page_records += 1

    def zero(self, block: int, page_index: int) -> None:
        loc, sends = self._arrays(block)
        loc[page_index] = LOC_ZERO
        sends[page_index] += 1
        self.zero_records += 1

    def named(self, block: int, page_index: int) -> None:
        sends = self.sends[block]
        assert self.ledger is not None and sends is not None  # a record came first
        self.ledger.named(block, page_index, int(sends[page_index]))

    def pages_batch(self, block: int, page_index: np.ndarray, data: np.ndarray,
                    positions: np.ndarray) -> None:
        # Within one batch a page appears at most once in practice; if it did
        # twice, fancy assignment keeps the last, which is the right copy.
        loc, sends = self._arrays(block)
        loc[page_index] = positions
        _count_sends(sends, page_index)
        self.page_records += page_index.size

    def zeros_batch(self, block: int, page_index: np.ndarray) -> None:
        loc, sends = self._arrays(block)
        loc[page_index] = LOC_ZERO
        _count_sends(sends, page_index)
        self.zero_records += page_index.size


_EMPTY = np.zeros(0, dtype=np.int64)


class RAMBlock(BlockFacts):
    """One guest RAMBlock in a migration file, with lazy access to its pages."""

    def __init__(self, mf: MigrationFile, index: int, rec: RAMBlockRecord) -> None:
        super().__init__(index, rec)
        self._mf = mf

    # -- page validity -------------------------------------------------------

    @cached_property
    def _bitmap_bits(self) -> np.ndarray:
        """Every bit of the on-disk bitmap (whole words, so past the last page too)."""
        m = self.record.mapped
        if m is None:
            raise TypeError("bitmap exists only in mapped-ram files")
        n = self.record.bitmap_bytes
        mf = self._mf
        if m.bitmap_offset + n > mf.size:
            raise CorruptFile(f"bitmap of RAMBlock {self.idstr!r} ({n} bytes) runs past the "
                              "end of the file", path=mf.path, offset=m.bitmap_offset)
        try:
            raw = mf.source.pread(n, m.bitmap_offset)
        except TruncatedFile:
            raise CorruptFile(f"short read of the bitmap of RAMBlock {self.idstr!r}",
                              path=mf.path, offset=m.bitmap_offset) from None
        # 64-bit little-endian unsigned longs: byte i/8, bit i%8, LSB first.
        return np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")

    @cached_property
    def bitmap(self) -> np.ndarray:
        """Mapped-ram only: the file's bitmap as one bool per page."""
        return self._bitmap_bits[: self.npages].astype(bool)

    @property
    def bitmap_tail_clean(self) -> bool:
        """True when no bit past the last page is set (a sanity check)."""
        return not self._bitmap_bits[self.npages:].any()

    @property
    def _loc(self) -> np.ndarray | None:
        """Stream index of this block; None when no record named it."""
        assert self._mf._index is not None
        return self._mf._index.loc[self.index]

    def present(self) -> np.ndarray:
        """One bool per page: the file holds data for it (else it reads as zero).

        Dense: one byte per page of the block. Prefer :meth:`present_pages`,
        whose size follows what the file holds rather than the block's length.
        """
        if self.record.mapped is not None:
            return self.bitmap
        loc = self._loc
        return loc > 0 if loc is not None else np.zeros(self.npages, dtype=bool)

    def present_pages(self) -> np.ndarray:
        """Ascending indices of the pages the file holds data for."""
        if self.record.mapped is not None:
            return np.flatnonzero(self.bitmap)
        loc = self._loc
        return np.flatnonzero(loc > 0) if loc is not None else _EMPTY

    def zeroed_pages(self) -> np.ndarray:
        """Ascending indices of the pages whose last copy was a ZERO record.

        Always empty for mapped-ram, which never records zero pages: a clear
        bit means "not written", and QEMU's loader leaves such a page as it is.
        """
        loc = self._loc if self.record.mapped is None else None
        return np.flatnonzero(loc == LOC_ZERO) if loc is not None else _EMPTY

    def data_offsets(self) -> np.ndarray:
        """File offset of each page's data, 0 where the page reads as zero (dense)."""
        return self._data_offsets(0, self.npages)

    def _data_offsets(self, first: int, end: int) -> np.ndarray:
        if self.record.mapped is not None:
            m = self.record.mapped
            off = m.pages_offset + np.arange(first, end, dtype=np.int64) * self.page_size
            return np.where(self.bitmap[first:end], off, 0)
        loc = self._loc
        if loc is None:
            return np.zeros(end - first, dtype=np.int64)
        part = loc[first:end]
        return np.where(part > 0, part, 0)

    @property
    def pages_present(self) -> int:
        if self.record.mapped is not None:
            return int(np.count_nonzero(self.bitmap))
        loc = self._loc
        return int(np.count_nonzero(loc > 0)) if loc is not None else 0

    @property
    def zero_pages(self) -> int | None:
        """Pages last sent as zero (streams); None for mapped-ram, which does
        not tell a zero page from one never sent."""
        if self.record.mapped is not None:
            return None
        return int(self.zeroed_pages().size)

    def copies(self) -> np.ndarray:
        """Per page, how many copies of it the file holds (dense uint32).

        A stream counts every data and ZERO record sent for the page, re-sends
        included; mapped-ram has one slot per page, so 1 where the bitmap is set.
        """
        if self.record.mapped is not None:
            return self.bitmap.astype(np.uint32)
        assert self._mf._index is not None
        s = self._mf._index.sends[self.index]
        return s.copy() if s is not None else np.zeros(self.npages, dtype=np.uint32)

    @property
    def max_sends(self) -> int:
        if self.record.mapped is not None:
            return 1 if self.pages_present else 0
        assert self._mf._index is not None
        s = self._mf._index.sends[self.index]
        return int(s.max()) if s is not None and s.size else 0

    # -- runs ----------------------------------------------------------------

    def runs(self, max_pages: int = 256) -> Iterator[Run]:
        """Coalesced runs of present pages, each at most ``max_pages`` long."""
        ps = self.page_size
        if self.record.mapped is not None:
            stride = ps
            base = self.record.mapped.pages_offset
            present = self.bitmap
            # Edges of runs of set bits.
            d = np.diff(np.concatenate(([False], present, [False])).astype(np.int8))
            starts = np.flatnonzero(d == 1)
            ends = np.flatnonzero(d == -1)
            for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
                for f in range(s, e, max_pages):
                    n = min(max_pages, e - f)
                    yield Run(f, n, base + f * ps, stride)
            return
        loc = self._loc
        if loc is None:
            return
        idx = np.flatnonzero(loc > 0)
        if idx.size == 0:
            return
        offs = loc[idx]
        stride = ps + 8  # a CONTINUE page record: be64 header + data
        brk = np.flatnonzero((np.diff(idx) != 1) | (np.diff(offs) != stride)) + 1
        bounds = np.concatenate(([0], brk, [idx.size])).tolist()
        idx_l = idx.tolist()
        offs_l = offs.tolist()
        for a, b in itertools.pairwise(bounds):
            for f in range(a, b, max_pages):
                n = min(max_pages, b - f)
                yield Run(idx_l[f], n, offs_l[f], stride if n > 1 else ps)

    def read(self, offset: int, length: int) -> bytes:
        """Guest bytes ``[offset, offset+length)`` of this block (zeros where absent)."""
        if offset < 0 or length < 0 or offset + length > self.used_length:
            raise ValueError(f"range 0x{offset:x}+0x{length:x} outside RAMBlock {self.idstr!r}")
        ps = self.page_size
        out = bytearray(length)
        if length == 0:
            return bytes(out)
        first, last = offset // ps, (offset + length - 1) // ps
        offs = self._data_offsets(first, last + 1).tolist()
        for k, fo in enumerate(offs):
            if not fo:
                continue
            pg = first + k
            a = max(offset, pg * ps)
            b = min(offset + length, (pg + 1) * ps)
            data = self._mf.source.pread(b - a, fo + (a - pg * ps))
            out[a - offset:a - offset + len(data)] = data
        return bytes(out)


class MigrationFile(SaveFacts[RAMBlock]):
    """A QEMU migration file: a sequential stream or a mapped-ram file.

    Opening parses the whole stream structure once (seeking past page data)
    and raises a :class:`~fixedram.errors.FormatError` subclass for anything
    malformed. A file that ends before the EOF marker opens with
    ``strict=False`` and reports ``complete = False``.

    :param path: the file.
    :param offset: where the stream starts; default: find the QEVM magic.
    :param strict: raise on an incomplete (truncated) stream.
    :param progress: called with the bytes walked since its last call (at
        each RAM section, so a caller can show how far indexing a large
        stream has got); the calls add up to the file's size.
    :param source: read the stream from this byte source instead of opening
        ``path`` (which then only names the input), e.g. the VM state of a
        qcow2 snapshot; the file owns it and closes it. Its stream starts at
        ``offset`` (default 0). When the source has no descriptor, ``fd`` is
        -1: read through :attr:`source`.
    """

    def __init__(self, path: str | os.PathLike[str], *, offset: int | None = None,
                 strict: bool = True, progress: Callable[[int], None] | None = None,
                 source: ByteSource | None = None) -> None:
        if source is not None:
            self._open_source(path, source, offset, strict, progress)
            return
        self.path = self.input_path = os.fspath(path)
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below.
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise InputError(self.path, e) from e
        try:
            st = os.fstat(self.fd)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, "Is a directory", self.path)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise OSError(errno.ESPIPE, "not a file (a FIFO, socket or device cannot be "
                              "read at offsets; save the stream to a file first)", self.path)
            regular = stat.S_ISREG(st.st_mode)
            self.size = st.st_size if regular else os.lseek(self.fd, 0, os.SEEK_END)
            os.set_blocking(self.fd, True)
            self.source: ByteSource = FileSource(self.fd, self.path, self.size)
            self._open(offset, strict, progress)
        except OSError as e:
            os.close(self.fd)
            if isinstance(e, InputError):
                raise
            raise InputError(self.path, e) from e
        except BaseException:
            os.close(self.fd)
            raise

    def _open_source(self, path: str | os.PathLike[str], source: ByteSource,
                     offset: int | None, strict: bool,
                     progress: Callable[[int], None] | None) -> None:
        self.input_path = os.fspath(path)
        self.path = source.name
        self.source = source
        self.size = source.size
        self.fd = -1 if source.fd is None else source.fd
        try:
            self._open(0 if offset is None else offset, strict, progress)
        except BaseException:
            source.close()
            raise

    def _open(self, offset: int | None, strict: bool,
              progress: Callable[[int], None] | None) -> None:
        from .libvirt import LibvirtHeader, probe_libvirt

        self.libvirt: LibvirtHeader | None = None
        if self.fd >= 0:
            self.libvirt = probe_libvirt(self.fd, self.size, self.path)
        if offset is None:
            offset = (self.libvirt.data_offset if self.libvirt is not None
                      else find_stream_start(self.fd, self.size, self.path))
        if offset < 0 or offset >= self.size:
            raise CorruptFile(f"stream offset {offset} is outside the file (size {self.size})",
                              path=self.path, offset=0)
        self.start = offset
        vmdesc = read_vmdesc_at_end(self.source, offset)
        self.error: TruncatedFile | None = None
        index = _StreamIndex(self.path, self.size - offset)
        index.progress = progress
        # A plain file is read through a descriptor of its own (the reader may map it).
        f: Any = (os.fdopen(os.dup(self.fd), "rb", buffering=0) if self.fd >= 0
                  else SourceReader(self.source))
        with f:
            f.seek(offset)
            r = ByteReader(f, self.path, start=offset)
            try:
                self.summary: StreamSummary = walk_stream(r, index, index, vmdesc=vmdesc)
            except TruncatedFile as e:
                # An unfinished save still has readable RAM: keep what was found.
                if strict or index.summary is None:
                    raise
                self.error = e
                self.summary = index.summary
                if not index.announced:
                    # Cut inside the RAMBlock list: no block is known whole.
                    self.summary.ram.blocks = []
        if progress is not None:
            progress(self.size - index.reported)
        self._index = None if index.mapped else index
        if index.mapped:
            self._check_bitmap_layout(self.summary.header.machine)
        self.blocks = [RAMBlock(self, i, rec) for i, rec in enumerate(self.summary.ram.blocks)]

    def _check_bitmap_layout(self, machine: str | None) -> None:
        if machine is not None and not machine.startswith(_LE_MACHINE_PREFIXES):
            raise UnsupportedFeature(
                f"mapped-ram bitmap layout of machine type {machine!r} is not known: only files "
                "from 64-bit little-endian hosts (x86-64, aarch64) are read", path=self.path,
                offset=self.start)

    # -- context manager -------------------------------------------------------

    def close(self) -> None:
        if isinstance(self.source, FileSource):
            if self.fd >= 0:
                os.close(self.fd)
        else:
            self.source.close()
        self.fd = -1

    # -- facts ---------------------------------------------------------------

    def walked(self) -> StreamSummary:
        return self.summary

    def walk(self, target: PageTarget | None = None, *,
             strict: bool | None = None) -> MigrationFile:
        if target is None:
            return self
        target.begin(self)
        buf = np.empty(0, dtype=np.uint8)
        for b in self.blocks:
            ps = b.page_size
            for run in b.runs(WALK_RUN_PAGES):
                need = run.count * run.stride
                if buf.size < need:
                    buf = np.empty(need, dtype=np.uint8)
                n = (run.count - 1) * run.stride + ps  # the last page has no record after it
                got = self.source.preadv([buf.data[:n]], run.file_offset)
                if got != n:
                    raise TruncatedFile(f"RAMBlock {b.idstr!r}: page data cut short",
                                        path=self.path, offset=run.file_offset + got)
                data = buf[:need].reshape(run.count, run.stride)[:, :ps]
                target.pages(b.index, np.arange(run.first, run.first + run.count,
                                                dtype=np.int64), data)
            zeroed = b.zeroed_pages()
            if zeroed.size:
                target.zeros(b.index, zeroed.astype(np.int64), np.zeros(zeroed.size, dtype=bool))
        return self

    @property
    def bytes_read(self) -> int:
        return self.size

    @property
    def resent_bytes(self) -> int:
        """Bytes of the page and zero records in the file that a later copy of
        the same page superseded (see :class:`~.ram.ResendLedger`)."""
        ix = self._index
        if ix is None or ix.ledger is None:
            return 0
        data = [0 if loc is None else int(np.count_nonzero(loc > 0)) for loc in ix.loc]
        zero = [0 if loc is None else int(np.count_nonzero(loc == LOC_ZERO)) for loc in ix.loc]
        return ix.ledger.superseded_bytes(ix.page_records, ix.zero_records, ix.sends, data, zero)

    def allocated_bytes(self) -> int:
        return self.input_sizes()[1] or 0

    def input_sizes(self) -> tuple[int | None, int | None]:
        if not isinstance(self.source, FileSource):
            return self.size, self.source.allocated_bytes()
        st = os.fstat(self.fd)
        return st.st_size, st.st_blocks * 512
