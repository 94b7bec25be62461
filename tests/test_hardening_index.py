"""Forged and cut streams: memory follows what the file holds, cut copies never win.

Issue classes: a stream cut inside the RAMBlock list; a live stream cut inside a page's
last copy; a RAMBlock length that claims far more RAM than the file can describe.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fixedram.errors import CorruptFile, TruncatedFile
from fixedram.format.constants import RAM_FLAG_EOS, RAM_FLAG_MEM_SIZE
from fixedram.format.machine import MachineState
from fixedram.format.migfile import MigrationFile
from fixedram.format.primitives import BE64
from fixedram.format.ram import encode_block_record
from fixedram.format.writer import BlockSpec, StreamWriter
from fixedram.tools.convert import convert_file

PS = 4096
TiB = 1 << 40


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fixedram.cli.main", *args],
                          capture_output=True, text=True, timeout=120)


def _two_pass_stream(path: Path, npages: int = 10) -> tuple[list[int], list[int]]:
    """Pass 1 sends pages with seed 1, pass 2 re-sends them with seed 2.
    Returns the file offsets of each page's data in pass 1 and pass 2."""
    offs: tuple[list[int], list[int]] = ([], [])
    with open(path, "wb") as f:
        w = StreamWriter(f.write, MachineState("pc-q35-10.0"), [BlockSpec("pc.ram", 64 * PS)])
        w.begin()
        for k, seed in enumerate((1, 2)):
            w.begin_part(end=k == 1)
            for pg in range(npages):
                w.pages(0, pg, bytes([seed]) * PS)
                offs[k].append(w.bytes_written - PS)
            w.end_part()
        w.finish()
    return offs


def test_cut_inside_block_list(tmp_path: Path) -> None:
    """Every cut inside the RAMBlock list: no block is reported, nothing crashes."""
    src = tmp_path / "s.mig"
    _two_pass_stream(src)
    data = src.read_bytes()
    with MigrationFile(src) as mf:
        first = mf.blocks[0].record.record_offset
        after = first + len(encode_block_record("pc.ram", 64 * PS)) + 8  # + EOS
    for cut in range(first - 8, after):
        p = tmp_path / "cut.mig"
        p.write_bytes(data[:cut])
        with pytest.raises(TruncatedFile):
            MigrationFile(p)
        with MigrationFile(p, strict=False) as mf:
            assert not mf.complete and mf.error is not None
            assert mf.passes == 0
    r = _cli("inspect", str(p))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "complete: NO" in r.stdout
    r = _cli("extract", "--allow-incomplete", str(p), "-o", str(tmp_path / "out"))
    assert "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("into", [0, 1, 100, PS - 1])
def test_cut_live_stream_keeps_last_complete_copy(tmp_path: Path, into: int) -> None:
    """A cut inside pass 2's copy of page 5: pages 0-4 read pass 2, page 5 and later
    read pass 1 (their last complete copies), and the error names where it stopped."""
    src = tmp_path / "s.mig"
    _, second = _two_pass_stream(src)
    cut = second[5] + into
    p = tmp_path / "cut.mig"
    p.write_bytes(src.read_bytes()[:cut])
    with MigrationFile(p, strict=False) as mf:
        assert not mf.complete and mf.error is not None
        assert mf.error.offset is not None and mf.error.offset <= cut
        ram = mf.blocks[0]
        got = [ram.read(pg * PS, PS) for pg in range(10)]
    assert got == [bytes([2]) * PS] * 5 + [bytes([1]) * PS] * 5
    r = _cli("extract", "--allow-incomplete", str(p), "-o", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    raw = (tmp_path / "out" / "pc.ram.bin").read_bytes()
    assert raw[5 * PS:6 * PS] == bytes([1]) * PS and raw[4 * PS:5 * PS] == bytes([2]) * PS


def _forged(path: Path, used: int, touch: bool) -> None:
    """A 4 KB-ish stream whose one RAMBlock claims ``used`` bytes."""
    out = bytearray(MachineState("pc-q35-10.0").header())
    out += b"\x01" + (2).to_bytes(4, "big") + b"\x03ram" + (0).to_bytes(4, "big")
    out += (4).to_bytes(4, "big")
    out += BE64.pack(used | RAM_FLAG_MEM_SIZE) + encode_block_record("pc.ram", used)
    out += BE64.pack(RAM_FLAG_EOS) + b"\x7e" + (2).to_bytes(4, "big")
    out += b"\x03" + (2).to_bytes(4, "big")
    if touch:  # one page record deep inside the block
        out += BE64.pack((used - PS) | 0x08) + b"\x06pc.ram" + bytes([7]) * PS
    out += BE64.pack(RAM_FLAG_EOS) + b"\x7e" + (2).to_bytes(4, "big") + b"\x00"
    path.write_bytes(bytes(out))


def test_forged_length_touched_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "f.mig"
    _forged(p, TiB, touch=True)
    with pytest.raises(CorruptFile, match="more than a file of this size"):
        MigrationFile(p)
    r = _cli("inspect", str(p))
    assert r.returncode == 2 and "Traceback" not in r.stderr  # a malformed save
    assert len(r.stderr.strip().splitlines()) == 1


# VmHWM is this process's own peak (ru_maxrss would carry pytest's over the exec).
_PEAK = """
import sys
from fixedram.tools.convert import convert_file
convert_file(sys.argv[1], sys.argv[2], sys.argv[3])
print([ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")][0].split()[1])
"""


@pytest.mark.parametrize("to", ["mapped-ram", "stream"])
def test_forged_length_untouched_costs_nothing(tmp_path: Path, to: str) -> None:
    """A declared 1 TiB block with no page records converts in bounded memory to a
    sparse (mapped-ram) or small (stream) output: the length never sizes the work.
    (A stream output can even take 16 TiB, more than most file systems let a
    mapped-ram file span.)"""
    p = tmp_path / "f.mig"
    size = TiB if to == "mapped-ram" else 16 * TiB
    _forged(p, size, touch=False)
    out = tmp_path / "out.mig"
    r = subprocess.run([sys.executable, "-c", _PEAK, str(p), str(out), to],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    peak_kib = int(r.stdout.split()[-1])
    assert peak_kib < 200 * 1024, peak_kib
    assert os.stat(out).st_blocks * 512 < 1 << 20
    with MigrationFile(out) as mf:
        assert mf.blocks[0].used_length == size and mf.blocks[0].pages_present == 0


def test_index_budget_follows_file_size(tmp_path: Path) -> None:
    """A real-shaped stream (every page sent once) is indexed whatever its RAM size."""
    p = tmp_path / "z.mig"
    with open(p, "wb") as f:
        w = StreamWriter(f.write, MachineState("pc-q35-10.0"), [BlockSpec("pc.ram", 1 << 30)])
        w.begin()
        w.begin_part(end=True)
        w.pages(0, 0, bytes([9]) * PS)
        w.zeros(0, np.arange(1, (1 << 30) // PS))
        w.end_part()
        w.finish()
    with MigrationFile(p) as mf:
        assert mf.blocks[0].pages_present == 1 and mf.blocks[0].zero_pages == (1 << 18) - 1
    convert_file(str(p), str(tmp_path / "m.mig"), "mapped-ram")


def _ignore_shared(path: Path, blocks: list[tuple[str, int, int]]) -> None:
    """A stream with x-ignore-shared: each block record carries its guest address."""
    out = bytearray(MachineState("pc-q35-10.0", ("x-ignore-shared",)).header())
    out += b"\x01" + (2).to_bytes(4, "big") + b"\x03ram" + (0).to_bytes(4, "big")
    out += (4).to_bytes(4, "big")
    out += BE64.pack(sum(n for _, n, _ in blocks) | RAM_FLAG_MEM_SIZE)
    for name, n, gpa in blocks:
        out += encode_block_record(name, n, gpa=gpa)
    out += BE64.pack(RAM_FLAG_EOS) + b"\x7e" + (2).to_bytes(4, "big")
    out += b"\x03" + (2).to_bytes(4, "big")
    out += BE64.pack(0 | 0x08) + b"\x06pc.ram" + bytes([5]) * PS
    out += BE64.pack(RAM_FLAG_EOS) + b"\x7e" + (2).to_bytes(4, "big") + b"\x00"
    path.write_bytes(bytes(out))


@pytest.mark.parametrize("addrs", [((1 << 64) - PS, 0x123), (0x1000, 0x1000), (0, 0)])
def test_ignore_shared_addresses_never_place_ram(tmp_path: Path, addrs: tuple[int, int]) -> None:
    """The address an x-ignore-shared record carries is the region's offset in its parent
    (real q35 saves say 0 for pc.ram and the ACPI blocks alike): any value, even one near
    2^64, leaves the physical image laid out by the machine type."""
    p = tmp_path / "s.mig"
    _ignore_shared(p, [("pc.ram", 64 * PS, addrs[0]), ("a", 16 * PS, addrs[1])])
    for fmt in ("physical", "elf"):
        r = _cli("extract", str(p), "-o", str(tmp_path / f"out.{fmt}"), "--format", fmt)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    img = (tmp_path / "out.physical").read_bytes()
    assert len(img) == 64 * PS and img[:PS] == bytes([5]) * PS
    r = _cli("inspect", "--json", str(p))
    assert r.returncode == 0 and "Traceback" not in r.stderr
