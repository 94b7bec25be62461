"""Reading files real QEMU 10 wrote, compared byte for byte with QEMU's pmemsave."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fixedram.format.migfile import MigrationFile
from fixedram.memory.extract import extract_elf, extract_physical, extract_raw
from qemu_harness import SavedFile, diff_pages, save_vm
from util import elf_segments

pytestmark = pytest.mark.qemu

VARIANTS = {
    "stream-paused": dict(mode="stream", live=False),
    "stream-live": dict(mode="stream", live=True),
    "mapped-paused": dict(mode="mapped-ram", live=False),
    "mapped-live": dict(mode="mapped-ram", live=True),
    "mapped-multifd4-dio": dict(mode="mapped-ram-multifd", live=True, channels=4,
                                direct_io=True),
    "mapped-offset64k": dict(mode="mapped-ram", live=False, offset=65536),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, qemu: str,
          guest_image_factory: Callable[..., Path]) -> Callable[[str, str], SavedFile]:
    """Each (machine, variant) file is made once per module by real QEMU."""
    cache: dict[tuple[str, str], SavedFile] = {}
    # O_DIRECT needs a real filesystem: /tmp may be tmpfs, the repo's disk is not.
    base = Path(os.environ.get("FIXEDRAM_TEST_DIR", Path(__file__).resolve().parents[1] / "build"))
    base.mkdir(exist_ok=True)

    def get(machine: str, variant: str) -> SavedFile:
        key = (machine, variant)
        if key not in cache:
            d = tmp_path_factory.mktemp(f"{machine}-{variant}", numbered=True)
            if VARIANTS[variant].get("direct_io"):
                import tempfile

                d = Path(tempfile.mkdtemp(prefix=f"{machine}-{variant}-", dir=base))
            cache[key] = save_vm(d, machine=machine, image=guest_image_factory(),
                                 **VARIANTS[variant])  # type: ignore[arg-type]
        return cache[key]

    yield get  # type: ignore[misc]
    import shutil

    for sf in cache.values():
        if str(sf.path).startswith(str(base)):
            shutil.rmtree(sf.path.parent, ignore_errors=True)


def _check_physical(sf: SavedFile, image: Path, base: int = 0) -> None:
    pm = sf.pmem_path.read_bytes()
    data = np.memmap(image, dtype=np.uint8, mode="r")
    ours = data[base:base + len(pm)]
    bad = diff_pages(pm, memoryview(ours), sf.compare_ranges)
    assert not bad, f"{len(bad)} pages differ from pmemsave, first at 0x{bad[0]:x}"


@pytest.mark.parametrize("machine", ["pc", "q35"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_read_matches_pmemsave(saved: Callable[[str, str], SavedFile], machine: str,
                               variant: str, tmp_path: Path) -> None:
    sf = saved(machine, variant)
    with MigrationFile(sf.path) as mf:
        assert mf.complete
        assert mf.machine == sf.machine
        assert mf.start == sf.offset
        assert mf.format == ("stream" if sf.mode == "stream" else "mapped-ram")
        assert ("mapped-ram" in mf.capabilities) == (sf.mode != "stream")
        ram = mf.block("pc.ram")
        assert ram.used_length == sf.ram_size
        # The guest wrote every page of its region, so each is present.
        region = slice(sf.guest.mem_start // 4096, sf.guest.mem_end // 4096)
        assert ram.present()[region].all()
        if variant == "stream-live":
            assert mf.passes >= 2 and mf.resent_bytes > 0
        extract_physical(mf, tmp_path / "phys.img")
        _check_physical(sf, tmp_path / "phys.img")
        # Raw pc.ram equals the physical image below 4 GiB (small guests).
        extract_raw(mf, tmp_path / "raw")
        _check_physical(sf, tmp_path / "raw" / "pc.ram.bin")
        if variant in ("stream-live", "mapped-live"):
            segs = extract_elf(mf, tmp_path / "core.elf")
            # RAM, then the BIOS ending at 4 GiB (as QEMU's dump-guest-memory lays it out)
            (off, pa, size), (_, bpa, bsize) = elf_segments(tmp_path / "core.elf")
            assert pa == 0 and size == sf.ram_size and len(segs) == 2
            assert bpa + bsize == 1 << 32
            _check_physical(sf, tmp_path / "core.elf", base=off)
    # The bytes QEMU keeps before a file: offset are untouched by reading.
    if sf.offset:
        assert sf.path.read_bytes()[: sf.offset] == b"X" * sf.offset


def test_inspect_json_cli(saved: Callable[[str, str], SavedFile]) -> None:
    sf = saved("q35", "stream-live")
    out = subprocess.run([sys.executable, "-m", "fixedram.cli.main", "inspect", "--json",
                          str(sf.path)], capture_output=True, text=True, check=True)
    d = json.loads(out.stdout)
    assert d["format"] == "stream" and d["machine"] == sf.machine and d["complete"] is True
    assert d["capabilities"] == []
    pcram = next(b for b in d["blocks"] if b["idstr"] == "pc.ram")
    assert pcram["used_length"] == sf.ram_size
    assert pcram["pages_present"] >= (sf.guest.mem_end - sf.guest.mem_start) // 4096
    assert d["passes"] >= 2 and d["resent_bytes"] > 0
    assert any(dev["idstr"] == "cpu" for dev in d["devices"])
    sf2 = saved("pc", "mapped-offset64k")
    d2 = json.loads(subprocess.run([sys.executable, "-m", "fixedram.cli.main", "inspect",
                                    "--json", str(sf2.path)], capture_output=True, text=True,
                                   check=True).stdout)
    assert d2["format"] == "mapped-ram" and d2["stream_offset"] == 65536
    assert d2["capabilities"] == ["mapped-ram"]
    assert d2["allocated_bytes"] < d2["apparent_bytes"]
    blk = next(b for b in d2["blocks"] if b["idstr"] == "pc.ram")
    assert blk["pages_offset"] % (1 << 20) == 0 and blk["bitmap_offset"] > 65536
