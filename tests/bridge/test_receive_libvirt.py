"""``fixedram receive ... --libvirt-header FROM.sav``: a live migration received as a libvirt
save image that ``virsh restore`` loads.

FROM.sav is a zstd image that libvirt 11 wrote (``virsh save --image-format zstd``) of a running
boot-sector guest. ``virsh restore FROM.sav`` brings the same domain back, and that QEMU, started by
libvirt from the domain's own configuration, is the migration source: it is migrated live (QMP
``migrate`` through ``virsh qemu-monitor-command``, plain precopy and multifd with 2 channels) into
``fixedram receive``, which writes OUT.sav with FROM.sav's domain XML and cookie in a sparse
(mapped-ram) image. ``virsh restore OUT.sav`` must then hold exactly the source's RAM after the
migration (``pmemsave`` of both), RAM the guest rewrote after FROM.sav was taken. libvirtd is
started by scripts/start-libvirt.sh: these tests fail, never skip, without libvirt.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bridge_helpers import FIXEDRAM, MIB, Receiver

from fixedram.format.libvirt import HEADER_SIZE, LibvirtHeader, probe_libvirt
from fixedram.format.migfile import MigrationFile
from qemu_harness import (
    check_guest_pattern,
    diff_pages,
    qemu_binary,
    ram_compare_ranges,
    read_params,
)

pytestmark = pytest.mark.qemu

RAM = 128 * MIB
ROOT = Path(__file__).resolve().parents[2]
FILL_WORDS = 256  # 1 KiB of the known pattern per page and pass


@dataclass
class Domain:
    dir: Path
    name: str
    image: Path  # the guest's boot disk (its pattern parameters)
    from_sav: Path  # libvirt's own zstd save of the running guest
    serial: Path


def _virsh(*args: str, timeout: float = 120) -> str:
    p = subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True,
                       check=False, timeout=timeout)
    if p.returncode != 0:
        pytest.fail(f"virsh {' '.join(args)}: {p.stderr.strip()}", pytrace=False)
    return p.stdout


def _qmp(name: str, command: str, **arguments: Any) -> Any:
    cmd: dict[str, Any] = {"execute": command}
    if arguments:
        cmd["arguments"] = arguments
    out = json.loads(_virsh("qemu-monitor-command", name, json.dumps(cmd)))
    assert "error" not in out, (command, out)
    return out["return"]


def _pmemsave(name: str, path: Path) -> Path:
    _qmp(name, "pmemsave", val=0, size=RAM, filename=str(path))
    return path


def _progress(serial: Path) -> int:
    return serial.read_bytes().count(b"P") if serial.exists() else 0


def _wait_progress(serial: Path, more: int, timeout: float = 60) -> None:
    """The guest writes ``more`` further passes (the serial file may restart at a restore)."""
    start = _progress(serial)
    deadline = time.monotonic() + timeout
    while True:
        now = _progress(serial)
        if now >= start + more or (now < start and now >= more):
            return
        assert time.monotonic() < deadline, "the libvirt guest made no progress"
        time.sleep(0.1)


def _cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*FIXEDRAM, *args], input=stdin, capture_output=True, check=False,
                          timeout=300)


def _one_error_line(p: subprocess.CompletedProcess[bytes], *words: str) -> str:
    err = p.stderr.decode()
    assert p.returncode == 1, p.stdout.decode() + err
    line, = err.strip().splitlines()
    assert line.startswith("fixedram: error: "), line
    for w in words:
        assert w in line, (w, line)
    return line


def _header(path: Path) -> LibvirtHeader | None:
    with open(path, "rb") as f:
        fd = f.fileno()
        return probe_libvirt(fd, os.fstat(fd).st_size, str(path), allow_compressed=True)


def _head(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory,
           guest_image_factory: Callable[..., Path]) -> Iterator[Domain]:
    p = subprocess.run(["bash", str(ROOT / "scripts" / "start-libvirt.sh")], capture_output=True,
                       text=True, check=False, timeout=600)
    if p.returncode != 0:
        pytest.fail(f"libvirt unavailable: {p.stderr.strip()}", pytrace=False)
    if shutil.which("zstd") is None:
        pytest.fail("zstd missing: libvirt cannot write zstd images "
                    "(scripts/install-qemu.sh installs it)", pytrace=False)
    d = tmp_path_factory.mktemp("libvirt-receive")
    os.chmod(d, 0o755)
    img = d / "disk.img"
    shutil.copyfile(guest_image_factory(None, FILL_WORDS), img)
    name = f"fixedram-rx-{uuid.uuid4().hex[:8]}"
    serial = d / "serial.txt"
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
    <serial type='file'><source path='{serial}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
""")
    _virsh("create", str(xml))
    try:
        _wait_progress(serial, 2, timeout=30)
        from_sav = d / "from.sav"
        _virsh("save", name, str(from_sav), "--image-format", "zstd")  # running: was_running 1
        yield Domain(d, name, img, from_sav, serial)
    finally:
        subprocess.run(["virsh", "-c", "qemu:///system", "destroy", name], capture_output=True,
                       check=False)


def _migrate_live(dom: Domain, uri: str, channels: int, timeout: float = 120) -> dict[str, Any]:
    """Live migration of the re-dirtying guest: throttled for two dirty syncs, then let go."""
    # A socket stream, never mapped-ram (libvirt sets capabilities for its own jobs only).
    _qmp(dom.name, "migrate-set-capabilities", capabilities=[
        {"capability": "mapped-ram", "state": False},
        {"capability": "multifd", "state": channels > 0}])
    params: dict[str, Any] = {"max-bandwidth": 48 * MIB, "downtime-limit": 1}
    if channels:
        params["multifd-channels"] = channels
    _qmp(dom.name, "migrate-set-parameters", **params)
    _qmp(dom.name, "migrate", uri=uri)
    deadline = time.monotonic() + timeout
    let_go = False
    while True:
        info = _qmp(dom.name, "query-migrate")
        status = info.get("status")
        if status == "completed":
            return dict(info)
        assert status not in ("failed", "cancelled"), info
        if not let_go and info.get("ram", {}).get("dirty-sync-count", 0) >= 2:
            _qmp(dom.name, "migrate-set-parameters", **{"max-bandwidth": 1 << 30,
                                                        "downtime-limit": 30_000})
            let_go = True
        assert time.monotonic() < deadline, f"migration too slow: {info}"
        time.sleep(0.1)


@pytest.mark.parametrize("channels", [0, 2], ids=["precopy", "multifd2"])
def test_receive_live_migration_as_libvirt_image(domain: Domain, tmp_path: Path,
                                                 channels: int) -> None:
    lv_in = _header(domain.from_sav)
    assert lv_in is not None and lv_in.complete and lv_in.format == "zstd" and lv_in.was_running
    out = tmp_path / "out.sav"
    sock = tmp_path / "mig.sock"
    rx = Receiver(f"unix:{sock}", out, "--libvirt-header", str(domain.from_sav))
    try:
        # The same domain again, started by libvirt from its own configuration: the source.
        _virsh("restore", str(domain.from_sav))
        try:
            _wait_progress(domain.serial, 2)
            stats = _migrate_live(domain, f"unix:{sock}", channels)
            src_pmem = _pmemsave(domain.name, tmp_path / "source.pmem")
        finally:
            _virsh("destroy", domain.name)
        rc, doc, err = rx.wait(timeout=120)
    finally:
        rx.kill()
    assert rc == 0 and doc is not None, err
    assert stats["ram"]["dirty-sync-count"] >= 2 and doc["passes"] >= 2, (stats, doc)
    assert doc["apparent_bytes"] == out.stat().st_size
    assert doc["multifd_channels"] == channels and (doc["multifd_packets"] > 0) == (channels > 0)

    # A sparse libvirt image: FROM.sav's XML, cookie, data_len and was_running, QEMU's
    # mapped-ram data from data_offset with absolute offsets (pages at 1 MiB multiples).
    with MigrationFile(out) as mf:
        lv = mf.libvirt
        assert lv is not None and lv.complete and lv.format == "sparse" and lv.version == 2
        assert (lv.xml_raw, lv.cookie, lv.data_len, lv.was_running) == \
            (lv_in.xml_raw, lv_in.cookie, lv_in.data_len, lv_in.was_running)
        assert mf.format == "mapped-ram" and mf.complete and mf.start == lv.data_offset
        m = mf.block("pc.ram").record.mapped
        assert m is not None and m.pages_offset % MIB == 0 and m.bitmap_offset > mf.start
        machine = mf.machine or ""
    # Byte for byte libvirt's header, XML, cookie and padding; only the format field differs.
    n = HEADER_SIZE + lv_in.data_len
    ours, theirs = _head(out, n), _head(domain.from_sav, n)
    assert ours[28:32] == (6).to_bytes(4, "little") and theirs[28:32] == (5).to_bytes(4, "little")
    assert ours[:28] + ours[32:] == theirs[:28] + theirs[32:]

    info = json.loads(_cli("inspect", "--json", str(out)).stdout)
    assert info["libvirt"]["image_format"] == "sparse" and info["libvirt"]["complete"]
    assert info["format"] == "mapped-ram" and info["stream_offset"] == lv.data_offset
    p = _cli("verify", str(out))
    assert p.returncode == 0, p.stdout.decode() + p.stderr.decode()
    assert _virsh("save-image-dumpxml", str(out)) == _virsh("save-image-dumpxml",
                                                            str(domain.from_sav))

    # virsh restore of OUT.sav: exactly the source's RAM after the migration.
    _virsh("restore", str(out), "--paused")
    try:
        got = _pmemsave(domain.name, tmp_path / "restored.pmem")
        before = _progress(domain.serial)
        _virsh("resume", domain.name)  # and the restored guest runs on
        _wait_progress(domain.serial, 2)
        assert _progress(domain.serial) != before
    finally:
        _virsh("destroy", domain.name)
    ref = src_pmem.read_bytes()
    ranges = ram_compare_ranges(RAM, machine)
    bad = diff_pages(ref, got.read_bytes(), ranges)
    assert not bad, f"{len(bad)} pages differ from the source, first at 0x{bad[0]:x}"
    # The known pattern, written by passes after FROM.sav was taken: the RAM came from the
    # migration, not from FROM.sav.
    params = read_params(domain.image.read_bytes()[:512])
    now = check_guest_pattern(np.frombuffer(ref, dtype=np.uint8), params)
    assert now.ok, now.errors
    phys = tmp_path / "from.phys"
    p = _cli("extract", str(domain.from_sav), "--format", "physical", "-o", str(phys))
    assert p.returncode == 0, p.stderr.decode()
    then = check_guest_pattern(np.memmap(phys, dtype=np.uint8, mode="r"), params)
    assert then.ok and now.min_pass > then.max_pass, (then, now)


def test_receive_libvirt_header_refusals(domain: Domain, tmp_path: Path) -> None:
    """A FROM.sav that is no libvirt image is refused at once; a migration cut short leaves
    nothing; a whole one from a pipe gives FROM.sav's RAM."""
    # FROM.sav's own QEMU stream, decompressed by fixedram send (as libvirt hands it to QEMU).
    sent = subprocess.run([*FIXEDRAM, "send", str(domain.from_sav), "-"], capture_output=True,
                          check=False, timeout=120)
    assert sent.returncode == 0, sent.stderr
    stream = sent.stdout
    out = tmp_path / "out.sav"
    plain = tmp_path / "plain.mig"
    plain.write_bytes(stream)
    for bad in (plain, tmp_path / "missing.sav"):
        p = _cli("receive", "-", "-o", str(out), "--libvirt-header", str(bad), stdin=stream)
        _one_error_line(p, str(bad))
        assert not out.exists()
    assert "not a libvirt save image" in _cli("receive", "-", "-o", str(out), "--libvirt-header",
                                              str(plain), stdin=b"").stderr.decode()
    # Cut short: no file, no temporary, under the output's name.
    p = _cli("receive", "-", "-o", str(out), "--libvirt-header", str(domain.from_sav),
             stdin=stream[:len(stream) // 2])
    _one_error_line(p, "disconnected", "no file was written")
    assert sorted(os.listdir(tmp_path)) == ["plain.mig"]
    # Whole: a sparse image with FROM.sav's header and RAM.
    p = _cli("receive", "-", "-o", str(out), "--libvirt-header", str(domain.from_sav), "--json",
             stdin=stream)
    assert p.returncode == 0, p.stderr.decode()
    with MigrationFile(out) as mf:
        assert mf.libvirt is not None and mf.libvirt.format == "sparse" and mf.complete
    p = _cli("verify", str(out), "--against", str(domain.from_sav))
    assert p.returncode == 0 and "RAM equal" in p.stdout.decode(), p.stdout.decode()
