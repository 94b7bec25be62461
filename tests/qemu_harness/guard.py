"""The real-QEMU guard: tests that need QEMU fail (never skip) when it is missing."""

from __future__ import annotations

import subprocess

import pytest

from .vm import qemu_binary

MIN_QEMU = (9, 1)  # mapped-ram 9.0, direct-io 9.1; the reference layout is 10.0


def _qemu_problem() -> str | None:
    binary = qemu_binary()
    if binary is None:
        return ("qemu-system-x86_64 not found in PATH: install QEMU 10 with "
                "scripts/install-qemu.sh (QEMU tests fail, never skip)")
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    try:
        ver = tuple(int(x) for x in out.stdout.split("version ")[1].split()[0].split(".")[:2])
    except (IndexError, ValueError):
        return f"cannot parse `{binary} --version`: {out.stdout!r} {out.stderr!r}"
    if ver < MIN_QEMU:
        return f"{binary} is QEMU {ver}, need >= {MIN_QEMU}"
    return None


_problem: list[str | None] = []


def require_qemu() -> str:
    """pytest.fail (not skip) unless a usable QEMU is installed; return its path."""
    if not _problem:
        _problem.append(_qemu_problem())
    if _problem[0]:
        pytest.fail(_problem[0], pytrace=False)
    binary = qemu_binary()
    assert binary
    return binary
