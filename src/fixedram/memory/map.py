"""The page map of a save, as ``qemu-img map`` gives one of a disk image.

Each RAMBlock, from 0 to its used length, is cut into extents of pages of
one kind:

- ``data``: the file holds the page's bytes (the last copy sent, for a stream);
- ``zero``: the page is zero on load: the last record sent for it was a ZERO
  record (a stream), or its bit is clear in a complete mapped-ram file (which
  writes no zero pages: QEMU's loader leaves such a page as the fresh
  destination has it, zero);
- ``absent``: the save holds nothing for the page (a page no stream record
  named, or a clear bit of an incomplete mapped-ram file, whose pages may
  simply not have been written yet).

An extent is consecutive pages with the same kind and the same number of
copies sent and, for data, file offsets one stride apart: the page size in a
mapped-ram file, page size + 8 in a stream (consecutive CONTINUE page records,
each an 8-byte header before its data). Page ``k`` of a data extent is at
``file_offset + k * stride``; a stream's extent breaks wherever the next page
was not the next record (another block's, a re-send, a section boundary).

A one-pass input (a pipe, a compressed image) is mapped as it is read: the
same kinds and copies, and no file offsets (a pipe has none).

Everything is computed on whole-block numpy arrays: no Python loop per page.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..describe import SCHEMA_VERSION
from ..format.migfile import MigrationFile, RAMBlock
from ..format.walker import BlockFacts, Save
from .layout import PhysRange, guest_physical

__all__ = ["KINDS", "BlockMap", "Extent", "block_map", "file_map", "stride_of"]

DATA, ZERO, ABSENT = 0, 1, 2
KINDS = ("data", "zero", "absent")
_STREAM_RECORD_HEADER = 8  # be64 address | flags before each page's data
# Extents turned into Python objects at a time (table and JSON output): a few MiB.
CHUNK_EXTENTS = 1 << 15


@dataclass(frozen=True)
class Extent:
    block: str
    start: int  # bytes into the block
    length: int  # bytes
    kind: str
    file_offset: int | None  # None unless data, and for a one-pass input
    copies: int


@dataclass
class BlockMap:
    """One block's extents as parallel arrays (pages, not bytes)."""

    block: BlockFacts
    first: np.ndarray  # int64 first page of each extent
    count: np.ndarray  # int64 pages in each extent
    kind: np.ndarray  # int8 DATA/ZERO/ABSENT
    file_offset: np.ndarray  # int64, 0 where no data; -1 everywhere for a one-pass input
    copies: np.ndarray  # uint32
    stride: int  # 0 for a one-pass input
    # Dense per-page arrays, kept for the picture (--svg).
    page_kind: np.ndarray
    page_copies: np.ndarray
    # Where the guest sees the block (none: not mapped, or the layout is not known).
    guest_physical: list[PhysRange[BlockFacts]]

    def __len__(self) -> int:
        return int(self.first.size)

    def chunks(self) -> Iterator[tuple[list[int], list[int], list[int], list[int], list[int]]]:
        """(start, length, kind, file offset or -1, copies) of the extents, in bytes,
        as Python lists of at most :data:`CHUNK_EXTENTS` each.

        Lists of the whole block would cost some 180 bytes an extent (an int
        object and a list slot per field): with millions of extents, more
        than the dense per-page arrays of the map itself.
        """
        ps, used = self.block.page_size, self.block.used_length
        for i in range(0, len(self), CHUNK_EXTENTS):
            sl = slice(i, i + CHUNK_EXTENTS)
            kind = self.kind[sl]
            start = self.first[sl] * ps
            yield (start.tolist(), np.minimum(self.count[sl] * ps, used - start).tolist(),
                   kind.tolist(), np.where(kind == DATA, self.file_offset[sl], -1).tolist(),
                   self.copies[sl].tolist())

    def extents(self) -> Iterator[Extent]:
        name = self.block.idstr
        for start, length, kind, offs, copies in self.chunks():
            for s, ln, k, o, c in zip(start, length, kind, offs, copies, strict=True):
                yield Extent(name, s, ln, KINDS[k], o if o >= 0 else None, c)


def stride_of(mf: MigrationFile, b: RAMBlock) -> int:
    """Bytes from one page's data to the next one's within a data extent."""
    return b.page_size if b.record.mapped is not None else b.page_size + _STREAM_RECORD_HEADER


def block_map(mf: Save, b: BlockFacts,
              guest: list[PhysRange[BlockFacts]] | None = None) -> BlockMap:
    """One block's map; ``guest``: its guest-physical ranges (:func:`.layout.guest_physical`)."""
    n = b.npages
    kind = np.full(n, ABSENT, dtype=np.int8)
    if isinstance(b, RAMBlock):
        assert isinstance(mf, MigrationFile)
        offs = b.data_offsets()
        kind[offs > 0] = DATA
        stride = stride_of(mf, b)
        # A complete mapped-ram file's clear bit: the page is zero on load.
        if b.record.mapped is not None and mf.complete:
            kind[kind == ABSENT] = ZERO
    else:  # one pass: no file offsets
        offs = np.full(n, -1, dtype=np.int64)
        kind[b.present_pages()] = DATA
        stride = 0
    kind[b.zeroed_pages()] = ZERO
    copies = b.copies()
    guest = guest or []
    if n == 0:
        e = np.zeros(0, dtype=np.int64)
        return BlockMap(b, e, e, kind, e, copies, stride, kind, copies, guest)
    brk = (kind[1:] != kind[:-1]) | (copies[1:] != copies[:-1])
    if stride:
        brk |= (kind[1:] == DATA) & (np.diff(offs) != stride)
    first = np.concatenate(([0], np.flatnonzero(brk) + 1)).astype(np.int64)
    count = np.diff(np.append(first, n))
    return BlockMap(b, first, count, kind[first], offs[first], copies[first], stride, kind,
                    copies, guest)


def file_map(mf: Save) -> list[BlockMap]:
    """Every block's map, in the file's block order, with its guest-physical
    ranges (:func:`.layout.guest_physical` says why there are none).

    A one-pass input (a pipe, a compressed image) is walked here, once.
    """
    if mf.walked() is None:
        mf.walk()
    placed, _why = guest_physical(mf)
    return [block_map(mf, b, placed[b.index]) for b in mf.blocks]


def _json_str(s: str) -> str:
    import json

    return json.dumps(s)


def json_text(maps: list[BlockMap], unplaced: str | None = None) -> Iterator[str]:
    """The ``--json`` document in pieces: ``{"schema_version": 1, "extents": [...],
    "blocks": [...]}``, and ``"guest_physical_error"`` when ``unplaced`` says why
    no block has a guest-physical placement.

    Written by hand rather than through json.dumps of a list of dicts: a
    re-sent stream can have a million extents and this is several times faster.
    Each piece holds at most :data:`CHUNK_EXTENTS` extents, so the text never
    costs more memory than one chunk's, whatever the number of extents.
    """
    yield f'{{"schema_version": {SCHEMA_VERSION}, "extents": ['
    sep = "\n"
    kinds = ('"data"', '"zero"', '"absent"')
    for m in maps:
        name = _json_str(m.block.idstr)
        for start, length, kind, offs, copies in m.chunks():
            lines = []
            for s, ln, k, o, c in zip(start, length, kind, offs, copies, strict=True):
                lines.append(f'{sep}{{"block": {name}, "start": {s}, "length": {ln}, '
                             f'"kind": {kinds[k]}, "file_offset": {o if o >= 0 else "null"}, '
                             f'"copies": {c}}}')
                sep = ",\n"
            yield "".join(lines)
    yield "\n],\n"
    yield '"blocks": ['
    sep = "\n"
    for m in maps:
        b = m.block
        placed = ", ".join(f'{{"gpa": {r.gpa}, "block_offset": {r.block_offset}, '
                           f'"length": {r.length}}}' for r in m.guest_physical)
        yield (f'{sep}{{"idstr": {_json_str(b.idstr)}, "used_length": {b.used_length}, '
               f'"guest_physical": [{placed}]}}')
        sep = ",\n"
    yield "\n]"
    if unplaced is not None:
        yield f', "guest_physical_error": {_json_str(unplaced)}'
    yield "}\n"
