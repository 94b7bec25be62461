"""A real Linux guest for the real-QEMU tests, and the saves made from it.

Debian bookworm's kernel (fetched by scripts/fetch-linux-guest.sh, KASLR on as Debian ships it)
boots with ``-kernel`` and an initramfs built here: busybox-static plus an ``/init`` script that
prints a marker with ``uname -r`` on ttyS0 and then keeps re-writing a tmpfs file, printing a tick
marker every loop, so a live save has re-dirtied pages.

``make_artifacts(DIR)`` (or ``python tests/qemu_harness/linux.py --out DIR``) boots one q35 VM
and writes into DIR, from one paused VM state: ``paused-stream.sav``, ``paused-mapped.sav``,
``qemu-dump.elf`` (QMP dump-guest-memory), ``info-registers.txt`` (HMP), ``pmem.bin`` (pmemsave
of RAM below 4 GiB); then, with the guest running its workload again, ``live-stream.sav`` and
``live-mapped.sav``; then ``meta.json``, ``serial.log`` and last ``READY``.

QEMU 10 refuses a second ``migrate`` once the first completed ('postmigrate'), so
``paused-mapped.sav`` is saved by a second VM that loaded ``paused-stream.sav`` and showed the
same ``info registers`` and the same RAM (pmemsave) as the first before saving.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

if __package__:
    from .vm import (
        CONVERGE_BANDWIDTH,
        CONVERGE_DOWNTIME_MS,
        MigrationFailed,
        QemuError,
        QemuVM,
        _wait_passes,
        file_uri,
        ram_compare_ranges,
        ram_split,
    )
else:  # run as a script: python tests/qemu_harness/linux.py --out DIR
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from qemu_harness.vm import (
        CONVERGE_BANDWIDTH,
        CONVERGE_DOWNTIME_MS,
        MigrationFailed,
        QemuError,
        QemuVM,
        _wait_passes,
        file_uri,
        ram_compare_ranges,
        ram_split,
    )

REPO = Path(__file__).resolve().parents[2]
FETCH_SCRIPT = REPO / "scripts" / "fetch-linux-guest.sh"

READY_MARKER = "FIXEDRAM-LINUX-READY"  # "FIXEDRAM-LINUX-READY release=6.1.0-NN-amd64"
TICK_MARKER = "FIXEDRAM-LINUX-TICK"  # "FIXEDRAM-LINUX-TICK <n>", once per workload loop
_READY_RE = re.compile(READY_MARKER + r" release=(\S+)\r?\n")
_TICK_RE = re.compile(TICK_MARKER + r" (\d+)\r?\n")

DEFAULT_MACHINE = "q35"
DEFAULT_MEMORY = "256M"
# panic=-1 with -no-reboot: a kernel panic ends QEMU at once instead of hanging until timeout.
DEFAULT_APPEND = "console=ttyS0 panic=-1 loglevel=6"
BOOT_TIMEOUT = 120.0  # TCG on 2 busy cores; a normal boot takes a few seconds
LIVE_BANDWIDTH = 32 << 20  # bytes/s: the first pass of the ~50 MiB non-zero RAM takes ~1-2 s
LIVE_MIN_SYNCS = 3  # bitmap syncs before switchover: at least two passes in the file
WORKLOAD_KIB = 2048  # re-written per loop into /tmp/work (tmpfs)

ARTIFACTS = {
    "paused_stream": "paused-stream.sav",
    "paused_mapped": "paused-mapped.sav",
    "live_stream": "live-stream.sav",
    "live_mapped": "live-mapped.sav",
    "qemu_dump": "qemu-dump.elf",
    "info_registers": "info-registers.txt",
    "pmem": "pmem.bin",
    "serial": "serial.log",
    "meta": "meta.json",
}
READY_FILE = "READY"


class LinuxGuestMissing(QemuError):
    """The kernel or busybox is not there and could not be fetched."""


# ---- guest files -------------------------------------------------------------------------------
def default_guest_dir() -> Path:
    return Path(os.environ.get("FIXEDRAM_LINUX_GUEST_DIR", REPO / ".cache" / "linux-guest"))


class GuestFiles(NamedTuple):
    vmlinuz: Path  # Debian's bzImage
    busybox: Path  # busybox-static
    fw_cfg_module: Path  # qemu_fw_cfg.ko of that kernel: with QEMU's vmcoreinfo device (opt-in)
    # it hands over the kernel's VMCOREINFO address, so dump-guest-memory carries the note


def guest_files(directory: Path | None = None, fetch: bool = True) -> GuestFiles:
    """The guest's files in ``directory``; runs scripts/fetch-linux-guest.sh when missing."""
    d = Path(directory) if directory else default_guest_dir()
    files = GuestFiles(d / "vmlinuz", d / "busybox", d / "qemu_fw_cfg.ko")
    if fetch and not all(p.is_file() for p in files):
        r = subprocess.run(["bash", os.fspath(FETCH_SCRIPT), os.fspath(d)],
                           capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise LinuxGuestMissing(f"{FETCH_SCRIPT.name} {d} failed ({r.returncode}):\n"
                                    f"{r.stdout}{r.stderr}")
    for p in files:
        if not p.is_file():
            raise LinuxGuestMissing(f"{p} missing: run scripts/fetch-linux-guest.sh {d}")
    return files


# ---- initramfs ---------------------------------------------------------------------------------
def cpio_newc(entries: Iterable[tuple[str, int, bytes, int]]) -> bytes:
    """A newc ("070701") cpio archive of (name, mode, data, rdev) entries, as the kernel unpacks.

    Directories and device nodes carry no data; rdev is (major << 8 | minor) for device nodes.
    """
    out = bytearray()

    def pad4() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    def member(ino: int, name: str, mode: int, data: bytes, rdev: int) -> None:
        fname = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data), 0, 0,
                  rdev >> 8, rdev & 0xFF, len(fname), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + fname)
        pad4()
        out.extend(data)
        pad4()

    ino = 0
    for ino, (name, mode, data, rdev) in enumerate(entries, start=1):
        member(ino, name, mode, data, rdev)
    member(ino + 1, "TRAILER!!!", 0, b"", 0)
    return bytes(out)


INIT_SCRIPT = f"""#!/bin/busybox sh
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o size=16m tmpfs /tmp
for m in /lib/modules/*.ko; do
    if [ -e "$m" ]; then insmod "$m" || echo "insmod $m failed"; fi
done
echo "{READY_MARKER} release=$(uname -r)"
# The workload: re-write the same tmpfs pages without pause, so that every pass of a live save
# finds more dirty pages than its downtime allows and a switchover waits for the harness.
i=0
while :; do
    dd if=/dev/urandom of=/tmp/work bs=1024 count={WORKLOAD_KIB} conv=notrunc 2>/dev/null
    i=$((i + 1))
    echo "{TICK_MARKER} $i"
done
"""


def build_initramfs(busybox: Path, path: Path, modules: Iterable[Path] = ()) -> Path:
    """Write an uncompressed newc initramfs with busybox, /init and the modules /init loads."""
    d, reg, chr_ = stat.S_IFDIR | 0o755, stat.S_IFREG, stat.S_IFCHR | 0o600
    entries = [(name, d, b"", 0) for name in ("bin", "sbin", "usr", "usr/bin", "usr/sbin",
                                              "proc", "sys", "dev", "tmp", "lib", "lib/modules")]
    entries += [(f"lib/modules/{Path(m).name}", reg | 0o644, Path(m).read_bytes(), 0)
                for m in modules]
    # The kernel opens /dev/console for init before devtmpfs is mounted.
    entries += [("dev/console", chr_, b"", 5 << 8 | 1),
                ("bin/busybox", reg | 0o755, Path(busybox).read_bytes(), 0),
                ("init", reg | 0o755, INIT_SCRIPT.encode(), 0)]
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(cpio_newc(entries))
    tmp.replace(path)
    return path


# ---- the VM ------------------------------------------------------------------------------------
class LinuxGuest(QemuVM):
    """QemuVM booting ``-kernel vmlinuz -initrd initramfs``, no disk, serial to a file.

    ``vmcoreinfo=True`` adds QEMU's vmcoreinfo device, which the guest fills in when its initramfs
    has the qemu_fw_cfg module (build_initramfs modules=); then QEMU's dump carries VMCOREINFO.
    """

    def __init__(self, workdir: str | os.PathLike[str], kernel: Path, initrd: Path, *,
                 machine: str = DEFAULT_MACHINE, memory: str | int = DEFAULT_MEMORY,
                 append: str = DEFAULT_APPEND, name: str = "linux", vmcoreinfo: bool = False,
                 extra_args: Iterable[str] = (), **kw: Any) -> None:
        args = ["-kernel", os.fspath(kernel), "-initrd", os.fspath(initrd),
                "-append", append, "-no-reboot"]
        if vmcoreinfo:
            args += ["-device", "vmcoreinfo"]
        args += extra_args
        super().__init__(workdir, None, machine=machine, memory=memory, name=name,
                         extra_args=args, **kw)

    def kernel_release(self) -> str | None:
        m = _READY_RE.search(self.serial_text())
        return m.group(1) if m else None

    def ticks(self) -> int:
        """The workload's latest loop number seen on the serial port (0 before the first)."""
        found = _TICK_RE.findall(self.serial_text())
        return int(found[-1]) if found else 0

    def _wait(self, what: str, done: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            v = done()
            if v:
                return v
            if not self.is_running():
                raise QemuError(f"{self.name}: QEMU exited while waiting for {what}\n"
                                f"{self.log_text()}\n--- serial ---\n{self.serial_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise QemuError(f"{self.name}: no {what} in {timeout:.0f}s\n"
                                f"--- serial ---\n{self.serial_text()[-3000:]}")
            time.sleep(0.1)

    def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> str:
        """Wait for the boot marker; return the guest's ``uname -r``."""
        return str(self._wait(READY_MARKER, self.kernel_release, timeout))

    def wait_ticks(self, n: int, timeout: float = 60.0) -> int:
        """Wait until the workload has run ``n`` more loops than now; return the tick number."""
        target = self.ticks() + n
        return int(self._wait(f"{TICK_MARKER} {target}",
                              lambda: self.ticks() if self.ticks() >= target else 0, timeout))


# ---- the artifacts -----------------------------------------------------------------------------
@dataclass(frozen=True)
class LinuxArtifacts:
    """The files make_artifacts wrote (Paths) and what they were made from."""

    dir: Path
    paused_stream: Path
    paused_mapped: Path
    live_stream: Path
    live_mapped: Path
    qemu_dump: Path
    pmem: Path
    serial: Path
    meta_path: Path
    info_registers: str  # HMP `info registers` of the paused VM
    machine: str  # resolved, e.g. 'pc-q35-10.0'
    ram_size: int  # bytes
    kernel_release: str  # the guest's `uname -r`
    meta: dict[str, Any]

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> LinuxArtifacts:
        """Open a directory make_artifacts completed (it has READY)."""
        d = Path(directory)
        if not (d / READY_FILE).exists():
            raise FileNotFoundError(f"{d / READY_FILE}: artifacts not complete")
        meta = json.loads((d / ARTIFACTS["meta"]).read_text())
        files = {k: d / v for k, v in ARTIFACTS.items() if k not in ("info_registers", "meta")}
        return cls(dir=d, meta_path=d / ARTIFACTS["meta"],
                   info_registers=(d / ARTIFACTS["info_registers"]).read_text(),
                   machine=meta["machine"], ram_size=meta["ram_size"],
                   kernel_release=meta["kernel_release"], meta=meta, **files)

    @property
    def compare_ranges(self) -> list[tuple[int, int]]:
        """Guest-physical ranges where pmem.bin shows pc.ram (see vm.ram_compare_ranges)."""
        return ram_compare_ranges(self.ram_size, self.machine)


def _unlink(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _save(vm: LinuxGuest, path: Path, mapped: bool, live: bool,
          timeout: float) -> dict[str, Any]:
    """One migrate to file:path; live saves are throttled until several passes happened."""
    _unlink(path)
    vm.set_caps(mapped_ram=mapped)
    if not live:
        vm.set_params(max_bandwidth=CONVERGE_BANDWIDTH, downtime_limit=CONVERGE_DOWNTIME_MS)
        return vm.migrate(file_uri(path), timeout=timeout)
    vm.set_params(max_bandwidth=LIVE_BANDWIDTH, downtime_limit=1)
    for attempt in range(3):
        vm.migrate(file_uri(path), wait=False)
        try:
            _wait_passes(vm, LIVE_MIN_SYNCS, 0, timeout)
            break
        except MigrationFailed as e:
            # Converged before enough passes (the workload was starved of CPU): run again.
            if e.info.get("status") != "completed" or attempt == 2:
                raise
            vm.cont()
            vm.wait_ticks(1)
            _unlink(path)
    vm.set_params(max_bandwidth=CONVERGE_BANDWIDTH, downtime_limit=CONVERGE_DOWNTIME_MS)
    return vm.wait_migration(timeout)


def _check_same_state(vm: LinuxGuest, regs: str, pmem: Path, size: int) -> None:
    """Fail unless ``vm`` shows the registers ``regs`` and the RAM ``pmem`` (below 4 GiB)."""
    mine = vm.qmp("human-monitor-command", command_line="info registers")
    if mine != regs:
        raise QemuError(f"{vm.name}: info registers differ from the source:\n{mine}\n---\n{regs}")
    check = pmem.with_name(f"{vm.name}.pmem")
    _unlink(check)
    vm.pmemsave(0, size, check)
    try:
        if check.read_bytes() != pmem.read_bytes():
            raise QemuError(f"{vm.name}: RAM differs from the source's pmemsave")
    finally:
        _unlink(check)


def make_artifacts(out: str | os.PathLike[str], *, guest_dir: Path | None = None,
                   machine: str = DEFAULT_MACHINE, memory: str | int = DEFAULT_MEMORY,
                   timeout: float = BOOT_TIMEOUT, vmcoreinfo: bool = False,
                   log: Any = None) -> LinuxArtifacts:
    """Boot the Linux guest once and write every artifact into ``out`` (READY last).

    By default as the tests use it: no vmcoreinfo device, so QEMU's dump has no VMCOREINFO note
    (tools must find the kernel's VMCOREINFO in RAM); ``vmcoreinfo=True`` adds the device and
    loads the guest's qemu_fw_cfg module.
    """
    say = log or (lambda msg: None)
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    _unlink(out / READY_FILE)
    files = {k: out / v for k, v in ARTIFACTS.items()}
    t0 = time.monotonic()
    vmlinuz, busybox, fw_cfg = guest_files(guest_dir)
    initrd = build_initramfs(busybox, out / "initramfs.cpio", [fw_cfg] if vmcoreinfo else [])
    with LinuxGuest(out, vmlinuz, initrd, machine=machine, memory=memory,
                    vmcoreinfo=vmcoreinfo) as vm:
        release = vm.wait_ready(timeout)
        say(f"booted {release} in {time.monotonic() - t0:.1f}s")
        vm.wait_ticks(2, timeout)  # settled: the workload has looped
        version = vm.qmp("query-version")
        resolved = vm.machine_name()

        # -- the paused VM: every artifact below is of this one state --
        vm.stop()
        ticks_at_stop = vm.ticks()
        regs = vm.qmp("human-monitor-command", command_line="info registers")
        files["info_registers"].write_text(regs)
        low, _ = ram_split(vm.ram_size, resolved)
        _unlink(files["pmem"], files["qemu_dump"])
        vm.pmemsave(0, low, files["pmem"])
        vm.qmp("dump-guest-memory", paging=False, protocol=f"file:{files['qemu_dump']}",
               format="elf")
        paused = {"paused_stream": _save(vm, files["paused_stream"], False, live=False,
                                         timeout=timeout)}
        # QEMU refuses a second migrate from 'postmigrate', and 'cont' would change the state:
        # the mapped-ram save is made by a second VM that loaded the stream save (so the same
        # guest state), checked against this VM's registers and RAM before it is saved.
        with LinuxGuest(out, vmlinuz, initrd, machine=machine, memory=memory,
                        vmcoreinfo=vmcoreinfo, name="reloaded", incoming=True,
                        paused=True) as vm2:
            vm2.migrate_incoming(file_uri(files["paused_stream"]), timeout=timeout)
            _check_same_state(vm2, regs, files["pmem"], low)
            paused["paused_mapped"] = _save(vm2, files["paused_mapped"], True, live=False,
                                            timeout=timeout)
        say(f"paused artifacts done at {time.monotonic() - t0:.1f}s")

        # -- live saves: the guest runs its workload again between and during them --
        live: dict[str, Any] = {}
        for key, mapped in (("live_stream", False), ("live_mapped", True)):
            vm.cont()
            vm.wait_ticks(1, timeout)
            live[key] = _save(vm, files[key], mapped, live=True, timeout=timeout)
            say(f"{key}: {live[key]['ram']['dirty-sync-count']} syncs, "
                f"{live[key]['ram']['transferred']} bytes")
        files["serial"].write_bytes(vm.serial_path.read_bytes())
    qemu_ver = version["qemu"]
    meta = {
        "machine": resolved,
        "machine_alias": machine,
        "ram_size": vm.ram_size,
        "ram_below_4g": low,
        "kernel_release": release,
        "kernel_package": _read_optional(vmlinuz.parent / "kernel-package"),
        "append": DEFAULT_APPEND,
        "kaslr": "nokaslr" not in DEFAULT_APPEND,
        "vmcoreinfo": vmcoreinfo,
        "accel": vm.accel,
        "qemu_version": f"{qemu_ver['major']}.{qemu_ver['minor']}.{qemu_ver['micro']}",
        "qemu_package": version.get("package", ""),
        "ticks_at_stop": ticks_at_stop,
        "paused_mapped_from": "paused-stream.sav loaded into a second VM, same registers and RAM",
        "files": {k: v for k, v in ARTIFACTS.items()},
        "paths": {k: os.fspath(files[k]) for k in ARTIFACTS},
        "kernel": os.fspath(vmlinuz),
        "initrd": os.fspath(initrd),
        "migrate_stats": {**paused, **live},
        "seconds": round(time.monotonic() - t0, 1),
    }
    tmp = files["meta"].with_name("meta.json.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(files["meta"])
    (out / READY_FILE).write_text("ok\n")
    say(f"all artifacts in {out} after {meta['seconds']}s")
    return LinuxArtifacts.load(out)


def _read_optional(p: Path) -> str:
    try:
        return p.read_text().strip()
    except FileNotFoundError:
        return ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="directory for the artifacts")
    ap.add_argument("--guest-dir", type=Path, default=None,
                    help="where vmlinuz and busybox are (default .cache/linux-guest)")
    ap.add_argument("--machine", default=DEFAULT_MACHINE)
    ap.add_argument("--memory", default=DEFAULT_MEMORY)
    ap.add_argument("--vmcoreinfo", action="store_true",
                    help="add QEMU's vmcoreinfo device (not what the tests use)")
    a = ap.parse_args(argv)
    arts = make_artifacts(a.out, guest_dir=a.guest_dir, machine=a.machine, memory=a.memory,
                          vmcoreinfo=a.vmcoreinfo,
                          log=lambda m: print(m, file=sys.stderr, flush=True))
    print(arts.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
