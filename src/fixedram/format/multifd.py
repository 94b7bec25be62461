"""Socket multifd framing: the per-channel init message and the page packets.

With ``multifd`` on and mapped-ram off, QEMU opens extra connections next to
the main stream. Each starts with a 64-byte init message, then carries
fixed-size packets (a 320-byte header plus one be64 offset per page slot),
each followed by the data of its normal pages. All integers are
big-endian. The packet size on the wire is fixed by the page count of the
build (512 KiB / target page size), not by the header's ``pages_alloc``,
which is 0 in SYNC packets.

With ``multifd-compression`` zlib or zstd, a packet's page data is the next
piece of one compressed stream per channel: the sender keeps one deflate
(zlib format) or zstd stream for the whole migration and flushes it at the
end of each packet's normal pages (``Z_SYNC_FLUSH``, ``ZSTD_e_flush``), so a
packet's ``next_packet_size`` bytes decode to exactly its pages, but only
with the decoder state left by the channel's earlier packets. Packets with
data carry the method's flag; SYNC packets carry none. Zero pages are listed
as with no compression and have no data.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import IO, Any, cast

import numpy as np

from ..errors import BadMagic, CorruptFile, FixedramError, UnsupportedFeature, UnsupportedVersion
from .constants import TARGET_PAGE_SIZE

__all__ = [
    "COMPRESSION_FLAGS",
    "DECODED_METHODS",
    "INIT_ID_OFFSET",
    "INIT_SIZE",
    "MAX_COMPRESSED_SIZE",
    "MULTIFD_MAGIC",
    "MULTIFD_MAGIC_BYTES",
    "MULTIFD_PACKET_SIZE",
    "MultifdInit",
    "MultifdPacket",
    "PageCompressor",
    "PageDecompressor",
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
INIT_ID_OFFSET = 24  # the channel id's byte in the init message (after magic, version, uuid)
HEADER_SIZE = 320
MULTIFD_PACKET_SIZE = 512 << 10  # bytes of page data a packet can describe

FLAG_SYNC = 0x1
FLAG_COMPRESSION_MASK = 0x3E
FLAG_DEVICE_STATE = 0x40
# QEMU's multifd-compression methods and their packet flags (one bit each).
COMPRESSION_FLAGS = {"none": 0x0, "zlib": 0x2, "zstd": 0x4, "qpl": 0x8, "uadk": 0x10,
                     "qatzip": 0x20}
_METHOD_OF_FLAG = {v: k for k, v in COMPRESSION_FLAGS.items()}
# The methods whose page data fixedram decodes (the others need hardware or
# libraries that are not generally available: Intel QPL/QAT, HiSilicon UADK).
DECODED_METHODS = ("none", "zlib", "zstd")
# The most compressed data QEMU reads for one packet (its buffer per channel).
MAX_COMPRESSED_SIZE = 2 * MULTIFD_PACKET_SIZE
# The largest zstd window a channel may ask for: that of multifd-zstd-level
# 20, QEMU's highest (zstd's own limit, 128 MiB per channel, is more memory
# than a peer should be able to claim).
MAX_ZSTD_WINDOW = 32 << 20

_INIT = struct.Struct(">II16sB7x32x")
_HDR = struct.Struct(">IIIIIIQII24x256s")
assert _INIT.size == INIT_SIZE and _HDR.size == HEADER_SIZE


def packet_size(page_size: int = TARGET_PAGE_SIZE) -> int:
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

    @property
    def compression(self) -> str:
        """The method named by the flags ("none" in SYNC packets, whatever the channel's)."""
        return _METHOD_OF_FLAG[self.flags & FLAG_COMPRESSION_MASK]


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


def decode_packet(raw: bytes | bytearray | memoryview, page_size: int = TARGET_PAGE_SIZE, *,
                  name: str = "multifd", offset: int = 0) -> MultifdPacket:
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
    if flags & ~(FLAG_SYNC | FLAG_COMPRESSION_MASK | FLAG_DEVICE_STATE):
        raise CorruptFile(f"multifd packet flags 0x{flags:x} unknown", path=name,
                          offset=offset + 8)
    method = _METHOD_OF_FLAG.get(flags & FLAG_COMPRESSION_MASK)
    if method is None:
        raise CorruptFile(f"packet {num}: multifd packet flags 0x{flags:x} name more than one "
                          "compression method", path=name, offset=offset + 8)
    if method not in DECODED_METHODS:
        raise UnsupportedFeature(f"packet {num}: multifd compression {method} is not supported "
                                 "(use multifd-compression none, zlib or zstd)", path=name,
                                 offset=offset + 8)
    if alloc > slots or normal + zero > max(alloc, 0) or normal > slots:
        raise CorruptFile(f"multifd packet with {normal}+{zero} pages in {alloc} slots "
                          f"(at most {slots})", path=name, offset=offset + 12)
    if method == "none" and nxt != normal * page_size:
        raise CorruptFile(f"multifd packet payload {nxt} bytes for {normal} pages", path=name,
                          offset=offset + 20)
    if method != "none" and (nxt > MAX_COMPRESSED_SIZE or bool(nxt) != bool(normal)):
        raise CorruptFile(f"multifd {method} packet payload {nxt} bytes for {normal} pages "
                          f"(at most {MAX_COMPRESSED_SIZE}, and none without pages)",
                          path=name, offset=offset + 20)
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
                  zero: np.ndarray, page_size: int = TARGET_PAGE_SIZE, *,
                  payload_size: int | None = None) -> bytes:
    """A header block as QEMU sends it: ``normal`` and ``zero`` are page
    indices; the normal pages' data must follow it, in ``normal`` order
    (``payload_size`` bytes of it when compressed, see :class:`PageCompressor`)."""
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
    nxt = n * page_size if payload_size is None else payload_size
    hdr = _HDR.pack(MULTIFD_MAGIC, MULTIFD_VERSION, flags, alloc, n, nxt, packet_num, z, 0,
                    name)
    offs = np.zeros(slots, dtype=">u8")
    offs[:n] = normal.astype(np.uint64) * page_size
    offs[n:n + z] = zero.astype(np.uint64) * page_size
    return hdr + offs.tobytes()


def encode_sync(packet_num: int, page_size: int = TARGET_PAGE_SIZE) -> bytes:
    """An empty SYNC packet (the per-channel half of a multifd sync point)."""
    empty = np.zeros(0, dtype=np.int64)
    return encode_packet(FLAG_SYNC, packet_num, "", empty, empty, page_size)


def split_packets(pages: np.ndarray, page_size: int = TARGET_PAGE_SIZE) -> list[np.ndarray]:
    """Page indices cut into packet-sized pieces (QEMU's 512 KiB batches)."""
    slots = MULTIFD_PACKET_SIZE // page_size
    return [pages[i:i + slots] for i in range(0, pages.size, slots)]


class _PagesOverflow(FixedramError):
    """More decompressed bytes than the packet's pages (raised inside zstd's callback)."""


class _PageSink:
    """zstd's output, copied straight into the packet's page buffer."""

    def __init__(self) -> None:
        self.out: memoryview = memoryview(b"")
        self.pos = 0

    def write(self, b: Any) -> int:
        n = len(b)
        end = self.pos + n
        if end > len(self.out):
            raise _PagesOverflow
        self.out[self.pos:end] = b
        self.pos = end
        return n


class PageDecompressor:
    """One channel's decoder: the packets' compressed data, in channel order,
    back to page bytes.

    Decoding state carries over from packet to packet, as the sender's
    stream does, so one instance serves exactly one channel. Output is
    bounded by the packet's page count whatever the input claims: a
    payload that decodes to more or fewer bytes, or that is not valid
    zlib/zstd data, raises :class:`CorruptFile`.
    """

    def __init__(self, method: str, page_size: int = TARGET_PAGE_SIZE) -> None:
        if method not in ("zlib", "zstd"):
            raise ValueError(f"no decompressor for multifd compression {method!r}")
        self.method = method
        self.page_size = page_size
        self._zlib: Any = None
        self._zstd: Any = None
        self._sink = _PageSink()
        if method == "zlib":
            self._zlib = zlib.decompressobj()  # zlib format, as QEMU's inflateInit
        else:
            import zstandard

            # zstd keeps decoded bytes it has no room for until the next call,
            # and the writer calls again only while input is left: with room
            # for more than a packet's pages, a packet's data all come out.
            self._zstd = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW).stream_writer(
                cast("IO[bytes]", self._sink),  # it only calls write(); stubs want a file
                write_size=MAX_COMPRESSED_SIZE, write_return_read=True,
                closefd=False)
            self._zstd_error = zstandard.ZstdError
        self.broken = False  # after an error the stream state is lost for good

    def decompress(self, payload: memoryview | bytes, npages: int, out: memoryview, *,
                   name: str = "multifd", offset: int = 0) -> memoryview:
        """Decode one packet's ``payload`` to ``npages`` pages in ``out``;
        returns the filled part. ``offset`` is where the payload starts in
        the channel, for errors."""
        want = npages * self.page_size
        if len(out) < want:
            raise ValueError("page buffer too small for the packet")
        if self.broken:
            raise CorruptFile(f"{self.method} stream unusable after an earlier error",
                              path=name, offset=offset)
        self.broken = True
        got = self._zlib_into(payload, want, out, name, offset) if self._zlib is not None \
            else self._zstd_into(payload, want, out, name, offset)
        if got != want:
            raise CorruptFile(f"{self.method} page data decompress to "
                              f"{'more than ' if got > want else ''}{min(got, want)} bytes, "
                              f"the packet has {npages} pages ({want} bytes)", path=name,
                              offset=offset)
        self.broken = False
        return out[:want]

    def _zlib_into(self, payload: memoryview | bytes, want: int, out: memoryview, name: str,
                   offset: int) -> int:
        d = self._zlib
        try:
            # One byte of room beyond the pages shows data that decode to more.
            data = d.decompress(payload, want + 1)
        except zlib.error as e:
            raise CorruptFile(f"zlib page data corrupt ({e})", path=name,
                              offset=offset) from None
        if d.eof:
            raise CorruptFile("zlib stream ended (QEMU's never does)", path=name,
                              offset=offset)
        # Below the limit, inflate has consumed the whole payload.
        n = len(data)
        if n <= want:
            out[:n] = data
        return n

    def _zstd_into(self, payload: memoryview | bytes, want: int, out: memoryview, name: str,
                   offset: int) -> int:
        sink = self._sink
        sink.out = out[:want]
        sink.pos = 0
        try:
            self._zstd.write(payload)
        except _PagesOverflow:
            return want + 1
        except self._zstd_error as e:
            raise CorruptFile(f"zstd page data corrupt ({e})", path=name,
                              offset=offset) from None
        finally:
            sink.out = memoryview(b"")
        return sink.pos


class PageCompressor:
    """One channel's encoder, as QEMU's sender: one stream for the whole
    channel, flushed at the end of every packet's pages."""

    def __init__(self, method: str, level: int | None = None) -> None:
        if method == "zlib":
            # QEMU's default multifd-zlib-level is 1, multifd-zstd-level 1.
            self._c: Any = zlib.compressobj(1 if level is None else level)
            self._flush: Any = lambda: self._c.flush(zlib.Z_SYNC_FLUSH)
        elif method == "zstd":
            import zstandard

            self._c = zstandard.ZstdCompressor(level=1 if level is None else level
                                               ).compressobj()
            self._flush = lambda: self._c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        else:
            raise ValueError(f"no compressor for multifd compression {method!r}")
        self.method = method
        self.flag = COMPRESSION_FLAGS[method]

    def compress(self, pages: bytes | memoryview) -> bytes:
        """One packet's page data (its normal pages, concatenated) compressed."""
        out: bytes = self._c.compress(pages) + self._flush()
        return out
