"""Real libvirt 11 save images (raw, sparse, sparse with 2 channels, unfinished) through
inspect, extract, verify and convert; extract is compared with QEMU's pmemsave of the paused
domain. libvirtd is started by scripts/start-libvirt.sh (installed there if missing): these
tests fail, never skip, without libvirt."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from bridge_helpers import MIB
from libvirt_helpers import assert_same_ram, cli, pmemsave, running_domain, virsh, wait_progress

from fixedram.errors import IncompleteSave
from fixedram.format.libvirt import MAGIC_PART
from fixedram.format.migfile import MigrationFile

pytestmark = pytest.mark.qemu


@dataclass
class Images:
    raw: Path
    sparse: Path
    parallel: Path
    pmem: Path
    machine: str


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, guest_image: Path) -> Iterator[Images]:
    with running_domain(tmp_path_factory, "libvirt", guest_image, "fixedram") as dom:
        d, name = dom.dir, dom.name
        wait_progress(dom.serial, 2, timeout=30)
        virsh("suspend", name)
        pmem = pmemsave(name, d / "src.pmem")
        ims = Images(d / "raw.sav", d / "sparse.sav", d / "par.sav", pmem, "")
        # Each save stops the domain; restoring --paused keeps the very same RAM.
        virsh("save", name, str(ims.raw))
        virsh("restore", str(ims.raw), "--paused")
        virsh("save", name, str(ims.sparse), "--image-format", "sparse")
        virsh("restore", str(ims.sparse), "--paused")
        virsh("save", name, str(ims.parallel), "--image-format", "sparse",
              "--parallel-channels", "2")
        with MigrationFile(ims.raw) as mf:
            ims.machine = mf.machine or ""
        yield ims


@pytest.mark.parametrize("kind", ["raw", "sparse", "parallel"])
def test_libvirt_image_tools(images: Images, kind: str, tmp_path: Path) -> None:
    path: Path = getattr(images, kind)
    info = json.loads(cli("inspect", "--json", str(path)).stdout)
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
    p = cli("extract", str(path), "--format", "physical", "-o", str(tmp_path / "phys.img"))
    assert p.returncode == 0, p.stderr
    assert_same_ram(images.pmem, tmp_path / "phys.img", images.machine)
    p = cli("verify", str(path), "--against", str(images.raw))
    assert p.returncode == 0, p.stdout + p.stderr
    for to in ("mapped-ram", "stream"):
        out = tmp_path / f"conv-{to}.mig"
        p = cli("convert", str(path), str(out), "--to", to)
        assert p.returncode == 0, p.stderr
        with MigrationFile(out) as mf:
            # A libvirt image stays one: raw for a stream, sparse for mapped-ram.
            assert mf.libvirt is not None and mf.format == to and mf.complete
            assert mf.libvirt.format == {"stream": "raw", "mapped-ram": "sparse"}[to]
        assert cli("verify", str(out), "--against", str(path)).returncode == 0


def test_libvirt_unfinished_image(images: Images, tmp_path: Path) -> None:
    for src in (images.raw, images.sparse):
        part = tmp_path / f"part-{src.name}"
        shutil.copyfile(src, part)
        with open(part, "r+b") as f:
            f.write(MAGIC_PART)  # what libvirt leaves while QEMU is still writing
        info = json.loads(cli("inspect", "--json", str(part)).stdout)
        assert info["libvirt"]["complete"] is False and info["complete"] is False
        # An incomplete save exits 2 from every command (1 is "could not read").
        p = cli("extract", str(part), "-o", str(tmp_path / "out"))
        assert p.returncode == 2 and "incomplete" in p.stderr
        assert not (tmp_path / "out").exists()
        p = cli("verify", str(part))
        assert p.returncode == 2 and "unfinished" in p.stdout
        p = cli("convert", str(part), str(tmp_path / "c.mig"), "--to", "stream")
        assert p.returncode == 2 and "incomplete" in p.stderr
        assert not (tmp_path / "c.mig").exists()
        p = cli("send", str(part), "-")
        assert p.returncode == 2 and "incomplete" in p.stderr and p.stdout == ""


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
    p = cli("extract", str(part), "-o", str(tmp_path / "out"))
    assert p.returncode == 2
    with pytest.raises(IncompleteSave):
        from fixedram.tools.convert import to_stream

        with MigrationFile(part, strict=False) as mf:
            to_stream(mf, lambda b: None)
