"""`extract --format elf` writes the core QEMU's dump-guest-memory writes (notes, LOADs).

Ground truth: for the same paused boot-sector guest, QEMU 10's own ``dump-guest-memory``
core (paging off) and a save of it; our core of the save must carry the same notes byte for
byte, the same LOADs with the same contents, and show gdb the same registers.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fixedram.format.migfile import MigrationFile
from fixedram.format.x86cpu import Segment, X86CPUState
from fixedram.memory import elfcore
from fixedram.memory.extract import extract_elf
from qemu_harness import QemuVM, file_uri

pytestmark = pytest.mark.qemu

EM_386, EM_X86_64 = 3, 62
PT_LOAD, PT_NOTE = 1, 4
HF_LMA = 1 << 14


# -- an ELF core reader of our own (not elfcore's code: the writer must not check itself) --

@dataclass
class Note:
    name: bytes
    type: int
    desc: bytes


@dataclass
class Core:
    machine: int
    phdrs: list[tuple[int, int, int, int, int, int, int, int]]  # type flags off va pa fsz msz al
    note_bytes: bytes
    notes: list[Note]

    def loads(self) -> list[tuple[int, int, int, int]]:
        """(p_paddr, p_vaddr, p_filesz, p_memsz) of every PT_LOAD, in file order."""
        return [(p[4], p[3], p[5], p[6]) for p in self.phdrs if p[0] == PT_LOAD]


def read_core(path: Path) -> Core:
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        assert head[:6] == b"\x7fELF\x02\x01", "not an ELF64 little-endian file"
        e_type, machine = struct.unpack_from("<HH", head, 16)
        assert e_type == 4  # ET_CORE
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        phdrs = [struct.unpack_from("<IIQQQQQQ", head, phoff + i * phentsize)
                 for i in range(phnum)]
        note_bytes = b""
        for p in phdrs:
            if p[0] == PT_NOTE:
                f.seek(p[2])
                note_bytes += f.read(p[5])
    notes, pos = [], 0
    while pos + 12 <= len(note_bytes):
        namesz, descsz, ntype = struct.unpack_from("<III", note_bytes, pos)
        pos += 12
        name = note_bytes[pos:pos + namesz].rstrip(b"\0")
        pos += (namesz + 3) & ~3
        notes.append(Note(name, ntype, note_bytes[pos:pos + descsz]))
        pos += (descsz + 3) & ~3
    assert pos == len(note_bytes), "notes do not fill the PT_NOTE exactly"
    return Core(machine, phdrs, note_bytes, notes)


def states_from_qemu_core(core: Core) -> list[X86CPUState]:
    """X86CPUState values read back from QEMU's own notes (its QEMUCPUState and pr_pid)."""
    pids = []
    for n in core.notes:
        if n.name == b"CORE" and n.type == 1:
            pids.append(struct.unpack_from("<I", n.desc, 32 if core.machine == EM_X86_64
                                           else 24)[0])
    out = []
    qnotes = [n for n in core.notes if n.name == b"QEMU"]
    for pid, n in zip(pids, qnotes, strict=True):
        d = n.desc
        version, size = struct.unpack_from("<II", d)
        assert (version, size) == (1, 0x1B8)
        (rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, *r8_15) = struct.unpack_from("<16Q", d, 8)
        rip, rflags = struct.unpack_from("<2Q", d, 136)
        segs = {}
        for i, name in enumerate(("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt")):
            sel, limit, flags, _pad, base = struct.unpack_from("<IIIIQ", d, 152 + 24 * i)
            segs[name] = Segment(sel, base, limit, flags)
        *cr, kgs = struct.unpack_from("<6Q", d, 392)
        out.append(X86CPUState(
            index=pid - 1, regs=(rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, *r8_15), rip=rip,
            rflags=rflags, segs=tuple(segs[s] for s in ("es", "cs", "ss", "ds", "fs", "gs")),
            ldt=segs["ldt"], tr=segs["tr"], gdt=segs["gdt"], idt=segs["idt"], cr=tuple(cr),
            efer=0x500 if core.machine == EM_X86_64 else 0, kernel_gs_base=kgs,
            hflags=HF_LMA if core.machine == EM_X86_64 else 0))
    return out


def gdb_registers(core: Path, names: str) -> dict[str, int]:
    gdb = shutil.which("gdb")
    if gdb is None:
        pytest.fail("gdb is not installed (these tests need it; they never skip)", pytrace=False)
    out = subprocess.run([gdb, "-nx", "-batch", "-ex", f"core-file {core}",
                          "-ex", f"info registers {names}"],
                         capture_output=True, text=True, timeout=120)
    regs = {m[1]: int(m[2], 16) for m in re.finditer(r"^(\w+)\s+(0x[0-9a-f]+)", out.stdout,
                                                     re.M)}
    assert set(names.split()) <= set(regs), f"gdb printed {out.stdout!r} {out.stderr!r}"
    return regs


# -- the same paused VM, dumped by QEMU and saved -------------------------------------------

@dataclass
class Pair:
    machine: str
    save: Path
    qemu_core: Path


@pytest.fixture(scope="module")
def paused(tmp_path_factory: pytest.TempPathFactory, qemu: str,
           guest_image_factory: Callable[..., Path]) -> Callable[[str], Pair]:
    """pc: a stream save; q35: a mapped-ram save (both page layouts are read);
    'q35-smp2': two vCPUs (the second one waits for its start-up IPI)."""
    cache: dict[str, Pair] = {}

    def get(key: str) -> Pair:
        if key not in cache:
            machine, _, smp = key.partition("-smp")
            extra = ["-smp", smp] if smp else []
            d = tmp_path_factory.mktemp(f"elfcore-{key}")
            with QemuVM(d, guest_image_factory(), machine=machine, memory="128M",
                        extra_args=extra) as vm:
                vm.wait_for_progress(2)
                vm.stop()
                qcore = d / "qemu.elf"
                vm.qmp("dump-guest-memory", paging=False, protocol=f"file:{qcore}")
                mapped = machine == "q35"
                vm.set_caps(mapped_ram=mapped)
                vm.migrate(file_uri(d / "vm.sav"))
            cache[key] = Pair(machine, d / "vm.sav", qcore)
        return cache[key]

    return get


MACHINES = ["pc", "q35"]


@pytest.mark.parametrize("machine", MACHINES)
def test_note_writer_matches_qemu_layout(paused: Callable[[str], Pair], machine: str) -> None:
    """Our note writer, fed the register values QEMU wrote, gives QEMU's note bytes."""
    q = read_core(paused(machine).qemu_core)
    # The boot-sector guest runs in 32-bit protected mode: QEMU writes the i386 layout.
    assert q.machine == EM_386
    assert [(n.name, n.type, len(n.desc)) for n in q.notes] == [(b"CORE", 1, 0x90),
                                                                (b"QEMU", 0, 0x1B8)]
    cpus = states_from_qemu_core(q)
    em, notes = elfcore.cpu_notes(cpus)
    assert em == q.machine
    assert notes == q.note_bytes
    # The x86-64 layout of the same values: sizes as measured on a long-mode guest.
    lm = [X86CPUState(**{**c.__dict__, "hflags": HF_LMA}) for c in cpus]
    em64, notes64 = elfcore.cpu_notes(lm)
    assert em64 == EM_X86_64 and len(notes64) == 0x330
    pr = notes64[20:20 + 0x150]
    assert struct.unpack_from("<I", pr, 32)[0] == 1  # pr_pid = vCPU index + 1
    regs = struct.unpack_from("<27Q", pr, 112)
    c = cpus[0]
    assert regs[16] == c.rip and regs[19] == c.gpr("rsp") and regs[10] == c.gpr("rax")
    assert regs[17] == c.seg("cs").selector and regs[18] == c.rflags


@pytest.mark.parametrize("machine", [*MACHINES, "q35-smp2"])
def test_core_matches_qemu_dump(paused: Callable[[str], Pair], machine: str,
                                tmp_path: Path) -> None:
    p = paused(machine)
    ours = tmp_path / "core.elf"
    with MigrationFile(p.save) as mf:
        extract_elf(mf, ours)
    q, o = read_core(p.qemu_core), read_core(ours)
    assert o.machine == q.machine
    ncpu = 2 if machine.endswith("smp2") else 1
    assert [n.name for n in q.notes] == [b"CORE"] * ncpu + [b"QEMU"] * ncpu
    # Notes: the same, byte for byte (the boot-sector guest has no VMCOREINFO).
    assert [(n.name, n.type) for n in o.notes] == [(n.name, n.type) for n in q.notes]
    for a, b in zip(o.notes, q.notes, strict=True):
        assert a.desc == b.desc, f"{a.name!r} note differs"
    assert o.note_bytes == q.note_bytes
    assert o.phdrs[0][0] == PT_NOTE and o.phdrs[0][2] % 4 == 0
    # LOADs: RAM at 0 and the BIOS ending at 4 GiB, addresses and sizes as QEMU's.
    assert o.loads() == q.loads()
    assert q.loads() == [(0, 0, 128 << 20, 128 << 20), (0xFFFC0000, 0xFFFC0000, 0x40000, 0x40000)]
    # ... and the same bytes in each.
    qm = np.memmap(p.qemu_core, dtype=np.uint8, mode="r")
    om = np.memmap(ours, dtype=np.uint8, mode="r")
    oload = [ph for ph in o.phdrs if ph[0] == PT_LOAD]
    for qp, op in zip([ph for ph in q.phdrs if ph[0] == PT_LOAD], oload, strict=True):
        assert op[2] % 4096 == 0  # page-aligned data: sparse, aligned copies
        n = qp[5]
        diff = np.flatnonzero(qm[qp[2]:qp[2] + n] != om[op[2]:op[2] + n])
        assert diff.size == 0, f"LOAD at 0x{qp[4]:x}: first difference at +0x{diff[0]:x}"
    # gdb reads the same registers from both (an i386 core: pc/sp are eip/esp).
    assert gdb_registers(ours, "pc sp eax eflags cs") == gdb_registers(p.qemu_core,
                                                                       "pc sp eax eflags cs")


def _patch_cpu_version(src: Path, dst: Path, version: int, vmdesc: bool = True) -> None:
    """A copy of ``src`` whose ``cpu`` section is of another version_id: in the section
    header and (``vmdesc``) in its vmdesc entry alike, as if a future QEMU had saved it."""
    assert 10 <= version <= 99  # two digits, like 12: the vmdesc keeps its length
    shutil.copyfile(src, dst)
    with MigrationFile(src) as mf:
        sec = next(s for s in mf.sections if s.idstr == "cpu")
    at = sec.offset + 1 + 4 + 1 + len(sec.idstr) + 4  # type, section id, idstr, instance
    size = dst.stat().st_size
    with open(dst, "r+b") as f:
        f.seek(at)
        assert struct.unpack(">I", f.read(4))[0] == sec.version_id
        f.seek(at)
        f.write(struct.pack(">I", version))
        if not vmdesc:
            return
        tail_at = max(0, size - (4 << 20))
        f.seek(tail_at)
        tail = f.read()
        old = b'"vmsd_name": "cpu", "version": %d,' % sec.version_id
        assert tail.count(old) == 1
        f.seek(tail_at + tail.index(old))
        f.write(old.replace(b"%d," % sec.version_id, b"%d," % version))


@pytest.mark.parametrize("vmdesc", [True, False], ids=["new-version", "vmdesc-disagrees"])
def test_unknown_cpu_state_gives_core_without_registers(paused: Callable[[str], Pair],
                                                        tmp_path: Path, vmdesc: bool) -> None:
    """A cpu section x86_cpu_states does not know, or device state that does not decode:
    a core without register notes (never guessed registers) and one warning line."""
    p = paused("q35")
    odd = tmp_path / "odd.sav"
    _patch_cpu_version(p.save, odd, 99, vmdesc)
    out = tmp_path / "core.elf"
    r = subprocess.run([sys.executable, "-m", "fixedram.cli.main", "extract", str(odd), "-o",
                        str(out), "--format", "elf"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fixedram: warning: ")
    assert "no register notes in the ELF core" in lines[0]
    if vmdesc:
        assert "cpu section (vCPU 0, version 99): unknown section version" in lines[0]
    else:
        assert "device state cannot be decoded" in lines[0] and "'cpu'" in lines[0]
    core = read_core(out)
    assert not any(n.name in (b"CORE", b"QEMU") for n in core.notes)
    assert core.loads() == read_core(p.qemu_core).loads()
    gdb = shutil.which("gdb")
    assert gdb is not None
    g = subprocess.run([gdb, "-nx", "-batch", "-ex", f"core-file {out}", "-ex",
                        "info registers pc"], capture_output=True, text=True, timeout=120)
    assert "Couldn't find general-purpose registers in core file" in g.stdout + g.stderr


# -- the VMCOREINFO scan on real saves, with a note planted in the saved guest RAM ----------

def _vmcoreinfo(text: bytes, *, namesz: int = 11, ntype: int = 0) -> bytes:
    name = b"VMCOREINFO\0\0"
    return (struct.pack("<III", namesz, len(text), ntype) + name
            + text + bytes(-len(text) % 4))


TEXT = b"OSRELEASE=6.1.0-test\nPAGESIZE=4096\nSYMBOL(init_uts_ns)=ffffffff82a12340\n"


def _plant(save: Path, dst: Path, gpa_bytes: list[tuple[int, bytes]]) -> None:
    """A copy of ``save`` with guest bytes replaced in present pages (at their file offsets)."""
    shutil.copyfile(save, dst)
    with MigrationFile(save) as mf:
        ram = mf.block("pc.ram")
        offs = ram.data_offsets()
    with open(dst, "r+b") as f:
        for gpa, data in gpa_bytes:
            for k in range(len(data)):  # byte by byte: pages may be apart in a stream
                pg, inpg = divmod(gpa + k, 4096)
                assert offs[pg], f"page 0x{pg:x} is not present"
                f.seek(int(offs[pg]) + inpg)
                f.write(data[k:k + 1])


@pytest.mark.parametrize("machine", MACHINES)
def test_vmcoreinfo_found_in_guest_ram(paused: Callable[[str], Pair], machine: str,
                                       tmp_path: Path) -> None:
    p = paused(machine)
    with MigrationFile(p.save) as mf:
        assert elfcore.find_vmcoreinfo(mf, elfcore.physical_ranges(mf)) is None
    good = _vmcoreinfo(TEXT)
    # Decoys first (lower addresses): wrong type, wrong name size, text not OSRELEASE=,
    # an oversized descsz; then the real note across a page boundary: header at the end of
    # one page, name and text in the next (in a stream, after an 8-byte record header).
    decoys = [(0x200000, _vmcoreinfo(TEXT, ntype=1)), (0x201000, _vmcoreinfo(TEXT, namesz=12)),
              (0x202000, _vmcoreinfo(b"PAGESIZE=4096\n")),
              (0x203000, struct.pack("<III", 11, 1 << 24, 0) + b"VMCOREINFO\0\0OSRELEASE=")]
    at = 0x300000 - 12
    planted = tmp_path / "planted.sav"
    _plant(p.save, planted, [*decoys, (at, good)])
    with MigrationFile(planted) as mf:
        found = elfcore.find_vmcoreinfo(mf, elfcore.physical_ranges(mf))
        assert found == (at, good)
        out = tmp_path / "core.elf"
        extract_elf(mf, out)
    core = read_core(out)
    assert [(n.name, n.type) for n in core.notes] == [(b"CORE", 1), (b"QEMU", 0),
                                                      (b"VMCOREINFO", 0)]
    assert core.notes[-1].desc == TEXT
    assert core.note_bytes.endswith(good)


def test_scan_reads_each_page_once(paused: Callable[[str], Pair],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan reads the present pages once, in few large reads."""
    p = paused("q35")
    calls: list[int] = []
    real = os.preadv

    def counting(fd: int, bufs: list[memoryview], off: int) -> int:
        n = real(fd, bufs, off)
        calls.append(n)
        return n

    with MigrationFile(p.save) as mf:
        ranges = elfcore.physical_ranges(mf)
        present = mf.block("pc.ram").pages_present * 4096
        monkeypatch.setattr(os, "preadv", counting)  # the file source's reads
        assert elfcore.find_vmcoreinfo(mf, ranges) is None
    assert sum(calls) == present
    assert present // len(calls) >= 512 << 10  # reads of 1 MiB runs, not page by page


def test_vmcoreinfo_device_note_equals_qemu_dump(qemu: str, tmp_path: Path,
                                                 guest_image_factory: Callable[..., Path]
                                                 ) -> None:
    """With ``-device vmcoreinfo`` the note is the one the device points at, as in QEMU's dump.

    The boot-sector guest cannot announce a note through fw_cfg, so the saved device state is
    set as a Linux guest leaves it (has_vmcoreinfo, ELF format, size, address of a note we
    plant in saved RAM); QEMU then loads that file and its own dump-guest-memory copies the
    note into its core. A second valid note at a lower address shows the device wins over
    the RAM scan.
    """
    img = guest_image_factory()
    save = tmp_path / "vm.sav"
    dev = ["-device", "vmcoreinfo"]
    with QemuVM(tmp_path, img, machine="q35", memory="128M", name="src", extra_args=dev) as vm:
        vm.wait_for_progress(2)
        vm.stop()
        vm.set_caps(mapped_ram=True)
        vm.migrate(file_uri(save))
    device_note, scan_note = 0x400000, 0x200000
    text2 = TEXT.replace(b"6.1.0-test", b"6.1.0-other")
    planted = tmp_path / "planted.sav"
    _plant(save, planted, [(scan_note, _vmcoreinfo(text2)), (device_note, _vmcoreinfo(TEXT))])
    with MigrationFile(planted) as mf:
        vmci = next(d for d in mf.devices() if d.name == "vmcoreinfo")
        assert vmci.fields["has_vmcoreinfo"] in (False, 0)  # nobody wrote to it
    with open(planted, "r+b") as f:  # has, host_format, guest_format, size, paddr (BE)
        f.seek(vmci.offset + 1 + 2)
        f.write(struct.pack(">HIQ", 1, 0x1000, device_note))
        f.seek(vmci.offset)
        f.write(b"\x01")
    with MigrationFile(planted) as mf:
        core = elfcore.build_core(mf)
        assert core.vmcoreinfo == (device_note, "vmcoreinfo device")
        assert elfcore.find_vmcoreinfo(mf, elfcore.physical_ranges(mf))[0] == scan_note
        ours = tmp_path / "ours.elf"
        extract_elf(mf, ours)
    qcore = tmp_path / "qemu.elf"
    with QemuVM(tmp_path, img, machine="q35", memory="128M", name="dst", incoming=True,
                paused=True, extra_args=dev) as vm:
        vm.set_caps(mapped_ram=True)
        vm.migrate_incoming(file_uri(planted))
        vm.qmp("dump-guest-memory", paging=False, protocol=f"file:{qcore}")
    q, o = read_core(qcore), read_core(ours)
    assert [(n.name, n.type) for n in q.notes] == [(b"CORE", 1), (b"QEMU", 0),
                                                   (b"VMCOREINFO", 0)]
    assert q.notes[-1].desc == TEXT
    assert o.note_bytes == q.note_bytes
    assert o.loads() == q.loads()
