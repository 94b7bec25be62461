"""Engine benchmark: paused save and restore of a 1 GiB guest with fixed-ram +
multifd 4 + direct-io, next to ``dd`` (O_DIRECT) and QEMU 10 doing the same.

Run from the repository root (files go to a directory on the repo disk,
because O_DIRECT needs a real filesystem)::

    . .venv/bin/activate && python bench/bench_engine.py [--ram 1G] [--reps 3] [--json]

Every figure is a median of ``--reps`` runs in the same invocation, so the
ratios compare runs on the same disk at the same time.
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

from fixedram.engine.capabilities import MigrationConfig  # noqa: E402
from fixedram.engine.guest import BuiltinGuest  # noqa: E402
from fixedram.engine.incoming import load_file  # noqa: E402
from fixedram.engine.precopy import Migration  # noqa: E402

MIB = 1 << 20


def _cfg(channels: int, direct_io: bool) -> MigrationConfig:
    c = MigrationConfig()
    c.set_capabilities({"mapped-ram": True, "multifd": True})
    c.set_parameters({"multifd-channels": channels, "direct-io": direct_io,
                      "max-bandwidth": 0})
    return c


def dd_write(path: Path, size: int) -> float:
    t = time.monotonic()
    subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={size // MIB}",
                    "oflag=direct", "conv=fsync"], check=True, capture_output=True)
    return time.monotonic() - t


def dd_read(path: Path) -> float:
    t = time.monotonic()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M", "iflag=direct"], check=True,
                   capture_output=True)
    return time.monotonic() - t


def fixedram_save(g: BuiltinGuest, path: Path, channels: int) -> tuple[float, int]:
    t = time.monotonic()
    Migration(g, _cfg(channels, True), f"file:{path}").run()
    return time.monotonic() - t, os.stat(path).st_blocks * 512


def fixedram_restore(path: Path, ram: int, channels: int) -> float:
    g = BuiltinGuest(ram, fill=0)
    t = time.monotonic()
    load_file(str(path), g, _cfg(channels, True))
    dt = time.monotonic() - t
    g.shutdown()
    return dt


def qemu_runs(work: Path, ram: int, channels: int, reps: int) -> dict[str, Any]:
    """QEMU 10 (TCG, pc) with the harness's boot-sector guest filling RAM, stopped, saved."""
    from qemu_harness.vm import QemuVM, guest_image, qemu_binary

    if qemu_binary() is None:
        return {"error": "qemu-system-x86_64 not found"}
    mem_end = ram - 24 * MIB  # fill all but the top (ACPI tables, BIOS areas)
    image = guest_image(mem_end, fill_words=2, directory=work / "img")
    caps = {"mapped-ram": True, "multifd": True}
    params = {"multifd-channels": channels, "direct-io": True, "max-bandwidth": 64 << 30}
    saves, loads, alloc = [], [], 0
    for i in range(reps):
        path = work / f"qemu-{i}.mig"
        with QemuVM(work / "q", image, machine="pc", memory=ram, name=f"src{i}") as vm:
            vm.wait_for_progress(1, timeout=120)
            vm.stop()
            vm.set_caps(**caps)
            vm.set_params(**params)
            t = time.monotonic()
            vm.migrate(f"file:{path}", timeout=300)
            saves.append(time.monotonic() - t)
        alloc = os.stat(path).st_blocks * 512
        with QemuVM(work / "q", image, machine="pc", memory=ram, name=f"dst{i}",
                    incoming=True) as vm:
            vm.set_caps(**caps)
            vm.set_params(**params)
            t = time.monotonic()
            vm.migrate_incoming(f"file:{path}", timeout=300)
            loads.append(time.monotonic() - t)
        path.unlink()
    return {"save_s": statistics.median(saves), "restore_s": statistics.median(loads),
            "allocated_bytes": alloc, "saves": saves, "restores": loads}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ram", type=int, default=1024, help="MiB (default 1024)")
    ap.add_argument("--channels", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fill", type=float, default=0.95, help="non-zero page fraction")
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--dir", default=str(ROOT / ".bench-engine"))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    ram = a.ram * MIB
    os.makedirs(a.dir, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=a.dir))
    try:
        g = BuiltinGuest(ram, fill=a.fill)
        g.stop()
        ddw, ddr, sv, rs = [], [], [], []
        alloc = 0
        for i in range(a.reps):
            ddf = work / "dd.bin"
            ddw.append(dd_write(ddf, ram))
            ddr.append(dd_read(ddf))
            ddf.unlink()
            f = work / f"fr-{i}.mig"
            dt, alloc = fixedram_save(g, f, a.channels)
            sv.append(dt)
            rs.append(fixedram_restore(f, ram, a.channels))
            f.unlink()
        g.shutdown()
        res: dict[str, Any] = {
            "ram_bytes": ram, "fill": a.fill, "channels": a.channels, "reps": a.reps,
            "dd_write_s": statistics.median(ddw), "dd_read_s": statistics.median(ddr),
            "fixedram_save_s": statistics.median(sv), "fixedram_restore_s": statistics.median(rs),
            "fixedram_allocated_bytes": alloc,
        }
        if not a.no_qemu:
            res["qemu"] = qemu_runs(work, ram, a.channels, a.reps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mibs = ram / MIB

    def rate(s: float) -> float:
        return round(mibs / s, 1)

    res["dd_write_mib_s"] = rate(res["dd_write_s"])
    res["dd_read_mib_s"] = rate(res["dd_read_s"])
    res["fixedram_save_mib_s"] = rate(res["fixedram_save_s"])
    res["fixedram_restore_mib_s"] = rate(res["fixedram_restore_s"])
    res["save_vs_dd"] = round(res["dd_write_s"] / res["fixedram_save_s"], 3)
    res["restore_vs_dd"] = round(res["dd_read_s"] / res["fixedram_restore_s"], 3)
    q = res.get("qemu", {})
    if "save_s" in q:
        q["save_mib_s"] = rate(q["save_s"])
        q["restore_mib_s"] = rate(q["restore_s"])
        q["save_vs_dd"] = round(res["dd_write_s"] / q["save_s"], 3)
        q["restore_vs_dd"] = round(res["dd_read_s"] / q["restore_s"], 3)
        res["save_vs_qemu"] = round(q["save_s"] / res["fixedram_save_s"], 3)
        res["restore_vs_qemu"] = round(q["restore_s"] / res["fixedram_restore_s"], 3)
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"RAM {mibs:.0f} MiB, fill {a.fill}, multifd {a.channels} + direct-io, "
              f"median of {a.reps}")
        print(f"{'':24}{'save MiB/s':>12}{'vs dd':>8}{'restore MiB/s':>15}{'vs dd':>8}")
        print(f"{'dd O_DIRECT':24}{res['dd_write_mib_s']:>12}{1.0:>8}"
              f"{res['dd_read_mib_s']:>15}{1.0:>8}")
        print(f"{'fixedram':24}{res['fixedram_save_mib_s']:>12}{res['save_vs_dd']:>8}"
              f"{res['fixedram_restore_mib_s']:>15}{res['restore_vs_dd']:>8}")
        if "save_s" in q:
            print(f"{'QEMU 10':24}{q['save_mib_s']:>12}{q['save_vs_dd']:>8}"
                  f"{q['restore_mib_s']:>15}{q['restore_vs_dd']:>8}")
            print(f"fixedram / QEMU: save {res['save_vs_qemu']}x, restore "
                  f"{res['restore_vs_qemu']}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
