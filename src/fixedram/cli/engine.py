"""``fixedram guest | demo | save | restore``: the migration engine from the shell."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import CapabilityError, MigrationError, OutputError, TransportError, UsageError
from .main import _ram_size, _size, int_in, number_in

__all__ = ["register"]


def _guest(a: argparse.Namespace, *, fill: float | None = None) -> Any:
    from ..engine.guest import BuiltinGuest, Workload, WorkloadSpec

    g = BuiltinGuest(a.ram, fill=a.fill if fill is None else fill, seed=a.seed)
    if fill is None and getattr(a, "workload", "none") != "none" and a.workload_rate:
        g.add_workload(Workload(g, WorkloadSpec(rate=a.workload_rate, pattern=a.workload,
                                                threads=a.workload_threads)))
    return g


def _add_guest_args(s: argparse.ArgumentParser, ram: str, rate: str) -> None:
    s.add_argument("--ram", type=_ram_size, default=_size(ram),
                   help=f"guest RAM (default {ram})")
    s.add_argument("--fill", type=number_in(0, 1), default=0.5,
                   help="fraction of RAM pages non-zero at boot (default 0.5)")
    s.add_argument("--seed", type=int_in(0, 2**32 - 1), default=1,
                   help="content and workload seed")
    s.add_argument("--workload", choices=("random", "sequential", "hotset", "none"),
                   default="random", help="page write pattern of the vCPU threads")
    s.add_argument("--workload-rate", type=_size, default=_size(rate),
                   help=f"bytes/s the workload writes (default {rate}; 0 = none)")
    s.add_argument("--workload-threads", type=int_in(1, 256), default=2)


@contextlib.contextmanager
def _mig_progress(label: str, total: int) -> Iterator[Callable[[Any], None] | None]:
    """A bar of the current pass on a terminal; nothing otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn

    from .progress import stderr_console

    # On stderr, as every bar (stdout carries the results, --json too).
    with Progress("[bold]{task.description}", BarColumn(), TextColumn("{task.fields[info]}"),
                  console=stderr_console(), transient=True, redirect_stdout=False) as p:
        task = p.add_task(label, total=total, info="")
        state = {"pass": 0, "t": 0.0}

        def update(m: Any) -> None:
            now = time.monotonic()
            if m.passes != state["pass"]:
                state["pass"] = m.passes
                p.update(task, total=max(m.remaining, 1) + 1, completed=0)
            if now - state["t"] < 0.1:
                return
            state["t"] = now
            tot = p.tasks[0].total or 1
            p.update(task, completed=max(0, tot - m.remaining),
                     description=f"{label} pass {m.passes}",
                     info=f"{m.sink.transferred / 2**20:,.0f} MiB sent")
        yield update


def _config(a: argparse.Namespace, mapped: bool) -> Any:
    from ..engine.capabilities import MigrationConfig

    cfg = MigrationConfig()
    if mapped:
        cfg.set_capabilities({"mapped-ram": True, "multifd": a.multifd > 0})
        if a.multifd > 0:
            cfg.set_parameters({"multifd-channels": a.multifd})
    params: dict[str, Any] = {"direct-io": bool(getattr(a, "direct_io", False))}
    for k in ("max_bandwidth", "downtime_limit"):
        v = getattr(a, k, None)
        if v is not None:
            params[k.replace("_", "-")] = v
    cfg.set_parameters(params)
    cfg.max_passes = getattr(a, "max_passes", None) or 0
    return cfg


def _as_uri(target: str) -> str:
    return target if target.split(":", 1)[0] in ("file", "tcp", "unix", "exec", "fd") \
        else f"file:{target}"


# -- save / restore ----------------------------------------------------------------


def cmd_save(a: argparse.Namespace) -> int:
    from ..describe import SCHEMA_VERSION
    from ..engine.precopy import Migration

    uri = _as_uri(a.uri)
    mapped = a.mapped_ram
    cfg = _config(a, mapped)
    g = _guest(a)
    try:
        if a.live_for > 0:
            time.sleep(a.live_for)
        else:
            g.stop()
        with _mig_progress("saving", g.ram_size) as prog:
            m = Migration(g, cfg, uri, on_progress=prog).run()
        q = m.query()
        # fixedram's own keys in snake_case; QEMU's query-migrate reply kept whole,
        # under QEMU's names, in one key (docs/json.md).
        doc = {"schema_version": SCHEMA_VERSION, "status": q["status"], "passes": m.passes,
               "ram_digest": g.digest(), "query_migrate": q}
        if a.json:
            print(json.dumps(doc, indent=2))
        else:
            r = q["ram"]
            print(f"saved {uri}: {m.passes} passes, {r['transferred']:,} bytes, "
                  f"total {q['total-time']} ms, downtime {q['downtime']} ms")
            print(f"ram digest {doc['ram_digest']}")
    finally:
        g.shutdown()
    return 0


def _libvirt_start(path: str) -> int:
    """Where the QEMU data of a libvirt save image start; 0 for any other file."""
    from ..format.libvirt import probe_libvirt

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return 0  # the load names the error
    try:
        hdr = probe_libvirt(fd, os.fstat(fd).st_size, path)
    finally:
        os.close(fd)
    return hdr.data_offset if hdr is not None else 0


def cmd_restore(a: argparse.Namespace) -> int:
    from ..engine.capabilities import MigrationConfig
    from ..engine.guest import MACHINE, BuiltinGuest
    from ..engine.incoming import Incoming
    from ..save import open_file
    from ..transports.uri import MigrationURI, parse_uri

    t0 = time.monotonic()
    uri = parse_uri(_as_uri(a.uri))
    cfg = MigrationConfig()
    ram = a.ram
    notes: list[str] = []
    if uri.kind == "file":
        if uri.offset == 0 and not uri.path.startswith("/dev/fdset/"):
            # A libvirt image: its mapped-ram offsets are absolute in the image.
            start = _libvirt_start(uri.path)
            if start:
                uri = MigrationURI("file", uri.text, path=uri.path, offset=start)
        with open_file(uri.path, offset=uri.offset) as mf:
            if mf.fd < 0:  # a qcow2 snapshot's VM state: no file offsets to load from
                raise UsageError(f"{uri.path}: restore loads a save file; convert the snapshot "
                                 "to one first ('fixedram convert IMAGE --snapshot ID OUT "
                                 "--to mapped-ram')")
            if mf.machine != MACHINE:
                raise UsageError(
                    f"{uri.path}: a save of a {mf.machine} machine, made by QEMU or libvirt; "
                    "restore loads fixedram's built-in guest only: restore it with "
                    "'virsh restore', or into a QEMU with 'fixedram send FILE URI'")
            mapped = mf.format == "mapped-ram"
            ram = mf.block("pc.ram").used_length
        caps = {"mapped-ram": mapped, "multifd": mapped and a.multifd > 0,
                "postcopy-ram": a.postcopy}
        # As on a destination (fast snapshot load); the mapping needs no userfaultfd.
        cfg.set_capabilities(caps, inmigrate=True, host_check=False)
        if mapped and a.multifd > 0:
            cfg.set_parameters({"multifd-channels": a.multifd, "direct-io": a.direct_io})
        if a.max_postcopy_bandwidth:
            cfg.set_parameters({"max-postcopy-bandwidth": a.max_postcopy_bandwidth})
        if a.postcopy and not mapped:
            notes.append(f"{uri.text}: a sequential stream has no fixed page offsets to map; "
                         "loading it eagerly")
    elif a.postcopy:
        notes.append(f"{uri.text}: a {uri.kind}: stream is read once, in order; loading it "
                     "eagerly")
    if ram is None:
        raise TransportError("--ram is needed to restore from a non-file transport")
    for n in notes:
        print(f"fixedram: {n}", file=sys.stderr)
    g = BuiltinGuest(ram, fill=0)

    def note(text: str) -> None:
        notes.append(text)
        print(f"fixedram: {text}", file=sys.stderr)

    inc = Incoming(g, cfg, uri, autostart=False, on_note=note)
    try:
        inc.run()
    except MigrationError:
        if isinstance(inc.exc, KeyboardInterrupt):  # a signal: exit as interrupted
            raise inc.exc from None
        raise
    running, complete = inc.t_running - t0, inc.t_end - t0
    from ..describe import SCHEMA_VERSION

    out: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "status": inc.status, "ram_bytes": ram,
        "pages_loaded": inc.pages, "seconds": round(complete, 3),
        "lazy": inc.lazy is not None, "running_after_s": round(running, 4),
        "complete_after_s": round(complete, 4)}
    if notes:
        out["note"] = notes[-1]
    if a.checksum:
        out["ram_digest"] = g.digest()
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        how = "lazy" if out["lazy"] else "eager"
        print(f"restored {uri.text} ({how}): {inc.pages:,} pages; the guest could run after "
              f"{running:.3f} s, every page resident after {complete:.3f} s "
              f"({ram / 2**20 / max(complete, 1e-9):,.0f} MiB/s of RAM)")
        if a.checksum:
            print(f"ram digest {out['ram_digest']}")
    return 0


# -- guest (QMP) ------------------------------------------------------------------


def cmd_guest(a: argparse.Namespace) -> int:
    from ..engine.machine import GuestMachine
    from ..engine.qmp_server import QMPServer

    g = _guest(a, fill=0.0 if a.incoming else None)
    try:
        m = GuestMachine(g, incoming=a.incoming, autostart=not a.S,
                         exit_on_error=a.exit_on_error)
    except Exception:
        g.shutdown()
        raise
    srv = QMPServer(m, a.qmp)
    signal.signal(signal.SIGTERM, lambda *_: m.quit_requested.set())
    print(f"fixedram guest: {a.ram:,} bytes RAM, QMP on unix:{a.qmp}", file=sys.stderr)
    rc = 0
    try:
        rc = srv.serve_forever()
    except KeyboardInterrupt:
        srv.close()
    finally:
        m.shutdown()  # a save in progress removes its temporary file
        g.shutdown()
    return rc


# -- demo -------------------------------------------------------------------------


class _SizeSampler:
    """The output file's apparent size (st_size) against seconds since the save
    started, sampled by a thread every :data:`SAMPLE_S` seconds while the engine
    writes it under its temporary name (which the file: channel names)."""

    SAMPLE_S = 0.05  # ~20 Hz

    def __init__(self, m: Any) -> None:
        import threading  # here: every command's parser imports this module

        self.m = m
        self.series: list[tuple[float, int]] = []
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True, name="demo-sizes")
        self.t.start()

    def _run(self) -> None:
        while not self.stop.wait(self.SAMPLE_S):
            m = self.m
            path = getattr(getattr(m.sink, "ch", None), "write_path", None)
            if path is None or not m.t_start:
                continue  # the save has not opened its file yet
            with contextlib.suppress(OSError):  # renamed into place meanwhile
                size = os.stat(path).st_size
                if not self.series:
                    self.series.append((0.0, 0))  # the file was created empty
                self.series.append((time.monotonic() - m.t_start, size))

    def close(self) -> None:
        self.stop.set()
        self.t.join()

    def finish(self, path: str) -> list[list[float]]:
        """The series, ending with the committed file's size when the save ended."""
        self.close()
        m = self.m
        self.series = [(t, n) for t, n in self.series if t < m.t_end - m.t_start]
        self.series.append((m.t_end - m.t_start, os.stat(path).st_size))
        return [[round(t, 3), n] for t, n in self.series]


def _demo_run(a: argparse.Namespace, mode: str, path: str) -> dict[str, Any]:
    from ..engine.guest import BuiltinGuest
    from ..engine.incoming import load_file
    from ..engine.precopy import Migration

    mapped = mode == "fixed-ram"
    cfg = _config(a, mapped)
    g = _guest(a)
    try:
        time.sleep(0.3)  # let the workload get going
        with _mig_progress(f"{mode:9}", g.ram_size) as prog:
            m = Migration(g, cfg, f"file:{path}", on_progress=prog)
            sampler = _SizeSampler(m) if a.plot else None
            try:
                m.run()
            finally:
                if sampler is not None:
                    sampler.close()
        series = sampler.finish(path) if sampler is not None else None
        q = m.query()
        src_digest, src_seq = g.digest(), g.seq
        ram_total = sum(b.size for b in g.blocks)
    finally:
        g.shutdown()
    st = os.stat(path)
    dst = BuiltinGuest(a.ram, fill=0, seed=a.seed)
    t = time.monotonic()
    load_file(path, dst, cfg)
    restore_s = time.monotonic() - t
    verified = dst.digest() == src_digest and dst.seq == src_seq
    tt = q["total-time"] / 1000
    run: dict[str, Any] = {
        "mode": mode,
        "apparent_bytes": st.st_size,
        "allocated_bytes": st.st_blocks * 512,
        "ram_total_bytes": ram_total,
        "passes": m.passes,
        "dirty_sync_count": q["ram"]["dirty-sync-count"],
        "converged": not (a.max_passes and m.passes > a.max_passes),
        "total_time_s": round(tt, 3),
        "downtime_ms": q["downtime"],
        "setup_time_ms": q["setup-time"],
        "transferred_bytes": q["ram"]["transferred"],
        "throughput_mib_s": round(q["ram"]["transferred"] / 2**20 / max(tt, 1e-9), 1),
        "normal_pages": q["ram"]["normal"],
        "zero_pages": q["ram"]["duplicate"],
        "restore_time_s": round(restore_s, 3),
        "verified": verified,
    }
    if series is not None:
        run["size_series"] = series  # [seconds, apparent_bytes] pairs, with --plot
    return run


def cmd_demo(a: argparse.Namespace) -> int:
    from ..output import AtomicOutput

    plot: AtomicOutput | None = None
    if a.plot:
        from .map import _check_matplotlib

        _check_matplotlib("--plot")
        plot = AtomicOutput(a.plot, force=a.force, mode=0o644)  # refused now, not after
    try:
        return _demo(a, plot)
    finally:
        if plot is not None and not plot.done:
            plot.abort()


def _demo(a: argparse.Namespace, plot: Any) -> int:
    import tempfile

    from ..engine.sinks import probe_direct_io
    from ..output import register_temporary, unregister_temporary

    workdir = a.dir or tempfile.mkdtemp(prefix="fixedram-demo-", dir=".")
    made = a.dir is None
    if made and not a.keep:
        register_temporary(os.path.abspath(workdir))  # removed even on a second signal
    os.makedirs(workdir, exist_ok=True)
    note = ""
    if a.direct_io:
        try:
            probe_direct_io(workdir)
        except CapabilityError as e:
            a.direct_io = False
            note = f"direct-io off: {e}"
    paths = {mode: os.path.join(workdir, f"demo-{mode}.mig") for mode in ("stream", "fixed-ram")}
    for path in paths.values():
        if not made and os.path.lexists(path):  # the user's file, or a kept earlier run
            raise OutputError(f"{path}: already exists; the demo writes and removes its own "
                              "files in --dir (remove it or choose another --dir)")
    runs = []
    try:
        for mode, path in paths.items():
            try:
                runs.append(_demo_run(a, mode, path))
            finally:
                if not a.keep:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
    finally:
        if made and not a.keep:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
            unregister_temporary(os.path.abspath(workdir))
    from ..describe import SCHEMA_VERSION

    out = {
        "schema_version": SCHEMA_VERSION,
        "ram_bytes": a.ram,
        "ram_blocks": 2,
        "workload": {"pattern": a.workload, "rate_bytes_s": a.workload_rate,
                     "threads": a.workload_threads},
        "max_bandwidth_bytes_s": a.max_bandwidth,
        "downtime_limit_ms": a.downtime_limit,
        "max_passes": a.max_passes,
        "multifd_channels": a.multifd,
        "direct_io": a.direct_io,
        "files_dir": workdir if a.keep else None,
        "runs": runs,
    }
    if note:
        out["note"] = note
    if plot is not None:
        _plot_sizes(out, plot)
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        _print_demo(out)
    return 0 if all(r["verified"] for r in runs) else 1


def _plot_sizes(out: dict[str, Any], dest: Any) -> None:
    """File size against time of both saves, with RAM size (the mapped-ram bound)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    mib = 2**20
    labels = {"stream": "stream (sequential)", "fixed-ram": "fixed-ram (mapped-ram, "
              f"{out['multifd_channels']} multifd channels)"}
    fig, ax = plt.subplots(figsize=(9, 5))
    for r in out["runs"]:
        ts, sizes = zip(*r["size_series"], strict=True)
        # gid: each series is an SVG group named after its mode.
        ax.plot(ts, [n / mib for n in sizes], label=labels[r["mode"]],
                gid=f"series-{r['mode']}", linewidth=1.8)
    ram = out["runs"][0]["ram_total_bytes"] if out["runs"] else out["ram_bytes"]
    ax.axhline(ram / mib, color="0.4", linestyle="--", linewidth=1, gid="ram-size",
               label=f"guest RAM {ram / mib:,.0f} MiB (mapped-ram bound)")
    ax.set_xlabel("seconds since the save started")
    ax.set_ylabel("file size (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=0)
    ax.set_title(f"Live save of a {out['ram_bytes'] / mib:,.0f} MiB guest re-dirtied at "
                 f"{out['workload']['rate_bytes_s'] / mib:,.0f} MiB/s", fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    fig.tight_layout()
    try:
        with os.fdopen(os.dup(dest.fd), "wb") as f:
            fig.savefig(f, format="svg")
        dest.commit()
    finally:
        plt.close(fig)


def _print_demo(out: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    mib = 2**20
    ram = out["ram_bytes"]
    t = Table(title=f"Live save of a {ram / mib:,.0f} MiB guest re-dirtied at "
                    f"{out['workload']['rate_bytes_s'] / mib:,.0f} MiB/s "
                    f"(max-bandwidth {out['max_bandwidth_bytes_s'] / mib:,.0f} MiB/s)")
    for col in ("mode", "file size", "allocated", "size / RAM", "passes", "sent",
                "throughput", "downtime", "total", "restore", "RAM equal"):
        t.add_column(col, justify="left" if col == "mode" else "right")
    for r in out["runs"]:
        t.add_row(r["mode"], f"{r['apparent_bytes'] / mib:,.1f} MiB",
                  f"{r['allocated_bytes'] / mib:,.1f} MiB",
                  f"{r['apparent_bytes'] / ram:.2f}x", str(r["passes"]),
                  f"{r['transferred_bytes'] / mib:,.0f} MiB",
                  f"{r['throughput_mib_s']:,.0f} MiB/s", f"{r['downtime_ms']} ms",
                  f"{r['total_time_s']:.2f} s", f"{r['restore_time_s']:.2f} s",
                  "yes" if r["verified"] else "NO")
    c = Console(width=None if sys.stdout.isatty() else 150)
    c.print(t)
    c.print("The stream appends every re-sent page; fixed-ram rewrites each page at its fixed "
            "offset, so its file stays the size of RAM.")
    if out.get("note"):
        c.print(out["note"])


SAVE_EPILOG = """\
examples:
  fixedram save vm.mig --ram 1G                          a paused save, as a stream
  fixedram save file:vm.mapped --mapped-ram --multifd 4 --direct-io --live-for 2
  fixedram save tcp:127.0.0.1:4444 --json                into any destination that listens
"""

RESTORE_EPILOG = """\
examples:
  fixedram restore vm.mapped --checksum                  load every page, print ram_digest
  fixedram restore vm.mapped --postcopy --json           run at once, fault the rest in
  fixedram restore tcp:127.0.0.1:4444 --ram 1G           listen for a migration
"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    raw = argparse.RawDescriptionHelpFormatter
    s = sub.add_parser("demo", help="live-save a busy built-in guest as a stream and as "
                       "fixed-ram, compare, restore and verify", formatter_class=raw,
                       epilog="""examples:
  fixedram demo                              256 MiB guest, both saves, sizes and times
  fixedram demo --ram 1G --json              one JSON object
  fixedram demo --plot sizes.svg             both files' size against time
""")
    _add_guest_args(s, "256M", "512M")
    s.add_argument("--max-bandwidth", type=_size, default=_size("256M"),
                   help="bytes/s the save may use (models the disk; default 256M)")
    s.add_argument("--downtime-limit", type=int_in(0, 2000000), default=300,
                   help="ms (default 300)")
    s.add_argument("--max-passes", type=int_in(0, 1 << 31), default=6,
                   help="switch over after this many passes if not converged (default 6)")
    s.add_argument("--multifd", type=int_in(0, 255), default=4,
                   help="fixed-ram channels (default 4)")
    s.add_argument("--no-direct-io", dest="direct_io", action="store_false",
                   help="do not use O_DIRECT for fixed-ram (used when the disk allows it)")
    s.add_argument("--dir", help="where to write the files (default: a temporary directory "
                   "under the current one)")
    s.add_argument("--keep", action="store_true", help="keep the files")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--plot", metavar="OUT.svg", help="draw both files' size against time "
                   "into OUT.svg (needs matplotlib: pip install 'fixedram[plot]'); --json runs "
                   "then hold size_series, [seconds, bytes] pairs")
    s.add_argument("--force", action="store_true", help="replace an existing --plot output")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("save", help="save the built-in guest to a URI (file:, tcp:, unix:, "
                       "exec:, fd:) or a file", formatter_class=raw,
                       description="Save fixedram's built-in guest (anonymous memory written by "
                       "vCPU threads), as QEMU's migrate does. For a real VM, use virsh save, or "
                       "receive a QEMU's migration with 'fixedram receive URI -o FILE'.",
                       epilog=SAVE_EPILOG)
    s.add_argument("uri")
    _add_guest_args(s, "64M", "0")
    s.add_argument("--live-for", type=number_in(0, 10**7), default=0.0,
                   help="run the guest this many seconds, then save live (default: paused "
                   "save)")
    s.add_argument("--mapped-ram", "--fixed-ram", dest="mapped_ram", action="store_true",
                   help="fixed-ram (mapped-ram) file layout; needs a file: URI")
    s.add_argument("--multifd", type=int_in(0, 255), default=0,
                   help="mapped-ram channels (0 = off)")
    s.add_argument("--direct-io", action="store_true")
    s.add_argument("--max-bandwidth", type=_size, default=0, help="bytes/s (0 = unlimited)")
    s.add_argument("--downtime-limit", type=int_in(0, 2000000), default=300)
    s.add_argument("--max-passes", type=int_in(0, 1 << 31), default=0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_save)

    s = sub.add_parser("restore", help="load a migration into a fresh built-in guest",
                       formatter_class=raw,
                       description="Load a save of fixedram's built-in guest into a fresh one, "
                       "as QEMU's migrate-incoming does. A save of a real VM (QEMU, libvirt) is "
                       "restored with virsh restore, or sent into a QEMU started with -incoming "
                       "with 'fixedram send FILE URI' (--postcopy: the guest runs at once).",
                       epilog=RESTORE_EPILOG)
    s.add_argument("uri", help="file, file:PATH[,offset=N], tcp:HOST:PORT, unix:PATH, exec:CMD")
    s.add_argument("--ram", type=_ram_size, default=None,
                   help="guest RAM (needed unless file)")
    s.add_argument("--multifd", type=int_in(0, 255), default=0,
                   help="parallel readers for mapped-ram")
    s.add_argument("--direct-io", action="store_true")
    s.add_argument("--postcopy", action="store_true",
                   help="lazy load of a mapped-ram file (QEMU's fast snapshot load: "
                   "mapped-ram + postcopy-ram at the destination): RAM is mapped from the file "
                   "copy-on-write, the guest can run at once and a thread faults in the rest; "
                   "other inputs load eagerly, with a note saying why")
    s.add_argument("--max-postcopy-bandwidth", type=_size, default=0,
                   help="with --postcopy: bytes/s the background fault-in may read "
                   "(QEMU's max-postcopy-bandwidth; 0 = unlimited)")
    s.add_argument("--checksum", action="store_true",
                   help="print the RAM digest once every page is loaded (as save prints it)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_restore)

    s = sub.add_parser("guest", help="run the built-in guest with a QMP socket, like "
                       "qemu-system-x86_64 -qmp unix:PATH (see docs/qmp.md)",
                       formatter_class=raw, epilog="""examples:
  fixedram guest --qmp /tmp/g.sock --ram 64M -S &     then drive it with qemu.qmp or socat
  fixedram guest --qmp /tmp/d.sock --incoming defer   a destination for migrate-incoming
""")
    s.add_argument("--qmp", required=True, help="unix socket path (QMP server)")
    _add_guest_args(s, "64M", "64M")
    s.add_argument("--incoming", help="'defer' or a URI to receive a migration (the process "
                   "exits with status 1 if it fails, as QEMU's -incoming does; "
                   "migrate-incoming takes exit-on-error false to stay up)")
    s.add_argument("--no-exit-on-error", dest="exit_on_error", action="store_false",
                   help="stay up when the --incoming migration fails (QEMU's exit-on-error "
                   "off; migrate-incoming takes it as an argument)")
    s.add_argument("-S", action="store_true", help="do not start the vCPUs (run state "
                   "prelaunch until cont)")
    s.set_defaults(func=cmd_guest)



