"""Socket multifd framing: the per-channel init message and the page packets.

With ``multifd`` on and mapped-ram off, QEMU opens extra connections next to
the main stream. Each starts with a 64-byte init message, then carries
fixed-size packets (a 320-byte header plus one be64 offset per page slot),
each followed by the raw data of its normal pages. All integers are
big-endian. The packet size on the wire is fixed by the page count of the
build (512 KiB / target page size), not by the header's ``pages_alloc``,
which is 0 in SYNC packets.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from ..errors import BadMagic, CorruptFile, UnsupportedFeature, UnsupportedVersion

__all__ = [
    "INIT_SIZE",
    "MULTIFD_MAGIC",
    "MULTIFD_MAGIC_BYTES",
    "MultifdInit",
    "MultifdPacket",
    "decode_init",
    "decode_packet",
    "encode_init",
    "encode_packet",
    "encode_sync",
    "packet_size",
    "split_packets",
]

MULTIFD_MAGIC = 0x11223344
MULTIFD_MAGIC_BYTES = struct.pack(">I", MULTIFD_MAGIC)
MULTIFD_VERSION = 1
INIT_SIZE = 64
HEADER_SIZE = 320
MULTIFD_PACKET_SIZE = 512 << 10  # bytes of page data a packet can describe

FLAG_SYNC = 0x1
FLAG_COMPRESSION_MASK = 0x3E
FLAG_DEVICE_STATE = 0x40
_COMPRESSION = {0x2: "zlib", 0x4: "zstd", 0x8: "qpl", 0x10: "uadk", 0x20: "qatzip"}

_INIT = struct.Struct(">II16sB7x32x")
_HDR = struct.Struct(">IIIIIIQII24x256s")
assert _INIT.size == INIT_SIZE and _HDR.size == HEADER_SIZE


def packet_size(page_size: int = 4096) -> int:
    """Wire size of every packet header block (header + offset slots)."""
    return HEADER_SIZE + 8 * (MULTIFD_PACKET_SIZE // page_size)


@dataclass(frozen=True)
class MultifdInit:
    version: int
    uuid: bytes
    channel_id: int


@dataclass(frozen=True)
class MultifdPacket:
    flags: int
    pages_alloc: int
    normal_pages: int
    next_packet_size: int
    packet_num: int
    zero_pages: int
    ramblock: str
    normal: np.ndarray  # page indices (int64) of the normal pages, data order
    zero: np.ndarray  # page indices of the zero pages

    @property
    def sync(self) -> bool:
        return bool(self.flags & FLAG_SYNC)


def decode_init(raw: bytes, name: str = "multifd channel") -> MultifdInit:
    if len(raw) < INIT_SIZE:
        raise CorruptFile(f"multifd init message cut short ({len(raw)} of {INIT_SIZE} bytes)",
                          path=name, offset=0)
    magic, version, uuid, cid = _INIT.unpack_from(raw)
    if magic != MULTIFD_MAGIC:
        raise BadMagic(f"multifd init magic 0x{magic:08x}, expected 0x{MULTIFD_MAGIC:08x}",
                       path=name, offset=0)
    if version != MULTIFD_VERSION:
        raise UnsupportedVersion(f"multifd init version {version} (only 1)", path=name,
                                 offset=4)
    return MultifdInit(version, uuid, cid)


def encode_init(channel_id: int, uuid: bytes = bytes(16)) -> bytes:
    return _INIT.pack(MULTIFD_MAGIC, MULTIFD_VERSION, uuid, channel_id)


def decode_packet(raw: bytes | memoryview, page_size: int = 4096, *, name: str = "multifd",
                  offset: int = 0) -> MultifdPacket:
    """Decode one header block of :func:`packet_size` bytes; offsets become page indices.

    Lengths are checked against the fixed slot count, so a hostile header
    cannot make the caller allocate or read more than one packet's worth.
    """
    slots = MULTIFD_PACKET_SIZE // page_size
    if len(raw) < HEADER_SIZE + 8 * slots:
        raise CorruptFile("multifd packet cut short", path=name, offset=offset)
    (magic, version, flags, alloc, normal, nxt, num, zero, _u32,
     rb) = _HDR.unpack_from(raw)
    if magic != MULTIFD_MAGIC:
        raise CorruptFile(f"multifd packet magic 0x{magic:08x}, expected "
                          f"0x{MULTIFD_MAGIC:08x}", path=name, offset=offset)
    if version != MULTIFD_VERSION:
        raise UnsupportedVersion(f"multifd packet version {version} (only 1)", path=name,
                                 offset=offset + 4)
    if flags & FLAG_DEVICE_STATE:
        raise UnsupportedFeature("multifd device-state packets (VFIO) are not supported",
                                 path=name, offset=offset + 8)
    comp = flags & FLAG_COMPRESSION_MASK
    if comp:
        raise UnsupportedFeature(f"multifd compression {_COMPRESSION.get(comp, hex(comp))} is "
                                 "not supported (set multifd-compression none)", path=name,
                                 offset=offset + 8)
    if flags & ~(FLAG_SYNC | FLAG_COMPRESSION_MASK | FLAG_DEVICE_STATE):
        raise CorruptFile(f"multifd packet flags 0x{flags:x} unknown", path=name,
                          offset=offset + 8)
    if alloc > slots or normal + zero > max(alloc, 0) or normal > slots:
        raise CorruptFile(f"multifd packet with {normal}+{zero} pages in {alloc} slots "
                          f"(at most {slots})", path=name, offset=offset + 12)
    if nxt != normal * page_size:
        raise CorruptFile(f"multifd packet payload {nxt} bytes for {normal} pages", path=name,
                          offset=offset + 20)
    block = b""
    if normal or zero:
        block = rb.split(b"\0", 1)[0]
        if not block:
            raise CorruptFile("multifd packet with pages but no RAMBlock name", path=name,
                              offset=offset + 64)
    offs = np.frombuffer(raw, dtype=">u8", count=normal + zero, offset=HEADER_SIZE)
    if offs.size and (offs % page_size).any():
        raise CorruptFile("multifd packet page offset not page aligned", path=name,
                          offset=offset + HEADER_SIZE)
    idx = (offs // page_size).astype(np.int64)
    return MultifdPacket(flags, alloc, normal, nxt, num, zero,
                         block.decode("utf-8", "replace"), idx[:normal], idx[normal:])


def encode_packet(flags: int, packet_num: int, ramblock: str, normal: np.ndarray,
                  zero: np.ndarray, page_size: int = 4096) -> bytes:
    """A header block as QEMU sends it: ``normal`` and ``zero`` are page
    indices; the normal pages' data must follow it, in ``normal`` order."""
    slots = MULTIFD_PACKET_SIZE // page_size
    n, z = int(normal.size), int(zero.size)
    if n + z > slots:
        raise ValueError("too many pages for one packet")
    name = ramblock.encode()
    if len(name) > 255:  # the field keeps a NUL terminator
        raise ValueError(f"RAMBlock name too long for a multifd packet: {ramblock!r}")
    if (n or z) and not name:
        raise ValueError("a packet with pages needs its RAMBlock name")
    # QEMU fills pages_alloc with the slot count, except in the empty SYNC packets.
    alloc = slots if n + z else 0
    hdr = _HDR.pack(MULTIFD_MAGIC, MULTIFD_VERSION, flags, alloc, n, n * page_size,
                    packet_num, z, 0, name)
    offs = np.zeros(slots, dtype=">u8")
    offs[:n] = normal.astype(np.uint64) * page_size
    offs[n:n + z] = zero.astype(np.uint64) * page_size
    return hdr + offs.tobytes()


def encode_sync(packet_num: int, page_size: int = 4096) -> bytes:
    """An empty SYNC packet (the per-channel half of a multifd sync point)."""
    empty = np.zeros(0, dtype=np.int64)
    return encode_packet(FLAG_SYNC, packet_num, "", empty, empty, page_size)


def split_packets(pages: np.ndarray, page_size: int = 4096) -> list[np.ndarray]:
    """Page indices cut into packet-sized pieces (QEMU's 512 KiB batches)."""
    slots = MULTIFD_PACKET_SIZE // page_size
    return [pages[i:i + slots] for i in range(0, pages.size, slots)]
