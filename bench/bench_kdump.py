"""kdump benchmark: ``fixedram extract --format kdump`` against ``makedumpfile -c -d 1`` run on
our ELF core of the same save (what one would do without this format).

Run from the repository root with the venv active::

    python bench/bench_kdump.py [--reps 5] [--memory 1G] [--cold] [--json]

The inputs are saves of the tests' Linux guest (tests/qemu_harness/linux.py: a booted Debian
kernel, paused), made once into ``build/bench/kdump-linux-<memory>/`` (~30 s); the 1 GiB
inputs of make_inputs.py are not used, since their boot-sector guest has no VMCOREINFO note
and a kdump file needs one. Both commands fsync their output (ours before its rename;
``makedumpfile`` is followed by ``sync OUT``). Every figure is a median of ``--reps``
interleaved runs in this invocation; targets: time below makedumpfile's (ratio < 1) and size
within 1.1x of its. Each of our codecs is timed too (zlib is the default).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchlib import FIXEDRAM, MIB, ROOT, WORK, bytecode, median, remove, run, warm

sys.path.insert(0, str(ROOT / "tests"))

from qemu_harness import LinuxArtifacts

KEYS = ("paused_mapped", "paused_stream")
CODECS = ("zlib", "lzo", "zstd", "snappy", "none")
SIZE_TARGET = 1.1


def artifacts(memory: str) -> LinuxArtifacts:
    d = WORK / f"kdump-linux-{memory}"
    if not (d / "READY").exists():
        remove(d)
        d.mkdir(parents=True)
        # In a child: the harness reads whole RAM images, and this process's RSS at a fork
        # counts in the timed child's peak (Linux carries it over fork and exec).
        subprocess.run([sys.executable, str(ROOT / "tests" / "qemu_harness" / "linux.py"),
                        "--out", str(d), "--memory", memory], check=True,
                       stdout=subprocess.DEVNULL)
    return LinuxArtifacts.load(d)


def makedumpfile() -> str:
    path = shutil.which("makedumpfile") or shutil.which("makedumpfile", path="/usr/sbin")
    if not path:
        sys.exit("makedumpfile is not installed (scripts/install-qemu.sh installs it)")
    return path


def bench_save(src: Path, reps: int, cold: bool) -> dict[str, Any]:
    elf = WORK / f"{src.stem}.elf"
    mdf_out = WORK / f"{src.stem}.makedumpfile"
    ours = {c: WORK / f"{src.stem}.{c}.kdump" for c in CODECS}
    run([FIXEDRAM, "extract", str(src), "-o", str(elf), "--format", "elf"], cold=False, out=elf)
    mdf_cmd = ["sh", "-c", '"$0" -c -d 1 "$1" "$2" >/dev/null 2>&1 && sync "$2"',
               makedumpfile(), str(elf), str(mdf_out)]
    cmds = {c: [FIXEDRAM, "extract", str(src), "-o", str(p), "--format", "kdump",
                "--compress", c] for c, p in ours.items()}
    times: dict[str, list[float]] = {"makedumpfile": [], **{c: [] for c in CODECS}}
    rss: dict[str, int] = {}
    if not cold:
        warm(src, elf)
    for _ in range(reps):  # interleaved, so drifts hit all alike
        times["makedumpfile"].append(run(mdf_cmd, cold=cold, out=mdf_out).seconds)
        for c in CODECS:
            s = run(cmds[c], cold=cold, out=ours[c])
            times[c].append(s.seconds)
            rss[c] = max(rss.get(c, 0), s.maxrss)
    sizes = {c: p.stat().st_size for c, p in ours.items()}
    mdf_size = mdf_out.stat().st_size
    mdf_t = median(times["makedumpfile"])
    res: dict[str, Any] = {
        "save": str(src.relative_to(ROOT)), "save_size": src.stat().st_size,
        "elf_allocated": elf.stat().st_blocks * 512,
        "makedumpfile_s": mdf_t, "makedumpfile_size": mdf_size,
        "cmd_makedumpfile": f"makedumpfile -c -d 1 {elf.name} OUT && sync OUT",
        "ours": {c: {"s": median(times[c]), "ratio": median(times[c]) / mdf_t,
                     "size": sizes[c], "size_ratio": sizes[c] / mdf_size,
                     "peak_rss": rss[c], "all": times[c], "cmd": " ".join(cmds[c])}
                 for c in CODECS},
        "makedumpfile_all": times["makedumpfile"]}
    for p in (elf, mdf_out, *ours.values()):
        remove(p)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--memory", default="1G", help="guest RAM (default 1G)")
    ap.add_argument("--cold", action="store_true", help="drop caches before every run")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    bytecode(ROOT / "src")
    arts = artifacts(a.memory)
    res = {"cache": "cold" if a.cold else "warm", "reps": a.reps, "memory": a.memory,
           **{k: bench_save(getattr(arts, k), a.reps, a.cold) for k in KEYS}}
    if a.json:
        print(json.dumps(res, indent=2))
        return
    print(f"Linux guest, {a.memory} RAM; cache: {res['cache']}, medians of {a.reps}, "
          "interleaved")
    print("| save | makedumpfile -c -d 1 on our ELF s | MiB | codec | extract --format kdump s "
          f"| time ratio (< 1) | MiB | size ratio (<= {SIZE_TARGET}) | peak RSS MiB |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for k in KEYS:
        r = res[k]
        for c in CODECS:
            o = r["ours"][c]
            print(f"| {k} | {r['makedumpfile_s']:.2f} | {r['makedumpfile_size'] / MIB:.1f} | "
                  f"{c} | {o['s']:.2f} | {o['ratio']:.2f} | {o['size'] / MIB:.1f} | "
                  f"{o['size_ratio']:.3f} | {o['peak_rss'] / MIB:.0f} |")


if __name__ == "__main__":
    main()
