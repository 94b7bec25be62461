"""The built-in guest: RAM to migrate, a dirty log, a workload, a device.

It stands in for a VM so the engine can be exercised (and benchmarked)
without QEMU: RAMBlocks are anonymous mmaps (page-aligned, so O_DIRECT can
write straight from them) seen through numpy; every write by the workload
marks its pages in a per-block dirty log that the migration thread syncs
(copy + clear), as KVM's dirty log is synced by QEMU.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import struct
import threading
import time
from dataclasses import dataclass

import numpy as np

from ..errors import MigrationError
from ..format.constants import TARGET_PAGE_SIZE
from ..format.machine import DeviceRecord

__all__ = ["MACHINE", "BuiltinGuest", "GuestBlock", "Workload"]

# Starts with "pc": the files are x86-64 little-endian layout (bitmap words).
MACHINE = "pc-fixedram-1.0"
PAGE = TARGET_PAGE_SIZE  # the built-in guest uses the target page size
DEVICE_NAME = "fixedram-guest"
DEVICE_VERSION = 1
_DEV = struct.Struct(">QQQ16Q")  # ram size, workload sequence, seed, 16 "registers"
_K1 = np.uint64(0x9E3779B97F4A7C15)
_K2 = np.uint64(0xC2B2AE3D27D4EB4F)


class GuestBlock:
    """One RAMBlock: ``data`` (bytes), ``pages`` (npages x 4096) and ``words``
    (npages x 512 uint64) are views of the same anonymous mmap."""

    def __init__(self, idstr: str, size: int) -> None:
        if size <= 0 or size % PAGE:
            raise ValueError(f"RAMBlock {idstr!r}: size must be a positive multiple of {PAGE}")
        self.idstr = idstr
        self.size = size
        self.npages = size // PAGE
        mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):  # as QEMU does for guest RAM: fewer faults
            with contextlib.suppress(OSError):
                mm.madvise(mmap.MADV_HUGEPAGE)
        self._use(mm)
        self.file_backed = False
        self.dirty = np.zeros(self.npages, dtype=bool)

    def _use(self, mm: mmap.mmap) -> None:
        self.mm = mm
        self.data = np.frombuffer(mm, dtype=np.uint8)
        self.pages = self.data.reshape(self.npages, PAGE)
        self.words = np.frombuffer(mm, dtype=np.uint64).reshape(self.npages, PAGE // 8)

    @property
    def address(self) -> int:
        """Virtual address of the block's first byte (for madvise and mmap calls)."""
        return int(self.data.ctypes.data)

    def map_file(self, fd: int, offset: int) -> None:
        """Back the block with a private mapping of ``fd`` from ``offset`` on.

        Copy on write: the guest reads the file's bytes and its writes stay
        in this process, so the file never changes. Only for a guest whose
        vCPUs have not run on this memory yet (a fresh destination).

        :raise OSError: the kernel refused the mapping (offset alignment, a
            file system without mmap); the anonymous memory stays in place.
        """
        self.install(mmap.mmap(fd, self.size, flags=mmap.MAP_PRIVATE,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset))

    def install(self, mm: mmap.mmap) -> None:
        """Make ``mm`` (``size`` bytes, e.g. from :meth:`map_file`) the block's memory."""
        if len(mm) != self.size:
            raise ValueError(f"RAMBlock {self.idstr!r}: a mapping of {len(mm)} bytes, "
                             f"not {self.size}")
        old = self.mm
        self._use(mm)
        self.file_backed = True
        with contextlib.suppress(BufferError):  # a view still held elsewhere: the GC frees it
            old.close()

    def view(self, first: int, count: int) -> memoryview:
        """Pages ``[first, first+count)`` as a page-aligned buffer (no copy)."""
        return memoryview(self.mm)[first * PAGE:(first + count) * PAGE]


class BuiltinGuest:
    """A guest with ``pc.ram`` (``ram_size``) and a small ``pc.bios`` block.

    :param fill: fraction of ``pc.ram`` pages given non-zero content at boot
        (the rest stay zero, as untouched guest memory is); 0 for a blank
        destination guest.
    :param seed: makes the content and workload reproducible.
    """

    def __init__(self, ram_size: int, *, fill: float = 0.5, seed: int = 1,
                 bios_size: int = 256 << 10) -> None:
        self.blocks = [GuestBlock("pc.ram", ram_size), GuestBlock("pc.bios", bios_size)]
        self.ram_size = ram_size
        self.seed = seed
        self.seq = 0  # workload write counter, part of the device state
        self.regs = [0] * 16
        self.log_lock = threading.Lock()
        self.status = "running"
        self._workloads: list[Workload] = []
        if fill > 0:
            self._boot_fill(fill)

    # -- content -------------------------------------------------------------

    def _boot_fill(self, fraction: float) -> None:
        bios = self.blocks[1]
        bios.words[:] = (np.arange(bios.npages * 512, dtype=np.uint64).reshape(bios.npages, 512)
                         * _K2 + np.uint64(self.seed))
        ram = self.blocks[0]
        cut = np.uint64(int(fraction * 1024))
        lane = np.arange(512, dtype=np.uint64) * _K2
        step = 4096  # pages per chunk (16 MiB)
        for a in range(0, ram.npages, step):
            idx = np.arange(a, min(a + step, ram.npages), dtype=np.uint64)
            # Decided per 256 KiB group: used guest memory comes in clumps.
            grp = idx >> np.uint64(6)
            h = (grp * _K1 + np.uint64(self.seed)) >> np.uint64(54)  # 0..1023
            keep = h < cut
            if keep.any():
                rows = idx[keep]
                ram.words[rows.astype(np.int64)] = (rows * _K1)[:, None] ^ lane
        # Boot content is not "dirty": migration sends everything in pass 1.

    def digest(self) -> str:
        """BLAKE2b of all RAM; equal digests = equal RAM."""
        h = hashlib.blake2b(digest_size=20)
        for b in self.blocks:
            h.update(b.idstr.encode())
            h.update(b.mm)
        return h.hexdigest()

    def sync_dirty(self, bi: int) -> np.ndarray:
        """Indices of pages dirtied since the last sync; clears the log."""
        b = self.blocks[bi]
        with self.log_lock:
            idx = np.flatnonzero(b.dirty)
            b.dirty[idx] = False
        return idx

    def dirty_count(self) -> int:
        with self.log_lock:
            return int(sum(np.count_nonzero(b.dirty) for b in self.blocks))

    def clear_dirty(self) -> None:
        with self.log_lock:
            for b in self.blocks:
                b.dirty[:] = False

    # -- device state ------------------------------------------------------------

    def device_state(self) -> bytes:
        return _DEV.pack(self.ram_size, self.seq, self.seed, *self.regs)

    def load_device_state(self, data: bytes) -> None:
        if len(data) != _DEV.size:
            raise MigrationError(f"device {DEVICE_NAME!r}: {len(data)} bytes, expected "
                                 f"{_DEV.size}")
        vals = _DEV.unpack(data)
        if vals[0] != self.ram_size:
            raise MigrationError(f"device {DEVICE_NAME!r}: source RAM size {vals[0]} differs "
                                 f"from this guest's {self.ram_size}")
        self.seq, self.seed, self.regs = vals[1], vals[2], list(vals[3:])

    def device_record(self, section_id: int) -> DeviceRecord:
        """The device section as saved now, with the vmdesc entry describing
        it the way QEMU describes a VMSD (so ``fixedram state`` decodes it)."""
        fields: list[dict[str, object]] = [{"name": n, "type": "uint64", "size": 8}
                                           for n in ("ram_size", "seq", "seed")]
        fields.append({"name": "regs", "array_len": len(self.regs), "type": "uint64",
                       "size": 8})
        desc = {"name": DEVICE_NAME, "instance_id": 0, "vmsd_name": DEVICE_NAME,
                "version": DEVICE_VERSION, "fields": fields}
        return DeviceRecord(DEVICE_NAME, 0, DEVICE_VERSION, section_id, self.device_state(),
                            desc)

    # -- run state -------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.status == "running"

    def add_workload(self, w: Workload) -> None:
        self._workloads.append(w)
        if self.running:
            w.start()

    def stop(self, status: str = "paused") -> None:
        """Pause the vCPUs: returns once no workload write is in flight."""
        for w in self._workloads:
            w.pause()
        self.status = status

    def cont(self) -> None:
        self.status = "running"
        for w in self._workloads:
            w.resume()

    def shutdown(self) -> None:
        for w in self._workloads:
            w.quit()
        self._workloads.clear()

    def set_throttle(self, pct: int) -> None:
        """Throttle the vCPUs (workload threads) to ``100 - pct`` percent of
        their time, as QEMU's CPU throttle does for auto-converge."""
        for w in self._workloads:
            w.throttle_pct = max(0, min(99, pct))


@dataclass
class WorkloadSpec:
    rate: int = 256 << 20  # bytes of page writes per second, all threads; 0 = unthrottled
    pattern: str = "random"  # random | sequential | hotset
    threads: int = 2
    write: str = "page"  # page (whole page) | word (8 bytes per page)


class Workload:
    """Threads that keep re-dirtying guest RAM at a set rate and pattern.

    Each batch writes pages of ``pc.ram`` and then marks them dirty, so a
    page is always marked after its last write and the migration re-sends it.
    """

    BATCH = 64  # pages per batch

    def __init__(self, guest: BuiltinGuest, spec: WorkloadSpec) -> None:
        if spec.pattern not in ("random", "sequential", "hotset"):
            raise ValueError(f"unknown workload pattern {spec.pattern!r}")
        self.g = guest
        self.spec = spec
        self._locks = [threading.Lock() for _ in range(spec.threads)]
        self._run = threading.Event()
        self._quit = False
        self._threads: list[threading.Thread] = []
        self.pages_written = 0
        self.throttle_pct = 0  # auto-converge: share of time the threads sleep

    def start(self) -> None:
        if self._threads:
            self.resume()
            return
        self._run.set()
        for i in range(self.spec.threads):
            t = threading.Thread(target=self._loop, args=(i,), daemon=True,
                                 name=f"vcpu{i}")
            t.start()
            self._threads.append(t)

    def pause(self) -> None:
        self._run.clear()
        for lk in self._locks:  # wait for batches in flight
            lk.acquire()
            lk.release()

    def resume(self) -> None:
        if not self._threads:
            self.start()
        self._run.set()

    def quit(self) -> None:
        self._quit = True
        self._run.set()
        for t in self._threads:
            t.join(5)

    def _loop(self, i: int) -> None:
        g, sp = self.g, self.spec
        ram = g.blocks[0]
        rng = np.random.default_rng(g.seed * 1000 + i)
        per_thread = sp.rate / sp.threads if sp.rate else 0.0
        batch = min(self.BATCH, ram.npages)
        pause = batch * PAGE / per_thread if per_thread else 0.0
        lane = np.arange(512, dtype=np.uint64) * _K2
        hot = max(batch, ram.npages // 10)
        cursor = (ram.npages // sp.threads) * i
        nxt = time.monotonic()
        lk = self._locks[i]
        while not self._quit:
            self._run.wait()
            if self._quit:
                break
            t_batch = time.monotonic()
            with lk:
                if not self._run.is_set():
                    continue
                if sp.pattern == "random":
                    idx = rng.integers(0, ram.npages, batch)
                elif sp.pattern == "hotset":
                    idx = (rng.integers(0, hot, batch) if rng.random() < 0.9
                           else rng.integers(0, ram.npages, batch))
                else:
                    idx = (np.arange(cursor, cursor + batch) % ram.npages)
                    cursor = (cursor + batch) % ram.npages
                g.seq += 1
                val = (idx.astype(np.uint64) * _K1) ^ np.uint64(g.seq << 1 | 1)
                if sp.write == "page":
                    ram.words[idx] = val[:, None] ^ lane
                else:
                    ram.words[idx, g.seq % 512] = val
                with g.log_lock:
                    ram.dirty[idx] = True
                self.pages_written += batch
            pct = self.throttle_pct
            if pct:
                # Throttled: sleep so that running takes (100 - pct)% of the time.
                extra = max(pause, time.monotonic() - t_batch) * pct / (100 - pct)
                time.sleep(extra)
                nxt += extra
            if pause:
                nxt += pause
                d = nxt - time.monotonic()
                if d > 0:
                    time.sleep(d)
                elif d < -1.0:
                    nxt = time.monotonic()  # fell behind (paused): do not burst
