"""One script written for ``qemu-system-x86_64 -qmp`` drives ``fixedram guest`` unchanged.

The script (also shown in docs/qmp.md) saves a VM the way libvirt saves one:
capabilities and parameters, a descriptor passed with SCM_RIGHTS into an fd
set, ``migrate file:/dev/fdset/N``, waiting for the MIGRATION event, then
what a second save and ``cont`` answer. It runs, as it is, against a real
QEMU 10 and against fixedram; the transcripts are equal and both files are
complete mapped-ram saves.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient
from qmp_table_harness import FIXEDRAM

from fixedram.format.migfile import MigrationFile


async def save(sock: str, path: str) -> list[Any]:
    """The script: save the VM behind ``sock`` to ``path``; returns a transcript."""
    out: list[Any] = []
    qmp = QMPClient("save")
    await qmp.connect(sock)
    try:
        out.append(await qmp.execute("query-status"))
        await qmp.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": c, "state": True} for c in ("events", "mapped-ram", "multifd")]})
        await qmp.execute("migrate-set-parameters", {"multifd-channels": 2, "tls-creds": ""})
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        qmp.send_fd_scm(fd)
        os.close(fd)
        fdset = (await qmp.execute("add-fd", {"opaque": "save"}))["fdset-id"]
        await qmp.execute("migrate", {"uri": f"file:/dev/fdset/{fdset}"})
        async for ev in qmp.events:
            if ev["event"] == "MIGRATION":
                out.append(ev["data"]["status"])
                if ev["data"]["status"] in ("completed", "failed"):
                    break
        info = await qmp.execute("query-migrate")
        out.append((info["status"], info["ram"]["dirty-sync-count"]))
        # QEMU emits "completed" before its migration thread leaves finish-migrate
        # (a busy host can see the gap): wait for the run state to settle, as libvirt does.
        for _ in range(200):
            st = await qmp.execute("query-status")
            if st["status"] != "finish-migrate":
                break
            await asyncio.sleep(0.05)
        out.append(st)
        try:
            await qmp.execute("migrate", {"uri": f"file:/dev/fdset/{fdset}"})
        except ExecuteError as e:
            out.append(e.error.error.desc)
        await qmp.execute("remove-fd", {"fdset-id": fdset})
        await qmp.execute("cont")
        out.append(await qmp.execute("query-status"))
        hmp = await qmp.execute("human-monitor-command", {"command-line": "info status"})
        out.append(hmp)
    finally:
        await qmp.disconnect()
    return out


def _start(cmd: list[str], sock: Path) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert p.poll() is None and time.monotonic() < deadline, cmd
        time.sleep(0.05)
    return p


@pytest.mark.qemu
def test_one_script_drives_qemu_and_fixedram(qemu: str, tmp_path: Path) -> None:
    vms = {
        "qemu": [qemu, "-machine", "q35", "-nodefaults", "-m", "64M", "-S", "-display", "none",
                 "-qmp", f"unix:{tmp_path / 'qemu.sock'},server=on,wait=off"],
        "fixedram": [FIXEDRAM, "guest", "--ram", "64M", "-S", "--qmp",
                     str(tmp_path / "fixedram.sock")],
    }
    transcripts = {}
    for name, cmd in vms.items():
        sock = tmp_path / f"{name}.sock"
        proc = _start(cmd, sock)
        try:
            transcripts[name] = asyncio.run(save(str(sock), str(tmp_path / f"{name}.mig")))
        finally:
            proc.kill()
            proc.wait()
        with MigrationFile(tmp_path / f"{name}.mig") as mf:
            assert mf.format == "mapped-ram" and mf.complete
            assert mf.block("pc.ram").used_length == 64 << 20
    assert transcripts["fixedram"] == transcripts["qemu"]
    assert transcripts["qemu"] == [
        {"status": "prelaunch", "running": False},
        "setup", "active", "device", "completed",
        ("completed", 2),
        {"status": "postmigrate", "running": False},
        "Can't migrate the vm that was paused due to previous migration",
        {"status": "running", "running": True},
        "VM status: running\r\n",
    ]
