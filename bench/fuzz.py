"""Mutation fuzzer: real QEMU saves, mutated, through every reader and ``receive``'s stdin.

Each input is a seed file (a real QEMU 10 save, stream or mapped-ram) with one or more
mutations: byte flips, interesting integers written over the stream's own length and offset
fields, truncations, deleted or repeated chunks, and the forged classes found by review (deep or
huge-number vmdesc JSON, empty or colliding RAMBlock names, huge block lengths). Every input goes
through opening, ``inspect``'s description, device-state decoding, RAM runs and reads, the
physical layout, an ELF core, conversion to a stream, and (for streams) ``receive -`` and
``extract -`` from a pipe and from a gzip file (one pass, read or decoded ahead on a thread).

Only :class:`fixedram.errors.FixedramError` may come out. Anything else, a run over
``--input-timeout`` seconds, or a leftover file is a crash: the input is kept under
``--crashes`` and becomes a regression test (``tests/fuzz_regressions/``).

    python bench/fuzz.py --make-seeds build/fuzz/seeds          # real QEMU, ~10 s
    python bench/fuzz.py --seeds build/fuzz/seeds --seconds 60   # CI's short budget
    python bench/fuzz.py --seeds build/fuzz/seeds --inputs 1000000 --json build/fuzz/run.json
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import os
import random
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # qemu_harness, for --make-seeds

from fixedram.errors import FixedramError  # noqa: E402
from fixedram.format.migfile import MigrationFile  # noqa: E402

INTERESTING = [0, 1, 2, 7, 0x7F, 0x80, 0xFF, 0x100, 0xFFF, 0x1000, 0x1001, 0x7FFF_FFFF,
               0x8000_0000, 0xFFFF_FFFF, 1 << 32, 1 << 40, (1 << 44) - 4096, 1 << 44,
               (1 << 63) - 1, 1 << 63, (1 << 64) - 1, (1 << 64) - 4096]


class Timeout(Exception):
    pass


# -- seeds -------------------------------------------------------------------------------


def make_seeds(out: Path) -> list[Path]:
    """Small real QEMU 10 saves: q35 and pc, stream and mapped-ram, paused and live."""
    from qemu_harness import save_vm, write_bootsector

    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    mem_end = (1 << 20) + (256 << 10)  # small guests keep each input cheap
    img = write_bootsector(work, mem_end=mem_end, fill_words=2)
    made = []
    # 2 MiB of RAM and a short live phase keep the seeds (and so each input) small.
    for machine, mode, live in (("q35", "stream", False), ("pc", "stream", True),
                                ("q35", "mapped-ram", False), ("pc", "mapped-ram", True)):
        name = f"{machine}-{mode}-{'live' if live else 'paused'}"
        sf = save_vm(work, machine=machine, mode=mode, live=live, ram_mb=2, mem_end=mem_end,
                     image=img, name=name, bandwidth=(1 << 20) if live else None,
                     min_syncs=2, min_transferred=(3 << 20) if live else None)
        dst = out / f"{name}.sav"
        os.rename(sf.path, dst)
        made.append(dst)
    shutil.rmtree(work, ignore_errors=True)
    return made


class Seed:
    """A seed file and the offsets of its structural fields (where mutations pay off)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = path.read_bytes()
        self.fields: list[tuple[int, int]] = []  # (offset, width) of integers worth forging
        self.vmdesc_at: int | None = None
        self.vmdesc_raw = b"{}"
        with MigrationFile(path) as mf:
            self.mapped = mf.format == "mapped-ram"
            for b in mf.summary.boundaries:
                self.fields += [(b + 1, 4), (b + 5, 1)]
            for blk in mf.blocks:
                rec = blk.record
                n = len(blk.idstr.encode())
                self.fields += [(rec.record_offset, 1), (rec.record_offset + 1 + n, 8)]
                if rec.mapped is not None:
                    m = rec.mapped.offset
                    self.fields += [(m, 4), (m + 4, 8), (m + 12, 8), (m + 20, 8)]
            for d in mf.sections:
                self.fields += [(d.offset + 5, 1), (d.data_offset - 8, 4),
                                (d.data_offset - 4, 4)]
            self.names = [(b.record.record_offset, len(b.idstr.encode())) for b in mf.blocks]
            if mf.vmdesc is not None:
                self.vmdesc_at = mf.vmdesc.offset
                self.vmdesc_raw = mf.vmdesc.raw
                self.fields.append((mf.vmdesc.offset + 1, 4))
            self.fields.append((mf.header.offset + 9, 4))
        self.fields = [(o, w) for o, w in self.fields if o >= 0 and o + w <= len(self.data)]


# -- mutations -----------------------------------------------------------------------------

Mutation = Callable[[random.Random, Seed, bytearray], str]


def m_flip(rng: random.Random, seed: Seed, buf: bytearray) -> str:
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(buf))
        buf[i] ^= 1 << rng.randrange(8)
    return "flip"


def m_field(rng: random.Random, seed: Seed, buf: bytearray) -> str:
    off, width = rng.choice(seed.fields)
    v = rng.choice([*INTERESTING, len(buf), len(buf) - off, rng.getrandbits(width * 8)])
    v &= (1 << (width * 8)) - 1
    buf[off:off + width] = v.to_bytes(width, "big")
    return "field"


def m_truncate(rng: random.Random, seed: Seed, buf: bytearray) -> str:
    if rng.random() < 0.5 and seed.fields:
        cut = rng.choice(seed.fields)[0] + rng.randint(0, 9)
    else:
        cut = rng.randrange(len(buf))
    del buf[min(cut, len(buf)):]
    return "truncate"


def m_chunk(rng: random.Random, seed: Seed, buf: bytearray) -> str:
    i = rng.randrange(len(buf))
    n = rng.randint(1, 64)
    if rng.random() < 0.5:
        del buf[i:i + n]
        return "delete"
    buf[i:i] = buf[i:i + n]
    return "repeat"


def m_vmdesc(rng: random.Random, seed: Seed, buf: bytearray) -> str:
    """Replace the trailer with hostile JSON (deep, huge numbers, wrong types)."""
    if seed.vmdesc_at is None or seed.vmdesc_at >= len(buf):
        return m_flip(rng, seed, buf)
    doc = json.loads(seed.vmdesc_raw)
    kind = rng.randrange(6)
    if kind == 0:
        raw = b'{"devices": ' + b"[" * rng.randint(100, 100000) + b"]" * 2 + b"}"
    elif kind == 1:
        raw = b'{"page_size": ' + b"9" * rng.randint(100, 10000) + b"}"
    elif kind == 2 and doc.get("devices"):
        dev = rng.choice(doc["devices"])
        f = rng.choice(dev.get("fields") or [{}])
        f[rng.choice(["size", "array_len", "index", "type", "name"])] = rng.choice(
            [-1, 0, 1 << 62, "x", None, [], 1e308, True])
        raw = json.dumps(doc).encode()
    elif kind == 3 and doc.get("devices"):
        rng.shuffle(doc["devices"])
        raw = json.dumps(doc).encode()
    elif kind == 4:
        raw = json.dumps(doc).encode().replace(b'"subsections"', b'"s"', 1)
    else:
        raw = json.dumps({"configuration": doc.get("configuration"), "devices":
                          [{"name": "cpu", "instance_id": 0, "fields":
                            [{"name": "a", "type": "struct", "size": 4,
                              "struct": {"fields": [{"name": "b", "type": "uint8", "size": 4}]
                                         }}]}]}).encode()
    del buf[seed.vmdesc_at:]
    buf += b"\x06" + struct.pack(">I", len(raw)) + raw
    return "vmdesc"


def m_blockname(rng: random.Random, seed: Seed, buf: bytearray) -> str:
    """Empty, escape-laden, colliding or path-like RAMBlock names (length kept)."""
    at, n = rng.choice(seed.names)
    if at + 1 + n > len(buf):
        return m_flip(rng, seed, buf)
    kind = rng.randrange(3)
    if kind == 0:  # empty name: the length byte 0, the name bytes swallowed into the length
        buf[at] = 0
    else:
        pick = [b"../" * 40, b"\x1b[2J\x1b]0;x\x07", b"a/b", b"a_b", b"/", b"."][rng.randrange(6)]
        name = (pick * (n // max(1, len(pick)) + 1))[:n]
        buf[at + 1:at + 1 + n] = name
    return "blockname"


MUTATIONS: list[tuple[Mutation, float]] = [
    (m_flip, 3), (m_field, 5), (m_truncate, 2), (m_chunk, 1), (m_vmdesc, 1.5),
    (m_blockname, 0.5)]


_CHUNK = 64 << 10


def mutate(rng: random.Random, seed: Seed) -> tuple[bytearray, list[str]]:
    """A mutated copy of the seed (a fresh copy: assigning into a reused buffer of another
    size measured 30x slower)."""
    buf = bytearray(seed.data)
    names = []
    fns, weights = zip(*MUTATIONS, strict=True)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        if not buf:
            break
        names.append(rng.choices(fns, weights)[0](rng, seed, buf))
    return buf, names


def write_sparse(path: Path, buf: bytearray) -> None:
    """Write ``buf`` leaving all-zero chunks as holes: mapped-ram seeds are mostly holes."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        whole = len(buf) // _CHUNK * _CHUNK
        if whole:
            nz = np.frombuffer(buf, np.uint64, whole // 8).reshape(-1, _CHUNK // 8).any(axis=1)
            for c in np.flatnonzero(nz).tolist():
                os.pwrite(fd, memoryview(buf)[c * _CHUNK:(c + 1) * _CHUNK], c * _CHUNK)
        if whole < len(buf):
            os.pwrite(fd, memoryview(buf)[whole:], whole)
        os.ftruncate(fd, len(buf))
    finally:
        os.close(fd)


# -- targets ---------------------------------------------------------------------------------


def _null(_: Any) -> None:
    pass


def run_readers(path: Path, work: Path, deep: bool) -> list[str]:
    """Everything a user can do with a file; returns the stages it got through."""
    from fixedram.describe import describe
    from fixedram.format.devstate import decode_configuration
    from fixedram.memory.extract import extract_elf, extract_physical, extract_raw
    from fixedram.memory.layout import guest_physical
    from fixedram.tools.convert import to_stream
    from fixedram.tools.verify import structural_problems

    reached = []
    with MigrationFile(path, strict=False) as mf:
        json.dumps(describe(mf, guest_physical(mf)))
        reached.append("open")
        structural_problems(mf)  # verify's checks (verify opens the file as above)
        with contextlib.suppress(FixedramError):
            decode_configuration(mf)
            mf.devices()
            reached.append("devices")
        for b in mf.blocks:
            for _ in b.runs(256):
                pass
            n = min(b.used_length, 1 << 16)
            b.read(0, n)
            b.read(b.used_length - n, n)
        reached.append("ram")
        if deep:
            for fn, out in ((extract_raw, work / "raw"), (extract_physical, work / "phys"),
                            (extract_elf, work / "core")):
                with contextlib.suppress(FixedramError):
                    fn(mf, out, force=True)
            if mf.complete:
                to_stream(mf, _null)
                reached.append("convert")
    return reached


@contextlib.contextmanager
def piped(path: Path) -> Iterator[int]:
    """The read end of a pipe a thread fills with ``path``'s bytes."""
    r, w = os.pipe()

    def feed() -> None:
        with open(path, "rb") as f, contextlib.suppress(BrokenPipeError, OSError):
            shutil.copyfileobj(f, os.fdopen(w, "wb", closefd=True))

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    try:
        yield r
    finally:
        os.close(r)  # a feeder still writing gets EPIPE
        t.join(10)


def run_receive(path: Path, work: Path) -> None:
    """``fixedram receive -`` with the mutated bytes on its standard input."""
    from fixedram.bridge.receive import receive

    with piped(path) as r:
        receive("-", str(work / "rx.sav"), stdin_fd=r, force=True)


def run_one_pass(path: Path, work: Path, gz: bool, rng: random.Random | None = None
                 ) -> list[str]:
    """``fixedram extract -`` with the mutated bytes on a pipe (read ahead on a
    thread, parsed in one pass); with ``gz`` from a compressed file of them instead
    (decoded on a thread): gzip whole, or, when ``rng`` says so, gzip or zstd cut
    short by 1-4 bytes or at a random point (every decoder must reach its end)."""
    from fixedram import open_save
    from fixedram.memory.extract import extract

    if gz:
        kind = rng.choice(("gzip", "gzip", "gzip-cut", "zstd-cut")) if rng else "gzip"
        src = work / "in.sav.gz"
        data = path.read_bytes()
        if kind.startswith("zstd"):
            import zstandard

            comp = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(data)
        else:
            comp = gzip.compress(data, compresslevel=1)
        if kind.endswith("-cut") and rng is not None and len(comp) > 8:
            cut = rng.choice((1, 2, 3, 4, rng.randrange(1, len(comp) - 4)))
            comp = comp[:len(comp) - cut]
        src.write_bytes(comp)
        with open_save(src) as s:
            extract(s, str(work / "gz"), force=True, allow_incomplete=True)
        return [f"one-pass-{kind}"]
    with piped(path) as r, open_save("-", stdin_fd=r) as s:
        extract(s, str(work / "pipe"), force=True, allow_incomplete=True)
    return ["one-pass-pipe"]


# -- the loop ------------------------------------------------------------------------------


def vm_hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for ln in f:
            if ln.startswith("VmHWM"):
                return int(ln.split()[1])
    return 0


def _report(stats: dict[str, Any], t0: float) -> dict[str, Any]:
    out = dict(stats)
    out["seconds"] = round(time.monotonic() - t0, 1)
    out["inputs_per_second"] = round(out["inputs"] / max(out["seconds"], 1e-9), 1)
    out["peak_rss_mib"] = round(vm_hwm_kib() / 1024, 1)
    for k in ("errors", "stages", "mutations"):
        out[k] = dict(stats[k].most_common())
    return out


def fuzz(seeds: list[Path], *, seconds: float | None, inputs: int | None, rng_seed: int,
         crashes: Path, input_timeout: float, deep_every: int,
         checkpoint: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    rng = random.Random(rng_seed)
    seeded = [Seed(p) for p in seeds]
    crashes.mkdir(parents=True, exist_ok=True)
    stats: dict[str, Any] = {"inputs": 0, "errors": Counter(), "stages": Counter(),
                             "mutations": Counter(), "crashes": [], "seeds": [p.name for p in
                                                                              seeds]}
    t0 = last = time.monotonic()

    # A run paused with SIGSTOP (to give a benchmark the machine) must not turn the input
    # in progress into a timeout: the expired timer is delivered before SIGCONT's handler
    # runs, so an expiry first re-checks one second later, by when a resume is known.
    state = {"resumed": False, "rechecking": False}

    def on_cont(_s: int, _f: Any) -> None:
        state["resumed"] = True

    def on_alarm(_s: int, _f: Any) -> None:
        if state["resumed"]:
            state["resumed"] = state["rechecking"] = False
            signal.setitimer(signal.ITIMER_REAL, input_timeout)  # the input starts over
            return
        if not state["rechecking"]:
            state["rechecking"] = True
            signal.setitimer(signal.ITIMER_REAL, 1.0)
            return
        raise Timeout(f"input ran over {input_timeout} s")

    def on_term(_s: int, _f: Any) -> None:
        raise KeyboardInterrupt  # stop at once, with the statistics so far

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGCONT, on_cont)
    signal.signal(signal.SIGTERM, on_term)
    with tempfile.TemporaryDirectory(prefix="fixedram-fuzz-", dir="/dev/shm") as td, \
            contextlib.suppress(KeyboardInterrupt):  # Ctrl-C, SIGTERM: report what ran
        tmp = Path(td)
        while True:
            if inputs is not None and stats["inputs"] >= inputs:
                break
            if seconds is not None and time.monotonic() - t0 >= seconds:
                break
            seed = rng.choice(seeded)
            buf, names = mutate(rng, seed)
            stats["mutations"].update(names)
            path = tmp / "in.sav"
            write_sparse(path, buf)
            work = tmp / "work"
            work.mkdir(exist_ok=True)
            deep = stats["inputs"] % deep_every == 0
            what = ""
            state["resumed"] = state["rechecking"] = False
            signal.setitimer(signal.ITIMER_REAL, input_timeout)
            try:
                stats["stages"].update(run_readers(path, work, deep))
                if not seed.mapped and deep:
                    run_receive(path, work)
                    stats["stages"].update(
                        run_one_pass(path, work, gz=stats["inputs"] % (2 * deep_every) == 0,
                                     rng=rng))
            except FixedramError as e:
                stats["errors"][type(e).__name__] += 1
            except BaseException as e:  # every other exception is the finding
                if isinstance(e, KeyboardInterrupt):
                    raise
                what = "".join(traceback.format_exception_only(type(e), e)).strip()
                what += "\n" + "".join(traceback.format_tb(e.__traceback__)[-3:])
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            left = sorted(p.name for p in work.rglob("*") if ".partial" in p.name
                          or p.name.startswith("."))
            if left:
                what = what or f"leftover temporary files: {left}"
            if what:
                h = hashlib.sha256(buf).hexdigest()[:16]
                keep = crashes / f"crash-{h}.sav"
                keep.write_bytes(buf)
                stats["crashes"].append({"file": str(keep), "seed": seed.path.name,
                                         "mutations": names, "error": what})
                print(f"CRASH {keep}: {what.splitlines()[0]}", file=sys.stderr)
            shutil.rmtree(work, ignore_errors=True)
            stats["inputs"] += 1
            if checkpoint is not None and time.monotonic() - last >= 60:
                last = time.monotonic()
                checkpoint(_report(stats, t0))
    return _report(stats, t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--make-seeds", type=Path, metavar="DIR")
    p.add_argument("--seeds", type=Path, metavar="DIR")
    p.add_argument("--seconds", type=float)
    p.add_argument("--inputs", type=int)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--crashes", type=Path, default=ROOT / "build" / "fuzz" / "crashes")
    p.add_argument("--input-timeout", type=float, default=60.0)
    p.add_argument("--deep-every", type=int, default=4,
                   help="run extraction, conversion and receive on every Nth input")
    p.add_argument("--json", type=Path, help="write the statistics here")
    a = p.parse_args()
    if a.make_seeds:
        for s in make_seeds(a.make_seeds):
            print(s)
        return 0
    if not a.seeds:
        p.error("--seeds DIR (make them with --make-seeds DIR)")
    seeds = sorted(a.seeds.glob("*.sav"))
    if not seeds:
        p.error(f"no *.sav seeds in {a.seeds}")
    if a.seconds is None and a.inputs is None:
        a.seconds = 60.0

    def save(stats: dict[str, Any]) -> None:
        """Write the statistics so far (a long run can be stopped at any time)."""
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            tmp = a.json.with_name(a.json.name + ".tmp")
            tmp.write_text(json.dumps(stats, indent=2) + "\n")
            tmp.replace(a.json)

    stats = fuzz(seeds, seconds=a.seconds, inputs=a.inputs, rng_seed=a.seed,
                 crashes=a.crashes, input_timeout=a.input_timeout, deep_every=a.deep_every,
                 checkpoint=save)
    save(stats)
    print(f"{stats['inputs']} inputs in {stats['seconds']} s ({stats['inputs_per_second']}/s), "
          f"{len(stats['crashes'])} crashes, peak RSS {stats['peak_rss_mib']} MiB")
    return 1 if stats["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
