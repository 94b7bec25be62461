"""``fixedram send --postcopy`` into real QEMU 10 destinations, with saves of the real Linux guest.

The destination is started with ``-incoming defer`` and capability postcopy-ram on. Without
``-S`` the guest must run (RESUME) before the migration completes and keep running from where
the save left it; with ``-S`` its RAM after completion must equal the source's. The fault
tests end ``send`` with one line and exit 1: the destination killed mid-postcopy, a destination
without postcopy-ram, and scripted destinations asking for pages no RAMBlock has.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bridge_helpers import FIXEDRAM

from qemu_harness import LinuxArtifacts, diff_pages, ram_compare_ranges, ram_split
from qemu_harness.linux import READY_MARKER, TICK_MARKER, LinuxGuest

_TICK = re.compile(TICK_MARKER + r" (\d+)\r?\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _destination(tmp_path: Path, art: LinuxArtifacts, *, paused: bool, name: str,
                 postcopy: bool = True) -> LinuxGuest:
    vm = LinuxGuest(tmp_path, Path(art.meta["kernel"]), Path(art.meta["initrd"]),
                    machine=art.machine, memory=art.ram_size, incoming=True, paused=paused,
                    name=name)
    vm.launch()
    vm.set_caps(**{"postcopy-ram": postcopy, "events": True})
    return vm


def _send(save: Path, uri: str, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*FIXEDRAM, "send", "--postcopy", str(save), uri, "--json", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(p: subprocess.Popen[bytes], timeout: float = 120) -> tuple[int, dict[str, Any], str]:
    out, err = p.communicate(timeout=timeout)
    doc = json.loads(out) if p.returncode == 0 else {}
    return p.returncode, doc, err.decode()


def _ticks(text: str) -> list[int]:
    return [int(t) for t in _TICK.findall(text)]


def _events(vm: LinuxGuest) -> list[tuple[str, str | None, float]]:
    return [(e["event"], (e.get("data") or {}).get("status"),
             e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6)
            for e in vm.events()]


@pytest.mark.qemu
@pytest.mark.parametrize("kind", ["live_stream", "live_mapped"])
def test_postcopy_guest_runs_before_complete(kind: str, tmp_path: Path,
                                             linux_saves: LinuxArtifacts) -> None:
    """A multi-pass stream save and a mapped-ram save restored into a destination without -S:
    the guest resumes while RAM is still arriving (its faults are served on request) and keeps
    running the workload from where it was saved, past the source's last tick."""
    art = linux_saves
    save = getattr(art, kind)
    with _destination(tmp_path, art, paused=False, name=f"dst-{kind}") as dst:
        uri = f"tcp:127.0.0.1:{_free_port()}"
        dst.migrate_incoming(uri, wait=False)
        # 32 MiB/s: the ~80 MiB push takes seconds, so the running guest must fault pages in.
        rc, doc, err = _finish(_send(save, uri, "--postcopy-bandwidth", "32M"))
        assert rc == 0, err + dst.log_text()
        dst.wait_migration(60)
        ev = _events(dst)
        names = [(e, s) for e, s, _ in ev]
        assert ("RESUME", None) in names and ("MIGRATION", "completed") in names, ev
        assert names.index(("RESUME", None)) < names.index(("MIGRATION", "completed")), ev
        assert ("MIGRATION", "postcopy-active") in names, ev
        assert doc["running_after_s"] < doc["complete_after_s"]
        assert doc["pages_requested"] > 0 and doc["pages_sent_on_request"] > 0, doc
        assert doc["request_latency_p50_ms"] <= doc["request_latency_p99_ms"]
        total = art.ram_size // 4096
        assert doc["pages_pushed"] + doc["pages_sent_on_request"] >= total, doc
        # The guest continues (no reboot) past the last tick its source printed.
        src_last = max(_ticks(art.serial.read_text(errors="replace")))
        dst._wait(f"tick > {src_last}", lambda: dst.ticks() > src_last, 60)
        text = dst.serial_text()
        assert READY_MARKER not in text, text[:500]
        assert min(_ticks(text)) > 1


@pytest.mark.qemu
@pytest.mark.parametrize("kind", ["paused_mapped", "live_stream"])
def test_postcopy_paused_destination_equals_source(kind: str, tmp_path: Path,
                                                   linux_saves: LinuxArtifacts) -> None:
    """With -S the destination stays paused; once complete its RAM is the source's: the
    source QEMU's pmemsave before saving (paused save), or the save's own pc.ram (live save,
    read by fixedram's reader: the last copy of each page), compared page by page."""
    from fixedram.format.migfile import MigrationFile

    art = linux_saves
    save = getattr(art, kind)
    low, _ = ram_split(art.ram_size, art.machine)
    if kind == "paused_mapped":
        truth = art.pmem.read_bytes()
    else:
        with MigrationFile(save) as mf:
            truth = mf.block("pc.ram").read(0, low)
    with _destination(tmp_path, art, paused=True, name=f"dst-S-{kind}") as dst:
        uri = f"unix:{tmp_path / 'pc.sock'}"
        dst.migrate_incoming(uri, wait=False)
        rc, doc, err = _finish(_send(save, uri))
        assert rc == 0, err + dst.log_text()
        dst.wait_migration(60)
        assert dst.status() == "paused"
        assert doc["complete_after_s"] is not None and doc["bytes_sent"] > 40 << 20
        got = dst.pmemsave(0, low, tmp_path / "dst.pmem")
        deadline = time.monotonic() + 10
        while got.stat().st_size < low and time.monotonic() < deadline:
            time.sleep(0.05)
        bad = diff_pages(truth, got.read_bytes(), art.compare_ranges)
        assert not bad, f"{len(bad)} pages differ, first at 0x{bad[0]:x}"
        before = dst.ticks()
        dst.cont()
        dst.wait_ticks(2)
        assert dst.ticks() > before


@pytest.mark.qemu
def test_postcopy_destination_killed(tmp_path: Path, linux_saves: LinuxArtifacts) -> None:
    """The destination dies mid-postcopy: send ends with one line naming it, exit 1."""
    art = linux_saves
    with _destination(tmp_path, art, paused=False, name="dst-kill") as dst:
        uri = f"tcp:127.0.0.1:{_free_port()}"
        dst.migrate_incoming(uri, wait=False)
        p = _send(art.live_mapped, uri, "--postcopy-bandwidth", "4M")  # ~20 s of push
        deadline = time.monotonic() + 30
        while dst.query_migrate().get("status") != "postcopy-active":
            assert time.monotonic() < deadline and p.poll() is None, dst.log_text()
            time.sleep(0.05)
        time.sleep(0.5)
        assert dst.proc is not None
        os.kill(dst.proc.pid, signal.SIGKILL)
        t = time.monotonic()
        rc, _doc, err = _finish(p, 30)
        assert time.monotonic() - t < 10
    assert rc == 1, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "broke during postcopy" in err and "pages" in err, err


@pytest.mark.qemu
def test_postcopy_destination_without_capability(tmp_path: Path,
                                                 linux_saves: LinuxArtifacts) -> None:
    art = linux_saves
    with _destination(tmp_path, art, paused=True, name="dst-nocap", postcopy=False) as dst:
        uri = f"tcp:127.0.0.1:{_free_port()}"
        dst.migrate_incoming(uri, wait=False)
        rc, _doc, err = _finish(_send(art.paused_mapped, uri), 60)
    assert rc == 1 and err.count("\n") == 1, err
    assert "before postcopy started" in err and "postcopy-ram" in err, err


@pytest.mark.parametrize("how", ["-", "exec:cat >/dev/null", "file:/tmp/x.mig"])
def test_postcopy_needs_a_return_path(how: str, tmp_path: Path) -> None:
    p = subprocess.run([*FIXEDRAM, "send", "--postcopy", str(tmp_path / "none.sav"), how],
                       capture_output=True, text=True, check=False, timeout=30)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert "postcopy needs QEMU's return path" in p.stderr


class _ScriptedDestination:
    """A listener that reads the stream and answers on the return path with chosen bytes
    once the package has arrived: what no QEMU sends, to check each is refused by name."""

    def __init__(self, path: Path, reply: bytes, close: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.reply = reply
        self.close_after = close
        self.got = 0
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        c, _ = self.sock.accept()
        with c:
            seen = b""
            while b"\x08\x00\x05\x00\x00" not in seen:  # the package's POSTCOPY_RUN
                b = c.recv(1 << 16)
                if not b:
                    return
                seen = seen[-(1 << 16):] + b
                self.got += len(b)
            c.sendall(self.reply)
            if self.close_after:
                return
            with contextlib.suppress(OSError):
                while c.recv(1 << 16):
                    pass

    def close(self) -> None:
        self.sock.close()


def _req_id(start: int, length: int, name: bytes) -> bytes:
    body = struct.pack(">QIB", start, length, len(name)) + name
    return struct.pack(">HH", 3, len(body)) + body


@pytest.fixture
def scripted(tmp_path: Path) -> Iterator[Any]:
    made: list[_ScriptedDestination] = []

    def make(reply: bytes, close: bool = False) -> str:
        path = tmp_path / f"scripted{len(made)}.sock"
        made.append(_ScriptedDestination(path, reply, close))
        return f"unix:{path}"
    yield make
    for d in made:
        d.close()


@pytest.mark.qemu
@pytest.mark.parametrize("reply,words", [
    (_req_id(1 << 40, 4096, b"pc.ram"), "outside RAMBlock 'pc.ram'"),
    (_req_id(0x10000000 - 4096, 8192, b"pc.ram"), "outside RAMBlock 'pc.ram'"),
    (_req_id(0, 4096, b"nosuch.ram"), "RAMBlock 'nosuch.ram', which the save does not have"),
    (_req_id(100, 4096, b"pc.ram"), "misaligned page request"),
    (struct.pack(">HHQI", 4, 12, 0, 4096), "without naming their RAMBlock"),
    (struct.pack(">HHI", 1, 4, 1), "before postcopy started (it answered SHUT 1"),
    (struct.pack(">HH", 9, 0), "unknown return-path message (type 9)"),
    (struct.pack(">HH", 2, 600), "600 bytes"),
    (None, "broke during postcopy"),
])
def test_postcopy_refuses_bad_return_path(reply: bytes | None, words: str, scripted: Any,
                                          linux_saves: LinuxArtifacts) -> None:
    """Requests are checked before anything is read for them; each fault is one line.
    (None: PONG 3, so postcopy is running, then the destination closes the connection.)"""
    uri = (scripted(struct.pack(">HHI", 2, 4, 3), close=True) if reply is None
           else scripted(reply))
    p = subprocess.run([*FIXEDRAM, "send", "--postcopy", str(linux_saves.live_stream), uri,
                        "--postcopy-bandwidth", "16M"], capture_output=True, text=True,
                       check=False, timeout=60)
    assert p.returncode == 1, p.stderr
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert words in p.stderr, p.stderr


# ---- QEMU 7.2 (Debian 12), unpacked by scripts/install-qemu72.sh -----------------------------
ROOT = Path(__file__).resolve().parents[2]
QEMU72_DIR = Path(os.environ.get("FIXEDRAM_QEMU72_DIR", ROOT / "build" / "qemu72"))
QEMU72 = QEMU72_DIR / "root" / "usr" / "bin" / "qemu-system-x86_64"
MACHINE72 = "pc-q35-7.2"
# 7.2's data package links its BIOS to a seabios package: use the system firmware.
FIRMWARE72 = ["-L", "/usr/share/qemu", "-L", "/usr/share/seabios"]


@contextlib.contextmanager
def _qemu72() -> Iterator[None]:
    import qemu_harness.vm as hvm

    if not QEMU72.exists():
        pytest.fail(f"{QEMU72} missing: run scripts/install-qemu72.sh (or set "
                    "FIXEDRAM_QEMU72_DIR)", pytrace=False)
    old = hvm.QEMU_BINARY
    hvm.QEMU_BINARY = str(QEMU72)
    os.environ["QEMU_MODULE_DIR"] = str(QEMU72_DIR / "root" / "usr" / "lib" / "x86_64-linux-gnu"
                                        / "qemu")  # Debian builds TCG as a module
    try:
        yield
    finally:
        hvm.QEMU_BINARY = old
        del os.environ["QEMU_MODULE_DIR"]


@pytest.fixture(scope="module")
def save72(tmp_path_factory: pytest.TempPathFactory,
           linux_saves: LinuxArtifacts) -> tuple[Path, Path, int]:
    """A stream save of the Linux guest by QEMU 7.2 (paused), its pmemsave and last tick."""
    d = tmp_path_factory.mktemp("save72")
    art = linux_saves
    low, _ = ram_split(art.ram_size, MACHINE72)
    with _qemu72(), LinuxGuest(d, Path(art.meta["kernel"]), Path(art.meta["initrd"]),
                               machine=MACHINE72, memory=art.ram_size, name="src72",
                               extra_args=FIRMWARE72) as src:
        src.wait_ready()
        src.wait_ticks(2)
        src.stop()
        pmem = src.pmemsave(0, low, d / "src72.pmem")
        save = d / "guest72.sav"
        src.migrate(f"exec:cat > {save}")  # 7.2 has no file: migration
        return save, pmem, src.ticks()


@pytest.mark.qemu
@pytest.mark.parametrize("paused", [True, False], ids=["S", "running"])
def test_postcopy_qemu72(paused: bool, tmp_path: Path, linux_saves: LinuxArtifacts,
                         save72: tuple[Path, Path, int]) -> None:
    """A QEMU 7.2 save restored by postcopy into QEMU 7.2: RAM equal with -S; without it,
    RESUME before completion and the workload continues."""
    save, pmem, last = save72
    art = linux_saves
    with _qemu72(), LinuxGuest(tmp_path, Path(art.meta["kernel"]), Path(art.meta["initrd"]),
                               machine=MACHINE72, memory=art.ram_size, incoming=True,
                               paused=paused, name="dst72", extra_args=FIRMWARE72) as dst:
        dst.set_caps(**{"postcopy-ram": True, "events": True})
        uri = f"tcp:127.0.0.1:{_free_port()}"
        dst.qmp("migrate-incoming", uri=uri)  # 7.2 has no exit-on-error
        extra = () if paused else ("--postcopy-bandwidth", "32M")
        rc, doc, err = _finish(_send(save, uri, *extra))
        assert rc == 0, err + dst.log_text()
        dst.wait_migration(60)
        names = [(e, s) for e, s, _ in _events(dst)]
        if paused:
            assert ("RESUME", None) not in names and dst.status() == "paused"
            low, _ = ram_split(art.ram_size, MACHINE72)
            got = dst.pmemsave(0, low, tmp_path / "dst72.pmem")
            deadline = time.monotonic() + 10
            while got.stat().st_size < low and time.monotonic() < deadline:
                time.sleep(0.05)
            bad = diff_pages(pmem.read_bytes(), got.read_bytes(),
                             ram_compare_ranges(art.ram_size, MACHINE72))
            assert not bad, f"{len(bad)} pages differ, first at 0x{bad[0]:x}"
        else:
            assert names.index(("RESUME", None)) < names.index(("MIGRATION", "completed"))
            assert doc["pages_sent_on_request"] > 0, doc
            dst._wait(f"tick > {last}", lambda: dst.ticks() > last, 60)
            assert READY_MARKER not in dst.serial_text()
