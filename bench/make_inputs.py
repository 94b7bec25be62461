"""Make (and cache) the 1 GiB benchmark inputs with real QEMU 10.

Run from the repository root::

    . .venv/bin/activate && python bench/make_inputs.py [--force]

Outputs under ``build/bench/inputs/`` (gitignored):

* ``stream.mig``: a live save of a 1 GiB pc guest as a sequential stream,
  throttled so that QEMU makes at least 3 dirty-sync passes and sends at
  least 3 GiB of page data (the guest re-dirties ~1000 MiB every pass);
* ``mapped.mig``: a paused save of the same guest with ``mapped-ram``;
* ``stream-vol3.mig``: ``stream.mig`` without its 5-byte SWITCHOVER_START
  command section (QEMU >= 9.2 sends it; volatility3's QEMU layer stops at
  it with "unknown section encountered: 8"), page records unchanged;
* ``content.stream``: a paused 1 GiB guest whose RAM holds what a used guest's RAM holds
  (programs, libraries, text, already-compressed files, free zero pages) saved by QEMU as a
  stream: the page fill above compresses about 500:1, far from what real RAM does, which makes
  it useless for measuring decompression (``bench_inputs.py``);
* ``inputs.json``: how they were made (QEMU's final query-migrate stats).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fixedram.format.migfile import MigrationFile  # noqa: E402
from qemu_harness.vm import QemuVM, file_uri, save_vm  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
INPUTS = ROOT / "build" / "bench" / "inputs"
RAM_MB = 1024
MEM_END = 1000 * MIB  # guest region [1 MiB, 1000 MiB): ~97% of RAM, re-dirtied every pass
# Dwords written per page: page number, pass, then 1 more. Every page in the region is non-zero
# (sent as a full 4 KiB record) while one guest pass over 1000 MiB stays well under a second in
# TCG, so every pass of the migration finds the whole region dirty again.
FILL_WORDS = 3
STREAM_BANDWIDTH = 768 * MIB  # bytes/s while the passes are counted
MIN_SYNCS = 3
MIN_TRANSFERRED = 2 * GIB  # + the converging pass(es) -> ~3 GiB


def _describe(path: Path) -> dict[str, Any]:
    with MigrationFile(path) as mf:
        return {"format": mf.format, "size": mf.size, "passes": mf.passes,
                "pages_present": sum(b.pages_present for b in mf.blocks),
                "resent_bytes": mf.resent_bytes, "machine": mf.machine}


def make(name: str, mode: str, live: bool, force: bool) -> dict[str, Any]:
    out = INPUTS / f"{name}.mig"
    meta = INPUTS / f"{name}.json"
    if out.exists() and meta.exists() and not force:
        return dict(json.loads(meta.read_text()))
    work = INPUTS / f"{name}.work"
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.monotonic()
    saved = save_vm(work, machine="pc", mode=mode, live=live, ram_mb=RAM_MB, mem_end=MEM_END,
                    fill_words=FILL_WORDS, bandwidth=STREAM_BANDWIDTH if live else None,
                    min_syncs=MIN_SYNCS if live else 1,
                    min_transferred=MIN_TRANSFERRED if live else 0, timeout=600)
    took = time.monotonic() - t0
    saved.path.replace(out)
    ram = saved.stats.get("ram", {})
    info = {"file": str(out.relative_to(ROOT)), "mode": mode, "live": live, "ram_mb": RAM_MB,
            "mem_end": MEM_END, "fill_words": FILL_WORDS, "make_seconds": round(took, 1),
            "qemu": {k: ram.get(k) for k in ("transferred", "dirty-sync-count", "normal",
                                             "duplicate")},
            "synthetic": False, **_describe(out)}
    meta.write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)  # the pmemsave and logs
    return info


# content.stream: file data from /usr laid into guest RAM at 1 MiB, 7 MiB of data then 3 MiB of
# zeros (free memory), until 1000 MiB; files in sorted order, so one machine always makes the
# same content.
CONTENT_DIRS = ("/usr/bin", "/usr/lib", "/usr/share")
CONTENT_DATA, CONTENT_GAP = 7 * MIB, 3 * MIB


def content_blob(out: Path, size: int = MEM_END - MIB) -> dict[str, Any]:
    """Write ``size`` bytes of RAM-like content to ``out``; return what went in."""
    files = (p for d in CONTENT_DIRS for p in sorted(Path(d).rglob("*"))
             if p.is_file() and not p.is_symlink())
    written = data = 0
    with open(out, "wb") as fo:
        while written < size:
            want = min(CONTENT_DATA, size - written)
            while want:
                try:
                    path = next(files)
                    b = path.read_bytes()[:want]
                except OSError:
                    continue
                fo.write(b)
                want -= len(b)
                written += len(b)
                data += len(b)
            gap = min(CONTENT_GAP, size - written)
            fo.write(bytes(gap))
            written += gap
    return {"bytes": size, "file_bytes": data, "from": list(CONTENT_DIRS)}


def make_content(force: bool) -> dict[str, Any]:
    out = INPUTS / "content.stream"
    meta = INPUTS / "content.json"
    if out.exists() and meta.exists() and not force:
        return dict(json.loads(meta.read_text()))
    work = INPUTS / "content.work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    blob = work / "ram.bin"
    made = content_blob(blob)
    # The generic loader device copies the blob into RAM at reset; -S keeps the CPUs from
    # ever running, so QEMU saves exactly that RAM.
    loader = f"loader,file={blob},addr={MIB:#x},force-raw=on"
    with QemuVM(work, None, machine="pc", memory=f"{RAM_MB}M", paused=True,
                extra_args=["-device", loader]) as vm:
        info = vm.migrate(file_uri(work / "content.mig"), timeout=600)
    (work / "content.mig").replace(out)
    ram = info.get("ram", {})
    res = {"file": str(out.relative_to(ROOT)), "ram_mb": RAM_MB, "content": made,
           "qemu": {k: ram.get(k) for k in ("transferred", "normal", "duplicate")},
           "synthetic": False, **_describe(out)}
    meta.write_text(json.dumps(res, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return res


def strip_commands(src: Path, dst: Path) -> list[int]:
    """Copy ``src`` to ``dst`` without its command sections; return their offsets."""
    with MigrationFile(src) as mf:
        cuts = [(at, 5 + len(data)) for at, _cmd, data in mf.summary.commands]
        size = mf.size
    tmp = dst.with_suffix(".tmp")
    with open(src, "rb") as fi, open(tmp, "wb") as fo:
        pos = 0
        for at, n in [*cuts, (size, 0)]:
            left = at - pos
            while left:
                left -= os.copy_file_range(fi.fileno(), fo.fileno(), left, pos + (at - pos - left))
            pos = at + n
    tmp.replace(dst)
    return [at for at, _ in cuts]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="remake even if cached")
    a = ap.parse_args()
    INPUTS.mkdir(parents=True, exist_ok=True)
    res = {"stream": make("stream", "stream", True, a.force),
           "mapped": make("mapped", "mapped-ram", False, a.force)}
    vol = INPUTS / "stream-vol3.mig"
    if a.force or not vol.exists() or vol.stat().st_mtime < (INPUTS / "stream.mig").stat().st_mtime:
        strip_commands(INPUTS / "stream.mig", vol)
    res["content"] = make_content(a.force)
    res["stream-vol3"] = {"file": str(vol.relative_to(ROOT)), "size": vol.stat().st_size,
                          "derived_from": "stream.mig, command sections removed"}
    (INPUTS / "inputs.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
