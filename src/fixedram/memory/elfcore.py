"""ELF cores for debuggers: the notes and LOADs of QEMU's ``dump-guest-memory``.

RAM alone is not a core a debugger can use. gdb needs an ``NT_PRSTATUS``
note per vCPU for the registers; crash reads QEMU's own CPU-state note; drgn
needs the Linux kernel's ``VMCOREINFO`` note to know that the core is a
kernel's and where the kernel's symbols and page tables are.

What QEMU 10's ``dump-guest-memory`` (paging off, ELF) writes for x86, and
what :func:`build_core` lays out the same way (facts from QEMU's
``dump/dump.c`` and ``target/i386/arch_dump.c``, checked field by field
against real dumps in ``tests/test_elf_core.py``):

* one PT_NOTE, then one PT_LOAD per guest-physical block in address order,
  ``p_vaddr == p_paddr``: RAM, and the BIOS ROM ending at 4 GiB;
* the notes: every vCPU's ``NT_PRSTATUS`` ("CORE", type 1, ``pr_pid`` =
  vCPU index + 1), then every vCPU's "QEMU" note (type 0, QEMUCPUState
  version 1, 440 bytes), then the guest's VMCOREINFO note; each is a 12-byte
  header, the name padded to 4 bytes, the descriptor padded to 4 bytes;
* when the first vCPU is in long mode (``HF_LMA`` in its hflags) the
  kernel's x86-64 ``elf_prstatus`` (336 bytes) and ``EM_X86_64``, else the
  i386 one (144 bytes) and ``EM_386``, in an ELF64 file either way (the BIOS
  ends above 32-bit addresses).

Deliberate differences: segment data start on a page boundary (QEMU puts
them right after the notes) so the copy stays page-aligned and sparse; no
section headers (QEMU 10 writes an empty ``.shstrtab``); ``e_ehsize`` is 64
(QEMU 10 writes 8); LOADs say RWX and 4 KiB alignment (QEMU: 0 and 0); and a
VMCOREINFO note also when the VM had no ``vmcoreinfo`` device, found in
guest RAM (QEMU's dump then has none, and drgn refuses it).

Registers are never guessed: when the vCPU state cannot be decoded (an
unknown CPU-state version, a machine that is not x86 pc/q35, no vmdesc) the
core has no register notes and :attr:`ElfCore.warnings` says why.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

import numpy as np

from ..errors import FixedramError, OutputError, TruncatedFile, UnsupportedFeature
from ..format.walker import BlockFacts
from ..format.x86cpu import X86CPUState
from .layout import PhysRange, physical_ranges, x86_below_4g, x86_firmware_ranges

if TYPE_CHECKING:
    from ..format.devstate import DeviceState
    from ..format.migfile import MigrationFile, RAMBlock
    from ..format.walker import Save
    from ..io.source import ByteSource

B = TypeVar("B", bound=BlockFacts)

__all__ = ["ONE_PASS_NOTE_ROOM", "ElfCore", "GuestRead", "RegisterNotes", "build_core",
           "cpu_notes", "device_vmcoreinfo", "find_vmcoreinfo", "note", "pages_with_name",
           "prstatus_i386", "prstatus_x86_64", "qemu_cpu_state", "register_notes",
           "vmcoreinfo_in_pages", "vmcoreinfo_note_at"]

log = logging.getLogger(__name__)

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
NHDR = struct.Struct("<III")
ET_CORE = 4
PT_NULL = 0
EM_386 = 3
EM_X86_64 = 62
PT_LOAD = 1
PT_NOTE = 4
PN_XNUM = 0xFFFF
PF_RWX = 0x7
NT_PRSTATUS = 1
DATA_ALIGN = 4096

# QEMU's hflags bit for "long mode active" (HF_LMA_SHIFT 14 in target/i386/cpu.h).
HF_LMA_MASK = 1 << 14

# The kernel's x86-64 elf_prstatus: pr_pid at 32, pr_reg (user_regs_struct,
# 27 longs) at 112, 336 bytes.
_PRSTATUS_X86_64 = struct.Struct("<32xI76x27Q8x")
# i386 elf_prstatus: pr_pid at 24, pr_reg at 72 (7 longs, 4 selectors with
# their padding halves, orig_eax, eip, cs, eflags, esp, ss), 144 bytes.
_PRSTATUS_I386 = struct.Struct("<24xI44x7I8H2I2H2I2H4x")
# QEMUCPUState version 1: version, size, 16 GPRs, rip, rflags; cs ds es fs gs
# ss ldt tr gdt idt as (selector, limit, flags, pad, base); cr[5]; kernel_gs_base.
_QEMU_SEG = struct.Struct("<IIIIQ")
_QEMU_HEAD = struct.Struct("<II18Q")
QEMU_CPUSTATE_VERSION = 1
QEMU_CPUSTATE_SIZE = _QEMU_HEAD.size + 10 * _QEMU_SEG.size + 6 * 8  # 440

# The Linux kernel's VMCOREINFO note (kernel/vmcore_info.c): name
# "VMCOREINFO", type 0, text starting with OSRELEASE=.
VMCOREINFO_NAME = b"VMCOREINFO"
_VMCOREINFO_HEAD = NHDR.size + 12  # header + "VMCOREINFO\0" padded to 4
_OSRELEASE = b"OSRELEASE="
# QEMU's bound for a guest note (MAX_GUEST_NOTE_SIZE), used for the note the
# vmcoreinfo device points at.
MAX_GUEST_NOTE = 1 << 20
# Bound for a note found by scanning RAM: the kernel's text is at most one page
# (VMCOREINFO_BYTES = PAGE_SIZE); 64 KiB allows for 64 KiB pages. A core whose
# RAM is still being scanned keeps this much room for the note (a hole in the
# file when it is shorter or absent), so RAM can be copied during the scan.
MAX_SCANNED_NOTE = 64 << 10
# Room a one-pass core keeps for its notes before the first LOAD's data, which
# is written as it arrives, before the vCPU count (device state, after RAM) and
# the VMCOREINFO note are known. Real sizes: 816 bytes of notes per x86-64 vCPU
# (a 356-byte NT_PRSTATUS and a 460-byte QEMU note; i386's are smaller), and
# QEMU 10's q35 takes at most 4096 vCPUs (pc: 255): 3.2 MiB; a Linux
# VMCOREINFO note is one page of text (4 KiB), the vmcoreinfo device's at most
# MAX_GUEST_NOTE and a scanned one MAX_SCANNED_NOTE. So 4096 vCPUs and the
# largest note: 4.2 MiB, a hole in a sparse file. A core needing more is refused.
MAX_X86_VCPUS = 4096
# The vmcoreinfo device's guest_format for an ELF note (FW_CFG_VMCOREINFO_FORMAT_ELF).
FW_CFG_VMCOREINFO_FORMAT_ELF = 1
_TEXT = bytes(range(0x20, 0x7F)) + b"\n\t"
# Pages read per system call while scanning for the note: 1 MiB, so the buffer
# stays in the CPU cache between the read and the compare (measured 1.5x faster
# than 16 MiB reads).
SCAN_PAGES = 256
_VMCO = int.from_bytes(VMCOREINFO_NAME[:4], "little")

_U32 = 0xFFFFFFFF
_U16 = 0xFFFF


def _pad4(n: int) -> int:
    return (n + 3) & ~3


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    """One ELF note: header, NUL-terminated name and descriptor, each padded to 4."""
    n = name + b"\0"
    return (NHDR.pack(len(n), len(desc), ntype) + n.ljust(_pad4(len(n)), b"\0")
            + desc.ljust(_pad4(len(desc)), b"\0"))


ONE_PASS_NOTE_ROOM = (MAX_X86_VCPUS * (len(note(b"CORE", NT_PRSTATUS, bytes(_PRSTATUS_X86_64.size)))
                                      + len(note(b"QEMU", 0, bytes(QEMU_CPUSTATE_SIZE))))
                      + MAX_GUEST_NOTE)


# -- vCPU notes -------------------------------------------------------------

def prstatus_x86_64(cpu: X86CPUState) -> bytes:
    """The x86-64 ``elf_prstatus`` descriptor, registers as QEMU fills them."""
    g = cpu.gpr
    regs = (g("r15"), g("r14"), g("r13"), g("r12"), g("rbp"), g("rbx"), g("r11"), g("r10"),
            g("r9"), g("r8"), g("rax"), g("rcx"), g("rdx"), g("rsi"), g("rdi"),
            0,  # orig_rax: QEMU has no such state and writes 0
            cpu.rip, cpu.seg("cs").selector, cpu.rflags, g("rsp"), cpu.seg("ss").selector,
            cpu.seg("fs").base, cpu.seg("gs").base, cpu.seg("ds").selector,
            cpu.seg("es").selector, cpu.seg("fs").selector, cpu.seg("gs").selector)
    return _PRSTATUS_X86_64.pack(cpu.index + 1, *regs)


def prstatus_i386(cpu: X86CPUState) -> bytes:
    """The i386 ``elf_prstatus`` descriptor: registers cut to 32 bits, selectors to 16."""
    g = cpu.gpr

    def sel(name: str) -> int:
        return cpu.seg(name).selector & _U16

    return _PRSTATUS_I386.pack(
        cpu.index + 1,
        *(g(r) & _U32 for r in ("rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rax")),
        sel("ds"), 0, sel("es"), 0, sel("fs"), 0, sel("gs"), 0,
        0, cpu.rip & _U32,  # orig_eax, eip
        sel("cs"), 0,
        cpu.rflags & _U32, g("rsp") & _U32,
        sel("ss"), 0)


def qemu_cpu_state(cpu: X86CPUState) -> bytes:
    """QEMU's CPU-state note descriptor (QEMUCPUState version 1, 440 bytes)."""
    g = cpu.gpr
    head = _QEMU_HEAD.pack(
        QEMU_CPUSTATE_VERSION, QEMU_CPUSTATE_SIZE,
        *(g(r) for r in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
                         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")),
        cpu.rip, cpu.rflags)
    segs = [cpu.seg(n) for n in ("cs", "ds", "es", "fs", "gs", "ss")]
    segs += [cpu.ldt, cpu.tr, cpu.gdt, cpu.idt]
    body = b"".join(_QEMU_SEG.pack(s.selector & _U32, s.limit & _U32, s.flags & _U32, 0, s.base)
                    for s in segs)
    return head + body + struct.pack("<6Q", *cpu.cr, cpu.kernel_gs_base)


def cpu_notes(cpus: Sequence[X86CPUState]) -> tuple[int, bytes]:
    """``(e_machine, notes)``: every NT_PRSTATUS, then every QEMU note, in vCPU order.

    The first vCPU decides between the x86-64 and the i386 layout, as in QEMU.
    """
    cpus = sorted(cpus, key=lambda c: c.index)
    if not cpus:
        return EM_X86_64, b""
    long_mode = bool(cpus[0].hflags & HF_LMA_MASK)
    pr = prstatus_x86_64 if long_mode else prstatus_i386
    out = [note(b"CORE", NT_PRSTATUS, pr(c)) for c in cpus]
    out += [note(b"QEMU", 0, qemu_cpu_state(c)) for c in cpus]
    return (EM_X86_64 if long_mode else EM_386), b"".join(out)


# -- the guest's VMCOREINFO note ----------------------------------------------

GuestRead = Callable[[int, int], "bytes | None"]


def _guest_reader(ranges: Sequence[PhysRange[RAMBlock]]) -> GuestRead:
    """read(gpa, n): guest bytes when [gpa, gpa+n) lies in one range, else None."""
    def read(gpa: int, n: int) -> bytes | None:
        for r in ranges:
            if r.gpa <= gpa and gpa + n <= r.gpa + r.length:
                return r.block.read(r.block_offset + gpa - r.gpa, n)
        return None
    return read


def vmcoreinfo_note_at(read: GuestRead, gpa: int, limit: int = MAX_GUEST_NOTE) -> bytes | None:
    """The Linux VMCOREINFO note whose header is at ``gpa``, as its bytes, or None.

    Valid means: name ``VMCOREINFO``, type 0, a descriptor of at most
    ``limit`` bytes (with header and name) that is text starting with
    ``OSRELEASE=``. The bytes are the note as it sits in guest memory, padding
    included, which is what QEMU copies into its dump.
    """
    if gpa < 0 or gpa % 4:
        return None
    head = read(gpa, _VMCOREINFO_HEAD)
    if head is None:
        return None
    namesz, descsz, ntype = NHDR.unpack_from(head)
    if (namesz != len(VMCOREINFO_NAME) + 1 or ntype != 0
            or head[NHDR.size:NHDR.size + namesz] != VMCOREINFO_NAME + b"\0"
            or not len(_OSRELEASE) <= descsz <= limit - _VMCOREINFO_HEAD
            or _VMCOREINFO_HEAD + _pad4(descsz) > limit):
        return None
    body = read(gpa + _VMCOREINFO_HEAD, _pad4(descsz))
    if body is None:
        return None
    desc = body[:descsz]
    if not desc.startswith(_OSRELEASE) or desc.translate(None, _TEXT):
        return None
    return head + body


def _pread_full(src: ByteSource, buf: memoryview, offset: int, path: str) -> None:
    got = 0
    while got < len(buf):
        k = src.preadv([buf[got:]], offset + got)
        if k == 0:
            raise TruncatedFile("page data ends early", path=path, offset=offset + got)
        got += k


def _name_candidates(mf: MigrationFile, pr: PhysRange[RAMBlock],
                     cancel: Callable[[], bool] | None = None) -> Iterator[int]:
    """Guest addresses of 4-byte-aligned ``VMCO`` words in the range's present pages.

    Each run of present pages is read with one system call into a reused
    buffer and compared as 32-bit words by numpy; stream page records (data
    every page size + 8 bytes) are compared in place through a strided view.
    """
    block = pr.block
    ps = block.page_size
    if ps % 4 or pr.block_offset % ps or pr.length % ps:
        return
    wpp = ps // 4
    lo, hi = pr.block_offset // ps, (pr.block_offset + pr.length) // ps
    buf = np.empty(SCAN_PAGES * (ps + 8) // 4, dtype=np.uint32)
    raw = buf.data.cast("B")
    mask = np.empty((SCAN_PAGES, wpp), dtype=bool)
    for run in block.runs(SCAN_PAGES):
        r = run.clip(lo, hi)
        if r is None:
            continue
        if cancel is not None and cancel():
            return
        st = r.stride
        if st % 4 or st < ps or r.count * st > len(raw):
            raise UnsupportedFeature(f"page run of stride {st} in RAMBlock {block.idstr!r}")
        _pread_full(mf.source, raw[:(r.count - 1) * st + ps], r.file_offset, mf.path)
        # Words past the last page's data are stale but sliced off by [:, :wpp].
        rows = buf[:r.count * st // 4].reshape(r.count, st // 4)[:, :wpp]
        m = mask[:r.count]
        np.equal(rows, _VMCO, out=m)
        if not m.any():
            continue
        for i in np.flatnonzero(m).tolist():
            page, word = divmod(i, wpp)
            yield pr.gpa + (r.first + page) * ps - pr.block_offset + 4 * word


def find_vmcoreinfo(mf: MigrationFile, ranges: Sequence[PhysRange[RAMBlock]],
                    cancel: Callable[[], bool] | None = None) -> tuple[int, bytes] | None:
    """The first valid Linux VMCOREINFO note in guest RAM: ``(gpa of its header, bytes)``.

    Every present page is read once, in address order; the scan stops at the
    first valid note (of at most :data:`MAX_SCANNED_NOTE` bytes), or gives up
    when ``cancel()`` turns true. Notes are 4-byte aligned (the ELF note
    format), so the name is looked for as whole 32-bit words.
    """
    read = _guest_reader(ranges)
    for pr in sorted(ranges, key=lambda r: r.gpa):
        for name_gpa in _name_candidates(mf, pr, cancel):
            n = vmcoreinfo_note_at(read, name_gpa - NHDR.size, MAX_SCANNED_NOTE)
            if n is not None:
                return name_gpa - NHDR.size, n
    return None


def pages_with_name(rows: np.ndarray) -> np.ndarray:
    """Which of ``rows`` (an (n, page_size) uint8 array, C-contiguous) hold a
    4-byte-aligned ``VMCO`` word: the pages a note could be named in."""
    if rows.shape[1] % 4:
        return np.zeros(rows.shape[0], dtype=bool)
    return np.asarray(np.equal(rows.view(np.uint32), _VMCO).any(axis=1))


def vmcoreinfo_in_pages(read: GuestRead, ranges: Sequence[PhysRange[B]],
                        pages: np.ndarray) -> tuple[int, bytes] | None:
    """As :func:`find_vmcoreinfo`, over the final contents ``read`` gives, looking
    only at ``pages`` (ascending page numbers of the ranges' block that held a
    ``VMCO`` word in some copy sent): the first valid note in address order.

    A one-pass save marks those pages as they arrive (:func:`pages_with_name`);
    a page sent again without the word is read here as it ended, so the note
    found is the one a scan of the finished file finds.
    """
    for pr in sorted(ranges, key=lambda r: r.gpa):
        ps = pr.block.page_size
        lo, hi = pr.block_offset // ps, (pr.block_offset + pr.length) // ps
        inside = pages[(pages >= lo) & (pages < hi)]
        for p in inside.tolist():
            at = pr.gpa + (p - lo) * ps
            data = read(at, ps)
            if data is None or ps % 4:
                continue
            for w in np.flatnonzero(np.frombuffer(data, dtype=np.uint32) == _VMCO).tolist():
                n = vmcoreinfo_note_at(read, at + 4 * w - NHDR.size, MAX_SCANNED_NOTE)
                if n is not None:
                    return at + 4 * w - NHDR.size, n
    return None


def device_vmcoreinfo(devices: Sequence[DeviceState], read: GuestRead) -> tuple[int, bytes] | None:
    """The note the guest announced to QEMU's ``vmcoreinfo`` device, if valid."""
    for d in devices:
        if d.name != "vmcoreinfo":
            continue
        f = d.fields
        size, paddr = f.get("vmcoreinfo.size"), f.get("vmcoreinfo.paddr")
        if (not f.get("has_vmcoreinfo")
                or f.get("vmcoreinfo.guest_format") != FW_CFG_VMCOREINFO_FORMAT_ELF
                or not isinstance(size, int) or not isinstance(paddr, int)
                or not NHDR.size <= size <= MAX_GUEST_NOTE):
            return None
        n = vmcoreinfo_note_at(read, paddr, limit=size)
        return None if n is None else (paddr, n)
    return None


# -- the core -------------------------------------------------------------------

@dataclass
class ElfCore(Generic[B]):
    """What :func:`build_core` found, and its layout.

    :ivar loads: one PT_LOAD each, in address order.
    :ivar ram: the RAM ranges (where the VMCOREINFO note is looked for).
    :ivar cpus: the vCPU states the register notes come from (empty: none).
    :ivar vmcoreinfo: ``(gpa, source)`` of the VMCOREINFO note, source being
        ``"vmcoreinfo device"`` or ``"guest RAM"``; None when there is none.
    :ivar scan_pending: RAM is still to be scanned (:meth:`scan_ram`); the
        layout keeps room for the note meanwhile.
    :ivar warnings: one line each, e.g. why the core has no register notes.
    :ivar reserved: room kept for the notes before the data, fixed before
        the notes are known (a one-pass core writes its data first); 0: as
        the notes (and a pending scan) need.
    """

    machine: int
    notes: bytes
    loads: list[PhysRange[B]]
    ram: list[PhysRange[B]]
    cpus: list[X86CPUState] = field(default_factory=list)
    vmcoreinfo: tuple[int, str] | None = None
    scan_pending: bool = False
    warnings: list[str] = field(default_factory=list)
    reserved: int = 0
    _room: int = 0

    def __post_init__(self) -> None:
        # Fixed now, so the data offsets hold whatever a later scan adds.
        extra = _VMCOREINFO_HEAD + MAX_SCANNED_NOTE if self.scan_pending else 0
        self._room = self.reserved or len(self.notes) + extra

    @property
    def _nph(self) -> int:
        return len(self.loads) + (1 if self._room else 0)

    @property
    def data_start(self) -> int:
        end = EHDR.size + self._nph * PHDR.size + self._room
        return (end + DATA_ALIGN - 1) // DATA_ALIGN * DATA_ALIGN

    def placed(self) -> list[tuple[PhysRange[B], int]]:
        """Each LOAD's range with the (page-aligned) file offset of its data."""
        out, off = [], self.data_start
        for r in self.loads:
            out.append((r, off))
            off += r.length
        return out

    @property
    def size(self) -> int:
        return self.data_start + sum(r.length for r in self.loads)

    def scan_ram(self: ElfCore[RAMBlock], mf: MigrationFile,
                 cancel: Callable[[], bool] | None = None) -> None:
        """Look for the VMCOREINFO note in RAM (see :func:`find_vmcoreinfo`)."""
        if not self.scan_pending:
            return
        found = find_vmcoreinfo(mf, self.ram, cancel)
        if cancel is not None and cancel():
            return
        self.scan_pending = False
        if found is not None:
            self.notes += found[1]
            self.vmcoreinfo = (found[0], "guest RAM")

    def head(self) -> bytes:
        """ELF header, program headers (PT_NOTE first) and notes, written at offset 0.

        :raise OutputError: the notes outgrew the room reserved for them.
        """
        if self.scan_pending:
            raise RuntimeError("the RAM scan for VMCOREINFO has not finished")
        nph = self._nph
        if nph >= PN_XNUM:
            raise OutputError(f"{len(self.loads)} memory ranges are too many for an ELF core")
        if len(self.notes) > self._room:
            raise OutputError(f"the ELF core's notes ({len(self.notes)} bytes: "
                              f"{len(self.cpus)} vCPUs and the VMCOREINFO note) exceed the "
                              f"{self._room} bytes kept for them before the data")
        note_off = EHDR.size + nph * PHDR.size
        ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # ELF64, LSB, version 1, SysV
        head = [EHDR.pack(ident, ET_CORE, self.machine, 1, 0, EHDR.size, 0, 0, EHDR.size,
                          PHDR.size, nph, 0, 0, 0)]
        if self._room:
            # A scan that found nothing leaves the slot kept for PT_NOTE unused: PT_NULL.
            kind = PT_NOTE if self.notes else PT_NULL
            head.append(PHDR.pack(kind, 0, note_off if self.notes else 0, 0, 0, len(self.notes),
                                  len(self.notes), 0))
        for r, off in self.placed():
            head.append(PHDR.pack(PT_LOAD, PF_RWX, off, r.gpa, r.gpa, r.length, r.length,
                                  DATA_ALIGN))
        head.append(self.notes)
        return b"".join(head)


def _reason(e: FixedramError, path: str) -> str:
    """The error's text without the file name the warning already starts with."""
    text, prefix = str(e), f"{path}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def _is_x86_pc(machine: str) -> bool:
    try:
        x86_below_4g(machine, 0)
    except UnsupportedFeature:
        return False
    return True


def _vcpus(mf: Save, devices: Sequence[DeviceState] | None,
           why: str | None) -> tuple[list[X86CPUState], str | None]:
    """The vCPU states, or no states and the reason."""
    if not _is_x86_pc(mf.machine or ""):
        return [], f"machine type {mf.machine!r} is not x86 pc or q35"
    if devices is None:
        return [], why
    from ..format.x86cpu import x86_cpu_states

    try:
        cpus = x86_cpu_states(list(devices))
    except FixedramError as e:
        return [], _reason(e, mf.path)
    if not cpus:
        return [], "the file has no x86 cpu sections"
    return list(cpus), None


@dataclass
class RegisterNotes:
    """The register notes of a save and what they came from.

    :ivar devices: the decoded device sections (None: they cannot be decoded).
    :ivar warnings: why there are no register notes, when there are none.
    """

    machine: int
    notes: bytes
    cpus: list[X86CPUState]
    devices: list[DeviceState] | None
    warnings: list[str]


def register_notes(f: Save) -> RegisterNotes:
    """Every vCPU's NT_PRSTATUS and QEMU note, from the save's device state."""
    devices: list[DeviceState] | None
    why: str | None = None
    try:
        devices = f.devices()
    except FixedramError as e:
        devices, why = None, f"device state cannot be decoded: {_reason(e, f.path)}"
    cpus, why = _vcpus(f, devices, why)
    machine, notes = cpu_notes(cpus)
    warnings = [] if cpus else [f"no register notes in the ELF core: {why}"]
    return RegisterNotes(machine, notes, cpus, devices, warnings)


def build_core(mf: MigrationFile, *, scan_ram: bool = True) -> ElfCore[RAMBlock]:
    """The ELF core of a migration file: LOADs, register notes and VMCOREINFO.

    The VMCOREINFO note is the one the ``vmcoreinfo`` device points at, else
    the first found in RAM. With ``scan_ram=False`` that scan is left to
    :meth:`ElfCore.scan_ram` (``scan_pending``), e.g. to run while RAM is copied.
    """
    ram = physical_ranges(mf)
    loads = sorted(ram + x86_firmware_ranges(mf), key=lambda r: r.gpa)
    regs = register_notes(mf)
    notes = regs.notes
    found = device_vmcoreinfo(regs.devices or [], _guest_reader(ram))
    source = "vmcoreinfo device"
    if found is None and scan_ram:
        found, source = find_vmcoreinfo(mf, ram), "guest RAM"
    vmci = None
    if found is not None:
        notes += found[1]
        vmci = (found[0], source)
    return ElfCore(regs.machine, notes, loads, ram, regs.cpus, vmci,
                   scan_pending=found is None and not scan_ram, warnings=regs.warnings)
