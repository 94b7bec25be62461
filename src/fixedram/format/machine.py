"""Everything in a save besides RAM pages, as one object the writers serialise.

A save is a machine, not a RAM dump: its configuration section (machine type,
validated capabilities, uuid), the device FULL sections and the vmdesc JSON
trailer that describes both. Writers take a :class:`MachineState` so that the
trailer always describes exactly the bytes written: when a conversion turns
mapped-ram on or off, the ``configuration`` entry changes with the
configuration section, as it would in a file QEMU 10 saved that way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from .constants import TARGET_PAGE_SIZE, SectionType
from .stream import (
    configuration_desc,
    encode_footer,
    encode_header,
    encode_section_full,
    output_capabilities,
)
from .vmdesc import device_data_size, encode_trailer

if TYPE_CHECKING:
    from .vmdesc import VMDesc
    from .walker import Save

__all__ = ["DEFAULT_RAM_SECTION_ID", "DeviceRecord", "MachineState"]

DEFAULT_RAM_SECTION_ID = 2


@dataclass(frozen=True)
class DeviceRecord:
    """One device FULL section: its framing, its data and its vmdesc entry.

    ``desc`` is None when nothing describes the data (the source had no
    vmdesc); a trailer is then not written at all rather than a wrong one.
    """

    idstr: str
    instance_id: int
    version_id: int
    section_id: int
    data: bytes
    desc: Mapping[str, Any] | None = None

    def encode(self) -> bytes:
        return (encode_section_full(SectionType.FULL, self.section_id, self.idstr,
                                    self.instance_id, self.version_id)
                + self.data + encode_footer(self.section_id))

    @property
    def described(self) -> bool:
        """The entry names this section and sizes exactly its data."""
        d = self.desc
        return (d is not None and d.get("name") == self.idstr
                and d.get("instance_id") == self.instance_id
                and device_data_size(d) == len(self.data))


@dataclass
class MachineState:
    """The non-RAM part of a save.

    :ivar capabilities: capabilities of the *output*; only the validated
        ones (``x-ignore-shared``, ``mapped-ram``) reach the file.
    :ivar switchover_start: write QEMU 10's SWITCHOVER_START command before
        the END section (machine types >= 10.0 do; older loaders refuse it).
    :ivar describe: write a vmdesc trailer (QEMU omits it only with
        ``suppress-vmdesc``; we omit it when a device cannot be described).
    """

    machine: str | None
    capabilities: tuple[str, ...] = ()
    uuid: bytes | None = None
    ram_section_id: int = DEFAULT_RAM_SECTION_ID
    devices: list[DeviceRecord] = field(default_factory=list)
    switchover_start: bool = False
    page_size: int = TARGET_PAGE_SIZE
    describe: bool = True

    @classmethod
    def from_file(cls, mf: Save) -> MachineState:
        """The machine state of an opened file, device data read from it."""
        from ..errors import TruncatedFile
        from .constants import Command

        descs = mf.summary.vmdesc.device_entries() if mf.summary.vmdesc else {}
        devices = []
        for d in mf.sections:
            try:
                data = mf.source.pread(d.data_length, d.data_offset)
            except TruncatedFile:
                raise TruncatedFile(f"device section {d.idstr!r} is cut short", path=mf.path,
                                    offset=d.data_offset) from None
            devices.append(DeviceRecord(d.idstr, d.instance_id, d.version_id, d.section_id,
                                        data, descs.get((d.idstr, d.instance_id))))
        hdr = mf.header
        return cls(machine=hdr.machine, capabilities=tuple(hdr.capabilities), uuid=hdr.uuid,
                   ram_section_id=mf.summary.ram_sections[0].section_id, devices=devices,
                   switchover_start=any(c == Command.SWITCHOVER_START
                                        for _, c, _ in mf.summary.commands),
                   page_size=(mf.summary.vmdesc.page_size if mf.summary.vmdesc else None)
                   or TARGET_PAGE_SIZE,
                   describe=mf.summary.vmdesc is not None)

    def with_mapped_ram(self, on: bool) -> MachineState:
        """The same machine with the mapped-ram capability set as given."""
        caps = [c for c in self.capabilities if c != "mapped-ram"]
        if on:
            caps.append("mapped-ram")
        return replace(self, capabilities=tuple(caps), devices=list(self.devices))

    def attach_descs(self, vmdesc: VMDesc | None) -> None:
        """Give each device the entry of a trailer that arrived after it (a stream)."""
        descs = vmdesc.device_entries() if vmdesc is not None else {}
        self.describe = vmdesc is not None
        if vmdesc is not None:
            self.page_size = vmdesc.page_size or TARGET_PAGE_SIZE
        self.devices = [replace(d, desc=descs.get((d.idstr, d.instance_id)))
                        for d in self.devices]

    # -- bytes ------------------------------------------------------------------

    def header(self) -> bytes:
        """Magic, version and the configuration section."""
        return encode_header(self.machine, self.capabilities, self.uuid)

    def device_sections(self) -> bytes:
        return b"".join(d.encode() for d in self.devices)

    def vmdesc(self) -> dict[str, Any] | None:
        """The trailer QEMU would write for this machine, or None.

        None when the machine has no configuration section (nothing to
        describe it with) or a device has no matching entry.
        """
        if not self.describe or self.machine is None:
            return None
        if not all(d.described for d in self.devices):
            return None
        return {"configuration": configuration_desc(self.machine, self.capabilities, self.uuid),
                "page_size": self.page_size,
                "devices": [d.desc for d in self.devices]}

    def tail(self) -> bytes:
        """Device sections, EOF and the trailer: what follows the last RAM section."""
        doc = self.vmdesc()
        out = self.device_sections() + bytes([SectionType.EOF])
        return out + encode_trailer(doc) if doc is not None else out

    @property
    def mapped_ram(self) -> bool:
        return "mapped-ram" in output_capabilities(self.capabilities)

    @property
    def ignore_shared(self) -> bool:
        """x-ignore-shared reaches the file: every RAMBlock record carries an address."""
        return "x-ignore-shared" in output_capabilities(self.capabilities)
