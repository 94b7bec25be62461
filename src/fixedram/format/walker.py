"""Walk a whole migration stream, section by section, with one set of rules.

The walker is the only place that knows the order of things in a stream. It
serves the file reader (which indexes pages and skips data), the converter
and the bridge (which copy pages as they arrive from a pipe or socket).
RAM records go to a :class:`~fixedram.format.ram.RamRecordSink`; everything
else goes to a :class:`StreamEvents` object.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Generic, Protocol, TypeVar

import numpy as np

from ..errors import CorruptFile, TruncatedFile, UnsupportedFeature, UnsupportedVersion
from .constants import (
    MAX_VMDESC_JSON,
    RAM_SECTION_NAME,
    RAM_SECTION_VERSION,
    Command,
    SectionType,
)
from .primitives import BE32, ByteReader
from .ram import RAMBlockRecord, RamRecordSink, RamStreamState
from .stream import SectionHeader, StreamHeader, read_footer, read_header, read_section_header
from .vmdesc import VMDesc, find_trailer, parse_trailer

if TYPE_CHECKING:
    from typing_extensions import Self

    from ..io.source import ByteSource
    from .devstate import DeviceState
    from .libvirt import LibvirtHeader

__all__ = ["BlockFacts", "DeviceSection", "PageTarget", "Save", "SaveFacts", "StreamEvents",
           "StreamSummary", "read_vmdesc_at_end", "walk_stream"]

# Device state after the RAM is small (KiB to a few MiB); a pipe's tail is
# buffered to find the vmdesc trailer, within this bound.
MAX_DEVICE_TAIL = 512 << 20
_REFUSED_COMMANDS = {
    Command.POSTCOPY_ADVISE: "postcopy",
    Command.POSTCOPY_LISTEN: "postcopy",
    Command.POSTCOPY_RUN: "postcopy",
    Command.POSTCOPY_RAM_DISCARD: "postcopy",
    Command.POSTCOPY_RESUME: "postcopy",
    Command.PACKAGED: "packaged (postcopy) device state",
    Command.ENABLE_COLO: "COLO",
    Command.RECV_BITMAP: "postcopy recovery",
}


@dataclass
class DeviceSection:
    """A non-RAM FULL section: located, its bytes left opaque."""

    idstr: str
    instance_id: int
    version_id: int
    section_id: int
    offset: int  # the type byte
    data_offset: int
    data_length: int
    sized_by: str  # "vmdesc" or "footer-scan"

    @property
    def end(self) -> int:
        """Offset just after the footer."""
        return self.data_offset + self.data_length + 5


@dataclass
class StreamSummary:
    """What a walk found besides RAM pages."""

    header: StreamHeader
    ram: RamStreamState
    devices: list[DeviceSection] = field(default_factory=list)
    commands: list[tuple[int, int, bytes]] = field(default_factory=list)  # (offset, cmd, data)
    ram_sections: list[SectionHeader] = field(default_factory=list)
    boundaries: list[int] = field(default_factory=list)  # offset of every top-level item
    eof_offset: int | None = None
    vmdesc: VMDesc | None = None
    end_offset: int = 0

    @property
    def complete(self) -> bool:
        return self.eof_offset is not None


class BlockFacts:
    """What a RAMBlock's record in the stream says, and the questions every
    reader's block answers about its pages (random access or one pass)."""

    def __init__(self, index: int, rec: RAMBlockRecord) -> None:
        self.index = index
        self.record = rec
        self.idstr = rec.idstr
        self.used_length = rec.used_length
        self.page_size = rec.page_size
        self.npages = rec.npages
        self.gpa = rec.gpa

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.idstr!r} 0x{self.used_length:x}>"

    def present_pages(self) -> np.ndarray:
        """Ascending indices of the pages whose last copy holds data."""
        raise NotImplementedError

    def zeroed_pages(self) -> np.ndarray:
        """Ascending indices of the pages whose last copy was a ZERO record."""
        raise NotImplementedError

    @property
    def pages_present(self) -> int:
        raise NotImplementedError

    @property
    def zero_pages(self) -> int | None:
        """Pages last sent as zero; None where the format does not tell."""
        raise NotImplementedError

    @property
    def max_sends(self) -> int:
        """Most copies of any one page (1 for a paused save, more for live)."""
        raise NotImplementedError

    def copies(self) -> np.ndarray:
        """Per page, how many copies of it were sent (dense uint32, one per page)."""
        raise NotImplementedError


BlockT = TypeVar("BlockT", bound=BlockFacts, covariant=True)


class PageTarget(Protocol):
    """Where pages go as they arrive (extract's outputs, a mapped-ram writer)."""

    def begin(self, f: Save) -> None:
        """The RAMBlock list is known; no page has arrived yet."""

    def pages(self, bi: int, idx: np.ndarray, data: np.ndarray) -> None:
        """Pages ``idx`` (ascending or not, int64) of block ``bi`` now hold ``data``
        (an (n, page_size) view, valid only during the call)."""

    def zeros(self, bi: int, idx: np.ndarray, had_data: np.ndarray) -> None:
        """Pages ``idx`` are zero now; ``had_data`` marks those whose previous
        copy was data (the rest were never sent or were zero already)."""


class SaveFacts(Generic[BlockT]):
    """An opened save: what every reader answers from its header and walk,
    whether it was read with random access (a file: ``MigrationFile``) or
    in one pass (a pipe or a compressed image: ``OnePassFile``).

    :ivar path: how errors name the save (a decompressed stream says so).
    :ivar start: stream offset of the QEVM magic.
    :ivar libvirt: the libvirt header, for a ``virsh save`` image.
    :ivar error: why the stream ended early, for an incomplete save.
    :ivar fd: a descriptor holding the stream's device state at its stream
        offsets (the file itself, or an in-memory copy for one pass).
    :ivar source: the stream's bytes at their stream offsets, read through
        :meth:`~fixedram.io.source.ByteSource.pread`; ``fd`` is its descriptor,
        or -1 when it has none (the VM state of a qcow2 snapshot).
    """

    blocks: Sequence[BlockT]
    path: str
    #: The input as the user named it (``-`` for standard input).
    input_path: str
    #: Where the save ends: the file's size (random access), the stream's end (one pass).
    size: int
    #: What the walk found (a one-pass save raises RuntimeError before its walk).
    summary: StreamSummary
    start: int
    fd: int
    source: ByteSource
    libvirt: LibvirtHeader | None
    error: TruncatedFile | None
    #: Pages can be read at offsets (runs, reads); otherwise each page is
    #: seen once as it arrives (:meth:`OnePassFile.walk` with a target).
    random_access: ClassVar[bool] = True
    #: The decompressor a one-pass input is decoded with, None otherwise.
    compression: str | None = None

    def block(self, idstr: str) -> BlockT:
        for b in self.blocks:
            if b.idstr == idstr:
                return b
        raise KeyError(idstr)

    @property
    def passes(self) -> int:
        """Most times any page was sent (1 for a paused save, more for live)."""
        return max((b.max_sends for b in self.blocks), default=0)

    @property
    def format(self) -> str:
        return "mapped-ram" if "mapped-ram" in self.header.capabilities else "stream"

    @property
    def machine(self) -> str | None:
        return self.header.machine

    @property
    def capabilities(self) -> list[str]:
        return list(self.header.capabilities)

    @property
    def complete(self) -> bool:
        """Ended with EOF, not cut short, and not an unfinished libvirt image."""
        if self.libvirt is not None and not self.libvirt.complete:
            return False
        s = self.walked()
        return self.error is None and s is not None and s.complete

    @property
    def sections(self) -> list[DeviceSection]:
        """The device (non-RAM) FULL sections, located but not decoded."""
        s = self.walked()
        return s.devices if s is not None else []

    @property
    def vmdesc(self) -> VMDesc | None:
        s = self.walked()
        return s.vmdesc if s is not None else None

    @property
    def header(self) -> StreamHeader:
        return self.summary.header

    def walked(self) -> StreamSummary | None:
        """What the walk of the stream found (None before a one-pass walk)."""
        raise NotImplementedError

    def walk(self, target: PageTarget | None = None, *,
             strict: bool | None = None) -> Self:
        """Make the facts known and hand every page's last copy to ``target``;
        returns self.

        A one-pass save walks its stream now, once. A random-access save was
        indexed when opened: with a target, its pages are read from their
        offsets and handed over block by block, each page once (a ZERO page
        as a zero), so a target serves both kinds of input.
        """
        raise NotImplementedError

    @property
    def bytes_read(self) -> int:
        """Input bytes read so far (compressed ones for a compressed input)."""
        raise NotImplementedError

    def devices(self) -> list[DeviceState]:
        """The device sections decoded field by field through the vmdesc, in stream order.

        :raise FormatError: a section disagrees with its vmdesc entry (see
            :func:`fixedram.format.devstate.decode_devices`).
        """
        from .devstate import decode_devices

        return decode_devices(self)

    @property
    def resent_bytes(self) -> int:
        """Bytes of page records that a later copy of the same page superseded."""
        raise NotImplementedError

    def input_sizes(self) -> tuple[int | None, int | None]:
        """The input's apparent and allocated bytes (None for a pipe)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: Any opened save, whatever its reader: what consumers are typed on.
Save = SaveFacts[BlockFacts]


class StreamEvents:
    """Hooks for non-RAM items; the defaults skip device data.

    ``summary`` is filled in as the walk goes, so a caller still has what was
    found when the walk raises (a truncated file, for example).
    """

    summary: StreamSummary | None = None

    def device(self, dev: DeviceSection, r: ByteReader) -> None:
        r.skip(dev.data_length, f"device section {dev.idstr!r}")

    def ram_blocks(self, state: RamStreamState) -> None:
        """Called once the RAMBlock list is known (before any page record)."""

    def section(self, sh: SectionHeader) -> None:
        """Called at each RAM section header."""


def read_vmdesc_at_end(src: ByteSource, start: int) -> VMDesc | None:
    """Find the vmdesc trailer by reading the end of a random-access source."""
    size, path = src.size, src.name
    if size <= start or src.pread(1, size - 1) != b"}":
        return None  # the compact JSON always ends the file with '}'
    for span in (1 << 20, 16 << 20, MAX_VMDESC_JSON + 5):
        n = min(span, size - start)
        if n <= 0:
            return None
        tail = src.pread(n, size - n)
        found = find_trailer(tail, size - n, path)
        if found is not None or n == size - start:
            return found
    return None


def _scan_for_footer(r: ByteReader, sh: SectionHeader) -> int:
    """Length of a device section's data, found by looking for its footer.

    Used only when no vmdesc trailer describes the device. A candidate
    footer counts only if what follows it is a plausible next item.
    """
    assert r.seekable and r.size is not None  # callers check
    pat = bytes([SectionType.FOOTER]) + BE32.pack(sh.section_id)
    pos = sh.data_offset
    # A SourceReader (the VM state of a qcow2 snapshot) reads through its source.
    source: ByteSource | None = getattr(r.f, "source", None)
    try:
        if source is not None:
            def read_at(n: int, off: int) -> bytes:
                return source.pread(min(n, source.size - off), off)
        else:
            fd = r.f.fileno()

            def read_at(n: int, off: int) -> bytes:
                return os.pread(fd, n, off)
    except (OSError, io.UnsupportedOperation):  # a pipe's tail, buffered in memory
        mem = r.f.getbuffer()  # type: ignore[attr-defined]

        def read_at(n: int, off: int) -> bytes:
            return bytes(mem[off:off + n])
    chunk = 1 << 20
    while pos < r.size:
        buf = read_at(chunk + 64, pos - r._delta)
        i = buf.find(pat)
        while i >= 0:
            nxt = buf[i + 5:i + 6]
            if nxt in (b"\x00", b"\x04", b"\x08", b"") or (nxt == b"\x06" and i + 5 < len(buf)):
                return pos + i - sh.data_offset
            i = buf.find(pat, i + 1)
        if len(buf) <= chunk:
            break
        pos += chunk
    raise TruncatedFile(f"end of device section {sh.idstr!r} not found (no vmdesc trailer and "
                        "no footer)", path=r.name, offset=sh.data_offset)


def walk_stream(r: ByteReader, sink: RamRecordSink, events: StreamEvents | None = None,
                *, vmdesc: VMDesc | None = None, stop_at_eof: bool = True) -> StreamSummary:
    """Walk one stream from its magic to EOF (and the vmdesc trailer).

    :param r: reader positioned at the magic.
    :param sink: receives RAM page and zero records.
    :param events: receives device sections and the RAMBlock list.
    :param vmdesc: the trailer if already known (seekable files read it first,
        because device sections can only be sized with it).
    :raise FormatError: for anything that does not follow the format; a
        stream that ends early raises :class:`TruncatedFile`.
    """
    ev = events or StreamEvents()
    hdr = read_header(r)
    caps = set(hdr.capabilities)
    page_bits = hdr.target_page_bits or 12
    if page_bits != 12:
        raise UnsupportedFeature(f"target page size {1 << page_bits} is not supported (only "
                                 "4 KiB target pages)", path=r.name, offset=hdr.offset)
    state = RamStreamState(mapped_ram="mapped-ram" in caps,
                           ignore_shared="x-ignore-shared" in caps, page_size=1 << page_bits)
    state.on_blocks = lambda: ev.ram_blocks(state)
    summary = StreamSummary(header=hdr, ram=state, vmdesc=vmdesc)
    ev.summary = summary
    sizes = vmdesc.device_sizes() if vmdesc else {}
    ram_sid: int | None = None
    blocks_announced = False
    while True:
        at = r.tell()
        summary.boundaries.append(at)
        t = r.u8("a section type (the stream ends before its EOF marker)")
        if t in (SectionType.START, SectionType.FULL):
            sh = read_section_header(r, t, at)
            if sh.idstr == RAM_SECTION_NAME:
                if sh.version_id != RAM_SECTION_VERSION:
                    raise UnsupportedVersion(f"RAM section version {sh.version_id} (only 4)",
                                             path=r.name, offset=at)
                if t != SectionType.START or ram_sid is not None:
                    raise CorruptFile("RAM section must appear once, as a START section",
                                      path=r.name, offset=at)
                ram_sid = sh.section_id
                summary.ram_sections.append(sh)
                ev.section(sh)
                state.read_records(r, sink, in_start=True)
                if not state.blocks:
                    raise CorruptFile("RAM START section has no RAMBlock list", path=r.name,
                                      offset=at)
                blocks_announced = True
            elif t == SectionType.START:
                raise UnsupportedFeature(f"iterative section {sh.idstr!r} is not supported "
                                         "(only RAM)", path=r.name, offset=at)
            else:
                assert sh.idstr is not None and sh.instance_id is not None
                key = (sh.idstr, sh.instance_id)
                if key not in sizes and not r.seekable and summary.vmdesc is None:
                    r = _buffer_tail(r, summary)
                    sizes = summary.vmdesc.device_sizes() if summary.vmdesc else {}
                if key in sizes:
                    length, how = sizes[key], "vmdesc"
                elif r.seekable:
                    length, how = _scan_for_footer(r, sh), "footer-scan"
                else:
                    raise UnsupportedFeature(f"device section {sh.idstr!r} cannot be sized: the "
                                             "stream has no vmdesc trailer", path=r.name,
                                             offset=at)
                rem = r.remaining()
                if rem is not None and length > rem:
                    raise TruncatedFile(f"file ends inside device section {sh.idstr!r}",
                                        path=r.name, offset=sh.data_offset)
                dev = DeviceSection(sh.idstr, sh.instance_id, sh.version_id or 0,
                                    sh.section_id, at, sh.data_offset, length, how)
                ev.device(dev, r)
                summary.devices.append(dev)
            read_footer(r, sh)
        elif t in (SectionType.PART, SectionType.END):
            sh = read_section_header(r, t, at)
            if sh.section_id != ram_sid or not blocks_announced:
                raise CorruptFile(f"{SectionType(t).name} section for unknown section id "
                                  f"0x{sh.section_id:x}", path=r.name, offset=at)
            sh.idstr = RAM_SECTION_NAME
            summary.ram_sections.append(sh)
            ev.section(sh)
            state.read_records(r, sink, in_start=False)
            read_footer(r, sh)
        elif t == SectionType.COMMAND:
            cmd = r.be16("a command number")
            ln = r.be16("a command length")
            data = r.read(ln, "command data")
            if cmd in _REFUSED_COMMANDS:
                raise UnsupportedFeature(f"{_REFUSED_COMMANDS[Command(cmd)]} command {cmd} is "
                                         "not supported", path=r.name, offset=at)
            if cmd == Command.SWITCHOVER_START and ln != 0:
                raise CorruptFile(f"SWITCHOVER_START with {ln} data bytes", path=r.name,
                                  offset=at)
            summary.commands.append((at, cmd, data))
        elif t == SectionType.EOF:
            summary.eof_offset = at
            break
        else:
            raise CorruptFile(f"unknown section type 0x{t:02x}", path=r.name, offset=at)
    if ram_sid is None:
        raise CorruptFile("stream has no RAM section", path=r.name, offset=hdr.end)
    # Trailer: optional. QEMU itself only warns when it is missing.
    nxt = r.peek_u8()
    if nxt == SectionType.VMDESCRIPTION:
        at = r.tell()
        r.u8()
        ln = r.be32("the vmdesc length")
        if ln > MAX_VMDESC_JSON:
            raise CorruptFile(f"vmdesc trailer length {ln} out of range", path=r.name, offset=at)
        raw = r.read(ln, "the vmdesc JSON")
        if summary.vmdesc is None:
            summary.vmdesc = parse_trailer(raw, at, r.name)
    summary.end_offset = r.tell()
    return summary


def _buffer_tail(r: ByteReader, summary: StreamSummary) -> ByteReader:
    """On a pipe, read the rest of the stream so the vmdesc trailer can be used."""
    start = r.tell()
    data = r.read_rest(MAX_DEVICE_TAIL, "device state after RAM")
    summary.vmdesc = find_trailer(data, start, r.name)
    nr = ByteReader(io.BytesIO(data), r.name, start=start)
    return nr
