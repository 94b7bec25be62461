"""Real libvirt 11 save images (raw, sparse, sparse with 2 channels, unfinished) through
inspect, extract, verify and convert; extract is compared with QEMU's pmemsave of the paused
domain. libvirtd is started by scripts/start-libvirt.sh (installed there if missing): these
tests fail, never skip, without libvirt."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from bridge_helpers import FIXEDRAM, MIB

from fixedram.errors import UnsupportedFeature
from fixedram.format.libvirt import MAGIC_PART
from fixedram.format.migfile import MigrationFile
from qemu_harness import diff_pages, qemu_binary, ram_compare_ranges

pytestmark = pytest.mark.qemu

RAM = 128 * MIB
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Images:
    raw: Path
    sparse: Path
    parallel: Path
    pmem: Path
    machine: str


def _virsh(*args: str, timeout: float = 60) -> str:
    p = subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True,
                       check=False, timeout=timeout)
    if p.returncode != 0:
        pytest.fail(f"virsh {' '.join(args)}: {p.stderr.strip()}", pytrace=False)
    return p.stdout


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, guest_image: Path) -> Iterator[Images]:
    p = subprocess.run(["bash", str(ROOT / "scripts" / "start-libvirt.sh")], capture_output=True,
                       text=True, check=False, timeout=600)
    if p.returncode != 0:
        pytest.fail(f"libvirt unavailable: {p.stderr.strip()}", pytrace=False)
    d = tmp_path_factory.mktemp("libvirt")
    os.chmod(d, 0o755)
    img = d / "disk.img"
    shutil.copyfile(guest_image, img)
    name = f"fixedram-{uuid.uuid4().hex[:8]}"
    xml = d / "dom.xml"
    xml.write_text(f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{RAM >> 20}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <devices>
    <emulator>{qemu_binary()}</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='{img}'/><target dev='hda' bus='ide'/></disk>
    <controller type='usb' model='none'/>
    <serial type='file'><source path='{d / "serial.txt"}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
""")
    _virsh("create", str(xml))
    try:
        import time

        deadline = time.monotonic() + 30
        while (d / "serial.txt").read_bytes().count(b"P") < 2:
            assert time.monotonic() < deadline, "libvirt guest made no progress"
            time.sleep(0.1)
        _virsh("suspend", name)
        pmem = d / "src.pmem"
        cmd = {"execute": "pmemsave", "arguments": {"val": 0, "size": RAM,
                                                     "filename": str(pmem)}}
        out = json.loads(_virsh("qemu-monitor-command", name, json.dumps(cmd)))
        assert "error" not in out, out
        ims = Images(d / "raw.sav", d / "sparse.sav", d / "par.sav", pmem, "")
        # Each save stops the domain; restoring --paused keeps the very same RAM.
        _virsh("save", name, str(ims.raw))
        _virsh("restore", str(ims.raw), "--paused")
        _virsh("save", name, str(ims.sparse), "--image-format", "sparse")
        _virsh("restore", str(ims.sparse), "--paused")
        _virsh("save", name, str(ims.parallel), "--image-format", "sparse",
               "--parallel-channels", "2")
        with MigrationFile(ims.raw) as mf:
            ims.machine = mf.machine or ""
        yield ims
    finally:
        subprocess.run(["virsh", "-c", "qemu:///system", "destroy", name], capture_output=True,
                       check=False)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FIXEDRAM, *args], capture_output=True, text=True, check=False,
                          timeout=120)


def _check_physical(img: Path, pmem: Path, machine: str) -> None:
    ours = np.memmap(img, dtype=np.uint8, mode="r")
    ref = pmem.read_bytes()
    bad = diff_pages(ref, memoryview(ours[:len(ref)]), ram_compare_ranges(RAM, machine))
    assert not bad, f"{len(bad)} pages differ from pmemsave, first at 0x{bad[0]:x}"


@pytest.mark.parametrize("kind", ["raw", "sparse", "parallel"])
def test_libvirt_image_tools(images: Images, kind: str, tmp_path: Path) -> None:
    path: Path = getattr(images, kind)
    info = json.loads(_cli("inspect", "--json", str(path)).stdout)
    lv = info["libvirt"]
    assert lv["complete"] is True and lv["version"] == 2
    assert lv["image_format"] == ("raw" if kind == "raw" else "sparse")
    assert lv["was_running"] is False  # saved while suspended
    assert info["format"] == ("stream" if kind == "raw" else "mapped-ram")
    assert info["stream_offset"] == lv["data_offset"] > 0
    with MigrationFile(path) as mf:
        assert mf.complete and mf.libvirt is not None
        assert "<domain" in mf.libvirt.xml and "</domain>" in mf.libvirt.xml
        if kind != "raw":
            # mapped-ram at an offset: the file offsets in it are absolute.
            m = mf.block("pc.ram").record.mapped
            assert m is not None and m.pages_offset % MIB == 0 and m.bitmap_offset > mf.start
    p = _cli("extract", str(path), "--format", "physical", "-o", str(tmp_path / "phys.img"))
    assert p.returncode == 0, p.stderr
    _check_physical(tmp_path / "phys.img", images.pmem, images.machine)
    p = _cli("verify", str(path), "--against", str(images.raw))
    assert p.returncode == 0, p.stdout + p.stderr
    for to in ("mapped-ram", "stream"):
        out = tmp_path / f"conv-{to}.mig"
        p = _cli("convert", str(path), str(out), "--to", to)
        assert p.returncode == 0, p.stderr
        with MigrationFile(out) as mf:
            # A libvirt image stays one: raw for a stream, sparse for mapped-ram.
            assert mf.libvirt is not None and mf.format == to and mf.complete
            assert mf.libvirt.format == {"stream": "raw", "mapped-ram": "sparse"}[to]
        assert _cli("verify", str(out), "--against", str(path)).returncode == 0


def test_libvirt_unfinished_image(images: Images, tmp_path: Path) -> None:
    for src in (images.raw, images.sparse):
        part = tmp_path / f"part-{src.name}"
        shutil.copyfile(src, part)
        with open(part, "r+b") as f:
            f.write(MAGIC_PART)  # what libvirt leaves while QEMU is still writing
        info = json.loads(_cli("inspect", "--json", str(part)).stdout)
        assert info["libvirt"]["complete"] is False and info["complete"] is False
        p = _cli("extract", str(part), "-o", str(tmp_path / "out"))
        assert p.returncode == 1 and "incomplete" in p.stderr
        assert not (tmp_path / "out").exists()
        p = _cli("verify", str(part))
        assert p.returncode == 1 and "unfinished" in p.stdout
        p = _cli("convert", str(part), str(tmp_path / "c.mig"), "--to", "stream")
        assert p.returncode == 1 and "incomplete" in p.stderr
        assert not (tmp_path / "c.mig").exists()
        p = _cli("send", str(part), "-")
        assert p.returncode == 1 and "incomplete" in p.stderr and p.stdout == ""


def test_libvirt_cut_short(images: Images, tmp_path: Path) -> None:
    """An unfinished sparse image whose header was never completed and whose
    QEMU data stops inside device state: reported, never extracted silently."""
    part = tmp_path / "cut.sav"
    data = images.sparse.read_bytes()
    with MigrationFile(images.sparse) as mf:
        cut = mf.sections[len(mf.sections) // 2].offset + 3
    part.write_bytes(MAGIC_PART + data[len(MAGIC_PART):cut])
    with MigrationFile(part, strict=False) as mf:
        assert not mf.complete
    p = _cli("extract", str(part), "-o", str(tmp_path / "out"))
    assert p.returncode == 1
    with pytest.raises(UnsupportedFeature):
        from fixedram.tools.convert import to_stream

        with MigrationFile(part, strict=False) as mf:
            to_stream(mf, lambda b: None)
