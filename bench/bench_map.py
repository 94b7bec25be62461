"""Map benchmark: ``fixedram map --json`` of the 1 GiB inputs against ``fixedram inspect --json``.

Run from the repository root after ``python bench/make_inputs.py``::

    . .venv/bin/activate && python bench/bench_map.py [--reps 5] [--cold] [--json]

Targets: the 1 GiB mapped-ram save mapped in at most 0.5 s; the 3 GiB live stream (4 passes)
in at most 1.2x inspect's time (both walk the stream and index its pages the same way; map
then classifies and coalesces every page with numpy). Medians of ``--reps`` interleaved runs,
warm cache by default (inputs read once), or ``--cold`` to drop the page cache before each run.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from benchlib import FIXEDRAM, INPUTS, ROOT, median, options, run

CASES = ("mapped", "stream")
TARGET_MAPPED_S = 0.5
TARGET_STREAM_RATIO = 1.2


def bench(name: str, reps: int, cold: bool) -> dict[str, Any]:
    src = INPUTS / f"{name}.mig"
    ins_cmd = [FIXEDRAM, "inspect", str(src), "--json"]
    map_cmd = [FIXEDRAM, "map", str(src), "--json"]
    ins_t, map_t = [], []
    for _ in range(reps):
        ins_t.append(run(ins_cmd, cold=cold).seconds)
        map_t.append(run(map_cmd, cold=cold).seconds)
    doc = json.loads(subprocess.run(map_cmd, capture_output=True, check=True).stdout)
    ins_m, map_m = median(ins_t), median(map_t)
    ok = map_m <= TARGET_MAPPED_S if name == "mapped" else map_m <= TARGET_STREAM_RATIO * ins_m
    return {"input": str(src.relative_to(ROOT)), "size": src.stat().st_size,
            "extents": len(doc["extents"]), "inspect_s": ins_m, "map_s": map_m,
            "ratio": map_m / ins_m, "within_target": ok, "inspect_all": ins_t, "map_all": map_t,
            "cmd_map": " ".join(map_cmd)}


def main() -> None:
    a = options(__doc__, CASES)
    res = {"cache": "cold" if a.cold else "warm", "reps": a.reps,
           "target_mapped_s": TARGET_MAPPED_S, "target_stream_ratio": TARGET_STREAM_RATIO,
           "cases": [bench(n, a.reps, a.cold) for n in CASES]}
    if a.json:
        print(json.dumps(res, indent=2))
        return
    print(f"cache: {res['cache']}, medians of {a.reps}")
    for c in res["cases"]:
        print(f"{c['input']:<32} {c['size'] / (1 << 30):5.2f} GiB  {c['extents']:>6} extents  "
              f"inspect {c['inspect_s']:.3f} s  map {c['map_s']:.3f} s  "
              f"({c['ratio']:.2f}x)  {'ok' if c['within_target'] else 'OVER TARGET'}")


if __name__ == "__main__":
    main()
