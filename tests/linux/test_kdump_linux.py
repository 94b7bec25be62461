"""`extract --format kdump` of a real Linux guest opens in crash, makedumpfile and drgn.

The file is makedumpfile's compressed kdump format. crash reads the kernel release from its
VMCOREINFO (without a vmlinux it reads nothing else); makedumpfile reads the kernel's log out
of its pages; drgn (through libkdumpfile) opens it as a Linux kernel core and reads
init_uts_ns at its kernel virtual address, through the guest's page tables. Every page read
back (tests/kdumpfile.py) equals the guest's RAM (pmemsave of the paused VM). A missing tool
fails these tests (scripts/install-qemu.sh installs crash and makedumpfile).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import drgn
import pytest
from test_elf_linux import _release_through_page_tables

from kdumpfile import KdumpFile
from qemu_harness import LinuxArtifacts

pytestmark = pytest.mark.qemu

PAUSED = ["paused_stream", "paused_mapped"]
ALL = [*PAUSED, "live_stream", "live_mapped"]
CODECS = ["zlib", "lzo", "snappy", "zstd", "none"]
MAKEDUMPFILE_CODECS = ["zlib", "lzo", "none"]  # Debian 12's makedumpfile: no snappy, no zstd
_LINE = re.compile(r"^\[\s*\d+\.\d+\] .*$", re.M)


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    assert path, f"{name} is not installed (scripts/install-qemu.sh installs it)"
    return path


def _extract(save: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fixedram.cli.main", "extract", str(save),
                           "-o", str(out), *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def dumps(linux_saves: LinuxArtifacts, tmp_path_factory: pytest.TempPathFactory
          ) -> Callable[[str, str], Path]:
    """dumps('paused_stream', 'zlib') -> our kdump file of that save; ('...', 'elf') -> ELF."""
    out = tmp_path_factory.mktemp("linux-kdump")
    cache: dict[tuple[str, str], Path] = {}

    def get(key: str, codec: str) -> Path:
        if (key, codec) not in cache:
            path = out / f"{key}.{codec}"
            args = (["--format", "elf"] if codec == "elf" else
                    ["--format", "kdump", "--compress", codec])
            r = _extract(getattr(linux_saves, key), path, *args)
            assert r.returncode == 0, r.stderr
            assert r.stderr == ""  # registers decoded and VMCOREINFO found: no warning
            cache[key, codec] = path
        return cache[key, codec]

    return get


def _dmesg(dump: Path, tmp: Path) -> str:
    out = tmp / f"{dump.name}.dmesg"
    out.unlink(missing_ok=True)
    r = subprocess.run([_tool("makedumpfile"), "--dump-dmesg", str(dump), str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return out.read_text(errors="replace")


@pytest.mark.parametrize("key", ALL)
def test_crash_reads_the_release(linux_saves: LinuxArtifacts,
                                 dumps: Callable[[str, str], Path], key: str) -> None:
    r = subprocess.run([_tool("crash"), "--osrelease", str(dumps(key, "zlib"))],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == linux_saves.kernel_release


@pytest.mark.parametrize("codec", CODECS)
def test_each_codec_reads_in_crash_and_drgn(linux_saves: LinuxArtifacts,
                                            dumps: Callable[[str, str], Path],
                                            codec: str) -> None:
    dump = dumps("paused_mapped", codec)
    r = subprocess.run([_tool("crash"), "--osrelease", str(dump)],
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == linux_saves.kernel_release, r.stderr
    _check_drgn(linux_saves, dump)


def _check_drgn(linux_saves: LinuxArtifacts, dump: Path) -> None:
    prog = drgn.Program()
    prog.set_core_dump(str(dump))
    assert prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL
    assert prog.platform is not None and prog.platform.arch == drgn.Architecture.X86_64
    text = KdumpFile.open(dump).vmcoreinfo.decode()
    info = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    assert _release_through_page_tables(prog, info) == linux_saves.kernel_release


@pytest.mark.parametrize("key", ALL)
def test_drgn_opens_it_as_linux_kernel(linux_saves: LinuxArtifacts,
                                       dumps: Callable[[str, str], Path], key: str) -> None:
    _check_drgn(linux_saves, dumps(key, "zlib"))


@pytest.mark.parametrize("key", ALL)
def test_makedumpfile_prints_the_kernel_log(linux_saves: LinuxArtifacts,
                                            dumps: Callable[[str, str], Path],
                                            tmp_path: Path, key: str) -> None:
    log = _dmesg(dumps(key, "zlib"), tmp_path)
    # Every kernel line the guest printed on its serial console before the saves...
    serial = linux_saves.serial.read_text(errors="replace")
    printed = _LINE.findall(serial.split("FIXEDRAM-LINUX-READY", 1)[0])
    assert len(printed) > 5
    lines = set(log.splitlines())
    assert [x for x in printed if x not in lines] == []
    # ...and the very log makedumpfile reads from our ELF core of the same save.
    assert log == _dmesg(dumps(key, "elf"), tmp_path)


@pytest.mark.parametrize("codec", MAKEDUMPFILE_CODECS)
def test_makedumpfile_reads_each_codec(dumps: Callable[[str, str], Path], tmp_path: Path,
                                       codec: str) -> None:
    assert _dmesg(dumps("paused_stream", codec), tmp_path) == \
        _dmesg(dumps("paused_stream", "elf"), tmp_path)


@pytest.mark.parametrize(("key", "codec"), [("paused_stream", "zlib"),
                                            *(("paused_mapped", c) for c in CODECS)])
def test_pages_are_the_guest_ram(linux_saves: LinuxArtifacts,
                                 dumps: Callable[[str, str], Path], key: str,
                                 codec: str) -> None:
    """Every dumped page equals pmemsave's RAM (below 4 GiB) or the BIOS; zero pages share one
    descriptor, and compressed pages are smaller than a page."""
    k = KdumpFile.open(dumps(key, codec))
    assert k.status == {"zlib": 1, "lzo": 2, "snappy": 4, "zstd": 0x20, "none": 0}[codec]
    assert (k.bitmap1 == k.bitmap2).all()
    ram = linux_saves.pmem.read_bytes()
    npfn = len(ram) // 4096
    assert k.bitmap2[:npfn].all()
    bios = [int(p) for p in k.bitmap2.nonzero()[0] if p >= npfn]
    assert bios == list(range(0x100000 - 64, 0x100000))  # SeaBIOS: 256 KiB ending at 4 GiB
    zero = bytes(4096)
    for pfn, page in k.pages():
        if pfn < npfn:
            assert page == ram[pfn * 4096:(pfn + 1) * 4096], hex(pfn)
    d = k.descriptors()
    zeros = d[d["offset"] == k.zero_page_offset]
    assert len(zeros) > 1000 and (zeros["size"] == 4096).all() and (zeros["flags"] == 0).all()
    with open(k.path, "rb") as f:
        f.seek(k.zero_page_offset)
        assert f.read(4096) == zero
    if codec != "none":
        packed = d[d["flags"] != 0]
        assert len(packed) > 1000 and (packed["size"] < 4096).all()


@pytest.mark.parametrize("key", ALL)
def test_headers_say_what_the_kernel_said(linux_saves: LinuxArtifacts,
                                          dumps: Callable[[str, str], Path], key: str) -> None:
    """utsname as `uname -a` would print it (the version is the tail of the boot banner),
    phys_base as VMCOREINFO's signed NUMBER(phys_base) (negative when KASLR loaded the
    kernel below its link address), one vCPU, zero pages left out (dump level 1)."""
    k = KdumpFile.open(dumps(key, "zlib"))
    uts = [bytes(k.header[2][i * 65:(i + 1) * 65]).split(b"\0")[0].decode()  # type: ignore[index]
           for i in range(6)]
    banner = re.search(r"Linux version (\S+) .* (#\d+ .*)$",
                       linux_saves.serial.read_text(errors="replace"), re.M)
    assert banner is not None and banner[1] == linux_saves.kernel_release
    assert (uts[0], uts[2], uts[3], uts[4]) == ("Linux", banner[1], banner[2], "x86_64")
    info = dict(line.split("=", 1) for line in k.vmcoreinfo.decode().splitlines())
    assert k.sub[0] == int(info["NUMBER(phys_base)"]) % (1 << 64)
    assert (k.sub[1], k.header[14]) == (1, 1)


@pytest.mark.parametrize("key", ALL)
def test_at_most_half_the_elf_core(dumps: Callable[[str, str], Path], key: str) -> None:
    size = dumps(key, "zlib").stat().st_size
    elf = dumps(key, "elf").stat()
    assert size <= elf.st_blocks * 512 // 2, (size, elf.st_blocks * 512)


def test_refusals_are_one_line(linux_saves: LinuxArtifacts, tmp_path: Path) -> None:
    """A pipe, stdout, or --compress without kdump: one line, status 1, nothing left."""
    save = linux_saves.paused_stream
    with open(save, "rb") as f:
        cat = subprocess.Popen(["cat"], stdin=f, stdout=subprocess.PIPE)
        assert cat.stdout is not None
        r = subprocess.run([sys.executable, "-m", "fixedram.cli.main", "extract", "-",
                            "--format", "kdump", "-o", str(tmp_path / "v")],
                           stdin=cat.stdout, capture_output=True, text=True, timeout=120)
        cat.stdout.close()
        cat.wait()
    results = [r, _extract(save, Path("-"), "--format", "kdump"),
               _extract(save, tmp_path / "v", "--compress", "zstd")]
    for r in results:
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith("fixedram: error: ") and "Traceback" not in r.stderr
    assert "read at any offset" in results[0].stderr
    assert os.listdir(tmp_path) == []
