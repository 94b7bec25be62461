"""Numbers of the QEMU migration stream, version 3.

Values come from QEMU's ``migration/savevm.h``, ``migration/ram.h`` and
``migration/ram.c`` (QEMU 9.0-10.x); see docs/formats.md for what they mean.
"""

from __future__ import annotations

import enum

QEMU_VM_FILE_MAGIC = 0x5145564D  # "QEVM"
QEMU_VM_FILE_VERSION_COMPAT = 2
QEMU_VM_FILE_VERSION = 3
STREAM_MAGIC_BYTES = b"QEVM\x00\x00\x00\x03"


class SectionType(enum.IntEnum):
    """Top-level item types of the stream (one byte each)."""

    EOF = 0x00
    START = 0x01
    PART = 0x02
    END = 0x03
    FULL = 0x04
    SUBSECTION = 0x05
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08
    FOOTER = 0x7E


class Command(enum.IntEnum):
    """QEMU_VM_COMMAND sub-commands (be16)."""

    INVALID = 0
    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    PACKAGED = 7
    ENABLE_COLO = 8
    POSTCOPY_RESUME = 9
    RECV_BITMAP = 10
    SWITCHOVER_START = 11


# RAM section ("ram", instance 0, version 4) record flags, in the low bits of a be64.
RAM_SECTION_NAME = "ram"
RAM_SECTION_VERSION = 4
RAM_FLAG_FULL = 0x001  # obsolete, never written since 2009
RAM_FLAG_ZERO = 0x002
RAM_FLAG_MEM_SIZE = 0x004
RAM_FLAG_PAGE = 0x008
RAM_FLAG_EOS = 0x010
RAM_FLAG_CONTINUE = 0x020
RAM_FLAG_XBZRLE = 0x040
RAM_FLAG_HOOK = 0x080
RAM_FLAG_COMPRESS_PAGE = 0x100  # QEMU 9.0 and older only
RAM_FLAG_MULTIFD_FLUSH = 0x200

# x86 (and every target that matters here) uses 4 KiB target pages.
TARGET_PAGE_BITS = 12
TARGET_PAGE_SIZE = 1 << TARGET_PAGE_BITS

MAPPED_RAM_HDR_VERSION = 1
MAPPED_RAM_HDR_SIZE = 28
# QEMU aligns each pages region to 1 MiB of absolute file offset so that
# O_DIRECT works on any filesystem block size.
MAPPED_RAM_FILE_OFFSET_ALIGNMENT = 1 << 20

# Capabilities that QEMU records in the configuration section and checks
# on load, in QAPI enum order.
VALIDATED_CAPABILITIES = ("x-ignore-shared", "mapped-ram")

# Limits for untrusted lengths: anything above is corrupt, not just big.
MAX_IDSTR = 255
MAX_MACHINE_NAME = 256
MAX_VMDESC_JSON = 64 << 20
MAX_CAPABILITIES = 64
MAX_PAGE_SIZE = 1 << 30
# A RAMBlock larger than this is taken as corrupt: readers size per-page
# indexes from it (12 bytes per page for a stream).
MAX_BLOCK_BYTES = 1 << 44
