"""Helpers for the bridge tests: a ``fixedram receive`` process and a throttled live source."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qemu_harness import QemuVM, diff_pages, ram_compare_ranges, ram_split
from util import assert_truthful_vmdesc

MIB = 1 << 20
FIXEDRAM = [sys.executable, "-m", "fixedram.cli.main"]


class Receiver:
    """``fixedram receive URI -o OUT --json`` as a child process."""

    def __init__(self, uri: str, out: Path, *extra: str) -> None:
        self.out = out
        self.proc = subprocess.Popen([*FIXEDRAM, "receive", uri, "-o", str(out), "--json",
                                      *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline().decode()
        if "listening on" not in line:
            self.proc.kill()
            raise AssertionError(f"receiver did not start: {line}{self.proc.stderr.read()!r}")
        self.address = line.split("listening on ", 1)[1].strip()

    def wait(self, timeout: float = 60) -> tuple[int, dict[str, Any] | None, str]:
        out, err = self.proc.communicate(timeout=timeout)
        doc = json.loads(out) if self.proc.returncode == 0 else None
        return self.proc.returncode, doc, err.decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class LiveResult:
    stats: dict[str, Any]
    pmem: Path
    machine: str


def migrate_live(vm: QemuVM, uri: str, *, min_transferred: int, min_syncs: int = 3,
                 bandwidth: int = 64 * MIB, caps: dict[str, bool] | None = None,
                 params: dict[str, Any] | None = None, timeout: float = 90) -> LiveResult:
    """Throttled live migration of a re-dirtying guest until it has sent
    ``min_transferred`` bytes in ``min_syncs`` passes, then let it converge."""
    vm.wait_for_progress(2, timeout=30)
    if caps:
        vm.set_caps(**caps)
    vm.set_params(max_bandwidth=bandwidth, downtime_limit=1, **(params or {}))
    vm.qmp("migrate", uri=uri)
    deadline = time.monotonic() + timeout
    while True:
        info = vm.query_migrate()
        if info.get("status") in ("failed", "cancelled", "completed"):
            raise AssertionError(f"migration ended early: {info}\n{vm.log_text()}")
        ram = info.get("ram", {})
        if ram.get("dirty-sync-count", 0) >= min_syncs and ram.get("transferred", 0) >= \
                min_transferred:
            break
        assert time.monotonic() < deadline, f"too slow: {ram}"
        time.sleep(0.05)
    vm.set_params(max_bandwidth=1 << 30, downtime_limit=30_000)
    stats = vm.wait_migration(timeout)
    pmem = vm.pmemsave(0, ram_split(vm.ram_size, vm.machine)[0],
                       vm.workdir / f"{vm.name}.pmem")
    return LiveResult(stats, pmem, vm.machine_name())


def assert_ram_equal(dst: QemuVM, src_pmem: Path, ram_size: int, machine: str) -> None:
    got = dst.pmemsave(0, ram_split(ram_size, machine)[0], dst.workdir / f"{dst.name}.pmem")
    bad = diff_pages(src_pmem.read_bytes(), got.read_bytes(), ram_compare_ranges(ram_size,
                                                                                 machine))
    assert not bad, f"{len(bad)} pages differ from the source, first at 0x{bad[0]:x}"


def assert_bounded(path: Path, ram_size: int) -> None:
    """apparent size <= RAM + 1 MiB per RAMBlock + device state (and the trailer)."""
    from fixedram.format.migfile import MigrationFile

    with MigrationFile(path) as mf:
        assert mf.complete and mf.format == "mapped-ram"
        total = sum(b.used_length for b in mf.blocks)
        devs = sum(d.end - d.offset for d in mf.sections)
        trailer = len(mf.summary.vmdesc.raw) + 5 if mf.summary.vmdesc else 0
        limit = total + len(mf.blocks) * MIB + devs + trailer + 64
        assert mf.block("pc.ram").used_length == ram_size
    size = os.path.getsize(path)
    assert size <= limit, f"{size} > {limit}"
    # The source's vmdesc described a stream; ours describes the mapped-ram file.
    cfg = assert_truthful_vmdesc(path)
    assert cfg["configuration/capabilities"]["capabilities"] == ["mapped-ram"]


def guest_continues(dst: QemuVM) -> None:
    before = dst.progress_count()
    dst.cont()
    dst.wait_for_progress(before + 2, timeout=30)


def pages_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.array_equal(a, b))


def connect_to(address: str) -> socket.socket:
    """A client connection to a receiver's ``unix:PATH`` or ``tcp:HOST:PORT`` address."""
    kind, rest = address.split(":", 1)
    if kind == "unix":
        s = socket.socket(socket.AF_UNIX)
        s.connect(rest)
        return s
    host, port = rest.rsplit(":", 1)
    return socket.create_connection((host.strip("[]"), int(port)))
