"""``fixedram define-xml`` on real libvirt 11 save images: ``virsh restore`` of the edited
image runs the domain with the new XML and its RAM byte-exact, for an XML that fits the room
libvirt left (rewritten in place) and for one that outgrows it (the image written anew), raw
and sparse. libvirtd is started by scripts/start-libvirt.sh: these tests fail, never skip,
without libvirt."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from libvirt_helpers import (
    assert_same_ram,
    cli,
    destroy,
    libvirt_header,
    one_error_line,
    pmemsave,
    running_domain,
    virsh,
    wait_progress,
)

pytestmark = pytest.mark.qemu


@dataclass
class Saved:
    raw: Path
    sparse: Path
    pmem: Path
    name: str
    machine: str


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, guest_image: Path) -> Iterator[Saved]:
    with running_domain(tmp_path_factory, "definexml", guest_image, "fixedram-dx") as dom:
        wait_progress(dom.serial, 2, timeout=30)
        virsh("suspend", dom.name)
        pmem = pmemsave(dom.name, dom.dir / "src.pmem")
        machine = virsh("dumpxml", dom.name).split("machine='", 1)[1].split("'", 1)[0]
        s = Saved(dom.dir / "raw.sav", dom.dir / "sparse.sav", pmem, dom.name, machine)
        virsh("save", dom.name, str(s.raw))
        virsh("restore", str(s.raw), "--paused")
        virsh("save", dom.name, str(s.sparse), "--image-format", "sparse")
        yield s


def _edited_xml(image: Path, description: str) -> bytes:
    hdr = libvirt_header(image)
    assert hdr is not None
    xml = hdr.xml_raw.decode()
    assert "<description>" not in xml
    return xml.replace("<name>", f"<description>{description}</description>\n  <name>",
                       1).encode()


@pytest.mark.parametrize("kind", ["raw", "sparse"])
@pytest.mark.parametrize("size", ["fits", "outgrows"])
def test_restore_runs_the_new_xml(saved: Saved, tmp_path: Path, kind: str, size: str) -> None:
    d = tmp_path / "img"
    d.mkdir()
    os.chmod(d, 0o755)
    image = d / f"{kind}.sav"
    shutil.copyfile(getattr(saved, kind), image)
    before = libvirt_header(image)
    assert before is not None
    # libvirt's room after the XML is 64 KiB: a 100 KiB description cannot fit in it.
    text = "edited by fixedram" if size == "fits" else "x" * (100 << 10)
    xml = tmp_path / "new.xml"
    xml.write_bytes(_edited_xml(image, text))
    p = cli("define-xml", str(image), str(xml))
    assert p.returncode == 0, p.stderr
    assert ("in place" in p.stdout) == (size == "fits"), p.stdout
    after = libvirt_header(image)
    assert after is not None and after.complete and after.format == before.format
    assert f"<description>{text}</description>" in after.xml
    assert after.cookie == before.cookie
    if size == "fits":
        assert after.data_offset == before.data_offset
    else:
        assert after.data_offset > before.data_offset
    assert sorted(os.listdir(d)) == [image.name]  # no temporary left
    assert cli("verify", str(image), "--against", str(getattr(saved, kind))).returncode == 0
    destroy(saved.name)
    virsh("restore", str(image), "--paused")
    try:
        assert f"<description>{text}</description>" in virsh("dumpxml", saved.name)
        assert_same_ram(saved.pmem, pmemsave(saved.name, tmp_path / "restored.pmem"),
                        saved.machine)
    finally:
        destroy(saved.name)


def test_refusals_leave_the_image_as_it_was(saved: Saved, tmp_path: Path) -> None:
    image = tmp_path / "raw.sav"
    shutil.copyfile(saved.raw, image)
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    bad = tmp_path / "bad.xml"
    for text, words in ((b"<domain><name>x</name>", ["not well-formed"]),
                        (b"<network/>", ["<network>", "not <domain>"])):
        bad.write_bytes(text)
        one_error_line(cli("define-xml", str(image), str(bad)), str(bad), *words)
    good = tmp_path / "good.xml"
    good.write_bytes(_edited_xml(image, "never written"))
    not_libvirt = tmp_path / "plain.mig"
    p = cli("save", f"file:{not_libvirt}", "--ram", "16M")
    assert p.returncode == 0, p.stderr
    one_error_line(cli("define-xml", str(not_libvirt), str(good)), "not a libvirt save image")
    one_error_line(cli("define-xml", str(image), str(tmp_path / "missing.xml")), "missing.xml")
    assert hashlib.sha256(image.read_bytes()).hexdigest() == digest
