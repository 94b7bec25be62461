"""libvirt save header edge cases that real images rarely show (no libvirt needed)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from fixedram.errors import CorruptFile, UnsupportedFeature
from fixedram.format.libvirt import HEADER_SIZE, MAGIC_DONE, probe_libvirt

XML = b"<domain type='qemu'><name>x</name></domain>\n\0"


def _image(tmp_path: Path, *, endian: str = "<", fmt: int = 6, cookie: int | None = None,
           pad: int = 4096) -> Path:
    data_len = len(XML) + pad
    hdr = MAGIC_DONE + struct.pack(f"{endian}5I", 2, data_len, 1, fmt,
                                   len(XML) if cookie is None else cookie)
    hdr += bytes(HEADER_SIZE - len(hdr))
    p = tmp_path / "img.sav"
    p.write_bytes(hdr + XML + bytes(pad) + b"QEVM\0\0\0\3")
    return p


def _probe(p: Path):  # type: ignore[no-untyped-def]
    fd = os.open(p, os.O_RDONLY)
    try:
        return probe_libvirt(fd, os.fstat(fd).st_size, str(p))
    finally:
        os.close(fd)


@pytest.mark.parametrize("endian", ["<", ">"])
def test_header_either_byte_order(tmp_path: Path, endian: str) -> None:
    h = _probe(_image(tmp_path, endian=endian))
    assert h is not None and h.complete and h.format == "sparse" and h.was_running
    assert h.xml == XML[:-2].decode() + "\n"
    assert h.data_offset == HEADER_SIZE + len(XML) + 4096


def test_header_rejects(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedFeature, match="zstd-compressed"):
        _probe(_image(tmp_path, fmt=5))
    with pytest.raises(CorruptFile, match="format 9 unknown"):
        _probe(_image(tmp_path, fmt=9))
    with pytest.raises(CorruptFile, match="cookie offset"):
        _probe(_image(tmp_path, cookie=1 << 20))
    p = tmp_path / "plain"
    p.write_bytes(b"QEVM\0\0\0\3")
    assert _probe(p) is None
