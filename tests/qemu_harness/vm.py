"""Drive a real ``qemu-system-x86_64`` through QMP (``qemu.qmp.QMPClient``) on a unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from qemu.qmp import ExecuteError, QMPClient

from .guest import (
    DEFAULT_MEM_END,
    MIB,
    PROGRESS_MARKER,
    START_MARKER,
    GuestParams,
    read_params,
    write_bootsector,
)

QEMU_BINARY = os.environ.get("FIXEDRAM_QEMU", "qemu-system-x86_64")

# query-migrate states after which nothing changes any more.
_FINAL_STATES = {"completed", "failed", "cancelled"}


class QemuError(RuntimeError):
    """QEMU died, a QMP command failed, or a migration failed; carries QEMU's own message."""


class MigrationFailed(QemuError):
    def __init__(self, message: str, info: dict[str, Any], log: str) -> None:
        super().__init__(f"{message}\n--- QEMU log ---\n{log}" if log else message)
        self.error_desc = info.get("error-desc", "")
        self.info = info
        self.log = log


def qemu_binary() -> str | None:
    """Full path of the QEMU binary, or None when it is not installed."""
    return shutil.which(QEMU_BINARY)


def parse_size(size: str | int) -> int:
    """'128M' / '1G' / 134217728 -> bytes (QEMU's -m suffix convention, default unit MiB)."""
    if isinstance(size, int):
        return size
    s = size.strip().upper().removesuffix("B")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if s and s[-1] in units:
        return int(float(s[:-1]) * units[s[-1]])
    return int(s) << 20  # plain -m numbers are MiB


def file_uri(path: str | os.PathLike[str], offset: int = 0) -> str:
    uri = f"file:{os.fspath(path)}"
    return f"{uri},offset={offset}" if offset else uri


class QemuVM:
    """One QEMU process with a synchronous QMP facade.

    The asyncio ``QMPClient`` runs on a private event loop owned by this object, so tests just call
    ``vm.qmp("query-status")``.  Use as a context manager: on exit QEMU is quit/killed, the QMP
    connection closed, and the stderr log kept in ``workdir``.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        image: str | os.PathLike[str] | None,
        *,
        machine: str = "pc",
        memory: str | int = "128M",
        accel: str = "tcg",
        incoming: bool = False,
        paused: bool = False,
        name: str = "vm",
        extra_args: Iterable[str] = (),
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.image = Path(image) if image is not None else None  # None: no disk (-kernel boots)
        self.machine = machine
        self.ram_size = parse_size(memory)
        self.accel = accel
        self.incoming = incoming
        self.paused = paused
        self.name = name
        self.extra_args = list(extra_args)
        self.qmp_path = self.workdir / f"{name}.qmp"
        self.serial_path = self.workdir / f"{name}.serial"
        self.log_path = self.workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: QMPClient | None = None

    # ---- process lifecycle -------------------------------------------------------------
    def command_line(self) -> list[str]:
        binary = qemu_binary()
        if binary is None:
            raise QemuError(f"{QEMU_BINARY} not found in PATH")
        args = [
            binary,
            "-machine", self.machine,
            "-accel", self.accel,
            "-m", str(self.ram_size >> 20) + "M",
            "-nodefaults", "-display", "none", "-vga", "none",
            "-serial", f"file:{self.serial_path}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]  # fmt: skip
        if self.image is not None:
            # A raw IDE disk with just our boot sector; snapshot=on so that source and destination
            # (and parallel tests) can share the image without fighting over its write lock.
            args += ["-drive", f"file={self.image},format=raw,if=ide,snapshot=on"]
        if self.incoming:
            args += ["-incoming", "defer"]
        if self.paused:
            args.append("-S")
        return args + self.extra_args

    def launch(self, timeout: float = 30.0) -> QemuVM:
        for p in (self.qmp_path, self.serial_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command_line(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C of pytest must not hit QEMU mid-save
            )
        self._loop = asyncio.new_event_loop()
        deadline = time.monotonic() + timeout
        last_err: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise QemuError(f"QEMU exited with {self.proc.returncode}\n{self.log_text()}")
            if self.qmp_path.exists():
                client = QMPClient(self.name)
                try:
                    self._run(client.connect(os.fspath(self.qmp_path)))
                except Exception as e:  # socket may exist before QEMU listens
                    last_err = e
                else:
                    self._client = client
                    return self
            time.sleep(0.02)
        self.kill()
        raise QemuError(f"cannot connect to QMP at {self.qmp_path}: {last_err}\n{self.log_text()}")

    def __enter__(self) -> QemuVM:
        if self.proc is None:
            self.launch()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask QEMU to quit, kill it if it does not, close the QMP connection and the loop."""
        if self._client is not None and self.is_running():
            with contextlib.suppress(Exception):
                self._run(asyncio.wait_for(self._client.execute("quit"), timeout))
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._run(asyncio.wait_for(self._client.disconnect(), timeout))
            self._client = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        """QEMU's stdout+stderr so far (load errors of -incoming land here)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # ---- QMP -------------------------------------------------------------------------
    def _run(self, coro: Any) -> Any:
        assert self._loop is not None, "VM not launched"
        return self._loop.run_until_complete(coro)

    def qmp(self, cmd: str, **args: Any) -> Any:
        """Execute a QMP command; keyword names are the QMP argument names ('_' -> '-')."""
        if self._client is None:
            raise QemuError("VM not launched")
        # A few QMP commands spell arguments with '_' (none we use): pass those via qmp_raw.
        arguments = {k.replace("_", "-"): v for k, v in args.items()}
        return self.qmp_raw(cmd, arguments)

    def qmp_raw(self, cmd: str, arguments: dict[str, Any] | None = None) -> Any:
        if self._client is None:
            raise QemuError("VM not launched")
        try:
            return self._run(self._client.execute(cmd, arguments or None))
        except ExecuteError as e:
            raise QemuError(f"QMP {cmd} failed: {e.error_class}: {e}") from e
        except Exception as e:
            # A dropped connection usually means QEMU is exiting: give it a moment to finish.
            if self.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(2)
            if not self.is_running():
                raise QemuError(f"QEMU died during {cmd}\n{self.log_text()}") from e
            raise

    def events(self) -> list[dict[str, Any]]:
        """Drain the QMP events received so far."""
        assert self._client is not None
        out: list[dict[str, Any]] = []
        q = self._client.events._queue  # no public non-blocking drain in qemu.qmp 0.0.6
        while not q.empty():
            out.append(dict(q.get_nowait()))
        return out

    # ---- convenience -------------------------------------------------------------------
    def status(self) -> str:
        return str(self.qmp("query-status")["status"])

    def stop(self) -> None:
        self.qmp("stop")

    def cont(self) -> None:
        self.qmp("cont")

    def machine_name(self) -> str:
        """The resolved machine type name (e.g. 'pc-i440fx-10.0' for 'pc')."""
        machines = self.qmp("query-machines")
        for m in machines:
            if m["name"] == self.machine or m.get("alias") == self.machine:
                return str(m["name"])
        raise QemuError(f"machine {self.machine} not in query-machines")

    def set_caps(self, **caps: bool) -> None:
        """set_caps(mapped_ram=True, multifd=True) — names as QMP, '_' may stand for '-'."""
        self.qmp(
            "migrate-set-capabilities",
            capabilities=[{"capability": k.replace("_", "-"), "state": bool(v)}
                          for k, v in caps.items()],
        )

    def set_params(self, **params: Any) -> None:
        """set_params(multifd_channels=4, max_bandwidth=64 << 20, downtime_limit=10)."""
        self.qmp("migrate-set-parameters", **params)

    def query_migrate(self) -> dict[str, Any]:
        return dict(self.qmp("query-migrate"))

    def wait_migration(self, timeout: float = 120.0, poll: float = 0.05) -> dict[str, Any]:
        """Poll query-migrate until a final state; raise MigrationFailed unless 'completed'."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = self.query_migrate()
            except QemuError:
                if self.is_running():
                    raise
                raise MigrationFailed(f"{self.name}: QEMU exited during migration",
                                      {"status": "failed"}, self.log_text()) from None
            st = info.get("status")
            if st in _FINAL_STATES:
                if st != "completed":
                    raise MigrationFailed(
                        f"{self.name}: migration {st}: {info.get('error-desc', '')}",
                        info, self.log_text())
                return info
            if not self.is_running():
                raise MigrationFailed(f"{self.name}: QEMU exited during migration",
                                      {"status": "failed"}, self.log_text())
            if time.monotonic() > deadline:
                raise QemuError(f"{self.name}: migration still {st} after {timeout}s: {info}")
            time.sleep(poll)

    def migrate(self, uri: str, wait: bool = True, timeout: float = 120.0) -> dict[str, Any]:
        """Start an outgoing migration; with wait, return the final query-migrate dict."""
        self.qmp("migrate", uri=uri)
        return self.wait_migration(timeout) if wait else self.query_migrate()

    def migrate_incoming(self, uri: str, wait: bool = True, timeout: float = 120.0,
                         exit_on_error: bool = False) -> dict[str, Any]:
        """migrate-incoming on a '-incoming defer' VM; with wait, until the load completed.

        exit-on-error is off by default so that a failed load leaves QEMU alive with status
        'failed' and error-desc in query-migrate (QEMU also prints the detail to stderr).
        """
        self.qmp("migrate-incoming", uri=uri, exit_on_error=exit_on_error)
        return self.wait_migration(timeout) if wait else self.query_migrate()

    def pmemsave(self, addr: int, size: int, path: str | os.PathLike[str]) -> Path:
        """Dump guest-physical memory [addr, addr+size) to ``path`` (QMP pmemsave)."""
        path = Path(path)
        self.qmp("pmemsave", val=addr, size=size, filename=os.fspath(path.absolute()))
        return path

    # ---- serial ------------------------------------------------------------------------
    def serial_text(self) -> str:
        try:
            return self.serial_path.read_bytes().decode("latin-1")
        except FileNotFoundError:
            return ""

    def progress_count(self) -> int:
        """Completed guest passes seen on this QEMU's serial port."""
        data = self.serial_text()
        # After the last start marker (a reboot restarts the count); an incoming VM continues a
        # guest that printed its 'S' elsewhere, so then count every progress byte.
        i = data.rfind(START_MARKER.decode())
        return data.count(PROGRESS_MARKER.decode(), max(i, 0))

    def wait_for_progress(self, n: int = 1, timeout: float = 30.0) -> int:
        """Wait until the guest has reported at least ``n`` passes in total; return the count."""
        deadline = time.monotonic() + timeout
        while True:
            c = self.progress_count()
            if c >= n:
                return c
            if not self.is_running():
                raise QemuError(f"{self.name}: QEMU exited while waiting for the guest\n"
                                f"{self.log_text()}")
            if time.monotonic() > deadline:
                raise QemuError(f"{self.name}: guest made {c}/{n} passes in {timeout}s; "
                                f"serial={self.serial_text()[:80]!r}\n{self.log_text()}")
            time.sleep(0.02)


# ---- guest-physical layout -----------------------------------------------------------------
FOUR_GIB = 1 << 32
LEGACY_HOLE = (0xA0000, 0x100000)


def _is_q35(machine: str) -> bool:
    return machine == "q35" or "q35" in machine


def ram_split(ram_size: int, machine: str) -> tuple[int, int]:
    """(below_4g, above_4g) sizes of pc.ram for QEMU's x86 PC machines (default properties).

    q35 keeps everything below 4 GiB while RAM < 2.75 GiB (0xb0000000), else 2 GiB low; i440fx
    while RAM < 3.5 GiB (0xe0000000), else 3 GiB low (gigabyte alignment).
    """
    if _is_q35(machine):
        low = 0x80000000 if ram_size >= 0xB0000000 else ram_size
    else:
        low = 0xC0000000 if ram_size >= 0xE0000000 else ram_size
    return low, ram_size - low


def ram_compare_ranges(ram_size: int, machine: str) -> list[tuple[int, int]]:
    """Guest-physical [start, end) ranges where a pmemsave dump shows pc.ram itself.

    Excluded is only the legacy window 0xA0000-0xFFFFF: there the CPU-visible address space maps
    VGA/SMRAM (0xA0000-0xBFFFF) and the PAM-controlled option-ROM/BIOS shadow (0xC0000-0xFFFFF),
    so pmemsave need not read the pc.ram bytes a migration file carries for those offsets.
    Below 4 GiB the pc.ram offset equals the guest-physical address; the part above 4 GiB (big
    guests only) is pc.ram offset ``below_4g + (gpa - 4 GiB)``.
    """
    low, high = ram_split(ram_size, machine)
    ranges = [(0, min(low, LEGACY_HOLE[0]))]
    if low > LEGACY_HOLE[1]:
        ranges.append((LEGACY_HOLE[1], low))
    if high:
        ranges.append((FOUR_GIB, FOUR_GIB + high))
    return [(s, e) for s, e in ranges if e > s]


def gpa_to_ram_offset(gpa: int, ram_size: int, machine: str) -> int:
    """pc.ram offset of a guest-physical address inside ram_compare_ranges()."""
    low, _ = ram_split(ram_size, machine)
    return gpa if gpa < low else low + (gpa - FOUR_GIB)


def diff_pages(a: bytes | memoryview, b: bytes | memoryview,
               ranges: Iterable[tuple[int, int]], base: int = 0,
               page_size: int = 4096) -> list[int]:
    """Guest-physical addresses of the pages that differ between two dumps (both start at base)."""
    va = np.frombuffer(a, dtype=np.uint8)
    vb = np.frombuffer(b, dtype=np.uint8)
    out: list[int] = []
    for start, end in ranges:
        lo, hi = start - base, end - base
        if lo < 0 or hi > min(va.size, vb.size):
            raise ValueError(f"range 0x{start:x}-0x{end:x} outside the dumps")
        n = (hi - lo) // page_size
        pa = va[lo : lo + n * page_size].reshape(n, page_size)
        pb = vb[lo : lo + n * page_size].reshape(n, page_size)
        out += [start + int(i) * page_size for i in np.nonzero((pa != pb).any(axis=1))[0]]
        if (hi - lo) % page_size and bytes(va[lo + n * page_size : hi]) != bytes(
                vb[lo + n * page_size : hi]):
            out.append(start + n * page_size)
    return out


# ---- producing and loading real migration files ----------------------------------------------
MODES = ("stream", "mapped-ram", "mapped-ram-multifd")
OFFSET_FILL = b"X"  # bytes before a file: URI offset are pre-filled with this (QEMU keeps them)
CONVERGE_BANDWIDTH = 1 << 30  # bytes/s, like QEMU's own tests when forcing convergence
CONVERGE_DOWNTIME_MS = 30_000
THROTTLE_BANDWIDTH = 64 << 20  # bytes/s: 128 MiB guest -> every pass takes ~1-2 s
THROTTLE_DOWNTIME_MS = 1


def caps_for_mode(mode: str) -> dict[str, bool]:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    return {"mapped-ram": mode != "stream", "multifd": mode == "mapped-ram-multifd"}


def default_mem_end(ram_size: int) -> int:
    """Guest region end for a RAM size: half the RAM (64 MiB for -m 128M), at most 100 MiB."""
    return max(2 * MIB, min(DEFAULT_MEM_END, (ram_size // 2) & ~0xFFFFF))


def default_image_dir() -> Path:
    """Shared, content-addressed cache of built boot sectors (safe across sessions)."""
    import tempfile

    return Path(tempfile.gettempdir()) / f"fixedram-guest-{os.getuid()}"


def guest_image(mem_end: int, fill_words: int = 2, directory: Path | None = None) -> Path:
    """Path of the (cached) boot-sector disk image for these guest parameters."""
    return write_bootsector(directory or default_image_dir(), mem_end=mem_end,
                            fill_words=fill_words)


@dataclass
class SavedFile:
    """A migration file written by real QEMU, with the source's RAM as ground truth."""

    path: Path  # the migration file
    pmem_path: Path  # pmemsave of guest-physical [0, ram_size) after completion
    uri: str  # the URI used, e.g. 'file:/x/vm.mig,offset=4096'
    machine: str  # resolved machine type, e.g. 'pc-q35-10.0'
    machine_alias: str  # what was asked for, e.g. 'q35'
    ram_size: int  # bytes
    mode: str  # one of MODES
    live: bool
    offset: int
    caps: dict[str, bool]
    params: dict[str, Any]
    stats: dict[str, Any]  # final query-migrate of the source
    guest: GuestParams
    image: Path
    log_path: Path  # the source QEMU's log

    @property
    def compare_ranges(self) -> list[tuple[int, int]]:
        return ram_compare_ranges(self.ram_size, self.machine)


def save_vm(
    tmp_path: Path,
    *,
    machine: str,
    mode: str,
    live: bool,
    ram_mb: int = 128,
    offset: int = 0,
    channels: int = 4,
    direct_io: bool = False,
    bandwidth: int | None = None,
    mem_end: int | None = None,
    fill_words: int = 2,
    min_syncs: int = 3,
    min_transferred: int | None = None,
    image: Path | None = None,
    name: str = "src",
    timeout: float = 120.0,
) -> SavedFile:
    """Boot the guest, let it dirty RAM, save it with QEMU to ``file:`` and pmemsave the source.

    Paused save (``live=False``): the guest is stopped before ``migrate``.  Live save: the
    migration runs throttled (``bandwidth``, default 64 MiB/s, downtime-limit 1 ms) while the guest
    keeps re-dirtying its region, until ``ram.dirty-sync-count >= min_syncs`` and
    ``ram.transferred >= min_transferred`` (default 2x RAM); then bandwidth and downtime are raised
    so it converges.  With ``offset`` the first ``offset`` bytes of the file are pre-filled with
    OFFSET_FILL, as QEMU's tests do.
    """
    caps = caps_for_mode(mode)
    ram_size = ram_mb << 20
    mem_end = mem_end if mem_end is not None else default_mem_end(ram_size)
    image = image or guest_image(mem_end, fill_words)
    guest = read_params(image.read_bytes()[:512])
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}.mig"
    if offset:
        path.write_bytes(OFFSET_FILL * offset)
    uri = file_uri(path, offset)
    params: dict[str, Any] = {}
    if caps["multifd"]:
        params["multifd-channels"] = channels
    if direct_io:
        params["direct-io"] = True
    if live:
        params["max-bandwidth"] = bandwidth or THROTTLE_BANDWIDTH
        params["downtime-limit"] = THROTTLE_DOWNTIME_MS
    else:
        params["max-bandwidth"] = bandwidth or 16 << 30  # nothing to throttle for
    with QemuVM(tmp_path, image, machine=machine, memory=ram_size, name=name) as vm:
        vm.wait_for_progress(2, timeout=30)
        if not live:
            vm.stop()
        vm.set_caps(**caps)
        vm.set_params(**params)
        if live:
            vm.migrate(uri, wait=False)
            need = min_transferred if min_transferred is not None else 2 * ram_size
            _wait_passes(vm, min_syncs, need, timeout)
            vm.set_params(max_bandwidth=CONVERGE_BANDWIDTH,
                          downtime_limit=CONVERGE_DOWNTIME_MS)
            stats = vm.wait_migration(timeout)
        else:
            stats = vm.migrate(uri, timeout=timeout)
        # The source now sits in postmigrate (stopped): its RAM is exactly what was saved.
        pmem = vm.pmemsave(0, ram_split(ram_size, machine)[0],
                           path.with_name(path.name + ".pmem"))
        resolved = vm.machine_name()
        log_path = vm.log_path
    return SavedFile(path=path, pmem_path=pmem, uri=uri, machine=resolved, machine_alias=machine,
                     ram_size=ram_size, mode=mode, live=live, offset=offset, caps=caps,
                     params=params, stats=stats, guest=guest, image=image, log_path=log_path)


def _wait_passes(vm: QemuVM, min_syncs: int, min_transferred: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        info = vm.query_migrate()
        st = info.get("status")
        if st in _FINAL_STATES:
            raise MigrationFailed(f"live migration ended early ({st}) before {min_syncs} passes: "
                                  f"{info.get('error-desc', '')}", info, vm.log_text())
        ram = info.get("ram", {})
        if (ram.get("dirty-sync-count", 0) >= min_syncs
                and ram.get("transferred", 0) >= min_transferred):
            return
        if time.monotonic() > deadline:
            raise QemuError(f"live migration made too few passes in {timeout}s: {ram}")
        time.sleep(0.05)


def load_into_new_vm(
    path: str | os.PathLike[str],
    machine: str,
    caps: dict[str, bool] | Iterable[str] = (),
    offset: int = 0,
    *,
    workdir: Path | None = None,
    ram_size: int = 128 << 20,
    image: Path | None = None,
    params: dict[str, Any] | None = None,
    check: bool = True,
    name: str = "dst",
    timeout: float = 120.0,
) -> QemuVM:
    """Start a fresh ``-incoming defer -S`` VM, set caps/params and load ``file:path[,offset]``.

    Returns the launched VM (paused after a successful load; the caller owns it: use ``with``).
    With ``check`` a failed load raises MigrationFailed (``.error_desc``, ``.log`` = QEMU's stderr,
    e.g. "Capability mapped-ram is off, but received capability is on") and QEMU is shut down;
    without it the VM is returned in any final state (see ``load_error``).
    """
    path = Path(path)
    workdir = Path(workdir) if workdir else path.parent
    if image is None:
        image = guest_image(default_mem_end(ram_size))
    if not isinstance(caps, dict):
        caps = dict.fromkeys(caps, True)
    vm = QemuVM(workdir, image, machine=machine, memory=ram_size, incoming=True, paused=True,
                name=name)
    vm.launch()
    try:
        if caps:
            vm.set_caps(**caps)
        if params:
            vm.set_params(**params)
        try:
            vm.migrate_incoming(file_uri(path, offset), timeout=timeout)
        except MigrationFailed:
            if check:
                raise
    except BaseException:
        vm.shutdown()
        raise
    return vm


def load_error(vm: QemuVM, timeout: float = 10.0) -> str:
    """The destination's load failure text: error-desc plus QEMU's stderr (which has the detail).

    Returns '' when the load completed.  Waits briefly for QEMU to flush its message.
    """
    deadline = time.monotonic() + timeout
    info = vm.query_migrate() if vm.is_running() else {}
    while info.get("status") not in _FINAL_STATES and time.monotonic() < deadline:
        time.sleep(0.05)
        info = vm.query_migrate() if vm.is_running() else {}
    if info.get("status") == "completed":
        return ""
    return f"{info.get('error-desc', '')}\n{vm.log_text()}".strip()
