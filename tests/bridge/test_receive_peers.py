"""``fixedram receive`` with hostile peers on its address, then a real QEMU 10 source.

Connections that send garbage, half a magic, or nothing at all are closed
(each with one line on stderr) and the receiver keeps listening; the real
migration that follows, also with multifd and with garbage arriving while it
runs, completes as if they had never been there.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from bridge_helpers import FIXEDRAM, MIB, Receiver, connect_to

from fixedram.format.migfile import MigrationFile

RAM = 64 * MIB


def _hostile(address: str) -> list[socket.socket]:
    socks = []
    g = connect_to(address)
    g.sendall(b"GARBAGE AND MORE")
    socks.append(g)
    socks.append(connect_to(address))  # idle: never sends a byte
    half = connect_to(address)
    half.sendall(b"QE")  # the start of the magic, then silence
    socks.append(half)
    closed = connect_to(address)
    closed.close()  # connects and goes away
    http = connect_to(address)
    http.sendall(b"GET / HTTP/1.0\r\n\r\n")
    socks.append(http)
    return socks


def _check(out: Path, rc: int, doc: dict[str, Any] | None, err: str) -> None:
    assert rc == 0, err
    assert doc is not None and doc["ram_bytes"] >= RAM
    assert "Traceback" not in err
    with MigrationFile(out) as mf:
        assert mf.complete and mf.format == "mapped-ram"
        assert mf.block("pc.ram").used_length == RAM


@pytest.mark.qemu
@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_garbage_and_idle_peers_then_qemu(transport: str, tmp_path: Path,
                                          vm_factory: Callable[..., Any]) -> None:
    out = tmp_path / "vm.mig"
    uri = "tcp::0" if transport == "tcp" else f"unix:{tmp_path / 'rx.sock'}"
    rx = Receiver(uri, out, "--peer-timeout", "2")
    socks: list[socket.socket] = []
    try:
        socks = _hostile(rx.address)
        time.sleep(3)  # past the peer timeout: the idle ones are gone, the receiver is not
        assert rx.proc.poll() is None
        socks += _hostile(rx.address)  # and some that are still pending when QEMU comes
        src = vm_factory("pc", memory=RAM)
        src.stop()
        src.migrate(rx.address)
        rc, doc, err = rx.wait()
    finally:
        rx.kill()
        for s in socks:
            s.close()
    _check(out, rc, doc, err)
    assert "GARB" in err and "sent nothing" in err
    assert all(line.startswith("fixedram: closed a connection from ")
               for line in err.strip().splitlines() if "closed" in line)


@pytest.mark.qemu
def test_multifd_with_garbage_during_the_migration(tmp_path: Path,
                                                   vm_factory: Callable[..., Any]) -> None:
    out = tmp_path / "vm.mig"
    rx = Receiver("tcp::0", out, "--peer-timeout", "2")
    socks: list[socket.socket] = []
    try:
        socks = _hostile(rx.address)
        src = vm_factory("q35", memory=RAM)
        src.stop()
        src.set_caps(multifd=True)
        src.set_params(multifd_channels=3)
        src.migrate(rx.address, wait=False)
        socks += _hostile(rx.address)  # while the channels connect and pages flow
        stats = src.wait_migration(60)
        assert stats["status"] == "completed", stats
        rc, doc, err = rx.wait()
    finally:
        rx.kill()
        for s in socks:
            s.close()
    _check(out, rc, doc, err)
    assert doc is not None and doc["multifd_channels"] == 3


def test_accept_timeout(tmp_path: Path) -> None:
    out = tmp_path / "vm.mig"
    t = time.monotonic()
    rx = Receiver(f"unix:{tmp_path / 'rx.sock'}", out, "--accept-timeout", "3",
                  "--peer-timeout", "1")
    socks = _hostile(rx.address)
    try:
        rc, doc, err = rx.wait(30)
    finally:
        rx.kill()
        for s in socks:
            s.close()
    assert rc == 1 and doc is None
    assert 3 <= time.monotonic() - t < 20
    assert "no QEMU migration source connected" in err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nor the unix socket


def test_default_keeps_listening(tmp_path: Path) -> None:
    """Without --accept-timeout, as QEMU's -incoming: no time limit."""
    rx = Receiver(f"unix:{tmp_path / 'rx.sock'}", tmp_path / "vm.mig", "--peer-timeout", "1")
    try:
        socks = _hostile(rx.address)
        time.sleep(2.5)
        assert rx.proc.poll() is None
        # Still accepting: a real stream (the built-in guest's) gets through.
        r = subprocess.run([*FIXEDRAM, "save", rx.address, "--ram", "16M"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        rc, doc, err = rx.wait(30)
        for s in socks:
            s.close()
    finally:
        rx.kill()
    assert rc == 0, err
    assert doc is not None and doc["ram_bytes"] >= 16 * MIB


def test_connection_flood_is_bounded(tmp_path: Path) -> None:
    rx = Receiver(f"unix:{tmp_path / 'rx.sock'}", tmp_path / "vm.mig", "--peer-timeout", "5")
    socks = []
    try:
        socks = [connect_to(rx.address) for _ in range(200)]  # more than are kept waiting
        r = subprocess.run([*FIXEDRAM, "save", rx.address, "--ram", "16M"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        rc, _doc, err = rx.wait(30)
    finally:
        rx.kill()
        for s in socks:
            s.close()
    assert rc == 0, err
    assert "too many connections waiting" in err
