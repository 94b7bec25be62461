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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bridge_helpers import FIXEDRAM, MIB, Receiver
from libvirt_helpers import (
    assert_same_ram,
    cli,
    libvirt_header,
    one_error_line,
    pmemsave,
    progress,
    qmp,
    running_domain,
    virsh,
    wait_progress,
)

from fixedram.format.libvirt import HEADER_SIZE
from fixedram.format.migfile import MigrationFile
from qemu_harness import check_guest_pattern, read_params

pytestmark = pytest.mark.qemu

FILL_WORDS = 256  # 1 KiB of the known pattern per page and pass


@dataclass
class Domain:
    dir: Path
    name: str
    image: Path  # the guest's boot disk (its pattern parameters)
    from_sav: Path  # libvirt's own zstd save of the running guest
    serial: Path


def _head(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


@pytest.fixture(scope="module")
def domain(tmp_path_factory: pytest.TempPathFactory,
           guest_image_factory: Callable[..., Path]) -> Iterator[Domain]:
    if shutil.which("zstd") is None:
        pytest.fail("zstd missing: libvirt cannot write zstd images "
                    "(scripts/install-qemu.sh installs it)", pytrace=False)
    guest = guest_image_factory(None, FILL_WORDS)
    with running_domain(tmp_path_factory, "libvirt-receive", guest, "fixedram-rx") as dom:
        wait_progress(dom.serial, 2, timeout=30)
        from_sav = dom.dir / "from.sav"
        virsh("save", dom.name, str(from_sav), "--image-format", "zstd")  # running: was_running 1
        yield Domain(dom.dir, dom.name, dom.disk, from_sav, dom.serial)


def _migrate_live(dom: Domain, uri: str, channels: int, timeout: float = 120) -> dict[str, Any]:
    """Live migration of the re-dirtying guest: throttled for two dirty syncs, then let go."""
    # A socket stream, never mapped-ram (libvirt sets capabilities for its own jobs only).
    qmp(dom.name, "migrate-set-capabilities", capabilities=[
        {"capability": "mapped-ram", "state": False},
        {"capability": "multifd", "state": channels > 0}])
    params: dict[str, Any] = {"max-bandwidth": 48 * MIB, "downtime-limit": 1}
    if channels:
        params["multifd-channels"] = channels
    qmp(dom.name, "migrate-set-parameters", **params)
    qmp(dom.name, "migrate", uri=uri)
    deadline = time.monotonic() + timeout
    let_go = False
    while True:
        info = qmp(dom.name, "query-migrate")
        status = info.get("status")
        if status == "completed":
            return dict(info)
        assert status not in ("failed", "cancelled"), info
        if not let_go and info.get("ram", {}).get("dirty-sync-count", 0) >= 2:
            qmp(dom.name, "migrate-set-parameters", **{"max-bandwidth": 1 << 30,
                                                        "downtime-limit": 30_000})
            let_go = True
        assert time.monotonic() < deadline, f"migration too slow: {info}"
        time.sleep(0.1)


@pytest.mark.parametrize("channels", [0, 2], ids=["precopy", "multifd2"])
def test_receive_live_migration_as_libvirt_image(domain: Domain, tmp_path: Path,
                                                 channels: int) -> None:
    lv_in = libvirt_header(domain.from_sav)
    assert lv_in is not None and lv_in.complete and lv_in.format == "zstd" and lv_in.was_running
    out = tmp_path / "out.sav"
    sock = tmp_path / "mig.sock"
    rx = Receiver(f"unix:{sock}", out, "--libvirt-header", str(domain.from_sav))
    try:
        # The same domain again, started by libvirt from its own configuration: the source.
        virsh("restore", str(domain.from_sav))
        try:
            wait_progress(domain.serial, 2)
            stats = _migrate_live(domain, f"unix:{sock}", channels)
            src_pmem = pmemsave(domain.name, tmp_path / "source.pmem")
        finally:
            virsh("destroy", domain.name)
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

    info = json.loads(cli("inspect", "--json", str(out)).stdout)
    assert info["libvirt"]["image_format"] == "sparse" and info["libvirt"]["complete"]
    assert info["format"] == "mapped-ram" and info["stream_offset"] == lv.data_offset
    p = cli("verify", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    assert virsh("save-image-dumpxml", str(out)) == virsh("save-image-dumpxml",
                                                          str(domain.from_sav))

    # virsh restore of OUT.sav: exactly the source's RAM after the migration.
    virsh("restore", str(out), "--paused")
    try:
        got = pmemsave(domain.name, tmp_path / "restored.pmem")
        before = progress(domain.serial)
        virsh("resume", domain.name)  # and the restored guest runs on
        wait_progress(domain.serial, 2)
        assert progress(domain.serial) != before
    finally:
        virsh("destroy", domain.name)
    assert_same_ram(src_pmem, got, machine)
    # The known pattern, written by passes after FROM.sav was taken: the RAM came from the
    # migration, not from FROM.sav.
    params = read_params(domain.image.read_bytes()[:512])
    now = check_guest_pattern(np.frombuffer(src_pmem.read_bytes(), dtype=np.uint8), params)
    assert now.ok, now.errors
    phys = tmp_path / "from.phys"
    p = cli("extract", str(domain.from_sav), "--format", "physical", "-o", str(phys))
    assert p.returncode == 0, p.stderr
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
    # A save that is no libvirt image is malformed as one (2); a missing one unreadable (1).
    for bad, status in ((plain, 2), (tmp_path / "missing.sav", 1)):
        p = cli("receive", "-", "-o", str(out), "--libvirt-header", str(bad), stdin=stream)
        one_error_line(p, str(bad), status=status)
        assert not out.exists()
    assert "not a libvirt save image" in cli("receive", "-", "-o", str(out), "--libvirt-header",
                                             str(plain), stdin=b"").stderr
    # Cut short: no file, no temporary, under the output's name.
    p = cli("receive", "-", "-o", str(out), "--libvirt-header", str(domain.from_sav),
            stdin=stream[:len(stream) // 2])
    one_error_line(p, "disconnected", "no file was written")
    assert sorted(os.listdir(tmp_path)) == ["plain.mig"]
    # Whole: a sparse image with FROM.sav's header and RAM.
    p = cli("receive", "-", "-o", str(out), "--libvirt-header", str(domain.from_sav), "--json",
            stdin=stream)
    assert p.returncode == 0, p.stderr
    with MigrationFile(out) as mf:
        assert mf.libvirt is not None and mf.libvirt.format == "sparse" and mf.complete
    p = cli("verify", str(out), "--against", str(domain.from_sav))
    assert p.returncode == 0 and "RAM equal" in p.stdout, p.stdout
