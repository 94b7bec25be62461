"""Read-only mappings of file regions, for parsers that look without copying."""

from __future__ import annotations

import mmap

__all__ = ["map_region"]


def map_region(fd: int, offset: int, length: int) -> tuple[mmap.mmap, int] | None:
    """A read-only mapping holding ``length`` bytes of ``fd`` from ``offset``, and
    the index of ``offset`` in it (mappings start at an allocation boundary);
    None when the file cannot be mapped there. The caller closes it."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        m = mmap.mmap(fd, offset - start + length, prot=mmap.PROT_READ, offset=start)
    except (OSError, ValueError):
        return None
    return m, offset - start
