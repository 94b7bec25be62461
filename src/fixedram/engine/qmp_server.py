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
'capabilities[0].state', expected: boolean"). Nothing a client sends can end
its connection except closing it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import CapabilityError, FixedramError
from ..transports.uri import MigrationURI
from .capabilities import PARAMETER_DEFAULTS, MigrationConfig, canonical_capability
from .guest import BuiltinGuest
from .incoming import Incoming
from .precopy import Migration

__all__ = ["GuestMachine", "QMPServer"]


class QMPError(Exception):
    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


class GuestMachine:
    """The guest plus migration state: what QMP commands act on.

    :param incoming: ``None`` (normal start), ``"defer"`` (wait for
        ``migrate-incoming``) or a URI to listen on at once.
    """

    def __init__(self, guest: BuiltinGuest, *, incoming: str | None = None,
                 autostart: bool = True) -> None:
        self.g = guest
        self.cfg = MigrationConfig()
        self.migration: Migration | None = None
        self.incoming: Incoming | None = None
        self.incoming_mode = incoming
        self.autostart = autostart
        self.emit: Callable[[str, dict[str, Any]], None] = lambda name, data: None
        self.quit_requested = threading.Event()
        if incoming is not None:
            self.g.stop("inmigrate")
            if incoming != "defer":
                self._start_incoming(incoming)
        elif not autostart:
            self.g.stop("prelaunch")

    # -- helpers -------------------------------------------------------------------

    def _mig_event(self, name: str, data: dict[str, Any]) -> None:
        if self.cfg.caps["events"]:
            self.emit(name, data)

    def _running_migration(self) -> bool:
        return any(m is not None and m.status not in ("none", "completed", "failed",
                                                      "cancelled")
                   for m in (self.migration, self.incoming))

    def _start_incoming(self, uri: str) -> None:
        inc = Incoming(self.g, self.cfg, uri, autostart=self.autostart,
                       on_event=self._mig_event)
        self.incoming = inc
        inc.start()

    @staticmethod
    def _uri_from(args: dict[str, Any]) -> str | MigrationURI:
        """The URI of ``uri`` or of the one main channel (arguments already
        checked against the schema)."""
        if "uri" in args:
            if args.get("channels"):
                raise QMPError("need either 'uri' or 'channels' argument")
            return str(args["uri"])
        chans = args.get("channels")
        if not chans:
            raise QMPError("need either 'uri' or 'channels' argument")
        if len(chans) != 1 or chans[0]["channel-type"] != "main":
            raise QMPError("Channel list has more than one main entry")
        a = chans[0]["addr"]
        t = a["transport"]
        if t == "file":
            # Built directly: a file name holding ",offset=" stays a file name.
            off = int(a["offset"])
            text = f"file:{a['filename']}" + (f",offset={off}" if off else "")
            return MigrationURI("file", text, path=a["filename"], offset=off)
        if t == "exec":
            return "exec:" + " ".join(a["args"])
        if t == "socket":
            st = a["type"]
            if st == "inet":
                return f"tcp:{a['host']}:{a['port']}"
            if st == "unix":
                return f"unix:{a['path']}"
            if st == "fd":
                return f"fd:{a['str']}"
        raise QMPError(f"transport {t!r} is not supported")

    def shutdown(self, timeout: float = 30.0) -> None:
        """Cancel a migration in progress and wait for it to clean up (its
        temporary file is removed), as QEMU does when it quits."""
        m = self.migration
        if m is not None and m.active:
            m.cancel()
            m.wait(timeout)

    # -- commands ------------------------------------------------------------------

    def execute(self, cmd: str, args: dict[str, Any]) -> Any:
        fn = getattr(self, "cmd_" + cmd.replace("-", "_"), None)
        if fn is None or cmd not in COMMAND_ARGS:
            raise QMPError(f"The command {cmd} has not been found", "CommandNotFound")
        check_arguments(COMMAND_ARGS[cmd], args)
        try:
            return fn(args)
        except QMPError:
            raise
        except FixedramError as e:
            raise QMPError(str(e)) from e
        except (KeyError, TypeError, ValueError) as e:
            raise QMPError(f"Invalid parameters: {e}") from e

    def cmd_query_status(self, a: dict[str, Any]) -> Any:
        return {"status": self.g.status, "running": self.g.running}

    def cmd_query_version(self, a: dict[str, Any]) -> Any:
        return QMPServer.version()

    def cmd_stop(self, a: dict[str, Any]) -> Any:
        if self.g.status == "inmigrate":
            self.autostart = False
            if self.incoming is not None:
                self.incoming.autostart = False
            return {}
        if self.g.running:
            self.g.stop()
            self.emit("STOP", {})
        return {}

    def cmd_cont(self, a: dict[str, Any]) -> Any:
        if self.g.status == "inmigrate":
            self.autostart = True
            if self.incoming is not None:
                self.incoming.autostart = True
            return {}
        if self.g.status == "finish-migrate":
            raise QMPError("Migration is not finalized yet")
        if not self.g.running:
            self.g.cont()
            self.emit("RESUME", {})
        return {}

    def cmd_migrate_set_capabilities(self, a: dict[str, Any]) -> Any:
        self.cfg.set_capabilities(a["capabilities"], migration_running=self._running_migration(),
                                  incoming_started=self.incoming is not None)
        return {}

    def cmd_migrate_set_parameters(self, a: dict[str, Any]) -> Any:
        self.cfg.set_parameters(a)
        return {}

    def cmd_query_migrate_capabilities(self, a: dict[str, Any]) -> Any:
        return self.cfg.query_capabilities()

    def cmd_query_migrate_parameters(self, a: dict[str, Any]) -> Any:
        return self.cfg.query_parameters()

    def cmd_migrate(self, a: dict[str, Any]) -> Any:
        if self._running_migration():
            raise QMPError("There's a migration process in progress")
        if self.g.status == "inmigrate":
            raise QMPError("Guest is waiting for an incoming migration")
        uri = self._uri_from(a)
        m = Migration(self.g, self.cfg, uri, on_event=self._mig_event)
        self.migration = m
        m.start()
        return {}

    def cmd_migrate_cancel(self, a: dict[str, Any]) -> Any:
        if self.migration is not None:
            self.migration.cancel()
        return {}

    def cmd_migrate_incoming(self, a: dict[str, Any]) -> Any:
        if self.incoming_mode is None:
            raise QMPError("'-incoming' was not specified on the command line")
        if self.incoming is not None:
            raise QMPError("The incoming migration has already been started")
        self._start_incoming(self._uri_from(a))
        return {}

    def cmd_query_migrate(self, a: dict[str, Any]) -> Any:
        if self.incoming is not None and self.migration is None:
            return self.incoming.query()
        if self.migration is None:
            return {}
        return self.migration.query()

    def cmd_x_query_ram_digest(self, a: dict[str, Any]) -> Any:
        """fixedram extension: BLAKE2b of guest RAM (to compare source and destination)."""
        return {"digest": self.g.digest(), "seq": self.g.seq}

    def cmd_quit(self, a: dict[str, Any]) -> Any:
        self.quit_requested.set()
        return {}


class QMPServer:
    """Serves a :class:`GuestMachine` on a unix socket, one thread per client."""

    def __init__(self, machine: GuestMachine, path: str) -> None:
        self.m = machine
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(4)
        self._clients: list[_Client] = []
        self._lock = threading.Lock()
        machine.emit = self.broadcast

    @staticmethod
    def version() -> dict[str, Any]:
        return {"qemu": {"major": 10, "minor": 0, "micro": 0},
                "package": f"fixedram {_version()}"}

    def serve_forever(self) -> None:
        threading.Thread(target=self._accept, daemon=True, name="qmp-accept").start()
        self.m.quit_requested.wait()
        self.broadcast("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        time.sleep(0.05)
        self.close()

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
        msg = {"event": event, "data": data,
               "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}}
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

    def run(self) -> None:
        self.send({"QMP": {"version": QMPServer.version(), "capabilities": []}})
        splitter = JSONSplitter()
        try:
            while True:
                chunk = self.conn.recv(65536)
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
            with contextlib.suppress(OSError):
                self.conn.close()

    def handle(self, obj: Any) -> None:
        out: dict[str, Any]
        try:
            cmd, args = check_request(obj)
            if cmd == "qmp_capabilities":
                check_arguments(COMMAND_ARGS[cmd], args)
                if self.negotiated:
                    raise QMPError("Capabilities negotiation is already complete, command "
                                   "ignored", "CommandNotFound")
                self.negotiated = True
                out = {"return": {}}
            elif not self.negotiated:
                raise QMPError("Expecting capabilities negotiation with 'qmp_capabilities'",
                               "CommandNotFound")
            else:
                out = {"return": self.srv.m.execute(cmd, args)}
        except QMPError as e:
            out = _err(e.desc, e.cls)
        except Exception as e:  # a bug must cost one reply, not the connection
            out = _err(f"internal error: {type(e).__name__}: {e}")
        if isinstance(obj, dict) and "id" in obj:
            out["id"] = obj["id"]
        self.send(out)


# -- input: messages, requests, arguments ------------------------------------------

MAX_CLIENTS = 32
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


class _BadLiteral(ValueError):
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


# A small QAPI schema: "str", "bool", "uint64", ("array", T), ("enum", check),
# ("struct", {member: (T, required)}), ("union", discriminator, base, {tag: members}).
Schema = Any


def _struct(**members: tuple[Schema, bool]) -> Schema:
    return ("struct", {k.replace("_", "-"): v for k, v in members.items()})


def _enum(*values: str) -> Schema:
    return ("enum", lambda v: v in values)


def _capability(v: str) -> bool:
    try:
        canonical_capability(v)
    except CapabilityError:
        return False
    return True


_INET = {"host": ("str", True), "port": ("str", True), "numeric": ("bool", False),
         "to": ("uint64", False), "ipv4": ("bool", False), "ipv6": ("bool", False),
         "keep-alive": ("bool", False)}
_SOCKET_ADDRESS = ("union", "type", {}, {
    "inet": _INET,
    "unix": {"path": ("str", True), "abstract": ("bool", False), "tight": ("bool", False)},
    "vsock": {"cid": ("str", True), "port": ("str", True)},
    "fd": {"str": ("str", True)},
})
_MIGRATION_ADDRESS = ("union", "transport", {}, {
    "socket": _SOCKET_ADDRESS,
    "exec": {"args": (("array", "str"), True)},
    "rdma": _INET,
    "file": {"filename": ("str", True), "offset": ("uint64", True)},
})
_CHANNELS = ("array", _struct(channel_type=(_enum("main", "cpr"), True),
                              addr=(_MIGRATION_ADDRESS, True)))
_NONE = _struct()
COMMAND_ARGS: dict[str, Schema] = {
    "qmp_capabilities": _struct(enable=(("array", _enum("oob")), False)),
    "query-status": _NONE, "query-version": _NONE, "stop": _NONE, "cont": _NONE,
    "query-migrate-capabilities": _NONE, "query-migrate-parameters": _NONE,
    "migrate_cancel": _NONE, "query-migrate": _NONE, "quit": _NONE,  # QEMU spells it so
    "x-query-ram-digest": _NONE,
    "migrate-set-capabilities": _struct(capabilities=(("array", _struct(
        capability=(("enum", _capability), True), state=("bool", True))), True)),
    # QAPI types here; names, enum values and ranges are MigrationConfig's checks.
    "migrate-set-parameters": ("struct", {
        k: ("bool" if isinstance(v, bool) else "uint64" if isinstance(v, int) else "str", False)
        for k, v in PARAMETER_DEFAULTS.items()}),
    "migrate": _struct(uri=("str", False), channels=(_CHANNELS, False),
                       detach=("bool", False), resume=("bool", False)),
    "migrate-incoming": _struct(uri=("str", False), channels=(_CHANNELS, False),
                                exit_on_error=("bool", False)),
}


def check_arguments(schema: Schema, args: dict[str, Any]) -> None:
    """Raise QEMU's QMPError for arguments that do not fit ``schema``."""
    _check_members(schema[1], args, "")


def _path(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _check(schema: Schema, v: Any, path: str, name: str) -> None:
    if schema == "str":
        if not isinstance(v, str):
            raise QMPError(f"Invalid parameter type for '{path}', expected: string")
    elif schema == "bool":
        if not isinstance(v, bool):
            raise QMPError(f"Invalid parameter type for '{path}', expected: boolean")
    elif schema == "uint64":
        # QEMU takes negative integers for backward compatibility, not floats.
        if not isinstance(v, int) or isinstance(v, bool) or not -(1 << 63) <= v < (1 << 64):
            raise QMPError(f"Parameter '{path}' expects uint64")
    elif schema[0] == "enum":
        if not isinstance(v, str):
            raise QMPError(f"Invalid parameter type for '{path}', expected: string")
        if not schema[1](v):
            raise QMPError(f"Parameter '{name}' does not accept value '{v}'")
    elif schema[0] == "array":
        if not isinstance(v, list):
            raise QMPError(f"Invalid parameter type for '{path}', expected: array")
        for i, item in enumerate(v):
            _check(schema[1], item, f"{path}[{i}]", name)
    elif schema[0] == "struct":
        if not isinstance(v, dict):
            raise QMPError(f"Invalid parameter type for '{path}', expected: object")
        _check_members(schema[1], v, path)
    elif schema[0] == "union":
        if not isinstance(v, dict):
            raise QMPError(f"Invalid parameter type for '{path}', expected: object")
        _check_members(_union_members(schema, v, path), v, path)
    else:  # pragma: no cover - schema typo
        raise AssertionError(schema)


def _union_members(schema: Schema, v: dict[str, Any], path: str
                   ) -> dict[str, tuple[Schema, bool]]:
    """The members a (flat) union object must have, once its tag is checked."""
    _, tag, base, variants = schema
    if tag not in v:
        raise QMPError(f"Parameter '{_path(path, tag)}' is missing")
    _check(("enum", lambda x: x in variants), v[tag], _path(path, tag), tag)
    variant = variants[v[tag]]
    members: dict[str, tuple[Schema, bool]] = {tag: ("str", True), **base}
    if isinstance(variant, tuple):  # a union flattened into this one (socket addresses)
        members.update(_union_members(variant, v, path))
    else:
        members.update(variant)
    return members


def _check_members(members: dict[str, tuple[Schema, bool]], v: dict[str, Any],
                   path: str) -> None:
    for name, (schema, required) in members.items():
        if name in v:
            _check(schema, v[name], _path(path, name), name)
        elif required:
            raise QMPError(f"Parameter '{_path(path, name)}' is missing")
    for name in v:
        if name not in members:
            raise QMPError(f"Parameter '{_path(path, name)}' is unexpected")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fixedram")
    except PackageNotFoundError:
        return "dev"


def _err(desc: str, cls: str = "GenericError") -> dict[str, Any]:
    return {"error": {"class": cls, "desc": desc}}
