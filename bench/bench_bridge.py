"""Bridge benchmark: QEMU 10 migrating a 1 GiB guest into ``fixedram receive``
(tcp, single channel and multifd 4) versus into its own ``file:`` with
mapped-ram on (single channel and multifd 4), same machine, same invocation.

The guest is our boot-sector guest with 768 MiB of its RAM written (the rest
zero pages), paused before ``migrate`` so every variant moves the same bytes.
The figure compared is QEMU's own ``total-time`` from ``query-migrate``;
``fixedram receive`` runs as a separate process, as a user would run it, and
its output is fsynced and renamed before it exits (QEMU's ``file:`` is not
fsynced, so the comparison is slightly unfair to us).

Run from the repository root::

    . .venv/bin/activate && python bench/bench_bridge.py [--ram 1G] [--reps 3] [--json]
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from qemu_harness import QemuVM, write_bootsector  # noqa: E402

MIB = 1 << 20
FIXEDRAM = [sys.executable, "-m", "fixedram.cli.main"]


def _run_one(work: Path, image: Path, ram: int, variant: str) -> dict[str, Any]:
    out = work / f"{variant}.mig"
    for p in (out, work / "sock"):
        if p.exists():
            p.unlink()
    multifd = variant.endswith("multifd4")
    to_file = variant.startswith("qemu-file")
    with QemuVM(work, image, machine="pc", memory=ram, name=f"src-{variant}") as vm:
        vm.wait_for_progress(1, timeout=120)
        vm.stop()
        caps = {"mapped-ram": to_file, "multifd": multifd}
        vm.set_caps(**caps)
        params: dict[str, Any] = {"max-bandwidth": 64 << 30, "downtime-limit": 30_000}
        if multifd:
            params["multifd-channels"] = 4
        vm.set_params(**params)
        rx = None
        if to_file:
            uri = f"file:{out}"
        else:
            rx = subprocess.Popen([*FIXEDRAM, "receive", "tcp:127.0.0.1:0", "-o", str(out),
                                   "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert rx.stderr is not None
            line = rx.stderr.readline().decode()
            uri = line.split("listening on ", 1)[1].strip()
        info = vm.migrate(uri, timeout=600)
        summary = None
        if rx is not None:
            so, se = rx.communicate(timeout=600)
            if rx.returncode != 0:
                raise RuntimeError(f"receive failed: {se.decode()}")
            summary = json.loads(so)
    st = out.stat()
    res = {"variant": variant, "total_time_ms": info["total-time"],
           "transferred": info["ram"]["transferred"], "apparent": st.st_size,
           "allocated": st.st_blocks * 512,
           "receive_seconds": summary["seconds"] if summary else None}
    out.unlink()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ram", default="1G")
    ap.add_argument("--written", default="768M", help="guest RAM the guest writes")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    from qemu_harness.vm import parse_size

    ram = parse_size(a.ram)
    written = parse_size(a.written)
    base = Path(os.environ.get("FIXEDRAM_BENCH_DIR", ROOT / "build"))
    base.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-bridge-", dir=base))
    try:
        image = write_bootsector(work, mem_end=MIB + written, fill_words=2)
        variants = ["qemu-file-mapped-ram", "fixedram-receive-tcp",
                    "qemu-file-mapped-ram-multifd4", "fixedram-receive-tcp-multifd4"]
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for _ in range(a.reps):
            for v in variants:  # interleaved, so drift hits every variant alike
                runs[v].append(_run_one(work, image, ram, v))
        rows = []
        for v in variants:
            t = statistics.median(r["total_time_ms"] for r in runs[v])
            last = runs[v][-1]
            rows.append({"variant": v, "total_time_ms_median": t,
                         "total_time_ms_all": [r["total_time_ms"] for r in runs[v]],
                         "apparent_bytes": last["apparent"], "allocated_bytes": last["allocated"],
                         "transferred": last["transferred"]})
        by = {r["variant"]: r for r in rows}
        ratios = {
            "single": by["fixedram-receive-tcp"]["total_time_ms_median"]
            / by["qemu-file-mapped-ram"]["total_time_ms_median"],
            "multifd4": by["fixedram-receive-tcp-multifd4"]["total_time_ms_median"]
            / by["qemu-file-mapped-ram-multifd4"]["total_time_ms_median"],
        }
        doc = {"ram": ram, "written": written, "reps": a.reps, "cpus": os.cpu_count(),
               "rows": rows, "ratio_receive_over_file": ratios}
        if a.json:
            print(json.dumps(doc, indent=2))
        else:
            print(f"{ram >> 20} MiB guest, {written >> 20} MiB written, paused, "
                  f"median of {a.reps}, {os.cpu_count()} CPUs")
            print(f"{'variant':34} {'total-time':>11} {'apparent':>10} {'allocated':>10}")
            for r in rows:
                print(f"{r['variant']:34} {r['total_time_ms_median']:>9} ms "
                      f"{r['apparent_bytes'] / MIB:>8.1f} M {r['allocated_bytes'] / MIB:>8.1f} M")
            for k, v in ratios.items():
                print(f"ratio receive / file ({k}): {v:.2f}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
