"""Small helpers shared by tests (no QEMU here)."""

from __future__ import annotations

import os
from pathlib import Path


def sparse_prefix(src: Path, dst: Path, n: int) -> None:
    """Copy the first ``n`` bytes of ``src`` to ``dst``, keeping holes (SEEK_DATA)."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fo.truncate(n)
        fdi = fi.fileno()
        pos = 0
        while pos < n:
            try:
                data = os.lseek(fdi, pos, os.SEEK_DATA)
            except OSError:
                break
            if data >= n:
                break
            hole = min(os.lseek(fdi, data, os.SEEK_HOLE), n)
            off = data
            while off < hole:
                chunk = os.pread(fdi, min(1 << 20, hole - off), off)
                os.pwrite(fo.fileno(), chunk, off)
                off += len(chunk)
            pos = hole


def elf_segments(path: Path) -> list[tuple[int, int, int]]:
    """(p_offset, p_paddr, p_filesz) of each PT_LOAD of an ELF64 core."""
    import struct

    data = path.read_bytes()[:65536]
    assert data[:4] == b"\x7fELF"
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    out = []
    for i in range(phnum):
        p_type, _fl, off, _va, pa, filesz, _memsz, _al = struct.unpack_from(
            "<IIQQQQQQ", data, phoff + i * phentsize)
        if p_type == 1:
            out.append((off, pa, filesz))
    return out
