"""The RAM section ("ram", version 4): block list, page records, mapped-ram header.

Every record starts with a be64 holding ``offset_in_block | flags``; the flags
live in the low TARGET_PAGE_BITS bits. See docs/formats.md for the layout and
``migration/ram.c`` in QEMU for the source of these facts.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np

from ..errors import CorruptFile, UnsupportedFeature, UnsupportedVersion
from .constants import (
    MAPPED_RAM_FILE_OFFSET_ALIGNMENT,
    MAPPED_RAM_HDR_SIZE,
    MAPPED_RAM_HDR_VERSION,
    MAX_BLOCK_BYTES,
    MAX_PAGE_SIZE,
    RAM_FLAG_COMPRESS_PAGE,
    RAM_FLAG_CONTINUE,
    RAM_FLAG_EOS,
    RAM_FLAG_HOOK,
    RAM_FLAG_MEM_SIZE,
    RAM_FLAG_MULTIFD_FLUSH,
    RAM_FLAG_PAGE,
    RAM_FLAG_XBZRLE,
    RAM_FLAG_ZERO,
    TARGET_PAGE_SIZE,
)
from .primitives import BE64, ByteReader

if TYPE_CHECKING:
    from mmap import mmap

__all__ = [
    "MappedRamHeader",
    "PageBudget",
    "RAMBlockRecord",
    "RamNamingSink",
    "RamRecordSink",
    "RamStreamState",
    "ResendLedger",
    "encode_block_record",
    "encode_mapped_ram_header",
    "mapped_ram_layout",
]

_MRH = struct.Struct(">IQQQ")


@dataclass(frozen=True)
class MappedRamHeader:
    """The 28-byte per-RAMBlock header of a mapped-ram file (all big-endian)."""

    version: int
    page_size: int
    bitmap_offset: int  # absolute file offset of the bitmap
    pages_offset: int  # absolute file offset of page 0
    offset: int = 0  # where the header itself sits

    def encode(self) -> bytes:
        return _MRH.pack(self.version, self.page_size, self.bitmap_offset, self.pages_offset)


def encode_mapped_ram_header(page_size: int, bitmap_offset: int, pages_offset: int) -> bytes:
    return _MRH.pack(MAPPED_RAM_HDR_VERSION, page_size, bitmap_offset, pages_offset)


@dataclass
class RAMBlockRecord:
    """One RAMBlock as announced in the MEM_SIZE list of the START section."""

    idstr: str
    used_length: int
    record_offset: int  # absolute offset of the idlen byte
    page_size: int
    postcopy_page_size: int | None = None
    # x-ignore-shared only: the memory region's offset in its parent container
    # (QEMU's mr->addr), which is not the guest-physical address of the block.
    gpa: int | None = None
    mapped: MappedRamHeader | None = None

    @property
    def npages(self) -> int:
        return self.used_length // self.page_size

    @property
    def bitmap_bytes(self) -> int:
        """Size QEMU gives the bitmap on a 64-bit host: whole unsigned longs."""
        return (self.npages + 63) // 64 * 8


# Per-page memory a stream may make a reader keep: a floor for small streams
# plus a multiple of the stream's bytes. A complete precopy stream sends every
# page at least once (9 bytes or more each) and a reader keeps at most 12
# bytes a page, so real streams stay far below this; a forged block length
# cannot make a reader allocate for it.
INDEX_FLOOR = 64 << 20
INDEX_PER_FILE_BYTE = 16
# int64 location + uint32 send count + the resend ledger's uint32 (ResendLedger)
LEDGER_BYTES_PER_PAGE = 4
INDEX_BYTES_PER_PAGE = 12 + LEDGER_BYTES_PER_PAGE


class PageBudget:
    """The pages a stream's bytes can hold records for, claimed block by block.

    Every reader claims pages here before it allocates per-page state or
    writes a page out. A seekable reader knows the stream's size first and
    claims a block's whole length at its first record. A one-pass reader (a
    pipe, a decompressed stream, a socket) knows only the bytes read so far:
    it claims up to the highest page a record has named (its arrays grow
    with what arrived), and once the stream has ended, the whole length of
    every block a record named, against the stream's size as a file would.
    Not thread-safe: callers from several threads hold a lock.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._claimed: dict[str, int] = {}
        self.total = 0

    @staticmethod
    def pages_for(stream_bytes: int) -> int:
        """Pages a stream of ``stream_bytes`` bytes may claim in all."""
        return (INDEX_FLOOR + INDEX_PER_FILE_BYTE * stream_bytes) // INDEX_BYTES_PER_PAGE

    def claimed(self, rec: RAMBlockRecord) -> int:
        return self._claimed.get(rec.idstr, 0)

    def claim(self, rec: RAMBlockRecord, pages: int, stream_bytes: int, *,
              what: str | None = None) -> None:
        """Claim pages [0, ``pages``) of ``rec`` (the total over blocks must fit).

        :param what: the stream's size in words, when it is the whole stream
            ("a file of this size"); None while the stream is still arriving.
        :raise CorruptFile: at the block's record, naming its declared length.
        """
        old = self._claimed.get(rec.idstr, 0)
        if pages <= old:
            return
        total = self.total + pages - old
        if total > self.pages_for(stream_bytes):
            if what is not None:
                msg = (f"RAMBlock {rec.idstr!r} declares {rec.npages} pages, more than {what} "
                       "can hold records for")
            else:
                msg = (f"RAMBlock {rec.idstr!r} declares {rec.npages} pages and a record for "
                       f"its page {pages - 1} came after {stream_bytes} stream bytes, more than "
                       "so few bytes can hold records for")
            raise CorruptFile(msg, path=self.path, offset=rec.record_offset)
        self._claimed[rec.idstr] = pages
        self.total = total


def mapped_ram_layout(record_offset: int, idstr: str, used_length: int, page_size: int,
                      ignore_shared: bool = False) -> tuple[int, int, int, int]:
    """Where QEMU puts a block's header, bitmap and pages in a mapped-ram file.

    :return: (header_offset, bitmap_offset, pages_offset, next_record_offset),
        all absolute, following QEMU's rules: the bitmap right after the header,
        pages rounded up to 1 MiB of absolute offset, the next record right
        after the pages region (unaligned).
    """
    h = record_offset + 1 + len(idstr.encode()) + 8 + (8 if ignore_shared else 0)
    b = h + MAPPED_RAM_HDR_SIZE
    npages = used_length // page_size
    s = (npages + 63) // 64 * 8
    a = MAPPED_RAM_FILE_OFFSET_ALIGNMENT
    p = (b + s + a - 1) // a * a
    return h, b, p, p + used_length


def encode_block_record(idstr: str, used_length: int, *, gpa: int | None = None,
                        mapped: bytes = b"") -> bytes:
    name = idstr.encode()
    out = bytes([len(name)]) + name + BE64.pack(used_length)
    if gpa is not None:
        out += BE64.pack(gpa)
    return out + mapped


class RamRecordSink(Protocol):
    """Receives what the RAM record parser finds; one instance per reader.

    ``page`` must consume exactly ``page_size`` bytes from ``r`` (read or skip),
    which lets an index builder skip data while a receiver copies it.

    A sink may also offer the batch methods of :class:`RamBatchSink`; the
    parser then hands over whole runs of CONTINUE records found in its
    buffer at once (a pass of a live migration is mostly such runs), and the
    ``named`` method of :class:`RamNamingSink`, told which records named
    their block (what a record costs in the file depends on it).
    """

    def page(self, block: int, page_index: int, r: ByteReader) -> None: ...

    def zero(self, block: int, page_index: int) -> None: ...


class RamNamingSink(RamRecordSink, Protocol):
    def named(self, block: int, page_index: int) -> None:
        """The record just handed over named its block (it did not CONTINUE)."""


class RamBatchSink(RamRecordSink, Protocol):
    def pages_batch(self, block: int, page_index: np.ndarray, data: np.ndarray,
                    positions: np.ndarray) -> None:
        """``data`` is an (n, page_size) view valid only during the call;
        ``positions`` the absolute file offsets of each page's data."""

    def zeros_batch(self, block: int, page_index: np.ndarray) -> None: ...


# A record's bytes in the file (QEMU's save_page_header, save_normal_page and
# save_zero_page): a be64 header, the block's name (a length byte and the idstr)
# when the record does not CONTINUE the previous record's block, then the page
# (PAGE) or one fill byte (ZERO).
RECORD_HEADER = 8
ZERO_FILL = 1


class ResendLedger:
    """The bytes a stream spent on copies of pages that a later copy superseded.

    Fed by a reader's RAM sink, which keeps per page its send count and the
    kind of its last copy; the ledger adds what only the record layout knows:
    which records named their block. Superseded bytes are then all records'
    bytes less those of each page's last record, so one sum serves the
    seekable and the one-pass reader.

    :param blocks: the RAMBlock list; :param page_size: the target page size.
    """

    # Bytes per page of :attr:`_named_at` (a reader's memory budget counts it).
    BYTES_PER_PAGE = LEDGER_BYTES_PER_PAGE

    def __init__(self, blocks: list[RAMBlockRecord], page_size: int) -> None:
        self.page_size = page_size
        self._name_bytes = [1 + len(b.idstr.encode()) for b in blocks]
        self._npages = [b.npages for b in blocks]
        self._named = [0] * len(blocks)
        # Per page, its send count just after its latest naming record (0: none):
        # that record was the page's last one iff the count never moved since.
        self._named_at: list[np.ndarray | None] = [None] * len(blocks)

    def named(self, block: int, page_index: int, sends: int) -> None:
        """A record of ``page_index`` named its block; ``sends`` counts it."""
        a = self._named_at[block]
        if a is None or page_index >= a.size:
            # Grown with the pages named, as the readers' arrays grow: a declared
            # length is not allocated for before the stream backs it.
            have = 0 if a is None else a.size
            n = min(self._npages[block], max(page_index + 1, 2 * have, 1 << 16))
            grown = np.zeros(n, dtype=np.uint32)
            if a is not None:
                grown[:have] = a
            a = self._named_at[block] = grown
        a[page_index] = sends
        self._named[block] += 1

    def superseded_bytes(self, page_records: int, zero_records: int,
                         sends: list[np.ndarray | None], last_data: list[int],
                         last_zero: list[int]) -> int:
        """Bytes of the records a later copy of their page superseded.

        :param page_records: PAGE records read; :param zero_records: ZERO records.
        :param sends: per block, each page's send count (None: no record).
        :param last_data: per block, pages whose last copy is a PAGE record.
        :param last_zero: per block, pages whose last copy is a ZERO record.
        """
        page_rec, zero_rec = RECORD_HEADER + self.page_size, RECORD_HEADER + ZERO_FILL
        total = page_records * page_rec + zero_records * zero_rec
        last = 0
        for bi, nb in enumerate(self._name_bytes):
            total += self._named[bi] * nb
            last += last_data[bi] * page_rec + last_zero[bi] * zero_rec
            a, s = self._named_at[bi], sends[bi]
            if a is not None and s is not None:
                n = min(a.size, s.size)  # either may stop short of the block's end
                last += int(np.count_nonzero((a[:n] == s[:n]) & (a[:n] > 0))) * nb
        return total - last


# Look ahead this far for runs of CONTINUE records (bounded by the reader's buffer).
_BATCH_BYTES = 1 << 20
_MIN_BATCH = 4
# Mapped look-ahead for runs longer than the buffer (bounds the mapped RSS).
_MAP_BYTES = 16 << 20


class RamStreamState:
    """Per-stream state of the RAM section parser: blocks and the last block.

    :param mapped_ram: the configuration says ``mapped-ram``; page records
        are then illegal and each block has a mapped-ram header.
    :param ignore_shared: ``x-ignore-shared`` is on; each block carries its GPA.
    """

    def __init__(self, *, mapped_ram: bool, ignore_shared: bool, page_size: int = TARGET_PAGE_SIZE,
                 seek_past_pages: bool = True) -> None:
        self.mapped_ram = mapped_ram
        self.ignore_shared = ignore_shared
        self.page_size = page_size
        self.page_mask = page_size - 1
        self.blocks: list[RAMBlockRecord] = []
        self.by_name: dict[str, int] = {}
        self.last: int | None = None
        self.seek_past_pages = seek_past_pages
        self.total_ram: int | None = None
        # Called once the block list is read, before any page record.
        self.on_blocks: Callable[[], None] | None = None

    # -- block list --------------------------------------------------------

    def _read_mem_size(self, r: ByteReader, total: int, at: int) -> None:
        if self.blocks:
            raise CorruptFile("second RAMBlock list (MEM_SIZE) in one stream", path=r.name,
                              offset=at)
        self.total_ram = total
        left = total
        while left > 0:
            rec_at = r.tell()
            n = r.u8("a RAMBlock name length")
            if n == 0:
                # QEMU's loader looks blocks up by name: there is none it could name "".
                raise CorruptFile("RAMBlock with an empty name", path=r.name, offset=rec_at)
            raw = r.read(n, "a RAMBlock name")
            try:
                idstr = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise CorruptFile(f"RAMBlock name is not text: {raw!r}", path=r.name,
                                  offset=rec_at + 1) from None
            if idstr in self.by_name:
                raise CorruptFile(f"RAMBlock {idstr!r} announced twice", path=r.name,
                                  offset=rec_at)
            len_at = r.tell()
            used = r.be64("a RAMBlock length")
            if used == 0 or used > left or used % self.page_size:
                raise CorruptFile(
                    f"RAMBlock {idstr!r} length 0x{used:x} is not a page multiple within the "
                    f"announced total (0x{left:x} left)", path=r.name, offset=len_at)
            if used > MAX_BLOCK_BYTES:
                raise CorruptFile(f"RAMBlock {idstr!r} length 0x{used:x} is larger than "
                                  f"{MAX_BLOCK_BYTES >> 40} TiB", path=r.name, offset=len_at)
            left -= used
            blk = RAMBlockRecord(idstr, used, rec_at, self.page_size)
            if not self.mapped_ram and not self.ignore_shared:  # both exclude postcopy-ram
                blk.postcopy_page_size = self._postcopy_page_size(r, left)
            if self.ignore_shared:
                blk.gpa = r.be64("a RAMBlock guest address")
            if self.mapped_ram:
                blk.mapped = self._read_mapped_header(r, blk)
            self.by_name[idstr] = len(self.blocks)
            self.blocks.append(blk)
        if self.on_blocks is not None:
            self.on_blocks()

    def _postcopy_page_size(self, r: ByteReader, left: int) -> int | None:
        """The be64 page size QEMU adds when postcopy-ram is on and the block's
        pages are larger than the host's (hugepages).

        postcopy-ram is not recorded in the stream, so the field is recognised
        by its value: a power of two above the target page size, with no flag
        bits. What may follow instead cannot look like that: a block name
        starts with a non-zero length byte, and a RAM record header after the
        last block has flag bits set.
        """
        buf, i, avail = r.window(8)
        if avail < 8 or buf[i] != 0:
            return None
        v: int = BE64.unpack_from(buf, i)[0]
        if v <= self.page_size or v & (v - 1) or v > MAX_PAGE_SIZE:
            return None
        if left > 0 or v & self.page_mask == 0:
            r.advance(8)
            return v
        return None

    def _read_mapped_header(self, r: ByteReader, blk: RAMBlockRecord) -> MappedRamHeader:
        at = r.tell()
        raw = r.read(MAPPED_RAM_HDR_SIZE, "a mapped-ram header")
        ver, ps, bmo, pgo = _MRH.unpack(raw)
        if ver > MAPPED_RAM_HDR_VERSION or ver == 0:
            raise UnsupportedVersion(f"mapped-ram header version {ver} of RAMBlock "
                                     f"{blk.idstr!r} is not supported (expected 1)",
                                     path=r.name, offset=at)
        if ps != self.page_size or ps > MAX_PAGE_SIZE:
            raise UnsupportedFeature(f"RAMBlock {blk.idstr!r} has page size {ps}; only "
                                     f"{self.page_size}-byte target pages are read",
                                     path=r.name, offset=at + 4)
        if pgo % ps:
            raise CorruptFile(f"RAMBlock {blk.idstr!r} pages region at 0x{pgo:x} has bad "
                              "alignment", path=r.name, offset=at + 20)
        end = pgo + blk.used_length
        if r.size is not None and (bmo + blk.bitmap_bytes > r.size or pgo > r.size):
            raise CorruptFile(f"RAMBlock {blk.idstr!r} bitmap 0x{bmo:x} or pages 0x{pgo:x} "
                              f"lie past the end of the file (0x{r.size:x})", path=r.name,
                              offset=at + 12)
        hdr = MappedRamHeader(ver, ps, bmo, pgo, at)
        if self.seek_past_pages:
            if r.size is not None and end > r.size:
                raise CorruptFile(f"RAMBlock {blk.idstr!r} pages region ends at 0x{end:x}, past "
                                  f"the end of the file (0x{r.size:x})", path=r.name,
                                  offset=at + 20)
            r.seek(end)
        return hdr

    # -- records -----------------------------------------------------------

    def read_records(self, r: ByteReader, sink: RamRecordSink, *, in_start: bool) -> None:
        """Parse records up to and including EOS."""
        mask = self.page_mask
        blocks = self.blocks
        batch = hasattr(sink, "pages_batch") and hasattr(sink, "zeros_batch")
        named: Callable[[int, int], None] | None = getattr(sink, "named", None)
        while True:
            if batch and self.last is not None:
                self._batch(r, cast(RamBatchSink, sink))  # checked: batch
            at = r.tell()
            word = r.be64("a RAM record header")
            flags = word & mask
            addr = word ^ flags
            f = flags & ~RAM_FLAG_CONTINUE
            if f in (RAM_FLAG_PAGE, RAM_FLAG_ZERO):
                if self.mapped_ram:
                    raise CorruptFile(f"unexpected RAM flags 0x{flags:x} in a mapped-ram "
                                      "stream", path=r.name, offset=at)
                if flags & RAM_FLAG_CONTINUE:
                    bi = self.last
                    if bi is None:
                        raise CorruptFile("page record continues a block but none was named",
                                          path=r.name, offset=at)
                else:
                    bi = self._read_block_name(r)
                    self.last = bi
                blk = blocks[bi]
                if addr >= blk.used_length:
                    raise CorruptFile(f"page offset 0x{addr:x} outside RAMBlock "
                                      f"{blk.idstr!r} (length 0x{blk.used_length:x})",
                                      path=r.name, offset=at)
                pg = addr >> 12 if mask == 0xFFF else addr // (mask + 1)
                if f == RAM_FLAG_PAGE:
                    sink.page(bi, pg, r)
                else:
                    v = r.u8("a zero page value")
                    if v:
                        raise CorruptFile(f"zero page record with fill value {v}",
                                          path=r.name, offset=at)
                    sink.zero(bi, pg)
                if named is not None and not flags & RAM_FLAG_CONTINUE:
                    named(bi, pg)
            elif f == RAM_FLAG_EOS:
                return
            elif f == RAM_FLAG_MEM_SIZE and not flags & RAM_FLAG_CONTINUE:
                if not in_start:
                    raise CorruptFile("RAMBlock list outside the RAM START section",
                                      path=r.name, offset=at)
                self._read_mem_size(r, addr, at)
            elif f == RAM_FLAG_MULTIFD_FLUSH:
                if self.mapped_ram:
                    raise CorruptFile("unexpected MULTIFD_FLUSH in a mapped-ram stream",
                                      path=r.name, offset=at)
            elif f == RAM_FLAG_XBZRLE:
                raise UnsupportedFeature("XBZRLE-encoded pages are not supported (the source "
                                         "had the xbzrle capability on)", path=r.name, offset=at)
            elif f == RAM_FLAG_COMPRESS_PAGE:
                raise UnsupportedFeature("compressed pages (QEMU 9.0 and older 'compress' "
                                         "capability) are not supported", path=r.name, offset=at)
            elif f == RAM_FLAG_HOOK:
                raise UnsupportedFeature("RDMA hook records are not supported", path=r.name,
                                         offset=at)
            else:
                raise CorruptFile(f"unknown combination of RAM flags 0x{flags:x}", path=r.name,
                                  offset=at)

    def _batch(self, r: ByteReader, sink: RamBatchSink) -> None:
        """Hand runs of CONTINUE page/zero records in the buffer over at once.

        Only records that the scalar path would accept are taken; anything
        else (another block, a bad offset, EOS) is left for it, so errors are
        still reported by the one scalar code path. A run that outlasts the
        buffer continues through file mappings (regular files), so the page
        data between headers is not copied through the buffer.
        """
        bi = self.last
        assert bi is not None
        ps = self.page_size
        for stride, want in ((8 + ps, RAM_FLAG_PAGE | RAM_FLAG_CONTINUE),
                             (9, RAM_FLAG_ZERO | RAM_FLAG_CONTINUE)):
            use_map = False
            while True:
                if use_map:
                    got = r.mapped(_MAP_BYTES)
                    if got is None:
                        use_map = False
                        continue
                    m, i, avail = got
                    try:
                        n, k = self._take(r, sink, bi, m, i, avail, stride, want, r.tell())
                    finally:
                        with contextlib.suppress(BufferError):  # a sink kept a view: GC unmaps
                            m.close()
                    r.seek(r.tell() + n * stride)
                else:
                    buf, i, avail = r.window(_BATCH_BYTES)
                    n, k = self._take(r, sink, bi, buf, i, min(avail, _BATCH_BYTES), stride,
                                      want, r.tell())
                    r.advance(n * stride)
                    # The run fills the whole buffer: go on without copying through it.
                    use_map = n > 0 and n == k and avail - n * stride < stride
                if n < _MIN_BATCH or n < k:
                    break

    def _take(self, r: ByteReader, sink: RamBatchSink, bi: int,
              buf: bytes | bytearray | mmap,
              i: int, avail: int, stride: int, want: int, pos0: int) -> tuple[int, int]:
        """Hand over the leading run of acceptable records in ``buf[i:i+avail]``.

        :return: (records handed over, records that fitted); 0 handed over when
            fewer than _MIN_BATCH are acceptable.
        """
        k = avail // stride
        if k < _MIN_BATCH:
            return 0, k
        # The last record of a run is often met here (the other kind follows): one
        # header, read in Python, settles it without the array set-up.
        if BE64.unpack_from(buf, i + (_MIN_BATCH - 1) * stride)[0] & self.page_mask != want:
            return 0, k
        ps = self.page_size
        mask = np.uint64(self.page_mask)
        limit = self.blocks[bi].used_length
        words = np.ndarray((k,), dtype=">u8", buffer=buf, offset=i, strides=(stride,))
        vals = (np.ndarray((k,), dtype=np.uint8, buffer=buf, offset=i + 8, strides=(stride,))
                if stride == 9 else None)
        # Check a growing prefix: runs are often short (pages and zeros alternate), and
        # testing the whole window each time would cost O(window) per short run.
        n, c = 0, min(k, 64)
        while True:
            w = words[n:c]
            ok = ((w & mask) == want) & ((w & ~mask) < limit)
            if vals is not None:
                ok &= vals[n:c] == 0
            if not ok.all():
                n += int(np.argmin(ok))
                break
            n = c
            if c == k:
                break
            c = min(k, c * 16)
        if n < _MIN_BATCH:
            return 0, k
        idx = ((words[:n] & ~mask) // np.uint64(ps)).astype(np.int64)
        if stride == 9:
            sink.zeros_batch(bi, idx)
        else:
            data = np.ndarray((n, ps), dtype=np.uint8, buffer=buf, offset=i + 8,
                              strides=(stride, 1))
            pos = pos0 + 8 + np.arange(n, dtype=np.int64) * stride
            sink.pages_batch(bi, idx, data, pos)
        return n, k

    def _read_block_name(self, r: ByteReader) -> int:
        at = r.tell()
        n = r.u8("a RAMBlock name length")
        raw = r.read(n, "a RAMBlock name")
        bi = self.by_name.get(raw.decode("utf-8", "replace"))
        if bi is None:
            raise CorruptFile(f"page record names unknown RAMBlock {raw!r}", path=r.name,
                              offset=at)
        return bi
