"""Dense page chunks of a RAMBlock, for comparisons and conversions."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..format.migfile import RAMBlock, Run
from .copy import RunCopier

__all__ = ["iter_chunks"]


def iter_chunks(block: RAMBlock, chunk_pages: int = 4096,
                max_run: int = 256) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(first_page, pages)`` with ``pages`` a (n, page_size) uint8 array.

    Absent pages are zero. The array is reused between iterations.
    """
    ps = block.page_size
    copier = RunCopier(block._mf.source, ps, max_run, block._mf.path)
    buf = np.zeros((chunk_pages, ps), dtype=np.uint8)
    runs = iter(block.runs(max_run))
    pending: Run | None = next(runs, None)
    for lo in range(0, block.npages, chunk_pages):
        hi = min(lo + chunk_pages, block.npages)
        view = buf[: hi - lo]
        view.fill(0)
        while pending is not None and pending.first < hi:
            part = pending.clip(lo, hi)
            assert part is not None  # pending starts below hi and ends above lo
            data = copier.read_run(part)
            a, b = part.first, part.first + part.count
            view[a - lo:b - lo] = np.frombuffer(data, dtype=np.uint8).reshape(b - a, ps)
            if pending.first + pending.count <= hi:
                pending = next(runs, None)
            else:
                break
        yield lo, view
