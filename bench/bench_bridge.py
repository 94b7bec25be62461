"""Bridge benchmark: QEMU 10 migrating a 1 GiB guest into ``fixedram receive``
(tcp, single channel and multifd 4) versus into its own ``file:`` with
mapped-ram on (single channel and multifd 4), same machine, same invocation;
and with ``multifd-compression`` zstd on 2 channels, ``fixedram receive``
versus a QEMU 10 destination (``-incoming``, same capabilities and
parameters) on the same machine.

The guest is our boot-sector guest with 768 MiB of its RAM written (the rest
zero pages), paused before ``migrate`` so every variant moves the same bytes.
The figure compared is QEMU's own ``total-time`` from ``query-migrate``;
``fixedram receive`` runs as a separate process, as a user would run it, and
its output is fsynced and renamed before it exits (QEMU's ``file:`` is not
fsynced, so the comparison is slightly unfair to us). As the source does not
wait for its destination, ``end_to_end_ms`` also times ``migrate`` until the
destination is done (QEMU destination: its load completed; ``fixedram
receive``: the process exited with the file in place).

Run from the repository root::

    . .venv/bin/activate && python bench/bench_bridge.py [--ram 1G] [--reps 3] [--json]
    python bench/bench_bridge.py --variants zstd          # only the compressed pair
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from qemu_harness import QemuVM, write_bootsector  # noqa: E402

MIB = 1 << 20
FIXEDRAM = [sys.executable, "-m", "fixedram.cli.main"]


# Variant -> (destination, multifd channels, multifd-compression).
VARIANTS: dict[str, tuple[str, int, str]] = {
    "qemu-file-mapped-ram": ("file", 0, "none"),
    "fixedram-receive-tcp": ("receive", 0, "none"),
    "qemu-file-mapped-ram-multifd4": ("file", 4, "none"),
    "fixedram-receive-tcp-multifd4": ("receive", 4, "none"),
    "qemu-to-qemu-multifd2-zstd": ("qemu", 2, "zstd"),
    "fixedram-receive-tcp-multifd2-zstd": ("receive", 2, "zstd"),
}
# Ratio name -> (ours, baseline).
RATIOS = {
    "single": ("fixedram-receive-tcp", "qemu-file-mapped-ram"),
    "multifd4": ("fixedram-receive-tcp-multifd4", "qemu-file-mapped-ram-multifd4"),
    "multifd2-zstd": ("fixedram-receive-tcp-multifd2-zstd", "qemu-to-qemu-multifd2-zstd"),
}


def _incoming_address(dst: QemuVM) -> str:
    """The tcp address a ``migrate-incoming tcp:127.0.0.1:0`` destination bound."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for a in dst.query_migrate().get("socket-address", []):
            if a.get("type") == "inet":
                return f"tcp:{a['host']}:{a['port']}"
        time.sleep(0.05)
    raise RuntimeError("the QEMU destination did not report its listening address")


def _run_one(work: Path, image: Path, ram: int, variant: str) -> dict[str, Any]:
    out = work / f"{variant}.mig"
    for p in (out, work / "sock"):
        if p.exists():
            p.unlink()
    dest, channels, comp = VARIANTS[variant]
    caps = {"mapped-ram": dest == "file", "multifd": bool(channels)}
    params: dict[str, Any] = {"max-bandwidth": 64 << 30, "downtime-limit": 30_000}
    if channels:
        params["multifd-channels"] = channels
        params["multifd-compression"] = comp
    dst: QemuVM | None = None
    with QemuVM(work, image, machine="pc", memory=ram, name=f"src-{variant}") as vm:
        vm.wait_for_progress(1, timeout=120)
        vm.stop()
        vm.set_caps(**caps)
        vm.set_params(**params)
        rx = None
        try:
            if dest == "file":
                uri = f"file:{out}"
            elif dest == "qemu":
                dst = QemuVM(work, image, machine="pc", memory=ram, name=f"dst-{variant}",
                             incoming=True, paused=True).launch()
                dst.set_caps(**caps)
                dst.set_params(**{k: v for k, v in params.items() if k.startswith("multifd")})
                dst.migrate_incoming("tcp:127.0.0.1:0", wait=False)
                uri = _incoming_address(dst)
            else:
                rx = subprocess.Popen([*FIXEDRAM, "receive", "tcp:127.0.0.1:0", "-o", str(out),
                                       "--json"], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE)
                assert rx.stderr is not None
                line = rx.stderr.readline().decode()
                uri = line.split("listening on ", 1)[1].strip()
            t0 = time.monotonic()
            info = vm.migrate(uri, timeout=600)
            summary = None
            if rx is not None:
                so, se = rx.communicate(timeout=600)
                if rx.returncode != 0:
                    raise RuntimeError(f"receive failed: {se.decode()}")
                summary = json.loads(so)
            if dst is not None:
                dst.wait_migration(600)
            end_to_end = (time.monotonic() - t0) * 1000
        finally:
            if dst is not None:
                dst.shutdown()
            if rx is not None and rx.poll() is None:
                rx.kill()
                rx.wait()
    res = {"variant": variant, "total_time_ms": info["total-time"],
           "end_to_end_ms": round(end_to_end), "transferred": info["ram"]["transferred"],
           "apparent": 0, "allocated": 0,
           "receive_seconds": summary["seconds"] if summary else None}
    if out.exists():
        st = out.stat()
        res["apparent"], res["allocated"] = st.st_size, st.st_blocks * 512
        out.unlink()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ram", default="1G")
    ap.add_argument("--written", default="768M", help="guest RAM the guest writes")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fill-words", type=int, default=2,
                    help="dwords the guest writes in each page (2: mostly zero pages)")
    ap.add_argument("--variants", default="all",
                    help="all, or a comma list of names or substrings (e.g. zstd)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    from qemu_harness.vm import parse_size

    ram = parse_size(a.ram)
    written = parse_size(a.written)
    base = Path(os.environ.get("FIXEDRAM_BENCH_DIR", ROOT / "build"))
    base.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-bridge-", dir=base))
    try:
        image = write_bootsector(work, mem_end=MIB + written, fill_words=a.fill_words)
        wanted = a.variants.split(",")
        variants = [v for v in VARIANTS
                    if a.variants == "all" or any(w == v or w in v for w in wanted)]
        if not variants:
            ap.error(f"no variant matches {a.variants!r}: {', '.join(VARIANTS)}")
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for _ in range(a.reps):
            for v in variants:  # interleaved, so drift hits every variant alike
                runs[v].append(_run_one(work, image, ram, v))
        rows = []
        for v in variants:
            t = statistics.median(r["total_time_ms"] for r in runs[v])
            e = statistics.median(r["end_to_end_ms"] for r in runs[v])
            last = runs[v][-1]
            rows.append({"variant": v, "total_time_ms_median": t,
                         "total_time_ms_all": [r["total_time_ms"] for r in runs[v]],
                         "end_to_end_ms_median": e,
                         "end_to_end_ms_all": [r["end_to_end_ms"] for r in runs[v]],
                         "apparent_bytes": last["apparent"], "allocated_bytes": last["allocated"],
                         "transferred": last["transferred"]})
        by = {r["variant"]: r for r in rows}
        ratios = {k: by[ours]["total_time_ms_median"] / by[base]["total_time_ms_median"]
                  for k, (ours, base) in RATIOS.items() if ours in by and base in by}
        ratios_e2e = {k: by[ours]["end_to_end_ms_median"] / by[base]["end_to_end_ms_median"]
                      for k, (ours, base) in RATIOS.items() if ours in by and base in by}
        doc = {"ram": ram, "written": written, "fill_words": a.fill_words, "reps": a.reps,
               "cpus": os.cpu_count(), "rows": rows, "ratio_receive_over_baseline": ratios,
               "ratio_receive_over_baseline_end_to_end": ratios_e2e}
        if a.json:
            print(json.dumps(doc, indent=2))
        else:
            print(f"{ram >> 20} MiB guest, {written >> 20} MiB written ({a.fill_words} dwords "
                  f"a page), paused, median of {a.reps}, {os.cpu_count()} CPUs")
            print(f"{'variant':36} {'total-time':>11} {'end-to-end':>11} {'transferred':>12} "
                  f"{'apparent':>10} {'allocated':>10}")
            for r in rows:
                print(f"{r['variant']:36} {r['total_time_ms_median']:>8.0f} ms "
                      f"{r['end_to_end_ms_median']:>8.0f} ms {r['transferred'] / MIB:>10.1f} M "
                      f"{r['apparent_bytes'] / MIB:>8.1f} M {r['allocated_bytes'] / MIB:>8.1f} M")
            for k, v in ratios.items():
                print(f"ratio receive / baseline ({k}): total-time {v:.2f}, "
                      f"end-to-end {ratios_e2e[k]:.2f}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
