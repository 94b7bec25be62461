"""One sequential pass over a stream: pipes, compressed libvirt images, compressed files.

A random-access reader (:class:`~fixedram.format.migfile.MigrationFile`) needs
a seekable file. Some inputs only come as a byte stream: standard input, and
compressed saves, which libvirt writes by piping QEMU's stream through
``gzip``/``bzip2``/``xz``/``lzop``/``zstd`` (header format 1-5). They are read
here in one pass, never decompressed to a temporary file:

* :func:`open_sequential` opens the input, reads a libvirt header and the
  domain XML if there is one, and gives a reader of the QEMU stream
  (decoded by a thread as it is read, so decompression and parsing share
  the two CPUs).
* :func:`scan` walks it with the one stream walker and records, per page,
  whether its last copy was data or a ZERO record and how often it was sent:
  memory in proportion to the RAMBlocks' page count, never to the stream's
  length. A :class:`PageTarget` receives each page as it arrives (extract
  writes it at its final offset; convert writes a mapped-ram file).

The result, :class:`OnePassFile`, answers what a :class:`MigrationFile`
answers about structure (blocks, passes, devices, vmdesc, completeness). Its
``fd`` is an in-memory file holding the stream's configuration and device
sections at their stream offsets, with holes where RAM was, so the device
decoders and :class:`~fixedram.format.machine.MachineState` read it as they
read a file.

Stream offsets in errors are those of the QEMU stream: absolute file offsets
for an uncompressed input, offsets in the decompressed stream for a
compressed one (the reader's name says which).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import (
    CorruptFile,
    InputError,
    TruncatedFile,
    UnsupportedFeature,
    UsageError,
)
from ..io.source import FileSource
from ..io.stream import (
    DECODED_CHUNK,
    READ_SIZE,
    Prefixed,
    RawInput,
    Tap,
    input_stat,
)
from .constants import TARGET_PAGE_SIZE
from .libvirt import HEADER_SIZE, MAGIC_DONE, MAGIC_PART, LibvirtHeader, parse_libvirt, with_body
from .primitives import ByteReader
from .ram import PageBudget, RAMBlockRecord, RamStreamState, ResendLedger
from .walker import (
    BlockFacts,
    DeviceSection,
    PageTarget,
    SaveFacts,
    StreamEvents,
    StreamSummary,
    walk_stream,
)

if TYPE_CHECKING:
    from ..io.readahead import ReadAhead

__all__ = [
    "COMPRESSION_MAGIC",
    "OnePassBlock",
    "OnePassFile",
    "PageTarget",
    "SequentialInput",
    "input_stat",
    "open_sequential",
    "scan",
    "sniff_compression",
]

# Bare compressed files (not in a libvirt image) are recognised by their magic
# (gzip with its deflate method byte; bzip2 also by its first block's magic).
COMPRESSION_MAGIC = {
    "zstd": b"\x28\xb5\x2f\xfd",
    "gzip": b"\x1f\x8b\x08",
    "xz": b"\xfd7zXZ\x00",
    "bzip2": b"BZh",
    "lzop": b"\x89LZO\x00\r\n\x1a\n",
}
_BZIP2_BLOCK = b"1AY&SY"


def sniff_compression(head: bytes) -> str | None:
    for name, magic in COMPRESSION_MAGIC.items():
        if head.startswith(magic):
            if name == "bzip2" and not (head[3:4].isdigit() and head[4:10] == _BZIP2_BLOCK):
                continue
            return name
    return None


@dataclass
class SequentialInput:
    """An opened one-pass input: a reader at the QEMU stream's first byte.

    :ivar name: how errors name the stream (says "decompressed" for a
        compressed one, whose offsets are in the decompressed stream).
    :ivar start: stream offset of the magic (the libvirt data offset for an
        uncompressed image; 0 in a decompressed stream).
    :ivar input_size: the input file's size, None for a pipe.
    """

    path: str
    name: str
    reader: ByteReader
    start: int
    libvirt: LibvirtHeader | None
    compression: str | None
    input_size: int | None
    input_allocated: int | None
    _raw: RawInput
    _head: Tap
    _ahead: ReadAhead | None = None

    @property
    def head(self) -> bytes:
        return bytes(self._head.head)

    def tee(self, write: Callable[[bytes | memoryview], object]) -> None:
        """Hand every stream byte read from now on to ``write`` (before any is read).

        The reader reads ahead, so ``write`` may get bytes past the stream's
        end: the pass's ``size`` says where it ended.
        """
        self._head.sink = write

    def finish(self) -> None:
        """Decode a compressed input to its end, past the stream's last byte:
        the decoder's last checks (a trailer's CRC, a frame's end and content
        checksum) are there. The bytes go to no tee: they are no stream."""
        if self.compression is None or self._ahead is None:
            return
        while len(self._ahead.read_spaced()) > self._ahead.room:
            pass

    @property
    def bytes_read(self) -> int:
        """Input bytes read so far (compressed bytes for a compressed input)."""
        return self._raw.pos

    def close(self) -> None:
        # A thread still blocked reading keeps the descriptor: closing it
        # could hand its number, and the thread's reads, to another file.
        if self._ahead is None or self._ahead.close():
            self._raw.close()

    def __enter__(self) -> SequentialInput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_sequential(path: str, *, offset: int | None = None,
                    stdin_fd: int = 0) -> SequentialInput:
    """Open ``path`` (``-``: standard input) for one pass over its QEMU stream.

    A libvirt header and its XML are read first; a compressed image or a bare
    compressed file is decoded as it is read.

    :param offset: where the stream starts (skipped by reading); by default
        after a libvirt header, else 0.
    :raise FormatError: a bad libvirt header, or a sparse (mapped-ram)
        image on a pipe.
    """
    if path == "-":
        fd, name, close = stdin_fd, "stdin", False
    else:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise InputError(path, e) from e
        name, close = path, True
    try:
        raw = RawInput(fd, name, close)
    except InputError:  # standard input closed (``<&-``)
        if close:
            os.close(fd)
        raise
    try:
        return _open(raw, path, name, offset)
    except BaseException:
        raw.close()
        raise


def _open(raw: RawInput, path: str, name: str, offset: int | None) -> SequentialInput:
    st = os.fstat(raw.fd)
    size = None if raw.is_pipe else st.st_size
    alloc = None if raw.is_pipe else st.st_blocks * 512
    lv: LibvirtHeader | None = None
    kind: str | None = None
    head = raw.read_exact(16)
    if offset is None and head in (MAGIC_DONE, MAGIC_PART):
        fixed = head + raw.read_exact(HEADER_SIZE - 16)
        hdr, n = parse_libvirt(fixed, name, size)
        body = raw.read_exact(n)
        if len(body) < n:
            raise TruncatedFile("the input ends inside the libvirt header's XML and padding",
                                path=name, offset=HEADER_SIZE + len(body))
        lv = with_body(hdr, body)
        start, prefix = lv.data_offset, b""
        if lv.compressed:
            kind = lv.format
    elif offset is not None:
        if offset < len(head):
            prefix, start = head[offset:], offset
        else:
            left = offset - len(head)
            while left:
                b = raw.read(min(left, READ_SIZE))
                if not b:
                    raise TruncatedFile(f"the input ends before the stream offset {offset}",
                                        path=name, offset=raw.pos)
                left -= len(b)
            prefix, start = b"", offset
    else:
        prefix, start = head, 0
        kind = sniff_compression(head)
    src = Prefixed(prefix, raw)
    ahead: ReadAhead | None = None
    if kind is not None:
        where = "compressed image" if lv is not None else "compressed file"
        sname = f"{name} (decompressed {kind} stream of the {where})"
        from ..io.decompress import Decoded

        ahead = Decoded(kind, src, sname, name, "image" if lv is not None else "file")
        start = 0
    elif raw.is_pipe:
        from ..io.readahead import PipeAhead

        sname = name
        ahead = PipeAhead(src, name)
    else:
        sname = name
    tap = Tap(src if ahead is None else ahead)
    r = ByteReader(tap, sname, start=start, bufsize=DECODED_CHUNK)
    return SequentialInput(path, sname, r, start, lv, kind, size, alloc, raw, tap, ahead)


# -- one pass ----------------------------------------------------------------------


# Per-page state of the last copy.
NEVER, DATA, ZERO = 0, 1, 2
# Pages a block's arrays cover at least once allocated (5 bytes a page).
_MIN_ARRAY = 1 << 16


class OnePassBlock(BlockFacts):
    """A RAMBlock seen in one pass: what its pages' last copies were.

    The arrays cover the pages up to the highest one a record has named (the
    rest were never sent): they grow with what arrived, never with the
    declared length alone.
    """

    def __init__(self, index: int, rec: RAMBlockRecord) -> None:
        super().__init__(index, rec)
        self._last: np.ndarray | None = None
        self._sends: np.ndarray | None = None

    def _grow(self, pages: int) -> tuple[np.ndarray, np.ndarray]:
        """Arrays covering at least pages [0, ``pages``), doubled so growing stays linear."""
        have = 0 if self._last is None else self._last.size
        if pages > have:
            n = min(self.npages, max(pages, 2 * have, _MIN_ARRAY))
            last = np.zeros(n, dtype=np.uint8)
            sends = np.zeros(n, dtype=np.uint32)
            if self._last is not None and self._sends is not None:
                last[:have] = self._last
                sends[:have] = self._sends
            self._last, self._sends = last, sends
        assert self._last is not None and self._sends is not None
        return self._last, self._sends

    @property
    def touched(self) -> bool:
        """Some record named one of this block's pages."""
        return self._last is not None

    def present_pages(self) -> np.ndarray:
        return (np.flatnonzero(self._last == DATA) if self._last is not None
                else np.zeros(0, dtype=np.int64))

    def zeroed_pages(self) -> np.ndarray:
        return (np.flatnonzero(self._last == ZERO) if self._last is not None
                else np.zeros(0, dtype=np.int64))

    def never_sent(self, pages: np.ndarray) -> np.ndarray:
        """Those of ``pages`` (int64) that no record named."""
        if self._last is None:
            return pages
        inside = pages < self._last.size
        keep = ~inside
        keep[inside] = self._last[pages[inside]] == NEVER
        return pages[keep]

    @property
    def pages_present(self) -> int:
        return int(np.count_nonzero(self._last == DATA)) if self._last is not None else 0

    @property
    def zero_pages(self) -> int:
        return int(np.count_nonzero(self._last == ZERO)) if self._last is not None else 0

    @property
    def max_sends(self) -> int:
        return int(self._sends.max()) if self._sends is not None and self._sends.size else 0

    def copies(self) -> np.ndarray:
        """Per page, the data and ZERO records sent for it (dense uint32)."""
        out = np.zeros(self.npages, dtype=np.uint32)
        if self._sends is not None:
            out[:self._sends.size] = self._sends
        return out


class OnePassFile(SaveFacts[OnePassBlock]):
    """A save read in one pass; after :meth:`walk` it answers like a MigrationFile.

    Opened, it has read no more than the libvirt header: the facts (blocks,
    devices, completeness) are known once :meth:`walk` has run, and the pages
    are seen only during it, by the walk's target.

    :ivar fd: an in-memory file holding the stream's configuration and device
        sections at their stream offsets (RAM left as holes), for the
        decoders that read device state by offset.
    """

    random_access = False

    def __init__(self, src: SequentialInput, *, strict: bool = False) -> None:
        self.src = src
        self.strict = strict
        self.path = src.name
        self.input_path = src.path
        self.libvirt = src.libvirt
        self.compression = src.compression
        self.start = src.start
        self.fd = -1
        self.size = src.start
        self.source = FileSource(-1, self.path, 0)  # the walk makes the real one
        self.error: TruncatedFile | None = None
        self._summary: StreamSummary | None = None
        self.blocks: list[OnePassBlock] = []
        self.page_records = 0
        self.zero_records = 0
        self.ledger: ResendLedger | None = None

    def walk(self, target: PageTarget | None = None, *,
             strict: bool | None = None) -> OnePassFile:
        """Walk the stream once, handing its pages to ``target``; returns self.

        :param strict: raise when the stream ends early; otherwise the result
            has ``complete = False`` and ``error`` set, and holds what arrived.
            By default, as the input was opened.
        :raise FormatError: anything malformed (a truncated stream too, with
            ``strict``); the input is closed then.
        :raise UsageError: the stream was walked already (a pass cannot be repeated).
        """
        if self.fd >= 0 or self.src.reader.tell() != self.src.start:
            raise UsageError(f"{self.path}: a one-pass input can be walked only once")
        try:
            self._walk(target, self.strict if strict is None else strict)
        except BaseException:
            self.close()
            raise
        return self

    def _walk(self, target: PageTarget | None, strict: bool) -> None:
        src = self.src
        if src.libvirt is not None and src.libvirt.format == "sparse":
            raise _mapped_ram_refused(self)
        self.fd = os.memfd_create("fixedram-stream-state", os.MFD_CLOEXEC)
        ev = _Pass(self, target)
        try:
            self._summary = walk_stream(src.reader, ev, ev)
            src.finish()  # a compressed input is decoded to its end marker and checksum
        except TruncatedFile as e:
            if ev.summary is not None and "mapped-ram" in ev.summary.header.capabilities:
                raise _mapped_ram_refused(self) from None
            if strict or ev.summary is None or not self.blocks:
                raise
            self.error = e
            self._summary = ev.summary
        except CorruptFile:
            if ev.summary is not None and "mapped-ram" in ev.summary.header.capabilities:
                raise _mapped_ram_refused(self) from None
            raise
        self.size = max(self.summary.end_offset, src.reader.tell())
        # Now that the size is known, the bound a file of this size gets:
        # before anyone sizes an output or a dense array by a block's length.
        for b in self.blocks:
            if b.touched:
                ev.budget.claim(b.record, b.npages, self.size - self.start,
                                what=f"a stream of {self.size - self.start} bytes")
        hdr = self.summary.header
        # The configuration section, for the decoders that read it by offset.
        cfg = src.head[:hdr.end - src.start]
        os.pwrite(self.fd, cfg, hdr.offset)
        os.ftruncate(self.fd, self.size)
        self.source = FileSource(self.fd, self.path, self.size)

    # -- like MigrationFile ----------------------------------------------------

    @property
    def summary(self) -> StreamSummary:
        """What the walk found (set as soon as the walk starts)."""
        if self._summary is None:
            raise RuntimeError("the stream has not been walked yet")
        return self._summary

    @summary.setter
    def summary(self, s: StreamSummary) -> None:
        self._summary = s

    def walked(self) -> StreamSummary | None:
        return self._summary

    @property
    def resent_bytes(self) -> int:
        """As :attr:`MigrationFile.resent_bytes <.migfile.MigrationFile.resent_bytes>`."""
        if self.ledger is None:
            return 0
        return self.ledger.superseded_bytes(
            self.page_records, self.zero_records, [b._sends for b in self.blocks],
            [b.pages_present for b in self.blocks], [b.zero_pages for b in self.blocks])

    def input_sizes(self) -> tuple[int | None, int | None]:
        return self.src.input_size, self.src.input_allocated

    @property
    def bytes_read(self) -> int:
        return self.src.bytes_read

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.src.close()


class _Pass(StreamEvents):
    """RAM sink and stream events of one pass: tracks pages, keeps device state."""

    def __init__(self, f: OnePassFile, target: PageTarget | None) -> None:
        self.f = f
        self.target = target
        self.ps = TARGET_PAGE_SIZE  # the stream header says; set again at the RAMBlock list
        self.budget = PageBudget(f.path)

    def _arrays(self, block: int, top: int) -> tuple[np.ndarray, np.ndarray]:
        """The block's arrays, covering page ``top``: claimed from the bytes read so
        far before any memory is allocated or any page handed to the target."""
        b = self.f.blocks[block]
        if b._last is None or top >= b._last.size:
            self.budget.claim(b.record, top + 1, self.f.src.reader.tell() - self.f.start)
        return b._grow(top + 1)

    def ram_blocks(self, state: RamStreamState) -> None:
        if state.mapped_ram:  # the walker needs a seek before it gets here on a pipe
            raise _mapped_ram_refused(self.f)
        self.ps = state.page_size
        self.f._summary = self.summary  # filled in as the walk goes
        self.f.blocks = [OnePassBlock(i, rec) for i, rec in enumerate(state.blocks)]
        self.f.ledger = ResendLedger(state.blocks, state.page_size)
        if self.target is not None:
            self.target.begin(self.f)

    def device(self, dev: DeviceSection, r: ByteReader) -> None:
        data = r.read(dev.data_length, f"device section {dev.idstr!r}")
        os.pwrite(self.f.fd, data, dev.data_offset)

    # -- RAM sink ----------------------------------------------------------------

    def page(self, block: int, page_index: int, r: ByteReader) -> None:
        last, sends = self._arrays(block, page_index)
        if self.target is None:
            r.skip(self.ps, "page data")
        else:
            data = np.frombuffer(r.view(self.ps, "page data"), dtype=np.uint8)
            self.target.pages(block, np.array([page_index], dtype=np.int64),
                              data.reshape(1, self.ps))
        last[page_index] = DATA
        sends[page_index] += 1
        self.f.page_records += 1

    def zero(self, block: int, page_index: int) -> None:
        self.zeros_batch(block, np.array([page_index], dtype=np.int64))

    def named(self, block: int, page_index: int) -> None:
        _, sends = self._arrays(block, page_index)
        assert self.f.ledger is not None
        self.f.ledger.named(block, page_index, int(sends[page_index]))

    def pages_batch(self, block: int, page_index: np.ndarray, data: np.ndarray,
                    positions: np.ndarray) -> None:
        last, sends = self._arrays(block, int(page_index.max()))
        if self.target is not None:
            self.target.pages(block, page_index, data)
        last[page_index] = DATA
        _count(sends, page_index)
        self.f.page_records += page_index.size

    def zeros_batch(self, block: int, page_index: np.ndarray) -> None:
        last, sends = self._arrays(block, int(page_index.max()))
        if self.target is not None:
            self.target.zeros(block, page_index, last[page_index] == DATA)
        last[page_index] = ZERO
        _count(sends, page_index)
        self.f.zero_records += page_index.size


def _count(sends: np.ndarray, idx: np.ndarray) -> None:
    if idx.size < 2 or bool((idx[1:] > idx[:-1]).all()):
        sends[idx] += 1
    else:
        np.add.at(sends, idx, 1)


def _mapped_ram_refused(f: OnePassFile) -> UnsupportedFeature:
    return UnsupportedFeature("this is a mapped-ram file, and mapped-ram needs a seekable file "
                              "(its pages are found through offsets), not a pipe or a "
                              "compressed stream", path=f.path, offset=f.start)


def scan(src: SequentialInput, target: PageTarget | None = None, *,
         strict: bool = False) -> OnePassFile:
    """Walk ``src`` once (:meth:`OnePassFile.walk`); hand its pages to ``target``."""
    return OnePassFile(src).walk(target, strict=strict)
