"""``migrate file:PATH`` to what PATH really is: a link, a FIFO, a device, a file at an offset.

A new or regular file is written under a temporary name and renamed (a
symlink is followed: the link stays, its target is written). Anything else is
written in place and never replaced. Driven through ``fixedram save`` (the
engine) and through a QMP ``migrate`` to ``fixedram guest``.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fixedram.format.migfile import MigrationFile

FIXEDRAM = [sys.executable, "-m", "fixedram.cli.main"]
SMALL = ["--ram", "16M"]


def save(uri: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FIXEDRAM, "save", uri, *SMALL, *extra], capture_output=True,
                          text=True, timeout=120)


def _check_save(path: Path, offset: int = 0) -> None:
    with MigrationFile(path, offset=offset) as mf:
        assert mf.complete and mf.block("pc.ram").used_length == 16 << 20


@pytest.mark.parametrize("mapped", [False, True], ids=["stream", "mapped-ram"])
def test_symlink_stays_a_link(tmp_path: Path, mapped: bool) -> None:
    target = tmp_path / "real.mig"
    target.write_bytes(b"old contents")
    link = tmp_path / "link.mig"
    link.symlink_to(target.name)
    r = save(f"file:{link}", *(["--mapped-ram", "--multifd", "2"] if mapped else []))
    assert r.returncode == 0, r.stderr
    assert link.is_symlink() and os.readlink(link) == target.name
    assert stat.S_ISREG(target.lstat().st_mode)
    _check_save(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.mig", "real.mig"]


def test_dangling_symlink_creates_its_target(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    link = tmp_path / "link.mig"
    link.symlink_to("sub/new.mig")
    r = save(f"file:{link}")
    assert r.returncode == 0, r.stderr
    assert link.is_symlink()
    _check_save(tmp_path / "sub" / "new.mig")


def test_fifo_gets_the_stream(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = bytearray()

    def reader() -> None:
        with open(fifo, "rb") as f:
            while chunk := f.read(1 << 20):
                got.extend(chunk)

    t = threading.Thread(target=reader)
    t.start()
    r = save(f"file:{fifo}")
    t.join(60)
    assert r.returncode == 0, r.stderr
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    copy = tmp_path / "copy.mig"
    copy.write_bytes(bytes(got))
    _check_save(copy)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.mig", "pipe"]


def test_mapped_ram_to_a_fifo_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    drained = threading.Event()

    def reader() -> None:
        with open(fifo, "rb") as f:
            f.read()
        drained.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    r = save(f"file:{fifo}", "--mapped-ram")
    assert r.returncode != 0
    assert "mapped-ram needs a regular file" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert drained.wait(10)
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]


def _null_device(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        pytest.fail("mknod of a character device needs root")
    nul = tmp_path / "nul"
    os.mknod(nul, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # a null device of our own
    return nul


def _still_the_device(nul: Path) -> None:
    st = nul.lstat()
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert [p.name for p in nul.parent.iterdir()] == ["nul"]


def test_character_device_is_written_in_place(tmp_path: Path) -> None:
    nul = _null_device(tmp_path)
    r = save(f"file:{nul}")
    assert r.returncode == 0, r.stderr
    _still_the_device(nul)


def test_mapped_ram_to_a_device_is_refused(tmp_path: Path) -> None:
    nul = _null_device(tmp_path)
    r = save(f"file:{nul}", "--mapped-ram")
    assert r.returncode != 0 and "mapped-ram needs a regular file" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    _still_the_device(nul)


@pytest.mark.parametrize("mapped", [False, True], ids=["stream", "mapped-ram"])
def test_offset_keeps_the_bytes_before(tmp_path: Path, mapped: bool) -> None:
    path = tmp_path / "vm.img"
    head = bytes(range(256)) * 16  # 4 KiB the save must not touch
    path.write_bytes(head + b"stale tail" * 1000)
    ino = path.stat().st_ino
    r = save(f"file:{path},offset=4k", *(["--mapped-ram"] if mapped else []))
    assert r.returncode == 0, r.stderr
    assert path.stat().st_ino == ino  # written in place, as QEMU does
    assert path.read_bytes()[:4096] == head
    _check_save(path, offset=4096)


def test_failed_save_at_offset_cuts_back(tmp_path: Path) -> None:
    path = tmp_path / "vm.img"
    head = b"H" * 4096
    path.write_bytes(head)
    # A save that never converges, stopped by SIGTERM: nothing past the offset.
    proc = subprocess.Popen([*FIXEDRAM, "save", f"file:{path},offset=4096", "--ram", "32M",
                             "--live-for", "0.2", "--workload-rate", "1G",
                             "--max-bandwidth", "16M", "--downtime-limit", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while path.stat().st_size <= 4096 + (1 << 20):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.terminate()
    proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert path.read_bytes() == head


def test_directory_target_is_refused(tmp_path: Path) -> None:
    r = save(f"file:{tmp_path}")
    assert r.returncode != 0 and "Is a directory" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_qmp_migrate_to_a_symlink_and_a_device(tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"
    proc = subprocess.Popen([*FIXEDRAM, "guest", "--qmp", str(sock), "--ram", "16M",
                             "--workload-rate", "0"], stderr=subprocess.DEVNULL)
    target = tmp_path / "real.mig"
    target.write_bytes(b"old")
    (tmp_path / "link.mig").symlink_to("real.mig")
    nul = tmp_path / "nul"
    if os.geteuid() == 0:
        os.mknod(nul, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(sock))
        f = c.makefile("rwb")
        f.readline()

        def ask(cmd: bytes) -> bytes:
            f.write(cmd + b"\n")
            f.flush()
            while True:
                line = f.readline()
                if b'"event"' not in line:
                    return line

        assert b"return" in ask(b'{"execute": "qmp_capabilities"}')
        for dest in ([tmp_path / "link.mig"] + ([nul] if os.geteuid() == 0 else [])):
            assert b"return" in ask(b'{"execute": "migrate", "arguments": {"channels": [{'
                                    b'"channel-type": "main", "addr": {"transport": "file", '
                                    b'"filename": "' + str(dest).encode() + b'", "offset": 0}}]}}')
            for _ in range(600):
                line = ask(b'{"execute": "query-migrate"}')
                if b'"completed"' in line or b'"failed"' in line:
                    break
                time.sleep(0.05)
            assert b'"completed"' in line, line
            # As QEMU: the guest is 'postmigrate' now and must run again before another save.
            assert b"return" in ask(b'{"execute": "cont"}')
        f.close()
        c.close()
    finally:
        proc.terminate()
        proc.wait(30)
    assert (tmp_path / "link.mig").is_symlink()
    _check_save(target)
    if os.geteuid() == 0:
        assert stat.S_ISCHR(nul.lstat().st_mode)
