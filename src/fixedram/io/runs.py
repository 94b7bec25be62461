"""Runs of consecutive page numbers: one coalescing for every reader and writer.

Pages are read, written and spliced a run at a time (one system call per run),
so every path that holds page numbers turns them into runs here.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np

__all__ = ["index_runs", "page_runs"]


def index_runs(idx: np.ndarray) -> list[tuple[int, int]]:
    """(position in ``idx``, length) of each run of consecutive page numbers in
    ``idx`` (in the order given; a repeat or a step back starts a new run)."""
    n = idx.size
    if n == 0:
        return []
    if n == 1 or bool((idx[-1] - idx[0] == n - 1) and (np.diff(idx) == 1).all()):
        return [(0, n)]  # the usual case: one run, found without building lists
    brk = [0, *(np.flatnonzero(np.diff(idx) != 1) + 1).tolist(), n]
    return [(a, b - a) for a, b in itertools.pairwise(brk)]


def page_runs(idx: np.ndarray, max_pages: int) -> Iterator[tuple[int, int]]:
    """(first page, count) of each run of ascending ``idx``, cut at ``max_pages``."""
    firsts = idx.tolist()
    for a, n in index_runs(idx):
        s = firsts[a]
        for f in range(s, s + n, max_pages):
            yield f, min(max_pages, s + n - f)
