"""Writer and reader agree (no QEMU needed): hypothesis round trips, verify, safe outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixedram.errors import OutputError
from fixedram.format.machine import DeviceRecord, MachineState
from fixedram.format.migfile import MigrationFile
from fixedram.format.writer import BlockSpec, MappedRamWriter, StreamWriter
from fixedram.memory.extract import extract_raw, safe_block_filename
from fixedram.tools.convert import convert_file
from fixedram.tools.verify import compare

PS = 4096
TIMER = DeviceRecord("timer", 0, 2, 5, b"\x11" * 24,
                     {"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2,
                      "fields": [{"name": "t", "array_len": 3, "type": "int64", "size": 8}]})


def machine(name: str = "pc-q35-10.0", mapped_ram: bool = False,
            devices: tuple[DeviceRecord, ...] = (TIMER,)) -> MachineState:
    return MachineState(name, ("mapped-ram",) if mapped_ram else (), devices=list(devices))


def _page(seed: int) -> bytes:
    return (seed.to_bytes(4, "little") * (PS // 4))


def write_stream(path: Path, blocks: list[BlockSpec], passes: list[list[tuple[int, int, int]]]
                 ) -> dict[tuple[int, int], int]:
    """passes: list of [(block, page, seed)]; seed 0 = zero page. Returns final state."""
    state: dict[tuple[int, int], int] = {}
    with open(path, "wb") as f:
        w = StreamWriter(f.write, machine(), blocks)
        w.begin()
        for k, sends in enumerate(passes):
            w.begin_part(end=k == len(passes) - 1)
            for bi, pg, seed in sends:
                if seed:
                    w.pages(bi, pg, _page(seed))
                else:
                    w.zero(bi, pg)
                state[(bi, pg)] = seed
            w.end_part()
        w.finish()
    return state


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[BlockSpec], list[list[tuple[int, int, int]]]]:
    nblocks = draw(st.integers(1, 3))
    names = draw(st.lists(st.text(st.characters(min_codepoint=33, max_codepoint=126),
                                  min_size=1, max_size=20), min_size=nblocks,
                          max_size=nblocks, unique=True))
    blocks = [BlockSpec(n, draw(st.integers(1, 70)) * PS) for n in names]
    passes = draw(st.lists(st.lists(st.integers(0, 10**6).flatmap(
        lambda _: st.tuples(st.integers(0, nblocks - 1), st.integers(0, 69),
                            st.integers(0, 5))), max_size=40), min_size=1, max_size=4))
    passes = [[(b, p % blocks[b].npages, s) for b, p, s in ps] for ps in passes]
    return blocks, passes


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sc=scenarios())
def test_stream_roundtrip_and_convert(tmp_path: Path,
                                      sc: tuple[list[BlockSpec], list[list[tuple[int, int, int]]]]
                                      ) -> None:
    blocks, passes = sc
    src = tmp_path / "s.mig"
    state = write_stream(src, blocks, passes)
    out = tmp_path / "m.mig"
    convert_file(str(src), str(out), "mapped-ram", force=True)
    back = tmp_path / "back.mig"
    convert_file(str(out), str(back), "stream", force=True)
    for p in (src, out, back):
        with MigrationFile(p) as mf:
            assert mf.complete and [b.idstr for b in mf.blocks] == [b.idstr for b in blocks]
            assert [d.idstr for d in mf.sections] == ["timer"]
            for bi, blk in enumerate(mf.blocks):
                present = blk.present()
                for pg in range(blk.npages):
                    seed = state.get((bi, pg), 0)
                    assert present[pg] == bool(seed), (p, bi, pg)
                    if seed:
                        assert blk.read(pg * PS, PS) == _page(seed)
    with MigrationFile(src) as a, MigrationFile(out) as b:
        assert compare(a, b) == []


def test_mapped_ram_layout_is_qemus(tmp_path: Path) -> None:
    """Offsets follow QEMU's rule: header after name+length, bitmap after the header,
    pages at the next 1 MiB boundary, next block straight after the pages region."""
    p = tmp_path / "m.mig"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        w = MappedRamWriter(fd, machine(mapped_ram=True), [BlockSpec("pc.ram", 128 << 20),
                                                           BlockSpec("pc.bios", 256 << 10)])
        w.write_pages(0, 5, _page(7) * 3)
        w.finish()
    finally:
        os.close(fd)
    with MigrationFile(p) as mf:
        ram, bios = mf.blocks
        assert ram.record.mapped is not None and bios.record.mapped is not None
        # The same numbers QEMU 10 writes for a q35 file (format reference, 3.5).
        assert ram.record.mapped.pages_offset == 0x100000
        assert bios.record.record_offset == 0x100000 + (128 << 20)
        assert bios.record.mapped.pages_offset % (1 << 20) == 0
        assert ram.present().nonzero()[0].tolist() == [5, 6, 7]
        assert mf.allocated_bytes() < 1 << 20


def _big_mapped(path: Path, flip: int | None) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        w = MappedRamWriter(fd, machine("pc-i440fx-10.0", True, ()),
                            [BlockSpec("pc.ram", 1 << 30)])
        rng = np.random.default_rng(1)
        chunk = rng.integers(0, 255, size=(256, PS), dtype=np.uint8)
        for first in range(0, 262144, 4096):  # 1 MiB of data every 16 MiB
            w.write_pages(0, first, chunk)
        if flip is not None:
            os.pwrite(fd, bytes([chunk[1, 100] ^ 0xFF]), w.page_offset(0, flip) + 100)
        w.finish()
    finally:
        os.close(fd)


def test_verify_against_finds_one_flipped_byte_in_1gib(tmp_path: Path) -> None:
    a, b = tmp_path / "a.mig", tmp_path / "b.mig"
    _big_mapped(a, None)
    _big_mapped(b, 8193)
    r = subprocess.run([sys.executable, "-m", "fixedram.cli.main", "verify", str(a),
                        "--against", str(b)], capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    assert "'pc.ram': 1 differing pages: 8193 (0x2001000)" in r.stdout
    same = subprocess.run([sys.executable, "-m", "fixedram.cli.main", "verify", str(a),
                           "--against", str(a)], capture_output=True, text=True)
    assert same.returncode == 0 and "RAM equal" in same.stdout


def test_enospc_leaves_nothing(tmp_path: Path) -> None:
    """A conversion that runs out of space leaves no output and a one-line error."""
    src = tmp_path / "s.mig"
    write_stream(src, [BlockSpec("pc.ram", 4 << 20)],
                 [[(0, i, i + 1) for i in range(1024)]])
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        r = subprocess.run([sys.executable, "-m", "fixedram.cli.main", "convert", str(src),
                            str(mnt / "out.mig"), "--to", "mapped-ram"],
                           capture_output=True, text=True)
        assert r.returncode == 1
        assert "no space left on device" in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert os.listdir(mnt) == []
        with pytest.raises(OutputError):
            convert_file(str(src), str(mnt / "out.mig"), "stream")
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    with MigrationFile(src) as mf:
        assert mf.complete  # input untouched


def test_block_names_never_escape(tmp_path: Path) -> None:
    names = ["../../etc/passwd", "/abs/../../x", "..", ".", "a/b/../../../c", "\x01\x02",
             "x" * 250, "pc.ram"]
    for n in names:
        f = safe_block_filename(n)
        assert "/" not in f and not f.startswith(".") and f.endswith(".bin")
    src = tmp_path / "evil.mig"
    write_stream(src, [BlockSpec(n, PS) for n in names[:-1]] + [BlockSpec("pc.ram", 2 * PS)],
                 [[(0, 0, 3)]])
    out = tmp_path / "out"
    with MigrationFile(src) as mf:
        idx = extract_raw(mf, out)
    files = sorted(os.listdir(out))
    assert len(files) == len(names) + 1  # + index.json
    assert not (tmp_path / "etc").exists() and all((out / f).is_file() for f in files)
    assert {b["idstr"] for b in idx["blocks"]} == set(names)  # type: ignore[union-attr]


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mig"
    bad.write_bytes(b"QEVM\x00\x00\x00\x03\x07\xff\xff\xff\xff")
    for args in (["inspect", str(bad)], ["extract", str(bad), "-o", str(tmp_path / "o")],
                 ["verify", str(bad)], ["inspect", str(tmp_path / "missing")]):
        r = subprocess.run([sys.executable, "-m", "fixedram.cli.main", *args],
                           capture_output=True, text=True)
        assert r.returncode != 0
        assert len(r.stderr.strip().splitlines()) <= 1 and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "fixedram.cli.main", "inspect", str(bad)],
                       capture_output=True, text=True)
    assert "machine name length 4294967295 out of range (at byte offset 9)" in r.stderr


def test_colliding_block_names_get_distinct_files(tmp_path: Path) -> None:
    """Names that sanitise alike ("a/b", "a_b", and the suffixed form of one of them)
    each get their own file, and index.json maps each block to its own data."""
    names = ["a/b", "a_b", "a_b#1.1", "/a_b", "a\\b", "index.json"]
    src = tmp_path / "c.mig"
    write_stream(src, [BlockSpec(n, PS) for n in names],
                 [[(i, 0, i + 10) for i in range(len(names))]])
    out = tmp_path / "out"
    with MigrationFile(src) as mf:
        idx = extract_raw(mf, out)
    files = [b["file"] for b in idx["blocks"]]  # type: ignore[union-attr]
    assert len(set(files)) == len(names) and "index.json" not in files
    for i, f in enumerate(files):
        assert (out / f).read_bytes() == _page(i + 10), f


def test_raw_extract_is_atomic_as_a_set(tmp_path: Path) -> None:
    """Out of space midway: no directory under the final name, no hidden partial one;
    an existing set is replaced only with --force, and survives a failed replacement."""
    src = tmp_path / "s.mig"
    write_stream(src, [BlockSpec("pc.ram", 4 << 20), BlockSpec("pc.rom", 4 << 20)],
                 [[(b, i, i + 1) for b in (0, 1) for i in range(512)]])
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], check=True)
    try:
        r = subprocess.run([sys.executable, "-m", "fixedram.cli.main", "extract", str(src),
                            "-o", str(mnt / "out")], capture_output=True, text=True)
        assert r.returncode == 1 and "no space left" in r.stderr, r.stderr
        assert os.listdir(mnt) == []
        # a small complete set fits; a failed --force replacement keeps it whole
        small = tmp_path / "small.mig"
        write_stream(small, [BlockSpec("pc.ram", 16 * PS)], [[(0, 1, 5)]])
        with MigrationFile(small) as mf:
            extract_raw(mf, mnt / "out")
        before = sorted(os.listdir(mnt / "out"))
        with MigrationFile(src) as mf:
            with pytest.raises(OutputError, match="not empty"):
                extract_raw(mf, mnt / "out")
            with pytest.raises(OutputError, match="no space left"):
                extract_raw(mf, mnt / "out", force=True)
        assert sorted(os.listdir(mnt)) == ["out"]
        assert sorted(os.listdir(mnt / "out")) == before
        assert (mnt / "out" / "pc.ram.bin").read_bytes()[PS:2 * PS] == _page(5)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
