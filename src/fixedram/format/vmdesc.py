"""The vmdesc JSON trailer: a description of every device section.

QEMU appends ``0x06 be32 len JSON`` after the EOF byte. The device data in
the stream is not self-delimiting, so the JSON is what lets a reader find the
end of a device section without knowing every device's schema: a section's
length is the sum of its fields' sizes plus its subsections' framed sizes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import CorruptFile
from .constants import MAX_VMDESC_JSON, SectionType
from .primitives import BE32

__all__ = ["VMDesc", "device_data_size", "encode_trailer", "find_trailer"]

_MAX_DEPTH = 64


@dataclass(frozen=True)
class VMDesc:
    """The parsed trailer and where it sits in the file."""

    offset: int  # absolute offset of the 0x06 byte
    raw: bytes
    doc: dict[str, Any]

    @property
    def end(self) -> int:
        return self.offset + 5 + len(self.raw)

    def device_entries(self) -> dict[tuple[str, int], Mapping[str, Any]]:
        """Each well-formed device entry, keyed by (idstr, instance_id); the
        first one wins if a key repeats."""
        out: dict[tuple[str, int], Mapping[str, Any]] = {}
        devices = self.doc.get("devices", [])
        if not isinstance(devices, list):
            return out
        for dev in devices:
            if isinstance(dev, Mapping):
                name, inst = dev.get("name"), dev.get("instance_id")
                if isinstance(name, str) and isinstance(inst, int) and not isinstance(inst, bool):
                    out.setdefault((name, inst), dev)
        return out

    def device_sizes(self) -> dict[tuple[str, int], int]:
        """Data length of each device section, keyed by (idstr, instance_id)."""
        out: dict[tuple[str, int], int] = {}
        for key, dev in self.device_entries().items():
            size = device_data_size(dev)
            if size is not None:
                out[key] = size
        return out

    @property
    def page_size(self) -> int | None:
        ps = self.doc.get("page_size")
        return ps if isinstance(ps, int) and not isinstance(ps, bool) and ps > 0 else None


def device_data_size(desc: Mapping[str, Any], depth: int = 0) -> int | None:
    """Bytes of device data described by one vmdesc entry, None if unknowable."""
    if depth > _MAX_DEPTH:
        return None
    total = 0
    fields = desc.get("fields", [])
    if not isinstance(fields, list):
        return None
    for f in fields:
        if not isinstance(f, Mapping):
            return None
        size = f.get("size")
        count = f.get("array_len", 1)
        if not isinstance(size, int) or not isinstance(count, int) or size < 0 or count < 0:
            return None
        total += size * count
    subs = desc.get("subsections", [])
    if not isinstance(subs, list):
        return None
    for s in subs:
        if not isinstance(s, Mapping) or not isinstance(s.get("vmsd_name"), str):
            return None
        inner = device_data_size(s, depth + 1)
        if inner is None:
            return None
        # subsection framing: 0x05, u8 namelen, name, be32 version
        total += 1 + 1 + len(s["vmsd_name"].encode()) + 4 + inner
    return total


def parse_trailer(raw: bytes, offset: int, path: str) -> VMDesc:
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFile(f"vmdesc JSON trailer does not parse: {e}", path=path,
                          offset=offset + 5) from None
    if not isinstance(doc, dict):
        raise CorruptFile("vmdesc JSON trailer is not an object", path=path, offset=offset + 5)
    return VMDesc(offset, raw, doc)


def find_trailer(tail: bytes, tail_offset: int, path: str) -> VMDesc | None:
    """Locate ``0x06 be32 len JSON`` ending exactly at the end of ``tail``.

    ``tail`` is the last bytes of the file, starting at absolute ``tail_offset``.
    The JSON is compact and ends with ``}``; we try every ``0x06`` whose length
    field matches the distance to the end, nearest to the end first.
    """
    if not tail.endswith(b"}"):
        return None
    n = len(tail)
    pos = tail.rfind(b"\x06", 0, n - 5)
    while pos >= 0:
        ln = BE32.unpack_from(tail, pos + 1)[0]
        if pos + 5 + ln == n and ln <= MAX_VMDESC_JSON and tail[pos + 5:pos + 6] == b"{":
            return parse_trailer(tail[pos + 5:], tail_offset + pos, path)
        pos = tail.rfind(b"\x06", 0, pos)
    return None


def encode_trailer(doc: Mapping[str, Any] | bytes) -> bytes:
    """``0x06 be32 len JSON`` in QEMU's compact style (", " and ": ")."""
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return bytes([SectionType.VMDESCRIPTION]) + BE32.pack(len(raw)) + raw
