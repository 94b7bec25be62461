"""Byte channels behind migration URIs, for sending and receiving.

Sending side: every channel buffers small writes (a stream is mostly 8-byte
record headers between 4 KiB pages) and passes large ones straight through.
A ``file:`` output that is a new or regular file (a symlink is followed: the
link stays, its target is written) is written under a temporary name and
renamed when the migration completes, so a failed or cancelled save never
looks complete. With ``offset=N`` the file is written in place (QEMU keeps
the bytes before N) and cut back to N on failure. Anything else (a character
or block device, a FIFO) is written in place and never replaced; a FIFO or a
terminal takes the stream sequentially. (QEMU 10 refuses those targets:
"failed to truncate migration file to offset 0: Invalid argument".)

Receiving side: a channel yields a binary file object for
:class:`~fixedram.format.primitives.ByteReader`; ``file:`` also exposes its
path and offset for positional (mapped-ram) loading.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import subprocess
from typing import Any, BinaryIO, cast

from ..errors import OutputError, TransportError
from ..output import AtomicOutput, unlink_stale_socket
from .fdsets import FdSetError, is_fdset, qemu_open
from .uri import MigrationURI, parse_uri

__all__ = ["InChannel", "OutChannel", "open_incoming", "open_outgoing"]

_BUF = 1 << 20


class OutChannel:
    """A sending channel; subclasses implement :meth:`_raw`."""

    kind = ""
    seekable = False

    def __init__(self, uri: MigrationURI) -> None:
        self.uri = uri
        self._buf = bytearray()
        self.bytes_out = 0

    def write(self, data: bytes | memoryview) -> None:
        n = len(data)
        self.bytes_out += n
        if n >= _BUF // 4:
            self.flush()
            self._raw(memoryview(data).cast("B"))
            return
        self._buf += data
        if len(self._buf) >= _BUF:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            self._raw(memoryview(self._buf))
            self._buf = bytearray()

    def _raw(self, mv: memoryview) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        """Success: flush and close (a file becomes visible under its name)."""
        self.flush()
        self.close()

    def abort(self) -> None:
        """Failure or cancel: drop buffered data and close."""
        self._buf = bytearray()
        self.close()

    def close(self) -> None:
        """Release the transport."""


def _write_all(fd: int, mv: memoryview, what: str) -> None:
    done = 0
    try:
        while done < len(mv):
            done += os.write(fd, mv[done:])
    except OSError as e:
        raise TransportError(f"{what}: {e.strerror or e}", e) from e


class FileOut(OutChannel):
    """``file:PATH[,offset=N]``; pages may also be written positionally via :attr:`fd`
    and by re-opening :attr:`write_path` (multifd channels).

    :ivar seekable: pages can be written at offsets (false for a FIFO or a
        terminal, which only a sequential stream can go to).
    """

    kind = "file"

    def __init__(self, uri: MigrationURI) -> None:
        super().__init__(uri)
        self.offset = uri.offset
        self._ao: AtomicOutput | None = None
        self.fd = -1
        if is_fdset(uri.path):
            self._open_fdset(uri)
            return
        # The link stays a link: its target is what gets written.
        target = os.path.realpath(uri.path)
        try:
            st: os.stat_result | None = os.stat(target)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise TransportError(f"{uri.path}: {e.strerror or e}", e) from e
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise TransportError(f"{uri.path}: Is a directory")
        self.regular = st is None or stat.S_ISREG(st.st_mode)
        self.seekable = True
        if self.regular and self.offset == 0:
            try:
                self._ao = AtomicOutput(target, force=True)
            except OutputError as e:
                if not isinstance(e.exc, OSError):
                    raise
                # QEMU's words for a file it cannot create.
                raise TransportError(f"Could not create '{uri.path}': "
                                     f"{e.exc.strerror or e.exc}", e) from e
            self.fd = self._ao.fd
            self.write_path = self._ao.tmp
        else:
            try:
                self.fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC
                                  | (os.O_CREAT if self.regular else 0), 0o600)
                if self.regular:
                    os.ftruncate(self.fd, self.offset)
                else:
                    self.seekable = _can_seek(self.fd)
                    if self.offset and not self.seekable:
                        raise OSError(errno.ESPIPE, f"cannot start at offset {self.offset}: "
                                      "not seekable")
            except OSError as e:
                self.close()
                raise TransportError(f"{uri.path}: {e.strerror or e}", e) from e
            self.write_path = target
        self.pos = self.offset

    def _open_fdset(self, uri: MigrationURI) -> None:
        """``/dev/fdset/N``: a descriptor libvirt opened, written in place
        (cut to the offset first, as QEMU does); channels dup their own."""
        try:
            self.fd = qemu_open(uri.path, os.O_WRONLY | os.O_CREAT)
        except FdSetError as e:
            raise TransportError(str(e)) from None
        try:
            st = os.fstat(self.fd)
            self.regular = stat.S_ISREG(st.st_mode)
            self.seekable = self.regular or _can_seek(self.fd)
            if self.regular:
                os.ftruncate(self.fd, self.offset)
            elif self.offset and not self.seekable:
                raise OSError(errno.ESPIPE, f"cannot start at offset {self.offset}: "
                              "not seekable")
        except OSError as e:
            self.close()
            raise TransportError(f"{uri.path}: {e.strerror or e}", e) from e
        self.write_path = uri.path
        self.pos = self.offset

    def _raw(self, mv: memoryview) -> None:
        if not self.seekable:
            _write_all(self.fd, mv, self.uri.path)
            self.pos += len(mv)
            return
        done = 0
        try:
            while done < len(mv):
                done += os.pwrite(self.fd, mv[done:], self.pos + done)
        except OSError as e:
            raise TransportError(f"{self.uri.path}: {e.strerror or e}", e) from e
        self.pos += len(mv)

    def commit(self, size: int | None = None) -> None:
        self.flush()
        if self._ao is not None:
            self._ao.commit(size)
            return
        try:
            if size is not None and self.regular:
                os.ftruncate(self.fd, size)
            try:
                os.fsync(self.fd)
            except OSError as e:
                # Devices and FIFOs may not sync (EINVAL); that is not a failure.
                if self.regular or e.errno not in (errno.EINVAL, errno.EROFS):
                    raise
        except OSError as e:
            raise TransportError(f"{self.uri.path}: {e.strerror or e}", e) from e
        finally:
            self.close()

    def abort(self) -> None:
        self._buf = bytearray()
        if self._ao is not None:
            self._ao.abort()
            return
        if self.fd >= 0 and self.regular:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.offset)  # nothing past N: not a save
        self.close()

    def close(self) -> None:
        if self._ao is not None:
            if not self._ao.done:
                self._ao.abort()
            return
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _can_seek(fd: int) -> bool:
    try:
        os.lseek(fd, 0, os.SEEK_CUR)
    except OSError:
        return False
    return True


class SocketOut(OutChannel):
    """``tcp:HOST:PORT`` / ``unix:PATH``: connects to a listening destination."""

    def __init__(self, uri: MigrationURI) -> None:
        super().__init__(uri)
        self.kind = uri.kind
        try:
            if uri.kind == "tcp":
                self.sock = socket.create_connection((uri.host, uri.port), timeout=30)
            else:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(30)
                self.sock.connect(uri.path)
            self.sock.settimeout(None)
        except OSError as e:
            raise TransportError(f"Failed to connect to '{uri.text[len(uri.kind) + 1:]}': "
                                 f"{e.strerror or e}", e) from e

    def _raw(self, mv: memoryview) -> None:
        try:
            self.sock.sendall(mv)
        except OSError as e:
            raise TransportError(f"{self.uri.text}: {e.strerror or e}", e) from e

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class ExecOut(OutChannel):
    """``exec:CMD``: the stream goes to the command's stdin (``/bin/sh -c``)."""

    kind = "exec"

    def __init__(self, uri: MigrationURI) -> None:
        super().__init__(uri)
        self.proc = subprocess.Popen(["/bin/sh", "-c", uri.command], stdin=subprocess.PIPE)
        assert self.proc.stdin is not None
        self._fd = self.proc.stdin.fileno()

    def _raw(self, mv: memoryview) -> None:
        _write_all(self._fd, mv, f"exec:{self.uri.command}")

    def commit(self) -> None:
        self.flush()
        self.close()
        rc = self.proc.wait()
        if rc != 0:
            raise TransportError(f"exec:{self.uri.command}: command exited with status {rc}")

    def abort(self) -> None:
        self._buf = bytearray()
        self.close()
        with contextlib.suppress(OSError):
            self.proc.terminate()
        self.proc.wait()

    def close(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()


class FdOut(OutChannel):
    """``fd:N``: an already open descriptor (a QMP ``fd:NAME`` is resolved to
    one by the monitor first); the channel takes ownership, as QEMU does."""

    kind = "fd"

    def __init__(self, uri: MigrationURI) -> None:
        super().__init__(uri)
        try:
            if uri.fd < 0:
                raise OSError(errno.EBADF, "no descriptor")
            os.fstat(uri.fd)
        except OSError:
            raise TransportError(f"File descriptor named '{uri.fdname}' has not been "
                                 "found") from None
        self.fd = uri.fd

    def _raw(self, mv: memoryview) -> None:
        _write_all(self.fd, mv, f"fd:{self.uri.fd}")

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def open_outgoing(uri: MigrationURI | str) -> OutChannel:
    u = parse_uri(uri) if isinstance(uri, str) else uri
    cls = {"file": FileOut, "tcp": SocketOut, "unix": SocketOut, "exec": ExecOut,
           "fd": FdOut}[u.kind]
    return cls(u)


class InChannel:
    """A receiving channel. :meth:`listen` binds (sockets) when the command is
    issued; :meth:`open` blocks until the source connects and returns a
    binary file object."""

    def __init__(self, uri: MigrationURI) -> None:
        self.uri = uri
        self.kind = uri.kind
        self.seekable = uri.seekable
        self._lsock: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._f: BinaryIO | None = None
        self.address: tuple[str, int] | str | None = None
        self.fd = -1  # file: opened when the command is issued (fd sets too)

    def listen(self) -> None:
        u = self.uri
        try:
            if u.kind == "tcp":
                s = socket.socket(socket.AF_INET6 if ":" in u.host else socket.AF_INET)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((u.host, u.port))
                s.listen(1)
                self._lsock = s
                self.address = s.getsockname()[:2]
            elif u.kind == "unix":
                unlink_stale_socket(u.path)
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.bind(u.path)
                s.listen(1)
                self._lsock = s
                self.address = u.path
            elif u.kind == "file":
                try:
                    self.fd = qemu_open(u.path, os.O_RDONLY)
                except FdSetError as e:
                    raise TransportError(str(e)) from None
                except OSError as e:
                    raise TransportError(f"Could not open '{u.path}': {e.strerror or e}",
                                         e) from e
            elif u.kind == "fd":
                os.fstat(u.fd)
        except OSError as e:
            raise TransportError(f"Failed to listen on {u.text}: {e.strerror or e}", e) from e

    @property
    def connection(self) -> socket.socket | None:
        """The accepted connection (sockets), for the return path."""
        return self._conn

    @property
    def load_path(self) -> str:
        """A path the loaders can open: the file, or (fd sets) the descriptor's."""
        if self.fd >= 0 and is_fdset(self.uri.path):
            return f"/proc/self/fd/{self.fd}"
        return self.uri.path

    def open(self) -> BinaryIO:
        u = self.uri
        f: Any
        try:
            if self._lsock is not None:
                self._conn, _ = self._lsock.accept()
                f = self._conn.makefile("rb", buffering=0)
            elif u.kind == "file":
                if self.fd < 0:
                    self.fd = qemu_open(u.path, os.O_RDONLY)
                f = open(self.fd, "rb", buffering=0, closefd=True)  # noqa: SIM115
                self.fd = -1  # the file object owns it now
                if u.offset:  # a FIFO can be read from its start only
                    f.seek(u.offset)
            elif u.kind == "exec":
                self._proc = subprocess.Popen(["/bin/sh", "-c", u.command],
                                              stdout=subprocess.PIPE)
                assert self._proc.stdout is not None
                f = self._proc.stdout
            else:
                f = open(u.fd, "rb", buffering=0, closefd=True)  # noqa: SIM115
        except OSError as e:
            raise TransportError(f"{u.text}: {e.strerror or e}", e) from e
        self._f = f
        return cast(BinaryIO, f)

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        for c in (self._f, self._conn, self._lsock):
            if c is not None:
                with contextlib.suppress(OSError):
                    c.close()
        if self._proc is not None:
            with contextlib.suppress(OSError):
                self._proc.kill()
            self._proc.wait()
        if self.uri.kind == "unix" and self._lsock is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.uri.path)
        self._lsock = self._conn = None
        self._f = None


def open_incoming(uri: MigrationURI | str) -> InChannel:
    return InChannel(parse_uri(uri) if isinstance(uri, str) else uri)
