"""Forged inputs for the tools: convert of x-ignore-shared streams, the price of
re-sent records in inspect, and the memory of ``map --json``.

Each test forges the input the defect needs with the project's own encoders
and checks the behaviour on the real command line where the defect showed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fixedram.cli.render import human_bytes
from fixedram.describe import SCHEMA_VERSION
from fixedram.errors import UnsupportedFeature
from fixedram.format.constants import (
    RAM_FLAG_MEM_SIZE,
    RAM_SECTION_NAME,
    RAM_SECTION_VERSION,
    SectionType,
)
from fixedram.format.libvirt import LibvirtHeader
from fixedram.format.machine import DeviceRecord, MachineState
from fixedram.format.migfile import MigrationFile
from fixedram.format.primitives import BE64
from fixedram.format.ram import encode_block_record
from fixedram.format.stream import encode_footer, encode_section_full
from fixedram.format.writer import EOS, BlockSpec, MappedRamWriter, StreamWriter
from fixedram.memory import map as memory_map
from fixedram.memory.layout import physical_ranges, x86_firmware_ranges
from fixedram.memory.map import DATA, KINDS, BlockMap, Extent, file_map, json_text
from fixedram.tools.convert import convert_file
from util import assert_truthful_vmdesc

FIXEDRAM = [sys.executable, "-m", "fixedram.cli.main"]
PS = 4096


def run(*args: str, stdin: Path | None = None, pipe: bool = False
        ) -> subprocess.CompletedProcess[str]:
    """The command line; ``pipe`` feeds ``stdin`` through a pipe, not as a file."""
    if pipe:
        assert stdin is not None
        r = subprocess.run([*FIXEDRAM, *args], input=stdin.read_bytes(), capture_output=True,
                           timeout=120)
        return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(errors="replace"),
                                           r.stderr.decode(errors="replace"))
    with open(stdin, "rb") if stdin else open(os.devnull, "rb") as f:
        return subprocess.run([*FIXEDRAM, *args], stdin=f, capture_output=True, text=True,
                              timeout=120)


def one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert r.returncode != 0, r.stdout
    err = r.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


# -- 1. convert --to mapped-ram of an x-ignore-shared stream -----------------------


# QEMU's mr->addr of each block: made distinct so a lost or shuffled one shows.
IGNORE_SHARED_BLOCKS = (("pc.ram", 64, 0), ("pc.bios", 16, 0xfffc0000),
                        ("/rom@etc/acpi/rsdp", 1, 0x7000))


def ignore_shared_stream(npages: int = 64, data_pages: int = 8,
                         blocks: tuple[tuple[str, int, int], ...] | None = None,
                         devices: tuple[DeviceRecord, ...] = ()) -> bytes:
    """A complete stream whose configuration declares x-ignore-shared, so each
    RAMBlock record carries the region's address after its length.

    ``blocks``: (name, pages, address) each; by default one ``pc.ram`` of
    ``npages`` at address 0. Each block gets ``data_pages`` (at most its
    size) data pages and one ZERO record after them when there is room.
    """
    blocks = blocks or (("pc.ram", npages, 0),)
    state = MachineState("pc-q35-10.0", ("x-ignore-shared",), devices=list(devices))
    out = bytearray(state.header())
    out += encode_section_full(SectionType.START, state.ram_section_id, RAM_SECTION_NAME, 0,
                               RAM_SECTION_VERSION)
    out += BE64.pack(sum(n for _, n, _ in blocks) * PS | RAM_FLAG_MEM_SIZE)
    for name, n, gpa in blocks:
        out += encode_block_record(name, n * PS, gpa=gpa)
    out += EOS + encode_footer(state.ram_section_id)
    # The START section above is ours (encode_block_record), so the input does not
    # depend on the writer's begin(); the page sections and the tail are the writer's.
    w = StreamWriter(out.extend, state, [BlockSpec(name, n * PS, gpa=gpa)
                                         for name, n, gpa in blocks])
    w.begin_part(end=True)
    for bi, (_, n, _) in enumerate(blocks):
        d = min(data_pages, n)
        w.pages(bi, 0, bytes([0x5a + bi]) * (d * PS))
        if d < n:
            w.zero(bi, d)
    w.end_part()
    w.finish()
    return bytes(out)


IGNORE_SHARED_INPUTS = ["file", "libvirt-raw", "libvirt-raw-bare", "input-offset",
                        "output-offset", "pipe", "force-over-existing"]


@pytest.mark.parametrize("kind", IGNORE_SHARED_INPUTS)
def test_convert_ignore_shared_refused(tmp_path: Path, kind: str) -> None:
    """Every input path refuses with the same typed error, one line, nothing written."""
    body = ignore_shared_stream()
    src = tmp_path / "in.mig"
    args: list[str] = []
    prefix = b""
    if kind.startswith("libvirt-raw"):
        prefix = LibvirtHeader.new(b"<domain type='kvm'><name>x</name></domain>",
                                   format="raw").encode()
        args += ["--bare"] if kind.endswith("bare") else []
    elif kind == "input-offset":
        prefix = bytes(3 * PS)
        args += ["--input-offset", str(3 * PS)]
    elif kind == "output-offset":
        args += ["--offset", str(1 << 20)]
    src.write_bytes(prefix + body)
    out = tmp_path / "out.mig"
    if kind == "force-over-existing":
        out.write_bytes(b"keep me")
        args += ["--force"]
    before = sorted(os.listdir(tmp_path))
    if kind == "pipe":
        r = run("convert", "--to", "mapped-ram", *args, "-", str(out), stdin=src, pipe=True)
        name = "stdin"
    else:
        r = run("convert", "--to", "mapped-ram", *args, str(src), str(out))
        name = str(src)
    err = one_line_error(r, name, "x-ignore-shared", "mapped-ram", "byte offset")
    # The byte offset is the configuration section's, where the capability is declared.
    assert f"byte offset {len(prefix) + 8})" in err, err
    assert sorted(os.listdir(tmp_path)) == before
    if kind == "force-over-existing":
        assert out.read_bytes() == b"keep me"


def test_convert_ignore_shared_refused_api(tmp_path: Path) -> None:
    """The library raises the typed error (not a ValueError) naming file and offset."""
    src = tmp_path / "in.mig"
    src.write_bytes(ignore_shared_stream())
    with pytest.raises(UnsupportedFeature, match="x-ignore-shared") as ei:
        convert_file(str(src), str(tmp_path / "out.mig"), "mapped-ram")
    assert ei.value.path == str(src) and ei.value.offset == 8
    assert os.listdir(tmp_path) == ["in.mig"]


TIMER = DeviceRecord("timer", 0, 2, 3, b"\x11" * 24,
                     {"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2,
                      "fields": [{"name": "t", "array_len": 3, "type": "int64", "size": 8}]})


@pytest.mark.parametrize("kind", ["file", "stdin-file", "pipe", "libvirt-raw"])
def test_convert_ignore_shared_to_stream(tmp_path: Path, kind: str) -> None:
    """convert --to stream keeps x-ignore-shared whole: every block record of the
    output carries the source's address (QEMU's loader reads one after each
    length), so the output parses, its RAM is the input's page by page and its
    vmdesc describes it."""
    body = ignore_shared_stream(data_pages=3, blocks=IGNORE_SHARED_BLOCKS, devices=(TIMER,))
    src = tmp_path / "in.mig"
    prefix = b""
    if kind == "libvirt-raw":
        prefix = LibvirtHeader.new(b"<domain type='kvm'><name>x</name></domain>",
                                   format="raw").encode()
    src.write_bytes(prefix + body)
    out = tmp_path / "out.mig"
    if kind == "file":
        r = run("convert", "--to", "stream", str(src), str(out))
    else:
        r = run("convert", "--to", "stream", "-", str(out), stdin=src, pipe=kind == "pipe")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    want = [(name, n * PS, gpa) for name, n, gpa in IGNORE_SHARED_BLOCKS]
    with MigrationFile(str(out)) as mf:
        assert mf.capabilities == ["x-ignore-shared"]
        assert [(b.idstr, b.used_length, b.record.gpa) for b in mf.blocks] == want
        assert [b.pages_present for b in mf.blocks] == [3, 3, 1]
    r = run("verify", str(out), "--against", str(src))
    assert r.returncode == 0, r.stdout + r.stderr
    assert_truthful_vmdesc(out)


def test_stream_writer_ignore_shared_needs_addresses() -> None:
    """A block without an address cannot be written under x-ignore-shared: its
    record would be 8 bytes short and misalign the loader."""
    state = MachineState("pc-q35-10.0", ("x-ignore-shared",))
    with pytest.raises(ValueError, match="address"):
        StreamWriter(bytearray().extend, state, [BlockSpec("pc.ram", 16 * PS)])
    # Without the capability an address is not written at all.
    plain, shared = bytearray(), bytearray()
    StreamWriter(plain.extend, MachineState("pc-q35-10.0"),
                 [BlockSpec("pc.ram", 16 * PS, gpa=0x1000)]).begin()
    StreamWriter(shared.extend, state, [BlockSpec("pc.ram", 16 * PS, gpa=0x1000)]).begin()
    rec = encode_block_record("pc.ram", 16 * PS)
    assert rec in plain and rec + BE64.pack(0x1000) + EOS in shared


# -- 2. inspect prices re-sent records at their size in the file ------------------

# The framing of each PART/END ram section: type byte + section id, EOS, footer.
PART_FRAMING = 5 + 8 + 5


def resend_stream(path: Path, npages: int, passes: int, *, last_only: bool = False) -> None:
    """Pass 1 sends ``npages`` data pages of pc.ram, passes 2.. the same pages as ZERO
    records; every pass starts with page 0 of block "a", so each pass names pc.ram
    again in its first record. ``last_only``: just the last pass (what is left of
    the stream once every superseded copy is gone)."""
    blocks = [BlockSpec("pc.ram", npages * PS), BlockSpec("a", 4 * PS)]
    with open(path, "wb") as f:
        w = StreamWriter(f.write, MachineState("pc-q35-10.0"), blocks)
        w.begin()
        for k in range(passes - 1 if last_only else 0, passes):
            w.begin_part(end=k == passes - 1)
            w.pages(1, 0, bytes([k + 1]) * PS)
            if k == 0:
                w.pages(0, 0, b"\x42" * (npages * PS))
            else:
                w.zeros(0, np.arange(npages))
            w.end_part()
        w.finish()


@pytest.mark.parametrize("pipe", [False, True], ids=["file", "pipe"])
def test_inspect_resent_bytes_are_record_bytes(tmp_path: Path, pipe: bool) -> None:
    """Superseded copies cost what their records take in the file: a PAGE record
    8 + 4096 bytes, a ZERO record 8 + 1, plus 1 + len(idstr) when it names its block
    (QEMU's save_page_header, save_normal_page, save_zero_page)."""
    n, passes = 8192, 6
    src, single = tmp_path / "live.mig", tmp_path / "last.mig"
    resend_stream(src, n, passes)
    resend_stream(single, n, passes, last_only=True)
    name_pc, name_a = 1 + len("pc.ram"), 1 + len("a")
    expected = (n * (8 + PS) + name_pc                 # pass 1's data pages
                + (passes - 2) * (n * (8 + 1) + name_pc)  # zero passes but the last
                + (passes - 1) * (8 + PS + name_a))    # page 0 of "a", named each pass
    # The same figure from the files: what the last pass alone does not need.
    assert expected == (src.stat().st_size - single.stat().st_size
                        - (passes - 1) * PART_FRAMING)
    arg = "-" if pipe else str(src)
    r = run("inspect", "--json", arg, stdin=src, pipe=pipe)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["one_pass"] is pipe and d["passes"] == passes
    assert d["resent_bytes"] == expected
    r = run("inspect", arg, stdin=src, pipe=pipe)
    assert r.returncode == 0, r.stderr
    assert f"bytes spent on re-sent pages: {human_bytes(expected)}" in " ".join(r.stdout.split())
    # A single pass supersedes nothing.
    r = run("inspect", "--json", str(single))
    assert json.loads(r.stdout)["resent_bytes"] == 0


# -- 3. map --json streams its extents --------------------------------------------


def alternating_mapped_ram(path: Path, npages: int) -> None:
    """A sparse mapped-ram file whose bitmap alternates set/clear: ``npages`` extents
    (data, zero, data...) for a few KiB of allocated blocks."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        w = MappedRamWriter(fd, MachineState("pc-q35-10.0", ("mapped-ram",)),
                            [BlockSpec("pc.ram", npages * PS)], fresh=True)
        w.set_present(0, np.arange(0, npages, 2))
        w.finish()
    finally:
        os.close(fd)


# A fresh interpreter runs the command, so the peak is the command's, not pytest's
# (a child's ru_maxrss carries its parent's resident set over the exec).
_PEAK = """
import resource, subprocess, sys
with open(sys.argv[1], "wb") as out:
    r = subprocess.run(sys.argv[2:], stdout=out)
print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def test_map_json_memory_is_bounded(tmp_path: Path) -> None:
    """2M extents: the JSON is written extent by extent (was every extent's text and
    five lists of Python ints at once, 1.07 GB); it stays one valid document."""
    n = 1 << 21
    src, out = tmp_path / "alt.mig", tmp_path / "map.json"
    alternating_mapped_ram(src, n)
    r = subprocess.run([sys.executable, "-c", _PEAK, str(out), *FIXEDRAM, "map", "--json",
                        str(src)], capture_output=True, text=True, timeout=300)
    rc, peak_kib = map(int, r.stdout.split())
    assert rc == 0, r.stderr
    assert peak_kib < 200 * 1024, f"map --json peaked at {peak_kib} KiB"
    # Parsed line by line (the whole document as Python objects would take a GiB here):
    # the framing, then one JSON object per extent, in block order.
    with open(out) as f:
        assert f.readline() == '{"schema_version": 1, "extents": [\n'
        count = 0
        for line in f:
            if line == "],\n":
                break
            e = json.loads(line.rstrip("\n").removesuffix(","))
            assert e["start"] == count * PS and e["length"] == PS
            # Complete mapped-ram: a clear bit is a zero page on load.
            assert e["kind"] == ("data", "zero")[count % 2]
            assert e["copies"] == 1 - count % 2
            assert (e["file_offset"] is None) == bool(count % 2)
            count += 1
        assert json.loads('{' + f.read())["blocks"][0]["idstr"] == "pc.ram"
    assert count == n


def _json_text_before(maps: list[BlockMap]) -> str:
    """``map --json`` as it was written before it was streamed (the reference)."""
    out = [f'{{"schema_version": {SCHEMA_VERSION}, "extents": [']
    sep = "\n"
    for m in maps:
        if not len(m):
            continue
        b = m.block
        ps = b.page_size
        name = json.dumps(b.idstr)
        start = m.first * ps
        length = np.minimum(m.count * ps, b.used_length - start)
        offs = np.where(m.kind == DATA, m.file_offset, -1)
        kinds = ('"data"', '"zero"', '"absent"')
        lines = []
        for s, ln, k, o, c in zip(start.tolist(), length.tolist(), m.kind.tolist(),
                                  offs.tolist(), m.copies.tolist(), strict=True):
            lines.append(f'{sep}{{"block": {name}, "start": {s}, "length": {ln}, '
                         f'"kind": {kinds[k]}, "file_offset": {o if o >= 0 else "null"}, '
                         f'"copies": {c}}}')
            sep = ",\n"
        out.append("".join(lines))
    out.append("\n]}\n")
    return "".join(out)


def _extents_before(m: BlockMap) -> list[Extent]:
    ps, used, name = m.block.page_size, m.block.used_length, m.block.idstr
    out = []
    for f, n, k, o, c in zip(m.first.tolist(), m.count.tolist(), m.kind.tolist(),
                             m.file_offset.tolist(), m.copies.tolist(), strict=True):
        start = f * ps
        out.append(Extent(name, start, min(n * ps, used - start), KINDS[k],
                          o if k == DATA else None, c))
    return out


@pytest.fixture(scope="module")
def map_inputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Saves of the built-in guest (stream, mapped-ram), a re-sent stream with zero
    pages and two blocks, names JSON must escape, and more extents than one chunk."""
    d = tmp_path_factory.mktemp("maps")
    subprocess.run([*FIXEDRAM, "save", str(d / "guest.mig"), "--ram", "16M"], check=True,
                   capture_output=True)
    subprocess.run([*FIXEDRAM, "save", f"file:{d / 'guest-mr.mig'}", "--ram", "16M",
                    "--mapped-ram"], check=True, capture_output=True)
    resend_stream(d / "resend.mig", 300, 3)
    with open(d / "names.mig", "wb") as f:
        w = StreamWriter(f.write, MachineState("pc-q35-10.0"),
                         [BlockSpec('ram "0"\\é', 16 * PS), BlockSpec("b", 8 * PS)])
        w.begin()
        w.begin_part(end=True)
        w.pages(0, 2, b"\x01" * (3 * PS))
        w.zeros(1, np.arange(1, 8, 2))
        w.pages(0, 9, b"\x02" * PS)
        w.end_part()
        w.finish()
    alternating_mapped_ram(d / "chunks.mig", 3 * memory_map.CHUNK_EXTENTS + 7)
    return [d / n for n in ("guest.mig", "guest-mr.mig", "resend.mig", "names.mig",
                            "chunks.mig")]


def test_map_output_unchanged(map_inputs: list[Path]) -> None:
    """The streamed JSON's extents are byte for byte what the whole-list code wrote; the
    blocks' guest-physical placement follows them, as the layout gives it."""
    for p in map_inputs:
        with MigrationFile(p) as mf:
            maps = file_map(mf)
            old = _json_text_before(maps)
            assert old.endswith("\n]}\n")
            extents = old[:-len("}\n")] + ",\n"  # the same text up to the end of its list
            text = "".join(json_text(maps))
            assert text.startswith(extents) and text[len(extents):].startswith('"blocks": ['), p
            for m in maps:
                assert list(m.extents()) == _extents_before(m), p
            placed: dict[str, list[dict[str, int]]] = {}
            for r in sorted(physical_ranges(mf) + x86_firmware_ranges(mf), key=lambda r: r.gpa):
                placed.setdefault(r.block.idstr, []).append(
                    {"gpa": r.gpa, "block_offset": r.block_offset, "length": r.length})
            blocks = [{"idstr": b.idstr, "used_length": b.used_length,
                       "guest_physical": placed.get(b.idstr, [])} for b in mf.blocks]
        r = run("map", "--json", str(p))
        assert r.returncode == 0 and r.stdout == text, (p, r.stderr)
        doc = json.loads(r.stdout)
        assert list(doc) == ["schema_version", "extents", "blocks"]
        assert len(doc["extents"]) == sum(len(m) for m in maps)
        assert doc["blocks"] == blocks
        assert any(b["guest_physical"] for b in blocks)  # pc.ram at least


def test_raw_index_chain_of_custody(tmp_path: Path) -> None:
    """index.json names its schema, the sha256 of every block file it lists and of the
    input: a file, a gzip-compressed file (hashed as it is on disk), and a pipe (which
    cannot be read again: null), written by one writer for both paths."""
    import gzip
    import hashlib

    src = tmp_path / "guest.mig"
    subprocess.run([*FIXEDRAM, "save", str(src), "--ram", "16M"], check=True,
                   capture_output=True)
    gz = tmp_path / "guest.mig.gz"
    gz.write_bytes(gzip.compress(src.read_bytes(), 1))

    def sha(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    outs = []
    for name, args, stdin, want in (("file", [str(src)], None, sha(src)),
                                    ("gzip", [str(gz)], None, sha(gz)),
                                    ("pipe", ["-"], src.read_bytes(), None)):
        out = tmp_path / name
        r = subprocess.run([*FIXEDRAM, "extract", *args, "-o", str(out)], input=stdin,
                           capture_output=True, timeout=300)
        assert r.returncode == 0, r.stderr
        index = json.loads((out / "index.json").read_text())
        assert list(index)[:3] == ["schema_version", "source", "source_sha256"]
        assert index["schema_version"] == SCHEMA_VERSION and index["source_sha256"] == want
        for b in index["blocks"]:
            assert b["sha256"] == sha(out / b["file"]), (name, b)
        outs.append(index["blocks"])
    assert outs[0] == outs[1] == outs[2]
