"""A QMP server for the built-in guest, so the tools that drive QEMU drive it too.

Wire format per the QMP spec: a greeting ``{"QMP": {"version": ...,
"capabilities": []}}``; then JSON objects in both directions (the client is
not obliged to send newlines, so input is decoded as a stream of objects);
answers ``{"return": ...}`` or ``{"error": {"class": ..., "desc": ...}}``,
echoing ``id``; asynchronous events with a timestamp. Commands are refused
until ``qmp_capabilities``, as QEMU does.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import FixedramError
from .capabilities import MigrationConfig
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
    def _uri_from(args: dict[str, Any]) -> str:
        if "uri" in args:
            if "channels" in args:
                raise QMPError("need either 'uri' or 'channels' argument")
            return str(args["uri"])
        chans = args.get("channels")
        if not chans:
            raise QMPError("need either 'uri' or 'channels' argument")
        if len(chans) != 1 or chans[0].get("channel-type", "main") != "main":
            raise QMPError("Channel list has more than one entries")
        a = chans[0]["addr"]
        t = a.get("transport")
        if t == "file":
            off = int(a.get("offset", 0))
            return f"file:{a['filename']}" + (f",offset={off}" if off else "")
        if t == "exec":
            return "exec:" + " ".join(a["args"])
        if t == "socket":
            st = a.get("type")
            if st == "inet":
                return f"tcp:{a['host']}:{a['port']}"
            if st == "unix":
                return f"unix:{a['path']}"
            if st == "fd":
                return f"fd:{a['str']}"
        raise QMPError(f"transport {t!r} is not supported")

    # -- commands ------------------------------------------------------------------

    def execute(self, cmd: str, args: dict[str, Any]) -> Any:
        fn = getattr(self, "cmd_" + cmd.replace("-", "_"), None)
        if fn is None:
            raise QMPError(f"The command {cmd} has not been found", "CommandNotFound")
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

    def send(self, obj: dict[str, Any]) -> None:
        data = (json.dumps(obj) + "\r\n").encode()
        with self._wlock, contextlib.suppress(OSError):
            self.conn.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_RDWR)
        self.conn.close()

    def run(self) -> None:
        self.send({"QMP": {"version": QMPServer.version(), "capabilities": []}})
        dec = json.JSONDecoder()
        buf = ""
        try:
            while True:
                chunk = self.conn.recv(65536)
                if not chunk:
                    return
                buf += chunk.decode("utf-8", "replace")
                while True:
                    buf = buf.lstrip()
                    if not buf:
                        break
                    try:
                        obj, end = dec.raw_decode(buf)
                    except json.JSONDecodeError:
                        if len(buf) > 1 << 20:
                            self.send(_err("JSON parse error"))
                            buf = ""
                        break
                    buf = buf[end:]
                    self.handle(obj)
        except OSError:
            return
        finally:
            self.srv.drop(self)
            with contextlib.suppress(OSError):
                self.conn.close()

    def handle(self, obj: Any) -> None:
        if not isinstance(obj, dict) or "execute" not in obj:
            self.send(_err("QMP input must be a JSON object"))
            return
        cmd = obj["execute"]
        args = obj.get("arguments") or {}
        out: dict[str, Any]
        if cmd == "qmp_capabilities":
            if self.negotiated:
                out = _err("Capabilities negotiation is already complete, command ignored",
                           "CommandNotFound")
            else:
                self.negotiated = True
                out = {"return": {}}
        elif not self.negotiated:
            out = _err("Expecting capabilities negotiation with 'qmp_capabilities'",
                       "CommandNotFound")
        else:
            try:
                out = {"return": self.srv.m.execute(cmd, args)}
            except QMPError as e:
                out = _err(e.desc, e.cls)
        if "id" in obj:
            out["id"] = obj["id"]
        self.send(out)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fixedram")
    except PackageNotFoundError:
        return "dev"


def _err(desc: str, cls: str = "GenericError") -> dict[str, Any]:
    return {"error": {"class": cls, "desc": desc}}
