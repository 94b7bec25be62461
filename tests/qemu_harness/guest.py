"""Our own tiny x86 test guest: a 512-byte boot sector emitted as bytes from Python.

No toolchain is needed at test time (CI images may lack binutils); the machine code below is
hand-encoded and annotated with the equivalent AT&T assembly.  ``objdump -D -b binary -mi386
-Maddr16,data16 --start-address=0`` (real-mode part) / ``-mi386`` (from ``pm32``) disassembles it.

Behaviour (loaded by SeaBIOS at 0x7c00):

* real mode: disable interrupts, load a flat GDT, enable A20 through port 0x92, set CR0.PE and
  far-jump into 32-bit code;
* write ``'S'`` (START_MARKER) to COM1 (port 0x3f8) once;
* forever: ``pass += 1``; for every 4 KiB page at physical address ``a`` in
  ``[mem_start, mem_end)``:

  - dword 0 = ``a >> 12`` (page number), dword 1 = ``pass``,
  - dwords ``i`` in ``[2, fill_words)`` = ``(a + 4*i + pass) mod 2**32``,

  then write ``'P'`` (PROGRESS_MARKER) to COM1.

``mem_start``, ``mem_end`` and ``fill_words`` are little-endian dwords at fixed offsets in the image
(PARAMS_OFFSET), so the builder just patches them.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LOAD_ADDR = 0x7C00
PAGE_SIZE = 4096
MIB = 1 << 20

START_MARKER = b"S"
PROGRESS_MARKER = b"P"

DEFAULT_MEM_START = 1 * MIB
DEFAULT_MEM_END = 100 * MIB
DEFAULT_FILL_WORDS = 2
MAX_FILL_WORDS = PAGE_SIZE // 4

# Patchable parameter block, right before the 0x55AA boot signature.
PARAMS_OFFSET = 0x1F0  # mem_start, mem_end, fill_words (LE u32 each)
# SeaBIOS's AHCI driver (q35) cannot read a disk smaller than 1 MiB ("0 MiBytes" -> "could not
# read the boot disk"), so the disk image is the boot sector padded (sparse) to 1 MiB.
DISK_IMAGE_SIZE = 1 * MIB
_PARAMS_FMT = "<III"


class _Asm:
    """Minimal byte emitter with labels and fix-ups (rel8 jumps, abs16/abs32 addresses)."""

    def __init__(self, origin: int) -> None:
        self.origin = origin
        self.buf = bytearray()
        self.labels: dict[str, int] = {}
        self.fixups: list[tuple[int, str, str]] = []  # (buffer position, kind, label)

    def label(self, name: str) -> None:
        self.labels[name] = len(self.buf)

    def emit(self, *parts: bytes | int) -> None:
        for p in parts:
            self.buf += bytes([p]) if isinstance(p, int) else p

    def rel8(self, opcode: int, target: str) -> None:
        self.emit(opcode)
        self.fixups.append((len(self.buf), "rel8", target))
        self.emit(0)

    def abs16(self, target: str) -> None:
        self.fixups.append((len(self.buf), "abs16", target))
        self.emit(b"\0\0")

    def abs32(self, target: str) -> None:
        self.fixups.append((len(self.buf), "abs32", target))
        self.emit(b"\0\0\0\0")

    def org(self, offset: int) -> None:
        if len(self.buf) > offset:
            raise ValueError(f"guest code overflows into 0x{offset:x} (at 0x{len(self.buf):x})")
        self.buf += bytes(offset - len(self.buf))

    def link(self) -> bytes:
        for pos, kind, name in self.fixups:
            target = self.labels[name]
            if kind == "rel8":
                disp = target - (pos + 1)
                if not -128 <= disp <= 127:
                    raise ValueError(f"rel8 jump to {name} out of range ({disp})")
                self.buf[pos] = disp & 0xFF
            elif kind == "abs16":
                self.buf[pos : pos + 2] = struct.pack("<H", self.origin + target)
            else:
                self.buf[pos : pos + 4] = struct.pack("<I", self.origin + target)
        return bytes(self.buf)


def _assemble() -> bytes:
    a = _Asm(LOAD_ADDR)
    # ---- 16-bit real mode ----
    a.emit(0xFA)  # cli
    a.emit(0x31, 0xC0)  # xor %ax,%ax
    a.emit(0x8E, 0xD8)  # mov %ax,%ds
    a.emit(0x8E, 0xD0)  # mov %ax,%ss
    a.emit(0xBC, b"\x00\x7c")  # mov $0x7c00,%sp
    a.emit(0x0F, 0x01, 0x16)  # lgdtw gdt_desc
    a.abs16("gdt_desc")
    a.emit(0xE4, 0x92)  # in $0x92,%al   (fast A20 gate)
    a.emit(0x0C, 0x02)  # or $2,%al      A20 on
    a.emit(0x24, 0xFE)  # and $0xfe,%al  never the fast-reset bit
    a.emit(0xE6, 0x92)  # out %al,$0x92
    a.emit(0x0F, 0x20, 0xC0)  # mov %cr0,%eax
    a.emit(0x0C, 0x01)  # or $1,%al      PE
    a.emit(0x0F, 0x22, 0xC0)  # mov %eax,%cr0
    a.emit(0xEA)  # ljmp $0x08,$pm32
    a.abs16("pm32")
    a.emit(b"\x08\x00")
    # ---- 32-bit protected mode, flat segments ----
    a.label("pm32")
    a.emit(0x66, 0xB8, b"\x10\x00")  # mov $0x10,%ax
    for modrm in (0xD8, 0xC0, 0xD0, 0xE0, 0xE8):  # mov %ax,%ds/%es/%ss/%fs/%gs
        a.emit(0x8E, modrm)
    a.emit(0xBC, struct.pack("<I", LOAD_ADDR))  # mov $0x7c00,%esp
    a.emit(0x66, 0xBA, struct.pack("<H", 0x3F8))  # mov $0x3f8,%dx  (COM1 THR, kept in dx)
    a.emit(0xB0, START_MARKER[0])  # mov $'S',%al
    a.emit(0xEE)  # out %al,(%dx)
    a.emit(0x31, 0xDB)  # xor %ebx,%ebx   pass counter
    a.label("outer")
    a.emit(0x43)  # inc %ebx
    a.emit(0x8B, 0x35)  # mov mem_start,%esi
    a.abs32("mem_start")
    a.label("page_loop")
    a.emit(0x3B, 0x35)  # cmp mem_end,%esi
    a.abs32("mem_end")
    a.rel8(0x73, "pass_done")  # jae pass_done
    a.emit(0x89, 0xF0)  # mov %esi,%eax
    a.emit(0xC1, 0xE8, 0x0C)  # shr $12,%eax
    a.emit(0x89, 0x06)  # mov %eax,(%esi)       dword 0: page number
    a.emit(0x89, 0x5E, 0x04)  # mov %ebx,4(%esi)  dword 1: pass
    a.emit(0x8B, 0x0D)  # mov fill_words,%ecx
    a.abs32("fill_words")
    a.emit(0xBF, struct.pack("<I", 2))  # mov $2,%edi
    a.label("fill_loop")
    a.emit(0x39, 0xCF)  # cmp %ecx,%edi
    a.rel8(0x73, "next_page")  # jae next_page
    a.emit(0x8D, 0x04, 0xBE)  # lea (%esi,%edi,4),%eax
    a.emit(0x01, 0xD8)  # add %ebx,%eax
    a.emit(0x89, 0x04, 0xBE)  # mov %eax,(%esi,%edi,4)
    a.emit(0x47)  # inc %edi
    a.rel8(0xEB, "fill_loop")  # jmp fill_loop
    a.label("next_page")
    a.emit(0x81, 0xC6, struct.pack("<I", PAGE_SIZE))  # add $4096,%esi
    a.rel8(0xEB, "page_loop")  # jmp page_loop
    a.label("pass_done")
    a.emit(0xB0, PROGRESS_MARKER[0])  # mov $'P',%al
    a.emit(0xEE)  # out %al,(%dx)
    a.rel8(0xEB, "outer")  # jmp outer
    # ---- data ----
    a.org((len(a.buf) + 7) & ~7)
    a.label("gdt")
    a.emit(bytes(8))  # null descriptor
    a.emit(bytes.fromhex("ffff0000009acf00"))  # 0x08: code, base 0, limit 4G, 32-bit
    a.emit(bytes.fromhex("ffff00000092cf00"))  # 0x10: data, base 0, limit 4G
    a.label("gdt_desc")
    a.emit(struct.pack("<H", 3 * 8 - 1))
    a.abs32("gdt")
    a.org(PARAMS_OFFSET)
    a.label("mem_start")
    a.emit(bytes(4))
    a.label("mem_end")
    a.emit(bytes(4))
    a.label("fill_words")
    a.emit(bytes(4))
    a.org(0x1FE)
    a.emit(0x55, 0xAA)
    return a.link()


@dataclass(frozen=True)
class GuestParams:
    """What the guest writes: pages in [mem_start, mem_end), ``fill_words`` dwords each."""

    mem_start: int = DEFAULT_MEM_START
    mem_end: int = DEFAULT_MEM_END
    fill_words: int = DEFAULT_FILL_WORDS

    def __post_init__(self) -> None:
        if self.mem_start % PAGE_SIZE or self.mem_end % PAGE_SIZE:
            raise ValueError("mem_start/mem_end must be page aligned")
        # Below 1 MiB live the IVT, BIOS data, our code and the legacy windows.
        if not MIB <= self.mem_start <= self.mem_end < (1 << 32):
            raise ValueError("need 1 MiB <= mem_start <= mem_end < 4 GiB")
        if not 0 <= self.fill_words <= MAX_FILL_WORDS:
            raise ValueError(f"fill_words must be in [0, {MAX_FILL_WORDS}]")

    @property
    def npages(self) -> int:
        return (self.mem_end - self.mem_start) // PAGE_SIZE


def build_bootsector(
    mem_end: int = DEFAULT_MEM_END,
    fill_words: int = DEFAULT_FILL_WORDS,
    mem_start: int = DEFAULT_MEM_START,
) -> bytes:
    """Return the 512-byte boot sector with the given parameters patched in."""
    p = GuestParams(mem_start=mem_start, mem_end=mem_end, fill_words=fill_words)
    img = bytearray(_assemble())
    assert len(img) == 512 and img[510:] == b"\x55\xaa"
    struct.pack_into(_PARAMS_FMT, img, PARAMS_OFFSET, p.mem_start, p.mem_end, p.fill_words)
    return bytes(img)


def write_bootsector(
    directory: Path,
    mem_end: int = DEFAULT_MEM_END,
    fill_words: int = DEFAULT_FILL_WORDS,
    mem_start: int = DEFAULT_MEM_START,
) -> Path:
    """Write the disk image (boot sector + sparse padding to DISK_IMAGE_SIZE) into ``directory``,
    named by content so it is built once per directory, and return its path."""
    data = build_bootsector(mem_end=mem_end, fill_words=fill_words, mem_start=mem_start)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"guest-{hashlib.sha256(data).hexdigest()[:16]}.img"
    if not path.exists() or path.read_bytes()[: len(data)] != data:
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.truncate(DISK_IMAGE_SIZE)
        tmp.replace(path)  # atomic, so parallel sessions never see a half-written image
    return path


def read_params(image: bytes) -> GuestParams:
    """Parameters patched into a boot-sector image."""
    start, end, fill = struct.unpack_from(_PARAMS_FMT, image, PARAMS_OFFSET)
    return GuestParams(mem_start=start, mem_end=end, fill_words=fill)


@dataclass(frozen=True)
class PatternCheck:
    """Result of :func:`check_guest_pattern` on a RAM image."""

    ok: bool
    max_pass: int  # highest pass counter seen
    min_pass: int  # lowest pass counter seen
    boundary_page: int | None  # first page (index in region) with the lower pass, if any
    errors: list[str]


def check_guest_pattern(ram: bytes | memoryview | np.ndarray, params: GuestParams,
                        base: int = 0, max_errors: int = 10) -> PatternCheck:
    """Check that RAM (starting at guest-physical ``base``) holds the guest's pattern.

    Every page of the region must carry its own page number and a pass counter; the counters
    must be ``N`` for a prefix of the region and ``N`` or ``N-1`` after it (the guest was stopped
    somewhere in pass ``N``; a page of pass 0 is still all zero, i.e. never written).
    """
    buf = np.frombuffer(ram, dtype=np.uint8) if not isinstance(ram, np.ndarray) else ram
    lo = params.mem_start - base
    hi = params.mem_end - base
    errors: list[str] = []
    if lo < 0 or hi > buf.size:
        return PatternCheck(False, 0, 0, None, [f"RAM image too small (size {buf.size})"])
    words = buf[lo:hi].view("<u4").reshape(params.npages, PAGE_SIZE // 4)
    pages = np.arange(params.mem_start >> 12, params.mem_end >> 12, dtype=np.uint32)
    passes = words[:, 1].astype(np.int64)
    written = passes > 0
    if params.npages == 0:
        return PatternCheck(True, 0, 0, None, [])
    bad = np.nonzero(written & (words[:, 0] != pages))[0]
    for i in bad[:max_errors]:
        errors.append(f"page 0x{pages[i]:x}: dword0=0x{words[i, 0]:x}, expected the page number")
    # Unwritten pages (pass 0) must be wholly zero.
    unwritten_nonzero = np.nonzero(~written & words.any(axis=1))[0]
    for i in unwritten_nonzero[:max_errors]:
        errors.append(f"page 0x{pages[i]:x}: pass 0 but not zero")
    max_pass = int(passes.max())
    min_pass = int(passes.min())
    boundary: int | None = None
    if max_pass - min_pass > 1:
        errors.append(f"pass counters span {min_pass}..{max_pass} (more than one pass)")
    elif max_pass != min_pass:
        lower = passes == min_pass
        boundary = int(np.argmax(lower))
        if not lower[boundary:].all():
            errors.append("pages of the older pass are not a suffix of the region")
    nfill = max(params.fill_words, 2)
    if nfill > 2:
        idx = np.arange(2, nfill, dtype=np.uint64) * 4
        addr = pages.astype(np.uint64)[:, None] * PAGE_SIZE + idx[None, :]
        expect = ((addr + passes.astype(np.uint64)[:, None]) & 0xFFFFFFFF).astype(np.uint32)
        mism = np.nonzero(written & (words[:, 2:nfill] != expect).any(axis=1))[0]
        # The guest may have been stopped inside the page it was filling: the last page of the
        # newer pass may hold new words up to some index and the previous pass's words after it.
        current = (boundary if boundary is not None else params.npages) - 1
        for i in mism:
            if i == current and _partial_fill_ok(words[i, 2:nfill], expect[i], int(passes[i])):
                continue
            errors.append(f"page 0x{pages[i]:x}: fill words do not match pass {passes[i]}")
            if len(errors) >= max_errors:
                break
    if nfill < PAGE_SIZE // 4:
        tail = np.nonzero(words[:, nfill:].any(axis=1))[0]
        for i in tail[:max_errors]:
            errors.append(f"page 0x{pages[i]:x}: non-zero beyond fill_words")
    return PatternCheck(not errors, max_pass, min_pass, boundary, errors[: max_errors * 4])


def _partial_fill_ok(got: np.ndarray, new: np.ndarray, pass_no: int) -> bool:
    """True when ``got`` is ``new`` up to some index and the previous pass's values after it."""
    old = (new.astype(np.int64) - 1) & 0xFFFFFFFF if pass_no > 1 else np.zeros_like(new)
    k = int(np.argmin(got == new)) if not (got == new).all() else got.size
    return bool((got[k:] == old[k:].astype(np.uint32)).all())
