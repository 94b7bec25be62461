"""Our ELF core of a real Linux guest opens in gdb and drgn; QEMU's own dump does not in drgn.

QEMU's dump-guest-memory of the paused VM (``linux_saves.qemu_dump``, no ``-device
vmcoreinfo``) has register notes but no VMCOREINFO note, so drgn refuses it. The kernel keeps
that note in guest RAM anyway; `extract --format elf` finds it there and adds it, which is what
makes our core a Linux kernel core for drgn (and crash).
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import drgn
import pytest

from qemu_harness import LinuxArtifacts
from test_elf_core import EM_X86_64, gdb_registers, read_core
from util import elf_segments

pytestmark = pytest.mark.qemu

PAUSED = ["paused_stream", "paused_mapped"]
ALL = [*PAUSED, "live_stream", "live_mapped"]
UTS_LEN = 65  # struct new_utsname: six char[__NEW_UTS_LEN + 1]: sysname, nodename, release, ...


@pytest.fixture(scope="module")
def cores(linux_saves: LinuxArtifacts, tmp_path_factory: pytest.TempPathFactory
          ) -> Callable[[str], Path]:
    """cores('paused_stream') -> `fixedram extract --format elf` of that save, made once."""
    out = tmp_path_factory.mktemp("linux-elf")
    cache: dict[str, Path] = {}

    def get(key: str) -> Path:
        if key not in cache:
            core = out / f"{key}.elf"
            r = subprocess.run([sys.executable, "-m", "fixedram.cli.main", "extract",
                                str(getattr(linux_saves, key)), "-o", str(core), "--format",
                                "elf"], capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, r.stderr
            assert r.stderr == ""  # registers decoded: no warning
            cache[key] = core
        return cache[key]

    return get


def _vmcoreinfo(core: Path) -> dict[str, str]:
    notes = [n for n in read_core(core).notes if n.name == b"VMCOREINFO"]
    assert len(notes) == 1 and notes[0].type == 0
    return dict(line.split("=", 1) for line in notes[0].desc.decode().splitlines())


@pytest.mark.parametrize("key", PAUSED)
def test_paused_core_matches_qemu_dump(linux_saves: LinuxArtifacts,
                                       cores: Callable[[str], Path], key: str) -> None:
    q, o = read_core(linux_saves.qemu_dump), read_core(cores(key))
    # A long-mode guest: x86-64 prstatus (0x150) and QEMU's CPU state (0x1b8), 0x330 bytes.
    assert q.machine == o.machine == EM_X86_64
    assert [(n.name, n.type, len(n.desc)) for n in q.notes] == [(b"CORE", 1, 0x150),
                                                                (b"QEMU", 0, 0x1B8)]
    assert len(q.note_bytes) == 0x330
    # Ours: the same register notes byte for byte, then the kernel's VMCOREINFO.
    for a, b in zip(o.notes, q.notes, strict=False):
        assert (a.name, a.type, a.desc) == (b.name, b.type, b.desc)
    assert o.note_bytes[:0x330] == q.note_bytes
    assert [n.name for n in o.notes] == [b"CORE", b"QEMU", b"VMCOREINFO"]
    assert _vmcoreinfo(cores(key))["OSRELEASE"] == linux_saves.kernel_release
    assert o.loads() == q.loads()
    # gdb: the same rip and rsp from both cores, and the ones HMP showed for the paused VM.
    ours = gdb_registers(cores(key), "rip rsp")
    assert ours == gdb_registers(linux_saves.qemu_dump, "rip rsp")
    hmp = {k.lower(): int(v, 16) for k, v in
           re.findall(r"\b(RIP|RSP)=([0-9a-f]{16})", linux_saves.info_registers)}
    assert ours == hmp


def _release_through_page_tables(prog: drgn.Program, info: dict[str, str]) -> str:
    """The kernel release in init_uts_ns, read at its kernel virtual address.

    ``OFFSET(uts_namespace.name)`` comes from VMCOREINFO (0 since Linux 4.x moved ``name``
    first; older kernels had a 4-byte kref before it and no such line): without it, the name
    is taken where "Linux" starts in the first 16 bytes.
    """
    base = int(info["SYMBOL(init_uts_ns)"], 16)
    if "OFFSET(uts_namespace.name)" in info:
        name = base + int(info["OFFSET(uts_namespace.name)"])
    else:
        head = prog.read(base, 16 + UTS_LEN)
        name = base + head.index(b"Linux\0")
    uts = prog.read(name, 3 * UTS_LEN)
    assert uts[:UTS_LEN].split(b"\0")[0] == b"Linux"
    return uts[2 * UTS_LEN:3 * UTS_LEN].split(b"\0")[0].decode()


@pytest.mark.parametrize("key", ALL)
def test_drgn_opens_our_core_as_linux_kernel(linux_saves: LinuxArtifacts,
                                             cores: Callable[[str], Path], key: str) -> None:
    prog = drgn.Program()
    prog.set_core_dump(str(cores(key)))
    assert prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL
    assert prog.platform is not None and prog.platform.arch == drgn.Architecture.X86_64
    info = _vmcoreinfo(cores(key))
    assert _release_through_page_tables(prog, info) == linux_saves.kernel_release


def test_drgn_refuses_qemu_own_dump(linux_saves: LinuxArtifacts) -> None:
    """Why our core is needed: QEMU's dump of a VM without -device vmcoreinfo has no
    VMCOREINFO note, and drgn will not open it as a kernel core."""
    assert not any(n.name == b"VMCOREINFO" for n in read_core(linux_saves.qemu_dump).notes)
    prog = drgn.Program()
    with pytest.raises(ValueError, match="vmcoreinfo"):
        prog.set_core_dump(str(linux_saves.qemu_dump))


def _libvirt_gzip(src: Path, dst: Path) -> None:
    """``src`` as ``virsh save`` writes it with save_image_format = "gzip"."""
    from fixedram.format.libvirt import LibvirtHeader

    hdr = LibvirtHeader.new(b"<domain type='kvm'><name>linux</name></domain>\n", format="gzip")
    with open(dst, "wb") as f:
        f.write(hdr.encode())
        f.flush()
        subprocess.run(["gzip", "-c", "-1", str(src)], stdout=f, check=True, timeout=600)


def _piped(cmd: list[str], src: Path) -> subprocess.CompletedProcess[str]:
    """``cat src | cmd``: a real pipe (a redirected file would be read at offsets)."""
    with open(src, "rb") as f:
        cat = subprocess.Popen(["cat"], stdin=f, stdout=subprocess.PIPE)
        assert cat.stdout is not None
        r = subprocess.run(cmd, stdin=cat.stdout, capture_output=True, text=True, timeout=600)
        cat.stdout.close()
        cat.wait()
    return r


def _segments(core: Path) -> list[tuple[int, int, str]]:
    """(p_paddr, p_filesz, sha256 of the data) of every PT_LOAD."""
    out = []
    with open(core, "rb") as f:
        for off, pa, size in elf_segments(core):
            h = hashlib.sha256()
            f.seek(off)
            left = size
            while left:
                b = f.read(min(left, 1 << 20))
                assert b, "segment data past the end of the file"
                h.update(b)
                left -= len(b)
            out.append((pa, size, h.hexdigest()))
    return out


@pytest.mark.parametrize("how", ["pipe", "gzip image"])
@pytest.mark.parametrize("key", ["paused_stream", "live_stream"])
def test_one_pass_core_equals_file_core(linux_saves: LinuxArtifacts,
                                        cores: Callable[[str], Path], tmp_path: Path,
                                        key: str, how: str) -> None:
    """`extract - --format elf` of a pipe, and of a gzip-compressed libvirt image, is the
    core `extract FILE --format elf` makes: note for note and page for page (the data sit
    further into the file, after the room kept for the notes); gdb and drgn read it."""
    src: Path = getattr(linux_saves, key)
    core = tmp_path / "one-pass.elf"
    cmd = [sys.executable, "-m", "fixedram.cli.main", "extract", "-", "-o", str(core),
           "--format", "elf"]
    if how == "gzip image":
        img = tmp_path / "linux.sav"
        _libvirt_gzip(src, img)
        cmd[4] = str(img)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    else:
        r = _piped(cmd, src)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    want, got = read_core(cores(key)), read_core(core)
    assert got.machine == want.machine == EM_X86_64
    assert [(n.name, n.type, n.desc) for n in got.notes] == \
        [(n.name, n.type, n.desc) for n in want.notes]
    assert [n.name for n in got.notes] == [b"CORE", b"QEMU", b"VMCOREINFO"]
    assert got.loads() == want.loads()
    assert _segments(core) == _segments(cores(key))
    assert gdb_registers(core, "rip rsp") == gdb_registers(cores(key), "rip rsp")
    prog = drgn.Program()
    prog.set_core_dump(str(core))
    assert prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL
    assert _release_through_page_tables(prog, _vmcoreinfo(core)) == linux_saves.kernel_release


def test_one_pass_core_whose_notes_outgrow_their_room(linux_saves: LinuxArtifacts,
                                                      tmp_path: Path) -> None:
    """A one-pass core keeps a fixed room for its notes before the data it writes first:
    a save whose notes would not fit is refused in one line, nothing left behind. (The room
    is made smaller than this guest's notes, 0x330 bytes of registers and its VMCOREINFO.)"""
    core = tmp_path / "c.elf"
    run = ("import sys; import fixedram.memory.stream_extract as s; s.ONE_PASS_NOTE_ROOM = 0x400; "
           "from fixedram.cli.main import main; sys.exit(main(sys.argv[1:]))")
    r = _piped([sys.executable, "-c", run, "extract", "-", "-o", str(core), "--format", "elf"],
               linux_saves.paused_stream)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "exceed the 1024 bytes kept for them" in lines[0], r.stderr
    assert list(tmp_path.iterdir()) == []
