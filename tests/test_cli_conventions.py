"""Command-line conventions: --version, python -m fixedram, completion scripts, --help examples,
and a startup that does not import numpy or rich."""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

FIXEDRAM = str(Path(sys.executable).with_name("fixedram"))
COMMANDS = ("inspect", "extract", "convert", "verify", "demo", "save", "restore", "guest",
            "receive", "send", "state", "map", "completion")
# Commands whose --help ends with examples.
WITH_EXAMPLES = ("inspect", "extract", "receive", "send", "state", "map", "completion")


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
