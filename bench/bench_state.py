"""State benchmark: ``fixedram state --json`` against ``fixedram inspect --json`` on the
1 GiB inputs (a 3-pass live stream and a paused mapped-ram save).

Run from the repository root after ``python bench/make_inputs.py``::

    . .venv/bin/activate && python bench/bench_state.py [--reps 5] [--cold] [--json]

Both commands open the file the same way (the stream is walked and its pages indexed;
mapped-ram needs no index), so the difference is what decoding every device section and
the configuration through the vmdesc, and printing them, costs. Target: at most 0.1 s more
than inspect. Medians of ``--reps`` interleaved runs in this invocation; warm cache by
default (inputs read once), or ``--cold`` to drop the page cache before every run.
"""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

from benchlib import FIXEDRAM, INPUTS, ROOT, median, options, run

CASES = ("stream", "mapped")
TARGET_S = 0.1


def decode_only(path: str, reps: int) -> float:
    """Median in-process time of decoding (devices + configuration + JSON text), file open."""
    from fixedram.format.devstate import decode_configuration, jsonable
    from fixedram.format.migfile import MigrationFile

    times = []
    with MigrationFile(path) as mf:
        for _ in range(reps):
            t0 = time.perf_counter()
            doc = {"configuration": jsonable(decode_configuration(mf)),
                   "devices": [jsonable(d.fields) for d in mf.devices()]}
            json.dumps(doc, indent=1)
            times.append(time.perf_counter() - t0)
    return median(times)


def bench(name: str, reps: int, cold: bool) -> dict[str, Any]:
    src = INPUTS / f"{name}.mig"
    ins_cmd = [FIXEDRAM, "inspect", str(src), "--json"]
    st_cmd = [FIXEDRAM, "state", str(src), "--json"]
    ins_t, st_t = [], []
    for _ in range(reps):
        ins_t.append(run(ins_cmd, cold=cold).seconds)
        st_t.append(run(st_cmd, cold=cold).seconds)
    out = subprocess.run(st_cmd, capture_output=True, check=True).stdout
    doc = json.loads(out)
    ins_m, st_m = median(ins_t), median(st_t)
    return {"input": str(src.relative_to(ROOT)), "size": src.stat().st_size,
            "devices": len(doc["devices"]), "json_bytes": len(out), "inspect_s": ins_m,
            "state_s": st_m, "difference_s": st_m - ins_m,
            "decode_only_s": decode_only(str(src), reps), "within_target": st_m - ins_m <= TARGET_S,
            "inspect_all": ins_t, "state_all": st_t,
            "cmd_inspect": " ".join(ins_cmd), "cmd_state": " ".join(st_cmd)}


def main() -> None:
    a = options(__doc__, CASES)
    res = {"cache": "cold" if a.cold else "warm", "reps": a.reps, "target_s": TARGET_S,
           "cases": [bench(n, a.reps, a.cold) for n in CASES]}
    if a.json:
        print(json.dumps(res, indent=2))
        return
    print(f"cache: {res['cache']}, medians of {a.reps}")
    print("| input | MiB | devices | JSON KiB | inspect s | state s | state - inspect s "
          f"(<= {TARGET_S}) | decode only s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in res["cases"]:
        print(f"| {r['input']} | {r['size'] / (1 << 20):.0f} | {r['devices']} | "
              f"{r['json_bytes'] / 1024:.0f} | {r['inspect_s']:.3f} | {r['state_s']:.3f} | "
              f"{r['difference_s']:+.3f} | {r['decode_only_s']:.4f} |")


if __name__ == "__main__":
    main()
