"""Turning an opened save into facts for people and scripts (inspect)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .format.walker import Save

if TYPE_CHECKING:
    from .format.walker import BlockFacts
    from .memory.layout import PhysRange

__all__ = ["SCHEMA_VERSION", "describe", "placement"]

# Every ``--json`` document of the command line starts with this (docs/json.md).
SCHEMA_VERSION = 1


def placement(ranges: Sequence[PhysRange[BlockFacts]]) -> list[dict[str, int]]:
    """A block's ``guest_physical`` list (docs/json.md)."""
    return [{"gpa": r.gpa, "block_offset": r.block_offset, "length": r.length} for r in ranges]


def describe(mf: Save, placed: tuple[Sequence[Sequence[PhysRange[BlockFacts]]], str | None]
             ) -> dict[str, Any]:
    """The ``fixedram inspect --json`` object, for a file or a one-pass input.

    ``placed`` is :func:`fixedram.memory.layout.guest_physical` of ``mf``:
    each block's guest-physical ranges, and why there are none.

    For a one-pass input (a pipe, a compressed image) ``compression`` names
    the compressor, offsets are in the (decompressed) QEMU stream, and the
    sizes are the input's (None for a pipe).
    """
    apparent, allocated = mf.input_sizes()
    ranges, unplaced = placed
    blocks = []
    for b in mf.blocks:
        e: dict[str, Any] = {
            "idstr": b.idstr,
            "used_length": b.used_length,
            "page_size": b.page_size,
            "pages": b.npages,
            "pages_present": b.pages_present,
            "zero_pages": b.zero_pages,
        }
        m = b.record.mapped
        if m is not None:
            e.update(header_offset=m.offset, bitmap_offset=m.bitmap_offset,
                     bitmap_bytes=b.record.bitmap_bytes, pages_offset=m.pages_offset)
        else:
            e["record_offset"] = b.record.record_offset
            e["max_sends"] = b.max_sends
        if b.record.gpa is not None:
            e["gpa"] = b.record.gpa
        e["guest_physical"] = placement(ranges[b.index])
        blocks.append(e)
    out: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "file": mf.path,
        "format": mf.format,
        "stream_offset": mf.start,
        "machine": mf.machine,
        "capabilities": mf.capabilities,
        "complete": mf.complete,
        "blocks": blocks,
        "ram_bytes": sum(b.used_length for b in mf.blocks),
        "passes": mf.passes,
        "ram_sections": len(mf.summary.ram_sections),
        "resent_bytes": mf.resent_bytes,
        "devices": [
            {"idstr": d.idstr, "instance_id": d.instance_id, "version_id": d.version_id,
             "offset": d.offset, "length": d.data_length}
            for d in mf.sections
        ],
        "commands": [{"offset": o, "cmd": c} for o, c, _ in mf.summary.commands],
        "eof_offset": mf.summary.eof_offset,
        "vmdesc": mf.summary.vmdesc is not None,
        "apparent_bytes": apparent,
        "allocated_bytes": allocated,
        "compression": mf.compression,
        "one_pass": not mf.random_access,
    }
    if mf.error is not None:
        out["error"] = str(mf.error)
    if unplaced is not None:
        out["guest_physical_error"] = unplaced
    if mf.libvirt is not None:
        lv = mf.libvirt
        out["libvirt"] = {"complete": lv.complete, "version": lv.version,
                          "image_format": lv.format, "was_running": lv.was_running,
                          "data_len": lv.data_len, "data_offset": lv.data_offset,
                          "cookie_offset": lv.cookie_offset, "xml_bytes": len(lv.xml_raw),
                          "cookie_bytes": None if lv.cookie is None else len(lv.cookie),
                          "big_endian": lv.big_endian}
    return out
