"""Forged inputs read in one pass: pipes, a compressed libvirt image, ``receive -``.

Issue classes: a RAMBlock length that claims far more RAM than the stream can describe
(refused as the seekable reader refuses it, before memory or output is sized by it); a
closed standard input (never taken for an output's descriptor); a stream with more
RAMBlocks than the process may open files.
"""

from __future__ import annotations

import gzip
import os
import resource
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fixedram.errors import CorruptFile
from fixedram.format.libvirt import LibvirtHeader
from fixedram.format.machine import MachineState
from fixedram.format.migfile import MigrationFile
from fixedram.format.writer import BlockSpec, StreamWriter

FIXEDRAM = [sys.executable, "-m", "fixedram.cli.main"]
PS = 4096
TiB = 1 << 40

# Runs a command and writes its peak resident size (KiB) to argv[1]: the
# child is measured alone, not with pytest's own memory.
_PEAK = """
import resource, subprocess, sys
rc = subprocess.run(sys.argv[2:]).returncode
with open(sys.argv[1], "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(rc)
"""
# What the forged inputs cost before they were refused: 300 MB to 2.1 GB.
PEAK_LIMIT_KIB = 150 * 1024


def _stream(path: Path, blocks: list[BlockSpec], pages: list[tuple[int, int]],
            zeros: tuple[int, np.ndarray] | None = None) -> None:
    """A complete stream: one data page per (block, page), then ``zeros``' ZERO records."""
    with open(path, "wb") as f:
        w = StreamWriter(f.write, MachineState("pc-q35-10.0"), blocks)
        w.begin()
        w.begin_part(end=True)
        if zeros is not None:
            w.zeros(*zeros)
        for bi, pg in pages:
            w.pages(bi, pg, bytes([bi % 251 + 1]) * PS)
        w.end_part()
        w.finish()


def _gzip_libvirt(src: Path, dst: Path) -> None:
    """``src`` as ``virsh save`` writes it with save_image_format = "gzip"."""
    hdr = LibvirtHeader.new(b"<domain type='qemu'><name>forged</name></domain>\n",
                            format="gzip")
    dst.write_bytes(hdr.encode() + gzip.compress(src.read_bytes()))


def _file_error(src: Path) -> CorruptFile:
    """What the seekable reader says about ``src``."""
    with pytest.raises(CorruptFile) as e:
        MigrationFile(src)
    return e.value


def _one_error(r: subprocess.CompletedProcess[str] | subprocess.CompletedProcess[bytes],
               *needles: str) -> str:
    assert r.returncode != 0, r.stdout
    err = r.stderr if isinstance(r.stderr, str) else r.stderr.decode()
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fixedram: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _peak_cmd(peak: Path, *args: str) -> str:
    """A shell line running fixedram with ``args``, its peak memory written to ``peak``."""
    return shlex.join([sys.executable, "-c", _PEAK, str(peak), *FIXEDRAM, *args])


@pytest.mark.parametrize("where", ["last", "first"])
@pytest.mark.parametrize("how", ["extract pipe", "cat | extract", "gzip image", "receive pipe",
                                 "receive <", "cat | receive"])
def test_forged_block_length_refused_in_one_pass(tmp_path: Path, how: str, where: str) -> None:
    """A 4 KB stream declaring one 8 TiB RAMBlock, with one page record at its last page
    (refused when the record arrives) or its first (refused once the stream has ended):
    one error at the block's record, the offset the seekable reader names, no output,
    and memory as for any small stream."""
    src = tmp_path / "forged.mig"
    used = 8 * TiB
    _stream(src, [BlockSpec("pc.ram", used)], [(0, used // PS - 1 if where == "last" else 0)])
    assert src.stat().st_size < 5000
    want = _file_error(src)
    assert "more than a file of this size" in want.message
    inp = src
    if how == "gzip image":
        inp = tmp_path / "forged.sav"
        _gzip_libvirt(src, inp)
    out = tmp_path / "out"
    peak = tmp_path / "peak"
    verb = "receive" if "receive" in how else "extract"
    if how == "gzip image":
        cmd = _peak_cmd(peak, "extract", str(inp), "-o", str(out))
    elif how.startswith("cat"):
        cmd = f"cat {shlex.quote(str(inp))} | " + _peak_cmd(peak, verb, "-", "-o", str(out))
    elif how.endswith("<"):  # receive reads a redirected file as it reads a pipe
        cmd = _peak_cmd(peak, verb, "-", "-o", str(out)) + f" < {shlex.quote(str(inp))}"
    else:
        cmd = _peak_cmd(peak, verb, "-", "-o", str(out))
    r = subprocess.run(cmd, shell=True, capture_output=True, timeout=120,
                       input=inp.read_bytes() if how.endswith("pipe") else None)
    name = f"{inp} (decompressed gzip stream of the compressed image)" if how == "gzip image" \
        else "stdin"
    line = _one_error(r, f"{name}: RAMBlock 'pc.ram' declares {used // PS} pages",
                      f"(at byte offset {want.offset})")
    assert ("so few bytes" in line) == (where == "last"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {"forged.mig", inp.name, "peak"}), "output or temporaries left behind"
    assert int(peak.read_text()) < PEAK_LIMIT_KIB, peak.read_text()


@pytest.mark.parametrize("verb", ["extract", "receive"])
def test_big_real_shaped_stream_passes_the_bound(tmp_path: Path, verb: str) -> None:
    """The bound is what a real stream always meets: a 32 GiB block (more pages than the
    floor alone allows) whose every page is sent once, in order, as QEMU's first pass
    does, goes through a pipe."""
    src = tmp_path / "big.mig"
    npages = (32 << 30) // PS
    _stream(src, [BlockSpec("pc.ram", npages * PS)], [(0, npages - 1)],
            zeros=(0, np.arange(npages - 1, dtype=np.int64)))
    out = tmp_path / "out"
    with open(src, "rb") as f:
        r = subprocess.run(["bash", "-c", 'cat | exec "$@"', "_", *FIXEDRAM, verb, "-", "-o",
                            str(out)], stdin=f, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    if verb == "extract":
        got = out / "pc.ram.bin"
        assert got.stat().st_size == npages * PS
        with open(got, "rb") as g:
            g.seek((npages - 1) * PS)
            assert g.read() == bytes([1]) * PS
    else:
        with MigrationFile(out) as mf:
            assert mf.blocks[0].pages_present == 1
            assert mf.blocks[0].read((npages - 1) * PS, PS) == bytes([1]) * PS


def test_receive_closed_stdin_is_refused(tmp_path: Path) -> None:
    """``receive - <&-``: the error ``extract - <&-`` gives, before any output is opened
    (it would take descriptor 0 and be read as the migration)."""
    out = tmp_path / "out.mig"
    lines = {}
    for verb in ("receive", "extract"):
        r = subprocess.run(["bash", "-c", 'exec "$@" <&-', "_", *FIXEDRAM, verb, "-", "-o",
                            str(out)], capture_output=True, text=True, timeout=60)
        lines[verb] = _one_error(r, "stdin: Bad file descriptor")
    assert lines["receive"] == lines["extract"]
    assert list(tmp_path.iterdir()) == [], "output or temporaries left behind"


NBLOCKS = 2000
NOFILE = 256


def _low_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


def test_many_blocks_extract_within_descriptor_limit(tmp_path: Path) -> None:
    """2000 RAMBlocks, each with a page, through a pipe with 256 descriptors allowed:
    every block's file is written, as when the file is given by name."""
    src = tmp_path / "many.mig"
    _stream(src, [BlockSpec(f"b{i}", 2 * PS) for i in range(NBLOCKS)],
            [(i, i % 2) for i in range(NBLOCKS)])
    lim = subprocess.run([sys.executable, "-c", "import resource; print(resource.getrlimit("
                          "resource.RLIMIT_NOFILE)[0])"], preexec_fn=_low_nofile,
                         capture_output=True, text=True, check=True)
    assert int(lim.stdout) == NOFILE < NBLOCKS
    outs = {}
    for how in ("pipe", "file"):
        out = outs[how] = tmp_path / how
        with open(src, "rb") as f:
            args = ["-", "-o", str(out)] if how == "pipe" else [str(src), "-o", str(out)]
            r = subprocess.run([*FIXEDRAM, "extract", *args], input=f.read() if how == "pipe"
                               else None, capture_output=True, timeout=300,
                               preexec_fn=_low_nofile)
        assert r.returncode == 0, r.stderr.decode()
    for i in range(NBLOCKS):
        want = bytes(PS) * (i % 2) + bytes([i % 251 + 1]) * PS + bytes(PS) * (1 - i % 2)
        for how in ("pipe", "file"):
            assert (outs[how] / f"b{i}.bin").read_bytes() == want, (how, i)
    assert sorted(os.listdir(outs["pipe"])) == sorted(os.listdir(outs["file"]))
