"""Precopy live migration of the built-in guest, with QEMU's states and stats.

States: ``setup`` → ``active`` → ``device`` → ``completed`` (or ``failed``
/ ``cancelling`` → ``cancelled``). Pass 1 sends every page; each later pass
syncs the dirty log and sends what was re-dirtied, at most ``max-bandwidth``
bytes/s. When the dirty data left fits ``downtime-limit`` at the measured
bandwidth (or after ``x-max-passes`` passes), the guest is stopped, the last
dirty pages and the device state are sent, and the stream ends. The time the
guest is stopped is the downtime.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ..errors import FixedramError, MigrationError, TransportError
from ..transports.channels import FileOut, open_outgoing
from ..transports.uri import MigrationURI, parse_uri
from .capabilities import MigrationConfig
from .guest import PAGE, BuiltinGuest
from .sinks import MappedRamSink, Sink, StreamSink

__all__ = ["Migration", "RateLimiter", "dirty_runs"]

RUN_PAGES = 256  # 1 MiB per job: QEMU's mapped-ram load piece size
FINAL_STATES = ("completed", "failed", "cancelled")


class Cancelled(MigrationError):
    pass


def dirty_runs(idx: np.ndarray, max_pages: int = RUN_PAGES) -> Iterator[tuple[int, int]]:
    """Coalesce sorted page indices into (first, count) runs of at most ``max_pages``."""
    if idx.size == 0:
        return
    brk = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = idx[np.concatenate(([0], brk))].tolist()
    ends = (idx[np.concatenate((brk - 1, [idx.size - 1]))] + 1).tolist()
    for s, e in zip(starts, ends, strict=True):
        for f in range(s, e, max_pages):
            yield f, min(max_pages, e - f)


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

    :param on_event: called with (event name, data) for QMP events.
    :param on_progress: called after every job with the live stats.
    """

    def __init__(self, guest: BuiltinGuest, config: MigrationConfig, uri: str | MigrationURI,
                 *, on_event: Callable[[str, dict[str, Any]], None] | None = None,
                 on_progress: Callable[[Migration], None] | None = None) -> None:
        self.g = guest
        self.cfg = config.copy()
        self.uri = parse_uri(uri) if isinstance(uri, str) else uri
        self.cfg.check_transport(self.uri.kind, self.uri.seekable)
        self.on_event = on_event
        self.on_progress = on_progress
        self.status = "none"
        self.error: str | None = None
        self.exc: BaseException | None = None
        self._cancel = threading.Event()
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
        self.file_end: int | None = None
        self.pass_bytes: list[int] = []

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
        if self.status not in FINAL_STATES:
            self._set("cancelling")
            self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def active(self) -> bool:
        return self.status not in (*FINAL_STATES, "none")

    def _set(self, status: str) -> None:
        self.status = status
        if self.on_event is not None:
            self.on_event("MIGRATION", {"status": status})

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
            return StreamSink(self.g, ch, detect_zero=detect)
        except BaseException:
            ch.abort()
            raise

    def _run(self) -> None:
        g = self.g
        was_running = g.running
        stopped_by_us = False
        self.t_start = time.monotonic()
        try:
            self._set("setup")
            self.sink = sink = self._make_sink()
            sink.begin()
            g.clear_dirty()  # start the dirty log: pass 1 sends everything
            self.setup_ms = int((time.monotonic() - self.t_start) * 1000)
            self._set("active")
            todo = [np.arange(b.npages) for b in g.blocks]
            limiter = RateLimiter(int(self.cfg.params["max-bandwidth"]))
            max_passes = int(self.cfg.params["x-max-passes"])
            while True:
                t_pass = time.monotonic()
                sent0 = sink.transferred
                self._send_pass(todo, limiter, final=False)
                dt = max(time.monotonic() - t_pass, 1e-6)
                sent = sink.transferred - sent0
                self.pass_bytes.append(sent)
                bw = sent / dt  # bytes/s over this pass
                self.mbps = bw * 8 / 1e6
                todo = [g.sync_dirty(i) for i in range(len(g.blocks))]
                self.dirty_sync_count += 1
                dirty = sum(int(t.size) for t in todo)
                self.remaining = dirty * PAGE
                self.dirty_pages_rate = int(dirty / dt)
                if self.on_event is not None and self.cfg.caps["events"]:
                    self.on_event("MIGRATION_PASS", {"pass": self.passes})
                limit = bw * self.cfg.params["downtime-limit"] / 1000
                if (not g.running or self.remaining <= limit
                        or (max_passes and self.passes >= max_passes)):
                    break
            # Switchover: stop the guest, send what is left and the devices.
            t_stop = time.monotonic()
            if g.running:
                g.stop("finish-migrate")
                stopped_by_us = True
            self._set("device")
            todo = [np.union1d(t, g.sync_dirty(i)) for i, t in enumerate(todo)]
            self.dirty_sync_count += 1
            self.remaining = sum(int(t.size) for t in todo) * PAGE
            self._send_pass(todo, None, final=True)
            sink.finish()
            self.file_end = getattr(sink, "file_end", None)
            self.remaining = 0
            self.downtime_ms = int((time.monotonic() - t_stop) * 1000)
            if stopped_by_us:
                g.status = "postmigrate"
            self.t_end = time.monotonic()
            self._set("completed")
        except BaseException as e:
            self.t_end = time.monotonic()
            if self.sink is not None:
                try:
                    self.sink.abort()
                except Exception:
                    traceback.print_exc()
            if stopped_by_us and was_running:
                g.cont()  # QEMU resumes the source when a migration fails
            self.exc = e
            if self._cancel.is_set():
                self.error = None
                self._set("cancelled")
            else:
                self.error = str(e) or type(e).__name__
                self._set("failed")
        finally:
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
                    limiter.wait(sink.transferred, self._cancel)
                sink.send(bi, first, count)
                left -= count
                self.remaining = left * PAGE
                if self.on_progress is not None:
                    self.on_progress(self)
        sink.end_pass()

    # -- query-migrate ---------------------------------------------------------------

    def query(self) -> dict[str, Any]:
        """The ``query-migrate`` answer, with QEMU's field names."""
        out: dict[str, Any] = {"status": self.status}
        if self.status in ("none",):
            return out
        now = self.t_end if self.t_end else time.monotonic()
        sink = self.sink
        out["total-time"] = int((now - self.t_start) * 1000)
        out["setup-time"] = self.setup_ms
        if self.status == "completed":
            out["downtime"] = self.downtime_ms
        else:
            out["expected-downtime"] = self.cfg.params["downtime-limit"]
        if sink is not None:
            total = sum(b.size for b in self.g.blocks)
            out["ram"] = {
                "transferred": sink.transferred,
                "remaining": self.remaining,
                "total": total,
                "duplicate": sink.zero_pages,
                "normal": sink.normal_pages,
                "normal-bytes": sink.normal_pages * PAGE,
                "dirty-sync-count": self.dirty_sync_count,
                "page-size": PAGE,
                "mbps": round(self.mbps, 3),
                "dirty-pages-rate": self.dirty_pages_rate,
                "precopy-bytes": sink.transferred,
            }
            out["x-passes"] = self.passes
        if self.status == "failed" and self.error:
            out["error-desc"] = self.error
        return out
