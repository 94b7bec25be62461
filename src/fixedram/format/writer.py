"""Writing migration streams and mapped-ram files in QEMU 10's byte layout.

Both writers use the encoders of :mod:`.stream` and :mod:`.ram`, the same
module the reader decodes with, so the two directions cannot drift apart.

* :class:`StreamWriter` produces a sequential stream on any byte sink (file,
  pipe, socket): START ram with the block list, PART sections of page
  records, END, device FULL sections, EOF and the vmdesc trailer.

Both take a :class:`~fixedram.format.machine.MachineState` for everything
that is not a RAM page, so the configuration section, the device sections and
the vmdesc trailer that describes them always come from one place.
* :class:`MappedRamWriter` lays out a seekable file exactly as QEMU does:
  each block's pages region at a 1 MiB-aligned absolute offset, zero pages
  never written (holes), the bitmap written as 64-bit little-endian words at
  completion. Page writes are positional, so many channels may write at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..errors import UnsupportedFeature
from ..io.runs import index_runs
from .constants import (
    RAM_FLAG_CONTINUE,
    RAM_FLAG_EOS,
    RAM_FLAG_MEM_SIZE,
    RAM_FLAG_MULTIFD_FLUSH,
    RAM_FLAG_PAGE,
    RAM_FLAG_ZERO,
    RAM_SECTION_NAME,
    RAM_SECTION_VERSION,
    TARGET_PAGE_SIZE,
    Command,
    SectionType,
)
from .machine import MachineState
from .primitives import BE64
from .ram import encode_block_record, encode_mapped_ram_header, mapped_ram_layout
from .stream import (
    StreamHeader,
    encode_command,
    encode_footer,
    encode_section_full,
    encode_section_part,
)

__all__ = ["BlockSpec", "MappedRamWriter", "StreamWriter", "refuse_unloadable_mapped_ram"]

EOS = BE64.pack(RAM_FLAG_EOS)
MULTIFD_FLUSH = BE64.pack(RAM_FLAG_MULTIFD_FLUSH)


@dataclass(frozen=True)
class BlockSpec:
    """A RAMBlock to write: its name, used length and, for x-ignore-shared,
    its address.

    ``gpa`` is QEMU's ``mr->addr`` (the region's offset in its container), the
    be64 an x-ignore-shared stream carries after the length of every block;
    the loader compares it with its own for a shared block, so it is kept
    from the source rather than made up.
    """

    idstr: str
    used_length: int
    page_size: int = TARGET_PAGE_SIZE
    gpa: int | None = None

    @property
    def npages(self) -> int:
        return self.used_length // self.page_size

    @classmethod
    def of(cls, blocks: Iterable[_BlockLike]) -> list[BlockSpec]:
        """Specs for the blocks of a file or guest being written out again."""
        return [cls(b.idstr, b.used_length, b.page_size, b.gpa) for b in blocks]


class _BlockLike(Protocol):
    idstr: str
    used_length: int
    page_size: int
    gpa: int | None


def _check_blocks(blocks: Sequence[BlockSpec]) -> None:
    seen = set()
    for b in blocks:
        if not b.idstr or len(b.idstr.encode()) > 255 or b.idstr in seen:
            raise ValueError(f"bad or duplicate RAMBlock name {b.idstr!r}")
        if b.used_length <= 0 or b.used_length % b.page_size:
            raise ValueError(f"RAMBlock {b.idstr!r} length must be a page multiple")
        if b.gpa is not None and not 0 <= b.gpa < 1 << 64:
            raise ValueError(f"RAMBlock {b.idstr!r} address does not fit a be64")
        seen.add(b.idstr)


class StreamWriter:
    """Sequential stream writer.

    :param write: callable taking bytes-like objects (``file.write``,
        ``socket.sendall``); it must write everything it is given. It may keep
        a reference and write later: this writer never reuses or changes a
        buffer once it has handed it over.
    :param state: the machine (configuration, devices); its capabilities
        must not include ``mapped-ram`` (see :meth:`MachineState.with_mapped_ram`).
        Its devices are read at :meth:`finish`, so a receiver may add them as
        they arrive.
    """

    def __init__(self, write: Callable[[bytes | memoryview], object], state: MachineState,
                 blocks: Sequence[BlockSpec]) -> None:
        _check_blocks(blocks)
        if state.mapped_ram:
            raise ValueError("a sequential stream cannot carry the mapped-ram capability")
        if state.ignore_shared and any(b.gpa is None for b in blocks):
            # QEMU's loader reads the address after every block's length:
            # a record without it would misalign everything after it.
            raise ValueError("an x-ignore-shared stream needs the address of every RAMBlock")
        self._write = write
        self.state = state
        self.blocks = list(blocks)
        self.sid = state.ram_section_id
        self._last_block: int | None = None
        self._in_section = False
        self.bytes_written = 0
        self._hdr_cache: dict[int, np.ndarray] = {}

    def _out(self, b: bytes | memoryview) -> None:
        self._write(b)
        self.bytes_written += len(b)

    def begin(self, multifd_flush: bool = False, commands: bytes = b"") -> None:
        """Header, configuration and the START ram section with the block list.

        :param multifd_flush: end the block list with a MULTIFD_FLUSH record,
            as a socket-multifd source does after its setup sync.
        :param commands: encoded commands to put between the configuration
            and START (a postcopy source's OPEN_RETURN_PATH, PING, ADVISE).
        """
        total = sum(b.used_length for b in self.blocks)
        out = bytearray(self.state.header()) + commands
        out += encode_section_full(SectionType.START, self.sid, RAM_SECTION_NAME, 0,
                                   RAM_SECTION_VERSION)
        out += BE64.pack(total | RAM_FLAG_MEM_SIZE)
        ignore_shared = self.state.ignore_shared
        for b in self.blocks:
            # ram_save_setup: idstr, used_length, then mr->addr with x-ignore-shared
            # (the postcopy page size cannot come between: postcopy excludes it).
            out += encode_block_record(b.idstr, b.used_length,
                                       gpa=b.gpa if ignore_shared else None)
        if multifd_flush:
            out += MULTIFD_FLUSH
        out += EOS + encode_footer(self.sid)
        self._out(bytes(out))

    def begin_part(self, end: bool = False) -> None:
        """Open a PART (or, for the final pass, END) ram section.

        The END section is preceded by SWITCHOVER_START when the machine sends it.
        """
        head = encode_section_part(SectionType.END if end else SectionType.PART, self.sid)
        if end and self.state.switchover_start:
            head = encode_command(Command.SWITCHOVER_START) + head
        self._out(head)
        self._in_section = True

    def multifd_flush(self) -> None:
        """A MULTIFD_FLUSH record: the destination waits here until every
        multifd channel has delivered its SYNC packet."""
        if not self._in_section:
            raise ValueError("MULTIFD_FLUSH belongs inside a ram section")
        self._out(MULTIFD_FLUSH)

    def end_part(self) -> None:
        self._out(EOS + encode_footer(self.sid))
        self._in_section = False

    def _name(self, bi: int) -> bytes:
        if self._last_block == bi:
            return b""
        self._last_block = bi
        n = self.blocks[bi].idstr.encode()
        return bytes([len(n)]) + n

    def zero(self, bi: int, page_index: int) -> None:
        ps = self.blocks[bi].page_size
        cont = RAM_FLAG_CONTINUE if self._last_block == bi else 0
        name = self._name(bi)
        self._out(BE64.pack(page_index * ps | RAM_FLAG_ZERO | cont) + name + b"\0")

    def zeros(self, bi: int, page_indices: np.ndarray) -> None:
        """ZERO records for many pages at once (9 bytes each when continuing)."""
        if page_indices.size == 0:
            return
        ps = self.blocks[bi].page_size
        idx = page_indices.astype(np.uint64)
        if self._last_block != bi:
            self.zero(bi, int(idx[0]))
            idx = idx[1:]
            if idx.size == 0:
                return
        n = idx.size
        rec = np.zeros((n, 9), dtype=np.uint8)
        words = idx * np.uint64(ps) | np.uint64(RAM_FLAG_ZERO | RAM_FLAG_CONTINUE)
        rec[:, :8] = words.astype(">u8").view(np.uint8).reshape(n, 8)
        self._out(rec.data.cast("B"))

    def pages(self, bi: int, first: int, data: bytes | memoryview | np.ndarray) -> None:
        """Page records for ``len(data) // page_size`` consecutive pages.

        Built as one buffer with numpy (record headers interleaved with the
        data) so a long run costs one write, not one per page.
        """
        ps = self.blocks[bi].page_size
        arr = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
        n = arr.size // ps
        if n == 0:
            return
        if self._last_block != bi:
            # First record names the block; the rest continue it.
            name = self._name(bi)
            self._out(BE64.pack(first * ps | RAM_FLAG_PAGE) + name + arr[:ps].tobytes())
            first, arr, n = first + 1, arr[ps:], n - 1
            if n == 0:
                return
        rec = np.empty((n, 8 + ps), dtype=np.uint8)
        words = (np.arange(first, first + n, dtype=np.uint64) * np.uint64(ps)
                 | np.uint64(RAM_FLAG_PAGE | RAM_FLAG_CONTINUE))
        rec[:, :8] = words.astype(">u8").view(np.uint8).reshape(n, 8)
        rec[:, 8:] = arr[: n * ps].reshape(n, ps)
        self._out(rec.data.cast("B"))

    def continuing_records(self, bi: int, first: int, n: int) -> np.ndarray:
        """An (n, 8 + page_size) array of CONTINUE page records with headers
        filled in and the data left for the caller (who can read the pages
        straight into place); write it with :meth:`raw`.

        The block must already have been named by a record before (see
        :meth:`continues`).
        """
        if self._last_block != bi:
            raise ValueError("block not named yet: write its first page with pages()")
        ps = self.blocks[bi].page_size
        if first < 0 or first + n > self.blocks[bi].npages:
            raise ValueError("pages outside the block")
        rec = np.empty((n, 8 + ps), dtype=np.uint8)
        words = (np.arange(first, first + n, dtype=np.uint64) * np.uint64(ps)
                 | np.uint64(RAM_FLAG_PAGE | RAM_FLAG_CONTINUE))
        rec[:, :8] = words.astype(">u8").view(np.uint8).reshape(n, 8)
        return rec

    def continues(self, bi: int) -> bool:
        """The next record for block ``bi`` may omit the block name."""
        return self._last_block == bi

    def raw(self, data: bytes | memoryview) -> None:
        """Verbatim bytes (page records the caller built, see :meth:`continuing_records`)."""
        self._out(data)

    def finish(self) -> None:
        """Device sections, EOF and the vmdesc trailer describing them."""
        self._out(self.state.tail())


@dataclass(frozen=True)
class _Placed:
    spec: BlockSpec
    record_offset: int
    bitmap_offset: int
    pages_offset: int


def refuse_unloadable_mapped_ram(header: StreamHeader, path: str | None) -> None:
    """Refuse an input whose configuration QEMU 10 would not load as mapped-ram.

    The one check of every path that turns an input into a mapped-ram file
    (convert from a file or a pipe, receive), made as soon as the input's
    capabilities are known and before any output is written.

    :raise UnsupportedFeature: naming the configuration section, where the
        capability is declared (after the 4-byte magic and 4-byte version).
    """
    if "x-ignore-shared" in header.capabilities:
        raise UnsupportedFeature("x-ignore-shared streams cannot become mapped-ram files "
                                 "that QEMU 10 loads", path=path, offset=header.offset + 8)


class MappedRamWriter:
    """A mapped-ram file laid out as QEMU 10 lays it out.

    The header and block list are written at construction, so each page's
    offset is known before any page arrives. ``write_pages`` may be called
    from several threads for disjoint pages.

    :param fd: file descriptor opened for writing (positional I/O only).
    :param state: the machine; it must have the ``mapped-ram`` capability.
        Its devices are read at :meth:`finish`.
    :param start: absolute offset where the stream starts (``file:...,offset=N``);
        bytes before it are left alone.
    :param fresh: ``fd`` is a new, empty file, so regions never written read
        as zero: all-zero parts of the bitmaps are then left as holes, and a
        block no page was written to costs no memory at all.
    """

    def __init__(self, fd: int, state: MachineState, blocks: Sequence[BlockSpec], *,
                 start: int = 0, fresh: bool = False) -> None:
        _check_blocks(blocks)
        if not state.mapped_ram:
            raise ValueError("a mapped-ram file needs the mapped-ram capability")
        if "x-ignore-shared" in state.capabilities:
            raise ValueError("mapped-ram with x-ignore-shared does not load in QEMU 10")
        self.fd = fd
        self.start = start
        self.state = state
        self.sid = state.ram_section_id
        head = bytearray(state.header())
        head += encode_section_full(SectionType.START, self.sid, RAM_SECTION_NAME, 0,
                                    RAM_SECTION_VERSION)
        total = sum(b.used_length for b in blocks)
        head += BE64.pack(total | RAM_FLAG_MEM_SIZE)
        pos = start + len(head)
        os.pwrite(fd, bytes(head), start)
        self.placed: list[_Placed] = []
        for b in blocks:
            _h, bmo, pgo, nxt = mapped_ram_layout(pos, b.idstr, b.used_length, b.page_size)
            rec = encode_block_record(b.idstr, b.used_length,
                                      mapped=encode_mapped_ram_header(b.page_size, bmo, pgo))
            os.pwrite(fd, rec, pos)
            self.placed.append(_Placed(b, pos, bmo, pgo))
            pos = nxt
        self.ram_end = pos  # EOS goes here
        self.fresh = fresh
        # One bool per page, allocated at the block's first written page.
        self._bitmaps: dict[int, np.ndarray] = {}
        self.tail_offset = pos + len(EOS) + 5
        self.finished = False

    @property
    def blocks(self) -> list[BlockSpec]:
        return [p.spec for p in self.placed]

    def page_offset(self, bi: int, page_index: int) -> int:
        p = self.placed[bi]
        return p.pages_offset + page_index * p.spec.page_size

    def write_pages(self, bi: int, first: int, data: bytes | memoryview | np.ndarray,
                    fd: int | None = None) -> None:
        """pwrite consecutive pages at their fixed offsets and set their bits.

        :param fd: write through another descriptor (a multifd channel,
            possibly O_DIRECT); defaults to the main one.
        """
        p = self.placed[bi]
        mv = (data.data if isinstance(data, np.ndarray) else memoryview(data)).cast("B")
        n = len(mv) // p.spec.page_size
        if first < 0 or first + n > p.spec.npages:
            raise ValueError(f"pages {first}..{first + n} outside RAMBlock {p.spec.idstr!r}")
        off = p.pages_offset + first * p.spec.page_size
        done = 0
        w = self.fd if fd is None else fd
        while done < len(mv):
            done += os.pwrite(w, mv[done:], off + done)
        self.bits(bi)[first:first + n] = True

    def write_runs(self, bi: int, idx: np.ndarray, data: np.ndarray,
                   fd: int | None = None) -> None:
        """pwrite pages ``data[k]`` to page ``idx[k]``, one call per consecutive run.

        Strided pages (stream record slots) are gathered into one contiguous
        buffer first: measured faster than ``pwritev`` over per-page views.
        """
        firsts = idx.tolist() if idx.size else []
        for a, n in index_runs(idx):
            chunk = data[a:a + n]
            if not chunk.flags.c_contiguous:
                chunk = np.ascontiguousarray(chunk)
            self.write_pages(bi, firsts[a], chunk, fd=fd)

    def bits(self, bi: int) -> np.ndarray:
        """The block's page bits (one bool per page), allocated on first use.

        Channel threads call this concurrently: ``dict.setdefault`` is atomic,
        so two first writers agree on one array (a loser's is dropped unused)
        without a lock in the codec.
        """
        b = self._bitmaps.get(bi)
        if b is None:
            b = self._bitmaps.setdefault(bi, np.zeros(self.placed[bi].spec.npages, dtype=bool))
        return b

    def mark_zero(self, bi: int, pages: np.ndarray | slice | int) -> None:
        """Pages that are zero now: clear their bits, write nothing (holes)."""
        b = self._bitmaps.get(bi)
        if b is not None:
            b[pages] = False

    def set_present(self, bi: int, pages: np.ndarray | slice | int) -> None:
        """Mark pages written by someone else (a channel with its own fd)."""
        self.bits(bi)[pages] = True

    def bitmap_bytes(self, bi: int) -> int:
        return (self.placed[bi].spec.npages + 63) // 64 * 8

    def encode_bitmap(self, bi: int) -> bytes:
        bits = self.bits(bi)
        packed = np.packbits(bits, bitorder="little")
        return packed.tobytes() + bytes(self.bitmap_bytes(bi) - packed.size)

    def _write_bitmap(self, bi: int) -> None:
        off = self.placed[bi].bitmap_offset
        if bi not in self._bitmaps and self.fresh:
            return  # nothing set, and the region is a hole already
        raw = self.encode_bitmap(bi)
        if not self.fresh:
            os.pwrite(self.fd, raw, off)
            return
        # Only the non-zero 64 KiB pieces: the rest stays sparse.
        piece = 1 << 16
        arr = np.frombuffer(raw, dtype=np.uint8)
        padded = np.zeros(-(-arr.size // piece) * piece, dtype=np.uint8)
        padded[:arr.size] = arr
        mv = memoryview(raw)
        for i in np.flatnonzero(padded.reshape(-1, piece).any(axis=1)).tolist():
            os.pwrite(self.fd, mv[i * piece:(i + 1) * piece], off + i * piece)

    def finish(self) -> int:
        """Write bitmaps, EOS/footer and everything after the RAM region:
        SWITCHOVER_START if the machine sends it, an END section holding only
        EOS (as QEMU's), the device sections, EOF and the vmdesc trailer.

        :return: the absolute end offset of the file.
        """
        for bi in range(len(self.placed)):
            self._write_bitmap(bi)
        out = bytearray(EOS + encode_footer(self.sid))
        if self.state.switchover_start:
            out += encode_command(Command.SWITCHOVER_START)
        out += encode_section_part(SectionType.END, self.sid) + EOS + encode_footer(self.sid)
        self.tail_bytes = self.state.tail()
        out += self.tail_bytes
        os.pwrite(self.fd, bytes(out), self.ram_end)
        end = self.ram_end + len(out)
        os.ftruncate(self.fd, end)
        self.finished = True
        return end
