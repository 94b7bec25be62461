"""The QMP server under hostile clients, answered as QEMU 10 answers.

Each request is sent, as raw bytes, both to ``fixedram guest --qmp`` and to a
real ``qemu-system-x86_64 -qmp``: the first reply must have the same error
class and description (for JSON syntax errors, the same "JSON parse error"
prefix: the detail is the parser's), and the connection must go on answering
afterwards on both.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

FIXEDRAM = os.path.join(os.path.dirname(sys.executable), "fixedram")


def _ch(chans: Any) -> bytes:
    return json.dumps({"execute": "migrate", "arguments": {"channels": chans}}).encode()


def _caps(item: Any) -> bytes:
    return json.dumps({"execute": "migrate-set-capabilities",
                       "arguments": {"capabilities": [item]}}).encode()


FILE = {"transport": "file", "filename": "/nonexistent/x"}
# (name, bytes, negotiate first)
CASES: list[tuple[str, bytes, bool]] = [
    ("execute int before negotiation", b'{"execute": 1}', False),
    ("command before negotiation", b'{"execute": "query-status"}', False),
    ("execute int", b'{"execute": 1}', True),
    ("execute null", b'{"execute": null}', True),
    ("execute list", b'{"execute": ["a"]}', True),
    ("no execute", b'{"arguments": {}}', True),
    ("unexpected member", b'{"execute": "query-status", "foo": 1}', True),
    ("exec-oob", b'{"exec-oob": "query-status"}', True),
    ("arguments list", b'{"execute": "query-status", "arguments": []}', True),
    ("arguments null", b'{"execute": "query-status", "arguments": null}', True),
    ("argument on a command without", b'{"execute": "query-status", "arguments": {"x": 1}}',
     True),
    ("unknown command", b'{"execute": "no-such-command"}', True),
    ("command spelt with a dash", b'{"execute": "migrate-cancel"}', True),
    ("argument to migrate_cancel", b'{"execute": "migrate_cancel", "arguments": {"a": 1}}', True),
    ("qmp_capabilities twice", b'{"execute": "qmp_capabilities"}', True),
    ("non-object", b"[1, 2]", True),
    ("string", b'"hello"', True),
    ("number", b"42", True),
    ("malformed", b'{"execute": }', True),
    ("stray close", b"}", True),
    ("bad escape", b'{"execute": "query-status\\x"}', True),
    ("NaN", b'{"execute": "query-status", "id": NaN}', True),
    ("deep nesting", b"[" * 2000 + b"]" * 2000, True),
    ("deep arguments", b'{"execute": "query-status", "arguments": {"a": '
     + b"[" * 1100 + b"]" * 1100 + b"}}", True),
    ("id object echoed", b'{"execute": "query-status", "id": {"a": [1, "x"]}}', True),
    ("huge integer", b'{"execute": "migrate-set-parameters", "arguments": {"downtime-limit": '
     + b"9" * 5000 + b"}}", True),
    ("caps state string", _caps({"capability": "events", "state": "no"}), True),
    ("caps state int", _caps({"capability": "events", "state": 1}), True),
    ("caps state null", _caps({"capability": "events", "state": None}), True),
    ("caps item string", _caps("x"), True),
    ("caps item null", _caps(None), True),
    ("caps unknown", _caps({"capability": "nope", "state": True}), True),
    ("caps capability int", _caps({"capability": 5, "state": True}), True),
    ("caps missing state", _caps({"capability": "events"}), True),
    ("caps missing capability", _caps({"state": True}), True),
    ("caps extra member", _caps({"capability": "events", "state": True, "x": 1}), True),
    ("caps not a list", b'{"execute": "migrate-set-capabilities", "arguments": '
     b'{"capabilities": {"a": 1}}}', True),
    ("caps missing", b'{"execute": "migrate-set-capabilities", "arguments": {}}', True),
    ("caps extra argument", b'{"execute": "migrate-set-capabilities", "arguments": '
     b'{"capabilities": [], "z": 1}}', True),
    ("qmp_capabilities enable int", b'{"execute": "qmp_capabilities", "arguments": '
     b'{"enable": 1}}', True),
    ("channels string", _ch(["x"]), True),
    ("channels no addr", _ch([{"channel-type": "main"}]), True),
    ("channels no type", _ch([{"addr": FILE | {"offset": 0}}]), True),
    ("channels type int", _ch([{"channel-type": 1, "addr": FILE}]), True),
    ("channels type bad", _ch([{"channel-type": "x", "addr": FILE}]), True),
    ("channels addr string", _ch([{"channel-type": "main", "addr": "x"}]), True),
    ("channels no transport", _ch([{"channel-type": "main", "addr": {}}]), True),
    ("channels transport bad", _ch([{"channel-type": "main", "addr": {"transport": "x"}}]),
     True),
    ("channels file no filename", _ch([{"channel-type": "main",
                                        "addr": {"transport": "file"}}]), True),
    ("channels file name int", _ch([{"channel-type": "main",
                                     "addr": {"transport": "file", "filename": 5}}]), True),
    ("channels file no offset", _ch([{"channel-type": "main", "addr": FILE | {"x": 1}}]), True),
    ("channels file offset string", _ch([{"channel-type": "main",
                                          "addr": FILE | {"offset": "5"}}]), True),
    ("channels socket no type", _ch([{"channel-type": "main",
                                      "addr": {"transport": "socket"}}]), True),
    ("channels inet no host", _ch([{"channel-type": "main", "addr": {
        "transport": "socket", "type": "inet", "port": "1"}}]), True),
    ("channels inet port int", _ch([{"channel-type": "main", "addr": {
        "transport": "socket", "type": "inet", "host": "127.0.0.1", "port": 1}}]), True),
    ("channels unix path int", _ch([{"channel-type": "main", "addr": {
        "transport": "socket", "type": "unix", "path": 1}}]), True),
    ("channels exec args string", _ch([{"channel-type": "main", "addr": {
        "transport": "exec", "args": "true"}}]), True),
    ("channels exec args int", _ch([{"channel-type": "main", "addr": {
        "transport": "exec", "args": [1]}}]), True),
    ("channels two main", _ch([{"channel-type": "main", "addr": {
        "transport": "exec", "args": ["true"]}}] * 2), True),
    ("channels empty", _ch([]), True),
    ("migrate no arguments", b'{"execute": "migrate", "arguments": {}}', True),
    ("migrate uri int", b'{"execute": "migrate", "arguments": {"uri": 5}}', True),
    ("migrate detach string", b'{"execute": "migrate", "arguments": {"uri": "exec:true", '
     b'"detach": "x"}}', True),
    ("migrate unexpected", b'{"execute": "migrate", "arguments": {"uri": "exec:true", '
     b'"zzz": 1}}', True),
    ("incoming uri int", b'{"execute": "migrate-incoming", "arguments": {"uri": 1}}', True),
    ("incoming exit-on-error int", b'{"execute": "migrate-incoming", "arguments": '
     b'{"uri": "defer", "exit-on-error": 1}}', True),
]


class Peer:
    """A QMP server process (QEMU or fixedram) reached over its unix socket."""

    def __init__(self, cmd: list[str], sock: Path) -> None:
        self.sock = str(sock)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.sock):
            assert self.proc.poll() is None, self.proc.stderr.read()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "QMP socket did not appear"
            time.sleep(0.05)

    def connect(self) -> Client:
        return Client(self.sock)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Client:
    def __init__(self, path: str) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(10)
        self.s.connect(path)
        self.buf = b""
        greeting = self.read()
        assert "QMP" in greeting

    def read(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.s.recv(65536)
            assert chunk, "the server closed the connection"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        doc = json.loads(line)
        return doc if "event" not in doc else self.read()

    def ask(self, data: bytes) -> dict[str, Any]:
        self.s.sendall(data + b"\n")
        return self.read()

    def alive(self) -> None:
        """The connection still answers (after any further error replies QEMU
        gives to what was left of a bad message)."""
        self.s.sendall(b'{"execute": "query-status", "id": "alive"}\n')
        for _ in range(5000):
            doc = self.read()
            if doc.get("id") == "alive":
                assert "return" in doc, doc
                return
        raise AssertionError("no answer to query-status")

    def close(self) -> None:
        self.s.close()


@pytest.fixture(scope="module")
def peers(qemu: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Peer]]:
    d = tmp_path_factory.mktemp("qmp-abuse")
    # Both stopped before start (-S), so no command acts on a running guest.
    q = Peer([qemu, "-machine", "pc", "-m", "16M", "-nodefaults", "-display", "none", "-S",
              "-qmp", f"unix:{d / 'qemu.sock'},server=on,wait=off"], d / "qemu.sock")
    f = Peer([FIXEDRAM, "guest", "--qmp", str(d / "fr.sock"), "--ram", "16M", "-S",
              "--workload-rate", "0"], d / "fr.sock")
    yield {"qemu": q, "fixedram": f}
    q.close()
    f.close()


def _reply(peer: Peer, data: bytes, negotiate: bool) -> dict[str, Any]:
    c = peer.connect()  # QEMU serves one client at a time: one connection per case
    try:
        if negotiate:
            assert c.ask(b'{"execute": "qmp_capabilities"}') == {"return": {}}
        out = c.ask(data)
        if negotiate:
            c.alive()
        else:
            c.ask(b'{"execute": "qmp_capabilities"}')
            c.alive()
        return out
    finally:
        c.close()


@pytest.mark.qemu
@pytest.mark.parametrize("name,data,negotiate", CASES, ids=[c[0] for c in CASES])
def test_same_reply_as_qemu(peers: dict[str, Peer], name: str, data: bytes,
                            negotiate: bool) -> None:
    theirs = _reply(peers["qemu"], data, negotiate)
    ours = _reply(peers["fixedram"], data, negotiate)
    if "return" in theirs:
        assert "return" in ours, (ours, theirs)
        assert ours.get("id") == theirs.get("id")
        return
    assert "error" in ours, (ours, theirs)
    assert ours["error"]["class"] == theirs["error"]["class"], (ours, theirs)
    want, got = theirs["error"]["desc"], ours["error"]["desc"]
    if want.startswith("JSON parse error, "):
        assert got.startswith("JSON parse error, "), (got, want)
    else:
        assert got == want


def test_state_no_does_not_turn_a_capability_on(tmp_path: Path) -> None:
    peer = Peer([FIXEDRAM, "guest", "--qmp", str(tmp_path / "g.sock"), "--ram", "16M",
                 "--workload-rate", "0"], tmp_path / "g.sock")
    try:
        c = peer.connect()
        c.ask(b'{"execute": "qmp_capabilities"}')
        for state in (b'"no"', b'"yes"', b"1", b"0", b"null", b"[]"):
            r = c.ask(b'{"execute": "migrate-set-capabilities", "arguments": {"capabilities": '
                      b'[{"capability": "events", "state": ' + state + b"}]}}")
            assert r["error"]["desc"] == ("Invalid parameter type for 'capabilities[0].state', "
                                          "expected: boolean"), r
        caps = c.ask(b'{"execute": "query-migrate-capabilities"}')["return"]
        assert {x["capability"]: x["state"] for x in caps}["events"] is False
        c.alive()
    finally:
        peer.close()


def test_split_and_pipelined_input(tmp_path: Path) -> None:
    """Messages cut anywhere, several per write, garbage between them."""
    peer = Peer([FIXEDRAM, "guest", "--qmp", str(tmp_path / "g.sock"), "--ram", "16M",
                 "--workload-rate", "0"], tmp_path / "g.sock")
    try:
        c = peer.connect()
        stream = (b'{"execute": "qmp_capabilities"}{"execute": "query-status", "id": 1}'
                  b' {"execute": } {"execute": "query-status", "id": 2}\n'
                  b'\xff\xfe {"execute": "query-st\xc3\xa9tus", "id": 3}'
                  b'{"execute": "query-status", "id": 4}')
        for i in range(len(stream)):
            c.s.sendall(stream[i:i + 1])
        replies = [c.read() for _ in range(6)]
        assert replies[0] == {"return": {}}
        assert replies[1]["id"] == 1 and "return" in replies[1]
        assert replies[2]["error"]["desc"].startswith("JSON parse error")
        assert replies[3]["id"] == 2 and "return" in replies[3]
        # The invalid UTF-8 bytes, then a command that does not exist (with its id).
        assert replies[4]["error"]["desc"].startswith("JSON parse error")
        assert replies[5]["id"] == 3 and replies[5]["error"]["class"] == "CommandNotFound"
        assert c.read()["id"] == 4
        c.alive()
    finally:
        peer.close()


def test_oversized_message_and_many_clients(tmp_path: Path) -> None:
    peer = Peer([FIXEDRAM, "guest", "--qmp", str(tmp_path / "g.sock"), "--ram", "16M",
                 "--workload-rate", "0"], tmp_path / "g.sock")
    try:
        c = peer.connect()
        c.ask(b'{"execute": "qmp_capabilities"}')
        big = b'{"execute": "query-status", "id": "' + b"x" * (2 << 20) + b'"}'
        r = c.ask(big)
        assert r["error"]["desc"] == "JSON token size limit exceeded"
        c.alive()  # the rest of the oversized message was skipped, not misread
        idle = [peer.connect() for _ in range(20)]  # silent clients hold nothing up
        c.alive()
        for x in idle:
            x.close()
    finally:
        peer.close()
