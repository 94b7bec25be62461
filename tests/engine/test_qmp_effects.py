"""What the QMP settings do on the built-in guest (fixedram only; the answers
themselves are compared with QEMU in test_qmp_table.py).

Saves through descriptors passed over the socket load back exactly; the
return path reports a destination's failure to its source; auto-converge
throttles the vCPU threads; live parameter changes apply at once; what the
built-in guest cannot honour is refused at ``migrate`` with a message that
says so; exit-on-error ends the process.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from qmp_table_harness import FIXEDRAM, Peer

from fixedram.format.migfile import MigrationFile


def guest(tmp: Path, name: str, *args: str) -> Peer:
    d = tmp / name
    d.mkdir(exist_ok=True)
    sock = str(d / "qmp.sock")
    p = Peer(name, [FIXEDRAM, "guest", "--qmp", sock, *args], sock)
    p.start()
    p.connect()
    return p


@pytest.fixture
def guests(tmp_path: Path) -> Any:
    made: list[Peer] = []

    def make(name: str, *args: str) -> Peer:
        p = guest(tmp_path, name, *args)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def ok(p: Peer, cmd: str, fds: list[int] | None = None, **args: Any) -> Any:
    msg: dict[str, Any] = {"execute": cmd}
    if args:
        msg["arguments"] = args
    r = p.ask(msg, fds)
    assert "return" in r, (cmd, args, r)
    return r["return"]


def err(p: Peer, cmd: str, **args: Any) -> str:
    r = p.ask({"execute": cmd, "arguments": args})
    assert "error" in r, (cmd, args, r)
    return r["error"]["desc"]


def wait(p: Peer, states: tuple[str, ...] = ("completed", "failed", "cancelled"),
         timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        q = ok(p, "query-migrate")
        if q.get("status") in states:
            return q
        assert time.monotonic() < deadline, q
        time.sleep(0.05)


def send_fd(p: Peer, cmd: str, path: str, flags: int, **args: Any) -> Any:
    fd = os.open(path, flags, 0o600)
    try:
        return ok(p, cmd, [fd], **args)
    finally:
        os.close(fd)


def test_saves_through_passed_descriptors_load_back(guests, tmp_path: Path) -> None:
    """libvirt's ways: fd:NAME after getfd (a stream), file:/dev/fdset/N after
    add-fd (mapped-ram, multifd); the destination reads through the same two."""
    src = guests("src", "--ram", "16M", "--workload-rate", "32M")
    stream, mapped = str(tmp_path / "s.mig"), str(tmp_path / "m.mig")
    send_fd(src, "getfd", stream, os.O_WRONLY | os.O_CREAT, fdname="mig")
    ok(src, "migrate", uri="fd:mig")
    assert wait(src)["status"] == "completed"
    d1 = ok(src, "x-query-ram-digest")
    ok(src, "cont")
    ok(src, "migrate-set-capabilities", capabilities=[
        {"capability": "mapped-ram", "state": True}, {"capability": "multifd", "state": True}])
    send_fd(src, "add-fd", mapped, os.O_WRONLY | os.O_CREAT, **{"fdset-id": 1})
    ok(src, "migrate", uri="file:/dev/fdset/1")
    assert wait(src)["status"] == "completed"
    d2 = ok(src, "x-query-ram-digest")
    assert d1 != d2  # the guest ran in between
    with MigrationFile(mapped) as mf:
        assert mf.format == "mapped-ram" and mf.complete

    dst = guests("dst", "--ram", "16M", "--incoming", "defer", "-S")
    send_fd(dst, "getfd", stream, os.O_RDONLY, fdname="in")
    ok(dst, "migrate-incoming", uri="fd:in")
    assert wait(dst)["status"] == "completed"
    assert ok(dst, "x-query-ram-digest") == d1
    assert ok(dst, "query-status")["status"] == "paused"  # -S: no autostart

    dst2 = guests("dst2", "--ram", "16M", "--incoming", "defer")
    ok(dst2, "migrate-set-capabilities", capabilities=[
        {"capability": "mapped-ram", "state": True}, {"capability": "multifd", "state": True}])
    send_fd(dst2, "add-fd", mapped, os.O_RDONLY, **{"fdset-id": 0})
    ok(dst2, "migrate-incoming", uri="file:/dev/fdset/0")
    assert wait(dst2)["status"] == "completed"
    assert ok(dst2, "x-query-ram-digest") == d2
    assert ok(dst2, "query-status")["status"] == "running"


def _unix_pair(guests, tmp_path: Path, dst_ram: str) -> tuple[Peer, Peer, str]:
    sock = str(tmp_path / "mig.sock")
    dst = guests("dst", "--ram", dst_ram, "--incoming", "defer")
    src = guests("src", "--ram", "8M", "--workload-rate", "16M")
    for p in (src, dst):
        ok(p, "migrate-set-capabilities",
           capabilities=[{"capability": "return-path", "state": True}])
    ok(dst, "migrate-incoming", uri=f"unix:{sock}", **{"exit-on-error": False})
    return src, dst, sock


def test_return_path_confirms_the_load(guests, tmp_path: Path) -> None:
    src, dst, sock = _unix_pair(guests, tmp_path, "8M")
    ok(src, "migrate", uri=f"unix:{sock}")
    assert wait(src)["status"] == "completed"
    assert wait(dst)["status"] == "completed"
    assert ok(dst, "x-query-ram-digest") == ok(src, "x-query-ram-digest")


def test_return_path_reports_a_destination_failure(guests, tmp_path: Path) -> None:
    """With a return path the destination's failure (its RAM is another size)
    is the source's error, in QEMU's words; the source runs on."""
    src, dst, sock = _unix_pair(guests, tmp_path, "16M")
    ok(src, "migrate", uri=f"unix:{sock}")
    q = wait(src)
    assert q["status"] == "failed"
    assert q["error-desc"] == "Sibling indicated error 1"  # QEMU's words
    assert ok(src, "query-status")["status"] == "running"
    assert wait(dst)["error-desc"].startswith("Length mismatch: pc.ram")


def test_return_path_needs_a_two_way_transport(guests, tmp_path: Path) -> None:
    g = guests("g", "--ram", "8M", "-S")
    ok(g, "migrate-set-capabilities",
       capabilities=[{"capability": "return-path", "state": True},
                     {"capability": "mapped-ram", "state": True}])  # accepted, as QEMU does
    assert err(g, "migrate", uri=f"file:{tmp_path}/x") == (
        "fixedram: capability return-path needs a two-way transport (tcp: or unix:); "
        "file: has none")
    assert ok(g, "query-migrate") == {}


def test_auto_converge_throttles_the_vcpus(guests, tmp_path: Path) -> None:
    g2 = guests("busy", "--ram", "32M", "--workload-rate", "256M")
    ok(g2, "migrate-set-capabilities",
       capabilities=[{"capability": "auto-converge", "state": True}])
    ok(g2, "migrate-set-parameters", **{"max-bandwidth": 8 << 20, "cpu-throttle-initial": 30,
                                        "cpu-throttle-increment": 20, "max-cpu-throttle": 70,
                                        "throttle-trigger-threshold": 10})

    def rate(seconds: float) -> float:
        a = ok(g2, "x-query-ram-digest")["seq"]
        time.sleep(seconds)
        return (ok(g2, "x-query-ram-digest")["seq"] - a) / seconds

    before = rate(1.0)
    ok(g2, "migrate", uri=f"file:{tmp_path}/t.mig")
    seen: list[int] = []
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline and (not seen or seen[-1] < 70):
        q = ok(g2, "query-migrate")
        assert q["status"] in ("setup", "active"), q
        if "cpu-throttle-percentage" in q:
            seen.append(q["cpu-throttle-percentage"])
        time.sleep(0.2)
    assert seen and seen[0] == 30 and max(seen) == 70, seen  # initial, +20 steps, the cap
    assert sorted(seen) == seen
    during = rate(1.0)
    assert during < 0.6 * before, (before, during)  # 70% throttled: well under the rate
    ok(g2, "migrate_cancel")
    assert wait(g2)["status"] == "cancelled"
    assert "cpu-throttle-percentage" not in ok(g2, "query-migrate")
    assert rate(1.0) > 0.6 * before  # the throttle ends with the migration


def test_bandwidth_changes_apply_to_a_running_migration(guests, tmp_path: Path) -> None:
    g = guests("g", "--ram", "32M", "--workload-rate", "0", "-S")
    ok(g, "migrate-set-parameters", **{"max-bandwidth": 1 << 20})
    ok(g, "migrate", uri=f"file:{tmp_path}/b.mig")
    time.sleep(0.5)
    assert ok(g, "query-migrate")["status"] == "active"
    ok(g, "migrate-set-parameters", **{"max-bandwidth": 0})  # unlimited, at once
    assert wait(g, timeout=10)["status"] == "completed"


@pytest.mark.parametrize(("caps", "params", "uri", "message"), [
    (["xbzrle"], {}, "file", "fixedram: capability xbzrle is not supported: XBZRLE page "
     "compression"),
    (["postcopy-ram"], {}, "file", "fixedram: capability postcopy-ram is not supported: "
     "postcopy"),
    (["x-colo"], {}, "file", "fixedram: capability x-colo is not supported: COLO"),
    (["dirty-bitmaps"], {}, "file", "fixedram: capability dirty-bitmaps is not supported: "
     "block dirty bitmap migration (it runs in postcopy)"),
    (["x-ignore-shared"], {}, "file", "fixedram: capability x-ignore-shared is not "
     "supported: x-ignore-shared (no shared RAM to skip)"),
    (["validate-uuid"], {}, "file", "fixedram: capability validate-uuid is not supported: "
     "VM UUID validation (the built-in guest has no UUID)"),
    (["return-path", "switchover-ack"], {}, "unix", "fixedram: capability switchover-ack is "
     "not supported: switchover acknowledgement"),
    (["multifd"], {}, "unix", "fixedram: multifd without mapped-ram (socket multifd) is not "
     "supported; use mapped-ram with a file: URI"),
    (["multifd", "zero-copy-send"], {}, "unix", "fixedram: capability zero-copy-send is not "
     "supported: zero-copy send (socket multifd only)"),
    ([], {"multifd-compression": "zlib"}, "file", "fixedram: multifd-compression zlib is not "
     "supported"),
    ([], {"tls-creds": "tls0"}, "file", "fixedram: TLS migration (tls-creds) is not "
     "supported"),
    ([], {"mode": "cpr-reboot"}, "file", "fixedram: migration mode cpr-reboot is not "
     "supported"),
])
def test_what_cannot_be_honoured_is_refused_at_migrate(guests, tmp_path: Path, caps: list[str],
                                                       params: dict[str, Any], uri: str,
                                                       message: str) -> None:
    g = guests("g", "--ram", "8M", "-S")
    ok(g, "migrate-set-capabilities",
       capabilities=[{"capability": c, "state": True} for c in caps])  # QEMU accepts these
    if params:
        ok(g, "migrate-set-parameters", **params)
    target = f"file:{tmp_path}/x.mig" if uri == "file" else f"unix:{tmp_path}/nobody.sock"
    assert err(g, "migrate", uri=target) == message
    assert ok(g, "query-migrate") == {}
    assert ok(g, "query-status")["status"] == "prelaunch"
    assert not (tmp_path / "x.mig").exists()


def test_capabilities_without_anything_to_act_on_are_accepted(guests, tmp_path: Path) -> None:
    g = guests("g", "--ram", "8M", "--workload-rate", "8M")
    ok(g, "migrate-set-capabilities", capabilities=[
        {"capability": c, "state": True}
        for c in ("rdma-pin-all", "zero-blocks", "release-ram", "postcopy-blocktime",
                  "late-block-activate", "events", "auto-converge")])
    ok(g, "migrate-set-parameters", **{"tls-creds": "", "tls-hostname": "", "announce-step": 50,
                                       "xbzrle-cache-size": 1 << 20, "x-checkpoint-delay": 5})
    ok(g, "migrate", uri=f"file:{tmp_path}/ok.mig")
    assert wait(g)["status"] == "completed"


def test_exit_on_error_ends_the_process_with_status_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mig"
    bad.write_bytes(b"garbage" * 100)
    p = guest(tmp_path, "dst", "--ram", "8M", "--incoming", "defer")
    try:
        ok(p, "migrate-incoming", uri=f"file:{bad}")
        assert p.proc is not None
        assert p.proc.wait(10) == 1
        assert p.proc.stderr is not None
        assert "load of migration failed" in p.proc.stderr.read().decode()
    finally:
        p.close()
    # -incoming URI on the command line: the same, with no QMP command at all.
    r = subprocess.run([FIXEDRAM, "guest", "--qmp", str(tmp_path / "q.sock"), "--ram", "8M",
                        "--incoming", f"file:{bad}"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 1 and "load of migration failed" in r.stderr
    p = guest(tmp_path, "stays", "--ram", "8M", "--incoming", f"file:{bad}",
              "--no-exit-on-error")
    try:
        assert wait(p)["status"] == "failed"
        assert ok(p, "query-status")["status"] == "inmigrate"
    finally:
        p.close()
