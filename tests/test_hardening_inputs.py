"""Forged inputs at the edges: vmdesc trailers, sizes, names, odd input files.

Every command that reads the forged input must print one line naming the
file (and, for file contents, the byte offset), exit non-zero, print no
traceback and leave nothing under its output name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixedram.errors import CorruptFile
from fixedram.format.machine import MachineState
from fixedram.format.migfile import MigrationFile
from fixedram.format.vmdesc import MAX_TRAILER_DEPTH, encode_trailer, find_trailer
from fixedram.format.writer import BlockSpec, StreamWriter
from fixedram.sizes import OFF_T_MAX, SizeError, parse_size

FIXEDRAM = [sys.executable, "-m", "fixedram.cli.main"]


def run(*args: str, stdin: Path | None = None, cwd: Path | None = None
        ) -> subprocess.CompletedProcess[str]:
    with open(stdin, "rb") if stdin else open(os.devnull, "rb") as f:
        return subprocess.run([*FIXEDRAM, *args], stdin=f, capture_output=True, text=True,
                              timeout=120, cwd=cwd)


def one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert r.returncode != 0, r.stdout
    err = r.stderr.strip() or r.stdout.strip()  # verify reports its verdict on stdout
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


@pytest.fixture(scope="module")
def guest_save(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete stream of the built-in guest, with its vmdesc trailer."""
    d = tmp_path_factory.mktemp("guest")
    subprocess.run([*FIXEDRAM, "save", str(d / "g.mig"), "--ram", "16M"], check=True,
                   capture_output=True)
    return d / "g.mig"


def with_trailer(src: Path, dst: Path, raw: bytes) -> int:
    """``src`` with its trailer's JSON replaced by ``raw``; returns the JSON's offset."""
    with MigrationFile(src) as mf:
        assert mf.vmdesc is not None
        at = mf.vmdesc.offset
    data = src.read_bytes()[:at] + encode_trailer(raw)
    dst.write_bytes(data)
    return at + 5


TRAILERS = {
    "nested 100000 deep": b'{"devices": ' + b"[" * 100000 + b"]" * 100000 + b"}",
    "nested 70 deep": b'{"devices": ' + b"[" * 70 + b"]" * 70 + b"}",
    "5000-digit number": b'{"page_size": ' + b"9" * 5000 + b', "devices": []}',
    "NaN": b'{"page_size": NaN, "devices": []}',
    "lone surrogate": b'{"devices": [{"name": "\\ud800"}]}',
    "600000 arrays": b'{"devices": [' + b"[]," * 600000 + b"[]]}",
    "not UTF-8": b'{"devices": ["\xff\xfe"]}',
    "an array": b'[{"devices": []}]'[:-1] + b"}",
}


@pytest.mark.parametrize("name", list(TRAILERS))
def test_trailer_is_corrupt_file_with_offset(name: str, guest_save: Path,
                                             tmp_path: Path) -> None:
    f = tmp_path / "forged.mig"
    at = with_trailer(guest_save, f, TRAILERS[name])
    t = time.monotonic()
    with pytest.raises(CorruptFile) as ei:
        MigrationFile(f)
    assert time.monotonic() - t < 10
    e = ei.value
    assert e.path == str(f) and e.offset is not None
    assert at - 5 <= e.offset < at + len(TRAILERS[name]), (e.offset, at)
    assert "vmdesc JSON trailer" in str(e)


def test_depth_limit_is_exact(guest_save: Path, tmp_path: Path) -> None:
    ok = tmp_path / "ok.mig"
    # The document itself is level 1: "devices" holds MAX - 1 more levels.
    inner = MAX_TRAILER_DEPTH - 1
    with_trailer(guest_save, ok, b'{"devices": ' + b"[" * inner + b"]" * inner + b"}")
    with MigrationFile(ok) as mf:
        assert mf.vmdesc is not None
    bad = tmp_path / "bad.mig"
    with_trailer(guest_save, bad, b'{"devices": ' + b"[" * (inner + 1) + b"]" * (inner + 1)
                 + b"}")
    with pytest.raises(CorruptFile, match="nests deeper than"):
        MigrationFile(bad)


def test_tail_full_of_trailer_bytes_is_fast() -> None:
    tail = b"\x06\x00\x00\x00\x00{" * (3 << 20) + b"}"
    t = time.monotonic()
    assert find_trailer(tail, 0, "x") is None
    assert time.monotonic() - t < 5


@pytest.mark.parametrize("name", ["nested 100000 deep", "5000-digit number"])
def test_every_reader_and_receive(name: str, guest_save: Path, tmp_path: Path) -> None:
    f = tmp_path / "forged.mig"
    with_trailer(guest_save, f, TRAILERS[name])
    out = tmp_path / "out"
    commands = [
        ["inspect", str(f)], ["inspect", "--json", str(f)], ["verify", str(f)],
        ["state", str(f)], ["convert", str(f), str(out), "--to", "mapped-ram"],
        ["convert", str(f), str(out), "--to", "stream"],
        ["extract", str(f), "-o", str(out)], ["restore", str(f)], ["send", str(f), "-"],
    ]
    for cmd in commands:
        err = one_line_error(run(*cmd), "vmdesc JSON trailer", "at byte offset")
        assert str(f) in err, (cmd, err)
        assert not out.exists(), cmd
    # receive from stdin (QEMU's exec:): the trailer arrives last, over the pipe.
    one_line_error(run("receive", "-", "-o", str(out), stdin=f), "vmdesc JSON trailer",
                   "at byte offset")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forged.mig"]


# -- sizes (--offset, file: URI offset=) ---------------------------------------------


@pytest.mark.parametrize("text,value", [
    ("4096", 4096), ("4k", 4096), ("4K", 4096), ("64KiB", 65536), ("1.5M", 3 << 19),
    ("0.1k", 102), ("0x1000", 4096), (" 2G ", 2 << 30), ("4096b", 4096),
    ("9223372036854775807", OFF_T_MAX), ("0x7fffffffffffffff", OFF_T_MAX),
])
def test_sizes(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", [
    "infk", "inf", "nan", "1e3", "-1", "1.5", "", "0x", "4bb", "k", "1_000",
    "9223372036854775808", "1234567890123456789012", "8E", "0x8000000000000000",
    "9" * 5000, "1." + "9" * 5000 + "k",
])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(SizeError):
        parse_size(text)


@pytest.mark.parametrize("offset", ["infk", "1234567890123456789012", "9223372036854775808"])
def test_offset_option(offset: str, guest_save: Path) -> None:
    for cmd in (["inspect", str(guest_save)], ["extract", str(guest_save), "-o", "/nonexistent"],
                ["send", str(guest_save), "-"], ["state", str(guest_save)]):
        r = run(*cmd, "--offset", offset)
        assert r.returncode == 1, r.stderr  # bad options: "could not", as qemu-img
        assert "Traceback" not in r.stderr
        assert f"argument --offset: '{offset}'" in r.stderr.splitlines()[-1]


@pytest.mark.parametrize("offset,words", [("infk", "Invalid argument"),
                                          ("1234567890123456789012",
                                           "Numerical result out of range")])
def test_uri_offset(offset: str, words: str, tmp_path: Path) -> None:
    target = tmp_path / "x.mig"
    r = run("save", f"file:{target},offset={offset}", "--ram", "16M")
    one_line_error(r, f"file URI has bad offset {offset}: {words}")
    r = run("restore", f"file:{target},offset={offset}")
    one_line_error(r, f"file URI has bad offset {offset}: {words}")
    assert list(tmp_path.iterdir()) == []


# -- names with terminal escapes ------------------------------------------------------

ESCAPES = "\x1b]0;pwned\x07\x1b[2J\x9b31m[red]x[/nope]\u202e\u200b"


def _named(path: Path, machine: str, block: str) -> None:
    with open(path, "wb") as f:
        w = StreamWriter(f.write, MachineState(machine), [BlockSpec(block, 4 * 4096)])
        w.begin()
        w.begin_part(end=True)
        w.pages(0, 1, b"\x01" * 4096)
        w.end_part()
        w.finish()


def _no_raw_controls(text: str) -> None:
    for c in ("\x1b", "\x07", "\x9b", "\u202e", "\u200b"):
        assert c not in text, repr(text)


def test_inspect_escapes_names(tmp_path: Path) -> None:
    f = tmp_path / "esc.mig"
    _named(f, "pc-q35-10.0" + ESCAPES, "pc.ram" + ESCAPES)
    r = run("inspect", str(f))
    assert r.returncode == 0, r.stderr
    _no_raw_controls(r.stdout)
    assert "\\x1b]0;pwned\\x07" in r.stdout and "\\u202e" in r.stdout
    assert "[red]x[/nope]" in r.stdout.replace("\n", "").replace("│", "").replace(" ", "")
    doc = json.loads(run("inspect", "--json", str(f)).stdout)
    assert doc["blocks"][0]["idstr"] == "pc.ram" + ESCAPES  # JSON keeps the exact name


def test_state_tree_escapes_names(tmp_path: Path) -> None:
    """The state tree shows the machine name (and device names) from the file: escaped."""
    f = tmp_path / "esc.mig"
    _named(f, "pc-q35-10.0" + ESCAPES, "pc.ram")
    r = run("state", str(f))
    assert r.returncode == 0, r.stderr
    _no_raw_controls(r.stdout)
    assert "\\x1b]0;pwned" in r.stdout


def test_receive_summary_escapes_the_machine(tmp_path: Path) -> None:
    f = tmp_path / "esc.mig"
    _named(f, "pc-q35-10.0" + ESCAPES, "pc.ram")
    r = run("receive", "-", "-o", str(tmp_path / "out.mig"), stdin=f)
    assert r.returncode == 0, r.stderr
    _no_raw_controls(r.stderr)
    assert "\\x1b]0;pwned" in r.stderr


def test_errors_escape_names(tmp_path: Path) -> None:
    f = tmp_path / ("bad\x1b[2Jname\x07.mig")
    f.write_bytes(b"QEVM\x00\x00\x00\x09")
    r = run("inspect", str(f))
    _no_raw_controls(one_line_error(r))


# -- an empty RAMBlock name ---------------------------------------------------------


@pytest.fixture
def empty_name(tmp_path: Path) -> Path:
    src = tmp_path / "named.mig"
    _named(src, "pc-q35-10.0", "EMPTYNAMEMARK")
    data = src.read_bytes()
    assert data.count(b"\x0dEMPTYNAMEMARK") == 2  # the block list and the first page record
    f = tmp_path / "empty.mig"
    f.write_bytes(data.replace(b"\x0dEMPTYNAMEMARK", b"\x00"))
    src.unlink()
    return f


def test_empty_block_name_same_error_everywhere(empty_name: Path) -> None:
    out = empty_name.parent / "out.mig"
    errors = []
    for cmd in (["inspect", str(empty_name)], ["verify", str(empty_name)],
                ["convert", str(empty_name), str(out), "--to", "mapped-ram"],
                ["extract", str(empty_name), "-o", str(out)]):
        errors.append(one_line_error(run(*cmd), "RAMBlock", "at byte offset"))
    errors.append(one_line_error(run("receive", "-", "-o", str(out), stdin=empty_name),
                                 "RAMBlock", "at byte offset"))
    assert not out.exists()
    # The same words and offset whichever command read it.
    assert len({e.rsplit(": ", 1)[-1] for e in errors}) == 1, errors


# -- input files that are not files ---------------------------------------------------


def test_directory_and_proc_mem_are_named(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir()
    for path, words in ((d, "Is a directory"), (Path("/proc/self/mem"), "Input/output error")):
        for cmd in (["inspect", str(path)], ["verify", str(path)], ["state", str(path)],
                    ["convert", str(path), str(tmp_path / "o.mig"), "--to", "stream"]):
            err = one_line_error(run(*cmd), words)
            assert f"{path}: " in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"]


def test_random_access_reader_refuses_a_fifo_at_once(tmp_path: Path) -> None:
    """MigrationFile needs offsets: a FIFO is refused by name, without waiting
    for a writer (the command line reads pipes in one pass instead)."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    t = time.monotonic()
    with pytest.raises(OSError) as ei:
        MigrationFile(fifo)
    assert time.monotonic() - t < 5
    assert ei.value.filename == str(fifo) and "not a file" in str(ei.value)


# -- numbers on the command line ------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["save", "x.mig", "--fill", "nan"], ["save", "x.mig", "--live-for", "inf"],
    ["save", "x.mig", "--seed", "9" * 30], ["save", "x.mig", "--ram", "5000"],
    ["save", "x.mig", "--ram", "0"], ["save", "x.mig", "--workload-threads", "-1"],
    ["save", "x.mig", "--multifd", "1000"], ["save", "x.mig", "--max-bandwidth", "infk"],
    ["restore", "exec:true", "--ram", "1"], ["guest", "--qmp", "q.sock", "--ram", "4097"],
    ["receive", "-", "-o", "x.mig", "--multifd-channels", "-1"],
    ["receive", "-", "-o", "x.mig", "--accept-timeout", "nan"],
    ["send", "x.mig", "-", "--multifd-channels", "9" * 5000],
])
def test_bad_numbers_are_usage_errors(args: list[str], tmp_path: Path) -> None:
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 1, r.stderr  # bad options: "could not", as qemu-img
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"fixedram {args[0]}: error: argument")
    assert list(tmp_path.iterdir()) == []
