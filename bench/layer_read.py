"""Child process of bench_extract.py: guest RAM through a library's read API, no output file.

    python bench/layer_read.py vol3 FILE --mib 64     # volatility3 QemuSuspendLayer
    python bench/layer_read.py fixedram FILE          # MigrationFile + RunCopier.read_run

Prints one JSON line: open seconds (building the layer / the index), read seconds, bytes read,
the RAM size, and for vol3 how many of the pages read differ from fixedram's last copies.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from fixedram.format.migfile import MigrationFile
from fixedram.memory.copy import RunCopier

MIB = 1 << 20
START = 1 * MIB  # first guest-physical address read (below 1 MiB is BIOS/legacy)


def vol3(path: str, nbytes: int) -> dict[str, object]:
    from volatility3.framework import contexts
    from volatility3.framework.layers import physical, qemu

    ctx = contexts.Context()
    ctx.config["base.location"] = Path(path).resolve().as_uri()
    ctx.layers.add_layer(physical.FileLayer(ctx, "base", "base"))
    ctx.config["mem.base_layer"] = "base"
    t0 = time.perf_counter()
    layer = qemu.QemuSuspendLayer(ctx, "mem", "mem")
    t1 = time.perf_counter()
    chunks = [layer.read(START + o, MIB, pad=True) for o in range(0, nbytes, MIB)]
    t2 = time.perf_counter()
    got = b"".join(chunks)
    with MigrationFile(path) as mf:
        ref = mf.blocks[0].read(START, nbytes)
        ram = sum(b.used_length for b in mf.blocks)
    a = np.frombuffer(got, dtype=np.uint8).reshape(-1, 4096)
    b = np.frombuffer(ref, dtype=np.uint8).reshape(-1, 4096)
    return {"open_s": t1 - t0, "read_s": t2 - t1, "read_bytes": nbytes, "ram_bytes": ram,
            "pages_differ": int((a != b).any(axis=1).sum()), "pages_read": a.shape[0]}


def fixedram(path: str) -> dict[str, object]:
    t0 = time.perf_counter()
    mf = MigrationFile(path)
    t1 = time.perf_counter()
    copier = RunCopier(mf.source, 4096, src_name=mf.path)
    n = 0
    for b in mf.blocks:
        for run in b.runs():
            n += len(copier.read_run(run))
    t2 = time.perf_counter()
    ram = sum(b.used_length for b in mf.blocks)
    return {"open_s": t1 - t0, "read_s": t2 - t1, "read_bytes": n, "ram_bytes": ram}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine", choices=["vol3", "fixedram"])
    ap.add_argument("file")
    ap.add_argument("--mib", type=int, default=64, help="vol3: MiB of guest RAM to read")
    a = ap.parse_args()
    res = vol3(a.file, a.mib * MIB) if a.engine == "vol3" else fixedram(a.file)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
