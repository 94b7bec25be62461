"""Optional cross-version test: Debian 12's QEMU 7.2 as the live source, ``fixedram receive``
in between, QEMU 10 loading the mapped-ram result with the same machine type.

QEMU 7.2 is unpacked (not installed) by ``scripts/install-qemu72.sh`` under build/qemu72;
this one test skips when it is absent, because the cross-version check is optional.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from bridge_helpers import MIB, Receiver, assert_bounded, assert_ram_equal, guest_continues
from bridge_helpers import migrate_live as _migrate_live

import qemu_harness.vm as hvm
from qemu_harness import QemuVM

pytestmark = pytest.mark.qemu

ROOT = Path(__file__).resolve().parents[2]
QEMU72 = Path(os.environ.get("FIXEDRAM_QEMU72_DIR", ROOT / "build" / "qemu72")) / "root" / \
    "usr" / "bin" / "qemu-system-x86_64"
RAM = 128 * MIB
MACHINE = "pc-i440fx-7.2"


@pytest.fixture
def qemu72_vm(tmp_path: Path, guest_image: Path) -> Iterator[QemuVM]:
    if not QEMU72.exists():
        pytest.skip("QEMU 7.2 not unpacked (run scripts/install-qemu72.sh)")
    old = hvm.QEMU_BINARY
    hvm.QEMU_BINARY = str(QEMU72)
    # Debian builds TCG as a loadable module; point 7.2 at its own.
    mods = QEMU72.parents[1] / "lib" / "x86_64-linux-gnu" / "qemu"
    os.environ["QEMU_MODULE_DIR"] = str(mods)
    try:
        # 7.2's data package links its BIOS to a seabios package: use the system firmware.
        vm = QemuVM(tmp_path, guest_image, machine=MACHINE, memory=RAM, name="src72",
                    extra_args=["-L", "/usr/share/qemu", "-L", "/usr/share/seabios"])
        vm.launch()
    finally:
        hvm.QEMU_BINARY = old
        del os.environ["QEMU_MODULE_DIR"]
    try:
        yield vm
    finally:
        vm.shutdown()


def test_receive_from_qemu72(qemu72_vm: QemuVM, tmp_path: Path,
                             loaded_vm: Callable[..., Any]) -> None:
    out = tmp_path / "from72.mig"
    rx = Receiver("tcp::0", out)
    try:
        res = _migrate_live(qemu72_vm, rx.address, min_transferred=3 * RAM + 16 * MIB)
        rc, doc, err = rx.wait()
    finally:
        rx.kill()
    assert rc == 0, err
    assert doc is not None and doc["machine"] == MACHINE
    assert res.stats["ram"]["transferred"] > 3 * RAM and doc["passes"] >= 3
    assert_bounded(out, RAM)
    dst = loaded_vm(out, MACHINE, {"mapped-ram": True})
    assert_ram_equal(dst, res.pmem, RAM, MACHINE)
    guest_continues(dst)
