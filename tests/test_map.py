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


def _map_json(path: Path) -> list[dict[str, Any]]:
    r = _cli("map", str(path), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["schema_version"] == 1 and set(doc) == {"schema_version", "extents"}
    extents: list[dict[str, Any]] = doc["extents"]
    return extents


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
            want = np.full(b.npages, "absent", dtype=object)
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
    assert got == [(0, 3, "absent", 0), (3, 8, "data", 1), (11, 29, "absent", 0),
                   (40, 1, "data", 1), (41, 23, "absent", 0)]
    _check_against_file(src, ext)


def test_cli_errors_and_table(tmp_path: Path) -> None:
    src = tmp_path / "s.mig"
    _hand_stream(src)
    r = _cli("map", str(src))
    assert r.returncode == 0 and "absent" in r.stdout and "pc.bios" in r.stdout
    bad = tmp_path / "bad.mig"
    bad.write_bytes(b"not a migration file" * 10)
    r = _cli("map", str(bad), "--json")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    # A compressed save has no file offsets to show: refused in one line.
    gz = tmp_path / "s.mig.gz"
    gz.write_bytes(gzip.compress(src.read_bytes()))
    r = _cli("map", str(gz))
    assert r.returncode == 1 and r.stdout == "" and r.stderr.count("\n") == 1
    assert "compressed" in r.stderr
    # Incomplete: cut in the second pass; the map shows what the file holds and warns.
    cut = tmp_path / "cut.mig"
    cut.write_bytes(src.read_bytes()[:-2 * PS])
    r = _cli("map", str(cut), "--json")
    assert r.returncode == 0 and "incomplete" in r.stderr
    assert json.loads(r.stdout)["extents"]


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
        assert "absent" in kinds and {e["copies"] for e in ext} == {0, 1}
