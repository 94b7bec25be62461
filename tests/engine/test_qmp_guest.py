"""``fixedram guest --qmp`` driven by qemu.qmp's QMPClient, as QEMU is driven."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

# The console script (``python -m fixedram.cli.main`` would not load subcommands).
FIXEDRAM = os.path.join(os.path.dirname(sys.executable), "fixedram")


class Guest:
    """One ``fixedram guest`` process and a connected QMP client."""

    def __init__(self, tmp: Path, name: str, *args: str) -> None:
        self.sock = str(tmp / f"{name}.qmp")
        self.proc = subprocess.Popen([FIXEDRAM, "guest",
                                      "--qmp", self.sock, *args],
                                     stderr=subprocess.PIPE, text=True)
        self.loop = asyncio.new_event_loop()
        self.qmp = QMPClient(name)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.sock):
            assert self.proc.poll() is None, self.proc.stderr.read()  # type: ignore[union-attr]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        self.loop.run_until_complete(self.qmp.connect(self.sock))
        self.events: list[dict[str, Any]] = []

    def __call__(self, cmd: str, **args: Any) -> Any:
        return self.loop.run_until_complete(self.qmp.execute(cmd, args or None))

    def wait_migration(self, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            q = self("query-migrate")
            if q.get("status") in ("completed", "failed", "cancelled"):
                return q
            time.sleep(0.05)
        raise AssertionError(f"migration did not finish: {q}")

    def drain_events(self) -> list[dict[str, Any]]:
        async def get() -> list[dict[str, Any]]:
            out = []
            while not self.qmp.events.empty():
                out.append(dict(await self.qmp.events.get()))
            return out
        self.events += self.loop.run_until_complete(get())
        return self.events

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self("quit")
        with contextlib.suppress(Exception):
            self.loop.run_until_complete(self.qmp.disconnect())
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.loop.close()


@pytest.fixture
def guests(tmp_path: Path) -> Iterator[Any]:
    made: list[Guest] = []

    def make(name: str, *args: str) -> Guest:
        g = Guest(tmp_path, name, *args)
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()


def test_qmp_save_and_incoming(guests, tmp_path: Path) -> None:
    src = guests("src", "--ram", "16M", "--workload-rate", "32M")
    assert src("query-status") == {"status": "running", "running": True}
    src("migrate-set-capabilities", capabilities=[
        {"capability": "mapped-ram", "state": True}, {"capability": "multifd", "state": True},
        {"capability": "events", "state": True}])
    src("migrate-set-parameters", **{"multifd-channels": 4, "downtime-limit": 1000})
    caps = {c["capability"]: c["state"] for c in src("query-migrate-capabilities")}
    assert caps["mapped-ram"] and caps["multifd"]
    assert src("query-migrate-parameters")["multifd-channels"] == 4
    assert src("query-migrate") == {}
    with pytest.raises(ExecuteError, match="seekable transport"):
        src("migrate", uri="tcp:127.0.0.1:1")
    path = tmp_path / "vm.mig"
    src("migrate", uri=f"file:{path}")
    q = src.wait_migration()
    assert q["status"] == "completed", q
    for k in ("total-time", "downtime", "setup-time"):
        assert isinstance(q[k], int)
    assert q["ram"]["dirty-sync-count"] >= 1
    assert src("query-status")["status"] == "postmigrate"
    statuses = [e["data"]["status"] for e in src.drain_events() if e["event"] == "MIGRATION"]
    assert statuses == ["setup", "active", "device", "completed"]
    digest = src("x-query-ram-digest")

    dst = guests("dst", "--ram", "16M", "--incoming", "defer")
    assert dst("query-status")["status"] == "inmigrate"
    # Destination without mapped-ram refuses the file with QEMU's message
    # (and, with exit-on-error off, stays up to say so).
    dst("migrate-incoming", uri=f"file:{path}", **{"exit-on-error": False})
    q = dst.wait_migration()
    assert q == {"status": "failed",
                 "error-desc": "Capability mapped-ram is off, but received capability is on"}
    assert dst("query-status")["status"] == "inmigrate"

    dst2 = guests("dst2", "--ram", "16M", "--incoming", "defer")
    dst2("migrate-set-capabilities", capabilities=[
        {"capability": "mapped-ram", "state": True}, {"capability": "multifd", "state": True}])
    dst2("migrate-incoming", uri=f"file:{path}")
    assert dst2.wait_migration()["status"] == "completed"
    assert dst2("x-query-ram-digest") == digest
    assert dst2("query-status")["running"]


def test_qmp_cancel_and_errors(guests, tmp_path: Path) -> None:
    g = guests("c", "--ram", "32M", "--workload-rate", "64M")
    with pytest.raises(ExecuteError, match="'-incoming' was not specified"):
        g("migrate-incoming", uri="tcp:127.0.0.1:1")
    g("migrate-set-parameters", **{"max-bandwidth": 8 << 20})
    path = tmp_path / "c.mig"
    g("migrate", uri=f"file:{path}")
    time.sleep(0.3)
    assert g("query-migrate")["status"] == "active"
    with pytest.raises(ExecuteError, match="There's a migration process in progress"):
        g("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
    with pytest.raises(ExecuteError, match="There's a migration process in progress"):
        g("migrate", uri=f"file:{path}.2")
    g("migrate_cancel")
    assert g.wait_migration()["status"] == "cancelled"
    assert g("query-status") == {"status": "running", "running": True}
    assert not path.exists() and os.listdir(tmp_path) == ["c.qmp"]
    g("stop")
    assert g("query-status")["status"] == "paused"
    g("cont")
    assert g("query-status")["running"]
    with pytest.raises(ExecuteError, match="The command nope has not been found"):
        g("nope")


def test_qmp_tcp_between_two_guests(guests) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dst = guests("d", "--ram", "8M", "--incoming", f"tcp:127.0.0.1:{port}")
    src = guests("s", "--ram", "8M", "--workload-rate", "16M")
    src("migrate", uri=f"tcp:127.0.0.1:{port}")
    assert src.wait_migration()["status"] == "completed"
    assert dst.wait_migration()["status"] == "completed"
    assert dst("x-query-ram-digest") == src("x-query-ram-digest")


def test_cli_demo_json_small(tmp_path: Path) -> None:
    r = subprocess.run([FIXEDRAM, "demo", "--json",
                        "--ram", "16M", "--workload-rate", "96M", "--max-bandwidth", "32M",
                        "--max-passes", "4", "--dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ram_bytes"] == 16 << 20
    modes = [x["mode"] for x in out["runs"]]
    assert modes == ["stream", "fixed-ram"]
    for run in out["runs"]:
        for k in ("apparent_bytes", "allocated_bytes", "passes", "total_time_s",
                  "downtime_ms", "transferred_bytes"):
            assert isinstance(run[k], (int, float))
        assert run["verified"] is True
    st, fr = out["runs"]
    assert st["apparent_bytes"] > 2 * out["ram_bytes"]
    assert fr["apparent_bytes"] <= out["ram_bytes"] + (256 << 10) + 2 * (1 << 20) + 1024
    assert os.listdir(tmp_path) == []


def test_cli_save_restore(tmp_path: Path) -> None:
    f = tmp_path / "s.mig"
    cmd = [FIXEDRAM]
    r = subprocess.run([*cmd, "save", str(f), "--ram", "8M", "--fixed-ram", "--multifd", "2",
                        "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    saved = json.loads(r.stdout)
    r = subprocess.run([*cmd, "restore", str(f), "--multifd", "2", "--json", "--checksum"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ram_digest"] == saved["ram_digest"]
    r = subprocess.run([*cmd, "save", "tcp:127.0.0.1:1", "--fixed-ram"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.strip() == ("fixedram: error: Migration requires seekable transport "
                                "(e.g. file)")
