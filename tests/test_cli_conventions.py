"""Command-line conventions: --version, python -m fixedram, completion scripts, --help examples,
and a startup that does not import numpy or rich."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from util import elf_phdrs

FIXEDRAM = str(Path(sys.executable).with_name("fixedram"))
COMMANDS = ("inspect", "extract", "convert", "verify", "demo", "save", "restore", "guest",
            "receive", "send", "state", "map", "completion", "define-xml")
# Commands whose --help ends with examples.
WITH_EXAMPLES = COMMANDS  # every command's --help ends with examples


def _run(*cmd: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw)  # type: ignore


@pytest.mark.parametrize("entry", [[FIXEDRAM], [sys.executable, "-m", "fixedram"]])
def test_version(entry: list[str]) -> None:
    r = _run(*entry, "--version")
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout == f"fixedram {version('fixedram')}\n"


def test_python_m_is_the_command() -> None:
    a = _run(sys.executable, "-m", "fixedram", "--help")
    b = _run(FIXEDRAM, "--help")
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout
    listed = {line.split()[0] for line in a.stdout.splitlines() if line.startswith("    ")
              and not line.startswith("     ")}
    assert listed == set(COMMANDS)
    r = _run(sys.executable, "-m", "fixedram", "inspect", "/nonexistent/x.mig")
    assert r.returncode == 1 and r.stderr.startswith("fixedram: error: ")
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["map", "--help"]])
def test_startup_imports_neither_numpy_nor_rich(args: list[str]) -> None:
    code = ("import sys\nfrom fixedram.cli.main import main\n"
            f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('numpy', 'rich', 'matplotlib', 'shtab', 'qemu')), file=sys.stderr)")
    r = _run(sys.executable, "-c", code)
    assert r.returncode == 0 and r.stderr == "[]\n", r.stderr


@pytest.mark.parametrize("command", WITH_EXAMPLES)
def test_help_ends_with_examples(command: str) -> None:
    r = _run(FIXEDRAM, command, "--help")
    assert r.returncode == 0
    tail = r.stdout[r.stdout.rindex("\nexamples:\n"):]
    assert f"fixedram {command} " in tail
    # One exit-status scheme, said by every command (docs/cli.md).
    assert "exit status" in r.stdout and "128+N" in r.stdout


def test_one_command_parser_is_the_whole_parsers_part() -> None:
    """A command is parsed by a parser holding only that command (faster start), which
    must accept and describe exactly what the whole parser does for it."""
    from fixedram.cli.main import build_parser

    def sub(p: Any) -> Any:
        return next(a for a in p._actions if a.dest == "command")

    whole = build_parser()
    names = list(sub(whole).choices)
    assert len(names) >= 13
    for name in names:
        one = build_parser(name)
        assert list(sub(one).choices) == [name]
        assert one._subparsers is not None
        assert sub(one).choices[name].format_help() == sub(whole).choices[name].format_help()
    # an unknown command gets the whole parser, so its error lists every command
    assert list(sub(build_parser("nonsense")).choices) == names


def _complete(script: str, *words: str) -> list[str]:
    """What bash completes for ``fixedram WORDS...`` (the last word being typed)."""
    line = " ".join(("fixedram", *words))
    prog = (f'{script}\nCOMP_WORDS=(fixedram {" ".join(words)}); COMP_CWORD={len(words)}; '
            f'COMP_LINE="{line}"; COMP_POINT=${{#COMP_LINE}}; _shtab_fixedram; '
            'printf "%s\\n" "${COMPREPLY[@]}"')
    r = _run("bash", "-c", prog)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_bash_completion(tmp_path: Path) -> None:
    r = _run(FIXEDRAM, "completion", "bash")
    assert r.returncode == 0
    script = tmp_path / "fixedram.bash"
    script.write_text(r.stdout)
    r = _run("bash", "-c", f"source {script} && complete -p fixedram")
    assert r.returncode == 0 and r.stdout.strip().endswith(" fixedram")
    assert "-F _shtab_fixedram" in r.stdout
    src = f"source {script}"
    assert _complete(src, "ma") == ["map"]
    assert set(_complete(src, "")) >= set(COMMANDS)
    assert _complete(src, "map", "--j") == ["--json"]
    assert _complete(src, "completion", "z") == ["zsh"]
    assert _complete(src, "extract", "x.mig", "--format", "e") == ["elf"]
    (tmp_path / "guest.mig").write_bytes(b"")
    r = _run("bash", "-c", f"cd {tmp_path} && {src} && COMP_WORDS=(fixedram map gu); "
             "COMP_CWORD=2; COMP_LINE='fixedram map gu'; COMP_POINT=15; _shtab_fixedram; "
             'printf "%s\\n" "${COMPREPLY[@]}"')
    assert r.stdout.split() == ["guest.mig"]


def test_zsh_completion() -> None:
    r = _run(FIXEDRAM, "completion", "zsh")
    assert r.returncode == 0 and r.stdout.startswith("#compdef fixedram\n")
    for c in COMMANDS:
        assert c in r.stdout
    zsh = shutil.which("zsh")
    if zsh is not None:  # syntax check where zsh is installed
        assert _run(zsh, "-n", "-c", r.stdout).returncode == 0


def test_receive_help_states_the_peer_timeout() -> None:
    from fixedram.bridge.net import PEEK_TIMEOUT

    r = _run(FIXEDRAM, "receive", "--help")
    assert f"(default {PEEK_TIMEOUT:g})" in " ".join(r.stdout.split())


# -- exit statuses and outputs on real files --------------------------------------------

PS = 4096


def _stream(path: Path, seeds: dict[int, int], finish: bool = True) -> Path:
    """A small sequential stream: one 16-page pc.ram, page -> fill byte (0 = zero page)."""
    from fixedram.format.machine import MachineState
    from fixedram.format.writer import BlockSpec, StreamWriter

    with open(path, "wb") as f:
        w = StreamWriter(f.write, MachineState("pc-q35-10.0", ()), [BlockSpec("pc.ram", 16 * PS)])
        w.begin()
        w.begin_part(end=True)
        for page, seed in seeds.items():
            if seed:
                w.pages(0, page, bytes([seed]) * PS)
            else:
                w.zero(0, page)
        w.end_part()
        if finish:
            w.finish()
    return path


def test_verify_exit_status_is_qemu_img_check_and_compare(tmp_path: Path) -> None:
    a = _stream(tmp_path / "a.mig", {0: 1, 3: 7, 5: 0})
    b = _stream(tmp_path / "b.mig", {0: 1, 3: 8, 5: 0})
    cut = _stream(tmp_path / "cut.mig", {0: 1, 3: 7}, finish=False)
    missing = str(tmp_path / "missing.mig")
    # FILE alone, as qemu-img check: 0 sound, 1 could not be checked, 2 problems found.
    r = _run(FIXEDRAM, "verify", str(a))
    assert r.returncode == 0 and r.stdout == f"{a}: OK\n", r.stderr
    r = _run(FIXEDRAM, "verify", str(cut))
    assert r.returncode == 2 and r.stdout.startswith(f"{cut}: ") and r.stderr == ""
    for args in ([missing], [str(tmp_path)]):
        r = _run(FIXEDRAM, "verify", *args)
        assert r.returncode == 1 and r.stderr.startswith("fixedram: error: "), r
        assert len(r.stderr.splitlines()) == 1 and r.stdout == ""
    # --against, as qemu-img compare: 0 equal, 1 differ, 2 could not compare,
    # 3 an input unsound (never the status of an unreadable one).
    r = _run(FIXEDRAM, "verify", str(a), "--against", str(a))
    assert r.returncode == 0 and "RAM equal" in r.stdout
    r = _run(FIXEDRAM, "verify", str(a), "--against", str(b), "--json")
    doc = json.loads(r.stdout)
    assert r.returncode == 1 and not doc["equal"]
    assert [d["differing_pages"] for d in doc["differences"]] == [[3]]
    r = _run(FIXEDRAM, "verify", str(a), "--against", missing)
    assert r.returncode == 2 and "missing.mig" in r.stderr and r.stdout == ""
    for x, y in ((a, cut), (cut, a)):
        r = _run(FIXEDRAM, "verify", str(x), "--against", str(y))
        assert r.returncode == 3 and f"{cut}: " in r.stdout, r
    # A pipe read in one pass keeps the same statuses.
    with open(b, "rb") as f:
        r = _run(FIXEDRAM, "verify", "-", "--against", str(a), stdin=f)
    assert r.returncode == 1 and "1 differing pages: 3 (0x3000)" in r.stdout
    with open(a, "rb") as f:
        r = _run(FIXEDRAM, "verify", "-", "--against", missing, stdin=f)
    assert r.returncode == 2 and "missing.mig" in r.stderr
    # Other commands keep exit status 1 for errors.
    assert _run(FIXEDRAM, "inspect", missing).returncode == 1


def test_inspect_of_an_incomplete_file_describes_it_and_exits_2(tmp_path: Path) -> None:
    whole = _stream(tmp_path / "whole.mig", {0: 1, 3: 7})
    cut = _stream(tmp_path / "cut.mig", {0: 1, 3: 7}, finish=False)
    r = _run(FIXEDRAM, "inspect", str(whole), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["complete"] is True
    r = _run(FIXEDRAM, "inspect", str(cut), "--json")
    doc = json.loads(r.stdout)
    assert r.returncode == 2 and r.stderr == ""
    assert doc["complete"] is False and doc["blocks"][0]["pages_present"] == 2
    r = _run(FIXEDRAM, "inspect", str(cut))
    assert r.returncode == 2 and "complete: NO" in r.stdout and "pc.ram" in r.stdout
    r = _run("bash", "-c", f"cat {cut} | {FIXEDRAM} inspect - --json")  # a pipe: one pass
    assert r.returncode == 2 and json.loads(r.stdout)["complete"] is False


def test_every_json_document_has_schema_version_1(tmp_path: Path) -> None:
    """The --json of every command: schema_version 1 first, and one name per concept
    (docs/json.md): file sizes are apparent_bytes and allocated_bytes everywhere."""
    a = _stream(tmp_path / "a.mig", {0: 1, 3: 7, 5: 0})
    got = tmp_path / "got.mig"
    saved = tmp_path / "saved.mig"
    with open(a, "rb") as f:
        recv = _run(FIXEDRAM, "receive", "-", "-o", str(got), "--json", stdin=f)
    docs = {
        "inspect": _run(FIXEDRAM, "inspect", str(a), "--json").stdout,
        "verify": _run(FIXEDRAM, "verify", str(a), "--json").stdout,
        "verify --against": _run(FIXEDRAM, "verify", str(a), "--against", str(got),
                                 "--json").stdout,
        "state": _run(FIXEDRAM, "state", str(a), "--json").stdout,
        "map": _run(FIXEDRAM, "map", str(a), "--json").stdout,
        "receive": recv.stdout,
        "send": subprocess.run([FIXEDRAM, "send", str(a), "-", "--json"], text=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               timeout=60).stderr,  # stdout has the stream
        "save": _run(FIXEDRAM, "save", str(saved), "--ram", "4M", "--json").stdout,
        "restore": "",  # of the save, below
        "demo": _run(FIXEDRAM, "demo", "--ram", "4M", "--dir", str(tmp_path / "demo"),
                     "--json").stdout,
    }
    docs["restore"] = _run(FIXEDRAM, "restore", str(saved), "--json", "--checksum").stdout
    for name, text in docs.items():
        doc = json.loads(text)
        assert next(iter(doc)) == "schema_version" and doc["schema_version"] == 1, name
    size = os.stat(got)
    r = json.loads(docs["receive"])
    assert (r["apparent_bytes"], r["allocated_bytes"]) == (size.st_size, size.st_blocks * 512)
    i = json.loads(docs["inspect"])
    assert i["apparent_bytes"] == a.stat().st_size and "allocated_bytes" in i
    for run in json.loads(docs["demo"])["runs"]:
        assert run["apparent_bytes"] > 0 and run["allocated_bytes"] >= 0
    old = ("apparent_size", "allocated_size", "file_apparent_bytes", "file_allocated_bytes",
           "time_s")
    assert not [k for t in docs.values() for k in old if f'"{k}"' in t]
    assert json.loads(docs["restore"])["ram_digest"] == json.loads(docs["save"])["ram_digest"]
    s = json.loads(docs["save"])  # QEMU's query-migrate under QEMU's names, in one key
    assert s["status"] == s["query_migrate"]["status"] == "completed" and s["passes"] >= 1
    assert "total-time" in s["query_migrate"] and "total-time" not in s


def _segments(path: Path) -> list[tuple[int, int, int, bytes]]:
    """(p_type, p_paddr, p_memsz, data) of each program header of an ELF64 core."""
    data = path.read_bytes()
    return [(p_type, pa, memsz, data[off:off + filesz])
            for p_type, off, pa, filesz, memsz in elf_phdrs(data)]


def test_extract_to_stdout(tmp_path: Path) -> None:
    """-o -: physical and ELF images written in order, for a pipe."""
    saved = tmp_path / "saved.mig"
    r = _run(FIXEDRAM, "save", str(saved), "--ram", "4M", "--mapped-ram")
    assert r.returncode == 0, r.stderr
    stream = _stream(tmp_path / "a.mig", {0: 1, 3: 7, 5: 0, 15: 9})
    for src in (saved, stream):
        for fmt in ("physical", "elf"):
            f = tmp_path / f"{src.stem}.{fmt}"
            p = tmp_path / f"{src.stem}-pipe.{fmt}"
            r = _run(FIXEDRAM, "extract", str(src), "--format", fmt, "-o", str(f))
            assert r.returncode == 0, r.stderr
            # Through a pipe: the writer cannot seek.
            r = _run("bash", "-c", f"set -o pipefail; {FIXEDRAM} extract {src} --format {fmt} "
                     f"-o - | cat > {p}")
            assert r.returncode == 0, r.stderr
            if fmt == "physical":
                assert p.read_bytes() == f.read_bytes()
            else:  # same LOADs and notes; the pipe's core keeps no room (nor a PT_NULL
                # slot) for a note found by a later scan
                loads_notes = [[s for s in _segments(x) if s[0] != 0] for x in (p, f)]
                assert loads_notes[0] == loads_notes[1] and p.stat().st_size <= f.stat().st_size
                r = _run("readelf", "-l", str(p))
                assert r.returncode == 0 and "LOAD" in r.stdout and r.stderr == ""
    img = (tmp_path / "a-pipe.physical").read_bytes()
    assert img[:PS] == b"\x01" * PS and img[3 * PS:4 * PS] == b"\x07" * PS
    assert img[15 * PS:] == b"\x09" * PS and img[PS:3 * PS] == bytes(2 * PS)
    # raw is a directory; a pipe as input cannot be random-accessed: one line, no output.
    r = _run(FIXEDRAM, "extract", str(stream), "-o", "-")
    assert r.returncode == 1 and "raw output is a directory" in r.stderr and r.stdout == ""
    r = _run("bash", "-c", f"cat {stream} | {FIXEDRAM} extract - --format physical -o -")
    assert r.returncode == 1 and "cannot go to standard output" in r.stderr and r.stdout == ""
    assert "write it to a file: -o ram.img" in r.stderr  # the way round it


@pytest.mark.qemu
def test_extract_elf_to_stdout_of_a_qemu_save(qemu: str, tmp_path: Path,
                                              guest_image: Path) -> None:
    """A QEMU save with registers and a VMCOREINFO note in guest RAM: the core written to a
    pipe has the notes (found by scanning RAM first) and the LOADs of the core written to a
    file, and gdb reads the same registers from both."""
    from qemu_harness import QemuVM, file_uri
    from test_elf_core import TEXT, _plant, _vmcoreinfo, gdb_registers, read_core

    with QemuVM(tmp_path, guest_image, machine="pc", memory="64M") as vm:
        vm.wait_for_progress(2)
        vm.stop()
        vm.migrate(file_uri(tmp_path / "vm.sav"))
    planted = tmp_path / "planted.sav"
    _plant(tmp_path / "vm.sav", planted, [(0x300000 - 12, _vmcoreinfo(TEXT))])
    f, p = tmp_path / "file.elf", tmp_path / "pipe.elf"
    r = _run(FIXEDRAM, "extract", str(planted), "--format", "elf", "-o", str(f))
    assert r.returncode == 0, r.stderr
    r = _run("bash", "-c", f"set -o pipefail; {FIXEDRAM} extract {planted} --format elf -o - "
             f"| cat > {p}")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    cf, cp = read_core(f), read_core(p)
    assert [(n.name, n.type) for n in cp.notes] == [(b"CORE", 1), (b"QEMU", 0),
                                                    (b"VMCOREINFO", 0)]
    assert cp.notes == cf.notes and cp.notes[-1].desc == TEXT
    assert cp.loads() == cf.loads()
    assert [s for s in _segments(p) if s[0] == 1] == [s for s in _segments(f) if s[0] == 1]
    regs = "pc sp eax eflags cs"
    assert gdb_registers(p, regs) == gdb_registers(f, regs)
