"""Dense page chunks of a RAMBlock, for comparisons and conversions."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from ..format.migfile import RAMBlock, Run
from .copy import RunCopier

__all__ = ["clip_runs", "iter_chunks"]


def clip_runs(runs: Iterable[Run], lo: int, hi: int) -> Iterator[Run]:
    """Runs restricted to pages [lo, hi) (page numbers stay absolute)."""
    for r in runs:
        a, b = max(r.first, lo), min(r.first + r.count, hi)
        if a < b:
            yield Run(a, b - a, r.file_offset + (a - r.first) * r.stride, r.stride)


def iter_chunks(block: RAMBlock, chunk_pages: int = 4096,
                max_run: int = 256) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first_page, pages)`` with ``pages`` a (n, page_size) uint8 array.

    Absent pages are zero. The array is reused between iterations.
    """
    ps = block.page_size
    copier = RunCopier(block._mf.fd, ps, max_run, block._mf.path)
    buf = np.zeros((chunk_pages, ps), dtype=np.uint8)
    runs = iter(block.runs(max_run))
    pending: Run | None = next(runs, None)
    for lo in range(0, block.npages, chunk_pages):
        hi = min(lo + chunk_pages, block.npages)
        view = buf[: hi - lo]
        view.fill(0)
        while pending is not None and pending.first < hi:
            a = max(pending.first, lo)
            b = min(pending.first + pending.count, hi)
            part = Run(a, b - a, pending.file_offset + (a - pending.first) * pending.stride,
                       pending.stride if b - a > 1 else ps)
            data = copier.read_run(part)
            view[a - lo:b - lo] = np.frombuffer(data, dtype=np.uint8).reshape(b - a, ps)
            if pending.first + pending.count <= hi:
                pending = next(runs, None)
            else:
                break
        yield lo, view
