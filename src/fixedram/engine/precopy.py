"""Precopy live migration of the built-in guest, with QEMU's states and stats.

States: ``setup`` → ``active`` → (``pre-switchover``) → ``device`` →
``completed`` (or ``failed`` / ``cancelling`` → ``cancelled``). Pass 1 sends
every page; each later pass syncs the dirty log and sends what was
re-dirtied, at most ``max-bandwidth`` bytes/s. When the dirty data left fits
``downtime-limit`` at the measured bandwidth (``avail-switchover-bandwidth``
when set), or after ``x-max-passes`` passes, the guest is stopped, the last
dirty pages and the device state are sent, and the stream ends. The time the
guest is stopped is the downtime.
"""

from __future__ import annotations

import contextlib
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..errors import CapabilityError, FixedramError, MigrationError, TransportError
from ..io.runs import page_runs
from ..transports.channels import FileOut, open_outgoing
from ..transports.uri import MigrationURI, parse_uri
from .capabilities import MigrationConfig
from .guest import PAGE, BuiltinGuest
from .sinks import MappedRamSink, Sink, StreamSink

__all__ = ["Migration", "RateLimiter", "dirty_runs"]

JOB_PAGES = 256  # 1 MiB per job: QEMU's mapped-ram load piece size
BANDWIDTH_WINDOW = 0.1  # s: QEMU measures bandwidth (and so its switchover threshold) so often
FINAL_STATES = ("completed", "failed", "cancelled")


class Cancelled(MigrationError):
    pass


def dirty_runs(idx: np.ndarray, max_pages: int = JOB_PAGES) -> Iterator[tuple[int, int]]:
    """Coalesce sorted page indices into (first, count) runs of at most ``max_pages``."""
    return page_runs(idx, max_pages)


class RateLimiter:
    """``max-bandwidth`` in 100 ms windows, as QEMU accounts it."""

    WINDOW = 0.1

    def __init__(self, bytes_per_s: int) -> None:
        self.rate = bytes_per_s
        self.t0 = time.monotonic()
        self.base = 0

    def wait(self, total: int, cancelled: threading.Event) -> None:
        """Sleep while ``total`` bytes exceed this window's budget."""
        if not self.rate:
            return
        budget = self.rate * self.WINDOW
        while total - self.base >= budget and not cancelled.is_set():
            now = time.monotonic()
            end = self.t0 + self.WINDOW
            if now < end:
                time.sleep(end - now)
            self.t0 = max(end, time.monotonic() - self.WINDOW)
            self.base += int(budget)
            if total - self.base > 10 * budget:  # do not bank debt across long stalls
                self.base = total - int(budget)


class Migration:
    """One outgoing migration of ``guest`` to ``uri``.

    Run states and events follow QEMU 10.0: ``setup``, the first dirty-log
    sync (MIGRATION_PASS 1), ``active``, a sync after each pass while the
    guest runs, then the switchover: the guest is stopped (STOP,
    ``finish-migrate``), ``pre-switchover`` with pause-before-switchover,
    ``device``, the final sync and ``completed``; the guest is then
    ``postmigrate``, however it was before. A failed or cancelled migration
    restarts a guest it stopped (RESUME), or puts back the state it had.

    :param on_event: called with (event name, data): MIGRATION always,
        MIGRATION_PASS with the ``events`` capability, STOP and RESUME when
        this migration stops or restarts the guest.
    :param on_progress: called after every job with the live stats.
    """

    def __init__(self, guest: BuiltinGuest, config: MigrationConfig, uri: str | MigrationURI,
                 *, on_event: Callable[[str, dict[str, Any]], None] | None = None,
                 on_progress: Callable[[Migration], None] | None = None) -> None:
        self.g = guest
        self.cfg = config.copy()
        self.uri = parse_uri(uri) if isinstance(uri, str) else uri
        self.cfg.check_transport(self.uri.kind, self.uri.seekable)
        self.cfg.check_migrate()
        why = self.cfg.unsupported(self.uri.kind)
        if why:
            raise CapabilityError(why)
        self.on_event = on_event
        self.on_progress = on_progress
        self.status = "none"
        self.error: str | None = None
        self.exc: BaseException | None = None
        self._cancel = threading.Event()
        self._continue = threading.Event()  # migrate-continue at pre-switchover
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self.sink: Sink | None = None
        # stats
        self.t_start = 0.0
        self.t_end = 0.0
        self.setup_ms = 0
        self.downtime_ms = 0
        self.passes = 0
        self.dirty_sync_count = 0
        self.remaining = 0
        self.mbps = 0.0
        self.dirty_pages_rate = 0
        self.precopy_bytes = 0
        self.downtime_bytes = 0
        self.throttle_pct = 0
        self.file_end: int | None = None
        self.pass_bytes: list[int] = []
        self._limiter: RateLimiter | None = None

    # -- control -----------------------------------------------------------------

    def start(self) -> Migration:
        self._thread = threading.Thread(target=self._run, name="migration", daemon=True)
        self._thread.start()
        return self

    def run(self) -> Migration:
        """Run in the calling thread; raise on failure or cancel."""
        self._run()
        if self.status != "completed":
            # A signal or Ctrl-C (KeyboardInterrupt) stays what it is, once the
            # output has been cleaned up, so the caller exits as interrupted.
            if self.exc is not None and (isinstance(self.exc, FixedramError)
                                         or not isinstance(self.exc, Exception)):
                raise self.exc
            raise MigrationError(self.error or f"migration {self.status}")
        return self

    def cancel(self) -> None:
        if self.status not in (*FINAL_STATES, "cancelling"):
            self._set("cancelling")
            self._cancel.set()

    def resume_switchover(self, state: str) -> None:
        """``migrate-continue``: leave ``pre-switchover``."""
        if self.status != state or state != "pre-switchover":
            raise MigrationError(f"Migration not in expected state: {self.status}")
        self._continue.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def active(self) -> bool:
        return self.status not in (*FINAL_STATES, "none")

    def _set(self, status: str) -> None:
        self.status = status
        self._emit("MIGRATION", {"status": status})

    def _emit(self, name: str, data: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(name, data)

    def _sync(self) -> list[np.ndarray]:
        """A dirty-log sync: what was re-dirtied since the last one."""
        todo = [self.g.sync_dirty(i) for i in range(len(self.g.blocks))]
        self.dirty_sync_count += 1
        if self.cfg.caps["events"]:
            self._emit("MIGRATION_PASS", {"pass": self.dirty_sync_count})
        return todo

    # -- the migration thread ----------------------------------------------------

    def _make_sink(self) -> Sink:
        detect = self.cfg.params["zero-page-detection"] != "none"
        ch = open_outgoing(self.uri)
        try:
            if self.cfg.caps["mapped-ram"]:
                if not isinstance(ch, FileOut) or not ch.regular:
                    # Its layout is cut to size at the end, which only a file allows.
                    raise TransportError(f"{self.uri.text}: mapped-ram needs a regular file "
                                         "(not a FIFO or a device)")
                ch_n = self.cfg.channels if self.cfg.caps["multifd"] else 0
                return MappedRamSink(self.g, ch, channels=ch_n, direct_io=self.cfg.direct_io,
                                     detect_zero=detect)
            return StreamSink(self.g, ch, detect_zero=detect,
                              return_path=self.cfg.caps["return-path"])
        except BaseException:
            ch.abort()
            raise

    def open(self, sync: bool = True) -> None:
        """``setup``: open the target and write the stream's start.

        The QMP ``migrate`` command calls this itself for targets whose
        errors QEMU reports as the command's answer (file, fd, exec); with
        ``sync`` False (sockets) it happens in the migration thread.
        """
        if not sync:
            return
        self.t_start = time.monotonic()
        self._set("setup")
        self.sink = self._make_sink()
        self.sink.begin()

    def fail(self, e: BaseException) -> None:
        """Record a failure that happened before the migration thread ran."""
        if self.sink is not None:
            with contextlib.suppress(Exception):
                self.sink.abort()
        self.exc = e
        self.error = str(e) or type(e).__name__
        self.t_end = time.monotonic()
        self._set("failed")
        self._done.set()

    def update_parameters(self, params: dict[str, Any]) -> None:
        """Parameters QEMU applies to a running migration at once."""
        for k in ("max-bandwidth", "downtime-limit", "avail-switchover-bandwidth",
                  "throttle-trigger-threshold", "cpu-throttle-initial",
                  "cpu-throttle-increment", "cpu-throttle-tailslow", "max-cpu-throttle"):
            self.cfg.params[k] = params[k]
        if self._limiter is not None:
            self._limiter.rate = int(params["max-bandwidth"])

    def _run(self) -> None:
        g = self.g
        was = g.status
        stopped_by_us = False
        try:
            if self.sink is None:
                self.t_start = time.monotonic()
                self._set("setup")
                self.sink = self._make_sink()
                self.sink.begin()
            sink = self.sink
            g.clear_dirty()  # the first sync starts the dirty log: every page is to send
            self.dirty_sync_count = 1
            if self.cfg.caps["events"]:
                self._emit("MIGRATION_PASS", {"pass": 1})
            self.setup_ms = int((time.monotonic() - self.t_start) * 1000)
            self._set("active")
            t_active = time.monotonic()
            todo = [np.arange(b.npages) for b in g.blocks]
            p = self.cfg.params
            limiter = self._limiter = RateLimiter(int(p["max-bandwidth"]))
            throttle = _AutoConverge(self) if self.cfg.caps["auto-converge"] else None
            while True:
                t_pass = time.monotonic()
                sent0 = sink.transferred
                running = g.running
                self._send_pass(todo, limiter, final=False)
                todo = [np.empty(0, dtype=np.int64) for _ in g.blocks]
                dt = max(time.monotonic() - t_pass, 1e-6)
                sent = sink.transferred - sent0
                self.pass_bytes.append(sent)
                # QEMU's precopy-bytes are sent while the guest runs, its
                # downtime-bytes while it does not.
                if running:
                    self.precopy_bytes += sent
                else:
                    self.downtime_bytes += sent
                bw = sent / dt  # bytes/s over this pass
                self.mbps = bw * 8 / 1e6
                if (self.cfg.max_passes and self.passes >= self.cfg.max_passes) \
                        or not g.running or (time.monotonic() - t_active < BANDWIDTH_WINDOW
                                             and not g.dirty_count()):
                    # Forced; or nothing can have been dirtied since the pass (a
                    # paused guest); or, as QEMU with an idle guest, everything
                    # went before the first bandwidth window closed: the final
                    # sync (after the stop) sees the rest.
                    break
                todo = self._sync()
                dirty = sum(int(t.size) for t in todo)
                self.remaining = dirty * PAGE
                self.dirty_pages_rate = int(dirty / dt)
                if throttle is not None:
                    throttle.sync(dirty)
                switch_bw = p["avail-switchover-bandwidth"] or bw
                if self.remaining <= switch_bw * p["downtime-limit"] / 1000:
                    break
            # Switchover: stop the guest, send what is left and the devices.
            t_stop = time.monotonic()
            if g.running:
                g.stop("finish-migrate")
                stopped_by_us = True
                self._emit("STOP", {})
            else:
                g.status = "finish-migrate"
            if self.cfg.caps["pause-before-switchover"]:
                self._set("pre-switchover")
                while not self._continue.wait(0.05):
                    if self._cancel.is_set():
                        raise Cancelled("migration cancelled")
            self._set("device")
            todo = [np.union1d(t, n) for t, n in zip(todo, self._sync(), strict=True)]
            self.remaining = sum(int(t.size) for t in todo) * PAGE
            sent0 = sink.transferred
            self._send_pass(todo, None, final=True)
            sink.finish()
            self.downtime_bytes += sink.transferred - sent0
            self.file_end = getattr(sink, "file_end", None)
            self.remaining = 0
            self.downtime_ms = int((time.monotonic() - t_stop) * 1000)
            g.status = "postmigrate"
            self.t_end = time.monotonic()
            self._set("completed")
        except BaseException as e:
            self.t_end = time.monotonic()
            if isinstance(e, TransportError) and isinstance(self.sink, StreamSink):
                e = self.sink.destination_error() or e  # the return path says why
            if self.sink is not None:
                try:
                    self.sink.abort()
                except Exception:
                    traceback.print_exc()
            if stopped_by_us:
                g.cont()  # QEMU restarts a source it stopped when the migration fails
                self._emit("RESUME", {})
            elif g.status == "finish-migrate":
                g.status = was
            self.exc = e
            if self._cancel.is_set():
                self.error = None
                self._set("cancelled")
            else:
                self.error = str(e) or type(e).__name__
                self._set("failed")
        finally:
            g.set_throttle(0)
            self.throttle_pct = 0
            self._done.set()

    def _send_pass(self, todo: list[np.ndarray], limiter: RateLimiter | None,
                   final: bool) -> None:
        sink = self.sink
        assert sink is not None
        self.passes += 1
        sink.begin_pass(final)
        left = sum(int(t.size) for t in todo)
        for bi, idx in enumerate(todo):
            for first, count in dirty_runs(idx):
                if self._cancel.is_set():
                    raise Cancelled("migration cancelled")
                if limiter is not None:
                    limiter.wait(sink.accounted, self._cancel)
                sink.send(bi, first, count)
                left -= count
                self.remaining = left * PAGE
                if self.on_progress is not None:
                    self.on_progress(self)
        sink.end_pass()

    # -- query-migrate ---------------------------------------------------------------

    def query(self) -> dict[str, Any]:
        """The ``query-migrate`` answer, with QEMU 10.0's members for each state."""
        out: dict[str, Any] = {"status": self.status}
        if self.status in ("none", "setup", "failed", "cancelled"):
            if self.status == "none":
                return {}
            if self.status == "failed" and self.error:
                out["error-desc"] = self.error
            return out
        now = self.t_end if self.t_end else time.monotonic()
        out["total-time"] = int((now - self.t_start) * 1000)
        out["setup-time"] = self.setup_ms
        if self.status == "completed":
            out["downtime"] = self.downtime_ms
        else:
            out["expected-downtime"] = self.cfg.params["downtime-limit"]
        sink = self.sink
        if sink is not None:
            out["ram"] = {
                "transferred": sink.transferred,
                "remaining": self.remaining,
                "total": sum(b.size for b in self.g.blocks),
                "duplicate": sink.zero_pages,
                "normal": sink.normal_pages,
                "normal-bytes": sink.normal_pages * PAGE,
                "dirty-pages-rate": self.dirty_pages_rate,
                "mbps": round(self.mbps, 3),
                "dirty-sync-count": self.dirty_sync_count,
                "postcopy-requests": 0,
                "page-size": PAGE,
                "multifd-bytes": sink.multifd_bytes,
                "pages-per-second": 0,
                "precopy-bytes": self.precopy_bytes,
                "downtime-bytes": self.downtime_bytes,
                "postcopy-bytes": 0,
                "dirty-sync-missed-zero-copy": 0,
            }
        if self.throttle_pct:
            out["cpu-throttle-percentage"] = self.throttle_pct
        return out


class _AutoConverge:
    """QEMU's auto-converge: when the guest dirties more than
    throttle-trigger-threshold percent of what was sent, twice, its vCPUs
    (the workload threads) are throttled: cpu-throttle-initial percent at
    first, then cpu-throttle-increment more each time (or, with
    cpu-throttle-tailslow, only what should bring the dirty rate down to the
    threshold), never beyond max-cpu-throttle. Rates are taken over periods
    of at least one second, as QEMU does."""

    PERIOD = 1.0

    def __init__(self, m: Migration) -> None:
        self.m = m
        self.t0 = time.monotonic()
        self.sent0 = m.sink.transferred if m.sink is not None else 0
        self.dirty_pages = 0
        self.high = 0

    def sync(self, dirty_pages: int) -> None:
        self.dirty_pages += dirty_pages
        now = time.monotonic()
        if now - self.t0 < self.PERIOD or self.m.sink is None:
            return
        p = self.m.cfg.params
        xfer = self.m.sink.transferred - self.sent0
        dirty = self.dirty_pages * PAGE
        threshold = xfer * p["throttle-trigger-threshold"] / 100
        if dirty > threshold:
            self.high += 1
            if self.high >= 2:
                self.high = 0
                self._down(dirty, threshold)
        self.t0, self.sent0, self.dirty_pages = now, self.m.sink.transferred, 0

    def _down(self, dirty: float, threshold: float) -> None:
        p = self.m.cfg.params
        now = self.m.throttle_pct
        if not now:
            pct = p["cpu-throttle-initial"]
        else:
            inc = p["cpu-throttle-increment"]
            if p["cpu-throttle-tailslow"]:
                cpu_now = 100 - now
                cpu_ideal = cpu_now * (threshold / dirty)
                inc = min(int(cpu_now - cpu_ideal), inc)
            pct = min(now + inc, p["max-cpu-throttle"])
        self.m.throttle_pct = int(pct)
        self.m.g.set_throttle(int(pct))
