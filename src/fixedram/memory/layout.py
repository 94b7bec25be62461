"""Where guest RAM sits in guest-physical address space.

A migration file names RAMBlocks, not addresses. For the x86 machine types
the split of main RAM below and above 4 GiB is fixed by QEMU's board code
(hw/i386/pc_piix.c and pc_q35.c), so it can be computed from the machine
type and the RAM size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from ..errors import CorruptFile, FixedramError, UnsupportedFeature
from ..format.walker import BlockFacts, SaveFacts

# A range's block is the reader's own: a file's can be read at offsets, a pipe's cannot.
B = TypeVar("B", bound=BlockFacts)

__all__ = ["PhysRange", "guest_physical", "main_ram_block", "physical_ranges",
           "x86_firmware_ranges"]

GiB = 1 << 30
# The x86 BIOS RAMBlock: pc and q35 map it so that it ends at 4 GiB (x86_bios_rom_init).
X86_BIOS_BLOCK = "pc.bios"


@dataclass(frozen=True)
class PhysRange(Generic[B]):
    """``length`` bytes of ``block`` from ``block_offset`` appear at guest address ``gpa``."""

    gpa: int
    block: B
    block_offset: int
    length: int


def main_ram_block(mf: SaveFacts[B]) -> B:
    """The guest's main RAM: ``pc.ram`` on x86, else the largest block."""
    if not mf.blocks:
        raise CorruptFile("the file holds no RAMBlock to place in guest memory", path=mf.path,
                          offset=mf.start)
    for b in mf.blocks:
        if b.idstr in ("pc.ram", "mach-virt.ram"):
            return b
    return max(mf.blocks, key=lambda b: b.used_length)


def x86_below_4g(machine: str, ram_size: int) -> int:
    """Bytes of main RAM QEMU maps below 4 GiB for pc (i440fx) and q35."""
    if machine.startswith("pc-q35") or machine == "q35":
        lowmem = 0x80000000 if ram_size >= 0xB0000000 else 0xB0000000
    elif machine.startswith(("pc-i440fx", "pc")):
        # Traditional 3.5 GiB split, gigabyte-aligned to 3 GiB when it splits.
        lowmem = 0xC0000000 if ram_size >= 0xE0000000 else 0xE0000000
    else:
        raise UnsupportedFeature(f"guest-physical layout of machine type {machine!r} is not "
                                 "known (pc and q35 are)")
    return min(ram_size, lowmem)


def physical_ranges(mf: SaveFacts[B]) -> list[PhysRange[B]]:
    """Guest-physical ranges of the file's main RAM, in address order.

    Placed by the machine type's board layout. The per-block address that
    ``x-ignore-shared`` files carry is the memory region's offset inside its
    parent container (``pc.ram`` and ``pc.bios`` alike can say 0), not where
    the guest sees the block, so it is never used for placement.
    """
    ram = main_ram_block(mf)
    machine = mf.machine or ""
    below = x86_below_4g(machine, ram.used_length)
    out = [PhysRange(0, ram, 0, below)]
    if ram.used_length > below:
        out.append(PhysRange(4 * GiB, ram, below, ram.used_length - below))
    return out


def x86_firmware_ranges(mf: SaveFacts[B]) -> list[PhysRange[B]]:
    """The BIOS ROM as x86 pc/q35 map it: ``pc.bios`` ending at 4 GiB.

    QEMU's ``dump-guest-memory`` writes a LOAD for it (SeaBIOS: 0xfffc0000,
    256 KiB). The ISA copy of its last 128 KiB below 1 MiB and ``pc.rom`` are
    shadowed by RAM once the firmware has set up the PAM registers, so
    neither is mapped in a running guest. An absent or oversized BIOS block
    gives none.
    """
    x86_below_4g(mf.machine or "", 0)  # raises for a machine that is not pc/q35
    for b in mf.blocks:
        if b.idstr == X86_BIOS_BLOCK and 0 < b.used_length <= 16 << 20:
            return [PhysRange(4 * GiB - b.used_length, b, 0, b.used_length)]
    return []


def guest_physical(mf: SaveFacts[B]) -> tuple[list[list[PhysRange[B]]], str | None]:
    """Where the guest sees each block: per block, in the save's block order, its
    ranges in address order (none for a block the guest does not see, such as
    ``pc.rom``), and why no block is placed when the layout is not known (a
    machine type that is not pc or q35), else None.
    """
    out: list[list[PhysRange[B]]] = [[] for _ in mf.blocks]
    try:
        ranges = physical_ranges(mf) + x86_firmware_ranges(mf)
    except FixedramError as e:
        return out, str(e)
    for r in sorted(ranges, key=lambda r: r.gpa):
        out[r.block.index].append(r)
    return out, None
