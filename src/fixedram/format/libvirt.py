"""libvirt save images: a header, the domain XML, padding, then a QEMU stream.

Layout (libvirt ``src/qemu/qemu_saveimage.h``; checked against images that
libvirt 11.3 wrote with ``virsh save`` in raw and sparse format; all fields
host-endian 32-bit, so a header from a big-endian host is read byte-swapped,
as libvirt itself does)::

    char magic[16]   "LibvirtQemudSave" (complete) or "LibvirtQemudPart" (unfinished)
    u32  version     2
    u32  data_len    XML length + cookie + padding, i.e. bytes before the QEMU data
    u32  was_running
    u32  format      0 raw, 1 gzip, 2 bzip2, 3 xz, 4 lzop, 5 zstd, 6 sparse
    u32  cookieOffset  where the cookie starts, counted from the XML (so it
                       is also the XML length including its NUL)
    u32  unused[14]

The QEMU stream starts at ``92 + data_len``. In ``sparse`` images (libvirt
>= 11.2) it is a mapped-ram stream written by QEMU at that offset, with
absolute file offsets. libvirt writes the ``Part`` magic first and the
``Save`` magic only after QEMU finished, so a ``Part`` image is unfinished.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from ..errors import CorruptFile, UnsupportedFeature, UnsupportedVersion

__all__ = ["LIBVIRT_FORMATS", "LibvirtHeader", "probe_libvirt"]

MAGIC_DONE = b"LibvirtQemudSave"
MAGIC_PART = b"LibvirtQemudPart"
HEADER_SIZE = 16 + 4 * 19
LIBVIRT_FORMATS = {0: "raw", 1: "gzip", 2: "bzip2", 3: "xz", 4: "lzop", 5: "zstd", 6: "sparse"}
_MAX_XML = 64 << 20
_HDR_LE = struct.Struct("<16s5I")
_HDR_BE = struct.Struct(">16s5I")


@dataclass(frozen=True)
class LibvirtHeader:
    complete: bool
    version: int
    data_len: int
    was_running: bool
    format: str
    cookie_offset: int
    xml: str

    @property
    def data_offset(self) -> int:
        return HEADER_SIZE + self.data_len


def probe_libvirt(fd: int, size: int, path: str) -> LibvirtHeader | None:
    """Parse a libvirt save header at offset 0, or return None if there is none."""
    raw = os.pread(fd, HEADER_SIZE, 0)
    if raw[:16] not in (MAGIC_DONE, MAGIC_PART):
        return None
    if len(raw) < HEADER_SIZE:
        raise CorruptFile("libvirt save header is cut short", path=path, offset=len(raw))
    magic, version, data_len, was_running, fmt, cookie = _HDR_LE.unpack_from(raw)
    if version not in (1, 2):
        alt = _HDR_BE.unpack_from(raw)
        if alt[1] in (1, 2):
            magic, version, data_len, was_running, fmt, cookie = alt
    if version not in (1, 2):
        raise UnsupportedVersion(f"libvirt save image version {version}", path=path, offset=16)
    if data_len > _MAX_XML or HEADER_SIZE + data_len > size:
        raise CorruptFile(f"libvirt save header data length {data_len} runs past the file",
                          path=path, offset=20)
    if fmt not in LIBVIRT_FORMATS:
        raise CorruptFile(f"libvirt save image format {fmt} unknown", path=path, offset=28)
    name = LIBVIRT_FORMATS[fmt]
    if name not in ("raw", "sparse"):
        raise UnsupportedFeature(f"libvirt save image is {name}-compressed; decompress it "
                                 "first", path=path, offset=28)
    if version == 2 and cookie > data_len:
        raise CorruptFile(f"libvirt save header cookie offset {cookie} lies past its data "
                          f"length {data_len}", path=path, offset=32)
    xml_len = cookie if version == 2 and cookie > 0 else data_len
    xml_raw = os.pread(fd, xml_len, HEADER_SIZE).split(b"\0", 1)[0]
    return LibvirtHeader(magic == MAGIC_DONE, version, data_len, bool(was_running), name,
                         cookie, xml_raw.decode("utf-8", "replace"))
