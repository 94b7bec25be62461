"""``fixedram receive`` behind real QEMU 10 live migrations (tcp, unix, exec:, multifd)."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from bridge_helpers import (
    FIXEDRAM,
    MIB,
    Receiver,
    assert_bounded,
    assert_ram_equal,
    guest_continues,
    migrate_live,
)

from fixedram.format.migfile import MigrationFile

pytestmark = pytest.mark.qemu

RAM = 128 * MIB


def _check_result(out: Path, doc: dict[str, Any], stats: dict[str, Any], pmem: Path,
                  machine: str, loaded_vm: Callable[..., Any]) -> None:
    # Many passes: QEMU sent more than 3x RAM, and pages were rewritten in place.
    assert stats["ram"]["transferred"] > 3 * RAM, stats["ram"]
    assert doc["passes"] >= 3 and doc["pages_rewritten"] > 0
    assert doc["bytes_received"] > 3 * RAM
    assert_bounded(out, RAM)
    assert doc["apparent_bytes"] == out.stat().st_size
    assert doc["allocated_bytes"] < doc["apparent_bytes"]
    dst = loaded_vm(out, machine, {"mapped-ram": True})
    assert_ram_equal(dst, pmem, RAM, machine)
    guest_continues(dst)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_receive_live(transport: str, tmp_path: Path, vm_factory: Callable[..., Any],
                      loaded_vm: Callable[..., Any]) -> None:
    out = tmp_path / "live.mig"
    uri = "tcp::0" if transport == "tcp" else f"unix:{tmp_path / 'mig.sock'}"
    rx = Receiver(uri, out)
    try:
        if transport == "tcp":
            assert rx.address.startswith("tcp:127.0.0.1:")  # loopback by default
        src = vm_factory("pc")
        res = migrate_live(src, rx.address, min_transferred=3 * RAM + 16 * MIB)
        rc, doc, err = rx.wait()
    finally:
        rx.kill()
    assert rc == 0, err
    assert doc is not None
    _check_result(out, doc, res.stats, res.pmem, res.machine, loaded_vm)


@pytest.mark.parametrize("told", [False, True], ids=["detected", "told"])
def test_receive_multifd(told: bool, tmp_path: Path, vm_factory: Callable[..., Any],
                         loaded_vm: Callable[..., Any]) -> None:
    """Channels counted at the first SYNC, or given with ``--multifd-channels``."""
    out = tmp_path / "mfd.mig"
    rx = Receiver("tcp:127.0.0.1:0", out, *(["--multifd-channels", "4"] if told else []))
    try:
        src = vm_factory("q35")
        res = migrate_live(src, rx.address, min_transferred=3 * RAM + 16 * MIB,
                           caps={"multifd": True}, params={"multifd_channels": 4})
        rc, doc, err = rx.wait()
    finally:
        rx.kill()
    assert rc == 0, err
    assert doc is not None
    assert doc["multifd_channels"] == 4 and doc["multifd_packets"] > 0
    assert all(b > RAM // 8 for b in doc["channel_bytes"]), doc["channel_bytes"]
    _check_result(out, doc, res.stats, res.pmem, res.machine, loaded_vm)


def test_receive_exec(tmp_path: Path, vm_factory: Callable[..., Any],
                      loaded_vm: Callable[..., Any]) -> None:
    out = tmp_path / "exec.mig"
    js = tmp_path / "summary.json"
    cmd = " ".join(shlex.quote(a) for a in [*FIXEDRAM, "receive", "-", "-o", str(out), "--json"])
    src = vm_factory("pc")
    res = migrate_live(src, f"exec:{cmd} > {shlex.quote(str(js))}",
                       min_transferred=3 * RAM + 16 * MIB)
    import json

    doc = json.loads(js.read_text())
    _check_result(out, doc, res.stats, res.pmem, res.machine, loaded_vm)


def test_receive_output_exists(tmp_path: Path) -> None:
    out = tmp_path / "x.mig"
    out.write_bytes(b"keep")
    import subprocess

    p = subprocess.run([*FIXEDRAM, "receive", "-", "-o", str(out)], input=b"",
                       capture_output=True, check=False)
    assert p.returncode == 1 and b"already exists" in p.stderr
    assert out.read_bytes() == b"keep"
    assert sys.executable  # keep the import used
    with pytest.raises(Exception):  # noqa: B017 - any FormatError: not a migration file
        MigrationFile(out)
