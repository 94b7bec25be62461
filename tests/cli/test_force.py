"""``--force`` replaces only what fixedram itself would write.

A raw extract replaces an existing directory only when it holds nothing but
an earlier extract; ``.``, ``..``, ``/``, the home directory and mount points
are never replaced; file outputs replace a regular file (or write through a
symlink), never a directory or anything that is not a regular file; servers
never remove a user's file to bind a socket. Every case is run through the
command line on a real save of the built-in guest.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fixedram.errors import OutputError
from fixedram.output import staged_directory

FIXEDRAM = [sys.executable, "-m", "fixedram.cli.main"]


def run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 120, pipe: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run fixedram; ``pipe``'s bytes arrive on standard input through a pipe."""
    r = subprocess.run([*FIXEDRAM, *args], capture_output=True, cwd=cwd, env=env,
                       timeout=timeout, check=False,
                       input=pipe.read_bytes() if pipe else b"")
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(errors="replace"),
                                       r.stderr.decode(errors="replace"))


def snapshot(d: Path) -> dict[str, str]:
    """Every entry under ``d`` with its kind and content hash."""
    out = {}
    for p in sorted(d.rglob("*")):
        rel = str(p.relative_to(d))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def save(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete stream save of a 16 MiB built-in guest."""
    path = tmp_path_factory.mktemp("save") / "vm.sav"
    r = run("save", f"file:{path}", "--ram", "16M")
    assert r.returncode == 0, r.stderr
    return path


def extract_into(save: Path, d: Path) -> None:
    r = run("extract", str(save), "-o", str(d))
    assert r.returncode == 0, r.stderr


def refused(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode != 0, r.stdout
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fixedram: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_case_folder_survives_every_command_with_force(save: Path, tmp_path: Path) -> None:
    """A forensics case folder (notes, the save itself, an earlier extract in a
    subfolder) given as the output of every command that writes, with --force."""
    case = tmp_path / "case"
    case.mkdir()
    (case / "notes.txt").write_text("chain of custody: seized 2026-12-07\n")
    (case / "evidence").mkdir()
    (case / "evidence" / "disk.img").write_bytes(b"\x55" * 4096)
    extract_into(save, case / "ram")
    before = snapshot(case)
    stream = str(save)
    commands = [
        ["extract", stream, "-o", str(case), "--force"],
        ["extract", stream, "-o", str(case), "--format", "physical", "--force"],
        ["extract", stream, "-o", str(case), "--format", "elf", "--force"],
        ["convert", stream, str(case), "--to", "mapped-ram", "--force"],
        ["convert", stream, str(case), "--to", "stream", "--force"],
        ["map", stream, "--svg", str(case), "--force"],
        ["save", f"file:{case}", "--ram", "16M"],
        ["receive", f"unix:{tmp_path / 'in.sock'}", "-o", str(case), "--force"],
        ["extract", stream, "-o", str(case / "evidence"), "--force"],
        ["extract", "-", "-o", str(case), "--force"],  # one pass, from a pipe
        ["convert", "-", str(case), "--to", "stream", "--force"],
    ]
    for cmd in commands:
        r = run(*cmd, pipe=save if "-" in cmd else None, timeout=30)
        refused(r, str(case))
        assert snapshot(case) == before, cmd
    # Nothing was written beside the folder either (no staged leftovers).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case"]


def test_force_names_the_file_that_would_be_lost(save: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    extract_into(save, out)
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    refused(run("extract", str(save), "-o", str(out), "--force"),
            "notes.txt", "would be lost")
    assert snapshot(out) == before


@pytest.mark.parametrize("intruder", ["dir", "link"])
def test_a_listed_name_that_is_not_a_file_is_not_ours(save: Path, tmp_path: Path,
                                                       intruder: str) -> None:
    """An index can list a name, but a directory or link under it was not written by us."""
    out = tmp_path / "out"
    extract_into(save, out)
    (out / "pc.bios.bin").unlink()
    if intruder == "dir":
        (out / "pc.bios.bin").mkdir()
        (out / "pc.bios.bin" / "keep").write_text("mine")
    else:
        (tmp_path / "elsewhere").write_text("mine")
        (out / "pc.bios.bin").symlink_to(tmp_path / "elsewhere")
    before = snapshot(out)
    refused(run("extract", str(save), "-o", str(out), "--force"), "pc.bios.bin")
    assert snapshot(out) == before


def test_a_directory_without_our_index_is_refused(save: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "index.json").write_text('{"blocks": "not a list"}')
    (out / "pc.ram.bin").write_bytes(b"x")
    refused(run("extract", str(save), "-o", str(out), "--force"), "would be lost")
    assert (out / "pc.ram.bin").read_bytes() == b"x"


def test_an_earlier_extract_is_replaced_with_force_only(save: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    extract_into(save, out)
    (out / "pc.ram.bin").write_bytes(b"stale")  # an earlier, different extract
    refused(run("extract", str(save), "-o", str(out)), "earlier extract", "--force")
    assert (out / "pc.ram.bin").read_bytes() == b"stale"
    r = run("extract", str(save), "-o", str(out), "--force")
    assert r.returncode == 0, r.stderr
    index = json.loads((out / "index.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["index.json", *(b["file"] for b in index["blocks"])])
    assert (out / "pc.ram.bin").stat().st_size == 16 << 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_empty_directory_is_filled(save: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    r = run("extract", str(save), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "index.json").is_file()


@pytest.mark.parametrize("name", [".", ".."])
def test_current_directory_and_its_parent_are_never_replaced(save: Path, tmp_path: Path,
                                                             name: str) -> None:
    """Even when the directory holds only an earlier extract, and even with --force."""
    work = tmp_path / "extract"
    extract_into(save, work)
    cwd = work
    if name == "..":  # the parent of an empty working directory
        cwd = tmp_path / "parent" / "inner"
        cwd.mkdir(parents=True)
    before = snapshot(tmp_path)
    for force in ([], ["--force"]):
        refused(run("extract", str(save), "-o", name, *force, cwd=cwd),
                "current directory", "never replaced")
    assert snapshot(tmp_path) == before


def test_root_is_never_replaced(save: Path) -> None:
    refused(run("extract", str(save), "-o", "/", "--force"), "root directory")


def test_home_directory_is_never_replaced(save: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    extract_into(save, home)  # a home holding nothing but an extract: still refused
    before = snapshot(home)
    env = {**os.environ, "HOME": str(home)}
    refused(run("extract", str(save), "-o", str(home), "--force", env=env), "home directory")
    assert snapshot(home) == before


def test_mount_point_is_never_replaced(save: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], check=True)
    try:
        for force in ([], ["--force"]):
            refused(run("extract", str(save), "-o", str(mnt), *force), "mount point")
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_files_added_while_extracting_are_kept(save: Path, tmp_path: Path) -> None:
    """The directory is checked again just before it is replaced."""
    out = tmp_path / "out"
    extract_into(save, out)
    with pytest.raises(OutputError, match=r"late\.txt"), staged_directory(out, True) as tmp:
        (Path(tmp) / "index.json").write_text('{"blocks": []}')
        (out / "late.txt").write_text("written by the user meanwhile")
    assert (out / "late.txt").read_text() == "written by the user meanwhile"
    assert (out / "pc.ram.bin").stat().st_size == 16 << 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("fmt", ["physical", "elf"])
def test_file_output_replaces_a_regular_file_with_force(save: Path, tmp_path: Path,
                                                        fmt: str) -> None:
    out = tmp_path / "mem.img"
    out.write_bytes(b"old")
    refused(run("extract", str(save), "-o", str(out), "--format", fmt), "already exists")
    assert out.read_bytes() == b"old"
    r = run("extract", str(save), "-o", str(out), "--format", fmt, "--force")
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size >= 16 << 20


def test_file_output_writes_through_a_symlink(save: Path, tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    target = tmp_path / "store" / "vm.mapped"
    target.write_bytes(b"old")
    link = tmp_path / "vm.mapped"
    link.symlink_to("store/vm.mapped")
    r = run("convert", str(save), str(link), "--to", "mapped-ram", "--force")
    assert r.returncode == 0, r.stderr
    assert link.is_symlink() and os.readlink(link) == "store/vm.mapped"
    r = run("inspect", str(target))
    assert r.returncode == 0 and "mapped-ram" in r.stdout, r.stdout
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["vm.mapped"]


def test_file_output_never_replaces_a_fifo_or_a_link_to_a_directory(save: Path,
                                                                     tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    refused(run("convert", str(save), str(fifo), "--to", "stream", "--force"),
            "not a regular file")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep").write_text("mine")
    (tmp_path / "dl").symlink_to("d")
    refused(run("extract", str(save), "-o", str(tmp_path / "dl"), "--format", "elf",
                "--force"), "is a directory")
    assert (tmp_path / "d" / "keep").read_text() == "mine"
    assert os.path.exists(fifo) and not os.path.isfile(fifo)


def test_servers_never_remove_a_file_to_bind(tmp_path: Path) -> None:
    """``guest --qmp PATH`` and ``receive unix:PATH`` replace only a stale socket."""
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    refused(run("guest", "--qmp", str(notes), timeout=30), "not a socket")
    refused(run("receive", f"unix:{notes}", "-o", str(tmp_path / "out.sav"), timeout=30),
            "not a socket")
    assert notes.read_text() == "mine"
    # A stale socket (nobody listening) is replaced.
    stale = tmp_path / "qmp.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    p = subprocess.Popen([*FIXEDRAM, "guest", "--ram", "16M", "--qmp", str(stale)],
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stderr is not None
        assert "QMP on unix:" in p.stderr.readline()
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(stale))
        assert b"QMP" in c.recv(4096)
        c.close()
    finally:
        p.terminate()
        p.wait(timeout=30)


def test_demo_dir_keeps_the_users_files(tmp_path: Path) -> None:
    mine = tmp_path / "demo-stream.mig"
    mine.write_text("mine")
    refused(run("demo", "--ram", "16M", "--dir", str(tmp_path), timeout=60), "already exists")
    assert mine.read_text() == "mine"
