"""QEMU migration URIs: ``file:PATH[,offset=N]``, ``tcp:HOST:PORT``, ``unix:PATH``,
``exec:CMD``, ``fd:N`` / ``fd:NAME``; ``file:/dev/fdset/N`` names an fd set
(:mod:`fixedram.transports.fdsets`).

Parsing follows QEMU so the same URI strings work with both: the file offset
takes QEMU's size suffixes (``4k``, ``1M``; read by :func:`fixedram.sizes.parse_size`),
and bad input gets QEMU's words.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import TransportError
from ..sizes import SizeError, parse_size

__all__ = ["MigrationURI", "parse_size", "parse_uri"]

@dataclass(frozen=True)
class MigrationURI:
    """A parsed URI. ``kind`` is one of file, tcp, unix, exec, fd."""

    kind: str
    text: str
    path: str = ""
    offset: int = 0
    host: str = ""
    port: int = 0
    command: str = ""
    fd: int = -1
    fdname: str = ""  # fd:NAME: a descriptor the QMP monitor holds (getfd), or a number

    @property
    def seekable(self) -> bool:
        """Whether pages can be written at fixed offsets.

        Only ``file:`` is, as in QEMU (``fd:`` mapped-ram support was reverted
        before QEMU 9.0, even when the fd is a regular file).
        """
        return self.kind == "file"


def parse_uri(text: str) -> MigrationURI:
    """Parse a migration URI; raise :class:`TransportError` with QEMU's message."""
    if text.startswith("file:"):
        rest = text[5:]
        path, sep, opt = rest.rpartition(",offset=")
        if not sep:
            path, opt = rest, ""
        if not path:
            raise TransportError(f"file URI has no path: {text}")
        off = 0
        if sep:
            try:
                off = parse_size(opt)
            except SizeError as e:
                raise TransportError(f"file URI has bad offset {opt}: "
                                     f"{os.strerror(e.errno)}") from None
        return MigrationURI("file", text, path=path, offset=off)
    if text.startswith("tcp:"):
        hp = text[4:]
        m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:]*):(\d+)", hp)
        if not m:
            raise TransportError(f"error parsing address '{hp}'")
        host = m.group(1) or m.group(3) or "0.0.0.0"
        port = int(m.group(2) or m.group(4))
        if port > 65535:
            raise TransportError(f"error parsing address '{hp}'")
        return MigrationURI("tcp", text, host=host, port=port)
    if text.startswith("unix:"):
        if not text[5:]:
            raise TransportError("unix URI has no path")
        return MigrationURI("unix", text, path=text[5:])
    if text.startswith("exec:"):
        if not text[5:].strip():
            raise TransportError("exec URI has no command")
        return MigrationURI("exec", text, command=text[5:])
    if text.startswith("fd:"):
        # A number is this process's descriptor (the command line's fd:N); a
        # name is resolved by the QMP monitor that got it with getfd.
        name = text[3:]
        return MigrationURI("fd", text, fd=int(name) if name.isdigit() else -1, fdname=name)
    raise TransportError(f"unknown migration protocol: {text}")
