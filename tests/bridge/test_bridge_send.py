"""``fixedram send`` into real QEMU 10 destinations, and receivers facing bad peers."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from bridge_helpers import FIXEDRAM, MIB, Receiver, assert_ram_equal, guest_continues

from qemu_harness import QemuVM, SavedFile

pytestmark = pytest.mark.qemu

RAM = 128 * MIB


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _incoming(tmp_path: Path, image: Path, machine: str, name: str) -> QemuVM:
    vm = QemuVM(tmp_path, image, machine=machine, memory=RAM, incoming=True, paused=True,
                name=name)
    return vm.launch()


@pytest.mark.parametrize("how", ["tcp", "exec"])
def test_send_mapped_ram_into_qemu(how: str, tmp_path: Path, saved_file: Callable[..., SavedFile],
                                   guest_image: Path) -> None:
    sf = saved_file(machine="pc", mode="mapped-ram", live=True)
    with _incoming(tmp_path, guest_image, sf.machine, f"dst-{how}") as dst:
        # The destination keeps mapped-ram off: it receives a plain stream.
        if how == "tcp":
            port = _free_port()
            dst.migrate_incoming(f"tcp:127.0.0.1:{port}", wait=False)
            p = subprocess.run([*FIXEDRAM, "send", str(sf.path), f"tcp:127.0.0.1:{port}",
                                "--json"], capture_output=True, check=False, timeout=60)
            assert p.returncode == 0, p.stderr
        else:
            cmd = " ".join(shlex.quote(a) for a in [*FIXEDRAM, "send", str(sf.path), "-"])
            dst.migrate_incoming(f"exec:{cmd}", wait=False)
        dst.wait_migration(60)
        assert_ram_equal(dst, sf.pmem_path, RAM, sf.machine)
        guest_continues(dst)


def test_send_multifd_into_qemu(tmp_path: Path, saved_file: Callable[..., SavedFile],
                                guest_image: Path) -> None:
    """Socket multifd as QEMU 10 sends it: a destination with multifd on
    loads a live mapped-ram save sent on 4 tcp channels, then on 2 unix ones."""
    sf = saved_file(machine="pc", mode="mapped-ram", live=True)
    for how, n in (("tcp", 4), ("unix", 2)):
        with _incoming(tmp_path, guest_image, sf.machine, f"dst-mfd-{how}") as dst:
            dst.set_caps(multifd=True)
            dst.set_params(multifd_channels=n)
            uri = (f"tcp:127.0.0.1:{_free_port()}" if how == "tcp"
                   else f"unix:{tmp_path / 'mfd.sock'}")
            dst.migrate_incoming(uri, wait=False)
            p = subprocess.run([*FIXEDRAM, "send", str(sf.path), uri, "--multifd-channels",
                                str(n), "--json"], capture_output=True, check=False, timeout=60)
            assert p.returncode == 0, p.stderr.decode() + dst.log_text()
            doc = json.loads(p.stdout)
            assert doc["multifd_channels"] == n and doc["multifd_packets"] > 3 * n
            dst.wait_migration(60)
            assert_ram_equal(dst, sf.pmem_path, RAM, sf.machine)
            guest_continues(dst)


def test_send_refuses_bad_destination(tmp_path: Path) -> None:
    p = subprocess.run([*FIXEDRAM, "send", "/nonexistent.mig", "file:/x"], capture_output=True,
                       text=True, check=False)
    assert p.returncode == 1 and p.stderr.count("\n") == 1


def test_source_killed_mid_stream(tmp_path: Path, vm_factory: Callable[..., Any]) -> None:
    out = tmp_path / "cut.mig"
    rx = Receiver("tcp::0", out)
    try:
        src = vm_factory("pc")
        src.wait_for_progress(2, timeout=30)
        src.set_params(max_bandwidth=32 * MIB, downtime_limit=1)
        src.qmp("migrate", uri=rx.address)
        while src.query_migrate().get("ram", {}).get("transferred", 0) < 40 * MIB:
            time.sleep(0.05)
        assert src.proc is not None
        os.kill(src.proc.pid, signal.SIGKILL)
        rc, _doc, err = rx.wait()
    finally:
        rx.kill()
    assert rc == 1
    assert "disconnected before the end of the migration stream" in err, err
    assert err.strip().count("\n") == 0  # one error line ("listening on" was read)
    assert not out.exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".cut.mig")]


# Not a migration: dropped, then no migration within --accept-timeout (1: could not);
# a migration stream whose bytes are malformed (2: a malformed save).
@pytest.mark.parametrize(("payload", "status"), [(b"GET / HTTP/1.0\r\n\r\n" * 100, 1),
                                               (b"QEVM\x00\x00\x00\x03\x07"
                                                + os.urandom(5000), 2)])
def test_garbage_peer(tmp_path: Path, payload: bytes, status: int) -> None:
    out = tmp_path / "g.mig"
    # A peer that does not start like QEMU is dropped and the receiver keeps listening
    # (tests/bridge/test_receive_peers.py); --accept-timeout ends the wait here.
    rx = Receiver("tcp::0", out, "--accept-timeout", "3")
    try:
        host, port = rx.address[4:].rsplit(":", 1)
        with socket.create_connection((host, int(port))) as s:
            s.sendall(payload)
        rc, _doc, err = rx.wait(30)
    finally:
        rx.kill()
    assert rc == status, err
    assert "error:" in err and "Traceback" not in err
    assert not out.exists()
    assert os.listdir(tmp_path) == []
