"""Small helpers shared by tests (no QEMU here)."""

from __future__ import annotations

import os
from pathlib import Path


def sparse_prefix(src: Path, dst: Path, n: int) -> None:
    """Copy the first ``n`` bytes of ``src`` to ``dst``, keeping holes (SEEK_DATA)."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fo.truncate(n)
        fdi = fi.fileno()
        pos = 0
        while pos < n:
            try:
                data = os.lseek(fdi, pos, os.SEEK_DATA)
            except OSError:
                break
            if data >= n:
                break
            hole = min(os.lseek(fdi, data, os.SEEK_HOLE), n)
            off = data
            while off < hole:
                chunk = os.pread(fdi, min(1 << 20, hole - off), off)
                os.pwrite(fo.fileno(), chunk, off)
                off += len(chunk)
            pos = hole


def elf_phdrs(data: bytes) -> list[tuple[int, int, int, int, int]]:
    """(p_type, p_offset, p_paddr, p_filesz, p_memsz) of each program header of an ELF64
    core whose first bytes are ``data`` (the headers are near the start)."""
    import struct

    assert data[:4] == b"\x7fELF"
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    out = []
    for i in range(phnum):
        p_type, _fl, off, _va, pa, filesz, memsz, _al = struct.unpack_from(
            "<IIQQQQQQ", data, phoff + i * phentsize)
        out.append((p_type, off, pa, filesz, memsz))
    return out


def elf_segments(path: Path) -> list[tuple[int, int, int]]:
    """(p_offset, p_paddr, p_filesz) of each PT_LOAD of an ELF64 core."""
    return [(off, pa, filesz) for p_type, off, pa, filesz, _ in
            elf_phdrs(path.read_bytes()[:65536]) if p_type == 1]


def assert_truthful_vmdesc(path: Path | str) -> dict[str, object]:
    """The file's vmdesc describes exactly what it holds, as QEMU's would.

    Every device section and the configuration section decode through it to
    their last byte (the checks QEMU's analyze-migration makes), the
    configuration entry names the capabilities the stream carries, and the
    JSON is in QEMU's compact style. Returns the decoded configuration.
    """
    import json

    from fixedram.format.devstate import decode_configuration
    from fixedram.format.migfile import MigrationFile

    with MigrationFile(path) as mf:
        vd = mf.vmdesc
        assert vd is not None, f"{path}: no vmdesc trailer"
        assert list(vd.doc) == ["configuration", "page_size", "devices"]
        assert json.dumps(vd.doc).encode() == vd.raw
        cfg = decode_configuration(mf)
        assert cfg["name"] == mf.machine
        caps = cfg.get("configuration/capabilities", {}).get("capabilities", [])
        assert caps == mf.capabilities
        devs = mf.devices()
        assert [(d.name, d.instance_id) for d in devs] == [
            (s.idstr, s.instance_id) for s in mf.sections]
        assert [(d["name"], d["instance_id"]) for d in vd.doc["devices"]] == [
            (s.idstr, s.instance_id) for s in mf.sections]
        return cfg
