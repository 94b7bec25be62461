"""The real Linux guest boots, and fixedram reads the saves QEMU made of it."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qemu_harness import LinuxArtifacts, diff_pages
from qemu_harness.linux import READY_MARKER, TICK_MARKER, guest_files

pytestmark = pytest.mark.qemu


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fixedram.cli.main", *args],
                          capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def physical(linux_saves: LinuxArtifacts, tmp_path_factory: pytest.TempPathFactory
             ) -> Callable[[str], Path]:
    """physical('paused_stream') -> `fixedram extract --format physical` image, made once."""
    out = tmp_path_factory.mktemp("linux-physical")
    cache: dict[str, Path] = {}

    def get(key: str) -> Path:
        if key not in cache:
            img = out / f"{key}.raw"
            r = _cli("extract", str(getattr(linux_saves, key)), "-o", str(img),
                     "--format", "physical")
            assert r.returncode == 0, r.stderr
            cache[key] = img
        return cache[key]

    return get


def _bzimage_version(vmlinuz: Path) -> str:
    """The kernel_version string of a bzImage's setup header (boot protocol >= 2.00)."""
    head = vmlinuz.read_bytes()[:0x8000]
    assert head[0x202:0x206] == b"HdrS", "not a bzImage"
    ptr, = struct.unpack_from("<H", head, 0x20E)
    return head[0x200 + ptr:].split(b"\0", 1)[0].decode().split()[0]


def test_guest_boots_and_reaches_marker(linux_saves: LinuxArtifacts) -> None:
    serial = linux_saves.serial.read_text(errors="replace")
    assert f"{READY_MARKER} release={linux_saves.kernel_release}" in serial
    ticks = [int(n) for n in re.findall(TICK_MARKER + r" (\d+)", serial)]
    assert ticks and ticks == list(range(1, len(ticks) + 1))  # the workload kept running
    assert linux_saves.meta["ticks_at_stop"] >= 2
    # The release the guest printed is that of the kernel we booted.
    files = guest_files(Path(linux_saves.meta["kernel"]).parent, fetch=False)
    assert linux_saves.kernel_release == _bzimage_version(files.vmlinuz)
    assert linux_saves.machine.startswith("pc-q35-")
    assert linux_saves.ram_size == 256 << 20
    assert "nokaslr" not in linux_saves.meta["append"]


@pytest.mark.parametrize("key", ["paused_stream", "paused_mapped"])
def test_extract_physical_matches_pmemsave(linux_saves: LinuxArtifacts,
                                           physical: Callable[[str], Path], key: str) -> None:
    pm = np.memmap(linux_saves.pmem, dtype=np.uint8, mode="r")
    assert pm.size == linux_saves.ram_size  # all of RAM is below 4 GiB at 256 MiB
    img = np.memmap(physical(key), dtype=np.uint8, mode="r")
    assert img.size >= pm.size
    bad = diff_pages(pm, img[: pm.size], linux_saves.compare_ranges)
    assert not bad, f"{len(bad)} pages differ from pmemsave, first at 0x{bad[0]:x}"
    # A booted kernel: most of RAM below the legacy window and above it is in use or zero,
    # but far from all zero.
    assert np.count_nonzero(pm[: 64 << 20]) > 1 << 20


def _inspect(path: Path) -> dict[str, Any]:
    r = _cli("inspect", "--json", str(path))
    assert r.returncode == 0, r.stderr
    d: dict[str, Any] = json.loads(r.stdout)
    assert d["complete"] is True
    return d


def test_live_saves_have_several_passes(linux_saves: LinuxArtifacts) -> None:
    live, paused = _inspect(linux_saves.live_stream), _inspect(linux_saves.paused_stream)
    assert live["format"] == "stream" and live["machine"] == linux_saves.machine
    assert paused["passes"] == 1 and paused["resent_bytes"] == 0
    assert live["passes"] >= 2 and live["resent_bytes"] > 0
    # mapped-ram: QEMU overwrote re-dirtied pages in place, so each page is there once, and the
    # several passes show as more RAM sections than the paused save has.
    live_m, paused_m = _inspect(linux_saves.live_mapped), _inspect(linux_saves.paused_mapped)
    assert live_m["format"] == "mapped-ram" and live_m["capabilities"] == ["mapped-ram"]
    assert live_m["passes"] == 1 and live_m["ram_sections"] > paused_m["ram_sections"]
    syncs = linux_saves.meta["migrate_stats"]["live_mapped"]["ram"]["dirty-sync-count"]
    assert syncs >= 3
    assert live_m["apparent_bytes"] < linux_saves.ram_size + (64 << 20)


def test_gdb_reads_qemu_core(linux_saves: LinuxArtifacts) -> None:
    r = subprocess.run(["gdb", "-nx", "-batch", "-ex", f"core-file {linux_saves.qemu_dump}",
                        "-ex", "info registers rip"],
                       capture_output=True, text=True, check=False, timeout=120)
    m = re.search(r"^rip\s+0x([0-9a-f]+)", r.stdout, re.M)
    assert m, f"gdb printed no rip:\n{r.stdout}\n{r.stderr}"
    hmp = re.search(r"RIP=([0-9a-f]+)", linux_saves.info_registers)
    assert hmp, linux_saves.info_registers
    assert int(m.group(1), 16) == int(hmp.group(1), 16)


def test_kernel_release_in_guest_ram(linux_saves: LinuxArtifacts,
                                     physical: Callable[[str], Path]) -> None:
    data = physical("paused_mapped").read_bytes()
    found = set(re.findall(rb"Linux version (\S+) \(", data))
    assert found == {linux_saves.kernel_release.encode()}

