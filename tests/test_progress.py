"""Progress bars: drawn on stderr when it is a terminal (a pseudo-terminal here), in binary
units, by ``send``, ``receive`` and ``verify``; nothing on stderr when it is not a terminal.

The files are saves of the built-in guest (``fixedram save``, the engine QEMU's tests load);
no QEMU is needed.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

from fixedram.format.migfile import MigrationFile
from fixedram.memory.extract import total_bytes
from fixedram.tools.verify import compare_total

FIXEDRAM = [sys.executable, "-m", "fixedram"]
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")
# A bar's data column: "12.5/64.0 MiB" (decimal units would say MB).
DONE_OF = re.compile(r"(\d[\d,]*\.\d)/(\d[\d,]*\.\d) (KiB|MiB|GiB)")
SPEED_UNIT = re.compile(r"\d (\w+)/s")
DECIMAL = re.compile(r"\d (kB|MB|GB)\b")


def binary_units_only(text: str) -> bool:
    """No decimal size anywhere; every speed shown (rich shows "?" until it has two
    samples, so a short run may show none) in bytes or binary units."""
    return not DECIMAL.search(text) and set(SPEED_UNIT.findall(text)) <= {
        "B", "KiB", "MiB", "GiB", "TiB"}


class Run:
    """A fixedram command with stderr on a pseudo-terminal (stdout a pipe)."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        master, slave = os.openpty()
        # 150 columns, so the whole bar fits on a line.
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 150, 0, 0))
        self.p = subprocess.Popen([*FIXEDRAM, *args], cwd=cwd, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        self.master = master
        self.raw = bytearray()
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self) -> None:
        while True:
            try:
                b = os.read(self.master, 65536)
            except OSError:  # EIO: the last writer of the terminal is gone
                break
            if not b:
                break
            self.raw.extend(b)

    def text(self) -> str:
        return ANSI.sub(b"", bytes(self.raw)).decode("utf-8", "replace")

    def wait(self, timeout: float = 120) -> tuple[int, bytes, str]:
        out, _ = self.p.communicate(timeout=timeout)
        self.t.join(10)
        os.close(self.master)
        return self.p.returncode, out, self.text()


def plain(args: list[str], cwd: Path, **kw: object) -> subprocess.CompletedProcess[bytes]:
    """The same command with stdout and stderr pipes (no terminal)."""
    return subprocess.run([*FIXEDRAM, *args], cwd=cwd, capture_output=True, timeout=120,
                          check=False, **kw)  # type: ignore[call-overload]


def bar_values(text: str, label: str) -> list[tuple[float, float, str]]:
    """(done, total, unit) of every frame of the bar named ``label``."""
    frames = [f for f in re.split(r"[\r\n]", text) if f.lstrip().startswith(label)]
    out = []
    for f in frames:
        m = DONE_OF.search(f)
        if m:
            out.append((float(m[1].replace(",", "")), float(m[2].replace(",", "")), m[3]))
    return out


def in_unit(n: int, unit: str) -> float:
    return round(n / {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[unit], 1)


@pytest.fixture(scope="module")
def saves(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same paused 96 MiB guest saved as a stream and as a mapped-ram file."""
    d = tmp_path_factory.mktemp("saves")
    out = {"stream": d / "guest.stream", "mapped": d / "guest.mapped"}
    for kind, path in out.items():
        extra = ["--mapped-ram"] if kind == "mapped" else []
        r = plain(["save", str(path), "--ram", "96M", *extra], d)
        assert r.returncode == 0, r.stderr
    return out


def test_units_are_binary() -> None:
    from fixedram.cli.progress import binary_size

    assert binary_size(512) == "512 B"
    assert binary_size(1536) == "1.5 KiB"
    assert binary_size(3 << 30) == "3.0 GiB"


def test_verify_against_bar(saves: dict[str, Path], tmp_path: Path) -> None:
    a, b = saves["stream"], saves["mapped"]
    rc, out, err = Run(["verify", str(a), "--against", str(b)], tmp_path).wait()
    assert rc == 0, err
    assert out.decode().endswith("RAM equal to " + str(b) + "\n")
    frames = bar_values(err, "comparing")
    assert frames, err
    with MigrationFile(str(a)) as ma, MigrationFile(str(b)) as mb:
        total = compare_total(ma, mb)
    done, shown_total, unit = frames[-1]
    assert unit == "MiB"
    assert shown_total == in_unit(total, unit) == done  # the last frame: all compared
    assert binary_units_only(err)

    r = plain(["verify", str(a), "--against", str(b)], tmp_path)
    assert r.returncode == 0 and r.stderr == b""
    assert r.stdout == out


def test_verify_indexing_bar(saves: dict[str, Path], tmp_path: Path) -> None:
    """``verify FILE`` of a stream: the bar follows the walk through the file's sections
    and ends at the file's size."""
    a = saves["stream"]
    rc, out, err = Run(["verify", str(a)], tmp_path).wait()
    assert rc == 0, err
    assert out == f"{a}: OK\n".encode()
    frames = bar_values(err, f"indexing {a.name}")
    assert frames, err
    done, total, unit = frames[-1]
    assert total == in_unit(a.stat().st_size, unit) == done
    assert binary_units_only(err)
    # inspect, state and map open files the same way; their stdout stays clean
    rc, out, err = Run(["inspect", "--json", str(a)], tmp_path).wait()
    assert rc == 0 and json.loads(out)["complete"], err
    assert bar_values(err, f"indexing {a.name}")[-1][0] == done


def test_verify_one_pass_bar(saves: dict[str, Path], tmp_path: Path) -> None:
    """A compressed image is read in one pass: compressed bytes read against its size."""
    gz = tmp_path / "guest.stream.gz"
    with open(gz, "wb") as f:
        subprocess.run(["gzip", "-1", "-c", str(saves["stream"])], stdout=f, check=True)
    rc, out, err = Run(["verify", str(gz)], tmp_path).wait()
    assert rc == 0, err
    assert out == f"{gz}: OK\n".encode()
    frames = bar_values(err, "checking")
    assert frames, err
    done, total, unit = frames[-1]
    assert total == in_unit(gz.stat().st_size, unit) == done
    assert binary_units_only(err)

    r = plain(["verify", str(gz)], tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (0, out, b"")


def _receive_port(run: Run) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = re.search(r"listening on tcp:127\.0\.0\.1:(\d+)", run.text())
        if m:
            return int(m[1])
        assert run.p.poll() is None, run.text()
        time.sleep(0.05)
    raise AssertionError("receive did not listen: " + run.text())


@pytest.mark.parametrize("channels", [0, 2])
def test_send_receive_bars(saves: dict[str, Path], tmp_path: Path, channels: int) -> None:
    src = saves["mapped"]
    out = tmp_path / "received.mig"
    multifd = ["--multifd-channels", str(channels)] if channels else []
    # The receiver finds the channel count itself (at the first SYNC packet).
    rx = Run(["receive", "tcp:127.0.0.1:0", "-o", str(out)], tmp_path)
    port = _receive_port(rx)
    tx = Run(["send", str(src), f"tcp:127.0.0.1:{port}", *multifd], tmp_path)
    rc_tx, out_tx, err_tx = tx.wait()
    rc_rx, out_rx, err_rx = rx.wait()
    assert rc_tx == 0, err_tx
    assert rc_rx == 0, err_rx
    assert out_tx == out_rx == b""  # the bars are on stderr only
    with MigrationFile(str(src)) as mf:
        page_bytes = total_bytes(mf)
        ram = sum(b.used_length for b in mf.blocks)

    # send: RAM bytes sent against the RAM bytes the file holds, all sent at the end.
    frames = bar_values(err_tx, "sending")
    assert frames, err_tx
    done, total, unit = frames[-1]
    assert total == in_unit(page_bytes, unit) == done
    assert binary_units_only(err_tx)

    # receive: bytes received against the guest's RAM size from its RAMBlock list.
    frames = bar_values(err_rx, "receiving")
    assert frames, err_rx
    done, total, unit = frames[-1]
    assert total == in_unit(ram, unit)
    assert done >= in_unit(page_bytes, unit)  # every page, and the stream around them
    assert binary_units_only(err_rx)
    # The summary line comes after the bar is gone.
    assert err_rx.rstrip().splitlines()[-1].startswith(f"{out}: ")
    with MigrationFile(str(out)) as got, MigrationFile(str(src)) as want:
        from fixedram.tools.verify import compare

        assert compare(got, want) == []


def test_send_receive_without_terminal(saves: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "received.mig"
    rx = subprocess.Popen([*FIXEDRAM, "receive", "tcp:127.0.0.1:0", "-o", str(out), "--json"],
                          cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert rx.stderr is not None
    m = re.fullmatch(r"fixedram: listening on tcp:127\.0\.0\.1:(\d+)\n",
                     rx.stderr.readline().decode())
    assert m is not None
    port = int(m[1])
    tx = plain(["send", str(saves["stream"]), f"tcp:127.0.0.1:{port}"], tmp_path)
    out_rx, err_rx = rx.communicate(timeout=120)
    assert (tx.returncode, tx.stdout, tx.stderr) == (0, b"", b"")
    assert rx.returncode == 0
    assert err_rx == b""  # nothing after the listening line
    assert b'"schema_version": 1' in out_rx


def test_send_to_stdout_without_terminal(saves: dict[str, Path], tmp_path: Path) -> None:
    """``send FILE -`` (QEMU's exec:) writes only the stream: no bar in it or beside it."""
    r = plain(["send", str(saves["mapped"]), "-"], tmp_path)
    assert r.returncode == 0 and r.stderr == b""
    assert r.stdout[:4] == b"QEVM"

