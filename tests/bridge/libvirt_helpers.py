"""Helpers for the libvirt tests: libvirtd, one boot-sector domain, virsh and QMP through it,
and ``fixedram`` as a child process.

libvirtd is started by scripts/start-libvirt.sh; without it the tests fail, never skip."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bridge_helpers import FIXEDRAM, MIB

from fixedram.format.libvirt import LibvirtHeader, probe_libvirt
from qemu_harness import diff_pages, qemu_binary, ram_compare_ranges

RAM = 128 * MIB
ROOT = Path(__file__).resolve().parents[2]
VIRSH = ["virsh", "-c", "qemu:///system"]


def start_libvirt() -> None:
    """libvirtd up (installed when missing), or the test fails."""
    p = subprocess.run(["bash", str(ROOT / "scripts" / "start-libvirt.sh")], capture_output=True,
                       text=True, check=False, timeout=600)
    if p.returncode != 0:
        pytest.fail(f"libvirt unavailable: {p.stderr.strip()}", pytrace=False)


def virsh(*args: str, timeout: float = 120) -> str:
    p = subprocess.run([*VIRSH, *args], capture_output=True, text=True, check=False,
                       timeout=timeout)
    if p.returncode != 0:
        pytest.fail(f"virsh {' '.join(args)}: {p.stderr.strip()}", pytrace=False)
    return p.stdout


def destroy(name: str) -> None:
    """Stop the domain if it still runs (teardown: never fails)."""
    subprocess.run([*VIRSH, "destroy", name], capture_output=True, check=False)


def domain_dir(tmp_path_factory: pytest.TempPathFactory, basename: str,
               guest: Path) -> tuple[Path, Path]:
    """A directory QEMU (run by libvirtd) can read, with a private copy of the guest disk."""
    d = tmp_path_factory.mktemp(basename)
    os.chmod(d, 0o755)
    disk = d / "disk.img"
    shutil.copyfile(guest, disk)
    return d, disk


def define_domain(d: Path, disk: Path, prefix: str, ram: int = RAM) -> tuple[str, Path]:
    """``virsh create`` of a transient pc domain booting ``disk``: one vCPU, ``ram`` bytes,
    the serial port to a file (the guest's progress), no USB and no balloon (fewer devices in
    its migration stream). Returns its name and the serial file."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    serial = d / "serial.txt"
    xml = d / "dom.xml"
    xml.write_text(f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{ram >> 20}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <devices>
    <emulator>{qemu_binary()}</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/>
      <source file='{disk}'/><target dev='hda' bus='ide'/></disk>
    <controller type='usb' model='none'/>
    <serial type='file'><source path='{serial}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
""")
    virsh("create", str(xml))
    return name, serial


@dataclass
class LibvirtDomain:
    dir: Path
    disk: Path  # the domain's own copy of the guest disk
    name: str
    serial: Path


@contextlib.contextmanager
def running_domain(tmp_path_factory: pytest.TempPathFactory, basename: str, guest: Path,
                   prefix: str, ram: int = RAM) -> Iterator[LibvirtDomain]:
    """libvirtd started, then ``define_domain`` in a fresh directory; destroyed at exit."""
    start_libvirt()
    d, disk = domain_dir(tmp_path_factory, basename, guest)
    name, serial = define_domain(d, disk, prefix, ram)
    try:
        yield LibvirtDomain(d, disk, name, serial)
    finally:
        destroy(name)


def progress(serial: Path) -> int:
    """Passes the guest has written so far (one 'P' each)."""
    return serial.read_bytes().count(b"P") if serial.exists() else 0


def wait_progress(serial: Path, more: int, timeout: float = 60) -> None:
    """The guest writes ``more`` further passes (the serial file may restart at a restore)."""
    start = progress(serial)
    deadline = time.monotonic() + timeout
    while True:
        now = progress(serial)
        if now >= start + more or (now < start and now >= more):
            return
        assert time.monotonic() < deadline, "the libvirt guest made no progress"
        time.sleep(0.1)


def qmp(name: str, command: str, **arguments: Any) -> Any:
    """A QMP command to the domain's QEMU (``virsh qemu-monitor-command``); its return."""
    cmd: dict[str, Any] = {"execute": command}
    if arguments:
        cmd["arguments"] = arguments
    out = json.loads(virsh("qemu-monitor-command", name, json.dumps(cmd)))
    assert "error" not in out, (command, out)
    return out["return"]


def pmemsave(name: str, path: Path, size: int = RAM) -> Path:
    """QEMU's own copy of the domain's first ``size`` bytes of guest-physical memory."""
    qmp(name, "pmemsave", val=0, size=size, filename=str(path))
    return path


def assert_same_ram(ref: Path, other: Path | np.ndarray, machine: str, ram: int = RAM) -> None:
    """``other`` holds ``ref``'s RAM (a pmemsave) in every page the guest cannot change."""
    want = ref.read_bytes()
    got = other if isinstance(other, np.ndarray) else np.memmap(other, dtype=np.uint8, mode="r")
    bad = diff_pages(want, got[:len(want)].data, ram_compare_ranges(ram, machine))
    assert not bad, f"{len(bad)} pages differ from {ref.name}, first at 0x{bad[0]:x}"


def libvirt_header(path: Path) -> LibvirtHeader | None:
    with open(path, "rb") as f:
        fd = f.fileno()
        return probe_libvirt(fd, os.fstat(fd).st_size, str(path), allow_compressed=True)


def cli(*args: str, stdin: Path | bytes | None = None,
        limit: int | None = None) -> subprocess.CompletedProcess[str]:
    """fixedram ARGS; ``stdin`` (a file's or the bytes' first ``limit`` bytes) through a real
    pipe, fed from a thread so that an early exit of fixedram is seen as such."""
    p = subprocess.Popen([*FIXEDRAM, *args],
                         stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if stdin is not None:
        pipe, p.stdin = p.stdin, None
        assert pipe is not None

        def feed() -> None:
            try:
                data = stdin.read_bytes() if isinstance(stdin, Path) else stdin
                pipe.write(data[:limit] if limit is not None else data)
            except BrokenPipeError:
                pass
            finally:
                with contextlib.suppress(BrokenPipeError):
                    pipe.close()

        threading.Thread(target=feed, daemon=True).start()
    try:
        out, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise
    return subprocess.CompletedProcess(p.args, p.returncode, out.decode(), err.decode())


def one_error_line(p: subprocess.CompletedProcess[str], *words: str, status: int = 1) -> str:
    """The CLI failed with exit ``status`` (1 could not, 2 a malformed or incomplete save)
    and exactly one ``fixedram: error:`` line naming ``words``."""
    assert p.returncode == status, p.stdout + p.stderr
    line, = p.stderr.strip().splitlines()
    assert line.startswith("fixedram: error: "), line
    for w in words:
        assert w in line, (w, line)
    return line
