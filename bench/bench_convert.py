"""Convert benchmark (issue 3): a 1 GiB 3-pass stream -> mapped-ram, and a 1 GiB mapped-ram
file -> stream, each against ``cp`` of its input.

Run from the repository root after ``python bench/make_inputs.py``::

    . .venv/bin/activate && python bench/bench_convert.py [--reps 5] [--cold] [--json]

Every figure is a median of ``--reps`` interleaved runs in this invocation. Cache policy as in
bench_extract.py: warm by default (inputs read once, dirty data synced before every run, untimed),
or ``--cold`` to drop the page cache before every run for all tools alike. ``fixedram convert``
fsyncs its output before renaming it into place; ``cp`` does not, so ``cp`` + ``sync OUT`` (the
same durability) is measured too.
"""

from __future__ import annotations

import json
from typing import Any

from benchlib import FIXEDRAM, INPUTS, MIB, ROOT, WORK, median, options, remove, run

CASES = (("stream", "mapped-ram"), ("mapped", "stream"))


def bench(name: str, to: str, reps: int, cold: bool) -> dict[str, Any]:
    src = INPUTS / f"{name}.mig"
    cp_out = WORK / f"{name}.cp"
    cv_out = WORK / f"{name}.to-{to}.mig"
    cp_cmd = ["cp", str(src), str(cp_out)]
    cps_cmd = ["sh", "-c", 'cp "$1" "$2" && sync "$2"', "sh", str(src), str(cp_out)]
    cv_cmd = [FIXEDRAM, "convert", str(src), str(cv_out), "--to", to]
    cp_t, cps_t, cv_t, rss = [], [], [], []
    for _ in range(reps):
        cp_t.append(run(cp_cmd, cold=cold, out=cp_out).seconds)
        cps_t.append(run(cps_cmd, cold=cold, out=cp_out).seconds)
        s = run(cv_cmd, cold=cold, out=cv_out)
        cv_t.append(s.seconds)
        rss.append(s.maxrss)
    out_size = cv_out.stat().st_size
    remove(cp_out)
    remove(cv_out)
    cp_m, cps_m, cv_m = median(cp_t), median(cps_t), median(cv_t)
    return {"input": str(src.relative_to(ROOT)), "to": to, "in_size": src.stat().st_size,
            "out_size": out_size, "cp_s": cp_m, "cp_sync_s": cps_m, "convert_s": cv_m,
            "ratio": cv_m / cp_m, "ratio_vs_cp_sync": cv_m / cps_m,
            "peak_rss": max(rss), "cp_all": cp_t, "cp_sync_all": cps_t, "convert_all": cv_t,
            "cmd_cp": " ".join(cp_cmd), "cmd_convert": " ".join(cv_cmd)}


def main() -> None:
    a = options(__doc__, (n for n, _ in CASES))
    WORK.mkdir(parents=True, exist_ok=True)
    res = {"cache": "cold" if a.cold else "warm", "reps": a.reps,
           "cases": [bench(n, to, a.reps, a.cold) for n, to in CASES]}
    if a.json:
        print(json.dumps(res, indent=2))
        return
    print(f"cache: {res['cache']}, medians of {a.reps}")
    print("| conversion | input MiB | output MiB | cp s | cp+sync s | convert s | "
          "convert / cp (<= 1.5) | convert / (cp+sync) | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in res["cases"]:
        src = "stream (multi-pass)" if r["to"] == "mapped-ram" else "mapped-ram"
        print(f"| {src} -> {r['to']} | {r['in_size'] / MIB:.0f} | {r['out_size'] / MIB:.0f} | "
              f"{r['cp_s']:.2f} | {r['cp_sync_s']:.2f} | {r['convert_s']:.2f} | "
              f"{r['ratio']:.2f}x | {r['ratio_vs_cp_sync']:.2f}x | {r['peak_rss'] / MIB:.1f} |")


if __name__ == "__main__":
    main()
