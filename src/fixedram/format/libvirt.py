"""libvirt save images: a header, the domain XML, a cookie, padding, then a QEMU stream.

Layout (libvirt ``src/qemu/qemu_saveimage.{c,h}``; checked against images that
libvirt 11.3 wrote with ``virsh save`` in all seven formats; all fields
host-endian 32-bit, so a header from a big-endian host is read byte-swapped,
as libvirt itself does)::

    char magic[16]   "LibvirtQemudSave" (complete) or "LibvirtQemudPart" (unfinished)
    u32  version     2
    u32  data_len    XML + NUL, cookie + NUL, padding: the bytes before the QEMU data
    u32  was_running
    u32  format      0 raw, 1 gzip, 2 bzip2, 3 xz, 4 lzop, 5 zstd, 6 sparse
    u32  cookieOffset  where the cookie starts, counted from the XML (so it
                       is also the XML length including its NUL); 0: no cookie
    u32  unused[14]

The QEMU data start at ``92 + data_len``. libvirt makes ``data_len`` the XML
and cookie plus 64 KiB of zeros, room for ``virsh save-image-edit`` to grow
the XML in place. ``raw``: the QEMU stream. ``sparse`` (libvirt >= 11.2): a
mapped-ram stream that QEMU wrote at that offset, with absolute file offsets
(pages at 1 MiB multiples of the .sav). The compressed formats hold the QEMU
stream piped through ``gzip -c``, ``bzip2 -c``, ``xz -c -3``, ``lzop -c`` or
``zstd -c``; they are read in one pass (:mod:`fixedram.format.sequential`).
libvirt writes the ``Part`` magic first and the ``Save`` magic only after
QEMU finished, so a ``Part`` image is unfinished.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, replace

from ..errors import CorruptFile, TruncatedFile, UnsupportedFeature, UnsupportedVersion

__all__ = ["COMPRESSED_FORMATS", "HEADER_SIZE", "LIBVIRT_FORMATS", "LIBVIRT_PAD",
           "MAGIC_DONE", "MAGIC_PART", "CompressedImage", "LibvirtHeader", "parse_libvirt",
           "probe_libvirt"]

MAGIC_DONE = b"LibvirtQemudSave"
MAGIC_PART = b"LibvirtQemudPart"
HEADER_SIZE = 16 + 4 * 19
LIBVIRT_FORMATS = {0: "raw", 1: "gzip", 2: "bzip2", 3: "xz", 4: "lzop", 5: "zstd", 6: "sparse"}
FORMAT_IDS = {name: i for i, name in LIBVIRT_FORMATS.items()}
COMPRESSED_FORMATS = frozenset({"gzip", "bzip2", "xz", "lzop", "zstd"})
# What libvirt adds after the XML and cookie of a new image (virQEMUSaveDataWrite).
LIBVIRT_PAD = 64 << 10
_MAX_XML = 64 << 20
_HDR_LE = struct.Struct("<16s5I")
_HDR_BE = struct.Struct(">16s5I")


class CompressedImage(UnsupportedFeature):
    """A compressed libvirt image met by a reader that needs random access.

    The image is fine: it is read in one sequential pass instead
    (:func:`fixedram.format.sequential.open_sequential`, which every
    ``fixedram`` command uses for it).
    """

    def __init__(self, header: LibvirtHeader, path: str) -> None:
        self.header = header
        super().__init__(f"libvirt save image is {header.format}-compressed: it can only be "
                         "read in one sequential pass, not opened for random access",
                         path=path, offset=header.data_offset)


@dataclass(frozen=True)
class LibvirtHeader:
    complete: bool
    version: int
    data_len: int
    was_running: bool
    format: str
    cookie_offset: int
    xml: str
    xml_raw: bytes = b""  # as stored, without its NUL
    cookie: bytes | None = None  # as stored, without its NUL
    big_endian: bool = False

    @property
    def data_offset(self) -> int:
        return HEADER_SIZE + self.data_len

    @property
    def compressed(self) -> bool:
        return self.format in COMPRESSED_FORMATS

    @classmethod
    def new(cls, xml: bytes, cookie: bytes | None = None, *, was_running: bool = False,
            format: str = "raw") -> LibvirtHeader:
        """A header as libvirt makes a new image's: 64 KiB of room after XML and cookie."""
        xml_len = len(xml) + 1
        used = xml_len + (len(cookie) + 1 if cookie is not None else 0)
        return cls(False, 2, used + LIBVIRT_PAD, was_running, format,
                   xml_len if cookie is not None else 0, xml.decode("utf-8", "replace"),
                   xml, cookie)

    def with_format(self, format: str) -> LibvirtHeader:
        if format not in FORMAT_IDS:
            raise ValueError(f"unknown libvirt save image format {format!r}")
        return replace(self, format=format)

    def encode(self, *, complete: bool = True) -> bytes:
        """Header, XML, cookie and padding: the ``data_offset`` bytes before the QEMU data.

        ``data_len`` is kept (the room an edited XML may have used stays), as
        libvirt keeps it when it rewrites a header; the fields are written
        little-endian, this host's order, whatever the source host's was.
        """
        body = self.xml_raw + b"\0"
        cookie_offset = 0
        if self.cookie is not None:
            cookie_offset = len(body)
            body += self.cookie + b"\0"
        if len(body) > self.data_len:
            raise ValueError("the XML and cookie do not fit in the header's data length")
        head = _HDR_LE.pack(MAGIC_DONE if complete else MAGIC_PART, 2, self.data_len,
                            int(self.was_running), FORMAT_IDS[self.format], cookie_offset)
        head += bytes(HEADER_SIZE - len(head))
        return head + body + bytes(self.data_len - len(body))


def parse_libvirt(head: bytes, path: str, size: int | None = None) -> tuple[LibvirtHeader, int]:
    """The fixed 92 bytes of a header (magic already checked).

    :param size: the file's size when known, to bound ``data_len``.
    :return: the header without XML, and how many bytes of XML and cookie follow.
    """
    if len(head) < HEADER_SIZE:
        raise TruncatedFile("libvirt save header is cut short", path=path, offset=len(head))
    magic, version, data_len, was_running, fmt, cookie = _HDR_LE.unpack_from(head)
    big = False
    if version not in (1, 2):
        alt = _HDR_BE.unpack_from(head)
        if alt[1] in (1, 2):
            magic, version, data_len, was_running, fmt, cookie = alt
            big = True
    if version not in (1, 2):
        raise UnsupportedVersion(f"libvirt save image version {version}", path=path, offset=16)
    if data_len == 0 or data_len > _MAX_XML or (size is not None and
                                                HEADER_SIZE + data_len > size):
        raise CorruptFile(f"libvirt save header data length {data_len} is out of range or runs "
                          "past the end of the image", path=path, offset=20)
    if fmt not in LIBVIRT_FORMATS:
        raise CorruptFile(f"libvirt save image format {fmt} unknown (known: "
                          + ", ".join(f"{k} {v}" for k, v in LIBVIRT_FORMATS.items()) + ")",
                          path=path, offset=28)
    if version == 2 and cookie > data_len:
        raise CorruptFile(f"libvirt save header cookie offset {cookie} lies past its data "
                          f"length {data_len}", path=path, offset=32)
    hdr = LibvirtHeader(magic == MAGIC_DONE, version, data_len, bool(was_running),
                        LIBVIRT_FORMATS[fmt], cookie if version == 2 else 0, "", big_endian=big)
    return hdr, data_len


def with_body(hdr: LibvirtHeader, body: bytes) -> LibvirtHeader:
    """The header completed with the ``data_len`` bytes that follow it."""
    xml_len = hdr.cookie_offset if hdr.cookie_offset > 0 else hdr.data_len
    xml_raw = body[:xml_len].split(b"\0", 1)[0]
    cookie = None
    if hdr.cookie_offset > 0:
        cookie = body[xml_len:].split(b"\0", 1)[0]
    return replace(hdr, xml=xml_raw.decode("utf-8", "replace"), xml_raw=xml_raw, cookie=cookie)


def probe_libvirt(fd: int, size: int, path: str, *,
                  allow_compressed: bool = False) -> LibvirtHeader | None:
    """Parse a libvirt save header at offset 0, or return None if there is none.

    :raise CompressedImage: the image is compressed (unless ``allow_compressed``);
        random-access readers cannot use it.
    """
    raw = os.pread(fd, HEADER_SIZE, 0)
    if raw[:16] not in (MAGIC_DONE, MAGIC_PART):
        return None
    hdr, n = parse_libvirt(raw, path, size)
    hdr = with_body(hdr, os.pread(fd, n, HEADER_SIZE))
    if hdr.compressed and not allow_compressed:
        raise CompressedImage(hdr, path)
    return hdr
