"""``fixedram send``: a saved file streamed into a QEMU waiting with ``-incoming``.

The file (mapped-ram or stream, possibly inside a libvirt image) goes out as
one single-pass stream with mapped-ram off, the form every QEMU destination
accepts on ``tcp:``, ``unix:`` and ``exec:`` (stdout).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO

from ..errors import TransportError, UnsupportedFeature
from ..format.migfile import MigrationFile
from ..tools.convert import to_stream
from ..transports.channels import open_outgoing
from ..transports.uri import parse_uri

__all__ = ["SendSummary", "send"]


@dataclass
class SendSummary:
    file: str
    destination: str
    bytes_sent: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def send(path: str, dest: str, *, stdout: BinaryIO | None = None,
         offset: int | None = None) -> SendSummary:
    """Stream ``path`` to ``dest`` (``tcp:HOST:PORT``, ``unix:PATH`` or ``-``)."""
    t0 = time.monotonic()
    s = SendSummary(os.path.abspath(path), dest)
    with MigrationFile(path, offset=offset) as mf:
        if not mf.complete:
            raise UnsupportedFeature("the save is incomplete; refusing to send it", path=path,
                                     offset=mf.size)
        if dest == "-":
            assert stdout is not None
            try:
                s.bytes_sent = to_stream(mf, stdout.write)
                stdout.flush()
            except BrokenPipeError as e:
                raise TransportError("stdout closed by the reader (did QEMU reject the "
                                     "stream? see its log)", e) from e
        else:
            u = parse_uri(dest)
            if u.kind not in ("tcp", "unix"):
                raise TransportError(f"cannot send to {dest!r}: use tcp:HOST:PORT, unix:PATH or "
                                     "- (stdout, for QEMU's -incoming exec:)")
            ch = open_outgoing(u)
            try:
                s.bytes_sent = to_stream(mf, ch.write)
                ch.commit()
            except BaseException:
                ch.abort()
                raise
    s.seconds = round(time.monotonic() - t0, 3)
    return s
