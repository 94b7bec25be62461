"""``fixedram receive`` against multifd sources that get the channels wrong.

The peers are forged in-process over real sockets with the project's own
codecs (a StreamWriter main stream, multifd init messages from
``fixedram.format.multifd``).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from pathlib import Path

import pytest

from fixedram.cli.main import main
from fixedram.format.machine import MachineState
from fixedram.format.migfile import MigrationFile
from fixedram.format.multifd import MULTIFD_MAGIC_BYTES, encode_init
from fixedram.format.writer import BlockSpec, StreamWriter

PS = 4096
BLOCK = BlockSpec("pc.ram", 64 * PS)


def _connect(address: str) -> socket.socket:
    kind, rest = address.split(":", 1)
    if kind == "unix":
        s = socket.socket(socket.AF_UNIX)
        s.connect(rest)
        return s
    host, port = rest.rsplit(":", 1)
    return socket.create_connection((host.strip("[]"), int(port)))


def _send(s: socket.socket, data: bytes | memoryview) -> None:
    # The receiver may refuse the source at any point: what it says is under test.
    with contextlib.suppress(OSError):
        s.sendall(data)



# -- 1. a channel that closes at once, while the receiver counts and joins --------------------


def _closing_source(address: str, i: int, stop: threading.Event) -> None:
    """A whole main stream, and channels that connect and close at once: even
    runs send a whole init message first (the channel simply ends), odd runs
    only the multifd magic (closed before its init message)."""
    while not stop.is_set():  # the receiver is starting
        try:
            main = _connect(address)
            break
        except OSError:
            time.sleep(0.002)
    else:
        return
    with main:
        w = StreamWriter(lambda b: _send(main, b), MachineState("pc-q35-10.0"), [BLOCK])
        w.begin(multifd_flush=True)
        for cid in range(8):
            with contextlib.suppress(OSError), _connect(address) as c:
                c.sendall(encode_init(cid) if i % 2 == 0 else MULTIFD_MAGIC_BYTES)
        w.begin_part(end=True)
        w.multifd_flush()
        w.end_part()
        w.finish()


def test_channels_closing_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Channel threads were listed under the lock but started after it: the
    end of the migration could join one not yet started ("cannot join thread
    before it is started", a traceback). The CLI runs in-process so that 200
    runs take seconds; a thread that dies with an exception fails the test."""
    died: list[str] = []
    hook = threading.excepthook
    threading.excepthook = lambda a: died.append(f"{a.thread}: {a.exc_type.__name__}: "
                                                 f"{a.exc_value}")
    outcomes = {"ok": 0, "error": 0}
    try:
        for i in range(200):
            sock = tmp_path / f"rx{i}.sock"
            out = tmp_path / f"out{i}" / "vm.mig"
            out.parent.mkdir()
            stop = threading.Event()
            peer = threading.Thread(target=_closing_source, args=(f"unix:{sock}", i, stop),
                                    daemon=True)
            peer.start()
            try:
                rc = main(["receive", f"unix:{sock}", "-o", str(out), "--json",
                           "--accept-timeout", "10", "--peer-timeout", "2"])
            finally:
                stop.set()
                peer.join(10)
            std = capsys.readouterr()
            lines = std.err.splitlines()
            assert "Traceback" not in std.err, (i, std.err)
            assert all(line.startswith(("fixedram: listening on ", "fixedram: closed a "
                                        "connection from ", "fixedram: error: "))
                       for line in lines), (i, std.err)
            errors = [line for line in lines if line.startswith("fixedram: error: ")]
            if rc == 0:
                assert errors == [], (i, std.err)
                assert json.loads(std.out)["multifd_channels"] <= 8
                with MigrationFile(out) as mf:
                    assert mf.complete
                outcomes["ok"] += 1
            else:
                assert rc == 1 and len(errors) == 1, (i, std.err)
                assert list(out.parent.iterdir()) == [], (i, std.err)
                outcomes["error"] += 1
    finally:
        threading.excepthook = hook
    assert died == []
    # Both endings were met: whole-init channels end cleanly, magic-only ones are errors.
    assert outcomes["ok"] and outcomes["error"], outcomes
