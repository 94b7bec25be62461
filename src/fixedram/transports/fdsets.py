"""File descriptors handed over QMP, as QEMU keeps them.

Two kinds, with QEMU's rules and messages:

* **fd sets** (``add-fd``, ``remove-fd``, ``query-fdsets``), process-wide:
  a path ``/dev/fdset/N`` given to anything that opens files (``file:`` URIs,
  multifd channels) is opened by duplicating a descriptor of set N whose
  access mode and O_DIRECT flag match what would have been asked of
  ``open()`` (libvirt passes one O_DIRECT and one plain descriptor for a
  direct-io save).
* **named descriptors** (``getfd``, ``closefd``), per monitor: ``fd:NAME``
  migration URIs take the descriptor out of the monitor (the migration owns
  it from then on).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from dataclasses import dataclass, field

from ..errors import FixedramError

__all__ = ["FDSETS", "FdSetError", "FdSets", "MonitorFds", "is_fdset", "qemu_open"]

FDSET_PREFIX = "/dev/fdset/"


class FdSetError(FixedramError):
    """QEMU's message for a refused fd operation."""


@dataclass
class _FdSet:
    id: int
    fds: list[tuple[int, str | None]] = field(default_factory=list)  # (fd, opaque)


class FdSets:
    """QEMU's fd sets (``monitor/fds.c``): process-wide, ordered by id."""

    def __init__(self) -> None:
        self._sets: dict[int, _FdSet] = {}
        self._lock = threading.Lock()

    def add(self, fd: int, fdset_id: int | None = None, opaque: str | None = None
            ) -> tuple[int, int]:
        """Keep ``fd`` (now owned here) in a set; returns (fdset-id, fd)."""
        with self._lock:
            if fdset_id is None:
                fdset_id = 0  # the lowest id not in use, as QEMU picks it
                while fdset_id in self._sets:
                    fdset_id += 1
            elif fdset_id < 0:
                raise FdSetError("Parameter 'fdset-id' expects a non-negative value")
            s = self._sets.setdefault(fdset_id, _FdSet(fdset_id))
            s.fds.append((fd, opaque))
            return fdset_id, fd

    def remove(self, fdset_id: int, fd: int | None = None) -> None:
        with self._lock:
            s = self._sets.get(fdset_id)
            if s is not None:
                gone = [x for x in s.fds if fd is None or x[0] == fd]
                if gone:
                    s.fds = [x for x in s.fds if x not in gone]
                    for f, _ in gone:
                        with contextlib.suppress(OSError):
                            os.close(f)
                    if not s.fds:
                        del self._sets[fdset_id]
                    return
        what = f"fdset-id:{fdset_id}" + ("" if fd is None else f", fd:{fd}")
        raise FdSetError(f"File descriptor named '{what}' not found")

    def query(self) -> list[dict[str, object]]:
        """``query-fdsets``: sets by descending id, each set's fds in order added."""
        with self._lock:
            out: list[dict[str, object]] = []
            for sid in sorted(self._sets, reverse=True):
                fds: list[dict[str, object]] = []
                for fd, opaque in self._sets[sid].fds:
                    fds.append({"fd": fd} if opaque is None else {"fd": fd, "opaque": opaque})
                out.append({"fdset-id": sid, "fds": fds})
            return out

    def dup(self, path: str, flags: int) -> int:
        """A new descriptor for ``/dev/fdset/N`` opened with ``flags``."""
        try:
            sid = int(path[len(FDSET_PREFIX):])
        except ValueError:
            raise FdSetError(f"Could not open '{path}': Invalid argument") from None
        mask = os.O_ACCMODE | os.O_DIRECT
        with self._lock:
            s = self._sets.get(sid)
            if s is None:
                raise FdSetError(f"Failed to find fdset {path}")
            for fd, _ in s.fds:
                try:
                    have = fcntl.fcntl(fd, fcntl.F_GETFL)
                except OSError as e:
                    raise FdSetError(f"Failed to read file status flags for fd={fd}: "
                                     f"{e.strerror}") from e
                if have & mask == flags & mask:
                    return os.dup(fd)
        raise FdSetError(f"Failed to find file descriptor with matching flags=0x{flags:x}")

    def clear(self) -> None:
        with self._lock:
            for s in self._sets.values():
                for fd, _ in s.fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._sets.clear()


FDSETS = FdSets()


def is_fdset(path: str) -> bool:
    return path.startswith(FDSET_PREFIX)


def qemu_open(path: str, flags: int, mode: int = 0o600) -> int:
    """``open()``, or a matching descriptor of an fd set for ``/dev/fdset/N``.

    :raise FdSetError: for an fd set that has no such descriptor.
    :raise OSError: from ``open()``.
    """
    if is_fdset(path):
        return FDSETS.dup(path, flags)
    return os.open(path, flags | os.O_CLOEXEC, mode)


class MonitorFds:
    """``getfd``/``closefd``: descriptors a monitor keeps under names."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def put(self, name: str, fd: int) -> None:
        if name[:1].isdigit():
            raise FdSetError("Parameter 'fdname' expects a name not starting with a digit")
        with self._lock:
            old = self._fds.pop(name, None)
            self._fds[name] = fd
        if old is not None:  # the same name again replaces (and closes) the old one
            with contextlib.suppress(OSError):
                os.close(old)

    def close(self, name: str) -> None:
        with self._lock:
            fd = self._fds.pop(name, None)
        if fd is None:
            raise FdSetError(f"File descriptor named '{name}' not found")
        with contextlib.suppress(OSError):
            os.close(fd)

    def take(self, name: str) -> int:
        """Hand the descriptor over (``fd:NAME``): it is no longer the monitor's."""
        with self._lock:
            fd = self._fds.pop(name, None)
        if fd is None:
            raise FdSetError(f"File descriptor named '{name}' has not been found")
        return fd

    def clear(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._fds.clear()
