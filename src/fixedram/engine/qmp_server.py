"""A QMP server for the built-in guest, so the tools that drive QEMU drive it too.

Wire format per the QMP spec: a greeting ``{"QMP": {"version": ...,
"capabilities": []}}``; then JSON objects in both directions (the client is
not obliged to send newlines, so input is decoded as a stream of objects);
answers ``{"return": ...}`` or ``{"error": {"class": ..., "desc": ...}}``,
echoing ``id``; asynchronous events with a timestamp. Commands are refused
until ``qmp_capabilities``, as QEMU does.

Clients are untrusted. Input is split into messages the way QEMU's JSON
streamer does (by counting brackets), so a malformed message gets an error
reply and the next one is read normally; a message is bounded in size and
nesting (QEMU's limits and words: "JSON nesting depth limit exceeded").
Arguments are checked against the commands' QAPI schema before anything acts
on them, with QEMU's messages ("Invalid parameter type for
'capabilities[0].state', expected: boolean"; :mod:`fixedram.engine.qapi`).
Nothing a client sends can end its connection except closing it.

Descriptors passed with SCM_RIGHTS (for ``getfd`` and ``add-fd``) are kept
as QEMU's socket chardev keeps them: those of the latest message that
carried any, the first one going to the next command that takes one.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import threading
import time
from typing import Any

from ..errors import FixedramError, OutputError
from ..output import unlink_stale_socket
from .machine import GuestMachine, close_quietly
from .qapi import QAPIError, check_arguments

__all__ = ["GuestMachine", "QMPServer"]

QMPError = QAPIError  # the error an answer carries: QEMU's class and words


class QMPServer:
    """Serves a :class:`GuestMachine` on a unix socket, one thread per client."""

    def __init__(self, machine: GuestMachine, path: str) -> None:
        self.m = machine
        self.path = path
        try:
            unlink_stale_socket(path)  # a user's file under that name is never removed
        except OSError as e:
            raise OutputError(f"{path}: {e.strerror}") from e
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(4)
        self._clients: list[_Client] = []
        self._lock = threading.Lock()
        self._busy = 0  # commands being run or answered
        machine.emit = self.broadcast

    def version(self) -> dict[str, Any]:
        return self.m.cmd_query_version({})

    def serve_forever(self) -> int:
        """Serve until ``quit`` (or exit-on-error); returns the exit status."""
        threading.Thread(target=self._accept, daemon=True, name="qmp-accept").start()
        self.m.quit_requested.wait()
        # Answers being written go out first (the migrate-incoming whose load
        # failed at once is answered before the process exits, as in QEMU).
        deadline = time.monotonic() + 2
        while self._busy and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.m.exit_code == 0:  # QEMU's exit after a failed load sends no event
            self.broadcast("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
            time.sleep(0.05)
        self.close()
        return self.m.exit_code

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                full = len(self._clients) >= MAX_CLIENTS
            if full:  # a thread per client: a flood must not exhaust them
                with contextlib.suppress(OSError):
                    conn.close()
                continue
            c = _Client(self, conn)
            with self._lock:
                self._clients.append(c)
            threading.Thread(target=c.run, daemon=True, name="qmp-client").start()

    def broadcast(self, event: str, data: dict[str, Any]) -> None:
        now = time.time()
        msg: dict[str, Any] = {"event": event}
        if data:  # QEMU sends no "data" for events without members (STOP, RESUME)
            msg["data"] = data
        msg["timestamp"] = {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}
        with self._lock:
            clients = [c for c in self._clients if c.negotiated]
        for c in clients:
            c.send(msg)

    def drop(self, c: _Client) -> None:
        with self._lock:
            if c in self._clients:
                self._clients.remove(c)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with self._lock:
            for c in self._clients:
                c.close()
            self._clients.clear()


class _Client:
    def __init__(self, srv: QMPServer, conn: socket.socket) -> None:
        self.srv = srv
        self.conn = conn
        self.negotiated = False
        self.fds: list[int] = []  # received with SCM_RIGHTS, not yet taken
        self._wlock = threading.Lock()
        # A client that stops reading must not block events to the others.
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                            struct.pack("ll", SEND_TIMEOUT, 0))

    def send(self, obj: dict[str, Any]) -> None:
        try:
            text = json.dumps(obj)
        except (RecursionError, ValueError):
            obj.pop("id", None)  # an id too deep to echo
            text = json.dumps(obj)
        data = (text + "\r\n").encode()
        with self._wlock:
            try:
                self.conn.sendall(data)
            except OSError:
                self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_RDWR)
        self.conn.close()

    def _recv(self) -> bytes:
        data, anc, _, _ = self.conn.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * 4))
        fds: list[int] = []
        for level, typ, payload in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                n = len(payload) // 4
                fds += list(struct.unpack(f"{n}i", payload[:n * 4]))
        if fds:
            # New descriptors replace those no command took (QEMU closes them).
            close_quietly(self.fds)
            self.fds = fds
            for fd in fds:
                os.set_inheritable(fd, False)
        return data

    def run(self) -> None:
        self.send({"QMP": {"version": self.srv.version(), "capabilities": []}})
        splitter = JSONSplitter()
        try:
            while True:
                chunk = self._recv()
                if not chunk:
                    return
                for msg in splitter.feed(chunk):
                    if isinstance(msg, QMPError):
                        self.send(_err(msg.desc, msg.cls))
                    else:
                        self.handle(msg)
        except OSError:
            return
        finally:
            self.srv.drop(self)
            close_quietly(self.fds)
            self.fds = []
            with contextlib.suppress(OSError):
                self.conn.close()

    def handle(self, obj: Any) -> None:
        with self.srv._lock:
            self.srv._busy += 1
        try:
            self._handle(obj)
        finally:
            with self.srv._lock:
                self.srv._busy -= 1

    def _handle(self, obj: Any) -> None:
        out: dict[str, Any]
        try:
            cmd, args = check_request(obj)
            if cmd == "qmp_capabilities":
                check_arguments(cmd, args)
                if self.negotiated:
                    raise QMPError("Capabilities negotiation is already complete, command "
                                   "ignored", "CommandNotFound")
                self.negotiated = True
                out = {"return": {}}
            elif not self.negotiated:
                raise QMPError("Expecting capabilities negotiation with 'qmp_capabilities'",
                               "CommandNotFound")
            else:
                out = {"return": self.srv.m.execute(cmd, args, self.fds)}
        except QMPError as e:
            out = _err(e.desc, e.cls)
        except Exception as e:  # a bug must cost one reply, not the connection
            out = _err(f"internal error: {type(e).__name__}: {e}")
        if isinstance(obj, dict) and "id" in obj:
            out["id"] = obj["id"]
        self.send(out)


# -- input: messages, requests, arguments ------------------------------------------

MAX_CLIENTS = 32
MAX_FDS = 16  # descriptors taken from one message (QEMU's TCP_MAX_FDS)
SEND_TIMEOUT = 10  # seconds a client may leave a reply unread
MAX_MESSAGE = 1 << 20  # bytes of one JSON message (QEMU allows more; no command needs it)
MAX_NESTING = 1024  # QEMU's MAX_NESTING


class JSONSplitter:
    """Bytes in, JSON messages out, as QEMU's JSON streamer splits them.

    A message ends where its brackets balance (or with a scalar at the top
    level). A stray closing bracket or a parse error becomes a
    :class:`QMPError` in the message's place; a message over the size or
    nesting limit becomes one too, and the rest of it is skipped (still
    followed, never stored) up to where its brackets balance, so that the
    next message is read normally and memory stays bounded.
    """

    def __init__(self) -> None:
        self.buf = bytearray()
        self.depth = 0
        self.in_str = False
        self.esc = False
        self.scalar = False  # inside a top-level number or literal
        self.skipping = False  # inside a message already answered with an error

    def feed(self, data: bytes) -> list[Any]:
        out: list[Any] = []
        for ch in data:
            self._byte(ch, out)
        return out

    def _reset(self) -> None:
        self.buf.clear()
        self.depth = 0
        self.in_str = self.esc = self.scalar = self.skipping = False

    def _emit(self, out: list[Any]) -> None:
        if not self.skipping:
            out.append(_decode(bytes(self.buf)))
        self._reset()

    def _fail(self, out: list[Any], desc: str) -> None:
        if not self.skipping:
            out.append(QMPError(desc))
            self.skipping = True
            self.buf.clear()

    def _add(self, ch: int, out: list[Any]) -> None:
        if self.skipping:
            return
        self.buf.append(ch)
        if len(self.buf) > MAX_MESSAGE:
            self._fail(out, "JSON token size limit exceeded")

    def _byte(self, ch: int, out: list[Any]) -> None:
        if self.scalar:
            if ch not in _DELIMS:
                self._add(ch, out)
                return
            self._emit(out)  # the scalar ends here; this byte starts anew
        if self.in_str:
            self._add(ch, out)
            if self.esc:
                self.esc = False
            elif ch == 0x5C:  # backslash
                self.esc = True
            elif ch == 0x22:
                self.in_str = False
                if self.depth == 0:
                    self._emit(out)  # a top-level string
            return
        if ch in b" \t\r\n":
            if self.depth:
                self._add(ch, out)
            return
        self._add(ch, out)
        if ch in b"{[":
            self.depth += 1
            if self.depth > MAX_NESTING:
                self._fail(out, "JSON nesting depth limit exceeded")
        elif ch in b"}]":
            self.depth -= 1
            if self.depth < 0:
                out.append(_parse_error("expecting value"))
                self._reset()
            elif self.depth == 0:
                self._emit(out)
        elif ch == 0x22:
            self.in_str = True
        elif self.depth == 0:
            self.scalar = True


_DELIMS = frozenset(b" \t\r\n{}[],:\"")


class _BadLiteral(FixedramError, ValueError):
    pass


def _int(text: str) -> int | float:
    # QEMU keeps integers beyond 64 bits as doubles; Python's digit limit
    # must never be reached by client input.
    return int(text) if len(text) <= 20 else float(text)


def _constant(text: str) -> Any:
    raise _BadLiteral(text)


def _parse_error(what: str) -> QMPError:
    return QMPError(f"JSON parse error, {what}")


def _decode(raw: bytes) -> Any:
    """One message's bytes as a JSON value, or the QMPError QEMU would reply."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return _parse_error("invalid UTF-8 sequence in input")
    try:
        return json.loads(text, parse_int=_int, parse_constant=_constant)
    except _BadLiteral as e:
        return _parse_error(f"stray '{str(e)[:1]}'")
    except RecursionError:
        return QMPError("JSON nesting depth limit exceeded")
    except json.JSONDecodeError as e:
        return _parse_error(_JSON_WORDS.get(e.msg, e.msg[0].lower() + e.msg[1:]))


# Python's words for a parse error -> QEMU's, where QEMU has its own.
_JSON_WORDS = {"Invalid \\escape": "invalid escape sequence in string"}


def check_request(obj: Any) -> tuple[str, dict[str, Any]]:
    """The command and arguments of a request, checked as QEMU's dispatcher does."""
    if not isinstance(obj, dict):
        raise QMPError("QMP input must be a JSON object")
    for key, v in obj.items():
        if key == "execute":
            if not isinstance(v, str):
                raise QMPError("QMP input member 'execute' must be a string")
        elif key == "arguments":
            if not isinstance(v, dict):
                raise QMPError("QMP input member 'arguments' must be an object")
        elif key != "id":
            raise QMPError(f"QMP input member '{key}' is unexpected")
    if "execute" not in obj:
        raise QMPError("QMP input lacks member 'execute'")
    return obj["execute"], obj.get("arguments", {})


def _err(desc: str, cls: str = "GenericError") -> dict[str, Any]:
    return {"error": {"class": cls, "desc": desc}}
