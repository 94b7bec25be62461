"""Extract benchmark (issue 2): ``fixedram extract`` of a 1 GiB mapped-ram file and of a
1 GiB multi-pass stream, against ``cp --sparse=always`` of the same file and against
volatility3's QEMU layer reading the same stream.

Run from the repository root after ``python bench/make_inputs.py``::

    . .venv/bin/activate && python bench/bench_extract.py [--reps 5] [--cold] [--json]

Every figure is a median of ``--reps`` runs in this invocation. Cache policy: warm by default
(inputs read once before, dirty data synced before every run, untimed); ``--cold`` drops the page
cache (``echo 3 > /proc/sys/vm/drop_caches``) before every run instead, for all tools alike.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

from benchlib import (
    FIXEDRAM,
    INPUTS,
    MIB,
    ROOT,
    WORK,
    baseline_rss,
    drop_caches,
    median,
    options,
    remove,
    run,
)
from fixedram.format.migfile import MigrationFile


def index_bytes(path: str) -> int:
    """What the file's index costs by design: a stream keeps int64 + uint32 per page; a
    mapped-ram file its bitmap words plus one bool per page."""
    with MigrationFile(path) as mf:
        if mf.format == "stream":
            return sum(b.npages for b in mf.blocks) * 12
        return sum(b.record.bitmap_bytes + b.npages for b in mf.blocks)


def bench_file(name: str, reps: int, cold: bool) -> dict[str, Any]:
    src = INPUTS / f"{name}.mig"
    cp_out = WORK / f"{name}.cp"
    ex_out = WORK / f"{name}.extract"
    cp_cmd = ["cp", "--sparse=always", str(src), str(cp_out)]
    # fixedram's outputs are atomic: fsynced before the rename. The same durability for cp:
    cps_cmd = ["sh", "-c", 'cp --sparse=always "$1" "$2" && sync "$2"', "sh", str(src),
               str(cp_out)]
    ex_cmd = [FIXEDRAM, "extract", str(src), "-o", str(ex_out)]
    cp_t, cps_t, ex_t, rss = [], [], [], []
    for _ in range(reps):  # interleaved, so drifts hit all alike
        cp_t.append(run(cp_cmd, cold=cold, out=cp_out).seconds)
        cps_t.append(run(cps_cmd, cold=cold, out=cp_out).seconds)
        s = run(ex_cmd, cold=cold, out=ex_out)
        ex_t.append(s.seconds)
        rss.append(s.maxrss)
    remove(cp_out)
    remove(ex_out)
    with MigrationFile(src) as mf:
        ram = sum(b.used_length for b in mf.blocks)
        present = sum(b.pages_present * b.page_size for b in mf.blocks)
    cp_m, cps_m, ex_m = median(cp_t), median(cps_t), median(ex_t)
    return {"file": str(src.relative_to(ROOT)), "size": src.stat().st_size, "ram": ram,
            "present": present, "cp_s": cp_m, "cp_sync_s": cps_m, "extract_s": ex_m,
            "ratio_vs_cp": cp_m / ex_m, "ratio_vs_cp_sync": cps_m / ex_m,
            "extract_mib_s": present / MIB / ex_m, "cp_mib_s": src.stat().st_size / MIB / cp_m,
            "peak_rss": max(rss), "index_bytes": index_bytes(str(src)),
            "cp_all": cp_t, "cp_sync_all": cps_t, "extract_all": ex_t,
            "cmd_cp": " ".join(cp_cmd), "cmd_cp_sync": "cp --sparse=always IN OUT && sync OUT",
            "cmd_extract": " ".join(ex_cmd)}


def layer(engine: str, path: str, cold: bool, mib: int) -> dict[str, Any]:
    if cold:
        drop_caches()
    cmd = [sys.executable, str(ROOT / "bench" / "layer_read.py"), engine, path, "--mib", str(mib)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def bench_vol3(reps: int, cold: bool, mib: int) -> dict[str, Any]:
    """volatility3 builds its layer over the whole stream (timed fully), then reads ``mib`` MiB
    of guest RAM; the 1 GiB time is extrapolated as open + read * (RAM / mib). fixedram's read
    API (MigrationFile + RunCopier.read_run over all of RAM, no output) is timed alongside."""
    vol_path = str(INPUTS / "stream-vol3.mig")
    vs, fs = [], []
    for _ in range(reps):
        vs.append(layer("vol3", vol_path, cold, mib))
        fs.append(layer("fixedram", str(INPUTS / "stream.mig"), cold, mib))
    ram = vs[0]["ram_bytes"]
    vol_full = [v["open_s"] + v["read_s"] * ram / v["read_bytes"] for v in vs]
    fx_full = [f["open_s"] + f["read_s"] for f in fs]
    return {"vol3_open_s": median([v["open_s"] for v in vs]),
            "vol3_read_s": median([v["read_s"] for v in vs]), "vol3_read_mib": mib,
            "vol3_1gib_s": median(vol_full), "vol3_mib_s": ram / MIB / median(vol_full),
            "vol3_pages_differ": vs[0]["pages_differ"], "vol3_pages_read": vs[0]["pages_read"],
            "fixedram_open_s": median([f["open_s"] for f in fs]),
            "fixedram_read_s": median([f["read_s"] for f in fs]),
            "fixedram_1gib_s": median(fx_full), "ram": ram}


def main() -> None:
    def vol_options(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--vol-reps", type=int, default=3)
        ap.add_argument("--vol-mib", type=int, default=64, help="MiB volatility3 reads")

    a = options(__doc__, ("mapped", "stream", "stream-vol3"), vol_options)
    base = baseline_rss()
    res: dict[str, Any] = {"cache": "cold" if a.cold else "warm", "reps": a.reps,
                           "baseline_rss": base}
    for n in ("mapped", "stream"):
        res[n] = r = bench_file(n, a.reps, a.cold)
        r["rss_beyond"] = r["peak_rss"] - base - r["index_bytes"]
    res["vol3"] = v = bench_vol3(a.vol_reps, a.cold, a.vol_mib)
    v["ratio_extract"] = v["vol3_1gib_s"] / res["stream"]["extract_s"]
    v["ratio_read_api"] = v["vol3_1gib_s"] / v["fixedram_1gib_s"]
    if a.json:
        print(json.dumps(res, indent=2))
        return
    print(f"cache: {res['cache']}, medians of {a.reps} (volatility3: {a.vol_reps})")
    print(f"baseline RSS (python + numpy + fixedram CLI imports): {base / MIB:.1f} MiB")
    print("| input | file MiB | cp s | cp+sync s | extract s | extract MiB/s | vs cp (>= 0.8) | "
          "vs cp+sync | peak RSS MiB | index MiB | RSS beyond baseline+index MiB (<= 64) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in ("mapped", "stream"):
        r = res[n]
        print(f"| {n} | {r['size'] / MIB:.0f} | {r['cp_s']:.2f} | {r['cp_sync_s']:.2f} | "
              f"{r['extract_s']:.2f} | {r['extract_mib_s']:.0f} | {r['ratio_vs_cp']:.2f}x | "
              f"{r['ratio_vs_cp_sync']:.2f}x | {r['peak_rss'] / MIB:.1f} | "
              f"{r['index_bytes'] / MIB:.2f} | {max(r['rss_beyond'], 0) / MIB:.1f} |")
    print(f"volatility3 on the stream: open {v['vol3_open_s']:.2f} s + read {a.vol_mib} MiB "
          f"{v['vol3_read_s']:.2f} s -> 1 GiB ~{v['vol3_1gib_s']:.1f} s "
          f"({v['vol3_mib_s']:.0f} MiB/s, extrapolated); stale pages in what it read: "
          f"{v['vol3_pages_differ']}/{v['vol3_pages_read']}")
    print(f"fixedram read API on the stream: open {v['fixedram_open_s']:.2f} s + read all "
          f"{v['fixedram_read_s']:.2f} s = {v['fixedram_1gib_s']:.2f} s")
    print(f"vs volatility3 (>= 20x): fixedram extract {v['ratio_extract']:.1f}x, "
          f"read API {v['ratio_read_api']:.1f}x")


if __name__ == "__main__":
    main()
