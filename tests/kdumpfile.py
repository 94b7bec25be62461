"""A small reader of makedumpfile's compressed kdump format, for checking what we write.

Written from the format's description (makedumpfile's diskdump_mod.h, crash's diskdump.c),
independently of src/fixedram/memory/kdump.py, so that a mistake in the writer is not
repeated here. LZO and snappy are decompressed through liblzo2 and libsnappy with ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DH = struct.Struct("<8si390s6xqqIiiIIIIIIi")
SUB = struct.Struct("<QiiQQQQQQQQQQQ")
DESC = struct.Struct("<qIIQ")
ZLIB, LZO, SNAPPY, ZSTD = 0x1, 0x2, 0x4, 0x20


def _lib(name: str) -> ctypes.CDLL:
    path = ctypes.util.find_library(name)
    assert path, f"lib{name} is not installed"
    return ctypes.CDLL(path)


def lzo_decompress(data: bytes, size: int) -> bytes:
    lib = _lib("lzo2")
    out = ctypes.create_string_buffer(size)
    n = ctypes.c_size_t(size)
    rc = lib.lzo1x_decompress_safe(data, ctypes.c_size_t(len(data)), out, ctypes.byref(n), None)
    assert rc == 0, f"lzo1x_decompress_safe: {rc}"
    return out.raw[:n.value]


def snappy_decompress(data: bytes, size: int) -> bytes:
    lib = _lib("snappy")
    out = ctypes.create_string_buffer(size)
    n = ctypes.c_size_t(size)
    rc = lib.snappy_uncompress(data, ctypes.c_size_t(len(data)), out, ctypes.byref(n))
    assert rc == 0, f"snappy_uncompress: {rc}"
    return out.raw[:n.value]


def decompress(flags: int, data: bytes, size: int) -> bytes:
    if flags & ZLIB:
        return zlib.decompress(data)
    if flags & LZO:
        return lzo_decompress(data, size)
    if flags & SNAPPY:
        return snappy_decompress(data, size)
    if flags & ZSTD:
        import zstandard

        return zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
    assert flags == 0 and len(data) == size, (flags, len(data))
    return data


@dataclass
class KdumpFile:
    path: Path
    header: tuple[object, ...]
    sub: tuple[int, ...]
    block_size: int
    max_mapnr: int
    notes: bytes
    vmcoreinfo: bytes
    bitmap1: np.ndarray  # one bool per pfn
    bitmap2: np.ndarray
    desc_offset: int

    @classmethod
    def open(cls, path: Path) -> KdumpFile:
        with open(path, "rb") as f:
            raw = f.read(DH.size)
            h = DH.unpack(raw)
            assert h[0] == b"KDUMP   " and h[1] == 6, h[:2]
            bs, sub_blocks, bitmap_blocks = h[6], h[7], h[8]
            f.seek(bs)
            sub = SUB.unpack(f.read(SUB.size))
            max_mapnr = sub[13]
            f.seek(sub[7])
            notes = f.read(sub[8])
            f.seek(sub[5])
            vmci = f.read(sub[6])
            f.seek((1 + sub_blocks) * bs)
            half = bitmap_blocks * bs // 2
            assert half >= (max_mapnr + 7) // 8
            bm = np.frombuffer(f.read(2 * half), dtype=np.uint8)
            bits = np.unpackbits(bm, bitorder="little").astype(bool)
            b1, b2 = bits[:max_mapnr], bits[half * 8:half * 8 + max_mapnr]
            return cls(path, h, sub, bs, max_mapnr, notes, vmci, b1, b2,
                       (1 + sub_blocks + bitmap_blocks) * bs)

    @property
    def status(self) -> int:
        return int(self.header[5])  # type: ignore[call-overload]

    @property
    def zero_page_offset(self) -> int:
        """Where page data start: QEMU and makedumpfile put the shared zero page there."""
        return self.desc_offset + int(self.bitmap2.sum()) * DESC.size

    def descriptors(self) -> np.ndarray:
        n = int(self.bitmap2.sum())
        dt = np.dtype([("offset", "<i8"), ("size", "<u4"), ("flags", "<u4"), ("pf", "<u8")])
        with open(self.path, "rb") as f:
            f.seek(self.desc_offset)
            return np.frombuffer(f.read(n * DESC.size), dtype=dt)

    def pages(self) -> Iterator[tuple[int, bytes]]:
        """(pfn, the page's bytes) of every dumped page, in pfn order."""
        pfns = np.flatnonzero(self.bitmap2)
        d = self.descriptors()
        bs = self.block_size
        with open(self.path, "rb") as f:
            for pfn, (off, size, flags, _pf) in zip(pfns.tolist(), d.tolist(), strict=True):
                assert 0 < size <= bs and off > 0
                f.seek(off)
                yield pfn, decompress(flags, f.read(size), bs)
