"""``fixedram receive`` against multifd sources that get the channels wrong.

The peers are forged in-process over real sockets with the project's own
codecs (a StreamWriter main stream, multifd init/packets from
``fixedram.format.multifd``), ordered as QEMU 10 sends them: every channel
connected and its init message sent before the main stream's first byte, a
SYNC on every channel after the RAM setup, one round of pages, a SYNC, and
the completion SYNC. One test puts a real QEMU 10 source behind a wrong
``--multifd-channels``.

Each fault must end with one ``fixedram: error:`` line and a non-zero exit,
well before the 60 s drain timeout, and leave nothing under the output
name: no file, no hidden temporary.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bridge_helpers import MIB, Receiver, connect_to

from fixedram.cli.main import main
from fixedram.format.machine import MachineState
from fixedram.format.migfile import MigrationFile
from fixedram.format.multifd import MULTIFD_MAGIC_BYTES, encode_init, encode_packet, encode_sync
from fixedram.format.writer import BlockSpec, StreamWriter
from qemu_harness import MigrationFailed

PS = 4096
BLOCK = BlockSpec("pc.ram", 64 * PS)
# A behaviour bound, not a benchmark: far below receive's 60 s DRAIN_TIMEOUT.
PROMPT = 10.0
EMPTY = np.zeros(0, dtype=np.int64)


def _page(k: int) -> bytes:
    return bytes([k + 1]) * PS


def _send(s: socket.socket, data: bytes | memoryview) -> None:
    # The receiver may refuse the source at any point: what it says is under test.
    with contextlib.suppress(OSError):
        s.sendall(data)


class Source:
    """A socket-multifd source with one channel per entry of ``ids`` (its
    init message's channel id), as QEMU 10 orders its bytes.

    ``main_ends=False`` stops the main stream after the RAM setup (its
    MULTIFD_FLUSH): only the channels' SYNCs can then show what is missing.
    Until then the sockets stay open (until :meth:`close`), as a QEMU source
    waiting for its destination keeps them.
    """

    def __init__(self, address: str, ids: Sequence[int], *, main_ends: bool = True) -> None:
        self.address = address
        self.ids = list(ids)
        self.main_ends = main_ends
        self.socks: list[socket.socket] = []
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        chans = []
        for cid in self.ids:
            c = connect_to(self.address)
            self.socks.append(c)
            _send(c, encode_init(cid))
            chans.append(c)
        main = connect_to(self.address)
        self.socks.append(main)
        w = StreamWriter(lambda b: _send(main, b), MachineState("pc-q35-10.0"), [BLOCK])
        w.begin(multifd_flush=True)
        num = 0

        def sync() -> None:
            nonlocal num
            for c in chans:
                _send(c, encode_sync(num))
                num += 1

        sync()  # the setup sync, paired with the FLUSH ending the block list
        if not self.main_ends:
            return
        w.begin_part()
        for k, c in enumerate(chans):  # page k on channel k
            _send(c, encode_packet(0, num, BLOCK.idstr, np.array([k]), EMPTY) + _page(k))
            num += 1
        sync()
        w.multifd_flush()
        w.end_part()
        w.begin_part(end=True)
        sync()  # the completion sync
        w.multifd_flush()
        w.end_part()
        w.finish()
        for s in self.socks:  # done: QEMU closes its channels once the migration completed
            s.close()

    def close(self) -> None:
        self.t.join(10)
        for s in self.socks:
            s.close()


@contextlib.contextmanager
def _receiving(tmp_path: Path, *extra: str) -> Iterator[tuple[Receiver, Path]]:
    """``fixedram receive`` on a unix socket into ``tmp_path/out/vm.mig``."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rx = Receiver(f"unix:{tmp_path / 'rx.sock'}", out_dir / "vm.mig", "--peer-timeout", "2",
                  *extra)
    try:
        yield rx, out_dir
    finally:
        rx.kill()


def _refused(rx: Receiver, src: Source | None, out_dir: Path, t0: float,
             status: int = 1) -> str:
    """The one error line of a receiver that must refuse its source promptly, with exit
    ``status`` (1 could not, e.g. channels missing; 2 a malformed migration)."""
    try:
        rc, _doc, err = rx.wait(PROMPT + 20)  # past PROMPT: a hang fails below, not here
    finally:
        if src is not None:
            src.close()
    elapsed = time.monotonic() - t0
    assert rc == status, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("fixedram: error: ")]
    assert len(errors) == 1, err
    assert elapsed < PROMPT, f"{elapsed:.1f} s: {err}"
    assert sorted(p.name for p in out_dir.iterdir()) == []  # no file, no hidden temporary
    return errors[0]


def _counts(line: str) -> tuple[int, int]:
    m = re.search(r"(\d+) of (\d+) multifd channels connected", line)
    assert m, line
    told = re.search(r"--multifd-channels (\d+)", line)
    assert told and told[1] == m[2], line
    return int(m[1]), int(m[2])


# -- a forged source that gets it right: the forger is sound ---------------------------------


@pytest.mark.parametrize("told", [None, 3])
def test_forged_source_completes(tmp_path: Path, told: int | None) -> None:
    with _receiving(tmp_path, *([] if told is None else ["--multifd-channels", str(told)])
                    ) as (rx, out_dir):
        src = Source(rx.address, [0, 1, 2])
        try:
            rc, doc, err = rx.wait(30)
        finally:
            src.close()
    assert rc == 0, err
    assert doc is not None and doc["multifd_channels"] == 3 and doc["sync_rounds"] == 3
    with MigrationFile(out_dir / "vm.mig") as mf:
        assert mf.complete and mf.format == "mapped-ram"
        b = mf.block("pc.ram")
        for k in range(3):
            assert b.read(k * PS, PS) == _page(k)
        assert b.read(3 * PS, PS) == bytes(PS)


# -- 1. a channel that closes at once, while the receiver counts and joins --------------------


def _closing_source(address: str, i: int, stop: threading.Event) -> None:
    """A whole main stream, and channels that connect and close at once: even
    runs send a whole init message first (the channel simply ends), odd runs
    only the multifd magic (closed before its init message)."""
    while not stop.is_set():  # the receiver is starting
        try:
            m = connect_to(address)
            break
        except OSError:
            time.sleep(0.002)
    else:
        return
    with m:
        w = StreamWriter(lambda b: _send(m, b), MachineState("pc-q35-10.0"), [BLOCK])
        w.begin(multifd_flush=True)
        for cid in range(8):
            with contextlib.suppress(OSError), connect_to(address) as c:
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


# -- 2. fewer channels than --multifd-channels -----------------------------------------------


@pytest.mark.parametrize(("ids", "told", "main_ends", "when"), [
    ([0, 1], 3, False, "by the first SYNC packet"),  # only the SYNCs can tell
    ([0, 1], 3, True, None),  # whichever comes first: the SYNCs or the main stream's end
    ([], 2, True, "by the end of the main stream"),  # no channel, hence no SYNC, at all
], ids=["2of3-main-waits", "2of3-whole", "0of2"])
def test_fewer_channels_than_told(tmp_path: Path, ids: list[int], told: int, main_ends: bool,
                                  when: str | None) -> None:
    with _receiving(tmp_path, "--multifd-channels", str(told)) as (rx, out_dir):
        t0 = time.monotonic()
        src = Source(rx.address, ids, main_ends=main_ends)
        line = _refused(rx, src, out_dir, t0)
    assert _counts(line) == (len(ids), told)
    if when is not None:
        assert when in line, line


@pytest.mark.qemu
def test_qemu_with_fewer_channels_than_told(tmp_path: Path,
                                            vm_factory: Callable[..., Any]) -> None:
    with _receiving(tmp_path, "--multifd-channels", "4") as (rx, out_dir):
        src = vm_factory("q35", memory=64 * MIB)
        src.stop()
        src.set_caps(multifd=True)
        src.set_params(multifd_channels=2)
        t0 = time.monotonic()
        src.migrate(rx.address, wait=False)
        line = _refused(rx, None, out_dir, t0)
        with pytest.raises(MigrationFailed):  # the source is told too: its sockets close
            src.wait_migration(30)
    assert _counts(line) == (2, 4)


# -- 3. two connections with one channel id --------------------------------------------------


@pytest.mark.parametrize(("ids", "told"), [([0, 0], None), ([0, 1, 1], 3), ([1, 0, 1], None)])
def test_channel_id_twice(tmp_path: Path, ids: list[int], told: int | None) -> None:
    dup = next(c for k, c in enumerate(ids) if c in ids[:k])
    with _receiving(tmp_path, *([] if told is None else ["--multifd-channels", str(told)])
                    ) as (rx, out_dir):
        t0 = time.monotonic()
        src = Source(rx.address, ids)
        line = _refused(rx, src, out_dir, t0, status=2)  # a malformed multifd migration
    assert f"multifd channel {dup}: channel id {dup} received twice" in line, line


def test_channel_id_past_the_count(tmp_path: Path) -> None:
    """QEMU refuses an id at or past its multifd-channels; so does --multifd-channels."""
    with _receiving(tmp_path, "--multifd-channels", "2") as (rx, out_dir):
        t0 = time.monotonic()
        src = Source(rx.address, [0, 2])
        line = _refused(rx, src, out_dir, t0, status=2)
    assert "channel id 2, but --multifd-channels 2 numbers them 0 to 1" in line, line
