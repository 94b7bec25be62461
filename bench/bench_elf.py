"""ELF core benchmark (issue 8): ``fixedram extract --format elf`` of the 1 GiB inputs against
``cp --sparse=always IN OUT && sync OUT`` of the same file, and the speed of the RAM scan for
the Linux VMCOREINFO note.

Run from the repository root after ``python bench/make_inputs.py``::

    . .venv/bin/activate && python bench/bench_elf.py [--reps 5] [--cold] [--json]

The boot-sector guest of the inputs has no VMCOREINFO note, so every extract scans all of
its RAM (the worst case; a Linux guest's note is usually found in the first tens of MiB).
The scan runs in a second thread while RAM is copied. Its own throughput is measured alone,
in this process, as present RAM bytes / seconds of ``elfcore.find_vmcoreinfo`` (warm cache).
Every figure is a median of ``--reps`` interleaved runs in this invocation; the target is
extract <= 1.1x the time of cp + sync (the extract fsyncs its output before renaming it).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from benchlib import FIXEDRAM, INPUTS, MIB, ROOT, WORK, drop_caches, median, options, remove, run
from fixedram.format.migfile import MigrationFile
from fixedram.memory import elfcore

GIB = 1 << 30
TARGET = 1.1
NAMES = ("mapped", "stream")


def bench_file(name: str, reps: int, cold: bool) -> dict[str, Any]:
    src = INPUTS / f"{name}.mig"
    cp_out = WORK / f"{name}.cp"
    elf_out = WORK / f"{name}.elf"
    cps_cmd = ["sh", "-c", 'cp --sparse=always "$1" "$2" && sync "$2"', "sh", str(src),
               str(cp_out)]
    elf_cmd = [FIXEDRAM, "extract", str(src), "-o", str(elf_out), "--format", "elf"]
    cps_t, elf_t, rss = [], [], []
    for _ in range(reps):  # interleaved, so drifts hit both alike
        cps_t.append(run(cps_cmd, cold=cold, out=cp_out).seconds)
        s = run(elf_cmd, cold=cold, out=elf_out)
        elf_t.append(s.seconds)
        rss.append(s.maxrss)
    remove(cp_out)
    remove(elf_out)
    cps_m, elf_m = median(cps_t), median(elf_t)
    return {"file": str(src.relative_to(ROOT)), "size": src.stat().st_size,
            "cp_sync_s": cps_m, "elf_s": elf_m, "ratio": elf_m / cps_m,
            "meets_target": elf_m / cps_m <= TARGET, "peak_rss": max(rss),
            "cp_sync_all": cps_t, "elf_all": elf_t,
            "cmd_cp_sync": "cp --sparse=always IN OUT && sync OUT",
            "cmd_elf": " ".join(elf_cmd)}


def bench_scan(name: str, reps: int, cold: bool) -> dict[str, Any]:
    src = INPUTS / f"{name}.mig"
    times = []
    with MigrationFile(src) as mf:
        ranges = elfcore.physical_ranges(mf)
        scanned = sum(r.block.pages_present * r.block.page_size for r in ranges
                      if r.block_offset == 0)  # pc.ram once (present pages are what is read)
        for _ in range(reps):
            if cold:
                drop_caches()
            t0 = time.perf_counter()
            found = elfcore.find_vmcoreinfo(mf, ranges)
            times.append(time.perf_counter() - t0)
            if found is not None:
                sys.exit(f"{src} holds a VMCOREINFO note: the scan stopped early, no figure")
    t = median(times)
    return {"file": str(src.relative_to(ROOT)), "scanned_bytes": scanned, "scan_s": t,
            "scan_gib_s": scanned / GIB / t, "scan_all": times}


def main() -> None:
    a = options(__doc__, NAMES)
    res: dict[str, Any] = {"cache": "cold" if a.cold else "warm", "reps": a.reps,
                           "target": TARGET}
    for n in NAMES:
        res[n] = bench_file(n, a.reps, a.cold)
        res[n]["scan"] = bench_scan(n, a.reps, a.cold)
    if a.json:
        print(json.dumps(res, indent=2))
        return
    print(f"cache: {res['cache']}, medians of {a.reps}, interleaved")
    print(f"| input | file MiB | cp+sync s | extract --format elf s | elf / cp+sync "
          f"(<= {TARGET}) | peak RSS MiB | VMCOREINFO scan alone s | scan GiB/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for n in NAMES:
        r, s = res[n], res[n]["scan"]
        print(f"| {n} | {r['size'] / MIB:.0f} | {r['cp_sync_s']:.2f} | {r['elf_s']:.2f} | "
              f"{r['ratio']:.2f}x{'' if r['meets_target'] else ' (miss)'} | "
              f"{r['peak_rss'] / MIB:.1f} | {s['scan_s']:.3f} | {s['scan_gib_s']:.2f} |")


if __name__ == "__main__":
    main()
