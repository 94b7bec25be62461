"""The kdump writer's parts, without QEMU: codecs, batches, bitmaps, and what the guest says.

Everything the headers take from the guest (VMCOREINFO values, the utsname they point at,
the save's RAM size) is checked before use, so hostile values give a fallback or a typed
error, and memory never follows a size the input declares.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np
import pytest

from fixedram.errors import CorruptFile, UnsupportedFeature, UsageError
from fixedram.format.migfile import Run
from fixedram.memory import kdump
from fixedram.memory.layout import PhysRange
from kdumpfile import decompress

PAGES = [bytes(4096), os.urandom(4096), (b"Linux version 6.1 " * 300)[:4096],
         bytes(range(256)) * 16]


@pytest.mark.parametrize("codec", list(kdump.CODECS))
def test_codecs_round_trip(codec: str) -> None:
    compress = kdump.page_compressor(codec)()
    buf = np.frombuffer(b"".join(PAGES), dtype=np.uint8).copy().reshape(len(PAGES), 4096)
    mv = buf.data.cast("B")
    for i, page in enumerate(PAGES):
        c = compress(mv[i * 4096:(i + 1) * 4096], buf.ctypes.data + i * 4096)
        flags = kdump.CODECS[codec] if len(c) < 4096 else 0
        assert decompress(flags, c if flags else page, 4096) == page
    text = compress(mv[2 * 4096:3 * 4096], buf.ctypes.data + 2 * 4096)
    assert codec == "none" or len(text) < 1000


def test_unknown_codec() -> None:
    with pytest.raises(UsageError, match="unknown --compress"):
        kdump.page_compressor("brotli")


def _note(name: bytes, ntype: int, desc: bytes) -> bytes:
    n = name + b"\0"
    return (struct.pack("<III", len(n), len(desc), ntype) + n.ljust(-(-len(n) // 4) * 4, b"\0")
            + desc.ljust(-(-len(desc) // 4) * 4, b"\0"))


def test_notes_walk_stops_at_a_hostile_size() -> None:
    good = _note(b"CORE", 1, bytes(336)) + _note(b"VMCOREINFO", 0, b"OSRELEASE=6.1\n")
    found = list(kdump._notes(good))
    assert [(n, t, s) for n, t, _, s in found] == [(b"CORE", 1, 336), (b"VMCOREINFO", 0, 14)]
    at = found[1][2]
    assert good[at:at + 14] == b"OSRELEASE=6.1\n"
    bad = good + struct.pack("<III", 11, 0xFFFFFFF0, 0) + b"VMCOREINFO\0\0"
    assert len(list(kdump._notes(bad))) == 2
    assert list(kdump._notes(b"\x05\x00")) == []


UTS = b"".join(s.ljust(65, b"\0") for s in (b"Linux", b"guest", b"6.1.0-test", b"#1 SMP",
                                             b"x86_64", b"(none)"))
SYM = 0xFFFFFFFF81000000
PHYS_BASE = 0x1000000


def _reader(mem: dict[int, bytes]):  # type: ignore[no-untyped-def]
    def read(gpa: int, n: int) -> bytes | None:
        for base, data in mem.items():
            if base <= gpa and gpa + n <= base + len(data):
                return data[gpa - base:gpa - base + n]
        return None
    return read


def _fields(**extra: str) -> dict[str, str]:
    f = {"OSRELEASE": "6.1.0-test", "SYMBOL(init_uts_ns)": f"{SYM:x}",
         "OFFSET(uts_namespace.name)": "0"}
    f.update(extra)
    return f


FALLBACK = [b"Linux", b"", b"6.1.0-test", b"unknown", b"x86_64", b""]


def test_utsname_from_guest_ram() -> None:
    read = _reader({SYM - kdump.START_KERNEL_MAP + PHYS_BASE: UTS})
    assert kdump.utsname(_fields(), read, PHYS_BASE) == [
        b"Linux", b"guest", b"6.1.0-test", b"#1 SMP", b"x86_64", b"(none)"]
    # Older kernels: no OFFSET line, a kref before the name.
    read = _reader({SYM - kdump.START_KERNEL_MAP + PHYS_BASE: bytes(4) + UTS})
    fields = _fields()
    del fields["OFFSET(uts_namespace.name)"]
    assert kdump.utsname(fields, read, PHYS_BASE)[3] == b"#1 SMP"


@pytest.mark.parametrize("extra", [
    {"SYMBOL(init_uts_ns)": "ffff888000000000"},  # not a kernel-image address
    {"SYMBOL(init_uts_ns)": "1" * 40},  # past 64 bits
    {"SYMBOL(init_uts_ns)": "zz"},
    {"OFFSET(uts_namespace.name)": "999999999999"},
    {"OSRELEASE": "6.1.0-other"},  # the name in RAM says another release
])
def test_utsname_hostile_values_fall_back(extra: dict[str, str]) -> None:
    read = _reader({SYM - kdump.START_KERNEL_MAP + PHYS_BASE: UTS})
    got = kdump.utsname(_fields(**extra), read, PHYS_BASE)
    assert got[0] == b"Linux" and got[3] == b"unknown"


def test_utsname_unreadable_or_garbage() -> None:
    assert kdump.utsname(_fields(), _reader({}), PHYS_BASE) == FALLBACK
    junk = _reader({SYM - kdump.START_KERNEL_MAP + PHYS_BASE: b"\xff" * 4096})
    assert kdump.utsname(_fields(), junk, PHYS_BASE) == FALLBACK
    long = "9" * 200
    assert kdump.utsname({"OSRELEASE": long}, _reader({}), 0)[2] == long.encode()[:64]


def test_vmcoreinfo_fields() -> None:
    f = kdump.vmcoreinfo_fields(b"OSRELEASE=6.1\nNUMBER(phys_base)=25165824\njunk\nA=1\nA=2\n")
    assert f == {"OSRELEASE": "6.1", "NUMBER(phys_base)": "25165824", "A": "1"}
    assert kdump._number(f, "NUMBER(phys_base)", 10) == 25165824
    assert kdump._number({"N": "-1"}, "N", 10) is None
    assert kdump._number({"N": str(1 << 64)}, "N", 10) is None


def test_bitmap_chunks_bounded_and_exact() -> None:
    # A save may declare 16 TiB of RAM: 2^32 frames, a 512 MiB bitmap, built 1 MiB at a time.
    spans = [(0, 10), ((1 << 32) - 5, 1 << 32)]
    chunks = list(kdump.bitmap_chunks(spans, 1 << 29))
    assert [at for at, _ in chunks] == [0, (1 << 29) - (1 << 20)]
    assert all(len(c) == kdump.BITMAP_CHUNK for _, c in chunks)
    first, last = chunks[0][1], chunks[1][1]
    assert first[:2] == b"\xff\x03" and not any(first[2:])
    assert last[-1] == 0xF8 and not any(last[:-1])
    # Edges that fall inside a byte, in a bitmap shorter than a chunk.
    bits = np.zeros(64 * 8, dtype=bool)
    bits[3:13] = bits[100:101] = True
    got = b"".join(c for _, c in kdump.bitmap_chunks([(3, 13), (100, 101)], 64))
    assert got == np.packbits(bits, bitorder="little").tobytes()


@dataclass
class FakeBlock:
    idstr: str
    page_size: int
    used_length: int
    run_list: list[Run]

    def runs(self, max_pages: int = 256) -> list[Run]:
        out = []
        for r in self.run_list:
            for f in range(r.first, r.first + r.count, max_pages):
                n = min(max_pages, r.first + r.count - f)
                out.append(Run(f, n, r.file_offset + (f - r.first) * r.stride, r.stride))
        return out


def test_layout() -> None:
    ram = FakeBlock("pc.ram", 4096, 256 << 20, [])
    bios = FakeBlock("pc.bios", 4096, 256 << 10, [])
    loads = [PhysRange(0, ram, 0, 256 << 20), PhysRange((4 << 30) - (256 << 10), bios, 0,
                                                        256 << 10)]
    lay = kdump.kdump_layout(loads, 0x330 + 0x800)  # type: ignore[arg-type]
    assert lay.spans == [(0, 0x10000), (0xFFFC0, 0x100000)]
    assert lay.max_mapnr == 0x100000 and lay.bitmap_bytes == 0x20000
    assert lay.sub_hdr_blocks == 1 and lay.bitmap_offset == 0x2000
    assert lay.desc_offset == 0x2000 + 0x40000
    assert lay.data_offset == lay.desc_offset + 24 * (0x10000 + 64)


@pytest.mark.parametrize(("loads", "error"), [
    ([PhysRange(0, FakeBlock("huge", 2 << 20, 2 << 20, []), 0, 2 << 20)], UnsupportedFeature),
    ([PhysRange(0x800, FakeBlock("odd", 4096, 8192, []), 0, 4096)], UnsupportedFeature),
    ([PhysRange(0, FakeBlock("a", 4096, 8192, []), 0, 8192),
      PhysRange(4096, FakeBlock("b", 4096, 8192, []), 0, 8192)], CorruptFile),
    ([PhysRange(1 << 52, FakeBlock("far", 4096, 4096, []), 0, 4096)], CorruptFile),
])
def test_layout_refuses(loads: list[PhysRange[FakeBlock]], error: type[Exception]) -> None:
    with pytest.raises(error):
        kdump.kdump_layout(loads, 100)  # type: ignore[arg-type]


def test_batches_cut_runs_at_batch_edges() -> None:
    # Block pages 0..5000, mapped at 1 GiB from block page 100 on; runs crossing batch edges.
    runs = [Run(50, 100, 0, 4104), Run(1100, 2000, 1 << 20, 4096), Run(4000, 1, 9 << 20, 4096)]
    block = FakeBlock("pc.ram", 4096, 5000 * 4096, runs)
    pr = PhysRange(1 << 30, block, 100 * 4096, 4900 * 4096)
    batches = list(kdump._batches([pr], pages=1024))  # type: ignore[list-item]
    assert [(b.rank, b.pages) for b in batches] == [(0, 1024), (1024, 1024), (2048, 1024),
                                                    (3072, 1024), (4096, 804)]
    covered: list[int] = []
    for b in batches:
        for run, at in b.pieces:
            assert at >= 0 and at + run.count <= b.pages
            assert run.first - 100 == b.rank + at  # block page -> frame rank
            covered += range(run.first, run.first + run.count)
            # the piece's data are where the whole run had them
            src = next(r for r in runs if r.first <= run.first < r.first + r.count)
            assert run.file_offset == src.file_offset + (run.first - src.first) * src.stride
    assert covered == [*range(100, 150), *range(1100, 3100), 4000]


@dataclass
class FakeSave:
    fd: int
    path: str


def test_holes_are_zero_pages_and_a_short_file_is_an_error(tmp_path: os.PathLike[str]) -> None:
    """Mapped-ram zero pages are holes: not read. A run past the file's end is read, and fails."""
    path = os.path.join(tmp_path, "pages")
    with open(path, "wb") as f:
        f.write(b"\x01" * 4096)
        f.seek(64 * 4096)
        f.write(b"\x02" * 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        p = kdump._Packer(FakeSave(fd, path), kdump.page_compressor("zlib"), 1)  # type: ignore[arg-type]
        try:
            # A file system may keep data in blocks larger than a page: at least these pages.
            got = p._data_pages(Run(0, 65, 0, 4096))
            assert got[0][0] == 0 and got[-1][1] == 65
            assert sum(z - a for a, z in got) <= 65
            idx, sizes, flags, data, covered = p.pack(kdump._Batch(0, 65, [(Run(0, 65, 0, 4096),
                                                                              0)]))
            assert idx.tolist() == [0, 64] and flags == [1, 1] and covered == 65 * 4096
            assert decompress(1, data[:sizes[0]], 4096) == b"\x01" * 4096
            with pytest.raises(CorruptFile, match="ends early"):
                p.pack(kdump._Batch(0, 66, [(Run(0, 66, 0, 4096), 0)]))
        finally:
            p.close()
    finally:
        os.close(fd)


def test_phys_base_of_a_kernel_loaded_below_its_link_address() -> None:
    """KASLR can load the kernel below 16 MiB's link address: the kernel prints a negative
    phys_base (``%ld``), which is the u64 it holds (a Linux guest printed -746586112)."""
    assert kdump._phys_base({"NUMBER(phys_base)": "25165824"}) == 25165824
    neg = kdump._phys_base({"NUMBER(phys_base)": "-746586112"})
    assert neg == (1 << 64) - 746586112
    assert kdump._phys_base({}) == 0
    assert kdump._phys_base({"NUMBER(phys_base)": "0x10"}) == 0
    assert kdump._phys_base({"NUMBER(phys_base)": str(-(1 << 64))}) == 0
    sym = 0xFFFFFFFFB69FB000
    gpa = 0x369FB000 - 746586112
    read = _reader({gpa: UTS})
    assert kdump.utsname(_fields(**{"SYMBOL(init_uts_ns)": f"{sym:x}"}), read, neg)[3] == \
        b"#1 SMP"
