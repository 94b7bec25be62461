"""``fixedram verify``: is a save file sound and complete; do two files hold the same RAM?"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import FixedramError, FormatError, UsageError
from ..format.migfile import MigrationFile, RAMBlock
from ..format.walker import Save
from ..io.runs import index_runs
from ..memory.pages import iter_chunks

__all__ = ["BlockDiff", "OnePassCompare", "compare", "compare_total", "structural_problems"]


def structural_problems(mf: Save) -> list[str]:
    """Checks beyond parsing: completeness, regions inside the file, no overlaps."""
    probs: list[str] = []
    if mf.libvirt is not None and not mf.libvirt.complete:
        probs.append("libvirt image is unfinished (LibvirtQemudPart header)")
    if mf.error is not None:
        probs.append(str(mf.error))
    elif not mf.summary.complete:
        probs.append("no EOF marker: the save is incomplete")
    regions: list[tuple[int, int, str]] = []
    for b in mf.blocks:
        m = b.record.mapped
        if m is None or not isinstance(b, RAMBlock):  # mapped-ram is read at offsets only
            continue
        bm_end = m.bitmap_offset + b.record.bitmap_bytes
        pg_end = m.pages_offset + b.used_length
        if bm_end > mf.size:
            probs.append(f"bitmap of {b.idstr!r} at 0x{m.bitmap_offset:x} runs past end of file")
        if pg_end > mf.size:
            probs.append(f"pages region of {b.idstr!r} at 0x{m.pages_offset:x} runs past end "
                         "of file")
        regions.append((m.bitmap_offset, bm_end, f"bitmap of {b.idstr!r}"))
        regions.append((m.pages_offset, pg_end, f"pages of {b.idstr!r}"))
        if bm_end <= mf.size and not b.bitmap_tail_clean:
            probs.append(f"bitmap of {b.idstr!r} has bits set past its last page")
    regions.sort()
    for (a0, a1, an), (b0, _b1, bn) in itertools.pairwise(regions):
        if b0 < a1:
            probs.append(f"{an} (0x{a0:x}-0x{a1:x}) overlaps {bn} (0x{b0:x})")
    for d in mf.sections:
        if d.end > mf.size:
            probs.append(f"device section {d.idstr!r} runs past end of file")
    return probs


@dataclass
class BlockDiff:
    idstr: str
    differing_pages: list[int] = field(default_factory=list)
    only_in: str | None = None
    count: int = 0
    length_a: int = 0
    length_b: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"idstr": self.idstr, "differing_pages": self.differing_pages,
                "differing_count": self.count, "only_in": self.only_in,
                "used_length_a": self.length_a, "used_length_b": self.length_b}


def _comparable(a: RAMBlock, b: RAMBlock | None) -> bool:
    return b is not None and a.used_length == b.used_length and a.page_size == b.page_size


def compare_total(a: MigrationFile, b: MigrationFile) -> int:
    """Bytes of guest RAM :func:`compare` reads page by page (its progress total)."""
    names_b = {blk.idstr: blk for blk in b.blocks}
    return sum(blk.used_length for blk in a.blocks if _comparable(blk, names_b.get(blk.idstr)))


def compare(a: MigrationFile, b: MigrationFile, *, max_report: int = 1000,
            progress: Callable[[int], None] | None = None) -> list[BlockDiff]:
    """Guest RAM of two files of any format, page by page, per block.

    :param progress: called with the bytes of each chunk of pages compared
        (:func:`compare_total` in all).
    """
    out: list[BlockDiff] = []
    names_b = {blk.idstr: blk for blk in b.blocks}
    for blk in a.blocks:
        other = names_b.pop(blk.idstr, None)
        if other is None:
            out.append(BlockDiff(blk.idstr, only_in="a", length_a=blk.used_length))
            continue
        d = BlockDiff(blk.idstr, length_a=blk.used_length, length_b=other.used_length)
        if not _comparable(blk, other):
            out.append(d)
            continue
        total = 0
        for (lo, pa), (_lo2, pb) in zip(iter_chunks(blk), iter_chunks(other), strict=True):
            rows = np.flatnonzero((pa.view(np.uint64) != pb.view(np.uint64)).any(axis=1))
            total += rows.size
            if progress is not None:
                progress(pa.nbytes)
            room = max_report - len(d.differing_pages)
            if room > 0:
                d.differing_pages.extend((rows[:room] + lo).tolist())
        if total:
            d.count = total
            out.append(d)
    for name, blk in names_b.items():
        out.append(BlockDiff(name, only_in="b", length_b=blk.used_length))
    return out


def open_checked(path: str, opener: Callable[..., Save] | None = None,
                 snapshot: str | None = None) -> tuple[Save | None, list[str]]:
    """Open leniently; a format error becomes a problem line.

    :param opener: opens the save (default :func:`fixedram.save.open_save`;
        the CLI's shows a progress bar).
    :param snapshot: in a qcow2 image, the internal snapshot to check.
    """
    if opener is None:
        from ..save import open_save

        opener = open_save
    try:
        mf = (opener(path, strict=False) if snapshot is None
              else opener(path, strict=False, snapshot=snapshot))
    except FormatError as e:
        return None, [str(e)]
    except FixedramError:
        raise
    return mf, structural_problems(mf)


class OnePassCompare:
    """Compares each arriving page with the same page of a file (``verify --against``).

    One bool per page says whether the page's last copy differs; a later copy
    decides again. Pages the stream never sent count as zero, as in
    :func:`fixedram.tools.verify.compare`.
    """

    def __init__(self, other: Save) -> None:
        from ..format.migfile import MigrationFile

        if not isinstance(other, MigrationFile):
            raise UsageError(f"{other.path}: a save compared page by page with a one-pass "
                             "input must be a file that can be read at offsets")
        self.other = other
        self.by_name = {b.idstr: b for b in other.blocks}
        self.pairs: list[Any] = []  # the other's block for each of ours (same length), or None
        self.diff: list[np.ndarray | None] = []

    def begin(self, f: Save) -> None:
        for b in f.blocks:
            o = self.by_name.get(b.idstr)
            same = o is not None and o.used_length == b.used_length and \
                o.page_size == b.page_size
            self.pairs.append(o if same else None)
            self.diff.append(np.zeros(b.npages, dtype=bool) if same else None)

    def _theirs(self, bi: int, first: int, n: int) -> np.ndarray:
        o = self.pairs[bi]
        ps = o.page_size
        return np.frombuffer(o.read(first * ps, n * ps), dtype=np.uint8).reshape(n, ps)

    def pages(self, bi: int, idx: np.ndarray, data: np.ndarray) -> None:
        d = self.diff[bi]
        if d is None:
            return
        for a, n in index_runs(idx):
            first = int(idx[a])
            d[first:first + n] = (data[a:a + n] != self._theirs(bi, first, n)).any(axis=1)

    def zeros(self, bi: int, idx: np.ndarray, had_data: np.ndarray) -> None:
        d = self.diff[bi]
        if d is None:
            return
        self._nonzero_theirs(bi, np.unique(idx), d)

    def _nonzero_theirs(self, bi: int, pages: np.ndarray, d: np.ndarray) -> None:
        """Pages ``pages`` (ascending) are zero here: they differ where the file's are not."""
        for a, n in index_runs(pages):
            first = int(pages[a])
            d[first:first + n] = self._theirs(bi, first, n).any(axis=1)

    def result(self, f: Save, max_report: int = 1000) -> list[BlockDiff]:
        out: list[BlockDiff] = []
        mine = set()
        for b, o, d in zip(f.blocks, self.pairs, self.diff, strict=True):
            mine.add(b.idstr)
            other = self.by_name.get(b.idstr)
            if other is None:
                out.append(BlockDiff(b.idstr, only_in="a", length_a=b.used_length))
                continue
            bd = BlockDiff(b.idstr, length_a=b.used_length, length_b=other.used_length)
            if o is None or d is None:
                out.append(bd)
                continue
            # Never sent here: zero, so it differs where the other holds non-zero data.
            sent = np.union1d(b.present_pages(), b.zeroed_pages())
            self._nonzero_theirs(b.index, np.setdiff1d(o.present_pages(), sent,
                                                       assume_unique=True), d)
            rows = np.flatnonzero(d)
            if rows.size:
                bd.count = int(rows.size)
                bd.differing_pages = rows[:max_report].tolist()
                out.append(bd)
        for name, o in self.by_name.items():
            if name not in mine:
                out.append(BlockDiff(name, only_in="b", length_b=o.used_length))
        return out
