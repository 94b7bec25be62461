"""One-pass inputs (issue 10): ``fixedram extract`` of a compressed libvirt image against the
decompressor alone, and ``fixedram extract -`` from a pipe against ``extract`` of the same file.

* compressed: a paused 1 GiB save as a stream, compressed as libvirt compresses it (``zstd -c``,
  ``gzip -c``, ``xz -c -3``) behind a libvirt header. Baseline: the decompressor alone on the
  payload, output to /dev/null (``zstd -dc``, ``gzip -dc``, ``xz -dc``). Goal: at most 1.25x.
  Two RAMs (``--ram``): ``content``, RAM holding programs, libraries, text and free pages
  (``make_inputs.py``'s content.stream, about 4:1 with zstd), and ``fill``, the paused
  benchmark guest whose pages hold three words each (about 500:1: the decompressor has almost
  nothing to do, and extract's writing of the 1 GiB output dominates whatever it does).
  For context also: the decompressor writing the stream to a file and syncing it.
* pipe: the live multi-pass 3.1 GiB stream through ``cat FILE |`` into ``extract -``, against
  ``extract FILE``. Goal: at most 1.2x. The file's extract copies only the last copy of each
  page (1 GiB); the pipe's must read and write all three passes, so the single-pass 1 GiB
  stream is measured too (``pipe1``), where both do the same work. For context also: the
  bytes alone through a pipe, ``cat FILE | cat > /dev/null``.

Run from the repository root after ``python bench/make_inputs.py``::

    . .venv/bin/activate && python bench/bench_inputs.py [--reps 5] [--json] [--only pipe|zstd|...]

Warm cache (inputs read once before; dirty data synced before every run, untimed); every figure
is a median of ``--reps`` interleaved runs in this invocation.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchlib import FIXEDRAM, INPUTS, ROOT, WORK, bytecode, median, run, warm
from fixedram.format.libvirt import LibvirtHeader

COMPRESS = {"zstd": ["zstd", "-c", "-q", "-T1"], "gzip": ["gzip", "-c"],
            "xz": ["xz", "-c", "-3", "-T1"]}
DECOMPRESS = {"zstd": ["zstd", "-dc", "-q"], "gzip": ["gzip", "-dc"], "xz": ["xz", "-dc"]}
XML = b"<domain type='qemu'><name>bench</name><memory unit='GiB'>1</memory></domain>\n"


def paused_stream() -> Path:
    out = INPUTS / "paused.stream"
    src = INPUTS / "mapped.mig"
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        subprocess.run([FIXEDRAM, "convert", str(src), str(out), "--to", "stream", "--force"],
                       check=True)
    return out


# The RAM behind a compressed image: ``content`` holds programs, libraries, text and free
# pages (about 4:1 with zstd, as real RAM); ``fill`` is the paused 1 GiB save above, whose
# pages hold three words each (about 500:1: the decompressor has almost nothing to do).
RAMS = ("content", "fill")


def source_stream(ram: str) -> Path:
    if ram == "fill":
        return paused_stream()
    path = INPUTS / "content.stream"
    if not path.exists():
        sys.exit("run python bench/make_inputs.py first (it makes content.stream)")
    return path


def compressed(kind: str, ram: str) -> tuple[Path, Path]:
    """(payload, libvirt image) for ``kind`` of ``ram``, made once."""
    stream = source_stream(ram)
    payload = INPUTS / f"{stream.name}.{kind}"
    image = INPUTS / f"{stream.stem}-{kind}.sav"
    if not payload.exists() or payload.stat().st_mtime < stream.stat().st_mtime:
        with open(stream, "rb") as fi, open(payload, "wb") as fo:
            subprocess.run(COMPRESS[kind], stdin=fi, stdout=fo, check=True)
    if not image.exists() or image.stat().st_mtime < payload.stat().st_mtime:
        head = LibvirtHeader.new(XML, b"<cookie/>\n", format=kind).encode()
        with open(image, "wb") as fo, open(payload, "rb") as fi:
            fo.write(head)
            while b := fi.read(16 << 20):
                fo.write(b)
    return payload, image


def bench_compressed(kind: str, ram: str, reps: int) -> dict[str, Any]:
    payload, image = compressed(kind, ram)
    warm(payload, image)
    out = WORK / f"{kind}.extract"
    tmp = WORK / f"{kind}.decompressed"
    dec = ["sh", "-c", f'{" ".join(DECOMPRESS[kind])} "$1" > /dev/null', "sh", str(payload)]
    # For context: what "decompress it first" costs (the stream written out and synced).
    dec_file = ["sh", "-c", f'{" ".join(DECOMPRESS[kind])} "$1" > "$2" && sync "$2"', "sh",
                str(payload), str(tmp)]
    ex = [FIXEDRAM, "extract", str(image), "-o", str(out)]
    dt, dft, et, rss = [], [], [], []
    for _ in range(reps):
        warm(payload, image)  # the host reclaims idle page cache between runs
        dt.append(run(dec, cold=False).seconds)
        dft.append(run(dec_file, cold=False, out=tmp).seconds)
        s = run(ex, cold=False, out=out)
        et.append(s.seconds)
        rss.append(s.maxrss)
    tmp.unlink(missing_ok=True)
    return {"input": image.name, "ram": ram, "payload_bytes": payload.stat().st_size,
            "stream_bytes": source_stream(ram).stat().st_size,
            "decompress_s": round(median(dt), 3),
            "decompress_to_file_sync_s": round(median(dft), 3),
            "extract_s": round(median(et), 3), "ratio": round(median(et) / median(dt), 3),
            "ratio_to_decompress_to_file": round(median(et) / median(dft), 3),
            "extract_peak_rss_mib":
            round(median(rss) / (1 << 20), 1), "goal": 1.25,
            "commands": {"baseline": f"{' '.join(DECOMPRESS[kind])} {payload} > /dev/null",
                         "fixedram": " ".join(ex)}}


def bench_pipe(reps: int, src: Path) -> dict[str, Any]:
    warm(src)
    out_f, out_p = WORK / "pipe-ref.extract", WORK / "pipe.extract"
    ref = [FIXEDRAM, "extract", str(src), "-o", str(out_f)]
    pipe = ["sh", "-c", f'cat "$1" | {FIXEDRAM} extract - -o "$2"', "sh", str(src), str(out_p)]
    carry = ["sh", "-c", 'cat "$1" | cat > /dev/null', "sh", str(src)]
    ft, pt, ct, rss = [], [], [], []
    for _ in range(reps):
        warm(src)  # the host reclaims idle page cache between runs
        ft.append(run(ref, cold=False, out=out_f).seconds)
        warm(src)
        s = run(pipe, cold=False, out=out_p)
        pt.append(s.seconds)
        rss.append(s.maxrss)
        warm(src)
        ct.append(run(carry, cold=False).seconds)
    return {"input": src.name, "stream_bytes": src.stat().st_size,
            "extract_file_s": round(median(ft), 3), "extract_pipe_s": round(median(pt), 3),
            "cat_pipe_cat_s": round(median(ct), 3),
            "ratio": round(median(pt) / median(ft), 3),
            "pipe_peak_rss_mib": round(median(rss) / (1 << 20), 1), "goal": 1.2,
            "commands": {"baseline": " ".join(ref),
                         "fixedram": f"cat {src} | {FIXEDRAM} extract - -o {out_p}"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--only", choices=("pipe", "pipe1", *COMPRESS), action="append")
    ap.add_argument("--ram", choices=RAMS, action="append",
                    help="RAM behind the compressed images (default: both)")
    a = ap.parse_args()
    if not (INPUTS / "stream.mig").exists():
        sys.exit("run python bench/make_inputs.py first")
    bytecode(ROOT / "src")  # the one-pass path loads more modules: never compile them per run
    todo = a.only or ["pipe", "pipe1", *COMPRESS]
    res: dict[str, Any] = {}
    for k in todo:
        if k == "pipe":
            res[k] = bench_pipe(a.reps, INPUTS / "stream.mig")
        elif k == "pipe1":
            res[k] = bench_pipe(a.reps, paused_stream())
        else:
            for ram in a.ram or RAMS:
                res[f"{k}-{ram}"] = bench_compressed(k, ram, a.reps)
    for k, r in res.items():
        if not a.json:
            print(f"{k:5s} ratio {r['ratio']:.2f} (goal <= {r['goal']}): "
                  + ", ".join(f"{n} {v}" for n, v in r.items()
                              if n.endswith(("_s", "_mib", "_bytes"))), flush=True)
    for p in WORK.glob("*.extract"):
        subprocess.run(["rm", "-rf", str(p)], check=True)
    if a.json:
        print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
