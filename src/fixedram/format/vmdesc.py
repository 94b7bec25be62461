"""The vmdesc JSON trailer: a description of every device section.

QEMU appends ``0x06 be32 len JSON`` after the EOF byte. The device data in
the stream is not self-delimiting, so the JSON is what lets a reader find the
end of a device section without knowing every device's schema: a section's
length is the sum of its fields' sizes plus its subsections' framed sizes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CorruptFile, FixedramError
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


# The trailer is untrusted: bound what parsing it can cost. QEMU 10's own
# trailers nest 14 levels deep, hold a few thousand objects and arrays, and
# no number wider than a uint64.
MAX_TRAILER_DEPTH = 64
MAX_TRAILER_CONTAINERS = 1 << 19  # ~100 MiB of Python objects at most
_MAX_NUMBER_CHARS = 24  # a uint64 is 20 digits


class _BadToken(FixedramError, ValueError):
    def __init__(self, what: str, token: str) -> None:
        super().__init__(what)
        self.what = what
        self.token = token


def _int(text: str) -> int:
    if len(text) > _MAX_NUMBER_CHARS:
        raise _BadToken(f"a {len(text)}-digit number", text)
    return int(text)


def _float(text: str) -> float:
    if len(text) > _MAX_NUMBER_CHARS:
        raise _BadToken(f"a {len(text)}-character number", text)
    return float(text)


def _constant(text: str) -> Any:
    raise _BadToken(f"{text}, which is not JSON", text)


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")
# Digits as "0", the rest as " ": a long number is then a plain substring search.
_DIGITS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))


def _too_deep(raw: bytes) -> int | None:
    """Offset in ``raw`` where nesting first goes past the limit, or None.

    Exact, vectorised and in bounded memory (1 MiB pieces): a bracket counts
    when an even number of quotes precede it. Strings with backslashes (where
    a quote may be escaped) are first blanked in place, which QEMU's own
    trailers never need.
    """
    if b"\\" in raw:
        raw = _STRING.sub(lambda m: b"_" * len(m.group()), raw)
    arr = np.frombuffer(raw, dtype=np.uint8)
    depth, parity = 0, 0
    for off in range(0, arr.size, 1 << 20):
        a = arr[off:off + (1 << 20)]
        outside = ((np.cumsum(a == ord('"'), dtype=np.uint8) + parity) & 1) == 0
        step = (((a == ord("[")) | (a == ord("{"))) & outside).astype(np.int32) - (
            ((a == ord("]")) | (a == ord("}"))) & outside)
        d = np.cumsum(step, dtype=np.int32) + depth
        over = np.flatnonzero(d > MAX_TRAILER_DEPTH)
        if over.size:
            return off + int(over[0])
        depth, parity = int(d[-1]), int(np.count_nonzero(a == ord('"')) + parity) & 1
    return None


def _lone_surrogate(doc: Any) -> str | None:
    """A string of the document that UTF-8 cannot encode (an unpaired ``\\ud800``)."""
    stack: list[Any] = [doc]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in items:
            for x in (k, v):
                if isinstance(x, str) and not x.isascii():
                    try:
                        x.encode()
                    except UnicodeEncodeError:
                        return x
            if isinstance(v, (dict, list)):
                stack.append(v)
    return None


def parse_trailer(raw: bytes, offset: int, path: str) -> VMDesc:
    """Parse the JSON of a trailer whose 0x06 byte is at ``offset``.

    :raise CorruptFile: anything but a JSON object within the bounds above,
        with the offset of the problem where it is known.
    """
    at = offset + 5
    containers = raw.count(b"[") + raw.count(b"{")  # an upper bound: strings count too
    if containers > MAX_TRAILER_CONTAINERS:
        raise CorruptFile(f"vmdesc JSON trailer has {containers} objects and arrays (more "
                          f"than {MAX_TRAILER_CONTAINERS})", path=path, offset=at)
    deep = _too_deep(raw)
    if deep is not None:
        raise CorruptFile(f"vmdesc JSON trailer nests deeper than {MAX_TRAILER_DEPTH} levels",
                          path=path, offset=at + deep)
    try:
        text = raw.decode("utf-8")  # QEMU writes ASCII; never guess UTF-16/32 as json does
    except UnicodeDecodeError as e:
        raise CorruptFile(f"vmdesc JSON trailer is not UTF-8: {e.reason}", path=path,
                          offset=at + e.start) from None
    # Numbers are only checked one by one when a long digit run exists at all.
    long_number = raw.translate(_DIGITS).find(b"0" * (_MAX_NUMBER_CHARS + 1)) >= 0
    kw: dict[str, Any] = {"parse_int": _int} if long_number else {}
    try:
        doc = json.loads(text, parse_float=_float, parse_constant=_constant, **kw)
    except json.JSONDecodeError as e:
        raise CorruptFile(f"vmdesc JSON trailer does not parse: {e.msg}", path=path,
                          offset=at + len(text[:e.pos].encode())) from None
    except _BadToken as e:
        pos = raw.find(e.token.encode())
        raise CorruptFile(f"vmdesc JSON trailer holds {e.what}", path=path,
                          offset=at + max(pos, 0)) from None
    except RecursionError:  # cannot happen below the depth limit; kept as a guard
        raise CorruptFile(f"vmdesc JSON trailer nests deeper than {MAX_TRAILER_DEPTH} levels",
                          path=path, offset=at) from None
    if not isinstance(doc, dict):
        raise CorruptFile("vmdesc JSON trailer is not an object", path=path, offset=at)
    if _SURROGATE.search(raw):
        bad = _lone_surrogate(doc)
        if bad is not None:
            raise CorruptFile(f"vmdesc JSON trailer holds an unpaired surrogate escape in "
                              f"{bad[:40]!r}", path=path, offset=at)
    return VMDesc(offset, raw, doc)


def find_trailer(tail: bytes, tail_offset: int, path: str) -> VMDesc | None:
    """Locate ``0x06 be32 len JSON`` ending exactly at the end of ``tail``.

    ``tail`` is the last bytes of the file, starting at absolute ``tail_offset``.
    The JSON is compact and ends with ``}``; of every ``0x06`` whose length
    field matches the distance to the end and is followed by ``{``, the one
    nearest to the end is taken. The first candidates from the end are tried
    one by one (a real file has a handful); past that the rest are found in
    one vectorised pass, so a tail full of 0x06 bytes costs no more than any
    other.
    """
    n = len(tail)
    if n < 7 or not tail.endswith(b"}"):
        return None
    pos = tail.rfind(b"\x06", 0, n - 5)
    for _ in range(64):
        if pos < 0:
            return None
        ln = BE32.unpack_from(tail, pos + 1)[0]
        if pos + 5 + ln == n and ln <= MAX_VMDESC_JSON and tail[pos + 5:pos + 6] == b"{":
            return parse_trailer(tail[pos + 5:], tail_offset + pos, path)
        pos = tail.rfind(b"\x06", 0, pos)
    if pos < 0:
        return None
    a = np.frombuffer(tail, dtype=np.uint8, count=pos + 6)
    cand = np.flatnonzero((a[:pos + 1] == SectionType.VMDESCRIPTION) & (a[5:] == ord("{")))
    if cand.size == 0:
        return None
    ln = ((a[cand + 1].astype(np.int64) << 24) | (a[cand + 2].astype(np.int64) << 16)
          | (a[cand + 3].astype(np.int64) << 8) | a[cand + 4].astype(np.int64))
    ok = cand[(cand + 5 + ln == n) & (ln <= MAX_VMDESC_JSON)]
    if ok.size == 0:
        return None
    p = int(ok[-1])
    return parse_trailer(tail[p + 5:], tail_offset + p, path)


def encode_trailer(doc: Mapping[str, Any] | bytes) -> bytes:
    """``0x06 be32 len JSON`` in QEMU's compact style (", " and ": ")."""
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return bytes([SectionType.VMDESCRIPTION]) + BE32.pack(len(raw)) + raw
