"""``fixedram map``: extents of data, zero and absent pages per RAMBlock, with file offsets."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fixedram.format.machine import MachineState
from fixedram.format.migfile import MigrationFile
from fixedram.format.writer import BlockSpec, MappedRamWriter, StreamWriter

PS = 4096


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fixedram", *args], capture_output=True,
                          text=True, timeout=300)


def _map_doc(path: Path | str, stdin: bytes | None = None) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-m", "fixedram", "map", str(path), "--json"],
                       input=stdin, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr
    doc: dict[str, Any] = json.loads(r.stdout)
    assert doc["schema_version"] == 1 and list(doc) == ["schema_version", "extents", "blocks"]
    return doc


def _map_json(path: Path) -> list[dict[str, Any]]:
    extents: list[dict[str, Any]] = _map_doc(path)["extents"]
    return extents


def _pages(extents: list[dict[str, Any]]) -> dict[str, list[tuple[str, int]]]:
    """Per block, (kind, copies) of every page, from the extents."""
    out: dict[str, list[tuple[str, int]]] = {}
    for e in extents:
        out.setdefault(e["block"], []).extend([(e["kind"], e["copies"])] * (e["length"] // PS))
    return out


def _check_against_file(path: Path, extents: list[dict[str, Any]]) -> None:
    """Extents tile each block exactly, agree with the index page by page, are coalesced,
    and their file offsets hold the page data."""
    data = path.read_bytes()
    with MigrationFile(path) as mf:
        assert [e["block"] for e in extents] == sorted(
            (e["block"] for e in extents), key=[b.idstr for b in mf.blocks].index)
        for b in mf.blocks:
            mine = [e for e in extents if e["block"] == b.idstr]
            stride = PS if mf.format == "mapped-ram" else PS + 8
            pos = 0
            kind = np.full(b.npages, "", dtype=object)
            copies = np.full(b.npages, -1)
            prev: dict[str, Any] | None = None
            for e in mine:
                assert e["start"] == pos and e["length"] > 0 and e["length"] % PS == 0
                first, n = e["start"] // PS, e["length"] // PS
                kind[first:first + n] = e["kind"]
                copies[first:first + n] = e["copies"]
                if e["kind"] == "data":
                    for k in range(n):  # every page's bytes are where the extent says
                        at = e["file_offset"] + k * stride
                        assert data[at:at + PS] == b.read((first + k) * PS, PS)
                else:
                    assert e["file_offset"] is None
                if prev is not None:  # coalesced: a neighbour differs in something
                    joinable = (prev["kind"] == e["kind"] and prev["copies"] == e["copies"]
                                and (e["kind"] != "data" or prev["file_offset"]
                                     + prev["length"] // PS * stride == e["file_offset"]))
                    assert not joinable, (prev, e)
                prev = e
                pos += e["length"]
            assert pos == b.used_length
            # A complete mapped-ram file's clear bit is a zero page on load.
            clear = "zero" if mf.format == "mapped-ram" and mf.complete else "absent"
            want = np.full(b.npages, clear, dtype=object)
            want[b.present_pages()] = "data"
            want[b.zeroed_pages()] = "zero"
            assert (kind == want).all()
            assert (copies == b.copies()).all()


def _hand_stream(path: Path) -> None:
    """pc.ram of 16 pages: pass 1 sends 0-5 as data, 6-7 as zero; pass 2 re-sends 2-3
    as data and 4 as zero. Pages 8-15 are never sent. A second block is data throughout."""
    with open(path, "wb") as f:
        w = StreamWriter(f.write, MachineState("pc-q35-10.0"),
                         [BlockSpec("pc.ram", 16 * PS), BlockSpec("pc.bios", 2 * PS)])
        w.begin()
        w.begin_part()
        w.pages(0, 0, bytes([1]) * 6 * PS)
        w.zeros(0, np.array([6, 7]))
        w.pages(1, 0, bytes([9]) * 2 * PS)
        w.end_part()
        w.begin_part(end=True)
        w.pages(0, 2, bytes([2]) * 2 * PS)
        w.zeros(0, np.array([4]))
        w.end_part()
        w.finish()


def test_hand_made_stream_exact(tmp_path: Path) -> None:
    src = tmp_path / "s.mig"
    _hand_stream(src)
    ext = _map_json(src)
    got = [(e["block"], e["start"] // PS, e["length"] // PS, e["kind"], e["copies"])
           for e in ext]
    assert got == [("pc.ram", 0, 2, "data", 1), ("pc.ram", 2, 2, "data", 2),
                   ("pc.ram", 4, 1, "zero", 2), ("pc.ram", 5, 1, "data", 1),
                   ("pc.ram", 6, 2, "zero", 1), ("pc.ram", 8, 8, "absent", 0),
                   ("pc.bios", 0, 2, "data", 1)]
    data = src.read_bytes()
    # Re-sent pages point at their last copy (seed 2), the others at pass 1's (seed 1).
    o = ext[1]["file_offset"]
    assert data[o:o + PS] == data[o + PS + 8:o + 2 * PS + 8] == bytes([2]) * PS
    assert data[ext[0]["file_offset"]:][:PS] == bytes([1]) * PS
    _check_against_file(src, ext)


def test_hand_made_mapped_ram(tmp_path: Path) -> None:
    src = tmp_path / "m.mig"
    fd = os.open(src, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        w = MappedRamWriter(fd, MachineState("pc-q35-10.0", ("mapped-ram",)),
                            [BlockSpec("pc.ram", 64 * PS)])
        w.write_pages(0, 3, bytes(range(1, 5)) * PS * 2)  # pages 3-10
        w.write_pages(0, 40, bytes([7]) * PS)
        w.finish()
    finally:
        os.close(fd)
    ext = _map_json(src)
    got = [(e["start"] // PS, e["length"] // PS, e["kind"], e["copies"]) for e in ext]
    # Complete: the clear bits are pages QEMU's loader leaves zero.
    assert got == [(0, 3, "zero", 0), (3, 8, "data", 1), (11, 29, "zero", 0),
                   (40, 1, "data", 1), (41, 23, "zero", 0)]
    _check_against_file(src, ext)
    # And drawn as zero (grey), not as absent (white), by --svg.
    from fixedram.cli.map import _ZERO_RGB, _cells
    from fixedram.memory.map import file_map

    with MigrationFile(src) as mf:
        img, per_cell = _cells(file_map(mf)[0])
    assert per_cell == 1 and img.shape[:2] == (1, 64)
    assert [tuple(img[0, p, :3]) for p in (0, 11, 63)] == [_ZERO_RGB] * 3
    # Cut before its end: a clear bit may be a page not written yet, so absent.
    with MigrationFile(src) as mf:
        eof = mf.summary.eof_offset
    assert eof is not None
    cut = tmp_path / "cut.mig"
    cut.write_bytes(src.read_bytes()[:eof])
    r = _cli("map", str(cut), "--json")
    assert r.returncode == 0 and "incomplete" in r.stderr
    got = [(e["start"] // PS, e["length"] // PS, e["kind"], e["copies"])
           for e in json.loads(r.stdout)["extents"]]
    assert got == [(0, 3, "absent", 0), (3, 8, "data", 1), (11, 29, "absent", 0),
                   (40, 1, "data", 1), (41, 23, "absent", 0)]


def test_cli_errors_and_table(tmp_path: Path) -> None:
    src = tmp_path / "s.mig"
    _hand_stream(src)
    r = _cli("map", str(src))
    assert r.returncode == 0 and "absent" in r.stdout and "pc.bios" in r.stdout
    bad = tmp_path / "bad.mig"
    bad.write_bytes(b"not a migration file" * 10)
    r = _cli("map", str(bad), "--json")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    # A compressed save is mapped in one pass; its header says it has no file offsets.
    gz = tmp_path / "s.mig.gz"
    gz.write_bytes(gzip.compress(src.read_bytes()))
    r = _cli("map", str(gz))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.splitlines()[0].endswith("has no file offsets, so none are shown")
    # Incomplete: cut in the second pass; the map shows what the file holds and warns.
    cut = tmp_path / "cut.mig"
    cut.write_bytes(src.read_bytes()[:-2 * PS])
    r = _cli("map", str(cut), "--json")
    assert r.returncode == 0 and "incomplete" in r.stderr
    assert json.loads(r.stdout)["extents"]


def test_one_pass_map(tmp_path: Path) -> None:
    """A pipe and a compressed file are mapped in one pass: the file's kinds and copies page
    for page, coalesced the same way but for file offsets, which are all null."""
    src = tmp_path / "s.mig"
    _hand_stream(src)
    want = _map_doc(src)
    gz = tmp_path / "s.mig.gz"
    gz.write_bytes(gzip.compress(src.read_bytes()))
    for doc in (_map_doc("-", stdin=src.read_bytes()), _map_doc(gz)):
        assert _pages(doc["extents"]) == _pages(want["extents"])
        assert {e["file_offset"] for e in doc["extents"]} == {None}
        for a, b in zip(doc["extents"], doc["extents"][1:], strict=False):
            assert a["block"] != b["block"] or (a["kind"], a["copies"]) != (b["kind"], b["copies"])
        assert doc["blocks"] == want["blocks"]
    # Each page's copies: pages 2-4 of pc.ram were sent twice.
    assert [c for _, c in _pages(want["extents"])["pc.ram"][:8]] == [1, 1, 2, 2, 2, 1, 1, 1]


def test_guest_physical(tmp_path: Path) -> None:
    """map and inspect say where each block sits in guest-physical memory: q35's main RAM
    below 2 GiB and the rest above 4 GiB, the BIOS ending at 4 GiB, pc.rom nowhere; and
    why nothing is placed for a machine type whose layout is not known."""
    GiB = 1 << 30
    src = tmp_path / "q35.mig"
    with open(src, "wb") as f:
        w = StreamWriter(f.write, MachineState("pc-q35-10.0"),
                         [BlockSpec("pc.ram", 3 * GiB), BlockSpec("pc.bios", 64 * PS),
                          BlockSpec("pc.rom", 32 * PS)])
        w.begin()
        w.begin_part(end=True)
        w.pages(0, 0, bytes([1]) * PS)
        w.end_part()
        w.finish()
    want = [{"idstr": "pc.ram", "used_length": 3 * GiB, "guest_physical": [
                {"gpa": 0, "block_offset": 0, "length": 2 * GiB},
                {"gpa": 4 * GiB, "block_offset": 2 * GiB, "length": GiB}]},
            {"idstr": "pc.bios", "used_length": 64 * PS, "guest_physical": [
                {"gpa": 4 * GiB - 64 * PS, "block_offset": 0, "length": 64 * PS}]},
            {"idstr": "pc.rom", "used_length": 32 * PS, "guest_physical": []}]
    assert _map_doc(src)["blocks"] == want
    r = _cli("inspect", "--json", str(src))
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert [{k: b[k] for k in ("idstr", "used_length", "guest_physical")}
            for b in got["blocks"]] == want and "guest_physical_error" not in got
    text = _cli("map", str(src)).stdout
    assert "0x0-0x7fffffff, 0x100000000-0x13fffffff (+0x80000000)" in text
    assert "0xfffc0000-0xffffffff" in text and "- (not mapped)" in text
    r = subprocess.run([sys.executable, "-m", "fixedram", "inspect", str(src)],
                       capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert "0x100000000-0x13fffffff (+0x80000000)" in r.stdout
    # An arm virt machine: no layout known, said once, and every list empty.
    arm = tmp_path / "virt.mig"
    with open(arm, "wb") as f:
        w = StreamWriter(f.write, MachineState("virt-10.0"), [BlockSpec("mach-virt.ram", 16 * PS)])
        w.begin()
        w.begin_part(end=True)
        w.pages(0, 0, bytes([1]) * PS)
        w.end_part()
        w.finish()
    r = subprocess.run([sys.executable, "-m", "fixedram", "map", str(arm), "--json"],
                       capture_output=True, text=True)
    doc = json.loads(r.stdout)
    assert [b["guest_physical"] for b in doc["blocks"]] == [[]]
    assert "'virt-10.0' is not known" in doc["guest_physical_error"]
    assert "guest-physical placement not known: " in _cli("map", str(arm)).stdout
    got = json.loads(_cli("inspect", "--json", str(arm)).stdout)
    assert got["blocks"][0]["guest_physical"] == [] and "virt-10.0" in got["guest_physical_error"]


def test_svg(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the [plot] extra")
    src = tmp_path / "s.mig"
    _hand_stream(src)
    out = tmp_path / "map.svg"
    r = _cli("map", str(src), "--svg", str(out))
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text and "pc.bios" in text
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary left
    r = _cli("map", str(src), "--svg", str(out))  # exists: refused without --force
    assert r.returncode == 1 and "already exists" in r.stderr


def test_svg_without_matplotlib(tmp_path: Path) -> None:
    src = tmp_path / "s.mig"
    _hand_stream(src)
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from fixedram.cli.main import main\n"
            f"sys.exit(main(['map', {str(src)!r}, '--svg', {str(tmp_path / 'x.svg')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr == "fixedram: error: --svg needs matplotlib: pip install 'fixedram[plot]'\n"
    assert not (tmp_path / "x.svg").exists()


@pytest.mark.qemu
@pytest.mark.parametrize("mode,live", [("stream", True), ("mapped-ram", False),
                                       ("mapped-ram-multifd", True)])
def test_real_qemu_saves(saved_file: Callable[..., Any], mode: str, live: bool) -> None:
    sf = saved_file(machine="q35", mode=mode, live=live, ram_mb=32, mem_end=8 << 20,
                    fill_words=2, bandwidth=None)
    ext = _map_json(sf.path)
    _check_against_file(sf.path, ext)
    kinds = {e["kind"] for e in ext}
    assert "data" in kinds
    if mode == "stream":
        assert "zero" in kinds and max(e["copies"] for e in ext) >= 2
    else:
        # Complete mapped-ram: a clear bit is a zero page, none is absent.
        assert "zero" in kinds and "absent" not in kinds
        assert {e["copies"] for e in ext} == {0, 1}
