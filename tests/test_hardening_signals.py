"""SIGINT, SIGTERM and SIGHUP in the middle of every long command leave nothing behind.

The real command line runs in a subprocess; the signal is sent once its
temporary output exists and holds data. The process must exit with status
128 + the signal number, one line on stderr and no traceback, and the
directory must hold nothing but the inputs.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

FIXEDRAM = [sys.executable, "-m", "fixedram.cli.main"]
SIGNALS = [signal.SIGTERM, signal.SIGHUP, signal.SIGINT]
# A guest that re-dirties RAM faster than the save may write: never converges.
NO_CONVERGE = ["--ram", "32M", "--live-for", "0.2", "--workload-rate", "1G",
               "--max-bandwidth", "16M", "--downtime-limit", "1"]


def _partials(d: Path) -> list[Path]:
    return [p for p in d.iterdir() if p.name.endswith(".partial")]


def _wait_for_partial(proc: subprocess.Popen[bytes], d: Path, min_bytes: int = 1,
                      timeout: float = 60) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1].decode()
        for p in _partials(d):
            try:
                if p.stat().st_blocks * 512 >= min_bytes:
                    return p
            except FileNotFoundError:
                pass
        time.sleep(0.01)
    raise AssertionError(f"no temporary output with data in {d}")


def _interrupt(proc: subprocess.Popen[bytes], sig: int, d: Path, inputs: set[str],
               send: bool = True) -> None:
    if send:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    text = err.decode()
    assert proc.returncode == 128 + sig, text
    assert "Traceback" not in text, text
    assert len(text.strip().splitlines()) == 1, text
    assert signal.Signals(sig).name in text, text
    left = {p.name for p in d.iterdir()} - inputs
    assert not left, f"left behind after {signal.Signals(sig).name}: {left}"


@pytest.fixture(scope="module")
def guest_stream(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A complete stream of the built-in guest (the engine, no QEMU)."""
    d = tmp_path_factory.mktemp("stream")
    subprocess.run([*FIXEDRAM, "save", str(d / "g.mig"), "--ram", "64M", "--fill", "1"],
                   check=True, capture_output=True)
    return (d / "g.mig").read_bytes()


@pytest.fixture(scope="module")
def big_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("big")
    subprocess.run([*FIXEDRAM, "save", str(d / "big.mig"), "--ram", "512M", "--fill", "1"],
                   check=True, capture_output=True)
    return d / "big.mig"


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_receive_with_a_partial_stream(sig: int, tmp_path: Path, guest_stream: bytes) -> None:
    sock = tmp_path / "rx.sock"
    proc = subprocess.Popen([*FIXEDRAM, "receive", f"unix:{sock}", "-o",
                             str(tmp_path / "vm.mig")], stderr=subprocess.PIPE)
    assert proc.stderr is not None
    assert "listening on" in proc.stderr.readline().decode()
    c = socket.socket(socket.AF_UNIX)
    c.connect(str(sock))
    try:
        c.sendall(guest_stream[:len(guest_stream) // 2])  # then the source goes quiet
        _wait_for_partial(proc, tmp_path, 1 << 20)
        _interrupt(proc, sig, tmp_path, set())
    finally:
        c.close()


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
@pytest.mark.parametrize("layout", [[], ["--mapped-ram", "--multifd", "2"]],
                         ids=["stream", "mapped-ram-multifd"])
def test_save_that_never_converges(sig: int, layout: list[str], tmp_path: Path) -> None:
    proc = subprocess.Popen([*FIXEDRAM, "save", str(tmp_path / "vm.mig"), *NO_CONVERGE,
                             *layout], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for_partial(proc, tmp_path, 1 << 20)
    time.sleep(0.3)  # well into the passes
    _interrupt(proc, sig, tmp_path, set())


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
@pytest.mark.parametrize("to", ["mapped-ram", "stream"])
def test_convert_of_a_big_file(sig: int, to: str, tmp_path: Path, big_input: Path) -> None:
    proc = subprocess.Popen([*FIXEDRAM, "convert", str(big_input), str(tmp_path / "out.mig"),
                             "--to", to], stderr=subprocess.PIPE)
    p = _wait_for_partial(proc, tmp_path, 1 << 20)
    os.kill(proc.pid, signal.SIGSTOP)  # hold it mid-copy, whatever the disk speed
    try:
        assert p.exists(), "the conversion finished before it could be interrupted"
        proc.send_signal(sig)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    _interrupt(proc, sig, tmp_path, set(), send=False)


def test_second_signal_during_cleanup(tmp_path: Path) -> None:
    proc = subprocess.Popen([*FIXEDRAM, "save", str(tmp_path / "vm.mig"), *NO_CONVERGE,
                             "--mapped-ram", "--multifd", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for_partial(proc, tmp_path, 1 << 20)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)  # while the first one is being cleaned up
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()
    assert "Traceback" not in err.decode()
    assert not list(tmp_path.iterdir())


def test_guest_quits_during_a_qmp_save(tmp_path: Path) -> None:
    """``fixedram guest`` gets SIGTERM while a QMP ``migrate`` to a file runs."""
    sock = tmp_path / "qmp.sock"
    proc = subprocess.Popen([*FIXEDRAM, "guest", "--qmp", str(sock), "--ram", "32M",
                             "--workload-rate", "1G"], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not sock.exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    c = socket.socket(socket.AF_UNIX)
    c.connect(str(sock))
    f = c.makefile("rwb")
    f.readline()
    for cmd in (b'{"execute": "qmp_capabilities"}',
                b'{"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 16777216,'
                b' "downtime-limit": 1}}',
                b'{"execute": "migrate", "arguments": {"uri": "file:' + str(
                    tmp_path / "vm.mig").encode() + b'"}}'):
        f.write(cmd + b"\n")
        f.flush()
        assert b"return" in f.readline()
    try:
        _wait_for_partial(proc, tmp_path, 1 << 20)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        f.close()
        c.close()
    assert {p.name for p in tmp_path.iterdir()} <= {"qmp.sock"}, list(tmp_path.iterdir())


def test_nohup_keeps_sighup_ignored(tmp_path: Path) -> None:
    """Under nohup (SIGHUP ignored) a save goes on through a hang-up."""
    def ignore_hup() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    proc = subprocess.Popen([*FIXEDRAM, "save", str(tmp_path / "vm.mig"), "--ram", "32M",
                             "--live-for", "0.2", "--workload-rate", "64M",
                             "--max-bandwidth", "64M"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=ignore_hup)
    _wait_for_partial(proc, tmp_path)
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert [p.name for p in tmp_path.iterdir()] == ["vm.mig"]
