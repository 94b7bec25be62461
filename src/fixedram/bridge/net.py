"""Sockets for the bridge: a loopback-by-default listener and counting readers.

The receiver accepts every connection QEMU makes to one address (the main
stream and, with multifd, one connection per channel) and tells them apart
by their first four bytes, as QEMU's own destination does. Anyone who can
reach the address can connect: a connection that does not start like QEMU's,
or stays silent for :data:`PEEK_TIMEOUT` seconds, is closed and forgotten.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import threading
import time

from ..errors import TransportError
from ..output import unlink_stale_socket
from ..transports.uri import parse_uri

__all__ = ["FdReader", "Listener", "SocketReader", "Splicer", "peek4", "peer_name",
           "recv_exact"]

# QEMU writes its first bytes as soon as it connects; a silent peer is not QEMU.
PEEK_TIMEOUT = 10.0


class SocketReader:
    """A minimal binary file for :class:`~fixedram.format.primitives.ByteReader`
    over a connected socket, counting bytes."""

    def __init__(self, sock: socket.socket, counter: list[int]) -> None:
        self.sock = sock
        self.counter = counter

    def read(self, n: int = 1 << 20) -> bytes:
        try:
            b = self.sock.recv(n)
        except OSError as e:
            raise TransportError(f"receive failed: {e.strerror or e}", e) from e
        self.counter[0] += len(b)
        return b

    def seekable(self) -> bool:
        return False


class FdReader:
    """The same over a pipe (stdin for ``exec:``)."""

    def __init__(self, fd: int, counter: list[int]) -> None:
        self.fd = fd
        self.counter = counter

    def read(self, n: int = 1 << 20) -> bytes:
        try:
            b = os.read(self.fd, n)
        except OSError as e:
            raise TransportError(f"read from stdin failed: {e.strerror or e}", e) from e
        self.counter[0] += len(b)
        return b

    def seekable(self) -> bool:
        return False


def recv_exact(sock: socket.socket, buf: memoryview, what: str) -> bool:
    """Fill ``buf``; False on a clean end of stream before the first byte."""
    got = 0
    n = len(buf)
    while got < n:
        try:
            k = sock.recv_into(buf[got:], n - got, socket.MSG_WAITALL)
        except OSError as e:
            raise TransportError(f"{what}: receive failed: {e.strerror or e}", e) from e
        if k == 0:
            if got == 0:
                return False
            raise TransportError(f"{what}: the source disconnected in the middle of a packet "
                                 f"({got} of {n} bytes)")
        got += k
    return True


class Splicer:
    """Socket bytes moved into a file at an offset through a pipe (Linux
    ``splice``): the data go from the socket buffers to the page cache
    without a round trip through user space."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        with contextlib.suppress(OSError, AttributeError):
            # A whole multifd packet's payload fits (512 KiB).
            import fcntl

            fcntl.fcntl(self.w, 1031, 1 << 20)  # F_SETPIPE_SZ

    @staticmethod
    def create() -> Splicer | None:
        if not hasattr(os, "splice"):
            return None
        try:
            return Splicer()
        except OSError:
            return None

    def copy(self, sock: socket.socket, out_fd: int, offset: int, n: int, what: str) -> None:
        """Exactly ``n`` bytes from ``sock`` to ``out_fd`` at ``offset``.

        :raise TransportError: the peer closed or the socket failed.
        :raise OSError: ``splice`` is refused before any byte moved (EINVAL:
            the caller falls back to recv + pwrite), or the file write failed.
        """
        left = n
        while left:
            try:
                k = os.splice(sock.fileno(), self.w, left)
            except OSError as e:
                if left == n and e.errno == errno.EINVAL:
                    raise
                raise TransportError(f"{what}: receive failed: {e.strerror or e}", e) from e
            if k == 0:
                raise TransportError(f"{what}: the source disconnected in the middle of a "
                                     f"packet ({n - left} of {n} bytes)")
            left -= k
            while k:
                j = os.splice(self.r, out_fd, k, offset_dst=offset)
                offset += j
                k -= j

    def close(self) -> None:
        fds, self.r, self.w = (self.r, self.w), -1, -1
        for fd in fds:
            if fd >= 0:  # once only: the number may belong to someone else later
                with contextlib.suppress(OSError):
                    os.close(fd)


class Listener:
    """Listen on ``tcp:HOST:PORT`` (HOST defaults to 127.0.0.1) or ``unix:PATH``."""

    def __init__(self, uri: str) -> None:
        u = parse_uri(uri)
        if u.kind not in ("tcp", "unix"):
            raise TransportError(f"cannot listen on {uri!r}: use tcp:HOST:PORT, unix:PATH or - "
                                 "(stdin)")
        self.kind = u.kind
        self.path = u.path
        self.lock = threading.Lock()
        try:
            if u.kind == "tcp":
                # An empty host means loopback here: guest memory must not be
                # offered to the network unless asked for.
                host = u.host if uri[4:].rpartition(":")[0] else "127.0.0.1"
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                s = socket.socket(family, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host.strip("[]"), u.port))
            else:
                try:
                    unlink_stale_socket(u.path)
                except FileExistsError as e:
                    raise TransportError(f"{u.path}: exists and is not a socket") from e
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.bind(u.path)
            s.listen(64)
        except OSError as e:
            raise TransportError(f"Failed to listen on {uri}: {e.strerror or e}", e) from e
        self.sock = s
        self.closed = False

    @property
    def address(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host, port = self.sock.getsockname()[:2]
        return f"tcp:{host}:{port}" if ":" not in host else f"tcp:[{host}]:{port}"

    def wait_readable(self, timeout: float | None) -> bool:
        """A connection is waiting (or the socket closed)."""
        try:
            r, _, _ = select.select([self.sock], [], [], timeout)
        except (OSError, ValueError):
            return True
        return bool(r)

    def accept(self, timeout: float | None) -> socket.socket | None:
        """One connection, or None after ``timeout`` seconds (or when closed)."""
        try:
            r, _, _ = select.select([self.sock], [], [], timeout)
        except (OSError, ValueError):
            return None
        if not r:
            return None
        with self.lock:
            return self._accept_now()

    def _accept_now(self) -> socket.socket | None:
        if self.closed:
            return None
        self.sock.setblocking(False)
        try:
            c, _ = self.sock.accept()
        except (BlockingIOError, OSError):
            return None
        finally:
            with contextlib.suppress(OSError):
                self.sock.setblocking(True)
        c.setblocking(True)
        with contextlib.suppress(OSError):
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        return c

    def drain(self) -> list[socket.socket]:
        """Every connection already waiting in the backlog, without blocking."""
        out: list[socket.socket] = []
        with self.lock:
            while True:
                c = self._accept_now()
                if c is None:
                    return out
                out.append(c)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            with contextlib.suppress(OSError):
                self.sock.close()
        if self.kind == "unix":
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def peek4(sock: socket.socket, timeout: float = PEEK_TIMEOUT,
          magics: tuple[bytes, ...] = ()) -> bytes:
    """The first four bytes of a new connection, left in the socket (fewer if
    the peer closed, sent fewer and then nothing more until ``timeout``, or
    sent a start that none of ``magics`` has).

    :raise TransportError: nothing at all came within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    head = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            if head:
                return head
            raise TransportError(f"the peer sent nothing for {timeout:g} s")
        if not head:
            try:
                select.select([sock], [], [], left)
            except (OSError, ValueError) as e:
                raise TransportError(f"receive failed: {e}", e) from e
        else:
            time.sleep(min(left, 0.02))  # a prefix arrived: the socket stays readable
        got = peek_now(sock)
        if got is None:
            continue
        if len(got) == 4 or not got or (magics and not any(m.startswith(got) for m in magics)):
            return got
        head = got


def peek_now(sock: socket.socket) -> bytes | None:
    """The bytes (at most four) a connection has sent so far, without waiting:
    None if nothing yet, ``b""`` if the peer closed."""
    try:
        return sock.recv(4, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


def peer_name(sock: socket.socket) -> str:
    """``HOST:PORT`` of a TCP peer, ``a unix socket peer`` otherwise."""
    try:
        addr = sock.getpeername()
    except OSError:
        return "a peer"
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = addr[0]
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return "a unix socket peer"
