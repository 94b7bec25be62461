"""Stream header, configuration section and section framing (decode and encode).

Layout (QEMU ``migration/savevm.c``)::

    be32 magic "QEVM", be32 version 3,
    0x07 configuration: be32 len, machine name, subsections (0x05 ...)
    sections: START/FULL  u8 type, be32 id, u8 len, idstr, be32 instance, be32 version
              PART/END    u8 type, be32 id
              each followed by its data and the footer 0x7e be32 id
    COMMAND   0x08 be16 cmd be16 len data
    EOF       0x00, then optionally the vmdesc trailer 0x06 be32 len JSON
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import BadMagic, CorruptFile, UnsupportedFeature, UnsupportedVersion
from .constants import (
    MAX_CAPABILITIES,
    MAX_MACHINE_NAME,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    QEMU_VM_FILE_VERSION_COMPAT,
    VALIDATED_CAPABILITIES,
    SectionType,
)
from .primitives import BE16, BE32, ByteReader

__all__ = [
    "SectionHeader",
    "StreamHeader",
    "configuration_desc",
    "encode_command",
    "encode_footer",
    "encode_header",
    "encode_section_full",
    "encode_section_part",
    "output_capabilities",
    "read_footer",
    "read_header",
    "read_section_header",
]


@dataclass
class StreamHeader:
    """Everything before the first section."""

    offset: int  # absolute offset of the magic
    version: int
    machine: str | None  # resolved machine type, e.g. "pc-q35-10.0"; None without configuration
    capabilities: list[str] = field(default_factory=list)
    target_page_bits: int | None = None
    uuid: bytes | None = None
    end: int = 0  # absolute offset of the first section byte


@dataclass
class SectionHeader:
    """Framing of one START/PART/END/FULL section."""

    type: SectionType
    offset: int  # absolute offset of the type byte
    section_id: int
    idstr: str | None = None  # START/FULL only
    instance_id: int | None = None
    version_id: int | None = None
    data_offset: int = 0


def _ascii(b: bytes, r: ByteReader, what: str, at: int) -> str:
    try:
        return b.decode("ascii")
    except UnicodeDecodeError:
        # Non-ASCII names happen (device paths); keep them but never crash.
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptFile(f"{what} is not text: {b[:40]!r}", path=r.name, offset=at) from None


def read_header(r: ByteReader) -> StreamHeader:
    """Magic, version and the configuration section."""
    start = r.tell()
    magic = r.be32("the stream magic")
    if magic != QEMU_VM_FILE_MAGIC:
        raise BadMagic(f"not a QEMU migration stream (magic 0x{magic:08x}, expected QEVM)",
                       path=r.name, offset=start)
    version = r.be32("the stream version")
    if version == QEMU_VM_FILE_VERSION_COMPAT:
        raise UnsupportedVersion("stream version 2 is obsolete (QEMU before 1.3)", path=r.name,
                                 offset=start + 4)
    if version != QEMU_VM_FILE_VERSION:
        raise UnsupportedVersion(f"unsupported stream version {version}", path=r.name,
                                 offset=start + 4)
    hdr = StreamHeader(offset=start, version=version, machine=None)
    if r.peek_u8() == SectionType.CONFIGURATION:
        r.u8()
        at = r.tell()
        n = r.be32("the machine name length")
        if n == 0 or n > MAX_MACHINE_NAME:
            raise CorruptFile(f"machine name length {n} out of range", path=r.name, offset=at)
        hdr.machine = _ascii(r.read(n, "the machine name"), r, "machine name", at + 4)
        while r.peek_u8() == SectionType.SUBSECTION:
            _read_config_subsection(r, hdr)
    hdr.end = r.tell()
    return hdr


def _read_config_subsection(r: ByteReader, hdr: StreamHeader) -> None:
    at = r.tell()
    r.u8()
    n = r.u8("a subsection name length")
    name = _ascii(r.read(n, "a subsection name"), r, "subsection name", at + 2)
    r.be32("a subsection version")
    if name == CAPS_SUBSECTION:
        cat = r.tell()
        count = r.be32("the capability count")
        if count > MAX_CAPABILITIES:
            raise CorruptFile(f"capability count {count} out of range", path=r.name, offset=cat)
        for _ in range(count):
            cap_at = r.tell()
            ln = r.u8("a capability name length")
            cap = _ascii(r.read(ln, "a capability name"), r, "capability name", cap_at + 1)
            hdr.capabilities.append(cap)
    elif name == "configuration/target-page-bits":
        hdr.target_page_bits = r.be32("target page bits")
    elif name == UUID_SUBSECTION:
        hdr.uuid = r.read(16, "the VM uuid")
    else:
        raise UnsupportedFeature(f"unknown configuration subsection {name!r}", path=r.name,
                                 offset=at)


def read_section_header(r: ByteReader, stype: int, at: int) -> SectionHeader:
    """The framing after a START/PART/END/FULL type byte (already consumed)."""
    sid = r.be32("a section id")
    sh = SectionHeader(SectionType(stype), at, sid)
    if stype in (SectionType.START, SectionType.FULL):
        nat = r.tell()
        n = r.u8("a section name length")
        sh.idstr = _ascii(r.read(n, "a section name"), r, "section name", nat + 1)
        sh.instance_id = r.be32("a section instance id")
        sh.version_id = r.be32("a section version")
    sh.data_offset = r.tell()
    return sh


def read_footer(r: ByteReader, sh: SectionHeader) -> None:
    at = r.tell()
    b = r.u8("a section footer")
    if b != SectionType.FOOTER:
        raise CorruptFile(
            f"missing section footer for {sh.idstr or sh.section_id!s} (got byte 0x{b:02x})",
            path=r.name, offset=at)
    sid = r.be32("a section footer id")
    if sid != sh.section_id:
        raise CorruptFile(
            f"section footer id 0x{sid:x} does not match section id 0x{sh.section_id:x}",
            path=r.name, offset=at + 1)


# -- encoders -------------------------------------------------------------------


def output_capabilities(capabilities: list[str] | tuple[str, ...]) -> list[str]:
    """The capabilities a configuration section records: only those QEMU
    validates, in QEMU's enum order (the destination compares the lists)."""
    return [c for c in VALIDATED_CAPABILITIES if c in capabilities]


def encode_header(machine: str | None, capabilities: list[str] | tuple[str, ...] = (),
                  uuid: bytes | None = None) -> bytes:
    """Magic, version 3 and the configuration section (see :func:`configuration_desc`)."""
    out = bytearray(BE32.pack(QEMU_VM_FILE_MAGIC) + BE32.pack(QEMU_VM_FILE_VERSION))
    if machine is None:
        return bytes(out)
    name = machine.encode()
    out += bytes([SectionType.CONFIGURATION]) + BE32.pack(len(name)) + name
    caps = output_capabilities(capabilities)
    if caps:
        out += _subsection_head(CAPS_SUBSECTION)
        out += BE32.pack(len(caps))
        for c in caps:
            out += bytes([len(c)]) + c.encode()
    if uuid is not None:
        if len(uuid) != 16:
            raise ValueError("a VM uuid is 16 bytes")
        out += _subsection_head(UUID_SUBSECTION) + uuid
    return bytes(out)


CAPS_SUBSECTION = "configuration/capabilities"
UUID_SUBSECTION = "configuration/uuid"


def _subsection_head(name: str) -> bytes:
    n = name.encode()
    return bytes([SectionType.SUBSECTION, len(n)]) + n + BE32.pack(1)


def configuration_desc(machine: str, capabilities: list[str] | tuple[str, ...] = (),
                       uuid: bytes | None = None) -> dict[str, Any]:
    """The vmdesc entry describing what :func:`encode_header` writes.

    Shaped as QEMU's vmstate description of its ``configuration`` VMSD: a
    variable array is described by its first element's size plus
    ``array_len`` when it has more than one element.
    """
    desc: dict[str, Any] = {"vmsd_name": "configuration", "version": 1, "fields": [
        {"name": "len", "type": "uint32", "size": 4},
        {"name": "name", "type": "buffer", "size": len(machine.encode())}]}
    subs: list[dict[str, Any]] = []
    caps = output_capabilities(capabilities)
    if caps:
        cap: dict[str, Any] = {"name": "capabilities"}
        if len(caps) > 1:
            cap["array_len"] = len(caps)
        cap.update(type="capability", size=1 + len(caps[0]))
        subs.append({"vmsd_name": CAPS_SUBSECTION, "version": 1, "fields": [
            {"name": "caps_count", "type": "uint32", "size": 4}, cap]})
    if uuid is not None:
        subs.append({"vmsd_name": UUID_SUBSECTION, "version": 1, "fields": [
            {"name": "uuid.data", "array_len": 16, "type": "uint8", "size": 1}]})
    if subs:
        desc["subsections"] = subs
    return desc


def encode_section_full(stype: int, section_id: int, idstr: str, instance_id: int,
                        version_id: int) -> bytes:
    name = idstr.encode()
    return (bytes([stype]) + BE32.pack(section_id) + bytes([len(name)]) + name
            + BE32.pack(instance_id) + BE32.pack(version_id))


def encode_section_part(stype: int, section_id: int) -> bytes:
    return bytes([stype]) + BE32.pack(section_id)


def encode_footer(section_id: int) -> bytes:
    return bytes([SectionType.FOOTER]) + BE32.pack(section_id)


def encode_command(cmd: int, data: bytes = b"") -> bytes:
    return bytes([SectionType.COMMAND]) + BE16.pack(cmd) + BE16.pack(len(data)) + data
