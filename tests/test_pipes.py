"""Streams on pipes and compressed streams, read in one pass: ``-`` as input of inspect, extract,
verify, state and convert, and files compressed by gzip, bzip2, xz, lzop and zstd. The reference
is the seekable reader on the same real QEMU 10 file, and QEMU's pmemsave of the source."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fixedram.format.machine import MachineState
from fixedram.format.migfile import MigrationFile
from fixedram.format.writer import BlockSpec, StreamWriter
from fixedram.tools.convert import convert_file
from qemu_harness import SavedFile, diff_pages, load_into_new_vm, save_vm
from util import elf_segments

pytestmark = pytest.mark.qemu
FIXEDRAM = [sys.executable, "-m", "fixedram.cli.main"]
MiB = 1 << 20
COMPRESSORS = {"gzip": ["gzip", "-c", "-1"], "bzip2": ["bzip2", "-c", "-1"],
               "xz": ["xz", "-c", "-0", "-T1"], "lzop": ["lzop", "-c"],
               "zstd": ["zstd", "-c", "-q"]}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, qemu: str,
         guest_image_factory: Callable[..., Path]) -> SavedFile:
    """A live multi-pass stream (about 3x RAM): pages are re-sent in later passes."""
    d = tmp_path_factory.mktemp("pipes")
    return save_vm(d, machine="q35", mode="stream", live=True, image=guest_image_factory(),
                   min_transferred=3 * (128 << 20))


def _cli(*args: str, stdin: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The command with ``stdin`` (if given) behind a real pipe, not a redirected file."""
    p = subprocess.Popen([*FIXEDRAM, *args], stdin=subprocess.PIPE if stdin else None,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if stdin is not None:
        _feed(p, stdin)
    out, err = p.communicate(timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, out.decode(), err.decode())


def _feed(p: subprocess.Popen[bytes], src: Path, limit: int | None = None) -> None:
    """Write ``src`` (or its first ``limit`` bytes) into the child's stdin, then close it."""
    assert p.stdin is not None
    pipe = p.stdin
    p.stdin = None  # this thread owns it now (communicate() must not touch it)

    def run() -> None:
        try:
            with open(src, "rb") as f:
                left = limit if limit is not None else 1 << 62
                while left > 0:
                    b = f.read(min(left, 1 << 20))
                    if not b:
                        break
                    pipe.write(b)
                    left -= len(b)
        except (BrokenPipeError, ValueError):
            pass
        finally:
            with contextlib.suppress(BrokenPipeError):
                pipe.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()


def _same_tree(a: Path, b: Path) -> None:
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    for n in names:
        if n == "index.json":
            ia, ib = json.loads((a / n).read_text()), json.loads((b / n).read_text())
            assert ia["blocks"] == ib["blocks"] and ia["complete"] and ib["complete"]
            continue
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
        # Sparse like the seekable extract: holes where pages were never sent or zero.
        assert os.stat(a / n).st_blocks <= os.stat(b / n).st_blocks + 64


def test_extract_from_pipe_equals_file(live: SavedFile, tmp_path: Path) -> None:
    with MigrationFile(live.path) as mf:
        assert mf.passes >= 2 and mf.resent_bytes > live.ram_size  # a real multi-pass stream
    ref, got = tmp_path / "ref", tmp_path / "got"
    assert _cli("extract", str(live.path), "-o", str(ref)).returncode == 0
    p = _cli("extract", "-", "-o", str(got), stdin=live.path)
    assert p.returncode == 0, p.stderr
    _same_tree(got, ref)
    # The guest-physical image against the source's pmemsave.
    phys = tmp_path / "phys.img"
    p = _cli("extract", "-", "--format", "physical", "-o", str(phys), stdin=live.path)
    assert p.returncode == 0, p.stderr
    img = np.memmap(phys, dtype=np.uint8, mode="r")
    ref_pm = live.pmem_path.read_bytes()
    bad = diff_pages(ref_pm, memoryview(img[:len(ref_pm)]), live.compare_ranges)
    assert not bad, f"{len(bad)} pages differ from pmemsave, first 0x{bad[0]:x}"
    # An ELF core's notes come after the RAM: made into a file (its headers written last),
    # refused on standard output, in one line naming the way round.
    p = _cli("extract", "-", "--format", "elf", "-o", str(tmp_path / "c.elf"), stdin=live.path)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    ref_elf = tmp_path / "ref.elf"
    assert _cli("extract", str(live.path), "--format", "elf", "-o", str(ref_elf)).returncode == 0
    assert [(pa, n) for _, pa, n in elf_segments(tmp_path / "c.elf")] == \
        [(pa, n) for _, pa, n in elf_segments(ref_elf)]
    for fmt, name in (("elf", "core.elf"), ("physical", "ram.img")):
        p = _cli("extract", "-", "--format", fmt, "-o", "-", stdin=live.path)
        assert p.returncode == 1 and p.stdout == "" and len(p.stderr.splitlines()) == 1
        assert p.stderr.rstrip().endswith(f"write it to a file: -o {name}"), p.stderr


def test_inspect_state_verify_on_pipe(live: SavedFile, tmp_path: Path) -> None:
    ref = json.loads(_cli("inspect", "--json", str(live.path)).stdout)
    p = _cli("inspect", "--json", "-", stdin=live.path)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got["one_pass"] and got["compression"] is None and got["apparent_bytes"] is None
    for k in ("format", "machine", "capabilities", "complete", "passes", "resent_bytes",
              "ram_bytes", "eof_offset", "vmdesc", "devices", "commands", "ram_sections"):
        assert got[k] == ref[k], k
    for bg, br in zip(got["blocks"], ref["blocks"], strict=True):
        for k in ("idstr", "used_length", "pages_present", "zero_pages", "max_sends",
                  "record_offset"):
            assert bg[k] == br[k], (bg["idstr"], k)
    p = _cli("state", "--json", "-", stdin=live.path)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == json.loads(_cli("state", "--json", str(live.path)).stdout)
    p = _cli("verify", "-", "--against", str(live.path), stdin=live.path)
    assert p.returncode == 0 and "RAM equal" in p.stdout, p.stdout + p.stderr
    # A file differing in one page: found from either side.
    other = tmp_path / "other.mig"
    convert_file(str(live.path), str(other), "mapped-ram")
    with MigrationFile(other) as mf:
        m = mf.block("pc.ram").record.mapped
        page = int(mf.block("pc.ram").present_pages()[100])
        assert m is not None
    with open(other, "r+b") as f:
        f.seek(m.pages_offset + page * 4096 + 7)
        f.write(b"\xa5")
    for args in (("-", "--against", str(other)), (str(other), "--against", "-")):
        p = _cli("verify", *args, "--json", stdin=live.path)
        doc = json.loads(p.stdout)
        assert p.returncode == 1 and not doc["equal"]
        d, = doc["differences"]
        assert d["idstr"] == "pc.ram" and d["differing_pages"] == [page]


def test_convert_pipe_to_mapped_ram_loads(live: SavedFile, tmp_path: Path,
                                          guest_image: Path) -> None:
    out = tmp_path / "conv.mig"
    p = _cli("convert", "-", str(out), "--to", "mapped-ram", stdin=live.path)
    assert p.returncode == 0, p.stderr
    with MigrationFile(out) as mf:
        assert mf.format == "mapped-ram" and mf.complete and mf.libvirt is None
        # Bounded by RAM however long the stream was.
        assert mf.size < live.ram_size + 8 * MiB < os.path.getsize(live.path)
    assert _cli("verify", str(out), "--against", str(live.path)).returncode == 0
    vm = load_into_new_vm(out, live.machine, {"mapped-ram": True}, workdir=tmp_path,
                          image=guest_image, ram_size=live.ram_size, name="dst")
    try:
        pm = vm.pmemsave(0, live.ram_size, tmp_path / "dst.pmem")
        bad = diff_pages(live.pmem_path.read_bytes(), pm.read_bytes(), live.compare_ranges)
        assert not bad, f"{len(bad)} pages differ after load"
    finally:
        vm.shutdown()
    # --to stream from a pipe: the stream as it came, checked on the way.
    st = tmp_path / "copy.stream"
    p = _cli("convert", "-", str(st), "--to", "stream", stdin=live.path)
    assert p.returncode == 0, p.stderr
    assert st.read_bytes() == live.path.read_bytes()
    # A mapped-ram file on a pipe is refused, and nothing is written.
    p = _cli("convert", "-", str(tmp_path / "x.mig"), "--to", "stream", stdin=out)
    assert p.returncode == 1 and "mapped-ram needs a seekable file" in p.stderr
    assert not (tmp_path / "x.mig").exists()
    for cmd in (("inspect",), ("extract", "-o", str(tmp_path / "xo"))):
        p = _cli(*cmd, "-", stdin=out) if cmd[0] == "inspect" else _cli(
            "extract", "-", "-o", str(tmp_path / "xo"), stdin=out)
        assert p.returncode == 1 and "mapped-ram needs a seekable file" in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "xo").exists()
    # Standard input redirected from a file is seekable: mapped-ram reads as usual.
    with open(out, "rb") as f:
        r = subprocess.run([*FIXEDRAM, "inspect", "--json", "-"], stdin=f, capture_output=True,
                           text=True, check=False)
    assert r.returncode == 0 and json.loads(r.stdout)["format"] == "mapped-ram", r.stderr


def test_pipe_closed_mid_stream(live: SavedFile, tmp_path: Path) -> None:
    size = os.path.getsize(live.path)
    for cut in (12, size // 3, size - 100):
        out = tmp_path / f"cut{cut}"
        p = subprocess.Popen([*FIXEDRAM, "extract", "-", "-o", str(out)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _feed(p, live.path, cut)
        err = p.communicate(timeout=120)[1].decode()
        assert p.returncode == 2, err  # the save is cut short: incomplete
        line, = err.strip().splitlines()
        assert line.startswith("fixedram: error: ") and "stdin" in line
        assert "incomplete" in line or "byte offset" in line
        assert not out.exists() and not [n for n in os.listdir(tmp_path) if "partial" in n]
        # --allow-incomplete extracts what arrived, when the RAMBlock list did.
        if cut > 1 << 20:
            p = _cli("extract", "-", "-o", str(out), "--allow-incomplete", stdin=live.path)
            assert p.returncode == 0, p.stderr


def test_memory_bounded_by_ram_not_stream(live: SavedFile, tmp_path: Path) -> None:
    """A stream several times RAM: peak RSS stays far below the stream's length.

    The child reports its own VmHWM (a high-water mark that starts anew at exec, unlike
    wait4's ru_maxrss, which keeps the forking test process's)."""
    size = os.path.getsize(live.path)
    assert size > 2 * live.ram_size
    code = ("import atexit, runpy, sys\n"
            "atexit.register(lambda: sys.stderr.write(next(l for l in open('/proc/self/status')"
            " if l.startswith('VmHWM'))))\n"
            f"sys.argv = ['fixedram', 'extract', '-', '-o', {str(tmp_path / 'o')!r}]\n"
            "runpy.run_module('fixedram.cli.main', run_name='__main__')\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _feed(p, live.path)
    err = p.communicate(timeout=300)[1].decode()
    assert p.returncode == 0, err
    hwm = int(err.split("VmHWM:")[1].split()[0]) * 1024
    # Interpreter, numpy and rich take ~45 MiB; per page a few bytes; buffers a few MiB.
    assert hwm < 120 * MiB < size, f"peak RSS {hwm >> 20} MiB for a {size >> 20} MiB stream"


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_compressed_stream_files(live: SavedFile, tmp_path: Path, kind: str) -> None:
    """A QEMU stream compressed by each tool reads as the stream itself, as a file and on a
    pipe; a corrupt or cut payload is one error line with its offset, and leaves nothing."""
    if shutil.which(COMPRESSORS[kind][0]) is None:
        pytest.fail(f"{kind} is not installed (scripts/install-qemu.sh installs it)")
    comp = tmp_path / f"vm.mig.{kind}"
    with open(live.path, "rb") as fi, open(comp, "wb") as fo:
        subprocess.run(COMPRESSORS[kind], stdin=fi, stdout=fo, check=True)
    ref = tmp_path / "ref"
    assert _cli("extract", str(live.path), "-o", str(ref)).returncode == 0
    p = _cli("extract", str(comp), "-o", str(tmp_path / "a"))
    assert p.returncode == 0, p.stderr
    _same_tree(tmp_path / "a", ref)
    info = json.loads(_cli("inspect", "--json", "-", stdin=comp).stdout)
    assert info["compression"] == kind and info["complete"] and info["passes"] >= 2
    # Concatenated streams (what pbzip2, pigz --independent or a split save give) read as one.
    whole = live.path.read_bytes()
    cut_at = len(whole) // 3 + 12345
    multi = tmp_path / f"multi.{kind}"
    with open(multi, "wb") as fo:
        for part in (whole[:cut_at], whole[cut_at:]):
            fo.write(subprocess.run(COMPRESSORS[kind], input=part, capture_output=True,
                                    check=True).stdout)
    p = _cli("extract", str(multi), "-o", str(tmp_path / "m"))
    assert p.returncode == 0, p.stderr
    _same_tree(tmp_path / "m", ref)
    data = comp.read_bytes()
    bad = tmp_path / "bad"
    bad.write_bytes(data[:len(data) // 2] + bytes(b ^ 0x5A for b in data[len(data) // 2:
                                                                         len(data) // 2 + 64])
                    + data[len(data) // 2 + 64:])
    cut = tmp_path / "cut"
    cut.write_bytes(data[:len(data) // 2])
    for f in (bad, cut):
        out = tmp_path / f"out-{f.name}"
        p = _cli("extract", str(f), "-o", str(out))
        assert p.returncode == 2  # corrupt or cut: a malformed or incomplete save
        line, = p.stderr.strip().splitlines()
        assert str(f) in line and "byte offset" in line, line
        assert not out.exists()


def test_zero_resend_and_last_copy_win(live: SavedFile, tmp_path: Path) -> None:
    """A page sent with data and later as a ZERO record reads as zero; a page sent twice
    keeps its last copy. The stream is built by our writer on the real file's machine state
    (QEMU's test guest never zeroes a page it dirtied)."""
    with MigrationFile(live.path) as mf:
        state = MachineState.from_file(mf)
        specs = BlockSpec.of(mf.blocks)
    assert specs[0].idstr == "pc.ram"
    path = tmp_path / "zero.mig"
    ps = 4096
    with open(path, "wb") as f:
        w = StreamWriter(f.write, state.with_mapped_ram(False), specs)
        w.begin()
        w.begin_part()
        w.pages(0, 10, np.full(4 * ps, 0x11, dtype=np.uint8))  # pages 10..13
        w.end_part()
        w.begin_part()
        w.zeros(0, np.array([11, 12], dtype=np.int64))
        w.pages(0, 13, np.full(ps, 0x22, dtype=np.uint8))
        w.end_part()
        w.begin_part(end=True)
        w.end_part()
        w.finish()
    for fmt, out in (("raw", tmp_path / "raw"), ("physical", tmp_path / "phys.img")):
        p = _cli("extract", "-", "--format", fmt, "-o", str(out), stdin=path)
        assert p.returncode == 0, p.stderr
        ref = tmp_path / f"ref-{fmt}"
        assert _cli("extract", str(path), "--format", fmt, "-o", str(ref)).returncode == 0
        got_file = out / "pc.ram.bin" if fmt == "raw" else out
        ref_file = ref / "pc.ram.bin" if fmt == "raw" else ref
        got = np.memmap(got_file, dtype=np.uint8, mode="r")
        assert got_file.read_bytes() == ref_file.read_bytes()
        assert (got[10 * ps:11 * ps] == 0x11).all() and (got[13 * ps:14 * ps] == 0x22).all()
        assert not got[11 * ps:13 * ps].any()
        # The zeroed pages are holes again, not written zeros.
        with open(got_file, "rb") as fh:
            assert os.lseek(fh.fileno(), 11 * ps, os.SEEK_HOLE) == 11 * ps
