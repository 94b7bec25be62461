"""Every save format libvirt 11.3 writes (raw, gzip, bzip2, xz, lzop, zstd, sparse), read by
inspect, extract, verify, state and convert; converted images restored by ``virsh restore``.

The images come from ``virsh save --image-format FORMAT`` of one paused domain (restored paused
between saves, so every image holds the same RAM), and QEMU's pmemsave of that domain is the
ground truth. libvirtd is started by scripts/start-libvirt.sh: these tests fail, never skip,
without libvirt or the compressors libvirt runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from bridge_helpers import FIXEDRAM, MIB
from libvirt_helpers import (
    assert_same_ram,
    cli,
    libvirt_header,
    one_error_line,
    pmemsave,
    running_domain,
    virsh,
    wait_progress,
)

from fixedram.format.libvirt import HEADER_SIZE
from fixedram.format.migfile import MigrationFile

pytestmark = pytest.mark.qemu

FORMATS = ("raw", "gzip", "bzip2", "xz", "lzop", "zstd", "sparse")
COMPRESSED = ("gzip", "bzip2", "xz", "lzop", "zstd")


@dataclass
class Saves:
    dir: Path
    name: str
    pmem: Path
    machine: str = ""
    images: dict[str, Path] = field(default_factory=dict)


@pytest.fixture(scope="module")
def saves(tmp_path_factory: pytest.TempPathFactory, guest_image: Path) -> Iterator[Saves]:
    for tool in COMPRESSED:
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} missing: libvirt cannot write {tool} images "
                        "(scripts/install-qemu.sh installs it)", pytrace=False)
    with running_domain(tmp_path_factory, "libvirt-formats", guest_image, "fixedram-fmt") as dom:
        d, name = dom.dir, dom.name
        wait_progress(dom.serial, 2, timeout=30)
        virsh("suspend", name)
        s = Saves(d, name, pmemsave(name, d / "src.pmem"))
        # Each save stops the domain; restoring it --paused keeps the very same RAM.
        for i, fmt in enumerate(FORMATS):
            if i:
                virsh("restore", str(s.images[FORMATS[i - 1]]), "--paused")
            s.images[fmt] = d / f"{fmt}.sav"
            virsh("save", name, str(s.images[fmt]), "--image-format", fmt)
        with MigrationFile(s.images["raw"]) as mf:
            s.machine = mf.machine or ""
        yield s


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_libvirt_format_reads(saves: Saves, fmt: str, tmp_path: Path) -> None:
    path = saves.images[fmt]
    p = cli("inspect", "--json", str(path))
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    lv = info["libvirt"]
    assert lv["image_format"] == fmt and lv["complete"] and lv["version"] == 2
    assert info["complete"] and info["compression"] == (fmt if fmt in COMPRESSED else None)
    assert info["format"] == ("mapped-ram" if fmt == "sparse" else "stream")
    # The same header, XML and cookie as libvirt's raw image of the same domain.
    raw = json.loads(cli("inspect", "--json", str(saves.images["raw"])).stdout)["libvirt"]
    assert {k: lv[k] for k in ("data_len", "cookie_offset", "xml_bytes", "cookie_bytes")} == \
        {k: raw[k] for k in ("data_len", "cookie_offset", "xml_bytes", "cookie_bytes")}
    xml = cli("inspect", "--xml", str(path)).stdout
    stored = path.read_bytes()[HEADER_SIZE:HEADER_SIZE + lv["xml_bytes"]].decode()
    assert xml.rstrip("\n") == stored.rstrip("\n") and f"<name>{saves.name}</name>" in xml
    dumped = virsh("save-image-dumpxml", str(path))
    uid = dumped.split("<uuid>")[1].split("</uuid>")[0]
    assert f"<uuid>{uid}</uuid>" in xml  # libvirt re-formats it, adding its defaults
    # Guest RAM equals QEMU's pmemsave of the domain.
    phys = tmp_path / "phys.img"
    p = cli("extract", str(path), "--format", "physical", "-o", str(phys))
    assert p.returncode == 0, p.stderr
    assert_same_ram(saves.pmem, phys, saves.machine)
    p = cli("verify", str(path), "--against", str(saves.images["raw"]))
    assert p.returncode == 0 and "RAM equal" in p.stdout, p.stdout + p.stderr
    p = cli("state", "--json", str(path))
    assert p.returncode == 0, p.stderr
    st = json.loads(p.stdout)
    ref = json.loads(cli("state", "--json", str(saves.images["raw"])).stdout)
    assert [d["name"] for d in st["devices"]] == [d["name"] for d in ref["devices"]]
    assert st["configuration"]["name"] == ref["configuration"]["name"] == saves.machine
    regs = next(d for d in st["devices"] if d["name"] == "cpu")["fields"]["env.regs"]
    ref_regs = next(d for d in ref["devices"] if d["name"] == "cpu")["fields"]["env.regs"]
    assert regs == ref_regs  # the same paused vCPU
    if fmt in COMPRESSED:
        # send: the decompressed stream, as libvirt itself would hand it to QEMU.
        sent = subprocess.run([*FIXEDRAM, "send", str(path), "-"], capture_output=True,
                              check=False, timeout=120)
        assert sent.returncode == 0, sent.stderr
        with open(path, "rb") as fi:
            fi.seek(lv["data_offset"])
            ref_stream = subprocess.run([fmt, "-dc"], stdin=fi, capture_output=True,
                                        check=True).stdout
        assert sent.stdout == ref_stream
        # The same image on a pipe: decoded as it arrives.
        out = tmp_path / "raw-set"
        p = cli("extract", "-", "-o", str(out), stdin=path)
        assert p.returncode == 0, p.stderr
        assert_same_ram(saves.pmem, out / "pc.ram.bin", saves.machine)


def _restored_ram(saves: Saves, image: Path, tmp_path: Path) -> Path:
    virsh("restore", str(image), "--paused")
    try:
        return pmemsave(saves.name, tmp_path / f"{image.name}.pmem")
    finally:
        virsh("destroy", saves.name)


@pytest.mark.parametrize("fmt", ["zstd", "xz", "raw", "sparse"])
def test_converted_images_restore_in_libvirt(saves: Saves, fmt: str, tmp_path: Path) -> None:
    src = saves.images[fmt]
    lv_in = libvirt_header(src)
    assert lv_in is not None
    for to, lv_fmt in (("mapped-ram", "sparse"), ("stream", "raw")):
        out = tmp_path / f"{fmt}-{to}.sav"
        p = cli("convert", str(src), str(out), "--to", to)
        assert p.returncode == 0, p.stderr
        with MigrationFile(out) as mf:
            lv = mf.libvirt
            assert lv is not None and lv.complete and lv.format == lv_fmt and mf.complete
            assert (lv.xml_raw, lv.cookie, lv.data_len, lv.was_running) == \
                (lv_in.xml_raw, lv_in.cookie, lv_in.data_len, lv_in.was_running)
            assert mf.start == lv.data_offset
            if to == "mapped-ram":  # offsets absolute in the image, as libvirt 11 writes them
                m = mf.block("pc.ram").record.mapped
                assert m is not None and m.pages_offset % MIB == 0 and m.bitmap_offset > mf.start
        assert virsh("save-image-dumpxml", str(out)) == virsh("save-image-dumpxml", str(src))
        assert_same_ram(saves.pmem, _restored_ram(saves, out, tmp_path), saves.machine)
    # --bare: the plain QEMU file.
    bare = tmp_path / "bare.mig"
    assert cli("convert", str(src), str(bare), "--to", "mapped-ram", "--bare").returncode == 0
    with MigrationFile(bare) as mf:
        assert mf.libvirt is None and mf.start == 0 and mf.complete


def test_bad_libvirt_images(saves: Saves, tmp_path: Path) -> None:
    data = saves.images["zstd"].read_bytes()
    start = json.loads(cli("inspect", "--json", str(saves.images["zstd"])).stdout)[
        "libvirt"]["data_offset"]
    # A corrupt compressed payload: named, with the offset in the decompressed stream.
    bad = tmp_path / "corrupt.sav"
    mid = start + (len(data) - start) // 2
    bad.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 32]) + data[mid + 32:])
    out = tmp_path / "out"
    one_error_line(cli("extract", str(bad), "-o", str(out)), str(bad), "zstd",
                   "decompressed", "byte offset", status=2)
    assert not out.exists()
    # An unknown header format.
    unk = tmp_path / "unknown.sav"
    unk.write_bytes(data[:28] + (9).to_bytes(4, "little") + data[32:])
    for cmd in (("inspect",), ("extract", "-o", str(out)), ("convert", "--to", "stream"),
                ("verify",), ("state",)):
        args = [cmd[0], str(unk), *cmd[1:]]
        if cmd[0] == "convert":
            args = ["convert", str(unk), str(out), "--to", "stream"]
        p = cli(*args)
        if cmd[0] == "verify":  # verify reports problems on stdout
            assert p.returncode == 2 and "format 9 unknown" in p.stdout and "28" in p.stdout
        else:
            one_error_line(p, str(unk), "format 9 unknown", "byte offset 28", status=2)
        assert not out.exists()
    # A truncated compressed image, as a file and as a pipe closing mid-stream.
    for comp in ("gzip", "xz"):
        whole = saves.images[comp].read_bytes()
        cut = tmp_path / f"cut-{comp}.sav"
        cut.write_bytes(whole[:start + (len(whole) - start) // 2])
        one_error_line(cli("extract", str(cut), "-o", str(out)), str(cut), "byte offset",
                       status=2)
        assert not out.exists()
        p = cli("convert", "-", str(out), "--to", "mapped-ram", stdin=saves.images[comp],
                limit=len(cut.read_bytes()))
        one_error_line(p, "stdin", "byte offset", status=2)
        assert not out.exists()
    assert not [n for n in os.listdir(tmp_path) if "partial" in n]
    # A sparse (mapped-ram) image on a pipe.
    p = cli("inspect", "-", stdin=saves.images["sparse"])
    one_error_line(p, "mapped-ram needs a seekable file")
