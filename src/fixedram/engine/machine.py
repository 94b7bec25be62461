"""What QMP commands act on: the built-in guest, its run state and migrations.

The rules are QEMU 10.0's, step by step and word for word, so that a script
written against ``qemu-system-x86_64 -qmp`` meets the same answers here:

* run states: ``prelaunch`` (-S), ``running``, ``paused``, ``inmigrate``,
  ``finish-migrate``, ``postmigrate``; ``stop``/``cont`` change them (STOP and
  RESUME events) only from and to a live state; a save leaves the guest
  ``postmigrate`` and the next ``migrate`` is refused until ``cont``;
* ``migrate`` checks in QEMU's order: arguments, URI, transport against
  capabilities, run state, capability/parameter rules, then what the
  built-in guest cannot do (:meth:`MigrationConfig.unsupported`); opening a
  ``file:``/``fd:``/``exec:`` target happens inside the command, so its error
  is the command's answer and the migration is ``failed``, as in QEMU;
* ``migrate-incoming`` once, only in ``inmigrate``; a failure ends the
  process when exit-on-error is on (the default, as in QEMU);
* descriptors: ``getfd``/``closefd`` per monitor, fd sets process-wide
  (:mod:`fixedram.transports.fdsets`), ``fd:NAME`` and ``file:/dev/fdset/N``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from ..errors import FixedramError
from ..transports.fdsets import FDSETS, FdSetError, MonitorFds
from ..transports.uri import MigrationURI, parse_uri
from .capabilities import DEPRECATED_CAPABILITIES, MigrationConfig
from .guest import BuiltinGuest
from .incoming import Incoming
from .precopy import Migration
from .qapi import COMMANDS, QAPIError, check_arguments, introspect

__all__ = ["QEMU_VERSION", "GuestMachine"]

# The QEMU release whose QMP answers these are (checked against it by
# tests/engine/test_qmp_table.py).
QEMU_VERSION = (10, 0, 2)

_RUNNING_STATES = ("setup", "active", "pre-switchover", "device", "cancelling")


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"fixedram {version('fixedram')}"
    except PackageNotFoundError:
        return "fixedram dev"


class GuestMachine:
    """The guest plus migration state.

    :param incoming: ``None`` (normal start), ``"defer"`` (wait for
        ``migrate-incoming``) or a URI to receive from at once.
    :param autostart: False for ``-S`` (start in ``prelaunch``).
    :param exit_on_error: for an ``incoming`` URI: exit with status 1 when
        the load fails (QEMU's ``-incoming`` always does).
    """

    def __init__(self, guest: BuiltinGuest, *, incoming: str | None = None,
                 autostart: bool = True, exit_on_error: bool = True) -> None:
        self.g = guest
        self.cfg = MigrationConfig()
        self.migration: Migration | None = None
        self.incoming: Incoming | None = None
        self.incoming_mode = incoming
        self.incoming_once = False  # QEMU's "once": a migrate-incoming succeeded
        self.exit_on_error = True
        self.autostart = autostart
        self.emit: Callable[[str, dict[str, Any]], None] = lambda name, data: None
        self.quit_requested = threading.Event()
        self.exit_code = 0
        self.monitor_fds = MonitorFds()
        self._lock = threading.RLock()
        if incoming is not None:
            self.g.stop("inmigrate")
            if incoming != "defer":
                self._start_incoming(parse_uri(incoming), exit_on_error=exit_on_error)
        elif not autostart:
            self.g.stop("prelaunch")

    # -- events and states ------------------------------------------------------------

    def _mig_event(self, name: str, data: dict[str, Any]) -> None:
        """Events from a migration: MIGRATION/MIGRATION_PASS only with the
        ``events`` capability (the migration's own copy decides PASS)."""
        if name == "MIGRATION" and not self.cfg.caps["events"]:
            return
        self.emit(name, data)

    @property
    def incoming_started(self) -> bool:
        """QEMU's migrate_incoming_started(): a transport is set up and the
        load has not ended (failure or completion releases it)."""
        inc = self.incoming
        return inc is not None and self.incoming_once and inc.status in (
            "setup", "active", "postcopy-active")

    def _outgoing_running(self) -> bool:
        m = self.migration
        return m is not None and m.status in _RUNNING_STATES

    def vm_stop(self) -> None:
        """QEMU's vm_stop: only a running guest stops (and says so)."""
        if self.g.running:
            self.g.stop("paused")
            self.emit("STOP", {})

    def vm_start(self) -> None:
        if not self.g.running:
            self.g.cont()
            self.emit("RESUME", {})

    def shutdown(self, timeout: float = 30.0) -> None:
        """Cancel a migration in progress and wait for it to clean up (its
        temporary file is removed), as QEMU does when it quits."""
        m = self.migration
        if m is not None and m.active:
            m.cancel()
            m.wait(timeout)
        self.monitor_fds.clear()
        FDSETS.clear()

    # -- dispatch -----------------------------------------------------------------------

    def execute(self, cmd: str, args: dict[str, Any], fds: list[int] | None = None) -> Any:
        """Run one command. ``fds`` are the descriptors received with it
        (SCM_RIGHTS); a command that takes one removes it from the list."""
        if cmd not in COMMANDS or cmd == "qmp_capabilities":
            raise QAPIError(f"The command {cmd} has not been found", "CommandNotFound")
        check_arguments(cmd, args)
        fn = getattr(self, "cmd_" + cmd.replace("-", "_"))
        with self._lock:
            try:
                if cmd in ("getfd", "add-fd"):
                    return fn(args, fds if fds is not None else [])
                return fn(args)
            except QAPIError:
                raise
            except (FixedramError, FdSetError) as e:
                raise QAPIError(str(e)) from e

    # -- status -------------------------------------------------------------------------

    def cmd_query_status(self, a: dict[str, Any]) -> Any:
        return {"running": self.g.running, "status": self.g.status}

    def cmd_query_version(self, a: dict[str, Any]) -> dict[str, Any]:
        major, minor, micro = QEMU_VERSION
        return {"qemu": {"major": major, "minor": minor, "micro": micro},
                "package": package_version()}

    def cmd_query_commands(self, a: dict[str, Any]) -> Any:
        return [{"name": c} for c in COMMANDS]

    def cmd_query_qmp_schema(self, a: dict[str, Any]) -> Any:
        return introspect()

    def cmd_stop(self, a: dict[str, Any]) -> Any:
        if self.g.status == "inmigrate":
            self._set_autostart(False)
        else:
            self.vm_stop()
        return {}

    def cmd_cont(self, a: dict[str, Any]) -> Any:
        st = self.g.status
        if st in ("internal-error", "shutdown", "guest-panicked"):
            raise QAPIError("Resetting the Virtual Machine is required")
        if st == "finish-migrate":
            raise QAPIError("Migration is not finalized yet")
        if st == "inmigrate":
            self._set_autostart(True)
        else:
            self.vm_start()
        return {}

    def _set_autostart(self, on: bool) -> None:
        self.autostart = on
        if self.incoming is not None:
            self.incoming.autostart = on

    def cmd_quit(self, a: dict[str, Any]) -> Any:
        self.quit_requested.set()
        return {}

    def cmd_human_monitor_command(self, a: dict[str, Any]) -> Any:
        from .hmp import run_hmp

        return run_hmp(self, a["command-line"])

    def cmd_x_query_ram_digest(self, a: dict[str, Any]) -> Any:
        """fixedram extension: BLAKE2b of guest RAM (to compare source and destination)."""
        return {"digest": self.g.digest(), "seq": self.g.seq}

    # -- descriptors ----------------------------------------------------------------------

    @staticmethod
    def _received_fd(fds: list[int]) -> int:
        """The first descriptor received; the others are closed (QEMU's chardev)."""
        if not fds:
            raise QAPIError("No file descriptor supplied via SCM_RIGHTS")
        fd = fds.pop(0)
        close_quietly(fds)
        fds.clear()
        return fd

    def cmd_getfd(self, a: dict[str, Any], fds: list[int]) -> Any:
        fd = self._received_fd(fds)
        try:
            self.monitor_fds.put(a["fdname"], fd)
        except FdSetError:
            os.close(fd)
            raise
        return {}

    def cmd_closefd(self, a: dict[str, Any]) -> Any:
        self.monitor_fds.close(a["fdname"])
        return {}

    def cmd_add_fd(self, a: dict[str, Any], fds: list[int]) -> Any:
        fd = self._received_fd(fds)
        try:
            sid, fd = FDSETS.add(fd, a.get("fdset-id"), a.get("opaque"))
        except FdSetError:
            os.close(fd)
            raise
        return {"fdset-id": sid, "fd": fd}

    def cmd_remove_fd(self, a: dict[str, Any]) -> Any:
        FDSETS.remove(a["fdset-id"], a.get("fd"))
        return {}

    def cmd_query_fdsets(self, a: dict[str, Any]) -> Any:
        return FDSETS.query()

    # -- capabilities and parameters ---------------------------------------------------

    def cmd_migrate_set_capabilities(self, a: dict[str, Any]) -> Any:
        self.cfg.set_capabilities(a["capabilities"], migration_running=self._outgoing_running(),
                                  incoming_started=self.incoming_started,
                                  inmigrate=self.g.status == "inmigrate")
        for cap in DEPRECATED_CAPABILITIES:
            if self.cfg.caps[cap]:  # QEMU warns on its stderr at every change
                print(f"warning: {cap} capability is deprecated", file=sys.stderr)
        return {}

    def cmd_migrate_set_parameters(self, a: dict[str, Any]) -> Any:
        self.cfg.set_parameters(a)
        if self._outgoing_running():  # bandwidth and downtime apply at once, as in QEMU
            assert self.migration is not None
            self.migration.update_parameters(self.cfg.params)
        return {}

    def cmd_query_migrate_capabilities(self, a: dict[str, Any]) -> Any:
        return self.cfg.query_capabilities()

    def cmd_query_migrate_parameters(self, a: dict[str, Any]) -> Any:
        return self.cfg.query_parameters()

    # -- migrate ----------------------------------------------------------------------------

    @staticmethod
    def _address(args: dict[str, Any]) -> tuple[MigrationURI, bool]:
        """The main channel's URI (arguments already checked against the
        schema) and whether a cpr channel was given."""
        has_uri, chans = "uri" in args, args.get("channels") or None
        if has_uri == (chans is not None):
            raise QAPIError("need either 'uri' or 'channels' argument")
        if chans is None:
            return parse_uri(str(args["uri"])), False
        seen: dict[str, dict[str, Any]] = {}
        for ch in chans:
            t = ch["channel-type"]
            if t in seen:
                raise QAPIError(f"Channel list has more than one {t} entry")
            seen[t] = ch
        if "main" not in seen:
            raise QAPIError("Channel list has no main entry")
        a = seen["main"]["addr"]
        t = a["transport"]
        if t == "file":
            # Built directly: a file name holding ",offset=" stays a file name.
            off = int(a["offset"])
            text = f"file:{a['filename']}" + (f",offset={off}" if off else "")
            return MigrationURI("file", text, path=a["filename"], offset=off), "cpr" in seen
        if t == "exec":
            return parse_uri("exec:" + " ".join(a["args"])), "cpr" in seen
        if t == "socket":
            st = a["type"]
            if st == "inet":
                return parse_uri(f"tcp:{a['host']}:{a['port']}"), "cpr" in seen
            if st == "unix":
                return parse_uri(f"unix:{a['path']}"), "cpr" in seen
            if st == "fd":
                return parse_uri(f"fd:{a['str']}"), "cpr" in seen
        raise QAPIError(f"fixedram: migration transport {t!r} is not supported")

    def _resolve_fd(self, uri: MigrationURI) -> MigrationURI:
        """``fd:NAME`` over QMP: the descriptor ``getfd`` stored under NAME
        (taken: the migration owns it now). Numbers are not names here, as
        in QEMU's monitor."""
        if uri.kind != "fd":
            return uri
        fd = self.monitor_fds.take(uri.fdname)
        return MigrationURI("fd", uri.text, fd=fd, fdname=uri.fdname)

    def cmd_migrate(self, a: dict[str, Any]) -> Any:
        uri, has_cpr = self._address(a)
        self.cfg.check_transport(uri.kind, uri.seekable)
        if self.cfg.params["mode"] == "cpr-transfer" and not has_cpr:
            raise QAPIError("missing 'cpr' migration channel")
        if a.get("resume"):
            raise QAPIError("Cannot resume if there is no paused migration")
        if self._outgoing_running():
            raise QAPIError("There's a migration process in progress")
        if self.g.status == "inmigrate":
            raise QAPIError("Guest is waiting for an incoming migration")
        if self.g.status == "postmigrate":
            raise QAPIError("Can't migrate the vm that was paused due to previous migration")
        m = Migration(self.g, self.cfg, uri, on_event=self._mig_event)
        self.migration = m
        # The target is opened here, so the command answers with its error
        # (file, fd, exec); sockets connect in the migration thread.
        try:
            if uri.kind == "fd":
                m.uri = self._resolve_fd(uri)
            m.open(sync=uri.kind in ("file", "fd", "exec"))
        except (FixedramError, FdSetError) as e:
            m.fail(e)
            raise QAPIError(str(e)) from e
        m.start()
        return {}

    def cmd_migrate_cancel(self, a: dict[str, Any]) -> Any:
        if self.migration is not None:
            self.migration.cancel()
        return {}

    def cmd_migrate_continue(self, a: dict[str, Any]) -> Any:
        m = self.migration
        status = m.status if m is not None else "none"
        if m is None or status != a["state"] or status != "pre-switchover":
            raise QAPIError(f"Migration not in expected state: {status}")
        m.resume_switchover(a["state"])
        return {}

    def cmd_query_migrate(self, a: dict[str, Any]) -> Any:
        out: dict[str, Any] = self.migration.query() if self.migration is not None else {}
        inc = self.incoming
        if inc is not None and inc.status != "none":
            out.update(inc.query())  # the destination's state wins, as in QEMU
        return out

    # -- incoming -----------------------------------------------------------------------------

    def cmd_migrate_incoming(self, a: dict[str, Any]) -> Any:
        if self.incoming_once:
            raise QAPIError("The incoming migration has already been started")
        if self.g.status != "inmigrate":
            raise QAPIError("'-incoming' was not specified on the command line")
        uri, _ = self._address(a)
        self._start_incoming(uri, exit_on_error=a.get("exit-on-error", True))
        return {}

    def _start_incoming(self, uri: MigrationURI, *, exit_on_error: bool) -> None:
        if self.incoming is not None and self.incoming.status != "none":
            raise QAPIError(f"Illegal migration incoming state: {self.incoming.status}")
        if uri.kind == "fd" and uri.fd < 0:
            uri = self._resolve_fd(uri)
        self.exit_on_error = exit_on_error
        inc = Incoming(self.g, self.cfg, uri, autostart=self.autostart, listen=False,
                       on_event=self._mig_event, on_failed=self._incoming_failed,
                       on_note=lambda text: print(f"fixedram guest: {text}", file=sys.stderr))
        self.incoming = inc
        inc._set("setup")
        inc.listen()  # an error leaves the state "setup", as QEMU leaves it
        self.incoming_once = True
        inc.start()

    def _incoming_failed(self, inc: Incoming) -> None:
        if not self.exit_on_error:
            return
        # QEMU reports the error and exits with status 1, no SHUTDOWN event.
        print(f"fixedram guest: load of migration failed: {inc.error}", file=sys.stderr)
        self.exit_code = 1
        self.quit_requested.set()


def close_quietly(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
