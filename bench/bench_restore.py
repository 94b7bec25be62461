"""Restore benchmark: built-in guest eager and lazy (``restore --postcopy``)
restore of sparse mapped-ram saves, next to QEMU 10 loading a mapped-ram file
of the same RAM size holding the same amount of data.

Run from the repository root (files go to ``build/bench/restore``)::

    . .venv/bin/activate && python bench/bench_restore.py [--sizes 1,4,16] [--reps 3] [--json]

Per RAM size (GiB): a built-in save (``fixedram save --mapped-ram --fill F``)
and a QEMU 10 save of the harness's boot-sector guest, which writes every
page of ``[1 MiB, mem_end)``; both hold ``--data`` of RAM (default 20%, at
most 2.75 GiB: the boot-sector guest writes below 4 GiB only). Then, ``--reps``
times, interleaved: ``fixedram restore FILE --json`` (eager), ``fixedram
restore FILE --postcopy --json`` (lazy) and QEMU (``-incoming defer``,
mapped-ram on, ``migrate-incoming file:``, until MIGRATION completed: the
event's own timestamp). Every file is read once before the timed runs, so
both sides load from a warm page cache (``--cold`` drops caches before each
run instead; it needs root and slows everyone else on the machine).

Figures are medians with the range (min-max) of the reps; ``eager_vs_qemu``
is QEMU's seconds over the built-in's (above 1: the built-in is faster) and
``lazy_flat`` is the lazy running_after_s at each size over the smallest.
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

MIB = 1 << 20
GIB = 1 << 30
FIXEDRAM = [sys.executable, "-m", "fixedram"]
MAX_DATA = 2816 * MIB  # the boot-sector guest fills [1 MiB, mem_end) below 4 GiB


def _stat(xs: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(xs), 4), "min": round(min(xs), 4),
            "max": round(max(xs), 4), "runs": [round(x, 4) for x in xs]}


def _drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def _warm(path: Path) -> None:
    """Read the file's data (holes cost nothing) into the page cache."""
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)


def builtin_save(path: Path, ram: int, fill: float) -> dict[str, Any]:
    r = subprocess.run([*FIXEDRAM, "save", f"file:{path}", "--mapped-ram", "--multifd", "2",
                        "--ram", str(ram), "--fill", f"{fill:.4f}", "--workload", "none",
                        "--json"], capture_output=True, text=True, check=True)
    return dict(json.loads(r.stdout))


def builtin_restore(path: Path, lazy: bool) -> dict[str, Any]:
    cmd = [*FIXEDRAM, "restore", str(path), "--json"] + (["--postcopy"] if lazy else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    out = dict(json.loads(r.stdout))
    if out["lazy"] != lazy:
        raise RuntimeError(f"{path}: lazy={out['lazy']}, expected {lazy}: {r.stderr.strip()}")
    return out


def qemu_save(work: Path, path: Path, ram: int, data: int) -> None:
    from qemu_harness.vm import QemuVM, guest_image

    image = guest_image(MIB + data, fill_words=2, directory=work / "img")
    with QemuVM(work / "q", image, machine="pc", memory=ram, name="src") as vm:
        vm.wait_for_progress(1, timeout=600)
        vm.stop()
        vm.set_caps(**{"mapped-ram": True})
        vm.migrate(f"file:{path}", timeout=900)


def qemu_restore(work: Path, path: Path, ram: int, data: int) -> float:
    """Seconds from migrate-incoming to QEMU's MIGRATION completed event."""
    from qemu_harness.vm import QemuVM, guest_image

    image = guest_image(MIB + data, fill_words=2, directory=work / "img")  # the source's disk
    with QemuVM(work / "q", image, machine="pc", memory=ram, name="dst",
                incoming=True) as vm:
        vm.set_caps(**{"mapped-ram": True, "events": True})
        vm.events()
        t0 = time.time()
        vm.migrate_incoming(f"file:{path}", timeout=900)
        for ev in vm.events():
            if ev.get("event") == "MIGRATION" and ev.get("data", {}).get("status") == "completed":
                ts = ev["timestamp"]
                return float(ts["seconds"] + ts["microseconds"] / 1e6 - t0)
    raise RuntimeError(f"{path}: QEMU sent no MIGRATION completed event")


def run_size(work: Path, gib: int, frac: float, reps: int, cold: bool,
             qemu: bool) -> dict[str, Any]:
    ram = gib * GIB
    data = min(int(ram * frac) // MIB * MIB, MAX_DATA)
    fill = data / ram
    ours, theirs = work / f"builtin-{gib}g.mig", work / f"qemu-{gib}g.mig"
    builtin_save(ours, ram, fill)
    res: dict[str, Any] = {"ram_bytes": ram, "data_bytes_target": data, "fill": round(fill, 4)}
    res["builtin_allocated_bytes"] = os.stat(ours).st_blocks * 512
    if qemu:
        qemu_save(work, theirs, ram, data)
        res["qemu_allocated_bytes"] = os.stat(theirs).st_blocks * 512
    eager: list[float] = []
    lazy_run: list[float] = []
    lazy_done: list[float] = []
    q: list[float] = []
    pages = 0
    for i in range(reps + 1):  # run 0 warms the cache (and is not counted)
        for what in ("eager", "lazy", "qemu"):
            if what == "qemu" and not qemu:
                continue
            if cold and i:
                _drop_caches()
            elif not i:
                _warm(theirs if what == "qemu" else ours)
            if what == "qemu":
                s = qemu_restore(work, theirs, ram, data)
                if i:
                    q.append(s)
                continue
            out = builtin_restore(ours, what == "lazy")
            pages = out["pages_loaded"]
            if not i:
                continue
            if what == "eager":
                eager.append(out["complete_after_s"])
            else:
                lazy_run.append(out["running_after_s"])
                lazy_done.append(out["complete_after_s"])
    res["builtin_data_bytes"] = pages * 4096
    res["builtin_eager_s"] = _stat(eager)
    res["builtin_lazy_running_after_s"] = _stat(lazy_run)
    res["builtin_lazy_complete_after_s"] = _stat(lazy_done)
    if qemu:
        res["qemu_eager_s"] = _stat(q)
        res["eager_vs_qemu"] = round(statistics.median(q) / statistics.median(eager), 3)
    ours.unlink()
    if qemu:
        theirs.unlink()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4,16", help="RAM sizes in GiB (default 1,4,16)")
    ap.add_argument("--data", type=float, default=0.2,
                    help="fraction of RAM holding data (default 0.2, at most 2.75 GiB)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="drop caches before every run (root)")
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--dir", default=str(ROOT / "build" / "bench" / "restore"))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    from qemu_harness.vm import qemu_binary

    qemu = not a.no_qemu and qemu_binary() is not None
    os.makedirs(a.dir, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=a.dir))
    sizes = [int(x) for x in a.sizes.split(",")]
    out: dict[str, Any] = {"reps": a.reps, "cache": "cold" if a.cold else "warm",
                           "qemu": qemu, "sizes": {}}
    try:
        for gib in sizes:
            out["sizes"][f"{gib}G"] = run_size(work, gib, a.data, a.reps, a.cold, qemu)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    first = out["sizes"][f"{sizes[0]}G"]["builtin_lazy_running_after_s"]["median"]
    for r in out["sizes"].values():
        r["lazy_flat"] = round(r["builtin_lazy_running_after_s"]["median"] / first, 2)
    if a.json:
        print(json.dumps(out, indent=2))
        return 0

    def fmt(s: dict[str, Any]) -> str:
        return f"{s['median']:.3f} [{s['min']:.3f}-{s['max']:.3f}]"

    print(f"median [min-max] of {a.reps} runs, {out['cache']} cache; seconds")
    print(f"{'RAM':>5} {'data':>9} {'eager':>22} {'lazy running':>22} {'lazy complete':>22} "
          f"{'QEMU eager':>22} {'vs QEMU':>8} {'flat':>5}")
    for name, r in out["sizes"].items():
        qe = fmt(r["qemu_eager_s"]) if "qemu_eager_s" in r else "-"
        print(f"{name:>5} {r['builtin_data_bytes'] / MIB:>7,.0f}M {fmt(r['builtin_eager_s']):>22} "
              f"{fmt(r['builtin_lazy_running_after_s']):>22} "
              f"{fmt(r['builtin_lazy_complete_after_s']):>22} {qe:>22} "
              f"{r.get('eager_vs_qemu', '-'):>8} {r['lazy_flat']:>5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
